//! The FPGA guest (`guests/fpga`) on a fake DFL tree: sysfs laid out as on a node
//! (class entries symlinked into `/sys/devices`, the FME's own PR region beside
//! the cards) and device nodes as plain files, both in the test's temporary
//! directory and granted through the manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use wasm_device_plugin::kubelet::deviceplugin::proto::ContainerAllocateResponse;
use wasm_device_plugin::kubelet::deviceplugin::simulator::KubeletView;
use wasm_device_plugin::registry::ModuleState;
use wdp_tests::{Dirs, Fixture, guests, health_of, ids};

/// Interface and accelerator function ids from Intel's plugin tests, with the af
/// resource names Intel's encoding gives them (`pkg/fpga/devtypes_test.go`).
const IF_A: &str = "ce48969398f05f33946d560708be108a";
const IF_B: &str = "bfac4d851ee856fe8c95865ce1bbaa2d";
const AF_1: &str = "d8424dc4a4a3c413f89e433683f9040b";
const AF_2: &str = "f7df405cbd7acf7222f144b0b93acd18";
const AF_A1: &str = "fpga.intel.com/af-ce4.d84.zkiWk5jwXzOUbVYHCL4QithCTcSko8QT-J5DNoP5BAs";
const AF_B2: &str = "fpga.intel.com/af-bfa.f7d.v6xNhR7oVv6MlYZc4buqLfffQFy9es9yIvFEsLk6zRg";
/// An all-`f` id: what the driver reports when the firmware crashed.
const CRASHED: &str = "ffffffffffffffffffffffffffffffff";
const AF_A_CRASHED: &str = "fpga.intel.com/af-ce4.fff.zkiWk5jwXzOUbVYHCL4Qiv____________________8";

fn region(interface: &str) -> String {
    format!("fpga.intel.com/region-{interface}")
}

/// What a port's `afu_id` holds.
#[derive(Clone, Copy)]
enum Afu<'a> {
    Id(&'a str),
    /// No `afu_id` file.
    Absent,
}

/// A fake node: `sys/` and `dev/` under the test's temporary directory.
struct FakeNode {
    root: PathBuf,
}

impl FakeNode {
    fn new(dirs: &Dirs) -> Self {
        let root = dirs.root.path().to_path_buf();
        std::fs::create_dir_all(root.join("sys/class/fpga_region")).expect("sysfs class");
        std::fs::create_dir_all(root.join("dev")).expect("dev");
        Self { root }
    }

    fn sysfs_root(&self) -> PathBuf {
        self.root.join("sys/class/fpga_region")
    }

    fn dev(&self) -> PathBuf {
        self.root.join("dev")
    }

    /// Card `n`'s directory under `sys/devices` (what `regionN` links to).
    fn card_dir(&self, n: u32) -> PathBuf {
        self.root.join(format!(
            "sys/devices/pci0000:00/0000:00:0{n}.0/fpga_region/region{}",
            2 * n
        ))
    }

    /// Adds card `n` as the DFL driver lays it out: `region<2n>` holding
    /// `dfl-fme.<n>` (whose PR region, `region<2n+1>`, is also in the class, with
    /// `interface` as its `compat_id`) and a `dfl-port.<p>` for each of `ports`;
    /// the FME's and ports' device nodes in `dev/`.
    fn card(&self, n: u32, interface: &str, ports: &[(u32, Afu)]) {
        let card = self.card_dir(n);
        let pr = format!(
            "dfl-fme.{n}/dfl-fme-region.{n}/fpga_region/region{}",
            2 * n + 1
        );
        std::fs::create_dir_all(card.join(&pr)).expect("fme");
        std::fs::write(card.join(&pr).join("compat_id"), format!("{interface}\n"))
            .expect("compat_id");
        self.link(&format!("region{}", 2 * n), &card);
        self.link(&format!("region{}", 2 * n + 1), &card.join(&pr));
        self.node(&format!("dfl-fme.{n}"));
        for (p, afu) in ports {
            self.port(n, *p, *afu);
        }
    }

    /// Adds port `p` with `afu` to card `n`, and its node.
    fn port(&self, n: u32, p: u32, afu: Afu) {
        let port = self.card_dir(n).join(format!("dfl-port.{p}"));
        std::fs::create_dir_all(&port).expect("port");
        if let Afu::Id(id) = afu {
            std::fs::write(port.join("afu_id"), format!("{id}\n")).expect("afu_id");
        }
        self.node(&format!("dfl-port.{p}"));
    }

