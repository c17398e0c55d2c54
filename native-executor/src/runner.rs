//! Runs one native task to its end: its group (cgroup or posix), the command with its
//! working directory, environment and capped output, the wait for its exit, a kill or
//! a deadline, and the one place (`classify`) where every ending becomes a state,
//! reason and message.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agora_executor_link::disk::{DiskExceeded, DiskLimits};

use crate::disk::DiskWatch;
use agora_proto::units::{format_bytes, format_duration};
use agora_proto::v1::{ExecutorLaunch, ExecutorStatus, Reason, ResourceUsage, TaskState};

use agora_executor_link::beneath::Beneath;
use agora_proto::v1::CommandInfo;

use crate::isolation::{
    escape_component, CgroupLimits, Group, IsolationMode, Isolator, MountPlan, SpawnError,
    TaskIdentity,
};
use crate::output::{spawn_copier, Copied, Copier};

/// PATH for tasks that do not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// SIGTERM-to-SIGKILL grace when the task's CommandInfo sets none.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(3);
/// Longest grace a task may ask for.
const MAX_KILL_GRACE: Duration = Duration::from_secs(3600);
/// How long output copiers get to drain once the task's processes are gone.
const COPIER_DRAIN: Duration = Duration::from_secs(5);

/// The executor's settings, from the agent's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeConfig {
    /// `None` detects (cgroups where usable, else posix).
    pub isolation: Option<IsolationMode>,
    /// Cgroup path every task group lives under, relative to the hierarchy root; the
    /// executor adds `<framework>/<executor>/<task>` (ids escaped). The agent passes
    /// `agora/<agent id>`, so an executor's tasks sit inside the executor's cgroup.
    pub cgroup_root: String,
    /// pids limit per task; 0 for none.
    pub pids_max: u64,
    /// Cap each task's CPU at its `cpus` with a CFS quota (not only weigh it).
    pub cfs_quota: bool,
    /// The user a task runs as when its command names none (the agent's
    /// `--task-user`).
    pub task_user: String,
    /// Run tasks that ask for root as root (the agent's `--allow-root-tasks`);
    /// otherwise they fail, saying so.
    pub allow_root: bool,
    /// A directory tasks must not see (the agent's work directory): covered, in each
    /// task's private mount namespace, by an empty tmpfs with only the task's own
    /// sandbox mounted back.
    pub hide_dir: Option<PathBuf>,
    /// Run tasks in the executor's PID namespace, each with that namespace's /proc
    /// (on unless the agent's `--no-task-pid-namespace`; the process's `main` must
    /// have called `isolation::enter_executor_pid_namespace`).
    pub pid_namespace: bool,
}

/// The user tasks run as when neither the task nor the agent names one.
pub const DEFAULT_TASK_USER: &str = "nobody";

impl Default for NativeConfig {
    fn default() -> Self {
        NativeConfig {
            isolation: None,
            cgroup_root: "agora".to_string(),
            pids_max: 1024,
            cfs_quota: true,
            task_user: DEFAULT_TASK_USER.to_string(),
            allow_root: false,
            hide_dir: None,
            pid_namespace: true,
        }
    }
}

/// A kill request that wakes a waiting task thread at once: a flag plus an eventfd the
/// thread polls beside the child's pidfd.
#[derive(Debug)]
pub struct KillSwitch {
    fired: AtomicBool,
    fd: OwnedFd,
}

