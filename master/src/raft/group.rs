//! Starting a master's Raft node and knowing when it may serve.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{RaftNetworkFactory, ServerState, SnapshotPolicy};

use super::store::{self, Owner, RegistrySm};
use super::types::*;
use crate::error::{Error, Result};

/// Heartbeats from the leader, in ms.
pub const HEARTBEAT_MS: u64 = 100;
/// A follower that hears no leader for a draw in this range (ms) stands for election.
pub const ELECTION_MIN_MS: u64 = 300;
pub const ELECTION_MAX_MS: u64 = 600;

/// The group's Raft settings (docs/plans/replicated-masters.md §2 gives the
/// measurements behind them): about one second from a leader's death to the next
/// leader, with pre-vote so that a restarted or cut-off master cannot depose a
/// healthy leader, and a leader that hears no quorum for `ELECTION_MAX_MS` refuses
/// writes.
pub fn config() -> openraft::Config {
    openraft::Config {
        cluster_name: "agora-masters".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_MIN_MS,
        election_timeout_max: ELECTION_MAX_MS,
        enable_pre_vote: Some(true),
        quorum_loss_probe_interval: Some(2 * ELECTION_MAX_MS),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(5000),
        // openraft bounds each step of a snapshot transfer (dial, each chunk, the
        // reply) by this, in ms; its default of 200 is too short for a busy disk.
        install_snapshot_timeout: 3000,
        max_in_snapshot_log_to_keep: 1000,
        // A batch of registry ops is at most about 1 MiB; 32 of them stay well under
        // the 64 MiB a Raft frame may carry.
        max_payload_entries: 32,
        ..Default::default()
    }
}

/// A master's Raft node, with its state machine (the registry).
#[derive(Clone)]
pub struct Node {
    pub id: u64,
    pub raft: Raft,
    pub sm: RegistrySm,
}

/// Opens this master's log and state machine in `data_dir` and starts its Raft
/// node. A node whose log is empty and that is alone in `members` initializes a
/// group of one; larger groups are bootstrapped by the caller.
pub async fn start<N>(
    data_dir: &Path,
    owner: &Owner,
    members: BTreeMap<u64, MasterNode>,
    network: N,
) -> Result<Node>
where
    N: RaftNetworkFactory<Agora>,
    N::Network: openraft::network::NetSnapshot<Agora, SnapshotData = SnapshotData>,
{
    let (log, sm) = store::open(data_dir, owner)?;
    let path = log.path().to_path_buf();
    let config = Arc::new(config().validate().map_err(|e| Error::RaftStart {
        path: path.clone(),
        cause: e.to_string(),
    })?);
    let raft = Raft::new(owner.node, config, network, log, sm.clone())
        .await
        .map_err(|e| Error::RaftStart {
            path: path.clone(),
            cause: e.to_string(),
        })?;
    let initialized = raft.is_initialized().await.map_err(|e| Error::RaftStart {
        path: path.clone(),
        cause: e.to_string(),
    })?;
    if initialized && members.len() > 1 {
        // The log's membership must be the one the operator gave.
        use openraft::async_runtime::WatchReceiver as _;
        let m = raft.metrics().borrow_watched().clone();
        let have: BTreeMap<u64, String> = m
            .membership_config
            .membership()
            .voter_ids()
            .map(|id| {
                let quic = m
                    .membership_config
                    .get_node(&id)
                    .map(|n| n.quic.clone())
                    .unwrap_or_default();
                (id, quic)
            })
            .collect();
        let given: BTreeMap<u64, String> = members
            .iter()
            .map(|(id, n)| (*id, n.quic.clone()))
            .collect();
        if have != given {
            let _ = raft.shutdown().await;
            let show = |m: &BTreeMap<u64, String>| {
                m.iter()
                    .map(|(id, a)| format!("{id}={a}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            return Err(Error::PeersDiffer {
                given: show(&given),
                have: show(&have),
            });
        }
    }
    if !initialized && members.len() == 1 && members.contains_key(&owner.node) {
        raft.initialize(members)
            .await
            .map_err(|e| Error::RaftStart {
                path: path.clone(),
                cause: e.to_string(),
            })?;
    }
    Ok(Node {
        id: owner.node,
        raft,
        sm,
    })
}

impl Node {
    /// Waits until this node leads and has applied an entry of its own term: from
    /// then on, everything earlier leaders committed is in its registry, and its
    /// writes are accepted. Returns the term. Gives up after `limit`.
    pub async fn wait_leading(&self, limit: Duration) -> Result<u64> {
        let mut rx = self.raft.metrics();
        let ready = async {
            loop {
                {
                    let m = rx.borrow_watched();
                    if m.state == ServerState::Leader
                        && m.last_applied
                            .is_some_and(|l| l.leader_id.term == m.current_term)
                    {
                        return Ok(m.current_term);
                    }
                    if let Err(e) = &m.running_state {
                        return Err(e.to_string());
                    }
                }
                if rx.changed().await.is_err() {
                    return Err("the Raft node stopped".to_string());
                }
            }
        };
        match tokio::time::timeout(limit, ready).await {
            Ok(Ok(term)) => Ok(term),
            Ok(Err(cause)) => Err(Error::NotLeading { cause }),
            Err(_) => Err(Error::NotLeading {
                cause: format!("it did not become the leader within {limit:?}"),
            }),
        }
    }

    /// Commits `ops` through the group: returns once a quorum holds them and this
    /// node has applied them to its registry.
    pub async fn write(
        &self,
        ops: Vec<agora_master_core::registry::RegistryOp>,
    ) -> Result<(), WriteError> {
        use openraft::errors::{ClientWriteError, RaftError};
        match self.raft.client_write(RegistryBatch(ops)).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(WriteError::NotLeader)
            }
            Err(e) => Err(WriteError::Fatal(e.to_string())),
        }
    }
}

