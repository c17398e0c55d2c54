//! Replicated masters (issue 12): three `agora master` processes in one Raft group,
//! an agent and frameworks that know all three; the leader is killed with `kill -9`
//! while tasks run, and the group goes on without anyone stepping in.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Free loopback UDP ports (bound, then released: masters must know each other's
/// addresses before any of them starts).
fn free_udp_ports(n: usize) -> Vec<u16> {
    let socks: Vec<std::net::UdpSocket> = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    socks
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect()
}

struct Group {
    dir: tempfile::TempDir,
    certs: PathBuf,
    addrs: Vec<String>,
    masters: Vec<Option<Proc>>,
    agent: Option<Proc>,
    /// HTTP addresses already read from a master's output, by its process id (the
    /// line is printed once).
    https: std::sync::Mutex<std::collections::HashMap<u32, String>>,
}

impl Group {
    fn start() -> Group {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let addrs: Vec<String> = free_udp_ports(3)
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut init = Command::new(AGORA);
        init.args(["certs", "init"]).arg(&certs);
        for a in &addrs {
            init.args(["--master", a]);
        }
        let o = run_bounded(&mut init, 60);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let mut g = Group {
            masters: Vec::new(),
            agent: None,
            dir,
            certs,
            addrs,
            https: Default::default(),
        };
        for id in 1..=3 {
            g.masters.push(Some(g.master(id)));
        }
        let mut a = Command::new(AGORA);
        a.args([
            "agent",
            "--drain-on-stop",
            "--master",
            &g.addrs.join(","),
            "--certs",
        ])
        .arg(&g.certs)
        .arg("--work-dir")
        .arg(g.dir.path().join("agent"))
        .args(["--resources", "cpus:8;mem:8GiB", "--http", "127.0.0.1:0"]);
        g.agent = Some(Proc::start(a, |l| l.starts_with("agent offering")).0);
        g
    }

    fn peers(&self) -> String {
        self.addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn master(&self, id: usize) -> Proc {
        let mut m = Command::new(AGORA);
        m.args(["master", "--id", &id.to_string(), "--peers", &self.peers()])
            .args(["--listen", &self.addrs[id - 1], "--http", "127.0.0.1:0"])
            .arg("--certs")
            .arg(&self.certs)
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("master{id}")));
        Proc::start(m, |l| l.starts_with("master listening on ")).0
    }

    /// The HTTP address master `id` printed (its functions front door).
    fn http(&self, id: usize) -> String {
        let p = self.masters[id - 1].as_ref().expect("that master runs");
        let mut known = self.https.lock().unwrap();
        let pid = p.child.id();
        if let Some(a) = known.get(&pid) {
            return a.clone();
        }
        loop {
            let l = p
                .lines
                .recv_timeout(Duration::from_secs(60))
                .expect("the master prints its HTTP address");
            if let Some(a) = l.strip_prefix("master serving functions on http://") {
                known.insert(pid, a.trim().to_string());
                return a.trim().to_string();
            }
        }
    }

    fn config(&self) -> PathBuf {
        self.certs.join("client.json")
    }

    fn client(&self, args: &[&str]) -> Command {
        let mut c = Command::new(AGORA);
        c.args(args)
            .env("AGORA_CONFIG", self.config())
            .env_remove("AGORA_MASTER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// The leader's id, as `agora masters` reports it, once there is one.
    fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = run_bounded(&mut self.client(&["masters"]), 30);
            if let Some(id) = stdout(&o)
                .lines()
                .find(|l| l.split_whitespace().nth(3) == Some("leader"))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
            {
                return id;
            }
            assert!(
                Instant::now() < deadline,
                "no leader within 60 s:\n{}{}",
                stdout(&o),
                stderr(&o)
            );
            std::thread::sleep(Duration::from_millis(50)); // poll interval
        }
    }

    fn kill(&mut self, id: usize) -> Instant {
        let mut p = self.masters[id - 1].take().expect("that master runs");
        p.child.kill().unwrap();
        let at = Instant::now();
        p.child.wait().unwrap();
        at
    }
}

