//! End-to-end: the agent side of functions (issue 6) through the real binaries,
//! without the master's functions framework. A small framework written here with
//! `agora-sdk` launches function host tasks through an ordinary offer; the agent runs
//! each in an `agora executor fn` process and serves `/fn/NAME/...` on its own HTTP
//! address, which a plain HTTP/1.1 client calls.
//!
//! Every wait is for an event or an answer, bounded; none sleeps to synchronise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::time::Duration;

use agora_proto::v1::{FrameworkInfo, FunctionInfo, TaskInfo, TaskState, WasmModule};
use agora_proto::Resources;
use agora_sdk::{Client, ClientConfig, Event, Scheduler};
use common::*;

/// Longest wait for one expected event.
const WAIT: Duration = Duration::from_secs(90);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `http` (a blocking client) from async code.
async fn call(method: &'static str, addr: &str, path: &str, body: &[u8]) -> HttpReply {
    let (addr, path, body) = (addr.to_string(), path.to_string(), body.to_vec());
    tokio::task::spawn_blocking(move || http(method, &addr, &path, &body))
        .await
        .expect("http client thread")
}

/// A function host task: `module` served as `name` by an executor of its own.
fn host_task(id: &str, name: &str, sha256: &str, size: u64, fuel: u64) -> TaskInfo {
    TaskInfo {
        task_id: id.into(),
        name: format!("function {name}"),
        resources: Resources::cpus_mem(100, 128 << 20).to_proto(),
        module: Some(WasmModule {
            sha256: sha256.into(),
            size,
            fuel,
            timeout_ms: 5_000,
        }),
        function: Some(FunctionInfo {
            name: name.into(),
            tenant: "*".into(),
            memory_bytes: 64 << 20,
            max_concurrency: 8,
            queue_len: 16,
            max_queue_wait_ms: 1_000,
            tenant_limit: None,
            allowed_outbound_hosts: Vec::new(),
        }),
        executor_id: format!("fn-{id}"),
        ..Default::default()
    }
}

/// The next update of `task` in `state`, acknowledging every update on the way.
async fn update(s: &mut Scheduler, task: &str, state: TaskState) -> agora_proto::v1::TaskStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, s.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {task} {state:?}"))
            .unwrap_or_else(|| panic!("event stream ended waiting for {task} {state:?}"));
        match ev {
            Event::Update(st) => {
                s.acknowledge(&st).await.expect("acknowledge");
                if st.task_id == task && st.state() == state {
                    return st;
                }
                assert!(
                    !st.state().is_terminal() || st.task_id != task,
                    "task {task} ended {:?} ({}) while waiting for {state:?}",
                    st.state(),
                    st.message
                );
            }
            Event::Offers(offers) => {
                let ids = offers.into_iter().map(|o| o.offer_id).collect();
                s.decline(ids, Some(60.0)).await.expect("decline");
            }
            Event::Error(e) => panic!("the master refused a call: {e}"),
            _ => {}
        }
    }
}

/// Launches `tasks` with the first offer that fits them all (declining the others).
async fn launch(s: &mut Scheduler, tasks: Vec<TaskInfo>) {
    let mut want = Resources::default();
    for t in &tasks {
        want.add(&Resources::from_proto(&t.resources).expect("task resources"));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, s.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for an offer of {want}"))
            .expect("event stream ended");
        let Event::Offers(offers) = ev else { continue };
        let (fit, rest): (Vec<_>, Vec<_>) = offers.into_iter().partition(|o| {
            Resources::from_proto(&o.resources)
                .map(|r| r.unreserved().contains(&want))
                .unwrap_or(false)
        });
        if !rest.is_empty() {
            let ids = rest.into_iter().map(|o| o.offer_id).collect();
            s.decline(ids, Some(60.0)).await.expect("decline");
        }
        if let Some(offer) = fit.into_iter().next() {
            s.accept(vec![offer.offer_id], tasks, Some(60.0))
                .await
                .expect("accept");
            return;
        }
    }
}

/// The RUNNING updates of all of `tasks`, in whatever order they come.
async fn running_all(s: &mut Scheduler, tasks: &[&str]) -> Vec<agora_proto::v1::TaskStatus> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < tasks.len() {
        let ev = tokio::time::timeout_at(deadline, s.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {tasks:?} to run; got {seen:?}"))
            .expect("event stream ended");
        match ev {
            Event::Update(st) => {
                s.acknowledge(&st).await.expect("acknowledge");
                assert!(
                    !st.state().is_terminal(),
                    "task {} ended {:?} ({}) before running",
                    st.task_id,
                    st.state(),
                    st.message
                );
                if st.state() == TaskState::TaskRunning && tasks.contains(&st.task_id.as_str()) {
                    seen.push(st);
                }
            }
            Event::Offers(offers) => {
                let ids = offers.into_iter().map(|o| o.offer_id).collect();
                s.decline(ids, Some(60.0)).await.expect("decline");
            }
            Event::Error(e) => panic!("the master refused a call: {e}"),
            _ => {}
        }
    }
    seen
}

