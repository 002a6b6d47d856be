//! Module load and scale (issue 8): how long a module takes from its file to
//! its resources registered with kubelet and listed, cold (compiled) and warm
//! (from the compiled-module cache); what one instantiation costs; a module
//! with 10,000 devices; 50 modules at once; how soon a health change reaches
//! kubelet; and the host's memory with 0, 1 and 50 modules.
//!
//! The host and the kubelet simulator run in this process over real unix
//! sockets, except for the memory figures, which come from the real binary run
//! as a child process (the simulator stays here). Every wait is on the
//! simulator's view, the host's module states or its call gauge, bounded by
//! `WAIT`. It reports and does not judge: it panics only when something does
//! not work at all (a module never registers). Run:
//!
//! ```text
//! cargo bench -p wasm-device-plugin --bench scale
//! ```
//!
//! (`cargo xtask bench` runs it with the others and writes its section into
//! `BENCHMARKS.md`.)

mod common;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Samples, ms, us};
use prost::Message as _;
use tempfile::TempDir;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasm_device_plugin::app::{Host, HostConfig};
use wasm_device_plugin::kubelet::deviceplugin::proto::ListAndWatchResponse;
use wasm_device_plugin::kubelet::deviceplugin::simulator::{KubeletView, Simulator};
use wasm_device_plugin::metrics::Metrics;
use wasm_device_plugin::registry::{ModuleState, ModuleStates, Settings};
use wasm_device_plugin::runtime::Runtime;
use wdp_tests::{Dirs, TEST_SETTLE, WAIT, guests, health_of, sample, test_settings};

/// Cold loads of each Rust guest, each with an empty cache directory.
const COLD_ROUNDS: usize = 5;
/// Warm loads of each guest, on the cache the last cold load filled.
const WARM_ROUNDS: usize = 10;
/// Cold loads of the Python guest: it compiles for seconds.
const PYTHON_COLD_ROUNDS: usize = 2;
/// Warm loads of the Python guest.
const PYTHON_WARM_ROUNDS: usize = 5;
/// Instantiations to average per guest (the first scan, then health checks
/// every 50 ms).
const INSTANTIATIONS: f64 = 10.0;

/// Devices of the large module.
const DEVICES: usize = 10_000;
/// Its resource (the virtual guest's kind `dev` in the default domain).
const LARGE_RESOURCE: &str = "example.com/dev";
/// Loads of the large module.
const LARGE_ROUNDS: usize = 3;
/// Allocate calls of one device each on the large module.
const ALLOCATIONS: usize = 2_000;
/// The bound of one Allocate call; a call that takes longer counts as a timeout.
const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(5);

/// Modules loaded at once.
const MODULES: usize = 50;
/// Loads of the 50 modules with an empty cache each time.
const MANY_COLD_ROUNDS: usize = 2;
/// Loads of the 50 modules on a filled cache.
const MANY_WARM_ROUNDS: usize = 3;

/// The health interval of the health-change measurement.
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
/// Health changes measured.
const HEALTH_ROUNDS: u32 = 20;
/// The resource of the generic guest's serial ports.
const SERIAL: &str = "example.com/serial";

/// One shipped guest: its module name, file, label and load rounds.
struct Shipped {
    name: &'static str,
    wasm: &'static str,
    label: &'static str,
    rust: bool,
    cold_rounds: usize,
    warm_rounds: usize,
}

const SHIPPED: [Shipped; 4] = [
    Shipped {
        name: "virtual",
        wasm: guests::VIRTUAL_DEVICES,
        label: "virtual-devices (Rust)",
        rust: true,
        cold_rounds: COLD_ROUNDS,
        warm_rounds: WARM_ROUNDS,
    },
    Shipped {
        name: "fpga",
        wasm: guests::FPGA,
        label: "fpga (Rust, simulated DFL card)",
        rust: true,
        cold_rounds: COLD_ROUNDS,
        warm_rounds: WARM_ROUNDS,
    },
    Shipped {
        name: "generic",
        wasm: guests::GENERIC,
        label: "generic (Rust, fake /dev)",
        rust: true,
        cold_rounds: COLD_ROUNDS,
        warm_rounds: WARM_ROUNDS,
    },
    Shipped {
        name: "python",
        wasm: guests::PYTHON_VIRTUAL,
        label: "python-virtual (Python, componentize-py)",
        rust: false,
        cold_rounds: PYTHON_COLD_ROUNDS,
        warm_rounds: PYTHON_WARM_ROUNDS,
    },
];

