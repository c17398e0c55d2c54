//! `agora executor fn`: the function host executor, the process form of this crate.
//!
//! The agent starts one per function host task (its executor id is `fn-<task id>`, so
//! each host is a process of its own, in a cgroup of its own). It speaks the same link
//! as the wasm and native executors ([`agora_proto::executor_link`]): it registers,
//! takes launches and kills, and reports statuses numbered and held until the agent
//! acknowledges them; when the agent goes away the hosts keep serving while it
//! reconnects, for up to the recovery timeout.
//!
//! A launch carrying `function` loads the module into the process's one
//! [`FunctionHost`] (compiled modules cached in the agent's cache directory, as the
//! wasm executor does), binds `<sandbox>/fn.sock` and serves the functions router on
//! it: the agent's HTTP server proxies `/fn/NAME/...` there. RUNNING carries the load
//! time as `instantiate_us`. Each failed request's status and reason is appended to
//! the task's stderr file (bounded by the launch's output limit), so `agora logs
//! --stderr` shows why requests fail. A kill stops accepting connections, lets the
//! requests in flight finish (bounded by [`drain_grace`]), removes the socket and
//! reports KILLED.

use std::collections::HashMap;
use std::future::IntoFuture as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use agora_proto::executor_link::{recovery_timeout_from_env, AgentConn, Outbox, FLUSH_GRACE};
use agora_proto::frame::FrameError;
use agora_proto::v1::{
    agent_to_executor, AgentToExecutor, ExecutorLaunch, ExecutorRegister, ExecutorStatus,
    FunctionInfo, Reason, TaskState,
};
use anyhow::Context as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;

use crate::outcome::Failure;
use crate::spec::{FunctionSpec, ModuleSource, MAX_NAME_LEN};
use crate::{router, FunctionHost, FunctionRegistry, HostConfig, HttpConfig};

/// The Unix socket a host serves HTTP on, in its task's sandbox (beside `stdout`).
pub const SOCKET_NAME: &str = "fn.sock";
/// Most a kill waits for the requests in flight, whatever the function's deadline.
const MAX_DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Backoff between attempts to reach a restarting agent: from the first to the cap.
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_millis(250);
/// Tenant of a function whose owner is the default role (`*`) or not given.
pub const DEFAULT_TENANT: &str = "default";

/// The socket of the host whose task writes its stdout to `stdout_path`.
pub fn socket_path(sandbox: &Path) -> PathBuf {
    sandbox.join(SOCKET_NAME)
}

/// Runs the executor until the agent says `shutdown` (an `Ok` end, after stopping
/// every host). A failed first connection, a malformed frame, or an agent that does
/// not come back within the recovery timeout is an error.
pub async fn run_executor(
    socket: &Path,
    framework_id: &str,
    executor_id: &str,
    cache_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let recovery_timeout = recovery_timeout_from_env();
    // One engine and instance pool per process, built before the first launch so a
    // cold start pays only for loading the module.
    let host = FunctionHost::new(HostConfig {
        cache_dir,
        ..HostConfig::default()
    })
    .context("cannot start the function host")?;
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the agent at {}", socket.display()))?;
    let register = ExecutorRegister {
        framework_id: framework_id.to_string(),
        executor_id: executor_id.to_string(),
        ..Default::default()
    };
    let mut executor = Executor {
        host,
        outbox: Arc::default(),
        running: Arc::default(),
        hosts: JoinSet::new(),
        roots: HashMap::new(),
    };
    let mut conn = AgentConn::start(
        stream,
        &executor.outbox,
        &executor.running,
        register.clone(),
        false,
    );
    let result = loop {
        match executor.serve(&mut conn).await {
            End::Shutdown => {
                tracing::info!("shutdown requested; stopping the function hosts");
                executor.stop_all().await;
                break Ok(());
            }
            End::Bad(e) => {
                tracing::error!(error = %e, "bad frame from the agent; exiting");
                executor.stop_all().await;
                break Err(anyhow::Error::new(e).context("reading a frame from the agent"));
            }
            End::Eof => {
                tracing::warn!(
                    hosts = lock(&executor.running).len(),
                    "lost the agent; functions keep serving while reconnecting for up to {recovery_timeout:?}"
                );
                conn.close(&executor.outbox);
                match executor.reconnect(socket, recovery_timeout).await {
                    Some(stream) => {
                        tracing::info!("reconnected to the agent");
                        conn = AgentConn::start(
                            stream,
                            &executor.outbox,
                            &executor.running,
                            register.clone(),
                            true,
                        );
                    }
                    None => {
                        let n = lock(&executor.running).len();
                        tracing::error!("the agent did not come back within {recovery_timeout:?}; stopping {n} function hosts");
                        executor.stop_all().await;
                        break Err(anyhow::anyhow!(
                            "the agent at {} did not come back within {recovery_timeout:?}; {n} function hosts were stopped",
                            socket.display()
                        ));
                    }
                }
            }
        }
    };
    conn.finish(&executor.outbox).await;
    result
}