/// The agent's HTTP address, as the master lists it.
async fn agent_http(client: &Client) -> String {
    let agents = client.agents().await.expect("list agents");
    assert_eq!(agents.len(), 1, "{agents:?}");
    let addr = agents[0].http_address.clone();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "the dev agent advertises its loopback HTTP address, got {addr:?}"
    );
    addr
}

/// The function's entry in the agent's `/fn-metrics`.
async fn metrics_of(addr: &str, name: &str) -> serde_json::Value {
    let r = call("GET", addr, "/fn-metrics", b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    let all: serde_json::Value = serde_json::from_str(&r.body).expect("metrics are JSON");
    all.as_array()
        .expect("a list")
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no metrics of {name} in {all}"))
}

#[test]
fn function_hosts_serve_through_the_agents_http_address() {
    let cluster = Cluster::start();
    let rt = runtime();
    rt.block_on(async {
        let cfg = ClientConfig::load(&cluster.config).expect("client config");
        let client = Client::connect(&cfg).await.expect("connect to the master");
        let addr = agent_http(&client).await;

        // No host yet: 503, and the answer says where to go instead.
        let r = call("GET", &addr, "/fn/echo/x", b"").await;
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(
            r.body
                .contains("no host of function echo runs on this agent")
                && r.body.contains("master"),
            "{}",
            r.body
        );

        let (echo_sha, echo_size) = client
            .upload_file(&guest("echo"))
            .await
            .expect("upload echo");
        let (hello_sha, hello_size) = client
            .upload_file(&hello_http_component())
            .await
            .expect("upload hello-http");

        let mut s = client
            .subscribe(FrameworkInfo {
                name: "fn-agent-test".into(),
                roles: vec!["*".into()],
                failover_timeout_seconds: 60.0,
                ..Default::default()
            })
            .await
            .expect("subscribe");
        let echo_host = host_task("echo-1", "echo", &echo_sha, echo_size, 0);
        // Fuel bounds hello-http's `/spin` path, so one request can fail on purpose.
        let hello_host = host_task("hello-1", "hello", &hello_sha, hello_size, 20_000_000);
        launch(&mut s, vec![echo_host, hello_host]).await;
        for running in running_all(&mut s, &["echo-1", "hello-1"]).await {
            assert!(
                running.instantiate_us > 0,
                "RUNNING carries the load time: {running:?}"
            );
        }

        // A CGI guest: method, path, query, headers and body all reach it.
        let r = call("POST", &addr, "/fn/echo/x?y=1", b"hello agent").await;
        assert_eq!(r.status, 200, "{r:?}");
        for line in [
            "REQUEST_METHOD: POST",
            "SCRIPT_NAME: /fn/echo",
            "PATH_INFO: /x",
            "QUERY_STRING: y=1",
            "CONTENT_LENGTH: 11",
            "HTTP_X_TEST: yes",
        ] {
            assert!(r.body.contains(line), "{line:?} missing from {}", r.body);
        }
        assert!(r.body.ends_with("\n\nhello agent"), "{}", r.body);

        // A wasi:http component.
        let r = call("GET", &addr, "/fn/hello/some/path?y=1", b"").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-agora-guest"), Some("hello-http"));
        assert_eq!(
            r.body,
            "hello from a wasi:http component: GET /some/path?y=1\n"
        );

        // A request past its limits fails alone, says why, and is logged in the
        // host's stderr; the function keeps serving.
        let r = call("GET", &addr, "/fn/hello/spin", b"").await;
        assert_eq!(r.status, 500, "{r:?}");
        assert!(
            r.body.contains("fuel limit of 20000000 exhausted"),
            "{}",
            r.body
        );
        assert_eq!(call("GET", &addr, "/fn/hello/", b"").await.status, 200);
        let (stderr, _) = client
            .read_file("hello-1", "stderr", 0, 64 << 10)
            .await
            .expect("read the host's stderr");
        let stderr = String::from_utf8_lossy(&stderr);
        assert!(
            stderr.contains("request failed: 500 fuel limit of 20000000 exhausted"),
            "{stderr}"
        );

        // Metrics, summed over the agent's hosts (one each here).
        let echo = metrics_of(&addr, "echo").await;
        assert_eq!(echo["requests"], 1, "{echo}");
        assert_eq!(echo["responses"], 1, "{echo}");
        let hello = metrics_of(&addr, "hello").await;
        assert_eq!(hello["requests"], 3, "{hello}");
        assert_eq!(hello["errors"]["fuel"], 1, "{hello}");
        assert_eq!(hello["kind"], "http_component", "{hello}");

        // Killed: the agent stops routing at once; the function is gone from it.
        s.kill("echo-1").await.expect("kill");
        let killed = update(&mut s, "echo-1", TaskState::TaskKilled).await;
        assert!(killed.message.contains("stopped serving"), "{killed:?}");
        let r = call("GET", &addr, "/fn/echo/x", b"").await;
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.header("retry-after"), Some("1"));
        // The other host is untouched.
        assert_eq!(call("GET", &addr, "/fn/hello/x", b"").await.status, 200);

        s.kill("hello-1").await.expect("kill");
        update(&mut s, "hello-1", TaskState::TaskKilled).await;
        assert_eq!(call("GET", &addr, "/fn/hello/x", b"").await.status, 503);
        s.teardown().await.expect("teardown");
    });
}

