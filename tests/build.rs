//! Builds the shipped guests (`guests/`) and the test fixtures (`tests/guests/`) for
//! `wasm32-wasip2` and writes their paths into `OUT_DIR/guests.rs`, so the tests
//! always run against current guests.
//!
//! The guests build in their own target directory (`target/guests`): a nested
//! cargo on the outer build's target directory would wait on its lock forever.
//!
//! The Python guest (`guests/python-virtual`) is built with componentize-py, which
//! `cargo xtask test` installs into `target/py` (or named by `WDP_COMPONENTIZE_PY`).
//!
//! `tests/cdi-check` (the CDI library's checks, as a program) is built natively in
//! `target/cdi-check`, a workspace of its own so that its dependencies' features
//! never reach the host's builds; its path goes into `OUT_DIR/guests.rs` as
//! `CDI_CHECK`.

use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf();
    let target_dir = root.join("target/guests");
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    let mut consts = String::new();
    for workspace in [root.join("guests"), manifest_dir.join("guests")] {
        for (member, wasm) in build_workspace(&workspace, &target_dir) {
            let name = member
                .file_name()
                .expect("member dir")
                .to_string_lossy()
                .replace('-', "_");
            consts.push_str(&format!(
                "/// `{}` built for {WASM_TARGET}.\npub const {}: &str = {:?};\n",
                member.strip_prefix(&root).unwrap_or(&member).display(),
                name.to_uppercase(),
                wasm.display().to_string()
            ));
        }
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let python = build_python(&root, &root.join("guests/python-virtual"), &out_dir);
    consts.push_str(&format!(
        "/// `guests/python-virtual` built with componentize-py.\npub const PYTHON_VIRTUAL: &str = {:?};\n",
        python.display().to_string()
    ));
    let cdi_check = build_cdi_check(
        &manifest_dir.join("cdi-check"),
        &root.join("target/cdi-check"),
    );
    consts.push_str(&format!(
        "/// `tests/cdi-check` built natively.\npub const CDI_CHECK: &str = {:?};\n",
        cdi_check.display().to_string()
    ));
    std::fs::write(out_dir.join("guests.rs"), consts).expect("cannot write guests.rs");
}

/// Builds `tests/cdi-check` (its own workspace and lock file) into `target_dir`;
/// the path of the program.
fn build_cdi_check(dir: &Path, target_dir: &Path) -> PathBuf {
    for file in ["Cargo.toml", "Cargo.lock", "src"] {
        println!("cargo:rerun-if-changed={}", dir.join(file).display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--locked", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    outer_settings_removed(&mut cmd);
    let status = cmd.status().expect("cannot run cargo to build cdi-check");
    assert!(status.success(), "building {} failed", dir.display());
    target_dir.join("debug/cdi-check")
}

/// Leaves out what the outer build sets for the host: its flags, target
/// directory and jobserver, and a `cargo clippy` run's wrapper and `-D
/// warnings` (which would lint the nested build's code and fail it).
fn outer_settings_removed(cmd: &mut Command) {
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
    ] {
        cmd.env_remove(var);
    }
}

/// The componentize-py that `cargo xtask test` installs; its version is pinned there.
const COMPONENTIZE_PY: &str = "target/py/bin/componentize-py";

/// Builds the Python guest in `dir` (its `app.py`) into `out_dir`; returns the
/// component file.
///
/// `--stub-wasi` replaces every WASI import with a stub that traps: without it the
/// component imports `wasi:sockets`, which the host refuses at load.
fn build_python(root: &Path, dir: &Path, out_dir: &Path) -> PathBuf {
    println!("cargo:rerun-if-env-changed=WDP_COMPONENTIZE_PY");
    let componentize_py = std::env::var_os("WDP_COMPONENTIZE_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(COMPONENTIZE_PY));
    assert!(
        componentize_py.is_file(),
        "componentize-py not found at {} (building the Python guest {} needs it): \
         run the tests with `cargo xtask test`, which installs it into target/py, \
         or set WDP_COMPONENTIZE_PY to a componentize-py 0.25.1",
        componentize_py.display(),
        dir.display()
    );
    println!("cargo:rerun-if-changed={}", componentize_py.display());
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(dir).expect("guests/python-virtual exists") {
        let path = entry.expect("readable directory").path();
        if path.extension().is_some_and(|e| e == "py") {
            let text = std::fs::read(&path).expect("cannot read the Python guest's sources");
            sources.push((path, text));
        }
    }
    sources.sort();

    // This script reruns whenever any guest changes; componentize-py takes seconds,
    // so it runs only when its own inputs changed since the last build.
    let build = out_dir.join("python-virtual");
    let wasm = build.join("python_virtual.wasm");
    let stamp = build.join("inputs.stamp");
    let inputs = python_inputs(root, &componentize_py, &sources);
    if wasm.is_file() && std::fs::read(&stamp).is_ok_and(|s| s == inputs) {
        return wasm;
    }

    // No stamp while the component is being written: a build cut short is redone.
    let _ = std::fs::remove_file(&stamp);
    // componentize-py writes `__pycache__` beside the sources it imports: build
    // from a copy, so the source tree stays clean.
    let src = build.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src).expect("cannot clear the Python build directory");
    }
    std::fs::create_dir_all(&src).expect("cannot create the Python build directory");
    for (path, text) in &sources {
        std::fs::write(src.join(path.file_name().expect("file name")), text)
            .expect("cannot copy the Python guest's sources");
    }
    let mut cmd = Command::new(&componentize_py);
    cmd.arg("--quiet")
        .arg("--wit-path")
        .arg(root.join("wit"))
        .args(["--world", "device-plugin", "componentize", "--stub-wasi"])
        .arg("--python-path")
        .arg(&src)
        .arg("app")
        .arg("--output")
        .arg(&wasm);
    // componentize-py adds `$VIRTUAL_ENV`'s packages to the module path: use the
    // venv it is installed in, not whichever one the caller has activated.
    match componentize_py.parent().and_then(Path::parent) {
        Some(venv) => cmd.env("VIRTUAL_ENV", venv),
        None => cmd.env_remove("VIRTUAL_ENV"),
    };
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", componentize_py.display()));
    assert!(
        status.success(),
        "building the Python guest {} with {} failed ({status})",
        dir.display(),
        componentize_py.display()
    );
    std::fs::write(&stamp, inputs).expect("cannot write the Python build's stamp");
    wasm
}

