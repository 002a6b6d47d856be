//! The generic guest (`guests/generic`) on a fake device tree: regular files
//! under `<temp>/fake/dev` stand for device nodes, and the config's `root` maps
//! `<temp>/fake` to `/`, so patterns, ids and container paths read as on a node
//! while the host paths handed to kubelet are the fake ones.

use std::path::PathBuf;

use tonic::Code;
use wasm_device_plugin::kubelet::deviceplugin::proto::AllocateResponse;
use wasm_device_plugin::kubelet::deviceplugin::simulator::KubeletView;
use wasm_device_plugin::registry::ModuleState;
use wdp_tests::{Dirs, Fixture, guests, ids, status_of};

const SERIAL: &str = "example.com/serial";
const AUDIO: &str = "example.com/audio";
const CAMERA: &str = "example.com/camera";

/// The generic module on a fake tree holding `nodes`: paths under `dev/`, a
/// trailing `/` makes a directory and `link -> target` a symlink.
struct Tree {
    fixture: Fixture,
    /// `<temp>/fake`, symlinks resolved: what `/` is to the module.
    root: PathBuf,
}

impl Tree {
    /// Starts the host on the tree with `config` (the `[config]` lines after
    /// `root`), then `tables` (more manifest tables, e.g. `[resources.serial]`),
    /// and `scan_interval`. Health is checked every 50 ms.
    fn start(nodes: &[&str], config: &str, tables: &str, scan_interval: &str) -> Self {
        let dirs = Dirs::new();
        let root = std::fs::canonicalize(dirs.root.path())
            .expect("temp dir")
            .join("fake");
        for node in nodes {
            if let Some((link, target)) = node.split_once(" -> ") {
                let path = root.join("dev").join(link);
                std::fs::create_dir_all(path.parent().expect("parent")).expect("directory");
                std::os::unix::fs::symlink(target, &path).expect("symlink");
                continue;
            }
            let path = root.join("dev").join(node.trim_end_matches('/'));
            if node.ends_with('/') {
                std::fs::create_dir_all(&path).expect("directory");
            } else {
                std::fs::create_dir_all(path.parent().expect("parent")).expect("directory");
                std::fs::write(&path, "").expect("node");
            }
        }
        let dev = root.join("dev");
        dirs.add_module("generic", guests::GENERIC);
        dirs.write_manifest(
            "generic",
            &format!(
                "scan-interval = {scan_interval:?}\nhealth-interval = \"50ms\"\n\
                 [grants]\nread-only-dirs = [{dev:?}]\ndevice-paths = [{dev:?}]\n\
                 [config]\nroot = {root:?}\n{config}\n{tables}\n"
            ),
        );
        Self {
            fixture: Fixture::start(dirs),
            root,
        }
    }

    /// A tree that is only scanned at load.
    fn scanned_once(nodes: &[&str], config: &str) -> Self {
        Self::start(nodes, config, "", "1h")
    }

    /// The fake node `dev/<node>` as the host sees it.
    fn host_path(&self, node: &str) -> String {
        self.root.join("dev").join(node).display().to_string()
    }

    async fn stop(self) {
        self.fixture.stop().await;
    }
}

/// Per container of `response`, its device nodes as (host path, container
/// path, permissions).
fn nodes_of(response: &AllocateResponse) -> Vec<Vec<(String, String, String)>> {
    response
        .container_responses
        .iter()
        .map(|c| {
            c.devices
                .iter()
                .map(|d| {
                    (
                        d.host_path.clone(),
                        d.container_path.clone(),
                        d.permissions.clone(),
                    )
                })
                .collect()
        })
        .collect()
}

fn node(host: &str, container: &str, permissions: &str) -> (String, String, String) {
    (host.into(), container.into(), permissions.into())
}

fn health_of(view: &KubeletView, resource: &str, id: &str) -> Option<String> {
    view.plugin(resource)?
        .devices
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.health.clone())
}

