//! The executor process's main loop: registers with the agent over its Unix socket,
//! runs each launched command on a blocking thread, and reports RUNNING and the
//! terminal status of every task.
//!
//! The structure is wasm-executor's `executor.rs`: frames go out through one writer
//! task per connection that owns the socket's write half, so task threads and the
//! main loop never interleave partial frames and a task's statuses stay in order;
//! frames come in through a reader task (`read_frame` is not cancel-safe); statuses
//! wait in an outbox until the agent acknowledges them. `shutdown` kills every task
//! (each with its own grace) and ends in `Ok`. Losing the agent (socket EOF or reset)
//! does not stop the tasks: the executor reconnects with backoff for up to the
//! recovery timeout, registers again naming the tasks it still knows, and sends the
//! held statuses in order; if the agent does not come back in time it kills its tasks
//! and exits. The plumbing is duplicated rather than shared because the wasm executor
//! keeps it private; a shared `agora_executor_link` module could hold it once both
//! settle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use agora_proto::v1::{ExecutorLaunch, ExecutorRegister, ExecutorStatus, Reason, TaskState};
use anyhow::Context as _;
use tokio::net::UnixStream;
use tokio::task::JoinSet;

use crate::runner::{kill_grace, KillSwitch, NativeConfig, Runner};
use agora_executor_link::{
    self as executor_link, recovery_timeout_from_env, LinkedExecutor, Outbox,
};

/// Time beyond the longest kill grace that tasks get to report after a shutdown.
const STOP_MARGIN: Duration = Duration::from_secs(15);

/// Runs the executor until the agent says `shutdown` (an `Ok` end, after killing the
/// running tasks). Losing the agent does not end it (see the module docs); an agent
/// that does not come back within the recovery timeout ([`agora_executor_link::RECOVERY_TIMEOUT_ENV`]) is
/// an error, after the tasks were killed. Failing to set up isolation as configured
/// (cgroups forced where unusable), a failed first connection or a malformed frame is
/// an error too: the agent then sees the executor die.
pub async fn run_executor(
    socket: &Path,
    framework_id: &str,
    executor_id: &str,
    cfg: NativeConfig,
) -> anyhow::Result<()> {
    run_executor_with(
        socket,
        framework_id,
        executor_id,
        cfg,
        recovery_timeout_from_env(),
    )
    .await
}

/// [`run_executor`] with the recovery timeout given.
pub async fn run_executor_with(
    socket: &Path,
    framework_id: &str,
    executor_id: &str,
    cfg: NativeConfig,
    recovery_timeout: Duration,
) -> anyhow::Result<()> {
    let runner = Arc::new(
        Runner::new(cfg, framework_id, executor_id).context("cannot set up task isolation")?,
    );
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the agent at {}", socket.display()))?;
    let register = ExecutorRegister {
        framework_id: framework_id.to_string(),
        executor_id: executor_id.to_string(),
        ..Default::default()
    };
    let mut executor = Executor {
        runner: Arc::clone(&runner),
        outbox: Arc::default(),
        running: Arc::default(),
        tasks: JoinSet::new(),
        roots: HashMap::new(),
    };
    let result = executor_link::drive(&mut executor, stream, socket, register, recovery_timeout)
        .await
        .map_err(anyhow::Error::from);
    drop(executor);
    runner.remove_executor_groups();
    result
}

/// A running task's kill switch and grace.
struct Entry {
    kill: Arc<KillSwitch>,
    grace: Duration,
}

/// Running tasks by id. A task's thread removes its entry just before it sends its
/// terminal status, so once the agent has seen that status it may reuse the id.
type Running = Arc<Mutex<HashMap<String, Entry>>>;

struct Executor {
    runner: Arc<Runner>,
    outbox: Arc<Outbox>,
    running: Running,
    tasks: JoinSet<()>,
    /// Root directory of each task launched (pruned to the running ones), where
    /// framework messages are delivered.
    roots: HashMap<String, PathBuf>,
}

impl Executor {}

impl LinkedExecutor for Executor {
    type Entry = Entry;
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
        let grace = kill_grace(launch.command.as_ref().and_then(|c| c.kill_grace_seconds));
        let refusal = if task_id.is_empty() {
            Some("launch without a task id".to_string())
        } else {
            match KillSwitch::new() {
                Err(e) => Some(format!("cannot create the task's kill switch: {e}")),
                Ok(kill) => {
                    let mut running = lock(&self.running);
                    if running.contains_key(&task_id) {
                        Some(format!(
                            "task {task_id} is already running in this executor"
                        ))
                    } else {
                        running.insert(
                            task_id.clone(),
                            Entry {
                                kill: Arc::new(kill),
                                grace,
                            },
                        );
                        None
                    }
                }
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
        let kill = Arc::clone(&lock(&self.running)[&task_id].kill);

        tracing::info!(
            task_id = %task_id,
            command = %launch.command.as_ref().map(|c| c.value.as_str()).unwrap_or(""),
            "launching task"
        );
        let runner = Arc::clone(&self.runner);
        let outbox = Arc::clone(&self.outbox);
        let running = Arc::clone(&self.running);
        self.tasks.spawn_blocking(move || {
            let on_running = || {
                outbox.status(ExecutorStatus {
                    task_id: launch.task_id.clone(),
                    state: TaskState::TaskRunning as i32,
                    ..Default::default()
                })
            };
            let run = std::panic::AssertUnwindSafe(|| runner.run(&launch, &kill, on_running));
            let status = std::panic::catch_unwind(run)
                .unwrap_or_else(|panic| panicked(&launch.task_id, panic.as_ref()));
            tracing::info!(
                task_id = %launch.task_id,
                state = status.state().short_name(),
                reason = status.reason().short_name(),
                exit_code = ?status.exit_code,
                message = %status.message,
                "task ended"
            );
            outbox.finish(&running, &launch.task_id, status);
        });
    }

    fn kill(entry: &Self::Entry) {
        entry.kill.trigger();
    }

    fn tasks(&mut self) -> &mut JoinSet<()> {
        &mut self.tasks
    }

    /// Kills every task (each with its own grace) and waits, bounded, for all of them
    /// to report.
    async fn stop_all(&mut self) {
        let longest = {
            let running = lock(&self.running);
            for entry in running.values() {
                entry.kill.trigger();
            }
            running.values().map(|e| e.grace).max().unwrap_or_default()
        };
        let bound = longest + STOP_MARGIN;
        let drain = async {
            while let Some(done) = self.tasks.join_next().await {
                Self::reap(done);
            }
        };
        if tokio::time::timeout(bound, drain).await.is_err() {
            tracing::warn!(
                tasks = ?lock(&self.running).keys().collect::<Vec<_>>(),
                "tasks did not end within {bound:?} of being killed; leaving them"
            );
        }
    }
}

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

fn lock(running: &Running) -> MutexGuard<'_, HashMap<String, Entry>> {
    running.lock().unwrap_or_else(PoisonError::into_inner)
}
