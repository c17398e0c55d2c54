//! One cgroup (a task's or an executor's), on cgroup v1 or v2.
//!
//! A cgroup is named by a '/'-separated path relative to the hierarchy root, the same
//! under every controller: `<root>/<framework>/<executor>/<task>` is
//! `/sys/fs/cgroup/memory/<root>/...`, `/sys/fs/cgroup/cpu/<root>/...` and so on on v1,
//! and `/sys/fs/cgroup/<root>/...` on v2. Placing groups at the hierarchy root rather than
//! under the agent's own cgroup means a restarted agent finds its predecessor's
//! leftovers wherever it now runs, and the agent and its executors agree on paths by
//! name alone.
//!
//! Limits are written through cgroups-rs's controllers (pointed at our directories);
//! statistics and events are read here and parsed by the pure functions of
//! [`super::cgroupfs`], so the v2 code paths are tested on a fake cgroupfs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agora_proto::v1::ResourceUsage;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::freezer::FreezerController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Controller, MaxValue};
use cgroups_rs::CgroupPid;

use super::cgroupfs;
use super::CgroupLimits;
use crate::error::{Error, Result};

/// Which cgroup interface the kernel offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Where the controllers we use are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hierarchy {
    /// One mount per controller (cpu and cpuacct may share one). The freezer is
    /// optional: without it, killing falls back to repeated SIGKILL rounds.
    V1 {
        cpu: PathBuf,
        cpuacct: PathBuf,
        memory: PathBuf,
        pids: PathBuf,
        freezer: Option<PathBuf>,
    },
    /// The unified hierarchy's mount point.
    V2 { root: PathBuf },
}

impl Hierarchy {
    pub(crate) fn version(&self) -> CgroupVersion {
        match self {
            Hierarchy::V1 { .. } => CgroupVersion::V1,
            Hierarchy::V2 { .. } => CgroupVersion::V2,
        }
    }

