//! A framework's session with the master, kept across master restarts and network
//! cuts: when the connection breaks (an error, or three heartbeat intervals of
//! silence), the session dials the master again with backoff, re-subscribes with the
//! same framework id, asks for implicit reconciliation, and goes on. The framework
//! sees [`Event::Disconnected`] and [`Event::Reconnected`] and nothing else changes:
//! its [`Scheduler`] keeps working, and the agents resend every unacknowledged update.
//!
//! Calls made while disconnected wait in the bounded call queue. ACCEPTs and DECLINEs
//! among them name offers the master has taken back, so they are dropped; the tasks
//! such an ACCEPT would have launched come back as TASK_DROPPED updates (Mesos's
//! "transient failure, launch again").
//!
//! The session ends, without redialling, when the master closes the stream on
//! purpose (TEARDOWN, another connection took the framework over, SUBSCRIBE refused)
//! or when the master cannot be reached again within the framework's failover
//! timeout (after which the master has removed it anyway).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_net::{leader, tls};
use agora_net::{read_frame, write_frame, FrameBatch};
use agora_proto::v1::{self, call, event, stream_open, FrameworkInfo, StreamOpen};
use tokio::sync::mpsc;

use crate::{Error, Event, Result, Scheduler, StateWaiters, StateWriter};

/// The client's connection to the leading master, replaced by a fresh one when it
/// breaks (or the master stops leading).
pub(crate) struct Link {
    endpoint: quinn::Endpoint,
    /// Every master to dial: the configured addresses, or those its configuration
    /// file says now (see `redial`).
    masters: std::sync::Mutex<Vec<SocketAddr>>,
    /// The configuration file, read again when no master can be reached.
    config: Option<std::path::PathBuf>,
    /// Follow a master's word on who leads to an address not configured.
    follow: bool,
    conn: std::sync::Mutex<quinn::Connection>,
    /// One redial at a time; the others use its result.
    redial: tokio::sync::Mutex<()>,
}

impl Link {
    pub(crate) fn new(
        endpoint: quinn::Endpoint,
        masters: Vec<SocketAddr>,
        leader: SocketAddr,
        conn: quinn::Connection,
        config: Option<std::path::PathBuf>,
        follow: bool,
    ) -> Link {
        let mut masters = masters;
        if !masters.contains(&leader) {
            masters.push(leader);
        }
        Link {
            endpoint,
            masters: std::sync::Mutex::new(masters),
            config,
            follow,
            conn: std::sync::Mutex::new(conn),
            redial: tokio::sync::Mutex::new(()),
        }
    }