/// A compiled-module cache directory that does not exist yet: the runtime
/// creates it with mode 0700 inside a private temporary directory.
struct CacheDir {
    _root: TempDir,
    path: PathBuf,
}

impl CacheDir {
    fn empty() -> Self {
        let root = tempfile::Builder::new()
            .prefix("wdp-cache")
            .tempdir()
            .expect("temp dir for the cache");
        let path = root.path().join("cache");
        Self { _root: root, path }
    }

    /// A cache holding the compiled `wasm`, written as the host writes it.
    fn primed(name: &str, wasm: &str) -> Self {
        let cache = Self::empty();
        let runtime =
            Runtime::new(Some(&cache.path), Arc::new(Metrics::new())).expect("wasm runtime");
        let bytes = std::fs::read(wasm).expect("read the module");
        tokio::task::block_in_place(|| runtime.component(name, &bytes)).expect("module compiles");
        cache
    }
}

/// A running host with its simulated kubelet.
struct Running {
    host: Host,
    shutdown: CancellationToken,
    kubelet: Simulator,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.host.stop().await;
        self.kubelet.stop().await;
    }
}

/// Starts the kubelet simulator on `kubelet_dir`, then (the clock starts) the
/// host on `modules_dir`; returns once every module in `names` is serving and
/// every resource it serves is registered and has sent its first list. Returns
/// the time from `Host::start` to then, and the resources.
async fn start(
    modules_dir: &Path,
    kubelet_dir: &Path,
    cache: Option<&Path>,
    settings: Settings,
    names: &[String],
) -> (Duration, Running, Vec<String>) {
    let kubelet = Simulator::start(kubelet_dir).expect("kubelet simulator");
    let shutdown = CancellationToken::new();
    let config = HostConfig {
        modules_dir: modules_dir.to_path_buf(),
        cache_dir: cache.map(Path::to_path_buf),
        settle: TEST_SETTLE,
        settings,
        dra: wasm_device_plugin::app::DraConfig::default(),
    };
    let started = Instant::now();
    let host = Host::start(config, &shutdown).expect("host starts");
    let resources = serving(&host, &kubelet, names).await;
    let elapsed = started.elapsed();
    let running = Running {
        host,
        shutdown,
        kubelet,
    };
    (elapsed, running, resources)
}

/// The resources of `names` once each module serves and each of its resources
/// is registered with its first list received; panics when a module fails or
/// this takes longer than `WAIT`.
async fn serving(host: &Host, kubelet: &Simulator, names: &[String]) -> Vec<String> {
    let mut states = host.states();
    let mut view = kubelet.subscribe();
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            let done = {
                let states = states.borrow_and_update();
                let view = view.borrow_and_update();
                all_listed(&states, &view, names)
            };
            if let Some(resources) = done {
                return resources;
            }
            tokio::select! {
                changed = states.changed() => changed.expect("the host is running"),
                changed = view.changed() => changed.expect("the simulator is running"),
            }
        }
    })
    .await;
    match waited {
        Ok(resources) => resources,
        Err(_) => panic!(
            "modules not registered and listed within {WAIT:?}; states: {:?}",
            *host.states().borrow()
        ),
    }
}

/// Every resource of `names` when all of them are served and listed; panics on
/// a failed module.
fn all_listed(states: &ModuleStates, view: &KubeletView, names: &[String]) -> Option<Vec<String>> {
    let mut resources = Vec::new();
    for name in names {
        match states.get(name) {
            Some(ModuleState::Serving(served)) => resources.extend(served.iter().cloned()),
            Some(ModuleState::Failed(why)) => panic!("module {name} failed to load: {why}"),
            _ => return None,
        }
    }
    listed(view, &resources).then_some(resources)
}

