//! The checkpoint file (redb): what is written is what a reopened file holds,
//! including after the process that wrote it is gone.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

use std::path::PathBuf;

use agora_agent::checkpoint::{
    phase, Checkpoint, CheckpointDelta, CheckpointState, ExecutorRecord, TaskRecord, Writer,
};
use agora_agent_core::{AgentCore, AgentCoreConfig, ExecutorProcess, Input};
use agora_proto::v1::{self, TaskInfo, TaskState, TaskStatus, WasmModule};
use agora_proto::Resources;

fn key(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

fn status(task: &str, state: TaskState, uuid: &str) -> TaskStatus {
    TaskStatus {
        task_id: task.into(),
        state: state as i32,
        uuid: uuid.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn record(task: &str, updates: Vec<TaskStatus>) -> TaskRecord {
    TaskRecord {
        info: Some(TaskInfo {
            task_id: task.into(),
            executor_id: "e1".into(),
            ..Default::default()
        }),
        executor_id: "e1".into(),
        phase: phase::LAUNCHED,
        latest: updates.last().cloned(),
        live: updates.last().cloned(),
        updates,
        kill_requested: false,
        terminal_sent: false,
    }
}

#[test]
fn written_deltas_are_read_back_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(fresh.load().unwrap(), CheckpointState::default());
    drop(fresh);

    let mut model = CheckpointState::default();
    let deltas = vec![
        CheckpointDelta {
            agent_id: Some("A-1".into()),
            update_seq: 2,
            tasks: vec![
                (
                    key("f1", "t1"),
                    Some(record(
                        "t1",
                        vec![status("t1", TaskState::TaskStarting, "A-1/1")],
                    )),
                ),
                (
                    key("f1", "t2"),
                    Some(record(
                        "t2",
                        vec![status("t2", TaskState::TaskStarting, "A-1/2")],
                    )),
                ),
            ],
            executors: vec![(
                key("f1", "e1"),
                Some(ExecutorRecord {
                    kind: 1,
                    pid: 777,
                    start_time: 123_456,
                }),
            )],
            completed: vec![(0, Some(completed("t0"))), (1, Some(completed("t9")))],
            durable: true,
        },
        // Not synced on its own, but the durable write after it carries it.
        CheckpointDelta {
            agent_id: Some("A-1".into()),
            update_seq: 2,
            tasks: vec![(key("f1", "t1"), None)],
            executors: vec![],
            completed: vec![(0, None)],
            durable: false,
        },
        CheckpointDelta {
            agent_id: Some("A-1".into()),
            update_seq: 3,
            tasks: vec![(
                key("f1", "t2"),
                Some(record(
                    "t2",
                    vec![
                        status("t2", TaskState::TaskStarting, "A-1/2"),
                        status("t2", TaskState::TaskRunning, "A-1/3"),
                    ],
                )),
            )],
            executors: vec![(key("f1", "e0"), None)],
            completed: vec![],
            durable: true,
        },
    ];
    {
        let cp = Checkpoint::open(dir.path()).unwrap();
        for d in &deltas {
            cp.write(d).unwrap();
            model.apply(d);
        }
        assert_eq!(cp.load().unwrap(), model, "read back while open");
    }
    let cp = Checkpoint::open(dir.path()).unwrap();
    let back = cp.load().unwrap();
    assert_eq!(back, model, "read back after reopening");
    assert_eq!(back.agent_id.as_deref(), Some("A-1"));
    assert_eq!(back.update_seq, 3);
    assert_eq!(back.tasks.len(), 1);
    assert_eq!(back.tasks[&key("f1", "t2")].updates.len(), 2);
    assert_eq!(back.executors[&key("f1", "e1")].pid, 777);
}

#[test]
fn a_second_agent_cannot_open_a_checkpoint_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Checkpoint::open(dir.path()).unwrap();
    let err = Checkpoint::open(dir.path())
        .err()
        .expect("the file is locked by the first");
    assert!(
        format!("{err:#}").contains("another agent"),
        "the error says what to check: {err:#}"
    );
}

/// A core's deltas written to a real file rebuild the same core after "kill -9"
/// (the file reopened without any goodbye from the writer).
#[test]
fn a_core_rebuilt_from_the_file_matches_the_one_that_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentCoreConfig {
        hostname: "h".into(),
        resources: Resources::cpus_mem(2000, 1 << 30),
        attributes: vec![],
        work_dir: PathBuf::from("/w"),
        update_retry_ms: 1000,
        update_retry_max_ms: 4000,
        executor_idle_ms: 30_000,
        output_limit_bytes: 1 << 20,
        max_files_per_task: 10_000,
        recovery_timeout_ms: 60_000,
        reregister_timeout_ms: 10_000,
    };
    let mut core = AgentCore::new(cfg.clone());
    {
        let cp = Checkpoint::open(dir.path()).unwrap();
        let step = |core: &mut AgentCore, input: Input, now: u64| {
            let outs = core.handle(input, now);
            if let Some(d) = core.take_checkpoint() {
                cp.write(&d).unwrap();
            }
            outs
        };
        step(
            &mut core,
            Input::Registered {
                agent_id: "A-7".into(),
            },
            1,
        );
        let t = TaskInfo {
            task_id: "t1".into(),
            resources: Resources::cpus_mem(100, 1 << 20).to_proto(),
            module: Some(WasmModule {
                sha256: "ab".repeat(32),
                ..Default::default()
            }),
            ..Default::default()
        };
        step(
            &mut core,
            Input::RunTask(v1::RunTask {
                framework_id: "f1".into(),
                task: Some(t),
            }),
            2,
        );
        step(
            &mut core,
            Input::Prepared {
                key: key("f1", "t1"),
                result: Ok(()),
            },
            3,
        );
        step(
            &mut core,
            Input::ExecutorSpawned {
                key: key("f1", "default"),
                process: ExecutorProcess {
                    pid: 31,
                    start_time: 99,
                },
            },
            4,
        );
        step(
            &mut core,
            Input::ExecutorRegistered {
                key: key("f1", "default"),
            },
            5,
        );
        step(
            &mut core,
            Input::ExecutorStatus {
                key: key("f1", "default"),
                status: v1::ExecutorStatus {
                    task_id: "t1".into(),
                    state: TaskState::TaskRunning as i32,
                    ..Default::default()
                },
            },
            6,
        );
        // No clean close: the handle is simply dropped, as a killed process leaves it.
    }
    let back = Checkpoint::open(dir.path()).unwrap().load().unwrap();
    assert_eq!(back, core.checkpoint_state());
    let (rebuilt, _) = AgentCore::recover(cfg, back, 10);
    assert_eq!(rebuilt.hello(), core.hello());
    assert_eq!(rebuilt.agent_id(), Some("A-7"));
    assert_eq!(rebuilt.live_tasks(), 1);
}

