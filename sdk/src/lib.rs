//! The Rust library Agora frameworks and operator tools are written with.
//!
//! ```no_run
//! use agora_sdk::{Client, ClientConfig, FrameworkInfo, Event};
//! # async fn demo() -> anyhow::Result<()> {
//! let cfg = ClientConfig::discover(None, None)?;          // `agora dev` writes one
//! let client = Client::connect(&cfg).await?;
//! let (sha, size) = client.upload_file("hello.wasm".as_ref()).await?;
//! let mut sched = client
//!     .subscribe(FrameworkInfo { name: "demo".into(), ..Default::default() })
//!     .await?;
//! while let Some(ev) = sched.next_event().await {
//!     match ev {
//!         Event::Offers(offers) => { /* accept one with a TaskInfo naming `sha` */ }
//!         Event::Update(status) => sched.acknowledge(&status).await?,
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_proto::tls::{self, Identity};
use agora_proto::v1::{
    self, call, event, operator_request, stream_open, OperatorRequest, OperatorResponse, StreamOpen,
};
use agora_proto::{read_frame, transfer, write_frame};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use agora_proto::v1::{FrameworkInfo, Offer, TaskInfo, TaskState, TaskStatus, TaskSummary};
pub use agora_proto::Resources;

/// Where a client finds the master and its credentials. `agora dev` and
/// `agora certs init` write one as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientConfig {
    /// host:port of the master's QUIC endpoint.
    pub master: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClientConfig {
    /// The config `agora dev` writes when run with its default data directory.
    pub fn default_path() -> Option<PathBuf> {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".agora/dev/client.json"))
    }

    pub fn load(path: &Path) -> anyhow::Result<ClientConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the client config {}", path.display()))?;
        let mut cfg: ClientConfig = serde_json::from_str(&text).with_context(|| {
            format!(
                "the client config {} is not valid JSON of the expected shape",
                path.display()
            )
        })?;
        // Relative certificate paths are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.ca, &mut cfg.cert, &mut cfg.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Finds the config: `config` (from --config or AGORA_CONFIG), else the one a
    /// local `agora dev` wrote. `master` (from --master or AGORA_MASTER) overrides the
    /// address in it.
    pub fn discover(master: Option<&str>, config: Option<&Path>) -> anyhow::Result<ClientConfig> {
        let path = match config {
            Some(p) => p.to_path_buf(),
            None => match Self::default_path() {
                Some(p) if p.exists() => p,
                _ => anyhow::bail!(
                    "no client config found: start a cluster with `agora dev` (it writes ~/.agora/dev/client.json), \
                     or pass --config FILE / set AGORA_CONFIG"
                ),
            },
        };
        let mut cfg = Self::load(&path)?;
        if let Some(m) = master {
            cfg.master = m.to_string();
        }
        Ok(cfg)
    }
}

/// A connection to the master, for operator requests, uploads and subscribing.
pub struct Client {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
    pub master: SocketAddr,
}

/// What a framework hears from the master.
#[derive(Debug, Clone)]
pub enum Event {
    Offers(Vec<Offer>),
    Rescind(String),
    Update(TaskStatus),
    Error(String),
    Failure { agent_id: String, message: String },
    Heartbeat,
}

impl Client {
    pub async fn connect(cfg: &ClientConfig) -> anyhow::Result<Client> {
        let master = tls::resolve(&cfg.master)?;
        let id = Identity::load(&cfg.ca, &cfg.cert, &cfg.key)?;
        let endpoint = tls::client_endpoint(master, &id)?;
        let conn = tls::connect(&endpoint, master).await?;
        Ok(Client {
            conn,
            _endpoint: endpoint,
            master,
        })
    }

