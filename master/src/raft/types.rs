//! The Raft type configuration of the master group, and short names for the
//! openraft types the rest of `raft/` uses (openraft's API moves between its 0.10
//! pre-releases; these names are the one place to follow it).

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use agora_master_core::registry::RegistryOp;

/// A master as the group's membership records it: where peers, agents and clients
/// reach it over QUIC, and its HTTP front door (for redirects).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterNode {
    pub quic: String,
    pub http: String,
}

impl std::fmt::Display for MasterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.quic)
    }
}

/// One log entry's payload: the registry ops of one or more inputs of the core, in
/// the order the core made them, applied all or nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistryBatch(pub Vec<RegistryOp>);

impl std::fmt::Display for RegistryBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} registry ops", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// The master group's Raft types.
    pub Agora:
        D = RegistryBatch,
        R = (),
        NodeId = u64,
        Node = MasterNode,
);

pub type SnapshotData = Cursor<Vec<u8>>;
pub type Raft = openraft::Raft<Agora, crate::raft::store::RegistrySm>;
pub type Vote = <Agora as openraft::RaftTypeConfig>::Vote;
pub type LogId = openraft::alias::LogIdOf<Agora>;
pub type Entry = <Agora as openraft::RaftTypeConfig>::Entry;
pub type EntryPayload = openraft::alias::EntryPayloadOf<Agora>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<Agora>;
pub type LogState = openraft::storage::LogState<Agora>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<Agora>;
pub type Snapshot = openraft::alias::SnapshotOf<Agora, SnapshotData>;
pub type IOFlushed = openraft::storage::IOFlushed<Agora>;
