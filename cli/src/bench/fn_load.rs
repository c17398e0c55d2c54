//! Load-testing a no-op function against process-per-request baselines, for
//! `agora bench fn` (moved here from the functions library: benchmarks are not part
//! of the runtime).
//!
//! Every server answers `GET /fn/noop` with `ok\n` and is loaded the same way
//! ([`load`]): N keep-alive HTTP/1.1 connections on loopback, each sending requests
//! back to back, [`WARMUP`] of warm-up, then a measured window; only `200 ok\n`
//! answers that start and end inside the window count, anything else is an error.
//!
//! The servers this module starts, all in the calling process on the current tokio
//! runtime, all on the same axum server ([`agora_fn_runtime::serve_tcp`]):
//! - the runtime ([`start_runtime`]): the runtime's [`FunctionHost`] and [`router`], a
//!   fresh instance per request from the pre-instantiated module, as an agent's
//!   function host serves it ([`noop_spec`] has the limits);
//! - [`Baseline::WasmProcess`]: a fresh process per request running the same module
//!   CGI-style, as `wasmtime run` would: `agora bench run-once CWASM` (hidden)
//!   ([`run_once`]), which loads the module precompiled once ([`precompile`], like
//!   `wasmtime compile`), runs it with the request's CGI environment and stdio, and exits;
//! - [`Baseline::NativeProcess`]: a native CGI program per request (`printf` writing
//!   the same response), the classic CGI cost.
//!
//! [`measure`] loads a list of servers at each concurrency and prints a row per run;
//! [`print_ratios`] prints each server's ratios to the baselines measured in that run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::http::{Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

use agora_fn_runtime::{
    router, serve_tcp, FunctionHost, FunctionRegistry, FunctionSpec, HostConfig, HttpConfig,
    ModuleSource,
};

/// The path every server answers.
pub const NOOP_PATH: &str = "/fn/noop";
/// The only answer body counted as a success.
pub const NOOP_BODY: &[u8] = b"ok\n";
/// Load before each measured window, not counted.
pub const WARMUP: Duration = Duration::from_secs(1);
/// Where `scripts/build-guests.sh` puts the noop guest, relative to the workspace.
pub const NOOP_MODULE: &str = "target/guests/wasm32-wasip1/release/noop.wasm";
/// The (hidden) subcommand of `agora` that runs a precompiled module once
/// ([`run_once`]).
pub const RUN_ONCE: [&str; 2] = ["bench", "run-once"];

/// The noop guest built by `scripts/build-guests.sh`: looked for under the current
/// directory and its parents, then in the workspace this crate was built from.
pub fn default_module() -> Result<PathBuf> {
    let mut dir = std::env::current_dir().ok();
    while let Some(d) = dir {
        let candidate = d.join(NOOP_MODULE);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(NOOP_MODULE);
    if built.is_file() {
        return Ok(built.canonicalize().unwrap_or(built));
    }
    bail!(
        "no {NOOP_MODULE} under the current directory or its parents: run \
         scripts/build-guests.sh in the workspace, or pass --module FILE"
    )
}

/// Checks a benchmark's settings: measured seconds positive and finite (at most a
/// day), every concurrency at least 1.
pub fn check_settings(seconds: f64, concurrency: &[usize]) -> Result<Duration> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0) {
        bail!("--seconds must be a positive number of seconds (at most 86400), not {seconds}");
    }
    if concurrency.is_empty() || concurrency.contains(&0) {
        bail!("--concurrency must list connection counts of at least 1, e.g. 1,64");
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The noop function as every benchmark deploys it: 64 requests at once, a queue of
/// 1024 waiting up to 5 s, the default 5 s deadline and 64 MiB, unlimited fuel.
/// `agora bench fn` deploys the same settings to its cluster.
pub fn noop_spec(module: &Path) -> FunctionSpec {
    let mut spec = FunctionSpec::new("noop", "bench", ModuleSource::Path(module.to_path_buf()));
    spec.max_concurrency = 64;
    spec.queue_len = 1024;
    spec.max_queue_wait = Duration::from_secs(5);
    spec
}

/// A server started by this module, serving on the current tokio runtime until dropped.
pub struct Served {
    /// Its loopback address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    _scratch: Option<ScratchDir>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_router(app: axum::Router, scratch: Option<ScratchDir>) -> Result<Served> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on a loopback port")?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = serve_tcp(listener, app).await {
            tracing::error!(%addr, error = %e, "benchmark server stopped");
        }
    });
    Ok(Served {
        addr,
        task,
        _scratch: scratch,
    })
}

