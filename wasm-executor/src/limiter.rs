//! The memory limiter shared by wasm tasks and function requests: one limit over all
//! of an instance's linear memories, and a bound on tables.

use wasmtime::ResourceLimiter;

/// Largest table a guest may grow to (elements).
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Enforces a memory limit (a task's, or a function request's) over all of an
/// instance's linear memories, and remembers a refusal.
pub struct MemoryLimiter {
    limit: Option<u64>,
    total: u64,
    /// The last permitted growth, undone if the growth then fails.
    pending: Option<(u64, u64)>,
    /// The limit, once a growth past it was refused.
    denied: Option<u64>,
}

impl MemoryLimiter {
    /// A limiter of `limit` bytes over all memories (`None`: unlimited).
    pub fn new(limit: Option<u64>) -> Self {
        Self {
            limit,
            total: 0,
            pending: None,
            denied: None,
        }
    }

    /// The limit, if a growth past it was refused (the first refusal: it is the one
    /// that explains the trap or exit that usually follows).
    pub fn denied(&self) -> Option<u64> {
        self.denied
    }

    /// Bytes of linear memory in use now (the most so far, as memories only grow).
    pub fn total(&self) -> u64 {
        self.total
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let (current, desired) = (current as u64, desired as u64);
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if let Some(limit) = self.limit.filter(|&l| total > l) {
            tracing::debug!(requested = total, limit, "memory growth refused");
            // Keep the first refusal: it is the one that started the failure.
            self.denied.get_or_insert(limit);
            return Ok(false);
        }
        self.total = total;
        self.pending = Some((current, desired));
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        if let Some((current, desired)) = self.pending.take() {
            self.total = self.total.saturating_sub(desired).saturating_add(current);
        }
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
