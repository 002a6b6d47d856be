//! Resources served with CDI (`cdi = true` in a manifest): the spec the host
//! writes, read as the runtimes' CDI library reads it (the
//! `container-device-interface` crate, run as `tests/cdi-check`: parsed,
//! validated, names resolved and injected into an OCI spec), the names Allocate answers with, and the
//! spec's life on disk: rewritten on a rescan, removed with its resource,
//! swept at the next start, others' specs never touched, a CDI directory
//! that cannot be written refusing the resource.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use wasm_device_plugin::cdi::{FILE_PREFIX, SPEC_VERSION, device_name};
use wasm_device_plugin::kubelet::deviceplugin::proto::AllocateResponse;
use wasm_device_plugin::registry::{ModuleState, RegistryError};
use wdp_tests::{Dirs, Fixture, WAIT, guests, ids, test_settings};

const NODES: &str = "example.com/nodes";
const SERIAL: &str = "example.com/serial";
const AUDIO: &str = "example.com/audio";

/// The spec file of `resource` in `dir`.
fn spec_path(dir: &Path, resource: &str) -> PathBuf {
    dir.join(format!("{FILE_PREFIX}{}.json", resource.replace('/', "_")))
}

/// A device node edit: (container path, host path, permissions).
type Node = (String, String, String);

/// The spec of `resource`, read and validated by the CDI library: its
/// devices by name, each with the (container path, host path, permissions) of
/// its device nodes, as the library parsed them.
fn read_valid(dir: &Path, resource: &str) -> Vec<(String, Vec<Node>)> {
    let path = spec_path(dir, resource);
    let read = cdi_check(&["read".as_ref(), path.as_os_str()])
        .unwrap_or_else(|e| panic!("{} does not validate: {e}", path.display()));
    assert_eq!(
        format!(
            "{}/{}",
            read["vendor"].as_str().unwrap_or_default(),
            read["class"].as_str().unwrap_or_default()
        ),
        resource
    );
    // The spec as the library parsed it.
    let parsed = &read["spec"];
    assert_eq!(parsed["cdiVersion"], SPEC_VERSION);
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    parsed["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            let nodes = d["containerEdits"]["deviceNodes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    (
                        text(&n["path"]),
                        text(&n["hostPath"]),
                        text(&n["permissions"]),
                    )
                })
                .collect();
            (text(&d["name"]), nodes)
        })
        .collect()
}

