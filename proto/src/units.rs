//! Sizes and durations as people write and read them: the one parser and the one
//! formatter of each, shared by every crate (flags, limits, status messages, HTTP
//! answers, listings).
//!
//! Quantities are fixed-point integers (bytes; nanoseconds or milliseconds), and so is
//! the parsing: `1.5GiB` is read as the digits `1` and `5`, scaled with checked
//! integer arithmetic, never through a float. A fraction finer than the result's
//! resolution (a byte; a nanosecond, or a millisecond for [`parse_duration_ms`]) is
//! rounded to the nearest, halves away from zero, as the float parsers this replaces
//! did (`0.1KiB` is 102 bytes). Hostile input (empty, negative, `1.2.3`, `1e9`,
//! `nan`, `inf`, a 400-digit number) is an [`UnitError`] that names it, never a panic.
//!
//! The output has one style: the number, then the unit, no space between them.
//!
//! - Sizes ([`format_bytes`]): exact in the largest of B, KiB, MiB, GiB, TiB that
//!   divides the size when that takes at most four digits (`0B`, `1000B`, `1536KiB`,
//!   `64MiB`, `1536MiB`, `4GiB`); otherwise one decimal of the largest unit not above
//!   it, truncated, so that an amount is never shown larger than it is (`12.8MiB`,
//!   `14.5GiB`). A decimal therefore marks a size that is not a small whole number of
//!   some unit; the exact forms read back to the same number of bytes.
//! - Durations ([`format_duration`]): whole hours as `2h`, whole minutes as `2min`,
//!   otherwise seconds with up to three decimals, truncated to the millisecond
//!   (`5s`, `1.5s`, `1.234s`, `90s`); below a second `300ms` / `1.5ms`, below a
//!   millisecond `250µs`, below a microsecond `10ns` (up to three decimals each);
//!   zero is `0s`. Every form reads back with [`parse_duration`].

use std::fmt;
use std::time::Duration;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// What was being parsed, for the messages of [`UnitError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Size,
    Duration,
}

impl Quantity {
    fn units(self) -> &'static str {
        match self {
            Quantity::Size => "B, KiB, MiB, GiB, TiB (or kB, MB, GB, TB, powers of 1000)",
            Quantity::Duration => {
                "ms, s, m (or min), h, d, us or ns, e.g. 30s, 500ms, 2m, 30d; a bare number is seconds"
            }
        }
    }

    fn example(self) -> &'static str {
        match self {
            Quantity::Size => "64MiB, 1.5GiB, 512MB or 1048576 (bytes)",
            Quantity::Duration => "30s, 500ms, 2m, 1.5h or 30 (seconds)",
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantity::Size => "size",
            Quantity::Duration => "duration",
        })
    }
}

/// A size or duration that cannot be read: says which input and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty {what}; write a number and a unit, e.g. {}", what.example())]
    Empty { what: Quantity },
    #[error("{what} `{input}` is negative; write e.g. {}", what.example())]
    Negative { what: Quantity, input: String },
    #[error(
        "{what} `{input}` is not a number with a unit; write digits with at most one `.` \
         (no exponent, no sign) and a unit, e.g. {}",
        what.example()
    )]
    NotANumber { what: Quantity, input: String },
    #[error("{what} `{input}` has an unknown unit `{unit}`; use {}", what.units())]
    UnknownUnit {
        what: Quantity,
        input: String,
        unit: String,
    },
    #[error("{what} `{input}` has more than {MAX_DECIMALS} decimal places")]
    TooPrecise { what: Quantity, input: String },
    #[error("{what} `{input}` is too large; the most is {max}")]
    TooLarge {
        what: Quantity,
        input: String,
        max: &'static str,
    },
}

/// Decimal places read at most (after trailing zeros); keeps the arithmetic in u128.
const MAX_DECIMALS: usize = 18;

/// Parses a memory or disk amount as flags take it: a size with a unit (`64MiB`,
/// `1.5GiB`), or a bare number of MiB, as `mem:2048` in `--resources` and in Mesos.
/// Never a bare number of bytes: `--mem 1` is one MiB, not one byte.
pub fn parse_mib_size(input: &str) -> Result<u64, UnitError> {
    let t = input.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return parse_size(&format!("{t}MiB")).map_err(|e| match e {
            UnitError::TooLarge { what, max, .. } => UnitError::TooLarge {
                what,
                input: input.into(),
                max,
            },
            UnitError::TooPrecise { what, .. } => UnitError::TooPrecise {
                what,
                input: input.into(),
            },
            other => other,
        });
    }
    parse_size(input)
}

