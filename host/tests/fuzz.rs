//! Property tests ("fuzzing") of the host's checks of untrusted input: what a guest
//! returns (`policy`), the host paths it hands out (`grants`) and the operator's
//! manifests (`registry::manifest`).
//!
//! Each property feeds generated input that mixes plausible values with hostile ones
//! (empty, huge, `..`, `//`, NUL, unicode, duplicates, values just past a limit) and
//! checks that nothing panics, that whatever is accepted obeys every documented rule
//! (re-checked here by code of its own, not the host's), that valid guest output is
//! not refused, and that a refusal names the module or file and the field.
//!
//! A plain `cargo test` runs [`CASES`] cases of each property. For a long run:
//!
//! ```text
//! cargo xtask fuzz [--seconds N]        # N defaults to 180
//! ```
//!
//! sets `WDP_FUZZ_SECONDS=N` and runs this binary one test at a time. The budget is
//! divided evenly among the [`PROPERTIES`] properties: each keeps starting fresh
//! proptest runs (a new random seed, [`CASES`] cases each) until its share has passed,
//! then prints how many cases it ran. A failure prints the shrunk input; pin it as a
//! unit test next to the fix.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use wasm_device_plugin::domain::{self, ContainerAllocation};
use wasm_device_plugin::grants::{self, Grants, PathUse};
use wasm_device_plugin::policy::{self, PolicyError};
use wasm_device_plugin::registry::Settings;
use wasm_device_plugin::registry::manifest::{self, ManifestError, ModuleSettings};
use wasm_device_plugin::runtime::Limits;
use wasm_device_plugin::runtime::bindings::wasm_device_plugin::device::types::{
    Device as GuestDevice, DeviceSpec, Mount as GuestMount,
};
use wasm_device_plugin::runtime::bindings::{self, ContainerResponse, DeviceKind, KeyValue};

/// Cases per proptest run.
const CASES: u32 = 256;
/// The `#[test]`s below that call [`fuzz`]; each gets this share of `WDP_FUZZ_SECONDS`.
const PROPERTIES: u32 = 6;

// The documented limits, spelled out here rather than read from the host, so that a
// change to one is a deliberate change to this file too.
const MAX_KINDS: usize = 256;
const MAX_DEVICES: usize = 10_000;
const MAX_ID_BYTES: usize = 253;
const MAX_ENTRIES: usize = 1024;
const MAX_RESPONSE_BYTES: usize = 3 << 20;
const MAX_PATH: usize = 4095;
const MIB: usize = 1 << 20;
const MAX_MEMORY_MIB: usize = 4096;
const MAX_REPLICAS: u32 = 1000;
const MAX_HYSTERESIS: u32 = 1000;
const DOMAIN: &str = "example.com";

// ---------------------------------------------------------------------------------
// The run loop

/// This property's share of `WDP_FUZZ_SECONDS`, or `None` for a normal test run.
fn share() -> Option<Duration> {
    let raw = std::env::var("WDP_FUZZ_SECONDS").ok()?;
    let seconds: u64 = raw
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("WDP_FUZZ_SECONDS={raw:?} is not a whole number of seconds"));
    Some(Duration::from_secs(seconds) / PROPERTIES)
}

/// How a case that passed ended: the input was accepted or refused.
enum Verdict {
    Accepted,
    Refused,
}

type Outcome = Result<Verdict, TestCaseError>;

/// Runs `test` on values from `strategy`: [`CASES`] of them, or fresh runs of that
/// many until this property's share of `WDP_FUZZ_SECONDS` has passed.
///
/// # Panics
/// When a case fails, with the shrunk input.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Outcome) {
    let share = share();
    let started = Instant::now();
    let (cases, accepted) = (Cell::new(0_u64), Cell::new(0_u64));
    loop {
        let mut runner = TestRunner::new(Config {
            cases: CASES,
            failure_persistence: None,
            max_shrink_time: 60_000,
            ..Config::default()
        });
        let result = runner.run(&strategy, |value| {
            cases.set(cases.get() + 1);
            let verdict = test(value)?;
            if matches!(verdict, Verdict::Accepted) {
                accepted.set(accepted.get() + 1);
            }
            Ok(())
        });
        if let Err(err) = result {
            panic!("{name}: {err}");
        }
        if share.is_none_or(|share| started.elapsed() >= share) {
            break;
        }
    }
    if share.is_some() {
        println!(
            "fuzz {name}: {} cases ({} accepted) in {:.1?}",
            cases.get(),
            accepted.get(),
            started.elapsed()
        );
    }
}

/// Fails the case with `message` unless `ok`.
fn ensure(ok: bool, message: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if ok {
        Ok(())
    } else {
        Err(TestCaseError::fail(message()))
    }
}

// ---------------------------------------------------------------------------------
// The rules, written again

/// A DNS-1123 subdomain: at most 253 characters of dot-separated labels, each 1 to 63
/// of `[a-z0-9-]`, starting and ending alphanumeric.
fn is_dns_subdomain(s: &str) -> bool {
    let label = |l: &str| {
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        (1..=63).contains(&l.len())
            && l.chars().all(|c| alnum(c) || c == '-')
            && l.starts_with(alnum)
            && l.ends_with(alnum)
    };
    (1..=253).contains(&s.len()) && s.split('.').all(label)
}

/// 1 to 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn is_name_segment(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    (1..=63).contains(&s.len())
        && s.chars().all(|c| alnum(c) || ".-_".contains(c))
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// An extended resource name kubelet registers: `domain/name`, the domain not
/// Kubernetes' own.
fn is_resource_name(s: &str) -> bool {
    s.split_once('/').is_some_and(|(domain, name)| {
        is_dns_subdomain(domain)
            && domain != "kubernetes.io"
            && !domain.ends_with(".kubernetes.io")
            && is_name_segment(name)
    })
}

/// The resource a kind is served as under `domain`.
fn served_as(domain: &str, kind: &str) -> String {
    if kind.contains('/') {
        kind.to_string()
    } else {
        format!("{domain}/{kind}")
    }
}

/// A Kubernetes qualified name (annotation keys): `[prefix/]name`.
fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_name_segment(name),
        None => is_name_segment(s),
    }
}

