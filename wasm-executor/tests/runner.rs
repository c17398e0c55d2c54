//! Runner-level tests with real guests (guest-examples, built for wasm32-wasip1) and
//! small modules written inline as WebAssembly text.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use agora_proto::v1::{ExecutorLaunch, ExecutorStatus, Reason, TaskState};
use agora_wasm_executor::{validate_module, KillSwitch, Runner};

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;

/// One runner for the whole test binary, as in an executor process.
fn runner() -> &'static Runner {
    static RUNNER: OnceLock<Runner> = OnceLock::new();
    RUNNER.get_or_init(|| Runner::new(None).expect("runner"))
}

/// A task's sandbox: `root/` is the guest's `/`, output files live beside it.
struct Task {
    dir: tempfile::TempDir,
    launch: ExecutorLaunch,
}

impl Task {
    fn new(module: &Path, args: &[&str]) -> Task {
        let dir = tempfile::tempdir().expect("tempdir");
        Task::in_dir(dir, module, args)
    }

    fn in_dir(dir: tempfile::TempDir, module: &Path, args: &[&str]) -> Task {
        let bytes = std::fs::read(module).expect("module");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("root");
        let launch = ExecutorLaunch {
            task_id: "t1".to_string(),
            module_path: module.display().to_string(),
            module_sha256: agora_proto::sha256_hex(&bytes),
            root_dir: root.display().to_string(),
            stdout_path: dir.path().join("stdout").display().to_string(),
            stderr_path: dir.path().join("stderr").display().to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Task { dir, launch }
    }

    fn guest(name: &str, args: &[&str]) -> Task {
        Task::new(&agora_guest_examples::wasm_path(name), args)
    }

    /// A module given as bytes, written beside the task's sandbox.
    fn bytes(bytes: &[u8]) -> Task {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("module.wasm");
        std::fs::write(&path, bytes).expect("write module");
        Task::in_dir(dir, &path, &[])
    }

    fn wat(text: &str) -> Task {
        Task::bytes(&wat::parse_str(text).expect("valid wat"))
    }

    fn run(&self) -> ExecutorStatus {
        self.run_with(runner())
    }

    fn run_with(&self, runner: &Runner) -> ExecutorStatus {
        runner.run(&self.launch, &KillSwitch::new(), |_| {})
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    fn root(&self) -> PathBuf {
        PathBuf::from(&self.launch.root_dir)
    }
}

fn assert_ending(status: &ExecutorStatus, state: TaskState, reason: Reason) {
    assert_eq!(
        (status.state(), status.reason()),
        (state, reason),
        "unexpected ending: {status:?}"
    );
}

#[test]
fn hello_prints_args_and_env() {
    let mut task = Task::guest("hello", &["a", "b", "c"]);
    task.launch
        .env
        .insert("GREETING".to_string(), "bonjour".to_string());
    let mut running_us = None;
    let status = runner().run(&task.launch, &KillSwitch::new(), |us| running_us = Some(us));
    assert_ending(&status, TaskState::TaskFinished, Reason::Unspecified);
    assert_eq!(
        task.stdout(),
        "hello from agora\nargs: a b c\nGREETING=bonjour\n"
    );
    assert_eq!(status.exit_code, None);
    assert_eq!(running_us, Some(status.instantiate_us));
    assert!(status.fuel_used > 0, "{status:?}");

    // A second run of the same module: no compile, just instantiate.
    let again = Task::guest("hello", &[]);
    let warm = again.run();
    assert_ending(&warm, TaskState::TaskFinished, Reason::Unspecified);
    assert_eq!(again.stdout(), "hello from agora\nargs: \nGREETING unset\n");
    let mut warm_us: Vec<u64> = (0..50)
        .map(|_| Task::guest("hello", &[]).run().instantiate_us)
        .collect();
    warm_us.sort_unstable();
    eprintln!(
        "hello instantiate_us: first run {} (includes compile), warm p50 {} / min {} / max {} \
         over {} runs; fuel_used {}; pooling allocator: {}",
        status.instantiate_us,
        warm_us[warm_us.len() / 2],
        warm_us[0],
        warm_us[warm_us.len() - 1],
        warm_us.len(),
        warm.fuel_used,
        runner().uses_pooling()
    );
}

#[test]
fn non_zero_exit_is_command_exited() {
    let task = Task::guest("exit-code", &["3"]);
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::CommandExited);
    assert_eq!(status.exit_code, Some(3));
    assert_eq!(status.message, "exited with code 3");
    assert_eq!(task.stderr(), "exiting with 3\n");
}

#[test]
fn exit_zero_is_finished() {
    let status = Task::guest("exit-code", &["0"]).run();
    assert_ending(&status, TaskState::TaskFinished, Reason::Unspecified);
}

#[test]
fn fib_finishes() {
    let task = Task::guest("fib", &["20"]);
    let status = task.run();
    assert_ending(&status, TaskState::TaskFinished, Reason::Unspecified);
    assert_eq!(task.stdout(), "fib(20) = 6765\n");
}

#[test]
fn spin_runs_out_of_fuel() {
    let mut task = Task::guest("spin", &[]);
    task.launch.fuel = 1_000_000;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::FuelExhausted);
    assert_eq!(status.message, "fuel exhausted after 1000000 units");
    assert_eq!(status.fuel_used, 1_000_000);
}

