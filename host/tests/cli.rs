//! `wasm-device-plugin validate` and `allocate`, run as the real binary on the
//! guests the test crate builds: the text and JSON reports, and a non-zero exit
//! with one line naming the reason for every module, manifest or request the
//! host would refuse.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tempfile::TempDir;
use tokio::process::Command;
use wasm_device_plugin::runtime::PACKAGE_VERSION;
use wdp_tests::{WAIT, guests};

/// What a run of the binary left.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The JSON document on stdout.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// The one line on stderr, after a failure.
    fn error_line(&self) -> &str {
        assert_eq!(self.code, Some(1), "exit code; stderr: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {:?}", self.stderr);
        lines[0]
            .strip_prefix("error: ")
            .unwrap_or_else(|| panic!("not an error line: {}", lines[0]))
    }

    fn succeeded(&self) -> &Self {
        assert_eq!(self.code, Some(0), "exit code; stderr: {}", self.stderr);
        assert_eq!(self.stderr, "", "nothing on stderr");
        self
    }
}

/// Runs the binary with `args`, at most `WAIT`.
async fn wdp<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let child = Command::new(env!("CARGO_BIN_EXE_wasm-device-plugin"))
        .args(args)
        .env_remove("WDP_LOG")
        .env_remove("RUST_LOG")
        .env_remove("WDP_DOMAIN")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, child)
        .await
        .unwrap_or_else(|_| panic!("the command did not finish within {WAIT:?}"))
        .expect("the binary runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

/// A directory holding one module file, `<name>.wasm`, and maybe its manifest.
struct Module {
    dir: TempDir,
    name: &'static str,
}

impl Module {
    fn copy(name: &'static str, wasm: &str) -> Self {
        let module = Self::empty(name);
        std::fs::copy(wasm, module.wasm()).expect("copy module");
        module
    }

    fn bytes(name: &'static str, bytes: &[u8]) -> Self {
        let module = Self::empty(name);
        std::fs::write(module.wasm(), bytes).expect("write module");
        module
    }

    fn empty(name: &'static str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wdp-cli")
            .tempdir()
            .expect("temp dir");
        Self { dir, name }
    }

    fn wasm(&self) -> PathBuf {
        self.dir.path().join(format!("{}.wasm", self.name))
    }

    /// Writes `<name>.toml` beside the module, where the host looks for it.
    fn with_manifest(self, text: &str) -> Self {
        std::fs::write(self.path(&format!("{}.toml", self.name)), text).expect("write manifest");
        self
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    async fn validate(&self, extra: &[&str]) -> Run {
        wdp(args("validate", &self.wasm(), extra)).await
    }

    async fn allocate(&self, extra: &[&str]) -> Run {
        wdp(args("allocate", &self.wasm(), extra)).await
    }
}

fn args(command: &str, file: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![command.to_string(), file.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The faulty guest with `config` as its manifest's `[config]` table.
fn faulty(config: &str) -> Module {
    Module::copy("faulty", guests::FAULTY).with_manifest(&format!("[config]\n{config}\n"))
}

/// Checks that a `--json` run was refused for `kind`, with the report on stdout
/// and its message as the one line on stderr; returns that line.
fn refused(run: &Run, kind: &str) -> String {
    let line = run.error_line().to_string();
    let report = run.json();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["error"]["kind"], kind, "{report}");
    let message = report["error"]["message"].as_str().expect("message");
    let first = message.lines().next().expect("a message");
    assert!(
        line.starts_with(first.trim_end_matches(':')),
        "stderr line {line:?} is the message {message:?}"
    );
    line
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_str().expect("a string"))
        .collect()
}

fn names(items: &Value) -> Vec<&str> {
    items
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v["name"].as_str().expect("a name"))
        .collect()
}

const DEV1_IDS: [&str; 4] = [
    "/node1/dev1/1",
    "/node1/dev1/2",
    "/node1/dev1/3",
    "/node1/dev1/4",
];

// validate: good modules

#[tokio::test]
async fn validate_prints_the_devices_as_a_table() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES);
    let run = module.validate(&[]).await;
    run.succeeded();
    let out = &run.stdout;
    assert!(
        out.starts_with(&format!(
            "{}: the host would serve module `virtual`\n",
            module.wasm().display()
        )),
        "{out}"
    );
    assert!(
        out.contains("  manifest  none (the flags alone)\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "  imports   wasm-device-plugin:device/host@{PACKAGE_VERSION} (interface)\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(
            "  hooks     scan, health, allocate, describe, prepare, unprepare (the host supplies: \
             no post-allocate step)\n"
        ),
        "{out}"
    );
    assert!(out.contains("  exports   scan (function)\n"), "{out}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip_while(|l| !l.starts_with("RESOURCE"))
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "RESOURCE", "KIND", "ID", "HEALTH", "NUMA", "DEVICE", "NODES"
        ]
    );
    assert_eq!(rows.len(), 7, "a header and 6 devices: {out}");
    assert_eq!(
        rows[1],
        [
            "example.com/dev-1",
            "dev-1",
            "/node1/dev1/1",
            "Healthy",
            "-",
            "-"
        ]
    );
    assert_eq!(
        rows[6],
        [
            "example.com/dev-2",
            "dev-2",
            "/node1/dev2/2",
            "Healthy",
            "-",
            "-"
        ]
    );
    assert!(
        out.ends_with("\n2 resource(s), 6 device(s), 0 unhealthy\n"),
        "{out}"
    );
}