/// The module failed to load, by an invalid-request answer of its first scan
/// naming `key`; returns the reason.
async fn fails_to_load(config: &str, key: &str) -> String {
    let tree = Tree::scanned_once(&["ttyUSB0"], config);
    let state = tree
        .fixture
        .module_state("generic", |s| matches!(s, Some(ModuleState::Failed(_))))
        .await;
    let Some(ModuleState::Failed(reason)) = state else {
        unreachable!("waited for Failed")
    };
    assert!(
        reason.contains("module generic: scan returned an error: invalid request"),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("config `{key}`: ")),
        "names {key}: {reason}"
    );
    assert!(tree.fixture.kubelet.view().plugins.is_empty());
    tree.stop().await;
    reason
}

const SERIAL_AND_AUDIO: &str = "kinds = \"serial,audio\"\n\
     \"serial.paths\" = \"/dev/ttyUSB*,/dev/ttyACM[0-9]\"\n\
     \"audio.paths\" = \"/dev/snd/*\"\n";

const NODES: &[&str] = &[
    "ttyUSB1",
    "ttyUSB0",
    "ttyACM0",
    "ttyACMx",
    "ttyS0",
    ".ttyUSB9",
    "snd/pcmC0D0p",
    "snd/controlC0",
    "snd/by-path/",
    "video/",
];

#[tokio::test]
async fn globs_select_each_kinds_devices() {
    let tree = Tree::scanned_once(NODES, SERIAL_AND_AUDIO);
    tree.fixture.listed(SERIAL).await;
    let view = tree.fixture.listed(AUDIO).await;
    // Pattern by pattern, each pattern's matches by name; hidden names, other
    // names and directories are no match.
    assert_eq!(ids(&view, SERIAL), ["ttyUSB0", "ttyUSB1", "ttyACM0"]);
    assert_eq!(ids(&view, AUDIO), ["snd/controlC0", "snd/pcmC0D0p"]);
    for resource in [SERIAL, AUDIO] {
        assert!(
            view.plugins[resource]
                .devices
                .iter()
                .all(|d| d.health == "Healthy"),
            "{resource}"
        );
    }
    assert_eq!(
        tree.fixture.settled().await.get("generic"),
        Some(&ModuleState::Serving(vec![
            AUDIO.to_string(),
            SERIAL.to_string()
        ]))
    );
    tree.stop().await;
}

#[tokio::test]
async fn allocate_gives_each_container_its_devices_nodes() {
    let tree = Tree::scanned_once(NODES, SERIAL_AND_AUDIO);
    tree.fixture.listed(SERIAL).await;
    let response = tree
        .fixture
        .kubelet
        .allocate(SERIAL, &[&["ttyUSB1"], &["ttyACM0", "ttyUSB0"]])
        .await
        .expect("allocated");
    // The host path as the host resolved it; in the container, the path the
    // node has under `root`.
    assert_eq!(
        nodes_of(&response),
        [
            vec![node(&tree.host_path("ttyUSB1"), "/dev/ttyUSB1", "rw")],
            vec![
                node(&tree.host_path("ttyACM0"), "/dev/ttyACM0", "rw"),
                node(&tree.host_path("ttyUSB0"), "/dev/ttyUSB0", "rw"),
            ],
        ]
    );
    let c = &response.container_responses[0];
    assert!(c.envs.is_empty() && c.mounts.is_empty() && c.annotations.is_empty());
    tree.stop().await;
}

#[tokio::test]
async fn group_all_is_one_device_with_every_node() {
    let config =
        format!("{SERIAL_AND_AUDIO}\"audio.group\" = \"all\"\n\"audio.permissions\" = \"r\"\n");
    let tree = Tree::scanned_once(NODES, &config);
    let view = tree.fixture.listed(AUDIO).await;
    assert_eq!(ids(&view, AUDIO), ["audio"]);
    let response = tree
        .fixture
        .kubelet
        .allocate(AUDIO, &[&["audio"]])
        .await
        .expect("allocated");
    assert_eq!(
        nodes_of(&response),
        [vec![
            node(&tree.host_path("snd/controlC0"), "/dev/snd/controlC0", "r"),
            node(&tree.host_path("snd/pcmC0D0p"), "/dev/snd/pcmC0D0p", "r"),
        ]]
    );
    tree.stop().await;
}

