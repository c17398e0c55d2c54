//! The one error type of `agora-agent`: what failed in the agent's shell (its work
//! dir and checkpoint, the master link, a sandbox, an executor process), in words an
//! operator can act on. Each message is the whole sentence, cause included, so `{e}`
//! and `{e:#}` agree.

use std::path::PathBuf;
use std::time::Duration;

use agora_net::FrameError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reaching the master, a frame, or an artifact transfer failed.
    #[error(transparent)]
    Net(#[from] agora_net::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    StreamClosed(#[from] quinn::ClosedStream),
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
    /// The agent comes back offering other resources or attributes than those its
    /// tasks were placed on.
    #[error(
        "agent {agent_id} (work dir {}) offered other resources or attributes when its tasks were placed: {changes}. Start it with the same --resources and --attributes to keep its id and tasks, or with --new-identity to join the cluster as a new agent (refused while tasks recorded there may still run: stop it with --drain-on-stop first)",
        .work.display()
    )]
    IdentityChanged {
        agent_id: String,
        changes: String,
        work: PathBuf,
    },
    /// A new identity was asked for while the checkpoint still records tasks.
    #[error(
        "cannot start agent {agent_id} (work dir {}) as a new agent: its checkpoint still records {tasks} tasks and {executors} executors, which would be lost track of. Start it as before (same --resources and --attributes) and stop it with --drain-on-stop, or let its tasks end and their updates reach the master, then try again",
        .work.display()
    )]
    IdentityBusy {
        agent_id: String,
        tasks: usize,
        executors: usize,
        work: PathBuf,
    },
    /// The agent was configured with no master address.
    #[error(
        "no master address: give the agent at least one with --master HOST:PORT[,HOST:PORT...]"
    )]
    NoMaster,
    /// The checkpoint file could not be read or written.
    #[error(transparent)]
    Storage(#[from] redb::Error),
    /// Task isolation (cgroups) could not be set up or used.
    #[error("isolation: {0}")]
    Isolation(agora_native_executor::Error),
    /// A directory of the work dir, or a socket in it, could not be made.
    #[error("cannot {what} {}: {cause}", .path.display())]
    WorkDir {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "cannot serve functions over HTTP on {addr}: {cause}; choose another address with --http"
    )]
    HttpBind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error(
        "cannot open the agent's checkpoint {}: {cause} (is another agent using this \
         work dir? if the file is damaged, move it away: the agent then starts \
         afresh and its running tasks are lost)",
        .path.display()
    )]
    CheckpointOpen {
        path: PathBuf,
        cause: redb::DatabaseError,
    },
    #[error(
        "the agent's checkpoint {} has a bad {what} record: {cause} (move the file away \
         to start afresh; running tasks are then lost)",
        .path.display()
    )]
    CheckpointRecord {
        path: PathBuf,
        what: &'static str,
        cause: prost::DecodeError,
    },
    #[error(
        "the agent's checkpoint {} has layout version {found}, this agent knows {known} \
         (written by another version of agora?)",
        .path.display()
    )]
    CheckpointVersion {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("bad frame from the master: {0}")]
    MasterFrame(FrameError),
    #[error("the master did not answer for {0:?}")]
    MasterSilent(Duration),
    #[error("the master refused this agent: {0}")]
    MasterRefused(String),
    #[error("not connected to the master")]
    NotConnected,
    /// A request from the master this agent cannot serve.
    #[error("{0}")]
    BadRequest(String),
    /// A sandbox file could not be read (missing, or refused: a symlink leading out
    /// of the sandbox, not a regular file).
    #[error("cannot read {path} of task {task_id}: {cause}")]
    SandboxFile {
        path: String,
        task_id: String,
        cause: agora_executor_link::beneath::BeneathError,
    },
    /// A path a task or framework named inside a sandbox was refused or failed.
    #[error(transparent)]
    Sandbox(#[from] agora_executor_link::beneath::BeneathError),
    /// A task's sandbox could not be prepared (the message says which part;
    /// `fetch` when an artifact could not be fetched).
    #[error("{what}: {cause}")]
    Prepare {
        what: String,
        cause: Box<Error>,
        fetch: bool,
    },
    /// The master could not hand over an artifact (its words, or what was wrong).
    #[error("{0}")]
    Fetch(String),
    /// An executor process could not be started.
    #[error("{0}")]
    Executor(String),
}

impl Error {
    pub(crate) fn prepare(what: impl Into<String>, cause: impl Into<Error>) -> Error {
        Error::Prepare {
            what: what.into(),
            cause: Box::new(cause.into()),
            fetch: false,
        }
    }

    /// An artifact of a task could not be fetched.
    pub(crate) fn fetch_failed(what: impl Into<String>, cause: impl Into<Error>) -> Error {
        Error::Prepare {
            what: what.into(),
            cause: Box::new(cause.into()),
            fetch: true,
        }
    }

    /// What the core hears of a failed preparation.
    pub(crate) fn prepare_failed(&self) -> agora_agent_core::PrepareFailed {
        match self {
            Error::Prepare { fetch: true, .. } | Error::Fetch(_) => {
                agora_agent_core::PrepareFailed::Fetch(self.to_string())
            }
            _ => agora_agent_core::PrepareFailed::Sandbox(self.to_string()),
        }
    }
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Error {
        Error::Net(e.into())
    }
}

macro_rules! storage_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Storage(e.into())
            }
        }
    )*};
}
storage_errors!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

pub type Result<T, E = Error> = std::result::Result<T, E>;