#[tokio::test]
async fn validate_json_reports_the_world_and_every_device() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES);
    let run = module.validate(&["--json"]).await;
    run.succeeded();
    let report = run.json();
    assert_eq!(report["ok"], true);
    assert_eq!(report["module"], "virtual");
    assert_eq!(report["file"], module.wasm().display().to_string());
    assert_eq!(report["manifest"], Value::Null);
    assert_eq!(report["error"], Value::Null);
    assert_eq!(report["sha256"].as_str().map(str::len), Some(64));
    let imports = &report["imports"];
    assert!(
        imports.as_array().expect("imports").iter().any(|i| {
            i["name"] == format!("wasm-device-plugin:device/host@{PACKAGE_VERSION}")
                && i["kind"] == "interface"
        }),
        "{imports}"
    );
    assert!(
        names(imports)
            .iter()
            .all(|n| n.starts_with("wasi:") || n.starts_with("wasm-device-plugin:device/")),
        "{imports}"
    );
    assert_eq!(
        names(&report["exports"]),
        [
            "scan",
            "health",
            "allocate",
            "prepare",
            "describe",
            "unprepare"
        ]
    );
    assert_eq!(
        report["hooks"],
        "scan, health, allocate, describe, prepare, unprepare (the host supplies: no post-allocate \
         step)"
    );
    let resources = &report["resources"];
    assert_eq!(names(resources), ["example.com/dev-1", "example.com/dev-2"]);
    let dev1 = &resources[0];
    assert_eq!(dev1["kind"], "dev-1");
    assert_eq!(dev1["replicas"], 1);
    let ids: Vec<&str> = dev1["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, DEV1_IDS);
    let first = &dev1["devices"][0];
    assert_eq!(first["health"], "Healthy");
    assert_eq!(first["numa_nodes"], serde_json::json!([]));
    assert_eq!(
        first["allocation"],
        serde_json::json!({
            "envs": {}, "device_nodes": [], "mounts": [], "annotations": {}, "cdi_devices": []
        })
    );
}

