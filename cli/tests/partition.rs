//! A network cut between an agent and the master, on the real binaries: the master
//! and the agent run in two network namespaces this test makes, joined by a veth
//! pair with addresses it assigns there (no traffic leaves them). The cut lasts
//! longer than the master's agent timeout; the task keeps running, its framework
//! (`agora run`, partition-aware) sees UNREACHABLE and then RUNNING again, and at
//! the end prints the task's output and exits with its code. Nothing is lost.
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
use std::time::Instant;

use common::*;

/// Two namespaces and the veth between them; removed on drop.
struct Net {
    master_ns: String,
    agent_ns: String,
    agent_if: String,
}

impl Net {
    /// Master side 10.213.N.1, agent side 10.213.N.2.
    fn make() -> Result<Net, String> {
        let id = std::process::id() % 10_000;
        let net = Net {
            master_ns: format!("agora-m{id}"),
            agent_ns: format!("agora-a{id}"),
            agent_if: format!("ag-a{id}"),
        };
        let master_if = format!("ag-m{id}");
        let sub = id % 250;
        ip(&["netns", "add", &net.master_ns])?;
        ip(&["netns", "add", &net.agent_ns])?;
        ip(&[
            "link",
            "add",
            &master_if,
            "netns",
            &net.master_ns,
            "type",
            "veth",
            "peer",
            "name",
            &net.agent_if,
            "netns",
            &net.agent_ns,
        ])?;
        for (ns, dev, addr) in [
            (&net.master_ns, &master_if, format!("10.213.{sub}.1/24")),
            (&net.agent_ns, &net.agent_if, format!("10.213.{sub}.2/24")),
        ] {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn master_addr(&self) -> String {
        format!("10.213.{}.1", std::process::id() % 10_000 % 250)
    }

    fn in_ns(ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, AGORA]);
        c
    }

    fn cut(&self, down: bool) {
        ip(&[
            "-n",
            &self.agent_ns,
            "link",
            "set",
            &self.agent_if,
            if down { "down" } else { "up" },
        ])
        .expect("toggle the link");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.agent_ns]);
        let _ = ip(&["netns", "del", &self.master_ns]);
    }
}

#[test]
fn network_cut_longer_than_the_agent_timeout_loses_nothing() {
    let net = match Net::make() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIPPED network_cut_longer_than_the_agent_timeout_loses_nothing: cannot make network namespaces here ({e}); it needs root and iproute2");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let init = run_bounded(Command::new(AGORA).args(["certs", "init"]).arg(&certs), 60);
    assert_eq!(code(&init), 0, "{}", stderr(&init));

    let mut m = Net::in_ns(&net.master_ns);
    m.args(["master", "--agent-timeout", "3", "--listen"])
        .arg(format!("{}:0", net.master_addr()))
        .arg("--certs")
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.path().join("master"));
    let (_master, line) = Proc::start(m, |l| l.starts_with("master listening on "));
    let addr = line.split_whitespace().nth(3).unwrap().to_string();

    let mut a = Net::in_ns(&net.agent_ns);
    a.args(["agent", "--drain-on-stop", "--master", &addr, "--certs"])
        .arg(&certs)
        .arg("--work-dir")
        .arg(dir.path().join("agent"))
        .args(["--resources", "cpus:2;mem:1024", "--hostname", "cut-off"]);
    let (_agent, _) = Proc::start(a, |l| l.starts_with("agent offering"));

    let client = |args: &[&str]| {
        let mut c = Net::in_ns(&net.master_ns);
        c.args(args)
            .env("AGORA_CONFIG", certs.join("client.json"))
            .env("AGORA_MASTER", &addr);
        c
    };
    let ps = || stdout(&run_bounded(client(&["ps"]).arg("--all"), 60));

    // A task that runs until the test lets it finish (no timing involved).
    let go = dir.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo survived the cut; exit 3",
        go.display()
    );
    let mut run = client(&["run", "--name", "through-the-cut", "--command", &script]);
    run.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut run = spawn_tied_to_process(run);
    wait_until("the task to run", || {
        ps().lines()
            .any(|l| l.contains("through-the-cut") && l.contains("RUNNING"))
    });

    // Cut the agent off for longer than the 3 s agent timeout.
    let cut_at = Instant::now();
    net.cut(true);
    wait_until("the master to report the task UNREACHABLE", || {
        ps().lines()
            .any(|l| l.contains("through-the-cut") && l.contains("UNREACHABLE"))
    });
    let detected = cut_at.elapsed();
    let restored_at = Instant::now();
    net.cut(false);
    wait_until(
        "the task to be RUNNING again after the agent returns",
        || {
            ps().lines()
                .any(|l| l.contains("through-the-cut") && l.contains("RUNNING"))
        },
    );
    let recovered = restored_at.elapsed();

    std::fs::write(&go, b"").unwrap();
    let out = wait_child(&mut run, 120);
    let mut o = String::new();
    if let Some(mut s) = run.stdout.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut o);
    }
    let err = stderr(&out);
    assert!(o.contains("survived the cut"), "stdout: {o}\nstderr: {err}");
    assert_eq!(code(&out), 3, "{err}");
    assert!(
        err.contains("UNREACHABLE"),
        "agora run saw the partition: {err}"
    );

    // Count: one task launched, one terminal, none lost, none duplicated.
    let rows: Vec<String> = ps()
        .lines()
        .filter(|l| l.contains("through-the-cut"))
        .map(str::to_string)
        .collect();
    assert_eq!(rows.len(), 1, "exactly one task: {rows:?}");
    assert!(
        rows[0].contains("FAILED"),
        "ended with its exit code: {rows:?}"
    );
    assert!(!rows.iter().any(|r| r.contains("LOST")));
    println!(
        "partition: launched 1, terminal 1, lost 0, duplicated 0; detected in {:.1} s (agent timeout 3 s), back RUNNING {:.1} s after the link returned",
        detected.as_secs_f64(),
        recovered.as_secs_f64()
    );
    // Keep the closure's borrow of `net` alive to here; the namespaces go on drop.
    drop(net);
}
