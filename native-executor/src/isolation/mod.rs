//! Isolation of native processes: one group per task (or per executor, for the agent),
//! either a cgroup (v1 or v2) with CPU, memory and pids limits, or, where cgroups
//! cannot be used, a posix process group with rlimits.
//!
//! ```no_run
//! # use agora_native_executor::isolation::{Isolator, CgroupLimits};
//! # use std::time::Duration;
//! let isolator = Isolator::new(None, "agora/agent-1")?; // cgroups if usable, else posix
//! let limits = CgroupLimits { milli_cpus: 500, cfs_quota: true, mem_bytes: 64 << 20, pids_max: 64 };
//! let group = isolator.create("fw/ex/task-1", &limits)?;
//! let mut cmd = std::process::Command::new("/bin/sh");
//! cmd.args(["-c", "exec sleep 5"]);
//! let contained = group.contain(&mut cmd)?;            // the child joins before it execs
//! let child = contained.spawned(cmd.spawn()).expect("spawn");
//! group.kill_all(Duration::from_secs(3))?;             // SIGTERM, grace, SIGKILL
//! group.remove()?;
//! # drop(child);
//! # Ok::<(), agora_native_executor::Error>(())
//! ```

mod cgroup;
pub mod cgroupfs;
mod posix;

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agora_proto::v1::ResourceUsage;

pub use cgroup::CgroupVersion;
pub(crate) use cgroup::{Cgroup, Hierarchy};
pub use cgroupfs::escape_component;
use cgroupfs::CgroupMount;
use posix::PosixGroup;

use crate::error::{Error, Result};

/// How tasks are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationMode {
    /// One cgroup per task: CPU shares and quota, hard memory limit, pids limit;
    /// kills reach every process in the group.
    Cgroups,
    /// A process group per task and RLIMIT_AS; see `posix.rs` for what it cannot do.
    Posix,
}

impl IsolationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationMode::Cgroups => "cgroups",
            IsolationMode::Posix => "posix",
        }
    }
}

impl std::str::FromStr for IsolationMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, crate::Error> {
        match s {
            "cgroups" => Ok(IsolationMode::Cgroups),
            "posix" => Ok(IsolationMode::Posix),
            other => Err(crate::Error::UnknownIsolation(other.to_string())),
        }
    }
}

/// Limits of one group. Zero memory or pids means no limit; zero cpus means default
/// shares (as much as one cpu's weight) and no quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub milli_cpus: i64,
    /// Cap CPU use at `milli_cpus` with a CFS quota (period 100 ms), not only weigh it.
    pub cfs_quota: bool,
    pub mem_bytes: u64,
    pub pids_max: u64,
}

impl Default for CgroupLimits {
    fn default() -> Self {
        CgroupLimits {
            milli_cpus: 0,
            cfs_quota: true,
            mem_bytes: 0,
            pids_max: 0,
        }
    }
}

impl CgroupLimits {
    /// v1 `cpu.shares`: 1024 per cpu, at least the kernel's minimum of 2.
    pub fn cpu_shares(&self) -> u64 {
        let milli = self.milli_cpus.max(0) as u64;
        (milli * 1024 / 1000).clamp(2, 262_144)
    }

    /// CFS quota per 100 ms period, in µs, when a quota applies (at least the kernel's
    /// minimum of 1 ms).
    pub fn cfs_quota_us(&self) -> Option<i64> {
        (self.cfs_quota && self.milli_cpus > 0).then(|| (self.milli_cpus * 100).max(1_000))
    }
}

/// Chooses and holds the isolation mode, and makes groups under one root name.
#[derive(Debug)]
pub struct Isolator {
    root_name: String,
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Cgroups(Hierarchy),
    Posix { reason: String },
}

impl Isolator {
    /// Cgroups when usable here, else posix with the reason logged once.
    pub fn detect(root_name: &str) -> Result<Isolator> {
        Isolator::new(None, root_name)
    }

    /// `mode`: `None` detects; `Some(Cgroups)` fails, saying why, where cgroups cannot
    /// be used; `Some(Posix)` always works. `root_name` is the '/'-separated path,
    /// relative to each hierarchy's root, that every group of this isolator lives under
    /// (e.g. `agora/<agent id>`).
    pub fn new(mode: Option<IsolationMode>, root_name: &str) -> Result<Isolator> {
        cgroupfs::check_name(root_name).map_err(|why| Error::InvalidName {
            name: root_name.to_string(),
            why,
        })?;
        let backend = match mode {
            Some(IsolationMode::Posix) => Backend::Posix {
                reason: "posix isolation was asked for".to_string(),
            },
            Some(IsolationMode::Cgroups) => {
                Backend::Cgroups(usable_cgroups().map_err(Error::CgroupsUnavailable)?)
            }
            None => match usable_cgroups() {
                Ok(h) => Backend::Cgroups(h),
                Err(reason) => Backend::Posix { reason },
            },
        };
        let isolator = Isolator {
            root_name: root_name.trim_end_matches('/').to_string(),
            backend,
        };
        isolator.announce();
        Ok(isolator)
    }

    /// An isolator over a given hierarchy (tests: a fake cgroupfs).
    #[cfg(test)]
    pub(crate) fn with_hierarchy(hier: Hierarchy, root_name: &str) -> Isolator {
        Isolator {
            root_name: root_name.to_string(),
            backend: Backend::Cgroups(hier),
        }
    }

    /// The one line that says which isolation tasks get.
    fn announce(&self) {
        match &self.backend {
            Backend::Cgroups(h) => tracing::info!(
                version = ?h.version(),
                mounts = ?h.mounts(),
                root = %self.root_name,
                "isolation: cgroups (cpu shares and quota, memory limit, pids limit per task)"
            ),
            Backend::Posix { reason } => tracing::warn!(
                "isolation: posix, because {reason}: tasks run as process groups with \
                 RLIMIT_AS for memory; there is no CPU or pids limit and no OOM reporting"
            ),
        }
    }

