//! The function runtime end to end over HTTP on loopback, with real guests built by
//! scripts/build-guests.sh (or on first use).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use agora_fn_runtime::{
    FunctionError, FunctionRegistry, FunctionSpec, GuestKind, HttpConfig, MetricsSnapshot,
    ModuleSource,
};
use bytes::Bytes;
use common::*;
use hyper::{Method, StatusCode};

#[tokio::test]
async fn echo_round_trip_passes_the_request_as_cgi() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let echo = registry.deploy(spec("echo", cgi_guest("echo"))).unwrap();
    assert_eq!(echo.kind(), GuestKind::CgiModule);
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);

    let answer = client
        .send(
            Method::POST,
            "/fn/echo/a/b?x=1&status=201",
            &[("x-test", "yes"), ("content-type", "text/plain")],
            Bytes::from_static(b"hello body"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert_eq!(answer.headers["content-type"], "text/plain");
    for line in [
        "REQUEST_METHOD: POST",
        "SCRIPT_NAME: /fn/echo",
        "PATH_INFO: /a/b",
        "QUERY_STRING: x=1&status=201",
        "CONTENT_TYPE: text/plain",
        "CONTENT_LENGTH: 10",
        "SERVER_PROTOCOL: HTTP/1.1",
        "HTTP_X_TEST: yes",
    ] {
        assert!(
            answer.body.contains(&format!("{line}\n")),
            "missing {line:?} in:\n{}",
            answer.body
        );
    }
    assert!(answer.body.ends_with("\n\nhello body"), "{}", answer.body);

    // No path after the name, and no trailing slash: PATH_INFO is empty.
    let answer = client.get("/fn/echo").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.body.contains("PATH_INFO: \n"), "{}", answer.body);
    assert!(
        answer.body.contains("REQUEST_METHOD: GET\n"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn hello_http_component_answers() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let hello = registry
        .deploy(spec("hello", hello_http_component()))
        .unwrap();
    assert_eq!(hello.kind(), GuestKind::HttpComponent);
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);

    for _ in 0..3 {
        let answer = client.get("/fn/hello/some/path?y=1").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.headers["x-agora-guest"], "hello-http");
        assert_eq!(
            answer.body,
            "hello from a wasi:http component: GET /some/path?y=1\n"
        );
    }
    let metrics = hello.metrics();
    assert_eq!(
        (metrics.requests, metrics.responses, metrics.errors.total()),
        (3, 3, 0)
    );
}

/// Each limit: the request gets its 5xx and reason, and the next one is served.
#[tokio::test]
async fn cgi_limits_fail_the_request_not_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let guest = cgi_guest("misbehave");
    let mut fuel = spec("fuel", guest.clone());
    fuel.fuel = 20_000_000;
    registry.deploy(fuel).unwrap();
    let mut memory = spec("memory", guest.clone());
    memory.memory_limit = 32 << 20;
    registry.deploy(memory).unwrap();
    let mut deadline = spec("deadline", guest.clone());
    deadline.timeout = Duration::from_millis(300);
    registry.deploy(deadline).unwrap();
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);

    let cases = [
        (
            "fuel",
            "?spin",
            StatusCode::INTERNAL_SERVER_ERROR,
            "fuel limit of 20000000 exhausted",
        ),
        (
            "memory",
            "?alloc=64",
            StatusCode::INTERNAL_SERVER_ERROR,
            "memory limit of 32MiB reached",
        ),
        (
            "deadline",
            "?spin",
            StatusCode::GATEWAY_TIMEOUT,
            "deadline of 300ms exceeded",
        ),
        (
            "fuel",
            "?garbage",
            StatusCode::BAD_GATEWAY,
            "no blank line after its headers",
        ),
    ];
    for (name, query, status, reason) in cases {
        let answer = client.get(&format!("/fn/{name}{query}")).await;
        assert_eq!(answer.status, status, "{name}{query}: {}", answer.body);
        assert!(
            answer.body.contains(reason),
            "{name}{query}: {:?} lacks {reason:?}",
            answer.body
        );
        assert_eq!(answer.headers["content-type"], "text/plain; charset=utf-8");

        let next = client.get(&format!("/fn/{name}")).await;
        assert_eq!(
            next.status,
            StatusCode::OK,
            "{name} after {query}: {}",
            next.body
        );
        assert_eq!(next.body, "fine\n");
    }
    // Every request starts from the module's own memory image, even on a reused slot.
    for _ in 0..5 {
        assert_eq!(client.get("/fn/memory?count").await.body, "count 1\n");
    }
    // Within the limit, memory is fine.
    let answer = client.get("/fn/memory?alloc=8").await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, "allocated 8 MiB\n")
    );

    let m = registry.get("fuel").unwrap().metrics();
    assert_eq!(
        (
            m.requests,
            m.responses,
            m.errors.fuel,
            m.errors.bad_response
        ),
        (4, 2, 1, 1)
    );
    assert!(m.fuel_used >= 20_000_000, "fuel used: {}", m.fuel_used);
    assert_eq!(registry.get("memory").unwrap().metrics().errors.memory, 1);
    assert_eq!(
        registry.get("deadline").unwrap().metrics().errors.deadline,
        1
    );
}

