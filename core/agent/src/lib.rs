//! The agent's state machine: tasks, executors and the status update streams.
//!
//! Pure: the shell feeds it `Input`s with the time, and carries out the `Output`s
//! (messages to the master and executors, sandboxes to prepare, processes to start).
//!
//! Restarts: after every input the shell takes the changes to the durable state
//! (`take_checkpoint`) and writes them before it carries out the outputs, so every
//! status update is on disk before it is sent. A restarted agent rebuilds the core
//! with `AgentCore::recover` from that checkpoint: its executors are waited for (they
//! keep running and reconnect), those that died meanwhile have their tasks failed,
//! and only then does the shell register with the master again, with the same agent
//! id, its tasks, and the unacknowledged updates resent as they were (same uuids).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use agora_proto::resources::MEM;
use agora_proto::units::format_duration;
use agora_proto::v1::{
    self, agent_to_executor, agent_to_master, AgentHello, AgentToExecutor, AgentToMaster,
    ExecutorLaunch, ExecutorStatus, FunctionInfo, Reason, RunningTask, StatusUpdate, TaskInfo,
    TaskState, TaskStatus,
};
use agora_proto::{Now, Resources};

pub mod checkpoint;

use crate::checkpoint::{CheckpointDelta, CheckpointState, ExecutorRecord, TaskRecord};

/// Largest executor -> framework MESSAGE relayed (the master has the same bound the
/// other way).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Executor id used when a wasm task names none.
pub const DEFAULT_EXECUTOR: &str = "default";
/// Executor id used when a native (command) task names none.
pub const DEFAULT_NATIVE_EXECUTOR: &str = "default-native";

/// What an executor process runs: WebAssembly modules, native commands, or function
/// hosts (a module served over HTTP, a fresh instance per request, until killed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorKind {
    Wasm,
    Native,
    Function,
}

impl ExecutorKind {
    pub fn of(task: &TaskInfo) -> ExecutorKind {
        if task.function.is_some() {
            ExecutorKind::Function
        } else if task.command.is_some() {
            ExecutorKind::Native
        } else {
            ExecutorKind::Wasm
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExecutorKind::Wasm => "wasm",
            ExecutorKind::Native => "native",
            ExecutorKind::Function => "function host",
        }
    }

    fn to_record(self) -> u32 {
        match self {
            ExecutorKind::Wasm => checkpoint::kind::WASM,
            ExecutorKind::Native => checkpoint::kind::NATIVE,
            ExecutorKind::Function => checkpoint::kind::FUNCTION,
        }
    }

    fn from_record(k: u32) -> ExecutorKind {
        match k {
            checkpoint::kind::NATIVE => ExecutorKind::Native,
            checkpoint::kind::FUNCTION => ExecutorKind::Function,
            _ => ExecutorKind::Wasm,
        }
    }
}

/// Why a task's ids cannot name its directories (`<work>/sandboxes/<framework>/<task>`,
/// `<work>/executors/<framework>/<executor>`, the executor's cgroup), if they cannot.
/// The master refuses such ids; the agent does not rely on it.
fn path_id_problem(framework_id: &str, task_id: &str, executor_id: &str) -> Option<String> {
    [
        ("framework id", framework_id),
        ("task id", task_id),
        ("executor id", executor_id),
    ]
    .into_iter()
    .find(|(_, id)| id.is_empty() || *id == "." || *id == ".." || id.contains(['/', '\0']))
    .map(|(what, id)| {
        format!(
            "{what} `{}` cannot name a directory: it is empty, `.` or `..`, or holds '/' or NUL",
            id.escape_debug()
        )
    })
}

/// Why a function host task cannot run, if it cannot: it needs a module and a
/// function name, no command, and an executor id of its own (each host is a process
/// of its own; the default executor ids belong to wasm and native tasks).
fn function_task_problem(task: &TaskInfo) -> Option<String> {
    let f = task.function.as_ref()?;
    let id = &task.task_id;
    if task.command.is_some() {
        return Some(format!(
            "task {id} has both a function and a command; a function host serves a wasm module, so drop one of them"
        ));
    }
    if task.module.is_none() {
        return Some(format!(
            "function host task {id} has no module; set TaskInfo.module to the function's uploaded wasm module"
        ));
    }
    if f.name.is_empty() {
        return Some(format!(
            "function host task {id} names no function; set FunctionInfo.name (it is the NAME in /fn/NAME/...)"
        ));
    }
    if task.executor_id.is_empty() {
        return Some(format!(
            "function host task {id} names no executor id; give each host one of its own, e.g. fn-{id}"
        ));
    }
    None
}

/// An executor's process, as the shell identifies it: the pid and the process's start
/// time (which tells it apart from a later process reusing the pid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecutorProcess {
    pub pid: u32,
    pub start_time: u64,
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
    /// The most files and directories one task's sandbox may hold (its executor
    /// enforces it with the task's disk); 0: no limit.
    pub max_files_per_task: u64,
    /// How long executors keep their tasks running while the agent is away, waiting
    /// for it to come back (the shell passes it on to the executors it starts).
    pub recovery_timeout_ms: u64,
    /// After a restart, how long executors from the checkpoint get to re-register
    /// before they are given up. Live ones reconnect within about a second (dead ones
    /// are noticed at once), and the master is not registered with until then, so
    /// keep it well below the master's agent timeout.
    pub reregister_timeout_ms: u64,
}

