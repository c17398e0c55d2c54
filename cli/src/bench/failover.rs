//! `agora bench failover`: a group of masters (each its own process) and one agent;
//! a framework keeps short wasm tasks in flight while the leader is killed with
//! `kill -9`, again and again. For each kill: the time to the first offer the
//! framework gets from the new leader, and to the first task launched after the
//! kill reporting RUNNING; beside them, measured in the same run, a task's launch
//! time when no master dies (accept to RUNNING) and the framework's registry write
//! (a quorum commit) latency.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agora_net::tls::{self, Identity, Role};
use agora_proto::v1::{TaskState, WasmModule};
use agora_proto::Resources;
use agora_sdk::{Client, Event, FrameworkInfo, Scheduler, TaskInfo};
use clap::Args;

use crate::devgroup::{MasterAddrs, MasterGroup};

#[derive(Args)]
pub struct FailoverArgs {
    /// How many times the leader is killed.
    #[arg(short, default_value_t = 5)]
    n: usize,
    /// Masters in the group (3 or 5).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=9))]
    masters: u64,
    /// Tasks the framework keeps in flight.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
}

/// Tasks finished between two kills (the group settles, the killed master is back).
const SETTLE_TASKS: usize = 40;
/// The longest a kill may take to be over (a new leader offering, a task running).
const ROUND_LIMIT: Duration = Duration::from_secs(60);

fn free_port(udp: bool) -> anyhow::Result<SocketAddr> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    Ok(if udp {
        std::net::UdpSocket::bind(any)?.local_addr()?
    } else {
        std::net::TcpListener::bind(any)?.local_addr()?
    })
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn stats(v: &[Duration]) -> String {
    let mut s = v.to_vec();
    s.sort();
    match (s.first(), s.get(s.len() / 2), s.last()) {
        (Some(min), Some(median), Some(max)) => format!(
            "min {}  median {}  max {}",
            secs(*min),
            secs(*median),
            secs(*max)
        ),
        _ => "-".into(),
    }
}

enum Phase {
    /// Tasks run; the next kill comes once `done` reaches the target.
    Steady { until: usize },
    /// The leader was killed at `at`.
    Killed {
        id: u64,
        at: Instant,
        /// The framework has subscribed again (with the new leader): offers from
        /// now on are the new leader's, not ones the old one sent before it died.
        reconnected: bool,
        offer: Option<Duration>,
        running: Option<Duration>,
    },
    /// The killed master runs again; waiting for it to follow the new leader.
    Rejoin { id: u64, since: Instant },
}

struct Load {
    module: WasmModule,
    next: usize,
    /// Task id -> when it was accepted, and whether after the last kill.
    flying: HashMap<String, (Instant, bool)>,
    ended: BTreeSet<String>,
    launched: usize,
    failed: usize,
    /// Launches lost with a killed leader (never started; the master says so).
    dropped: usize,
    steady_us: Vec<u64>,
}

