//! Pure functions over the text of cgroupfs and procfs files: no file is opened here,
//! so every format is unit-tested with the exact text the kernel writes, for cgroup v1
//! and v2 alike.

use std::path::PathBuf;

/// One `key value` line of a flat-keyed file (`cpu.stat`, `memory.events`,
/// `pids.events`, `memory.oom_control`, `cpuacct.stat`): the value of `key`, if the
/// file has that key and the value is a number.
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(key))
            .then(|| words.next())
            .flatten()
            .and_then(|v| v.parse().ok())
    })
}

/// A single-number file (`memory.current`, `memory.peak`, `memory.usage_in_bytes`,
/// `cpuacct.usage_user`...). `max` reads as `None`, like an unparsable file.
pub fn single_value(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// CPU time from cgroup v1's `cpuacct.stat` (`user N` / `system N`, in USER_HZ
/// ticks), as seconds.
pub fn cpuacct_stat_seconds(text: &str, user_hz: u64) -> (f64, f64) {
    let hz = user_hz.max(1) as f64;
    let ticks = |key| keyed_value(text, key).unwrap_or(0) as f64;
    (ticks("user") / hz, ticks("system") / hz)
}

/// CPU time of a v1 group: the exact total of `cpuacct.usage` (ns) split between user
/// and system in the proportion of `cpuacct.stat`'s tick counts (as the kernel does for
/// /proc). The tick counts alone are coarse (10 ms), and `cpuacct.usage_user`/`_sys`
/// are tick-sampled too: on Linux 6.18 they overstated a throttled busy loop by 2-20%.
/// Without ticks yet (a short task), the whole total counts as user time.
pub fn v1_cpu_seconds(cpuacct_stat: &str, user_hz: u64, usage_ns: Option<u64>) -> (f64, f64) {
    let (user, system) = cpuacct_stat_seconds(cpuacct_stat, user_hz);
    let Some(total) = usage_ns.map(|ns| ns as f64 / 1e9) else {
        return (user, system);
    };
    if user + system > 0.0 {
        let u = total * user / (user + system);
        (u, total - u)
    } else {
        (total, 0.0)
    }
}

/// CPU time from cgroup v2's `cpu.stat` (`user_usec`, `system_usec`), as seconds.
pub fn cpu_stat_v2_seconds(text: &str) -> (f64, f64) {
    let usec = |key| keyed_value(text, key).unwrap_or(0) as f64 / 1e6;
    (usec("user_usec"), usec("system_usec"))
}

/// What cgroup v1's `memory.oom_control` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomControl {
    /// The group is at its limit and its OOM handling is in progress.
    pub under_oom: bool,
    /// Processes the OOM killer killed in this group (kernel 4.13 and later; `None`
    /// on older kernels, which do not count).
    pub oom_kill: Option<u64>,
}

pub fn parse_oom_control(text: &str) -> OomControl {
    OomControl {
        under_oom: keyed_value(text, "under_oom").unwrap_or(0) != 0,
        oom_kill: keyed_value(text, "oom_kill"),
    }
}

/// Whether v1 evidence shows an out-of-memory kill. Kernels from 4.13 count kills in
/// `oom_kill`, the only reliable evidence. Older ones have no counter: `under_oom`
/// with a non-zero failcnt is the best they give, and it can miss a kill (`under_oom`
/// is only set while the OOM is being handled; on Linux 6.18 both failcnt files stayed
/// 0 through an OOM kill).
pub fn v1_oom_killed(oom_control: &str, failcnt: Option<u64>) -> bool {
    let oc = parse_oom_control(oom_control);
    match oc.oom_kill {
        Some(kills) => kills > 0,
        None => oc.under_oom && failcnt.unwrap_or(0) > 0,
    }
}

/// OOM kills from cgroup v2's `memory.events` (`oom_kill N`). `oom_group_kill`
/// counts whole-group kills, which also end in `oom_kill`.
pub fn v2_oom_kills(memory_events: &str) -> u64 {
    keyed_value(memory_events, "oom_kill").unwrap_or(0)
}

/// Fork attempts refused because the group was at `pids.max` (`max N` in
/// `pids.events`, v1 and v2 alike).
pub fn pids_max_events(pids_events: &str) -> u64 {
    keyed_value(pids_events, "max").unwrap_or(0)
}