/// POSIX: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Absolute and normalised: `/` or `/`-separated parts that are not empty, `.` or
/// `..`; no NUL; at most [`MAX_PATH`] bytes.
fn is_normal_path(s: &str) -> bool {
    s.len() <= MAX_PATH
        && !s.contains('\0')
        && (s == "/"
            || s.strip_prefix('/').is_some_and(|rest| {
                rest.split('/')
                    .all(|part| !part.is_empty() && part != "." && part != "..")
            }))
}

/// What the container runtime's CDI parser accepts (`vendor/class=name`, see
/// container-device-interface `pkg/parser`): vendor and class start with a letter,
/// the name with a letter or digit, all end with one; inside, `[A-Za-z0-9_.-]` (the
/// name may also hold `:`). Vendor and class need two characters: the parser slices
/// `name[1:len-1]`, which panics on one.
fn is_cdi_name(s: &str) -> bool {
    let Some((kind, name)) = s.split_once('=') else {
        return false;
    };
    let Some((vendor, class)) = kind.split_once('/') else {
        return false;
    };
    let part = |p: &str, first: fn(char) -> bool, middle: &str, min: usize| {
        p.len() >= min
            && p.starts_with(first)
            && p.ends_with(|c: char| c.is_ascii_alphanumeric())
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || middle.contains(c))
    };
    part(vendor, |c| c.is_ascii_alphabetic(), "_.-", 2)
        && part(class, |c| c.is_ascii_alphabetic(), "_.-", 2)
        && part(name, |c| c.is_ascii_alphanumeric(), "_.-:", 1)
}

/// Checks a scan as `policy::scan` must, naming the first rule broken.
fn scan_rule_broken(kinds: &[DeviceKind]) -> Option<String> {
    if kinds.len() > MAX_KINDS {
        return Some(format!("{} kinds", kinds.len()));
    }
    let mut names = HashSet::new();
    for kind in kinds {
        let name = served_as(DOMAIN, &kind.name);
        if !is_resource_name(&name) {
            return Some(format!("resource name {name:?}"));
        }
        if !names.insert(name.clone()) {
            return Some(format!("resource {name:?} twice"));
        }
        if kind.devices.len() > MAX_DEVICES {
            return Some(format!("{name}: {} devices", kind.devices.len()));
        }
        let mut ids = HashSet::new();
        for d in &kind.devices {
            if d.id.is_empty() || d.id.len() > MAX_ID_BYTES {
                return Some(format!("{name}: id of {} bytes", d.id.len()));
            }
            if !ids.insert(d.id.as_str()) {
                return Some(format!("{name}: id {:?} twice", d.id));
            }
        }
    }
    None
}

/// Checks an allocation as `policy::allocation` must, naming the first rule broken.
/// Host paths are judged by `grants` (checked on its own by
/// `host_paths_are_judged_on_what_they_resolve_to`).
fn allocation_rule_broken(
    containers: usize,
    responses: &[ContainerResponse],
    grants: &Grants,
) -> Option<String> {
    if responses.len() != containers {
        return Some(format!("{} responses", responses.len()));
    }
    let kv = |l: &[KeyValue]| {
        l.iter()
            .map(|kv| kv.key.len() + kv.value.len())
            .sum::<usize>()
    };
    let text: usize = responses
        .iter()
        .map(|r| {
            kv(&r.envs)
                + kv(&r.annotations)
                + r.devices
                    .iter()
                    .map(|d| d.host_path.len() + d.container_path.len() + d.permissions.len())
                    .sum::<usize>()
                + r.mounts
                    .iter()
                    .map(|m| m.host_path.len() + m.container_path.len())
                    .sum::<usize>()
                + r.cdi_devices.iter().map(String::len).sum::<usize>()
        })
        .sum();
    if text > MAX_RESPONSE_BYTES {
        return Some(format!("{text} bytes of text"));
    }
    for (n, r) in responses.iter().enumerate() {
        let lens = [
            r.envs.len(),
            r.devices.len(),
            r.mounts.len(),
            r.annotations.len(),
            r.cdi_devices.len(),
        ];
        if lens.iter().any(|&l| l > MAX_ENTRIES) {
            return Some(format!("[{n}]: a list of {lens:?} entries"));
        }
        let mut keys = HashSet::new();
        for kv in &r.envs {
            if !is_env_name(&kv.key) || !keys.insert(&kv.key) {
                return Some(format!("[{n}]: env {:?}", kv.key));
            }
        }
        let mut keys = HashSet::new();
        for kv in &r.annotations {
            if !is_qualified_name(&kv.key) || !keys.insert(&kv.key) {
                return Some(format!("[{n}]: annotation {:?}", kv.key));
            }
        }
        let host = |use_, p: &str| is_normal_path(p) && grants.check_host_path(use_, p).is_ok();
        for d in &r.devices {
            if !is_normal_path(&d.container_path)
                || !host(PathUse::Device, &d.host_path)
                || d.permissions.is_empty()
                || !d.permissions.chars().all(|c| "rwm".contains(c))
            {
                return Some(format!("[{n}]: device {d:?}"));
            }
        }
        for m in &r.mounts {
            if !is_normal_path(&m.container_path) || !host(PathUse::Mount, &m.host_path) {
                return Some(format!("[{n}]: mount {m:?}"));
            }
        }
        if let Some(cdi) = r.cdi_devices.iter().find(|c| !is_cdi_name(c)) {
            return Some(format!("[{n}]: CDI device {cdi:?}"));
        }
    }
    None
}

/// A refusal names the module asked and says where and why.
fn names_module(err: &PolicyError, module: &str) -> Outcome {
    ensure(
        err.module == module && !err.field.is_empty() && !err.rule.is_empty(),
        || format!("refusal {err:?} for module {module:?}"),
    )?;
    Ok(Verdict::Refused)
}