    fn masters(&self) -> Vec<SocketAddr> {
        self.masters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The masters' addresses in the configuration file now, if the client has a
    /// file and it names others than those dialled (a master restarted on another
    /// port, say). A file that cannot be read changes nothing.
    fn moved(&self) -> Option<Vec<SocketAddr>> {
        let path = self.config.as_ref()?;
        let cfg = match crate::ClientConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("cannot read the client configuration again: {e}");
                return None;
            }
        };
        let addrs = match cfg.master_addrs() {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!("the client configuration names no usable master: {e}");
                return None;
            }
        };
        (addrs != self.masters()).then_some(addrs)
    }

    pub(crate) fn current(&self) -> quinn::Connection {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A working connection to the leader in place of `broken` (dialled once for
    /// all callers).
    pub(crate) async fn redial(&self, broken: &quinn::Connection) -> Result<quinn::Connection> {
        let _one = self.redial.lock().await;
        let cur = self.current();
        if cur.stable_id() != broken.stable_id() && cur.close_reason().is_none() {
            return Ok(cur);
        }
        broken.close(0u32.into(), b"reconnecting");
        let masters = self.masters();
        let fresh = match leader::connect_leader(
            &self.endpoint,
            &masters,
            tls::CONNECT_TIMEOUT,
            self.follow,
        )
        .await
        {
            Ok(l) => l.conn,
            Err(e) => {
                // Before giving up on this attempt: have the masters moved?
                let Some(moved) = self.moved() else {
                    return Err(e.into());
                };
                tracing::info!(from = ?masters, to = ?moved, "the client configuration names other master addresses; dialling them");
                let l = leader::connect_leader(
                    &self.endpoint,
                    &moved,
                    tls::CONNECT_TIMEOUT,
                    self.follow,
                )
                .await?;
                *self.masters.lock().unwrap_or_else(|e| e.into_inner()) = moved;
                l.conn
            }
        };
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        Ok(fresh)
    }
}

/// Why opening a scheduler stream did not give a session.
enum OpenError {
    /// The master answered and said no: do not try again.
    Refused(String),
    /// The connection failed: try again later.
    Broken(String),
}

struct Session {
    send: quinn::SendStream,
    /// Taken by the session's reader.
    recv: Option<quinn::RecvStream>,
    sub: v1::Subscribed,
}

/// SUBSCRIBE on a new stream of `conn`; waits (bounded) for SUBSCRIBED.
async fn open(
    conn: &quinn::Connection,
    info: &FrameworkInfo,
) -> std::result::Result<Session, OpenError> {
    let broken = |e: &dyn std::fmt::Display| OpenError::Broken(e.to_string());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| broken(&e))?;
    let open = StreamOpen {
        kind: Some(stream_open::Kind::Scheduler(v1::SchedulerHello {
            framework: Some(info.clone()),
        })),
    };
    write_frame(&mut send, &open)
        .await
        .map_err(|e| broken(&e))?;
    let first: Option<v1::Event> =
        match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv)).await {
            Err(_) => {
                return Err(OpenError::Broken(
                    "the master did not answer SUBSCRIBE within 30 s".into(),
                ))
            }
            Ok(r) => r.map_err(|e| match agora_net::leader::wrong_role_reason(conn) {
                // No redial helps: the certificate is the wrong one.
                Some(why) => OpenError::Refused(format!("SUBSCRIBE refused: {why}")),
                None => broken(&e),
            })?,
        };
    match first.and_then(|e| e.event) {
        Some(event::Event::Subscribed(sub)) => Ok(Session {
            send,
            recv: Some(recv),
            sub,
        }),
        // The master's words already say what was refused.
        Some(event::Event::Error(e)) if e.message.starts_with("SUBSCRIBE refused") => {
            Err(OpenError::Refused(e.message))
        }
        Some(event::Event::Error(e)) => Err(OpenError::Refused(format!(
            "SUBSCRIBE refused: {}",
            e.message
        ))),
        Some(other) => Err(OpenError::Refused(format!(
            "unexpected first event from the master: {other:?}"
        ))),
        None => match conn.close_reason() {
            Some(e) => Err(broken(&e)),
            None => Err(OpenError::Refused(
                "the master closed the stream without answering SUBSCRIBE".into(),
            )),
        },
    }
}

/// The wire event as the framework sees it; None for events it never sees.
fn convert(ev: v1::Event) -> Option<Event> {
    Some(match ev.event? {
        event::Event::Offers(o) => Event::Offers(o.offers),
        event::Event::Rescind(r) => Event::Rescind(r.offer_id),
        event::Event::Update(u) => Event::Update(u.status?),
        event::Event::Error(e) => Event::Error(e.message),
        event::Event::Heartbeat(_) => Event::Heartbeat,
        event::Event::Failure(f) => Event::Failure {
            agent_id: f.agent_id,
            executor_id: (!f.executor_id.is_empty()).then_some(f.executor_id),
            status: f.status,
            message: f.message,
        },
        event::Event::Message(m) => Event::Message {
            agent_id: m.agent_id,
            executor_id: m.executor_id,
            data: m.data,
        },
        event::Event::Subscribed(_) | event::Event::StateStored(_) => return None,
    })
}

/// Hands STATE_STORED, and the ERROR refusing a SET_STATE, to the [`StateWriter`]
/// call waiting for it; other events go on to the framework.
fn settle_state_write(ev: v1::Event, waiters: &StateWaiters) -> Option<v1::Event> {
    let (request_id, answer) = match &ev.event {
        Some(event::Event::StateStored(s)) => (s.request_id, Ok(s.seq)),
        Some(event::Event::Error(e)) if e.request_id != 0 => {
            (e.request_id, Err(Error::StateRefused(e.message.clone())))
        }
        _ => return Some(ev),
    };
    let waiter = waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&request_id);
    match waiter {
        Some(tx) => {
            let _ = tx.send(answer);
            None
        }
        // Nobody waits any more (timed out): an error still reaches the framework.
        None => answer.err().map(|_| ev),
    }
}

