//! The agent's HTTP server: `/fn/NAME[/PATH]` (any method) proxied to a function
//! host of NAME on this agent, and `GET /fn-metrics` summed over the local hosts.
//!
//! Each function host (a task with `TaskInfo.function`, run by `agora executor fn`)
//! serves HTTP on `<sandbox>/fn.sock`. The shell keeps [`Routes`] in step with the
//! core's RUNNING hosts; a request goes to the host of its function with the fewest
//! requests in flight, over a pooled HTTP/1.1 connection on that socket. Method,
//! path, query, headers (less hop-by-hop ones) and body are passed on as they came;
//! bodies are buffered, with caps both ways, since function requests and responses
//! are bounded anyway. The agent knows no deployments: a function with no RUNNING
//! host here gets 503 with `Retry-After`, saying the master routes to one.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use agora_fn_api::MetricsSnapshot;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, Response, StatusCode, Uri};
use axum::routing::{any, get};
use axum::serve::ListenerExt as _;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use agora_proto::units::{format_bytes, format_duration};
use agora_proto::v1::FunctionInfo;

use crate::tenants::{self, GateCounts, Refusal, TenantGate};
use agora_agent_core::{sandbox_dir, TaskKey};

/// Largest request body passed to a host; more gets 413. The same as the functions
/// runtime's own default cap.
pub const MAX_REQUEST_BODY: usize = 16 << 20;
/// Largest response body taken from a host (a guest's output is capped at 16 MiB by
/// default; headers and slack on top); more gets 502.
pub const MAX_RESPONSE_BODY: usize = 17 << 20;
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
}

