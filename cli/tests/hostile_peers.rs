//! Hostile input through the real binaries (issue 13): peers that open streams and
//! say nothing, declare frames they never send, send garbage, hold certificates of
//! another cluster, open too many connections, or talk HTTP slowly or hugely. For
//! each: the sender gets a clear refusal, the cluster goes on serving (a task
//! launched right after succeeds), and the memory of the process under attack stays
//! within a stated bound (measured, printed).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_net::tls::{self, Identity};
use agora_proto::v1::{self, CommandInfo, FrameworkInfo, TaskInfo, TaskState};
use agora_sdk::{Client, ClientConfig, Event, Operation};
use common::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib / 1024
}

/// A task through the cluster still runs to its end.
fn a_task_still_runs(c: &Cluster, what: &str) {
    a_task_runs(|a| c.agora(a), what)
}

/// [`a_task_still_runs`] with `agora` running a client command against the cluster.
fn a_task_runs(agora: impl Fn(&[&str]) -> Output, what: &str) {
    let o = agora(&["run", guest("hello").to_str().unwrap(), "--", what]);
    assert_eq!(code(&o), 0, "after {what}: {}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains(what), "{}", stdout(&o));
}

fn master_addr(c: &Cluster) -> SocketAddr {
    let cfg = ClientConfig::load(&c.config).unwrap();
    cfg.master_addrs().unwrap()[0]
}

async fn connect(cfg: &ClientConfig) -> (quinn::Endpoint, quinn::Connection) {
    let id = Identity::load(&cfg.ca, &cfg.cert, &cfg.key).unwrap();
    let addr = cfg.master_addrs().unwrap()[0];
    let endpoint = tls::client_endpoint(addr, &id).unwrap();
    let conn = tls::connect_within(&endpoint, addr, Duration::from_secs(10))
        .await
        .expect("connect to the master");
    (endpoint, conn)
}

/// Why the master closed `conn`, waiting for it (bounded).
async fn closed_reason(conn: &quinn::Connection) -> String {
    let e = tokio::time::timeout(Duration::from_secs(20), conn.closed())
        .await
        .expect("the master closes the connection");
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => other.to_string(),
    }
}

