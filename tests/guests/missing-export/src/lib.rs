//! A module of the host's package and version that exports only `scan` (with
//! its own type) and none of `health`, `allocate` or `post-allocate`: the host
//! must refuse it at load.

wit_bindgen::generate!({
    inline: "
        package wasm-device-plugin:device@0.2.0;

        world device-plugin {
            export scan: func() -> list<string>;
        }
    ",
});

struct MissingExport;

impl Guest for MissingExport {
    fn scan() -> Vec<String> {
        vec!["d0".to_string()]
    }
}

export!(MissingExport);
