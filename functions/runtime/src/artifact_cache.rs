//! Compiled modules and components on disk, keyed by the sha256 of their bytes, so a
//! function host that restarts (or a second one on the agent) does not compile again.
//!
//! A file is named `SHA-COMPAT.EXT`: `COMPAT` is a hash of the engine's settings and
//! wasmtime version (an artifact from another engine is never even tried), `EXT`
//! says whether it is a core module (`cwasm`) or a component (`ccomp`).

use std::hash::Hasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::Digest;
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use crate::spec::GuestKind;

/// A compiled guest of either kind.
pub(crate) enum Compiled {
    Module(Module),
    Component(Component),
}

/// The on-disk cache; a no-op when there is no directory.
pub(crate) struct ArtifactCache {
    dir: Option<PathBuf>,
    compat: String,
}

impl ArtifactCache {
    /// `dir` is created if needed; when that fails the cache is off (with a warning).
    pub(crate) fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        let dir = dir.and_then(|dir| match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "function artifact cache dir unusable; compiling in memory only");
                None
            }
        });
        ArtifactCache {
            dir,
            compat: compat_hash(engine),
        }
    }

    fn path(&self, sha: &str, kind: GuestKind) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!(
            "{sha}-{}.{}",
            self.compat,
            kind.artifact_extension()
        )))
    }

    /// The cached artifact for `sha`, of whichever kind is there.
    pub(crate) fn load(&self, engine: &Engine, sha: &str) -> Option<Compiled> {
        for kind in [GuestKind::CgiModule, GuestKind::HttpComponent] {
            let path = self.path(sha, kind)?;
            if !path.is_file() {
                continue;
            }
            // SAFETY: deserializing trusts the file to be wasmtime's own output for this
            // engine. Only this cache writes these names (atomically, by rename), and
            // the name carries the engine's compatibility hash, so that holds.
            let loaded = match kind {
                GuestKind::CgiModule => {
                    unsafe { Module::deserialize_file(engine, &path) }.map(Compiled::Module)
                }
                GuestKind::HttpComponent => {
                    unsafe { Component::deserialize_file(engine, &path) }.map(Compiled::Component)
                }
            };
            match loaded {
                Ok(compiled) => return Some(compiled),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "discarding unusable cached artifact");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        None
    }

    /// Best effort: a failure only costs a compile in the next process.
    pub(crate) fn store(&self, sha: &str, compiled: &Compiled) {
        let (kind, bytes) = match compiled {
            Compiled::Module(m) => (GuestKind::CgiModule, m.serialize()),
            Compiled::Component(c) => (GuestKind::HttpComponent, c.serialize()),
        };
        let Some(path) = self.path(sha, kind) else {
            return;
        };
        let result = bytes.map_err(|e| e.to_string()).and_then(|bytes| {
            // Write then rename, so a reader never sees half an artifact.
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let tmp = path.with_extension(format!(
                "tmp.{}.{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&tmp, &bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    e.to_string()
                })
        });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled function");
        }
    }
}

/// Hex sha256 of some bytes.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Hex digest of the engine's compatibility hash (the `Hash` is fed into sha256, which
/// unlike `DefaultHasher` is stable across processes).
fn compat_hash(engine: &Engine) -> String {
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
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    hex::encode(&hasher.0.finalize()[..8])
}