/// Whether every resource in `resources` is registered, streaming and listed.
fn listed(view: &KubeletView, resources: &[String]) -> bool {
    resources.iter().all(|r| {
        view.plugin(r)
            .is_some_and(|p| p.streaming && !p.updates.is_empty())
    })
}

/// Copies each `(name, wasm)` to `<name>.wasm` and stages them as the demo
/// does (a simulated node and a manifest for `fpga` and `generic`). Returns the
/// temporary root, the modules directory and the kubelet directory.
fn stage(modules: &[(&str, &str)]) -> (TempDir, PathBuf, PathBuf) {
    let root = tempfile::Builder::new()
        .prefix("wdp-bench")
        .tempdir()
        .expect("temp dir");
    let source = root.path().join("source");
    std::fs::create_dir(&source).expect("source dir");
    for (name, wasm) in modules {
        std::fs::copy(wasm, source.join(format!("{name}.wasm"))).expect("copy module");
    }
    let (staged, _) =
        wasm_device_plugin::demo::stage(&source, root.path()).expect("stage the modules");
    let kubelet = root.path().join("kubelet");
    std::fs::create_dir(&kubelet).expect("kubelet dir");
    // Where `test_settings` puts CDI specs (the demo serves serial with CDI).
    std::fs::create_dir(root.path().join("cdi")).expect("CDI dir");
    (root, staged, kubelet)
}

/// The value of `name` with `labels` in the host's metrics now (0 when absent).
fn metric(host: &Host, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&host.metrics().render(), name, labels).unwrap_or(0.0)
}

/// A histogram's mean and count, from its `_sum` and `_count`.
fn mean(host: &Host, histogram: &str, labels: &[(&str, &str)]) -> (Duration, u64) {
    let sum = metric(host, &format!("{histogram}_sum"), labels);
    let count = metric(host, &format!("{histogram}_count"), labels);
    let mean = if count > 0.0 { sum / count } else { 0.0 };
    (Duration::from_secs_f64(mean), count as u64)
}

const INSTANTIATION: &str = "wdp_guest_instantiation_duration_seconds";
const GUEST_CALL: &str = "wdp_guest_call_duration_seconds";

