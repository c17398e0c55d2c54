//! The agent's I/O shell: the QUIC link to the master (with reconnects and
//! heartbeats), the Unix socket executors connect to, executor processes, artifact
//! fetching, sandboxes and the checkpoint. Decisions live in `core`.
//!
//! Restarts: every change the core makes to its durable state is written to
//! `<work>/checkpoint.redb` before the outputs of the same input are carried out.
//! Executor processes survive the agent (their own session, their own cgroup, files
//! for stdout/stderr): a restarted agent rebuilds its core from the checkpoint, spares
//! the cgroups of executors still alive, watches those processes (pidfd; they are no
//! longer its children), waits for them to reconnect to the socket, and registers
//! with the master only once every recorded executor has re-attached, died or missed
//! the recovery deadline. A stop (`AgentHandle::stop`, SIGTERM) leaves executors and
//! tasks running for the next start to re-attach; a drain (`AgentHandle::drain`)
//! ends them first.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_executor_link::{RECOVERY_TIMEOUT_ENV, SECRET_ENV};
use agora_net::tls::{self, Identity};
use agora_net::{read_frame, transfer, write_frame, Monotonic};
use agora_proto::v1::{
    self, executor_to_agent, master_to_agent, stream_open, AgentToExecutor, AgentToMaster,
    ArtifactGet, ArtifactHeader, MasterToAgent, SandboxData, SandboxRead, StreamOpen, TaskInfo,
};
use tokio::sync::mpsc;

use crate::checkpoint::{Checkpoint, Writer};
use crate::error::{Error, Result};
use agora_agent_core::{
    artifact_path, AgentCore, AgentCoreConfig, ExecutorKey, ExecutorKind, ExecutorProcess, Input,
    Output, TaskKey,
};
use agora_native_executor::isolation::escape_component;
use agora_native_executor::{CgroupLimits, CgroupVersion, Group, IsolationMode, Isolator};
use agora_proto::Resources;

const MASTER_QUEUE: usize = 8192;
/// Framework messages waiting for one executor: past this they are dropped (as in
/// Mesos, framework messages are best-effort), so a framework cannot grow the agent's
/// memory through an executor that does not read. Launches, kills, acknowledgements
/// and shutdowns have a lane of their own that never drops (see `ExecutorTx`).
const EXECUTOR_MESSAGE_QUEUE: usize = 4096;
/// How long a drain waits for executors to end after asking them to.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a drain waits for the executors it had to kill to be reaped.
const KILLED_EXIT_GRACE: Duration = Duration::from_secs(5);
/// How long a drain then waits for the master to acknowledge the tasks' endings.
const DRAIN_REPORT_GRACE: Duration = Duration::from_secs(5);

pub struct AgentConfig {
    /// Every master of the group (one for a single master); the agent registers with
    /// whichever leads.
    pub masters: Vec<SocketAddr>,
    pub identity: Identity,
    pub core: AgentCoreConfig,
    /// Program and leading arguments that start a wasm executor; the shell appends
    /// `--socket S --framework-id F --executor-id E --cache-dir D`.
    pub executor_command: Vec<OsString>,
    /// Program and leading arguments that start a native executor; the shell appends
    /// `--socket S --framework-id F --executor-id E --cgroup-root R [--isolation M]
    /// --pids-max N [--no-cfs-quota]`.
    pub native_executor_command: Vec<OsString>,
    /// Program and leading arguments that start a function host executor; the shell
    /// appends `--socket S --framework-id F --executor-id E --cache-dir D`.
    pub function_executor_command: Vec<OsString>,
    pub isolation: IsolationSettings,
    pub gc: crate::gc::GcPolicy,
    /// Where to serve `/fn/NAME/...` over HTTP; `None`: nowhere.
    pub http: Option<crate::http::HttpSettings>,
    /// What a start does when the work directory's agent offered other resources or
    /// attributes before (see `crate::identity`).
    pub identity_policy: IdentityPolicy,
}

/// What a start does about the identity recorded in the work directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityPolicy {
    /// Keep it; refuse to start if what the agent offers changed (`agora agent`).
    Keep,
    /// Start as a new agent when what it offers changed and nothing is recorded as
    /// running there (`agora dev`, whose agent drains when stopped); refuse while
    /// something is.
    RenewIfChangedAndIdle,
    /// Start as a new agent (`agora agent --new-identity`), refused while anything
    /// is recorded as running there.
    Renew,
}

/// How tasks and executors are isolated on this agent.
#[derive(Debug, Clone)]
pub struct IsolationSettings {
    /// cgroups or posix; `None` detects.
    pub mode: Option<IsolationMode>,
    /// pids limit of each native task.
    pub pids_max: u64,
    /// Cap CPU with a CFS quota as well as weighing it with shares.
    pub cfs_quota: bool,
    /// The user native tasks run as when neither the task nor its framework names one.
    pub task_user: String,
    /// Native tasks may run as root when their framework asks for it.
    pub allow_root_tasks: bool,
    /// The most files and directories one task's sandbox may hold; 0: no limit.
    pub max_files_per_task: u64,
    /// Each native executor (one framework's tasks) has a PID namespace, and each
    /// native task that namespace's /proc.
    pub pid_namespace: bool,
}

/// Files and directories a task's sandbox may hold unless the agent says otherwise.
pub const DEFAULT_MAX_FILES_PER_TASK: u64 = 10_000;

impl Default for IsolationSettings {
    fn default() -> Self {
        Self {
            mode: None,
            pids_max: 1024,
            cfs_quota: true,
            task_user: agora_native_executor::runner::DEFAULT_TASK_USER.to_string(),
            allow_root_tasks: false,
            max_files_per_task: DEFAULT_MAX_FILES_PER_TASK,
            pid_namespace: true,
        }
    }
}

/// Memory an executor process needs beyond its tasks' (runtime, compiled code).
const WASM_EXECUTOR_OVERHEAD: i64 = 64 << 20;
const NATIVE_EXECUTOR_OVERHEAD: i64 = 32 << 20;
/// A function host also keeps up to 1 MiB of each instance slot it used resident
/// between requests (faster instantiation) and runs an HTTP server.
const FUNCTION_EXECUTOR_OVERHEAD: i64 = 128 << 20;

struct Shared {
    core: AgentCore,
    /// Times every timeout of the core (retries, idle executors, recovery).
    clock: Monotonic,
    master_tx: Option<mpsc::Sender<AgentToMaster>>,
    master_conn: Option<quinn::Connection>,
    executors: HashMap<ExecutorKey, ExecutorTx>,
    /// The process of each executor: a child, or one adopted after a restart.
    children: HashMap<ExecutorKey, u32>,
    /// Executors whose process has ended but whose end the core has not been told
    /// yet (their cgroup is being emptied): a drain waits for these too, so that
    /// the checkpoint it leaves no longer records them.
    exiting: usize,
    /// Each executor process's group, sized to the sum of its live tasks.
    groups: HashMap<ExecutorKey, Arc<Group>>,
    /// The size last applied to each group.
    sized: HashMap<ExecutorKey, Resources>,
    /// The agent is stopping: an executor that registers now is told to shut down
    /// at once (it was starting when the others were asked).
    shutting_down: bool,
}

#[derive(Clone)]
struct Agent {
    shared: Arc<Mutex<Shared>>,
    cfg: Arc<AgentConfig>,
    isolator: Arc<Isolator>,
    socket: PathBuf,
    /// The key each executor's secret is derived from (`executor_secret`); kept in
    /// `<work>/run/executor.key`, so that executors re-attach after a restart.
    link_key: Arc<[u8; 32]>,
    fetch_locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    checkpoint: Arc<Writer>,
    /// Set once no executor from the checkpoint is awaited any more.
    recovered: Arc<tokio::sync::watch::Sender<bool>>,
    /// The function hosts the HTTP server routes to, kept in step with the core.
    routes: Arc<crate::http::Routes>,
}

