//! The state the operator API, the functions framework and the HTTP server share:
//! the planner (deployed functions and their hosts), where each agent serves HTTP,
//! the load last read from the agents, and the requests waiting for a host.
//!
//! Deployments and tenant limits are kept in the master's registry as the
//! framework's state (keys of [`agora_fn_api::gateway_state`]), written through the
//! framework's scheduler session ([`StateStore`]) and read back from SUBSCRIBED
//! ([`Functions::recover`]).
//!
//! One std mutex guards it; nothing awaits while holding it. Whoever changes what the
//! framework should act on wakes it ([`Functions::wake_framework`]); whoever changes
//! which hosts serve bumps a watch so that waiting requests look again.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use agora_fn_api::gateway_state::{FUNCTION_PREFIX, TENANT_PREFIX};

use agora_fn_api::MetricsSnapshot;

use agora_proto::units::format_duration;
use agora_proto::v1::{
    self, FunctionDeploy, FunctionInfo, FunctionSummary, TaskState, TenantLimit,
};
use agora_proto::Resources;
use prost::Message;
use tokio::sync::{watch, Notify};

use super::planner::{HostState, Planner, PlannerConfig};
use super::MAX_WAITERS;
use crate::error::{Error, Result};
/// Keeps one record of the framework's state durably (`None`: deletes it); the
/// framework's scheduler session ([`agora_sdk::StateWriter`]) in a running gateway.
pub(crate) trait StateStore: Send + Sync {
    fn set(
        &self,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;
}

impl StateStore for agora_sdk::StateWriter {
    fn set(
        &self,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            match value {
                Some(v) => self.put(&key, v).await?,
                None => self.delete(&key).await?,
            };
            Ok(())
        })
    }
}

/// Longest an operator request waits for the framework's first subscription.
const STORE_WAIT: Duration = Duration::from_secs(20);

/// A role's per-agent concurrency limit over its functions (`agora fn tenant set`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimitEntry {
    pub max_concurrency: u32,
    pub queue_len: u32,
    pub max_queue_wait_ms: u64,
}

/// cpus of a host when the deploy names none: most time a host waits for requests.
pub const DEFAULT_HOST_CPUS_MILLI: i64 = 100;
/// Memory of a host beyond one instance's limit (the host process, wasmtime, buffers).
pub const HOST_MEM_MARGIN: i64 = 32 << 20;
/// Per-request memory when the deploy names none (the functions crate's default).
const DEFAULT_MEMORY: u64 = 64 << 20;
const DEFAULT_MAX_CONCURRENCY: u32 = 16;
const MAX_LIMIT: Duration = Duration::from_secs(15 * 60);
const MAX_NAME_LEN: usize = 64;
/// Function name reserved for the master's own routes (`/fn/-/metrics`).
const RESERVED_NAME: &str = "-";

pub struct Functions {
    state: Mutex<State>,
    wake: Notify,
    changed: watch::Sender<u64>,
    /// Where deployments are kept; None until the framework has subscribed.
    store: watch::Sender<Option<Arc<dyn StateStore>>>,
    /// The leading master's HTTP address while ours does not lead (see
    /// [`Functions::set_leader_http`]).
    leader_http: Mutex<Option<LeaderHttp>>,
    /// How the gateway speaks TLS to agents whose doors serve HTTPS (see
    /// [`Functions::set_agent_tls`]).
    agent_tls: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
}

/// Says where the leader's HTTP front door is while this gateway's master follows.
pub type LeaderHttp = Arc<dyn Fn() -> Option<String> + Send + Sync>;

pub(crate) struct State {
    pub planner: Planner,
    /// agent id -> host:port where it serves `/fn/...`.
    pub agent_http: BTreeMap<String, String>,
    /// agent http address -> its latest `/fn-metrics`.
    pub metrics: BTreeMap<String, Vec<MetricsSnapshot>>,
    /// Requests held at the master per function.
    pub waiting: BTreeMap<String, u32>,
    /// Requests the master is forwarding, per agent http address.
    pub forwarding: HashMap<String, u64>,
    pub round_robin: usize,
    pub framework_id: Option<String>,
    /// Hosts to kill decided outside the framework's loop (a remove); it sends them.
    pub kill_queue: Vec<String>,
    /// Role -> the per-agent limit over its functions' requests.
    pub tenant_limits: BTreeMap<String, TenantLimitEntry>,
    /// The framework's stored state was taken (see [`Functions::recover`]).
    pub recovered: bool,
}