/// Runs `tests/cdi-check` with `args`: its JSON answer, or its error.
fn cdi_check(args: &[&std::ffi::OsStr]) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(guests::CDI_CHECK)
        .args(args)
        .output()
        .expect("run cdi-check");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("cdi-check prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Per container, the CDI names and the device nodes' container paths kubelet
/// was sent.
fn cdi_and_nodes(response: &AllocateResponse) -> Vec<(Vec<String>, Vec<String>)> {
    response
        .container_responses
        .iter()
        .map(|c| {
            (
                c.cdi_devices.iter().map(|d| d.name.clone()).collect(),
                c.devices.iter().map(|d| d.container_path.clone()).collect(),
            )
        })
        .collect()
}

/// The generic module serving `nodes` (`/dev/null`, `/dev/zero`: real device
/// nodes, so the CDI library can inject them) as kind `nodes`, with `extra`
/// manifest lines first.
fn real_nodes_manifest(extra: &str) -> String {
    format!(
        "{extra}\n[grants]\nread-only-dirs = [\"/dev\"]\n\
         [config]\nkinds = \"nodes\"\n\"nodes.paths\" = \"/dev/null,/dev/zero\"\n"
    )
}

/// The generic module on a fake tree under `<root>/fake` (regular files stand
/// for nodes): kinds `serial` (`/dev/ttyUSB*`) and `audio` (`/dev/snd/*`, ids
/// such as `snd/pcmC0D0p`, which are no CDI names), `permissions` for serial,
/// with `extra` manifest lines first.
fn fake_tree_manifest(dirs: &Dirs, extra: &str, permissions: &str) -> String {
    let root = std::fs::canonicalize(dirs.root.path())
        .expect("temp dir")
        .join("fake");
    let dev = root.join("dev");
    for node in ["ttyUSB0", "ttyUSB1", "snd/controlC0", "snd/pcmC0D0p"] {
        let path = dev.join(node);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("directory");
        std::fs::write(&path, "").expect("node");
    }
    format!(
        "{extra}\n[grants]\nread-only-dirs = [{dev:?}]\ndevice-paths = [{dev:?}]\n\
         [config]\nroot = {root:?}\nkinds = \"serial,audio\"\n\
         \"serial.paths\" = \"/dev/ttyUSB*\"\n\"serial.permissions\" = {permissions:?}\n\
         \"audio.paths\" = \"/dev/snd/*\"\n"
    )
}

/// Starts the host with the generic module and `manifest`, waits until
/// every module settled.
async fn start_generic(dirs: Dirs, manifest: &str) -> Fixture {
    dirs.add_module("generic", guests::GENERIC);
    dirs.write_manifest("generic", manifest);
    let fixture = Fixture::start(dirs);
    fixture.settled().await;
    fixture
}

/// [`start_generic`] on a new fake tree ([`fake_tree_manifest`]).
async fn start_fake_tree(extra: &str, permissions: &str) -> Fixture {
    let dirs = Dirs::new();
    let manifest = fake_tree_manifest(&dirs, extra, permissions);
    start_generic(dirs, &manifest).await
}

/// Waits until the host's start-up sweep of CDI specs ran; returns what it removed.
async fn swept(fixture: &Fixture) -> Vec<PathBuf> {
    let mut swept = fixture.host.cdi_swept();
    let done = tokio::time::timeout(WAIT, swept.wait_for(Option::is_some))
        .await
        .expect("the sweep runs once the modules have loaded")
        .expect("host running");
    done.clone().unwrap_or_default()
}

#[tokio::test]
async fn spec_validates_and_allocated_names_resolve_to_the_guests_nodes() {
    let fixture = start_generic(Dirs::new(), &real_nodes_manifest("cdi = true")).await;
    let view = fixture.listed(NODES).await;
    assert_eq!(ids(&view, NODES), ["null", "zero"]);
    let cdi = fixture.dirs.cdi();

    // Parsed and validated as a runtime does; one CDI device per device, with
    // the node the guest reported at scan time.
    let devices = read_valid(&cdi, NODES);
    let node = |path: &str| (path.to_string(), path.to_string(), "rw".to_string());
    assert_eq!(
        devices,
        [
            ("null".to_string(), vec![node("/dev/null")]),
            ("zero".to_string(), vec![node("/dev/zero")]),
        ]
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(spec_path(&cdi, NODES))
            .expect("spec")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o644);

    // Allocate names the CDI devices and does not send their nodes again.
    let response = fixture
        .kubelet
        .allocate(NODES, &[&["zero"], &["null"]])
        .await
        .expect("allocated");
    let names = cdi_and_nodes(&response);
    assert_eq!(
        names,
        [
            (vec![format!("{NODES}=zero")], vec![]),
            (vec![format!("{NODES}=null")], vec![]),
        ]
    );

    // Every name resolves in the directory, as the runtime's CDI cache
    // resolves it, to the node the guest reported, injected into the
    // container's OCI spec.
    {
        for (container, (cdi_names, _)) in names.iter().enumerate() {
            let mut args: Vec<&std::ffi::OsStr> = vec!["inject".as_ref(), cdi.as_os_str()];
            args.extend(cdi_names.iter().map(|n| std::ffi::OsStr::new(n.as_str())));
            let answer = cdi_check(&args).unwrap_or_else(|e| panic!("container {container}: {e}"));
            assert_eq!(
                answer["devices"],
                serde_json::json!([format!("{NODES}=null"), format!("{NODES}=zero")])
            );
            let injected: Vec<(String, i64, i64)> =
                serde_json::from_value(answer["injected"].clone()).expect("[path, major, minor]");
            let want = if container == 0 {
                "/dev/zero"
            } else {
                "/dev/null"
            };
            // The node the guest reported, its numbers read from the host node.
            let rdev =
                std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(want).expect("node"));
            let (major, minor) = ((rdev >> 8) & 0xfff, (rdev & 0xff) | ((rdev >> 12) & !0xff));
            assert_eq!(
                injected,
                [(want.to_string(), major as i64, minor as i64)],
                "container {container}"
            );
        }
    }
    fixture.stop().await;
}

#[tokio::test]
async fn ids_that_are_no_cdi_names_get_valid_stable_ones() {
    let fixture = start_fake_tree("cdi = true", "rw").await;
    let view = fixture.listed(AUDIO).await;
    assert_eq!(ids(&view, AUDIO), ["snd/controlC0", "snd/pcmC0D0p"]);
    let devices = read_valid(&fixture.dirs.cdi(), AUDIO);
    let names: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [device_name("snd/controlC0"), device_name("snd/pcmC0D0p")]
    );
    assert!(names[0].starts_with("snd_controlC0-"), "{names:?}");
    let response = fixture
        .kubelet
        .allocate(AUDIO, &[&["snd/pcmC0D0p"]])
        .await
        .expect("allocated");
    assert_eq!(
        cdi_and_nodes(&response),
        [(vec![format!("{AUDIO}={}", names[1])], vec![])]
    );
    fixture.stop().await;
}

