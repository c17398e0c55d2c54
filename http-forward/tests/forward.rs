//! The forwarding path end to end: a front door built as the master's is (axum,
//! hyper's pooled client over TCP, this crate in between) before an upstream stand-in
//! (a tiny axum server), and clients that misbehave. No timing is asserted: what
//! waits on something waits on a channel; the timeouts only turn a hang into a
//! failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use agora_http_forward::{Forward, Limits, MAX_BODY};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// Turns a hang into a failure.
const GUARD: Duration = Duration::from_secs(60);

async fn guard<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {GUARD:?}"))
}

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("serve")
    });
    addr
}

/// The front door under test, as the master's: one attempt (a second one when the
/// first could not connect, to `fallback`), 413 when the body passed the limit, 502
/// otherwise.
#[derive(Clone)]
struct Door {
    upstream: SocketAddr,
    fallback: Option<SocketAddr>,
    limits: Limits,
    client: Client<HttpConnector, Body>,
    /// Request body bytes passed upstream when a request was refused with 413.
    sent_at_refusal: Arc<AtomicU64>,
    /// Requests whose forwarding ended (answered or failed).
    finished: Arc<AtomicUsize>,
}

async fn door(
    upstream: SocketAddr,
    fallback: Option<SocketAddr>,
    limits: Limits,
) -> (SocketAddr, Door) {
    let state = Door {
        upstream,
        fallback,
        limits,
        client: Client::builder(TokioExecutor::new()).build_http(),
        sent_at_refusal: Arc::new(AtomicU64::new(u64::MAX)),
        finished: Arc::new(AtomicUsize::new(0)),
    };
    let app = Router::new().fallback(forward).with_state(state.clone());
    (serve(app).await, state)
}

fn status(code: StatusCode, text: &str) -> Response {
    let mut r = Response::new(Body::from(text.to_string()));
    *r.status_mut() = code;
    r
}

async fn forward(
    State(door): State<Door>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let forward = match Forward::new(request, Some(peer.ip()), door.limits) {
        Ok(f) => f,
        Err(_) => return status(StatusCode::PAYLOAD_TOO_LARGE, "too large (declared)\n"),
    };
    let path = forward
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut targets = vec![door.upstream];
    targets.extend(door.fallback);
    let mut answer = status(StatusCode::BAD_GATEWAY, "no attempt\n");
    for target in targets {
        let uri: Uri = format!("http://{target}{path}").parse().expect("uri");
        let Some(upstream) = forward.attempt(uri) else {
            break;
        };
        match door.client.request(upstream.map(Body::new)).await {
            Ok(response) => {
                answer = match forward.response(response) {
                    Ok(r) => r.map(Body::new),
                    Err(_) => status(StatusCode::BAD_GATEWAY, "response too large\n"),
                };
                break;
            }
            Err(_) if forward.body_too_large() => {
                door.sent_at_refusal
                    .store(forward.bytes_sent(), Ordering::SeqCst);
                answer = status(StatusCode::PAYLOAD_TOO_LARGE, "too large\n");
                break;
            }
            Err(e) if e.is_connect() && forward.can_retry() => {
                answer = status(StatusCode::BAD_GATEWAY, "cannot connect\n");
                continue;
            }
            Err(e) => {
                answer = status(StatusCode::BAD_GATEWAY, &format!("failed: {e}\n"));
                break;
            }
        }
    }
    door.finished.fetch_add(1, Ordering::SeqCst);
    answer
}

/// An upstream that reads the body frame by frame (never all of it at once) and
/// answers how many bytes it read and what headers came.
#[derive(Clone, Default)]
struct Counting {
    bytes: Arc<AtomicU64>,
    requests: Arc<AtomicUsize>,
}

async fn counting_upstream() -> (SocketAddr, Counting) {
    async fn handle(State(c): State<Counting>, request: Request) -> Response {
        c.requests.fetch_add(1, Ordering::SeqCst);
        let (parts, mut body) = request.into_parts();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        n += d.len() as u64;
                        c.bytes.fetch_add(d.len() as u64, Ordering::SeqCst);
                    }
                }
                Err(_) => return status(StatusCode::BAD_REQUEST, "cut off\n"),
            }
        }
        let mut headers: Vec<String> = parts
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        headers.sort();
        status(
            StatusCode::OK,
            &format!("read {n}\n{}\n", headers.join("\n")),
        )
    }
    let c = Counting::default();
    let app = Router::new().fallback(handle).with_state(c.clone());
    (serve(app).await, c)
}

