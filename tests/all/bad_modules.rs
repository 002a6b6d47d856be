//! Files that are not modules this host can run: each is refused once, with a
//! reason naming the file and what is wrong, and a good module beside it serves.

use std::sync::Arc;

use wasm_device_plugin::registry::{ModuleState, RegistryError};
use wasm_device_plugin::runtime::{LoadError, PACKAGE_VERSION};
use wdp_tests::{Dirs, Fixture, guests};

const DEV1: &str = "example.com/dev-1";

/// Loads `file` (as module `bad`) beside the virtual-devices module; returns why
/// `bad` failed (the logged reason and the error), after checking that it was
/// refused exactly once and that the good module allocates.
async fn refused(write: impl FnOnce(&Dirs)) -> (String, Arc<RegistryError>) {
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
    let refusal = (reason.clone(), of_bad[0].error.clone());
    fixture.stop().await;
    refusal
}

/// The load error of a refusal, or a panic naming what it was instead.
fn load_error(error: &RegistryError) -> &LoadError {
    match error {
        RegistryError::Load { error, .. } => error,
        other => panic!("expected a load error, got {other:?}"),
    }
}

fn bytes(bytes: &'static [u8]) -> impl FnOnce(&Dirs) {
    move |dirs: &Dirs| dirs.write_module("bad.wasm", bytes)
}

fn guest(wasm: &'static str) -> impl FnOnce(&Dirs) {
    move |dirs: &Dirs| dirs.add_module("bad", wasm)
}

#[tokio::test]
async fn a_file_that_is_not_webassembly_is_refused() {
    let (reason, error) = refused(bytes(b"this is not webassembly")).await;
    assert!(matches!(load_error(&error), LoadError::NotWasm), "{reason}");
}

#[tokio::test]
async fn a_core_module_is_refused_as_not_a_component() {
    // The 8-byte header of an empty core module: valid, but not a component.
    let (reason, error) = refused(bytes(b"\0asm\x01\0\0\0")).await;
    assert!(
        matches!(load_error(&error), LoadError::CoreModule),
        "{reason}"
    );
}

#[tokio::test]
async fn a_truncated_component_is_refused_as_invalid() {
    let (reason, error) = refused(bytes(b"\0asm\x0d\0\x01\0\x01\x02")).await;
    assert!(
        matches!(load_error(&error), LoadError::Invalid(_)),
        "{reason}"
    );
}

#[tokio::test]
async fn a_component_of_another_version_of_our_package_is_refused() {
    let (reason, error) = refused(guest(guests::WRONG_VERSION)).await;
    assert!(matches!(load_error(&error), LoadError::Incompatible(_)));
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
    let (reason, error) = refused(guest(guests::OTHER_PACKAGE)).await;
    assert!(matches!(
        load_error(&error),
        LoadError::UnsupportedImports(_)
    ));
    assert!(
        reason.contains("`acme:sensors/probe@1.0.0`") && reason.contains("does not provide"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_component_missing_scan_is_refused() {
    let (reason, error) = refused(guest(guests::MISSING_EXPORT)).await;
    assert!(matches!(load_error(&error), LoadError::Incompatible(_)));
    assert!(
        reason.contains(&format!(
            "does not fit wasm-device-plugin:device@{PACKAGE_VERSION}"
        )) && reason.contains("it does not export `scan`"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_component_importing_sockets_is_refused() {
    let (reason, error) = refused(guest(guests::SOCKETS)).await;
    assert!(matches!(
        load_error(&error),
        LoadError::UnsupportedImports(_)
    ));
    assert!(
        reason.contains("`wasi:sockets/") && reason.contains("no network"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_file_over_64_mib_is_refused_unread() {
    let (reason, error) = refused(|dirs: &Dirs| {
        // Sparse: the size is what counts, and it is checked before reading.
        let file = std::fs::File::create(dirs.modules().join("bad.wasm")).expect("create");
        file.set_len(64 * 1024 * 1024 + 1).expect("grow");
    })
    .await;
    assert!(matches!(*error, RegistryError::Read { .. }), "{reason}");
    assert!(reason.contains("64 MiB"), "{reason}");
}
