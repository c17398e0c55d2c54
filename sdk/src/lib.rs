//! The Rust library Agora frameworks and operator tools are written with.
//!
//! A framework connects with a [`Client`], subscribes (getting a [`Scheduler`]),
//! then reacts to [`Event`]s with calls: the Mesos v1 scheduler API (ACCEPT with
//! [`Operation`]s, DECLINE, REVIVE/SUPPRESS per role, KILL, SHUTDOWN, ACKNOWLEDGE,
//! RECONCILE, MESSAGE, UPDATE_FRAMEWORK, TEARDOWN). A call the master refuses comes
//! back as [`Event::Error`] naming what was wrong.
//!
//! # A worked example
//!
//! A framework in role `batch` that reserves one cpu and 256 MiB on the first agent
//! it is offered, runs one wasm task on the reservation, acknowledges its updates,
//! reconciles after a failover, and stops offers once done. Run it against
//! `agora dev` (it finds the dev cluster's client config by itself).
//!
//! ```no_run
//! use agora_sdk::{
//!     Client, ClientConfig, Event, FrameworkInfo, Operation, Resources, TaskInfo, TaskState,
//!     WasmModule,
//! };
//! # async fn demo() -> anyhow::Result<()> {
//! let cfg = ClientConfig::discover(None, None)?; // `agora dev` writes one
//! let client = Client::connect(&cfg).await?;
//! let (sha256, size) = client.upload_file("hello.wasm".as_ref()).await?;
//! let mut sched = client
//!     .subscribe(FrameworkInfo {
//!         name: "example".into(),
//!         roles: vec!["batch".into()],
//!         // Tasks survive this long if the framework goes away (then re-subscribe
//!         // with `framework_id: sched.framework_id().into()`).
//!         failover_timeout_seconds: 300.0,
//!         ..Default::default()
//!     })
//!     .await?;
//! // After a failover: ask for the state of every task the master knows.
//! sched.reconcile(vec![]).await?;
//! let want = Resources::cpus_mem(1000, 256 << 20);
//! let mut launched = false;
//! while let Some(ev) = sched.next_event().await {
//!     match ev {
//!         Event::Offers(offers) => {
//!             for offer in offers {
//!                 let have = Resources::from_proto(&offer.resources)?;
//!                 if launched || !have.unreserved().contains(&want) {
//!                     sched.decline(vec![offer.offer_id], Some(30.0)).await?;
//!                     continue;
//!                 }
//!                 // Reserve, then launch on the reservation: one ACCEPT, in order.
//!                 let reserved = want.with_role(&offer.role);
//!                 let task = TaskInfo {
//!                     task_id: "hello-1".into(),
//!                     resources: reserved.to_proto(),
//!                     module: Some(WasmModule { sha256: sha256.clone(), size, ..Default::default() }),
//!                     ..Default::default()
//!                 };
//!                 sched
//!                     .accept_operations(
//!                         vec![offer.offer_id],
//!                         vec![Operation::reserve(&want), Operation::launch(vec![task])],
//!                         None,
//!                     )
//!                     .await?;
//!                 launched = true;
//!             }
//!         }
//!         Event::Update(status) => {
//!             sched.acknowledge(&status).await?;
//!             if status.state().is_terminal() {
//!                 println!("task {} ended: {:?} {}", status.task_id, status.state(), status.message);
//!                 sched.suppress().await?; // no more offers, please
//!                 if status.state() == TaskState::TaskFinished {
//!                     break;
//!                 }
//!             }
//!         }
//!         Event::Rescind(offer_id) => println!("offer {offer_id} was taken back"),
//!         Event::Message { executor_id, data, .. } => {
//!             println!("{executor_id} says {}", String::from_utf8_lossy(&data))
//!         }
//!         Event::Failure { agent_id, executor_id, status, message } => {
//!             println!("failure on {agent_id} ({executor_id:?}, {status:?}): {message}")
//!         }
//!         Event::Error(e) => eprintln!("the master refused a call: {e}"),
//!         // The sdk re-subscribes by itself after a broken connection.
//!         Event::Disconnected(why) => eprintln!("lost the master ({why}); reconnecting"),
//!         Event::Reconnected | Event::Heartbeat => {}
//!     }
//! }
//! sched.teardown().await?;
//! # Ok(()) }
//! ```
//!
//! A runnable version of the same framework is `cargo run -p agora-sdk --example
//! reserve_and_run -- FILE.wasm` (against a running `agora dev`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod error;
mod session;

