//! The masters' Raft group over real QUIC on 127.0.0.1 (issue 12, slice 3): masters
//! in one process, each with its own registry file, endpoint and certificate, talking
//! through `raft::net` exactly as separate processes would. Waits are on openraft's
//! metrics watch, bounded; nothing sleeps to synchronise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_master::raft::net::{serve_peer_connection, MasterNet};
use agora_master::raft::store::{self, Owner, RegistrySm};
use agora_master::raft::types::{MasterNode, Raft, RegistryBatch, Snapshot, Vote};
use agora_master::registry::RegistryOp;
use agora_net::tls::{self, CertDir, Identity, Role};
use openraft::async_runtime::WatchReceiver;
use openraft::network::v2::RaftNetworkV2;
use openraft::network::RPCOption;
use openraft::raft::VoteRequest;
use openraft::{Config, RaftNetworkFactory, ServerState, SnapshotPolicy};

const WAIT: Duration = Duration::from_secs(10);

/// The configuration the plan chose (heartbeat 100 ms, election 300–600 ms, pre-vote,
/// quorum-loss probe), with a snapshot every `snapshot_every` logs.
fn config(snapshot_every: u64, keep: u64) -> Arc<Config> {
    Arc::new(
        Config {
            cluster_name: "agora-test".into(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            enable_pre_vote: Some(true),
            quorum_loss_probe_interval: Some(1200),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every),
            max_in_snapshot_log_to_keep: keep,
            // Sending plus installing a snapshot is bounded by this for each step;
            // openraft's default (200 ms) is short for a loaded test machine.
            install_snapshot_timeout: 3000,
            ..Default::default()
        }
        .validate()
        .expect("valid Raft config"),
    )
}

struct Node {
    raft: Raft,
    sm: RegistrySm,
    net: MasterNet,
    endpoint: quinn::Endpoint,
    acceptor: tokio::task::JoinHandle<()>,
}

struct Group {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    certs: CertDir,
    cluster: String,
    config: Arc<Config>,
    addrs: BTreeMap<u64, SocketAddr>,
    nodes: BTreeMap<u64, Node>,
}

fn op(i: u64) -> RegistryOp {
    RegistryOp::PutFrameworkState {
        framework_id: "f1".into(),
        key: format!("k{i}"),
        value: i.to_be_bytes().to_vec(),
    }
}

/// Retries `f` until it succeeds or `limit` passes: for a registry file or a UDP port
/// that a stopped master releases once its last task has ended (nothing to watch).
async fn retry<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let until = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > until => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

impl Group {
    fn new(config: Arc<Config>) -> Group {
        let tmp = tempfile::tempdir().expect("temp dir");
        let root = tmp.path().to_path_buf();
        let certs = tls::init_cert_dir(&root.join("certs"), &[]).expect("certificates");
        let cluster = agora_proto::sha256_hex(&std::fs::read(certs.ca()).expect("ca.pem"));
        Group {
            _tmp: tmp,
            root,
            certs,
            cluster,
            config,
            addrs: BTreeMap::new(),
            nodes: BTreeMap::new(),
        }
    }

    fn identity(&self, role: Role) -> Identity {
        Identity::from_cert_dir(&self.certs, role).expect("identity")
    }

    fn member(&self, id: u64) -> MasterNode {
        MasterNode {
            quic: self.addrs[&id].to_string(),
            http: format!("127.0.0.1:{}", 8000 + id),
        }
    }

    fn members(&self, ids: impl IntoIterator<Item = u64>) -> BTreeMap<u64, MasterNode> {
        ids.into_iter().map(|id| (id, self.member(id))).collect()
    }

