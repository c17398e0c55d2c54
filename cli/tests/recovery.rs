//! Fault tests: `agora agent` killed with SIGKILL, or stopped with SIGTERM (what
//! `systemctl stop` and package upgrades do), while tasks run, and started again on
//! the same work dir. Executors (wasm and native) keep their tasks running, hold the
//! statuses of tasks that end meanwhile, and re-attach to the restarted agent, which
//! re-registers with the same id; every task ends once, with its real ending. A stop
//! with `--drain-on-stop` ends the tasks with the agent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How long the agent stays dead: long enough for the short tasks to end while
/// nobody listens (their executors must hold those statuses). A fault's length, not
/// a wait for something to happen.
const OUTAGE: Duration = Duration::from_secs(3);

/// An `agora agent` process with its log in a file; stopped with SIGTERM on drop.
struct AgentProc {
    child: Child,
    log: PathBuf,
}

impl AgentProc {
    /// An agent that drains on SIGTERM (so that a test's end stops its executors).
    fn start(addr: &str, certs: &Path, work: &Path, log: PathBuf) -> AgentProc {
        AgentProc::start_with(addr, certs, work, log, &["--drain-on-stop"])
    }

    fn start_with(
        addr: &str,
        certs: &Path,
        work: &Path,
        log: PathBuf,
        extra: &[&str],
    ) -> AgentProc {
        let mut cmd = Command::new(AGORA);
        cmd.args(["agent", "--master", addr, "--certs"])
            .arg(certs)
            .arg("--work-dir")
            .arg(work)
            .args([
                "--resources",
                "cpus:4;mem:4096;disk:1024",
                "--hostname",
                "recovery-host",
                "--recovery-timeout",
                "30",
            ])
            .args(extra)
            .env("AGORA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("agent log"));
        AgentProc {
            child: spawn_tied_to_process(cmd),
            log,
        }
    }

    /// The log so far, without colours.
    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Polls the log until it holds `needle`; returns when that was seen.
    fn wait_for(&self, needle: &str, secs: u64) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.log().contains(needle) {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not log {needle:?} within {secs} s; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10)); // poll interval
        }
    }

    /// SIGTERM, then waits (bounded) for the clean stop.
    fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20)); // waiting for process exit
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// `s` without ANSI escape sequences (the log's colours).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Executor processes serving the agent at `work`: (pid, framework id, executor id).
fn executors(work: &Path) -> Vec<(u32, String, String)> {
    let work = std::fs::canonicalize(work).unwrap_or_else(|_| work.to_path_buf());
    let socket = work
        .join("run")
        .join("agent.sock")
        .to_string_lossy()
        .into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        if args.iter().any(|a| a == "executor") && after("--socket").as_deref() == Some(&socket) {
            if let (Some(f), Some(e)) = (after("--framework-id"), after("--executor-id")) {
                found.push((pid, f, e));
            }
        }
    }
    found.sort();
    found
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// The framework a task belongs to, from its sandbox `<work>/sandboxes/<fw>/<task>`.
fn framework_of(work: &Path, task_id: &str) -> String {
    std::fs::read_dir(work.join("sandboxes"))
        .unwrap()
        .flatten()
        .find(|fw| fw.path().join(task_id).exists())
        .map(|fw| fw.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| panic!("no sandbox for task {task_id}"))
}

/// `agora certs init` into `dir/certs`, then an `agora master` process (data in
/// `dir/master`, `extra` flags) on a free port; the process and its address.
fn certs_and_master(dir: &Path, extra: &[&str]) -> (Proc, String) {
    let certs = dir.join("certs");
    let init = run_bounded(Command::new(AGORA).args(["certs", "init"]).arg(&certs), 60);
    assert_eq!(code(&init), 0, "{}", stderr(&init));
    let mut m = Command::new(AGORA);
    m.args(["master", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--certs")
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.join("master"));
    let (master, line) = Proc::start(m, |l| l.starts_with("master listening on "));
    let addr = line.split_whitespace().nth(3).unwrap().to_string();
    (master, addr)
}

/// An `agora ARGS` client of the master at `addr`, with the client configuration
/// in `certs`, its output captured.
fn client_of(certs: &Path, addr: &str, args: &[&str]) -> Command {
    let mut c = Command::new(AGORA);
    c.args(args)
        .env("AGORA_CONFIG", certs.join("client.json"))
        .env("AGORA_MASTER", addr)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits (bounded) for `child` to exit; its status.
fn finish_within(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(20)); // waiting for process exit
    }
}

