//! Tasks run by the runner as the executor runs them, on real processes: in cgroups
//! (root; skipped with the reason elsewhere) and with posix isolation (always).
//! Bad input included: a fork bomb, memory bombs, a process tree that ignores SIGTERM,
//! commands that do not exist.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use agora_native_executor::{IsolationMode, NativeConfig, Runner};
use agora_proto::v1::{CommandInfo, Reason, TaskState};
use common::*;

fn cgroup_runner(test: &str, pids_max: u64) -> (Arc<Runner>, CleanupRoot, tempfile::TempDir) {
    let root = unique_root(test);
    let cfg = NativeConfig {
        pids_max,
        ..config(IsolationMode::Cgroups, &root)
    };
    let runner = Runner::new(cfg, "fw", "ex").expect("cgroup runner");
    assert_eq!(runner.isolator().mode(), IsolationMode::Cgroups);
    (Arc::new(runner), CleanupRoot(root), task_dir())
}

fn posix_runner(test: &str) -> (Arc<Runner>, tempfile::TempDir) {
    let runner = Runner::new(config(IsolationMode::Posix, &unique_root(test)), "fw", "ex")
        .expect("posix runner");
    assert_eq!(runner.isolator().mode(), IsolationMode::Posix);
    assert_eq!(
        runner.isolator().posix_reason(),
        Some("posix isolation was asked for")
    );
    (Arc::new(runner), task_dir())
}

/// The cgroup of a task (to check that it is gone).
fn task_cgroup(runner: &Runner, task: &str) -> String {
    format!(
        "{}/{}",
        runner.isolator().root_name(),
        runner.task_group_name(task)
    )
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

fn sandbox(dir: &Path, task: &str) -> PathBuf {
    let s = dir.join(task);
    std::fs::create_dir_all(&s).unwrap();
    s
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    // Tasks run as `nobody`.
    assert_eq!(unsafe { libc::chmod(c.as_ptr(), 0o666) }, 0, "chmod fifo");
}

/// The read end of a FIFO, opened before the task so the task's writer never blocks.
struct FifoReader(OwnedFd);

impl FifoReader {
    fn open(path: &Path) -> FifoReader {
        mkfifo(path);
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string; the descriptor is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) };
        assert!(fd >= 0, "open fifo");
        FifoReader(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Waits (bounded) for the task to write a line.
    fn line(&self) -> String {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, WAIT.as_millis() as i32) };
        assert_eq!(n, 1, "the task signalled readiness in time");
        let mut buf = [0u8; 256];
        // SAFETY: reads into a local buffer.
        let got = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(got > 0);
        String::from_utf8_lossy(&buf[..got as usize])
            .trim()
            .to_string()
    }
}

/// Writes a line into a FIFO a task is about to read, bounded.
fn write_fifo(path: &Path, text: &str) {
    let (path, text) = (path.to_path_buf(), text.to_string());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::write(&path, format!("{text}\n")));
    });
    rx.recv_timeout(WAIT)
        .expect("the task opened the fifo in time")
        .unwrap();
}

// ---------------------------------------------------------------------------
// Exit codes, output, environment (both isolation modes)
// ---------------------------------------------------------------------------