#[test]
fn spin_hits_its_deadline() {
    let mut task = Task::guest("spin", &[]);
    task.launch.timeout_ms = 300;
    let started = std::time::Instant::now();
    let status = task.run();
    let took = started.elapsed();
    assert_ending(&status, TaskState::TaskFailed, Reason::DeadlineExceeded);
    assert_eq!(status.message, "deadline of 300ms exceeded");
    assert!(took >= Duration::from_millis(300), "{took:?}");
}

#[test]
fn spin_is_killed_from_another_thread() {
    let task = Task::guest("spin", &[]);
    let kill = KillSwitch::new();
    let (running_tx, running_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let launch = task.launch.clone();
    let switch = kill.clone();
    std::thread::spawn(move || {
        let status = runner().run(&launch, &switch, |us| {
            let _ = running_tx.send(us);
        });
        let _ = done_tx.send(status);
    });
    running_rx.recv_timeout(WAIT).expect("task started");
    kill.kill();
    let status = done_rx
        .recv_timeout(WAIT)
        .expect("task ended after the kill");
    assert_ending(&status, TaskState::TaskKilled, Reason::KilledByFramework);
    assert_eq!(status.message, "killed");
}

#[test]
fn memhog_hits_the_memory_limit() {
    let mut task = Task::guest("memhog", &[]);
    task.launch.memory_bytes = 64 * MIB;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::MemoryLimit);
    assert_eq!(status.message, "memory limit of 64MiB reached");
    assert!(
        task.stdout().contains("allocated 8 MiB"),
        "{}",
        task.stdout()
    );
    assert!(
        task.stderr().contains("memory allocation of"),
        "{}",
        task.stderr()
    );
}

#[test]
fn large_initial_memory_is_refused_with_sizes() {
    let wat = r#"(module (memory 4096) (func (export "_start")))"#;
    let mut task = Task::wat(wat);
    task.launch.memory_bytes = 64 * MIB;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::MemoryLimit);
    assert_eq!(
        status.message,
        "module declares 256MiB of initial memory, more than the task's mem of 64MiB"
    );
    let bytes = wat::parse_str(wat).expect("wat");
    assert_eq!(
        validate_module(&bytes, 64 * MIB).map_err(|e| e.to_string()),
        Err(status.message.clone())
    );
    assert_eq!(
        validate_module(&bytes, 0).map_err(|e| e.to_string()),
        Ok(())
    );
}

