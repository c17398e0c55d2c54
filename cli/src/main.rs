//! `agora`: the one binary of the Agora cluster manager.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod bench;
mod cluster;
mod devgroup;
mod fn_bench;
mod fn_tenants;
mod fns;
mod ops;
mod roles;
mod run;

#[derive(Parser)]
#[command(
    name = "agora",
    version,
    about = "Agora: a cluster manager that runs WebAssembly tasks",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How a client command finds the master.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// Master address (host:port); overrides the one in the client config.
    #[arg(long, env = "AGORA_MASTER", global = true)]
    pub master: Option<String>,
    /// Client config (JSON written by `agora dev` or `agora certs init`).
    /// Default: ~/.agora/dev/client.json.
    #[arg(long, env = "AGORA_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a single-machine cluster (master + agent) in the foreground, no set-up needed.
    Dev(cluster::DevArgs),
    /// Run a master.
    Master(cluster::MasterArgs),
    /// Run an agent that offers this machine's resources to a master.
    Agent(cluster::AgentArgs),
    /// Certificates for a cluster.
    Certs {
        #[command(subcommand)]
        cmd: cluster::CertsCmd,
    },
    /// Run a WebAssembly module as a task and wait for it, like mesos-execute.
    Run(run::RunArgs),
    /// List tasks (running and waiting; --all adds finished ones).
    Ps(ops::PsArgs),
    /// Print a task's stdout (or --stderr).
    Logs(ops::LogsArgs),
    /// Kill a task.
    Kill(ops::KillArgs),
    /// List the masters of the group: who leads, terms, log positions and lag;
    /// `masters add` and `masters remove` change the group.
    Masters {
        #[command(subcommand)]
        cmd: Option<ops::MastersCmd>,
        #[command(flatten)]
        target: Target,
    },
    /// List agents and their resources.
    Agents {
        #[command(flatten)]
        target: Target,
    },
    /// Role weights: `agora role weight set ROLE W`, `agora role ls`.
    Role {
        #[command(subcommand)]
        cmd: roles::RoleCmd,
    },
    /// Role quotas: `agora quota set|get|rm`.
    Quota {
        #[command(subcommand)]
        cmd: roles::QuotaCmd,
    },
    /// Why a task waits (or what became of it), or why a role gets no offers.
    Explain(roles::ExplainArgs),
    /// Serverless functions: `agora fn deploy NAME FILE.wasm`, `fn ls`, `fn rm`, `fn logs`.
    Fn {
        #[command(subcommand)]
        cmd: fns::FnCmd,
    },
    /// Benchmarks that run against a real cluster.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
    /// Executor processes (started by the agent, not by hand).
    #[command(hide = true)]
    Executor {
        #[command(subcommand)]
        cmd: ExecutorCmd,
    },
}

