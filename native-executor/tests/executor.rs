//! `run_executor` over a real Unix socket, with this test playing the agent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::path::Path;

use std::time::Duration;

use agora_native_executor::executor::run_executor_with;
use agora_native_executor::{run_executor, IsolationMode, NativeConfig};
use agora_net::frame::{read_frame, write_frame};
use agora_proto::v1::{
    agent_to_executor, executor_to_agent, AgentToExecutor, ExecutorAck, ExecutorKill,
    ExecutorLaunch, ExecutorRegister, ExecutorShutdown, ExecutorStatus, ExecutorToAgent, Reason,
    TaskState,
};
use common::*;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The agent's side of one executor connection.
struct Agent {
    dir: tempfile::TempDir,
    listener: Option<UnixListener>,
    rd: OwnedReadHalf,
    wr: Option<OwnedWriteHalf>,
    executor: JoinHandle<agora_native_executor::Result<()>>,
    /// Sequence number of the last status read.
    last_seq: u64,
}

impl Agent {
    async fn start(cfg: NativeConfig) -> Agent {
        Self::start_with(cfg, Duration::from_secs(60)).await
    }

    /// `start` with the executor's recovery timeout given.
    async fn start_with(cfg: NativeConfig, recovery: Duration) -> Agent {
        let dir = task_dir();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let executor =
            tokio::spawn(
                async move { run_executor_with(&socket, "fw-1", "ex-1", cfg, recovery).await },
            );
        let (stream, _) = timeout(WAIT, listener.accept())
            .await
            .expect("executor connects")
            .expect("accept");
        let (rd, wr) = stream.into_split();
        let mut agent = Agent {
            dir,
            listener: Some(listener),
            rd,
            wr: Some(wr),
            executor,
            last_seq: 0,
        };
        let reg = agent.register().await;
        assert_eq!(
            (reg.framework_id.as_str(), reg.executor_id.as_str()),
            ("fw-1", "ex-1")
        );
        assert!(!reg.reconnect && reg.task_ids.is_empty(), "{reg:?}");
        agent
    }

    async fn register(&mut self) -> ExecutorRegister {
        match self.next().await.msg {
            Some(executor_to_agent::Msg::Register(reg)) => reg,
            other => panic!("expected register, got {other:?}"),
        }
    }

