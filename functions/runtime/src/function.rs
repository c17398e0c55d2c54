//! A loaded function: its prepared guest, its limits, its queue and its metrics; and
//! the path of one request through them, including what its guest wrote for the logs
//! ([`CapturePipe`], [`GuestOutput`]) and where that goes ([`RequestLog`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use agora_proto::units::KIB;
use axum::http::Response;
use bytes::{Bytes, BytesMut};
use wasmtime::InstancePre;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::admission::{Admission, TenantSlots};
use crate::cgi;
use crate::guest::cgi_module::{self, CgiCtx};
use crate::guest::http_component::{self, ProxyCtx};
use crate::host::FunctionHost;
use crate::limits::RequestLimits;
use crate::metrics::{FunctionIdentity, FunctionMetrics, MetricsSnapshot};
use crate::outbound::OutboundAllowList;
use crate::outcome::{self, Failure};
use crate::request::FunctionRequest;
use crate::spec::{FunctionSpec, GuestKind};

/// After the deadline, how long a CGI request waits for the epoch to stop its guest
/// (so that a guest running wasm is classified by what it was doing, its fuel
/// counted) before its future is dropped: a guest waiting in a host call (e.g. a
/// sleep) never sees the epoch, and dropping the future ends it.
const CGI_DEADLINE_GRACE: Duration = Duration::from_millis(50);

/// The prepared guest: imports resolved once, instantiated per request.
pub(crate) enum Guest {
    Cgi(InstancePre<CgiCtx>),
    Http(ProxyPre<ProxyCtx>),
}

impl Guest {
    pub(crate) fn kind(&self) -> GuestKind {
        match self {
            Guest::Cgi(_) => GuestKind::CgiModule,
            Guest::Http(_) => GuestKind::HttpComponent,
        }
    }
}

/// A function ready to serve: every request gets a fresh instance of its module, with
/// the function's limits, after waiting (boundedly) for a slot.
pub struct Function {
    host: Arc<FunctionHost>,
    name: String,
    tenant: Arc<TenantSlots>,
    sha256: String,
    guest: Guest,
    limits: RequestLimits,
    /// Where its components' outgoing HTTP requests may go.
    outbound: OutboundAllowList,
    admission: Admission,
    metrics: FunctionMetrics,
    /// Told each request that failed or whose guest wrote output (set once; see
    /// `set_request_log`).
    request_log: OnceLock<Box<dyn RequestLog>>,
}

impl Function {
    pub(crate) fn new(
        host: Arc<FunctionHost>,
        spec: FunctionSpec,
        sha256: String,
        guest: Guest,
        tenant: Arc<TenantSlots>,
    ) -> Self {
        let limits = RequestLimits {
            memory: spec.memory_limit,
            fuel: (spec.fuel > 0).then_some(spec.fuel),
            timeout: spec.timeout,
            output: host.config().output_limit,
        };
        Function {
            admission: Admission::new(spec.max_concurrency, spec.queue_len, spec.max_queue_wait),
            host,
            name: spec.name,
            tenant,
            sha256,
            guest,
            limits,
            outbound: spec.allowed_outbound_hosts,
            metrics: FunctionMetrics::default(),
            request_log: OnceLock::new(),
        }
    }