/// The address to tell the master: the override, else the bound address, with an
/// unspecified IP (0.0.0.0, [::]) replaced by the agent's hostname.
pub fn advertised_address(bound: SocketAddr, hostname: &str, advertise: Option<&str>) -> String {
    if let Some(a) = advertise.filter(|a| !a.is_empty()) {
        return a.to_string();
    }
    if bound.ip().is_unspecified() {
        format!("{hostname}:{}", bound.port())
    } else {
        bound.to_string()
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

/// One host's socket, with pooled HTTP/1.1 connections to it.
struct HostLink {
    key: TaskKey,
    socket: PathBuf,
    in_flight: AtomicUsize,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// Why a request could not be passed to a host.
enum Upstream {
    /// Nothing was sent (the host is gone or not listening): another host may try.
    Unreachable(String),
    /// Sent, but no usable answer came back.
    Failed(StatusCode, String),
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

    /// Sends `request` and returns the whole response (body capped).
    async fn send(&self, request: hyper::Request<Full<Bytes>>) -> Result<Response<Body>, Upstream> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = self.send_counted(request).await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn send_counted(
        &self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<Response<Body>, Upstream> {
        let (mut sender, pooled) = match self.pooled().await {
            Some(s) => (s, true),
            None => (self.connect().await?, false),
        };
        // Bodies are in memory, so the request can be sent again on a fresh
        // connection when a pooled one turns out closed before it was sent.
        let retry = pooled.then(|| clone_request(&request));
        let response =
            match tokio::time::timeout(UPSTREAM_TIMEOUT, sender.send_request(request)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if e.is_canceled() && retry.is_some() => {
                    sender = self.connect().await?;
                    let again = retry.expect("checked above");
                    match tokio::time::timeout(UPSTREAM_TIMEOUT, sender.send_request(again)).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => return Err(self.failed(&e)),
                        Err(_) => return Err(self.timed_out()),
                    }
                }
                Ok(Err(e)) => return Err(self.failed(&e)),
                Err(_) => return Err(self.timed_out()),
            };
        let (mut parts, body) = response.into_parts();
        let body = match Limited::new(body, MAX_RESPONSE_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let too_big = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                return Err(Upstream::Failed(
                    StatusCode::BAD_GATEWAY,
                    if too_big {
                        format!(
                            "the host's response is larger than the agent's limit of {}",
                            format_bytes(MAX_RESPONSE_BODY as u64)
                        )
                    } else {
                        format!("the host's response was cut off: {e}")
                    },
                ));
            }
        };
        self.put_back(sender);
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::from(body)))
    }

    async fn pooled(&self) -> Option<SendRequest<Full<Bytes>>> {
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

    fn put_back(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_PER_HOST {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Upstream> {
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

fn clone_request(r: &hyper::Request<Full<Bytes>>) -> hyper::Request<Full<Bytes>> {
    let mut copy = hyper::Request::new(r.body().clone());
    *copy.method_mut() = r.method().clone();
    *copy.uri_mut() = r.uri().clone();
    *copy.version_mut() = r.version();
    *copy.headers_mut() = r.headers().clone();
    copy
}

/// Headers that describe one connection, not the request (RFC 9110, 7.6.1), plus
/// those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
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
pub async fn serve(listener: tokio::net::TcpListener, routes: Arc<Routes>) {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let app = router(routes).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the agent's HTTP server stopped");
    }
}

async fn proxy(State(app): State<App>, request: Request) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let Some(name) = function_name(&parts.uri).map(str::to_string) else {
        return plain(
            StatusCode::NOT_FOUND,
            "no function named in the path; use /fn/NAME/...\n".into(),
        );
    };
    let Some(route) = app.routes.route(&name) else {
        return no_host(&name);
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_big = || {
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "function {name}: request body larger than the agent's limit of {}\n",
                format_bytes(MAX_REQUEST_BODY as u64)
            ),
        )
    };
    if declared.is_some_and(|n| n > MAX_REQUEST_BODY as u64) {
        return too_big();
    }
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BODY).await {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => return too_big(),
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("function {name}: cannot read the request body: {e}\n"),
            )
        }
    };
    let client = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    strip_hop_by_hop(&mut parts.headers);
    if let Some(ip) = client {
        if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
            parts
                .headers
                .append(HeaderName::from_static("x-forwarded-for"), v);
        }
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: Uri = match path_and_query.parse() {
        Ok(u) => u,
        Err(e) => {
            return plain(StatusCode::BAD_REQUEST, format!("bad request path: {e}\n"));
        }
    };
    // The tenant's slot is held until the host has answered.
    let _tenant_slot = match &route.gate {
        None => None,
        Some(gate) => match gate.admit(&name, &route.counts).await {
            Ok(permit) => Some(permit),
            Err(refusal) => return refused(refusal),
        },
    };
    let mut last_error = String::new();
    for host in route.hosts {
        let mut upstream = hyper::Request::new(Full::new(body.clone()));
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri.clone();
        *upstream.headers_mut() = parts.headers.clone();
        match host.send(upstream).await {
            Ok(response) => return response,
            // Gone between the routing table and now (killed, crashed): try another.
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
            let mut request = hyper::Request::new(Full::new(Bytes::new()));
            *request.method_mut() = Method::GET;
            *request.uri_mut() = Uri::from_static("/fn-metrics");
            let answer = tokio::time::timeout(METRICS_TIMEOUT, host.send(request)).await;
            (host.key.1.clone(), answer)
        });
    }
    let mut by_name: BTreeMap<String, MetricsSnapshot> = BTreeMap::new();
    while let Some(done) = queries.join_next().await {
        let Ok((task, answer)) = done else { continue };
        let body = match answer {
            Ok(Ok(r)) if r.status() == StatusCode::OK => {
                match axum::body::to_bytes(r.into_body(), MAX_RESPONSE_BODY).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(task = %task, "cannot read a host's metrics: {e}");
                        continue;
                    }
                }
            }
            Ok(Ok(r)) => {
                tracing::warn!(task = %task, status = %r.status(), "a host answered /fn-metrics with an error");
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

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_address_replaces_unspecified_ips() {
        let any: SocketAddr = "0.0.0.0:7071".parse().unwrap();
        assert_eq!(advertised_address(any, "node-3", None), "node-3:7071");
        let v6: SocketAddr = "[::]:80".parse().unwrap();
        assert_eq!(advertised_address(v6, "node-3", None), "node-3:80");
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(advertised_address(lo, "node-3", None), "127.0.0.1:5000");
        assert_eq!(
            advertised_address(any, "node-3", Some("edge.example:80")),
            "edge.example:80"
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
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