/// A guest asleep in a host call never sees the epoch: the request is answered at its
/// deadline anyway.
#[tokio::test]
async fn deadline_answers_a_sleeping_cgi_guest() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let mut slow = spec("slow", cgi_guest("slow"));
    slow.timeout = Duration::from_millis(200);
    registry.deploy(slow).unwrap();
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);
    let started = std::time::Instant::now();
    let answer = client.get("/fn/slow?ms=3000").await;
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.body
    );
    assert!(
        answer.body.contains("deadline of 200ms exceeded"),
        "{}",
        answer.body
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(client.get("/fn/slow?ms=1").await.status, StatusCode::OK);
}

/// At its deadline a CGI guest asleep in a host call is not only answered for: its
/// instance is dropped, so its slot is free for the next request at once (with one
/// slot and no queue, a guest still sleeping would get that request a 429).
#[tokio::test]
async fn a_deadline_ends_a_sleeping_cgi_guest_and_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let mut slow = spec("slow", cgi_guest("slow"));
    slow.timeout = Duration::from_secs(2);
    slow.max_concurrency = 1;
    slow.queue_len = 0;
    registry.deploy(slow).unwrap();
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);
    let started = std::time::Instant::now();
    let answer = client.get("/fn/slow?ms=30000").await;
    let took = started.elapsed();
    println!("a CGI guest sleeping 30 s with a 2 s timeout was answered after {took:?}");
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.body
    );
    assert!(
        answer.body.contains("deadline of 2s exceeded"),
        "{}",
        answer.body
    );
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(registry.get("slow").unwrap().metrics().in_flight, 0);
    let next = client.get("/fn/slow?ms=1").await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.body);
}

/// A client that goes away while its CGI guest sleeps takes the instance with it:
/// the server drops the request's future, which drops the guest's store and frees
/// the function's one slot (no queue: while a guest still held it, requests would
/// get 429).
#[tokio::test]
async fn a_client_that_disconnects_ends_its_cgi_guest() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let mut slow = spec("slow", cgi_guest("slow"));
    slow.timeout = Duration::from_secs(60);
    slow.max_concurrency = 1;
    slow.queue_len = 0;
    registry.deploy(slow).unwrap();
    let addr = start(Arc::clone(&registry), HttpConfig::default()).await;
    let client = HttpClient::new(addr);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /fn/slow?ms=30000 HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    wait_for_metrics(&registry, "slow", "the request running", |m| {
        m.in_flight == 1
    })
    .await;
    assert_eq!(
        client.get("/fn/slow?ms=1").await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the sleeping guest holds the one slot"
    );
    let closed_at = std::time::Instant::now();
    drop(stream);
    // The slot comes free once the server has seen the connection close.
    let until = closed_at + Duration::from_secs(20);
    loop {
        let answer = client.get("/fn/slow?ms=1").await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert_eq!(
            answer.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            answer.body
        );
        assert!(
            std::time::Instant::now() < until,
            "the slot never came free"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = closed_at.elapsed();
    println!("a CGI guest sleeping 30 s freed its slot {took:?} after its client went away");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn component_limits_fail_the_request_not_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let mut fuel = spec("hello-fuel", hello_http_component());
    fuel.fuel = 10_000_000;
    registry.deploy(fuel).unwrap();
    let mut deadline = spec("hello-deadline", hello_http_component());
    deadline.timeout = Duration::from_millis(300);
    registry.deploy(deadline).unwrap();
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);

    for (name, status, reason) in [
        (
            "hello-fuel",
            StatusCode::INTERNAL_SERVER_ERROR,
            "fuel limit of 10000000 exhausted",
        ),
        (
            "hello-deadline",
            StatusCode::GATEWAY_TIMEOUT,
            "deadline of 300ms exceeded",
        ),
    ] {
        let answer = client.get(&format!("/fn/{name}/spin")).await;
        assert_eq!(answer.status, status, "{name}: {}", answer.body);
        assert!(
            answer.body.contains(reason),
            "{name}: {:?} lacks {reason:?}",
            answer.body
        );
        let next = client.get(&format!("/fn/{name}/ok")).await;
        assert_eq!(
            next.status,
            StatusCode::OK,
            "{name} after spin: {}",
            next.body
        );
    }
}