fn read_out(child: &mut Child) -> String {
    let mut printed = String::new();
    if let Some(mut s) = child.stdout.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut printed);
    }
    printed
}

fn waiting_runs(g: &Group, go: &Path, n: usize) -> Vec<Child> {
    (0..n)
        .map(|i| {
            let args = held_run_args("held", i, &go);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn_tied_to_process(g.client(&args))
        })
        .collect()
}

#[test]
fn the_leader_killed_while_tasks_run_is_replaced_and_every_run_ends() {
    let mut g = Group::start();
    let first = g.leader();
    // A follower's HTTP front door sends callers on to the leader's (once it has
    // asked the leader where that is).
    let follower = (1..=3).find(|i| *i != first).unwrap();
    let follower_http = g.http(follower);
    let leader_http = g.http(first);
    wait_until(
        "the follower's HTTP door to redirect to the leader's",
        || {
            let r = http("GET", &follower_http, "/fn/anything/x?y=1", b"");
            assert!(
                r.status == 307 || r.status == 503,
                "{} {}",
                r.status,
                r.body
            );
            r.status == 307
                && r.header("location") == Some(&format!("http://{leader_http}/fn/anything/x?y=1"))
        },
    );
    // The leader's door answers for itself (503 until its functions framework has
    // subscribed, then 404: no such function).
    wait_until("the leader's HTTP door to answer for itself", || {
        let r = http("GET", &leader_http, "/fn/anything/", b"");
        assert!(
            r.status == 404 || r.status == 503,
            "{} {}",
            r.status,
            r.body
        );
        r.status == 404
    });
    // A task through the group before anything goes wrong.
    let o = run_bounded(
        &mut g.client(&["run", guest("hello").to_str().unwrap(), "--", "before"]),
        120,
    );
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));

    let go = g.dir.path().join("go");
    let runs = 10;
    let mut children = waiting_runs(&g, &go, runs);
    wait_running(
        || stdout(&run_bounded(&mut g.client(&["ps"]), 60)),
        "held-",
        runs,
    );

    // The module uploaded to the leader is on every master.
    let artifacts = |id: usize| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(g.dir.path().join(format!("master{id}/artifacts")))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.len() == 64)
                        .collect()
                })
                .unwrap_or_default();
        v.sort();
        v
    };
    let uploaded = artifacts(first);
    assert!(!uploaded.is_empty(), "the leader stored the module");
    // A majority held it before the upload was answered; the third copy may still
    // be on its way.
    wait_until("every master to hold the leader's artifacts", || {
        (1..=3).all(|id| artifacts(id) == uploaded)
    });

    let killed_at = g.kill(first);
    // A new task, submitted right after the kill: its client waits through the
    // election and launches through the new leader (offers are made again).
    let o = run_bounded(
        &mut g.client(&["run", guest("hello").to_str().unwrap(), "--", "after"]),
        120,
    );
    let launched = killed_at.elapsed();
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("after"), "{}", stdout(&o));
    let second = g.leader();
    assert_ne!(second, first, "a surviving master leads");
    // The URL a deploy prints is the new leader's door, not the dead master's.
    let o = run_bounded(
        &mut g.client(&["fn", "deploy", "echo", guest("echo").to_str().unwrap()]),
        120,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim(),
        format!("http://{}/fn/echo/", g.http(second)),
        "{}",
        stderr(&o)
    );
    eprintln!(
        "failover: master {first} killed; a task submitted at once finished {} ms after the kill, through master {second}",
        launched.as_millis()
    );

    // The tasks started before the kill all ran on, and every run reports its end.
    std::fs::write(&go, b"").unwrap();
    for (i, run) in children.iter_mut().enumerate() {
        let out = wait_child(run, 120);
        let printed = read_out(run);
        assert!(
            printed.contains(&format!("run {i} survived")),
            "run {i} printed {printed:?}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some((i % 3) as i32), "run {i}");
    }

    // Nothing ran twice: each held task appears once in the history.
    let ps = stdout(&run_bounded(&mut g.client(&["ps", "--all"]), 60));
    for i in 0..runs {
        let rows = ps
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == format!("held-{i}")))
            .count();
        assert_eq!(rows, 1, "held-{i} in `ps --all`:\n{ps}");
    }

    // The killed master comes back as a follower and catches up.
    g.masters[first - 1] = Some(g.master(first));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = run_bounded(&mut g.client(&["masters"]), 30);
        let out = stdout(&o);
        let row = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&first.to_string()))
            .unwrap_or_default()
            .to_string();
        let fields: Vec<&str> = row.split_whitespace().collect();
        if fields.get(3) == Some(&"follower") && fields.get(7) == Some(&"0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "master {first} did not catch up as a follower:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100)); // poll interval
    }
    assert_eq!(
        g.leader(),
        second,
        "the returning master did not depose the leader"
    );
}