pub use error::{Error, Result};

use agora_net::tls::{self, Identity};
use agora_net::{read_frame, transfer, write_frame};
use agora_proto::v1::{
    self, call, operator_request, stream_open, OperatorRequest, OperatorResponse, StreamOpen,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use agora_proto::v1::{
    CommandInfo, FrameworkInfo, Offer, TaskInfo, TaskState, TaskStatus, TaskSummary, WasmModule,
};
pub use agora_proto::Resources;

/// Where a client finds the master and its credentials. `agora dev` and
/// `agora certs init` write one as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientConfig {
    /// host:port of the master's QUIC endpoint (the first of `masters`, for a group).
    pub master: String,
    /// host:port of every master of a replicated group; empty for a single master.
    /// Clients dial them all and use the one that leads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masters: Vec<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `http://host:port` of the master's HTTP server (functions), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Talk to the configured master(s) only, never to a leader they name: for a
    /// framework that belongs beside one master (the functions gateway), which
    /// waits while its master follows.
    #[serde(skip)]
    pub local_only: bool,
    /// The file this configuration was read from. A client that cannot reach the
    /// master reads it again before each new attempt, so a master that came back on
    /// another address (and wrote it there) is found.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl ClientConfig {
    /// The config `agora dev` writes when run with its default data directory.
    pub fn default_path() -> Option<PathBuf> {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".agora/dev/client.json"))
    }

    pub fn load(path: &Path) -> Result<ClientConfig> {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::ReadConfig {
            path: path.into(),
            cause,
        })?;
        let mut cfg: ClientConfig =
            serde_json::from_str(&text).map_err(|cause| Error::BadConfig {
                path: path.into(),
                cause,
            })?;
        // Relative certificate paths are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.ca, &mut cfg.cert, &mut cfg.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let write_error = |cause| Error::WriteConfig {
            path: path.into(),
            cause,
        };
        // Fails only on a path that is not UTF-8 (JSON has no bytes).
        let text = serde_json::to_string_pretty(self).map_err(|e| write_error(e.into()))?;
        std::fs::write(path, text + "\n").map_err(write_error)
    }

    /// Finds the config: `config` (from --config), else the file `AGORA_CONFIG`
    /// names, else the one a local `agora dev` wrote. `master` (from --master), else
    /// `AGORA_MASTER`, overrides the address in it. So `discover(None, None)` honours
    /// the same environment as the `agora` CLI.
    pub fn discover(master: Option<&str>, config: Option<&Path>) -> Result<ClientConfig> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let env_config = env("AGORA_CONFIG").map(PathBuf::from);
        let env_master = env("AGORA_MASTER");
        let config = config.or(env_config.as_deref());
        let master = master.or(env_master.as_deref());
        let path = match config {
            Some(p) => p.to_path_buf(),
            None => match Self::default_path() {
                Some(p) if p.exists() => p,
                _ => return Err(Error::NoConfig),
            },
        };
        let mut cfg = Self::load(&path)?;
        if let Some(m) = master {
            // Addresses given by the user are kept: the file is not read again.
            let list: Vec<String> = m
                .split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect();
            cfg.master = list.first().cloned().unwrap_or_default();
            cfg.masters = if list.len() > 1 { list } else { Vec::new() };
            cfg.source = None;
        }
        Ok(cfg)
    }

    /// Every master to dial: `masters`, or `master` alone.
    pub fn master_addrs(&self) -> Result<Vec<SocketAddr>> {
        let list: Vec<&String> = if self.masters.is_empty() {
            vec![&self.master]
        } else {
            self.masters.iter().collect()
        };
        Ok(list
            .into_iter()
            .map(|a| tls::resolve(a))
            .collect::<Result<Vec<_>, _>>()?)
    }
}

/// A connection to the master, for operator requests, uploads and subscribing.
pub struct Client {
    link: std::sync::Arc<session::Link>,
    pub master: SocketAddr,
}

