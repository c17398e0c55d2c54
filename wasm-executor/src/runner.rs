//! Runs one task's WASI preview 1 module under wasmtime with fuel, memory, time and
//! output limits, and says how it ended.
//!
//! One [`Runner`] per executor process: one `Engine` (fuel and epoch interruption on,
//! pooling allocator when the host allows it), a background thread ticking the epoch
//! every 10 ms, and a cache of compiled modules keyed by the module's sha256 (in memory,
//! and serialized on disk when a cache dir is given).
//!
//! Every way a task can end is first captured as an [`Ending`] and then turned into a
//! (state, reason, message, exit code) by [`classify`], the one place that mapping lives.
//!
//! Guests run on wasmtime's async API with asynchronous WASI: the guest's call is a
//! future raced against the task's [`KillSwitch`] and its deadline, so a kill or a
//! deadline ends a guest blocked in a host call (a sleep, a read that waits) at once:
//! dropping the call's future cancels the host call and unwinds the guest. Wasm code
//! itself is stopped by epoch interruption (its callback checks the same kill and
//! deadline every tick) and fuel. Each task still gets a thread of its own, which
//! drives its future with `Handle::block_on`: wasm runs off the runtime's workers, and
//! the hot path has no extra thread hop. Filesystem calls go through tokio's blocking
//! pool (`allow_blocking_current_thread` stays off): that costs a hop per call but is
//! what makes a blocked read cancellable (and it keeps WASI's `poll_oneoff` from
//! sleeping the thread with `std::thread::sleep`, which nothing can interrupt).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::error::Error;
use agora_executor_link::artifacts::{compat_hash, ArtifactDir, MODULE_EXT};
use agora_proto::units::{format_bytes, format_duration, GIB, KIB};
use agora_proto::v1::{ExecutorLaunch, ExecutorStatus, Reason, TaskState};
use tokio::sync::Notify;
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::limiter::{MemoryLimiter, MAX_TABLE_ELEMENTS};
use crate::output::CappedOutput;
use agora_executor_link::disk::{DiskExceeded, DiskLimits, DiskUse};

/// How often the epoch advances: the granularity of deadlines and kills.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// argv[0] the guest sees.
const ARGV0: &str = "main.wasm";
/// Pool slots: room for ~64 concurrent tasks with headroom, since a slot is held
/// until its store is dropped.
const POOL_INSTANCES: u32 = 128;
/// Largest linear memory (the whole 32-bit space).
const MAX_MEMORY: u64 = 4 * GIB;

/// Runs tasks; one per executor process, shared between task threads via `Arc`.
pub struct Runner {
    engine: Engine,
    linker: Linker<TaskCtx>,
    /// Serialized compiled modules on disk, when enabled (named with the engine's
    /// compatibility hash, so an artifact of another wasmtime or config is never
    /// even tried).
    cache: ArtifactDir,
    /// sha256 -> compiled module. Each slot has its own lock so that two launches of
    /// one new module compile it once, while other modules proceed.
    modules: Mutex<HashMap<String, Arc<Slot>>>,
    compiled: AtomicU64,
    pooling: bool,
    /// Instances that may be live at once: the pool's capacity. Tasks beyond it wait
    /// for a slot instead of failing to instantiate.
    slots: InstanceSlots,
    /// The tokio runtime that drives tasks' timers and I/O: the one `Runner::new` was
    /// called in, or a small one of the runner's own when it was called outside one.
    tokio: tokio::runtime::Handle,
    _own_runtime: Option<OwnRuntime>,
    /// Declared last so the ticker stops before the engine goes away.
    _ticker: EpochTicker,
}

/// A runtime a runner made for itself; shut down without waiting for its blocking
/// threads (one may still be stuck in a read a killed guest started).
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// How a task is told to stop: cheap to check from the epoch callback, and awaitable
/// by the future that runs the guest. Clones share one switch.
#[derive(Clone, Default)]
pub struct KillSwitch(Arc<KillInner>);

#[derive(Default)]
struct KillInner {
    killed: AtomicBool,
    notify: Notify,
}

impl KillSwitch {
    /// A switch not yet thrown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the task: a guest running wasm stops within one epoch tick, one blocked in
    /// a host call at once. Idempotent.
    pub fn kill(&self) {
        self.0.killed.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// Whether [`KillSwitch::kill`] was called.
    pub fn is_killed(&self) -> bool {
        self.0.killed.load(Ordering::SeqCst)
    }

    /// Resolves once the switch is thrown (at once if it already was).
    pub async fn killed(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a kill between the two is not lost.
            notified.as_mut().enable();
            if self.is_killed() {
                return;
            }
            notified.await;
        }
    }
}

