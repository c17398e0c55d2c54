//! The isolation layer on real cgroups (root; v1 on the test machines): limits read
//! back from cgroupfs, a child joined before exec, CPU use under a quota, and leftover
//! cleanup. Skips, saying why, where cgroups cannot be used.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use agora_native_executor::{CgroupLimits, CgroupVersion, IsolationMode, Isolator};
use common::*;

fn read(dir: &std::path::Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
        .trim()
        .to_string()
}

#[test]
fn limits_are_written_and_a_child_joins_before_exec() {
    require_cgroups!("limits_are_written_and_a_child_joins_before_exec");
    let root = unique_root("limits");
    let _cleanup = CleanupRoot(root.clone());
    let iso = Isolator::new(Some(IsolationMode::Cgroups), &root).unwrap();
    assert_eq!(iso.mode(), IsolationMode::Cgroups);
    let limits = CgroupLimits {
        milli_cpus: 500,
        cfs_quota: true,
        mem_bytes: 64 << 20,
        pids_max: 64,
    };
    let g = iso.create("fw/ex/t1", &limits).unwrap();
    assert_eq!(g.name(), format!("{root}/fw/ex/t1"));
    let cpu = g.controller_dir("cpu").unwrap();
    let mem = g.controller_dir("memory").unwrap();
    let pids = g.controller_dir("pids").unwrap();
    match g.cgroup_version().unwrap() {
        CgroupVersion::V1 => {
            assert_eq!(read(&cpu, "cpu.shares"), "512");
            assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "50000");
            assert_eq!(read(&cpu, "cpu.cfs_period_us"), "100000");
            assert_eq!(read(&mem, "memory.limit_in_bytes"), "67108864");
            if mem.join("memory.memsw.limit_in_bytes").exists() {
                assert_eq!(read(&mem, "memory.memsw.limit_in_bytes"), "67108864");
            }
        }
        CgroupVersion::V2 => {
            assert_eq!(read(&cpu, "cpu.weight"), "20");
            assert_eq!(read(&cpu, "cpu.max"), "50000 100000");
            assert_eq!(read(&mem, "memory.max"), "67108864");
        }
    }
    assert_eq!(read(&pids, "pids.max"), "64");

    // Raising memory past the old memsw value and dropping the quota both work.
    g.update(&CgroupLimits {
        milli_cpus: 2000,
        cfs_quota: false,
        mem_bytes: 1 << 30,
        pids_max: 0,
    })
    .unwrap();
    match g.cgroup_version().unwrap() {
        CgroupVersion::V1 => {
            assert_eq!(read(&cpu, "cpu.shares"), "2048");
            assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "-1");
            assert_eq!(read(&mem, "memory.limit_in_bytes"), "1073741824");
        }
        CgroupVersion::V2 => {
            assert_eq!(read(&cpu, "cpu.max"), "max 100000");
            assert_eq!(read(&mem, "memory.max"), "1073741824");
        }
    }
    assert_eq!(read(&pids, "pids.max"), "max");

    // A contained child is in every controller's group from its first instruction.
    let mut cmd = Command::new("sleep");
    cmd.arg("1000");
    let mut child = g.contain(&mut cmd).unwrap().spawned(cmd.spawn()).unwrap();
    let pid = child.id() as i32;
    assert_eq!(g.procs(), vec![pid]);
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for controller in ["cpu", "memory", "pids"] {
        let line = membership
            .lines()
            .find(|l| {
                let ctrls = l.split(':').nth(1).unwrap_or("");
                ctrls.split(',').any(|c| c == controller) || ctrls.is_empty()
            })
            .unwrap_or_else(|| panic!("no {controller} line in {membership}"));
        assert!(
            line.ends_with(&format!("/{root}/fw/ex/t1")),
            "{controller}: {line}"
        );
    }
    // Its own session and process group.
    // SAFETY: no preconditions.
    assert_eq!(unsafe { libc::getpgid(pid) }, pid);

    g.kill_all(Duration::from_secs(5)).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "sleep obeys SIGTERM");
    g.remove().unwrap();
    assert!(!any_cgroup_dir_exists(&format!("{root}/fw/ex/t1")));
}