/// Why a request found no host.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitError {
    /// The function is not (or no longer) deployed.
    Unknown,
    /// Too many requests already wait for a host of this function.
    Full,
    /// No host became ready in time; with the last failure, if any.
    Timeout(Option<String>),
    /// A host failed to start while the request waited.
    HostFailed(String),
}

/// An agent chosen to serve one request; counted as busy until dropped.
pub struct Lease {
    functions: Arc<Functions>,
    pub addr: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut s = self.functions.lock();
        if let Some(n) = s.forwarding.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Decrements a function's waiting count when a held request goes (answered,
/// timed out or abandoned by its client).
struct Waiting<'a> {
    functions: &'a Functions,
    name: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut s = self.functions.lock();
        let n = s
            .waiting
            .get(self.name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(1);
        if n == 0 {
            s.waiting.remove(self.name);
        } else {
            s.waiting.insert(self.name.to_string(), n);
        }
        s.planner.set_waiting(self.name, n, crate::now_ms());
    }
}

impl Functions {
    /// The TLS settings for agents' HTTPS doors: the cluster's CA and the
    /// certificate the gateway presents (`agora_net::tls::http_client_config`). Set
    /// once, before the gateway serves; later calls are ignored.
    pub fn set_agent_tls(&self, tls: rustls::ClientConfig) {
        let _ = self.agent_tls.set(Arc::new(tls));
    }

