//! `fn-bench`: load-tests the function runtime against process-per-request baselines.
//!
//! ```text
//! cargo run --release -p agora-functions --bin fn-bench -- [--seconds 5] [--concurrency 1,64]
//! ```
//!
//! Serves `GET /fn/noop` three ways in this process (the runtime, a `wasmtime
//! run`-style process per request, a native CGI process per request), loads each
//! with the same load generator and prints req/s, p50, p99 and the runtime's ratios
//! to the baselines. `agora_functions::bench` has the details; `agora bench fn`
//! measures the same plus a real cluster's agent and master, and uses this binary's
//! `run-once` subcommand for its wasm-process baseline.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agora_functions::bench::{self, Baseline};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Load-tests the function runtime against process-per-request CGI baselines")]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Measured seconds per server and concurrency (after a 1 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent keep-alive connections, comma-separated.
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// The CGI guest answering `ok` (default: guest-examples' noop, built by
    /// scripts/build-guests.sh).
    #[arg(long)]
    module: Option<PathBuf>,
    /// Servers to measure, comma-separated (`host` is another name for `runtime`).
    #[arg(
        long,
        default_value = "runtime,wasm-process,native-process",
        value_delimiter = ',',
        value_parser = ["runtime", "host", "wasm-process", "native-process"]
    )]
    servers: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a module precompiled by the wasm-process baseline once with this process's
    /// environment and stdio, like `wasmtime run`, and exits with the guest's code.
    RunOnce {
        /// The precompiled module.
        cwasm: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = match &args.command {
        Some(Cmd::RunOnce { cwasm }) => bench::run_once(cwasm),
        None => run(&args).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("fn-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let duration = bench::check_settings(args.seconds, &args.concurrency)?;
    let module = match &args.module {
        Some(m) => m.clone(),
        None => bench::default_module()?,
    };
    let exe =
        std::env::current_exe().context("cannot find this executable (the run-once helper)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(measure(args, &module, &exe, duration))
}

async fn measure(
    args: &Args,
    module: &Path,
    exe: &Path,
    duration: std::time::Duration,
) -> Result<()> {
    let mut names: Vec<&str> = Vec::new();
    for name in &args.servers {
        let name = if name == "host" {
            "runtime"
        } else {
            name.as_str()
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    // Started up front, dropped (stopped) at the end.
    let mut served = Vec::new();
    let mut servers = Vec::new();
    for name in names {
        let server = match Baseline::from_name(name) {
            Some(b) => bench::start_baseline(b, module, Some(exe)).await,
            None => bench::start_runtime(module).await,
        }
        .with_context(|| format!("cannot start the {name} server"))?;
        servers.push((name.to_string(), server.addr));
        served.push(server);
    }
    println!(
        "fn-bench: GET {} (a no-op CGI guest), keep-alive HTTP/1.1 on loopback, {} s per row \
         after {} s of warm-up; {} cores; module {}",
        bench::NOOP_PATH,
        duration.as_secs_f64(),
        bench::WARMUP.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        module.display()
    );
    println!("servers and load generator: this process");
    for b in Baseline::ALL {
        if servers.iter().any(|(n, _)| n == b.name()) {
            println!("{}: {}", b.name(), b.describe());
        }
    }
    println!();
    let rows = bench::measure(&servers, &args.concurrency, duration).await?;
    bench::print_ratios(&rows);
    drop(served);
    Ok(())
}
