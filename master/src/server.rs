//! The master's I/O shell: accepts QUIC connections, reads frames, feeds the core,
//! and carries out its outputs. All decisions live in `core`.
//!
//! Every peer's outgoing messages go through a bounded channel; a peer too slow to
//! drain it is disconnected rather than allowed to grow our memory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_net::tls::{self, Identity, Role};
use agora_net::{read_frame, transfer, write_frame, Monotonic};
use agora_proto::v1::{
    self, operator_request, stream_open, ArtifactHeader, Event, MasterToAgent, OperatorRequest,
    OperatorResponse, SandboxData, SandboxRead, StreamOpen,
};
use agora_proto::Resources;
use tokio::sync::mpsc;

use crate::artifacts::ArtifactStore;
use crate::error::{Error, Result};
use crate::registry::{Registry, RegistryStore};
use agora_master_core::{ConnId, CoreConfig, Input, MasterCore, OperatorOp, Output, Refused};

/// Messages queued to one peer before it counts as stuck and is disconnected.
const PEER_QUEUE: usize = 4096;
/// Largest read an operator may ask of a sandbox file in one request.
const MAX_READ: u32 = 1024 * 1024;

pub struct MasterConfig {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub identity: Identity,
    pub core: CoreConfig,
    /// Where `agora fn` requests go: the functions framework run beside this master
    /// (the cli starts `agora-fn-gateway` and plugs it in here); None: they are
    /// refused.
    pub functions: Option<Arc<dyn FunctionsDoor>>,
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
    core: MasterCore,
    registry: RegistryStore,
    agents: HashMap<ConnId, (mpsc::Sender<Out<MasterToAgent>>, quinn::Connection)>,
    schedulers: HashMap<ConnId, mpsc::Sender<Out<Event>>>,
    /// Times every timeout of the core (see `agora_master_core::Now`).
    clock: Monotonic,
    /// Numbers operator requests, to find each one's answer among the outputs.
    next_request: u64,
}

impl Shared {
    /// Runs the core on one input and carries out what it asks.
    fn feed(&mut self, input: Input) {
        let outs = self.core.handle(input, self.clock.read());
        self.dispatch(outs);
    }

    /// Runs an operator's request through the core and returns its answer (after the
    /// outputs it caused are on their way).
    fn operate(&mut self, op: OperatorOp) -> Result<(), Refused> {
        self.next_request += 1;
        let request = self.next_request;
        let outs = self
            .core
            .handle(Input::Operator { request, op }, self.clock.read());
        let answer = outs.iter().find_map(|o| match o {
            Output::OperatorDone { request: r, result } if *r == request => Some(result.clone()),
            _ => None,
        });
        self.dispatch(outs);
        match answer {
            Some(r) => r,
            None => Err("the master did not answer the request (a bug: please report it)".into()),
        }
    }

    fn dispatch(&mut self, outs: Vec<Output>) {
        // What the registry must remember is on disk before anything that follows
        // from it is sent (a SUBSCRIBED, an offer of re-registered resources).
        let ops = self.core.take_registry_ops();
        if let Err(e) = self.registry.commit(&ops) {
            // A master that cannot keep its registry would forget frameworks and
            // agents on its next restart; stop rather than carry on (as Mesos does).
            tracing::error!("{e:#}; the master stops: fix the data dir (disk full? permissions?) and start it again");
            std::process::exit(70);
        }
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
                    if let Some(tx) = self.schedulers.get(&c) {
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
                    if let Some(tx) = self.schedulers.remove(&c) {
                        let _ = tx.try_send(Out::Close(why));
                    }
                }
                // Picked out by `operate`, which asked.
                Output::OperatorDone { .. } => {}
            }
        }
    }
}