#[tokio::test]
async fn allocate_keeps_envs_and_annotations_and_drops_what_the_spec_injects() {
    // The scan-only guest reports, per device, nodes, envs, an annotation and
    // CDI names of its own.
    let dirs = Dirs::new();
    dirs.add_module("widgets", guests::SCAN_ONLY);
    dirs.write_manifest("widgets", "[resources.widget]\ncdi = true\n");
    let fixture = Fixture::start(dirs);
    fixture.listed("example.com/widget").await;
    let response = fixture
        .kubelet
        .allocate("example.com/widget", &[&["w0", "w1"]])
        .await
        .expect("allocated");
    let c = &response.container_responses[0];
    assert!(c.devices.is_empty(), "nodes sent twice: {:?}", c.devices);
    assert_eq!(c.envs["WIDGET_IDS"], "w0,w1");
    assert_eq!(c.annotations["example.com/widgets"], "w0,w1");
    let names: Vec<&str> = c.cdi_devices.iter().map(|d| d.name.as_str()).collect();
    // The guest's own names stay; ours are added once each (w0's and w1's are
    // the same names, as this guest happens to use the resource's kind).
    assert_eq!(
        names,
        [
            "example.com/widget=w0",
            "example.com/widget=ctl",
            "example.com/widget=w1"
        ]
    );
    fixture.stop().await;
}

#[tokio::test]
async fn a_rescan_that_changes_a_devices_edits_rewrites_the_spec() {
    let fixture = start_fake_tree("cdi = true", "rw").await;
    fixture.listed(SERIAL).await;
    let cdi = fixture.dirs.cdi();
    let permissions = |cdi: &Path| -> BTreeSet<String> {
        read_valid(cdi, SERIAL)
            .into_iter()
            .flat_map(|(_, nodes)| nodes.into_iter().map(|(_, _, p)| p))
            .collect()
    };
    assert_eq!(permissions(&cdi), BTreeSet::from(["rw".to_string()]));
    let second = fake_tree_manifest(&fixture.dirs, "cdi = true", "r");
    fixture.apply_manifest("generic", &second).await;
    // The manifest is in use once its rescan has been applied, spec included.
    assert_eq!(permissions(&cdi), BTreeSet::from(["r".to_string()]));
    fixture.stop().await;
}

#[tokio::test]
async fn a_new_device_is_in_the_spec_before_kubelet_is_told_of_it() {
    let fixture = start_fake_tree("cdi = true\nscan-interval = \"50ms\"", "rw").await;
    fixture.listed(SERIAL).await;
    let root = std::fs::canonicalize(fixture.dirs.root.path()).expect("root");
    std::fs::write(root.join("fake/dev/ttyUSB7"), "").expect("new node");
    fixture
        .wait_for("ttyUSB7 listed", |v| {
            ids(v, SERIAL).contains(&"ttyUSB7".to_string())
        })
        .await;
    let names: Vec<String> = read_valid(&fixture.dirs.cdi(), SERIAL)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["ttyUSB0", "ttyUSB1", "ttyUSB7"]);
    fixture.stop().await;
}

#[tokio::test]
async fn removing_the_module_removes_its_specs_and_nobody_elses() {
    let dirs = Dirs::new();
    let foreign = dirs.cdi().join("vendor.com-gpu.json");
    let foreign_text = r#"{"cdiVersion":"0.6.0","kind":"vendor.com/gpu","devices":[{"name":"0","containerEdits":{"env":["A=1"]}}]}"#;
    std::fs::write(&foreign, foreign_text).expect("foreign spec");
    let manifest = fake_tree_manifest(&dirs, "cdi = true", "rw");
    let fixture = start_generic(dirs, &manifest).await;
    fixture.listed(SERIAL).await;
    swept(&fixture).await;
    let cdi = fixture.dirs.cdi();
    assert!(spec_path(&cdi, SERIAL).exists() && spec_path(&cdi, AUDIO).exists());
    fixture.dirs.remove_module("generic");
    fixture.module_state("generic", |s| s.is_none()).await;
    assert!(!spec_path(&cdi, SERIAL).exists());
    assert!(!spec_path(&cdi, AUDIO).exists());
    assert_eq!(
        std::fs::read_to_string(&foreign).expect("foreign spec"),
        foreign_text
    );
    fixture.stop().await;
}

