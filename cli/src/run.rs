//! `agora run`: a small framework, written with the sdk like any other, that runs one
//! WebAssembly module as a task and waits for it (what mesos-execute is to Mesos).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agora_proto::resources::parse_cpus;
use agora_proto::units::{parse_duration_ms, parse_mib_size};
use agora_proto::v1::{CommandInfo, InputFile, PendingTask, Reason, WasmModule};
use agora_proto::Resources;
use agora_sdk::{
    Client, ClientConfig, Event, FrameworkInfo, Scheduler, TaskInfo, TaskState, TaskStatus,
};
use anyhow::Context;
use clap::Args;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};

use crate::Target;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    target: Target,
    /// CPUs for the task (fractions allowed).
    #[arg(long, default_value = "0.1")]
    cpus: String,
    /// Memory for the task; also the guest's linear memory limit (e.g. 64MiB, 1GiB;
    /// a bare number is MiB, as `mem:` in --resources).
    #[arg(long, default_value = "64MiB")]
    mem: String,
    /// Disk for the task's sandbox (inputs, files it writes), e.g. 256MiB, 2GiB; a bare
    /// number is MiB, as `disk:` in --resources. A wasm guest writing past it gets
    /// ENOSPC; a native task over it is killed.
    #[arg(long, default_value = "256MiB")]
    disk: String,
    /// Instruction fuel; the task fails when it runs out. 0 means unlimited.
    #[arg(long, default_value_t = 0)]
    fuel: u64,
    /// Wall-clock limit, e.g. 30s, 500ms, 2m. 0 means none.
    #[arg(long, default_value = "0")]
    timeout: String,
    /// Environment variable for the guest (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Copy a local file or directory into the task's sandbox at DEST (default: its base
    /// name; `DIR:/` puts a directory's contents at the sandbox root). Repeatable.
    #[arg(long = "input", value_name = "PATH[:DEST]")]
    inputs: Vec<String>,
    /// Give the guest no filesystem (no preopened directory) instead of its sandbox
    /// as "/".
    #[arg(long, conflicts_with = "inputs")]
    no_fs: bool,
    /// Task name shown by `agora ps`.
    #[arg(long)]
    name: Option<String>,
    /// Only run on agents that meet this constraint (repeatable): `zone=edge-1`,
    /// `zone:edge-1`, `gpu` (attribute exists), `zone~edge-*`, `hostname~edge-*`.
    #[arg(long = "constraint", value_name = "CONSTRAINT")]
    constraints: Vec<String>,
    /// Role to run under.
    #[arg(long, default_value = "*")]
    role: String,
    /// Native tasks: the user the command runs as on the agent (the framework's
    /// user). Default: the agent's --task-user (`nobody` unless set). `root` runs
    /// only on agents started with --allow-root-tasks.
    #[arg(long)]
    user: Option<String>,
    /// Send the module as it is, without checking it locally first.
    #[arg(long, hide = true)]
    skip_validation: bool,
    /// Run a native command through `/bin/sh -c` instead of a module (native
    /// executor, in a cgroup of its own).
    #[arg(long, conflicts_with_all = ["exec", "module", "fuel", "no_fs"])]
    command: Option<String>,
    /// Run a native program with the arguments after `--` (no shell).
    #[arg(long, conflicts_with_all = ["module", "fuel", "no_fs"])]
    exec: Option<String>,
    /// Native tasks: time between SIGTERM and SIGKILL when the task is killed.
    #[arg(long, default_value = "3s")]
    kill_grace: String,
    /// The WebAssembly module (WASI preview 1 command).
    #[arg(required_unless_present_any = ["command", "exec"])]
    module: Option<PathBuf>,
    /// Arguments for the guest (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