#[tokio::test]
async fn validate_runs_scan_with_the_manifest_beside_the_module() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES).with_manifest(
        "[config]\nkinds = \"gpu=3\"\nnuma-nodes = 2\nunhealthy = \"/node1/gpu/2\"\n\
         [resources.gpu]\nreplicas = 2\n",
    );
    let run = module.validate(&["--json"]).await;
    run.succeeded();
    let report = run.json();
    assert_eq!(
        report["manifest"],
        module.path("virtual.toml").display().to_string()
    );
    assert_eq!(names(&report["resources"]), ["example.com/gpu"]);
    let gpu = &report["resources"][0];
    assert_eq!(gpu["replicas"], 2);
    let devices = gpu["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 3);
    let numa: Vec<&Value> = devices.iter().map(|d| &d["numa_nodes"]).collect();
    assert_eq!(
        numa,
        [
            &serde_json::json!([0]),
            &serde_json::json!([1]),
            &serde_json::json!([0])
        ]
    );
    assert_eq!(devices[1]["health"], "Unhealthy");

    let text = module.validate(&[]).await;
    text.succeeded();
    assert!(
        text.stdout.contains("3 device(s), 1 unhealthy\n")
            && text
                .stdout
                .contains("example.com/gpu: each device advertised 2 times"),
        "{}",
        text.stdout
    );

    // --no-manifest: the defaults again.
    let bare = module.validate(&["--json", "--no-manifest"]).await;
    bare.succeeded();
    assert_eq!(bare.json()["manifest"], Value::Null);
    assert_eq!(
        names(&bare.json()["resources"]),
        ["example.com/dev-1", "example.com/dev-2"]
    );
}

#[tokio::test]
async fn validate_takes_a_manifest_from_elsewhere_and_the_domain_flag() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES);
    let manifest = module.path("elsewhere.toml");
    std::fs::write(
        &manifest,
        "[config]\nkinds = \"fpga=1\"\n[resources.fpga]\nname = \"region\"\n",
    )
    .expect("write manifest");
    let run = module
        .validate(&[
            "--json",
            "--domain",
            "vendor.example",
            "--manifest",
            manifest.to_str().expect("UTF-8"),
        ])
        .await;
    run.succeeded();
    let report = run.json();
    assert_eq!(report["manifest"], manifest.display().to_string());
    assert_eq!(names(&report["resources"]), ["vendor.example/region"]);
    assert_eq!(report["resources"][0]["kind"], "fpga");
}

#[tokio::test]
async fn validate_shows_the_device_nodes_a_scan_reports() {
    let module = faulty("bogus = \"scan-allocation\"");
    let run = module.validate(&[]).await;
    run.succeeded();
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("example.com/faulty"))
        .expect("a row");
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        [
            "example.com/faulty",
            "faulty",
            "f0",
            "Healthy",
            "-",
            "/dev/null:/dev/faulty:rw"
        ]
    );
    let json = module.validate(&["--json"]).await.json();
    assert_eq!(
        json["resources"][0]["devices"][0]["allocation"]["device_nodes"],
        serde_json::json!([
            {"host_path": "/dev/null", "container_path": "/dev/faulty", "permissions": "rw"}
        ])
    );
}

// validate: everything the host refuses, each with exit code 1 and one line

#[tokio::test]
async fn validate_refuses_a_file_that_is_not_webassembly() {
    let module = Module::bytes("bad", b"this is not webassembly");
    let line = refused(&module.validate(&["--json"]).await, "not-wasm");
    assert!(
        line.contains("bad.wasm") && line.contains("not a WebAssembly binary"),
        "{line}"
    );
}

#[tokio::test]
async fn validate_refuses_a_core_module() {
    let module = Module::bytes("bad", b"\0asm\x01\0\0\0");
    let line = refused(&module.validate(&["--json"]).await, "core-module");
    assert!(
        line.contains("a core WebAssembly module, not a component"),
        "{line}"
    );
}

#[tokio::test]
async fn validate_refuses_an_invalid_component() {
    let module = Module::bytes("bad", b"\0asm\x0d\0\x01\0\x01\x02");
    let line = refused(&module.validate(&["--json"]).await, "invalid-component");
    assert!(line.contains("invalid component"), "{line}");
}

