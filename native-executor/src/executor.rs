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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agora_proto::v1::{ExecutorLaunch, ExecutorStatus, TaskState};

use crate::error::{Error, Result};
use crate::runner::{kill_grace, KillSwitch, NativeConfig, Runner};
use agora_executor_link::{
    self as executor_link, panicked, recovery_timeout_from_env, LinkedExecutor, Tasks,
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
) -> Result<()> {
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
) -> Result<()> {
    let runner = Arc::new(
        Runner::new(cfg, framework_id, executor_id).map_err(|e| Error::Setup(Box::new(e)))?,
    );
    let mut executor = Executor {
        runner: Arc::clone(&runner),
        link: Tasks::default(),
    };
    let result = executor_link::run(
        &mut executor,
        socket,
        framework_id,
        executor_id,
        recovery_timeout,
    )
    .await
    .map_err(Error::from);
    drop(executor);
    runner.remove_executor_groups();
    result
}

/// A running task's kill switch and grace.
struct Entry {
    kill: Arc<KillSwitch>,
    grace: Duration,
}

struct Executor {
    runner: Arc<Runner>,
    link: Tasks<Entry>,
}

impl LinkedExecutor for Executor {
    type Entry = Entry;
    const RUNS: &'static str = "running tasks";

    agora_executor_link::link_field!(link);

    fn launch(&mut self, launch: ExecutorLaunch) {
        let task_id = launch.task_id.clone();
        let grace = kill_grace(launch.command.as_ref().and_then(|c| c.kill_grace_seconds));
        let kill = match KillSwitch::new() {
            Ok(kill) => Arc::new(kill),
            Err(e) => {
                let why = format!("cannot create the task's kill switch: {e}");
                return self.link.refuse(&task_id, why);
            }
        };
        let entry = Entry {
            kill: Arc::clone(&kill),
            grace,
        };
        if !self.link.admit(&launch, entry) {
            return;
        }

        tracing::info!(
            task_id = %task_id,
            command = %launch.command.as_ref().map(|c| c.value.as_str()).unwrap_or(""),
            "launching task"
        );
        let runner = Arc::clone(&self.runner);
        let outbox = Arc::clone(&self.link.outbox);
        let running = Arc::clone(&self.link.running);
        self.link.set.spawn_blocking(move || {
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
            outbox.finish(&running, &launch.task_id, status);
        });
    }

    fn kill(entry: &Self::Entry) {
        entry.kill.trigger();
    }

    /// Kills every task (each with its own grace) and waits, bounded, for all of them
    /// to report.
    async fn stop_all(&mut self) {
        let longest = {
            let running = self.link.lock();
            for entry in running.values() {
                entry.kill.trigger();
            }
            running.values().map(|e| e.grace).max().unwrap_or_default()
        };
        self.link.drain(longest + STOP_MARGIN, Self::RUNS).await;
    }
}
