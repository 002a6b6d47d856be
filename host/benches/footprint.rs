//! What a node pays for the host, beside the Go plugin of `../shared/peer` and
//! the bare tonic floor, each a process of its own:
//!
//! - **server CPU per Allocate**: the Go peer's `allocbench` (8 clients) loads
//!   each server in turn (the host twice: with the virtual-devices guest, which
//!   exports `allocate`, and with a scan-only guest, which the host answers for
//!   without a guest call); the server process's `utime + stime`
//!   (`/proc/<pid>/stat`) across the run, divided by the calls made (warm-up
//!   included);
//! - **idle**: the Go plugin and the host, each registered with a kubelet
//!   simulator that keeps its ListAndWatch stream open, left alone for
//!   [`IDLE`]: CPU time (every thread's `/proc/<pid>/task/*/schedstat`) and
//!   wake-ups (context switches, `/proc/<pid>/task/*/status`);
//! - **RSS** after the load run, and serving K = 1, 3, 10 resources: the host
//!   serves K kinds from one virtual-devices module; the Go plugin serves one
//!   resource per process, so K of them.
//!
//! The floor is this bench's own executable started again with
//! `WDP_FOOTPRINT_FLOOR=<dir>`: a tonic `DevicePlugin` server on a
//! current-thread runtime that answers Allocate with empty responses and
//! registers with whatever `kubelet.sock` appears in `<dir>`.
//!
//! ```text
//! cargo xtask bench            # builds, unpacks the peer, writes BENCHMARKS.md
//! cargo bench -p wasm-device-plugin --bench footprint   # this part alone (needs WDP_PEER_DIR)
//! ```

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use wasm_device_plugin::domain::ResourceName;
use wasm_device_plugin::kubelet::deviceplugin::proto::device_plugin_server::{
    DevicePlugin, DevicePluginServer,
};
use wasm_device_plugin::kubelet::deviceplugin::proto::{
    self, AllocateRequest, AllocateResponse, ContainerAllocateResponse, DevicePluginOptions, Empty,
    ListAndWatchResponse, PreStartContainerRequest, PreStartContainerResponse,
    PreferredAllocationRequest, PreferredAllocationResponse,
};
use wasm_device_plugin::kubelet::deviceplugin::registration;
use wasm_device_plugin::kubelet::deviceplugin::simulator::Simulator;
use wasm_device_plugin::kubelet::dir::KubeletDir;
use wasm_device_plugin::metrics::Metrics;
use wdp_tests::{WAIT, guests};

/// Clients of the load run.
const CLIENTS: usize = 8;
/// Timed calls per client per run.
const CALLS: usize = 5_000;
/// Untimed calls per client before them (their CPU is counted too).
const WARMUP: usize = 1_000;
/// Load runs per server, interleaved.
const ROUNDS: usize = 3;
/// How long the idle processes are watched.
const IDLE: Duration = Duration::from_secs(20);
/// Resource counts of the memory runs.
const KS: [usize; 3] = [1, 3, 10];
/// The host serving the scan-only guest, as the tables name it.
const SCAN_ONLY: &str = "wasm-device-plugin, scan-only guest";
/// The floor's resource, socket and devices.
const FLOOR_RESOURCE: &str = "example.com/floor";
const FLOOR_SOCKET: &str = "floor.sock";
const FLOOR_DEVICES: [&str; 4] = [
    "/node1/dev1/1",
    "/node1/dev1/2",
    "/node1/dev1/3",
    "/node1/dev1/4",
];
/// The Go plugin's resource.
const GO_RESOURCE: &str = "example.com/virtual";
/// Ours, from the virtual-devices guest with [`manifest`]`(1)`.
const OUR_RESOURCE: &str = "example.com/dev-1";
/// The scan-only test guest's resource (three devices, each with a device node,
/// env, an annotation and CDI names).
const SCAN_ONLY_RESOURCE: &str = "example.com/widget";

