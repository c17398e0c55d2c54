//! Agent restarts, driven through the pure core with exact message sequences: the
//! checkpoint each step leaves behind, and what a core rebuilt from it (`recover`)
//! does with executors that come back, die, or never answer.
//!
//! Every step's `take_checkpoint` delta is applied to a `CheckpointState` (what the
//! redb file holds); a "restart" is `AgentCore::recover` from that state, so nothing
//! the core keeps only in memory survives it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

use std::collections::HashMap;
use std::path::PathBuf;

use agora_agent::checkpoint::{phase, CheckpointState};
use agora_agent_core::{AgentCore, AgentCoreConfig, ExecutorProcess, Input, Output};
use agora_proto::v1::{
    self, agent_to_executor, agent_to_master, AgentToExecutor, AgentToMaster, ExecutorLaunch,
    ExecutorStatus, Reason, TaskInfo, TaskState, TaskStatus, WasmModule,
};
use agora_proto::Resources;

const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;
const AGENT_ID: &str = "agent-1";
const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn config() -> AgentCoreConfig {
    AgentCoreConfig {
        hostname: "host-1".into(),
        resources: Resources::cpus_mem(4000, 8 * GIB),
        attributes: vec![],
        work_dir: PathBuf::from("/work/agent"),
        update_retry_ms: 1_000,
        update_retry_max_ms: 4_000,
        executor_idle_ms: 30_000,
        output_limit_bytes: MIB as u64,
        max_files_per_task: 10_000,
        recovery_timeout_ms: 60_000,
        reregister_timeout_ms: 5_000,
    }
}

// ---- the harness --------------------------------------------------------------

/// A core, the checkpoint it has written so far, and the time.
struct Agent {
    core: AgentCore,
    disk: CheckpointState,
    now: u64,
}

impl Agent {
    /// A fresh agent the master has registered as `agent-1`.
    fn new() -> Self {
        let mut a = Agent {
            core: AgentCore::new(config()),
            disk: CheckpointState::default(),
            now: 0,
        };
        assert_eq!(
            a.feed(Input::Registered {
                agent_id: AGENT_ID.into()
            }),
            vec![]
        );
        a
    }

    /// kill -9 and start again: a core rebuilt from what is on disk alone.
    fn restart(&mut self, now: u64) -> Vec<Output> {
        self.now = now;
        let (core, outs) = AgentCore::recover(config(), self.disk.clone(), now);
        self.core = core;
        self.persist();
        outs
    }

    fn at(&mut self, now: u64) -> &mut Self {
        assert!(now >= self.now);
        self.now = now;
        self
    }

    fn feed(&mut self, input: Input) -> Vec<Output> {
        let outs = self.core.handle(input, self.now);
        self.persist();
        outs
    }

    /// Writes the step's delta, checking that updates about to be sent are durable.
    fn persist(&mut self) {
        if let Some(d) = self.core.take_checkpoint() {
            self.disk.apply(&d);
        }
        assert_eq!(
            self.disk,
            self.core.checkpoint_state(),
            "the checkpoint holds everything the core would need after a restart"
        );
    }

    fn tick(&mut self, now: u64) -> Vec<Output> {
        self.at(now).feed(Input::Tick)
    }

    fn run(&mut self, fid: &str, t: &TaskInfo) -> Vec<Output> {
        self.feed(Input::RunTask(v1::RunTask {
            framework_id: fid.into(),
            task: Some(t.clone()),
        }))
    }

    fn ack(&mut self, fid: &str, task_id: &str, uuid: &[u8]) -> Vec<Output> {
        self.feed(Input::Ack(v1::StatusUpdateAck {
            framework_id: fid.into(),
            task_id: task_id.into(),
            uuid: uuid.to_vec(),
        }))
    }

    fn status(&mut self, fid: &str, exec: &str, st: ExecutorStatus) -> Vec<Output> {
        self.feed(Input::ExecutorStatus {
            key: key(fid, exec),
            status: st,
        })
    }

