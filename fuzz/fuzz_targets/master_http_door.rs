//! The master's HTTP front door for functions (the gateway's router, which
//! `agora master --http` serves), driven in-process as `http_door` drives the
//! agent's: the real routes served by the doors' one connection handler
//! (`agora_http_forward::serve::serve_io`) over an in-memory pipe, the input being
//! what a client sends (pipelined requests too), cut into writes at each `\xff\xfe`.
//!
//! Behind the door, a `Functions` state as the framework would leave it, with no
//! master: function `echo` has a running host on a fake agent (an HTTP server on
//! 127.0.0.1 in this process that answers like an agent's door: the request's body
//! back, streamed; a path ending in `/huge` gets an answer declaring a body over
//! the limit (and sending none), one ending in `/drop` a connection closed without
//! an answer); `gone` has a host on an agent whose address refuses connections;
//! `cold` has none, so its requests are held for one (nobody starts one) until the
//! door's 30 s run out. Each input is also sent to a second door, a follower's,
//! which redirects to its leader. The load poller's metrics of `echo` are in place
//! for `/fn-metrics` and `/metrics`.
//!
//! The door's clock is tokio's, paused: it moves on only when nothing else can, to
//! the next timer. So a held request, a head that never ends (cut at 30 s), a
//! kept-alive connection's idle limit, all pass at once, and every answer is awaited
//! without a wall-clock wait: the client keeps its side open (a door closes a
//! connection whose client half-closes with a request in flight, as hyper does)
//! until the door closes, or for at most 10 minutes of that clock.
//!
//! Checked: no panic (a handler's panic would also abort here: libFuzzer's hook),
//! and whatever a door answers starts with an HTTP/1.x status line of a valid code
//! that is not 500 (500 is what a caught panic gives).
#![no_main]
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agora_fn_api::{ErrorCounts, GuestKind, LatencyHistogram, MetricsSnapshot};
use agora_fn_gateway::{fuzzing, Functions};
use agora_fuzz::door::{check_answer, split_writes};
use agora_proto::v1::{FunctionDeploy, WasmModule};
use http_body_util::BodyExt as _;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Doors {
    runtime: tokio::runtime::Runtime,
    /// The leading master's gateway.
    leader: Arc<Functions>,
    /// A follower's: its master does not lead, so it sends clients on.
    follower: Arc<Functions>,
}

/// Most bytes of a door's answer read per input (more is not looked at).
const MAX_ANSWER: usize = 1 << 20;
/// Longest an exchange lasts on the door's (paused) clock.
const MAX_EXCHANGE: Duration = Duration::from_secs(600);

fn doors() -> &'static Doors {
    static DOORS: OnceLock<Doors> = OnceLock::new();
    DOORS.get_or_init(|| {
        // As in http_door: libFuzzer's `main` does not ignore SIGPIPE, and a write to
        // a socket its peer closed would kill the fuzzer.
        // SAFETY: setting a signal's disposition to SIG_IGN, before any thread of ours.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a tokio runtime");
        let (leader, follower) = runtime.block_on(async {
            let agent = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("the fake agent's port");
            let agent_addr = agent.local_addr().expect("its address").to_string();
            tokio::spawn(fake_agent(agent));
            // An address where nothing listens: a port taken, then given back.
            let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a port")
                .local_addr()
                .expect("its address")
                .to_string();

            let leader = Functions::new(Duration::from_secs(60));
            fuzzing::subscribe_in_memory(&leader);
            for name in ["echo", "gone", "cold"] {
                leader
                    .deploy(deploy(name))
                    .await
                    .expect("a valid deployment");
            }
            fuzzing::run_host(&leader, "echo", "fn.echo.1", "agent-1", &agent_addr);
            fuzzing::run_host(&leader, "gone", "fn.gone.1", "agent-2", &closed);
            fuzzing::set_agent_metrics(&leader, &agent_addr, vec![metrics("echo")]);

            // Not subscribed, as a follower's gateway is.
            let follower = Functions::new(Duration::from_secs(60));
            follower.set_leader_http(Arc::new(|| Some("192.0.2.1:7070".to_string())));
            (leader, follower)
        });
        Doors {
            runtime,
            leader,
            follower,
        }
    })
}

fn deploy(name: &str) -> FunctionDeploy {
    FunctionDeploy {
        name: name.into(),
        module: Some(WasmModule {
            sha256: "ab".repeat(32),
            size: 1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn metrics(name: &str) -> MetricsSnapshot {
    let bounds = agora_fn_api::LATENCY_BUCKETS_US.to_vec();
    let mut counts = vec![0; bounds.len() + 1];
    counts[3] = 5;
    counts[bounds.len()] = 1;
    MetricsSnapshot {
        name: name.into(),
        tenant: "default".into(),
        kind: GuestKind::CgiModule,
        sha256: "ab".repeat(32),
        requests: 7,
        responses: 6,
        errors: ErrorCounts {
            deadline: 1,
            ..Default::default()
        },
        latency: LatencyHistogram {
            bounds_us: bounds,
            counts,
            count: 6,
            sum_us: 61_000_000,
        },
        fuel_used: 12345,
        in_flight: 1,
        queued: 0,
        outbound_allowed: 0,
        outbound_denied: 0,
    }
}

/// An agent's HTTP door as the gateway sees it: answers with the request's body,
/// streamed; `.../huge` declares a body over the forwarding limit (and sends none);
/// `.../drop` closes the connection without an answer.
async fn fake_agent(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_string();
                    if path.ends_with("/drop") {
                        return Err("dropped");
                    }
                    if path.ends_with("/huge") {
                        let mut r = http::Response::new(Unsized.boxed());
                        r.headers_mut().insert(
                            http::header::CONTENT_LENGTH,
                            http::HeaderValue::from(agora_http_forward::MAX_BODY + 1),
                        );
                        return Ok(r);
                    }
                    Ok(http::Response::new(req.into_body().boxed()))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A body of unknown length that never sends a byte: hyper sends the head with the
/// length it declares (an empty body, or one of known length, would have that length
/// replaced or checked) and waits; the connection ends when the gateway drops it.
struct Unsized;

impl hyper::body::Body for Unsized {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        std::task::Poll::Pending
    }
}

/// Sends `data` to a door serving `router` and returns what it answered: until the
/// door closes the connection, [`MAX_ANSWER`] bytes or [`MAX_EXCHANGE`].
async fn exchange(router: axum::Router, data: &[u8]) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let served = tokio::spawn(agora_http_forward::serve::serve_io(
        server,
        router,
        peer,
        "master HTTP (fuzz)",
    ));
    let (mut reader, mut writer) = tokio::io::split(client);
    let mut answer = Vec::new();
    // The writer does not shut its side down: a door closes a connection whose client
    // half-closes, with what it was answering.
    let write = async {
        for chunk in split_writes(data) {
            if writer.write_all(chunk).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        std::future::pending::<()>().await
    };
    let read = async {
        let mut buf = [0u8; 8192];
        while answer.len() < MAX_ANSWER {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::select! {
        _ = write => {}
        () = read => {}
        () = tokio::time::sleep(MAX_EXCHANGE) => {}
    }
    served.abort();
    answer
}

fuzz_target!(|data: &[u8]| {
    let doors = doors();
    for (door, functions) in [("leader", &doors.leader), ("follower", &doors.follower)] {
        let router = fuzzing::router(Arc::clone(functions));
        let answer = doors.runtime.block_on(exchange(router, data));
        check_answer(door, &answer);
    }
});
