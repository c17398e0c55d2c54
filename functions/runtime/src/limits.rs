//! Per-request limits inside a store: memory (a `ResourceLimiter`), fuel and the
//! deadline (epoch interruption), and what each one saw, for [`crate::outcome`].

use std::time::{Duration, Instant};

use agora_wasm_executor::MemoryLimiter;
use wasmtime::{Store, UpdateDeadline};

/// The limits of one request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestLimits {
    /// Bytes of linear memory, all memories of the instance together.
    pub memory: u64,
    /// `None` = unlimited.
    pub fuel: Option<u64>,
    /// Wall-clock time from instantiation to the end of the guest.
    pub timeout: Duration,
    /// Most bytes of response the guest may produce.
    pub output: u64,
}

/// The limit state kept in a request's store.
pub(crate) struct LimitState {
    pub memory: MemoryLimiter,
    /// Set by the epoch callback when it stopped the guest at its deadline.
    pub deadline_hit: bool,
}

impl LimitState {
    pub(crate) fn new(memory_limit: u64) -> Self {
        LimitState {
            memory: MemoryLimiter::new(Some(memory_limit)),
            deadline_hit: false,
        }
    }
}

/// Store data that carries a [`LimitState`].
pub(crate) trait HasLimits: Send + 'static {
    fn limits(&mut self) -> &mut LimitState;
}

/// Arms a fresh store with the request's memory limiter, fuel and deadline. Must run
/// before instantiation: a store starts with no fuel and an epoch deadline of "now",
/// and a module's `start` function runs during instantiation.
///
/// `yield_to_executor`: async guests yield to tokio at every epoch tick, so a guest
/// burning CPU does not hold a worker thread for its whole deadline.
pub(crate) fn arm<T: HasLimits>(
    store: &mut Store<T>,
    limits: &RequestLimits,
    yield_to_executor: bool,
) -> wasmtime::Result<u64> {
    store.limiter(|data| &mut data.limits().memory);
    let fuel = limits.fuel.unwrap_or(u64::MAX);
    store.set_fuel(fuel)?;
    store.set_epoch_deadline(1);
    let deadline = Instant::now() + limits.timeout;
    store.epoch_deadline_callback(move |mut ctx| {
        if Instant::now() >= deadline {
            ctx.data_mut().limits().deadline_hit = true;
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(if yield_to_executor {
            UpdateDeadline::Yield(1)
        } else {
            UpdateDeadline::Continue(1)
        })
    });
    Ok(fuel)
}

/// Fuel burnt since [`arm`] gave the store `initial`.
pub(crate) fn fuel_used<T>(store: &Store<T>, initial: u64) -> u64 {
    initial.saturating_sub(store.get_fuel().unwrap_or(initial))
}
