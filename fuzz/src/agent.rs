//! The agent core fed a master and executors made of fuzz bytes.
//!
//! A run starts registered (`Registered { agent_id: "a1" }`). Each op is then one
//! of: a raw `MasterToAgent` (mapped to an input as the shell's master link maps it,
//! `agora_agent::server`), a raw `ExecutorToAgent` on an executor's connection
//! (mapped as the shell's executor socket maps it), or an input built from what the
//! core asked for (a RUN_TASK, the `Prepared` answer to a `Prepare`, an executor
//! registering after a `SpawnExecutor`, a status from an executor of a task it
//! launched, an acknowledgement of an update it sent, kills, shutdowns, an
//! executor's end, the master link dropping and coming back, time passing), or a
//! restart: a new core recovered from the checkpoint the old one wrote.
//!
//! After every input [`Agent::check`] holds the core to what it promises.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use agora_agent_core::checkpoint::CheckpointState;
use agora_agent_core::{
    AgentCore, AgentCoreConfig, ExecutorKey, ExecutorProcess, Input, Output, PrepareFailed, TaskKey,
};
use agora_proto::v1::{
    self, agent_to_executor, agent_to_master, executor_to_agent, master_to_agent, ExecutorToAgent,
    MasterToAgent, TaskInfo, TaskState,
};
use agora_proto::{Now, Resources};

use crate::{Reader, Writer};

const FRAMEWORKS: [&str; 2] = ["f1", "f2"];
const START_MS: u64 = 1_000_000;
const WORK: &str = "/var/lib/agora-fuzz";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    RawMaster = 0,
    RawExecutor,
    RunTask,
    Prepared,
    ExecutorRegistered,
    ExecutorStatus,
    Ack,
    Kill,
    Shutdown,
    ExecutorExited,
    Link,
    Tick,
    Restart,
}

const OPS: u8 = Op::Restart as u8 + 1;

pub struct Agent {
    core: AgentCore,
    now: u64,
    /// Every checkpoint delta so far, applied: what the shell's file would hold.
    durable: CheckpointState,
    /// What the core asked for and the harness has not answered yet.
    to_prepare: Vec<TaskKey>,
    spawned: Vec<ExecutorKey>,
    /// Tasks handed to executors: (executor, task id).
    launched: Vec<(ExecutorKey, String)>,
    /// Per task, the uuid of the update last sent and not acknowledged yet.
    in_flight: BTreeMap<TaskKey, Vec<u8>>,
    /// Updates sent (for acknowledgements, stale ones too).
    sent: Vec<(TaskKey, Vec<u8>)>,
    next_task: u64,
    /// The framework the input being fed shuts down.
    shutting_down: Option<String>,
}

fn config() -> AgentCoreConfig {
    AgentCoreConfig {
        hostname: "fuzz-host".into(),
        resources: Resources::cpus_mem(4_000, 8 << 30),
        attributes: Vec::new(),
        work_dir: PathBuf::from(WORK),
        update_retry_ms: 1_000,
        update_retry_max_ms: 10_000,
        executor_idle_ms: 5_000,
        output_limit_bytes: 1 << 20,
        max_files_per_task: 10_000,
        recovery_timeout_ms: 15_000,
        reregister_timeout_ms: 2_000,
    }
}

impl Default for Agent {
    fn default() -> Self {
        Self::new()
    }
}

impl Agent {
    pub fn new() -> Self {
        let mut a = Agent {
            core: AgentCore::new(config()),
            now: START_MS,
            durable: CheckpointState::default(),
            to_prepare: Vec::new(),
            spawned: Vec::new(),
            launched: Vec::new(),
            in_flight: BTreeMap::new(),
            sent: Vec::new(),
            next_task: 0,
            shutting_down: None,
        };
        a.feed(Input::Registered {
            agent_id: "a1".into(),
        });
        a
    }

    pub fn run(data: &[u8]) {
        let mut a = Agent::new();
        let mut r = Reader::new(data);
        while a.step(&mut r).is_some() {}
    }

    fn time(&self) -> Now {
        Now {
            mono_ms: self.now,
            wall_ms: 1_700_000_000_000 + self.now,
        }
    }

