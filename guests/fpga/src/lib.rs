//! Placeholder: being written.

use wdp_sdk::{DeviceKind, DevicePlugin, ModuleError};

struct Placeholder;

impl DevicePlugin for Placeholder {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        Err(ModuleError::Unavailable("not written yet".into()))
    }
}

wdp_sdk::export_device_plugin!(Placeholder);