impl KillSwitch {
    pub fn new() -> io::Result<KillSwitch> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(KillSwitch {
            fired: AtomicBool::new(false),
            // SAFETY: a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn trigger(&self) {
        self.fired.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn is_triggered(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

/// Runs tasks of one executor.
#[derive(Debug)]
pub struct Runner {
    isolator: Isolator,
    cfg: NativeConfig,
    /// `<framework>/<executor>`, escaped: the parent of this executor's task groups.
    prefix: String,
    /// The executor runs as root, so it can give tasks another user.
    privileged: bool,
    /// Tasks get a private mount namespace (root, and the kernel allows it here).
    namespaces: bool,
    /// Tasks run in the executor's PID namespace and mount its /proc.
    pid_namespaces: bool,
}

/// How a task ended, before classification.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ending {
    /// Refused before anything ran.
    Refused {
        reason: Reason,
        message: String,
    },
    /// The program does not exist (argv form) or exec said ENOENT.
    NotFound {
        program: String,
    },
    /// The program exists but cannot be executed (EACCES, ENOEXEC).
    CannotExecute {
        program: String,
        error: String,
    },
    Ran(Ran),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ran {
    pub exit: Exit,
    /// Set when we stopped the task.
    pub stopped: Option<Stop>,
    pub oom_killed: bool,
    pub pids_limit_hits: u64,
    pub limits: CgroupLimits,
    pub timeout_ms: u64,
    pub shell: bool,
    /// Last line the command wrote to stderr.
    pub stderr_last_line: String,
    /// Things that went wrong around the task (a kill that timed out, an output file
    /// that could not be written): appended to the message.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Killed,
    Deadline,
    /// The disk isolator's scan found the sandbox past a limit.
    Disk(DiskExceeded),
}

impl Runner {
    /// Sets up isolation (detecting, or as configured: forcing cgroups where they
    /// cannot work is an error saying why).
    pub fn new(cfg: NativeConfig, framework_id: &str, executor_id: &str) -> crate::Result<Runner> {
        let isolator = Isolator::new(cfg.isolation, &cfg.cgroup_root)?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let privileged = euid == 0;
        let namespaces = privileged
            && match crate::isolation::probe_mount_namespace() {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!("tasks get no private mount namespace here ({why}): only file modes keep them out of the agent's work directory");
                    false
                }
            };
        let pid_namespaces = namespaces
            && cfg.pid_namespace
            && match crate::isolation::executor_pid_namespace() {
                Some(Ok(())) => true,
                Some(Err(why)) => {
                    tracing::warn!("tasks get no PID namespace here ({why}): they can see every process of the host, and tasks of one user can signal each other and read each other's /proc/PID/cwd");
                    false
                }
                None => {
                    tracing::warn!(
                        "tasks get no PID namespace: this executor was started without one"
                    );
                    false
                }
            };
        if !privileged {
            tracing::warn!(euid, "the native executor is not root: tasks run as its own user (uid {euid}), and a task naming another user fails");
        }
        Ok(Runner {
            privileged,
            namespaces,
            pid_namespaces,
            isolator,
            prefix: format!(
                "{}/{}",
                escape_component(framework_id),
                escape_component(executor_id)
            ),
            cfg,
        })
    }

    pub fn isolator(&self) -> &Isolator {
        &self.isolator
    }

    /// The group name (under the isolator's root) of a task.
    pub fn task_group_name(&self, task_id: &str) -> String {
        format!("{}/{}", self.prefix, escape_component(task_id))
    }

    /// Removes this executor's (now empty) parent groups, if nothing else uses them.
    pub fn remove_executor_groups(&self) {
        let fw = self
            .prefix
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        for name in [self.prefix.as_str(), fw.as_str()] {
            self.isolator.remove_if_empty(name);
        }
    }

    /// Runs one task to its end and reports how it ended. Blocking: call it on a
    /// thread of its own. `on_running` is called right after the command started.
    /// Triggering `kill` stops the task with its grace (SIGTERM, then SIGKILL).
    pub fn run(
        &self,
        launch: &ExecutorLaunch,
        kill: &KillSwitch,
        on_running: impl FnOnce(),
    ) -> ExecutorStatus {
        let (ending, usage) = self.execute(launch, kill, on_running);
        let verdict = classify(&ending);
        ExecutorStatus {
            task_id: launch.task_id.clone(),
            state: verdict.state as i32,
            reason: verdict.reason as i32,
            message: verdict.message,
            exit_code: verdict.exit_code,
            usage: Some(usage),
            ..Default::default()
        }
    }

    /// Prepare, start in its group, supervise, collect: the task's whole life.
    fn execute(
        &self,
        launch: &ExecutorLaunch,
        kill: &KillSwitch,
        on_running: impl FnOnce(),
    ) -> (Ending, ResourceUsage) {
        let refused = |ending| (ending, ResourceUsage::default());
        let Prepared {
            command,
            mut cmd,
            program,
            stdout,
            stderr,
            identity,
        } = match self.prepare(launch) {
            Ok(p) => p,
            Err(ending) => return refused(ending),
        };
        let limits = CgroupLimits {
            milli_cpus: launch.milli_cpus,
            cfs_quota: self.cfg.cfs_quota,
            mem_bytes: launch.memory_bytes,
            pids_max: self.cfg.pids_max,
        };
        let name = self.task_group_name(&launch.task_id);
        let group = match self.isolator.create(&name, &limits) {
            Ok(g) => g,
            Err(e) => {
                return refused(Ending::Refused {
                    reason: Reason::SandboxFailed,
                    message: format!("cannot create the task's cgroup: {e}"),
                })
            }
        };
        let max_file = crate::disk::max_file_bytes(launch.disk_bytes);
        let pid_namespace = self.pid_namespaces && identity.is_some();
        let mut child = match start(
            &group,
            &mut cmd,
            &program,
            identity,
            max_file,
            pid_namespace,
        ) {
            Ok(child) => child,
            Err(ending) => {
                let _ = group.remove();
                return refused(ending);
            }
        };
        on_running();

        let task = &launch.task_id;
        let limit = agora_executor_link::output::output_limit(launch.output_limit_bytes);
        let out = start_copier(child.stdout.take(), stdout, "stdout", task, limit);
        let err = start_copier(child.stderr.take(), stderr, "stderr", task, limit);

        let deadline = (launch.timeout_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(launch.timeout_ms));
        let grace = kill_grace(command.kill_grace_seconds);
        let mut notes = Vec::new();
        let disk_root = if launch.root_dir.is_empty() {
            &launch.sandbox_dir
        } else {
            &launch.root_dir
        };
        let mut disk = DiskWatch::new(
            std::path::PathBuf::from(disk_root),
            DiskLimits {
                bytes: launch.disk_bytes,
                files: launch.max_files,
            },
        );
        let (status, rusage, mut stopped) = supervise(
            child.id() as i32,
            &group,
            kill,
            deadline,
            grace,
            &mut disk,
            &mut notes,
        );
        drop(child); // reaped by supervise

        // The main process is gone; whatever it left behind goes with it. Evidence and
        // usage are read after that kill and before the group is removed.
        if !group.procs().is_empty() {
            if let Err(e) = group.kill_all(Duration::ZERO) {
                notes.push(e.to_string());
            }
        }
        let oom_killed = group.oom_killed();
        let pids_limit_hits = group.pids_limit_hits();
        let mut usage = match group.mode() {
            IsolationMode::Cgroups => group.stats(),
            IsolationMode::Posix => usage_from_rusage(&rusage),
        };
        let used = disk.walk();
        usage.disk_used_bytes = used.bytes;
        usage.disk_files = used.files;
        // A task that went past its disk between two walks and ended: the limit
        // holds whatever the timing.
        if stopped.is_none() {
            stopped = disk.limits.exceeded(used).map(Stop::Disk);
        }
        if let Err(e) = group.remove() {
            tracing::warn!(task_id = %task, error = %e, "cannot remove the task's cgroup");
        }
        finish_copier(out, "stdout", &mut notes);
        let stderr = finish_copier(err, "stderr", &mut notes);

        let exit = match status.signal() {
            Some(sig) => Exit::Signal(sig),
            None => Exit::Code(status.code().unwrap_or(-1)),
        };
        let ran = Ran {
            exit,
            stopped,
            oom_killed,
            pids_limit_hits,
            limits,
            timeout_ms: launch.timeout_ms,
            shell: command.shell,
            stderr_last_line: stderr.last_line,
            notes,
        };
        (Ending::Ran(ran), usage)
    }
}

/// A task's command, ready to spawn, and its output files.
struct Prepared<'a> {
    /// The launch's command, as checked.
    command: &'a CommandInfo,
    cmd: Command,
    /// What ran, for messages: `/bin/sh` or the argv program.
    program: String,
    stdout: Option<File>,
    stderr: Option<File>,
    /// Who the process becomes before exec (`None`: the executor's own user).
    identity: Option<TaskIdentity>,
}

/// A user of this machine, from the password database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Looks `name` up in the password database (`None`: no such user).
pub fn lookup_user(name: &str) -> io::Result<Option<UserEntry>> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a user name holds a NUL"))?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: passwd is plain data; getpwnam_r fills it with pointers into `buf`.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: valid pointers to a C string, a passwd, a buffer of its length and
        // the result pointer.
        let r = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some(UserEntry {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

/// Gives the tree under `dir` (not following symlinks, not crossing into another
/// filesystem's mounts) to `uid:gid`. Files with more than one link are left alone: a
/// hard link an earlier task made to a file outside must not be handed over.
fn chown_tree(dir: RawFd, uid: libc::uid_t, gid: libc::gid_t, depth: u32) -> io::Result<()> {
    if depth > 64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the sandbox is nested more than 64 directories deep",
        ));
    }
    // SAFETY: dup of a valid descriptor, handed to fdopendir which then owns it.
    let dup = unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fdopendir takes ownership of `dup` on success.
    let d = unsafe { libc::fdopendir(dup) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: still ours on failure.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    let mut result = Ok(());
    loop {
        // SAFETY: readdir on a DIR we opened; the entry is valid until the next call.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is a NUL-terminated array inside the entry.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        // SAFETY: stat is plain data.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstatat with AT_SYMLINK_NOFOLLOW on a valid descriptor and name.
        if unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            result = Err(io::Error::last_os_error());
            break;
        }
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if !is_dir && st.st_nlink > 1 {
            continue;
        }
        if st.st_uid != uid || st.st_gid != gid {
            // SAFETY: as above; a symlink itself is changed, never its target.
            let r =
                unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
            if r != 0 {
                result = Err(io::Error::last_os_error());
                break;
            }
        }
        if is_dir {
            // SAFETY: openat with O_NOFOLLOW on a valid descriptor and name.
            let sub = unsafe {
                libc::openat(
                    dir,
                    name.as_ptr(),
                    libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
                )
            };
            if sub < 0 {
                result = Err(io::Error::last_os_error());
                break;
            }
            // SAFETY: fresh descriptor.
            let sub = unsafe { OwnedFd::from_raw_fd(sub) };
            let mut sst: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat on a descriptor we own.
            unsafe { libc::fstat(sub.as_raw_fd(), &mut sst) };
            if sst.st_dev != st.st_dev {
                continue; // a mount point: not ours to change
            }
            if let Err(e) = chown_tree(sub.as_raw_fd(), uid, gid, depth + 1) {
                result = Err(e);
                break;
            }
        }
    }
    // SAFETY: closes the DIR (and the dup'd descriptor) we opened.
    unsafe { libc::closedir(d) };
    result
}

impl Runner {
    /// The user a launch runs as: its command's, else the agent's default; checked
    /// against this agent's rules. `Ok(None)`: no switch (the executor is not root).
    fn task_user(&self, command: &CommandInfo) -> Result<Option<UserEntry>, Ending> {
        let refused = |message: String| Ending::Refused {
            reason: Reason::InvalidTask,
            message,
        };
        let (name, from) = if command.user.is_empty() {
            (self.cfg.task_user.as_str(), "the agent's --task-user")
        } else {
            (command.user.as_str(), "the task's framework")
        };
        let entry = match lookup_user(name) {
            Ok(Some(e)) => e,
            Ok(None) => {
                return Err(refused(format!(
                    "user `{name}` (named by {from}) does not exist on this agent;                      create it there or run the task as an existing user (agora run --user NAME)"
                )))
            }
            Err(e) => {
                return Err(refused(format!(
                    "cannot look up user `{name}` (named by {from}): {e}"
                )))
            }
        };
        if !self.privileged {
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            if !command.user.is_empty() && entry.uid != euid {
                return Err(refused(format!(
                    "the task asks to run as `{name}`, but this agent's native executor is                      not root (uid {euid}) and cannot switch users"
                )));
            }
            return Ok(None);
        }
        if entry.uid == 0 && !self.cfg.allow_root {
            return Err(refused(format!(
                "the task asks to run as `{name}` (uid 0, named by {from}); this agent runs                  tasks as root only when started with --allow-root-tasks: run it as another                  user (agora run --user NAME) or start the agent with --allow-root-tasks"
            )));
        }
        Ok(Some(entry))
    }

