//! The allocator: decides which framework, in which of its roles, is offered which
//! agent's free resources.
//!
//! A pure library (no I/O, no clock): the master core tells it about agents,
//! frameworks, allocations, filters, reservations, weights and quotas, and asks it for
//! a round of offers with `allocate(now_ms)`. As in Mesos, policy and mechanism are
//! split:
//! - `sorter`: the order in which clients, (framework, role) pairs, are offered
//!   resources: hierarchical weighted DRF across roles, then DRF across the
//!   frameworks of a role;
//! - `quota`: guarantees, limits, and the headroom that keeps guarantees satisfiable;
//! - `constraint`: which agents a framework accepts (attributes, hostname);
//! - `explain`: why a role, or a request, is waiting, as data;
//! - this file: agents, frameworks, reservations, filters, and the round itself.
//!
//! # A round
//! 1. Expired filters are dropped.
//! 2. **Guarantees first.** While some guarantee is unmet, every connected agent (in id
//!    order) is offered to the roles whose consumption would meet part of it (their
//!    `relief`, see `quota`), in increasing weighted share. Such a role gets the
//!    reservations it may use, plus unreserved resources: of a kind it relieves, at
//!    most its relief; of a kind other guarantees need, only the surplus; of other
//!    kinds, all; always within its limits.
//! 3. **Fair shares.** Every connected agent (in id order) is shown the sorter's order;
//!    the first client of a role that may take the agent (not filtered there, its
//!    constraints met) is offered what the role may get on it: reservations for the
//!    role or an ancestor, plus unreserved resources within the limits of the role and
//!    its ancestors and within `surplus + relief` (the headroom rule). The walk goes
//!    on to other roles while the agent still has something worth offering (a
//!    reservation for someone else, or what a limit held back).
//!
//! Shares are brought up to date after each agent (Mesos too sorts once per agent).
//! An offer is made only if it holds in full one of the `min_allocatable` bags. Offers
//! of one client on one agent within a round are merged: a (framework, role, agent)
//! gets at most one offer per round, and every offer has exactly one role.
//!
//! # Bookkeeping
//! Each agent keeps what it has handed out per owner: a client, or an "orphan" (a
//! framework the allocator does not know, e.g. tasks reported by a re-registering
//! agent before their framework is back, or the master's own "" for tasks that ended
//! but are not yet gone). Orphans hold resources but count for nobody's share or
//! quota. A framework that leaves keeps its clients (inactive) until their last
//! resources come back, so its running tasks still count for their roles.
//!
//! # Filters
//! A filter is per client and agent: declining (or leaving unused) resources of an
//! offer made in role R keeps that agent from the framework in role R until the given
//! time, whatever else becomes free on it. Reviving a role drops its filters.
//!
//! # Cost of a round
//! Per agent: O(1) to skip it when it is disconnected, has nothing worth offering, or
//! every candidate client has filtered it (a per-agent count); otherwise a walk of the
//! sorter's order that steps over filtered or ineligible clients (a bit test each;
//! constraints are evaluated when agents or constraints change, not per round) until
//! the first client that takes the agent, then O(depth · log n) to re-key the sorter
//! for each offer made. Shares are recomputed only for clients whose allocation
//! changed, or all at once when the cluster's total changed.

mod constraint;
mod explain;
mod qty;
mod quota;
mod roles;
mod sorter;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use agora_proto::Resources;

pub use constraint::{glob_match, Constraint, ConstraintField, ConstraintOp, ConstraintParseError};
pub use explain::{ResourceWait, UnmetGuarantee, WaitCause, WaitExplanation};
pub use quota::Quota;
pub use roles::validate_role;

use qty::{Bag, BitSet, Kind, Kinds, Part, Qty};
use quota::QuotaTracker;
use roles::{NodeId, RoleTree};
use sorter::{ClientId, Flow, Sorter, Visitor};

/// Offers smaller than this are not worth making (Mesos: --min_allocatable_resources).
/// These are the defaults of `AllocatorConfig::min_allocatable`.
pub const MIN_OFFER_MILLI_CPUS: i64 = 10;
pub const MIN_OFFER_MEM: i64 = 32 * 1024 * 1024;

/// The role of frameworks that name none.
pub const DEFAULT_ROLE: &str = "*";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// An offer is made only if it holds at least one of these bags in full (compared
    /// by name; reservation roles do not matter). The default, as in Mesos, is
    /// `[cpus:0.01]` or `[mem:32MiB]`. An empty list lets any non-empty offer through.
    pub min_allocatable: Vec<Resources>,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            min_allocatable: vec![
                Resources::cpus_mem(MIN_OFFER_MILLI_CPUS, 0),
                Resources::cpus_mem(0, MIN_OFFER_MEM),
            ],
        }
    }
}

/// The smallest weight a role may have.
pub const MIN_WEIGHT: f64 = 0.001;
/// The largest weight a role may have.
pub const MAX_WEIGHT: f64 = 1_000_000.0;

/// Why an operation on the allocator was refused. Each says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocatorError {
    /// What is wrong with a role's name (the caller names the role).
    #[error("{0}")]
    RoleName(&'static str),
    #[error("role `{role}` is not valid: {why}")]
    InvalidRole { role: String, why: String },
    #[error(
        "weight {weight} for role `{role}` is not valid; use a number from 0.001 to 1000000, such as 1 or 2.5"
    )]
    InvalidWeight { role: String, weight: String },
    #[error("quota for role `{role}` is not valid: {why}")]
    InvalidQuota { role: String, why: String },
    #[error("agent {0} is not registered; wait for it to register (see `agora agents`)")]
    UnknownAgent(String),
    #[error("framework {0} is not subscribed")]
    UnknownFramework(String),
    #[error("framework {framework_id} is not subscribed in role `{role}`; subscribe with that role first")]
    RoleNotSubscribed { framework_id: String, role: String },
    #[error("no resources given to {0}")]
    NoResources(&'static str),
    #[error("{resources} is already reserved; reserve unreserved resources (unreserve these first to move them)")]
    AlreadyReserved { resources: String },
    #[error("agent {agent_id} has {free} free and unreserved, not {asked}; wait for offers or tasks to give resources back, or reserve less")]
    NotFree {
        agent_id: String,
        asked: String,
        free: String,
    },
    #[error("reserving {amount} more {resource} for `{role}` would take `{limited_role}` past its quota limit ({consumed} of {limit} consumed); raise the limit or reserve less")]
    OverLimit {
        role: String,
        limited_role: String,
        resource: String,
        limit: i64,
        consumed: i64,
        amount: i64,
    },
    #[error("agent {agent_id} has {reserved} dynamically reserved for `{role}`, not {asked} (static reservations come from the agent's own resources and cannot be unreserved)")]
    NotReserved {
        agent_id: String,
        role: String,
        asked: String,
        reserved: String,
    },
    #[error("{asked} reserved for `{role}` on agent {agent_id} is in use (only {free} of it is free); wait until it is given back")]
    ReservationInUse {
        agent_id: String,
        role: String,
        asked: String,
        free: String,
    },
}

/// One offer the allocator decided on: one agent, one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub framework_id: String,
    pub agent_id: String,
    pub role: String,
    /// Reserved resources keep their role tag.
    pub resources: Resources,
}