    pub fn mode(&self) -> IsolationMode {
        match self.backend {
            Backend::Cgroups(_) => IsolationMode::Cgroups,
            Backend::Posix { .. } => IsolationMode::Posix,
        }
    }

    pub fn cgroup_version(&self) -> Option<CgroupVersion> {
        match &self.backend {
            Backend::Cgroups(h) => Some(h.version()),
            Backend::Posix { .. } => None,
        }
    }

    /// Why this isolator is posix (`None` when it uses cgroups).
    pub fn posix_reason(&self) -> Option<&str> {
        match &self.backend {
            Backend::Cgroups(_) => None,
            Backend::Posix { reason } => Some(reason),
        }
    }

    pub fn root_name(&self) -> &str {
        &self.root_name
    }

    fn full_name(&self, name: &str) -> Result<String> {
        cgroupfs::check_name(name).map_err(|why| Error::InvalidName {
            name: name.to_string(),
            why,
        })?;
        Ok(format!("{}/{}", self.root_name, name))
    }

    /// Creates the group `<root_name>/<name>` (parents as needed) with `limits`. Use
    /// [`escape_component`] to turn ids into parts of `name`. An existing empty cgroup
    /// of that name is reused; one holding processes is refused.
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> Result<Group> {
        let full = self.full_name(name)?;
        let inner = match &self.backend {
            Backend::Cgroups(h) => Inner::Cgroup(Cgroup::create(h, &full, limits)?),
            Backend::Posix { .. } => Inner::Posix(PosixGroup::new(&full, limits)),
        };
        Ok(Group { inner })
    }

    /// The existing cgroup `<root_name>/<name>`, to inspect, kill or remove (an agent
    /// re-attaching to an executor). `None` when absent, and always in posix mode.
    pub fn open(&self, name: &str) -> Result<Option<Group>> {
        let full = self.full_name(name)?;
        Ok(match &self.backend {
            Backend::Cgroups(h) => {
                let cg = Cgroup::at(h, &full);
                cg.exists().then_some(Group {
                    inner: Inner::Cgroup(cg),
                })
            }
            Backend::Posix { .. } => None,
        })
    }

    /// Kills every process in every cgroup under the root and removes the cgroups,
    /// root included: what an agent does when it starts after a crash. Returns how many
    /// cgroups were removed (0 in posix mode, which leaves nothing behind to find).
    pub fn cleanup_leftovers(&self) -> Result<usize> {
        let Backend::Cgroups(h) = &self.backend else {
            return Ok(0);
        };
        let cg = Cgroup::at(h, &self.root_name);
        if !cg.exists() {
            return Ok(0);
        }
        let mut names: Vec<PathBuf> = Vec::new();
        for mount in h.mounts() {
            for dir in walk(&mount.join(&self.root_name)) {
                let rel = dir.strip_prefix(&mount).unwrap_or(&dir).to_path_buf();
                if !names.contains(&rel) {
                    names.push(rel);
                }
            }
        }
        let pids = cg.procs();
        if !pids.is_empty() {
            tracing::warn!(root = %self.root_name, ?pids, "killing leftover processes");
        }
        cg.kill_all(Duration::ZERO)?;
        cg.remove()?;
        let left = names
            .iter()
            .filter(|n| h.mounts().iter().any(|m| m.join(n).exists()))
            .count();
        let removed = names.len() - left;
        tracing::info!(root = %self.root_name, removed, "removed leftover cgroups");
        Ok(removed)
    }

