//! Masters of a replicated group run as child processes of this one: what
//! `agora dev --masters N` and `agora bench failover` start, so that any master can
//! be killed on its own while the group goes on.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agora_net::tls::{self, Identity};
use agora_proto::v1::LeaderInfo;
use anyhow::Context;

/// Where one master of the group listens.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MasterAddrs {
    pub quic: SocketAddr,
    pub http: SocketAddr,
}

/// One master process.
pub struct MasterProc {
    pub id: u64,
    pub addrs: MasterAddrs,
    child: Option<Child>,
    pub log: PathBuf,
}

impl MasterProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// The group's master processes and what they were started with.
pub struct MasterGroup {
    data_dir: PathBuf,
    certs: PathBuf,
    /// Flags every master gets (timeouts and the like).
    extra: Vec<String>,
    pub masters: Vec<MasterProc>,
}

impl MasterGroup {
    /// Starts one `agora master` per address (ids from 1) with its data in
    /// `data_dir/master-ID` and its log in `data_dir/master-ID.log`.
    pub fn spawn(
        data_dir: &Path,
        certs: &Path,
        addrs: &[MasterAddrs],
        extra: Vec<String>,
    ) -> anyhow::Result<MasterGroup> {
        let mut g = MasterGroup {
            data_dir: data_dir.to_path_buf(),
            certs: certs.to_path_buf(),
            extra,
            masters: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| MasterProc {
                    id: i as u64 + 1,
                    addrs: *a,
                    child: None,
                    log: data_dir.join(format!("master-{}.log", i + 1)),
                })
                .collect(),
        };
        for id in 1..=addrs.len() as u64 {
            g.start(id)?;
        }
        Ok(g)
    }

    fn peers(&self) -> String {
        self.masters
            .iter()
            .map(|m| format!("{}={}", m.id, m.addrs.quic))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn quic_addrs(&self) -> Vec<SocketAddr> {
        self.masters.iter().map(|m| m.addrs.quic).collect()
    }

    fn get(&mut self, id: u64) -> anyhow::Result<&mut MasterProc> {
        self.masters
            .iter_mut()
            .find(|m| m.id == id)
            .ok_or_else(|| anyhow::anyhow!("there is no master {id} in this group"))
    }

    /// Starts master `id` (again, after [`MasterGroup::kill`]).
    pub fn start(&mut self, id: u64) -> anyhow::Result<()> {
        let peers = self.peers();
        let exe = std::env::current_exe().context("cannot find the agora binary")?;
        let data = self.data_dir.join(format!("master-{id}"));
        let certs = self.certs.clone();
        let extra = self.extra.clone();
        let m = self.get(id)?;
        if m.child.is_some() {
            anyhow::bail!("master {id} runs already");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("cannot open {}", m.log.display()))?;
        let mut cmd = Command::new(exe);
        cmd.args(["master", "--id", &id.to_string(), "--peers", &peers])
            .args(["--listen", &m.addrs.quic.to_string()])
            .args(["--http", &m.addrs.http.to_string()])
            .arg("--certs")
            .arg(&certs)
            .arg("--data-dir")
            .arg(&data)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it only sets a flag of the child.
        unsafe {
            cmd.pre_exec(|| {
                // A master outlives nothing of ours: when this process dies (even by
                // kill -9) the kernel kills it too, so its ports are free again.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start master {id}"))?;
        m.child = Some(child);
        Ok(())
    }

    /// kill -9 of master `id`; returns once it is gone.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let m = self.get(id)?;
        if let Some(mut c) = m.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
        Ok(())
    }

    /// A master that has exited on its own, with the end of its log.
    pub fn exited(&mut self) -> Option<String> {
        self.exited_id().map(|(_, why)| why)
    }

    /// A master that has exited on its own: its id, and what it said last.
    pub fn exited_id(&mut self) -> Option<(u64, String)> {
        for m in &mut self.masters {
            if let Some(c) = m.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    m.child = None;
                    return Some((
                        m.id,
                        format!(
                            "master {} exited ({status}); the end of {}:\n{}",
                            m.id,
                            m.log.display(),
                            log_tail(&m.log, 15)
                        ),
                    ));
                }
            }
        }
        None
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.masters.iter().find(|m| m.id == id)?.pid()
    }

    /// Asks every running master who leads; the leader's id when one says it leads.
    pub async fn leader(&self, endpoint: &quinn::Endpoint) -> Option<u64> {
        let asks = self
            .masters
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| query(endpoint, m.addrs.quic));
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .find(|i| i.leading)
            .map(|i| i.id)
    }

    /// SIGTERM to every master, then kill -9 of those still there after 5 s.
    pub async fn stop(mut self) {
        for m in &self.masters {
            if let Some(pid) = m.pid() {
                // SAFETY: a plain kill(2) of our own child.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for m in &mut self.masters {
            if let Some(mut c) = m.child.take() {
                while tokio::time::Instant::now() < deadline {
                    if !matches!(c.try_wait(), Ok(None)) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await; // poll its exit
                }
                c.kill().ok();
                c.wait().ok();
            }
        }
    }
}

impl Drop for MasterGroup {
    fn drop(&mut self) {
        for m in &mut self.masters {
            if let Some(mut c) = m.child.take() {
                c.kill().ok();
                c.wait().ok();
            }
        }
    }
}

/// One master's answer to who leads, within a second.
pub async fn query(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Option<LeaderInfo> {
    agora_net::leader::ask(endpoint, addr, Duration::from_secs(1))
        .await
        .ok()
}

/// A client endpoint for asking the masters who leads.
pub fn probe_endpoint(id: &Identity) -> anyhow::Result<quinn::Endpoint> {
    Ok(tls::client_endpoint(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        id,
    )?)
}

/// The last `n` lines of a log file (or why it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(t) => {
            let lines: Vec<&str> = t.lines().collect();
            let from = lines.len().saturating_sub(n);
            lines.get(from..).unwrap_or_default().join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}