    /// Has `log` told, from now on, every request that failed or whose guest wrote
    /// output (the function host executor writes them to the task's stderr file).
    /// Only the first call takes effect.
    pub fn set_request_log(&self, log: Box<dyn RequestLog>) {
        let _ = self.request_log.set(log);
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tenant that owns it.
    pub fn tenant(&self) -> &str {
        &self.tenant.name
    }

    /// Its guest style.
    pub fn kind(&self) -> GuestKind {
        self.guest.kind()
    }

    /// sha256 of its module.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Its metrics now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot(FunctionIdentity {
            name: self.name.clone(),
            tenant: self.tenant.name.clone(),
            kind: self.kind(),
            sha256: self.sha256.clone(),
        })
    }

    /// Serves one request and always answers: the guest's response, or the
    /// [`Failure`]'s status and reason.
    pub async fn invoke(&self, request: FunctionRequest) -> Response<Bytes> {
        match self.try_invoke(request).await {
            Ok(response) => response,
            Err(failure) => failure.to_response(&self.name),
        }
    }

    /// Serves one request: waits for a slot (boundedly), runs a fresh instance with the
    /// function's limits, and returns the guest's response or why there is none.
    pub async fn try_invoke(
        &self,
        mut request: FunctionRequest,
    ) -> Result<Response<Bytes>, Failure> {
        let body = std::mem::take(&mut request.body);
        match self
            .invoke_reading(request, std::future::ready(Ok((body, ()))))
            .await
        {
            Reading::Served(result) => result,
            // The body was already read.
            Reading::BodyFailed(_) => Err(Failure::new(
                crate::outcome::ErrorClass::Internal,
                "the request body could not be read",
            )),
        }
    }

    /// Serves one request whose body is still arriving: takes the request's slots
    /// first (waiting in the queue, boundedly), and only then reads its body with
    /// `body`, so the bodies held in memory are bounded by the function's concurrency.
    /// What `body` gives besides the bytes (e.g. a memory reservation) is kept until
    /// the guest has ended. A body that fails is answered with the response `body`
    /// gave (a client's fault: not counted in the function's metrics).
    pub async fn invoke_reading<F, G>(&self, mut request: FunctionRequest, body: F) -> Reading
    where
        F: std::future::Future<Output = Result<(Bytes, G), Response<axum::body::Body>>>,
    {
        let started = Instant::now();
        let admitted = self
            .admission
            .admit(
                &self.tenant,
                self.host.instance_slots(),
                self.metrics.queued_gauge(),
            )
            .await;
        let mut output = GuestOutput::default();
        let (result, fuel) = match admitted {
            Err(failure) => {
                self.metrics.record_request();
                (Err(failure), 0)
            }
            Ok(permits) => {
                let held = match body.await {
                    Ok((bytes, held)) => {
                        request.body = bytes;
                        held
                    }
                    Err(answer) => return Reading::BodyFailed(answer),
                };
                self.metrics.record_request();
                let _running = self.metrics.running();
                let ran = match &self.guest {
                    Guest::Cgi(pre) => {
                        // A CGI guest's stdout is its response: only stderr is output.
                        let stderr = CapturePipe::new();
                        let ran = self.run_cgi(pre, request, permits, stderr.clone()).await;
                        output.stderr = stderr.take();
                        ran
                    }
                    Guest::Http(pre) => {
                        let (stdout, stderr) = (CapturePipe::new(), CapturePipe::new());
                        let ran = http_component::run(
                            self.host.engine(),
                            pre,
                            request,
                            &self.limits,
                            &self.outbound,
                            &self.metrics,
                            (stdout.clone(), stderr.clone()),
                        )
                        .await;
                        drop(permits);
                        output.stdout = stdout.take();
                        output.stderr = stderr.take();
                        ran
                    }
                };
                drop(held);
                ran
            }
        };
        let class = result.as_ref().err().map(|f| f.class);
        self.metrics.record_end(class, started.elapsed(), fuel);
        if let Err(failure) = &result {
            tracing::debug!(function = %self.name, status = failure.status().as_u16(), reason = %failure.message, "request failed");
        }
        if result.is_err() || !output.is_empty() {
            if let Some(log) = self.request_log.get() {
                log.record(&output, result.as_ref().err());
            }
        }
        Reading::Served(result)
    }

    /// The request deadline: how long one request's guest may run.
    pub fn timeout(&self) -> Duration {
        self.limits.timeout
    }

    /// Refuses queued and future requests; those running finish.
    pub(crate) fn retire(&self) {
        self.admission.close();
    }

    /// Runs a CGI guest in this task (wasmtime's async API), holding the slots until
    /// the guest has ended: at the latest at the deadline, when its future is dropped,
    /// or when this request's future is dropped (its client went away). Its stderr
    /// goes to `stderr` (read by the caller, also after a deadline).
    async fn run_cgi(
        &self,
        pre: &InstancePre<CgiCtx>,
        request: FunctionRequest,
        permits: crate::admission::Permits,
        stderr: CapturePipe,
    ) -> (Result<Response<Bytes>, Failure>, u64) {
        let env = cgi::meta_variables(&self.name, &request);
        let ran = cgi_module::run(
            self.host.engine(),
            pre,
            &self.name,
            &env,
            request.body,
            &self.limits,
            stderr,
        );
        let ran = tokio::time::timeout(self.limits.timeout + CGI_DEADLINE_GRACE, ran).await;
        // The instance is gone either way (ended, or dropped with its future).
        drop(permits);
        match ran {
            Ok(ran) => ran,
            Err(_) => (Err(outcome::deadline(self.limits.timeout)), 0),
        }
    }
}

/// How [`Function::invoke_reading`] ended.
#[derive(Debug)]
pub enum Reading {
    /// The request was admitted and ran, or was refused by admission: the guest's
    /// answer or why there is none.
    Served(Result<Response<Bytes>, Failure>),
    /// Its body could not be read (too large, too slow, cut off): the answer to send.
    BodyFailed(Response<axum::body::Body>),
}

