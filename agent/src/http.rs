//! The agent's HTTP server: `/fn/NAME[/PATH]` (any method) proxied to a function
//! host of NAME on this agent, and `GET /fn-metrics` summed over the local hosts.
//!
//! Each function host (a task with `TaskInfo.function`, run by `agora executor fn`)
//! serves HTTP on `<sandbox>/fn.sock`. The shell keeps [`Routes`] in step with the
//! core's RUNNING hosts; a request goes to the host of its function with the fewest
//! requests in flight, over a pooled HTTP/1.1 connection on that socket. Method,
//! path, query and headers are passed on through `agora_http_forward`, the one
//! forwarding path the master's front door uses too: the same hop-by-hop list, the
//! same body limit, and bodies streamed both ways (never collected here). The agent
//! knows no deployments: a function with no RUNNING host here gets 503 with
//! `Retry-After`, saying the master routes to one.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use agora_fn_api::MetricsSnapshot;
use agora_http_forward::plain_text as plain;
use agora_http_forward::{BoxError, Forward, Limits, ResponseBody};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::{Method, Response, StatusCode, Uri};
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use agora_proto::units::{format_bytes, format_duration};
use agora_proto::v1::FunctionInfo;

use crate::tenants::{self, GateCounts, Refusal, TenantGate};
use agora_agent_core::{sandbox_dir, TaskKey};

/// Largest request body passed to a host (more gets 413) and largest response body
/// passed back (more gets 502, or a cut connection once it has started): the one
/// limit of every hop, the functions runtime's default output cap too.
pub const MAX_BODY: u64 = agora_http_forward::MAX_BODY;
/// Largest `/fn-metrics` answer read from one host.
const MAX_METRICS_BODY: usize = 4 << 20;
/// Idle connections kept per host.
const IDLE_PER_HOST: usize = 64;
/// A host always answers by its function's deadline (at most 15 minutes) plus its
/// queue wait; this only catches a host that hangs.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(16 * 60 + 30);
/// How long `/fn-metrics` waits for each host.
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);
/// `Retry-After` (seconds) when no host runs here.
const RETRY_AFTER_SECS: u32 = 1;

/// Where the agent serves HTTP.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Address to listen on (port 0 picks a free one).
    pub bind: SocketAddr,
    /// host:port told to the master instead of the bound address (e.g. behind NAT).
    pub advertise: Option<String>,
    /// When `bind`'s port is taken, use a free port of the same IP (with a warning)
    /// rather than fail: for a default port, so that several agents can share a
    /// machine. The master learns the port actually bound either way.
    pub any_port_if_taken: bool,
    /// Serve HTTPS only, with these settings (`--http-tls`,
    /// `agora_net::tls::http_server_config`); None: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The address to tell the master: the override, else the bound address, with an
/// unspecified IP (0.0.0.0, [::]) replaced by the agent's hostname. A door that
/// serves HTTPS is told as `https://host:port` (the gateway reads the scheme), a
/// plain one as `host:port`.
pub fn advertised_address(
    bound: SocketAddr,
    hostname: &str,
    advertise: Option<&str>,
    tls: bool,
) -> String {
    let address = match advertise.filter(|a| !a.is_empty()) {
        Some(a) => a
            .strip_prefix("https://")
            .or_else(|| a.strip_prefix("http://"))
            .unwrap_or(a)
            .trim_end_matches('/')
            .to_string(),
        None if bound.ip().is_unspecified() => format!("{hostname}:{}", bound.port()),
        None => bound.to_string(),
    };
    if tls {
        format!("https://{address}")
    } else {
        address
    }
}

/// The hosts of each function on this agent, kept in step with the core by the
/// shell (see `Routes::replace`).
#[derive(Default)]
pub struct Routes {
    by_name: RwLock<HashMap<String, FunctionRoute>>,
}

/// Where one function's requests go, and the gate of its tenant's limit, if any.
#[derive(Clone)]
struct FunctionRoute {
    hosts: Vec<Arc<HostLink>>,
    gate: Option<Arc<TenantGate>>,
    counts: Arc<GateCounts>,
}