type AgentIdx = usize;

/// Who holds allocated resources on an agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Owner {
    Client(ClientId),
    /// A framework the allocator does not know (its resources count for no role).
    Orphan(String),
}

#[derive(Debug)]
struct AgentSlot {
    id: String,
    hostname: String,
    attributes: BTreeMap<String, String>,
    /// Connected: offered, and its free unreserved resources count as headroom.
    active: bool,
    /// Everything, reservations (static and dynamic) tagged with their role.
    total: Bag,
    /// The dynamic reservations inside `total`.
    dynamic: Bag,
    /// Held by tasks and outstanding offers: the sum of `buckets`.
    allocated: Bag,
    buckets: BTreeMap<Owner, Bag>,
    // Derived from total - allocated (`refresh_agent`, kept in step by `shift_free`).
    free: Bag,
    free_qty: Qty,
    free_unreserved: Qty,
    /// Free reserved resources by reservation role, ordered by role id.
    free_reserved: Vec<(NodeId, Qty)>,
    /// More is allocated than the agent has (tasks reported beyond its total): then
    /// nothing is free, and the caches are re-derived on every change.
    overcommitted: bool,
    /// client -> time (ms) until which it declined this agent.
    filters: HashMap<ClientId, u64>,
    /// The keys of `filters`: what a round looks up for every client it steps over.
    /// Expired filters are purged before a round, so a set bit is a filter in force.
    filter_bits: BitSet,
    /// No filter expires before this (a lower bound).
    filters_min: u64,
    /// Filters of clients that are candidates: when this reaches the number of
    /// candidates, nobody can be offered this agent and a round skips it at once.
    candidate_filters: usize,
}

#[derive(Debug)]
struct ClientSlot {
    framework: String,
    role: NodeId,
    /// The framework is subscribed in this role (else the client only lingers until
    /// its resources come back).
    registered: bool,
    suppressed: bool,
    /// registered, framework active and not suppressed: what the sorter walks.
    candidate: bool,
    constraints: Vec<Constraint>,
    /// Agents meeting `constraints`; None when there are none.
    eligible: Option<BitSet>,
    /// Agents this client has a filter on.
    filtered: HashSet<AgentIdx>,
    /// Agents on which it holds resources.
    buckets: usize,
}

#[derive(Debug, Default)]
struct FrameworkSlot {
    active: bool,
    /// One client per role, in the order the framework gave its roles.
    clients: Vec<ClientId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Guarantees,
    Fair,
}

/// Everything but the sorter, so that a walk of the sorter can change it.
#[derive(Debug, Default)]
struct State {
    config: AllocatorConfig,
    min_allocatable: Vec<Vec<(Kind, i64)>>,
    kinds: Kinds,
    roles: RoleTree,
    quota: QuotaTracker,
    quotas: BTreeMap<String, Quota>,
    weights: BTreeMap<String, f64>,
    agents: Vec<Option<AgentSlot>>,
    free_agent_slots: Vec<AgentIdx>,
    /// Ordered: rounds visit agents in id order, which keeps them deterministic.
    agent_ids: BTreeMap<String, AgentIdx>,
    clients: Vec<Option<ClientSlot>>,
    free_client_slots: Vec<ClientId>,
    client_ids: HashMap<(String, NodeId), ClientId>,
    frameworks: BTreeMap<String, FrameworkSlot>,
    /// Clients with constraints (their eligibility follows agents' attributes).
    constrained: BTreeSet<ClientId>,
    /// Number of candidate clients.
    candidates: usize,
    /// All agents' resources, by kind.
    total: Qty,
}

#[derive(Debug)]
pub struct Allocator {
    sorter: Sorter,
    st: State,
}

impl Default for Allocator {
    fn default() -> Self {
        Self::new()
    }
}

fn normalize_role(role: &str) -> &str {
    if role.is_empty() {
        DEFAULT_ROLE
    } else {
        role
    }
}

fn check_role(role: &str) -> Result<(), AllocatorError> {
    validate_role(role).map_err(|why| AllocatorError::InvalidRole {
        role: role.to_string(),
        why: why.to_string(),
    })
}

impl Allocator {
    pub fn new() -> Self {
        Self::with_config(AllocatorConfig::default())
    }

    pub fn with_config(config: AllocatorConfig) -> Self {
        let mut a = Allocator {
            sorter: Sorter::default(),
            st: State::default(),
        };
        a.set_config(config);
        a
    }

    pub fn set_config(&mut self, config: AllocatorConfig) {
        let st = &mut self.st;
        st.min_allocatable = config
            .min_allocatable
            .iter()
            .map(|r| {
                r.unreserved()
                    .to_proto()
                    .iter()
                    .map(|x| (st.intern_kind(&x.name), x.value))
                    .collect()
            })
            .collect();
        st.config = config;
    }

    pub fn config(&self) -> &AllocatorConfig {
        &self.st.config
    }

    // ---- agents -----------------------------------------------------------------

    /// A new agent (an existing id is replaced). `total` may hold static reservations
    /// (resources with a role); `allocated` is in use by no known framework.
    pub fn add_agent(&mut self, agent_id: &str, total: Resources, allocated: Resources) {
        if self.st.agent_ids.contains_key(agent_id) {
            self.remove_agent(agent_id);
        }
        let st = &mut self.st;
        let total = st.bag(&total);
        let slot = AgentSlot {
            id: agent_id.to_string(),
            hostname: String::new(),
            attributes: BTreeMap::new(),
            active: true,
            total: total.clone(),
            dynamic: Bag::default(),
            allocated: Bag::default(),
            buckets: BTreeMap::new(),
            free: Bag::default(),
            free_qty: Qty::default(),
            free_unreserved: Qty::default(),
            free_reserved: Vec::new(),
            overcommitted: false,
            filters: HashMap::new(),
            filter_bits: BitSet::default(),
            filters_min: u64::MAX,
            candidate_filters: 0,
        };
        let ai = match st.free_agent_slots.pop() {
            Some(i) => {
                st.agents[i] = Some(slot);
                i
            }
            None => {
                st.agents.push(Some(slot));
                st.agents.len() - 1
            }
        };
        st.agent_ids.insert(agent_id.to_string(), ai);
        for &(k, tag, v) in total.parts() {
            st.total.add_at(k, v);
            if let Some(t) = tag {
                st.quota.add_consumed(t, k, v); // an unallocated reservation
            }
        }
        st.refresh_agent(ai);
        if !allocated.is_empty() {
            let allocated = st.bag(&allocated);
            st.charge(ai, &Owner::Orphan(String::new()), &allocated);
        }
        for c in st.constrained.clone() {
            let ok = st.meets(c, ai);
            st.client_eligible(c).set(ai, ok);
        }
        self.sorter.ensure(&st.roles);
        self.sorter.set_total(&st.total);
    }

    /// Where an agent is and what it is, for offer constraints.
    pub fn set_agent_attributes(
        &mut self,
        agent_id: &str,
        hostname: &str,
        attributes: BTreeMap<String, String>,
    ) -> Result<(), AllocatorError> {
        let st = &mut self.st;
        let ai = st.agent_idx(agent_id)?;
        let a = st.agent_mut(ai);
        a.hostname = hostname.to_string();
        a.attributes = attributes;
        for c in st.constrained.clone() {
            let ok = st.meets(c, ai);
            st.client_eligible(c).set(ai, ok);
        }
        Ok(())
    }

