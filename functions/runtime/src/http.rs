//! The HTTP front door: `/fn/NAME[/PATH]` for any method, and `GET /fn-metrics`.
//!
//! The router reads the body (up to a cap: 413 past it), looks the function up in the
//! registry (404 naming it when absent), strips `/fn/NAME` from the path and hands
//! the request over. It works on any listener axum serves: TCP or Unix sockets.

use std::sync::Arc;

use agora_proto::units::{format_bytes, MIB};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::{Response, StatusCode};
use axum::routing::{any, get};
use axum::serve::{Listener, ListenerExt};
use axum::{Json, Router};
use bytes::Bytes;

use crate::registry::FunctionRegistry;
use crate::request::FunctionRequest;

/// Settings of the router.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted; more gets 413.
    pub max_body: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { max_body: 16 * MIB }
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<FunctionRegistry>,
    config: HttpConfig,
}

/// The router: `/fn/{name}` and `/fn/{name}/{*path}` (any method) invoke a function of
/// `registry`; `GET /fn-metrics` lists every function's [`crate::MetricsSnapshot`] as
/// JSON. Merge it into a bigger router (the master's API) or serve it with [`serve`].
pub fn router(registry: Arc<FunctionRegistry>, config: HttpConfig) -> Router {
    Router::new()
        .route("/fn/{name}", any(invoke))
        .route("/fn/{name}/", any(invoke))
        .route("/fn/{name}/{*path}", any(invoke))
        .route("/fn-metrics", get(metrics))
        .with_state(AppState { registry, config })
}

/// Serves `router` on any listener axum accepts (e.g. a `tokio::net::UnixListener`
/// for the agent's local socket) until the future is dropped. For TCP prefer
/// [`serve_tcp`], which also sets `TCP_NODELAY` and passes client addresses.
pub async fn serve<L>(listener: L, router: Router) -> std::io::Result<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router.into_make_service()).await
}

/// [`serve`] for TCP with `TCP_NODELAY` and the client's address passed to CGI
/// guests as `REMOTE_ADDR`.
pub async fn serve_tcp(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .await
}

async fn metrics(State(state): State<AppState>) -> Json<Vec<crate::MetricsSnapshot>> {
    Json(state.registry.metrics())
}

async fn invoke(State(state): State<AppState>, request: Request) -> Response<Body> {
    let (parts, body) = request.into_parts();
    // The raw path: PATH_INFO is passed as sent, not percent-decoded.
    let path = parts.uri.path();
    let rest = path.strip_prefix("/fn/").unwrap_or("");
    let (name, path_info) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, ""),
    };
    let Some(function) = state.registry.get(name) else {
        return plain(
            StatusCode::NOT_FOUND,
            format!("no function named {name:?} is deployed here\n"),
        );
    };

    let limit = state.config.max_body;
    let too_big = || {
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "function {name}: request body larger than the limit of {}\n",
                format_bytes(limit)
            ),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_big();
    }
    let body = match axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX)).await
    {
        Ok(body) => body,
        Err(e) if is_length_limit(&e) => return too_big(),
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("function {name}: cannot read the request body: {e}\n"),
            )
        }
    };

    let remote_addr = parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string());
    let request = FunctionRequest {
        method: parts.method,
        path_info: path_info.to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        version: parts.version,
        headers: parts.headers,
        body,
        remote_addr,
    };
    function.invoke(request).await.map(Body::from)
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
    let mut response = Response::new(Body::from(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