#[test]
fn a_master_whose_peers_disagree_with_its_log_refuses_to_start() {
    let mut g = Group::start();
    g.leader();
    // Master 3 stopped, then started with a list that names another member.
    g.kill(3);
    let mut peers = g.peers();
    peers = peers.replace(&format!("3={}", g.addrs[2]), "3=127.0.0.1:1");
    let mut m = Command::new(AGORA);
    m.args(["master", "--id", "3", "--peers", &peers])
        .args(["--listen", &g.addrs[2], "--http", "127.0.0.1:0"])
        .arg("--certs")
        .arg(&g.certs)
        .arg("--data-dir")
        .arg(g.dir.path().join("master3"))
        .env("AGORA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied_to_process(m);
    let out = wait_child(&mut child, 60);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {err}");
    assert!(
        err.contains("disagree with the group's membership"),
        "{err}"
    );
    assert!(
        err.contains("3=127.0.0.1:1"),
        "names what it was given: {err}"
    );
    assert!(
        err.contains(&format!("3={}", g.addrs[2])),
        "names what the log says: {err}"
    );

    // Ids that are not in the list are refused before anything starts.
    let o = run_bounded(
        Command::new(AGORA)
            .args(["master", "--id", "7", "--peers", &g.peers()])
            .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .arg("--certs")
            .arg(&g.certs)
            .arg("--data-dir")
            .arg(g.dir.path().join("master7")),
        60,
    );
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("--id 7 is not among --peers"),
        "{}",
        stderr(&o)
    );
    let o = run_bounded(
        Command::new(AGORA)
            .args(["master", "--peers", "1=nowhere", "--certs"])
            .arg(&g.certs),
        60,
    );
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("--peers: 1=nowhere"), "{}", stderr(&o));
}

/// SIGSTOP stands in for a cut: the stopped masters neither answer nor time out.
fn signal(p: &Proc, sig: i32) {
    unsafe { libc::kill(p.child.id() as i32, sig) };
}