/// What a framework hears from the master (after SUBSCRIBED, which `subscribe`
/// consumes).
#[derive(Debug, Clone)]
pub enum Event {
    /// Resources to ACCEPT or DECLINE; each offer is for one agent and one role.
    Offers(Vec<Offer>),
    /// The offer with this id was taken back (agent lost, role left, offer timeout).
    Rescind(String),
    /// A task's status; acknowledge it with [`Scheduler::acknowledge`].
    Update(TaskStatus),
    /// A message from one of the framework's executors.
    Message {
        agent_id: String,
        executor_id: String,
        data: Vec<u8>,
    },
    /// An agent was removed (`executor_id` None), or an executor's process ended
    /// (`status`: its exit code, when it had one).
    Failure {
        agent_id: String,
        executor_id: Option<String>,
        status: Option<i32>,
        message: String,
    },
    /// A call was refused (the text names what was wrong), or the connection broke.
    Error(String),
    /// The master is alive; sent every `heartbeat_interval` (see
    /// [`Scheduler::heartbeat_interval`]).
    Heartbeat,
    /// The connection to the master broke (the text says how); the scheduler is
    /// dialling it again and re-subscribing. Offers held are void.
    Disconnected(String),
    /// Subscribed again with the same framework id after [`Event::Disconnected`];
    /// implicit reconciliation was asked for, and the agents resend unacknowledged
    /// updates. Reconcile explicitly any task whose launch may not have arrived.
    Reconnected,
}

/// One operation of an ACCEPT (see [`Scheduler::accept_operations`]). Operations
/// run in order on the pooled resources of the offers; each sees what the earlier
/// ones left.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation(v1::Operation);

impl Operation {
    /// Launch tasks, each on its own: one that does not fit or is invalid gets
    /// TASK_ERROR and the others still start.
    pub fn launch(tasks: Vec<TaskInfo>) -> Operation {
        Operation(v1::Operation {
            operation: Some(v1::operation::Operation::Launch(v1::Launch { tasks })),
        })
    }

    /// Launch tasks together in one executor, all or none. `executor_id` empty: the
    /// default executor of the tasks' kind.
    pub fn launch_group(executor_id: &str, tasks: Vec<TaskInfo>) -> Operation {
        Operation(v1::Operation {
            operation: Some(v1::operation::Operation::LaunchGroup(v1::LaunchGroup {
                executor_id: executor_id.into(),
                tasks,
            })),
        })
    }

    /// Reserve unreserved resources of the offer for the offer's role (dynamic
    /// reservation). Later operations of the same accept can use them by role.
    pub fn reserve(resources: &Resources) -> Operation {
        Operation(v1::Operation {
            operation: Some(v1::operation::Operation::Reserve(v1::Reserve {
                resources: resources.to_proto(),
            })),
        })
    }

    /// Give resources of the offer that are dynamically reserved for its role back
    /// to everyone.
    pub fn unreserve(resources: &Resources) -> Operation {
        Operation(v1::Operation {
            operation: Some(v1::operation::Operation::Unreserve(v1::Unreserve {
                resources: resources.to_proto(),
            })),
        })
    }

    pub fn into_proto(self) -> v1::Operation {
        self.0
    }
}

impl Client {
    pub async fn connect(cfg: &ClientConfig) -> Result<Client> {
        let masters = cfg.master_addrs()?;
        let id = Identity::load(&cfg.ca, &cfg.cert, &cfg.key)?;
        let first = *masters.first().ok_or(Error::NoMaster)?;
        let endpoint = tls::client_endpoint(first, &id)?;
        let leader = agora_net::leader::connect_leader(
            &endpoint,
            &masters,
            tls::CONNECT_TIMEOUT,
            !cfg.local_only,
        )
        .await?;
        Ok(Client {
            link: std::sync::Arc::new(session::Link::new(
                endpoint,
                masters,
                leader.addr,
                leader.conn,
                cfg.source.clone(),
                !cfg.local_only,
            )),
            master: leader.addr,
        })
    }

    /// A stream's read failed: when the master closed the connection because of
    /// the certificate's role, its words (which certificate to use), not "lost".
    fn refused_or(&self, e: agora_net::FrameError) -> Error {
        match agora_net::leader::wrong_role_reason(&self.link.current()) {
            Some(why) => Error::RequestRefused(why),
            None => e.into(),
        }
    }

