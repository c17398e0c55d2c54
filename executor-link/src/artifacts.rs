//! Compiled guests on disk, keyed by the sha256 of their source bytes, so an
//! executor that restarts (or a second one on the agent) does not compile again. The
//! wasm executor keeps compiled modules here, the function host modules and
//! components.
//!
//! A file is named `SHA-COMPAT.EXT`: `COMPAT` is a hash of the engine's settings and
//! version ([`compat_hash`] of wasmtime's `precompile_compatibility_hash`), so an
//! artifact from another engine is never even tried; `EXT` names the kind. Files are
//! written whole under a temporary name and renamed, so a reader never sees half of
//! one. The directory knows bytes and paths only: deserializing (which trusts the file
//! to be the engine's own output) is the caller's.

use std::fmt::Display;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::Digest as _;

/// Extension of a compiled core module.
pub const MODULE_EXT: &str = "cwasm";
/// Extension of a compiled component.
pub const COMPONENT_EXT: &str = "ccomp";

/// The cache directory; every call is a no-op when there is none.
#[derive(Debug, Clone)]
pub struct ArtifactDir {
    dir: Option<PathBuf>,
    compat: String,
}

impl ArtifactDir {
    /// `dir` is created if needed; when that fails the cache is off, with a warning
    /// (a cache only saves compiles).
    pub fn new(dir: Option<PathBuf>, compat: String) -> Self {
        let dir = dir.and_then(|dir| match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "compiled-module cache directory unusable; compiling in memory only");
                None
            }
        });
        ArtifactDir { dir, compat }
    }

    /// Where the artifact of `sha` with extension `ext` lives.
    pub fn path(&self, sha: &str, ext: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!("{sha}-{}.{ext}", self.compat)))
    }

    /// The artifact of `sha` as `deserialize` reads it from its file, if there is
    /// one; a file it cannot read is removed (with a warning) and None returned.
    pub fn load<T, E: Display>(
        &self,
        sha: &str,
        ext: &str,
        deserialize: impl FnOnce(&Path) -> Result<T, E>,
    ) -> Option<T> {
        let path = self.path(sha, ext)?;
        if !path.is_file() {
            return None;
        }
        match deserialize(&path) {
            Ok(artifact) => Some(artifact),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable cached artifact");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `bytes` (the serialized artifact, or why serializing failed) as the
    /// artifact of `sha`. Best effort: a failure is logged and only costs a compile
    /// in the next process.
    pub fn store<E: Display>(&self, sha: &str, ext: &str, bytes: Result<Vec<u8>, E>) {
        let Some(path) = self.path(sha, ext) else {
            return;
        };
        let result = bytes
            .map_err(|e| e.to_string())
            .and_then(|bytes| write_atomically(&path, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled artifact");
        }
    }
}

/// Writes `bytes` to a temporary name beside `path`, then renames it there.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

/// A short hex digest of a `Hash` value (fed into sha256, which unlike
/// `DefaultHasher` is stable across processes and releases): for an engine's
/// compatibility hash.
pub fn compat_hash(value: &impl Hash) -> String {
    struct Sha(sha2::Sha256);
    impl Hasher for Sha {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            0 // unused: the digest is taken below
        }
    }
    let mut hasher = Sha(sha2::Sha256::new());
    value.hash(&mut hasher);
    let digest = hasher.0.finalize();
    #[allow(clippy::indexing_slicing, reason = "a sha256 digest is 32 bytes")]
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_artifacts_load_back_and_bad_ones_are_discarded() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ArtifactDir::new(Some(tmp.path().join("c")), compat_hash(&("engine", 1)));
        let read = |p: &Path| std::fs::read(p);
        assert_eq!(cache.load("ab", "cwasm", read).map(|_| ()), None);
        cache.store::<String>("ab", "cwasm", Ok(b"compiled".to_vec()));
        assert_eq!(cache.load("ab", "cwasm", read).unwrap(), b"compiled");
        // Another kind, another engine: other names.
        assert!(cache.load("ab", "ccomp", read).is_none());
        let other = ArtifactDir::new(Some(tmp.path().join("c")), compat_hash(&("engine", 2)));
        assert!(other.load("ab", "cwasm", read).is_none());
        // A file the deserializer refuses goes away.
        assert!(cache
            .load("ab", "cwasm", |_| Err::<(), _>("not ours"))
            .is_none());
        assert!(!cache.path("ab", "cwasm").unwrap().exists());
        // No temporary files are left behind.
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("c")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn without_a_directory_nothing_is_kept() {
        let cache = ArtifactDir::new(None, "x".into());
        cache.store::<String>("ab", "cwasm", Ok(vec![1]));
        assert!(cache.load("ab", "cwasm", |p| std::fs::read(p)).is_none());
    }

    #[test]
    fn compat_hashes_are_stable_and_short() {
        assert_eq!(compat_hash(&42u64), compat_hash(&42u64));
        assert_ne!(compat_hash(&42u64), compat_hash(&43u64));
        assert_eq!(compat_hash(&42u64).len(), 16);
    }
}