    /// Forgets an agent. The master recovers its offers and tasks first; whatever is
    /// still allocated on it is released here.
    pub fn remove_agent(&mut self, agent_id: &str) {
        let Allocator { sorter, st } = self;
        let Some(&ai) = st.agent_ids.get(agent_id) else {
            return;
        };
        let buckets: Vec<(Owner, Bag)> = st
            .agent(ai)
            .buckets
            .iter()
            .map(|(o, b)| (o.clone(), b.clone()))
            .collect();
        for (owner, b) in buckets {
            if let Some((c, q)) = st.discharge(ai, &owner, &b) {
                sorter.add_alloc(c, &q, -1);
                st.maybe_free_client(sorter, c);
            }
        }
        let total = st.agent(ai).total.clone();
        for &(k, tag, v) in total.parts() {
            st.total.add_at(k, -v);
            if let Some(t) = tag {
                st.quota.add_consumed(t, k, -v);
            }
        }
        let filtered: Vec<ClientId> = st.agent(ai).filters.keys().copied().collect();
        for c in filtered {
            st.client_mut(c).filtered.remove(&ai);
        }
        if st.agent(ai).active {
            let free = st.agent(ai).free_unreserved.clone();
            st.quota.add_available(&free, -1);
        }
        for c in st.constrained.clone() {
            st.client_eligible(c).set(ai, false);
        }
        st.agents[ai] = None;
        st.free_agent_slots.push(ai);
        st.agent_ids.remove(agent_id);
        sorter.set_total(&st.total);
    }

    /// An agent that is disconnected keeps its tasks but gets no new offers, and its
    /// free resources do not count as headroom.
    pub fn set_agent_active(&mut self, agent_id: &str, active: bool) {
        let st = &mut self.st;
        let Some(&ai) = st.agent_ids.get(agent_id) else {
            return;
        };
        if st.agent(ai).active == active {
            return;
        }
        st.agent_mut(ai).active = active;
        let free = st.agent(ai).free_unreserved.clone();
        st.quota.add_available(&free, if active { 1 } else { -1 });
    }

    // ---- frameworks ---------------------------------------------------------------

    /// Subscribes a framework in one role (see `add_framework_roles`).
    pub fn add_framework(&mut self, framework_id: &str, role: &str) {
        self.add_framework_roles(framework_id, &[role]);
    }

