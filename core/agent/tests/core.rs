//! The agent's pure core driven with exact message sequences: what the master, the
//! shell and the executors tell it, and what it answers, in order, with time passed
//! in explicitly and `Input::Tick` standing for the timer.

use std::collections::HashMap;
use std::path::PathBuf;

use agora_agent_core::{AgentCore, AgentCoreConfig, ExecutorKind, Input, Output};
use agora_proto::v1::{
    self, agent_to_executor, agent_to_master, AgentToExecutor, AgentToMaster, Attribute,
    ExecutorLaunch, ExecutorStatus, Reason, RunningTask, TaskInfo, TaskState, TaskStatus,
    WasmModule,
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
        attributes: vec![Attribute {
            name: "zone".into(),
            value: "z1".into(),
        }],
        work_dir: PathBuf::from("/work/agent"),
        update_retry_ms: 1_000,
        update_retry_max_ms: 4_000,
        executor_idle_ms: 30_000,
        output_limit_bytes: MIB as u64,
        max_files_per_task: 10_000,
        recovery_timeout_ms: 60_000,
        reregister_timeout_ms: 10_000,
    }
}

// ---- the harness --------------------------------------------------------------

struct Agent {
    core: AgentCore,
    now: u64,
}

impl Agent {
    /// An agent the master has just registered as `agent-1`, with no tasks.
    fn new() -> Self {
        let mut a = Agent {
            core: AgentCore::new(config()),
            now: 0,
        };
        assert_eq!(a.core.agent_id(), None);
        assert_eq!(
            a.feed(Input::Registered {
                agent_id: AGENT_ID.into()
            }),
            vec![]
        );
        assert_eq!(a.core.agent_id(), Some(AGENT_ID));
        a
    }

    fn at(&mut self, now: u64) -> &mut Self {
        assert!(now >= self.now, "time goes forward: {} -> {now}", self.now);
        self.now = now;
        self
    }

    fn feed(&mut self, input: Input) -> Vec<Output> {
        self.core.handle(input, self.now)
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

    fn kill(&mut self, fid: &str, task_id: &str) -> Vec<Output> {
        self.feed(Input::KillTask(v1::KillTask {
            framework_id: fid.into(),
            task_id: task_id.into(),
        }))
    }

    fn ack(&mut self, fid: &str, task_id: &str, uuid: &[u8]) -> Vec<Output> {
        self.feed(Input::Ack(v1::StatusUpdateAck {
            framework_id: fid.into(),
            task_id: task_id.into(),
            uuid: uuid.to_vec(),
        }))
    }

    fn prepared(
        &mut self,
        fid: &str,
        task_id: &str,
        result: Result<(), agora_agent_core::PrepareFailed>,
    ) -> Vec<Output> {
        self.feed(Input::Prepared {
            key: key(fid, task_id),
            result,
        })
    }

    fn executor_registered(&mut self, fid: &str, exec: &str) -> Vec<Output> {
        self.feed(Input::ExecutorRegistered {
            key: key(fid, exec),
        })
    }

    fn executor_status(&mut self, fid: &str, exec: &str, status: ExecutorStatus) -> Vec<Output> {
        self.feed(Input::ExecutorStatus {
            key: key(fid, exec),
            status,
        })
    }

    fn executor_exited(&mut self, fid: &str, exec: &str, detail: &str) -> Vec<Output> {
        self.feed(Input::ExecutorExited {
            key: key(fid, exec),
            detail: detail.into(),
        })
    }

    /// Drives a task from RunTask to RUNNING with every update acknowledged, checking
    /// each step's outputs. `spawn` says whether its executor must be started.
    fn start(&mut self, fid: &str, t: &TaskInfo, spawn: bool) {
        let exec = exec_of(t);
        let outs = self.run(fid, t);
        assert_eq!(outs.len(), 2, "{outs:?}");
        let u = expect_update(&outs[0], fid, starting(&t.task_id, &exec, self.now));
        assert_eq!(
            outs[1],
            Output::Prepare {
                key: key(fid, &t.task_id),
                task: t.clone()
            }
        );
        assert_eq!(self.ack(fid, &t.task_id, &u), vec![]);
        let outs = self.prepared(fid, &t.task_id, Ok(()));
        if spawn {
            assert_eq!(
                outs,
                vec![Output::SpawnExecutor {
                    key: key(fid, &exec)
                }]
            );
            let outs = self.executor_registered(fid, &exec);
            assert_eq!(outs, vec![launch_of(fid, t)]);
        } else {
            assert_eq!(outs, vec![launch_of(fid, t)]);
        }
        let outs =
            self.executor_status(fid, &exec, exec_status(&t.task_id, TaskState::TaskRunning));
        assert_eq!(outs.len(), 1, "{outs:?}");
        let u = expect_update(
            &outs[0],
            fid,
            status(
                &t.task_id,
                &exec,
                TaskState::TaskRunning,
                Reason::Unspecified,
                "",
                self.now,
            ),
        );
        assert_eq!(self.ack(fid, &t.task_id, &u), vec![]);
    }
}

// ---- inputs and expected outputs ------------------------------------------------

/// The agent tells the master an executor ended (FAILURE for its framework).
fn exited(fid: &str, exec: &str, detail: &str, status: Option<i32>) -> Output {
    Output::ToMaster(AgentToMaster {
        msg: Some(agent_to_master::Msg::ExecutorExited(v1::ExecutorExited {
            framework_id: fid.into(),
            executor_id: exec.into(),
            message: detail.into(),
            status,
        })),
    })
}

fn key(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
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
            fuel: 5_000_000,
            timeout_ms: 2_000,
        }),
        args: vec!["--n".into(), "3".into()],
        env: HashMap::from([("GREETING".to_string(), "hello".to_string())]),
        executor_id: executor_id.into(),
        ..Default::default()
    }
}

fn exec_of(t: &TaskInfo) -> String {
    if t.executor_id.is_empty() {
        "default".into()
    } else {
        t.executor_id.clone()
    }
}

fn exec_status(task_id: &str, state: TaskState) -> ExecutorStatus {
    ExecutorStatus {
        task_id: task_id.into(),
        state: state as i32,
        ..Default::default()
    }
}

/// A status as the agent sends it, without its uuid (see `expect_update`).
fn status(
    task_id: &str,
    exec: &str,
    state: TaskState,
    reason: Reason,
    msg: &str,
    at: u64,
) -> TaskStatus {
    TaskStatus {
        task_id: task_id.into(),
        state: state as i32,
        reason: reason as i32,
        message: msg.into(),
        agent_id: AGENT_ID.into(),
        executor_id: exec.into(),
        timestamp_ms: at,
        ..Default::default()
    }
}

fn starting(task_id: &str, exec: &str, at: u64) -> TaskStatus {
    status(
        task_id,
        exec,
        TaskState::TaskStarting,
        Reason::Unspecified,
        "fetching and preparing the sandbox",
        at,
    )
}

fn to_master(fid: &str, st: TaskStatus) -> Output {
    Output::ToMaster(AgentToMaster {
        msg: Some(agent_to_master::Msg::StatusUpdate(v1::StatusUpdate {
            framework_id: fid.into(),
            status: Some(st),
        })),
    })
}

fn to_executor(fid: &str, exec: &str, msg: agent_to_executor::Msg) -> Output {
    Output::ToExecutor {
        key: key(fid, exec),
        msg: AgentToExecutor { msg: Some(msg) },
    }
}