    /// Goes away as a dying agent does (the executor reads EOF), then waits for the
    /// executor to connect again and returns its registration.
    async fn restart(&mut self) -> ExecutorRegister {
        self.wr = None;
        let listener = self.listener.as_ref().expect("listening");
        let (stream, _) = timeout(WAIT, listener.accept())
            .await
            .expect("executor reconnects")
            .expect("accept");
        let (rd, wr) = stream.into_split();
        self.rd = rd;
        self.wr = Some(wr);
        self.register().await
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn next(&mut self) -> ExecutorToAgent {
        timeout(WAIT, read_frame::<_, ExecutorToAgent>(&mut self.rd))
            .await
            .expect("a frame in time")
            .expect("a well-formed frame")
            .expect("the executor is still connected")
    }

    async fn status(&mut self) -> ExecutorStatus {
        let frame = self.next().await;
        match frame.msg {
            Some(executor_to_agent::Msg::Status(status)) => {
                assert!(frame.seq > 0, "every status has a sequence number");
                self.last_seq = frame.seq;
                status
            }
            other => panic!("expected a status, got {other:?}"),
        }
    }

    async fn send(&mut self, msg: agent_to_executor::Msg) {
        write_frame(
            self.wr.as_mut().expect("still connected"),
            &AgentToExecutor { msg: Some(msg) },
        )
        .await
        .expect("send");
    }

    async fn launch(&mut self, l: ExecutorLaunch) {
        self.send(agent_to_executor::Msg::Launch(l)).await;
    }

    async fn expect_running(&mut self, task: &str) {
        let s = self.status().await;
        assert_eq!(
            (s.task_id.as_str(), s.state()),
            (task, TaskState::TaskRunning),
            "{}",
            s.message
        );
    }

    /// Waits for the executor to return.
    async fn exit(self) -> agora_native_executor::Result<()> {
        timeout(WAIT, self.executor)
            .await
            .expect("the executor exits in time")
            .expect("executor task")
    }
}

async fn protocol(cfg: NativeConfig) {
    let mut agent = Agent::start(cfg.clone()).await;
    let mark = marker("protocol");

    agent
        .launch(shell_launch("hello", agent.dir(), "echo hi", &mark))
        .await;
    agent.expect_running("hello").await;
    let s = agent.status().await;
    assert_eq!(
        (s.task_id.as_str(), s.state(), s.exit_code),
        ("hello", TaskState::TaskFinished, Some(0))
    );
    assert!(s.usage.is_some());
    assert_eq!(
        std::fs::read_to_string(agent.dir().join("hello/stdout")).unwrap(),
        "hi\n"
    );

    agent
        .launch(shell_launch("sleeper", agent.dir(), "sleep 1000", &mark))
        .await;
    agent.expect_running("sleeper").await;
    // The same id again while it runs is refused, without disturbing the first.
    agent
        .launch(shell_launch("sleeper", agent.dir(), "true", &mark))
        .await;
    let s = agent.status().await;
    assert_eq!(
        (s.task_id.as_str(), s.state(), s.reason()),
        ("sleeper", TaskState::TaskFailed, Reason::InvalidTask)
    );
    agent
        .send(agent_to_executor::Msg::Kill(ExecutorKill {
            task_id: "sleeper".into(),
        }))
        .await;
    let s = agent.status().await;
    assert_eq!(
        (s.task_id.as_str(), s.state(), s.reason()),
        ("sleeper", TaskState::TaskKilled, Reason::KilledByFramework)
    );
    // A kill for an unknown task is ignored.
    agent
        .send(agent_to_executor::Msg::Kill(ExecutorKill {
            task_id: "nobody".into(),
        }))
        .await;

    // Shutdown kills what still runs, reports it, and ends the executor cleanly.
    agent
        .launch(shell_launch("last", agent.dir(), "sleep 1000", &mark))
        .await;
    agent.expect_running("last").await;
    agent
        .send(agent_to_executor::Msg::Shutdown(ExecutorShutdown {}))
        .await;
    let s = agent.status().await;
    assert_eq!(
        (s.task_id.as_str(), s.state()),
        ("last", TaskState::TaskKilled)
    );
    let end = timeout(WAIT, read_frame::<_, ExecutorToAgent>(&mut agent.rd))
        .await
        .expect("EOF in time")
        .expect("clean");
    assert!(end.is_none(), "nothing after the last status: {end:?}");
    agent.exit().await.expect("clean exit");
    assert_eq!(marked_processes(&mark), Vec::<i32>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_with_cgroups() {
    require_cgroups!("protocol_with_cgroups");
    let root = unique_root("protocol");
    let _cleanup = CleanupRoot(root.clone());
    protocol(config(IsolationMode::Cgroups, &root)).await;
    // The executor removed its own groups; only the root it was given remains.
    assert!(!any_cgroup_dir_exists(&format!("{root}/fw-1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_with_posix_isolation() {
    protocol(config(IsolationMode::Posix, &unique_root("protocol"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_agent_keeps_tasks_running_and_reconnecting_resends_held_statuses() {
    let mut agent = Agent::start(config(IsolationMode::Posix, &unique_root("eof"))).await;
    let mark = marker("eof");
    agent
        .launch(shell_launch("orphan", agent.dir(), "sleep 60", &mark))
        .await;
    agent.expect_running("orphan").await;
    // Everything so far is acknowledged: it is not sent again.
    let seq = agent.last_seq;
    agent
        .send(agent_to_executor::Msg::Ack(ExecutorAck { seq }))
        .await;
    // A task that ends while the agent is away: its statuses are held.
    let brief_mark = marker("eof-brief");
    agent
        .launch(shell_launch("brief", agent.dir(), "sleep 0.3", &brief_mark))
        .await;
    agent.expect_running("brief").await;
    let brief_running = agent.last_seq;

    // The agent goes away: nothing is killed, and the executor comes back naming what
    // it still runs or holds statuses of.
    let reg = agent.restart().await;
    assert!(reg.reconnect, "{reg:?}");
    assert_eq!(
        reg.task_ids,
        vec!["brief".to_string(), "orphan".to_string()]
    );
    assert!(
        !marked_processes(&mark).is_empty(),
        "the orphan's sleep survived the agent going away"
    );
    // brief's RUNNING again (same sequence number), then its end.
    let s = agent.status().await;
    assert_eq!(
        (s.task_id.as_str(), s.state(), agent.last_seq),
        ("brief", TaskState::TaskRunning, brief_running)
    );
    let s = agent.status().await;
    assert_eq!(
        (s.task_id.as_str(), s.state(), s.exit_code, agent.last_seq),
        ("brief", TaskState::TaskFinished, Some(0), brief_running + 1)
    );
    // The orphan is still there to kill.
    agent
        .send(agent_to_executor::Msg::Kill(ExecutorKill {
            task_id: "orphan".into(),
        }))
        .await;
    let s = agent.status().await;
    assert_eq!(
        (s.task_id.as_str(), s.state()),
        ("orphan", TaskState::TaskKilled)
    );
    agent
        .send(agent_to_executor::Msg::Shutdown(ExecutorShutdown {}))
        .await;
    agent.exit().await.expect("clean exit");
    assert_eq!(marked_processes(&mark), Vec::<i32>::new());
    assert_eq!(marked_processes(&brief_mark), Vec::<i32>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_come_back_in_time_gets_tasks_killed() {
    let mut agent = Agent::start_with(
        config(IsolationMode::Posix, &unique_root("gone")),
        Duration::from_millis(500),
    )
    .await;
    let mark = marker("gone");
    agent
        .launch(shell_launch("orphan", agent.dir(), "sleep 60", &mark))
        .await;
    agent.expect_running("orphan").await;
    // The agent is gone for good: no listener, no socket.
    drop(agent.listener.take());
    std::fs::remove_file(agent.dir().join("agent.sock")).expect("remove socket");
    agent.wr = None;
    let err = agent
        .exit()
        .await
        .expect_err("giving up on the agent is an error");
    assert!(
        format!("{err:#}").contains("did not come back within 500ms; 1 running tasks were stopped"),
        "{err:#}"
    );
    assert_eq!(marked_processes(&mark), Vec::<i32>::new());
}

#[tokio::test]
async fn a_bad_cgroup_root_is_an_error_before_connecting() {
    let cfg = NativeConfig {
        isolation: Some(IsolationMode::Posix),
        cgroup_root: "../outside".into(),
        ..NativeConfig::default()
    };
    let err = run_executor(Path::new("/nonexistent.sock"), "fw", "ex", cfg)
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("invalid cgroup name"), "{text}");
}