/// Parses a byte size: `64MiB`, `1.5GiB`, `512MB`, `1k`, `2 GiB`, or a bare number of
/// bytes. Units are case-insensitive: B; k, kB (1000), KiB (1024); M, MB, MiB; G,
/// GB, GiB; T, TB, TiB. A fraction of a byte is rounded to the nearest byte.
///
/// The result is a `u64`: a size cannot be negative, and `u64` is what limits and the
/// wire carry and what [`format_bytes`] takes, so every size round-trips. (Resources
/// keeps `i64` amounts, for subtraction, and converts at its one call site.)
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let what = Quantity::Size;
    let (num, unit) = split(what, input)?;
    let per: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => KIB.into(),
        "m" | "mb" => 1_000_000,
        "mib" => MIB.into(),
        "g" | "gb" => 1_000_000_000,
        "gib" => GIB.into(),
        "t" | "tb" => 1_000_000_000_000,
        "tib" => TIB.into(),
        _ => return Err(unknown_unit(what, input, unit)),
    };
    let bytes = num.scale(per, 1);
    bytes
        .and_then(|b| u64::try_from(b).ok())
        .ok_or_else(|| UnitError::TooLarge {
            what,
            input: input.into(),
            max: "18446744073709551615B (16EiB less a byte)",
        })
}

const NANOS_PER_MS: u128 = 1_000_000;

/// Parses a duration: `30s`, `500ms`, `2m`, `2min`, `1.5h`, `250us`, `250µs`, `10ns`,
/// `1 s`, or a bare number of seconds (`30`, `0.5`), as `agora run --timeout 30` has
/// always meant. Exact to the nanosecond (a finer fraction is rounded to the nearest).
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    const MOST: u128 = u64::MAX as u128 * 1_000_000_000 + 999_999_999;
    let nanos = parse_duration_in(input, 1, MOST, "18446744073709551615.999999999s")?;
    let secs = u64::try_from(nanos / 1_000_000_000).expect("bounded by parse_duration_in");
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// [`parse_duration`] in whole milliseconds (rounded to the nearest), the unit of the
/// wire's `*_ms` fields and of the flags that fill them.
pub fn parse_duration_ms(input: &str) -> Result<u64, UnitError> {
    let most = u64::MAX.into();
    let ms = parse_duration_in(input, NANOS_PER_MS, most, "18446744073709551615ms")?;
    Ok(u64::try_from(ms).expect("bounded by parse_duration_in"))
}

/// The duration in units of `resolution` nanoseconds, at most `most` of them
/// (written `max`).
fn parse_duration_in(
    input: &str,
    resolution: u128,
    most: u128,
    max: &'static str,
) -> Result<u128, UnitError> {
    let what = Quantity::Duration;
    let (num, unit) = split(what, input)?;
    let per: u128 = match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => return Err(unknown_unit(what, input, unit)),
    };
    num.scale(per, resolution)
        .filter(|v| *v <= most)
        .ok_or_else(|| UnitError::TooLarge {
            what,
            input: input.into(),
            max,
        })
}

/// A non-negative decimal number as written: `whole.frac`, `frac` holding `places`
/// digits (trailing zeros dropped).
struct Decimal {
    whole: u128,
    frac: u128,
    places: u32,
}

impl Decimal {
    /// `self * per / resolution`, rounded to the nearest (halves up); `None` when it
    /// does not fit a u128.
    fn scale(&self, per: u128, resolution: u128) -> Option<u128> {
        let pow = 10u128.pow(self.places);
        let whole = self.whole.checked_mul(per)?;
        let (q1, r1) = (whole / resolution, whole % resolution);
        // frac < 10^18 and per < 2^42, resolution <= 10^6: no overflow below.
        let frac = self.frac * per;
        let den = pow * resolution;
        let (q2, r2) = (frac / den, frac % den);
        let rest = r1 * pow + r2; // < 2 * den
        let (carry, rest) = (rest / den, rest % den);
        let round = u128::from(rest * 2 >= den);
        q1.checked_add(q2 + carry + round)
    }
}