fn exit_codes_and_output(runner: &Arc<Runner>, dir: &Path, cgroups: bool) {
    let mark = marker("exit");
    let s = run(
        runner,
        shell_launch(
            "seven",
            dir,
            "echo hi; echo oops >&2; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exit 7",
            &mark,
        ),
    );
    assert_eq!(
        summary(&s),
        (TaskState::TaskFailed, Reason::CommandExited, Some(7))
    );
    assert_eq!(s.message, "exited with code 7");
    assert_eq!(read(dir.join("seven/stdout")), "hi\n");
    assert_eq!(read(dir.join("seven/stderr")), "oops\n");
    let usage = s.usage.expect("usage on the terminal status");
    assert!(
        usage.cpu_user_seconds + usage.cpu_system_seconds > 0.0,
        "{usage:?}"
    );
    if cgroups {
        assert!(usage.mem_peak_bytes > 0, "{usage:?}");
        assert!(!any_cgroup_dir_exists(&task_cgroup(runner, "seven")));
    }

    // argv form: value is the program, looked up in PATH.
    let argv = CommandInfo {
        shell: false,
        value: "sh".into(),
        arguments: vec![
            "-c".into(),
            "echo \"$0 $1\"; exit 3".into(),
            "two words".into(),
        ],
        ..Default::default()
    };
    let s = run(runner, launch("three", dir, argv, &mark));
    assert_eq!(
        summary(&s),
        (TaskState::TaskFailed, Reason::CommandExited, Some(3))
    );
    assert_eq!(read(dir.join("three/stdout")), "two words \n");

    let s = run(runner, shell_launch("zero", dir, "true", &mark));
    assert_eq!(
        summary(&s),
        (TaskState::TaskFinished, Reason::Unspecified, Some(0))
    );
    assert_eq!(s.message, "");

    // Environment: exactly the launch's plus a default PATH; cwd is root_dir.
    let s = run(
        runner,
        shell_launch("env", dir, "pwd; env | grep -v '^PWD=' | sort", &mark),
    );
    assert_eq!(s.state(), TaskState::TaskFinished, "{}", s.message);
    let canonical = dir.join("env").canonicalize().unwrap();
    assert_eq!(
        read(dir.join("env/stdout")),
        format!(
            "{}\nAGORA_TEST_MARKER={mark}\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
            canonical.display()
        )
    );

    // Death by a signal the task sent itself.
    let s = run(runner, shell_launch("segv", dir, "kill -SEGV $$", &mark));
    assert_eq!(
        summary(&s),
        (TaskState::TaskFailed, Reason::CommandExited, None)
    );
    assert_eq!(s.message, "killed by signal 11 (SIGSEGV)");
    assert_eq!(marked_processes(&mark), Vec::<i32>::new());
}

fn commands_not_found(runner: &Arc<Runner>, dir: &Path) {
    let mark = marker("notfound");
    let s = run(
        runner,
        shell_launch("sh-missing", dir, "no-such-command-agora-xyz --flag", &mark),
    );
    assert_eq!(
        summary(&s),
        (TaskState::TaskFailed, Reason::CommandExited, Some(127))
    );
    assert!(
        s.message.starts_with("command not found: ")
            && s.message.contains("no-such-command-agora-xyz"),
        "{}",
        s.message
    );
    let argv = CommandInfo {
        value: "no-such-command-agora-xyz".into(),
        arguments: vec!["--flag".into()],
        ..Default::default()
    };
    let s = run(runner, launch("argv-missing", dir, argv, &mark));
    assert_eq!(
        summary(&s),
        (TaskState::TaskFailed, Reason::CommandExited, Some(127))
    );
    assert_eq!(s.message, "command not found: no-such-command-agora-xyz");
    assert!(!any_cgroup_dir_exists(&task_cgroup(runner, "argv-missing")));

    // A file that exists but is not executable.
    let sb = sandbox(dir, "noexec");
    std::fs::write(sb.join("script"), "echo hi\n").unwrap();
    let argv = CommandInfo {
        value: "./script".into(),
        ..Default::default()
    };
    let s = run(runner, launch("noexec", dir, argv, &mark));
    assert_eq!(
        summary(&s),
        (TaskState::TaskFailed, Reason::CommandExited, Some(126))
    );
    assert!(
        s.message.starts_with("cannot execute ./script"),
        "{}",
        s.message
    );
}

fn output_is_capped(runner: &Arc<Runner>, dir: &Path) {
    let mut l = shell_launch("chatty", dir, "yes | head -c 100000", &marker("cap"));
    l.output_limit_bytes = 1000;
    let s = run(runner, l);
    assert_eq!(s.state(), TaskState::TaskFinished, "{}", s.message);
    let out = read(dir.join("chatty/stdout"));
    assert_eq!(
        out,
        format!(
            "{}[agora: output truncated at 1000 bytes]\n",
            "y\n".repeat(500)
        )
    );
}

fn deadline_is_enforced(runner: &Arc<Runner>, dir: &Path) {
    let mark = marker("deadline");
    let mut l = shell_launch("slow", dir, "sleep 1000", &mark);
    l.timeout_ms = 300;
    let s = run(runner, l);
    assert_eq!(
        summary(&s),
        (TaskState::TaskFailed, Reason::DeadlineExceeded, None)
    );
    assert_eq!(s.message, "deadline of 300ms exceeded");
    assert_eq!(marked_processes(&mark), Vec::<i32>::new());
}

