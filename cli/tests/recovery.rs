//! Fault test: `agora agent` killed with SIGKILL while tasks run, and started again on
//! the same work dir. Executors (wasm and native) keep their tasks running, hold the
//! statuses of tasks that end meanwhile, and re-attach to the restarted agent, which
//! re-registers with the same id; every task ends once, with its real ending.

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
    fn start(addr: &str, certs: &Path, work: &Path, log: PathBuf) -> AgentProc {
        let mut cmd = Command::new(AGORA);
        cmd.args(["agent", "--master", addr, "--certs"])
            .arg(certs)
            .arg("--work-dir")
            .arg(work)
            .args([
                "--resources",
                "cpus:4;mem:4096",
                "--hostname",
                "recovery-host",
                "--recovery-timeout",
                "30",
            ])
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
    let socket = work.join("agent.sock").to_string_lossy().into_owned();
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

#[test]
fn agent_killed_and_restarted_reattaches_to_its_executors_and_tasks_end_once() {
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
    let client = |args: &[&str]| -> Command {
        let mut c = Command::new(AGORA);
        c.args(args)
            .env("AGORA_CONFIG", certs.join("client.json"))
            .env("AGORA_MASTER", &addr)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
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

    let mut agent = AgentProc::start(&addr, &certs, &work, dir.path().join("agent-1.log"));
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

    // kill -9 of the agent.
    let killed_at = Instant::now();
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
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

    // The same agent again, on the same work dir.
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
        "recovery: agent down {:?}; restart -> executors re-attached {:?}, -> re-registered {:?}; \
         kill -9 -> re-registered {:?}",
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

    // A clean stop takes the executors down with the agent.
    let mut agent = agent;
    agent.stop();
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