    fn closed_reason(&self) -> String {
        match self.conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                String::from_utf8_lossy(&c.reason).into_owned()
            }
            Some(e) => e.to_string(),
            None => "the stream was closed".into(),
        }
    }

    async fn operator(&self, req: operator_request::Request) -> anyhow::Result<OperatorResponse> {
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| anyhow::anyhow!("master connection lost: {e}"))?;
        let open = StreamOpen {
            kind: Some(stream_open::Kind::Operator(OperatorRequest {
                request: Some(req),
            })),
        };
        write_frame(&mut send, &open).await?;
        send.finish()?;
        let resp: OperatorResponse =
            tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv))
                .await
                .map_err(|_| anyhow::anyhow!("the master did not answer within 30 s"))??
                .ok_or_else(|| {
                    anyhow::anyhow!("the master refused the request: {}", self.closed_reason())
                })?;
        if !resp.error.is_empty() {
            anyhow::bail!("{}", resp.error);
        }
        Ok(resp)
    }

    pub async fn list_tasks(&self, all: bool) -> anyhow::Result<Vec<TaskSummary>> {
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
    pub async fn list_tasks_with_usage(&self, all: bool) -> anyhow::Result<Vec<TaskSummary>> {
        Ok(self
            .operator(operator_request::Request::ListTasks(v1::ListTasks {
                all,
                stats: true,
            }))
            .await?
            .tasks)
    }

    pub async fn agents(&self) -> anyhow::Result<Vec<v1::AgentSummary>> {
        Ok(self
            .operator(operator_request::Request::Cluster(v1::GetCluster {}))
            .await?
            .agents)
    }

    pub async fn kill(&self, task_id: &str) -> anyhow::Result<()> {
        self.operator(operator_request::Request::Kill(v1::KillTaskRequest {
            task_id: task_id.into(),
        }))
        .await?;
        Ok(())
    }

    /// Reads up to `length` bytes of a task's `stdout`, `stderr` or sandbox file at
    /// `offset`; returns the bytes and the file's current size.
    pub async fn read_file(
        &self,
        task_id: &str,
        path: &str,
        offset: u64,
        length: u32,
    ) -> anyhow::Result<(Vec<u8>, u64)> {
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
    pub async fn upload_file(&self, path: &Path) -> anyhow::Result<(String, u64)> {
        let (sha, size) = transfer::hash_file(path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        self.upload(&sha, size, Upload::File(path)).await?;
        Ok((sha, size))
    }

    pub async fn upload_bytes(&self, bytes: &[u8]) -> anyhow::Result<(String, u64)> {
        let sha = agora_proto::sha256_hex(bytes);
        self.upload(&sha, bytes.len() as u64, Upload::Bytes(bytes))
            .await?;
        Ok((sha, bytes.len() as u64))
    }

    async fn upload(&self, sha: &str, size: u64, what: Upload<'_>) -> anyhow::Result<()> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let open = StreamOpen {
            kind: Some(stream_open::Kind::Put(v1::ArtifactPut {
                sha256: sha.into(),
                size,
            })),
        };
        write_frame(&mut send, &open).await?;
        let first: v1::ArtifactHeader = read_frame(&mut recv).await?.ok_or_else(|| {
            anyhow::anyhow!("the master refused the upload: {}", self.closed_reason())
        })?;
        if !first.error.is_empty() {
            anyhow::bail!("upload refused: {}", first.error);
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
        let done: v1::ArtifactHeader = read_frame(&mut recv)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the master closed the upload stream"))?;
        if !done.error.is_empty() {
            anyhow::bail!("{}", done.error);
        }
        Ok(())
    }

    /// Registers a framework (or re-registers one, when `info.framework_id` is set).
    pub async fn subscribe(&self, info: FrameworkInfo) -> anyhow::Result<Scheduler> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let open = StreamOpen {
            kind: Some(stream_open::Kind::Scheduler(v1::SchedulerHello {
                framework: Some(info),
            })),
        };
        write_frame(&mut send, &open).await?;
        let first: v1::Event = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv))
            .await
            .map_err(|_| anyhow::anyhow!("the master did not answer SUBSCRIBE within 30 s"))??
            .ok_or_else(|| {
                anyhow::anyhow!("the master refused SUBSCRIBE: {}", self.closed_reason())
            })?;
        let sub = match first.event {
            Some(event::Event::Subscribed(s)) => s,
            Some(event::Event::Error(e)) => anyhow::bail!("SUBSCRIBE refused: {}", e.message),
            other => anyhow::bail!("unexpected first event from the master: {other:?}"),
        };
        let (call_tx, mut call_rx) = mpsc::channel::<v1::Call>(1024);
        let (ev_tx, ev_rx) = mpsc::channel::<Event>(1024);
        let writer = tokio::spawn(async move {
            while let Some(c) = call_rx.recv().await {
                if agora_proto::write_queued(&mut send, c, &mut call_rx)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = send.finish();
        });
        let reader = tokio::spawn(async move {
            loop {
                let ev: v1::Event = match read_frame(&mut recv).await {
                    Ok(Some(e)) => e,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = ev_tx
                            .send(Event::Error(format!("connection to the master broke: {e}")))
                            .await;
                        break;
                    }
                };
                let ev = match ev.event {
                    Some(event::Event::Offers(o)) => Event::Offers(o.offers),
                    Some(event::Event::Rescind(r)) => Event::Rescind(r.offer_id),
                    Some(event::Event::Update(u)) => match u.status {
                        Some(s) => Event::Update(s),
                        None => continue,
                    },
                    Some(event::Event::Error(e)) => Event::Error(e.message),
                    Some(event::Event::Heartbeat(_)) => Event::Heartbeat,
                    Some(event::Event::Failure(f)) => Event::Failure {
                        agent_id: f.agent_id,
                        message: f.message,
                    },
                    Some(event::Event::Subscribed(_)) | None => continue,
                };
                if ev_tx.send(ev).await.is_err() {
                    break;
                }
            }
        });
        Ok(Scheduler {
            framework_id: sub.framework_id,
            calls: call_tx,
            events: ev_rx,
            tasks: vec![writer, reader],
        })
    }
}

