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
    /// When the work dir's filesystem has less free than this, finished sandboxes are
    /// removed, oldest first, until it has this much again (or none is left), as
    /// Mesos's `--gc_disk_headroom` does. 0: never for space.
    pub min_free_bytes: u64,
}

impl Default for GcPolicy {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(6 * 3600),
            max_count: 2000,
            min_free_bytes: 1 << 30,
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

/// Which finished sandboxes to delete for space, given each with its last-modified
/// time and its size, the live tasks, and the free bytes now: the oldest first, until
/// what they free lifts `free` to `min_free` (none when it is there already).
pub fn plan_for_space(
    mut found: Vec<(TaskKey, SystemTime, u64)>,
    live: &HashSet<TaskKey>,
    free: u64,
    min_free: u64,
) -> Vec<TaskKey> {
    found.retain(|(k, _, _)| !live.contains(k));
    found.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let mut free = free;
    let mut doomed = Vec::new();
    for (k, _, size) in found {
        if free >= min_free {
            break;
        }
        free = free.saturating_add(size);
        doomed.push(k);
    }
    doomed
}

/// Lists `<work>/sandboxes/<framework>/<task>` and removes what `plan` says, then,
/// when the filesystem's free space (`free_bytes`, read by the caller's shell) is
/// below the policy's headroom, what `plan_for_space` says.
/// Returns how many sandboxes were removed.
pub fn collect(
    work: &Path,
    live: &HashSet<TaskKey>,
    p: GcPolicy,
    free_bytes: impl Fn() -> Option<u64>,
) -> std::io::Result<usize> {
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
    let mut doomed = plan(found.clone(), live, SystemTime::now(), p);
    let remove = |key: &TaskKey| {
        let dir = agora_agent_core::sandbox_dir(work, key);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), "cannot remove sandbox: {e}");
        }
    };
    doomed.iter().for_each(remove);
    if p.min_free_bytes > 0 {
        if let Some(free) = free_bytes().filter(|f| *f < p.min_free_bytes) {
            let gone: HashSet<&TaskKey> = doomed.iter().collect();
            let sized: Vec<(TaskKey, SystemTime, u64)> = found
                .into_iter()
                .filter(|(k, _)| !gone.contains(k) && !live.contains(k))
                .map(|(k, t)| {
                    let dir = agora_agent_core::sandbox_dir(work, &k);
                    let size = agora_executor_link::disk::measure(
                        &dir,
                        agora_executor_link::disk::DEFAULT_WALK_BOUND,
                    )
                    .map(|u| u.bytes)
                    .unwrap_or(0);
                    (k, t, size)
                })
                .collect();
            let for_space = plan_for_space(sized, live, free, p.min_free_bytes);
            if !for_space.is_empty() {
                tracing::info!(
                    free,
                    headroom = p.min_free_bytes,
                    removed = for_space.len(),
                    "low on disk: removing the oldest finished sandboxes"
                );
            }
            for_space.iter().for_each(remove);
            doomed.extend(for_space);
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
    fn low_free_space_removes_oldest_finished_first_until_headroom() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let found = vec![
            (key("newest"), t(300), 50),
            (key("oldest"), t(100), 30),
            (key("live-oldest"), t(50), 1_000),
            (key("middle"), t(200), 40),
        ];
        let live: HashSet<TaskKey> = [key("live-oldest")].into_iter().collect();
        // 100 free, 150 wanted: "oldest" (30) is not enough, "middle" (40) makes 170.
        assert_eq!(
            plan_for_space(found.clone(), &live, 100, 150),
            vec![key("oldest"), key("middle")]
        );
        // Enough free already: nothing goes.
        assert!(plan_for_space(found.clone(), &live, 150, 150).is_empty());
        // Never enough: every finished one goes, the live one stays.
        assert_eq!(
            plan_for_space(found, &live, 0, u64::MAX),
            vec![key("oldest"), key("middle"), key("newest")]
        );
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
            min_free_bytes: 0,
        };
        let mut doomed = plan(found, &live, now, p);
        doomed.sort();
        // "old" is past max_age; "older" is third newest of the finished ones.
        assert_eq!(doomed, vec![key("old"), key("older")]);
    }

    /// Below the headroom, `collect` removes finished sandboxes oldest first, each
    /// counted at what it holds, until the headroom would be back; a live one stays
    /// whatever its age.
    #[test]
    fn collect_for_space_removes_the_oldest_finished_sandboxes() {
        let work = tempfile::tempdir().unwrap();
        let epoch = SystemTime::now() - Duration::from_secs(600);
        for (i, t) in ["live", "a", "b", "c"].into_iter().enumerate() {
            let d = agora_agent_core::sandbox_dir(work.path(), &key(t));
            std::fs::create_dir_all(d.join("fs")).unwrap();
            std::fs::write(d.join("fs/data"), vec![1u8; 64 << 10]).unwrap();
            std::fs::write(d.join("stdout"), t).unwrap();
            let at = epoch + Duration::from_secs(60 * i as u64);
            for f in [d.clone(), d.join("stdout")] {
                std::fs::File::open(&f).unwrap().set_modified(at).unwrap();
            }
        }
        let live: HashSet<TaskKey> = [key("live")].into_iter().collect();
        let policy = GcPolicy {
            max_age: Duration::from_secs(3600),
            max_count: 100,
            min_free_bytes: 100 << 10,
        };
        // 1 KiB free, 100 KiB wanted: "a" (64 KiB and more) is not enough, "b" is.
        let n = collect(work.path(), &live, policy, || Some(1 << 10)).unwrap();
        assert_eq!(n, 2);
        let exists = |t| agora_agent_core::sandbox_dir(work.path(), &key(t)).exists();
        assert!(exists("live") && exists("c"));
        assert!(!exists("a") && !exists("b"));
        // Enough free: nothing more goes.
        let n = collect(work.path(), &live, policy, || Some(1 << 30)).unwrap();
        assert_eq!(n, 0);
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
                min_free_bytes: 0,
            },
            || None,
        )
        .unwrap();
        assert_eq!(n, 2);
        assert!(agora_agent_core::sandbox_dir(work.path(), &key("b")).exists());
        assert!(!agora_agent_core::sandbox_dir(work.path(), &key("a")).exists());
    }
}
