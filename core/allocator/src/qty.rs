//! Dense resource quantities for the allocator's inner loops.
//!
//! `Resources` (a map keyed by name and role) is the type every crate shares and the
//! one the allocator's API speaks. Shares, quota consumption and headroom are sums and
//! comparisons over a handful of resource names, done millions of times a round at
//! scale, so inside the allocator each name is interned once (`Kinds`) and amounts live
//! in a plain vector indexed by it (`Qty`).

use std::collections::HashMap;

use super::roles::NodeId;

/// Index of a resource name ("cpus", "mem", ...), as interned by `Kinds`.
pub(crate) type Kind = usize;

/// Interned resource names. A name, once seen, keeps its index for the allocator's
/// lifetime (there are only ever a few).
#[derive(Debug, Default, Clone)]
pub(crate) struct Kinds {
    names: Vec<String>,
    index: HashMap<String, Kind>,
}

impl Kinds {
    pub fn intern(&mut self, name: &str) -> Kind {
        if let Some(&k) = self.index.get(name) {
            return k;
        }
        let k = self.names.len();
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), k);
        k
    }

    pub fn find(&self, name: &str) -> Option<Kind> {
        self.index.get(name).copied()
    }

    pub fn name(&self, k: Kind) -> &str {
        &self.names[k]
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }
}

/// Amounts indexed by `Kind`; kinds past the end are zero. Amounts may go negative
/// transiently inside a computation (a delta), never in stored state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Qty(Vec<i64>);

impl Qty {
    pub fn one(k: Kind, v: i64) -> Self {
        let mut q = Qty::default();
        q.add_at(k, v);
        q
    }

    pub fn get(&self, k: Kind) -> i64 {
        self.0.get(k).copied().unwrap_or(0)
    }

    pub fn add_at(&mut self, k: Kind, v: i64) {
        if self.0.len() <= k {
            self.0.resize(k + 1, 0);
        }
        // Amounts are capped at their entrance (agora_proto::MAX_AMOUNT); a sum past
        // i64 anyway saturates rather than panicking in the master.
        self.0[k] = self.0[k].saturating_add(v);
    }

    pub fn set(&mut self, k: Kind, v: i64) {
        if self.0.len() <= k {
            self.0.resize(k + 1, 0);
        }
        self.0[k] = v;
    }

    pub fn add(&mut self, other: &Qty) {
        for (k, v) in other.iter() {
            self.add_at(k, v);
        }
    }

    /// The non-zero amounts, by kind.
    pub fn iter(&self) -> impl Iterator<Item = (Kind, i64)> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (k, *v))
    }

    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|v| *v == 0)
    }

    /// True when every amount of `other` is available here.
    pub fn covers(&self, other: &Qty) -> bool {
        other.iter().all(|(k, v)| self.get(k) >= v)
    }
}

/// A piece of a resource bag: (kind, reservation role or None, amount).
pub(crate) type Part = (Kind, Option<NodeId>, i64);

/// The allocator's own resource bag: amounts by (kind, reservation role), sorted,
/// all positive. `Resources` is converted to and from it at the API's edge only.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Bag(Vec<Part>);

impl Bag {
    pub fn from_parts(parts: impl IntoIterator<Item = Part>) -> Bag {
        let mut b = Bag::default();
        for (k, t, v) in parts {
            b.add_one(k, t, v);
        }
        b
    }

    fn add_one(&mut self, k: Kind, t: Option<NodeId>, v: i64) {
        if v == 0 {
            return;
        }
        match self.0.binary_search_by_key(&(k, t), |&(k, t, _)| (k, t)) {
            Ok(i) => {
                self.0[i].2 = self.0[i].2.saturating_add(v);
                debug_assert!(self.0[i].2 >= 0, "bag amounts are never negative");
                if self.0[i].2 == 0 {
                    self.0.remove(i);
                }
            }
            Err(i) => {
                debug_assert!(v > 0, "bag amounts are never negative");
                self.0.insert(i, (k, t, v));
            }
        }
    }

    pub fn parts(&self) -> &[Part] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, k: Kind, t: Option<NodeId>) -> i64 {
        self.0
            .binary_search_by_key(&(k, t), |&(k, t, _)| (k, t))
            .map_or(0, |i| self.0[i].2)
    }

    pub fn add(&mut self, other: &Bag) {
        for &(k, t, v) in &other.0 {
            self.add_one(k, t, v);
        }
    }

    pub fn contains(&self, other: &Bag) -> bool {
        other.0.iter().all(|&(k, t, v)| self.get(k, t) >= v)
    }

    /// Removes `other`, which must be contained (an invariant of the caller).
    pub fn sub(&mut self, other: &Bag) {
        assert!(
            self.contains(other),
            "invariant broken: {other:?} is not in {self:?}"
        );
        for &(k, t, v) in &other.0 {
            self.add_one(k, t, -v);
        }
    }

    pub fn checked_sub(&self, other: &Bag) -> Option<Bag> {
        self.contains(other).then(|| {
            let mut out = self.clone();
            out.sub(other);
            out
        })
    }

    /// Amounts by kind, reservations included.
    pub fn qty(&self) -> Qty {
        let mut q = Qty::default();
        for &(k, _, v) in &self.0 {
            q.add_at(k, v);
        }
        q
    }
}

/// A growable bit set over small indices (agent slots).
#[derive(Debug, Default, Clone)]
pub(crate) struct BitSet(Vec<u64>);

impl BitSet {
    pub fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn set(&mut self, i: usize, on: bool) {
        if self.0.len() <= i / 64 {
            if !on {
                return;
            }
            self.0.resize(i / 64 + 1, 0);
        }
        if on {
            self.0[i / 64] |= 1 << (i % 64);
        } else {
            self.0[i / 64] &= !(1 << (i % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_and_bits() {
        let mut q = Qty::default();
        q.add_at(2, 5);
        assert_eq!(q.get(0), 0);
        assert_eq!(q.get(7), 0);
        let mut r = q.clone();
        r.add_at(0, 1);
        assert!(r.covers(&q) && !q.covers(&r));
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 1), (2, 5)]);
        let mut b = BitSet::default();
        b.set(130, true);
        assert!(b.get(130) && !b.get(129) && !b.get(100_000));
        b.set(130, false);
        assert!(!b.get(130));
    }

    #[test]
    fn bags() {
        let mut a = Bag::from_parts([(1, None, 5), (0, Some(3), 2), (0, None, 1)]);
        assert_eq!(a.parts(), &[(0, None, 1), (0, Some(3), 2), (1, None, 5)]);
        let b = Bag::from_parts([(0, Some(3), 2)]);
        assert!(a.contains(&b) && !b.contains(&a));
        assert_eq!(
            a.checked_sub(&b).unwrap().parts(),
            &[(0, None, 1), (1, None, 5)]
        );
        assert_eq!(b.checked_sub(&a), None);
        a.sub(&b);
        a.add(&Bag::from_parts([(1, None, 1)]));
        assert_eq!((a.get(1, None), a.get(0, Some(3))), (6, 0));
        assert_eq!(a.qty().get(0), 1);
    }
}