pub struct AgentHandle {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    agent: Agent,
    shared: Arc<Mutex<Shared>>,
    checkpoint: Arc<Writer>,
    http_addr: Option<SocketAddr>,
}

/// The agent's side of one executor's link: two lanes to its writer. What the core
/// sends (launches, kills, acknowledgements, shutdowns) is never dropped: its lane is
/// unbounded, and bounded in practice by the core, which sends one launch and one kill
/// per task it holds and one acknowledgement per status it checkpointed. Frameworks'
/// messages, which a framework can send at will, wait in a bounded lane and are
/// dropped, with a warning, when the executor does not read them.
#[derive(Clone)]
struct ExecutorTx {
    executor: String,
    control: mpsc::UnboundedSender<AgentToExecutor>,
    messages: mpsc::Sender<AgentToExecutor>,
    /// Framework messages dropped since the last one queued (logged once a flood).
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// The writer's side of [`ExecutorTx`].
struct ExecutorLanes {
    control: mpsc::UnboundedReceiver<AgentToExecutor>,
    messages: mpsc::Receiver<AgentToExecutor>,
}

impl ExecutorTx {
    fn new(executor: String) -> (ExecutorTx, ExecutorLanes) {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (messages, messages_rx) = mpsc::channel(EXECUTOR_MESSAGE_QUEUE);
        (
            ExecutorTx {
                executor,
                control,
                messages,
                dropped: Arc::default(),
            },
            ExecutorLanes {
                control: control_rx,
                messages: messages_rx,
            },
        )
    }