/// The function runtime alone serving [`noop_spec`] for `module`, on a free loopback port.
pub async fn start_runtime(module: &Path) -> Result<Served> {
    let host =
        FunctionHost::new(HostConfig::default()).context("cannot create the function host")?;
    let registry = FunctionRegistry::new(host);
    registry
        .deploy(noop_spec(module))
        .with_context(|| format!("cannot load {} as a function", module.display()))?;
    serve_router(router(registry, HttpConfig::default()), None).await
}

/// A process-per-request baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// The same module in a fresh `wasmtime run`-style process per request.
    WasmProcess,
    /// A native CGI program (`printf`) per request.
    NativeProcess,
}

impl Baseline {
    /// Both baselines, in the order they are measured and printed.
    pub const ALL: [Baseline; 2] = [Baseline::WasmProcess, Baseline::NativeProcess];

    /// Its name in `--servers` and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Baseline::WasmProcess => "wasm-process",
            Baseline::NativeProcess => "native-process",
        }
    }

    /// The baseline called `name`, if any.
    pub fn from_name(name: &str) -> Option<Baseline> {
        Baseline::ALL.into_iter().find(|b| b.name() == name)
    }

    /// A one-line description for the benchmark's header.
    pub fn describe(self) -> &'static str {
        match self {
            Baseline::WasmProcess => {
                "a fresh process per request running the precompiled module (`run-once`, like `wasmtime run`)"
            }
            Baseline::NativeProcess => "a fresh native CGI process (printf) per request",
        }
    }
}

/// Starts `baseline` on a free loopback port. The wasm one precompiles `module` into
/// a scratch directory (removed when the server is dropped) and runs
/// `helper bench run-once CWASM` per request; `helper` must be an executable calling
/// [`run_once`] for that subcommand, as `agora` does (the native one needs none).
pub async fn start_baseline(
    baseline: Baseline,
    module: &Path,
    helper: Option<&Path>,
) -> Result<Served> {
    match baseline {
        Baseline::WasmProcess => {
            let Some(helper) = helper else {
                bail!(
                    "the wasm-process baseline needs an executable with a `{}` subcommand (agora)",
                    RUN_ONCE.join(" ")
                );
            };
            let scratch = ScratchDir::new()?;
            let cwasm = scratch.path.join("noop.cwasm");
            precompile(module, &cwasm)?;
            let helper = helper.to_path_buf();
            let app = process_router(Arc::new(move || {
                let mut cmd = tokio::process::Command::new(&helper);
                cmd.args(RUN_ONCE).arg(&cwasm);
                cmd
            }));
            serve_router(app, Some(scratch)).await
        }
        Baseline::NativeProcess => {
            let printf = ["/usr/bin/printf", "/bin/printf"]
                .into_iter()
                .find(|p| Path::new(p).is_file())
                .context("no /usr/bin/printf or /bin/printf for the native-process baseline; install coreutils or leave it out of --servers")?;
            let app = process_router(Arc::new(move || {
                let mut cmd = tokio::process::Command::new(printf);
                cmd.arg("Content-Type: text/plain\\r\\n\\r\\nok\\n");
                cmd
            }));
            serve_router(app, None).await
        }
    }
}

