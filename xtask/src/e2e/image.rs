//! The cluster's images, built without Docker: OCI image layouts written here, packed as
//! OCI archives under `target/e2e/images/` for `ctr images import`. Three images:
//!
//! - the host's: the `cargo xtask dist` layout that `deploy/Dockerfile` packs, on a base
//!   layer of the host binary's shared libraries (what the Dockerfile's distroless `cc`
//!   base provides), with the Dockerfile's `ENTRYPOINT`, `CMD`, `USER` and `EXPOSE`;
//! - the pause (sandbox) image: a static C program, built here with `gcc -static`;
//! - the test pods' `busybox`: Debian's static busybox and a link per applet.
//!
//! Owns files under `target/e2e/`; imports nothing itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{copy, output, root, run};

/// One layer: a directory whose tree becomes a tar, owned by root, with fixed times.
pub struct Layer {
    pub dir: PathBuf,
}

/// What the image's config says beside its layers.
#[derive(Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
    pub labels: Vec<(String, String)>,
}

/// Writes an OCI archive of an image named `name` (a full reference, e.g.
/// `localhost/wasm-device-plugin:e2e-1`) with `layers` (bottom first) into `archive`.
/// Layers are uncompressed tars: the archive is imported on this machine only.
///
/// # Errors
/// When a layer cannot be packed (GNU tar runs it) or a file cannot be written.
pub fn write_archive(
    name: &str,
    layers: &[Layer],
    config: &ImageConfig,
    archive: &Path,
) -> Result<(), String> {
    let layout = archive.with_extension("layout");
    if layout.exists() {
        std::fs::remove_dir_all(&layout)
            .map_err(|e| format!("cannot clear {}: {e}", layout.display()))?;
    }
    let blobs = layout.join("blobs/sha256");
    mkdir(&blobs)?;
    let mut layer_descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (n, layer) in layers.iter().enumerate() {
        let tar = layout.join(format!("layer-{n}.tar"));
        // Reproducible: sorted names, root-owned, mtime 0, so an unchanged tree gives an
        // unchanged digest (and containerd keeps its unpacked snapshot).
        run(Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@0",
                "--format=posix",
                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                "-cf",
            ])
            .arg(&tar)
            .arg("-C")
            .arg(&layer.dir)
            .arg("."))?;
        let (digest, size) = move_into_blobs(&tar, &blobs)?;
        diff_ids.push(digest.clone());
        layer_descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": size,
        }));
    }
    let mut image_config = serde_json::Map::new();
    if !config.entrypoint.is_empty() {
        image_config.insert("Entrypoint".into(), json!(config.entrypoint));
    }
    if !config.cmd.is_empty() {
        image_config.insert("Cmd".into(), json!(config.cmd));
    }
    if let Some(user) = &config.user {
        image_config.insert("User".into(), json!(user));
    }
    if !config.exposed_ports.is_empty() {
        let ports: serde_json::Map<String, Value> = config
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), json!({})))
            .collect();
        image_config.insert("ExposedPorts".into(), Value::Object(ports));
    }
    if !config.labels.is_empty() {
        let labels: serde_json::Map<String, Value> = config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        image_config.insert("Labels".into(), Value::Object(labels));
    }
    image_config.insert(
        "Env".into(),
        json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]),
    );
    let config_json = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config_descriptor = write_blob(
        &blobs,
        "application/vnd.oci.image.config.v1+json",
        &config_json,
    )?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": layer_descriptors,
    });
    let mut manifest_descriptor = write_blob(
        &blobs,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    )?;
    let tag = name.rsplit_once(':').map_or("latest", |(_, tag)| tag);
    manifest_descriptor["annotations"] = json!({
        // containerd's importer names the image after this one.
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": tag,
    });
    manifest_descriptor["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    write_json(
        &layout.join("index.json"),
        &json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [manifest_descriptor],
        }),
    )?;
    write_json(
        &layout.join("oci-layout"),
        &json!({ "imageLayoutVersion": "1.0.0" }),
    )?;
    run(Command::new("tar")
        .arg("-cf")
        .arg(archive)
        .arg("-C")
        .arg(&layout)
        .args(["oci-layout", "index.json", "blobs"]))?;
    std::fs::remove_dir_all(&layout).map_err(|e| format!("cannot remove {}: {e}", layout.display()))
}

