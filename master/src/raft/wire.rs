//! openraft's RPC types to and from the protobuf messages of `agora.proto` ("Masters'
//! Raft group"), so that the proto file stays the one description of what masters
//! say to each other. Encoding cannot fail. Decoding checks everything openraft
//! relies on (required fields, the payload's JSON, every voter having an address)
//! and says what is wrong instead of panicking: the bytes come from another
//! process, perhaps of another release.

use std::collections::{BTreeMap, BTreeSet};

use agora_proto::v1 as pb;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};

use super::types::*;
use crate::error::{Error, Result};

/// The group's membership: voter sets and every member's address.
pub type Membership = openraft::Membership<u64, MasterNode>;
pub type AppendRequest = AppendEntriesRequest<Agora>;
pub type AppendResponse = AppendEntriesResponse<Agora>;
pub type VoteRequestOf = VoteRequest<Agora>;
pub type VoteResponseOf = VoteResponse<Agora>;
pub type SnapshotReplyOf = SnapshotResponse<Agora>;

fn malformed(what: impl Into<String>) -> Error {
    Error::RaftWire { what: what.into() }
}

fn required<T>(v: Option<T>, what: &str) -> Result<T> {
    v.ok_or_else(|| malformed(format!("{what} is missing")))
}

pub fn encode_log_id(l: &LogId) -> pb::RaftLogId {
    pb::RaftLogId {
        term: l.leader_id.term,
        leader: l.leader_id.node_id,
        index: l.index,
    }
}

pub fn decode_log_id(l: &pb::RaftLogId) -> LogId {
    LogId::new(
        LeaderId {
            term: l.term,
            node_id: l.leader,
        },
        l.index,
    )
}

fn encode_opt_log_id(l: &Option<LogId>) -> Option<pb::RaftLogId> {
    l.as_ref().map(encode_log_id)
}

fn decode_opt_log_id(l: &Option<pb::RaftLogId>) -> Option<LogId> {
    l.as_ref().map(decode_log_id)
}

pub fn encode_vote(v: &Vote) -> pb::RaftVote {
    pb::RaftVote {
        term: v.leader_id.term,
        leader: v.leader_id.node_id,
        committed: v.committed,
    }
}

pub fn decode_vote(v: &pb::RaftVote) -> Vote {
    let mut vote = Vote::new(v.term, v.leader);
    vote.committed = v.committed;
    vote
}

fn decode_required_vote(v: &Option<pb::RaftVote>, what: &str) -> Result<Vote> {
    Ok(decode_vote(required(v.as_ref(), what)?))
}

pub fn encode_membership(m: &Membership) -> pb::RaftMembership {
    pb::RaftMembership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::RaftVoterSet {
                ids: set.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, n)| pb::MasterNode {
                id: *id,
                quic: n.quic.clone(),
                http: n.http.clone(),
            })
            .collect(),
    }
}

/// Refuses a node listed twice, a voter set listing an id twice, and a voter
/// without an address.
pub fn decode_membership(m: &pb::RaftMembership) -> Result<Membership> {
    let mut nodes = BTreeMap::new();
    for n in &m.nodes {
        let node = MasterNode {
            quic: n.quic.clone(),
            http: n.http.clone(),
        };
        if nodes.insert(n.id, node).is_some() {
            return Err(malformed(format!(
                "the membership lists master {} twice",
                n.id
            )));
        }
    }
    let mut configs = Vec::with_capacity(m.configs.len());
    for (i, set) in m.configs.iter().enumerate() {
        let mut ids = BTreeSet::new();
        for id in &set.ids {
            if !ids.insert(*id) {
                return Err(malformed(format!(
                    "voter set {i} of the membership lists master {id} twice"
                )));
            }
            if !nodes.contains_key(id) {
                return Err(malformed(format!(
                    "voter set {i} of the membership names master {id}, which has no address \
                     in the membership's nodes"
                )));
            }
        }
        configs.push(ids);
    }
    Membership::new(configs, nodes)
        .map_err(|e| malformed(format!("the membership is unusable: {e}")))
}