/// `path` with its symlinks followed one part at a time, as the kernel does, and
/// whatever does not exist kept as written: what `grants::resolve` must return.
/// Fails where it must: a symlink that leads nowhere, a loop, a file with parts
/// after it, a name too long.
fn walk(path: &Path) -> Result<PathBuf, String> {
    // Parts still to visit, last first, each marked when it came from a link.
    let mut todo: Vec<(OsString, bool)> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(p) => Some((p.to_os_string(), false)),
            _ => None,
        })
        .collect();
    let mut out = PathBuf::from("/");
    let mut missing = false;
    let mut links = 0;
    while let Some((part, from_link)) = todo.pop() {
        if part == ".." {
            out.pop();
            continue;
        }
        if part == "." {
            continue;
        }
        let next = out.join(&part);
        if missing {
            out = next;
            continue;
        }
        match std::fs::symlink_metadata(&next) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if from_link {
                    return Err(format!("{} leads nowhere", next.display()));
                }
                missing = true;
                out = next;
            }
            Err(e) => return Err(format!("{}: {e}", next.display())),
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(format!("{}: too many links", path.display()));
                }
                let target = std::fs::read_link(&next).map_err(|e| e.to_string())?;
                for c in target.components().rev() {
                    match c {
                        Component::RootDir => {}
                        Component::CurDir => todo.push((".".into(), true)),
                        Component::ParentDir => todo.push(("..".into(), true)),
                        Component::Normal(p) => todo.push((p.to_os_string(), true)),
                        Component::Prefix(_) => unreachable!("no prefixes on unix"),
                    }
                }
                if target.is_absolute() {
                    out = PathBuf::from("/");
                }
            }
            Ok(meta) => {
                if !meta.is_dir() && !todo.is_empty() {
                    return Err(format!("{} is not a directory", next.display()));
                }
                out = next;
            }
        }
    }
    Ok(out)
}

/// Whether `grants` must allow `path` for `use_`, judged on [`walk`]: it resolves,
/// it lies under a resolved prefix of that use, and neither it nor what it resolves
/// to is, holds or lies in a protected path (as written or resolved).
fn host_path_allowed(grants: &Grants, use_: PathUse, path: &Path) -> Result<PathBuf, String> {
    let resolved = walk(path)?;
    for protected in grants.protected() {
        let real = walk(protected).unwrap_or_else(|_| protected.to_path_buf());
        for p in [path, resolved.as_path()] {
            for q in [protected, real.as_path()] {
                if p.starts_with(q) || q.starts_with(p) {
                    return Err(format!("{} meets protected {}", p.display(), q.display()));
                }
            }
        }
    }
    let prefixes: Vec<&Path> = match use_ {
        PathUse::Device => grants.device_paths().collect(),
        PathUse::Mount => grants.mount_paths().collect(),
    };
    if prefixes
        .iter()
        .any(|p| resolved.starts_with(walk(p).unwrap_or_else(|_| p.to_path_buf())))
    {
        Ok(resolved)
    } else {
        Err(format!("{} is under no grant", resolved.display()))
    }
}

// ---------------------------------------------------------------------------------
// Strategies

fn one_of(values: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    select(values).prop_map(String::from)
}

/// Text meant to break things.
fn hostile() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        3 => one_of(&[
            "", ".", "..", "/", "//", "\0", "a\0b", " ", "-", "_", "=", ":", "::", "é", "日本",
            "\u{202e}x", "\u{feff}", "a b", "\n", "\t", "${X}", "A=B", "a/b", "*", "\"", "\\",
        ]),
        2 => any::<String>(),
        1 => (one_of(&["a", "é", "/", "a/", "x.", "-", "\0", "../"]), 60..300_usize)
            .prop_map(|(s, n)| s.repeat(n)),
    ]
}

/// A domain name of `len` characters made of 63-character labels.
fn long_domain(len: usize) -> String {
    (0..len)
        .map(|i| if i % 64 == 63 { '.' } else { 'a' })
        .collect()
}

fn module_name() -> impl Strategy<Value = String> {
    prop_oneof![3 => one_of(&["m", "fpga", "virtual_devices"]), 1 => hostile()]
}

/// A kind name as a guest reports it.
fn kind_name() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => one_of(&[
            "dev-1", "dev-2", "gpu", "a", "fpga.region", "X_1", "example.com/x",
            "vendor.io/gpu", "fpga.intel.com/region-af12", "a.b-c.d/E.f_g",
        ]),
        2 => "[A-Za-z0-9][A-Za-z0-9._-]{0,8}[A-Za-z0-9]",
        1 => (62..=64_usize).prop_map(|n| "n".repeat(n)),
        1 => (251..=255_usize).prop_map(|n| format!("{}/x", long_domain(n))),
        2 => one_of(&[
            "kubernetes.io/x", "x.kubernetes.io/y", "kubernetes.io", "Bad Name", "UPPER.com/x",
            "-x", "x-", ".x", "a/b/c", "/x", "x/", "example.com/", "a..b/x", "-a.com/x",
            "a_b.com/x", "a-.com/x",
        ]),
        1 => hostile(),
    ]
}

fn device_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => one_of(&["a", "b", "c", "0", "/node1/dev1/3", "0000:3b:00.0", "x::y", "a::0", "GPU-8f0e"]),
        2 => "[!-~]{1,16}",
        1 => (252..=254_usize).prop_map(|n| "i".repeat(n)),
        // 252 and 254 bytes in 126 and 127 characters.
        1 => (126..=127_usize).prop_map(|n| "é".repeat(n)),
        1 => hostile(),
    ]
}

fn guest_health() -> impl Strategy<Value = bindings::Health> {
    prop_oneof![
        Just(bindings::Health::Healthy),
        Just(bindings::Health::Unhealthy)
    ]
}

/// A device allocation that gives nothing (the allocation rules are fuzzed on
/// `allocate` answers, which scan reports are checked by).
fn nothing() -> ContainerResponse {
    ContainerResponse {
        envs: vec![],
        devices: vec![],
        mounts: vec![],
        annotations: vec![],
        cdi_devices: vec![],
    }
}

