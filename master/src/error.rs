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
    #[error("this master's --id {id} is not among --peers {peers}; give each master its own id from the list")]
    NotAPeer { id: u64, peers: String },
    #[error(
        "this master's --peers ({given}) disagree with the group's membership in its log ({have}); \
         fix --peers, or change the group with `agora masters add|remove`"
    )]
    PeersDiffer { given: String, have: String },
    #[error(
        "this master's data dir holds no Raft log and no vote, yet master {peer} (term {term}) \
         counts master {id} as a voting member: its disk was lost or wiped. A master that forgot \
         its votes could vote twice in one term, so it does not start. Remove it from the group \
         first (`agora masters remove {id}`), start it again, then `agora masters add {id}=ADDRESS`"
    )]
    ForgottenVoter { id: u64, peer: u64, term: u64 },
    #[error("the master has no artifact {0}")]
    ArtifactMissing(String),
    #[error("copying an artifact between masters: {0}")]
    PeerCopy(String),
    #[error(
        "the upload is stored on {have} of {of} masters, and {need} must hold it so that it \
         survives the leader's loss: are masters down? (`agora masters`); upload it again"
    )]
    NotReplicated { have: usize, need: usize, of: usize },
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
    /// A Raft message from (or for) a peer master does not hold what openraft needs.
    #[error(
        "malformed Raft message: {what}; check that every master of the group runs the \
         same Agora release"
    )]
    RaftWire { what: String },
    /// A log entry's registry ops are not the JSON this master reads.
    #[error(
        "malformed Raft message: the registry ops of log entry {index} do not decode \
         ({cause}); check that every master of the group runs the same Agora release"
    )]
    RaftWirePayload {
        index: u64,
        cause: serde_json::Error,
    },
    /// A Raft RPC reached a master of another cluster, or another master than meant.
    #[error(
        "Raft RPC from master {from} of cluster {their_cluster} for master {to} reached \
         master {me} of cluster {our_cluster}: refused. Check the --peers addresses (each \
         id must name the master listening there) and that all masters share one CA"
    )]
    RaftMisdirected {
        from: u64,
        to: u64,
        their_cluster: String,
        me: u64,
        our_cluster: String,
    },
    /// The master could not reach a peer master.
    #[error("cannot reach master {peer} at {addr}: {cause}")]
    RaftDial {
        peer: u64,
        addr: String,
        cause: agora_net::Error,
    },
    /// A peer master's address in the membership does not resolve.
    #[error("master {peer}'s address in the group membership is unusable: {cause}")]
    RaftPeerAddress { peer: u64, cause: agora_net::Error },
    /// The connection to a peer master failed while opening a stream.
    #[error("the connection to master {peer} at {addr} failed: {cause}")]
    RaftConnection {
        peer: u64,
        addr: String,
        cause: quinn::ConnectionError,
    },
    /// Writing or reading a Raft stream to or from a peer master failed.
    #[error("Raft {rpc} with master {peer} at {addr} failed: {cause}")]
    RaftStream {
        peer: u64,
        addr: String,
        rpc: &'static str,
        cause: agora_net::Error,
    },
    /// A peer master closed a Raft stream without answering.
    #[error(
        "master {peer} at {addr} closed the Raft {rpc} stream without answering (is it stopping?)"
    )]
    RaftNoReply {
        peer: u64,
        addr: String,
        rpc: &'static str,
    },
    /// A peer master did not answer a Raft RPC in time.
    #[error("master {peer} at {addr} did not answer the Raft {rpc} within {} ms", .after.as_millis())]
    RaftTimeout {
        peer: u64,
        addr: String,
        rpc: &'static str,
        after: std::time::Duration,
    },
    /// A peer master answered a Raft RPC with an error (its words).
    #[error("master {peer} at {addr} refused the Raft {rpc}: {message}")]
    RaftRefused {
        peer: u64,
        addr: String,
        rpc: &'static str,
        message: String,
    },
    /// This master's Raft could not handle a peer's RPC (it is stopping, or failed).
    #[error("this master's Raft could not handle a {rpc} from master {from}: {cause}")]
    RaftLocal {
        rpc: &'static str,
        from: u64,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A snapshot larger than any this master accepts or sends.
    #[error(
        "a Raft snapshot of {size} bytes exceeds the limit of {limit} bytes: the registry \
         is larger than masters can transfer"
    )]
    RaftSnapshotTooLarge { size: u64, limit: u64 },
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Error {
        Error::Net(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a peer whose certificate has the wrong role for a stream is told.
pub(crate) fn wrong_role(have: Option<agora_net::tls::Role>, need: agora_net::tls::Role) -> String {
    let need = format!("{need:?}").to_lowercase();
    format!(
        "a certificate with role {} may not open this kind of stream (it needs {need}); use the {need} certificate from `agora certs init`",
        have.map(|r| format!("{r:?}")).unwrap_or_else(|| "unknown".into()),
    )
}
