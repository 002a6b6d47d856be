//! The module's configuration (the manifest's `[config]`), parsed and checked:
//! which kinds to serve, their patterns, grouping and permissions, and the root
//! the patterns are looked up under. Reads no files; the format is in the crate
//! documentation.

use crate::pattern::Pattern;
use wdp_sdk::ModuleError;

/// The key listing the kinds.
pub const KINDS: &str = "kinds";
/// The key naming the host directory that stands for `/`.
pub const ROOT: &str = "root";
/// The per-kind keys, as `<kind>.<field>`.
const FIELDS: [&str; 3] = ["paths", "group", "permissions"];
/// Container permissions when `<kind>.permissions` is not set.
const DEFAULT_PERMISSIONS: &str = "rw";

/// Everything the module serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The host directory the patterns are looked up under, without a trailing
    /// `/`; empty for `/` (the default).
    pub root: String,
    /// The kinds, in the order `kinds` lists them.
    pub kinds: Vec<KindSpec>,
}

/// One kind: a kubelet resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindSpec {
    /// The kind's name as listed (bare, or a full resource name).
    pub name: String,
    /// `<kind>.paths`, in order.
    pub patterns: Vec<Pattern>,
    /// `<kind>.group`.
    pub group: Group,
    /// `<kind>.permissions`: cgroup permissions of every node.
    pub permissions: String,
}

/// How a kind's matches become devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Every match is a device of its own (`each`, the default).
    Each,
    /// All matches together are one device (`all`).
    All,
}

impl Config {
    /// The configuration the host hands this module.
    ///
    /// # Errors
    /// As [`Config::parse`].
    pub fn load() -> Result<Self, ModuleError> {
        Self::parse(&wdp_sdk::config::all())
    }

    /// Parses the configuration's key/value pairs.
    ///
    /// # Errors
    /// [`ModuleError::InvalidRequest`] naming the key: `kinds` unset, empty or
    /// listing a kind twice; a key that is neither `kinds`, `root` nor
    /// `<listed kind>.paths|group|permissions`; `<kind>.paths` unset, empty or
    /// holding a pattern that is not an absolute, normalised path; a `group`
    /// other than `each` or `all`; `permissions` not made of `r`, `w`, `m`; a
    /// `root` that is not an absolute, normalised path.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ModuleError> {
        let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.trim());
        let listed = get(KINDS).ok_or_else(|| {
            invalid(
                KINDS,
                "not set; list the kinds to serve, e.g. kinds = \"serial\" with \
                 \"serial.paths\" = \"/dev/ttyUSB*\"",
            )
        })?;
        let mut names: Vec<&str> = Vec::new();
        for name in listed.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if names.contains(&name) {
                return Err(invalid(KINDS, &format!("`{name}` is listed twice")));
            }
            names.push(name);
        }
        if names.is_empty() {
            return Err(invalid(KINDS, "lists no kinds"));
        }

        for (key, _) in pairs {
            if key == KINDS || key == ROOT {
                continue;
            }
            let Some((kind, field)) = key.rsplit_once('.') else {
                return Err(invalid(
                    key,
                    "unknown key; the keys are `kinds`, `root` and `<kind>.paths`, \
                     `<kind>.group`, `<kind>.permissions`",
                ));
            };
            if !names.contains(&kind) {
                return Err(invalid(
                    key,
                    &format!("`{kind}` is not listed in `kinds` (`{listed}`)"),
                ));
            }
            if !FIELDS.contains(&field) {
                return Err(invalid(
                    key,
                    &format!(
                        "unknown key; a kind takes `{kind}.paths`, `{kind}.group` and \
                         `{kind}.permissions`"
                    ),
                ));
            }
        }

        let root = match get(ROOT) {
            None => String::new(),
            Some(root) => parse_root(root)?,
        };
        let kinds = names
            .into_iter()
            .map(|name| kind(name, &get))
            .collect::<Result<_, _>>()?;
        Ok(Self { root, kinds })
    }

    /// The kind named `name`.
    pub fn kind(&self, name: &str) -> Option<&KindSpec> {
        self.kinds.iter().find(|k| k.name == name)
    }
}

fn kind<'a>(name: &str, get: &impl Fn(&str) -> Option<&'a str>) -> Result<KindSpec, ModuleError> {
    let key = format!("{name}.paths");
    let raw = get(&key).ok_or_else(|| {
        invalid(
            &key,
            "not set; give comma-separated absolute patterns, e.g. \"/dev/ttyUSB*\"",
        )
    })?;
    let patterns = raw
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| Pattern::parse(p).map_err(|why| invalid(&key, &why)))
        .collect::<Result<Vec<_>, _>>()?;
    if patterns.is_empty() {
        return Err(invalid(&key, "holds no patterns"));
    }

    let key = format!("{name}.group");
    let group = match get(&key) {
        None | Some("each") => Group::Each,
        Some("all") => Group::All,
        Some(other) => {
            return Err(invalid(
                &key,
                &format!("`{other}` is neither `each` nor `all`"),
            ));
        }
    };

    let key = format!("{name}.permissions");
    let permissions = get(&key).unwrap_or(DEFAULT_PERMISSIONS);
    if permissions.is_empty() || !permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
        return Err(invalid(
            &key,
            &format!("`{permissions}` is not made of r, w and m"),
        ));
    }

    Ok(KindSpec {
        name: name.to_string(),
        patterns,
        group,
        permissions: permissions.to_string(),
    })
}

