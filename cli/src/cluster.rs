//! Running the cluster's parts: `agora dev`, `agora master`, `agora agent`,
//! `agora certs init`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agora_agent::http::HttpSettings;
use agora_agent::server::{AgentConfig, AgentHandle, IdentityPolicy, IsolationSettings};
use agora_agent_core::AgentCoreConfig;
use agora_fn_gateway::FunctionsConfig;
use agora_master::server::{FunctionsDoor, MasterConfig};
use agora_master_core::CoreConfig;
use agora_net::tls::{self, CertDir, Identity, Role};
use agora_proto::units::parse_duration_ms;
use agora_proto::v1::Attribute;
use agora_proto::Resources;
use agora_sdk::ClientConfig;
use anyhow::Context;
use clap::{Args, Subcommand};

/// Default port of `agora master`.
pub const DEFAULT_MASTER_PORT: u16 = 7400;

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[derive(Args)]
pub struct DevArgs {
    /// Where the cluster keeps its state, certificates and client config.
    #[arg(long, default_value_os_t = home().join(".agora/dev"))]
    data_dir: PathBuf,
    /// Address of the master's QUIC endpoint (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The agent's resources, e.g. "cpus:4;mem:8192;disk:20480" (mem and disk in MiB).
    /// Default: detected (disk: the size of the work dir's filesystem less 5 GiB, or
    /// half of it when that is smaller; a disk not given is added to given resources).
    #[arg(long)]
    resources: Option<String>,
    /// The agent's attributes, e.g. "zone:a;rack:1".
    #[arg(long, default_value = "")]
    attributes: String,
    /// How long an offer may stay unanswered before the master rescinds it and gives
    /// its resources to others, e.g. 30s or 2m; a bare number is seconds (0: never).
    #[arg(long, default_value = DEFAULT_OFFER_TIMEOUT)]
    offer_timeout: String,
    #[command(flatten)]
    isolation: IsolationArgs,
    /// Address of the master's HTTP server for functions (/fn/NAME/...).
    #[arg(long = "http", default_value = "127.0.0.1:0")]
    master_http: SocketAddr,
    #[command(flatten)]
    functions: FunctionsArgs,
    /// Run this many masters as a replicated group (an odd number; each its own
    /// process, so any one can be killed) instead of one master inside this process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=9))]
    masters: u64,
}

/// Settings of the master's functions framework.
#[derive(Args, Clone, Debug)]
pub struct FunctionsArgs {
    /// A function with no request for this long has its hosts stopped, down to its
    /// --min-instances (e.g. 60s, 2s).
    #[arg(long, default_value = "60s")]
    fn_idle_timeout: String,
}

impl FunctionsArgs {
    fn dev(&self, http: SocketAddr) -> anyhow::Result<DevFunctions> {
        let idle = parse_duration_ms(&self.fn_idle_timeout).context("--fn-idle-timeout")?;
        if idle == 0 {
            anyhow::bail!("--fn-idle-timeout must be above 0");
        }
        Ok(DevFunctions {
            http,
            idle_timeout: Duration::from_millis(idle),
            http_required: true,
        })
    }
}

/// Where the master serves functions over HTTP, and how soon idle hosts stop.
#[derive(Clone, Debug)]
pub struct DevFunctions {
    pub http: SocketAddr,
    pub idle_timeout: Duration,
    /// Whether the master must stop when it cannot listen on `http`.
    pub http_required: bool,
}

impl DevFunctions {
    /// The functions framework subscribes with the master's own certificate: it is
    /// part of the master, which the access policy does not judge.
    fn config(&self, cd: &CertDir) -> FunctionsConfig {
        FunctionsConfig {
            http: Some(self.http),
            http_required: self.http_required,
            ca: cd.ca(),
            client_cert: cd.cert(Role::Master),
            client_key: cd.key(Role::Master),
            idle_timeout: self.idle_timeout,
        }
    }
}

/// Default port of the master's HTTP server.
pub const DEFAULT_MASTER_HTTP_PORT: u16 = 7070;

/// Offers unanswered this long are rescinded. Mesos has no timeout by default, so a
/// stuck framework can sit on resources forever; 30 s is long enough for any
/// framework that is alive to answer.
pub const DEFAULT_OFFER_TIMEOUT: &str = "30s";

fn offer_timeout_ms(s: &str) -> anyhow::Result<u64> {
    let ms = parse_duration_ms(s).context("--offer-timeout")?;
    if ms > 86_400_000 {
        anyhow::bail!("--offer-timeout {s} is more than a day (24h); 0 means never");
    }
    Ok(ms)
}