    fn closed_reason(&self) -> String {
        match self.link.current().close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                String::from_utf8_lossy(&c.reason).into_owned()
            }
            Some(e) => e.to_string(),
            None => "the stream was closed".into(),
        }
    }

    /// The master connection, dialled again if it was closed (e.g. the master
    /// restarted since this client connected).
    async fn connection(&self) -> Result<quinn::Connection> {
        let conn = self.link.current();
        if conn.close_reason().is_none() {
            return Ok(conn);
        }
        self.link.redial(&conn).await
    }

    /// A new stream to the master; one redial if the connection turns out broken.
    async fn open_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let conn = self.connection().await?;
        match conn.open_bi().await {
            Ok(s) => Ok(s),
            Err(_) => {
                let conn = self.link.redial(&conn).await?;
                conn.open_bi().await.map_err(Error::ConnectionLost)
            }
        }
    }

    async fn operator(&self, req: operator_request::Request) -> Result<OperatorResponse> {
        let (mut send, mut recv) = self.open_stream().await?;
        let open = StreamOpen {
            kind: Some(stream_open::Kind::Operator(OperatorRequest {
                request: Some(req),
            })),
        };
        write_frame(&mut send, &open).await?;
        send.finish()?;
        let resp: OperatorResponse =
            match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv)).await {
                Err(_) => return Err(Error::NoAnswer),
                Ok(Ok(Some(r))) => r,
                Ok(Ok(None)) => return Err(Error::RequestRefused(self.closed_reason())),
                Ok(Err(e)) => return Err(self.refused_or(e)),
            };
        if !resp.error.is_empty() {
            return Err(Error::Master(resp.error));
        }
        Ok(resp)
    }

    pub async fn list_tasks(&self, all: bool) -> Result<Vec<TaskSummary>> {
        Ok(self
            .operator(operator_request::Request::ListTasks(v1::ListTasks {
                all,
                stats: false,
            }))
            .await?
            .tasks)
    }

    /// Like `list_tasks`, with each task's resource usage: live from the agents for
    /// running tasks, final for finished ones.
    pub async fn list_tasks_with_usage(&self, all: bool) -> Result<Vec<TaskSummary>> {
        Ok(self
            .operator(operator_request::Request::ListTasks(v1::ListTasks {
                all,
                stats: true,
            }))
            .await?
            .tasks)
    }

    pub async fn agents(&self) -> Result<Vec<v1::AgentSummary>> {
        Ok(self
            .operator(operator_request::Request::Cluster(v1::GetCluster {}))
            .await?
            .agents)
    }

    pub async fn kill(&self, task_id: &str) -> Result<()> {
        self.operator(operator_request::Request::Kill(v1::KillTaskRequest {
            task_id: task_id.into(),
        }))
        .await?;
        Ok(())
    }

    /// Marks a disconnected or unreachable agent gone for good (Mesos's
    /// MARK_AGENT_GONE): its tasks end GONE and their frameworks are told; the agent
    /// is refused if it returns. Refused for a connected agent.
    pub async fn mark_agent_gone(&self, agent_id: &str) -> Result<()> {
        self.operator(operator_request::Request::MarkAgentGone(
            v1::MarkAgentGone {
                agent_id: agent_id.into(),
            },
        ))
        .await?;
        Ok(())
    }

    /// Sets a role's weight among its siblings (default 1); the master keeps it in
    /// its registry across restarts.
    pub async fn set_weight(&self, role: &str, weight: f64) -> Result<()> {
        self.operator(operator_request::Request::SetWeight(v1::SetWeight {
            role: role.into(),
            weight,
        }))
        .await?;
        Ok(())
    }

    /// Sets a role's quota (a guarantee and a limit, amounts without roles): the
    /// resources named replace theirs, the others are kept; both empty remove it.
    /// Kept in the master's registry across restarts. Guarantees the registered
    /// agents could not hold are refused unless `force`.
    pub async fn set_quota(
        &self,
        role: &str,
        guarantee: &Resources,
        limit: &Resources,
        force: bool,
    ) -> Result<()> {
        self.operator(operator_request::Request::SetQuota(v1::SetQuota {
            role: role.into(),
            guarantee: guarantee.to_proto(),
            limit: limit.to_proto(),
            force,
        }))
        .await?;
        Ok(())
    }

    /// Weights, quotas and consumption of every known role (or of `role`).
    pub async fn roles(&self, role: &str) -> Result<Vec<v1::RoleSummary>> {
        Ok(self
            .operator(operator_request::Request::Roles(v1::GetRoles {
                role: role.into(),
            }))
            .await?
            .roles)
    }

    /// Why a role gets no offers or why a task waits (or what became of it).
    pub async fn explain(&self, target: &str) -> Result<String> {
        Ok(self
            .operator(operator_request::Request::Explain(v1::Explain {
                target: target.into(),
            }))
            .await?
            .explanation)
    }

    /// Reads up to `length` bytes of a task's `stdout`, `stderr` or sandbox file at
    /// `offset`; returns the bytes and the file's current size.
    pub async fn read_file(
        &self,
        task_id: &str,
        path: &str,
        offset: u64,
        length: u32,
    ) -> Result<(Vec<u8>, u64)> {
        let r = self
            .operator(operator_request::Request::ReadFile(v1::ReadTaskFile {
                task_id: task_id.into(),
                path: path.into(),
                offset,
                length,
            }))
            .await?;
        let f = r.file.unwrap_or_default();
        Ok((f.data, f.size))
    }

    /// Uploads a file to the master's artifact store unless it is there already;
    /// returns its sha256 and size.
    pub async fn upload_file(&self, path: &Path) -> Result<(String, u64)> {
        let (sha, size) = transfer::hash_file(path)
            .await
            .map_err(|cause| Error::ReadFile {
                path: path.into(),
                cause,
            })?;
        self.upload(&sha, size, Upload::File(path)).await?;
        Ok((sha, size))
    }

    pub async fn upload_bytes(&self, bytes: &[u8]) -> Result<(String, u64)> {
        let sha = agora_proto::sha256_hex(bytes);
        self.upload(&sha, bytes.len() as u64, Upload::Bytes(bytes))
            .await?;
        Ok((sha, bytes.len() as u64))
    }

    async fn upload(&self, sha: &str, size: u64, what: Upload<'_>) -> Result<()> {
        let (mut send, mut recv) = self.open_stream().await?;
        let open = StreamOpen {
            kind: Some(stream_open::Kind::Put(v1::ArtifactPut {
                sha256: sha.into(),
                size,
            })),
        };
        write_frame(&mut send, &open).await?;
        let first: v1::ArtifactHeader = read_frame(&mut recv)
            .await
            .map_err(|e| self.refused_or(e))?
            .ok_or_else(|| Error::UploadClosed(self.closed_reason()))?;
        if !first.error.is_empty() {
            return Err(Error::UploadRefused(first.error));
        }
        if first.present {
            let _ = send.finish();
            return Ok(());
        }
        match what {
            Upload::File(p) => transfer::send_file(&mut send, p).await?,
            Upload::Bytes(b) => transfer::send_bytes(&mut send, b).await?,
        }
        send.finish()?;
        let done: v1::ArtifactHeader = read_frame(&mut recv).await?.ok_or(Error::UploadEnded)?;
        if !done.error.is_empty() {
            return Err(Error::UploadFailed(done.error));
        }
        Ok(())
    }

    /// Registers a framework (or re-registers one, when `info.framework_id` is set).
    /// The returned [`Scheduler`] keeps its session across master restarts and
    /// network cuts (see the `session` module): it re-subscribes by itself.
    pub async fn subscribe(&self, info: FrameworkInfo) -> Result<Scheduler> {
        session::subscribe(self.link.clone(), info).await
    }
}

