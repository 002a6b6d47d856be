//! Support for the end-to-end tests: the guests built by `build.rs`, and a fixture
//! that runs the real host against the kubelet simulator over real unix sockets in
//! a temporary directory.

/// The `ApiServer` fixture: a real etcd and kube-apiserver (a crate of its own, so that
/// `cargo xtask demo` runs it without building the test fixtures).
pub use wdp_apiserver as apiserver;
pub mod dra;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use wasm_device_plugin::app::{Host, HostConfig};
use wasm_device_plugin::kubelet::deviceplugin::simulator::{
    KubeletView, Simulator, SimulatorError,
};
use wasm_device_plugin::registry::{ModuleState, ModuleStates, Settings};
use wasm_device_plugin::runtime::Limits;

/// The ids `resource` advertises in the simulator's `view`.
pub fn ids(view: &KubeletView, resource: &str) -> Vec<String> {
    view.plugin(resource)
        .map(|p| p.devices.iter().map(|d| d.id.clone()).collect())
        .unwrap_or_default()
}

/// The health kubelet was last told for device `id` of `resource` in `view`.
pub fn health_of<'a>(view: &'a KubeletView, resource: &str, id: &str) -> Option<&'a str> {
    view.plugin(resource)?
        .devices
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.health.as_str())
}

/// The socket files (other than `kubelet.sock`) in `dir`.
pub fn plugin_sockets(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut sockets: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("kubelet dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()) && e.file_name() != "kubelet.sock")
        .map(|e| e.path())
        .collect();
    sockets.sort();
    sockets
}

/// Paths of the guests built for these tests.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// Modules committed as built by an earlier version of this project, to show
/// that the host still runs them (see `tests/fixtures/README.md`).
pub mod fixtures {
    /// `guests/virtual-devices` as built against `wasm-device-plugin:device@0.2.0`.
    pub const VIRTUAL_DEVICES_0_2_0: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/wdp-0.2.0/virtual_devices.wasm"
    );
    /// `guests/virtual-devices` as built against `wasm-device-plugin:device@0.2.1`
    /// (no DRA exports).
    pub const VIRTUAL_DEVICES_0_2_1: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/wdp-0.2.1/virtual_devices.wasm"
    );
}

/// The outer bound of every wait in the tests. Waits end as soon as their
/// condition holds; this only stops a broken test from hanging.
pub const WAIT: Duration = Duration::from_secs(30);

/// The gRPC code and message of a call that the plugin refused; panics on any
/// other outcome.
pub fn status_of<T: std::fmt::Debug>(result: Result<T, SimulatorError>) -> (tonic::Code, String) {
    match result {
        Err(SimulatorError::Status(status)) => (status.code(), status.message().to_string()),
        other => panic!("expected an error status from the plugin, got {other:?}"),
    }
}

/// Logs to the test's captured output (once per process); `RUST_LOG` filters.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "wasm_device_plugin=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A modules directory and a kubelet directory, both temporary.
pub struct Dirs {
    /// Holds both directories; dropping it deletes them (after the host stopped).
    pub root: TempDir,
}

impl Dirs {
    /// Creates `modules/` and `kubelet/` in a new temporary directory.
    pub fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("wdp")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir(root.path().join("modules")).expect("modules dir");
        std::fs::create_dir(root.path().join("kubelet")).expect("kubelet dir");
        std::fs::create_dir(root.path().join("cdi")).expect("CDI dir");
        Self { root }
    }

    /// The modules directory.
    pub fn modules(&self) -> PathBuf {
        self.root.path().join("modules")
    }

    /// The kubelet directory.
    pub fn kubelet(&self) -> PathBuf {
        self.root.path().join("kubelet")
    }

    /// The CDI spec directory ([`test_settings`] names it for the host).
    pub fn cdi(&self) -> PathBuf {
        self.root.path().join("cdi")
    }

    /// Copies `wasm` into the modules directory as `<name>.wasm`.
    pub fn add_module(&self, name: &str, wasm: &str) {
        std::fs::copy(wasm, self.modules().join(format!("{name}.wasm"))).expect("copy module");
    }

    /// Writes `bytes` into the modules directory as `file`.
    pub fn write_module(&self, file: &str, bytes: &[u8]) {
        std::fs::write(self.modules().join(file), bytes).expect("write module");
    }

    /// Replaces `<name>.wasm` with `wasm` the way careful tools do: copy to a
    /// hidden temporary file, then rename over the module.
    pub fn replace_module(&self, name: &str, wasm: &str) {
        let tmp = self.modules().join(format!(".{name}.wasm.tmp"));
        std::fs::copy(wasm, &tmp).expect("copy module");
        std::fs::rename(&tmp, self.modules().join(format!("{name}.wasm"))).expect("rename module");
    }

    /// Deletes `<name>.wasm`.
    pub fn remove_module(&self, name: &str) {
        std::fs::remove_file(self.modules().join(format!("{name}.wasm"))).expect("remove module");
    }

    /// Writes the manifest `<module>.toml`.
    pub fn write_manifest(&self, module: &str, text: &str) {
        std::fs::write(self.modules().join(format!("{module}.toml")), text)
            .expect("write manifest");
    }
}