    fn reregistered(&mut self, fid: &str, exec: &str, tasks: &[&str]) -> Vec<Output> {
        self.feed(Input::ExecutorReregistered {
            key: key(fid, exec),
            tasks: tasks.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Drives a task to RUNNING in executor `exec` (started as process `pid` when
    /// `spawn`), leaving its RUNNING acknowledged when `ack_running`. Returns the uuid
    /// of the RUNNING update.
    fn start(&mut self, fid: &str, t: &TaskInfo, spawn: Option<u32>, ack_running: bool) -> Vec<u8> {
        let exec = t.executor_id.clone();
        let outs = self.run(fid, t);
        let u = uuid_of(&outs[0]);
        assert_eq!(self.ack(fid, &t.task_id, &u), vec![]);
        let outs = self.feed(Input::Prepared {
            key: key(fid, &t.task_id),
            result: Ok(()),
        });
        match spawn {
            Some(pid) => {
                assert_eq!(
                    outs,
                    vec![Output::SpawnExecutor {
                        key: key(fid, &exec)
                    }]
                );
                assert_eq!(
                    self.feed(Input::ExecutorSpawned {
                        key: key(fid, &exec),
                        process: process(pid),
                    }),
                    vec![]
                );
                assert_eq!(
                    self.feed(Input::ExecutorRegistered {
                        key: key(fid, &exec)
                    }),
                    vec![launch_of(fid, t)]
                );
            }
            None => assert_eq!(outs, vec![launch_of(fid, t)]),
        }
        let outs = self.status(fid, &exec, exec_status(&t.task_id, TaskState::TaskRunning));
        assert_eq!(outs.len(), 1, "{outs:?}");
        let u = uuid_of(&outs[0]);
        if ack_running {
            assert_eq!(self.ack(fid, &t.task_id, &u), vec![]);
        }
        u
    }

    /// (framework, task, state) of each task `hello` reports.
    fn hello_tasks(&self) -> Vec<(String, String, TaskState)> {
        self.core
            .hello()
            .tasks
            .iter()
            .map(|rt| {
                (
                    rt.framework_id.clone(),
                    rt.task.as_ref().unwrap().task_id.clone(),
                    rt.status.as_ref().unwrap().state(),
                )
            })
            .collect()
    }
}

fn key(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

fn process(pid: u32) -> ExecutorProcess {
    ExecutorProcess {
        pid,
        start_time: 1_000 + pid as u64,
    }
}

fn task(id: &str, executor_id: &str) -> TaskInfo {
    TaskInfo {
        task_id: id.into(),
        name: format!("job {id}"),
        agent_id: AGENT_ID.into(),
        resources: Resources::cpus_mem(500, 64 * MIB).to_proto(),
        module: Some(WasmModule {
            sha256: SHA.into(),
            size: 4096,
            fuel: 0,
            timeout_ms: 0,
        }),
        executor_id: executor_id.into(),
        ..Default::default()
    }
}

fn exec_status(task_id: &str, state: TaskState) -> ExecutorStatus {
    ExecutorStatus {
        task_id: task_id.into(),
        state: state as i32,
        ..Default::default()
    }
}

fn launch_of(fid: &str, t: &TaskInfo) -> Output {
    let sandbox = format!("/work/agent/sandboxes/{fid}/{}", t.task_id);
    Output::ToExecutor {
        key: key(fid, &t.executor_id),
        msg: AgentToExecutor {
            msg: Some(agent_to_executor::Msg::Launch(ExecutorLaunch {
                task_id: t.task_id.clone(),
                module_path: format!("/work/agent/artifacts/{SHA}"),
                module_sha256: SHA.into(),
                root_dir: format!("{sandbox}/fs"),
                stdout_path: format!("{sandbox}/stdout"),
                stderr_path: format!("{sandbox}/stderr"),
                args: vec![],
                env: HashMap::new(),
                fuel: 0,
                memory_bytes: 64 * MIB as u64,
                timeout_ms: 0,
                output_limit_bytes: MIB as u64,
                command: None,
                milli_cpus: 500,
                function: None,
                sandbox_dir: sandbox.clone(),
                disk_bytes: agora_proto::resources::DEFAULT_TASK_DISK as u64,
                max_files: 10_000,
            })),
        },
    }
}

fn to_executor(fid: &str, exec: &str, msg: agent_to_executor::Msg) -> Output {
    Output::ToExecutor {
        key: key(fid, exec),
        msg: AgentToExecutor { msg: Some(msg) },
    }
}

fn update_of(out: &Output) -> (&str, &TaskStatus) {
    match out {
        Output::ToMaster(AgentToMaster {
            msg:
                Some(agent_to_master::Msg::StatusUpdate(v1::StatusUpdate {
                    framework_id,
                    status: Some(st),
                })),
        }) => (framework_id.as_str(), st),
        other => panic!("expected a status update, got {other:?}"),
    }
}

fn uuid_of(out: &Output) -> Vec<u8> {
    update_of(out).1.uuid.clone()
}

/// Checks a status update's framework, task, state, reason and message.
#[track_caller]
fn expect_update(
    out: &Output,
    fid: &str,
    task_id: &str,
    state: TaskState,
    reason: Reason,
    message: &str,
) -> Vec<u8> {
    let (f, st) = update_of(out);
    assert_eq!(
        (
            f,
            st.task_id.as_str(),
            st.state(),
            st.reason(),
            st.message.as_str()
        ),
        (fid, task_id, state, reason, message),
        "{st:?}"
    );
    assert_eq!(st.agent_id, AGENT_ID);
    st.uuid.clone()
}

// =====================================================================================
// The checkpoint
// =====================================================================================

#[test]
fn each_step_leaves_its_changes_in_the_checkpoint_and_updates_are_durable_before_sent() {
    let mut a = Agent::new();
    assert_eq!(a.disk.agent_id.as_deref(), Some(AGENT_ID));
    let t1 = task("t1", "e1");
    // RunTask: STARTING goes out in the same step that records it, durably.
    let outs = a.core.handle(
        Input::RunTask(v1::RunTask {
            framework_id: "f1".into(),
            task: Some(t1.clone()),
        }),
        100,
    );
    let starting = uuid_of(&outs[0]);
    let d = a.core.take_checkpoint().expect("a change");
    assert!(d.durable, "a new update is on disk before it is sent");
    assert_eq!(d.tasks.len(), 1);
    let rec = d.tasks[0].1.as_ref().expect("written");
    assert_eq!(rec.phase, phase::PREPARING);
    assert_eq!(rec.updates.len(), 1);
    assert_eq!(rec.updates[0].uuid, starting);
    a.disk.apply(&d);
    // The acknowledgement removes it from the queue; losing that only costs a
    // duplicate, so it need not be synced.
    a.core.handle(
        Input::Ack(v1::StatusUpdateAck {
            framework_id: "f1".into(),
            task_id: "t1".into(),
            uuid: starting,
        }),
        200,
    );
    let d = a.core.take_checkpoint().expect("a change");
    assert!(!d.durable);
    assert!(d.tasks[0].1.as_ref().unwrap().updates.is_empty());
    a.disk.apply(&d);
    // Nothing changed, nothing to write.
    a.core.handle(Input::Tick, 300);
    assert_eq!(a.core.take_checkpoint(), None);
    // The executor's process is recorded durably, with its identity.
    a.feed(Input::Prepared {
        key: key("f1", "t1"),
        result: Ok(()),
    });
    a.core.handle(
        Input::ExecutorSpawned {
            key: key("f1", "e1"),
            process: process(4242),
        },
        400,
    );
    let d = a.core.take_checkpoint().expect("a change");
    assert!(d.durable);
    assert_eq!(d.executors.len(), 1);
    let e = d.executors[0].1.as_ref().unwrap();
    assert_eq!((e.pid, e.start_time), (4242, 5242));
    a.disk.apply(&d);
    assert_eq!(a.disk, a.core.checkpoint_state());
}

// =====================================================================================
// Restarts
// =====================================================================================

#[test]
fn a_live_executor_is_reattached_and_unacknowledged_updates_are_resent_as_they_were() {
    let mut a = Agent::new();
    let (t1, t2) = (task("t1", "e1"), task("t2", "e1"));
    a.at(1_000).start("f1", &t1, Some(100), true);
    // t2's RUNNING is in flight when the agent dies.
    let u2 = a.at(2_000).start("f1", &t2, None, false);
    let before = a.core.hello();

    // kill -9; a new agent starts from the checkpoint: it looks for the executor and
    // waits for it before registering.
    let outs = a.restart(10_000);
    assert_eq!(
        outs,
        vec![Output::AdoptExecutor {
            key: key("f1", "e1"),
            process: Some(process(100)),
        }]
    );
    assert!(a.core.recovering());
    assert_eq!(a.core.agent_id(), Some(AGENT_ID));
    assert_eq!(a.core.live_tasks(), 2);
    // The executor reconnects, naming both tasks: nothing to launch, nothing to kill.
    assert_eq!(a.at(10_500).reregistered("f1", "e1", &["t1", "t2"]), vec![]);
    assert!(!a.core.recovering(), "every recorded executor is back");
    // What the master is told: the same id, the same tasks, in the same states.
    assert_eq!(a.core.hello(), before);
    // Registered: t2's RUNNING again, with the uuid it had (a duplicate is harmless).
    let outs = a.feed(Input::Registered {
        agent_id: AGENT_ID.into(),
    });
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert_eq!(
        expect_update(
            &outs[0],
            "f1",
            "t2",
            TaskState::TaskRunning,
            Reason::Unspecified,
            ""
        ),
        u2
    );
    // The executor resends statuses it was not sure the old agent recorded: a RUNNING
    // the agent already has changes nothing.
    assert_eq!(
        a.status("f1", "e1", exec_status("t1", TaskState::TaskRunning)),
        vec![]
    );
    assert_eq!(a.ack("f1", "t2", &u2), vec![]);
    // Statuses flow on; uuids made after the restart are new ones.
    let outs = a
        .at(11_000)
        .status("f1", "e1", exec_status("t1", TaskState::TaskFinished));
    let u = expect_update(
        &outs[0],
        "f1",
        "t1",
        TaskState::TaskFinished,
        Reason::Unspecified,
        "",
    );
    assert_ne!(u, u2);
    let seq = |u: &[u8]| -> u64 {
        String::from_utf8_lossy(u)
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        seq(&u) > seq(&u2),
        "sequence numbers are not reused after a restart"
    );
}

#[test]
fn tasks_of_an_executor_that_died_while_the_agent_was_down_fail_saying_so() {
    let mut a = Agent::new();
    a.at(1_000).start("f1", &task("t1", "e1"), Some(100), true);
    a.at(2_000).start("f2", &task("t3", "e2"), Some(200), true);

    let outs = a.restart(10_000);
    assert_eq!(outs.len(), 2);
    // The shell finds e1's process gone at once.
    assert_eq!(
        a.at(10_001).feed(Input::ExecutorExited {
            key: key("f1", "e1"),
            detail: "process 100 is gone".into(),
        }),
        vec![],
        "nothing is sent before registering"
    );
    assert!(a.core.recovering(), "e2 is still awaited");
    assert_eq!(a.at(10_200).reregistered("f2", "e2", &["t3"]), vec![]);
    assert!(!a.core.recovering());
    // t1 ended while no master listened: it is reported with its end, which the
    // master hears from the report even if the FAILED update itself is lost.
    assert_eq!(
        a.hello_tasks(),
        vec![
            ("f1".into(), "t1".into(), TaskState::TaskFailed),
            ("f2".into(), "t3".into(), TaskState::TaskRunning),
        ]
    );
    let outs = a.at(10_300).feed(Input::Registered {
        agent_id: AGENT_ID.into(),
    });
    assert_eq!(outs.len(), 1, "{outs:?}");
    let u = expect_update(
        &outs[0],
        "f1",
        "t1",
        TaskState::TaskFailed,
        Reason::ExecutorTerminated,
        "executor e1 died while the agent was down (process 100 is gone)",
    );
    // Until the FAILED is acknowledged a re-registration still lists t1 with it (the
    // update may be lost on the way); once it is, t1 is gone from the agent.
    assert_eq!(
        a.hello_tasks(),
        vec![
            ("f1".into(), "t1".into(), TaskState::TaskFailed),
            ("f2".into(), "t3".into(), TaskState::TaskRunning),
        ]
    );
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    assert_eq!(
        a.hello_tasks(),
        vec![("f2".into(), "t3".into(), TaskState::TaskRunning)]
    );
    assert_eq!(a.core.live_tasks(), 1);
}

#[test]
fn an_executor_that_does_not_reregister_in_time_is_given_up() {
    let mut a = Agent::new();
    a.at(1_000).start("f1", &task("t1", "e1"), Some(100), true);
    a.restart(10_000);
    assert!(a.core.recovering());
    assert_eq!(a.tick(14_999), vec![]);
    let outs = a.tick(15_000);
    assert_eq!(
        outs,
        vec![Output::ReapExecutor {
            key: key("f1", "e1")
        }]
    );
    assert!(!a.core.recovering());
    // Its process may still run t1 (what it uses stays counted): nothing ends
    // before the process is gone.
    assert_eq!(
        a.hello_tasks(),
        vec![("f1".into(), "t1".into(), TaskState::TaskRunning)]
    );
    a.feed(Input::Registered {
        agent_id: AGENT_ID.into(),
    });
    // Should it come back meanwhile, it is told to go.
    assert_eq!(
        a.reregistered("f1", "e1", &["t1"]),
        vec![to_executor(
            "f1",
            "e1",
            agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
        )]
    );
    // Its end ends t1, saying why.
    let outs = a.feed(Input::ExecutorExited {
        key: key("f1", "e1"),
        detail: "killed by signal 9".into(),
    });
    expect_update(
        &outs[0],
        "f1",
        "t1",
        TaskState::TaskFailed,
        Reason::ExecutorTerminated,
        "executor e1 did not re-register within 5s after the agent restarted, and was stopped (killed by signal 9)",
    );
    // A new task for that executor id starts a fresh process.
    let t2 = task("t2", "e1");
    a.run("f1", &t2);
    assert_eq!(
        a.feed(Input::Prepared {
            key: key("f1", "t2"),
            result: Ok(()),
        }),
        vec![Output::SpawnExecutor {
            key: key("f1", "e1")
        }]
    );
}

#[test]
fn a_launch_lost_in_the_restart_is_sent_again_and_strange_tasks_are_killed() {
    let mut a = Agent::new();
    let (t1, t2) = (task("t1", "e1"), task("t2", "e1"));
    a.at(1_000).start("f1", &t1, Some(100), true);
    // t2's launch is handed to the executor just before the agent dies; it never
    // arrives.
    let outs = a.at(2_000).run("f1", &t2);
    let u = uuid_of(&outs[0]);
    a.ack("f1", "t2", &u);
    assert_eq!(
        a.feed(Input::Prepared {
            key: key("f1", "t2"),
            result: Ok(()),
        }),
        vec![launch_of("f1", &t2)]
    );
    // A kill of t1 is asked for, and its message lost too.
    let outs = a.feed(Input::KillTask(v1::KillTask {
        framework_id: "f1".into(),
        task_id: "t1".into(),
    }));
    expect_update(
        &outs[0],
        "f1",
        "t1",
        TaskState::TaskKilling,
        Reason::KilledByFramework,
        "",
    );

    a.restart(10_000);
    // The executor knows t1 (still running) and a task "ghost" the agent has no record
    // of; not t2.
    assert_eq!(
        a.reregistered("f1", "e1", &["ghost", "t1"]),
        vec![
            to_executor(
                "f1",
                "e1",
                agent_to_executor::Msg::Kill(v1::ExecutorKill {
                    task_id: "t1".into()
                })
            ),
            launch_of("f1", &t2),
            to_executor(
                "f1",
                "e1",
                agent_to_executor::Msg::Kill(v1::ExecutorKill {
                    task_id: "ghost".into()
                })
            ),
        ]
    );
}

#[test]
fn a_task_being_prepared_is_prepared_again_once_the_master_is_back() {
    let mut a = Agent::new();
    let t1 = task("t1", "e1");
    let outs = a.at(1_000).run("f1", &t1);
    let u = uuid_of(&outs[0]);
    // Dies while fetching; STARTING was never acknowledged.
    let outs = a.restart(5_000);
    assert_eq!(outs, vec![], "no executor to look for");
    assert!(!a.core.recovering());
    assert_eq!(
        a.hello_tasks(),
        vec![("f1".into(), "t1".into(), TaskState::TaskStarting)]
    );
    let outs = a.feed(Input::Registered {
        agent_id: AGENT_ID.into(),
    });
    assert_eq!(outs.len(), 2, "{outs:?}");
    assert_eq!(uuid_of(&outs[0]), u, "STARTING again, as it was");
    assert_eq!(
        outs[1],
        Output::Prepare {
            key: key("f1", "t1"),
            task: t1.clone()
        }
    );
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    assert_eq!(
        a.feed(Input::Prepared {
            key: key("f1", "t1"),
            result: Ok(()),
        }),
        vec![Output::SpawnExecutor {
            key: key("f1", "e1")
        }]
    );
}

#[test]
fn an_executor_the_agent_does_not_know_is_shut_down_when_it_reconnects() {
    let mut a = Agent::new();
    assert_eq!(
        a.reregistered("f9", "stray", &["t9"]),
        vec![
            to_executor(
                "f9",
                "stray",
                agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
            ),
            Output::ReapExecutor {
                key: key("f9", "stray")
            },
        ]
    );
    // Its statuses are nobody's.
    assert_eq!(
        a.status("f9", "stray", exec_status("t9", TaskState::TaskKilled)),
        vec![]
    );
    assert_eq!(
        a.feed(Input::ExecutorExited {
            key: key("f9", "stray"),
            detail: "exited with code 0".into(),
        }),
        vec![]
    );
}

#[test]
fn an_executor_whose_process_was_not_recorded_is_waited_for_then_forgotten() {
    let mut a = Agent::new();
    let t1 = task("t1", "e1");
    let outs = a.at(1_000).run("f1", &t1);
    let u = uuid_of(&outs[0]);
    a.ack("f1", "t1", &u);
    // Spawned, registered and launched, but the agent died before the process was
    // recorded.
    assert_eq!(
        a.feed(Input::Prepared {
            key: key("f1", "t1"),
            result: Ok(()),
        }),
        vec![Output::SpawnExecutor {
            key: key("f1", "e1")
        }]
    );
    assert_eq!(
        a.feed(Input::ExecutorRegistered {
            key: key("f1", "e1")
        }),
        vec![launch_of("f1", &t1)]
    );
    let outs = a.restart(10_000);
    assert_eq!(
        outs,
        vec![Output::AdoptExecutor {
            key: key("f1", "e1"),
            process: None
        }]
    );
    let outs = a.tick(15_000);
    assert_eq!(outs, vec![], "no process to reap: forgotten");
    assert!(!a.core.recovering());
    assert_eq!(a.disk.executors.len(), 0);
    let outs = a.feed(Input::Registered {
        agent_id: AGENT_ID.into(),
    });
    expect_update(
        &outs[0],
        "f1",
        "t1",
        TaskState::TaskFailed,
        Reason::ExecutorTerminated,
        "executor e1 did not re-register within 5s after the agent restarted",
    );
}
