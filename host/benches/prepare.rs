//! NodePrepareResources and NodeUnprepareResources of the DRA frontend beside
//! Allocate of the device-plugin frontend, in one run, on one host:
//!
//! - the host in this process serves one virtual-devices module whose kind
//!   `dev-1` is a DRA driver and whose kind `dev-2` is a device plugin (same
//!   guest, same config), against a real kube-apiserver and etcd
//!   (`wdp_tests::apiserver`, the binaries `WDP_KUBE_APISERVER` and `WDP_ETCD`
//!   name) and kubelet simulators of both APIs over real unix sockets;
//! - a pool of ResourceClaims is created and allocated up front, as the
//!   scheduler would, a few per client, one device each; each timed cycle
//!   prepares one claim of the client's (the host GETs it from the API server,
//!   runs the guest's `prepare`, writes its CDI spec and its checkpoint) and
//!   unprepares it again (the guest's `unprepare`, the spec removed, the
//!   checkpoint written), so the next prepare of that claim does it all anew;
//! - Allocate of one device of `dev-2`, as the allocate bench does;
//!
//! each with 1 client and with 8 concurrent clients (a connection each), from a
//! tonic client on a current-thread runtime of its own, over a few rounds.
//!
//! ```text
//! cargo xtask bench            # builds kube-apiserver + etcd, writes BENCHMARKS.md
//! WDP_KUBE_APISERVER=… WDP_ETCD=… cargo bench -p wasm-device-plugin --bench prepare
//! ```
//!
//! Without an API server to run the bench measures nothing, says so, and leaves
//! its section of `BENCHMARKS.md` as it was.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Samples, ms, us};
use tokio::sync::Barrier;
use wasm_device_plugin::kubelet::deviceplugin::proto::device_plugin_client::DevicePluginClient;
use wasm_device_plugin::kubelet::deviceplugin::proto::{AllocateRequest, ContainerAllocateRequest};
use wasm_device_plugin::kubelet::deviceplugin::simulator::Simulator;
use wasm_device_plugin::kubelet::dra::proto::v1;
use wasm_device_plugin::kubelet::dra::simulator;
use wasm_device_plugin::kubelet::socket;
use wdp_tests::dra::{DraHost, device_names, device_of, prepare, unprepare};
use wdp_tests::{Dirs, WAIT, guests, ids, manifest_with_config, test_settings};

/// Clients of the concurrent runs.
const CLIENTS: usize = 8;
/// Claims per client, prepared in turn (each its own device).
const CLAIMS_PER_CLIENT: usize = 4;
/// Devices of the DRA kind: one per claim.
const DRA_DEVICES: usize = CLIENTS * CLAIMS_PER_CLIENT;
/// Timed prepare + unprepare cycles of the one-client run, per round.
const CYCLES_1: usize = 150;
/// Timed cycles per client of the eight-client run, per round.
const CYCLES_8: usize = 40;
/// Untimed cycles per client before each DRA run.
const WARMUP_CYCLES: usize = 10;
/// Timed Allocates of the one-client run, per round.
const CALLS_1: usize = 5_000;
/// Timed Allocates per client of the eight-client run, per round.
const CALLS_8: usize = 1_000;
/// Untimed Allocates per client before each device-plugin run.
const WARMUP_CALLS: usize = 500;
/// Rounds; each runs every kind of load once, so slow drift of the machine
/// touches all of them alike.
const ROUNDS: usize = 3;
/// The device-plugin resource.
const DP_RESOURCE: &str = "example.com/dev-2";
/// Devices of the device-plugin kind (as the allocate bench has).
const DP_DEVICES: usize = 4;

/// The manifest: `dev-1` through DRA (the default here), `dev-2` through the
/// device-plugin API; the guest's annotation off, so that an Allocate answers
/// what a claim's CDI spec holds (the guest's `prepare` never annotates).
fn manifest() -> String {
    let kinds = format!("dev-1={DRA_DEVICES},dev-2={DP_DEVICES}");
    manifest_with_config(
        "domain = \"example.com\"\napi = \"dra\"\n[resources.dev-2]\napi = \"device-plugin\"",
        &[("kinds", &kinds), ("annotation", "off")],
    )
}