    /// Queues `m` for the executor; false when its link is gone (or, for a
    /// framework's message, when the executor has left too many unread).
    fn send(&self, m: AgentToExecutor) -> bool {
        if matches!(m.msg, Some(v1::agent_to_executor::Msg::Message(_))) {
            use std::sync::atomic::Ordering::Relaxed;
            match self.messages.try_send(m) {
                Ok(()) => {
                    let dropped = self.dropped.swap(0, Relaxed);
                    if dropped > 0 {
                        tracing::info!(executor = %self.executor, "the executor reads again; {dropped} framework messages were dropped meanwhile");
                    }
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if self.dropped.fetch_add(1, Relaxed) == 0 {
                        tracing::warn!(
                            executor = %self.executor,
                            "framework messages are being dropped: the executor has {EXECUTOR_MESSAGE_QUEUE} unread (framework messages are best-effort; logged once until it reads again)"
                        );
                    }
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        } else {
            self.control.send(m).is_ok()
        }
    }
}

impl ExecutorLanes {
    /// Writes what is queued, the core's lane first, in batches, until the link
    /// fails or every sender is gone.
    async fn write_to<W: tokio::io::AsyncWrite + Unpin>(&mut self, w: &mut W) {
        loop {
            let written = tokio::select! {
                biased;
                Some(m) = self.control.recv() => {
                    let mut batch = agora_net::FrameBatch::new();
                    let mut pushed = batch.push(&m);
                    while pushed.is_ok() && !batch.is_full() {
                        match self.control.try_recv() {
                            Ok(m) => pushed = batch.push(&m),
                            Err(_) => break,
                        }
                    }
                    match pushed {
                        Ok(()) => batch.write_to(w).await,
                        Err(e) => Err(e),
                    }
                }
                Some(m) = self.messages.recv() => agora_net::write_queued(w, m, &mut self.messages).await,
                else => return,
            };
            if written.is_err() {
                return;
            }
        }
    }
}

fn executor_shutdown() -> AgentToExecutor {
    AgentToExecutor {
        msg: Some(v1::agent_to_executor::Msg::Shutdown(
            v1::ExecutorShutdown {},
        )),
    }
}

impl AgentHandle {
    /// Stops the agent process's work and leaves executors and tasks running (what
    /// `agora agent` does on SIGTERM or Ctrl-C, like `kill -9` but tidy): the master
    /// is told at once (its connection is closed, so the agent shows disconnected
    /// rather than waiting for the agent timeout), the checkpoint is synced, and the
    /// executors, which outlive the agent, wait up to their recovery timeout for an
    /// agent started again on the same work directory to re-attach.
    pub async fn stop(self) {
        let executors = self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .children
            .len();
        self.close("agent stopped; its tasks keep running until it is back");
        if executors > 0 {
            tracing::info!(
                "stopped; {executors} executors keep running their tasks until the agent is started again on this work directory"
            );
        }
    }

    /// Stops the agent with its tasks (`agora agent --drain-on-stop`, a dev cluster
    /// stopping): every task is killed and reported KILLED with reason AGENT_DRAINED,
    /// executors get `SHUTDOWN_GRACE` to end (those left are killed), and their last
    /// updates get a few seconds to reach the master (those that do not are kept in
    /// the checkpoint and sent by the next start).
    pub async fn drain(self) {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shutting_down = true;
        self.agent.feed(Input::Drain);
        let all_gone = || {
            let s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            s.children.is_empty() && s.exiting == 0
        };
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while Instant::now() < deadline && !all_gone() {
            tokio::time::sleep(Duration::from_millis(20)).await; // poll for the executors' exits
        }
        let pids: Vec<u32> = self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .children
            .values()
            .copied()
            .collect();
        for pid in &pids {
            tracing::warn!(pid, "executor did not shut down in time; killing it");
            // SAFETY: plain kill(2) of an executor process of ours.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        // Their ends recorded (the checkpoint forgets them), so that the next start
        // finds no executor it would lose track of.
        let deadline = Instant::now() + KILLED_EXIT_GRACE;
        while Instant::now() < deadline && !all_gone() {
            tokio::time::sleep(Duration::from_millis(20)).await; // poll for the killed executors' exits
        }
        // The tasks' endings reach the master, if it is there to hear them.
        let deadline = Instant::now() + DRAIN_REPORT_GRACE;
        loop {
            let (pending, connected) = {
                let s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
                (s.core.unacknowledged_updates(), s.master_conn.is_some())
            };
            if pending == 0 || !connected || Instant::now() >= deadline {
                if pending > 0 {
                    tracing::warn!(
                        "{pending} task updates not acknowledged by the master; the next start of this agent sends them"
                    );
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // poll for the master's acknowledgements
        }
        self.close("agent drained and stopped");
    }

    /// Ends the agent's own work: closes the master's connection with `why`, stops
    /// every loop, syncs the checkpoint. Executors are left as they are.
    fn close(self, why: &str) {
        // The loops first, so that the master loop does not take our own close for a
        // broken link.
        for t in &self.tasks {
            t.abort();
        }
        if let Some(c) = self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .master_conn
            .take()
        {
            c.close(0u32.into(), why.as_bytes());
        }
        if let Err(e) = self.checkpoint.sync() {
            tracing::warn!("cannot sync the checkpoint: {e:#}");
        }
    }

    /// The address the HTTP server (`/fn/NAME/...`) is bound to, if it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// What the agent offers (with the disk it found when none was given).
    pub fn resources(&self) -> agora_proto::Resources {
        self.agent.cfg.core.resources.clone()
    }

    pub fn agent_id(&self) -> Option<String> {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .core
            .agent_id()
            .map(str::to_string)
    }
}

pub async fn start(mut cfg: AgentConfig) -> Result<AgentHandle> {
    let work = cfg.core.work_dir.clone();
    // The work directory may be crossed by tasks' users (to reach their own
    // sandboxes where no private mount namespace hides the rest), not listed; what
    // only the agent and its executors use is closed to everyone else.
    let modes = [
        ("", 0o711),
        ("sandboxes", 0o711),
        ("artifacts", 0o700),
        ("executors", 0o700),
        ("compiled", 0o700),
        ("run", 0o700),
    ];
    for (d, mode) in modes {
        let path = work.join(d);
        create_dir_mode(&path, mode).map_err(|cause| Error::WorkDir {
            what: "create",
            path,
            cause,
        })?;
    }
    // One cgroup root per agent work dir, stable across restarts so that leftovers
    // of a crashed agent are found.
    let canonical = std::fs::canonicalize(&work).unwrap_or_else(|_| work.clone());
    // Sandbox paths are handed to executors, which hide the work directory from
    // tasks by its path: one absolute spelling everywhere.
    cfg.core.work_dir = canonical.clone();
    let work = canonical.clone();
    let slug = &agora_proto::sha256_hex(canonical.to_string_lossy().as_bytes())[..12];
    let isolator = Isolator::new(cfg.isolation.mode, &format!("agora/agent-{slug}"))
        .map_err(Error::Isolation)?;
    // What an earlier run of this agent left: the checkpoint says which executors may
    // still run (their cgroups are spared); everything else under our root goes.
    let mut checkpoint = Checkpoint::open(&work)?;
    let mut state = checkpoint.load()?;
    let id_err = |cause| Error::WorkDir {
        what: "read or write",
        path: crate::identity::path(&work),
        cause,
    };
    let offered = crate::identity::Offered::new(&cfg.core.resources, &cfg.core.attributes);
    let recorded = crate::identity::read(&work).map_err(id_err)?;
    let changes = match (&recorded, &state.agent_id) {
        (Some(r), Some(_)) => crate::identity::changes(&r.offered, &offered),
        _ => Vec::new(),
    };
    let renew = match cfg.identity_policy {
        IdentityPolicy::Renew => true,
        IdentityPolicy::RenewIfChangedAndIdle => !changes.is_empty(),
        IdentityPolicy::Keep if changes.is_empty() => false,
        IdentityPolicy::Keep => {
            return Err(Error::IdentityChanged {
                agent_id: state.agent_id.clone().unwrap_or_default(),
                changes: changes.join("; "),
                work,
            })
        }
    };
    let nonce = match recorded {
        Some(r) if !renew => r.nonce,
        _ => {
            if renew && (!state.tasks.is_empty() || !state.executors.is_empty()) {
                return Err(Error::IdentityBusy {
                    agent_id: state.agent_id.clone().unwrap_or_default(),
                    tasks: state.tasks.len(),
                    executors: state.executors.len(),
                    work,
                });
            }
            if renew && state.agent_id.is_some() {
                tracing::warn!(
                    old_agent = state.agent_id.as_deref().unwrap_or(""),
                    "starting as a new agent{}",
                    if changes.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", changes.join("; "))
                    }
                );
                let path = checkpoint.path().to_path_buf();
                drop(checkpoint);
                std::fs::remove_file(&path).map_err(|cause| Error::WorkDir {
                    what: "remove",
                    path,
                    cause,
                })?;
                checkpoint = Checkpoint::open(&work)?;
                state = checkpoint.load()?;
            }
            crate::identity::new_nonce().map_err(id_err)?
        }
    };
    crate::identity::write(
        &work,
        &crate::identity::Identity {
            nonce: nonce.clone(),
            offered,
        },
    )
    .map_err(id_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(checkpoint.path(), std::fs::Permissions::from_mode(0o600));
    }
    let (n_tasks, n_execs) = (state.tasks.len(), state.executors.len());
    let clock = Monotonic::new();
    let (mut core, adopt) = AgentCore::recover(cfg.core.clone(), state, clock.read());
    core.set_identity_nonce(nonce);
    // Bound before registering, so the master learns the address in the hello.
    let http_listener = match &cfg.http {
        Some(h) => {
            let bound = match tokio::net::TcpListener::bind(h.bind).await {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && h.any_port_if_taken => {
                    let any = SocketAddr::new(h.bind.ip(), 0);
                    let l = tokio::net::TcpListener::bind(any).await;
                    if let Ok(l) = &l {
                        tracing::warn!(
                            "port {} is taken (another agent on this machine?); serving functions on {} instead (choose with --http)",
                            h.bind.port(),
                            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
                        );
                    }
                    l
                }
                other => other,
            };
            let listener = bound.map_err(|cause| Error::HttpBind {
                addr: h.bind,
                cause,
            })?;
            let bound = listener.local_addr()?;
            let advertised = crate::http::advertised_address(
                bound,
                &cfg.core.hostname,
                h.advertise.as_deref(),
                h.tls.is_some(),
            );
            if h.tls.is_some() {
                tracing::info!(%bound, %advertised, "serving /fn/NAME/... over HTTPS only");
            } else {
                tracing::info!(%bound, %advertised, "serving /fn/NAME/... over HTTP");
            }
            core.set_http_address(advertised);
            Some((listener, bound))
        }
        None => None,
    };
    if n_tasks + n_execs > 0 {
        tracing::info!(
            tasks = n_tasks,
            executors = n_execs,
            agent = core.agent_id().unwrap_or(""),
            "recovering from the checkpoint in {}",
            checkpoint.path().display()
        );
    }
    let checkpoint = Arc::new(Writer::new(checkpoint));
    let keep: BTreeSet<String> = adopt
        .iter()
        .filter_map(|o| match o {
            Output::AdoptExecutor { key, process }
                if process.as_ref().is_none_or(process_alive) =>
            {
                Some(group_name(key))
            }
            _ => None,
        })
        .collect();
    let cleaned = if keep.is_empty() {
        isolator.cleanup_leftovers()
    } else {
        Ok(cleanup_except(&isolator, &keep))
    };
    match cleaned {
        Ok(0) => {}
        Ok(n) => tracing::warn!("removed {n} cgroups left behind by an earlier run of this agent"),
        Err(e) => tracing::warn!("cannot clean leftover cgroups: {e}"),
    }
    let link_key = executor_link_key(&work.join("run"))?;
    let socket = work.join("run").join("agent.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket).map_err(|cause| Error::WorkDir {
        what: "listen on",
        path: socket.clone(),
        cause,
    })?;
    let (recovered, _) = tokio::sync::watch::channel(!core.recovering());
    let shared = Arc::new(Mutex::new(Shared {
        core,
        clock,
        master_tx: None,
        master_conn: None,
        executors: HashMap::new(),
        children: HashMap::new(),
        exiting: 0,
        groups: HashMap::new(),
        sized: HashMap::new(),
        shutting_down: false,
    }));
    let agent = Agent {
        shared: shared.clone(),
        cfg: Arc::new(cfg),
        isolator: Arc::new(isolator),
        socket,
        link_key: Arc::new(link_key),
        fetch_locks: Default::default(),
        checkpoint: checkpoint.clone(),
        recovered: Arc::new(recovered),
        routes: Arc::default(),
    };
    // Find the executors of the earlier run (before anything can feed the core).
    agent.dispatch(adopt);
    let mut tasks = Vec::new();
    let http_addr = http_listener.as_ref().map(|(_, bound)| *bound);
    if let Some((listener, _)) = http_listener {
        let routes = Arc::clone(&agent.routes);
        let tls = agent.cfg.http.as_ref().and_then(|h| h.tls.clone());
        tasks.push(tokio::spawn(crate::http::serve(listener, routes, tls)));
    }
    {
        let a = agent.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let a = a.clone();
                        tokio::spawn(async move { a.serve_executor(stream).await });
                    }
                    Err(e) => tracing::warn!("executor socket accept failed: {e}"),
                }
            }
        }));
    }
    {
        let a = agent.clone();
        tasks.push(tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(200));
            loop {
                iv.tick().await;
                a.feed(Input::Tick);
                // What need not be durable still reaches the file while idle.
                if let Err(e) = a.checkpoint.flush() {
                    tracing::warn!("cannot write the checkpoint: {e:#}");
                }
            }
        }));
    }
    {
        let a = agent.clone();
        tasks.push(tokio::spawn(async move { a.master_loop().await }));
    }
    {
        let a = agent.clone();
        tasks.push(tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_secs(60));
            loop {
                iv.tick().await;
                let live: std::collections::HashSet<TaskKey> = a
                    .lock()
                    .core
                    .hello()
                    .tasks
                    .into_iter()
                    .filter_map(|t| t.task.map(|i| (t.framework_id, i.task_id)))
                    .collect();
                let work = a.cfg.core.work_dir.clone();
                let policy = a.cfg.gc;
                match tokio::task::spawn_blocking(move || {
                    crate::gc::collect(&work, &live, policy, || {
                        agora_executor_link::disk::free_bytes(&work)
                    })
                })
                .await
                {
                    Ok(Ok(n)) if n > 0 => tracing::info!("removed {n} old sandboxes"),
                    Ok(Err(e)) => tracing::warn!("sandbox gc failed: {e}"),
                    _ => {}
                }
            }
        }));
    }
    Ok(AgentHandle {
        tasks,
        agent,
        shared,
        checkpoint,
        http_addr,
    })
}

