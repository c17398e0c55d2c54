//! `fn-bench`: load-tests the function host against process-per-request baselines.
//!
//! ```text
//! cargo run --release -p agora-functions --bin fn-bench -- [--seconds 5] [--concurrency 1,64]
//! ```
//!
//! For each server below it starts a child process (`fn-bench serve MODE`) on a free
//! loopback port, then drives it from this process with N keep-alive HTTP/1.1
//! connections (hyper), each sending `GET /fn/noop` back to back for a fixed time,
//! after a short warm-up. It prints req/s, p50 and p99 per server and concurrency,
//! and each baseline's ratio to the function host.
//!
//! - `host`: the function host (this crate), the `noop` CGI guest, a fresh instance
//!   per request from its `InstancePre`, pooling allocator, fuel and deadline on.
//! - `wasm-process`: a fresh process per request running the same module CGI-style,
//!   as `wasmtime run` would: `fn-bench run-once`, which deserializes the module
//!   precompiled once by the server (like `wasmtime compile` + `wasmtime run`), runs
//!   it with the request's CGI environment, stdin and stdout, and exits.
//! - `native-process`: a native CGI program per request (`printf` writing the same
//!   response), the classic CGI cost.
//!
//! Both baselines' HTTP servers are the same axum server the function host uses, so the
//! difference is what happens per request.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_functions::{
    router, serve_tcp, FunctionHost, FunctionRegistry, FunctionSpec, HostConfig, HttpConfig,
    ModuleSource,
};
use anyhow::{bail, Context, Result};
use axum::http::{Response, StatusCode};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};

#[derive(Parser)]
#[command(about = "Load-tests the function host against process-per-request CGI baselines")]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Measured seconds per server and concurrency (after a 1 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent keep-alive connections, comma-separated.
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Seconds per process-per-request baseline run (they are ~100x slower).
    #[arg(long, default_value_t = 3.0)]
    baseline_seconds: f64,
    /// The CGI guest to serve (default: guest-examples' noop, built by
    /// scripts/build-guests.sh).
    #[arg(long)]
    module: Option<PathBuf>,
    /// Servers to measure, comma-separated: host, wasm-process, native-process.
    #[arg(
        long,
        default_value = "host,wasm-process,native-process",
        value_delimiter = ','
    )]
    servers: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serves MODE on a free loopback port and prints `listening on ADDR`.
    Serve {
        /// host, wasm-process or native-process.
        mode: String,
        /// The CGI guest.
        module: PathBuf,
    },
    /// Runs a precompiled CGI module once with this process's environment and stdio,
    /// like `wasmtime run`.
    RunOnce {
        /// A module precompiled by `fn-bench serve wasm-process`.
        cwasm: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match &args.command {
        Some(Cmd::Serve { mode, module }) => serve(mode, module),
        Some(Cmd::RunOnce { cwasm }) => run_once(cwasm),
        None => bench(&args),
    }
}

/// One measured run.
struct Measured {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    p50_us: u64,
    p99_us: u64,
}