#[test]
fn garbage_is_an_invalid_module() {
    let task = Task::bytes(b"hello");
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::InvalidModule);
    assert_eq!(
        status.message,
        "not a WebAssembly module (bad magic number)"
    );
    assert_eq!(
        validate_module(b"hello", 0).map_err(|e| e.to_string()),
        Err(status.message)
    );
}

#[test]
fn truncated_module_does_not_compile() {
    let bytes = wat::parse_str(r#"(module (func (export "_start")))"#).expect("wat");
    let status = Task::bytes(&bytes[..bytes.len() - 3]).run();
    assert_ending(&status, TaskState::TaskFailed, Reason::InvalidModule);
    assert!(
        status.message.starts_with("module does not compile: "),
        "{}",
        status.message
    );
}

#[test]
fn unknown_import_is_an_invalid_module() {
    let wat = r#"(module (import "env" "foo" (func)) (func (export "_start")))"#;
    let status = Task::wat(wat).run();
    assert_ending(&status, TaskState::TaskFailed, Reason::InvalidModule);
    assert_eq!(
        status.message,
        "module imports env::foo, which Agora does not provide (only WASI preview 1 is available)"
    );
    let bytes = wat::parse_str(wat).expect("wat");
    assert_eq!(
        validate_module(&bytes, 0).map_err(|e| e.to_string()),
        Err(status.message)
    );
}

#[test]
fn missing_start_is_an_invalid_module() {
    let status = Task::wat(r#"(module (func (export "main")))"#).run();
    assert_ending(&status, TaskState::TaskFailed, Reason::InvalidModule);
    assert!(status.message.contains("no `_start`"), "{}", status.message);
}

#[test]
fn unreachable_is_a_trap() {
    let status = Task::wat(r#"(module (func (export "_start") unreachable))"#).run();
    assert_ending(&status, TaskState::TaskFailed, Reason::Trap);
    assert!(status.message.contains("unreachable"), "{}", status.message);
    assert!(!status.message.contains('\n'), "{}", status.message);
}

#[test]
fn divide_by_zero_is_a_trap_with_its_message() {
    let wat = r#"(module (func (export "_start")
        (drop (i32.div_u (i32.const 1) (i32.const 0)))))"#;
    let status = Task::wat(wat).run();
    assert_ending(&status, TaskState::TaskFailed, Reason::Trap);
    assert_eq!(status.message, "wasm trap: integer divide by zero");
}

#[test]
fn files_reads_and_writes_the_sandbox() {
    let task = Task::guest("files", &[]);
    std::fs::write(task.root().join("input.txt"), "one two\nthree\n").expect("input");
    let status = task.run();
    assert_ending(&status, TaskState::TaskFinished, Reason::Unspecified);
    assert_eq!(task.stdout(), "lines=2 words=3 bytes=14\n");
    let result = std::fs::read_to_string(task.root().join("result.txt")).expect("result.txt");
    assert_eq!(result, "lines=2 words=3 bytes=14\nONE TWO\nTHREE\n");
}

#[test]
fn files_without_input_fails_clearly() {
    let task = Task::guest("files", &[]);
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::CommandExited);
    assert_eq!(status.exit_code, Some(1));
    assert!(
        task.stderr().contains("cannot read input /input.txt"),
        "{}",
        task.stderr()
    );
}

