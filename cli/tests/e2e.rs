//! End-to-end: the real `agora` binary runs a dev cluster (master, agent, wasm
//! executor processes over QUIC and Unix sockets) and every guest example goes
//! through `agora run`, as a user would run it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// One cluster for the tests in this file that do not disturb it; tests share it
/// the way users share a cluster.
fn cluster() -> &'static Cluster {
    static C: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();
    C.get_or_init(Cluster::start)
}

fn states(o: &std::process::Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| l.starts_with("task "))
        .map(|l| {
            l.split_whitespace()
                .nth(2)
                .unwrap_or_default()
                .trim_end_matches(':')
                .to_string()
        })
        // PENDING lines (why it waits for an offer on a busy cluster) are
        // informational, not state changes.
        .filter(|s| s != "PENDING")
        .collect()
}

#[test]
fn hello_prints_args_and_env_and_walks_every_state() {
    let c = cluster();
    let g = guest("hello");
    let o = c.agora(&[
        "run",
        "--env",
        "GREETING=bonjour",
        g.to_str().unwrap(),
        "--",
        "a",
        "b c",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("hello from agora"), "{out}");
    assert!(out.contains("args: a b c"), "{out}");
    assert!(out.contains("GREETING=bonjour"), "{out}");
    assert_eq!(
        states(&o),
        ["STAGING", "STARTING", "RUNNING", "FINISHED"],
        "{}",
        stderr(&o)
    );
}

#[test]
fn exit_code_is_passed_through_with_its_reason() {
    let c = cluster();
    let o = c.agora(&["run", guest("exit-code").to_str().unwrap(), "--", "3"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("exiting with 3"),
        "guest stderr missing: {}",
        stderr(&o)
    );
    assert!(
        final_line(&o).ends_with("FAILED: exited with code 3"),
        "{}",
        final_line(&o)
    );
    let id = task_id(&o);
    let ps = c.agora(&["ps", "--all"]);
    let row = stdout(&ps)
        .lines()
        .find(|l| l.starts_with(&id))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        row.contains("FAILED") && row.contains("COMMAND_EXITED"),
        "ps row: {row}"
    );
}

#[test]
fn fuel_exhaustion_fails_the_task() {
    let o = cluster().agora(&["run", "--fuel", "1000000", guest("spin").to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    assert!(
        final_line(&o).ends_with("FAILED: fuel exhausted after 1000000 units"),
        "{}",
        final_line(&o)
    );
}

#[test]
fn deadline_fails_the_task() {
    let o = cluster().agora(&["run", "--timeout", "500ms", guest("spin").to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    assert!(
        final_line(&o).contains("FAILED: deadline of 500ms exceeded"),
        "{}",
        final_line(&o)
    );
}

#[test]
fn memory_limit_stops_a_memory_hog() {
    let o = cluster().agora(&["run", "--mem", "64MiB", guest("memhog").to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("allocated 8 MiB"),
        "the guest ran before hitting the limit: {}",
        stdout(&o)
    );
    assert!(
        final_line(&o).contains("FAILED: memory limit of 64MiB reached"),
        "{}",
        final_line(&o)
    );
}

#[test]
fn cpu_bound_fib_finishes() {
    let o = cluster().agora(&["run", guest("fib").to_str().unwrap(), "--", "24"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "fib(24) = 46368");
}

#[test]
fn inputs_are_placed_in_the_sandbox_and_logs_replay_output() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let input = write_file(dir.path(), "words.txt", "one two\nthree\n");
    let spec = format!("{}:input.txt", input.display());
    let o = c.agora(&["run", "--input", &spec, guest("files").to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "lines=2 words=3 bytes=14");
    // The result file is in the task's sandbox root, and `agora logs` replays stdout.
    let id = task_id(&o);
    let logs = c.agora(&["logs", &id]);
    assert_eq!(
        stdout(&logs).trim(),
        "lines=2 words=3 bytes=14",
        "{}",
        stderr(&logs)
    );
    let sandboxes = c.agent_dir().join("sandboxes");
    let result = std::fs::read_dir(&sandboxes)
        .unwrap()
        .map(|fw| fw.unwrap().path().join(&id).join("fs/result.txt"))
        .find(|p| p.exists())
        .expect("result.txt in the task's sandbox");
    let text = std::fs::read_to_string(result).unwrap();
    assert!(text.contains("ONE TWO"), "{text}");

    // A directory input with DIR:/ lands at the root.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/in.txt"), "x y z").unwrap();
    let spec = format!("{}:/", tree.display());
    let o = c.agora(&[
        "run",
        "--input",
        &spec,
        guest("files").to_str().unwrap(),
        "--",
        "/sub/in.txt",
        "/sub/out.txt",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "lines=1 words=3 bytes=5");
}

/// Inputs count against the task's disk: ones that cannot fit are refused before
/// upload, and a guest's writes are charged on top of what was staged.
#[test]
fn inputs_count_against_the_tasks_disk() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 3 << 20]).unwrap();
    let spec = format!("{}:in.bin", big.display());
    let diskhog = guest("diskhog");
    let o = c.agora(&[
        "run",
        "--disk",
        "2MiB",
        "--input",
        &spec,
        diskhog.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("(3MiB) does not fit in the task's --disk 2MiB"),
        "{}",
        stderr(&o)
    );
    // 3 MiB staged under 4 MiB: the guest's second MiB does not fit.
    let o = c.agora(&[
        "run",
        "--disk",
        "4MiB",
        "--input",
        &spec,
        diskhog.to_str().unwrap(),
        "--",
        "bytes",
        "2",
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("write failed after 1048576: No space left on device"),
        "{}",
        stderr(&o)
    );
    assert!(
        final_line(&o).ends_with("FAILED: disk limit of 4MiB exceeded"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_second_launch_of_a_module_moves_no_module_bytes() {
    let c = cluster();
    let g = guest("fib");
    let sha = agora_proto::sha256_hex(&std::fs::read(&g).unwrap());
    let o = c.agora(&["run", g.to_str().unwrap(), "--", "5"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let cached = c.agent_dir().join("artifacts").join(&sha);
    let first = std::fs::metadata(&cached)
        .expect("module cached on the agent")
        .modified()
        .unwrap();
    let master_copy = c.dir.path().join("master/artifacts").join(&sha);
    let first_master = std::fs::metadata(&master_copy)
        .expect("module in the master's store")
        .modified()
        .unwrap();
    let o = c.agora(&["run", g.to_str().unwrap(), "--", "6"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::metadata(&cached).unwrap().modified().unwrap(),
        first,
        "the agent fetched the module again"
    );
    assert_eq!(
        std::fs::metadata(&master_copy).unwrap().modified().unwrap(),
        first_master,
        "the module was uploaded again"
    );
}

#[test]
fn kill_from_another_terminal_ends_a_running_task() {
    let c = cluster();
    let mut run = Command::new(AGORA)
        .args(["run", guest("spin").to_str().unwrap()])
        .env("AGORA_CONFIG", &c.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_for_task(c, |row| row.contains("spin") && row.contains("RUNNING"));
    let k = c.agora(&["kill", &id]);
    assert_eq!(code(&k), 0, "{}", stderr(&k));
    let out = wait_child(&mut run, 60);
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .last()
            .unwrap_or_default()
            .contains(&format!("task {id} KILLED")),
        "{err}"
    );
    // Killing it again names the problem.
    let k = c.agora(&["kill", &id]);
    assert_ne!(code(&k), 0);
    assert!(stderr(&k).contains("no live task"), "{}", stderr(&k));
}

#[test]
fn a_task_too_big_for_any_agent_waits_and_ps_says_why() {
    let c = cluster();
    let mut run = Command::new(AGORA)
        .args([
            "run",
            "--cpus",
            "512",
            "--name",
            "toobig",
            guest("hello").to_str().unwrap(),
        ])
        .env("AGORA_CONFIG", &c.config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = wait_for_task(c, |row| row.contains("toobig") && row.contains("PENDING"));
    let ps = stdout(&c.agora(&["ps"]));
    let row = ps.lines().find(|l| l.starts_with(&id)).unwrap().to_string();
    assert!(
        row.contains("cpus: asks 512, no agent has that much (the largest has"),
        "{row}"
    );
    // Meanwhile the cluster keeps working.
    let o = c.agora(&["run", guest("hello").to_str().unwrap()]);
    assert_eq!(code(&o), 0);
    run.kill().unwrap();
    run.wait().unwrap();
}

#[test]
fn bad_modules_get_specific_errors_at_submit_and_in_the_cluster() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = write_file(dir.path(), "notes.wasm", "this is not wasm");
    let import = dir.path().join("import.wasm");
    std::fs::write(
        &import,
        wat::parse_str(r#"(module (import "env" "foo" (func)) (func (export "_start")))"#).unwrap(),
    )
    .unwrap();
    let bigmem = dir.path().join("bigmem.wasm");
    std::fs::write(
        &bigmem,
        wat::parse_str(r#"(module (memory 4096) (func (export "_start")))"#).unwrap(),
    )
    .unwrap();
    let trap = dir.path().join("trap.wasm");
    std::fs::write(
        &trap,
        wat::parse_str(r#"(module (func (export "_start") unreachable))"#).unwrap(),
    )
    .unwrap();

    // Refused before submission, with the problem named.
    let o = c.agora(&["run", not_wasm.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("not a WebAssembly module"),
        "{}",
        stderr(&o)
    );
    let o = c.agora(&["run", import.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("env::foo"), "{}", stderr(&o));
    let o = c.agora(&["run", "--mem", "64MiB", bigmem.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("256MiB") && stderr(&o).contains("64MiB"),
        "{}",
        stderr(&o)
    );

    // The same modules sent anyway fail in the cluster with the same words.
    let skip = |p: &std::path::Path| {
        c.agora(&[
            "run",
            "--skip-validation",
            "--mem",
            "64MiB",
            p.to_str().unwrap(),
        ])
    };
    let o = skip(&not_wasm);
    assert!(
        final_line(&o).contains("FAILED: not a WebAssembly module"),
        "{}",
        stderr(&o)
    );
    let o = skip(&import);
    assert!(
        final_line(&o).contains("FAILED") && final_line(&o).contains("env::foo"),
        "{}",
        stderr(&o)
    );
    let o = skip(&bigmem);
    assert!(
        final_line(&o).contains("FAILED") && final_line(&o).contains("256MiB"),
        "{}",
        stderr(&o)
    );
    let o = skip(&trap);
    assert!(
        final_line(&o).contains("FAILED") && final_line(&o).contains("unreachable"),
        "{}",
        stderr(&o)
    );
    assert_eq!(code(&o), 1);

    let ps = stdout(&c.agora(&["ps", "--all"]));
    assert!(
        ps.contains("INVALID_MODULE") && ps.contains("MEMORY_LIMIT") && ps.contains("TRAP"),
        "{ps}"
    );
}

#[test]
fn bad_flags_are_named() {
    let c = cluster();
    let g = guest("hello");
    let o = c.agora(&["run", "--cpus", "lots", g.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--cpus lots"), "{}", stderr(&o));
    let o = c.agora(&["run", "--input", "/does/not/exist", g.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("/does/not/exist"), "{}", stderr(&o));
    let o = c.agora(&["run", "/does/not/exist.wasm"]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("cannot read /does/not/exist.wasm"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn clients_without_a_valid_certificate_are_refused_clearly() {
    let c = cluster();
    // Certificates from another cluster's CA.
    let other = tempfile::tempdir().unwrap();
    let init = run_bounded(
        Command::new(AGORA)
            .args(["certs", "init"])
            .arg(other.path())
            .args(["--master", &c.master]),
        60,
    );
    assert_eq!(code(&init), 0, "{}", stderr(&init));
    let o = run_bounded(
        Command::new(AGORA)
            .arg("ps")
            .env("AGORA_CONFIG", other.path().join("client.json")),
        60,
    );
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("certificate"), "{}", stderr(&o));

    // No certificate at all.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let addr = agora_net::tls::resolve(&c.master).unwrap();
        let ep = agora_net::tls::client_endpoint_without_identity(
            addr,
            &c.dir.path().join("certs/ca.pem"),
        )
        .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(20), agora_net::tls::connect(&ep, addr))
            .await
            .expect("refusal, not a hang")
            .unwrap_err();
        assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    });
    // And the cluster still works.
    assert_eq!(
        code(&c.agora(&["run", guest("hello").to_str().unwrap()])),
        0
    );
}

#[test]
fn malformed_and_oversized_frames_close_only_that_connection() {
    let c = cluster();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let addr = agora_net::tls::resolve(&c.master).unwrap();
        let certs = agora_net::tls::CertDir::new(c.dir.path().join("certs"));
        let id =
            agora_net::tls::Identity::from_cert_dir(&certs, agora_net::tls::Role::Client).unwrap();
        for bytes in [
            u32::MAX.to_be_bytes().to_vec(),
            vec![0, 0, 0, 3, 0xff, 0xff, 0xff],
        ] {
            let ep = agora_net::tls::client_endpoint(addr, &id).unwrap();
            let conn = agora_net::tls::connect(&ep, addr).await.unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            let reason = tokio::time::timeout(Duration::from_secs(20), conn.closed())
                .await
                .expect("the master closes a connection that sends a bad frame");
            assert!(reason.to_string().contains("bad frame"), "{reason}");
        }
    });
    assert_eq!(
        code(&c.agora(&["run", guest("hello").to_str().unwrap()])),
        0
    );
}

#[test]
fn offer_constraints_pin_work_to_matching_agents_and_say_why_otherwise() {
    let c = Cluster::start_with(&["--attributes", "zone:edge-1;rack:3"]);
    let g = guest("hello");
    let o = c.agora(&[
        "run",
        "--constraint",
        "zone=edge-1",
        "--constraint",
        "rack",
        g.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = c.agora(&["run", "--constraint", "zone~edge-*", g.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // No agent is in zone edge-2: the task waits, and ps names the constraint.
    let mut run = Command::new(AGORA)
        .args([
            "run",
            "--name",
            "pinned",
            "--constraint",
            "zone=edge-2",
            g.to_str().unwrap(),
        ])
        .env("AGORA_CONFIG", &c.config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = wait_for_task(&c, |row| {
        row.contains("pinned") && row.contains("PENDING") && row.contains("zone")
    });
    let ps = stdout(&c.agora(&["ps"]));
    let row = ps.lines().find(|l| l.starts_with(&id)).unwrap().to_string();
    assert!(
        row.contains("no connected agent meets the constraint"),
        "{row}"
    );
    run.kill().unwrap();
    run.wait().unwrap();
    // A constraint that does not parse is refused at SUBSCRIBE, naming it.
    let o = c.agora(&["run", "--constraint", "=oops", g.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("=oops"), "{}", stderr(&o));
    // `zone!b` was once read as an attribute named `zone!`, and the task waited
    // for ever; now it is refused, and `!=` works.
    let o = c.agora(&["run", "--constraint", "zone!b", g.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("zone!b"), "{}", stderr(&o));
    let o = c.agora(&["run", "--constraint", "zone!=edge-2", g.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// `agora run NAME` in the background, its stderr kept.
fn background_run(c: &Cluster, args: &[&str]) -> std::process::Child {
    Command::new(AGORA)
        .args(args)
        .env("AGORA_CONFIG", &c.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Frameworks named in `agora role ls`.
fn frameworks(c: &Cluster) -> String {
    stdout(&c.agora(&["role", "ls"]))
}

/// Sends `signal` to a background run and asserts the exit code it ends with.
fn signal_run(run: &mut std::process::Child, signal: i32, code: i32) {
    unsafe { libc::kill(run.id() as i32, signal) };
    let out = wait_child(run, 30);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// No framework of the run named `name` is left (`agora run` names its framework
/// `agora-run NAME`).
fn assert_no_framework(c: &Cluster, name: &str) {
    let listed = frameworks(c);
    assert!(!listed.contains(&format!("agora-run {name}")), "{listed}");
}

#[test]
fn sigterm_and_ctrl_c_end_the_run_its_task_and_its_framework() {
    let c = cluster();
    // SIGTERM of a run whose task runs: the task is killed, the framework torn
    // down, and the run exits 143 as a shell reports SIGTERM.
    let mut run = background_run(
        c,
        &[
            "run",
            "--name",
            "sigterm-victim",
            guest("spin").to_str().unwrap(),
        ],
    );
    let id = wait_for_task(c, |row| {
        row.contains("sigterm-victim") && row.contains("RUNNING")
    });
    assert!(frameworks(c).contains("agora-run sigterm-victim"));
    let sent = std::time::Instant::now();
    signal_run(&mut run, libc::SIGTERM, 143);
    let exited = sent.elapsed();
    // The run exits once the master has confirmed the TEARDOWN, so its framework
    // is gone by then (it once lingered for 60 s); the task ends with it.
    assert_no_framework(c, "sigterm-victim");
    wait_until("the task gone", || !stdout(&c.agora(&["ps"])).contains(&id));
    let gone = sent.elapsed();
    let all = stdout(&c.agora(&["ps", "--all"]));
    let row = all
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_default()
        .to_string();
    assert!(row.contains("KILLED"), "{row}");
    eprintln!("SIGTERM: run exited after {exited:?}; task and framework gone after {gone:?}");

    // Ctrl-C on a run whose task waits (too big to place): exit 130, and the task
    // is no longer waiting.
    let mut run = background_run(
        c,
        &[
            "run",
            "--cpus",
            "512",
            "--name",
            "sigint-pending",
            guest("hello").to_str().unwrap(),
        ],
    );
    let id = wait_for_task(c, |row| {
        row.contains("sigint-pending") && row.contains("PENDING")
    });
    signal_run(&mut run, libc::SIGINT, 130);
    assert_no_framework(c, "sigint-pending");
    let ps = stdout(&c.agora(&["ps"]));
    assert!(!ps.contains(&id), "a pending task outlived its run: {ps}");

    // Ctrl-C on a running task: 130 too (it was 137, as for a kill by someone else).
    let mut run = background_run(
        c,
        &[
            "run",
            "--name",
            "sigint-running",
            guest("spin").to_str().unwrap(),
        ],
    );
    wait_for_task(c, |row| {
        row.contains("sigint-running") && row.contains("RUNNING")
    });
    signal_run(&mut run, libc::SIGINT, 130);
    // A run that ends normally tears its framework down too.
    let o = c.agora(&[
        "run",
        "--name",
        "normal-end",
        guest("hello").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_no_framework(c, "normal-end");
}

#[test]
fn operator_commands_refuse_what_they_cannot_do_and_change_only_what_they_name() {
    let c = cluster();
    // A guarantee beyond the cluster is refused unless forced.
    let o = c.agora(&[
        "quota",
        "set",
        "e2e-big",
        "--guarantee",
        "cpus:1000;mem:5000GiB",
    ]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("--force") && stderr(&o).contains("cannot hold"),
        "{}",
        stderr(&o)
    );
    // Setting a guarantee later keeps the limit set before.
    let o = c.agora(&["quota", "set", "e2e-q", "--limit", "cpus:2;mem:1GiB"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = c.agora(&["quota", "set", "e2e-q", "--guarantee", "cpus:0.01"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let got = stdout(&c.agora(&["quota", "get", "e2e-q"]));
    assert!(
        got.contains("cpus:0.01") && got.contains("cpus:2;mem:1GiB"),
        "{got}"
    );
    let o = c.agora(&["quota", "rm", "e2e-q"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = c.agora(&["quota", "rm", "e2e-q"]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("no quota to remove"), "{}", stderr(&o));
    // Weights out of range are refused.
    for w in ["1e308", "1e-300", "0"] {
        let o = c.agora(&["role", "weight", "set", "e2e-w", w]);
        assert_ne!(code(&o), 0, "weight {w}: {}", stderr(&o));
    }
    // explain of an id it does not know is an error, not an empty role.
    let o = c.agora(&["explain", "c5870972fe15"]);
    assert_ne!(code(&o), 0, "{}", stdout(&o));
    assert!(
        stderr(&o).contains("no task or role is named"),
        "{}",
        stderr(&o)
    );
    // A bad log filter is named.
    let o = c.agora(&["ps", "--log-level", "agora=loud"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--log-level") && stderr(&o).contains("loud"),
        "{}",
        stderr(&o)
    );
    // --mem takes MiB when bare, as `mem:` in --resources does, never bytes.
    let o = c.agora(&["run", "--mem", "64", guest("hello").to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_role_runs_on_its_static_reservation() {
    let c = Cluster::start_with(&[
        "--resources",
        "cpus:1;mem:512;cpus(tenant-a):1;mem(tenant-a):512",
    ]);
    // 1.5 cpus: more than the unreserved part; it fits only with the reservation.
    let o = c.agora(&[
        "run",
        "--role",
        "tenant-a",
        "--cpus",
        "1.5",
        "--mem",
        "700MiB",
        "--name",
        "reserved",
        guest("hello").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("hello from agora"), "{}", stdout(&o));
    // `role ls` lists the role that holds the reservation (no weight, quota or
    // framework of its own now), with what is reserved and free of it.
    let o = c.agora(&["role", "ls"]);
    let roles = stdout(&o);
    let row = roles
        .lines()
        .find(|l| l.starts_with("tenant-a "))
        .unwrap_or_else(|| panic!("tenant-a is listed:\n{roles}"));
    assert!(
        row.contains("cpus:1;mem:512MiB (cpus:1;mem:512MiB)"),
        "{roles}"
    );
    // `agora agents` shows the agent's reservation apart, all of it free now.
    let agents = stdout(&c.agora(&["agents"]));
    assert!(
        agents.contains(
            "cpus(tenant-a):1;mem(tenant-a):512MiB (cpus(tenant-a):1;mem(tenant-a):512MiB)"
        ),
        "{agents}"
    );
    // A reservation for a role that cannot exist is refused at start.
    let dir = tempfile::tempdir().unwrap();
    let o = run_bounded(
        Command::new(AGORA)
            .args([
                "dev",
                "--resources",
                "cpus:1;mem:512;cpus(..):1",
                "--data-dir",
            ])
            .arg(dir.path()),
        60,
    );
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("`..`"), "{}", stderr(&o));
}

#[test]
fn a_client_piped_into_a_reader_that_leaves_ends_quietly() {
    // `agora agents | head -0`: the reader is gone before the table is written. The
    // client must end as `cat` would (SIGPIPE), not panic with a backtrace.
    use std::os::unix::process::ExitStatusExt as _;
    let c = cluster();
    let mut child = Command::new(AGORA)
        .args(["agents"])
        .env("AGORA_CONFIG", &c.config)
        .env_remove("AGORA_MASTER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agora starts");
    drop(child.stdout.take()); // the reader leaves at once
    let out = wait_child(&mut child, 60);
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "the client panicked:\n{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "status {:?}, stderr:\n{err}",
        out.status
    );
}

/// What task `id` has written on stdout so far, read from its sandbox
/// (`<agent>/sandboxes/<framework>/<task>/stdout`).
fn sandbox_stdout(c: &Cluster, id: &str) -> String {
    let Ok(frameworks) = std::fs::read_dir(c.agent_dir().join("sandboxes")) else {
        return String::new();
    };
    frameworks
        .flatten()
        .map(|fw| fw.path().join(id).join("stdout"))
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

#[test]
fn a_deadline_ends_a_sleeping_task_at_the_deadline() {
    let started = std::time::Instant::now();
    let o = cluster().agora(&[
        "run",
        "--timeout",
        "2s",
        guest("sleep").to_str().unwrap(),
        "--",
        "30000",
    ]);
    let took = started.elapsed();
    println!("`agora run --timeout 2s` of a guest sleeping 30 s ended after {took:?}");
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        final_line(&o).contains("FAILED: deadline of 2s exceeded"),
        "{}",
        stderr(&o)
    );
    // Upload, offer and launch included; the guest's sleep would take 30 s.
    assert!(took < Duration::from_secs(15), "{took:?}");
}

#[test]
fn kill_ends_a_sleeping_task_at_once() {
    let c = cluster();
    let mut run = Command::new(AGORA)
        .args([
            "run",
            "--name",
            "asleep-to-kill",
            guest("sleep").to_str().unwrap(),
            "--",
            "60000",
        ])
        .env("AGORA_CONFIG", &c.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Named: other tests of this file run `sleep` guests on the same cluster.
    let id = wait_for_task(c, |row| {
        row.contains("asleep-to-kill") && row.contains("RUNNING")
    });
    // The guest writes this just before it sleeps.
    wait_until("the guest to be asleep", || {
        sandbox_stdout(c, &id).contains("sleeping 60000 ms")
    });
    let killed_at = std::time::Instant::now();
    let k = c.agora(&["kill", &id]);
    assert_eq!(code(&k), 0, "{}", stderr(&k));
    let out = wait_child(&mut run, 60);
    let took = killed_at.elapsed();
    println!("`agora kill` of a task sleeping 60 s: `agora run` ended {took:?} later");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "{err}");
    assert!(
        err.lines()
            .last()
            .unwrap_or_default()
            .contains(&format!("task {id} KILLED")),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let ps = stdout(&c.agora(&["ps", "--all"]));
    let row = ps.lines().find(|l| l.starts_with(&id)).unwrap_or_default();
    assert!(row.contains("KILLED"), "{ps}");
}

#[test]
fn a_client_with_an_agent_certificate_is_told_which_certificate_to_use() {
    let c = cluster();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&c.config).unwrap()).unwrap();
    let dir = std::path::PathBuf::from(cfg["cert"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    cfg["cert"] = dir.join("agent.pem").to_string_lossy().into();
    cfg["key"] = dir.join("agent.key").to_string_lossy().into();
    let tmp = tempfile::tempdir().unwrap();
    let wrong = tmp.path().join("client.json");
    std::fs::write(&wrong, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let with = |args: &[&str]| {
        run_bounded(
            Command::new(AGORA)
                .args(args)
                .env("AGORA_CONFIG", &wrong)
                .env_remove("AGORA_MASTER"),
            60,
        )
    };
    for args in [&["ps"][..], &["run", guest("hello").to_str().unwrap()][..]] {
        let o = with(args);
        let err = stderr(&o);
        assert_ne!(code(&o), 0, "{err}");
        assert!(
            err.contains("a certificate with role Agent may not open this kind of stream")
                && err.contains("needs client"),
            "agora {args:?}: {err}"
        );
        assert!(!err.contains("connection lost"), "agora {args:?}: {err}");
    }
}
