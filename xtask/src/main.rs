//! Project tasks, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`):
//!
//! - `demo`: builds the shipped guests and runs `wasm-device-plugin demo` on them;
//! - `test`: installs what the tests need (the `wasm32-wasip2` target, and
//!   componentize-py in a venv at `target/py` for the Python guest) and runs every
//!   test: the test crate (which builds the guests itself), the guests' own unit
//!   tests, and the walkthrough of `docs/writing-a-guest.md` (`guide`). With `CI`
//!   set it also checks formatting and denies clippy warnings;
//! - `guests`: builds the shipped guests into `target/modules/`;
//! - `guide`: runs the walkthrough of `docs/writing-a-guest.md` as written;
//! - `fuzz [--seconds N]`: runs the property tests of `host/tests/fuzz.rs` for about
//!   N seconds (default 180), shared evenly among the properties.
//!
//! Needs rustup and cargo; `test` and `fuzz` also need `python3` with its `venv`
//! module (the test crate builds the Python guest).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const WASM_TARGET: &str = "wasm32-wasip2";
/// The componentize-py that builds the Python guest, pinned: its output embeds a
/// CPython and a WASI version that the tests were written against.
const COMPONENTIZE_PY_VERSION: &str = "0.25.1";
/// The venv `ensure_componentize_py` installs it into; `tests/build.rs` looks there.
const PY_VENV: &str = "target/py";
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
        "fuzz" => fuzz(rest),
        "guide" => guide(),
        _ => {
            eprintln!("usage: cargo xtask <demo|test|guests|fuzz> [args...]");
            eprintln!(
                "  demo    build the shipped guests and run `wasm-device-plugin demo` on them"
            );
            eprintln!(
                "  test    install the wasm target and componentize-py, run every test (args go to `cargo test`)"
            );
            eprintln!("  guests  build the shipped guests into target/modules/");
            eprintln!(
                "  guide   run every `sh` block of docs/writing-a-guest.md, in order, as written"
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
    if !venv.join("bin/pip").is_file() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).map_err(|e| {
            format!("{e}\n(the Python guest needs python3 with its venv module, e.g. the python3-venv package)")
        })?;
    }
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("componentize-py=={COMPONENTIZE_PY_VERSION}"),
    ]))
}

/// Builds the guests workspace and copies each component into `target/modules/`.
fn guests() -> Result<PathBuf, String> {
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
        .arg(&target_dir))?;
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

fn demo(extra: &[String]) -> Result<(), String> {
    let modules = guests()?;
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--package",
            "wasm-device-plugin",
            "--",
            "demo",
            "--modules-dir",
        ])
        .arg(modules)
        .args(extra))
}

fn test(extra: &[String]) -> Result<(), String> {
    ensure_wasm_target()?;
    ensure_componentize_py()?;
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
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
    run(cargo().args(["test", "--workspace"]).args(extra))?;
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
