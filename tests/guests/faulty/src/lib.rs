//! A guest that misbehaves on demand, driven by its configuration, so that each
//! failure path of the host can be tested through the real protocol.
//!
//! Serves kind `faulty` with devices `f0`, `f1`, ... (`devices`, default 3);
//! `allocate` sets `FAULTY_<n>=<id>`. Each of these keys names the export
//! (`scan`, `health`, `allocate`, `post-allocate`) that misbehaves:
//! - `fail`: `<export>=<invalid-request|unavailable|internal>` returns that error;
//! - `trap`: the export panics (a trap);
//! - `spin`: the export never returns, computing;
//! - `sleep`: the export never returns, waiting in a WASI sleep (no wasm runs);
//! - `grow`: the export allocates memory until it is stopped;
//! - `log`: the export writes 1000 log lines.
//!
//! `bogus=<rule>` makes `scan`, `health` or `allocate` return an answer that
//! breaks one rule of the host's output policy (see [`bogus_scan`],
//! [`bogus_health`] and [`bogus_allocation`]); `path=<p>` is the host path the
//! path rules use.
//!
//! Per request, for the tests of warm instances: `allocate` adds
//! `ALLOCATIONS=<n>`, the allocations this instance has answered, this one
//! included (1 in a fresh instance), to the first container; and when a
//! requested id is the value of `trap-on`, `spin-on`, `print-on` or `refuse-on`,
//! it traps, computes forever, prints a line to stdout, or returns
//! `invalid-request` (after counting the call).
//!
//! For the tests of snapshots: with `scan-env=<v>`, `scan` reports for each device
//! an allocation setting `SCANNED_BY=<v>` and `DEVICE=<id>`, and `allocate` always
//! adds to each container the environment of the allocations it is handed
//! (`container-request.allocations`), so an answer shows which scan it came
//! from; with `gate=<path>`, `allocate` (after counting the call) waits until
//! `<path>` exists (a file in a directory the manifest grants), so a test can
//! hold an allocation in the guest while it changes the resource.
//!
//! With `probe=sandbox`, `allocate` instead reports what the guest could reach, as
//! env vars of the first container: `PROBE_ENV` (number of environment variables),
//! `PROBE_ARGS` (number of arguments), `PROBE_READ` (reading `/etc/passwd`),
//! `PROBE_LIST` (listing `/`), `PROBE_CWD` (current directory), and for the
//! paths in `probe-read`, `probe-escape` and `probe-write`, reading the first
//! two and writing the third: `ok`, or `ok:<contents>` for reads, or `denied`.
//! It also prints to stdout and stderr, which the host must capture rather than
//! inherit.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "device-plugin",
});

use wasm_device_plugin::device::host;
use wasm_device_plugin::device::types::{Device, DeviceSpec, KeyValue, Mount};

struct Faulty;