#[derive(Args)]
pub struct MasterArgs {
    /// Address to listen on (UDP, QUIC).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_MASTER_PORT)))]
    listen: SocketAddr,
    /// This master's id in its replicated group (see --peers).
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// Every master of a replicated group, this one included, as ID=HOST:PORT
    /// separated by commas, e.g. 1=a:7400,2=b:7400,3=c:7400 (the same list on each
    /// master). The masters elect a leader among themselves (Raft); only it serves.
    /// Without it, the master is a group of one.
    #[arg(long)]
    peers: Option<String>,
    #[arg(long, default_value_os_t = home().join(".agora/master"))]
    data_dir: PathBuf,
    /// Directory made by `agora certs init` (uses ca.pem, master.pem, master.key).
    #[arg(long)]
    certs: PathBuf,
    /// Seconds an agent may stay silent (agents ping every second) before it is
    /// removed: its tasks become UNREACHABLE for partition-aware frameworks (and
    /// RUNNING again if it returns), LOST for the others. Mesos waits 75 s; 15 s
    /// notices a dead machine quickly yet rides out a few lost packets or a GC pause.
    #[arg(long, default_value_t = 15)]
    agent_timeout: u64,
    /// How long an offer may stay unanswered before it is rescinded, e.g. 30s or 2m;
    /// a bare number is seconds (0: never).
    #[arg(long, default_value = DEFAULT_OFFER_TIMEOUT)]
    offer_timeout: String,
    /// After a restart, seconds to wait for the agents in the registry to
    /// re-register before making offers without them (so nothing is offered twice).
    #[arg(long, default_value_t = 20)]
    agent_reregister_timeout: u64,
    /// Offers smaller than all of these are not made, as Mesos's
    /// --min_allocatable_resources: alternatives separated by `|`, e.g.
    /// "cpus:0.1;mem:64MiB|mem:1GiB". Default "cpus:0.01|mem:32MiB".
    #[arg(long)]
    min_allocatable_resources: Option<String>,
    /// Finished tasks remembered for `ps --all`, logs and reconciliation.
    #[arg(long, default_value_t = 1000)]
    max_completed_tasks: usize,
    /// Of those, the most one framework may hold (its oldest go first); 0: no
    /// bound of its own.
    #[arg(long, default_value_t = 500)]
    max_completed_tasks_per_framework: usize,
    /// Finished tasks older than this are forgotten, e.g. 168h (the default, a
    /// week) or 30m; 0: only the counts bound them.
    #[arg(long, default_value = "168h")]
    completed_task_max_age: String,
    /// Removed frameworks whose ids are remembered (and refused if they subscribe
    /// again).
    #[arg(long, default_value_t = 1000)]
    max_completed_frameworks: usize,
    /// QUIC connections held at once (agents, frameworks, operators, masters);
    /// more are refused before their handshake, and the refusal logged.
    #[arg(long, default_value_t = agora_master::server::DEFAULT_CONNECTION_CAPS.total)]
    max_connections: usize,
    /// QUIC connections held at once from one IP address.
    #[arg(long, default_value_t = agora_master::server::DEFAULT_CONNECTION_CAPS.per_ip)]
    max_connections_per_ip: usize,
    /// Address of the HTTP server for functions (/fn/NAME/..., /fn, /fn-metrics).
    /// Default 127.0.0.1:7070 (this machine only: give 0.0.0.0:7070 or an address
    /// of this machine to serve others); when the default is taken the master runs
    /// without it.
    #[arg(long = "http")]
    master_http: Option<SocketAddr>,
    #[command(flatten)]
    functions: FunctionsArgs,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub cmd: Option<AgentCmd>,
    /// The masters' addresses, host:port, separated by commas (every master of a
    /// replicated group: the agent registers with whichever leads, and follows it).
    #[arg(long, env = "AGORA_MASTER", required = true)]
    master: Option<String>,
    /// Directory made by `agora certs init` (uses ca.pem, agent.pem, agent.key).
    #[arg(long, required = true)]
    certs: Option<PathBuf>,
    #[arg(long, default_value_os_t = home().join(".agora/agent"))]
    work_dir: PathBuf,
    /// Resources to offer, e.g. "cpus:4;mem:8192;disk:20480" (mem and disk in MiB).
    /// Default: all cores, memory less 1 GiB, and the size of the work dir's
    /// filesystem less 5 GiB (or half of it, when that is smaller); a disk not given is
    /// added to given resources.
    #[arg(long)]
    resources: Option<String>,
    /// Attributes, e.g. "zone:a;rack:1".
    #[arg(long, default_value = "")]
    attributes: String,
    /// Hostname to report. Default: this machine's.
    #[arg(long)]
    hostname: Option<String>,
    /// Seconds executors keep their tasks running while this agent is down (a
    /// restart, a crash), waiting for it to come back. After a restart the agent waits
    /// for them to re-attach (at most 10 s) before it registers with the master.
    #[arg(long, default_value_t = 60)]
    recovery_timeout: u64,
    /// On SIGTERM or Ctrl-C, stop with the tasks: kill every task on this agent
    /// (reported KILLED, reason AGENT_DRAINED) and its executors, then exit. Without
    /// it a stop leaves executors and tasks running, and the agent started again on
    /// the same --work-dir within --recovery-timeout takes them back (as Mesos and
    /// Nomad agents do through an upgrade).
    #[arg(long)]
    drain_on_stop: bool,
    /// Join the cluster as a new agent: forget the id this --work-dir's agent had
    /// (needed to start it with other --resources or --attributes). Refused while
    /// its checkpoint records tasks or executors (stop it with --drain-on-stop
    /// first).
    #[arg(long)]
    new_identity: bool,
    /// Address of the agent's HTTP server, which serves /fn/NAME/... from the
    /// function hosts on this agent (and /fn-metrics). Default: 127.0.0.1:7071
    /// (this machine only: a master on another machine needs 0.0.0.0:7071 or an
    /// address of this machine), or a free port when 7071 is taken (another agent
    /// on this machine), said at start.
    #[arg(long = "http")]
    agent_http: Option<SocketAddr>,
    /// host:port the master (and clients it sends here) should use for the agent's
    /// HTTP server. Default: the --http address, with this machine's hostname for
    /// 0.0.0.0 or [::].
    #[arg(long)]
    http_advertise: Option<String>,
    /// Serve the HTTP function door over TLS only (HTTPS), with the cert dir's
    /// agent-http.pem and agent-http.key (made by `agora certs init`; its
    /// --agent-name adds the names clients use). A plain-HTTP request gets 400
    /// saying so. The masters' gateways verify it against the cluster's CA.
    #[arg(long)]
    http_tls: bool,
    /// With --http-tls: the certificate to serve instead of CERTS/agent-http.pem
    /// (signed by the cluster's CA and carrying the name agora-agent-http, for the
    /// masters' gateways to accept it).
    #[arg(long, requires = "http_tls")]
    http_cert: Option<PathBuf>,
    /// With --http-cert: its private key.
    #[arg(long, requires = "http_cert")]
    http_key: Option<PathBuf>,
    /// With --http-tls: accept only clients presenting a certificate of the cluster's
    /// CA (the masters' gateways present theirs; others use client.pem).
    #[arg(long, requires = "http_tls")]
    http_client_certs: bool,
    #[command(flatten)]
    isolation: IsolationArgs,
}

/// Default port of the agent's HTTP server for functions.
pub const DEFAULT_AGENT_HTTP_PORT: u16 = 7071;

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Make a cluster CA and certificates for masters, agents and clients in DIR, plus
    /// DIR/client.json for the `agora` client commands.
    Init {
        dir: PathBuf,
        /// Extra DNS names or IPs the master is reached by (repeatable).
        #[arg(long = "master-name")]
        master_names: Vec<String>,
        /// Extra DNS names or IPs clients reach agents' HTTPS function doors by
        /// (`agora agent --http-tls`), put in agent-http.pem (repeatable). The
        /// masters verify agents' doors as agora-agent-http, whatever the address.
        #[arg(long = "agent-name")]
        agent_names: Vec<String>,
        /// Master address written into DIR/client.json; repeat it for every master
        /// of a replicated group (clients dial them all and follow the leader).
        #[arg(long = "master")]
        masters: Vec<String>,
    },
    /// Sign a client certificate for PRINCIPAL with the cluster CA in DIR, and write
    /// it with the CA certificate and a client.json into OUT (default DIR/PRINCIPAL):
    /// `AGORA_CONFIG=OUT/client.json agora ps` then acts as that principal.
    Issue {
        /// The directory `agora certs init` made (it holds ca.key).
        dir: PathBuf,
        /// Who the certificate names (letters, digits, '.', '_', '-', '@').
        #[arg(long)]
        principal: String,
        /// Where to write the certificate, key, ca.pem and client.json.
        #[arg(long)]
        out: Option<PathBuf>,
        /// How long the certificate is valid, e.g. 30d or 12h (at most 10 years).
        #[arg(long, default_value = "365d")]
        expires: String,
    },
}

