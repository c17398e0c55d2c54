//! The gateway: the built-in functions framework and the HTTP front door for
//! functions that `agora master` and `agora dev` run beside the master.
//!
//! `agora fn deploy` reaches the master as an operator request, which hands it to
//! this crate through the master's `FunctionsDoor` (the cli connects the two). The
//! deploy is kept in the master's registry as this framework's state (SET_STATE,
//! acknowledged once durable) before it is answered, and comes back in SUBSCRIBED
//! after a master restart. The functions framework, a framework like any other
//! written with `agora-sdk` and connected to the master with the cluster's client
//! certificate, places function hosts on agents through
//! offers (a host is a task with `TaskInfo.function`, run by `agora executor fn`),
//! scales them by the load it reads from the agents' `GET /fn-metrics`, and kills
//! them after idle. The master's HTTP server forwards `/fn/NAME/...` to an agent with
//! a running host, and holds requests for a function without one while a host starts
//! (cold start).
//!
//! - `planner`: the pure decisions (how many hosts, which to launch and kill);
//! - `service`: the state shared by the operator API, the framework and the HTTP
//!   server (deployed specs, hosts, load, requests waiting for a host);
//! - `framework`: the sdk loop carrying out the planner's decisions;
//! - `load`: polling the agents' metrics, and summing them per function;
//! - `proxy`: the HTTP routes (`/fn/...`, `/fn`, `/fn-metrics`, `/metrics`);
//! - `prometheus`: `/metrics` in Prometheus's text format.
//!
//! What this crate must never do: link wasmtime (it uses `agora-fn-api` for what it
//! shares with the runtime), depend on the master's crates, or write the master's
//! registry other than through the scheduler API; it reaches the master only through
//! `agora-sdk`.

mod error;
mod framework;
mod load;
pub mod planner;
mod prometheus;
mod proxy;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use error::{Error, Result};
pub use framework::{function_of_task, FRAMEWORK_NAME};
pub use service::{normalize, Functions, LeaderHttp, DEFAULT_HOST_CPUS_MILLI, HOST_MEM_MARGIN};

use std::sync::Arc;

use agora_proto::v1::{operator_request, OperatorResponse};

/// How the gateway runs its functions framework and HTTP server.
#[derive(Debug, Clone)]
pub struct FunctionsConfig {
    /// Where the HTTP server listens (`/fn/...`, `/fn`, `/fn-metrics`); None: no HTTP.
    pub http: Option<SocketAddr>,
    /// Whether a failure to listen there stops the master. A default address that is
    /// taken (several masters on one machine) only costs the HTTP server, said in the
    /// log; an address the operator asked for must work.
    pub http_required: bool,
    /// The cluster's CA and a client certificate and key (role client), which the
    /// framework subscribes with.
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Hosts of a function that has had no request for this long are stopped, down
    /// to its `min_instances`.
    pub idle_timeout: Duration,
}

/// Largest request or response body the master forwards, enforced while it
/// streams: the one limit of every hop (`agora_http_forward::MAX_BODY`).
pub const MAX_BODY: u64 = agora_http_forward::MAX_BODY;
/// Longest a request waits at the master for a host of its function to start.
pub const MAX_HOST_WAIT: Duration = Duration::from_secs(30);
/// Requests of one function that may wait at the master for a host at once.
pub const MAX_WAITERS: u32 = 1024;

/// What the fuzzer (`fuzz/fuzz_targets/master_http_door.rs`) needs to drive the
/// front door in-process, with no master and no framework running: not part of the
/// gateway's API, and nothing the gateway itself calls.
#[doc(hidden)]
pub mod fuzzing {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;

    use agora_fn_api::MetricsSnapshot;
    use agora_proto::v1::TaskState;

    use crate::service::StateStore;
    use crate::Functions;

    /// The front door's routes, exactly as `agora master --http` serves them.
    pub fn router(functions: Arc<Functions>) -> axum::Router {
        crate::proxy::router(functions)
    }

    /// A state store that keeps nothing.
    struct Forget;

    impl StateStore for Forget {
        fn set(
            &self,
            _key: String,
            _value: Option<Vec<u8>>,
        ) -> Pin<Box<dyn Future<Output = crate::Result<()>> + Send + '_>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// Makes `functions` act as if its framework had subscribed, keeping what is
    /// deployed in memory only (so that [`Functions::deploy`] works without a master).
    pub fn subscribe_in_memory(functions: &Functions) {
        functions.set_store(Arc::new(Forget));
    }

    /// Records a running host `task_id` of the deployed function `name` on agent
    /// `agent_id`, whose HTTP door is at `agent_http` (host:port), as the framework
    /// does from the host's status updates and the agents' list.
    pub fn run_host(
        functions: &Functions,
        name: &str,
        task_id: &str,
        agent_id: &str,
        agent_http: &str,
    ) {
        let now = crate::now_ms();
        {
            let mut s = functions.lock();
            s.planner.launched(task_id, name, agent_id, now);
            s.planner
                .update(task_id, None, agent_id, TaskState::TaskRunning, "", now);
            s.agent_http
                .insert(agent_id.to_string(), agent_http.to_string());
        }
        functions.hosts_changed();
    }

