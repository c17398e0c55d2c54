//! The one accept loop of Agora's HTTP front doors (the master's and each agent's):
//! connections are admitted against caps (in all and per client address) before a
//! byte is read, a request's head must arrive whole within [`HEADER_TIMEOUT`] (which
//! also closes a kept-alive connection left idle that long: slowloris), heads are
//! bounded in size and in number of headers, and every connection is served on a
//! task of its own, so one that misbehaves costs only itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agora_net::gate::Gate;
use axum::extract::ConnectInfo;
use hyper_util::rt::TokioIo;
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

/// How long a client of an HTTPS door may take over its TLS handshake (counted from
/// the accept, and before the head timeout starts).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until the future is dropped. Each request carries
/// `ConnectInfo<SocketAddr>` of its client; TCP_NODELAY is set on every connection.
/// `name` names the door in log lines.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    gate: Gate,
    name: &'static str,
) {
    serve_with(listener, router, gate, name, None).await
}

/// [`serve`] over TLS only (an agent's `--http-tls`): each admitted connection must
/// complete its TLS handshake within [`TLS_HANDSHAKE_TIMEOUT`]; one that starts with
/// plain HTTP is answered `400` in plain text saying the door wants HTTPS, then
/// closed. The handshake runs on the connection's own task, after the caps.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    gate: Gate,
    name: &'static str,
    tls: Arc<rustls::ServerConfig>,
) {
    serve_with(
        listener,
        router,
        gate,
        name,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
    )
    .await
}

async fn serve_with(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    gate: Gate,
    name: &'static str,
    tls: Option<tokio_rustls::TlsAcceptor>,
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
        let router = router.clone();
        let http = http.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _pass = pass;
            let ended = match tls {
                None => connection(&http, TokioIo::new(tcp), router, peer).await,
                Some(acceptor) => match tls_handshake(acceptor, tcp, peer, name).await {
                    Some(stream) => connection(&http, TokioIo::new(stream), router, peer).await,
                    None => return,
                },
            };
            if let Err(e) = ended {
                tracing::debug!(door = name, %peer, "connection ended: {e}");
            }
        });
    }
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Most bytes of a plain-HTTP request read (and dropped) before it is answered, so the
/// answer is not lost to a reset of a socket closed with unread data.
const PLAIN_DRAIN: usize = 64 * 1024;

/// The TLS session of an accepted connection, or None (logged at debug) when the
/// client spoke plain HTTP (answered), failed its handshake or took too long.
async fn tls_handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    mut tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    name: &'static str,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let work = async {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 0 {
            return Ok(None);
        }
        if first != [TLS_HANDSHAKE_RECORD] {
            answer_plain_http(&mut tcp, name).await;
            return Ok(None);
        }
        acceptor.accept(tcp).await.map(Some)
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, work).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(door = name, %peer, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(door = name, %peer, "no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

/// Tells a plain-HTTP client of an HTTPS door what to do instead, then closes.
async fn answer_plain_http(tcp: &mut tokio::net::TcpStream, name: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = format!(
        "the {name} door serves HTTPS only: call it with https://, trusting the cluster's CA (ca.pem)\n"
    );
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut buf = vec![0u8; 8192];
    let mut read = 0;
    // Read what the client sent of its request so far (its head, usually one
    // segment), so that closing does not reset the connection under the answer.
    while read < PLAIN_DRAIN {
        match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                read += n;
                if buf
                    .get(..n)
                    .is_some_and(|b| b.windows(4).any(|w| w == b"\r\n\r\n"))
                {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
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
    let conn = connection(&http1(), TokioIo::new(io), router, peer);
    if let Err(e) = conn.await {
        tracing::debug!(door = name, %peer, "connection ended: {e}");
    }
}
