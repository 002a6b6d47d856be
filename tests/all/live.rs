//! The live modules directory and manifests: modules dropped in, replaced,
//! removed, copied in place, swapped through a ConfigMap-style `..data` symlink,
//! and reconfigured by editing their manifests, all while the host runs.

use std::io::Write;
use std::os::unix::fs::symlink;

use wasm_device_plugin::registry::ModuleState;
use wdp_tests::{Dirs, Fixture, guests, ids, plugin_sockets};

const DEV1: &str = "example.com/dev-1";
const DEV2: &str = "example.com/dev-2";
const V1_DEV1: [&str; 4] = [
    "/node1/dev1/1",
    "/node1/dev1/2",
    "/node1/dev1/3",
    "/node1/dev1/4",
];
const V2_DEV1: [&str; 3] = ["/v2/dev1/1", "/v2/dev1/2", "/v2/dev1/3"];

fn virtual_devices() -> Dirs {
    let dirs = Dirs::new();
    dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    dirs
}

fn env<'a>(
    response: &'a wasm_device_plugin::kubelet::deviceplugin::proto::AllocateResponse,
    key: &str,
) -> Option<&'a str> {
    response.container_responses[0]
        .envs
        .get(key)
        .map(String::as_str)
}

#[tokio::test]
async fn module_dropped_in_while_running_is_registered() {
    let fixture = Fixture::start(Dirs::new());
    assert!(fixture.settled().await.is_empty());
    fixture.dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    let view = fixture.listed(DEV1).await;
    assert_eq!(ids(&view, DEV1), V1_DEV1);
    fixture.listed(DEV2).await;
    fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/1"]])
        .await
        .expect("allocates");
    fixture.stop().await;
}

#[tokio::test]
async fn replaced_module_sends_its_devices_on_the_same_stream_and_answers_allocate() {
    let fixture = Fixture::start(virtual_devices());
    fixture.listed(DEV1).await;
    fixture.listed(DEV2).await;
    fixture.dirs.replace_module("virtual", guests::REPLACEMENT);
    let view = fixture
        .wait_for("the new version's devices", |v| ids(v, DEV1) == V2_DEV1)
        .await;
    let plugin = &view.plugins[DEV1];
    assert_eq!(plugin.registrations, 1, "same registration");
    assert!(plugin.streaming, "same stream");
    assert_eq!(
        plugin.updates.len(),
        2,
        "first list, then the new version's"
    );
    // The new version does not report dev-2: that resource is unregistered
    // (the module's state lists it until its server stopped).
    fixture
        .module_state("virtual", |s| {
            s == Some(&ModuleState::Serving(vec![DEV1.into()]))
        })
        .await;
    assert!(!fixture.kubelet.view().plugins[DEV2].streaming);
    assert_eq!(
        plugin_sockets(&fixture.dirs.kubelet()).len(),
        1,
        "dev-2's socket removed"
    );
    let response = fixture
        .kubelet
        .allocate(DEV1, &[&["/v2/dev1/2"]])
        .await
        .expect("allocates");
    assert_eq!(
        env(&response, "VERSION"),
        Some("2"),
        "the new version answers"
    );
    assert_eq!(fixture.host.stats().compiled, 2);
    fixture.stop().await;
}

#[tokio::test]
async fn replacement_that_is_not_a_module_is_refused_and_the_old_version_keeps_serving() {
    let fixture = Fixture::start(virtual_devices());
    fixture.listed(DEV1).await;
    fixture.dirs.write_module("virtual.wasm", b"\0asm garbage");
    let reason = fixture.refused("virtual", 1).await;
    assert!(
        reason.contains("virtual.wasm") || reason.contains("invalid"),
        "{reason}"
    );
    assert_eq!(fixture.host.stats().refused, 1);
    let states = fixture.settled().await;
    assert_eq!(
        states.get("virtual"),
        Some(&ModuleState::Serving(vec![DEV1.into(), DEV2.into()]))
    );
    fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/1"]])
        .await
        .expect("the old version still allocates");
    assert_eq!(fixture.kubelet.view().plugins[DEV1].registrations, 1);
    fixture.stop().await;
}

