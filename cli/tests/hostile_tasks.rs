//! Hostile input (issue 13), through the real `agora` binary and an `agora dev`
//! cluster: native tasks run as an unprivileged user in a private 0700 sandbox and
//! cannot reach other sandboxes or the host's secrets; `agora logs` never follows a
//! task's symlink out of its sandbox; input paths that escape are refused by the
//! client and by the agent; only executors the agent started may register on its
//! socket; root tasks need the agent's consent.
//!
//! These tests need root (to switch users) and skip, saying why, without it.
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
use std::os::unix::net::UnixStream;
use std::time::Duration;

use agora_proto::v1::{CommandInfo, FrameworkInfo, InputFile, TaskInfo, TaskState};
use agora_proto::Resources;
use agora_sdk::{Client, ClientConfig, Event};
use common::*;
use prost::Message;

fn root() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root to run tasks as another user");
    }
    root
}

/// One cluster with the agent's defaults (tasks as `nobody`, no root tasks).
fn cluster() -> &'static Cluster {
    static C: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();
    C.get_or_init(Cluster::start)
}

fn uid_of(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    let p = unsafe { libc::getpwnam(c.as_ptr()) };
    assert!(!p.is_null(), "user {name} exists on this machine");
    unsafe { (*p).pw_uid }
}

#[test]
fn native_tasks_run_as_nobody_in_a_private_sandbox() {
    if !root() {
        return;
    }
    let c = cluster();
    let o = c.agora(&[
        "run",
        "--command",
        "id -u; id -G; stat -c '%a %u' .. .; pwd; echo made > mine && cat mine",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    let nobody = uid_of("nobody");
    assert_eq!(lines[0], nobody.to_string(), "runs as nobody: {out}");
    assert!(
        !lines[1].split_whitespace().any(|g| g == "0"),
        "no root group left: {out}"
    );
    assert_eq!(
        lines[2],
        format!("700 {nobody}"),
        "the sandbox is nobody's, mode 0700: {out}"
    );
    assert_eq!(lines[3], format!("755 {nobody}"), "{out}");
    assert_eq!(lines[5], "made", "the task can write its sandbox: {out}");
    // The same, seen from outside: the sandbox on the agent's disk.
    use std::os::unix::fs::MetadataExt;
    let sandbox = std::path::Path::new(lines[4])
        .parent()
        .unwrap()
        .to_path_buf();
    let meta = std::fs::metadata(&sandbox).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o700, nobody));
    // The directories above it may be crossed, not listed, by anyone else.
    let work = c.agent_dir();
    for d in [
        work.clone(),
        work.join("sandboxes"),
        sandbox.parent().unwrap().to_path_buf(),
    ] {
        let m = std::fs::metadata(&d).unwrap().mode() & 0o777;
        assert_eq!(m, 0o711, "{}", d.display());
    }
    for d in ["run", "artifacts", "executors"] {
        let m = std::fs::metadata(work.join(d)).unwrap().mode() & 0o777;
        assert_eq!(m, 0o700, "{d}");
    }
}

#[test]
fn a_task_cannot_read_another_sandbox_or_the_hosts_secrets() {
    if !root() {
        return;
    }
    let c = cluster();
    let a = c.agora(&[
        "run",
        "--command",
        "echo SECRET-OF-A; echo SECRET-OF-A > fs-file; pwd",
    ]);
    assert_eq!(code(&a), 0, "{}", stderr(&a));
    let a_fs = stdout(&a).lines().nth(1).unwrap().to_string();
    let a_sandbox = std::path::Path::new(&a_fs)
        .parent()
        .unwrap()
        .display()
        .to_string();
    assert!(
        std::fs::read_to_string(format!("{a_fs}/fs-file"))
            .unwrap()
            .contains("SECRET-OF-A"),
        "the file is there for root to see"
    );
    // Every way in: the sandbox's stdout, a file in its root, the directory
    // listing, the agent's checkpoint and socket directory, and /etc/shadow.
    let script = format!(
        "for f in {a_sandbox}/stdout {a_fs}/fs-file /etc/shadow; do \
           if cat $f; then echo READ $f; else echo DENIED $f; fi; done; \
         if ls {a_sandbox} {a_sandbox}/..; then echo LISTED; fi; \
         if ls {work}/run {work}/checkpoint.redb; then echo LISTED-WORK; fi; exit 0",
        work = c.agent_dir().display()
    );
    let b = c.agora(&["run", "--command", &script]);
    assert_eq!(code(&b), 0, "{}", stderr(&b));
    let out = stdout(&b);
    assert!(
        !out.contains("SECRET-OF-A"),
        "read another task's files: {out}"
    );
    assert!(!out.contains("root:"), "read /etc/shadow: {out}");
    assert!(!out.contains("READ "), "{out}");
    assert!(!out.contains("LISTED"), "{out}");
    assert_eq!(out.matches("DENIED ").count(), 3, "{out}");
    let err = stderr(&b);
    assert!(err.contains("/etc/shadow: Permission denied"), "{err}");
    // The other sandbox is not even there for the task (its own mount namespace).
    assert!(
        err.contains(&format!("{a_sandbox}/stdout: No such file or directory")),
        "{err}"
    );
}

