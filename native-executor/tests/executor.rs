//! `run_executor` over a real Unix socket, with this test playing the agent.

mod common;

use std::path::Path;

use agora_native_executor::{run_executor, IsolationMode, NativeConfig};
use agora_proto::frame::{read_frame, write_frame};
use agora_proto::v1::{
    agent_to_executor, executor_to_agent, AgentToExecutor, ExecutorKill, ExecutorLaunch,
    ExecutorShutdown, ExecutorStatus, ExecutorToAgent, Reason, TaskState,
};
use common::*;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The agent's side of one executor connection.
struct Agent {
    dir: tempfile::TempDir,
    rd: OwnedReadHalf,
    wr: Option<OwnedWriteHalf>,
    executor: JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    async fn start(cfg: NativeConfig) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let executor =
            tokio::spawn(async move { run_executor(&socket, "fw-1", "ex-1", cfg).await });
        let (stream, _) = timeout(WAIT, listener.accept())
            .await
            .expect("executor connects")
            .expect("accept");
        let (rd, wr) = stream.into_split();
        let mut agent = Agent {
            dir,
            rd,
            wr: Some(wr),
            executor,
        };
        match agent.next().await.msg {
            Some(executor_to_agent::Msg::Register(reg)) => assert_eq!(
                (reg.framework_id.as_str(), reg.executor_id.as_str()),
                ("fw-1", "ex-1")
            ),
            other => panic!("expected register, got {other:?}"),
        }
        agent
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
        match self.next().await.msg {
            Some(executor_to_agent::Msg::Status(status)) => status,
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
    async fn exit(self) -> anyhow::Result<()> {
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
async fn agent_going_away_kills_tasks() {
    let mut agent = Agent::start(config(IsolationMode::Posix, &unique_root("eof"))).await;
    let mark = marker("eof");
    agent
        .launch(shell_launch("orphan", agent.dir(), "sleep 1000", &mark))
        .await;
    agent.expect_running("orphan").await;
    // Close our write half: the executor sees EOF.
    agent.wr = None;
    let s = agent.status().await;
    assert_eq!(
        (s.task_id.as_str(), s.state()),
        ("orphan", TaskState::TaskKilled)
    );
    agent.exit().await.expect("EOF is a clean exit");
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
