//! The agent's HTTP front door for functions, driven in-process: the real router
//! (`agora_agent::http::router`) served by the doors' one connection handler
//! (`agora_http_forward::serve::serve_io`: the same head limits, timeouts and panic
//! guard as a TCP connection) over an in-memory pipe. The input is what a client
//! sends: any method, path, query, headers and body, pipelined requests too, cut
//! into writes at each `\xff\xfe`. Behind the door, function `echo` is routed to a
//! fake host on a Unix socket (it answers with the request's body, streamed) and
//! `gone` to a host whose socket does not exist; no network is touched.
//!
//! Checked: no panic (a handler's panic would also abort here: libFuzzer's hook),
//! and whatever the door answers starts with an HTTP/1.x status line of a valid
//! code that is not 500 (500 is what a caught panic gives).
#![no_main]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use agora_agent::http::{router, Routes};
use agora_fuzz::door::{check_answer, split_writes};
use agora_proto::v1::FunctionInfo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Door {
    runtime: tokio::runtime::Runtime,
    routes: Arc<Routes>,
}

/// Most bytes of the door's answer read per input (more is not looked at).
const MAX_ANSWER: usize = 1 << 20;

fn door() -> &'static Door {
    static DOOR: OnceLock<Door> = OnceLock::new();
    DOOR.get_or_init(|| {
        // A Rust `main` ignores SIGPIPE before it starts (so a write to a peer that
        // went away is an EPIPE error, as in the agent); libFuzzer's `main` does not,
        // and the first write to a closed Unix socket would kill the fuzzer.
        // SAFETY: setting a signal's disposition to SIG_IGN, before any thread of ours.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        // Short: a Unix socket's path has at most 107 bytes.
        let work = PathBuf::from(format!("/tmp/agora-fuzz-door-{}", std::process::id()));
        let echo_key = ("fw".to_string(), "echo-1".to_string());
        let gone_key = ("fw".to_string(), "gone-1".to_string());
        let echo_sandbox = agora_agent_core::sandbox_dir(&work, &echo_key);
        std::fs::create_dir_all(&echo_sandbox).expect("the fake host's sandbox");
        let socket = agora_fn_api::socket_path(&echo_sandbox);
        let _ = std::fs::remove_file(&socket);
        let routes = Arc::new(Routes::default());
        let echo = FunctionInfo {
            name: "echo".into(),
            tenant: "t".into(),
            ..Default::default()
        };
        let gone = FunctionInfo {
            name: "gone".into(),
            tenant: "t".into(),
            ..Default::default()
        };
        routes.replace([(&echo_key, &echo), (&gone_key, &gone)], &work);
        runtime.block_on(async {
            let listener = tokio::net::UnixListener::bind(&socket).expect("the fake host's socket");
            tokio::spawn(fake_host(listener));
        });
        Door { runtime, routes }
    })
}

/// A function host that answers every request with its own body, streamed.
async fn fake_host(listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(req.into_body()))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fuzz_target!(|data: &[u8]| {
    let door = door();
    let router = router(Arc::clone(&door.routes));
    let answer = door.runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let served = tokio::spawn(agora_http_forward::serve::serve_io(
            server,
            router,
            peer,
            "agent HTTP (fuzz)",
        ));
        let (mut reader, mut writer) = tokio::io::split(client);
        let write = async {
            for chunk in split_writes(data) {
                if writer.write_all(chunk).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = writer.shutdown().await;
        };
        let read = async {
            let mut answer = Vec::new();
            let mut buf = [0u8; 8192];
            while answer.len() < MAX_ANSWER {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
            answer
        };
        let ((), answer) = tokio::join!(write, read);
        served.abort();
        answer
    });
    check_answer("agent", &answer);
});