    /// Removes `<root>/<name>` in every hierarchy if it is an empty leaf; quietly does
    /// nothing otherwise (still in use, or posix mode).
    pub fn remove_if_empty(&self, name: &str) {
        if let Ok(Some(g)) = self.open(name) {
            for c in ["cpu", "cpuacct", "memory", "pids", "freezer"] {
                if let Some(dir) = g.controller_dir(c) {
                    let _ = fs::remove_dir(dir);
                }
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
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

/// Whether cgroups can be used here, and where; or why not, in one line.
fn usable_cgroups() -> Result<Hierarchy, String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!("the executor is not running as root (euid {euid})"));
    }
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let hier = pick_hierarchy(&cgroupfs::parse_mountinfo(&text), |dir| {
        fs::read_to_string(dir.join("cgroup.controllers")).ok()
    })?;
    // A container's cgroup namespace: its root is a group of the host's that holds the
    // container's processes, and v2 lets such a group enable no controller for its
    // children. Say so at start-up rather than fail every launch.
    if let Hierarchy::V2 { root } = &hier {
        let read = |f: &str| fs::read_to_string(root.join(f)).unwrap_or_default();
        if let Some(pids) = cgroupfs::v2_root_blocks_controllers(
            root.join("cgroup.type").exists(),
            &read("cgroup.procs"),
            &read("cgroup.subtree_control"),
            &cgroup::V2_CONTROLLERS,
        ) {
            let shown: Vec<String> = pids.iter().take(8).map(i32::to_string).collect();
            let more = if pids.len() > 8 { ", ..." } else { "" };
            return Err(format!(
                "the cgroup2 root {r} is not the host's root group (a container's cgroup \
                 namespace?) and holds processes ({}{more}), so cgroup v2 cannot enable \
                 {c} for groups below it: move those processes into a child group first \
                 (mkdir {r}/init, then write each pid to {r}/init/cgroup.procs)",
                shown.join(", "),
                r = root.display(),
                c = cgroup::V2_CONTROLLERS.join(", "),
            ));
        }
    }
    // Being root is not enough in a container with a read-only or foreign cgroupfs:
    // try making (and removing) a cgroup in each hierarchy.
    static PROBES: AtomicU64 = AtomicU64::new(0);
    for mount in hier.mounts() {
        let n = PROBES.fetch_add(1, Ordering::Relaxed);
        let probe = mount.join(format!("agora-probe-{}-{n}", std::process::id()));
        // A probe left by a crashed process that had our pid is removed first.
        let _ = fs::remove_dir(&probe);
        fs::create_dir(&probe)
            .and_then(|()| fs::remove_dir(&probe))
            .map_err(|e| format!("cannot create a cgroup under {}: {e}", mount.display()))?;
    }
    Ok(hier)
}

/// Picks cgroup v1 when cpu, cpuacct, memory and pids are mounted as v1 hierarchies
/// (the hybrid layout), else v2 when a cgroup2 mount offers cpu, memory and pids.
/// `controllers_of` reads a v2 mount's `cgroup.controllers`.
pub(crate) fn pick_hierarchy(
    mounts: &[CgroupMount],
    controllers_of: impl Fn(&Path) -> Option<String>,
) -> Result<Hierarchy, String> {
    let v1 = |c: &str| {
        mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|x| x == c))
    };
    let needed = ["cpu", "cpuacct", "memory", "pids"];
    let found: Vec<&CgroupMount> = needed.iter().filter_map(|c| v1(c)).collect();
    if let [cpu, cpuacct, memory, pids] = found.as_slice() {
        if let Some(ro) = found.iter().find(|m| m.read_only) {
            return Err(format!("{} is mounted read-only", ro.mount_point.display()));
        }
        return Ok(Hierarchy::V1 {
            cpu: cpu.mount_point.clone(),
            cpuacct: cpuacct.mount_point.clone(),
            memory: memory.mount_point.clone(),
            pids: pids.mount_point.clone(),
            freezer: v1("freezer")
                .filter(|m| !m.read_only)
                .map(|m| m.mount_point.clone()),
        });
    }
    let mut offered = Vec::new();
    for m in mounts.iter().filter(|m| m.v2) {
        let available =
            cgroupfs::controller_list(&controllers_of(&m.mount_point).unwrap_or_default());
        if cgroup::V2_CONTROLLERS
            .iter()
            .all(|c| available.iter().any(|a| a == c))
        {
            if m.read_only {
                return Err(format!("{} is mounted read-only", m.mount_point.display()));
            }
            return Ok(Hierarchy::V2 {
                root: m.mount_point.clone(),
            });
        }
        offered.push(format!(
            "{} offers [{}]",
            m.mount_point.display(),
            available.join(" ")
        ));
    }
    let v1_missing: Vec<&str> = needed.iter().copied().filter(|c| v1(c).is_none()).collect();
    let mut why = format!(
        "no cgroup hierarchy has the controllers we need: v1 lacks {}",
        v1_missing.join(", ")
    );
    if offered.is_empty() {
        why.push_str(", and no cgroup2 filesystem is mounted");
    } else {
        why.push_str(&format!(
            ", and cgroup2 at {} (cpu, memory and pids are needed)",
            offered.join("; ")
        ));
    }
    Err(why)
}

/// One task's (or executor's) group.
#[derive(Debug)]
pub struct Group {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Cgroup(Cgroup),
    Posix(PosixGroup),
}

impl Group {
    /// The full name, `<root_name>/<name>`.
    pub fn name(&self) -> &str {
        match &self.inner {
            Inner::Cgroup(c) => c.name(),
            Inner::Posix(p) => p.name(),
        }
    }

    pub fn mode(&self) -> IsolationMode {
        match &self.inner {
            Inner::Cgroup(_) => IsolationMode::Cgroups,
            Inner::Posix(_) => IsolationMode::Posix,
        }
    }

    pub fn cgroup_version(&self) -> Option<CgroupVersion> {
        match &self.inner {
            Inner::Cgroup(c) => Some(c.version()),
            Inner::Posix(_) => None,
        }
    }

    /// The group's directory under a controller (`cpu`, `cpuacct`, `memory`, `pids`,
    /// `freezer`; on v2 all are one directory). `None` in posix mode.
    pub fn controller_dir(&self, controller: &str) -> Option<PathBuf> {
        match &self.inner {
            Inner::Cgroup(c) => c.dir(controller).map(Path::to_path_buf),
            Inner::Posix(_) => None,
        }
    }

    /// The `cgroup.procs` files a process joins the group through (empty in posix).
    pub fn join_files(&self) -> Vec<PathBuf> {
        match &self.inner {
            Inner::Cgroup(c) => c.join_files(),
            Inner::Posix(_) => Vec::new(),
        }
    }

    /// New limits (in posix mode: for processes started from now on).
    pub fn update(&self, limits: &CgroupLimits) -> Result<()> {
        match &self.inner {
            Inner::Cgroup(c) => c.apply(limits),
            Inner::Posix(p) => {
                p.update(limits);
                Ok(())
            }
        }
    }

