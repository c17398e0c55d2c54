//! `agora fn`: deploy, list and remove serverless functions, and read their hosts'
//! output. Functions are served by the master's built-in functions framework; these
//! commands are operator requests to the master (FunctionDeploy, FunctionList,
//! FunctionRemove) plus an upload of the module to its artifact store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agora_fn_api::MetricsSnapshot;
use agora_net::tls::{self, Identity};
use agora_net::{read_frame, write_frame};
use agora_proto::resources::format_bytes;
use agora_proto::units::{format_duration, parse_duration_ms, parse_mib_size};
use agora_proto::v1::{
    self, operator_request, stream_open, FunctionDeploy, FunctionInfo, FunctionSummary,
    OperatorRequest, OperatorResponse, StreamOpen, TaskState, WasmModule,
};
use agora_proto::Resources;
use agora_sdk::{Client, ClientConfig};
use anyhow::Context;
use clap::{Args, Subcommand};
use tokio::io::AsyncWriteExt;

use crate::Target;

#[derive(Subcommand)]
pub enum FnCmd {
    /// Deploy (or replace) a function: upload FILE.wasm and register it with the
    /// functions framework; prints its URL.
    Deploy(DeployArgs),
    /// List functions: hosts (running/target), requests, errors, latency.
    Ls {
        #[command(flatten)]
        target: Target,
    },
    /// Per-agent concurrency limits over all functions of a role (tenant).
    #[command(subcommand)]
    Tenant(crate::fn_tenants::TenantCmd),
    /// Remove a function: its hosts stop and requests to it get 404.
    Rm {
        #[command(flatten)]
        target: Target,
        name: String,
    },
    /// Print the log of the function's current hosts: its guests' output and failures.
    ///
    /// What its guests wrote (a CGI guest's stderr, a component's stdout and stderr;
    /// at most 16KiB per stream and request) and a `<unix ms> request failed: STATUS
    /// REASON` line per failed request. It is each host's stderr file, rotated at the
    /// agent's output limit (to stderr.1, which is not shown).
    Logs {
        #[command(flatten)]
        target: Target,
        name: String,
        /// Print the hosts' stdout (the host's own notes, e.g. its load time) instead.
        #[arg(long, conflicts_with = "stderr")]
        stdout: bool,
        /// Print the log (the hosts' stderr): the default.
        #[arg(long, hide = true)]
        stderr: bool,
        /// Keep printing new lines (polling every 250 ms, picking up new hosts)
        /// until Ctrl-C.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Args)]
pub struct DeployArgs {
    #[command(flatten)]
    target: Target,
    /// The function's name in URLs: /fn/NAME/... (letters, digits, '_', '.', '-').
    name: String,
    /// A WASI preview 1 command (CGI style) or a wasi:http/proxy component.
    file: PathBuf,
    /// The role (tenant) the function's hosts run in.
    #[arg(long, default_value = "*")]
    role: String,
    /// Linear memory one request may use, e.g. 64MiB (a bare number is MiB).
    #[arg(long, default_value = "64MiB")]
    mem: String,
    /// Fuel (about one unit per wasm instruction) one request may burn; 0: unlimited.
    #[arg(long, default_value_t = 0)]
    fuel: u64,
    /// Wall-clock limit of one request, e.g. 5s or 300ms.
    #[arg(long, default_value = "5s")]
    timeout: String,
    /// Requests one host runs at once.
    #[arg(long, default_value_t = 16)]
    max_concurrency: u32,
    /// Requests that may wait on a host beyond --max-concurrency; more get 429.
    #[arg(long, default_value_t = 64)]
    queue: u32,
    /// Longest a request waits in a host's queue before it gets 503.
    #[arg(long, default_value = "1s")]
    queue_wait: String,
    /// Hosts kept even when idle (0: scale to zero).
    #[arg(long, default_value_t = 0)]
    min_instances: u32,
    /// Most hosts, whatever the load (0: one per agent).
    #[arg(long, default_value_t = 0)]
    max_instances: u32,
    /// cpus of one host (default 0.1).
    #[arg(long)]
    host_cpus: Option<String>,
    /// Memory of one host (default: --mem plus 32MiB).
    #[arg(long)]
    host_mem: Option<String>,
    /// Lets the function's wasi:http component send requests to SCHEME://HOST[:PORT]
    /// (SCHEME http, https or *; HOST a name, an IP, *.example.com or *; PORT a number
    /// or *, default the scheme's); repeatable. Without it, none are allowed.
    #[arg(long = "allow-outbound", value_name = "URL")]
    allow_outbound: Vec<String>,
}

pub async fn fns(cmd: FnCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        FnCmd::Deploy(a) => deploy(a).await,
        FnCmd::Ls { target } => ls(target).await,
        FnCmd::Rm { target, name } => rm(target, name).await,
        FnCmd::Tenant(cmd) => crate::fn_tenants::tenants(cmd).await,
        FnCmd::Logs {
            target,
            name,
            stdout,
            stderr: _,
            follow,
        } => logs(target, name, stdout, follow).await,
    }
}

/// A core module (version 1) or a component (layer 1), from the header.
fn check_wasm(path: &Path) -> anyhow::Result<&'static str> {
    let mut head = [0u8; 8];
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let n = std::io::Read::read(&mut f, &mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if n < 8 || &head[..4] != b"\0asm" {
        anyhow::bail!(
            "{} is not a WebAssembly module or component (no \\0asm header); build it for wasm32-wasip1 (CGI style) or wasm32-wasip2 (wasi:http component)",
            path.display()
        );
    }
    match head[4..8] {
        [1, 0, 0, 0] => Ok("WASI command (CGI)"),
        [_, _, 1, 0] => Ok("wasi:http component"),
        _ => anyhow::bail!(
            "{} is WebAssembly of an unsupported version (bytes {:02x?})",
            path.display(),
            &head[4..8]
        ),
    }
}

/// One operator request on a stream of its own (the sdk's Client has no call for
/// these requests).
pub(crate) async fn operator(
    cfg: &ClientConfig,
    req: operator_request::Request,
) -> anyhow::Result<OperatorResponse> {
    let masters = cfg.master_addrs()?;
    let id = Identity::load(&cfg.ca, &cfg.cert, &cfg.key)?;
    let first = *masters.first().ok_or(agora_sdk::Error::NoMaster)?;
    let endpoint = tls::client_endpoint(first, &id)?;
    let conn = agora_net::leader::connect_leader(&endpoint, &masters, tls::CONNECT_TIMEOUT, true)
        .await?
        .conn;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| anyhow::anyhow!("master connection lost: {e}"))?;
    let open = StreamOpen {
        kind: Some(stream_open::Kind::Operator(OperatorRequest {
            request: Some(req),
        })),
    };
    write_frame(&mut send, &open).await?;
    send.finish()
        .map_err(|e| anyhow::anyhow!("master connection lost: {e}"))?;
    let resp: OperatorResponse =
        tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv))
            .await
            .map_err(|_| anyhow::anyhow!("the master did not answer within 30 s"))??
            .ok_or_else(|| anyhow::anyhow!("the master closed the stream without answering"))?;
    conn.close(0u32.into(), b"done");
    if !resp.error.is_empty() {
        anyhow::bail!("{}", resp.error);
    }
    Ok(resp)
}

