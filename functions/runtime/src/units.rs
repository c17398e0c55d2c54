//! HTTP's unit of time; sizes and durations themselves are `agora_proto::units`.

use std::time::Duration;

/// Whole seconds, rounded up and at least 1: the unit of `Retry-After`.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(200)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2100)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
