//! The agent's checkpoint: what it must know again after a restart (kill -9
//! included) to re-attach to its executors and finish delivering its status updates.
//!
//! The core decides *what* is recorded ([`CheckpointDelta`], taken from
//! `AgentCore::take_checkpoint` after every input); this module holds the records.
//! The file they live in (`<work>/checkpoint.redb`) is the shell's: see `agora-agent`'s
//! `checkpoint` module. The shell writes each delta before it acts on the outputs of
//! the same input, so an update is on disk before it is sent (at-least-once delivery
//! across restarts).
//!
//! Records are protobuf messages (prost), so fields can be added later the way the
//! wire format grows.

use std::collections::BTreeMap;

use agora_proto::v1::{CompletedTask, TaskInfo, TaskStatus};
use prost::Message;

use crate::{ExecutorKey, TaskKey};

/// Where a task was in its life when it was recorded (`TaskRecord::phase`).
pub mod phase {
    pub const PREPARING: u32 = 0;
    pub const AWAITING_EXECUTOR: u32 = 1;
    pub const LAUNCHED: u32 = 2;
    pub const TERMINAL: u32 = 3;
}

/// `ExecutorRecord::kind`.
pub mod kind {
    pub const WASM: u32 = 0;
    pub const NATIVE: u32 = 1;
    pub const FUNCTION: u32 = 2;
}

#[derive(Clone, PartialEq, Message)]
pub struct MetaRecord {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Empty until the master has given one.
    #[prost(string, tag = "2")]
    pub agent_id: String,
    /// The last sequence number used in a status update's uuid (never reused).
    #[prost(uint64, tag = "3")]
    pub update_seq: u64,
}

/// One task that is live, or ended with updates not yet acknowledged.
#[derive(Clone, PartialEq, Message)]
pub struct TaskRecord {
    #[prost(message, optional, tag = "1")]
    pub info: Option<TaskInfo>,
    #[prost(string, tag = "2")]
    pub executor_id: String,
    /// One of [`phase`].
    #[prost(uint32, tag = "3")]
    pub phase: u32,
    /// The newest status (what `hello` reports for a live task).
    #[prost(message, optional, tag = "4")]
    pub latest: Option<TaskStatus>,
    /// The newest non-terminal status.
    #[prost(message, optional, tag = "5")]
    pub live: Option<TaskStatus>,
    /// Updates not yet acknowledged, oldest (the one in flight) first.
    #[prost(message, repeated, tag = "6")]
    pub updates: Vec<TaskStatus>,
    #[prost(bool, tag = "7")]
    pub kill_requested: bool,
    /// Whether the task's terminal update has been handed to a master link.
    #[prost(bool, tag = "8")]
    pub terminal_sent: bool,
}

/// One executor process the agent started (or re-attached to).
#[derive(Clone, PartialEq, Message)]
pub struct ExecutorRecord {
    /// One of [`kind`].
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    /// 0 when not known yet.
    #[prost(uint32, tag = "2")]
    pub pid: u32,
    /// The process's start time (clock ticks after boot, /proc/PID/stat field 22),
    /// which tells it apart from a later process that reuses the pid.
    #[prost(uint64, tag = "3")]
    pub start_time: u64,
}

/// Everything in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointState {
    pub agent_id: Option<String>,
    pub update_seq: u64,
    pub tasks: BTreeMap<TaskKey, TaskRecord>,
    pub executors: BTreeMap<ExecutorKey, ExecutorRecord>,
    /// The history of tasks that ended and were acknowledged, by sequence number.
    pub completed: BTreeMap<u64, CompletedTask>,
}

/// The changes of one step of the core: records to write (`Some`) or remove (`None`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointDelta {
    pub agent_id: Option<String>,
    pub update_seq: u64,
    pub tasks: Vec<(TaskKey, Option<TaskRecord>)>,
    pub executors: Vec<(ExecutorKey, Option<ExecutorRecord>)>,
    pub completed: Vec<(u64, Option<CompletedTask>)>,
    /// Must be on disk (fsync) before the outputs of the same step are carried out: a
    /// new status update, an executor process. Otherwise (an acknowledgement, a
    /// forgotten task) losing the change costs at most a duplicate update, and it is
    /// made durable by the next durable write.
    pub durable: bool,
}

impl CheckpointState {
    /// Applies a delta (what the file does; tests use this as the model).
    pub fn apply(&mut self, d: &CheckpointDelta) {
        self.agent_id = d.agent_id.clone();
        self.update_seq = d.update_seq;
        for (k, r) in &d.tasks {
            match r {
                Some(r) => {
                    self.tasks.insert(k.clone(), r.clone());
                }
                None => {
                    self.tasks.remove(k);
                }
            }
        }
        for (k, r) in &d.executors {
            match r {
                Some(r) => {
                    self.executors.insert(k.clone(), r.clone());
                }
                None => {
                    self.executors.remove(k);
                }
            }
        }
        for (k, r) in &d.completed {
            match r {
                Some(r) => {
                    self.completed.insert(*k, r.clone());
                }
                None => {
                    self.completed.remove(k);
                }
            }
        }
    }
}
