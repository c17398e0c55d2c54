//! Scalar resources as fixed-point integers (milli-cpus, bytes), shared by the
//! allocator, the agent and the sdk. Mesos spent years chasing rounding drift in
//! floating-point `cpus`; integers cannot drift.

use std::collections::BTreeMap;
use std::fmt;

use crate::v1::Resource;

pub const CPUS: &str = "cpus";
pub const MEM: &str = "mem";
/// Sandbox disk, in bytes (given in MiB on flags, as in Mesos).
pub const DISK: &str = "disk";

/// The disk a task that asks for none is held to: its sandbox may hold this much
/// (the executors enforce it), but offers do not count it. `agora run --disk`
/// defaults to the same amount, which is then counted.
pub const DEFAULT_TASK_DISK: i64 = 256 << 20;

/// The most of one resource (name and role) one bag may hold: 2^50 (a PiB of memory,
/// over a million million milli-cpus). Amounts from the wire and from flags are
/// refused above it, so sums of many bags stay far from `i64` overflow; sums past it
/// anyway saturate instead of wrapping or panicking.
pub const MAX_AMOUNT: i64 = 1 << 50;

/// A bag of scalar resources keyed by (name, role). Role "" is unreserved.
/// Amounts are never negative: subtraction that would go below zero is refused.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    amounts: BTreeMap<(String, String), i64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceParseError {
    #[error("resource `{0}` is not of the form name:value (e.g. cpus:2 or mem:4096)")]
    Syntax(String),
    #[error("resource `{name}` has value `{value}`, which is not a non-negative number")]
    Value { name: String, value: String },
    #[error("resource `{0}` has a malformed role; write name(role):value, e.g. cpus(tenant-a):2")]
    Role(String),
    /// An amount above [`MAX_AMOUNT`], alone or summed with others of its name and role.
    #[error("resource {name} amounts to more than {max}, the most one bag may hold", max = MAX_AMOUNT)]
    TooLarge { name: String },
    /// A resource on the wire without a name.
    #[error("a resource has an empty name")]
    EmptyName,
    /// A resource on the wire with an amount below zero.
    #[error("resource {name} has a negative value {value}")]
    Negative { name: String, value: i64 },
}

impl Resources {
    pub fn new() -> Self {
        Self::default()
    }

    /// Unreserved cpus and memory.
    pub fn cpus_mem(milli_cpus: i64, mem_bytes: i64) -> Self {
        let mut r = Self::new();
        r.add_scalar(CPUS, "", milli_cpus);
        r.add_scalar(MEM, "", mem_bytes);
        r
    }

    pub fn add_scalar(&mut self, name: &str, role: &str, value: i64) {
        assert!(value >= 0, "resource amounts are never negative");
        if value == 0 {
            return;
        }
        let e = self
            .amounts
            .entry((name.to_string(), role.to_string()))
            .or_insert(0);
        *e = e.saturating_add(value);
    }

    /// Sum of a resource across all roles.
    pub fn get(&self, name: &str) -> i64 {
        self.amounts
            .iter()
            .filter(|((n, _), _)| n == name)
            .fold(0i64, |sum, (_, v)| sum.saturating_add(*v))
    }

    pub fn milli_cpus(&self) -> i64 {
        self.get(CPUS)
    }

    pub fn mem_bytes(&self) -> i64 {
        self.get(MEM)
    }

    pub fn disk_bytes(&self) -> i64 {
        self.get(DISK)
    }

    pub fn is_empty(&self) -> bool {
        self.amounts.is_empty()
    }

