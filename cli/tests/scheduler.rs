//! End-to-end: the scheduler API through the real binaries. Each test starts its own
//! `agora dev` (master, agent, executor processes) and drives it as a framework
//! written with `agora-sdk` would: failover with the same framework id, explicit and
//! implicit reconciliation, KILL, SUPPRESS/REVIVE, offer timeouts, a dynamic
//! reservation offered only to its role, MESSAGE and SHUTDOWN.
//!
//! Every wait is for an event, bounded by a timeout; none sleeps to synchronise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::time::Duration;

use agora_proto::v1::{CommandInfo, FrameworkInfo, Reason, TaskInfo, TaskState};
use agora_proto::Resources;
use agora_sdk::{Client, ClientConfig, Event, Operation, Scheduler};
use common::*;

/// Longest wait for one expected event.
const WAIT: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn connect(c: &Cluster) -> Client {
    let cfg = ClientConfig::load(&c.config).expect("client config");
    Client::connect(&cfg).await.expect("connect to the master")
}

fn framework(name: &str, roles: &[&str]) -> FrameworkInfo {
    FrameworkInfo {
        name: name.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        failover_timeout_seconds: 60.0,
        ..Default::default()
    }
}

/// A native task that runs until killed.
fn sleeper(id: &str, executor_id: &str) -> TaskInfo {
    TaskInfo {
        task_id: id.into(),
        name: id.into(),
        resources: Resources::cpus_mem(100, 32 << 20).to_proto(),
        command: Some(CommandInfo {
            shell: true,
            value: "sleep 120".into(),
            kill_grace_seconds: Some(0.5),
            ..Default::default()
        }),
        executor_id: executor_id.into(),
        ..Default::default()
    }
}

/// The next event that `pick` accepts (others are handled as a framework would:
/// offers declined when `decline_others`, nothing acknowledged), within `WAIT`.
async fn wait_for<T>(
    s: &mut Scheduler,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, s.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
            .unwrap_or_else(|| panic!("event stream ended while waiting for {what}"));
        if let Some(v) = pick(&ev) {
            return v;
        }
        if let Event::Error(e) = &ev {
            panic!("the master refused a call while waiting for {what}: {e}");
        }
    }
}

/// The first offer event: its offers.
async fn offers(s: &mut Scheduler) -> Vec<agora_proto::v1::Offer> {
    wait_for(s, "an offer", |e| match e {
        Event::Offers(o) => Some(o.clone()),
        _ => None,
    })
    .await
}

/// The next update of `task` in `state` (earlier updates are acknowledged when `ack`).
async fn update(
    s: &mut Scheduler,
    task: &str,
    state: TaskState,
    ack: bool,
) -> agora_proto::v1::TaskStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, s.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {task} {state:?}"))
            .unwrap_or_else(|| panic!("event stream ended waiting for {task} {state:?}"));
        match ev {
            Event::Update(st) => {
                if ack {
                    s.acknowledge(&st).await.expect("acknowledge");
                }
                if st.task_id == task && st.state() == state {
                    return st;
                }
                assert!(
                    !st.state().is_terminal() || st.task_id != task,
                    "task {task} ended {:?} ({}) while waiting for {state:?}",
                    st.state(),
                    st.message
                );
            }
            Event::Error(e) => panic!("the master refused a call: {e}"),
            _ => {}
        }
    }
}

/// Launches `tasks` on the first offer that arrives.
async fn launch(s: &mut Scheduler, tasks: Vec<TaskInfo>) -> String {
    let o = offers(s).await;
    let agent = o[0].agent_id.clone();
    s.accept(vec![o[0].offer_id.clone()], tasks, Some(0.0))
        .await
        .expect("accept");
    agent
}