    /// Starts master `id` from its data dir, on its old address if it had one.
    async fn start(&mut self, id: u64) {
        let identity = self.identity(Role::Master);
        let bind = self
            .addrs
            .get(&id)
            .copied()
            .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
        let endpoint = retry("binding the master's port again", WAIT, || {
            tls::server_endpoint(bind, &identity)
        })
        .await;
        self.addrs.insert(id, endpoint.local_addr().unwrap());
        let dir = self.root.join(format!("master{id}"));
        let owner = Owner {
            cluster: self.cluster.clone(),
            node: id,
        };
        let (log, sm) = retry("reopening the registry", WAIT, || store::open(&dir, &owner)).await;
        let net = MasterNet::new(id, self.cluster.clone(), identity);
        let raft = Raft::new(id, self.config.clone(), net.clone(), log, sm.clone())
            .await
            .expect("raft starts");
        let acceptor = {
            let (raft, cluster, endpoint) = (raft.clone(), self.cluster.clone(), endpoint.clone());
            tokio::spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    let (raft, cluster) = (raft.clone(), cluster.clone());
                    tokio::spawn(async move {
                        if let Ok(conn) = incoming.await {
                            serve_peer_connection(raft, id, cluster, conn).await;
                        }
                    });
                }
            })
        };
        self.nodes.insert(
            id,
            Node {
                raft,
                sm,
                net,
                endpoint,
                acceptor,
            },
        );
    }

    /// As a crash looks to the peers: the master drops off the network, its Raft
    /// stops, and its files are let go.
    async fn kill(&mut self, id: u64) {
        let n = self.nodes.remove(&id).expect("a running master");
        n.endpoint.close(0u32.into(), b"killed");
        n.net.close();
        n.acceptor.abort();
        n.raft.shutdown().await.expect("raft shuts down");
        let _ = tokio::time::timeout(Duration::from_secs(2), n.endpoint.wait_idle()).await;
    }

    async fn stop_all(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }

    fn raft(&self, id: u64) -> &Raft {
        &self.nodes[&id].raft
    }

    /// Waits until `id` leads and has applied an entry of its own term (its blank
    /// entry): it then accepts writes, and holds every earlier commit.
    async fn wait_ready(&self, id: u64) {
        self.raft(id)
            .wait(Some(WAIT))
            .metrics(
                |m| {
                    m.state == ServerState::Leader
                        && m.last_applied
                            .is_some_and(|l| l.leader_id.term == m.current_term)
                },
                format!("master {id} leading and ready"),
            )
            .await
            .expect("ready leader");
    }

    /// Waits, on `watcher`'s metrics, for a leader other than `not`, then for it to
    /// be ready.
    async fn wait_leader(&self, watcher: u64, not: Option<u64>) -> u64 {
        let m = self
            .raft(watcher)
            .wait(Some(WAIT))
            .metrics(
                |m| {
                    m.current_leader
                        .is_some_and(|l| Some(l) != not && self.nodes.contains_key(&l))
                },
                "a leader",
            )
            .await
            .expect("a leader is elected");
        let leader = m.current_leader.unwrap();
        self.wait_ready(leader).await;
        leader
    }

    /// Commits `ops` through `leader`; returns the entry's index.
    async fn write(&self, leader: u64, ops: Vec<RegistryOp>) -> u64 {
        self.raft(leader)
            .client_write(RegistryBatch(ops))
            .await
            .expect("a quorum commits the write")
            .log_id
            .index
    }

    /// Waits until every running master has applied entry `index` (the metrics
    /// watch may lag behind a write's answer, even on the leader), and checks that
    /// their registries are the leader's.
    async fn converged(&self, leader: u64, index: u64) -> agora_master::registry::Registry {
        for (id, n) in &self.nodes {
            n.raft
                .wait(Some(WAIT))
                .applied_index_at_least(Some(index), format!("master {id} catches up"))
                .await
                .expect("catches up");
        }
        let want = self.nodes[&leader].sm.registry();
        for (id, n) in &self.nodes {
            assert_eq!(n.sm.registry(), want, "master {id}'s registry");
        }
        want
    }
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_masters_elect_commit_fail_over_and_a_restarted_one_catches_up() {
    let mut g = Group::new(config(5000, 1000));
    for id in 1..=3 {
        g.start(id).await;
    }
    g.raft(1)
        .initialize(g.members(1..=3))
        .await
        .expect("initialize");
    let leader = g.wait_leader(1, None).await;

    let index = g.write(leader, vec![op(0), op(1)]).await;
    let reg = g.converged(leader, index).await;
    assert_eq!(reg.framework_state["f1"].len(), 2, "{reg:?}");

    // For information: one quorum write at a time over loopback QUIC.
    let mut lat = Vec::new();
    for i in 2..202 {
        let t = Instant::now();
        g.write(leader, vec![op(i)]).await;
        lat.push(t.elapsed());
    }
    let p90 = {
        let mut v = lat.clone();
        v.sort();
        v[v.len() * 9 / 10].as_secs_f64() * 1e3
    };
    eprintln!(
        "quorum write latency over loopback QUIC, {} sequential writes: median {:.2} ms, p90 {:.2} ms",
        lat.len(),
        median_ms(lat),
        p90
    );

    // The leader dies: the two others elect one of themselves and commit again.
    let survivor = (1..=3).find(|&id| id != leader).unwrap();
    let killed_at = Instant::now();
    g.kill(leader).await;
    let new = g.wait_leader(survivor, Some(leader)).await;
    eprintln!(
        "master {leader} killed: master {new} leads and is ready after {:?}",
        killed_at.elapsed()
    );
    assert_ne!(new, leader);
    g.write(new, vec![op(1000)]).await;

    // The old leader comes back from its data dir and catches up.
    g.start(leader).await;
    let index = g.write(new, vec![op(1001)]).await;
    let reg = g.converged(new, index).await;
    assert_eq!(reg.framework_state["f1"].len(), 204);
    assert!(reg.framework_state["f1"].contains_key("k1001"));
    let m = g.raft(leader).metrics().borrow_watched().clone();
    assert_eq!(m.current_leader, Some(new), "the restarted master follows");
    g.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_added_after_the_log_was_purged_gets_a_snapshot() {
    // A snapshot every 20 entries, keeping none of the log behind it.
    let mut g = Group::new(config(20, 0));
    for id in 1..=3 {
        g.start(id).await;
    }
    g.raft(1).initialize(g.members(1..=3)).await.unwrap();
    let leader = g.wait_leader(1, None).await;
    let mut index = 0;
    for i in 0..60 {
        index = g.write(leader, vec![op(i)]).await;
    }
    let m = g
        .raft(leader)
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= 20), "log purged")
        .await
        .expect("the leader purges its log behind a snapshot");
    let purged = m.purged.unwrap().index;

    g.start(4).await;
    g.raft(leader)
        .add_learner(4, g.member(4), true)
        .await
        .expect("learner added");
    let want = g.converged(leader, index).await;
    assert_eq!(want.framework_state["f1"].len(), 60);
    let m4 = g.raft(4).metrics().borrow_watched().clone();
    assert!(
        m4.snapshot.is_some_and(|s| s.index >= purged),
        "master 4 started from a snapshot at or past {purged}: {:?}",
        m4.snapshot
    );

    // It becomes a voter (joint consensus entries over the wire) and keeps up.
    let voters: BTreeSet<u64> = (1..=4).collect();
    g.raft(leader)
        .change_membership(voters.clone(), false)
        .await
        .expect("membership change");
    let index = g.write(leader, vec![op(100)]).await;
    let reg = g.converged(leader, index).await;
    assert!(reg.framework_state["f1"].contains_key("k100"));
    let m4 = g.raft(4).metrics().borrow_watched().clone();
    assert_eq!(
        m4.membership_config
            .membership()
            .voter_ids()
            .collect::<BTreeSet<_>>(),
        voters
    );
    g.stop_all().await;
}