    /// Names of the resources present, each once.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.amounts.keys().map(|(n, _)| n.clone()).collect();
        v.dedup();
        v
    }

    pub fn add(&mut self, other: &Resources) {
        for ((n, r), v) in &other.amounts {
            self.add_scalar(n, r, *v);
        }
    }

    /// True when every amount in `other` is available here, role by role.
    pub fn contains(&self, other: &Resources) -> bool {
        other
            .amounts
            .iter()
            .all(|(k, v)| self.amounts.get(k).copied().unwrap_or(0) >= *v)
    }

    /// Removes `other`; returns None (and changes nothing) when it is not contained.
    pub fn checked_sub(&self, other: &Resources) -> Option<Resources> {
        if !self.contains(other) {
            return None;
        }
        let mut out = self.clone();
        for (k, v) in &other.amounts {
            let e = out.amounts.get_mut(k).expect("contained");
            *e -= v;
            if *e == 0 {
                out.amounts.remove(k);
            }
        }
        Some(out)
    }

    /// Like `checked_sub` but for callers whose invariants guarantee containment.
    pub fn sub(&mut self, other: &Resources) {
        *self = self
            .checked_sub(other)
            .unwrap_or_else(|| panic!("invariant broken: cannot take {other} from {self}"));
    }

    /// This resource bag seen as unreserved (roles dropped); for comparisons against a
    /// task's request, which names no role.
    pub fn unreserved(&self) -> Resources {
        let mut out = Resources::new();
        for ((n, _), v) in &self.amounts {
            out.add_scalar(n, "", *v);
        }
        out
    }

    /// This bag with every amount reserved for `role` ("" or "*": unreserved).
    pub fn with_role(&self, role: &str) -> Resources {
        let role = if role == "*" { "" } else { role };
        let mut out = Resources::new();
        for ((n, _), v) in &self.amounts {
            out.add_scalar(n, role, *v);
        }
        out
    }

    /// The reservation roles present (unreserved amounts are not listed).
    pub fn roles(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .amounts
            .keys()
            .filter(|(_, r)| !r.is_empty())
            .map(|(_, r)| r.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// What a task asking `ask` (amounts, roles ignored) takes from this bag (an
    /// offer to `role`): `role`'s reservation first, then unreserved amounts, as
    /// Mesos frameworks do. None when this bag cannot cover `ask`.
    pub fn take_for_role(&self, ask: &Resources, role: &str) -> Option<Resources> {
        let role = if role == "*" { "" } else { role };
        let sources: &[&str] = if role.is_empty() { &[""] } else { &[role, ""] };
        let mut out = Resources::new();
        for ((name, _), want) in &ask.unreserved().amounts {
            let mut need = *want;
            for r in sources {
                let have = self
                    .amounts
                    .get(&(name.clone(), r.to_string()))
                    .copied()
                    .unwrap_or(0);
                let take = have.min(need);
                if take > 0 {
                    out.add_scalar(name, r, take);
                    need -= take;
                }
            }
            if need > 0 {
                return None;
            }
        }
        Some(out)
    }

    /// The part of this bag reserved for `role` ("" for the unreserved part).
    pub fn of_role(&self, role: &str) -> Resources {
        let mut out = Resources::new();
        for ((n, r), v) in &self.amounts {
            if r == role {
                out.add_scalar(n, r, *v);
            }
        }
        out
    }

    pub fn from_proto(list: &[Resource]) -> Result<Resources, ResourceParseError> {
        let mut r = Resources::new();
        for res in list {
            if res.name.is_empty() {
                return Err(ResourceParseError::EmptyName);
            }
            if res.value < 0 {
                return Err(ResourceParseError::Negative {
                    name: res.name.clone(),
                    value: res.value,
                });
            }
            r.add_scalar(&res.name, &res.role, res.value);
            if r.amounts
                .get(&(res.name.clone(), res.role.clone()))
                .copied()
                .unwrap_or(0)
                > MAX_AMOUNT
            {
                return Err(ResourceParseError::TooLarge {
                    name: res.name.clone(),
                });
            }
        }
        Ok(r)
    }

    pub fn to_proto(&self) -> Vec<Resource> {
        self.amounts
            .iter()
            .map(|((n, r), v)| Resource {
                name: n.clone(),
                value: *v,
                role: r.clone(),
            })
            .collect()
    }

    /// Parses the agent flag form `cpus:4;mem:8192;disk:20480` (mem and disk in MiB, as in Mesos; a unit
    /// such as `8GiB` may be given instead). Fractional cpus are allowed (`cpus:0.5`).
    /// A role in parentheses reserves the amount for that role, as in Mesos's static
    /// reservations: `cpus(tenant-a):2;mem(tenant-a):1GiB;cpus:2`. `(*)` is the same
    /// as no role.
    pub fn parse(spec: &str) -> Result<Resources, ResourceParseError> {
        let mut r = Resources::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once(':')
                .ok_or_else(|| ResourceParseError::Syntax(part.into()))?;
            let (name, value) = (name.trim(), value.trim());
            let (name, role) = match name.split_once('(') {
                None => (name, ""),
                Some((n, rest)) => {
                    let role = rest
                        .strip_suffix(')')
                        .map(str::trim)
                        .filter(|r| !r.is_empty() && !r.contains(['(', ')']))
                        .ok_or_else(|| ResourceParseError::Role(part.into()))?;
                    (n.trim(), if role == "*" { "" } else { role })
                }
            };
            if name.is_empty() {
                return Err(ResourceParseError::Syntax(part.into()));
            }
            let bad = || ResourceParseError::Value {
                name: name.into(),
                value: value.into(),
            };
            let amount = match name {
                CPUS => parse_cpus(value).ok_or_else(bad)?,
                MEM | DISK => {
                    // A bare number is MiB, fraction or not (`mem:1.5` is 1.5 MiB).
                    let bare =
                        !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit() || b == b'.');
                    let sized = if bare {
                        crate::units::parse_size(&format!("{value}MiB"))
                    } else {
                        crate::units::parse_size(value)
                    };
                    sized
                        .ok()
                        .and_then(|b| i64::try_from(b).ok())
                        .ok_or_else(bad)?
                }
                _ => value
                    .parse::<i64>()
                    .ok()
                    .filter(|v| *v >= 0)
                    .ok_or_else(bad)?,
            };
            r.add_scalar(name, role, amount);
            if r.amounts
                .get(&(name.to_string(), role.to_string()))
                .copied()
                .unwrap_or(0)
                > MAX_AMOUNT
            {
                return Err(ResourceParseError::TooLarge { name: name.into() });
            }
        }
        Ok(r)
    }
}

