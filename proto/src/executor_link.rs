//! The executor side of the agent <-> executor link, shared by every executor
//! process: statuses numbered and held until the agent acknowledges them (so they
//! survive an agent restart), the single writer of the socket, and the recovery
//! timeout the agent hands its executors.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::frame::{read_frame, write_frame, FrameError};
use crate::v1::{
    executor_to_agent, AgentToExecutor, ExecutorMessage, ExecutorRegister, ExecutorStatus,
    ExecutorToAgent,
};

/// Environment variable (milliseconds) the agent sets to say how long an executor
/// waits for it to come back after losing it.
pub const RECOVERY_TIMEOUT_ENV: &str = "AGORA_RECOVERY_TIMEOUT_MS";
/// The wait without that variable.
pub const DEFAULT_RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// The recovery timeout from [`RECOVERY_TIMEOUT_ENV`], else the default.
pub fn recovery_timeout_from_env() -> Duration {
    std::env::var(RECOVERY_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_RECOVERY_TIMEOUT)
}

/// Statuses on their way to the agent, kept until it acknowledges them.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<OutboxInner>,
}

#[derive(Default)]
pub struct OutboxInner {
    seq: u64,
    pending: VecDeque<(u64, ExecutorStatus)>,
    /// The current connection's writer; `None` while the agent is away.
    out: Option<mpsc::UnboundedSender<ExecutorToAgent>>,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, OutboxInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn status(&self, status: ExecutorStatus) {
        let mut inner = self.lock();
        inner.push(status);
    }

    /// A task's end: it leaves the running set and its status is queued in one step,
    /// so a registration (which lists both) never misses it.
    pub fn finish<R>(
        &self,
        running: &Mutex<HashMap<String, R>>,
        task_id: &str,
        status: ExecutorStatus,
    ) {
        let mut inner = self.lock();
        running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(task_id);
        inner.push(status);
    }

    /// The agent has every status up to `seq`.
    pub fn ack(&self, seq: u64) {
        let mut inner = self.lock();
        while inner.pending.front().is_some_and(|(s, _)| *s <= seq) {
            inner.pending.pop_front();
        }
    }

    /// A new connection: the registration first, then the held statuses in order.
    pub fn attach<R>(
        &self,
        out: mpsc::UnboundedSender<ExecutorToAgent>,
        mut register: ExecutorRegister,
        running: &Mutex<HashMap<String, R>>,
        reconnect: bool,
    ) {
        let mut inner = self.lock();
        if reconnect {
            let mut ids: BTreeSet<String> = running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .keys()
                .cloned()
                .collect();
            ids.extend(inner.pending.iter().map(|(_, s)| s.task_id.clone()));
            register.reconnect = true;
            register.task_ids = ids.into_iter().collect();
        }
        let _ = out.send(ExecutorToAgent {
            msg: Some(executor_to_agent::Msg::Register(register)),
            seq: 0,
        });
        for (seq, status) in &inner.pending {
            let _ = out.send(frame(*seq, status.clone()));
        }
        inner.out = Some(out);
    }

    pub fn detach(&self) {
        self.lock().out = None;
    }

    /// A message for the framework: best effort, like MESSAGE itself (dropped while
    /// the agent is away, never resent).
    pub fn message(&self, data: Vec<u8>) {
        let inner = self.lock();
        if let Some(out) = &inner.out {
            let _ = out.send(ExecutorToAgent {
                msg: Some(executor_to_agent::Msg::Message(ExecutorMessage { data })),
                seq: 0,
            });
        }
    }
}

/// The file, at the root of each task's filesystem, that framework messages are
/// appended to: `/messages` as a wasm guest sees it, `./messages` for a native task.
pub const MESSAGES_FILE: &str = "messages";
/// A task's `messages` file grows no larger; messages that would pass it are not
/// delivered to that task (the receipt says so).
pub const MESSAGES_FILE_LIMIT: u64 = 16 << 20;