/// A shell that ignores SIGTERM, with children and grandchildren that inherit that:
/// only the SIGKILL after the grace period ends them.
fn kill_reaches_a_tree_that_ignores_sigterm(runner: &Arc<Runner>, dir: &Path) {
    let mark = marker("tree");
    let sb = sandbox(dir, "tree");
    let ready = FifoReader::open(&sb.join("ready"));
    let script = "trap '' TERM; sleep 1000 & sh -c 'sleep 1000 & sleep 1000 & wait' & \
                  sleep 1000 & echo ready > ready; wait";
    let mut l = shell_launch("tree", dir, script, &mark);
    l.command.as_mut().unwrap().kill_grace_seconds = Some(1.0);
    let task = Running::start(runner, l);
    assert!(task.wait_started());
    assert_eq!(ready.line(), "ready");
    // The shell, its sleep and the inner shell exist once "ready" is written; a
    // process caught in the middle of execve shows an empty environ for an instant,
    // so look again until the scan sees them (bounded).
    let start = Instant::now();
    let before = loop {
        let found = marked_processes(&mark);
        if found.len() >= 4 || start.elapsed() > WAIT {
            break found;
        }
        std::thread::yield_now();
    };
    assert!(before.len() >= 4, "the tree is up: {before:?}");

    let t = Instant::now();
    task.kill.trigger();
    let s = task.wait();
    assert_eq!(
        summary(&s),
        (TaskState::TaskKilled, Reason::KilledByFramework, None)
    );
    assert_eq!(s.message, "killed");
    // They ignored SIGTERM, so only the SIGKILL after the grace could end them.
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(
        marked_processes(&mark),
        Vec::<i32>::new(),
        "before: {before:?}"
    );
    assert!(s.usage.is_some());
    assert!(!any_cgroup_dir_exists(&task_cgroup(runner, "tree")));
}

#[test]
fn cgroups_exit_codes_output_and_environment() {
    require_cgroups!("cgroups_exit_codes_output_and_environment");
    let (runner, _cleanup, dir) = cgroup_runner("exit", 1024);
    exit_codes_and_output(&runner, dir.path(), true);
}

#[test]
fn cgroups_commands_not_found() {
    require_cgroups!("cgroups_commands_not_found");
    let (runner, _cleanup, dir) = cgroup_runner("notfound", 1024);
    commands_not_found(&runner, dir.path());
}

#[test]
fn cgroups_output_cap_and_deadline() {
    require_cgroups!("cgroups_output_cap_and_deadline");
    let (runner, _cleanup, dir) = cgroup_runner("cap", 1024);
    output_is_capped(&runner, dir.path());
    deadline_is_enforced(&runner, dir.path());
}

#[test]
fn cgroups_kill_reaches_the_whole_tree() {
    require_cgroups!("cgroups_kill_reaches_the_whole_tree");
    let (runner, _cleanup, dir) = cgroup_runner("tree", 1024);
    kill_reaches_a_tree_that_ignores_sigterm(&runner, dir.path());
}

#[test]
fn posix_exit_codes_output_and_environment() {
    let (runner, dir) = posix_runner("exit");
    exit_codes_and_output(&runner, dir.path(), false);
}

#[test]
fn posix_commands_not_found() {
    let (runner, dir) = posix_runner("notfound");
    commands_not_found(&runner, dir.path());
}

#[test]
fn posix_output_cap_and_deadline() {
    let (runner, dir) = posix_runner("cap");
    output_is_capped(&runner, dir.path());
    deadline_is_enforced(&runner, dir.path());
}

#[test]
fn posix_kill_reaches_the_whole_process_group() {
    let (runner, dir) = posix_runner("tree");
    kill_reaches_a_tree_that_ignores_sigterm(&runner, dir.path());
}

// ---------------------------------------------------------------------------
// Bombs (cgroups only: posix isolation has no pids limit and no OOM reporting)
// ---------------------------------------------------------------------------

