//! The master core fed agents, frameworks and operators made of fuzz bytes.
//!
//! Every run starts from the same live cluster, built in code: one agent
//! registered (8 cpus, 16 GiB), one module stored, and one framework subscribed in
//! role `*`, so that its first offer is out. Then each op of the input is one of:
//! - raw: an `AgentHello`, `AgentToMaster`, `SchedulerHello` or `Call` decoded from
//!   the fuzz bytes (skipped when it does not decode), on one of three agent and
//!   three scheduler connections; closing a connection; an operator request; an
//!   artifact stored; time passing (the wall clock may also jump, backwards too);
//! - built from what the core said: subscribe (again), register an agent (again,
//!   with the tasks it runs), accept an offer it made with launches and
//!   reservations, decline one, a status update of a task it launched, acknowledge
//!   an update it relayed, kill, reconcile and the other calls.
//!
//! After every input [`Master::check`] holds the core to what it promises.

use std::collections::{BTreeMap, BTreeSet};

use agora_master_core::{ConnId, CoreConfig, Input, MasterCore, Now, OperatorOp, Output};
use agora_proto::v1::{
    self, agent_to_master, call, event, master_to_agent, operation, AgentHello, AgentToMaster,
    Call, FrameworkInfo, SchedulerHello, TaskInfo, TaskState, TaskStatus,
};
use agora_proto::Resources;

use crate::{Reader, Writer};

/// Connection ids of the agents' and the schedulers' slots.
const AGENT_CONNS: [ConnId; 3] = [1, 2, 3];
const SCHED_CONNS: [ConnId; 3] = [101, 102, 103];
const ROLES: [&str; 4] = ["*", "dev", "dev/a", "ops"];
const START_MS: u64 = 1_000_000;

/// The ops an input is made of (the first byte of each, modulo their number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    RawAgentHello = 0,
    RawAgentMessage,
    AgentClosed,
    RawSchedulerHello,
    RawCall,
    SchedulerClosed,
    Tick,
    Operator,
    ArtifactStored,
    Register,
    Subscribe,
    Accept,
    Decline,
    StatusUpdate,
    Acknowledge,
    Kill,
    OtherCall,
    ExecutorEvent,
}

const OPS: u8 = Op::ExecutorEvent as u8 + 1;

pub struct Master {
    pub core: MasterCore,
    now: u64,
    /// Wall clock minus monotonic clock (the wall clock may jump).
    wall_offset: i64,
    /// Open connections (told to the core with a hello, not yet closed either way).
    open_agents: BTreeSet<ConnId>,
    open_scheds: BTreeSet<ConnId>,
    /// What each slot was last told: its agent id, its framework id.
    agent_ids: BTreeMap<ConnId, String>,
    framework_ids: BTreeMap<ConnId, String>,
    /// Offers made and not yet answered, rescinded or lost with their connection.
    offers: BTreeMap<String, (ConnId, v1::Offer)>,
    /// Tasks sent to agents: (agent conn, framework id, task).
    tasks: Vec<(ConnId, String, TaskInfo)>,
    /// Updates relayed to frameworks with a uuid: (scheduler conn, status).
    updates: Vec<(ConnId, TaskStatus)>,
    /// Agents whose last hello reported more running tasks than their resources
    /// hold: the master takes an agent's report as the truth, so they are not
    /// checked for fit.
    overbooked_by_report: BTreeSet<String>,
    /// Updates with a uuid relayed so far.
    relayed: usize,
    next_task: u64,
    next_uuid: u64,
    next_request: u64,
}

impl Default for Master {
    fn default() -> Self {
        Self::new()
    }
}