/// Sends a request head, then a body written by `write_body` on its own task while
/// this one reads the answer's status line: a client that keeps sending while the
/// answer comes, as real clients do. Returns the status and the body bytes the
/// socket accepted.
async fn raw_request(
    addr: SocketAddr,
    head: String,
    body_chunks: u64,
    chunk: usize,
    chunked: bool,
) -> (u16, u64) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(head.as_bytes()).await.expect("head");
    let written = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&written);
    let sender = tokio::spawn(async move {
        let data = vec![b'x'; chunk];
        for _ in 0..body_chunks {
            let r = if chunked {
                let mut frame = format!("{chunk:x}\r\n").into_bytes();
                frame.extend_from_slice(&data);
                frame.extend_from_slice(b"\r\n");
                writer.write_all(&frame).await
            } else {
                writer.write_all(&data).await
            };
            if r.is_err() {
                return; // the server closed: it will not read the rest
            }
            w.fetch_add(chunk as u64, Ordering::SeqCst);
        }
        if chunked {
            let _ = writer.write_all(b"0\r\n\r\n").await;
        }
        // Keep the write half open until the reader is done.
        std::future::pending::<()>().await;
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    sender.abort();
    let text = String::from_utf8_lossy(&answer);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (code, written.load(Ordering::SeqCst))
}

const HUNDRED_MIB: u64 = 100 << 20;

/// A 100 MiB chunked body, generated as it is sent, through the front door at its
/// default limit: 413, and neither the front door nor the upstream took more than the
/// limit (plus a frame): the body was cut off, not buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_chunked_body_gets_413_and_is_not_buffered() {
    let (upstream, counted) = counting_upstream().await;
    let (addr, door) = door(upstream, None, Limits::default()).await;
    let chunk = 64 << 10;
    let head =
        "POST /fn/x HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
    let (code, written) = guard(
        "the answer to a 100 MiB body",
        raw_request(addr, head, HUNDRED_MIB / chunk as u64, chunk, true),
    )
    .await;
    assert_eq!(code, 413);
    let sent = door.sent_at_refusal.load(Ordering::SeqCst);
    assert!(
        sent > MAX_BODY && sent <= MAX_BODY + (1 << 20),
        "the front door passed {sent} bytes upstream before it refused"
    );
    // What reached the upstream: at most the limit (the frame past it was held back).
    assert!(counted.bytes.load(Ordering::SeqCst) <= MAX_BODY);
    // The client could write the limit plus what the sockets' buffers hold, far from
    // all of it: nobody read the body to its end.
    assert!(
        written < HUNDRED_MIB / 2,
        "the client wrote {written} bytes before the refusal"
    );
}

/// The same 100 MiB, declared by `Content-Length`: refused before a byte of it is
/// read, and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_100_mib_body_gets_413_without_being_read() {
    let (upstream, counted) = counting_upstream().await;
    let (addr, door) = door(upstream, None, Limits::default()).await;
    let chunk = 64 << 10;
    let head =
        format!("POST /fn/x HTTP/1.1\r\nhost: test\r\ncontent-length: {HUNDRED_MIB}\r\n\r\n");
    let (code, written) = guard(
        "the answer to a declared 100 MiB body",
        raw_request(addr, head, HUNDRED_MIB / chunk as u64, chunk, false),
    )
    .await;
    assert_eq!(code, 413);
    assert_eq!(counted.requests.load(Ordering::SeqCst), 0);
    assert_eq!(door.sent_at_refusal.load(Ordering::SeqCst), u64::MAX);
    assert!(
        written < HUNDRED_MIB / 2,
        "the client wrote {written} bytes"
    );
}

/// Bodies within the limit pass whole, both ways, with hop-by-hop headers gone and
/// `X-Forwarded-For` added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_within_the_limit_pass_with_end_to_end_headers_only() {
    let (upstream, _) = counting_upstream().await;
    let (addr, _) = door(upstream, None, Limits::both(1 << 20)).await;
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let request = hyper::Request::post(format!("http://{addr}/fn/x/y?z=1"))
        .header("connection", "x-private")
        .header("x-private", "1")
        .header("proxy-authorization", "secret")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-kept", "yes")
        .body(Body::from(vec![b'a'; 1 << 20]))
        .expect("request");
    let response = guard("an answer", client.request(request))
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with(&format!("read {}\n", 1 << 20)), "{text}");
    assert!(text.contains("x-kept: yes"), "{text}");
    assert!(
        text.contains("x-forwarded-for: 10.0.0.1, 127.0.0.1"),
        "{text}"
    );
    assert!(
        text.contains(&format!("host: {addr}")),
        "the client's Host passes: {text}"
    );
    for gone in [
        "x-private",
        "proxy-authorization",
        "connection",
        "transfer-encoding",
    ] {
        assert!(
            !text.contains(&format!("{gone}:")),
            "{gone} was forwarded: {text}"
        );
    }
}

