//! A sandbox's disk use: one walk (`measure`, the thin I/O part, as Mesos's disk/du
//! isolator does it) and the one judgement of it against a task's limits
//! (`DiskLimits::exceeded`, pure). The wasm executor measures when its running count
//! of a guest's writes nears the limit, the native executor every few seconds, the
//! agent when `agora ps --stats` asks.

use std::path::Path;

use agora_proto::resources::format_bytes;

/// What a sandbox holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUse {
    /// Bytes of the blocks allocated to its files (a sparse file counts what it uses).
    pub bytes: u64,
    /// Files, directories and links in it (the root not counted).
    pub files: u64,
    /// The walk stopped at its entry bound before seeing everything: the true use is
    /// at least this.
    pub truncated: bool,
}

/// A task's disk limits; 0 means none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskLimits {
    pub bytes: u64,
    pub files: u64,
}

/// Which limit a sandbox went past, with the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskExceeded {
    Bytes { limit: u64 },
    Files { limit: u64 },
}

impl std::fmt::Display for DiskExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            DiskExceeded::Bytes { limit } => write!(
                f,
                "disk limit of {} exceeded",
                format_bytes(limit.min(i64::MAX as u64) as i64)
            ),
            DiskExceeded::Files { limit } => {
                write!(f, "disk limit of {limit} files exceeded")
            }
        }
    }
}

impl DiskLimits {
    /// Whether `used` goes past these limits (bytes first).
    pub fn exceeded(&self, used: DiskUse) -> Option<DiskExceeded> {
        if self.bytes > 0 && used.bytes > self.bytes {
            return Some(DiskExceeded::Bytes { limit: self.bytes });
        }
        if self.files > 0 && used.files > self.files {
            return Some(DiskExceeded::Files { limit: self.files });
        }
        None
    }

    /// How many entries a walk need see to judge these limits: past the file limit
    /// the answer is known, so a sandbox of millions of files costs no more to judge
    /// than one just over the limit.
    pub fn walk_bound(&self) -> u64 {
        if self.files > 0 {
            self.files.saturating_add(1)
        } else {
            DEFAULT_WALK_BOUND
        }
    }
}

/// Entries a walk sees at most when no file limit bounds it.
pub const DEFAULT_WALK_BOUND: u64 = 1_000_000;

/// Walks `root` without following symlinks and adds up what it holds, seeing at most
/// `max_entries` entries. A missing root holds nothing. Entries that vanish during
/// the walk are skipped (the task may be deleting them). A file with several hard
/// links in the sandbox is one entry per link but its blocks count once, as `du`
/// counts them.
pub fn measure(root: &Path, max_entries: u64) -> std::io::Result<DiskUse> {
    use std::os::unix::fs::MetadataExt;
    let mut used = DiskUse::default();
    let mut linked: std::collections::HashSet<(u64, u64)> = Default::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if dir == root => return Err(e),
            Err(_) => continue,
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            if used.files >= max_entries {
                used.truncated = true;
                return Ok(used);
            }
            let Ok(meta) = entry.metadata() else { continue };
            used.files += 1;
            let seen = meta.nlink() > 1
                && !meta.file_type().is_dir()
                && !linked.insert((meta.dev(), meta.ino()));
            if !seen {
                used.bytes = used.bytes.saturating_add(meta.blocks().saturating_mul(512));
            }
            if meta.file_type().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(used)
}

/// Free bytes of the filesystem holding `dir` (or its nearest existing ancestor):
/// what an unprivileged writer may still use.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = statvfs(dir)?;
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The size of the filesystem holding `dir` (or its nearest existing ancestor).
pub fn total_bytes(dir: &Path) -> Option<u64> {
    let st = statvfs(dir)?;
    Some((st.f_blocks as u64).saturating_mul(st.f_frsize as u64))
}

fn statvfs(dir: &Path) -> Option<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let mut at = Some(dir);
    while let Some(d) = at {
        if d.exists() {
            let c = std::ffi::CString::new(d.as_os_str().as_bytes()).ok()?;
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: a valid NUL-terminated path and a statvfs to fill.
            if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
                return None;
            }
            return Some(st);
        }
        at = d.parent();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_judge_bytes_then_files() {
        let l = DiskLimits {
            bytes: 100,
            files: 3,
        };
        let u = |bytes, files| DiskUse {
            bytes,
            files,
            truncated: false,
        };
        assert_eq!(l.exceeded(u(100, 3)), None);
        assert_eq!(
            l.exceeded(u(101, 9)),
            Some(DiskExceeded::Bytes { limit: 100 })
        );
        assert_eq!(l.exceeded(u(0, 4)), Some(DiskExceeded::Files { limit: 3 }));
        assert_eq!(DiskLimits::default().exceeded(u(u64::MAX, u64::MAX)), None);
        assert_eq!(
            DiskExceeded::Bytes { limit: 64 << 20 }.to_string(),
            "disk limit of 64MiB exceeded"
        );
    }

    #[test]
    fn measure_counts_files_and_blocks_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a"), vec![1u8; 100_000]).unwrap();
        std::os::unix::fs::symlink("/usr", d.path().join("link")).unwrap();
        let u = measure(d.path(), 100).unwrap();
        assert_eq!(u.files, 3);
        assert!(u.bytes >= 100_000, "{u:?}");
        assert!(u.bytes < 10 << 20, "the link was not followed: {u:?}");
        // A hard link is an entry, not more blocks.
        std::fs::hard_link(d.path().join("sub/a"), d.path().join("b")).unwrap();
        let linked = measure(d.path(), 100).unwrap();
        assert_eq!((linked.files, linked.bytes), (4, u.bytes));
        let t = measure(d.path(), 1).unwrap();
        assert!(t.truncated);
        assert_eq!(t.files, 1);
        assert_eq!(
            measure(&d.path().join("missing"), 10).unwrap(),
            DiskUse::default()
        );
    }
}
