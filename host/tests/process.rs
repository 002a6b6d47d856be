//! The `wasm-device-plugin` binary as a DaemonSet runs it: a real process, real
//! signals, the kubelet simulator on real sockets. Here (not in the `tests`
//! crate) because only this package's tests know where cargo put the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use wasm_device_plugin::kubelet::deviceplugin::simulator::Simulator;
use wdp_tests::{Dirs, WAIT, guests, http_get, plugin_sockets, sample};

/// `wasm-device-plugin run` on `dirs`, no cache, no health checks during a test,
/// logging at info, metrics and probes on a free port of 127.0.0.1 (tests run
/// in parallel: the default port would be taken).
fn host_command(dirs: &Dirs) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasm-device-plugin"));
    command
        .args(["run", "--no-cache", "--health-interval", "1h"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .arg("--modules-dir")
        .arg(dirs.modules())
        .arg("--kubelet-dir")
        .arg(dirs.kubelet())
        .arg("--cdi-dir")
        .arg(dirs.cdi())
        .env("WDP_LOG", "info")
        .kill_on_drop(true);
    command
}

fn start_host(dirs: &Dirs) -> Child {
    host_command(dirs)
        .stdout(Stdio::null())
        .spawn()
        .expect("the binary starts")
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id().expect("running")).expect("pid fits");
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill failed");
}

/// Waits for the child to exit, at most `WAIT`.
async fn exit_status(mut child: Child) -> ExitStatus {
    match tokio::time::timeout(WAIT, child.wait()).await {
        Ok(status) => status.expect("wait"),
        Err(_) => panic!("the host did not exit within {WAIT:?}"),
    }
}

async fn stops_cleanly_on(sig: libc::c_int) {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet");
    let host = start_host(&dirs);
    kubelet
        .wait_for(WAIT, "both resources streaming", |v| {
            ["example.com/dev-1", "example.com/dev-2"]
                .iter()
                .all(|r| v.plugin(r).is_some_and(|p| p.streaming))
        })
        .await
        .expect("registered");
    assert_eq!(plugin_sockets(&dirs.kubelet()).len(), 2);
    signal(&host, sig);
    let status = exit_status(host).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        plugin_sockets(&dirs.kubelet()).is_empty(),
        "sockets removed"
    );
    let view = kubelet
        .wait_for(WAIT, "streams ended", |v| {
            v.plugins.values().all(|p| !p.streaming)
        })
        .await
        .expect("streams end");
    assert_eq!(view.plugins.len(), 2);
    kubelet.stop().await;
}

