//! Time as shells read it, to hand to their cores.
//!
//! Two clocks, never mixed: a [`Monotonic`] clock for everything that times out
//! (agent loss, offer and failover timeouts, retries), which an NTP step or a changed
//! system clock cannot move; and [`unix_millis`] for stamps a person reads (a status
//! update's time, when a framework was removed).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since a process-chosen origin, from `Instant`: only differences mean
/// anything, and they never go backwards.
///
/// The origin is 1 ms before the clock was made, so that the first reading is never
/// 0 (cores use 0 for "never").
#[derive(Debug, Clone, Copy)]
pub struct Monotonic {
    origin: Instant,
}

impl Monotonic {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            origin: now
                .checked_sub(std::time::Duration::from_millis(1))
                .unwrap_or(now),
        }
    }

    /// Milliseconds since the origin.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Both clocks read together, as a core takes them with an input.
    pub fn read(&self) -> agora_proto::Now {
        agora_proto::Now {
            mono_ms: self.now_ms(),
            wall_ms: unix_millis(),
        }
    }
}

impl Default for Monotonic {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds since the Unix epoch, for timestamps that cross the wire or a person
/// reads. Never for timeouts.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_starts_above_zero_and_never_goes_back() {
        let c = Monotonic::new();
        let a = c.now_ms();
        assert!(a >= 1, "first reading {a}");
        let b = c.now_ms();
        assert!(b >= a);
    }
}
