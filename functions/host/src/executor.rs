//! `agora executor fn`: the function host executor, the process form of `agora-fn-runtime`.
//!
//! The agent starts one per function host task (its executor id is `fn-<task id>`, so
//! each host is a process of its own, in a cgroup of its own). It speaks the same link
//! as the wasm and native executors ([`agora_executor_link`]): it registers,
//! takes launches and kills, and reports statuses numbered and held until the agent
//! acknowledges them; when the agent goes away the hosts keep serving while it
//! reconnects, for up to the recovery timeout.
//!
//! A launch carrying `function` loads the module into the process's one
//! [`FunctionHost`] (compiled modules cached in the agent's cache directory, as the
//! wasm executor does), binds `<sandbox>/fn.sock` and serves the functions router on
//! it: the agent's HTTP server proxies `/fn/NAME/...` there. RUNNING carries the load
//! time as `instantiate_us`. The task's stderr file is the function's log
//! (`LogFile`): what each request's guest wrote (a CGI guest's stderr, a
//! component's stdout and stderr) and a line for each failed request with its status
//! and reason, so `agora fn logs` shows both. It rotates at the launch's output limit
//! (to `stderr.1`), keeping the newest lines. A kill stops accepting connections, lets
//! the requests in flight finish (bounded by [`drain_grace`]), removes the socket and
//! reports KILLED.

use std::future::IntoFuture as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_executor_link::{
    self as executor_link, recovery_timeout_from_env, LinkedExecutor, Outbox, Tasks, FLUSH_GRACE,
};
use agora_proto::units::format_bytes;
use agora_proto::v1::{ExecutorLaunch, ExecutorStatus, FunctionInfo, Reason, TaskState};
use tokio::net::UnixListener;
use tokio::sync::{oneshot, Notify};

use crate::error::{Error, Result};
use agora_fn_runtime::outbound::OutboundAllowList;
use agora_fn_runtime::{router, FunctionHost, FunctionRegistry, HostConfig, HttpConfig};
use agora_fn_runtime::{Failure, GuestOutput, RequestLog, GUEST_OUTPUT_LIMIT};
use agora_fn_runtime::{FunctionSpec, ModuleSource, MAX_NAME_LEN};

/// The Unix socket a host serves HTTP on, in its task's sandbox (beside `stdout`).
pub use agora_fn_api::{socket_path, SOCKET_NAME};
/// Most a kill waits for the requests in flight, whatever the function's deadline.
const MAX_DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Tenant of a function whose owner is the default role (`*`) or not given.
pub const DEFAULT_TENANT: &str = "default";