/// Everything the Python build depends on, as bytes to compare with the last
/// build's: the tool (path, size, modification time), the WIT files and the sources.
fn python_inputs(root: &Path, componentize_py: &Path, sources: &[(PathBuf, Vec<u8>)]) -> Vec<u8> {
    let mut inputs = Vec::new();
    let tool = std::fs::metadata(componentize_py).expect("componentize-py exists");
    inputs.extend(
        format!(
            "{} {} {:?}\n",
            componentize_py.display(),
            tool.len(),
            tool.modified().ok()
        )
        .into_bytes(),
    );
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(root.join("wit"))
        .expect("wit/ exists")
        .map(|e| e.expect("readable directory").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let text = std::fs::read(&p).expect("cannot read wit/");
            (p, text)
        })
        .collect();
    files.sort();
    files.extend(sources.iter().cloned());
    for (path, text) in files {
        inputs.extend(format!("{} {}\n", path.display(), text.len()).into_bytes());
        inputs.extend(text);
    }
    inputs
}

/// Builds every member of the workspace at `dir`; returns each member's directory
/// and component file.
fn build_workspace(dir: &Path, target_dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("Cargo.lock").display()
    );
    let mut members = Vec::new();
    for entry in std::fs::read_dir(dir).expect("guest workspace exists") {
        let path = entry.expect("readable directory").path();
        if path.join("Cargo.toml").is_file() {
            println!(
                "cargo:rerun-if-changed={}",
                path.join("Cargo.toml").display()
            );
            println!("cargo:rerun-if-changed={}", path.join("src").display());
            // Libraries (the SDK) are built as the guests' dependencies; only
            // `cdylib` crates become components.
            let is_guest = std::fs::read_to_string(path.join("Cargo.toml"))
                .is_ok_and(|manifest| manifest.contains("cdylib"));
            if is_guest {
                members.push(path);
            }
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        WASM_TARGET,
        "--manifest-path",
    ])
    .arg(dir.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(target_dir);
    // The outer build's settings are for the host, not for wasm guests.
    outer_settings_removed(&mut cmd);
    let status = cmd.status().expect("cannot run cargo to build the guests");
    assert!(
        status.success(),
        "building {} for {WASM_TARGET} failed; is the target installed? \
         `rustup target add {WASM_TARGET}` (or run the tests with `cargo xtask test`, which installs it)",
        dir.display()
    );
    let built = target_dir.join(WASM_TARGET).join("release");
    members
        .into_iter()
        .map(|member| {
            let name = member
                .file_name()
                .expect("member dir")
                .to_string_lossy()
                .replace('-', "_");
            let wasm = built.join(format!("{name}.wasm"));
            assert!(
                wasm.is_file(),
                "guest {} did not produce {}",
                member.display(),
                wasm.display()
            );
            (member, wasm)
        })
        .collect()
}