    /// `sys/class/fpga_region/<name>` as a relative symlink to `target`, as sysfs has it.
    fn link(&self, name: &str, target: &Path) {
        let relative = Path::new("../..").join(
            target
                .strip_prefix(self.root.join("sys"))
                .expect("under sys"),
        );
        std::os::unix::fs::symlink(relative, self.sysfs_root().join(name)).expect("class link");
    }

    fn node(&self, name: &str) {
        std::fs::write(self.dev().join(name), "").expect("device node");
    }

    /// The manifest serving this node in `mode` (the default when `None`), health
    /// checked every 50 ms and no re-scan during a test. With `see_nodes` the
    /// guest may also read `dev/`, so that it checks the device nodes.
    fn manifest(&self, mode: Option<&str>, see_nodes: bool) -> String {
        let sys = self.root.join("sys");
        let dev = self.dev();
        let read = if see_nodes {
            format!("[{sys:?}, {dev:?}]")
        } else {
            format!("[{sys:?}]")
        };
        let mode = mode.map(|m| format!("mode = {m:?}\n")).unwrap_or_default();
        format!(
            "scan-interval = \"1h\"\nhealth-interval = \"50ms\"\n\
             [grants]\nread-only-dirs = {read}\ndevice-paths = [{dev:?}]\n\
             [config]\n{mode}sysfs-root = {:?}\ndev-root = {dev:?}\n",
            self.sysfs_root()
        )
    }

    /// A device node's host path as the host hands it to kubelet: resolved.
    fn host_path(&self, name: &str) -> String {
        std::fs::canonicalize(self.dev().join(name))
            .expect("node exists")
            .display()
            .to_string()
    }
}

/// The fpga guest as module `fpga` on `node`, served with `manifest`.
fn start(dirs: Dirs, manifest: &str) -> Fixture {
    dirs.add_module("fpga", guests::FPGA);
    dirs.write_manifest("fpga", manifest);
    Fixture::start(dirs)
}

/// A fake node built by `build`, served in `mode`.
fn serve(
    mode: Option<&str>,
    see_nodes: bool,
    build: impl FnOnce(&FakeNode),
) -> (Fixture, FakeNode) {
    let dirs = Dirs::new();
    let node = FakeNode::new(&dirs);
    build(&node);
    let manifest = node.manifest(mode, see_nodes);
    (start(dirs, &manifest), node)
}

/// The resources the module serves, once it has loaded.
async fn served(fixture: &Fixture) -> BTreeSet<String> {
    match fixture
        .module_state("fpga", |s| {
            matches!(s, Some(ModuleState::Serving(_) | ModuleState::Failed(_)))
        })
        .await
    {
        Some(ModuleState::Serving(resources)) => resources.into_iter().collect(),
        other => panic!("fpga did not load: {other:?}"),
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// Waits until every one of `resources` is listed; returns the view.
async fn all_listed(fixture: &Fixture, resources: &[&str]) -> KubeletView {
    fixture
        .wait_for(&format!("{resources:?} listed"), |v| {
            resources.iter().all(|r| {
                v.plugin(r)
                    .is_some_and(|p| p.streaming && !p.updates.is_empty())
            })
        })
        .await
}

/// A container's device nodes as (host path, container path, permissions).
fn nodes(c: &ContainerAllocateResponse) -> Vec<(&str, &str, &str)> {
    c.devices
        .iter()
        .map(|d| {
            (
                d.host_path.as_str(),
                d.container_path.as_str(),
                d.permissions.as_str(),
            )
        })
        .collect()
}

fn annotations(c: &ContainerAllocateResponse) -> BTreeMap<&str, &str> {
    c.annotations
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[tokio::test]
async fn region_mode_serves_a_resource_per_interface_id() {
    let (fixture, _node) = serve(Some("region"), false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1))]);
        node.card(1, IF_B, &[(1, Afu::Id(AF_2))]);
        node.card(2, IF_A, &[(2, Afu::Id(AF_2)), (3, Afu::Id(AF_1))]);
    });
    let view = all_listed(&fixture, &[&region(IF_A), &region(IF_B)]).await;
    assert_eq!(ids(&view, &region(IF_A)), ["dfl-fme.0", "dfl-fme.2"]);
    assert_eq!(ids(&view, &region(IF_B)), ["dfl-fme.1"]);
    assert!(
        view.plugins
            .values()
            .flat_map(|p| &p.devices)
            .all(|d| d.health == "Healthy")
    );
    // The FMEs' own PR regions in the class are not cards.
    assert_eq!(served(&fixture).await, set(&[&region(IF_A), &region(IF_B)]));
    fixture.stop().await;
}