/// A counting semaphore for blocking threads.
struct InstanceSlots {
    free: Mutex<u32>,
    freed: std::sync::Condvar,
}

struct SlotGuard<'a>(&'a InstanceSlots);

impl InstanceSlots {
    fn new(n: u32) -> Self {
        InstanceSlots {
            free: Mutex::new(n),
            freed: std::sync::Condvar::new(),
        }
    }

    fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        SlotGuard(self)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// One module cache entry: empty until compiled (a failed compile leaves it empty).
type Slot = Mutex<Option<Arc<Prepared>>>;

/// A module ready to instantiate: imports resolved against WASI once.
struct Prepared {
    pre: InstancePre<TaskCtx>,
    /// Largest initial size of the module's own memories, in bytes.
    declared_memory: Option<u64>,
}

/// Per-task store data.
pub(crate) struct TaskCtx {
    wasi: WasiP1Ctx,
    /// The sandbox's disk limit (see `disk/`).
    pub(crate) disk: crate::disk::DiskQuota,
    limiter: MemoryLimiter,
    /// Set by the epoch callback when it stops the guest, so we know why.
    interrupt: Option<Interrupt>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interrupt {
    Killed,
    Deadline,
}

/// Phase in which the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Instantiation (including the module's own `start` function).
    Instantiate,
    /// `_start`.
    Run,
}

/// What happened, before it is turned into a status by [`classify`].
enum Ending {
    /// The launch was refused before any guest code could run.
    Refused(Refusal),
    /// A guest was instantiated (or its instantiation was attempted).
    Guest(GuestEnding),
}

enum Refusal {
    InvalidTask(String),
    Fetch(String),
    Sandbox(String),
    InvalidModule(String),
}

struct GuestEnding {
    phase: Phase,
    result: Result<(), wasmtime::Error>,
    interrupt: Option<Interrupt>,
    memory_denied: Option<MemoryDenied>,
    /// A write or create of the guest's refused at its disk limit.
    disk_exceeded: Option<DiskExceeded>,
    /// What the sandbox held at the end (0 unless the guest wrote or created a file
    /// there: walking every task's sandbox would cost every launch).
    disk_used: DiskUse,
    /// The fuel the task was given; `None` when unlimited.
    fuel_limit: Option<u64>,
    /// The task's wall-clock limit, for the deadline message.
    timeout_ms: u64,
    fuel_used: u64,
    /// 0 when instantiation did not complete.
    instantiate_us: u64,
    declared_memory: Option<u64>,
    /// Linear memory at the end; wasm memories never shrink, so this is the peak.
    peak_memory: u64,
}

/// A memory growth the limiter refused.
#[derive(Clone, Copy, Debug)]
struct MemoryDenied {
    /// The task's limit, in bytes.
    limit: u64,
}

/// The verdict: what the status says.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    state: TaskState,
    reason: Reason,
    message: String,
    exit_code: Option<i32>,
}