enum Upload<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// A subscribed framework: send calls, receive events.
pub struct Scheduler {
    framework_id: String,
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

    /// The next event; None once the master connection is gone.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    async fn call(&self, c: call::Call) -> anyhow::Result<()> {
        self.calls
            .send(v1::Call { call: Some(c) })
            .await
            .map_err(|_| anyhow::anyhow!("the connection to the master is closed"))
    }

    pub async fn accept(
        &self,
        offer_ids: Vec<String>,
        launch: Vec<TaskInfo>,
        refuse_seconds: Option<f64>,
    ) -> anyhow::Result<()> {
        self.call(call::Call::Accept(v1::Accept {
            offer_ids,
            launch,
            filters: Some(v1::Filters { refuse_seconds }),
        }))
        .await
    }

    pub async fn decline(
        &self,
        offer_ids: Vec<String>,
        refuse_seconds: Option<f64>,
    ) -> anyhow::Result<()> {
        self.call(call::Call::Decline(v1::Decline {
            offer_ids,
            filters: Some(v1::Filters { refuse_seconds }),
        }))
        .await
    }

    pub async fn kill(&self, task_id: &str) -> anyhow::Result<()> {
        self.call(call::Call::Kill(v1::Kill {
            task_id: task_id.into(),
        }))
        .await
    }

    /// Acknowledges an update so the agent sends the task's next one. Updates the
    /// master made up itself (no uuid) need none; this does nothing for them.
    pub async fn acknowledge(&self, status: &TaskStatus) -> anyhow::Result<()> {
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

    pub async fn reconcile(&self, task_ids: Vec<String>) -> anyhow::Result<()> {
        self.call(call::Call::Reconcile(v1::Reconcile { task_ids }))
            .await
    }

    pub async fn revive(&self) -> anyhow::Result<()> {
        self.call(call::Call::Revive(v1::Revive {
            role: String::new(),
        }))
        .await
    }

    pub async fn suppress(&self) -> anyhow::Result<()> {
        self.call(call::Call::Suppress(v1::Suppress {
            role: String::new(),
        }))
        .await
    }

    /// Tells the master which tasks wait for resources, so `agora ps` can say why.
    pub async fn set_pending(&self, tasks: Vec<v1::PendingTask>) -> anyhow::Result<()> {
        self.call(call::Call::Pending(v1::Pending { tasks })).await
    }

    /// Ends the framework: its tasks are killed and it is forgotten.
    pub async fn teardown(&self) -> anyhow::Result<()> {
        self.call(call::Call::Teardown(v1::Teardown {})).await
    }
}