#[tokio::test]
async fn validate_refuses_another_wit_package() {
    let module = Module::copy("bad", guests::OTHER_PACKAGE);
    let line = refused(&module.validate(&["--json"]).await, "unsupported-imports");
    assert!(
        line.contains("`acme:sensors/probe@1.0.0`") && line.contains("does not provide"),
        "{line}"
    );
}

#[tokio::test]
async fn validate_refuses_another_version_of_our_package() {
    let module = Module::copy("bad", guests::WRONG_VERSION);
    let line = refused(&module.validate(&["--json"]).await, "incompatible");
    assert!(
        line.contains("built against wasm-device-plugin:device@0.1.0")
            && line.contains(&format!(
                "this host implements wasm-device-plugin:device@{PACKAGE_VERSION}"
            )),
        "{line}"
    );
}

#[tokio::test]
async fn validate_refuses_a_module_without_scan_naming_it() {
    let module = Module::copy("bad", guests::MISSING_EXPORT);
    let line = refused(&module.validate(&["--json"]).await, "incompatible");
    assert!(line.contains("it does not export `scan`"), "{line}");
}

#[tokio::test]
async fn validate_refuses_a_module_importing_sockets() {
    let module = Module::copy("bad", guests::SOCKETS);
    let line = refused(&module.validate(&["--json"]).await, "unsupported-imports");
    assert!(
        line.contains("`wasi:sockets/") && line.contains("no network"),
        "{line}"
    );
}

#[tokio::test]
async fn validate_refuses_a_file_over_64_mib_unread() {
    let module = Module::empty("bad");
    // Sparse: the size is what counts, and it is checked before reading.
    let file = std::fs::File::create(module.wasm()).expect("create");
    file.set_len(64 * 1024 * 1024 + 1).expect("grow");
    let line = refused(&module.validate(&["--json"]).await, "too-large");
    assert!(
        line.contains("67108865 bytes is more than the 64 MiB allowed"),
        "{line}"
    );
}

#[tokio::test]
async fn validate_refuses_a_missing_file() {
    let module = Module::empty("absent");
    let line = refused(&module.validate(&["--json"]).await, "read");
    assert!(
        line.contains("absent.wasm") && line.contains("cannot read"),
        "{line}"
    );
}

#[tokio::test]
async fn validate_refuses_a_bad_manifest_naming_the_field() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES)
        .with_manifest("[limits]\nmemory-mib = 0\n");
    let line = refused(&module.validate(&["--json"]).await, "manifest");
    assert!(
        line.contains("virtual.toml")
            && line.contains("limits.memory-mib")
            && line.contains("outside 1 to 4096"),
        "{line}"
    );
    // Text mode: nothing on stdout, the same line on stderr.
    let text = module.validate(&[]).await;
    assert_eq!(text.error_line(), line);
    assert_eq!(text.stdout, "");
}

#[tokio::test]
async fn validate_refuses_a_scan_that_returns_an_error() {
    let module = faulty("fail = \"scan=unavailable\"");
    let line = refused(&module.validate(&["--json"]).await, "module-error");
    assert!(
        line.contains("first scan failed") && line.contains("faulty guest: unavailable in scan"),
        "{line}"
    );
}

#[tokio::test]
async fn validate_refuses_a_scan_that_traps() {
    let module = faulty("trap = \"scan\"");
    let run = module.validate(&["--json"]).await;
    let line = refused(&run, "trap");
    assert!(
        line.contains("first scan failed: module faulty: scan failed: trapped"),
        "{line}"
    );
    // The backtrace stays in the JSON report.
    let message = run.json()["error"]["message"].to_string();
    assert!(message.contains("wasm backtrace"), "{message}");
}

#[tokio::test]
async fn validate_refuses_a_scan_that_runs_past_its_deadline() {
    let module = faulty("spin = \"scan\"");
    let line = refused(
        &module
            .validate(&["--json", "--scan-timeout", "200ms"])
            .await,
        "deadline",
    );
    assert!(line.contains("deadline of 200ms exceeded"), "{line}");
}