    /// Makes a child spawned from `cmd` start inside this group: between fork and
    /// exec, it calls setsid (a session and process group of its own, away from the
    /// executor's terminal signals), then joins the cgroup by writing itself to each
    /// controller's `cgroup.procs` (or sets RLIMIT_AS in posix mode). Joining before
    /// exec means the command cannot fork anything outside the group. Pass the result
    /// of `cmd.spawn()` to [`Containment::spawned`]. One `contain` per `Command`: each
    /// call adds a `pre_exec` hook. (With a hook set, std spawns by fork rather than
    /// posix_spawn: about 0.2 ms more per spawn here.)
    pub fn contain(&self, cmd: &mut Command) -> Result<Containment<'_>> {
        self.contain_as(cmd, None, None)
    }

    /// [`Group::contain`], then, in the child after it joined the group (as root),
    /// the switch to `identity`: its private mount namespace, then setgroups (none),
    /// setgid and setuid, in that order, before exec. Do not also set `Command::uid`
    /// or `gid`: std would drop privileges before the group is joined.
    /// `max_file_bytes`: the RLIMIT_FSIZE of the child (no file it writes may grow past
    /// it: the write fails with EFBIG after SIGXFSZ, whose default kills).
    pub fn contain_as(
        &self,
        cmd: &mut Command,
        identity: Option<TaskIdentity>,
        max_file_bytes: Option<u64>,
    ) -> Result<Containment<'_>> {
        let join: Vec<CString> = self
            .join_files()
            .iter()
            .map(|p| {
                CString::new(p.as_os_str().as_bytes()).map_err(|_| {
                    let nul = io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path");
                    Error::cgroup("join", p, nul)
                })
            })
            .collect::<Result<_>>()?;
        let rlimit_as = match &self.inner {
            Inner::Posix(p) => Some(p.limits().mem_bytes).filter(|&b| b > 0),
            Inner::Cgroup(_) => None,
        };
        let (report_rd, report_wr) = report_pipe()?;
        let wr = report_wr.as_raw_fd();
        // SAFETY: the closure only makes async-signal-safe calls (setsid, open, write,
        // close, setrlimit) on data prepared before the fork, and allocates nothing.
        let mounts_shown = identity
            .as_ref()
            .and_then(|i| i.mounts.as_ref())
            .map(|m| m.steps.iter().map(|s| s.shown.clone()).collect())
            .unwrap_or_default();
        unsafe {
            cmd.pre_exec(move || {
                child_setup(&join, rlimit_as, max_file_bytes, identity.as_ref(), wr)
            });
        }
        Ok(Containment {
            group: self,
            report_rd,
            report_wr: Some(report_wr),
            mounts_shown,
        })
    }

    /// Moves an already running process into the group (cgroups), or records it as a
    /// member (posix: it must be a process group leader).
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        match &self.inner {
            Inner::Cgroup(c) => c.add_pid(pid),
            Inner::Posix(p) => {
                p.add_pid(pid);
                Ok(())
            }
        }
    }

    /// Processes in the group (and groups below it), without the caller.
    pub fn procs(&self) -> Vec<i32> {
        match &self.inner {
            Inner::Cgroup(c) => c.procs(),
            Inner::Posix(p) => p.procs(),
        }
    }

    /// Usage so far, from the cgroup. Posix groups have none (use the task's rusage).
    pub fn stats(&self) -> ResourceUsage {
        match &self.inner {
            Inner::Cgroup(c) => c.stats(),
            Inner::Posix(_) => ResourceUsage::default(),
        }
    }

    /// Whether the OOM killer killed a process of the group (from the cgroup's own
    /// counters, never guessed from an exit signal). Always false in posix mode.
    pub fn oom_killed(&self) -> bool {
        match &self.inner {
            Inner::Cgroup(c) => c.oom_killed(),
            Inner::Posix(_) => false,
        }
    }

    /// How many forks the pids limit refused (0 in posix mode).
    pub fn pids_limit_hits(&self) -> u64 {
        match &self.inner {
            Inner::Cgroup(c) => c.pids_limit_hits(),
            Inner::Posix(_) => 0,
        }
    }

    pub fn pids_limit_hit(&self) -> bool {
        self.pids_limit_hits() > 0
    }

    /// Kills every process of the group: SIGTERM, up to `grace` for them to leave,
    /// then SIGKILL until none is left (bounded; an error names the survivors).
    pub fn kill_all(&self, grace: Duration) -> Result<()> {
        match &self.inner {
            Inner::Cgroup(c) => c.kill_all(grace),
            Inner::Posix(p) => p.kill_all(grace),
        }
    }

    /// Removes the cgroup and every cgroup below it (kill first). Nothing to do in
    /// posix mode.
    pub fn remove(&self) -> Result<()> {
        match &self.inner {
            Inner::Cgroup(c) => c.remove(),
            Inner::Posix(_) => Ok(()),
        }
    }
}

/// What `Group::contain` set up for one spawn.
#[derive(Debug)]
pub struct Containment<'g> {
    group: &'g Group,
    report_rd: OwnedFd,
    report_wr: Option<OwnedFd>,
    /// What each mount step of the identity does, for messages.
    mounts_shown: Vec<String>,
}

/// Why a contained command did not start.
#[derive(Debug)]
pub enum SpawnError {
    /// Our set-up in the child failed before exec (joining the cgroup, setsid,
    /// setrlimit): a sandbox problem, not the command's.
    Setup(String),
    /// fork or exec failed: the command itself could not be started.
    Exec(io::Error),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Setup(m) => f.write_str(m),
            SpawnError::Exec(e) => write!(f, "{e}"),
        }
    }
}

