//! `agora bench fn`: a no-op function through a real cluster, beside the function
//! runtime alone, in the same run.
//!
//! Three ways to serve `GET /fn/noop` are loaded with N keep-alive HTTP/1.1
//! connections each sending requests back to back (after a 1 s warm-up):
//! - `runtime`: the functions crate's host and router in this process (what
//!   `fn-bench`'s `host` server measures), the floor for everything else;
//! - `agent`: a private dev cluster's agent HTTP server, which forwards over a Unix
//!   socket to the function host process (`agora executor fn`) the functions framework
//!   placed;
//! - `master`: the same cluster's master HTTP server, which forwards to that agent.
//!
//! The master, the agent and the load generator share this process (and the machine's
//! cores); the host is a process of its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agora_functions::{
    router, serve_tcp, FunctionHost, FunctionRegistry, FunctionSpec, HostConfig, HttpConfig,
    ModuleSource,
};
use agora_proto::v1::{operator_request, FunctionDeploy, FunctionInfo, TaskState, WasmModule};
use agora_sdk::Client;
use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};

#[derive(Args)]
pub struct FnBenchArgs {
    /// Seconds measured per server and concurrency (after a 1 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent keep-alive connections, comma-separated.
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// The CGI guest answering `ok` (default: guest-examples' noop, as
    /// scripts/build-guests.sh builds it under target/guests).
    #[arg(long)]
    module: Option<PathBuf>,
}

struct Measured {
    requests: usize,
    errors: usize,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
}

impl Measured {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

fn default_module() -> anyhow::Result<PathBuf> {
    let rel = Path::new("target/guests/wasm32-wasip1/release/noop.wasm");
    let mut dir = std::env::current_dir()?;
    loop {
        if dir.join(rel).exists() {
            return Ok(dir.join(rel));
        }
        if !dir.pop() {
            anyhow::bail!(
                "no noop.wasm found under target/guests (run scripts/build-guests.sh from the workspace, or pass --module FILE)"
            );
        }
    }
}

/// The function runtime alone, serving `noop` on a free loopback port.
async fn start_runtime(module: &Path) -> anyhow::Result<SocketAddr> {
    let cache = std::env::temp_dir().join(format!("agora-bench-fn-{}", std::process::id()));
    let host = FunctionHost::new(HostConfig {
        cache_dir: Some(cache),
        ..HostConfig::default()
    })?;
    let registry = FunctionRegistry::new(host);
    let mut spec = FunctionSpec::new("noop", "bench", ModuleSource::Path(module.to_path_buf()));
    spec.max_concurrency = 64;
    spec.queue_len = 1024;
    spec.max_queue_wait = Duration::from_secs(5);
    registry.deploy(spec)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_tcp(listener, router(registry, HttpConfig::default())));
    Ok(addr)
}