/// Runs the executor until the agent says `shutdown` (an `Ok` end, after stopping
/// every host). A failed first connection, a malformed frame, or an agent that does
/// not come back within the recovery timeout is an error.
pub async fn run_executor(
    socket: &Path,
    framework_id: &str,
    executor_id: &str,
    cache_dir: Option<PathBuf>,
) -> Result<()> {
    let recovery_timeout = recovery_timeout_from_env();
    // One engine and instance pool per process, built before the first launch so a
    // cold start pays only for loading the module.
    let host = FunctionHost::new(HostConfig {
        cache_dir,
        ..HostConfig::default()
    })
    .map_err(Error::Host)?;
    let mut executor = Executor {
        host,
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
    result
}

/// A running host's stop signal.
type Stop = Arc<Notify>;

struct Executor {
    host: Arc<FunctionHost>,
    link: Tasks<Stop>,
}

impl LinkedExecutor for Executor {
    type Entry = Stop;
    const RUNS: &'static str = "function hosts";

    agora_executor_link::link_field!(link);

    fn launch(&mut self, launch: ExecutorLaunch) {
        let stop = Arc::new(Notify::new());
        if !self.link.admit(&launch, Arc::clone(&stop)) {
            return;
        }
        let host = Arc::clone(&self.host);
        let outbox = Arc::clone(&self.link.outbox);
        let running = Arc::clone(&self.link.running);
        self.link.set.spawn(async move {
            let status = serve_host(&launch, host, &outbox, stop).await;
            outbox.finish(&running, &launch.task_id, status);
        });
    }

    fn kill(entry: &Self::Entry) {
        entry.notify_one();
    }

    /// Stops every host and waits (bounded) for all of them to report.
    async fn stop_all(&mut self) {
        for stop in self.link.lock().values() {
            stop.notify_one();
        }
        // Each host bounds its own drain; this only guards against a bug there.
        let bound = MAX_DRAIN_GRACE + FLUSH_GRACE;
        self.link.drain(bound, Self::RUNS).await;
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
    let spec = match spec_of(launch, info) {
        Ok(spec) => spec,
        Err(message) => return fail(Reason::InvalidTask, message),
    };
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
    function.set_request_log(Box::new(LogFile::new(
        PathBuf::from(&launch.stderr_path),
        launch.output_limit_bytes,
    )));
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
    let app = router(Arc::clone(&registry), http_config(launch));
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

/// The router's settings for a launch: the default body limits, with room for as
/// many bytes of request bodies at once as one request's instance may use (the host's
/// cgroup holds one instance's memory and a margin), and as long for a body to arrive
/// as the function's deadline; at least the defaults (32 MiB, 30 s).
pub fn http_config(launch: &ExecutorLaunch) -> HttpConfig {
    let default = HttpConfig::default();
    HttpConfig {
        body_budget: default.body_budget.max(launch.memory_bytes),
        body_timeout: default
            .body_timeout
            .max(Duration::from_millis(launch.timeout_ms)),
        ..default
    }
}

/// How long a kill waits for the requests in flight: one request's deadline and a
/// second, at most [`MAX_DRAIN_GRACE`].
pub fn drain_grace(launch: &ExecutorLaunch) -> Duration {
    let deadline = if launch.timeout_ms > 0 {
        Duration::from_millis(launch.timeout_ms)
    } else {
        agora_fn_runtime::DEFAULT_TIMEOUT
    };
    (deadline + Duration::from_secs(1)).min(MAX_DRAIN_GRACE)
}

/// The function's spec from the launch: per-request limits from the module fields
/// (0: the runtime's default), serving limits and the allowed outbound hosts from
/// `FunctionInfo` (0: default). Fails on an allowed outbound host that does not parse
/// (the master checks them at deploy, so only a launch from elsewhere has one).
fn spec_of(launch: &ExecutorLaunch, info: &FunctionInfo) -> Result<FunctionSpec, String> {
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
    spec.allowed_outbound_hosts = OutboundAllowList::parse(&info.allowed_outbound_hosts)
        .map_err(|e| format!("function {}: {e}", info.name))?;
    Ok(spec)
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

/// A function host's log, the task's stderr file: each request that wrote output or
/// failed is one entry, written in one piece under a lock (entries of concurrent
/// requests never interleave): the guest's output as it wrote it (stdout, then
/// stderr; `[output truncated at 16KiB]` after a stream that was cut), then, if the
/// request failed, `<unix ms> request failed: <status> <reason>`.
///
/// An entry that would take the file past its limit first renames it to `stderr.1`
/// (replacing the older one) and starts a new one, so at most twice the limit is kept
/// and the newest entries survive; an entry is cut to the limit. Write errors (a full
/// disk) drop the entry; they are logged once until a write works again.
pub(crate) struct LogFile {
    path: PathBuf,
    rotated: PathBuf,
    limit: u64,
    state: Mutex<LogFileState>,
}

#[derive(Default)]
struct LogFileState {
    file: Option<std::fs::File>,
    /// Bytes in the current file.
    written: u64,
    /// An error was logged and no write has worked since.
    failing: bool,
}

/// Limit of a log file when the launch gives none.
const DEFAULT_LOG_LIMIT: u64 = 1 << 20;

impl LogFile {
    /// The log at `path`, rotated at `limit` bytes (0: 1 MiB).
    pub(crate) fn new(path: PathBuf, limit: u64) -> Self {
        let mut rotated = path.clone().into_os_string();
        rotated.push(".1");
        LogFile {
            path,
            rotated: PathBuf::from(rotated),
            limit: if limit == 0 { DEFAULT_LOG_LIMIT } else { limit },
            state: Mutex::default(),
        }
    }

    /// Appends one entry as a unit, rotating first when it would not fit; an entry
    /// over the limit is cut to it (still ending in a newline).
    fn append(&self, mut entry: Vec<u8>) {
        if entry.is_empty() {
            return;
        }
        if entry.len() as u64 > self.limit {
            entry.truncate(usize::try_from(self.limit - 1).unwrap_or(usize::MAX));
            entry.push(b'\n');
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let written = self.write(&mut state, &entry);
        match written {
            Ok(()) => {
                if std::mem::take(&mut state.failing) {
                    tracing::info!(path = %self.path.display(), "writing the function's log again");
                }
            }
            Err(e) => {
                // Reopen (and re-measure) next time: a partial write may have landed.
                state.file = None;
                if !std::mem::replace(&mut state.failing, true) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write the function's log; dropping entries until it works again");
                }
            }
        }
    }

    fn write(&self, state: &mut LogFileState, entry: &[u8]) -> std::io::Result<()> {
        let len = entry.len() as u64;
        if state.file.is_none() {
            let file = open_log(&self.path, false)?;
            state.written = file.metadata().map(|m| m.len()).unwrap_or(0);
            state.file = Some(file);
        }
        if state.written > 0 && state.written.saturating_add(len) > self.limit {
            state.file = None;
            let fresh = match std::fs::rename(&self.path, &self.rotated) {
                Ok(()) => open_log(&self.path, false)?,
                // Cannot keep the older half: start over in place, still bounded.
                Err(e) => {
                    tracing::debug!(path = %self.path.display(), error = %e, "cannot rotate the function's log; truncating it");
                    open_log(&self.path, true)?
                }
            };
            state.written = 0;
            state.file = Some(fresh);
        }
        let Some(file) = state.file.as_mut() else {
            return Ok(());
        };
        file.write_all(entry)?;
        state.written += len;
        Ok(())
    }
}

fn open_log(path: &Path, truncate: bool) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true);
    if truncate {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    options.open(path)
}

impl RequestLog for LogFile {
    fn record(&self, output: &GuestOutput, failure: Option<&Failure>) {
        let mut entry = Vec::with_capacity(
            output.stdout.bytes.len()
                + output.stderr.bytes.len()
                + if failure.is_some() { 128 } else { 0 },
        );
        for stream in [&output.stdout, &output.stderr] {
            if stream.bytes.is_empty() {
                continue;
            }
            entry.extend_from_slice(&stream.bytes);
            if !stream.bytes.ends_with(b"\n") {
                entry.push(b'\n');
            }
            if stream.truncated {
                entry.extend_from_slice(
                    format!(
                        "[output truncated at {}]\n",
                        format_bytes(GUEST_OUTPUT_LIMIT as u64)
                    )
                    .as_bytes(),
                );
            }
        }
        if let Some(failure) = failure {
            // One line, whatever the reason holds.
            let reason = failure.message.replace(['\n', '\r'], " ");
            entry.extend_from_slice(
                format!(
                    "{} request failed: {} {reason}\n",
                    agora_net::unix_millis(),
                    failure.status().as_u16(),
                )
                .as_bytes(),
            );
        }
        self.append(entry);
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
        assert!(agora_fn_runtime::is_valid_name(&tenant_name(
            &"r".repeat(100)
        )));
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
        let spec = spec_of(&launch, &info).unwrap();
        assert_eq!(spec.sha256, None);
        assert_eq!(spec.memory_limit, agora_fn_runtime::DEFAULT_MEMORY_LIMIT);
        assert_eq!(spec.timeout, agora_fn_runtime::DEFAULT_TIMEOUT);
        assert_eq!(
            (spec.fuel, spec.max_concurrency, spec.queue_len),
            (7, 3, 64)
        );
        assert_eq!(spec.tenant, "default");
        assert_eq!(drain_grace(&launch), Duration::from_secs(6));
        assert!(spec.allowed_outbound_hosts.is_empty());
    }

    #[test]
    fn specs_carry_the_allowed_outbound_hosts() {
        let launch = ExecutorLaunch::default();
        let mut info = FunctionInfo {
            name: "fetch".into(),
            allowed_outbound_hosts: vec![
                "https://*.example.com".into(),
                "http://[::1]:8080".into(),
            ],
            ..Default::default()
        };
        let spec = spec_of(&launch, &info).unwrap();
        assert_eq!(
            spec.allowed_outbound_hosts.entries().collect::<Vec<_>>(),
            ["https://*.example.com", "http://[::1]:8080"]
        );
        info.allowed_outbound_hosts.push("ftp://x".into());
        let message = spec_of(&launch, &info).unwrap_err();
        assert!(
            message.contains("function fetch") && message.contains("\"ftp://x\""),
            "{message}"
        );
    }

    fn failed(reason: &str) -> Failure {
        Failure::new(agora_fn_runtime::ErrorClass::Deadline, reason)
    }

    fn output(stderr: &str) -> GuestOutput {
        GuestOutput {
            stderr: agora_fn_runtime::Captured {
                bytes: bytes::Bytes::copy_from_slice(stderr.as_bytes()),
                truncated: false,
            },
            ..GuestOutput::default()
        }
    }

    #[test]
    fn log_file_keeps_entries_whole_and_tells_failures_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        let log = LogFile::new(path.clone(), 0);
        log.record(&output("hello from the guest"), None);
        let mut cut = output("x");
        cut.stdout = agora_fn_runtime::Captured {
            bytes: bytes::Bytes::from_static(b"printed\n"),
            truncated: true,
        };
        log.record(&cut, Some(&failed("deadline of 5s exceeded\nsecond line")));
        log.record(&GuestOutput::default(), None);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[0], "hello from the guest");
        assert_eq!(lines[1], "printed");
        assert_eq!(lines[2], "[output truncated at 16KiB]");
        assert_eq!(lines[3], "x");
        let (ms, rest) = lines[4].split_once(' ').unwrap();
        assert!(ms.parse::<u64>().is_ok(), "{text}");
        assert_eq!(
            rest,
            "request failed: 504 deadline of 5s exceeded second line"
        );
    }

    #[test]
    fn log_file_rotates_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        let rotated = dir.path().join("stderr.1");
        let limit = 200;
        let log = LogFile::new(path.clone(), limit);
        for i in 0..100 {
            log.record(&output(&format!("request {i:03}")), None);
        }
        log.record(
            &output(&format!("request {:03}", 100)),
            Some(&failed("deadline of 5s exceeded")),
        );
        let newest = std::fs::read_to_string(&path).unwrap();
        let older = std::fs::read_to_string(&rotated).unwrap();
        assert!(
            newest.ends_with("request failed: 504 deadline of 5s exceeded\n"),
            "{newest}"
        );
        assert!(newest.contains("request 100\n"), "{newest}");
        assert!(newest.len() as u64 <= limit, "{}", newest.len());
        assert!(older.len() as u64 <= limit, "{}", older.len());
        // Whole entries on both sides, and the older file holds the lines just before.
        assert!(
            older.starts_with("request ") && older.ends_with('\n'),
            "{older}"
        );
        let first_newest: u32 = newest.lines().next().unwrap()[8..].parse().unwrap();
        let last_older: u32 = older.lines().last().unwrap()[8..].parse().unwrap();
        assert_eq!(last_older + 1, first_newest, "{older}|{newest}");

        // An entry larger than the limit is cut to it, and sizes stay bounded.
        log.record(&output(&"y".repeat(500)), None);
        let cut = std::fs::read_to_string(&path).unwrap();
        assert_eq!(cut.len() as u64, limit);
        assert!(cut.ends_with("yy\n"), "{cut}");
        assert!(std::fs::metadata(&rotated).unwrap().len() <= limit);
        // A host restarted on the same file continues from its size.
        let again = LogFile::new(path.clone(), limit);
        again.record(&output("after restart"), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after restart\n");
    }
}
