//! Files that are not modules this host can run: each is refused once, with a
//! reason naming the file and what is wrong, and a good module beside it serves.

use wasm_device_plugin::registry::ModuleState;
use wasm_device_plugin::runtime::PACKAGE_VERSION;
use wdp_tests::{Dirs, Fixture, guests};

const DEV1: &str = "example.com/dev-1";

/// Loads `file` (as module `bad`) beside the virtual-devices module; returns the
/// reason `bad` failed, after checking that it was refused exactly once and
/// that the good module allocates.
async fn refused(write: impl FnOnce(&Dirs)) -> String {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    write(&dirs);
    let fixture = Fixture::start(dirs);
    fixture.listed(DEV1).await;
    let states = fixture.settled().await;
    let Some(ModuleState::Failed(reason)) = states.get("bad") else {
        panic!("bad module not refused: {states:?}");
    };
    let refusals = fixture.host.refusals().borrow().clone();
    let of_bad: Vec<_> = refusals.iter().filter(|r| r.module == "bad").collect();
    assert_eq!(of_bad.len(), 1, "refused once: {refusals:?}");
    assert_eq!(&of_bad[0].reason, reason);
    assert!(reason.contains("bad.wasm"), "names the file: {reason}");
    fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/1"]])
        .await
        .expect("the good module still allocates");
    let reason = reason.clone();
    fixture.stop().await;
    reason
}

fn bytes(bytes: &'static [u8]) -> impl FnOnce(&Dirs) {
    move |dirs: &Dirs| dirs.write_module("bad.wasm", bytes)
}

fn guest(wasm: &'static str) -> impl FnOnce(&Dirs) {
    move |dirs: &Dirs| dirs.add_module("bad", wasm)
}

#[tokio::test]
async fn a_file_that_is_not_webassembly_is_refused() {
    let reason = refused(bytes(b"this is not webassembly")).await;
    assert!(reason.contains("not a WebAssembly binary"), "{reason}");
}

#[tokio::test]
async fn a_core_module_is_refused_as_not_a_component() {
    // The 8-byte header of an empty core module: valid, but not a component.
    let reason = refused(bytes(b"\0asm\x01\0\0\0")).await;
    assert!(
        reason.contains("a core WebAssembly module, not a component"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_truncated_component_is_refused_as_invalid() {
    let reason = refused(bytes(b"\0asm\x0d\0\x01\0\x01\x02")).await;
    assert!(reason.contains("invalid component"), "{reason}");
}

#[tokio::test]
async fn a_component_of_another_version_of_our_package_is_refused() {
    let reason = refused(guest(guests::WRONG_VERSION)).await;
    assert!(
        reason.contains("wasm-device-plugin:device/host@0.1.0")
            && reason.contains(&format!(
                "this host implements wasm-device-plugin:device@{PACKAGE_VERSION}"
            )),
        "{reason}"
    );
}

#[tokio::test]
async fn a_component_of_another_package_is_refused_naming_its_import() {
    let reason = refused(guest(guests::OTHER_PACKAGE)).await;
    assert!(
        reason.contains("`acme:sensors/probe@1.0.0`") && reason.contains("does not provide"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_component_missing_scan_is_refused() {
    let reason = refused(guest(guests::MISSING_EXPORT)).await;
    assert!(
        reason.contains(&format!(
            "does not fit wasm-device-plugin:device@{PACKAGE_VERSION}"
        )) && reason.contains("it does not export `scan`"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_component_importing_sockets_is_refused() {
    let reason = refused(guest(guests::SOCKETS)).await;
    assert!(
        reason.contains("`wasi:sockets/") && reason.contains("no network"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_file_over_64_mib_is_refused_unread() {
    let reason = refused(|dirs: &Dirs| {
        // Sparse: the size is what counts, and it is checked before reading.
        let file = std::fs::File::create(dirs.modules().join("bad.wasm")).expect("create");
        file.set_len(64 * 1024 * 1024 + 1).expect("grow");
    })
    .await;
    assert!(reason.contains("64 MiB"), "{reason}");
}