#[test]
fn a_leader_without_a_majority_stops_serving_and_a_leader_returns_with_it() {
    let g = Group::start();
    let leader = g.leader();
    let go = g.dir.path().join("go");
    let mut held = waiting_runs(&g, &go, 1);
    wait_until("the held task to run", || {
        let o = run_bounded(&mut g.client(&["ps"]), 60);
        stdout(&o)
            .lines()
            .any(|l| l.contains("held-0") && l.contains("RUNNING"))
    });

    // Both followers stop: the leader hears no majority.
    let followers: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
    for f in &followers {
        signal(g.masters[f - 1].as_ref().unwrap(), libc::SIGSTOP);
    }
    let cut = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    let said = loop {
        let o = run_bounded(&mut g.client(&["masters"]), 30);
        let row = stdout(&o)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&leader.to_string()))
            .unwrap_or_default()
            .to_string();
        if code(&o) == 1 && row.split_whitespace().nth(3) == Some("follower") {
            break stderr(&o);
        }
        assert!(
            Instant::now() < deadline,
            "the cut-off leader still leads:\n{}{}",
            stdout(&o),
            stderr(&o)
        );
    };
    eprintln!(
        "quorum lost: the old leader had stopped leading {} ms after the cut (an upper bound: each `agora masters` waits 3 s for the stopped masters)",
        cut.elapsed().as_millis()
    );
    assert!(said.contains("no master leads"), "{said}");

    // The majority returns: a leader again, and the task that ran meanwhile ends
    // normally, reported to its waiting run.
    for f in &followers {
        signal(g.masters[f - 1].as_ref().unwrap(), libc::SIGCONT);
    }
    g.leader();
    std::fs::write(&go, b"").unwrap();
    let out = wait_child(&mut held[0], 120);
    let printed = read_out(&mut held[0]);
    assert!(
        printed.contains("run 0 survived"),
        "printed {printed:?}; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

/// `agora masters remove` and `add`: a master whose disk was wiped is refused while
/// the group counts it as a voter (it may have voted and forgotten it); removed, it
/// starts empty, is added back, catches up and votes; the group serves throughout.
#[test]
fn a_wiped_master_is_refused_until_removed_then_added_back() {
    let mut g = Group::start();
    let leader = g.leader();
    let victim = (1..=3).find(|i| *i != leader).unwrap();
    g.kill(victim);
    std::fs::remove_dir_all(g.dir.path().join(format!("master{victim}"))).unwrap();
    // Started again on its empty disk, it refuses and says what to do.
    let mut m = Command::new(AGORA);
    m.args(["master", "--id", &victim.to_string(), "--peers", &g.peers()])
        .args(["--listen", &g.addrs[victim - 1], "--http", "127.0.0.1:0"])
        .arg("--certs")
        .arg(&g.certs)
        .arg("--data-dir")
        .arg(g.dir.path().join(format!("master{victim}")));
    let o = run_bounded(&mut m, 60);
    assert_ne!(code(&o), 0, "a wiped voter started: {}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("agora masters remove {victim}")),
        "{}",
        stderr(&o)
    );

    // Bad changes are refused, naming the problem.
    let o = run_bounded(
        &mut g.client(&["masters", "add", &format!("{leader}=127.0.0.1:1")]),
        60,
    );
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("voting member already"),
        "{}",
        stderr(&o)
    );
    let o = run_bounded(&mut g.client(&["masters", "remove", "7"]), 60);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("not a member"), "{}", stderr(&o));

    // Removed, it starts on its empty disk, and is added back.
    let o = run_bounded(
        &mut g.client(&["masters", "remove", &victim.to_string()]),
        60,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    g.masters[victim - 1] = Some(g.master(victim));
    let member = format!("{victim}={}", g.addrs[victim - 1]);
    let o = run_bounded(&mut g.client(&["masters", "add", &member]), 60);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("votes now"), "{}", stdout(&o));
    let o = run_bounded(&mut g.client(&["masters"]), 30);
    let out = stdout(&o);
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&victim.to_string()))
        .unwrap_or_default();
    assert_eq!(row.split_whitespace().nth(3), Some("follower"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("group:") && l.contains(&member)),
        "{out}"
    );

    // The group still serves, and the re-added master counts: with the old leader
    // gone, the two others (the re-added one among them) elect a new one.
    g.kill(leader);
    let o = run_bounded(
        &mut g.client(&["run", guest("hello").to_str().unwrap(), "--", "after"]),
        120,
    );
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
}