    /// Checks the launch and builds its command: the task's user, its sandbox (given
    /// to that user, mode 0700) with the working directory and output files made
    /// inside it without following symlinks, the environment (exactly the launch's,
    /// plus a default PATH), stdin from /dev/null, stdout and stderr into pipes for
    /// the copiers.
    fn prepare<'a>(&self, launch: &'a ExecutorLaunch) -> Result<Prepared<'a>, Ending> {
        let refused = |reason, message: String| Ending::Refused { reason, message };
        let Some(command) = launch.command.as_ref() else {
            return Err(refused(
                Reason::InvalidTask,
                "launch carries no command (the native executor runs commands, not modules)"
                    .to_string(),
            ));
        };
        if command.value.is_empty() {
            return Err(refused(Reason::InvalidTask, "the command is empty".into()));
        }
        if launch.root_dir.is_empty() {
            return Err(refused(
                Reason::InvalidTask,
                "launch has no root_dir (the task's working directory)".into(),
            ));
        }
        let user = self.task_user(command)?;
        let cwd = PathBuf::from(&launch.root_dir);
        let sandbox = if launch.sandbox_dir.is_empty() {
            cwd.clone()
        } else {
            PathBuf::from(&launch.sandbox_dir)
        };
        let inside = |what: &str, p: &Path| -> Result<String, Ending> {
            match p.strip_prefix(&sandbox) {
                Ok(rel) => Ok(rel.to_string_lossy().into_owned()),
                Err(_) => Err(refused(
                    Reason::InvalidTask,
                    format!(
                        "the {what} {} is not inside the task's sandbox {}",
                        p.display(),
                        sandbox.display()
                    ),
                )),
            }
        };
        let sandbox_failed = |what: String, e: &dyn std::fmt::Display| {
            refused(Reason::SandboxFailed, format!("{what}: {e}"))
        };
        fs::create_dir_all(&sandbox).map_err(|e| {
            let what = if launch.sandbox_dir.is_empty() {
                "the working directory"
            } else {
                "the sandbox"
            };
            sandbox_failed(format!("cannot create {what} {}", sandbox.display()), &e)
        })?;
        let dir = Beneath::open(&sandbox)
            .map_err(|e| sandbox_failed("cannot open the task's sandbox".into(), &e))?;
        let cwd_rel = inside("working directory", &cwd)?;
        if !cwd_rel.is_empty() {
            dir.create_dir_all(&cwd_rel, 0o755).map_err(|e| {
                sandbox_failed(
                    format!("cannot create the working directory {}", cwd.display()),
                    &e,
                )
            })?;
        }
        let open = |path: &str| -> Result<Option<File>, Ending> {
            if path.is_empty() {
                return Ok(None);
            }
            let rel = inside("output file", Path::new(path))?;
            dir.create(&rel, 0o640)
                .map(Some)
                .map_err(|e| sandbox_failed(format!("cannot create the output file {path}"), &e))
        };
        let (stdout, stderr) = (open(&launch.stdout_path)?, open(&launch.stderr_path)?);
        if let Some(u) = &user {
            // The whole sandbox becomes the task user's, and only theirs.
            // SAFETY: fchown/fchmod on the sandbox's descriptor.
            let r = unsafe {
                if libc::fchown(dir.fd(), u.uid, u.gid) != 0 {
                    -1
                } else {
                    libc::fchmod(dir.fd(), 0o700)
                }
            };
            if r != 0 {
                let e = io::Error::last_os_error();
                return Err(sandbox_failed(
                    format!("cannot give the sandbox to user `{}`", u.name),
                    &e,
                ));
            }
            chown_tree(dir.fd(), u.uid, u.gid, 0).map_err(|e| {
                sandbox_failed(
                    format!("cannot give the sandbox's files to user `{}`", u.name),
                    &e,
                )
            })?;
        }
        let identity = match &user {
            None => None,
            Some(u) => Some(TaskIdentity {
                uid: u.uid,
                gid: u.gid,
                mounts: if self.namespaces {
                    Some(
                        MountPlan::new(&sandbox, &cwd, self.cfg.hide_dir.as_deref())
                            .map_err(|e| {
                                sandbox_failed("cannot plan the task's mount namespace".into(), &e)
                            })?
                            .with_proc(self.pid_namespaces),
                    )
                } else {
                    None
                },
            }),
        };

