//! The master's I/O shell: accepts QUIC connections, reads frames, feeds the core,
//! and carries out its outputs. All decisions live in `core`.
//!
//! Every peer's outgoing messages go through a bounded channel; a peer too slow to
//! drain it is disconnected rather than allowed to grow our memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agora_net::tls::{self, Identity, Role};
use agora_net::{read_frame, transfer, write_frame, Monotonic};
use agora_proto::v1::{
    self, operator_request, stream_open, ArtifactHeader, Event, MasterToAgent, OperatorRequest,
    OperatorResponse, SandboxData, SandboxRead, StreamOpen,
};
use agora_proto::Resources;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::artifacts::ArtifactStore;
use crate::error::{wrong_role, Error, Result};
use crate::raft::group::{self, Node};
use crate::raft::store::Owner;
use crate::raft::types::MasterNode;
use crate::registry::{Registry, RegistryOp};
use agora_master_core::acl::Action;
use agora_master_core::{ConnId, CoreConfig, Input, MasterCore, OperatorOp, Output, Refused};

/// Messages queued to one peer before it counts as stuck and is disconnected.
const PEER_QUEUE: usize = 4096;
/// Largest read an operator may ask of a sandbox file in one request.
const MAX_READ: u32 = 1024 * 1024;
/// A proposal to the group carries the ops of held outputs up to about this many
/// bytes (at least one input's ops, whatever their size).
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// In a replicated group: how often agents ping the leader and frameworks hear its
/// HEARTBEAT, and after how much silence they dial the group again.
const GROUP_HEARTBEAT_MS: u64 = 250;
const GROUP_SILENCE_MS: u64 = 1_000;
/// How long a starting master waits to lead its group.
const LEAD_WAIT: Duration = Duration::from_secs(30);

pub struct MasterConfig {
    pub bind: SocketAddr,
    /// This master's place in its Raft group.
    pub group: Group,
    pub data_dir: PathBuf,
    pub identity: Identity,
    pub core: CoreConfig,
    /// Where `agora fn` requests go: the functions framework run beside this master
    /// (the cli starts `agora-fn-gateway` and plugs it in here); None: they are
    /// refused.
    pub functions: Option<Arc<dyn FunctionsDoor>>,
    /// Connections the QUIC endpoint holds at once, in all and per peer address.
    pub connections: agora_net::gate::Caps,
}

/// The connection caps `agora master` uses unless told otherwise.
pub const DEFAULT_CONNECTION_CAPS: agora_net::gate::Caps = agora_net::gate::Caps {
    total: 16_384,
    per_ip: 1024,
};

/// How long a new stream may take to send its first frame (what it is for).
const FIRST_FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// What a peer of each role may do on one connection: streams open at once, and
/// the size of a stream's first frame. Set once the peer's certificate is known,
/// before anything is read from it. A peer with no role may only ask who leads.
fn stream_limits(role: Option<Role>) -> (u32, usize) {
    match role {
        // Raft appends and snapshots, artifact copies.
        Some(Role::Master) => (1024, agora_net::MAX_FRAME),
        // An agent's hello lists every task it runs.
        Some(Role::Agent) => (256, agora_net::MAX_FRAME),
        // A subscription, an operator request, an upload's header.
        Some(Role::Client) => (256, 1024 * 1024),
        None => (4, 4096),
    }
}

/// A master's Raft group: its id, and every member's id and QUIC address (its own
/// included). No peers: a group of one, which leads at once.
#[derive(Clone, Debug, Default)]
pub struct Group {
    pub id: u64,
    pub peers: BTreeMap<u64, String>,
}

/// The master's side of the functions framework's operator API: the `agora fn`
/// requests (`OperatorRequest::Fn*`) are handed to it as they come, and its answer
/// goes back as it is. Defined here so that the master does not depend on the
/// framework (which reaches the master only as a framework, through the scheduler
/// API); whoever starts both connects them. The master checks what only it can
/// before handing a request over: a deploy's module must be in its artifact store.
pub trait FunctionsDoor: std::marker::Send + Sync {
    fn handle(
        &self,
        request: operator_request::Request,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = OperatorResponse> + std::marker::Send + '_>,
    >;
}

enum Out<M> {
    Msg(M),
    Close(String),
}

struct Shared {
    /// The core while this master leads its group (rebuilt from the registry each
    /// time it becomes the leader); None while it follows.
    core: Option<MasterCore>,
    /// Who leads, as far as this master knows: its answer to `LeaderQuery`.
    leader: v1::LeaderInfo,
    agents: HashMap<ConnId, (mpsc::Sender<Out<MasterToAgent>>, quinn::Connection)>,
    schedulers: HashMap<ConnId, (mpsc::Sender<Out<Event>>, quinn::Connection)>,
    /// Times every timeout of the core (see `agora_master_core::Now`).
    clock: Monotonic,
    /// Numbers operator requests, to find each one's answer among the outputs.
    next_request: u64,
    /// Outputs waiting for their registry ops (or those of an earlier input) to be
    /// committed, in the order the core made them.
    outbox: Outbox,
    /// Wakes the committer when the outbox has ops to propose.
    kick: Arc<Notify>,
    /// This master's HTTP address (its functions front door), once it listens.
    http: String,
    /// The leader's HTTP address as it told us: (leader id, term, address).
    learned_http: Option<(u64, u64, String)>,
    /// When this master last asked the leader for it (one ask at a time).
    learning_since: Option<std::time::Instant>,
    /// The leader's HTTP address while another master leads (see `LeaderView`).
    elsewhere: tokio::sync::watch::Sender<Option<String>>,
}

/// The outputs of one input of the core, held until what the registry must remember
/// of it (and of every input before it) is committed by the group.
struct Held {
    seq: u64,
    /// Its registry ops until they are proposed (then they are in the proposal).
    ops: Vec<RegistryOp>,
    /// It had ops, so it waits for their commit (not only for those before it).
    commits: bool,
    outs: Vec<Output>,
    proposed: bool,
    done: Option<oneshot::Sender<()>>,
}

/// The held outputs, oldest first, each numbered.
#[derive(Default)]
struct Outbox {
    held: VecDeque<Held>,
    next_seq: u64,
    /// Which leadership this outbox belongs to (a fresh one each time).
    epoch: u64,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Holds `outs` behind everything held before; the receiver fires once they
    /// have been released.
    fn hold(&mut self, ops: Vec<RegistryOp>, outs: Vec<Output>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.next_seq += 1;
        self.held.push_back(Held {
            seq: self.next_seq,
            commits: !ops.is_empty(),
            ops,
            outs,
            proposed: false,
            done: Some(tx),
        });
        rx
    }

    /// Marks the entries not yet proposed as proposed and returns their ops (up to
    /// about `MAX_BATCH_BYTES`, and at least one entry's) with the last one's number.
    fn take_batch(&mut self) -> Option<(Vec<RegistryOp>, u64)> {
        let mut ops = Vec::new();
        let mut bytes = 0;
        let mut last = None;
        for h in self.held.iter_mut().filter(|h| !h.proposed) {
            let size: usize = h.ops.iter().map(op_size).sum();
            if last.is_some() && bytes + size > MAX_BATCH_BYTES {
                break;
            }
            bytes += size;
            h.proposed = true;
            ops.append(&mut h.ops);
            last = Some(h.seq);
        }
        last.map(|seq| (ops, seq))
    }

    /// Takes out, in order, the entries whose ops are committed (numbers up to
    /// `committed`) and the entries without ops that waited only for them.
    fn release(&mut self, committed: u64) -> Vec<Held> {
        let mut out = Vec::new();
        while let Some(h) = self.held.front() {
            if h.seq > committed && h.commits {
                break;
            }
            out.extend(self.held.pop_front());
        }
        out
    }
}

impl Shared {
    /// Runs the core on one input and carries out what it asks (nothing while this
    /// master follows: only the leader's core decides).
    fn feed(&mut self, input: Input) {
        let now = self.clock.read();
        let Some(core) = self.core.as_mut() else {
            return;
        };
        let outs = core.handle(input, now);
        self.dispatch(outs);
    }