/// The agent's executor-link key: 32 random bytes in `<run>/executor.key` (mode
/// 0600 in a 0700 directory), made on first start and read on every later one.
fn executor_link_key(run: &Path) -> Result<[u8; 32]> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = run.join("executor.key");
    let err = |what, cause| Error::WorkDir {
        what,
        path: path.clone(),
        cause,
    };
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            return Ok(key);
        }
        Ok(bytes) => tracing::warn!(
            "{} holds {} bytes, not 32; making a new key (executors of an earlier run cannot re-attach)",
            path.display(),
            bytes.len()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("read", e)),
    }
    let key = random_bytes::<32>().map_err(|e| err("make random bytes for", e))?;
    let tmp = run.join("executor.key.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err("write", e))?;
    f.write_all(&key)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| err("write", e))?;
    Ok(key)
}

/// `N` bytes from getrandom(2).
pub(crate) fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut key = [0u8; N];
    let mut filled = 0;
    while filled < key.len() {
        // SAFETY: getrandom(2) writes at most the given length into our buffer.
        let n =
            unsafe { libc::getrandom(key[filled..].as_mut_ptr().cast(), key.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(key)
}

/// The secret of one executor: sha256 of the agent's key, the framework id and the
/// executor id, in hex. Handed to the executor in its environment when it is
/// started; it proves a registration comes from a process this agent started.
fn executor_secret(key: &[u8; 32], exec: &ExecutorKey) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"agora executor link v1\0");
    h.update(key);
    h.update(exec.0.as_bytes());
    h.update([0u8]);
    h.update(exec.1.as_bytes());
    hex::encode(h.finalize())
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Makes the sandbox's `fs` with the task's directories and copies its inputs
/// (already in the artifact cache) into it. Every path is checked again here (never
/// trust the framework or its client) and written beneath the sandbox: a task that
/// ran before under this id may have left symlinks there, which must not take the
/// agent's (root's) writes out.
fn write_sandbox(dir: &Path, work: &Path, task: &TaskInfo) -> Result<()> {
    use agora_executor_link::beneath::{check_relative, Beneath};
    for d in &task.dirs {
        check_relative(d).map_err(|e| Error::prepare(format!("directory {d:?} refused"), e))?;
    }
    for input in &task.inputs {
        check_relative(&input.dest)
            .map_err(|e| Error::prepare(format!("input {:?} refused", input.dest), e))?;
    }
    let sandbox = Beneath::open(dir)
        .map_err(|e| Error::prepare(format!("cannot open sandbox {}", dir.display()), e))?;
    sandbox
        .create_dir_all("fs", 0o755)
        .map_err(|e| Error::prepare("cannot create the sandbox's fs", e))?;
    for d in &task.dirs {
        sandbox
            .create_dir_all(&format!("fs/{d}"), 0o755)
            .map_err(|e| Error::prepare(format!("cannot create directory {d}"), e))?;
    }
    for input in &task.inputs {
        let dest = format!("fs/{}", input.dest);
        if let Some((parent, _)) = dest.rsplit_once('/') {
            sandbox
                .create_dir_all(parent, 0o755)
                .map_err(|e| Error::prepare(format!("cannot place input {}", input.dest), e))?;
        }
        let mode = if input.executable { 0o755 } else { 0o644 };
        let place = || -> Result<()> {
            // A copy, not a link: the guest may change its inputs, never the cache.
            let mut from = std::fs::File::open(artifact_path(work, &input.sha256))?;
            let mut to = sandbox.create(&dest, mode)?;
            std::io::copy(&mut from, &mut to)?;
            use std::os::unix::fs::PermissionsExt;
            to.set_permissions(std::fs::Permissions::from_mode(mode))?;
            Ok(())
        };
        place().map_err(|e| Error::prepare(format!("cannot place input {}", input.dest), e))?;
    }
    Ok(())
}

/// Creates `path` (and missing parents) and sets its mode to `mode` (an existing
/// directory's too).
fn create_dir_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The cgroup of an executor: `<framework>/<executor>` under the agent's root.
fn group_name(key: &ExecutorKey) -> String {
    format!("{}/{}", escape_component(&key.0), escape_component(&key.1))
}

/// Like `Isolator::cleanup_leftovers`, but spares the executor groups in `keep`
/// (`<framework>/<executor>` names): kills and removes every other executor group
/// under the root. Returns how many were removed.
fn cleanup_except(isolator: &Isolator, keep: &BTreeSet<String>) -> usize {
    // The root's directory in each hierarchy, found from a group that is kept.
    let mut roots: BTreeSet<PathBuf> = BTreeSet::new();
    for name in keep {
        if let Ok(Some(g)) = isolator.open(name) {
            for c in ["cpu", "cpuacct", "memory", "pids", "freezer"] {
                if let Some(root) = g
                    .controller_dir(c)
                    .and_then(|d| d.parent().and_then(Path::parent).map(Path::to_path_buf))
                {
                    roots.insert(root);
                }
            }
        }
    }
    let subdirs = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut frameworks = BTreeSet::new();
    let mut names = BTreeSet::new();
    for root in &roots {
        for fw in subdirs(root) {
            for ex in subdirs(&root.join(&fw)) {
                names.insert(format!("{fw}/{ex}"));
            }
            frameworks.insert(fw);
        }
    }
    let mut removed = 0;
    for name in names.difference(keep) {
        if let Ok(Some(g)) = isolator.open(name) {
            tracing::warn!(group = %name, "removing an executor group left behind by an earlier run");
            if let Err(e) = g.kill_all(Duration::ZERO) {
                tracing::warn!(group = %name, "cannot empty it: {e}");
            }
            match g.remove() {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(group = %name, "cannot remove it: {e}"),
            }
        }
    }
    for fw in frameworks {
        isolator.remove_if_empty(&fw);
    }
    removed
}

/// State and start time (clock ticks after boot) of a process, from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE ..." where COMM may hold spaces and parentheses.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 (starttime) is the 20th after the state (field 3).
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Whether the recorded process still runs (the same process, not a reuse of its pid).
fn process_alive(p: &ExecutorProcess) -> bool {
    match proc_stat(p.pid) {
        Some((state, start)) => {
            (p.start_time == 0 || start == p.start_time) && state != 'Z' && state != 'X'
        }
        None => false,
    }
}

/// Waits until a process that is not our child ends (pidfd where the kernel has it,
/// else polling /proc).
async fn wait_for_exit(p: ExecutorProcess) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open(2) takes a pid and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: the fd was just returned to us and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The pid may have been reused, or the process ended, before the fd was made.
        if !process_alive(&p) {
            return;
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open (and the same fd)
        // until the AsyncFd is dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        if let Ok(afd) = registered {
            // Readable once the process has ended.
            let _ = afd.readable().await;
            return;
        }
    }
    while process_alive(&p) {
        tokio::time::sleep(Duration::from_millis(200)).await; // no pidfd: poll
    }
}

