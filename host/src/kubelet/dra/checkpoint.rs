//! The claims a driver has prepared, kept on disk: kubelet's
//! NodeUnprepareResources names a claim by namespace, name and UID only, and
//! may come after the host restarted (or after the claim was deleted from the
//! API server), so what was prepared (the CDI spec file, the answer) is
//! written down before NodePrepareResources answers, and forgotten only when
//! the claim is unprepared.
//!
//! One JSON file per driver, `<state dir>/dra/<driver>.json`, replaced whole
//! (a temporary file, synced, renamed) on every change. A file that cannot be
//! read or parsed refuses the driver rather than forgetting claims that
//! containers still use.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::frontend::ClaimRequest;

/// The checkpoint format's version.
const VERSION: u32 = 1;

/// One device of a prepared claim, as NodePrepareResources answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// The claim's requests the device serves.
    pub requests: Vec<String>,
    /// Its pool.
    pub pool: String,
    /// Its name in the pool.
    pub device: String,
    /// The CDI ids the runtime injects for it.
    pub cdi_ids: Vec<String>,
}

/// A prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedClaim {
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name.
    pub name: String,
    /// The claim's CDI spec file in the CDI directory, if it has one.
    pub spec_file: Option<String>,
    /// The answer.
    pub devices: Vec<PreparedDevice>,
    /// The requests as they were prepared (names, device ids, configuration),
    /// for the module's `unprepare`. Absent from checkpoints written before
    /// 0.2.2's hooks: then empty.
    #[serde(default)]
    pub requests: Vec<ClaimRequest>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    /// By claim UID.
    claims: BTreeMap<String, PreparedClaim>,
}

/// A driver's prepared claims, and the file they are kept in.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    claims: BTreeMap<String, PreparedClaim>,
}

impl Checkpoint {
    /// Reads `<state_dir>/dra/<driver>.json` (none yet: no claims), creating
    /// the directory.
    ///
    /// # Errors
    /// The directory cannot be created, or the file cannot be read or parsed
    /// or is of another version; says which file and why.
    pub fn open(state_dir: &Path, driver: &str) -> Result<Self, String> {
        let dir = state_dir.join("dra");
        std::fs::create_dir_all(&dir).map_err(|e| {
            format!(
                "cannot create the state directory {} (is --state-dir writable?): {e}",
                dir.display()
            )
        })?;
        let path = dir.join(format!("{driver}.json"));
        let claims = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: File = serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "prepared-claims checkpoint {} cannot be read ({e}); not serving the driver rather than forgetting claims in use",
                        path.display()
                    )
                })?;
                if file.version != VERSION {
                    return Err(format!(
                        "prepared-claims checkpoint {} is version {}, this host reads {VERSION}",
                        path.display(),
                        file.version
                    ));
                }
                file.claims
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(format!(
                    "cannot read the prepared-claims checkpoint {}: {e}",
                    path.display()
                ));
            }
        };
        Ok(Self { path, claims })
    }

    /// The prepared claim with UID `uid`.
    pub fn get(&self, uid: &str) -> Option<&PreparedClaim> {
        self.claims.get(uid)
    }

    /// How many claims are prepared.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// Whether no claim is prepared.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Records claim `uid` as prepared, on disk first.
    ///
    /// # Errors
    /// The file cannot be written; nothing changed.
    pub fn insert(&mut self, uid: String, claim: PreparedClaim) -> Result<(), String> {
        let previous = self.claims.insert(uid.clone(), claim);
        self.save().inspect_err(|_| match previous {
            Some(previous) => {
                self.claims.insert(uid.clone(), previous);
            }
            None => {
                self.claims.remove(&uid);
            }
        })
    }

    /// Forgets claim `uid`, on disk first; returns what was prepared.
    ///
    /// # Errors
    /// The file cannot be written; nothing changed.
    pub fn remove(&mut self, uid: &str) -> Result<Option<PreparedClaim>, String> {
        let Some(claim) = self.claims.remove(uid) else {
            return Ok(None);
        };
        if let Err(e) = self.save() {
            self.claims.insert(uid.to_string(), claim);
            return Err(e);
        }
        Ok(Some(claim))
    }

    fn save(&self) -> Result<(), String> {
        #[derive(Serialize)]
        struct FileRef<'a> {
            version: u32,
            claims: &'a BTreeMap<String, PreparedClaim>,
        }
        let bytes = serde_json::to_vec_pretty(&FileRef {
            version: VERSION,
            claims: &self.claims,
        })
        .map_err(|e| format!("cannot encode the checkpoint: {e}"))?;
        let tmp = self.path.with_extension("json.tmp");
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!(
                "cannot write the prepared-claims checkpoint {}: {e}",
                self.path.display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str) -> PreparedClaim {
        PreparedClaim {
            namespace: "ns".into(),
            name: name.into(),
            spec_file: Some(format!("{name}.json")),
            devices: vec![PreparedDevice {
                requests: vec!["req".into()],
                pool: "node".into(),
                device: "dev-0".into(),
                cdi_ids: vec!["d.example.com/claim=u-req".into()],
            }],
            requests: vec![ClaimRequest {
                name: "req".into(),
                device_ids: vec!["/dev/0".into()],
                config: vec![r#"{"mode":"x"}"#.into()],
            }],
        }
    }

    #[test]
    fn a_checkpoint_written_before_the_requests_were_kept_still_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("dra")).expect("dir");
        let old = r#"{"version":1,"claims":{"u1":{"namespace":"ns","name":"a","specFile":null,"devices":[]}}}"#;
        std::fs::write(dir.path().join("dra/d.example.com.json"), old).expect("write");
        let checkpoint = Checkpoint::open(dir.path(), "d.example.com").expect("opens");
        let claim = checkpoint.get("u1").expect("kept");
        assert!(claim.requests.is_empty());
    }

    #[test]
    fn prepared_claims_survive_a_reopen_and_unprepared_ones_do_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut checkpoint = Checkpoint::open(dir.path(), "d.example.com").expect("opens");
        assert!(checkpoint.is_empty());
        checkpoint.insert("u1".into(), claim("a")).expect("saved");
        checkpoint.insert("u2".into(), claim("b")).expect("saved");
        assert_eq!(checkpoint.remove("u2").expect("saved"), Some(claim("b")));
        assert_eq!(checkpoint.remove("u2").expect("nothing to do"), None);
        let reopened = Checkpoint::open(dir.path(), "d.example.com").expect("opens");
        assert_eq!(reopened.get("u1"), Some(&claim("a")));
        assert_eq!(reopened.len(), 1);
    }

    #[test]
    fn a_damaged_checkpoint_refuses_the_driver_naming_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("dra")).expect("dir");
        std::fs::write(dir.path().join("dra/d.example.com.json"), "{not json").expect("write");
        let err = Checkpoint::open(dir.path(), "d.example.com").expect_err("refused");
        assert!(
            err.contains("d.example.com.json") && err.contains("forgetting"),
            "{err}"
        );
    }
}