    /// The core, or the error a client of a follower gets.
    fn core(&self) -> Result<&MasterCore> {
        self.core.as_ref().ok_or_else(|| self.not_leader())
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            leader: (!self.leader.leader_quic.is_empty()).then(|| self.leader.leader_quic.clone()),
        }
    }

    /// Stops serving as the leader: drops the core and whatever it had not sent, and
    /// closes every agent's and framework's connection with NOT_LEADER and the
    /// leader's address (they dial the group again and find the new leader).
    fn step_down(&mut self, why: &str) {
        if self.core.take().is_none() {
            return;
        }
        tracing::warn!(
            term = self.leader.term,
            "this master stops leading ({why}); closing agent and framework connections"
        );
        self.outbox = Outbox::default();
        let hint = self.leader.leader_quic.clone();
        let code = agora_net::leader::NOT_LEADER_CODE.into();
        for (_, (_, q)) in self.agents.drain() {
            q.close(code, hint.as_bytes());
        }
        for (_, (_, q)) in self.schedulers.drain() {
            q.close(code, hint.as_bytes());
        }
    }

    /// Sends `outs` at once when they change nothing the registry keeps and nothing
    /// is held before them; otherwise holds them until the group has committed their
    /// ops ("durable before visible": a SUBSCRIBED, an offer of re-registered
    /// resources or a stored state is never seen before a quorum keeps what it
    /// implies). The receiver fires when they have been sent.
    fn dispatch(&mut self, outs: Vec<Output>) -> Option<oneshot::Receiver<()>> {
        let Some(core) = self.core.as_mut() else {
            return None;
        };
        let ops = core.take_registry_ops();
        if ops.is_empty() && self.outbox.is_empty() {
            self.send(outs);
            return None;
        }
        let has_ops = !ops.is_empty();
        let sent = self.outbox.hold(ops, outs);
        if has_ops {
            self.kick.notify_one();
        }
        Some(sent)
    }

    /// Sends what the commit of every op up to `committed` releases.
    fn release(&mut self, committed: u64) {
        for mut h in self.outbox.release(committed) {
            self.send(std::mem::take(&mut h.outs));
            if let Some(done) = h.done.take() {
                let _ = done.send(());
            }
        }
    }

    fn send(&mut self, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::ToAgent(c, m) => {
                    if let Some((tx, _)) = self.agents.get(&c) {
                        if tx.try_send(Out::Msg(m)).is_err() {
                            tracing::warn!(
                                conn = c,
                                "agent is not draining its messages; disconnecting it"
                            );
                            if let Some((_, q)) = self.agents.remove(&c) {
                                q.close(1u32.into(), b"too slow");
                            }
                        }
                    }
                }
                Output::ToScheduler(c, e) => {
                    if let Some((tx, _)) = self.schedulers.get(&c) {
                        if tx.try_send(Out::Msg(e)).is_err() {
                            tracing::warn!(
                                conn = c,
                                "framework is not draining its events; disconnecting it"
                            );
                            self.schedulers.remove(&c);
                        }
                    }
                }
                Output::CloseAgent(c, why) => {
                    if let Some((tx, _)) = self.agents.remove(&c) {
                        let _ = tx.try_send(Out::Close(why));
                    }
                }
                Output::CloseScheduler(c, why) => {
                    if let Some((tx, _)) = self.schedulers.remove(&c) {
                        let _ = tx.try_send(Out::Close(why));
                    }
                }
                // Picked out by `operate`, which asked.
                Output::OperatorDone { .. } => {}
            }
        }
    }
}

/// Roughly what an op adds to a proposal, to keep batches near `MAX_BATCH_BYTES`.
fn op_size(op: &RegistryOp) -> usize {
    match op {
        // Bytes travel as JSON numbers: up to four characters a byte.
        RegistryOp::PutFrameworkState { key, value, .. } => 128 + key.len() + 4 * value.len(),
        _ => 256,
    }
}

/// Proposes what the outbox holds, one proposal at a time (so batches grow under
/// load), and releases held outputs as their ops are committed.
async fn committer(shared: Arc<Mutex<Shared>>, node: Node, kick: Arc<Notify>) {
    loop {
        kick.notified().await;
        loop {
            let batch = {
                let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                let epoch = s.outbox.epoch;
                s.outbox.take_batch().map(|b| (b, epoch))
            };
            let Some(((ops, last), epoch)) = batch else {
                break;
            };
            match node.write(ops).await {
                Ok(()) => {
                    let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    // Unless this master stepped down (and maybe up again) meanwhile.
                    if s.outbox.epoch == epoch {
                        s.release(last);
                    }
                }
                Err(group::WriteError::NotLeader) => shared
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .step_down("the group refused its write: another master leads"),
                Err(group::WriteError::Fatal(e)) => {
                    // A master that cannot keep its registry would forget frameworks and
                    // agents; stop rather than carry on (as Mesos does).
                    tracing::error!(
                        "the group did not commit a registry change: {e}; the master stops: fix the data dir (disk full? permissions?) and start it again"
                    );
                    std::process::exit(70);
                }
            }
        }
    }
}