enum Upload<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// A subscribed framework: send calls, receive events.
pub struct Scheduler {
    framework_id: String,
    heartbeat_interval: Duration,
    /// The framework's state records as SUBSCRIBED brought them.
    state: Vec<v1::StateEntry>,
    state_writer: StateWriter,
    calls: mpsc::Sender<v1::Call>,
    events: mpsc::Receiver<Event>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Scheduler {
    pub fn framework_id(&self) -> &str {
        &self.framework_id
    }

    /// How often the master sends HEARTBEAT events (from SUBSCRIBED). Three
    /// intervals of silence count as a broken connection (see `Event::Disconnected`).
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// The framework's state records (see [`StateWriter`]) as the master's registry
    /// held them when this scheduler subscribed: after a master restart, what the
    /// framework stored before it.
    pub fn stored_state(&self) -> &[v1::StateEntry] {
        &self.state
    }

    /// A handle that stores and deletes this framework's state records, usable
    /// beside the event loop (it is cheap to clone).
    pub fn state_writer(&self) -> StateWriter {
        self.state_writer.clone()
    }

    /// The next event; None once the master connection is gone.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    async fn call(&self, c: call::Call) -> Result<()> {
        self.calls
            .send(v1::Call { call: Some(c) })
            .await
            .map_err(|_| Error::Closed)
    }

