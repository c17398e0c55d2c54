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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agora_proto::v1::{ExecutorLaunch, ExecutorStatus, TaskState};

use crate::error::{Error, Result};
use crate::runner::{KillSwitch, Runner};
use agora_executor_link::{
    self as executor_link, panicked, recovery_timeout_from_env, LinkedExecutor, Tasks,
};

/// How long tasks get to end after a kill when the executor is going away. A kill
/// ends a guest within one epoch tick (10 ms), whether it runs wasm or waits in a
/// host call; this bound is only a safety net against a bug of ours.
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
) -> Result<()> {
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
) -> Result<()> {
    let runner = Arc::new(Runner::new(cache_dir)?);
    let mut executor = Executor {
        runner,
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
    result
}

/// A running task's kill switch.
type Kill = KillSwitch;

struct Executor {
    runner: Arc<Runner>,
    link: Tasks<Kill>,
}

impl LinkedExecutor for Executor {
    type Entry = Kill;
    const RUNS: &'static str = "running tasks";

    agora_executor_link::link_field!(link);

    fn launch(&mut self, launch: ExecutorLaunch) {
        let kill = KillSwitch::new();
        if !self.link.admit(&launch, kill.clone()) {
            return;
        }
        let task_id = launch.task_id.clone();
        tracing::info!(task_id = %task_id, module = %launch.module_sha256, "launching task");
        let runner = Arc::clone(&self.runner);
        let outbox = Arc::clone(&self.link.outbox);
        let running = Arc::clone(&self.link.running);
        self.link.set.spawn_blocking(move || {
            let on_running = |instantiate_us| {
                outbox.status(ExecutorStatus {
                    task_id: launch.task_id.clone(),
                    state: TaskState::TaskRunning as i32,
                    instantiate_us,
                    ..Default::default()
                })
            };
            // A panic is a bug of ours, but the agent must still hear about the task.
            let run = std::panic::AssertUnwindSafe(|| runner.run(&launch, &kill, on_running));
            let status = std::panic::catch_unwind(run)
                .unwrap_or_else(|panic| panicked(&launch.task_id, panic.as_ref()));
            // Sent from this thread, after RUNNING, through the same outbox: in order.
            outbox.finish(&running, &launch.task_id, status);
        });
    }

    fn kill(entry: &Self::Entry) {
        entry.kill();
    }

    /// Kills every task and waits (bounded) for all of them to report.
    async fn stop_all(&mut self) {
        for switch in self.link.lock().values() {
            switch.kill();
        }
        self.link.drain(STOP_GRACE, Self::RUNS).await;
    }
}
