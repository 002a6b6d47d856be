//! What the cluster changes on the machine outside its temporary directory, recorded
//! before it starts and put back after it stops: kernel tunables kubelet sets, iptables
//! chains and rules kubelet adds, directories kubelet, containerd and the CNI plugins
//! create at fixed paths, the network namespaces and links of pods, mounts, and the
//! cgroup every pod lives under. Owns no process: [`Machine::restore`] runs after the
//! cluster's processes have been stopped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The cgroup (in every hierarchy) kubelet puts pods under (`cgroupRoot`): created
/// here, so that everything the cluster runs is found, killed and removed by it.
pub const CGROUP_ROOT: &str = "wdp-e2e";
/// The pod network's bridge.
pub const BRIDGE: &str = "wdpe2e0";

/// Kernel tunables kubelet sets at start (`setupKernelTunables`), and the CNI bridge's
/// forwarding switch.
const SYSCTLS: [&str; 8] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
];

/// Paths that a node's programs create whatever their configured directories:
/// kubelet's root directory (the e2e's `--root-dir`, see `cluster::KUBELET_ROOT`) and
/// log links, containerd's shim sockets and network namespaces, CNI caches, CDI spec
/// directories, and the DaemonSet's hostPath for the host's DRA state.
const FIXED_PATHS: [&str; 13] = [
    "/var/lib/kubelet",
    "/var/lib/wasm-device-plugin",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/run/netns",
    "/var/lib/cni",
    "/run/cni",
    "/etc/cni",
    "/opt/cni",
    "/opt/containerd",
    "/run/nri",
    "/var/run/cdi",
];

/// The machine as it was before the cluster started.
pub struct Machine {
    sysctls: Vec<(String, String)>,
    iptables: Vec<(&'static str, String)>,
    absent_paths: Vec<PathBuf>,
    netns: BTreeSet<String>,
    links: BTreeSet<String>,
    cgroups: Vec<PathBuf>,
}

impl Machine {
    /// Records the machine's state and creates the pods' cgroup in every hierarchy.
    ///
    /// # Errors
    /// When the pods' cgroup exists already (another run is going, or one was not
    /// cleaned up) or cannot be created.
    pub fn record() -> Result<Self, String> {
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|name| {
                let value = std::fs::read_to_string(Path::new("/proc/sys").join(name)).ok()?;
                Some((name.to_string(), value.trim().to_string()))
            })
            .collect();
        let iptables = ["iptables-save", "ip6tables-save"]
            .into_iter()
            .filter_map(|save| Some((save, command_output(save, &[])?)))
            .collect();
        let absent_paths = FIXED_PATHS
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.symlink_metadata().is_err())
            .collect();
        let mut machine = Machine {
            sysctls,
            iptables,
            absent_paths,
            netns: dir_names(Path::new("/run/netns")),
            links: links(),
            cgroups: Vec::new(),
        };
        for hierarchy in cgroup_hierarchies() {
            let dir = hierarchy.join(CGROUP_ROOT);
            if dir.exists() {
                return Err(format!(
                    "{} exists: another e2e cluster is running, or an earlier one was not cleaned up (remove its cgroups with rmdir, deepest first)",
                    dir.display()
                ));
            }
            std::fs::create_dir(&dir)
                .map_err(|e| format!("cannot create the cgroup {}: {e}", dir.display()))?;
            machine.cgroups.push(dir);
        }
        Ok(machine)
    }

    /// The PIDs in the pods' cgroup, in any hierarchy: what the cluster's containers run.
    pub fn cgroup_pids(&self) -> BTreeSet<i32> {
        let mut pids = BTreeSet::new();
        for dir in &self.cgroups {
            for cgroup in tree(dir) {
                if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
                    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            }
        }
        pids
    }

    /// Puts back what [`Machine::record`] saw, after the cluster's processes are gone
    /// and before its temporary directory `temp` is removed: unmounts what is mounted
    /// under `temp` or the fixed paths, removes the pods' network namespaces and links,
    /// the cgroups, the fixed paths that did not exist, kubelet's iptables chains, and
    /// resets the kernel tunables. Returns what it could not put back.
    pub fn restore(&self, temp: &Path) -> Vec<String> {
        let mut problems = Vec::new();
        let mut roots: Vec<PathBuf> = vec![temp.to_path_buf(), PathBuf::from("/run/netns")];
        roots.extend(self.absent_paths.iter().cloned());
        for mount in mounts_under(&roots) {
            if !unmount(&mount) {
                problems.push(format!("cannot unmount {}", mount.display()));
            }
        }
        for name in dir_names(Path::new("/run/netns")).difference(&self.netns) {
            let path = Path::new("/run/netns").join(name);
            if let Err(e) = std::fs::remove_file(&path) {
                problems.push(format!("cannot remove {}: {e}", path.display()));
            }
        }
        for link in links().difference(&self.links) {
            // Only the pod network's: the bridge and the host ends of its veths.
            if link == BRIDGE || link.starts_with("veth") {
                let _ = Command::new("ip").args(["link", "delete", link]).output();
                if links().contains(link) {
                    problems.push(format!("cannot delete the network link {link}"));
                }
            }
        }
        for dir in &self.cgroups {
            let mut cgroups = tree(dir);
            // Deepest first: a cgroup can be removed only once it has no children.
            cgroups.sort_by_key(|c| std::cmp::Reverse(c.components().count()));
            for cgroup in cgroups {
                if let Err(e) = std::fs::remove_dir(&cgroup) {
                    problems.push(format!(
                        "cannot remove the cgroup {}: {e}",
                        cgroup.display()
                    ));
                }
            }
        }
        for path in &self.absent_paths {
            if path.symlink_metadata().is_ok() {
                let removed = if path.is_dir() && !path.is_symlink() {
                    std::fs::remove_dir_all(path)
                } else {
                    std::fs::remove_file(path)
                };
                if let Err(e) = removed {
                    problems.push(format!("cannot remove {}: {e}", path.display()));
                }
            }
        }
        for (save, before) in &self.iptables {
            let tool = save.trim_end_matches("-save");
            if let Some(after) = command_output(save, &[]) {
                problems.extend(undo_iptables(tool, before, &after));
            }
        }
        for (name, value) in &self.sysctls {
            let path = Path::new("/proc/sys").join(name);
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            if now.trim() != value
                && let Err(e) = std::fs::write(&path, value)
            {
                problems.push(format!("cannot reset {}: {e}", path.display()));
            }
        }
        problems
    }
}