/// How a connection to the agent ended.
enum End {
    Shutdown,
    Eof,
    Bad(FrameError),
}

/// Kill signals of the hosts running, by task id. A host's task removes its entry
/// just before it sends its terminal status ([`Outbox::finish`]).
type Running = Arc<Mutex<HashMap<String, Arc<Notify>>>>;

struct Executor {
    host: Arc<FunctionHost>,
    outbox: Arc<Outbox>,
    running: Running,
    /// One async task per host, joined to know when they are all gone.
    hosts: JoinSet<()>,
    /// Root directory of each host launched (pruned to the running ones), where
    /// framework messages are delivered, as the other executors do.
    roots: HashMap<String, PathBuf>,
}

impl Executor {
    async fn serve(&mut self, conn: &mut AgentConn) -> End {
        loop {
            tokio::select! {
                frame = conn.frames.recv() => match frame {
                    Some(Ok(Some(msg))) => {
                        if self.handle(msg) {
                            return End::Shutdown;
                        }
                    }
                    Some(Ok(None)) | None => return End::Eof,
                    Some(Err(FrameError::Io(e))) => {
                        tracing::debug!(error = %e, "connection to the agent failed");
                        return End::Eof;
                    }
                    Some(Err(FrameError::Truncated)) => return End::Eof,
                    Some(Err(e)) => return End::Bad(e),
                },
                Some(done) = self.hosts.join_next() => reap(done),
            }
        }
    }