fn main() {
    let server = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("server runtime");
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");

    let Some(setup) = server.block_on(Setup::start()) else {
        eprintln!(
            "bench prepare: NOT MEASURED, no kube-apiserver and etcd to run (`cargo xtask bench` \
             provides them); its section of BENCHMARKS.md is left as it was"
        );
        return;
    };

    let mut results: BTreeMap<(Load, usize), Run> = BTreeMap::new();
    for round in 0..ROUNDS {
        for clients in [1, CLIENTS] {
            let (cycles, calls) = if clients == 1 {
                (CYCLES_1, CALLS_1)
            } else {
                (CYCLES_8, CALLS_8)
            };
            let (prepared, unprepared) = client.block_on(prepare_load(
                &setup.dra_socket,
                &setup.claims,
                clients,
                cycles,
            ));
            let allocated = client.block_on(allocate_load(
                &setup.dp_socket,
                &setup.dp_ids,
                clients,
                calls,
            ));
            for (load, run) in [
                (Load::Prepare, prepared),
                (Load::Unprepare, unprepared),
                (Load::Allocate, allocated),
            ] {
                let stats = run.stats();
                eprintln!(
                    "round {round}: {:<24} {clients} client(s): p50 {} p99 {} {:.0}/s",
                    load.call(),
                    us(stats.p50()),
                    us(stats.p99()),
                    run.throughput()
                );
                results
                    .entry((load, clients))
                    .and_modify(|r| r.merge(&run))
                    .or_insert(run);
            }
        }
    }

    common::publish(
        "prepare",
        &format!(
            "## NodePrepareResources (DRA) beside Allocate\n\nMachine: {}. Measured {}.\n\n\
             ```sh\ncargo xtask bench\n```\n\n{}",
            common::machine(),
            common::today(),
            report(&results, &setup.filesystem)
        ),
    );

    server.block_on(setup.stop());
}

/// What a run loads the host with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Load {
    /// NodePrepareResources of one claim.
    Prepare,
    /// NodeUnprepareResources of the claim just prepared.
    Unprepare,
    /// Allocate of one device.
    Allocate,
}

impl Load {
    /// The call's name.
    fn call(self) -> &'static str {
        match self {
            Load::Prepare => "NodePrepareResources",
            Load::Unprepare => "NodeUnprepareResources",
            Load::Allocate => "Allocate",
        }
    }

    /// The frontend serving it.
    fn frontend(self) -> &'static str {
        match self {
            Load::Prepare | Load::Unprepare => "DRA",
            Load::Allocate => "device plugin",
        }
    }
}

/// One load run's latencies and how long it took.
struct Run {
    samples: Vec<Duration>,
    wall: Duration,
}

impl Run {
    fn merge(&mut self, other: &Run) {
        self.samples.extend_from_slice(&other.samples);
        self.wall += other.wall;
    }

    /// Calls per second of wall time (of the whole run: for a DRA run, the
    /// prepares and the unprepares between them).
    fn throughput(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64()
    }

    fn stats(&self) -> Samples {
        Samples::new(self.samples.clone())
    }
}

/// The host serving both kinds, registered with both kubelet simulators, and the
/// claims of each client.
struct Setup {
    fixture: DraHost,
    kubelet: Simulator,
    /// The DRA driver's socket.
    dra_socket: PathBuf,
    /// The device plugin's socket.
    dp_socket: PathBuf,
    /// The device plugin's device ids.
    dp_ids: Vec<String>,
    /// Per client, its allocated claims.
    claims: Vec<Vec<v1::Claim>>,
    /// The type of the filesystem the CDI specs and the checkpoint are written
    /// to (their fsyncs are much of a prepare's cost).
    filesystem: String,
}

impl Setup {
    /// Starts the API server (if not yet), a device-plugin kubelet simulator and
    /// the host; registers the DRA driver, waits for its slices and the device
    /// plugin's list, and creates and allocates [`CLAIMS_PER_CLIENT`] claims per
    /// client, each on a device of its own. `None` without an API server.
    async fn start() -> Option<Self> {
        let dirs = Dirs::new();
        let mut settings = test_settings(&dirs.kubelet());
        // Health checks as in production, not the tests' 50 ms.
        settings.health_interval = Duration::from_secs(10);
        let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet simulator");
        let Some(fixture) = DraHost::start_with(
            "prepare-bench",
            &manifest(),
            guests::VIRTUAL_DEVICES,
            dirs,
            settings,
        )
        .await
        else {
            kubelet.stop().await;
            return None;
        };
        fixture.register().await;
        let slices = fixture
            .slices("all devices", |s| device_names(s).len() == DRA_DEVICES)
            .await;
        let mut claims = Vec::with_capacity(CLIENTS);
        for c in 0..CLIENTS {
            let mut own = Vec::with_capacity(CLAIMS_PER_CLIENT);
            for k in 0..CLAIMS_PER_CLIENT {
                let device = device_of(
                    &slices,
                    &format!("/node1/dev1/{}", c * CLAIMS_PER_CLIENT + k + 1),
                );
                let name = format!("claim-{c}-{k}");
                let uid = fixture.allocated_claim(&name, &[("dev", &device)]).await;
                own.push(fixture.claim_ref(&name, &uid));
            }
            claims.push(own);
        }
        let dp_socket = common::registered(&kubelet, DP_RESOURCE).await;
        let dp_ids = ids(&kubelet.view(), DP_RESOURCE);
        assert_eq!(dp_ids.len(), DP_DEVICES, "device-plugin ids: {dp_ids:?}");
        let filesystem = filesystem(fixture.dirs.root.path());
        Some(Self {
            filesystem,
            dra_socket: fixture.endpoint(),
            fixture,
            kubelet,
            dp_socket,
            dp_ids,
            claims,
        })
    }

