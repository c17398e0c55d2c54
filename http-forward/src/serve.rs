//! The one accept loop of Agora's HTTP front doors (the master's and each agent's):
//! connections are admitted against caps (in all and per client address) before a
//! byte is read, a request's head must arrive whole within [`HEADER_TIMEOUT`] (which
//! also closes a kept-alive connection left idle that long: slowloris), heads are
//! bounded in size and in number of headers, and every connection is served on a
//! task of its own, so one that misbehaves costs only itself.

use std::net::SocketAddr;
use std::time::Duration;

use agora_net::gate::Gate;
use axum::extract::ConnectInfo;
use tower::ServiceExt as _;

/// How long a client may take to send a request's head, and how long a kept-alive
/// connection may stay idle between requests. Pooled clients in front of a door
/// (the master's gateway) keep idle connections for less than this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The most bytes a request's head may take (request line and headers): a larger one
/// gets 431 and the connection is closed.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most headers a request may carry.
pub const MAX_HEADERS: usize = 128;

/// The caps of a front door unless its owner says otherwise: generous for a
/// gateway in front of an agent (all its connections come from one address), small
/// enough that idle sockets cannot exhaust the process's file descriptors.
pub const DEFAULT_CAPS: agora_net::gate::Caps = agora_net::gate::Caps {
    total: 8192,
    per_ip: 2048,
};

/// How long to wait before accepting again after the listener fails (out of file
/// descriptors, say), so a full table does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until the future is dropped. Each request carries
/// `ConnectInfo<SocketAddr>` of its client; TCP_NODELAY is set on every connection.
/// `name` names the door in log lines.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    gate: Gate,
    name: &'static str,
) {
    // A panic while one request is handled gives that request a 500; the connection
    // and its other requests go on.
    let router = crate::catch_panics(router, name);
    let http = http1();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(door = name, "cannot accept a connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await; // back off: not a synchronisation
                continue;
            }
        };
        let Ok(pass) = gate.admit(peer.ip()) else {
            drop(tcp);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(door = name, "cannot set TCP_NODELAY: {e}");
        }
        let conn = connection(
            &http,
            hyper_util::rt::TokioIo::new(tcp),
            router.clone(),
            peer,
        );
        tokio::spawn(async move {
            let _pass = pass;
            if let Err(e) = conn.await {
                tracing::debug!(door = name, %peer, "connection ended: {e}");
            }
        });
    }
}

/// The HTTP/1.1 settings of every door connection: the head timeout (also the idle
/// limit of a kept-alive connection), and the bounds on a head.
fn http1() -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    http
}

/// One door connection over `io` from `peer`: what [`serve`] runs for each accepted
/// connection (`router` should already be wrapped by [`crate::catch_panics`]).
fn connection<I>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    router: axum::Router,
    peer: SocketAddr,
) -> impl std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(req)
        });
    http.serve_connection(io, service).with_upgrades()
}

/// Serves one connection over any byte stream `io` (an in-memory pipe, say) exactly
/// as [`serve`] serves an accepted TCP connection: the same settings, the same
/// panic guard, `peer` as the client's address. For fuzzing and tests.
pub async fn serve_io<I>(io: I, router: axum::Router, peer: SocketAddr, name: &'static str)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let router = crate::catch_panics(router, name);
    let conn = connection(&http1(), hyper_util::rt::TokioIo::new(io), router, peer);
    if let Err(e) = conn.await {
        tracing::debug!(door = name, %peer, "connection ended: {e}");
    }
}