#[tokio::test]
async fn specs_outlive_a_stop_and_the_next_start_sweeps_what_it_does_not_serve() {
    let dirs = Dirs::new();
    let foreign = dirs.cdi().join("vendor.com-gpu.json");
    std::fs::write(&foreign, "not even a spec").expect("foreign file");
    let manifest = fake_tree_manifest(&dirs, "cdi = true", "rw");
    let fixture = start_generic(dirs, &manifest).await;
    fixture.listed(SERIAL).await;
    let dirs = fixture.stop().await;
    let cdi = dirs.cdi();
    // Containers restarting while the host is away still resolve their names.
    assert!(spec_path(&cdi, SERIAL).exists() && spec_path(&cdi, AUDIO).exists());

    // The next run serves audio without CDI: its old spec goes, serial's stays.
    let manifest = fake_tree_manifest(&dirs, "cdi = true\n[resources.audio]\ncdi = false", "rw");
    let fixture = start_generic(dirs, &manifest).await;
    fixture.listed(SERIAL).await;
    assert_eq!(swept(&fixture).await, [spec_path(&cdi, AUDIO)]);
    read_valid(&cdi, SERIAL);
    assert!(!spec_path(&cdi, AUDIO).exists());
    assert_eq!(
        std::fs::read_to_string(&foreign).expect("foreign file"),
        "not even a spec"
    );
    fixture.stop().await;
}

/// The host with CDI specs going to `cdi_dir`, which cannot be written: the
/// resource with `cdi` is refused, once, with a CDI error; the other is served.
async fn unusable_cdi_dir_refuses_the_resource(cdi_dir: PathBuf) {
    let dirs = Dirs::new();
    let manifest = fake_tree_manifest(&dirs, "[resources.serial]\ncdi = true", "rw");
    dirs.add_module("generic", guests::GENERIC);
    dirs.write_manifest("generic", &manifest);
    let mut settings = test_settings(&dirs.kubelet());
    settings.cdi_dir = cdi_dir;
    let fixture = Fixture::start_with(dirs, settings);
    let state = fixture
        .module_state("generic", |s| matches!(s, Some(ModuleState::Serving(_))))
        .await;
    assert_eq!(state, Some(ModuleState::Serving(vec![AUDIO.to_string()])));
    fixture.listed(AUDIO).await;
    fixture.refused("generic", 1).await;
    // A rescan tries again, and says nothing new.
    let again = fake_tree_manifest(&fixture.dirs, "[resources.serial]\ncdi = true", "r");
    fixture.apply_manifest("generic", &again).await;
    let refusals = fixture.host.refusals().borrow().clone();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(
        matches!(&*refusals[0].error, RegistryError::Cdi { resource, .. } if resource.as_str() == SERIAL),
        "{refusals:?}"
    );
    assert!(fixture.kubelet.view().plugin(SERIAL).is_none());
    fixture.stop().await;
}

#[tokio::test]
async fn a_missing_cdi_dir_refuses_the_resource_not_the_host() {
    let missing = std::env::temp_dir().join(format!("wdp-no-such-cdi-dir-{}", std::process::id()));
    unusable_cdi_dir_refuses_the_resource(missing).await;
}

#[tokio::test]
async fn a_cdi_dir_that_cannot_be_written_refuses_the_resource_not_the_host() {
    // A path below a regular file: ENOTDIR, even for root.
    let file = tempfile::NamedTempFile::new().expect("file");
    unusable_cdi_dir_refuses_the_resource(file.path().join("cdi")).await;
}

#[tokio::test]
async fn a_symlinked_node_keeps_its_path_in_the_container_and_the_spec_its_target() {
    // As /dev/serial/by-id links name adapters: the container sees the link's
    // path, the spec names the node it resolves to, through the output policy.
    let dirs = Dirs::new();
    let root = std::fs::canonicalize(dirs.root.path())
        .expect("temp dir")
        .join("fake");
    let dev = root.join("dev");
    std::fs::create_dir_all(dev.join("serial/by-id")).expect("directories");
    std::fs::write(dev.join("ttyUSB0"), "").expect("node");
    std::os::unix::fs::symlink("../../ttyUSB0", dev.join("serial/by-id/usb-FTDI_A1"))
        .expect("link");
    let manifest = format!(
        "cdi = true\n[grants]\nread-only-dirs = [{dev:?}]\ndevice-paths = [{dev:?}]\n\
         [config]\nroot = {root:?}\nkinds = \"serial\"\n\"serial.paths\" = \"/dev/serial/by-id/*\"\n"
    );
    let fixture = start_generic(dirs, &manifest).await;
    let view = fixture.listed(SERIAL).await;
    assert_eq!(ids(&view, SERIAL), ["serial/by-id/usb-FTDI_A1"]);
    let devices = read_valid(&fixture.dirs.cdi(), SERIAL);
    let name = device_name("serial/by-id/usb-FTDI_A1");
    assert_eq!(
        devices,
        [(
            name.clone(),
            vec![(
                "/dev/serial/by-id/usb-FTDI_A1".to_string(),
                dev.join("ttyUSB0").display().to_string(),
                "rw".to_string()
            )]
        )]
    );
    let response = fixture
        .kubelet
        .allocate(SERIAL, &[&["serial/by-id/usb-FTDI_A1"]])
        .await
        .expect("allocated");
    assert_eq!(
        cdi_and_nodes(&response),
        [(vec![format!("{SERIAL}={name}")], vec![])]
    );
    fixture.stop().await;
}