/// Moves `file` into `blobs` under its digest; returns `sha256:<hex>` and its size.
fn move_into_blobs(file: &Path, blobs: &Path) -> Result<(String, u64), String> {
    let mut hash = Sha256::new();
    let mut reader =
        std::fs::File::open(file).map_err(|e| format!("cannot open {}: {e}", file.display()))?;
    let size = std::io::copy(&mut reader, &mut hash)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let hex = format!("{:x}", hash.finalize());
    std::fs::rename(file, blobs.join(&hex)).map_err(|e| {
        format!(
            "cannot move {} into {}: {e}",
            file.display(),
            blobs.display()
        )
    })?;
    Ok((format!("sha256:{hex}"), size))
}

/// Writes `value` as a blob; returns its descriptor.
fn write_blob(blobs: &Path, media_type: &str, value: &Value) -> Result<Value, String> {
    let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    let hex = format!("{:x}", Sha256::digest(&bytes));
    let path = blobs.join(&hex);
    std::fs::write(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(json!({ "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len() }))
}

fn write_json(path: &Path, value: &Value) -> Result<(), String> {
    let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn mkdir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// A fresh, empty directory at `dir`.
fn fresh_dir(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    mkdir(dir)
}

/// The directory the images are built in.
fn images_dir() -> PathBuf {
    root().join("target/e2e/images")
}

/// The pause program: sleeps until SIGINT or SIGTERM (then exits 0) and reaps the
/// zombies it inherits as a pod's PID 1, as upstream's pause does.
const PAUSE_C: &str = r#"#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
    struct sigaction term = { .sa_handler = stop }, child = { .sa_handler = reap, .sa_flags = SA_NOCLDSTOP };
    sigaction(SIGINT, &term, NULL);
    sigaction(SIGTERM, &term, NULL);
    sigaction(SIGCHLD, &child, NULL);
    for (;;) pause();
}
"#;

/// Builds the pause image's archive: a static `/pause`.
pub fn pause(name: &str) -> Result<PathBuf, String> {
    let work = images_dir().join("pause");
    let rootfs = work.join("rootfs");
    fresh_dir(&rootfs)?;
    let source = work.join("pause.c");
    std::fs::write(&source, PAUSE_C)
        .map_err(|e| format!("cannot write {}: {e}", source.display()))?;
    run(Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(rootfs.join("pause"))
        .arg(&source))
    .map_err(|e| {
        format!("{e}\n(the pause image needs gcc with a static libc, Debian's libc6-dev)")
    })?;
    let archive = images_dir().join("pause.tar");
    write_archive(
        name,
        &[Layer { dir: rootfs }],
        &ImageConfig {
            entrypoint: vec!["/pause".into()],
            user: Some("65535:65535".into()),
            ..ImageConfig::default()
        },
        &archive,
    )?;
    Ok(archive)
}

/// Builds the test pods' image: Debian's static busybox as `/bin/busybox` and a
/// symlink per applet it lists (`sh`, `env`, `grep`, `sort`, `sleep`, ...).
pub fn busybox(name: &str, busybox: &Path) -> Result<PathBuf, String> {
    let rootfs = images_dir().join("busybox/rootfs");
    fresh_dir(&rootfs)?;
    let bin = rootfs.join("bin");
    mkdir(&bin)?;
    copy(busybox, &bin.join("busybox"))?;
    for applet in output(Command::new(busybox).arg("--list"))?.lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .map_err(|e| format!("cannot link {applet}: {e}"))?;
    }
    mkdir(&rootfs.join("tmp"))?;
    let archive = images_dir().join("busybox.tar");
    write_archive(
        name,
        &[Layer { dir: rootfs }],
        &ImageConfig {
            cmd: vec!["sh".into()],
            ..ImageConfig::default()
        },
        &archive,
    )?;
    Ok(archive)
}

/// The host's image: a base layer with the shared libraries `dist`'s binary needs, and
/// the `dist` layout itself; the config from the final stage of `deploy/Dockerfile`.
/// `revision` becomes the `org.opencontainers.image.revision` label, so two revisions
/// of one build are two images (a rolling update needs a new one).
pub fn host(name: &str, dist: &Path, binary: &Path, revision: &str) -> Result<PathBuf, String> {
    let work = images_dir().join("host");
    let base = work.join("base");
    fresh_dir(&base)?;
    for lib in shared_libraries(binary)? {
        let to = base.join(lib.strip_prefix("/").unwrap_or(&lib));
        mkdir(to.parent().unwrap_or(&base))?;
        // The library's content under the path the binary asks for (a symlink such as
        // /lib64/ld-linux-x86-64.so.2 becomes the file it names).
        copy(&lib, &to)?;
    }
    let dockerfile = root().join("deploy/Dockerfile");
    let text = std::fs::read_to_string(&dockerfile)
        .map_err(|e| format!("cannot read {}: {e}", dockerfile.display()))?;
    let mut config =
        dockerfile_config(&text).map_err(|e| format!("{}: {e}", dockerfile.display()))?;
    config
        .labels
        .push(("org.opencontainers.image.revision".into(), revision.into()));
    let archive = images_dir().join(format!("host-{revision}.tar"));
    write_archive(
        name,
        &[
            Layer { dir: base },
            Layer {
                dir: dist.to_path_buf(),
            },
        ],
        &config,
        &archive,
    )?;
    Ok(archive)
}

/// The files `ldd` says `binary` loads (the dynamic loader included).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let listing = output(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in listing.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    if libs.is_empty() {
        return Err(format!("ldd lists no library for {}", binary.display()));
    }
    Ok(libs)
}

/// `ENTRYPOINT`, `CMD`, `USER`, `EXPOSE` and the `LABEL`s of the Dockerfile's final
/// stage, whose `ARG` defaults fill in `${NAME}`. Only the forms `deploy/Dockerfile`
/// uses are read (JSON arrays, `KEY="value"` labels); anything else is an error, so
/// the image and the Dockerfile cannot drift apart quietly.
fn dockerfile_config(text: &str) -> Result<ImageConfig, String> {
    // Join continuation lines, drop comments.
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|i| i.starts_with("FROM "))
        .ok_or("no FROM")?;
    let mut config = ImageConfig::default();
    let mut args: Vec<(String, String)> = Vec::new();
    for instruction in &instructions[last_from + 1..] {
        let (keyword, rest) = instruction.split_once(' ').unwrap_or((instruction, ""));
        let rest = rest.trim();
        let json_array = |what: &str| -> Result<Vec<String>, String> {
            serde_json::from_str(rest).map_err(|e| format!("{what} is not a JSON array ({e})"))
        };
        match keyword {
            "ENTRYPOINT" => config.entrypoint = json_array("ENTRYPOINT")?,
            "CMD" => config.cmd = json_array("CMD")?,
            "USER" => config.user = Some(rest.to_string()),
            "EXPOSE" => config
                .exposed_ports
                .extend(rest.split_whitespace().map(|p| {
                    if p.contains('/') {
                        p.to_string()
                    } else {
                        format!("{p}/tcp")
                    }
                })),
            "ARG" => {
                let (name, value) = rest.split_once('=').unwrap_or((rest, ""));
                args.push((name.to_string(), value.trim_matches('"').to_string()));
            }
            "LABEL" => {
                for (key, value) in labels(rest)? {
                    let value = args.iter().fold(value, |v, (name, arg)| {
                        v.replace(&format!("${{{name}}}"), arg)
                    });
                    config.labels.push((key, value));
                }
            }
            "COPY" | "RUN" | "WORKDIR" | "ENV" => {}
            other => return Err(format!("the final stage's {other} is not read by the e2e")),
        }
    }
    if config.entrypoint.is_empty() {
        return Err("the final stage has no ENTRYPOINT".into());
    }
    Ok(config)
}

