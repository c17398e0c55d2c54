//! Outgoing HTTP from `wasi:http` components: denied by default, allowed to the hosts a
//! function's allow-list names, capped per request and bounded by the deadline. The
//! `fetch-http` guest calls a small upstream server on a free loopback port.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_fn_runtime::outbound::OutboundAllowList;
use agora_fn_runtime::{FunctionRegistry, FunctionSpec, HttpConfig};
use common::*;
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const UPSTREAM_BODY: &str = "hello from upstream\n";

/// The `fetch-http` component, built on first use.
fn fetch_http_component() -> PathBuf {
    agora_guest_examples::component_path("fetch-http")
}

/// An HTTP server on a free loopback port answering every request with 200 and
/// [`UPSTREAM_BODY`], one request per connection; counts the requests it answered.
/// It lives as long as the test's runtime.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let served = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                if answer_one(stream).await.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, served)
}

/// Reads one request head (bounded in size and time) and answers it.
async fn answer_one(mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() > 16 * 1024 {
                return Err(std::io::Error::other("no complete request head"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), read_head)
        .await
        .map_err(|_| std::io::Error::other("request head timed out"))??;
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{UPSTREAM_BODY}",
        UPSTREAM_BODY.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// A listener on a free loopback port that accepts connections and never answers.
async fn silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// A free loopback port nobody listens on (bound, then released).
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("local addr").port()
}

fn fetch_spec(name: &str, allowed: &[String]) -> FunctionSpec {
    let mut spec = spec(name, fetch_http_component());
    spec.allowed_outbound_hosts = OutboundAllowList::parse(allowed).expect("allow-list");
    spec
}

#[tokio::test]
async fn allow_listed_hosts_are_reached_and_others_denied() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let (up, served) = upstream().await;
    let other = closed_port().await;
    let port = up.port();
    for (name, allowed) in [
        ("exact", vec![format!("http://127.0.0.1:{port}")]),
        ("any-port", vec!["*://127.0.0.1:*".to_string()]),
        ("none", vec![]),
        ("other-port", vec![format!("http://127.0.0.1:{other}")]),
        ("other-scheme", vec![format!("https://127.0.0.1:{port}")]),
        ("by-name", vec![format!("http://localhost:{port}")]),
    ] {
        registry.deploy(fetch_spec(name, &allowed)).unwrap();
    }
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);
    let query = format!("?url=http://127.0.0.1:{port}/some/path");

    for name in ["exact", "any-port"] {
        let answer = client.get(&format!("/fn/{name}/{query}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{name}: {}", answer.body);
        assert_eq!(answer.body, format!("upstream status 200\n{UPSTREAM_BODY}"));
        let m = registry.get(name).unwrap().metrics();
        assert_eq!((m.outbound_allowed, m.outbound_denied), (1, 0), "{name}");
    }
    // Percent-encoded, as a careful client sends it.
    let answer = client
        .get(&format!(
            "/fn/exact/?url=http%3A%2F%2F127.0.0.1%3A{port}%2Fx"
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(served.load(Ordering::SeqCst), 3);

    for name in ["none", "other-port", "other-scheme", "by-name"] {
        let answer = client.get(&format!("/fn/{name}/{query}")).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_GATEWAY,
            "{name}: {}",
            answer.body
        );
        assert_eq!(answer.body, "HttpRequestDenied\n", "{name}");
        let m = registry.get(name).unwrap().metrics();
        assert_eq!((m.outbound_allowed, m.outbound_denied), (0, 1), "{name}");
        // The function keeps serving: the denial is the guest's to handle.
        assert_eq!((m.responses, m.errors.total()), (1, 0), "{name}");
    }
    // None of the denied requests reached the server.
    assert_eq!(served.load(Ordering::SeqCst), 3);

    // Allowed but nobody listening: the connection error reaches the guest.
    let answer = client
        .get(&format!("/fn/any-port/?url=http://127.0.0.1:{other}/"))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    assert!(
        answer.body.starts_with("ConnectionRefused"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn outgoing_requests_are_capped_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let (up, served) = upstream().await;
    let port = up.port();
    registry
        .deploy(fetch_spec("fan", &[format!("http://127.0.0.1:{port}")]))
        .unwrap();
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);
    let url = format!("http://127.0.0.1:{port}/");

    let answer = client.get(&format!("/fn/fan/?url={url}&n=16")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(served.load(Ordering::SeqCst), 16);

    let answer = client.get(&format!("/fn/fan/?url={url}&n=17")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    assert_eq!(
        answer.body,
        "HttpRequestDenied after 16 successful fetches\n"
    );
    assert_eq!(served.load(Ordering::SeqCst), 32);

    // The cap is per request: the next one starts afresh.
    let answer = client.get(&format!("/fn/fan/?url={url}")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let m = registry.get("fan").unwrap().metrics();
    assert_eq!((m.outbound_allowed, m.outbound_denied), (33, 1));
}

#[tokio::test]
async fn an_upstream_that_never_answers_cannot_outlast_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let up = silent_upstream().await;
    let mut spec = fetch_spec("slow", &[format!("http://{up}")]);
    spec.timeout = Duration::from_millis(500);
    registry.deploy(spec).unwrap();
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);

    let started = Instant::now();
    let answer = client.get(&format!("/fn/slow/?url=http://{up}/")).await;
    let took = started.elapsed();
    // The outgoing call times out at the deadline: the guest may still answer with the
    // timeout (502) or the request fails at its deadline (504); either way, promptly.
    assert!(
        answer.status == StatusCode::BAD_GATEWAY || answer.status == StatusCode::GATEWAY_TIMEOUT,
        "{}: {}",
        answer.status,
        answer.body
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The function keeps serving.
    let answer = client.get("/fn/slow/").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
}