        let mut env: HashMap<String, String> = launch.env.clone().into_iter().collect();
        let path_var = env
            .entry("PATH".to_string())
            .or_insert_with(|| DEFAULT_PATH.to_string())
            .clone();
        let (mut cmd, program) = if command.shell {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(&command.value);
            (c, "/bin/sh".to_string())
        } else {
            let Some(path) = resolve_program(&command.value, &path_var, &cwd) else {
                return Err(Ending::NotFound {
                    program: command.value.clone(),
                });
            };
            let mut c = Command::new(path);
            c.arg0(&command.value).args(&command.arguments);
            (c, command.value.clone())
        };
        let pipe_or_null = |f: &Option<File>| {
            if f.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            }
        };
        cmd.current_dir(&cwd)
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(pipe_or_null(&stdout))
            .stderr(pipe_or_null(&stderr));
        Ok(Prepared {
            command,
            cmd,
            program,
            stdout,
            stderr,
            identity,
        })
    }
}

/// Spawns the command inside its group (and in the executor's PID namespace when
/// `pid_namespace`), telling our set-up failures (sandbox) from the command's (not
/// found, not executable).
fn start(
    group: &Group,
    cmd: &mut Command,
    program: &str,
    identity: Option<TaskIdentity>,
    max_file_bytes: Option<u64>,
    pid_namespace: bool,
) -> Result<Child, Ending> {
    let contained = group
        .contain_as(cmd, identity, max_file_bytes)
        .map_err(|e| Ending::Refused {
            reason: Reason::SandboxFailed,
            message: format!("cannot prepare the task's process: {e}"),
        })?;
    let spawned = if pid_namespace {
        crate::isolation::in_executor_pid_namespace(|| cmd.spawn()).map_err(|e| {
            Ending::Refused {
                reason: Reason::SandboxFailed,
                message: format!("cannot start the task in the executor's PID namespace: {e}"),
            }
        })?
    } else {
        cmd.spawn()
    };
    contained.spawned(spawned).map_err(|e| match e {
        SpawnError::Setup(message) => Ending::Refused {
            reason: Reason::SandboxFailed,
            message,
        },
        SpawnError::Exec(e) if e.kind() == io::ErrorKind::NotFound => Ending::NotFound {
            program: program.to_string(),
        },
        SpawnError::Exec(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::ENOEXEC)) => {
            Ending::CannotExecute {
                program: program.to_string(),
                error: e.to_string(),
            }
        }
        SpawnError::Exec(e) => Ending::Refused {
            reason: Reason::ExecutorStartFailed,
            message: format!("cannot start {program}: {e}"),
        },
    })
}