/// Files to place in the sandbox: (local path, sandbox-relative dest), plus empty dirs.
/// A destination that is absolute (other than `/`, the sandbox root, for a
/// directory's contents) or holds `..` is refused, and so is a symlink, given or met
/// in a directory: it would upload whatever it points to. The agent checks the
/// destinations again.
fn expand_inputs(specs: &[String]) -> anyhow::Result<(Vec<(PathBuf, String)>, Vec<String>)> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for spec in specs {
        let (src, dest) = match spec.rsplit_once(':') {
            Some((s, d)) if !s.is_empty() => (PathBuf::from(s), Some(d.to_string())),
            _ => (PathBuf::from(spec), None),
        };
        let meta = std::fs::symlink_metadata(&src)
            .with_context(|| format!("--input {spec}: cannot read {}", src.display()))?;
        if meta.file_type().is_symlink() {
            anyhow::bail!(
                "--input {spec}: {} is a symlink; give the file or directory it points to",
                src.display()
            );
        }
        let base = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = match dest {
            Some(d) if d == "/" => String::new(),
            Some(d) if d.starts_with('/') => anyhow::bail!(
                "--input {spec}: the destination {d} is absolute; give a path relative to the sandbox (or `/` for a directory's contents)"
            ),
            Some(d) => d,
            None => base,
        };
        let dest = dest.trim_end_matches('/').to_string();
        if dest.split('/').any(|c| c == "..") {
            anyhow::bail!("--input {spec}: the destination {dest} contains `..`; give a path inside the sandbox");
        }
        if meta.is_dir() {
            walk(&src, &dest, &mut files, &mut dirs)?;
        } else {
            if dest.is_empty() {
                anyhow::bail!("--input {spec}: a file needs a destination name, not `/`");
            }
            files.push((src, dest));
        }
    }
    Ok((files, dirs))
}

fn walk(
    dir: &Path,
    dest: &str,
    files: &mut Vec<(PathBuf, String)>,
    dirs: &mut Vec<String>,
) -> anyhow::Result<()> {
    if !dest.is_empty() {
        dirs.push(dest.to_string());
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let d = if dest.is_empty() {
            name
        } else {
            format!("{dest}/{name}")
        };
        let ft = e.file_type()?;
        if ft.is_symlink() {
            anyhow::bail!(
                "--input: {} is a symlink; inputs may not contain symlinks (copy what it points to instead)",
                e.path().display()
            );
        } else if ft.is_dir() {
            walk(&e.path(), &d, files, dirs)?;
        } else if ft.is_file() {
            files.push((e.path(), d));
        }
    }
    Ok(())
}

/// A task's short id, as people see it.
pub fn new_task_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Inputs are staged into the sandbox and count against `--disk`: refuse them here,
/// before anything is uploaded, when they cannot fit.
fn check_inputs_fit(inputs: &[(PathBuf, String)], disk: i64) -> anyhow::Result<()> {
    use agora_proto::resources::format_bytes;
    let mut total: u64 = 0;
    for (path, _) in inputs {
        let size = std::fs::metadata(path)
            .with_context(|| format!("--input: cannot read {}", path.display()))?
            .len();
        total = total.saturating_add(size);
        if total > disk as u64 {
            let size = format_bytes(size.min(i64::MAX as u64) as i64);
            let total = format_bytes(total.min(i64::MAX as u64) as i64);
            anyhow::bail!(
                "--input {} ({size}) does not fit in the task's --disk {}: the inputs come to {total} with it; ask for more --disk",
                path.display(),
                format_bytes(disk)
            );
        }
    }
    Ok(())
}

pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let milli_cpus = parse_cpus(&a.cpus).filter(|c| *c > 0).ok_or_else(|| {
        anyhow::anyhow!(
            "--cpus {} is not a positive number of cpus (e.g. 0.1, 2)",
            a.cpus
        )
    })?;
    let mem = parse_mib_size(&a.mem).map_err(|e| anyhow::anyhow!("--mem: {e}"))?;
    let mem = i64::try_from(mem).map_err(|_| anyhow::anyhow!("--mem {} is too large", a.mem))?;
    if mem <= 0 {
        anyhow::bail!("--mem must be above zero");
    }
    let disk = parse_mib_size(&a.disk).map_err(|e| anyhow::anyhow!("--disk: {e}"))?;
    let disk = i64::try_from(disk)
        .ok()
        .filter(|d| *d <= agora_proto::resources::MAX_AMOUNT)
        .ok_or_else(|| anyhow::anyhow!("--disk {} is too large", a.disk))?;
    if disk <= 0 {
        anyhow::bail!("--disk must be above zero");
    }
    let timeout_ms = parse_duration_ms(&a.timeout).context("--timeout")?;
    let mut env = BTreeMap::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--env {kv}: expected K=V"))?;
        env.insert(k.to_string(), v.to_string());
    }
    let kill_grace_ms = parse_duration_ms(&a.kill_grace).context("--kill-grace")?;
    let command = match (&a.command, &a.exec) {
        (Some(script), None) => Some(CommandInfo {
            shell: true,
            value: script.clone(),
            arguments: a.args.clone(),
            kill_grace_seconds: Some(kill_grace_ms as f64 / 1000.0),
            timeout_ms,
            // The framework's user (--user) applies.
            user: String::new(),
        }),
        (None, Some(program)) => Some(CommandInfo {
            shell: false,
            value: program.clone(),
            arguments: a.args.clone(),
            kill_grace_seconds: Some(kill_grace_ms as f64 / 1000.0),
            timeout_ms,
            // The framework's user (--user) applies.
            user: String::new(),
        }),
        _ => None,
    };
    let module_bytes = match (&a.module, &command) {
        (Some(path), None) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            if !a.skip_validation {
                agora_wasm_executor::runner::validate_module(&bytes, mem as u64)
                    .map_err(|e| anyhow::anyhow!("{} cannot run: {e}", path.display()))?;
            }
            Some(bytes)
        }
        _ => None,
    };
    let (inputs, dirs) = expand_inputs(&a.inputs)?;
    check_inputs_fit(&inputs, disk)?;

    let cfg = ClientConfig::discover(a.target.master.as_deref(), a.target.config.as_deref())?;
    let client = Client::connect(&cfg).await?;
    let module = match &module_bytes {
        Some(bytes) => {
            let (sha256, size) = client
                .upload_bytes(bytes)
                .await
                .context("uploading the module")?;
            Some(WasmModule {
                sha256,
                size,
                fuel: a.fuel,
                timeout_ms,
            })
        }
        None => None,
    };
    let mut input_files = Vec::new();
    for (path, dest) in &inputs {
        let (s, n) = client
            .upload_file(path)
            .await
            .with_context(|| format!("uploading {}", path.display()))?;
        let executable = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        };
        input_files.push(InputFile {
            sha256: s,
            size: n,
            dest: dest.clone(),
            executable,
        });
    }

    let task_id = new_task_id();
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| match (&command, &a.module) {
            (Some(c), _) => c
                .value
                .split_whitespace()
                .next()
                .and_then(|w| w.rsplit('/').next())
                .unwrap_or("command")
                .to_string(),
            (None, Some(m)) => m
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "task".into()),
            (None, None) => "task".into(),
        });
    let mut ask = Resources::cpus_mem(milli_cpus, mem);
    ask.add_scalar(agora_proto::resources::DISK, "", disk);
    let task = TaskInfo {
        task_id: task_id.clone(),
        name: name.clone(),
        resources: ask.to_proto(),
        args: if command.is_some() {
            Vec::new()
        } else {
            a.args.clone()
        },
        module,
        command,
        env: env.into_iter().collect(),
        inputs: input_files,
        dirs,
        no_filesystem: a.no_fs,
        ..Default::default()
    };
    let mut sched = client
        .subscribe(FrameworkInfo {
            name: format!("agora-run {name}"),
            // Not $USER: who runs `agora run` here says nothing about the users of
            // the agents; the agent's default applies unless --user names one.
            user: a.user.clone().unwrap_or_default(),
            roles: vec![a.role.clone()],
            failover_timeout_seconds: 0.0,
            offer_constraints: a.constraints.clone(),
            // A task on an agent cut off from the master is UNREACHABLE, not LOST: it
            // keeps running and its output is printed when the agent returns.
            partition_aware: true,
            ..Default::default()
        })
        .await?;
    sched
        .set_pending(vec![PendingTask {
            task_id: task_id.clone(),
            name,
            resources: ask.to_proto(),
        }])
        .await?;
    let outcome = drive(&client, &mut sched, task, &ask, &a.role).await;
    // Confirmed before exiting: a TEARDOWN still queued when the process ends is
    // lost, and the master would keep the framework for its failover timeout.
    if let Err(e) = sched.teardown_and_wait(Duration::from_secs(2)).await {
        tracing::warn!("{e}");
    }
    outcome
}

struct Tail {
    stdout: u64,
    stderr: u64,
}

