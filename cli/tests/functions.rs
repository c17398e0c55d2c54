//! End-to-end tests of serverless functions (issue 6) through the real binaries: an
//! `agora dev` cluster, `agora fn deploy|ls|logs|rm`, and HTTP requests to the master
//! (which forwards to an agent, holding the request while a host starts) and to an
//! agent directly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;

fn deploy(c: &Cluster, args: &[&str]) -> String {
    let mut all = vec!["fn", "deploy"];
    all.extend_from_slice(args);
    let o = c.agora(&all);
    assert_eq!(code(&o), 0, "agora {all:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// Waits (bounded) until the function has `n` running hosts.
fn wait_hosts(http_addr: &str, name: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hosts = running_hosts(http_addr, name);
        if hosts.len() == n {
            return hosts;
        }
        assert!(
            Instant::now() < deadline,
            "function {name} did not get {n} running host(s) within 60 s: {:?}",
            fn_entry(http_addr, name)
        );
        std::thread::sleep(Duration::from_millis(100)); // poll interval
    }
}

#[test]
fn both_guest_styles_through_the_master_and_an_agent() {
    let c = Cluster::start_with(&["--fn-idle-timeout", "2s"]);
    let web = master_http(&c);

    // A CGI-style WASI command. min 1: it stays while idle.
    let echo = guest("echo");
    let out = deploy(
        &c,
        &["echo", echo.to_str().unwrap(), "--min-instances", "1"],
    );
    assert!(
        out.contains(&format!("http://{web}/fn/echo/")),
        "deploy prints the URL: {out}"
    );
    let r = http("POST", &web, "/fn/echo/a/b?x=1", b"hello body");
    assert_eq!(r.status, 200, "{r:?}");
    for want in [
        "REQUEST_METHOD: POST",
        "PATH_INFO: /a/b",
        "QUERY_STRING: x=1",
        "HTTP_X_TEST: yes",
    ] {
        assert!(
            r.body.contains(want),
            "echo answer lacks {want:?}: {}",
            r.body
        );
    }
    assert!(r.body.ends_with("hello body"), "{}", r.body);

    // The same function straight from the agent that hosts it.
    let agents = wait_hosts(&web, "echo", 1);
    let r = http("GET", &agents[0], "/fn/echo/direct?y=2", b"");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("PATH_INFO: /direct"), "{}", r.body);

    // A wasi:http/proxy component.
    let hello = hello_http_component();
    deploy(
        &c,
        &["hello", hello.to_str().unwrap(), "--min-instances", "1"],
    );
    let r = http("GET", &web, "/fn/hello/greet?who=you", b"");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains("hello from a wasi:http component: GET"),
        "{}",
        r.body
    );
    assert_eq!(r.header("x-agora-guest"), Some("hello-http"));
    let agents = wait_hosts(&web, "hello", 1);
    let r = http("GET", &agents[0], "/fn/hello/", b"");
    assert_eq!(r.status, 200, "{r:?}");

    // Unknown functions: 404 naming them, at the master and at the agent.
    let r = http("GET", &web, "/fn/nope/x", b"");
    assert_eq!(r.status, 404);
    assert!(r.body.contains("\"nope\""), "{}", r.body);

    // fn ls: hosts running/target and the requests counted by the agents' metrics.
    wait_until("fn ls to count echo's requests", || {
        let ls = stdout(&c.agora(&["fn", "ls"]));
        ls.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"echo")
                && f.get(2) == Some(&"1/1")
                && f.get(3).is_some_and(|n| n.parse::<u64>().unwrap_or(0) >= 2)
        })
    });
    let ls = stdout(&c.agora(&["fn", "ls"]));
    assert!(ls.lines().any(|l| l.starts_with("hello ")), "{ls}");
    println!("{ls}");
    let r = http("GET", &web, "/fn-metrics", b"");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("\"name\":\"echo\""), "{}", r.body);

    // fn logs reads the hosts' output through the master.
    let o = c.agora(&["fn", "logs", "echo", "--stderr"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = c.agora(&["fn", "logs", "nope"]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("no function named \"nope\""),
        "{}",
        stderr(&o)
    );

    // Bad input gets clear errors.
    let notwasm = write_file(c.dir.path(), "x.wasm", "not wasm at all");
    let o = c.agora(&["fn", "deploy", "bad", notwasm.to_str().unwrap()]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("is not a WebAssembly module or component"),
        "{}",
        stderr(&o)
    );
    let o = c.agora(&["fn", "deploy", "a b", echo.to_str().unwrap()]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("contains ' '"), "{}", stderr(&o));
    let o = c.agora(&["fn", "rm", "nope"]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("no function named \"nope\""),
        "{}",
        stderr(&o)
    );

    // fn rm: the hosts stop and the function is gone.
    let o = c.agora(&["fn", "rm", "echo"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let r = http("GET", &web, "/fn/echo/", b"");
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("\"echo\""), "{}", r.body);
    wait_until("echo's host to stop", || {
        !stdout(&c.agora(&["ps"]))
            .lines()
            .any(|l| l.contains("fn:echo"))
    });
}

/// Peak resident memory of a process since its peak was last reset (`VmHWM`), and
/// its resident memory now (`VmRSS`), in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Request and response bodies stream through the master's and the agent's front
/// doors, held to the one limit as they go: large bodies within it pass whole
/// without the front doors holding them, a 100 MiB body (chunked or declared) is
/// refused with 413 at either door, and both keep serving.
#[test]
fn bodies_stream_through_both_front_doors_within_one_limit() {
    const MIB: u64 = 1 << 20;
    let c = Cluster::start();
    let web = master_http(&c);
    let echo = guest("echo");
    deploy(
        &c,
        &[
            "big",
            echo.to_str().unwrap(),
            "--min-instances",
            "1",
            // Room for six echoes of 12 MiB at once in the host's cgroup (its
            // memory is one instance's plus a margin, whatever the concurrency).
            "--mem",
            "512MiB",
            "--max-concurrency",
            "8",
            // Six echoes of 12 MiB on 2 cores shared with other tests: the point is
            // the front doors' memory, not the guest's speed.
            "--timeout",
            "60s",
        ],
    );
    let agent = wait_hosts(&web, "big", 1).remove(0);
    // Warm: the host is up and the module compiled.
    assert_eq!(http("GET", &web, "/fn/big/", b"").status, 200);

    // Six 12 MiB chunked bodies at once, each echoed back whole (request and
    // response both cross the master and the agent, which run in `agora dev`).
    // Buffered, that was 3 x 12 MiB each in this process; streamed, next to none.
    // (Resetting the peak needs Linux 4.0 and root; without it the check is looser.)
    let reset = std::fs::write(format!("/proc/{}/clear_refs", c.pid()), "5").is_ok();
    let (_, rss_before) = memory(c.pid());
    let uploads: Vec<_> = (0..6)
        .map(|_| {
            let web = web.clone();
            std::thread::spawn(move || upload(&web, "/fn/big/up", 12 * MIB, 256 << 10, true))
        })
        .collect();
    for u in uploads {
        let (r, written) = u.join().expect("upload");
        assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
        assert_eq!(written, 12 * MIB);
        let body = r.body.split_once("\n\n").map_or("", |(_, b)| b);
        assert_eq!(
            body.len() as u64,
            12 * MIB,
            "the echoed body came back whole"
        );
        assert!(body.bytes().all(|b| b == b'x'));
    }
    let (peak, _) = memory(c.pid());
    let grew = peak.saturating_sub(rss_before);
    println!(
        "agora dev: resident {} MiB before, peak {} MiB while 6 x 12 MiB went through and back (peak reset: {reset})",
        rss_before / MIB,
        peak / MIB
    );
    if reset {
        assert!(
            grew < 64 * MIB,
            "the front doors grew by {} MiB for 144 MiB of bodies in flight: they buffer",
            grew / MIB
        );
    }

    // 100 MiB, chunked or declared, at the master and at the agent: 413 before the
    // body is read to its end, naming the limit.
    for (door, addr, limit_text) in [
        ("master", web.as_str(), "larger than the limit of 16MiB"),
        (
            "agent",
            agent.as_str(),
            "larger than the agent's limit of 16MiB",
        ),
    ] {
        for chunked in [true, false] {
            let (r, written) = upload(addr, "/fn/big/up", 100 * MIB, 64 << 10, chunked);
            assert_eq!(r.status, 413, "{door}, chunked {chunked}: {r:?}");
            assert!(r.body.contains(limit_text), "{door}: {}", r.body);
            assert!(
                written < 50 * MIB,
                "{door}, chunked {chunked}: the client could write {} MiB before the refusal",
                written / MIB
            );
        }
    }
    // Both doors still serve, and the function's slots were all given back.
    let r = http("POST", &web, "/fn/big/after", b"still here");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.ends_with("still here"), "{}", r.body);
    assert_eq!(http("GET", &agent, "/fn/big/", b"").status, 200);
}

/// A request whose guest sleeps past the function's timeout is answered 504 at the
/// timeout, and its instance ends then: the function's one slot (no queue) serves
/// the next request at once, where a guest still asleep would get it a 429.
#[test]
fn a_guest_sleeping_past_its_timeout_is_answered_and_ended_at_the_timeout() {
    let c = Cluster::start_with(&["--fn-idle-timeout", "60s"]);
    let web = master_http(&c);
    let slow = guest("slow");
    deploy(
        &c,
        &[
            "sleepy",
            slow.to_str().unwrap(),
            "--timeout",
            "2s",
            "--max-concurrency",
            "1",
            "--queue",
            "0",
            "--min-instances",
            "1",
            "--max-instances",
            "1",
        ],
    );
    wait_hosts(&web, "sleepy", 1);
    assert_eq!(http("GET", &web, "/fn/sleepy/?ms=1", b"").status, 200);
    let started = Instant::now();
    let r = http("GET", &web, "/fn/sleepy/?ms=30000", b"");
    let took = started.elapsed();
    println!(
        "a function sleeping 30 s with --timeout 2s answered {} after {took:?}",
        r.status
    );
    assert_eq!(r.status, 504, "{r:?}");
    assert!(r.body.contains("deadline of 2s exceeded"), "{}", r.body);
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let next = http("GET", &web, "/fn/sleepy/?ms=1", b"");
    assert_eq!(next.status, 200, "{next:?}");
}

#[test]
fn per_request_limits_and_overload_answer_with_reasons() {
    let c = Cluster::start_with(&["--fn-idle-timeout", "2s"]);
    let web = master_http(&c);
    let misbehave = guest("misbehave");
    let m = misbehave.to_str().unwrap();
    deploy(
        &c,
        &["fuel", m, "--fuel", "50000000", "--min-instances", "1"],
    );
    deploy(&c, &["mem", m, "--mem", "16MiB", "--min-instances", "1"]);
    deploy(
        &c,
        &["deadline", m, "--timeout", "300ms", "--min-instances", "1"],
    );

    let r = http("GET", &web, "/fn/fuel/?spin", b"");
    assert!(r.status >= 500, "{r:?}");
    assert!(r.body.contains("fuel"), "{}", r.body);
    assert_eq!(http("GET", &web, "/fn/fuel/", b"").body.trim(), "fine");

    let r = http("GET", &web, "/fn/mem/?alloc=64", b"");
    assert!(r.status >= 500, "{r:?}");
    assert!(r.body.contains("memory limit"), "{}", r.body);
    assert_eq!(http("GET", &web, "/fn/mem/", b"").status, 200);

    let started = Instant::now();
    let r = http("GET", &web, "/fn/deadline/?spin", b"");
    assert!(r.status >= 500, "{r:?}");
    assert!(r.body.contains("deadline"), "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(http("GET", &web, "/fn/deadline/", b"").status, 200);

    // One request at a time, one waiting: a burst gets 429/503 with Retry-After.
    let slow = guest("slow");
    deploy(
        &c,
        &[
            "slow",
            slow.to_str().unwrap(),
            "--max-concurrency",
            "1",
            "--queue",
            "1",
            "--queue-wait",
            "5s",
            "--min-instances",
            "1",
            "--max-instances",
            "1",
        ],
    );
    assert_eq!(http("GET", &web, "/fn/slow/?ms=1", b"").status, 200);
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let web = web.clone();
            std::thread::spawn(move || http("GET", &web, "/fn/slow/?ms=1500", b""))
        })
        .collect();
    let answers: Vec<HttpReply> = burst
        .into_iter()
        .map(|t| t.join().expect("request"))
        .collect();
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&HttpReply> = answers
        .iter()
        .filter(|r| r.status == 429 || r.status == 503)
        .collect();
    assert!(ok >= 1 && !refused.is_empty(), "{answers:?}");
    for r in &refused {
        assert!(r.header("retry-after").is_some(), "{r:?}");
    }
    assert_eq!(ok + refused.len(), answers.len(), "{answers:?}");
    // And the function still serves.
    assert_eq!(http("GET", &web, "/fn/slow/?ms=1", b"").status, 200);
}

