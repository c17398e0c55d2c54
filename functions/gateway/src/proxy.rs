//! The master's HTTP server for functions:
//!
//! - `/fn/{name}` and `/fn/{name}/{*path}`, any method: forwarded, path, query,
//!   headers and body unchanged, to the agent of a running host (least busy first);
//!   held while a host starts when there is none (cold start), within bounds;
//! - `GET /fn`: the functions with their hosts, target and metrics, as JSON;
//! - `GET /fn-metrics` (and `GET /fn/-/metrics`): per-function metrics summed over
//!   the agents, as JSON (the functions crate's `MetricsSnapshot`);
//! - `GET /metrics`: the same in Prometheus's text format (see `prometheus`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agora_proto::units::{format_bytes, format_duration};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::{Response, StatusCode, Uri};
use axum::routing::{any, get};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::Full;

use super::load::{http_client, Http};
use super::service::{Lease, WaitError};
use super::{Functions, MAX_BODY, MAX_HOST_WAIT};

#[derive(Clone)]
struct App {
    functions: Arc<Functions>,
    http: Http,
}

pub(crate) fn router(functions: Arc<Functions>) -> Router {
    Router::new()
        .route("/fn", get(list))
        .route("/fn/", get(list))
        .route("/fn-metrics", get(metrics))
        .route("/fn/-/metrics", get(metrics))
        .route("/metrics", get(prometheus_metrics))
        .route("/fn/{name}", any(forward))
        .route("/fn/{name}/", any(forward))
        .route("/fn/{name}/{*path}", any(forward))
        .with_state(App {
            functions,
            http: http_client(),
        })
}

/// Serves until aborted.
pub(crate) async fn serve(listener: tokio::net::TcpListener, functions: Arc<Functions>) {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = router(functions).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("master HTTP server stopped: {e}");
    }
}

async fn list(State(app): State<App>) -> Json<serde_json::Value> {
    let functions: Vec<serde_json::Value> = app
        .functions
        .list()
        .into_iter()
        .map(|f| {
            let spec = f.spec.unwrap_or_default();
            let module = spec.module.unwrap_or_default();
            let info = spec.function.unwrap_or_default();
            let metrics: serde_json::Value = if f.metrics_json.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&f.metrics_json).unwrap_or(serde_json::Value::Null)
            };
            serde_json::json!({
                "name": spec.name,
                "role": spec.role,
                "tenant": info.tenant,
                "sha256": module.sha256,
                "fuel": module.fuel,
                "timeout_ms": module.timeout_ms,
                "memory_bytes": info.memory_bytes,
                "max_concurrency": info.max_concurrency,
                "queue_len": info.queue_len,
                "allowed_outbound_hosts": info.allowed_outbound_hosts,
                "tenant_limit": info.tenant_limit.map(|l| serde_json::json!({
                    "max_concurrency": l.max_concurrency,
                    "queue_len": l.queue_len,
                    "max_queue_wait_ms": l.max_queue_wait_ms,
                })),
                "min_instances": spec.min_instances,
                "max_instances": spec.max_instances,
                "target": f.target,
                "last_failure": (!f.last_failure.is_empty()).then_some(f.last_failure),
                "instances": f.instances.iter().map(|i| serde_json::json!({
                    "task_id": i.task_id,
                    "agent_id": i.agent_id,
                    "http_address": i.http_address,
                    "state": i.state().as_str_name(),
                })).collect::<Vec<_>>(),
                "metrics": metrics,
            })
        })
        .collect();
    Json(serde_json::Value::Array(functions))
}

async fn metrics(State(app): State<App>) -> Json<Vec<agora_fn_api::MetricsSnapshot>> {
    Json(app.functions.metrics())
}

