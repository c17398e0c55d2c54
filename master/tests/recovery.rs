//! Recovery through the master's pure core: what a master records in its registry,
//! what a restarted master (a new core recovered from that record) does with it, and
//! what happens to tasks when an agent stops answering and comes back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

use agora_master::registry::{Registry, RegistryOp};
use agora_master_core::{ConnId, CoreConfig, Input, MasterCore, OperatorOp, Output};
use agora_proto::v1::{
    self, call, event, master_to_agent, AgentHello, Call, FrameworkInfo, RunningTask,
    SchedulerHello, TaskInfo, TaskState, TaskStatus,
};
use agora_proto::Resources;

const GIB: i64 = 1 << 30;
/// How long a restarted master waits for its agents (shorter than the agent timeout).
const REREGISTER_MS: u64 = 5_000;

/// A core and the registry its shell would have written.
struct Node {
    core: MasterCore,
    reg: Registry,
    now: u64,
}

impl Node {
    fn new() -> Self {
        Node {
            core: MasterCore::new(CoreConfig::default()),
            reg: Registry::default(),
            now: 1_000,
        }
    }

    /// A new master process started from `reg` at `now`.
    fn restarted(reg: &Registry, now: u64) -> Self {
        let mut core = MasterCore::new(CoreConfig {
            id_prefix: "m2".into(),
            agent_reregister_ms: REREGISTER_MS,
            ..CoreConfig::default()
        });
        core.handle(
            Input::Recover {
                registry: reg.clone(),
            },
            now,
        );
        Node {
            core,
            reg: reg.clone(),
            now,
        }
    }

    /// An operator's request, answered without writing the registry file (as a
    /// refused one would leave it).
    fn operate(&mut self, op: OperatorOp) -> Result<(), String> {
        let outs = self
            .core
            .handle(Input::Operator { request: 1, op }, self.now);
        outs.into_iter()
            .find_map(|o| match o {
                Output::OperatorDone { result, .. } => Some(result.map_err(|e| e.0)),
                _ => None,
            })
            .expect("an answer")
    }

    fn set_weight(&mut self, role: &str, weight: f64) -> Result<(), String> {
        self.operate(OperatorOp::SetWeight {
            role: role.into(),
            weight,
        })
    }

    /// `agora quota set --force` (no agents in most of these tests).
    fn set_quota(&mut self, role: &str, g: &Resources, l: &Resources) -> Result<(), String> {
        self.quota(role, g, l, true)
    }

    fn quota(
        &mut self,
        role: &str,
        g: &Resources,
        l: &Resources,
        force: bool,
    ) -> Result<(), String> {
        self.operate(OperatorOp::SetQuota {
            role: role.into(),
            guarantee: g.clone(),
            limit: l.clone(),
            force,
        })
    }

    fn quota_of(&self, role: &str) -> (Resources, Resources) {
        let r = self.core.roles(role).unwrap().remove(0);
        (
            Resources::from_proto(&r.guarantee).unwrap(),
            Resources::from_proto(&r.limit).unwrap(),
        )
    }

    fn feed(&mut self, input: Input) -> Vec<Output> {
        let outs = self.core.handle(input, self.now);
        self.commit();
        outs
    }

    fn commit(&mut self) {
        for op in self.core.take_registry_ops() {
            self.reg.apply(&op);
        }
    }

    fn agent(&mut self, conn: ConnId, id: &str, tasks: Vec<RunningTask>) -> (String, Vec<Output>) {
        let outs = self.feed(Input::AgentHello {
            conn,
            hello: AgentHello {
                agent_id: id.into(),
                hostname: format!("host{conn}"),
                resources: Resources::cpus_mem(4000, 4 * GIB).to_proto(),
                attributes: vec![],
                tasks,
                // One installation per connection number (see `registration_token`).
                registration_token: format!("install-{conn}"),
                ..Default::default()
            },
        });
        let id = outs
            .iter()
            .find_map(|o| match o {
                Output::ToAgent(c, m) if *c == conn => match &m.msg {
                    Some(master_to_agent::Msg::Registered(r)) => Some(r.agent_id.clone()),
                    _ => None,
                },
                _ => None,
            })
            .unwrap_or_else(|| panic!("agent on {conn} not registered: {outs:?}"));
        (id, outs)
    }