impl Containment<'_> {
    /// Hands over the spawn's result: a started child is recorded as a member (posix);
    /// a failure is told apart as ours (set-up) or the command's (exec).
    pub fn spawned(mut self, result: io::Result<Child>) -> Result<Child, SpawnError> {
        // Close our copy of the write end; the child's closed at exec or exit.
        self.report_wr = None;
        match result {
            Ok(child) => {
                if let Err(e) = self.group.add_pid_if_posix(child.id()) {
                    tracing::warn!(error = %e, "cannot record the child in its group");
                }
                Ok(child)
            }
            Err(e) => match self.setup_failure() {
                Some(msg) => Err(SpawnError::Setup(msg)),
                None => Err(SpawnError::Exec(e)),
            },
        }
    }

    fn setup_failure(&self) -> Option<String> {
        let mut buf = [0u8; 5];
        // SAFETY: reading into a local buffer of the given length.
        let n = unsafe {
            libc::read(
                self.report_rd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n != 5 {
            return None;
        }
        let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
        let err = io::Error::from_raw_os_error(errno);
        Some(match buf[0] {
            STAGE_SETSID => format!("setsid failed in the new process: {err}"),
            STAGE_RLIMIT => format!("cannot set RLIMIT_AS in the new process: {err}"),
            STAGE_RLIMIT_FSIZE => format!("cannot set RLIMIT_FSIZE in the new process: {err}"),
            STAGE_SETGROUPS => format!("cannot drop supplementary groups (setgroups): {err}"),
            STAGE_SETGID => format!("cannot switch to the task's group (setgid): {err}"),
            STAGE_SETUID => format!("cannot switch to the task's user (setuid): {err}"),
            STAGE_CHDIR => {
                format!("cannot enter the working directory in the task's namespace: {err}")
            }
            STAGE_UNSHARE => format!("cannot make a private mount namespace (unshare): {err}"),
            STAGE_PROC => format!("cannot mount /proc for the task's PID namespace: {err}"),
            i if (STAGE_MOUNT_BASE..STAGE_MOUNT_BASE + MAX_MOUNT_STEPS).contains(&i) => {
                let step = self
                    .mounts_shown
                    .get((i - STAGE_MOUNT_BASE) as usize)
                    .cloned()
                    .unwrap_or_default();
                format!("cannot set up the task's mount namespace ({step}): {err}")
            }
            i => {
                let file = self
                    .group
                    .join_files()
                    .get(i as usize)
                    .cloned()
                    .unwrap_or_default();
                format!(
                    "cannot move the new process into its cgroup ({}): {err}",
                    file.display()
                )
            }
        })
    }
}

impl Group {
    fn add_pid_if_posix(&self, pid: u32) -> Result<()> {
        match &self.inner {
            Inner::Posix(p) => {
                p.add_pid(pid);
                Ok(())
            }
            Inner::Cgroup(_) => Ok(()),
        }
    }
}

const STAGE_SETSID: u8 = 254;
const STAGE_RLIMIT: u8 = 253;
const STAGE_SETGROUPS: u8 = 252;
const STAGE_SETGID: u8 = 251;
const STAGE_SETUID: u8 = 250;
const STAGE_CHDIR: u8 = 249;
const STAGE_UNSHARE: u8 = 248;
const STAGE_RLIMIT_FSIZE: u8 = 247;
const STAGE_PROC: u8 = 244;
/// Mount steps report `STAGE_MOUNT_BASE + step` (cgroup join files use 0..).
const STAGE_MOUNT_BASE: u8 = 200;
const MAX_MOUNT_STEPS: u8 = 40;

/// Who a task's process becomes before exec, and the mount namespace it gets.
#[derive(Debug)]
pub struct TaskIdentity {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// `None`: the mount namespace is not changed (not root, or namespaces are
    /// unavailable here).
    pub mounts: Option<MountPlan>,
}

/// A private mount namespace for one task: every mount made private (nothing the
/// task does propagates back), `hide` covered by an empty root-owned tmpfs, and the
/// task's sandbox mounted back at its own path inside it, so that the agent's work
/// directory (other sandboxes, the checkpoint, the executor socket) does not exist
/// for the task. Built before the fork: the child only makes system calls.
#[derive(Debug)]
pub struct MountPlan {
    steps: Vec<MountStep>,
    /// The working directory, entered again once the mounts are made.
    cwd: CString,
}

#[derive(Debug)]
struct MountStep {
    op: MountOp,
    /// What the step does, for an error message.
    shown: String,
}

#[derive(Debug)]
enum MountOp {
    Unshare,
    Private,
    Tmpfs(CString),
    Mkdir(CString),
    /// Opens the sandbox (O_PATH) in the new namespace, before it is covered: a
    /// descriptor from the old namespace cannot be bind-mounted.
    OpenSandbox(CString),
    /// Bind-mounts what `OpenSandbox` opened at this path.
    BindSandbox(CString),
    /// Mounts a proc filesystem at /proc: the task's PID namespace's (the
    /// executor's, see [`enter_executor_pid_namespace`]).
    Proc,
}

impl MountPlan {
    /// The plan for a task whose sandbox is `sandbox` and working directory `cwd`,
    /// hiding `hide` (the agent's work directory) when given and when the sandbox
    /// lies inside it. Opens the sandbox now (O_NOFOLLOW).
    pub fn new(sandbox: &Path, cwd: &Path, hide: Option<&Path>) -> io::Result<MountPlan> {
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
        };
        let mut steps = vec![
            MountStep {
                op: MountOp::Unshare,
                shown: "unshare the mount namespace".into(),
            },
            MountStep {
                op: MountOp::Private,
                shown: "make / private, recursively".into(),
            },
        ];
        if let Some(rel) = hide.and_then(|h| sandbox.strip_prefix(h).ok().map(|r| (h, r))) {
            let (hide, rel) = rel;
            steps.push(MountStep {
                op: MountOp::OpenSandbox(c(sandbox)?),
                shown: format!("open {}", sandbox.display()),
            });
            steps.push(MountStep {
                op: MountOp::Tmpfs(c(hide)?),
                shown: format!("cover {} with an empty tmpfs", hide.display()),
            });
            let mut p = hide.to_path_buf();
            for comp in rel.components() {
                p.push(comp);
                steps.push(MountStep {
                    op: MountOp::Mkdir(c(&p)?),
                    shown: format!("mkdir {}", p.display()),
                });
            }
            steps.push(MountStep {
                op: MountOp::BindSandbox(c(sandbox)?),
                shown: format!("mount the sandbox back at {}", sandbox.display()),
            });
        }
        if steps.len() > MAX_MOUNT_STEPS as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the sandbox path is too deep",
            ));
        }
        Ok(MountPlan {
            steps,
            cwd: c(cwd)?,
        })
    }

    /// Mounts a /proc of the PID namespace the task runs in (the executor's, see
    /// [`enter_executor_pid_namespace`]), so that its /proc shows only the processes
    /// of that namespace, not the host's.
    pub fn with_proc(mut self, on: bool) -> MountPlan {
        if on {
            self.steps.push(MountStep {
                op: MountOp::Proc,
                shown: "mount /proc for the executor's PID namespace".into(),
            });
        }
        self
    }
}

/// Whether this process can give tasks a private mount namespace: a child tries
/// unshare(CLONE_NEWNS) and making / private. `Err` says why not.
pub fn probe_mount_namespace() -> std::result::Result<(), String> {
    let mut cmd = Command::new("/bin/true");
    // SAFETY: only system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            let none = c"none";
            let root = c"/";
            if libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match cmd.stdin(std::process::Stdio::null()).status() {
        Ok(st) if st.success() => Ok(()),
        Ok(st) => Err(format!(
            "/bin/true in a new mount namespace ended with {st}"
        )),
        Err(e) => Err(format!(
            "unshare(CLONE_NEWNS) or making / private failed: {e}"
        )),
    }
}