/// Exits with the errno of `fd_prestat_get(3)`: 0 when `/` is preopened, 8 (EBADF)
/// when the guest has no filesystem.
const PREOPEN_PROBE: &str = r#"(module
    (import "wasi_snapshot_preview1" "fd_prestat_get"
        (func $prestat (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
    (memory (export "memory") 1)
    (func (export "_start") (call $exit (call $prestat (i32.const 3) (i32.const 0)))))"#;

#[test]
fn an_empty_sandbox_is_still_preopened() {
    // A task with no inputs must still be able to write its results to `/`.
    let task = Task::wat(PREOPEN_PROBE);
    assert_eq!(std::fs::read_dir(task.root()).expect("root").count(), 0);
    let status = task.run();
    assert_ending(&status, TaskState::TaskFinished, Reason::Unspecified);
}

#[test]
fn no_root_dir_means_no_filesystem() {
    let mut task = Task::wat(PREOPEN_PROBE);
    task.launch.root_dir = String::new();
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::CommandExited);
    assert_eq!(status.exit_code, Some(8), "EBADF: fd 3 is not a descriptor");
}

#[test]
fn output_is_capped_with_a_marker() {
    // Writes a 64-byte line to stdout 1000 times.
    let wat = r#"(module
        (import "wasi_snapshot_preview1" "fd_write"
            (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 16) "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n")
        (func (export "_start") (local $i i32)
            (i32.store (i32.const 0) (i32.const 16))
            (i32.store (i32.const 4) (i32.const 64))
            (loop $again
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br_if $again (i32.lt_u (local.get $i) (i32.const 1000))))))"#;
    let mut task = Task::wat(wat);
    task.launch.output_limit_bytes = 1000;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFinished, Reason::Unspecified);
    let out = task.stdout();
    let marker = "[agora: output truncated at 1000 bytes]\n";
    assert!(out.ends_with(marker), "{out}");
    assert_eq!(out.matches("[agora:").count(), 1);
    // 1000 bytes kept, then a newline (the cut fell mid-line) and the marker.
    assert_eq!(out.len(), 1000 + 1 + marker.len());
}

#[test]
fn modules_are_compiled_once_and_cached_on_disk() {
    let cache = tempfile::tempdir().expect("cache dir");
    let runner = Runner::new(Some(cache.path().to_path_buf())).expect("runner");
    let first = Task::guest("hello", &[]);
    assert_ending(
        &first.run_with(&runner),
        TaskState::TaskFinished,
        Reason::Unspecified,
    );
    assert_ending(
        &first.run_with(&runner),
        TaskState::TaskFinished,
        Reason::Unspecified,
    );
    assert_eq!(runner.compiled_count(), 1);
    let artifacts: Vec<_> = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert!(
        artifacts[0].starts_with(&first.launch.module_sha256) && artifacts[0].ends_with(".cwasm"),
        "{artifacts:?}"
    );

    // A new process (runner) with the same cache dir loads the artifact instead.
    let next = Runner::new(Some(cache.path().to_path_buf())).expect("runner");
    let task = Task::guest("hello", &["again"]);
    assert_ending(
        &task.run_with(&next),
        TaskState::TaskFinished,
        Reason::Unspecified,
    );
    assert_eq!(next.compiled_count(), 0);
    assert!(task.stdout().contains("args: again"));
}

#[test]
fn wrong_sha_is_refused() {
    let mut task = Task::guest("hello", &[]);
    task.launch.module_sha256 = "0".repeat(64);
    let status = task.run_with(&Runner::new(None).expect("runner"));
    assert_ending(&status, TaskState::TaskFailed, Reason::FetchFailed);
    assert!(
        status.message.contains("expected 0000"),
        "{}",
        status.message
    );

    task.launch.module_sha256 = "../../etc/passwd".to_string();
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::InvalidTask);
}

#[test]
fn missing_root_dir_is_a_sandbox_failure() {
    let mut task = Task::guest("hello", &[]);
    task.launch.root_dir = task.dir.path().join("nope").display().to_string();
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::SandboxFailed);
}

#[test]
fn validate_accepts_the_guests() {
    for name in [
        "hello",
        "exit-code",
        "spin",
        "memhog",
        "fib",
        "files",
        "sleep",
    ] {
        let bytes = std::fs::read(agora_guest_examples::wasm_path(name)).expect("guest");
        assert_eq!(
            validate_module(&bytes, 64 * MIB).map_err(|e| e.to_string()),
            Ok(()),
            "{name}"
        );
    }
}