    /// Subscribes a framework (again) in these roles, and makes it active. Roles it
    /// held before and does not name now are left; their allocations still count for
    /// them until given back. No role means the default role `*`.
    pub fn add_framework_roles<S: AsRef<str>>(&mut self, framework_id: &str, roles: &[S]) {
        let Allocator { sorter, st } = self;
        let mut nodes: Vec<NodeId> = Vec::new();
        for r in roles {
            let n = st.intern_role(normalize_role(r.as_ref()));
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
        if nodes.is_empty() {
            nodes.push(st.intern_role(DEFAULT_ROLE));
        }
        sorter.ensure(&st.roles);
        let fw = st.frameworks.entry(framework_id.to_string()).or_default();
        fw.active = true;
        let old = std::mem::take(&mut fw.clients);
        let mut new = Vec::with_capacity(nodes.len());
        for n in nodes {
            let c = match st.client_ids.get(&(framework_id.to_string(), n)) {
                Some(&c) => c,
                None => st.new_client(sorter, framework_id, n),
            };
            st.client_mut(c).registered = true;
            new.push(c);
        }
        st.frameworks
            .get_mut(framework_id)
            .expect("inserted above")
            .clients = new.clone();
        for c in old.into_iter().filter(|c| !new.contains(c)) {
            st.unregister_client(sorter, c);
        }
        for c in new {
            st.update_candidate(sorter, c);
        }
    }

    /// The roles a framework is subscribed in.
    pub fn framework_roles(&self, framework_id: &str) -> Option<Vec<String>> {
        let fw = self.st.frameworks.get(framework_id)?;
        Some(
            fw.clients
                .iter()
                .map(|&c| self.st.roles.path(self.st.client(c).role).to_string())
                .collect(),
        )
    }

    pub fn set_framework_active(&mut self, framework_id: &str, active: bool) {
        let Allocator { sorter, st } = self;
        let Some(fw) = st.frameworks.get_mut(framework_id) else {
            return;
        };
        fw.active = active;
        for c in fw.clients.clone() {
            st.update_candidate(sorter, c);
        }
    }

    /// Forgets a framework. Resources it still holds stay allocated (in its roles)
    /// until they are recovered.
    pub fn remove_framework(&mut self, framework_id: &str) {
        let Allocator { sorter, st } = self;
        let Some(fw) = st.frameworks.remove(framework_id) else {
            return;
        };
        for c in fw.clients {
            st.unregister_client(sorter, c);
        }
    }

    /// SUPPRESS (true) or REVIVE (false) in every role of the framework. Reviving
    /// drops the framework's filters, as in Mesos.
    pub fn suppress(&mut self, framework_id: &str, suppressed: bool) {
        let Allocator { sorter, st } = self;
        let Some(fw) = st.frameworks.get(framework_id) else {
            return;
        };
        for c in fw.clients.clone() {
            st.suppress_client(sorter, c, suppressed);
        }
    }

    /// SUPPRESS or REVIVE one role of a framework.
    pub fn suppress_role(
        &mut self,
        framework_id: &str,
        role: &str,
        suppressed: bool,
    ) -> Result<(), AllocatorError> {
        let c = self.st.subscribed_client(framework_id, role)?;
        let Allocator { sorter, st } = self;
        st.suppress_client(sorter, c, suppressed);
        Ok(())
    }

    /// The agents a framework accepts in one of its roles: all of these must hold.
    /// An empty list accepts every agent.
    pub fn set_constraints(
        &mut self,
        framework_id: &str,
        role: &str,
        constraints: Vec<Constraint>,
    ) -> Result<(), AllocatorError> {
        let st = &mut self.st;
        let c = st.subscribed_client(framework_id, role)?;
        st.client_mut(c).constraints = constraints;
        if st.client(c).constraints.is_empty() {
            st.client_mut(c).eligible = None;
            st.constrained.remove(&c);
        } else {
            let mut bits = BitSet::default();
            for &ai in st.agent_ids.values() {
                bits.set(ai, st.meets(c, ai));
            }
            st.client_mut(c).eligible = Some(bits);
            st.constrained.insert(c);
        }
        Ok(())
    }

    // ---- allocations ----------------------------------------------------------------

    /// Resources already in use (e.g. tasks reported by a re-registering agent),
    /// counted for the framework's first role.
    pub fn track_used(&mut self, framework_id: &str, agent_id: &str, r: &Resources) {
        let role = self.st.frameworks.get(framework_id).and_then(|f| {
            f.clients
                .first()
                .map(|&c| self.st.roles.path(self.st.client(c).role).to_string())
        });
        match role {
            Some(role) => self.track_used_role(framework_id, &role, agent_id, r),
            None => {
                let st = &mut self.st;
                if let Some(&ai) = st.agent_ids.get(agent_id) {
                    let b = st.bag(r);
                    st.charge(ai, &Owner::Orphan(framework_id.to_string()), &b);
                }
            }
        }
    }

    /// Resources in use by a framework in one role. A framework not subscribed in
    /// that role holds them without a role (no share, no quota).
    pub fn track_used_role(
        &mut self,
        framework_id: &str,
        role: &str,
        agent_id: &str,
        r: &Resources,
    ) {
        let Allocator { sorter, st } = self;
        let Some(&ai) = st.agent_ids.get(agent_id) else {
            return;
        };
        if r.is_empty() {
            return;
        }
        let owner = match st.subscribed_client(framework_id, role) {
            Ok(c) => Owner::Client(c),
            Err(_) => Owner::Orphan(framework_id.to_string()),
        };
        let b = st.bag(r);
        if let Some((c, q)) = st.charge(ai, &owner, &b) {
            sorter.add_alloc(c, &q, 1);
        }
    }

    /// Returns resources to the free pool: a declined or rescinded offer, the unused
    /// part of an accepted one, or a finished task's. `refuse_until` filters this agent
    /// for the framework, in the role(s) the resources were allocated to, until then.
    pub fn recover(
        &mut self,
        framework_id: &str,
        agent_id: &str,
        r: &Resources,
        refuse_until: Option<u64>,
    ) {
        self.recover_inner(framework_id, None, agent_id, r, refuse_until);
    }

    /// `recover` for resources allocated to the framework in one role.
    pub fn recover_role(
        &mut self,
        framework_id: &str,
        role: &str,
        agent_id: &str,
        r: &Resources,
        refuse_until: Option<u64>,
    ) {
        let role = normalize_role(role).to_string();
        self.recover_inner(framework_id, Some(&role), agent_id, r, refuse_until);
    }

    fn recover_inner(
        &mut self,
        framework_id: &str,
        role: Option<&str>,
        agent_id: &str,
        r: &Resources,
        refuse_until: Option<u64>,
    ) {
        let Allocator { sorter, st } = self;
        let Some(&ai) = st.agent_ids.get(agent_id) else {
            return;
        };
        let role_node = role.and_then(|r| st.roles.find(r));
        // Whose resources these are: the framework's clients on this agent, in role
        // order (or the one named), then what it holds as an orphan.
        let mut owners: Vec<Owner> = match role {
            Some(_) => role_node
                .and_then(|n| st.client_ids.get(&(framework_id.to_string(), n)))
                .map(|&c| Owner::Client(c))
                .into_iter()
                .collect(),
            None => {
                let mut v: Vec<(String, Owner)> = st
                    .agent(ai)
                    .buckets
                    .keys()
                    .filter_map(|o| match o {
                        Owner::Client(c) if st.client(*c).framework == framework_id => {
                            Some((st.roles.path(st.client(*c).role).to_string(), o.clone()))
                        }
                        _ => None,
                    })
                    .collect();
                v.sort();
                v.into_iter().map(|(_, o)| o).collect()
            }
        };
        owners.push(Owner::Orphan(framework_id.to_string()));
        let want = st.bag(r);
        let buckets = &st.agent(ai).buckets;
        let mut plan: Vec<(Owner, Bag)> = Vec::new();
        if let Some(o) = owners
            .iter()
            .find(|o| buckets.get(*o).is_some_and(|b| b.contains(&want)))
        {
            plan.push((o.clone(), want));
        } else {
            // Spread over the owners (e.g. a task that ran on resources offered in two
            // roles is given back at once).
            let mut left: Vec<Part> = want.parts().to_vec();
            for o in &owners {
                let Some(b) = buckets.get(o) else { continue };
                let mut part = Vec::new();
                for (k, t, need) in left.iter_mut() {
                    let take = (*need).min(b.get(*k, *t));
                    if take > 0 {
                        part.push((*k, *t, take));
                        *need -= take;
                    }
                }
                if !part.is_empty() {
                    plan.push((o.clone(), Bag::from_parts(part)));
                }
            }
            debug_assert!(
                left.iter().all(|(_, _, v)| *v == 0),
                "recovering {r} not allocated on {agent_id} to framework {framework_id}"
            );
        }
        let mut touched = Vec::new();
        for (owner, part) in plan {
            if let Some((c, q)) = st.discharge(ai, &owner, &part) {
                sorter.add_alloc(c, &q, -1);
                touched.push(c);
            }
        }
        if let Some(until) = refuse_until {
            let targets: Vec<ClientId> = if !touched.is_empty() {
                touched.clone()
            } else {
                match st.frameworks.get(framework_id) {
                    Some(fw) => fw
                        .clients
                        .iter()
                        .copied()
                        .filter(|&c| role_node.is_none_or(|n| st.client(c).role == n))
                        .collect(),
                    None => Vec::new(),
                }
            };
            for c in targets {
                if st.client(c).registered {
                    st.add_filter(c, ai, until);
                }
            }
        }
        for c in touched {
            st.maybe_free_client(sorter, c);
        }
    }

    // ---- weights, quotas, reservations ------------------------------------------------

    /// A role's weight among its siblings (default 1).
    /// Sets a role's weight, from [`MIN_WEIGHT`] to [`MAX_WEIGHT`]: beyond, shares
    /// lose their precision (and `1e308` or `1e-300` mean nothing an operator wants).
    pub fn set_weight(&mut self, role: &str, weight: f64) -> Result<(), AllocatorError> {
        check_role(role)?;
        if !(MIN_WEIGHT..=MAX_WEIGHT).contains(&weight) {
            return Err(AllocatorError::InvalidWeight {
                role: role.to_string(),
                weight: weight.to_string(),
            });
        }
        let n = self.st.intern_role(role);
        self.sorter.ensure(&self.st.roles);
        self.sorter.set_weight(n, weight);
        self.st.weights.insert(role.to_string(), weight);
        Ok(())
    }

    pub fn weight(&self, role: &str) -> f64 {
        self.st.weights.get(role).copied().unwrap_or(1.0)
    }

    /// Sets (or, with an empty `Quota`, clears) a role's guarantee and limit. Takes
    /// effect from the next round; nothing already allocated is taken back.
    pub fn set_quota(&mut self, role: &str, quota: Quota) -> Result<(), AllocatorError> {
        check_role(role)?;
        if let Some(why) = quota.problem() {
            return Err(AllocatorError::InvalidQuota {
                role: role.to_string(),
                why,
            });
        }
        let st = &mut self.st;
        let n = st.intern_role(role);
        let g: Vec<(Kind, i64)> = quota
            .guarantee
            .iter()
            .map(|(name, v)| (st.intern_kind(name), *v))
            .collect();
        let l: Vec<(Kind, i64)> = quota
            .limit
            .iter()
            .map(|(name, v)| (st.intern_kind(name), *v))
            .collect();
        st.quota.set(n, g, l);
        if quota.is_empty() {
            st.quotas.remove(role);
        } else {
            st.quotas.insert(role.to_string(), quota);
        }
        Ok(())
    }

    pub fn quota(&self, role: &str) -> Option<&Quota> {
        self.st.quotas.get(role)
    }

    /// What a role and its descendants consume against quota: allocations plus
    /// unallocated reservations (quantities, without role tags).
    pub fn role_consumed(&self, role: &str) -> Resources {
        let mut out = Resources::new();
        if let Some(n) = self.st.roles.find(role) {
            for (k, v) in self.st.quota.consumed(n).iter() {
                if v > 0 {
                    out.add_scalar(self.st.kinds.name(k), "", v);
                }
            }
        }
        out
    }

    /// RESERVE: moves free, unreserved `resources` of an agent into a dynamic
    /// reservation for `role`. Refused if they are not free, or if the reservation
    /// would take the role (or an ancestor) past its quota limit.
    pub fn reserve(
        &mut self,
        agent_id: &str,
        role: &str,
        resources: &Resources,
    ) -> Result<(), AllocatorError> {
        check_role(role)?;
        if role == DEFAULT_ROLE {
            return Err(AllocatorError::InvalidRole {
                role: role.to_string(),
                why: "resources cannot be reserved for the default role".into(),
            });
        }
        let st = &mut self.st;
        let ai = st.agent_idx(agent_id)?;
        if resources.is_empty() {
            return Err(AllocatorError::NoResources("reserve"));
        }
        if resources.unreserved() != *resources {
            return Err(AllocatorError::AlreadyReserved {
                resources: resources.to_string(),
            });
        }
        let plain = st.bag(resources);
        let a = st.agent(ai);
        if !a.free.contains(&plain) {
            let free = st.qty_resources(&a.free_unreserved);
            return Err(AllocatorError::NotFree {
                agent_id: agent_id.to_string(),
                asked: resources.to_string(),
                free: free.to_string(),
            });
        }
        let n = st.intern_role(role);
        for m in st.roles.path_up(n) {
            for &(k, _, v) in plain.parts() {
                if let Some(limit) = st.quota.limit_of(m, k) {
                    let consumed = st.quota.consumed(m).get(k);
                    if consumed + v > limit {
                        return Err(AllocatorError::OverLimit {
                            role: role.to_string(),
                            limited_role: st.roles.path(m).to_string(),
                            resource: st.kinds.name(k).to_string(),
                            limit,
                            consumed,
                            amount: v,
                        });
                    }
                }
            }
        }
        for &(k, _, v) in plain.parts() {
            st.quota.add_consumed(n, k, v);
        }
        let tagged = Bag::from_parts(plain.parts().iter().map(|&(k, _, v)| (k, Some(n), v)));
        let a = st.agent_mut(ai);
        a.total.sub(&plain);
        a.total.add(&tagged);
        a.dynamic.add(&tagged);
        st.refresh_agent(ai);
        Ok(())
    }

    /// UNRESERVE: gives free resources dynamically reserved for `role` back to the
    /// unreserved pool. `resources` may carry the role tag or none.
    pub fn unreserve(
        &mut self,
        agent_id: &str,
        role: &str,
        resources: &Resources,
    ) -> Result<(), AllocatorError> {
        check_role(role)?;
        let st = &mut self.st;
        let ai = st.agent_idx(agent_id)?;
        if resources.is_empty() {
            return Err(AllocatorError::NoResources("unreserve"));
        }
        if resources
            .to_proto()
            .iter()
            .any(|x| !x.role.is_empty() && x.role != role)
        {
            return Err(AllocatorError::NotReserved {
                agent_id: agent_id.to_string(),
                role: role.to_string(),
                asked: resources.to_string(),
                reserved: st.reserved_for(ai, role, false).to_string(),
            });
        }
        let n = st.intern_role(role);
        let plain = st.bag(&resources.unreserved());
        let tagged = Bag::from_parts(plain.parts().iter().map(|&(k, _, v)| (k, Some(n), v)));
        let a = st.agent(ai);
        if !a.dynamic.contains(&tagged) {
            return Err(AllocatorError::NotReserved {
                agent_id: agent_id.to_string(),
                role: role.to_string(),
                asked: st.resources(&tagged).to_string(),
                reserved: st.reserved_for(ai, role, false).to_string(),
            });
        }
        if !a.free.contains(&tagged) {
            return Err(AllocatorError::ReservationInUse {
                agent_id: agent_id.to_string(),
                role: role.to_string(),
                asked: st.resources(&tagged).to_string(),
                free: st.reserved_for(ai, role, true).to_string(),
            });
        }
        for &(k, _, v) in plain.parts() {
            st.quota.add_consumed(n, k, -v);
        }
        let a = st.agent_mut(ai);
        a.total.sub(&tagged);
        a.total.add(&plain);
        a.dynamic.sub(&tagged);
        st.refresh_agent(ai);
        Ok(())
    }

    /// The dynamic reservations of an agent (for the master to persist and restore).
    pub fn dynamic_reservations(&self, agent_id: &str) -> Option<Resources> {
        let ai = *self.st.agent_ids.get(agent_id)?;
        Some(self.st.resources(&self.st.agent(ai).dynamic))
    }

    // ---- queries ----------------------------------------------------------------------

    pub fn agent_free(&self, agent_id: &str) -> Option<Resources> {
        let ai = *self.st.agent_ids.get(agent_id)?;
        Some(self.st.resources(&self.st.agent(ai).free))
    }

    /// Largest free amount of each resource on any active agent, reserved or not:
    /// what "the most any agent offers" means when explaining why a task waits.
    pub fn max_free(&self) -> Resources {
        let mut best: BTreeMap<String, i64> = BTreeMap::new();
        for a in self.st.live_agents().filter(|a| a.active) {
            for (k, v) in a.free_qty.iter() {
                let e = best.entry(self.st.kinds.name(k).to_string()).or_insert(0);
                *e = (*e).max(v);
            }
        }
        best_to_resources(best)
    }

    /// Largest total of each resource on any agent, whether free or not.
    pub fn max_total(&self) -> Resources {
        let mut best: BTreeMap<String, i64> = BTreeMap::new();
        for a in self.st.live_agents() {
            for (k, v) in a.total.qty().iter() {
                let e = best.entry(self.st.kinds.name(k).to_string()).or_insert(0);
                *e = (*e).max(v);
            }
        }
        best_to_resources(best)
    }

    /// Sum of each resource over every registered agent, free or not, reserved or
    /// not: the capacity quota guarantees are checked against.
    pub fn total_capacity(&self) -> BTreeMap<String, i64> {
        let mut sum: BTreeMap<String, i64> = BTreeMap::new();
        for a in self.st.live_agents() {
            for (k, v) in a.total.qty().iter() {
                let e = sum.entry(self.st.kinds.name(k).to_string()).or_insert(0);
                *e = e.saturating_add(v);
            }
        }
        sum
    }

    /// Every role with a quota, with it.
    pub fn quotas(&self) -> impl Iterator<Item = (&str, &Quota)> {
        self.st.quotas.iter().map(|(r, q)| (r.as_str(), q))
    }

    // ---- the round ---------------------------------------------------------------------

    /// One allocation round (see the module comment).
    pub fn allocate(&mut self, now_ms: u64) -> Vec<Allocation> {
        let Allocator { sorter, st } = self;
        sorter.ensure(&st.roles);
        sorter.refresh();
        let order: Vec<AgentIdx> = st.agent_ids.values().copied().collect();
        for &ai in &order {
            st.purge_filters(ai, now_ms);
        }
        let mut round = Round::default();
        if st.candidates == 0 {
            return Vec::new();
        }
        if st.quota.any_required() {
            let roles: Vec<NodeId> = sorter
                .active_roles()
                .into_iter()
                .filter(|&r| st.quota.has_relief(r))
                .collect();
            for &ai in order.iter().filter(|_| !roles.is_empty()) {
                if !st.agent_open(ai) {
                    continue;
                }
                let mut by_share = roles.clone();
                by_share.sort_by_cached_key(|&r| sorter.role_key(r));
                let mut deltas = Vec::new();
                for r in by_share {
                    if !st.agent_open(ai) {
                        break;
                    }
                    if !st.quota.has_relief(r) {
                        continue;
                    }
                    let Some(parts) = st.role_offer(r, ai, Stage::Guarantees) else {
                        continue;
                    };
                    let chosen = sorter
                        .clients_of(r)
                        .find(|&c| st.client_can_take(c, ai, now_ms));
                    if let Some(c) = chosen {
                        deltas.push(st.grant(c, ai, parts, &mut round));
                    }
                }
                for (c, q) in deltas {
                    sorter.add_alloc(c, &q, 1);
                }
            }
        }
        for &ai in &order {
            if !st.agent_open(ai) {
                continue;
            }
            let mut visit = FairVisit {
                st: &mut *st,
                ai,
                now: now_ms,
                round: &mut round,
                deltas: Vec::new(),
            };
            sorter.walk(&mut visit);
            for (c, q) in visit.deltas {
                sorter.add_alloc(c, &q, 1);
            }
        }
        round.finish(st)
    }
}

fn best_to_resources(best: BTreeMap<String, i64>) -> Resources {
    let mut out = Resources::new();
    for (n, v) in best {
        out.add_scalar(&n, "", v);
    }
    out
}

/// The offers of a round, merged per (client, agent).
#[derive(Default)]
struct Round {
    out: Vec<(ClientId, AgentIdx, Bag)>,
    index: HashMap<(ClientId, AgentIdx), usize>,
}

impl Round {
    fn add(&mut self, c: ClientId, ai: AgentIdx, r: Bag) {
        match self.index.get(&(c, ai)) {
            Some(&i) => self.out[i].2.add(&r),
            None => {
                self.index.insert((c, ai), self.out.len());
                self.out.push((c, ai, r));
            }
        }
    }