#[tokio::test]
async fn replicas_let_two_containers_share_one_device() {
    let tree = Tree::start(
        &["ttyUSB0"],
        "kinds = \"serial\"\n\"serial.paths\" = \"/dev/ttyUSB*\"\n",
        "[resources.serial]\nreplicas = 2\n",
        "1h",
    );
    let view = tree.fixture.listed(SERIAL).await;
    assert_eq!(ids(&view, SERIAL), ["ttyUSB0::0", "ttyUSB0::1"]);
    let shared = vec![node(&tree.host_path("ttyUSB0"), "/dev/ttyUSB0", "rw")];
    // Two pods, one replica each...
    for replica in ["ttyUSB0::0", "ttyUSB0::1"] {
        let response = tree
            .fixture
            .kubelet
            .allocate(SERIAL, &[&[replica]])
            .await
            .expect("allocated");
        assert_eq!(
            nodes_of(&response),
            std::slice::from_ref(&shared),
            "{replica}"
        );
    }
    // ...or one pod with two containers.
    let response = tree
        .fixture
        .kubelet
        .allocate(SERIAL, &[&["ttyUSB0::0"], &["ttyUSB0::1"]])
        .await
        .expect("allocated");
    assert_eq!(nodes_of(&response), [shared.clone(), shared]);
    tree.stop().await;
}

/// Two serial ports, each advertised twice.
fn two_shared_ports() -> Tree {
    Tree::start(
        &["ttyUSB0", "ttyUSB1"],
        "kinds = \"serial\"\n\"serial.paths\" = \"/dev/ttyUSB*\"\n",
        "[resources.serial]\nreplicas = 2\n",
        "1h",
    )
}

#[tokio::test]
async fn preferred_allocation_of_two_replicas_spreads_over_two_devices() {
    let tree = two_shared_ports();
    let view = tree.fixture.listed(SERIAL).await;
    let listed = ids(&view, SERIAL);
    assert_eq!(
        listed,
        ["ttyUSB0::0", "ttyUSB0::1", "ttyUSB1::0", "ttyUSB1::1"]
    );
    let available: Vec<&str> = listed.iter().map(String::as_str).collect();
    let response = tree
        .fixture
        .kubelet
        .preferred_allocation(SERIAL, &available, &[], 2)
        .await
        .expect("preferred");
    assert_eq!(
        response.container_responses[0].device_i_ds,
        ["ttyUSB0::0", "ttyUSB1::0"]
    );
    tree.stop().await;
}

#[tokio::test]
async fn allocate_of_two_replicas_of_one_device_gives_it_once() {
    // Kubelet may ignore the preference; two replicas of one device in one
    // container are that device, once.
    let tree = two_shared_ports();
    tree.fixture.listed(SERIAL).await;
    let response = tree
        .fixture
        .kubelet
        .allocate(SERIAL, &[&["ttyUSB0::0", "ttyUSB0::1"]])
        .await
        .expect("allocated");
    assert_eq!(
        nodes_of(&response),
        [vec![node(&tree.host_path("ttyUSB0"), "/dev/ttyUSB0", "rw")]]
    );
    tree.stop().await;
}

#[tokio::test]
async fn a_shared_device_whose_node_vanishes_is_unhealthy_in_every_replica() {
    let tree = two_shared_ports();
    tree.fixture.listed(SERIAL).await;
    std::fs::remove_file(tree.host_path("ttyUSB0")).expect("remove node");
    let view = tree
        .fixture
        .wait_for("ttyUSB0's replicas unhealthy", |v| {
            ["ttyUSB0::0", "ttyUSB0::1"]
                .iter()
                .all(|id| health_of(v, SERIAL, id).as_deref() == Some("Unhealthy"))
        })
        .await;
    assert_eq!(
        view.plugins[SERIAL].healthy_ids(),
        ["ttyUSB1::0", "ttyUSB1::1"]
    );
    tree.stop().await;
}