    fn subscribe(&mut self, conn: ConnId, id: &str) -> Vec<Output> {
        self.subscribe_with(conn, id, false)
    }

    fn subscribe_with(&mut self, conn: ConnId, id: &str, partition_aware: bool) -> Vec<Output> {
        self.feed(Input::SchedulerHello {
            conn,
            principal: String::new(),
            hello: SchedulerHello {
                framework: Some(FrameworkInfo {
                    name: "web".into(),
                    roles: vec!["eng".into()],
                    framework_id: id.into(),
                    failover_timeout_seconds: 120.0,
                    partition_aware,
                    ..Default::default()
                }),
            },
        })
    }

    fn tick(&mut self, now: u64) -> Vec<Output> {
        self.now = now;
        self.feed(Input::Tick)
    }
}

fn subscribed_id(outs: &[Output]) -> Option<String> {
    outs.iter().find_map(|o| match o {
        Output::ToScheduler(_, e) => match &e.event {
            Some(event::Event::Subscribed(s)) => Some(s.framework_id.clone()),
            _ => None,
        },
        _ => None,
    })
}

fn offered(outs: &[Output]) -> Vec<v1::Offer> {
    outs.iter()
        .filter_map(|o| match o {
            Output::ToScheduler(_, e) => match &e.event {
                Some(event::Event::Offers(o)) => Some(o.offers.clone()),
                _ => None,
            },
            _ => None,
        })
        .flatten()
        .collect()
}

fn running_task(fid: &str, agent_id: &str, task_id: &str, milli_cpus: i64) -> RunningTask {
    RunningTask {
        framework_id: fid.into(),
        task: Some(TaskInfo {
            task_id: task_id.into(),
            agent_id: agent_id.into(),
            resources: Resources::cpus_mem(milli_cpus, GIB).to_proto(),
            ..Default::default()
        }),
        status: Some(TaskStatus {
            task_id: task_id.into(),
            state: TaskState::TaskRunning as i32,
            agent_id: agent_id.into(),
            ..Default::default()
        }),
    }
}

#[test]
fn agents_and_frameworks_are_recorded_when_they_first_register() {
    let mut m = Node::new();
    let (aid, _) = m.agent(1, "", vec![]);
    let outs = m.subscribe(101, "");
    let fid = subscribed_id(&outs).unwrap();
    assert_eq!(m.reg.agents[&aid].hostname, "host1");
    assert!(!m.reg.agents[&aid].unreachable);
    let f = &m.reg.frameworks[&fid];
    assert_eq!(
        (f.name.as_str(), f.roles.clone(), f.failover_ms),
        ("web", vec!["eng".to_string()], 120_000)
    );
    // Re-subscribing unchanged writes nothing.
    m.feed(Input::SchedulerClosed { conn: 101 });
    m.subscribe(102, &fid);
    assert!(m.core.take_registry_ops().is_empty());
}

#[test]
fn a_restarted_master_holds_offers_until_its_agents_are_back_and_keeps_their_tasks() {
    let mut m = Node::new();
    let (aid, _) = m.agent(1, "", vec![]);
    let fid = subscribed_id(&m.subscribe(101, "")).unwrap();

    // The master dies; a new one starts from the registry.
    let mut m2 = Node::restarted(&m.reg, 50_000);
    let outs = m2.subscribe(201, &fid);
    assert_eq!(
        subscribed_id(&outs).as_deref(),
        Some(fid.as_str()),
        "same framework id"
    );
    assert!(
        offered(&outs).is_empty(),
        "nothing offered before the agent is back: {outs:?}"
    );
    assert!(offered(&m2.tick(51_000)).is_empty());

    // The agent re-registers with its running task: only what is free is offered.
    let (back, outs) = m2.agent(2, &aid, vec![running_task(&fid, &aid, "t1", 3000)]);
    assert_eq!(back, aid);
    let offers = offered(&outs);
    assert_eq!(offers.len(), 1, "{outs:?}");
    let res = Resources::from_proto(&offers[0].resources).unwrap();
    assert_eq!(
        res.milli_cpus(),
        1000,
        "the running task's 3 cpus are not offered: {res}"
    );
    let list = m2.core.list_tasks(false, m2.now);
    assert!(list
        .iter()
        .any(|t| t.task_id == "t1" && t.state() == TaskState::TaskRunning));
}