/// Host pids of processes whose command line holds `marker`.
fn pids_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Tasks of one user (both run as `nobody`) but of two frameworks cannot reach each
/// other through /proc: each framework's executor has a PID namespace, and each task
/// that namespace's /proc, so another framework's task's processes,
/// its working directory (/proc/PID/cwd leads into its sandbox, whatever the mount
/// namespace hides) and its environment are not there, and it cannot be signalled.
#[test]
fn a_task_cannot_see_enter_or_signal_another_tasks_processes() {
    if !root() {
        return;
    }
    let c = Cluster::start();
    let c = &c;
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let script = format!(
        "echo SECRET-OF-A > secret; while [ ! -e {} ]; do sleep 0.05; done; echo A-ENDS",
        go.display()
    );
    let mut a = std::process::Command::new(AGORA);
    a.args([
        "run",
        "--name",
        "proc-a",
        "--env",
        "HIDDEN=SECRET-ENV-OF-A",
        "--command",
        &script,
    ])
    .env("AGORA_CONFIG", &c.config)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut a = spawn_tied_to_process(a);
    wait_running(|| stdout(&c.agora(&["ps"])), "proc-a", 1);
    let a_pids = pids_with(&go.display().to_string());
    assert!(!a_pids.is_empty(), "task A's shell is seen from the host");
    let pids = a_pids
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let b = c.agora(&[
        "run",
        "--command",
        &format!(
            "echo MINE $(ls /proc | grep -cE '^[0-9]+$'); \
             for p in /proc/[0-9]*; do cat $p/cwd/secret $p/root$PWD/secret 2>/dev/null; \
               tr '\\0' '\\n' < $p/environ 2>/dev/null | grep SECRET; done; \
             for p in {pids}; do \
               if kill -STOP $p 2>/dev/null; then echo SIGNALLED $p; fi; \
               if cat /proc/$p/cwd/secret 2>/dev/null; then echo ENTERED $p; fi; done; \
             echo B-DONE"
        ),
    ]);
    assert_eq!(code(&b), 0, "{}", stderr(&b));
    let out = stdout(&b);
    assert!(out.contains("B-DONE"), "{out}");
    assert!(!out.contains("SECRET-OF-A"), "read task A's sandbox: {out}");
    assert!(
        !out.contains("SECRET-ENV-OF-A"),
        "read task A's environment: {out}"
    );
    assert!(!out.contains("SIGNALLED"), "{out}");
    assert!(!out.contains("ENTERED"), "{out}");
    // Its own /proc shows only its own few processes (the namespace's init, the
    // shell, ls, grep).
    let mine: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("MINE "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count: {out}"));
    assert!(mine <= 6, "task B sees {mine} processes: {out}");
    // A was not stopped: it ends when told to, with its code.
    std::fs::write(&go, "").unwrap();
    let o = wait_child(&mut a, 60);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn logs_refuse_symlinks_that_lead_out_of_the_sandbox() {
    if !root() {
        return;
    }
    let c = cluster();
    let a = c.agora(&["run", "--command", "echo OUTPUT-OF-A"]);
    assert_eq!(code(&a), 0, "{}", stderr(&a));
    let a_id = task_id(&a);
    // The task swaps its own stdout and stderr for symlinks: one to /etc/shadow, one
    // climbing to the other task's sandbox.
    let b = c.agora(&[
        "run",
        "--command",
        &format!(
            "rm -f ../stdout ../stderr && ln -s /etc/shadow ../stdout && ln -s ../{a_id}/stdout ../stderr"
        ),
    ]);
    assert_eq!(code(&b), 0, "{}", stderr(&b));
    let b_id = task_id(&b);
    let o = c.agora(&["logs", &b_id]);
    assert_ne!(code(&o), 0, "agora logs must fail: {}", stdout(&o));
    assert!(!stdout(&o).contains("root:"), "printed /etc/shadow");
    assert!(
        stderr(&o).contains("`stdout`") && stderr(&o).contains("leads out of the sandbox"),
        "{}",
        stderr(&o)
    );
    let o = c.agora(&["logs", "--stderr", &b_id]);
    assert_ne!(code(&o), 0, "agora logs --stderr must fail: {}", stdout(&o));
    assert!(
        !stdout(&o).contains("OUTPUT-OF-A"),
        "printed another task's output"
    );
    assert!(
        stderr(&o).contains("`stderr`") && stderr(&o).contains("leads out of the sandbox"),
        "{}",
        stderr(&o)
    );
    // The other task's own logs still read.
    assert_eq!(stdout(&c.agora(&["logs", &a_id])), "OUTPUT-OF-A\n");
}

#[test]
fn input_paths_that_escape_are_refused_by_the_client() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "data.txt", "data");
    let f = file.display().to_string();
    let link = dir.path().join("link.txt");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let sub = dir.path().join("tree");
    std::fs::create_dir(&sub).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", sub.join("shadow")).unwrap();
    let cases = [
        (
            format!("{f}:/etc/cron.d/x"),
            "/etc/cron.d/x".to_string(),
            "absolute",
        ),
        (format!("{f}:a/../../x"), "a/../../x".to_string(), "`..`"),
        (
            link.display().to_string(),
            link.display().to_string(),
            "symlink",
        ),
        (
            sub.display().to_string(),
            sub.join("shadow").display().to_string(),
            "symlink",
        ),
    ];
    for (spec, named, why) in cases {
        let o = c.agora(&["run", "--input", &spec, "--command", "true"]);
        assert_ne!(code(&o), 0, "{spec}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(&named) && err.contains(why), "{spec}: {err}");
        assert!(
            !err.contains("task "),
            "no task was started for {spec}: {err}"
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A framework that skips the client's checks gets its task refused, naming the
/// path, and nothing is written outside the sandbox.
#[test]
fn input_paths_that_escape_are_refused_for_frameworks_that_skip_the_client() {
    let c = cluster();
    let escape = c.agent_dir().join("sandboxes").join("escaped-here");
    runtime().block_on(async {
        let cfg = ClientConfig::load(&c.config).unwrap();
        let client = Client::connect(&cfg).await.unwrap();
        let mut s = client
            .subscribe(FrameworkInfo {
                name: "hostile-inputs".into(),
                roles: vec!["*".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let (sha, _) = client.upload_bytes(b"x").await.unwrap();
        let bad = [
            ("t-dotdot", Some("../../escaped-here"), None),
            ("t-absolute", Some("/tmp/agora-escaped-abs"), None),
            ("t-dir", None, Some("../../escaped-here")),
        ];
        for (id, dest, dir) in bad {
            let offer = loop {
                let ev = tokio::time::timeout(Duration::from_secs(60), s.next_event())
                    .await
                    .expect("an offer in time")
                    .expect("events");
                if let Event::Offers(o) = ev {
                    break o[0].offer_id.clone();
                }
            };
            let task = TaskInfo {
                task_id: id.into(),
                name: id.into(),
                resources: Resources::cpus_mem(100, 32 << 20).to_proto(),
                command: Some(CommandInfo {
                    shell: true,
                    value: "true".into(),
                    ..Default::default()
                }),
                inputs: dest
                    .map(|d| InputFile {
                        sha256: sha.clone(),
                        size: 1,
                        dest: d.into(),
                        executable: false,
                    })
                    .into_iter()
                    .collect(),
                dirs: dir.map(String::from).into_iter().collect(),
                ..Default::default()
            };
            s.accept(vec![offer], vec![task], Some(0.0)).await.unwrap();
            let st = loop {
                let ev = tokio::time::timeout(Duration::from_secs(60), s.next_event())
                    .await
                    .expect("an update in time")
                    .expect("events");
                if let Event::Update(st) = ev {
                    s.acknowledge(&st).await.unwrap();
                    if st.task_id == id && st.state().is_terminal() {
                        break st;
                    }
                }
            };
            // The master refuses them first (TASK_ERROR); the agent checks again
            // (TASK_FAILED) in case a master lets one through (see the agent's unit
            // tests for that layer).
            assert!(
                matches!(st.state(), TaskState::TaskError | TaskState::TaskFailed),
                "{id}: {:?} {}",
                st.state(),
                st.message
            );
            let named = dest.or(dir).unwrap();
            assert!(
                st.message.contains(named) && st.message.contains("sandbox"),
                "{id}: {}",
                st.message
            );
        }
        let _ = s.teardown().await;
    });
    assert!(!escape.exists());
    assert!(!std::path::Path::new("/tmp/agora-escaped-abs").exists());
}

/// Sends one registration frame on the agent's socket and returns what the agent
/// answered before closing (the decoded frames).
fn forge_registration(
    socket: &std::path::Path,
    secret: &str,
) -> Vec<agora_proto::v1::AgentToExecutor> {
    use agora_proto::v1::{executor_to_agent, ExecutorRegister, ExecutorToAgent};
    let mut s = UnixStream::connect(socket).expect("connect to the agent's socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let reg = ExecutorToAgent {
        msg: Some(executor_to_agent::Msg::Register(ExecutorRegister {
            // The id of the executor the cluster's native tasks use, so that an
            // accepted forgery would take the real one's place.
            framework_id: "forged-framework".into(),
            executor_id: agora_proto::default_executor_id(true).into(),
            secret: secret.into(),
            ..Default::default()
        })),
        seq: 0,
    };
    let body = reg.encode_to_vec();
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut frames = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("the agent neither answered nor closed: {e}"),
        }
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).unwrap();
        frames.push(agora_proto::v1::AgentToExecutor::decode(&buf[..]).unwrap());
    }
    frames
}

#[test]
fn a_forged_executor_registration_is_refused_and_tasks_still_run() {
    if !root() {
        return;
    }
    let c = cluster();
    // A long task keeps the real executor busy across the forgeries.
    let mut long = std::process::Command::new(AGORA)
        .args([
            "run",
            "--name",
            "keeps-running",
            "--command",
            "echo started; sleep 600",
        ])
        .env("AGORA_CONFIG", &c.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let long_id = wait_for_task(c, |row| {
        row.contains("keeps-running") && row.contains("RUNNING")
    });
    let socket = c.agent_dir().join("run").join("agent.sock");
    for secret in ["", "00112233445566778899aabbccddeeff"] {
        let frames = forge_registration(&socket, secret);
        let refused: Vec<_> = frames
            .iter()
            .filter_map(|f| match &f.msg {
                Some(agora_proto::v1::agent_to_executor::Msg::Refused(r)) => Some(r.reason.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            frames.len(),
            1,
            "one refusal, then the connection is closed: {frames:?}"
        );
        assert!(
            refused.len() == 1 && refused[0].contains("refused") && refused[0].contains("secret"),
            "{frames:?}"
        );
    }
    // The real executor was not disturbed, and a task launched now runs.
    let o = c.agora(&["run", "--command", "echo after the forgery"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "after the forgery\n");
    let ps = stdout(&c.agora(&["ps"]));
    assert!(
        ps.lines()
            .any(|l| l.starts_with(&long_id) && l.contains("RUNNING")),
        "{ps}"
    );
    assert_eq!(code(&c.agora(&["kill", &long_id])), 0);
    wait_child(&mut long, 60);
}

#[test]
fn root_tasks_need_the_agents_flag_and_unknown_users_are_named() {
    if !root() {
        return;
    }
    let c = cluster();
    let o = c.agora(&["run", "--user", "root", "--command", "id -u"]);
    assert_ne!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).is_empty(), "nothing ran: {}", stdout(&o));
    let last = final_line(&o);
    assert!(
        last.contains("FAILED") && last.contains("`root`") && last.contains("--allow-root-tasks"),
        "{last}"
    );
    let o = c.agora(&["run", "--user", "no-such-user-xyz", "--command", "id -u"]);
    assert_ne!(code(&o), 0);
    let last = final_line(&o);
    assert!(
        last.contains("FAILED")
            && last.contains("user `no-such-user-xyz`")
            && last.contains("does not exist"),
        "{last}"
    );
    // Another existing user named by the framework is used.
    let o = c.agora(&["run", "--user", "daemon", "--command", "id -u"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), uid_of("daemon").to_string());

    // With the agent's consent, root tasks run as root.
    let allowing = Cluster::start_with(&["--allow-root-tasks"]);
    let o = allowing.agora(&["run", "--user", "root", "--command", "id -u"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "0\n");
    // ... and only when asked for: the default is still nobody.
    let o = allowing.agora(&["run", "--command", "id -u"]);
    assert_eq!(stdout(&o).trim(), uid_of("nobody").to_string());
}

/// The `agora executor native` process the dev cluster `parent` started.
fn native_executor_pid(parent: u32) -> u32 {
    let found = std::cell::Cell::new(None);
    wait_until("the native executor to be running", || {
        found.set(std::fs::read_dir("/proc").ok().and_then(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .find(|pid| {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    // Fields after the command's closing parenthesis: state, ppid, ...
                    let ppid = stat
                        .rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    ppid == Some(parent)
                        && String::from_utf8_lossy(&cmd).contains("executor\0native")
                })
        }));
        found.get().is_some()
    });
    found.get().unwrap()
}

/// An executor that stops reading (SIGSTOP) while a framework floods it with
/// messages: the messages past the agent's bound are dropped (best-effort, as in
/// Mesos), but the launches and the kill sent after them all arrive once it reads
/// again. Before, a full queue dropped whatever came next, launches included, and
/// those tasks stayed STAGING for ever.
#[test]
fn launches_and_kills_reach_an_executor_that_stopped_reading_under_a_message_flood() {
    let c = Cluster::start();
    runtime().block_on(async {
        let cfg = ClientConfig::load(&c.config).unwrap();
        let client = Client::connect(&cfg).await.unwrap();
        let mut s = client
            .subscribe(FrameworkInfo {
                name: "flooded".into(),
                roles: vec!["*".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let native = |id: &str, cmd: &str| TaskInfo {
            task_id: id.into(),
            name: id.into(),
            resources: Resources::cpus_mem(100, 32 << 20).to_proto(),
            command: Some(CommandInfo {
                shell: true,
                value: cmd.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // Accepts the next offer with `tasks`.
        macro_rules! launch {
            ($tasks:expr) => {{
                let offer = loop {
                    let ev = tokio::time::timeout(Duration::from_secs(60), s.next_event())
                        .await
                        .expect("an offer in time")
                        .expect("events");
                    match ev {
                        Event::Offers(o) => break o[0].offer_id.clone(),
                        Event::Update(st) => s.acknowledge(&st).await.unwrap(),
                        _ => {}
                    }
                };
                s.accept(vec![offer], $tasks, Some(0.0)).await.unwrap();
            }};
        }
        launch!(vec![native("long", "sleep 600")]);
        let (agent_id, executor_id) = loop {
            let ev = tokio::time::timeout(Duration::from_secs(60), s.next_event())
                .await
                .expect("an update in time")
                .expect("events");
            if let Event::Update(st) = ev {
                s.acknowledge(&st).await.unwrap();
                assert!(!st.state().is_terminal(), "{st:?}");
                if st.state() == TaskState::TaskRunning {
                    break (st.agent_id.clone(), st.executor_id.clone());
                }
            }
        };
        let pid = native_executor_pid(c.pid());
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        // 6,000 messages of 1 KiB: more than the socket's buffer and the agent's
        // bound of 4,096 together.
        let kib = vec![b'm'; 1024];
        for _ in 0..6000 {
            s.message(&agent_id, &executor_id, kib.clone())
                .await
                .unwrap();
        }
        let quick: Vec<String> = (0..3).map(|i| format!("quick-{i}")).collect();
        launch!(quick
            .iter()
            .map(|id| native(id, "echo done"))
            .collect::<Vec<_>>());
        s.kill("long").await.unwrap();
        // The launches have reached the agent once their sandboxes exist.
        let sandboxes = c.agent_dir().join("sandboxes");
        wait_until("the quick tasks' sandboxes", || {
            walk_names(&sandboxes)
                .iter()
                .filter(|n| n.starts_with("quick-"))
                .count()
                >= 3
        });
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        let mut ended: std::collections::HashMap<String, TaskState> = Default::default();
        let mut receipts = 0;
        while ended.len() < 4 {
            let ev = tokio::time::timeout(Duration::from_secs(120), s.next_event())
                .await
                .unwrap_or_else(|_| panic!("tasks still not ended after 120 s: {ended:?}"))
                .expect("events");
            match ev {
                Event::Update(st) => {
                    s.acknowledge(&st).await.unwrap();
                    if st.state().is_terminal() {
                        ended.insert(st.task_id.clone(), st.state());
                    }
                }
                Event::Message { .. } => receipts += 1,
                _ => {}
            }
        }
        eprintln!("ended: {ended:?}; {receipts} message receipts so far");
        assert_eq!(ended["long"], TaskState::TaskKilled);
        for id in &quick {
            assert_eq!(ended[id], TaskState::TaskFinished, "{id}");
        }
        let _ = s.teardown().await;
    });
}

/// Every file and directory name under `dir`, recursively (unreadable ones skipped).
fn walk_names(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                todo.push(e.path());
            }
        }
    }
    out
}

/// Tasks that try to fill the agent's disk (issue 13): a wasm guest writing 3 GiB
/// gets ENOSPC at its 16 MiB and fails for it; one creating 140,000 files stops at
/// the agent's cap; a native task writing 3 GiB into one file, or into many, is
/// stopped with the same reason; and `agora ps --stats` shows what each sandbox holds:
/// about its limit, not gigabytes.
#[test]
fn tasks_filling_their_disk_are_stopped_and_ps_stats_shows_it() {
    if !root() {
        return;
    }
    let c = cluster();
    let diskhog = guest("diskhog");
    let diskhog = diskhog.to_str().unwrap();
    let runs: [(&[&str], &str); 5] = [
        (
            &["run", "--disk", "16", diskhog, "--", "bytes", "3072"],
            "FAILED: disk limit of 16MiB exceeded",
        ),
        (
            &["run", "--cpus", "1", "--disk", "16MiB", diskhog, "--", "files", "140000"],
            "FAILED: disk limit of 10000 files exceeded",
        ),
        (
            &["run", "--disk", "16MiB", "--command", "dd if=/dev/zero of=big bs=1M count=3072"],
            "FAILED: disk limit of 16MiB exceeded",
        ),
        (
            &[
                "run",
                "--disk",
                "16MiB",
                "--command",
                "i=0; while [ $i -lt 192 ]; do dd if=/dev/zero of=f$i bs=1M count=16 2>/dev/null; i=$((i+1)); done",
            ],
            "FAILED: disk limit of 16MiB exceeded",
        ),
        (
            &[
                "run",
                "--cpus",
                "1",
                "--command",
                "mkdir d && cd d && i=0; while [ $i -lt 140000 ]; do : > f$i; i=$((i+1)); done",
            ],
            "FAILED: disk limit of 10000 files exceeded",
        ),
    ];
    let mut ids = Vec::new();
    for (args, want) in runs {
        let o = c.agora(args);
        assert_ne!(code(&o), 0, "{args:?}: {}", stderr(&o));
        assert!(final_line(&o).ends_with(want), "{args:?}: {}", stderr(&o));
        ids.push(task_id(&o));
    }
    let o = c.agora(&["run", diskhog, "--", "bytes", "2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    ids.push(task_id(&o));

    // DISK is the seventh column: each sandbox holds about its limit, the last 2 MiB.
    let ps = stdout(&c.agora(&["ps", "--all", "--stats"]));
    let disk = |id: &str| -> String {
        let row = ps
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id}: {ps}"));
        row.split_whitespace().nth(6).unwrap().to_string()
    };
    let mib = |s: String| -> f64 {
        let n = |suffix| {
            s.strip_suffix(suffix)
                .and_then(|v: &str| v.parse::<f64>().ok())
        };
        n("MiB")
            .or_else(|| n("KiB").map(|k| k / 1024.0))
            .unwrap_or_else(|| panic!("DISK {s:?}: {ps}"))
    };
    for (id, (low, high)) in ids.iter().zip([
        (15.0, 17.0),
        (0.01, 16.0),
        (15.0, 17.0),
        (15.0, 1024.0),
        (0.01, 64.0),
        (1.9, 2.2),
    ]) {
        let used = mib(disk(id));
        assert!((low..=high).contains(&used), "{id} holds {used} MiB: {ps}");
    }
}
