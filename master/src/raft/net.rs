//! The masters' Raft RPCs over QUIC with mutual TLS, as every other link of Agora.
//!
//! Client side: [`MasterNet`] is openraft's network factory. It keeps one
//! `quinn::Connection` per peer master, dialled with this master's own certificate
//! (master certificates carry ClientAuth too) and shared by every client openraft
//! makes for that peer (replication, heartbeats, each election's votes). Each RPC is
//! one bidirectional stream: `StreamOpen{raft: RaftRpc}`, then one `RaftReply`. A
//! snapshot is `StreamOpen{raft_snapshot: RaftSnapshotOpen}`, its bytes as
//! `DataChunk` frames (the artifact transfer's format), then one `RaftSnapshotReply`.
//!
//! Time limits come from openraft (`RPCOption::hard_ttl`): an RPC, dial included, that
//! has not been answered by then fails. A peer that is down does not refuse a QUIC
//! connection, it just never answers, so a timeout or a connection error drops the
//! connection (the next RPC dials again) and returns `Unreachable` or `Timeout`, after
//! which openraft backs off. A snapshot may take longer than any one RPC, so there
//! the limit applies to each step (dial, each chunk, the answer), not to the whole.
//!
//! Server side: [`serve_rpc`] and [`serve_snapshot`] answer one stream whose first
//! frame is a Raft kind, after checking that it is meant for this cluster and this
//! master; [`serve_peer_connection`] serves a whole connection, refusing any peer
//! without a master certificate. A master's connection loop must make that same
//! check (`tls::peer_role(&conn) == Some(Role::Master)`) before calling the first two.

use std::collections::HashMap;
use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agora_net::tls::{self, Identity, Role};
use agora_net::{read_frame_limited, FrameError};
use agora_proto::v1::{self as pb, raft_reply::Reply, raft_rpc::Rpc, stream_open, StreamOpen};
use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::RPCOption;
use openraft::{OptionalSend, RPCTypes, RaftNetworkFactory};
use prost::Message;

use super::store::MAX_SNAPSHOT;
use super::types::*;
use super::wire::{self, AppendRequest, AppendResponse, Route, VoteRequestOf, VoteResponseOf};
use crate::error::{Error, Result};

/// Largest frame on a Raft stream. Peers are authenticated masters of this cluster
/// (mutual TLS, master certificate), so the bound only guards against bugs; a
/// proposal batch stays far below it.
pub const MAX_RAFT_FRAME: usize = 64 * 1024 * 1024;
/// Snapshot bytes per DataChunk frame (as artifact transfers).
const SNAPSHOT_CHUNK: usize = 256 * 1024;
/// Snapshot bytes received before any is accepted: the announced size is trusted
/// only as far as this for the first allocation.
const SNAPSHOT_PREALLOC: usize = 64 * 1024 * 1024;

type RpcError = RPCError<Agora>;
type SnapshotError = StreamingError<Agora>;
type SnapshotResponse = openraft::raft::SnapshotResponse<Agora>;

/// Resolves a member's QUIC address, off the runtime when it is a name.
async fn resolve(addr: &str) -> agora_net::Result<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let owned = addr.to_string();
    tokio::task::spawn_blocking(move || tls::resolve(&owned))
        .await
        .map_err(|e| agora_net::Error::Address(format!("resolving {addr}: {e}")))?
}

/// The client side of this master's Raft network: openraft's network factory.
/// Clones share the connections.
#[derive(Clone)]
pub struct MasterNet {
    inner: Arc<Inner>,
}

struct Inner {
    me: u64,
    cluster: String,
    identity: Identity,
    /// One client endpoint per address family (IPv6: true), made on first use.
    endpoints: Mutex<HashMap<bool, quinn::Endpoint>>,
    /// The connection to each peer, shared by all of openraft's clients for it.
    links: Mutex<HashMap<u64, Arc<Link>>>,
    closed: AtomicBool,
}

