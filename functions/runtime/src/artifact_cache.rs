//! Compiled modules and components on disk, keyed by the sha256 of their bytes, so a
//! function host that restarts (or a second one on the agent) does not compile again.
//! The files live in the executors' one artifact directory
//! (`agora_executor_link::artifacts`): `SHA-COMPAT.EXT`, where `EXT` says whether it
//! is a core module (`cwasm`, as the wasm executor names them) or a component
//! (`ccomp`).

use std::path::PathBuf;

use agora_executor_link::artifacts::{compat_hash, ArtifactDir, COMPONENT_EXT, MODULE_EXT};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// A compiled guest of either kind.
pub(crate) enum Compiled {
    Module(Module),
    Component(Component),
}

/// The on-disk cache; a no-op when there is no directory.
pub(crate) struct ArtifactCache {
    dir: ArtifactDir,
}

impl ArtifactCache {
    /// `dir` is created if needed; when that fails the cache is off (with a warning).
    pub(crate) fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        ArtifactCache {
            dir: ArtifactDir::new(dir, compat_hash(&engine.precompile_compatibility_hash())),
        }
    }

    /// The cached artifact for `sha`, of whichever kind is there.
    pub(crate) fn load(&self, engine: &Engine, sha: &str) -> Option<Compiled> {
        // SAFETY (both): deserializing trusts the file to be wasmtime's own output for
        // this engine. Only this cache writes these names (atomically, by rename), and
        // the name carries the engine's compatibility hash, so that holds.
        self.dir
            .load(sha, MODULE_EXT, |path| unsafe {
                Module::deserialize_file(engine, path).map(Compiled::Module)
            })
            .or_else(|| {
                self.dir.load(sha, COMPONENT_EXT, |path| unsafe {
                    Component::deserialize_file(engine, path).map(Compiled::Component)
                })
            })
    }

    /// Best effort: a failure only costs a compile in the next process.
    pub(crate) fn store(&self, sha: &str, compiled: &Compiled) {
        let (ext, bytes) = match compiled {
            Compiled::Module(m) => (MODULE_EXT, m.serialize()),
            Compiled::Component(c) => (COMPONENT_EXT, c.serialize()),
        };
        self.dir.store(sha, ext, bytes);
    }
}