impl Default for Dirs {
    fn default() -> Self {
        Self::new()
    }
}

/// A manifest with `extra` (TOML, may be empty) and a `[config]` table of
/// `pairs` (written last, as TOML requires of a table after top-level keys).
pub fn manifest_with_config(extra: &str, pairs: &[(&str, &str)]) -> String {
    let mut text = extra.trim_end().to_string();
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str("[config]\n");
    for (key, value) in pairs {
        text.push_str(&format!("{} = {}\n", toml_string(key), toml_string(value)));
    }
    text
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Settings for tests: health checked every 50 ms, no scheduled re-scan during a
/// test, default limits, CDI specs in `cdi/` beside the kubelet directory (as
/// [`Dirs`] lays them out; never the node's `/var/run/cdi`).
pub fn test_settings(kubelet_dir: &Path) -> Settings {
    Settings {
        kubelet_dir: kubelet_dir.to_path_buf(),
        cdi_dir: kubelet_dir.with_file_name("cdi"),
        default_domain: "example.com".into(),
        health_interval: Duration::from_millis(50),
        scan_interval: Duration::from_secs(3600),
        limits: Limits::default(),
    }
}

/// How long a test waits for a module file written without being closed to
/// settle. Long, so that a test holding a file open mid-write is never read early.
pub const TEST_SETTLE: Duration = Duration::from_secs(10);

/// The host configuration for `dirs` with `settings`: no compiled-module cache.
pub fn host_config(dirs: &Dirs, settings: Settings) -> HostConfig {
    HostConfig {
        modules_dir: dirs.modules(),
        cache_dir: None,
        settle: TEST_SETTLE,
        settings,
        dra: wasm_device_plugin::app::DraConfig::default(),
    }
}

/// Starts the host alone on `dirs` with [`test_settings`]: no kubelet yet (the
/// test starts one when it wants). Cancel the token and stop the host to end it.
pub fn start_host_without_kubelet(dirs: &Dirs) -> (Host, CancellationToken) {
    init_logging();
    let shutdown = CancellationToken::new();
    let host = Host::start(host_config(dirs, test_settings(&dirs.kubelet())), &shutdown)
        .expect("host starts without kubelet");
    (host, shutdown)
}

/// The host and a simulated kubelet, running on the directories in `dirs`.
pub struct Fixture {
    /// The simulated kubelet.
    pub kubelet: Simulator,
    /// The host under test.
    pub host: Host,
    shutdown: CancellationToken,
    /// Kept so the directories outlive the host.
    pub dirs: Dirs,
}

impl Fixture {
    /// Starts the kubelet simulator, then the host with `settings`.
    pub fn start_with(dirs: Dirs, settings: Settings) -> Self {
        let config = host_config(&dirs, settings);
        Self::start_config(dirs, config)
    }

    /// Starts the kubelet simulator, then the host with `config`.
    pub fn start_config(dirs: Dirs, config: HostConfig) -> Self {
        init_logging();
        let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet simulator");
        let shutdown = CancellationToken::new();
        let host = Host::start(config, &shutdown).expect("host starts");
        Self {
            kubelet,
            host,
            shutdown,
            dirs,
        }
    }

    /// Starts with [`test_settings`].
    pub fn start(dirs: Dirs) -> Self {
        let settings = test_settings(&dirs.kubelet());
        Self::start_with(dirs, settings)
    }

    /// Writes the manifest `<module>.toml` as an operator does, and waits until
    /// the host runs the module with it (reconfigured and re-scanned).
    pub async fn apply_manifest(&self, module: &str, text: &str) {
        self.dirs.write_manifest(module, text);
        let hash = wasm_device_plugin::runtime::cache::content_hash(text.as_bytes());
        let mut versions = self.host.versions();
        let applied = tokio::time::timeout(
            WAIT,
            versions.wait_for(|v| {
                v.get(module)
                    .is_some_and(|m| m.manifest_sha256.as_deref() == Some(hash.as_str()))
            }),
        )
        .await;
        if !matches!(applied, Ok(Ok(_))) {
            panic!(
                "module {module} never ran with the new manifest; versions: {:?}, refusals: {:?}",
                *self.host.versions().borrow(),
                *self.host.refusals().borrow()
            );
        }
    }

    /// Sets module `module`'s `[config]` to `pairs` as an operator does: by
    /// rewriting its manifest, keeping what the manifest says before its
    /// `[config]` table (the tests write that table last); waits until the host
    /// runs with it.
    pub async fn set_config(&self, module: &str, pairs: &[(&str, &str)]) {
        let path = self.dirs.modules().join(format!("{module}.toml"));
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        let base = current
            .find("[config]")
            .map_or(current.as_str(), |at| &current[..at]);
        let text = manifest_with_config(base, pairs);
        self.apply_manifest(module, &text).await;
    }

    /// Waits until every module has finished loading.
    pub async fn settled(&self) -> ModuleStates {
        self.host.settled(WAIT).await.expect("modules settle")
    }

    /// Waits until the kubelet simulator's view satisfies `condition`.
    pub async fn wait_for(
        &self,
        what: &str,
        condition: impl FnMut(&KubeletView) -> bool,
    ) -> KubeletView {
        match self.kubelet.wait_for(WAIT, what, condition).await {
            Ok(view) => view,
            Err(err) => panic!("{err}; the simulator saw: {:#?}", self.kubelet.view()),
        }
    }

    /// Waits until `resource` is registered and has sent a list.
    pub async fn listed(&self, resource: &str) -> KubeletView {
        self.wait_for(&format!("{resource} listed"), |v| {
            v.plugin(resource)
                .is_some_and(|p| p.streaming && !p.updates.is_empty())
        })
        .await
    }

    /// Waits until the module `name` is in a state for which `condition` holds.
    pub async fn module_state(
        &self,
        name: &str,
        mut condition: impl FnMut(Option<&ModuleState>) -> bool,
    ) -> Option<ModuleState> {
        let mut states = self.host.states();
        match tokio::time::timeout(WAIT, states.wait_for(|s| condition(s.get(name)))).await {
            Ok(Ok(s)) => s.get(name).cloned(),
            _ => panic!(
                "module {name} never reached the state waited for; states: {:?}",
                *self.host.states().borrow()
            ),
        }
    }

    /// Waits until module `name` has had `count` refusals in all (refused files
    /// or failing checks); returns the last reason.
    pub async fn refused(&self, name: &str, count: usize) -> String {
        let mut refusals = self.host.refusals();
        let found = tokio::time::timeout(
            WAIT,
            refusals.wait_for(|r| r.iter().filter(|r| r.module == name).count() >= count),
        )
        .await;
        match found {
            Ok(Ok(r)) => r
                .iter()
                .rev()
                .find(|r| r.module == name)
                .map(|r| r.reason.clone())
                .unwrap_or_default(),
            _ => panic!(
                "module {name} was not refused {count} times: {:?}",
                *self.host.refusals().borrow()
            ),
        }
    }

    /// Serves the host's `/metrics`, `/healthz` and `/readyz` on a free port
    /// until the fixture stops; returns the address.
    pub async fn serve_endpoints(&self) -> SocketAddr {
        serve_endpoints(&self.host, &self.shutdown).await
    }

    /// The host's metrics page, as Prometheus scrapes it.
    pub async fn scrape(&self, addr: SocketAddr) -> String {
        let (status, page) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "/metrics answers: {page}");
        page
    }

    /// Stops the host (sockets removed), then the kubelet.
    pub async fn stop(self) -> Dirs {
        self.shutdown.cancel();
        self.host.stop().await;
        self.kubelet.stop().await;
        self.dirs
    }
}

/// Serves `host`'s `/metrics`, `/healthz` and `/readyz` on a free port of
/// 127.0.0.1 until `shutdown` is cancelled (or the runtime ends); returns the
/// address. Bound before it returns, so the first request never races the server.
pub async fn serve_endpoints(host: &Host, shutdown: &CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(wasm_device_plugin::metrics::serve(
        listener,
        host.metrics(),
        host.probes(),
        shutdown.child_token(),
    ));
    addr
}

/// `GET path` over HTTP/1.1, as a scraper or kubelet's probe does; returns the
/// status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read answer");
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    // Small bodies only: axum sends them whole, with a Content-Length.
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "unexpected chunked answer: {head}"
    );
    (status, body.to_string())
}

/// The value of the sample `name{labels}` in a metrics page (labels in the
/// order the host writes them), if there is one.
pub fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let series = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{}}} ", labels.join(","))
    };
    page.lines().find_map(|l| l.strip_prefix(&series)).map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {l}", l = v))
    })
}
