//! Project tasks, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`):
//!
//! - `demo`: builds the shipped guests and runs `wasm-device-plugin demo` on them,
//!   with a throwaway etcd and kube-apiserver (built with Go as for `test`, run by
//!   `wdp-apiserver`, the tests' fixture as a process) for the demo's DRA half;
//! - `test`: installs what the tests need (the `wasm32-wasip2` target, and in a
//!   venv at `target/py` componentize-py for the Python guest and grpcio with
//!   grpcio-tools for the Python gRPC client) and runs every
//!   test: the test crate (which builds the guests itself), the guests' own unit
//!   tests, and the walkthrough of `docs/writing-a-guest.md` (`guide`). It builds
//!   kube-apiserver and etcd with Go too (as `e2e` does, into the same cache) for the
//!   tests that run the host against a real API server. With `CI`
//!   set it also checks formatting and denies clippy warnings;
//! - `guests`: builds the shipped guests into `target/modules/`;
//! - `dist OUT [--release] [--locked]`: builds the host and the shipped guests and
//!   lays them out under `OUT` as the container image holds them
//!   (`usr/local/bin/wasm-device-plugin`, `etc/wasm-device-plugin/modules/` with each
//!   guest's manifest from `examples/modules/`); `deploy/Dockerfile` runs it. `test`
//!   stages into `target/dist` and checks the result;
//! - `guide`: runs the walkthrough of `docs/writing-a-guest.md` as written;
//! - `bench`: runs every benchmark (`host/benches/`) in the bench profile with the
//!   Go peer of `../shared/peer` unpacked into `target/peer`, and writes their
//!   figures into `BENCHMARKS.md`;
//! - `e2e [--release]`: the host on a real one-node Kubernetes cluster on this machine,
//!   deployed by its own DaemonSet; needs root (see `e2e/mod.rs`);
//! - `fuzz [--seconds N]`: runs the property tests of `host/tests/fuzz.rs` for about
//!   N seconds (default 180), shared evenly among the properties.
//!
//! Needs rustup and cargo; `test` and `fuzz` also need `python3` with its `venv`
//! module (the test crate builds the Python guest, and `test` runs a Python gRPC
//! client); `test` and `demo` also need Go and openssl (the API server's build and
//! certificates; without Go, outside CI, the tests that need the API server and the
//! demo's DRA half are skipped, saying so).

mod e2e;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const WASM_TARGET: &str = "wasm32-wasip2";
/// The componentize-py that builds the Python guest, pinned: its output embeds a
/// CPython and a WASI version that the tests were written against.
const COMPONENTIZE_PY_VERSION: &str = "0.25.1";
/// The venv `ensure_componentize_py` and `ensure_grpcio` install into;
/// `tests/build.rs` and `tests/all/interop.rs` look there.
const PY_VENV: &str = "target/py";
/// The Python gRPC client that `tests/all/interop.rs` runs against the host,
/// pinned: C-core's default `:authority` over unix sockets (what that test is
/// about) has changed between releases. grpcio-tools generates its stubs from
/// `proto/` with its bundled protoc, and is released in step with grpcio.
const GRPCIO_VERSION: &str = "1.85.1";
/// Name the kube-apiserver and etcd binaries the test crate's `ApiServer` fixture
/// runs (`tests/apiserver/src/lib.rs` reads them); `test` sets them unless they are set.
const KUBE_APISERVER_ENV: &str = "WDP_KUBE_APISERVER";
const ETCD_ENV: &str = "WDP_ETCD";
/// How long `cargo xtask fuzz` runs without `--seconds`.
const FUZZ_SECONDS: u64 = 180;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((task, rest)) => (task.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match task {
        "demo" => demo(rest),
        "test" => test(rest),
        "guests" => guests().map(|dir| println!("guests built into {}", dir.display())),
        "dist" => dist_task(rest),
        "bench" => bench(rest),
        "fuzz" => fuzz(rest),
        "guide" => guide(),
        "e2e" => e2e::e2e(rest),
        _ => {
            eprintln!("usage: cargo xtask <demo|test|guests|dist|bench|guide|fuzz|e2e> [args...]");
            eprintln!(
                "  demo    build the shipped guests and run `wasm-device-plugin demo` on them, with a throwaway kube-apiserver for its DRA half"
            );
            eprintln!(
                "  test    install the wasm target, componentize-py and grpcio, run every test (args go to `cargo test`)"
            );
            eprintln!("  guests  build the shipped guests into target/modules/");
            eprintln!(
                "  dist    OUT [--release] [--locked]: build the host and the shipped guests, laid out under OUT as in the image"
            );
            eprintln!(
                "  bench   run the benchmarks (with the Go peer of ../shared/peer) and write BENCHMARKS.md"
            );
            eprintln!(
                "  guide   run every `sh` block of docs/writing-a-guest.md, in order, as written"
            );
            eprintln!(
                "  e2e     [--release]: run the host's DaemonSet on a real one-node Kubernetes cluster on this machine (root)"
            );
            eprintln!(
                "  fuzz    run the property tests for --seconds N (default {FUZZ_SECONDS}), printing cases per property"
            );
            return if task == "help" || task == "--help" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask {task}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

/// Installs the wasm target through rustup unless it is there already.
fn ensure_wasm_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| format!("rustup is needed to install the {WASM_TARGET} target: {e}"))?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))
}

