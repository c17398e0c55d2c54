//! `agora`: the one binary of the Agora cluster manager.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod acl;
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
    /// Log level or filter (error, warn, info, debug, trace, or a filter such as
    /// `info,agora_agent=debug`). Overrides RUST_LOG. Default: info for `dev`, `master`
    /// and `agent`, warn for client commands.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
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
    /// The access policy: `agora acl get`, `agora acl set FILE`, `agora acl clear`.
    Acl {
        #[command(subcommand)]
        cmd: acl::AclCmd,
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
        /// Run the tasks in one PID namespace of this executor's, each with its /proc.
        #[arg(long)]
        pid_namespace: bool,
    },
}

/// Where the log filter comes from: `--log-level`, else `RUST_LOG`, else `AGORA_LOG`
/// (the older name), else the default of the kind of command.
fn log_filter(
    flag: Option<&str>,
    default: &str,
) -> Result<(String, tracing_subscriber::EnvFilter), String> {
    let (source, text) = match flag {
        Some(f) => ("--log-level", f.to_string()),
        None => match ["RUST_LOG", "AGORA_LOG"].into_iter().find_map(|v| {
            std::env::var(v)
                .ok()
                .filter(|s| !s.trim().is_empty())
                .map(|s| (v, s))
        }) {
            Some((v, s)) => (v, s),
            None => ("default", default.to_string()),
        },
    };
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&text)
        .map_err(|e| format!("{source} {text:?} is not a log filter ({e}); use a level (error, warn, info, debug, trace) or a filter such as info,agora_agent=debug"))?;
    Ok((text, filter))
}

fn init_tracing(flag: Option<&str>, default: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    let (text, mut filter) = log_filter(flag, default)?;
    // openraft warns on every failed heartbeat (ten a second while a master is
    // down); `agora masters` says which master is unreachable. A filter naming
    // openraft brings them back.
    if !text.contains("openraft") {
        #[allow(clippy::expect_used, reason = "a literal directive")]
        let quiet = "openraft=error".parse().expect("a valid directive");
        filter = filter.add_directive(quiet);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: not into log files or pipes.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .init();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let servers = matches!(
        cli.cmd,
        Cmd::Dev(_)
            | Cmd::Master(_)
            | Cmd::Agent(cluster::AgentArgs { cmd: None, .. })
            | Cmd::Executor { .. }
    );
    if let Err(e) = init_tracing(
        cli.log_level.as_deref(),
        if servers { "info" } else { "warn" },
    ) {
        eprintln!("agora: {e}");
        return ExitCode::from(2);
    }
    if let Some(level) = &cli.log_level {
        // The processes this one starts (executors, the masters of `agora dev
        // --masters`) log at the same level. Single-threaded still: no thread reads
        // the environment concurrently.
        std::env::set_var("RUST_LOG", level);
    }
    if let Cmd::Bench {
        cmd: bench::BenchCmd::RunOnce { cwasm },
    } = &cli.cmd
    {
        return bench::run_once(cwasm);
    }
    if let Cmd::Executor {
        cmd: ExecutorCmd::Native {
            pid_namespace: true,
            ..
        },
    } = &cli.cmd
    {
        // Before any thread or child: the executor's tasks go in one PID namespace
        // of its own, whose init must be its first child.
        agora_native_executor::isolation::enter_executor_pid_namespace();
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
            | Cmd::Acl { .. }
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
            Cmd::Agent(cluster::AgentArgs {
                cmd:
                    Some(cluster::AgentCmd::Gone {
                        agent_id,
                        yes,
                        target,
                    }),
                ..
            }) => ops::agent_gone(&agent_id, yes, target).await,
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
            Cmd::Acl { cmd } => acl::acl(cmd).await,
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
                        pid_namespace,
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
                    pid_namespace,
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
            exit_code_of(&format!("{e:#}"))
        }
    }
}

/// Exit code of a command that failed with `message`: 77 (EX_NOPERM) when the
/// access policy refused it (the master's refusals start "permission denied:"),
/// else 2.
fn exit_code_of(message: &str) -> ExitCode {
    if message.contains(DENIED_PREFIX) {
        ExitCode::from(EXIT_DENIED)
    } else {
        ExitCode::from(2)
    }
}

/// How the master's access-policy refusals begin.
pub(crate) const DENIED_PREFIX: &str = "permission denied: ";
/// Exit code of a command the access policy refused (sysexits' EX_NOPERM).
pub(crate) const EXIT_DENIED: u8 = 77;

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn the_flag_wins_then_rust_log_and_a_bad_filter_is_named() {
        let (text, _) = log_filter(Some("debug"), "warn").expect("a level");
        assert_eq!(text, "debug");
        let (text, _) = log_filter(Some("info,agora_agent=trace"), "warn").expect("a filter");
        assert_eq!(text, "info,agora_agent=trace");
        let e = log_filter(Some("agora=loud"), "warn").expect_err("not a level");
        assert!(e.contains("--log-level") && e.contains("agora=loud"), "{e}");
    }
}