    /// Records what the agent at `agent_http` last answered to `GET /fn-metrics`, as
    /// the load poller does.
    pub fn set_agent_metrics(
        functions: &Functions,
        agent_http: &str,
        metrics: Vec<MetricsSnapshot>,
    ) {
        functions
            .lock()
            .metrics
            .insert(agent_http.to_string(), metrics);
    }
}

pub(crate) use framework::run as run_framework;
pub(crate) use proxy::serve as serve_http;

/// The gateway before it is started: its state exists (so that the master can be
/// given its operator door first), its framework and HTTP server do not run yet.
pub struct Gateway {
    cfg: FunctionsConfig,
    functions: Arc<Functions>,
}

/// A running gateway; dropping it (or [`GatewayHandle::stop`]) stops it.
pub struct GatewayHandle {
    /// Where the HTTP server listens, when it runs.
    pub http_addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl GatewayHandle {
    pub fn stop(self) {}
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Gateway {
    pub fn new(cfg: FunctionsConfig) -> Gateway {
        let functions = Functions::new(cfg.idle_timeout);
        Gateway { cfg, functions }
    }

    /// The state the operator requests act on (see [`Functions::operator`]).
    pub fn functions(&self) -> Arc<Functions> {
        self.functions.clone()
    }

    /// Listens for HTTP (as configured) and starts the framework, which dials the
    /// master at `master` like any client would.
    pub async fn start(self, master: SocketAddr) -> Result<GatewayHandle> {
        let fc = &self.cfg;
        // Agents whose doors serve HTTPS are verified against the cluster's CA,
        // and shown the gateway's client certificate.
        let id = agora_net::tls::Identity::load(&fc.ca, &fc.client_cert, &fc.client_key)?;
        self.functions
            .set_agent_tls(agora_net::tls::http_client_config(&id)?);
        let mut tasks = Vec::new();
        let mut http_addr = None;
        if let Some(bind) = fc.http {
            match tokio::net::TcpListener::bind(bind).await {
                Ok(listener) => {
                    let local = listener.local_addr()?;
                    http_addr = Some(local);
                    tasks.push(tokio::spawn(serve_http(listener, self.functions.clone())));
                    tracing::info!(addr = %local, "master listening (HTTP: /fn/NAME/..., /fn, /fn-metrics)");
                }
                Err(e) if !fc.http_required => tracing::error!(
                    "cannot listen for HTTP on {bind}: {e}; functions are not served over HTTP by this master (pass --http ADDR with a free address)"
                ),
                Err(cause) => return Err(Error::HttpBind { bind, cause }),
            }
        }
        let dial = if master.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), master.port())
        } else {
            master
        };
        let client = agora_sdk::ClientConfig {
            // Its own master only: a gateway serves beside the master it belongs to
            // and never follows another (two gateways would fight over one id).
            master: dial.to_string(),
            masters: Vec::new(),
            local_only: true,
            ca: fc.ca.clone(),
            cert: fc.client_cert.clone(),
            key: fc.client_key.clone(),
            http: None,
            source: None,
        };
        tasks.push(tokio::spawn(run_framework(self.functions.clone(), client)));
        Ok(GatewayHandle { http_addr, tasks })
    }
}

impl Functions {
    /// Answers one `agora fn` operator request (as the master's door hands them
    /// over); a deploy's module was checked by the master.
    pub async fn operator(&self, request: operator_request::Request) -> OperatorResponse {
        let fail = |error: String| OperatorResponse {
            error,
            ..Default::default()
        };
        // After a restart, answer from the deployments the registry held.
        let _ = self.subscribed().await;
        match request {
            operator_request::Request::FnDeploy(d) => match self.deploy(d).await {
                Ok(spec) => OperatorResponse {
                    functions: self
                        .list()
                        .into_iter()
                        .filter(|s| s.spec.as_ref().is_some_and(|x| x.name == spec.name))
                        .collect(),
                    ..Default::default()
                },
                Err(e) => fail(e.to_string()),
            },
            operator_request::Request::FnRemove(r) => OperatorResponse {
                error: self
                    .remove(&r.name)
                    .await
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                ..Default::default()
            },
            operator_request::Request::FnTenantSet(r) => {
                match self.set_tenant_limit(r.limit.unwrap_or_default()).await {
                    // The role's functions, whose hosts are replaced to carry it.
                    Ok(names) => OperatorResponse {
                        tenant_limits: self.tenant_limits(),
                        functions: self
                            .list()
                            .into_iter()
                            .filter(|s| s.spec.as_ref().is_some_and(|d| names.contains(&d.name)))
                            .collect(),
                        ..Default::default()
                    },
                    Err(e) => fail(e.to_string()),
                }
            }
            operator_request::Request::FnTenantList(_) => OperatorResponse {
                tenant_limits: self.tenant_limits(),
                ..Default::default()
            },
            operator_request::Request::FnList(_) => OperatorResponse {
                functions: self.list(),
                ..Default::default()
            },
            _ => fail("not a functions request".into()),
        }
    }
}

/// Milliseconds on the gateway's monotonic clock: the planner's idle timeouts and
/// load readings are timed by it, so a step of the system clock cannot stop or start
/// hosts.
pub(crate) fn now_ms() -> u64 {
    static CLOCK: std::sync::OnceLock<agora_net::Monotonic> = std::sync::OnceLock::new();
    CLOCK.get_or_init(agora_net::Monotonic::new).now_ms()
}