pub fn certs(cmd: CertsCmd) -> anyhow::Result<ExitCode> {
    let (dir, master_names, agent_names, mut masters) = match cmd {
        CertsCmd::Init {
            dir,
            master_names,
            agent_names,
            masters,
        } => (dir, master_names, agent_names, masters),
        CertsCmd::Issue {
            dir,
            principal,
            out,
            expires,
        } => return issue_principal(&dir, &principal, out, &expires),
    };
    if masters.is_empty() {
        masters.push(format!("127.0.0.1:{DEFAULT_MASTER_PORT}"));
    }
    for m in &masters {
        tls::resolve(m).map_err(|e| anyhow::anyhow!("--master {m}: {e}"))?;
    }
    let master = masters.join(", ");
    let cd = tls::init_cert_dir_with(&dir, &master_names, &agent_names)?;
    // client.json sits in DIR and names its files relative to itself.
    #[allow(
        clippy::indexing_slicing,
        reason = "a default is pushed when none is given"
    )]
    let mut client = client_config(&CertDir::new(Path::new("")), &masters[0]);
    if masters.len() > 1 {
        client.masters = masters.clone();
    }
    client.save(&dir.join("client.json"))?;
    println!("certificates in {}:", dir.display());
    println!("  CA            {}", cd.ca().display());
    for r in [Role::Master, Role::Agent, Role::Client] {
        println!(
            "  {:<13} {} + {}",
            format!("{r:?}").to_lowercase(),
            cd.cert(r).display(),
            cd.key(r).display()
        );
    }
    println!(
        "  {:<13} {} + {} (agora agent --http-tls)",
        "agent HTTPS",
        cd.agent_http_cert().display(),
        cd.agent_http_key().display()
    );
    println!(
        "client config  {} (master {master})",
        dir.join("client.json").display()
    );
    if masters.len() > 1 {
        let peers = masters
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{}={m}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "next: on each master machine, agora master --certs {d} --id N --peers {peers}; agora agent --master {} --certs {d}",
            masters.join(","),
            d = dir.display()
        );
    } else {
        // The address given, so its port is the one the master must listen on.
        #[allow(
            clippy::indexing_slicing,
            reason = "a default is pushed when none is given"
        )]
        let m = &masters[0];
        let port = m.rsplit_once(':').map(|(_, p)| p).unwrap_or("7400");
        println!(
            "next: agora master --certs {d} --listen 0.0.0.0:{port}; agora agent --master {m} --certs {d}",
            d = dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `agora certs issue`.
fn issue_principal(
    dir: &Path,
    principal: &str,
    out: Option<PathBuf>,
    expires: &str,
) -> anyhow::Result<ExitCode> {
    tls::check_principal(principal).map_err(|e| anyhow::anyhow!("--principal: {e}"))?;
    let validity = agora_proto::units::parse_duration(expires)
        .map_err(|e| anyhow::anyhow!("--expires {expires:?}: {e}"))?;
    if validity.is_zero() || validity > tls::MAX_CLIENT_VALIDITY {
        anyhow::bail!(
            "--expires must be above 0 and at most {}d",
            tls::MAX_CLIENT_VALIDITY.as_secs() / 86_400
        );
    }
    let out = out.unwrap_or_else(|| dir.join(principal));
    // The masters the cluster's own client.json names: beside the certificates
    // (`agora certs init`), or above them (`agora dev`'s data directory).
    let base = [dir.join("client.json"), dir.join("../client.json")]
        .iter()
        .find_map(|p| ClientConfig::load(p).ok());
    tls::issue_client_cert(dir, principal, &out, validity)?;
    let master = base
        .as_ref()
        .map(|c| c.master.clone())
        .unwrap_or_else(|| format!("127.0.0.1:{DEFAULT_MASTER_PORT}"));
    let mut client = client_config(&CertDir::new(Path::new("")), &master);
    if let Some(b) = &base {
        client.masters = b.masters.clone();
        client.http = b.http.clone();
    }
    client.save(&out.join("client.json"))?;
    println!(
        "client certificate for principal {principal} in {}, valid for {}",
        out.display(),
        agora_proto::units::format_duration(validity)
    );
    println!(
        "use it with: AGORA_CONFIG={} agora ps",
        out.join("client.json").display()
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn client_config(cd: &CertDir, master: &str) -> ClientConfig {
    ClientConfig {
        master: master.to_string(),
        masters: Vec::new(),
        local_only: false,
        ca: cd.ca(),
        cert: cd.cert(Role::Client),
        key: cd.key(Role::Client),
        http: None,
        source: None,
    }
}

/// This machine's resources: every core, and memory less 1 GiB for the system.
pub fn detect_resources() -> Resources {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as i64;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<i64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(2 << 30);
    Resources::cpus_mem(cpus * 1000, (mem - (1 << 30)).max(256 << 20))
}

/// What an agent advertises as disk by default, from the size of the filesystem
/// holding its work dir: all but a reserve for the system of 5 GiB, or half when that
/// is less (as Mesos does). The size, not the free space: what an agent offers must be
/// the same at every start (its identity is refused otherwise), and the free space
/// moves with every file written. Free space is watched instead by the sandbox gc.
pub fn advertised_disk(size: u64) -> i64 {
    let reserve = (5u64 << 30).min(size / 2);
    let left = size.saturating_sub(reserve) as i64;
    // Whole MiB, within what one bag may hold.
    (left & !((1 << 20) - 1)).min(agora_proto::resources::MAX_AMOUNT)
}

/// `res` with disk: as given in `--resources` (`disk:MiB`), or else the size of the
/// filesystem holding the work dir less a reserve.
fn with_disk(mut res: Resources, work_dir: &Path) -> Resources {
    if res.disk_bytes() > 0 {
        return res;
    }
    let Some(size) = agora_executor_link::disk::total_bytes(work_dir) else {
        tracing::warn!(
            "cannot read the size of {}'s filesystem; this agent offers no disk (give --resources \"...;disk:MiB\")",
            work_dir.display()
        );
        return res;
    };
    let disk = advertised_disk(size);
    if disk > 0 {
        res.add_scalar(agora_proto::resources::DISK, "", disk);
    }
    res
}

fn resources(spec: &Option<String>) -> anyhow::Result<Resources> {
    match spec {
        None => Ok(detect_resources()),
        Some(s) => {
            let r = Resources::parse(s).with_context(|| format!("--resources \"{s}\""))?;
            if r.milli_cpus() <= 0 || r.mem_bytes() <= 0 {
                anyhow::bail!("--resources \"{s}\" must include cpus and mem above zero, e.g. \"cpus:2;mem:4096\"");
            }
            for role in r.roles() {
                agora_allocator::validate_role(&role).map_err(|e| {
                    anyhow::anyhow!(
                        "--resources \"{s}\": `{role}` is not a role to reserve for: {e}"
                    )
                })?;
            }
            let machine = detect_resources();
            if r.milli_cpus() > machine.milli_cpus()
                || r.mem_bytes() > machine.mem_bytes() + (1 << 30)
            {
                tracing::warn!(
                    "--resources {s:?} offers more than this machine has ({} cpus, {} of memory): \
                     tasks placed on that promise will compete for the real ones",
                    machine.milli_cpus() / 1000,
                    agora_proto::resources::format_bytes(machine.mem_bytes() + (1 << 30))
                );
            }
            Ok(r)
        }
    }
}

pub fn parse_attributes(s: &str) -> anyhow::Result<Vec<Attribute>> {
    s.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once(':').ok_or_else(|| {
                anyhow::anyhow!("attribute `{p}` is not of the form name:value (e.g. --attributes \"zone:a;rack:1\")")
            })?;
            Ok(Attribute { name: n.trim().into(), value: v.trim().into() })
        })
        .collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn executor_command(kind: &str) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let exe =
        std::env::current_exe().context("cannot find the agora binary to start executors with")?;
    Ok(vec![exe.into_os_string(), "executor".into(), kind.into()])
}

/// How the agent isolates tasks and executors.
#[derive(Args, Clone, Debug)]
pub struct IsolationArgs {
    /// cgroups or posix. Default: cgroups where usable (root, cgroup v1 or v2 with
    /// cpu, memory and pids), else posix, said once at start-up.
    #[arg(long)]
    isolation: Option<agora_native_executor::IsolationMode>,
    /// pids limit of each native task (stops fork bombs).
    #[arg(long, default_value_t = 1024)]
    pids_limit: u64,
    /// Weigh CPU by shares only; do not cap it with a CFS quota.
    #[arg(long)]
    no_cfs_quota: bool,
    /// The user native tasks run as when neither the task nor its framework names
    /// one (frameworks name theirs with FrameworkInfo.user, `agora run --user`).
    #[arg(long, default_value = agora_native_executor::runner::DEFAULT_TASK_USER)]
    task_user: String,
    /// Let native tasks whose framework asks for `root` run as root. Without it they
    /// fail, saying so.
    #[arg(long)]
    allow_root_tasks: bool,
    /// The most files and directories one task's sandbox may hold (0: no limit).
    /// A wasm guest past it gets an error creating one; a native task is killed.
    #[arg(long, default_value_t = agora_agent::server::DEFAULT_MAX_FILES_PER_TASK)]
    max_files_per_task: u64,
    /// Run native tasks without a PID namespace. By default each native executor (one
    /// framework's tasks) has one, and each task a /proc of it: a task sees and can
    /// signal only its own framework's processes, and cannot reach another task's
    /// sandbox or environment through /proc/PID/cwd or environ. Needs agora-task-init
    /// beside agora (without it, the executor says so and tasks go without).
    #[arg(long)]
    no_task_pid_namespace: bool,
}

impl IsolationArgs {
    fn settings(&self) -> IsolationSettings {
        IsolationSettings {
            mode: self.isolation,
            pids_max: self.pids_limit,
            cfs_quota: !self.no_cfs_quota,
            task_user: self.task_user.clone(),
            allow_root_tasks: self.allow_root_tasks,
            max_files_per_task: self.max_files_per_task,
            pid_namespace: !self.no_task_pid_namespace,
        }
    }
}

/// Master flags that bound what the core keeps or offers.
struct MasterLimits {
    min_allocatable: Option<Vec<Resources>>,
    completed_tasks: usize,
    completed_per_framework: usize,
    completed_max_age_ms: u64,
    completed_frameworks: usize,
    connections: agora_net::gate::Caps,
}

impl Default for MasterLimits {
    fn default() -> Self {
        let d = CoreConfig::default();
        MasterLimits {
            min_allocatable: None,
            completed_tasks: d.completed_task_limit,
            completed_per_framework: d.completed_per_framework,
            completed_max_age_ms: d.completed_max_age_ms,
            completed_frameworks: d.completed_framework_limit,
            connections: agora_master::server::DEFAULT_CONNECTION_CAPS,
        }
    }
}

/// `--min-allocatable-resources`: bags separated by `|`, each in `--resources` syntax.
fn min_allocatable(spec: &str) -> anyhow::Result<Vec<Resources>> {
    spec.split('|')
        .map(|bag| {
            let r = Resources::parse(bag.trim()).map_err(|e| {
                anyhow::anyhow!("--min-allocatable-resources {spec:?}: {e}")
            })?;
            if r.is_empty() {
                anyhow::bail!(
                    "--min-allocatable-resources {spec:?}: an alternative is empty (write e.g. \"cpus:0.01|mem:32MiB\")"
                );
            }
            Ok(r)
        })
        .collect()
}

/// A master, and the functions gateway (`agora-fn-gateway`) started beside it in
/// this process: the gateway subscribes to the master as a framework and serves
/// `--http`; the master hands it `agora fn` requests through [`FunctionsDoor`].
pub struct MasterHandle {
    pub addr: SocketAddr,
    /// Where the gateway's HTTP server listens, when it runs.
    pub http_addr: Option<SocketAddr>,
    master: agora_master::server::MasterHandle,
    gateway: Option<agora_fn_gateway::GatewayHandle>,
}

impl MasterHandle {
    pub async fn shutdown(self) {
        drop(self.gateway);
        self.master.shutdown().await;
    }
}

/// The master's door to the gateway's operator API.
struct GatewayDoor(std::sync::Arc<agora_fn_gateway::Functions>);

impl FunctionsDoor for GatewayDoor {
    fn handle(
        &self,
        request: agora_proto::v1::operator_request::Request,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = agora_proto::v1::OperatorResponse> + Send + '_>,
    > {
        Box::pin(self.0.operator(request))
    }
}

/// `1=a:7400,2=b:7400`: ids and QUIC addresses of a group's masters.
fn parse_peers(text: &str) -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
    let mut peers = std::collections::BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| {
            anyhow::anyhow!(
                "--peers: `{part}` is not ID=HOST:PORT (e.g. 1=a:7400,2=b:7400,3=c:7400)"
            )
        })?;
        let id: u64 = id.trim().parse().ok().filter(|i| *i > 0).ok_or_else(|| {
            anyhow::anyhow!("--peers: `{id}` in `{part}` is not an id (a number from 1)")
        })?;
        tls::resolve(addr).map_err(|e| anyhow::anyhow!("--peers: {part}: {e}"))?;
        if peers.insert(id, addr.trim().to_string()).is_some() {
            anyhow::bail!("--peers: id {id} is given twice");
        }
    }
    if peers.is_empty() {
        anyhow::bail!(
            "--peers is empty: give every master as ID=HOST:PORT, e.g. 1=a:7400,2=b:7400,3=c:7400"
        );
    }
    Ok(peers)
}