pub(crate) fn config(t: &Target) -> anyhow::Result<ClientConfig> {
    Ok(ClientConfig::discover(
        t.master.as_deref(),
        t.config.as_deref(),
    )?)
}

/// The leading master's HTTP front door (`http://host:port`), for the URLs printed:
/// a group's client.json names one master's door, which may be down; the leader
/// says where its own is. Falls back to client.json's `http`.
async fn http_base(cfg: &ClientConfig) -> Option<String> {
    if cfg.masters.is_empty() {
        return cfg.http.clone();
    }
    let asked = async {
        let masters = cfg.master_addrs().ok()?;
        let id = Identity::load(&cfg.ca, &cfg.cert, &cfg.key).ok()?;
        let endpoint = tls::client_endpoint(*masters.first()?, &id).ok()?;
        let leader =
            agora_net::leader::connect_leader(&endpoint, &masters, tls::CONNECT_TIMEOUT, true)
                .await
                .ok()?;
        let info = agora_net::leader::query(&leader.conn).await.ok();
        leader.conn.close(0u32.into(), b"asked who leads");
        let info = info?;
        let http = if info.leading {
            info.http
        } else {
            info.leader_http
        };
        (!http.is_empty()).then(|| format!("http://{http}"))
    };
    asked.await.or_else(|| cfg.http.clone())
}

fn url(base: &Option<String>, name: &str) -> String {
    match base {
        Some(base) => format!("{}/fn/{name}/", base.trim_end_matches('/')),
        None => format!("http://MASTER_HTTP/fn/{name}/ (the master's --http address)"),
    }
}