impl Runner {
    /// Builds the engine (pooling allocator, or on-demand with a warning when the
    /// pool cannot be reserved), the WASI linker and the epoch ticker. `cache_dir`,
    /// when given, is created if needed and holds serialized compiled modules.
    pub fn new(cache_dir: Option<PathBuf>) -> crate::Result<Self> {
        let (engine, pooling) = match Engine::new(&pooling_config()) {
            Ok(engine) => (engine, true),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot set up wasmtime's pooling allocator (address-space limits?); \
                     falling back to on-demand allocation, instantiation will be slower"
                );
                let engine = Engine::new(&base_config()).map_err(|e| {
                    Error::Engine(format!("cannot create the wasmtime engine: {e}"))
                })?;
                (engine, false)
            }
        };
        let linker = wasi_linker(&engine)?;
        // The rewrite's version is part of the key: a module compiled without the
        // disk limit's wrappers (or with older ones) must never be loaded.
        let cache = ArtifactDir::new(
            cache_dir,
            compat_hash(&(
                engine.precompile_compatibility_hash(),
                crate::disk::REWRITE_VERSION,
            )),
        );
        let ticker = EpochTicker::start(&engine, "agora-epoch")?;
        let (tokio, own_runtime) = match tokio::runtime::Handle::try_current() {
            Ok(handle) => (handle, None),
            Err(_) => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("agora-wasm-io")
                    .enable_all()
                    .build()
                    .map_err(|e| {
                        Error::Engine(format!("cannot start a tokio runtime for tasks: {e}"))
                    })?;
                (runtime.handle().clone(), Some(OwnRuntime(Some(runtime))))
            }
        };
        Ok(Self {
            tokio,
            _own_runtime: own_runtime,
            engine,
            linker,
            cache,
            modules: Mutex::new(HashMap::new()),
            compiled: AtomicU64::new(0),
            pooling,
            slots: InstanceSlots::new(if pooling { POOL_INSTANCES } else { 1024 }),
            _ticker: ticker,
        })
    }

    /// How many modules this runner has compiled (cache hits, in memory or on disk,
    /// do not count).
    pub fn compiled_count(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    /// Whether the pooling allocator is in use (false after a fallback).
    pub fn uses_pooling(&self) -> bool {
        self.pooling
    }

    /// Runs one task to its end and reports how it ended. Blocking: call it on a
    /// thread of its own, never on a tokio worker (it drives [`Runner::run_async`] with
    /// the runner's runtime handle). `on_running` is called with the microseconds from
    /// this call to the end of instantiation, just before `_start` runs.
    pub fn run(
        &self,
        launch: &ExecutorLaunch,
        kill: &KillSwitch,
        on_running: impl FnOnce(u64),
    ) -> ExecutorStatus {
        self.tokio
            .block_on(self.run_async(launch, kill, on_running))
    }

    /// [`Runner::run`] as a future. Throwing `kill` ends the task within one epoch tick
    /// (10 ms) while it runs wasm code, and at once while it waits in a host call; so
    /// does its deadline. The future runs wasm when polled: poll it where a guest may
    /// hold the thread for an epoch tick (a thread of its own, as `run` does).
    pub async fn run_async(
        &self,
        launch: &ExecutorLaunch,
        kill: &KillSwitch,
        on_running: impl FnOnce(u64),
    ) -> ExecutorStatus {
        let started = Instant::now();
        let _slot = self.slots.acquire();
        let ending = self.execute(launch, kill, started, on_running).await;
        let verdict = classify(&ending);
        let (fuel_used, instantiate_us, peak, disk) = match &ending {
            Ending::Guest(g) => (g.fuel_used, g.instantiate_us, g.peak_memory, g.disk_used),
            Ending::Refused(_) => (0, 0, 0, DiskUse::default()),
        };
        ExecutorStatus {
            task_id: launch.task_id.clone(),
            state: verdict.state as i32,
            reason: verdict.reason as i32,
            message: verdict.message,
            exit_code: verdict.exit_code,
            fuel_used,
            instantiate_us,
            usage: Some(agora_proto::v1::ResourceUsage {
                fuel_used,
                wasm_peak_memory_bytes: peak,
                disk_used_bytes: disk.bytes,
                disk_files: disk.files,
                ..Default::default()
            }),
        }
    }

    async fn execute(
        &self,
        launch: &ExecutorLaunch,
        kill: &KillSwitch,
        started: Instant,
        on_running: impl FnOnce(u64),
    ) -> Ending {
        let prepared = match self.prepare(launch) {
            Ok(p) => p,
            Err(refusal) => return Ending::Refused(refusal),
        };
        let wasi = match build_wasi(launch) {
            Ok(w) => w,
            Err(refusal) => return Ending::Refused(refusal),
        };

        let memory_limit = (launch.memory_bytes > 0).then_some(launch.memory_bytes);
        let fuel_limit = (launch.fuel > 0).then_some(launch.fuel);
        let initial_fuel = fuel_limit.unwrap_or(u64::MAX);

        let mut store = Store::new(
            &self.engine,
            TaskCtx {
                wasi,
                disk: crate::disk::DiskQuota::new(
                    (!launch.root_dir.is_empty()).then(|| launch.root_dir.clone().into()),
                    DiskLimits {
                        bytes: launch.disk_bytes,
                        files: launch.max_files,
                    },
                ),
                limiter: MemoryLimiter::new(memory_limit),
                interrupt: None,
            },
        );
        store.limiter(|ctx| &mut ctx.limiter);
        // A store starts with no fuel and an epoch deadline of "now": both must be set
        // before instantiation, because a module's start function runs during it.
        if let Err(e) = store.set_fuel(initial_fuel) {
            return Ending::Refused(Refusal::InvalidTask(format!("cannot set fuel: {e}")));
        }
        store.set_epoch_deadline(1);
        // The deadline counts guest time from here, not module compilation.
        let deadline = (launch.timeout_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(launch.timeout_ms));
        // Wasm code: stopped by the epoch callback, which checks the kill and the
        // deadline every tick. It need not yield: the task has its thread to itself,
        // and the race below only matters while the guest waits in a host call.
        let kill_flag = kill.clone();
        store.epoch_deadline_callback(move |mut ctx| {
            let why = if kill_flag.is_killed() {
                Some(Interrupt::Killed)
            } else if deadline.is_some_and(|d| Instant::now() >= d) {
                Some(Interrupt::Deadline)
            } else {
                None
            };
            match why {
                Some(why) => {
                    ctx.data_mut().interrupt = Some(why);
                    Ok(UpdateDeadline::Interrupt)
                }
                None => Ok(UpdateDeadline::Continue(1)),
            }
        });

        // A kill that arrived while the module was loading: do not start it at all.
        if kill.is_killed() {
            store.data_mut().interrupt = Some(Interrupt::Killed);
            let result = Err(wasmtime::Error::msg("killed before start"));
            return Ending::Guest(self.guest_ending(
                &store,
                launch,
                &prepared,
                (Phase::Instantiate, result, 0),
                (fuel_limit, initial_fuel),
            ));
        }

        // (phase reached, microseconds to the end of instantiation)
        let mut reached = (Phase::Instantiate, 0u64);
        let guest = async {
            let instance = prepared.pre.instantiate_async(&mut store).await?;
            let instantiate_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            reached = (Phase::Run, instantiate_us);
            on_running(instantiate_us);
            // Checked when the module was prepared.
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await
        };
        // In a block of its own, so that the pinned future (and its borrow of the
        // store) is gone after it.
        let (result, interrupt) = {
            let mut guest = std::pin::pin!(guest);
            // The hot path: a guest that never waits in a host call ends in its first
            // poll, so no timer or waiter is registered for it (registering a timer from
            // this thread may wake a runtime worker to re-arm its driver).
            let first = std::future::poll_fn(|cx| Poll::Ready(guest.as_mut().poll(cx))).await;
            match first {
                Poll::Ready(result) => (result, None),
                Poll::Pending => {
                    let deadline_passed = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    // Whichever comes first. Dropping `guest` cancels the host call it
                    // waits in and unwinds the guest's stack; its store stays readable.
                    tokio::select! {
                        biased;
                        result = &mut guest => (result, None),
                        () = kill.killed() => {
                            (Err(wasmtime::Error::msg("killed")), Some(Interrupt::Killed))
                        }
                        () = deadline_passed => (
                            Err(wasmtime::Error::msg("deadline exceeded")),
                            Some(Interrupt::Deadline),
                        ),
                    }
                }
            }
        };
        if let Some(why) = interrupt {
            store.data_mut().interrupt.get_or_insert(why);
        }
        let (phase, instantiate_us) = reached;
        Ending::Guest(self.guest_ending(
            &store,
            launch,
            &prepared,
            (phase, result, instantiate_us),
            (fuel_limit, initial_fuel),
        ))
    }

    /// What a guest's store says about its ending.
    fn guest_ending(
        &self,
        store: &Store<TaskCtx>,
        launch: &ExecutorLaunch,
        prepared: &Prepared,
        (phase, result, instantiate_us): (Phase, Result<(), wasmtime::Error>, u64),
        (fuel_limit, initial_fuel): (Option<u64>, u64),
    ) -> GuestEnding {
        GuestEnding {
            phase,
            result,
            interrupt: store.data().interrupt,
            disk_exceeded: store.data().disk.exceeded(),
            disk_used: store.data().disk.final_use(),
            memory_denied: store
                .data()
                .limiter
                .denied()
                .map(|limit| MemoryDenied { limit }),
            fuel_limit,
            fuel_used: initial_fuel.saturating_sub(store.get_fuel().unwrap_or(initial_fuel)),
            timeout_ms: launch.timeout_ms,
            instantiate_us,
            declared_memory: prepared.declared_memory,
            peak_memory: store.data().limiter.total(),
        }
    }

    /// The compiled module for a launch, from memory, from the disk cache, or compiled
    /// now (and then cached in both).
    fn prepare(&self, launch: &ExecutorLaunch) -> Result<Arc<Prepared>, Refusal> {
        // The sha names a file in the cache dir: only ever accept a real sha256.
        let (sha, mut bytes) = if launch.module_sha256.is_empty() {
            let bytes = read_module(launch)?;
            (agora_proto::sha256_hex(&bytes), Some(bytes))
        } else if agora_proto::is_sha256_hex(&launch.module_sha256) {
            (launch.module_sha256.clone(), None)
        } else {
            return Err(Refusal::InvalidTask(format!(
                "module_sha256 {:?} is not a lower-case hex sha256",
                launch.module_sha256
            )));
        };

        let slot = {
            let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(modules.entry(sha.clone()).or_default())
        };
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(prepared) = slot.as_ref() {
            return Ok(Arc::clone(prepared));
        }

        let module = match self.load_cached(&sha) {
            Some(module) => module,
            None => {
                let bytes = match bytes.take() {
                    Some(b) => b,
                    None => read_module(launch)?,
                };
                let actual = agora_proto::sha256_hex(&bytes);
                if actual != sha {
                    return Err(Refusal::Fetch(format!(
                        "module {} has sha256 {actual}, expected {sha}",
                        launch.module_path
                    )));
                }
                check_header(&bytes).map_err(Refusal::InvalidModule)?;
                let module = compile(&self.engine, &bytes).map_err(Refusal::InvalidModule)?;
                self.compiled.fetch_add(1, Ordering::Relaxed);
                self.store_cached(&sha, &module);
                module
            }
        };
        check_module(&module).map_err(Refusal::InvalidModule)?;
        let pre = self.linker.instantiate_pre(&module).map_err(|e| {
            Refusal::InvalidModule(format!("cannot link module: {}", error_text(&e)))
        })?;
        let declared_memory = declared_initial_memory(&module);
        let prepared = Arc::new(Prepared {
            pre,
            declared_memory,
        });
        *slot = Some(Arc::clone(&prepared));
        Ok(prepared)
    }

    fn load_cached(&self, sha: &str) -> Option<Module> {
        // SAFETY: deserializing trusts the file to be wasmtime's own output for this
        // engine. Only this cache writes these names (atomically, by rename), and the
        // name carries the engine's compatibility hash, so that holds.
        self.cache.load(sha, MODULE_EXT, |path| unsafe {
            Module::deserialize_file(&self.engine, path)
        })
    }

    /// Best effort: a failure only costs a compile in the next process.
    fn store_cached(&self, sha: &str, module: &Module) {
        self.cache.store(sha, MODULE_EXT, module.serialize());
    }
}

