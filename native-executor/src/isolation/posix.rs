//! Posix isolation, for machines where cgroups cannot be used (no root, no controllers
//! mounted, a read-only cgroupfs): each task gets a session and process group of its
//! own, so a kill reaches the processes it forked; memory is capped with RLIMIT_AS.
//!
//! What this cannot do, and says: no CPU limit; RLIMIT_AS caps address space, not
//! resident memory (a program that maps much and touches little can be refused early),
//! and it is per process, not per task; no pids limit (RLIMIT_NPROC counts every
//! process of the *user*, across tasks and the agent itself, and root ignores it);
//! a process that calls setsid or setpgid leaves the group and escapes the kill; usage
//! comes from the task's rusage when it is reaped (processes it did not wait for are
//! not counted).

use std::fs;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::cgroup::poll_until;
use super::cgroupfs;
use super::CgroupLimits;
use crate::error::{Error, Result};

/// How long the SIGKILL phase may take before giving up.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct PosixGroup {
    name: String,
    limits: Mutex<CgroupLimits>,
    /// Process groups of the processes started in this group (each child calls
    /// setsid, so its pid is its process group).
    pgids: Mutex<Vec<i32>>,
}

impl PosixGroup {
    pub(crate) fn new(name: &str, limits: &CgroupLimits) -> PosixGroup {
        PosixGroup {
            name: name.to_string(),
            limits: Mutex::new(*limits),
            pgids: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn limits(&self) -> CgroupLimits {
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// New limits apply to processes started from now on (rlimits are set at exec).
    pub(crate) fn update(&self, limits: &CgroupLimits) {
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner) = *limits;
    }

    /// Records a process (a session leader started by `contain`) as a member.
    pub(crate) fn add_pid(&self, pid: u32) {
        let mut pgids = self.pgids.lock().unwrap_or_else(PoisonError::into_inner);
        if !pgids.contains(&(pid as i32)) {
            pgids.push(pid as i32);
        }
    }

    fn pgids(&self) -> Vec<i32> {
        self.pgids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Live (not zombie) processes in the group's process groups.
    pub(crate) fn procs(&self) -> Vec<i32> {
        let pgids = self.pgids();
        if pgids.is_empty() {
            return Vec::new();
        }
        live_members(&pgids)
    }

    /// SIGTERM to every process group, up to `grace` for them to go, then SIGKILL
    /// until none is left (bounded).
    pub(crate) fn kill_all(&self, grace: Duration) -> Result<()> {
        let pgids = self.pgids();
        if pgids.is_empty() || live_members(&pgids).is_empty() {
            return Ok(());
        }
        let signal = |sig| {
            for &pg in &pgids {
                // SAFETY: killpg has no memory-safety preconditions.
                unsafe { libc::killpg(pg, sig) };
            }
        };
        if !grace.is_zero() {
            signal(libc::SIGTERM);
            if poll_until(grace, || live_members(&pgids).is_empty()) {
                return Ok(());
            }
        }
        let start = Instant::now();
        let gone = poll_until(KILL_TIMEOUT, || {
            signal(libc::SIGKILL);
            live_members(&pgids).is_empty()
        });
        if gone {
            Ok(())
        } else {
            Err(Error::KillTimedOut {
                what: format!("process groups {pgids:?}"),
                pids: live_members(&pgids),
                waited_ms: start.elapsed().as_millis(),
            })
        }
    }
}

/// Processes in /proc whose process group is one of `pgids` and that are not zombies
/// (a zombie is dead; it only waits for its parent to reap it).
pub(crate) fn live_members(pgids: &[i32]) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| cgroupfs::parse_proc_stat(&s))
                .is_some_and(|(state, pgrp)| !matches!(state, 'Z' | 'X') && pgids.contains(&pgrp))
        })
        .collect()
}
