//! The executor side of the agent <-> executor link, shared by every executor
//! process: statuses numbered and held until the agent acknowledges them (so they
//! survive an agent restart), the single writer of the socket, and the recovery
//! timeout the agent hands its executors.

pub mod artifacts;
pub mod beneath;
pub mod disk;
pub mod output;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use agora_net::frame::{read_frame, write_frame, FrameError};
use agora_proto::v1::{
    executor_to_agent, AgentToExecutor, ExecutorLaunch, ExecutorMessage, ExecutorRegister,
    ExecutorStatus, ExecutorToAgent, Reason, TaskState,
};

/// Environment variable (milliseconds) the agent sets to say how long an executor
/// waits for it to come back after losing it.
pub const RECOVERY_TIMEOUT_ENV: &str = "AGORA_RECOVERY_TIMEOUT_MS";
/// Environment variable holding the secret the agent gives each executor it starts
/// (hex): the executor sends it in its registration, and the agent refuses a
/// registration without the right one. Never put on a command line (every local
/// user can read those).
pub const SECRET_ENV: &str = "AGORA_EXECUTOR_SECRET";
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

/// Why [`drive`] gave up on the agent.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to the agent at {}: {cause}", socket.display())]
    Connect {
        socket: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("reading a frame from the agent: {0}")]
    BadFrame(FrameError),
    #[error("the agent at {} did not come back within {waited:?}; {stopped} {runs} were stopped", socket.display())]
    AgentGone {
        socket: std::path::PathBuf,
        waited: Duration,
        stopped: usize,
        runs: &'static str,
    },
}

/// How a connection to the agent ended.
pub enum End {
    /// The agent said `shutdown`.
    Shutdown,
    /// The connection closed or broke: the agent went away (maybe to restart).
    Eof,
    /// The agent sent something that is not a frame of ours.
    Bad(FrameError),
}

/// Whether to go on after a message from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The agent said `shutdown`.
    Shutdown,
}

/// Implements [`LinkedExecutor::link`] and [`LinkedExecutor::link_mut`] for an
/// executor that keeps its [`Tasks`] in the field named: `link_field!(link);` inside
/// the `impl LinkedExecutor for ...` block.
#[macro_export]
macro_rules! link_field {
    ($field:ident) => {
        fn link(&self) -> &$crate::Tasks<Self::Entry> {
            &self.$field
        }
        fn link_mut(&mut self) -> &mut $crate::Tasks<Self::Entry> {
            &mut self.$field
        }
    };
}

/// An executor process as [`drive`] runs it: what it does with each message of the
/// agent, the async tasks it runs them in, how it stops them, and what it keeps
/// across connections.
#[allow(async_fn_in_trait)] // used in this workspace only, on one runtime
pub trait LinkedExecutor {
    /// An entry of the running map (the tasks named again after a reconnect).
    type Entry;
    /// The word for what it runs, in logs and errors ("running tasks", "function hosts").
    const RUNS: &'static str;
    /// What it keeps for the link: see [`Tasks`] (and [`link_field!`]).
    fn link(&self) -> &Tasks<Self::Entry>;
    fn link_mut(&mut self) -> &mut Tasks<Self::Entry>;
    /// Starts a task the agent sent.
    fn launch(&mut self, launch: ExecutorLaunch);
    /// Asks a running task to stop (it reports its end itself).
    fn kill(entry: &Self::Entry);
    fn outbox(&self) -> &Outbox {
        &self.link().outbox
    }
    fn running(&self) -> &Mutex<HashMap<String, Self::Entry>> {
        &self.link().running
    }
    fn roots(&mut self) -> &mut HashMap<String, std::path::PathBuf> {
        &mut self.link_mut().roots
    }
    fn tasks(&mut self) -> &mut tokio::task::JoinSet<()> {
        &mut self.link_mut().set
    }
    /// Takes the end of one of `tasks`: they catch their own failures, so one that
    /// failed anyway (a panic) is logged.
    fn reap(done: Result<(), tokio::task::JoinError>) {
        if let Err(e) = done {
            tracing::error!(error = %e, "a task of the executor failed");
        }
    }
    /// Stops (kills) everything it runs, boundedly, reporting each end.
    async fn stop_all(&mut self);
}

/// What every executor keeps beside its runner, for the link: the statuses on their
/// way ([`Outbox`]), what runs (task id -> the executor's handle to stop it), the
/// async tasks running them, and each task's root directory (where framework
/// messages are delivered).
pub struct Tasks<E> {
    pub outbox: Arc<Outbox>,
    /// A task's entry is removed just before its terminal status is sent
    /// ([`Outbox::finish`]), so once the agent has seen that status it may reuse the id.
    pub running: Arc<Mutex<HashMap<String, E>>>,
    /// One async task per task or host, joined to know when they are all gone.
    pub set: tokio::task::JoinSet<()>,
    pub roots: HashMap<String, std::path::PathBuf>,
}

impl<E> Default for Tasks<E> {
    fn default() -> Self {
        Tasks {
            outbox: Arc::default(),
            running: Arc::default(),
            set: tokio::task::JoinSet::new(),
            roots: HashMap::new(),
        }
    }
}