struct Link {
    peer: u64,
    addr: String,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    /// The last RPC to the peer failed: logged once when it goes down, once when it
    /// answers again (openraft's own warnings come ten a second).
    down: AtomicBool,
}

impl MasterNet {
    /// The network of master `me` of the cluster `cluster` (the hash of its CA, as
    /// `store::Owner::cluster`), dialling peers with `identity` (this master's
    /// certificate). Nothing is dialled until openraft sends an RPC.
    pub fn new(me: u64, cluster: impl Into<String>, identity: Identity) -> MasterNet {
        MasterNet {
            inner: Arc::new(Inner {
                me,
                cluster: cluster.into(),
                identity,
                endpoints: Mutex::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Closes every connection to the peers; RPCs fail as unreachable from now on.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let endpoints: Vec<quinn::Endpoint> = self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, e)| e)
            .collect();
        for e in endpoints {
            e.close(0u32.into(), b"master stopping");
        }
    }

    fn endpoint(&self, addr: SocketAddr) -> agora_net::Result<quinn::Endpoint> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(agora_net::Error::Connect(
                "this master's Raft network is closed (it is stopping)".into(),
            ));
        }
        let mut eps = self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = eps.get(&addr.is_ipv6()) {
            return Ok(e.clone());
        }
        let e = tls::client_endpoint(addr, &self.inner.identity)?;
        eps.insert(addr.is_ipv6(), e.clone());
        Ok(e)
    }

    fn link(&self, peer: u64, node: &MasterNode) -> Arc<Link> {
        let mut links = self
            .inner
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match links.get(&peer) {
            Some(l) if l.addr == node.quic => l.clone(),
            _ => {
                // New, or the membership moved it: a connection of its own.
                let l = Arc::new(Link {
                    peer,
                    addr: node.quic.clone(),
                    conn: tokio::sync::Mutex::new(None),
                    down: AtomicBool::new(false),
                });
                links.insert(peer, l.clone());
                l
            }
        }
    }
}

impl RaftNetworkFactory<Agora> for MasterNet {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &MasterNode) -> PeerClient {
        PeerClient {
            net: self.clone(),
            link: self.link(target, node),
        }
    }
}

/// openraft's client for one peer master.
pub struct PeerClient {
    net: MasterNet,
    link: Arc<Link>,
}

/// How an exchange failed: openraft is told Timeout or Unreachable.
enum Failure {
    Timeout,
    Unreachable(Error),
}

impl PeerClient {
    fn me(&self) -> u64 {
        self.net.inner.me
    }

    fn peer(&self) -> u64 {
        self.link.peer
    }

    fn addr(&self) -> String {
        self.link.addr.clone()
    }

    /// The connection to the peer, dialled if there is none or it has closed.
    async fn connection(&self) -> Result<quinn::Connection> {
        let mut slot = self.link.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let peer = self.peer();
        let addr = resolve(&self.link.addr)
            .await
            .map_err(|cause| Error::RaftPeerAddress { peer, cause })?;
        let dial = |cause| Error::RaftDial {
            peer,
            addr: self.addr(),
            cause,
        };
        let endpoint = self.net.endpoint(addr).map_err(dial)?;
        let conn = tls::connect_within(&endpoint, addr, tls::CONNECT_TIMEOUT)
            .await
            .map_err(dial)?;
        tracing::debug!(peer, %addr, "connected to a peer master for Raft");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Why the peer closed `conn`, if it did: a stream on a closed connection only
    /// says "connection lost", the connection says why (a refused certificate, ...).
    fn closed_by_peer(&self, conn: &quinn::Connection) -> Option<Error> {
        match conn.close_reason()? {
            quinn::ConnectionError::LocallyClosed => None,
            cause => Some(Error::RaftConnection {
                peer: self.peer(),
                addr: self.addr(),
                cause,
            }),
        }
    }

    /// Closes `conn` (an RPC on it failed or timed out) so that the next RPC dials.
    fn forget(&self, conn: &quinn::Connection, why: &str) {
        conn.close(0u32.into(), why.as_bytes());
        if let Ok(mut slot) = self.link.conn.try_lock() {
            if slot
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                *slot = None;
            }
        }
    }

