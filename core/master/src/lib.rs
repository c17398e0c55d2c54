//! The master's state machine: agents, frameworks, offers and tasks.
//!
//! `MasterCore::handle(input, now_ms)` is the only way state changes, and what it wants
//! done comes back as `Output`s (messages to send, connections to close). It never
//! touches a socket or a clock, so tests drive it with exact message sequences.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use agora_proto::resources::{format_bytes, format_cpus, CPUS, DISK, MEM};
use agora_proto::v1::{
    self, call, event, master_to_agent, AgentHello, AgentRegistered, AgentToMaster, Call, Event,
    KillTask, MasterToAgent, Offer, Pong, Reason, SchedulerHello, StatusUpdateAck, Subscribed,
    TaskInfo, TaskState, TaskStatus, TaskSummary,
};
pub use agora_proto::Now;
use agora_proto::{is_sha256_hex, Resources};

use crate::registry::{FrameworkEntry, Registry, RegistryOp};
use agora_allocator::Allocator;

pub mod acl;
mod calls;
mod ops;
pub mod registry;

/// Task and executor ids name directories on agents (`<work>/sandboxes/<framework>/
/// <task>`, `<work>/executors/<framework>/<executor>`) and cgroups: 1-200 bytes, no
/// '/', no NUL, no leading '.' (so never `.` or `..`).
pub(crate) fn is_path_safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 200 && !id.contains(['/', '\0']) && !id.starts_with('.')
}

/// Identifies one live connection (agent or scheduler) in the shell.
pub type ConnId = u64;

#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Prefix of every id this master hands out, so ids from different master runs
    /// never collide.
    pub id_prefix: String,
    pub heartbeat_interval_ms: u64,
    /// An agent silent (or disconnected) this long is removed and its tasks are LOST.
    pub agent_timeout_ms: u64,
    /// Failover timeout for frameworks that do not ask for one.
    pub default_failover_ms: u64,
    pub default_refuse_ms: u64,
    /// How many finished tasks are remembered for `ps --all` and logs.
    pub completed_task_limit: usize,
    /// How many of them one framework may hold (Mesos's
    /// `max_completed_tasks_per_framework`); 0: no bound of its own.
    pub completed_per_framework: usize,
    /// Finished tasks older than this (by their last status) are forgotten; 0: kept
    /// until pushed out by newer ones.
    pub completed_max_age_ms: u64,
    /// How many removed frameworks' ids are remembered (and refused if they try to
    /// subscribe again); the oldest are forgotten first.
    pub completed_framework_limit: usize,
    /// An offer unanswered this long is rescinded and its resources go back to the
    /// allocator (`--offer-timeout`); 0: never.
    pub offer_timeout_ms: u64,
    /// HEARTBEAT events on every scheduler stream this often (SUBSCRIBED says it).
    pub framework_heartbeat_ms: u64,
    /// After a restart, how long the master waits for the agents of its registry to
    /// re-register before it makes offers without them.
    pub agent_reregister_ms: u64,
    /// Offers smaller than every one of these are not made (Mesos's
    /// --min_allocatable_resources); None: the allocator's default.
    pub min_allocatable: Option<Vec<Resources>>,
    /// Told to agents and frameworks: how long a silent master counts as gone (0:
    /// their own rule). Short in a replicated group, to find a new leader fast.
    pub master_silence_ms: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            id_prefix: "m".into(),
            heartbeat_interval_ms: 1_000,
            agent_timeout_ms: 15_000,
            default_failover_ms: 60_000,
            default_refuse_ms: 5_000,
            completed_task_limit: 1_000,
            completed_per_framework: 500,
            completed_max_age_ms: 7 * 24 * 3_600_000,
            completed_framework_limit: 1_000,
            offer_timeout_ms: 30_000,
            framework_heartbeat_ms: 5_000,
            agent_reregister_ms: 20_000,
            min_allocatable: None,
            master_silence_ms: 0,
        }
    }
}

#[derive(Debug)]
pub enum Input {
    AgentHello {
        conn: ConnId,
        hello: AgentHello,
    },
    AgentMessage {
        conn: ConnId,
        msg: AgentToMaster,
    },
    AgentClosed {
        conn: ConnId,
    },
    SchedulerHello {
        conn: ConnId,
        hello: SchedulerHello,
        /// Who subscribes, from its certificate (`acl::SYSTEM_PRINCIPAL` for the
        /// master's own functions framework): what its launches are judged as.
        principal: String,
    },
    SchedulerCall {
        conn: ConnId,
        call: Call,
    },
    SchedulerClosed {
        conn: ConnId,
    },
    /// An operator's request (`agora kill`, `agora role weight set`, `agora quota
    /// set`); answered by one [`Output::OperatorDone`] with the same `request`.
    Operator {
        request: u64,
        op: OperatorOp,
    },
    /// A restarted master's registry, from the previous run: the first input of a new
    /// core (see `recover`).
    Recover {
        registry: Registry,
    },
    /// The artifact store now holds this sha256.
    ArtifactStored {
        sha256: String,
    },
    /// Time passed: check timeouts.
    Tick,
}

/// What an operator may change.
#[derive(Debug, Clone, PartialEq)]
pub enum OperatorOp {
    /// Kill by task id alone (refused when two frameworks use the id).
    Kill { task_id: String },
    /// A role's weight for DRF; 1 is the default.
    SetWeight { role: String, weight: f64 },
    /// A role's quota: the resources named replace theirs, the others are kept;
    /// both empty remove it. `force` skips the check against the cluster's capacity.
    SetQuota {
        role: String,
        guarantee: Resources,
        limit: Resources,
        force: bool,
    },
    /// The agent (disconnected or unreachable) is gone for good: its tasks end GONE.
    MarkAgentGone { agent_id: String },
    /// `agora acl set`: the access policy's JSON text (checked here); empty removes it.
    SetPolicy { text: String },
}

/// Why an operator's request was refused, said so that the operator can act on it.
/// The crate's one error type: every public query and operator request that can fail
/// returns it (the cores' other refusals travel as messages: TASK_ERROR, ERROR events).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl From<String> for Refused {
    fn from(why: String) -> Refused {
        Refused(why)
    }
}

