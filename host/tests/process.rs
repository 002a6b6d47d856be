//! The `wasm-device-plugin` binary as a DaemonSet runs it: a real process, real
//! signals, the kubelet simulator on real sockets. Here (not in the `tests`
//! crate) because only this package's tests know where cargo put the binary.

use std::process::{ExitStatus, Stdio};

use tokio::process::{Child, Command};
use wasm_device_plugin::kubelet::simulator::Simulator;
use wdp_tests::{Dirs, WAIT, guests, plugin_sockets};

/// `wasm-device-plugin run` on `dirs`, no cache, no health checks during a test,
/// logging at info.
fn host_command(dirs: &Dirs) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasm-device-plugin"));
    command
        .args(["run", "--no-cache", "--health-interval", "1h"])
        .arg("--modules-dir")
        .arg(dirs.modules())
        .arg("--kubelet-dir")
        .arg(dirs.kubelet())
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