    fn stream_error(&self, rpc: &'static str, cause: impl Into<agora_net::Error>) -> Error {
        Error::RaftStream {
            peer: self.peer(),
            addr: self.addr(),
            rpc,
            cause: cause.into(),
        }
    }

    /// Dials if needed within `ttl`: a peer that does not answer is unreachable.
    async fn connect_within(&self, rpc: &'static str, ttl: Duration) -> Result<quinn::Connection> {
        match tokio::time::timeout(ttl, self.connection()).await {
            Ok(r) => r,
            Err(_) => Err(Error::RaftTimeout {
                peer: self.peer(),
                addr: self.addr(),
                rpc,
                after: ttl,
            }),
        }
    }

    /// One RPC (see `exchange_rpc`), noting when the peer stops or starts answering.
    async fn call(
        &self,
        rpc: Rpc,
        name: &'static str,
        action: RPCTypes,
        ttl: Duration,
    ) -> Result<Reply, RpcError> {
        let r = self.exchange_rpc(rpc, name, action, ttl).await;
        match &r {
            Ok(_) => {
                if self.link.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(peer = self.peer(), addr = %self.addr(), "master {} answers again", self.peer());
                }
            }
            Err(e) => {
                if !self.link.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        peer = self.peer(),
                        addr = %self.addr(),
                        "master {} does not answer ({e}); the group goes on while a majority does (`agora masters` shows it)",
                        self.peer()
                    );
                }
            }
        }
        r
    }

    /// One RPC: a stream, the request, the reply, all within `ttl`.
    async fn exchange_rpc(
        &self,
        rpc: Rpc,
        name: &'static str,
        action: RPCTypes,
        ttl: Duration,
    ) -> Result<Reply, RpcError> {
        let started = tokio::time::Instant::now();
        let conn = self
            .connect_within(name, ttl)
            .await
            .map_err(|e| self.unreachable(name, e))?;
        let open = StreamOpen {
            kind: Some(stream_open::Kind::Raft(pb::RaftRpc {
                cluster: self.net.inner.cluster.clone(),
                from: self.me(),
                to: self.peer(),
                rpc: Some(rpc),
            })),
        };
        let left = ttl.saturating_sub(started.elapsed());
        let reply: pb::RaftReply =
            match tokio::time::timeout(left, self.exchange(&conn, &open, name)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let e = self.closed_by_peer(&conn).unwrap_or(e);
                    self.forget(&conn, "a Raft RPC failed");
                    return Err(self.unreachable(name, e));
                }
                Err(_) => {
                    self.forget(&conn, "a Raft RPC timed out");
                    tracing::debug!(peer = self.peer(), "Raft {name} timed out after {ttl:?}");
                    return Err(RPCError::Timeout(Timeout {
                        action,
                        id: self.me(),
                        target: self.peer(),
                        timeout: ttl,
                    }));
                }
            };
        if !reply.error.is_empty() {
            return Err(self.unreachable(
                name,
                Error::RaftRefused {
                    peer: self.peer(),
                    addr: self.addr(),
                    rpc: name,
                    message: reply.error,
                },
            ));
        }
        reply.reply.ok_or_else(|| {
            self.unreachable(
                name,
                Error::RaftWire {
                    what: format!("master {} answered a {name} with no reply", self.peer()),
                },
            )
        })
    }

    fn unreachable(&self, rpc: &'static str, e: Error) -> RpcError {
        tracing::debug!(peer = self.peer(), "Raft {rpc}: {e}");
        RPCError::Unreachable(Unreachable::new(&e))
    }

    async fn exchange(
        &self,
        conn: &quinn::Connection,
        open: &StreamOpen,
        rpc: &'static str,
    ) -> Result<pb::RaftReply> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|cause| Error::RaftConnection {
                peer: self.peer(),
                addr: self.addr(),
                cause,
            })?;
        agora_net::write_frame_limited(&mut send, open, MAX_RAFT_FRAME)
            .await
            .map_err(|e| self.stream_error(rpc, e))?;
        let _ = send.finish();
        read_frame_limited(&mut recv, MAX_RAFT_FRAME)
            .await
            .map_err(|e| self.stream_error(rpc, e))?
            .ok_or_else(|| Error::RaftNoReply {
                peer: self.peer(),
                addr: self.addr(),
                rpc,
            })
    }

    fn wrong_reply(&self, rpc: &'static str) -> RpcError {
        self.unreachable(
            rpc,
            Error::RaftWire {
                what: format!(
                    "master {} answered a {rpc} with another kind of reply",
                    self.peer()
                ),
            },
        )
    }

    async fn vote_rpc(
        &self,
        req: VoteRequestOf,
        pre: bool,
        option: RPCOption,
    ) -> Result<VoteResponseOf, RpcError> {
        let (rpc, name) = if pre {
            (Rpc::PreVote(wire::encode_vote_request(&req)), "pre-vote")
        } else {
            (Rpc::Vote(wire::encode_vote_request(&req)), "vote")
        };
        match self
            .call(rpc, name, RPCTypes::Vote, option.hard_ttl())
            .await?
        {
            Reply::Vote(v) => wire::decode_vote_reply(&v).map_err(|e| self.unreachable(name, e)),
            _ => Err(self.wrong_reply(name)),
        }
    }

    /// Sends the snapshot; each step (dial, open, each chunk, the answer) within `ttl`.
    async fn send_snapshot(
        &self,
        vote: &Vote,
        snapshot: Snapshot,
        ttl: Duration,
    ) -> std::result::Result<pb::RaftSnapshotReply, Failure> {
        const RPC: &str = "snapshot";
        let data = snapshot.snapshot.into_inner();
        if data.len() > MAX_SNAPSHOT {
            return Err(Failure::Unreachable(Error::RaftSnapshotTooLarge {
                size: data.len() as u64,
                limit: MAX_SNAPSHOT as u64,
            }));
        }
        let conn = self
            .connect_within(RPC, ttl)
            .await
            .map_err(Failure::Unreachable)?;
        let route = Route {
            cluster: self.net.inner.cluster.clone(),
            from: self.me(),
            to: self.peer(),
        };
        let open = StreamOpen {
            kind: Some(stream_open::Kind::RaftSnapshot(wire::encode_snapshot_open(
                &route,
                vote,
                &snapshot.meta,
                data.len() as u64,
            ))),
        };
        let step = |f| tokio::time::timeout(ttl, f);
        let result = async {
            let (mut send, mut recv) = match step(conn.open_bi()).await {
                Ok(r) => r.map_err(|cause| {
                    Failure::Unreachable(Error::RaftConnection {
                        peer: self.peer(),
                        addr: self.addr(),
                        cause,
                    })
                })?,
                Err(_) => return Err(Failure::Timeout),
            };
            let sent = async {
                step_write(ttl, &mut send, &open).await?;
                for c in data.chunks(SNAPSHOT_CHUNK) {
                    let chunk = pb::DataChunk {
                        data: c.to_vec(),
                        last: false,
                    };
                    step_write(ttl, &mut send, &chunk).await?;
                }
                let last = pb::DataChunk {
                    data: Vec::new(),
                    last: true,
                };
                step_write(ttl, &mut send, &last).await?;
                let _ = send.finish();
                Ok::<(), Option<FrameError>>(())
            }
            .await;
            if let Err(None) = sent {
                return Err(Failure::Timeout);
            }
            // A receiver that refuses the snapshot answers at once and stops reading:
            // its answer says why better than the failed write does.
            let read = read_frame_limited::<_, pb::RaftSnapshotReply>(&mut recv, MAX_RAFT_FRAME);
            let reply = match tokio::time::timeout(ttl, read).await {
                Ok(r) => r.map_err(Some),
                Err(_) => Err(None),
            };
            match (sent, reply) {
                (_, Ok(Some(r))) if !r.error.is_empty() => Ok(r),
                (Ok(()), Ok(Some(r))) => Ok(r),
                (Ok(()), Ok(None)) => Err(Failure::Unreachable(Error::RaftNoReply {
                    peer: self.peer(),
                    addr: self.addr(),
                    rpc: RPC,
                })),
                (Err(Some(e)), _) | (Ok(()), Err(Some(e))) => Err(Failure::Unreachable(
                    self.closed_by_peer(&conn)
                        .unwrap_or_else(|| self.stream_error(RPC, e)),
                )),
                (Err(None), _) | (Ok(()), Err(None)) => Err(Failure::Timeout),
            }
        }
        .await;
        match &result {
            Ok(_) => {}
            Err(Failure::Timeout) => self.forget(&conn, "a Raft snapshot transfer timed out"),
            Err(Failure::Unreachable(_)) => self.forget(&conn, "a Raft snapshot transfer failed"),
        }
        result
    }
}