    /// ACCEPT with one LAUNCH of `tasks`; what they leave is declined for
    /// `refuse_seconds` (default 5 s).
    pub async fn accept(
        &self,
        offer_ids: Vec<String>,
        tasks: Vec<TaskInfo>,
        refuse_seconds: Option<f64>,
    ) -> Result<()> {
        self.accept_operations(offer_ids, vec![Operation::launch(tasks)], refuse_seconds)
            .await
    }

    /// ACCEPT with operations, carried out in order on the offers' pooled resources
    /// (all offers of one agent and one role). What they leave is declined for
    /// `refuse_seconds`.
    pub async fn accept_operations(
        &self,
        offer_ids: Vec<String>,
        operations: Vec<Operation>,
        refuse_seconds: Option<f64>,
    ) -> Result<()> {
        self.call(call::Call::Accept(v1::Accept {
            offer_ids,
            filters: Some(v1::Filters { refuse_seconds }),
            operations: operations.into_iter().map(Operation::into_proto).collect(),
        }))
        .await
    }

    pub async fn decline(&self, offer_ids: Vec<String>, refuse_seconds: Option<f64>) -> Result<()> {
        self.call(call::Call::Decline(v1::Decline {
            offer_ids,
            filters: Some(v1::Filters { refuse_seconds }),
        }))
        .await
    }

    pub async fn kill(&self, task_id: &str) -> Result<()> {
        self.call(call::Call::Kill(v1::Kill {
            task_id: task_id.into(),
        }))
        .await
    }

    /// Acknowledges an update so the agent sends the task's next one. Updates the
    /// master made up itself (no uuid) need none; this does nothing for them.
    pub async fn acknowledge(&self, status: &TaskStatus) -> Result<()> {
        if status.uuid.is_empty() {
            return Ok(());
        }
        self.call(call::Call::Acknowledge(v1::Acknowledge {
            agent_id: status.agent_id.clone(),
            task_id: status.task_id.clone(),
            uuid: status.uuid.clone(),
        }))
        .await
    }

    pub async fn reconcile(&self, task_ids: Vec<String>) -> Result<()> {
        self.call(call::Call::Reconcile(v1::Reconcile { task_ids }))
            .await
    }

    /// REVIVE in every role: offers again, decline filters dropped.
    pub async fn revive(&self) -> Result<()> {
        self.revive_role("").await
    }

    /// REVIVE in one role ("" = every role).
    pub async fn revive_role(&self, role: &str) -> Result<()> {
        self.call(call::Call::Revive(v1::Revive { role: role.into() }))
            .await
    }

    /// SUPPRESS in every role: no offers until REVIVE.
    pub async fn suppress(&self) -> Result<()> {
        self.suppress_role("").await
    }

    /// SUPPRESS in one role ("" = every role).
    pub async fn suppress_role(&self, role: &str) -> Result<()> {
        self.call(call::Call::Suppress(v1::Suppress { role: role.into() }))
            .await
    }

    /// SHUTDOWN an executor: the agent kills its tasks (TASK_KILLED, reason
    /// EXECUTOR_SHUTDOWN) and stops its process.
    pub async fn shutdown_executor(&self, agent_id: &str, executor_id: &str) -> Result<()> {
        self.call(call::Call::Shutdown(v1::Shutdown {
            executor_id: executor_id.into(),
            agent_id: agent_id.into(),
        }))
        .await
    }