#[test]
fn agents_that_do_not_return_are_marked_unreachable_after_the_wait() {
    let mut m = Node::new();
    let (gone, _) = m.agent(1, "", vec![]);
    let fid = subscribed_id(&m.subscribe(101, "")).unwrap();
    let mut m2 = Node::restarted(&m.reg, 10_000);
    m2.subscribe(201, &fid);
    // A new agent joins, but the old one is still awaited: no offers yet.
    let (_, outs) = m2.agent(2, "", vec![]);
    assert!(offered(&outs).is_empty());
    assert!(offered(&m2.tick(10_000 + REREGISTER_MS - 1)).is_empty());
    let outs = m2.tick(10_000 + REREGISTER_MS);
    assert_eq!(
        offered(&outs).len(),
        1,
        "offers resume after the wait: {outs:?}"
    );
    assert!(m2.reg.agents[&gone].unreachable);
    // A master restarted again does not wait for an unreachable agent.
    let mut m3 = Node::restarted(&m2.reg, 100_000);
    m3.subscribe(301, &fid);
    let (_, outs) = m3.agent(3, "", vec![]);
    assert_eq!(offered(&outs).len(), 1, "{outs:?}");
}

#[test]
fn a_framework_not_back_within_its_failover_timeout_is_removed_for_good() {
    let mut m = Node::new();
    m.agent(1, "", vec![]);
    let fid = subscribed_id(&m.subscribe(101, "")).unwrap();
    let mut m2 = Node::restarted(&m.reg, 10_000);
    m2.tick(10_000 + 120_001);
    assert!(!m2.reg.frameworks.contains_key(&fid));
    assert!(m2.reg.removed_frameworks.contains_key(&fid));
    let outs = m2.subscribe(201, &fid);
    assert!(subscribed_id(&outs).is_none());
    let refused = outs.iter().any(|o| match o {
        Output::ToScheduler(201, e) => match &e.event {
            Some(event::Event::Error(e)) => {
                e.message.contains(&fid) && e.message.contains("without a framework id")
            }
            _ => false,
        },
        _ => false,
    });
    assert!(refused, "{outs:?}");
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::CloseScheduler(201, _))));
}

#[test]
fn teardown_is_recorded_and_the_id_cannot_subscribe_again() {
    let mut m = Node::new();
    let fid = subscribed_id(&m.subscribe(101, "")).unwrap();
    m.feed(Input::SchedulerCall {
        conn: 101,
        call: Call {
            call: Some(call::Call::Teardown(v1::Teardown {})),
        },
    });
    assert!(m.reg.removed_frameworks.contains_key(&fid));
    let outs = m.subscribe(102, &fid);
    assert!(subscribed_id(&outs).is_none(), "{outs:?}");
}

