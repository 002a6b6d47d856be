//! Kubelet coming and going under the host, the host's own sockets vanishing, and
//! restarts of the host itself with a compiled-module cache.

use wasm_device_plugin::kubelet::deviceplugin::simulator::Simulator;
use wasm_device_plugin::registry::ModuleState;
use wdp_tests::{
    Dirs, Fixture, WAIT, guests, host_config, plugin_sockets, start_host_without_kubelet,
    test_settings,
};

const DEV1: &str = "example.com/dev-1";
const DEV2: &str = "example.com/dev-2";

fn virtual_devices() -> Dirs {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    dirs
}

#[tokio::test]
async fn kubelet_restarted_ten_times_gets_every_resource_registered_again_each_time() {
    let mut fixture = Fixture::start(virtual_devices());
    fixture.listed(DEV1).await;
    fixture.listed(DEV2).await;
    let mut endpoints = Vec::new();
    for round in 0..10 {
        fixture.kubelet.restart().await.expect("kubelet restarts");
        let view = fixture
            .wait_for(&format!("both registered after restart {round}"), |v| {
                [DEV1, DEV2].iter().all(|r| {
                    v.plugin(r)
                        .is_some_and(|p| p.streaming && !p.updates.is_empty())
                })
            })
            .await;
        assert_eq!(view.plugins[DEV1].devices.len(), 4);
        endpoints.push(view.plugins[DEV1].registration.endpoint.clone());
        fixture
            .kubelet
            .allocate(DEV1, &[&["/node1/dev1/1"]])
            .await
            .expect("allocate after a kubelet restart");
        assert_eq!(
            plugin_sockets(&fixture.dirs.kubelet()).len(),
            2,
            "one socket per resource"
        );
    }
    endpoints.dedup();
    assert_eq!(endpoints.len(), 10, "a new socket for every kubelet");
    fixture.stop().await;
}

#[tokio::test]
async fn kubelet_absent_at_start_is_waited_for_and_registered_with_when_it_appears() {
    let dirs = virtual_devices();
    let (host, shutdown) = start_host_without_kubelet(&dirs);
    let states = host.settled(WAIT).await.expect("settles");
    assert!(matches!(
        states.get("virtual"),
        Some(ModuleState::Serving(_))
    ));
    assert!(
        plugin_sockets(&dirs.kubelet()).is_empty(),
        "no socket until kubelet is there"
    );
    let kubelet = Simulator::start(&dirs.kubelet()).expect("kubelet starts");
    kubelet
        .wait_for(WAIT, "both registered", |v| {
            [DEV1, DEV2]
                .iter()
                .all(|r| v.plugin(r).is_some_and(|p| p.streaming))
        })
        .await
        .expect("registered once kubelet appeared");
    shutdown.cancel();
    host.stop().await;
    kubelet.stop().await;
}

#[tokio::test]
async fn deleted_plugin_socket_is_served_anew_and_registered_again() {
    let fixture = Fixture::start(virtual_devices());
    let view = fixture.listed(DEV1).await;
    let endpoint = view.plugins[DEV1].registration.endpoint.clone();
    std::fs::remove_file(fixture.dirs.kubelet().join(&endpoint)).expect("rm socket");
    let view = fixture
        .wait_for("registered again", |v| {
            v.plugin(DEV1)
                .is_some_and(|p| p.registrations == 2 && p.streaming)
        })
        .await;
    assert_ne!(view.plugins[DEV1].registration.endpoint, endpoint);
    fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/2"]])
        .await
        .expect("allocates on the new socket");
    fixture.stop().await;
}

/// The host with its compiled-module cache in `cache`.
fn with_cache(dirs: Dirs, cache: &std::path::Path) -> Fixture {
    let mut config = host_config(&dirs, test_settings(&dirs.kubelet()));
    config.cache_dir = Some(cache.to_path_buf());
    Fixture::start_config(dirs, config)
}

#[tokio::test]
async fn restart_with_a_warm_cache_does_not_recompile() {
    let cache = tempfile::tempdir().expect("cache dir");
    let start = |dirs: Dirs| with_cache(dirs, &cache.path().join("modules"));
    let cold = start(virtual_devices());
    cold.listed(DEV1).await;
    let stats = cold.host.stats();
    assert_eq!((stats.compiled, stats.cache_hits), (1, 0), "{stats:?}");
    let dirs = cold.stop().await;

    let warm = start(dirs);
    warm.listed(DEV1).await;
    let stats = warm.host.stats();
    assert_eq!((stats.compiled, stats.cache_hits), (0, 1), "{stats:?}");
    warm.kubelet
        .allocate(DEV1, &[&["/node1/dev1/1"]])
        .await
        .expect("the cached module allocates");
    warm.stop().await;
}

#[tokio::test]
async fn corrupt_cache_entry_is_not_trusted_and_is_rebuilt() {
    let cache = tempfile::tempdir().expect("cache dir");
    let start = |dirs: Dirs| with_cache(dirs, cache.path());
    let cold = start(virtual_devices());
    cold.listed(DEV1).await;
    let dirs = cold.stop().await;
    let entries: Vec<_> = std::fs::read_dir(cache.path())
        .expect("cache")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let mut bytes = std::fs::read(&entries[0]).expect("entry");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&entries[0], bytes).expect("corrupt");

    let second = start(dirs);
    second.listed(DEV1).await;
    let stats = second.host.stats();
    assert_eq!(
        (stats.compiled, stats.cache_hits, stats.cache_rejected),
        (1, 0, 1),
        "{stats:?}"
    );
    let dirs = second.stop().await;
    // Rebuilt: a third start hits.
    let third = start(dirs);
    third.listed(DEV1).await;
    let stats = third.host.stats();
    assert_eq!((stats.compiled, stats.cache_hits), (0, 1), "{stats:?}");
    third.stop().await;
}

#[tokio::test]
async fn a_cache_directory_others_may_write_is_not_used() {
    use std::os::unix::fs::PermissionsExt;

    let cache = tempfile::tempdir().expect("cache dir");
    let start = |dirs: Dirs| with_cache(dirs, cache.path());
    // A warm, trusted cache first.
    let cold = start(virtual_devices());
    cold.listed(DEV1).await;
    let dirs = cold.stop().await;
    // Anyone could now have planted an entry: precompiled code from it would be
    // trusted code execution, so the host compiles from the module instead.
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let second = start(dirs);
    second.listed(DEV1).await;
    let stats = second.host.stats();
    assert_eq!((stats.compiled, stats.cache_hits), (1, 0), "{stats:?}");
    second.stop().await;
}

#[tokio::test]
async fn copies_of_one_module_loading_at_once_compile_once() {
    let cache = tempfile::tempdir().expect("cache dir");
    let dirs = Dirs::new();
    for n in 0..4 {
        let name = format!("copy{n}");
        dirs.add_module(&name, guests::VIRTUAL_DEVICES);
        dirs.write_manifest(&name, &format!("domain = \"copy{n}.example.com\"\n"));
    }
    let fixture = with_cache(dirs, &cache.path().join("modules"));
    for n in 0..4 {
        fixture.listed(&format!("copy{n}.example.com/dev-1")).await;
    }
    let stats = fixture.host.stats();
    assert_eq!(
        (stats.compiled, stats.cache_hits),
        (1, 3),
        "the first compiles, the others read what it cached: {stats:?}"
    );
    fixture.stop().await;
}