/// A router answering `/fn/{name}` by running a fresh CGI process per request and
/// parsing its output as the function host parses a CGI guest's.
fn process_router(command: Arc<dyn Fn() -> tokio::process::Command + Send + Sync>) -> axum::Router {
    let handler = move |request: axum::extract::Request| {
        let command = Arc::clone(&command);
        async move {
            let mut cmd = command();
            cmd.env_clear()
                .env("GATEWAY_INTERFACE", "CGI/1.1")
                .env("REQUEST_METHOD", request.method().as_str())
                .env("SCRIPT_NAME", NOOP_PATH)
                .env("PATH_INFO", "")
                .env("QUERY_STRING", request.uri().query().unwrap_or(""))
                .env("SERVER_PROTOCOL", "HTTP/1.1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            let answer = match cmd.output().await {
                Ok(out) if out.status.success() => {
                    agora_fn_runtime::parse_cgi_response(Bytes::from(out.stdout))
                        .map_err(|f| f.message)
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

/// A fresh directory under the system's temporary directory, removed when dropped.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new() -> Result<ScratchDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("agora-fn-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create the scratch directory {}", path.display()))?;
        Ok(ScratchDir { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the scratch directory");
        }
    }
}

/// The engine of [`precompile`] and [`run_once`]: wasmtime's defaults, as
/// `wasmtime compile` and `wasmtime run` have them.
fn run_once_engine() -> Result<wasmtime::Engine> {
    wasmtime::Engine::new(&wasmtime::Config::new())
        .map_err(|e| anyhow::anyhow!("cannot create a wasmtime engine: {e}"))
}

/// Compiles `module` once for [`run_once`] into `out` (like `wasmtime compile`).
pub fn precompile(module: &Path, out: &Path) -> Result<()> {
    let engine = run_once_engine()?;
    let bytes =
        std::fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
    let compiled = engine
        .precompile_module(&bytes)
        .map_err(|e| anyhow::anyhow!("cannot compile {}: {e}", module.display()))?;
    std::fs::write(out, compiled).with_context(|| format!("cannot write {}", out.display()))
}

/// Runs a module precompiled by [`precompile`] once, as a WASI preview 1 command with
/// this process's environment and stdio and no arguments (like `wasmtime run`);
/// returns the guest's exit code. The `run-once` subcommand of a helper executable.
pub fn run_once(cwasm: &Path) -> Result<i32> {
    let engine = run_once_engine()?;
    // SAFETY: `deserialize_file` trusts the file to be wasmtime's compiled code; this
    // one was written by `precompile` with an identically configured engine.
    let module = unsafe { wasmtime::Module::deserialize_file(&engine, cwasm) }.map_err(|e| {
        anyhow::anyhow!(
            "cannot load {} (written by `precompile` of the same build?): {e}",
            cwasm.display()
        )
    })?;
    let mut linker = wasmtime::Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |ctx: &mut wasmtime_wasi::p1::WasiP1Ctx| {
        ctx
    })
    .map_err(|e| anyhow::anyhow!("cannot link WASI: {e}"))?;
    let wasi = wasmtime_wasi::WasiCtxBuilder::new()
        .inherit_stdio()
        .inherit_env()
        .arg("noop")
        .build_p1();
    let mut store = wasmtime::Store::new(&engine, wasi);
    let instance = linker
        .instantiate(&mut store, &module)
        .map_err(|e| anyhow::anyhow!("cannot instantiate {}: {e}", cwasm.display()))?;
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(|e| anyhow::anyhow!("{} has no `_start` command: {e}", cwasm.display()))?;
    match start.call(&mut store, ()) {
        Ok(()) => Ok(0),
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => Ok(exit.0),
            None => bail!("the guest failed: {e}"),
        },
    }
}

/// One measured run of one server at one concurrency.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Successful requests inside the measured window.
    pub requests: usize,
    /// Other answers inside the window (wrong status or body).
    pub errors: usize,
    /// Length of the measured window.
    pub seconds: f64,
    /// Median latency of the successful requests, µs (0 when there were none).
    pub p50_us: u64,
    /// 99th percentile latency of the successful requests, µs (0 when there were none).
    pub p99_us: u64,
}

impl Measured {
    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// The `q` quantile (0..=1, nearest rank) of ascending `sorted` latencies; 0 when empty.
pub fn percentile(sorted: &[u32], q: f64) -> u64 {
    let rank = (sorted.len() as f64 * q.clamp(0.0, 1.0)).ceil() as usize;
    let at = sorted.get(rank.saturating_sub(1)).or(sorted.last());
    at.map_or(0, |&v| u64::from(v))
}

/// Loads `addr` with `concurrency` keep-alive connections, each sending `GET /fn/noop`
/// back to back: [`WARMUP`], then `duration` measured.
pub async fn load(addr: SocketAddr, concurrency: usize, duration: Duration) -> Result<Measured> {
    let measure_from = Instant::now() + WARMUP;
    let end = measure_from + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(connection(addr, measure_from, end)))
        .collect();
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (lat, errs) = task.await.context("a load connection task failed")??;
        latencies.extend(lat);
        errors += errs;
    }
    latencies.sort_unstable();
    Ok(Measured {
        requests: latencies.len(),
        errors,
        seconds: duration.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
    })
}

