//! `run_executor` over a real Unix socket, with this test playing the agent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_net::frame::{read_frame, write_frame};
use agora_proto::v1::{
    agent_to_executor, executor_to_agent, AgentToExecutor, ExecutorAck, ExecutorKill,
    ExecutorLaunch, ExecutorRegister, ExecutorShutdown, ExecutorStatus, ExecutorToAgent, Reason,
    TaskState,
};
use agora_wasm_executor::executor::run_executor_with;
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
    listener: Option<UnixListener>,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    executor: JoinHandle<agora_wasm_executor::Result<()>>,
    /// Sequence number of the last status read.
    last_seq: u64,
}

impl Agent {
    /// Listens, starts the executor, accepts its connection and checks its register.
    async fn start() -> Agent {
        Self::start_with(Duration::from_secs(60)).await
    }

    /// `start` with the executor's recovery timeout given.
    async fn start_with(recovery: Duration) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let executor = tokio::spawn(async move {
            run_executor_with(&socket, "fw-1", "ex-1", None, recovery).await
        });
        let (stream, _) = timeout(WAIT, listener.accept())
            .await
            .expect("executor connects")
            .expect("accept");
        let (rd, wr) = stream.into_split();
        let mut agent = Agent {
            dir,
            listener: Some(listener),
            rd,
            wr,
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
        self.wr.shutdown().await.expect("shutdown write half");
        let listener = self.listener.as_ref().expect("listening");
        let (stream, _) = timeout(WAIT, listener.accept())
            .await
            .expect("executor reconnects")
            .expect("accept");
        let (rd, wr) = stream.into_split();
        self.rd = rd;
        self.wr = wr;
        self.register().await
    }

