//! The scheduler API beyond SUBSCRIBE: ACCEPT with its operations (LAUNCH,
//! LAUNCH_GROUP, RESERVE, UNRESERVE), per-role REVIVE and SUPPRESS, SHUTDOWN, MESSAGE
//! in both directions, UPDATE_FRAMEWORK, and the scheduler-facing timers (HEARTBEAT
//! events, offer timeouts) and FAILURE events.
//!
//! Every call refused here is answered with an ERROR event that names the object and
//! what was wrong with it; tasks that will never start also get an UPDATE, so a
//! framework never waits on them.

use std::collections::{BTreeSet, HashSet};

use agora_proto::v1::{
    self, event, master_to_agent, operation, Event, MasterToAgent, Reason, RunTask, TaskInfo,
    TaskState,
};
use agora_proto::Resources;

use super::{status, ConnId, MasterCore, Output, TaskRecord};
use crate::registry::{RegistryOp, Reserved, MAX_STATE_KEY, MAX_STATE_KEYS, MAX_STATE_VALUE};

/// One operation of an ACCEPT, decoded.
enum Op {
    Launch(Vec<TaskInfo>),
    Group(v1::LaunchGroup),
    Reserve(Vec<v1::Resource>),
    Unreserve(Vec<v1::Resource>),
}

impl Op {
    fn tasks(&self) -> &[TaskInfo] {
        match self {
            Op::Launch(t) => t,
            Op::Group(g) => &g.tasks,
            Op::Reserve(_) | Op::Unreserve(_) => &[],
        }
    }
}

/// What an ACCEPT works on: the pooled resources of its offers.
struct AcceptCtx {
    fid: String,
    conn: ConnId,
    agent_id: String,
    agent_conn: Option<ConnId>,
    role: String,
    pool: Resources,
}

/// The executor a task runs in on its agent: the one it names, else the default one
/// of its kind (the agent's rule, see `agora_proto::default_executor_id`).
pub(super) fn executor_of(t: &TaskInfo) -> String {
    if !t.executor_id.is_empty() {
        t.executor_id.clone()
    } else {
        agora_proto::default_executor_id(t.command.is_some()).to_string()
    }
}

impl MasterCore {
    fn event(&mut self, conn: ConnId, e: event::Event) {
        self.out
            .push(Output::ToScheduler(conn, Event { event: Some(e) }));
    }

    // ---- ACCEPT ------------------------------------------------------------------