fn guest_devices() -> impl Strategy<Value = Vec<GuestDevice>> {
    let device = (device_id(), guest_health(), vec(any::<i64>(), 0..3)).prop_map(
        |(id, health, numa_nodes)| GuestDevice {
            id,
            health,
            numa_nodes,
            allocation: nothing(),
        },
    );
    prop_oneof![
        40 => vec(device, 0..6),
        1 => (MAX_DEVICES - 1..=MAX_DEVICES + 1).prop_map(|n| {
            (0..n)
                .map(|i| GuestDevice {
                    id: format!("d{i}"),
                    health: bindings::Health::Healthy,
                    numa_nodes: vec![],
                    allocation: nothing(),
                })
                .collect()
        }),
    ]
}

fn kinds() -> impl Strategy<Value = Vec<DeviceKind>> {
    let kind =
        (kind_name(), guest_devices()).prop_map(|(name, devices)| DeviceKind { name, devices });
    prop_oneof![
        30 => vec(kind, 0..5),
        1 => (MAX_KINDS - 1..=MAX_KINDS + 1).prop_map(|n| {
            (0..n)
                .map(|i| DeviceKind {
                    name: format!("k{i}"),
                    devices: vec![],
                })
                .collect()
        }),
    ]
}

fn env_key() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => one_of(&["DEV_ID", "_", "A1", "PATH", "FPGA_REGION", "a", "x_y"]),
        2 => "[A-Za-z_][A-Za-z0-9_]{0,12}",
        2 => one_of(&["", "1X", "A-B", "A=B", "É", "A B", "A\0", "A.B", "9"]),
        1 => hostile(),
    ]
}

fn annotation_key() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => one_of(&["com.intel.fpga.mode", "virtual.example.com/devices", "a", "A_b-c.D", "cdi.k8s.io/x"]),
        2 => "([a-z0-9]([a-z0-9.-]{0,8}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,8}[A-Za-z0-9])?",
        2 => one_of(&[
            "", "bad key", "UPPER.com/x", "a/b/c", "/x", "x/", "-a", "a-", "a..b/x", "-a.com/x",
            "a_b.com/x",
        ]),
        1 => (62..=64_usize).prop_map(|n| format!("x.io/{}", "n".repeat(n))),
        1 => (252..=254_usize).prop_map(|n| format!("{}/n", long_domain(n))),
        1 => hostile(),
    ]
}

/// Environment and annotation values, now and then big enough that a response
/// goes over [`MAX_RESPONSE_BYTES`].
fn value() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        60 => "[ -~]{0,20}",
        10 => hostile(),
        1 => (MAX_RESPONSE_BYTES / 2 - 16..=MAX_RESPONSE_BYTES / 2 + 16).prop_map(|n| "v".repeat(n)),
        1 => (MAX_RESPONSE_BYTES - 16..=MAX_RESPONSE_BYTES + 16).prop_map(|n| "v".repeat(n)),
    ]
}

fn container_path() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => one_of(&["/dev/x", "/", "/dev/fpga0", "/opt/lib", "/usr/lib/x.so"]),
        2 => "(/[a-z0-9._-]{1,6}){1,4}",
        2 => one_of(&[
            "", "dev/x", "/dev/../etc", "/dev//x", "/dev/x/", "/./x", "/a\0b", "/..", "//", "/dév",
        ]),
        1 => (MAX_PATH - 1..=MAX_PATH + 1).prop_map(|n| format!("/{}", "a".repeat(n - 1))),
        1 => hostile(),
    ]
}

fn permissions() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => one_of(&["r", "rw", "rwm", "mrw", "w", "m"]),
        1 => one_of(&["", "x", "rwx", "R", " r"]),
        1 => "[rwmx]{0,4}",
    ]
}

fn cdi_name() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => one_of(&[
            "vendor.com/class=dev0", "nvidia.com/gpu=0", "nvidia.com/gpu=all",
            "intel.com/fpga=region:0", "ab/cd=e",
        ]),
        2 => "[A-Za-z0-9._-]{1,6}/[A-Za-z0-9._-]{1,6}=[A-Za-z0-9._:-]{1,6}",
        2 => one_of(&[
            "no-equals", "=", "/=", "a/=b", "/b=c", "-/-=-", ".a/b=c", "ab./cd=e", "ab/cd=e=f",
            "ab/cd/e=f", "ab/cd=:e", "ab/cd=e:", "a/b=c", "AB/CD=E", "a1/b2=c", "1a/bc=d",
            "ab/cd=n/x",
        ]),
        1 => hostile(),
    ]
}

/// Up to a few entries, now and then just under or over [`MAX_ENTRIES`] (made
/// distinct by `nth`).
fn entries<T: Clone + std::fmt::Debug>(
    entry: impl Strategy<Value = T> + Clone,
    nth: fn(T, usize) -> T,
) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![
        40 => vec(entry.clone(), 0..4),
        1 => (entry, MAX_ENTRIES - 1..=MAX_ENTRIES + 1)
            .prop_map(move |(e, n)| (0..n).map(|i| nth(e.clone(), i)).collect()),
    ]
}

/// The `i`th of many entries like `kv`: its key numbered, its value cut short (a
/// thousand copies of a value of megabytes would take gigabytes).
fn numbered(kv: KeyValue, i: usize) -> KeyValue {
    KeyValue {
        key: format!("{}{i}", kv.key),
        value: kv.value.chars().take(16).collect(),
    }
}

fn same<T>(t: T, _: usize) -> T {
    t
}

fn response(host_path: BoxedStrategy<String>) -> impl Strategy<Value = ContainerResponse> {
    let kv = |key: BoxedStrategy<String>| {
        (key, value()).prop_map(|(key, value)| KeyValue { key, value })
    };
    let device = (container_path(), host_path.clone(), permissions()).prop_map(
        |(container_path, host_path, permissions)| DeviceSpec {
            host_path,
            container_path,
            permissions,
        },
    );
    let mount = (container_path(), host_path, any::<bool>()).prop_map(
        |(container_path, host_path, read_only)| GuestMount {
            host_path,
            container_path,
            read_only,
        },
    );
    (
        entries(kv(env_key().boxed()), numbered),
        entries(device, same),
        entries(mount, same),
        entries(kv(annotation_key().boxed()), numbered),
        entries(cdi_name(), same),
    )
        .prop_map(
            |(envs, devices, mounts, annotations, cdi_devices)| ContainerResponse {
                envs,
                devices,
                mounts,
                annotations,
                cdi_devices,
            },
        )
}