impl<E> Tasks<E> {
    /// The running map. Only touched in short critical sections that cannot panic
    /// midway, so a poisoned lock still holds consistent data.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<String, E>> {
        lock_running(&self.running)
    }

    /// Takes a launch in with the handle that will stop it, or refuses it (no task id,
    /// or one already running here) with a FAILED status (INVALID_TASK) to the agent.
    /// True when taken.
    pub fn admit(&mut self, launch: &ExecutorLaunch, entry: E) -> bool {
        let task_id = &launch.task_id;
        let refusal = if task_id.is_empty() {
            Some("launch without a task id".to_string())
        } else {
            let mut running = self.lock();
            if running.contains_key(task_id) {
                Some(format!(
                    "task {task_id} is already running in this executor"
                ))
            } else {
                running.insert(task_id.clone(), entry);
                None
            }
        };
        if let Some(message) = refusal {
            self.refuse(task_id, message);
            return false;
        }
        if !launch.root_dir.is_empty() {
            self.roots
                .insert(task_id.clone(), std::path::PathBuf::from(&launch.root_dir));
        }
        true
    }

    /// Reports a launch that cannot run as FAILED (INVALID_TASK), saying why.
    pub fn refuse(&self, task_id: &str, message: String) {
        tracing::warn!(task_id = %task_id, "{message}");
        self.outbox.status(ExecutorStatus {
            task_id: task_id.to_string(),
            state: TaskState::TaskFailed as i32,
            reason: Reason::InvalidTask as i32,
            message,
            ..Default::default()
        });
    }

    /// Waits, for at most `bound`, for every async task to end (after they were told
    /// to stop); names those left running when the bound passes.
    pub async fn drain(&mut self, bound: Duration, runs: &str) {
        let set = &mut self.set;
        let drain = async {
            while let Some(done) = set.join_next().await {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a task of the executor failed");
                }
            }
        };
        if tokio::time::timeout(bound, drain).await.is_err() {
            tracing::warn!(
                tasks = ?self.lock().keys().collect::<Vec<_>>(),
                "{runs} did not end within {bound:?} of being killed; leaving them"
            );
        }
    }
}

/// The running map of [`Tasks`], locked (see [`Tasks::lock`]).
pub fn lock_running<E>(running: &Mutex<HashMap<String, E>>) -> MutexGuard<'_, HashMap<String, E>> {
    running.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The status of a task whose runner panicked: a bug of ours, but the agent must
/// still hear how the task ended.
pub fn panicked(task_id: &str, panic: &(dyn std::any::Any + Send)) -> ExecutorStatus {
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

/// Does what one message of the agent asks.
fn handle<E: LinkedExecutor>(executor: &mut E, msg: AgentToExecutor) -> Flow {
    use agora_proto::v1::agent_to_executor::Msg;
    match msg.msg {
        Some(Msg::Launch(launch)) => executor.launch(launch),
        Some(Msg::Kill(kill)) => {
            let running = executor
                .running()
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match running.get(&kill.task_id) {
                Some(entry) => {
                    tracing::info!(task_id = %kill.task_id, "killing task");
                    E::kill(entry);
                }
                None => tracing::warn!(
                    task_id = %kill.task_id,
                    "kill for a task this executor is not running; ignored"
                ),
            }
        }
        Some(Msg::Shutdown(_)) => return Flow::Shutdown,
        Some(Msg::Refused(r)) => {
            tracing::error!(
                "the agent refused this executor: {}; stopping (an executor must be started by the agent it registers with)",
                r.reason
            );
            return Flow::Shutdown;
        }
        Some(Msg::Ack(ack)) => executor.outbox().ack(ack.seq),
        Some(Msg::Message(m)) => {
            let live: std::collections::HashSet<String> = executor
                .running()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .keys()
                .cloned()
                .collect();
            let roots = executor.roots();
            roots.retain(|id, _| live.contains(id));
            let mut tasks: Vec<(String, std::path::PathBuf)> =
                roots.iter().map(|(k, p)| (k.clone(), p.clone())).collect();
            tasks.sort();
            let receipt = deliver_message(&tasks, &m.data);
            tracing::info!("framework message: {receipt}");
            executor.outbox().message(receipt.into_bytes());
        }
        // A message kind from a newer agent: nothing to do with it.
        None => tracing::warn!("frame from the agent carries no known message; ignored"),
    }
    Flow::Continue
}

/// Serves one connection until it ends, reaping the executor's tasks meanwhile.
async fn serve<E: LinkedExecutor>(executor: &mut E, conn: &mut AgentConn) -> End {
    loop {
        tokio::select! {
            frame = conn.frames.recv() => match frame {
                Some(Ok(Some(msg))) => {
                    if handle(executor, msg) == Flow::Shutdown {
                        return End::Shutdown;
                    }
                }
                Some(Ok(None)) | None => return End::Eof,
                // The agent died (kill -9 included): a reset connection, or one cut
                // in the middle of a frame, is the agent going away too.
                Some(Err(FrameError::Io(e))) => {
                    tracing::debug!(error = %e, "connection to the agent failed");
                    return End::Eof;
                }
                Some(Err(FrameError::Truncated)) => return End::Eof,
                Some(Err(e)) => return End::Bad(e),
            },
            Some(done) = executor.tasks().join_next() => E::reap(done),
        }
    }
}

/// Connects to the agent's executor socket, registers as `executor_id` of
/// `framework_id`, and runs the link ([`drive`]) until the agent says `shutdown`.
/// The one start of every executor process.
pub async fn run<E: LinkedExecutor>(
    executor: &mut E,
    socket: &std::path::Path,
    framework_id: &str,
    executor_id: &str,
    recovery_timeout: Duration,
) -> Result<(), LinkError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|cause| LinkError::Connect {
            socket: socket.to_path_buf(),
            cause,
        })?;
    let register = ExecutorRegister {
        framework_id: framework_id.to_string(),
        executor_id: executor_id.to_string(),
        secret: std::env::var(SECRET_ENV).unwrap_or_default(),
        ..Default::default()
    };
    drive(executor, stream, socket, register, recovery_timeout).await
}