/// Measures what the field notes record: create + limits, attach (spawn of /bin/true
/// joining the group), remove.
#[test]
fn create_limit_attach_remove_timing() {
    require_cgroups!("create_limit_attach_remove_timing");
    let root = unique_root("timing");
    let _cleanup = CleanupRoot(root.clone());
    let iso = Isolator::new(Some(IsolationMode::Cgroups), &root).unwrap();
    let limits = CgroupLimits {
        milli_cpus: 500,
        cfs_quota: true,
        mem_bytes: 128 << 20,
        pids_max: 1024,
    };
    let (mut create, mut attach, mut remove, mut total) = (vec![], vec![], vec![], vec![]);
    for i in 0..30 {
        let t0 = Instant::now();
        let g = iso.create(&format!("t{i}"), &limits).unwrap();
        let t1 = Instant::now();
        let mut cmd = Command::new("/bin/true");
        let mut child = g.contain(&mut cmd).unwrap().spawned(cmd.spawn()).unwrap();
        assert!(child.wait().unwrap().success());
        let t2 = Instant::now();
        g.remove().unwrap();
        let t3 = Instant::now();
        create.push(t1 - t0);
        attach.push(t2 - t1);
        remove.push(t3 - t2);
        total.push(t3 - t0);
    }
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    // Baselines: std spawns with posix_spawn (vfork-like) when it can, and with a full
    // fork when a pre_exec hook is set, as ours is.
    let (mut spawn, mut fork) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let t = Instant::now();
        assert!(Command::new("/bin/true").status().unwrap().success());
        spawn.push(t.elapsed());
        let t = Instant::now();
        let mut cmd = Command::new("/bin/true");
        // SAFETY: the hook does nothing.
        unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, || Ok(())) };
        assert!(cmd.status().unwrap().success());
        fork.push(t.elapsed());
    }
    println!(
        "cgroup p50 over 30: create+limits {:?}, attach (spawn+wait /bin/true joining the \
         group) {:?}, remove {:?}, total {:?}; without cgroups: spawn+wait of /bin/true \
         {:?} (posix_spawn), {:?} (fork, as with a pre_exec hook)",
        p50(&mut create),
        p50(&mut attach),
        p50(&mut remove),
        p50(&mut total),
        p50(&mut spawn),
        p50(&mut fork)
    );
}

/// CPU time of the whole machine from /proc/stat: (idle, total) in USER_HZ ticks.
fn machine_cpu() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap();
    let fields: Vec<u64> = text
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap())
        .collect();
    (fields[3] + fields[4], fields.iter().sum())
}

#[test]
fn busy_loop_under_half_a_cpu_uses_about_half_a_core() {
    require_cgroups!("busy_loop_under_half_a_cpu_uses_about_half_a_core");
    let root = unique_root("cpu");
    let _cleanup = CleanupRoot(root.clone());
    let iso = Isolator::new(Some(IsolationMode::Cgroups), &root).unwrap();
    let g = iso
        .create(
            "busy",
            &CgroupLimits {
                milli_cpus: 500,
                cfs_quota: true,
                mem_bytes: 0,
                pids_max: 0,
            },
        )
        .unwrap();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "while :; do :; done"]);
    let mut child = g.contain(&mut cmd).unwrap().spawned(cmd.spawn()).unwrap();

    let cpu = |u: &agora_proto::v1::ResourceUsage| u.cpu_user_seconds + u.cpu_system_seconds;
    let (u0, m0, t0) = (g.stats(), machine_cpu(), Instant::now());
    // The measurement window itself.
    std::thread::sleep(Duration::from_secs(2));
    let (u1, m1, elapsed) = (g.stats(), machine_cpu(), t0.elapsed().as_secs_f64());
    g.kill_all(Duration::ZERO).unwrap();
    child.wait().unwrap();
    g.remove().unwrap();

    let cores = (cpu(&u1) - cpu(&u0)) / elapsed;
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let idle_cores = (m1.0 - m0.0) as f64 / hz / elapsed;
    let throttled = u1.cpu_throttled_periods - u0.cpu_throttled_periods;
    println!(
        "busy loop under 0.5 cpus: {cores:.3} cores over {elapsed:.2} s, throttled in \
         {throttled} periods; machine idle {idle_cores:.2} cores meanwhile"
    );
    assert!(
        cores <= 0.7,
        "the quota caps use near 0.5 cores, got {cores:.3}"
    );
    if idle_cores + cores >= 0.5 {
        // There was room for more: only the quota held the loop back.
        assert!(cores >= 0.3, "expected about 0.5 cores, got {cores:.3}");
        assert!(throttled > 0, "a busy loop over its quota is throttled");
    } else {
        eprintln!(
            "NOTE: the machine was busy (idle {idle_cores:.2} cores): lower bound not asserted"
        );
    }
}

