//! Operator commands: `agora ps`, `agora logs`, `agora kill`, `agora agents`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use agora_proto::resources::{format_bytes, format_cpus};
use agora_proto::v1::{self, Reason, TaskState};
use agora_proto::Resources;
use agora_sdk::{Client, ClientConfig};
use clap::Args;
use futures_util::future::join_all;
use tokio::io::AsyncWriteExt;

use crate::Target;

#[derive(Args)]
pub struct PsArgs {
    #[command(flatten)]
    target: Target,
    /// Include finished tasks.
    #[arg(long, short)]
    all: bool,
    /// Show resource usage: cpu seconds (user+system), CFS periods throttled, peak
    /// memory (native tasks: the cgroup's; wasm tasks: linear memory) and fuel used.
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
pub struct LogsArgs {
    #[command(flatten)]
    target: Target,
    task: String,
    /// Print stderr instead of stdout.
    #[arg(long)]
    stderr: bool,
    /// Keep printing new output until the task ends.
    #[arg(long, short)]
    follow: bool,
}

#[derive(Args)]
pub struct KillArgs {
    #[command(flatten)]
    target: Target,
    task: String,
}

pub async fn connect(t: &Target) -> anyhow::Result<Client> {
    let cfg = ClientConfig::discover(t.master.as_deref(), t.config.as_deref())?;
    Ok(Client::connect(&cfg).await?)
}

fn age(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let s = agora_net::unix_millis().saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

pub async fn ps(a: PsArgs) -> anyhow::Result<ExitCode> {
    let client = connect(&a.target).await?;
    let tasks = if a.stats {
        client.list_tasks_with_usage(a.all).await?
    } else {
        client.list_tasks(a.all).await?
    };
    if a.stats {
        let mut table = plain_table(
            &[
                "TASK",
                "NAME",
                "STATE",
                "CPU(s)",
                "THROTTLED",
                "MEM PEAK",
                "DISK",
                "FUEL",
            ],
            &[3, 4, 5, 6, 7],
        );
        for t in tasks {
            let pending = t.state == TaskState::Unspecified as i32;
            let state = if pending {
                "PENDING"
            } else {
                t.state().short_name()
            };
            // Nothing measured (a wasm task that wrote no file) shows as nothing known.
            let disk = match &t.usage {
                Some(u) if u.disk_used_bytes > 0 || u.disk_files > 0 => {
                    format_bytes(u.disk_used_bytes.min(i64::MAX as u64) as i64)
                }
                _ => "-".into(),
            };
            let (cpu, thr, peak, fuel) = match &t.usage {
                Some(u) => (
                    format!("{:.2}", u.cpu_user_seconds + u.cpu_system_seconds),
                    u.cpu_throttled_periods.to_string(),
                    format_bytes(u.mem_peak_bytes.max(u.wasm_peak_memory_bytes) as i64),
                    if u.fuel_used > 0 {
                        u.fuel_used.to_string()
                    } else {
                        "-".into()
                    },
                ),
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            table.add_row(vec![
                t.task_id.clone(),
                truncate(&t.name, 24),
                state.to_string(),
                cpu,
                thr,
                peak,
                disk,
                fuel,
            ]);
        }
        print_table(&table);
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = plain_table(
        &[
            "TASK",
            "NAME",
            "STATE",
            "AGE",
            "RESOURCES",
            "AGENT",
            "DETAIL",
        ],
        &[],
    );
    for t in tasks {
        let pending = t.state == TaskState::Unspecified as i32;
        let state = if pending {
            "PENDING"
        } else {
            t.state().short_name()
        };
        let res = Resources::from_proto(&t.resources)
            .map(|r| r.to_string())
            .unwrap_or_default();
        let detail = if pending {
            format!("waiting: {}", t.waiting_for)
        } else {
            let mut d = String::new();
            if t.reason() != Reason::Unspecified {
                d.push_str(t.reason().short_name());
            }
            if !t.message.is_empty() {
                if !d.is_empty() {
                    d.push_str(": ");
                }
                d.push_str(&t.message);
            }
            d
        };
        table.add_row(vec![
            t.task_id.clone(),
            truncate(&t.name, 24),
            state.to_string(),
            age(t.updated_ms),
            res,
            if t.agent_id.is_empty() {
                "-".to_string()
            } else {
                t.agent_id.clone()
            },
            detail,
        ]);
    }
    print_table(&table);
    Ok(ExitCode::SUCCESS)
}

/// A table for a terminal or a pipe: columns as wide as their widest cell, one
/// space between them, no borders, no wrapping (long cells stay on their line).
/// `right`: the columns aligned right (numbers).
pub(crate) fn plain_table(header: &[&str], right: &[usize]) -> comfy_table::Table {
    use comfy_table::{CellAlignment, ContentArrangement, Table};
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, 1));
        if right.contains(&i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// Prints a [`plain_table`] without the padding at the ends of its lines.
pub(crate) fn print_table(t: &comfy_table::Table) {
    for line in t.lines() {
        println!("{}", line.trim_end());
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

pub async fn logs(a: LogsArgs) -> anyhow::Result<ExitCode> {
    let client = connect(&a.target).await?;
    let path = if a.stderr { "stderr" } else { "stdout" };
    let mut off = 0u64;
    loop {
        let (data, size) = client.read_file(&a.task, path, off, 1 << 20).await?;
        if !data.is_empty() {
            off += data.len() as u64;
            let mut out = tokio::io::stdout();
            out.write_all(&data).await?;
            out.flush().await?;
            if off < size {
                continue;
            }
        }
        if !a.follow {
            return Ok(ExitCode::SUCCESS);
        }
        let live = client
            .list_tasks(false)
            .await?
            .iter()
            .any(|t| t.task_id == a.task);
        if !live {
            // One last read: the task may have written just before it ended.
            let (data, _) = client.read_file(&a.task, path, off, 1 << 20).await?;
            tokio::io::stdout().write_all(&data).await?;
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(250)).await; // poll interval for --follow
    }
}

pub async fn kill(a: KillArgs) -> anyhow::Result<ExitCode> {
    let client = connect(&a.target).await?;
    client.kill(&a.task).await?;
    eprintln!("kill sent to task {}", a.task);
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Subcommand)]
pub enum MastersCmd {
    /// Add a master to the group: start it first (`agora master --id ID --peers
    /// ...` with a list that names it, and an empty data dir), then run this. It
    /// joins as a learner, and votes once it has caught up with the log.
    Add {
        /// The new master, as ID=HOST:PORT (its QUIC address).
        member: String,
    },
    /// Remove a master from the group (a dead one, or one to be replaced: remove
    /// it before its disk is wiped, then add it again).
    Remove {
        /// The master's id.
        id: u64,
    },
}

/// Asks every master of the client configuration (and every member the leader
/// names) who leads: each answers for itself, leader or not, so this works while
/// no master leads. With a subcommand, changes the group through its leader.
pub async fn masters(cmd: Option<MastersCmd>, t: crate::Target) -> anyhow::Result<ExitCode> {
    use agora_net::tls;
    let cfg = ClientConfig::discover(t.master.as_deref(), t.config.as_deref())?;
    if let Some(cmd) = cmd {
        let change = match cmd {
            MastersCmd::Add { member } => {
                let (id, quic) = member.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("`{member}` is not ID=HOST:PORT (e.g. 4=d:7400)")
                })?;
                let id: u64 = id.trim().parse().ok().filter(|i| *i > 0).ok_or_else(|| {
                    anyhow::anyhow!("`{id}` in `{member}` is not an id (a number from 1)")
                })?;
                tls::resolve(quic).map_err(|e| anyhow::anyhow!("{member}: {e}"))?;
                v1::MastersChange {
                    add_id: id,
                    add_quic: quic.trim().to_string(),
                    remove_id: 0,
                }
            }
            MastersCmd::Remove { id } => v1::MastersChange {
                remove_id: id,
                ..Default::default()
            },
        };
        let r = crate::fns::operator(&cfg, v1::operator_request::Request::MastersChange(change))
            .await?;
        println!("{}", r.done);
        return Ok(ExitCode::SUCCESS);
    }
    let mut addrs = cfg.master_addrs()?;
    let id = agora_net::tls::Identity::load(&cfg.ca, &cfg.cert, &cfg.key)?;
    let ask = |addr: SocketAddr| {
        let id = id.clone();
        async move {
            let r = async {
                let endpoint = tls::client_endpoint(addr, &id)?;
                agora_net::leader::ask(&endpoint, addr, Duration::from_secs(3)).await
            }
            .await;
            (addr, r)
        }
    };
    let mut answers = join_all(addrs.iter().map(|a| ask(*a))).await;
    // Members the configuration does not name (added later) are asked too.
    let more: Vec<SocketAddr> = answers
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().filter(|i| i.leading))
        .flat_map(|i| i.members.clone())
        .filter_map(|m| tls::resolve(m.split_once('=')?.1).ok())
        .filter(|a| !addrs.contains(a))
        .collect();
    addrs.extend(&more);
    answers.extend(join_all(more.into_iter().map(ask)).await);
    let voters: Vec<u64> = answers
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().filter(|i| i.leading))
        .flat_map(|i| i.voters.clone())
        .collect();
    let leader_log = answers.iter().find_map(|(_, r)| {
        r.as_ref()
            .ok()
            .filter(|i| i.leading)
            .map(|i| i.last_log_index)
    });
    println!(
        "{:<4} {:<22} {:<22} {:<9} {:>6} {:>9} {:>9} {:>6}",
        "ID", "ADDRESS", "HTTP", "ROLE", "TERM", "LAST-LOG", "APPLIED", "LAG"
    );
    let mut members = Vec::new();
    for (addr, r) in &answers {
        match r {
            Ok(i) => {
                let role = if i.leading {
                    "leader"
                } else if i.term == 0 && i.leader_id == 0 {
                    "new"
                } else if !voters.is_empty() && !voters.contains(&i.id) {
                    "learner"
                } else {
                    "follower"
                };
                let lag = leader_log
                    .map(|l| l.saturating_sub(i.last_log_index).to_string())
                    .unwrap_or_else(|| "-".into());
                let http = if i.http.is_empty() { "-" } else { &i.http };
                println!(
                    "{:<4} {:<22} {:<22} {:<9} {:>6} {:>9} {:>9} {:>6}",
                    i.id, addr, http, role, i.term, i.last_log_index, i.last_applied, lag
                );
                if i.leading {
                    members = i.members.clone();
                }
            }
            Err(e) => println!("{:<4} {:<22} unreachable: {e}", "?", addr),
        }
    }
    if !members.is_empty() {
        println!("group: {}", members.join(","));
    }
    if leader_log.is_none() {
        eprintln!(
            "agora masters: no master leads: the cluster makes no offers and launches nothing until a majority of the masters can reach each other (running tasks keep running)"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn agents(t: crate::Target) -> anyhow::Result<ExitCode> {
    let client = connect(&t).await?;
    let mut table = plain_table(
        &[
            "AGENT",
            "HOST",
            "STATE",
            "CPUS (used/total)",
            "MEM (used/total)",
            "DISK (used/total)",
            "RESERVED (free)",
            "ATTRIBUTES",
        ],
        &[],
    );
    for a in client.agents().await? {
        let state = if a.unreachable {
            "unreachable".to_string()
        } else if a.connected {
            "connected".to_string()
        } else {
            format!("down {}s", a.disconnected_ms / 1000)
        };
        if a.unreachable {
            table.add_row(vec![a.agent_id, a.hostname, state]);
            continue;
        }
        let total = Resources::from_proto(&a.total).unwrap_or_default();
        let used = Resources::from_proto(&a.allocated).unwrap_or_default();
        let reserved = Resources::from_proto(&a.reserved).unwrap_or_default();
        let reserved_free = Resources::from_proto(&a.reserved_free).unwrap_or_default();
        let attrs: Vec<String> = a
            .attributes
            .iter()
            .map(|x| format!("{}:{}", x.name, x.value))
            .collect();
        table.add_row(vec![
            a.agent_id,
            a.hostname,
            state,
            format!(
                "{}/{}",
                format_cpus(used.milli_cpus()),
                format_cpus(total.milli_cpus())
            ),
            format!(
                "{}/{}",
                format_bytes(used.mem_bytes()),
                format_bytes(total.mem_bytes())
            ),
            format!(
                "{}/{}",
                format_bytes(used.disk_bytes()),
                format_bytes(total.disk_bytes())
            ),
            if reserved.is_empty() {
                "-".to_string()
            } else if reserved_free.is_empty() {
                format!("{reserved} (none)")
            } else {
                format!("{reserved} ({reserved_free})")
            },
            attrs.join(";"),
        ]);
    }
    print_table(&table);
    Ok(ExitCode::SUCCESS)
}

/// `agora agent gone ID`: asks for confirmation (the agent id typed again) unless
/// `yes`, then marks the agent gone.
pub async fn agent_gone(agent_id: &str, yes: bool, t: Target) -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, IsTerminal, Write};
    let client = connect(&t).await?;
    let agents = client.agents().await?;
    let Some(agent) = agents.iter().find(|a| a.agent_id == agent_id) else {
        anyhow::bail!("no agent with id {agent_id} (`agora agents` lists them)");
    };
    if agent.connected {
        anyhow::bail!(
            "agent {agent_id} is connected: stop it first (`agora agent --drain-on-stop` ends its tasks with it), then mark it gone"
        );
    }
    let tasks = client
        .list_tasks(false)
        .await?
        .into_iter()
        .filter(|t| t.agent_id == agent_id)
        .count();
    if !yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "marking agent {agent_id} gone ends its {tasks} tasks as GONE and cannot be undone; pass --yes to confirm"
            );
        }
        eprint!(
            "Agent {agent_id} ({}) will never be taken back, and its {tasks} tasks end GONE.\nType the agent id to confirm: ",
            agent.hostname
        );
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != agent_id {
            eprintln!("not confirmed; nothing changed");
            return Ok(ExitCode::FAILURE);
        }
    }
    client.mark_agent_gone(agent_id).await?;
    println!("agent {agent_id} marked gone; {tasks} tasks reported GONE");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_table_widens_columns_to_their_longest_cell_and_has_no_border() {
        let mut t = plain_table(&["TASK", "STATE", "CPU(s)"], &[2]);
        t.add_row(vec!["t1", "UNREACHABLE", "0.25"]);
        t.add_row(vec!["t2", "RUNNING", "12.50"]);
        let lines: Vec<String> = t.lines().map(|l| l.trim_end().to_string()).collect();
        assert_eq!(
            lines,
            vec![
                "TASK STATE       CPU(s)",
                "t1   UNREACHABLE   0.25",
                "t2   RUNNING      12.50",
            ]
        );
    }
}
