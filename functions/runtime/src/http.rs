//! The HTTP front door: `/fn/NAME[/PATH]` for any method, and `GET /fn-metrics`.
//!
//! The router looks the function up in the registry (404 naming it when absent),
//! strips `/fn/NAME` from the path, and has the function admit the request (its queue
//! and concurrency limits) before a byte of the body is read. Only then is the body
//! read: up to a size cap (413 past it), within a time limit (408 past it), and
//! within the router's budget for bodies held in memory at once (503 with
//! `Retry-After` past it). So a client that stalls its body holds one slot for at most
//! [`HttpConfig::body_timeout`], and clients together never make the host hold more
//! than [`HttpConfig::body_budget`] of bodies. It works on any listener axum serves:
//! TCP or Unix sockets.

use std::sync::Arc;
use std::time::Duration;

use agora_http_forward::plain_text as plain;
use agora_proto::units::{format_bytes, format_duration, MIB};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::http::{Response, StatusCode};
use axum::routing::{any, get};
use axum::serve::{Listener, ListenerExt};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::registry::FunctionRegistry;
use crate::request::FunctionRequest;

/// Settings of the router.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted; more gets 413.
    pub max_body: u64,
    /// Most time an admitted request's body may take to arrive whole; past it, 408.
    pub body_timeout: Duration,
    /// Most bytes of request bodies held in memory at once, all functions together;
    /// a body that would go past it gets 503 with `Retry-After`. At least `max_body`.
    pub body_budget: u64,
}

impl Default for HttpConfig {
    /// 16 MiB bodies, arriving within 30 s, 32 MiB of them at once.
    fn default() -> Self {
        HttpConfig {
            max_body: 16 * MIB,
            body_timeout: Duration::from_secs(30),
            body_budget: 32 * MIB,
        }
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<FunctionRegistry>,
    config: HttpConfig,
    /// The body budget, one permit per byte.
    budget: Arc<Semaphore>,
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
        .with_state(AppState {
            budget: Arc::new(Semaphore::new(budget_permits(&config))),
            registry,
            config,
        });
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
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_big(name, limit);
    }
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
        body: Bytes::new(),
        remote_addr,
    };
    let read = read_body(body, declared, name, &state);
    function
        .invoke_reading(request, read)
        .await
        .into_response(name)
}

/// Reads an admitted request's body: at most `max_body` bytes, within `body_timeout`,
/// each byte reserved from the body budget first (the reservation is the `Ok`'s
/// second half, kept until the request ends).
async fn read_body(
    body: Body,
    declared: Option<u64>,
    name: &str,
    state: &AppState,
) -> Result<(Bytes, OwnedSemaphorePermit), Response<Body>> {
    let HttpConfig {
        max_body,
        body_timeout,
        body_budget,
    } = state.config;
    let short_of_memory = || {
        let mut answer = plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "function {name}: this host already holds {} of request bodies, its limit; try again\n",
                format_bytes(body_budget)
            ),
        );
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        answer
    };
    let reserve = |bytes: u64| {
        u32::try_from(bytes)
            .ok()
            .and_then(|n| Arc::clone(&state.budget).try_acquire_many_owned(n).ok())
    };
    // A declared length is reserved whole up front; a chunked body frame by frame.
    let mut held = reserve(declared.unwrap_or(0)).ok_or_else(short_of_memory)?;
    let mut reserved = declared.unwrap_or(0);
    let capacity = usize::try_from(declared.unwrap_or(0)).unwrap_or(0);
    let read = async {
        let mut bytes = BytesMut::with_capacity(capacity);
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                plain(
                    StatusCode::BAD_REQUEST,
                    format!("function {name}: cannot read the request body: {e}\n"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            let total = bytes.len() as u64 + data.len() as u64;
            if total > max_body {
                return Err(too_big(name, max_body));
            }
            if total > reserved {
                let more = reserve(total - reserved).ok_or_else(short_of_memory)?;
                held.merge(more);
                reserved = total;
            }
            bytes.extend_from_slice(&data);
        }
        Ok(bytes.freeze())
    };
    match tokio::time::timeout(body_timeout, read).await {
        Ok(Ok(bytes)) => Ok((bytes, held)),
        Ok(Err(answer)) => Err(answer),
        Err(_) => Err(plain(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "function {name}: the request body did not arrive within {}\n",
                format_duration(body_timeout)
            ),
        )),
    }
}