/// A close-on-exec pipe whose read end does not block: the child writes one record
/// (stage, errno) into it when its set-up fails.
fn report_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(
            "cannot create a pipe",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(rd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(rd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok((rd, wr))
}

/// Runs in the child between fork and exec: async-signal-safe calls only.
fn child_setup(
    join: &[CString],
    rlimit_as: Option<u64>,
    rlimit_fsize: Option<u64>,
    identity: Option<&TaskIdentity>,
    report: RawFd,
) -> io::Result<()> {
    fn fail(report: RawFd, stage: u8) -> io::Result<()> {
        let err = io::Error::last_os_error();
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        let mut rec = [stage, 0, 0, 0, 0];
        rec[1..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: writing a local buffer to a descriptor we inherited.
        unsafe { libc::write(report, rec.as_ptr().cast(), rec.len()) };
        Err(io::Error::from_raw_os_error(errno))
    }
    // SAFETY (all blocks below): plain system calls on valid pointers and descriptors.
    if unsafe { libc::setsid() } < 0 {
        return fail(report, STAGE_SETSID);
    }
    for (i, file) in join.iter().enumerate() {
        let fd = unsafe { libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return fail(report, i as u8);
        }
        // "0" means the writing process itself, on v1 and v2.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            let r = fail(report, i as u8);
            unsafe { libc::close(fd) };
            return r;
        }
        unsafe { libc::close(fd) };
    }
    if let Some(bytes) = rlimit_as {
        let lim = libc::rlimit {
            rlim_cur: bytes as libc::rlim_t,
            rlim_max: bytes as libc::rlim_t,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
            return fail(report, STAGE_RLIMIT);
        }
    }
    if let Some(bytes) = rlimit_fsize {
        let lim = libc::rlimit {
            rlim_cur: bytes as libc::rlim_t,
            rlim_max: bytes as libc::rlim_t,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) } != 0 {
            return fail(report, STAGE_RLIMIT_FSIZE);
        }
    }
    let Some(id) = identity else {
        return Ok(());
    };
    if let Some(plan) = &id.mounts {
        let none = c"none";
        let tmpfs = c"tmpfs";
        let opts = c"mode=0755,size=64k";
        // "/proc/self/fd/N", written without allocating.
        let mut fd_path = [0u8; 40];
        for (i, step) in plan.steps.iter().enumerate() {
            let stage = STAGE_MOUNT_BASE + i as u8;
            let r = unsafe {
                match &step.op {
                    MountOp::Unshare => {
                        if libc::unshare(libc::CLONE_NEWNS) != 0 {
                            return fail(report, STAGE_UNSHARE);
                        }
                        0
                    }
                    MountOp::Private => libc::mount(
                        none.as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ),
                    MountOp::Tmpfs(at) => libc::mount(
                        tmpfs.as_ptr(),
                        at.as_ptr(),
                        tmpfs.as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        opts.as_ptr().cast(),
                    ),
                    MountOp::Mkdir(p) => libc::mkdir(p.as_ptr(), 0o755),
                    MountOp::OpenSandbox(p) => {
                        let sandbox_fd = libc::open(
                            p.as_ptr(),
                            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                        );
                        if sandbox_fd < 0 {
                            -1
                        } else {
                            // The fd's digits, least significant first (a u32 has 10).
                            let mut digits = [0u8; 10];
                            let (mut n, mut k) = (sandbox_fd as u32, 0);
                            for d in &mut digits {
                                *d = b'0' + (n % 10) as u8;
                                k += 1;
                                n /= 10;
                                if n == 0 {
                                    break;
                                }
                            }
                            let prefix = b"/proc/self/fd/".iter();
                            let number = digits.iter().take(k).rev();
                            // 14 + 10 + 1 bytes at most, in a buffer of 40.
                            let text = prefix.chain(number).chain(&[0]);
                            for (to, from) in fd_path.iter_mut().zip(text) {
                                *to = *from;
                            }
                            0
                        }
                    }
                    MountOp::BindSandbox(to) => libc::mount(
                        fd_path.as_ptr().cast(),
                        to.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ),
                    MountOp::Proc => {
                        if libc::mount(
                            c"proc".as_ptr(),
                            c"/proc".as_ptr(),
                            c"proc".as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            std::ptr::null(),
                        ) != 0
                        {
                            return fail(report, STAGE_PROC);
                        }
                        0
                    }
                }
            };
            if r != 0 {
                return fail(report, stage);
            }
        }
        // std entered the working directory before the mounts; enter it again
        // through the sandbox's new mount.
        if unsafe { libc::chdir(plan.cwd.as_ptr()) } != 0 {
            return fail(report, STAGE_CHDIR);
        }
    }
    // No supplementary groups, then the group, then the user: after setuid the
    // process could no longer change its groups.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return fail(report, STAGE_SETGROUPS);
    }
    if unsafe { libc::setgid(id.gid) } != 0 {
        return fail(report, STAGE_SETGID);
    }
    if unsafe { libc::setuid(id.uid) } != 0 {
        return fail(report, STAGE_SETUID);
    }
    Ok(())
}

/// argv[1] of `agora-task-init` run as the init of a native executor's PID namespace.
const KEEPER_ARG: &str = "__agora-pidns-init";

/// The file name of the init program, beside the executor's own binary.
pub const TASK_INIT_PROGRAM: &str = "agora-task-init";

/// How [`enter_executor_pid_namespace`] went, once per process: `None` when it was
/// never called.
static EXECUTOR_PID_NAMESPACE: std::sync::OnceLock<std::result::Result<(), String>> =
    std::sync::OnceLock::new();

/// The executor's PID namespace (the tasks') and its own, for [`in_executor_pid_namespace`].
static NAMESPACES: std::sync::OnceLock<(OwnedFd, OwnedFd)> = std::sync::OnceLock::new();