/// Installs componentize-py (pinned) into the venv at `target/py` unless that
/// version is there already. `WDP_COMPONENTIZE_PY` names another one instead, and
/// then nothing is installed.
fn ensure_componentize_py() -> Result<(), String> {
    if std::env::var_os("WDP_COMPONENTIZE_PY").is_some() {
        return Ok(());
    }
    let venv = root().join(PY_VENV);
    let tool = venv.join("bin/componentize-py");
    let version = Command::new(&tool)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if version == format!("componentize-py {COMPONENTIZE_PY_VERSION}") {
        return Ok(());
    }
    pip_install(&[&format!("componentize-py=={COMPONENTIZE_PY_VERSION}")])
}

/// Installs grpcio and grpcio-tools (pinned) into the venv at `target/py` unless
/// those versions are there already. `WDP_GRPC_PYTHON` names another Python
/// instead, and then nothing is installed.
fn ensure_grpcio() -> Result<(), String> {
    if std::env::var_os("WDP_GRPC_PYTHON").is_some() {
        return Ok(());
    }
    let python = root().join(PY_VENV).join("bin/python");
    let versions = Command::new(&python)
        .args([
            "-c",
            "from importlib.metadata import version as v; print(v('grpcio'), v('grpcio-tools'))",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if versions == format!("{GRPCIO_VERSION} {GRPCIO_VERSION}") {
        return Ok(());
    }
    pip_install(&[
        &format!("grpcio=={GRPCIO_VERSION}"),
        &format!("grpcio-tools=={GRPCIO_VERSION}"),
    ])
}

/// The kube-apiserver and etcd for the tests, as (variable, path) pairs to run
/// `cargo test` with: those `WDP_KUBE_APISERVER` and `WDP_ETCD` name, else built with
/// Go into the e2e's cache ([`e2e::build_control_plane`]). Without Go the answer is
/// empty and the tests that need them skip, saying so, unless `ci` (then an error).
fn ensure_control_plane(ci: bool) -> Result<Vec<(&'static str, PathBuf)>, String> {
    if let (Some(apiserver), Some(etcd)) = (
        std::env::var_os(KUBE_APISERVER_ENV),
        std::env::var_os(ETCD_ENV),
    ) {
        return Ok(vec![
            (KUBE_APISERVER_ENV, apiserver.into()),
            (ETCD_ENV, etcd.into()),
        ]);
    }
    if !ci && Command::new("go").arg("version").output().is_err() {
        eprintln!(
            "xtask: Go is not installed, so kube-apiserver and etcd cannot be built: \
             what needs an API server is skipped (the tests that need one, the demo's DRA \
             half; set {KUBE_APISERVER_ENV} and {ETCD_ENV} to run them with binaries built \
             elsewhere)"
        );
        return Ok(Vec::new());
    }
    let (apiserver, etcd) = e2e::build_control_plane()?;
    Ok(vec![(KUBE_APISERVER_ENV, apiserver), (ETCD_ENV, etcd)])
}

/// Whether this runs in CI (`CI` set, neither empty nor `false`): formatting and
/// clippy are checked, and a missing Go fails instead of skipping.
fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Installs `packages` into the venv at `target/py`, creating it if needed.
fn pip_install(packages: &[&str]) -> Result<(), String> {
    let venv = root().join(PY_VENV);
    if !venv.join("bin/pip").is_file() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).map_err(|e| {
            format!("{e}\n(the tests' Python guest and client need python3 with its venv module, e.g. the python3-venv package)")
        })?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages))
}