/// host:port others reach an HTTP server bound to `bound` at: a wildcard address
/// (0.0.0.0, [::]) becomes the host the group knows this master by, or this
/// machine's name.
fn advertised_http(bound: SocketAddr, group_host: Option<&str>) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = group_host.map(str::to_string).unwrap_or_else(hostname);
    format!("{host}:{}", bound.port())
}

#[allow(clippy::too_many_arguments)]
async fn start_master(
    listen: SocketAddr,
    group: agora_master::server::Group,
    data_dir: &Path,
    id: Identity,
    agent_timeout_ms: u64,
    offer_timeout_ms: u64,
    agent_reregister_ms: u64,
    functions: Option<FunctionsConfig>,
    limits: MasterLimits,
) -> anyhow::Result<MasterHandle> {
    let prefix = format!("{:08x}", (agora_net::unix_millis() / 1000) as u32);
    let core = CoreConfig {
        id_prefix: prefix,
        agent_timeout_ms,
        offer_timeout_ms,
        agent_reregister_ms,
        min_allocatable: limits.min_allocatable,
        completed_task_limit: limits.completed_tasks,
        completed_per_framework: limits.completed_per_framework,
        completed_max_age_ms: limits.completed_max_age_ms,
        completed_framework_limit: limits.completed_frameworks,
        ..CoreConfig::default()
    };
    // The host the group knows this master by, for its advertised HTTP address.
    let group_host = group
        .peers
        .get(&group.id)
        .and_then(|a| a.rsplit_once(':'))
        .map(|(h, _)| h.to_string());
    let gateway = functions.map(agora_fn_gateway::Gateway::new);
    let door = gateway.as_ref().map(|g| {
        std::sync::Arc::new(GatewayDoor(g.functions())) as std::sync::Arc<dyn FunctionsDoor>
    });
    let master = agora_master::server::start(MasterConfig {
        bind: listen,
        group,
        data_dir: data_dir.to_path_buf(),
        identity: id,
        core,
        functions: door,
        connections: limits.connections,
    })
    .await
    .with_context(|| format!("cannot start the master on {listen}"))?;
    if let Some(g) = &gateway {
        // A follower's HTTP door sends callers on to the leader's.
        let view = master.leader_view();
        g.functions()
            .set_leader_http(std::sync::Arc::new(move || view.leader_elsewhere()));
    }
    let gateway = match gateway {
        Some(g) => match g
            .start(master.addr)
            .await
            .with_context(|| format!("cannot start the master on {listen}"))
        {
            Ok(h) => Some(h),
            Err(e) => {
                master.shutdown().await;
                return Err(e);
            }
        },
        None => None,
    };
    if let Some(http) = gateway.as_ref().and_then(|g| g.http_addr) {
        master.set_http(advertised_http(http, group_host.as_deref()));
    }
    Ok(MasterHandle {
        addr: master.addr,
        http_addr: gateway.as_ref().and_then(|g| g.http_addr),
        master,
        gateway,
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_agent(
    masters: Vec<SocketAddr>,
    id: Identity,
    work_dir: &Path,
    res: Resources,
    attributes: Vec<Attribute>,
    host: String,
    isolation: IsolationSettings,
    recovery_timeout_ms: u64,
    http: Option<HttpSettings>,
    identity_policy: IdentityPolicy,
) -> anyhow::Result<AgentHandle> {
    let res = with_disk(res, work_dir);
    let core = AgentCoreConfig {
        hostname: host,
        resources: res,
        attributes,
        work_dir: work_dir.to_path_buf(),
        update_retry_ms: 1_000,
        update_retry_max_ms: 10_000,
        executor_idle_ms: 10_000,
        output_limit_bytes: 64 << 20,
        max_files_per_task: isolation.max_files_per_task,
        recovery_timeout_ms,
        // Live executors reconnect within about a second; the master (agent timeout
        // 15 s by default) is not registered with before this passes.
        reregister_timeout_ms: recovery_timeout_ms.min(10_000),
    };
    Ok(agora_agent::server::start(AgentConfig {
        masters,
        identity: id,
        core,
        executor_command: executor_command("wasm")?,
        native_executor_command: executor_command("native")?,
        function_executor_command: executor_command("fn")?,
        isolation,
        gc: agora_agent::gc::GcPolicy::default(),
        http,
        identity_policy,
    })
    .await?)
}

/// The agent of `agora dev`, in this process, with its work in `data_dir/agent`.
async fn start_dev_agent(
    masters: Vec<SocketAddr>,
    cd: &CertDir,
    data_dir: &Path,
    res: Resources,
    attrs: Vec<Attribute>,
    isolation: IsolationSettings,
    agent_http: SocketAddr,
) -> anyhow::Result<AgentHandle> {
    start_agent(
        masters,
        Identity::from_cert_dir(cd, Role::Agent)?,
        &data_dir.join("agent"),
        res,
        attrs,
        hostname(),
        isolation,
        60_000,
        // The master learns the port when the agent registers.
        Some(HttpSettings {
            bind: agent_http,
            advertise: None,
            any_port_if_taken: agent_http.port() != 0,
            tls: None,
        }),
        // A dev cluster started again with other resources is a new agent (its
        // agent drained when stopped), unless something still runs there.
        IdentityPolicy::RenewIfChangedAndIdle,
    )
    .await
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// The addresses a dev cluster chose, kept in its data directory
/// (`addresses.json`) and taken again at the next start.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct DevAddresses {
    master: Option<SocketAddr>,
    http: Option<SocketAddr>,
    agent_http: Option<SocketAddr>,
    /// The masters of `agora dev --masters N`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    masters: Vec<crate::devgroup::MasterAddrs>,
}

const DEV_ADDRESSES: &str = "addresses.json";

impl DevAddresses {
    /// What the data directory remembers; nothing when there is no file, and
    /// nothing (with a warning) when it cannot be read.
    fn load(data_dir: &Path) -> DevAddresses {
        let path = data_dir.join(DEV_ADDRESSES);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DevAddresses::default(),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}; choosing new ports", path.display());
                return DevAddresses::default();
            }
        };
        serde_json::from_str(&text).unwrap_or_else(|e| {
            tracing::warn!(
                "{} is not what agora dev wrote ({e}); choosing new ports",
                path.display()
            );
            DevAddresses::default()
        })
    }

    /// Best effort: a cluster that cannot remember its ports still runs.
    fn save(&self, data_dir: &Path) {
        let path = data_dir.join(DEV_ADDRESSES);
        #[allow(
            clippy::expect_used,
            reason = "addresses only: serde_json cannot fail on them"
        )]
        let text = serde_json::to_string_pretty(self).expect("addresses serialize");
        if let Err(e) = std::fs::write(&path, text + "\n") {
            tracing::warn!(
                "cannot write {}: {e}; the next start will choose new ports",
                path.display()
            );
        }
    }
}