/// Why the shell could not prepare a task; the task fails with the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareFailed {
    /// An artifact (the module, an input) could not be fetched: `FETCH_FAILED`.
    #[error("{0}")]
    Fetch(String),
    /// The sandbox could not be built: `SANDBOX_FAILED`.
    #[error("{0}")]
    Sandbox(String),
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
    /// SHUTDOWN of one executor: its tasks are killed, then the process stops.
    ShutdownExecutor {
        key: ExecutorKey,
    },
    /// A framework's MESSAGE for one of its executors.
    FrameworkMessage {
        key: ExecutorKey,
        data: Vec<u8>,
    },
    /// An executor's message for its framework.
    ExecutorMessage {
        key: ExecutorKey,
        data: Vec<u8>,
    },
    /// The shell finished fetching artifacts and building the sandbox.
    Prepared {
        key: TaskKey,
        result: Result<(), PrepareFailed>,
    },
    ExecutorRegistered {
        key: ExecutorKey,
    },
    /// An executor that lost its agent connected again (after an agent restart),
    /// naming the tasks it still runs or holds unacknowledged statuses of. Their
    /// statuses follow as `ExecutorStatus`.
    ExecutorReregistered {
        key: ExecutorKey,
        tasks: Vec<String>,
    },
    /// The shell started the executor's process (recorded, so that a restarted agent
    /// can find it again).
    ExecutorSpawned {
        key: ExecutorKey,
        process: ExecutorProcess,
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
    /// The agent is stopping with its tasks (`agora agent --drain-on-stop`, a dev
    /// cluster stopping): every executor is shut down, every task ends KILLED with
    /// reason AGENT_DRAINED, and tasks sent from now on are dropped. A plain stop
    /// of the agent feeds nothing: executors and tasks outlive it.
    Drain,
}

/// Why the agent shut an executor down with its tasks (the reason their kills
/// are reported with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShutdownWhy {
    /// The framework's SHUTDOWN of the executor.
    Framework,
    /// The agent is stopping with its tasks.
    Drain,
}

impl ShutdownWhy {
    fn reason(self) -> Reason {
        match self {
            ShutdownWhy::Framework => Reason::ExecutorShutdown,
            ShutdownWhy::Drain => Reason::AgentDrained,
        }
    }

