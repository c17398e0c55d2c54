//! Finding the leading master of a group. Only the leader serves agents, frameworks,
//! operators and uploads; any master answers a `LeaderQuery` with what it knows of
//! the leader. A master that is not (or stops being) the leader closes connections
//! that open leader-only streams with [`NOT_LEADER_CODE`] and the leader's address,
//! when it knows it, as the reason.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use agora_proto::v1::{stream_open, LeaderInfo, LeaderQuery, StreamOpen};

use crate::error::{Error, Result};
use crate::{read_frame, tls, write_frame};

/// Application error code of a connection closed because its master does not lead.
pub const NOT_LEADER_CODE: u32 = 9;
/// Close code of a connection whose certificate's role may not open the stream it
/// opened; the reason says which certificate to use.
pub const WRONG_ROLE_CODE: u32 = 4;

/// The master's words when it closed `conn` because of the certificate's role.
pub fn wrong_role_reason(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(WRONG_ROLE_CODE) =>
        {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    }
}

/// How soon a follower that knows no leader is asked again.
const REQUERY: Duration = Duration::from_millis(100);

/// How long a master may take to answer a `LeaderQuery` on an open connection.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the master at the other end of `conn` who leads.
pub async fn query(conn: &quinn::Connection) -> Result<LeaderInfo> {
    let ask = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| Error::Connect(format!("the master at {}: {e}", conn.remote_address())))?;
        let open = StreamOpen {
            kind: Some(stream_open::Kind::Leader(LeaderQuery {})),
        };
        write_frame(&mut send, &open).await?;
        send.finish().map_err(|e| Error::Connect(e.to_string()))?;
        let info: Option<LeaderInfo> = read_frame(&mut recv).await?;
        info.ok_or_else(|| {
            Error::Connect(format!(
                "the master at {} closed the stream without saying who leads (an older master?)",
                conn.remote_address()
            ))
        })
    };
    match tokio::time::timeout(QUERY_TIMEOUT, ask).await {
        Ok(r) => r,
        Err(_) => Err(Error::NoAnswer {
            addr: conn.remote_address(),
            timeout: QUERY_TIMEOUT,
        }),
    }
}

/// Dials the master at `addr`, asks who leads, and closes the connection; each step
/// within `timeout`. For asking several masters, one each (`agora masters`, peers
/// probing each other).
pub async fn ask(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<LeaderInfo> {
    let conn = tls::connect_within(endpoint, addr, timeout).await?;
    let info = tokio::time::timeout(timeout, query(&conn))
        .await
        .unwrap_or_else(|_| {
            Err(Error::Connect(format!(
                "the master at {addr} did not say who leads within {timeout:?}"
            )))
        });
    conn.close(0u32.into(), b"asked who leads");
    info
}

/// The leader a closed connection named, if it was closed for not leading: its QUIC
/// address, or None while the master knew of no leader.
pub fn not_leader(e: &quinn::ConnectionError) -> Option<Option<String>> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(NOT_LEADER_CODE) =>
        {
            let hint = String::from_utf8_lossy(&c.reason).trim().to_string();
            Some((!hint.is_empty()).then_some(hint))
        }
        _ => None,
    }
}

/// The leading master found by [`connect_leader`].
pub struct Leader {
    pub conn: quinn::Connection,
    pub addr: SocketAddr,
    pub info: LeaderInfo,
}

/// Dials every master in `addrs` at once (a dead one only times out, so one at a
/// time would cost `timeout` each), asks each who leads, follows a hint to a leader
/// not in the list (unless `follow` is false), and returns the connection to the
/// one that leads. Fails when none leads (an election is on: try again shortly) or
/// none answers.
pub async fn connect_leader(
    endpoint: &quinn::Endpoint,
    addrs: &[SocketAddr],
    timeout: Duration,
    follow: bool,
) -> Result<Leader> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tried: HashSet<SocketAddr> = HashSet::new();
    let mut attempts = tokio::task::JoinSet::new();
    let dial = |attempts: &mut tokio::task::JoinSet<_>, addr: SocketAddr| {
        let endpoint = endpoint.clone();
        attempts.spawn(async move {
            let r = async {
                let conn = tls::connect_within(&endpoint, addr, timeout).await?;
                let info = query(&conn).await?;
                Ok::<_, Error>((conn, info))
            }
            .await;
            (addr, r)
        });
    };
    // A follower that knows no live leader is asked again shortly: an election
    // ends within about a second, and a client started meanwhile should just work.
    let again =
        |attempts: &mut tokio::task::JoinSet<_>, addr: SocketAddr, conn: quinn::Connection| {
            attempts.spawn(async move {
                tokio::time::sleep(REQUERY).await;
                let r = query(&conn).await.map(|info| (conn, info));
                (addr, r)
            });
        };
    for a in addrs {
        if tried.insert(*a) {
            dial(&mut attempts, *a);
        }
    }
    let mut failures = Vec::new();
    let mut followers = std::collections::BTreeMap::new();
    // The highest term a follower reported: a master that still says it leads in an
    // older term was deposed and has not noticed yet (it stops within its lease).
    let mut newest_term = 0u64;
    while let Some(done) = attempts.join_next().await {
        let Ok((addr, r)) = done else { continue };
        match r {
            Ok((conn, info)) if info.leading && info.term < newest_term => {
                conn.close(0u32.into(), b"deposed");
                failures.push((
                    addr,
                    Error::Connect(format!(
                        "{addr} says it leads in term {}, but another master is in term {newest_term}",
                        info.term
                    )),
                ));
            }
            Ok((conn, info)) if info.leading => {
                attempts.abort_all();
                return Ok(Leader { conn, addr, info });
            }
            Ok((conn, info)) => {
                newest_term = newest_term.max(info.term);
                followers.insert(
                    addr,
                    format!(
                        "{addr} follows ({})",
                        if info.leader_quic.is_empty() {
                            "no leader yet".to_string()
                        } else {
                            format!("leader {}", info.leader_quic)
                        }
                    ),
                );
                let hint = tls::resolve(&info.leader_quic).ok();
                match hint {
                    Some(h) if follow && tried.insert(h) => dial(&mut attempts, h),
                    _ => {}
                }
                if tokio::time::Instant::now() + REQUERY < deadline {
                    again(&mut attempts, addr, conn);
                } else {
                    conn.close(0u32.into(), b"not the leader");
                }
            }
            Err(e) => {
                followers.remove(&addr);
                failures.push((addr, e));
            }
        }
    }
    let followers: Vec<String> = followers.into_values().collect();
    if followers.is_empty() && failures.len() == 1 {
        // One master, unreachable: its own words say it best.
        return Err(failures.remove(0).1);
    }
    Err(Error::NoLeader(
        followers
            .into_iter()
            .chain(failures.into_iter().map(|(a, e)| format!("{a}: {e}")))
            .collect::<Vec<_>>()
            .join("; "),
    ))
}
