//! Quotas: per role, a guarantee and a limit for scalar resources, and the headroom
//! that keeps unmet guarantees satisfiable.
//!
//! **Consumption** of a role `N` (per resource kind) is what its subtree holds:
//! everything allocated (offered or used) to frameworks in `N` or a descendant, plus
//! reservations for `N` or a descendant that are not allocated (as in Mesos 1.9+, a
//! reservation counts against quota whether used or not). Allocating a reservation for
//! `T` to a role inside `T`'s subtree therefore changes the consumption only of the
//! roles strictly below `T`.
//!
//! **Limit**: no allocation of unreserved resources to a role `R` may take any of `R`,
//! its parent, ..., its top-level role above its limit; a reservation for `T` offered
//! to a descendant `R` counts against the limits of the roles strictly below `T`.
//!
//! **Requirement** of a role, per kind (what its subtree still needs from the
//! unreserved pool for every guarantee in it to be met):
//! `req(N) = max(0, guarantee(N) - consumed(N), Σ req(children of N))`.
//! The cluster's required headroom is the sum of `req` over top-level roles. (Mesos
//! only counts top-level roles and requires parents' guarantees to cover their
//! children's; this form needs no such rule and still protects a child's guarantee
//! when a sibling consumed the parent's.)
//!
//! **Headroom rule**: unreserved resources may go to a role only while what remains
//! unallocated on connected agents still covers the required headroom. Allocating `x`
//! of a kind to `R` lowers the requirement by `min(x, relief(R))`, where `relief(R)` is
//! the part of the requirement that `R`'s consumption can meet (its own unmet
//! guarantee, its ancestors', not its descendants'); so `R` may take at most
//! `surplus + relief(R)`, with `surplus = max(0, available - required)`.

use std::collections::BTreeMap;

use super::qty::{Kind, Qty};
use super::roles::{NodeId, RoleTree, ROOT};

/// A role's quota. Amounts are fixed-point like `Resources` (milli-cpus, bytes).
/// A resource not named in `limit` is unlimited; `limit` 0 forbids it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quota {
    /// Resources the role (with its descendants) is guaranteed to be able to get.
    pub guarantee: BTreeMap<String, i64>,
    /// Most the role (with its descendants) may consume.
    pub limit: BTreeMap<String, i64>,
}

impl Quota {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn guarantee(mut self, resource: &str, amount: i64) -> Self {
        self.guarantee.insert(resource.to_string(), amount);
        self
    }

    pub fn limit(mut self, resource: &str, amount: i64) -> Self {
        self.limit.insert(resource.to_string(), amount);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.guarantee.is_empty() && self.limit.is_empty()
    }

    /// A reason this quota is not acceptable, if any.
    pub(crate) fn problem(&self) -> Option<String> {
        for (what, map) in [("guarantee", &self.guarantee), ("limit", &self.limit)] {
            for (name, v) in map {
                if name.is_empty() {
                    return Some(format!("a {what} names an empty resource"));
                }
                if *v < 0 {
                    return Some(format!("the {what} of {name} is negative ({v})"));
                }
            }
        }
        for (name, g) in &self.guarantee {
            if let Some(l) = self.limit.get(name) {
                if g > l {
                    return Some(format!(
                        "the guarantee of {name} ({g}) is above its limit ({l}); \
                         lower the guarantee or raise the limit"
                    ));
                }
            }
        }
        None
    }
}

#[derive(Debug, Default)]
pub(crate) struct QuotaTracker {
    parent: Vec<Option<NodeId>>,
    guarantee: Vec<Vec<(Kind, i64)>>,
    limit: Vec<Vec<(Kind, i64)>>,
    /// Roles with a guarantee in the subtree (the role included).
    guarded: Vec<u32>,
    consumed: Vec<Qty>,
    req: Vec<Qty>,
    /// Σ req of the children.
    child_req: Vec<Qty>,
    /// Σ req of the top-level roles.
    required: Qty,
    /// Unreserved, unallocated resources on connected agents.
    available: Qty,
    nkinds: usize,
}

impl QuotaTracker {
    pub fn ensure(&mut self, tree: &RoleTree, nkinds: usize) {
        self.nkinds = self.nkinds.max(nkinds);
        for n in self.parent.len()..tree.len() {
            self.parent.push(tree.parent(n));
            self.guarantee.push(Vec::new());
            self.limit.push(Vec::new());
            self.guarded.push(0);
            self.consumed.push(Qty::default());
            self.req.push(Qty::default());
            self.child_req.push(Qty::default());
        }
    }

    fn up(&self, n: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        let mut cur = Some(n).filter(|&n| n != ROOT);
        std::iter::from_fn(move || {
            let n = cur?;
            cur = self.parent[n].filter(|&p| p != ROOT);
            Some(n)
        })
    }

    pub fn set(&mut self, n: NodeId, guarantee: Vec<(Kind, i64)>, limit: Vec<(Kind, i64)>) {
        let had = self.guarantee[n].iter().any(|(_, v)| *v > 0);
        let has = guarantee.iter().any(|(_, v)| *v > 0);
        if had != has {
            let path: Vec<NodeId> = self.up(n).collect();
            for m in path {
                if has {
                    self.guarded[m] += 1;
                } else {
                    self.guarded[m] -= 1;
                }
            }
        }
        self.guarantee[n] = guarantee;
        self.limit[n] = limit;
        self.update_req(n);
    }