impl Routes {
    /// Takes the core's current hosts (`AgentCore::serving_function_hosts`). Hosts
    /// that stay keep their pooled connections and in-flight counts; tenants whose
    /// limit stays keep their gate.
    pub fn replace<'a>(
        &self,
        hosts: impl IntoIterator<Item = (&'a TaskKey, &'a FunctionInfo)>,
        work_dir: &Path,
    ) {
        let hosts: Vec<(&TaskKey, &FunctionInfo)> = hosts.into_iter().collect();
        let limits = tenants::strictest(
            hosts
                .iter()
                .map(|(_, f)| (f.tenant.as_str(), f.tenant_limit.as_ref())),
        );
        let mut by_name = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        let old_links: HashMap<TaskKey, Arc<HostLink>> = by_name
            .values()
            .flat_map(|r| &r.hosts)
            .map(|h| (h.key.clone(), Arc::clone(h)))
            .collect();
        let mut gates: HashMap<String, Arc<TenantGate>> = HashMap::new();
        for (tenant, limit) in limits {
            let kept = by_name
                .values()
                .filter_map(|r| r.gate.as_ref())
                .find(|g| g.tenant() == tenant && *g.limit() == limit)
                .cloned();
            let gate = kept.unwrap_or_else(|| Arc::new(TenantGate::new(&tenant, limit)));
            gates.insert(tenant, gate);
        }
        let mut fresh: HashMap<String, FunctionRoute> = HashMap::new();
        for (key, info) in hosts {
            let route = fresh
                .entry(info.name.clone())
                .or_insert_with(|| FunctionRoute {
                    hosts: Vec::new(),
                    gate: gates.get(&info.tenant).cloned(),
                    counts: by_name
                        .get(&info.name)
                        .map(|r| Arc::clone(&r.counts))
                        .unwrap_or_default(),
                });
            let link = old_links.get(key).cloned().unwrap_or_else(|| {
                let socket = agora_fn_api::socket_path(&sandbox_dir(work_dir, key));
                Arc::new(HostLink::new(key.clone(), socket))
            });
            route.hosts.push(link);
        }
        *by_name = fresh;
    }

    /// The route of `name`, its hosts least busy first.
    fn route(&self, name: &str) -> Option<FunctionRoute> {
        let mut route = self
            .by_name
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()?;
        route
            .hosts
            .sort_by_key(|h| h.in_flight.load(Ordering::Relaxed));
        Some(route)
    }

    fn all(&self) -> Vec<Arc<HostLink>> {
        self.by_name
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .flat_map(|r| r.hosts.iter().cloned())
            .collect()
    }

    /// Each routed function's tenant-gate counts.
    fn gate_counts(&self) -> Vec<(String, Arc<GateCounts>)> {
        self.by_name
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, r)| (name.clone(), Arc::clone(&r.counts)))
            .collect()
    }

    /// Number of hosts routed to (for tests and status).
    pub fn len(&self) -> usize {
        self.all().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request body on its way to a host (the client's, streaming, or none).
type HostBody = UnsyncBoxBody<Bytes, BoxError>;

/// One host's socket, with pooled HTTP/1.1 connections to it.
struct HostLink {
    key: TaskKey,
    socket: PathBuf,
    in_flight: AtomicUsize,
    idle: Mutex<Vec<SendRequest<HostBody>>>,
}

/// Why a request could not be passed to a host.
enum Upstream {
    /// Nothing was sent (the host is gone or not listening): another host may try.
    Unreachable(String),
    /// Sent, but no usable answer came back.
    Failed(StatusCode, String),
}

/// One request counted as in flight at a host until its response body is done.
struct InFlight(Arc<HostLink>);

impl InFlight {
    fn new(link: &Arc<HostLink>) -> Self {
        link.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(link))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HostLink {
    fn new(key: TaskKey, socket: PathBuf) -> Self {
        HostLink {
            key,
            socket,
            in_flight: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends the request `attempt` makes and returns the response as soon as its head
    /// has come, its body streaming. The request counts as in flight, and its
    /// connection goes back to the pool, only once that body has been read to its
    /// end. `attempt` is called again (once) when a pooled connection turns out
    /// closed before the request went on it; None from it means the request cannot
    /// be sent again.
    async fn send(
        self: &Arc<Self>,
        attempt: impl Fn() -> Option<hyper::Request<HostBody>>,
    ) -> Result<hyper::Response<ResponseBody<Incoming>>, Upstream> {
        let in_flight = InFlight::new(self);
        let (mut sender, pooled) = match self.pooled().await {
            Some(s) => (s, true),
            None => (self.connect().await?, false),
        };
        let Some(request) = attempt() else {
            return Err(self.body_gone());
        };
        let response =
            match tokio::time::timeout(UPSTREAM_TIMEOUT, sender.send_request(request)).await {
                Ok(Ok(r)) => r,
                // A pooled connection the host had closed: the request never went on
                // it, so its body is untouched and it can go on a fresh one.
                Ok(Err(e)) if e.is_canceled() && pooled => {
                    sender = self.connect().await?;
                    let Some(again) = attempt() else {
                        return Err(self.body_gone());
                    };
                    match tokio::time::timeout(UPSTREAM_TIMEOUT, sender.send_request(again)).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => return Err(self.failed(&e)),
                        Err(_) => return Err(self.timed_out()),
                    }
                }
                Ok(Err(e)) => return Err(self.failed(&e)),
                Err(_) => return Err(self.timed_out()),
            };
        let link = Arc::clone(self);
        Ok(response.map(|body| {
            // The limit is the front door's (`Forward::response`); this wrapper only
            // ties the connection and the count to the body's life.
            ResponseBody::new(body, u64::MAX)
                .hold(in_flight)
                .on_complete(move || link.put_back(sender))
        }))
    }

    async fn pooled(&self) -> Option<SendRequest<HostBody>> {
        loop {
            let mut sender = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()?;
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn put_back(&self, sender: SendRequest<HostBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_PER_HOST {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<HostBody>, Upstream> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            Upstream::Unreachable(format!(
                "cannot connect to the host of task {} at {}: {e}",
                self.key.1,
                self.socket.display()
            ))
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                Upstream::Unreachable(format!(
                    "HTTP handshake with the host of task {} failed: {e}",
                    self.key.1
                ))
            })?;
        let task = self.key.1.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(task = %task, error = %e, "connection to a function host ended");
            }
        });
        Ok(sender)
    }

    fn failed(&self, e: &hyper::Error) -> Upstream {
        Upstream::Failed(
            StatusCode::BAD_GATEWAY,
            format!("the host of task {} failed to answer: {e}", self.key.1),
        )
    }

    fn body_gone(&self) -> Upstream {
        Upstream::Failed(
            StatusCode::BAD_GATEWAY,
            format!(
                "the request body already went to another host, so it cannot go to the host of task {}",
                self.key.1
            ),
        )
    }

    fn timed_out(&self) -> Upstream {
        Upstream::Failed(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the host of task {} did not answer within {}",
                self.key.1,
                format_duration(UPSTREAM_TIMEOUT)
            ),
        )
    }
}

#[derive(Clone)]
struct App {
    routes: Arc<Routes>,
}

/// The router: `/fn/{name}`, `/fn/{name}/{*path}` (any method) and `GET /fn-metrics`.
pub fn router(routes: Arc<Routes>) -> Router {
    Router::new()
        .route("/fn/{name}", any(proxy))
        .route("/fn/{name}/", any(proxy))
        .route("/fn/{name}/{*path}", any(proxy))
        .route("/fn-metrics", get(metrics))
        .with_state(App { routes })
}

/// Serves `router` on `listener` until the future is dropped (TCP_NODELAY on, client
/// addresses passed on as `X-Forwarded-For`).
/// Connections are capped and request heads timed and bounded
/// (`agora_http_forward::serve`).
/// With `tls`, HTTPS only (`agora_http_forward::serve::serve_tls`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: Arc<Routes>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let gate = agora_net::gate::Gate::new("agent HTTP", agora_http_forward::serve::DEFAULT_CAPS);
    match tls {
        Some(tls) => {
            agora_http_forward::serve::serve_tls(listener, router(routes), gate, "agent HTTP", tls)
                .await
        }
        None => agora_http_forward::serve(listener, router(routes), gate, "agent HTTP").await,
    }
}