/// The budget in permits: at least one whole body, at most what a semaphore holds.
fn budget_permits(config: &HttpConfig) -> usize {
    let bytes = config.body_budget.max(config.max_body);
    usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

fn too_big(name: &str, limit: u64) -> Response<Body> {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "function {name}: request body larger than the limit of {}\n",
            format_bytes(limit)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FunctionSpec, ModuleSource};
    use crate::HostConfig;
    use bytes::Bytes;
    use http_body_util::Empty;
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

    /// A router on a local port serving `specs`, with `config`.
    async fn serve_functions(
        specs: Vec<FunctionSpec>,
        config: HttpConfig,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let host = crate::FunctionHost::new(HostConfig {
            cache_dir: Some(dir.keep()),
            max_instances: 4,
            max_memory_per_instance: 64 << 20,
            ..HostConfig::default()
        })
        .unwrap();
        let registry = FunctionRegistry::new(host);
        for spec in specs {
            registry.deploy(spec).unwrap();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (
            addr,
            tokio::spawn(serve_tcp(listener, router(registry, config))),
        )
    }

    /// Opens a connection and writes `head` (and whatever part of a body follows).
    async fn send_raw(addr: std::net::SocketAddr, head: &str) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt as _;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp
    }

    /// Reads one answer (the server closes after it: requests say `Connection:
    /// close`); gives up after 10 s.
    async fn answer(tcp: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt as _;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got));
        read.await.expect("an answer within 10 s").unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    fn post(path: &str, length: usize, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n{body}"
        )
    }

    /// Sends `request` until its answer starts with `status` (others, from before
    /// the state the test waits for, are retried), within 10 s.
    async fn until_answered(addr: std::net::SocketAddr, request: &str, status: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = answer(&mut send_raw(addr, request).await).await;
            if got.starts_with(status) {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never {status}: last {got}"
            );
            tokio::task::yield_now().await;
        }
    }

    /// A request is admitted before its body is read: while a stalled body holds the
    /// function's one slot, another request is refused at once, without having sent
    /// a byte of its declared megabyte; the stalled body gets 408 at the body timeout,
    /// and its slot serves the next request.
    #[tokio::test]
    async fn admission_comes_before_the_body_and_a_stalled_body_times_out() {
        let mut spec = cgi_guest("ok", "Content-Type: text/plain\\n\\nfine");
        spec.max_concurrency = 1;
        spec.queue_len = 0;
        let config = HttpConfig {
            body_timeout: Duration::from_millis(500),
            ..HttpConfig::default()
        };
        let (addr, server) = serve_functions(vec![spec], config).await;

        let mut stalled = send_raw(addr, &post("/fn/ok", 100, "only ten b")).await;
        let refused = until_answered(addr, &post("/fn/ok", 1 << 20, ""), "HTTP/1.1 429").await;
        assert!(refused.contains("too many requests"), "{refused}");

        let timed_out = answer(&mut stalled).await;
        assert!(timed_out.starts_with("HTTP/1.1 408"), "{timed_out}");
        assert!(
            timed_out.contains("function ok: the request body did not arrive within 500ms"),
            "{timed_out}"
        );
        let served = answer(&mut send_raw(addr, &post("/fn/ok", 3, "abc")).await).await;
        assert!(
            served.starts_with("HTTP/1.1 200") && served.ends_with("fine"),
            "{served}"
        );
        server.abort();
    }

    /// Bodies held at once stay within the host's budget: while one body holds it
    /// all, another (declared or chunked) gets 503 with Retry-After; once the first
    /// is served, the budget serves the next.
    #[tokio::test]
    async fn bodies_past_the_budget_get_503_until_it_frees() {
        let spec = cgi_guest("ok", "Content-Type: text/plain\\n\\nfine");
        let config = HttpConfig {
            max_body: 1024,
            body_budget: 1024,
            ..HttpConfig::default()
        };
        let (addr, server) = serve_functions(vec![spec], config).await;

        let mut holder = send_raw(addr, &post("/fn/ok", 1024, "part")).await;
        let refused = until_answered(addr, &post("/fn/ok", 10, "0123456789"), "HTTP/1.1 503").await;
        assert!(refused.contains("retry-after: 1"), "{refused}");
        assert!(
            refused.contains("this host already holds 1KiB of request bodies, its limit"),
            "{refused}"
        );
        let chunked = "POST /fn/ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let refused = answer(&mut send_raw(addr, chunked).await).await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");

        {
            use tokio::io::AsyncWriteExt as _;
            holder.write_all(&[b'x'; 1020]).await.unwrap();
        }
        let served = answer(&mut holder).await;
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
        let served = answer(&mut send_raw(addr, chunked).await).await;
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
        let too_big = answer(&mut send_raw(addr, &post("/fn/ok", 1025, "")).await).await;
        assert!(too_big.starts_with("HTTP/1.1 413"), "{too_big}");
        server.abort();
    }
}