fn parse_root(root: &str) -> Result<String, ModuleError> {
    if root == "/" {
        return Ok(String::new());
    }
    let normalised = root.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|s| !matches!(s, "" | "." | "..") && !s.contains('\0'))
    });
    if !normalised {
        return Err(invalid(
            ROOT,
            &format!("`{root}` is not an absolute, normalised path"),
        ));
    }
    Ok(root.to_string())
}

fn invalid(key: &str, why: &str) -> ModuleError {
    ModuleError::InvalidRequest(format!("config `{key}`: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(&pairs).map_err(|e| match e {
            ModuleError::InvalidRequest(m) => m,
            other => panic!("not an invalid request: {other:?}"),
        })
    }

    #[test]
    fn kinds_with_their_patterns_group_and_permissions() {
        let config = parse(&[
            ("kinds", "serial, audio"),
            ("serial.paths", "/dev/ttyUSB*, /dev/ttyACM*"),
            ("audio.paths", "/dev/snd/*"),
            ("audio.group", "all"),
            ("audio.permissions", "r"),
            ("root", "/srv/fake"),
        ])
        .expect("valid");
        assert_eq!(config.root, "/srv/fake");
        let names: Vec<&str> = config.kinds.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["serial", "audio"]);
        let serial = config.kind("serial").expect("serial");
        assert_eq!(serial.patterns.len(), 2);
        assert!(serial.patterns[1].matches("/dev/ttyACM0"));
        assert_eq!(serial.group, Group::Each);
        assert_eq!(serial.permissions, "rw");
        let audio = config.kind("audio").expect("audio");
        assert_eq!(audio.group, Group::All);
        assert_eq!(audio.permissions, "r");
        assert_eq!(
            parse(&[("kinds", "a"), ("a.paths", "/dev/a"), ("root", "/")])
                .expect("valid")
                .root,
            ""
        );
    }

    #[test]
    fn a_full_resource_name_is_a_kind_too() {
        let config = parse(&[
            ("kinds", "vendor.example/serial"),
            ("vendor.example/serial.paths", "/dev/ttyS*"),
        ])
        .expect("valid");
        assert_eq!(config.kinds[0].name, "vendor.example/serial");
    }

    #[test]
    fn bad_configurations_name_the_key() {
        for (pairs, key, why) in [
            (vec![], "kinds", "not set"),
            (vec![("kinds", " , ")], "kinds", "lists no kinds"),
            (
                vec![("kinds", "a,a"), ("a.paths", "/dev/a")],
                "kinds",
                "listed twice",
            ),
            (vec![("kinds", "a")], "a.paths", "not set"),
            (
                vec![("kinds", "a"), ("a.paths", " ,")],
                "a.paths",
                "holds no patterns",
            ),
            (
                vec![("kinds", "a"), ("a.paths", "dev/a*")],
                "a.paths",
                "`dev/a*` is not an absolute path",
            ),
            (
                vec![("kinds", "a"), ("a.paths", "/dev/a,/dev/[x")],
                "a.paths",
                "without its closing",
            ),
            (
                vec![("kinds", "a"), ("a.paths", "/dev/a"), ("a.path", "/dev/b")],
                "a.path",
                "unknown key",
            ),
            (
                vec![("kinds", "a"), ("a.paths", "/dev/a"), ("b.paths", "/dev/b")],
                "b.paths",
                "`b` is not listed in `kinds`",
            ),
            (
                vec![("kinds", "a"), ("a.paths", "/dev/a"), ("verbose", "true")],
                "verbose",
                "unknown key",
            ),
            (
                vec![("kinds", "a"), ("a.paths", "/dev/a"), ("a.group", "some")],
                "a.group",
                "neither `each` nor `all`",
            ),
            (
                vec![
                    ("kinds", "a"),
                    ("a.paths", "/dev/a"),
                    ("a.permissions", "rwx"),
                ],
                "a.permissions",
                "not made of r, w and m",
            ),
            (
                vec![("kinds", "a"), ("a.paths", "/dev/a"), ("a.permissions", "")],
                "a.permissions",
                "not made of r, w and m",
            ),
            (
                vec![("kinds", "a"), ("a.paths", "/dev/a"), ("root", "srv/x")],
                "root",
                "not an absolute, normalised path",
            ),
            (
                vec![("kinds", "a"), ("a.paths", "/dev/a"), ("root", "/srv/x/")],
                "root",
                "not an absolute, normalised path",
            ),
        ] {
            let err = parse(&pairs).expect_err(key);
            assert!(
                err.starts_with(&format!("config `{key}`: ")),
                "{pairs:?}: {err}"
            );
            assert!(err.contains(why), "{pairs:?}: {err}");
        }
    }
}
