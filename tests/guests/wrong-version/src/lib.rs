//! A module built against another version of the host's WIT package
//! (`wasm-device-plugin:device@0.1.0`): the host must refuse it at load, naming
//! both versions.

wit_bindgen::generate!({
    inline: "
        package wasm-device-plugin:device@0.1.0;

        interface host {
            log: func(message: string);
        }

        world device-plugin {
            import host;
            export scan: func() -> list<string>;
        }
    ",
});

struct WrongVersion;

impl Guest for WrongVersion {
    fn scan() -> Vec<String> {
        wasm_device_plugin::device::host::log("scanning");
        vec!["d0".to_string()]
    }
}

export!(WrongVersion);