#[allow(
    clippy::expect_used,
    reason = "the core's records (derived Serialize, string map keys): serde_json cannot fail on them"
)]
pub fn encode_entry(e: &Entry) -> pb::RaftEntry {
    use pb::raft_entry::Payload;
    let payload = match &e.payload {
        EntryPayload::Blank => Payload::Blank(true),
        EntryPayload::Normal(RegistryBatch(ops)) => Payload::RegistryOps(
            // As the registry file stores the same ops (`registry::entry_of`).
            serde_json::to_vec(ops).expect("registry ops serialize"),
        ),
        EntryPayload::Membership(m) => Payload::Membership(encode_membership(m)),
    };
    pb::RaftEntry {
        log_id: Some(encode_log_id(&e.log_id)),
        payload: Some(payload),
    }
}

pub fn decode_entry(e: &pb::RaftEntry) -> Result<Entry> {
    use pb::raft_entry::Payload;
    let log_id = decode_log_id(required(e.log_id.as_ref(), "a log entry's log_id")?);
    let index = log_id.index;
    let payload = match required(e.payload.as_ref(), &format!("log entry {index}'s payload"))? {
        Payload::Blank(true) => EntryPayload::Blank,
        Payload::Blank(false) => {
            return Err(malformed(format!(
                "log entry {index} has `blank = false`, which names no payload"
            )))
        }
        Payload::RegistryOps(json) => EntryPayload::Normal(RegistryBatch(
            serde_json::from_slice(json)
                .map_err(|cause| Error::RaftWirePayload { index, cause })?,
        )),
        Payload::Membership(m) => EntryPayload::Membership(
            decode_membership(m).map_err(|e| prefix(e, &format!("log entry {index}")))?,
        ),
    };
    Ok(Entry { log_id, payload })
}

/// Puts `what` in front of a malformed-message error's description.
fn prefix(e: Error, what: &str) -> Error {
    match e {
        Error::RaftWire { what: w } => malformed(format!("{what}: {w}")),
        e => e,
    }
}

pub fn encode_append(r: &AppendRequest) -> pb::RaftAppend {
    pb::RaftAppend {
        vote: Some(encode_vote(&r.vote)),
        prev: encode_opt_log_id(&r.prev_log_id),
        entries: r.entries.iter().map(encode_entry).collect(),
        leader_commit: encode_opt_log_id(&r.leader_commit),
    }
}

pub fn decode_append(r: &pb::RaftAppend) -> Result<AppendRequest> {
    Ok(AppendRequest {
        vote: decode_required_vote(&r.vote, "an append's vote")?,
        prev_log_id: decode_opt_log_id(&r.prev),
        entries: r.entries.iter().map(decode_entry).collect::<Result<_>>()?,
        leader_commit: decode_opt_log_id(&r.leader_commit),
    })
}

pub fn encode_vote_request(r: &VoteRequestOf) -> pb::RaftVoteRequest {
    pb::RaftVoteRequest {
        vote: Some(encode_vote(&r.vote)),
        last_log_id: encode_opt_log_id(&r.last_log_id),
        leadership_transfer: r.leadership_transfer,
    }
}

pub fn decode_vote_request(r: &pb::RaftVoteRequest) -> Result<VoteRequestOf> {
    let mut req = VoteRequestOf::new(
        decode_required_vote(&r.vote, "a vote request's vote")?,
        decode_opt_log_id(&r.last_log_id),
    );
    req.leadership_transfer = r.leadership_transfer;
    Ok(req)
}

