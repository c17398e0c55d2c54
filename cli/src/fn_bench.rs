//! `agora bench fn`: a no-op function through a real cluster, beside the function
//! runtime alone and two process-per-request baselines, all in the same run.
//!
//! Five ways to serve `GET /fn/noop` are loaded by the same load generator
//! ([`crate::bench::fn_load::load`]: N keep-alive HTTP/1.1 connections each sending
//! requests back to back, after a 1 s warm-up), all servers at one concurrency before
//! the next:
//! - `runtime`: the functions crate's host and router in this process, the floor for
//!   everything else;
//! - `agent`: a private dev cluster's agent HTTP server, which forwards over a Unix
//!   socket to the function host process (`agora executor fn`) the functions framework
//!   placed;
//! - `master`: the same cluster's master HTTP server, which forwards to that agent;
//! - `wasm-process`: the same module in a fresh process per request, as `wasmtime run`
//!   would run it precompiled (`agora bench run-once`, a hidden subcommand of this
//!   executable);
//! - `native-process`: a native CGI process (`printf`) per request.
//!
//! It prints req/s, p50 and p99 per server and concurrency, then the ratios of
//! runtime, agent and master to each baseline. With a cluster, it first times starts
//! through the master: a first-ever start (a module no agent has seen: fetched,
//! compiled, a host launched through an offer), a cold start (the module compiled and
//! cached on the agent, no host running) and the warm request after it. The master, the agent, the runtime,
//! the baselines' servers and the load generator share this process (and the
//! machine's cores); the function host and the per-request processes are processes
//! of their own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::bench::fn_load::{self as bench, Baseline};
use agora_proto::v1::{operator_request, FunctionDeploy, FunctionInfo, TaskState, WasmModule};
use agora_sdk::{Client, ClientConfig};
use anyhow::Context;
use clap::Args;

const SERVERS: [&str; 5] = [
    "runtime",
    "agent",
    "master",
    "wasm-process",
    "native-process",
];

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
    /// Rounds of start timings (first-ever, cold, warm) before the load; 0: none.
    #[arg(long, default_value_t = 3)]
    starts: usize,
    /// Servers to measure, comma-separated (the cluster starts only for agent or master).
    #[arg(
        long,
        default_value = "runtime,agent,master,wasm-process,native-process",
        value_delimiter = ',',
        value_parser = SERVERS
    )]
    servers: Vec<String>,
}

/// The executable with `bench run-once` for the wasm-process baseline: this one.
fn run_once_helper() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find this executable (the run-once helper)")
}