/// Computes forever (until the host's deadline stops the call).
fn spin_forever() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn misbehave(export: &str) -> Result<(), ModuleError> {
    let is = |key: &str| host::get_config(key).as_deref() == Some(export);
    if is("trap") {
        panic!("faulty guest: trap in {export}");
    }
    if is("spin") {
        spin_forever();
    }
    if is("sleep") {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
    if is("grow") {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
    if is("log") {
        for n in 0..1000 {
            host::log(host::LogLevel::Info, &format!("faulty guest: line {n}"));
        }
    }
    if let Some(spec) = host::get_config("fail")
        && let Some((which, kind)) = spec.split_once('=')
        && which == export
    {
        let message = format!("faulty guest: {kind} in {export}");
        return Err(match kind {
            "invalid-request" => ModuleError::InvalidRequest(message),
            "unavailable" => ModuleError::Unavailable(message),
            _ => ModuleError::Internal(message),
        });
    }
    Ok(())
}

fn device(id: String) -> Device {
    Device {
        id,
        health: Health::Healthy,
        numa_nodes: Vec::new(),
        allocation: empty_response(),
    }
}

fn kind(name: &str, ids: impl IntoIterator<Item = String>) -> DeviceKind {
    DeviceKind {
        name: name.to_string(),
        devices: ids.into_iter().map(device).collect(),
    }
}

/// A scan that breaks the rule `rule`, if it is a scan rule.
fn bogus_scan(rule: &str) -> Option<Vec<DeviceKind>> {
    let ids = |n: usize| (0..n).map(|i| format!("f{i}"));
    Some(match rule {
        "empty-id" => vec![kind("faulty", [String::new()])],
        "long-id" => vec![kind("faulty", ["x".repeat(254)])],
        "duplicate-id" => vec![kind("faulty", ["f0".to_string(), "f0".to_string()])],
        "too-many-devices" => vec![kind("faulty", ids(10_001))],
        "bad-kind-name" => vec![kind("Bad Kind!", ids(1))],
        "kubernetes-io" => vec![kind("kubernetes.io/faulty", ids(1))],
        "duplicate-kind" => vec![kind("faulty", ids(1)), kind("faulty", ids(1))],
        "too-many-kinds" => (0..257).map(|k| kind(&format!("k{k}"), ids(1))).collect(),
        // A device whose reported allocation has a node at config `path`.
        "scan-allocation" => {
            let mut found = kind("faulty", ids(1));
            found.devices[0].allocation.devices.push(DeviceSpec {
                host_path: host::get_config("path").unwrap_or_else(|| "/dev/null".to_string()),
                container_path: "/dev/faulty".to_string(),
                permissions: "rw".to_string(),
            });
            vec![found]
        }
        _ => return None,
    })
}

/// A health answer that breaks the rule `rule`, if it is a health rule.
fn bogus_health(rule: &str, asked: usize) -> Option<Vec<Health>> {
    match rule {
        "health-count" => Some(vec![Health::Healthy; asked + 1]),
        _ => None,
    }
}

fn empty_response() -> ContainerResponse {
    ContainerResponse {
        envs: Vec::new(),
        devices: Vec::new(),
        mounts: Vec::new(),
        annotations: Vec::new(),
        cdi_devices: Vec::new(),
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: value.to_string(),
    }
}

/// An allocation for `containers` containers that breaks the rule `rule`, if it
/// is an allocation rule.
fn bogus_allocation(rule: &str, containers: usize) -> Option<Vec<ContainerResponse>> {
    let path = host::get_config("path").unwrap_or_else(|| "/dev/null".to_string());
    let node = |host_path: &str, container_path: &str, permissions: &str| DeviceSpec {
        host_path: host_path.to_string(),
        container_path: container_path.to_string(),
        permissions: permissions.to_string(),
    };
    let mount = |host_path: &str| Mount {
        host_path: host_path.to_string(),
        container_path: "/mnt/x".to_string(),
        read_only: true,
    };
    let mut r = empty_response();
    match rule {
        "container-count" => return Some(vec![empty_response(); containers + 1]),
        "env-name" => r.envs.push(kv("1NOT-A-NAME", "x")),
        "duplicate-env" => r.envs.extend([kv("SAME", "1"), kv("SAME", "2")]),
        "too-many-envs" => r.envs.extend((0..1025).map(|n| kv(&format!("E{n}"), "x"))),
        "huge-response" => r.envs.push(kv("HUGE", &"x".repeat(4 << 20))),
        "annotation-key" => r.annotations.push(kv("not a key", "x")),
        "cdi-name" => r.cdi_devices.push("no-equals-sign".to_string()),
        "container-path" => r.devices.push(node("/dev/null", "dev/null", "rw")),
        "unnormalised-path" => r.devices.push(node("/dev/../etc/passwd", "/dev/x", "rw")),
        "permissions" => r.devices.push(node("/dev/null", "/dev/null", "rwx")),
        "device-path" => r.devices.push(node(&path, "/dev/x", "rw")),
        "mount-path" => r.mounts.push(mount(&path)),
        _ => return None,
    }
    let mut responses = vec![empty_response(); containers];
    responses[0] = r;
    Some(responses)
}

impl Guest for Faulty {
    fn scan() -> Result<Vec<DeviceKind>, ModuleError> {
        misbehave("scan")?;
        if let Some(kinds) = host::get_config("bogus").as_deref().and_then(bogus_scan) {
            return Ok(kinds);
        }
        let count: usize = host::get_config("devices")
            .and_then(|n| n.parse().ok())
            .unwrap_or(3);
        let mut found = kind("faulty", (0..count).map(|n| format!("f{n}")));
        if let Some(scanned_by) = host::get_config("scan-env") {
            for device in &mut found.devices {
                device.allocation.envs =
                    vec![kv("SCANNED_BY", &scanned_by), kv("DEVICE", &device.id)];
            }
        }
        Ok(vec![found])
    }

    fn health(devices: Vec<DeviceRef>) -> Result<Vec<Health>, ModuleError> {
        misbehave("health")?;
        if let Some(answer) =
            host::get_config("bogus").and_then(|rule| bogus_health(&rule, devices.len()))
        {
            return Ok(answer);
        }
        Ok(devices.iter().map(|_| Health::Healthy).collect())
    }

    fn allocate(request: AllocateRequest) -> Result<Vec<ContainerResponse>, ModuleError> {
        misbehave("allocate")?;
        let answered = per_request(&request)?;
        if let Some(gate) = host::get_config("gate") {
            // Bounded by the host's deadline for the call.
            while std::fs::metadata(&gate).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let containers = request.containers.len();
        if let Some(answer) =
            host::get_config("bogus").and_then(|rule| bogus_allocation(&rule, containers))
        {
            return Ok(answer);
        }
        if host::get_config("probe").as_deref() == Some("sandbox") {
            return Ok(probe(containers));
        }
        let mut responses: Vec<ContainerResponse> = request
            .containers
            .iter()
            .map(|c| ContainerResponse {
                envs: c
                    .device_ids
                    .iter()
                    .enumerate()
                    .map(|(n, id)| kv(&format!("FAULTY_{n}"), id))
                    .chain(c.allocations.iter().flat_map(|a| a.envs.iter().cloned()))
                    .collect(),
                ..empty_response()
            })
            .collect();
        if let Some(first) = responses.first_mut() {
            first.envs.push(kv("ALLOCATIONS", &answered.to_string()));
        }
        Ok(responses)
    }

    fn post_allocate(
        _request: AllocateRequest,
        response: Vec<ContainerResponse>,
    ) -> Result<Vec<ContainerResponse>, ModuleError> {
        misbehave("post-allocate")?;
        Ok(response)
    }
}

/// Allocations this instance has answered (state that only a reused instance
/// keeps).
static ALLOCATIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Counts the allocation, then misbehaves if a requested id asks for it (see the
/// crate docs); the count so far.
fn per_request(request: &AllocateRequest) -> Result<u32, ModuleError> {
    let answered = ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let requested = |key: &str| {
        host::get_config(key).is_some_and(|id| {
            request
                .containers
                .iter()
                .any(|c| c.device_ids.contains(&id))
        })
    };
    if requested("trap-on") {
        panic!("faulty guest: trap on request");
    }
    if requested("spin-on") {
        spin_forever();
    }
    if requested("print-on") {
        println!("faulty guest: printed on request");
    }
    if requested("refuse-on") {
        return Err(ModuleError::InvalidRequest(
            "faulty guest: refused on request".to_string(),
        ));
    }
    Ok(answered)
}

fn outcome<T, E>(result: Result<T, E>) -> String {
    if result.is_ok() {
        "ok".into()
    } else {
        "denied".into()
    }
}

fn read_outcome(path: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => format!("ok:{}", text.trim()),
        Err(_) => "denied".into(),
    }
}

/// What the sandbox lets this guest reach, one env var per probe.
fn probe(containers: usize) -> Vec<ContainerResponse> {
    println!("faulty guest: hello on stdout");
    eprintln!("faulty guest: hello on stderr");
    let mut probes = vec![
        ("PROBE_ENV", std::env::vars().count().to_string()),
        ("PROBE_ARGS", std::env::args().count().to_string()),
        ("PROBE_READ", outcome(std::fs::read("/etc/passwd"))),
        ("PROBE_LIST", outcome(std::fs::read_dir("/"))),
        ("PROBE_CWD", outcome(std::fs::read_dir("."))),
    ];
    if let Some(path) = host::get_config("probe-read") {
        probes.push(("PROBE_GRANTED", read_outcome(&path)));
    }
    if let Some(path) = host::get_config("probe-escape") {
        probes.push(("PROBE_ESCAPE", read_outcome(&path)));
    }
    if let Some(path) = host::get_config("probe-write") {
        probes.push((
            "PROBE_WRITE",
            outcome(std::fs::write(path, "written by a guest")),
        ));
    }
    let first = ContainerResponse {
        envs: probes
            .into_iter()
            .map(|(key, value)| kv(key, &value))
            .collect(),
        ..empty_response()
    };
    let mut responses = vec![first];
    responses.resize(containers, responses[0].clone());
    responses
}

export!(Faulty);