#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// The address to listen on: `asked` when it names a port; else the one chosen at an
/// earlier start (on the same IP) if it is free; else `asked` (a new port), with a
/// warning that clients of the earlier run will not find this one.
fn reuse(asked: SocketAddr, saved: Option<SocketAddr>, t: Transport, what: &str) -> SocketAddr {
    let Some(saved) = saved.filter(|s| asked.port() == 0 && s.ip() == asked.ip()) else {
        return asked;
    };
    if port_free(saved, t) {
        saved
    } else {
        eprintln!(
            "agora dev: the {what} port {} of the last run is taken now; using a new one, written to the client configuration (clients that read it find the cluster; those given --master do not)",
            saved.port()
        );
        asked
    }
}

/// Whether `addr` can be listened on now (probed, then released for the real server:
/// another process could take it in between, which only costs the warning of
/// [`reuse`] at the next start).
fn port_free(addr: SocketAddr, t: Transport) -> bool {
    let saved = addr;
    match t {
        Transport::Udp => std::net::UdpSocket::bind(saved).is_ok(),
        // With SO_REUSEADDR, as the servers bind: connections of the killed run
        // lingering in TIME_WAIT do not make the port look taken.
        Transport::Tcp => {
            let socket = if saved.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            };
            socket
                .and_then(|s| {
                    s.set_reuseaddr(true)?;
                    s.bind(saved)?;
                    s.listen(1)
                })
                .is_ok()
        }
    }
}