/// Waits (bounded) for a process started with piped output to end.
fn finish(child: Child, secs: u64) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("`agora run` did not end within {secs} s");
        }
    }
}

/// How the agent is stopped before it is started again.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Stop {
    /// `kill -9`: a crash.
    Kill,
    /// SIGTERM without `--drain-on-stop`: a routine stop (an upgrade, a reboot).
    Term,
}

#[test]
fn agent_killed_and_restarted_reattaches_to_its_executors_and_tasks_end_once() {
    agent_stopped_and_restarted(Stop::Kill);
}

#[test]
fn agent_stopped_with_sigterm_keeps_its_tasks_shows_down_at_once_and_takes_them_back() {
    agent_stopped_and_restarted(Stop::Term);
}

fn agent_stopped_and_restarted(how: Stop) {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let work = dir.path().join("agent");
    let (_master, addr) = certs_and_master(dir.path(), &[]);
    let client = |args: &[&str]| client_of(&certs, &addr, args);
    let run = |args: &[&str]| run_bounded(&mut client(args), 120);
    let ps = |all: bool| stdout(&run(if all { &["ps", "--all"] } else { &["ps"] }));
    // Polls `agora ps` until a row with `name` shows `state`; returns the task id.
    let wait_state = |name: &str, state: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = ps(false);
            if let Some(row) = out
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name) && l.contains(state))
            {
                return row.split_whitespace().next().unwrap().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{name} not {state} within 60 s:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(100)); // poll interval
        }
    };

    // Started without --drain-on-stop: SIGTERM must keep the tasks.
    let mut agent =
        AgentProc::start_with(&addr, &certs, &work, dir.path().join("agent-1.log"), &[]);
    agent.wait_for("registered with the master", 60);
    let first_id = {
        let log = agent.log();
        let at = log.find("agent=").expect("agent id in the log");
        log[at + 6..].split_whitespace().next().unwrap().to_string()
    };
    let spin = guest("spin");
    let spin = spin.to_str().unwrap();
    let o = run(&["run", guest("hello").to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let hello_before = task_id(&o);

    // Two long tasks (wasm and native) and two short ones that will end while the
    // agent is dead.
    let long_wasm = client(&["run", "--name", "long-wasm", "--timeout", "15s", spin])
        .spawn()
        .unwrap();
    let long_native = client(&["run", "--name", "long-native", "--command", "sleep 15"])
        .spawn()
        .unwrap();
    let long_wasm_id = wait_state("long-wasm", "RUNNING");
    let long_native_id = wait_state("long-native", "RUNNING");
    let short_wasm = client(&["run", "--name", "short-wasm", "--timeout", "2s", spin])
        .spawn()
        .unwrap();
    let short_native = client(&["run", "--name", "short-native", "--command", "sleep 2"])
        .spawn()
        .unwrap();
    let short_wasm_id = wait_state("short-wasm", "RUNNING");
    let short_native_id = wait_state("short-native", "RUNNING");

    let before = executors(&work);
    let executor_of = |task: &str| -> (u32, String, String) {
        let fw = framework_of(&work, task);
        let mine: Vec<_> = executors(&work).into_iter().filter(|e| e.1 == fw).collect();
        assert_eq!(mine.len(), 1, "one executor for {task}: {mine:?}");
        mine[0].clone()
    };
    let wasm_exec = executor_of(&long_wasm_id);
    let native_exec = executor_of(&long_native_id);
    assert_eq!(wasm_exec.2, "default");
    assert_eq!(native_exec.2, "default-native");

    // kill -9, or SIGTERM, of the agent.
    let killed_at = Instant::now();
    match how {
        Stop::Kill => {
            agent.child.kill().unwrap();
            agent.child.wait().unwrap();
        }
        Stop::Term => {
            unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
            let status = finish_within(&mut agent.child, 30);
            assert!(status.success(), "a stop is a clean exit: {status:?}");
            assert!(
                agent.log().contains("tasks keep running"),
                "the stop says what happens to the tasks:\n{}",
                agent.log()
            );
            // The master hears of the stop at once, not after its agent timeout
            // (15 s here): `agora agents` shows the agent down within a few seconds.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let out = stdout(&run(&["agents"]));
                let row = out.lines().find(|l| l.starts_with(first_id.as_str()));
                if row.is_some_and(|r| r.split_whitespace().nth(2) == Some("down")) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the stopped agent is not shown down within 5 s:\n{out}"
                );
                std::thread::sleep(Duration::from_millis(50)); // poll interval
            }
            // Started again offering something else, it is refused, naming what
            // changed; a new identity is refused too while its tasks run.
            let o = run_bounded(
                Command::new(AGORA)
                    .args(["agent", "--master", &addr, "--certs"])
                    .arg(&certs)
                    .arg("--work-dir")
                    .arg(&work)
                    .args([
                        "--resources",
                        "cpus:2;mem:4096;disk:1024",
                        "--attributes",
                        "zone:z",
                    ]),
                60,
            );
            let err = stderr(&o);
            assert_ne!(code(&o), 0, "{err}");
            assert!(
                err.contains(&format!("agent {first_id}"))
                    && err.contains(
                        "resources were cpus:4;disk:1GiB;mem:4GiB, now cpus:2;disk:1GiB;mem:4GiB"
                    )
                    && err.contains("attributes were none, now zone:z")
                    && err.contains("--new-identity"),
                "{err}"
            );
            let o = run_bounded(
                Command::new(AGORA)
                    .args(["agent", "--new-identity", "--master", &addr, "--certs"])
                    .arg(&certs)
                    .arg("--work-dir")
                    .arg(&work),
                60,
            );
            let err = stderr(&o);
            assert_ne!(code(&o), 0, "{err}");
            assert!(
                err.contains("cannot start agent") && err.contains("would be lost track of"),
                "{err}"
            );
        }
    }
    let stderr_of = |fw: &str, ex: &str| {
        std::fs::read_to_string(work.join("executors").join(fw).join(ex).join("stderr"))
            .unwrap_or_default()
    };
    for (pid, fw, ex) in &before {
        assert!(
            alive(*pid),
            "executor {fw}/{ex} ({pid}) died with the agent; its stderr:\n{}",
            stderr_of(fw, ex)
        );
    }
    std::thread::sleep(OUTAGE); // the fault's length (see OUTAGE)
    for (pid, fw, ex) in &before {
        assert!(
            alive(*pid),
            "executor {fw}/{ex} ({pid}) gave up while the agent was away; its stderr:\n{}",
            stderr_of(fw, ex)
        );
    }

    // The same agent again, on the same work dir (draining on its stop, below).
    let restarted_at = Instant::now();
    let agent = AgentProc::start(&addr, &certs, &work, dir.path().join("agent-2.log"));
    let recovered_at = agent.wait_for("recovery done", 60);
    let registered_at = agent.wait_for("registered with the master", 60);
    let log = agent.log();
    assert!(
        log.contains(&format!("agent={first_id}")),
        "re-registered with the same id {first_id}:\n{log}"
    );
    assert_eq!(
        log.matches("executor re-attached after the agent restarted")
            .count(),
        before.len(),
        "every executor re-attached:\n{log}"
    );
    eprintln!(
        "recovery ({how:?}): agent down {:?}; restart -> executors re-attached {:?}, -> re-registered {:?}; \
         stop -> re-registered {:?}",
        restarted_at - killed_at,
        recovered_at - restarted_at,
        registered_at - restarted_at,
        registered_at - killed_at,
    );

    // The short tasks ended while the agent was dead: their real endings arrive.
    let o = finish(short_wasm, 60);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        final_line(&o).ends_with("FAILED: deadline of 2s exceeded"),
        "{}",
        stderr(&o)
    );
    let o = finish(short_native, 60);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(final_line(&o).ends_with("FINISHED"), "{}", stderr(&o));

    // The long ones still run in the same executor processes, and new work runs.
    assert_eq!(
        executor_of(&long_wasm_id),
        wasm_exec,
        "same wasm executor process"
    );
    assert_eq!(
        executor_of(&long_native_id),
        native_exec,
        "same native executor process"
    );
    assert!(alive(wasm_exec.0) && alive(native_exec.0));
    let o = run(&["run", guest("hello").to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let hello_after = task_id(&o);

    // ...and end the way they would have without the fault.
    let o = finish(long_wasm, 60);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        final_line(&o).ends_with("FAILED: deadline of 15s exceeded"),
        "{}",
        stderr(&o)
    );
    let o = finish(long_native, 60);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(final_line(&o).ends_with("FINISHED"), "{}", stderr(&o));

    // The master's view: every task once, ended, none LOST.
    let all = ps(true);
    for (id, state) in [
        (&hello_before, "FINISHED"),
        (&long_wasm_id, "FAILED"),
        (&long_native_id, "FINISHED"),
        (&short_wasm_id, "FAILED"),
        (&short_native_id, "FINISHED"),
        (&hello_after, "FINISHED"),
    ] {
        let rows: Vec<&str> = all.lines().filter(|l| l.starts_with(id.as_str())).collect();
        assert_eq!(rows.len(), 1, "task {id} listed once:\n{all}");
        assert_eq!(
            rows[0].split_whitespace().nth(2),
            Some(state),
            "task {id}:\n{all}"
        );
    }
    assert!(!all.contains("LOST"), "{all}");
    assert_eq!(ps(false).lines().count(), 1, "nothing left running");

    // A stop with --drain-on-stop ends what runs, saying so, and takes the executors
    // down with the agent.
    let drained = client(&["run", "--name", "drained", "--command", "sleep 60"])
        .spawn()
        .unwrap();
    wait_state("drained", "RUNNING");
    let mut agent = agent;
    agent.stop();
    let o = finish(drained, 60);
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(
        final_line(&o).contains("KILLED: killed: the agent was stopped with its tasks (drain)"),
        "{}",
        stderr(&o)
    );
    if how == Stop::Term {
        // Drained, it may start afresh with other resources, as a new agent.
        let fresh = AgentProc::start_with(
            &addr,
            &certs,
            &work,
            dir.path().join("agent-3.log"),
            &[
                "--drain-on-stop",
                "--new-identity",
                "--attributes",
                "zone:z",
            ],
        );
        fresh.wait_for("registered with the master", 60);
        let log = fresh.log();
        assert!(
            log.contains("starting as a new agent") && !log.contains(&format!("agent={first_id}")),
            "{log}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !executors(&work).is_empty() {
        assert!(
            Instant::now() < deadline,
            "executors outlived a clean stop: {:?}",
            executors(&work)
        );
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    }
}

/// A machine that dies for good: the agent and its executors are killed, the task
/// becomes UNREACHABLE, and `agora agent gone` ends it GONE, which the waiting `agora
/// run` hears.
#[test]
fn an_agent_that_never_returns_is_marked_gone_and_the_run_waiting_on_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let work = dir.path().join("agent");
    let (_master, addr) = certs_and_master(dir.path(), &["--agent-timeout", "2"]);
    let client = |args: &[&str]| client_of(&certs, &addr, args);
    let run = |args: &[&str]| run_bounded(&mut client(args), 120);
    let mut agent = AgentProc::start_with(&addr, &certs, &work, dir.path().join("agent.log"), &[]);
    agent.wait_for("registered with the master", 60);
    let agent_id = {
        let log = agent.log();
        let at = log.find("agent=").expect("agent id in the log");
        log[at + 6..].split_whitespace().next().unwrap().to_string()
    };
    let spin = guest("spin");
    let waiting = client(&[
        "run",
        "--name",
        "doomed",
        "--timeout",
        "600s",
        spin.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    wait_until("the task runs", || {
        stdout(&run(&["ps"]))
            .lines()
            .any(|l| l.contains("doomed") && l.contains("RUNNING"))
    });
    // The machine dies: the agent and its executors.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    for (pid, _, _) in executors(&work) {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    wait_until("the task is UNREACHABLE and the agent listed so", || {
        stdout(&run(&["ps"])).contains("UNREACHABLE")
            && stdout(&run(&["agents"]))
                .lines()
                .any(|l| l.starts_with(agent_id.as_str()) && l.contains("unreachable"))
    });

    // Without --yes (and no terminal to ask on) nothing happens.
    let o = run(&["agent", "gone", &agent_id]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("pass --yes to confirm"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&run(&["ps"])).contains("UNREACHABLE"));
    let o = run(&["agent", "gone", "no-such-agent", "--yes"]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("no agent with id no-such-agent"),
        "{}",
        stderr(&o)
    );

    let o = run(&["agent", "gone", &agent_id, "--yes"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!(
            "agent {agent_id} marked gone; 1 tasks reported GONE"
        )),
        "{}",
        stdout(&o)
    );
    let o = finish(waiting, 60);
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(
        final_line(&o).ends_with("GONE: the operator marked its agent gone"),
        "{}",
        stderr(&o)
    );
    assert!(!stdout(&run(&["agents"])).contains(&agent_id));
    let all = stdout(&run(&["ps", "--all"]));
    assert!(
        all.lines()
            .any(|l| l.contains("doomed") && l.contains("GONE")),
        "{all}"
    );
}