#[tokio::test]
async fn a_removed_node_makes_its_device_unhealthy_until_it_returns() {
    let tree = Tree::scanned_once(NODES, SERIAL_AND_AUDIO);
    tree.fixture.listed(SERIAL).await;
    std::fs::remove_file(tree.host_path("ttyUSB1")).expect("remove node");
    let view = tree
        .fixture
        .wait_for("ttyUSB1 unhealthy", |v| {
            health_of(v, SERIAL, "ttyUSB1").as_deref() == Some("Unhealthy")
        })
        .await;
    // Still listed (no re-scan for an hour), the others healthy.
    assert_eq!(ids(&view, SERIAL), ["ttyUSB0", "ttyUSB1", "ttyACM0"]);
    assert_eq!(view.plugins[SERIAL].healthy_ids(), ["ttyUSB0", "ttyACM0"]);
    let (code, message) = status_of(tree.fixture.kubelet.allocate(SERIAL, &[&["ttyUSB1"]]).await);
    assert_eq!(code, Code::FailedPrecondition);
    assert!(message.contains("ttyUSB1"), "{message}");

    std::fs::write(tree.host_path("ttyUSB1"), "").expect("node back");
    let view = tree
        .fixture
        .wait_for("ttyUSB1 healthy again", |v| {
            health_of(v, SERIAL, "ttyUSB1").as_deref() == Some("Healthy")
        })
        .await;
    assert_eq!(view.plugins[SERIAL].healthy_ids().len(), 3);
    tree.stop().await;
}

#[tokio::test]
async fn a_group_with_no_node_left_is_unhealthy() {
    let config = format!("{SERIAL_AND_AUDIO}\"audio.group\" = \"all\"\n");
    let tree = Tree::scanned_once(NODES, &config);
    tree.fixture.listed(AUDIO).await;
    std::fs::remove_file(tree.host_path("snd/pcmC0D0p")).expect("remove node");
    std::fs::remove_file(tree.host_path("snd/controlC0")).expect("remove node");
    let view = tree
        .fixture
        .wait_for("audio unhealthy", |v| {
            health_of(v, AUDIO, "audio").as_deref() == Some("Unhealthy")
        })
        .await;
    assert_eq!(ids(&view, AUDIO), ["audio"]);
    tree.stop().await;
}

#[tokio::test]
async fn a_kind_matching_nothing_has_no_devices_until_a_rescan_finds_one() {
    let tree = Tree::start(
        NODES,
        "kinds = \"serial,camera\"\n\"serial.paths\" = \"/dev/ttyUSB*\"\n\"camera.paths\" = \"/dev/video*\"\n",
        "",
        "100ms",
    );
    let view = tree.fixture.listed(CAMERA).await;
    assert!(ids(&view, CAMERA).is_empty(), "{view:#?}");
    assert_eq!(view.plugins[CAMERA].registration.resource_name, CAMERA);
    std::fs::write(tree.host_path("video0"), "").expect("node");
    tree.fixture
        .wait_for("video0 found", |v| ids(v, CAMERA) == ["video0"])
        .await;
    let response = tree
        .fixture
        .kubelet
        .allocate(CAMERA, &[&["video0"]])
        .await
        .expect("allocated");
    assert_eq!(
        nodes_of(&response),
        [vec![node(&tree.host_path("video0"), "/dev/video0", "rw")]]
    );
    tree.stop().await;
}

#[tokio::test]
async fn a_symlinked_node_keeps_its_name_in_the_container_and_resolves_on_the_host() {
    let link = "serial/by-id/usb-FTDI_FT232R_A1-if00-port0";
    let tree = Tree::scanned_once(
        &[
            "ttyUSB0",
            &format!("{link} -> ../../ttyUSB0"),
            "serial/by-id/dangling -> ../../ttyUSB7",
        ],
        "kinds = \"serial\"\n\"serial.paths\" = \"/dev/serial/by-id/*\"\n",
    );
    let view = tree.fixture.listed(SERIAL).await;
    // The dangling link is no match.
    assert_eq!(ids(&view, SERIAL), [link]);
    let response = tree
        .fixture
        .kubelet
        .allocate(SERIAL, &[&[link]])
        .await
        .expect("allocated");
    assert_eq!(
        nodes_of(&response),
        [vec![node(
            &tree.host_path("ttyUSB0"),
            &format!("/dev/{link}"),
            "rw"
        )]]
    );
    tree.stop().await;
}

