//! Native tasks end to end: `agora run --command/--exec` through a real dev cluster,
//! with the native executor isolating each task in a cgroup (v1 or v2, as root), and
//! the posix fallback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use agora_native_executor::{CgroupVersion, IsolationMode, Isolator};
use common::*;

/// The cgroup version the agent will use here (as root, where cgroups are usable), or
/// why the cgroup tests skip. `AGORA_REQUIRE_CGROUP=v1|v2` (set by
/// `scripts/cgroup2-vm.sh` in its cgroup v2 guest) makes a skip or another version a
/// failure. Prints the version each test runs on ("cgroup v2: TEST").
fn cgroups_usable_for(test: &str) -> Option<CgroupVersion> {
    let required = match std::env::var("AGORA_REQUIRE_CGROUP").ok().as_deref() {
        None => None,
        Some("v1") => Some(CgroupVersion::V1),
        Some("v2") => Some(CgroupVersion::V2),
        Some(other) => panic!("AGORA_REQUIRE_CGROUP is v1 or v2, not {other:?}"),
    };
    let found = if unsafe { libc::geteuid() } != 0 {
        Err("not running as root".to_string())
    } else {
        Isolator::new(Some(IsolationMode::Cgroups), "agora-test-probe")
            .map(|iso| iso.cgroup_version().expect("cgroups have a version"))
            .map_err(|e| e.to_string())
    };
    match found {
        Ok(v) => {
            if let Some(r) = required {
                assert_eq!(
                    v, r,
                    "{test}: AGORA_REQUIRE_CGROUP asks for another version"
                );
            }
            let n = if v == CgroupVersion::V1 { 1 } else { 2 };
            println!("cgroup v{n}: {test}");
            Some(v)
        }
        Err(why) => {
            assert!(
                required.is_none(),
                "{test}: AGORA_REQUIRE_CGROUP is set but cgroups are unusable: {why}"
            );
            eprintln!("SKIPPED {test}: needs root and usable cgroups: {why}");
            None
        }
    }
}

/// One cgroup-isolated cluster with a small pids limit, shared by this file's tests.
fn cluster() -> &'static Cluster {
    static C: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();
    C.get_or_init(|| Cluster::start_with(&["--pids-limit", "64"]))
}

/// The agent's cgroup directory: under a v1 controller's mount, or in the v2
/// hierarchy (`controller` is then ignored).
fn agent_cgroup(c: &Cluster, version: CgroupVersion, controller: &str) -> PathBuf {
    let work = std::fs::canonicalize(c.agent_dir()).unwrap();
    let slug = agora_proto::sha256_hex(work.to_string_lossy().as_bytes())[..12].to_string();
    let mount = match version {
        CgroupVersion::V1 => PathBuf::from("/sys/fs/cgroup").join(controller),
        CgroupVersion::V2 => PathBuf::from("/sys/fs/cgroup"),
    };
    mount.join("agora").join(format!("agent-{slug}"))
}

