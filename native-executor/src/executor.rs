//! The executor process's main loop: registers with the agent over its Unix socket,
//! runs each launched command on a blocking thread, and reports RUNNING and the
//! terminal status of every task.
//!
//! The structure is wasm-executor's `executor.rs`: frames go out through one writer
//! task that owns the socket's write half, so task threads and the main loop never
//! interleave partial frames and a task's statuses stay in order; frames come in
//! through a reader task (`read_frame` is not cancel-safe); `shutdown` and EOF both
//! kill every task (each with its own grace) and end in `Ok`. The frame plumbing is
//! duplicated rather than shared because the wasm executor keeps it private; a shared
//! `agora_proto::executor` module could hold it once both settle.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use agora_proto::frame::{read_frame, write_frame, FrameError};
use agora_proto::v1::{
    agent_to_executor, executor_to_agent, AgentToExecutor, ExecutorLaunch, ExecutorRegister,
    ExecutorStatus, ExecutorToAgent, Reason, TaskState,
};
use anyhow::Context as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::runner::{kill_grace, KillSwitch, NativeConfig, Runner};

/// Time beyond the longest kill grace that tasks get to report after a shutdown.
const STOP_MARGIN: Duration = Duration::from_secs(15);
/// How long queued statuses get to reach the agent before the executor returns.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// Runs the executor until the agent says `shutdown` or goes away (socket EOF), both
/// of which end in `Ok` after killing the running tasks. Failing to set up isolation
/// as configured (cgroups forced where unusable), a failed connection or a malformed
/// frame is an error: the agent then sees the executor die.
pub async fn run_executor(
    socket: &Path,
    framework_id: &str,
    executor_id: &str,
    cfg: NativeConfig,
) -> anyhow::Result<()> {
    let runner = Arc::new(
        Runner::new(cfg, framework_id, executor_id).context("cannot set up task isolation")?,
    );
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the agent at {}", socket.display()))?;
    let (read_half, write_half) = stream.into_split();

    let (out, out_rx) = mpsc::unbounded_channel();
    let mut writer = tokio::spawn(write_frames(write_half, out_rx));
    send(
        &out,
        executor_to_agent::Msg::Register(ExecutorRegister {
            framework_id: framework_id.to_string(),
            executor_id: executor_id.to_string(),
        }),
    );

    let (frames_tx, mut frames) = mpsc::channel(16);
    let reader = tokio::spawn(async move {
        let mut read_half = read_half;
        loop {
            let frame = read_frame::<_, AgentToExecutor>(&mut read_half).await;
            let last = !matches!(frame, Ok(Some(_)));
            if frames_tx.send(frame).await.is_err() || last {
                break;
            }
        }
    });

    let mut executor = Executor {
        runner: Arc::clone(&runner),
        out,
        running: Arc::default(),
        tasks: JoinSet::new(),
    };
    let result = loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(Some(msg))) => {
                    if executor.handle(msg) == Flow::Shutdown {
                        tracing::info!("shutdown requested; killing tasks");
                        executor.stop_all().await;
                        break Ok(());
                    }
                }
                Some(Ok(None)) | None => {
                    tracing::info!("the agent closed the connection; killing tasks");
                    executor.stop_all().await;
                    break Ok(());
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "bad frame from the agent; exiting");
                    executor.stop_all().await;
                    break Err(frame_error(e));
                }
            },
            Some(done) = executor.tasks.join_next() => reap(done),
        }
    };

    reader.abort();
    drop(executor);
    match tokio::time::timeout(FLUSH_GRACE, &mut writer).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "frame writer task failed"),
        Err(_) => {
            tracing::warn!("statuses not flushed to the agent within {FLUSH_GRACE:?}");
            writer.abort();
        }
    }
    runner.remove_executor_groups();
    result
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Shutdown,
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
    out: mpsc::UnboundedSender<ExecutorToAgent>,
    running: Running,
    tasks: JoinSet<()>,
}

impl Executor {
    fn handle(&mut self, msg: AgentToExecutor) -> Flow {
        match msg.msg {
            Some(agent_to_executor::Msg::Launch(launch)) => self.launch(launch),
            Some(agent_to_executor::Msg::Kill(kill)) => {
                match lock(&self.running).get(&kill.task_id) {
                    Some(entry) => {
                        tracing::info!(task_id = %kill.task_id, grace = ?entry.grace, "killing task");
                        entry.kill.trigger();
                    }
                    None => tracing::warn!(
                        task_id = %kill.task_id,
                        "kill for a task this executor is not running; ignored"
                    ),
                }
            }
            Some(agent_to_executor::Msg::Shutdown(_)) => return Flow::Shutdown,
            None => tracing::warn!("frame from the agent carries no known message; ignored"),
        }
        Flow::Continue
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
            send_status(
                &self.out,
                ExecutorStatus {
                    task_id,
                    state: TaskState::TaskFailed as i32,
                    reason: Reason::InvalidTask as i32,
                    message,
                    ..Default::default()
                },
            );
            return;
        }
        let kill = Arc::clone(&lock(&self.running)[&task_id].kill);

        tracing::info!(
            task_id = %task_id,
            command = %launch.command.as_ref().map(|c| c.value.as_str()).unwrap_or(""),
            "launching task"
        );
        let runner = Arc::clone(&self.runner);
        let out = self.out.clone();
        let running = Arc::clone(&self.running);
        self.tasks.spawn_blocking(move || {
            let on_running = || {
                send_status(
                    &out,
                    ExecutorStatus {
                        task_id: launch.task_id.clone(),
                        state: TaskState::TaskRunning as i32,
                        ..Default::default()
                    },
                )
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
            lock(&running).remove(&launch.task_id);
            send_status(&out, status);
        });
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
                reap(done);
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

fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "task thread failed");
    }
}

fn lock(running: &Running) -> MutexGuard<'_, HashMap<String, Entry>> {
    running.lock().unwrap_or_else(PoisonError::into_inner)
}

fn send(out: &mpsc::UnboundedSender<ExecutorToAgent>, msg: executor_to_agent::Msg) {
    let _ = out.send(ExecutorToAgent { msg: Some(msg) });
}

fn send_status(out: &mpsc::UnboundedSender<ExecutorToAgent>, status: ExecutorStatus) {
    send(out, executor_to_agent::Msg::Status(status));
}

async fn write_frames(
    mut socket: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<ExecutorToAgent>,
) {
    while let Some(msg) = queue.recv().await {
        if let Err(e) = write_frame(&mut socket, &msg).await {
            tracing::warn!(error = %e, "cannot write to the agent; dropping further messages");
            return;
        }
    }
    let _ = socket.shutdown().await;
}

fn frame_error(e: FrameError) -> anyhow::Error {
    anyhow::Error::new(e).context("reading a frame from the agent")
}
