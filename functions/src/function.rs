//! A loaded function: its prepared guest, its limits, its queue and its metrics; and
//! the path of one request through them.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::http::Response;
use bytes::Bytes;
use wasmtime::InstancePre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::admission::{Admission, TenantSlots};
use crate::cgi;
use crate::guest::cgi_module::{self, CgiCtx};
use crate::guest::http_component::{self, ProxyCtx};
use crate::host::FunctionHost;
use crate::limits::RequestLimits;
use crate::metrics::{FunctionIdentity, FunctionMetrics, MetricsSnapshot};
use crate::outcome::{self, ErrorClass, Failure};
use crate::request::FunctionRequest;
use crate::spec::{FunctionSpec, GuestKind};

/// After the deadline, how long a CGI request waits for its guest to be stopped by
/// the epoch before it is answered anyway (a guest blocked in a host call, e.g. a
/// sleep, only sees the epoch when the call returns; its slot stays taken until then).
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
    admission: Admission,
    metrics: FunctionMetrics,
    /// Told the reason of every failed request (set once; see `set_failure_log`).
    failure_log: OnceLock<FailureLog>,
}

/// Receives the reason of each failed request of a function.
pub(crate) type FailureLog = Box<dyn Fn(&Failure) + Send + Sync>;

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
            metrics: FunctionMetrics::default(),
            failure_log: OnceLock::new(),
        }
    }

    /// Has `log` told the reason of every failed request from now on (the function
    /// host executor appends them to the task's stderr file). Only the first call
    /// takes effect.
    pub(crate) fn set_failure_log(&self, log: FailureLog) {
        let _ = self.failure_log.set(log);
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
    pub async fn try_invoke(&self, request: FunctionRequest) -> Result<Response<Bytes>, Failure> {
        let started = Instant::now();
        self.metrics.record_request();
        let (result, fuel) = match self
            .admission
            .admit(
                &self.tenant,
                self.host.instance_slots(),
                self.metrics.queued_gauge(),
            )
            .await
        {
            Err(failure) => (Err(failure), 0),
            Ok(permits) => {
                let _running = self.metrics.running();
                match &self.guest {
                    Guest::Cgi(pre) => self.run_cgi(pre, request, permits).await,
                    Guest::Http(pre) => {
                        let ran =
                            http_component::run(self.host.engine(), pre, request, &self.limits)
                                .await;
                        drop(permits);
                        ran
                    }
                }
            }
        };
        let class = result.as_ref().err().map(|f| f.class);
        self.metrics.record_end(class, started.elapsed(), fuel);
        if let Err(failure) = &result {
            tracing::debug!(function = %self.name, status = failure.status().as_u16(), reason = %failure.message, "request failed");
            if let Some(log) = self.failure_log.get() {
                log(failure);
            }
        }
        result
    }

    /// Refuses queued and future requests; those running finish.
    pub(crate) fn retire(&self) {
        self.admission.close();
    }

    /// Runs a CGI guest on a blocking thread (wasmtime's sync API blocks), holding the
    /// slots until the guest has really ended, even when the answer went earlier.
    async fn run_cgi(
        &self,
        pre: &InstancePre<CgiCtx>,
        request: FunctionRequest,
        permits: crate::admission::Permits,
    ) -> (Result<Response<Bytes>, Failure>, u64) {
        let env = cgi::meta_variables(&self.name, &request);
        let engine = self.host.engine().clone();
        let pre = pre.clone();
        let name = self.name.clone();
        let limits = self.limits;
        let job = tokio::task::spawn_blocking(move || {
            let ran = cgi_module::run(&engine, &pre, &name, &env, request.body, &limits);
            drop(permits);
            ran
        });
        match tokio::time::timeout(self.limits.timeout + CGI_DEADLINE_GRACE, job).await {
            Ok(Ok(ran)) => ran,
            Ok(Err(join_error)) => {
                // A panic in wasmtime or in our code: the request fails, the host lives.
                tracing::error!(function = %self.name, error = %join_error, "CGI request thread failed");
                (
                    Err(Failure::new(
                        ErrorClass::Internal,
                        "the host failed while running the function",
                    )),
                    0,
                )
            }
            Err(_) => (Err(outcome::deadline(self.limits.timeout)), 0),
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