#[test]
fn failover_within_the_timeout_gets_tasks_and_pending_updates_back_then_reconcile_and_kill() {
    let c = Cluster::start_with(&["--resources", "cpus:2;mem:2048"]);
    runtime().block_on(async {
        let client = connect(&c).await;
        let mut s = client.subscribe(framework("failover", &[])).await.unwrap();
        let fid = s.framework_id().to_string();
        launch(&mut s, vec![sleeper("fo-1", "")]).await;
        // STARTING is acknowledged; RUNNING is left unacknowledged on purpose.
        update(&mut s, "fo-1", TaskState::TaskStarting, true).await;
        let running = update(&mut s, "fo-1", TaskState::TaskRunning, false).await;
        // The framework goes away (connection and all).
        drop(s);
        drop(client);

        let client = connect(&c).await;
        let mut info = framework("failover", &[]);
        info.framework_id = fid.clone();
        let mut s = client
            .subscribe(info)
            .await
            .expect("re-subscribe with the same id");
        assert_eq!(s.framework_id(), fid);
        // The unacknowledged RUNNING is sent again (same uuid): nothing was lost.
        let again = update(&mut s, "fo-1", TaskState::TaskRunning, true).await;
        assert_eq!(again.uuid, running.uuid);

        // Explicit reconciliation: the task's latest state, and for a stranger LOST
        // (this framework is not partition-aware; those get UNKNOWN, as in Mesos).
        s.reconcile(vec!["fo-1".into(), "no-such-task".into()])
            .await
            .unwrap();
        let st = update(&mut s, "fo-1", TaskState::TaskRunning, false).await;
        assert_eq!(st.reason(), Reason::Reconciliation);
        assert!(st.uuid.is_empty(), "reconciliation answers need no ack");
        let st = update(&mut s, "no-such-task", TaskState::TaskLost, false).await;
        assert_eq!(st.reason(), Reason::Reconciliation);
        // Implicit: every live task of the framework.
        s.reconcile(vec![]).await.unwrap();
        let st = update(&mut s, "fo-1", TaskState::TaskRunning, false).await;
        assert_eq!(st.reason(), Reason::Reconciliation);

        // KILL ends it.
        s.kill("fo-1").await.unwrap();
        let st = update(&mut s, "fo-1", TaskState::TaskKilled, true).await;
        assert_eq!(st.reason(), Reason::KilledByFramework, "{st:?}");
        s.teardown().await.unwrap();
    });
}

#[test]
fn suppress_stops_offers_and_revive_brings_them_back() {
    let c = Cluster::start_with(&["--resources", "cpus:2;mem:2048"]);
    runtime().block_on(async {
        let client = connect(&c).await;
        let mut s = client.subscribe(framework("quiet", &[])).await.unwrap();
        let o = offers(&mut s).await;
        s.suppress().await.unwrap();
        // Declined with no filter: without SUPPRESS it would come straight back.
        s.decline(vec![o[0].offer_id.clone()], Some(0.0))
            .await
            .unwrap();
        let quiet = Duration::from_secs(3);
        let got = tokio::time::timeout(quiet, async {
            loop {
                match s.next_event().await {
                    Some(Event::Offers(o)) => return o,
                    Some(Event::Error(e)) => panic!("refused: {e}"),
                    Some(_) => {}
                    None => panic!("stream ended"),
                }
            }
        })
        .await;
        assert!(got.is_err(), "offers while suppressed: {got:?}");
        s.revive().await.unwrap();
        let o = offers(&mut s).await;
        assert_eq!(o.len(), 1);
    });
}

#[test]
fn unanswered_offer_is_rescinded_after_the_offer_timeout_and_offered_again() {
    let c = Cluster::start_with(&["--resources", "cpus:2;mem:2048", "--offer-timeout", "1"]);
    runtime().block_on(async {
        let client = connect(&c).await;
        let mut s = client.subscribe(framework("slowpoke", &[])).await.unwrap();
        let first = offers(&mut s).await[0].offer_id.clone();
        let t0 = tokio::time::Instant::now();
        let rescinded = wait_for(&mut s, "a RESCIND", |e| match e {
            Event::Rescind(id) => Some(id.clone()),
            _ => None,
        })
        .await;
        assert_eq!(rescinded, first);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "rescinded after {:?}",
            t0.elapsed()
        );
        // The resources went back: offered again under a new id.
        let next = offers(&mut s).await[0].offer_id.clone();
        assert_ne!(next, first);
        // The rescinded offer can no longer be accepted, and the master says why.
        s.accept(vec![first.clone()], vec![], None).await.unwrap();
        let e = wait_for(&mut s, "an ERROR", |e| match e {
            Event::Error(m) => Some(m.clone()),
            _ => None,
        })
        .await;
        assert!(e.contains(&first) && e.contains("rescinded"), "{e}");
    });
}