/// The pids listed in `cgroup.procs` / `tasks`.
pub fn parse_pids(text: &str) -> Vec<i32> {
    text.lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&p: &i32| p > 0)
        .collect()
}

/// Whether v2's `cgroup.events` says the group is frozen.
pub fn v2_frozen(cgroup_events: &str) -> bool {
    keyed_value(cgroup_events, "frozen") == Some(1)
}

/// The controllers listed in v2's `cgroup.controllers` or `cgroup.subtree_control`
/// (the latter is written as `+cpu`, read back as `cpu`).
pub fn controller_list(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.trim_start_matches(['+', '-']).to_string())
        .collect()
}

/// Why the groups under a cgroup2 mount could get none of the `needed` controllers: the
/// mount's root is itself a non-root group (a container's cgroup namespace, a delegated
/// subtree: such a group has a `cgroup.type` file, the true root has none) that holds
/// processes and has not enabled the controllers for its children. v2 refuses that
/// (EBUSY, "no internal processes"). Returns the processes in the way, or `None` when
/// nothing blocks. `procs` and `subtree_control` are the root's files.
pub fn v2_root_blocks_controllers(
    has_cgroup_type: bool,
    procs: &str,
    subtree_control: &str,
    needed: &[&str],
) -> Option<Vec<i32>> {
    if !has_cgroup_type {
        return None; // the true root is exempt from the rule
    }
    let enabled = controller_list(subtree_control);
    if needed.iter().all(|n| enabled.iter().any(|e| e == n)) {
        return None;
    }
    let pids = parse_pids(procs);
    (!pids.is_empty()).then_some(pids)
}

/// Converts v1 `cpu.shares` (2..=262144) to v2 `cpu.weight` (1..=10000), the way runc
/// and systemd do, so 1024 shares (one cpu) is weight 100 (the v2 default)
/// give or take rounding: 1 + (shares - 2) * 9999 / 262142.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + (shares - 2) * 9999 / 262_142
}

/// A cgroup filesystem mount, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub mount_point: PathBuf,
    /// `true` for cgroup2 (the unified hierarchy).
    pub v2: bool,
    /// v1: the controllers attached to this hierarchy (from the super options, e.g.
    /// `cpu`, `cpuacct` when co-mounted). v2: empty (read `cgroup.controllers`).
    pub controllers: Vec<String>,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Super options of a v1 cgroup mount that are not controllers.
const V1_MOUNT_OPTIONS: &[&str] = &[
    "rw",
    "ro",
    "xattr",
    "noprefix",
    "clone_children",
    "cpuset_v2_mode",
    "favordynmods",
    "none",
];

/// The cgroup and cgroup2 mounts listed in a mountinfo text (see proc(5)): fields up to
/// ` - `, then the filesystem type, the source and the super options.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let ([_, _, _, _, mount_point, mount_opts, ..], [fs_type, _, super_opts, ..]) =
                (left.as_slice(), right.as_slice())
            else {
                return None;
            };
            let v2 = match *fs_type {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            let read_only = mount_opts.split(',').any(|o| o == "ro")
                || super_opts.split(',').any(|o| o == "ro");
            let controllers = if v2 {
                Vec::new()
            } else {
                super_opts
                    .split(',')
                    .filter(|o| !V1_MOUNT_OPTIONS.contains(o) && !o.contains('='))
                    .map(str::to_string)
                    .collect()
            };
            Some(CgroupMount {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                v2,
                controllers,
                read_only,
            })
        })
        .collect()
}