/// The number and the unit of `input` (trimmed; spaces allowed between them).
fn split(what: Quantity, input: &str) -> Result<(Decimal, &str), UnitError> {
    let t = input.trim();
    let not_a_number = || UnitError::NotANumber {
        what,
        input: input.into(),
    };
    if t.is_empty() {
        return Err(UnitError::Empty { what });
    }
    if t.starts_with('-') {
        return Err(UnitError::Negative {
            what,
            input: input.into(),
        });
    }
    let end = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = (&t[..end], t[end..].trim_start());
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(not_a_number()); // `MiB`, `.`, `nan`, `inf`, `1.2.3`
    }
    // `1e9`, `1E-3`: an exponent, not a unit.
    let mut after = unit.chars();
    if matches!(after.next(), Some('e' | 'E'))
        && after
            .next()
            .is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+')
    {
        return Err(not_a_number());
    }
    let mut w: u128 = 0;
    for b in whole.bytes() {
        w = w
            .checked_mul(10)
            .and_then(|w| w.checked_add(u128::from(b - b'0')))
            .ok_or_else(|| UnitError::TooLarge {
                what,
                input: input.into(),
                max: match what {
                    Quantity::Size => "18446744073709551615B (16EiB less a byte)",
                    Quantity::Duration => "18446744073709551615s",
                },
            })?;
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > MAX_DECIMALS {
        return Err(UnitError::TooPrecise {
            what,
            input: input.into(),
        });
    }
    let f = frac
        .bytes()
        .fold(0u128, |f, b| f * 10 + u128::from(b - b'0'));
    Ok((
        Decimal {
            whole: w,
            frac: f,
            places: frac.len() as u32,
        },
        unit,
    ))
}

fn unknown_unit(what: Quantity, input: &str, unit: &str) -> UnitError {
    UnitError::UnknownUnit {
        what,
        input: input.into(),
        unit: unit.into(),
    }
}

/// A byte count as people read it: `0B`, `1000B`, `1536KiB`, `64MiB`, `4GiB`; a
/// decimal (truncated) for sizes that are no small whole number of a unit: `12.8MiB`.
/// See the module's documentation for the rule.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (TIB, "TiB"),
        (GIB, "GiB"),
        (MIB, "MiB"),
        (KIB, "KiB"),
        (1, "B"),
    ];
    if n == 0 {
        return "0B".into();
    }
    let (per, unit) = UNITS
        .into_iter()
        .find(|(per, _)| n >= *per)
        .expect("n >= 1");
    let (exact, exact_unit) = UNITS
        .into_iter()
        .find(|(per, _)| n % per == 0)
        .expect("1 divides everything");
    if n % per == 0 || n / exact < 10_000 {
        return format!("{}{exact_unit}", n / exact);
    }
    // (n % per) < 2^40, so times 10 fits.
    format!("{}.{}{unit}", n / per, (n % per) * 10 / per)
}

/// A duration as people read it: `300ms`, `5s`, `1.5s`, `2min`, `2h`, `250µs`, `0s`.
/// See the module's documentation for the rule.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    match nanos {
        0 => "0s".into(),
        1..1_000 => format!("{nanos}ns"),
        1_000..1_000_000 => thousandths(nanos, "µs"),
        1_000_000..1_000_000_000 => thousandths(nanos / 1_000, "ms"),
        _ => {
            let ms = d.as_millis();
            if ms % 3_600_000 == 0 {
                format!("{}h", ms / 3_600_000)
            } else if ms % 60_000 == 0 {
                format!("{}min", ms / 60_000)
            } else {
                thousandths(ms, "s")
            }
        }
    }
}