#[test]
fn a_reservation_made_with_reserve_is_offered_only_to_its_role() {
    let c = Cluster::start_with(&["--resources", "cpus:2;mem:2048;disk:1024"]);
    runtime().block_on(async {
        let client = connect(&c).await;
        let mut a = client
            .subscribe(framework("tenant-a", &["tenant-a"]))
            .await
            .unwrap();
        let o = offers(&mut a).await;
        assert_eq!(o[0].role, "tenant-a");
        let want = Resources::cpus_mem(1000, 512 << 20);
        // Reserve, and keep the rest away from tenant-a for a long while.
        a.accept_operations(
            vec![o[0].offer_id.clone()],
            vec![Operation::reserve(&want)],
            Some(3600.0),
        )
        .await
        .unwrap();

        // tenant-b sees only what is not reserved.
        let mut b = client
            .subscribe(framework("tenant-b", &["tenant-b"]))
            .await
            .unwrap();
        let ob = offers(&mut b).await;
        let got = Resources::from_proto(&ob[0].resources).unwrap();
        assert_eq!(ob[0].role, "tenant-b");
        let mut rest = Resources::cpus_mem(1000, 1536 << 20);
        rest.add_scalar(agora_proto::resources::DISK, "", 1 << 30);
        assert_eq!(got, rest, "{got}");
        assert!(
            got.roles().is_empty(),
            "reserved resources offered to tenant-b: {got}"
        );

        // tenant-a, revived, is offered its reservation and launches on it by role.
        a.revive().await.unwrap();
        let oa = offers(&mut a).await;
        let have = Resources::from_proto(&oa[0].resources).unwrap();
        assert_eq!(
            have.of_role("tenant-a"),
            want.with_role("tenant-a"),
            "{have}"
        );
        let mut t = sleeper("res-1", "");
        t.resources = Resources::cpus_mem(500, 64 << 20)
            .with_role("tenant-a")
            .to_proto();
        a.accept(vec![oa[0].offer_id.clone()], vec![t], None)
            .await
            .unwrap();
        update(&mut a, "res-1", TaskState::TaskRunning, true).await;
        a.kill("res-1").await.unwrap();
        update(&mut a, "res-1", TaskState::TaskKilled, true).await;
    });
}

#[test]
fn message_reaches_the_tasks_sandbox_and_shutdown_kills_the_executors_tasks() {
    let c = Cluster::start_with(&["--resources", "cpus:2;mem:2048"]);
    runtime().block_on(async {
        let client = connect(&c).await;
        let mut s = client.subscribe(framework("talker", &[])).await.unwrap();
        let agent = launch(&mut s, vec![sleeper("msg-1", "ex-1")]).await;
        update(&mut s, "msg-1", TaskState::TaskRunning, true).await;

        s.message(&agent, "ex-1", b"hello".to_vec()).await.unwrap();
        let receipt = wait_for(&mut s, "the executor's receipt", |e| match e {
            Event::Message {
                executor_id, data, ..
            } if executor_id == "ex-1" => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        })
        .await;
        assert_eq!(receipt, "delivered 5 bytes to msg-1");
        let (bytes, _) = client
            .read_file("msg-1", "messages", 0, 1024)
            .await
            .unwrap();
        assert_eq!(bytes, b"hello");

        // A message for an executor that does not exist is refused by name.
        s.message(&agent, "ex-none", b"x".to_vec()).await.unwrap();
        let e = wait_for(&mut s, "an ERROR", |e| match e {
            Event::Error(m) => Some(m.clone()),
            _ => None,
        })
        .await;
        assert!(e.contains("no live task in executor ex-none"), "{e}");

        s.shutdown_executor(&agent, "ex-1").await.unwrap();
        let st = update(&mut s, "msg-1", TaskState::TaskKilled, true).await;
        assert_eq!(st.reason(), Reason::ExecutorShutdown, "{st:?}");
        assert!(st.message.contains("shut down executor ex-1"), "{st:?}");
        let (executor, message) = wait_for(&mut s, "FAILURE for the executor", |e| match e {
            Event::Failure {
                executor_id: Some(x),
                message,
                ..
            } => Some((x.clone(), message.clone())),
            _ => None,
        })
        .await;
        assert_eq!(executor, "ex-1", "{message}");
    });
}