async fn prometheus_metrics(State(app): State<App>) -> Response<Body> {
    let functions: Vec<_> = app
        .functions
        .list()
        .into_iter()
        .map(|f| {
            let spec = f.spec.unwrap_or_default();
            let tenant = spec.function.map(|i| i.tenant).unwrap_or_default();
            let metrics = serde_json::from_str(&f.metrics_json).ok();
            let running = f
                .instances
                .iter()
                .filter(|i| i.state() == agora_proto::v1::TaskState::TaskRunning)
                .count();
            let counts = super::prometheus::HostCounts {
                running,
                target: f.target,
            };
            (spec.name, tenant, metrics, counts)
        })
        .collect();
    let mut r = Response::new(Body::from(super::prometheus::render(&functions)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn retry_later(status: StatusCode, secs: u64, text: String) -> Response<Body> {
    let mut r = plain(status, text);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// Headers that describe one hop, not the request (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut axum::http::HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

async fn forward(State(app): State<App>, request: Request) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let name = path
        .strip_prefix("/fn/")
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    if !app.functions.is_deployed(&name) {
        return plain(
            StatusCode::NOT_FOUND,
            format!(
                "no function named {name:?} is deployed; deploy one with `agora fn deploy {name} FILE.wasm` (see `agora fn ls`)\n"
            ),
        );
    }
    let too_big = || {
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "function {name}: request body larger than the limit of {}\n",
                format_bytes(MAX_BODY as u64)
            ),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_big();
    }
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => return too_big(),
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("function {name}: cannot read the request body: {e}\n"),
            )
        }
    };

    let lease = match app.functions.lease(&name) {
        Some(l) => l,
        None => match app.functions.wait_for_host(&name, MAX_HOST_WAIT).await {
            Ok(l) => l,
            Err(WaitError::Unknown) => {
                return plain(
                    StatusCode::NOT_FOUND,
                    format!("function {name:?} was removed while the request waited for a host\n"),
                )
            }
            Err(WaitError::Full) => {
                return retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    1,
                    format!("function {name}: too many requests are waiting for a host to start; retry shortly\n"),
                )
            }
            Err(WaitError::Timeout(last)) => {
                let why = last.map(|l| format!(" (last failure: {l})")).unwrap_or_default();
                return retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    5,
                    format!(
                        "function {name}: no host became ready within {}{why}; the cluster may lack free resources (see `agora fn ls`, `agora explain`)\n",
                        format_duration(MAX_HOST_WAIT)
                    ),
                );
            }
            Err(WaitError::HostFailed(why)) => {
                return plain(
                    StatusCode::BAD_GATEWAY,
                    format!("function {name}: its host could not start: {why}\n"),
                )
            }
        },
    };

    let remote = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip().to_string());
    strip_hop_by_hop(&mut parts.headers);
    if let Some(ip) = remote {
        let value = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::try_from(value) {
            parts.headers.insert("x-forwarded-for", v);
        }
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let limit = request_limit(&app.functions, &name);

    // One more agent is tried when the first cannot be connected to (it just went
    // away): the request never reached a guest, so it is safe to send again.
    let mut lease = lease;
    let mut tried_again = false;
    loop {
        let uri: Uri = match format!("http://{}{}", lease.addr, path_and_query).parse() {
            Ok(u) => u,
            Err(e) => {
                return plain(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "function {name}: agent address {} is not usable: {e}\n",
                        lease.addr
                    ),
                )
            }
        };
        let mut req = hyper::Request::new(Full::new(body.clone()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers.clone();
        match tokio::time::timeout(limit, app.http.request(req)).await {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                return finish(resp, lease);
            }
            Ok(Err(e)) if e.is_connect() && !tried_again => {
                tracing::warn!(function = %name, agent = %lease.addr, "cannot connect to the agent: {e}; trying another host");
                tried_again = true;
                match app.functions.lease(&name) {
                    Some(l) => lease = l,
                    None => {
                        return retry_later(
                            StatusCode::SERVICE_UNAVAILABLE,
                            1,
                            format!("function {name}: the agent at {} did not take the request ({e}) and no other host runs\n", lease.addr),
                        )
                    }
                }
            }
            Ok(Err(e)) => {
                return plain(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "function {name}: forwarding to the agent at {} failed: {e}\n",
                        lease.addr
                    ),
                )
            }
            Err(_) => {
                return plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "function {name}: the agent at {} did not answer within {}\n",
                        lease.addr,
                        format_duration(limit)
                    ),
                )
            }
        }
    }
}

/// The response, with the lease held until its body is sent (so the agent counts as
/// busy meanwhile).
fn finish(resp: hyper::Response<hyper::body::Incoming>, lease: Lease) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let body = LeasedBody {
        body,
        _lease: lease,
    };
    Response::from_parts(parts, Body::new(body))
}

struct LeasedBody {
    body: hyper::body::Incoming,
    _lease: Lease,
}

impl hyper::body::Body for LeasedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        hyper::body::Body::poll_frame(std::pin::Pin::new(&mut self.body), cx)
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::Body::size_hint(&self.body)
    }
}

/// How long one forwarded request may take: the function's own deadline and queue
/// wait, plus slack for the hops.
fn request_limit(functions: &Functions, name: &str) -> Duration {
    let s = functions.lock();
    let (timeout_ms, wait_ms) = s.planner.function(name).map_or((0, 0), |f| {
        (
            f.spec.module.as_ref().map_or(0, |m| m.timeout_ms),
            f.spec.function.as_ref().map_or(0, |i| i.max_queue_wait_ms),
        )
    });
    let timeout_ms = if timeout_ms == 0 { 5_000 } else { timeout_ms };
    let wait_ms = if wait_ms == 0 { 1_000 } else { wait_ms };
    Duration::from_millis(timeout_ms + wait_ms + 30_000)
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