#[test]
fn an_executor_killed_fails_its_tasks_naming_its_end_and_other_frameworks_go_on() {
    let c = Cluster::start();
    let spin = guest("spin");
    let launch = |name: &str| -> Child {
        Command::new(AGORA)
            .args(["run", "--name", name, spin.to_str().unwrap()])
            .env("AGORA_CONFIG", &c.config)
            .env_remove("AGORA_MASTER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_running = |name: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = stdout(&c.agora(&["ps"]));
            if let Some(row) = out
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name) && l.contains("RUNNING"))
            {
                return row.split_whitespace().next().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "{name} not RUNNING:\n{out}");
            std::thread::sleep(Duration::from_millis(100)); // poll interval
        }
    };
    // Two frameworks (two `agora run`s), each with an executor of its own.
    let victim = launch("victim");
    let victim_id = wait_running("victim");
    let bystander = launch("bystander");
    let bystander_id = wait_running("bystander");
    let work = c.agent_dir();
    let executor_of = |task: &str| -> u32 {
        let fw = framework_of(&work, task);
        let mine: Vec<_> = executors(&work).into_iter().filter(|e| e.1 == fw).collect();
        assert_eq!(mine.len(), 1, "one executor for {task}: {mine:?}");
        mine[0].0
    };
    let victim_pid = executor_of(&victim_id);
    let bystander_pid = executor_of(&bystander_id);
    assert_ne!(victim_pid, bystander_pid);

    unsafe { libc::kill(victim_pid as i32, libc::SIGKILL) };
    let o = finish(victim, 60);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        final_line(&o).contains(&format!(
            "task {victim_id} FAILED: executor default: killed by signal 9"
        )),
        "{}",
        stderr(&o)
    );
    // The other framework's executor and task are untouched.
    assert!(alive(bystander_pid));
    assert_eq!(executor_of(&bystander_id), bystander_pid);
    let row = stdout(&c.agora(&["ps"]))
        .lines()
        .find(|l| l.starts_with(&bystander_id))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(row.contains("RUNNING"), "{row}");
    let k = c.agora(&["kill", &bystander_id]);
    assert_eq!(code(&k), 0, "{}", stderr(&k));
    let o = finish(bystander, 60);
    assert_eq!(code(&o), 137, "{}", stderr(&o));
    let all = stdout(&c.agora(&["ps", "--all"]));
    let row = all
        .lines()
        .find(|l| l.starts_with(&victim_id))
        .unwrap_or_default();
    assert!(
        row.contains("FAILED") && row.contains("EXECUTOR_TERMINATED"),
        "{all}"
    );
}

