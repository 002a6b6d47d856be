//! `wdp-apiserver`: the tests' API server (this crate's `ApiServer`: etcd and
//! kube-apiserver on free ports of 127.0.0.1, in a temporary directory) as a
//! process of its own; `cargo xtask demo` runs it for the demo's DRA half.
//!
//! Runs the binaries `WDP_KUBE_APISERVER` and `WDP_ETCD` name (else those a
//! `cargo xtask` run left in `target/e2e/bin/`). Once the API server answers
//! ready, prints the admin kubeconfig's path as one line on stdout; then runs
//! until its stdin closes, or it gets SIGTERM or SIGINT, and stops both processes
//! and deletes the directory as it exits. Exit code 1, saying why on stderr,
//! when there is nothing to run or it did not start.

use std::io::{Read, Write};
use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};
use wdp_apiserver::ApiServer;

fn main() -> ExitCode {
    // Starts etcd and the API server and waits for `/readyz`; the SKIPPED line on
    // stderr says why when there is nothing to run.
    let server = match std::panic::catch_unwind(ApiServer::shared) {
        Ok(Some(server)) => server,
        Ok(None) => return ExitCode::FAILURE,
        // The panic's message (the start's error, with the logs) is on stderr.
        Err(_) => return ExitCode::FAILURE,
    };
    eprintln!(
        "wdp-apiserver: kube-apiserver ready at {} (started in {:.1?})",
        server.url(),
        server.started_in()
    );
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "{}", server.kubeconfig().display())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        // Whoever started us is gone: nothing will use the API server.
        return ExitCode::FAILURE;
    }
    match wait_for_the_end() {
        Ok(why) => {
            eprintln!("wdp-apiserver: {why}: stopping kube-apiserver and etcd");
            // Returning from `main` runs the fixture's exit handler, which stops
            // both processes and deletes their directory.
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("wdp-apiserver: {err}; stopping kube-apiserver and etcd");
            ExitCode::FAILURE
        }
    }
}

/// Blocks until stdin reaches its end (the parent closed it, or died) or SIGTERM or
/// SIGINT arrives; which one it was.
fn wait_for_the_end() -> Result<&'static str, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        // Std's blocking read: tokio's stdin needs a feature the workspace leaves off,
        // and a thread blocked here does not keep the process from exiting.
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let mut sink = Vec::new();
                let _ = std::io::stdin().read_to_end(&mut sink);
                let _ = closed_tx.send(());
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        tokio::select! {
            _ = closed_rx => Ok("stdin closed"),
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    })
}