    async fn reconnect(&mut self, socket: &Path, timeout: Duration) -> Option<UnixStream> {
        let deadline = Instant::now() + timeout;
        let mut backoff = RECONNECT_FIRST;
        loop {
            match UnixStream::connect(socket).await {
                Ok(s) => return Some(s),
                Err(e) => tracing::debug!(error = %e, "agent not back yet"),
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let pause = tokio::time::sleep(backoff.min(deadline - now)); // reconnect backoff
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    Some(done) = self.hosts.join_next() => reap(done),
                }
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }

    /// Handles one message; `true` means shut down.
    fn handle(&mut self, msg: AgentToExecutor) -> bool {
        match msg.msg {
            Some(agent_to_executor::Msg::Launch(launch)) => self.launch(launch),
            Some(agent_to_executor::Msg::Kill(kill)) => {
                match lock(&self.running).get(&kill.task_id) {
                    Some(stop) => {
                        tracing::info!(task_id = %kill.task_id, "stopping function host");
                        stop.notify_one();
                    }
                    None => tracing::warn!(
                        task_id = %kill.task_id,
                        "kill for a task this executor is not running; ignored"
                    ),
                }
            }
            Some(agent_to_executor::Msg::Shutdown(_)) => return true,
            Some(agent_to_executor::Msg::Ack(ack)) => self.outbox.ack(ack.seq),
            Some(agent_to_executor::Msg::Message(m)) => {
                let tasks: Vec<(String, PathBuf)> = {
                    let running = lock(&self.running);
                    self.roots.retain(|id, _| running.contains_key(id));
                    let mut v: Vec<_> = self
                        .roots
                        .iter()
                        .map(|(k, p)| (k.clone(), p.clone()))
                        .collect();
                    v.sort();
                    v
                };
                let receipt = agora_proto::executor_link::deliver_message(&tasks, &m.data);
                tracing::info!("framework message: {receipt}");
                self.outbox.message(receipt.into_bytes());
            }
            None => tracing::warn!("frame from the agent carries no known message; ignored"),
        }
        false
    }

    fn launch(&mut self, launch: ExecutorLaunch) {
        let task_id = launch.task_id.clone();
        let stop = Arc::new(Notify::new());
        let refusal = if task_id.is_empty() {
            Some("launch without a task id".to_string())
        } else {
            let mut running = lock(&self.running);
            if running.contains_key(&task_id) {
                Some(format!(
                    "task {task_id} is already running in this executor"
                ))
            } else {
                running.insert(task_id.clone(), Arc::clone(&stop));
                None
            }
        };
        if let Some(message) = refusal {
            tracing::warn!(task_id = %task_id, "{message}");
            self.outbox.status(ended(
                &task_id,
                TaskState::TaskFailed,
                Reason::InvalidTask,
                message,
            ));
            return;
        }
        if !launch.root_dir.is_empty() {
            self.roots
                .insert(task_id.clone(), PathBuf::from(&launch.root_dir));
        }
        let host = Arc::clone(&self.host);
        let outbox = Arc::clone(&self.outbox);
        let running = Arc::clone(&self.running);
        self.hosts.spawn(async move {
            let status = serve_host(&launch, host, &outbox, stop).await;
            tracing::info!(
                task_id = %launch.task_id,
                state = status.state().short_name(),
                reason = status.reason().short_name(),
                message = %status.message,
                "function host ended"
            );
            outbox.finish(&running, &launch.task_id, status);
        });
    }

    /// Stops every host and waits (bounded) for all of them to report.
    async fn stop_all(&mut self) {
        for stop in lock(&self.running).values() {
            stop.notify_one();
        }
        let drain = async {
            while let Some(done) = self.hosts.join_next().await {
                reap(done);
            }
        };
        // Each host bounds its own drain; this only guards against a bug there.
        if tokio::time::timeout(MAX_DRAIN_GRACE + FLUSH_GRACE, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                hosts = ?lock(&self.running).keys().collect::<Vec<_>>(),
                "function hosts did not stop in time; leaving them"
            );
        }
    }
}