/// A running master.
pub struct MasterHandle {
    pub addr: SocketAddr,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MasterHandle {
    /// Stops accepting, closes every connection and waits briefly for them to go.
    pub async fn shutdown(self) {
        self.endpoint.close(0u32.into(), b"master shutting down");
        for t in &self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

pub async fn start(cfg: MasterConfig) -> Result<MasterHandle> {
    let store = ArtifactStore::open(&cfg.data_dir.join("artifacts"))?;
    let endpoint = tls::server_endpoint(cfg.bind, &cfg.identity)?;
    let addr = endpoint.local_addr()?;
    let clock = Monotonic::new();
    let mut core = MasterCore::new(cfg.core.clone());
    let (registry, recovered) = RegistryStore::open(&cfg.data_dir)?;
    if recovered != Registry::default() {
        tracing::info!(
            agents = recovered.agents.len(),
            frameworks = recovered.frameworks.len(),
            "recovering the master registry from {}",
            cfg.data_dir.join(crate::registry::FILE).display()
        );
        core.handle(
            Input::Recover {
                registry: recovered,
            },
            clock.read(),
        );
    }
    for sha in store.list()? {
        core.handle(Input::ArtifactStored { sha256: sha }, clock.read());
    }
    let shared = Arc::new(Mutex::new(Shared {
        core,
        registry,
        agents: HashMap::new(),
        schedulers: HashMap::new(),
        clock,
        next_request: 0,
    }));
    let next_conn = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    let functions = cfg.functions.clone();

    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(250));
            loop {
                iv.tick().await;
                shared.lock().expect("master state lock").feed(Input::Tick);
            }
        })
    };
    let acceptor = {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let ctx = Ctx {
                    functions: functions.clone(),
                    shared: shared.clone(),
                    store: store.clone(),
                    next_conn: next_conn.clone(),
                };
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => ctx.serve_connection(conn).await,
                        Err(e) => tracing::info!("incoming connection failed: {e}"),
                    }
                });
            }
        })
    };
    tracing::info!(%addr, "master listening (QUIC)");
    tasks.push(ticker);
    tasks.push(acceptor);
    Ok(MasterHandle {
        addr,
        endpoint,
        tasks,
    })
}

#[derive(Clone)]
struct Ctx {
    shared: Arc<Mutex<Shared>>,
    /// Where `agora fn` requests go, when a functions framework runs beside us.
    functions: Option<Arc<dyn FunctionsDoor>>,
    store: ArtifactStore,
    next_conn: Arc<AtomicU64>,
}

type Send = quinn::SendStream;
type Recv = quinn::RecvStream;