/// The Launch of a `task()` built above: paths under the agent's work dir, memory and
/// cpus from the task's resources, fuel and timeout from its module.
fn launch_of(fid: &str, t: &TaskInfo) -> Output {
    let sandbox = format!("/work/agent/sandboxes/{fid}/{}", t.task_id);
    to_executor(
        fid,
        &exec_of(t),
        agent_to_executor::Msg::Launch(ExecutorLaunch {
            task_id: t.task_id.clone(),
            module_path: format!("/work/agent/artifacts/{SHA}"),
            module_sha256: SHA.into(),
            root_dir: format!("{sandbox}/fs"),
            stdout_path: format!("{sandbox}/stdout"),
            stderr_path: format!("{sandbox}/stderr"),
            args: vec!["--n".into(), "3".into()],
            env: HashMap::from([("GREETING".to_string(), "hello".to_string())]),
            fuel: 5_000_000,
            memory_bytes: 64 * MIB as u64,
            timeout_ms: 2_000,
            output_limit_bytes: MIB as u64,
            command: None,
            milli_cpus: 500,
            function: None,
            sandbox_dir: sandbox.clone(),
            disk_bytes: agora_proto::resources::DEFAULT_TASK_DISK as u64,
            max_files: 10_000,
        }),
    )
}

/// Checks that `out` is a status update to the master equal to `expected` but for its
/// uuid, which must be present; returns the uuid (for the acknowledgement).
#[track_caller]
fn expect_update(out: &Output, fid: &str, mut expected: TaskStatus) -> Vec<u8> {
    let uuid = match out {
        Output::ToMaster(AgentToMaster {
            msg:
                Some(agent_to_master::Msg::StatusUpdate(v1::StatusUpdate {
                    status: Some(st), ..
                })),
        }) => st.uuid.clone(),
        other => panic!("expected a status update, got {other:?}"),
    };
    assert!(!uuid.is_empty(), "every update carries a uuid");
    expected.uuid = uuid.clone();
    assert_eq!(*out, to_master(fid, expected));
    uuid
}

// =====================================================================================
// 1. The life of a task, one update in flight at a time
// =====================================================================================

#[test]
fn run_task_prepares_spawns_launches_and_sends_one_update_at_a_time() {
    let mut a = Agent::new();
    let t1 = task("t1", "");

    // master -> RunTask: STARTING goes out at once and the shell is asked to prepare.
    let outs = a.at(100).run("f1", &t1);
    assert_eq!(outs.len(), 2);
    let u_starting = expect_update(&outs[0], "f1", starting("t1", "default", 100));
    assert_eq!(
        outs[1],
        Output::Prepare {
            key: key("f1", "t1"),
            task: t1.clone()
        }
    );
    assert_eq!(a.core.live_tasks(), 1);
    // A duplicate RunTask (a retry) is ignored.
    assert_eq!(a.run("f1", &t1), vec![]);

    // Sandbox ready, no executor yet: spawn one.
    assert_eq!(
        a.at(200).prepared("f1", "t1", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "default")
        }]
    );
    // The executor registers: the task is launched with its paths and limits.
    assert_eq!(
        a.at(300).executor_registered("f1", "default"),
        vec![launch_of("f1", &t1)]
    );

    // The executor says RUNNING, but STARTING is not acknowledged yet: nothing goes.
    let running = ExecutorStatus {
        instantiate_us: 42,
        ..exec_status("t1", TaskState::TaskRunning)
    };
    assert_eq!(a.at(400).executor_status("f1", "default", running), vec![]);
    // The head (STARTING) is what a retry resends.
    let resent = a.tick(1_100);
    assert_eq!(resent.len(), 1);
    assert_eq!(
        expect_update(&resent[0], "f1", starting("t1", "default", 100)),
        u_starting
    );
    // An acknowledgement of something else changes nothing.
    assert_eq!(a.ack("f1", "t1", b"not-the-uuid"), vec![]);
    assert_eq!(a.ack("f2", "t1", &u_starting), vec![]);

    // ACK(STARTING) -> RUNNING goes out, stamped with when it happened.
    let outs = a.at(1_200).ack("f1", "t1", &u_starting);
    assert_eq!(outs.len(), 1);
    let u_running = expect_update(
        &outs[0],
        "f1",
        TaskStatus {
            instantiate_us: 42,
            ..status(
                "t1",
                "default",
                TaskState::TaskRunning,
                Reason::Unspecified,
                "",
                400,
            )
        },
    );
    assert_ne!(u_running, u_starting);
    // A duplicate of the old acknowledgement changes nothing.
    assert_eq!(a.ack("f1", "t1", &u_starting), vec![]);
    assert_eq!(a.at(1_300).ack("f1", "t1", &u_running), vec![]);
    // Nothing is unacknowledged: no retries.
    assert_eq!(a.tick(10_000), vec![]);

    // The guest exits: FINISHED with its exit code and fuel.
    let fin = ExecutorStatus {
        exit_code: Some(0),
        fuel_used: 77,
        ..exec_status("t1", TaskState::TaskFinished)
    };
    let outs = a.at(10_500).executor_status("f1", "default", fin);
    assert_eq!(outs.len(), 1);
    expect_update(
        &outs[0],
        "f1",
        TaskStatus {
            exit_code: Some(0),
            fuel_used: 77,
            ..status(
                "t1",
                "default",
                TaskState::TaskFinished,
                Reason::Unspecified,
                "",
                10_500,
            )
        },
    );
    assert_eq!(a.core.live_tasks(), 0);
    // Later reports about a task that ended are ignored.
    assert_eq!(
        a.executor_status("f1", "default", exec_status("t1", TaskState::TaskFailed)),
        vec![]
    );
}

#[test]
fn second_task_of_a_registered_executor_is_launched_without_a_new_spawn() {
    let mut a = Agent::new();
    a.start("f1", &task("t1", "e1"), true);
    let t2 = task("t2", "e1");
    let outs = a.at(500).run("f1", &t2);
    let u = expect_update(&outs[0], "f1", starting("t2", "e1", 500));
    assert_eq!(
        outs[1],
        Output::Prepare {
            key: key("f1", "t2"),
            task: t2.clone()
        }
    );
    assert_eq!(a.prepared("f1", "t2", Ok(())), vec![launch_of("f1", &t2)]);
    assert_eq!(a.ack("f1", "t2", &u), vec![]);
    // Another framework's executor of the same name is a different executor.
    let t3 = task("t3", "e1");
    a.start("f2", &t3, true);
    assert_eq!(a.core.live_tasks(), 3);
}

#[test]
fn launch_of_a_task_without_filesystem_preopens_nothing() {
    let mut a = Agent::new();
    let mut t1 = task("t1", "");
    t1.no_filesystem = true;
    let outs = a.run("f1", &t1);
    expect_update(&outs[0], "f1", starting("t1", "default", 0));
    assert_eq!(
        a.prepared("f1", "t1", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "default")
        }]
    );
    let mut expected = launch_of("f1", &t1);
    if let Output::ToExecutor {
        msg: AgentToExecutor {
            msg: Some(agent_to_executor::Msg::Launch(l)),
        },
        ..
    } = &mut expected
    {
        l.root_dir = String::new(); // nothing preopened
    }
    assert_eq!(a.executor_registered("f1", "default"), vec![expected]);
}