/// The commands that remove from `after` (an `iptables-save` listing) the rules and
/// chains that `before` did not have, run with `tool`; returns what failed.
fn undo_iptables(tool: &str, before: &str, after: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let (old_rules, old_chains) = iptables_entries(before);
    let (new_rules, new_chains) = iptables_entries(after);
    let mut commands: Vec<Vec<String>> = Vec::new();
    for (table, rule) in new_rules.difference(&old_rules) {
        let mut args = vec!["-t".to_string(), table.clone(), "-D".to_string()];
        // `-A CHAIN ...` → `-D CHAIN ...`. Rules kubelet writes have no quoted spaces
        // but their comments; iptables-save quotes those, and the words are rejoined.
        args.extend(shell_words(rule.trim_start_matches("-A ")));
        commands.push(args);
    }
    for (table, chain) in new_chains.difference(&old_chains) {
        commands.push(vec!["-t".into(), table.clone(), "-F".into(), chain.clone()]);
    }
    for (table, chain) in new_chains.difference(&old_chains) {
        commands.push(vec!["-t".into(), table.clone(), "-X".into(), chain.clone()]);
    }
    for args in commands {
        let ok = Command::new(tool)
            .args(&args)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            problems.push(format!("`{tool} {}` failed", args.join(" ")));
        }
    }
    problems
}

type Entries = BTreeSet<(String, String)>;

/// (table, rule) for each `-A` line and (table, chain) for each user chain.
fn iptables_entries(save: &str) -> (Entries, Entries) {
    let mut rules = BTreeSet::new();
    let mut chains = BTreeSet::new();
    let mut table = String::new();
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_string();
        } else if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split_whitespace().next().unwrap_or("");
            // Built-in chains carry a policy; user chains show "-".
            if chain.split_whitespace().nth(1) == Some("-") {
                chains.insert((table.clone(), name.to_string()));
            }
        } else if line.starts_with("-A ") {
            rules.insert((table.clone(), line.to_string()));
        }
    }
    (rules, chains)
}

/// Splits on spaces, keeping `"double quoted"` words whole.
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dir_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The machine's network link names.
fn links() -> BTreeSet<String> {
    dir_names(Path::new("/sys/class/net"))
}

/// Every cgroup v1 hierarchy and the v2 one of a hybrid setup: the directories in
/// `/sys/fs/cgroup` (and `unified`) that are cgroup mounts. Symlinks such as
/// `cpu -> cpu,cpuacct` are skipped: they name a hierarchy listed already.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| PathBuf::from(unescape(mount_point)))
        })
        .filter(|p| p.starts_with("/sys/fs/cgroup"))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// `dir` and every directory below it.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        if d.is_dir() {
            all.push(d);
        }
    }
    all
}

/// Mount points at or under any of `roots`, deepest first.
pub fn mounts_under(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| roots.iter().any(|root| p.starts_with(root)))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// Unmounts `path` (detaching it if busy); true once it is no longer a mount point.
fn unmount(path: &Path) -> bool {
    let ok = Command::new("umount")
        .arg(path)
        .output()
        .is_ok_and(|o| o.status.success());
    ok || Command::new("umount")
        .arg("--lazy")
        .arg(path)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_entries_finds_user_chains_and_rules() {
        let save = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n-A KUBE-X -m comment --comment \"a b\" -j ACCEPT\nCOMMIT\n";
        let (rules, chains) = iptables_entries(save);
        assert_eq!(
            chains.into_iter().collect::<Vec<_>>(),
            [("mangle".to_string(), "KUBE-IPTABLES-HINT".to_string())]
        );
        assert_eq!(rules.len(), 1);
    }

    #[test]
    fn shell_words_keeps_quoted_words() {
        assert_eq!(
            shell_words("KUBE-X -m comment --comment \"a b\" -j ACCEPT"),
            [
                "KUBE-X",
                "-m",
                "comment",
                "--comment",
                "a b",
                "-j",
                "ACCEPT"
            ]
        );
    }
}