    pub fn feed(&mut self, input: Input) {
        // A framework shut down: the kills queue a KILLING that is sent and then
        // dropped with the framework's other intermediate updates (nobody will
        // acknowledge them; the master acknowledges the terminal ones itself), so
        // that one is sent without being in the checkpoint.
        self.shutting_down = match &input {
            Input::ShutdownFramework { framework_id } => Some(framework_id.clone()),
            _ => None,
        };
        match &input {
            Input::Ack(a) => {
                let key = (a.framework_id.clone(), a.task_id.clone());
                if self.in_flight.get(&key) == Some(&a.uuid) {
                    self.in_flight.remove(&key);
                }
            }
            // The framework is gone: its intermediate updates are dropped unsent and
            // the terminal one may follow without an acknowledgement (the master
            // acknowledges it itself).
            Input::ShutdownFramework { framework_id } => {
                self.in_flight.retain(|k, _| k.0 != *framework_id);
            }
            _ => {}
        }
        if crate::tracing() {
            eprintln!("[{}] in: {input:?}", self.now);
        }
        let out = self.core.handle(input, self.time());
        if crate::tracing() {
            for o in &out {
                eprintln!("    out: {o:?}");
            }
        }
        self.absorb(out);
    }

    fn absorb(&mut self, out: Vec<Output>) {
        if let Some(d) = self.core.take_checkpoint() {
            self.durable.apply(&d);
        }
        for o in out {
            match o {
                Output::ToMaster(m) => {
                    if let Some(agent_to_master::Msg::StatusUpdate(u)) = m.msg {
                        let s = u.status.expect("a status update carries a status");
                        if s.uuid.is_empty() {
                            continue; // an answer about a task it does not know
                        }
                        let key = (u.framework_id, s.task_id.clone());
                        let rec = self.durable.tasks.get(&key);
                        let dropped = self.shutting_down.as_ref() == Some(&key.0)
                            && s.state() == TaskState::TaskKilling;
                        assert!(
                            dropped
                                || rec.is_some_and(|r| r.updates.iter().any(|x| x.uuid == s.uuid)),
                            "update {:?} of {key:?} sent before it was checkpointed",
                            s.uuid
                        );
                        if dropped {
                            continue;
                        }
                        if let Some(prev) = self.in_flight.get(&key) {
                            assert_eq!(
                                prev, &s.uuid,
                                "a second update of {key:?} sent while one is unacknowledged"
                            );
                        }
                        self.in_flight.insert(key.clone(), s.uuid.clone());
                        if self.sent.len() < 64 {
                            self.sent.push((key, s.uuid));
                        }
                    }
                }
                Output::Prepare { key, task } => {
                    assert_eq!(key.1, task.task_id);
                    check_sandbox(&key);
                    if self.to_prepare.len() < 32 {
                        self.to_prepare.push(key);
                    }
                }
                Output::SpawnExecutor { key } => {
                    if self.spawned.len() < 32 {
                        self.spawned.push(key);
                    }
                }
                Output::ToExecutor { key, msg } => {
                    if let Some(agent_to_executor::Msg::Launch(l)) = msg.msg {
                        if self.launched.len() < 64 {
                            self.launched.push((key, l.task_id));
                        }
                    }
                }
                Output::ReapExecutor { .. } | Output::AdoptExecutor { .. } => {}
            }
        }
        self.check();
    }

    /// After every input: the checkpoint the shell would have written (every delta
    /// applied in turn) is the core's whole durable state. (In `absorb`: each update
    /// is in the checkpoint before it is sent, one update per task is in flight at a
    /// time, and every sandbox the shell is asked to build lies in its own directory
    /// under `<work>/sandboxes`.)
    pub fn check(&self) {
        let whole = self.core.checkpoint_state();
        assert_eq!(
            self.durable, whole,
            "the checkpoint deltas do not add up to the durable state"
        );
    }

    fn task(&mut self, fw: usize, how: u8, executor: Option<String>) -> v1::RunTask {
        self.next_task += 1;
        let kind = how % 4;
        let mut t = TaskInfo {
            task_id: format!("t{}", self.next_task),
            name: "fuzz".into(),
            agent_id: "a1".into(),
            resources: Resources::cpus_mem(500, 256 << 20).to_proto(),
            executor_id: executor.unwrap_or_default(),
            ..Default::default()
        };
        let module = v1::WasmModule {
            sha256: agora_proto::sha256_hex(b"module"),
            ..Default::default()
        };
        match kind {
            0 | 1 => t.module = Some(module),
            2 => {
                t.command = Some(v1::CommandInfo {
                    value: "true".into(),
                    ..Default::default()
                })
            }
            _ => {
                t.module = Some(module);
                t.function = Some(v1::FunctionInfo {
                    name: "echo".into(),
                    ..Default::default()
                });
                if t.executor_id.is_empty() && how & 0x40 == 0 {
                    t.executor_id = format!("fn-{}", t.task_id);
                }
            }
        }
        v1::RunTask {
            framework_id: FRAMEWORKS[fw % 2].into(),
            task: Some(t),
        }
    }