/// `v` thousandths of `unit`, with up to three decimals: `1.5s`, `1.234s`, `5s`.
fn thousandths(v: u128, unit: &str) -> String {
    let (whole, frac) = (v / 1000, v % 1000);
    if frac == 0 {
        format!("{whole}{unit}")
    } else {
        let frac = format!("{frac:03}");
        format!("{whole}.{}{unit}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_err(s: &str) -> String {
        parse_size(s).unwrap_err().to_string()
    }

    fn duration_err(s: &str) -> String {
        parse_duration(s).unwrap_err().to_string()
    }

    #[test]
    fn a_bare_memory_amount_is_mib_never_bytes() {
        assert_eq!(parse_mib_size("1").unwrap(), MIB);
        assert_eq!(parse_mib_size(" 2048 ").unwrap(), 2048 * MIB);
        assert_eq!(parse_mib_size("0.5").unwrap(), MIB / 2);
        assert_eq!(parse_mib_size("64MiB").unwrap(), 64 * MIB);
        assert_eq!(parse_mib_size("1GiB").unwrap(), GIB);
        assert_eq!(parse_mib_size("12B").unwrap(), 12);
        let e = parse_mib_size("99999999999999999999")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`99999999999999999999`") && e.contains("too large"),
            "{e}"
        );
        assert!(parse_mib_size("-1").is_err() && parse_mib_size("").is_err());
    }

    #[test]
    fn parses_every_size_unit() {
        for (s, v) in [
            ("0", 0),
            ("1000", 1000),
            ("12B", 12),
            ("1k", 1000),
            ("1kb", 1000),
            ("1KB", 1000),
            ("1K", 1000),
            ("1KiB", KIB),
            ("1kib", KIB),
            ("2M", 2_000_000),
            ("2MB", 2_000_000),
            ("64MiB", 64 * MIB),
            ("64mib", 64 * MIB),
            ("3G", 3_000_000_000),
            ("3GB", 3_000_000_000),
            ("2GiB", 2 * GIB),
            ("1T", 1_000_000_000_000),
            ("1TB", 1_000_000_000_000),
            ("5TiB", 5 * TIB),
            ("64 MiB", 64 * MIB),
            ("  64MiB ", 64 * MIB),
            ("64\tMiB", 64 * MIB),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
    }

    #[test]
    fn parses_size_decimals_exactly() {
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size(".5KiB"), Ok(512));
        assert_eq!(parse_size("2.KiB"), Ok(2048));
        assert_eq!(parse_size("0.001kB"), Ok(1));
        assert_eq!(parse_size("1.100000000000000000000000MB"), Ok(1_100_000));
        // 0.1KiB is 102.4 bytes: rounded to the nearest, halves up.
        assert_eq!(parse_size("0.1KiB"), Ok(102));
        assert_eq!(parse_size("1.5"), Ok(2));
        assert_eq!(parse_size("1.49"), Ok(1));
        assert_eq!(parse_size("0.4"), Ok(0));
        // A float would drift here; integers do not.
        assert_eq!(parse_size("0.3GB"), Ok(300_000_000));
        assert_eq!(parse_size("4.000000000000000001TiB"), Ok(4 * TIB));
        assert_eq!(
            parse_size("1.000000000000000001TB"),
            Ok(1_000_000_000_000),
            "the 10^-18 part is a millionth of a byte"
        );
    }

    #[test]
    fn size_boundaries() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("18446744073709551615B"), Ok(u64::MAX));
        assert!(size_err("18446744073709551616").contains("too large"));
        assert_eq!(parse_size("16777215TiB"), Ok(16777215 * TIB));
        assert!(size_err("16777216TiB").contains("too large"));
        assert!(size_err("18446744073709551615.5").contains("too large"));
        let big = "9".repeat(400);
        let e = size_err(&big);
        assert!(e.contains("too large") && e.contains(&big), "{e}");
        let e = size_err(&format!("1.{}1GiB", "0".repeat(400)));
        assert!(e.contains("decimal places"), "{e}");
        // Leading zeros are only zeros.
        assert_eq!(parse_size(&format!("{}1MiB", "0".repeat(400))), Ok(MIB));
    }

    #[test]
    fn hostile_sizes_are_errors_that_say_what_to_write() {
        for (s, says) in [
            ("", "empty size"),
            ("   ", "empty size"),
            ("-1", "negative"),
            ("-1MiB", "negative"),
            ("1.2.3", "not a number"),
            ("1e9", "not a number"),
            ("1E9", "not a number"),
            ("1e-3", "not a number"),
            ("nan", "not a number"),
            ("NaN", "not a number"),
            ("inf", "not a number"),
            ("infinity", "not a number"),
            ("+5", "not a number"),
            (".", "not a number"),
            ("MiB", "not a number"),
            ("0x10", "unknown unit `x10`"),
            ("12XB", "unknown unit `XB`"),
            ("12 parsecs", "unknown unit `parsecs`"),
            ("1 2", "unknown unit `2`"),
            ("5s", "unknown unit `s`"),
        ] {
            let e = size_err(s);
            assert!(e.contains(says), "{s:?}: {e}");
            if !s.trim().is_empty() {
                assert!(e.contains(&format!("`{s}`")), "{s:?}: {e}");
            }
            assert!(e.contains("MiB"), "{s:?} should say what is accepted: {e}");
        }
        assert_eq!(
            size_err("12XB"),
            "size `12XB` has an unknown unit `XB`; use B, KiB, MiB, GiB, TiB \
             (or kB, MB, GB, TB, powers of 1000)"
        );
    }

    #[test]
    fn formats_sizes() {
        for (n, s) in [
            (0, "0B"),
            (1, "1B"),
            (512, "512B"),
            (1000, "1000B"),
            (9999, "9999B"),
            (KIB, "1KiB"),
            (1536 * KIB, "1536KiB"),
            (16 * KIB, "16KiB"),
            (MIB, "1MiB"),
            (64 * MIB, "64MiB"),
            (128 * MIB, "128MiB"),
            (1536 * MIB, "1536MiB"),
            (4 * GIB, "4GiB"),
            (3 * TIB, "3TiB"),
            (9999 * KIB, "9999KiB"),
            // Not a small whole number of any unit: one decimal, truncated.
            (10_000, "9.7KiB"),
            (10_000 * KIB, "9.7MiB"),
            (64_000 * KIB, "62.5MiB"),
            (13_456_789, "12.8MiB"),
            (GIB + 1, "1.0GiB"),
            (2 * GIB - 1, "1.9GiB"),
            (15_269_836 * KIB, "14.5GiB"),
            (20_000 * TIB, "20000TiB"),
            (20_000 * TIB + GIB, "20000.0TiB"),
            (u64::MAX, "16777215.9TiB"),
        ] {
            assert_eq!(format_bytes(n), s, "{n}");
        }
    }

    #[test]
    fn sizes_round_trip() {
        let mut n: u64 = 1;
        let mut samples = vec![0, u64::MAX, u64::MAX - 1, 1 << 63];
        while n < u64::MAX / 3 {
            samples.extend([n, n - 1, n + 1, n * 3 / 2, n.saturating_mul(1000)]);
            n = n.saturating_mul(2);
        }
        for n in samples {
            let s = format_bytes(n);
            let back = parse_size(&s).unwrap_or_else(|e| panic!("{n} as {s}: {e}"));
            if s.contains('.') {
                // Truncated to a tenth of the unit: never above, less than a tenth below.
                let per = [TIB, GIB, MIB, KIB, 1]
                    .into_iter()
                    .find(|p| n >= *p)
                    .unwrap();
                assert!(back <= n && n - back < per / 10 + 1, "{n} as {s}: {back}");
            } else {
                assert_eq!(back, n, "{s}");
            }
        }
    }

    #[test]
    fn parses_every_duration_unit() {
        let ms = Duration::from_millis;
        for (s, d) in [
            ("0", Duration::ZERO),
            ("30", Duration::from_secs(30)),
            ("0.5", ms(500)),
            (".25", ms(250)),
            ("30.", Duration::from_secs(30)),
            ("30s", Duration::from_secs(30)),
            ("1.5s", ms(1500)),
            ("500ms", ms(500)),
            ("2m", Duration::from_secs(120)),
            ("30d", Duration::from_secs(30 * 86_400)),
            ("2min", Duration::from_secs(120)),
            ("1.5m", Duration::from_secs(90)),
            ("2h", Duration::from_secs(7200)),
            ("0.5h", Duration::from_secs(1800)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("250μs", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
            ("1.5ns", Duration::from_nanos(2)),
            ("1.000000001s", Duration::new(1, 1)),
            (" 30 s ", Duration::from_secs(30)),
            ("1.234s", ms(1234)),
        ] {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
    }

    #[test]
    fn durations_in_milliseconds_round_to_the_nearest() {
        assert_eq!(parse_duration_ms("30"), Ok(30_000));
        assert_eq!(parse_duration_ms("0"), Ok(0));
        assert_eq!(parse_duration_ms("1.5ms"), Ok(2));
        assert_eq!(parse_duration_ms("1.4999ms"), Ok(1));
        assert_eq!(parse_duration_ms("0.0004"), Ok(0));
        assert_eq!(parse_duration_ms("0.0005"), Ok(1));
        assert_eq!(parse_duration_ms("1499999ns"), Ok(1));
        assert_eq!(parse_duration_ms("1500us"), Ok(2));
        assert_eq!(parse_duration_ms("0.1s"), Ok(100));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("1.5h"), Ok(5_400_000));
        // Milliseconds stop at u64::MAX (below Duration::MAX).
        assert_eq!(parse_duration_ms("18446744073709551615ms"), Ok(u64::MAX));
        assert!(parse_duration_ms("18446744073709551616ms")
            .unwrap_err()
            .to_string()
            .contains("too large"));
        assert!(parse_duration_ms("18446744073709551615s").is_err());
    }

    #[test]
    fn duration_boundaries() {
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Ok(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_duration("18446744073709551615.999999999s"),
            Ok(Duration::MAX)
        );
        assert_eq!(
            parse_duration("18446744073709551615999999999ns"),
            Ok(Duration::MAX)
        );
        for s in [
            "18446744073709551616s",
            "18446744073709551615.9999999995s",
            "307445734561825861m",
            "5124095576030432h",
        ] {
            assert!(duration_err(s).contains("too large"), "{s}");
        }
        let e = duration_err(&"9".repeat(400));
        assert!(e.contains("too large"), "{e}");
        let e = duration_err(&format!("0.{}1s", "0".repeat(400)));
        assert!(e.contains("decimal places"), "{e}");
    }

    #[test]
    fn hostile_durations_are_errors_that_say_what_to_write() {
        for (s, says) in [
            ("", "empty duration"),
            ("-1s", "negative"),
            ("-0", "negative"),
            ("1.2.3s", "not a number"),
            ("1e9", "not a number"),
            ("1e3s", "not a number"),
            ("nan", "not a number"),
            ("inf", "not a number"),
            ("+30s", "not a number"),
            ("s", "not a number"),
            ("5x", "unknown unit `x`"),
            ("5 sec", "unknown unit `sec`"),
            ("5S", "unknown unit `S`"),
            ("1:30", "unknown unit `:30`"),
            ("10MiB", "unknown unit `MiB`"),
        ] {
            let e = duration_err(s);
            assert!(e.contains(says), "{s:?}: {e}");
            if !s.is_empty() {
                assert!(e.contains(&format!("`{s}`")), "{s:?}: {e}");
            }
            assert!(e.contains("30s"), "{s:?} should say what is accepted: {e}");
        }
        assert_eq!(
            duration_err("5x"),
            "duration `5x` has an unknown unit `x`; use ms, s, m (or min), h, d, us or ns, \
             e.g. 30s, 500ms, 2m, 30d; a bare number is seconds"
        );
    }

    #[test]
    fn formats_durations() {
        let ms = Duration::from_millis;
        for (d, s) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(10), "10ns"),
            (Duration::from_nanos(1500), "1.5µs"),
            (Duration::from_micros(250), "250µs"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_nanos(1_234_567), "1.234ms"),
            (ms(1), "1ms"),
            (ms(300), "300ms"),
            (ms(999), "999ms"),
            (ms(1000), "1s"),
            (ms(1500), "1.5s"),
            (ms(1234), "1.234s"),
            (Duration::from_nanos(1_234_567_890), "1.234s"),
            (Duration::from_secs(5), "5s"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_secs(59), "59s"),
            (Duration::from_secs(60), "1min"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2min"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(5400), "90min"),
            (Duration::from_secs(3601), "3601s"),
            (Duration::from_secs(86_400), "24h"),
            (Duration::MAX, "18446744073709551615.999s"),
        ] {
            assert_eq!(format_duration(d), s, "{d:?}");
        }
    }

    #[test]
    fn durations_round_trip() {
        let mut samples = vec![Duration::ZERO, Duration::MAX, Duration::from_secs(u64::MAX)];
        for p in 0..64 {
            let n = 1u64 << p;
            samples.extend([
                Duration::from_millis(n),
                Duration::from_millis(n.saturating_mul(1000)),
                Duration::from_micros(n % 1_000_000),
                Duration::from_nanos(n % 1_000),
                Duration::from_secs(n),
            ]);
        }
        for d in samples {
            let s = format_duration(d);
            let back = parse_duration(&s).unwrap_or_else(|e| panic!("{d:?} as {s}: {e}"));
            // Exact to the millisecond from a second up, to the microsecond below.
            let grain = if d >= Duration::from_secs(1) {
                Duration::from_millis(1)
            } else if d >= Duration::from_millis(1) {
                Duration::from_micros(1)
            } else {
                Duration::from_nanos(1)
            };
            assert!(back <= d && d - back < grain, "{d:?} as {s}: {back:?}");
        }
    }
}