/// `agora dev --masters 3`: three master processes and an agent; the leader's pid
/// (as printed) killed with kill -9, the next run goes through a new leader, and
/// `agora dev` starts the killed master again, which rejoins as a follower.
#[test]
fn dev_with_three_masters_goes_on_when_its_leader_is_killed() {
    let c = Cluster::start_with(&["--masters", "3", "--resources", "cpus:4;mem:4096"]);
    let masters: Vec<(String, i32)> = c
        .banner
        .iter()
        .filter(|l| l.trim_start().starts_with("master "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let pid = f
                .iter()
                .position(|w| *w == "pid")
                .and_then(|i| f.get(i + 1)?.parse().ok())
                .unwrap_or_else(|| panic!("no pid in {l:?}"));
            (f[1].to_string(), pid)
        })
        .collect();
    assert_eq!(masters.len(), 3, "{:?}", c.banner);
    let o = c.agora(&["run", guest("hello").to_str().unwrap(), "--", "before"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let role_of = |id: &str| -> Option<String> {
        let o = c.agora(&["masters"]);
        stdout(&o)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
    };
    let (leader, pid) = masters
        .iter()
        .find(|(id, _)| role_of(id).as_deref() == Some("leader"))
        .cloned()
        .expect("a leader");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let o = c.agora(&["run", guest("hello").to_str().unwrap(), "--", "after"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    wait_until("the killed master to be started again and follow", || {
        role_of(&leader).as_deref() == Some("follower")
    });
}

/// What goes wrong with the masters while the load runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MasterFault {
    /// kill -9 of the leader once a third of the tasks have ended.
    KillLeader,
    /// Each master in turn stopped (SIGTERM) and started again, the next one only
    /// once the last has caught up as a follower.
    RollingRestart,
}

/// A framework (the sdk, in this process, knowing all three masters) launches 300
/// tasks, wasm and native, while a function is called through the agent's HTTP door
/// and three `agora run`s wait on their tasks; the masters suffer `fault`. Every
/// task ends exactly once with the end it would have had without the fault (a
/// launch that died with a killed leader, which the new one knows nothing of, is
/// launched again: it never ran), no function call fails, every run prints its
/// output.
fn load_through_master_faults(fault: MasterFault) {
    use agora_sdk::{
        Client, ClientConfig, CommandInfo, Event, FrameworkInfo, Resources, TaskInfo, TaskState,
        WasmModule,
    };
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    const WASM: usize = 200;
    const NATIVE: usize = 100;
    let g = Group::start();
    let leader = g.leader();

    // A function with a host on the agent, called through the agent all along.
    let echo = guest("echo");
    let o = run_bounded(
        &mut g.client(&[
            "fn",
            "deploy",
            "echo",
            echo.to_str().unwrap(),
            "--min-instances",
            "1",
        ]),
        120,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let leader_http = g.http(leader);
    let deadline = Instant::now() + Duration::from_secs(60);
    let agent_http = loop {
        if let Some(h) = running_hosts(&leader_http, "echo").first() {
            break h.clone();
        }
        assert!(Instant::now() < deadline, "no echo host within 60 s");
        std::thread::sleep(Duration::from_millis(100)); // poll interval
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let caller = {
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        std::thread::spawn(move || {
            let mut first_failure = None;
            while !stop.load(Ordering::Relaxed) {
                let r = http("POST", &agent_http, "/fn/echo/during", b"ping");
                calls.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    first_failure.get_or_insert(format!("{} {}", r.status, r.body));
                }
                std::thread::sleep(Duration::from_millis(20)); // call pace
            }
            first_failure
        })
    };

    let go = g.dir.path().join("go");
    let mut runs = waiting_runs(&g, &go, 3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (seen, relaunched, g) = rt.block_on(async move {
        let cfg = ClientConfig::load(&g.config()).unwrap();
        let client = Client::connect(&cfg).await.unwrap();
        let (sha256, size) = client.upload_file(&guest("spin")).await.unwrap();
        let mut sched = client
            .subscribe(FrameworkInfo {
                name: "failover-load".into(),
                failover_timeout_seconds: 120.0,
                partition_aware: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let ask = Resources::cpus_mem(10, 8 << 20);
        let all: Vec<TaskInfo> = (0..WASM + NATIVE)
            .map(|i| {
                let mut t = TaskInfo {
                    task_id: format!("load-{i:03}"),
                    name: format!("load-{i:03}"),
                    resources: ask.to_proto(),
                    ..Default::default()
                };
                if i < WASM {
                    // Spins until its deadline: 0.3 to 2.7 s.
                    t.module = Some(WasmModule {
                        sha256: sha256.clone(),
                        size,
                        timeout_ms: 300 + (i as u64 * 37) % 2400,
                        ..Default::default()
                    });
                } else {
                    t.command = Some(CommandInfo {
                        shell: true,
                        value: format!("sleep 0.{}", 2 + i % 8),
                        ..Default::default()
                    });
                }
                t
            })
            .collect();
        let mut queue: Vec<TaskInfo> = all.iter().rev().cloned().collect();
        let mut launched: std::collections::HashSet<String> = Default::default();
        let mut ran: std::collections::HashSet<String> = Default::default();
        let mut seen: std::collections::HashMap<String, Vec<(TaskState, Vec<u8>, String)>> =
            Default::default();
        let mut relaunched = 0;
        let mut faulted = false;
        let mut restarts: Option<tokio::task::JoinHandle<Group>> = None;
        let mut g = Some(g);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        loop {
            let ended = seen.len();
            if ended == WASM + NATIVE {
                break;
            }
            if !faulted && ended >= (WASM + NATIVE) / 3 {
                faulted = true;
                let mut grp = g.take().unwrap();
                match fault {
                    MasterFault::KillLeader => {
                        let id = grp.leader();
                        grp.kill(id);
                        g = Some(grp);
                    }
                    MasterFault::RollingRestart => {
                        restarts = Some(tokio::task::spawn_blocking(move || {
                            for id in 1..=3 {
                                let p = grp.masters[id - 1].take().unwrap();
                                drop(p); // SIGTERM, waits for it to exit
                                grp.masters[id - 1] = Some(grp.master(id));
                                wait_until("the restarted master to catch up", || {
                                    let o = run_bounded(&mut grp.client(&["masters"]), 30);
                                    stdout(&o).lines().any(|l| {
                                        let f: Vec<&str> = l.split_whitespace().collect();
                                        f.first() == Some(&id.to_string().as_str())
                                            && matches!(f.get(3), Some(&"follower" | &"leader"))
                                            && f.get(7) == Some(&"0")
                                    })
                                });
                            }
                            grp
                        }));
                    }
                }
            }
            let ev = tokio::time::timeout_at(deadline, sched.next_event())
                .await
                .unwrap_or_else(|_| {
                    panic!("only {ended} of {} tasks ended within 300 s", WASM + NATIVE)
                })
                .expect("the scheduler's session ended");
            match ev {
                Event::Offers(offers) => {
                    for o in offers {
                        let mut free = Resources::from_proto(&o.resources).unwrap();
                        let mut batch = Vec::new();
                        while let Some(t) = queue.last() {
                            let need = Resources::from_proto(&t.resources).unwrap();
                            if !free.contains(&need) {
                                break;
                            }
                            free.sub(&need);
                            let mut t = queue.pop().unwrap();
                            t.agent_id = o.agent_id.clone();
                            launched.insert(t.task_id.clone());
                            batch.push(t);
                        }
                        if batch.is_empty() {
                            sched.decline(vec![o.offer_id], Some(3600.0)).await.unwrap();
                        } else {
                            sched
                                .accept(vec![o.offer_id], batch, Some(0.1))
                                .await
                                .unwrap();
                        }
                    }
                    if queue.is_empty() {
                        sched.suppress().await.unwrap();
                    }
                }
                Event::Reconnected => {
                    // Launches the old leader took and never passed on: ask.
                    let flying: Vec<String> = launched
                        .iter()
                        .filter(|id| !seen.contains_key(*id))
                        .cloned()
                        .collect();
                    sched.reconcile(flying).await.unwrap();
                    sched.revive().await.unwrap();
                }
                Event::Update(s) => {
                    sched.acknowledge(&s).await.unwrap();
                    let state = s.state();
                    if state == TaskState::TaskRunning {
                        ran.insert(s.task_id.clone());
                    }
                    let never_started = matches!(
                        state,
                        TaskState::TaskDropped | TaskState::TaskUnknown | TaskState::TaskLost
                    ) && s.agent_id.is_empty()
                        && !ran.contains(&s.task_id);
                    if never_started {
                        // Its launch died with a master (or went to one that had
                        // stopped leading): it never ran, so it is launched again.
                        if launched.remove(&s.task_id) && !seen.contains_key(&s.task_id) {
                            relaunched += 1;
                            let i: usize = s.task_id.trim_start_matches("load-").parse().unwrap();
                            queue.push(all[i].clone());
                            sched.revive().await.unwrap();
                        }
                    } else if state.is_terminal() {
                        let e = seen.entry(s.task_id.clone()).or_default();
                        // A reconciliation answer (no uuid) says how a task ended;
                        // it is not a second end.
                        if s.uuid.is_empty() && !e.is_empty() {
                            continue;
                        }
                        e.retain(|(_, u, _)| !u.is_empty());
                        if !e.iter().any(|(_, u, _)| *u == s.uuid) {
                            let what =
                                format!("{:?} at {} ms: {}", s.reason(), s.timestamp_ms, s.message);
                            e.push((state, s.uuid.clone(), what));
                        }
                    }
                }
                _ => {}
            }
        }
        let g = match (g, restarts) {
            (Some(g), _) => g,
            (None, Some(r)) => r.await.expect("the rolling restart"),
            (None, None) => unreachable!("the group is here or restarting"),
        };
        (seen, relaunched, g)
    });
    stop.store(true, Ordering::Relaxed);
    let first_failure = caller.join().unwrap();
    let lost = seen
        .values()
        .filter(|t| {
            t.iter()
                .any(|(st, _, _)| *st == agora_sdk::TaskState::TaskLost)
        })
        .count();
    let duplicated = seen.values().filter(|t| t.len() > 1).count();
    for (id, t) in &seen {
        let i: usize = id.trim_start_matches("load-").parse().unwrap();
        let want = if i < WASM {
            agora_sdk::TaskState::TaskFailed // its deadline
        } else {
            agora_sdk::TaskState::TaskFinished
        };
        assert_eq!(
            t[0].0, want,
            "task {id} ended as it would have without the fault"
        );
    }
    std::fs::write(&go, b"").unwrap();
    for (i, run) in runs.iter_mut().enumerate() {
        let out = wait_child(run, 120);
        let printed = read_out(run);
        assert!(
            printed.contains(&format!("run {i} survived")),
            "run {i}: stdout {printed:?}\nstderr: {}",
            stderr(&out)
        );
        assert_eq!(code(&out), (i % 3) as i32, "run {i}: {}", stderr(&out));
    }
    let (calls, failures) = (
        calls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    println!(
        "{fault:?} under load: launched {}, terminal {}, lost {lost}, duplicated {duplicated}, launched again (never ran) {relaunched}; function calls through the agent {calls}, failed {failures}; 3 of 3 runs printed their output",
        WASM + NATIVE,
        seen.len()
    );
    let dups: Vec<_> = seen.iter().filter(|(_, t)| t.len() > 1).take(3).collect();
    assert_eq!((lost, duplicated), (0, 0), "duplicated, e.g.: {dups:?}");
    assert_eq!(seen.len(), WASM + NATIVE);
    assert_eq!(
        failures, 0,
        "a call through the agent failed: {first_failure:?}"
    );
    drop(g);
}

#[test]
fn the_leader_killed_under_load_loses_no_task_and_function_calls_go_on() {
    load_through_master_faults(MasterFault::KillLeader);
}

#[test]
fn a_rolling_restart_of_every_master_under_load_loses_nothing() {
    load_through_master_faults(MasterFault::RollingRestart);
}