    pub fn limit_of(&self, n: NodeId, k: Kind) -> Option<i64> {
        self.limit[n]
            .iter()
            .find(|(kk, _)| *kk == k)
            .map(|(_, v)| *v)
    }

    pub fn guarantee_of(&self, n: NodeId, k: Kind) -> i64 {
        self.guarantee[n]
            .iter()
            .find(|(kk, _)| *kk == k)
            .map_or(0, |(_, v)| *v)
    }

    pub fn consumed(&self, n: NodeId) -> &Qty {
        &self.consumed[n]
    }

    /// Adds `delta` of kind `k` to the consumption of `from` and all its ancestors.
    pub fn add_consumed(&mut self, from: NodeId, k: Kind, delta: i64) {
        if delta == 0 || from == ROOT {
            return;
        }
        let path: Vec<NodeId> = self.up(from).collect();
        for &m in &path {
            self.consumed[m].add_at(k, delta);
        }
        self.update_req(from);
    }

    /// Re-derives `req` from `from` up to its top-level role.
    fn update_req(&mut self, from: NodeId) {
        let path: Vec<NodeId> = self.up(from).collect();
        for m in path {
            if self.guarded[m] == 0 && self.req[m].is_zero() {
                continue; // no guarantee below: req stays 0
            }
            for k in 0..self.nkinds {
                let own = self.guarantee_of(m, k) - self.consumed[m].get(k);
                let new = own.max(self.child_req[m].get(k)).max(0);
                let delta = new - self.req[m].get(k);
                if delta == 0 {
                    continue;
                }
                self.req[m].set(k, new);
                match self.parent[m] {
                    Some(ROOT) | None => self.required.add_at(k, delta),
                    Some(p) => self.child_req[p].add_at(k, delta),
                }
            }
        }
    }

    pub fn add_available(&mut self, q: &Qty, sign: i64) {
        for (k, v) in q.iter() {
            self.available.add_at(k, sign * v);
        }
    }

    pub fn available(&self, k: Kind) -> i64 {
        self.available.get(k)
    }

    pub fn required(&self, k: Kind) -> i64 {
        self.required.get(k)
    }

    pub fn any_required(&self) -> bool {
        self.required.iter().any(|(_, v)| v > 0)
    }

    /// Unreserved resources not needed for anyone's guarantee.
    pub fn surplus(&self, k: Kind) -> i64 {
        (self.available(k) - self.required(k)).max(0)
    }

    /// How much the required headroom falls if `n`'s consumption grows without
    /// bound: the part of the requirement `n` can meet (see the module comment).
    pub fn relief(&self, n: NodeId) -> Qty {
        let mut out = Qty::default();
        if !self.any_required() {
            return out;
        }
        for k in 0..self.nkinds {
            if self.required(k) <= 0 {
                continue;
            }
            // req with n's consumption at infinity: n's own term vanishes, and so
            // does every ancestor's own term; the children's sums remain.
            let mut inf = self.child_req[n].get(k);
            let mut prev = n;
            let mut m = self.parent[n];
            while let Some(p) = m.filter(|&p| p != ROOT) {
                inf += self.child_req[p].get(k) - self.req[prev].get(k);
                prev = p;
                m = self.parent[p];
            }
            out.set(k, (self.req[prev].get(k) - inf).max(0));
        }
        out
    }

    pub fn has_relief(&self, n: NodeId) -> bool {
        !self.relief(n).is_zero()
    }

    /// Roles whose own guarantee is not met: (role, kind, guarantee, consumed).
    pub fn unmet(&self) -> Vec<(NodeId, Kind, i64, i64)> {
        let mut out = Vec::new();
        for n in 1..self.guarantee.len() {
            for &(k, g) in &self.guarantee[n] {
                let c = self.consumed[n].get(k);
                if g > c {
                    out.push((n, k, g, c));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirement_protects_a_child_whose_sibling_used_the_parents_guarantee() {
        let mut t = RoleTree::default();
        let (web, batch, ops) = (t.intern("eng/web"), t.intern("eng/batch"), t.intern("ops"));
        let eng = t.find("eng").unwrap();
        let mut q = QuotaTracker::default();
        q.ensure(&t, 1);
        q.set(eng, vec![(0, 4)], vec![]);
        q.set(web, vec![(0, 4)], vec![]);
        assert_eq!(q.required(0), 4);
        // batch consumes 10: eng's own guarantee is met, web's is not.
        q.add_consumed(batch, 0, 10);
        assert_eq!(q.required(0), 4);
        assert_eq!(q.relief(web).get(0), 4);
        assert_eq!(q.relief(batch).get(0), 0);
        assert_eq!(q.relief(ops).get(0), 0);
        // web consumes 3: 1 left to meet.
        q.add_consumed(web, 0, 3);
        assert_eq!((q.required(0), q.relief(web).get(0)), (1, 1));
        q.add_consumed(batch, 0, -10);
        // eng holds 3 of its 4, all by web; web's missing 1 also meets eng's, so
        // only web can lower the requirement.
        assert_eq!((q.required(0), q.relief(web).get(0)), (1, 1));
        assert_eq!(q.relief(batch).get(0), 0);
        q.set(web, vec![], vec![]);
        q.set(eng, vec![], vec![]);
        assert!(!q.any_required());
    }
}