/// A body fed through a channel by the test.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// An upstream that answers its one request at once, with a body the test sends
/// through `chunks` (ending when the sender is dropped).
async fn channel_upstream(chunks: mpsc::Receiver<Bytes>) -> SocketAddr {
    let chunks = Arc::new(Mutex::new(Some(chunks)));
    let app = Router::new().fallback(move || {
        let rx = chunks.lock().unwrap().take().expect("one request");
        async move { Response::new(Body::new(ChannelBody(rx))) }
    });
    serve(app).await
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The first chunk of a response reaches the client while the upstream still holds
/// the rest (it sends more only once the client saw the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_streams_before_the_upstream_finishes() {
    let (tx, rx) = mpsc::channel(1);
    let upstream = channel_upstream(rx).await;
    let (addr, _) = door(upstream, None, Limits::default()).await;
    tx.send(Bytes::from_static(b"first")).await.expect("send");
    let response = guard(
        "the response head",
        client().request(
            hyper::Request::get(format!("http://{addr}/fn/x"))
                .body(Body::empty())
                .expect("request"),
        ),
    )
    .await
    .expect("answer");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let frame = guard("the first chunk", body.frame())
            .await
            .expect("a frame before the end")
            .expect("a good frame");
        if let Some(d) = frame.data_ref() {
            seen.extend_from_slice(d);
        }
    }
    assert_eq!(seen, b"first");
    // Released: the rest, then the end.
    tx.send(Bytes::from_static(b"second")).await.expect("send");
    drop(tx);
    let rest = guard("the rest", body.collect())
        .await
        .expect("rest")
        .to_bytes();
    assert_eq!(&rest[..], b"second");
}

/// A client that leaves in the middle of its body: the upstream's request ends with
/// an error at once (the front door neither keeps reading nor waits for an answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_body_ends_the_upstream_request() {
    let (first_tx, first_rx) = oneshot::channel::<()>();
    let (end_tx, end_rx) = oneshot::channel::<Result<u64, String>>();
    let signals = Arc::new(Mutex::new(Some((first_tx, end_tx))));
    let app = Router::new().fallback(move |request: Request| {
        let (first_tx, end_tx) = signals.lock().unwrap().take().expect("one request");
        async move {
            let mut body = request.into_body();
            let mut first = Some(first_tx);
            let mut n = 0u64;
            let end = loop {
                match body.frame().await {
                    None => break Ok(n),
                    Some(Err(e)) => break Err(e.to_string()),
                    Some(Ok(f)) => {
                        n += f.data_ref().map_or(0, |d| d.len() as u64);
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            };
            let _ = end_tx.send(end);
            Response::new(Body::empty())
        }
    });
    let upstream = serve(app).await;
    let (addr, _) = door(upstream, None, Limits::default()).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"POST /fn/x HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .expect("write");
    guard("the first chunk upstream", first_rx)
        .await
        .expect("first chunk");
    drop(stream);
    let end = guard("the upstream request's end", end_rx)
        .await
        .expect("the upstream handler ended");
    assert!(end.is_err(), "the upstream saw a whole body: {end:?}");
}

/// A client that leaves while the upstream works on its (whole) request: the
/// upstream's connection is closed, not kept waiting for an answer nobody wants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_drops_the_upstream_request() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let (got_tx, got_rx) = oneshot::channel::<()>();
    let (closed_tx, closed_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => panic!("the request did not come"),
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = got_tx.send(());
        // Never answers; waits for the front door to hang up.
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = closed_tx.send(());
    });
    let (addr, _) = door(upstream, None, Limits::default()).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /fn/x HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("write");
    guard("the request upstream", got_rx).await.expect("got");
    drop(stream);
    guard("the upstream connection's end", closed_rx)
        .await
        .expect("the upstream connection was closed");
}

/// A response over the limit: 502 when its length says so, a cut connection when it
/// passes the limit while streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_limit_is_refused_or_cut() {
    let limit = 1u64 << 20;
    let app = Router::new().fallback(|| async { Response::new(Body::from(vec![b'r'; 2 << 20])) });
    let upstream = serve(app).await;
    let (addr, _) = door(upstream, None, Limits::both(limit)).await;
    let get = || {
        hyper::Request::get(format!("http://{addr}/fn/x"))
            .body(Body::empty())
            .expect("request")
    };
    let r = guard("an answer", client().request(get()))
        .await
        .expect("answer");
    assert_eq!(r.status(), 502);

    let (tx, rx) = mpsc::channel(4);
    let upstream = channel_upstream(rx).await;
    let (addr, _) = door(upstream, None, Limits::both(limit)).await;
    let feeder = tokio::spawn(async move {
        for _ in 0..32 {
            if tx.send(Bytes::from(vec![b'r'; 64 << 10])).await.is_err() {
                return;
            }
        }
    });
    let get = hyper::Request::get(format!("http://{addr}/fn/x"))
        .body(Body::empty())
        .expect("request");
    let r = guard("an answer", client().request(get))
        .await
        .expect("answer");
    assert_eq!(
        r.status(),
        200,
        "the head came before the body passed the limit"
    );
    let read = guard("the cut", r.into_body().collect()).await;
    assert!(read.is_err(), "a body over the limit came whole");
    feeder.abort();
}

/// An attempt that could not connect leaves the body untouched for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_with_the_whole_body() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let (upstream, counted) = counting_upstream().await;
    let (addr, _) = door(closed, Some(upstream), Limits::default()).await;
    let post = hyper::Request::post(format!("http://{addr}/fn/x"))
        .body(Body::from("hello"))
        .expect("request");
    let r = guard("an answer", client().request(post))
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.expect("body").to_bytes();
    assert!(body.starts_with(b"read 5\n"), "{body:?}");
    assert_eq!(counted.requests.load(Ordering::SeqCst), 1);
}