    /// Every distinct mount point we use.
    pub(crate) fn mounts(&self) -> Vec<PathBuf> {
        let all = match self {
            Hierarchy::V1 {
                cpu,
                cpuacct,
                memory,
                pids,
                freezer,
            } => {
                let mut v = vec![cpu.clone(), cpuacct.clone(), memory.clone(), pids.clone()];
                v.extend(freezer.clone());
                v
            }
            Hierarchy::V2 { root } => vec![root.clone()],
        };
        let mut out: Vec<PathBuf> = Vec::new();
        for p in all {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// The controllers v2 groups need enabled in their parents' `cgroup.subtree_control`.
pub(crate) const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// CFS period: 100 ms, the kernel's default.
const CFS_PERIOD_US: u64 = 100_000;
/// How long the SIGKILL rounds of `kill_all` may take before giving up.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freeze may take to settle before we signal anyway.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `remove` retries a directory the kernel still calls busy (its last
/// processes are exiting).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One cgroup: its directory under each controller.
#[derive(Debug, Clone)]
pub(crate) struct Cgroup {
    name: String,
    version: CgroupVersion,
    cpu: PathBuf,
    cpuacct: PathBuf,
    memory: PathBuf,
    pids: PathBuf,
    freezer: Option<PathBuf>,
}

impl Cgroup {
    /// The handle of `name` (relative to the hierarchy root), existing or not.
    pub(crate) fn at(hier: &Hierarchy, name: &str) -> Cgroup {
        match hier {
            Hierarchy::V1 {
                cpu,
                cpuacct,
                memory,
                pids,
                freezer,
            } => Cgroup {
                name: name.to_string(),
                version: CgroupVersion::V1,
                cpu: cpu.join(name),
                cpuacct: cpuacct.join(name),
                memory: memory.join(name),
                pids: pids.join(name),
                freezer: freezer.as_ref().map(|f| f.join(name)),
            },
            Hierarchy::V2 { root } => {
                let dir = root.join(name);
                Cgroup {
                    name: name.to_string(),
                    version: CgroupVersion::V2,
                    cpu: dir.clone(),
                    cpuacct: dir.clone(),
                    memory: dir.clone(),
                    pids: dir.clone(),
                    freezer: Some(dir),
                }
            }
        }
    }

    /// Creates the directories (and, on v2, enables our controllers on the way down),
    /// then writes the limits. An existing empty group is reused (a leftover of a task
    /// that ended); one that still holds processes is refused.
    pub(crate) fn create(hier: &Hierarchy, name: &str, limits: &CgroupLimits) -> Result<Cgroup> {
        let cg = Cgroup::at(hier, name);
        let mut created = Vec::new();
        let result = (|| {
            if let Hierarchy::V2 { root } = hier {
                enable_v2_controllers(root, name)?;
            }
            for dir in cg.dirs() {
                if !dir.exists() {
                    fs::create_dir_all(dir).map_err(|e| Error::cgroup("create cgroup", dir, e))?;
                    created.push(dir.to_path_buf());
                }
            }
            let pids = cg.procs();
            if !pids.is_empty() {
                return Err(Error::Busy {
                    path: cg.memory.clone(),
                    pids,
                });
            }
            cg.apply(limits)
        })();
        match result {
            Ok(()) => Ok(cg),
            Err(e) => {
                // Undo only what this call made; a busy group belongs to someone else.
                for dir in created {
                    let _ = fs::remove_dir(dir);
                }
                Err(e)
            }
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The group's directory under `controller` (`cpu`, `cpuacct`, `memory`, `pids`,
    /// `freezer`); on v2 the one directory for all of them.
    pub(crate) fn dir(&self, controller: &str) -> Option<&Path> {
        match controller {
            "cpu" => Some(&self.cpu),
            "cpuacct" => Some(&self.cpuacct),
            "memory" => Some(&self.memory),
            "pids" => Some(&self.pids),
            "freezer" => self.freezer.as_deref(),
            _ => None,
        }
    }

    /// Each distinct directory of the group (one on v2; four or five on v1).
    pub(crate) fn dirs(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = vec![&self.cpu, &self.cpuacct, &self.memory, &self.pids];
        v.extend(self.freezer.as_deref());
        let mut out: Vec<&Path> = Vec::new();
        for d in v {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    pub(crate) fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }

    /// The `cgroup.procs` files a process writes itself into to join the group.
    pub(crate) fn join_files(&self) -> Vec<PathBuf> {
        self.dirs().iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Writes the limits: shares/weight and quota from `milli_cpus`, the hard memory
    /// limit (and no swap beyond it), the pids limit.
    pub(crate) fn apply(&self, limits: &CgroupLimits) -> Result<()> {
        let v2 = self.version == CgroupVersion::V2;
        let cpu = CpuController::new(self.cpu.clone(), self.cpu.clone(), v2);
        let shares = if limits.milli_cpus > 0 {
            limits.cpu_shares()
        } else {
            1024
        };
        let (file, value) = if v2 {
            ("cpu.weight", cgroupfs::shares_to_weight(shares))
        } else {
            ("cpu.shares", shares)
        };
        cpu.set_shares(value)
            .map_err(|e| limit_error(file, value, &self.cpu, &e))?;
        let quota = limits.cfs_quota_us().unwrap_or(-1);
        let quota_file = if v2 { "cpu.max" } else { "cpu.cfs_quota_us" };
        if !v2 && quota > 0 {
            // v1 refuses (EINVAL) a parent's quota below a child's: the groups of
            // tasks that ended but are not removed yet would make every shrink of an
            // executor's group fail. Live tasks' groups are within it anyway.
            cap_v1_quotas_below(&self.cpu, quota);
        }
        cpu.set_cfs_quota_and_period(Some(quota), Some(CFS_PERIOD_US))
            .map_err(|e| limit_error(quota_file, quota, &self.cpu, &e))?;

        self.apply_memory(limits.mem_bytes)?;

        let pids = PidController::new(self.pids.clone(), self.pids.clone(), v2);
        let max = match limits.pids_max {
            0 => MaxValue::Max,
            n => MaxValue::Value(i64::try_from(n).unwrap_or(i64::MAX)),
        };
        pids.set_pid_max(max)
            .map_err(|e| limit_error("pids.max", max, &self.pids, &e))
    }

    fn apply_memory(&self, mem_bytes: u64) -> Result<()> {
        let limit = match mem_bytes {
            0 => -1,
            n => i64::try_from(n).unwrap_or(i64::MAX),
        };
        let dir = &self.memory;
        if self.version == CgroupVersion::V2 {
            let mem = MemController::new(dir.clone(), dir.clone(), true);
            mem.set_limit(limit)
                .map_err(|e| limit_error("memory.max", limit, dir, &e))?;
            // No swap beyond the limit, so a runaway task is OOM-killed rather than
            // swapping the machine to a crawl. Absent without swap accounting.
            if dir.join("memory.swap.max").exists() {
                let swap = if limit < 0 { -1 } else { 0 };
                mem.set_memswap_limit(swap)
                    .map_err(|e| limit_error("memory.swap.max", swap, dir, &e))?;
            }
            return Ok(());
        }
        let mem = MemController::new(dir.clone(), dir.clone(), false);
        let set_limit = |v| {
            mem.set_limit(v)
                .map_err(|e| limit_error("memory.limit_in_bytes", v, dir, &e))
        };
        if !dir.join("memory.memsw.limit_in_bytes").exists() {
            return set_limit(limit);
        }
        // memory+swap must stay >= memory: when raising, raise memsw first; when
        // lowering, lower memory first.
        let set_memsw = |v| {
            mem.set_memswap_limit(v)
                .map_err(|e| limit_error("memory.memsw.limit_in_bytes", v, dir, &e))
        };
        let current = read_u64(&dir.join("memory.limit_in_bytes")).unwrap_or(u64::MAX);
        let raising = limit < 0 || (limit as u64) > current;
        if raising {
            set_memsw(limit)?;
            set_limit(limit)
        } else {
            set_limit(limit)?;
            set_memsw(limit)
        }
    }

    /// Moves an existing process (all its threads) into the group. A child that must
    /// not escape before it is inside should join from `pre_exec` instead
    /// (see `Group::contain`).
    pub(crate) fn add_pid(&self, pid: u32) -> Result<()> {
        let v2 = self.version == CgroupVersion::V2;
        for dir in self.dirs() {
            // Any controller type writes `cgroup.procs` of its directory.
            let c = PidController::new(dir.to_path_buf(), dir.to_path_buf(), v2);
            c.add_task_by_tgid(&CgroupPid::from(u64::from(pid)))
                .map_err(|e| Error::Limit {
                    file: "cgroup.procs",
                    value: pid.to_string(),
                    path: dir.to_path_buf(),
                    cause: cause(&e),
                })?;
        }
        Ok(())
    }

    /// Usage so far: cpu time, throttled periods, memory now and at its peak.
    /// Unreadable files count as zero (a peak of zero means "not known").
    pub(crate) fn stats(&self) -> ResourceUsage {
        let read = |dir: &Path, file: &str| fs::read_to_string(dir.join(file)).unwrap_or_default();
        let mut usage = ResourceUsage::default();
        match self.version {
            CgroupVersion::V1 => {
                (usage.cpu_user_seconds, usage.cpu_system_seconds) = cgroupfs::v1_cpu_seconds(
                    &read(&self.cpuacct, "cpuacct.stat"),
                    user_hz(),
                    read_u64(&self.cpuacct.join("cpuacct.usage")),
                );
                usage.mem_current_bytes =
                    read_u64(&self.memory.join("memory.usage_in_bytes")).unwrap_or(0);
                usage.mem_peak_bytes =
                    read_u64(&self.memory.join("memory.max_usage_in_bytes")).unwrap_or(0);
            }
            CgroupVersion::V2 => {
                (usage.cpu_user_seconds, usage.cpu_system_seconds) =
                    cgroupfs::cpu_stat_v2_seconds(&read(&self.cpu, "cpu.stat"));
                usage.mem_current_bytes =
                    read_u64(&self.memory.join("memory.current")).unwrap_or(0);
                // memory.peak exists from Linux 5.19 on.
                usage.mem_peak_bytes = read_u64(&self.memory.join("memory.peak")).unwrap_or(0);
            }
        }
        usage.cpu_throttled_periods =
            cgroupfs::keyed_value(&read(&self.cpu, "cpu.stat"), "nr_throttled").unwrap_or(0);
        usage
    }

    /// Whether the kernel's OOM killer killed a process of this group.
    pub(crate) fn oom_killed(&self) -> bool {
        match self.version {
            CgroupVersion::V1 => {
                let oc =
                    fs::read_to_string(self.memory.join("memory.oom_control")).unwrap_or_default();
                let failcnt = ["memory.failcnt", "memory.memsw.failcnt"]
                    .iter()
                    .filter_map(|f| read_u64(&self.memory.join(f)))
                    .max();
                cgroupfs::v1_oom_killed(&oc, failcnt)
            }
            CgroupVersion::V2 => {
                let ev = fs::read_to_string(self.memory.join("memory.events")).unwrap_or_default();
                cgroupfs::v2_oom_kills(&ev) > 0
            }
        }
    }

    /// How many forks the pids limit refused.
    pub(crate) fn pids_limit_hits(&self) -> u64 {
        let ev = fs::read_to_string(self.pids.join("pids.events")).unwrap_or_default();
        cgroupfs::pids_max_events(&ev)
    }

    /// Processes in this group and every group below it, without the calling process
    /// (which never kills itself).
    pub(crate) fn procs(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let mut pids = Vec::new();
        for dir in self.dirs() {
            for d in subtree(dir) {
                let text = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                pids.extend(cgroupfs::parse_pids(&text));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|&p| p != me);
        pids
    }

    /// Kills every process of the group and its descendants: SIGTERM, up to `grace`
    /// for them to leave, then SIGKILL rounds until the group is empty (bounded).
    /// Signals go to a frozen group where a freezer exists, so no process forks
    /// between the listing and the signal, and no listed pid is reused by a stranger.
    pub(crate) fn kill_all(&self, grace: Duration) -> Result<()> {
        if self.procs().is_empty() {
            return Ok(());
        }
        if !grace.is_zero() {
            self.signal_frozen(libc::SIGTERM);
            if self.wait_empty(grace) {
                return Ok(());
            }
        }
        let start = Instant::now();
        let mut round = Duration::from_millis(20);
        loop {
            // v2's cgroup.kill (Linux 5.14) kills the whole subtree atomically.
            let kill_file = self.memory.join("cgroup.kill");
            if self.version == CgroupVersion::V2 && kill_file.exists() {
                fs::write(&kill_file, "1")
                    .map_err(|e| Error::cgroup("write 1 to", &kill_file, e))?;
            } else {
                self.signal_frozen(libc::SIGKILL);
            }
            if self.wait_empty(round) {
                return Ok(());
            }
            if start.elapsed() > KILL_TIMEOUT {
                return Err(Error::KillTimedOut {
                    what: format!("cgroup {}", self.memory.display()),
                    pids: self.procs(),
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            round = (round * 2).min(Duration::from_millis(500));
        }
    }

    fn signal_frozen(&self, sig: i32) {
        let frozen = self.freeze();
        for pid in self.procs() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
        }
        if frozen {
            self.thaw();
        }
    }

    /// Freezes the group (v1 freezer or v2 `cgroup.freeze`), waiting briefly for the
    /// freeze to settle. Returns whether a freezer was written (and so must be thawed).
    fn freeze(&self) -> bool {
        let Some(dir) = &self.freezer else {
            return false;
        };
        let v2 = self.version == CgroupVersion::V2;
        if v2 && !dir.join("cgroup.freeze").exists() {
            return false; // before Linux 5.2
        }
        let f = FreezerController::new(dir.clone(), dir.clone(), v2);
        if let Err(e) = f.freeze() {
            tracing::debug!(cgroup = %dir.display(), error = %cause(&e), "cannot freeze; signalling unfrozen");
            return false;
        }
        let settled = || match self.version {
            CgroupVersion::V1 => fs::read_to_string(dir.join("freezer.state"))
                .map(|s| s.trim() == "FROZEN")
                .unwrap_or(true),
            CgroupVersion::V2 => fs::read_to_string(dir.join("cgroup.events"))
                .map(|s| cgroupfs::v2_frozen(&s))
                .unwrap_or(true),
        };
        // A task in uninterruptible sleep can hold a freeze in FREEZING; signals are
        // still delivered after the thaw, so carry on after a while.
        poll_until(FREEZE_TIMEOUT, settled);
        true
    }

    fn thaw(&self) {
        if let Some(dir) = &self.freezer {
            let v2 = self.version == CgroupVersion::V2;
            let f = FreezerController::new(dir.clone(), dir.clone(), v2);
            if let Err(e) = f.thaw() {
                tracing::warn!(cgroup = %dir.display(), error = %cause(&e), "cannot thaw cgroup");
            }
        }
    }

    fn wait_empty(&self, timeout: Duration) -> bool {
        poll_until(timeout, || self.procs().is_empty())
    }

    /// Removes the group and every group below it, deepest first, in every
    /// controller. Missing directories are fine. A directory that holds the calling
    /// process is left in place (with its ancestors).
    pub(crate) fn remove(&self) -> Result<()> {
        for dir in self.dirs() {
            remove_tree(dir)?;
        }
        Ok(())
    }
}

/// Enables the v2 controllers in `cgroup.subtree_control` of the root and of every
/// ancestor of `name`, so `name` gets cpu.max, memory.max and pids.max.
fn enable_v2_controllers(root: &Path, name: &str) -> Result<()> {
    let mut dir = root.to_path_buf();
    let parts: Vec<&str> = name.split('/').collect();
    for (i, part) in std::iter::once("").chain(parts.iter().copied()).enumerate() {
        if i > 0 {
            dir.push(part);
        }
        if i == parts.len() {
            break; // the group itself: its own subtree_control is for its children
        }
        if i > 0 && !dir.exists() {
            fs::create_dir(&dir).or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(Error::cgroup("create cgroup", &dir, e)),
            })?;
        }
        let file = dir.join("cgroup.subtree_control");
        let enabled = cgroupfs::controller_list(&fs::read_to_string(&file).unwrap_or_default());
        let missing: Vec<String> = V2_CONTROLLERS
            .iter()
            .filter(|c| !enabled.iter().any(|e| e == *c))
            .map(|c| format!("+{c}"))
            .collect();
        if !missing.is_empty() {
            fs::write(&file, missing.join(" ")).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                    " (cgroup v2 allows no processes in a group whose children have \
                     controllers: move them to a leaf group)"
                } else {
                    ""
                };
                Error::cgroup(
                    format!("enable controllers {}{hint} in", missing.join(" ")),
                    &file,
                    e,
                )
            })?;
        }
    }
    Ok(())
}

/// `dir` and every cgroup below it, parents before children.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
            out.push(d);
        }
    }
    out
}

fn remove_tree(dir: &Path) -> Result<()> {
    let me = std::process::id() as i32;
    let mut kept: Vec<PathBuf> = Vec::new();
    // Deepest first: reverse of parents-before-children, sorted by depth.
    let mut dirs = subtree(dir);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        if kept.iter().any(|k| k.starts_with(&d)) {
            kept.push(d);
            continue;
        }
        let holds_me = fs::read_to_string(d.join("cgroup.procs"))
            .map(|t| cgroupfs::parse_pids(&t).contains(&me))
            .unwrap_or(false);
        if holds_me {
            tracing::info!(cgroup = %d.display(), "not removing the cgroup this process runs in");
            kept.push(d);
            continue;
        }
        // cgroup v1 frees a removed group's CPU bandwidth later: until then its
        // quota still bounds its parent's (a shrink of the parent just after would
        // fail with EINVAL). No quota of its own (-1) takes it out of the check.
        let quota = d.join("cpu.cfs_quota_us");
        if quota.exists() {
            let _ = fs::write(&quota, "-1");
        }
        let mut last_error = None;
        poll_until(REMOVE_TIMEOUT, || match fs::remove_dir(&d) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => {
                // EBUSY while the last processes finish exiting; anything else is final.
                let retry = e.raw_os_error() == Some(libc::EBUSY);
                last_error = Some(e);
                !retry
            }
        });
        if d.exists() {
            let e = last_error.unwrap_or_else(|| io::Error::other("still busy"));
            return Err(Error::cgroup("remove cgroup", &d, e));
        }
    }
    Ok(())
}