/// A master and an agent in this process, as `agora dev` and the benchmarks run them.
pub struct DevCluster {
    pub master: MasterHandle,
    pub agent: AgentHandle,
    pub client_config: ClientConfig,
    pub resources: Resources,
}

impl DevCluster {
    pub async fn start(
        data_dir: &Path,
        listen: SocketAddr,
        agent_http: SocketAddr,
        res: Resources,
        attrs: Vec<Attribute>,
        isolation: IsolationSettings,
        offer_timeout_ms: u64,
        functions: DevFunctions,
    ) -> anyhow::Result<DevCluster> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let cd = tls::init_cert_dir(&data_dir.join("certs"), &[])?;
        let master = start_master(
            listen,
            agora_master::server::Group::default(),
            &data_dir.join("master"),
            Identity::from_cert_dir(&cd, Role::Master)?,
            15_000,
            offer_timeout_ms,
            CoreConfig::default().agent_reregister_ms,
            Some(functions.config(&cd)),
            MasterLimits::default(),
        )
        .await?;
        let agent = start_dev_agent(
            vec![master.addr],
            &cd,
            data_dir,
            res.clone(),
            attrs,
            isolation,
            agent_http,
        )
        .await?;
        // Ready means the agent has registered, so the first task finds an offer.
        let registered = tokio::time::timeout(Duration::from_secs(20), async {
            while agent.agent_id().is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await; // poll for readiness
            }
        })
        .await;
        if registered.is_err() {
            agent.drain().await;
            master.shutdown().await;
            anyhow::bail!(
                "the dev agent did not register with the dev master within 20 s; see the log above"
            );
        }
        let mut client_config = client_config(&cd, &master.addr.to_string());
        client_config.http = master.http_addr.map(|a| format!("http://{a}"));
        Ok(DevCluster {
            master,
            resources: agent.resources(),
            agent,
            client_config,
        })
    }

    pub async fn stop(self) {
        self.agent.drain().await;
        self.master.shutdown().await;
    }
}

/// A throwaway dev cluster in a temporary directory (for benchmarks).
pub struct PrivateCluster {
    cluster: DevCluster,
    pub client_config: ClientConfig,
    _dir: tempfile::TempDir,
}

impl PrivateCluster {
    pub async fn start() -> anyhow::Result<PrivateCluster> {
        let dir = tempfile::tempdir()?;
        let cluster = DevCluster::start(
            dir.path(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            detect_resources(),
            Vec::new(),
            IsolationSettings::default(),
            offer_timeout_ms(DEFAULT_OFFER_TIMEOUT)?,
            DevFunctions {
                http: SocketAddr::from(([127, 0, 0, 1], 0)),
                idle_timeout: Duration::from_secs(60),
                http_required: true,
            },
        )
        .await?;
        Ok(PrivateCluster {
            client_config: cluster.client_config.clone(),
            cluster,
            _dir: dir,
        })
    }

    pub async fn stop(self) {
        self.cluster.stop().await;
    }
}

pub async fn dev(a: DevArgs) -> anyhow::Result<ExitCode> {
    let res = resources(&a.resources)?;
    let attrs = parse_attributes(&a.attributes)?;
    // The addresses chosen the first time, so that a restarted cluster is found
    // again by every client, agent and `agora run` that knew it.
    let saved = DevAddresses::load(&a.data_dir);
    if a.masters > 1 {
        return dev_group(a, saved, res, attrs).await;
    }
    let listen = reuse(a.listen, saved.master, Transport::Udp, "master (QUIC)");
    let master_http = reuse(a.master_http, saved.http, Transport::Tcp, "master HTTP");
    let agent_http = reuse(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        saved.agent_http,
        Transport::Tcp,
        "agent HTTP",
    );
    let cluster = DevCluster::start(
        &a.data_dir,
        listen,
        agent_http,
        res,
        attrs,
        a.isolation.settings(),
        offer_timeout_ms(&a.offer_timeout)?,
        a.functions.dev(master_http)?,
    )
    .await?;
    DevAddresses {
        master: Some(cluster.master.addr),
        http: cluster.master.http_addr,
        agent_http: cluster.agent.http_addr(),
        masters: Vec::new(),
    }
    .save(&a.data_dir);
    let cfg_path = a.data_dir.join("client.json");
    cluster.client_config.save(&cfg_path)?;
    let default_cfg = ClientConfig::default_path().is_some_and(|p| p == cfg_path);
    println!("agora dev cluster is up");
    println!("  master   {} (QUIC)", cluster.master.addr);
    if let Some(http) = &cluster.client_config.http {
        println!("  http     {http}");
    }
    println!(
        "  agent    {} ({})",
        cluster.agent.agent_id().unwrap_or_default(),
        cluster.resources
    );
    if let Some(http) = cluster.agent.http_addr() {
        println!("  agent http  http://{http}");
    }
    println!("  config   {}", cfg_path.display());
    println!("  data     {}", a.data_dir.display());
    if !default_cfg {
        println!(
            "  in other shells: export AGORA_CONFIG={}",
            cfg_path.display()
        );
    }
    println!("try: agora run FILE.wasm, agora ps, agora logs TASK. Ctrl-C stops the cluster.");
    println!("ready");
    wait_for_signal().await;
    tracing::info!("stopping the dev cluster");
    let _ = std::fs::remove_file(&cfg_path);
    cluster.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// A concrete address for `asked`: the one of an earlier run when it is free (see
/// [`reuse`]), else a free port now (masters must know each other's addresses
/// before any of them starts).
fn reuse_concrete(
    asked: SocketAddr,
    saved: Option<SocketAddr>,
    t: Transport,
    what: &str,
) -> anyhow::Result<SocketAddr> {
    if let Some(saved) = saved.filter(|s| asked.port() == 0 && s.ip() == asked.ip()) {
        // The masters of a run killed a moment ago (they die with it) may still be
        // letting go of their ports.
        for _ in 0..20 {
            if port_free(saved, t) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100)); // poll: a dying process frees it
        }
    }
    let addr = reuse(asked, saved, t, what);
    if addr.port() != 0 {
        return Ok(addr);
    }
    // Bound, then released for the master to take.
    let port = match t {
        Transport::Udp => std::net::UdpSocket::bind(addr)?.local_addr()?.port(),
        Transport::Tcp => std::net::TcpListener::bind(addr)?.local_addr()?.port(),
    };
    Ok(SocketAddr::new(addr.ip(), port))
}