/// A running master.
pub struct MasterHandle {
    pub addr: SocketAddr,
    endpoint: quinn::Endpoint,
    node: Node,
    shared: Arc<Mutex<Shared>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MasterHandle {
    /// Where this master's HTTP front door listens (host:port), for `LeaderQuery`
    /// answers: clients sent to a follower's door are sent on to the leader's.
    pub fn set_http(&self, http: String) {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .http = http;
    }

    /// Who leads, as this master knows it (its answer to `LeaderQuery`), for as long
    /// as the caller wants to look.
    pub fn leader_view(&self) -> LeaderView {
        LeaderView(
            self.shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elsewhere
                .subscribe(),
        )
    }

    /// Stops accepting, closes every connection and waits briefly for them to go,
    /// then stops the Raft node (its file is free once this returns).
    pub async fn shutdown(self) {
        self.endpoint.close(0u32.into(), b"master shutting down");
        for t in &self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        if let Err(e) = self.node.raft.shutdown().await {
            tracing::warn!("stopping the master's Raft node: {e}");
        }
    }
}

/// See [`MasterHandle::leader_view`]. Reading it takes no lock of the master's
/// state (it is read on every HTTP request to a functions door).
#[derive(Clone)]
pub struct LeaderView(tokio::sync::watch::Receiver<Option<String>>);

impl LeaderView {
    /// The leader's HTTP address while another master leads and it is known.
    pub fn leader_elsewhere(&self) -> Option<String> {
        self.0.borrow().clone()
    }
}

pub async fn start(cfg: MasterConfig) -> Result<MasterHandle> {
    let store = ArtifactStore::open(&cfg.data_dir.join("artifacts"))?;
    let endpoint = tls::server_endpoint(cfg.bind, &cfg.identity)?;
    let addr = endpoint.local_addr()?;
    let clock = Monotonic::new();
    let owner = Owner {
        cluster: cfg.identity.cluster().to_string(),
        node: cfg.group.id.max(1),
    };
    let members: BTreeMap<u64, MasterNode> = if cfg.group.peers.is_empty() {
        BTreeMap::from([(
            owner.node,
            MasterNode {
                quic: addr.to_string(),
                http: String::new(),
            },
        )])
    } else {
        if !cfg.group.peers.contains_key(&owner.node) {
            return Err(Error::NotAPeer {
                id: owner.node,
                peers: format_peers(&cfg.group.peers),
            });
        }
        cfg.group
            .peers
            .iter()
            .map(|(id, quic)| {
                (
                    *id,
                    MasterNode {
                        quic: quic.clone(),
                        http: String::new(),
                    },
                )
            })
            .collect()
    };
    let net =
        crate::raft::net::MasterNet::new(owner.node, owner.cluster.clone(), cfg.identity.clone());
    let node = group::start(&cfg.data_dir, &owner, members.clone(), net).await?;
    if members.len() > 1 {
        if let Err(e) = refuse_forgotten_voter(&node, &members, &cfg.identity).await {
            let _ = node.raft.shutdown().await;
            return Err(e);
        }
    }
    let mut tasks_before = Vec::new();
    let mut core_cfg = cfg.core.clone();
    if members.len() > 1 {
        // Agents and frameworks notice a dead leader within a second (then dial
        // the group again), rather than the 5 to 15 s a single master allows.
        core_cfg.heartbeat_interval_ms = core_cfg.heartbeat_interval_ms.min(GROUP_HEARTBEAT_MS);
        core_cfg.framework_heartbeat_ms = core_cfg.framework_heartbeat_ms.min(GROUP_HEARTBEAT_MS);
        core_cfg.master_silence_ms = GROUP_SILENCE_MS;
    }
    let kick = Arc::new(Notify::new());
    let shared = Arc::new(Mutex::new(Shared {
        core: None,
        leader: v1::LeaderInfo {
            id: node.id,
            ..Default::default()
        },
        agents: HashMap::new(),
        schedulers: HashMap::new(),
        clock,
        next_request: 0,
        outbox: Outbox::default(),
        kick: kick.clone(),
        http: String::new(),
        learned_http: None,
        learning_since: None,
        elsewhere: tokio::sync::watch::Sender::new(None),
    }));
    let lead = Leadership {
        shared: shared.clone(),
        node: node.clone(),
        core: core_cfg,
        store: store.clone(),
        identity: cfg.identity.clone(),
        probe: Arc::new(Mutex::new(None)),
    };
    if members.len() == 1 {
        // A group of one leads at once: serve only once it does.
        let term = node.wait_leading(LEAD_WAIT).await?;
        lead.observe()?;
        tracing::info!(%addr, term, "master listening (QUIC), leading its group of one");
    } else {
        tracing::info!(%addr, id = owner.node, "master listening (QUIC); waiting for the group to elect a leader");
        tasks_before.push(tokio::spawn(bootstrap(
            node.clone(),
            members.clone(),
            cfg.identity.clone(),
        )));
    }
    let next_conn = Arc::new(AtomicU64::new(1));
    let mut tasks = tasks_before;
    let functions = cfg.functions.clone();

    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(250));
            loop {
                iv.tick().await;
                shared
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .feed(Input::Tick);
            }
        })
    };
    let acceptor = {
        let endpoint = endpoint.clone();
        let shared = shared.clone();
        let node = node.clone();
        let cluster: Arc<str> = owner.cluster.clone().into();
        let replicas = crate::replicate::Replicas {
            node: node.clone(),
            identity: cfg.identity.clone(),
        };
        let gate = agora_net::gate::Gate::new("master QUIC", cfg.connections);
        let handshaking = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                // Under a flood of handshakes, a peer first proves it receives at its
                // source address (a stateless Retry): begun handshakes from forged
                // addresses would otherwise hold about 120 KiB each until they time
                // out, past any per-address cap.
                if handshaking.load(std::sync::atomic::Ordering::Relaxed) >= HANDSHAKES_BEFORE_RETRY
                    && !incoming.remote_address_validated()
                    && incoming.may_retry()
                {
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().ignore();
                    }
                    continue;
                }
                // Caps before the handshake: a refused peer costs no TLS work.
                let pass = match gate.admit(incoming.remote_address().ip()) {
                    Ok(p) => p,
                    Err(_) => {
                        incoming.refuse();
                        continue;
                    }
                };
                let ctx = Ctx {
                    functions: functions.clone(),
                    shared: shared.clone(),
                    node: node.clone(),
                    cluster: cluster.clone(),
                    replicas: replicas.clone(),
                    store: store.clone(),
                    next_conn: next_conn.clone(),
                };
                let count = HandshakeCount::new(&handshaking);
                tokio::spawn(async move {
                    let _pass = pass;
                    let done = incoming.await;
                    drop(count);
                    match done {
                        Ok(conn) => ctx.serve_connection(conn).await,
                        Err(e) => tracing::info!("incoming connection failed: {e}"),
                    }
                });
            }
        })
    };
    tasks.push(tokio::spawn(committer(shared.clone(), node.clone(), kick)));
    tasks.push(tokio::spawn(lead.watch()));
    tasks.push(ticker);
    tasks.push(acceptor);
    Ok(MasterHandle {
        addr,
        endpoint,
        node,
        shared,
        tasks,
    })
}

/// Handshakes in progress past which a peer whose address is not yet validated is
/// sent a stateless Retry first (one more round trip for it, no state kept for it).
pub const HANDSHAKES_BEFORE_RETRY: usize = 64;

/// One handshake in progress, counted until dropped.
struct HandshakeCount(Arc<std::sync::atomic::AtomicUsize>);

impl HandshakeCount {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> HandshakeCount {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HandshakeCount(count.clone())
    }
}

impl Drop for HandshakeCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How long `agora masters add` waits for the new master to catch up with the log.
const MEMBER_CATCH_UP: Duration = Duration::from_secs(20);