/// max_concurrency 1 and a queue of 1: one runs, one waits (and times out), the third
/// is refused at once.
#[tokio::test]
async fn overload_gets_429_and_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    let mut slow = spec("slow", cgi_guest("slow"));
    slow.max_concurrency = 1;
    slow.queue_len = 1;
    slow.max_queue_wait = Duration::from_millis(300);
    registry.deploy(slow).unwrap();
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);

    let running = tokio::spawn({
        let client = client.clone();
        async move { client.get("/fn/slow?ms=1500").await }
    });
    wait_for_metrics(&registry, "slow", "one running", |m| m.in_flight == 1).await;
    let queued = tokio::spawn({
        let client = client.clone();
        async move { client.get("/fn/slow?ms=10").await }
    });
    wait_for_metrics(&registry, "slow", "one queued", |m| m.queued == 1).await;

    let refused = client.get("/fn/slow?ms=10").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.body
    );
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(
        refused.body.contains("too many requests"),
        "{}",
        refused.body
    );

    let timed_out = queued.await.unwrap();
    assert_eq!(
        timed_out.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        timed_out.body
    );
    assert_eq!(timed_out.headers["retry-after"], "1");
    assert!(
        timed_out.body.contains("waited 300ms in the queue"),
        "{}",
        timed_out.body
    );

    let done = running.await.unwrap();
    assert_eq!(
        (done.status, done.body.as_str()),
        (StatusCode::OK, "slept 1500 ms\n")
    );

    let m = registry.get("slow").unwrap().metrics();
    assert_eq!(
        (
            m.requests,
            m.responses,
            m.errors.queue_full,
            m.errors.queue_timeout,
            m.errors.total()
        ),
        (3, 1, 1, 1, 2)
    );
    assert_eq!((m.in_flight, m.queued), (0, 0));
    assert_eq!(m.latency.count, 3);

    // And it serves again.
    let again = client.get("/fn/slow?ms=1").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
}

/// Two functions of one tenant limited to one request at a time share that slot.
#[tokio::test]
async fn tenant_limit_spans_functions() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    host.set_tenant_limit("small", 1).unwrap();
    let registry = FunctionRegistry::new(host);
    for name in ["slow-a", "slow-b"] {
        let mut s = FunctionSpec::new(name, "small", ModuleSource::Path(cgi_guest("slow")));
        s.max_queue_wait = Duration::from_millis(200);
        registry.deploy(s).unwrap();
    }
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);
    let running = tokio::spawn({
        let client = client.clone();
        async move { client.get("/fn/slow-a?ms=1000").await }
    });
    wait_for_metrics(&registry, "slow-a", "one running", |m| m.in_flight == 1).await;
    let blocked = client.get("/fn/slow-b?ms=1").await;
    assert_eq!(
        blocked.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        blocked.body
    );
    assert!(
        blocked.body.contains("tenant \"small\""),
        "{}",
        blocked.body
    );
    assert_eq!(running.await.unwrap().status, StatusCode::OK);
    assert_eq!(client.get("/fn/slow-b?ms=1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_endpoint_unknown_function_and_body_cap() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    registry.deploy(spec("echo", cgi_guest("echo"))).unwrap();
    let config = HttpConfig {
        max_body: 1 << 20,
        ..HttpConfig::default()
    };
    let client = HttpClient::new(start(Arc::clone(&registry), config).await);

    let missing = client.get("/fn/nope/x").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.body.contains("\"nope\""), "{}", missing.body);

    let big = Bytes::from(vec![b'x'; (1 << 20) + 1]);
    let too_big = client.send(Method::PUT, "/fn/echo", &[], big).await;
    assert_eq!(
        too_big.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        too_big.body
    );
    assert!(too_big.body.contains("1MiB"), "{}", too_big.body);

    let fits = Bytes::from(vec![b'y'; 1 << 20]);
    let ok = client.send(Method::PUT, "/fn/echo", &[], fits).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.body.ends_with(&"y".repeat(1000)));

    for _ in 0..3 {
        assert_eq!(client.get("/fn/echo/x").await.status, StatusCode::OK);
    }
    let answer = client.get("/fn-metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    let all: Vec<MetricsSnapshot> = serde_json::from_str(&answer.body).expect("metrics JSON");
    assert_eq!(all.len(), 1);
    let echo = &all[0];
    // The oversized body was refused before reaching the function.
    assert_eq!(
        (echo.name.as_str(), echo.requests, echo.responses),
        ("echo", 4, 4)
    );
    assert_eq!(echo.latency.count, 4);
    assert_eq!(echo.latency.counts.iter().sum::<u64>(), 4);
    assert_eq!((echo.in_flight, echo.queued), (0, 0));
}