    fn finish(self, st: &State) -> Vec<Allocation> {
        self.out
            .into_iter()
            .map(|(c, ai, bag)| {
                let cl = st.client(c);
                Allocation {
                    framework_id: cl.framework.clone(),
                    agent_id: st.agent(ai).id.clone(),
                    role: st.roles.path(cl.role).to_string(),
                    resources: st.resources(&bag),
                }
            })
            .collect()
    }
}

/// The fair-share stage for one agent: takes the sorter's walk and offers the agent
/// to the first client of each role that may take it.
struct FairVisit<'a> {
    st: &'a mut State,
    ai: AgentIdx,
    now: u64,
    round: &'a mut Round,
    /// Sorter updates, applied once the agent is done.
    deltas: Vec<(ClientId, Qty)>,
}

impl Visitor for FairVisit<'_> {
    fn enter(&mut self, role: NodeId) -> bool {
        // A subtree can use unreserved resources, or reservations of a role on its
        // path; skip it when the agent has neither.
        let a = self.st.agent(self.ai);
        !a.free_unreserved.is_zero()
            || a.free_reserved
                .iter()
                .any(|(t, _)| self.st.roles.related(*t, role))
    }

    fn visit(&mut self, role: NodeId, c: ClientId) -> Flow {
        if !self.st.client_can_take(c, self.ai, self.now) {
            return Flow::Next;
        }
        // Every client of the role would be offered the same: if this one gets
        // nothing, neither would the others.
        let Some(parts) = self.st.role_offer(role, self.ai, Stage::Fair) else {
            return Flow::RoleDone;
        };
        let delta = self.st.grant(c, self.ai, parts, self.round);
        self.deltas.push(delta);
        if self.st.agent_open(self.ai) {
            Flow::RoleDone
        } else {
            Flow::Stop
        }
    }
}