#[tokio::test]
async fn validate_applies_the_manifest_limits() {
    let module = Module::copy("faulty", guests::FAULTY)
        .with_manifest("[limits]\nmemory-mib = 16\n[config]\ngrow = \"scan\"\n");
    let line = refused(&module.validate(&["--json"]).await, "out-of-memory");
    assert!(line.contains("memory limit of 16 MiB exceeded"), "{line}");
}

#[tokio::test]
async fn validate_refuses_a_scan_that_breaks_the_output_policy() {
    let module = faulty("bogus = \"duplicate-id\"");
    let line = refused(&module.validate(&["--json"]).await, "policy");
    assert!(
        line.contains("output policy") && line.contains("`f0` appears more than once"),
        "{line}"
    );
    let module = faulty("bogus = \"scan-allocation\"\npath = \"/etc/passwd\"");
    let line = refused(&module.validate(&["--json"]).await, "policy");
    assert!(
        line.contains("allocation.devices[0].host-path") && line.contains("/etc"),
        "{line}"
    );
}

// allocate

#[tokio::test]
async fn allocate_prints_what_each_container_gets() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES);
    let run = module
        .allocate(&[
            "--resource",
            "example.com/dev-1",
            "--devices",
            "/node1/dev1/1,/node1/dev1/2",
            "--devices",
            "/node1/dev1/3",
        ])
        .await;
    run.succeeded();
    let expected = format!(
        "{}: the host would answer Allocate for example.com/dev-1 (kind dev-1)\n",
        module.wasm().display()
    );
    assert!(run.stdout.starts_with(&expected), "{}", run.stdout);
    assert!(
        run.stdout.ends_with(
            "\ncontainer 0: /node1/dev1/1, /node1/dev1/2\n\
             \x20 env         DEV_dev_1_ID_0=/node1/dev1/1\n\
             \x20 env         DEV_dev_1_ID_1=/node1/dev1/2\n\
             \x20 annotation  virtual.example.com/devices=/node1/dev1/1,/node1/dev1/2\n\
             \n\
             container 1: /node1/dev1/3\n\
             \x20 env         DEV_dev_1_ID_0=/node1/dev1/3\n\
             \x20 annotation  virtual.example.com/devices=/node1/dev1/3\n"
        ),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn allocate_json_by_kind_name() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES);
    let run = module
        .allocate(&[
            "--json",
            "--resource",
            "dev-2",
            "--devices",
            "/node1/dev2/2,/node1/dev2/1",
        ])
        .await;
    run.succeeded();
    let report = run.json();
    assert_eq!(report["ok"], true);
    assert_eq!(report["resource"], "example.com/dev-2");
    assert_eq!(report["kind"], "dev-2");
    assert_eq!(report["error"], Value::Null);
    let containers = report["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(
        strings(&c["device_ids"]),
        ["/node1/dev2/2", "/node1/dev2/1"]
    );
    assert_eq!(
        c["envs"],
        serde_json::json!({"DEV_dev_2_ID_0": "/node1/dev2/2", "DEV_dev_2_ID_1": "/node1/dev2/1"})
    );
    assert_eq!(
        c["annotations"],
        serde_json::json!({"virtual.example.com/devices": "/node1/dev2/2,/node1/dev2/1"})
    );
    assert_eq!(c["device_nodes"], serde_json::json!([]));
    assert_eq!(c["mounts"], serde_json::json!([]));
    assert_eq!(c["cdi_devices"], serde_json::json!([]));
}

