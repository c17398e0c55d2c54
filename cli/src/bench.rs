//! `agora bench launch`: N trivial wasm tasks through the whole cluster (upload,
//! offers, launch, executor, status updates and acknowledgements), timed from submit
//! to terminal, beside a baseline measured in the same run: the same module run by
//! the executor's runner in this process, with no cluster around it.

use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub mod failover;
pub mod fn_load;

use agora_proto::v1::{CommandInfo, ExecutorLaunch, TaskState, WasmModule};
use agora_proto::Resources;
use agora_sdk::{Client, ClientConfig, Event, FrameworkInfo, Scheduler, TaskInfo};
use agora_wasm_executor::{KillSwitch, Runner};
use anyhow::Context;
use clap::Subcommand;

use crate::Target;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Launch N trivial wasm tasks, then N native `/bin/true` tasks, through a cluster;
    /// print tasks/s, latencies and ratios against baselines measured in the same run.
    Launch {
        #[command(flatten)]
        target: Target,
        /// Number of tasks.
        #[arg(short, default_value_t = 500)]
        n: usize,
        /// Module to launch (default: a built-in module whose `_start` returns at once).
        #[arg(long)]
        module: Option<std::path::PathBuf>,
        /// Run against the cluster in the client config instead of a private one.
        #[arg(long)]
        use_config: bool,
        /// Leave out the native (/bin/true) half of the benchmark.
        #[arg(long)]
        skip_native: bool,
    },
    /// A no-op function through a private cluster (agent HTTP, master HTTP), the
    /// function runtime alone, and a process per request (wasm and native CGI) as
    /// baselines, in one run: req/s, p50 and p99 at each concurrency, and ratios.
    Fn(crate::fn_bench::FnBenchArgs),
    /// Kill -9 of the leading master under load, N times, with the masters as
    /// separate processes: time to the new leader's first offer and first task
    /// launched, min/median/max, beside launch and registry-write latency with no
    /// kill measured in the same run.
    Failover(failover::FailoverArgs),
    /// Runs a module precompiled by `agora bench fn`'s wasm-process baseline once
    /// with this process's environment and stdio, like `wasmtime run`, and exits with
    /// the guest's code (one process per request of that baseline).
    #[command(hide = true)]
    RunOnce {
        /// The precompiled module.
        cwasm: std::path::PathBuf,
    },
}

/// `agora bench run-once CWASM`, before any async runtime starts (it is the cost of
/// a bare process per request that the baseline measures).
pub fn run_once(cwasm: &std::path::Path) -> ExitCode {
    match fn_load::run_once(cwasm) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("agora bench run-once: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `(module (memory 1) (func (export "_start")))`, encoded by hand.
pub const NOOP_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: () -> ()
    0x03, 0x02, 0x01, 0x00, // func 0 has type 0
    0x05, 0x03, 0x01, 0x00, 0x01, // one memory, 1 page
    0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, // export "_start"
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // body: no locals, end
];

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).or(sorted.last()).copied().unwrap_or(0)
}