impl Master {
    /// A core with one agent registered and one framework subscribed.
    pub fn new() -> Self {
        let cfg = CoreConfig {
            offer_timeout_ms: 30_000,
            agent_reregister_ms: 5_000,
            ..CoreConfig::default()
        };
        let mut m = Master {
            core: MasterCore::new(cfg),
            now: START_MS,
            wall_offset: 1_700_000_000_000 - START_MS as i64,
            open_agents: BTreeSet::new(),
            open_scheds: BTreeSet::new(),
            agent_ids: BTreeMap::new(),
            framework_ids: BTreeMap::new(),
            offers: BTreeMap::new(),
            tasks: Vec::new(),
            updates: Vec::new(),
            overbooked_by_report: BTreeSet::new(),
            relayed: 0,
            next_task: 0,
            next_uuid: 0,
            next_request: 0,
        };
        m.feed(Input::ArtifactStored {
            sha256: agora_proto::sha256_hex(b"module"),
        });
        m.register(AGENT_CONNS[0], 8_000, 16 << 30, false);
        m.subscribe(SCHED_CONNS[0], 0, false, false);
        m
    }

    /// Plays an input to its end.
    pub fn run(data: &[u8]) {
        let mut m = Master::new();
        let mut r = Reader::new(data);
        // Bounded by the input: every op consumes at least one byte.
        while m.step(&mut r).is_some() {}
    }

    fn time(&self) -> Now {
        Now {
            mono_ms: self.now,
            wall_ms: self.now.saturating_add_signed(self.wall_offset),
        }
    }