/// `key="value" key2="value 2"` pairs.
fn labels(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .ok_or_else(|| format!("cannot read the LABEL pairs in {text:?}"))?;
        let (value, after) = after
            .split_once('"')
            .ok_or_else(|| format!("unterminated LABEL value in {text:?}"))?;
        pairs.push((key.trim().to_string(), value.to_string()));
        rest = after.trim();
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_config_reads_the_shipped_dockerfile() {
        let text = std::fs::read_to_string(root().join("deploy/Dockerfile"))
            .expect("deploy/Dockerfile is readable");
        let config =
            dockerfile_config(&text).expect("the shipped Dockerfile's final stage is read");
        assert_eq!(config.entrypoint, ["/usr/local/bin/wasm-device-plugin"]);
        assert_eq!(config.cmd, ["run"]);
        assert_eq!(config.user.as_deref(), Some("0:0"));
        assert_eq!(config.exposed_ports, ["9477/tcp"]);
        assert!(
            config
                .labels
                .iter()
                .any(|(k, v)| k == "org.opencontainers.image.version" && !v.contains('$'))
        );
    }

    #[test]
    fn dockerfile_config_refuses_an_unread_instruction() {
        let text = "FROM a\nENTRYPOINT [\"/x\"]\nHEALTHCHECK NONE\n";
        assert!(dockerfile_config(text).is_err());
    }
}