/// More concurrent tasks than the pooling allocator has instance slots: the extra ones
/// wait for a slot instead of failing to instantiate.
#[test]
fn more_tasks_than_pool_slots_all_finish() {
    // Guests that block in a WASI sleep hold their instance slot while they wait.
    let text = r#"(module
        (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        ;; one clock subscription: relative timeout of 500 ms
        (data (i32.const 16) "\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\01\00\00\00\00\00\00\00\00\65\cd\1d\00\00\00\00")
        (func (export "_start") (drop (call $poll (i32.const 16) (i32.const 128) (i32.const 1) (i32.const 256)))))"#;
    let tasks: Vec<Task> = (0..300).map(|_| Task::wat(text)).collect();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for t in &tasks {
            let tx = tx.clone();
            s.spawn(move || tx.send(t.run()).unwrap());
        }
        drop(tx);
        let mut finished = 0;
        for st in rx.iter() {
            assert_eq!(st.state(), TaskState::TaskFinished, "{}", st.message);
            finished += 1;
        }
        assert_eq!(finished, 300);
    });
}

/// Runs `task` on a thread of its own, as the executor does; returns the task's
/// kill switch and where its status will arrive.
fn start(task: &Task) -> (KillSwitch, mpsc::Receiver<ExecutorStatus>) {
    let kill = KillSwitch::new();
    let (done_tx, done_rx) = mpsc::channel();
    let launch = task.launch.clone();
    let switch = kill.clone();
    std::thread::spawn(move || {
        let _ = done_tx.send(runner().run(&launch, &switch, |_| {}));
    });
    (kill, done_rx)
}

