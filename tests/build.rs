//! Builds the shipped guests (`guests/`) and the test fixtures (`tests/guests/`) for
//! `wasm32-wasip2` and writes their paths into `OUT_DIR/guests.rs`, so the tests
//! always run against current guests.
//!
//! The guests build in their own target directory (`target/guests`): a nested
//! cargo on the outer build's target directory would wait on its lock forever.

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
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("guests.rs");
    std::fs::write(out, consts).expect("cannot write guests.rs");
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
            members.push(path);
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
    // The outer build's settings are for the host, not for wasm guests; nor is a
    // `cargo clippy` of the host (its wrapper and `-D warnings` would lint the
    // guests' code and fail their build).
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
