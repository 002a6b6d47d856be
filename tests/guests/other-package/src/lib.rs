//! A component of another WIT package altogether (`acme:sensors`), which
//! imports an interface the host has never heard of: the host must refuse it at
//! load, naming that import.

wit_bindgen::generate!({
    inline: "
        package acme:sensors@1.0.0;

        interface probe {
            read: func() -> u32;
        }

        world sensor {
            import probe;
            export sample: func() -> u32;
        }
    ",
});

struct OtherPackage;

impl Guest for OtherPackage {
    fn sample() -> u32 {
        acme::sensors::probe::read()
    }
}

export!(OtherPackage);