fn delta(task: &str, seq: u64, durable: bool) -> CheckpointDelta {
    CheckpointDelta {
        agent_id: Some("A-1".into()),
        update_seq: seq,
        tasks: vec![(
            key("f1", task),
            Some(record(
                task,
                vec![status(task, TaskState::TaskRunning, &format!("A-1/{seq}"))],
            )),
        )],
        executors: vec![],
        completed: vec![],
        durable,
    }
}

/// A task that ended and was acknowledged, as the history keeps it.
fn completed(task: &str) -> agora_proto::v1::CompletedTask {
    agora_proto::v1::CompletedTask {
        framework_id: "f1".into(),
        task: Some(agora_proto::v1::TaskInfo {
            task_id: task.into(),
            ..Default::default()
        }),
        status: Some(status(task, TaskState::TaskFinished, "A-1/9")),
    }
}

#[test]
fn deltas_queued_together_share_one_fsync_and_nothing_waits_for_what_need_not_be_durable() {
    let dir = tempfile::tempdir().unwrap();
    let w = Writer::new(Checkpoint::open(dir.path()).unwrap());
    let mut model = CheckpointState::default();
    // Three inputs handled back to back, before any of them settles.
    let tickets: Vec<_> = (1..=3)
        .map(|i| {
            let d = delta(&format!("t{i}"), i, true);
            model.apply(&d);
            w.submit(Some(d))
        })
        .collect();
    w.settle(tickets[2]).unwrap();
    assert_eq!(w.syncs(), 1, "one fsync for the three");
    w.settle(tickets[0]).unwrap();
    w.settle(tickets[1]).unwrap();
    assert_eq!(w.syncs(), 1, "already on disk");
    // An input with nothing durable (an acknowledgement) does not wait at all...
    let d = delta("t1", 3, false);
    model.apply(&d);
    let t = w.submit(Some(d));
    w.settle(t).unwrap();
    let t = w.submit(None);
    w.settle(t).unwrap();
    assert_eq!(w.syncs(), 1);
    // ...and reaches the file with the next flush, without an fsync.
    w.flush().unwrap();
    assert_eq!(w.syncs(), 1);
    assert_eq!(w.checkpoint().load().unwrap(), model);
    drop(w);
    assert_eq!(
        Checkpoint::open(dir.path()).unwrap().load().unwrap(),
        model,
        "read back after reopening"
    );
}

#[test]
fn concurrent_inputs_all_settle_and_the_file_holds_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let w = std::sync::Arc::new(Writer::new(Checkpoint::open(dir.path()).unwrap()));
    // The shell's lock: deltas are queued in the order they are made.
    let core = std::sync::Arc::new(std::sync::Mutex::new(CheckpointState::default()));
    let threads: Vec<_> = (0..8)
        .map(|n| {
            let (w, core) = (w.clone(), core.clone());
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let ticket = {
                        let mut model = core.lock().unwrap();
                        let seq = model.update_seq + 1;
                        let d = delta(&format!("t{}", (n * 50 + i) % 17), seq, i % 3 != 0);
                        model.apply(&d);
                        w.submit(Some(d))
                    };
                    w.settle(ticket).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    w.sync().unwrap();
    let model = core.lock().unwrap().clone();
    assert_eq!(model.update_seq, 400);
    assert_eq!(w.checkpoint().load().unwrap(), model);
    assert!(w.syncs() <= 400, "{}", w.syncs());
}