pub async fn bench_fn(a: FnBenchArgs) -> anyhow::Result<ExitCode> {
    let module = match a.module {
        Some(m) => m,
        None => default_module()?,
    };
    let runtime = start_runtime(&module)
        .await
        .context("starting the in-process function runtime")?;

    let cluster = crate::cluster::PrivateCluster::start().await?;
    let cfg = cluster.client_config.clone();
    let result = async {
        let client = Client::connect(&cfg).await?;
        let (sha256, size) = client.upload_file(&module).await?;
        // One host with all of the agent's cpus: the host's cgroup quota follows its
        // task's cpus, and the default host (0.1 cpu) would measure the quota instead.
        let agent_cpus = client
            .agents()
            .await?
            .iter()
            .filter_map(|a| agora_proto::Resources::from_proto(&a.total).ok())
            .map(|r| r.milli_cpus())
            .max()
            .unwrap_or(1000);
        let host = agora_proto::Resources::cpus_mem(agent_cpus, 256 << 20);
        let deploy = FunctionDeploy {
            name: "noop".into(),
            module: Some(WasmModule {
                sha256,
                size,
                fuel: 0,
                timeout_ms: 5_000,
            }),
            role: "*".into(),
            function: Some(FunctionInfo {
                max_concurrency: 64,
                queue_len: 1024,
                max_queue_wait_ms: 5_000,
                ..Default::default()
            }),
            min_instances: 1,
            max_instances: 1,
            resources: host.to_proto(),
        };
        crate::fns::operator(&cfg, operator_request::Request::FnDeploy(deploy)).await?;
        let agent = wait_for_host(&cfg).await?;
        let master = cfg
            .http
            .as_deref()
            .map(|u| u.trim_start_matches("http://").to_string())
            .ok_or_else(|| anyhow::anyhow!("the private cluster serves no HTTP"))?;
        let targets: [(&str, SocketAddr); 3] = [
            ("runtime", runtime),
            ("agent", agent.parse().context("agent http address")?),
            ("master", master.parse().context("master http address")?),
        ];
        println!(
            "no-op function (GET /fn/noop), {} s per row, {} cores",
            a.seconds,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        println!(
            "{:<8} {:>4} {:>10} {:>10} {:>10} {:>7}  VS RUNTIME",
            "SERVER", "CONN", "REQ/S", "P50", "P99", "ERRORS"
        );
        for &c in &a.concurrency {
            let mut base: Option<f64> = None;
            for (label, addr) in targets {
                let m = load(addr, c, Duration::from_secs_f64(a.seconds)).await?;
                let ratio = match base {
                    None => {
                        base = Some(m.rps());
                        "1.00".to_string()
                    }
                    Some(b) if b > 0.0 => format!("{:.2}", m.rps() / b),
                    Some(_) => "-".into(),
                };
                println!(
                    "{:<8} {:>4} {:>10.0} {:>8}µs {:>8}µs {:>7}  {}",
                    label,
                    c,
                    m.rps(),
                    m.p50_us,
                    m.p99_us,
                    m.errors,
                    ratio
                );
            }
        }
        anyhow::Ok(())
    }
    .await;
    cluster.stop().await;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// The agent HTTP address of the function's first running host (bounded wait).
async fn wait_for_host(cfg: &agora_sdk::ClientConfig) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = crate::fns::operator(
            cfg,
            operator_request::Request::FnList(agora_proto::v1::FunctionList {}),
        )
        .await?;
        let running = list
            .functions
            .iter()
            .flat_map(|f| &f.instances)
            .find(|i| i.state() == TaskState::TaskRunning && !i.http_address.is_empty());
        if let Some(i) = running {
            return Ok(i.http_address.clone());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the noop function got no running host within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // poll for the host
    }
}

async fn load(addr: SocketAddr, c: usize, duration: Duration) -> anyhow::Result<Measured> {
    let measure_from = Instant::now() + Duration::from_secs(1);
    let end = measure_from + duration;
    let tasks: Vec<_> = (0..c)
        .map(|_| tokio::spawn(connection(addr, measure_from, end)))
        .collect();
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, errs) = t.await.context("load task failed")??;
        latencies.extend(lat);
        errors += errs;
    }
    latencies.sort_unstable();
    let pct = |q: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        u64::from(latencies[i])
    };
    Ok(Measured {
        requests: latencies.len(),
        errors,
        seconds: duration.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

/// One keep-alive connection sending requests back to back until `end`; latencies
/// of answers `ok` inside the measured window, and the count of other answers.
async fn connection(
    addr: SocketAddr,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<(Vec<u32>, usize)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut latencies = Vec::new();
    let mut errors = 0;
    loop {
        let start = Instant::now();
        if start >= end {
            break;
        }
        let request = hyper::Request::get("/fn/noop")
            .header("host", "bench")
            .body(Empty::<Bytes>::new())?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let ok = response.status() == hyper::StatusCode::OK;
        let body = response.into_body().collect().await?.to_bytes();
        let done = Instant::now();
        if start >= measure_from && done <= end {
            if ok && &body[..] == b"ok\n" {
                latencies.push(
                    u32::try_from(done.duration_since(start).as_micros()).unwrap_or(u32::MAX),
                );
            } else {
                errors += 1;
            }
        }
    }
    Ok((latencies, errors))
}