#[tokio::test]
async fn region_mode_allocate_gives_the_ports_and_the_cri_hook_annotation() {
    let (fixture, node) = serve(Some("region"), false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1)), (1, Afu::Id(AF_2))]);
    });
    fixture.listed(&region(IF_A)).await;
    let response = fixture
        .kubelet
        .allocate(&region(IF_A), &[&["dfl-fme.0"]])
        .await
        .expect("allocated");
    let c = &response.container_responses[0];
    // The ports only, as Intel's region mode: the CRI hook programs through the FME.
    assert_eq!(
        nodes(c),
        [
            (
                node.host_path("dfl-port.0").as_str(),
                "/dev/dfl-port.0",
                "rw"
            ),
            (
                node.host_path("dfl-port.1").as_str(),
                "/dev/dfl-port.1",
                "rw"
            ),
        ]
    );
    assert_eq!(
        annotations(c),
        BTreeMap::from([("com.intel.fpga.mode", "fpga.intel.com/region")])
    );
    assert!(c.envs.is_empty() && c.mounts.is_empty() && c.cdi_devices.is_empty());
    fixture.stop().await;
}

#[tokio::test]
async fn region_mode_annotates_every_container() {
    let (fixture, _node) = serve(Some("region"), false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1))]);
        node.card(1, IF_A, &[(1, Afu::Id(AF_1))]);
    });
    fixture.listed(&region(IF_A)).await;
    let response = fixture
        .kubelet
        .allocate(&region(IF_A), &[&["dfl-fme.1"], &["dfl-fme.0"]])
        .await
        .expect("allocated");
    assert_eq!(response.container_responses.len(), 2);
    for (c, port) in response
        .container_responses
        .iter()
        .zip(["/dev/dfl-port.1", "/dev/dfl-port.0"])
    {
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.devices[0].container_path, port);
        assert_eq!(
            annotations(c),
            BTreeMap::from([("com.intel.fpga.mode", "fpga.intel.com/region")])
        );
    }
    fixture.stop().await;
}

#[tokio::test]
async fn allocating_two_regions_to_one_container_merges_their_nodes() {
    let (fixture, node) = serve(Some("region"), false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1))]);
        node.card(1, IF_A, &[(1, Afu::Id(AF_1)), (2, Afu::Absent)]);
    });
    fixture.listed(&region(IF_A)).await;
    let response = fixture
        .kubelet
        .allocate(&region(IF_A), &[&["dfl-fme.1", "dfl-fme.0"]])
        .await
        .expect("allocated");
    assert_eq!(response.container_responses.len(), 1);
    let c = &response.container_responses[0];
    assert_eq!(
        nodes(c),
        [
            (
                node.host_path("dfl-port.1").as_str(),
                "/dev/dfl-port.1",
                "rw"
            ),
            (
                node.host_path("dfl-port.2").as_str(),
                "/dev/dfl-port.2",
                "rw"
            ),
            (
                node.host_path("dfl-port.0").as_str(),
                "/dev/dfl-port.0",
                "rw"
            ),
        ]
    );
    assert_eq!(
        annotations(c),
        BTreeMap::from([("com.intel.fpga.mode", "fpga.intel.com/region")])
    );
    fixture.stop().await;
}

#[tokio::test]
async fn regiondevel_mode_adds_the_fme_node_and_no_annotation() {
    let (fixture, node) = serve(Some("regiondevel"), false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1))]);
    });
    fixture.listed(&region(IF_A)).await;
    let response = fixture
        .kubelet
        .allocate(&region(IF_A), &[&["dfl-fme.0"]])
        .await
        .expect("allocated");
    let c = &response.container_responses[0];
    assert_eq!(
        nodes(c),
        [
            (
                node.host_path("dfl-port.0").as_str(),
                "/dev/dfl-port.0",
                "rw"
            ),
            (node.host_path("dfl-fme.0").as_str(), "/dev/dfl-fme.0", "rw"),
        ]
    );
    assert!(c.annotations.is_empty());
    fixture.stop().await;
}