#[test]
fn shell_command_output_and_exit_code_pass_through() {
    if cgroups_usable_for("shell_command_output_and_exit_code_pass_through").is_none() {
        return;
    }
    let c = cluster();
    let o = c.agora(&[
        "run",
        "--command",
        r#"sh -c "echo hi; echo oops >&2; exit 3""#,
    ]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert_eq!(stdout(&o), "hi\n");
    assert!(stderr(&o).contains("oops"), "{}", stderr(&o));
    assert!(
        final_line(&o).ends_with("FAILED: exited with code 3"),
        "{}",
        final_line(&o)
    );
    let id = task_id(&o);
    assert_eq!(stdout(&c.agora(&["logs", &id])), "hi\n");
    assert_eq!(stdout(&c.agora(&["logs", "--stderr", &id])), "oops\n");
    let ps = stdout(&c.agora(&["ps", "--all"]));
    let row = ps
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_default()
        .to_string();
    assert!(row.contains("COMMAND_EXITED"), "{row}");
}

#[test]
fn argv_form_runs_without_a_shell() {
    if cgroups_usable_for("argv_form_runs_without_a_shell").is_none() {
        return;
    }
    let o = cluster().agora(&[
        "run",
        "--exec",
        "/usr/bin/env",
        "--",
        "A=B",
        "sh",
        "-c",
        "echo $A; pwd",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("B"));
    assert!(
        lines.next().unwrap_or_default().ends_with("/fs"),
        "the task runs in its sandbox: {out}"
    );
}

#[test]
fn a_missing_command_says_command_not_found() {
    if cgroups_usable_for("a_missing_command_says_command_not_found").is_none() {
        return;
    }
    let c = cluster();
    let o = c.agora(&["run", "--exec", "no-such-program-xyz"]);
    assert_eq!(code(&o), 127, "{}", stderr(&o));
    assert!(
        final_line(&o).contains("command not found: no-such-program-xyz"),
        "{}",
        final_line(&o)
    );
    let o = c.agora(&["run", "--command", "no-such-program-xyz --flag"]);
    assert_eq!(code(&o), 127, "{}", stderr(&o));
    assert!(
        final_line(&o).contains("command not found"),
        "{}",
        final_line(&o)
    );
}

#[test]
fn a_fork_bomb_is_stopped_by_the_pids_limit_and_others_are_untouched() {
    if cgroups_usable_for("a_fork_bomb_is_stopped_by_the_pids_limit_and_others_are_untouched")
        .is_none()
    {
        return;
    }
    let c = cluster();
    let o = c.agora(&[
        "run",
        "--mem",
        "512MiB",
        "--command",
        "for i in $(seq 1 500); do sleep 30 & done; wait",
    ]);
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(
        final_line(&o).contains("pids limit of 64 reached"),
        "{}",
        stderr(&o)
    );
    let o = c.agora(&["run", "--command", "echo still fine"]);
    assert_eq!(stdout(&o), "still fine\n");
}

#[test]
fn a_memory_bomb_is_oom_killed_and_reported() {
    if cgroups_usable_for("a_memory_bomb_is_oom_killed_and_reported").is_none() {
        return;
    }
    let o = cluster().agora(&[
        "run",
        "--mem",
        "64MiB",
        "--command",
        "x=a; while :; do x=$x$x; done",
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        final_line(&o).contains("FAILED: memory limit of 64MiB reached (out-of-memory kill)"),
        "{}",
        final_line(&o)
    );
    let ps = stdout(&cluster().agora(&["ps", "--all"]));
    let id = task_id(&o);
    assert!(
        ps.lines()
            .any(|l| l.starts_with(&id) && l.contains("MEMORY_LIMIT")),
        "{ps}"
    );
}

#[test]
fn kill_takes_the_whole_process_tree_even_when_it_ignores_sigterm() {
    if cgroups_usable_for("kill_takes_the_whole_process_tree_even_when_it_ignores_sigterm")
        .is_none()
    {
        return;
    }
    let c = cluster();
    let marker = format!("{}", 900_000 + std::process::id() % 90_000);
    let script = format!(
        r#"trap "" TERM; for i in 1 2 3; do sh -c 'trap "" TERM; sleep {marker}' & done; wait"#
    );
    let mut run = Command::new(AGORA)
        .args([
            "run",
            "--name",
            "tree",
            "--kill-grace",
            "1s",
            "--command",
            &script,
        ])
        .env("AGORA_CONFIG", &c.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_for_task(c, |row| row.contains("tree") && row.contains("RUNNING"));
    wait_until("the grandchildren to start", || count_procs(&marker) >= 3);
    let k = c.agora(&["kill", &id]);
    assert_eq!(code(&k), 0, "{}", stderr(&k));
    let status = wait_child(&mut run, 60).status.code();
    assert_eq!(status, Some(137));
    assert_eq!(
        count_procs(&marker),
        0,
        "processes of the killed task are left"
    );
}

#[test]
fn cpus_half_caps_a_busy_loop_near_half_a_core() {
    if cgroups_usable_for("cpus_half_caps_a_busy_loop_near_half_a_core").is_none() {
        return;
    }
    let c = cluster();
    let o = c.agora(&[
        "run",
        "--cpus",
        "0.5",
        "--timeout",
        "2s",
        "--command",
        "while :; do :; done",
    ]);
    assert!(
        final_line(&o).contains("deadline of 2s exceeded"),
        "{}",
        stderr(&o)
    );
    let id = task_id(&o);
    let ps = stdout(&c.agora(&["ps", "--all", "--stats"]));
    let row = ps
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{ps}"))
        .to_string();
    let cpu: f64 = row.split_whitespace().nth(3).unwrap().parse().unwrap();
    let throttled: u64 = row.split_whitespace().nth(4).unwrap().parse().unwrap();
    // Two seconds at half a core is one cpu-second; a generous band for a shared machine.
    assert!(
        (0.6..=1.4).contains(&cpu),
        "used {cpu} cpu-seconds in 2 s under cpus 0.5: {row}"
    );
    // Throttled in every period it ran past its quota: on a busy machine the loop
    // gets the CPU in fewer of the 20 periods (5 seen while another build ran), so
    // any throttling shows the quota is set; the cpu-seconds above show its size.
    assert!(throttled > 0, "the CFS quota throttled it: {row}");
}

#[test]
fn executors_sit_in_a_cgroup_sized_to_their_tasks() {
    let Some(version) = cgroups_usable_for("executors_sit_in_a_cgroup_sized_to_their_tasks") else {
        return;
    };
    let c = Cluster::start();
    let mut run = Command::new(AGORA)
        .args([
            "run",
            "--name",
            "sized",
            "--cpus",
            "0.5",
            "--mem",
            "128MiB",
            "--command",
            "sleep 600",
        ])
        .env("AGORA_CONFIG", &c.config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = wait_for_task(&c, |row| row.contains("sized") && row.contains("RUNNING"));
    let mem = agent_cgroup(&c, version, "memory");
    let exec = std::fs::read_dir(&mem)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            // v2: the agent's root also holds cgroup.* and controller files.
            e.file_type()
                .unwrap()
                .is_dir()
                .then(|| e.path().join("default-native"))
        })
        .find(|p| p.exists())
        .expect("the native executor's cgroup");
    let read = |dir: &std::path::Path, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
            .trim()
            .to_string()
    };
    let cpu_dir = agent_cgroup(&c, version, "cpu").join(exec.strip_prefix(&mem).unwrap());
    let (mem_file, executor_quota) = match version {
        CgroupVersion::V1 => ("memory.limit_in_bytes", read(&cpu_dir, "cpu.cfs_quota_us")),
        CgroupVersion::V2 => ("memory.max", read(&cpu_dir, "cpu.max")),
    };
    let limit: u64 = read(&exec, mem_file).parse().unwrap();
    assert_eq!(
        limit,
        (128 + 32) << 20,
        "task memory plus the executor's allowance"
    );
    let want_quota = match version {
        CgroupVersion::V1 => "50000",
        CgroupVersion::V2 => "50000 100000",
    };
    assert_eq!(executor_quota, want_quota);
    // The task's own group nests inside the executor's (on v2 beside the executor's
    // own leaf, `executor.proc`: v2 allows no processes in a group with children
    // that have controllers).
    let subgroups: Vec<PathBuf> = std::fs::read_dir(&exec)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    let task_dir = subgroups
        .iter()
        .find(|p| !p.ends_with("executor.proc"))
        .unwrap_or_else(|| panic!("no task cgroup in {subgroups:?}"));
    if version == CgroupVersion::V2 {
        let leaf = exec.join("executor.proc");
        assert!(
            subgroups.contains(&leaf),
            "the executor's leaf: {subgroups:?}"
        );
        assert_eq!(
            read(&exec, "cgroup.procs"),
            "",
            "no process in an inner group"
        );
        assert_ne!(
            read(&leaf, "cgroup.procs"),
            "",
            "the executor sits in its leaf"
        );
        let enabled = read(&exec, "cgroup.subtree_control");
        for c in ["cpu", "memory", "pids"] {
            assert!(
                enabled.split_whitespace().any(|e| e == c),
                "{c} enabled for the task groups: {enabled}"
            );
        }
        assert_eq!(
            read(task_dir, "pids.max"),
            "1024",
            "the agent's default --pids-limit"
        );
    }
    let task_mem = match version {
        CgroupVersion::V1 => "memory.limit_in_bytes",
        CgroupVersion::V2 => "memory.max",
    };
    let task_limit: u64 = read(task_dir, task_mem).parse().unwrap();
    assert_eq!(task_limit, 128 << 20);
    assert_eq!(code(&c.agora(&["kill", &id])), 0);
    wait_child(&mut run, 60);
    wait_until("the executor's cgroup to be removed", || !exec.exists());
}

#[test]
fn posix_isolation_still_runs_and_kills_commands() {
    let c = Cluster::start_with(&["--isolation", "posix"]);
    let o = c.agora(&["run", "--command", "echo posix; exit 4"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert_eq!(stdout(&o), "posix\n");
    let mut run = Command::new(AGORA)
        .args([
            "run",
            "--name",
            "psleep",
            "--kill-grace",
            "500ms",
            "--command",
            "trap '' TERM; sleep 600",
        ])
        .env("AGORA_CONFIG", &c.config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = wait_for_task(&c, |row| row.contains("psleep") && row.contains("RUNNING"));
    assert_eq!(code(&c.agora(&["kill", &id])), 0);
    assert_eq!(wait_child(&mut run, 60).status.code(), Some(137));
    // wasm tasks are unaffected by the isolation mode.
    assert_eq!(
        code(&c.agora(&["run", guest("hello").to_str().unwrap()])),
        0
    );
}

fn count_procs(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| {
            String::from_utf8_lossy(c).replace('\0', " ").trim() == format!("sleep {marker}")
        })
        .count()
}

#[test]
fn ps_stats_shows_live_usage_of_running_native_tasks() {
    if cgroups_usable_for("ps_stats_shows_live_usage_of_running_native_tasks").is_none() {
        return;
    }
    let c = cluster();
    let mut run = Command::new(AGORA)
        .args([
            "run",
            "--name",
            "busy",
            "--cpus",
            "0.5",
            "--command",
            "while :; do :; done",
        ])
        .env("AGORA_CONFIG", &c.config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = wait_for_task(c, |row| row.contains("busy") && row.contains("RUNNING"));
    // CPU seconds grow while it runs: read them live from its cgroup through the master.
    wait_until("live cpu usage above 0.2 s", || {
        let ps = stdout(&c.agora(&["ps", "--stats"]));
        ps.lines()
            .find(|l| l.starts_with(&id))
            .and_then(|row| row.split_whitespace().nth(3)?.parse::<f64>().ok())
            .is_some_and(|cpu| cpu > 0.2)
    });
    assert_eq!(code(&c.agora(&["kill", &id])), 0);
    wait_child(&mut run, 60);
}