async fn proxy(State(app): State<App>, request: Request) -> Response<Body> {
    let Some(name) = function_name(request.uri()).map(str::to_string) else {
        return plain(
            StatusCode::NOT_FOUND,
            "no function named in the path; use /fn/NAME/...\n".into(),
        );
    };
    let Some(route) = app.routes.route(&name) else {
        return no_host(&name);
    };
    let too_big = || {
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "function {name}: request body larger than the agent's limit of {}\n",
                format_bytes(MAX_BODY)
            ),
        )
    };
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    let forward = match Forward::new(request, client, Limits::both(MAX_BODY)) {
        Ok(f) => f,
        Err(_) => return too_big(),
    };
    let path_and_query = forward.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = match path_and_query.parse() {
        Ok(u) => u,
        Err(e) => {
            return plain(StatusCode::BAD_REQUEST, format!("bad request path: {e}\n"));
        }
    };
    // The tenant's slot is held until the host's answer has been sent.
    let tenant_slot = match &route.gate {
        None => None,
        Some(gate) => match gate.admit(&name, &route.counts).await {
            Ok(permit) => Some(permit),
            Err(refusal) => return refused(refusal),
        },
    };
    let attempt = || {
        forward
            .attempt(uri.clone())
            .map(|r| r.map(|body| body.map_err(BoxError::from).boxed_unsync()))
    };
    let mut last_error = String::new();
    for host in route.hosts {
        match host.send(attempt).await {
            Ok(response) => {
                return match forward.response(response) {
                    Ok(r) => r.map(|body| Body::new(body.hold(tenant_slot))),
                    Err(t) => {
                        let e = format!(
                            "the response of {} from the host of task {} is larger than the agent's limit of {}",
                            format_bytes(t.declared.unwrap_or(t.limit)),
                            host.key.1,
                            format_bytes(t.limit)
                        );
                        tracing::warn!(function = %name, "{e}");
                        plain(StatusCode::BAD_GATEWAY, format!("function {name}: {e}\n"))
                    }
                };
            }
            Err(_) if forward.body_too_large() => return too_big(),
            Err(_) if forward.client_body_failed() => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("function {name}: the request body was cut off\n"),
                )
            }
            // Gone between the routing table and now (killed, crashed): nothing
            // was sent, so another host may take the request.
            Err(Upstream::Unreachable(e)) => {
                tracing::debug!(function = %name, "{e}");
                last_error = e;
            }
            Err(Upstream::Failed(status, e)) => {
                tracing::warn!(function = %name, "{e}");
                return plain(status, format!("function {name}: {e}\n"));
            }
        }
    }
    tracing::debug!(function = %name, "no reachable host: {last_error}");
    no_host(&name)
}