// ---------------------------------------------------------------------------------
// A host tree with real files and symlinks

/// A temporary tree of directories, files and symlinks, and grants over it:
///
/// ```text
/// dev/                       device-paths (with /dev)
///   fpga/port0               a file
///   fpga/secret/             protected
///   etc-link -> /etc         root-link -> /         proc-link -> /proc/self
///   dangling -> <root>/gone  loop-a -> loop-b -> loop-a
///   up -> ..                 self -> .              opt-link -> ../opt
///   secret-link -> fpga/secret                      kubelet-link -> ../kubelet
///   port-link -> fpga/port0
/// opt/lib/libx.so            opt/lib is a mount-path
///   fpga-link -> <root>/dev/fpga
/// optlink -> opt             a mount-path given through a symlink
/// kubelet/plugins/kubelet.sock                      kubelet/ protected
/// outside/priv/              protected through protlink -> outside/priv
/// ```
struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
    grants: Grants,
}

/// The names a generated path under the tree is made of.
#[rustfmt::skip]
const PARTS: &[&str] = &[
    "dev", "opt", "optlink", "kubelet", "plugins", "kubelet.sock", "outside", "priv",
    "protlink", "fpga", "port0", "secret", "etc-link", "root-link", "proc-link", "dangling",
    "loop-a", "loop-b", "up", "self", "opt-link", "secret-link", "kubelet-link",
    "port-link", "lib", "libx.so", "fpga-link", "new", "passwd", "mem", "null",
];

/// Host paths outside the tree.
#[rustfmt::skip]
const SYSTEM_PATHS: &[&str] = &[
    "/", "/dev", "/dev/null", "/dev/zero", "/dev/mem", "/dev/fpga0", "/dev/shm", "/etc",
    "/etc/passwd", "/proc/self/mem", "/var/lib/kubelet/pods", "/tmp", "/opt",
];

impl Tree {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        let mkdir = |p: &str| std::fs::create_dir_all(root.join(p)).expect("mkdir");
        let file = |p: &str| std::fs::write(root.join(p), "").expect("file");
        let link = |target: &str, p: &str| {
            std::os::unix::fs::symlink(target, root.join(p)).expect("symlink")
        };
        let r = |p: &str| root.join(p).to_str().expect("utf-8 temp dir").to_string();
        for d in [
            "dev/fpga/secret",
            "opt/lib",
            "kubelet/plugins",
            "outside/priv",
        ] {
            mkdir(d);
        }
        file("dev/fpga/port0");
        file("opt/lib/libx.so");
        file("kubelet/plugins/kubelet.sock");
        link("/etc", "dev/etc-link");
        link("/", "dev/root-link");
        link("/proc/self", "dev/proc-link");
        link(&r("gone"), "dev/dangling");
        link("loop-b", "dev/loop-a");
        link("loop-a", "dev/loop-b");
        link("..", "dev/up");
        link(".", "dev/self");
        link("../opt", "dev/opt-link");
        link("fpga/secret", "dev/secret-link");
        link("../kubelet", "dev/kubelet-link");
        link("fpga/port0", "dev/port-link");
        link(&r("dev/fpga"), "opt/fpga-link");
        link("opt", "optlink");
        link("outside/priv", "protlink");
        let grants = Grants::new(
            vec![],
            vec![root.join("dev"), PathBuf::from("/dev")],
            vec![root.join("optlink"), root.join("opt/lib")],
        )
        .protecting(&root.join("kubelet"))
        .protecting(&root.join("dev/fpga/secret"))
        .protecting(&root.join("protlink"));
        Self {
            _dir: dir,
            root,
            grants,
        }
    }

    /// Absolute, normalised paths: mostly under the tree, through its links.
    fn paths(&self) -> BoxedStrategy<String> {
        let root = self.root.to_str().expect("utf-8 temp dir").to_string();
        // Now and then a part longer than a file name may be.
        let part =
            prop_oneof![8 => select(PARTS).prop_map(String::from), 1 => Just("a".repeat(300))];
        let under = vec(part, 0..6).prop_map(move |parts| {
            let mut p = root.clone();
            for part in parts {
                p.push('/');
                p.push_str(&part);
            }
            p
        });
        prop_oneof![8 => under, 1 => one_of(SYSTEM_PATHS)].boxed()
    }

    /// Host paths as a guest hands them out: the tree's, and anything else.
    fn host_paths(&self) -> BoxedStrategy<String> {
        prop_oneof![3 => self.paths(), 1 => container_path()].boxed()
    }
}

// ---------------------------------------------------------------------------------
// Manifests

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quoted(s: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    s.prop_map(|s| toml_str(&s))
}

/// A value of the wrong type for most keys (TOML as written).
fn mistyped() -> impl Strategy<Value = String> + Clone {
    one_of(&[
        "10",
        "-1",
        "1.5",
        "true",
        "[]",
        "[\"10s\"]",
        "{}",
        "{ a = 1 }",
        "1979-05-27",
        "1979-05-27T07:32:00Z",
        "\"\"",
        "inf",
        "nan",
        "'literal'",
    ])
}

fn duration() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => quoted(one_of(&["10s", "500ms", "1m", "2h", "1h 30m", "1year", "100years", "1ns", "1d"])),
        3 => quoted(one_of(&[
            "0s", "0", "0ms", "-1s", "soon", "", "1.5s", "10", " 10s", "10 s",
            "584942417355years", "300000000000years", "1000000000years", "18446744073709551615s",
            "18446744073709551616s", "9999999999999999999999years", "106751991167300d",
        ])),
        2 => quoted("[0-9]{1,22} ?(ns|us|ms|s|m|h|d|w|M|y|years|fortnight)"),
        1 => mistyped(),
        1 => quoted(hostile()),
    ]
}

/// An integer key's value (memory-mib, replicas, the health thresholds).
fn count(max: i64) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0..=max + max / 10).prop_map(|n| n.to_string()),
        1 => one_of(&[
            "0", "1", "-1", "1000", "1001", "4096", "4097", "9223372036854775807",
            "-9223372036854775808", "4294967295", "4294967296", "99999999999999999999", "\"64\"",
            "1e3", "0x40", "0o7", "0b1", "1_024", "+64",
        ]),
        1 => mistyped(),
    ]
}

