//! Shared test helpers: guest paths (building them when needed), a host with small
//! pools, a server on a free port and a keep-alive HTTP client.

#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_fn_runtime::{
    router, serve_tcp, FunctionHost, FunctionRegistry, FunctionSpec, HostConfig, HttpConfig,
    MetricsSnapshot, ModuleSource,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

/// A WASI preview 1 guest of guest-examples (built on first use).
pub fn cgi_guest(name: &str) -> PathBuf {
    agora_guest_examples::wasm_path(name)
}

/// The `hello-http` component, built on first use.
pub fn hello_http_component() -> PathBuf {
    agora_guest_examples::component_path("hello-http")
}

/// A host with a small pool and a private artifact cache.
pub fn host(cache: &Path) -> Arc<FunctionHost> {
    FunctionHost::new(HostConfig {
        cache_dir: Some(cache.to_path_buf()),
        max_instances: 32,
        max_memory_per_instance: 256 << 20,
        ..HostConfig::default()
    })
    .expect("function host")
}

pub fn spec(name: &str, path: PathBuf) -> FunctionSpec {
    FunctionSpec::new(name, "tests", ModuleSource::Path(path))
}

/// Serves `registry` on a free loopback port; the server lives as long as the test's
/// runtime.
pub async fn start(registry: Arc<FunctionRegistry>, config: HttpConfig) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(serve_tcp(listener, router(registry, config)));
    addr
}

/// A response, whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl HttpClient {
    pub fn new(addr: SocketAddr) -> Self {
        HttpClient {
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(Full::new(body)).expect("request");
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(request))
            .await
            .expect("answer within 30 s")
            .expect("HTTP request");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

/// Waits (bounded) until a function's metrics satisfy `cond`: the test's way to know
/// a request is running or queued, without guessing with sleeps.
pub async fn wait_for_metrics(
    registry: &FunctionRegistry,
    name: &str,
    what: &str,
    cond: impl Fn(&MetricsSnapshot) -> bool,
) {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let snapshot = registry.get(name).expect("function").metrics();
        if cond(&snapshot) {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "{name}: gave up waiting for {what}: {snapshot:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
