//! The agent's state machine: tasks, executors and the status update streams.
//!
//! Pure: the shell feeds it `Input`s with the time, and carries out the `Output`s
//! (messages to the master and executors, sandboxes to prepare, processes to start).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use agora_proto::resources::MEM;
use agora_proto::v1::{
    self, agent_to_executor, agent_to_master, AgentHello, AgentToExecutor, AgentToMaster,
    ExecutorLaunch, ExecutorStatus, Reason, RunningTask, StatusUpdate, TaskInfo, TaskState,
    TaskStatus,
};
use agora_proto::Resources;

/// Executor id used when a wasm task names none.
pub const DEFAULT_EXECUTOR: &str = "default";
/// Executor id used when a native (command) task names none.
pub const DEFAULT_NATIVE_EXECUTOR: &str = "default-native";

/// What an executor process runs: WebAssembly modules, or native commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorKind {
    Wasm,
    Native,
}

impl ExecutorKind {
    pub fn of(task: &TaskInfo) -> ExecutorKind {
        if task.command.is_some() {
            ExecutorKind::Native
        } else {
            ExecutorKind::Wasm
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExecutorKind::Wasm => "wasm",
            ExecutorKind::Native => "native",
        }
    }
}

/// (framework id, executor id)
pub type ExecutorKey = (String, String);
/// (framework id, task id)
pub type TaskKey = (String, String);

#[derive(Debug, Clone)]
pub struct AgentCoreConfig {
    pub hostname: String,
    pub resources: Resources,
    pub attributes: Vec<v1::Attribute>,
    pub work_dir: PathBuf,
    /// First wait before resending an unacknowledged status update; doubles each time.
    pub update_retry_ms: u64,
    pub update_retry_max_ms: u64,
    /// An executor with no live task for this long is asked to shut down.
    pub executor_idle_ms: u64,
    /// Cap on each of a task's stdout and stderr files.
    pub output_limit_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The master accepted our registration.
    Registered {
        agent_id: String,
    },
    MasterDisconnected,
    RunTask(v1::RunTask),
    KillTask(v1::KillTask),
    Ack(v1::StatusUpdateAck),
    ShutdownFramework {
        framework_id: String,
    },
    /// The shell finished fetching artifacts and building the sandbox.
    Prepared {
        key: TaskKey,
        result: Result<(), String>,
    },
    ExecutorRegistered {
        key: ExecutorKey,
    },
    ExecutorStatus {
        key: ExecutorKey,
        status: ExecutorStatus,
    },
    /// The executor process ended (or could not be started).
    ExecutorExited {
        key: ExecutorKey,
        detail: String,
    },
    Tick,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    ToMaster(AgentToMaster),
    /// Fetch the task's module and inputs and build its sandbox, then feed `Prepared`.
    Prepare {
        key: TaskKey,
        task: TaskInfo,
    },
    SpawnExecutor {
        key: ExecutorKey,
    },
    ToExecutor {
        key: ExecutorKey,
        msg: AgentToExecutor,
    },
    /// The executor was asked to shut down; make sure the process goes.
    ReapExecutor {
        key: ExecutorKey,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Preparing,
    /// Sandbox ready; waiting for the executor to register.
    AwaitingExecutor,
    /// Handed to the executor.
    Launched,
    Terminal,
}

/// Status updates of one task, sent one at a time: the next goes only after the
/// master relays the framework's acknowledgement of the current one (Mesos's
/// status update manager semantics).
#[derive(Debug, Default)]
struct UpdateStream {
    queue: VecDeque<TaskStatus>,
    next_retry_ms: u64,
    backoff_ms: u64,
}

#[derive(Debug)]
struct Task {
    info: TaskInfo,
    executor: ExecutorKey,
    phase: Phase,
    state: TaskState,
    latest: TaskStatus,
    kill_requested: bool,
    updates: UpdateStream,
}

#[derive(Debug)]
struct Executor {
    kind: ExecutorKind,
    registered: bool,
    /// When it last had no live task (for the idle timeout).
    idle_since: Option<u64>,
    shutting_down: bool,
}

#[derive(Debug)]
pub struct AgentCore {
    cfg: AgentCoreConfig,
    agent_id: Option<String>,
    connected: bool,
    tasks: BTreeMap<TaskKey, Task>,
    executors: BTreeMap<ExecutorKey, Executor>,
    update_seq: u64,
    out: Vec<Output>,
}

impl AgentCore {
    pub fn new(cfg: AgentCoreConfig) -> Self {
        Self {
            cfg,
            agent_id: None,
            connected: false,
            tasks: BTreeMap::new(),
            executors: BTreeMap::new(),
            update_seq: 0,
            out: Vec::new(),
        }
    }