    async fn stop(self) {
        self.fixture.stop().await;
        self.kubelet.stop().await;
    }
}

/// The type of the filesystem holding `path`, as `stat -f` names it.
fn filesystem(path: &Path) -> String {
    std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "a filesystem `stat -f` did not name".into())
}

/// `clients` connections to the DRA socket `path`, each cycling over its claims
/// in `claims`: [`WARMUP_CYCLES`] untimed then `cycles` timed NodePrepareResources
/// then NodeUnprepareResources of one claim, all at once. The prepare and the
/// unprepare runs (they share the wall time).
///
/// # Panics
/// A call fails or answers with an error (the first is in the message).
async fn prepare_load(
    path: &Path,
    claims: &[Vec<v1::Claim>],
    clients: usize,
    cycles: usize,
) -> (Run, Run) {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut tasks = Vec::with_capacity(clients);
    for own in claims.iter().take(clients) {
        let mut client = simulator::client(path).expect("DRA client");
        let own = own.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut prepared = Vec::with_capacity(cycles);
            let mut unprepared = Vec::with_capacity(cycles);
            for n in 0..WARMUP_CYCLES + cycles {
                if n == WARMUP_CYCLES {
                    barrier.wait().await;
                }
                let claim = own[n % own.len()].clone();
                let started = Instant::now();
                let answer = prepare(&mut client, claim.clone()).await;
                let prepare_took = started.elapsed();
                if !answer.error.is_empty() || answer.devices.len() != 1 {
                    return Err(format!("prepare of {}: {answer:?}", claim.name));
                }
                let started = Instant::now();
                let error = unprepare(&mut client, claim.clone()).await;
                let unprepare_took = started.elapsed();
                if !error.is_empty() {
                    return Err(format!("unprepare of {}: {error}", claim.name));
                }
                if n >= WARMUP_CYCLES {
                    prepared.push(prepare_took);
                    unprepared.push(unprepare_took);
                }
            }
            Ok((prepared, unprepared))
        }));
    }
    tokio::time::timeout(WAIT, barrier.wait())
        .await
        .expect("every client warmed up in time (a failed one is reported below)");
    let started = Instant::now();
    let mut prepared = Vec::with_capacity(clients * cycles);
    let mut unprepared = Vec::with_capacity(clients * cycles);
    for task in tasks {
        let (p, u) = task
            .await
            .expect("client task")
            .unwrap_or_else(|e| panic!("a DRA call failed: {e}"));
        prepared.extend(p);
        unprepared.extend(u);
    }
    let wall = started.elapsed();
    (
        Run {
            samples: prepared,
            wall,
        },
        Run {
            samples: unprepared,
            wall,
        },
    )
}

/// `clients` connections to the device plugin at `path`, each making
/// [`WARMUP_CALLS`] untimed then `calls` timed Allocates of one device (cycling
/// over `ids`), all at once.
///
/// # Panics
/// An Allocate fails.
async fn allocate_load(path: &Path, ids: &[String], clients: usize, calls: usize) -> Run {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let mut client = DevicePluginClient::new(socket::channel(path).expect("channel"));
        let ids = ids.to_vec();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(calls);
            for n in 0..WARMUP_CALLS + calls {
                if n == WARMUP_CALLS {
                    barrier.wait().await;
                }
                let request = AllocateRequest {
                    container_requests: vec![ContainerAllocateRequest {
                        devices_ids: vec![ids[(c + n) % ids.len()].clone()],
                    }],
                };
                let started = Instant::now();
                let answer = client.allocate(request).await;
                let took = started.elapsed();
                if let Err(status) = answer {
                    return Err(status.to_string());
                }
                if n >= WARMUP_CALLS {
                    samples.push(took);
                }
            }
            Ok(samples)
        }));
    }
    tokio::time::timeout(WAIT, barrier.wait())
        .await
        .expect("every client warmed up in time (a failed one is reported below)");
    let started = Instant::now();
    let mut samples = Vec::with_capacity(clients * calls);
    for task in tasks {
        samples.extend(
            task.await
                .expect("client task")
                .unwrap_or_else(|e| panic!("an Allocate failed: {e}")),
        );
    }
    Run {
        samples,
        wall: started.elapsed(),
    }
}