async fn deploy(a: DeployArgs) -> anyhow::Result<ExitCode> {
    let kind = check_wasm(&a.file)?;
    let memory = parse_mib_size(&a.mem).with_context(|| format!("--mem {}", a.mem))?;
    let timeout_ms = parse_duration_ms(&a.timeout).context("--timeout")?;
    if timeout_ms == 0 {
        anyhow::bail!("--timeout must be above 0");
    }
    let queue_wait_ms = parse_duration_ms(&a.queue_wait).context("--queue-wait")?;
    if a.max_concurrency == 0 {
        anyhow::bail!("--max-concurrency must be at least 1");
    }
    let mut host = Resources::new();
    if let Some(c) = &a.host_cpus {
        let m = agora_proto::resources::parse_cpus(c)
            .ok_or_else(|| anyhow::anyhow!("--host-cpus {c} is not a number of cpus, e.g. 0.25"))?;
        host.add_scalar("cpus", "", m);
    }
    if let Some(m) = &a.host_mem {
        let bytes = parse_mib_size(m).with_context(|| format!("--host-mem {m}"))?;
        let bytes = i64::try_from(bytes).with_context(|| format!("--host-mem {m} is too large"))?;
        host.add_scalar("mem", "", bytes);
    }
    if host.is_empty() {
        // The framework's default.
    } else if host.milli_cpus() <= 0 || host.mem_bytes() <= 0 {
        anyhow::bail!("give both --host-cpus and --host-mem (or neither, for the defaults)");
    }
    let cfg = config(&a.target)?;
    let client = Client::connect(&cfg).await?;
    let (sha256, size) = client
        .upload_file(&a.file)
        .await
        .with_context(|| format!("uploading {}", a.file.display()))?;
    let spec = FunctionDeploy {
        name: a.name.clone(),
        module: Some(WasmModule {
            sha256: sha256.clone(),
            size,
            fuel: a.fuel,
            timeout_ms,
        }),
        role: a.role.clone(),
        function: Some(FunctionInfo {
            name: a.name.clone(),
            memory_bytes: memory,
            max_concurrency: a.max_concurrency,
            queue_len: a.queue,
            max_queue_wait_ms: queue_wait_ms,
            allowed_outbound_hosts: a.allow_outbound.clone(),
            ..Default::default()
        }),
        min_instances: a.min_instances,
        max_instances: a.max_instances,
        resources: host.to_proto(),
    };
    operator(&cfg, operator_request::Request::FnDeploy(spec)).await?;
    if kind.starts_with("WASI command") && !a.allow_outbound.is_empty() {
        eprintln!(
            "warning: --allow-outbound has no effect on {}: a WASI command (CGI) has no network; only wasi:http components send requests",
            a.name
        );
    }
    eprintln!(
        "function {} deployed ({kind}, {}, sha256 {})",
        a.name,
        format_bytes(size as i64),
        &sha256[..12]
    );
    println!("{}", url(&http_base(&cfg).await, &a.name));
    Ok(ExitCode::SUCCESS)
}

async fn list(cfg: &ClientConfig) -> anyhow::Result<Vec<FunctionSummary>> {
    Ok(
        operator(cfg, operator_request::Request::FnList(v1::FunctionList {}))
            .await?
            .functions,
    )
}

fn us(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(us) => format!("≤{}", format_duration(Duration::from_micros(us))),
    }
}

async fn ls(t: Target) -> anyhow::Result<ExitCode> {
    let cfg = config(&t)?;
    let fns = list(&cfg).await?;
    let base = http_base(&cfg).await;
    println!(
        "{:<20} {:<10} {:<8} {:>9} {:>7} {:>9} {:>9}  URL",
        "NAME", "ROLE", "HOSTS", "REQUESTS", "ERRORS", "P50", "P99"
    );
    for f in &fns {
        let spec = f.spec.clone().unwrap_or_default();
        let running = f
            .instances
            .iter()
            .filter(|i| i.state() == TaskState::TaskRunning)
            .count();
        let m: Option<MetricsSnapshot> = (!f.metrics_json.is_empty())
            .then(|| serde_json::from_str(&f.metrics_json).ok())
            .flatten();
        let (req, err, p50, p99) = match &m {
            Some(m) => (
                m.requests.to_string(),
                m.errors.total().to_string(),
                us(m.latency.quantile_upper_bound_us(0.5)),
                us(m.latency.quantile_upper_bound_us(0.99)),
            ),
            None => ("0".into(), "0".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<20} {:<10} {:<8} {:>9} {:>7} {:>9} {:>9}  {}",
            spec.name,
            spec.role,
            format!("{running}/{}", f.target),
            req,
            err,
            p50,
            p99,
            url(&base, &spec.name)
        );
        if !f.last_failure.is_empty() {
            println!("  last failure: {}", f.last_failure);
        }
    }
    if fns.is_empty() {
        eprintln!("no functions deployed; try: agora fn deploy NAME FILE.wasm");
    }
    Ok(ExitCode::SUCCESS)
}

