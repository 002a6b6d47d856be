//! Builds the shipped guests (`guests/`) for `wasm32-wasip2` and writes their paths
//! into `OUT_DIR/guests.rs`, so the tests always run against current guests.
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
    let guests = root.join("guests");
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!(
        "cargo:rerun-if-changed={}",
        guests.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        guests.join("Cargo.lock").display()
    );
    let mut members = Vec::new();
    for entry in std::fs::read_dir(&guests).expect("guests/ exists") {
        let path = entry.expect("readable guests/").path();
        if path.join("Cargo.toml").is_file() {
            println!(
                "cargo:rerun-if-changed={}",
                path.join("Cargo.toml").display()
            );
            println!("cargo:rerun-if-changed={}", path.join("src").display());
            members.push(path);
        }
    }

    let target_dir = root.join("target/guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        WASM_TARGET,
        "--manifest-path",
    ])
    .arg(guests.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir);
    // The outer build's settings are for the host, not for wasm guests.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("cannot run cargo to build the guests");
    assert!(
        status.success(),
        "building the guests for {WASM_TARGET} failed; is the target installed? \
         `rustup target add {WASM_TARGET}` (or run the tests with `cargo xtask test`, which installs it)"
    );

    let built = target_dir.join(WASM_TARGET).join("release");
    let mut consts = String::new();
    for member in &members {
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
        consts.push_str(&format!(
            "/// `{}` built for {WASM_TARGET}.\npub const {}: &str = {:?};\n",
            rel(&root, member),
            name.to_uppercase(),
            wasm.display().to_string()
        ));
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("guests.rs");
    std::fs::write(out, consts).expect("cannot write guests.rs");
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}