#[derive(Subcommand)]
enum ExecutorCmd {
    Wasm {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        framework_id: String,
        #[arg(long)]
        executor_id: String,
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// A function host: serves the launched functions over HTTP on Unix sockets.
    Fn {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        framework_id: String,
        #[arg(long)]
        executor_id: String,
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    Native {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        framework_id: String,
        #[arg(long)]
        executor_id: String,
        /// cgroups or posix; detected when absent.
        #[arg(long)]
        isolation: Option<agora_native_executor::IsolationMode>,
        #[arg(long)]
        cgroup_root: String,
        #[arg(long, default_value_t = 1024)]
        pids_max: u64,
        #[arg(long)]
        no_cfs_quota: bool,
        /// The user tasks run as when their command names none.
        #[arg(long, default_value = agora_native_executor::runner::DEFAULT_TASK_USER)]
        task_user: String,
        /// Run tasks that ask for root as root.
        #[arg(long)]
        allow_root_tasks: bool,
        /// A directory tasks must not see (the agent's work directory).
        #[arg(long)]
        hide_dir: Option<PathBuf>,
    },
}

fn init_tracing(default: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("AGORA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // openraft warns on every failed heartbeat (ten a second while a master is
    // down); `agora masters` says which master is unreachable. AGORA_LOG=openraft=warn
    // brings them back.
    if !std::env::var("AGORA_LOG").is_ok_and(|v| v.contains("openraft")) {
        filter = filter.add_directive("openraft=error".parse().expect("a valid directive"));
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let servers = matches!(
        cli.cmd,
        Cmd::Dev(_) | Cmd::Master(_) | Cmd::Agent(_) | Cmd::Executor { .. }
    );
    init_tracing(if servers { "info" } else { "warn" });
    if let Cmd::Bench {
        cmd: bench::BenchCmd::RunOnce { cwasm },
    } = &cli.cmd
    {
        return bench::run_once(cwasm);
    }
    // Client commands print tables and logs that people pipe into `head` or `grep -m1`:
    // let a closed pipe end them quietly, as it does `cat`, instead of a panic in
    // `println!`. Not for the daemons and executors: a write to a peer that went away
    // must be an error there, never a signal that kills the process.
    if matches!(
        cli.cmd,
        Cmd::Ps(_)
            | Cmd::Logs(_)
            | Cmd::Kill(_)
            | Cmd::Agents { .. }
            | Cmd::Masters { .. }
            | Cmd::Role { .. }
            | Cmd::Quota { .. }
            | Cmd::Explain(_)
            | Cmd::Fn { .. }
            | Cmd::Run(_)
            | Cmd::Certs { .. }
    ) {
        // SAFETY: called before any thread is started; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agora: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result: anyhow::Result<ExitCode> = rt.block_on(async move {
        match cli.cmd {
            Cmd::Dev(a) => cluster::dev(a).await,
            Cmd::Master(a) => cluster::master(a).await,
            Cmd::Agent(a) => cluster::agent(a).await,
            Cmd::Certs { cmd } => cluster::certs(cmd),
            Cmd::Run(a) => run::run(a).await,
            Cmd::Ps(a) => ops::ps(a).await,
            Cmd::Logs(a) => ops::logs(a).await,
            Cmd::Kill(a) => ops::kill(a).await,
            Cmd::Agents { target } => ops::agents(target).await,
            Cmd::Masters { cmd, target } => ops::masters(cmd, target).await,
            Cmd::Role { cmd } => roles::role(cmd).await,
            Cmd::Quota { cmd } => roles::quota(cmd).await,
            Cmd::Explain(a) => roles::explain(a).await,
            Cmd::Fn { cmd } => fns::fns(cmd).await,
            Cmd::Bench { cmd } => bench::bench(cmd).await,
            Cmd::Executor {
                cmd:
                    ExecutorCmd::Wasm {
                        socket,
                        framework_id,
                        executor_id,
                        cache_dir,
                    },
            } => {
                agora_wasm_executor::executor::run_executor(
                    &socket,
                    &framework_id,
                    &executor_id,
                    cache_dir,
                )
                .await?;
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Executor {
                cmd:
                    ExecutorCmd::Fn {
                        socket,
                        framework_id,
                        executor_id,
                        cache_dir,
                    },
            } => {
                agora_fn_host::run_executor(&socket, &framework_id, &executor_id, cache_dir)
                    .await?;
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Executor {
                cmd:
                    ExecutorCmd::Native {
                        socket,
                        framework_id,
                        executor_id,
                        isolation,
                        cgroup_root,
                        pids_max,
                        no_cfs_quota,
                        task_user,
                        allow_root_tasks,
                        hide_dir,
                    },
            } => {
                let cfg = agora_native_executor::NativeConfig {
                    isolation,
                    cgroup_root,
                    pids_max,
                    cfs_quota: !no_cfs_quota,
                    task_user,
                    allow_root: allow_root_tasks,
                    hide_dir,
                };
                agora_native_executor::run_executor(&socket, &framework_id, &executor_id, cfg)
                    .await?;
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agora: {e:#}");
            ExitCode::from(2)
        }
    }
}