    fn message(self, executor: &str) -> String {
        match self {
            ShutdownWhy::Framework => {
                format!("killed: the framework shut down executor {executor}")
            }
            ShutdownWhy::Drain => {
                "killed: the agent was stopped with its tasks (drain)".to_string()
            }
        }
    }
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
    /// (From `recover` only.) An executor process from before the restart: if it is
    /// still alive, watch it (and feed `ExecutorExited` when it ends) while waiting
    /// for it to reconnect; if it is gone, feed `ExecutorExited` now. `None`: the
    /// process was not recorded; only its reconnecting tells.
    AdoptExecutor {
        key: ExecutorKey,
        process: Option<ExecutorProcess>,
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

impl Phase {
    fn to_record(self) -> u32 {
        match self {
            Phase::Preparing => checkpoint::phase::PREPARING,
            Phase::AwaitingExecutor => checkpoint::phase::AWAITING_EXECUTOR,
            Phase::Launched => checkpoint::phase::LAUNCHED,
            Phase::Terminal => checkpoint::phase::TERMINAL,
        }
    }

    fn from_record(p: u32) -> Phase {
        match p {
            checkpoint::phase::AWAITING_EXECUTOR => Phase::AwaitingExecutor,
            checkpoint::phase::LAUNCHED => Phase::Launched,
            checkpoint::phase::TERMINAL => Phase::Terminal,
            _ => Phase::Preparing,
        }
    }
}

#[derive(Debug)]
struct Task {
    info: TaskInfo,
    executor: ExecutorKey,
    phase: Phase,
    state: TaskState,
    latest: TaskStatus,
    /// The newest non-terminal status: what a master is told while the terminal
    /// update has not reached it yet.
    live: TaskStatus,
    kill_requested: bool,
    /// Whether the terminal update was ever handed to a master link.
    terminal_sent: bool,
    /// Recovered while being prepared: prepare again once the master is back (the
    /// fetch needs it).
    needs_prepare: bool,
    updates: UpdateStream,
}

impl Task {
    fn record(&self) -> TaskRecord {
        TaskRecord {
            info: Some(self.info.clone()),
            executor_id: self.executor.1.clone(),
            phase: self.phase.to_record(),
            latest: Some(self.latest.clone()),
            live: Some(self.live.clone()),
            updates: self.updates.queue.iter().cloned().collect(),
            kill_requested: self.kill_requested,
            terminal_sent: self.terminal_sent,
        }
    }
}

#[derive(Debug)]
struct Executor {
    kind: ExecutorKind,
    registered: bool,
    /// When it last had no live task (for the idle timeout).
    idle_since: Option<u64>,
    shutting_down: bool,
    /// From the checkpoint of an agent that restarted; not re-registered yet.
    recovering: bool,
    /// It missed the re-registration deadline after a restart and is being stopped:
    /// its tasks end when its process does (see `recovery_timed_out`).
    given_up: bool,
    process: Option<ExecutorProcess>,
}

impl Executor {
    fn new(kind: ExecutorKind) -> Executor {
        Executor {
            kind,
            registered: false,
            idle_since: None,
            shutting_down: false,
            recovering: false,
            given_up: false,
            process: None,
        }
    }

    fn record(&self) -> ExecutorRecord {
        ExecutorRecord {
            kind: self.kind.to_record(),
            pid: self.process.map(|p| p.pid).unwrap_or(0),
            start_time: self.process.map(|p| p.start_time).unwrap_or(0),
        }
    }
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
    /// Records changed since the last `take_checkpoint`.
    dirty_tasks: BTreeSet<TaskKey>,
    dirty_executors: BTreeSet<ExecutorKey>,
    dirty_meta: bool,
    /// Some change since the last `take_checkpoint` must be durable before acting.
    dirty_durable: bool,
    /// After a restart: when executors that have not re-registered are given up.
    recovery_deadline: Option<u64>,
    /// Executors shut down with their tasks, and why: their tasks end KILLED with
    /// reason EXECUTOR_SHUTDOWN (the framework asked) or AGENT_DRAINED (the agent
    /// is stopping with its tasks). (Not checkpointed: after an agent restart such
    /// tasks end as ordinary kills.)
    shutdown_asked: BTreeMap<ExecutorKey, ShutdownWhy>,
    /// The agent is stopping with its tasks ([`Input::Drain`]): nothing new starts.
    draining: bool,
    /// Where the shell serves `/fn/NAME/...` over HTTP (told to the master in
    /// `hello`); empty: nowhere.
    http_address: String,
    /// Some function host started or stopped serving since the last
    /// `take_function_hosts_changed`.
    function_hosts_changed: bool,
    /// Wall-clock time of the input being handled, for the stamps of status updates
    /// (see [`Now`]); never for timeouts, never read between inputs.
    wall_ms: u64,
    /// See `set_identity_nonce`.
    identity_nonce: String,
    /// Tasks that ended and were acknowledged, oldest first, at most
    /// [`MAX_COMPLETED`] (see `AgentHello.completed`); keyed by a sequence number.
    completed: BTreeMap<u64, v1::CompletedTask>,
    completed_seq: u64,
    dirty_completed: BTreeSet<u64>,
}

/// Most ended tasks an agent remembers for its hello (Mesos keeps up to 150 completed
/// executors per framework and 1,000 tasks each; one bound is enough here).
pub const MAX_COMPLETED: usize = 1000;

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
            dirty_tasks: BTreeSet::new(),
            dirty_executors: BTreeSet::new(),
            dirty_meta: false,
            dirty_durable: false,
            recovery_deadline: None,
            shutdown_asked: BTreeMap::new(),
            draining: false,
            http_address: String::new(),
            function_hosts_changed: false,
            wall_ms: 0,
            identity_nonce: String::new(),
            completed: BTreeMap::new(),
            completed_seq: 0,
            dirty_completed: BTreeSet::new(),
        }
    }

    /// Rebuilds the core of an agent that restarted from its checkpoint. The outputs
    /// ask the shell to find each recorded executor process (`AdoptExecutor`). Until
    /// every recorded executor has re-registered, died, or missed the deadline of
    /// `reregister_timeout_ms` (see `recovering`), the shell should not register with the
    /// master: the tasks it would report are not known yet.
    ///
    /// - Tasks that were being prepared are prepared again once registered.
    /// - Launched tasks wait for their executor; if it died meanwhile they end FAILED
    ///   (EXECUTOR_TERMINATED) saying so.
    /// - Ended tasks keep their unacknowledged updates, resent as they were.
    pub fn recover(
        cfg: AgentCoreConfig,
        state: CheckpointState,
        now: impl Into<Now>,
    ) -> (Self, Vec<Output>) {
        let Now {
            mono_ms: now,
            wall_ms,
        } = now.into();
        let mut core = AgentCore::new(cfg);
        core.wall_ms = wall_ms;
        // Hosts still serving after the restart are routed to again.
        core.function_hosts_changed = true;
        core.agent_id = state.agent_id;
        core.update_seq = state.update_seq;
        core.completed_seq = state.completed.keys().next_back().map_or(0, |k| k + 1);
        core.completed = state.completed;
        for (key, rec) in state.executors {
            let mut e = Executor::new(ExecutorKind::from_record(rec.kind));
            e.recovering = true;
            e.process = (rec.pid != 0).then_some(ExecutorProcess {
                pid: rec.pid,
                start_time: rec.start_time,
            });
            core.executors.insert(key, e);
        }
        let mut orphans = Vec::new();
        for (key, rec) in state.tasks {
            let Some(info) = rec.info else {
                // Unreadable as a task: forget it (the next write removes it).
                core.dirty_tasks.insert(key);
                continue;
            };
            let executor = (key.0.clone(), rec.executor_id.clone());
            let latest = rec.latest.unwrap_or_default();
            let live = rec.live.unwrap_or_else(|| latest.clone());
            let mut phase = Phase::from_record(rec.phase);
            let known = core.executors.contains_key(&executor);
            let mut needs_prepare = phase == Phase::Preparing;
            if phase == Phase::AwaitingExecutor && !known {
                // Its executor was never recorded as started: start over from the
                // sandbox (preparing again is harmless).
                phase = Phase::Preparing;
                needs_prepare = true;
                core.dirty_tasks.insert(key.clone());
            }
            if phase == Phase::Launched && !known {
                orphans.push(key.clone());
            }
            core.tasks.insert(
                key,
                Task {
                    state: latest.state(),
                    info,
                    executor,
                    phase,
                    latest,
                    live,
                    kill_requested: rec.kill_requested,
                    terminal_sent: rec.terminal_sent,
                    needs_prepare,
                    updates: UpdateStream {
                        queue: rec.updates.into(),
                        next_retry_ms: 0,
                        backoff_ms: core.cfg.update_retry_ms,
                    },
                },
            );
        }
        for key in orphans {
            let msg = format!(
                "executor {} is not in the agent's checkpoint after a restart",
                core.tasks[&key].executor.1
            );
            core.terminal(
                &key,
                new_status(TaskState::TaskFailed, Reason::ExecutorTerminated, &msg),
                now,
            );
        }
        if !core.executors.is_empty() {
            core.recovery_deadline = Some(now + core.cfg.reregister_timeout_ms);
        }
        let adopt: Vec<Output> = core
            .executors
            .iter()
            .map(|(key, e)| Output::AdoptExecutor {
                key: key.clone(),
                process: e.process,
            })
            .collect();
        core.out.extend(adopt);
        let outs = std::mem::take(&mut core.out);
        (core, outs)
    }

    /// Whether executors from the checkpoint are still awaited (see `recover`).
    pub fn recovering(&self) -> bool {
        self.executors.values().any(|e| e.recovering)
    }

    /// The changes to the durable state since the last call, to be written before
    /// the outputs of the same input are carried out. `None` when nothing changed.
    pub fn take_checkpoint(&mut self) -> Option<CheckpointDelta> {
        if self.dirty_tasks.is_empty()
            && self.dirty_executors.is_empty()
            && self.dirty_completed.is_empty()
            && !self.dirty_meta
        {
            return None;
        }
        let completed = std::mem::take(&mut self.dirty_completed)
            .into_iter()
            .map(|k| (k, self.completed.get(&k).cloned()))
            .collect();
        let tasks = std::mem::take(&mut self.dirty_tasks)
            .into_iter()
            .map(|k| {
                let r = self.tasks.get(&k).map(Task::record);
                (k, r)
            })
            .collect();
        let executors = std::mem::take(&mut self.dirty_executors)
            .into_iter()
            .map(|k| {
                let r = self.executors.get(&k).map(Executor::record);
                (k, r)
            })
            .collect();
        self.dirty_meta = false;
        Some(CheckpointDelta {
            agent_id: self.agent_id.clone(),
            update_seq: self.update_seq,
            tasks,
            executors,
            completed,
            durable: std::mem::take(&mut self.dirty_durable),
        })
    }

    /// The whole durable state, as a checkpoint holds it after every delta so far.
    pub fn checkpoint_state(&self) -> CheckpointState {
        CheckpointState {
            agent_id: self.agent_id.clone(),
            update_seq: self.update_seq,
            tasks: self
                .tasks
                .iter()
                .map(|(k, t)| (k.clone(), t.record()))
                .collect(),
            executors: self
                .executors
                .iter()
                .map(|(k, e)| (k.clone(), e.record()))
                .collect(),
            completed: self.completed.clone(),
        }
    }

    fn touch(&mut self, key: &TaskKey) {
        self.dirty_tasks.insert(key.clone());
    }

    fn touch_executor(&mut self, key: &ExecutorKey, durable: bool) {
        self.dirty_executors.insert(key.clone());
        self.dirty_durable |= durable;
    }

    pub fn agent_id(&self) -> Option<&str> {
        self.agent_id.as_deref()
    }

    /// Names this agent installation (hostname, work dir and the nonce of its
    /// identity) for the master, the same across restarts; see
    /// `AgentHello.registration_token`.
    pub fn registration_token(&self) -> String {
        let mut bytes = self.cfg.hostname.clone().into_bytes();
        bytes.push(0);
        bytes.extend_from_slice(self.cfg.work_dir.to_string_lossy().as_bytes());
        if !self.identity_nonce.is_empty() {
            bytes.push(0);
            bytes.extend_from_slice(self.identity_nonce.as_bytes());
        }
        agora_proto::sha256_hex(&bytes)[..32].to_string()
    }

    /// The nonce of this installation's identity (kept by the shell; a new identity
    /// gets a new one, so the master does not take it for the old agent).
    pub fn set_identity_nonce(&mut self, nonce: String) {
        self.identity_nonce = nonce;
    }

    /// What to say to the master when (re)connecting.
    pub fn hello(&self) -> AgentHello {
        AgentHello {
            agent_id: self.agent_id.clone().unwrap_or_default(),
            hostname: self.cfg.hostname.clone(),
            resources: self.cfg.resources.to_proto(),
            attributes: self.cfg.attributes.clone(),
            registration_token: self.registration_token(),
            http_address: self.http_address.clone(),
            // Live tasks with their newest status, and tasks that ended with their
            // terminal update not yet acknowledged, with that terminal status: the
            // update may have been lost on the way (the agent was killed as it sent
            // it), and a master that never got it must not call the task LOST. Their
            // resources are free here; the master does not count them.
            tasks: self
                .tasks
                .iter()
                .filter_map(|((fw, _), t)| {
                    let status = if t.phase != Phase::Terminal {
                        &t.latest
                    } else if !t.updates.queue.is_empty() {
                        t.updates
                            .queue
                            .iter()
                            .rev()
                            .find(|u| u.state().is_terminal())
                            .unwrap_or(&t.latest)
                    } else {
                        return None;
                    };
                    Some(RunningTask {
                        framework_id: fw.clone(),
                        task: Some(t.info.clone()),
                        status: Some(status.clone()),
                    })
                })
                .collect(),
            completed: self.completed.values().cloned().collect(),
        }
    }

    pub fn sandbox_dir(&self, key: &TaskKey) -> PathBuf {
        sandbox_dir(&self.cfg.work_dir, key)
    }

    /// Sets the host:port where the shell serves `/fn/NAME/...`, sent to the master
    /// in the next `hello`.
    pub fn set_http_address(&mut self, address: String) {
        self.http_address = address;
    }

    /// The function hosts serving now: tasks RUNNING (not being killed) with a
    /// `function`, with it. Where the shell routes `/fn/NAME/...`.
    pub fn serving_function_hosts(&self) -> impl Iterator<Item = (&TaskKey, &FunctionInfo)> {
        self.tasks.iter().filter_map(|(key, t)| {
            let f = t.info.function.as_ref()?;
            (t.phase == Phase::Launched && t.state == TaskState::TaskRunning && !t.kill_requested)
                .then_some((key, f))
        })
    }

    /// The function hosts serving now, by function name.
    pub fn function_hosts(&self) -> BTreeMap<String, Vec<TaskKey>> {
        let mut out: BTreeMap<String, Vec<TaskKey>> = BTreeMap::new();
        for (key, f) in self.serving_function_hosts() {
            out.entry(f.name.clone()).or_default().push(key.clone());
        }
        out
    }

    /// Whether `function_hosts` changed since the last call.
    pub fn take_function_hosts_changed(&mut self) -> bool {
        std::mem::take(&mut self.function_hosts_changed)
    }

    /// Feeds one input; returns what the shell must do, in order. `now.mono_ms` times
    /// retries and idle executors; `now.wall_ms` stamps status updates.
    pub fn handle(&mut self, input: Input, now: impl Into<Now>) -> Vec<Output> {
        let Now {
            mono_ms: now,
            wall_ms,
        } = now.into();
        self.wall_ms = wall_ms;
        match input {
            Input::Registered { agent_id } => {
                if let Some(old) = &self.agent_id {
                    if *old != agent_id {
                        tracing::warn!(%old, new = %agent_id, "master gave this agent a new id");
                    }
                }
                if self.agent_id.as_deref() != Some(agent_id.as_str()) {
                    self.dirty_meta = true;
                    self.dirty_durable = true;
                }
                self.agent_id = Some(agent_id);
                self.connected = true;
                // Resend the head of every stream now that someone listens, and start
                // its backoff afresh: the new link has not failed to deliver anything.
                let keys: Vec<TaskKey> = self.tasks.keys().cloned().collect();
                for k in &keys {
                    if let Some(t) = self.tasks.get_mut(k) {
                        t.updates.backoff_ms = self.cfg.update_retry_ms;
                    }
                    self.send_head(k, now);
                }
                // Tasks recovered half-prepared: prepare again now that fetching works.
                for k in keys {
                    if let Some(t) = self.tasks.get_mut(&k) {
                        if t.needs_prepare {
                            t.needs_prepare = false;
                            let task = t.info.clone();
                            self.out.push(Output::Prepare { key: k, task });
                        }
                    }
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
                    self.touch(&k);
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
            Input::ShutdownExecutor { key } => {
                self.shutdown_executor(key, ShutdownWhy::Framework, now)
            }
            Input::Drain => self.drain(now),
            Input::FrameworkMessage { key, data } => {
                match self.executors.get(&key) {
                    Some(e) if e.registered && !e.shutting_down => {
                        self.out.push(Output::ToExecutor {
                            key,
                            msg: AgentToExecutor {
                                msg: Some(agent_to_executor::Msg::Message(v1::ExecutorMessage {
                                    data,
                                })),
                            },
                        })
                    }
                    // Best effort, as in Mesos: the framework is not told.
                    _ => {
                        tracing::warn!(framework = %key.0, executor = %key.1, "message for an executor that is not running here; dropped")
                    }
                }
            }
            Input::ExecutorMessage { key, data } if data.len() > MAX_MESSAGE_BYTES => {
                tracing::warn!(framework = %key.0, executor = %key.1, bytes = data.len(), "executor message over {MAX_MESSAGE_BYTES} bytes; dropped");
            }
            Input::ExecutorMessage { key, data } => {
                self.out.push(Output::ToMaster(AgentToMaster {
                    msg: Some(agent_to_master::Msg::ExecutorMessage(
                        v1::ExecutorToFramework {
                            framework_id: key.0,
                            executor_id: key.1,
                            data,
                        },
                    )),
                }));
            }
            Input::Prepared { key, result } => self.prepared(key, result, now),
            Input::ExecutorRegistered { key } => self.executor_attached(key, None, now),
            Input::ExecutorReregistered { key, tasks } => {
                self.executor_attached(key, Some(tasks), now)
            }
            Input::ExecutorSpawned { key, process } => {
                if let Some(e) = self.executors.get_mut(&key) {
                    e.process = Some(process);
                    self.touch_executor(&key, true);
                }
            }
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
        if self.draining {
            self.untracked_status(
                &key,
                TaskState::TaskDropped,
                Reason::AgentDrained,
                "the agent is stopping with its tasks (drain); the task was not started",
            );
            return;
        }
        let exec_id = if info.executor_id.is_empty() {
            // (A function task without an id is refused below; it is reported under
            // the id the master routes it to.)
            match ExecutorKind::of(&info) {
                ExecutorKind::Wasm | ExecutorKind::Function => DEFAULT_EXECUTOR.to_string(),
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
            timestamp_ms: self.wall_ms,
            ..Default::default()
        };
        self.tasks.insert(
            key.clone(),
            Task {
                info: info.clone(),
                executor: (rt.framework_id.clone(), exec_id),
                phase: Phase::Preparing,
                state: TaskState::TaskStaging,
                live: latest.clone(),
                latest,
                kill_requested: false,
                terminal_sent: false,
                needs_prepare: false,
                updates: UpdateStream::default(),
            },
        );
        self.touch(&key);
        let ids = path_id_problem(&key.0, &key.1, &self.tasks[&key].executor.1);
        if let Some(problem) = ids.or_else(|| function_task_problem(&info)) {
            self.terminal(
                &key,
                new_status(TaskState::TaskError, Reason::InvalidTask, &problem),
                now,
            );
            return;
        }
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

    fn prepared(&mut self, key: TaskKey, result: Result<(), PrepareFailed>, now: u64) {
        let Some(t) = self.tasks.get(&key) else {
            return;
        };
        if t.phase != Phase::Preparing {
            return;
        }
        if t.kill_requested {
            let st = if self.draining {
                let why = ShutdownWhy::Drain;
                new_status(
                    TaskState::TaskKilled,
                    why.reason(),
                    &why.message(&t.executor.1),
                )
            } else {
                new_status(
                    TaskState::TaskKilled,
                    Reason::KilledByFramework,
                    "killed before it started",
                )
            };
            self.terminal(&key, st, now);
            return;
        }
        if let Err(e) = result {
            let reason = match e {
                PrepareFailed::Fetch(_) => Reason::FetchFailed,
                PrepareFailed::Sandbox(_) => Reason::SandboxFailed,
            };
            self.terminal(
                &key,
                new_status(TaskState::TaskFailed, reason, &e.to_string()),
                now,
            );
            return;
        }
        let exec_key = t.executor.clone();
        let kind = ExecutorKind::of(&t.info);
        if let Some(e) = self.executors.get(&exec_key).filter(|e| !e.shutting_down) {
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
                self.executors.insert(exec_key.clone(), Executor::new(kind));
                self.touch_executor(&exec_key, false);
                self.tasks.get_mut(&key).expect("present").phase = Phase::AwaitingExecutor;
                self.out.push(Output::SpawnExecutor { key: exec_key });
            }
        }
        self.touch(&key);
    }

    fn launch(&mut self, key: &TaskKey) {
        let work = self.cfg.work_dir.clone();
        let limit = self.cfg.output_limit_bytes;
        self.dirty_tasks.insert(key.clone());
        let t = self.tasks.get_mut(key).expect("caller checked");
        t.phase = Phase::Launched;
        let sandbox = sandbox_dir(&work, key);
        let module = t.info.module.clone().unwrap_or_default();
        let res = Resources::from_proto(&t.info.resources).unwrap_or_default();
        let mem = res.get(MEM).max(0) as u64;
        // A function host's memory limit is per request: the function's own, else
        // the task's memory.
        let memory_bytes = match &t.info.function {
            Some(f) if f.memory_bytes > 0 => f.memory_bytes,
            _ => mem,
        };
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
            memory_bytes,
            timeout_ms: match &t.info.command {
                Some(c) => c.timeout_ms,
                None => module.timeout_ms,
            },
            output_limit_bytes: limit,
            command: t.info.command.clone(),
            milli_cpus: res.milli_cpus(),
            function: t.info.function.clone(),
            sandbox_dir: sandbox.to_string_lossy().into_owned(),
            // A task that asks for no disk is held to the default.
            disk_bytes: match res.disk_bytes() {
                d if d > 0 => d as u64,
                _ => agora_proto::resources::DEFAULT_TASK_DISK as u64,
            },
            max_files: self.cfg.max_files_per_task,
        };
        let exec = t.executor.clone();
        self.out.push(Output::ToExecutor {
            key: exec,
            msg: AgentToExecutor {
                msg: Some(agent_to_executor::Msg::Launch(launch)),
            },
        });
    }

    /// An executor registered: a fresh one (`reported` is `None`), or one that
    /// reconnected after an agent restart, naming the tasks it still knows.
    fn executor_attached(&mut self, key: ExecutorKey, reported: Option<Vec<String>>, now: u64) {
        let reconnect = reported.is_some();
        let reported: BTreeSet<String> = reported.unwrap_or_default().into_iter().collect();
        if !self.executors.contains_key(&key) {
            if reconnect {
                // An executor from before a restart that this agent does not know (its
                // record was lost, or it was given up): whatever it runs is nobody's.
                // It goes, and exits before another process takes its id.
                tracing::warn!(framework = %key.0, executor = %key.1, "unknown executor reconnected; shutting it down");
                let mut e = Executor::new(ExecutorKind::Wasm);
                e.registered = true;
                e.shutting_down = true;
                self.executors.insert(key.clone(), e);
                self.touch_executor(&key, false);
                self.out.push(shutdown_msg(&key));
                self.out.push(Output::ReapExecutor { key });
                return;
            }
            let kind = self
                .tasks
                .values()
                .find(|t| t.executor == key)
                .map(|t| ExecutorKind::of(&t.info))
                .unwrap_or(ExecutorKind::Wasm);
            self.executors.insert(key.clone(), Executor::new(kind));
            self.touch_executor(&key, false);
        }
        let e = self.executors.get_mut(&key).expect("inserted above");
        if e.shutting_down {
            // Already given up (it missed the recovery deadline): remind it to go.
            if !e.registered {
                e.registered = true;
                self.out.push(shutdown_msg(&key));
            }
            return;
        }
        let was_recovering = e.recovering;
        e.registered = true;
        e.recovering = false;
        if was_recovering {
            tracing::info!(framework = %key.0, executor = %key.1, tasks = reported.len(), "executor re-attached after the agent restarted");
            if !self.recovering() {
                self.recovery_deadline = None;
            }
        }
        let mine: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.executor == key && matches!(t.phase, Phase::AwaitingExecutor | Phase::Launched)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &mine {
            let (phase, kill_requested) = (self.tasks[k].phase, self.tasks[k].kill_requested);
            let listed = reported.contains(&k.1);
            match (phase, listed) {
                // Handed over before the restart (the phase change was not on disk).
                (Phase::AwaitingExecutor, true) => {
                    self.tasks.get_mut(k).expect("present").phase = Phase::Launched;
                    self.touch(k);
                }
                (Phase::AwaitingExecutor, false) => self.launch(k),
                // Still there: a kill asked for before the restart may have been lost.
                (Phase::Launched, true) if kill_requested && reconnect => {
                    self.out.push(Output::ToExecutor {
                        key: key.clone(),
                        msg: AgentToExecutor {
                            msg: Some(agent_to_executor::Msg::Kill(v1::ExecutorKill {
                                task_id: k.1.clone(),
                            })),
                        },
                    });
                }
                (Phase::Launched, true) => {}
                // The launch never reached the executor (lost when the agent went
                // down): it never ran, so launch it now, unless it was to be killed.
                (Phase::Launched, false) if kill_requested => self.terminal(
                    k,
                    new_status(
                        TaskState::TaskKilled,
                        Reason::KilledByFramework,
                        "killed before it started",
                    ),
                    now,
                ),
                (Phase::Launched, false) => self.launch(k),
                _ => {}
            }
        }
        // What the executor runs that this agent does not know: stop it. (A task
        // known here as ended is only one whose last status the executor still holds.)
        for id in &reported {
            let known = self
                .tasks
                .get(&(key.0.clone(), id.clone()))
                .is_some_and(|t| t.executor == key);
            if !known {
                self.out.push(Output::ToExecutor {
                    key: key.clone(),
                    msg: AgentToExecutor {
                        msg: Some(agent_to_executor::Msg::Kill(v1::ExecutorKill {
                            task_id: id.clone(),
                        })),
                    },
                });
            }
        }
        let busy = self.tasks.values().any(|t| {
            t.executor == key && t.phase != Phase::Terminal && t.phase != Phase::Preparing
        });
        if let Some(e) = self.executors.get_mut(&key) {
            e.idle_since = if busy { None } else { Some(now) };
        }
    }

    fn executor_status(&mut self, key: ExecutorKey, s: ExecutorStatus, now: u64) {
        let tkey = (key.0.clone(), s.task_id.clone());
        match self.tasks.get(&tkey) {
            Some(t) if t.executor == key && t.phase != Phase::Terminal => {}
            Some(t) if t.executor == key => {
                // Already ended (e.g. a status sent again after a reconnect).
                tracing::debug!(task = %s.task_id, "status of a task that already ended; ignored");
                return;
            }
            _ => {
                tracing::warn!(task = %s.task_id, "executor reported on a task it does not run; ignored");
                return;
            }
        }
        let state = s.state();
        if state.is_terminal() {
            let why = self
                .shutdown_asked
                .get(&key)
                .filter(|_| self.tasks[&tkey].kill_requested);
            let mut st = if let Some(why) = why {
                new_status(state, why.reason(), &why.message(&key.1))
            } else {
                new_status(state, s.reason(), &s.message)
            };
            st.exit_code = s.exit_code;
            st.fuel_used = s.fuel_used;
            st.usage = s.usage;
            self.terminal(&tkey, st, now);
        } else if state == TaskState::TaskRunning
            && matches!(
                self.tasks[&tkey].state,
                TaskState::TaskStaging | TaskState::TaskStarting
            )
        {
            // (A RUNNING resent after a reconnect, or one after KILLING, changes nothing.)
            let mut st = new_status(TaskState::TaskRunning, Reason::Unspecified, "");
            st.instantiate_us = s.instantiate_us;
            self.update(&tkey, st, now);
        }
    }

    fn executor_exited(&mut self, key: ExecutorKey, detail: String, now: u64) {
        let gone = self.executors.remove(&key);
        let shutdown_asked = self.shutdown_asked.remove(&key);
        if gone.is_some() {
            self.touch_executor(&key, false);
        }
        let was_shutting_down = gone.as_ref().is_some_and(|e| e.shutting_down);
        let was_recovering = gone.as_ref().is_some_and(|e| e.recovering);
        let was_given_up = gone.as_ref().is_some_and(|e| e.given_up);
        if was_recovering && !self.recovering() {
            self.recovery_deadline = None;
        }
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
        if !live.is_empty() {
            tracing::warn!(framework = %key.0, executor = %key.1, "executor exited: {detail}");
        } else if !was_shutting_down {
            // Nothing of its was running (a function host's executor ends with its host).
            tracing::info!(framework = %key.0, executor = %key.1, "executor exited: {detail}");
        }
        for k in live {
            let t = &self.tasks[&k];
            if t.phase == Phase::AwaitingExecutor && (was_shutting_down || was_recovering) {
                // Queued behind an executor that was on its way out (or that did not
                // survive the agent's restart): start a new one (once for all such
                // tasks).
                self.respawn(&key, ExecutorKind::of(&t.info));
                continue;
            }
            let (state, reason) = if let Some(why) = shutdown_asked.filter(|_| t.kill_requested) {
                (TaskState::TaskKilled, why.reason())
            } else if t.kill_requested {
                (TaskState::TaskKilled, Reason::KilledByFramework)
            } else if t.phase == Phase::AwaitingExecutor {
                (TaskState::TaskFailed, Reason::ExecutorStartFailed)
            } else {
                (TaskState::TaskFailed, Reason::ExecutorTerminated)
            };
            let msg = if was_recovering {
                format!(
                    "executor {} died while the agent was down ({detail})",
                    key.1
                )
            } else if was_given_up {
                format!(
                    "executor {} did not re-register within {} after the agent restarted, and was stopped ({detail})",
                    key.1,
                    format_duration(Duration::from_millis(self.cfg.reregister_timeout_ms))
                )
            } else if let Some(why) = shutdown_asked.filter(|_| t.kill_requested) {
                // The process ended before its report of the kill reached us: say
                // what the executor would have said.
                format!("{} ({detail})", why.message(&key.1))
            } else {
                format!("executor {}: {detail}", key.1)
            };
            self.terminal(&k, new_status(state, reason, &msg), now);
        }
        // FAILURE for the framework, after its tasks' updates (best effort: not
        // resent after a restart, nor sent while no master listens). An executor the
        // agent itself stopped for being idle is no failure; one the framework shut
        // down is reported.
        let framework_asked = shutdown_asked == Some(ShutdownWhy::Framework);
        if self.connected && gone.is_some() && (!was_shutting_down || framework_asked) {
            self.out.push(Output::ToMaster(AgentToMaster {
                msg: Some(agent_to_master::Msg::ExecutorExited(v1::ExecutorExited {
                    framework_id: key.0.clone(),
                    executor_id: key.1.clone(),
                    status: exit_code_in(&detail),
                    message: detail,
                })),
            }));
        }
    }

    /// Starts a fresh executor for tasks that wait for one, unless one is there.
    fn respawn(&mut self, key: &ExecutorKey, kind: ExecutorKind) {
        if !self.executors.contains_key(key) {
            self.executors.insert(key.clone(), Executor::new(kind));
            self.touch_executor(key, false);
            self.out.push(Output::SpawnExecutor { key: key.clone() });
        }
    }

    /// The recovery deadline passed: executors from the checkpoint that have not
    /// re-registered are given up, and the tasks they ran end.
    fn recovery_timed_out(&mut self, now: u64) {
        let late: Vec<ExecutorKey> = self
            .executors
            .iter()
            .filter(|(_, e)| e.recovering)
            .map(|(k, _)| k.clone())
            .collect();
        for key in late {
            tracing::warn!(framework = %key.0, executor = %key.1, "executor did not re-register after the agent restarted; giving it up");
            let msg = format!(
                "executor {} did not re-register within {} after the agent restarted",
                key.1,
                format_duration(Duration::from_millis(self.cfg.reregister_timeout_ms))
            );
            let e = self.executors.get_mut(&key).expect("listed above");
            e.recovering = false;
            if e.process.is_some() {
                // Make sure it goes. Its tasks end when it has (`ExecutorExited`):
                // until then the process may still run them, and what they use must
                // stay counted. Its exit also lets waiting tasks start a fresh one.
                e.shutting_down = true;
                e.given_up = true;
                self.out.push(Output::ReapExecutor { key: key.clone() });
                continue;
            }
            // No process to watch: forget it, and end what it ran.
            self.executors.remove(&key);
            self.touch_executor(&key, false);
            let mine: Vec<TaskKey> = self
                .tasks
                .iter()
                .filter(|(_, t)| {
                    t.executor == key
                        && matches!(t.phase, Phase::AwaitingExecutor | Phase::Launched)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in mine {
                let t = &self.tasks[&k];
                if t.phase == Phase::AwaitingExecutor {
                    self.respawn(&key, ExecutorKind::of(&t.info));
                    continue;
                }
                let (state, reason) = if t.kill_requested {
                    (TaskState::TaskKilled, Reason::KilledByFramework)
                } else {
                    (TaskState::TaskFailed, Reason::ExecutorTerminated)
                };
                self.terminal(&k, new_status(state, reason, &msg), now);
            }
        }
    }

    /// SHUTDOWN of one executor: every task of it is killed (those not handed to it
    /// yet end at once), and the executor is told to stop, which it does after
    /// reporting its tasks' ends.
    fn shutdown_executor(&mut self, key: ExecutorKey, why: ShutdownWhy, now: u64) {
        let mine: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.executor == key && t.phase != Phase::Terminal)
            .map(|(k, _)| k.clone())
            .collect();
        if mine.is_empty() && !self.executors.contains_key(&key) {
            tracing::warn!(framework = %key.0, executor = %key.1, "shutdown of an executor that is not here; ignored");
            return;
        }
        if why == ShutdownWhy::Framework {
            tracing::info!(framework = %key.0, executor = %key.1, tasks = mine.len(), "shutting down executor at the framework's request");
        }
        self.shutdown_asked.insert(key.clone(), why);
        let msg = why.message(&key.1);
        for k in mine {
            let phase = self.tasks[&k].phase;
            if phase == Phase::AwaitingExecutor {
                if let Some(t) = self.tasks.get_mut(&k) {
                    t.kill_requested = true;
                }
                self.dirty_tasks.insert(k.clone());
                self.terminal(
                    &k,
                    new_status(TaskState::TaskKilled, why.reason(), &msg),
                    now,
                );
            } else {
                self.kill(&k, now);
            }
        }
        if let Some(e) = self.executors.get_mut(&key) {
            if e.registered && !e.shutting_down {
                e.shutting_down = true;
                self.out.push(shutdown_msg(&key));
                self.out.push(Output::ReapExecutor { key });
            } else if !e.registered && why == ShutdownWhy::Drain {
                // Still starting (or not re-attached since a restart): it is told to
                // go when it registers (see `executor_attached`).
                e.shutting_down = true;
            }
        }
    }

    /// The agent stops with its tasks: every executor is shut down, each task ends
    /// KILLED with reason AGENT_DRAINED (those not handed to an executor at once).
    fn drain(&mut self, now: u64) {
        if self.draining {
            return;
        }
        self.draining = true;
        let keys: BTreeSet<ExecutorKey> = self
            .tasks
            .values()
            .filter(|t| t.phase != Phase::Terminal)
            .map(|t| t.executor.clone())
            .chain(self.executors.keys().cloned())
            .collect();
        tracing::info!(
            executors = keys.len(),
            tasks = self.live_tasks(),
            "draining: stopping every executor and task"
        );
        for key in keys {
            self.shutdown_executor(key, ShutdownWhy::Drain, now);
        }
    }

    /// Status updates not yet acknowledged by the master (a draining agent waits,
    /// boundedly, for them before it goes).
    pub fn unacknowledged_updates(&self) -> usize {
        self.tasks.values().map(|t| t.updates.queue.len()).sum()
    }

    /// A status of a task the agent does not track (so no update stream: sent once,
    /// never resent, no uuid to acknowledge).
    fn untracked_status(&mut self, key: &TaskKey, state: TaskState, reason: Reason, message: &str) {
        let st = TaskStatus {
            task_id: key.1.clone(),
            state: state as i32,
            reason: reason as i32,
            message: message.into(),
            agent_id: self.agent_id.clone().unwrap_or_default(),
            timestamp_ms: self.wall_ms,
            ..Default::default()
        };
        self.out.push(Output::ToMaster(AgentToMaster {
            msg: Some(agent_to_master::Msg::StatusUpdate(StatusUpdate {
                framework_id: key.0.clone(),
                status: Some(st),
            })),
        }));
    }

    fn kill(&mut self, key: &TaskKey, now: u64) {
        let Some(t) = self.tasks.get_mut(key) else {
            // Unknown here: tell the framework the task is gone so it stops waiting.
            self.untracked_status(
                key,
                TaskState::TaskLost,
                Reason::Reconciliation,
                "the agent has no such task",
            );
            return;
        };
        if t.phase == Phase::Terminal || t.kill_requested {
            return;
        }
        t.kill_requested = true;
        self.dirty_tasks.insert(key.clone());
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
        t.needs_prepare = false;
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
        st.timestamp_ms = self.wall_ms;
        // Only RUNNING hosts are routed to: entering or leaving it changes the routes.
        let (was, is) = (t.state, st.state());
        if t.info.function.is_some()
            && was != is
            && (was == TaskState::TaskRunning || is == TaskState::TaskRunning)
        {
            self.function_hosts_changed = true;
        }
        t.state = st.state();
        if !t.state.is_terminal() {
            t.live = st.clone();
        }
        t.latest = st.clone();
        t.updates.queue.push_back(st);
        // On disk before it is sent.
        self.dirty_tasks.insert(key.clone());
        self.dirty_meta = true;
        self.dirty_durable = true;
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
        if head.state().is_terminal() && !t.terminal_sent {
            t.terminal_sent = true;
            self.dirty_tasks.insert(key.clone());
            self.dirty_durable = true;
        }
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
            self.dirty_tasks.insert(key.clone());
            t.updates.backoff_ms = self.cfg.update_retry_ms;
            self.send_head(&key, now);
        }
        self.gc_tasks();
    }

    /// Forgets terminal tasks whose updates were all acknowledged.
    fn gc_tasks(&mut self) {
        let done: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.phase == Phase::Terminal && t.updates.queue.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            let Some(t) = self.tasks.remove(&k) else {
                continue;
            };
            self.dirty_tasks.insert(k.clone());
            // Remembered for the history (`AgentHello.completed`), without what may be
            // large or secret.
            let mut info = t.info;
            info.args.clear();
            info.env.clear();
            info.inputs.clear();
            if let Some(c) = info.command.as_mut() {
                c.value.clear();
                c.arguments.clear();
            }
            let seq = self.completed_seq;
            self.completed_seq += 1;
            self.completed.insert(
                seq,
                v1::CompletedTask {
                    framework_id: k.0,
                    task: Some(info),
                    status: Some(t.latest),
                },
            );
            self.dirty_completed.insert(seq);
            while self.completed.len() > MAX_COMPLETED {
                if let Some((old, _)) = self.completed.pop_first() {
                    self.dirty_completed.insert(old);
                }
            }
        }
    }

    fn tick(&mut self, now: u64) {
        if self.recovery_deadline.is_some_and(|d| now >= d) {
            self.recovery_deadline = None;
            self.recovery_timed_out(now);
        }
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
                self.out.push(shutdown_msg(key));
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

/// The exit code in a shell's description of an executor's end ("exited with code
/// N ..."), if it had one.
fn exit_code_in(detail: &str) -> Option<i32> {
    let rest = detail.split("exited with code ").nth(1)?;
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

fn shutdown_msg(key: &ExecutorKey) -> Output {
    Output::ToExecutor {
        key: key.clone(),
        msg: AgentToExecutor {
            msg: Some(agent_to_executor::Msg::Shutdown(v1::ExecutorShutdown {})),
        },
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
