//! `agora certs init`, `agora master` and `agora agent` as separate processes, the
//! way a real cluster runs, with resources and attributes given by flags.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn master_and_agent_as_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let init = run_bounded(Command::new(AGORA).args(["certs", "init"]).arg(&certs), 60);
    assert_eq!(code(&init), 0, "{}", stderr(&init));
    for f in [
        "ca.pem",
        "master.pem",
        "master.key",
        "agent.pem",
        "agent.key",
        "client.pem",
        "client.key",
        "client.json",
    ] {
        assert!(certs.join(f).exists(), "certs init wrote no {f}");
    }

    let mut m = Command::new(AGORA);
    m.args(["master", "--listen", "127.0.0.1:0", "--certs"])
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.path().join("master"));
    let (_master, line) = Proc::start(m, |l| l.starts_with("master listening on "));
    let addr = line.split_whitespace().nth(3).unwrap().to_string();

    let mut a = Command::new(AGORA);
    a.args(["agent", "--drain-on-stop", "--master", &addr, "--certs"])
        .arg(&certs)
        .arg("--work-dir")
        .arg(dir.path().join("agent"))
        .args([
            "--resources",
            "cpus:1.5;mem:512",
            "--attributes",
            "zone:edge-1;rack:3",
            "--hostname",
            "edge-host",
        ]);
    let (_agent, _) = Proc::start(a, |l| l.starts_with("agent offering"));

    let client = |args: &[&str]| {
        run_bounded(
            Command::new(AGORA)
                .args(args)
                .env("AGORA_CONFIG", certs.join("client.json"))
                .env("AGORA_MASTER", &addr),
            120,
        )
    };
    // Wait for the agent to register, then check what it advertises.
    let deadline = Instant::now() + Duration::from_secs(60);
    let agents = loop {
        let o = client(&["agents"]);
        let out = stdout(&o);
        if out.contains("edge-host") {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "agent never registered: {}{}",
            out,
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(100)); // poll interval
    };
    assert!(
        agents.contains("0/1.5") && agents.contains("0B/512MiB"),
        "{agents}"
    );
    assert!(
        agents.contains("zone:edge-1;rack:3") || agents.contains("rack:3;zone:edge-1"),
        "{agents}"
    );

    let o = client(&[
        "run",
        "--env",
        "GREETING=separate",
        guest("hello").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("GREETING=separate"));

    // An agent flag that makes no sense is refused with the problem named.
    let bad = run_bounded(
        Command::new(AGORA)
            .args(["agent", "--drain-on-stop", "--master", &addr, "--certs"])
            .arg(&certs)
            .args(["--resources", "cpus=2"]),
        60,
    );
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("cpus=2"), "{}", stderr(&bad));
}