#[tokio::test]
async fn removed_module_stops_serving_and_its_sockets_are_deleted() {
    let fixture = Fixture::start(virtual_devices());
    fixture.listed(DEV1).await;
    fixture.listed(DEV2).await;
    assert_eq!(plugin_sockets(&fixture.dirs.kubelet()).len(), 2);
    fixture.dirs.remove_module("virtual");
    fixture.module_state("virtual", |s| s.is_none()).await;
    assert!(plugin_sockets(&fixture.dirs.kubelet()).is_empty());
    fixture
        .wait_for("streams ended", |v| {
            v.plugins.values().all(|p| !p.streaming)
        })
        .await;
    // Dropped in again under the same name: served again.
    fixture.dirs.add_module("virtual", guests::VIRTUAL_DEVICES);
    fixture
        .wait_for("registered again", |v| {
            v.plugin(DEV1)
                .is_some_and(|p| p.registrations == 2 && p.streaming)
        })
        .await;
    fixture.stop().await;
}

/// `bytes` with a custom section of `size` bytes appended: the same component,
/// a larger file.
fn padded(bytes: &[u8], size: usize) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"padding";
    let mut payload = Vec::with_capacity(size + 16);
    leb128(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.resize(payload.len() + size, 0x5a);
    let mut out = bytes.to_vec();
    out.push(0);
    leb128(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

#[tokio::test]
async fn module_copied_in_place_is_loaded_once_when_complete() {
    let fixture = Fixture::start(Dirs::new());
    let bytes = padded(
        &std::fs::read(guests::VIRTUAL_DEVICES).expect("guest"),
        8 << 20,
    );
    let path = fixture.dirs.modules().join("big.wasm");
    let mut file = std::fs::File::create(&path).expect("create");
    let half = bytes.len() / 2;
    file.write_all(&bytes[..half]).expect("first half");
    file.flush().expect("flush");
    // The host has seen the half-written file, and waits for it.
    assert_eq!(
        fixture.module_state("big", |s| s.is_some()).await,
        Some(ModuleState::Settling)
    );
    file.write_all(&bytes[half..]).expect("second half");
    drop(file);
    fixture.listed(DEV1).await;
    let stats = fixture.host.stats();
    assert_eq!((stats.compiled, stats.refused), (1, 0), "{stats:?}");
    fixture.stop().await;
}

#[tokio::test]
async fn configmap_style_data_symlink_swap_reloads_the_module() {
    let dirs = Dirs::new();
    let modules = dirs.modules();
    // The layout of a ConfigMap volume: files are symlinks through `..data` into
    // a timestamped directory, and an update swaps `..data` atomically.
    std::fs::create_dir(modules.join("..2026_11_26_01")).expect("mkdir");
    std::fs::copy(
        guests::VIRTUAL_DEVICES,
        modules.join("..2026_11_26_01/virtual.wasm"),
    )
    .expect("copy");
    symlink("..2026_11_26_01", modules.join("..data")).expect("symlink");
    symlink("..data/virtual.wasm", modules.join("virtual.wasm")).expect("symlink");
    let fixture = Fixture::start(dirs);
    fixture.listed(DEV1).await;

    std::fs::create_dir(modules.join("..2026_11_26_02")).expect("mkdir");
    std::fs::copy(
        guests::REPLACEMENT,
        modules.join("..2026_11_26_02/virtual.wasm"),
    )
    .expect("copy");
    symlink("..2026_11_26_02", modules.join("..data_tmp")).expect("symlink");
    std::fs::rename(modules.join("..data_tmp"), modules.join("..data")).expect("swap");
    std::fs::remove_dir_all(modules.join("..2026_11_26_01")).expect("old data");

    let view = fixture
        .wait_for("the swapped-in version's devices", |v| {
            ids(v, DEV1) == V2_DEV1
        })
        .await;
    assert_eq!(view.plugins[DEV1].registrations, 1);
    fixture.stop().await;
}

#[tokio::test]
async fn manifest_edit_of_replicas_changes_the_list_on_the_same_stream() {
    let fixture = Fixture::start(virtual_devices());
    fixture.listed(DEV1).await;
    fixture.listed(DEV2).await;
    fixture
        .dirs
        .write_manifest("virtual", "[resources.dev-1]\nreplicas = 2\n");
    let view = fixture
        .wait_for("dev-1 shared twice", |v| ids(v, DEV1).len() == 8)
        .await;
    assert_eq!(
        ids(&view, DEV1)[..4],
        [
            "/node1/dev1/1::0",
            "/node1/dev1/1::1",
            "/node1/dev1/2::0",
            "/node1/dev1/2::1"
        ]
    );
    assert_eq!(view.plugins[DEV1].registrations, 1);
    assert_eq!(view.plugins[DEV2].updates.len(), 1, "dev-2 untouched");
    // Kubelet allocates replicas; the guest sees the real device, once.
    let response = fixture
        .kubelet
        .allocate(DEV1, &[&["/node1/dev1/2::0", "/node1/dev1/2::1"]])
        .await
        .expect("allocates replicas");
    let envs = &response.container_responses[0].envs;
    assert_eq!(
        envs.get("DEV_dev_1_ID_0").map(String::as_str),
        Some("/node1/dev1/2")
    );
    assert!(!envs.contains_key("DEV_dev_1_ID_1"), "{envs:?}");
    // Removing the manifest goes back to the defaults, on the same stream.
    std::fs::remove_file(fixture.dirs.modules().join("virtual.toml")).expect("rm manifest");
    let view = fixture
        .wait_for("dev-1 back to its own ids", |v| ids(v, DEV1) == V1_DEV1)
        .await;
    assert_eq!(view.plugins[DEV1].registrations, 1);
    fixture.stop().await;
}

#[tokio::test]
async fn manifest_edit_of_one_module_never_interrupts_another_modules_stream() {
    let dirs = virtual_devices();
    dirs.add_module("other", guests::VIRTUAL_DEVICES);
    dirs.write_manifest("other", "domain = \"other.example\"\n");
    let fixture = Fixture::start(dirs);
    const OTHER: &str = "other.example/dev-1";
    fixture.listed(DEV1).await;
    let before = fixture.listed(OTHER).await.plugins[OTHER].clone();
    fixture.dirs.write_manifest(
        "virtual",
        "[config]\nkinds = \"dev-1=6,dev-2=2\"\n[resources.dev-2]\nname = \"renamed\"\n",
    );
    let view = fixture
        .wait_for("virtual reconfigured", |v| {
            ids(v, DEV1).len() == 6 && v.plugin("example.com/renamed").is_some_and(|p| p.streaming)
        })
        .await;
    assert!(
        !view.plugins[DEV2].streaming,
        "the old name is unregistered"
    );
    assert_eq!(view.plugins[DEV1].registrations, 1);
    let other = &view.plugins[OTHER];
    assert!(other.streaming);
    assert_eq!(other.registrations, before.registrations);
    assert_eq!(
        other.updates, before.updates,
        "no update on the other module's stream"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn bad_manifest_names_file_and_field_and_other_modules_keep_serving() {
    let dirs = virtual_devices();
    dirs.add_module("broken", guests::VIRTUAL_DEVICES);
    dirs.write_manifest(
        "broken",
        "domain = \"b.example\"\n[limits]\nmemory-mib = 0\n",
    );
    let fixture = Fixture::start(dirs);
    let states = fixture.settled().await;
    let Some(ModuleState::Failed(reason)) = states.get("broken") else {
        panic!("broken manifest accepted: {states:?}");
    };
    assert!(reason.contains("broken.toml"), "{reason}");
    assert!(reason.contains("limits.memory-mib"), "{reason}");
    fixture.listed(DEV1).await;

    // A bad edit of a serving module's manifest keeps its last good settings.
    fixture
        .dirs
        .write_manifest("virtual", "[resources.dev-1]\nreplicas = 2\n");
    fixture
        .wait_for("replicas", |v| ids(v, DEV1).len() == 8)
        .await;
    fixture
        .dirs
        .write_manifest("virtual", "[resources.dev-1]\nreplicas = \"many\"\n");
    let reason = fixture.refused("virtual", 1).await;
    assert!(
        reason.contains("virtual.toml") && reason.contains("line 2"),
        "{reason}"
    );
    assert_eq!(
        ids(&fixture.kubelet.view(), DEV1).len(),
        8,
        "last good settings kept"
    );
    // Fixing the broken module's manifest loads it.
    fixture
        .dirs
        .write_manifest("broken", "domain = \"b.example\"\n");
    fixture.listed("b.example/dev-1").await;
    assert!(matches!(
        fixture.host.states().borrow().get("virtual"),
        Some(ModuleState::Serving(_))
    ));
    fixture.stop().await;
}

// Two workers, as the binary runs: the spinning guest holds one between its
// yields (every epoch tick), the other module runs on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_whose_scan_hangs_does_not_delay_another_modules_registration() {
    let dirs = virtual_devices();
    dirs.add_module("faulty", guests::FAULTY);
    dirs.write_manifest(
        "faulty",
        "[config]\nspin = \"scan\"\n[limits]\nscan-timeout = \"60s\"\n",
    );
    let fixture = Fixture::start(dirs);
    fixture.listed(DEV1).await;
    fixture.listed(DEV2).await;
    assert_eq!(
        fixture.host.states().borrow().get("faulty"),
        Some(&ModuleState::Loading),
        "the hanging module is still in its first scan"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn health_hysteresis_settings_from_the_manifest_still_mark_a_failing_device_unhealthy() {
    let dirs = virtual_devices();
    dirs.write_manifest(
        "virtual",
        "[resources.dev-1]\nunhealthy-after = 3\nhealthy-after = 2\n",
    );
    let fixture = Fixture::start(dirs);
    fixture.listed(DEV1).await;
    fixture.dirs.write_manifest(
        "virtual",
        "[config]\nunhealthy = \"/node1/dev1/3\"\n[resources.dev-1]\nunhealthy-after = 3\nhealthy-after = 2\n",
    );
    let view = fixture
        .wait_for("dev 3 unhealthy", |v| {
            v.plugin(DEV1)
                .is_some_and(|p| p.devices.iter().any(|d| d.health == "Unhealthy"))
        })
        .await;
    assert_eq!(
        view.plugins[DEV1].healthy_ids(),
        ["/node1/dev1/1", "/node1/dev1/2", "/node1/dev1/4"]
    );
    fixture.stop().await;
}

#[tokio::test]
async fn module_file_deleted_while_being_written_is_forgotten() {
    let fixture = Fixture::start(Dirs::new());
    let path = fixture.dirs.modules().join("half.wasm");
    let mut file = std::fs::File::create(&path).expect("create");
    file.write_all(b"\0asm\x0d\0\x01\0").expect("write");
    file.flush().expect("flush");
    assert_eq!(
        fixture.module_state("half", |s| s.is_some()).await,
        Some(ModuleState::Settling)
    );
    std::fs::remove_file(&path).expect("rm");
    fixture.module_state("half", |s| s.is_none()).await;
    assert!(fixture.settled().await.is_empty());
    drop(file);
    assert_eq!(fixture.host.stats().refused, 0, "never read");
    fixture.stop().await;
}