/// `agora dev --masters N`: N `agora master` processes in one Raft group, and an
/// agent in this process that follows whichever leads.
async fn dev_group(
    a: DevArgs,
    saved: DevAddresses,
    res: Resources,
    attrs: Vec<Attribute>,
) -> anyhow::Result<ExitCode> {
    use crate::devgroup::{MasterAddrs, MasterGroup};
    if a.listen.port() != 0 || a.master_http.port() != 0 {
        anyhow::bail!(
            "--listen and --http name one port, but --masters {} runs {} masters: leave the ports out (each master gets its own, kept in {} for the next start)",
            a.masters,
            a.masters,
            a.data_dir.join(DEV_ADDRESSES).display()
        );
    }
    if a.masters % 2 == 0 {
        eprintln!(
            "agora dev: a group of {} masters stops when {} of them are down, as one of {} would; an odd number (3, 5) is what Raft groups use",
            a.masters,
            a.masters / 2,
            a.masters - 1
        );
    }
    // Checked before any master starts, so a bad flag is said at once.
    let offer_timeout = offer_timeout_ms(&a.offer_timeout)?;
    a.functions.dev(a.master_http)?;
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("cannot create {}", a.data_dir.display()))?;
    let cd = tls::init_cert_dir(&a.data_dir.join("certs"), &[])?;
    let mut addrs = Vec::new();
    for i in 0..a.masters as usize {
        let before = saved.masters.get(i);
        addrs.push(MasterAddrs {
            quic: reuse_concrete(
                a.listen,
                before.map(|m| m.quic),
                Transport::Udp,
                &format!("master {} (QUIC)", i + 1),
            )?,
            http: reuse_concrete(
                a.master_http,
                before.map(|m| m.http),
                Transport::Tcp,
                &format!("master {} HTTP", i + 1),
            )?,
        });
    }
    let agent_http = reuse(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        saved.agent_http,
        Transport::Tcp,
        "agent HTTP",
    );
    let extra = vec![
        format!("--offer-timeout={offer_timeout}ms"),
        format!("--fn-idle-timeout={}", a.functions.fn_idle_timeout),
    ];
    let mut group = MasterGroup::spawn(&a.data_dir, &cd.dir, &addrs, extra)?;
    let agent = start_dev_agent(
        group.quic_addrs(),
        &cd,
        &a.data_dir,
        res.clone(),
        attrs,
        a.isolation.settings(),
        agent_http,
    )
    .await?;
    // Ready: the masters elected a leader and the agent registered with it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while agent.agent_id().is_none() {
        if let Some(exited) = group.exited() {
            agent.drain().await;
            anyhow::bail!("the dev cluster did not start: {exited}");
        }
        if tokio::time::Instant::now() > deadline {
            agent.drain().await;
            anyhow::bail!(
                "the masters elected no leader the agent could register with within 60 s; see {}",
                a.data_dir.join("master-*.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll for readiness
    }
    DevAddresses {
        master: None,
        http: None,
        agent_http: agent.http_addr(),
        masters: addrs.clone(),
    }
    .save(&a.data_dir);
    let first = addrs.first().context("a group has at least one master")?;
    let mut client = client_config(&cd, &first.quic.to_string());
    client.masters = addrs.iter().map(|m| m.quic.to_string()).collect();
    // A follower's HTTP door sends callers on to the leader's (307).
    client.http = Some(format!("http://{}", first.http));
    let cfg_path = a.data_dir.join("client.json");
    client.save(&cfg_path)?;
    let probe = crate::devgroup::probe_endpoint(&Identity::from_cert_dir(&cd, Role::Client)?)?;
    let mut leader = group.leader(&probe).await;
    for _ in 0..20 {
        if leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // poll: the leader's lease settles
        leader = group.leader(&probe).await;
    }
    println!("agora dev cluster is up ({} masters)", a.masters);
    for m in &group.masters {
        println!(
            "  master {}  {} (QUIC)  http://{}  pid {}{}  log {}",
            m.id,
            m.addrs.quic,
            m.addrs.http,
            m.pid().unwrap_or(0),
            if leader == Some(m.id) { "  leader" } else { "" },
            m.log.display()
        );
    }
    println!(
        "  agent    {} ({})",
        agent.agent_id().unwrap_or_default(),
        agent.resources()
    );
    if let Some(http) = agent.http_addr() {
        println!("  agent http  http://{http}");
    }
    println!("  config   {}", cfg_path.display());
    println!("  data     {}", a.data_dir.display());
    if ClientConfig::default_path().is_none_or(|p| p != cfg_path) {
        println!(
            "  in other shells: export AGORA_CONFIG={}",
            cfg_path.display()
        );
    }
    println!(
        "try: agora masters; kill -9 the leader's pid and watch another take over (a master that exits is started again after {} s). Ctrl-C stops the cluster.",
        DEV_MASTER_RESTART.as_secs()
    );
    println!("ready");
    // Like a supervisor: a master that exits is started again a little later, so a
    // killed leader comes back as a follower.
    let mut restarts: Vec<(u64, tokio::time::Instant)> = Vec::new();
    let mut signal = std::pin::pin!(wait_for_signal());
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        while let Some((id, why)) = group.exited_id() {
            eprintln!(
                "agora dev: {why}\nagora dev: master {id} starts again in {} s",
                DEV_MASTER_RESTART.as_secs()
            );
            restarts.push((id, tokio::time::Instant::now() + DEV_MASTER_RESTART));
        }
        let now = tokio::time::Instant::now();
        for (id, _) in restarts.iter().filter(|(_, at)| *at <= now) {
            match group.start(*id) {
                Ok(()) => eprintln!(
                    "agora dev: master {id} started again (pid {})",
                    group.pid(*id).unwrap_or(0)
                ),
                Err(e) => eprintln!("agora dev: cannot start master {id} again: {e:#}"),
            }
        }
        restarts.retain(|(_, at)| *at > now);
    }
    tracing::info!("stopping the dev cluster");
    let _ = std::fs::remove_file(&cfg_path);
    agent.drain().await;
    group.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// How long `agora dev --masters N` waits before it starts a master that exited.
const DEV_MASTER_RESTART: Duration = Duration::from_secs(5);

pub async fn master(a: MasterArgs) -> anyhow::Result<ExitCode> {
    let cd = CertDir::new(&a.certs);
    let mut functions = a.functions.dev(
        a.master_http
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], DEFAULT_MASTER_HTTP_PORT))),
    )?;
    functions.http_required = a.master_http.is_some();
    // The functions framework needs the client certificate of `agora certs init`.
    let functions = if cd.cert(Role::Client).exists() && cd.key(Role::Client).exists() {
        Some(functions.config(&cd))
    } else {
        eprintln!(
            "no client certificate in {}: the functions framework and HTTP server do not run (make one with `agora certs init`)",
            a.certs.display()
        );
        None
    };
    let group = agora_master::server::Group {
        id: a.id,
        peers: a
            .peers
            .as_deref()
            .map(parse_peers)
            .transpose()?
            .unwrap_or_default(),
    };
    let master = start_master(
        a.listen,
        group,
        &a.data_dir,
        Identity::from_cert_dir(&cd, Role::Master)?,
        a.agent_timeout * 1000,
        offer_timeout_ms(&a.offer_timeout)?,
        a.agent_reregister_timeout * 1000,
        functions,
        MasterLimits {
            min_allocatable: a
                .min_allocatable_resources
                .as_deref()
                .map(min_allocatable)
                .transpose()?,
            completed_tasks: a.max_completed_tasks,
            completed_per_framework: a.max_completed_tasks_per_framework,
            completed_max_age_ms: parse_duration_ms(&a.completed_task_max_age)
                .context("--completed-task-max-age")?,
            completed_frameworks: a.max_completed_frameworks,
            connections: agora_net::gate::Caps {
                total: a.max_connections,
                per_ip: a.max_connections_per_ip,
            },
        },
    )
    .await?;
    println!("master listening on {} (QUIC)", master.addr);
    if let Some(http) = master.http_addr {
        println!("master serving functions on http://{http}");
        if http.ip().is_loopback() && a.master_http.is_none() {
            eprintln!(
                "note: the functions door listens on {http}, this machine only; give --http 0.0.0.0:{} (or an address of this machine) to serve others",
                http.port()
            );
        }
    }
    wait_for_signal().await;
    master.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Operator commands about agents (`agora agent gone ID`).