/// Silence after which the master (or the path to it) counts as gone.
fn silence_limit(sub: &v1::Subscribed) -> Duration {
    if sub.master_silence_ms > 0 {
        return Duration::from_millis(sub.master_silence_ms.clamp(500, 600_000));
    }
    // An interval of 0: the master sends no heartbeats; no limit then.
    Duration::from_millis(if sub.heartbeat_interval_ms == 0 {
        365 * 86_400_000
    } else {
        sub.heartbeat_interval_ms.max(100).saturating_mul(3)
    })
}

/// Subscribes and starts the session task; the first SUBSCRIBE's failure is the
/// caller's error.
pub(crate) async fn subscribe(link: Arc<Link>, mut info: FrameworkInfo) -> Result<Scheduler> {
    let conn = link.current();
    let first = match open(&conn, &info).await {
        Ok(s) => s,
        Err(OpenError::Refused(m)) => return Err(Error::Subscribe(m)),
        Err(OpenError::Broken(_)) => {
            // The client's connection may be stale (e.g. the master restarted since).
            let conn = link.redial(&conn).await?;
            match open(&conn, &info).await {
                Ok(s) => s,
                Err(OpenError::Refused(m) | OpenError::Broken(m)) => {
                    return Err(Error::Subscribe(m))
                }
            }
        }
    };
    info.framework_id = first.sub.framework_id.clone();
    let framework_id = first.sub.framework_id.clone();
    let heartbeat_interval = Duration::from_millis(first.sub.heartbeat_interval_ms);
    let (call_tx, call_rx) = mpsc::channel::<v1::Call>(1024);
    let (ev_tx, ev_rx) = mpsc::channel::<Event>(1024);
    let waiters = StateWaiters::default();
    let state = first.sub.state.clone();
    let state_writer = StateWriter::new(call_tx.clone(), waiters.clone());
    let driver = tokio::spawn(drive(link, info, conn, first, call_rx, ev_tx, waiters));
    Ok(Scheduler {
        framework_id,
        heartbeat_interval,
        state,
        state_writer,
        calls: call_tx,
        events: ev_rx,
        tasks: vec![driver],
    })
}

/// How one connection's session ended.
enum End {
    /// The master closed the stream on purpose, or the framework went away.
    Done,
    /// The connection broke: dial again.
    Broken(String),
}

async fn drive(
    link: Arc<Link>,
    info: FrameworkInfo,
    mut conn: quinn::Connection,
    mut session: Session,
    mut calls: mpsc::Receiver<v1::Call>,
    events: mpsc::Sender<Event>,
    waiters: StateWaiters,
) {
    let failover = Duration::from_secs_f64(if info.failover_timeout_seconds > 0.0 {
        info.failover_timeout_seconds.min(365.0 * 86_400.0)
    } else {
        60.0
    });
    let mut torn_down = false;
    let mut resend: Vec<v1::Call> = Vec::new();
    loop {
        let end = run(
            &mut session,
            &mut calls,
            &events,
            &mut torn_down,
            std::mem::take(&mut resend),
            &waiters,
        )
        .await;
        let why = match end {
            End::Done => return,
            End::Broken(_) if torn_down => return,
            End::Broken(why) => why,
        };
        tracing::warn!(framework = %info.framework_id, "connection to the master lost ({why}); reconnecting");
        if events.send(Event::Disconnected(why.clone())).await.is_err() {
            return;
        }
        let give_up = Instant::now() + failover;
        let mut backoff = Duration::from_millis(100);
        session = loop {
            let attempt = match link.redial(&conn).await {
                Ok(c) => {
                    conn = c;
                    open(&conn, &info).await
                }
                Err(e) => Err(OpenError::Broken(format!("{e:#}"))),
            };
            match attempt {
                Ok(s) => break s,
                Err(OpenError::Refused(m)) => {
                    let _ = events.send(Event::Error(m)).await;
                    return;
                }
                Err(OpenError::Broken(m)) => {
                    if Instant::now() >= give_up {
                        let _ = events
                            .send(Event::Error(format!(
                                "could not reach the master again within the failover timeout ({}): {m}",
                                agora_proto::units::format_duration(failover)
                            )))
                            .await;
                        return;
                    }
                    tracing::debug!("master still unreachable ({m}); retrying in {backoff:?}");
                }
            }
            tokio::time::sleep(backoff).await; // redial backoff
            backoff = (backoff * 2).min(Duration::from_secs(2));
        };
        // Calls queued meanwhile: offers they name are gone.
        let mut dropped = Vec::new();
        while let Ok(c) = calls.try_recv() {
            match &c.call {
                Some(call::Call::Accept(a)) => dropped.extend(launched(a)),
                Some(call::Call::Decline(_)) => {}
                _ => resend.push(c),
            }
        }
        // Implicit reconciliation: the latest state of every task the master knows.
        resend.insert(
            0,
            v1::Call {
                call: Some(call::Call::Reconcile(v1::Reconcile { task_ids: vec![] })),
            },
        );
        if events.send(Event::Reconnected).await.is_err() {
            return;
        }
        for t in dropped {
            let st = v1::TaskStatus {
                task_id: t,
                state: v1::TaskState::TaskDropped as i32,
                message: "the connection to the master broke before this launch reached it; launch it again".into(),
                timestamp_ms: agora_net::unix_millis(),
                ..Default::default()
            };
            if events.send(Event::Update(st)).await.is_err() {
                return;
            }
        }
    }
}

