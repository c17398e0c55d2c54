//! The master's content-addressed artifact store: `<data>/artifacts/<sha256>`.

use std::path::{Path, PathBuf};

use agora_proto::is_sha256_hex;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

impl ArtifactStore {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|cause| Error::ArtifactStore {
            path: dir.into(),
            cause,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Hashes of every complete artifact on disk (partial uploads start with '.').
    pub fn list(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name().to_string_lossy().to_string();
            if is_sha256_hex(&name) {
                out.push(name);
            }
        }
        Ok(out)
    }

    pub fn path(&self, sha: &str) -> Option<PathBuf> {
        if !is_sha256_hex(sha) {
            return None;
        }
        let p = self.dir.join(sha);
        p.exists().then_some(p)
    }

    /// Where an upload of `sha` is written (the caller verified `sha` is well formed).
    pub fn dest(&self, sha: &str) -> PathBuf {
        self.dir.join(sha)
    }
}