/// The write end of the pipe the namespace's init watches: held for the executor's
/// life; when the executor ends, the init sees the pipe close and ends, and the kernel
/// then kills every process left in the namespace.
static KEEPER_PIPE: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

/// Makes one new PID namespace for this executor's tasks, whose init (PID 1) is
/// `agora-task-init` beside this program: it reaps the tasks' orphans and, when the
/// executor ends, takes the namespace down with it. Tasks are then started in it
/// ([`in_executor_pid_namespace`]) and each mounts that namespace's /proc in its
/// private mount namespace ([`MountPlan::with_proc`]), so a task sees and can signal
/// only the processes of its own executor (one framework's tasks), never another
/// framework's, the agent's or the host's; and no other framework's sandbox or
/// environment is reachable through /proc/PID/cwd, root or environ.
///
/// The executor itself stays in the host's namespace (it knows its tasks by their
/// host pids). One namespace and one process per executor, made once: a task pays
/// for two setns calls and its /proc mount.
///
/// Call it in `main` before any thread is started: the init is forked by this thread
/// (its parent-death signal follows the thread), and a thread can only be created
/// while the caller's new children go to its own PID namespace, which this restores
/// before returning. [`executor_pid_namespace`] says whether it worked, or why not.
pub fn enter_executor_pid_namespace() {
    let own = std::fs::File::open("/proc/self/ns/pid")
        .map(OwnedFd::from)
        .map_err(|e| format!("cannot open /proc/self/ns/pid: {e}"));
    let result = own.and_then(|own| {
        let made = start_keeper();
        // Children (and threads) go to our own namespace again, whatever happened.
        // SAFETY: setns with a namespace descriptor we own.
        if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
            return Err(format!(
                "cannot return to the executor's own PID namespace: {}",
                io::Error::last_os_error()
            ));
        }
        let tasks = made?;
        let _ = NAMESPACES.set((tasks, own));
        Ok(())
    });
    let _ = EXECUTOR_PID_NAMESPACE.set(result);
}

/// Whether this executor's tasks run in a PID namespace of its own: `None` when
/// [`enter_executor_pid_namespace`] was not called, `Err` why it failed.
pub fn executor_pid_namespace() -> Option<std::result::Result<(), String>> {
    EXECUTOR_PID_NAMESPACE.get().cloned()
}

/// Runs `spawn` (which starts one child process) with this thread's new children
/// going to the executor's PID namespace, then returns the thread to its own. An
/// error when the namespace was not made, or a setns fails.
pub fn in_executor_pid_namespace<T>(spawn: impl FnOnce() -> T) -> io::Result<T> {
    let Some((tasks, own)) = NAMESPACES.get() else {
        return Err(io::Error::other("the executor has no PID namespace"));
    };
    // SAFETY: setns with namespace descriptors we own; it changes only where this
    // thread's next children go.
    if unsafe { libc::setns(tasks.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let spawned = spawn();
    // SAFETY: as above. Until it succeeds this thread could not start threads.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        let e = io::Error::last_os_error();
        tracing::error!(error = %e, "cannot return a thread to the executor's own PID namespace");
        return Err(e);
    }
    Ok(spawned)
}

/// unshare(CLONE_NEWPID) for this thread's children, and the namespace's init as the
/// first of them; returns the new namespace.
fn start_keeper() -> std::result::Result<OwnedFd, String> {
    // SAFETY: unshare has no memory preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWPID) failed: {}",
            io::Error::last_os_error()
        ));
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let program = me.with_file_name(TASK_INIT_PROGRAM);
    if !program.exists() {
        return Err(format!(
            "{} is missing: install it beside {}",
            program.display(),
            me.display()
        ));
    }
    let mut ends = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors, owned from here on.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2 failed: {}", io::Error::last_os_error()));
    }
    let [rd, wr] = ends;
    // SAFETY: descriptors just made and owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(rd), OwnedFd::from_raw_fd(wr)) };
    let watched = rd.as_raw_fd();
    let mut cmd = Command::new(&program);
    cmd.arg(KEEPER_ARG)
        .arg(watched.to_string())
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: only system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // The init dies with the executor even if the pipe were kept open.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            if libc::fcntl(watched, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    drop(rd);
    // The init is never waited for: it lives as long as this process.
    std::mem::forget(child);
    let _ = KEEPER_PIPE.set(wr);
    // Only now: a namespace without its init cannot be opened.
    std::fs::File::open("/proc/thread-self/ns/pid_for_children")
        .map(OwnedFd::from)
        .map_err(|e| format!("cannot open the new PID namespace: {e}"))
}

/// Call first thing in `main`: when this process is the init of a native executor's
/// PID namespace (see [`enter_executor_pid_namespace`]), does that job and never
/// returns; otherwise returns at once.
pub fn pid_namespace_helper() {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_none_or(|role| role != KEEPER_ARG) {
        return;
    }
    let Some(fd) = args
        .next()
        .and_then(|a| a.to_str().and_then(|t| t.parse::<RawFd>().ok()))
    else {
        eprintln!("agora-task-init: {KEEPER_ARG} expects a descriptor");
        std::process::exit(127);
    };
    // SAFETY: the descriptor was handed over by our own executor.
    unsafe { namespace_init(fd) }
}

/// Closes every descriptor but `keep`.
unsafe fn close_all_but(keep: RawFd) {
    let close_range = |first: libc::c_uint, last: libc::c_uint| {
        first > last || libc::syscall(libc::SYS_close_range, first, last, 0) == 0
    };
    let keep = keep as libc::c_uint;
    let done = close_range(0, keep.saturating_sub(1)) && close_range(keep + 1, libc::c_uint::MAX);
    if !done {
        // Before Linux 5.9: one by one, up to a bound.
        for fd in 0..4096 {
            if fd != keep as RawFd {
                libc::close(fd);
            }
        }
    }
}