    pub fn agent_id(&self) -> Option<&str> {
        self.agent_id.as_deref()
    }

    /// What to say to the master when (re)connecting.
    pub fn hello(&self) -> AgentHello {
        AgentHello {
            agent_id: self.agent_id.clone().unwrap_or_default(),
            hostname: self.cfg.hostname.clone(),
            resources: self.cfg.resources.to_proto(),
            attributes: self.cfg.attributes.clone(),
            tasks: self
                .tasks
                .iter()
                .filter(|(_, t)| t.phase != Phase::Terminal)
                .map(|((fw, _), t)| RunningTask {
                    framework_id: fw.clone(),
                    task: Some(t.info.clone()),
                    status: Some(t.latest.clone()),
                })
                .collect(),
        }
    }

    pub fn sandbox_dir(&self, key: &TaskKey) -> PathBuf {
        sandbox_dir(&self.cfg.work_dir, key)
    }

    pub fn handle(&mut self, input: Input, now: u64) -> Vec<Output> {
        match input {
            Input::Registered { agent_id } => {
                if let Some(old) = &self.agent_id {
                    if *old != agent_id {
                        tracing::warn!(%old, new = %agent_id, "master gave this agent a new id");
                    }
                }
                self.agent_id = Some(agent_id);
                self.connected = true;
                // Resend the head of every stream now that someone listens, and start
                // its backoff afresh: the new link has not failed to deliver anything.
                let keys: Vec<TaskKey> = self.tasks.keys().cloned().collect();
                for k in keys {
                    if let Some(t) = self.tasks.get_mut(&k) {
                        t.updates.backoff_ms = self.cfg.update_retry_ms;
                    }
                    self.send_head(&k, now);
                }
            }
            Input::MasterDisconnected => self.connected = false,
            Input::RunTask(rt) => self.run_task(rt, now),
            Input::KillTask(k) => self.kill(&(k.framework_id, k.task_id), now),
            Input::Ack(a) => self.ack(a, now),
            Input::ShutdownFramework { framework_id } => {
                let keys: Vec<TaskKey> = self
                    .tasks
                    .keys()
                    .filter(|(f, _)| *f == framework_id)
                    .cloned()
                    .collect();
                for k in keys {
                    self.kill(&k, now);
                    // The framework will acknowledge nothing any more, so intermediate
                    // updates are dropped; a terminal one is kept (the master acks it
                    // itself), because it is what lets the master free the resources.
                    if let Some(t) = self.tasks.get_mut(&k) {
                        let head = t.updates.queue.front().map(|h| h.uuid.clone());
                        let last = t
                            .updates
                            .queue
                            .pop_back()
                            .filter(|s| s.state().is_terminal());
                        t.updates.queue.clear();
                        if let Some(last) = last {
                            let resend = head.as_ref() != Some(&last.uuid);
                            t.updates.queue.push_back(last);
                            if resend {
                                t.updates.backoff_ms = self.cfg.update_retry_ms;
                                self.send_head(&k, now);
                            }
                        }
                    }
                }
                self.gc_tasks();
                // The framework is gone: its executors go now rather than idling out.
                // They kill what still runs, report it, and exit.
                for (key, e) in self
                    .executors
                    .iter_mut()
                    .filter(|(k, _)| k.0 == framework_id)
                {
                    if e.registered && !e.shutting_down {
                        e.shutting_down = true;
                        self.out.push(Output::ToExecutor {
                            key: key.clone(),
                            msg: AgentToExecutor {
                                msg: Some(agent_to_executor::Msg::Shutdown(
                                    v1::ExecutorShutdown {},
                                )),
                            },
                        });
                        self.out.push(Output::ReapExecutor { key: key.clone() });
                    }
                }
            }
            Input::Prepared { key, result } => self.prepared(key, result, now),
            Input::ExecutorRegistered { key } => self.executor_registered(key, now),
            Input::ExecutorStatus { key, status } => self.executor_status(key, status, now),
            Input::ExecutorExited { key, detail } => self.executor_exited(key, detail, now),
            Input::Tick => self.tick(now),
        }
        std::mem::take(&mut self.out)
    }

