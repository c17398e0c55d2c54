//! The allocator: decides which framework is offered which agent's free resources.
//!
//! A pure library (no I/O, no clock): the master core tells it about agents,
//! frameworks, allocations and filters, and asks it for a round of offers. Fairness is
//! Dominant Resource Fairness (Ghodsi et al.), as in Mesos's DRF sorter: the framework
//! whose largest share of any cluster resource is smallest goes first.

use std::collections::{BTreeMap, HashMap};

use agora_proto::Resources;

/// Offers smaller than this are not worth making (Mesos: --min_allocatable_resources).
pub const MIN_OFFER_MILLI_CPUS: i64 = 10;
pub const MIN_OFFER_MEM: i64 = 32 * 1024 * 1024;

#[derive(Debug, Clone)]
struct AgentSlot {
    total: Resources,
    /// Held by launched tasks or outstanding offers.
    allocated: Resources,
    active: bool,
}

#[derive(Debug, Clone, Default)]
struct FrameworkSlot {
    role: String,
    /// Everything currently allocated to the framework (tasks and offers), all agents.
    allocated: Resources,
    active: bool,
    suppressed: bool,
    /// agent id -> time (ms) until which this framework declined that agent.
    filters: HashMap<String, u64>,
}

/// One offer the allocator decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub framework_id: String,
    pub agent_id: String,
    pub role: String,
    pub resources: Resources,
}

#[derive(Debug, Default)]
pub struct Allocator {
    // BTreeMaps keep rounds deterministic, which the tests and simulations rely on.
    agents: BTreeMap<String, AgentSlot>,
    frameworks: BTreeMap<String, FrameworkSlot>,
    cluster_total: Resources,
}

