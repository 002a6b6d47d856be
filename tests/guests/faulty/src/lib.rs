//! A guest that misbehaves on demand, driven by its configuration, so that each
//! failure path of the host can be tested through the real protocol.
//!
//! Serves kind `faulty` with devices `f0`, `f1`, `f2`; `allocate` sets
//! `FAULTY_<n>=<id>`. Each of these keys names the export (`scan`, `health`,
//! `allocate`, `post-allocate`) that misbehaves:
//! - `fail`: `<export>=<invalid-request|unavailable|internal>` returns that error;
//! - `trap`: the export panics (a trap);
//! - `spin`: the export never returns;
//! - `grow`: the export allocates memory until it is stopped.
//!
//! With `probe=sandbox`, `allocate` instead reports what the guest could reach, as
//! env vars of the first container: `PROBE_ENV` (number of environment variables),
//! `PROBE_ARGS` (number of arguments), `PROBE_READ` (reading `/etc/passwd`),
//! `PROBE_LIST` (listing `/`), `PROBE_CWD` (current directory), `PROBE_TCP`
//! (connecting to the address in config `probe-addr`, where the test listens):
//! `ok` or `denied`. It also prints to stdout and
//! stderr, which the host must capture rather than inherit.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "device-plugin",
});

use wasm_device_plugin::device::host;
use wasm_device_plugin::device::types::{Device, KeyValue};

struct Faulty;

fn misbehave(export: &str) -> Result<(), ModuleError> {
    if host::get_config("trap").as_deref() == Some(export) {
        panic!("faulty guest: trap in {export}");
    }
    if host::get_config("spin").as_deref() == Some(export) {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    if host::get_config("grow").as_deref() == Some(export) {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
    if let Some(spec) = host::get_config("fail") {
        if let Some((which, kind)) = spec.split_once('=') {
            if which == export {
                let message = format!("faulty guest: {kind} in {export}");
                return Err(match kind {
                    "invalid-request" => ModuleError::InvalidRequest(message),
                    "unavailable" => ModuleError::Unavailable(message),
                    _ => ModuleError::Internal(message),
                });
            }
        }
    }
    Ok(())
}

impl Guest for Faulty {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        misbehave("scan")?;
        Ok(vec![DeviceKind {
            name: "faulty".to_string(),
            devices: (0..3)
                .map(|n| Device { id: format!("f{n}"), health: Health::Healthy, numa_nodes: Vec::new() })
                .collect(),
        }])
    }

    fn health(devices: Vec<DeviceRef>) -> Result<Vec<Health>, ModuleError> {
        misbehave("health")?;
        Ok(devices.iter().map(|_| Health::Healthy).collect())
    }

    fn allocate(request: AllocateRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
        misbehave("allocate")?;
        if host::get_config("probe").as_deref() == Some("sandbox") {
            return Ok(probe(request.containers.len()));
        }
        Ok(request
            .containers
            .iter()
            .map(|c| ContainerResponse {
                envs: c
                    .device_ids
                    .iter()
                    .enumerate()
                    .map(|(n, id)| KeyValue { key: format!("FAULTY_{n}"), value: id.clone() })
                    .collect(),
                devices: Vec::new(),
                mounts: Vec::new(),
                annotations: Vec::new(),
                cdi_devices: Vec::new(),
            })
            .collect())
    }

    fn post_allocate(
        _request: AllocateRequest,
        response: Vec<ContainerResponse>,
    ) -> Result<Vec<ContainerResponse>, ModuleError> {
        misbehave("post-allocate")?;
        Ok(response)
    }
}

fn outcome<T, E>(result: Result<T, E>) -> String {
    if result.is_ok() { "ok".into() } else { "denied".into() }
}

/// What the sandbox lets this guest reach, one env var per probe.
fn probe(containers: usize) -> Vec<ContainerResponse> {
    println!("faulty guest: hello on stdout");
    eprintln!("faulty guest: hello on stderr");
    let probes = [
        ("PROBE_ENV", std::env::vars().count().to_string()),
        ("PROBE_ARGS", std::env::args().count().to_string()),
        ("PROBE_READ", outcome(std::fs::read("/etc/passwd"))),
        ("PROBE_LIST", outcome(std::fs::read_dir("/"))),
        ("PROBE_CWD", outcome(std::fs::read_dir("."))),
        (
            "PROBE_TCP",
            outcome(std::net::TcpStream::connect(
                host::get_config("probe-addr").unwrap_or_else(|| "127.0.0.1:9".into()),
            )),
        ),
    ];
    let first = ContainerResponse {
        envs: probes.into_iter().map(|(key, value)| KeyValue { key: key.into(), value }).collect(),
        devices: Vec::new(),
        mounts: Vec::new(),
        annotations: Vec::new(),
        cdi_devices: Vec::new(),
    };
    let mut responses = vec![first];
    responses.resize(containers, responses[0].clone());
    responses
}

export!(Faulty);