    fn run_task(&mut self, rt: v1::RunTask, now: u64) {
        let Some(info) = rt.task else { return };
        let key = (rt.framework_id.clone(), info.task_id.clone());
        if self.tasks.contains_key(&key) {
            // A duplicate RunTask (master retry) for a task we already have.
            return;
        }
        let exec_id = if info.executor_id.is_empty() {
            match ExecutorKind::of(&info) {
                ExecutorKind::Wasm => DEFAULT_EXECUTOR.to_string(),
                ExecutorKind::Native => DEFAULT_NATIVE_EXECUTOR.to_string(),
            }
        } else {
            info.executor_id.clone()
        };
        let agent_id = self.agent_id.clone().unwrap_or_default();
        let latest = TaskStatus {
            task_id: info.task_id.clone(),
            state: TaskState::TaskStaging as i32,
            agent_id,
            executor_id: exec_id.clone(),
            timestamp_ms: now,
            ..Default::default()
        };
        self.tasks.insert(
            key.clone(),
            Task {
                info: info.clone(),
                executor: (rt.framework_id.clone(), exec_id),
                phase: Phase::Preparing,
                state: TaskState::TaskStaging,
                latest,
                kill_requested: false,
                updates: UpdateStream::default(),
            },
        );
        self.update(
            &key,
            new_status(
                TaskState::TaskStarting,
                Reason::Unspecified,
                "fetching and preparing the sandbox",
            ),
            now,
        );
        self.out.push(Output::Prepare { key, task: info });
    }

    fn prepared(&mut self, key: TaskKey, result: Result<(), String>, now: u64) {
        let Some(t) = self.tasks.get(&key) else {
            return;
        };
        if t.phase != Phase::Preparing {
            return;
        }
        if t.kill_requested {
            self.terminal(
                &key,
                new_status(
                    TaskState::TaskKilled,
                    Reason::KilledByFramework,
                    "killed before it started",
                ),
                now,
            );
            return;
        }
        if let Err(e) = result {
            let reason = if e.contains("fetch") {
                Reason::FetchFailed
            } else {
                Reason::SandboxFailed
            };
            self.terminal(&key, new_status(TaskState::TaskFailed, reason, &e), now);
            return;
        }
        let exec_key = t.executor.clone();
        let kind = ExecutorKind::of(&t.info);
        if let Some(e) = self.executors.get(&exec_key) {
            if e.kind != kind {
                let msg = format!(
                    "executor {} runs {} tasks; give a {} task another executor id",
                    exec_key.1,
                    e.kind.name(),
                    kind.name()
                );
                self.terminal(
                    &key,
                    new_status(TaskState::TaskError, Reason::InvalidTask, &msg),
                    now,
                );
                return;
            }
        }
        match self.executors.get_mut(&exec_key) {
            Some(e) if e.registered && !e.shutting_down => {
                e.idle_since = None;
                self.launch(&key);
            }
            Some(e) if !e.shutting_down => {
                e.idle_since = None;
                self.tasks.get_mut(&key).expect("present").phase = Phase::AwaitingExecutor;
            }
            Some(_) => {
                // One on its way out still holds this executor id: wait for it to exit
                // (`executor_exited` starts a fresh one), never run two at once.
                self.tasks.get_mut(&key).expect("present").phase = Phase::AwaitingExecutor;
            }
            None => {
                // No executor: start one.
                self.executors.insert(
                    exec_key.clone(),
                    Executor {
                        kind,
                        registered: false,
                        idle_since: None,
                        shutting_down: false,
                    },
                );
                self.tasks.get_mut(&key).expect("present").phase = Phase::AwaitingExecutor;
                self.out.push(Output::SpawnExecutor { key: exec_key });
            }
        }
    }