fn start_copier(
    pipe: Option<impl io::Read + Send + 'static>,
    file: Option<File>,
    which: &str,
    task: &str,
    limit: u64,
) -> Option<Copier> {
    let (pipe, file) = (pipe?, file?);
    spawn_copier(format!("{which}-{task}"), pipe, file, limit)
        .map_err(|e| tracing::warn!(task_id = %task, error = %e, "cannot start the {which} copier"))
        .ok()
}

/// Waits (bounded) for a copier and notes what went wrong with the output.
fn finish_copier(copier: Option<Copier>, which: &str, notes: &mut Vec<String>) -> Copied {
    let Some(copier) = copier else {
        return Copied::default();
    };
    match copier.finish(COPIER_DRAIN) {
        None => {
            notes.push(format!("{which} was still open after the task ended"));
            Copied::default()
        }
        Some(c) => {
            if let Some(e) = &c.error {
                notes.push(format!("cannot write {which}: {e}"));
            }
            c
        }
    }
}

/// Waits for the task's main process to exit, stopping the group on a kill request or
/// at the deadline. Returns the wait status, the rusage of the main process (with the
/// children it waited for) and whether we stopped it.
fn supervise(
    pid: i32,
    group: &Group,
    kill: &KillSwitch,
    deadline: Option<Instant>,
    grace: Duration,
    disk: &mut DiskWatch,
    notes: &mut Vec<String>,
) -> (std::process::ExitStatus, libc::rusage, Option<Stop>) {
    let pidfd = pidfd_open(pid);
    let mut stopped: Option<Stop> = None;
    let mut last_kill = Instant::now();
    loop {
        if let Some((status, rusage)) = reap(pid) {
            return (status, rusage, stopped);
        }
        let now = Instant::now();
        if stopped.is_none() {
            let why = if kill.is_triggered() {
                Some(Stop::Killed)
            } else if deadline.is_some_and(|d| now >= d) {
                Some(Stop::Deadline)
            } else if disk.limited() && now >= disk.next_walk() {
                let used = disk.walk();
                disk.limits.exceeded(used).map(Stop::Disk)
            } else {
                None
            };
            if let Some(why) = why {
                stopped = Some(why);
                if let Err(e) = group.kill_all(grace) {
                    notes.push(e.to_string());
                }
                last_kill = Instant::now();
                continue;
            }
        } else if last_kill.elapsed() > Duration::from_secs(1) {
            // A kill that did not take (a process stuck in the kernel): try again.
            let _ = group.kill_all(Duration::ZERO);
            last_kill = Instant::now();
        }
        // Sleep until the child exits, a kill arrives or the deadline passes.
        let mut fds = Vec::with_capacity(2);
        if let Some(fd) = &pidfd {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if stopped.is_none() {
            fds.push(libc::pollfd {
                fd: kill.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let mut wait = match (stopped, deadline) {
            (Some(_), _) => Duration::from_millis(200),
            (None, Some(d)) => d.saturating_duration_since(now),
            (None, None) => Duration::from_secs(3600),
        };
        if stopped.is_none() && disk.limited() {
            wait = wait.min(disk.next_walk().saturating_duration_since(now));
        }
        if pidfd.is_none() {
            // No pidfd (Linux before 5.3): poll the child.
            wait = wait.min(Duration::from_millis(20));
        }
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "pidfd_open unavailable; polling the child");
        return None;
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reaps the child if it has exited (never blocks).
fn reap(pid: i32) -> Option<(std::process::ExitStatus, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
        if r == pid {
            return Some((std::process::ExitStatus::from_raw(status), rusage));
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
}

fn usage_from_rusage(r: &libc::rusage) -> ResourceUsage {
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    ResourceUsage {
        cpu_user_seconds: secs(r.ru_utime),
        cpu_system_seconds: secs(r.ru_stime),
        // ru_maxrss is in KiB on Linux: the largest resident set of the process (or
        // of one child it waited for).
        mem_peak_bytes: (r.ru_maxrss.max(0) as u64) * 1024,
        ..Default::default()
    }
}

pub(crate) fn kill_grace(seconds: Option<f64>) -> Duration {
    match seconds {
        Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s).min(MAX_KILL_GRACE),
        _ => DEFAULT_KILL_GRACE,
    }
}

/// The executable `program` names: a path (relative to the task's working directory)
/// when it holds a '/', else the first executable file of that name in `path`.
fn resolve_program(program: &str, path: &str, cwd: &Path) -> Option<PathBuf> {
    if program.contains('/') {
        let p = cwd.join(program);
        return p.exists().then_some(p);
    }
    path.split(':')
        .map(|dir| {
            if dir.is_empty() {
                cwd.to_path_buf()
            } else {
                cwd.join(dir)
            }
        })
        .map(|dir| dir.join(program))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// What the status says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub state: TaskState,
    pub reason: Reason,
    pub message: String,
    pub exit_code: Option<i32>,
}

/// The one place every ending becomes a state, reason, message and exit code.
pub(crate) fn classify(ending: &Ending) -> Verdict {
    let failed = |reason, message: String, exit_code| Verdict {
        state: TaskState::TaskFailed,
        reason,
        message,
        exit_code,
    };
    let r = match ending {
        Ending::Refused { reason, message } => return failed(*reason, message.clone(), None),
        Ending::NotFound { program } => {
            return failed(
                Reason::CommandExited,
                format!("command not found: {program}"),
                Some(127),
            )
        }
        Ending::CannotExecute { program, error } => {
            return failed(
                Reason::CommandExited,
                format!("cannot execute {program}: {error}"),
                Some(126),
            )
        }
        Ending::Ran(r) => r,
    };
    let with_notes = |mut message: String| {
        let mut extra: Vec<String> = Vec::new();
        if r.pids_limit_hits > 0 {
            extra.push(format!(
                "pids limit of {} reached (fork failed)",
                r.limits.pids_max
            ));
        }
        extra.extend(r.notes.iter().cloned());
        for e in extra {
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&e);
        }
        message
    };
    let code = match r.exit {
        Exit::Code(c) => Some(c),
        Exit::Signal(_) => None,
    };
    match r.stopped {
        Some(Stop::Killed) => {
            return Verdict {
                state: TaskState::TaskKilled,
                reason: Reason::KilledByFramework,
                message: with_notes("killed".to_string()),
                exit_code: None,
            }
        }
        Some(Stop::Disk(e)) => {
            return failed(Reason::DiskLimit, with_notes(e.to_string()), code);
        }
        Some(Stop::Deadline) => {
            return failed(
                Reason::DeadlineExceeded,
                with_notes(format!(
                    "deadline of {} exceeded",
                    format_duration(Duration::from_millis(r.timeout_ms))
                )),
                None,
            )
        }
        None => {}
    }
    if r.oom_killed {
        let message = format!(
            "memory limit of {} reached (out-of-memory kill)",
            format_bytes(r.limits.mem_bytes)
        );
        return failed(Reason::MemoryLimit, with_notes(message), code);
    }
    match r.exit {
        Exit::Code(0) => Verdict {
            state: TaskState::TaskFinished,
            reason: Reason::Unspecified,
            message: with_notes(String::new()),
            exit_code: Some(0),
        },
        Exit::Code(127) if r.shell && r.stderr_last_line.contains("not found") => failed(
            Reason::CommandExited,
            with_notes(format!("command not found: {}", r.stderr_last_line)),
            Some(127),
        ),
        Exit::Code(c) => failed(
            Reason::CommandExited,
            with_notes(format!("exited with code {c}")),
            Some(c),
        ),
        Exit::Signal(s) => failed(
            Reason::CommandExited,
            with_notes(format!("killed by signal {s} ({})", signal_name(s))),
            None,
        ),
    }
}

fn signal_name(sig: i32) -> &'static str {
    const NAMES: &[(i32, &str)] = &[
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGTRAP, "SIGTRAP"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGXCPU, "SIGXCPU"),
        (libc::SIGXFSZ, "SIGXFSZ"),
        (libc::SIGSYS, "SIGSYS"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == sig)
        .map(|(_, name)| *name)
        .unwrap_or("unknown signal")
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_proto::units::MIB;

    fn ran(exit: Exit) -> Ran {
        Ran {
            exit,
            stopped: None,
            oom_killed: false,
            pids_limit_hits: 0,
            limits: CgroupLimits {
                milli_cpus: 500,
                cfs_quota: true,
                mem_bytes: 128 * MIB,
                pids_max: 64,
            },
            timeout_ms: 0,
            shell: true,
            stderr_last_line: String::new(),
            notes: Vec::new(),
        }
    }

    fn verdict(r: Ran) -> Verdict {
        classify(&Ending::Ran(r))
    }

    #[test]
    fn exit_codes_pass_through() {
        let v = verdict(ran(Exit::Code(0)));
        assert_eq!(
            (v.state, v.reason, v.exit_code, v.message.as_str()),
            (TaskState::TaskFinished, Reason::Unspecified, Some(0), "")
        );
        let v = verdict(ran(Exit::Code(7)));
        assert_eq!(
            (v.state, v.reason, v.exit_code, v.message.as_str()),
            (
                TaskState::TaskFailed,
                Reason::CommandExited,
                Some(7),
                "exited with code 7"
            )
        );
    }

    #[test]
    fn shell_127_is_command_not_found_with_the_shell_line() {
        let mut r = ran(Exit::Code(127));
        r.stderr_last_line = "sh: 1: frobnicate: not found".into();
        let v = verdict(r.clone());
        assert_eq!(v.message, "command not found: sh: 1: frobnicate: not found");
        assert_eq!(v.exit_code, Some(127));
        // `exit 127` with nothing said is just an exit code.
        r.stderr_last_line.clear();
        assert_eq!(verdict(r).message, "exited with code 127");
        let v = classify(&Ending::NotFound {
            program: "frobnicate".into(),
        });
        assert_eq!(
            (v.state, v.reason, v.exit_code, v.message.as_str()),
            (
                TaskState::TaskFailed,
                Reason::CommandExited,
                Some(127),
                "command not found: frobnicate"
            )
        );
    }

    #[test]
    fn oom_evidence_wins_over_the_signal() {
        let mut r = ran(Exit::Signal(libc::SIGKILL));
        r.oom_killed = true;
        let v = verdict(r);
        assert_eq!(
            (v.state, v.reason),
            (TaskState::TaskFailed, Reason::MemoryLimit)
        );
        assert_eq!(
            v.message,
            "memory limit of 128MiB reached (out-of-memory kill)"
        );
        // Without evidence a SIGKILL is just a signal.
        let v = verdict(ran(Exit::Signal(libc::SIGKILL)));
        assert_eq!(
            (v.reason, v.message.as_str()),
            (Reason::CommandExited, "killed by signal 9 (SIGKILL)")
        );
        let v = verdict(ran(Exit::Signal(libc::SIGSEGV)));
        assert_eq!(v.message, "killed by signal 11 (SIGSEGV)");
    }

    #[test]
    fn pids_limit_is_reported_with_the_exit() {
        let mut r = ran(Exit::Code(2));
        r.pids_limit_hits = 12;
        let v = verdict(r.clone());
        assert_eq!(
            v.message,
            "exited with code 2; pids limit of 64 reached (fork failed)"
        );
        assert_eq!(v.exit_code, Some(2));
        r.exit = Exit::Code(0);
        let v = verdict(r);
        assert_eq!(v.state, TaskState::TaskFinished);
        assert_eq!(v.message, "pids limit of 64 reached (fork failed)");
    }

    #[test]
    fn our_stops_come_first() {
        let mut r = ran(Exit::Signal(libc::SIGTERM));
        r.stopped = Some(Stop::Killed);
        r.oom_killed = true;
        let v = verdict(r.clone());
        assert_eq!(
            (v.state, v.reason, v.message.as_str()),
            (TaskState::TaskKilled, Reason::KilledByFramework, "killed")
        );
        r.stopped = Some(Stop::Deadline);
        r.timeout_ms = 1500;
        let v = verdict(r);
        assert_eq!(
            (v.state, v.reason),
            (TaskState::TaskFailed, Reason::DeadlineExceeded)
        );
        assert_eq!(v.message, "deadline of 1.5s exceeded");
    }

    #[test]
    fn refusals() {
        let v = classify(&Ending::Refused {
            reason: Reason::SandboxFailed,
            message: "cannot create".into(),
        });
        assert_eq!(
            (v.state, v.reason, v.exit_code),
            (TaskState::TaskFailed, Reason::SandboxFailed, None)
        );
        let v = classify(&Ending::CannotExecute {
            program: "./x".into(),
            error: "Permission denied (os error 13)".into(),
        });
        assert_eq!(v.exit_code, Some(126));
        assert_eq!(
            v.message,
            "cannot execute ./x: Permission denied (os error 13)"
        );
    }

    #[test]
    fn grace_defaults_and_bounds() {
        assert_eq!(kill_grace(None), DEFAULT_KILL_GRACE);
        assert_eq!(kill_grace(Some(0.5)), Duration::from_millis(500));
        assert_eq!(kill_grace(Some(-1.0)), DEFAULT_KILL_GRACE);
        assert_eq!(kill_grace(Some(f64::NAN)), DEFAULT_KILL_GRACE);
        assert_eq!(kill_grace(Some(1e12)), MAX_KILL_GRACE);
    }

    #[test]
    fn programs_resolve_through_path() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resolve_program("sh", DEFAULT_PATH, dir.path()).is_some());
        assert!(resolve_program("no-such-program-here", DEFAULT_PATH, dir.path()).is_none());
        fs::write(dir.path().join("plain"), "x").unwrap();
        assert!(
            resolve_program("plain", ".", dir.path()).is_none(),
            "not executable"
        );
        assert!(
            resolve_program("./plain", "", dir.path()).is_some(),
            "a path is taken as is"
        );
        assert!(resolve_program("./missing", "", dir.path()).is_none());
    }

    #[test]
    fn kill_switch_wakes_poll() {
        let k = KillSwitch::new().unwrap();
        assert!(!k.is_triggered());
        k.trigger();
        assert!(k.is_triggered());
        let mut fd = libc::pollfd {
            fd: k.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        assert_eq!(n, 1);
    }
}