impl Agent {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn feed(&self, input: Input) {
        let (outs, ticket) = {
            let mut s = self.lock();
            let now = s.clock.read();
            let outs = s.core.handle(input, now);
            // Queued under the lock, so that deltas are written in the order they were
            // made; written (group commit) before any output is acted on, below.
            let ticket = self.checkpoint.submit(s.core.take_checkpoint());
            // Resize executor groups before their tasks are sent: on cgroup v1 a task's
            // group may not have a larger CPU quota than its executor's.
            self.resize_groups(&mut s);
            if s.core.take_function_hosts_changed() {
                self.routes
                    .replace(s.core.serving_function_hosts(), &self.cfg.core.work_dir);
            }
            if !s.core.recovering()
                && self
                    .recovered
                    .send_if_modified(|done| !std::mem::replace(done, true))
            {
                tracing::info!(
                    live_tasks = s.core.live_tasks(),
                    "recovery done: every recorded executor re-attached or was given up"
                );
            }
            (outs, ticket)
        };
        if let Err(e) = self.checkpoint.settle(ticket) {
            tracing::error!(
                "cannot write the checkpoint {}: {e:#}; a restart now would lose state",
                self.checkpoint.checkpoint().path().display()
            );
        }
        self.dispatch(outs);
    }

    /// Brings every executor group's limits to the sum of its live tasks.
    fn resize_groups(&self, s: &mut Shared) {
        let demand = s.core.executor_demand();
        for (key, group) in &s.groups {
            let want = demand.get(key).cloned().unwrap_or_default();
            if s.sized.get(key) == Some(&want) {
                continue;
            }
            let kind = s.core.executor_kind(key).unwrap_or(ExecutorKind::Wasm);
            let limits = self.executor_limits(kind, &want);
            if let Err(e) = group.update(&limits) {
                tracing::warn!(executor = %key.1, "cannot resize the executor's cgroup to {want}: {e}");
            }
            s.sized.insert(key.clone(), want);
        }
    }

    fn executor_limits(&self, kind: ExecutorKind, tasks: &Resources) -> CgroupLimits {
        let overhead = match kind {
            ExecutorKind::Wasm => WASM_EXECUTOR_OVERHEAD,
            ExecutorKind::Native => NATIVE_EXECUTOR_OVERHEAD,
            ExecutorKind::Function => FUNCTION_EXECUTOR_OVERHEAD,
        };
        let posix = self.isolator.mode() == IsolationMode::Posix;
        CgroupLimits {
            // Never below 0.01 cpu, so an executor between tasks can still talk.
            milli_cpus: tasks.milli_cpus().max(10),
            cfs_quota: self.cfg.isolation.cfs_quota,
            // In posix mode this would become RLIMIT_AS, which a wasm runtime's
            // reserved address space exceeds by design: no memory cap there.
            mem_bytes: if posix {
                0
            } else {
                (tasks.mem_bytes() + overhead) as u64
            },
            pids_max: 0,
        }
    }

