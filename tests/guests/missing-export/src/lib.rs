//! A module of the host's package and version that does not export `scan` (its
//! one function is `discover`): the host must refuse it at load, naming `scan`.

wit_bindgen::generate!({
    inline: "
        package wasm-device-plugin:device@0.2.2;

        world device-plugin {
            export discover: func() -> list<string>;
        }
    ",
});

struct MissingExport;

impl Guest for MissingExport {
    fn discover() -> Vec<String> {
        vec!["d0".to_string()]
    }
}

export!(MissingExport);
