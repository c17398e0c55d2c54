//! Sandbox garbage collection: finished tasks' sandboxes are kept for a while (so
//! `agora logs` works after a task ends) and then removed, oldest first, so the
//! agent's disk use does not grow with its lifetime.
//!
//! `plan` is pure (it decides); `collect` is the thin shell that lists and deletes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use agora_agent_core::TaskKey;

#[derive(Debug, Clone, Copy)]
pub struct GcPolicy {
    /// A finished task's sandbox is removed this long after it last changed.
    pub max_age: Duration,
    /// At most this many finished sandboxes are kept; the oldest go first.
    pub max_count: usize,
}

impl Default for GcPolicy {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(6 * 3600),
            max_count: 2000,
        }
    }
}

/// Which sandboxes to delete, given every sandbox with its last-modified time, the
/// tasks still live (never deleted), and the time now.
pub fn plan(
    mut found: Vec<(TaskKey, SystemTime)>,
    live: &HashSet<TaskKey>,
    now: SystemTime,
    p: GcPolicy,
) -> Vec<TaskKey> {
    found.retain(|(k, _)| !live.contains(k));
    // Newest first: the ones past max_count at the end are the oldest.
    found.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    found
        .into_iter()
        .enumerate()
        .filter(|(i, (_, t))| {
            *i >= p.max_count || now.duration_since(*t).unwrap_or_default() > p.max_age
        })
        .map(|(_, (k, _))| k)
        .collect()
}

/// Lists `<work>/sandboxes/<framework>/<task>` and removes what `plan` says.
/// Returns how many sandboxes were removed.
pub fn collect(work: &Path, live: &HashSet<TaskKey>, p: GcPolicy) -> std::io::Result<usize> {
    let root = work.join("sandboxes");
    let mut found = Vec::new();
    let mut fw_dirs: Vec<PathBuf> = Vec::new();
    for fw in std::fs::read_dir(&root)? {
        let fw = fw?;
        if !fw.file_type()?.is_dir() {
            continue;
        }
        fw_dirs.push(fw.path());
        for t in std::fs::read_dir(fw.path())? {
            let t = t?;
            let modified = newest_mtime(&t.path()).unwrap_or(SystemTime::UNIX_EPOCH);
            let key = (
                fw.file_name().to_string_lossy().into_owned(),
                t.file_name().to_string_lossy().into_owned(),
            );
            found.push((key, modified));
        }
    }
    let doomed = plan(found, live, SystemTime::now(), p);
    for key in &doomed {
        let dir = agora_agent_core::sandbox_dir(work, key);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), "cannot remove sandbox: {e}");
        }
    }
    // Framework directories left empty go too.
    for d in fw_dirs {
        let _ = std::fs::remove_dir(d); // fails (harmlessly) unless empty
    }
    Ok(doomed.len())
}

/// Latest mtime among the sandbox dir and its output files (a running task's
/// directory does not change when it writes to stdout).
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    ["", "stdout", "stderr"]
        .iter()
        .filter_map(|f| {
            std::fs::symlink_metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str) -> TaskKey {
        ("fw".into(), t.into())
    }

    #[test]
    fn old_and_excess_sandboxes_go_live_ones_stay() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
        let ago = |s| now - Duration::from_secs(s);
        let found = vec![
            (key("fresh"), ago(10)),
            (key("old"), ago(50_000)),
            (key("live-old"), ago(90_000)),
            (key("mid"), ago(100)),
            (key("older"), ago(200)),
        ];
        let live: HashSet<TaskKey> = [key("live-old")].into_iter().collect();
        let p = GcPolicy {
            max_age: Duration::from_secs(3600),
            max_count: 2,
        };
        let mut doomed = plan(found, &live, now, p);
        doomed.sort();
        // "old" is past max_age; "older" is third newest of the finished ones.
        assert_eq!(doomed, vec![key("old"), key("older")]);
    }

    #[test]
    fn collect_removes_directories_on_disk() {
        let work = tempfile::tempdir().unwrap();
        for t in ["a", "b", "c"] {
            let d = agora_agent_core::sandbox_dir(work.path(), &key(t));
            std::fs::create_dir_all(d.join("fs")).unwrap();
            std::fs::write(d.join("stdout"), t).unwrap();
        }
        let live: HashSet<TaskKey> = [key("b")].into_iter().collect();
        let n = collect(
            work.path(),
            &live,
            GcPolicy {
                max_age: Duration::from_secs(3600),
                max_count: 0,
            },
        )
        .unwrap();
        assert_eq!(n, 2);
        assert!(agora_agent_core::sandbox_dir(work.path(), &key("b")).exists());
        assert!(!agora_agent_core::sandbox_dir(work.path(), &key("a")).exists());
    }
}