impl From<&str> for Refused {
    fn from(why: &str) -> Refused {
        Refused(why.to_string())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    ToAgent(ConnId, MasterToAgent),
    ToScheduler(ConnId, Event),
    CloseAgent(ConnId, String),
    CloseScheduler(ConnId, String),
    /// The answer to `Input::Operator { request, .. }`, after the outputs it caused.
    OperatorDone {
        request: u64,
        result: Result<(), Refused>,
    },
}

#[derive(Debug)]
struct AgentState {
    hostname: String,
    conn: Option<ConnId>,
    total: Resources,
    attributes: Vec<v1::Attribute>,
    last_seen_ms: u64,
    /// (framework id, task id) of the tasks running there. Ordered (like every
    /// collection the core iterates) so that outputs are deterministic.
    tasks: BTreeSet<(String, String)>,
    /// Tasks that ended here as far as the master is concerned (see `agent_hello`)
    /// but still run until the agent reports them gone; their resources stay taken.
    draining: BTreeMap<(String, String), Resources>,
    /// host:port where the agent serves functions over HTTP; empty: none.
    http_address: String,
}

#[derive(Debug)]
struct FrameworkState {
    name: String,
    conn: Option<ConnId>,
    failover_ms: u64,
    disconnected_at: Option<u64>,
    pending: Vec<v1::PendingTask>,
    /// Mesos's PARTITION_AWARE: TASK_UNREACHABLE instead of TASK_LOST.
    partition_aware: bool,
    /// FrameworkInfo.user: who its commands run as on agents (when a task's
    /// CommandInfo names nobody).
    user: String,
    /// Who subscribed it (the access policy judges its launches as them).
    principal: String,
}

#[derive(Debug, Clone)]
struct OfferState {
    framework_id: String,
    agent_id: String,
    /// The role the offer was made in (resources of one accept share it).
    role: String,
    resources: Resources,
    /// When it was made, for the offer timeout.
    created_ms: u64,
}

#[derive(Debug, Clone)]
struct TaskRecord {
    framework_id: String,
    /// The role it runs in (its offer's; for tasks learned from an agent, its
    /// reservation's or its framework's first): what access control judges it by.
    role: String,
    agent_id: String,
    info: TaskInfo,
    resources: Resources,
    status: TaskStatus,
}

/// Most pending-task descriptions kept per framework, so a framework cannot make the
/// master hold unbounded state.
const MAX_PENDING_PER_FRAMEWORK: usize = 10_000;

#[derive(Debug)]
pub struct MasterCore {
    cfg: CoreConfig,
    next_id: u64,
    agents: BTreeMap<String, AgentState>,
    agent_by_conn: HashMap<ConnId, String>,
    frameworks: BTreeMap<String, FrameworkState>,
    framework_by_conn: HashMap<ConnId, String>,
    offers: BTreeMap<String, OfferState>,
    tasks: BTreeMap<(String, String), TaskRecord>,
    /// Tasks asked to be killed while their agent was disconnected: the kill is sent
    /// when the agent re-registers with them.
    kills_pending: BTreeSet<(String, String)>,
    completed: VecDeque<TaskRecord>,
    /// Tasks of partition-aware frameworks on agents that stopped answering
    /// (TASK_UNREACHABLE): adopted again if their agent returns with them.
    unreachable: BTreeMap<(String, String), TaskRecord>,
    artifacts: HashSet<String>,
    allocator: Allocator,
    out: Vec<Output>,
    /// Wall-clock time of the input being handled, for stamps (see [`Now`]); never
    /// for timeouts, never read between inputs.
    wall_ms: u64,
    /// Mirror of the durable registry (see `registry.rs`).
    registry: Registry,
    /// Registry changes not yet taken by the shell (`take_registry_ops`).
    registry_ops: Vec<RegistryOp>,
    /// Set while a restarted master waits for its agents.
    recovery: Option<ops::Recovery>,
    /// Framework id -> when its scheduler stream last got a HEARTBEAT (or SUBSCRIBED).
    heartbeats: BTreeMap<String, u64>,
    /// STATE_STORED's sequence number: state changes acknowledged since start.
    state_seq: u64,
}

fn status(
    task_id: &str,
    agent_id: &str,
    state: TaskState,
    reason: Reason,
    msg: &str,
    now: u64,
) -> TaskStatus {
    TaskStatus {
        task_id: task_id.to_string(),
        state: state as i32,
        reason: reason as i32,
        message: msg.to_string(),
        agent_id: agent_id.to_string(),
        timestamp_ms: now,
        ..Default::default()
    }
}

impl MasterCore {
    pub fn new(cfg: CoreConfig) -> Self {
        let allocator = match &cfg.min_allocatable {
            Some(min) => Allocator::with_config(agora_allocator::AllocatorConfig {
                min_allocatable: min.clone(),
            }),
            None => Allocator::new(),
        };
        Self {
            cfg,
            next_id: 1,
            agents: BTreeMap::new(),
            agent_by_conn: HashMap::new(),
            frameworks: BTreeMap::new(),
            framework_by_conn: HashMap::new(),
            offers: BTreeMap::new(),
            tasks: BTreeMap::new(),
            kills_pending: BTreeSet::new(),
            completed: VecDeque::new(),
            unreachable: BTreeMap::new(),
            artifacts: HashSet::new(),
            allocator,
            out: Vec::new(),
            wall_ms: 0,
            registry: Registry::default(),
            registry_ops: Vec::new(),
            recovery: None,
            heartbeats: BTreeMap::new(),
            state_seq: 0,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    fn new_id(&mut self, kind: &str) -> String {
        let id = format!("{}-{kind}{:04}", self.cfg.id_prefix, self.next_id);
        self.next_id += 1;
        id
    }

    /// Feeds one input; returns what the shell must do, in order. This is the only
    /// way the core's state changes.
    pub fn handle(&mut self, input: Input, now: impl Into<Now>) -> Vec<Output> {
        let Now {
            mono_ms: now,
            wall_ms,
        } = now.into();
        self.wall_ms = wall_ms;
        match input {
            Input::AgentHello { conn, hello } => self.agent_hello(conn, hello, now),
            Input::AgentMessage { conn, msg } => self.agent_message(conn, msg, now),
            Input::AgentClosed { conn } => self.agent_closed(conn, now),
            Input::SchedulerHello {
                conn,
                hello,
                principal,
            } => self.scheduler_hello(conn, hello, principal, now),
            Input::SchedulerCall { conn, call } => self.scheduler_call(conn, call, now),
            Input::SchedulerClosed { conn } => self.scheduler_closed(conn, now),
            Input::Operator { request, op } => {
                let result = match op {
                    OperatorOp::Kill { task_id } => self.operator_kill(&task_id),
                    OperatorOp::SetWeight { role, weight } => self.set_weight(&role, weight),
                    OperatorOp::SetQuota {
                        role,
                        guarantee,
                        limit,
                        force,
                    } => self.set_quota(&role, &guarantee, &limit, force),
                    OperatorOp::MarkAgentGone { agent_id } => self.mark_agent_gone(&agent_id),
                    OperatorOp::SetPolicy { text } => self.set_policy(&text),
                };
                if let Err(e) = &result {
                    tracing::info!("operator request refused: {e}");
                }
                // After what it caused (a kill), before what allocation then does.
                self.out.push(Output::OperatorDone { request, result });
            }
            Input::Recover { registry } => self.recover(registry, now),
            Input::ArtifactStored { sha256 } => {
                self.artifacts.insert(sha256);
            }
            Input::Tick => self.tick(now),
        }
        self.allocate(now);
        std::mem::take(&mut self.out)
    }

    // ---- agents ---------------------------------------------------------------

    fn agent_hello(&mut self, conn: ConnId, hello: AgentHello, now: u64) {
        let total = match Resources::from_proto(&hello.resources) {
            Ok(r) if r.milli_cpus() > 0 && r.mem_bytes() > 0 => r,
            Ok(r) => {
                let msg = format!("agent advertises {r}; it needs both cpus and mem above zero");
                self.out.push(Output::CloseAgent(conn, msg));
                return;
            }
            Err(e) => {
                self.out
                    .push(Output::CloseAgent(conn, format!("bad resources: {e}")));
                return;
            }
        };
        let agent_id = if !hello.agent_id.is_empty() {
            hello.agent_id.clone()
        } else if let Some(id) = self.agent_by_token(&hello.registration_token) {
            // It restarted before it heard AgentRegistered: same installation, same id
            // (tasks launched on it meanwhile are still its own).
            tracing::info!(agent = %id, "agent registered again before it knew its id; it keeps it");
            id
        } else {
            self.new_id("A")
        };
        if self.registry.agents.get(&agent_id).is_some_and(|e| e.gone) {
            let msg = format!(
                "agent {agent_id} was marked gone by the operator (`agora agent gone`); start it with --new-identity to join as a new agent"
            );
            self.out.push(Output::CloseAgent(conn, msg));
            return;
        }
        // Tasks the agent reports as running are the truth about that agent. Their
        // resources keep their reservation roles, as `accept` took them from an offer.
        let reported: Vec<((String, String), TaskInfo, TaskStatus, Resources)> = hello
            .tasks
            .iter()
            .filter_map(|rt| {
                let (Some(info), Some(st)) = (&rt.task, &rt.status) else {
                    return None;
                };
                let res = Resources::from_proto(&info.resources).ok()?;
                Some((
                    (rt.framework_id.clone(), info.task_id.clone()),
                    info.clone(),
                    st.clone(),
                    res,
                ))
            })
            .collect();
        // Tasks that ended on the agent whose terminal update is not acknowledged yet:
        // the update may have been lost on the way (the agent was killed as it sent
        // it), so the report is the news. Their resources are free on the agent.
        let (ended_there, reported): (Vec<_>, Vec<_>) = reported
            .into_iter()
            .partition(|r| r.2.state().is_terminal());
        // An agent this master (or the one before a restart) removed for silence:
        // frameworks that are not partition-aware were told its tasks were LOST.
        let was_unreachable = self
            .registry
            .agents
            .get(&agent_id)
            .is_some_and(|a| a.unreachable);
        let partition_aware =
            |s: &Self, fid: &str| s.frameworks.get(fid).is_some_and(|f| f.partition_aware);
        for (key, info, st, res) in ended_there {
            let told_lost = self.registry.lost_tasks.contains_key(&key);
            self.ended_on_agent(&agent_id, key, info, st, res, told_lost);
        }
        // Tasks this master already ended itself on this agent (LOST when the agent was
        // removed) stay ended: their frameworks were told so and may have replaced
        // them. They are killed, not adopted again.
        let (reported, ended): (Vec<_>, Vec<_>) = reported.into_iter().partition(|r| {
            if self.tasks.contains_key(&r.0) || self.unreachable.contains_key(&r.0) {
                return true;
            }
            if self
                .last_completed(&r.0)
                .is_some_and(|t| t.agent_id == agent_id)
            {
                return false;
            }
            // Told LOST (by this master or the one before a restart): ended for
            // its framework, whatever the agent says now.
            !self.registry.lost_tasks.contains_key(&r.0)
        });
        // Tasks of partition-aware frameworks reported UNREACHABLE (not terminal) come
        // back: reconciled, not killed; their frameworks hear RUNNING again. Those the
        // agent no longer has are LOST.
        let mut returned: Vec<(String, String)> = reported
            .iter()
            .filter(|r| {
                was_unreachable
                    && partition_aware(self, &r.0 .0)
                    && !self.tasks.contains_key(&r.0)
                    && !self.unreachable.contains_key(&r.0)
            })
            .map(|r| r.0.clone())
            .collect();
        let mut vanished = Vec::new();
        let here: Vec<(String, String)> = self
            .unreachable
            .iter()
            .filter(|(_, t)| t.agent_id == agent_id)
            .map(|(k, _)| k.clone())
            .collect();
        for key in here {
            let rec = self.unreachable.remove(&key).expect("listed above");
            if reported.iter().any(|r| r.0 == key) {
                returned.push(key);
            } else {
                vanished.push(rec);
            }
        }
        let mut task_keys: BTreeSet<(String, String)> =
            reported.iter().map(|r| r.0.clone()).collect();
        // Launches the agent never made durable (it was killed with them in flight):
        // still STAGING here, never started there. They are sent again.
        let mut relaunch = Vec::new();
        if let Some(old) = self.agents.get(&agent_id) {
            // Re-registration: the old connection, if still around, is stale.
            if let Some(old_conn) = old.conn {
                if old_conn != conn {
                    self.agent_by_conn.remove(&old_conn);
                    self.out.push(Output::CloseAgent(
                        old_conn,
                        "agent re-registered on a new connection".into(),
                    ));
                }
            }
            let old_tasks = old.tasks.clone();
            self.remove_agent_offers(&agent_id);
            // Tasks we believed were there but the agent does not report are gone,
            // unless their launch never reached it (see `relaunch`).
            let missing: Vec<_> = old_tasks.difference(&task_keys).cloned().collect();
            // Only what fits beside the tasks it reports is sent again: an agent that
            // restarted with fewer resources (or reports more) must not be given more
            // than it has.
            let mut room = total.unreserved();
            for r in &reported {
                room = room.checked_sub(&r.3.unreserved()).unwrap_or_default();
            }
            for key in &missing {
                let staging = self.tasks.get(key).filter(|r| {
                    r.status() == TaskState::TaskStaging && !self.kills_pending.contains(key)
                });
                if let Some(rec) = staging {
                    if let Some(left) = room.checked_sub(&rec.resources.unreserved()) {
                        room = left;
                        relaunch.push(key.clone());
                        continue;
                    }
                    let msg = format!(
                        "the agent re-registered with {total}, too little to launch this task again"
                    );
                    self.master_terminal(key, TaskState::TaskLost, Reason::AgentRemoved, &msg);
                    continue;
                }
                self.master_terminal(
                    key,
                    TaskState::TaskLost,
                    Reason::AgentRemoved,
                    "the agent re-registered without this task",
                );
            }
            task_keys.extend(relaunch.iter().cloned());
            // The others are given back here and tracked again below from the agent's
            // report; otherwise their frameworks' shares would count them twice.
            for key in old_tasks.intersection(&task_keys) {
                if let Some(rec) = self.tasks.get(key).filter(|r| !r.status().is_terminal()) {
                    self.allocator
                        .recover(&rec.framework_id, &agent_id, &rec.resources, None);
                }
            }
            self.allocator.remove_agent(&agent_id);
        }
        for (key, info, st, res) in reported {
            self.tasks.insert(
                key.clone(),
                TaskRecord {
                    role: self.task_role(&key.0, &res),
                    framework_id: key.0.clone(),
                    agent_id: agent_id.clone(),
                    info,
                    resources: res,
                    status: st,
                },
            );
        }
        self.allocator
            .add_agent(&agent_id, total.clone(), Resources::new());
        // Attributes (and the hostname) are what offer constraints match on.
        let attrs = hello
            .attributes
            .iter()
            .map(|a| (a.name.clone(), a.value.clone()))
            .collect();
        if let Err(e) = self
            .allocator
            .set_agent_attributes(&agent_id, &hello.hostname, attrs)
        {
            tracing::warn!(agent = %agent_id, "agent attributes not usable for constraints: {e}");
        }
        // Registry bookkeeping, and the agent's dynamic reservations restored before
        // its tasks are tracked: tasks may run on reserved resources.
        self.registry_agent_back(&agent_id, &hello.hostname, &hello.registration_token);
        self.adopt_completed(&agent_id, &hello.completed);
        for key in &task_keys {
            let rec = &self.tasks[key];
            if !rec.status().is_terminal() {
                self.allocator
                    .track_used(&rec.framework_id, &agent_id, &rec.resources);
            }
        }
        let mut kills: Vec<_> = task_keys
            .intersection(&self.kills_pending)
            .cloned()
            .collect();
        // Ended tasks are charged to the agent alone (no framework's share) until the
        // agent reports them gone, so nobody is offered what they still use.
        let mut draining = BTreeMap::new();
        for (key, _, _, res) in ended {
            self.allocator.track_used("", &agent_id, &res);
            draining.insert(key.clone(), res);
            kills.push(key);
        }
        self.agents.insert(
            agent_id.clone(),
            AgentState {
                hostname: hello.hostname,
                conn: Some(conn),
                total,
                attributes: hello.attributes,
                last_seen_ms: now,
                tasks: task_keys,
                draining,
                http_address: hello.http_address,
            },
        );
        self.agent_by_conn.insert(conn, agent_id.clone());
        tracing::info!(agent = %agent_id, "agent registered");
        for mut rec in vanished {
            rec.status = status(
                &rec.info.task_id,
                &agent_id,
                TaskState::TaskLost,
                Reason::AgentRemoved,
                "the agent came back without this task",
                self.wall_ms,
            );
            let (fid, st) = (rec.framework_id.clone(), rec.status.clone());
            self.push_completed(rec);
            self.send_update(&fid, st);
        }
        for key in returned {
            if let Some(rec) = self.tasks.get(&key) {
                let mut st = rec.status.clone();
                st.uuid.clear(); // from the master: nothing to acknowledge
                st.reason = Reason::AgentReregistered as i32;
                st.message = format!("agent {agent_id} re-registered; the task kept running");
                st.timestamp_ms = self.wall_ms;
                self.send_update(&key.0, st);
            }
        }
        self.out.push(Output::ToAgent(
            conn,
            MasterToAgent {
                msg: Some(master_to_agent::Msg::Registered(AgentRegistered {
                    agent_id,
                    heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
                    master_silence_ms: self.cfg.master_silence_ms,
                })),
            },
        ));
        // Kills asked for while the agent was away, and of tasks that already ended.
        for (framework_id, task_id) in kills {
            self.out.push(Output::ToAgent(
                conn,
                MasterToAgent {
                    msg: Some(master_to_agent::Msg::KillTask(KillTask {
                        framework_id,
                        task_id,
                    })),
                },
            ));
        }
        for key in relaunch {
            if let Some(rec) = self.tasks.get(&key) {
                tracing::info!(task = %key.1, "launch never reached the restarted agent; sending it again");
                self.out.push(Output::ToAgent(
                    conn,
                    MasterToAgent {
                        msg: Some(master_to_agent::Msg::RunTask(v1::RunTask {
                            framework_id: key.0.clone(),
                            task: Some(rec.info.clone()),
                        })),
                    },
                ));
            }
        }
    }

    /// A re-registering agent reports a task that ended there with its terminal
    /// update unacknowledged. The framework hears the end (with the agent's uuid, so
    /// its ACKNOWLEDGE reaches the agent) unless this master already knows it, or
    /// unless the framework was told LOST when the agent was removed (`told_lost`):
    /// then LOST stays its one end, and is what reconciliation answers.
    fn ended_on_agent(
        &mut self,
        agent_id: &str,
        key: (String, String),
        info: TaskInfo,
        st: TaskStatus,
        res: Resources,
        told_lost: bool,
    ) {
        let rec = if self.tasks.contains_key(&key) {
            self.finish_task(&key);
            self.completed.pop_back()
        } else if let Some(rec) = self.unreachable.remove(&key) {
            Some(rec)
        } else if self.last_completed(&key).is_some() {
            None
        } else {
            Some(TaskRecord {
                role: self.task_role(&key.0, &res),
                framework_id: key.0.clone(),
                agent_id: agent_id.to_string(),
                info,
                resources: res,
                status: st.clone(),
            })
        };
        if let Some(mut rec) = rec {
            if told_lost {
                rec.status = status(
                    &key.1,
                    agent_id,
                    TaskState::TaskLost,
                    Reason::AgentUnreachable,
                    "its agent was removed after it stopped answering",
                    st.timestamp_ms,
                );
                self.push_completed(rec);
                return;
            }
            rec.status = st.clone();
            self.push_completed(rec);
            self.send_update(&key.0, st);
        }
    }

    fn agent_message(&mut self, conn: ConnId, msg: AgentToMaster, now: u64) {
        let Some(agent_id) = self.agent_by_conn.get(&conn).cloned() else {
            self.out.push(Output::CloseAgent(
                conn,
                "message from an unregistered agent".into(),
            ));
            return;
        };
        if let Some(a) = self.agents.get_mut(&agent_id) {
            a.last_seen_ms = now;
        }
        use v1::agent_to_master::Msg;
        match msg.msg {
            Some(Msg::Ping(p)) => self.out.push(Output::ToAgent(
                conn,
                MasterToAgent {
                    msg: Some(master_to_agent::Msg::Pong(Pong { seq: p.seq })),
                },
            )),
            Some(Msg::StatusUpdate(u)) => self.status_update(conn, &agent_id, u),
            Some(Msg::ExecutorMessage(m)) => self.executor_message(&agent_id, m),
            Some(Msg::ExecutorExited(x)) => self.executor_exited(&agent_id, x),
            None => {}
        }
    }

    fn status_update(&mut self, conn: ConnId, agent_id: &str, u: v1::StatusUpdate) {
        let Some(mut st) = u.status else { return };
        st.agent_id = agent_id.to_string();
        let key = (u.framework_id.clone(), st.task_id.clone());
        let new_state = st.state();
        if !self.tasks.contains_key(&key)
            && (self
                .last_completed(&key)
                .is_some_and(|t| t.status.uuid != st.uuid)
                || self.registry.lost_tasks.contains_key(&key))
        {
            // The task already ended, and this is not a retry of the update that ended
            // it (the master ended it itself, e.g. LOST when the agent was removed, or
            // told its framework LOST before a restart): it must not end twice, nor
            // come back. Acknowledge it so that the agent stops sending it.
            if new_state.is_terminal() {
                let res = self
                    .agents
                    .get_mut(agent_id)
                    .and_then(|a| a.draining.remove(&key));
                if let Some(res) = res {
                    self.allocator.recover("", agent_id, &res, None);
                }
            }
            self.out.push(Output::ToAgent(
                conn,
                MasterToAgent {
                    msg: Some(master_to_agent::Msg::Ack(StatusUpdateAck {
                        framework_id: u.framework_id,
                        task_id: st.task_id,
                        uuid: st.uuid,
                    })),
                },
            ));
            return;
        }
        if let Some(rec) = self.tasks.get_mut(&key) {
            // An update for a task we already saw end (a retry) changes nothing.
            if !rec.status().is_terminal() {
                rec.status = st.clone();
                rec.status.timestamp_ms = self.wall_ms.max(st.timestamp_ms);
            }
        }
        if new_state.is_terminal() {
            self.finish_task(&key);
        }
        let fw_conn = self.frameworks.get(&u.framework_id).and_then(|f| f.conn);
        match fw_conn {
            Some(fc) => self.out.push(Output::ToScheduler(
                fc,
                Event {
                    event: Some(event::Event::Update(v1::Update { status: Some(st) })),
                },
            )),
            None if !self.frameworks.contains_key(&u.framework_id) => {
                // Nobody will ever acknowledge this: the framework is gone.
                self.out.push(Output::ToAgent(
                    conn,
                    MasterToAgent {
                        msg: Some(master_to_agent::Msg::Ack(StatusUpdateAck {
                            framework_id: u.framework_id,
                            task_id: st.task_id,
                            uuid: st.uuid,
                        })),
                    },
                ));
            }
            // Framework disconnected but within failover: the agent keeps retrying.
            None => {}
        }
    }

    /// Moves a task that reached a terminal state out of the active table and gives its
    /// resources back.
    fn finish_task(&mut self, key: &(String, String)) {
        let Some(rec) = self.tasks.remove(key) else {
            return;
        };
        self.kills_pending.remove(key);
        if let Some(a) = self.agents.get_mut(&rec.agent_id) {
            a.tasks.remove(key);
        }
        self.allocator
            .recover(&rec.framework_id, &rec.agent_id, &rec.resources, None);
        self.push_completed(rec);
    }

    /// Remembers an ended task, within the history's bounds: the framework's own
    /// (its oldest goes first), then the total (the oldest of all goes first).
    fn push_completed(&mut self, rec: TaskRecord) {
        let fid = rec.framework_id.clone();
        self.completed.push_back(rec);
        let per_fw = self.cfg.completed_per_framework;
        if per_fw > 0 && self.completed.len() > per_fw {
            let mine = self
                .completed
                .iter()
                .filter(|t| t.framework_id == fid)
                .count();
            if mine > per_fw {
                if let Some(i) = self.completed.iter().position(|t| t.framework_id == fid) {
                    self.completed.remove(i);
                }
            }
        }
        while self.completed.len() > self.cfg.completed_task_limit {
            self.completed.pop_front();
        }
    }

    /// Forgets finished tasks older than the history's age bound.
    fn expire_completed(&mut self) {
        let age = self.cfg.completed_max_age_ms;
        if age == 0 {
            return;
        }
        let oldest = self.wall_ms.saturating_sub(age);
        self.completed.retain(|t| t.status.timestamp_ms >= oldest);
    }

    /// The agent's history (`AgentHello.completed`): tasks that ended there which
    /// this master does not know (it restarted since they ended) join the completed
    /// tasks, in the order they ended, so that `ps --all`, `logs` and `explain` find
    /// them after a master restart.
    fn adopt_completed(&mut self, agent_id: &str, list: &[v1::CompletedTask]) {
        if list.is_empty() {
            return;
        }
        let known: HashSet<(String, String)> = self
            .completed
            .iter()
            .map(|t| (t.framework_id.clone(), t.info.task_id.clone()))
            .collect();
        let mut adopted: Vec<TaskRecord> = Vec::new();
        for c in list.iter().take(self.cfg.completed_task_limit) {
            let (Some(info), Some(st)) = (&c.task, &c.status) else {
                continue;
            };
            let key = (c.framework_id.clone(), info.task_id.clone());
            // (A task its framework was told is LOST keeps that end: the agent's
            // history is not news to it.)
            if !st.state().is_terminal()
                || known.contains(&key)
                || self.tasks.contains_key(&key)
                || self.unreachable.contains_key(&key)
                || self.registry.lost_tasks.contains_key(&key)
            {
                continue;
            }
            let Ok(resources) = Resources::from_proto(&info.resources) else {
                continue;
            };
            let mut info = info.clone();
            info.agent_id = agent_id.to_string();
            let mut status = st.clone();
            status.agent_id = agent_id.to_string();
            adopted.push(TaskRecord {
                role: self.task_role(&c.framework_id, &resources),
                framework_id: c.framework_id.clone(),
                agent_id: agent_id.to_string(),
                info,
                resources,
                status,
            });
        }
        if adopted.is_empty() {
            return;
        }
        let mut all: Vec<TaskRecord> = self.completed.drain(..).chain(adopted).collect();
        all.sort_by_key(|t| t.status.timestamp_ms);
        for t in all {
            self.push_completed(t);
        }
        self.expire_completed();
    }

    /// The most recent ended task with this key, if still remembered.
    fn last_completed(&self, key: &(String, String)) -> Option<&TaskRecord> {
        self.completed
            .iter()
            .rev()
            .find(|t| t.framework_id == key.0 && t.info.task_id == key.1)
    }

    /// A terminal state decided by the master itself (agent lost, invalid launch...).
    fn master_terminal(
        &mut self,
        key: &(String, String),
        state: TaskState,
        reason: Reason,
        msg: &str,
    ) {
        let Some(rec) = self.tasks.get_mut(key) else {
            return;
        };
        rec.status = status(
            &key.1,
            &rec.agent_id.clone(),
            state,
            reason,
            msg,
            self.wall_ms,
        );
        let st = rec.status.clone();
        self.finish_task(key);
        self.send_update(&key.0, st);
    }

    fn send_update(&mut self, framework_id: &str, st: TaskStatus) {
        if let Some(fc) = self.frameworks.get(framework_id).and_then(|f| f.conn) {
            self.out.push(Output::ToScheduler(
                fc,
                Event {
                    event: Some(event::Event::Update(v1::Update { status: Some(st) })),
                },
            ));
        }
    }

    fn agent_closed(&mut self, conn: ConnId, now: u64) {
        let Some(agent_id) = self.agent_by_conn.remove(&conn) else {
            return;
        };
        tracing::warn!(agent = %agent_id, "agent disconnected; its tasks are kept until it returns or times out");
        if let Some(a) = self.agents.get_mut(&agent_id) {
            a.conn = None;
            a.last_seen_ms = now;
        }
        self.allocator.set_agent_active(&agent_id, false);
        self.remove_agent_offers(&agent_id);
    }

    fn remove_agent_offers(&mut self, agent_id: &str) {
        let ids: Vec<String> = self
            .offers
            .iter()
            .filter(|(_, o)| o.agent_id == agent_id)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.rescind(&id);
        }
    }

    fn rescind(&mut self, offer_id: &str) {
        let Some(o) = self.offers.remove(offer_id) else {
            return;
        };
        self.allocator
            .recover(&o.framework_id, &o.agent_id, &o.resources, None);
        if let Some(fc) = self.frameworks.get(&o.framework_id).and_then(|f| f.conn) {
            self.out.push(Output::ToScheduler(
                fc,
                Event {
                    event: Some(event::Event::Rescind(v1::Rescind {
                        offer_id: offer_id.to_string(),
                    })),
                },
            ));
        }
    }

    fn remove_agent(&mut self, agent_id: &str, why: &str) {
        self.remove_agent_offers(agent_id);
        let Some(a) = self.agents.remove(agent_id) else {
            return;
        };
        if let Some(c) = a.conn {
            self.agent_by_conn.remove(&c);
            self.out.push(Output::CloseAgent(c, why.to_string()));
        }
        for key in a.tasks {
            // Partition-aware frameworks hear UNREACHABLE (not terminal: the task comes
            // back if the agent does), the others LOST, as in Mesos.
            if self
                .frameworks
                .get(&key.0)
                .is_some_and(|f| f.partition_aware)
            {
                if let Some(mut rec) = self.tasks.remove(&key) {
                    self.allocator
                        .recover(&rec.framework_id, &rec.agent_id, &rec.resources, None);
                    rec.status = status(
                        &key.1,
                        agent_id,
                        TaskState::TaskUnreachable,
                        Reason::AgentUnreachable,
                        why,
                        self.wall_ms,
                    );
                    let st = rec.status.clone();
                    self.unreachable.insert(key.clone(), rec);
                    self.send_update(&key.0, st);
                }
            } else {
                self.master_terminal(&key, TaskState::TaskLost, Reason::AgentUnreachable, why);
                self.told_lost(&key);
            }
        }
        // Bounded: the oldest unreachable tasks are given up as LOST.
        while self.unreachable.len() > self.cfg.completed_task_limit * 10 {
            let oldest = self
                .unreachable
                .iter()
                .min_by_key(|(_, t)| t.status.timestamp_ms)
                .map(|(k, _)| k.clone())
                .expect("not empty");
            let mut rec = self.unreachable.remove(&oldest).expect("present");
            rec.status.state = TaskState::TaskLost as i32;
            rec.status.message = "unreachable for too long; given up".into();
            let (fid, st) = (rec.framework_id.clone(), rec.status.clone());
            self.push_completed(rec);
            self.send_update(&fid, st);
        }
        self.allocator.remove_agent(agent_id);
        self.persist(RegistryOp::PutAgent {
            agent_id: agent_id.to_string(),
            entry: crate::registry::AgentEntry {
                hostname: a.hostname.clone(),
                unreachable: true,
                token: self
                    .registry
                    .agents
                    .get(agent_id)
                    .map(|e| e.token.clone())
                    .unwrap_or_default(),
                gone: false,
            },
        });
        tracing::warn!(agent = %agent_id, "agent removed: {why}");
    }

    // ---- frameworks -----------------------------------------------------------

    fn scheduler_hello(
        &mut self,
        conn: ConnId,
        hello: SchedulerHello,
        principal: String,
        now: u64,
    ) {
        let info = hello.framework.unwrap_or_default();
        // A framework may hold several roles; each offer carries one of them.
        let mut roles: Vec<String> = info.roles.iter().map(|r| r.trim().to_string()).collect();
        if roles.is_empty() {
            roles.push("*".into());
        }
        if let Some((r, why)) = roles.iter().filter(|r| r.as_str() != "*").find_map(|r| {
            agora_allocator::validate_role(r)
                .err()
                .map(|e| (r.clone(), e))
        }) {
            self.error(conn, format!("SUBSCRIBE refused: role `{r}`: {why}"));
            self.out.push(Output::CloseScheduler(
                conn,
                format!("role `{r}` is not valid: {why}"),
            ));
            return;
        }
        let mut constraints = Vec::new();
        for text in &info.offer_constraints {
            match agora_allocator::Constraint::parse(text) {
                Ok(c) => constraints.push(c),
                Err(e) => {
                    self.error(conn, format!("SUBSCRIBE refused: {e}"));
                    self.out.push(Output::CloseScheduler(
                        conn,
                        format!("offer constraint refused: {e}"),
                    ));
                    return;
                }
            }
        }
        let failover_ms = self.failover_ms_of(&info);
        let id = if info.framework_id.is_empty() {
            self.new_id("F")
        } else {
            info.framework_id.clone()
        };
        if let Some(when) = self.registry.removed_frameworks.get(&id) {
            let msg = format!(
                "framework {id} was removed (torn down at {when} ms since the epoch); \
                 subscribe without a framework id to start a new one"
            );
            self.error(conn, format!("SUBSCRIBE refused: {msg}"));
            self.out.push(Output::CloseScheduler(conn, msg));
            return;
        }
        // Only the principal that registered a framework may fail over to it (as in
        // Mesos): another would take over its tasks, whatever roles it may use.
        let owner = self
            .registry
            .frameworks
            .get(&id)
            .map(|f| f.principal.as_str())
            .filter(|p| !p.is_empty());
        if let Some(owner) = owner {
            if owner != principal && principal != acl::SYSTEM_PRINCIPAL {
                let who = if principal.is_empty() {
                    "a client without a principal".to_string()
                } else {
                    format!("principal {principal}")
                };
                let msg = format!(
                    "permission denied: {who} may not subscribe as framework {id}, which principal {owner} registered"
                );
                self.error(conn, format!("SUBSCRIBE refused: {msg}"));
                self.out.push(Output::CloseScheduler(conn, msg));
                return;
            }
        }
        if let Some(old) = self.frameworks.get(&id) {
            if let Some(oc) = old.conn {
                if oc != conn {
                    // The new connection never saw the offers sent to the old one, so
                    // nobody would ever answer them: take them back (as Mesos does).
                    let ids: Vec<String> = self
                        .offers
                        .iter()
                        .filter(|(_, o)| o.framework_id == id)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for oid in ids {
                        self.rescind(&oid);
                    }
                    self.framework_by_conn.remove(&oc);
                    self.out.push(Output::CloseScheduler(
                        oc,
                        "framework failed over to a new connection".into(),
                    ));
                }
            }
        }
        let name = if info.name.is_empty() {
            "unnamed".to_string()
        } else {
            info.name
        };
        let pending = self
            .frameworks
            .remove(&id)
            .map(|f| f.pending)
            .unwrap_or_default();
        self.frameworks.insert(
            id.clone(),
            FrameworkState {
                name,
                conn: Some(conn),
                failover_ms,
                disconnected_at: None,
                pending,
                partition_aware: info.partition_aware,
                user: info.user.clone(),
                principal,
            },
        );
        self.framework_by_conn.insert(conn, id.clone());
        let owner = self
            .registry
            .frameworks
            .get(&id)
            .map(|f| f.principal.clone())
            .filter(|p| !p.is_empty());
        let entry = FrameworkEntry {
            name: self.frameworks[&id].name.clone(),
            roles: roles.clone(),
            failover_ms,
            offer_constraints: info.offer_constraints.clone(),
            partition_aware: info.partition_aware,
            principal: owner.unwrap_or_else(|| self.frameworks[&id].principal.clone()),
        };
        if self.registry.frameworks.get(&id) != Some(&entry) {
            self.persist(RegistryOp::PutFramework {
                framework_id: id.clone(),
                entry,
            });
        }
        self.allocator.add_framework_roles(&id, &roles);
        for role in &roles {
            if let Err(e) = self
                .allocator
                .set_constraints(&id, role, constraints.clone())
            {
                tracing::warn!(framework = %id, "constraints not applied: {e}");
            }
        }
        tracing::info!(framework = %id, "framework subscribed");
        self.heartbeats.insert(id.clone(), now);
        self.out.push(Output::ToScheduler(
            conn,
            Event {
                event: Some(event::Event::Subscribed(Subscribed {
                    state: self.framework_state_of(&id),
                    framework_id: id,
                    heartbeat_interval_ms: self.cfg.framework_heartbeat_ms,
                    master_silence_ms: self.cfg.master_silence_ms,
                })),
            },
        ));
    }

    fn scheduler_closed(&mut self, conn: ConnId, now: u64) {
        let Some(id) = self.framework_by_conn.remove(&conn) else {
            return;
        };
        let Some(f) = self.frameworks.get_mut(&id) else {
            return;
        };
        f.conn = None;
        f.disconnected_at = Some(now);
        tracing::info!(framework = %id, "framework disconnected; failover timeout {} ms", f.failover_ms);
        self.allocator.set_framework_active(&id, false);
        let ids: Vec<String> = self
            .offers
            .iter()
            .filter(|(_, o)| o.framework_id == id)
            .map(|(k, _)| k.clone())
            .collect();
        for oid in ids {
            self.rescind(&oid);
        }
    }

    fn error(&mut self, conn: ConnId, message: String) {
        self.out.push(Output::ToScheduler(
            conn,
            Event {
                event: Some(event::Event::Error(v1::Error {
                    message,
                    request_id: 0,
                })),
            },
        ));
    }

    fn scheduler_call(&mut self, conn: ConnId, call: Call, now: u64) {
        let Some(fid) = self.framework_by_conn.get(&conn).cloned() else {
            self.out
                .push(Output::CloseScheduler(conn, "call before SUBSCRIBE".into()));
            return;
        };
        match call.call {
            Some(call::Call::Accept(a)) => self.accept(conn, &fid, a, now),
            Some(call::Call::Decline(d)) => {
                let refuse = self.refuse_ms(d.filters.as_ref());
                for oid in d.offer_ids {
                    match self.offers.get(&oid) {
                        Some(o) if o.framework_id == fid => {
                            let o = self.offers.remove(&oid).expect("present");
                            self.allocator.recover(&fid, &o.agent_id, &o.resources, Some(now + refuse));
                        }
                        _ => self.error(conn, format!("decline: offer {oid} is not an outstanding offer of this framework")),
                    }
                }
            }
            Some(call::Call::Kill(k)) => {
                let key = (fid.clone(), k.task_id.clone());
                if let Err(e) = self.kill(&key) {
                    self.error(conn, format!("kill: {e}"));
                }
            }
            Some(call::Call::Acknowledge(a)) if a.uuid.is_empty() || a.task_id.is_empty() => {
                self.error(
                    conn,
                    format!(
                        "acknowledge: task `{}` with uuid of {} bytes: both are needed (updates without a uuid need no acknowledgement)",
                        a.task_id,
                        a.uuid.len()
                    ),
                );
            }
            Some(call::Call::Acknowledge(a)) if !self.agents.contains_key(&a.agent_id) => {
                // The agent was removed: its updates were settled by the master.
                self.error(
                    conn,
                    format!(
                        "acknowledge: agent {} of task {} is not registered; nothing to acknowledge",
                        a.agent_id, a.task_id
                    ),
                );
            }
            Some(call::Call::Acknowledge(a)) => {
                if let Some(c) = self.agents.get(&a.agent_id).and_then(|ag| ag.conn) {
                    self.out.push(Output::ToAgent(
                        c,
                        MasterToAgent {
                            msg: Some(master_to_agent::Msg::Ack(StatusUpdateAck {
                                framework_id: fid,
                                task_id: a.task_id,
                                uuid: a.uuid,
                            })),
                        },
                    ));
                }
            }
            Some(call::Call::Reconcile(r)) => self.reconcile(conn, &fid, r.task_ids),
            Some(call::Call::Revive(r)) => self.revive_or_suppress(conn, &fid, &r.role, false),
            Some(call::Call::Suppress(r)) => self.revive_or_suppress(conn, &fid, &r.role, true),
            Some(call::Call::Shutdown(s)) => self.shutdown_executor(conn, &fid, s),
            Some(call::Call::Message(m)) => self.framework_message(conn, &fid, m),
            Some(call::Call::UpdateFramework(u)) => self.update_framework(conn, &fid, u),
            Some(call::Call::Teardown(_)) => self.teardown(&fid, "framework asked for TEARDOWN"),
            Some(call::Call::SetState(st)) => self.set_state(conn, &fid, st),
            Some(call::Call::Pending(p)) => {
                if let Some(f) = self.frameworks.get_mut(&fid) {
                    f.pending = p.tasks;
                    f.pending.truncate(MAX_PENDING_PER_FRAMEWORK);
                }
            }
            None => self.error(conn, "empty call".into()),
        }
    }

    fn refuse_ms(&self, f: Option<&v1::Filters>) -> u64 {
        match f.and_then(|f| f.refuse_seconds) {
            Some(s) if s.is_finite() && s >= 0.0 => (s * 1000.0).min(31_536_000_000.0) as u64,
            _ => self.cfg.default_refuse_ms,
        }
    }

    /// An accept that cannot be carried out: an error, and every launch in it dropped
    /// so the framework does not wait for them.
    fn refuse_accept(&mut self, conn: ConnId, fid: &str, launch: &[TaskInfo], problem: &str) {
        self.error(conn, format!("accept: {problem}"));
        for t in launch {
            let st = status(
                &t.task_id,
                "",
                TaskState::TaskDropped,
                Reason::InvalidTask,
                &format!("launch refused: {problem}"),
                self.wall_ms,
            );
            // Remembered like any ended task, so reconciliation answers DROPPED.
            let key = (fid.to_string(), t.task_id.clone());
            if !self.tasks.contains_key(&key) {
                let resources = Resources::from_proto(&t.resources).unwrap_or_default();
                self.push_completed(TaskRecord {
                    role: self.task_role(fid, &resources),
                    framework_id: fid.to_string(),
                    agent_id: String::new(),
                    info: t.clone(),
                    resources,
                    status: st.clone(),
                });
            }
            self.send_update(fid, st);
        }
    }

    /// Checks a task before launch; returns its resources.
    fn validate_task(&self, fid: &str, t: &TaskInfo) -> Result<Resources, String> {
        if !is_path_safe_id(&t.task_id) {
            return Err(format!(
                "task id `{}` is not valid: use 1-200 characters, no '/' and no leading '.'",
                t.task_id
            ));
        }
        if !t.executor_id.is_empty() && !is_path_safe_id(&t.executor_id) {
            return Err(format!(
                "executor id `{}` is not valid: use 1-200 characters, no '/' and no leading '.'",
                t.executor_id
            ));
        }
        if self
            .tasks
            .contains_key(&(fid.to_string(), t.task_id.clone()))
        {
            return Err(format!(
                "task id {} is already in use by a live task of this framework",
                t.task_id
            ));
        }
        let res = Resources::from_proto(&t.resources).map_err(|e| e.to_string())?;
        if res.milli_cpus() <= 0 || res.mem_bytes() <= 0 {
            return Err(format!(
                "task asks for {res}; it must ask for some cpus and mem"
            ));
        }
        // Inputs are staged into the sandbox and count against its disk.
        let disk = match res.disk_bytes() {
            0 => agora_proto::resources::DEFAULT_TASK_DISK,
            d => d,
        };
        let mut staged: u64 = 0;
        for i in &t.inputs {
            staged = staged.saturating_add(i.size);
            if staged > disk as u64 {
                return Err(format!(
                    "input {} ({}) does not fit in the task's disk of {}: the inputs come to {} by then",
                    i.dest,
                    format_bytes(i.size.min(i64::MAX as u64) as i64),
                    format_bytes(disk),
                    format_bytes(staged.min(i64::MAX as u64) as i64)
                ));
            }
        }
        match (&t.module, &t.command) {
            (Some(_), Some(_)) => return Err("a task runs a module or a command, not both".into()),
            (None, None) => return Err("task names neither a module nor a command".into()),
            (Some(m), None) => {
                if !is_sha256_hex(&m.sha256) {
                    return Err(format!("module hash `{}` is not a sha256 in hex", m.sha256));
                }
                if !self.artifacts.contains(&m.sha256) {
                    return Err(format!(
                        "module {} was never uploaded to this master",
                        m.sha256
                    ));
                }
            }
            (None, Some(c)) => {
                if c.value.trim().is_empty() {
                    return Err("the task's command is empty".into());
                }
                if c.value.contains('\0') || c.arguments.iter().any(|a| a.contains('\0')) {
                    return Err("the task's command contains a NUL byte".into());
                }
                if let Some(g) = c.kill_grace_seconds {
                    if !(0.0..=3600.0).contains(&g) {
                        return Err(format!("kill grace of {g} s is outside 0..3600 s"));
                    }
                }
                if t.no_filesystem {
                    return Err("no_filesystem applies to wasm tasks only".into());
                }
            }
        }
        if t.no_filesystem && (!t.inputs.is_empty() || !t.dirs.is_empty()) {
            return Err("a task without a filesystem cannot have inputs or directories".into());
        }
        for i in &t.inputs {
            if !is_sha256_hex(&i.sha256) || !self.artifacts.contains(&i.sha256) {
                return Err(format!(
                    "input {} ({}) was never uploaded to this master",
                    i.dest, i.sha256
                ));
            }
            check_rel_path(&i.dest)?;
        }
        for d in &t.dirs {
            check_rel_path(d)?;
        }
        Ok(res)
    }

    fn kill(&mut self, key: &(String, String)) -> Result<(), String> {
        let rec = self
            .tasks
            .get(key)
            .ok_or_else(|| format!("no live task {} in framework {}", key.1, key.0))?;
        let Some(conn) = self.agents.get(&rec.agent_id).and_then(|a| a.conn) else {
            let msg = format!(
                "task {} is on agent {}, which is disconnected; it will be killed when it returns",
                key.1, rec.agent_id
            );
            self.kills_pending.insert(key.clone());
            return Err(msg);
        };
        self.out.push(Output::ToAgent(
            conn,
            MasterToAgent {
                msg: Some(master_to_agent::Msg::KillTask(KillTask {
                    framework_id: key.0.clone(),
                    task_id: key.1.clone(),
                })),
            },
        ));
        Ok(())
    }

    /// Kill by task id alone, for operators. Task ids are unique per framework, so an id
    /// used by two frameworks is refused as ambiguous.
    fn operator_kill(&mut self, task_id: &str) -> Result<(), Refused> {
        let keys: Vec<_> = self
            .tasks
            .keys()
            .filter(|(_, t)| t == task_id)
            .cloned()
            .collect();
        match keys.as_slice() {
            [] => Err(format!("no live task with id {task_id} (see `agora ps --all`)").into()),
            [key] => self.kill(&key.clone()).map_err(Refused),
            _ => Err(format!(
                "task id {task_id} is used by {} frameworks; cannot tell which",
                keys.len()
            )
            .into()),
        }
    }

    /// `agora agent gone ID`: see `OperatorOp::MarkAgentGone`.
    fn mark_agent_gone(&mut self, agent_id: &str) -> Result<(), Refused> {
        let entry = self.registry.agents.get(agent_id).cloned();
        if entry.as_ref().is_some_and(|e| e.gone) {
            return Err(format!("agent {agent_id} is already marked gone").into());
        }
        match self.agents.get(agent_id) {
            Some(a) if a.conn.is_some() => {
                return Err(format!(
                    "agent {agent_id} is connected: stop it first (`agora agent --drain-on-stop` ends its tasks with it), then mark it gone"
                )
                .into())
            }
            None if entry.is_none() => {
                return Err(
                    format!("no agent with id {agent_id} (`agora agents` lists them)").into(),
                )
            }
            _ => {}
        }
        let why = "the operator marked its agent gone";
        let hostname = self
            .agents
            .get(agent_id)
            .map(|a| a.hostname.clone())
            .or_else(|| entry.as_ref().map(|e| e.hostname.clone()))
            .unwrap_or_default();
        self.remove_agent_offers(agent_id);
        let live: Vec<(String, String)> = self
            .agents
            .get(agent_id)
            .map(|a| a.tasks.iter().cloned().collect())
            .unwrap_or_default();
        for key in &live {
            self.master_terminal(key, TaskState::TaskGone, Reason::AgentGone, why);
        }
        let held: Vec<(String, String)> = self
            .unreachable
            .iter()
            .filter(|(_, t)| t.agent_id == agent_id)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &held {
            if let Some(mut rec) = self.unreachable.remove(key) {
                rec.status = status(
                    &key.1,
                    agent_id,
                    TaskState::TaskGone,
                    Reason::AgentGone,
                    why,
                    self.wall_ms,
                );
                let st = rec.status.clone();
                self.push_completed(rec);
                self.send_update(&key.0, st);
            }
        }
        if self.agents.remove(agent_id).is_some() {
            self.allocator.remove_agent(agent_id);
        }
        if let Some(r) = &mut self.recovery {
            r.expected.remove(agent_id);
        }
        self.persist(RegistryOp::PutAgent {
            agent_id: agent_id.to_string(),
            entry: crate::registry::AgentEntry {
                hostname,
                unreachable: true,
                token: entry.map(|e| e.token).unwrap_or_default(),
                gone: true,
            },
        });
        tracing::warn!(
            agent = %agent_id,
            tasks = live.len() + held.len(),
            "agent marked gone by the operator; its tasks are GONE"
        );
        Ok(())
    }

    fn reconcile_known(&self, fid: &str, id: &str) -> bool {
        let key = (fid.to_string(), id.to_string());
        self.tasks.contains_key(&key)
            || self.unreachable.contains_key(&key)
            || self
                .completed
                .iter()
                .any(|t| t.framework_id == fid && t.info.task_id == id)
    }

    pub(crate) fn reconcile(&mut self, conn: ConnId, fid: &str, ids: Vec<String>) {
        let statuses: Vec<TaskStatus> = if ids.is_empty() {
            self.tasks
                .values()
                .chain(self.unreachable.values())
                .filter(|t| t.framework_id == fid)
                .map(|t| t.status.clone())
                .collect()
        } else {
            // A restarted master still waiting for agents may not know a task yet: it
            // answers once the agents are back (or the wait is over).
            let ids: Vec<String> = ids
                .into_iter()
                .filter(|id| self.reconcile_known(fid, id) || !self.defer_reconcile(fid, id))
                .collect();
            ids.iter()
                .map(|id| {
                    let key = (fid.to_string(), id.clone());
                    if let Some(t) = self.tasks.get(&key).or_else(|| self.unreachable.get(&key)) {
                        t.status.clone()
                    } else if let Some(t) = self
                        .completed
                        .iter()
                        .rev()
                        .find(|t| t.framework_id == fid && t.info.task_id == *id)
                    {
                        t.status.clone()
                    } else {
                        // As Mesos answers: LOST to frameworks that are not
                        // partition-aware (for them it is gone), UNKNOWN to the others.
                        let state = if self.frameworks.get(fid).is_some_and(|f| f.partition_aware) {
                            TaskState::TaskUnknown
                        } else {
                            TaskState::TaskLost
                        };
                        status(
                            id,
                            "",
                            state,
                            Reason::Reconciliation,
                            "the master knows no such task",
                            self.wall_ms,
                        )
                    }
                })
                .collect()
        };
        for st in &statuses {
            if st.state() == TaskState::TaskLost && st.agent_id.is_empty() {
                self.told_lost(&(fid.to_string(), st.task_id.clone()));
            }
        }
        for mut st in statuses {
            st.uuid.clear(); // reconciliation answers are not acknowledged
            st.reason = Reason::Reconciliation as i32;
            self.out.push(Output::ToScheduler(
                conn,
                Event {
                    event: Some(event::Event::Update(v1::Update { status: Some(st) })),
                },
            ));
        }
    }

    fn teardown(&mut self, fid: &str, why: &str) {
        let keys: Vec<_> = self
            .tasks
            .keys()
            .filter(|(f, _)| f == fid)
            .cloned()
            .collect();
        for key in keys {
            let _ = self.kill(&key);
        }
        let offers: Vec<String> = self
            .offers
            .iter()
            .filter(|(_, o)| o.framework_id == fid)
            .map(|(k, _)| k.clone())
            .collect();
        for oid in offers {
            self.rescind(&oid);
        }
        self.heartbeats.remove(fid);
        if let Some(f) = self.frameworks.remove(fid) {
            if let Some(c) = f.conn {
                self.framework_by_conn.remove(&c);
                self.out.push(Output::CloseScheduler(c, why.to_string()));
            }
        }
        for a in self.agents.values().filter_map(|a| a.conn) {
            self.out.push(Output::ToAgent(
                a,
                MasterToAgent {
                    msg: Some(master_to_agent::Msg::ShutdownFramework(
                        v1::ShutdownFramework {
                            framework_id: fid.to_string(),
                        },
                    )),
                },
            ));
        }
        self.allocator.remove_framework(fid);
        self.unreachable.retain(|(f, _), _| f != fid);
        self.persist(RegistryOp::RemoveFramework {
            framework_id: fid.to_string(),
            removed_ms: self.wall_ms,
        });
        while self.registry.removed_frameworks.len() > self.cfg.completed_framework_limit {
            let oldest = self
                .registry
                .removed_frameworks
                .iter()
                .min_by_key(|(id, t)| (**t, (*id).clone()))
                .map(|(id, _)| id.clone());
            let Some(framework_id) = oldest else { break };
            self.persist(RegistryOp::ForgetFramework { framework_id });
        }
        tracing::info!(framework = %fid, "framework removed: {why}");
    }

    // ---- time -----------------------------------------------------------------

    fn tick(&mut self, now: u64) {
        self.scheduler_timers(now);
        self.expire_completed();
        let timeout = self.cfg.agent_timeout_ms;
        let silent: Vec<(String, bool)> = self
            .agents
            .iter()
            .filter(|(_, a)| now.saturating_sub(a.last_seen_ms) > timeout)
            .map(|(id, a)| (id.clone(), a.conn.is_some()))
            .collect();
        for (id, connected) in silent {
            let why = if connected {
                format!("no heartbeat from agent {id} for {} s", timeout / 1000)
            } else {
                format!(
                    "agent {id} stayed disconnected for more than {} s",
                    timeout / 1000
                )
            };
            self.remove_agent(&id, &why);
            self.agent_failure(&id, &why);
        }
        let expired: Vec<String> = self
            .frameworks
            .iter()
            .filter(|(_, f)| {
                f.disconnected_at
                    .is_some_and(|t| now.saturating_sub(t) >= f.failover_ms)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.teardown(
                &id,
                "framework did not come back within its failover timeout",
            );
        }
    }

    fn allocate(&mut self, now: u64) {
        if self.recovery_holds_offers(now) {
            return;
        }
        let allocations = self.allocator.allocate(now);
        let mut by_fw: BTreeMap<String, Vec<Offer>> = BTreeMap::new();
        for al in allocations {
            let offer_id = self.new_id("O");
            let agent = &self.agents[&al.agent_id];
            let offer = Offer {
                offer_id: offer_id.clone(),
                framework_id: al.framework_id.clone(),
                agent_id: al.agent_id.clone(),
                hostname: agent.hostname.clone(),
                role: al.role.clone(),
                resources: al.resources.to_proto(),
                attributes: agent.attributes.clone(),
            };
            self.offers.insert(
                offer_id,
                OfferState {
                    framework_id: al.framework_id.clone(),
                    agent_id: al.agent_id,
                    role: al.role,
                    resources: al.resources,
                    created_ms: now,
                },
            );
            by_fw.entry(al.framework_id).or_default().push(offer);
        }
        for (fid, offers) in by_fw {
            let conn = self
                .frameworks
                .get(&fid)
                .and_then(|f| f.conn)
                .expect("allocator offers only to connected frameworks");
            self.out.push(Output::ToScheduler(
                conn,
                Event {
                    event: Some(event::Event::Offers(v1::Offers { offers })),
                },
            ));
        }
    }

    // ---- queries (operator API) ---------------------------------------------

    /// The agent connection and framework of a task, live or recently finished, so
    /// the shell can read its sandbox.
    pub fn locate_task(&self, task_id: &str) -> Result<(ConnId, String), Refused> {
        let rec = self
            .tasks
            .values()
            .find(|t| t.info.task_id == task_id)
            .or_else(|| {
                self.completed
                    .iter()
                    .rev()
                    .find(|t| t.info.task_id == task_id)
            })
            .ok_or_else(|| format!("no task with id {task_id} (see `agora ps --all`)"))?;
        let conn = self
            .agents
            .get(&rec.agent_id)
            .and_then(|a| a.conn)
            .ok_or_else(|| {
                format!(
                    "task {task_id} ran on agent {}, which is not connected now",
                    rec.agent_id
                )
            })?;
        Ok((conn, rec.framework_id.clone()))
    }

    /// Live tasks on connected agents, grouped by the agent's connection: what a usage
    /// query asks each agent about.
    pub fn live_tasks_by_agent(&self) -> BTreeMap<ConnId, Vec<(String, String)>> {
        let mut out: BTreeMap<ConnId, Vec<(String, String)>> = BTreeMap::new();
        for (key, rec) in &self.tasks {
            if let Some(conn) = self.agents.get(&rec.agent_id).and_then(|a| a.conn) {
                out.entry(conn).or_default().push(key.clone());
            }
        }
        out
    }

    /// The tasks (`all`: finished ones too), as of `now` (monotonic, for how long
    /// filters still hold).
    pub fn list_tasks(&self, all: bool, now: u64) -> Vec<TaskSummary> {
        let summary = |t: &TaskRecord, fw_name: &str| TaskSummary {
            role: t.role.clone(),
            task_id: t.info.task_id.clone(),
            name: t.info.name.clone(),
            framework_id: t.framework_id.clone(),
            framework_name: fw_name.to_string(),
            agent_id: t.agent_id.clone(),
            state: t.status.state,
            reason: t.status.reason,
            message: t.status.message.clone(),
            resources: t.info.resources.clone(),
            waiting_for: String::new(),
            exit_code: t.status.exit_code,
            updated_ms: t.status.timestamp_ms,
            usage: t.status.usage,
        };
        let fw_name = |id: &str| {
            self.frameworks
                .get(id)
                .map(|f| f.name.clone())
                .unwrap_or_default()
        };
        let mut out: Vec<TaskSummary> = Vec::new();
        for (fid, f) in &self.frameworks {
            for p in &f.pending {
                out.push(TaskSummary {
                    role: self.task_role(fid, &Resources::new()),
                    task_id: p.task_id.clone(),
                    name: p.name.clone(),
                    framework_id: fid.clone(),
                    framework_name: f.name.clone(),
                    state: TaskState::Unspecified as i32,
                    resources: p.resources.clone(),
                    waiting_for: self.explain_pending(fid, p, now),
                    ..Default::default()
                });
            }
        }
        let mut live: Vec<&TaskRecord> = self
            .tasks
            .values()
            .chain(self.unreachable.values())
            .collect();
        live.sort_by(|a, b| {
            a.status
                .timestamp_ms
                .cmp(&b.status.timestamp_ms)
                .then(a.info.task_id.cmp(&b.info.task_id))
        });
        out.extend(
            live.into_iter()
                .map(|t| summary(t, &fw_name(&t.framework_id))),
        );
        if all {
            out.extend(
                self.completed
                    .iter()
                    .map(|t| summary(t, &fw_name(&t.framework_id))),
            );
        }
        out
    }

    /// Why a task waits, with data: what it asks and the most any agent has.
    pub fn explain_pending(&self, fid: &str, p: &v1::PendingTask, now: u64) -> String {
        let Ok(ask) = Resources::from_proto(&p.resources) else {
            return "its resources are malformed".into();
        };
        if self.agents.is_empty() {
            return "no agents are registered".into();
        }
        let max_total = self.allocator.max_total();
        let max_free = self.allocator.max_free();
        let fmt = |n: &str, v: i64| {
            if n == CPUS {
                format_cpus(v)
            } else if n == MEM || n == DISK {
                format_bytes(v)
            } else {
                v.to_string()
            }
        };
        // Resources out in offers are not used: they come back when the offers are
        // answered. Say so rather than "nothing is free".
        let mut held_by: BTreeMap<String, Vec<String>> = BTreeMap::new(); // agent -> frameworks
        let fits_after_offers = self.agents.keys().any(|aid| {
            let mut pool = self.allocator.agent_free(aid).unwrap_or_default();
            for o in self.offers.values().filter(|o| o.agent_id == *aid) {
                pool.add(&o.resources);
                let name = self
                    .frameworks
                    .get(&o.framework_id)
                    .map(|f| f.name.clone())
                    .unwrap_or_default();
                held_by
                    .entry(aid.clone())
                    .or_default()
                    .push(if o.framework_id == fid {
                        "this framework".into()
                    } else {
                        name
                    });
            }
            pool.unreserved().contains(&ask)
        });
        if !ask.is_empty() && !max_free.contains(&ask) && fits_after_offers {
            let mut who: Vec<String> = held_by.into_values().flatten().collect();
            who.sort();
            who.dedup();
            return format!("the resources it needs are out in offers ({}); they return when those are answered", who.join(", "));
        }
        let mut reasons = Vec::new();
        for n in ask.names() {
            let want = ask.get(&n);
            if want > max_total.get(&n) {
                reasons.push(format!(
                    "{n}: asks {}, no agent has that much (the largest has {})",
                    fmt(&n, want),
                    fmt(&n, max_total.get(&n))
                ));
            } else if want > max_free.get(&n) {
                reasons.push(format!(
                    "{n}: asks {}, the most any agent has free is {}",
                    fmt(&n, want),
                    fmt(&n, max_free.get(&n))
                ));
            }
        }
        if !reasons.is_empty() {
            return reasons.join("; ");
        }
        if let Some(f) = self.frameworks.get(fid) {
            if f.conn.is_none() {
                return "its framework is disconnected".into();
            }
        }
        // What else holds offers back: constraints, filters, suppression, quotas.
        let role = self
            .allocator
            .framework_roles(fid)
            .and_then(|r| r.into_iter().next())
            .unwrap_or_else(|| "*".into());
        let why = self.allocator.explain_request(fid, &role, &ask, now);
        if !why.causes.is_empty() {
            return why
                .causes
                .iter()
                .map(|c| match c {
                    // Times relative to now read better than epoch milliseconds.
                    agora_allocator::WaitCause::Filtered { agents, of_agents, until_ms, .. } => format!(
                        "the framework declined {agents} of {of_agents} agents that could serve it, for {:.1} s more (REVIVE clears this)",
                        until_ms.saturating_sub(now) as f64 / 1000.0
                    ),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("; ");
        }
        "resources are free; waiting for the next offer".into()
    }

    /// The agents known: registered ones (connected or not), then those removed
    /// as unreachable that may still return.
    pub fn agents(&self, now: u64) -> Vec<v1::AgentSummary> {
        let removed = self
            .registry
            .agents
            .iter()
            .filter(|(id, e)| e.unreachable && !e.gone && !self.agents.contains_key(*id))
            .map(|(id, e)| v1::AgentSummary {
                agent_id: id.clone(),
                hostname: e.hostname.clone(),
                unreachable: true,
                ..Default::default()
            });
        self.agents
            .iter()
            .map(|(id, a)| {
                let free = self.allocator.agent_free(id).unwrap_or_default();
                v1::AgentSummary {
                    agent_id: id.clone(),
                    hostname: a.hostname.clone(),
                    total: a.total.to_proto(),
                    // By amount: dynamic reservations re-tag part of `total`.
                    allocated: a
                        .total
                        .unreserved()
                        .checked_sub(&free.unreserved())
                        .unwrap_or_default()
                        .to_proto(),
                    attributes: a.attributes.clone(),
                    http_address: a.http_address.clone(),
                    connected: a.conn.is_some(),
                    disconnected_ms: if a.conn.is_some() {
                        0
                    } else {
                        now.saturating_sub(a.last_seen_ms)
                    },
                    unreachable: false,
                    reserved: self.agent_reserved(id, &a.total).to_proto(),
                    reserved_free: reserved_part(&free).to_proto(),
                }
            })
            .chain(removed)
            .collect()
    }

    /// An agent's reservations now: the static ones in what it advertises, and the
    /// dynamic ones (RESERVE), each amount tagged with its role.
    fn agent_reserved(&self, agent_id: &str, total: &Resources) -> Resources {
        let mut out = reserved_part(total);
        if let Some(d) = self.allocator.dynamic_reservations(agent_id) {
            out.add(&reserved_part(&d));
        }
        out
    }

    pub fn has_artifact(&self, sha: &str) -> bool {
        self.artifacts.contains(sha)
    }
}

/// The reserved amounts of `r` (those tagged with a role).
fn reserved_part(r: &Resources) -> Resources {
    let mut out = Resources::new();
    for role in r.roles() {
        out.add(&r.of_role(&role));
    }
    out
}

impl MasterCore {
    /// The role of a task of framework `fid` holding `res`, when no offer says it: its
    /// first reservation role, else its framework's first role, else `*`.
    fn task_role(&self, fid: &str, res: &Resources) -> String {
        res.roles()
            .into_iter()
            .find(|r| r != agora_allocator::DEFAULT_ROLE)
            .or_else(|| {
                self.registry
                    .frameworks
                    .get(fid)
                    .and_then(|f| f.roles.first().cloned())
            })
            .unwrap_or_else(|| agora_allocator::DEFAULT_ROLE.to_string())
    }

    /// Whether `principal` may do `action` to `object` under the registry's policy
    /// (none set: everything is allowed).
    pub fn authorize(
        &self,
        principal: &str,
        action: acl::Action,
        object: &str,
    ) -> Result<(), acl::Denied> {
        match &self.registry.policy {
            None => Ok(()),
            Some(_) if principal == acl::SYSTEM_PRINCIPAL => Ok(()),
            Some(p) => p.check(principal, action, object),
        }
    }

    /// The role of a task the master knows (live, unreachable or finished).
    pub fn role_of_task(&self, task_id: &str) -> Option<String> {
        self.tasks
            .iter()
            .chain(self.unreachable.iter())
            .find(|((_, t), _)| t == task_id)
            .map(|(_, r)| r.role.clone())
            .or_else(|| {
                self.completed
                    .iter()
                    .rev()
                    .find(|r| r.info.task_id == task_id)
                    .map(|r| r.role.clone())
            })
            .or_else(|| {
                self.frameworks.iter().find_map(|(fid, f)| {
                    f.pending
                        .iter()
                        .any(|p| p.task_id == task_id)
                        .then(|| self.task_role(fid, &Resources::new()))
                })
            })
    }
}

impl TaskRecord {
    fn status(&self) -> TaskState {
        self.status.state()
    }
}

/// A sandbox-relative path must stay inside the sandbox.
fn check_rel_path(p: &str) -> Result<(), String> {
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.contains('\0')
        || p.split('/').any(|c| c == "..")
        || p.len() > 4096;
    if bad {
        Err(format!(
            "sandbox path `{p}` must be relative and must not contain `..`"
        ))
    } else {
        Ok(())
    }
}
