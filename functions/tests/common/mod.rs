//! Shared test helpers: guest paths (building them when needed), a host with small
//! pools, a server on a free port and a keep-alive HTTP client.

#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use agora_functions::{
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

/// The `hello-http` component: `guest-examples/hello-http`, built for wasm32-wasip2
/// into `target/guests/wasm32-wasip2/release/hello_http.wasm` on first use (the same
/// place scripts/build-guests.sh puts it).
pub fn hello_http_component() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let target_dir = workspace.join("target").join("guests");
        let manifest = workspace.join("guest-examples").join("hello-http").join("Cargo.toml");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // Cargo decides whether anything is stale; a no-op build takes well under a second.
        let output = Command::new(cargo)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target_dir)
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "building hello-http failed:\n{}\nhint: run scripts/build-guests.sh (it installs the wasm32-wasip2 target)",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(target_dir.join("wasm32-wasip2").join("release").join("hello_http.wasm"))
    });
    match built {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
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