    fn dispatch(&self, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::ToMaster(m) => {
                    let s = self.lock();
                    if let Some(tx) = &s.master_tx {
                        // A full queue means the link is stuck; the core resends.
                        let _ = tx.try_send(m);
                    }
                }
                Output::Prepare { key, task } => {
                    let a = self.clone();
                    tokio::spawn(async move {
                        let result = a.prepare(&key, &task).await.map_err(|e| e.prepare_failed());
                        a.feed(Input::Prepared { key, result });
                    });
                }
                Output::SpawnExecutor { key } => {
                    if let Err(e) = self.spawn_executor(&key) {
                        let detail = format!("could not start: {e:#}");
                        let a = self.clone();
                        tokio::spawn(async move { a.feed(Input::ExecutorExited { key, detail }) });
                    }
                }
                Output::ToExecutor { key, msg } => {
                    let s = self.lock();
                    if let Some(tx) = s.executors.get(&key) {
                        tx.send(msg);
                    }
                }
                Output::ReapExecutor { key } => {
                    let a = self.clone();
                    // The process asked to go; a later one with the same id is spared.
                    let Some(pid) = self.lock().children.get(&key).copied() else {
                        continue;
                    };
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(5)).await; // grace period, not synchronisation
                        if a.lock().children.get(&key) == Some(&pid) {
                            tracing::warn!(executor = %key.1, pid, "executor did not end after shutdown; killing it");
                            // SAFETY: kill(2) of an executor process of ours.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        }
                    });
                }
                Output::AdoptExecutor { key, process } => match process {
                    Some(p) if process_alive(&p) => {
                        tracing::info!(framework = %key.0, executor = %key.1, pid = p.pid, "executor of the earlier run is alive; waiting for it to reconnect");
                        self.adopt(&key, p);
                    }
                    Some(p) => {
                        let dir = self.executor_dir(&key);
                        let detail = with_stderr_tail(format!("process {} is gone", p.pid), &dir);
                        let a = self.clone();
                        tokio::spawn(async move { a.feed(Input::ExecutorExited { key, detail }) });
                    }
                    // Not recorded: only its reconnecting tells (see `serve_executor`).
                    None => {}
                },
            }
        }
    }

    // ---- master link ----------------------------------------------------------

    async fn master_loop(self) {
        // After a restart, register only once the tasks to report are known.
        let mut recovered = self.recovered.subscribe();
        if !*recovered.borrow() {
            tracing::info!("waiting for the executors of the earlier run before registering");
            let _ = recovered.wait_for(|done| *done).await;
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            let started = Instant::now();
            match self.master_session().await {
                Ok(()) => tracing::warn!("master closed the connection; reconnecting"),
                Err(e) => tracing::warn!("master link: {e:#}; retrying in {backoff:?}"),
            }
            let was_registered = {
                let mut s = self.lock();
                s.master_tx = None;
                s.master_conn.take().is_some()
            };
            self.feed(Input::MasterDisconnected);
            // A session that registered worked: the next attempt starts from the
            // shortest wait (a leader killed a few seconds after the last failover
            // must not cost the doubled waits of earlier failed attempts).
            if was_registered || started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(200);
            }
            tokio::time::sleep(backoff).await; // reconnect backoff
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn master_session(&self) -> Result<()> {
        let first = *self.cfg.masters.first().ok_or(Error::NoMaster)?;
        let endpoint = tls::client_endpoint(first, &self.cfg.identity)?;
        let leader = agora_net::leader::connect_leader(
            &endpoint,
            &self.cfg.masters,
            tls::CONNECT_TIMEOUT,
            true,
        )
        .await?;
        let (conn, master) = (leader.conn, leader.addr);
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = self.lock().core.hello();
        write_frame(
            &mut send,
            &StreamOpen {
                kind: Some(stream_open::Kind::Agent(hello)),
            },
        )
        .await?;
        let (tx, mut rx) = mpsc::channel::<AgentToMaster>(MASTER_QUEUE);
        // Sandbox reads arrive on streams the master opens.
        let reader_conn = conn.clone();
        let a = self.clone();
        let files = tokio::spawn(async move {
            while let Ok((send, recv)) = reader_conn.accept_bi().await {
                let a = a.clone();
                tokio::spawn(async move {
                    if let Err(e) = a.serve_master_request(send, recv).await {
                        tracing::info!("request from the master failed: {e:#}");
                    }
                });
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if agora_net::write_queued(&mut send, m, &mut rx)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
        // The master answers every ping; this long without a frame from it means it
        // (or the path to it) is gone, and we dial again rather than wait for QUIC's
        // idle timeout. Tasks keep running meanwhile.
        let mut silence = Duration::from_secs(30);
        let result = loop {
            let msg: MasterToAgent =
                match tokio::time::timeout(silence, read_frame(&mut recv)).await {
                    Ok(Ok(Some(m))) => m,
                    Ok(Ok(None)) => break Ok(()),
                    Ok(Err(e)) => break Err(Error::MasterFrame(e)),
                    Err(_) => break Err(Error::MasterSilent(silence)),
                };
            let input = match msg.msg {
                Some(master_to_agent::Msg::Registered(r)) => {
                    {
                        let mut s = self.lock();
                        s.master_tx = Some(tx.clone());
                        s.master_conn = Some(conn.clone());
                    }
                    tracing::info!(agent = %r.agent_id, "registered with the master at {master}");
                    let tx = tx.clone();
                    let every = Duration::from_millis(r.heartbeat_interval_ms.clamp(100, 60_000));
                    silence = if r.master_silence_ms > 0 {
                        Duration::from_millis(r.master_silence_ms.clamp(500, 600_000))
                    } else {
                        (every * 5).max(Duration::from_secs(3))
                    };
                    if let Some(h) = heartbeat.take() {
                        h.abort();
                    }
                    heartbeat = Some(tokio::spawn(async move {
                        let mut seq = 0;
                        let mut iv = tokio::time::interval(every);
                        loop {
                            iv.tick().await;
                            seq += 1;
                            let ping = AgentToMaster {
                                msg: Some(v1::agent_to_master::Msg::Ping(v1::Ping { seq })),
                            };
                            if tx.send(ping).await.is_err() {
                                return;
                            }
                        }
                    }));
                    Input::Registered {
                        agent_id: r.agent_id,
                    }
                }
                Some(master_to_agent::Msg::Pong(_)) => continue,
                Some(master_to_agent::Msg::RunTask(rt)) => Input::RunTask(rt),
                Some(master_to_agent::Msg::KillTask(k)) => Input::KillTask(k),
                Some(master_to_agent::Msg::Ack(a)) => Input::Ack(a),
                Some(master_to_agent::Msg::ShutdownFramework(s)) => Input::ShutdownFramework {
                    framework_id: s.framework_id,
                },
                Some(master_to_agent::Msg::ShutdownExecutor(s)) => Input::ShutdownExecutor {
                    key: (s.framework_id, s.executor_id),
                },
                Some(master_to_agent::Msg::FrameworkMessage(m)) => Input::FrameworkMessage {
                    key: (m.framework_id, m.executor_id),
                    data: m.data,
                },
                Some(master_to_agent::Msg::Error(e)) => break Err(Error::MasterRefused(e.message)),
                None => continue,
            };
            self.feed(input);
        };
        if let Some(h) = heartbeat {
            h.abort();
        }
        writer.abort();
        files.abort();
        conn.close(0u32.into(), b"");
        result
    }

    /// One request the master sent on a stream of its own: a sandbox read or a usage
    /// query.
    async fn serve_master_request(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<()> {
        let req: v1::AgentRequest = read_frame(&mut recv)
            .await?
            .ok_or_else(|| Error::BadRequest("empty request".into()))?;
        match req.request {
            Some(v1::agent_request::Request::Read(r)) => {
                let reply = match self.read_sandbox(&r).await {
                    Ok((data, size)) => SandboxData {
                        data,
                        size,
                        error: String::new(),
                    },
                    Err(e) => SandboxData {
                        error: format!("{e:#}"),
                        ..Default::default()
                    },
                };
                write_frame(&mut send, &reply).await?;
            }
            Some(v1::agent_request::Request::Usage(q)) => {
                let a = self.clone();
                let report = tokio::task::spawn_blocking(move || a.usage(&q)).await?;
                write_frame(&mut send, &report).await?;
            }
            None => {
                return Err(Error::BadRequest(
                    "unknown request from the master (newer master?)".into(),
                ))
            }
        }
        send.finish()?;
        Ok(())
    }

    /// Live usage of native tasks, read from their cgroups, and of every task's
    /// sandbox disk (walked now). wasm tasks report fuel and memory when they end.
    fn usage(&self, q: &v1::UsageQuery) -> v1::UsageReport {
        let mut report = v1::UsageReport::default();
        for t in q.tasks.iter().take(10_000) {
            let key = (t.framework_id.clone(), t.task_id.clone());
            let Some(((fw, exec), ExecutorKind::Native)) = self.lock().core.task_executor(&key)
            else {
                continue;
            };
            let name = format!(
                "{}/{}/{}",
                escape_component(&fw),
                escape_component(&exec),
                escape_component(&t.task_id)
            );
            if let Ok(Some(group)) = self.isolator.open(&name) {
                report.usage.insert(t.task_id.clone(), group.stats());
            }
        }
        // What each sandbox holds, whatever runs the task (one bounded walk each).
        for t in q.tasks.iter().take(10_000) {
            let key = (t.framework_id.clone(), t.task_id.clone());
            if self.lock().core.task_executor(&key).is_none() {
                continue;
            }
            let dir = agora_agent_core::sandbox_dir(&self.cfg.core.work_dir, &key);
            let bound = match self.cfg.isolation.max_files_per_task {
                0 => agora_executor_link::disk::DEFAULT_WALK_BOUND,
                n => n.saturating_mul(2),
            };
            if let Ok(used) = agora_executor_link::disk::measure(&dir, bound) {
                let u = report.usage.entry(t.task_id.clone()).or_default();
                u.disk_used_bytes = used.bytes;
                u.disk_files = used.files;
            }
        }
        report
    }

    /// Reads part of a file in a task's sandbox for the master (`agora logs`, read
    /// requests). The path is resolved beneath the sandbox: a symlink the task made
    /// that leads out of it (to `/etc/shadow`, to `../other-task/stdout`) is refused,
    /// not followed.
    async fn read_sandbox(&self, req: &SandboxRead) -> Result<(Vec<u8>, u64)> {
        let key = (req.framework_id.clone(), req.task_id.clone());
        for part in [&key.0, &key.1] {
            if part.is_empty() || part.contains('/') || part.starts_with('.') {
                return Err(Error::BadRequest("bad task or framework id".into()));
            }
        }
        let dir = agora_agent_core::sandbox_dir(&self.cfg.core.work_dir, &key);
        let rel = match req.path.as_str() {
            "stdout" | "stderr" => req.path.clone(),
            p if agora_executor_link::beneath::check_relative(p).is_ok() => format!("fs/{p}"),
            p => {
                return Err(Error::BadRequest(format!(
                    "path `{p}` must be stdout, stderr or relative to the task's root (no `..`)"
                )))
            }
        };
        let req = req.clone();
        tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, u64)> {
            use std::io::{Read, Seek};
            let failed = |cause| Error::SandboxFile {
                path: req.path.clone(),
                task_id: req.task_id.clone(),
                cause,
            };
            let sandbox = agora_executor_link::beneath::Beneath::open(&dir).map_err(failed)?;
            let mut f = sandbox.open_read(&rel).map_err(|e| {
                if matches!(e, agora_executor_link::beneath::BeneathError::Escapes { .. }) {
                    tracing::warn!(task_id = %req.task_id, framework_id = %req.framework_id, path = %req.path, "refused a sandbox read: {e}");
                }
                failed(e)
            })?;
            let size = f.metadata()?.len();
            if req.offset >= size {
                return Ok((Vec::new(), size));
            }
            f.seek(std::io::SeekFrom::Start(req.offset))?;
            let want = (req.length as u64).min(size - req.offset);
            let mut buf = Vec::with_capacity(want as usize);
            f.take(want).read_to_end(&mut buf)?;
            Ok((buf, size))
        })
        .await?
    }

    // ---- sandboxes and artifacts ---------------------------------------------

    async fn prepare(&self, key: &TaskKey, task: &TaskInfo) -> Result<()> {
        if let Some(module) = &task.module {
            self.fetch(&module.sha256, module.size)
                .await
                .map_err(|e| Error::fetch_failed("fetch of the module failed", e))?;
        }
        let dir = agora_agent_core::sandbox_dir(&self.cfg.core.work_dir, key);
        // <work>/sandboxes/<framework> may be crossed, not listed, by tasks' users.
        if let Some(fw) = dir.parent() {
            create_dir_mode(fw, 0o711)
                .map_err(|e| Error::prepare(format!("cannot create {}", fw.display()), e))?;
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::prepare(format!("cannot create sandbox {}", dir.display()), e))?;
        for input in &task.inputs {
            self.fetch(&input.sha256, input.size).await.map_err(|e| {
                Error::fetch_failed(format!("fetch of input {} failed", input.dest), e)
            })?;
        }
        let work = self.cfg.core.work_dir.clone();
        let task = task.clone();
        tokio::task::spawn_blocking(move || write_sandbox(&dir, &work, &task)).await?
    }

    /// Makes sure `<work>/artifacts/<sha>` exists, fetching it from the master once.
    async fn fetch(&self, sha: &str, size: u64) -> Result<()> {
        if !agora_proto::is_sha256_hex(sha) {
            return Err(Error::Fetch(format!("`{sha}` is not a sha256")));
        }
        let dest = artifact_path(&self.cfg.core.work_dir, sha);
        let lock = self
            .fetch_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(sha.to_string())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if tokio::fs::metadata(&dest).await.is_ok() {
            return Ok(()); // cached: no bytes move
        }
        let conn = self.lock().master_conn.clone().ok_or(Error::NotConnected)?;
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(
            &mut send,
            &StreamOpen {
                kind: Some(stream_open::Kind::Get(ArtifactGet {
                    sha256: sha.to_string(),
                })),
            },
        )
        .await?;
        send.finish()?;
        let h: ArtifactHeader = read_frame(&mut recv)
            .await?
            .ok_or_else(|| Error::Fetch("the master closed the stream".into()))?;
        if !h.error.is_empty() {
            return Err(Error::Fetch(h.error));
        }
        if size != 0 && h.size != size {
            return Err(Error::Fetch(format!(
                "the master has {} bytes for {sha}, the task says {size}",
                h.size
            )));
        }
        transfer::receive_to_file(&mut recv, &dest, sha, h.size).await?;
        tracing::debug!(%sha, bytes = h.size, "fetched artifact");
        Ok(())
    }

    // ---- executors ------------------------------------------------------------

    /// Starts an executor process inside a group of its own, sized to its tasks.
    fn spawn_executor(&self, key: &ExecutorKey) -> Result<()> {
        let (kind, demand) = {
            let s = self.lock();
            let kind = s.core.executor_kind(key).unwrap_or(ExecutorKind::Wasm);
            (
                kind,
                s.core
                    .executor_demand()
                    .get(key)
                    .cloned()
                    .unwrap_or_default(),
            )
        };
        let command = match kind {
            ExecutorKind::Wasm => &self.cfg.executor_command,
            ExecutorKind::Native => &self.cfg.native_executor_command,
            ExecutorKind::Function => &self.cfg.function_executor_command,
        };
        let (prog, rest) = command.split_first().ok_or_else(|| {
            Error::Executor(format!("no {} executor command configured", kind.name()))
        })?;
        let work = &self.cfg.core.work_dir;
        let dir = self.executor_dir(key);
        std::fs::create_dir_all(&dir)?;
        let stdout = std::fs::File::create(dir.join("stdout"))?;
        let stderr = std::fs::File::create(dir.join("stderr"))?;
        let mut cmd = std::process::Command::new(prog);
        cmd.args(rest)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--framework-id")
            .arg(&key.0)
            .arg("--executor-id")
            .arg(&key.1)
            .env(
                RECOVERY_TIMEOUT_ENV,
                self.cfg.core.recovery_timeout_ms.to_string(),
            )
            .env(SECRET_ENV, executor_secret(&self.link_key, key))
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        match kind {
            // One cache directory for both: artifact names carry a hash of each
            // engine's settings, so neither ever reads the other's.
            ExecutorKind::Wasm | ExecutorKind::Function => {
                cmd.arg("--cache-dir").arg(work.join("compiled"));
            }
            ExecutorKind::Native => {
                cmd.arg("--cgroup-root").arg(self.isolator.root_name());
                cmd.arg("--isolation").arg(self.isolator.mode().as_str());
                cmd.arg("--pids-max")
                    .arg(self.cfg.isolation.pids_max.to_string());
                if !self.cfg.isolation.cfs_quota {
                    cmd.arg("--no-cfs-quota");
                }
                cmd.arg("--task-user").arg(&self.cfg.isolation.task_user);
                if self.cfg.isolation.allow_root_tasks {
                    cmd.arg("--allow-root-tasks");
                }
                cmd.arg("--hide-dir").arg(work);
                if self.cfg.isolation.pid_namespace {
                    cmd.arg("--pid-namespace");
                }
            }
        }
        // The executor's group: <root>/<framework>/<executor>. Native task groups
        // nest under it. cgroup v2 allows no processes in a group whose children
        // have controllers, so there the process sits in a leaf of its own.
        let group_name = group_name(key);
        let limits = self.executor_limits(kind, &demand);
        let group =
            Arc::new(self.isolator.create(&group_name, &limits).map_err(|e| {
                Error::Executor(format!("cannot create the executor's cgroup: {e}"))
            })?);
        let leaf = match self.isolator.cgroup_version() {
            Some(CgroupVersion::V2) => Some(
                self.isolator
                    .create(
                        &format!("{group_name}/executor.proc"),
                        &CgroupLimits {
                            milli_cpus: 0,
                            cfs_quota: false,
                            mem_bytes: 0,
                            pids_max: 0,
                        },
                    )
                    .map_err(|e| {
                        Error::Executor(format!("cannot create the executor's leaf cgroup: {e}"))
                    })?,
            ),
            _ => None,
        };
        let joined: &Group = leaf.as_ref().unwrap_or(&group);
        let containment = joined
            .contain(&mut cmd)
            .map_err(|e| Error::Executor(e.to_string()))?;
        let child = containment.spawned(cmd.spawn()).map_err(|e| {
            Error::Executor(format!("cannot run {}: {e}", Path::new(prog).display()))
        })?;
        let pid = child.id();
        {
            let mut s = self.lock();
            s.children.insert(key.clone(), pid);
            s.groups.insert(key.clone(), group.clone());
            s.sized.insert(key.clone(), demand);
        }
        tracing::info!(framework = %key.0, executor = %key.1, pid, "started {} executor", kind.name());
        let a = self.clone();
        let waited_key = key.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let mut child = child;
            let detail = match child.wait() {
                Ok(st) => describe_exit(st, &dir),
                Err(e) => format!("could not wait for it: {e}"),
            };
            let _guard = rt.enter();
            a.executor_gone(waited_key, pid, Some(group), leaf, detail);
        });
        // Recorded, so that a restarted agent finds it again.
        let process = ExecutorProcess {
            pid,
            start_time: proc_stat(pid).map(|(_, t)| t).unwrap_or(0),
        };
        self.feed(Input::ExecutorSpawned {
            key: key.clone(),
            process,
        });
        Ok(())
    }

    fn executor_dir(&self, key: &ExecutorKey) -> PathBuf {
        self.cfg
            .core
            .work_dir
            .join("executors")
            .join(&key.0)
            .join(&key.1)
    }

    /// The executor's process `pid` ended: its cgroup is emptied and removed, and the
    /// core told. Nothing happens if another process holds the executor id by now.
    fn executor_gone(
        &self,
        key: ExecutorKey,
        pid: u32,
        group: Option<Arc<Group>>,
        leaf: Option<Group>,
        detail: String,
    ) {
        {
            let mut s = self.lock();
            if s.children.get(&key) != Some(&pid) {
                return;
            }
            s.children.remove(&key);
            s.exiting += 1;
        }
        if let Some(group) = &group {
            // Anything the executor left behind (orphans of its tasks) goes with it.
            if let Err(e) = group.kill_all(Duration::from_secs(1)) {
                tracing::warn!(executor = %key.1, "cannot empty the executor's cgroup: {e}");
            }
            if let Some(leaf) = &leaf {
                let _ = leaf.remove();
            }
            if let Err(e) = group.remove() {
                tracing::warn!(executor = %key.1, "cannot remove the executor's cgroup: {e}");
            }
            // And the framework's group, once its last executor is gone.
            self.isolator.remove_if_empty(&escape_component(&key.0));
        }
        {
            let mut s = self.lock();
            s.executors.remove(&key);
            s.groups.remove(&key);
            s.sized.remove(&key);
        }
        self.feed(Input::ExecutorExited { key, detail });
        let mut s = self.lock();
        s.exiting = s.exiting.saturating_sub(1);
    }

    /// Takes on an executor process this agent did not start (it ran before a
    /// restart): its cgroup is resized and cleaned like a child's, and its end is
    /// noticed through a pidfd.
    fn adopt(&self, key: &ExecutorKey, p: ExecutorProcess) {
        let name = group_name(key);
        let group = self.isolator.open(&name).ok().flatten().map(Arc::new);
        let leaf = match self.isolator.cgroup_version() {
            Some(CgroupVersion::V2) => self
                .isolator
                .open(&format!("{name}/executor.proc"))
                .ok()
                .flatten(),
            _ => None,
        };
        {
            let mut s = self.lock();
            s.children.insert(key.clone(), p.pid);
            s.sized.remove(key);
            match &group {
                Some(g) => s.groups.insert(key.clone(), g.clone()),
                None => s.groups.remove(key),
            };
        }
        let a = self.clone();
        let key = key.clone();
        let dir = self.executor_dir(&key);
        tokio::spawn(async move {
            wait_for_exit(p).await;
            let detail = with_stderr_tail(
                format!(
                    "process {} ended (not a child of this agent: no exit status)",
                    p.pid
                ),
                &dir,
            );
            let _ = tokio::task::spawn_blocking(move || {
                a.executor_gone(key, p.pid, group, leaf, detail)
            })
            .await;
        });
    }

    async fn serve_executor(&self, stream: tokio::net::UnixStream) {
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .filter(|&p| p > 0)
            .map(|p| p as u32);
        let (mut rd, mut wr) = stream.into_split();
        let reg = match read_frame::<_, v1::ExecutorToAgent>(&mut rd).await {
            Ok(Some(v1::ExecutorToAgent {
                msg: Some(executor_to_agent::Msg::Register(r)),
                ..
            })) => r,
            other => {
                tracing::warn!("executor connection did not start with a registration: {other:?}");
                return;
            }
        };
        let key = (reg.framework_id, reg.executor_id);
        // Only executors this agent started know their secret; anything else on this
        // machine that reaches the socket is turned away before it can take an
        // executor's place (the real one, if any, keeps its connection).
        if !same_secret(&reg.secret, &executor_secret(&self.link_key, &key)) {
            let reason = format!(
                "registration as executor {} of framework {} refused: {} secret (only executors this agent starts may register)",
                key.1,
                key.0,
                if reg.secret.is_empty() { "no" } else { "wrong" }
            );
            tracing::warn!(
                peer_pid = peer_pid.unwrap_or(0),
                "{reason}; closing the connection"
            );
            let refused = AgentToExecutor {
                msg: Some(v1::agent_to_executor::Msg::Refused(v1::ExecutorRefused {
                    reason,
                })),
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(1), write_frame(&mut wr, &refused)).await;
            return;
        }
        let (tx, mut lanes) = ExecutorTx::new(key.1.clone());
        {
            let mut s = self.lock();
            s.executors.insert(key.clone(), tx.clone());
            if s.shutting_down {
                tracing::info!(executor = %key.1, "executor registered while the agent stops; asking it to shut down");
                tx.send(executor_shutdown());
            }
        }
        let writer = tokio::spawn(async move { lanes.write_to(&mut wr).await });
        // A process this agent did not start (one from before a restart whose pid was
        // not recorded): watch it like the others.
        if let Some(pid) = peer_pid {
            let known = self.lock().children.get(&key).copied();
            match known {
                None => {
                    let process = ExecutorProcess {
                        pid,
                        start_time: proc_stat(pid).map(|(_, t)| t).unwrap_or(0),
                    };
                    self.adopt(&key, process);
                    self.feed(Input::ExecutorSpawned {
                        key: key.clone(),
                        process,
                    });
                }
                Some(k) if k != pid => {
                    tracing::warn!(executor = %key.1, pid, recorded = k, "executor connected from another process than recorded");
                }
                Some(_) => {}
            }
        }
        if reg.reconnect {
            self.feed(Input::ExecutorReregistered {
                key: key.clone(),
                tasks: reg.task_ids,
            });
        } else {
            self.feed(Input::ExecutorRegistered { key: key.clone() });
        }
        loop {
            match read_frame::<_, v1::ExecutorToAgent>(&mut rd).await {
                Ok(Some(v1::ExecutorToAgent {
                    msg: Some(executor_to_agent::Msg::Status(status)),
                    seq,
                })) => {
                    // The status is in the checkpoint once `feed` returns: the executor
                    // may forget it.
                    self.feed(Input::ExecutorStatus {
                        key: key.clone(),
                        status,
                    });
                    if seq > 0 {
                        let ack = AgentToExecutor {
                            msg: Some(v1::agent_to_executor::Msg::Ack(v1::ExecutorAck { seq })),
                        };
                        tx.send(ack);
                    }
                }
                Ok(Some(v1::ExecutorToAgent {
                    msg: Some(executor_to_agent::Msg::Message(m)),
                    ..
                })) => {
                    self.feed(Input::ExecutorMessage {
                        key: key.clone(),
                        data: m.data,
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(executor = %key.1, "bad frame from executor: {e}");
                    break;
                }
            }
        }
        writer.abort();
    }
}

/// A sentence about how an executor process ended, with the tail of its stderr.
fn describe_exit(st: std::process::ExitStatus, dir: &Path) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".to_string(),
    };
    with_stderr_tail(how, dir)
}