/// Serves one launched function until it is stopped; returns its terminal status.
async fn serve_host(
    launch: &ExecutorLaunch,
    host: Arc<FunctionHost>,
    outbox: &Outbox,
    stop: Arc<Notify>,
) -> ExecutorStatus {
    let task_id = launch.task_id.as_str();
    let fail = |reason, message: String| ended(task_id, TaskState::TaskFailed, reason, message);
    let Some(info) = &launch.function else {
        return fail(
            Reason::InvalidTask,
            format!(
                "launch of task {task_id} names no function; this executor only hosts functions"
            ),
        );
    };
    let Some(sandbox) = Path::new(&launch.stdout_path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    else {
        return fail(
            Reason::InvalidTask,
            format!("launch of task {task_id} has no stdout path, so no sandbox for its socket"),
        );
    };
    let started = Instant::now();
    let spec = spec_of(launch, info);
    let name = spec.name.clone();
    let loading = tokio::task::spawn_blocking({
        let host = Arc::clone(&host);
        move || host.load(spec)
    });
    let function = tokio::select! {
        loaded = loading => match loaded {
            Ok(Ok(function)) => function,
            Ok(Err(e)) => return fail(Reason::InvalidModule, e.to_string()),
            Err(e) => return fail(Reason::ExecutorTerminated, format!("loading function {name} failed in the host: {e}")),
        },
        // The load goes on in its thread and is dropped when done.
        _ = stop.notified() => {
            return ended(task_id, TaskState::TaskKilled, Reason::KilledByFramework, "killed while its module was loading".into());
        }
    };
    let log = FailureFile::new(
        PathBuf::from(&launch.stderr_path),
        launch.output_limit_bytes,
    );
    function.set_failure_log(Box::new(move |failure| log.append(failure)));
    let registry = FunctionRegistry::new(Arc::clone(&host));
    registry.insert(Arc::clone(&function));

    let socket = socket_path(sandbox);
    // A socket file left by an earlier host of this task id (there is none in a fresh
    // sandbox); binding fails on an existing path.
    let _ = std::fs::remove_file(&socket);
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            return fail(
                Reason::SandboxFailed,
                format!("cannot listen on {}: {e}", socket.display()),
            )
        }
    };
    let instantiate_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    note(
        &launch.stdout_path,
        &format!(
            "function {name} ({:?}, sha256 {}) loaded in {} us; serving on {}\n",
            function.kind(),
            function.sha256(),
            instantiate_us,
            socket.display()
        ),
    );
    tracing::info!(task_id, function = %name, instantiate_us, socket = %socket.display(), "function host serving");
    outbox.status(ExecutorStatus {
        task_id: task_id.to_string(),
        state: TaskState::TaskRunning as i32,
        instantiate_us,
        ..Default::default()
    });

    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let app = router(Arc::clone(&registry), HttpConfig::default());
    let mut server = tokio::spawn(
        axum::serve(listener, app.into_make_service())
            .with_graceful_shutdown(async {
                let _ = drain_rx.await;
            })
            .into_future(),
    );
    let crashed = tokio::select! {
        _ = stop.notified() => None,
        ended = &mut server => Some(match ended {
            Ok(Ok(())) => "the HTTP server stopped by itself".to_string(),
            Ok(Err(e)) => format!("the HTTP server failed: {e}"),
            Err(e) => format!("the HTTP server task failed: {e}"),
        }),
    };
    let _ = std::fs::remove_file(&socket);
    if let Some(why) = crashed {
        registry.remove(&name);
        return fail(
            Reason::ExecutorTerminated,
            format!("function {name}: {why}"),
        );
    }
    // Stop accepting; let the requests in flight (and queued) finish, boundedly.
    let _ = drain_tx.send(());
    let grace = drain_grace(launch);
    if tokio::time::timeout(grace, &mut server).await.is_err() {
        tracing::warn!(task_id, function = %name, "requests still running {grace:?} after the kill; dropping them");
        server.abort();
    }
    registry.remove(&name);
    ended(
        task_id,
        TaskState::TaskKilled,
        Reason::KilledByFramework,
        format!("killed; function {name} stopped serving"),
    )
}

/// How long a kill waits for the requests in flight: one request's deadline and a
/// second, at most [`MAX_DRAIN_GRACE`].
pub fn drain_grace(launch: &ExecutorLaunch) -> Duration {
    let deadline = if launch.timeout_ms > 0 {
        Duration::from_millis(launch.timeout_ms)
    } else {
        crate::DEFAULT_TIMEOUT
    };
    (deadline + Duration::from_secs(1)).min(MAX_DRAIN_GRACE)
}

/// The function's spec from the launch: per-request limits from the module fields
/// (0: the runtime's default), serving limits from `FunctionInfo` (0: default).
fn spec_of(launch: &ExecutorLaunch, info: &FunctionInfo) -> FunctionSpec {
    let mut spec = FunctionSpec::new(
        info.name.clone(),
        tenant_name(&info.tenant),
        ModuleSource::Path(PathBuf::from(&launch.module_path)),
    );
    spec.sha256 = (!launch.module_sha256.is_empty()).then(|| launch.module_sha256.clone());
    if launch.memory_bytes > 0 {
        spec.memory_limit = launch.memory_bytes;
    }
    spec.fuel = launch.fuel;
    if launch.timeout_ms > 0 {
        spec.timeout = Duration::from_millis(launch.timeout_ms);
    }
    if info.max_concurrency > 0 {
        spec.max_concurrency = info.max_concurrency;
    }
    if info.queue_len > 0 {
        spec.queue_len = info.queue_len;
    }
    if info.max_queue_wait_ms > 0 {
        spec.max_queue_wait = Duration::from_millis(info.max_queue_wait_ms);
    }
    spec
}

