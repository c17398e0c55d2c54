//! The HTTP front door: `/fn/NAME[/PATH]` for any method, and `GET /fn-metrics`.
//!
//! The router reads the body (up to a cap: 413 past it), looks the function up in the
//! registry (404 naming it when absent), strips `/fn/NAME` from the path and hands
//! the request over. It works on any listener axum serves: TCP or Unix sockets.

use std::sync::Arc;

use agora_http_forward::plain_text as plain;
use agora_proto::units::{format_bytes, MIB};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::http::{Response, StatusCode};
use axum::routing::{any, get};
use axum::serve::{Listener, ListenerExt};
use axum::{Json, Router};

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
/// A panic while a request is handled gives that request a 500 and is logged with
/// the function's name (`agora_http_forward::catch_panics`); the connection goes on.
pub fn router(registry: Arc<FunctionRegistry>, config: HttpConfig) -> Router {
    let router = Router::new()
        .route("/fn/{name}", any(invoke))
        .route("/fn/{name}/", any(invoke))
        .route("/fn/{name}/{*path}", any(invoke))
        .route("/fn-metrics", get(metrics))
        .with_state(AppState { registry, config });
    agora_http_forward::catch_panics(router, "function host")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FunctionSpec, ModuleSource};
    use crate::HostConfig;
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::TokioIo;

    /// A CGI guest that writes `output` on stdout.
    fn cgi_guest(name: &str, output: &str) -> FunctionSpec {
        let wat = format!(
            r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "{output}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const {len}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
            // WAT's `\\n` is one byte.
            len = output.replace("\\n", "\n").len(),
        );
        let bytes = wat::parse_str(&wat).unwrap();
        FunctionSpec::new(name, "tests", ModuleSource::Bytes(Bytes::from(bytes)))
    }

    async fn get(
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        path: &str,
    ) -> (StatusCode, String) {
        let request = axum::http::Request::get(path)
            .header(header::HOST, "host.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A panic in CGI response handling (the test hook of `cgi`) fails that request
    /// with a 500; the next request on the same kept-alive connection is served.
    #[tokio::test]
    async fn a_panic_in_cgi_handling_fails_only_its_request() {
        let dir = tempfile::tempdir().unwrap();
        let host = crate::FunctionHost::new(HostConfig {
            cache_dir: Some(dir.path().to_path_buf()),
            max_instances: 4,
            max_memory_per_instance: 64 << 20,
            ..HostConfig::default()
        })
        .unwrap();
        let registry = FunctionRegistry::new(host);
        let marker = std::str::from_utf8(crate::cgi::test_hook::PANIC_MARKER).unwrap();
        registry
            .deploy(cgi_guest("boom", &format!("X-Trigger: {marker}\\n\\nbody")))
            .unwrap();
        registry
            .deploy(cgi_guest("ok", "Content-Type: text/plain\\n\\nfine"))
            .unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_tcp(listener, router(registry, HttpConfig::default())));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);

        let (status, body) = get(&mut sender, "/fn/ok").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
        let (status, body) = get(&mut sender, "/fn/boom/x").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("function boom: internal error"), "{body}");
        let (status, body) = get(&mut sender, "/fn/ok").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));

        drop(sender);
        conn.await.unwrap().unwrap();
        server.abort();
    }
}