/// Checks a module before submitting it: that it is a core WebAssembly module, that it
/// compiles (with the executor's engine settings, minus the pooling allocator), that it
/// only imports WASI preview 1, that it exports `_start`, and that its declared initial
/// memory fits in `memory_limit` bytes (0 = no limit). The errors are the same
/// sentences a failed task would carry.
pub fn validate_module(bytes: &[u8], memory_limit: u64) -> crate::Result<()> {
    check_before_submit(bytes, memory_limit).map_err(Error::InvalidModule)
}

fn check_before_submit(bytes: &[u8], memory_limit: u64) -> Result<(), String> {
    static VALIDATOR: OnceLock<Result<(Engine, Linker<TaskCtx>), String>> = OnceLock::new();
    let (engine, linker) = VALIDATOR
        .get_or_init(|| {
            let engine = Engine::new(&base_config()).map_err(|e| e.to_string())?;
            let linker = wasi_linker(&engine).map_err(|e| e.to_string())?;
            Ok((engine, linker))
        })
        .as_ref()
        .map_err(|e| format!("cannot create a wasmtime engine: {e}"))?;
    check_header(bytes)?;
    let module = compile(engine, bytes)?;
    check_module(&module)?;
    linker
        .instantiate_pre(&module)
        .map_err(|e| format!("cannot link module: {}", error_text(&e)))?;
    if memory_limit > 0 {
        if let Some(declared) = declared_initial_memory(&module).filter(|&d| d > memory_limit) {
            return Err(initial_memory_message(declared, memory_limit));
        }
    }
    Ok(())
}