pub fn encode_append_reply(r: &AppendResponse) -> pb::RaftAppendReply {
    use pb::raft_append_reply::R;
    let r = match r {
        AppendEntriesResponse::Success => R::Success(true),
        AppendEntriesResponse::PartialSuccess(matched) => R::Partial(pb::RaftPartial {
            matched: encode_opt_log_id(matched),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(true),
        AppendEntriesResponse::HigherVote(v) => R::HigherVote(encode_vote(v)),
    };
    pb::RaftAppendReply { r: Some(r) }
}

pub fn decode_append_reply(r: &pb::RaftAppendReply) -> Result<AppendResponse> {
    use pb::raft_append_reply::R;
    Ok(match required(r.r.as_ref(), "an append reply's outcome")? {
        R::Success(true) => AppendEntriesResponse::Success,
        R::Conflict(true) => AppendEntriesResponse::Conflict,
        R::Success(false) | R::Conflict(false) => return Err(malformed(
            "an append reply says `success = false` or `conflict = false`, which names no outcome",
        )),
        R::Partial(p) => AppendEntriesResponse::PartialSuccess(decode_opt_log_id(&p.matched)),
        R::HigherVote(v) => AppendEntriesResponse::HigherVote(decode_vote(v)),
    })
}

pub fn encode_vote_reply(r: &VoteResponseOf) -> pb::RaftVoteReply {
    pb::RaftVoteReply {
        vote: Some(encode_vote(&r.vote)),
        granted: r.vote_granted,
        last_log_id: encode_opt_log_id(&r.last_log_id),
    }
}

pub fn decode_vote_reply(r: &pb::RaftVoteReply) -> Result<VoteResponseOf> {
    Ok(VoteResponseOf {
        vote: decode_required_vote(&r.vote, "a vote reply's vote")?,
        vote_granted: r.granted,
        last_log_id: decode_opt_log_id(&r.last_log_id),
    })
}

/// Who sends a snapshot to whom, in which group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub cluster: String,
    pub from: u64,
    pub to: u64,
}

/// The first frame of a snapshot transfer: `size` bytes follow.
pub fn encode_snapshot_open(
    route: &Route,
    vote: &Vote,
    meta: &SnapshotMeta,
    size: u64,
) -> pb::RaftSnapshotOpen {
    pb::RaftSnapshotOpen {
        cluster: route.cluster.clone(),
        from: route.from,
        to: route.to,
        vote: Some(encode_vote(vote)),
        last_log_id: encode_opt_log_id(&meta.last_log_id),
        membership_log_id: encode_opt_log_id(meta.last_membership.log_id()),
        membership: Some(encode_membership(meta.last_membership.membership())),
        size,
    }
}

/// The sender's vote and the snapshot's meta.
pub fn decode_snapshot_open(o: &pb::RaftSnapshotOpen) -> Result<(Vote, SnapshotMeta)> {
    let vote = decode_required_vote(&o.vote, "a snapshot's vote")?;
    let membership = decode_membership(required(o.membership.as_ref(), "a snapshot's membership")?)
        .map_err(|e| prefix(e, "the snapshot"))?;
    let meta = SnapshotMeta {
        last_log_id: decode_opt_log_id(&o.last_log_id),
        last_membership: StoredMembership::new(decode_opt_log_id(&o.membership_log_id), membership),
    };
    Ok((vote, meta))
}

pub fn encode_snapshot_reply(r: &SnapshotReplyOf) -> pb::RaftSnapshotReply {
    pb::RaftSnapshotReply {
        vote: Some(encode_vote(&r.vote)),
        error: String::new(),
    }
}

/// The receiver's vote. A reply carrying an error is not decoded here: the caller
/// reads `error` first.
pub fn decode_snapshot_reply(r: &pb::RaftSnapshotReply) -> Result<SnapshotReplyOf> {
    Ok(SnapshotReplyOf::new(decode_required_vote(
        &r.vote,
        "a snapshot reply's vote",
    )?))
}

#[cfg(test)]
#[allow(
    clippy::unreachable,
    reason = "a test: a panic is how it fails (clippy.toml cannot allow this one in tests)"
)]
mod tests {
    use super::*;
    use crate::registry::*;
    use prost::Message;

    fn lid(term: u64, node: u64, index: u64) -> LogId {
        openraft::testing::log_id::<Agora>(term, node, index)
    }

    fn node(id: u64) -> MasterNode {
        MasterNode {
            quic: format!("10.0.0.{id}:5050"),
            http: format!("10.0.0.{id}:8080"),
        }
    }

    fn membership(configs: Vec<Vec<u64>>, extra: &[u64]) -> Membership {
        let mut nodes = BTreeMap::new();
        for id in configs.iter().flatten().chain(extra) {
            nodes.insert(*id, node(*id));
        }
        Membership::new(
            configs
                .into_iter()
                .map(|c| c.into_iter().collect())
                .collect(),
            nodes,
        )
        .unwrap()
    }

    /// Through protobuf bytes too, as it travels.
    fn via_bytes<M: Message + Default>(m: M) -> M {
        M::decode(m.encode_to_vec().as_slice()).unwrap()
    }

    fn append_roundtrip(req: AppendRequest) {
        let back = decode_append(&via_bytes(encode_append(&req))).unwrap();
        // AppendEntriesRequest has no PartialEq; its entries and ids do.
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
        assert_eq!(back.leader_commit, req.leader_commit);
        assert_eq!(back.entries, req.entries);
    }