impl Measured {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

fn bench(args: &Args) -> Result<()> {
    let module = match &args.module {
        Some(m) => m.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/guests/wasm32-wasip1/release/noop.wasm"),
    };
    if !module.is_file() {
        bail!(
            "no guest module at {}; run scripts/build-guests.sh first (or pass --module)",
            module.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;

    println!(
        "fn-bench: GET /fn/noop, keep-alive HTTP/1.1 on loopback; {} cores; module {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        module.display()
    );
    println!("load generator: this process, 1 thread; server: a child process\n");
    let mut results: Vec<(String, usize, Measured)> = Vec::new();
    for mode in &args.servers {
        let seconds = if mode == "host" {
            args.seconds
        } else {
            args.baseline_seconds
        };
        let server = Server::start(&exe, mode, &module)?;
        for &c in &args.concurrency {
            let measured =
                runtime.block_on(load(server.addr, c, Duration::from_secs_f64(seconds)))?;
            println!(
                "{mode:>15}  c={c:<3}  {:>9.0} req/s  p50 {:>7} µs  p99 {:>7} µs  ({} requests, {} errors)",
                measured.rps(),
                measured.p50_us,
                measured.p99_us,
                measured.requests,
                measured.errors
            );
            results.push((mode.clone(), c, measured));
        }
        drop(server);
    }

    println!("\nratios against the function host (host / baseline for req/s, baseline / host for latency):");
    for &c in &args.concurrency {
        let Some((_, _, host)) = results.iter().find(|(m, cc, _)| m == "host" && *cc == c) else {
            continue;
        };
        for (mode, _, m) in results.iter().filter(|(m, cc, _)| m != "host" && *cc == c) {
            println!(
                "  c={c:<3} host vs {mode:<15} throughput x{:.1}, p50 x{:.1}, p99 x{:.1}",
                host.rps() / m.rps().max(f64::MIN_POSITIVE),
                m.p50_us as f64 / host.p50_us.max(1) as f64,
                m.p99_us as f64 / host.p99_us.max(1) as f64,
            );
        }
    }
    Ok(())
}

/// A server child process; killed when dropped.
struct Server {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Server {
    fn start(exe: &Path, mode: &str, module: &Path) -> Result<Self> {
        let mut child = Command::new(exe)
            .args(["serve", mode])
            .arg(module)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the {mode} server"))?;
        let stdout = child.stdout.take().context("no stdout from the server")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("cannot read the server's address")?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok());
        match addr {
            Some(addr) => Ok(Server { child, addr }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the {mode} server did not start (it said {line:?})")
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `c` connections, each sending requests back to back; 1 s of warm-up, then
/// `duration` measured.
async fn load(addr: std::net::SocketAddr, c: usize, duration: Duration) -> Result<Measured> {
    let warmup = Duration::from_secs(1);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::with_capacity(c);
    for _ in 0..c {
        tasks.push(tokio::spawn(connection(addr, measure_from, end)));
    }
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (lat, errs) = task.await.context("load task failed")??;
        latencies.extend(lat);
        errors += errs;
    }
    let elapsed = duration;
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
        elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

async fn connection(
    addr: std::net::SocketAddr,
    measure_from: Instant,
    end: Instant,
) -> Result<(Vec<u32>, usize)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .context("connect")?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut latencies = Vec::new();
    let mut errors = 0;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let request = hyper::Request::get("/fn/noop")
            .header("host", "bench")
            .body(Empty::<Bytes>::new())?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let ok = response.status() == StatusCode::OK;
        let body = response.into_body().collect().await?.to_bytes();
        let done = Instant::now();
        if now >= measure_from && done <= end {
            if ok && &body[..] == b"ok\n" {
                latencies
                    .push(u32::try_from(done.duration_since(now).as_micros()).unwrap_or(u32::MAX));
            } else {
                errors += 1;
            }
        }
    }
    Ok((latencies, errors))
}

// ---- servers (child processes) ----

fn serve(mode: &str, module: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the server runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = match mode {
            "host" => {
                let cache = std::env::temp_dir().join("agora-fn-bench-cache");
                let host = FunctionHost::new(HostConfig {
                    cache_dir: Some(cache),
                    ..HostConfig::default()
                })?;
                let registry = FunctionRegistry::new(host);
                let mut spec =
                    FunctionSpec::new("noop", "bench", ModuleSource::Path(module.to_path_buf()));
                spec.max_concurrency = 128;
                spec.fuel = 100_000_000;
                registry.deploy(spec)?;
                router(registry, HttpConfig::default())
            }
            "wasm-process" => {
                let cwasm = precompile(module)?;
                let exe = std::env::current_exe()?;
                process_router(Arc::new(move || {
                    let mut cmd = tokio::process::Command::new(&exe);
                    cmd.arg("run-once").arg(&cwasm);
                    cmd
                }))
            }
            "native-process" => {
                let printf = ["/usr/bin/printf", "/bin/printf"]
                    .into_iter()
                    .find(|p| Path::new(p).is_file())
                    .context("no printf binary for the native CGI baseline")?;
                process_router(Arc::new(move || {
                    let mut cmd = tokio::process::Command::new(printf);
                    cmd.arg("Content-Type: text/plain\\r\\n\\r\\nok\\n");
                    cmd
                }))
            }
            other => bail!("unknown server {other:?}: use host, wasm-process or native-process"),
        };
        println!("listening on {addr}");
        std::io::stdout().flush()?;
        serve_tcp(listener, app).await?;
        Ok(())
    })
}

/// A router that answers `/fn/{name}` by running a fresh CGI process per request.
fn process_router(command: Arc<dyn Fn() -> tokio::process::Command + Send + Sync>) -> axum::Router {
    let handler = move |request: axum::extract::Request| {
        let command = Arc::clone(&command);
        async move {
            let mut cmd = command();
            cmd.env_clear()
                .env("GATEWAY_INTERFACE", "CGI/1.1")
                .env("REQUEST_METHOD", request.method().as_str())
                .env("SCRIPT_NAME", "/fn/noop")
                .env("PATH_INFO", "")
                .env("QUERY_STRING", request.uri().query().unwrap_or(""))
                .env("SERVER_PROTOCOL", "HTTP/1.1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            let answer = match cmd.output().await {
                Ok(out) if out.status.success() => {
                    agora_functions::parse_cgi_response(Bytes::from(out.stdout))
                }
                Ok(out) => Err(format!("CGI process failed: {}", out.status)),
                Err(e) => Err(format!("cannot spawn the CGI process: {e}")),
            };
            match answer {
                Ok(response) => response.map(axum::body::Body::from),
                Err(reason) => {
                    let mut r = Response::new(axum::body::Body::from(reason));
                    *r.status_mut() = StatusCode::BAD_GATEWAY;
                    r
                }
            }
        }
    };
    axum::Router::new().route("/fn/{name}", axum::routing::any(handler))
}

/// The engine `run-once` uses: wasmtime's defaults, as `wasmtime run` has them.
fn run_once_engine() -> Result<wasmtime::Engine> {
    wasmtime::Engine::new(&wasmtime::Config::new())
        .map_err(|e| anyhow::anyhow!("cannot create the engine: {e}"))
}

/// Compiles the module once for `run-once` (like `wasmtime compile`).
fn precompile(module: &Path) -> Result<PathBuf> {
    let engine = run_once_engine()?;
    let bytes =
        std::fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
    let compiled = engine
        .precompile_module(&bytes)
        .map_err(|e| anyhow::anyhow!("cannot compile {}: {e}", module.display()))?;
    // One fixed name, overwritten by each run: the server is killed, not asked to clean up.
    let out = std::env::temp_dir().join("agora-fn-bench-run-once.cwasm");
    std::fs::write(&out, compiled).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out)
}

/// One CGI request in this process: deserialize, instantiate, run `_start`, exit.
fn run_once(cwasm: &Path) -> Result<()> {
    let engine = run_once_engine()?;
    // SAFETY: the file was written by `precompile` with an identically configured engine.
    let module = unsafe { wasmtime::Module::deserialize_file(&engine, cwasm) }
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", cwasm.display()))?;
    let mut linker = wasmtime::Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |ctx: &mut wasmtime_wasi::p1::WasiP1Ctx| {
        ctx
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let wasi = wasmtime_wasi::WasiCtxBuilder::new()
        .inherit_stdio()
        .inherit_env()
        .arg("noop")
        .build_p1();
    let mut store = wasmtime::Store::new(&engine, wasi);
    let instance = linker
        .instantiate(&mut store, &module)
        .map_err(|e| anyhow::anyhow!("cannot instantiate: {e}"))?;
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match start.call(&mut store, ()) {
        Ok(()) => Ok(()),
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => std::process::exit(exit.0),
            None => bail!("the guest failed: {e}"),
        },
    }
}