/// The one place every ending becomes a state, reason, message and exit code.
fn classify(ending: &Ending) -> Verdict {
    let failed = |reason, message: String| Verdict {
        state: TaskState::TaskFailed,
        reason,
        message,
        exit_code: None,
    };
    let g = match ending {
        Ending::Refused(Refusal::InvalidTask(m)) => return failed(Reason::InvalidTask, m.clone()),
        Ending::Refused(Refusal::Fetch(m)) => return failed(Reason::FetchFailed, m.clone()),
        Ending::Refused(Refusal::Sandbox(m)) => return failed(Reason::SandboxFailed, m.clone()),
        Ending::Refused(Refusal::InvalidModule(m)) => {
            return failed(Reason::InvalidModule, m.clone())
        }
        Ending::Guest(g) => g,
    };
    let err = match &g.result {
        Ok(()) => {
            return Verdict {
                state: TaskState::TaskFinished,
                reason: Reason::Unspecified,
                message: String::new(),
                exit_code: None,
            }
        }
        Err(e) => e,
    };
    let exit = err.downcast_ref::<I32Exit>().map(|e| e.0);
    let trap = err.downcast_ref::<Trap>().copied();

    // Our own interruptions first: whatever the guest was doing, we stopped it.
    match g.interrupt {
        Some(Interrupt::Killed) => {
            return Verdict {
                state: TaskState::TaskKilled,
                reason: Reason::KilledByFramework,
                message: "killed".to_string(),
                exit_code: None,
            }
        }
        Some(Interrupt::Deadline) => {
            let message = format!(
                "deadline of {} exceeded",
                format_duration(Duration::from_millis(g.timeout_ms))
            );
            return failed(Reason::DeadlineExceeded, message);
        }
        None => {}
    }
    if exit == Some(0) {
        return Verdict {
            state: TaskState::TaskFinished,
            reason: Reason::Unspecified,
            message: String::new(),
            exit_code: Some(0),
        };
    }
    if trap == Some(Trap::OutOfFuel) {
        let fuel = g.fuel_limit.unwrap_or(u64::MAX);
        return failed(
            Reason::FuelExhausted,
            format!("fuel exhausted after {fuel} units"),
        );
    }
    // A refused growth explains the failure that follows it (Rust's allocator aborts
    // with a trap; other programs exit non-zero).
    // A guest refused at its disk limit that then failed failed because of it (its
    // exit code, if it exited, is kept: it is how the guest took the refusal).
    if let Some(e) = g.disk_exceeded {
        return Verdict {
            exit_code: exit,
            ..failed(Reason::DiskLimit, e.to_string())
        };
    }
    if let Some(denied) = g.memory_denied {
        let message = match (g.phase, g.declared_memory) {
            (Phase::Instantiate, Some(declared)) if declared > denied.limit => {
                initial_memory_message(declared, denied.limit)
            }
            _ => format!("memory limit of {} reached", format_bytes(denied.limit)),
        };
        return failed(Reason::MemoryLimit, message);
    }
    if let Some(code) = exit {
        return Verdict {
            state: TaskState::TaskFailed,
            reason: Reason::CommandExited,
            message: format!("exited with code {code}"),
            exit_code: Some(code),
        };
    }
    if let Some(trap) = trap {
        return failed(Reason::Trap, trap.to_string());
    }
    match g.phase {
        // Not a trap of the guest's: linking or allocation failed.
        Phase::Instantiate => failed(
            Reason::InvalidModule,
            format!("cannot instantiate module: {}", error_text(err)),
        ),
        // e.g. a WASI host function refusing a guest's bad pointer.
        Phase::Run => failed(Reason::Trap, error_text(err)),
    }
}

