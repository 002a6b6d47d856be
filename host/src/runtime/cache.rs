//! Compiled components on disk, so that a host restart does not recompile.
//!
//! An entry is keyed by the SHA-256 of the module's bytes and of the engine's
//! `precompile_compatibility_hash` (wasmtime version, target, and the settings
//! that change generated code), so a different module, wasmtime or engine
//! configuration never finds it. Loading precompiled code is running it: an entry
//! is read back only if it carries this host's header and the SHA-256 of its
//! payload matches, and wasmtime checks its own header again on deserialize. Any
//! mismatch, truncation or error is a miss: the module is compiled from source and
//! the entry rewritten. Entries are written to a temporary file and renamed into
//! place, so a crash mid-write never leaves a torn entry under a real name.
//!
//! Owns only files in the cache directory; knows nothing of modules' lifecycles.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// First bytes of every entry this host writes (format version 1).
const HEADER: &[u8; 8] = b"WDPCWSM1";
/// Header plus the payload's SHA-256.
const PREFIX_LEN: usize = HEADER.len() + 32;

/// The SHA-256 of `bytes`, in lowercase hex.
pub fn content_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Feeds `Hash` input into SHA-256, so the engine's compatibility hash becomes a
/// stable digest (std's hashers are not meant to be stable across builds).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        // Only `write` is used; the digest is read through `finalize`.
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// How a cache lookup went.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A valid entry: the component deserialized from it.
    Hit,
    /// No entry.
    Miss,
    /// An entry that failed a check; why. It is replaced.
    Rejected(String),
}

/// The cache directory and the engine's part of every key.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    engine_key: String,
}

impl Cache {
    /// A cache in `dir` for components compiled by `engine`. Creates the directory
    /// (mode 0700) when it is missing. Refuses a directory that another user owns
    /// or that group or others may write: whoever can write an entry can run code
    /// in this process.
    ///
    /// # Errors
    /// The directory cannot be created, or it fails the ownership check.
    pub fn open(dir: &Path, engine: &Engine) -> io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let meta = fs::metadata(dir)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "owned by uid {}, not by this process (uid {euid})",
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "writable by group or others (mode {:o})",
                    meta.mode() & 0o777
                ),
            ));
        }
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir: dir.to_path_buf(),
            engine_key: hex(&hasher.0.finalize()),
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry for a module with SHA-256 `content_hash` lives.
    pub fn entry_path(&self, content_hash: &str) -> PathBuf {
        let mut key = Sha256::new();
        key.update(content_hash.as_bytes());
        key.update(b"/");
        key.update(self.engine_key.as_bytes());
        self.dir.join(format!("{}.cwasm", hex(&key.finalize())))
    }

    /// Reads the entry for `content_hash`, if there is a valid one.
    pub fn load(&self, engine: &Engine, content_hash: &str) -> (Lookup, Option<Component>) {
        let path = self.entry_path(content_hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return (Lookup::Miss, None),
            Err(err) => return (Lookup::Rejected(format!("cannot read: {err}")), None),
        };
        if bytes.len() < PREFIX_LEN || &bytes[..HEADER.len()] != HEADER {
            return (Lookup::Rejected("not written by this host".into()), None);
        }
        let (digest, payload) = bytes[HEADER.len()..].split_at(32);
        if Sha256::digest(payload).as_slice() != digest {
            return (
                Lookup::Rejected("checksum mismatch (corrupt or truncated)".into()),
                None,
            );
        }
        // SAFETY: `deserialize` runs the payload as machine code, so it must be
        // what wasmtime's `serialize` produced. The payload is byte-for-byte what
        // `store` wrote (its SHA-256 matches the one stored beside it), under a
        // key that includes the engine's compatibility hash, and wasmtime checks
        // its own version and configuration header again here. The directory is
        // this host's own (the operator points `--cache-dir` at it).
        match unsafe { Component::deserialize(engine, payload) } {
            Ok(component) => (Lookup::Hit, Some(component)),
            Err(err) => (Lookup::Rejected(format!("{err:#}")), None),
        }
    }

    /// Writes the entry for `content_hash`: to a temporary file first, renamed into
    /// place, so readers see a whole entry or none.
    ///
    /// # Errors
    /// Serializing or writing failed; the cache is left without the entry.
    pub fn store(&self, component: &Component, content_hash: &str) -> io::Result<()> {
        let payload = component.serialize().map_err(io::Error::other)?;
        let path = self.entry_path(content_hash);
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        file.write_all(HEADER)?;
        file.write_all(&Sha256::digest(&payload))?;
        file.write_all(&payload)?;
        file.as_file().sync_all()?;
        file.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).expect("engine")
    }

    /// The smallest component: an empty one.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    #[test]
    fn content_hash_is_sha256_hex() {
        assert_eq!(
            content_hash(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn stored_entry_is_a_hit_and_a_flipped_byte_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = engine();
        let cache = Cache::open(&dir.path().join("c"), &engine).expect("open");
        let hash = content_hash(EMPTY_COMPONENT);
        assert_eq!(cache.load(&engine, &hash).0, Lookup::Miss);
        let component = Component::new(&engine, EMPTY_COMPONENT).expect("compiles");
        cache.store(&component, &hash).expect("stored");
        assert_eq!(cache.load(&engine, &hash).0, Lookup::Hit);

        let path = cache.entry_path(&hash);
        let mut bytes = fs::read(&path).expect("entry");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).expect("corrupt");
        assert!(matches!(cache.load(&engine, &hash).0, Lookup::Rejected(_)));

        fs::write(&path, b"garbage").expect("garbage");
        assert!(matches!(cache.load(&engine, &hash).0, Lookup::Rejected(_)));
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = Cache::open(dir.path(), &engine()).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        Cache::open(dir.path(), &engine()).expect("accepted");
    }

    #[test]
    fn key_depends_on_content_and_engine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = engine();
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let epochs = Engine::new(&config).expect("engine");
        let a = Cache::open(dir.path(), &plain).expect("open");
        let b = Cache::open(dir.path(), &epochs).expect("open");
        assert_ne!(a.entry_path("x"), a.entry_path("y"));
        assert_ne!(a.entry_path("x"), b.entry_path("x"));
    }
}
