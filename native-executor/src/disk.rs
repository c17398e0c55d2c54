//! The disk isolator of a native task: its sandbox walked while it runs (as Mesos's
//! disk/du isolator does) and once at its end, judged against its disk and file limits
//! (`agora_executor_link::disk`), plus a hard cap on any one file (RLIMIT_FSIZE, set
//! by the runner at spawn).
//!
//! Walking every second, as Mesos does, lets a task writing at page-cache speed put
//! gigabytes on the agent's disk between two walks. So the walks are scheduled by
//! [`next_walk_in`]: the first soon after the start, then doubling while the sandbox
//! does not grow, and, while it grows, before the growth seen could use half of what
//! is left under the limit; never more often than a floor that keeps walking to a
//! third of the time it takes. One file cannot outrun the walks at all: RLIMIT_FSIZE
//! stops it a block past the limit ([`max_file_bytes`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agora_executor_link::disk::{measure, DiskLimits, DiskUse};

/// The longest time between two walks of a running task's sandbox.
pub const MAX_WALK_INTERVAL: Duration = Duration::from_secs(1);
/// The first walk, this long after the start.
pub const FIRST_WALK_AFTER: Duration = Duration::from_millis(50);
/// The shortest time between two walks.
pub const MIN_WALK_INTERVAL: Duration = Duration::from_millis(10);

/// A filesystem block: what one file may go past the disk limit before the kernel
/// stops it, so that the next walk sees the sandbox over its limit.
const BLOCK: u64 = 4096;

/// The RLIMIT_FSIZE of a task with disk limit `disk_bytes` (0: none): a block more, so
/// a file stopped by it leaves the sandbox over its limit and the task is failed for
/// it rather than left to run.
pub fn max_file_bytes(disk_bytes: u64) -> Option<u64> {
    (disk_bytes > 0).then(|| disk_bytes.saturating_add(BLOCK))
}

/// When to walk again, from the last two walks: `before` and `now` taken `since`
/// apart, the last walk having taken `walk_took`, the interval before being
/// `previous`.
pub fn next_walk_in(
    limits: DiskLimits,
    before: DiskUse,
    now: DiskUse,
    since: Duration,
    previous: Duration,
    walk_took: Duration,
) -> Duration {
    let floor = MIN_WALK_INTERVAL.max(walk_took.saturating_mul(2));
    let mut next = previous.saturating_mul(2).min(MAX_WALK_INTERVAL);
    // Time until half of what is left would be used, at the rate just seen.
    let urgent = |limit: u64, before: u64, now: u64| -> Option<Duration> {
        let grew = now.checked_sub(before).filter(|g| *g > 0)?;
        if limit == 0 {
            return None;
        }
        let left = limit.saturating_sub(now);
        let secs = since.as_secs_f64() * (left as f64 / 2.0) / grew as f64;
        Some(Duration::try_from_secs_f64(secs).unwrap_or(MAX_WALK_INTERVAL))
    };
    for t in [
        urgent(limits.bytes, before.bytes, now.bytes),
        urgent(limits.files, before.files, now.files),
    ]
    .into_iter()
    .flatten()
    {
        next = next.min(t);
    }
    next.clamp(floor, MAX_WALK_INTERVAL.max(floor))
}

/// One task's sandbox, its limits, and what the walks saw.
pub(crate) struct DiskWatch {
    root: PathBuf,
    pub(crate) limits: DiskLimits,
    used: DiskUse,
    last_walk: Instant,
    interval: Duration,
    next_walk: Instant,
}

impl DiskWatch {
    pub(crate) fn new(root: PathBuf, limits: DiskLimits) -> Self {
        let now = Instant::now();
        DiskWatch {
            root,
            limits,
            used: DiskUse::default(),
            last_walk: now,
            interval: FIRST_WALK_AFTER,
            next_walk: now + FIRST_WALK_AFTER,
        }
    }