#[test]
fn weights_and_quotas_survive_a_restart() {
    let mut m = Node::new();
    m.set_weight("eng", 3.0).unwrap();
    let g = Resources::cpus_mem(2000, GIB);
    let l = Resources::cpus_mem(8000, 8 * GIB);
    m.set_quota("eng/web", &g, &l).unwrap();
    m.commit();
    let err = m.set_weight("eng", -1.0).unwrap_err();
    assert!(err.contains("eng"), "{err}");
    let err = m.set_quota("*", &g, &l).unwrap_err();
    assert!(err.contains("default role"), "{err}");
    let err = m.set_quota("x", &l, &g).unwrap_err();
    assert!(err.contains("above its limit"), "{err}");
    assert!(
        m.core.take_registry_ops().is_empty(),
        "refused changes are not recorded"
    );

    let m2 = Node::restarted(&m.reg, 5_000);
    let roles = m2.core.roles("").unwrap();
    let eng = roles.iter().find(|r| r.role == "eng").unwrap();
    assert_eq!(eng.weight, 3.0);
    let web = roles.iter().find(|r| r.role == "eng/web").unwrap();
    assert_eq!(Resources::from_proto(&web.guarantee).unwrap(), g);
    assert_eq!(Resources::from_proto(&web.limit).unwrap(), l);
    // Removing a quota is recorded too.
    let mut m2 = m2;
    m2.set_quota("eng/web", &Resources::new(), &Resources::new())
        .unwrap();
    m2.commit();
    assert!(m2.reg.quotas.is_empty());
    let ops: Vec<RegistryOp> = m2.core.take_registry_ops();
    assert!(ops.is_empty());
}

#[test]
fn quota_set_changes_only_what_it_names_and_guarantees_must_fit_the_cluster() {
    let mut m = Node::new();
    let none = Resources::new();
    // No agent yet: any guarantee is more than the cluster has.
    let err = m
        .quota("big", &Resources::cpus_mem(1000, GIB), &none, false)
        .unwrap_err();
    assert!(
        err.contains("--force") && err.contains("0 registered agent"),
        "{err}"
    );
    m.agent(10, "", vec![]);
    m.agent(11, "", vec![]); // 8 cpus, 8 GiB in all
    let err = m
        .quota("big", &Resources::cpus_mem(1_000_000, GIB), &none, false)
        .unwrap_err();
    assert!(
        err.contains("1000") && err.contains("8") && err.contains("cpus"),
        "{err}"
    );
    assert!(
        m.core.take_registry_ops().is_empty(),
        "refused, not recorded"
    );
    // Within capacity: accepted; a second role's guarantee counts with the first's.
    m.quota("a", &Resources::cpus_mem(5000, GIB), &none, false)
        .unwrap();
    let err = m
        .quota("b", &Resources::cpus_mem(4000, GIB), &none, false)
        .unwrap_err();
    assert!(err.contains("9 of cpus") || err.contains("cpus"), "{err}");
    // A child's guarantee lies inside its parent's: not counted twice.
    m.quota("a/web", &Resources::cpus_mem(4000, GIB), &none, false)
        .unwrap();
    // --force sets it anyway.
    m.quota("b", &Resources::cpus_mem(4000, GIB), &none, true)
        .unwrap();

    // A limit set later keeps the guarantee; a guarantee of 0 drops only that one.
    let l = Resources::parse("cpus:6").unwrap();
    m.quota("a", &none, &l, false).unwrap();
    let (g, lim) = m.quota_of("a");
    assert_eq!(g, Resources::cpus_mem(5000, GIB));
    assert_eq!(lim, l);
    // A guarantee of one resource replaces that one only.
    m.quota("a", &Resources::parse("cpus:4").unwrap(), &none, false)
        .unwrap();
    assert_eq!(m.quota_of("a").0, Resources::cpus_mem(4000, GIB));
    // The guarantee may not exceed the limit once merged.
    let err = m
        .quota("a", &Resources::parse("cpus:7").unwrap(), &none, true)
        .unwrap_err();
    assert!(err.contains("above its limit"), "{err}");

    // Removing: a role with a quota loses it; a role without one is an error.
    m.quota("a", &none, &none, false).unwrap();
    let err = m.quota("a", &none, &none, false).unwrap_err();
    assert!(err.contains("no quota to remove"), "{err}");
    let err = m.quota("never", &none, &none, false).unwrap_err();
    assert!(err.contains("`never`"), "{err}");
}