/// Waits until module `name` has been instantiated `at_least` times (its
/// health checks run on their own), re-reading the metrics each time a guest
/// call starts or ends; returns the mean and count of its instantiations.
async fn instantiations(host: &Host, name: &str, at_least: f64) -> (Duration, u64) {
    let mut calls = host.calls_in_flight();
    let labels = [("module", name)];
    let waited = tokio::time::timeout(WAIT, async {
        while metric(host, &format!("{INSTANTIATION}_count"), &labels) < at_least {
            if calls.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    if waited.is_err() {
        eprintln!("module {name}: fewer than {at_least} instantiations within {WAIT:?}");
    }
    mean(host, INSTANTIATION, &labels)
}

/// What loading one shipped guest cost.
struct GuestLoad {
    label: &'static str,
    rust: bool,
    cold: Samples,
    warm: Samples,
    compile: Duration,
    instantiation: (Duration, u64),
    scan: (Duration, u64),
}

/// Cold loads, warm loads, compile alone, instantiation and scan of `guest`.
async fn load_guest(guest: &Shipped) -> GuestLoad {
    let (_root, modules, kubelet) = stage(&[(guest.name, guest.wasm)]);
    let names = [guest.name.to_string()];
    let settings = test_settings(&kubelet);
    let mut cold = Vec::new();
    let mut cache = None;
    for _ in 0..guest.cold_rounds {
        let fresh = CacheDir::empty();
        let (elapsed, running, _) = start(
            &modules,
            &kubelet,
            Some(&fresh.path),
            settings.clone(),
            &names,
        )
        .await;
        running.stop().await;
        cold.push(elapsed);
        cache = Some(fresh);
    }
    let cache = cache.expect("at least one cold round");
    let mut warm = Vec::new();
    let mut last = None;
    for round in 0..guest.warm_rounds {
        let (elapsed, running, _) = start(
            &modules,
            &kubelet,
            Some(&cache.path),
            settings.clone(),
            &names,
        )
        .await;
        warm.push(elapsed);
        if round + 1 == guest.warm_rounds {
            last = Some(running);
        } else {
            running.stop().await;
        }
    }
    let running = last.expect("at least one warm round");
    let instantiation = instantiations(&running.host, guest.name, INSTANTIATIONS).await;
    let scan = mean(
        &running.host,
        GUEST_CALL,
        &[("module", guest.name), ("function", "scan")],
    );
    running.stop().await;

    // Compiling alone, as the host does on a cache miss, without a cache.
    let runtime = Runtime::new(None, Arc::new(Metrics::new())).expect("wasm runtime");
    let bytes = std::fs::read(guest.wasm).expect("read the module");
    let started = Instant::now();
    tokio::task::block_in_place(|| runtime.component(guest.name, &bytes)).expect("compiles");
    let compile = started.elapsed();

    GuestLoad {
        label: guest.label,
        rust: guest.rust,
        cold: Samples::new(cold),
        warm: Samples::new(warm),
        compile,
        instantiation,
        scan,
    }
}

/// What the module with 10,000 devices showed.
struct Large {
    load: Samples,
    first_list: usize,
    first_list_bytes: usize,
    allocate: Option<Samples>,
    failures: usize,
    timeouts: usize,
    first_failure: Option<String>,
}

/// The virtual guest reporting 10,000 devices of one kind: load, the first
/// list, then Allocate of one device at a time.
async fn large_module() -> Large {
    let dirs = Dirs::new();
    dirs.add_module("large", guests::VIRTUAL_DEVICES);
    // The binary's default health interval: the 50 ms of the test settings
    // would check 10,000 devices between Allocate calls.
    dirs.write_manifest(
        "large",
        &format!("health-interval = \"10s\"\n[config]\nkinds = \"dev={DEVICES}\"\n"),
    );
    let cache = CacheDir::primed("large", guests::VIRTUAL_DEVICES);
    let names = ["large".to_string()];
    let mut load = Vec::new();
    let mut last = None;
    for round in 0..LARGE_ROUNDS {
        let (elapsed, running, _) = start(
            &dirs.modules(),
            &dirs.kubelet(),
            Some(&cache.path),
            test_settings(&dirs.kubelet()),
            &names,
        )
        .await;
        load.push(elapsed);
        if round + 1 == LARGE_ROUNDS {
            last = Some(running);
        } else {
            running.stop().await;
        }
    }
    let running = last.expect("at least one round");
    let view = running.kubelet.view();
    let first = view
        .plugin(LARGE_RESOURCE)
        .and_then(|p| p.updates.first())
        .cloned()
        .unwrap_or_else(|| panic!("{LARGE_RESOURCE} not listed; the simulator saw {view:#?}"));
    let first_list = first.len();
    let first_list_bytes = ListAndWatchResponse { devices: first }.encoded_len();

    let mut latencies = Vec::with_capacity(ALLOCATIONS);
    let (mut failures, mut timeouts, mut first_failure) = (0, 0, None);
    for i in 0..ALLOCATIONS {
        let id = format!("/node1/dev/{}", i % DEVICES + 1);
        let started = Instant::now();
        let ids = [id.as_str()];
        let containers = [&ids[..]];
        let call = running.kubelet.allocate(LARGE_RESOURCE, &containers);
        match tokio::time::timeout(ALLOCATE_TIMEOUT, call).await {
            Ok(Ok(_)) => latencies.push(started.elapsed()),
            Ok(Err(err)) => {
                failures += 1;
                first_failure.get_or_insert_with(|| err.to_string());
            }
            Err(_) => timeouts += 1,
        }
    }
    running.stop().await;
    Large {
        load: Samples::new(load),
        first_list,
        first_list_bytes,
        allocate: (!latencies.is_empty()).then(|| Samples::new(latencies)),
        failures,
        timeouts,
        first_failure,
    }
}

/// The names of `count` copies of the virtual guest: `m00`, `m01`, ...
fn copies(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("m{i:02}")).collect()
}

/// Puts `count` copies of the virtual guest into `dirs`, each in its own
/// domain (`m07.example.com`) so that their resources do not collide.
fn add_copies(dirs: &Dirs, count: usize) -> Vec<String> {
    let names = copies(count);
    for name in &names {
        dirs.add_module(name, guests::VIRTUAL_DEVICES);
        dirs.write_manifest(name, &format!("domain = \"{name}.example.com\"\n"));
    }
    names
}

/// 50 modules started at once, cold then warm; also returns how many resources
/// they serve.
async fn many_modules() -> (Samples, Samples, usize) {
    let dirs = Dirs::new();
    let names = add_copies(&dirs, MODULES);
    let run = |cache: PathBuf| {
        let (modules, kubelet) = (dirs.modules(), dirs.kubelet());
        let names = names.clone();
        async move {
            let settings = test_settings(&kubelet);
            let (elapsed, running, resources) =
                start(&modules, &kubelet, Some(&cache), settings, &names).await;
            running.stop().await;
            (elapsed, resources.len())
        }
    };
    let mut cold = Vec::new();
    let mut cache = None;
    for _ in 0..MANY_COLD_ROUNDS {
        let fresh = CacheDir::empty();
        cold.push(run(fresh.path.clone()).await.0);
        cache = Some(fresh);
    }
    let cache = cache.expect("at least one cold round");
    let mut warm = Vec::new();
    let mut resources = 0;
    for _ in 0..MANY_WARM_ROUNDS {
        let (elapsed, served) = run(cache.path.clone()).await;
        warm.push(elapsed);
        resources = served;
    }
    (Samples::new(cold), Samples::new(warm), resources)
}

/// The generic guest over a fake /dev with a 200 ms health interval: from
/// deleting a device's node to kubelet's view showing it Unhealthy.
async fn health_change() -> Samples {
    let dirs = Dirs::new();
    let root = std::fs::canonicalize(dirs.root.path())
        .expect("temp dir")
        .join("fake");
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).expect("fake /dev");
    for node in ["ttyUSB0", "ttyUSB1"] {
        std::fs::write(dev.join(node), "").expect("fake node");
    }
    dirs.add_module("generic", guests::GENERIC);
    dirs.write_manifest(
        "generic",
        &format!(
            "scan-interval = \"1h\"\nhealth-interval = \"{}ms\"\n\
             [grants]\nread-only-dirs = [{dev:?}]\ndevice-paths = [{dev:?}]\n\
             [config]\nroot = {root:?}\nkinds = \"serial\"\n\"serial.paths\" = \"/dev/ttyUSB*\"\n",
            HEALTH_INTERVAL.as_millis()
        ),
    );
    let names = ["generic".to_string()];
    let (_, running, _) = start(
        &dirs.modules(),
        &dirs.kubelet(),
        None,
        test_settings(&dirs.kubelet()),
        &names,
    )
    .await;
    let node = dev.join("ttyUSB0");
    let health = |want: &'static str| {
        let kubelet = &running.kubelet;
        async move {
            kubelet
                .wait_for(WAIT, &format!("ttyUSB0 {want}"), |v| {
                    health_of(v, SERIAL, "ttyUSB0") == Some(want)
                })
                .await
                .unwrap_or_else(|err| panic!("{err}"));
        }
    };
    health("Healthy").await;
    let mut samples = Vec::new();
    for round in 0..HEALTH_ROUNDS {
        // Each round starts just after the health check that saw the node
        // back; this offset (not a wait for anything) spreads the moment of
        // the change over the whole interval, so the rounds sample every phase
        // of the health timer rather than always the worst one.
        tokio::time::sleep(HEALTH_INTERVAL * round / HEALTH_ROUNDS).await;
        std::fs::remove_file(&node).expect("remove the fake node");
        let started = Instant::now();
        health("Unhealthy").await;
        samples.push(started.elapsed());
        std::fs::write(&node, "").expect("restore the fake node");
        health("Healthy").await;
    }
    running.stop().await;
    Samples::new(samples)
}