impl Tail {
    /// Copies what is new in the task's stdout and stderr to ours.
    async fn pump(&mut self, client: &Client, task_id: &str) -> anyhow::Result<bool> {
        let mut moved = false;
        for (path, off) in [("stdout", &mut self.stdout), ("stderr", &mut self.stderr)] {
            loop {
                let (data, size) = client.read_file(task_id, path, *off, 1 << 20).await?;
                if data.is_empty() {
                    break;
                }
                *off += data.len() as u64;
                moved = true;
                if path == "stdout" {
                    let mut o = tokio::io::stdout();
                    o.write_all(&data).await?;
                    o.flush().await?;
                } else {
                    let mut e = tokio::io::stderr();
                    e.write_all(&data).await?;
                    e.flush().await?;
                }
                if *off >= size {
                    break;
                }
            }
        }
        Ok(moved)
    }
}

fn status_line(s: &TaskStatus) -> String {
    let state = s.state().short_name();
    if s.message.is_empty() {
        format!("task {} {state}", s.task_id)
    } else {
        format!("task {} {state}: {}", s.task_id, s.message)
    }
}

async fn drive(
    client: &Client,
    sched: &mut Scheduler,
    task: TaskInfo,
    ask: &Resources,
    role: &str,
) -> anyhow::Result<ExitCode> {
    let task_id = task.task_id.clone();
    // Kept to launch again if the launch is dropped (the master connection broke
    // before it arrived).
    let original = task.clone();
    let pending = PendingTask {
        task_id: task_id.clone(),
        name: task.name.clone(),
        resources: ask.to_proto(),
    };
    let mut task = Some(task);
    let mut tail = Tail {
        stdout: 0,
        stderr: 0,
    };
    let mut running = false;
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    // SIGINT (Ctrl-C) and SIGTERM (`timeout`, a supervisor) end the task, then the
    // run, with 128 + the signal's number as a shell would report.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut interrupted: Option<u8> = None;
    // How long a killed task may take to report its end before the run gives up
    // waiting (the TEARDOWN that follows kills it anyway).
    let mut give_up = std::pin::pin!(tokio::time::sleep(Duration::from_secs(86_400 * 365)));
    // While no offer fits, say why (from the master's explanation), and again if
    // the reason changes.
    let mut explain = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(5),
    );
    let mut last_why = String::new();
    loop {
        let ev = tokio::select! {
            ev = sched.next_event() => ev,
            _ = explain.tick(), if task.is_some() => {
                if let Ok(tasks) = client.list_tasks(false).await {
                    if let Some(t) = tasks.iter().find(|t| t.task_id == task_id && !t.waiting_for.is_empty()) {
                        if t.waiting_for != last_why {
                            eprintln!("task {task_id} PENDING: {}", t.waiting_for);
                            last_why = t.waiting_for.clone();
                        }
                    }
                }
                continue;
            }
            _ = poll.tick(), if running => {
                if let Err(e) = tail.pump(client, &task_id).await {
                    tracing::debug!("log tail: {e:#}");
                }
                continue;
            }
            sig = async {
                tokio::select! {
                    _ = sigint.recv() => 130u8,
                    _ = sigterm.recv() => 143u8,
                }
            }, if interrupted.is_none() => {
                interrupted = Some(sig);
                if task.is_some() {
                    // Not launched: the TEARDOWN that follows removes it from the
                    // master's waiting list.
                    eprintln!("agora: interrupted; task {task_id} was not launched");
                    return Ok(ExitCode::from(sig));
                }
                eprintln!("agora: interrupted; killing task {task_id}");
                sched.kill(&task_id).await?;
                give_up
                    .as_mut()
                    .reset(tokio::time::Instant::now() + Duration::from_secs(1));
                continue;
            }
            _ = &mut give_up, if interrupted.is_some() => {
                eprintln!("agora: task {task_id} did not report its end within 1 s of the kill; tearing the framework down");
                return Ok(ExitCode::from(interrupted.unwrap_or(130)));
            }
        };
        let Some(ev) = ev else {
            anyhow::bail!("lost the connection to the master while task {task_id} was in flight; see `agora ps --all`");
        };
        match ev {
            Event::Offers(offers) => {
                let mut ids: Vec<String> = offers.iter().map(|o| o.offer_id.clone()).collect();
                // What the task takes from the offer: its role's reservation
                // first, then unreserved resources.
                let fit = task.as_ref().and_then(|_| {
                    offers.iter().enumerate().find_map(|(i, o)| {
                        let have = Resources::from_proto(&o.resources).ok()?;
                        have.take_for_role(ask, role).map(|take| (i, take))
                    })
                });
                // `fit` is only found while the task waits.
                if let Some((i, take, mut t)) =
                    fit.and_then(|(i, take)| Some((i, take, task.take()?)))
                {
                    let offer = ids.remove(i);
                    t.resources = take.to_proto();
                    sched.accept(vec![offer], vec![t], None).await?;
                    eprintln!("task {task_id} STAGING");
                }
                if !ids.is_empty() {
                    // Short filter while we still wait, so freed resources come back soon.
                    let refuse = if task.is_some() { 1.0 } else { 3600.0 };
                    sched.decline(ids, Some(refuse)).await?;
                }
                if task.is_none() {
                    sched.suppress().await?;
                }
            }
            Event::Update(s) if s.task_id == task_id && s.state() == TaskState::TaskDropped => {
                // Never reached the master: place it again.
                eprintln!("{}", status_line(&s));
                task = Some(original.clone());
                sched.set_pending(vec![pending.clone()]).await?;
                sched.revive().await?;
            }
            Event::Update(s)
                if s.task_id == task_id && s.state() == TaskState::TaskUnknown && !running =>
            {
                // Asked after a reconnect: the master (a new leader, or restarted,
                // with its agents back) knows nothing of a task that never ran: its
                // launch died with the old master before any agent had it. Place it
                // again, as for a dropped launch.
                eprintln!("{}; launching it again", status_line(&s));
                task = Some(original.clone());
                sched.set_pending(vec![pending.clone()]).await?;
                sched.revive().await?;
            }
            Event::Update(s) if s.task_id == task_id && s.state() == TaskState::TaskUnknown => {
                // It ran, and now no master knows it: it is gone with its agent.
                eprintln!("{}", status_line(&s));
                return Ok(ExitCode::from(1));
            }
            Event::Update(s) if s.task_id == task_id => {
                sched.acknowledge(&s).await?;
                let state = s.state();
                if state == TaskState::TaskRunning {
                    running = true;
                }
                if state.is_terminal() {
                    // The sandbox is final now: copy whatever output is left.
                    if let Err(e) = tail.pump(client, &task_id).await {
                        eprintln!("agora: could not read the task's output: {e:#}");
                    }
                    eprintln!("{}", status_line(&s));
                    if let Some(sig) = interrupted {
                        return Ok(ExitCode::from(sig));
                    }
                    return Ok(exit_code(&s));
                }
                eprintln!("{}", status_line(&s));
            }
            Event::Update(s) => sched.acknowledge(&s).await?,
            Event::Rescind(_) | Event::Heartbeat | Event::Message { .. } => {}
            // A refused call: the task's own update (TASK_ERROR or TASK_DROPPED, with
            // the same words) follows and ends the run; a broken connection ends
            // the event stream.
            Event::Error(e) => eprintln!("agora: the master refused a call: {e}"),
            Event::Failure {
                agent_id,
                executor_id: None,
                message,
                ..
            } => eprintln!("agora: agent {agent_id} failed: {message}"),
            Event::Failure { .. } => {}
            Event::Disconnected(why) => {
                eprintln!("agora: lost the master ({why}); reconnecting")
            }
            Event::Reconnected => {
                eprintln!("agora: reconnected to the master");
                if task.is_some() {
                    // A restarted master forgot what we wait for.
                    sched.set_pending(vec![pending.clone()]).await?;
                    sched.revive().await?;
                } else {
                    sched.reconcile(vec![task_id.clone()]).await?;
                }
            }
        }
    }
}

/// The guest's exit code when it exited; otherwise a code that says how it ended.
fn exit_code(s: &TaskStatus) -> ExitCode {
    match (s.state(), s.exit_code) {
        (TaskState::TaskFinished, _) => ExitCode::SUCCESS,
        (_, Some(c)) if (1..=255).contains(&c) => ExitCode::from(c as u8),
        (TaskState::TaskKilled, _) => ExitCode::from(137),
        // The access policy refused the launch.
        (TaskState::TaskError, _) if s.message.contains(crate::DENIED_PREFIX) => {
            ExitCode::from(crate::EXIT_DENIED)
        }
        _ if s.reason() == Reason::InvalidModule || s.reason() == Reason::InvalidTask => {
            ExitCode::from(2)
        }
        _ => ExitCode::from(1),
    }
}