/// Builds the guests workspace and copies each component into `target/modules/`.
fn guests() -> Result<PathBuf, String> {
    build_guests(&[])
}

/// [`guests`], with `cargo_args` added to the guests' `cargo build`.
fn build_guests(cargo_args: &[&str]) -> Result<PathBuf, String> {
    ensure_wasm_target()?;
    let root = root();
    let target_dir = root.join("target/guests");
    run(cargo()
        .args([
            "build",
            "--release",
            "--target",
            WASM_TARGET,
            "--manifest-path",
        ])
        .arg(root.join("guests/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .args(cargo_args))?;
    let built = target_dir.join(WASM_TARGET).join("release");
    let modules = root.join("target/modules");
    // Start empty: the test fixtures share target/guests and must never be shipped.
    if modules.exists() {
        std::fs::remove_dir_all(&modules)
            .map_err(|e| format!("cannot clear {}: {e}", modules.display()))?;
    }
    std::fs::create_dir_all(&modules)
        .map_err(|e| format!("cannot create {}: {e}", modules.display()))?;
    for name in shipped_guests(&root.join("guests"))? {
        let file = format!("{}.wasm", name.replace('-', "_"));
        let from = built.join(&file);
        std::fs::copy(&from, modules.join(&file))
            .map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    }
    Ok(modules)
}

/// The crates of the guests workspace: its subdirectories with a `Cargo.toml`
/// and a `cdylib` (a guest), by directory name.
fn shipped_guests(dir: &Path) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?
    {
        let path = entry.map_err(|e| e.to_string())?.path();
        let manifest = path.join("Cargo.toml");
        let is_guest = std::fs::read_to_string(&manifest).is_ok_and(|m| m.contains("cdylib"));
        if is_guest {
            names.push(
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    names.sort();
    Ok(names)
}

/// Where `dist` puts the host binary inside OUT: the image's path.
const DIST_BIN: &str = "usr/local/bin/wasm-device-plugin";
/// Where `dist` puts the modules inside OUT: the host's default `--modules-dir`,
/// so the image serves them with no flag and no volume.
const DIST_MODULES: &str = "etc/wasm-device-plugin/modules";
/// The example modules directory: `<module>.toml` for each shipped guest, the
/// manifests `dist` puts beside the guests.
const EXAMPLE_MODULES: &str = "examples/modules";
/// Where `cargo xtask test` stages a dist to check it.
const TEST_DIST: &str = "target/dist";

/// `cargo xtask dist OUT [--release] [--locked]`.
fn dist_task(args: &[String]) -> Result<(), String> {
    const USAGE: &str = "usage: cargo xtask dist OUT [--release] [--locked]";
    let mut out = None;
    let (mut release, mut locked) = (false, false);
    for arg in args {
        match arg.as_str() {
            "--release" => release = true,
            "--locked" => locked = true,
            flag if flag.starts_with('-') => {
                return Err(format!("unknown argument `{flag}` ({USAGE})"));
            }
            dir if out.is_none() => out = Some(PathBuf::from(dir)),
            extra => return Err(format!("unexpected argument `{extra}` ({USAGE})")),
        }
    }
    let out = out.ok_or(USAGE)?;
    dist(&out, release, locked)?;
    println!("staged into {}", out.display());
    Ok(())
}

/// Builds the host (the release profile with `release`, else the dev profile)
/// and the shipped guests, and lays them out under `out` as the container image
/// holds them: [`DIST_BIN`], and in [`DIST_MODULES`] each guest's
/// `<module>.wasm` with its `<module>.toml` from [`EXAMPLE_MODULES`]. `locked`
/// passes `--locked` to both builds (the image build uses it: the lock files
/// decide the dependencies, not whatever is newest that day).
///
/// The modules directory in `out` is emptied first, so a module left from an
/// earlier run is never shipped. A shipped guest without a manifest in
/// [`EXAMPLE_MODULES`] is an error: the image's settings for each guest are
/// chosen, not defaulted by omission (an empty file gives the defaults).
fn dist(out: &Path, release: bool, locked: bool) -> Result<(), String> {
    let locked_arg: &[&str] = if locked { &["--locked"] } else { &[] };
    run(cargo()
        .args([
            "build",
            "--package",
            "wasm-device-plugin",
            "--bin",
            "wasm-device-plugin",
        ])
        .args(if release { &["--release"][..] } else { &[] })
        .args(locked_arg))?;
    let binary = target_dir()?
        .join(if release { "release" } else { "debug" })
        .join("wasm-device-plugin");
    let built = build_guests(locked_arg)?;

    let bin_to = out.join(DIST_BIN);
    let modules_to = out.join(DIST_MODULES);
    if modules_to.exists() {
        std::fs::remove_dir_all(&modules_to)
            .map_err(|e| format!("cannot clear {}: {e}", modules_to.display()))?;
    }
    for dir in [bin_to.parent().unwrap_or(out), &modules_to] {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    // Replaced, not written over: the old file may be running (a write would
    // fail with "text file busy").
    if bin_to.exists() {
        std::fs::remove_file(&bin_to)
            .map_err(|e| format!("cannot replace {}: {e}", bin_to.display()))?;
    }
    copy(&binary, &bin_to)?;
    let examples = root().join(EXAMPLE_MODULES);
    for (name, wasm) in wasm_files(&built)? {
        let manifest = examples.join(format!("{name}.toml"));
        if !manifest.is_file() {
            return Err(format!(
                "the shipped guest `{name}` has no manifest {}: add one (an empty file gives the defaults)",
                manifest.display()
            ));
        }
        copy(&wasm, &modules_to.join(format!("{name}.wasm")))?;
        copy(&manifest, &modules_to.join(format!("{name}.toml")))?;
    }
    Ok(())
}

/// Checks a dist staged by [`dist`] in `out`: the binary runs and is this
/// version, and the host's own `validate` accepts every staged module with the
/// manifest beside it (it loads the module as the host would and runs a first
/// scan in the sandbox), so the image would serve each one.
fn check_dist(out: &Path) -> Result<(), String> {
    let binary = out.join(DIST_BIN);
    let host = || {
        let mut cmd = Command::new(&binary);
        // Judge the staged files alone, not this shell's settings.
        for var in ["WDP_DOMAIN", "WDP_KUBELET_DIR", "WDP_LOG", "RUST_LOG"] {
            cmd.env_remove(var);
        }
        cmd
    };
    let version = output(host().arg("--version"))?;
    let expected = format!("wasm-device-plugin {}", env!("CARGO_PKG_VERSION"));
    if version.trim() != expected {
        return Err(format!(
            "{} --version printed {:?}, expected {expected:?}",
            binary.display(),
            version.trim()
        ));
    }
    let modules = wasm_files(&out.join(DIST_MODULES))?;
    let shipped = shipped_guests(&root().join("guests"))?;
    if modules.len() != shipped.len() {
        return Err(format!(
            "{} holds {} module(s), expected one per shipped guest ({})",
            out.join(DIST_MODULES).display(),
            modules.len(),
            shipped.join(", ")
        ));
    }
    for (name, wasm) in &modules {
        output(host().arg("validate").arg(wasm)).map_err(|e| {
            format!("the staged module `{name}` would not be served by the staged host: {e}")
        })?;
        eprintln!("dist: {} validates", wasm.display());
    }
    Ok(())
}

/// The `*.wasm` files directly in `dir`, as (module name, path), sorted.
fn wasm_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?
    {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|ext| ext == "wasm") {
            let name = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            files.push((name, path));
        }
    }
    files.sort();
    Ok(files)
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))
}

/// Runs `cmd`, returning its stdout; on failure, an error with its stderr.
fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The workspace's target directory, as cargo resolves it (`CARGO_TARGET_DIR`,
/// `build.target-dir` in a config file, else `target/`).
fn target_dir() -> Result<PathBuf, String> {
    let metadata = output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    // xtask has no dependencies, so no JSON parser: the value is a plain string,
    // and a path that JSON had to escape is refused rather than misread.
    let key = "\"target_directory\":\"";
    let value = metadata
        .split_once(key)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(value, _)| value)
        .ok_or("`cargo metadata` names no target_directory")?;
    if value.contains('\\') {
        return Err(format!(
            "cannot read the target directory {value:?} from `cargo metadata`"
        ));
    }
    Ok(PathBuf::from(value))
}

/// Builds the shipped guests and runs `wasm-device-plugin demo` on them with
/// `extra` arguments; with an API server of its own (`wdp-apiserver`, the tests'
/// fixture: etcd and kube-apiserver, built with Go on first use) passed as
/// `--kubeconfig`, so that the demo shows the DRA half too. The API server is
/// stopped afterwards, whatever the demo's outcome.
fn demo(extra: &[String]) -> Result<(), String> {
    let modules = guests()?;
    let ci = in_ci();
    let mut host_demo = cargo();
    host_demo
        .args([
            "run",
            "--quiet",
            "--package",
            "wasm-device-plugin",
            "--",
            "demo",
            "--modules-dir",
        ])
        .arg(modules);
    eprintln!(
        "demo: kube-apiserver and etcd for the DRA half: those {KUBE_APISERVER_ENV} and \
         {ETCD_ENV} name, else built with Go into target/e2e/bin unless there already (a \
         cold build takes several minutes)"
    );
    let control_plane = ensure_control_plane(ci)?;
    if control_plane.is_empty() {
        eprintln!("demo: no kube-apiserver and etcd: the demo runs without its DRA half");
        return run(host_demo.args(extra));
    }
    eprintln!("demo: starting etcd and kube-apiserver (wdp-apiserver: the tests' fixture)");
    let apiserver = DemoApiServer::start(control_plane)?;
    let result = run(host_demo
        .arg("--kubeconfig")
        .arg(&apiserver.kubeconfig)
        .args(extra));
    let stopped = apiserver.stop();
    result.and(stopped)
}

/// `wdp-apiserver` (the tests' `ApiServer` fixture as a process) running for the demo: it prints its kubeconfig
/// once the API server is ready, and stops etcd and kube-apiserver when its stdin
/// closes. Dropped without [`DemoApiServer::stop`] (an early return, a panic), it
/// is still stopped.
struct DemoApiServer {
    child: std::process::Child,
    kubeconfig: PathBuf,
}

impl DemoApiServer {
    /// Builds and starts `wdp-apiserver` with `env` (the control plane's binaries)
    /// and waits until it prints the kubeconfig (it gives up by itself if the API
    /// server does not start).
    fn start(env: Vec<(&'static str, PathBuf)>) -> Result<Self, String> {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut cmd = cargo();
        cmd.args([
            "run",
            "--quiet",
            "--package",
            "wdp-apiserver",
            "--bin",
            "wdp-apiserver",
        ])
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        eprintln!("+ {cmd:?}");
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| std::io::BufReader::new(out).read_line(&mut line));
        let kubeconfig = PathBuf::from(line.trim());
        // From here on, dropping `server` stops the process.
        let server = Self { child, kubeconfig };
        match read {
            Some(Ok(n)) if n > 0 && server.kubeconfig.is_file() => Ok(server),
            Some(Err(e)) => Err(format!("cannot read wdp-apiserver's output: {e}")),
            _ => Err(format!(
                "wdp-apiserver printed no kubeconfig ({:?}): the API server did not start \
                 (its error is above)",
                line.trim()
            )),
        }
    }

    /// Closes its stdin (which stops etcd and kube-apiserver and deletes their
    /// directory) and waits for it to exit.
    fn stop(mut self) -> Result<(), String> {
        self.close()
    }

    fn close(&mut self) -> Result<(), String> {
        drop(self.child.stdin.take());
        let status = self
            .child
            .wait()
            .map_err(|e| format!("cannot wait for wdp-apiserver: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("wdp-apiserver exited with {status}"))
        }
    }
}

impl Drop for DemoApiServer {
    fn drop(&mut self) {
        if self.child.stdin.is_some() {
            let _ = self.close();
        }
    }
}

fn test(extra: &[String]) -> Result<(), String> {
    ensure_wasm_target()?;
    ensure_componentize_py()?;
    ensure_grpcio()?;
    let ci = in_ci();
    if ci {
        // Present in rustup's default profile; added here for minimal installs.
        run(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))?;
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        for workspace in ["guests/Cargo.toml", "tests/guests/Cargo.toml"] {
            run(cargo().args([
                "fmt",
                "--manifest-path",
                workspace,
                "--all",
                "--",
                "--check",
            ]))?;
        }
    }
    let control_plane = ensure_control_plane(ci)?;
    run(cargo()
        .args(["test", "--workspace"])
        .args(extra)
        .envs(control_plane))?;
    // What the image ships, staged from the dev profile (a release build would
    // double the time) and checked by the staged binary itself.
    let staged = root().join(TEST_DIST);
    dist(&staged, false, false)?;
    check_dist(&staged)?;
    // The SDK's and the guests' own unit tests, natively (their code is plain Rust
    // around the bindings); the test crate has built and run them as components.
    run(cargo()
        .args([
            "test",
            "--manifest-path",
            "guests/Cargo.toml",
            "--workspace",
        ])
        .arg("--target-dir")
        .arg(root().join("target/guests")))?;
    // The guide's walkthrough, as a reader runs it.
    guide()?;
    if ci {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    Ok(())
}

/// The benchmarks `cargo xtask bench` runs, in order; each writes its section
/// of [`BENCHMARKS`].
const BENCHES: [&str; 5] = ["allocate", "prepare", "footprint", "scale", "reregister"];
/// The document the benchmarks write their figures into.
const BENCHMARKS: &str = "BENCHMARKS.md";
/// Where the Go peer's programs are, packed, relative to the repository root.
const PEER_PACKED: &str = "../shared/peer";
/// Where `bench` unpacks them.
const PEER_DIR: &str = "target/peer";

/// `cargo xtask bench [--no-write]`: runs [`BENCHES`] in the bench profile (an
/// optimised build) and writes their figures into [`BENCHMARKS`] (not with
/// `--no-write`). The Go peer is unpacked from [`PEER_PACKED`] (or taken from
/// `WDP_PEER_DIR`); without it the comparison with it is left out, loudly. The
/// prepare bench's kube-apiserver and etcd come from [`ensure_control_plane`].
fn bench(args: &[String]) -> Result<(), String> {
    let mut write = true;
    for arg in args {
        match arg.as_str() {
            "--no-write" => write = false,
            other => {
                return Err(format!(
                    "unknown argument `{other}` (usage: cargo xtask bench [--no-write])"
                ));
            }
        }
    }
    ensure_wasm_target()?;
    ensure_componentize_py()?;
    let mut cmd = cargo();
    cmd.args(["bench", "--package", "wasm-device-plugin"]);
    for name in BENCHES {
        cmd.args(["--bench", name]);
    }
    if write {
        cmd.env("WDP_BENCH_WRITE", root().join(BENCHMARKS));
    }
    match peer()? {
        Some(dir) => {
            cmd.env("WDP_PEER_DIR", dir);
        }
        None => eprintln!(
            "bench: the Go peer is not at {PEER_PACKED} (nor named by WDP_PEER_DIR); it is left out"
        ),
    }
    // The prepare bench's kube-apiserver and etcd; without them (no Go) it says so
    // and leaves its section as it was.
    cmd.envs(ensure_control_plane(false)?);
    run(&mut cmd)
}

/// The directory holding the Go peer's `goplugin` and `allocbench`: the one
/// `WDP_PEER_DIR` names, else [`PEER_PACKED`]'s `.xz` files unpacked into
/// [`PEER_DIR`]; `None` when neither is there.
fn peer() -> Result<Option<PathBuf>, String> {
    if let Some(dir) = std::env::var_os("WDP_PEER_DIR") {
        return Ok(Some(PathBuf::from(dir)));
    }
    let packed = root().join(PEER_PACKED);
    let out = root().join(PEER_DIR);
    for name in ["goplugin", "allocbench"] {
        let xz = packed.join(format!("{name}-linux-amd64.xz"));
        if !xz.is_file() {
            return Ok(None);
        }
        std::fs::create_dir_all(&out)
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        let program = out.join(name);
        let file = std::fs::File::create(&program)
            .map_err(|e| format!("cannot create {}: {e}", program.display()))?;
        run(Command::new("xz").arg("-dc").arg(&xz).stdout(file))
            .map_err(|e| format!("cannot unpack {} (is xz installed?): {e}", xz.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot make {} executable: {e}", program.display()))?;
    }
    Ok(Some(out))
}

/// Runs `host/tests/fuzz.rs` with `WDP_FUZZ_SECONDS` set: each property keeps
/// running fresh random cases for its share of the time. One test at a time, so the
/// whole run takes about that long (plus the build) and each prints its count.
fn fuzz(args: &[String]) -> Result<(), String> {
    let mut seconds = FUZZ_SECONDS;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--seconds needs a whole number of seconds above 0")?;
            }
            other => {
                return Err(format!(
                    "unknown argument `{other}` (usage: cargo xtask fuzz [--seconds N])"
                ));
            }
        }
    }
    // The host's dev-dependencies include the test crate, whose build script
    // builds the guests.
    ensure_wasm_target()?;
    ensure_componentize_py()?;
    run(cargo()
        .args([
            "test",
            "--package",
            "wasm-device-plugin",
            "--test",
            "fuzz",
            "--",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WDP_FUZZ_SECONDS", seconds.to_string()))
}

/// The guide whose walkthrough `cargo xtask guide` runs.
const GUIDE: &str = "docs/writing-a-guest.md";

/// Runs the guide's walkthrough: every fenced `sh` block, in order, as one bash
/// script (`-e`: the first failing command fails it) from the repository root, so
/// the commands a reader copies are the commands that were checked.
fn guide() -> Result<(), String> {
    let root = root();
    let text = std::fs::read_to_string(root.join(GUIDE))
        .map_err(|e| format!("cannot read {GUIDE}: {e}"))?;
    let script = sh_blocks(&text);
    if script.is_empty() {
        return Err(format!("{GUIDE} has no `sh` blocks"));
    }
    let mut cmd = Command::new("bash");
    cmd.args(["-euxo", "pipefail", "-c", &script])
        .current_dir(&root)
        // The walkthrough's cargo builds its own crates, not this workspace's
        // xtask: let it see a plain environment.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    eprintln!("+ bash: the `sh` blocks of {GUIDE}");
    let status = cmd.status().map_err(|e| format!("cannot run bash: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the walkthrough in {GUIDE} failed ({status})"))
    }
}

/// The fenced blocks of markdown `text` whose info string is exactly `sh`, joined.
fn sh_blocks(text: &str) -> String {
    let mut script = String::new();
    let mut inside = false;
    for line in text.lines() {
        let fence = line.trim_start();
        if inside {
            if fence.starts_with("```") {
                inside = false;
            } else {
                script.push_str(line);
                script.push('\n');
            }
        } else if fence
            .strip_prefix("```")
            .is_some_and(|info| info.trim() == "sh")
        {
            inside = true;
        }
    }
    script
}