#[test]
fn cleanup_leftovers_kills_and_removes_a_leftover_tree() {
    require_cgroups!("cleanup_leftovers_kills_and_removes_a_leftover_tree");
    let root = unique_root("leftovers");
    let _cleanup = CleanupRoot(root.clone());
    let mark = marker("leftovers");
    let mut children = Vec::new();
    {
        // An "agent" that crashes: groups with processes, never removed.
        let iso = Isolator::new(Some(IsolationMode::Cgroups), &root).unwrap();
        for name in ["fw/ex1/t1", "fw/ex1/t2", "fw/ex2/t3"] {
            let g = iso.create(name, &CgroupLimits::default()).unwrap();
            let mut cmd = Command::new("/bin/sh");
            // Ignores SIGTERM and forks a grandchild: only a SIGKILL of the whole
            // group cleans this up.
            cmd.args(["-c", "trap '' TERM; sleep 1000 & wait"])
                .env("AGORA_TEST_MARKER", &mark);
            children.push(g.contain(&mut cmd).unwrap().spawned(cmd.spawn()).unwrap());
        }
    }
    // The "restarted agent": whatever of the shells and sleeps exists is found.
    let iso = Isolator::new(Some(IsolationMode::Cgroups), &root).unwrap();
    let removed = iso.cleanup_leftovers().unwrap();
    // root, fw, ex1, ex2, t1, t2, t3
    assert_eq!(removed, 7);
    assert!(!any_cgroup_dir_exists(&root), "{:?}", cgroup_dirs(&root));
    for mut c in children {
        let status = c.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
    assert_eq!(marked_processes(&mark), Vec::<i32>::new());
    // Nothing left to clean.
    assert_eq!(iso.cleanup_leftovers().unwrap(), 0);
}

#[test]
fn forcing_cgroups_with_a_bad_root_name_is_an_error() {
    let err = Isolator::new(Some(IsolationMode::Cgroups), "../etc").unwrap_err();
    assert!(err.to_string().contains("invalid cgroup name"), "{err}");
}

#[test]
fn a_group_shrinks_below_the_quota_of_a_child_left_behind() {
    // An executor's group is shrunk when its tasks end, possibly before their groups
    // are removed: cgroup v1 refuses a parent's quota below a child's (EINVAL).
    require_cgroups!("a_group_shrinks_below_the_quota_of_a_child_left_behind");
    let root = unique_root("shrink");
    let _cleanup = CleanupRoot(root.clone());
    let iso = Isolator::new(Some(IsolationMode::Cgroups), &root).unwrap();
    let limits = |milli_cpus| CgroupLimits {
        milli_cpus,
        cfs_quota: true,
        mem_bytes: 64 << 20,
        pids_max: 0,
    };
    let exec = iso.create("fw/ex", &limits(2000)).unwrap();
    let task = iso.create("fw/ex/t1", &limits(2000)).unwrap();
    exec.update(&limits(10))
        .expect("the executor's group shrinks while the task's group remains");
    if exec.cgroup_version().unwrap() == CgroupVersion::V1 {
        let cpu = exec.controller_dir("cpu").unwrap();
        assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "1000");
        let child = task.controller_dir("cpu").unwrap();
        assert_eq!(read(&child, "cpu.cfs_quota_us"), "1000");
    }
    // A task group just removed (v1 frees it later) does not hold the shrink back.
    for round in 0..20 {
        exec.update(&limits(2000)).unwrap();
        let t = iso
            .create(&format!("fw/ex/r{round}"), &limits(2000))
            .unwrap();
        t.remove().unwrap();
        exec.update(&limits(10))
            .unwrap_or_else(|e| panic!("round {round}: shrink after a removal: {e}"));
    }
}