impl Reading {
    /// The HTTP answer, whichever way it ended.
    pub fn into_response(self, function: &str) -> Response<axum::body::Body> {
        match self {
            Reading::Served(Ok(response)) => response.map(axum::body::Body::from),
            Reading::Served(Err(failure)) => {
                failure.to_response(function).map(axum::body::Body::from)
            }
            Reading::BodyFailed(response) => response,
        }
    }
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("name", &self.name)
            .field("tenant", &self.tenant.name)
            .field("kind", &self.kind())
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// Receives each request of a function that failed or whose guest wrote output: both
/// in one call, so a log can keep one request's lines together. Called on the request
/// path, after the answer is ready and before it is sent: keep it cheap.
pub trait RequestLog: Send + Sync {
    /// One request ended: what its guest wrote (maybe nothing) and why it failed, if
    /// it did. Silent successful requests are not recorded.
    fn record(&self, output: &GuestOutput, failure: Option<&Failure>);
}

/// The most of each of a guest's diagnostic streams kept per request for the
/// request log; the rest is dropped (the guest's writes still succeed).
pub const GUEST_OUTPUT_LIMIT: usize = 16 * KIB as usize;

/// What one request's guest wrote for the logs: a component's stdout and stderr, a
/// CGI guest's stderr (its stdout is the response).
#[derive(Debug, Default)]
pub struct GuestOutput {
    /// What it wrote on stdout.
    pub stdout: Captured,
    /// What it wrote on stderr.
    pub stderr: Captured,
}

impl GuestOutput {
    /// The guest wrote nothing.
    pub fn is_empty(&self) -> bool {
        self.stdout.bytes.is_empty() && self.stderr.bytes.is_empty()
    }
}

/// One captured stream: its first [`GUEST_OUTPUT_LIMIT`] bytes.
#[derive(Debug, Default)]
pub struct Captured {
    /// The bytes kept.
    pub bytes: Bytes,
    /// The guest wrote more, which was dropped.
    pub truncated: bool,
}

/// A guest's stdout or stderr, kept in memory up to [`GUEST_OUTPUT_LIMIT`]. Unlike
/// wasmtime's `MemoryOutputPipe` it never fails a write: past the limit bytes are
/// dropped and the capture marked truncated, so a chatty guest (whose `eprintln!`
/// would panic on a failed write) is never failed for logging. Its buffer is only
/// allocated when the guest writes.
#[derive(Clone, Default)]
pub(crate) struct CapturePipe {
    shared: Arc<Mutex<Capture>>,
}

#[derive(Default)]
struct Capture {
    bytes: BytesMut,
    truncated: bool,
}

/// Most bytes a guest may hand over in one write (what `check_write` allows); the
/// pipe takes any amount, this only bounds the guest's buffers.
const PIPE_PERMIT: usize = 64 * KIB as usize;

impl CapturePipe {
    pub(crate) fn new() -> Self {
        CapturePipe::default()
    }

    /// Takes what was written so far (later writes start over; nobody reads them
    /// after a request has been recorded).
    pub(crate) fn take(&self) -> Captured {
        let mut capture = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        Captured {
            bytes: std::mem::take(&mut capture.bytes).freeze(),
            truncated: std::mem::take(&mut capture.truncated),
        }
    }

    fn push(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut capture = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let room = GUEST_OUTPUT_LIMIT.saturating_sub(capture.bytes.len());
        if data.len() > room {
            capture.truncated = true;
        }
        capture
            .bytes
            .extend_from_slice(data.get(..room).unwrap_or(data));
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturePipe {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturePipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(PIPE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for CapturePipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CapturePipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturePipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::outcome::ErrorClass;
    use crate::spec::ModuleSource;
    use crate::HostConfig;

    /// One recorded request: stdout, stderr, their truncation, the failure's reason.
    type Entry = (String, String, bool, bool, Option<String>);

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Entry>>>);

    impl RequestLog for Recorder {
        fn record(&self, output: &GuestOutput, failure: Option<&Failure>) {
            self.0.lock().unwrap().push((
                String::from_utf8_lossy(&output.stdout.bytes).into_owned(),
                String::from_utf8_lossy(&output.stderr.bytes).into_owned(),
                output.stdout.truncated,
                output.stderr.truncated,
                failure.map(|f| f.message.clone()),
            ));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<Entry> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn host(dir: &Path) -> Arc<FunctionHost> {
        FunctionHost::new(HostConfig {
            cache_dir: Some(dir.to_path_buf()),
            max_instances: 8,
            max_memory_per_instance: 256 << 20,
            ..HostConfig::default()
        })
        .unwrap()
    }

    fn load(host: &Arc<FunctionHost>, spec: FunctionSpec) -> (Arc<Function>, Recorder) {
        let function = host.load(spec).unwrap();
        let log = Recorder::default();
        function.set_request_log(Box::new(log.clone()));
        (function, log)
    }

    fn wat_spec(name: &str, wat: &str) -> FunctionSpec {
        let bytes = wat::parse_str(wat).unwrap();
        FunctionSpec::new(name, "tests", ModuleSource::Bytes(Bytes::from(bytes)))
    }

    /// A CGI guest writing `stderr` (WAT string syntax) to stderr, `count` times, then either answering
    /// `ok` or trapping.
    fn cgi_wat(stderr: &str, count: u32, then: &str) -> String {
        format!(
            r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "Content-Type: text/plain\r\n\r\nok\n")
  (data (i32.const 2048) "{stderr}")
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start") (local $i i32)
    (block $done (loop $again
      (br_if $done (i32.ge_u (local.get $i) (i32.const {count})))
      (call $write (i32.const 2) (i32.const 2048) (i32.const {len}))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $again)))
    {then}))"#,
            len = stderr.replace("\\n", "\n").len(),
            then = if then == "trap" {
                "unreachable"
            } else {
                "(call $write (i32.const 1) (i32.const 1024) (i32.const 31))"
            },
        )
    }