/// One keep-alive connection sending requests back to back until `end`: latencies
/// (µs) of `200 ok` answers inside the measured window, and the count of other answers.
async fn connection(
    addr: SocketAddr,
    measure_from: Instant,
    end: Instant,
) -> Result<(Vec<u32>, usize)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP/1.1 handshake with {addr} failed"))?;
    tokio::spawn(conn);
    let mut latencies = Vec::new();
    let mut errors = 0;
    loop {
        let start = Instant::now();
        if start >= end {
            break;
        }
        let request = hyper::Request::get(NOOP_PATH)
            .header("host", "bench")
            .body(Empty::<Bytes>::new())?;
        let sent = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let ok = response.status() == StatusCode::OK;
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(ok && &body[..] == NOOP_BODY)
        };
        let ok = sent
            .await
            .with_context(|| format!("GET {NOOP_PATH} on {addr} failed (connection lost?)"))?;
        let done = Instant::now();
        if start >= measure_from && done <= end {
            if ok {
                let us = done.duration_since(start).as_micros();
                latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
            } else {
                errors += 1;
            }
        }
    }
    Ok((latencies, errors))
}

/// One `GET path` on a new connection to `addr`: the answer's status and body, and
/// the time from connecting to the whole answer (for timing a start: the first request
/// of a function with no host). Bounded by `limit`.
pub async fn get_once(
    addr: SocketAddr,
    path: &str,
    limit: Duration,
) -> Result<(StatusCode, Bytes, Duration)> {
    let start = Instant::now();
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .with_context(|| format!("HTTP/1.1 handshake with {addr} failed"))?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", "bench")
            .body(Empty::<Bytes>::new())?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("GET {path} on {addr} failed"))?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("GET {path} on {addr}: no answer within {limit:?}"))??;
    Ok((status, body, start.elapsed()))
}

/// One row of a benchmark: a server at a concurrency.
#[derive(Clone, Debug)]
pub struct Row {
    /// The server's name (`runtime`, `agent`, `wasm-process`, ...).
    pub server: String,
    /// Concurrent connections.
    pub concurrency: usize,
    /// What was measured.
    pub measured: Measured,
}

/// The header of the rows [`measure`] prints.
pub fn row_header() -> String {
    format!(
        "{:<14} {:>4} {:>10} {:>10} {:>10} {:>7}",
        "SERVER", "CONN", "REQ/S", "P50", "P99", "ERRORS"
    )
}

impl Row {
    /// The row as a line under [`row_header`].
    pub fn line(&self) -> String {
        let m = &self.measured;
        format!(
            "{:<14} {:>4} {:>10.0} {:>8}µs {:>8}µs {:>7}",
            self.server,
            self.concurrency,
            m.rps(),
            m.p50_us,
            m.p99_us,
            m.errors
        )
    }
}

/// Loads each server at each concurrency (all servers at one concurrency, then the
/// next), printing the header and then each row as it is measured.
pub async fn measure(
    servers: &[(String, SocketAddr)],
    concurrency: &[usize],
    duration: Duration,
) -> Result<Vec<Row>> {
    println!("{}", row_header());
    let mut rows = Vec::new();
    for &c in concurrency {
        for (server, addr) in servers {
            let measured = load(*addr, c, duration)
                .await
                .with_context(|| format!("loading {server} ({addr}) with {c} connections"))?;
            let row = Row {
                server: server.clone(),
                concurrency: c,
                measured,
            };
            println!("{}", row.line());
            rows.push(row);
        }
    }
    Ok(rows)
}