    pub fn step(&mut self, r: &mut Reader) -> Option<()> {
        let op = r.byte()? % OPS;
        match op {
            x if x == Op::RawMaster as u8 => {
                if let Some(m) = r.message::<MasterToAgent>()? {
                    if let Some(input) = master_input(m) {
                        self.feed(input);
                    }
                }
            }
            x if x == Op::RawExecutor as u8 => {
                let key = self.pick(r, |a| &a.spawned)?;
                if let Some(m) = r.message::<ExecutorToAgent>()? {
                    if let Some(input) = executor_input(key, m) {
                        self.feed(input);
                    }
                }
            }
            x if x == Op::RunTask as u8 => {
                let fw = r.pick(2)?;
                let how = r.byte()?;
                let executor = match how >> 4 & 3 {
                    0 => None,
                    1 => Some("shared".to_string()),
                    2 => Some("other".to_string()),
                    _ => Some(r.string()?),
                };
                let rt = self.task(fw, how, executor);
                self.feed(Input::RunTask(rt));
            }
            x if x == Op::Prepared as u8 => {
                if self.to_prepare.is_empty() {
                    return Some(());
                }
                let i = r.pick(256)? % self.to_prepare.len();
                let key = self.to_prepare.remove(i);
                let result = match r.byte()? % 4 {
                    0 => Err(PrepareFailed::Fetch("no such artifact".into())),
                    1 => Err(PrepareFailed::Sandbox("disk full".into())),
                    _ => Ok(()),
                };
                self.feed(Input::Prepared { key, result });
            }
            x if x == Op::ExecutorRegistered as u8 => {
                let key = self.pick(r, |a| &a.spawned)?;
                let input = match r.byte()? % 4 {
                    0 => Input::ExecutorReregistered {
                        tasks: self
                            .launched
                            .iter()
                            .filter(|(k, _)| *k == key)
                            .map(|(_, t)| t.clone())
                            .collect(),
                        key,
                    },
                    1 => Input::ExecutorSpawned {
                        key,
                        process: ExecutorProcess {
                            pid: 4242,
                            start_time: 7,
                        },
                    },
                    _ => Input::ExecutorRegistered { key },
                };
                self.feed(input);
            }
            x if x == Op::ExecutorStatus as u8 => {
                let (key, task_id) = self.pick(r, |a| &a.launched)?;
                let how = r.byte()?;
                let status = v1::ExecutorStatus {
                    task_id,
                    state: i32::from(how % 14),
                    reason: i32::from(how / 14 % 8),
                    message: "status".into(),
                    exit_code: (how & 0x80 != 0).then_some(i32::from(how)),
                    ..Default::default()
                };
                self.feed(Input::ExecutorStatus { key, status });
            }
            x if x == Op::Ack as u8 => {
                let (key, uuid) = self.pick(r, |a| &a.sent)?;
                self.feed(Input::Ack(v1::StatusUpdateAck {
                    framework_id: key.0,
                    task_id: key.1,
                    uuid,
                }));
            }
            x if x == Op::Kill as u8 => {
                let (key, _) = self.pick(r, |a| &a.sent)?;
                self.feed(Input::KillTask(v1::KillTask {
                    framework_id: key.0,
                    task_id: key.1,
                }));
            }
            x if x == Op::Shutdown as u8 => {
                let how = r.byte()?;
                let input = match how % 3 {
                    0 => Input::ShutdownFramework {
                        framework_id: FRAMEWORKS[usize::from(how / 3) % 2].into(),
                    },
                    1 => Input::ShutdownExecutor {
                        key: self.pick(r, |a| &a.spawned)?,
                    },
                    _ => Input::FrameworkMessage {
                        key: self.pick(r, |a| &a.spawned)?,
                        data: r.chunk()?.to_vec(),
                    },
                };
                self.feed(input);
            }
            x if x == Op::ExecutorExited as u8 => {
                let key = self.pick(r, |a| &a.spawned)?;
                let detail = match r.byte()? % 3 {
                    0 => "exited with code 1".to_string(),
                    1 => "killed by signal 9".to_string(),
                    _ => r.string()?,
                };
                self.feed(Input::ExecutorExited { key, detail });
            }
            x if x == Op::Link as u8 => {
                let input = match r.byte()? % 3 {
                    0 => Input::MasterDisconnected,
                    1 => Input::Registered {
                        agent_id: "a1".into(),
                    },
                    // The agent stopping with its tasks.
                    _ => Input::Drain,
                };
                self.feed(input);
            }
            x if x == Op::Tick as u8 => {
                let how = r.byte()?;
                let n = u64::from(r.u16()?);
                self.now += if how % 2 == 0 { n } else { n * 100 };
                self.feed(Input::Tick);
            }
            _ => {
                // A restart: what the checkpoint holds is all the new core knows.
                self.now += 1_000;
                let (core, out) = AgentCore::recover(config(), self.durable.clone(), self.time());
                self.core = core;
                self.in_flight.clear();
                self.to_prepare.clear();
                self.absorb(out);
                let registered = if r.byte()? % 2 == 0 {
                    Input::Registered {
                        agent_id: "a1".into(),
                    }
                } else {
                    Input::Tick
                };
                self.feed(registered);
            }
        }
        Some(())
    }