#[tokio::test]
async fn af_mode_is_the_default_and_serves_a_resource_per_function_without_annotation() {
    let (fixture, node) = serve(None, false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1))]);
        node.card(1, IF_B, &[(1, Afu::Id(AF_2))]);
        node.card(2, IF_A, &[(2, Afu::Id(AF_1))]);
    });
    let view = all_listed(&fixture, &[AF_A1, AF_B2]).await;
    assert_eq!(ids(&view, AF_A1), ["dfl-port.0", "dfl-port.2"]);
    assert_eq!(ids(&view, AF_B2), ["dfl-port.1"]);
    assert_eq!(served(&fixture).await, set(&[AF_A1, AF_B2]));
    let response = fixture
        .kubelet
        .allocate(AF_A1, &[&["dfl-port.2"]])
        .await
        .expect("allocated");
    let c = &response.container_responses[0];
    assert_eq!(
        nodes(c),
        [(
            node.host_path("dfl-port.2").as_str(),
            "/dev/dfl-port.2",
            "rw"
        )]
    );
    assert!(c.annotations.is_empty());
    assert!(c.envs.is_empty());
    fixture.stop().await;
}

#[tokio::test]
async fn af_resources_register_under_intels_names() {
    let dirs = Dirs::new();
    let node = FakeNode::new(&dirs);
    node.card(0, IF_A, &[(0, Afu::Id(AF_1))]);
    let manifest = node.manifest(Some("af"), false);
    let fixture = start(dirs, &manifest);
    let view = fixture.listed(AF_A1).await;
    assert_eq!(ids(&view, AF_A1), ["dfl-port.0"]);
    fixture.stop().await;
}

#[tokio::test]
async fn af_mode_allocate_of_two_ports_merges_their_nodes() {
    let (fixture, node) = serve(Some("af"), false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1)), (1, Afu::Id(AF_1))]);
    });
    fixture.listed(AF_A1).await;
    let response = fixture
        .kubelet
        .allocate(AF_A1, &[&["dfl-port.0", "dfl-port.1"]])
        .await
        .expect("allocated");
    assert_eq!(
        nodes(&response.container_responses[0]),
        [
            (
                node.host_path("dfl-port.0").as_str(),
                "/dev/dfl-port.0",
                "rw"
            ),
            (
                node.host_path("dfl-port.1").as_str(),
                "/dev/dfl-port.1",
                "rw"
            ),
        ]
    );
    fixture.stop().await;
}

/// Card 0 holds a function; card 1's ports hold none (no `afu_id`, all zeros, empty).
fn one_card_without_a_function(node: &FakeNode) {
    node.card(0, IF_A, &[(0, Afu::Id(AF_1))]);
    node.card(
        1,
        IF_B,
        &[
            (1, Afu::Absent),
            (2, Afu::Id(&"0".repeat(32))),
            (3, Afu::Id("")),
        ],
    );
}

#[tokio::test]
async fn a_region_without_a_function_is_still_a_region() {
    let (fixture, node) = serve(Some("region"), false, one_card_without_a_function);
    let view = all_listed(&fixture, &[&region(IF_A), &region(IF_B)]).await;
    assert_eq!(ids(&view, &region(IF_B)), ["dfl-fme.1"]);
    assert_eq!(
        health_of(&view, &region(IF_B), "dfl-fme.1"),
        Some("Healthy")
    );
    let response = fixture
        .kubelet
        .allocate(&region(IF_B), &[&["dfl-fme.1"]])
        .await
        .expect("allocated");
    let paths: Vec<&str> = response.container_responses[0]
        .devices
        .iter()
        .map(|d| d.host_path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            node.host_path("dfl-port.1"),
            node.host_path("dfl-port.2"),
            node.host_path("dfl-port.3")
        ]
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_port_without_a_function_is_not_offered_in_af_mode() {
    let (fixture, _node) = serve(Some("af"), false, one_card_without_a_function);
    let view = fixture.listed(AF_A1).await;
    assert_eq!(ids(&view, AF_A1), ["dfl-port.0"]);
    assert_eq!(served(&fixture).await, set(&[AF_A1]));
    fixture.stop().await;
}

#[tokio::test]
async fn a_crashed_function_is_unhealthy() {
    let (fixture, _node) = serve(Some("af"), false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1)), (1, Afu::Id(CRASHED))]);
    });
    let view = all_listed(&fixture, &[AF_A1, AF_A_CRASHED]).await;
    assert_eq!(health_of(&view, AF_A1, "dfl-port.0"), Some("Healthy"));
    assert_eq!(
        health_of(&view, AF_A_CRASHED, "dfl-port.1"),
        Some("Unhealthy")
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_region_with_a_crashed_interface_is_unhealthy() {
    let (fixture, _node) = serve(Some("region"), false, |node| {
        node.card(0, CRASHED, &[(0, Afu::Id(AF_1))]);
    });
    let view = fixture.listed(&region(CRASHED)).await;
    assert_eq!(
        health_of(&view, &region(CRASHED), "dfl-fme.0"),
        Some("Unhealthy")
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_port_removed_from_sysfs_turns_unhealthy() {
    let (fixture, node) = serve(Some("af"), false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1)), (1, Afu::Id(AF_1))]);
    });
    let view = fixture.listed(AF_A1).await;
    assert_eq!(
        view.plugins[AF_A1].healthy_ids(),
        ["dfl-port.0", "dfl-port.1"]
    );
    std::fs::remove_dir_all(node.card_dir(0).join("dfl-port.1")).expect("remove port");
    let view = fixture
        .wait_for("dfl-port.1 unhealthy", |v| {
            health_of(v, AF_A1, "dfl-port.1") == Some("Unhealthy")
        })
        .await;
    assert_eq!(health_of(&view, AF_A1, "dfl-port.0"), Some("Healthy"));
    fixture.stop().await;
}