#[tokio::test]
async fn allocate_takes_advertised_replica_ids_and_a_renamed_resource() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES)
        .with_manifest("[resources.dev-1]\nname = \"gpu\"\nreplicas = 2\n");
    let run = module
        .allocate(&[
            "--json",
            "--resource",
            "gpu",
            "--devices",
            "/node1/dev1/1::0,/node1/dev1/1::1",
        ])
        .await;
    run.succeeded();
    let report = run.json();
    assert_eq!(report["resource"], "example.com/gpu");
    // Two replicas of one device are that device, once, to the guest.
    assert_eq!(
        report["containers"][0]["envs"],
        serde_json::json!({"DEV_dev_1_ID_0": "/node1/dev1/1"})
    );
}

#[tokio::test]
async fn allocate_refuses_an_unknown_device() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES);
    let run = module
        .allocate(&[
            "--json",
            "--resource",
            "dev-1",
            "--devices",
            "/node1/dev1/1,/no/such/device",
        ])
        .await;
    let line = refused(&run, "allocate-refused");
    assert_eq!(run.json()["error"]["grpc_code"], "InvalidArgument");
    assert!(
        line.contains("unknown device id `/no/such/device`") && line.contains("example.com/dev-1"),
        "{line}"
    );
}

#[tokio::test]
async fn allocate_refuses_an_unhealthy_or_repeated_device() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES)
        .with_manifest("[config]\nunhealthy = \"/node1/dev1/2\"\n");
    let run = module
        .allocate(&[
            "--json",
            "--resource",
            "dev-1",
            "--devices",
            "/node1/dev1/2",
        ])
        .await;
    let line = refused(&run, "allocate-refused");
    assert_eq!(run.json()["error"]["grpc_code"], "FailedPrecondition");
    assert!(
        line.contains("device `/node1/dev1/2` is unhealthy"),
        "{line}"
    );
    let run = module
        .allocate(&[
            "--json",
            "--resource",
            "dev-1",
            "--devices",
            "/node1/dev1/1",
            "--devices",
            "/node1/dev1/1",
        ])
        .await;
    let line = refused(&run, "allocate-refused");
    assert_eq!(run.json()["error"]["grpc_code"], "InvalidArgument");
    assert!(line.contains("requested more than once"), "{line}");
}

#[tokio::test]
async fn allocate_refuses_an_unknown_resource_naming_the_known_ones() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES);
    let run = module
        .allocate(&["--json", "--resource", "dev-9", "--devices", "x"])
        .await;
    let line = refused(&run, "unknown-resource");
    assert!(
        line.contains("`dev-9`")
            && line.contains("example.com/dev-1 (kind dev-1), example.com/dev-2 (kind dev-2)"),
        "{line}"
    );
    assert_eq!(run.json()["containers"], Value::Null);
}

#[tokio::test]
async fn allocate_reports_a_guest_that_traps() {
    let module = faulty("trap = \"allocate\"");
    let run = module
        .allocate(&["--json", "--resource", "faulty", "--devices", "f0"])
        .await;
    let line = refused(&run, "allocate-refused");
    assert_eq!(run.json()["error"]["grpc_code"], "Internal");
    assert!(
        line.contains("module faulty: allocate failed: trapped"),
        "{line}"
    );
    // Text mode: the same one line, nothing on stdout.
    let text = module
        .allocate(&["--resource", "faulty", "--devices", "f0"])
        .await;
    assert_eq!(text.error_line(), line);
    assert_eq!(text.stdout, "");
}

#[tokio::test]
async fn allocate_applies_the_output_policy_to_the_answer() {
    let module = faulty("bogus = \"env-name\"");
    let run = module
        .allocate(&["--json", "--resource", "faulty", "--devices", "f0"])
        .await;
    let line = refused(&run, "allocate-refused");
    assert_eq!(run.json()["error"]["grpc_code"], "Internal");
    assert!(
        line.contains("envs[\"1NOT-A-NAME\"]") && line.contains("environment variable name"),
        "{line}"
    );
}

#[tokio::test]
async fn allocate_without_devices_is_a_usage_error() {
    let module = Module::copy("virtual", guests::VIRTUAL_DEVICES);
    let run = module.allocate(&["--resource", "dev-1"]).await;
    assert_eq!(run.code, Some(2), "clap's usage exit code");
    assert!(run.stderr.contains("--devices <IDS>"), "{}", run.stderr);
}