    #[test]
    fn append_requests_with_every_kind_of_entry_round_trip() {
        let mut vote = Vote::new(3, 2);
        vote.committed = true;
        append_roundtrip(AppendRequest {
            vote,
            prev_log_id: Some(lid(2, 1, 9)),
            entries: vec![
                Entry {
                    log_id: lid(3, 2, 10),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: lid(3, 2, 11),
                    payload: EntryPayload::Normal(RegistryBatch(crate::registry::tests::ops())),
                },
                Entry {
                    log_id: lid(3, 2, 12),
                    payload: EntryPayload::Membership(membership(vec![vec![1, 2, 3]], &[4])),
                },
                Entry {
                    log_id: lid(3, 2, 13),
                    // Joint consensus: old and new voter sets.
                    payload: EntryPayload::Membership(membership(
                        vec![vec![1, 2, 3], vec![2, 3, 4]],
                        &[],
                    )),
                },
                Entry {
                    log_id: lid(3, 2, 14),
                    payload: EntryPayload::Normal(RegistryBatch(vec![])),
                },
            ],
            leader_commit: Some(lid(3, 2, 12)),
        });
        // A heartbeat: nothing optional set, an uncommitted vote.
        append_roundtrip(AppendRequest {
            vote: Vote::new(1, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        });
    }

    #[test]
    fn vote_and_pre_vote_requests_round_trip() {
        for (last, transfer) in [(Some(lid(4, 3, 77)), false), (None, true)] {
            let mut req = VoteRequestOf::new(Vote::new(5, 3), last);
            req.leadership_transfer = transfer;
            let back = decode_vote_request(&via_bytes(encode_vote_request(&req))).unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn every_append_reply_round_trips() {
        let mut higher = Vote::new(9, 1);
        higher.committed = true;
        for r in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(lid(2, 2, 5))),
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(higher),
            AppendEntriesResponse::HigherVote(Vote::new(9, 2)),
        ] {
            let back = decode_append_reply(&via_bytes(encode_append_reply(&r))).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn vote_replies_round_trip() {
        for r in [
            VoteResponseOf::new(Vote::new(3, 1), Some(lid(2, 1, 40)), true),
            VoteResponseOf::new(Vote::new(4, 2), None, false),
        ] {
            let back = decode_vote_reply(&via_bytes(encode_vote_reply(&r))).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn snapshot_meta_and_reply_round_trip() {
        let route = Route {
            cluster: "c0ffee".into(),
            from: 1,
            to: 4,
        };
        let mut vote = Vote::new(7, 1);
        vote.committed = true;
        for meta in [
            SnapshotMeta {
                last_log_id: Some(lid(7, 1, 5000)),
                last_membership: StoredMembership::new(
                    Some(lid(6, 2, 4000)),
                    membership(vec![vec![1, 2, 3]], &[4]),
                ),
            },
            // An empty group's snapshot: nothing applied, no membership.
            SnapshotMeta::default(),
        ] {
            let open = via_bytes(encode_snapshot_open(&route, &vote, &meta, 1234));
            assert_eq!(
                (open.cluster.as_str(), open.from, open.to),
                ("c0ffee", 1, 4)
            );
            assert_eq!(open.size, 1234);
            let (v, m) = decode_snapshot_open(&open).unwrap();
            assert_eq!(v, vote);
            assert_eq!(m, meta);
        }
        let reply = SnapshotReplyOf::new(vote);
        assert_eq!(
            decode_snapshot_reply(&via_bytes(encode_snapshot_reply(&reply))).unwrap(),
            reply
        );
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn malformed_messages_are_refused_saying_what_is_wrong() {
        let good = encode_append(&AppendRequest {
            vote: Vote::new(1, 1),
            prev_log_id: None,
            entries: vec![Entry {
                log_id: lid(1, 1, 1),
                payload: EntryPayload::Membership(membership(vec![vec![1, 2]], &[])),
            }],
            leader_commit: None,
        });
        let mut m = good.clone();
        m.vote = None;
        assert!(err(decode_append(&m)).contains("an append's vote is missing"));

        let mut m = good.clone();
        m.entries[0].log_id = None;
        assert!(err(decode_append(&m)).contains("a log entry's log_id is missing"));

        let mut m = good.clone();
        m.entries[0].payload = None;
        assert!(err(decode_append(&m)).contains("log entry 1's payload is missing"));

        let mut m = good.clone();
        m.entries[0].payload = Some(pb::raft_entry::Payload::RegistryOps(b"{nope".to_vec()));
        let e = err(decode_append(&m));
        assert!(
            e.contains("registry ops of log entry 1 do not decode"),
            "{e}"
        );

        let mut m = good.clone();
        let Some(pb::raft_entry::Payload::Membership(mem)) = &mut m.entries[0].payload else {
            unreachable!()
        };
        mem.nodes.retain(|n| n.id != 2);
        let e = err(decode_append(&m));
        assert!(
            e.contains(
                "log entry 1: voter set 0 of the membership names master 2, which has no address"
            ),
            "{e}"
        );

        let mut m = good.clone();
        let Some(pb::raft_entry::Payload::Membership(mem)) = &mut m.entries[0].payload else {
            unreachable!()
        };
        let dup = mem.nodes[0].clone();
        mem.nodes.push(dup);
        assert!(err(decode_append(&m)).contains("lists master 1 twice"));

        assert!(err(decode_append_reply(&pb::RaftAppendReply { r: None }))
            .contains("an append reply's outcome is missing"));
        assert!(err(decode_append_reply(&pb::RaftAppendReply {
            r: Some(pb::raft_append_reply::R::Success(false))
        }))
        .contains("names no outcome"));
        assert!(err(decode_vote_request(&pb::RaftVoteRequest::default()))
            .contains("a vote request's vote is missing"));
        assert!(err(decode_vote_reply(&pb::RaftVoteReply::default()))
            .contains("a vote reply's vote is missing"));
        let open = pb::RaftSnapshotOpen {
            vote: Some(encode_vote(&Vote::new(1, 1))),
            ..Default::default()
        };
        assert!(err(decode_snapshot_open(&open)).contains("a snapshot's membership is missing"));
        assert!(
            err(decode_snapshot_reply(&pb::RaftSnapshotReply::default()))
                .contains("a snapshot reply's vote is missing")
        );
    }

    /// A small deterministic generator (no property-testing crate in the workspace):
    /// many random entries and memberships, each through protobuf bytes and back.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn log_id(&mut self) -> LogId {
            lid(self.next(), self.next(), self.next())
        }

        fn opt_log_id(&mut self) -> Option<LogId> {
            (self.below(3) > 0).then(|| self.log_id())
        }

        fn vote(&mut self) -> Vote {
            let mut v = Vote::new(self.next(), self.below(8));
            v.committed = self.below(2) == 0;
            v
        }

        fn membership(&mut self) -> Membership {
            let sets = self.below(3) as usize; // 0 (the empty sentinel), 1, or joint
            let configs: Vec<Vec<u64>> = (0..sets)
                .map(|_| (0..1 + self.below(5)).map(|_| self.below(9)).collect())
                .collect();
            let extra: Vec<u64> = (0..self.below(3)).map(|_| 100 + self.below(5)).collect();
            membership(configs, &extra)
        }

        fn entry(&mut self) -> Entry {
            let payload = match self.below(3) {
                0 => EntryPayload::Blank,
                1 => EntryPayload::Normal(RegistryBatch(
                    (0..self.below(4))
                        .map(|i| RegistryOp::PutFrameworkState {
                            framework_id: format!("f{}", self.next()),
                            key: format!("k{i}"),
                            value: (0..self.below(40)).map(|_| self.next() as u8).collect(),
                        })
                        .collect(),
                )),
                _ => EntryPayload::Membership(self.membership()),
            };
            Entry {
                log_id: self.log_id(),
                payload,
            }
        }
    }

    #[test]
    fn random_requests_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..500 {
            append_roundtrip(AppendRequest {
                vote: rng.vote(),
                prev_log_id: rng.opt_log_id(),
                entries: (0..rng.below(6)).map(|_| rng.entry()).collect(),
                leader_commit: rng.opt_log_id(),
            });
            let meta = SnapshotMeta {
                last_log_id: rng.opt_log_id(),
                last_membership: StoredMembership::new(rng.opt_log_id(), rng.membership()),
            };
            let route = Route {
                cluster: "c".into(),
                from: rng.next(),
                to: rng.next(),
            };
            let vote = rng.vote();
            let (v, m) =
                decode_snapshot_open(&via_bytes(encode_snapshot_open(&route, &vote, &meta, 0)))
                    .unwrap();
            assert_eq!((v, m), (vote, meta));
        }
    }
}