    /// Acknowledges every status read so far.
    async fn ack(&mut self) {
        let seq = self.last_seq;
        self.send(agent_to_executor::Msg::Ack(ExecutorAck { seq }))
            .await;
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

    /// A status and its sequence number.
    async fn status_seq(&mut self) -> (u64, ExecutorStatus) {
        let status = self.status().await;
        (self.last_seq, status)
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

    async fn ended(self) -> agora_wasm_executor::Result<()> {
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
async fn losing_the_agent_keeps_tasks_running_and_reconnecting_resends_held_statuses() {
    let mut agent = Agent::start().await;
    // hello-1 runs and ends; its two statuses are read but not acknowledged.
    let hello = agent.launch("hello-1", "hello", &[]);
    agent.send(agent_to_executor::Msg::Launch(hello)).await;
    let (s1, running) = agent.status_seq().await;
    assert_status(
        &running,
        "hello-1",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    let (s2, done) = agent.status_seq().await;
    assert_status(
        &done,
        "hello-1",
        TaskState::TaskFinished,
        Reason::Unspecified,
    );
    assert!(s2 > s1, "{s1} then {s2}");
    // spin-1 runs until killed.
    let spin = agent.launch("spin-1", "spin", &[]);
    agent.send(agent_to_executor::Msg::Launch(spin)).await;
    let (s3, _) = agent.status_seq().await;
    // spin-2 hits its deadline soon after the agent goes away.
    let spin2 = ExecutorLaunch {
        timeout_ms: 300,
        ..agent.launch("spin-2", "spin", &[])
    };
    agent.send(agent_to_executor::Msg::Launch(spin2)).await;
    let (s4, running2) = agent.status_seq().await;
    assert_status(
        &running2,
        "spin-2",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    // None of these is acknowledged.

    // The agent goes away. Nothing is killed: the executor comes back and names every
    // task it still runs or holds statuses of.
    let reg = agent.restart().await;
    assert!(reg.reconnect, "{reg:?}");
    assert_eq!(
        (reg.framework_id.as_str(), reg.executor_id.as_str()),
        ("fw-1", "ex-1")
    );
    for id in ["hello-1", "spin-1", "spin-2"] {
        assert!(reg.task_ids.contains(&id.to_string()), "{id} in {reg:?}");
    }
    // Then every unacknowledged status again, in order, with its sequence number; and
    // spin-2's end, whether it happened while the agent was away or just now.
    let mut again = Vec::new();
    for _ in 0..5 {
        let (seq, st) = agent.status_seq().await;
        again.push((seq, st.task_id.clone(), st.state()));
    }
    assert_eq!(
        again,
        vec![
            (s1, "hello-1".to_string(), TaskState::TaskRunning),
            (s2, "hello-1".to_string(), TaskState::TaskFinished),
            (s3, "spin-1".to_string(), TaskState::TaskRunning),
            (s4, "spin-2".to_string(), TaskState::TaskRunning),
            (s4 + 1, "spin-2".to_string(), TaskState::TaskFailed),
        ]
    );
    // This time everything is acknowledged: the next reconnect sends no status again,
    // and names only the task still running.
    agent.ack().await;
    let reg = agent.restart().await;
    assert!(reg.reconnect);
    assert_eq!(reg.task_ids, vec!["spin-1".to_string()]);
    // spin-1 still runs under the new connection: a kill reaches it, and its KILLED is
    // the next frame (nothing was resent before it).
    agent
        .send(agent_to_executor::Msg::Kill(ExecutorKill {
            task_id: "spin-1".to_string(),
        }))
        .await;
    let (seq, killed) = agent.status_seq().await;
    assert_status(
        &killed,
        "spin-1",
        TaskState::TaskKilled,
        Reason::KilledByFramework,
    );
    assert_eq!(seq, s4 + 2);
    agent
        .send(agent_to_executor::Msg::Shutdown(ExecutorShutdown {}))
        .await;
    agent.ended().await.expect("shutdown is a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_while_the_agent_dies_is_not_the_end() {
    // A dying agent's listener may still take the executor's first reconnect, then
    // reset it: the executor tries again rather than giving up its tasks.
    let mut agent = Agent::start().await;
    let spin = agent.launch("spin-1", "spin", &[]);
    agent.send(agent_to_executor::Msg::Launch(spin)).await;
    assert_status(
        &agent.status().await,
        "spin-1",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    agent.wr.shutdown().await.expect("shutdown write half");
    let listener = agent.listener.as_ref().expect("listening");
    let (doomed, _) = timeout(WAIT, listener.accept())
        .await
        .expect("executor reconnects")
        .expect("accept");
    // Closed with its registration unread: the executor's side is reset.
    doomed.readable().await.expect("the registration arrives");
    drop(doomed);
    let (stream, _) = timeout(WAIT, listener.accept())
        .await
        .expect("executor tries again")
        .expect("accept");
    let (rd, wr) = stream.into_split();
    agent.rd = rd;
    agent.wr = wr;
    let reg = agent.register().await;
    assert!(reg.reconnect, "{reg:?}");
    assert_eq!(reg.task_ids, vec!["spin-1".to_string()]);
    agent
        .send(agent_to_executor::Msg::Shutdown(ExecutorShutdown {}))
        .await;
    // RUNNING again (never acknowledged), then KILLED by the shutdown.
    assert_eq!(agent.status().await.state(), TaskState::TaskRunning);
    assert_eq!(agent.status().await.state(), TaskState::TaskKilled);
    agent.ended().await.expect("shutdown is a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_come_back_in_time_gets_tasks_killed_and_the_executor_ends() {
    let mut agent = Agent::start_with(Duration::from_millis(500)).await;
    let spin = agent.launch("spin-1", "spin", &[]);
    agent.send(agent_to_executor::Msg::Launch(spin)).await;
    assert_status(
        &agent.status().await,
        "spin-1",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    // The agent is gone for good: no listener, no socket.
    let socket = agent.dir.path().join("agent.sock");
    drop(agent.listener.take());
    std::fs::remove_file(&socket).expect("remove socket");
    agent.wr.shutdown().await.expect("shutdown write half");
    let started = std::time::Instant::now();
    let err = agent
        .ended()
        .await
        .expect_err("giving up on the agent is an error");
    assert!(
        format!("{err:#}").contains("did not come back within 500ms; 1 running tasks were stopped"),
        "{err:#}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
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

/// Waits (boundedly) until `path` contains `text`: a guest writes it just before the
/// host call the test wants it blocked in.
async fn wait_for_output(path: &Path, text: &str) {
    let until = std::time::Instant::now() + WAIT;
    while !read(path).contains(text) {
        assert!(
            std::time::Instant::now() < until,
            "{} never contained {text:?}: {:?}",
            path.display(),
            read(path)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_sleeping_task_ends_it_at_once_and_leaves_the_other_running() {
    let mut agent = Agent::start().await;
    // Two tasks of one executor, both blocked in a WASI sleep: one for a minute, the
    // other for 3 s, after which it must still finish normally.
    let long = agent.launch("long", "sleep", &["60000"]);
    let short = agent.launch("short", "sleep", &["3000"]);
    agent.send(agent_to_executor::Msg::Launch(long)).await;
    agent.send(agent_to_executor::Msg::Launch(short)).await;
    let mut running = [agent.status().await, agent.status().await];
    running.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    assert_status(
        &running[0],
        "long",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    assert_status(
        &running[1],
        "short",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    wait_for_output(&agent.sandbox("long").join("stdout"), "sleeping 60000 ms").await;
    wait_for_output(&agent.sandbox("short").join("stdout"), "sleeping 3000 ms").await;

    let killed_at = std::time::Instant::now();
    agent
        .send(agent_to_executor::Msg::Kill(ExecutorKill {
            task_id: "long".to_string(),
        }))
        .await;
    let killed = agent.status().await;
    let took = killed_at.elapsed();
    println!("a task sleeping 60 s ended {took:?} after its kill");
    assert_status(
        &killed,
        "long",
        TaskState::TaskKilled,
        Reason::KilledByFramework,
    );
    assert_eq!(killed.message, "killed");
    // Well before the other task's 3 s sleep ends: the kill did not wait for it.
    assert!(took < Duration::from_secs(2), "{took:?}");

    let finished = agent.status().await;
    assert_status(
        &finished,
        "short",
        TaskState::TaskFinished,
        Reason::Unspecified,
    );
    assert!(
        read(&agent.sandbox("short").join("stdout")).contains("slept 3000 ms"),
        "{}",
        read(&agent.sandbox("short").join("stdout"))
    );
    assert!(!read(&agent.sandbox("long").join("stdout")).contains("slept"));
    agent
        .send(agent_to_executor::Msg::Shutdown(ExecutorShutdown {}))
        .await;
    agent.ended().await.expect("shutdown is a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_sleeping_task_at_once() {
    let mut agent = Agent::start().await;
    let long = agent.launch("long", "sleep", &["60000"]);
    agent.send(agent_to_executor::Msg::Launch(long)).await;
    assert_status(
        &agent.status().await,
        "long",
        TaskState::TaskRunning,
        Reason::Unspecified,
    );
    wait_for_output(&agent.sandbox("long").join("stdout"), "sleeping 60000 ms").await;
    let asked = std::time::Instant::now();
    agent
        .send(agent_to_executor::Msg::Shutdown(ExecutorShutdown {}))
        .await;
    assert_status(
        &agent.status().await,
        "long",
        TaskState::TaskKilled,
        Reason::KilledByFramework,
    );
    agent.ended().await.expect("shutdown is a clean exit");
    let took = asked.elapsed();
    println!("an executor with a task sleeping 60 s shut down in {took:?}");
    // Not the 10 s grace after which the executor gives up on its tasks.
    assert!(took < Duration::from_secs(5), "{took:?}");
}