/// Sequential no-op requests on one keep-alive connection: (p50, p99, mean) in µs.
async fn latencies<T>(
    mut send: hyper::client::conn::http1::SendRequest<T>,
    uri: &str,
    n: usize,
) -> (u64, u64, u64)
where
    T: hyper::body::Body + Default + Send + 'static,
    T::Data: Send,
    T::Error: std::error::Error + Send + Sync,
{
    use http_body_util::BodyExt as _;
    let mut us = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let request = hyper::Request::get(uri)
            .header("host", "localhost")
            .body(T::default())
            .expect("request");
        let started = std::time::Instant::now();
        send.ready().await.expect("connection ready");
        let response = send.send_request(request).await.expect("answer");
        assert_eq!(response.status(), 200);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"ok\n");
        // The first tenth warms up (pool slots, connections, caches).
        if i >= n / 10 {
            us.push(started.elapsed().as_micros() as u64);
        }
    }
    us.sort_unstable();
    let mean = us.iter().sum::<u64>() / us.len() as u64;
    (us[us.len() / 2], us[us.len() * 99 / 100], mean)
}

/// A no-op function answers the same through the agent's proxy as straight at its
/// host's socket, request after request on one keep-alive connection; the latencies
/// of both are printed (no timing is asserted): `cargo test -p agora-cli --test
/// fn_agent proxy -- --nocapture` (add `--release` for figures worth comparing).
#[test]
fn proxy_and_host_socket_answer_alike_on_kept_alive_connections() {
    let cluster = Cluster::start();
    let rt = runtime();
    rt.block_on(async {
        let cfg = ClientConfig::load(&cluster.config).expect("client config");
        let client = Client::connect(&cfg).await.expect("connect to the master");
        let addr = agent_http(&client).await;
        let (sha, size) = client
            .upload_file(&guest("noop"))
            .await
            .expect("upload noop");
        let mut s = client
            .subscribe(FrameworkInfo {
                name: "fn-latency".into(),
                roles: vec!["*".into()],
                ..Default::default()
            })
            .await
            .expect("subscribe");
        launch(&mut s, vec![host_task("noop-1", "noop", &sha, size, 0)]).await;
        running_all(&mut s, &["noop-1"]).await;
        let socket = cluster
            .agent_dir()
            .join("sandboxes")
            .join(s.framework_id())
            .join("noop-1")
            .join("fn.sock");
        let n = 500;

        let tcp = tokio::net::TcpStream::connect(&addr).await.expect("agent");
        tcp.set_nodelay(true).expect("nodelay");
        let (send, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
        tokio::spawn(conn);
        let proxied = latencies(send, "/fn/noop", n).await;

        let unix = tokio::net::UnixStream::connect(&socket)
            .await
            .expect("host socket");
        let (send, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(hyper_util::rt::TokioIo::new(unix))
        .await
        .expect("handshake");
        tokio::spawn(conn);
        let direct = latencies(send, "/fn/noop", n).await;

        println!(
            "no-op request, {n} sequential on one keep-alive connection (p50 / p99 / mean, µs):"
        );
        println!(
            "  through the agent's HTTP proxy: {} / {} / {}",
            proxied.0, proxied.1, proxied.2
        );
        println!(
            "  straight at the host's socket:  {} / {} / {}",
            direct.0, direct.1, direct.2
        );
        s.teardown().await.expect("teardown");
    });
}
