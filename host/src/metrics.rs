//! Prometheus metrics, and the HTTP endpoints that operators and kubelet's
//! probes use: `GET /metrics` (OpenMetrics text), `GET /healthz` (liveness) and
//! `GET /readyz` (readiness).
//!
//! A leaf: any module records into [`Metrics`], or into a handle cut from it for
//! one resource ([`ResourceMetrics`]) or one module ([`ModuleMetrics`]), and this
//! module calls none of them. What `/healthz` and `/readyz` answer comes from a
//! [`Probes`] implementation that `app` passes in. Each host has its own
//! registry (no global), so hosts in one process (the tests) never share counts.
//!
//! The hot path (Allocate, guest calls) touches only handles resolved when a
//! resource is served or a module compiled: an atomic add and a histogram
//! observation, no label lookup. Rare outcomes (errors) look their series up.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The prefix of every metric name.
const PREFIX: &str = "wdp";

/// Latency buckets, in seconds: 25 µs doubling to about 13 s, which covers a
/// fast Allocate (tens of µs) up to a scan at its default 10 s deadline.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(25e-6, 2.0, 20)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// `{resource}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: Arc<str>,
}

/// `{resource, outcome}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    resource: Arc<str>,
    outcome: &'static str,
}

/// `{resource, health}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    resource: Arc<str>,
    health: &'static str,
}

/// `{module}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleLabels {
    module: Arc<str>,
}

/// `{module, function}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    module: Arc<str>,
    function: &'static str,
}

/// `{module, function, reason}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    module: Arc<str>,
    function: &'static str,
    reason: &'static str,
}

/// `{state}` or `{outcome}`: one fixed word.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    outcome: &'static str,
}

/// A guest export, as the `function` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// `scan`.
    Scan,
    /// `health`.
    Health,
    /// `allocate`.
    Allocate,
    /// `post-allocate`.
    PostAllocate,
    /// `describe`.
    Describe,
    /// `prepare`.
    Prepare,
    /// `unprepare`.
    Unprepare,
}

impl Function {
    const ALL: [Function; 7] = [
        Function::Scan,
        Function::Health,
        Function::Allocate,
        Function::PostAllocate,
        Function::Describe,
        Function::Prepare,
        Function::Unprepare,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Function::Scan => "scan",
            Function::Health => "health",
            Function::Allocate => "allocate",
            Function::PostAllocate => "post-allocate",
            Function::Describe => "describe",
            Function::Prepare => "prepare",
            Function::Unprepare => "unprepare",
        }
    }
}

/// Why a guest call failed, as the `reason` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFailureKind {
    /// The module answered with an error of its own.
    Error,
    /// It trapped.
    Trap,
    /// It ran past its deadline.
    Deadline,
    /// It hit its memory cap.
    Memory,
}

impl CallFailureKind {
    const ALL: [CallFailureKind; 4] = [
        CallFailureKind::Error,
        CallFailureKind::Trap,
        CallFailureKind::Deadline,
        CallFailureKind::Memory,
    ];

    fn as_str(self) -> &'static str {
        match self {
            CallFailureKind::Error => "error",
            CallFailureKind::Trap => "trap",
            CallFailureKind::Deadline => "deadline",
            CallFailureKind::Memory => "memory",
        }
    }
}

/// How loading a module's bytes went, as the `outcome` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Compiled from the bytes.
    Compiled,
    /// Read from the compiled-module cache.
    Cached,
    /// A cache entry was found but not trusted (and the bytes compiled instead).
    CacheRejected,
    /// Not a module this host can run.
    Refused,
}

impl LoadOutcome {
    fn as_str(self) -> &'static str {
        match self {
            LoadOutcome::Compiled => "compiled",
            LoadOutcome::Cached => "cached",
            LoadOutcome::CacheRejected => "cache_rejected",
            LoadOutcome::Refused => "refused",
        }
    }
}

/// The module states the `wdp_modules` gauge counts.
pub const MODULE_STATES: [&str; 4] = ["settling", "loading", "serving", "failed"];

/// Every metric of one host.
pub struct Metrics {
    registry: Registry,
    allocations: Family<OutcomeLabels, Counter>,
    allocate_duration: Histograms<ResourceLabels>,
    devices: Family<HealthLabels, Gauge>,
    registrations: Family<OutcomeLabels, Counter>,
    kubelet_restarts: Counter,
    guest_calls: Histograms<CallLabels>,
    guest_failures: Family<FailureLabels, Counter>,
    instantiations: Histograms<ModuleLabels>,
    modules: Family<StateLabels, Gauge>,
    module_loads: Family<LoadLabels, Counter>,
    refusals: Family<ModuleLabels, Counter>,
    streams: Gauge,
    calls_in_flight: Gauge,
    dra: DraFamilies,
}

