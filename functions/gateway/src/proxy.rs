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

use agora_http_forward::plain_text as plain;
use agora_http_forward::{Forward, Limits, RequestBody};
use agora_proto::units::{format_bytes, format_duration};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::{Response, StatusCode, Uri};
use axum::response::IntoResponse as _;
use axum::routing::{any, get};
use axum::{Json, Router};
use hyper_util::client::legacy::Client as HttpClient;

use super::load::{agent_url, http_client, AgentConnector};
use super::service::WaitError;
use super::{Functions, MAX_BODY, MAX_HOST_WAIT};

/// The pooled client to the agents, streaming each client's body as it comes.
type Http = HttpClient<AgentConnector, RequestBody<Body>>;

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
            http: http_client(functions.agent_tls()),
            functions,
        })
}

/// Serves until aborted.
/// Connections are capped and request heads timed and bounded
/// (`agora_http_forward::serve`).
pub(crate) async fn serve(listener: tokio::net::TcpListener, functions: Arc<Functions>) {
    let gate = agora_net::gate::Gate::new("master HTTP", agora_http_forward::serve::DEFAULT_CAPS);
    agora_http_forward::serve(listener, router(functions), gate, "master HTTP").await
}

/// While this gateway's master follows another that leads, a request is sent on to
/// the leader's HTTP front door (307 keeps the method and body), as Mesos's
/// followers redirect to the leading master.
fn leader_redirect(app: &App, uri: &Uri) -> Option<Response<Body>> {
    let leader = app.functions.leader_http()?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = format!("http://{leader}{path}");
    let mut r = plain(
        StatusCode::TEMPORARY_REDIRECT,
        format!("this master does not lead its group; the leader serves at {location}\n"),
    );
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_str(&location).ok()?);
    Some(r)
}

async fn list(State(app): State<App>, uri: Uri) -> Response<Body> {
    if let Some(to) = leader_redirect(&app, &uri) {
        return to;
    }
    list_here(app).into_response()
}

fn list_here(app: App) -> Json<serde_json::Value> {
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

fn retry_later(status: StatusCode, secs: u64, text: String) -> Response<Body> {
    let mut r = plain(status, text);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

async fn forward(State(app): State<App>, request: Request) -> Response<Body> {
    let name = request
        .uri()
        .path()
        .strip_prefix("/fn/")
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    // Another master leads: send the caller there, even if this gateway still
    // knows hosts from when its master led (its routing is no longer kept up).
    if let Some(to) = leader_redirect(&app, request.uri()) {
        return to;
    }
    if !app.functions.is_subscribed() {
        // Its master does not serve it (yet): starting, or a follower of a group.
        return retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            1,
            "the functions framework beside this master has not subscribed: the master is starting, or it does not lead its group (see `agora masters`; call the leading master's HTTP address)\n".into(),
        );
    }
    if !app.functions.is_deployed(&name) {
        return plain(
            StatusCode::NOT_FOUND,
            format!(
                "no function named {name:?} is deployed; deploy one with `agora fn deploy {name} FILE.wasm` (see `agora fn ls`)\n"
            ),
        );
    }
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    // The body is not read here: it streams to the agent once a host is leased,
    // held to the limit as it goes (a declared length over it is refused now).
    let forward = match Forward::new(request, client, Limits::both(MAX_BODY)) {
        Ok(f) => f,
        Err(_) => return too_big(&name),
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

    let path_and_query = forward
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let limit = request_limit(&app.functions, &name);

    // One more agent is tried when the first cannot be connected to (it just went
    // away): the request never reached a guest and its body was not touched, so it
    // is safe to send again.
    let mut lease = lease;
    let mut tried_again = false;
    loop {
        let uri: Uri = match agent_url(&lease.addr, &path_and_query).parse() {
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
        let Some(upstream) = forward.attempt(uri) else {
            return plain(
                StatusCode::BAD_GATEWAY,
                format!(
                    "function {name}: the agent at {} failed after the request body was sent\n",
                    lease.addr
                ),
            );
        };
        match tokio::time::timeout(limit, app.http.request(upstream)).await {
            Ok(Ok(response)) => {
                return match forward.response(response) {
                    // The lease is held until the body is sent (so the agent counts
                    // as busy meanwhile).
                    Ok(r) => r.map(|body| Body::new(body.hold(lease))),
                    // In bytes: a size just past the limit would read as the limit.
                    Err(t) => plain(
                        StatusCode::BAD_GATEWAY,
                        match t.declared {
                            Some(declared) => format!(
                                "function {name}: the response declares {declared} bytes, more than the master's limit of {} ({} bytes)\n",
                                format_bytes(t.limit),
                                t.limit
                            ),
                            None => format!(
                                "function {name}: the response is larger than the master's limit of {}\n",
                                format_bytes(t.limit)
                            ),
                        },
                    ),
                };
            }
            Ok(Err(_)) if forward.body_too_large() => return too_big(&name),
            Ok(Err(e)) if forward.client_body_failed() => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("function {name}: cannot read the request body: {e}\n"),
                )
            }
            Ok(Err(e)) if e.is_connect() && !tried_again && forward.can_retry() => {
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

fn too_big(name: &str) -> Response<Body> {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "function {name}: request body larger than the limit of {}\n",
            format_bytes(MAX_BODY)
        ),
    )
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