/// Waits (boundedly) until the guest has written `line` on stdout: the guest writes
/// it just before the host call the test wants it blocked in.
fn wait_for_stdout(task: &Task, line: &str) {
    let until = Instant::now() + WAIT;
    while !task.stdout().contains(line) {
        assert!(
            Instant::now() < until,
            "the guest never wrote {line:?}; stdout: {:?}, stderr: {:?}",
            task.stdout(),
            task.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_sleeping_guest_ends_at_its_deadline_not_after_its_sleep() {
    let mut task = Task::guest("sleep", &["30000"]);
    task.launch.timeout_ms = 2000;
    let started = Instant::now();
    let status = task.run();
    let took = started.elapsed();
    println!("a 30 s sleep with a 2 s deadline ended after {took:?}");
    assert_ending(&status, TaskState::TaskFailed, Reason::DeadlineExceeded);
    assert_eq!(status.message, "deadline of 2s exceeded");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(task.stdout(), "sleep: sleeping 30000 ms\n");
}

#[test]
fn a_kill_ends_a_guest_blocked_in_a_sleep_at_once() {
    let task = Task::guest("sleep", &["60000"]);
    let (kill, done) = start(&task);
    wait_for_stdout(&task, "sleeping 60000 ms");
    let killed_at = Instant::now();
    kill.kill();
    let status = done
        .recv_timeout(WAIT)
        .expect("the task ended after the kill");
    let took = killed_at.elapsed();
    println!("a guest sleeping 60 s ended {took:?} after its kill");
    assert_ending(&status, TaskState::TaskKilled, Reason::KilledByFramework);
    assert_eq!(status.message, "killed");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_kill_ends_a_guest_blocked_reading_a_fifo_at_once() {
    let task = Task::guest("sleep", &["--read", "/fifo"]);
    let fifo = task.root().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let (kill, done) = start(&task);
    // Nobody writes to the FIFO: the guest blocks opening it (or reading it).
    wait_for_stdout(&task, "reading /fifo");
    let killed_at = Instant::now();
    kill.kill();
    let status = done
        .recv_timeout(WAIT)
        .expect("the task ended after the kill");
    let took = killed_at.elapsed();
    println!("a guest blocked reading a FIFO ended {took:?} after its kill");
    assert_ending(&status, TaskState::TaskKilled, Reason::KilledByFramework);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!task.stdout().contains("read "), "{}", task.stdout());
    // Release the blocking-pool thread still waiting in open(2): open the write end
    // (which itself waits for that reader) and close it at once.
    std::thread::spawn(move || drop(std::fs::OpenOptions::new().write(true).open(fifo)));
}

/// A guest writing past its disk limit gets ENOSPC in the guest, and the task fails
/// naming the limit; what it wrote before stays within it.
#[test]
fn disk_limit_gives_enospc_and_fails_the_task() {
    let mut task = Task::guest("diskhog", &["bytes", "64"]);
    task.launch.disk_bytes = 8 * MIB;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::DiskLimit);
    assert_eq!(status.message, "disk limit of 8MiB exceeded");
    assert!(
        task.stderr().contains("No space left on device"),
        "stderr: {}",
        task.stderr()
    );
    let size = std::fs::metadata(task.root().join("big")).unwrap().len();
    assert!(size <= 8 * MIB, "{size} bytes written");
    assert!(size >= 6 * MIB, "only {size} bytes written before ENOSPC");
    let usage = status.usage.unwrap();
    assert!(usage.disk_used_bytes >= size, "{usage:?}");
}

/// Within its limit, the same guest finishes.
#[test]
fn disk_within_limit_finishes() {
    let mut task = Task::guest("diskhog", &["bytes", "4"]);
    task.launch.disk_bytes = 8 * MIB;
    task.launch.max_files = 10;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFinished, Reason::Unspecified);
    assert_eq!(task.stdout(), format!("wrote {} bytes\n", 4 * MIB));
}

/// A guest creating more files than its sandbox may hold gets an error at the cap.
#[test]
fn file_cap_refuses_creates() {
    let mut task = Task::guest("diskhog", &["files", "500"]);
    task.launch.disk_bytes = 64 * MIB;
    task.launch.max_files = 100;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::DiskLimit);
    assert_eq!(status.message, "disk limit of 100 files exceeded");
    assert!(
        task.stderr()
            .contains("create failed after 99: No space left on device"),
        "stderr: {}",
        task.stderr()
    );
    let made = std::fs::read_dir(task.root().join("many")).unwrap().count();
    assert_eq!(made, 99, "the directory /many is the 100th entry");
}

/// Far below its limits a guest writes as it would with none; its usage says what
/// its sandbox held at its end.
#[test]
fn a_guest_far_below_its_limit_writes_normally() {
    let mut task = Task::guest("diskhog", &["bytes", "16"]);
    task.launch.disk_bytes = 256 * MIB;
    task.launch.max_files = 10_000;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFinished, Reason::Unspecified);
    assert_eq!(task.stdout(), format!("wrote {} bytes\n", 16 * MIB));
    let size = std::fs::metadata(task.root().join("big")).unwrap().len();
    assert_eq!(size, 16 * MIB);
    let usage = status.usage.unwrap();
    assert!(usage.disk_used_bytes >= 16 * MIB, "{usage:?}");
    assert_eq!(usage.disk_files, 1, "{usage:?}");
}