/// What the built-in executors do with a framework's MESSAGE: append its bytes to
/// `messages` in the root of every task they run (`tasks`: task id and root dir).
/// Returns the receipt the executor sends back to the framework:
/// `delivered N bytes to A,B` (and `; not to C (why)` for failures).
pub fn deliver_message(tasks: &[(String, std::path::PathBuf)], data: &[u8]) -> String {
    use std::io::Write as _;
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (id, root) in tasks {
        let path = root.join(MESSAGES_FILE);
        let result = (|| -> std::io::Result<()> {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if len + data.len() as u64 > MESSAGES_FILE_LIMIT {
                return Err(std::io::Error::other(format!(
                    "its messages file would pass {MESSAGES_FILE_LIMIT} bytes"
                )));
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            f.write_all(data)
        })();
        match result {
            Ok(()) => ok.push(id.clone()),
            Err(e) => failed.push(format!("{id} ({e})")),
        }
    }
    let mut receipt = if ok.is_empty() {
        format!("delivered {} bytes to no task", data.len())
    } else {
        format!("delivered {} bytes to {}", data.len(), ok.join(","))
    };
    if !failed.is_empty() {
        receipt.push_str(&format!("; not to {}", failed.join(", ")));
    }
    receipt
}

impl OutboxInner {
    fn push(&mut self, status: ExecutorStatus) {
        self.seq += 1;
        let seq = self.seq;
        self.pending.push_back((seq, status.clone()));
        if let Some(out) = &self.out {
            // Fails only once the writer has given up on a broken socket; the status
            // stays pending and goes again after a reconnect.
            if out.send(frame(seq, status)).is_err() {
                self.out = None;
            }
        }
    }
}

fn frame(seq: u64, status: ExecutorStatus) -> ExecutorToAgent {
    ExecutorToAgent {
        msg: Some(executor_to_agent::Msg::Status(status)),
        seq,
    }
}

/// The single owner of the socket's write half.
pub async fn write_frames(
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

/// How long an ending executor waits for its writer to flush queued statuses.
pub const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// Frames read from the agent, in order; the last is `Ok(None)` (end) or an error.
pub type AgentFrames = mpsc::Receiver<Result<Option<AgentToExecutor>, FrameError>>;

/// One connection of an executor to its agent: a reader task, a writer task, and the
/// outbox attached to the writer. Every executor kind (wasm, native, function hosts)
/// uses this one.
pub struct AgentConn {
    /// What the agent sends; `select!` on it (it is cancel-safe, `read_frame` is not).
    pub frames: AgentFrames,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl AgentConn {
    /// Starts the reader and writer, registers (naming the tasks in `running`, when
    /// this is a reconnect) and sends the statuses not yet acknowledged.
    pub fn start<R>(
        stream: UnixStream,
        outbox: &Outbox,
        running: &Mutex<HashMap<String, R>>,
        register: ExecutorRegister,
        reconnect: bool,
    ) -> AgentConn {
        let (read_half, write_half) = stream.into_split();
        let (out, out_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_frames(write_half, out_rx));
        outbox.attach(out, register, running, reconnect);
        // `read_frame` is not cancel-safe, so frames are read in a task of their own and
        // handed over through a channel, which a loop can `select!` on safely.
        let (frames_tx, frames) = mpsc::channel(16);
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
        AgentConn {
            frames,
            reader,
            writer,
        }
    }

    /// The agent is gone: statuses from now on wait in the outbox.
    pub fn close(&mut self, outbox: &Outbox) {
        outbox.detach();
        self.reader.abort();
        self.writer.abort();
    }

    /// The executor is ending: lets the writer flush what is queued (bounded).
    pub async fn finish(mut self, outbox: &Outbox) {
        self.reader.abort();
        outbox.detach();
        match tokio::time::timeout(FLUSH_GRACE, &mut self.writer).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_cancelled() => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "frame writer task failed"),
            Err(_) => {
                tracing::warn!("statuses not flushed to the agent within {FLUSH_GRACE:?}");
                self.writer.abort();
            }
        }
    }
}