impl State {
    fn agent(&self, ai: AgentIdx) -> &AgentSlot {
        self.agents[ai].as_ref().expect("live agent")
    }

    fn agent_mut(&mut self, ai: AgentIdx) -> &mut AgentSlot {
        self.agents[ai].as_mut().expect("live agent")
    }

    fn live_agents(&self) -> impl Iterator<Item = &AgentSlot> {
        self.agent_ids.values().map(|&ai| self.agent(ai))
    }

    fn agent_idx(&self, agent_id: &str) -> Result<AgentIdx, AllocatorError> {
        self.agent_ids
            .get(agent_id)
            .copied()
            .ok_or_else(|| AllocatorError::UnknownAgent(agent_id.to_string()))
    }

    fn client(&self, c: ClientId) -> &ClientSlot {
        self.clients[c].as_ref().expect("live client")
    }

    fn client_mut(&mut self, c: ClientId) -> &mut ClientSlot {
        self.clients[c].as_mut().expect("live client")
    }

    fn client_eligible(&mut self, c: ClientId) -> &mut BitSet {
        self.client_mut(c)
            .eligible
            .as_mut()
            .expect("constrained clients have an eligibility set")
    }

    /// The client of a framework in a role it is subscribed in.
    fn subscribed_client(
        &self,
        framework_id: &str,
        role: &str,
    ) -> Result<ClientId, AllocatorError> {
        let fw = self
            .frameworks
            .get(framework_id)
            .ok_or_else(|| AllocatorError::UnknownFramework(framework_id.to_string()))?;
        let role = normalize_role(role);
        let n = self.roles.find(role);
        fw.clients
            .iter()
            .copied()
            .find(|&c| Some(self.client(c).role) == n)
            .ok_or_else(|| AllocatorError::RoleNotSubscribed {
                framework_id: framework_id.to_string(),
                role: role.to_string(),
            })
    }

    fn intern_role(&mut self, role: &str) -> NodeId {
        let n = self.roles.intern(role);
        self.quota.ensure(&self.roles, self.kinds.len());
        n
    }

    fn intern_kind(&mut self, name: &str) -> Kind {
        let k = self.kinds.intern(name);
        self.quota.ensure(&self.roles, self.kinds.len());
        k
    }

    /// `Resources` as the allocator's own bag (names and roles interned).
    fn bag(&mut self, r: &Resources) -> Bag {
        let parts: Vec<Part> = r
            .to_proto()
            .into_iter()
            .map(|x| {
                let k = self.intern_kind(&x.name);
                let tag = if x.role.is_empty() {
                    None
                } else {
                    Some(self.intern_role(&x.role))
                };
                (k, tag, x.value)
            })
            .collect();
        Bag::from_parts(parts)
    }

    fn resources(&self, b: &Bag) -> Resources {
        let mut r = Resources::new();
        for &(k, tag, v) in b.parts() {
            r.add_scalar(
                self.kinds.name(k),
                tag.map_or("", |t| self.roles.path(t)),
                v,
            );
        }
        r
    }

    fn qty_resources(&self, q: &Qty) -> Resources {
        let mut r = Resources::new();
        for (k, v) in q.iter().filter(|(_, v)| *v > 0) {
            r.add_scalar(self.kinds.name(k), "", v);
        }
        r
    }