    /// How many updates were sent, and how many tasks handed to executors.
    pub fn updates_sent(&self) -> usize {
        self.sent.len()
    }

    pub fn launches(&self) -> usize {
        self.launched.len()
    }

    fn pick<T: Clone>(&self, r: &mut Reader, list: impl Fn(&Self) -> &Vec<T>) -> Option<T> {
        let i = r.pick(256)?;
        let l = list(self);
        if l.is_empty() {
            return None;
        }
        Some(l[i % l.len()].clone())
    }
}

/// What the shell's master link feeds for a master's message (`agora_agent`'s
/// `server.rs`): PONG and empty messages are dropped; an ERROR ends the session.
pub fn master_input(m: MasterToAgent) -> Option<Input> {
    Some(match m.msg? {
        master_to_agent::Msg::Registered(r) => Input::Registered {
            agent_id: r.agent_id,
        },
        master_to_agent::Msg::Pong(_) => return None,
        master_to_agent::Msg::RunTask(rt) => Input::RunTask(rt),
        master_to_agent::Msg::KillTask(k) => Input::KillTask(k),
        master_to_agent::Msg::Ack(a) => Input::Ack(a),
        master_to_agent::Msg::ShutdownFramework(s) => Input::ShutdownFramework {
            framework_id: s.framework_id,
        },
        master_to_agent::Msg::ShutdownExecutor(s) => Input::ShutdownExecutor {
            key: (s.framework_id, s.executor_id),
        },
        master_to_agent::Msg::FrameworkMessage(m) => Input::FrameworkMessage {
            key: (m.framework_id, m.executor_id),
            data: m.data,
        },
        master_to_agent::Msg::Error(_) => Input::MasterDisconnected,
    })
}

/// What the shell's executor socket feeds for an executor's message on the
/// connection of `key` (a registration names its own key).
pub fn executor_input(key: ExecutorKey, m: ExecutorToAgent) -> Option<Input> {
    Some(match m.msg? {
        executor_to_agent::Msg::Register(r) => {
            let key = (r.framework_id, r.executor_id);
            if r.reconnect {
                Input::ExecutorReregistered {
                    key,
                    tasks: r.task_ids,
                }
            } else {
                Input::ExecutorRegistered { key }
            }
        }
        executor_to_agent::Msg::Status(status) => Input::ExecutorStatus { key, status },
        executor_to_agent::Msg::Message(m) => Input::ExecutorMessage { key, data: m.data },
    })
}

/// A sandbox the shell is asked to build must be a directory of its own under
/// `<work>/sandboxes`: two plain path components, whatever the ids say.
fn check_sandbox(key: &TaskKey) {
    let work = Path::new(WORK);
    let dir = agora_agent_core::sandbox_dir(work, key);
    let rel = dir
        .strip_prefix(work.join("sandboxes"))
        .unwrap_or_else(|_| panic!("sandbox {dir:?} of {key:?} is outside the work dir"));
    let parts: Vec<_> = rel.components().collect();
    assert!(
        parts.len() == 2 && parts.iter().all(|c| matches!(c, Component::Normal(_))),
        "sandbox {dir:?} of {key:?} is not <work>/sandboxes/<framework>/<task>"
    );
}

