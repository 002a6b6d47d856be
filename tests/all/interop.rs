//! Device-plugin clients other than kubelet: a Python grpcio client (gRPC C-core)
//! on a plugin socket the host serves.
//!
//! Over a unix socket kubelet (grpc-go) sends `:authority: localhost`, but gRPC
//! C-core since 1.57 (Python grpcio, C++, Ruby) sends the socket path,
//! percent-encoded without its leading `/` (`tmp%2Fwdp...%2Fx.sock`). h2 parses
//! `:authority` with the `http` crate, which refuses a `%` in the host, and resets
//! the stream (PROTOCOL_ERROR) before tonic or the service sees the request
//! (`h2::server`, `convert_poll_message`). Neither h2, hyper nor tonic has a
//! setting to accept it (upstream: hyperium/h2#487, open), so such a client has
//! to name its authority; the README's Troubleshooting section says how. These
//! tests pin both halves of what it says: the default client is refused, and the
//! same client with `grpc.default_authority = localhost` is served. (Should h2
//! come to accept such authorities, the first test fails: update the README.)
//!
//! The client is `tests/interop/device_plugin_client.py`; it generates its stubs
//! from `proto/` with grpcio-tools into a temporary directory. It runs on the
//! Python that `WDP_GRPC_PYTHON` names, else on the venv `cargo xtask test`
//! installs grpcio and grpcio-tools into (`target/py`). Without one the tests
//! skip, saying so on stderr; with `CI` set they fail instead.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::process::Command;
use wdp_tests::{Dirs, Fixture, WAIT, guests, ids};

const DEV1: &str = "example.com/dev-1";
/// Names the Python to run the client with, instead of [`VENV_PYTHON`].
const PYTHON_ENV: &str = "WDP_GRPC_PYTHON";
/// The venv's Python, relative to the workspace root; `cargo xtask test`
/// installs the pinned grpcio and grpcio-tools there.
const VENV_PYTHON: &str = "target/py/bin/python";
/// The client, relative to the workspace root.
const CLIENT: &str = "tests/interop/device_plugin_client.py";

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
}

/// Whether the tests run in CI, where a missing tool is a failure (as `cargo
/// xtask test` reads `CI`).
fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// The Python with grpcio and grpcio-tools; `None`, after saying so, when there
/// is none and this is not CI.
///
/// # Panics
/// There is none and `CI` is set.
async fn grpc_python() -> Option<PathBuf> {
    let python = std::env::var_os(PYTHON_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(VENV_PYTHON));
    let usable = Command::new(&python)
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .kill_on_drop(true)
        .output()
        .await
        .is_ok_and(|out| out.status.success());
    if usable {
        return Some(python);
    }
    let why = format!(
        "{} cannot import grpc and grpc_tools: run the tests with `cargo xtask test`, \
         which installs grpcio and grpcio-tools into target/py, or set {PYTHON_ENV} \
         to a Python that has them",
        python.display()
    );
    assert!(!in_ci(), "{why}");
    eprintln!("SKIPPED (the Python grpcio client): {why}");
    None
}

/// Serves the virtual-devices guest and waits until [`DEV1`] is listed; returns
/// the fixture and the path of [`DEV1`]'s socket.
async fn serving_dev1() -> (Fixture, PathBuf) {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    let fixture = Fixture::start(dirs);
    let view = fixture.listed(DEV1).await;
    let socket = fixture
        .dirs
        .kubelet()
        .join(&view.plugins[DEV1].registration.endpoint);
    (fixture, socket)
}

/// Runs the client on `socket` (with `authority` as `grpc.default_authority`
/// if given) and returns what it printed.
async fn run_client(python: &Path, socket: &Path, authority: Option<&str>) -> Value {
    let root = workspace_root();
    let mut cmd = Command::new(python);
    cmd.arg(root.join(CLIENT))
        .arg(root.join("proto"))
        .arg(socket)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true);
    if let Some(authority) = authority {
        cmd.args(["--authority", authority]);
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the Python client finishes in time")
        .expect("the Python client runs");
    assert!(
        out.status.success(),
        "the Python client failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the Python client printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn grpcio_client_with_its_default_authority_is_refused_with_a_stream_reset() {
    let Some(python) = grpc_python().await else {
        return;
    };
    let (fixture, socket) = serving_dev1().await;
    let got = run_client(&python, &socket, None).await;
    // C-core reports a stream reset with PROTOCOL_ERROR as INTERNAL; the first
    // call already fails.
    assert_eq!(got["error"], "INTERNAL", "{got}");
    assert_eq!(got["call"], "GetDevicePluginOptions", "{got}");
    fixture.stop().await;
}

#[tokio::test]
async fn grpcio_client_with_localhost_authority_reads_options_and_devices() {
    let Some(python) = grpc_python().await else {
        return;
    };
    let (fixture, socket) = serving_dev1().await;
    let got = run_client(&python, &socket, Some("localhost")).await;
    assert_eq!(
        got["options"],
        json!({"pre_start_required": false, "get_preferred_allocation_available": true}),
        "{got}"
    );
    let expected: Vec<Value> = ids(&fixture.kubelet.view(), DEV1)
        .into_iter()
        .map(|id| json!({"id": id, "health": "Healthy"}))
        .collect();
    assert_eq!(expected.len(), 4, "the guest's default dev-1 devices");
    assert_eq!(got["devices"], Value::Array(expected), "{got}");
    fixture.stop().await;
}