#[test]
fn explain_names_the_role_quota_and_what_holds_offers_back() {
    let mut m = Node::new();
    m.set_quota("eng", &Resources::new(), &Resources::cpus_mem(1000, GIB))
        .unwrap();
    let text = m.core.explain("eng", m.now).unwrap();
    assert!(text.contains("role eng"), "{text}");
    assert!(text.contains("limit"), "{text}");
    assert!(text.contains("no agent is connected"), "{text}");
    let err = m.core.explain("no such thing!", m.now).unwrap_err();
    assert!(err.0.contains("no task or role"), "{err}");
    // An id that could be a role name but names nothing known is not answered as
    // an empty role.
    let err = m.core.explain("c5870972fe15", m.now).unwrap_err();
    assert!(
        err.0.contains("no task or role is named `c5870972fe15`"),
        "{err}"
    );
}

fn updates_to(outs: &[Output], conn: ConnId) -> Vec<TaskStatus> {
    outs.iter()
        .filter_map(|o| match o {
            Output::ToScheduler(c, e) if *c == conn => match &e.event {
                Some(event::Event::Update(u)) => u.status.clone(),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// One agent running t1 of a partition-aware framework (conn 101) and t2 of one that
/// is not (conn 102); the agent then stops answering past the timeout.
fn partitioned() -> (Node, String, String, String, u64) {
    let mut m = Node::new();
    let pa = subscribed_id(&m.subscribe_with(101, "", true)).unwrap();
    let plain = subscribed_id(&m.subscribe_with(102, "", false)).unwrap();
    let (aid, _) = m.agent(1, "", vec![]);
    // The agent restarts at once and reports the two tasks (as after a launch).
    let (_, _) = m.agent(
        2,
        &aid,
        vec![
            running_task(&pa, &aid, "t1", 1000),
            running_task(&plain, &aid, "t2", 1000),
        ],
    );
    let timeout = CoreConfig::default().agent_timeout_ms;
    let cut = m.now + timeout + 1;
    let outs = m.tick(cut);
    let to_pa = updates_to(&outs, 101);
    assert_eq!(to_pa.len(), 1, "{outs:?}");
    assert_eq!(to_pa[0].state(), TaskState::TaskUnreachable);
    assert_eq!(to_pa[0].reason(), v1::Reason::AgentUnreachable);
    let to_plain = updates_to(&outs, 102);
    assert_eq!(to_plain.len(), 1, "{outs:?}");
    assert_eq!(to_plain[0].state(), TaskState::TaskLost);
    (m, pa, plain, aid, cut)
}

#[test]
fn a_silent_agent_makes_partition_aware_tasks_unreachable_and_others_lost() {
    let (mut m, _pa, _plain, _aid, _) = partitioned();
    let live = m.core.list_tasks(false, m.now);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(
        (live[0].task_id.as_str(), live[0].state()),
        ("t1", TaskState::TaskUnreachable)
    );
    let outs = m.feed(Input::SchedulerCall {
        conn: 101,
        call: Call {
            call: Some(call::Call::Reconcile(v1::Reconcile { task_ids: vec![] })),
        },
    });
    let st = updates_to(&outs, 101);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].state(), TaskState::TaskUnreachable);
}

#[test]
fn a_returning_agent_brings_unreachable_tasks_back_running_and_lost_ones_are_killed() {
    let (mut m, pa, plain, aid, cut) = partitioned();
    m.now = cut + 30_000;
    let (_, outs) = m.agent(
        3,
        &aid,
        vec![
            running_task(&pa, &aid, "t1", 1000),
            running_task(&plain, &aid, "t2", 1000),
        ],
    );
    let back = updates_to(&outs, 101);
    assert_eq!(back.len(), 1, "{outs:?}");
    assert_eq!(back[0].state(), TaskState::TaskRunning);
    assert_eq!(back[0].reason(), v1::Reason::AgentReregistered);
    assert!(back[0].uuid.is_empty(), "nothing to acknowledge");
    // t2's framework was told LOST (terminal): t2 is killed, never RUNNING again.
    assert!(updates_to(&outs, 102).is_empty(), "{outs:?}");
    let killed = outs.iter().any(|o| match o {
        Output::ToAgent(3, msg) => {
            matches!(&msg.msg, Some(master_to_agent::Msg::KillTask(k)) if k.task_id == "t2")
        }
        _ => false,
    });
    assert!(killed, "{outs:?}");
    let live = m.core.list_tasks(false, m.now);
    assert_eq!(live.len(), 1);
    assert_eq!(
        (live[0].task_id.as_str(), live[0].state()),
        ("t1", TaskState::TaskRunning)
    );
}

#[test]
fn an_unreachable_task_the_agent_no_longer_has_ends_lost_when_it_returns() {
    let (mut m, _pa, _plain, aid, cut) = partitioned();
    m.now = cut + 1_000;
    let (_, outs) = m.agent(3, &aid, vec![]);
    let st = updates_to(&outs, 101);
    assert_eq!(st.len(), 1, "{outs:?}");
    assert_eq!(st[0].state(), TaskState::TaskLost);
    assert!(
        st[0].message.contains("without this task"),
        "{}",
        st[0].message
    );
    assert!(m.core.list_tasks(false, m.now).is_empty());
}

#[test]
fn reconciling_an_unknown_task_during_recovery_is_answered_when_its_agent_is_back() {
    let mut m = Node::new();
    let (aid, _) = m.agent(1, "", vec![]);
    let fid = subscribed_id(&m.subscribe(101, "")).unwrap();
    let mut m2 = Node::restarted(&m.reg, 20_000);
    m2.subscribe(201, &fid);
    let ask = |m: &mut Node| {
        m.feed(Input::SchedulerCall {
            conn: 201,
            call: Call {
                call: Some(call::Call::Reconcile(v1::Reconcile {
                    task_ids: vec!["t1".into(), "t9".into()],
                })),
            },
        })
    };
    assert!(
        updates_to(&ask(&mut m2), 201).is_empty(),
        "no answer while agents may still bring the tasks"
    );
    let (_, outs) = m2.agent(2, &aid, vec![running_task(&fid, &aid, "t1", 1000)]);
    let mut answers: Vec<(String, TaskState)> = updates_to(&outs, 201)
        .into_iter()
        .map(|s| (s.task_id.clone(), s.state()))
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        vec![
            ("t1".to_string(), TaskState::TaskRunning),
            ("t9".to_string(), TaskState::TaskLost)
        ]
    );
    // Once recovered, an unknown task is answered at once.
    assert_eq!(updates_to(&ask(&mut m2), 201).len(), 2);
}

fn kill_sent(outs: &[Output], conn: ConnId, task: &str) -> bool {
    outs.iter().any(|o| match o {
        Output::ToAgent(c, m) if *c == conn => {
            matches!(&m.msg, Some(master_to_agent::Msg::KillTask(k)) if k.task_id == task)
        }
        _ => false,
    })
}

#[test]
fn a_task_told_lost_stays_lost_across_a_master_restart_when_its_agent_returns() {
    // Regression (simulation, bug A): the restarted master had forgotten it told the
    // framework LOST, adopted the task again, and the framework heard it end twice.
    let mut m = Node::new();
    let fid = subscribed_id(&m.subscribe_with(101, "", false)).unwrap();
    let (aid, _) = m.agent(1, "", vec![]);
    m.agent(2, &aid, vec![running_task(&fid, &aid, "t1", 1000)]);
    let cut = m.now + CoreConfig::default().agent_timeout_ms + 1;
    let st = updates_to(&m.tick(cut), 101);
    assert_eq!(st[0].state(), TaskState::TaskLost);
    let mut m2 = Node::restarted(&m.reg, cut + 1_000);
    m2.subscribe_with(201, &fid, false);
    let (_, outs) = m2.agent(3, &aid, vec![running_task(&fid, &aid, "t1", 1000)]);
    assert!(updates_to(&outs, 201).is_empty(), "no second end: {outs:?}");
    assert!(kill_sent(&outs, 3, "t1"), "{outs:?}");
    assert!(m2.core.list_tasks(false, m2.now).is_empty(), "not adopted");
    // Its later updates are acknowledged by the master, never relayed.
    let outs = m2.feed(Input::AgentMessage {
        conn: 3,
        msg: v1::AgentToMaster {
            msg: Some(v1::agent_to_master::Msg::StatusUpdate(v1::StatusUpdate {
                framework_id: fid.clone(),
                status: Some(TaskStatus {
                    task_id: "t1".into(),
                    state: TaskState::TaskKilled as i32,
                    uuid: b"u-9".to_vec(),
                    ..Default::default()
                }),
            })),
        },
    });
    assert!(updates_to(&outs, 201).is_empty(), "{outs:?}");
}

#[test]
fn an_end_the_master_never_heard_is_taken_from_the_agents_report() {
    // Regression (simulation, bug B, and the agent kill -9 fault test): the agent was
    // killed as it sent FAILED; re-registering, it reports the task with that end.
    let mut m = Node::new();
    let fid = subscribed_id(&m.subscribe(101, "")).unwrap();
    let (aid, _) = m.agent(1, "", vec![]);
    m.agent(2, &aid, vec![running_task(&fid, &aid, "t1", 3000)]);
    let mut ended = running_task(&fid, &aid, "t1", 3000);
    if let Some(st) = ended.status.as_mut() {
        st.state = TaskState::TaskFailed as i32;
        st.uuid = b"u-7".to_vec();
    }
    let (_, outs) = m.agent(3, &aid, vec![ended]);
    let st = updates_to(&outs, 101);
    assert_eq!(st.len(), 1, "{outs:?}");
    assert_eq!(
        (st[0].state(), st[0].uuid.as_slice()),
        (TaskState::TaskFailed, &b"u-7"[..])
    );
    assert!(m.core.list_tasks(false, m.now).is_empty());
    // Its resources are free: the whole agent is offered.
    let offers = offered(&outs);
    assert_eq!(
        Resources::from_proto(&offers[0].resources)
            .unwrap()
            .milli_cpus(),
        4000
    );
}

#[test]
fn an_agent_that_restarts_before_it_hears_its_id_gets_the_same_id_back() {
    // Regression (simulation, bug C): it registered anew and the tasks launched on
    // its first id stayed UNREACHABLE for ever.
    let mut m = Node::new();
    let (first, _) = m.agent(1, "", vec![]);
    let outs = m.feed(Input::AgentHello {
        conn: 2,
        hello: AgentHello {
            agent_id: String::new(),
            hostname: "host1".into(),
            resources: Resources::cpus_mem(4000, 4 * GIB).to_proto(),
            registration_token: "install-1".into(),
            ..Default::default()
        },
    });
    let again = outs.iter().find_map(|o| match o {
        Output::ToAgent(2, msg) => match &msg.msg {
            Some(master_to_agent::Msg::Registered(r)) => Some(r.agent_id.clone()),
            _ => None,
        },
        _ => None,
    });
    assert_eq!(again.as_deref(), Some(first.as_str()));
}

#[test]
fn removed_framework_ids_are_remembered_up_to_the_configured_bound() {
    let mut m = Node {
        core: MasterCore::new(CoreConfig {
            completed_framework_limit: 2,
            ..CoreConfig::default()
        }),
        reg: Registry::default(),
        now: 1_000,
    };
    let mut ids = Vec::new();
    for conn in 101..104 {
        let fid = subscribed_id(&m.subscribe(conn, "")).unwrap();
        m.now += 1;
        m.feed(Input::SchedulerCall {
            conn,
            call: Call {
                call: Some(call::Call::Teardown(v1::Teardown {})),
            },
        });
        ids.push(fid);
    }
    let kept: Vec<&String> = m.reg.removed_frameworks.keys().collect();
    assert_eq!(kept, vec![&ids[1], &ids[2]], "the oldest is forgotten");
}