    fn launch(&mut self, key: &TaskKey) {
        let work = self.cfg.work_dir.clone();
        let limit = self.cfg.output_limit_bytes;
        let t = self.tasks.get_mut(key).expect("caller checked");
        t.phase = Phase::Launched;
        let sandbox = sandbox_dir(&work, key);
        let module = t.info.module.clone().unwrap_or_default();
        let res = Resources::from_proto(&t.info.resources).unwrap_or_default();
        let mem = res.get(MEM).max(0) as u64;
        let launch = ExecutorLaunch {
            task_id: key.1.clone(),
            module_path: artifact_path(&work, &module.sha256)
                .to_string_lossy()
                .into_owned(),
            module_sha256: module.sha256.clone(),
            root_dir: if t.info.no_filesystem {
                String::new() // the runner then preopens nothing
            } else {
                sandbox.join("fs").to_string_lossy().into_owned()
            },
            stdout_path: sandbox.join("stdout").to_string_lossy().into_owned(),
            stderr_path: sandbox.join("stderr").to_string_lossy().into_owned(),
            args: t.info.args.clone(),
            env: t.info.env.clone(),
            fuel: module.fuel,
            memory_bytes: mem,
            timeout_ms: match &t.info.command {
                Some(c) => c.timeout_ms,
                None => module.timeout_ms,
            },
            output_limit_bytes: limit,
            command: t.info.command.clone(),
            milli_cpus: res.milli_cpus(),
        };
        let exec = t.executor.clone();
        self.out.push(Output::ToExecutor {
            key: exec,
            msg: AgentToExecutor {
                msg: Some(agent_to_executor::Msg::Launch(launch)),
            },
        });
    }

    fn executor_registered(&mut self, key: ExecutorKey, now: u64) {
        let kind = self
            .tasks
            .values()
            .find(|t| t.executor == key)
            .map(|t| ExecutorKind::of(&t.info))
            .unwrap_or(ExecutorKind::Wasm);
        let e = self.executors.entry(key.clone()).or_insert(Executor {
            kind,
            registered: false,
            idle_since: None,
            shutting_down: false,
        });
        e.registered = true;
        let waiting: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.executor == key && t.phase == Phase::AwaitingExecutor)
            .map(|(k, _)| k.clone())
            .collect();
        if waiting.is_empty() {
            e.idle_since = Some(now);
        }
        for k in waiting {
            self.launch(&k);
        }
    }

    fn executor_status(&mut self, key: ExecutorKey, s: ExecutorStatus, now: u64) {
        let tkey = (key.0.clone(), s.task_id.clone());
        match self.tasks.get(&tkey) {
            Some(t) if t.executor == key && t.phase != Phase::Terminal => {}
            _ => {
                tracing::warn!(task = %s.task_id, "executor reported on a task it does not run; ignored");
                return;
            }
        }
        let state = s.state();
        if state.is_terminal() {
            let mut st = new_status(state, s.reason(), &s.message);
            st.exit_code = s.exit_code;
            st.fuel_used = s.fuel_used;
            st.usage = s.usage;
            self.terminal(&tkey, st, now);
        } else if state == TaskState::TaskRunning {
            let mut st = new_status(TaskState::TaskRunning, Reason::Unspecified, "");
            st.instantiate_us = s.instantiate_us;
            self.update(&tkey, st, now);
        }
    }

    fn executor_exited(&mut self, key: ExecutorKey, detail: String, now: u64) {
        let was_shutting_down = self.executors.remove(&key).is_some_and(|e| e.shutting_down);
        // Tasks still being prepared never reached this executor: when ready they
        // start a new one.
        let live: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.executor == key && t.phase != Phase::Terminal && t.phase != Phase::Preparing
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !was_shutting_down || !live.is_empty() {
            tracing::warn!(framework = %key.0, executor = %key.1, "executor exited: {detail}");
        }
        for k in live {
            let t = &self.tasks[&k];
            if t.phase == Phase::AwaitingExecutor && was_shutting_down {
                // Queued behind an executor that was on its way out: start a new one
                // (once for all such tasks).
                if !self.executors.contains_key(&key) {
                    let kind = ExecutorKind::of(&t.info);
                    self.executors.insert(
                        key.clone(),
                        Executor {
                            kind,
                            registered: false,
                            idle_since: None,
                            shutting_down: false,
                        },
                    );
                    self.out.push(Output::SpawnExecutor { key: key.clone() });
                }
                continue;
            }
            let (state, reason) = if t.kill_requested {
                (TaskState::TaskKilled, Reason::KilledByFramework)
            } else if t.phase == Phase::AwaitingExecutor {
                (TaskState::TaskFailed, Reason::ExecutorStartFailed)
            } else {
                (TaskState::TaskFailed, Reason::ExecutorTerminated)
            };
            self.terminal(
                &k,
                new_status(state, reason, &format!("executor {}: {detail}", key.1)),
                now,
            );
        }
    }