impl Ctx {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("master state lock")
    }

    async fn serve_connection(self, conn: quinn::Connection) {
        let role = tls::peer_role(&conn);
        let remote = conn.remote_address();
        loop {
            let (send, mut recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => return,
            };
            let ctx = self.clone();
            let conn = conn.clone();
            tokio::spawn(async move {
                let open: StreamOpen = match read_frame(&mut recv).await {
                    Ok(Some(o)) => o,
                    Ok(None) => return,
                    Err(e) => {
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
                        ctx.require(&conn, role, Role::Client, send, |s| {
                            ctx.clone().scheduler_stream(h, s, recv)
                        })
                        .await
                    }
                    Some(stream_open::Kind::Operator(req)) => {
                        ctx.require(&conn, role, Role::Client, send, |s| {
                            ctx.clone().operator(req, s)
                        })
                        .await
                    }
                    Some(stream_open::Kind::Put(p)) => {
                        ctx.require(&conn, role, Role::Client, send, |s| {
                            ctx.clone().put(p, s, recv)
                        })
                        .await
                    }
                    Some(stream_open::Kind::Get(g)) => {
                        ctx.require(&conn, role, Role::Agent, send, |s| ctx.clone().get(g, s))
                            .await
                    }
                    // Raft kinds: served once the master runs in a group (issue 12).
                    Some(stream_open::Kind::Raft(_)) => {
                        let (mut send, error) = (send, Error::RaftNotServed.to_string());
                        let _ = write_frame(&mut send, &v1::RaftReply { error, reply: None }).await;
                        let _ = send.finish();
                        Err(Error::RaftNotServed)
                    }
                    Some(stream_open::Kind::RaftSnapshot(_)) => {
                        let (mut send, error) = (send, Error::RaftNotServed.to_string());
                        let _ =
                            write_frame(&mut send, &v1::RaftSnapshotReply { error, vote: None })
                                .await;
                        let _ = send.finish();
                        Err(Error::RaftNotServed)
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
            let msg = format!(
                "a certificate with role {} may not open this kind of stream (it needs {}); use the {} certificate from `agora certs init`",
                have.map(|r| format!("{r:?}")).unwrap_or_else(|| "unknown".into()),
                format!("{need:?}").to_lowercase(),
                format!("{need:?}").to_lowercase(),
            );
            conn.close(4u32.into(), msg.as_bytes());
            return Err(Error::WrongRole(msg));
        }
        f(send).await
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
        hello: v1::SchedulerHello,
        mut send: Send,
        mut recv: Recv,
    ) -> Result<()> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Out<Event>>(PEER_QUEUE);
        {
            let mut s = self.lock();
            s.schedulers.insert(conn, tx);
            s.feed(Input::SchedulerHello { conn, hello });
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

    async fn operator(self, req: OperatorRequest, mut send: Send) -> Result<()> {
        let resp = match req.request {
            Some(operator_request::Request::ListTasks(l)) => {
                let mut tasks = {
                    let s = self.lock();
                    s.core.list_tasks(l.all, s.clock.now_ms())
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
            Some(operator_request::Request::Cluster(_)) => OperatorResponse {
                agents: self.lock().core.agents(),
                ..Default::default()
            },
            Some(operator_request::Request::Kill(k)) => {
                let r = self.lock().operate(OperatorOp::Kill { task_id: k.task_id });
                OperatorResponse {
                    error: r.err().map(|e| e.0).unwrap_or_default(),
                    ..Default::default()
                }
            }
            Some(operator_request::Request::SetWeight(w)) => {
                let r = self.lock().operate(OperatorOp::SetWeight {
                    role: w.role,
                    weight: w.weight,
                });
                OperatorResponse {
                    error: r.err().map(|e| e.0).unwrap_or_default(),
                    ..Default::default()
                }
            }
            Some(operator_request::Request::SetQuota(q)) => {
                let parsed = Resources::from_proto(&q.guarantee)
                    .and_then(|g| Resources::from_proto(&q.limit).map(|l| (g, l)));
                let r = match parsed {
                    Ok((guarantee, limit)) => self.lock().operate(OperatorOp::SetQuota {
                        role: q.role.clone(),
                        guarantee,
                        limit,
                    }),
                    Err(e) => Err(Refused(format!("bad quota resources: {e}"))),
                };
                OperatorResponse {
                    error: r.err().map(|e| e.0).unwrap_or_default(),
                    ..Default::default()
                }
            }
            Some(operator_request::Request::Roles(g)) => match self.lock().core.roles(&g.role) {
                Ok(roles) => OperatorResponse {
                    roles,
                    ..Default::default()
                },
                Err(Refused(error)) => OperatorResponse {
                    error,
                    ..Default::default()
                },
            },
            Some(operator_request::Request::Explain(e)) => {
                let explained = {
                    let s = self.lock();
                    s.core.explain(&e.target, s.clock.now_ms())
                };
                match explained {
                    Ok(explanation) => OperatorResponse {
                        explanation,
                        ..Default::default()
                    },
                    Err(Refused(error)) => OperatorResponse {
                        error,
                        ..Default::default()
                    },
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
                Ok(f) => f.handle(r).await,
                Err(e) => OperatorResponse {
                    error: e.to_string(),
                    ..Default::default()
                },
            },
            None => OperatorResponse {
                error: "unknown operator request (newer client?)".into(),
                ..Default::default()
            },
        };
        write_frame(&mut send, &resp).await?;
        send.finish()?;
        Ok(())
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
        if !self.lock().core.has_artifact(&sha) {
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
            s.core
                .live_tasks_by_agent()
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
            let (conn, fw) = s.core.locate_task(&r.task_id)?;
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

    async fn put(self, p: v1::ArtifactPut, mut send: Send, mut recv: Recv) -> Result<()> {
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
            self.lock().feed(Input::ArtifactStored {
                sha256: p.sha256.clone(),
            });
            write_frame(&mut send, &reply(String::new(), true)).await?;
            return Ok(send.finish()?);
        }
        write_frame(&mut send, &reply(String::new(), false)).await?;
        let r =
            transfer::receive_to_file(&mut recv, &self.store.dest(&p.sha256), &p.sha256, p.size)
                .await;
        let err = match &r {
            Ok(()) => {
                self.lock().feed(Input::ArtifactStored {
                    sha256: p.sha256.clone(),
                });
                String::new()
            }
            Err(e) => format!("upload refused: {e:#}"),
        };
        write_frame(&mut send, &reply(err, false)).await?;
        send.finish()?;
        Ok(r?)
    }

    async fn get(self, g: v1::ArtifactGet, mut send: Send) -> Result<()> {
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