#[tokio::test]
async fn sigterm_removes_the_sockets_ends_the_streams_and_exits_zero() {
    stops_cleanly_on(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_stops_the_same_way() {
    stops_cleanly_on(libc::SIGINT).await;
}

/// File names in `dir`.
fn file_names(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("kubelet dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Waits until the simulator sees every resource of the virtual-devices guest
/// registered on an endpoint not in `old`, and streaming; returns the endpoints.
async fn registered_anew(kubelet: &Simulator, old: &BTreeSet<String>) -> BTreeSet<String> {
    let resources = ["example.com/dev-1", "example.com/dev-2"];
    let view = kubelet
        .wait_for(WAIT, "both resources registered on new sockets", |v| {
            resources.iter().all(|r| {
                v.plugin(r)
                    .is_some_and(|p| p.streaming && !old.contains(&p.registration.endpoint))
            })
        })
        .await
        .expect("registered");
    resources
        .iter()
        .filter_map(|r| view.plugin(r).map(|p| p.registration.endpoint.clone()))
        .collect()
}

#[tokio::test]
async fn a_restart_after_sigkill_removes_only_the_dead_sockets_the_killed_host_left() {
    use std::os::unix::process::ExitStatusExt;

    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    // Started once and kept: it clears the directory when it starts, as kubelet does.
    let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet");
    // Another vendor's plugin that died: not ours to remove. std's listener
    // leaves its file behind when dropped.
    let foreign = "vendor-gpu.sock";
    drop(std::os::unix::net::UnixListener::bind(dirs.kubelet().join(foreign)).expect("bind"));
    let mut host = start_host(&dirs);
    let mut endpoints = registered_anew(&kubelet, &BTreeSet::new()).await;
    for _ in 0..3 {
        signal(&host, libc::SIGKILL);
        assert_eq!(exit_status(host).await.signal(), Some(libc::SIGKILL));
        let left = file_names(&dirs.kubelet());
        for endpoint in &endpoints {
            assert!(left.contains(endpoint), "{endpoint} left behind: {left:?}");
            let refused = std::os::unix::net::UnixStream::connect(dirs.kubelet().join(endpoint))
                .expect_err("nobody listens");
            assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        host = start_host(&dirs);
        endpoints = registered_anew(&kubelet, &endpoints).await;
        // The old sockets went before anything was served: no wait needed.
        let mut expected: BTreeSet<String> = ["kubelet.sock", foreign].map(String::from).into();
        expected.extend(endpoints.iter().cloned());
        assert_eq!(file_names(&dirs.kubelet()), expected);
    }
    signal(&host, libc::SIGTERM);
    assert!(exit_status(host).await.success());
    kubelet.stop().await;
}

#[tokio::test]
async fn a_guest_that_floods_the_log_is_cut_off_after_100_lines_per_call() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let dirs = Dirs::new();
    dirs.add_module("faulty", guests::FAULTY);
    // Its scan (at load) writes 1000 log lines.
    dirs.write_manifest("faulty", "[config]\nlog = \"scan\"\n");
    let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet");
    let mut host = host_command(&dirs)
        .args(["--scan-interval", "1h", "--log-format", "text"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(host.stderr.take().expect("stderr")).lines();
    let (mut guest_lines, mut cut_off) = (0, 0);
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.contains("faulty guest: line") {
                guest_lines += 1;
            }
            if line.contains("dropping the rest of this call's lines") {
                cut_off += 1;
            }
            if line.contains("serving resource") {
                break;
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the module loads");
    assert_eq!((guest_lines, cut_off), (100, 1));
    // The reader goes away: the host's later log lines hit a closed stderr,
    // which must not stop it from shutting down cleanly.
    drop(lines);
    signal(&host, libc::SIGTERM);
    assert!(exit_status(host).await.success());
    kubelet.stop().await;
}

/// Reads the host's stderr as JSON log lines (each must parse) until one has
/// `fields.message == message`; returns that line's fields.
async fn json_log_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    message: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            let event: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            assert!(
                event["level"].is_string() && event["timestamp"].is_string(),
                "{line}"
            );
            let fields = event["fields"].as_object().cloned().unwrap_or_default();
            if fields.get("message").and_then(|m| m.as_str()) == Some(message) {
                return fields;
            }
        }
        panic!("the host's log ended before `{message}`");
    };
    tokio::time::timeout(WAIT, read)
        .await
        .unwrap_or_else(|_| panic!("no `{message}` in the log within {WAIT:?}"))
}

#[tokio::test]
async fn json_logs_name_the_metrics_address_and_the_probes_answer_over_http() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    let mut host = host_command(&dirs)
        .args(["--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(host.stderr.take().expect("stderr")).lines();
    let serving = json_log_line(&mut lines, "serving /metrics, /healthz and /readyz").await;
    let addr: std::net::SocketAddr = serving["addr"]
        .as_str()
        .expect("addr field")
        .parse()
        .expect("a socket address");
    assert_ne!(addr.port(), 0, "the port picked is logged");

    // Kubelet is not there yet: alive, not ready.
    let (status, _) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");

    let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet");
    json_log_line(
        &mut lines,
        "ready: every loaded module's resources are registered with kubelet",
    )
    .await;
    let (status, _) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200);
    kubelet
        .allocate("example.com/dev-1", &[&["/node1/dev1/1"]])
        .await
        .expect("allocate");
    let (status, page) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &page,
            "wdp_allocations_total",
            &[("resource", "example.com/dev-1"), ("outcome", "ok")]
        ),
        Some(1.0)
    );
    assert!(page.contains("wdp_build_info{version="), "{page}");

    signal(&host, libc::SIGTERM);
    // Keep reading, so every line up to the exit is checked to be JSON.
    json_log_line(&mut lines, "stopped").await;
    assert!(exit_status(host).await.success());
    kubelet.stop().await;
}

#[tokio::test]
async fn a_metrics_port_in_use_stops_the_host_with_the_flag_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address");
    let dirs = Dirs::new();
    let output = Command::new(env!("CARGO_BIN_EXE_wasm-device-plugin"))
        .args(["run", "--no-cache"])
        .arg("--metrics-addr")
        .arg(addr.to_string())
        .arg("--modules-dir")
        .arg(dirs.modules())
        .arg("--kubelet-dir")
        .arg(dirs.kubelet())
        .arg("--cdi-dir")
        .arg(dirs.cdi())
        .output();
    let output = tokio::time::timeout(WAIT, output)
        .await
        .expect("exits in time")
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--metrics-addr") && stderr.contains(&addr.to_string()),
        "{stderr}"
    );
}