/// A tenant name the runtime accepts, from a role: the default role `*` (or none) is
/// [`DEFAULT_TENANT`]; a hierarchical role `a/b` becomes `a.b`. Tenants only scope the
/// per-process concurrency limit and label metrics, so a lossy mapping is harmless.
pub fn tenant_name(role: &str) -> String {
    if role.is_empty() || role == "*" {
        return DEFAULT_TENANT.to_string();
    }
    let mut name: String = role
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else if c == '/' {
                '.'
            } else {
                '_'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    if name.starts_with('.') {
        name.replace_range(..1, "_");
    }
    name
}

/// The task's stderr file, to which each failed request's status and reason is
/// appended, up to a byte limit (then one last line says logging stopped).
struct FailureFile {
    path: PathBuf,
    limit: u64,
    state: Mutex<FailureFileState>,
}

#[derive(Default)]
struct FailureFileState {
    file: Option<std::fs::File>,
    written: u64,
    full: bool,
}

impl FailureFile {
    fn new(path: PathBuf, limit: u64) -> Self {
        FailureFile {
            path,
            limit: if limit == 0 { 1 << 20 } else { limit },
            state: Mutex::default(),
        }
    }

    fn append(&self, failure: &Failure) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.full {
            return;
        }
        if state.file.is_none() {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
            {
                Ok(f) => {
                    state.written = f.metadata().map(|m| m.len()).unwrap_or(0);
                    state.file = Some(f);
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot open the task's stderr file; request failures are not logged there");
                    state.full = true;
                    return;
                }
            }
        }
        let mut line = format!(
            "{} request failed: {} {}\n",
            agora_proto::unix_millis(),
            failure.status().as_u16(),
            failure.message
        );
        if state.written + line.len() as u64 > self.limit {
            state.full = true;
            line = format!(
                "further request failures not logged: this file reached its limit of {} bytes\n",
                self.limit
            );
        }
        let n = line.len() as u64;
        if let Some(f) = state.file.as_mut() {
            if f.write_all(line.as_bytes()).is_err() {
                state.full = true;
            }
        }
        state.written += n;
    }
}

/// Appends one line to a task's file, best effort.
fn note(path: &str, line: &str) {
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        tracing::debug!(path, error = %e, "cannot write to the task's file");
    }
}

fn ended(task_id: &str, state: TaskState, reason: Reason, message: String) -> ExecutorStatus {
    ExecutorStatus {
        task_id: task_id.to_string(),
        state: state as i32,
        reason: reason as i32,
        message,
        ..Default::default()
    }
}

fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "function host task failed");
    }
}

/// Short critical sections that cannot panic midway: a poisoned lock is still sound.
fn lock(running: &Running) -> MutexGuard<'_, HashMap<String, Arc<Notify>>> {
    running.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_become_tenant_names() {
        assert_eq!(tenant_name("*"), "default");
        assert_eq!(tenant_name(""), "default");
        assert_eq!(tenant_name("eng/web"), "eng.web");
        assert_eq!(tenant_name("a b"), "a_b");
        assert_eq!(tenant_name("/x"), "_x");
        assert!(crate::spec::check_name("tenant", &tenant_name(&"r".repeat(100))).is_ok());
    }

    #[test]
    fn specs_take_defaults_for_zeros() {
        let launch = ExecutorLaunch {
            task_id: "t".into(),
            module_path: "/m.wasm".into(),
            module_sha256: String::new(),
            memory_bytes: 0,
            timeout_ms: 0,
            fuel: 7,
            ..Default::default()
        };
        let info = FunctionInfo {
            name: "echo".into(),
            max_concurrency: 3,
            ..Default::default()
        };
        let spec = spec_of(&launch, &info);
        assert_eq!(spec.sha256, None);
        assert_eq!(spec.memory_limit, crate::DEFAULT_MEMORY_LIMIT);
        assert_eq!(spec.timeout, crate::DEFAULT_TIMEOUT);
        assert_eq!(
            (spec.fuel, spec.max_concurrency, spec.queue_len),
            (7, 3, 64)
        );
        assert_eq!(spec.tenant, "default");
        assert_eq!(drain_grace(&launch), Duration::from_secs(6));
    }

    #[test]
    fn failure_file_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        let log = FailureFile::new(path.clone(), 200);
        let f = Failure::new(crate::ErrorClass::Deadline, "deadline of 5s exceeded");
        for _ in 0..20 {
            log.append(&f);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("request failed: 504 deadline of 5s exceeded"),
            "{text}"
        );
        assert!(text.ends_with("limit of 200 bytes\n"), "{text}");
        assert!(text.len() < 200 + 100, "{}", text.len());
    }
}