/// Task ids an ACCEPT launches.
fn launched(a: &v1::Accept) -> Vec<String> {
    a.operations
        .iter()
        .filter_map(|op| op.operation.as_ref())
        .flat_map(|op| match op {
            v1::operation::Operation::Launch(l) => {
                l.tasks.iter().map(|t| t.task_id.clone()).collect()
            }
            v1::operation::Operation::LaunchGroup(g) => {
                g.tasks.iter().map(|t| t.task_id.clone()).collect()
            }
            _ => Vec::new(),
        })
        .collect()
}

/// One connection's session: calls out, events in, until it ends.
async fn run(
    session: &mut Session,
    calls: &mut mpsc::Receiver<v1::Call>,
    events: &mpsc::Sender<Event>,
    torn_down: &mut bool,
    first: Vec<v1::Call>,
    waiters: &StateWaiters,
) -> End {
    let silence = silence_limit(&session.sub);
    // The reader runs on its own (a frame read must never be cut in half); what it
    // reads comes through a small channel.
    let (frames_tx, mut frames) = mpsc::channel::<std::result::Result<v1::Event, End>>(64);
    let Some(mut recv) = session.recv.take() else {
        return End::Broken("internal: a session's stream was read twice".into());
    };
    let reader = tokio::spawn(async move {
        loop {
            let r = match tokio::time::timeout(silence, read_frame::<_, v1::Event>(&mut recv)).await
            {
                Ok(Ok(Some(e))) => Ok(e),
                Ok(Ok(None)) => Err(End::Done),
                Ok(Err(e)) => Err(End::Broken(format!("connection to the master broke: {e}"))),
                Err(_) => Err(End::Broken(format!(
                    "no heartbeat from the master for {silence:?}"
                ))),
            };
            let last = r.is_err();
            if frames_tx.send(r).await.is_err() || last {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let send = &mut session.send;
    let mut pending = first;
    loop {
        if !pending.is_empty() {
            let batch = std::mem::take(&mut pending);
            if let Err(why) = write_calls(send, &batch, silence, torn_down).await {
                return End::Broken(why);
            }
        }
        tokio::select! {
            c = calls.recv() => match c {
                Some(c) => {
                    pending.push(c);
                    while pending.len() < 256 {
                        match calls.try_recv() {
                            Ok(c) => pending.push(c),
                            Err(_) => break,
                        }
                    }
                }
                None => {
                    // The Scheduler was dropped.
                    let _ = send.finish();
                    return End::Done;
                }
            },
            f = frames.recv() => match f {
                Some(Ok(ev)) => {
                    if let Some(ev) = settle_state_write(ev, waiters) {
                    if let Some(ev) = convert(ev) {
                        if events.send(ev).await.is_err() {
                            let _ = send.finish();
                            return End::Done;
                        }
                    }
                    }
                }
                Some(Err(end)) => return end,
                None => return End::Broken("the master connection's reader stopped".into()),
            },
        }
    }
}

async fn write_calls(
    send: &mut quinn::SendStream,
    batch: &[v1::Call],
    limit: Duration,
    torn_down: &mut bool,
) -> std::result::Result<(), String> {
    let mut frames = FrameBatch::new();
    for c in batch {
        if matches!(c.call, Some(call::Call::Teardown(_))) {
            *torn_down = true;
        }
        frames
            .push(c)
            .map_err(|e| format!("cannot encode a call: {e}"))?;
    }
    match tokio::time::timeout(limit, frames.write_to(send)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot send to the master: {e}")),
        Err(_) => Err(format!("the master took no calls for {limit:?}")),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