fn domain() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => quoted(one_of(&["vendor.example", "example.com", "a", "fpga.intel.com", "k8s.io"])),
        2 => quoted(one_of(&[
            "kubernetes.io", "x.kubernetes.io", "Example.com", "-a.com", "a-.com", "a..b", "",
            "a_b.com", "a/b", "a b", ".a", "a.",
        ])),
        1 => quoted("[a-z0-9.-]{1,20}"),
        1 => quoted((250..=255_usize).prop_map(long_domain)),
        1 => quoted((62..=64_usize).prop_map(|n| "d".repeat(n))),
        1 => mistyped(),
        1 => quoted(hostile()),
    ]
}

fn path_list() -> impl Strategy<Value = String> {
    let path = prop_oneof![
        4 => one_of(&[
            "/dev/fpga", "/sys/class/fpga_region", "/sys/class/fpga_region/", "/dev", "/opt/lib",
            "/srv/data//x", "/a/./b", "/var/../etc", "/", "//", "///", "/.", "/..", "/./",
            "./x", "x", "", "/dev/fpga\0x", "/é", "C:\\x", "~/x", "/etc", "/var/lib/kubelet",
        ]),
        2 => "(/[a-z.]{0,4}){1,4}/?",
        1 => hostile(),
    ];
    prop_oneof![
        5 => vec(quoted(path), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => quoted(one_of(&["/dev"])),
        1 => mistyped(),
    ]
}

fn config_table() -> impl Strategy<Value = Vec<(String, String)>> {
    let key = quoted(
        prop_oneof![4 => one_of(&["kinds", "count", "verbose", "a.b", "", "*"]), 1 => hostile()],
    );
    let value = prop_oneof![
        3 => quoted("[ -~]{0,10}"),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        2 => one_of(&[
            "1.5", "-0.0", "1e308", "inf", "-inf", "nan", "true", "false", "[1, 2]", "{ a = 1 }",
            "1979-05-27T07:32:00Z", "07:32:00", "\"\"\"multi\nline\"\"\"", "'literal'",
        ]),
        1 => quoted(hostile()),
    ];
    vec((key, value), 0..4)
}

/// A `[resources.<kind>]` table: its quoted key and its lines.
fn resource_table() -> impl Strategy<Value = (String, Vec<String>)> {
    let key = quoted(prop_oneof![
        2 => one_of(&["*", "dev-1", "dev-2", "gpu", "vendor.io/x", "Bad Name", "", "kubernetes.io/x"]),
        1 => kind_name(),
    ]);
    let name = prop_oneof![
        2 => quoted(one_of(&["gpu", "vendor.example/gpu", "Bad Name", "", "kubernetes.io/x", "a/b/c"])),
        2 => quoted(kind_name()),
        1 => mistyped(),
    ];
    let line = |key: &'static str, value: BoxedStrategy<String>| {
        option::weighted(0.5, value.prop_map(move |v| format!("{key} = {v}")))
    };
    (
        key,
        line("name", name.boxed()),
        line("replicas", count(i64::from(MAX_REPLICAS)).boxed()),
        line("unhealthy-after", count(i64::from(MAX_HYSTERESIS)).boxed()),
        line("healthy-after", count(i64::from(MAX_HYSTERESIS)).boxed()),
        // Not a key: `replicas` misspelt.
        option::weighted(0.05, Just("replica = 2".to_string())),
    )
        .prop_map(|(key, a, b, c, d, e)| (key, [a, b, c, d, e].into_iter().flatten().collect()))
}

/// A manifest assembled from the real keys, with values often out of range or of the
/// wrong type, and now and then a key that does not exist.
fn manifest_doc() -> impl Strategy<Value = String> {
    let top = (
        option::weighted(0.5, domain()),
        option::weighted(0.5, duration()),
        option::weighted(0.5, duration()),
    );
    let limits = option::weighted(
        0.6,
        (
            option::weighted(0.7, count(MAX_MEMORY_MIB as i64)),
            option::weighted(0.5, duration()),
            option::weighted(0.5, duration()),
        ),
    );
    let grants = option::weighted(
        0.6,
        (
            option::weighted(0.5, path_list()),
            option::weighted(0.5, path_list()),
            option::weighted(0.5, path_list()),
        ),
    );
    let stray = option::weighted(
        0.1,
        one_of(&[
            "colour = 1",
            "[limits]\nmemory = 1",
            "[grants]\nwrite-dirs = []",
            "[extra]\nx = 1",
            "[[resources]]\nname = \"x\"",
        ]),
    );
    (
        top,
        limits,
        grants,
        option::weighted(0.4, config_table()),
        vec(resource_table(), 0..4),
        stray,
    )
        .prop_map(
            |((domain, scan, health), limits, grants, config, resources, stray)| {
                let mut doc = String::new();
                put(&mut doc, "domain", domain);
                put(&mut doc, "scan-interval", scan);
                put(&mut doc, "health-interval", health);
                if let Some((memory, allocate, scan)) = limits {
                    doc.push_str("[limits]\n");
                    put(&mut doc, "memory-mib", memory);
                    put(&mut doc, "allocate-timeout", allocate);
                    put(&mut doc, "scan-timeout", scan);
                }
                if let Some((read_only, devices, mounts)) = grants {
                    doc.push_str("[grants]\n");
                    put(&mut doc, "read-only-dirs", read_only);
                    put(&mut doc, "device-paths", devices);
                    put(&mut doc, "mount-paths", mounts);
                }
                if let Some(config) = config {
                    doc.push_str("[config]\n");
                    for (key, value) in config {
                        put(&mut doc, &key, Some(value));
                    }
                }
                for (kind, lines) in resources {
                    let _ = writeln!(doc, "[resources.{kind}]");
                    for line in lines {
                        let _ = writeln!(doc, "{line}");
                    }
                }
                if let Some(stray) = stray {
                    let _ = writeln!(doc, "{stray}");
                }
                doc
            },
        )
}