/// The section's text below the command.
fn report(results: &BTreeMap<(Load, usize), Run>, filesystem: &str) -> String {
    let get = |load, clients| &results[&(load, clients)];
    let mut out = format!(
        "One host in the bench's process serves the virtual-devices guest as one module: kind \
         `dev-1` ({DRA_DEVICES} devices) as the DRA driver `dev-1.example.com`, kind `dev-2` \
         ({DP_DEVICES} devices) as the device plugin `{DP_RESOURCE}`, same guest and config \
         (`annotation = \"off\"`, so that Allocate answers no more than a claim's CDI spec holds). Its API server is a real \
         kube-apiserver with etcd (the version `e2e/cluster/kubernetes` pins) on this \
         machine (TLS over loopback, the fixture of `tests/apiserver/`). The clients \
         are tonic clients on a current-thread runtime, a connection each, over the host's \
         unix sockets, as kubelet's are.\n\n\
         - **NodePrepareResources** of one claim with one device: the GET of the ResourceClaim \
         from the API server (its UID and allocation checked), the guest's `prepare` (WIT \
         0.2.2) through the output policy, the claim's CDI spec written (temporary \
         file, fsync, rename) and the checkpoint of prepared claims written (likewise) before \
         the answer, both in the bench's temporary directory (filesystem `{filesystem}`, as \
         `stat -f` names it). {CLAIMS_PER_CLIENT} claims per client are created and \
         allocated up front (the scheduler's part) and reused; each cycle prepares one and \
         unprepares it, so every prepare does all of the above.\n\
         - **NodeUnprepareResources** of the claim just prepared: its spec removed and the \
         checkpoint written after the guest's `unprepare`; no API call.\n\
         - **Allocate** (device-plugin v1beta1) of one device of `dev-2`: the guest's `allocate` \
         and `post-allocate` through the same policy, answered inline; no API server, no file.\n\n\
         A driver prepares its claims one at a time (its checkpoint lock is held from after the \
         GET until the checkpoint is written, as upstream's helper serialises them), so with \
         {CLIENTS} clients prepares queue where Allocates run side by side.\n\n\
         Per round: DRA with 1 client ({CYCLES_1} timed cycles) and with {CLIENTS} \
         ({CYCLES_8} per client), each after {WARMUP_CYCLES} untimed cycles per client, then \
         Allocate with 1 client ({CALLS_1} timed calls) and with {CLIENTS} ({CALLS_8} per \
         client), each after {WARMUP_CALLS} untimed calls per client; {ROUNDS} rounds; \
         samples of all rounds together. The per-second column is calls of that row per \
         second of its run; a DRA run's wall time holds both its prepares and its unprepares.\n\n\
         | call | frontend | clients | calls | p50 | p99 | per second |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for clients in [1, CLIENTS] {
        for load in [Load::Prepare, Load::Unprepare, Load::Allocate] {
            let run = get(load, clients);
            let s = run.stats();
            out.push_str(&format!(
                "| {} | {} | {clients} | {} | {} | {} | {:.0} |\n",
                load.call(),
                load.frontend(),
                s.len(),
                ms(s.p50()),
                ms(s.p99()),
                run.throughput()
            ));
        }
    }
    out.push_str(
        "\n| ratio | clients | p50 | p99 |\n\
         |---|---|---|---|\n",
    );
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    for clients in [1, CLIENTS] {
        let (p, a) = (
            get(Load::Prepare, clients).stats(),
            get(Load::Allocate, clients).stats(),
        );
        out.push_str(&format!(
            "| NodePrepareResources / Allocate | {clients} | {:.1}× | {:.1}× |\n",
            ratio(p.p50(), a.p50()),
            ratio(p.p99(), a.p99())
        ));
    }
    out.push_str(
        "\nThe Go peer (`../shared/peer`) is a device plugin only: it has no DRA driver, so \
         there is no Go figure to set beside NodePrepareResources (its Allocate is in the \
         Allocate section).\n",
    );
    out
}
