//! Time as the pure cores receive it: the shell reads the clocks, the core gets the
//! readings with each input and never reads a clock itself.

/// The time of an input to a core, as its shell read it: both clocks, never mixed.
///
/// `mono_ms` (a monotonic clock: only differences mean anything) times every timeout:
/// agent loss, offer and failover timeouts, heartbeats, filters, the wait for agents
/// after a restart; a step of the system clock cannot move it. `wall_ms` (since the
/// Unix epoch) only stamps what a person reads or what must compare across restarts:
/// a status's time, when a framework was removed, when a task was told LOST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub wall_ms: u64,
}

/// Tests and simulations run one clock for both.
impl From<u64> for Now {
    fn from(ms: u64) -> Self {
        Now {
            mono_ms: ms,
            wall_ms: ms,
        }
    }
}