/// NAME in `/fn/NAME[/...]`, from the raw path.
fn function_name(uri: &Uri) -> Option<&str> {
    let rest = uri.path().strip_prefix("/fn/")?;
    let name = rest.split('/').next().unwrap_or("");
    (!name.is_empty()).then_some(name)
}

fn refused(refusal: Refusal) -> Response<Body> {
    let (status, message, retry_after) = match refusal {
        Refusal::Full {
            message,
            retry_after,
        } => (StatusCode::TOO_MANY_REQUESTS, message, retry_after),
        Refusal::Waited {
            message,
            retry_after,
        } => (StatusCode::SERVICE_UNAVAILABLE, message, retry_after),
    };
    tracing::debug!(status = status.as_u16(), "{message}");
    let mut r = plain(status, format!("{message}\n"));
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

fn no_host(name: &str) -> Response<Body> {
    let mut r = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no host of function {name} runs on this agent; call it through the master's HTTP address, which routes to an agent that hosts it\n"
        ),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    r
}

/// `GET /fn-metrics`: each function's metrics summed over this agent's hosts, sorted
/// by name (the functions runtime's `MetricsSnapshot`, as JSON). Hosts that do not
/// answer within [`METRICS_TIMEOUT`] are left out (and logged).
async fn metrics(State(app): State<App>) -> Response<Body> {
    let mut queries = tokio::task::JoinSet::new();
    for host in app.routes.all() {
        queries.spawn(async move {
            let request = || {
                let mut request = hyper::Request::new(
                    Empty::<Bytes>::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                );
                *request.method_mut() = Method::GET;
                *request.uri_mut() = Uri::from_static("/fn-metrics");
                Some(request)
            };
            let answer = tokio::time::timeout(METRICS_TIMEOUT, async {
                let response = host.send(request).await?;
                if response.status() != StatusCode::OK {
                    return Ok(Err(response.status()));
                }
                Limited::new(response.into_body(), MAX_METRICS_BODY)
                    .collect()
                    .await
                    .map(|b| Ok(b.to_bytes()))
                    .map_err(|e| {
                        Upstream::Failed(
                            StatusCode::BAD_GATEWAY,
                            format!("cannot read the answer: {e}"),
                        )
                    })
            })
            .await;
            (host.key.1.clone(), answer)
        });
    }
    let mut by_name: BTreeMap<String, MetricsSnapshot> = BTreeMap::new();
    while let Some(done) = queries.join_next().await {
        let Ok((task, answer)) = done else { continue };
        let body = match answer {
            Ok(Ok(Ok(body))) => body,
            Ok(Ok(Err(status))) => {
                tracing::warn!(task = %task, status = %status, "a host answered /fn-metrics with an error");
                continue;
            }
            Ok(Err(Upstream::Unreachable(e) | Upstream::Failed(_, e))) => {
                tracing::warn!(task = %task, "cannot get a host's metrics: {e}");
                continue;
            }
            Err(_) => {
                tracing::warn!(task = %task, "a host did not answer /fn-metrics within {METRICS_TIMEOUT:?}");
                continue;
            }
        };
        match serde_json::from_slice::<Vec<MetricsSnapshot>>(&body) {
            Ok(snapshots) => {
                for s in snapshots {
                    match by_name.get_mut(&s.name) {
                        Some(sum) => sum.add(&s),
                        None => {
                            by_name.insert(s.name.clone(), s);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(task = %task, "a host's metrics are not valid JSON: {e}"),
        }
    }
    for (name, counts) in app.routes.gate_counts() {
        if let Some(m) = by_name.get_mut(&name) {
            counts.add_to(m);
        }
    }
    let list: Vec<MetricsSnapshot> = by_name.into_values().collect();
    match serde_json::to_vec(&list) {
        Ok(json) => {
            let mut r = Response::new(Body::from(json));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_address_replaces_unspecified_ips() {
        let any: SocketAddr = "0.0.0.0:7071".parse().unwrap();
        assert_eq!(
            advertised_address(any, "node-3", None, false),
            "node-3:7071"
        );
        let v6: SocketAddr = "[::]:80".parse().unwrap();
        assert_eq!(advertised_address(v6, "node-3", None, false), "node-3:80");
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            advertised_address(lo, "node-3", None, false),
            "127.0.0.1:5000"
        );
        assert_eq!(
            advertised_address(any, "node-3", Some("edge.example:80"), false),
            "edge.example:80"
        );
        // An HTTPS door is told with its scheme, whatever the override carried.
        assert_eq!(
            advertised_address(any, "node-3", None, true),
            "https://node-3:7071"
        );
        assert_eq!(
            advertised_address(any, "node-3", Some("https://edge.example:443/"), true),
            "https://edge.example:443"
        );
        assert_eq!(
            advertised_address(any, "node-3", Some("http://edge.example:80"), false),
            "edge.example:80"
        );
    }

    #[test]
    fn names_come_from_the_raw_path() {
        let n = |s: &str| function_name(&s.parse::<Uri>().unwrap()).map(str::to_string);
        assert_eq!(n("/fn/echo"), Some("echo".into()));
        assert_eq!(n("/fn/echo/x/y?z=1"), Some("echo".into()));
        assert_eq!(n("/fn/"), None);
        assert_eq!(n("/other"), None);
    }
}