/// A guest in WebAssembly text that opens `/f` and writes 4 KiB to it until a write
/// fails, then exits with that errno (0 if 64 writes all succeed). It reaches
/// `path_open` and `fd_write` only through a table (`call_indirect`), never by a
/// direct call. `renumber_onto_stdout`: first write 8 KiB to stdout, then move the
/// file's descriptor onto fd 1 and write to fd 1 instead.
fn table_writer(renumber_onto_stdout: bool) -> String {
    let (stdout_first, fd) = if renumber_onto_stdout {
        (
            r#"
            (i32.store (i32.const 4) (i32.const 8192))
            (if (call_indirect (type $write) (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 1))
                (then (call $exit (i32.const 99))))
            (drop (call $renumber (i32.load (i32.const 8)) (i32.const 1)))
            (i32.store (i32.const 8) (i32.const 1))
            (i32.store (i32.const 4) (i32.const 4096))"#,
            "(i32.load (i32.const 8))",
        )
    } else {
        ("", "(i32.load (i32.const 8))")
    };
    format!(
        r#"(module
        (type $open (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
        (type $write (func (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "path_open" (func $path_open (type $open)))
        (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (type $write)))
        (import "wasi_snapshot_preview1" "fd_renumber" (func $renumber (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        ;; iovec at 0: 4 KiB from offset 1024; the opened fd at 8; nwritten at 16.
        (data (i32.const 0) "\00\04\00\00\00\10\00\00")
        (data (i32.const 32) "f")
        (table 2 funcref)
        (elem (i32.const 0) func $path_open $fd_write)
        (func (export "_start") (local $i i32) (local $e i32)
            ;; path_open(3 = the preopened /, 0, "f", 1, O_CREAT, read and write, 0, 0, &fd)
            (local.set $e (call_indirect (type $open)
                (i32.const 3) (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 1)
                (i64.const 66) (i64.const 0) (i32.const 0) (i32.const 8) (i32.const 0)))
            (if (local.get $e) (then (call $exit (i32.add (i32.const 100) (local.get $e)))))
            {stdout_first}
            (loop $more
                (local.set $e (call_indirect (type $write)
                    {fd} (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 1)))
                (if (local.get $e) (then (call $exit (local.get $e))))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br_if $more (i32.lt_u (local.get $i) (i32.const 64))))
            (call $exit (i32.const 0))))"#
    )
}

/// Writes reached through a table (`call_indirect`) are charged like direct calls.
#[test]
fn writes_through_a_table_are_charged_too() {
    let mut task = Task::wat(&table_writer(false));
    task.launch.disk_bytes = 64 * 1024;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::DiskLimit);
    assert_eq!(status.message, "disk limit of 64KiB exceeded");
    let size = std::fs::metadata(task.root().join("f")).unwrap().len();
    assert!(size <= 64 * 1024, "{size} bytes written");
    assert!(size >= 32 * 1024, "only {size} bytes written before ENOSPC");
}

/// Output to stdout is not disk (it goes to the capped output file), but a file moved
/// onto fd 1 is: the guest gets ENOSPC (errno 51) writing it past the limit.
#[test]
fn a_file_renumbered_onto_stdout_is_still_charged() {
    let mut task = Task::wat(&table_writer(true));
    task.launch.disk_bytes = 64 * 1024;
    let status = task.run();
    assert_ending(&status, TaskState::TaskFailed, Reason::DiskLimit);
    assert_eq!(status.exit_code, Some(51), "{status:?}");
    assert_eq!(
        task.stdout().len(),
        8192,
        "the 8 KiB to stdout were written"
    );
    let size = std::fs::metadata(task.root().join("f")).unwrap().len();
    assert!(
        (32 * 1024..=64 * 1024).contains(&size),
        "{size} bytes written"
    );
}

/// The name of the disk limit's host functions is Agora's: a module importing from it
/// is refused before it runs, and by `validate_module` alike.
#[test]
fn a_module_importing_the_disk_limits_functions_is_refused() {
    let wat = r#"(module
        (import "agora_disk" "charge_create" (func (result i32)))
        (memory (export "memory") 1)
        (func (export "_start")))"#;
    let status = Task::wat(wat).run();
    assert_ending(&status, TaskState::TaskFailed, Reason::InvalidModule);
    assert_eq!(
        status.message,
        "module imports agora_disk::charge_create; the module name agora_disk is Agora's own"
    );
    let bytes = wat::parse_str(wat).expect("wat");
    assert_eq!(
        validate_module(&bytes, 0).map_err(|e| e.to_string()),
        Err(status.message)
    );
}