/// Fault test: the master killed with SIGKILL while a task runs, and started again on
/// the same address and data dir. The agent re-registers with its task, the framework
/// (`agora run`, started before the crash) re-subscribes with its id by itself and
/// still prints the task's output and exits with its code; weights and quotas set
/// before the crash are still there.
#[test]
fn master_killed_and_restarted_keeps_tasks_frameworks_weights_and_quotas() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let init = run_bounded(Command::new(AGORA).args(["certs", "init"]).arg(&certs), 60);
    assert_eq!(code(&init), 0, "{}", stderr(&init));
    let master = |listen: &str| {
        let mut m = Command::new(AGORA);
        m.args(["master", "--listen", listen, "--certs"])
            .arg(&certs)
            .arg("--data-dir")
            .arg(dir.path().join("master"));
        Proc::start(m, |l| l.starts_with("master listening on "))
    };
    let (mut first, line) = master("127.0.0.1:0");
    let addr = line.split_whitespace().nth(3).unwrap().to_string();
    let _agent = AgentProc::start(
        &addr,
        &certs,
        &dir.path().join("agent"),
        dir.path().join("agent.log"),
    );
    let client = |args: &[&str]| client_of(&certs, &addr, args);
    let ok = |args: &[&str]| {
        let o = run_bounded(&mut client(args), 120);
        assert_eq!(code(&o), 0, "agora {args:?}: {}", stderr(&o));
        stdout(&o)
    };
    let survivor_row = || {
        let o = run_bounded(&mut client(&["ps", "--all"]), 120);
        stdout(&o)
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("survivor"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    ok(&["role", "weight", "set", "eng", "2"]);
    ok(&[
        "quota",
        "set",
        "eng",
        "--guarantee",
        "cpus:0.5",
        "--limit",
        "cpus:2;mem:2GiB",
    ]);

    let go = dir.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo survived the master; exit 4",
        go.display()
    );
    let mut run = spawn_tied_to_process(client(&[
        "run",
        "--name",
        "survivor",
        "--role",
        "eng",
        "--cpus",
        "0.5",
        "--mem",
        "64MiB",
        "--command",
        &script,
    ]));
    let deadline = Instant::now() + Duration::from_secs(60);
    let task = loop {
        if let Some(r) = survivor_row().iter().find(|r| r.contains("RUNNING")) {
            break r.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "survivor never ran");
        std::thread::sleep(Duration::from_millis(100)); // poll interval
    };

    // A task that ends before the restart: its history must survive it.
    let o = run_bounded(
        &mut client(&[
            "run",
            "--name",
            "before",
            guest("hello").to_str().unwrap(),
            "--",
            "x",
        ]),
        120,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = task_id(&o);
    let before_out = stdout(&o);
    assert!(!before_out.is_empty());

    // kill -9 the master, then start it again where it was.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let restarted = Instant::now();
    let (_second, _) = master(&addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = survivor_row();
        if rows
            .iter()
            .any(|r| r.starts_with(&task) && r.contains("RUNNING"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the task did not come back: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    }
    let recovered = restarted.elapsed();
    // The task that ended before the restart is still listed, its output readable
    // and explained (the agent's history, re-sent when it re-registered).
    let all = ok(&["ps", "--all"]);
    assert!(
        all.lines()
            .any(|l| l.starts_with(&before) && l.split_whitespace().nth(2) == Some("FINISHED")),
        "{all}"
    );
    assert_eq!(ok(&["logs", &before]), before_out);
    let why = ok(&["explain", &before]);
    assert!(why.contains("FINISHED"), "{why}");
    let roles = ok(&["role", "ls"]);
    let eng = roles
        .lines()
        .find(|l| l.starts_with("eng "))
        .unwrap_or_else(|| panic!("{roles}"));
    assert!(
        eng.split_whitespace().nth(1) == Some("2"),
        "weight kept: {roles}"
    );
    let quota = ok(&["quota", "get", "eng"]);
    assert!(
        quota.contains("cpus:0.5") && quota.contains("cpus:2"),
        "quota kept: {quota}"
    );

    std::fs::write(&go, b"").unwrap();
    let out = wait_child(&mut run, 120);
    let mut printed = String::new();
    if let Some(mut s) = run.stdout.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut printed);
    }
    assert!(
        printed.contains("survived the master"),
        "stdout: {printed}\nstderr: {}",
        stderr(&out)
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let rows = survivor_row();
    assert_eq!(rows.len(), 1, "one task, ended once: {rows:?}");
    assert!(
        rows[0].starts_with(&task) && rows[0].contains("FAILED"),
        "{rows:?}"
    );
    println!(
        "master restart: launched 1, terminal 1, lost 0, duplicated 0; task known RUNNING again {:.2} s after the new master started",
        recovered.as_secs_f64()
    );
}

/// What the framework saw of one task.
#[derive(Default)]
struct Seen {
    /// Distinct (state, uuid) of terminal updates: more than one is a duplicate end.
    terminal: Vec<(agora_sdk::TaskState, Vec<u8>)>,
    /// The first terminal update's message.
    message: String,
}

/// Fault test under load: a framework (the sdk, in this process) launches a few
/// hundred tasks, wasm and native; the agent is killed with SIGKILL once a third of
/// them have ended, and started again. Every task ends exactly once, with the ending
/// it would have had without the fault, and none is LOST.
#[test]
fn agent_killed_in_the_middle_of_hundreds_of_tasks_loses_none() {
    use agora_sdk::{
        Client, ClientConfig, CommandInfo, Event, FrameworkInfo, Resources, TaskInfo, TaskState,
        WasmModule,
    };
    const WASM: usize = 200;
    const NATIVE: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let work = dir.path().join("agent");
    let init = run_bounded(Command::new(AGORA).args(["certs", "init"]).arg(&certs), 60);
    assert_eq!(code(&init), 0, "{}", stderr(&init));
    let mut m = Command::new(AGORA);
    m.args(["master", "--listen", "127.0.0.1:0", "--certs"])
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.path().join("master"));
    let (_master, line) = Proc::start(m, |l| l.starts_with("master listening on "));
    let addr = line.split_whitespace().nth(3).unwrap().to_string();
    let mut agent = Some(AgentProc::start(
        &addr,
        &certs,
        &work,
        dir.path().join("agent-1.log"),
    ));
    agent
        .as_ref()
        .unwrap()
        .wait_for("registered with the master", 60);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (seen, killed_after, outage_end) = rt.block_on(async {
        let mut cfg = ClientConfig::load(&certs.join("client.json")).unwrap();
        cfg.master = addr.clone();
        let client = Client::connect(&cfg).await.unwrap();
        let (sha256, size) = client.upload_file(&guest("spin")).await.unwrap();
        let mut sched = client
            .subscribe(FrameworkInfo {
                name: "fault-load".into(),
                failover_timeout_seconds: 120.0,
                partition_aware: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let ask = Resources::cpus_mem(10, 8 << 20);
        let mut queue: Vec<TaskInfo> = (0..WASM + NATIVE)
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
        queue.reverse();
        let mut seen: std::collections::HashMap<String, Seen> = Default::default();
        let mut killed_after = None;
        let mut outage_end = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
        loop {
            let ended = seen.values().filter(|s| !s.terminal.is_empty()).count();
            if ended == WASM + NATIVE {
                break;
            }
            if killed_after.is_none() && ended >= (WASM + NATIVE) / 3 {
                // kill -9 of the agent with ~200 tasks in every phase of their lives.
                let mut a = agent.take().unwrap();
                a.child.kill().unwrap();
                a.child.wait().unwrap();
                killed_after = Some(ended);
                tokio::time::sleep(OUTAGE).await; // the fault's length (see OUTAGE)
                agent = Some(AgentProc::start(
                    &addr,
                    &certs,
                    &work,
                    dir.path().join("agent-2.log"),
                ));
                outage_end = Some(Instant::now());
            }
            let ev = tokio::time::timeout_at(deadline, sched.next_event())
                .await
                .unwrap_or_else(|_| {
                    panic!("only {ended} of {} tasks ended within 240 s", WASM + NATIVE)
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
                Event::Update(s) => {
                    sched.acknowledge(&s).await.unwrap();
                    let state = s.state();
                    assert!(state != TaskState::TaskDropped, "no launch was lost: {s:?}");
                    if state.is_terminal() {
                        let e = seen.entry(s.task_id.clone()).or_default();
                        if !e.terminal.iter().any(|(_, u)| *u == s.uuid) {
                            if e.terminal.is_empty() {
                                e.message = s.message.clone();
                            }
                            e.terminal.push((state, s.uuid.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        (seen, killed_after, outage_end)
    });
    let lost = seen
        .values()
        .filter(|s| {
            s.terminal
                .iter()
                .any(|(st, _)| *st == agora_sdk::TaskState::TaskLost)
        })
        .count();
    let duplicated = seen.values().filter(|s| s.terminal.len() > 1).count();
    for (id, s) in &seen {
        let i: usize = id.trim_start_matches("load-").parse().unwrap();
        let want = if i < WASM {
            agora_sdk::TaskState::TaskFailed // its deadline
        } else {
            agora_sdk::TaskState::TaskFinished
        };
        assert_eq!(
            s.terminal[0].0, want,
            "task {id} ended as it would have without the fault: {}",
            s.message
        );
    }
    println!(
        "agent kill -9 under load: launched {}, terminal {}, lost {lost}, duplicated {duplicated}; killed after {} had ended; the rest ended within {:?} of the agent's restart",
        WASM + NATIVE,
        seen.len(),
        killed_after.unwrap(),
        outage_end.map(|t| t.elapsed()),
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert_eq!(seen.len(), WASM + NATIVE);
}

/// `agora dev` killed with SIGKILL and started again on the same data directory while
/// `runs` `agora run`s wait on their tasks; with `squat`, the test holds the master's
/// QUIC port meanwhile, so the cluster must come back on a new one. Returns whether
/// it came back on the same addresses; asserts every run printed its output and
/// exited with its code.
fn dev_crash_and_restart(runs: usize, squat: bool, extra: &[&str]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let dev = || {
        let mut cmd = Command::new(AGORA);
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(&data)
            .args(["--resources", "cpus:4;mem:4096"])
            .args(extra);
        Proc::start(cmd, |l| l == "ready")
    };
    let (mut first, _) = dev();
    let config = data.join("client.json");
    let addresses = std::fs::read_to_string(data.join("addresses.json")).expect("addresses.json");
    let client = |args: &[&str]| -> Command {
        let mut c = Command::new(AGORA);
        c.args(args)
            .env("AGORA_CONFIG", &config)
            .env_remove("AGORA_MASTER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let go = dir.path().join("go");
    let mut children: Vec<Child> = (0..runs)
        .map(|i| {
            let args = held_run_args("crash", i, &go);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn_tied_to_process(client(&args))
        })
        .collect();
    wait_running(
        || stdout(&run_bounded(&mut client(&["ps"]), 60)),
        "crash-",
        runs,
    );

    // kill -9 of the whole cluster; the executors (separate processes) live on.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let _squatter = squat.then(|| {
        let v: serde_json::Value = serde_json::from_str(&addresses).unwrap();
        let master = v["master"].as_str().expect("master address");
        std::net::UdpSocket::bind(master).expect("the killed master's port is free")
    });
    let (_second, _) = dev();
    let again = std::fs::read_to_string(data.join("addresses.json")).expect("addresses.json");
    std::fs::write(&go, b"").unwrap();
    for (i, run) in children.iter_mut().enumerate() {
        let out = wait_child(run, 120);
        let mut printed = String::new();
        if let Some(mut s) = run.stdout.take() {
            use std::io::Read;
            let _ = s.read_to_string(&mut printed);
        }
        assert!(
            printed.contains(&format!("run {i} survived")),
            "run {i}: stdout {printed:?}\nstderr: {}",
            stderr(&out)
        );
        assert_eq!(code(&out), (i % 3) as i32, "run {i}: {}", stderr(&out));
    }
    println!(
        "agora dev kill -9 and restart (port held: {squat}): {runs} of {runs} runs printed their output and exited with their code"
    );
    again == addresses
}

/// Fault test: a whole `agora dev` (master, agent and gateway in one process) killed
/// with SIGKILL while 20 `agora run`s wait on their tasks, and started again on the
/// same data directory. It comes back on the addresses it chose the first time, so
/// every `agora run` started before the crash finds it again by itself: all 20 print
/// their task's output and exit with its code.
#[test]
fn a_dev_cluster_killed_and_restarted_comes_back_where_it_was_and_every_run_ends() {
    assert!(
        dev_crash_and_restart(20, false, &[]),
        "the restarted cluster took the same addresses"
    );
}

/// The same with the master's old port taken by someone else meanwhile: the cluster
/// comes back on a new port, writes it into its client configuration, and the runs
/// started before the crash read it there and follow.
#[test]
fn runs_follow_a_dev_cluster_that_came_back_on_another_port() {
    assert!(
        !dev_crash_and_restart(3, true, &[]),
        "the cluster came back on a new address"
    );
}

/// The same with `agora dev --masters 3`: its three master processes die with it
/// (none is left holding a port), and the group comes back on the same addresses,
/// where the runs started before the crash find it.
#[test]
fn a_dev_group_of_three_killed_and_restarted_comes_back_where_it_was_and_every_run_ends() {
    assert!(
        dev_crash_and_restart(5, false, &["--masters", "3"]),
        "the restarted group took the same addresses"
    );
}