#[tokio::test]
async fn removed_function_is_404_and_redeploy_works() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    registry.deploy(spec("f", cgi_guest("noop"))).unwrap();
    let client = HttpClient::new(start(Arc::clone(&registry), HttpConfig::default()).await);
    assert_eq!(client.get("/fn/f").await.body, "ok\n");
    assert!(registry.remove("f").is_some());
    assert_eq!(client.get("/fn/f").await.status, StatusCode::NOT_FOUND);
    registry.deploy(spec("f", cgi_guest("echo"))).unwrap();
    assert!(client
        .get("/fn/f")
        .await
        .body
        .contains("SCRIPT_NAME: /fn/f\n"));
    assert_eq!(registry.names(), vec!["f".to_string()]);
}

#[test]
fn bad_modules_and_specs_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let load = |spec: FunctionSpec| host.load(spec).map(|_| ()).unwrap_err().to_string();
    let bytes = |b: &[u8]| {
        FunctionSpec::new(
            "bad",
            "tests",
            ModuleSource::Bytes(Bytes::copy_from_slice(b)),
        )
    };

    assert!(load(bytes(b"hello")).contains("bad magic number"));
    let no_start = wat::parse_str("(module)").unwrap();
    assert!(load(bytes(&no_start)).contains("no `_start`"));
    let foreign =
        wat::parse_str(r#"(module (import "env" "f" (func)) (func (export "_start")))"#).unwrap();
    let e = load(bytes(&foreign));
    assert!(e.contains("env") && e.contains("WASI preview 1"), "{e}");
    let huge = wat::parse_str(r#"(module (memory 2048) (func (export "_start")))"#).unwrap();
    let mut s = bytes(&huge);
    s.memory_limit = 64 << 20;
    assert!(load(s).contains("128MiB of initial memory"));

    let mut s = spec("echo", cgi_guest("echo"));
    s.sha256 = Some("0".repeat(64));
    assert!(load(s).contains("not the 0000"));
    let mut s = spec("no/slash", cgi_guest("echo"));
    s.max_concurrency = 1;
    assert!(load(s).contains("'/'"));
    let mut s = spec("echo", cgi_guest("echo"));
    s.max_concurrency = 0;
    assert!(load(s).contains("max_concurrency"));
    let mut s = spec("echo", cgi_guest("echo"));
    s.memory_limit = 1 << 40;
    assert!(load(s).contains("more than this host allows"));
    let missing = host
        .load(spec("gone", dir.path().join("missing.wasm")))
        .unwrap_err();
    assert!(
        matches!(missing, FunctionError::ReadModule { .. }),
        "{missing}"
    );
}

/// A second host with the same cache dir loads by sha256 without compiling or even
/// reading the module.
#[tokio::test]
async fn compiled_artifacts_are_cached_by_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let first = host(dir.path());
    let echo = first.load(spec("echo", cgi_guest("echo"))).unwrap();
    let hello = first.load(spec("hello", hello_http_component())).unwrap();
    assert_eq!(first.compiled_count(), 2);

    let second = host(dir.path());
    for (name, f) in [("echo", &echo), ("hello", &hello)] {
        let mut s = spec(name, dir.path().join("not-read.wasm"));
        s.sha256 = Some(f.sha256().to_string());
        let loaded = second.load(s).unwrap();
        assert_eq!(loaded.kind(), f.kind());
        let response = loaded
            .invoke(agora_fn_runtime::FunctionRequest::get("/x"))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(second.compiled_count(), 0);
}

#[tokio::test]
async fn serves_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FunctionRegistry::new(host(dir.path()));
    registry.deploy(spec("noop", cgi_guest("noop"))).unwrap();
    let socket = dir.path().join("fn.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(agora_fn_runtime::serve(
        listener,
        agora_fn_runtime::router(Arc::clone(&registry), HttpConfig::default()),
    ));

    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get("/fn/noop")
        .header("host", "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    use http_body_util::BodyExt;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok\n");
}