/// Runs an executor's link to the agent, first over `stream`, until the agent says
/// `shutdown` (an `Ok` end, after stopping everything). When the agent goes away what
/// runs keeps running while the socket is dialled again for up to `recovery_timeout`;
/// an agent that does not come back, or a malformed frame, stops everything and is an
/// error. The statuses not yet sent are flushed (boundedly) before it returns.
pub async fn drive<E: LinkedExecutor>(
    executor: &mut E,
    stream: UnixStream,
    socket: &std::path::Path,
    register: ExecutorRegister,
    recovery_timeout: Duration,
) -> Result<(), LinkError> {
    let runs = E::RUNS;
    let mut conn = AgentConn::start(
        stream,
        executor.outbox(),
        executor.running(),
        register.clone(),
        false,
    );
    let running = |e: &E| {
        e.running()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    };
    let result = loop {
        match serve(executor, &mut conn).await {
            End::Shutdown => {
                tracing::info!("shutdown requested; stopping the {runs}");
                executor.stop_all().await;
                break Ok(());
            }
            End::Bad(e) => {
                tracing::error!(error = %e, "bad frame from the agent; exiting");
                executor.stop_all().await;
                break Err(LinkError::BadFrame(e));
            }
            End::Eof => {
                tracing::warn!(
                    running = running(executor),
                    "lost the agent; the {runs} keep running while reconnecting for up to {recovery_timeout:?}"
                );
                conn.close(executor.outbox());
                match redial(socket, recovery_timeout, executor.tasks(), E::reap).await {
                    Some(stream) => {
                        tracing::info!("reconnected to the agent");
                        conn = AgentConn::start(
                            stream,
                            executor.outbox(),
                            executor.running(),
                            register.clone(),
                            true,
                        );
                    }
                    None => {
                        let n = running(executor);
                        tracing::error!("the agent did not come back within {recovery_timeout:?}; stopping {n} {runs}");
                        executor.stop_all().await;
                        break Err(LinkError::AgentGone {
                            socket: socket.to_path_buf(),
                            waited: recovery_timeout,
                            stopped: n,
                            runs,
                        });
                    }
                }
            }
        }
    };
    conn.finish(executor.outbox()).await;
    result
}

/// First pause between attempts to reach a restarting agent; it doubles up to
/// [`REDIAL_MAX`].
pub const REDIAL_FIRST: Duration = Duration::from_millis(50);
/// Longest pause between those attempts.
pub const REDIAL_MAX: Duration = Duration::from_millis(250);

/// Dials the agent's socket again, with backoff, until it answers (the stream) or
/// `timeout` passes (`None`). Meanwhile the executor's `tasks` that end are handed to
/// `reap`, so that the executor keeps its bookkeeping while the agent is away.
pub async fn redial(
    socket: &std::path::Path,
    timeout: Duration,
    tasks: &mut tokio::task::JoinSet<()>,
    reap: fn(Result<(), tokio::task::JoinError>),
) -> Option<UnixStream> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = REDIAL_FIRST;
    loop {
        match UnixStream::connect(socket).await {
            Ok(s) => return Some(s),
            Err(e) => tracing::debug!(error = %e, "agent not back yet"),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return None;
        }
        let pause = tokio::time::sleep(backoff.min(deadline - now)); // redial backoff
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                Some(done) = tasks.join_next() => reap(done),
            }
        }
        backoff = (backoff * 2).min(REDIAL_MAX);
    }
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
    /// so a registration (which lists both) never misses it. Logged here, the same
    /// for every executor.
    pub fn finish<R>(
        &self,
        running: &Mutex<HashMap<String, R>>,
        task_id: &str,
        status: ExecutorStatus,
    ) {
        tracing::info!(
            task_id = %task_id,
            state = status.state().short_name(),
            reason = status.reason().short_name(),
            exit_code = ?status.exit_code,
            message = %status.message,
            "task ended"
        );
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
