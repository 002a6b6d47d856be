//! How long the host takes to be registered again after kubelet restarts, and
//! how long a module dropped into the directory takes to be registered.
//!
//! Each kubelet restart stops the kubelet simulator (its socket is removed),
//! starts a new one (which removes every plugin socket, as kubelet does) and
//! measures until both resources of the virtual-devices guest are registered
//! and streaming again. Run:
//!
//! ```text
//! cargo bench -p wasm-device-plugin --bench reregister --profile dev
//! ```
//!
//! Prints the median, 99th percentile and maximum over `ROUNDS` restarts.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasm_device_plugin::app::Host;
use wasm_device_plugin::kubelet::simulator::Simulator;
use wdp_tests::{Dirs, WAIT, guests, host_config, test_settings};

const ROUNDS: usize = 200;
const RESOURCES: [&str; 2] = ["example.com/dev-1", "example.com/dev-2"];

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what}: n={} p50={:.2?} p99={:.2?} max={:.2?}",
        samples.len(),
        at(0.5),
        at(0.99),
        samples[samples.len() - 1]
    );
}

async fn registered(kubelet: &Simulator) {
    kubelet
        .wait_for(WAIT, "registered and streaming", |v| {
            RESOURCES.iter().all(|r| {
                v.plugin(r)
                    .is_some_and(|p| p.streaming && !p.updates.is_empty())
            })
        })
        .await
        .expect("registered");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Module dropped into a running host's directory → registered.
    let mut drops = Vec::new();
    for _ in 0..20 {
        let dirs = Dirs::new();
        let mut kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet");
        let shutdown = CancellationToken::new();
        let host = Host::start(
            host_config(&dirs, test_settings(&dirs.kubelet())),
            &shutdown,
        )
        .expect("host");
        let started = Instant::now();
        dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
        registered(&kubelet).await;
        drops.push(started.elapsed());
        if drops.len() == 20 {
            // Kubelet restarts, on the last host.
            let mut restarts = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                let started = Instant::now();
                kubelet.restart().await.expect("restart");
                registered(&kubelet).await;
                restarts.push(started.elapsed());
            }
            report(
                "kubelet restart -> every resource registered again",
                restarts,
            );
        }
        shutdown.cancel();
        host.stop().await;
        kubelet.stop().await;
    }
    report(
        "module dropped in -> registered (compile + scan + register)",
        drops,
    );
}