/// Writes one frame within `ttl`: `Err(None)` is a timeout.
async fn step_write<M: Message>(
    ttl: Duration,
    send: &mut quinn::SendStream,
    msg: &M,
) -> Result<(), Option<FrameError>> {
    match tokio::time::timeout(
        ttl,
        agora_net::write_frame_limited(send, msg, MAX_RAFT_FRAME),
    )
    .await
    {
        Ok(r) => r.map_err(Some),
        Err(_) => Err(None),
    }
}

impl RaftNetworkV2<Agora> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        req: AppendRequest,
        option: RPCOption,
    ) -> Result<AppendResponse, RpcError> {
        const RPC: &str = "append";
        let rpc = Rpc::Append(wire::encode_append(&req));
        match self
            .call(rpc, RPC, RPCTypes::AppendEntries, option.hard_ttl())
            .await?
        {
            Reply::Append(a) => wire::decode_append_reply(&a).map_err(|e| self.unreachable(RPC, e)),
            _ => Err(self.wrong_reply(RPC)),
        }
    }

    async fn vote(
        &mut self,
        req: VoteRequestOf,
        option: RPCOption,
    ) -> Result<VoteResponseOf, RpcError> {
        self.vote_rpc(req, false, option).await
    }

    async fn pre_vote(
        &mut self,
        req: VoteRequestOf,
        option: RPCOption,
    ) -> Result<VoteResponseOf, RpcError> {
        self.vote_rpc(req, true, option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse, SnapshotError> {
        const RPC: &str = "snapshot";
        let ttl = option.hard_ttl();
        let unreachable = |e: Error| {
            tracing::debug!(peer = self.peer(), "Raft {RPC}: {e}");
            StreamingError::Unreachable(Unreachable::new(&e))
        };
        let reply = tokio::select! {
            r = self.send_snapshot(&vote, snapshot, ttl) => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let reply = match reply {
            Ok(r) => r,
            Err(Failure::Unreachable(e)) => return Err(unreachable(e)),
            Err(Failure::Timeout) => {
                return Err(StreamingError::Timeout(Timeout {
                    action: RPCTypes::InstallSnapshot,
                    id: self.me(),
                    target: self.peer(),
                    timeout: ttl,
                }))
            }
        };
        if !reply.error.is_empty() {
            return Err(unreachable(Error::RaftRefused {
                peer: self.peer(),
                addr: self.addr(),
                rpc: RPC,
                message: reply.error,
            }));
        }
        wire::decode_snapshot_reply(&reply).map_err(unreachable)
    }
}

/// Refuses an RPC meant for another cluster or another master.
fn check_route(me: u64, cluster: &str, their_cluster: &str, from: u64, to: u64) -> Result<()> {
    if their_cluster != cluster || to != me {
        return Err(Error::RaftMisdirected {
            from,
            to,
            their_cluster: their_cluster.to_string(),
            me,
            our_cluster: cluster.to_string(),
        });
    }
    Ok(())
}

fn local(rpc: &'static str, from: u64) -> impl FnOnce(openraft::errors::RaftError<Agora>) -> Error {
    move |e| Error::RaftLocal {
        rpc,
        from,
        cause: Box::new(e),
    }
}

async fn answer_rpc(raft: &Raft, me: u64, cluster: &str, rpc: pb::RaftRpc) -> Result<Reply> {
    check_route(me, cluster, &rpc.cluster, rpc.from, rpc.to)?;
    let from = rpc.from;
    match rpc.rpc {
        None => Err(Error::RaftWire {
            what: format!("master {from} sent a Raft RPC with no request"),
        }),
        Some(Rpc::Append(a)) => {
            let req = wire::decode_append(&a)?;
            let resp = raft
                .append_entries(req)
                .await
                .map_err(local("append", from))?;
            Ok(Reply::Append(wire::encode_append_reply(&resp)))
        }
        Some(Rpc::Vote(v)) => {
            let req = wire::decode_vote_request(&v)?;
            let resp = raft.vote(req).await.map_err(local("vote", from))?;
            Ok(Reply::Vote(wire::encode_vote_reply(&resp)))
        }
        Some(Rpc::PreVote(v)) => {
            let req = wire::decode_vote_request(&v)?;
            let resp = raft.pre_vote(req).await.map_err(local("pre-vote", from))?;
            Ok(Reply::Vote(wire::encode_vote_reply(&resp)))
        }
    }
}

/// Answers one Raft RPC (the first frame of its stream was `StreamOpen{raft: rpc}`)
/// on `send`: checks that it is for cluster `cluster` and master `me`, hands it to
/// `raft`, writes the reply. The peer's certificate must have been checked (role
/// master) by the caller. A refusal or failure is answered as an error the peer
/// reports, and returned.
pub async fn serve_rpc(
    raft: &Raft,
    me: u64,
    cluster: &str,
    rpc: pb::RaftRpc,
    mut send: quinn::SendStream,
) -> Result<()> {
    let result = answer_rpc(raft, me, cluster, rpc).await;
    let reply = match &result {
        Ok(r) => pb::RaftReply {
            error: String::new(),
            reply: Some(*r),
        },
        Err(e) => pb::RaftReply {
            error: e.to_string(),
            reply: None,
        },
    };
    agora_net::write_frame_limited(&mut send, &reply, MAX_RAFT_FRAME)
        .await
        .map_err(|e| Error::Net(e.into()))?;
    let _ = send.finish();
    result.map(|_| ())
}

/// Reads a snapshot's `size` bytes, sent as DataChunk frames.
async fn receive_snapshot(recv: &mut quinn::RecvStream, size: u64) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity((size as usize).min(SNAPSHOT_PREALLOC));
    loop {
        let chunk: pb::DataChunk = read_frame_limited(recv, MAX_RAFT_FRAME)
            .await
            .map_err(|e| Error::Net(e.into()))?
            .ok_or(Error::Net(agora_net::Error::TransferTruncated {
                got: data.len() as u64,
                expected: size,
            }))?;
        if (data.len() + chunk.data.len()) as u64 > size {
            return Err(Error::Net(agora_net::Error::TransferOversized {
                expected: size,
            }));
        }
        data.extend_from_slice(&chunk.data);
        if chunk.last {
            break;
        }
    }
    if data.len() as u64 != size {
        return Err(Error::Net(agora_net::Error::TransferSize {
            got: data.len() as u64,
            expected: size,
        }));
    }
    Ok(data)
}

async fn answer_snapshot(
    raft: &Raft,
    me: u64,
    cluster: &str,
    open: &pb::RaftSnapshotOpen,
    recv: &mut quinn::RecvStream,
) -> Result<pb::RaftSnapshotReply> {
    check_route(me, cluster, &open.cluster, open.from, open.to)?;
    if open.size > MAX_SNAPSHOT as u64 {
        return Err(Error::RaftSnapshotTooLarge {
            size: open.size,
            limit: MAX_SNAPSHOT as u64,
        });
    }
    let (vote, meta) = wire::decode_snapshot_open(open)?;
    let data = receive_snapshot(recv, open.size).await?;
    tracing::info!(
        from = open.from,
        bytes = data.len(),
        last = ?meta.last_log_id,
        "installing a Raft snapshot from the leader"
    );
    let snapshot = Snapshot {
        meta,
        snapshot: Cursor::new(data),
    };
    let resp = raft
        .install_full_snapshot(vote, snapshot)
        .await
        .map_err(|e| Error::RaftLocal {
            rpc: "snapshot",
            from: open.from,
            cause: Box::new(e),
        })?;
    Ok(wire::encode_snapshot_reply(&resp))
}

/// Receives a snapshot (the first frame of its stream was `StreamOpen{raft_snapshot:
/// open}`; DataChunk frames follow on `recv`), installs it and answers on `send`.
/// Checks as [`serve_rpc`]; a refusal is answered before reading the bytes.
pub async fn serve_snapshot(
    raft: &Raft,
    me: u64,
    cluster: &str,
    open: pb::RaftSnapshotOpen,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<()> {
    let result = answer_snapshot(raft, me, cluster, &open, &mut recv).await;
    let reply = match &result {
        Ok(r) => r.clone(),
        Err(e) => pb::RaftSnapshotReply {
            vote: None,
            error: e.to_string(),
        },
    };
    agora_net::write_frame_limited(&mut send, &reply, MAX_RAFT_FRAME)
        .await
        .map_err(|e| Error::Net(e.into()))?;
    let _ = send.finish();
    // Stop the sender at once if it is still sending what we refused.
    let _ = recv.stop(0u32.into());
    result.map(|_| ())
}

/// Serves one stream of a peer master whose first frame was `open`: a Raft RPC or a
/// snapshot; any other kind is refused.
pub async fn serve_stream(
    raft: &Raft,
    me: u64,
    cluster: &str,
    open: StreamOpen,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<()> {
    match open.kind {
        Some(stream_open::Kind::Raft(rpc)) => serve_rpc(raft, me, cluster, rpc, send).await,
        Some(stream_open::Kind::RaftSnapshot(o)) => {
            serve_snapshot(raft, me, cluster, o, send, recv).await
        }
        _ => {
            let _ = send.reset(1u32.into());
            Err(Error::UnknownStream)
        }
    }
}

/// Serves a connection from a peer master: every stream it opens is a Raft RPC or a
/// snapshot. A peer whose certificate is not a master's is refused: the connection
/// is closed with a reason it can show (as the master's own connection loop does).
pub async fn serve_peer_connection(raft: Raft, me: u64, cluster: String, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let role = tls::peer_role(&conn);
    if role != Some(Role::Master) {
        let msg = crate::error::wrong_role(role, Role::Master);
        tracing::warn!(%remote, "refusing a Raft connection: {msg}");
        conn.close(4u32.into(), msg.as_bytes());
        return;
    }
    let cluster: Arc<str> = cluster.into();
    loop {
        let (send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let raft = raft.clone();
        let cluster = cluster.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            let open: StreamOpen = match read_frame_limited(&mut recv, MAX_RAFT_FRAME).await {
                Ok(Some(o)) => o,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%remote, "bad first frame on a Raft stream: {e}");
                    conn.close(2u32.into(), format!("bad frame: {e}").as_bytes());
                    return;
                }
            };
            if let Err(e) = serve_stream(&raft, me, &cluster, open, send, recv).await {
                tracing::info!(%remote, "Raft stream ended with an error: {e}");
            }
        });
    }
}
