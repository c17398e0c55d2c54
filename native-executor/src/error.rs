//! The crate's one error type. Every variant names the object it failed on and, where
//! there is one, what to try next.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--isolation` named no known mode.
    #[error("unknown isolation mode {0:?}: use cgroups or posix")]
    UnknownIsolation(String),
    /// Cgroup isolation was asked for (`--isolation cgroups`) but cannot work here.
    #[error(
        "cgroup isolation is not available: {0}; run as root on a machine with the cpu, \
         cpuacct (v1), memory and pids controllers mounted, or use posix isolation"
    )]
    CgroupsUnavailable(String),

    /// A cgroup name (or one of its '/'-separated parts) the kernel would refuse or
    /// misread, such as `..`, a name starting with '.', or a control file's name.
    #[error("invalid cgroup name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },

    /// A cgroupfs operation failed.
    #[error("cannot {action} {}: {cause}", path.display())]
    Cgroup {
        action: String,
        path: PathBuf,
        cause: io::Error,
    },

    /// Writing a limit was refused by the kernel (or by cgroups-rs).
    #[error("cannot set {file} = {value} in cgroup {}: {cause}", path.display())]
    Limit {
        file: &'static str,
        value: String,
        path: PathBuf,
        cause: String,
    },

    /// A task cgroup with this name already holds processes: another task with the same
    /// id is running, or a crashed executor left it behind.
    #[error(
        "cgroup {} already holds processes {pids:?}; is a task with the same id still \
         running? (an agent restart cleans up leftovers)",
        path.display()
    )]
    Busy { path: PathBuf, pids: Vec<i32> },

    /// Processes survived every SIGKILL round (typically stuck in uninterruptible
    /// sleep on a hung filesystem).
    #[error(
        "processes {pids:?} of {what} are still alive {waited_ms} ms after SIGKILL \
         (stuck in the kernel?); they will be retried on the next cleanup"
    )]
    KillTimedOut {
        what: String,
        pids: Vec<i32>,
        waited_ms: u128,
    },

    /// Isolation could not be set up for the executor's tasks (`run_executor`).
    #[error("cannot set up task isolation: {0}")]
    Setup(Box<Error>),

    /// The link to the agent broke (a bad frame, or the agent did not come back).
    #[error(transparent)]
    Link(#[from] agora_executor_link::LinkError),

    #[error("{what}: {cause}")]
    Io { what: String, cause: io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn cgroup(
        action: impl Into<String>,
        path: impl Into<PathBuf>,
        e: io::Error,
    ) -> Self {
        Error::Cgroup {
            action: action.into(),
            path: path.into(),
            cause: e,
        }
    }

    pub(crate) fn io(what: impl Into<String>, e: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            cause: e,
        }
    }
}