    fn kill(&mut self, key: &TaskKey, now: u64) {
        let Some(t) = self.tasks.get_mut(key) else {
            // Unknown here: tell the framework the task is gone so it stops waiting.
            let st = TaskStatus {
                task_id: key.1.clone(),
                state: TaskState::TaskLost as i32,
                reason: Reason::Reconciliation as i32,
                message: "the agent has no such task".into(),
                agent_id: self.agent_id.clone().unwrap_or_default(),
                timestamp_ms: now,
                ..Default::default()
            };
            self.out.push(Output::ToMaster(AgentToMaster {
                msg: Some(agent_to_master::Msg::StatusUpdate(StatusUpdate {
                    framework_id: key.0.clone(),
                    status: Some(st),
                })),
            }));
            return;
        };
        if t.phase == Phase::Terminal || t.kill_requested {
            return;
        }
        t.kill_requested = true;
        match t.phase {
            Phase::Preparing => {} // finishes when preparation reports back
            Phase::AwaitingExecutor => self.terminal(
                key,
                new_status(
                    TaskState::TaskKilled,
                    Reason::KilledByFramework,
                    "killed before it started",
                ),
                now,
            ),
            Phase::Launched => {
                let exec = t.executor.clone();
                self.update(
                    key,
                    new_status(TaskState::TaskKilling, Reason::KilledByFramework, ""),
                    now,
                );
                self.out.push(Output::ToExecutor {
                    key: exec,
                    msg: AgentToExecutor {
                        msg: Some(agent_to_executor::Msg::Kill(v1::ExecutorKill {
                            task_id: key.1.clone(),
                        })),
                    },
                });
            }
            Phase::Terminal => unreachable!(),
        }
    }

    fn terminal(&mut self, key: &TaskKey, st: TaskStatus, now: u64) {
        debug_assert!(st.state().is_terminal());
        self.update(key, st, now);
        let Some(t) = self.tasks.get_mut(key) else {
            return;
        };
        t.phase = Phase::Terminal;
        let exec = t.executor.clone();
        let idle = !self
            .tasks
            .values()
            .any(|t| t.executor == exec && t.phase != Phase::Terminal);
        if idle {
            if let Some(e) = self.executors.get_mut(&exec) {
                e.idle_since = Some(now);
            }
        }
    }

    /// Queues a status update for the task (filling in ids, uuid and time); sends it
    /// now if the stream is free.
    fn update(&mut self, key: &TaskKey, mut st: TaskStatus, now: u64) {
        self.update_seq += 1;
        let Some(t) = self.tasks.get_mut(key) else {
            return;
        };
        st.uuid = format!(
            "{}/{}",
            self.agent_id.as_deref().unwrap_or("?"),
            self.update_seq
        )
        .into_bytes();
        st.task_id = key.1.clone();
        st.agent_id = self.agent_id.clone().unwrap_or_default();
        st.executor_id = t.executor.1.clone();
        st.timestamp_ms = now;
        t.state = st.state();
        t.latest = st.clone();
        t.updates.queue.push_back(st);
        if t.updates.queue.len() == 1 {
            t.updates.backoff_ms = self.cfg.update_retry_ms;
            self.send_head(key, now);
        }
    }

    fn send_head(&mut self, key: &TaskKey, now: u64) {
        if !self.connected {
            return;
        }
        let Some(t) = self.tasks.get_mut(key) else {
            return;
        };
        let Some(head) = t.updates.queue.front() else {
            return;
        };
        t.updates.next_retry_ms = now + t.updates.backoff_ms.max(1);
        self.out.push(Output::ToMaster(AgentToMaster {
            msg: Some(agent_to_master::Msg::StatusUpdate(StatusUpdate {
                framework_id: key.0.clone(),
                status: Some(head.clone()),
            })),
        }));
    }