/// Engine settings shared by the runner and `validate_module`.
fn base_config() -> Config {
    let mut config = Config::new();
    // No `async_support`: in wasmtime 48 it is deprecated and does nothing; async
    // host functions and `*_async` calls work on any engine.
    config.consume_fuel(true).epoch_interruption(true);
    config
}

fn pooling_config() -> Config {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(POOL_INSTANCES)
        .total_memories(POOL_INSTANCES)
        .total_tables(POOL_INSTANCES)
        .max_memory_size(usize::try_from(MAX_MEMORY).unwrap_or(usize::MAX))
        .table_elements(MAX_TABLE_ELEMENTS)
        // One async stack per live instance (each guest call runs on a fiber).
        .total_stacks(POOL_INSTANCES)
        // Core modules only: no component slots needed.
        .total_component_instances(0);
    let mut config = base_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// WASI preview 1, and the disk limit's functions that rewritten guests call.
pub(crate) fn wasi_linker(engine: &Engine) -> crate::Result<Linker<TaskCtx>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |ctx: &mut TaskCtx| &mut ctx.wasi)
        .map_err(|e| Error::Engine(format!("cannot add WASI preview 1 to the linker: {e}")))?;
    crate::disk::add_to_linker(&mut linker)
        .map_err(|e| Error::Engine(format!("cannot add the disk limit to the linker: {e}")))?;
    Ok(linker)
}