/// Calls `done` until it says true or `timeout` passes, backing off from 1 ms to 50 ms
/// between calls. Returns the last answer. Polling is the interface cgroupfs v1 offers
/// for "the group is empty" (v2 could use inotify on cgroup.events; one code path
/// serves both).
pub(crate) fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if done() {
            return true;
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return false;
        }
        std::thread::sleep(pause.min(timeout - elapsed));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path)
        .ok()
        .as_deref()
        .and_then(cgroupfs::single_value)
}

/// USER_HZ, the unit of `cpuacct.stat`.
fn user_hz() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// The readable cause of a cgroups-rs error: the OS error underneath when there is one
/// (its own Display prints the cause with `{:?}`).
fn cause(e: &cgroups_rs::fs::error::Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(src) => src.to_string(),
        None => e.kind().to_string(),
    }
}

fn limit_error(
    file: &'static str,
    value: impl ToString,
    dir: &Path,
    e: &cgroups_rs::fs::error::Error,
) -> Error {
    Error::Limit {
        file,
        value: value.to_string(),
        path: dir.to_path_buf(),
        cause: cause(e),
    }
}

/// Lowers `cpu.cfs_quota_us` of every group below `dir` (deepest first) that is
/// above `quota`, so that `dir` itself can be set to `quota` (cgroup v1). Best
/// effort: a group that vanishes meanwhile is skipped.
fn cap_v1_quotas_below(dir: &std::path::Path, quota: i64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        // A child group is a directory holding the controller's files (not asked
        // of the entry's type, which cgroupfs may leave unknown).
        let child = e.path();
        let file = child.join("cpu.cfs_quota_us");
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        cap_v1_quotas_below(&child, quota);
        if text.trim().parse::<i64>().is_ok_and(|v| v > quota) {
            if let Err(e) = std::fs::write(&file, quota.to_string()) {
                tracing::debug!(path = %file.display(), "cannot lower the quota: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! cgroup v2 paths against a fake cgroupfs: a temp dir with files shaped like the
    //! kernel's. (The v1 paths run on real cgroups in tests/cgroups.rs.)

    use super::*;

    /// A v2 root with our controllers available and a pre-made group (the kernel makes
    /// the control files on mkdir; a plain directory needs them written).
    fn fake_v2(name: &str) -> (tempfile::TempDir, Hierarchy, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        for (file, text) in [
            ("cgroup.procs", ""),
            ("cgroup.events", "populated 0\nfrozen 0\n"),
            ("cgroup.freeze", "0\n"),
            ("cpu.max", "max 100000\n"),
            ("cpu.weight", "100\n"),
            ("memory.max", "max\n"),
            ("memory.swap.max", "max\n"),
            ("pids.max", "max\n"),
        ] {
            fs::write(dir.join(file), text).unwrap();
        }
        (tmp, Hierarchy::V2 { root }, dir)
    }

    fn read(dir: &Path, file: &str) -> String {
        fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn v2_create_enables_controllers_and_writes_limits() {
        let (tmp, hier, dir) = fake_v2("agora/fw/t1");
        let limits = CgroupLimits {
            milli_cpus: 500,
            cfs_quota: true,
            mem_bytes: 128 << 20,
            pids_max: 64,
        };
        let cg = Cgroup::create(&hier, "agora/fw/t1", &limits).unwrap();
        assert_eq!(cg.dirs(), vec![dir.as_path()]);
        assert_eq!(cg.join_files(), vec![dir.join("cgroup.procs")]);
        assert_eq!(read(&dir, "cpu.weight"), "20");
        assert_eq!(read(&dir, "cpu.max"), "50000 100000");
        assert_eq!(read(&dir, "memory.max"), (128u64 << 20).to_string());
        assert_eq!(read(&dir, "memory.swap.max"), "0");
        assert_eq!(read(&dir, "pids.max"), "64");
        // Root and every ancestor enable the controllers; the leaf does not.
        for anc in ["", "agora", "agora/fw"] {
            let sc = read(&tmp.path().join(anc), "cgroup.subtree_control");
            assert_eq!(
                cgroupfs::controller_list(&sc),
                vec!["cpu", "memory", "pids"],
                "{anc:?}"
            );
        }
        assert!(!dir.join("cgroup.subtree_control").exists());

        // Update: no quota, no memory limit, no pids limit.
        cg.apply(&CgroupLimits {
            milli_cpus: 2000,
            cfs_quota: false,
            mem_bytes: 0,
            pids_max: 0,
        })
        .unwrap();
        assert_eq!(read(&dir, "cpu.weight"), "79");
        assert_eq!(read(&dir, "cpu.max"), "max 100000");
        assert_eq!(read(&dir, "memory.max"), "max");
        assert_eq!(read(&dir, "memory.swap.max"), "max");
        assert_eq!(read(&dir, "pids.max"), "max");
    }

    #[test]
    fn v2_create_refuses_a_group_with_processes() {
        let (_tmp, hier, dir) = fake_v2("agora/t1");
        fs::write(dir.join("cgroup.procs"), "4242\n").unwrap();
        let err = Cgroup::create(&hier, "agora/t1", &CgroupLimits::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Busy { pids, .. } if pids == &[4242]),
            "{err}"
        );
        assert!(dir.exists(), "a busy group is not ours to remove");
    }

    #[test]
    fn v2_stats_and_events() {
        let (_tmp, hier, dir) = fake_v2("agora/t1");
        let cg = Cgroup::at(&hier, "agora/t1");
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1750000\nuser_usec 1500000\nsystem_usec 250000\nnr_periods 30\n\
             nr_throttled 12\nthrottled_usec 600000\n",
        )
        .unwrap();
        fs::write(dir.join("memory.current"), "4096\n").unwrap();
        fs::write(dir.join("memory.peak"), "67108864\n").unwrap();
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 40\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(dir.join("pids.events"), "max 5\n").unwrap();
        let usage = cg.stats();
        assert_eq!(usage.cpu_user_seconds, 1.5);
        assert_eq!(usage.cpu_system_seconds, 0.25);
        assert_eq!(usage.cpu_throttled_periods, 12);
        assert_eq!(usage.mem_current_bytes, 4096);
        assert_eq!(usage.mem_peak_bytes, 64 << 20);
        assert!(cg.oom_killed());
        assert_eq!(cg.pids_limit_hits(), 5);

        // Older kernels: no memory.peak; no OOM kill, no pids events.
        fs::remove_file(dir.join("memory.peak")).unwrap();
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 40\noom 0\noom_kill 0\n",
        )
        .unwrap();
        fs::write(dir.join("pids.events"), "max 0\n").unwrap();
        let usage = cg.stats();
        assert_eq!((usage.mem_current_bytes, usage.mem_peak_bytes), (4096, 0));
        assert!(!cg.oom_killed());
        assert_eq!(cg.pids_limit_hits(), 0);
    }

    #[test]
    fn v2_procs_cover_the_subtree() {
        let (_tmp, hier, dir) = fake_v2("agora/ex");
        fs::write(dir.join("cgroup.procs"), "10\n").unwrap();
        fs::create_dir(dir.join("t1")).unwrap();
        fs::write(dir.join("t1/cgroup.procs"), "11\n12\n").unwrap();
        fs::create_dir_all(dir.join("t2/inner")).unwrap();
        fs::write(dir.join("t2/inner/cgroup.procs"), "13\n10\n").unwrap();
        assert_eq!(Cgroup::at(&hier, "agora/ex").procs(), vec![10, 11, 12, 13]);
    }

    /// Plays the kernel for one fake group holding one real process: when `trigger`
    /// says so, kills the process, reaps it and empties `cgroup.procs`.
    fn fake_kernel(
        dir: PathBuf,
        mut child: std::process::Child,
        trigger: impl Fn(&Path) -> bool + Send + 'static,
    ) -> std::thread::JoinHandle<Option<i32>> {
        std::thread::spawn(move || {
            let seen = poll_until(Duration::from_secs(30), || trigger(&dir));
            if seen {
                let _ = child.kill();
            }
            let status = child.wait().unwrap();
            fs::write(dir.join("cgroup.procs"), "").unwrap();
            use std::os::unix::process::ExitStatusExt;
            status.signal()
        })
    }

    #[test]
    fn v2_kill_uses_cgroup_kill_when_present() {
        let (_tmp, hier, dir) = fake_v2("agora/t1");
        fs::write(dir.join("cgroup.kill"), "").unwrap();
        let child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        fs::write(dir.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();
        let kernel = fake_kernel(dir.clone(), child, |d| {
            fs::read_to_string(d.join("cgroup.kill")).unwrap_or_default() == "1"
        });
        Cgroup::at(&hier, "agora/t1")
            .kill_all(Duration::ZERO)
            .unwrap();
        assert_eq!(kernel.join().unwrap(), Some(libc::SIGKILL));
    }

    #[test]
    fn v2_kill_without_cgroup_kill_freezes_signals_and_thaws() {
        let (_tmp, hier, dir) = fake_v2("agora/t1");
        // Frozen at once, as far as the fake kernel is concerned.
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        let child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        fs::write(dir.join("cgroup.procs"), format!("{pid}\n")).unwrap();
        // The real signal does the killing here; the fake kernel only reaps and
        // empties the group once the process is gone.
        let kernel = std::thread::spawn(move || {
            let mut child = child;
            let status = child.wait().unwrap();
            fs::write(dir.join("cgroup.procs"), "").unwrap();
            use std::os::unix::process::ExitStatusExt;
            (status.signal(), dir)
        });
        Cgroup::at(&hier, "agora/t1")
            .kill_all(Duration::ZERO)
            .unwrap();
        let (signal, dir) = kernel.join().unwrap();
        assert_eq!(signal, Some(libc::SIGKILL));
        assert_eq!(read(&dir, "cgroup.freeze"), "0", "thawed after the kill");
    }

    #[test]
    fn v2_kill_sends_sigterm_first_within_grace() {
        let (_tmp, hier, dir) = fake_v2("agora/t1");
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        let child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        fs::write(dir.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();
        let kernel = std::thread::spawn(move || {
            let mut child = child;
            let status = child.wait().unwrap();
            fs::write(dir.join("cgroup.procs"), "").unwrap();
            use std::os::unix::process::ExitStatusExt;
            status.signal()
        });
        Cgroup::at(&hier, "agora/t1")
            .kill_all(Duration::from_secs(30))
            .unwrap();
        assert_eq!(kernel.join().unwrap(), Some(libc::SIGTERM));
    }
}