#[test]
fn command_tasks_get_a_native_executor_of_their_own() {
    let mut a = Agent::new();
    // A wasm task and a command task of one framework: two executors, two kinds.
    a.start("f1", &task("w1", ""), true);
    let mut c1 = task("c1", "");
    c1.module = None;
    c1.args.clear();
    c1.command = Some(v1::CommandInfo {
        shell: true,
        value: "echo hi".into(),
        timeout_ms: 7_000,
        ..Default::default()
    });
    let outs = a.at(100).run("f1", &c1);
    expect_update(&outs[0], "f1", starting("c1", "default-native", 100));
    assert_eq!(
        a.prepared("f1", "c1", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "default-native")
        }]
    );
    assert_eq!(
        a.core.executor_kind(&key("f1", "default-native")),
        Some(ExecutorKind::Native)
    );
    assert_eq!(
        a.core.executor_kind(&key("f1", "default")),
        Some(ExecutorKind::Wasm)
    );
    let outs = a.executor_registered("f1", "default-native");
    let Output::ToExecutor {
        msg: AgentToExecutor {
            msg: Some(agent_to_executor::Msg::Launch(l)),
        },
        ..
    } = &outs[0]
    else {
        panic!("{outs:?}")
    };
    assert_eq!(l.command, c1.command);
    assert_eq!(l.timeout_ms, 7_000, "a command's own timeout");
    assert_eq!(l.milli_cpus, 500);
    // Each executor's cgroup is sized to its own live tasks.
    let demand = a.core.executor_demand();
    assert_eq!(
        demand[&key("f1", "default-native")],
        Resources::cpus_mem(500, 64 * MIB)
    );
    assert_eq!(
        demand[&key("f1", "default")],
        Resources::cpus_mem(500, 64 * MIB)
    );

    // A command task sent to the wasm executor's id is refused, naming why.
    let mut c2 = c1.clone();
    c2.task_id = "c2".into();
    c2.executor_id = "default".into();
    let outs = a.at(200).run("f1", &c2);
    let u = expect_update(&outs[0], "f1", starting("c2", "default", 200));
    // The error waits behind the unacknowledged STARTING (one update in flight).
    assert_eq!(a.prepared("f1", "c2", Ok(())), vec![]);
    let outs = a.ack("f1", "c2", &u);
    let Output::ToMaster(AgentToMaster {
        msg: Some(v1::agent_to_master::Msg::StatusUpdate(up)),
    }) = &outs[0]
    else {
        panic!("{outs:?}")
    };
    let st = up.status.as_ref().unwrap();
    assert_eq!(st.state(), TaskState::TaskError);
    assert_eq!(st.reason(), Reason::InvalidTask);
    assert_eq!(
        st.message,
        "executor default runs wasm tasks; give a native task another executor id"
    );
    // Until its end is acknowledged, a re-registering agent still lists c2 with it,
    // so a master that missed the TASK_ERROR does not call it LOST.
    let hello = a.core.hello();
    let listed: Vec<_> = hello
        .tasks
        .iter()
        .filter(|t| t.task.as_ref().unwrap().task_id == "c2")
        .map(|t| t.status.as_ref().unwrap().state())
        .collect();
    assert_eq!(listed, vec![TaskState::TaskError]);
}

// =====================================================================================
// 2. Retries
// =====================================================================================

#[test]
fn unacknowledged_update_is_resent_with_doubling_backoff_up_to_the_cap() {
    let mut a = Agent::new();
    let outs = a.run("f1", &task("t1", ""));
    let first = outs[0].clone();
    expect_update(&first, "f1", starting("t1", "default", 0));
    // retry 1 s, doubling, capped at 4 s: resent at 1, 3, 7, 11, 15 s; the very same
    // update each time (same uuid, same timestamp).
    let mut expect_at = vec![1_000, 3_000, 7_000, 11_000, 15_000];
    let mut t = 0;
    while let Some(next) = expect_at.first().copied() {
        assert_eq!(a.tick(next - 1), vec![], "not before {next}");
        assert_eq!(a.tick(next), vec![first.clone()], "resent at {next}");
        expect_at.remove(0);
        t = next;
    }
    assert_eq!(t, 15_000);
    // The acknowledgement stops the retries.
    let uuid = expect_update(&first, "f1", starting("t1", "default", 0));
    assert_eq!(a.ack("f1", "t1", &uuid), vec![]);
    assert_eq!(a.tick(100_000), vec![]);
}

#[test]
fn nothing_is_sent_while_the_master_is_away_and_heads_are_resent_on_registration() {
    let mut a = Agent::new();
    let outs = a.run("f1", &task("t1", ""));
    let starting1 = outs[0].clone();
    let u1 = expect_update(&starting1, "f1", starting("t1", "default", 0));
    let outs = a.at(100).run("f1", &task("t2", "e2"));
    let starting2 = outs[0].clone();
    expect_update(&starting2, "f1", starting("t2", "e2", 100));

    assert_eq!(a.at(500).feed(Input::MasterDisconnected), vec![]);
    // Work goes on; updates queue up but none is sent, retries included.
    assert_eq!(
        a.at(600).prepared("f1", "t1", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "default")
        }]
    );
    assert_eq!(
        a.at(700).executor_registered("f1", "default"),
        vec![launch_of("f1", &task("t1", ""))]
    );
    assert_eq!(
        a.at(800)
            .executor_status("f1", "default", exec_status("t1", TaskState::TaskRunning)),
        vec![]
    );
    for t in [1_000, 2_000, 3_000, 5_000, 8_000, 10_000] {
        assert_eq!(a.tick(t), vec![], "at {t}");
    }
    // Registered again: the head of every stream goes out, in task order...
    assert_eq!(
        a.at(10_500).feed(Input::Registered {
            agent_id: AGENT_ID.into()
        }),
        vec![starting1.clone(), starting2.clone()]
    );
    // ...with the backoff started afresh (not grown while nobody listened).
    assert_eq!(a.tick(11_499), vec![]);
    assert_eq!(a.tick(11_500), vec![starting1.clone(), starting2.clone()]);
    // The rest follows acknowledgements as usual.
    let outs = a.at(11_600).ack("f1", "t1", &u1);
    assert_eq!(outs.len(), 1);
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskRunning,
            Reason::Unspecified,
            "",
            800,
        ),
    );
}

// =====================================================================================
// 3. Kills
// =====================================================================================

#[test]
fn kill_while_preparing_ends_the_task_when_preparation_reports() {
    let mut a = Agent::new();
    let outs = a.run("f1", &task("t1", ""));
    let u = expect_update(&outs[0], "f1", starting("t1", "default", 0));
    // Nothing to stop yet: no message.
    assert_eq!(a.at(100).kill("f1", "t1"), vec![]);
    assert_eq!(a.kill("f1", "t1"), vec![], "a second kill adds nothing");
    // Preparation done: the task ends KILLED without an executor being started; the
    // update waits for STARTING's acknowledgement.
    assert_eq!(a.at(200).prepared("f1", "t1", Ok(())), vec![]);
    assert_eq!(a.core.live_tasks(), 0);
    let outs = a.at(300).ack("f1", "t1", &u);
    assert_eq!(outs.len(), 1);
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskKilled,
            Reason::KilledByFramework,
            "killed before it started",
            200,
        ),
    );
}

#[test]
fn kill_while_awaiting_the_executor_ends_the_task_at_once() {
    let mut a = Agent::new();
    let outs = a.run("f1", &task("t1", ""));
    let u = expect_update(&outs[0], "f1", starting("t1", "default", 0));
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    assert_eq!(
        a.at(200).prepared("f1", "t1", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "default")
        }]
    );
    let outs = a.at(300).kill("f1", "t1");
    assert_eq!(outs.len(), 1);
    let u = expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskKilled,
            Reason::KilledByFramework,
            "killed before it started",
            300,
        ),
    );
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    // The executor registers after all: there is nothing to launch, so it idles and is
    // shut down after the idle time.
    assert_eq!(a.at(400).executor_registered("f1", "default"), vec![]);
    assert_eq!(a.tick(30_399), vec![]);
    assert_eq!(
        a.tick(30_400),
        vec![
            to_executor(
                "f1",
                "default",
                agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
            ),
            Output::ReapExecutor {
                key: key("f1", "default")
            },
        ]
    );
}

