//! The one error type of `agora-master`: what failed in the master's shell (its data
//! dir, its registry file, a peer's stream), in words an operator can act on. Each
//! message is the whole sentence, cause included, so `{e}` and `{e:#}` agree.

use std::path::PathBuf;

use agora_master_core::Refused;
use agora_net::FrameError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listening, a frame, or an artifact transfer failed.
    #[error(transparent)]
    Net(#[from] agora_net::Error),
    /// The core refused an operator's request (its words).
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    StreamClosed(#[from] quinn::ClosedStream),
    #[error("cannot create the artifact store {}: {cause}", .path.display())]
    ArtifactStore {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot create {}: {cause}", .path.display())]
    DataDir {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "cannot open the master registry {}: {cause} (is another master using this data dir?)",
        .path.display()
    )]
    RegistryOpen {
        path: PathBuf,
        cause: redb::DatabaseError,
    },
    #[error("master registry {} is unreadable: {cause}", .path.display())]
    RegistryUnreadable { path: PathBuf, cause: String },
    #[error(
        "master registry {} has layout version {found}; this master knows {known}. \
         Use the master release that wrote it, or move the file away to start empty",
        .path.display()
    )]
    RegistryVersion {
        path: PathBuf,
        found: u64,
        known: u64,
    },
    #[error("writing the master registry {}: {cause}", .path.display())]
    RegistryWrite { path: PathBuf, cause: String },
    #[error(
        "master registry {}: its Raft log is damaged ({cause}); refusing to serve from it. \
         Move the data dir away and add this master to the group again (`agora masters add`), \
         or, for a single master, start it with an empty data dir",
        .path.display()
    )]
    RaftLog { path: PathBuf, cause: String },
    #[error(
        "master registry {} holds the Raft log of {found}, but this is {expected}: refusing to \
         start. Point --data-dir at this master's own directory",
        .path.display()
    )]
    ForeignLog {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("starting the master's Raft node on {}: {cause}", .path.display())]
    RaftStart { path: PathBuf, cause: String },
    #[error("this master does not lead the group: {cause}")]
    NotLeading { cause: String },
    /// A leader-only request reached a master that does not lead.
    #[error("this master does not lead its group{}; ask the leader", .leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_else(|| " (no leader is elected yet)".into()))]
    NotLeader { leader: Option<String> },
    /// A peer opened a stream this master does not know.
    #[error("stream opened with an unknown kind (newer client?)")]
    UnknownStream,
    /// A peer's certificate has the wrong role for the stream it opened.
    #[error("{0}")]
    WrongRole(String),
    #[error("agent sent a bad frame: {0}")]
    AgentFrame(FrameError),
    #[error("framework sent a bad frame: {0}")]
    FrameworkFrame(FrameError),
    #[error("the task's agent is not connected")]
    AgentNotConnected,
    #[error("the agent did not answer within 10 s")]
    AgentTimeout,
    #[error("the agent closed the stream without answering")]
    AgentClosed,
    /// An `agora fn` request reached a master without the functions framework.
    #[error(
        "this master runs no functions framework (it was started without a client certificate for it)"
    )]
    NoFunctions,
    /// The agent answered a sandbox read with an error (its words).
    #[error("{0}")]
    Agent(String),
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Error {
        Error::Net(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