/// A neighbour task that waits for the test's go-ahead: it must come through the
/// bombs unharmed.
struct Neighbour {
    task: Running,
    go: PathBuf,
}

impl Neighbour {
    fn start(runner: &Arc<Runner>, dir: &Path) -> Neighbour {
        let sb = sandbox(dir, "neighbour");
        let ready = FifoReader::open(&sb.join("ready"));
        mkfifo(&sb.join("go"));
        let task = Running::start(
            runner,
            shell_launch(
                "neighbour",
                dir,
                "echo ready > ready; read line < go; echo \"got $line\"",
                &marker("neighbour"),
            ),
        );
        assert!(task.wait_started());
        assert_eq!(ready.line(), "ready");
        Neighbour {
            task,
            go: sb.join("go"),
        }
    }

    fn finish(self, dir: &Path) {
        write_fifo(&self.go, "go");
        let s = self.task.wait();
        assert_eq!(s.state(), TaskState::TaskFinished, "{}", s.message);
        assert_eq!(read(dir.join("neighbour/stdout")), "got go\n");
    }
}

#[test]
fn fork_bombs_are_stopped_by_the_pids_limit() {
    require_cgroups!("fork_bombs_are_stopped_by_the_pids_limit");
    let (runner, _cleanup, dir) = cgroup_runner("forkbomb", 64);
    let dir = dir.path();
    let neighbour = Neighbour::start(&runner, dir);

    // Background sleeps until fork fails: dash gives up with "Cannot fork".
    let mark = marker("sleeps");
    let s = run(
        &runner,
        shell_launch(
            "sleeps",
            dir,
            "i=0; while [ $i -lt 500 ]; do sleep 1000 & i=$((i+1)); done; wait",
            &mark,
        ),
    );
    println!("background sleeps: {:?} {:?}", summary(&s), s.message);
    assert_eq!(s.state(), TaskState::TaskFailed, "{}", s.message);
    assert!(
        s.message.contains("pids limit of 64 reached (fork failed)"),
        "{}",
        s.message
    );
    assert_eq!(s.reason(), Reason::CommandExited);
    assert!(s.exit_code.is_some_and(|c| c != 0), "{:?}", s.exit_code);
    assert_eq!(marked_processes(&mark), Vec::<i32>::new());
    assert!(!any_cgroup_dir_exists(&task_cgroup(&runner, "sleeps")));

    // The classic bomb. Its first shell may exit at once or wait; the deadline bounds
    // the second case. Either way the group is killed and the limit is reported.
    let mark = marker("bomb");
    let mut l = shell_launch("bomb", dir, "b() { b | b & }; b; sleep 2; wait", &mark);
    l.timeout_ms = 10_000;
    let s = run(&runner, l);
    println!("classic bomb: {:?} {:?}", summary(&s), s.message);
    assert!(
        s.message.contains("pids limit of 64 reached (fork failed)"),
        "{:?}: {}",
        summary(&s),
        s.message
    );
    assert_eq!(marked_processes(&mark), Vec::<i32>::new());
    assert!(!any_cgroup_dir_exists(&task_cgroup(&runner, "bomb")));

    neighbour.finish(dir);
}

#[test]
fn memory_bombs_are_oom_killed_and_reported() {
    require_cgroups!("memory_bombs_are_oom_killed_and_reported");
    let (runner, _cleanup, dir) = cgroup_runner("membomb", 1024);
    let dir = dir.path();
    let neighbour = Neighbour::start(&runner, dir);

    for (task, script) in [
        ("doubling", "x=a; while :; do x=$x$x; done"),
        ("tail", "head -c 300M /dev/zero | tail"),
    ] {
        let mark = marker(task);
        let mut l = shell_launch(task, dir, script, &mark);
        l.memory_bytes = 64 << 20;
        let s = run(&runner, l);
        println!("{task}: {:?} {:?} {:?}", summary(&s), s.message, s.usage);
        assert_eq!(
            (s.state(), s.reason()),
            (TaskState::TaskFailed, Reason::MemoryLimit),
            "{task}: {}",
            s.message
        );
        assert_eq!(
            s.message, "memory limit of 64MiB reached (out-of-memory kill)",
            "{task}"
        );
        let usage = s.usage.unwrap();
        assert!(
            usage.mem_peak_bytes > 32 << 20 && usage.mem_peak_bytes <= 64 << 20,
            "{task}: peak {}",
            usage.mem_peak_bytes
        );
        assert_eq!(marked_processes(&mark), Vec::<i32>::new());
        assert!(!any_cgroup_dir_exists(&task_cgroup(&runner, task)));
    }

    neighbour.finish(dir);
}