#[test]
fn kill_of_a_launched_task_sends_killing_then_the_executors_killed() {
    let mut a = Agent::new();
    a.start("f1", &task("t1", ""), true);
    let outs = a.at(1_000).kill("f1", "t1");
    assert_eq!(outs.len(), 2);
    let u = expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskKilling,
            Reason::KilledByFramework,
            "",
            1_000,
        ),
    );
    assert_eq!(
        outs[1],
        to_executor(
            "f1",
            "default",
            agent_to_executor::Msg::Kill(v1::ExecutorKill {
                task_id: "t1".into()
            })
        )
    );
    assert_eq!(a.kill("f1", "t1"), vec![], "asked once");
    // The executor reports KILLED; it waits for KILLING's acknowledgement.
    let killed = ExecutorStatus {
        reason: Reason::KilledByFramework as i32,
        message: "killed on request".into(),
        ..exec_status("t1", TaskState::TaskKilled)
    };
    assert_eq!(a.at(1_100).executor_status("f1", "default", killed), vec![]);
    let outs = a.at(1_200).ack("f1", "t1", &u);
    assert_eq!(outs.len(), 1);
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskKilled,
            Reason::KilledByFramework,
            "killed on request",
            1_100,
        ),
    );
}

#[test]
fn kill_of_an_unknown_task_reports_it_lost() {
    let mut a = Agent::new();
    let outs = a.at(50).kill("f1", "ghost");
    assert_eq!(
        outs,
        vec![to_master(
            "f1",
            TaskStatus {
                task_id: "ghost".into(),
                state: TaskState::TaskLost as i32,
                reason: Reason::Reconciliation as i32,
                message: "the agent has no such task".into(),
                agent_id: AGENT_ID.into(),
                timestamp_ms: 50,
                ..Default::default()
            }
        )]
    );
    assert_eq!(a.core.live_tasks(), 0);
}

// =====================================================================================
// 4. Executors that end
// =====================================================================================

#[test]
fn executor_exiting_unexpectedly_fails_its_live_tasks_only() {
    let mut a = Agent::new();
    a.start("f1", &task("t1", "e1"), true);
    a.start("f1", &task("t2", "e1"), false);
    a.start("f1", &task("t3", "e2"), true);
    let outs = a
        .at(5_000)
        .executor_exited("f1", "e1", "killed by signal 9");
    assert_eq!(outs.len(), 3);
    assert_eq!(outs[2], exited("f1", "e1", "killed by signal 9", None));
    let why = "executor e1: killed by signal 9";
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskFailed,
            Reason::ExecutorTerminated,
            why,
            5_000,
        ),
    );
    expect_update(
        &outs[1],
        "f1",
        status(
            "t2",
            "e1",
            TaskState::TaskFailed,
            Reason::ExecutorTerminated,
            why,
            5_000,
        ),
    );
    assert_eq!(a.core.live_tasks(), 1, "t3 runs in another executor");
    // A task killed before its executor died ends KILLED, not FAILED.
    let outs = a.at(6_000).kill("f1", "t3");
    let u = expect_update(
        &outs[0],
        "f1",
        status(
            "t3",
            "e2",
            TaskState::TaskKilling,
            Reason::KilledByFramework,
            "",
            6_000,
        ),
    );
    assert_eq!(
        a.executor_exited("f1", "e2", "exited"),
        vec![exited("f1", "e2", "exited", None)]
    );
    let outs = a.ack("f1", "t3", &u);
    expect_update(
        &outs[0],
        "f1",
        status(
            "t3",
            "e2",
            TaskState::TaskKilled,
            Reason::KilledByFramework,
            "executor e2: exited",
            6_000,
        ),
    );
}

#[test]
fn executor_exiting_before_it_registers_is_a_start_failure() {
    let mut a = Agent::new();
    let outs = a.run("f1", &task("t1", ""));
    let u = expect_update(&outs[0], "f1", starting("t1", "default", 0));
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    assert_eq!(
        a.at(100).prepared("f1", "t1", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "default")
        }]
    );
    let outs = a
        .at(200)
        .executor_exited("f1", "default", "could not start: no such file");
    assert_eq!(outs.len(), 2);
    assert_eq!(
        outs[1],
        exited("f1", "default", "could not start: no such file", None)
    );
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskFailed,
            Reason::ExecutorStartFailed,
            "executor default: could not start: no such file",
            200,
        ),
    );
}

#[test]
fn task_still_preparing_survives_its_executors_exit_and_gets_a_new_one() {
    // Regression: a task still being prepared was failed (EXECUTOR_TERMINATED) when
    // an executor it never ran in exited.
    let mut a = Agent::new();
    let t1 = task("t1", "e1");
    a.start("f1", &t1, true);
    let t2 = task("t2", "e1");
    let outs = a.at(1_000).run("f1", &t2);
    let u2 = expect_update(&outs[0], "f1", starting("t2", "e1", 1_000));
    let outs = a.at(1_100).executor_exited("f1", "e1", "crashed");
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[1], exited("f1", "e1", "crashed", None));
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskFailed,
            Reason::ExecutorTerminated,
            "executor e1: crashed",
            1_100,
        ),
    );
    assert_eq!(a.core.live_tasks(), 1);
    // Nothing is queued behind STARTING...
    assert_eq!(a.ack("f1", "t2", &u2), vec![]);
    // ...and once ready the task starts a fresh executor.
    assert_eq!(
        a.at(1_200).prepared("f1", "t2", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "e1")
        }]
    );
    assert_eq!(
        a.executor_registered("f1", "e1"),
        vec![launch_of("f1", &t2)]
    );
}

// =====================================================================================
// 5. Idle executors
// =====================================================================================

#[test]
fn idle_executor_is_shut_down_and_reaped_once() {
    let mut a = Agent::new();
    a.start("f1", &task("t1", ""), true);
    let outs =
        a.at(5_000)
            .executor_status("f1", "default", exec_status("t1", TaskState::TaskFinished));
    let u = expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskFinished,
            Reason::Unspecified,
            "",
            5_000,
        ),
    );
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    // Idle since 5 s: shut down 30 s later, once.
    assert_eq!(a.tick(34_999), vec![]);
    assert_eq!(
        a.tick(35_000),
        vec![
            to_executor(
                "f1",
                "default",
                agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
            ),
            Output::ReapExecutor {
                key: key("f1", "default")
            },
        ]
    );
    assert_eq!(a.tick(70_000), vec![], "asked once");
}

#[test]
fn executor_registering_with_nothing_to_run_idles_out() {
    let mut a = Agent::new();
    assert_eq!(a.at(1_000).executor_registered("f1", "orphan"), vec![]);
    assert_eq!(a.tick(30_999), vec![]);
    assert_eq!(
        a.tick(31_000),
        vec![
            to_executor(
                "f1",
                "orphan",
                agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
            ),
            Output::ReapExecutor {
                key: key("f1", "orphan")
            },
        ]
    );
}

#[test]
fn task_for_an_executor_that_is_shutting_down_waits_for_a_fresh_one() {
    // Regression: a second executor with the same id was spawned while the old one
    // was still exiting, and the old one's exit then failed the new task.
    let mut a = Agent::new();
    a.start("f1", &task("t1", ""), true);
    let outs =
        a.at(5_000)
            .executor_status("f1", "default", exec_status("t1", TaskState::TaskFinished));
    let u = expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskFinished,
            Reason::Unspecified,
            "",
            5_000,
        ),
    );
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    assert_eq!(
        a.tick(35_000),
        vec![
            to_executor(
                "f1",
                "default",
                agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
            ),
            Output::ReapExecutor {
                key: key("f1", "default")
            },
        ]
    );
    // A new task for the same executor arrives while the old process is exiting.
    let t2 = task("t2", "");
    let outs = a.at(35_100).run("f1", &t2);
    let u = expect_update(&outs[0], "f1", starting("t2", "default", 35_100));
    assert_eq!(a.ack("f1", "t2", &u), vec![]);
    // Ready: it waits for the old executor to go...
    assert_eq!(a.at(35_200).prepared("f1", "t2", Ok(())), vec![]);
    // ...which it does: a fresh one is started, and the task launched in it.
    assert_eq!(
        a.at(35_300)
            .executor_exited("f1", "default", "exited with status 0"),
        vec![Output::SpawnExecutor {
            key: key("f1", "default")
        }]
    );
    assert_eq!(
        a.at(35_400).executor_registered("f1", "default"),
        vec![launch_of("f1", &t2)]
    );
    assert_eq!(a.core.live_tasks(), 1);
}