/// Appends `key = value` when there is a value.
fn put(doc: &mut String, key: &str, value: Option<String>) {
    if let Some(value) = value {
        let _ = writeln!(doc, "{key} = {value}");
    }
}

/// Any text: arbitrary strings, and generated manifests cut, spliced or broken.
fn manifest_text() -> impl Strategy<Value = String> {
    let damage = one_of(&[
        "[",
        "]",
        "\"",
        "'",
        "=",
        "\n",
        "[[resources]]",
        "\\u",
        "'''",
        "\"\"\"",
        "#",
        "\0",
        "\r",
        "é",
        "\u{feff}",
        "[limits]\n",
        "=\"",
        ".",
        "{",
        "}",
    ]);
    let broken = (
        manifest_doc(),
        any::<Index>(),
        any::<Index>(),
        0..3_u8,
        damage,
    )
        .prop_map(|(doc, at, to, how, insert)| {
            let cuts: Vec<usize> = doc
                .char_indices()
                .map(|(i, _)| i)
                .chain([doc.len()])
                .collect();
            let (a, b) = (cuts[at.index(cuts.len())], cuts[to.index(cuts.len())]);
            let (from, to) = (a.min(b), a.max(b));
            match how {
                0 => doc[..from].to_string(),
                1 => format!("{}{insert}{}", &doc[..from], &doc[from..]),
                _ => format!("{}{}", &doc[..from], &doc[to..]),
            }
        });
    prop_oneof![
        1 => any::<String>(),
        1 => "(\\PC|\n|\r|\t){0,200}",
        3 => broken,
    ]
}

fn settings() -> Settings {
    Settings {
        kubelet_dir: "/var/lib/kubelet".into(),
        default_domain: DOMAIN.into(),
        health_interval: Duration::from_secs(10),
        scan_interval: Duration::from_secs(60),
        limits: Limits::default(),
        cdi_dir: "/var/run/cdi".into(),
    }
}

/// What a parsed manifest must satisfy, whatever the text was.
fn manifest_bounds(m: &ModuleSettings) -> Result<(), String> {
    if !is_resource_name(&format!("{}/x", m.domain)) {
        return Err(format!("domain {:?}", m.domain));
    }
    let limits = &m.call.limits;
    for (field, d) in [
        ("scan-interval", m.scan_interval),
        ("health-interval", m.health_interval),
        ("scan-timeout", limits.scan_deadline),
        ("allocate-timeout", limits.allocate_deadline),
    ] {
        // Used as a timer period and a call deadline: `Instant::now() + d` must not
        // overflow (it panics).
        if d.is_zero() || Instant::now().checked_add(d).is_none() {
            return Err(format!("{field} {d:?}"));
        }
    }
    if !limits.memory_bytes.is_multiple_of(MIB)
        || !(1..=MAX_MEMORY_MIB).contains(&(limits.memory_bytes / MIB))
    {
        return Err(format!("memory {} bytes", limits.memory_bytes));
    }
    let grants = &m.call.grants;
    let normal = |p: &Path| p.to_str().is_some_and(is_normal_path);
    if let Some(p) = grants.read_only_dirs().iter().find(|p| !normal(p)) {
        return Err(format!("read-only dir {p:?}"));
    }
    if let Some(p) = grants
        .device_paths()
        .chain(grants.mount_paths())
        .find(|p| !normal(p) || p.as_os_str() == "/")
    {
        return Err(format!("device or mount path {p:?}"));
    }
    let kubelet = settings().kubelet_dir;
    let protected: Vec<&Path> = grants.protected().collect();
    if !protected.contains(&kubelet.as_path())
        || !grants::PROTECTED
            .iter()
            .all(|p| protected.contains(&Path::new(p)))
    {
        return Err(format!("protected {protected:?}"));
    }
    let policies = std::iter::once(("*", &m.default_resource))
        .chain(m.resources.iter().map(|(k, p)| (k.as_str(), p)));
    for (kind, p) in policies {
        if !(1..=MAX_REPLICAS).contains(&p.replicas)
            || !(1..=MAX_HYSTERESIS).contains(&p.unhealthy_after)
            || !(1..=MAX_HYSTERESIS).contains(&p.healthy_after)
        {
            return Err(format!("resources.{kind}: {p:?}"));
        }
    }
    if m.default_resource.name.is_some() || m.resources.contains_key("*") {
        return Err("a name for every kind".into());
    }
    for (kind, p) in &m.resources {
        let name = served_as(&m.domain, p.name.as_deref().unwrap_or(kind));
        let served = m.resource_name(kind).map(|n| n.to_string());
        if !is_resource_name(&name) || served.as_deref() != Ok(name.as_str()) {
            return Err(format!("resources.{kind} served as {served:?}"));
        }
    }
    Ok(())
}

/// Parses `text` and checks the outcome either way.
fn check_manifest(text: &str) -> Outcome {
    let file = Path::new("/modules/m.toml");
    match manifest::parse(file, text, &settings()) {
        Ok(m) => match manifest_bounds(&m) {
            Ok(()) => Ok(Verdict::Accepted),
            Err(rule) => Err(TestCaseError::fail(format!(
                "accepted, but {rule}:\n{text}"
            ))),
        },
        Err(ManifestError {
            file: named,
            field,
            message,
        }) => {
            ensure(
                named == file && !field.is_empty() && !message.is_empty(),
                || format!("refusal {named:?} {field:?} {message:?}"),
            )?;
            Ok(Verdict::Refused)
        }
    }
}

// ---------------------------------------------------------------------------------
// The properties