    pub(super) fn accept(&mut self, conn: ConnId, fid: &str, a: v1::Accept, now: u64) {
        let mut ops = Vec::with_capacity(a.operations.len());
        for (i, op) in a.operations.into_iter().enumerate() {
            match op.operation {
                Some(operation::Operation::Launch(l)) => ops.push(Op::Launch(l.tasks)),
                Some(operation::Operation::LaunchGroup(g)) => ops.push(Op::Group(g)),
                Some(operation::Operation::Reserve(r)) => ops.push(Op::Reserve(r.resources)),
                Some(operation::Operation::Unreserve(u)) => ops.push(Op::Unreserve(u.resources)),
                None => self.error(
                    conn,
                    format!(
                        "accept: operation {} is empty (a newer kind?); it was skipped",
                        i + 1
                    ),
                ),
            }
        }
        let all_tasks: Vec<TaskInfo> = ops.iter().flat_map(|o| o.tasks().to_vec()).collect();
        // Every offer must be ours, outstanding, on one agent and in one role.
        let mut first: Option<(String, String)> = None; // (agent, role)
        let mut seen = HashSet::new();
        for oid in &a.offer_ids {
            let problem = match self.offers.get(oid) {
                // Naming one offer twice would make us take it twice below.
                _ if !seen.insert(oid) => Some(format!("offer {oid} is named twice")),
                None if self.cfg.offer_timeout_ms > 0 => Some(format!(
                    "offer {oid} is unknown, already used or rescinded (offers time out after {:.1} s)",
                    self.cfg.offer_timeout_ms as f64 / 1000.0
                )),
                None => Some(format!("offer {oid} is unknown, already used or rescinded")),
                Some(o) if o.framework_id != fid => {
                    Some(format!("offer {oid} belongs to another framework"))
                }
                Some(o) => match &first {
                    Some((ag, _)) if *ag != o.agent_id => Some(format!(
                        "offers from different agents cannot be combined (offer {oid} is for agent {}, an earlier one for {ag})",
                        o.agent_id
                    )),
                    Some((_, role)) if *role != o.role => Some(format!(
                        "offers in different roles cannot be combined (offer {oid} is for role `{}`, an earlier one for `{role}`)",
                        o.role
                    )),
                    Some(_) => None,
                    None => {
                        first = Some((o.agent_id.clone(), o.role.clone()));
                        None
                    }
                },
            };
            if let Some(p) = problem {
                // The framework counts every offer it named as used: the valid ones go
                // back (as in Mesos) instead of staying outstanding with nobody to
                // answer them.
                for oid in &a.offer_ids {
                    if self.offers.get(oid).is_some_and(|o| o.framework_id == fid) {
                        let o = self.offers.remove(oid).expect("present");
                        self.allocator.recover(fid, &o.agent_id, &o.resources, None);
                    }
                }
                self.refuse_accept(conn, fid, &all_tasks, &p);
                return;
            }
        }
        let Some((agent_id, role)) = first else {
            self.refuse_accept(conn, fid, &all_tasks, "no offers named");
            return;
        };
        let mut pool = Resources::new();
        for oid in &a.offer_ids {
            let o = self.offers.remove(oid).expect("checked above");
            pool.add(&o.resources);
        }
        let agent_conn = self.agents.get(&agent_id).and_then(|ag| ag.conn);
        let mut cx = AcceptCtx {
            fid: fid.to_string(),
            conn,
            agent_id,
            agent_conn,
            role,
            pool,
        };
        for op in ops {
            match op {
                Op::Launch(tasks) => {
                    for t in tasks {
                        self.launch_one(&mut cx, t);
                    }
                }
                Op::Group(g) => self.launch_group(&mut cx, g),
                Op::Reserve(r) => {
                    if let Err(e) = self.reserve_op(&mut cx, &r) {
                        self.error(conn, format!("accept: RESERVE refused: {e}"));
                    }
                }
                Op::Unreserve(r) => {
                    if let Err(e) = self.unreserve_op(&mut cx, &r) {
                        self.error(conn, format!("accept: UNRESERVE refused: {e}"));
                    }
                }
            }
        }
        // What the operations did not use goes back, filtered for a while (Mesos
        // semantics: an accept declines the rest).
        if !cx.pool.is_empty() {
            let refuse = self.refuse_ms(a.filters.as_ref());
            self.allocator
                .recover_role(fid, &cx.role, &cx.agent_id, &cx.pool, Some(now + refuse));
        }
    }

    /// Checks one task against the framework's rules and the accept's pool; returns
    /// what it takes.
    fn check_launch(&self, cx: &AcceptCtx, t: &TaskInfo) -> Result<Resources, String> {
        if !t.agent_id.is_empty() && t.agent_id != cx.agent_id {
            return Err(format!(
                "it names agent {}, but the offers are for agent {}",
                t.agent_id, cx.agent_id
            ));
        }
        let res = self.validate_task(&cx.fid, t)?;
        self.authorize_launch(cx, t).map_err(|d| d.to_string())?;
        if let Some(r) = res.roles().into_iter().find(|r| *r != cx.role) {
            return Err(format!(
                "it asks for resources reserved for role `{r}`, but the offers are for role `{}`",
                cx.role
            ));
        }
        if !cx.pool.contains(&res) {
            return Err(format!(
                "task asks for {res} but the offers hold only {} (after earlier operations in this accept)",
                cx.pool
            ));
        }
        Ok(res)
    }

    /// The access policy on a launch, judged as the framework's principal: a native
    /// command as the OS user it runs as (its own, else its framework's, else
    /// `default`: the agent's --task-user), anything else in the offer's role.
    fn authorize_launch(&self, cx: &AcceptCtx, t: &TaskInfo) -> Result<(), crate::acl::Denied> {
        let Some(f) = self.frameworks.get(&cx.fid) else {
            return Ok(());
        };
        match &t.command {
            Some(cmd) => {
                let user = [cmd.user.as_str(), f.user.as_str()]
                    .into_iter()
                    .map(str::trim)
                    .find(|u| !u.is_empty())
                    .unwrap_or(DEFAULT_TASK_USER);
                self.authorize(&f.principal, crate::acl::Action::RunNativeTasks, user)
            }
            None => self.authorize(&f.principal, crate::acl::Action::RunWasmTasks, &cx.role),
        }
    }