pub async fn bench(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    let (target, n, module, use_config, skip_native) = match cmd {
        BenchCmd::Fn(a) => return crate::fn_bench::bench_fn(a).await,
        BenchCmd::Failover(a) => return failover::bench_failover(a).await,
        BenchCmd::RunOnce { cwasm } => return Ok(run_once(&cwasm)),
        BenchCmd::Launch {
            target,
            n,
            module,
            use_config,
            skip_native,
        } => (target, n, module, use_config, skip_native),
    };
    let bytes = match &module {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => NOOP_WASM.to_vec(),
    };
    // On a thread of its own, as the executor runs each task (`Runner::run` blocks).
    let baseline = {
        let bytes = bytes.clone();
        let n = n.min(2000);
        tokio::task::spawn_blocking(move || baseline_tasks_per_s(&bytes, n))
            .await
            .context("the baseline's thread failed")??
    };

    let private = if use_config {
        None
    } else {
        Some(crate::cluster::PrivateCluster::start().await?)
    };
    let cfg = match &private {
        Some(p) => p.client_config.clone(),
        None => ClientConfig::discover(target.master.as_deref(), target.config.as_deref())?,
    };
    let client = Client::connect(&cfg).await?;
    let (sha, size) = client.upload_bytes(&bytes).await?;
    let wasm = Workload::Wasm(WasmModule {
        sha256: sha,
        size,
        fuel: 0,
        timeout_ms: 10_000,
    });
    let mut sched = client
        .subscribe(FrameworkInfo {
            name: "agora-bench-launch".into(),
            roles: vec!["*".into()],
            ..Default::default()
        })
        .await?;
    // Warm-up outside the timing: the executors start and compile the module once.
    let true_cmd = Workload::Native(CommandInfo {
        shell: false,
        value: "/bin/true".into(),
        ..Default::default()
    });
    let mut warm = launch_many(&mut sched, &wasm, 5, "warm").await;
    if warm.is_ok() && !skip_native {
        warm = launch_many(&mut sched, &true_cmd, 5, "warm-native").await;
    }
    let result = match warm {
        Ok(_) => launch_many(&mut sched, &wasm, n, "wasm").await,
        Err(e) => Err(e),
    };
    let native = if skip_native || result.is_err() {
        None
    } else {
        Some(launch_many(&mut sched, &true_cmd, n, "native").await)
    };
    let _ = sched.teardown().await;
    if let Some(p) = private {
        p.stop().await;
    }
    let r = result?;
    let wasm_rate = n as f64 / r.wall.as_secs_f64();
    println!("launch benchmark: {n} trivial tasks each, submit to terminal, one framework");
    println!(
        "  wasm tasks (cluster)   {wasm_rate:>10.1} tasks/s  ({:.2} s wall)",
        r.wall.as_secs_f64()
    );
    println!("  baseline (runner)      {baseline:>10.1} tasks/s  (same module, executor library in-process, no cluster)");
    println!("  ratio cluster/runner   {:.3}", wasm_rate / baseline);
    println!(
        "  executor instantiate   p50 {} us  p99 {} us",
        pct(&r.inst_us, 0.5),
        pct(&r.inst_us, 0.99)
    );
    println!(
        "  wasm task latency      p50 {:.2} ms  p99 {:.2} ms  (accept -> terminal)",
        pct(&r.lat_us, 0.5) as f64 / 1000.0,
        pct(&r.lat_us, 0.99) as f64 / 1000.0
    );
    let mut failed = r.failed;
    if let Some(native) = native {
        let nr = native?;
        let native_rate = n as f64 / nr.wall.as_secs_f64();
        println!("  native /bin/true       {native_rate:>10.1} tasks/s  ({:.2} s wall, cgroup per task where available)", nr.wall.as_secs_f64());
        println!(
            "  native task latency    p50 {:.2} ms  p99 {:.2} ms",
            pct(&nr.lat_us, 0.5) as f64 / 1000.0,
            pct(&nr.lat_us, 0.99) as f64 / 1000.0
        );
        println!("  ratio wasm/native      {:.2}", wasm_rate / native_rate);
        failed += nr.failed;
    }
    if failed > 0 {
        println!("  {failed} tasks did not finish successfully");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

enum Workload {
    Wasm(WasmModule),
    Native(CommandInfo),
}

/// Runs the module `n` times with the executor's runner directly, in this process.
fn baseline_tasks_per_s(bytes: &[u8], n: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let module = dir.path().join("m.wasm");
    std::fs::write(&module, bytes)?;
    let root = dir.path().join("fs");
    std::fs::create_dir_all(&root)?;
    let runner = Runner::new(None)?;
    let launch = |i: usize| ExecutorLaunch {
        task_id: format!("b{i}"),
        module_path: module.to_string_lossy().into(),
        module_sha256: agora_proto::sha256_hex(bytes),
        root_dir: root.to_string_lossy().into(),
        stdout_path: dir.path().join("out").to_string_lossy().into(),
        stderr_path: dir.path().join("err").to_string_lossy().into(),
        memory_bytes: 16 << 20,
        ..Default::default()
    };
    // Compile once outside the timing, as the cluster's executor caches modules too.
    runner.run(&launch(0), &KillSwitch::new(), |_| {});
    let t0 = Instant::now();
    for i in 0..n {
        let st = runner.run(&launch(i), &KillSwitch::new(), |_| {});
        if st.state() != TaskState::TaskFinished {
            anyhow::bail!("baseline run failed: {}", st.message);
        }
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

struct LaunchResult {
    wall: Duration,
    inst_us: Vec<u64>,
    lat_us: Vec<u64>,
    failed: usize,
}

async fn launch_many(
    sched: &mut Scheduler,
    work: &Workload,
    n: usize,
    tag: &str,
) -> anyhow::Result<LaunchResult> {
    sched.revive().await?;
    let per_task = Resources::cpus_mem(10, 4 << 20);
    let mut todo: VecDeque<usize> = (0..n).collect();
    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut inst_us = Vec::with_capacity(n);
    let mut lat_us = Vec::with_capacity(n);
    let mut done = 0;
    let mut failed = 0;
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while done < n {
        let ev = tokio::time::timeout_at(deadline, sched.next_event())
            .await
            .map_err(|_| {
                anyhow::anyhow!("benchmark did not finish within 10 minutes ({done}/{n} done)")
            })?
            .ok_or_else(|| anyhow::anyhow!("lost the master connection"))?;
        match ev {
            Event::Offers(offers) => {
                for o in offers {
                    let mut free = Resources::from_proto(&o.resources)
                        .map_err(anyhow::Error::msg)?
                        .unreserved();
                    let mut batch = Vec::new();
                    while let Some(i) = todo.front().copied() {
                        let Some(left) = free.checked_sub(&per_task) else {
                            break;
                        };
                        free = left;
                        todo.pop_front();
                        let id = format!("{tag}-{i}");
                        started.insert(id.clone(), Instant::now());
                        batch.push(TaskInfo {
                            task_id: id,
                            name: "noop".into(),
                            resources: per_task.to_proto(),
                            module: match work {
                                Workload::Wasm(m) => Some(m.clone()),
                                Workload::Native(_) => None,
                            },
                            command: match work {
                                Workload::Native(c) => Some(c.clone()),
                                Workload::Wasm(_) => None,
                            },
                            ..Default::default()
                        });
                    }
                    if batch.is_empty() {
                        // Nothing left to launch: keep the agent away until the next batch's REVIVE.
                        let refuse = if todo.is_empty() { 3600.0 } else { 0.0 };
                        sched.decline(vec![o.offer_id], Some(refuse)).await?;
                    } else {
                        sched.accept(vec![o.offer_id], batch, Some(0.0)).await?;
                    }
                }
            }
            Event::Update(s) => {
                sched.acknowledge(&s).await?;
                let st = s.state();
                if st == TaskState::TaskRunning {
                    inst_us.push(s.instantiate_us);
                }
                if st.is_terminal() {
                    done += 1;
                    if st != TaskState::TaskFinished {
                        failed += 1;
                        if failed <= 3 {
                            eprintln!("task {} {}: {}", s.task_id, st.short_name(), s.message);
                        }
                    }
                    if let Some(t) = started.remove(&s.task_id) {
                        lat_us.push(t.elapsed().as_micros() as u64);
                    }
                }
            }
            Event::Error(e) => anyhow::bail!("master error: {e}"),
            _ => {}
        }
    }
    let wall = t0.elapsed();
    inst_us.sort_unstable();
    lat_us.sort_unstable();
    Ok(LaunchResult {
        wall,
        inst_us,
        lat_us,
        failed,
    })
}