/// "1=a:7400,2=b:7400", as `--peers` takes them.
pub fn format_peers(peers: &BTreeMap<u64, String>) -> String {
    peers
        .iter()
        .map(|(id, a)| format!("{id}={a}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Asks every other member who leads, each within 2 s (an unreachable one answers
/// with its error).
async fn ask_peers(
    node_id: u64,
    members: &BTreeMap<u64, MasterNode>,
    endpoints: &mut HashMap<bool, quinn::Endpoint>,
    identity: &Identity,
) -> Vec<(u64, String, Result<v1::LeaderInfo>)> {
    let mut asks = Vec::new();
    for (id, m) in members.iter().filter(|(id, _)| **id != node_id) {
        let endpoint = tls::resolve(&m.quic).and_then(|addr| {
            Ok(match endpoints.get(&addr.is_ipv6()) {
                Some(e) => (addr, e.clone()),
                None => {
                    let e = tls::client_endpoint(addr, identity)?;
                    endpoints.insert(addr.is_ipv6(), e.clone());
                    (addr, e)
                }
            })
        });
        asks.push(async move {
            let answer = async {
                let (addr, endpoint) = endpoint?;
                Ok(agora_net::leader::ask(&endpoint, addr, Duration::from_secs(2)).await?)
            }
            .await;
            (*id, m.quic.clone(), answer)
        });
    }
    // All at once: a member that is not up yet costs the timeout once, not per member.
    futures_util::future::join_all(asks).await
}

/// A master whose data dir holds neither log nor vote, while a reachable member
/// counts it as a voter, lost its disk: it may have voted in the current term and
/// forgotten it, so it must not vote again. It is refused until an operator
/// removes it from the group (then adds it back as a new member).
async fn refuse_forgotten_voter(
    node: &Node,
    members: &BTreeMap<u64, MasterNode>,
    identity: &Identity,
) -> Result<()> {
    use openraft::async_runtime::WatchReceiver as _;
    let m = node.raft.metrics().borrow_watched().clone();
    if m.current_term != 0 || m.last_log_index.is_some() {
        return Ok(());
    }
    let answers = ask_peers(node.id, members, &mut HashMap::new(), identity).await;
    for (peer, _, answer) in answers {
        if let Ok(info) = answer {
            if info.term > 0 && info.voters.contains(&node.id) {
                return Err(Error::ForgottenVoter {
                    id: node.id,
                    peer,
                    term: info.term,
                });
            }
        }
    }
    Ok(())
}

/// Starts a new group: the member with the lowest id initializes it, once every
/// other member has answered that it holds no group yet (so that a member whose
/// disk was wiped never starts a second group beside the first). Others wait to be
/// contacted by the leader.
async fn bootstrap(node: Node, members: BTreeMap<u64, MasterNode>, identity: Identity) {
    match node.raft.is_initialized().await {
        Ok(false) => {}
        _ => return,
    }
    if members.keys().next() != Some(&node.id) {
        tracing::info!(
            id = node.id,
            "this master's log is empty: waiting for the group's leader to contact it"
        );
        return;
    }
    let mut last_said = std::time::Instant::now() - Duration::from_secs(10);
    // One client endpoint per address family for every probe.
    let mut endpoints: HashMap<bool, quinn::Endpoint> = HashMap::new();
    loop {
        let mut waiting = Vec::new();
        let mut existing = Vec::new();
        for (id, quic, answer) in ask_peers(node.id, &members, &mut endpoints, &identity).await {
            match answer {
                Ok(info) if info.term == 0 && info.leader_id == 0 => {}
                Ok(info) => existing.push(format!("master {id} is in term {}", info.term)),
                Err(e) => waiting.push(format!("master {id} ({quic}): {e}")),
            }
        }
        if !existing.is_empty() {
            tracing::error!(
                "this master's log is empty but the group already exists ({}): it does not start a new one, and waits to be added (`agora masters add {}=ADDRESS`)",
                existing.join("; "),
                node.id
            );
            return;
        }
        if waiting.is_empty() {
            match node.raft.initialize(members.clone()).await {
                Ok(()) => tracing::info!(
                    members = members.len(),
                    "this master started the group; electing a leader"
                ),
                Err(e) => tracing::warn!("starting the group: {e}"),
            }
            return;
        }
        if last_said.elapsed() >= Duration::from_secs(5) {
            tracing::info!(
                "waiting for every master before starting the group: {}",
                waiting.join("; ")
            );
            last_said = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Follows the group's state and makes this master serve while, and only while,
/// it leads with a quorum behind it.
struct Leadership {
    shared: Arc<Mutex<Shared>>,
    node: Node,
    core: CoreConfig,
    store: ArtifactStore,
    /// To ask the leader for its HTTP address, with a client endpoint kept for it.
    identity: Identity,
    probe: Arc<Mutex<Option<quinn::Endpoint>>>,
}

impl Leadership {
    async fn watch(self) {
        use openraft::async_runtime::WatchReceiver as _;
        let mut metrics = self.node.raft.metrics();
        // Also look every heartbeat: a lost quorum shows as time passing, not as a
        // change of the metrics.
        let mut iv = tokio::time::interval(Duration::from_millis(group::HEARTBEAT_MS));
        loop {
            tokio::select! {
                r = metrics.changed() => if r.is_err() { return },
                _ = iv.tick() => {}
            }
            if let Err(e) = self.observe() {
                tracing::error!("{e}; this master stops leading");
                self.shared
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .step_down("it could not rebuild its state");
            }
        }
    }

    /// Brings the shell in line with the group's state now.
    fn observe(&self) -> Result<()> {
        use openraft::async_runtime::WatchReceiver as _;
        let m = self.node.raft.metrics().borrow_watched().clone();
        let verdict = group::leading(&m);
        let mut s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let leader_node = m
            .current_leader
            .and_then(|id| m.membership_config.get_node(&id).cloned());
        let leader_id = m.current_leader.unwrap_or(0);
        let leader_http = if leader_id == self.node.id {
            s.http.clone()
        } else {
            match &s.learned_http {
                Some((id, term, http)) if *id == leader_id && *term == m.current_term => {
                    http.clone()
                }
                _ => {
                    if let Some(n) = leader_node.as_ref().filter(|_| leader_id != 0) {
                        self.learn_http(&mut s, leader_id, m.current_term, n.quic.clone());
                    }
                    String::new()
                }
            }
        };
        s.leader = v1::LeaderInfo {
            leading: s.core.is_some(),
            leader_id,
            leader_quic: leader_node
                .as_ref()
                .map(|n| n.quic.clone())
                .unwrap_or_default(),
            leader_http,
            term: m.current_term,
            id: self.node.id,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            members: m
                .membership_config
                .nodes()
                .map(|(id, n)| format!("{id}={}", n.quic))
                .collect(),
            http: s.http.clone(),
            voters: m.membership_config.membership().voter_ids().collect(),
        };
        match (verdict, s.core.is_some()) {
            (group::Leading::Yes(term), false) => {
                let epoch = s.outbox.epoch + 1;
                let core = self.rebuild(term, epoch, s.clock.read())?;
                s.core = Some(core);
                s.outbox = Outbox {
                    epoch,
                    ..Outbox::default()
                };
                s.leader.leading = true;
                tracing::info!(term, id = self.node.id, "this master leads the group");
            }
            (group::Leading::No(why), true) => {
                s.step_down(why);
                s.leader.leading = false;
            }
            _ => {}
        }
        let elsewhere = (!s.leader.leading && !s.leader.leader_http.is_empty())
            .then(|| s.leader.leader_http.clone());
        s.elsewhere.send_if_modified(|e| {
            let changed = *e != elsewhere;
            *e = elsewhere;
            changed
        });
        Ok(())
    }

    /// Asks the leader for its HTTP address (at most once a second), so that this
    /// master's answers, and its HTTP door, can send callers there.
    fn learn_http(&self, s: &mut Shared, leader: u64, term: u64, quic: String) {
        if s.learning_since
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        s.learning_since = Some(std::time::Instant::now());
        let shared = self.shared.clone();
        let identity = self.identity.clone();
        let probe = self.probe.clone();
        tokio::spawn(async move {
            let asked = async {
                let addr = tls::resolve(&quic)?;
                let endpoint = {
                    let mut p = probe.lock().unwrap_or_else(PoisonError::into_inner);
                    match p.as_ref() {
                        Some(e) => e.clone(),
                        None => {
                            let e = tls::client_endpoint(addr, &identity)?;
                            *p = Some(e.clone());
                            e
                        }
                    }
                };
                agora_net::leader::ask(&endpoint, addr, Duration::from_secs(1)).await
            }
            .await;
            let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
            s.learning_since = None;
            match asked {
                Ok(info) if info.leading && info.id == leader && info.term == term => {
                    s.learned_http = Some((leader, term, info.http));
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("asking master {leader} for its HTTP address: {e}"),
            }
        });
    }

    /// A fresh core from the registry as the group committed it: what the core does
    /// after a restart (frameworks come back disconnected; offers wait for the
    /// registry's agents to re-register).
    fn rebuild(&self, term: u64, epoch: u64, now: agora_master_core::Now) -> Result<MasterCore> {
        // Ids the core hands out carry the term, this master's id and how many times
        // it has led in this process (a leader that lost its quorum and got it back
        // leads again in the same term), so that no two cores hand out the same id.
        let mut core = MasterCore::new(CoreConfig {
            id_prefix: format!("{}.{term:x}.{}.{epoch}", self.core.id_prefix, self.node.id),
            ..self.core.clone()
        });
        let registry = self.node.sm.registry();
        if registry != Registry::default() {
            tracing::info!(
                agents = registry.agents.len(),
                frameworks = registry.frameworks.len(),
                term,
                "recovering the master registry from {}",
                self.node.sm.path().display()
            );
            core.handle(Input::Recover { registry }, now);
        }
        for sha in self.store.list()? {
            core.handle(Input::ArtifactStored { sha256: sha }, now);
        }
        Ok(core)
    }
}

#[derive(Clone)]
struct Ctx {
    shared: Arc<Mutex<Shared>>,
    /// This master's Raft node, for its peers' RPCs.
    node: Node,
    /// The cluster's name in Raft RPCs (its CA's hash).
    cluster: Arc<str>,
    /// Copies artifacts to and from the other masters.
    replicas: crate::replicate::Replicas,
    /// Where `agora fn` requests go, when a functions framework runs beside us.
    functions: Option<Arc<dyn FunctionsDoor>>,
    store: ArtifactStore,
    next_conn: Arc<AtomicU64>,
}

type Send = quinn::SendStream;
type Recv = quinn::RecvStream;

impl Ctx {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs an operator's request through the core and returns its answer once
    /// what it changed is committed and the outputs it caused are on their way.
    async fn operate(&self, op: OperatorOp) -> Result<(), Refused> {
        let (answer, sent) = {
            let mut s = self.lock();
            s.next_request += 1;
            let request = s.next_request;
            let now = s.clock.read();
            let Some(core) = s.core.as_mut() else {
                return Err(Refused(s.not_leader().to_string()));
            };
            let outs = core.handle(Input::Operator { request, op }, now);
            let answer = outs.iter().find_map(|o| match o {
                Output::OperatorDone { request: r, result } if *r == request => {
                    Some(result.clone())
                }
                _ => None,
            });
            (answer, s.dispatch(outs))
        };
        if let Some(sent) = sent {
            if sent.await.is_err() {
                return Err(Refused(
                    "the master stopped leading before the change was committed; it may or may not have taken effect: check, and retry".into(),
                ));
            }
        }
        match answer {
            Some(r) => r,
            None => Err("the master did not answer the request (a bug: please report it)".into()),
        }
    }

    async fn serve_connection(self, conn: quinn::Connection) {
        let role = tls::peer_role(&conn);
        let remote = conn.remote_address();
        let (streams, first_frame) = stream_limits(role);
        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(streams));
        loop {
            let (send, mut recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => return,
            };
            let ctx = self.clone();
            let conn = conn.clone();
            tokio::spawn(async move {
                let first = tokio::time::timeout(
                    FIRST_FRAME_DEADLINE,
                    agora_net::read_frame_limited(&mut recv, first_frame),
                );
                let open: StreamOpen = match first.await {
                    Ok(Ok(Some(o))) => o,
                    Ok(Ok(None)) => return,
                    Err(_) => {
                        // A stream left silent: dropped, the connection kept.
                        tracing::debug!(%remote, "a stream sent nothing within {FIRST_FRAME_DEADLINE:?}; dropped");
                        let _ = recv.stop(0u32.into());
                        return;
                    }
                    Ok(Err(
                        e @ (agora_net::FrameError::Io(_) | agora_net::FrameError::Truncated),
                    )) => {
                        // The peer went away mid-frame (or its connection was closed
                        // for another stream's fault): nothing to tell it.
                        tracing::debug!(%remote, "a stream ended in its first frame: {e}");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, "bad first frame on a stream: {e}");
                        conn.close(2u32.into(), format!("bad frame: {e}").as_bytes());
                        return;
                    }
                };
                let r = match open.kind {
                    Some(stream_open::Kind::Agent(h)) => {
                        ctx.require(&conn, role, Role::Agent, send, |s| {
                            ctx.clone().agent_stream(conn.clone(), h, s, recv)
                        })
                        .await
                    }
                    Some(stream_open::Kind::Scheduler(h)) => {
                        let (role, principal) = client_principal(&conn, role);
                        ctx.require(&conn, role, Role::Client, send, |s| {
                            ctx.clone()
                                .scheduler_stream(conn.clone(), h, s, recv, principal)
                        })
                        .await
                    }
                    Some(stream_open::Kind::Operator(req)) => {
                        let (role, principal) = client_principal(&conn, role);
                        ctx.require(&conn, role, Role::Client, send, |s| {
                            ctx.clone().operator(req, s, principal)
                        })
                        .await
                    }
                    // Another master copying an artifact: served by every master.
                    Some(stream_open::Kind::Put(p)) if role == Some(Role::Master) => {
                        ctx.clone().put(p, send, recv, true).await
                    }
                    Some(stream_open::Kind::Get(g)) if role == Some(Role::Master) => {
                        ctx.clone().get(g, send, true).await
                    }
                    Some(stream_open::Kind::Put(p)) => {
                        ctx.require(&conn, role, Role::Client, send, |s| {
                            ctx.clone().put(p, s, recv, false)
                        })
                        .await
                    }
                    Some(stream_open::Kind::Get(g)) => {
                        ctx.require(&conn, role, Role::Agent, send, |s| {
                            ctx.clone().get(g, s, false)
                        })
                        .await
                    }
                    // Anyone may ask who leads.
                    Some(stream_open::Kind::Leader(_)) => ctx.leader_info(send).await,
                    // Raft, between masters only; every master serves it.
                    Some(k @ (stream_open::Kind::Raft(_) | stream_open::Kind::RaftSnapshot(_))) => {
                        if role != Some(Role::Master) {
                            let msg = wrong_role(role, Role::Master);
                            conn.close(agora_net::leader::WRONG_ROLE_CODE.into(), msg.as_bytes());
                            Err(Error::WrongRole(msg))
                        } else {
                            let open = StreamOpen { kind: Some(k) };
                            crate::raft::net::serve_stream(
                                &ctx.node.raft,
                                ctx.node.id,
                                &ctx.cluster,
                                open,
                                send,
                                recv,
                            )
                            .await
                        }
                    }
                    None => Err(Error::UnknownStream),
                };
                if let Err(e) = r {
                    tracing::info!(%remote, "stream ended with an error: {e:#}");
                }
            });
        }
    }

    /// Runs `f` only when the peer's certificate has the role the stream needs;
    /// otherwise closes the connection with a reason the peer can show its user.
    async fn require<F, Fut>(
        &self,
        conn: &quinn::Connection,
        have: Option<Role>,
        need: Role,
        send: Send,
        f: F,
    ) -> Result<()>
    where
        F: FnOnce(Send) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        if have != Some(need) {
            let msg = wrong_role(have, need);
            conn.close(agora_net::leader::WRONG_ROLE_CODE.into(), msg.as_bytes());
            return Err(Error::WrongRole(msg));
        }
        // Only the leader serves; the others send the peer to it.
        let not_leading = {
            let s = self.lock();
            s.core.is_none().then(|| s.not_leader())
        };
        if let Some(e) = not_leading {
            let hint = match &e {
                Error::NotLeader { leader } => leader.clone().unwrap_or_default(),
                _ => String::new(),
            };
            conn.close(agora_net::leader::NOT_LEADER_CODE.into(), hint.as_bytes());
            return Err(e);
        }
        f(send).await
    }

    /// Reads the core (with the time now, in ms), or says this master does not lead.
    fn read<T>(&self, f: impl FnOnce(&MasterCore, u64) -> T) -> Result<T> {
        let s = self.lock();
        let now = s.clock.now_ms();
        Ok(f(s.core()?, now))
    }

    async fn answer(&self, mut send: Send, resp: OperatorResponse) -> Result<()> {
        write_frame(&mut send, &resp).await?;
        send.finish()?;
        Ok(())
    }

    async fn leader_info(&self, mut send: Send) -> Result<()> {
        let info = {
            let s = self.lock();
            v1::LeaderInfo {
                leading: s.core.is_some(),
                ..s.leader.clone()
            }
        };
        write_frame(&mut send, &info).await?;
        send.finish()?;
        Ok(())
    }

    async fn agent_stream(
        self,
        qconn: quinn::Connection,
        hello: v1::AgentHello,
        mut send: Send,
        mut recv: Recv,
    ) -> Result<()> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Out<MasterToAgent>>(PEER_QUEUE);
        {
            let mut s = self.lock();
            s.agents.insert(conn, (tx, qconn.clone()));
            s.feed(Input::AgentHello { conn, hello });
        }
        let q2 = qconn.clone();
        let writer = tokio::spawn(async move {
            let mut pending: Option<String> = None;
            while let Some(m) = rx.recv().await {
                match m {
                    Out::Msg(m) => {
                        if write_out_batch(&mut send, m, &mut rx, &mut pending)
                            .await
                            .is_err()
                        {
                            break;
                        }
                        if let Some(why) = pending.take() {
                            let err = MasterToAgent {
                                msg: Some(v1::master_to_agent::Msg::Error(v1::AgentError {
                                    message: why.clone(),
                                })),
                            };
                            let _ = write_frame(&mut send, &err).await;
                            let _ = send.finish();
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                            q2.close(3u32.into(), why.as_bytes());
                            break;
                        }
                    }
                    Out::Close(why) => {
                        let err = MasterToAgent {
                            msg: Some(v1::master_to_agent::Msg::Error(v1::AgentError {
                                message: why.clone(),
                            })),
                        };
                        let _ = write_frame(&mut send, &err).await;
                        let _ = send.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                        q2.close(3u32.into(), why.as_bytes());
                        break;
                    }
                }
            }
        });
        let result = loop {
            match read_frame::<_, v1::AgentToMaster>(&mut recv).await {
                Ok(Some(msg)) => self.lock().feed(Input::AgentMessage { conn, msg }),
                Ok(None) => break Ok(()),
                Err(e) => break Err(Error::AgentFrame(e)),
            }
        };
        {
            let mut s = self.lock();
            s.agents.remove(&conn);
            s.feed(Input::AgentClosed { conn });
        }
        writer.abort();
        if result.is_err() {
            qconn.close(2u32.into(), b"bad frame");
        }
        result
    }

    async fn scheduler_stream(
        self,
        qconn: quinn::Connection,
        hello: v1::SchedulerHello,
        mut send: Send,
        mut recv: Recv,
        principal: String,
    ) -> Result<()> {
        // Every role the framework asks for, checked before it is known.
        let roles = hello
            .framework
            .as_ref()
            .map(|f| f.roles.clone())
            .unwrap_or_default();
        let roles = if roles.is_empty() {
            vec![agora_allocator::DEFAULT_ROLE.to_string()]
        } else {
            roles
        };
        let denied = self.read(|c, _| {
            roles
                .iter()
                .find_map(|r| c.authorize(&principal, Action::RegisterFrameworks, r).err())
        })?;
        if let Some(d) = denied {
            tracing::info!(%principal, "subscription refused: {d}");
            let e = Event {
                event: Some(v1::event::Event::Error(v1::Error {
                    message: d.to_string(),
                    request_id: 0,
                })),
            };
            write_frame(&mut send, &e).await?;
            send.finish()?;
            return Ok(());
        }
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Out<Event>>(PEER_QUEUE);
        {
            let mut s = self.lock();
            s.schedulers.insert(conn, (tx, qconn));
            s.feed(Input::SchedulerHello {
                conn,
                hello,
                principal,
            });
        }
        let writer = tokio::spawn(async move {
            let mut pending: Option<String> = None;
            while let Some(m) = rx.recv().await {
                match m {
                    Out::Msg(e) => {
                        if write_out_batch(&mut send, e, &mut rx, &mut pending)
                            .await
                            .is_err()
                        {
                            break;
                        }
                        if let Some(why) = pending.take() {
                            let e = Event {
                                event: Some(v1::event::Event::Error(v1::Error {
                                    message: why,
                                    request_id: 0,
                                })),
                            };
                            let _ = write_frame(&mut send, &e).await;
                            let _ = send.finish();
                            break;
                        }
                    }
                    Out::Close(why) => {
                        let e = Event {
                            event: Some(v1::event::Event::Error(v1::Error {
                                message: why,
                                request_id: 0,
                            })),
                        };
                        let _ = write_frame(&mut send, &e).await;
                        let _ = send.finish();
                        break;
                    }
                }
            }
        });
        let result = loop {
            match read_frame::<_, v1::Call>(&mut recv).await {
                Ok(Some(call)) => self.lock().feed(Input::SchedulerCall { conn, call }),
                Ok(None) => break Ok(()),
                Err(e) => break Err(Error::FrameworkFrame(e)),
            }
        };
        {
            let mut s = self.lock();
            s.schedulers.remove(&conn);
            s.feed(Input::SchedulerClosed { conn });
        }
        // Let the writer flush what is queued (e.g. the error for a bad frame).
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        result
    }

    async fn operator(self, req: OperatorRequest, mut send: Send, principal: String) -> Result<()> {
        if let Some(r) = &req.request {
            if let Err(refusal) = self.authorize_operator(&principal, r).await {
                return self.answer(send, refusal).await;
            }
        }
        // What the principal may see, for the listings (each filtered under one
        // read of the core).
        let may_view =
            |c: &MasterCore, role: &str| c.authorize(&principal, Action::ViewTasks, role).is_ok();
        let resp = match req.request {
            Some(operator_request::Request::ListTasks(l)) => {
                let mut tasks = match self.read(|c, now| {
                    let mut tasks = c.list_tasks(l.all, now);
                    tasks.retain(|t| may_view(c, &t.role));
                    tasks
                }) {
                    Ok(t) => t,
                    Err(e) => return self.answer(send, failed(e)).await,
                };
                if l.stats {
                    let live = self.live_usage().await;
                    for t in tasks.iter_mut().filter(|t| t.usage.is_none()) {
                        t.usage = live
                            .get(&(t.framework_id.clone(), t.task_id.clone()))
                            .copied();
                    }
                }
                OperatorResponse {
                    tasks,
                    ..Default::default()
                }
            }
            Some(operator_request::Request::Cluster(_)) => {
                match self.read(|c, now| c.agents(now)) {
                    Ok(agents) => OperatorResponse {
                        agents,
                        ..Default::default()
                    },
                    Err(e) => failed(e),
                }
            }
            Some(operator_request::Request::Kill(k)) => {
                let r = self.operate(OperatorOp::Kill { task_id: k.task_id }).await;
                OperatorResponse {
                    error: r.err().map(|e| e.0).unwrap_or_default(),
                    ..Default::default()
                }
            }
            Some(operator_request::Request::MarkAgentGone(g)) => {
                let r = self
                    .operate(OperatorOp::MarkAgentGone {
                        agent_id: g.agent_id,
                    })
                    .await;
                OperatorResponse {
                    error: r.err().map(|e| e.0).unwrap_or_default(),
                    ..Default::default()
                }
            }
            Some(operator_request::Request::SetWeight(w)) => {
                let r = self
                    .operate(OperatorOp::SetWeight {
                        role: w.role,
                        weight: w.weight,
                    })
                    .await;
                OperatorResponse {
                    error: r.err().map(|e| e.0).unwrap_or_default(),
                    ..Default::default()
                }
            }
            Some(operator_request::Request::SetQuota(q)) => {
                let parsed = Resources::from_proto(&q.guarantee)
                    .and_then(|g| Resources::from_proto(&q.limit).map(|l| (g, l)));
                let r = match parsed {
                    Ok((guarantee, limit)) => {
                        self.operate(OperatorOp::SetQuota {
                            role: q.role.clone(),
                            guarantee,
                            limit,
                            force: q.force,
                        })
                        .await
                    }
                    Err(e) => Err(Refused(format!("bad quota resources: {e}"))),
                };
                OperatorResponse {
                    error: r.err().map(|e| e.0).unwrap_or_default(),
                    ..Default::default()
                }
            }
            Some(operator_request::Request::Roles(g)) => match self
                .read(|c, _| {
                    c.roles(&g.role).map(|mut roles| {
                        roles.retain(|r| may_view(c, &r.role));
                        roles
                    })
                })
                .and_then(|r| r.map_err(Error::from))
            {
                Ok(roles) => OperatorResponse {
                    roles,
                    ..Default::default()
                },
                Err(e) => failed(e),
            },
            Some(operator_request::Request::Explain(e)) => {
                let explained = self
                    .read(|c, now| c.explain(&e.target, now))
                    .and_then(|r| r.map_err(Error::from));
                match explained {
                    Ok(explanation) => OperatorResponse {
                        explanation,
                        ..Default::default()
                    },
                    Err(e) => failed(e),
                }
            }
            Some(operator_request::Request::ReadFile(r)) => match self.read_sandbox(r).await {
                Ok(file) => OperatorResponse {
                    file: Some(file),
                    ..Default::default()
                },
                Err(e) => OperatorResponse {
                    error: format!("{e:#}"),
                    ..Default::default()
                },
            },
            Some(operator_request::Request::FnDeploy(d)) => self.fn_deploy(d).await,
            Some(
                r @ (operator_request::Request::FnRemove(_)
                | operator_request::Request::FnTenantSet(_)
                | operator_request::Request::FnTenantList(_)
                | operator_request::Request::FnList(_)),
            ) => match self.functions() {
                Ok(f) => {
                    let mut resp = f.handle(r).await;
                    let filtered = self.read(|c, _| {
                        resp.functions.retain(|s| {
                            may_view(c, s.spec.as_ref().map_or("*", |d| d.role.as_str()))
                        });
                        resp.tenant_limits.retain(|l| may_view(c, &l.role));
                    });
                    match filtered {
                        Ok(()) => resp,
                        Err(e) => failed(e),
                    }
                }
                Err(e) => OperatorResponse {
                    error: e.to_string(),
                    ..Default::default()
                },
            },
            Some(operator_request::Request::MastersChange(c)) => self.masters_change(c).await,
            Some(operator_request::Request::GetAcl(_)) => match self.read(|c, _| {
                c.registry()
                    .policy
                    .as_ref()
                    .map(|p| p.to_json())
                    .unwrap_or_default()
            }) {
                Ok(policy) => OperatorResponse {
                    policy,
                    ..Default::default()
                },
                Err(e) => failed(e),
            },
            Some(operator_request::Request::SetAcl(a)) => {
                let r = self.operate(OperatorOp::SetPolicy { text: a.policy }).await;
                if r.is_ok() {
                    tracing::info!(%principal, "access policy replaced");
                }
                OperatorResponse {
                    error: r.err().map(|e| e.0).unwrap_or_default(),
                    ..Default::default()
                }
            }
            None => OperatorResponse {
                error: "unknown operator request (newer client?)".into(),
                ..Default::default()
            },
        };
        write_frame(&mut send, &resp).await?;
        send.finish()?;
        Ok(())
    }

    /// Checks an operator request against the access policy before it is carried
    /// out: the refusal to send when the principal may not. Listings are filtered
    /// afterwards instead (a principal sees what it may view).
    async fn authorize_operator(
        &self,
        principal: &str,
        r: &operator_request::Request,
    ) -> std::result::Result<(), OperatorResponse> {
        use operator_request::Request as R;
        let task_role = |task_id: &str| self.read(|c, _| c.role_of_task(task_id)).ok().flatten();
        let (action, object) = match r {
            R::ListTasks(_) | R::Roles(_) | R::FnList(_) | R::FnTenantList(_) | R::Cluster(_) => {
                return Ok(())
            }
            // An unknown task: the request goes on, and says so.
            R::Kill(k) => match task_role(&k.task_id) {
                Some(role) => (Action::KillTasks, role),
                None => return Ok(()),
            },
            R::ReadFile(f) => match task_role(&f.task_id) {
                Some(role) => (Action::ViewTasks, role),
                None => return Ok(()),
            },
            R::Explain(e) => (
                Action::ViewTasks,
                task_role(&e.target).unwrap_or_else(|| e.target.clone()),
            ),
            R::SetWeight(w) => (Action::UpdateWeights, w.role.clone()),
            R::SetQuota(q) => (Action::UpdateQuotas, q.role.clone()),
            R::FnDeploy(d) => (
                Action::DeployFunctions,
                if d.role.trim().is_empty() {
                    agora_allocator::DEFAULT_ROLE.to_string()
                } else {
                    d.role.trim().to_string()
                },
            ),
            R::FnRemove(rm) => {
                let listed = match self.functions() {
                    Ok(f) => f.handle(R::FnList(v1::FunctionList {})).await.functions,
                    Err(_) => Vec::new(),
                };
                let role = listed
                    .iter()
                    .filter_map(|s| s.spec.as_ref())
                    .find(|d| d.name == rm.name)
                    .map(|d| d.role.clone());
                match role {
                    Some(role) => (Action::RemoveFunctions, role),
                    None => return Ok(()),
                }
            }
            R::FnTenantSet(t) => (
                Action::SetTenantLimits,
                t.limit.as_ref().map(|l| l.role.clone()).unwrap_or_default(),
            ),
            R::MastersChange(_) | R::MarkAgentGone(_) => (Action::ManageCluster, String::new()),
            R::GetAcl(_) | R::SetAcl(_) => (Action::ManageAcls, String::new()),
        };
        let verdict = self
            .read(|c, _| c.authorize(principal, action, &object))
            .map_err(failed)?;
        verdict.map_err(|d| {
            tracing::info!(%principal, "operator request refused: {d}");
            OperatorResponse {
                error: d.to_string(),
                denied: true,
                ..Default::default()
            }
        })
    }

    /// `agora masters add|remove`, on the leader.
    async fn masters_change(&self, c: v1::MastersChange) -> OperatorResponse {
        let done = match (c.add_id, c.remove_id) {
            (0, 0) | (1.., 1..) => Err("a masters change adds one master or removes one".into()),
            (id, 0) => match tls::resolve(&c.add_quic) {
                Ok(_) => {
                    self.node
                        .add_member(id, c.add_quic.trim().to_string(), MEMBER_CATCH_UP)
                        .await
                }
                Err(e) => Err(format!("master {id}'s address: {e}")),
            },
            (0, id) => self.node.remove_member(id).await,
        };
        match done {
            Ok(done) => {
                tracing::info!("{done}");
                OperatorResponse {
                    done,
                    ..Default::default()
                }
            }
            Err(error) => OperatorResponse {
                error,
                ..Default::default()
            },
        }
    }

    fn functions(&self) -> Result<&Arc<dyn FunctionsDoor>> {
        self.functions.as_ref().ok_or(Error::NoFunctions)
    }

    /// `agora fn deploy`: the module must be in the artifact store; the functions
    /// framework has the spec in the registry (its state) before it answers.
    async fn fn_deploy(&self, d: v1::FunctionDeploy) -> OperatorResponse {
        let f = match self.functions() {
            Ok(f) => f,
            Err(e) => {
                return OperatorResponse {
                    error: e.to_string(),
                    ..Default::default()
                }
            }
        };
        let sha = d
            .module
            .as_ref()
            .map(|m| m.sha256.clone())
            .unwrap_or_default();
        let has = match self.read(|c, _| c.has_artifact(&sha)) {
            Ok(h) => h,
            Err(e) => return failed(e),
        };
        if !has {
            return OperatorResponse {
                error: format!(
                    "function {}: module {sha} was never uploaded to this master (upload it first; `agora fn deploy` does)",
                    d.name
                ),
                ..Default::default()
            };
        }
        f.handle(operator_request::Request::FnDeploy(d)).await
    }

    /// Asks every agent with live tasks for their usage now, concurrently, each
    /// bounded in time; an agent that does not answer just leaves its tasks blank.
    async fn live_usage(&self) -> HashMap<(String, String), v1::ResourceUsage> {
        let asks: Vec<(quinn::Connection, Vec<(String, String)>)> = {
            let s = self.lock();
            let Some(core) = s.core.as_ref() else {
                return HashMap::new();
            };
            core.live_tasks_by_agent()
                .into_iter()
                .filter_map(|(conn, keys)| s.agents.get(&conn).map(|(_, q)| (q.clone(), keys)))
                .collect()
        };
        let queries = asks.into_iter().map(|(q, keys)| async move {
            let query = v1::UsageQuery {
                tasks: keys
                    .iter()
                    .map(|(f, t)| v1::TaskRef {
                        framework_id: f.clone(),
                        task_id: t.clone(),
                    })
                    .collect(),
            };
            let ask = async {
                let (mut send, mut recv) = q.open_bi().await?;
                let req = v1::AgentRequest {
                    request: Some(v1::agent_request::Request::Usage(query)),
                };
                write_frame(&mut send, &req).await?;
                send.finish()?;
                let rep: Option<v1::UsageReport> = read_frame(&mut recv).await?;
                Ok::<_, Error>(rep.unwrap_or_default())
            };
            let rep = tokio::time::timeout(Duration::from_secs(3), ask)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            keys.into_iter()
                .filter_map(|(f, t)| rep.usage.get(&t).map(|u| ((f, t.clone()), *u)))
                .collect::<Vec<_>>()
        });
        let mut out = HashMap::new();
        for part in futures_join_all(queries).await {
            out.extend(part);
        }
        out
    }

    /// Reads part of a task's file from the agent that ran it, on a stream of its own.
    async fn read_sandbox(&self, r: v1::ReadTaskFile) -> Result<SandboxData> {
        let (qconn, framework_id) = {
            let s = self.lock();
            let (conn, fw) = s.core()?.locate_task(&r.task_id)?;
            let q = s
                .agents
                .get(&conn)
                .map(|(_, q)| q.clone())
                .ok_or(Error::AgentNotConnected)?;
            (q, fw)
        };
        let (mut send, mut recv) = qconn.open_bi().await?;
        let req = SandboxRead {
            framework_id,
            task_id: r.task_id,
            path: r.path,
            offset: r.offset,
            length: r.length.clamp(1, MAX_READ),
        };
        let req = v1::AgentRequest {
            request: Some(v1::agent_request::Request::Read(req)),
        };
        write_frame(&mut send, &req).await?;
        send.finish()?;
        let data: SandboxData =
            tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv))
                .await
                .map_err(|_| Error::AgentTimeout)??
                .ok_or(Error::AgentClosed)?;
        if !data.error.is_empty() {
            return Err(Error::Agent(data.error));
        }
        Ok(data)
    }

    /// An upload: from a client to the leader, which copies it to a majority of the
    /// group before it answers; or from the leader to this master (`from_peer`).
    async fn put(
        self,
        p: v1::ArtifactPut,
        mut send: Send,
        mut recv: Recv,
        from_peer: bool,
    ) -> Result<()> {
        let reply = |error: String, present: bool| ArtifactHeader {
            sha256: p.sha256.clone(),
            size: p.size,
            error,
            present,
        };
        if !agora_proto::is_sha256_hex(&p.sha256) {
            write_frame(
                &mut send,
                &reply(
                    format!("`{}` is not a sha256 in lower-case hex", p.sha256),
                    false,
                ),
            )
            .await?;
            return Ok(send.finish()?);
        }
        if p.size > transfer::MAX_ARTIFACT {
            write_frame(
                &mut send,
                &reply(
                    format!(
                        "artifact of {} bytes exceeds the limit of {} bytes",
                        p.size,
                        transfer::MAX_ARTIFACT
                    ),
                    false,
                ),
            )
            .await?;
            return Ok(send.finish()?);
        }
        if self.store.path(&p.sha256).is_some() {
            let err = self.replicate(&p.sha256, from_peer).await;
            if err.is_empty() {
                self.lock().feed(Input::ArtifactStored {
                    sha256: p.sha256.clone(),
                });
            }
            write_frame(&mut send, &reply(err, true)).await?;
            return Ok(send.finish()?);
        }
        write_frame(&mut send, &reply(String::new(), false)).await?;
        let r =
            transfer::receive_to_file(&mut recv, &self.store.dest(&p.sha256), &p.sha256, p.size)
                .await;
        let err = match &r {
            Ok(()) => {
                let err = self.replicate(&p.sha256, from_peer).await;
                if err.is_empty() {
                    self.lock().feed(Input::ArtifactStored {
                        sha256: p.sha256.clone(),
                    });
                }
                err
            }
            Err(e) => format!("upload refused: {e:#}"),
        };
        write_frame(&mut send, &reply(err, false)).await?;
        send.finish()?;
        Ok(r?)
    }

    /// Copies an upload to the group (unless it came from a peer); the error a
    /// client sees, or empty.
    async fn replicate(&self, sha: &str, from_peer: bool) -> String {
        if from_peer || !self.replicas.replicated() {
            return String::new();
        }
        match self.replicas.push(&self.store, sha).await {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    /// A download: by an agent from the leader (which fetches from a peer what it
    /// lacks), or by another master (`from_peer`: only what this one holds).
    async fn get(self, g: v1::ArtifactGet, mut send: Send, from_peer: bool) -> Result<()> {
        if !from_peer
            && self.store.path(&g.sha256).is_none()
            && agora_proto::is_sha256_hex(&g.sha256)
            && self.replicas.replicated()
        {
            match self.replicas.fetch(&self.store, &g.sha256).await {
                Ok(()) => self.lock().feed(Input::ArtifactStored {
                    sha256: g.sha256.clone(),
                }),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        let Some(path) = self.store.path(&g.sha256) else {
            let h = ArtifactHeader {
                sha256: g.sha256.clone(),
                error: format!("the master has no artifact {}", g.sha256),
                ..Default::default()
            };
            write_frame(&mut send, &h).await?;
            return Ok(send.finish()?);
        };
        let size = tokio::fs::metadata(&path).await?.len();
        write_frame(
            &mut send,
            &ArtifactHeader {
                sha256: g.sha256,
                size,
                ..Default::default()
            },
        )
        .await?;
        transfer::send_file(&mut send, &path).await?;
        send.finish()?;
        Ok(())
    }
}

/// An operator's request that failed, as its answer.
/// The role a scheduler or operator stream is judged as, and its principal: a
/// client's, from its certificate; a master (the functions gateway beside it, which
/// dials with the master's certificate) is a client the access policy does not
/// judge ([`agora_master_core::acl::SYSTEM_PRINCIPAL`]).
fn client_principal(conn: &quinn::Connection, role: Option<Role>) -> (Option<Role>, String) {
    match role {
        Some(Role::Master) => (
            Some(Role::Client),
            agora_master_core::acl::SYSTEM_PRINCIPAL.to_string(),
        ),
        _ => (role, tls::peer_principal(conn)),
    }
}

fn failed(e: Error) -> OperatorResponse {
    OperatorResponse {
        error: match e {
            Error::Refused(Refused(why)) => why,
            e => e.to_string(),
        },
        ..Default::default()
    }
}

/// Awaits futures concurrently (a tiny join_all, to avoid a dependency for one use).
async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: std::marker::Send + 'static,
    F: std::marker::Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// Writes `first` and the messages already queued behind it in one batch. A Close met
/// while draining ends the batch and is handed back through `close` for the caller.
async fn write_out_batch<M: prost::Message>(
    send: &mut quinn::SendStream,
    first: M,
    rx: &mut mpsc::Receiver<Out<M>>,
    close: &mut Option<String>,
) -> Result<(), agora_net::FrameError> {
    let mut batch = agora_net::FrameBatch::new();
    batch.push(&first)?;
    while !batch.is_full() {
        match rx.try_recv() {
            Ok(Out::Msg(m)) => batch.push(&m)?,
            Ok(Out::Close(why)) => {
                *close = Some(why);
                break;
            }
            Err(_) => break,
        }
    }
    batch.write_to(send).await
}

#[cfg(test)]
#[allow(
    clippy::unreachable,
    reason = "a test: a panic is how it fails (clippy.toml cannot allow this one in tests)"
)]
mod tests {
    use super::*;

    fn weight(role: &str) -> RegistryOp {
        RegistryOp::SetWeight {
            role: role.into(),
            weight: 2.0,
        }
    }

    fn note(conn: ConnId) -> Vec<Output> {
        vec![Output::CloseScheduler(conn, format!("output {conn}"))]
    }

    fn conns(held: &[Held]) -> Vec<ConnId> {
        held.iter()
            .flat_map(|h| &h.outs)
            .map(|o| match o {
                Output::CloseScheduler(c, _) => *c,
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn outputs_leave_in_order_and_only_once_what_precedes_them_is_committed() {
        let mut o = Outbox::default();
        o.hold(vec![weight("a")], note(1));
        o.hold(vec![], note(2)); // no ops, but behind 1
        let (ops, first) = o.take_batch().unwrap();
        assert_eq!(ops, vec![weight("a")]);
        o.hold(vec![weight("b")], note(3));
        o.hold(vec![], note(4));
        assert!(conns(&o.release(0)).is_empty(), "nothing committed yet");
        assert_eq!(conns(&o.release(first)), [1, 2], "3 is not committed");
        let (ops, second) = o.take_batch().unwrap();
        assert_eq!(ops, vec![weight("b")]);
        assert!(o.take_batch().is_none(), "everything is proposed");
        assert_eq!(conns(&o.release(second)), [3, 4]);
        assert!(o.is_empty());
    }

    #[test]
    fn a_batch_stops_near_its_size_but_always_carries_one_entry() {
        let big = |n: usize| RegistryOp::PutFrameworkState {
            framework_id: "f".into(),
            key: "k".into(),
            value: vec![7; n],
        };
        let mut o = Outbox::default();
        o.hold(vec![big(MAX_BATCH_BYTES)], note(1));
        o.hold(vec![big(10)], note(2));
        o.hold(vec![big(10)], note(3));
        let (ops, last) = o.take_batch().unwrap();
        assert_eq!((ops.len(), last), (1, 1), "the oversized entry goes alone");
        let (ops, last) = o.take_batch().unwrap();
        assert_eq!((ops.len(), last), (2, 3), "small ones go together");
    }
}