    /// MESSAGE an executor (best effort, at most 1 MiB). The built-in executors
    /// append it to the file `messages` at the root of each of their tasks and answer
    /// with an [`Event::Message`] receipt.
    pub async fn message(&self, agent_id: &str, executor_id: &str, data: Vec<u8>) -> Result<()> {
        self.call(call::Call::Message(v1::Message {
            agent_id: agent_id.into(),
            executor_id: executor_id.into(),
            data,
        }))
        .await
    }

    /// UPDATE_FRAMEWORK: new name, roles, failover timeout and offer constraints.
    /// Offers of roles left are rescinded.
    pub async fn update_framework(&self, mut info: FrameworkInfo) -> Result<()> {
        info.framework_id = self.framework_id.clone();
        self.call(call::Call::UpdateFramework(v1::UpdateFramework {
            framework: Some(info),
        }))
        .await
    }

    /// Tells the master which tasks wait for resources, so `agora ps` can say why.
    pub async fn set_pending(&self, tasks: Vec<v1::PendingTask>) -> Result<()> {
        self.call(call::Call::Pending(v1::Pending { tasks })).await
    }

    /// Ends the framework: its tasks are killed and it is forgotten.
    pub async fn teardown(&self) -> Result<()> {
        self.call(call::Call::Teardown(v1::Teardown {})).await
    }

    /// TEARDOWN, then waits (at most `limit`) for the master to close the
    /// framework's connection, which it does once it has acted on it. A process about
    /// to exit calls this rather than [`Scheduler::teardown`], which only queues the
    /// call: exiting at once would cut it off, and the master would keep the
    /// framework (and its tasks) for its failover timeout.
    pub async fn teardown_and_wait(&mut self, limit: Duration) -> Result<()> {
        self.teardown().await?;
        let drained =
            tokio::time::timeout(limit, async { while self.events.recv().await.is_some() {} })
                .await;
        if drained.is_err() {
            return Err(Error::TeardownUnconfirmed(limit));
        }
        Ok(())
    }
}

/// Most a state write waits for the master's STATE_STORED.
const STATE_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Waiters for STATE_STORED (or the ERROR refusing the write), by request id.
pub(crate) type StateWaiters = std::sync::Arc<
    std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Result<u64>>>>,
>;

/// Stores a framework's own small records in the master's registry (SET_STATE):
/// durable across master restarts, handed back in SUBSCRIBED
/// ([`Scheduler::stored_state`]), removed with the framework. Keys have 1 to 256
/// bytes, values at most 256 KiB, and a framework keeps at most 10,000 keys.
#[derive(Clone)]
pub struct StateWriter {
    calls: mpsc::Sender<v1::Call>,
    waiters: StateWaiters,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl StateWriter {
    pub(crate) fn new(calls: mpsc::Sender<v1::Call>, waiters: StateWaiters) -> StateWriter {
        StateWriter {
            calls,
            waiters,
            next: Default::default(),
        }
    }

    /// Stores `value` under `key`; returns once the master has it on disk (its
    /// STATE_STORED sequence number), or the master's reason for refusing it.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        self.set(key, Some(value)).await
    }

    /// Deletes `key` (an absent key too); returns once that is on disk.
    pub async fn delete(&self, key: &str) -> Result<u64> {
        self.set(key, None).await
    }

    async fn set(&self, key: &str, value: Option<Vec<u8>>) -> Result<u64> {
        let request_id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id, tx);
        let forget = || {
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&request_id);
        };
        let call = v1::Call {
            call: Some(call::Call::SetState(v1::SetState {
                key: key.to_string(),
                value,
                request_id,
            })),
        };
        if self.calls.send(call).await.is_err() {
            forget();
            return Err(Error::Closed);
        }
        match tokio::time::timeout(STATE_ACK_TIMEOUT, rx).await {
            Ok(Ok(Ok(seq))) => Ok(seq),
            Ok(Ok(Err(refused))) => Err(refused),
            Ok(Err(_)) => Err(Error::StateSessionEnded { key: key.into() }),
            Err(_) => {
                forget();
                Err(Error::StateTimeout {
                    key: key.into(),
                    timeout: STATE_ACK_TIMEOUT,
                })
            }
        }
    }
}