impl Allocator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_agent(&mut self, agent_id: &str, total: Resources, allocated: Resources) {
        self.cluster_total.add(&total);
        self.agents.insert(
            agent_id.to_string(),
            AgentSlot {
                total,
                allocated,
                active: true,
            },
        );
    }

    pub fn remove_agent(&mut self, agent_id: &str) {
        if let Some(a) = self.agents.remove(agent_id) {
            self.cluster_total.sub(&a.total);
        }
        for f in self.frameworks.values_mut() {
            f.filters.remove(agent_id);
        }
    }

    /// An agent that is disconnected keeps its tasks but gets no new offers.
    pub fn set_agent_active(&mut self, agent_id: &str, active: bool) {
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.active = active;
        }
    }

    pub fn add_framework(&mut self, framework_id: &str, role: &str) {
        let f = self.frameworks.entry(framework_id.to_string()).or_default();
        f.role = role.to_string();
        f.active = true;
    }

    pub fn set_framework_active(&mut self, framework_id: &str, active: bool) {
        if let Some(f) = self.frameworks.get_mut(framework_id) {
            f.active = active;
        }
    }

    pub fn remove_framework(&mut self, framework_id: &str) {
        self.frameworks.remove(framework_id);
    }

    pub fn suppress(&mut self, framework_id: &str, suppressed: bool) {
        if let Some(f) = self.frameworks.get_mut(framework_id) {
            f.suppressed = suppressed;
            if !suppressed {
                f.filters.clear(); // REVIVE clears filters, as in Mesos
            }
        }
    }

    /// Resources already in use (e.g. tasks reported by a re-registering agent).
    pub fn track_used(&mut self, framework_id: &str, agent_id: &str, r: &Resources) {
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.allocated.add(r);
        }
        if let Some(f) = self.frameworks.get_mut(framework_id) {
            f.allocated.add(r);
        }
    }

    /// Returns resources to the free pool: a declined or rescinded offer, the unused
    /// part of an accepted one, or a finished task's. `refuse_until` filters this agent
    /// for the framework until then.
    pub fn recover(
        &mut self,
        framework_id: &str,
        agent_id: &str,
        r: &Resources,
        refuse_until: Option<u64>,
    ) {
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.allocated = a.allocated.checked_sub(r).unwrap_or_else(|| {
                debug_assert!(false, "recovering {r} not allocated on {agent_id}");
                Resources::new()
            });
        }
        if let Some(f) = self.frameworks.get_mut(framework_id) {
            f.allocated = f.allocated.checked_sub(r).unwrap_or_default();
            if let Some(until) = refuse_until {
                f.filters.insert(agent_id.to_string(), until);
            }
        }
    }

    pub fn agent_free(&self, agent_id: &str) -> Option<Resources> {
        self.agents
            .get(agent_id)
            .map(|a| a.total.checked_sub(&a.allocated).unwrap_or_default())
    }

    /// Largest free amount of each resource on any active agent: what "the most any
    /// agent offers" means when explaining why a task waits.
    pub fn max_free(&self) -> Resources {
        let mut best = Resources::new();
        for a in self.agents.values().filter(|a| a.active) {
            let free = a
                .total
                .checked_sub(&a.allocated)
                .unwrap_or_default()
                .unreserved();
            for n in free.names() {
                let have = free.get(&n);
                if have > best.get(&n) {
                    let mut add = Resources::new();
                    add.add_scalar(&n, "", have - best.get(&n));
                    best.add(&add);
                }
            }
        }
        best
    }

    /// Largest total of each resource on any agent, whether free or not.
    pub fn max_total(&self) -> Resources {
        let mut best = Resources::new();
        for a in self.agents.values() {
            for n in a.total.names() {
                let have = a.total.get(&n);
                if have > best.get(&n) {
                    let mut add = Resources::new();
                    add.add_scalar(&n, "", have - best.get(&n));
                    best.add(&add);
                }
            }
        }
        best
    }

    /// Dominant share of a framework, in parts per million of the cluster.
    fn dominant_share(&self, f: &FrameworkSlot) -> u64 {
        f.allocated
            .names()
            .iter()
            .map(|n| {
                let total = self.cluster_total.get(n);
                if total <= 0 {
                    0
                } else {
                    (f.allocated.get(n) as u128 * 1_000_000 / total as u128) as u64
                }
            })
            .max()
            .unwrap_or(0)
    }

    /// One allocation round: every active agent's free resources go, whole, to the
    /// framework with the lowest dominant share that has not filtered that agent.
    /// Each agent yields at most one offer per round.
    pub fn allocate(&mut self, now_ms: u64) -> Vec<Allocation> {
        let mut out = Vec::new();
        let agent_ids: Vec<String> = self.agents.keys().cloned().collect();
        for agent_id in agent_ids {
            let free = {
                let a = &self.agents[&agent_id];
                if !a.active {
                    continue;
                }
                a.total.checked_sub(&a.allocated).unwrap_or_default()
            };
            if free.milli_cpus() < MIN_OFFER_MILLI_CPUS && free.mem_bytes() < MIN_OFFER_MEM {
                continue;
            }
            // Pick the neediest eligible framework (DRF), ties broken by id.
            let choice = self
                .frameworks
                .iter()
                .filter(|(_, f)| f.active && !f.suppressed)
                .filter(|(_, f)| {
                    f.filters
                        .get(&agent_id)
                        .is_none_or(|until| *until <= now_ms)
                })
                .map(|(id, f)| (self.dominant_share(f), id.clone()))
                .min();
            let Some((_, framework_id)) = choice else {
                continue;
            };
            let f = self
                .frameworks
                .get_mut(&framework_id)
                .expect("chosen above");
            f.filters.remove(&agent_id);
            f.allocated.add(&free);
            let role = f.role.clone();
            self.agents
                .get_mut(&agent_id)
                .expect("listed above")
                .allocated
                .add(&free);
            out.push(Allocation {
                framework_id,
                agent_id,
                role,
                resources: free,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: i64 = 1 << 30;

    #[test]
    fn whole_free_agent_goes_to_lowest_dominant_share() {
        let mut a = Allocator::new();
        a.add_agent("a1", Resources::cpus_mem(4000, 4 * GIB), Resources::new());
        a.add_agent("a2", Resources::cpus_mem(4000, 4 * GIB), Resources::new());
        a.add_framework("f1", "*");
        a.add_framework("f2", "*");
        // f1 already holds a big share, so f2 is first.
        a.track_used("f1", "a1", &Resources::cpus_mem(2000, GIB));
        let offers = a.allocate(0);
        assert_eq!(offers.len(), 2);
        assert_eq!(offers[0].framework_id, "f2");
        assert_eq!(offers[0].agent_id, "a1");
        assert_eq!(offers[0].resources, Resources::cpus_mem(2000, 3 * GIB));
        // After f2 got half of a1, f1 (2/8 cpus) vs f2 (2/8 cpus, 3/8 mem): f1 next.
        assert_eq!(offers[1].framework_id, "f1");
        // Nothing left to offer.
        assert!(a.allocate(0).is_empty());
    }

    #[test]
    fn decline_filter_holds_until_it_expires() {
        let mut a = Allocator::new();
        a.add_agent("a1", Resources::cpus_mem(1000, GIB), Resources::new());
        a.add_framework("f1", "*");
        let o = a.allocate(0).pop().unwrap();
        a.recover("f1", "a1", &o.resources, Some(5_000));
        assert!(a.allocate(4_999).is_empty());
        assert_eq!(a.allocate(5_000).len(), 1);
    }

    #[test]
    fn suppressed_and_inactive_frameworks_get_nothing() {
        let mut a = Allocator::new();
        a.add_agent("a1", Resources::cpus_mem(1000, GIB), Resources::new());
        a.add_framework("f1", "*");
        a.suppress("f1", true);
        assert!(a.allocate(0).is_empty());
        a.suppress("f1", false);
        a.set_framework_active("f1", false);
        assert!(a.allocate(0).is_empty());
        a.set_framework_active("f1", true);
        a.set_agent_active("a1", false);
        assert!(a.allocate(0).is_empty());
    }

    #[test]
    fn explains_most_free_resources() {
        let mut a = Allocator::new();
        a.add_agent("a1", Resources::cpus_mem(2000, GIB), Resources::new());
        a.add_agent("a2", Resources::cpus_mem(1000, 8 * GIB), Resources::new());
        a.track_used("f", "a2", &Resources::cpus_mem(500, GIB));
        let m = a.max_free();
        assert_eq!(m.milli_cpus(), 2000);
        assert_eq!(m.mem_bytes(), 7 * GIB);
        assert_eq!(a.max_total().mem_bytes(), 8 * GIB);
    }
}