pub async fn bench_fn(a: FnBenchArgs) -> anyhow::Result<ExitCode> {
    let duration = bench::check_settings(a.seconds, &a.concurrency)?;
    let module = match a.module {
        Some(m) => m,
        None => bench::default_module()?,
    };
    let wanted = |name: &str| a.servers.iter().any(|s| s == name);
    // Everything that can fail without a cluster, before starting one.
    let helper = if wanted(Baseline::WasmProcess.name()) {
        Some(run_once_helper()?)
    } else {
        None
    };
    let mut local: Vec<(&str, bench::Served)> = Vec::new();
    if wanted("runtime") {
        let served = bench::start_runtime(&module)
            .await
            .context("starting the in-process function runtime")?;
        local.push(("runtime", served));
    }
    for b in Baseline::ALL {
        if wanted(b.name()) {
            let served = bench::start_baseline(b, &module, helper.as_deref())
                .await
                .with_context(|| format!("starting the {} baseline", b.name()))?;
            local.push((b.name(), served));
        }
    }

    let cluster = if wanted("agent") || wanted("master") {
        Some(crate::cluster::PrivateCluster::start().await?)
    } else {
        None
    };
    let result = async {
        let (agent, master) = match &cluster {
            Some(cluster) => {
                let cfg = &cluster.client_config;
                let master = cfg
                    .http
                    .as_deref()
                    .map(|u| u.trim_start_matches("http://").to_string())
                    .ok_or_else(|| anyhow::anyhow!("the private cluster serves no HTTP"))?;
                let master: SocketAddr = master
                    .parse()
                    .with_context(|| format!("the master's HTTP address {master:?}"))?;
                if a.starts > 0 {
                    measure_starts(cfg, &module, master, a.starts).await?;
                }
                let agent = deploy_noop(cfg, &module).await?;
                (Some(agent), Some(master))
            }
            None => (None, None),
        };
        // In SERVERS order: the ratios' rows follow it.
        let mut servers: Vec<(String, SocketAddr)> = Vec::new();
        for name in SERVERS {
            if !wanted(name) {
                continue;
            }
            let addr = match name {
                "agent" => agent,
                "master" => master,
                _ => local.iter().find(|(n, _)| *n == name).map(|(_, s)| s.addr),
            };
            if let Some(addr) = addr {
                servers.push((name.to_string(), addr));
            }
        }
        println!(
            "no-op function (GET {}), {} s per row after {} s of warm-up, {} cores, module {}",
            bench::NOOP_PATH,
            duration.as_secs_f64(),
            bench::WARMUP.as_secs(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            module.display()
        );
        for b in Baseline::ALL {
            if wanted(b.name()) {
                println!("{}: {}", b.name(), b.describe());
            }
        }
        println!();
        let rows = bench::measure(&servers, &a.concurrency, duration).await?;
        bench::print_ratios(&rows);
        anyhow::Ok(())
    }
    .await;
    if let Some(cluster) = cluster {
        cluster.stop().await;
    }
    drop(local);
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Deploys the noop function to the cluster with [`bench::noop_spec`]'s settings on
/// one host, and returns the agent HTTP address serving it.
async fn deploy_noop(cfg: &ClientConfig, module: &Path) -> anyhow::Result<SocketAddr> {
    let client = Client::connect(cfg).await?;
    let uploaded = client.upload_file(module).await?;
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
    let spec = bench::noop_spec(module);
    deploy(cfg, &spec.name, module, uploaded, 1, host.to_proto()).await?;
    let agent = wait_for_host(cfg).await?;
    agent
        .parse()
        .with_context(|| format!("the agent's HTTP address {agent:?}"))
}

/// Deploys `module` (already uploaded: `(sha256, size)`) as `name` with
/// [`bench::noop_spec`]'s limits, on one host of `resources` (empty: the default).
async fn deploy(
    cfg: &ClientConfig,
    name: &str,
    module: &Path,
    (sha256, size): (String, u64),
    min_instances: u32,
    resources: Vec<agora_proto::v1::Resource>,
) -> anyhow::Result<()> {
    let spec = bench::noop_spec(module);
    let deploy = FunctionDeploy {
        name: name.to_string(),
        module: Some(WasmModule {
            sha256,
            size,
            fuel: spec.fuel,
            timeout_ms: u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX),
        }),
        role: "*".into(),
        function: Some(FunctionInfo {
            memory_bytes: spec.memory_limit,
            max_concurrency: spec.max_concurrency,
            queue_len: spec.queue_len,
            max_queue_wait_ms: u64::try_from(spec.max_queue_wait.as_millis()).unwrap_or(u64::MAX),
            ..Default::default()
        }),
        min_instances,
        max_instances: 1,
        resources,
    };
    crate::fns::operator(cfg, operator_request::Request::FnDeploy(deploy)).await?;
    Ok(())
}

/// `module` with a custom section naming `tag` appended: the same code under a
/// sha256 no agent has seen (custom sections do not change what a module does).
fn with_custom_section(module: &[u8], tag: &str) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"agora-bench";
    let mut payload = Vec::new();
    leb128(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = module.to_vec();
    out.push(0); // custom section id
    leb128(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

/// Times starts through the master, `rounds` times: the first request of a function
/// whose module no agent has seen (first-ever start), the first request of another
/// function with that module, now compiled in the agent's cache (cold start), and the
/// request after it (warm). Each function scales from zero; they are removed after.
async fn measure_starts(
    cfg: &ClientConfig,
    module: &Path,
    master: SocketAddr,
    rounds: usize,
) -> anyhow::Result<()> {
    const LIMIT: Duration = Duration::from_secs(60);
    let bytes = std::fs::read(module).with_context(|| format!("reading {}", module.display()))?;
    let dir = tempfile::tempdir().context("a temporary directory for the start modules")?;
    let client = Client::connect(cfg).await?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let (mut first, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let path = dir.path().join(format!("start-{round}.wasm"));
        let unique = with_custom_section(&bytes, &format!("{nonce}-{round}"));
        std::fs::write(&path, unique).with_context(|| format!("writing {}", path.display()))?;
        let uploaded = client.upload_file(&path).await?;
        let first_name = format!("start-{round}-first");
        let cold_name = format!("start-{round}-cold");
        for (name, times) in [(&first_name, &mut first), (&cold_name, &mut cold)] {
            deploy(cfg, name, &path, uploaded.clone(), 0, Vec::new()).await?;
            let fn_path = format!("/fn/{name}/");
            let (status, body, took) = bench::get_once(master, &fn_path, LIMIT).await?;
            if status != 200 || &body[..] != bench::NOOP_BODY {
                anyhow::bail!(
                    "GET {fn_path} through the master answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
            }
            times.push(took);
        }
        let (_, _, took) = bench::get_once(master, &format!("/fn/{cold_name}/"), LIMIT).await?;
        warm.push(took);
        for name in [&first_name, &cold_name] {
            crate::fns::operator(
                cfg,
                operator_request::Request::FnRemove(agora_proto::v1::FunctionRemove {
                    name: name.clone(),
                }),
            )
            .await?;
        }
    }
    println!("starts through the master ({rounds} rounds; each function scaled from zero, a new connection per request)");
    println!(
        "{:<12} {:>10} {:>10} {:>10}",
        "START", "MIN", "MEDIAN", "MAX"
    );
    for (what, mut times) in [("first-ever", first), ("cold", cold), ("warm", warm)] {
        times.sort();
        let ms = |d: Option<&Duration>| {
            d.map_or("-".into(), |d| format!("{:.1}ms", d.as_secs_f64() * 1e3))
        };
        println!(
            "{what:<12} {:>10} {:>10} {:>10}",
            ms(times.first()),
            ms(times.get(times.len() / 2)),
            ms(times.last())
        );
    }
    println!();
    Ok(())
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