#[test]
fn scan_output_is_checked() {
    fuzz("scan", (module_name(), kinds()), |(module, kinds)| {
        let broken = scan_rule_broken(&kinds);
        let name_of = |kind: &str| domain::ResourceName::for_kind(DOMAIN, kind);
        match (
            policy::scan(&module, name_of, &Grants::default(), kinds.clone()),
            broken,
        ) {
            (Err(e), Some(_)) => names_module(&e, &module),
            (Err(e), None) => Err(TestCaseError::fail(format!("valid scan refused: {e}"))),
            (Ok(_), Some(rule)) => Err(TestCaseError::fail(format!("accepted, but {rule}"))),
            (Ok(out), None) => {
                ensure(out.len() == kinds.len(), || "a kind lost".into())?;
                for (r, k) in out.iter().zip(&kinds) {
                    ensure(
                        r.kind == k.name && r.name.as_str() == served_as(DOMAIN, &k.name),
                        || format!("{:?} served as {}", k.name, r.name),
                    )?;
                    let devices = r.devices.devices();
                    ensure(devices.len() == k.devices.len(), || "a device lost".into())?;
                    for (d, g) in devices.iter().zip(&k.devices) {
                        ensure(
                            d.id == g.id
                                && d.numa_nodes == g.numa_nodes
                                && d.health == policy::health(g.health),
                            || format!("{g:?} became {d:?}"),
                        )?;
                    }
                }
                Ok(Verdict::Accepted)
            }
        }
    });
}

#[test]
fn health_answer_has_one_entry_per_device() {
    let case = (
        module_name(),
        0..12_usize,
        vec(guest_health(), 0..12),
        any::<bool>(),
    );
    fuzz("health", case, |(module, asked, answer, exact)| {
        let asked = if exact { answer.len() } else { asked };
        match policy::health_answer(&module, asked, &answer) {
            Ok(()) => {
                ensure(answer.len() == asked, || {
                    format!("{} entries accepted for {asked}", answer.len())
                })?;
                Ok(Verdict::Accepted)
            }
            Err(e) => {
                ensure(answer.len() != asked, || format!("refused: {e}"))?;
                names_module(&e, &module)
            }
        }
    });
}

#[test]
fn allocation_output_is_checked() {
    let tree = Tree::new();
    let case = (
        module_name(),
        vec(response(tree.host_paths()), 0..4),
        prop_oneof![3 => Just(None), 1 => (0..5_usize).prop_map(Some)],
    );
    fuzz("allocation", case, |(module, responses, containers)| {
        let containers = containers.unwrap_or(responses.len());
        let broken = allocation_rule_broken(containers, &responses, &tree.grants);
        let result = policy::allocation(&module, containers, responses.clone(), &tree.grants);
        match (result, broken) {
            (Err(e), Some(_)) => names_module(&e, &module),
            (Err(e), None) => Err(TestCaseError::fail(format!(
                "valid allocation refused: {e}"
            ))),
            (Ok(_), Some(rule)) => Err(TestCaseError::fail(format!("accepted, but {rule}"))),
            (Ok(out), None) => {
                ensure(out.len() == containers, || "a container lost".into())?;
                for (got, r) in out.iter().zip(&responses) {
                    ensure(*got == expected_allocation(r), || {
                        format!("{r:?} became {got:?}")
                    })?;
                }
                Ok(Verdict::Accepted)
            }
        }
    });
}

/// What a valid response becomes: the same, with host paths resolved.
fn expected_allocation(r: &ContainerResponse) -> ContainerAllocation {
    let resolved = |p: &str| {
        walk(Path::new(p))
            .expect("an accepted host path resolves")
            .to_str()
            .expect("UTF-8")
            .to_string()
    };
    let map = |l: &[KeyValue]| {
        l.iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect()
    };
    ContainerAllocation {
        envs: map(&r.envs),
        devices: r
            .devices
            .iter()
            .map(|d| domain::DeviceNode {
                host_path: resolved(&d.host_path),
                container_path: d.container_path.clone(),
                permissions: d.permissions.clone(),
            })
            .collect(),
        mounts: r
            .mounts
            .iter()
            .map(|m| domain::Mount {
                host_path: resolved(&m.host_path),
                container_path: m.container_path.clone(),
                read_only: m.read_only,
            })
            .collect(),
        annotations: map(&r.annotations),
        cdi_devices: r.cdi_devices.clone(),
    }
}

#[test]
fn host_paths_are_judged_on_what_they_resolve_to() {
    let tree = Tree::new();
    let case = (tree.paths(), any::<bool>());
    fuzz("grants", case, |(path, device)| {
        let raw = Path::new(&path);
        let resolved = grants::resolve(raw);
        let walked = walk(raw);
        ensure(resolved.as_ref().ok() == walked.as_ref().ok(), || {
            format!("resolve({path}) = {resolved:?}, walking it gives {walked:?}")
        })?;
        let use_ = if device {
            PathUse::Device
        } else {
            PathUse::Mount
        };
        let got = tree.grants.check_host_path(use_, &path);
        match (got, host_path_allowed(&tree.grants, use_, raw)) {
            (Ok(got), Ok(real)) => {
                ensure(got == real, || {
                    format!("{path} handed out as {got:?}, but it resolves to {real:?}")
                })?;
                // As the issue states it: under a granted prefix, clear of every
                // protected path, once resolved.
                let prefixes: Vec<&Path> = match use_ {
                    PathUse::Device => tree.grants.device_paths().collect(),
                    PathUse::Mount => tree.grants.mount_paths().collect(),
                };
                ensure(
                    prefixes
                        .iter()
                        .any(|p| grants::resolve(p).is_ok_and(|p| real.starts_with(p))),
                    || format!("{path} ({real:?}) is under no grant"),
                )?;
                ensure(
                    tree.grants.protected().all(|p| {
                        let p = grants::resolve(p).unwrap_or_else(|_| p.to_path_buf());
                        !real.starts_with(&p) && !p.starts_with(&real)
                    }),
                    || format!("{path} ({real:?}) meets a protected path"),
                )?;
                Ok(Verdict::Accepted)
            }
            (Err(_), Err(_)) => Ok(Verdict::Refused),
            (Ok(_), Err(why)) => Err(TestCaseError::fail(format!(
                "{path} allowed for {use_:?}, but {why}"
            ))),
            (Err(e), Ok(real)) => Err(TestCaseError::fail(format!(
                "{path} ({real:?}) refused for {use_:?}: {e}"
            ))),
        }
    });
}

#[test]
fn manifest_text_never_panics() {
    fuzz("manifest-text", manifest_text(), |text| {
        check_manifest(&text)
    });
}

#[test]
fn manifest_values_are_bounded() {
    fuzz("manifest-values", manifest_doc(), |text| {
        check_manifest(&text)
    });
}
