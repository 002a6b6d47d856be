//! How long the host takes to be registered again after kubelet restarts, and
//! how long a module dropped into the directory takes to be registered.
//!
//! Each kubelet restart stops the kubelet simulator (its socket is removed),
//! starts a new one (which removes every plugin socket, as kubelet does) and
//! measures until both resources of the virtual-devices guest are registered
//! and streaming again. Run:
//!
//! ```text
//! cargo xtask bench            # every bench; writes BENCHMARKS.md
//! cargo bench -p wasm-device-plugin --bench reregister   # this one alone
//! ```
//!
//! Reports the median, 99th percentile and maximum over `ROUNDS` restarts.

mod common;

use std::time::Instant;

use common::{Samples, ms};

use tokio_util::sync::CancellationToken;
use wasm_device_plugin::app::Host;
use wasm_device_plugin::kubelet::deviceplugin::simulator::Simulator;
use wdp_tests::{Dirs, WAIT, guests, host_config, test_settings};

const ROUNDS: usize = 200;
const RESOURCES: [&str; 2] = ["example.com/dev-1", "example.com/dev-2"];

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
    let mut restarts = Vec::with_capacity(ROUNDS);
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
            for _ in 0..ROUNDS {
                let started = Instant::now();
                kubelet.restart().await.expect("restart");
                registered(&kubelet).await;
                restarts.push(started.elapsed());
            }
        }
        shutdown.cancel();
        host.stop().await;
        kubelet.stop().await;
    }
    let (restarts, drops) = (Samples::new(restarts), Samples::new(drops));
    common::publish(
        "lifecycle",
        &format!(
            "## Lifecycle\n\n\
             Machine: {}. Measured {}.\n\n\
             [`host/benches/reregister.rs`](host/benches/reregister.rs): the host and the kubelet \
             simulator in one process over real unix sockets, with the virtual-devices guest (two \
             resources); no compiled-module cache.\n\n\
             | what | measured | target |\n|---|---|---|\n\
             | kubelet restarts (old socket gone, plugin sockets wiped, new `kubelet.sock`) → both \
             resources registered again and streaming, {} restarts | p50 {}, p99 {}, max {} | within 1 s (issue 4) |\n\
             | module dropped into the watched directory → both resources registered (100 ms event \
             debounce + compile + scan + register), {} runs | p50 {}, p99 {} | — |",
            common::machine(),
            common::today(),
            restarts.len(),
            ms(restarts.p50()),
            ms(restarts.p99()),
            ms(restarts.max()),
            drops.len(),
            ms(drops.p50()),
            ms(drops.p99()),
        ),
    );
}