#[test]
fn bad_launches_are_refused_with_reasons() {
    // Needs no cgroups: refused before any group exists.
    let (runner, dir) = posix_runner("refused");
    let mut l = shell_launch("nocmd", dir.path(), "true", "x");
    l.command = None;
    let s = run(&runner, l);
    assert_eq!(
        summary(&s),
        (TaskState::TaskFailed, Reason::InvalidTask, None)
    );
    let mut l = shell_launch("noroot", dir.path(), "true", "x");
    l.root_dir.clear();
    assert_eq!(run(&runner, l).reason(), Reason::InvalidTask);
    let mut l = shell_launch("badroot", dir.path(), "true", "x");
    l.root_dir = "/proc/agora-cannot-create-this".into();
    let s = run(&runner, l);
    assert_eq!(s.reason(), Reason::SandboxFailed, "{}", s.message);
    assert!(s.message.contains("working directory"), "{}", s.message);
}

#[test]
fn tasks_run_as_their_user_in_a_sandbox_only_they_own() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to switch users");
        return;
    }
    let (runner, dir) = posix_runner("users");
    let nobody = agora_native_executor::runner::lookup_user("nobody")
        .unwrap()
        .expect("nobody exists");
    let l = shell_launch("who", dir.path(), "id -u; id -G", "x");
    let s = run(&runner, l);
    assert_eq!(s.state(), TaskState::TaskFinished, "{}", s.message);
    let out = read(sandbox(dir.path(), "who").join("stdout"));
    assert_eq!(
        out,
        format!("{}\n{}\n", nobody.uid, nobody.gid),
        "no other groups"
    );
    let meta = std::fs::metadata(sandbox(dir.path(), "who")).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o700, nobody.uid));
    let stdout_meta = std::fs::metadata(sandbox(dir.path(), "who").join("stdout")).unwrap();
    assert_eq!(stdout_meta.uid(), nobody.uid);

    for (user, says) in [
        ("root", "--allow-root-tasks"),
        ("no-such-user-here", "user `no-such-user-here`"),
    ] {
        let mut l = shell_launch(&format!("as-{user}"), dir.path(), "id -u", "x");
        l.command.as_mut().unwrap().user = user.into();
        let s = run(&runner, l);
        assert_eq!(
            (s.state(), s.reason()),
            (TaskState::TaskFailed, Reason::InvalidTask),
            "{}",
            s.message
        );
        assert!(s.message.contains(says), "{}", s.message);
    }

    let allowing = Runner::new(
        NativeConfig {
            allow_root: true,
            ..config(IsolationMode::Posix, &unique_root("users-root"))
        },
        "fw",
        "ex",
    )
    .unwrap();
    let mut l = shell_launch("as-root", dir.path(), "id -u", "x");
    l.command.as_mut().unwrap().user = "root".into();
    let s = run(&Arc::new(allowing), l);
    assert_eq!(s.state(), TaskState::TaskFinished, "{}", s.message);
    assert_eq!(read(sandbox(dir.path(), "as-root").join("stdout")), "0\n");
}

#[test]
fn output_files_are_not_created_through_a_planted_symlink() {
    let (runner, dir) = posix_runner("planted");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    let sb = sandbox(dir.path(), "planted");
    std::fs::create_dir_all(&sb).unwrap();
    std::os::unix::fs::symlink(&victim, sb.join("stdout")).unwrap();
    let s = run(
        &runner,
        shell_launch("planted", dir.path(), "echo over", "x"),
    );
    assert_eq!(s.reason(), Reason::SandboxFailed, "{}", s.message);
    assert!(s.message.contains("stdout"), "{}", s.message);
    assert_eq!(read(&victim), "untouched");
}