/// The DRA frontend's metrics.
struct DraFamilies {
    prepares: Family<OutcomeLabels, Counter>,
    prepare_duration: Histograms<ResourceLabels>,
    unprepares: Family<OutcomeLabels, Counter>,
    unprepare_duration: Histograms<ResourceLabels>,
    prepared_claims: Family<ResourceLabels, Gauge>,
    slice_publications: Family<OutcomeLabels, Counter>,
}

impl DraFamilies {
    fn register(registry: &mut Registry) -> Self {
        let dra = Self {
            prepares: Family::default(),
            prepare_duration: Family::new_with_constructor(latency_histogram),
            unprepares: Family::default(),
            unprepare_duration: Family::new_with_constructor(latency_histogram),
            prepared_claims: Family::default(),
            slice_publications: Family::default(),
        };
        registry.register(
            "dra_prepares",
            "Claims NodePrepareResources was asked to prepare, by resource and outcome (ok, error)",
            dra.prepares.clone(),
        );
        registry.register(
            "dra_prepare_duration_seconds",
            "Time to prepare one claim (API-server fetch, guest allocation, CDI spec, checkpoint), by resource",
            dra.prepare_duration.clone(),
        );
        registry.register(
            "dra_unprepares",
            "Claims NodeUnprepareResources was asked to unprepare, by resource and outcome (ok, error)",
            dra.unprepares.clone(),
        );
        registry.register(
            "dra_unprepare_duration_seconds",
            "Time to unprepare one claim, by resource",
            dra.unprepare_duration.clone(),
        );
        registry.register(
            "dra_prepared_claims",
            "Claims prepared now (checkpointed until unprepared), by resource",
            dra.prepared_claims.clone(),
        );
        registry.register(
            "dra_slice_publications",
            "Attempts to publish a resource's ResourceSlices, by outcome (ok, error)",
            dra.slice_publications.clone(),
        );
        dra
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry holding every metric, all at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let allocations = Family::default();
        registry.register(
            "allocations",
            "Allocate calls answered, by resource and outcome (ok, or the gRPC code returned)",
            allocations.clone(),
        );
        let allocate_duration: Histograms<ResourceLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "allocate_duration_seconds",
            "Time to answer Allocate, from request to response, by resource",
            allocate_duration.clone(),
        );
        let devices = Family::default();
        registry.register(
            "devices",
            "Devices advertised to kubelet (replicas counted), by resource and health",
            devices.clone(),
        );
        let registrations = Family::default();
        registry.register(
            "registrations",
            "Attempts to register a resource with kubelet, by outcome (ok, refused, unreachable)",
            registrations.clone(),
        );
        let kubelet_restarts = Counter::default();
        registry.register(
            "kubelet_restarts",
            "Times kubelet's registration socket was recreated (a kubelet restart)",
            kubelet_restarts.clone(),
        );
        let guest_calls: Histograms<CallLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "guest_call_duration_seconds",
            "Time a guest export took, by module and function (scan, health, allocate, post-allocate)",
            guest_calls.clone(),
        );
        let guest_failures = Family::default();
        registry.register(
            "guest_call_failures",
            "Guest calls that failed, by module, function and reason (error, trap, deadline, memory)",
            guest_failures.clone(),
        );
        let instantiations: Histograms<ModuleLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "guest_instantiation_duration_seconds",
            "Time to instantiate a module for one call (each call gets a fresh instance), by module",
            instantiations.clone(),
        );
        let modules: Family<StateLabels, Gauge> = Family::default();
        registry.register(
            "modules",
            "Modules in the modules directory, by state (settling, loading, serving, failed)",
            modules.clone(),
        );
        let module_loads = Family::default();
        registry.register(
            "module_loads",
            "Module files loaded, by outcome (compiled, cached, cache_rejected, refused)",
            module_loads.clone(),
        );
        let refusals = Family::default();
        registry.register(
            "module_refusals",
            "Module files refused and periodic checks that started failing, by module",
            refusals.clone(),
        );
        let streams = Gauge::default();
        registry.register(
            "list_and_watch_streams",
            "ListAndWatch streams open (one per registered resource while kubelet watches it)",
            streams.clone(),
        );
        let calls_in_flight = Gauge::default();
        registry.register(
            "guest_calls_in_flight",
            "Guest calls running now",
            calls_in_flight.clone(),
        );
        registry.register(
            "build",
            "The host's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let dra = DraFamilies::register(&mut registry);
        for state in MODULE_STATES {
            modules.get_or_create(&StateLabels { state }).set(0);
        }
        Self {
            registry,
            allocations,
            allocate_duration,
            devices,
            registrations,
            kubelet_restarts,
            guest_calls,
            guest_failures,
            instantiations,
            modules,
            module_loads,
            refusals,
            streams,
            calls_in_flight,
            dra,
        }
    }

    /// The handles for serving `resource`.
    pub fn resource(self: &Arc<Self>, resource: &str) -> ResourceMetrics {
        let resource: Arc<str> = resource.into();
        let labels = ResourceLabels {
            resource: resource.clone(),
        };
        ResourceMetrics {
            allocated: self.allocations.get_or_create_owned(&OutcomeLabels {
                resource: resource.clone(),
                outcome: "ok",
            }),
            duration: self.allocate_duration.get_or_create_owned(&labels),
            metrics: self.clone(),
            resource,
        }
    }

    /// The handles for calling `module`'s exports.
    pub fn module(self: &Arc<Self>, module: &str) -> ModuleMetrics {
        let module: Arc<str> = module.into();
        let calls = Function::ALL.map(|function| {
            self.guest_calls.get_or_create_owned(&CallLabels {
                module: module.clone(),
                function: function.as_str(),
            })
        });
        ModuleMetrics {
            instantiation: self.instantiations.get_or_create_owned(&ModuleLabels {
                module: module.clone(),
            }),
            calls,
            metrics: self.clone(),
            module,
        }
    }

    /// Counts a module load.
    pub fn module_loaded(&self, outcome: LoadOutcome) {
        self.module_loads
            .get_or_create(&LoadLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// The count of module loads with `outcome` so far.
    pub fn module_loads(&self, outcome: LoadOutcome) -> u64 {
        self.module_loads
            .get(&LoadLabels {
                outcome: outcome.as_str(),
            })
            .map_or(0, |c| c.get())
    }

    /// Counts a refusal of `module`'s files or a check that started failing.
    pub fn module_refused(&self, module: &str) {
        self.refusals
            .get_or_create(&ModuleLabels {
                module: module.into(),
            })
            .inc();
    }

    /// Sets how many modules are in each state (names from [`MODULE_STATES`];
    /// a state not given is zero).
    pub fn set_module_states(&self, counts: &[(&'static str, i64)]) {
        for state in MODULE_STATES {
            let n = counts
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            self.modules.get_or_create(&StateLabels { state }).set(n);
        }
    }

    /// Counts an attempt to register `resource`: `ok`, `refused` or `unreachable`.
    pub fn registration(&self, resource: &str, outcome: &'static str) {
        self.registrations
            .get_or_create(&OutcomeLabels {
                resource: resource.into(),
                outcome,
            })
            .inc();
    }

    /// Counts a kubelet restart.
    pub fn kubelet_restarted(&self) {
        self.kubelet_restarts.inc();
    }

    /// Sets the live counts that are read rather than counted: ListAndWatch
    /// streams open and guest calls in flight.
    pub fn set_live(&self, streams: u64, calls_in_flight: u64) {
        self.streams.set(i64::try_from(streams).unwrap_or(i64::MAX));
        self.calls_in_flight
            .set(i64::try_from(calls_in_flight).unwrap_or(i64::MAX));
    }

    /// Drops the per-module series of a module that is gone.
    pub fn forget_module(&self, module: &str) {
        let module: Arc<str> = module.into();
        for function in Function::ALL {
            self.guest_calls.remove(&CallLabels {
                module: module.clone(),
                function: function.as_str(),
            });
            for reason in CallFailureKind::ALL {
                self.guest_failures.remove(&FailureLabels {
                    module: module.clone(),
                    function: function.as_str(),
                    reason: reason.as_str(),
                });
            }
        }
        self.instantiations.remove(&ModuleLabels {
            module: module.clone(),
        });
        self.refusals.remove(&ModuleLabels { module });
    }

    /// Every metric in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = text::encode(&mut out, &self.registry);
        out
    }
}

/// One resource's metrics, resolved when it is served.
#[derive(Debug, Clone)]
pub struct ResourceMetrics {
    metrics: Arc<Metrics>,
    resource: Arc<str>,
    allocated: Counter,
    duration: Histogram,
}

impl ResourceMetrics {
    /// Records an Allocate answered in `elapsed` with `outcome`: `ok`, or the
    /// gRPC code in snake case.
    pub fn allocated(&self, elapsed: Duration, outcome: &'static str) {
        self.duration.observe(elapsed.as_secs_f64());
        if outcome == "ok" {
            self.allocated.inc();
        } else {
            self.metrics
                .allocations
                .get_or_create(&OutcomeLabels {
                    resource: self.resource.clone(),
                    outcome,
                })
                .inc();
        }
    }

    /// Counts an attempt to register the resource: `ok`, `refused` or `unreachable`.
    pub fn registered(&self, outcome: &'static str) {
        self.metrics.registration(&self.resource, outcome);
    }

    /// Sets the devices advertised, healthy and not.
    pub fn set_devices(&self, healthy: usize, unhealthy: usize) {
        for (health, n) in [("Healthy", healthy), ("Unhealthy", unhealthy)] {
            self.metrics
                .devices
                .get_or_create(&HealthLabels {
                    resource: self.resource.clone(),
                    health,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Records one claim prepared (`ok`) or refused (`error`) in `elapsed`.
    pub fn prepared(&self, elapsed: Duration, outcome: &'static str) {
        let dra = &self.metrics.dra;
        dra.prepare_duration
            .get_or_create(&ResourceLabels {
                resource: self.resource.clone(),
            })
            .observe(elapsed.as_secs_f64());
        dra.prepares.get_or_create(&self.outcome(outcome)).inc();
    }

    /// Records one claim unprepared (`ok`) or not (`error`) in `elapsed`.
    pub fn unprepared(&self, elapsed: Duration, outcome: &'static str) {
        let dra = &self.metrics.dra;
        dra.unprepare_duration
            .get_or_create(&ResourceLabels {
                resource: self.resource.clone(),
            })
            .observe(elapsed.as_secs_f64());
        dra.unprepares.get_or_create(&self.outcome(outcome)).inc();
    }

    /// Sets how many claims are prepared now.
    pub fn set_prepared_claims(&self, claims: usize) {
        self.metrics
            .dra
            .prepared_claims
            .get_or_create(&ResourceLabels {
                resource: self.resource.clone(),
            })
            .set(i64::try_from(claims).unwrap_or(i64::MAX));
    }

    /// Counts an attempt to publish the resource's ResourceSlices.
    pub fn slices_published(&self, outcome: &'static str) {
        self.metrics
            .dra
            .slice_publications
            .get_or_create(&self.outcome(outcome))
            .inc();
    }

    fn outcome(&self, outcome: &'static str) -> OutcomeLabels {
        OutcomeLabels {
            resource: self.resource.clone(),
            outcome,
        }
    }

    /// Drops the device counts of a resource no longer served (its counters
    /// stay, as counters do).
    pub fn forget_devices(&self) {
        for health in ["Healthy", "Unhealthy"] {
            self.metrics.devices.remove(&HealthLabels {
                resource: self.resource.clone(),
                health,
            });
        }
    }
}

/// One module's guest-call metrics, resolved when it is compiled.
#[derive(Debug, Clone)]
pub struct ModuleMetrics {
    metrics: Arc<Metrics>,
    module: Arc<str>,
    instantiation: Histogram,
    calls: [Histogram; Function::ALL.len()],
}

impl ModuleMetrics {
    /// Records an instantiation that took `elapsed`.
    pub fn instantiated(&self, elapsed: Duration) {
        self.instantiation.observe(elapsed.as_secs_f64());
    }

    /// Records a call of `function` that returned (a value or the module's own
    /// error) after `elapsed`.
    pub fn called(&self, function: Function, elapsed: Duration) {
        let i = Function::ALL
            .iter()
            .position(|f| *f == function)
            .unwrap_or(0);
        self.calls[i].observe(elapsed.as_secs_f64());
    }

    /// Counts a failed call of `function`.
    pub fn failed(&self, function: Function, reason: CallFailureKind) {
        self.metrics
            .guest_failures
            .get_or_create(&FailureLabels {
                module: self.module.clone(),
                function: function.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }
}

/// What the host says of itself to the probes.
pub trait Probes: Send + Sync + 'static {
    /// `Ok` while the host works; why not otherwise (`/healthz`).
    ///
    /// # Errors
    /// Why the host should be restarted.
    fn live(&self) -> Result<(), String>;

    /// `Ok` once every loaded module's resources are registered with kubelet;
    /// what is still missing otherwise (`/readyz`).
    ///
    /// # Errors
    /// What the host still waits for.
    fn ready(&self) -> Result<(), String>;

    /// Brings the metrics that are read rather than counted up to date; called
    /// before each `/metrics` answer.
    fn refresh(&self, metrics: &Metrics);
}

#[derive(Clone)]
struct Endpoints {
    metrics: Arc<Metrics>,
    probes: Arc<dyn Probes>,
}

/// The HTTP routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(metrics: Arc<Metrics>, probes: Arc<dyn Probes>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { metrics, probes })
}

/// Serves [`router`] on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    probes: Arc<dyn Probes>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, probes))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics_page(State(endpoints): State<Endpoints>) -> Response {
    endpoints.probes.refresh(&endpoints.metrics);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        endpoints.metrics.render(),
    )
        .into_response()
}

async fn healthz(State(endpoints): State<Endpoints>) -> Response {
    probe_answer(endpoints.probes.live())
}

async fn readyz(State(endpoints): State<Endpoints>) -> Response {
    probe_answer(endpoints.probes.ready())
}

fn probe_answer(result: Result<(), String>) -> Response {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => {
            let mut body = why;
            let _ = writeln!(body);
            (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(page: &'a str, prefix: &str) -> Option<&'a str> {
        page.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn allocations_are_counted_by_resource_and_outcome() {
        let metrics = Arc::new(Metrics::new());
        let gpu = metrics.resource("example.com/gpu");
        gpu.allocated(Duration::from_micros(80), "ok");
        gpu.allocated(Duration::from_micros(90), "ok");
        gpu.allocated(Duration::from_micros(70), "invalid_argument");
        let page = metrics.render();
        assert_eq!(
            line(
                &page,
                r#"wdp_allocations_total{resource="example.com/gpu",outcome="ok"}"#
            ),
            Some(r#"wdp_allocations_total{resource="example.com/gpu",outcome="ok"} 2"#)
        );
        assert!(page.contains(
            r#"wdp_allocations_total{resource="example.com/gpu",outcome="invalid_argument"} 1"#
        ));
        assert!(
            page.contains(r#"wdp_allocate_duration_seconds_count{resource="example.com/gpu"} 3"#)
        );
        // 80 µs falls in the 100 µs bucket (25, 50, 100, ...), as do all three.
        assert!(page.contains(
            r#"wdp_allocate_duration_seconds_bucket{le="0.0001",resource="example.com/gpu"} 3"#
        ));
        assert!(page.ends_with("# EOF\n"));
    }

    #[test]
    fn device_counts_go_with_their_resource() {
        let metrics = Arc::new(Metrics::new());
        let gpu = metrics.resource("example.com/gpu");
        gpu.set_devices(3, 1);
        let page = metrics.render();
        assert!(page.contains(r#"wdp_devices{resource="example.com/gpu",health="Healthy"} 3"#));
        assert!(page.contains(r#"wdp_devices{resource="example.com/gpu",health="Unhealthy"} 1"#));
        gpu.forget_devices();
        assert!(!metrics.render().contains("wdp_devices{"));
    }

    #[test]
    fn module_states_are_all_reported_zero_or_not() {
        let metrics = Metrics::new();
        metrics.set_module_states(&[("serving", 2), ("failed", 1)]);
        let page = metrics.render();
        assert!(page.contains(r#"wdp_modules{state="serving"} 2"#));
        assert!(page.contains(r#"wdp_modules{state="failed"} 1"#));
        assert!(page.contains(r#"wdp_modules{state="loading"} 0"#));
        metrics.set_module_states(&[]);
        assert!(
            metrics
                .render()
                .contains(r#"wdp_modules{state="serving"} 0"#)
        );
    }

    #[test]
    fn a_forgotten_module_leaves_no_series() {
        let metrics = Arc::new(Metrics::new());
        let module = metrics.module("virtual");
        module.called(Function::PostAllocate, Duration::from_micros(5));
        module.failed(Function::Scan, CallFailureKind::Deadline);
        let page = metrics.render();
        assert!(page.contains(
            r#"wdp_guest_call_duration_seconds_count{module="virtual",function="post-allocate"} 1"#
        ));
        assert!(page.contains(
            r#"wdp_guest_call_failures_total{module="virtual",function="scan",reason="deadline"} 1"#
        ));
        metrics.forget_module("virtual");
        assert!(!metrics.render().contains(r#"module="virtual""#));
    }
}
