//! Sizes and durations as people read them, for the reasons we send back.

use std::time::Duration;

pub(crate) const KIB: u64 = 1024;
pub(crate) const MIB: u64 = 1024 * KIB;
pub(crate) const GIB: u64 = 1024 * MIB;

/// `64MiB`, `4GiB`, `1536KiB`, `1000 bytes`.
pub(crate) fn fmt_bytes(n: u64) -> String {
    match n {
        0 => "0 bytes".to_string(),
        n if n % GIB == 0 => format!("{}GiB", n / GIB),
        n if n % MIB == 0 => format!("{}MiB", n / MIB),
        n if n % KIB == 0 => format!("{}KiB", n / KIB),
        n => format!("{n} bytes"),
    }
}

/// `300ms`, `2s`, `1.5s`, `2min`; sub-millisecond durations in µs.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return format!("{}µs", d.as_micros());
    }
    let ms = u64::try_from(ms).unwrap_or(u64::MAX);
    match ms {
        ms if ms < 1000 => format!("{ms}ms"),
        ms if ms % 60_000 == 0 => format!("{}min", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => {
            let s = format!("{}.{:03}", ms / 1000, ms % 1000);
            format!("{}s", s.trim_end_matches('0'))
        }
    }
}

/// Whole seconds, rounded up and at least 1: the unit of `Retry-After`.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes_and_durations() {
        assert_eq!(fmt_bytes(64 * MIB), "64MiB");
        assert_eq!(fmt_bytes(4 * GIB), "4GiB");
        assert_eq!(fmt_bytes(1536 * KIB), "1536KiB");
        assert_eq!(fmt_bytes(1000), "1000 bytes");
        assert_eq!(fmt_duration(Duration::from_millis(300)), "300ms");
        assert_eq!(fmt_duration(Duration::from_secs(5)), "5s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_secs(120)), "2min");
        assert_eq!(fmt_duration(Duration::from_micros(250)), "250µs");
        assert_eq!(retry_after_secs(Duration::from_millis(200)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2100)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