// =====================================================================================
// 6. Preparation failures
// =====================================================================================

#[test]
fn failed_fetch_fails_the_task_with_fetch_failed_and_other_errors_with_sandbox_failed() {
    let mut a = Agent::new();
    for (t0, id, err, reason) in [
        (
            100,
            "t1",
            "fetch of module 0123: connection refused",
            Reason::FetchFailed,
        ),
        (
            300,
            "t2",
            "creating the sandbox: permission denied",
            Reason::SandboxFailed,
        ),
    ] {
        let outs = a.at(t0).run("f1", &task(id, ""));
        let u = expect_update(&outs[0], "f1", starting(id, "default", t0));
        assert_eq!(a.ack("f1", id, &u), vec![]);
        let failed = if reason == Reason::FetchFailed {
            agora_agent_core::PrepareFailed::Fetch(err.into())
        } else {
            agora_agent_core::PrepareFailed::Sandbox(err.into())
        };
        let outs = a.at(t0 + 100).prepared("f1", id, Err(failed));
        assert_eq!(outs.len(), 1, "no executor is started");
        expect_update(
            &outs[0],
            "f1",
            status(id, "default", TaskState::TaskFailed, reason, err, t0 + 100),
        );
    }
    assert_eq!(a.core.live_tasks(), 0);
}

// =====================================================================================
// 7 and 8. hello() for re-registration, and forgetting finished tasks
// =====================================================================================

#[test]
fn hello_lists_live_tasks_with_their_latest_status() {
    let mut fresh = AgentCore::new(config());
    let h = fresh.hello();
    assert_eq!(
        h,
        v1::AgentHello {
            agent_id: String::new(),
            hostname: "host-1".into(),
            resources: Resources::cpus_mem(4000, 8 * GIB).to_proto(),
            attributes: vec![Attribute {
                name: "zone".into(),
                value: "z1".into()
            }],
            tasks: vec![],
            registration_token: fresh.registration_token(),
            http_address: String::new(),
            completed: vec![],
        }
    );
    assert_eq!(fresh.handle(Input::Tick, 0), vec![]);

    let mut a = Agent::new();
    let (t1, t2, t3) = (task("t1", ""), task("t2", ""), task("t3", ""));
    a.start("f1", &t1, true);
    let outs = a.at(2_000).run("f2", &t2);
    expect_update(&outs[0], "f2", starting("t2", "default", 2_000));
    a.start("f1", &t3, false);
    // t1 finishes; its FINISHED is not acknowledged yet.
    let outs =
        a.at(3_000)
            .executor_status("f1", "default", exec_status("t1", TaskState::TaskFinished));
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskFinished,
            Reason::Unspecified,
            "",
            3_000,
        ),
    );
    // t1 ended but its update is unacknowledged: listed with its end (the master may
    // not have the update); t3 runs; t2 is still starting.
    let h = a.core.hello();
    assert_eq!(
        (h.agent_id.as_str(), h.hostname.as_str()),
        (AGENT_ID, "host-1")
    );
    let listed: Vec<(String, String, TaskState)> = h
        .tasks
        .iter()
        .map(|rt: &RunningTask| {
            (
                rt.framework_id.clone(),
                rt.task.as_ref().unwrap().task_id.clone(),
                rt.status.as_ref().unwrap().state(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("f1".to_string(), "t1".to_string(), TaskState::TaskFinished),
            ("f1".to_string(), "t3".to_string(), TaskState::TaskRunning),
            ("f2".to_string(), "t2".to_string(), TaskState::TaskStarting),
        ]
    );
    // Each entry carries the whole task and the latest status as sent.
    assert_eq!(h.tasks[1].task.as_ref().unwrap(), &t3);
    let st = h.tasks[2].status.clone().unwrap();
    assert_eq!(
        TaskStatus { uuid: vec![], ..st },
        starting("t2", "default", 2_000)
    );
}

#[test]
fn latest_status_in_hello_is_the_newest_even_if_not_yet_sent() {
    let mut a = Agent::new();
    let t1 = task("t1", "");
    let outs = a.run("f1", &t1);
    expect_update(&outs[0], "f1", starting("t1", "default", 0));
    assert_eq!(
        a.at(100).prepared("f1", "t1", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "default")
        }]
    );
    assert_eq!(
        a.executor_registered("f1", "default"),
        vec![launch_of("f1", &t1)]
    );
    assert_eq!(
        a.at(200)
            .executor_status("f1", "default", exec_status("t1", TaskState::TaskRunning)),
        vec![]
    );
    let h = a.core.hello();
    assert_eq!(h.tasks.len(), 1);
    let st = h.tasks[0].status.clone().unwrap();
    assert_eq!(
        TaskStatus { uuid: vec![], ..st },
        status(
            "t1",
            "default",
            TaskState::TaskRunning,
            Reason::Unspecified,
            "",
            200
        )
    );
}

#[test]
fn terminal_task_is_forgotten_once_its_last_update_is_acknowledged() {
    let mut a = Agent::new();
    a.start("f1", &task("t1", ""), true);
    let outs =
        a.at(1_000)
            .executor_status("f1", "default", exec_status("t1", TaskState::TaskFinished));
    let fin = outs[0].clone();
    let u = expect_update(
        &fin,
        "f1",
        status(
            "t1",
            "default",
            TaskState::TaskFinished,
            Reason::Unspecified,
            "",
            1_000,
        ),
    );
    assert_eq!(a.core.live_tasks(), 0);
    assert_eq!(
        a.core.hello().tasks.len(),
        1,
        "still reported to a master until its end is acknowledged"
    );
    // Not forgotten yet: the update is retried and a kill is a no-op.
    assert_eq!(a.tick(2_000), vec![fin]);
    assert_eq!(a.kill("f1", "t1"), vec![]);
    // Acknowledged: forgotten. No retries; a kill now finds no such task.
    assert_eq!(a.at(2_100).ack("f1", "t1", &u), vec![]);
    // (Only its idle executor is dealt with.)
    assert_eq!(
        a.tick(100_000),
        vec![
            to_executor(
                "f1",
                "default",
                agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
            ),
            Output::ReapExecutor {
                key: key("f1", "default")
            },
        ]
    );
    let outs = a.kill("f1", "t1");
    assert_eq!(
        outs,
        vec![to_master(
            "f1",
            TaskStatus {
                task_id: "t1".into(),
                state: TaskState::TaskLost as i32,
                reason: Reason::Reconciliation as i32,
                message: "the agent has no such task".into(),
                agent_id: AGENT_ID.into(),
                timestamp_ms: 100_000,
                ..Default::default()
            }
        )]
    );
    assert!(a.core.hello().tasks.is_empty());
    // It joins the history the hello carries (for a master that restarts), with its
    // end and without its arguments and environment; the history survives a restart
    // of the agent and is bounded.
    let h = a.core.hello();
    assert_eq!(h.completed.len(), 1);
    let c = &h.completed[0];
    let info = c.task.as_ref().unwrap();
    assert_eq!(
        (c.framework_id.as_str(), info.task_id.as_str()),
        ("f1", "t1")
    );
    assert!(info.args.is_empty() && info.env.is_empty());
    assert!(c.status.as_ref().unwrap().state().is_terminal());
    let state = a.core.checkpoint_state();
    let (back, _) = AgentCore::recover(config(), state, 200_000);
    assert_eq!(back.hello().completed, h.completed);
}