    /// An invalid task of an accept: an ERROR naming it, and TASK_ERROR for it.
    fn task_refused(&mut self, cx: &AcceptCtx, task_id: &str, problem: &str) {
        self.error(cx.conn, format!("accept: task {task_id}: {problem}"));
        let st = status(
            task_id,
            &cx.agent_id,
            TaskState::TaskError,
            Reason::InvalidTask,
            problem,
            self.wall_ms,
        );
        self.send_update(&cx.fid, st);
    }

    fn launch_one(&mut self, cx: &mut AcceptCtx, mut t: TaskInfo) {
        match self.check_launch(cx, &t) {
            Ok(res) => {
                t.agent_id = cx.agent_id.clone();
                cx.pool.sub(&res);
                self.place_task(cx, t, res);
            }
            Err(e) => self.task_refused(cx, &t.task_id.clone(), &e),
        }
    }

    /// LAUNCH_GROUP: every task in one executor, all or none.
    fn launch_group(&mut self, cx: &mut AcceptCtx, g: v1::LaunchGroup) {
        let mut tasks = g.tasks;
        let problem = (|| {
            if tasks.is_empty() {
                return Err("the task group is empty".to_string());
            }
            let kinds: BTreeSet<bool> = tasks.iter().map(|t| t.command.is_some()).collect();
            if kinds.len() > 1 {
                return Err(
                    "a task group runs in one executor: its tasks must be all wasm modules or all commands"
                        .to_string(),
                );
            }
            let named: BTreeSet<&str> = tasks
                .iter()
                .map(|t| t.executor_id.as_str())
                .chain(std::iter::once(g.executor_id.as_str()))
                .filter(|e| !e.is_empty())
                .collect();
            if let Some(bad) = named.iter().find(|e| !crate::is_path_safe_id(e)) {
                return Err(format!(
                    "executor id `{bad}` is not valid: use 1-200 characters, no '/' and no leading '.'"
                ));
            }
            if named.len() > 1 {
                return Err(format!(
                    "a task group runs in one executor, but its tasks name several: {}",
                    named.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            let mut ids = HashSet::new();
            if let Some(dup) = tasks.iter().find(|t| !ids.insert(t.task_id.as_str())) {
                return Err(format!(
                    "task id {} appears twice in the group",
                    dup.task_id
                ));
            }
            let mut agents: BTreeSet<&str> = tasks
                .iter()
                .map(|t| t.agent_id.as_str())
                .filter(|a| !a.is_empty())
                .collect();
            agents.insert(cx.agent_id.as_str());
            if agents.len() > 1 {
                return Err(format!(
                    "a task group runs on one agent, but its tasks name agents {}",
                    agents.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            Ok(named.into_iter().next().map(str::to_string))
        })();
        let executor = match problem {
            Ok(e) => e,
            Err(e) => {
                self.group_refused(cx, &tasks, &e);
                return;
            }
        };
        let mut total = Resources::new();
        let mut each = Vec::with_capacity(tasks.len());
        let mut trial = AcceptCtx {
            fid: cx.fid.clone(),
            conn: cx.conn,
            agent_id: cx.agent_id.clone(),
            agent_conn: cx.agent_conn,
            role: cx.role.clone(),
            pool: cx.pool.clone(),
        };
        for t in &tasks {
            match self.check_launch(&trial, t) {
                Ok(res) => {
                    trial.pool.sub(&res);
                    total.add(&res);
                    each.push(res);
                }
                Err(e) => {
                    let e = format!("task {}: {e}", t.task_id);
                    self.group_refused(cx, &tasks, &e);
                    return;
                }
            }
        }
        cx.pool.sub(&total);
        for (mut t, res) in tasks.drain(..).zip(each) {
            t.agent_id = cx.agent_id.clone();
            if let Some(e) = &executor {
                t.executor_id = e.clone();
            }
            self.place_task(cx, t, res);
        }
    }

    fn group_refused(&mut self, cx: &AcceptCtx, tasks: &[TaskInfo], problem: &str) {
        let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
        self.error(
            cx.conn,
            format!(
                "accept: LAUNCH_GROUP of [{}] refused: {problem}",
                ids.join(", ")
            ),
        );
        for t in tasks {
            let st = status(
                &t.task_id,
                &cx.agent_id,
                TaskState::TaskError,
                Reason::InvalidTask,
                &format!("its task group was refused: {problem}"),
                self.wall_ms,
            );
            self.send_update(&cx.fid, st);
        }
    }

    /// Records a launched task and sends it to its agent.
    fn place_task(&mut self, cx: &AcceptCtx, mut task: TaskInfo, res: Resources) {
        // A command runs as the user it names, else as its framework's user; the agent
        // decides whether it allows that user (and uses its default when both are empty).
        if let Some(cmd) = task.command.as_mut().filter(|c| c.user.is_empty()) {
            if let Some(f) = self.frameworks.get(&cx.fid) {
                cmd.user = f.user.clone();
            }
        }
        let Some(ac) = cx.agent_conn else {
            // The resources stay in the pool's accounting: give them back.
            cx_recover(self, cx, &res);
            let st = status(
                &task.task_id,
                &cx.agent_id,
                TaskState::TaskLost,
                Reason::AgentDisconnected,
                "the agent disconnected before the task could be sent",
                self.wall_ms,
            );
            self.send_update(&cx.fid, st);
            return;
        };
        let key = (cx.fid.clone(), task.task_id.clone());
        let st = status(
            &task.task_id,
            &cx.agent_id,
            TaskState::TaskStaging,
            Reason::Unspecified,
            "",
            self.wall_ms,
        );
        self.tasks.insert(
            key.clone(),
            TaskRecord {
                role: cx.role.clone(),
                framework_id: cx.fid.clone(),
                agent_id: cx.agent_id.clone(),
                info: task.clone(),
                resources: res,
                status: st,
            },
        );
        if let Some(ag) = self.agents.get_mut(&cx.agent_id) {
            ag.tasks.insert(key);
        }
        if let Some(f) = self.frameworks.get_mut(&cx.fid) {
            f.pending.retain(|p| p.task_id != task.task_id);
        }
        self.out.push(Output::ToAgent(
            ac,
            MasterToAgent {
                msg: Some(master_to_agent::Msg::RunTask(RunTask {
                    framework_id: cx.fid.clone(),
                    task: Some(task),
                })),
            },
        ));
    }

    /// RESERVE: unreserved resources of the pool become reserved for the offer's role,
    /// and stay in the pool (so later operations of this accept can use them).
    fn reserve_op(&mut self, cx: &mut AcceptCtx, list: &[v1::Resource]) -> Result<(), String> {
        let asked = Resources::from_proto(list).map_err(|e| e.to_string())?;
        if asked.is_empty() {
            return Err("it names no resources".into());
        }
        if cx.role == agora_allocator::DEFAULT_ROLE {
            return Err("the offers are for the default role `*`, which cannot hold reservations; subscribe with a role of your own".into());
        }
        if let Some(r) = asked.roles().into_iter().find(|r| *r != cx.role) {
            return Err(format!(
                "it names role `{r}`, but the offers are for role `{}` (a framework reserves for the role of its offer)",
                cx.role
            ));
        }
        let plain = asked.unreserved();
        if !cx.pool.of_role("").contains(&plain) {
            return Err(format!(
                "{plain} is not among the unreserved resources of the offers ({})",
                cx.pool.of_role("")
            ));
        }
        // The resources are the framework's (in its offer): take them back, reserve
        // them, and hand them to the framework again, reserved.
        self.allocator
            .recover_role(&cx.fid, &cx.role, &cx.agent_id, &plain, None);
        if let Err(e) = self.allocator.reserve(&cx.agent_id, &cx.role, &plain) {
            self.allocator
                .track_used_role(&cx.fid, &cx.role, &cx.agent_id, &plain);
            return Err(e.to_string());
        }
        let tagged = plain.with_role(&cx.role);
        self.allocator
            .track_used_role(&cx.fid, &cx.role, &cx.agent_id, &tagged);
        cx.pool.sub(&plain);
        cx.pool.add(&tagged);
        tracing::info!(framework = %cx.fid, agent = %cx.agent_id, role = %cx.role, "reserved {tagged}");
        self.persist_reservations(&cx.agent_id);
        Ok(())
    }

    /// UNRESERVE: resources of the pool dynamically reserved for the offer's role go
    /// back to the unreserved pool (and stay in this accept's pool, unreserved).
    fn unreserve_op(&mut self, cx: &mut AcceptCtx, list: &[v1::Resource]) -> Result<(), String> {
        let asked = Resources::from_proto(list).map_err(|e| e.to_string())?;
        if asked.is_empty() {
            return Err("it names no resources".into());
        }
        if let Some(r) = asked.roles().into_iter().find(|r| *r != cx.role) {
            return Err(format!(
                "it names role `{r}`, but the offers are for role `{}`",
                cx.role
            ));
        }
        let plain = asked.unreserved();
        let tagged = plain.with_role(&cx.role);
        if !cx.pool.contains(&tagged) {
            return Err(format!(
                "{tagged} is not among the resources of the offers ({})",
                cx.pool
            ));
        }
        let dynamic = self
            .allocator
            .dynamic_reservations(&cx.agent_id)
            .unwrap_or_default();
        if !dynamic.contains(&tagged) {
            return Err(format!(
                "agent {} has {} dynamically reserved for `{}`, not {tagged}; static reservations (the agent's --resources) cannot be unreserved",
                cx.agent_id,
                dynamic.of_role(&cx.role),
                cx.role
            ));
        }
        self.allocator
            .recover_role(&cx.fid, &cx.role, &cx.agent_id, &tagged, None);
        if let Err(e) = self.allocator.unreserve(&cx.agent_id, &cx.role, &tagged) {
            self.allocator
                .track_used_role(&cx.fid, &cx.role, &cx.agent_id, &tagged);
            return Err(e.to_string());
        }
        self.allocator
            .track_used_role(&cx.fid, &cx.role, &cx.agent_id, &plain);
        cx.pool.sub(&tagged);
        cx.pool.add(&plain);
        tracing::info!(framework = %cx.fid, agent = %cx.agent_id, role = %cx.role, "unreserved {tagged}");
        self.persist_reservations(&cx.agent_id);
        Ok(())
    }

    /// Writes an agent's dynamic reservations to the registry.
    fn persist_reservations(&mut self, agent_id: &str) {
        let now = self
            .allocator
            .dynamic_reservations(agent_id)
            .unwrap_or_default();
        let resources: Vec<Reserved> = now
            .to_proto()
            .into_iter()
            .map(|r| Reserved {
                name: r.name,
                role: r.role,
                value: r.value,
            })
            .collect();
        self.persist(RegistryOp::SetReservations {
            agent_id: agent_id.to_string(),
            resources,
        });
    }

    /// Dynamic reservations of every registered agent (agent id -> resources tagged
    /// with their roles). Static ones are part of the agents' own resources.
    pub fn reservations(&self) -> std::collections::BTreeMap<String, Resources> {
        self.agents
            .keys()
            .filter_map(|id| {
                let r = self.allocator.dynamic_reservations(id)?;
                (!r.is_empty()).then(|| (id.clone(), r))
            })
            .collect()
    }

    // ---- REVIVE / SUPPRESS -------------------------------------------------------

    pub(super) fn revive_or_suppress(
        &mut self,
        conn: ConnId,
        fid: &str,
        role: &str,
        suppress: bool,
    ) {
        let role = role.trim();
        if role.is_empty() {
            self.allocator.suppress(fid, suppress);
            return;
        }
        if let Err(e) = self.allocator.suppress_role(fid, role, suppress) {
            let roles = self.allocator.framework_roles(fid).unwrap_or_default();
            let call = if suppress { "suppress" } else { "revive" };
            self.error(
                conn,
                format!(
                    "{call}: role `{role}` is not one of this framework's roles ({}): {e}",
                    roles.join(", ")
                ),
            );
        }
    }

    // ---- SHUTDOWN and MESSAGE ----------------------------------------------------

    /// The connection of the agent a SHUTDOWN or MESSAGE names, if the framework has
    /// an executor there.
    fn executor_agent(
        &self,
        fid: &str,
        agent_id: &str,
        executor_id: &str,
    ) -> Result<ConnId, String> {
        if executor_id.is_empty() {
            return Err("no executor id given".into());
        }
        let Some(agent) = self.agents.get(agent_id) else {
            return Err(format!(
                "agent {agent_id} is not registered (see `agora agents`)"
            ));
        };
        let runs_there = agent.tasks.iter().any(|key| {
            key.0 == fid
                && self
                    .tasks
                    .get(key)
                    .is_some_and(|t| executor_of(&t.info) == executor_id)
        });
        if !runs_there {
            return Err(format!(
                "this framework has no live task in executor {executor_id} on agent {agent_id}"
            ));
        }
        agent
            .conn
            .ok_or_else(|| format!("agent {agent_id} is disconnected; try again when it is back"))
    }

    pub(super) fn shutdown_executor(&mut self, conn: ConnId, fid: &str, s: v1::Shutdown) {
        match self.executor_agent(fid, &s.agent_id, &s.executor_id) {
            Ok(ac) => {
                tracing::info!(framework = %fid, executor = %s.executor_id, agent = %s.agent_id, "executor shutdown asked");
                self.out.push(Output::ToAgent(
                    ac,
                    MasterToAgent {
                        msg: Some(master_to_agent::Msg::ShutdownExecutor(
                            v1::ShutdownExecutor {
                                framework_id: fid.to_string(),
                                executor_id: s.executor_id,
                            },
                        )),
                    },
                ));
            }
            Err(e) => self.error(conn, format!("shutdown: {e}")),
        }
    }

    pub(super) fn framework_message(&mut self, conn: ConnId, fid: &str, m: v1::Message) {
        if m.data.len() > MAX_MESSAGE_BYTES {
            self.error(
                conn,
                format!(
                    "message: {} bytes is more than the {MAX_MESSAGE_BYTES} a message may carry; send bulk data as an artifact",
                    m.data.len()
                ),
            );
            return;
        }
        match self.executor_agent(fid, &m.agent_id, &m.executor_id) {
            Ok(ac) => self.out.push(Output::ToAgent(
                ac,
                MasterToAgent {
                    msg: Some(master_to_agent::Msg::FrameworkMessage(
                        v1::FrameworkToExecutor {
                            framework_id: fid.to_string(),
                            executor_id: m.executor_id,
                            data: m.data,
                        },
                    )),
                },
            )),
            Err(e) => self.error(conn, format!("message: {e}")),
        }
    }

    /// An executor's message for its framework (dropped if the framework is away:
    /// messages are best effort, as in Mesos).
    pub(super) fn executor_message(&mut self, agent_id: &str, m: v1::ExecutorToFramework) {
        if let Some(fc) = self.frameworks.get(&m.framework_id).and_then(|f| f.conn) {
            self.event(
                fc,
                event::Event::Message(v1::Message {
                    agent_id: agent_id.to_string(),
                    executor_id: m.executor_id,
                    data: m.data,
                }),
            );
        } else {
            tracing::debug!(framework = %m.framework_id, "executor message for a framework that is not connected; dropped");
        }
    }

    /// An executor process ended: FAILURE to its framework.
    pub(super) fn executor_exited(&mut self, agent_id: &str, x: v1::ExecutorExited) {
        if let Some(fc) = self.frameworks.get(&x.framework_id).and_then(|f| f.conn) {
            self.event(
                fc,
                event::Event::Failure(v1::Failure {
                    agent_id: agent_id.to_string(),
                    message: format!(
                        "executor {} on agent {agent_id}: {}",
                        x.executor_id, x.message
                    ),
                    executor_id: x.executor_id,
                    status: x.status,
                }),
            );
        }
    }

    /// An agent was removed: FAILURE to every connected framework (as in Mesos).
    pub(super) fn agent_failure(&mut self, agent_id: &str, why: &str) {
        let conns: Vec<ConnId> = self.frameworks.values().filter_map(|f| f.conn).collect();
        for c in conns {
            self.event(
                c,
                event::Event::Failure(v1::Failure {
                    agent_id: agent_id.to_string(),
                    message: format!("agent {agent_id} was removed: {why}"),
                    executor_id: String::new(),
                    status: None,
                }),
            );
        }
    }

    // ---- UPDATE_FRAMEWORK ----------------------------------------------------------

    pub(super) fn update_framework(&mut self, conn: ConnId, fid: &str, u: v1::UpdateFramework) {
        let Some(info) = u.framework else {
            self.error(conn, "update_framework: no FrameworkInfo given".into());
            return;
        };
        if !info.framework_id.is_empty() && info.framework_id != fid {
            self.error(
                conn,
                format!(
                    "update_framework: framework id {} is not this framework's ({fid})",
                    info.framework_id
                ),
            );
            return;
        }
        let roles = match self.framework_roles_of(&info) {
            Ok(r) => r,
            Err(e) => {
                self.error(conn, format!("update_framework: {e}"));
                return;
            }
        };
        let mut constraints = Vec::new();
        for text in &info.offer_constraints {
            match agora_allocator::Constraint::parse(text) {
                Ok(c) => constraints.push(c),
                Err(e) => {
                    self.error(conn, format!("update_framework: {e}"));
                    return;
                }
            }
        }
        let failover_ms = self.failover_ms_of(&info);
        let old_roles = self.allocator.framework_roles(fid).unwrap_or_default();
        // Offers in roles the framework leaves are taken back.
        let left: Vec<String> = self
            .offers
            .iter()
            .filter(|(_, o)| o.framework_id == fid && !roles.contains(&o.role))
            .map(|(k, _)| k.clone())
            .collect();
        for oid in left {
            self.rescind(&oid);
        }
        self.allocator.add_framework_roles(fid, &roles);
        for role in &roles {
            if let Err(e) = self
                .allocator
                .set_constraints(fid, role, constraints.clone())
            {
                tracing::warn!(framework = %fid, "constraints not applied: {e}");
            }
        }
        if let Some(f) = self.frameworks.get_mut(fid) {
            if !info.name.is_empty() {
                f.name = info.name.clone();
            }
            f.failover_ms = failover_ms;
        }
        let name = self
            .frameworks
            .get(fid)
            .map(|f| f.name.clone())
            .unwrap_or_default();
        let mut entry =
            self.registry
                .frameworks
                .get(fid)
                .cloned()
                .unwrap_or(crate::registry::FrameworkEntry {
                    name: String::new(),
                    roles: Vec::new(),
                    failover_ms,
                    offer_constraints: Vec::new(),
                    partition_aware: false,
                    principal: String::new(),
                });
        entry.name = name;
        entry.roles = roles.clone();
        entry.failover_ms = failover_ms;
        entry.offer_constraints = info.offer_constraints.clone();
        self.persist(RegistryOp::PutFramework {
            framework_id: fid.to_string(),
            entry,
        });
        tracing::info!(framework = %fid, ?old_roles, ?roles, "framework updated");
    }

    /// A FrameworkInfo's roles, checked (none means `*`).
    pub(super) fn framework_roles_of(
        &self,
        info: &v1::FrameworkInfo,
    ) -> Result<Vec<String>, String> {
        let mut roles: Vec<String> = Vec::new();
        for r in info.roles.iter().map(|r| r.trim().to_string()) {
            if r != agora_allocator::DEFAULT_ROLE {
                agora_allocator::validate_role(&r).map_err(|why| format!("role `{r}`: {why}"))?;
            }
            if !roles.contains(&r) {
                roles.push(r);
            }
        }
        if roles.is_empty() {
            roles.push(agora_allocator::DEFAULT_ROLE.into());
        }
        Ok(roles)
    }

    pub(super) fn failover_ms_of(&self, info: &v1::FrameworkInfo) -> u64 {
        if info.failover_timeout_seconds > 0.0 && info.failover_timeout_seconds.is_finite() {
            (info.failover_timeout_seconds * 1000.0).min(365.0 * 86_400_000.0) as u64
        } else {
            self.cfg.default_failover_ms
        }
    }

    // ---- timers ------------------------------------------------------------------

    /// HEARTBEAT events every `framework_heartbeat_ms`, and offers past
    /// `offer_timeout_ms` rescinded.
    pub(super) fn scheduler_timers(&mut self, now: u64) {
        let every = self.cfg.framework_heartbeat_ms;
        if every > 0 {
            let due: Vec<(String, ConnId)> = self
                .frameworks
                .iter()
                .filter_map(|(id, f)| f.conn.map(|c| (id.clone(), c)))
                .filter(|(id, _)| {
                    self.heartbeats
                        .get(id)
                        .is_none_or(|t| now.saturating_sub(*t) >= every)
                })
                .collect();
            for (id, c) in due {
                self.heartbeats.insert(id, now);
                self.event(c, event::Event::Heartbeat(v1::Heartbeat {}));
            }
        }
        let timeout = self.cfg.offer_timeout_ms;
        if timeout > 0 {
            let expired: Vec<String> = self
                .offers
                .iter()
                .filter(|(_, o)| now.saturating_sub(o.created_ms) >= timeout)
                .map(|(k, _)| k.clone())
                .collect();
            for oid in expired {
                tracing::info!(offer = %oid, "offer timed out; rescinding it");
                self.rescind(&oid);
            }
        }
    }
}

/// Largest MESSAGE payload relayed (bulk data goes through the artifact store).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Gives resources taken from an accept's pool back to the allocator (a task that
/// could not be sent).
/// The user a native task is judged as when neither it nor its framework names one:
/// the agent's `--task-user` decides who that is.
pub const DEFAULT_TASK_USER: &str = "default";

fn cx_recover(core: &mut MasterCore, cx: &AcceptCtx, res: &Resources) {
    core.allocator
        .recover_role(&cx.fid, &cx.role, &cx.agent_id, res, None);
}

// ---- framework state (SET_STATE) ---------------------------------------------

impl MasterCore {
    /// SET_STATE: checked against the bounds, then one registry op; STATE_STORED
    /// follows it out (the shell sends it after the commit), an ERROR naming the
    /// bound otherwise.
    pub(super) fn set_state(&mut self, conn: ConnId, fid: &str, st: v1::SetState) {
        let refuse = |core: &mut MasterCore, message: String| {
            core.out.push(Output::ToScheduler(
                conn,
                Event {
                    event: Some(event::Event::Error(v1::Error {
                        message: format!("set_state {:?}: {message}", truncated(&st.key)),
                        request_id: st.request_id,
                    })),
                },
            ));
        };
        if st.key.is_empty() || st.key.len() > MAX_STATE_KEY {
            return refuse(
                self,
                format!(
                    "a key must have 1 to {MAX_STATE_KEY} bytes (this one has {})",
                    st.key.len()
                ),
            );
        }
        let state = self.registry.framework_state.get(fid);
        let op = match st.value {
            Some(value) => {
                if value.len() > MAX_STATE_VALUE {
                    return refuse(
                        self,
                        format!(
                            "a value may have at most {MAX_STATE_VALUE} bytes (256 KiB; this one has {})",
                            value.len()
                        ),
                    );
                }
                let keys = state.map_or(0, |s| s.len());
                let new = state.is_none_or(|s| !s.contains_key(&st.key));
                if new && keys >= MAX_STATE_KEYS {
                    return refuse(
                        self,
                        format!(
                            "a framework may keep at most {MAX_STATE_KEYS} keys (it has {keys}); delete some first"
                        ),
                    );
                }
                RegistryOp::PutFrameworkState {
                    framework_id: fid.to_string(),
                    key: st.key.clone(),
                    value,
                }
            }
            None => RegistryOp::RemoveFrameworkState {
                framework_id: fid.to_string(),
                key: st.key.clone(),
            },
        };
        let changes = match &op {
            RegistryOp::PutFrameworkState { key, value, .. } => {
                state.and_then(|s| s.get(key)) != Some(value)
            }
            _ => state.is_some_and(|s| s.contains_key(&st.key)),
        };
        if changes {
            self.persist(op);
        }
        self.state_seq += 1;
        self.out.push(Output::ToScheduler(
            conn,
            Event {
                event: Some(event::Event::StateStored(v1::StateStored {
                    key: st.key,
                    seq: self.state_seq,
                    request_id: st.request_id,
                })),
            },
        ));
    }

    /// A framework's state records, for SUBSCRIBED.
    pub(super) fn framework_state_of(&self, fid: &str) -> Vec<v1::StateEntry> {
        self.registry
            .framework_state
            .get(fid)
            .map(|s| {
                s.iter()
                    .map(|(key, value)| v1::StateEntry {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A key as an error message quotes it (keys may be long).
fn truncated(key: &str) -> &str {
    match key.char_indices().nth(64) {
        Some((i, _)) => &key[..i],
        None => key,
    }
}