/// Parses a cpu count such as `2`, `0.5` or `0.125` into milli-cpus, without floats.
pub fn parse_cpus(s: &str) -> Option<i64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 3 && frac[3..].bytes().any(|b| b != b'0') {
        return None; // finer than a milli-cpu
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut milli: i64 = 0;
    for (i, b) in frac.bytes().take(3).enumerate() {
        milli += i64::from(b - b'0') * [100, 10, 1][i];
    }
    whole.checked_mul(1000)?.checked_add(milli)
}

/// A memory amount in [`crate::units::format_bytes`]'s form (`64MiB`, `1536KiB`).
pub fn format_bytes(b: i64) -> String {
    let s = crate::units::format_bytes(b.unsigned_abs());
    if b < 0 {
        format!("-{s}")
    } else {
        s
    }
}

/// Human form of milli-cpus: 2, 0.5, 0.125.
pub fn format_cpus(m: i64) -> String {
    if m % 1000 == 0 {
        format!("{}", m / 1000)
    } else {
        let s = format!("{}.{:03}", m / 1000, m % 1000);
        s.trim_end_matches('0').to_string()
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.amounts.is_empty() {
            return f.write_str("(none)");
        }
        let mut first = true;
        for ((n, r), v) in &self.amounts {
            if !first {
                f.write_str(";")?;
            }
            first = false;
            let val = match n.as_str() {
                CPUS => format_cpus(*v),
                MEM | DISK => format_bytes(*v),
                _ => v.to_string(),
            };
            if r.is_empty() {
                write!(f, "{n}:{val}")?;
            } else {
                write!(f, "{n}({r}):{val}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Resources({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: i64 = 1 << 20;

    #[test]
    fn a_task_takes_its_role_s_reservation_first_then_unreserved() {
        let offer = Resources::parse("cpus:1;cpus(tenant-a):1;mem:512;mem(tenant-a):256").unwrap();
        let ask = Resources::parse("cpus:1.5;mem:700").unwrap();
        let got = offer.take_for_role(&ask, "tenant-a").unwrap();
        assert_eq!(
            got,
            Resources::parse("cpus(tenant-a):1;cpus:0.5;mem(tenant-a):256;mem:444").unwrap()
        );
        assert_eq!(got.unreserved(), ask);
        // Another role has only the unreserved part, which is too small.
        assert_eq!(offer.take_for_role(&ask, "*"), None);
        assert_eq!(offer.take_for_role(&ask, "tenant-b"), None);
        let small = Resources::parse("cpus:0.5;mem:100").unwrap();
        assert_eq!(
            offer.take_for_role(&small, "tenant-a").unwrap(),
            Resources::parse("cpus(tenant-a):0.5;mem(tenant-a):100").unwrap()
        );
        assert_eq!(offer.take_for_role(&small, "*").unwrap(), small);
    }

    #[test]
    fn parses_agent_flag_with_mesos_units() {
        let r = Resources::parse("cpus:4;mem:8192").unwrap();
        assert_eq!(r.milli_cpus(), 4000);
        assert_eq!(r.mem_bytes(), 8192 * MIB);
        let r = Resources::parse("cpus:0.25; mem:2GiB").unwrap();
        assert_eq!(r.milli_cpus(), 250);
        assert_eq!(r.mem_bytes(), 2 << 30);
        assert_eq!(r.to_string(), "cpus:0.25;mem:2GiB");
    }

    #[test]
    fn parses_static_reservations() {
        let r = Resources::parse("cpus(tenant-a):2;mem(tenant-a):1GiB;cpus:2;mem(*):64").unwrap();
        assert_eq!(r.milli_cpus(), 4000);
        assert_eq!(
            r.of_role("tenant-a"),
            Resources::cpus_mem(2000, 1 << 30).with_role("tenant-a")
        );
        assert_eq!(r.of_role(""), Resources::cpus_mem(2000, 64 * MIB));
        assert_eq!(r.roles(), vec!["tenant-a".to_string()]);
        assert_eq!(Resources::parse(&r.to_string()).unwrap(), r);
        let e = Resources::parse("cpus(:2").unwrap_err();
        assert!(
            e.to_string().contains("cpus(role):2") || e.to_string().contains("role"),
            "{e}"
        );
        assert!(Resources::parse("cpus():2").is_err());
    }

    #[test]
    fn rejects_bad_specs_with_the_offending_part_named() {
        let e = Resources::parse("cpus=4").unwrap_err();
        assert!(e.to_string().contains("cpus=4"), "{e}");
        let e = Resources::parse("cpus:-1").unwrap_err();
        assert!(e.to_string().contains("`-1`"), "{e}");
        assert!(Resources::parse("cpus:0.0001").is_err());
        assert!(Resources::parse("mem:lots").is_err());
    }

    #[test]
    fn cpus_are_exact_fixed_point() {
        assert_eq!(parse_cpus("0.1"), Some(100));
        assert_eq!(parse_cpus("1.5"), Some(1500));
        assert_eq!(parse_cpus(".5"), Some(500));
        assert_eq!(parse_cpus("2"), Some(2000));
        assert_eq!(parse_cpus("0.1000"), Some(100));
        assert_eq!(parse_cpus("x"), None);
        // Ten times 0.1 is exactly 1, which floats famously get wrong.
        let mut total = Resources::new();
        for _ in 0..10 {
            total.add(&Resources::cpus_mem(parse_cpus("0.1").unwrap(), 0));
        }
        assert_eq!(total.milli_cpus(), 1000);
    }

    #[test]
    fn hostile_amounts_are_refused_not_overflowed() {
        let near_max = |role: &str| Resource {
            name: CPUS.into(),
            value: i64::MAX - 1,
            role: role.into(),
        };
        // Each alone is over the cap; two would overflow i64.
        assert_eq!(
            Resources::from_proto(&[near_max(""), near_max("")]),
            Err(ResourceParseError::TooLarge { name: CPUS.into() })
        );
        let half = Resource {
            name: MEM.into(),
            value: MAX_AMOUNT / 2 + 1,
            role: String::new(),
        };
        assert!(Resources::from_proto(&[half.clone()]).is_ok());
        assert!(matches!(
            Resources::from_proto(&[half.clone(), half]),
            Err(ResourceParseError::TooLarge { .. })
        ));
        assert!(Resources::parse("cpus:9000000000000").is_err());
        assert!(Resources::parse("cpus:1000;cpus:2000").is_ok());
        // Sums inside the process saturate instead of panicking or wrapping.
        let mut a = Resources::new();
        a.add_scalar(CPUS, "", i64::MAX - 1);
        a.add_scalar(CPUS, "", i64::MAX - 1);
        assert_eq!(a.milli_cpus(), i64::MAX);
    }

    #[test]
    fn subtraction_never_goes_negative() {
        let a = Resources::cpus_mem(1000, 100);
        let b = Resources::cpus_mem(1500, 10);
        assert!(!a.contains(&b));
        assert_eq!(a.checked_sub(&b), None);
        let c = a.checked_sub(&Resources::cpus_mem(1000, 100)).unwrap();
        assert!(c.is_empty());
    }

    #[test]
    fn sizes() {
        let mem = |s: &str| Resources::parse(&format!("mem:{s}")).map(|r| r.mem_bytes());
        assert_eq!(mem("64MiB"), Ok(64 * MIB));
        // A bare number is MiB, whole or not.
        assert_eq!(mem("1"), Ok(MIB));
        assert_eq!(mem("1.5"), Ok(3 * MIB / 2));
        assert!(mem(".").is_err());
        assert!(mem("99999999999999999").is_err(), "MiB past i64::MAX");
        assert_eq!(mem("1.5GiB"), Ok(3 << 29));
        assert_eq!(mem("1000B"), Ok(1000));
        assert_eq!(mem("2MB"), Ok(2_000_000));
        assert!(mem("12 parsecs").is_err());
        assert!(mem("9000000TiB").is_err(), "above i64::MAX");
        assert_eq!(format_bytes(64 * MIB), "64MiB");
        assert_eq!(format_cpus(100), "0.1");
    }
}