#[test]
fn scale_to_zero_and_back_with_timed_cold_starts() {
    let c = Cluster::start_with(&["--fn-idle-timeout", "2s"]);
    let web = master_http(&c);
    let noop = guest("noop");
    deploy(&c, &["noop", noop.to_str().unwrap()]);
    assert!(
        running_hosts(&web, "noop").is_empty(),
        "min 0: no host at deploy"
    );

    // First-ever start: no host, and the module not yet on the agent.
    let t = Instant::now();
    let r = http("GET", &web, "/fn/noop/", b"");
    let first_ever = t.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body.trim(), "ok");

    // Warm.
    let t = Instant::now();
    assert_eq!(http("GET", &web, "/fn/noop/", b"").status, 200);
    let warm = t.elapsed();

    // Idle for the idle timeout: the host goes.
    wait_until("noop to scale to zero", || {
        fn_entry(&web, "noop").is_some_and(|f| {
            f["instances"].as_array().is_some_and(|i| i.is_empty()) && f["target"] == 0
        })
    });

    // Cold start: the module is cached (compiled) on the agent, no host runs.
    let t = Instant::now();
    let r = http("GET", &web, "/fn/noop/", b"");
    let cold = t.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    println!(
        "noop through the master: first-ever start {first_ever:?}, warm {warm:?}, cold start after scale to zero {cold:?}"
    );
    assert_eq!(running_hosts(&web, "noop").len(), 1);
}