/// The init of an executor's PID namespace: reaps every process handed to it (the
/// tasks' orphans; the tasks themselves are the executor's children) until the
/// executor's end of `watched` closes, then exits, which ends the namespace.
unsafe fn namespace_init(watched: RawFd) -> ! {
    close_all_but(watched);
    let mut mask: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut mask);
    libc::sigaddset(&mut mask, libc::SIGCHLD);
    libc::sigprocmask(libc::SIG_BLOCK, &mask, std::ptr::null_mut());
    let children = libc::signalfd(-1, &mask, libc::SFD_CLOEXEC);
    loop {
        // Reap whatever has ended (also before the first wait: a SIGCHLD may have
        // come before the signalfd).
        let mut status = 0;
        while libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 {}
        let mut fds = [
            libc::pollfd {
                fd: watched,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: children,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n = libc::poll(fds.as_mut_ptr(), if children < 0 { 1 } else { 2 }, -1);
        if n < 0 && *libc::__errno_location() != libc::EINTR {
            libc::_exit(1);
        }
        let [executor, sigchld] = fds;
        if executor.revents != 0 {
            // EOF or an error: the executor is gone.
            libc::_exit(0);
        }
        if sigchld.revents != 0 {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            libc::read(children, info.as_mut_ptr().cast(), info.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(point: &str, v2: bool, controllers: &[&str], read_only: bool) -> CgroupMount {
        CgroupMount {
            mount_point: PathBuf::from(point),
            v2,
            controllers: controllers.iter().map(|s| s.to_string()).collect(),
            read_only,
        }
    }

    #[test]
    fn hybrid_layout_picks_v1() {
        let mounts = vec![
            mount("/sys/fs/cgroup/unified", true, &[], false),
            mount("/sys/fs/cgroup/cpu", false, &["cpu"], false),
            mount("/sys/fs/cgroup/cpuacct", false, &["cpuacct"], false),
            mount("/sys/fs/cgroup/memory", false, &["memory"], false),
            mount("/sys/fs/cgroup/pids", false, &["pids"], false),
            mount("/sys/fs/cgroup/freezer", false, &["freezer"], false),
        ];
        let h = pick_hierarchy(&mounts, |_| Some(String::new())).unwrap();
        assert_eq!(
            h,
            Hierarchy::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                cpuacct: "/sys/fs/cgroup/cpuacct".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                freezer: Some("/sys/fs/cgroup/freezer".into()),
            }
        );
        assert_eq!(h.mounts().len(), 5);
    }

    #[test]
    fn comounted_cpu_cpuacct_is_one_directory() {
        let mounts = vec![
            mount("/c/cpu,cpuacct", false, &["cpu", "cpuacct"], false),
            mount("/c/memory", false, &["memory"], false),
            mount("/c/pids", false, &["pids"], false),
        ];
        let h = pick_hierarchy(&mounts, |_| None).unwrap();
        assert_eq!(h.mounts().len(), 3, "no freezer, cpu and cpuacct shared");
        let cg = Cgroup::at(&h, "agora/t");
        assert_eq!(cg.dirs().len(), 3);
    }

    #[test]
    fn unified_layout_picks_v2_when_controllers_are_offered() {
        let mounts = vec![mount("/sys/fs/cgroup", true, &[], false)];
        let h = pick_hierarchy(&mounts, |_| Some("cpuset cpu io memory pids\n".into())).unwrap();
        assert_eq!(
            h,
            Hierarchy::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        let err = pick_hierarchy(&mounts, |_| Some("cpuset io\n".into())).unwrap_err();
        assert!(err.contains("v1 lacks cpu, cpuacct, memory, pids"), "{err}");
        assert!(err.contains("/sys/fs/cgroup offers [cpuset io]"), "{err}");
    }

    #[test]
    fn nothing_usable_says_why() {
        let err = pick_hierarchy(&[], |_| None).unwrap_err();
        assert!(err.contains("no cgroup2 filesystem is mounted"), "{err}");
        let ro = vec![
            mount("/c/cpu", false, &["cpu", "cpuacct"], false),
            mount("/c/memory", false, &["memory"], true),
            mount("/c/pids", false, &["pids"], false),
        ];
        let err = pick_hierarchy(&ro, |_| None).unwrap_err();
        assert!(err.contains("/c/memory is mounted read-only"), "{err}");
    }

    #[test]
    fn limits_to_cpu_knobs() {
        let half = CgroupLimits {
            milli_cpus: 500,
            ..CgroupLimits::default()
        };
        assert_eq!(half.cpu_shares(), 512);
        assert_eq!(half.cfs_quota_us(), Some(50_000));
        let tiny = CgroupLimits {
            milli_cpus: 1,
            ..CgroupLimits::default()
        };
        assert_eq!((tiny.cpu_shares(), tiny.cfs_quota_us()), (2, Some(1_000)));
        let no_quota = CgroupLimits {
            milli_cpus: 1500,
            cfs_quota: false,
            ..CgroupLimits::default()
        };
        assert_eq!(
            (no_quota.cpu_shares(), no_quota.cfs_quota_us()),
            (1536, None)
        );
        assert_eq!(CgroupLimits::default().cfs_quota_us(), None);
    }

    #[test]
    fn names_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let iso = Isolator::with_hierarchy(
            Hierarchy::V2 {
                root: tmp.path().into(),
            },
            "agora",
        );
        for bad in ["", "../escape", "a/tasks", "/abs"] {
            let err = iso.create(bad, &CgroupLimits::default()).unwrap_err();
            assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err}");
        }
        assert!(Isolator::new(Some(IsolationMode::Posix), "a/../b").is_err());
    }

    #[test]
    fn open_finds_existing_groups_only() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("agora/ex1")).unwrap();
        let iso = Isolator::with_hierarchy(
            Hierarchy::V2 {
                root: tmp.path().into(),
            },
            "agora",
        );
        let g = iso.open("ex1").unwrap().expect("exists");
        assert_eq!(g.name(), "agora/ex1");
        assert_eq!(
            g.controller_dir("memory"),
            Some(tmp.path().join("agora/ex1"))
        );
        assert!(iso.open("ex2").unwrap().is_none());
    }
}