/// `x` as a ratio: more digits when small.
fn fmt_ratio(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 100.0 {
        format!("{x:.0}x")
    } else if x >= 10.0 {
        format!("{x:.1}x")
    } else {
        format!("{x:.2}x")
    }
}

/// The ratios of every non-baseline server in `rows` to each baseline in `rows` at
/// the same concurrency: req/s as server ÷ baseline and p50 as baseline ÷ server, so
/// above 1 the server is ahead on both. Empty when `rows` has no baseline or no
/// other server.
pub fn ratio_table(rows: &[Row]) -> String {
    let baselines: Vec<Baseline> = Baseline::ALL
        .into_iter()
        .filter(|b| rows.iter().any(|r| r.server == b.name()))
        .collect();
    let servers: Vec<&Row> = rows
        .iter()
        .filter(|r| Baseline::from_name(&r.server).is_none())
        .collect();
    if baselines.is_empty() || servers.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "ratios to the process-per-request baselines, same run \
         (req/s: server ÷ baseline; p50: baseline ÷ server; above 1 the server is ahead)\n",
    );
    let mut groups = format!("{:<14} {:>4}", "", "");
    for b in &baselines {
        groups += &format!("  {:^19}", format!("vs {}", b.name()));
    }
    out += groups.trim_end();
    out += &format!("\n{:<14} {:>4}", "SERVER", "CONN");
    for _ in &baselines {
        out += &format!("  {:>9} {:>9}", "REQ/S", "P50");
    }
    out.push('\n');
    for row in servers {
        out += &format!("{:<14} {:>4}", row.server, row.concurrency);
        for b in &baselines {
            let base = rows
                .iter()
                .find(|r| r.server == b.name() && r.concurrency == row.concurrency);
            let (rps, p50) = match base {
                Some(base) if base.measured.requests > 0 && row.measured.requests > 0 => (
                    fmt_ratio(row.measured.rps() / base.measured.rps()),
                    fmt_ratio(base.measured.p50_us as f64 / row.measured.p50_us.max(1) as f64),
                ),
                _ => ("-".into(), "-".into()),
            };
            out += &format!("  {rps:>9} {p50:>9}");
        }
        out.push('\n');
    }
    out
}

/// Prints [`ratio_table`] after a blank line, if it is not empty.
pub fn print_ratios(rows: &[Row]) {
    let table = ratio_table(rows);
    if !table.is_empty() {
        println!("\n{}", table.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(server: &str, concurrency: usize, requests: usize, p50_us: u64) -> Row {
        Row {
            server: server.into(),
            concurrency,
            measured: Measured {
                requests,
                errors: 0,
                seconds: 1.0,
                p50_us,
                p99_us: p50_us * 2,
            },
        }
    }

    #[test]
    fn percentile_is_nearest_rank() {
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.99), 7);
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
    }

    #[test]
    fn ratios_are_per_concurrency_and_above_one_when_ahead() {
        let rows = [
            row("runtime", 1, 10_000, 100),
            row("wasm-process", 1, 100, 10_000),
            row("native-process", 1, 1_000, 1_000),
            row("runtime", 64, 20_000, 3_000),
            row("wasm-process", 64, 0, 0),
        ];
        let table = ratio_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[1].contains("vs wasm-process") && lines[1].contains("vs native-process"));
        let c1: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(c1, ["runtime", "1", "100x", "100x", "10.0x", "10.0x"]);
        // No successful baseline requests, no baseline row: no ratio.
        let c64: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(c64, ["runtime", "64", "-", "-", "-", "-"]);
    }

    #[test]
    fn no_ratios_without_a_baseline() {
        assert!(ratio_table(&[row("runtime", 1, 10, 10)]).is_empty());
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(check_settings(f64::NAN, &[1]).is_err());
        assert!(check_settings(-1.0, &[1]).is_err());
        assert!(check_settings(1.0, &[]).is_err());
        assert!(check_settings(1.0, &[1, 0]).is_err());
        assert_eq!(
            check_settings(0.5, &[1, 64]).unwrap(),
            Duration::from_millis(500)
        );
    }
}