    #[tokio::test]
    async fn cgi_stderr_and_failures_reach_the_request_log() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        let echo = FunctionSpec::new(
            "echo",
            "tests",
            ModuleSource::Path(agora_guest_examples::wasm_path("echo")),
        );
        let (echo, log) = load(&host, echo);
        let mut request = FunctionRequest::get("/a/b");
        request.body = Bytes::from_static(b"hello");
        assert_eq!(echo.try_invoke(request).await.unwrap().status(), 200);
        assert_eq!(
            log.take(),
            vec![(
                String::new(),
                "echo: GET /a/b 5 bytes\n".into(),
                false,
                false,
                None
            )]
        );

        // Silent successful requests are not recorded.
        let silent = wat_spec("silent", &cgi_wat("", 0, "answer"));
        let (silent, log) = load(&host, silent);
        assert_eq!(silent.invoke(FunctionRequest::get("/")).await.status(), 200);
        assert_eq!(log.take(), vec![]);

        // A failure, with what the guest wrote before it.
        let trap = wat_spec("trap", &cgi_wat("about to trap\\n", 1, "trap"));
        let (trap, log) = load(&host, trap);
        let failure = trap
            .try_invoke(FunctionRequest::get("/"))
            .await
            .unwrap_err();
        let entries = log.take();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0].1, "about to trap\n");
        assert_eq!(entries[0].4.as_deref(), Some(failure.message.as_str()));
    }

    #[tokio::test]
    async fn guest_output_is_capped_without_failing_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        // 40 writes of 1000 bytes: 40 000 bytes, more than the cap.
        let line = format!("{}\\n", "x".repeat(999));
        let (chatty, log) = load(&host, wat_spec("chatty", &cgi_wat(&line, 40, "answer")));
        let response = chatty.try_invoke(FunctionRequest::get("/")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.body().as_ref(), b"ok\n");
        let entries = log.take();
        assert_eq!(entries.len(), 1);
        let (_, stderr, _, truncated, failure) = &entries[0];
        assert_eq!(stderr.len(), GUEST_OUTPUT_LIMIT);
        assert!(stderr.starts_with("xxx"));
        assert!(*truncated);
        assert_eq!(*failure, None);
    }

    #[tokio::test]
    async fn component_stdout_and_stderr_reach_the_request_log() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        let mut spec = FunctionSpec::new("hello", "tests", ModuleSource::Path(hello_http()));
        spec.timeout = Duration::from_millis(300);
        let (hello, log) = load(&host, spec);
        for _ in 0..2 {
            let response = hello
                .try_invoke(FunctionRequest::get("/x?y=1"))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        let said = (
            "hello-http: GET /x?y=1\n".to_string(),
            String::new(),
            false,
            false,
            None,
        );
        assert_eq!(log.take(), vec![said.clone(), said]);

        // Output written before a deadline is kept with the failure.
        let failure = hello
            .try_invoke(FunctionRequest::get("/spin"))
            .await
            .unwrap_err();
        assert_eq!(failure.class, ErrorClass::Deadline);
        assert_eq!(
            log.take(),
            vec![(
                "hello-http: GET /spin\n".into(),
                "hello-http: spinning until stopped\n".into(),
                false,
                false,
                Some(failure.message)
            )]
        );
    }

    fn hello_http() -> PathBuf {
        agora_guest_examples::component_path("hello-http")
    }
}
