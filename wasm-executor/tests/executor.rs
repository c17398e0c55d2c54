//! `run_executor` over a real Unix socket, with this test playing the agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_proto::frame::{read_frame, write_frame};
use agora_proto::v1::{
    agent_to_executor, executor_to_agent, AgentToExecutor, ExecutorKill, ExecutorLaunch,
    ExecutorShutdown, ExecutorStatus, ExecutorToAgent, Reason, TaskState,
};
use agora_wasm_executor::run_executor;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(60);

/// The agent's side of one executor connection.
struct Agent {
    dir: tempfile::TempDir,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    executor: JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    /// Listens, starts the executor, accepts its connection and checks its register.
    async fn start() -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let executor =
            tokio::spawn(async move { run_executor(&socket, "fw-1", "ex-1", None).await });
        let (stream, _) = timeout(WAIT, listener.accept())
            .await
            .expect("executor connects")
            .expect("accept");
        let (rd, wr) = stream.into_split();
        let mut agent = Agent {
            dir,
            rd,
            wr,
            executor,
        };
        match agent.next().await.msg {
            Some(executor_to_agent::Msg::Register(reg)) => {
                assert_eq!(
                    (reg.framework_id.as_str(), reg.executor_id.as_str()),
                    ("fw-1", "ex-1")
                );
            }
            other => panic!("expected register, got {other:?}"),
        }
        agent
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
        write_frame(&mut self.wr, &AgentToExecutor { msg: Some(msg) })
            .await
            .expect("send");
    }

    /// A launch of a guest, with its sandbox in a directory of its own.
    fn launch(&self, task_id: &str, guest: &str, args: &[&str]) -> ExecutorLaunch {
        let module = agora_guest_examples::wasm_path(guest);
        let bytes = std::fs::read(&module).expect("module");
        let sandbox = self.sandbox(task_id);
        std::fs::create_dir_all(sandbox.join("root")).expect("sandbox");
        ExecutorLaunch {
            task_id: task_id.to_string(),
            module_path: module.display().to_string(),
            module_sha256: agora_proto::sha256_hex(&bytes),
            root_dir: sandbox.join("root").display().to_string(),
            stdout_path: sandbox.join("stdout").display().to_string(),
            stderr_path: sandbox.join("stderr").display().to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn sandbox(&self, task_id: &str) -> PathBuf {
        self.dir.path().join(task_id)
    }

    async fn ended(self) -> anyhow::Result<()> {
        timeout(WAIT, self.executor)
            .await
            .expect("executor ends in time")
            .expect("executor task")
    }
}

fn assert_status(status: &ExecutorStatus, task_id: &str, state: TaskState, reason: Reason) {
    assert_eq!(
        (status.task_id.as_str(), status.state(), status.reason()),
        (task_id, state, reason),
        "{status:?}"
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_kill_and_shutdown() {
    let mut agent = Agent::start().await;

    let hello = agent.launch("hello-1", "hello", &["x"]);
    agent.send(agent_to_executor::Msg::Launch(hello)).await;
    let running = agent.status().await;
    assert_status(
        &running,
        "hello-1",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    assert!(running.instantiate_us > 0, "{running:?}");
    let done = agent.status().await;
    assert_status(
        &done,
        "hello-1",
        TaskState::TaskFinished,
        Reason::Unspecified,
    );
    assert_eq!(done.instantiate_us, running.instantiate_us);
    assert!(read(&agent.sandbox("hello-1").join("stdout")).contains("args: x"));

    let spin = agent.launch("spin-1", "spin", &[]);
    agent
        .send(agent_to_executor::Msg::Launch(spin.clone()))
        .await;
    assert_status(
        &agent.status().await,
        "spin-1",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    // The same task id again while it runs is refused, and the running one goes on.
    agent.send(agent_to_executor::Msg::Launch(spin)).await;
    assert_status(
        &agent.status().await,
        "spin-1",
        TaskState::TaskFailed,
        Reason::InvalidTask,
    );
    // A kill for a task the executor does not know is ignored (no answer).
    agent
        .send(agent_to_executor::Msg::Kill(ExecutorKill {
            task_id: "nope".to_string(),
        }))
        .await;
    agent
        .send(agent_to_executor::Msg::Kill(ExecutorKill {
            task_id: "spin-1".to_string(),
        }))
        .await;
    let killed = agent.status().await;
    assert_status(
        &killed,
        "spin-1",
        TaskState::TaskKilled,
        Reason::KilledByFramework,
    );
    assert_eq!(killed.message, "killed");

    // Shutdown kills what still runs, reports it, and ends the loop.
    let spin = agent.launch("spin-2", "spin", &[]);
    agent.send(agent_to_executor::Msg::Launch(spin)).await;
    assert_status(
        &agent.status().await,
        "spin-2",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    agent
        .send(agent_to_executor::Msg::Shutdown(ExecutorShutdown {}))
        .await;
    assert_status(
        &agent.status().await,
        "spin-2",
        TaskState::TaskKilled,
        Reason::KilledByFramework,
    );
    agent.ended().await.expect("shutdown is a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_going_away_kills_tasks_and_ends_cleanly() {
    let mut agent = Agent::start().await;
    let spin = agent.launch("spin-1", "spin", &[]);
    agent.send(agent_to_executor::Msg::Launch(spin)).await;
    assert_status(
        &agent.status().await,
        "spin-1",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    // Close our write side: the executor reads EOF.
    agent.wr.shutdown().await.expect("shutdown write half");
    let Agent {
        wr,
        executor,
        dir,
        rd,
    } = agent;
    drop((wr, rd));
    timeout(WAIT, executor)
        .await
        .expect("executor ends in time")
        .expect("executor task")
        .expect("EOF is a clean exit");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frame_is_an_error() {
    let mut agent = Agent::start().await;
    agent
        .wr
        .write_all(&3u32.to_be_bytes())
        .await
        .expect("write");
    agent
        .wr
        .write_all(&[0xff, 0xff, 0xff])
        .await
        .expect("write");
    let err = agent
        .ended()
        .await
        .expect_err("malformed frame ends the executor with an error");
    assert!(format!("{err:#}").contains("malformed frame"), "{err:#}");
}