#[test]
fn the_history_of_ended_tasks_keeps_the_newest_thousand() {
    let mut a = Agent::new();
    let mut deltas = agora_agent_core::checkpoint::CheckpointState::default();
    for i in 0..1_005 {
        let id = format!("t{i}");
        let outs = a.run("f1", &task(&id, ""));
        let u = expect_update(&outs[0], "f1", starting(&id, "default", a.now));
        assert_eq!(a.ack("f1", &id, &u), vec![]);
        // Killed while preparing: it ends as soon as preparation reports.
        a.kill("f1", &id);
        let outs = a.prepared("f1", &id, Ok(()));
        let u = expect_update(
            &outs[0],
            "f1",
            status(
                &id,
                "default",
                TaskState::TaskKilled,
                Reason::KilledByFramework,
                "killed before it started",
                a.now,
            ),
        );
        assert_eq!(a.ack("f1", &id, &u), vec![]);
        if let Some(d) = a.core.take_checkpoint() {
            deltas.apply(&d);
        }
    }
    let h = a.core.hello();
    assert_eq!(h.completed.len(), agora_agent_core::MAX_COMPLETED);
    let first = h.completed[0].task.as_ref().unwrap().task_id.clone();
    let last = h.completed[999].task.as_ref().unwrap().task_id.clone();
    assert_eq!((first.as_str(), last.as_str()), ("t5", "t1004"));
    // What the checkpoint holds is the same thousand.
    assert_eq!(deltas.completed.len(), 1_000);
    let (back, _) = AgentCore::recover(config(), deltas, 10);
    assert_eq!(back.hello().completed, h.completed);
}

// =====================================================================================
// ShutdownFramework
// =====================================================================================

#[test]
fn shutdown_framework_kills_its_tasks_and_still_reports_how_they_ended() {
    // Regression: the queue of every task was cleared, dropping terminal updates the
    // master needs to free the tasks' resources.
    let mut a = Agent::new();
    a.start("f1", &task("t1", "e1"), true);
    // t2 waits for its executor; its STARTING is not acknowledged.
    let outs = a.at(1_000).run("f1", &task("t2", "e2"));
    expect_update(&outs[0], "f1", starting("t2", "e2", 1_000));
    assert_eq!(
        a.prepared("f1", "t2", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "e2")
        }]
    );
    // Another framework's task is not touched.
    a.start("f2", &task("t3", "e1"), true);

    let outs = a.at(2_000).feed(Input::ShutdownFramework {
        framework_id: "f1".into(),
    });
    assert_eq!(outs.len(), 5, "{outs:?}");
    // The framework's registered executor is told to go (not left to idle out);
    // e2 never registered and is not asked.
    assert_eq!(
        outs[3..],
        [
            to_executor(
                "f1",
                "e1",
                agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
            ),
            Output::ReapExecutor {
                key: key("f1", "e1")
            },
        ]
    );
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskKilling,
            Reason::KilledByFramework,
            "",
            2_000,
        ),
    );
    assert_eq!(
        outs[1],
        to_executor(
            "f1",
            "e1",
            agent_to_executor::Msg::Kill(v1::ExecutorKill {
                task_id: "t1".into()
            })
        )
    );
    // t2 never started: KILLED at once, and sent now rather than behind STARTING.
    let u2 = expect_update(
        &outs[2],
        "f1",
        status(
            "t2",
            "e2",
            TaskState::TaskKilled,
            Reason::KilledByFramework,
            "killed before it started",
            2_000,
        ),
    );
    // The master acknowledges it itself (the framework is gone): t2 is forgotten.
    assert_eq!(a.ack("f1", "t2", &u2), vec![]);
    // The executor confirms t1's end: reported at once (KILLING was dropped).
    let killed = ExecutorStatus {
        reason: Reason::KilledByFramework as i32,
        ..exec_status("t1", TaskState::TaskKilled)
    };
    let outs = a.at(2_500).executor_status("f1", "e1", killed);
    assert_eq!(outs.len(), 1);
    let u1 = expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskKilled,
            Reason::KilledByFramework,
            "",
            2_500,
        ),
    );
    assert_eq!(a.ack("f1", "t1", &u1), vec![]);
    let h = a.core.hello();
    assert_eq!(h.tasks.len(), 1);
    assert_eq!(
        (
            h.tasks[0].framework_id.as_str(),
            h.tasks[0].task.as_ref().unwrap().task_id.as_str()
        ),
        ("f2", "t3")
    );
    assert_eq!(
        a.tick(50_000)
            .iter()
            .filter(|o| matches!(o, Output::ToMaster(_)))
            .count(),
        0
    );
}

// =====================================================================================
// SHUTDOWN of one executor, and MESSAGE both ways
// =====================================================================================

#[test]
fn shutdown_executor_kills_its_tasks_with_reason_executor_shutdown_and_stops_it() {
    let mut a = Agent::new();
    a.start("f1", &task("t1", "e1"), true);
    a.start("f1", &task("t2", "e2"), true);
    let outs = a.at(1_000).feed(Input::ShutdownExecutor {
        key: key("f1", "e1"),
    });
    assert_eq!(outs.len(), 4, "{outs:?}");
    let u = expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskKilling,
            Reason::KilledByFramework,
            "",
            1_000,
        ),
    );
    assert_eq!(
        outs[1..],
        [
            to_executor(
                "f1",
                "e1",
                agent_to_executor::Msg::Kill(v1::ExecutorKill {
                    task_id: "t1".into()
                })
            ),
            to_executor(
                "f1",
                "e1",
                agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
            ),
            Output::ReapExecutor {
                key: key("f1", "e1")
            },
        ]
    );
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    // The executor reports the kill: the task ends KILLED naming the shutdown.
    let outs = a
        .at(1_100)
        .executor_status("f1", "e1", exec_status("t1", TaskState::TaskKilled));
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskKilled,
            Reason::ExecutorShutdown,
            "killed: the framework shut down executor e1",
            1_100,
        ),
    );
    // Its exit is reported (the framework asked for it); e2 is untouched.
    assert_eq!(
        a.executor_exited("f1", "e1", "exited with code 0"),
        vec![exited("f1", "e1", "exited with code 0", Some(0))]
    );
    assert_eq!(a.core.live_tasks(), 1);
}

#[test]
fn a_shut_down_executor_whose_exit_comes_before_its_report_still_names_the_shutdown() {
    let mut a = Agent::new();
    a.start("f1", &task("t1", "e1"), true);
    let outs = a.at(1_000).feed(Input::ShutdownExecutor {
        key: key("f1", "e1"),
    });
    let u = expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskKilling,
            Reason::KilledByFramework,
            "",
            1_000,
        ),
    );
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    // The process is seen gone before its KILLED report is read.
    let outs = a
        .at(1_100)
        .executor_exited("f1", "e1", "exited with code 0");
    expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskKilled,
            Reason::ExecutorShutdown,
            "killed: the framework shut down executor e1 (exited with code 0)",
            1_100,
        ),
    );
}