    /// The settings of [`Functions::set_agent_tls`]; unset, settings that trust no
    /// CA, so that an HTTPS agent is refused with "unknown issuer", not reached.
    #[allow(
        clippy::expect_used,
        reason = "ring's default provider has TLS 1.3 cipher suites"
    )]
    pub(crate) fn agent_tls(&self) -> Arc<rustls::ClientConfig> {
        self.agent_tls
            .get_or_init(|| {
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 with ring")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
                Arc::new(tls)
            })
            .clone()
    }

    pub fn new(idle_timeout: Duration) -> Arc<Functions> {
        let planner = Planner::new(PlannerConfig {
            idle_timeout_ms: u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX),
            ..PlannerConfig::default()
        });
        Arc::new(Functions {
            state: Mutex::new(State {
                planner,
                agent_http: BTreeMap::new(),
                metrics: BTreeMap::new(),
                waiting: BTreeMap::new(),
                forwarding: HashMap::new(),
                round_robin: 0,
                framework_id: None,
                kill_queue: Vec::new(),
                tenant_limits: BTreeMap::new(),
                recovered: false,
            }),
            wake: Notify::new(),
            changed: watch::Sender::new(0),
            store: watch::Sender::new(None),
            agent_tls: std::sync::OnceLock::new(),
            leader_http: Mutex::new(None),
        })
    }

    /// How to find the leading master's HTTP address (host:port) while this
    /// gateway's master does not lead: requests are then sent on there (307).
    pub fn set_leader_http(&self, f: LeaderHttp) {
        *self
            .leader_http
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(f);
    }

    /// The leader's HTTP address, when another master leads and it is known.
    pub fn leader_http(&self) -> Option<String> {
        let f = self
            .leader_http
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        f().filter(|a| !a.is_empty())
    }

    /// Where deployments are kept from now on (the framework's new session).
    pub(crate) fn set_store(&self, store: Arc<dyn StateStore>) {
        self.store.send_replace(Some(store));
    }

    /// The framework's state store, once it has subscribed (and so taken back what
    /// the registry held): right after a start that may take a moment, so this waits
    /// a bit. None if it still has not.
    pub(crate) async fn subscribed(&self) -> Option<Arc<dyn StateStore>> {
        let mut rx = self.store.subscribe();
        tokio::time::timeout(STORE_WAIT, rx.wait_for(|s| s.is_some()))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|s| s.clone())
    }

    async fn keep(&self, key: String, value: Option<Vec<u8>>) -> Result<()> {
        match self.subscribed().await {
            Some(store) => store.set(key, value).await,
            None => Err(Error::NotSubscribed),
        }
    }

    /// Takes the deployments and tenant limits the framework's state held (from
    /// SUBSCRIBED), once: after that this process's own view is the newer one.
    pub fn recover(&self, state: &[v1::StateEntry]) {
        let mut s = self.lock();
        if s.recovered {
            return;
        }
        s.recovered = true;
        let mut specs = Vec::new();
        for e in state {
            if let Some(role) = e.key.strip_prefix(TENANT_PREFIX) {
                match TenantLimit::decode(e.value.as_slice()) {
                    Ok(l) => {
                        s.tenant_limits.insert(
                            role.to_string(),
                            TenantLimitEntry {
                                max_concurrency: l.max_concurrency,
                                queue_len: l.queue_len,
                                max_queue_wait_ms: l.max_queue_wait_ms,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(%role, "functions state: tenant limit unreadable, skipped: {e}")
                    }
                }
            } else if let Some(name) = e.key.strip_prefix(FUNCTION_PREFIX) {
                match FunctionDeploy::decode(e.value.as_slice()) {
                    Ok(spec) => specs.push(spec),
                    Err(e) => {
                        tracing::warn!(function = %name, "functions state: function unreadable, skipped: {e}")
                    }
                }
            }
        }
        let now = crate::now_ms();
        for spec in specs {
            let effective = with_tenant_limit(spec, &s.tenant_limits);
            s.planner.deploy(effective, now);
        }
        drop(s);
        self.wake_framework();
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (no multi-step
        // invariants span an unlock), so carry on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the framework to decide again (a deploy, a waiting request).
    pub fn wake_framework(&self) {
        self.wake.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }

    /// Tells waiting requests to look for a host again.
    pub(crate) fn hosts_changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Registers or replaces a function (checked and normalised first), durably.
    pub async fn deploy(&self, spec: FunctionDeploy) -> Result<FunctionDeploy> {
        let spec = normalize(spec)?;
        self.keep(
            format!("{FUNCTION_PREFIX}{}", spec.name),
            Some(spec.encode_to_vec()),
        )
        .await
        .map_err(|e| Error::NotDeployed {
            name: spec.name.clone(),
            cause: Box::new(e),
        })?;
        let replaced = {
            let mut s = self.lock();
            let replaced = s.planner.function(&spec.name).is_some();
            let effective = with_tenant_limit(spec.clone(), &s.tenant_limits);
            s.planner.deploy(effective, crate::now_ms());
            replaced
        };
        tracing::info!(function = %spec.name, replaced, sha256 = %spec.module.as_ref().map(|m| m.sha256.as_str()).unwrap_or(""), "function deployed");
        self.wake_framework();
        Ok(spec)
    }

    /// Sets (or, with `max_concurrency` 0, removes) a role's per-agent limit over its
    /// functions' requests, durably. Hosts of the role's functions are replaced by
    /// hosts carrying the new limit (a new generation: the old ones serve until then).
    /// Returns the names of the role's functions.
    pub async fn set_tenant_limit(&self, limit: TenantLimit) -> Result<Vec<String>> {
        let (role, entry) = check_tenant_limit(limit).map_err(Error::Invalid)?;
        self.keep(
            format!("{TENANT_PREFIX}{role}"),
            entry.map(|e| to_proto_limit(&role, &e).encode_to_vec()),
        )
        .await
        .map_err(|e| Error::TenantLimitNotSet {
            role: role.clone(),
            cause: Box::new(e),
        })?;
        let replaced = {
            let mut s = self.lock();
            match entry {
                Some(e) => s.tenant_limits.insert(role.clone(), e),
                None => s.tenant_limits.remove(&role),
            };
            let specs: Vec<FunctionDeploy> = s
                .planner
                .functions()
                .values()
                .filter(|f| f.spec.role == role)
                .map(|f| f.spec.clone())
                .collect();
            let now = crate::now_ms();
            for spec in &specs {
                let effective = with_tenant_limit(spec.clone(), &s.tenant_limits);
                s.planner.deploy(effective, now);
            }
            specs.into_iter().map(|f| f.name).collect::<Vec<_>>()
        };
        tracing::info!(%role, limit = ?entry, functions = ?replaced, "tenant limit set");
        self.wake_framework();
        Ok(replaced)
    }

    /// Every role's tenant limit.
    pub fn tenant_limits(&self) -> Vec<TenantLimit> {
        self.lock()
            .tenant_limits
            .iter()
            .map(|(role, e)| to_proto_limit(role, e))
            .collect()
    }

    /// Removes a function: its hosts are killed, requests to it get 404.
    pub async fn remove(&self, name: &str) -> Result<()> {
        if self.lock().planner.function(name).is_none() {
            return Err(Error::UnknownFunction(name.to_string()));
        }
        self.keep(format!("{FUNCTION_PREFIX}{name}"), None)
            .await
            .map_err(|e| Error::NotRemoved {
                name: name.to_string(),
                cause: Box::new(e),
            })?;
        // The framework kills the hosts on its next decision.
        let kills = self.lock().planner.remove(name);
        tracing::info!(function = %name, hosts = kills.len(), "function removed");
        self.lock().kill_queue.extend(kills);
        self.wake_framework();
        self.hosts_changed();
        Ok(())
    }

    /// Every function with its hosts, target and metrics.
    pub fn list(&self) -> Vec<FunctionSummary> {
        let s = self.lock();
        let metrics = s.metrics_by_function();
        s.planner
            .functions()
            .values()
            .map(|f| {
                let name = f.spec.name.as_str();
                let instances = s
                    .planner
                    .hosts_of(name)
                    .map(|(id, h)| v1::FunctionInstance {
                        task_id: id.clone(),
                        agent_id: h.agent_id.clone(),
                        http_address: s.agent_http.get(&h.agent_id).cloned().unwrap_or_default(),
                        state: match h.state {
                            HostState::Launching => TaskState::TaskStaging,
                            HostState::Starting => TaskState::TaskStarting,
                            HostState::Running => TaskState::TaskRunning,
                            HostState::Killing => TaskState::TaskKilling,
                        } as i32,
                    })
                    .collect();
                FunctionSummary {
                    spec: Some(f.spec.clone()),
                    instances,
                    metrics_json: metrics
                        .get(name)
                        .and_then(|m| serde_json::to_string(m).ok())
                        .unwrap_or_default(),
                    target: f.target,
                    last_failure: f.last_failure.clone().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Per-function metrics summed over the agents.
    pub fn metrics(&self) -> Vec<MetricsSnapshot> {
        self.lock().metrics_by_function().into_values().collect()
    }

    /// The framework has subscribed (so it knows what is deployed).
    pub fn is_subscribed(&self) -> bool {
        self.store.borrow().is_some()
    }

    pub fn is_deployed(&self, name: &str) -> bool {
        self.lock().planner.function(name).is_some()
    }

    /// An agent with a running host of `name`, taken for one request; None when there
    /// is none (or the function is unknown).
    pub fn lease(self: &Arc<Self>, name: &str) -> Option<Lease> {
        let mut s = self.lock();
        let addr = s.pick(name)?;
        *s.forwarding.entry(addr.clone()).or_default() += 1;
        drop(s);
        Some(Lease {
            functions: self.clone(),
            addr,
        })
    }

    /// Holds a request until a host of `name` runs (asking the framework for one),
    /// for at most `limit`.
    pub async fn wait_for_host(
        self: &Arc<Self>,
        name: &str,
        limit: Duration,
    ) -> Result<Lease, WaitError> {
        let mut changed = self.changed.subscribe();
        let failures_before = {
            let mut s = self.lock();
            let Some(f) = s.planner.function(name) else {
                return Err(WaitError::Unknown);
            };
            let failures = f.failures;
            let n = s.waiting.get(name).copied().unwrap_or(0);
            if n >= MAX_WAITERS {
                return Err(WaitError::Full);
            }
            s.waiting.insert(name.to_string(), n + 1);
            s.planner.set_waiting(name, n + 1, crate::now_ms());
            failures
        };
        let _waiting = Waiting {
            functions: self,
            name,
        };
        self.wake_framework();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(lease) = self.lease(name) {
                return Ok(lease);
            }
            {
                let s = self.lock();
                let Some(f) = s.planner.function(name) else {
                    return Err(WaitError::Unknown);
                };
                if f.failures > failures_before {
                    return Err(WaitError::HostFailed(
                        f.last_failure
                            .clone()
                            .unwrap_or_else(|| "unknown reason".into()),
                    ));
                }
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    let last = self
                        .lock()
                        .planner
                        .function(name)
                        .and_then(|f| f.last_failure.clone());
                    return Err(WaitError::Timeout(last));
                }
            }
        }
    }
}

impl State {
    /// Least-forwarding agent among those with a running host of `name` (an agent
    /// with two hosts appears twice), ties broken round robin.
    fn pick(&mut self, name: &str) -> Option<String> {
        let addrs: Vec<&String> = self
            .planner
            .hosts_of(name)
            .filter(|(_, h)| h.state == HostState::Running)
            .filter_map(|(_, h)| self.agent_http.get(&h.agent_id))
            .collect();
        if addrs.is_empty() {
            return None;
        }
        self.round_robin = self.round_robin.wrapping_add(1);
        let start = self.round_robin % addrs.len();
        let mut best: Option<(&String, u64)> = None;
        for &a in addrs.iter().cycle().skip(start).take(addrs.len()) {
            let busy = self.forwarding.get(a).copied().unwrap_or(0);
            if best.is_none_or(|(_, b)| busy < b) {
                best = Some((a, busy));
            }
        }
        best.map(|(a, _)| a.clone())
    }

    pub fn metrics_by_function(&self) -> BTreeMap<String, MetricsSnapshot> {
        let mut out: BTreeMap<String, MetricsSnapshot> = BTreeMap::new();
        for snaps in self.metrics.values() {
            for m in snaps {
                if self.planner.function(&m.name).is_none() {
                    continue;
                }
                match out.get_mut(&m.name) {
                    Some(sum) => sum.add(m),
                    None => {
                        out.insert(m.name.clone(), m.clone());
                    }
                }
            }
        }
        out
    }
}

/// Most requests a tenant limit lets run, or wait, on one agent.
const MAX_TENANT_CONCURRENCY: u32 = 100_000;
/// Queue wait of a tenant limit that names none.
const DEFAULT_TENANT_QUEUE_WAIT_MS: u64 = 1000;

fn to_proto_limit(role: &str, e: &TenantLimitEntry) -> TenantLimit {
    TenantLimit {
        role: role.to_string(),
        max_concurrency: e.max_concurrency,
        queue_len: e.queue_len,
        max_queue_wait_ms: e.max_queue_wait_ms,
    }
}

/// The spec hosts run: the deploy with its role's tenant limit, if any.
fn with_tenant_limit(
    mut spec: FunctionDeploy,
    limits: &BTreeMap<String, TenantLimitEntry>,
) -> FunctionDeploy {
    let limit = limits
        .get(&spec.role)
        .map(|e| to_proto_limit(&spec.role, e));
    if let Some(info) = spec.function.as_mut() {
        info.tenant_limit = limit;
    }
    spec
}

/// Checks a tenant limit; returns its role and what to keep (`None`: remove).
fn check_tenant_limit(
    l: TenantLimit,
) -> std::result::Result<(String, Option<TenantLimitEntry>), String> {
    let role = match l.role.trim() {
        "" | "*" => "*".to_string(),
        r => {
            agora_allocator::validate_role(r).map_err(|e| format!("role {r:?}: {e}"))?;
            r.to_string()
        }
    };
    if l.max_concurrency == 0 {
        return Ok((role, None));
    }
    if l.max_concurrency > MAX_TENANT_CONCURRENCY || l.queue_len > MAX_TENANT_CONCURRENCY {
        return Err(format!(
            "tenant limit of role {role}: max concurrency {} / queue {} are above the limit of {MAX_TENANT_CONCURRENCY}",
            l.max_concurrency, l.queue_len
        ));
    }
    if l.max_queue_wait_ms > MAX_LIMIT.as_millis() as u64 {
        return Err(format!(
            "tenant limit of role {role}: queue wait is above 15 minutes"
        ));
    }
    Ok((
        role,
        Some(TenantLimitEntry {
            max_concurrency: l.max_concurrency,
            queue_len: l.queue_len,
            max_queue_wait_ms: if l.max_queue_wait_ms == 0 {
                DEFAULT_TENANT_QUEUE_WAIT_MS
            } else {
                l.max_queue_wait_ms
            },
        }),
    ))
}

/// Checks a deploy and fills in defaults, so that every part of the system sees the
/// same explicit values. A deploy refused is [`Error::Invalid`], naming what to change.
pub fn normalize(d: FunctionDeploy) -> Result<FunctionDeploy> {
    check_deploy(d).map_err(Error::Invalid)
}

fn check_deploy(mut d: FunctionDeploy) -> std::result::Result<FunctionDeploy, String> {
    check_name(&d.name)?;
    let name = d.name.clone();
    let bad = |m: String| format!("function {name}: {m}");
    let module = d
        .module
        .as_mut()
        .ok_or_else(|| bad("the deploy names no module".into()))?;
    if !agora_proto::is_sha256_hex(&module.sha256) {
        return Err(bad(format!(
            "module hash {:?} is not a sha256 in lower-case hex",
            module.sha256
        )));
    }
    if module.timeout_ms > MAX_LIMIT.as_millis() as u64 {
        return Err(bad(format!(
            "timeout of {} is above the limit of {} per request",
            format_duration(Duration::from_millis(module.timeout_ms)),
            format_duration(MAX_LIMIT)
        )));
    }
    let role = d.role.trim().to_string();
    d.role = if role.is_empty() { "*".into() } else { role };
    if d.role != "*" {
        agora_allocator::validate_role(&d.role)
            .map_err(|e| bad(format!("role {:?}: {e}", d.role)))?;
    }
    let info = d.function.get_or_insert_with(FunctionInfo::default);
    info.name = name.clone();
    info.tenant = tenant_of(&d.role);
    // Set from the role's tenant limit when hosts are planned, never by a client.
    info.tenant_limit = None;
    agora_fn_api::outbound::OutboundAllowList::parse(&info.allowed_outbound_hosts)
        .map_err(|e| bad(e.to_string()))?;
    if info.memory_bytes == 0 {
        info.memory_bytes = DEFAULT_MEMORY;
    }
    if info.memory_bytes > 4 << 30 {
        return Err(bad(
            "memory per request is above the 4GiB a wasm32 instance can use".into(),
        ));
    }
    if info.max_concurrency == 0 {
        info.max_concurrency = DEFAULT_MAX_CONCURRENCY;
    }
    if info.max_concurrency > 10_000 || info.queue_len > 100_000 {
        return Err(bad(format!(
            "max concurrency {} / queue {} are above the limits (10000 / 100000)",
            info.max_concurrency, info.queue_len
        )));
    }
    if info.max_queue_wait_ms > MAX_LIMIT.as_millis() as u64 {
        return Err(bad("queue wait is above 15 minutes".into()));
    }
    if d.max_instances > 1000 || d.min_instances > 1000 {
        return Err(bad("min and max instances are at most 1000".into()));
    }
    if d.max_instances > 0 && d.min_instances > d.max_instances {
        return Err(bad(format!(
            "min instances ({}) is above max instances ({})",
            d.min_instances, d.max_instances
        )));
    }
    let res = Resources::from_proto(&d.resources).map_err(|e| bad(format!("resources: {e}")))?;
    let res = if res.is_empty() {
        Resources::cpus_mem(
            DEFAULT_HOST_CPUS_MILLI,
            info.memory_bytes as i64 + HOST_MEM_MARGIN,
        )
    } else {
        if res.milli_cpus() <= 0 || res.mem_bytes() <= 0 {
            return Err(bad(format!("resources {res} must include cpus and mem")));
        }
        res.unreserved()
    };
    d.resources = res.to_proto();
    Ok(d)
}

/// Function names appear in URLs, task ids and file names: the functions crate's
/// alphabet, and `-` alone is the master's own (`/fn/-/metrics`).
fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "function name must be 1 to {MAX_NAME_LEN} characters, got {name:?}"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("function name {name:?} must not start with '.'"));
    }
    if name == RESERVED_NAME {
        return Err("function name \"-\" is reserved for the master's own routes".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "function name {name:?} contains {c:?}; use only letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// The tenant of a role, in the functions crate's name alphabet: the default role is
/// `default`, `/` of hierarchical roles becomes `.`.
fn tenant_of(role: &str) -> String {
    if role == "*" {
        return "default".into();
    }
    let t: String = role
        .chars()
        .map(|c| match c {
            '/' => '.',
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') => c,
            _ => '_',
        })
        .take(MAX_NAME_LEN)
        .collect();
    t.trim_start_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_proto::v1::WasmModule;

    fn deploy(name: &str) -> FunctionDeploy {
        FunctionDeploy {
            name: name.into(),
            module: Some(WasmModule {
                sha256: "ab".repeat(32),
                size: 3,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn normalize_fills_defaults_and_refuses_bad_input() {
        let d = normalize(deploy("echo")).unwrap();
        assert_eq!(d.role, "*");
        let info = d.function.as_ref().unwrap();
        assert_eq!(
            (info.name.as_str(), info.tenant.as_str()),
            ("echo", "default")
        );
        assert_eq!(info.max_concurrency, 16);
        let res = Resources::from_proto(&d.resources).unwrap();
        assert_eq!(res.milli_cpus(), 100);
        assert_eq!(res.mem_bytes(), (64 << 20) + HOST_MEM_MARGIN);

        let mut d = deploy("web.api");
        d.role = "eng/web".into();
        assert_eq!(normalize(d).unwrap().function.unwrap().tenant, "eng.web");

        for bad in ["", "a/b", ".x", "-", "a b"] {
            assert!(normalize(deploy(bad)).is_err(), "{bad:?}");
        }
        let mut d = deploy("f");
        d.min_instances = 3;
        d.max_instances = 2;
        assert!(normalize(d)
            .unwrap_err()
            .to_string()
            .contains("min instances (3) is above max"));
        let mut d = deploy("f");
        d.module.as_mut().unwrap().sha256 = "nothex".into();
        assert!(normalize(d).unwrap_err().to_string().contains("sha256"));
        let mut d = deploy("f");
        d.role = "eng/*".into();
        assert!(normalize(d).is_err());
    }

    type Kept = Arc<Mutex<Vec<(String, Option<Vec<u8>>)>>>;

    /// Keeps the state writes in a list.
    struct Recorder(Kept);

    impl StateStore for Recorder {
        fn set(
            &self,
            key: String,
            value: Option<Vec<u8>>,
        ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
            self.0.lock().unwrap().push((key, value));
            Box::pin(async { Ok(()) })
        }
    }

    /// Functions whose state writes are kept in a list.
    fn recording() -> (Arc<Functions>, Kept) {
        let persisted = Kept::default();
        let f = Functions::new(Duration::from_secs(60));
        f.set_store(Arc::new(Recorder(persisted.clone())));
        (f, persisted)
    }

    #[tokio::test]
    async fn a_waiting_request_gets_the_first_running_host() {
        let (f, persisted) = recording();
        f.deploy(deploy("echo")).await.unwrap();
        assert!(matches!(
            &persisted.lock().unwrap()[0],
            (key, Some(_)) if key == "function/echo"
        ));
        assert!(f.lease("echo").is_none());
        assert_eq!(
            f.wait_for_host("nope", Duration::from_secs(1)).await.err(),
            Some(WaitError::Unknown)
        );
        let waiter = {
            let f = f.clone();
            tokio::spawn(async move {
                f.wait_for_host("echo", Duration::from_secs(10))
                    .await
                    .map(|l| l.addr.clone())
            })
        };
        // The framework would see the waiting request and launch a host.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while f.lock().waiting.get("echo").copied().unwrap_or(0) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the waiter never registered"
            );
            tokio::task::yield_now().await;
        }
        {
            let mut s = f.lock();
            assert_eq!(
                s.planner.decide(crate::now_ms()).launch.get("echo"),
                Some(&1)
            );
            s.planner.launched("fn.echo.1", "echo", "a1", 0);
            s.planner
                .update("fn.echo.1", None, "a1", TaskState::TaskRunning, "", 0);
            s.agent_http.insert("a1".into(), "127.0.0.1:9".into());
        }
        f.hosts_changed();
        assert_eq!(waiter.await.unwrap(), Ok("127.0.0.1:9".to_string()));
        assert_eq!(f.lock().waiting.get("echo"), None, "the waiter is gone");
        let lease = f.lease("echo").unwrap();
        assert_eq!(f.lock().forwarding["127.0.0.1:9"], 1);
        drop(lease);
        assert_eq!(f.lock().forwarding["127.0.0.1:9"], 0);
        f.remove("echo").await.unwrap();
        assert!(f
            .remove("echo")
            .await
            .unwrap_err()
            .to_string()
            .contains("no function named"));
        assert!(f.list().is_empty());
    }

    #[tokio::test]
    async fn a_host_that_fails_to_start_fails_the_waiting_requests() {
        let (f, _) = recording();
        f.deploy(deploy("bad")).await.unwrap();
        let waiter = {
            let f = f.clone();
            tokio::spawn(async move { f.wait_for_host("bad", Duration::from_secs(10)).await.err() })
        };
        while f.lock().waiting.get("bad").copied().unwrap_or(0) == 0 {
            tokio::task::yield_now().await;
        }
        {
            let mut s = f.lock();
            s.planner.launched("fn.bad.1", "bad", "a1", 0);
            s.planner.update(
                "fn.bad.1",
                None,
                "a1",
                TaskState::TaskFailed,
                "invalid module",
                0,
            );
        }
        f.hosts_changed();
        match waiter.await.unwrap() {
            Some(WaitError::HostFailed(m)) => assert!(m.contains("invalid module"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_tenant_limit_reaches_the_roles_hosts_as_a_new_generation() {
        let (f, persisted) = recording();
        let mut a = deploy("a");
        a.role = "acme".into();
        // A client cannot set the tenant limit through a deploy.
        a.function = Some(FunctionInfo {
            tenant_limit: Some(TenantLimit {
                max_concurrency: 1000,
                ..Default::default()
            }),
            ..Default::default()
        });
        f.deploy(a).await.unwrap();
        f.deploy(deploy("other")).await.unwrap();
        let limit_of = |name: &str| {
            let s = f.lock();
            let p = s.planner.function(name).unwrap();
            (p.generation, p.spec.function.clone().unwrap().tenant_limit)
        };
        assert_eq!(limit_of("a"), (0, None));

        let limit = TenantLimit {
            role: "acme".into(),
            max_concurrency: 2,
            queue_len: 4,
            max_queue_wait_ms: 0,
        };
        assert_eq!(f.set_tenant_limit(limit.clone()).await.unwrap(), vec!["a"]);
        let want = TenantLimit {
            max_queue_wait_ms: DEFAULT_TENANT_QUEUE_WAIT_MS,
            ..limit
        };
        assert_eq!(limit_of("a"), (1, Some(want.clone())), "new hosts carry it");
        assert_eq!(limit_of("other"), (0, None), "other roles keep their hosts");
        assert_eq!(f.tenant_limits(), vec![want.clone()]);
        assert!(matches!(
            persisted.lock().unwrap().last(),
            Some((key, Some(_))) if key == "tenant/acme"
        ));
        // The same limit again changes nothing; a function deployed later gets it.
        f.set_tenant_limit(want.clone()).await.unwrap();
        assert_eq!(limit_of("a").0, 1);
        let mut b = deploy("b");
        b.role = "acme".into();
        f.deploy(b).await.unwrap();
        assert_eq!(limit_of("b"), (0, Some(want.clone())));
        // What is persisted for a function never holds the limit (the role's does).
        let ops = persisted.lock().unwrap().clone();
        for (key, value) in ops {
            if let (true, Some(v)) = (key.starts_with("function/"), value) {
                let d = FunctionDeploy::decode(v.as_slice()).unwrap();
                assert_eq!(d.function.unwrap().tenant_limit, None);
            }
        }

        // Bad limits are refused with the reason.
        let bad = |l: TenantLimit| {
            let f = f.clone();
            async move { f.set_tenant_limit(l).await.unwrap_err().to_string() }
        };
        assert!(bad(TenantLimit {
            role: "no spaces".into(),
            max_concurrency: 1,
            ..Default::default()
        })
        .await
        .contains("no spaces"));
        assert!(bad(TenantLimit {
            role: "acme".into(),
            max_concurrency: 1_000_000,
            ..Default::default()
        })
        .await
        .contains("above the limit"));

        // Removed: the hosts are replaced again, without a limit.
        f.set_tenant_limit(TenantLimit {
            role: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(limit_of("a"), (2, None));
        assert!(f.tenant_limits().is_empty());
    }
}