/// The host binary's memory once it serves its modules.
struct Memory {
    modules: usize,
    resources: usize,
    rss_kib: u64,
    hwm_kib: u64,
}

/// The `key:` line of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Runs the real binary on `modules` copies of the virtual guest (compiled
/// modules in `cache`, filled beforehand as the host fills it), waits until it
/// is ready and every resource is listed, allocates on each resource a few
/// times, then reads its memory and stops it with SIGTERM.
async fn memory(modules: usize, cache: &Path) -> Memory {
    let dirs = Dirs::new();
    let names = add_copies(&dirs, modules);
    let resources: Vec<String> = names
        .iter()
        .flat_map(|n| ["dev-1", "dev-2"].map(|kind| format!("{n}.example.com/{kind}")))
        .collect();
    let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet simulator");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wasm-device-plugin"))
        .arg("run")
        .arg("--modules-dir")
        .arg(dirs.modules())
        .arg("--kubelet-dir")
        .arg(dirs.kubelet())
        .arg("--cache-dir")
        .arg(cache)
        .args([
            "--metrics-addr",
            "off",
            "--log",
            "info",
            "--log-format",
            "text",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the host binary");
    let pid = child.id().expect("the child is running");

    // Reads the child's log to the end (so it never blocks on a full pipe),
    // keeping the last lines for a failure message, and says when it is ready.
    let (ready_tx, mut ready) = watch::channel(false);
    let log = Arc::new(Mutex::new(VecDeque::new()));
    let stderr = child.stderr.take().expect("piped stderr");
    let kept = log.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("ready: every loaded module") {
                ready_tx.send_replace(true);
            }
            let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() == 40 {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    });
    if tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .is_err()
    {
        fail(&log, modules, "never ready");
    }
    if kubelet
        .wait_for(WAIT, "every resource listed", |v| listed(v, &resources))
        .await
        .is_err()
    {
        fail(&log, modules, "not every resource registered and listed");
    }
    for resource in &resources {
        // The virtual guest's ids: `/node1/dev1/1` for kind `dev-1`.
        let kind = resource
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .replace('-', "");
        let id = format!("/node1/{kind}/1");
        let ids = [id.as_str()];
        let containers = [&ids[..]];
        for _ in 0..3 {
            let call = kubelet.allocate(resource, &containers);
            match tokio::time::timeout(ALLOCATE_TIMEOUT, call).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => fail(&log, modules, &format!("Allocate on {resource}: {err}")),
                Err(_) => fail(&log, modules, &format!("Allocate on {resource} timed out")),
            }
        }
    }
    let rss_kib = status_kib(pid, "VmRSS:");
    let hwm_kib = status_kib(pid, "VmHWM:");

    // SAFETY: kill(2) only sends a signal; `pid` is our child, not yet waited
    // for, so the id cannot have been reused.
    let signalled = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(signalled, 0, "SIGTERM to the host binary");
    match tokio::time::timeout(WAIT, child.wait()).await {
        Ok(Ok(status)) if !status.success() => {
            eprintln!("host binary with {modules} modules exited with {status} after SIGTERM");
        }
        Ok(Ok(_)) => {}
        Ok(Err(err)) => eprintln!("cannot wait for the host binary: {err}"),
        Err(_) => {
            eprintln!("host binary with {modules} modules ignored SIGTERM for {WAIT:?}; killed");
            let _ = child.kill().await;
        }
    }
    kubelet.stop().await;
    Memory {
        modules,
        resources: resources.len(),
        rss_kib,
        hwm_kib,
    }
}