fn vote_request(term: u64, candidate: u64) -> VoteRequest<agora_master::raft::types::Agora> {
    VoteRequest::new(Vote::new(term, candidate), None)
}

fn opt() -> RPCOption {
    RPCOption::new(Duration::from_secs(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_master_certificates_of_this_cluster_may_speak_raft_to_the_right_master() {
    let mut g = Group::new(config(5000, 1000));
    g.start(1).await;
    let node1 = g.member(1);
    let mut master = MasterNet::new(9, g.cluster.clone(), g.identity(Role::Master));
    let mut to_1 = master.new_client(1, &node1).await;

    // A master certificate, this cluster, master 1: served; the vote is granted and
    // master 1 now holds term 5.
    let reply = to_1
        .vote(vote_request(5, 9), opt())
        .await
        .expect("a master is served");
    assert!(reply.vote_granted, "{reply:?}");
    assert_eq!(reply.vote, Vote::new(5, 9));
    // What master 1's Raft holds now, as it answers a served RPC (the metrics watch
    // may lag): any refused request below that had reached it would raise its term.
    let probe = || async {
        let mut c = MasterNet::new(9, g.cluster.clone(), g.identity(Role::Master))
            .new_client(1, &node1)
            .await;
        c.vote(vote_request(5, 9), opt()).await.expect("probe").vote
    };

    // Agent and client certificates are refused before any RPC reaches Raft.
    for role in [Role::Agent, Role::Client] {
        let mut net = MasterNet::new(9, g.cluster.clone(), g.identity(role));
        let err = net
            .new_client(1, &node1)
            .await
            .vote(vote_request(50, 9), opt())
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains(&format!("a certificate with role {role:?} may not open")),
            "{err}"
        );
        net.close();
    }
    assert_eq!(
        probe().await,
        Vote::new(5, 9),
        "no refused vote reached Raft"
    );

    // Meant for another master, or from another cluster: refused, naming both.
    let err = master
        .new_client(7, &node1)
        .await
        .vote(vote_request(60, 9), opt())
        .await
        .expect_err("misdirected")
        .to_string();
    assert!(
        err.contains("for master 7 reached master 1 of cluster"),
        "{err}"
    );
    let mut other = MasterNet::new(9, "another-cluster", g.identity(Role::Master));
    let err = other
        .new_client(1, &node1)
        .await
        .pre_vote(vote_request(60, 9), opt())
        .await
        .expect_err("another cluster")
        .to_string();
    assert!(
        err.contains("of cluster another-cluster for master 1 reached master 1 of cluster"),
        "{err}"
    );

    // A snapshot for another cluster is refused before its bytes are read, and the
    // sender reports the refusal (not just its interrupted writes).
    let snapshot = Snapshot {
        meta: Default::default(),
        snapshot: std::io::Cursor::new(vec![7u8; 8 << 20]),
    };
    let err = other
        .new_client(1, &node1)
        .await
        .full_snapshot(Vote::new(70, 9), snapshot, std::future::pending(), opt())
        .await
        .expect_err("another cluster's snapshot")
        .to_string();
    assert!(
        err.contains("refused the Raft snapshot")
            && err.contains("of cluster another-cluster for master 1 reached master 1"),
        "{err}"
    );
    assert_eq!(
        probe().await,
        Vote::new(5, 9),
        "no misdirected RPC reached Raft"
    );

    master.close();
    other.close();
    g.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_to_a_dead_master_fails_within_its_time_limit_every_time() {
    let g = Group::new(config(5000, 1000));
    // A UDP port that never answers: a master that is down, as QUIC sees it.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let node = MasterNode {
        quic: silent.local_addr().unwrap().to_string(),
        http: String::new(),
    };
    let mut net = MasterNet::new(1, g.cluster.clone(), g.identity(Role::Master));
    let mut client = net.new_client(2, &node).await;
    for _ in 0..2 {
        // The dial alone would wait tls::CONNECT_TIMEOUT (10 s) without the RPC's limit.
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            client.vote(
                vote_request(1, 1),
                RPCOption::new(Duration::from_millis(300)),
            ),
        )
        .await
        .expect("the RPC gives up at its time limit, not the dial's");
        let err = r.expect_err("nobody answers");
        assert!(
            matches!(err, openraft::errors::RPCError::Unreachable(_)),
            "{err}"
        );
        assert!(
            err.to_string().contains("did not answer the Raft vote"),
            "{err}"
        );
    }
    net.close();
}