    pub fn feed(&mut self, input: Input) {
        let mut overbooked = None;
        let operator = match &input {
            Input::AgentHello { conn, hello } => {
                self.open_agents.insert(*conn);
                let mut reported = Resources::new();
                for t in &hello.tasks {
                    let live = t.status.as_ref().is_some_and(|s| !s.state().is_terminal());
                    if let (true, Some(info)) = (live, &t.task) {
                        if let Ok(r) = Resources::from_proto(&info.resources) {
                            reported.add(&r.unreserved());
                        }
                    }
                }
                let total = Resources::from_proto(&hello.resources).unwrap_or_default();
                overbooked = Some(!total.unreserved().contains(&reported));
                None
            }
            Input::SchedulerHello { conn, .. } => {
                self.open_scheds.insert(*conn);
                None
            }
            Input::AgentClosed { conn } => {
                self.open_agents.remove(conn);
                None
            }
            Input::SchedulerClosed { conn } => {
                self.open_scheds.remove(conn);
                self.offers.retain(|_, (c, _)| c != conn);
                None
            }
            Input::Operator { request, .. } => Some(*request),
            _ => None,
        };
        if crate::tracing() {
            eprintln!("[{}] in: {input:?}", self.now);
        }
        let out = self.core.handle(input, self.time());
        if crate::tracing() {
            for o in &out {
                eprintln!("    out: {o:?}");
            }
        }
        let mut answered = 0;
        for o in out {
            match o {
                Output::ToAgent(conn, msg) => {
                    assert!(
                        self.open_agents.contains(&conn),
                        "message to agent connection {conn}, which is not open: {msg:?}"
                    );
                    match msg.msg {
                        Some(master_to_agent::Msg::Registered(r)) => {
                            if overbooked == Some(true) {
                                self.overbooked_by_report.insert(r.agent_id.clone());
                            } else {
                                self.overbooked_by_report.remove(&r.agent_id);
                            }
                            self.agent_ids.insert(conn, r.agent_id);
                        }
                        Some(master_to_agent::Msg::RunTask(rt)) => {
                            if let Some(t) = rt.task {
                                if self.tasks.len() < 64 {
                                    self.tasks.push((conn, rt.framework_id, t));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Output::ToScheduler(conn, ev) => {
                    assert!(
                        self.open_scheds.contains(&conn),
                        "event to scheduler connection {conn}, which is not open: {ev:?}"
                    );
                    match ev.event {
                        Some(event::Event::Subscribed(s)) => {
                            self.framework_ids.insert(conn, s.framework_id);
                        }
                        Some(event::Event::Offers(os)) => {
                            for o in os.offers {
                                assert!(
                                    !self.offers.contains_key(&o.offer_id),
                                    "offer id {} made twice",
                                    o.offer_id
                                );
                                self.offers.insert(o.offer_id.clone(), (conn, o));
                            }
                        }
                        Some(event::Event::Rescind(r)) => {
                            self.offers.remove(&r.offer_id);
                        }
                        Some(event::Event::Update(u)) => {
                            if let Some(s) = u.status {
                                if !s.uuid.is_empty() {
                                    self.relayed += 1;
                                    if self.updates.len() < 64 {
                                        self.updates.push((conn, s));
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Output::CloseAgent(conn, _) => {
                    self.open_agents.remove(&conn);
                }
                Output::CloseScheduler(conn, _) => {
                    self.open_scheds.remove(&conn);
                    self.offers.retain(|_, (c, _)| *c != conn);
                }
                Output::OperatorDone { request, .. } => {
                    assert_eq!(Some(request), operator, "an answer to another request");
                    answered += 1;
                }
            }
        }
        if operator.is_some() {
            assert_eq!(answered, 1, "an operator request is answered exactly once");
        }
        self.check();
    }

    /// What the core promises after every input:
    /// - its allocator never allocates more of an agent than the agent has;
    /// - the tasks it believes run on an agent fit in that agent (unless the agent
    ///   itself reported more than it has);
    /// - those tasks and the offers frameworks hold on it (the ones they may still
    ///   accept) fit in it too: nothing is offered twice.
    ///
    /// (The core's messages go to open connections only: checked in `feed`.)
    pub fn check(&mut self) {
        let live = self.core.list_tasks(false, self.now);
        for a in self.core.agents(self.now) {
            let total = Resources::from_proto(&a.total).expect("an agent's total");
            let alloc = Resources::from_proto(&a.allocated).expect("an agent's allocation");
            assert!(
                total.unreserved().contains(&alloc),
                "agent {}: {alloc} allocated of {total}",
                a.agent_id
            );
            if self.overbooked_by_report.contains(&a.agent_id) {
                continue;
            }
            let mut booked = Resources::new();
            for t in live.iter().filter(|t| t.agent_id == a.agent_id) {
                if t.state() == TaskState::TaskUnreachable {
                    continue;
                }
                booked.add(
                    &Resources::from_proto(&t.resources)
                        .expect("a task's resources")
                        .unreserved(),
                );
            }
            assert!(
                total.unreserved().contains(&booked),
                "agent {}: tasks of {booked} on {total}",
                a.agent_id
            );
            for (_, o) in self.offers.values() {
                if o.agent_id == a.agent_id {
                    booked.add(
                        &Resources::from_proto(&o.resources)
                            .expect("an offer's resources")
                            .unreserved(),
                    );
                }
            }
            assert!(
                total.unreserved().contains(&booked),
                "agent {}: tasks and offers [{}] hold {booked} of {total}",
                a.agent_id,
                self.offers.keys().cloned().collect::<Vec<_>>().join(" ")
            );
        }
    }

    fn register(&mut self, conn: ConnId, milli_cpus: i64, mem: i64, again: bool) {
        let agent_id = if again {
            self.agent_ids.get(&conn).cloned().unwrap_or_default()
        } else {
            String::new()
        };
        let tasks = self
            .tasks
            .iter()
            .filter(|(c, _, _)| *c == conn)
            .map(|(_, fid, t)| v1::RunningTask {
                framework_id: fid.clone(),
                task: Some(t.clone()),
                status: Some(TaskStatus {
                    task_id: t.task_id.clone(),
                    state: TaskState::TaskRunning as i32,
                    agent_id: agent_id.clone(),
                    ..Default::default()
                }),
            })
            .collect();
        let hello = AgentHello {
            agent_id,
            hostname: format!("host-{conn}"),
            resources: Resources::cpus_mem(milli_cpus, mem).to_proto(),
            attributes: vec![v1::Attribute {
                name: "zone".into(),
                value: format!("z{}", conn % 2),
            }],
            tasks: if again { tasks } else { Vec::new() },
            http_address: String::new(),
            registration_token: format!("token-{conn}"),
            completed: Vec::new(),
        };
        if self.open_agents.contains(&conn) {
            self.feed(Input::AgentClosed { conn });
        }
        self.feed(Input::AgentHello { conn, hello });
    }

    fn subscribe(&mut self, conn: ConnId, role: usize, again: bool, aware: bool) {
        let framework_id = if again {
            self.framework_ids.get(&conn).cloned().unwrap_or_default()
        } else {
            String::new()
        };
        let hello = SchedulerHello {
            framework: Some(FrameworkInfo {
                name: format!("fw-{conn}"),
                user: "fuzz".into(),
                roles: vec![ROLES[role % ROLES.len()].into()],
                framework_id,
                failover_timeout_seconds: 10.0,
                offer_constraints: if role >= ROLES.len() {
                    vec!["zone=z1".into()]
                } else {
                    Vec::new()
                },
                partition_aware: aware,
            }),
        };
        if self.open_scheds.contains(&conn) {
            self.feed(Input::SchedulerClosed { conn });
        }
        self.feed(Input::SchedulerHello {
            conn,
            hello,
            principal: String::new(),
        });
    }

    fn call(&mut self, conn: ConnId, c: call::Call) {
        self.feed(Input::SchedulerCall {
            conn,
            call: Call { call: Some(c) },
        });
    }

    fn nth_offer(&self, i: usize) -> Option<(ConnId, v1::Offer)> {
        if self.offers.is_empty() {
            return None;
        }
        self.offers.values().nth(i % self.offers.len()).cloned()
    }

    fn new_task(&mut self, agent_id: &str, res: Resources, native: bool) -> TaskInfo {
        self.next_task += 1;
        TaskInfo {
            task_id: format!("t{}", self.next_task),
            name: "fuzz".into(),
            agent_id: agent_id.into(),
            resources: res.to_proto(),
            module: (!native).then(|| v1::WasmModule {
                sha256: agora_proto::sha256_hex(b"module"),
                ..Default::default()
            }),
            command: native.then(|| v1::CommandInfo {
                value: "true".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// One op; `None` once the input is used up.
    pub fn step(&mut self, r: &mut Reader) -> Option<()> {
        let op = r.byte()? % OPS;
        let agent = |r: &mut Reader| r.pick(3).map(|i| AGENT_CONNS[i]);
        let sched = |r: &mut Reader| r.pick(3).map(|i| SCHED_CONNS[i]);
        match op {
            x if x == Op::RawAgentHello as u8 => {
                let conn = agent(r)?;
                if let Some(hello) = r.message::<AgentHello>()? {
                    if self.open_agents.contains(&conn) {
                        self.feed(Input::AgentClosed { conn });
                    }
                    self.feed(Input::AgentHello { conn, hello });
                }
            }
            x if x == Op::RawAgentMessage as u8 => {
                let conn = agent(r)?;
                if let Some(msg) = r.message::<AgentToMaster>()? {
                    if self.open_agents.contains(&conn) {
                        self.feed(Input::AgentMessage { conn, msg });
                    }
                }
            }
            x if x == Op::AgentClosed as u8 => {
                let conn = agent(r)?;
                if self.open_agents.contains(&conn) {
                    self.feed(Input::AgentClosed { conn });
                }
            }
            x if x == Op::RawSchedulerHello as u8 => {
                let conn = sched(r)?;
                if let Some(hello) = r.message::<SchedulerHello>()? {
                    if self.open_scheds.contains(&conn) {
                        self.feed(Input::SchedulerClosed { conn });
                    }
                    self.feed(Input::SchedulerHello {
                        conn,
                        hello,
                        principal: String::new(),
                    });
                }
            }
            x if x == Op::RawCall as u8 => {
                let conn = sched(r)?;
                if let Some(call) = r.message::<Call>()? {
                    if self.open_scheds.contains(&conn) {
                        self.forget_answered(&call);
                        self.feed(Input::SchedulerCall { conn, call });
                    }
                }
            }
            x if x == Op::SchedulerClosed as u8 => {
                let conn = sched(r)?;
                if self.open_scheds.contains(&conn) {
                    self.feed(Input::SchedulerClosed { conn });
                }
            }
            x if x == Op::Tick as u8 => {
                let how = r.byte()?;
                let n = u64::from(r.u16()?);
                self.now += match how % 4 {
                    0 => n,
                    1 => n * 100,
                    2 => n * 1_000,
                    _ => 0,
                };
                if how & 0x80 != 0 {
                    // The wall clock steps (NTP), either way.
                    self.wall_offset += i64::from(r.u16()? as i16) * 60_000;
                }
                self.feed(Input::Tick);
            }
            x if x == Op::Operator as u8 => {
                let op = match r.byte()? % 6 {
                    5 => {
                        // An agent the master knows (connected or not), or any id.
                        let ids: Vec<String> = self.agent_ids.values().cloned().collect();
                        let agent_id = match r.pick(ids.len() + 1)? {
                            i if i < ids.len() => ids[i].clone(),
                            _ => r.string()?,
                        };
                        OperatorOp::MarkAgentGone { agent_id }
                    }
                    0 => OperatorOp::Kill {
                        task_id: self.pick_task(r)?.2.task_id,
                    },
                    1 => OperatorOp::Kill {
                        task_id: r.string()?,
                    },
                    2 => OperatorOp::SetWeight {
                        role: r.string()?,
                        weight: f64::from_bits(r.u64()?),
                    },
                    3 => OperatorOp::SetWeight {
                        role: ROLES[r.pick(ROLES.len())?].into(),
                        weight: f64::from(r.byte()?) / 16.0,
                    },
                    _ => {
                        let role = ROLES[r.pick(ROLES.len())?].to_string();
                        let g = r.message::<v1::SetQuota>()?;
                        let Some(q) = g else { return Some(()) };
                        let (Ok(guarantee), Ok(limit)) = (
                            Resources::from_proto(&q.guarantee),
                            Resources::from_proto(&q.limit),
                        ) else {
                            return Some(());
                        };
                        OperatorOp::SetQuota {
                            role: if q.role.is_empty() { role } else { q.role },
                            guarantee,
                            limit,
                            force: q.force,
                        }
                    }
                };
                self.next_request += 1;
                let request = self.next_request;
                self.feed(Input::Operator { request, op });
            }
            x if x == Op::ArtifactStored as u8 => {
                let sha256 = if r.byte()? % 2 == 0 {
                    agora_proto::sha256_hex(b"module")
                } else {
                    r.string()?
                };
                self.feed(Input::ArtifactStored { sha256 });
            }
            x if x == Op::Register as u8 => {
                let conn = agent(r)?;
                let how = r.byte()?;
                let cpus = i64::from(how % 16 + 1) * 1_000;
                let mem = i64::from(r.byte()? % 32 + 1) << 30;
                self.register(conn, cpus, mem, how & 0x80 != 0);
            }
            x if x == Op::Subscribe as u8 => {
                let conn = sched(r)?;
                let how = r.byte()?;
                self.subscribe(conn, usize::from(how % 5), how & 0x80 != 0, how & 0x40 != 0);
            }
            x if x == Op::Accept as u8 => {
                let (conn, offer) = self.nth_offer(r.pick(256)?)?;
                let offered = Resources::from_proto(&offer.resources).ok()?;
                let mut ops = Vec::new();
                let n = r.byte()? % 4 + 1;
                for _ in 0..n {
                    let how = r.byte()?;
                    // A share of the offer, in 16ths (more than all of it too).
                    let share = i64::from(how % 20);
                    let res = Resources::cpus_mem(
                        offered.milli_cpus() * share / 16,
                        offered.mem_bytes() * share / 16,
                    );
                    let role = if offer.role == "*" { "" } else { &offer.role };
                    ops.push(match how / 20 % 5 {
                        0 | 1 => operation::Operation::Launch(v1::Launch {
                            tasks: vec![self.new_task(&offer.agent_id, res, how & 1 == 1)],
                        }),
                        2 => {
                            let a = self.new_task(&offer.agent_id, res.clone(), false);
                            let b = self.new_task(&offer.agent_id, res, false);
                            operation::Operation::LaunchGroup(v1::LaunchGroup {
                                executor_id: String::new(),
                                tasks: vec![a, b],
                            })
                        }
                        3 => operation::Operation::Reserve(v1::Reserve {
                            resources: res.with_role(role).to_proto(),
                        }),
                        _ => operation::Operation::Unreserve(v1::Unreserve {
                            resources: res.with_role(role).to_proto(),
                        }),
                    });
                }
                self.offers.remove(&offer.offer_id);
                self.call(
                    conn,
                    call::Call::Accept(v1::Accept {
                        offer_ids: vec![offer.offer_id],
                        filters: None,
                        operations: ops
                            .into_iter()
                            .map(|o| v1::Operation { operation: Some(o) })
                            .collect(),
                    }),
                );
            }
            x if x == Op::Decline as u8 => {
                let (conn, offer) = self.nth_offer(r.pick(256)?)?;
                let secs = r.byte()?;
                self.offers.remove(&offer.offer_id);
                self.call(
                    conn,
                    call::Call::Decline(v1::Decline {
                        offer_ids: vec![offer.offer_id],
                        filters: Some(v1::Filters {
                            refuse_seconds: (secs != 0).then(|| f64::from(secs) / 4.0),
                        }),
                    }),
                );
            }
            x if x == Op::StatusUpdate as u8 => {
                let (conn, fid, t) = self.pick_task(r)?;
                let state = i32::from(r.byte()? % 14);
                self.next_uuid += 1;
                let status = TaskStatus {
                    task_id: t.task_id,
                    state,
                    agent_id: self.agent_ids.get(&conn).cloned().unwrap_or_default(),
                    uuid: self.next_uuid.to_be_bytes().to_vec(),
                    timestamp_ms: self.time().wall_ms,
                    ..Default::default()
                };
                if self.open_agents.contains(&conn) {
                    self.feed(Input::AgentMessage {
                        conn,
                        msg: AgentToMaster {
                            msg: Some(agent_to_master::Msg::StatusUpdate(v1::StatusUpdate {
                                framework_id: fid,
                                status: Some(status),
                            })),
                        },
                    });
                }
            }
            x if x == Op::Acknowledge as u8 => {
                if self.updates.is_empty() {
                    return Some(());
                }
                let i = r.pick(256)? % self.updates.len();
                let (conn, s) = self.updates.remove(i);
                if self.open_scheds.contains(&conn) {
                    self.call(
                        conn,
                        call::Call::Acknowledge(v1::Acknowledge {
                            agent_id: s.agent_id,
                            task_id: s.task_id,
                            uuid: s.uuid,
                        }),
                    );
                }
            }
            x if x == Op::Kill as u8 => {
                let conn = sched(r)?;
                let (_, _, t) = self.pick_task(r)?;
                if self.open_scheds.contains(&conn) {
                    self.call(conn, call::Call::Kill(v1::Kill { task_id: t.task_id }));
                }
            }
            x if x == Op::OtherCall as u8 => {
                let conn = sched(r)?;
                if !self.open_scheds.contains(&conn) {
                    return Some(());
                }
                let role = ROLES[r.pick(ROLES.len())?].to_string();
                let agent_id = self.agent_ids.values().next().cloned().unwrap_or_default();
                let c = match r.byte()? % 9 {
                    0 => call::Call::Reconcile(v1::Reconcile {
                        task_ids: match self.pick_task(r) {
                            Some((_, _, t)) => vec![t.task_id, "nope".into()],
                            None => Vec::new(),
                        },
                    }),
                    1 => call::Call::Revive(v1::Revive { role }),
                    2 => call::Call::Suppress(v1::Suppress { role }),
                    3 => call::Call::Teardown(v1::Teardown {}),
                    4 => call::Call::Shutdown(v1::Shutdown {
                        executor_id: agora_proto::default_executor_id(false).into(),
                        agent_id,
                    }),
                    5 => call::Call::Message(v1::Message {
                        agent_id,
                        executor_id: agora_proto::default_executor_id(true).into(),
                        data: r.chunk()?.to_vec(),
                    }),
                    6 => call::Call::Pending(v1::Pending {
                        tasks: vec![v1::PendingTask {
                            task_id: "waiting".into(),
                            name: "w".into(),
                            resources: Resources::cpus_mem(i64::from(r.byte()?) * 100, 1 << 30)
                                .to_proto(),
                        }],
                    }),
                    7 => call::Call::SetState(v1::SetState {
                        key: r.string()?,
                        value: (r.byte()? % 2 == 0).then(|| vec![7; 10]),
                        request_id: 1,
                    }),
                    _ => call::Call::UpdateFramework(v1::UpdateFramework {
                        framework: Some(FrameworkInfo {
                            name: "renamed".into(),
                            roles: vec![role, "ops".into()],
                            framework_id: self
                                .framework_ids
                                .get(&conn)
                                .cloned()
                                .unwrap_or_default(),
                            ..Default::default()
                        }),
                    }),
                };
                self.call(conn, c);
            }
            _ => {
                // An executor's message for its framework, or its process ending.
                let (conn, fid, t) = self.pick_task(r)?;
                let executor_id = if t.executor_id.is_empty() {
                    agora_proto::default_executor_id(t.command.is_some()).to_string()
                } else {
                    t.executor_id
                };
                let msg = if r.byte()? % 2 == 0 {
                    agent_to_master::Msg::ExecutorMessage(v1::ExecutorToFramework {
                        framework_id: fid,
                        executor_id,
                        data: b"hi".to_vec(),
                    })
                } else {
                    agent_to_master::Msg::ExecutorExited(v1::ExecutorExited {
                        framework_id: fid,
                        executor_id,
                        message: "exited with code 1".into(),
                        status: Some(1),
                    })
                };
                if self.open_agents.contains(&conn) {
                    self.feed(Input::AgentMessage {
                        conn,
                        msg: AgentToMaster { msg: Some(msg) },
                    });
                }
            }
        }
        Some(())
    }

    /// How many tasks reached an agent, and how many updates a framework was sent.
    pub fn launched(&self) -> usize {
        self.tasks.len()
    }

    pub fn relayed(&self) -> usize {
        self.relayed
    }

    fn pick_task(&self, r: &mut Reader) -> Option<(ConnId, String, TaskInfo)> {
        let i = r.pick(256)?;
        if self.tasks.is_empty() {
            return None;
        }
        Some(self.tasks[i % self.tasks.len()].clone())
    }

    /// A raw ACCEPT or DECLINE answers the offers it names, whatever else it says.
    fn forget_answered(&mut self, c: &Call) {
        let ids = match &c.call {
            Some(call::Call::Accept(a)) => &a.offer_ids,
            Some(call::Call::Decline(d)) => &d.offer_ids,
            _ => return,
        };
        for id in ids {
            self.offers.remove(id);
        }
    }
}

/// Seed inputs for the `master_core` target: realistic flows in [`Master::step`]'s
/// format, named.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let op = |w: &mut Writer, o: Op| {
        w.byte(o as u8);
    };
    let tick = |w: &mut Writer, secs: u16| {
        w.byte(Op::Tick as u8).byte(2).u16(secs);
    };
    let mut seeds = Vec::new();

    // Launch, run, finish, acknowledge.
    let mut w = Writer::default();
    op(&mut w, Op::Accept);
    w.byte(0).byte(0).byte(4); // offer 0, one op: launch a quarter (wasm)
    op(&mut w, Op::StatusUpdate);
    w.byte(0).byte(TaskState::TaskRunning as u8);
    op(&mut w, Op::Acknowledge);
    w.byte(0);
    op(&mut w, Op::StatusUpdate);
    w.byte(0).byte(TaskState::TaskFinished as u8);
    op(&mut w, Op::Acknowledge);
    w.byte(0);
    tick(&mut w, 6);
    seeds.push(("launch-finish", w.bytes));

    // Two launches (one native), a kill, its KILLED, reconcile.
    let mut w = Writer::default();
    op(&mut w, Op::Accept);
    w.byte(0).byte(1).byte(2).byte(5); // launch wasm 2/16, launch native 5/16
    op(&mut w, Op::StatusUpdate);
    w.byte(1).byte(TaskState::TaskRunning as u8);
    op(&mut w, Op::Kill);
    w.byte(0).byte(1);
    op(&mut w, Op::StatusUpdate);
    w.byte(1).byte(TaskState::TaskKilled as u8);
    op(&mut w, Op::Acknowledge);
    w.byte(1);
    op(&mut w, Op::OtherCall);
    w.byte(0).byte(0).byte(0).byte(0);
    seeds.push(("launch-kill-reconcile", w.bytes));

    // Reserve then launch on the reservation, a second framework in role dev.
    let mut w = Writer::default();
    op(&mut w, Op::Subscribe);
    w.byte(1).byte(1);
    op(&mut w, Op::Accept);
    w.byte(0).byte(0).byte(60 + 8); // reserve half
    tick(&mut w, 6);
    op(&mut w, Op::Accept);
    w.byte(1).byte(0).byte(4); // launch a quarter of a later offer
    op(&mut w, Op::Accept);
    w.byte(0).byte(0).byte(80 + 4); // unreserve a quarter
    seeds.push(("reserve-launch-unreserve", w.bytes));

    // Decline with a filter, revive, suppress, accept again; an operator kill.
    let mut w = Writer::default();
    op(&mut w, Op::Decline);
    w.byte(0).byte(40);
    op(&mut w, Op::OtherCall);
    w.byte(0).byte(0).byte(1);
    op(&mut w, Op::Accept);
    w.byte(0).byte(0).byte(40 + 3); // launch group
    op(&mut w, Op::Operator);
    w.byte(0).byte(0);
    op(&mut w, Op::OtherCall);
    w.byte(0).byte(0).byte(2);
    tick(&mut w, 31);
    seeds.push(("decline-revive-group-operator-kill", w.bytes));

    // An agent lost and back: partition, re-register with its tasks, failover.
    let mut w = Writer::default();
    op(&mut w, Op::Accept);
    w.byte(0).byte(0).byte(3);
    op(&mut w, Op::AgentClosed);
    w.byte(0);
    tick(&mut w, 5);
    op(&mut w, Op::Register);
    w.byte(0).byte(0x80 | 7).byte(15);
    op(&mut w, Op::SchedulerClosed);
    w.byte(0);
    tick(&mut w, 3);
    op(&mut w, Op::Subscribe);
    w.byte(0).byte(0x80);
    op(&mut w, Op::Register);
    w.byte(1).byte(3).byte(3);
    tick(&mut w, 20);
    seeds.push(("agent-lost-reregister-failover", w.bytes));

    // Raw messages: a framework's own ACCEPT with an unknown offer, a quota, a weight,
    // an executor failure.
    let mut w = Writer::default();
    op(&mut w, Op::Accept);
    w.byte(0).byte(0).byte(2);
    op(&mut w, Op::RawCall);
    w.byte(0).message(&Call {
        call: Some(call::Call::Accept(v1::Accept {
            offer_ids: vec!["m-nope".into()],
            filters: Some(v1::Filters {
                refuse_seconds: Some(1.0),
            }),
            operations: vec![],
        })),
    });
    op(&mut w, Op::Operator);
    w.byte(4).byte(1).message(&v1::SetQuota {
        role: "dev".into(),
        guarantee: Resources::cpus_mem(1_000, 1 << 30).to_proto(),
        limit: Resources::cpus_mem(4_000, 4 << 30).to_proto(),
        force: true,
    });
    op(&mut w, Op::Operator);
    w.byte(3).byte(1).byte(32);
    op(&mut w, Op::ExecutorEvent);
    w.byte(0).byte(1);
    op(&mut w, Op::RawAgentMessage);
    w.byte(0).message(&AgentToMaster {
        msg: Some(agent_to_master::Msg::Ping(v1::Ping { seq: 3 })),
    });
    op(&mut w, Op::OtherCall);
    w.byte(0).byte(0).byte(7).chunk(b"key").byte(0);
    op(&mut w, Op::OtherCall);
    w.byte(0).byte(1).byte(8);
    seeds.push(("raw-calls-quota-weight-state", w.bytes));
    seeds
}