#[test]
fn deployed_functions_survive_a_master_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = || {
        let mut cmd = std::process::Command::new(AGORA);
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--fn-idle-timeout", "2s"]);
        Proc::start(cmd, |l| l == "ready").0
    };
    let config = dir.path().join("client.json");
    let agora = |args: &[&str]| {
        run_bounded(
            std::process::Command::new(AGORA)
                .args(args)
                .env("AGORA_CONFIG", &config)
                .env_remove("AGORA_MASTER"),
            120,
        )
    };
    let web = |config: &std::path::Path| {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(config).expect("config")).expect("json");
        v["http"]
            .as_str()
            .expect("http")
            .trim_start_matches("http://")
            .to_string()
    };
    let first = start();
    let echo = guest("echo");
    let o = agora(&["fn", "deploy", "echo", echo.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(http("GET", &web(&config), "/fn/echo/", b"").status, 200);
    drop(first); // SIGTERM: master and agent stop

    let _second = start();
    let o = agora(&["fn", "ls"]);
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("echo ")),
        "{}",
        stdout(&o)
    );
    let r = http("GET", &web(&config), "/fn/echo/again", b"");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("PATH_INFO: /again"), "{}", r.body);
}

/// Task ids of the function's RUNNING hosts.
fn running_task_ids(master_http: &str, name: &str) -> Vec<String> {
    fn_entry(master_http, name)
        .and_then(|f| f["instances"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i["state"] == "TASK_RUNNING")
        .filter_map(|i| i["task_id"].as_str().map(str::to_string))
        .collect()
}

/// Waits (bounded) until each function runs one host that is none of `before`.
fn wait_replaced(master_http: &str, names: &[&str], before: &[String]) -> Vec<String> {
    let now = std::cell::RefCell::new(Vec::new());
    wait_until("the tenant's hosts to be replaced", || {
        let ids: Vec<String> = names
            .iter()
            .flat_map(|n| running_task_ids(master_http, n))
            .collect();
        let done = ids.len() == names.len() && ids.iter().all(|id| !before.contains(id));
        *now.borrow_mut() = ids;
        done
    });
    now.into_inner()
}

/// Four 1.5 s requests at once, two to each function, through the master.
fn burst(web: &str) -> Vec<HttpReply> {
    let threads: Vec<_> = ["slow-a", "slow-b", "slow-a", "slow-b"]
        .into_iter()
        .map(|name| {
            let web = web.to_string();
            std::thread::spawn(move || http("GET", &web, &format!("/fn/{name}/?ms=1500"), b""))
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("request"))
        .collect()
}

#[test]
fn a_tenant_limit_bounds_all_of_its_functions_on_an_agent() {
    let c = Cluster::start_with(&["--fn-idle-timeout", "60s"]);
    let web = master_http(&c);
    let slow = guest("slow");
    for name in ["slow-a", "slow-b"] {
        deploy(
            &c,
            &[
                name,
                slow.to_str().unwrap(),
                "--role",
                "acme",
                "--max-concurrency",
                "4",
                "--min-instances",
                "1",
                "--max-instances",
                "1",
            ],
        );
    }
    let first = wait_replaced(&web, &["slow-a", "slow-b"], &[]);
    // Without a tenant limit, each function's own limit (4) lets all four run.
    let answers = burst(&web);
    assert!(answers.iter().all(|r| r.status == 200), "{answers:?}");

    // Bad input is refused with the reason, and changes nothing.
    let o = c.agora(&["fn", "tenant", "set", "bad role!", "--max-concurrency", "1"]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("bad role!"), "{}", stderr(&o));
    let o = c.agora(&["fn", "tenant", "set", "acme", "--max-concurrency", "0"]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("at least 1"), "{}", stderr(&o));

    // One request of acme at a time on the agent, one waiting: of four at once across
    // its two functions, two run (one after the other) and two get 429 naming it.
    let o = c.agora(&[
        "fn",
        "tenant",
        "set",
        "acme",
        "--max-concurrency",
        "1",
        "--queue",
        "1",
        "--queue-wait",
        "10s",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the hosts of slow-a, slow-b are being replaced"),
        "{}",
        stderr(&o)
    );
    let limited = wait_replaced(&web, &["slow-a", "slow-b"], &first);
    let o = c.agora(&["fn", "tenant", "ls"]);
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("acme") && l.contains(" 1 ")),
        "{}",
        stdout(&o)
    );
    let answers = burst(&web);
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&HttpReply> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!((ok, refused.len()), (2, 2), "{answers:?}");
    for r in &refused {
        assert!(r.body.contains("tenant acme"), "{r:?}");
        assert!(r.header("retry-after").is_some(), "{r:?}");
    }
    // The refusals count as errors of the functions.
    wait_until("the refusals to show in the metrics", || {
        ["slow-a", "slow-b"]
            .iter()
            .filter_map(|n| fn_entry(&web, n))
            .map(|f| f["metrics"]["errors"]["queue_full"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 2
    });
    // ... and in the Prometheus exposition, labelled by function and tenant.
    let r = http("GET", &web, "/metrics", b"");
    assert_eq!(r.status, 200, "{r:?}");
    let refused_series: u64 = r
        .body
        .lines()
        .filter(|l| l.starts_with("agora_fn_errors_total{") && l.contains("class=\"queue_full\""))
        .filter(|l| l.contains("tenant=\"acme\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(refused_series, 2, "{}", r.body);

    // Removed: hosts are replaced again and all four run at once.
    let o = c.agora(&["fn", "tenant", "rm", "acme"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    wait_replaced(&web, &["slow-a", "slow-b"], &limited);
    let answers = burst(&web);
    assert!(answers.iter().all(|r| r.status == 200), "{answers:?}");
}

#[test]
fn guest_output_shows_in_fn_logs() {
    let c = Cluster::start();
    let web = master_http(&c);
    let echo = guest("echo");
    deploy(
        &c,
        &["echo", echo.to_str().unwrap(), "--min-instances", "1"],
    );
    let r = http("POST", &web, "/fn/echo/logged?x=1", b"12345");
    assert_eq!(r.status, 200, "{r:?}");
    // echo writes one stderr line per request; the host keeps it in its log.
    wait_until("`agora fn logs echo` to show echo's stderr line", || {
        let o = c.agora(&["fn", "logs", "echo"]);
        code(&o) == 0 && stdout(&o).contains("echo: POST /logged 5 bytes\n")
    });
}

/// Outgoing HTTP from a component through the whole stack: `--allow-outbound` reaches
/// the master (which refuses a bad entry, naming it), `GET /fn` and the function host,
/// whose component may then call the upstream it names, and only that.
#[test]
fn allow_outbound_lets_a_component_call_only_the_hosts_it_names() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// `guest-examples/fetch-http`, built on first use.
    fn fetch_http_component() -> std::path::PathBuf {
        agora_guest_examples::component_path("fetch-http")
    }

    // The upstream: a free loopback port, one fixed answer per connection, counted.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream = listener.local_addr().expect("local addr");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let server = std::thread::spawn({
        let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
        move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match s.read(&mut buf) {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let body = "hello from upstream\n";
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(answer.as_bytes()).is_ok() {
                    served.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });

    let c = Cluster::start();
    let web = master_http(&c);
    let fetch = fetch_http_component();
    let fetch = fetch.to_str().unwrap();
    let allowed = format!("http://127.0.0.1:{}", upstream.port());

    let o = c.agora(&["fn", "deploy", "bad", fetch, "--allow-outbound", "ftp://x"]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("\"ftp://x\"") && stderr(&o).contains("not supported"),
        "{}",
        stderr(&o)
    );

    deploy(&c, &["fetch", fetch, "--allow-outbound", &allowed]);
    deploy(&c, &["closed", fetch]);
    let path = format!("/?url=http://{upstream}/x");
    let r = http("GET", &web, &format!("/fn/fetch{path}"), b"");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "upstream status 200\nhello from upstream\n");
    let r = http("GET", &web, &format!("/fn/closed{path}"), b"");
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.body, "HttpRequestDenied\n");
    assert_eq!(served.load(Ordering::SeqCst), 1);
    let entry = fn_entry(&web, "fetch").expect("fetch in GET /fn");
    assert_eq!(
        entry["allowed_outbound_hosts"],
        serde_json::json!([allowed])
    );

    // A CGI module has no network: the flag is accepted with a warning.
    let echo = guest("echo");
    let o = c.agora(&[
        "fn",
        "deploy",
        "echo",
        echo.to_str().unwrap(),
        "--allow-outbound",
        &allowed,
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: --allow-outbound has no effect on echo"),
        "{}",
        stderr(&o)
    );

    stop.store(true, Ordering::SeqCst);
    let _ = std::net::TcpStream::connect(upstream); // wakes the accept loop
    server.join().expect("upstream thread");
}

/// One HTTPS GET to an agent's door at `addr` (127.0.0.1:PORT), verified as
/// 127.0.0.1 against the cluster CA in `certs`, as `curl --cacert ca.pem` would;
/// presenting `client.pem` when `with_cert`. The answer, or what failed.
fn https_get(
    addr: &str,
    path: &str,
    certs: &std::path::Path,
    with_cert: bool,
) -> Result<HttpReply, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.join("ca.pem")).expect("ca.pem") {
        roots.add(c.expect("a CA certificate")).expect("usable CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots);
    let mut config = if with_cert {
        let chain = CertificateDer::pem_file_iter(certs.join("client.pem"))
            .expect("client.pem")
            .map(|c| c.expect("a certificate"))
            .collect();
        let key = PrivateKeyDer::from_pem_file(certs.join("client.key")).expect("client.key");
        builder
            .with_client_auth_cert(chain, key)
            .expect("client identity")
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from("127.0.0.1").expect("an IP name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // An answer read whole, then a close without close_notify.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(parse_reply(&raw))
}

/// An agent started with `--http-tls --http-client-certs` serves its function door
/// over HTTPS only: the master's gateway reaches it (verifying it against the
/// cluster's CA, showing its own certificate), a client near it with the cluster's
/// client certificate does too, a plain-HTTP request is answered 400 saying to use
/// https, and a TLS client without a certificate is refused in the handshake.
#[test]
fn an_agent_door_that_requires_tls_serves_the_gateway_and_refuses_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let init = run_bounded(
        std::process::Command::new(AGORA)
            .args(["certs", "init", "--agent-name", "agent.test"])
            .arg(&certs),
        60,
    );
    assert_eq!(code(&init), 0, "{}", stderr(&init));
    assert!(
        stdout(&init).contains("agent-http.pem"),
        "{}",
        stdout(&init)
    );

    let mut m = std::process::Command::new(AGORA);
    m.args([
        "master",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--certs",
    ])
    .arg(&certs)
    .arg("--data-dir")
    .arg(dir.path().join("master"));
    let (master, line) = Proc::start(m, |l| l.starts_with("master listening on "));
    let addr = line.split_whitespace().nth(3).expect("address").to_string();
    let web = master
        .lines
        .recv_timeout(Duration::from_secs(60))
        .expect("the master's HTTP line");
    let web = web
        .strip_prefix("master serving functions on http://")
        .unwrap_or_else(|| panic!("unexpected line {web:?}"))
        .to_string();

    // Without the certificate files, the agent says what to run.
    let missing = dir.path().join("no-certs");
    std::fs::create_dir_all(&missing).expect("dir");
    for f in ["ca.pem", "agent.pem", "agent.key"] {
        std::fs::copy(certs.join(f), missing.join(f)).expect("copy");
    }
    let refused = run_bounded(
        std::process::Command::new(AGORA)
            .args(["agent", "--master", &addr, "--http-tls", "--certs"])
            .arg(&missing)
            .arg("--work-dir")
            .arg(dir.path().join("refused")),
        60,
    );
    assert_ne!(code(&refused), 0);
    assert!(
        stderr(&refused).contains("agent-http.pem")
            && stderr(&refused).contains("agora certs init"),
        "{}",
        stderr(&refused)
    );

    let mut a = std::process::Command::new(AGORA);
    a.args(["agent", "--drain-on-stop", "--master", &addr, "--certs"])
        .arg(&certs)
        .arg("--work-dir")
        .arg(dir.path().join("agent"))
        .args([
            "--resources",
            "cpus:2;mem:2048;disk:1024",
            "--http",
            "127.0.0.1:0",
            "--http-tls",
            "--http-client-certs",
        ]);
    let (_agent, line) = Proc::start(a, |l| l.starts_with("agent serving functions on "));
    let door = line
        .strip_prefix("agent serving functions on https://")
        .unwrap_or_else(|| panic!("the agent does not say https: {line:?}"))
        .to_string();

    let client = |args: &[&str]| {
        run_bounded(
            std::process::Command::new(AGORA)
                .args(args)
                .env("AGORA_CONFIG", certs.join("client.json"))
                .env("AGORA_MASTER", &addr),
            120,
        )
    };
    let echo = guest("echo");
    let o = client(&[
        "fn",
        "deploy",
        "echo",
        echo.to_str().unwrap(),
        "--min-instances",
        "1",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Through the master: its gateway speaks TLS to the agent.
    let r = http("POST", &web, "/fn/echo/via-master", b"over tls");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("PATH_INFO: /via-master"), "{}", r.body);
    assert!(r.body.ends_with("over tls"), "{}", r.body);
    // The gateway's metrics poll reaches it too: the host shows with its https address.
    let hosts = wait_hosts(&web, "echo", 1);
    assert_eq!(hosts, vec![format!("https://{door}")]);
    // Plain HTTP to the agent's door: told to use https.
    let r = http("GET", &door, "/fn/echo/", b"");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("HTTPS only"), "{}", r.body);
    // A silent connection holds no one up (each handshake has its own task, bounded).
    let _silent = std::net::TcpStream::connect(&door).expect("connect");
    // Without a client certificate: refused in the handshake.
    let e = https_get(&door, "/fn/echo/", &certs, false).expect_err("served without a certificate");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // With the cluster's client certificate, straight to the agent.
    let r = https_get(&door, "/fn/echo/near?z=3", &certs, true).expect("HTTPS with a certificate");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("QUERY_STRING: z=3"), "{}", r.body);
    drop(master);
}