#[test]
fn messages_are_relayed_to_a_registered_executor_and_back_to_the_master() {
    let mut a = Agent::new();
    a.start("f1", &task("t1", "e1"), true);
    assert_eq!(
        a.feed(Input::FrameworkMessage {
            key: key("f1", "e1"),
            data: b"hello".to_vec()
        }),
        vec![to_executor(
            "f1",
            "e1",
            agent_to_executor::Msg::Message(v1::ExecutorMessage {
                data: b"hello".to_vec()
            })
        )]
    );
    // No such executor here: dropped (best effort).
    assert_eq!(
        a.feed(Input::FrameworkMessage {
            key: key("f1", "nope"),
            data: b"x".to_vec()
        }),
        vec![]
    );
    assert_eq!(
        a.feed(Input::ExecutorMessage {
            key: key("f1", "e1"),
            data: b"receipt".to_vec()
        }),
        vec![Output::ToMaster(AgentToMaster {
            msg: Some(agent_to_master::Msg::ExecutorMessage(
                v1::ExecutorToFramework {
                    framework_id: "f1".into(),
                    executor_id: "e1".into(),
                    data: b"receipt".to_vec(),
                }
            )),
        })]
    );
    // Too big to relay: dropped.
    assert_eq!(
        a.feed(Input::ExecutorMessage {
            key: key("f1", "e1"),
            data: vec![0; agora_agent_core::MAX_MESSAGE_BYTES + 1]
        }),
        vec![]
    );
}

#[test]
fn the_default_executor_ids_are_the_ones_the_master_routes_to() {
    assert_eq!(
        agora_agent_core::DEFAULT_EXECUTOR,
        agora_proto::default_executor_id(false)
    );
    assert_eq!(
        agora_agent_core::DEFAULT_NATIVE_EXECUTOR,
        agora_proto::default_executor_id(true)
    );
}

// =====================================================================================
// Function hosts (issue 6)
// =====================================================================================

/// A function host task: the module served as function `name` by an executor of its
/// own (`fn-<id>`).
fn fn_task(id: &str, name: &str, memory_bytes: u64) -> TaskInfo {
    let mut t = task(id, &format!("fn-{id}"));
    t.args.clear();
    t.env.clear();
    t.function = Some(v1::FunctionInfo {
        name: name.into(),
        tenant: "web".into(),
        memory_bytes,
        max_concurrency: 4,
        queue_len: 8,
        max_queue_wait_ms: 500,
        tenant_limit: None,
        allowed_outbound_hosts: Vec::new(),
    });
    t
}

/// The launch of `fn_task`: the usual module fields, the function, and its
/// per-request memory.
fn fn_launch_of(fid: &str, t: &TaskInfo, memory_bytes: u64) -> Output {
    let Output::ToExecutor {
        key,
        msg:
            AgentToExecutor {
                msg: Some(agent_to_executor::Msg::Launch(mut l)),
            },
    } = launch_of(fid, t)
    else {
        unreachable!()
    };
    l.args.clear();
    l.env.clear();
    l.memory_bytes = memory_bytes;
    l.function = t.function.clone();
    Output::ToExecutor {
        key,
        msg: AgentToExecutor {
            msg: Some(agent_to_executor::Msg::Launch(l)),
        },
    }
}

#[test]
fn function_host_runs_in_a_function_executor_and_is_routed_to_only_while_running() {
    let mut a = Agent::new();
    let h1 = fn_task("h1", "echo", 32 * MIB as u64);

    let outs = a.at(100).run("f1", &h1);
    assert_eq!(outs.len(), 2, "{outs:?}");
    let u = expect_update(&outs[0], "f1", starting("h1", "fn-h1", 100));
    assert_eq!(
        outs[1],
        Output::Prepare {
            key: key("f1", "h1"),
            task: h1.clone()
        }
    );
    assert_eq!(a.ack("f1", "h1", &u), vec![]);
    assert_eq!(
        a.prepared("f1", "h1", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "fn-h1")
        }]
    );
    assert_eq!(
        a.core.executor_kind(&key("f1", "fn-h1")),
        Some(ExecutorKind::Function)
    );
    // The executor's cgroup is sized to the host task's resources, like any task's.
    assert_eq!(
        a.core.executor_demand()[&key("f1", "fn-h1")],
        Resources::cpus_mem(500, 64 * MIB)
    );
    // The launch carries the function and its per-request memory (not the task's).
    assert_eq!(
        a.executor_registered("f1", "fn-h1"),
        vec![fn_launch_of("f1", &h1, 32 * MIB as u64)]
    );
    // Not routed to before it says RUNNING (it is not listening yet).
    assert!(a.core.function_hosts().is_empty());
    assert!(!a.core.take_function_hosts_changed());

    let outs = a.at(200).executor_status(
        "f1",
        "fn-h1",
        ExecutorStatus {
            instantiate_us: 1_234,
            ..exec_status("h1", TaskState::TaskRunning)
        },
    );
    let mut running = status(
        "h1",
        "fn-h1",
        TaskState::TaskRunning,
        Reason::Unspecified,
        "",
        200,
    );
    running.instantiate_us = 1_234;
    let u = expect_update(&outs[0], "f1", running);
    assert_eq!(a.ack("f1", "h1", &u), vec![]);
    assert!(a.core.take_function_hosts_changed());
    assert!(!a.core.take_function_hosts_changed(), "reported once");
    assert_eq!(
        a.core.function_hosts(),
        [("echo".to_string(), vec![key("f1", "h1")])].into()
    );

    // A kill takes it out of the routes at once (KILLING), before the host has
    // drained its requests and said KILLED.
    let outs = a.at(300).kill("f1", "h1");
    assert_eq!(outs.len(), 2, "{outs:?}");
    let u = expect_update(
        &outs[0],
        "f1",
        status(
            "h1",
            "fn-h1",
            TaskState::TaskKilling,
            Reason::KilledByFramework,
            "",
            300,
        ),
    );
    assert_eq!(
        outs[1],
        to_executor(
            "f1",
            "fn-h1",
            agent_to_executor::Msg::Kill(v1::ExecutorKill {
                task_id: "h1".into()
            })
        )
    );
    assert!(a.core.take_function_hosts_changed());
    assert!(a.core.function_hosts().is_empty());
    assert_eq!(a.ack("f1", "h1", &u), vec![]);
    let outs = a.at(400).executor_status(
        "f1",
        "fn-h1",
        ExecutorStatus {
            reason: Reason::KilledByFramework as i32,
            message: "killed; function echo stopped serving".into(),
            ..exec_status("h1", TaskState::TaskKilled)
        },
    );
    expect_update(
        &outs[0],
        "f1",
        status(
            "h1",
            "fn-h1",
            TaskState::TaskKilled,
            Reason::KilledByFramework,
            "killed; function echo stopped serving",
            400,
        ),
    );
}

#[test]
fn function_host_without_its_own_memory_limit_gets_the_tasks_memory_per_request() {
    let mut a = Agent::new();
    let h2 = fn_task("h2", "echo", 0);
    let u = expect_update(
        &a.at(10).run("f1", &h2)[0],
        "f1",
        starting("h2", "fn-h2", 10),
    );
    a.ack("f1", "h2", &u);
    a.prepared("f1", "h2", Ok(()));
    assert_eq!(
        a.executor_registered("f1", "fn-h2"),
        vec![fn_launch_of("f1", &h2, 64 * MIB as u64)]
    );
}

#[test]
fn function_tasks_that_cannot_run_end_in_task_error_naming_why() {
    let mut a = Agent::new();
    let mut no_module = fn_task("n1", "echo", 0);
    no_module.module = None;
    let mut with_command = fn_task("n2", "echo", 0);
    with_command.command = Some(v1::CommandInfo {
        shell: true,
        value: "echo hi".into(),
        ..Default::default()
    });
    let mut no_name = fn_task("n3", "", 0);
    no_name.task_id = "n3".into();
    let mut no_executor = fn_task("n4", "echo", 0);
    no_executor.executor_id.clear();
    let cases = [
        (no_module, "fn-n1", "function host task n1 has no module; set TaskInfo.module to the function's uploaded wasm module"),
        (with_command, "fn-n2", "task n2 has both a function and a command; a function host serves a wasm module, so drop one of them"),
        (no_name, "fn-n3", "function host task n3 names no function; set FunctionInfo.name (it is the NAME in /fn/NAME/...)"),
        // Reported under the executor id the master routes an id-less task to.
        (no_executor, "default", "function host task n4 names no executor id; give each host one of its own, e.g. fn-n4"),
    ];
    for (t, exec, why) in cases {
        let outs = a.at(50).run("f1", &t);
        // Nothing to prepare, no executor: the error is the only update.
        assert_eq!(outs.len(), 1, "{outs:?}");
        expect_update(
            &outs[0],
            "f1",
            status(
                &t.task_id,
                exec,
                TaskState::TaskError,
                Reason::InvalidTask,
                why,
                50,
            ),
        );
    }
    assert_eq!(a.core.live_tasks(), 0);
    assert!(a.core.executor_kind(&key("f1", "fn-n1")).is_none());
}