// --- Bad configuration: the module does not load, the reason names the key --

#[tokio::test]
async fn a_config_without_kinds_fails_the_module() {
    let reason = fails_to_load("\"serial.paths\" = \"/dev/ttyUSB*\"", "kinds").await;
    assert!(reason.contains("not set"), "{reason}");
}

#[tokio::test]
async fn an_unknown_key_for_a_listed_kind_fails_the_module() {
    let reason = fails_to_load(
        "kinds = \"serial\"\n\"serial.paths\" = \"/dev/ttyUSB*\"\n\"serial.path\" = \"/dev/ttyACM*\"",
        "serial.path",
    )
    .await;
    assert!(reason.contains("unknown key"), "{reason}");
}

#[tokio::test]
async fn a_key_for_a_kind_not_listed_fails_the_module() {
    let reason = fails_to_load(
        "kinds = \"serial\"\n\"serial.paths\" = \"/dev/ttyUSB*\"\n\"audio.paths\" = \"/dev/snd/*\"",
        "audio.paths",
    )
    .await;
    assert!(
        reason.contains("`audio` is not listed in `kinds`"),
        "{reason}"
    );
}

#[tokio::test]
async fn empty_paths_fail_the_module() {
    let reason = fails_to_load(
        "kinds = \"serial\"\n\"serial.paths\" = \" , \"",
        "serial.paths",
    )
    .await;
    assert!(reason.contains("holds no patterns"), "{reason}");
}

#[tokio::test]
async fn a_relative_pattern_fails_the_module() {
    let reason = fails_to_load(
        "kinds = \"serial\"\n\"serial.paths\" = \"/dev/ttyACM*,ttyUSB*\"",
        "serial.paths",
    )
    .await;
    assert!(
        reason.contains("`ttyUSB*` is not an absolute path"),
        "{reason}"
    );
}

// --- The shipped example --------------------------------------------------

/// Names in `/dev` that start with `prefix`, sorted (what `/dev/<prefix>*` finds).
fn dev_names(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/dev")
        .expect("/dev")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .filter(|n| std::fs::metadata(format!("/dev/{n}")).is_ok_and(|m| !m.is_dir()))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn the_example_manifest_serves_its_kinds_from_this_machines_dev() {
    let dirs = Dirs::new();
    dirs.add_module("generic", guests::GENERIC);
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/modules/generic.toml"
    );
    dirs.write_manifest(
        "generic",
        &std::fs::read_to_string(example).expect("examples/modules/generic.toml"),
    );
    let fixture = Fixture::start(dirs);
    let [serial, audio, video] =
        ["serial", "audio", "video"].map(|k| format!("devices.example.com/{k}"));
    let view = fixture
        .wait_for("the three kinds listed", |v| {
            [&serial, &audio, &video]
                .iter()
                .all(|r| v.plugin(r).is_some_and(|p| !p.updates.is_empty()))
        })
        .await;
    let expected: Vec<String> = [dev_names("ttyUSB"), dev_names("ttyACM")].concat();
    assert_eq!(ids(&view, &serial), expected);
    let expected: Vec<String> = dev_names("video")
        .into_iter()
        .filter(|n| n[5..].starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(ids(&view, &video), expected);
    // /dev/snd is one device, shared by four containers; none without a sound card.
    let snd = std::fs::read_dir("/dev/snd").is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| std::fs::metadata(e.path()).is_ok_and(|m| !m.is_dir()))
    });
    let expected: Vec<&str> = if snd {
        vec!["audio::0", "audio::1", "audio::2", "audio::3"]
    } else {
        vec![]
    };
    assert_eq!(ids(&view, &audio), expected);
    fixture.stop().await;
}