/// Compiles a module rewritten for its disk limit (`disk::rewrite`; a module that
/// writes no file is compiled as it is). Errors are about the module as its author
/// wrote it.
fn compile(engine: &Engine, bytes: &[u8]) -> Result<Module, String> {
    let rewritten = match crate::disk::rewrite(bytes) {
        Ok(rewritten) => rewritten,
        Err(e) => {
            // What the rewrite cannot read wasmtime usually cannot either, and says
            // so better.
            Module::validate(engine, bytes).map_err(|e| compile_error(&e))?;
            return Err(e.to_string());
        }
    };
    match Module::from_binary(engine, &rewritten) {
        Ok(module) => Ok(module),
        Err(e) if matches!(rewritten, std::borrow::Cow::Borrowed(_)) => Err(compile_error(&e)),
        Err(e) => {
            // The rewritten module's function numbers are not the author's: report
            // the original's error; if it has none, the rewrite is at fault.
            Module::validate(engine, bytes).map_err(|e| compile_error(&e))?;
            Err(format!(
                "the module, rewritten for its disk limit, does not compile (an Agora bug; please report it): {}",
                error_text(&e)
            ))
        }
    }
}

/// The (module, name) pairs WASI preview 1 provides, for naming unknown imports.
fn wasi_imports() -> &'static std::collections::HashSet<(String, String)> {
    static NAMES: OnceLock<std::collections::HashSet<(String, String)>> = OnceLock::new();
    NAMES.get_or_init(|| {
        // Listing a linker's definitions needs a store; a throwaway engine will do.
        let linker = Engine::new(&Config::new())
            .map_err(|e| Error::Engine(e.to_string()))
            .and_then(|engine| Ok((wasi_linker(&engine)?, engine)));
        match linker {
            Ok((linker, engine)) => {
                let mut store = Store::new(&engine, TaskCtx::placeholder());
                linker
                    .iter(&mut store)
                    .map(|(module, name, _)| (module.to_string(), name.to_string()))
                    .collect()
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot list WASI preview 1 functions");
                Default::default()
            }
        }
    })
}

impl TaskCtx {
    pub(crate) fn placeholder() -> Self {
        TaskCtx {
            wasi: WasiCtxBuilder::new().build_p1(),
            disk: crate::disk::DiskQuota::none(),
            limiter: MemoryLimiter::new(None),
            interrupt: None,
        }
    }
}

/// The WASI context of one task: args, env, the sandbox as `/`, capped output files.
fn build_wasi(launch: &ExecutorLaunch) -> Result<WasiP1Ctx, Refusal> {
    let mut builder = WasiCtxBuilder::new();
    // `allow_blocking_current_thread` stays off (it must be decided before
    // `preopened_dir`, which captures it): on, a file read would block the task's
    // thread where no kill can reach it, and a p1 relative sleep would be a
    // `std::thread::sleep`. Off, both are futures that dropping cancels.
    builder.arg(ARGV0).args(&launch.args);
    let mut env: Vec<_> = launch.env.iter().collect();
    env.sort();
    builder.envs(&env);

    // An empty root_dir means no filesystem at all (like `wasmtime run` without
    // `--dir`): whether a task gets one is the agent's decision, made from the task,
    // not something to guess here from what the directory happens to contain.
    if !launch.root_dir.is_empty() {
        builder
            .preopened_dir(&launch.root_dir, "/", FsPerms::ReadWrite)
            .map_err(|e| {
                Refusal::Sandbox(format!("cannot open root dir {}: {e}", launch.root_dir))
            })?;
    }

    let limit = agora_executor_link::output::output_limit(launch.output_limit_bytes);
    let stdout = open_output(&launch.stdout_path, limit)?;
    // One sink when both go to the same file, so the cap and the order are shared.
    let stderr = if launch.stderr_path == launch.stdout_path {
        stdout.clone()
    } else {
        open_output(&launch.stderr_path, limit)?
    };
    if let Some(out) = stdout {
        builder.stdout(out);
    }
    if let Some(err) = stderr {
        builder.stderr(err);
    }
    Ok(builder.build_p1())
}