/// The disk isolator: a task writing past its disk is killed (or, if it ended first,
/// failed) with the disk reason; one creating more files than its cap likewise; one
/// within both finishes and reports what its sandbox holds.
fn disk_limits_are_enforced(runner: &Arc<Runner>, dir: &Path) {
    let m = marker("disk");
    let mut l = shell_launch(
        "disk-big",
        dir,
        "dd if=/dev/zero of=big bs=1M count=200 2>/dev/null; sleep 60",
        &m,
    );
    l.disk_bytes = 32 << 20;
    l.max_files = 100;
    l.timeout_ms = 120_000;
    let s = run(runner, l);
    assert_eq!(
        (s.state(), s.reason()),
        (TaskState::TaskFailed, Reason::DiskLimit),
        "{s:?}"
    );
    assert!(
        s.message.starts_with("disk limit of 32MiB exceeded"),
        "{s:?}"
    );
    // One file cannot outrun the walks: RLIMIT_FSIZE stopped it a block past the limit.
    let big = std::fs::metadata(dir.join("disk-big/big")).unwrap().len();
    assert_eq!(big, (32 << 20) + 4096, "{s:?}");

    // Many files written as fast as the disk takes them (3 GiB asked): stopped within
    // a bounded overshoot, not after a second of writing.
    let mut l = shell_launch(
        "disk-fast",
        dir,
        "i=0; while [ $i -lt 192 ]; do dd if=/dev/zero of=f$i bs=1M count=16 2>/dev/null; i=$((i+1)); done; sleep 60",
        &m,
    );
    l.disk_bytes = 32 << 20;
    l.timeout_ms = 120_000;
    let s = run(runner, l);
    assert_eq!(
        (s.state(), s.reason()),
        (TaskState::TaskFailed, Reason::DiskLimit),
        "{s:?}"
    );
    let held = agora_executor_link::disk::measure(&dir.join("disk-fast"), 1_000_000).unwrap();
    println!(
        "a native task writing 16 MiB files as fast as it could under a 32 MiB limit left {} MiB",
        held.bytes >> 20
    );
    assert!(held.bytes < 1 << 30, "{held:?}");

    // Ends before any scan: the final one judges it.
    let mut l = shell_launch(
        "disk-quick",
        dir,
        "dd if=/dev/zero of=big bs=1M count=40 2>/dev/null",
        &m,
    );
    l.disk_bytes = 32 << 20;
    let s = run(runner, l);
    assert_eq!(
        (s.state(), s.reason()),
        (TaskState::TaskFailed, Reason::DiskLimit),
        "{s:?}"
    );

    let mut l = shell_launch(
        "disk-files",
        dir,
        "mkdir many && cd many && i=0; while [ $i -lt 300 ]; do : > f$i; i=$((i+1)); done; sleep 60",
        &m,
    );
    l.disk_bytes = 32 << 20;
    l.max_files = 100;
    l.timeout_ms = 120_000;
    let s = run(runner, l);
    assert_eq!(
        (s.state(), s.reason()),
        (TaskState::TaskFailed, Reason::DiskLimit),
        "{s:?}"
    );
    assert!(
        s.message.starts_with("disk limit of 100 files exceeded"),
        "{s:?}"
    );

    let mut l = shell_launch(
        "disk-ok",
        dir,
        "dd if=/dev/zero of=small bs=1M count=2 2>/dev/null",
        &m,
    );
    l.disk_bytes = 32 << 20;
    l.max_files = 100;
    let s = run(runner, l);
    assert_eq!(
        (s.state(), s.reason()),
        (TaskState::TaskFinished, Reason::Unspecified),
        "{s:?}"
    );
    let u = s.usage.unwrap();
    assert!(u.disk_used_bytes >= 2 << 20, "{u:?}");
    assert!(u.disk_used_bytes < 32 << 20, "{u:?}");
}

#[test]
fn cgroups_disk_limits() {
    require_cgroups!("cgroups_disk_limits");
    let (runner, _cleanup, dir) = cgroup_runner("disk", 1024);
    disk_limits_are_enforced(&runner, dir.path());
}

#[test]
fn posix_disk_limits() {
    let (runner, dir) = posix_runner("disk");
    disk_limits_are_enforced(&runner, dir.path());
}