/// Panics with `what` and the end of the host binary's log.
fn fail(log: &Mutex<VecDeque<String>>, modules: usize, what: &str) -> ! {
    let log = log.lock().unwrap_or_else(|e| e.into_inner());
    let tail: Vec<&str> = log.iter().map(String::as_str).collect();
    panic!(
        "host binary with {modules} modules: {what}; its log ended with:\n{}",
        tail.join("\n")
    )
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `d` in milliseconds, or in seconds from 10 s on (the Python guest's compile).
fn dur(d: Duration) -> String {
    if d >= Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        ms(d)
    }
}

/// `p50 …, max …` of `s`.
fn p50_max(s: &Samples) -> String {
    format!("p50 {}, max {}", dur(s.p50()), dur(s.max()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bench_started = Instant::now();
    let mut loads = Vec::new();
    for guest in &SHIPPED {
        eprintln!("scale: loading {}", guest.label);
        loads.push(load_guest(guest).await);
    }
    eprintln!("scale: {DEVICES} devices");
    let large = large_module().await;
    eprintln!("scale: {MODULES} modules");
    let (many_cold, many_warm, many_resources) = many_modules().await;
    eprintln!("scale: health change");
    let health = health_change().await;
    eprintln!("scale: memory of the host binary");
    let cache = CacheDir::primed("virtual", guests::VIRTUAL_DEVICES);
    let mut memory_runs = Vec::new();
    for modules in [0, 1, MODULES] {
        memory_runs.push(memory(modules, &cache.path).await);
    }

    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "## Module load and scale\n");
    let _ = writeln!(
        w,
        "Measured {} on {}.\n",
        common::today(),
        common::machine()
    );
    let _ = writeln!(
        w,
        "```sh\ncargo xtask bench\n# or alone:\ncargo bench -p wasm-device-plugin --bench scale\n```\n"
    );
    let _ = writeln!(
        w,
        "[`host/benches/scale.rs`](host/benches/scale.rs): the host and the kubelet simulator in \
         one process over real unix sockets (the memory figures: the real binary as a child \
         process). A load is timed from `Host::start` (module and manifest already in the \
         directory, simulator running) until the simulator has every resource of the module \
         registered and its first ListAndWatch list. *Cold*: an empty compiled-module cache \
         directory, so the module compiles; *warm*: the cache the cold load filled, on a new \
         host. The fpga and generic guests run on the demo's simulated DFL card and fake `/dev`.\n"
    );

    let _ = writeln!(w, "### Module load (file → registered and listed)\n");
    let _ = writeln!(w, "| what | measured | target |\n|---|---|---|");
    for load in &loads {
        let (cold_target, warm_target) = if load.rust {
            ("≤ 1 s", "≤ 20 ms")
        } else {
            ("—", "—")
        };
        let _ = writeln!(
            w,
            "| {}, cold, {} rounds | {} | {cold_target} |",
            load.label,
            load.cold.len(),
            p50_max(&load.cold)
        );
        let _ = writeln!(
            w,
            "| {}, warm, {} rounds | {} | {warm_target} |",
            load.label,
            load.warm.len(),
            p50_max(&load.warm)
        );
    }

    let _ = writeln!(w, "\n### Where a load goes, per guest\n");
    let _ = writeln!(
        w,
        "Compile: `Runtime::component` without a cache, timed alone. Instantiation: \
         `wdp_guest_instantiation_duration_seconds` `_sum/_count` after the first scan and \
         health checks every 50 ms (a fresh instance each). Scan: the guest's `scan` export \
         alone, `wdp_guest_call_duration_seconds{{function=\"scan\"}}`.\n"
    );
    let _ = writeln!(w, "| what | measured | target |\n|---|---|---|");
    for load in &loads {
        let _ = writeln!(
            w,
            "| {}: compile / instantiation (mean of {}) / scan (mean of {}) | {} / {} / {} | — |",
            load.label,
            load.instantiation.1,
            load.scan.1,
            dur(load.compile),
            us(load.instantiation.0),
            us(load.scan.0),
        );
    }
    if let Some(python) = loads.iter().find(|l| !l.rust) {
        let parts = [
            ("compiling", python.compile),
            ("instantiation", python.instantiation.0),
            ("the first scan", python.scan.0),
        ];
        let (dominant, _) = parts.iter().max_by_key(|(_, d)| *d).expect("three parts");
        let _ = writeln!(
            w,
            "\nThe Python guest's cold load ({}) is dominated by {dominant}: compiling it takes {} \
             of it; a warm load ({}) deserializes it instead, then instantiates ({} each) and \
             scans ({}).",
            dur(python.cold.p50()),
            dur(python.compile),
            dur(python.warm.p50()),
            ms(python.instantiation.0),
            ms(python.scan.0),
        );
    }

    let _ = writeln!(w, "\n### Scale\n");
    let _ = writeln!(w, "| what | measured | target |\n|---|---|---|");
    let _ = writeln!(
        w,
        "| one module with {DEVICES} devices (virtual guest, `kinds = \"dev={DEVICES}\"`), \
         warm, → registered and listed, {} rounds | {} | — |",
        large.load.len(),
        p50_max(&large.load)
    );
    let _ = writeln!(
        w,
        "| its first ListAndWatch | {} devices, {:.0} KiB | — |",
        large.first_list,
        large.first_list_bytes as f64 / 1024.0
    );
    let allocate = match &large.allocate {
        Some(s) => format!(
            "p50 {}, p99 {}, max {}",
            us(s.p50()),
            us(s.p99()),
            us(s.max())
        ),
        None => "no call succeeded".to_string(),
    };
    let failure = large
        .first_failure
        .as_deref()
        .map_or_else(String::new, |f| format!(" (first: {f})"));
    let _ = writeln!(
        w,
        "| Allocate of 1 device on it through the simulator, {ALLOCATIONS} calls | {allocate}; \
         {} failures{failure}, {} timeouts (> {:?}) | — |",
        large.failures, large.timeouts, ALLOCATE_TIMEOUT
    );
    let _ = writeln!(
        w,
        "| {MODULES} modules ({many_resources} resources) started at once → all registered and \
         listed, cold, {} rounds | {} | — |",
        many_cold.len(),
        p50_max(&many_cold)
    );
    let _ = writeln!(
        w,
        "| the same, warm, {} rounds | {} | — |",
        many_warm.len(),
        p50_max(&many_warm)
    );
    let beyond = health.max().saturating_sub(HEALTH_INTERVAL);
    let _ = writeln!(
        w,
        "| health change (a device node deleted) → Unhealthy in ListAndWatch, generic guest, \
         `health-interval = \"{}ms\"`, {} rounds spread over the interval | {}; max − interval \
         = {} | ≤ 50 ms beyond the interval |",
        HEALTH_INTERVAL.as_millis(),
        health.len(),
        p50_max(&health),
        ms(beyond)
    );
    for m in &memory_runs {
        let _ = writeln!(
            w,
            "| host binary RSS, {} module{} ({} resources), listed and allocated on | {} (peak {}) \
             | — |",
            m.modules,
            if m.modules == 1 { "" } else { "s" },
            m.resources,
            mib(m.rss_kib),
            mib(m.hwm_kib)
        );
    }
    let rss = |n: usize| {
        memory_runs
            .iter()
            .find(|m| m.modules == n)
            .map_or(0, |m| m.rss_kib)
    };
    let per_module = rss(MODULES).saturating_sub(rss(1)) / (MODULES as u64 - 1);
    let _ = writeln!(
        w,
        "| per additional module, (RSS{MODULES} − RSS1) / {} | {} | ≤ 5 MiB |",
        MODULES - 1,
        mib(per_module)
    );
    let _ = writeln!(
        w,
        "\nThe memory runs start the binary with `run --metrics-addr off` and a cache the bench \
         filled beforehand (warm), then call Allocate three times on every resource before \
         reading `VmRSS`/`VmHWM`. The whole bench took {:.0} s.",
        bench_started.elapsed().as_secs_f64()
    );
    common::publish("scale", &md);
}