#[derive(clap::Subcommand)]
pub enum AgentCmd {
    /// Mark a stopped (disconnected or unreachable) agent gone for good, as Mesos's
    /// MARK_AGENT_GONE: its tasks end GONE and their frameworks are told; it is
    /// refused if it comes back (`--new-identity` joins as a new agent). Asks for
    /// confirmation unless --yes.
    Gone {
        /// The agent's id (`agora agents`).
        agent_id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        target: crate::Target,
    },
}

pub async fn agent(a: AgentArgs) -> anyhow::Result<ExitCode> {
    let (Some(master), Some(certs)) = (a.master.clone(), a.certs.clone()) else {
        anyhow::bail!("agora agent needs --master HOST:PORT and --certs DIR");
    };
    let cd = CertDir::new(&certs);
    let masters = master
        .split(',')
        .map(tls::resolve)
        .collect::<Result<Vec<_>, _>>()?;
    let res = resources(&a.resources)?;
    let attrs = parse_attributes(&a.attributes)?;
    let remote_master = masters.iter().any(|m| !m.ip().is_loopback());
    let http_tls = if a.http_tls {
        let (cert, key) = match (&a.http_cert, &a.http_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            (Some(_), None) => anyhow::bail!("--http-cert needs --http-key (its private key)"),
            _ => (cd.agent_http_cert(), cd.agent_http_key()),
        };
        if a.http_cert.is_none() && !(cert.exists() && key.exists()) {
            anyhow::bail!(
                "--http-tls: {} or {} does not exist: run `agora certs init {}` where the CA key is (add --agent-name for each name clients reach agents by), then copy agent-http.pem and agent-http.key here",
                cert.display(),
                key.display(),
                certs.display()
            );
        }
        let client_ca = a.http_client_certs.then(|| cd.ca());
        Some(
            tls::http_server_config(&cert, &key, client_ca.as_deref())
                .map_err(|e| anyhow::anyhow!("--http-tls: {e}"))?,
        )
    } else {
        None
    };
    let scheme = if http_tls.is_some() { "https" } else { "http" };
    let agent = start_agent(
        masters,
        Identity::from_cert_dir(&cd, Role::Agent)?,
        &a.work_dir,
        res.clone(),
        attrs,
        a.hostname.unwrap_or_else(hostname),
        a.isolation.settings(),
        a.recovery_timeout.max(1) * 1000,
        Some(HttpSettings {
            bind: a
                .agent_http
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], DEFAULT_AGENT_HTTP_PORT))),
            advertise: a.http_advertise,
            any_port_if_taken: a.agent_http.is_none(),
            tls: http_tls,
        }),
        if a.new_identity {
            IdentityPolicy::Renew
        } else {
            IdentityPolicy::Keep
        },
    )
    .await?;
    println!("agent offering {res} to the master at {master}");
    if let Some(http) = agent.http_addr() {
        println!("agent serving functions on {scheme}://{http}");
        // The gateway beside a master on another machine forwards calls here.
        if http.ip().is_loopback() && remote_master {
            eprintln!(
                "note: the agent's HTTP door listens on {http}, this machine only: the masters' gateways cannot reach the function hosts here; give --http 0.0.0.0:{} (or an address of this machine) to serve functions to the cluster",
                http.port()
            );
        }
    }
    wait_for_signal().await;
    if a.drain_on_stop {
        eprintln!("agora agent: draining: killing the tasks on this agent, then stopping");
        agent.drain().await;
    } else {
        eprintln!(
            "agora agent: stopping; tasks keep running for up to {} s: start the agent again on {} to take them back (--drain-on-stop stops them with the agent)",
            a.recovery_timeout.max(1),
            a.work_dir.display()
        );
        agent.stop().await;
    }
    Ok(ExitCode::SUCCESS)
}