fn main() {
    if let Some(dir) = std::env::var_os("WDP_FOOTPRINT_FLOOR") {
        floor_process(Path::new(&dir));
        return;
    }
    let started = Instant::now();
    let body = match std::env::var_os("WDP_PEER_DIR").map(PathBuf::from) {
        Some(peer) if peer.join("goplugin").is_file() && peer.join("allocbench").is_file() => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("bench runtime");
            runtime.block_on(measure(&peer))
        }
        _ => "Not measured: the Go peer is not at hand (`cargo xtask bench` unpacks \
              `../shared/peer` and sets `WDP_PEER_DIR`)."
            .to_string(),
    };
    common::publish(
        "footprint",
        &format!(
            "## What a node pays\n\nMachine: {}. Measured {}.\n\n```sh\ncargo xtask bench\n# or alone:\n\
             WDP_PEER_DIR=$PWD/target/peer cargo bench -p wasm-device-plugin --bench footprint\n```\n\n{body}\n\
             The whole bench took {:.0} s.",
            common::machine(),
            common::today(),
            started.elapsed().as_secs_f64()
        ),
    );
}

/// The three servers under `allocbench`, then idle, then memory; the section's
/// Markdown.
async fn measure(peer: &Path) -> String {
    let root = tempfile::tempdir().expect("temp dir");
    let cache = root.path().join("cache");
    // Fill the compiled-module cache first, as a node's host finds it after its
    // first start: the figures are then not those of a compile.
    let warm = Server::ours_warming(root.path(), "warm", &cache).await;
    drop(warm);

    // Idle: fresh processes, each with a simulated kubelet from the start.
    let go_idle = Server::go(peer, root.path(), "go-idle", GO_RESOURCE).await;
    let our_idle = Server::ours(root.path(), "ours-idle", &cache, 1).await;
    let (go_cpu, go_wakes, our_cpu, our_wakes) = {
        let (g0, o0) = (Threads::read(go_idle.pid()), Threads::read(our_idle.pid()));
        // Observing idleness takes a window; nothing is waited for here.
        tokio::time::sleep(IDLE).await;
        let (g1, o1) = (Threads::read(go_idle.pid()), Threads::read(our_idle.pid()));
        let (gc, gw) = g1.since(&g0);
        let (oc, ow) = o1.since(&o0);
        (gc, gw, oc, ow)
    };
    drop(go_idle);
    drop(our_idle);

    // Load: allocbench plays kubelet for each in turn.
    let dirs = ["go", "ours", "ours-scan-only", "floor"].map(|n| {
        let dir = root.path().join(n);
        std::fs::create_dir(&dir).expect("dir");
        dir
    });
    let modules = root.path().join("modules-load");
    std::fs::create_dir(&modules).expect("dir");
    write_module(&modules, 1);
    let scan_only_modules = root.path().join("modules-scan-only");
    std::fs::create_dir(&scan_only_modules).expect("dir");
    write_scan_only(&scan_only_modules);
    let go = Daemon(
        Command::new(peer.join("goplugin"))
            .arg("--dir")
            .arg(&dirs[0])
            .args(["--devices", "4"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start goplugin"),
    );
    let ours = Daemon(
        our_command(&modules, &dirs[1], &cache)
            .spawn()
            .expect("start the host"),
    );
    let ours_scan_only = Daemon(
        our_command(&scan_only_modules, &dirs[2], &cache)
            .spawn()
            .expect("start the host"),
    );
    let floor = Daemon(
        Command::new(std::env::current_exe().expect("this bench's path"))
            .env("WDP_FOOTPRINT_FLOOR", &dirs[3])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the floor"),
    );
    let servers = [
        ("Go plugin", &go, &dirs[0], GO_RESOURCE),
        ("wasm-device-plugin", &ours, &dirs[1], OUR_RESOURCE),
        (SCAN_ONLY, &ours_scan_only, &dirs[2], SCAN_ONLY_RESOURCE),
        ("floor", &floor, &dirs[3], FLOOR_RESOURCE),
    ];
    let tool = peer.join("allocbench");
    let mut runs: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for round in 0..ROUNDS {
        for (name, daemon, dir, resource) in servers {
            let before = cpu_ticks(daemon.pid());
            let p50 = allocbench(&tool, dir, resource);
            let ticks = cpu_ticks(daemon.pid()) - before;
            let per_call = ticks as f64 / clock_ticks_per_s() / (CLIENTS * (CALLS + WARMUP)) as f64;
            eprintln!(
                "round {round}: {name}: p50 {p50:.1} µs, server CPU {:.1} µs per Allocate",
                per_call * 1e6
            );
            runs.entry(name).or_default().push((per_call * 1e6, p50));
        }
    }
    let rss_after_load: BTreeMap<&str, u64> = servers
        .iter()
        .map(|(name, daemon, ..)| (*name, status_kib(daemon.pid(), "VmRSS:")))
        .collect();
    drop((go, ours, ours_scan_only, floor));

    // Memory by resource count.
    let mut memory = Vec::new();
    for k in KS {
        let ours = Server::ours(root.path(), &format!("ours-k{k}"), &cache, k).await;
        let our_rss = status_kib(ours.pid(), "VmRSS:");
        drop(ours);
        let mut go_rss = 0;
        let mut gos = Vec::new();
        for i in 0..k {
            let resource = format!("example.com/virtual-{i}");
            let go = Server::go(peer, root.path(), &format!("go-k{k}-{i}"), &resource).await;
            go_rss += status_kib(go.pid(), "VmRSS:");
            gos.push(go);
        }
        drop(gos);
        eprintln!("K = {k}: ours {our_rss} KiB, Go {go_rss} KiB");
        memory.push((k, our_rss, go_rss));
    }

    report(
        &runs,
        &rss_after_load,
        (go_cpu, go_wakes),
        (our_cpu, our_wakes),
        &memory,
    )
}

fn report(
    runs: &BTreeMap<&str, Vec<(f64, f64)>>,
    rss_after_load: &BTreeMap<&str, u64>,
    go_idle: (Duration, u64),
    our_idle: (Duration, u64),
    memory: &[(usize, u64, u64)],
) -> String {
    let med = |name: &str, f: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = runs[name].iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let cpu = |name| med(name, |r| r.0);
    let p50 = |name| med(name, |r| r.1);
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let (ours, go, floor) = ("wasm-device-plugin", "Go plugin", "floor");
    let mut out = format!(
        "A node runs the host beside every workload, so what it costs there counts more than its \
         peak. Each server is a process of its own: the Go plugin of `../shared/peer` (grpc-go, one \
         resource, 4 devices), the release `wasm-device-plugin run` binary (virtual-devices guest, \
         compiled-module cache already filled, `--metrics-addr off`, default health and scan \
         intervals), the same binary serving a scan-only guest (`tests/guests/scan-only`: 3 \
         devices, each with a device node, env, an annotation and CDI names; the host merges \
         and answers without a guest call) and the floor (a bare tonic `DevicePlugin` server on a current-thread runtime, \
         empty answers; this bench's executable started again).\n\n\
         ### Server CPU per Allocate\n\n\
         `allocbench` (Go) with {CLIENTS} clients, {WARMUP} warm-up and {CALLS} timed calls each; \
         `utime + stime` of the server process across the run (`/proc/<pid>/stat`) divided by \
         every call made; {ROUNDS} rounds, servers interleaved; medians of the rounds.\n\n\
         | server | CPU per Allocate | p50 ({CLIENTS} clients) | RSS after the load runs |\n\
         |---|---|---|---|\n"
    );
    for name in [go, ours, SCAN_ONLY, floor] {
        out.push_str(&format!(
            "| {name} | {:.1} µs | {:.1} µs | {} |\n",
            cpu(name),
            p50(name),
            mib(rss_after_load[name])
        ));
    }
    out.push_str(&format!(
        "\n### Idle, with kubelet connected\n\n\
         Each process registered with a kubelet simulator that keeps its ListAndWatch stream open, \
         then left alone for {} s: CPU time summed over its threads \
         (`/proc/<pid>/task/*/schedstat`) and wake-ups (context switches, voluntary and not, \
         `/proc/<pid>/task/*/status`). The host's default intervals: a health check every 10 s, \
         a scan every 60 s.\n\n\
         | process | CPU in {} s | wake-ups in {} s |\n|---|---|---|\n\
         | Go plugin | {:.1} ms | {} |\n| wasm-device-plugin | {:.1} ms | {} |\n",
        IDLE.as_secs(),
        IDLE.as_secs(),
        IDLE.as_secs(),
        go_idle.0.as_secs_f64() * 1e3,
        go_idle.1,
        our_idle.0.as_secs_f64() * 1e3,
        our_idle.1,
    ));
    out.push_str(
        "\n### Memory by resources served\n\n\
         RSS (`VmRSS`) once every resource is registered, listed and allocated on three times: \
         the host serves K kinds from one virtual-devices module (`kinds = \"dev-1=4,…\"`); the \
         Go plugin serves one resource per process, so K processes, summed.\n\n\
         | resources | wasm-device-plugin | Go plugin(s) | ours / Go |\n|---|---|---|---|\n",
    );
    for (k, o, g) in memory {
        out.push_str(&format!(
            "| {k} | {} | {} | {:.2}× |\n",
            mib(*o),
            mib(*g),
            *o as f64 / *g as f64
        ));
    }
    let rss1 = memory.first().map_or((0, 1), |(_, o, g)| (*o, *g));
    out.push_str(&format!(
        "\n### Targets\n\n| what | measured | target |\n|---|---|---|\n\
         | server CPU per Allocate, ours / Go plugin | {:.2}× | ≤ 0.75× |\n\
         | server CPU per Allocate, ours / floor | {:.2}× | ≤ 1.2× |\n\
         | server CPU per Allocate, ours with a scan-only guest / Go plugin | {:.2}× | ≤ 0.75× |\n\
         | server CPU per Allocate, ours with a scan-only guest / floor | {:.2}× | ≤ 1.2× |\n\
         | idle CPU, ours / Go plugin | {:.1} ms / {:.1} ms | ≤ the Go plugin's |\n\
         | RSS serving one module (1 resource), ours / Go plugin | {:.2}× | ≤ 1× |\n\
         | Wasm / native p50 with 8 clients | the Allocate section's table | ≤ 1.3× |\n",
        cpu(ours) / cpu(go),
        cpu(ours) / cpu(floor),
        cpu(SCAN_ONLY) / cpu(go),
        cpu(SCAN_ONLY) / cpu(floor),
        our_idle.0.as_secs_f64() * 1e3,
        go_idle.0.as_secs_f64() * 1e3,
        rss1.0 as f64 / rss1.1 as f64,
    ));
    out
}

/// One server process registered with a kubelet simulator of its own.
struct Server {
    // Fields drop in order: the process stops (SIGTERM, waited for) before
    // its kubelet goes.
    daemon: Daemon,
    _kubelet: Simulator,
}

impl Server {
    fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// The Go plugin serving `resource` in `root/name`, registered, listed
    /// and allocated on.
    async fn go(peer: &Path, root: &Path, name: &str, resource: &str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir(&dir).expect("dir");
        let kubelet = Simulator::start(&dir).expect("kubelet simulator");
        let daemon = Daemon(
            Command::new(peer.join("goplugin"))
                .arg("--dir")
                .arg(&dir)
                .args(["--resource", resource, "--devices", "4"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start goplugin"),
        );
        ready(
            &kubelet,
            &[(resource.to_string(), "/node1/dev1/1".to_string())],
        )
        .await;
        Self {
            daemon,
            _kubelet: kubelet,
        }
    }

    /// The host serving `k` kinds of the virtual-devices guest in `root/name`,
    /// registered, listed and allocated on.
    async fn ours(root: &Path, name: &str, cache: &Path, k: usize) -> Self {
        Self::ours_with(root, name, cache, k, false).await
    }

    /// The host serving both modules of the load runs, so that `cache` holds
    /// both compiled.
    async fn ours_warming(root: &Path, name: &str, cache: &Path) -> Self {
        Self::ours_with(root, name, cache, 1, true).await
    }

    async fn ours_with(root: &Path, name: &str, cache: &Path, k: usize, scan_only: bool) -> Self {
        let dir = root.join(name);
        let modules = dir.join("modules");
        std::fs::create_dir_all(&modules).expect("dir");
        write_module(&modules, k);
        if scan_only {
            write_scan_only(&modules);
        }
        let kubelet = Simulator::start(&dir).expect("kubelet simulator");
        let daemon = Daemon(
            our_command(&modules, &dir, cache)
                .spawn()
                .expect("start the host"),
        );
        let mut resources: Vec<(String, String)> = (1..=k)
            .map(|i| (format!("example.com/dev-{i}"), format!("/node1/dev{i}/1")))
            .collect();
        if scan_only {
            resources.push((SCAN_ONLY_RESOURCE.to_string(), "w0".to_string()));
        }
        ready(&kubelet, &resources).await;
        Self {
            daemon,
            _kubelet: kubelet,
        }
    }
}

/// Waits until every `(resource, device)` is registered and listed, then
/// allocates `device` three times on each.
async fn ready(kubelet: &Simulator, resources: &[(String, String)]) {
    kubelet
        .wait_for(WAIT, "every resource listed", |v| {
            resources.iter().all(|(r, _)| {
                v.plugin(r)
                    .is_some_and(|p| p.streaming && !p.updates.is_empty())
            })
        })
        .await
        .expect("registered and listed");
    for (resource, device) in resources {
        for _ in 0..3 {
            kubelet
                .allocate(resource, &[&[device.as_str()]])
                .await
                .expect("allocate");
        }
    }
}

/// The virtual-devices guest in `modules`, giving `k` kinds of 4 devices.
fn write_module(modules: &Path, k: usize) {
    std::fs::copy(
        guests::VIRTUAL_DEVICES,
        modules.join("virtual_devices.wasm"),
    )
    .expect("copy module");
    let kinds: Vec<String> = (1..=k).map(|i| format!("dev-{i}=4")).collect();
    std::fs::write(
        modules.join("virtual_devices.toml"),
        format!("[config]\nkinds = \"{}\"\n", kinds.join(",")),
    )
    .expect("write manifest");
}

/// The scan-only test guest in `modules`.
fn write_scan_only(modules: &Path) {
    std::fs::copy(guests::SCAN_ONLY, modules.join("widgets.wasm")).expect("copy module");
}

/// `wasm-device-plugin run` as a node runs it, without metrics or chatty logs.
fn our_command(modules: &Path, kubelet_dir: &Path, cache: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasm-device-plugin"));
    command
        .arg("run")
        .arg("--modules-dir")
        .arg(modules)
        .arg("--kubelet-dir")
        .arg(kubelet_dir)
        .arg("--cache-dir")
        .arg(cache)
        // Never the node's own CDI directory (nothing here uses CDI).
        .arg("--cdi-dir")
        .arg(kubelet_dir.with_file_name("cdi"))
        .args(["--metrics-addr", "off", "--log", "warn"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

/// Runs `allocbench` against the plugin registering `resource` in `dir`; its p50 in µs.
fn allocbench(tool: &Path, dir: &Path, resource: &str) -> f64 {
    let out = Command::new(tool)
        .arg("--dir")
        .arg(dir)
        .args(["--resource", resource])
        .args(["--clients", &CLIENTS.to_string()])
        .args(["--n", &CALLS.to_string()])
        .args(["--warmup", &WARMUP.to_string()])
        .args(["--timeout", "120s"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run allocbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "allocbench failed ({}): {text}",
        out.status
    );
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("allocbench printed no result: {text}"));
    let value: serde_json::Value = serde_json::from_str(line).expect("allocbench prints JSON");
    assert_eq!(
        value["errors"].as_f64(),
        Some(0.0),
        "allocbench saw errors: {line}"
    );
    value["p50_us"].as_f64().expect("p50_us")
}

/// A child process, stopped with SIGTERM and waited for when dropped.
struct Daemon(Child);

impl Daemon {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// `utime + stime` of process `pid` (every thread, ended ones included), in
/// clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The command name, in parentheses, may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let field = |n: usize| fields[n - 3].parse::<u64>().expect("a number");
    field(14) + field(15)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Per thread of a process: time on CPU (ns) and context switches so far.
struct Threads(BTreeMap<String, (u64, u64)>);

impl Threads {
    fn read(pid: u32) -> Self {
        let mut threads = BTreeMap::new();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
        for task in tasks.flatten() {
            let (Ok(schedstat), Ok(status)) = (
                std::fs::read_to_string(task.path().join("schedstat")),
                std::fs::read_to_string(task.path().join("status")),
            ) else {
                continue;
            };
            let cpu_ns = schedstat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let switches = status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            threads.insert(
                task.file_name().to_string_lossy().into_owned(),
                (cpu_ns, switches),
            );
        }
        Self(threads)
    }

    /// CPU time and context switches since `before` (a thread that started
    /// since counts from zero; one that ended is not counted).
    fn since(&self, before: &Threads) -> (Duration, u64) {
        let (mut cpu, mut switches) = (0, 0);
        for (tid, (c, s)) in &self.0 {
            let (c0, s0) = before.0.get(tid).copied().unwrap_or((0, 0));
            cpu += c.saturating_sub(c0);
            switches += s.saturating_sub(s0);
        }
        (Duration::from_nanos(cpu), switches)
    }
}

/// The floor as a process: serves [`Floor`] on `dir/floor.sock` on a
/// current-thread runtime and registers with each new `dir/kubelet.sock`.
fn floor_process(dir: &Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("floor runtime");
    runtime.block_on(async {
        let socket = dir.join(FLOOR_SOCKET);
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind the floor socket");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(Floor))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        let resource = ResourceName::parse(FLOOR_RESOURCE).expect("name");
        let kubelet = KubeletDir::watch(dir, Arc::new(Metrics::new()));
        let mut changes = kubelet.changes();
        let mut registered = None;
        loop {
            // A new kubelet.sock may reuse the last one's inode: its change
            // time tells them apart.
            let now = std::fs::symlink_metadata(kubelet.kubelet_socket())
                .ok()
                .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()));
            if now.is_some() && now != registered {
                // A socket just created may not listen yet: a few tries.
                for _ in 0..100 {
                    if registration::register(dir, FLOOR_SOCKET, &resource)
                        .await
                        .is_ok()
                    {
                        registered = now;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The protocol floor: tonic's `DevicePlugin` server doing nothing but answer
/// (and list four devices, which `allocbench` reads before it loads).
struct Floor;

#[tonic::async_trait]
impl DevicePlugin for Floor {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(DevicePluginOptions::default()))
    }

    type ListAndWatchStream =
        futures::stream::BoxStream<'static, Result<ListAndWatchResponse, Status>>;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        use futures::StreamExt;
        let list = ListAndWatchResponse {
            devices: FLOOR_DEVICES
                .iter()
                .map(|id| proto::Device {
                    id: (*id).to_string(),
                    health: "Healthy".into(),
                    topology: None,
                })
                .collect(),
        };
        // The list, then nothing more until the client hangs up.
        Ok(Response::new(
            futures::stream::once(async { Ok(list) })
                .chain(futures::stream::pending())
                .boxed(),
        ))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        Ok(Response::new(PreferredAllocationResponse::default()))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let containers = request.into_inner().container_requests.len();
        Ok(Response::new(AllocateResponse {
            container_responses: vec![ContainerAllocateResponse::default(); containers],
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}