/// Seed inputs for the `agent_core` target, in [`Agent::step`]'s format.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let op = |w: &mut Writer, o: Op| {
        w.byte(o as u8);
    };
    let mut seeds = Vec::new();

    // A wasm task: prepared, executor up, launched, running, finished, acknowledged.
    let mut w = Writer::default();
    op(&mut w, Op::RunTask);
    w.byte(0).byte(0);
    op(&mut w, Op::Prepared);
    w.byte(0).byte(2);
    op(&mut w, Op::ExecutorRegistered);
    w.byte(0).byte(2);
    op(&mut w, Op::ExecutorStatus);
    w.byte(0).byte(TaskState::TaskRunning as u8);
    op(&mut w, Op::Ack);
    w.byte(0);
    op(&mut w, Op::ExecutorStatus);
    w.byte(0).byte(TaskState::TaskFinished as u8);
    op(&mut w, Op::Ack);
    w.byte(1);
    op(&mut w, Op::Ack);
    w.byte(2);
    op(&mut w, Op::Tick);
    w.byte(1).u16(100);
    seeds.push(("wasm-task-lifecycle", w.bytes));

    // Two native tasks in one executor, a kill, the executor dies, a restart.
    let mut w = Writer::default();
    op(&mut w, Op::RunTask);
    w.byte(0).byte(0x10 | 2);
    op(&mut w, Op::RunTask);
    w.byte(0).byte(0x10 | 2);
    op(&mut w, Op::Prepared);
    w.byte(0).byte(3);
    op(&mut w, Op::Prepared);
    w.byte(0).byte(3);
    op(&mut w, Op::ExecutorRegistered);
    w.byte(0).byte(1);
    op(&mut w, Op::ExecutorRegistered);
    w.byte(0).byte(2);
    op(&mut w, Op::Kill);
    w.byte(0);
    op(&mut w, Op::Restart);
    w.byte(1);
    op(&mut w, Op::ExecutorRegistered);
    w.byte(0).byte(0);
    op(&mut w, Op::ExecutorExited);
    w.byte(0).byte(0);
    op(&mut w, Op::Link);
    w.byte(1);
    seeds.push(("native-kill-restart-exit", w.bytes));

    // Raw master messages: a RUN_TASK of a function host, an ack, a shutdown.
    let mut w = Writer::default();
    let rt = Agent::new().task(1, 3, None);
    op(&mut w, Op::RawMaster);
    w.message(&MasterToAgent {
        msg: Some(master_to_agent::Msg::RunTask(rt)),
    });
    op(&mut w, Op::Prepared);
    w.byte(0).byte(0);
    op(&mut w, Op::RawMaster);
    w.message(&MasterToAgent {
        msg: Some(master_to_agent::Msg::ShutdownFramework(
            v1::ShutdownFramework {
                framework_id: "f2".into(),
            },
        )),
    });
    op(&mut w, Op::Link);
    w.byte(0);
    op(&mut w, Op::Tick);
    w.byte(1).u16(50);
    op(&mut w, Op::Link);
    w.byte(1);
    seeds.push(("raw-master-function-shutdown", w.bytes));

    // Raw executor messages: a status, a message, a re-registration.
    let mut w = Writer::default();
    op(&mut w, Op::RunTask);
    w.byte(0).byte(0);
    op(&mut w, Op::Prepared);
    w.byte(0).byte(2);
    op(&mut w, Op::RawExecutor);
    w.byte(0).message(&ExecutorToAgent {
        msg: Some(executor_to_agent::Msg::Register(v1::ExecutorRegister {
            framework_id: "f1".into(),
            executor_id: "default".into(),
            reconnect: false,
            secret: String::new(),
            task_ids: vec![],
        })),
        seq: 0,
    });
    op(&mut w, Op::RawExecutor);
    w.byte(0).message(&ExecutorToAgent {
        msg: Some(executor_to_agent::Msg::Status(v1::ExecutorStatus {
            task_id: "t1".into(),
            state: TaskState::TaskFailed as i32,
            exit_code: Some(3),
            ..Default::default()
        })),
        seq: 1,
    });
    op(&mut w, Op::RawExecutor);
    w.byte(0).message(&ExecutorToAgent {
        msg: Some(executor_to_agent::Msg::Message(v1::ExecutorMessage {
            data: b"hello".to_vec(),
        })),
        seq: 0,
    });
    op(&mut w, Op::Shutdown);
    w.byte(2).byte(0).chunk(b"to the executor");
    op(&mut w, Op::Shutdown);
    w.byte(1).byte(0);
    seeds.push(("raw-executor-messages", w.bytes));
    seeds
}