    /// Whether there is anything to enforce.
    pub(crate) fn limited(&self) -> bool {
        self.limits != DiskLimits::default()
    }

    /// When the next walk is due.
    pub(crate) fn next_walk(&self) -> Instant {
        self.next_walk
    }

    /// Walks the sandbox now and schedules the next walk; what it holds (what the last
    /// walk saw when this one fails).
    pub(crate) fn walk(&mut self) -> DiskUse {
        let started = Instant::now();
        let before = self.used;
        match measure(&self.root, self.limits.walk_bound()) {
            Ok(u) => self.used = u,
            Err(e) => {
                tracing::debug!(root = %self.root.display(), error = %e, "cannot walk a sandbox")
            }
        }
        let now = Instant::now();
        self.interval = next_walk_in(
            self.limits,
            before,
            self.used,
            started.saturating_duration_since(self.last_walk),
            self.interval,
            now - started,
        );
        self.last_walk = started;
        self.next_walk = now + self.interval;
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn used(bytes: u64, files: u64) -> DiskUse {
        DiskUse {
            bytes,
            files,
            truncated: false,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_quiet_sandbox_is_walked_less_and_less_often() {
        let l = DiskLimits {
            bytes: 100 * MIB,
            files: 1000,
        };
        let u = used(MIB, 3);
        assert_eq!(next_walk_in(l, u, u, ms(50), ms(50), ms(0)), ms(100));
        assert_eq!(next_walk_in(l, u, u, ms(400), ms(400), ms(0)), ms(800));
        assert_eq!(
            next_walk_in(l, u, u, ms(800), ms(800), ms(0)),
            MAX_WALK_INTERVAL
        );
    }

    #[test]
    fn a_sandbox_growing_toward_its_limit_is_walked_before_it_gets_there() {
        let l = DiskLimits {
            bytes: 100 * MIB,
            files: 0,
        };
        // 10 MiB in 100 ms, 80 MiB left: half of it in 400 ms.
        assert_eq!(
            next_walk_in(
                l,
                used(10 * MIB, 1),
                used(20 * MIB, 1),
                ms(100),
                ms(100),
                ms(0)
            ),
            ms(200),
            "no later than twice the last interval"
        );
        // 60 MiB in 100 ms, 20 MiB left: half of it in ~17 ms.
        let t = next_walk_in(
            l,
            used(20 * MIB, 1),
            used(80 * MIB, 1),
            ms(100),
            ms(200),
            ms(0),
        );
        assert!(ms(16) <= t && t <= ms(17), "{t:?}");
        // At the limit: as soon as the floor allows.
        assert_eq!(
            next_walk_in(
                l,
                used(80 * MIB, 1),
                used(100 * MIB, 1),
                ms(20),
                ms(20),
                ms(0)
            ),
            MIN_WALK_INTERVAL
        );
        // Files count the same way.
        let l = DiskLimits {
            bytes: 0,
            files: 1000,
        };
        assert_eq!(
            next_walk_in(l, used(0, 0), used(0, 900), ms(100), ms(100), ms(0)),
            MIN_WALK_INTERVAL
        );
    }

    #[test]
    fn walking_never_takes_more_than_a_third_of_the_time() {
        let l = DiskLimits {
            bytes: 0,
            files: 1000,
        };
        assert_eq!(
            next_walk_in(l, used(0, 0), used(0, 999), ms(100), ms(100), ms(40)),
            ms(80)
        );
        // Even past the usual longest interval.
        assert_eq!(
            next_walk_in(l, used(0, 5), used(0, 5), ms(1000), ms(1000), ms(700)),
            ms(1400)
        );
    }

    #[test]
    fn one_file_may_pass_the_limit_by_a_block() {
        assert_eq!(max_file_bytes(0), None);
        assert_eq!(max_file_bytes(16 * MIB), Some(16 * MIB + 4096));
    }
}