    /// What an agent has dynamically reserved for `role` (with `free`: of it, free).
    fn reserved_for(&self, ai: AgentIdx, role: &str, free: bool) -> Resources {
        let a = self.agent(ai);
        let n = self.roles.find(role);
        let parts = a
            .dynamic
            .parts()
            .iter()
            .filter(|&&(_, t, _)| t.is_some() && t == n)
            .map(|&(k, t, v)| (k, t, if free { v.min(a.free.get(k, t)) } else { v }));
        self.resources(&Bag::from_parts(parts))
    }

    /// Worth offering: holds at least one of the `min_allocatable` bags.
    fn worth(&self, q: &Qty) -> bool {
        !q.is_zero()
            && (self.min_allocatable.is_empty()
                || self
                    .min_allocatable
                    .iter()
                    .any(|alt| alt.iter().all(|&(k, v)| q.get(k) >= v)))
    }

    /// Re-derives an agent's free resources after its total changed.
    fn refresh_agent(&mut self, ai: AgentIdx) {
        let a = self.agent(ai);
        let free = a.total.checked_sub(&a.allocated);
        let overcommitted = free.is_none();
        let free = free.unwrap_or_default();
        let mut all = Qty::default();
        let mut unreserved = Qty::default();
        let mut reserved: Vec<(NodeId, Qty)> = Vec::new();
        for &(k, tag, v) in free.parts() {
            all.add_at(k, v);
            match tag {
                None => unreserved.add_at(k, v),
                Some(t) => match reserved.iter_mut().find(|(n, _)| *n == t) {
                    Some((_, q)) => q.add_at(k, v),
                    None => {
                        let mut q = Qty::default();
                        q.add_at(k, v);
                        reserved.push((t, q));
                    }
                },
            }
        }
        reserved.sort_by_key(|(n, _)| *n);
        let a = self.agents[ai].as_mut().expect("live agent");
        if a.active {
            self.quota.add_available(&a.free_unreserved, -1);
            self.quota.add_available(&unreserved, 1);
        }
        a.free = free;
        a.free_qty = all;
        a.free_unreserved = unreserved;
        a.free_reserved = reserved;
        a.overcommitted = overcommitted;
    }

    /// Takes `r` (split as `parts`) from an agent's free resources (`sign` -1) or
    /// gives it back (1), keeping the caches in step without re-deriving them: this
    /// is the inner loop of a round.
    fn shift_free(&mut self, ai: AgentIdx, b: &Bag, sign: i64) {
        let a = self.agents[ai].as_mut().expect("live agent");
        match (a.overcommitted, sign < 0) {
            (false, true) if a.free.contains(b) => a.free.sub(b),
            (false, false) => a.free.add(b),
            _ => return self.refresh_agent(ai),
        }
        for &(k, tag, v) in b.parts() {
            a.free_qty.add_at(k, sign * v);
            match tag {
                None => {
                    a.free_unreserved.add_at(k, sign * v);
                    if a.active {
                        self.quota.add_available(&Qty::one(k, v), sign);
                    }
                }
                Some(t) => match a.free_reserved.binary_search_by_key(&t, |(n, _)| *n) {
                    Ok(i) => {
                        a.free_reserved[i].1.add_at(k, sign * v);
                        if a.free_reserved[i].1.is_zero() {
                            a.free_reserved.remove(i);
                        }
                    }
                    Err(i) => a.free_reserved.insert(i, (t, Qty::one(k, sign * v))),
                },
            }
        }
    }

    /// Moves `b` from the agent's free pool to `owner`; returns the sorter update for
    /// a client owner.
    fn charge(&mut self, ai: AgentIdx, owner: &Owner, b: &Bag) -> Option<(ClientId, Qty)> {
        let a = self.agent_mut(ai);
        a.allocated.add(b);
        let bucket = a.buckets.entry(owner.clone()).or_default();
        let was_empty = bucket.is_empty();
        bucket.add(b);
        let delta = match owner {
            Owner::Client(c) => {
                let c = *c;
                if was_empty {
                    self.client_mut(c).buckets += 1;
                }
                let role = self.client(c).role;
                let mut q = Qty::default();
                for &(k, tag, v) in b.parts() {
                    q.add_at(k, v);
                    // Allocated to the role; no longer an unallocated reservation.
                    self.quota.add_consumed(role, k, v);
                    if let Some(t) = tag {
                        self.quota.add_consumed(t, k, -v);
                    }
                }
                Some((c, q))
            }
            Owner::Orphan(_) => None,
        };
        self.shift_free(ai, b, -1);
        delta
    }

    /// The reverse of `charge`; the owner must hold `b` on the agent.
    fn discharge(&mut self, ai: AgentIdx, owner: &Owner, b: &Bag) -> Option<(ClientId, Qty)> {
        let a = self.agent_mut(ai);
        let bucket = a
            .buckets
            .get_mut(owner)
            .expect("owner holds resources here");
        bucket.sub(b);
        let emptied = bucket.is_empty();
        if emptied {
            a.buckets.remove(owner);
        }
        a.allocated.sub(b);
        let delta = match owner {
            Owner::Client(c) => {
                let c = *c;
                if emptied {
                    self.client_mut(c).buckets -= 1;
                }
                let role = self.client(c).role;
                let mut q = Qty::default();
                for &(k, tag, v) in b.parts() {
                    q.add_at(k, v);
                    self.quota.add_consumed(role, k, -v);
                    if let Some(t) = tag {
                        self.quota.add_consumed(t, k, v);
                    }
                }
                Some((c, q))
            }
            Owner::Orphan(_) => None,
        };
        self.shift_free(ai, b, 1);
        delta
    }

    fn new_client(&mut self, sorter: &mut Sorter, framework_id: &str, role: NodeId) -> ClientId {
        let slot = ClientSlot {
            framework: framework_id.to_string(),
            role,
            registered: false,
            suppressed: false,
            candidate: false,
            constraints: Vec::new(),
            eligible: None,
            filtered: HashSet::new(),
            buckets: 0,
        };
        let c = match self.free_client_slots.pop() {
            Some(c) => {
                self.clients[c] = Some(slot);
                c
            }
            None => {
                self.clients.push(Some(slot));
                self.clients.len() - 1
            }
        };
        self.client_ids.insert((framework_id.to_string(), role), c);
        sorter.add_client(c, role, framework_id);
        c
    }

    fn unregister_client(&mut self, sorter: &mut Sorter, c: ClientId) {
        let cl = self.client_mut(c);
        cl.registered = false;
        cl.suppressed = false;
        self.update_candidate(sorter, c);
        self.clear_client_filters(c);
        self.maybe_free_client(sorter, c);
    }

    /// Drops a client that is not subscribed and holds nothing.
    fn maybe_free_client(&mut self, sorter: &mut Sorter, c: ClientId) {
        let cl = self.client(c);
        if cl.registered || cl.buckets > 0 {
            return;
        }
        let key = (cl.framework.clone(), cl.role);
        self.clear_client_filters(c);
        sorter.remove_client(c);
        self.client_ids.remove(&key);
        self.constrained.remove(&c);
        self.clients[c] = None;
        self.free_client_slots.push(c);
    }