pub async fn bench_failover(a: FailoverArgs) -> anyhow::Result<ExitCode> {
    if a.n == 0 {
        anyhow::bail!("-n 0: nothing to measure; give the number of kills (e.g. -n 5)");
    }
    let dir = tempfile::tempdir()?;
    let cd = tls::init_cert_dir(&dir.path().join("certs"), &[])?;
    let addrs = (0..a.masters)
        .map(|_| {
            Ok(MasterAddrs {
                quic: free_port(true)?,
                http: free_port(false)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut group = MasterGroup::spawn(dir.path(), &cd.dir, &addrs, Vec::new())?;
    let agent = crate::cluster::start_agent(
        group.quic_addrs(),
        Identity::from_cert_dir(&cd, Role::Agent)?,
        &dir.path().join("agent"),
        crate::cluster::detect_resources(),
        Vec::new(),
        "localhost".into(),
        agora_agent::server::IsolationSettings::default(),
        60_000,
        None,
        agora_agent::server::IdentityPolicy::Keep,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.agent_id().is_none() {
        if let Some(why) = group.exited() {
            agent.drain().await;
            anyhow::bail!("the masters did not start: {why}");
        }
        if Instant::now() > deadline {
            agent.drain().await;
            anyhow::bail!("no leader the agent could register with within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll for readiness
    }
    let result = run(&a, &mut group, &cd, &addrs).await;
    agent.drain().await;
    group.stop().await;
    result
}

/// The QUIC address of master `id` (the group numbers them from 1).
fn quic_of(addrs: &[MasterAddrs], id: u64) -> anyhow::Result<SocketAddr> {
    let at = usize::try_from(id).ok().and_then(|id| id.checked_sub(1));
    at.and_then(|at| addrs.get(at))
        .map(|m| m.quic)
        .ok_or_else(|| anyhow::anyhow!("the group has no master {id}"))
}

async fn run(
    a: &FailoverArgs,
    group: &mut MasterGroup,
    cd: &tls::CertDir,
    addrs: &[MasterAddrs],
) -> anyhow::Result<ExitCode> {
    let mut cfg = crate::cluster::client_config(cd, &quic_of(addrs, 1)?.to_string());
    cfg.masters = addrs.iter().map(|m| m.quic.to_string()).collect();
    let probe = crate::devgroup::probe_endpoint(&Identity::from_cert_dir(cd, Role::Client)?)?;
    let client = Client::connect(&cfg).await?;
    let (sha256, size) = client.upload_bytes(crate::bench::NOOP_WASM).await?;
    let mut sched = client
        .subscribe(FrameworkInfo {
            name: "agora-bench-failover".into(),
            roles: vec!["*".into()],
            ..Default::default()
        })
        .await?;

    // A registry write as a framework sees it: committed by a quorum, then applied.
    let writer = sched.state_writer();
    let mut write_us = Vec::new();
    for i in 0..100 {
        let t = Instant::now();
        writer.put("bench", format!("{i}").into_bytes()).await?;
        write_us.push(t.elapsed().as_micros() as u64);
    }
    write_us.sort_unstable();

    let mut load = Load {
        module: WasmModule {
            sha256,
            size,
            fuel: 0,
            timeout_ms: 10_000,
        },
        next: 0,
        flying: HashMap::new(),
        ended: BTreeSet::new(),
        launched: 0,
        failed: 0,
        dropped: 0,
        steady_us: Vec::new(),
    };
    let mut phase = Phase::Steady {
        until: SETTLE_TASKS,
    };
    let mut rounds: Vec<(u64, Duration, Duration)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    println!(
        "failover benchmark: {} masters (each its own process), one agent, a framework keeping {} wasm tasks in flight; kill -9 of the leader {} times",
        a.masters, a.in_flight, a.n
    );
    println!(
        "  raft: heartbeat {} ms, election timeout {}-{} ms, pre-vote on",
        agora_master::raft::group::HEARTBEAT_MS,
        agora_master::raft::group::ELECTION_MIN_MS,
        agora_master::raft::group::ELECTION_MAX_MS
    );
    let mut round_start = Instant::now();
    while rounds.len() < a.n {
        tokio::select! {
            ev = sched.next_event() => {
                let ev = ev.ok_or_else(|| anyhow::anyhow!("the scheduler stopped"))?;
                on_event(&mut sched, &mut load, &mut phase, a.in_flight, ev).await?;
            }
            _ = tick.tick() => {}
        }
        if let Some(why) = group.exited() {
            anyhow::bail!("a master exited on its own: {why}");
        }
        match &mut phase {
            Phase::Steady { until } if load.ended.len() >= *until => {
                let Some(leader) = group.leader(&probe).await else {
                    continue;
                };
                group.kill(leader)?;
                phase = Phase::Killed {
                    id: leader,
                    at: Instant::now(),
                    reconnected: false,
                    offer: None,
                    running: None,
                };
                round_start = Instant::now();
            }
            Phase::Killed {
                id,
                offer: Some(o),
                running: Some(r),
                ..
            } => {
                let id = *id;
                rounds.push((id, *o, *r));
                println!(
                    "  kill {}: master {id} killed; first offer from the new leader after {}, first task launched after the kill RUNNING after {}",
                    rounds.len(),
                    secs(*o),
                    secs(*r)
                );
                group.start(id)?;
                phase = Phase::Rejoin {
                    id,
                    since: Instant::now(),
                };
            }
            Phase::Rejoin { id, since } => {
                let (id, since) = (*id, *since);
                let addr = quic_of(addrs, id)?;
                if let Some(info) = crate::devgroup::query(&probe, addr).await {
                    if info.term > 0 && info.leader_id != 0 && !info.leading {
                        phase = Phase::Steady {
                            until: load.ended.len() + SETTLE_TASKS,
                        };
                        continue;
                    }
                }
                if since.elapsed() > ROUND_LIMIT {
                    anyhow::bail!(
                        "master {id} did not rejoin the group within 60 s after its restart"
                    );
                }
            }
            _ => {}
        }
        if round_start.elapsed() > ROUND_LIMIT * 2 {
            anyhow::bail!(
                "a round took over 2 minutes ({} tasks ended, {} in flight); see the masters' logs",
                load.ended.len(),
                load.flying.len()
            );
        }
    }
    // Every task launched ends, none twice.
    sched.revive().await.ok();
    let end = Instant::now() + ROUND_LIMIT;
    let target = load.launched;
    while load.ended.len() < target && Instant::now() < end {
        if let Ok(Some(ev)) =
            tokio::time::timeout(Duration::from_millis(200), sched.next_event()).await
        {
            on_event(&mut sched, &mut load, &mut phase, 0, ev).await?;
        }
    }
    let _ = sched.teardown().await;
    let offers: Vec<Duration> = rounds.iter().map(|r| r.1).collect();
    let running: Vec<Duration> = rounds.iter().map(|r| r.2).collect();
    load.steady_us.sort_unstable();
    let steady = crate::bench::pct(&load.steady_us, 0.5);
    println!("  kill -> first offer      {}", stats(&offers));
    println!("  kill -> task RUNNING     {}", stats(&running));
    println!(
        "  baseline: launch with no kill (accept -> RUNNING) p50 {:.1} ms; median kill -> RUNNING is {:.0}x that",
        steady as f64 / 1000.0,
        {
            let mut r = running.clone();
            r.sort();
            r.get(r.len() / 2)
                .map_or(0.0, |m| m.as_micros() as f64 / steady.max(1) as f64)
        }
    );
    println!(
        "  registry write (framework state, quorum commit) p50 {:.2} ms  p99 {:.2} ms",
        crate::bench::pct(&write_us, 0.5) as f64 / 1000.0,
        crate::bench::pct(&write_us, 0.99) as f64 / 1000.0
    );
    let lost = target.saturating_sub(load.ended.len());
    println!(
        "  tasks: launched {target}, ended {} (of which {} never started: their launch died with a killed leader, and the new one said so), failed {}, lost {lost}",
        load.ended.len(),
        load.dropped,
        load.failed
    );
    Ok(if lost > 0 || load.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn on_event(
    sched: &mut Scheduler,
    load: &mut Load,
    phase: &mut Phase,
    in_flight: usize,
    ev: Event,
) -> anyhow::Result<()> {
    let killed_at = match phase {
        Phase::Killed { at, .. } => Some(*at),
        _ => None,
    };
    match ev {
        Event::Offers(offers) => {
            if let Phase::Killed {
                at,
                reconnected: true,
                offer: offer @ None,
                ..
            } = phase
            {
                *offer = Some(at.elapsed());
            }
            let per_task = Resources::cpus_mem(10, 4 << 20);
            for o in offers {
                let mut free = Resources::from_proto(&o.resources)
                    .map_err(anyhow::Error::msg)?
                    .unreserved();
                let mut batch = Vec::new();
                while load.flying.len() + batch.len() < in_flight {
                    let Some(left) = free.checked_sub(&per_task) else {
                        break;
                    };
                    free = left;
                    let id = format!("f-{}", load.next);
                    load.next += 1;
                    batch.push(TaskInfo {
                        task_id: id,
                        name: "noop".into(),
                        resources: per_task.to_proto(),
                        module: Some(load.module.clone()),
                        ..Default::default()
                    });
                }
                if batch.is_empty() {
                    sched.decline(vec![o.offer_id], Some(0.05)).await?;
                    continue;
                }
                for t in &batch {
                    load.flying
                        .insert(t.task_id.clone(), (Instant::now(), killed_at.is_some()));
                }
                load.launched += batch.len();
                sched.accept(vec![o.offer_id], batch, Some(0.0)).await?;
            }
        }
        Event::Update(s) => {
            sched.acknowledge(&s).await?;
            let st = s.state();
            if st == TaskState::TaskRunning {
                if let Some((accepted, after_kill)) = load.flying.get(&s.task_id) {
                    match phase {
                        Phase::Killed {
                            at,
                            running: running @ None,
                            ..
                        } if *after_kill => *running = Some(at.elapsed()),
                        Phase::Steady { .. } if !after_kill => {
                            load.steady_us.push(accepted.elapsed().as_micros() as u64)
                        }
                        _ => {}
                    }
                }
            }
            let unknown = matches!(
                st,
                TaskState::TaskUnknown | TaskState::TaskLost | TaskState::TaskDropped
            ) && s.agent_id.is_empty();
            if unknown && load.flying.remove(&s.task_id).is_some() {
                // The launch died with the old leader: the task never started.
                load.dropped += 1;
                load.ended.insert(s.task_id.clone());
            } else if st.is_terminal() && load.flying.remove(&s.task_id).is_some() {
                load.ended.insert(s.task_id.clone());
                if st != TaskState::TaskFinished {
                    load.failed += 1;
                    if load.failed <= 3 {
                        eprintln!("task {} {}: {}", s.task_id, st.short_name(), s.message);
                    }
                }
            }
        }
        Event::Reconnected => {
            if let Phase::Killed { reconnected, .. } = phase {
                *reconnected = true;
            }
            // Launches the old leader took but never passed on are unknown to the
            // new one: ask for every task in flight.
            sched
                .reconcile(load.flying.keys().cloned().collect())
                .await?;
        }
        Event::Error(e) => anyhow::bail!("master error: {e}"),
        _ => {}
    }
    Ok(())
}
