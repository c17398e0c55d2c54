//! The executor process's main loop: registers with the agent over its Unix socket,
//! runs each launched task on a blocking thread, and reports RUNNING and the terminal
//! status of every task.
//!
//! Frames go out through one writer task per connection that owns the socket's write
//! half, so task threads (RUNNING from `on_running`, then the terminal status) and the
//! main loop never interleave partial frames, and a task's statuses stay in order.
//!
//! Statuses pass through an [`Outbox`]: each gets a sequence number and is kept until
//! the agent acknowledges it (`ExecutorAck`, sent once the status is in the agent's
//! checkpoint). When the agent goes away (socket EOF or reset: it was restarted, or
//! killed), the tasks keep running and their statuses wait; the executor connects to
//! the same socket again with backoff for up to the recovery timeout, registers again
//! naming the tasks it still knows, and sends the held statuses in order. If the agent
//! does not come back in time, the executor kills its tasks and exits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use agora_proto::v1::{ExecutorLaunch, ExecutorRegister, ExecutorStatus, Reason, TaskState};
use anyhow::Context as _;
use tokio::net::UnixStream;
use tokio::task::JoinSet;

use crate::runner::Runner;
use agora_executor_link::{
    self as executor_link, recovery_timeout_from_env, LinkedExecutor, Outbox,
};

/// How long tasks get to end after a kill when the executor is going away. Guests
/// executing wasm stop within one epoch tick; this only matters for a guest blocked in
/// a host call (e.g. a long WASI sleep), which the epoch cannot interrupt.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs the executor until the agent says `shutdown` (an `Ok` end, after killing the
/// running tasks). Losing the agent does not end it: see the module docs; an agent
/// that does not come back within the recovery timeout ([`agora_executor_link::RECOVERY_TIMEOUT_ENV`]) is
/// an error, after the tasks were killed. A failed first connection or a malformed
/// frame is an error too: the agent then sees the executor die.
pub async fn run_executor(
    socket: &Path,
    framework_id: &str,
    executor_id: &str,
    cache_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    run_executor_with(
        socket,
        framework_id,
        executor_id,
        cache_dir,
        recovery_timeout_from_env(),
    )
    .await
}

/// [`run_executor`] with the recovery timeout given.
pub async fn run_executor_with(
    socket: &Path,
    framework_id: &str,
    executor_id: &str,
    cache_dir: Option<PathBuf>,
    recovery_timeout: Duration,
) -> anyhow::Result<()> {
    let runner = Arc::new(Runner::new(cache_dir)?);
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the agent at {}", socket.display()))?;
    let register = ExecutorRegister {
        framework_id: framework_id.to_string(),
        executor_id: executor_id.to_string(),
        ..Default::default()
    };
    let mut executor = Executor {
        runner,
        outbox: Arc::default(),
        running: Arc::default(),
        tasks: JoinSet::new(),
        roots: HashMap::new(),
    };
    let result = executor_link::drive(&mut executor, stream, socket, register, recovery_timeout)
        .await
        .map_err(anyhow::Error::from);
    drop(executor);
    result
}

/// Kill flags of the running tasks, by task id. A task's thread removes its entry just
/// before it sends its terminal status, so once the agent has seen that status it may
/// reuse the id at once.
type Running = Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>;

struct Executor {
    runner: Arc<Runner>,
    outbox: Arc<Outbox>,
    running: Running,
    /// Task threads, joined to know when they are all gone.
    tasks: JoinSet<()>,
    /// Root directory of each task launched (pruned to the running ones), where
    /// framework messages are delivered.
    roots: HashMap<String, PathBuf>,
}

impl Executor {}

impl LinkedExecutor for Executor {
    type Entry = Arc<AtomicBool>;
    const RUNS: &'static str = "running tasks";

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn running(&self) -> &Mutex<HashMap<String, Self::Entry>> {
        &self.running
    }

    fn roots(&mut self) -> &mut HashMap<String, PathBuf> {
        &mut self.roots
    }

    fn launch(&mut self, launch: ExecutorLaunch) {
        let task_id = launch.task_id.clone();
        let kill = Arc::new(AtomicBool::new(false));
        let refusal = if task_id.is_empty() {
            Some("launch without a task id".to_string())
        } else {
            let mut running = lock(&self.running);
            if running.contains_key(&task_id) {
                Some(format!(
                    "task {task_id} is already running in this executor"
                ))
            } else {
                running.insert(task_id.clone(), Arc::clone(&kill));
                None
            }
        };
        if let Some(message) = refusal {
            tracing::warn!(task_id = %task_id, "{message}");
            self.outbox.status(ExecutorStatus {
                task_id,
                state: TaskState::TaskFailed as i32,
                reason: Reason::InvalidTask as i32,
                message,
                ..Default::default()
            });
            return;
        }
        if !launch.root_dir.is_empty() {
            self.roots
                .insert(task_id.clone(), PathBuf::from(&launch.root_dir));
        }

        tracing::info!(task_id = %task_id, module = %launch.module_sha256, "launching task");
        let runner = Arc::clone(&self.runner);
        let outbox = Arc::clone(&self.outbox);
        let running = Arc::clone(&self.running);
        self.tasks.spawn_blocking(move || {
            let on_running = |instantiate_us| {
                outbox.status(ExecutorStatus {
                    task_id: launch.task_id.clone(),
                    state: TaskState::TaskRunning as i32,
                    instantiate_us,
                    ..Default::default()
                })
            };
            // A panic is a bug of ours, but the agent must still hear about the task.
            let run = std::panic::AssertUnwindSafe(|| runner.run(&launch, kill, on_running));
            let status = std::panic::catch_unwind(run)
                .unwrap_or_else(|panic| panicked(&launch.task_id, panic.as_ref()));
            tracing::info!(
                task_id = %launch.task_id,
                state = status.state().short_name(),
                reason = status.reason().short_name(),
                message = %status.message,
                "task ended"
            );
            // Sent from this thread, after RUNNING, through the same outbox: in order.
            outbox.finish(&running, &launch.task_id, status);
        });
    }

    fn kill(entry: &Self::Entry) {
        entry.store(true, Ordering::Relaxed);
    }

    fn tasks(&mut self) -> &mut JoinSet<()> {
        &mut self.tasks
    }

    /// Kills every task and waits (bounded) for all of them to report.
    async fn stop_all(&mut self) {
        for flag in lock(&self.running).values() {
            flag.store(true, Ordering::Relaxed);
        }
        let drain = async {
            while let Some(done) = self.tasks.join_next().await {
                Self::reap(done);
            }
        };
        if tokio::time::timeout(STOP_GRACE, drain).await.is_err() {
            tracing::warn!(
                tasks = ?lock(&self.running).keys().collect::<Vec<_>>(),
                "tasks did not end within {STOP_GRACE:?} of being killed; leaving them"
            );
        }
    }
}

/// The status of a task whose runner panicked.
fn panicked(task_id: &str, panic: &(dyn std::any::Any + Send)) -> ExecutorStatus {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(task_id, panic = %what, "task runner panicked");
    ExecutorStatus {
        task_id: task_id.to_string(),
        state: TaskState::TaskFailed as i32,
        reason: Reason::ExecutorTerminated as i32,
        message: format!("executor failure while running the task: {what}"),
        ..Default::default()
    }
}

/// The map is only touched in short critical sections that cannot panic midway, so
/// a poisoned lock still holds consistent data.
fn lock(running: &Running) -> MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
    running.lock().unwrap_or_else(PoisonError::into_inner)
}