    fn suppress_client(&mut self, sorter: &mut Sorter, c: ClientId, suppressed: bool) {
        self.client_mut(c).suppressed = suppressed;
        if !suppressed {
            self.clear_client_filters(c);
        }
        self.update_candidate(sorter, c);
    }

    /// Re-derives whether a client is offered anything at all.
    fn update_candidate(&mut self, sorter: &mut Sorter, c: ClientId) {
        let cl = self.client(c);
        let fw_active = self.frameworks.get(&cl.framework).is_some_and(|f| f.active);
        let want = cl.registered && fw_active && !cl.suppressed;
        if want == cl.candidate {
            return;
        }
        self.client_mut(c).candidate = want;
        sorter.set_active(c, want);
        if want {
            self.candidates += 1;
        } else {
            self.candidates -= 1;
        }
        let filtered: Vec<AgentIdx> = self.client(c).filtered.iter().copied().collect();
        for ai in filtered {
            let a = self.agent_mut(ai);
            if want {
                a.candidate_filters += 1;
            } else {
                a.candidate_filters -= 1;
            }
        }
    }

    fn add_filter(&mut self, c: ClientId, ai: AgentIdx, until: u64) {
        let candidate = self.client(c).candidate;
        let a = self.agent_mut(ai);
        a.filters_min = a.filters_min.min(until);
        if a.filters.insert(c, until).is_none() {
            a.filter_bits.set(c, true);
            if candidate {
                a.candidate_filters += 1;
            }
            self.client_mut(c).filtered.insert(ai);
        }
    }

    fn clear_client_filters(&mut self, c: ClientId) {
        let candidate = self.client(c).candidate;
        let filtered = std::mem::take(&mut self.client_mut(c).filtered);
        for ai in filtered {
            let a = self.agent_mut(ai);
            a.filter_bits.set(c, false);
            if a.filters.remove(&c).is_some() && candidate {
                a.candidate_filters -= 1;
            }
        }
    }

    fn purge_filters(&mut self, ai: AgentIdx, now: u64) {
        let a = self.agent(ai);
        if now < a.filters_min {
            return;
        }
        let expired: Vec<ClientId> = a
            .filters
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(c, _)| *c)
            .collect();
        for c in expired {
            let candidate = self.client(c).candidate;
            self.client_mut(c).filtered.remove(&ai);
            let a = self.agent_mut(ai);
            a.filters.remove(&c);
            a.filter_bits.set(c, false);
            if candidate {
                a.candidate_filters -= 1;
            }
        }
        let a = self.agent_mut(ai);
        a.filters_min = a.filters.values().copied().min().unwrap_or(u64::MAX);
    }

    fn meets(&self, c: ClientId, ai: AgentIdx) -> bool {
        let a = self.agent(ai);
        self.client(c)
            .constraints
            .iter()
            .all(|k| k.is_met(&a.hostname, &a.attributes))
    }

    /// Connected, something worth offering, and someone who has not filtered it.
    fn agent_open(&self, ai: AgentIdx) -> bool {
        let a = self.agent(ai);
        a.active && a.candidate_filters < self.candidates && self.worth(&a.free_qty)
    }

    /// A candidate client may be offered this agent: constraints met, not filtered.
    /// (Filters that expired by `now` were purged at the start of the round.)
    fn client_can_take(&self, c: ClientId, ai: AgentIdx, now: u64) -> bool {
        let cl = self.client(c);
        debug_assert!(cl.candidate);
        if let Some(bits) = &cl.eligible {
            if !bits.get(ai) {
                return false;
            }
        }
        let a = self.agent(ai);
        let filtered = a.candidate_filters > 0 && a.filter_bits.get(c);
        debug_assert_eq!(
            filtered,
            a.filters.get(&c).is_some_and(|until| *until > now)
        );
        !filtered
    }

    /// Limit room for kind `k` over `nodes`, given what this offer already adds to
    /// each (`extra`, aligned with `nodes`).
    fn room(&self, nodes: &[NodeId], extra: &[Qty], k: Kind) -> i64 {
        let mut room = i64::MAX;
        for (&n, e) in nodes.iter().zip(extra) {
            if let Some(limit) = self.quota.limit_of(n, k) {
                room = room.min(limit - self.quota.consumed(n).get(k) - e.get(k));
            }
        }
        room.max(0)
    }

    /// What role `r` may be offered on agent `ai` now, or None if that is not worth
    /// an offer (see the module comment for the two stages).
    fn role_offer(&self, r: NodeId, ai: AgentIdx, stage: Stage) -> Option<Vec<Part>> {
        let a = self.agent(ai);
        let path: Vec<NodeId> = self.roles.path_up(r).collect();
        let mut extra = vec![Qty::default(); path.len()];
        let mut parts: Vec<Part> = Vec::new();
        // Reservations for the role itself, then for its ancestors (hierarchical
        // reservations). A reservation for path[i] consumes quota only of the roles
        // strictly below it: path[..i].
        for (i, &t) in path.iter().enumerate() {
            let Some((_, q)) = a.free_reserved.iter().find(|(tag, _)| *tag == t) else {
                continue;
            };
            for (k, v) in q.iter() {
                let take = v.min(self.room(&path[..i], &extra[..i], k));
                if take > 0 {
                    parts.push((k, Some(t), take));
                    for e in &mut extra[..i] {
                        e.add_at(k, take);
                    }
                }
            }
        }
        let relief = self.quota.any_required().then(|| self.quota.relief(r));
        for (k, v) in a.free_unreserved.iter() {
            let mut take = v.min(self.room(&path, &extra, k));
            if let Some(relief) = &relief {
                if self.quota.required(k) > 0 {
                    let d = relief.get(k);
                    let allowed = match stage {
                        Stage::Guarantees if d > 0 => d,
                        Stage::Guarantees => self.quota.surplus(k),
                        Stage::Fair => self.quota.surplus(k) + d,
                    };
                    take = take.min(allowed);
                }
            }
            if take > 0 {
                parts.push((k, None, take));
            }
        }
        let mut q = Qty::default();
        for &(k, _, v) in &parts {
            q.add_at(k, v);
        }
        self.worth(&q).then_some(parts)
    }

    /// Allocates `parts` of agent `ai` to client `c` within the round.
    fn grant(
        &mut self,
        c: ClientId,
        ai: AgentIdx,
        parts: Vec<Part>,
        round: &mut Round,
    ) -> (ClientId, Qty) {
        let b = Bag::from_parts(parts);
        let delta = self
            .charge(ai, &Owner::Client(c), &b)
            .expect("a client owner");
        round.add(c, ai, b);
        delta
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

    #[test]
    fn a_departed_framework_keeps_its_resources_in_its_role_until_recovered() {
        let mut a = Allocator::new();
        a.add_agent("a1", Resources::cpus_mem(4000, 4 * GIB), Resources::new());
        a.add_framework("f1", "eng");
        a.track_used("f1", "a1", &Resources::cpus_mem(1000, GIB));
        a.remove_framework("f1");
        assert_eq!(a.role_consumed("eng").milli_cpus(), 1000);
        a.recover("f1", "a1", &Resources::cpus_mem(1000, GIB), None);
        assert!(a.role_consumed("eng").is_empty());
        assert!(
            a.st.clients.iter().all(Option::is_none),
            "the client is dropped"
        );
    }
}