/// Mountinfo writes space, tab, newline and backslash in paths as `\040`-style octal.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let digits = bytes.get(i + 1..i + 4).filter(|_| byte == b'\\');
        // Three octal digits, at most 0o377 (a larger number is kept as it stands).
        let escaped = match digits {
            Some(&[d0, d1, d2]) if [d0, d1, d2].iter().all(|d| (b'0'..=b'7').contains(d)) => {
                let n = u16::from(d0 - b'0') * 64 + u16::from(d1 - b'0') * 8 + u16::from(d2 - b'0');
                u8::try_from(n).ok()
            }
            _ => None,
        };
        match escaped {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The state letter and process group of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may itself hold spaces and parentheses, so fields
/// are counted from the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<(char, i32)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Files and names a cgroup directory's child must not be called: the kernel's own
/// entries in a v1 or v2 cgroup that have no dot in their name.
const RESERVED: &[&str] = &["tasks", "notify_on_release", "release_agent"];

/// Prefixes of control file names (`cgroup.procs`, `memory.max`, `pids.events`...).
const CONTROL_PREFIXES: &[&str] = &[
    "cgroup",
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "pids",
    "freezer",
    "io",
    "blkio",
    "devices",
    "hugetlb",
    "rdma",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
];

/// Turns any id (task, executor, framework) into one safe cgroup directory name, one
/// to one: ASCII letters, digits, `-` and `_` stay, every other byte becomes `%XX`.
/// Escaping `.` keeps names clear of `.`, `..` and control files (`cgroup.procs`,
/// `memory.max`), which all hold a dot; the few dot-less control names get their first
/// letter escaped. An empty id becomes `%`, which no escaped id can be.
pub fn escape_component(id: &str) -> String {
    if id.is_empty() {
        return "%".to_string();
    }
    let mut out = String::with_capacity(id.len());
    for (i, b) in id.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if plain && !(i == 0 && RESERVED.contains(&id)) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a '/'-separated cgroup name would be refused or misread, if it would.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.starts_with('/') {
        return Err("names are relative to the cgroup root and cannot start with '/'");
    }
    for part in name.split('/') {
        if part.is_empty() {
            return Err("empty path component ('//' or trailing '/')");
        }
        if part.starts_with('.') {
            return Err("a path component starts with '.' ('.', '..' or a hidden name)");
        }
        let prefix = part.split_once('.').map(|(p, _)| p);
        if RESERVED.contains(&part) || prefix.is_some_and(|p| CONTROL_PREFIXES.contains(&p)) {
            return Err("a path component is the name of a cgroup control file");
        }
        if part.contains('\0') || part.contains('\n') {
            return Err("a path component holds a NUL or newline");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn flat_keyed_files() {
        let cpu_v1 =
            "nr_periods 40\nnr_throttled 19\nthrottled_time 912345\nnr_bursts 0\nburst_time 0\n";
        assert_eq!(keyed_value(cpu_v1, "nr_throttled"), Some(19));
        assert_eq!(keyed_value(cpu_v1, "nr_periods"), Some(40));
        assert_eq!(keyed_value(cpu_v1, "missing"), None);
        // A key that is a prefix of another must not match it.
        assert_eq!(
            keyed_value("nr_throttled_x 5\nnr_throttled 2\n", "nr_throttled"),
            Some(2)
        );
        assert_eq!(single_value("1048576\n"), Some(1048576));
        assert_eq!(single_value("max\n"), None);
    }

    #[test]
    fn cpuacct_stat_is_in_user_hz_ticks() {
        let (user, system) = cpuacct_stat_seconds("user 150\nsystem 25\n", 100);
        assert!((user - 1.5).abs() < 1e-9 && (system - 0.25).abs() < 1e-9);
        assert_eq!(cpuacct_stat_seconds("", 100), (0.0, 0.0));
    }

    #[test]
    fn v1_cpu_is_the_exact_total_split_by_ticks() {
        let (u, s) = v1_cpu_seconds("user 75\nsystem 25\n", 100, Some(2_000_000_000));
        assert!((u - 1.5).abs() < 1e-9 && (s - 0.5).abs() < 1e-9, "{u} {s}");
        assert_eq!(
            v1_cpu_seconds("user 0\nsystem 0\n", 100, Some(3_000_000)),
            (0.003, 0.0)
        );
        assert_eq!(
            v1_cpu_seconds("user 150\nsystem 50\n", 100, None),
            (1.5, 0.5)
        );
    }

    #[test]
    fn cpu_stat_v2_is_in_microseconds() {
        let text = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n\
                    core_sched.force_idle_usec 0\nnr_periods 20\nnr_throttled 9\n\
                    throttled_usec 450000\nnr_bursts 0\nburst_usec 0\n";
        assert_eq!(cpu_stat_v2_seconds(text), (2.0, 0.5));
        assert_eq!(keyed_value(text, "nr_throttled"), Some(9));
    }

    #[test]
    fn oom_evidence_v1() {
        let killed = "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n";
        assert_eq!(
            parse_oom_control(killed),
            OomControl {
                under_oom: false,
                oom_kill: Some(1)
            }
        );
        assert!(v1_oom_killed(killed, Some(0)));
        assert!(!v1_oom_killed(
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
            Some(12)
        ));
        // Before 4.13 there is no counter: under_oom with failures is the evidence.
        assert!(v1_oom_killed("oom_kill_disable 0\nunder_oom 1\n", Some(3)));
        assert!(!v1_oom_killed("oom_kill_disable 0\nunder_oom 0\n", Some(3)));
    }

    #[test]
    fn oom_and_pids_evidence_v2() {
        let events = "low 0\nhigh 0\nmax 31\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(v2_oom_kills(events), 1);
        assert_eq!(v2_oom_kills("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"), 0);
        assert_eq!(pids_max_events("max 17\n"), 17);
        assert_eq!(pids_max_events("max 0\n"), 0);
        assert_eq!(pids_max_events(""), 0);
    }

    #[test]
    fn pid_lists_and_freeze_state() {
        assert_eq!(parse_pids("12\n345\n\n"), vec![12, 345]);
        assert_eq!(parse_pids(""), Vec::<i32>::new());
        assert!(v2_frozen("populated 1\nfrozen 1\n"));
        assert!(!v2_frozen("populated 1\nfrozen 0\n"));
        assert_eq!(controller_list("cpuset cpu io memory pids\n").len(), 5);
        assert_eq!(controller_list("+cpu +memory"), vec!["cpu", "memory"]);
    }

    #[test]
    fn weights_follow_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(512), 20);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn mountinfo_hybrid_and_unified() {
        let text = "\
35 25 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
39 35 0:34 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
40 35 0:35 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
41 35 0:36 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
42 35 0:37 / /sys/fs/cgroup/pids ro,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
43 35 0:38 / /mnt/odd\\040dir rw,relatime - cgroup cgroup rw,freezer
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 6);
        assert!(mounts[0].v2 && mounts[0].mount_point == Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(mounts[1].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(
            mounts[3].controllers,
            Vec::<String>::new(),
            "name=systemd is no controller"
        );
        assert!(mounts[4].read_only);
        assert!(!mounts[2].read_only);
        assert_eq!(mounts[5].mount_point, PathBuf::from("/mnt/odd dir"));
    }

    #[test]
    fn proc_stat_with_awkward_names() {
        assert_eq!(
            parse_proc_stat("42 (sleep) S 1 42 42 0 -1"),
            Some(('S', 42))
        );
        assert_eq!(
            parse_proc_stat("43 (a) b (c)) Z 42 40 40 0"),
            Some(('Z', 40))
        );
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn escaping_is_safe_and_one_to_one() {
        assert_eq!(escape_component("task-1_a"), "task-1_a");
        assert_eq!(escape_component("a/b"), "a%2Fb");
        assert_eq!(escape_component("a_b"), "a_b");
        assert_eq!(escape_component(".."), "%2E%2E");
        assert_eq!(escape_component("cgroup.procs"), "cgroup%2Eprocs");
        assert_eq!(escape_component("tasks"), "%74asks");
        assert_eq!(escape_component("%74asks"), "%2574asks");
        assert_eq!(escape_component(""), "%");
        for id in [
            "..",
            "tasks",
            "cgroup.procs",
            "a/b",
            "",
            "x y",
            "memory.max",
            "é",
        ] {
            check_name(&escape_component(id)).unwrap_or_else(|e| panic!("{id:?}: {e}"));
        }
    }

    #[test]
    fn names_that_are_refused() {
        assert!(check_name("agora/fw/ex/t1").is_ok());
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "a/../b",
            ".hidden",
            "a/tasks",
            "a/cgroup.procs",
            "memory.max",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_v2_root_with_processes_blocks_controllers_unless_the_true_root() {
        let need = ["cpu", "memory", "pids"];
        // The true root: processes are allowed beside enabled controllers.
        assert_eq!(v2_root_blocks_controllers(false, "1\n7\n", "", &need), None);
        // A container's namespace root holding processes, nothing enabled.
        assert_eq!(
            v2_root_blocks_controllers(true, "1\n7\n", "", &need),
            Some(vec![1, 7])
        );
        // Some but not all enabled still blocks.
        assert_eq!(
            v2_root_blocks_controllers(true, "1\n", "cpu memory\n", &need),
            Some(vec![1])
        );
        // Already enabled (a threaded or delegated set-up that did it first), or empty.
        assert_eq!(
            v2_root_blocks_controllers(true, "1\n", "cpuset cpu memory pids\n", &need),
            None
        );
        assert_eq!(v2_root_blocks_controllers(true, "", "", &need), None);
    }
}