/// `how`, followed by the last line of the executor's stderr in parentheses.
fn with_stderr_tail(how: String, dir: &Path) -> String {
    let tail = std::fs::read_to_string(dir.join("stderr"))
        .ok()
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(strip_ansi)
        });
    match tail {
        Some(t) => format!("{how} ({t})"),
        None => how,
    }
}

/// `s` without ANSI escape sequences (an executor's log may be coloured).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_proto::v1::InputFile;

    fn task_with(dest: &str, dirs: &[&str]) -> TaskInfo {
        TaskInfo {
            inputs: vec![InputFile {
                sha256: "ab".repeat(32),
                size: 1,
                dest: dest.into(),
                executable: false,
            }],
            dirs: dirs.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let work = t.path().join("work");
        std::fs::create_dir_all(work.join("artifacts")).unwrap();
        std::fs::write(artifact_path(&work, &"ab".repeat(32)), "input").unwrap();
        let dir = work.join("sandboxes/f/t");
        std::fs::create_dir_all(&dir).unwrap();
        (t, work, dir)
    }

    #[test]
    fn inputs_are_placed_inside_the_sandbox() {
        let (_t, work, dir) = setup();
        write_sandbox(&dir, &work, &task_with("a/b/in.txt", &["empty/x"])).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("fs/a/b/in.txt")).unwrap(),
            "input"
        );
        assert!(dir.join("fs/empty/x").is_dir());
    }

    #[test]
    fn paths_that_escape_are_refused_naming_them() {
        let (t, work, dir) = setup();
        for (dest, dirs) in [
            ("../../../escaped", vec![]),
            ("/tmp/agora-unit-escaped", vec![]),
            ("ok", vec!["../../../escaped"]),
        ] {
            let e = write_sandbox(&dir, &work, &task_with(dest, &dirs)).unwrap_err();
            let named = if dirs.is_empty() { dest } else { dirs[0] };
            assert!(e.to_string().contains(named), "{e}");
        }
        assert!(!t.path().join("escaped").exists());
        assert!(!Path::new("/tmp/agora-unit-escaped").exists());
    }

    #[test]
    fn symlinks_left_in_a_reused_sandbox_are_not_written_through() {
        let (t, work, dir) = setup();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), "untouched").unwrap();
        // An earlier task of this id left `fs` pointing out, then a file link.
        std::os::unix::fs::symlink(&outside, dir.join("fs")).unwrap();
        let e = write_sandbox(&dir, &work, &task_with("victim", &[])).unwrap_err();
        assert!(e.to_string().contains("leads out of the sandbox"), "{e}");
        std::fs::remove_file(dir.join("fs")).unwrap();
        std::fs::create_dir(dir.join("fs")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), dir.join("fs/in")).unwrap();
        assert!(write_sandbox(&dir, &work, &task_with("in", &[])).is_err());
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "untouched"
        );
    }
}