#[test]
fn silent_streams_and_undelivered_frames_cost_bounded_memory_and_the_cluster_serves_on() {
    let c = Cluster::start();
    a_task_still_runs(&c, "warm");
    let before = rss_mib(c.pid());
    let cfg = ClientConfig::load(&c.config).unwrap();
    let rt = runtime();
    rt.block_on(async {
        // 1,000 streams, each with one byte of a frame's length and then nothing,
        // over four connections (a client may hold 256 streams on one).
        let mut held = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..4 {
            let (ep, conn) = connect(&cfg).await;
            for _ in 0..250 {
                let (mut send, recv) = conn.open_bi().await.expect("open a stream");
                send.write_all(&[0]).await.expect("write");
                held.push((send, recv));
            }
            conns.push((ep, conn));
        }
        // 250 streams that each declare a frame just under a client's limit (1 MiB)
        // and send 16 bytes of it: a reader that allocated the declared size would
        // hold 250 MiB here.
        let (ep, conn) = connect(&cfg).await;
        let mut declared = Vec::new();
        for _ in 0..250 {
            let (mut send, recv) = conn.open_bi().await.expect("open a stream");
            send.write_all(&((1u32 << 20) - 1).to_be_bytes())
                .await
                .unwrap();
            send.write_all(&[0u8; 16]).await.unwrap();
            declared.push((send, recv));
        }
        // Let the master read what was sent: a request on a fresh connection is
        // answered only after the master has taken everything before it in.
        let o = c.agora(&["ps"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let during = rss_mib(c.pid());
        eprintln!(
            "master+agent RSS: {before} MiB before, {during} MiB with 1,000 silent streams and 250 undelivered 1 MiB frames open"
        );
        assert!(
            during < before + 200,
            "RSS grew from {before} MiB to {during} MiB"
        );
        // Meanwhile the cluster serves.
        a_task_still_runs(&c, "during");

        // A client's first frame over its limit: the connection is closed, saying why.
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&(2u32 << 20).to_be_bytes()).await.unwrap();
        let why = closed_reason(&conn).await;
        assert!(why.contains("exceeds the limit"), "closed with {why:?}");
        drop((ep, declared, held, conns));
    });
    a_task_still_runs(&c, "after");
    eprintln!("master+agent RSS after: {} MiB", rss_mib(c.pid()));
}

#[test]
fn garbage_datagrams_half_open_handshakes_and_a_foreign_ca_cost_bounded_memory_and_serve_on() {
    let c = Cluster::start();
    let addr = master_addr(&c);
    a_task_still_runs(&c, "warm");
    let before = rss_mib(c.pid());
    // 20,000 datagrams of noise at the QUIC port, some shaped like long headers.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = [0u8; 1200];
    for i in 0..20_000 {
        for b in noise.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        if i % 2 == 0 {
            noise[0] = 0xc0 | (noise[0] & 0x0f); // a long header
            noise[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1
        }
        let len = 1 + (seed as usize % noise.len());
        let _ = udp.send_to(&noise[..len], addr);
    }
    // The master reads its socket in order: the task's handshake comes after the noise.
    a_task_still_runs(&c, "after-noise");
    let after_noise = rss_mib(c.pid());
    eprintln!(
        "master+agent RSS: {before} MiB before, {after_noise} MiB after 20,000 datagrams of noise"
    );
    assert!(
        after_noise < before + 32,
        "RSS grew from {before} MiB to {after_noise} MiB with datagrams of noise"
    );

    // Handshakes begun and never finished, under the cap of 1,024 connections from
    // one address (the agent, the gateway and `agora run` connect from it too): the
    // master holds the first 64 until their idle timeout (15 s), and answers the rest
    // with a stateless Retry (agora_master::server::HANDSHAKES_BEFORE_RETRY), holding
    // nothing for them; it still serves meanwhile. Measured as soon as the master has
    // answered them all, before any times out.
    let udp = truncated_handshakes(addr, 900);
    let during = rss_mib(c.pid());
    eprintln!(
        "master+agent RSS: {after_noise} MiB before, {during} MiB with 900 handshakes begun and never finished"
    );
    // Measured about 120 KiB a handshake held (53 -> 160 MiB for 900 before the
    // Retry), 6 MiB in all with it: the bound is 300 KiB for each of the 64 held,
    // plus 16 MiB.
    let bound = ((agora_master::server::HANDSHAKES_BEFORE_RETRY as u64 * 300) >> 10) + 16;
    assert!(
        during < after_noise + bound,
        "RSS grew from {after_noise} MiB to {during} MiB with 900 unfinished handshakes (bound {bound} MiB)"
    );
    a_task_still_runs(&c, "during-half-open");
    drop(udp);

    // A client whose certificate comes from another cluster's CA.
    let other = c.dir.path().join("other-ca");
    let o = run_bounded(
        Command::new(AGORA)
            .args(["certs", "init"])
            .arg(&other)
            .args(["--master", &addr.to_string()]),
        60,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run_bounded(
        Command::new(AGORA)
            .args(["ps"])
            .env("AGORA_CONFIG", other.join("client.json"))
            .env_remove("AGORA_MASTER"),
        60,
    );
    assert_ne!(code(&o), 0, "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("certificate") || err.contains("TLS") || err.contains("tls"),
        "a foreign CA gets an error naming the certificate problem: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    a_task_still_runs(&c, "after-foreign-ca");
}

/// Resource lists no task may ask for: negative amounts, amounts that overflow when
/// added up, amounts past the most one bag may hold, and one too large for the offer.
fn hostile_resources() -> Vec<Vec<v1::Resource>> {
    let r = |name: &str, value: i64| v1::Resource {
        name: name.into(),
        value,
        role: String::new(),
    };
    vec![
        vec![r("cpus", -1000), r("mem", 32 << 20)],
        vec![r("cpus", 100), r("mem", i64::MIN)],
        vec![
            r("cpus", i64::MAX - 1),
            r("cpus", i64::MAX - 1),
            r("mem", 32 << 20),
        ],
        vec![r("cpus", 100), r("mem", i64::MAX), r("mem", 1)],
        vec![r("cpus", 100), r("mem", 32 << 20), r("disk", i64::MAX)],
        vec![
            r("cpus", agora_proto::resources::MAX_AMOUNT),
            r("mem", 32 << 20),
        ],
        vec![r("cpus", 100), r("mem", 32 << 20), r("gpus", -1)],
    ]
}

/// A framework sends ACCEPTs whose launches (single tasks and task groups) ask for
/// negative or overflowing resources, as fast as offers come: each task is refused
/// (TASK_ERROR, naming the problem), the master's memory stays within a bound, and a
/// task launched right after runs.
#[test]
fn a_burst_of_accepts_with_overflowing_or_negative_resources_is_refused_within_bounded_memory() {
    const ROUNDS: usize = 10;
    const SINGLES: usize = 480;
    const GROUP: usize = 20;
    let c = Cluster::start();
    a_task_still_runs(&c, "warm");
    let before = rss_mib(c.pid());
    let cfg = ClientConfig::load(&c.config).unwrap();
    let bad = hostile_resources();
    let task = |id: String, i: usize| TaskInfo {
        task_id: id.clone(),
        name: id,
        resources: bad[i % bad.len()].clone(),
        command: Some(CommandInfo {
            shell: true,
            value: "true".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (refused, errors) = runtime().block_on(async {
        let client = Client::connect(&cfg).await.unwrap();
        let mut s = client
            .subscribe(FrameworkInfo {
                name: "hostile-resources".into(),
                roles: vec!["*".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let mut refused = 0usize;
        let mut errors = 0usize;
        let mut rounds = 0;
        let want = ROUNDS * (SINGLES + GROUP);
        while refused < want {
            let ev = tokio::time::timeout(Duration::from_secs(60), s.next_event())
                .await
                .unwrap_or_else(|_| panic!("no event within 60 s ({refused} of {want} refused)"))
                .expect("events");
            match ev {
                Event::Offers(offers) if rounds < ROUNDS => {
                    let singles = (0..SINGLES)
                        .map(|i| task(format!("bad-{rounds}-{i}"), i))
                        .collect();
                    let group = (0..GROUP)
                        .map(|i| task(format!("bad-{rounds}-g{i}"), i + 1))
                        .collect();
                    s.accept_operations(
                        vec![offers[0].offer_id.clone()],
                        vec![
                            Operation::launch(singles),
                            Operation::launch_group("", group),
                        ],
                        Some(0.0),
                    )
                    .await
                    .unwrap();
                    rounds += 1;
                }
                Event::Update(st) => {
                    assert!(st.task_id.starts_with("bad-"), "{st:?}");
                    assert_eq!(st.state(), TaskState::TaskError, "{st:?}");
                    refused += 1;
                }
                Event::Error(_) => errors += 1,
                _ => {}
            }
        }
        let _ = s.teardown().await;
        (refused, errors)
    });
    let during = rss_mib(c.pid());
    eprintln!(
        "master+agent RSS: {before} MiB before, {during} MiB after {ROUNDS} ACCEPTs launching {refused} tasks with hostile resources ({errors} ERROR events)"
    );
    // Measured: no growth (each refusal is answered and forgotten).
    assert!(
        during < before + 64,
        "RSS grew from {before} MiB to {during} MiB"
    );
    a_task_still_runs(&c, "after-hostile-resources");
}

#[test]
fn a_master_refuses_connections_over_its_per_address_cap() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let o = run_bounded(
        Command::new(AGORA)
            .args(["certs", "init"])
            .arg(&certs)
            .args(["--master", &addr]),
        60,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let mut m = Command::new(AGORA);
    m.args(["master", "--listen", &addr, "--http", "127.0.0.1:0"])
        .args(["--max-connections-per-ip", "4"])
        .arg("--certs")
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.path().join("master"));
    let (_master, _) = Proc::start(m, |l| l.starts_with("master listening on "));
    let cfg = ClientConfig::load(&certs.join("client.json")).unwrap();
    runtime().block_on(async {
        // The functions gateway beside the master holds a connection from this
        // address too: ours are refused at the fourth or sooner, never past it.
        let id = Identity::load(&cfg.ca, &cfg.cert, &cfg.key).unwrap();
        let a: SocketAddr = addr.parse().unwrap();
        let ep = tls::client_endpoint(a, &id).unwrap();
        let mut held = Vec::new();
        let refusal = loop {
            match tls::connect_within(&ep, a, Duration::from_secs(10)).await {
                Ok(conn) => held.push(conn),
                Err(e) => break e.to_string(),
            }
            assert!(held.len() <= 4, "more than 4 connections from one address");
        };
        eprintln!("{} connections held, then: {refusal}", held.len());
        assert!(
            !held.is_empty(),
            "the first connection is refused: {refusal}"
        );
        assert!(refusal.contains("refused"), "{refusal}");
        // A place given back is taken again.
        if let Some(c) = held.pop() {
            c.close(0u32.into(), b"done");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match tls::connect_within(&ep, a, Duration::from_secs(10)).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "no place came back: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await; // poll: the master frees the place when it sees the close
        }
    });
}

/// `count` QUIC handshakes begun at `addr` and never finished: each a valid client
/// Initial (a ClientHello the master answers) sent from one UDP socket, whose answers
/// are never processed. Returns once the master has answered every one (its first
/// flight, sent once it has taken the connection in and done its TLS work), with the
/// socket (drop it to stop; the master still waits out its timeouts).
fn truncated_handshakes(addr: SocketAddr, count: usize) -> UdpSocket {
    // At most this many unanswered at once: more at a time would overflow the master's
    // socket buffer, and an Initial lost is not sent again by itself here.
    const WINDOW: usize = 32;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        // Never used: the server's answer is never processed.
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = vec![agora_net::tls::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(quic));
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Unanswered Initials by our connection id, which the master's packets carry as
    // their destination (a QUIC long header: flags, version, then each id after its
    // length).
    let mut unanswered: std::collections::HashMap<Vec<u8>, Vec<u8>> = Default::default();
    let mut datagram = [0u8; 2048];
    let mut await_answers = |unanswered: &mut std::collections::HashMap<Vec<u8>, Vec<u8>>,
                             at_most: usize| {
        while unanswered.len() > at_most {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the master left {} handshakes unanswered for 60 s",
                unanswered.len()
            );
            udp.set_read_timeout(Some(left.min(Duration::from_secs(1))))
                .unwrap();
            match udp.recv(&mut datagram) {
                Ok(n) => {
                    let d = &datagram[..n];
                    let len = d.get(5).copied().unwrap_or(0) as usize;
                    if d[0] & 0x80 != 0 && d.len() >= 6 + len {
                        unanswered.remove(&d[6..6 + len]);
                    }
                }
                // Nothing for a second: an Initial was lost; send those again.
                Err(_) => {
                    for initial in unanswered.values() {
                        udp.send_to(initial, addr).unwrap();
                    }
                }
            }
        }
    };
    let mut buf = Vec::with_capacity(2048);
    for _ in 0..count {
        let (_, mut conn) = endpoint
            .connect(
                Instant::now(),
                config.clone(),
                addr,
                agora_net::tls::MASTER_SERVER_NAME,
            )
            .unwrap();
        buf.clear();
        let t = conn
            .poll_transmit(Instant::now(), 1, &mut buf)
            .expect("a client Initial to send");
        let initial = buf[..t.size].to_vec();
        let dcid_len = initial[5] as usize;
        let scid_len = initial[6 + dcid_len] as usize;
        let ours = initial[7 + dcid_len..7 + dcid_len + scid_len].to_vec();
        udp.send_to(&initial, addr).unwrap();
        unanswered.insert(ours, initial);
        await_answers(&mut unanswered, WINDOW);
    }
    await_answers(&mut unanswered, 0);
    drop(await_answers);
    udp
}

// ---- the HTTP doors ------------------------------------------------------------------

/// `agora master` and `agora agent` as separate processes, so that the memory of
/// each HTTP door's process reads on its own; both doors on free loopback ports.
struct Split {
    // Fields drop in order: the agent first, which drains (its function hosts end)
    // while its master still runs.
    agent: Proc,
    master: Proc,
    certs: std::path::PathBuf,
    quic: String,
    master_http: String,
    agent_http: String,
    _dir: tempfile::TempDir,
}

/// The address a process printed on a line beginning with `prefix` (bounded wait).
fn printed_address(p: &Proc, prefix: &str) -> String {
    loop {
        let line = p
            .lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no line `{prefix}...` within 60 s: {e}"));
        if let Some(addr) = line.strip_prefix(prefix) {
            return addr.trim().to_string();
        }
    }
}

impl Split {
    fn start() -> Split {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let o = run_bounded(Command::new(AGORA).args(["certs", "init"]).arg(&certs), 60);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let mut m = Command::new(AGORA);
        m.args(["master", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .arg("--certs")
            .arg(&certs)
            .arg("--data-dir")
            .arg(dir.path().join("master"));
        let (master, line) = Proc::start(m, |l| l.starts_with("master listening on "));
        let quic = line.split_whitespace().nth(3).unwrap().to_string();
        let master_http = printed_address(&master, "master serving functions on http://");
        let mut a = Command::new(AGORA);
        a.args(["agent", "--drain-on-stop", "--master", &quic])
            .args(["--http", "127.0.0.1:0", "--hostname", "hostile-agent"])
            .args(["--resources", "cpus:2;mem:1024;disk:4096", "--certs"])
            .arg(&certs)
            .arg("--work-dir")
            .arg(dir.path().join("agent"));
        let (agent, _) = Proc::start(a, |l| l.starts_with("agent offering"));
        let agent_http = printed_address(&agent, "agent serving functions on http://");
        let s = Split {
            agent,
            master,
            certs,
            quic,
            master_http,
            agent_http,
            _dir: dir,
        };
        wait_until("the agent to register", || {
            stdout(&s.agora(&["agents"])).contains("hostile-agent")
        });
        s
    }

    /// `agora ARGS` against this cluster, bounded in time.
    fn agora(&self, args: &[&str]) -> std::process::Output {
        run_bounded(
            Command::new(AGORA)
                .args(args)
                .env("AGORA_CONFIG", self.certs.join("client.json"))
                .env("AGORA_MASTER", &self.quic),
            120,
        )
    }

    /// The two HTTP doors and the processes behind them.
    fn doors(&self) -> [Door; 2] {
        [
            Door::new("master", &self.master_http, self.master.child.id()),
            Door::new("agent", &self.agent_http, self.agent.child.id()),
        ]
    }
}

/// An HTTP door under attack: its address and the process that serves it.
struct Door {
    name: &'static str,
    addr: String,
    port: u16,
    pid: u32,
}

impl Door {
    fn new(name: &'static str, addr: &str, pid: u32) -> Door {
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Door {
            name,
            addr: addr.to_string(),
            port,
            pid,
        }
    }

    /// Connections this door's process holds (established, or closed by their
    /// client and not yet by the door) and the bytes on them it has not read, from
    /// the kernel's table (/proc/net/tcp): the door's side of each connection is the
    /// socket whose local port is the door's.
    fn held(&self) -> (usize, u64) {
        let mut held = 0;
        let mut unread = 0;
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                // sl local_address rem_address st tx_queue:rx_queue ...
                let f: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(state), Some(queues)) = (f.get(1), f.get(3), f.get(4))
                else {
                    continue;
                };
                let port = local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                // 01 ESTABLISHED, 08 CLOSE_WAIT.
                if port != Some(self.port) || !matches!(*state, "01" | "08") {
                    continue;
                }
                held += 1;
                unread += queues
                    .split(':')
                    .nth(1)
                    .and_then(|q| u64::from_str_radix(q, 16).ok())
                    .unwrap_or(0);
            }
        }
        (held, unread)
    }

    /// Waits (bounded) until the door holds at least `n` connections and has read
    /// every byte sent on them.
    fn wait_taken_in(&self, n: usize) {
        wait_until(
            &format!("the {} door to take in {n} connections", self.name),
            || {
                let (held, unread) = self.held();
                held >= n && unread == 0
            },
        );
    }

    /// Waits (bounded) until the door holds at most `n` connections.
    fn wait_let_go(&self, n: usize) {
        wait_until(
            &format!(
                "the {} door to let go of its connections (down to {n})",
                self.name
            ),
            || self.held().0 <= n,
        );
    }
}

/// Raises this process's open-file limit to its hard limit (processes started after
/// inherit it) and returns how many connections of one kind a test may hold: `want`,
/// or fewer where the limit is low (the test holds them at two doors at once, its
/// clusters the other ends, other tests of this file theirs).
fn connections(want: usize) -> usize {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
    }
    let limit = usize::try_from(l.rlim_cur).unwrap_or(usize::MAX);
    let n = want.min(limit.saturating_sub(1024) / 4);
    assert!(
        n >= 100,
        "an open-file limit of {limit} leaves too few connections for this test"
    );
    n
}

/// Opens `n` connections to `door` and sends `head` on each, leaving them open.
fn hold(door: &Door, n: usize, head: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(&door.addr)
                .unwrap_or_else(|e| panic!("{}: connection {i}: {e}", door.name));
            s.write_all(head).unwrap();
            s
        })
        .collect()
}

/// Waits (at most `within`) until at least `n` of `conns` have an answer, and returns
/// those answers. The others are left open.
fn answers_within(conns: &mut [TcpStream], n: usize, within: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    let mut answers: Vec<Option<Vec<u8>>> = vec![None; conns.len()];
    while answers.iter().flatten().count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {} connections answered within {within:?}",
            answers.iter().flatten().count(),
            conns.len()
        );
        for (s, answer) in conns.iter_mut().zip(answers.iter_mut()) {
            if answer.is_some() {
                continue;
            }
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 4096];
            if let Ok(got) = s.read(&mut buf) {
                if got > 0 {
                    *answer = Some(buf[..got].to_vec());
                }
            }
        }
    }
    answers
        .into_iter()
        .flatten()
        .map(|a| String::from_utf8_lossy(&a).into_owned())
        .collect()
}

fn raw_http(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Resident memory of a process now and at its peak since `reset_peak`, in MiB.
fn peak_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024
}

/// Resets a process's peak resident memory (needs root and Linux 4.0); false where
/// it cannot.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Growth of a door's process for `n` connections, printed as a figure per connection.
fn report(door: &Door, what: &str, n: usize, before: u64, during: u64) {
    let per = during.saturating_sub(before) as f64 * 1024.0 / n as f64;
    eprintln!(
        "{} ({} door) RSS: {before} MiB before, {during} MiB with {n} {what} ({per:.1} KiB a connection)",
        door.name, door.name
    );
}

/// Slowloris and heads near the limit, at the master's door (its gateway) and at the
/// agent's, each served by its own process: the memory of each stays within a
/// bound per connection held, well-behaved clients are served meanwhile, heads over
/// the limits are refused, slow heads are cut at the head timeout, and the cluster
/// serves on.
#[test]
fn slow_and_huge_http_heads_cost_bounded_memory_at_both_doors_and_others_are_served() {
    let c = Split::start();
    a_task_runs(|a| c.agora(a), "warm");
    let doors = c.doors();
    let base: Vec<usize> = doors.iter().map(|d| d.held().0).collect();

    // Slowloris: connections that each send part of a request line and stop.
    let n = connections(1200);
    let before: Vec<u64> = doors.iter().map(|d| rss_mib(d.pid)).collect();
    let started = Instant::now();
    let slow: Vec<Vec<TcpStream>> = doors
        .iter()
        .map(|d| hold(d, n, b"GET /fn-metrics HT"))
        .collect();
    for (d, b) in doors.iter().zip(&before) {
        d.wait_taken_in(n);
        let during = rss_mib(d.pid);
        report(d, "slow heads held", n, *b, during);
        // Measured about 18 KiB a connection at either door.
        let bound = (n as u64 * 48) >> 10;
        assert!(
            during < b + bound,
            "{}: RSS grew from {b} MiB to {during} MiB with {n} slow heads (bound {bound} MiB)",
            d.name
        );
    }
    for door in &doors {
        // A well-behaved client is served meanwhile.
        let r = http("GET", &door.addr, "/fn-metrics", b"");
        assert_eq!(r.status, 200, "{}: {}", door.name, r.body);

        // A head of 100 KiB: 431, and the connection is closed.
        let big = format!(
            "GET /fn-metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100 * 1024)
        );
        let reply = raw_http(&door.addr, big.as_bytes());
        assert!(
            reply.starts_with("HTTP/1.1 431"),
            "{}: {reply:.200}",
            door.name
        );
        // 200 headers: refused too.
        let mut many = String::from("GET /fn-metrics HTTP/1.1\r\nHost: x\r\n");
        for i in 0..200 {
            many.push_str(&format!("X-H{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let reply = raw_http(&door.addr, many.as_bytes());
        assert!(
            reply.starts_with("HTTP/1.1 431"),
            "{}: {reply:.200}",
            door.name
        );
    }
    // The slow ones are closed once the head timeout (30 s) has passed.
    for ((door, conns), b) in doors.iter().zip(slow).zip(&base) {
        let mut first = conns.into_iter().next().unwrap();
        first
            .set_read_timeout(Some(Duration::from_secs(90)))
            .unwrap();
        let mut buf = Vec::new();
        let _ = first.read_to_end(&mut buf);
        let waited = started.elapsed();
        eprintln!(
            "{}: a slow head was cut {:.1} s after it began ({} bytes answered)",
            door.name,
            waited.as_secs_f64(),
            buf.len()
        );
        assert!(
            waited < Duration::from_secs(75),
            "{}: a connection that never finished its head was kept {waited:?}",
            door.name
        );
        // The others (still open on this side) went at the same time.
        door.wait_let_go(b + 4);
        eprintln!(
            "{} RSS after the slow heads were cut: {} MiB",
            door.name,
            rss_mib(door.pid)
        );
    }

    // Heads just under the 64 KiB limit, never finished: the most a connection can
    // make a door hold before its head is refused.
    let m = connections(1000);
    let mut head = b"GET /fn-metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    head.resize(60 * 1024, b'a');
    for (d, b) in doors.iter().zip(&base) {
        let before = rss_mib(d.pid);
        let held = hold(d, m, &head);
        d.wait_taken_in(m);
        let during = rss_mib(d.pid);
        report(d, "unfinished 60 KiB heads held", m, before, during);
        // Measured about 100 KiB a connection at either door: the head's read
        // buffer, grown as it filled, and the connection.
        let bound = (m as u64 * 192) >> 10;
        assert!(
            during < before + bound,
            "{}: RSS grew from {before} MiB to {during} MiB with {m} unfinished heads (bound {bound} MiB)",
            d.name
        );
        let r = http("GET", &d.addr, "/fn-metrics", b"");
        assert_eq!(r.status, 200, "{}: {}", d.name, r.body);
        drop(held);
        d.wait_let_go(b + 4);
        eprintln!(
            "{} RSS after their clients left: {} MiB",
            d.name,
            rss_mib(d.pid)
        );
    }
    a_task_runs(|a| c.agora(a), "after-http");
}

/// Pids of the function hosts (`agora executor fn`) the agent `agent` started.
fn function_hosts(agent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if ppid == Some(agent) && args.get(1..3) == Some(&[&b"executor"[..], &b"fn"[..]][..]) {
            out.push(pid);
        }
    }
    out
}

/// Many clients send the head of a request to a function and a chunk of its body,
/// then stop. Both doors stream bodies without holding them, so their memory stays
/// within a bound per request held. The function host admits each request (its queue
/// and concurrency limits) before reading its body and holds at most its body budget
/// (one instance's memory, here 64 MiB) of bodies at once: a body declared at the
/// 16 MiB limit that does not fit in what is left gets 503 at once. Bodies declared
/// over the limit get 413 at once, chunked bodies that go on past it get 413 at the
/// limit, and afterwards the function and the cluster serve on.
#[test]
fn stalled_and_oversized_bodies_cost_bounded_memory_at_both_doors() {
    let c = Split::start();
    let echo = guest("echo");
    let o = c.agora(&[
        "fn",
        "deploy",
        "echo",
        echo.to_str().unwrap(),
        "--min-instances",
        "1",
        // Every stalled request admitted at once (the host's instance pool, 256,
        // is above the 240 this test holds), and their bodies given 5 minutes.
        "--max-concurrency",
        "1000",
        "--timeout",
        "5m",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    wait_until("a running host of echo", || {
        running_hosts(&c.master_http, "echo").len() == 1
    });
    let doors = c.doors();
    for d in &doors {
        let r = http("POST", &d.addr, "/fn/echo/warm", b"warm");
        assert_eq!(r.status, 200, "{}: {r:?}", d.name);
    }
    a_task_runs(|a| c.agora(a), "warm");
    let host = function_hosts(c.agent.child.id());
    assert_eq!(host.len(), 1, "one function host process: {host:?}");
    let base: Vec<usize> = doors.iter().map(|d| d.held().0).collect();
    let before: Vec<u64> = doors.iter().map(|d| rss_mib(d.pid)).collect();
    let host_before = rss_mib(host[0]);
    let reset = doors.iter().all(|d| reset_peak(d.pid));

    // Chunked bodies, each sending 16 KiB and stopping.
    let k = connections(120);
    let part = vec![b'x'; 16 << 10];
    let mut chunked =
        b"POST /fn/echo/stalled HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4000\r\n"
            .to_vec();
    chunked.extend_from_slice(&part);
    let held: Vec<Vec<TcpStream>> = doors.iter().map(|d| hold(d, k, &chunked)).collect();
    // The master forwards each of its requests to the agent on a connection of its
    // own: the agent's door holds those too.
    doors[0].wait_taken_in(k);
    doors[1].wait_taken_in(2 * k);
    let during: Vec<u64> = doors.iter().map(|d| rss_mib(d.pid)).collect();
    report(&doors[0], "stalled bodies held", k, before[0], during[0]);
    report(
        &doors[1],
        "stalled bodies held (and as many forwarded by the master)",
        2 * k,
        before[1],
        during[1],
    );
    // Measured about 40 KiB a request at the master, 45 KiB a connection at the agent.
    for (i, d) in doors.iter().enumerate() {
        let requests = if i == 0 { k } else { 2 * k } as u64;
        let bound = 32 + ((requests * 128) >> 10);
        assert!(
            during[i] < before[i] + bound,
            "{}: RSS grew from {} MiB to {} MiB with {requests} stalled bodies (bound {bound} MiB)",
            d.name,
            before[i],
            during[i]
        );
    }

    // Bodies declared at the limit, stalled too: the host's budget (64 MiB, less the
    // chunks it holds) takes four at most; the others are refused at once.
    let mut declared = format!(
        "POST /fn/echo/declared HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        16 << 20
    )
    .into_bytes();
    declared.extend_from_slice(&part);
    let mut big = hold(&doors[1], 6, &declared);
    let refused = answers_within(&mut big, 2, Duration::from_secs(30));
    for r in &refused {
        assert!(r.starts_with("HTTP/1.1 503"), "{r:.300}");
        assert!(
            r.contains("this host already holds 64MiB of request bodies, its limit; try again"),
            "{r:.300}"
        );
    }
    let host_during = rss_mib(host[0]);
    eprintln!(
        "function host RSS: {host_before} MiB before, {host_during} MiB holding {} stalled bodies and the declared ones",
        2 * k
    );
    assert!(
        host_during < host_before + 64 + ((2 * k as u64 * 128) >> 10),
        "the function host grew from {host_before} MiB to {host_during} MiB"
    );
    drop(big);

    // Meanwhile: a body declared over the limit is refused at once, and a chunked one
    // that goes on (64 MiB) is refused at the limit, at either door.
    for d in &doors {
        let mut over = format!(
            "POST /fn/echo/over HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            (16 << 20) + 1
        )
        .into_bytes();
        over.extend_from_slice(&part);
        let reply = raw_http(&d.addr, &over);
        assert!(
            reply.starts_with("HTTP/1.1 413"),
            "{}: {reply:.200}",
            d.name
        );
        let (r, written) = upload(&d.addr, "/fn/echo/forever", 64 << 20, 64 << 10, true);
        assert_eq!(r.status, 413, "{}: {r:?}", d.name);
        assert!(written < 48 << 20, "{}: {written} bytes taken", d.name);
    }
    for (i, d) in doors.iter().enumerate() {
        let peak = peak_mib(d.pid);
        eprintln!(
            "{} peak RSS: {peak} MiB over the stalled bodies and two refused uploads (peak reset: {reset})",
            d.name
        );
        if reset {
            let bound = 64 + ((2 * k as u64 * 128) >> 10);
            assert!(
                peak < before[i] + bound,
                "{}: peak RSS {peak} MiB from {} MiB (bound {bound} MiB)",
                d.name,
                before[i]
            );
        }
    }

    // Their clients leave: the doors let go, the function and the cluster serve on.
    drop(held);
    for (d, b) in doors.iter().zip(&base) {
        d.wait_let_go(b + 8);
        eprintln!(
            "{} RSS after the stalled bodies' clients left: {} MiB",
            d.name,
            rss_mib(d.pid)
        );
        let r = http("POST", &d.addr, "/fn/echo/after", b"still here");
        assert_eq!(r.status, 200, "{}: {r:?}", d.name);
        assert!(r.body.ends_with("still here"), "{}", r.body);
    }
    a_task_runs(|a| c.agora(a), "after-bodies");
}