async fn rm(t: Target, name: String) -> anyhow::Result<ExitCode> {
    let cfg = config(&t)?;
    operator(
        &cfg,
        operator_request::Request::FnRemove(v1::FunctionRemove { name: name.clone() }),
    )
    .await?;
    eprintln!("function {name} removed; its hosts are stopping");
    Ok(ExitCode::SUCCESS)
}

async fn logs(t: Target, name: String, stdout: bool, follow: bool) -> anyhow::Result<ExitCode> {
    /// Poll interval of --follow, as `agora logs --follow`.
    const POLL: Duration = Duration::from_millis(250);
    /// --follow looks for new (and gone) hosts every this many polls.
    const RELIST_EVERY: u32 = 8;
    let cfg = config(&t)?;
    let path = if stdout { "stdout" } else { "stderr" };
    let mut hosts = fn_hosts(&cfg, &name).await?;
    if hosts.is_empty() {
        eprintln!(
            "function {name} has no hosts now (scaled to zero?); output of ended hosts: `agora ps --all` lists tasks named fn:{name}, `agora logs TASK --stderr` prints one"
        );
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let client = Client::connect(&cfg).await?;
    let mut out = tokio::io::stdout();
    let mut tails: Vec<HostTail> = Vec::new();
    // The host whose output was printed last: a header goes before another's.
    let mut shown: Option<String> = None;
    let mut polls = 0u32;
    loop {
        for (task_id, agent_id) in hosts.drain(..) {
            if !tails.iter().any(|h| h.task_id == task_id) {
                tails.push(HostTail::new(task_id, agent_id));
            }
        }
        let many = tails.len() > 1;
        for tail in &mut tails {
            let data = tail.read_new(&client, path, follow).await;
            if many && (tail.fresh || !data.is_empty()) && shown.as_ref() != Some(&tail.task_id) {
                out.write_all(
                    format!("==> {} on {} <==\n", tail.task_id, tail.agent_id).as_bytes(),
                )
                .await?;
                shown = Some(tail.task_id.clone());
            }
            tail.fresh = false;
            out.write_all(&data).await?;
        }
        out.flush().await?;
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(POLL).await; // poll interval for --follow
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(RELIST_EVERY) {
            match fn_hosts(&cfg, &name).await {
                Ok(now) => {
                    tails.retain(|h| now.iter().any(|(id, _)| *id == h.task_id));
                    hosts = now;
                }
                Err(e) => eprintln!("cannot list {name}'s hosts: {e:#}"),
            }
        }
    }
}

/// The (task id, agent id) of each current host of function `name`.
async fn fn_hosts(cfg: &ClientConfig, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let fns = list(cfg).await?;
    let f = fns
        .iter()
        .find(|f| f.spec.as_ref().is_some_and(|s| s.name == name))
        .ok_or_else(|| {
            anyhow::anyhow!("no function named {name:?} is deployed (see `agora fn ls`)")
        })?;
    Ok(f.instances
        .iter()
        .map(|i| (i.task_id.clone(), i.agent_id.clone()))
        .collect())
}

/// How far one host's file has been printed.
struct HostTail {
    task_id: String,
    agent_id: String,
    offset: u64,
    /// Nothing printed for it yet (its header goes first even when empty).
    fresh: bool,
    /// A read failed and was reported; quiet until one works again.
    failing: bool,
}

impl HostTail {
    fn new(task_id: String, agent_id: String) -> Self {
        HostTail {
            task_id,
            agent_id,
            offset: 0,
            fresh: true,
            failing: false,
        }
    }

    /// Everything written to the file since the last call (the file is bounded by
    /// the agent's output limit, so this is too). A file smaller than what was read
    /// was rotated: the new one is read from its start.
    async fn read_new(&mut self, client: &Client, path: &str, follow: bool) -> Vec<u8> {
        let mut new = Vec::new();
        loop {
            let (data, size) = match client
                .read_file(&self.task_id, path, self.offset, 1 << 20)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    if !std::mem::replace(&mut self.failing, true) {
                        eprintln!("host {}: cannot read its {path}: {e:#}", self.task_id);
                    }
                    return new;
                }
            };
            self.failing = false;
            if size < self.offset {
                if follow {
                    eprintln!("host {}: its {path} was rotated", self.task_id);
                }
                self.offset = 0;
                continue;
            }
            if data.is_empty() {
                return new;
            }
            self.offset += data.len() as u64;
            new.extend_from_slice(&data);
            if self.offset >= size {
                return new;
            }
        }
    }
}