#[test]
fn a_wasm_task_sent_to_a_function_hosts_executor_is_refused() {
    let mut a = Agent::new();
    let h3 = fn_task("h3", "echo", 0);
    let u = expect_update(
        &a.at(10).run("f1", &h3)[0],
        "f1",
        starting("h3", "fn-h3", 10),
    );
    a.ack("f1", "h3", &u);
    a.prepared("f1", "h3", Ok(()));
    assert_eq!(
        a.executor_registered("f1", "fn-h3"),
        vec![fn_launch_of("f1", &h3, 64 * MIB as u64)]
    );
    let w = task("w9", "fn-h3");
    let u = expect_update(
        &a.at(500).run("f1", &w)[0],
        "f1",
        starting("w9", "fn-h3", 500),
    );
    assert_eq!(a.prepared("f1", "w9", Ok(())), vec![]);
    let outs = a.ack("f1", "w9", &u);
    expect_update(
        &outs[0],
        "f1",
        status(
            "w9",
            "fn-h3",
            TaskState::TaskError,
            Reason::InvalidTask,
            "executor fn-h3 runs function host tasks; give a wasm task another executor id",
            500,
        ),
    );
}

#[test]
fn hello_carries_the_agents_http_address() {
    let mut core = AgentCore::new(config());
    assert_eq!(core.hello().http_address, "");
    core.set_http_address("host-1:7071".into());
    assert_eq!(core.hello().http_address, "host-1:7071");
}

// =====================================================================================
// Found by fuzzing (fuzz/, target agent_core)
// =====================================================================================

/// Ids become directories (`<work>/sandboxes/<framework>/<task>`, the executor's
/// directory and cgroup). A RUN_TASK whose ids would leave them (`..`, a '/') ends
/// TASK_ERROR at once: nothing is prepared, no executor started. (The agent used to
/// ask the shell to build `<work>/sandboxes/f1/..`.)
#[test]
fn run_task_with_ids_that_leave_the_work_dir_is_refused_without_a_sandbox() {
    for (fid, tid, exec) in [
        ("f1", "..", "e1"),
        ("f1", "a/../../b", "e1"),
        ("..", "t1", "e1"),
        ("f1", "t1", "../../etc"),
        ("f1", "t1", "."),
    ] {
        let mut a = Agent::new();
        let outs = a.run(fid, &task(tid, exec));
        assert_eq!(outs.len(), 1, "{fid}/{tid}/{exec}: {outs:?}");
        let Output::ToMaster(m) = &outs[0] else {
            panic!("{fid}/{tid}/{exec}: {outs:?}");
        };
        let Some(v1::agent_to_master::Msg::StatusUpdate(u)) = &m.msg else {
            panic!("{m:?}");
        };
        let st = u.status.as_ref().unwrap();
        assert_eq!(st.state(), TaskState::TaskError, "{st:?}");
        assert_eq!(st.reason(), Reason::InvalidTask, "{st:?}");
        assert!(st.message.contains("cannot name a directory"), "{st:?}");
        assert_eq!(a.core.live_tasks(), 0);
    }
}

// =====================================================================================
// Drain: the agent stops with its tasks
// =====================================================================================

#[test]
fn drain_kills_every_task_in_every_phase_with_reason_agent_drained_and_drops_new_ones() {
    let drained = "killed: the agent was stopped with its tasks (drain)";
    let mut a = Agent::new();
    // t1 runs on e1; t2 waits for e2 to start; t3 is still being prepared.
    a.start("f1", &task("t1", "e1"), true);
    let outs = a.run("f1", &task("t2", "e2"));
    let u = expect_update(&outs[0], "f1", starting("t2", "e2", 0));
    assert_eq!(a.ack("f1", "t2", &u), vec![]);
    assert_eq!(
        a.prepared("f1", "t2", Ok(())),
        vec![Output::SpawnExecutor {
            key: key("f1", "e2")
        }]
    );
    let outs = a.run("f1", &task("t3", "e3"));
    let u = expect_update(&outs[0], "f1", starting("t3", "e3", 0));
    assert_eq!(a.ack("f1", "t3", &u), vec![]);

    let outs = a.at(1_000).feed(Input::Drain);
    // e1: its task is killed, then it is told to go; t2 ends at once; t3 waits for
    // its preparation to report.
    let u1 = expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskKilling,
            Reason::KilledByFramework,
            "",
            1_000,
        ),
    );
    assert_eq!(
        outs[1..4],
        [
            to_executor(
                "f1",
                "e1",
                agent_to_executor::Msg::Kill(v1::ExecutorKill {
                    task_id: "t1".into()
                })
            ),
            to_executor(
                "f1",
                "e1",
                agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
            ),
            Output::ReapExecutor {
                key: key("f1", "e1")
            },
        ]
    );
    let u2 = expect_update(
        &outs[4],
        "f1",
        status(
            "t2",
            "e2",
            TaskState::TaskKilled,
            Reason::AgentDrained,
            drained,
            1_000,
        ),
    );
    assert_eq!(outs.len(), 5, "{outs:?}");
    assert_eq!(a.ack("f1", "t2", &u2), vec![]);
    assert_eq!(a.ack("f1", "t1", &u1), vec![]);

    // t3's preparation ends: it does not start.
    let outs = a.at(1_100).prepared("f1", "t3", Ok(()));
    assert_eq!(outs.len(), 1, "{outs:?}");
    let u3 = expect_update(
        &outs[0],
        "f1",
        status(
            "t3",
            "e3",
            TaskState::TaskKilled,
            Reason::AgentDrained,
            drained,
            1_100,
        ),
    );
    assert_eq!(a.ack("f1", "t3", &u3), vec![]);
    // e2 registers late: it is told to go at once, and gets nothing to run.
    assert_eq!(
        a.at(1_200).executor_registered("f1", "e2"),
        vec![to_executor(
            "f1",
            "e2",
            agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})
        )]
    );
    // e1 reports its kill: it names the drain.
    let outs = a
        .at(1_300)
        .executor_status("f1", "e1", exec_status("t1", TaskState::TaskKilled));
    let u = expect_update(
        &outs[0],
        "f1",
        status(
            "t1",
            "e1",
            TaskState::TaskKilled,
            Reason::AgentDrained,
            drained,
            1_300,
        ),
    );
    assert_eq!(a.core.unacknowledged_updates(), 1);
    assert_eq!(a.ack("f1", "t1", &u), vec![]);
    assert_eq!(a.core.unacknowledged_updates(), 0);
    // A drained executor's exit is no failure to report.
    assert_eq!(a.executor_exited("f1", "e1", "exited with code 0"), vec![]);
    assert_eq!(a.core.live_tasks(), 0);

    // A task sent now is dropped, not started.
    let outs = a.at(1_400).run("f2", &task("t4", ""));
    let mut dropped = status(
        "t4",
        "",
        TaskState::TaskDropped,
        Reason::AgentDrained,
        "the agent is stopping with its tasks (drain); the task was not started",
        1_400,
    );
    dropped.executor_id = String::new();
    assert_eq!(outs, vec![to_master("f2", dropped)]);
}