impl Node {
    /// `agora masters add`: `id` at `quic` joins as a learner, and once it has caught
    /// up (within `catch_up`) becomes a voter. Said in a sentence either way.
    pub async fn add_member(
        &self,
        id: u64,
        quic: String,
        catch_up: std::time::Duration,
    ) -> Result<String, String> {
        use openraft::async_runtime::WatchReceiver as _;
        use openraft::ChangeMembers;
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        if membership.voter_ids().any(|v| v == id) {
            let at = m
                .membership_config
                .get_node(&id)
                .map(|n| n.quic.clone())
                .unwrap_or_default();
            return Err(format!(
                "master {id} is a voting member already (at {at}); to replace it (a new disk or address), remove it first with `agora masters remove {id}`"
            ));
        }
        let node = MasterNode {
            quic: quic.clone(),
            http: String::new(),
        };
        // openraft's own wait for a learner gives up quietly after a moment, so the
        // catch-up is watched here: the learner must hold the log up to the entry
        // that added it.
        let added = self
            .raft
            .add_learner(id, node, false)
            .await
            .map_err(membership_error)?
            .log_id
            .index;
        let mut metrics = self.raft.metrics();
        let caught_up = tokio::time::timeout(catch_up, async {
            loop {
                let matched = metrics
                    .borrow_watched()
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map(|l| l.index);
                if matched.is_some_and(|i| i >= added) {
                    return true;
                }
                if metrics.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false);
        if !caught_up {
            // Leave the group as it was.
            let undone = self
                .raft
                .change_membership(ChangeMembers::RemoveNodes([id].into()), false)
                .await;
            return Err(format!(
                "master {id} at {quic} did not catch up with the log within {catch_up:?}, so it was not added{}: is it running, with --id {id}, an empty data dir and a --peers list that names it? (its log shows why)",
                match undone {
                    Ok(_) => String::new(),
                    Err(e) => format!(" (and removing it as a learner failed: {}; run `agora masters remove {id}`)", membership_error(e)),
                }
            ));
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
            .await
            .map_err(membership_error)?;
        Ok(format!(
            "master {id} at {quic} caught up and votes now; give every master the new --peers list for its next start"
        ))
    }

    /// `agora masters remove`: `id` leaves the group (its votes stop counting).
    pub async fn remove_member(&self, id: u64) -> Result<String, String> {
        use openraft::async_runtime::WatchReceiver as _;
        use openraft::ChangeMembers;
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let is_learner = membership.learner_ids().any(|l| l == id);
        if !voters.contains(&id) && !is_learner {
            return Err(format!(
                "master {id} is not a member of the group (members: {})",
                voters
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if voters == [id] {
            return Err(format!(
                "master {id} is the group's only voter; a group cannot remove its last master"
            ));
        }
        let change = if is_learner {
            ChangeMembers::RemoveNodes([id].into())
        } else {
            ChangeMembers::RemoveVoters([id].into())
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(membership_error)?;
        Ok(format!(
            "master {id} left the group; give every master the new --peers list for its next start"
        ))
    }
}

fn membership_error(
    e: openraft::errors::RaftError<Agora, openraft::errors::ClientWriteError<Agora>>,
) -> String {
    use openraft::errors::{ClientWriteError, RaftError};
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            "this master stopped leading during the change; run it again (it goes to the new leader)"
                .into()
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            format!("the group refused the change: {c}")
        }
        other => format!("the change failed: {other}"),
    }
}

/// Why a write did not commit.
#[derive(Debug)]
pub enum WriteError {
    /// This node does not lead (any more), or lost its quorum: the write may or may
    /// not be committed by the next leader.
    NotLeader,
    /// The node stopped (a storage error, or a membership change it could not make).
    Fatal(String),
}

/// Whether a node may serve as the leader, from its metrics.
pub enum Leading {
    /// It leads term N, has applied an entry of that term (so it holds everything
    /// committed before), and heard from a quorum within `ELECTION_MAX_MS`.
    Yes(u64),
    /// It does not; the reason, for the log.
    No(&'static str),
}

/// Judges `m` (see [`Leading`]).
pub fn leading(m: &openraft::RaftMetrics<Agora>) -> Leading {
    use openraft::Instant as _;
    if m.state != ServerState::Leader {
        return Leading::No("another master leads, or an election is on");
    }
    if !m
        .last_applied
        .is_some_and(|l| l.leader_id.term == m.current_term)
    {
        return Leading::No("it has not yet applied an entry of its term");
    }
    let voters = m.membership_config.membership().voter_ids().count();
    if voters > 1 {
        let fresh = m
            .last_quorum_acked
            .as_ref()
            .is_some_and(|t| t.elapsed() < Duration::from_millis(ELECTION_MAX_MS));
        if !fresh {
            return Leading::No("no quorum of the masters has answered it lately");
        }
    }
    Leading::Yes(m.current_term)
}
