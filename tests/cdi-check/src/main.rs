//! `cdi-check`: the `container-device-interface` crate (the Rust port of the
//! runtimes' CDI library) run on the specs the host writes, for
//! `tests/all/cdi.rs`. Prints JSON on stdout; exits 1 with the library's
//! error on stderr when it refuses.
//!
//! ```text
//! cdi-check read FILE           the spec, parsed and validated: {"vendor", "class", "spec"}
//! cdi-check inject DIR NAME...  the CDI devices of DIR, and the device nodes NAME...
//!                               inject into an empty OCI spec:
//!                               {"devices": [NAME...], "injected": [[path, major, minor]...]}
//! ```

use std::path::Path;
use std::process::ExitCode;

use container_device_interface::cache::{new_cache, with_auto_refresh};
use container_device_interface::spec::read_spec;
use container_device_interface::spec_dirs::with_spec_dirs;
use serde_json::json;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("read") if args.len() == 2 => read(Path::new(&args[1])),
        Some("inject") if args.len() >= 2 => inject(&args[1], args[2..].to_vec()),
        _ => Err("usage: cdi-check read FILE | cdi-check inject DIR NAME...".to_string()),
    };
    match result {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("cdi-check: {message}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &Path) -> Result<serde_json::Value, String> {
    let spec = read_spec(&path.to_path_buf(), 0)
        .map_err(|e| format!("{} does not validate: {e:#}", path.display()))?;
    let body = serde_json::to_value(&spec.cdi_spec).map_err(|e| e.to_string())?;
    Ok(json!({
        "vendor": spec.get_vendor(),
        "class": spec.get_class(),
        "spec": body,
    }))
}

fn inject(dir: &str, names: Vec<String>) -> Result<serde_json::Value, String> {
    let cache = new_cache(vec![with_spec_dirs(&[dir]), with_auto_refresh(false)]);
    let mut cache = cache.lock().map_err(|e| e.to_string())?;
    let devices = cache.list_devices();
    let mut oci = oci_spec::runtime::Spec::default();
    cache
        .inject_devices(Some(&mut oci), names)
        .map_err(|e| e.to_string())?;
    let injected: Vec<serde_json::Value> = oci
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default()
        .iter()
        .map(|d| json!([d.path().display().to_string(), d.major(), d.minor()]))
        .collect();
    Ok(json!({ "devices": devices, "injected": injected }))
}
