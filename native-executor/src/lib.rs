//! Agora's native executor: runs tasks' commands (a shell string or an argv) each in a
//! cgroup of its own, with CPU shares and quota, a hard memory limit and a pids limit
//! ([`isolation`], cgroup v1 or v2, or posix process groups with rlimits where cgroups
//! cannot be used), runs them with capped output ([`runner`]), and speaks the agent's
//! executor protocol over a Unix socket ([`executor`]).
//!
//! The agent uses [`isolation`] too: it puts each executor process in a cgroup sized to
//! the sum of its tasks, under which the executor makes one group per task.

mod disk;
mod error;
pub mod executor;
pub mod isolation;
mod output;
pub mod runner;

pub use error::{Error, Result};
pub use executor::run_executor;
pub use isolation::{CgroupLimits, CgroupVersion, Group, IsolationMode, Isolator, TaskIdentity};
pub use runner::{KillSwitch, NativeConfig, Runner};
