//! Helpers shared by the end-to-end tests: real processes, real cgroups (when the
//! machine allows, else the test says why it skips), unique cgroup roots per test, and
//! a marker in every task's environment so a test can prove none of its processes
//! survived.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use agora_native_executor::{
    CgroupVersion, IsolationMode, Isolator, KillSwitch, NativeConfig, Runner,
};
use agora_proto::v1::{CommandInfo, ExecutorLaunch, ExecutorStatus, Reason, TaskState};

/// Bound on every wait.
pub const WAIT: Duration = Duration::from_secs(60);

/// A cgroup root name no other test (or test process) uses.
pub fn unique_root(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "agora-test-{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cgroup version the tests will use, or why cgroup tests cannot run here.
pub fn cgroups_version() -> Result<CgroupVersion, String> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    match Isolator::new(Some(IsolationMode::Cgroups), "agora-test-probe") {
        Ok(iso) => Ok(iso
            .cgroup_version()
            .expect("a cgroups isolator has a version")),
        Err(e) => Err(e.to_string()),
    }
}

/// The version `AGORA_REQUIRE_CGROUP` (`v1` or `v2`) demands, if any: set by
/// `scripts/cgroup2-vm.sh` in its cgroup v2 guest, so that a test that would skip, or
/// would take the v1 paths, fails instead.
pub fn required_cgroup_version() -> Option<CgroupVersion> {
    match std::env::var("AGORA_REQUIRE_CGROUP").ok()?.as_str() {
        "v1" => Some(CgroupVersion::V1),
        "v2" => Some(CgroupVersion::V2),
        other => panic!("AGORA_REQUIRE_CGROUP is v1 or v2, not {other:?}"),
    }
}

/// Whether the calling test runs on cgroups, printing the version it uses ("cgroup
/// v2: TEST"), or why it skips. Panics where `AGORA_REQUIRE_CGROUP` asks for another
/// version or cgroups are unusable.
pub fn use_cgroups(test: &str) -> bool {
    let required = required_cgroup_version();
    match cgroups_version() {
        Ok(v) => {
            if let Some(r) = required {
                assert_eq!(
                    v, r,
                    "{test}: AGORA_REQUIRE_CGROUP asks for another version"
                );
            }
            let n = match v {
                CgroupVersion::V1 => 1,
                CgroupVersion::V2 => 2,
            };
            println!("cgroup v{n}: {test}");
            true
        }
        Err(why) => {
            assert!(
                required.is_none(),
                "{test}: AGORA_REQUIRE_CGROUP is set but cgroups are unusable: {why}"
            );
            eprintln!("SKIPPED {test}: needs root and usable cgroups: {why}");
            false
        }
    }
}

/// Skips the calling test (returning from it) when cgroups are unusable, saying why;
/// prints the cgroup version it runs on otherwise.
#[macro_export]
macro_rules! require_cgroups {
    ($test:expr) => {
        if !common::use_cgroups($test) {
            return;
        }
    };
}

/// Removes everything under a test's cgroup root when dropped, whatever the test did.
pub struct CleanupRoot(pub String);

impl Drop for CleanupRoot {
    fn drop(&mut self) {
        if let Ok(iso) = Isolator::new(Some(IsolationMode::Cgroups), &self.0) {
            if let Err(e) = iso.cleanup_leftovers() {
                eprintln!("cleanup of {} failed: {e}", self.0);
            }
        }
    }
}

/// Every v1/v2 directory a cgroup named `name` could have (for "it is gone" checks).
pub fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| Path::new(mp).join(name))
        .collect()
}

pub fn any_cgroup_dir_exists(name: &str) -> bool {
    cgroup_dirs(name).iter().any(|d| d.exists())
}

/// Live processes (not zombies) whose environment holds `AGORA_TEST_MARKER=<marker>`.
pub fn marked_processes(marker: &str) -> Vec<i32> {
    let needle = format!("AGORA_TEST_MARKER={marker}");
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|s| s == "Z" || s == "X");
        if zombie {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// A unique marker for one task's processes.
pub fn marker(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A launch of `sh -c <script>` with its sandbox in `dir`, marked with `marker`.
pub fn shell_launch(task_id: &str, dir: &Path, script: &str, marker: &str) -> ExecutorLaunch {
    launch(
        task_id,
        dir,
        CommandInfo {
            shell: true,
            value: script.to_string(),
            ..Default::default()
        },
        marker,
    )
}

pub fn launch(task_id: &str, dir: &Path, command: CommandInfo, marker: &str) -> ExecutorLaunch {
    let sandbox = dir.join(task_id);
    ExecutorLaunch {
        task_id: task_id.to_string(),
        root_dir: sandbox.display().to_string(),
        stdout_path: sandbox.join("stdout").display().to_string(),
        stderr_path: sandbox.join("stderr").display().to_string(),
        env: HashMap::from([("AGORA_TEST_MARKER".to_string(), marker.to_string())]),
        command: Some(command),
        ..Default::default()
    }
}

/// The executor's defaults: tasks run as `nobody` (when the test runs as root).
pub fn config(mode: IsolationMode, root: &str) -> NativeConfig {
    NativeConfig {
        isolation: Some(mode),
        cgroup_root: root.to_string(),
        pids_max: 1024,
        cfs_quota: true,
        ..NativeConfig::default()
    }
}

/// A temporary directory for sandboxes that tasks running as `nobody` can reach
/// (a fresh temporary directory is 0700).
pub fn task_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    d
}

/// A task running on a thread of its own, as the executor runs it.
pub struct Running {
    pub kill: Arc<KillSwitch>,
    started: mpsc::Receiver<()>,
    done: mpsc::Receiver<ExecutorStatus>,
}

impl Running {
    pub fn start(runner: &Arc<Runner>, launch: ExecutorLaunch) -> Running {
        let kill = Arc::new(KillSwitch::new().expect("eventfd"));
        let (started_tx, started) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let (r, k) = (Arc::clone(runner), Arc::clone(&kill));
        std::thread::spawn(move || {
            let status = r.run(&launch, &k, || {
                let _ = started_tx.send(());
            });
            let _ = done_tx.send(status);
        });
        Running {
            kill,
            started,
            done,
        }
    }

    /// Waits for RUNNING; false when the task ended without starting.
    pub fn wait_started(&self) -> bool {
        self.started.recv_timeout(WAIT).is_ok()
    }

    pub fn wait(self) -> ExecutorStatus {
        self.done
            .recv_timeout(WAIT)
            .expect("the task ends within the bound")
    }
}

/// Runs a task to its end.
pub fn run(runner: &Arc<Runner>, launch: ExecutorLaunch) -> ExecutorStatus {
    Running::start(runner, launch).wait()
}

pub fn summary(s: &ExecutorStatus) -> (TaskState, Reason, Option<i32>) {
    (s.state(), s.reason(), s.exit_code)
}