/// Context switches (voluntary and not) of each thread of process `pid` so far,
/// by thread id and name: each one is a time the thread stopped running, so an idle
/// thread that wakes on a timer adds one per wake-up.
fn context_switches(pid: u32) -> BTreeMap<String, u64> {
    let mut threads = BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the host's threads");
    for task in tasks.flatten() {
        // A thread that ended since the listing is simply not counted.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let switches = status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        // Keyed by id and name, so a failure says which thread woke.
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or_default()
            .trim();
        let tid = task.file_name().to_string_lossy().into_owned();
        threads.insert(format!("{tid} {name}"), switches);
    }
    threads
}

#[tokio::test]
async fn an_idle_host_does_not_wake_periodically() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    // Long enough to see a 10 ms ticker 200 times, or a 1 s timer twice.
    const IDLE: Duration = Duration::from_secs(2);
    const BURST: Duration = Duration::from_millis(500);
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet");
    let mut host = host_command(&dirs)
        .args(["--scan-interval", "1h", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(host.stderr.take().expect("stderr")).lines();
    // Readiness is the last thing the host works out after registering.
    json_log_line(
        &mut lines,
        "ready: every loaded module's resources are registered with kubelet",
    )
    .await;
    kubelet
        .wait_for(WAIT, "both resources listed", |v| {
            ["example.com/dev-1", "example.com/dev-2"].iter().all(|r| {
                v.plugin(r)
                    .is_some_and(|p| p.streaming && !p.updates.is_empty())
            })
        })
        .await
        .expect("registered");
    // Whatever else it logs is read, so that it never blocks on a full pipe.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let pid = host.id().expect("running");
    // Tokio's workers go idle in a burst of wake-ups of each other (measured:
    // up to 60 context switches, all within 50 ms of the last request); the
    // window starts after it, as what is looked for here, a periodic wake-up,
    // shows anywhere in it.
    tokio::time::sleep(BURST).await;
    let before = context_switches(pid);
    // Observing an absence of activity takes a window; nothing is waited for.
    tokio::time::sleep(IDLE).await;
    let after = context_switches(pid);
    // Threads that started or ended in the window count from zero / not at all.
    let woken: BTreeMap<&String, u64> = after
        .iter()
        .map(|(tid, n)| (tid, n - before.get(tid).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let total: u64 = woken.values().sum();
    assert!(
        total < 10,
        "{total} context switches in {IDLE:?} of idleness, by thread: {woken:?}"
    );
    drop(host);
    drain.abort();
    kubelet.stop().await;
}