#[tokio::test]
async fn help_explains_both_commands() {
    let validate = wdp(["validate", "--help"]).await;
    validate.succeeded();
    for expected in [
        "--manifest",
        "--no-manifest",
        "--json",
        "--domain",
        "--scan-timeout",
    ] {
        assert!(validate.stdout.contains(expected), "{}", validate.stdout);
    }
    assert!(
        validate.stdout.contains("Exit code 0"),
        "{}",
        validate.stdout
    );
    let allocate = wdp(["allocate", "--help"]).await;
    allocate.succeeded();
    for expected in [
        "--resource",
        "--devices",
        "Repeat the flag",
        "--allocate-timeout",
    ] {
        assert!(allocate.stdout.contains(expected), "{}", allocate.stdout);
    }
}

// CDI: the spec `run` would write for a resource with `cdi`

/// The scan-only guest (kind `widget`, devices `w0`..`w2`, each with device
/// nodes) with `manifest`.
fn widgets(manifest: &str) -> Module {
    Module::copy("widgets", guests::SCAN_ONLY).with_manifest(manifest)
}

#[tokio::test]
async fn validate_shows_the_cdi_spec_a_resource_with_cdi_gets() {
    let cdi_dir = tempfile::tempdir().expect("temp dir");
    let dir = cdi_dir.path().display().to_string();
    let module = widgets("cdi = true");
    let run = module.validate(&["--cdi-dir", &dir]).await;
    run.succeeded();
    let spec_file = format!("{dir}/wasm-device-plugin_example.com_widget.json");
    assert!(
        run.stdout
            .contains(&format!("CDI spec of example.com/widget: {spec_file}")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("w0  ->  example.com/widget=w0"),
        "{}",
        run.stdout
    );
    let json = module.validate(&["--json", "--cdi-dir", &dir]).await.json();
    let cdi = &json["resources"][0]["cdi"];
    assert_eq!(cdi["path"], spec_file.as_str());
    assert_eq!(cdi["names"]["w2"], "example.com/widget=w2");
    assert_eq!(cdi["spec"]["cdiVersion"], "0.6.0");
    assert_eq!(cdi["spec"]["kind"], "example.com/widget");
    assert_eq!(
        cdi["spec"]["devices"][0]["containerEdits"]["deviceNodes"][0],
        serde_json::json!({"path": "/dev/widget0", "hostPath": "/dev/null", "permissions": "rw"})
    );
    // Shown, never written.
    assert_eq!(std::fs::read_dir(cdi_dir.path()).expect("dir").count(), 0);
    // Without `cdi`, no spec.
    let plain = widgets("").validate(&["--json"]).await.json();
    assert_eq!(plain["resources"][0]["cdi"], Value::Null);
}

#[tokio::test]
async fn allocate_names_the_cdi_devices_instead_of_their_nodes() {
    let module = widgets("[resources.widget]\ncdi = true");
    let run = module
        .allocate(&["--resource", "widget", "--devices", "w0", "--json"])
        .await;
    run.succeeded();
    let json = run.json();
    let container = &json["containers"][0];
    assert_eq!(container["device_nodes"], serde_json::json!([]));
    assert!(
        strings(&container["cdi_devices"]).contains(&"example.com/widget=w0"),
        "{json}"
    );
    assert_eq!(container["envs"]["WIDGET_IDS"], "w0");
    assert_eq!(json["cdi"]["spec"]["kind"], "example.com/widget");
}

#[tokio::test]
async fn validate_refuses_a_cdi_resource_whose_name_is_no_cdi_kind() {
    let run = widgets("cdi = true\n[resources.widget]\nname = \"1widget\"")
        .validate(&["--json"])
        .await;
    let line = refused(&run, "cdi");
    assert!(line.contains("example.com/1widget"), "{line}");
}