    fn ack(&mut self, a: v1::StatusUpdateAck, now: u64) {
        let key = (a.framework_id.clone(), a.task_id.clone());
        let Some(t) = self.tasks.get_mut(&key) else {
            return;
        };
        if t.updates.queue.front().is_some_and(|h| h.uuid == a.uuid) {
            t.updates.queue.pop_front();
            t.updates.backoff_ms = self.cfg.update_retry_ms;
            self.send_head(&key, now);
        }
        self.gc_tasks();
    }

    /// Forgets terminal tasks whose updates were all acknowledged.
    fn gc_tasks(&mut self) {
        self.tasks
            .retain(|_, t| !(t.phase == Phase::Terminal && t.updates.queue.is_empty()));
    }

    fn tick(&mut self, now: u64) {
        // Nothing can be sent while the master is away, so the backoff does not grow
        // either; `Registered` resends every head.
        let due: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|_| self.connected)
            .filter(|(_, t)| !t.updates.queue.is_empty() && t.updates.next_retry_ms <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            if let Some(t) = self.tasks.get_mut(&k) {
                t.updates.backoff_ms = (t.updates.backoff_ms * 2).min(self.cfg.update_retry_max_ms);
            }
            self.send_head(&k, now);
        }
        let idle_ms = self.cfg.executor_idle_ms;
        for (key, e) in self.executors.iter_mut() {
            if !e.shutting_down
                && e.registered
                && e.idle_since
                    .is_some_and(|t| now.saturating_sub(t) >= idle_ms)
            {
                e.shutting_down = true;
                self.out.push(Output::ToExecutor {
                    key: key.clone(),
                    msg: AgentToExecutor {
                        msg: Some(agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})),
                    },
                });
                self.out.push(Output::ReapExecutor { key: key.clone() });
            }
        }
    }

    /// The executor a live task runs in, and what kind it is.
    pub fn task_executor(&self, key: &TaskKey) -> Option<(ExecutorKey, ExecutorKind)> {
        self.tasks
            .get(key)
            .filter(|t| t.phase != Phase::Terminal)
            .map(|t| (t.executor.clone(), ExecutorKind::of(&t.info)))
    }

    /// The kind of process an executor id runs, once known.
    pub fn executor_kind(&self, key: &ExecutorKey) -> Option<ExecutorKind> {
        self.executors.get(key).map(|e| e.kind)
    }

    /// What each executor's live tasks hold: the size of the executor's cgroup (the
    /// second wall around its tasks). Executors with no live task are absent.
    pub fn executor_demand(&self) -> BTreeMap<ExecutorKey, Resources> {
        let mut out: BTreeMap<ExecutorKey, Resources> = BTreeMap::new();
        for t in self.tasks.values() {
            if matches!(t.phase, Phase::AwaitingExecutor | Phase::Launched) {
                if let Ok(r) = Resources::from_proto(&t.info.resources) {
                    out.entry(t.executor.clone())
                        .or_default()
                        .add(&r.unreserved());
                }
            }
        }
        out
    }

    /// Number of tasks not yet terminal (for status output and tests).
    pub fn live_tasks(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| t.phase != Phase::Terminal)
            .count()
    }
}

fn new_status(state: TaskState, reason: Reason, message: &str) -> TaskStatus {
    TaskStatus {
        state: state as i32,
        reason: reason as i32,
        message: message.to_string(),
        ..Default::default()
    }
}

/// `<work>/sandboxes/<framework>/<task>`: holds `stdout`, `stderr` and `fs/` (the
/// guest's "/"). Ids were checked by the master to be safe path components.
pub fn sandbox_dir(work: &std::path::Path, key: &TaskKey) -> PathBuf {
    work.join("sandboxes").join(&key.0).join(&key.1)
}

/// `<work>/artifacts/<sha256>`: the agent's cache of fetched modules and inputs.
pub fn artifact_path(work: &std::path::Path, sha: &str) -> PathBuf {
    work.join("artifacts").join(sha)
}