#[tokio::test]
async fn a_region_whose_port_node_disappears_turns_unhealthy() {
    let (fixture, node) = serve(Some("region"), true, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1))]);
        node.card(1, IF_A, &[(1, Afu::Id(AF_1))]);
    });
    let view = fixture.listed(&region(IF_A)).await;
    assert_eq!(
        view.plugins[&region(IF_A)].healthy_ids(),
        ["dfl-fme.0", "dfl-fme.1"]
    );
    std::fs::remove_file(node.dev().join("dfl-port.1")).expect("remove node");
    let view = fixture
        .wait_for("dfl-fme.1 unhealthy", |v| {
            health_of(v, &region(IF_A), "dfl-fme.1") == Some("Unhealthy")
        })
        .await;
    assert_eq!(
        health_of(&view, &region(IF_A), "dfl-fme.0"),
        Some("Healthy")
    );
    fixture.stop().await;
}

#[tokio::test]
async fn malformed_entries_are_skipped_and_the_rest_served() {
    let (fixture, _node) = serve(Some("af"), false, |node| {
        // Good, beside a port whose function id is not an id.
        node.card(0, IF_A, &[(0, Afu::Id(AF_1)), (1, Afu::Id("not-an-id"))]);
        // An interface id that is not one.
        node.card(1, "ce48", &[(2, Afu::Id(AF_1))]);
        // Two compat_ids under one FME.
        node.card(2, IF_A, &[(3, Afu::Id(AF_1))]);
        let second = node
            .card_dir(2)
            .join("dfl-fme.2/dfl-fme-region.9/fpga_region/region9");
        std::fs::create_dir_all(&second).expect("second PR region");
        std::fs::write(second.join("compat_id"), IF_B).expect("compat_id");
        // A port without an FME.
        node.port(3, 4, Afu::Id(AF_1));
        node.link("region6", &node.card_dir(3));
    });
    let view = fixture.listed(AF_A1).await;
    assert_eq!(ids(&view, AF_A1), ["dfl-port.0"]);
    assert_eq!(served(&fixture).await, set(&[AF_A1]));
    fixture.stop().await;
}

#[tokio::test]
async fn a_node_without_fpgas_serves_nothing() {
    let dirs = Dirs::new();
    let node = FakeNode::new(&dirs);
    std::fs::remove_dir_all(node.root.join("sys/class")).expect("no fpga_region class");
    let manifest = node.manifest(Some("region"), false);
    let fixture = start(dirs, &manifest);
    assert_eq!(served(&fixture).await, set(&[]));
    fixture.stop().await;
}

#[tokio::test]
async fn an_unknown_mode_fails_to_load_naming_it() {
    let (fixture, _node) = serve(Some("bitstream"), false, |node| {
        node.card(0, IF_A, &[(0, Afu::Id(AF_1))]);
    });
    let state = fixture
        .module_state("fpga", |s| matches!(s, Some(ModuleState::Failed(_))))
        .await;
    let Some(ModuleState::Failed(reason)) = state else {
        unreachable!()
    };
    assert!(reason.contains("`bitstream`"), "{reason}");
    fixture.stop().await;
}

#[tokio::test]
async fn the_example_manifest_loads() {
    let dirs = Dirs::new();
    // As on a node: this reads the machine's own /sys/class/fpga_region, if any.
    let fixture = start(dirs, include_str!("../../examples/modules/fpga.toml"));
    served(&fixture).await;
    fixture.stop().await;
}