/// An empty path discards the stream.
fn open_output(path: &str, limit: u64) -> Result<Option<CappedOutput>, Refusal> {
    if path.is_empty() {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Refusal::Sandbox(format!("cannot open output file {path}: {e}")))?;
    Ok(Some(CappedOutput::new(file, limit)))
}

fn read_module(launch: &ExecutorLaunch) -> Result<Vec<u8>, Refusal> {
    if launch.module_path.is_empty() {
        return Err(Refusal::InvalidTask(
            "launch has no module_path".to_string(),
        ));
    }
    std::fs::read(&launch.module_path)
        .map_err(|e| Refusal::Fetch(format!("cannot read module {}: {e}", launch.module_path)))
}

/// Refuses what is not a core WebAssembly module before the compiler sees it, with a
/// sentence a person understands.
fn check_header(bytes: &[u8]) -> Result<(), String> {
    if !bytes.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (bad magic number)".to_string());
    }
    match bytes.get(4..8) {
        Some([1, 0, 0, 0]) => Ok(()),
        Some([_, _, 1, 0]) => Err(
            "a WebAssembly component, not a core module (Agora runs WASI preview 1 modules)"
                .to_string(),
        ),
        _ => Err("not a WebAssembly module (unsupported version)".to_string()),
    }
}

/// Imports must all be WASI preview 1 functions and `_start` must exist.
fn check_module(module: &Module) -> Result<(), String> {
    let wasi = wasi_imports();
    for import in module.imports() {
        let known = matches!(import.ty(), ExternType::Func(_))
            && wasi.contains(&(import.module().to_string(), import.name().to_string()));
        if !known {
            return Err(format!(
                "module imports {}::{}, which Agora does not provide (only WASI preview 1 is available)",
                import.module(),
                import.name()
            ));
        }
    }
    match module.get_export("_start") {
        Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => Ok(()),
        Some(_) => Err(
            "module exports `_start`, but not as a function without parameters or results"
                .to_string(),
        ),
        None => Err("module has no `_start` function (Agora runs WASI commands)".to_string()),
    }
}

/// The largest declared initial size among the module's own memories, in bytes.
fn declared_initial_memory(module: &Module) -> Option<u64> {
    // In wasm pages; custom page sizes are not enabled, so a page is 64 KiB.
    let pages = module.resources_required().max_initial_memory_size?;
    Some(pages.saturating_mul(64 * KIB))
}

fn initial_memory_message(declared: u64, limit: u64) -> String {
    format!(
        "module declares {} of initial memory, more than the task's mem of {}",
        format_bytes(declared),
        format_bytes(limit)
    )
}

fn compile_error(e: &wasmtime::Error) -> String {
    format!("module does not compile: {}", error_text(e))
}

/// An error and its causes on one line.
fn error_text(e: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let line = cause.to_string();
        let line = line.lines().next().unwrap_or("").trim().to_string();
        if !line.is_empty() && !parts.iter().any(|p| p.contains(&line)) {
            parts.push(line);
        }
    }
    parts.join(": ")
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped; deadlines are
/// counted in these ticks. Shared with the function host (agora-functions).
pub struct EpochTicker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    /// Starts the ticker thread, named `thread_name`.
    pub fn start(engine: &Engine, thread_name: &str) -> std::io::Result<Self> {
        // A weak handle: the ticker must not keep the engine alive on its own.
        let engine = engine.weak();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || {
                // Dropping the sender (or the engine going away) is the stop signal.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EPOCH_TICK) {
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// The executor shares one runner between task threads.
const _: () = {
    const fn check<T: Send + Sync>() {}
    check::<Runner>();
    check::<KillSwitch>()
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks() {
        assert_eq!(
            check_header(b"hello").unwrap_err(),
            "not a WebAssembly module (bad magic number)"
        );
        assert!(check_header(b"\0asm\x0d\0\x01\0")
            .unwrap_err()
            .contains("component"));
        assert!(check_header(b"\0asm\x01\0\0\0").is_ok());
    }
}
