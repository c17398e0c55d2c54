//! "Why is it waiting?", answered with data rather than log lines (as hyperqueue's
//! `explain.rs` does): for a role, or for one framework's request of resources in a
//! role, every resource asked with the most any eligible agent has, the quota limit
//! and the guarantees of other roles that hold it back (with numbers), and the
//! suppression, filters and constraints in force. The master renders it.

use std::fmt;

use agora_proto::resources::{format_bytes, format_cpus, CPUS, DISK, MEM};
use agora_proto::Resources;

use super::constraint::Constraint;
use super::qty::{Kind, Qty};
use super::roles::NodeId;
use super::sorter::ClientId;
use super::{normalize_role, AgentIdx, Allocator, State};

/// The explanation for a role (`framework_id` None, nothing asked) or a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitExplanation {
    pub role: String,
    pub framework_id: Option<String>,
    pub asked: Resources,
    /// Connected agents the framework's constraints accept (for a role: connected
    /// agents).
    pub eligible_agents: usize,
    /// One row per resource asked (for a role: per resource the cluster has).
    pub resources: Vec<ResourceWait>,
    /// Everything that holds offers back; empty when the next round should offer.
    pub causes: Vec<WaitCause>,
}

impl WaitExplanation {
    pub fn is_waiting(&self) -> bool {
        !self.causes.is_empty()
    }
}

/// One resource of a request, with what stands between it and an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceWait {
    pub name: String,
    pub asked: i64,
    /// The most any eligible agent has free for the role (unreserved plus
    /// reservations for the role or its ancestors).
    pub max_free: i64,
    /// The most any eligible agent has at all for the role.
    pub max_total: i64,
    /// What the role and its descendants consume against quota.
    pub consumed: i64,
    /// The most more of it (unreserved) the role may take before a limit of the role
    /// or an ancestor is reached; None when no limit applies.
    pub limit_room: Option<i64>,
    /// The most of it (unreserved) the role may be offered across the cluster without
    /// eating into other roles' unmet guarantees; None when no guarantee needs it.
    pub headroom_allowance: Option<i64>,
}

/// A role's own guarantee, not met yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmetGuarantee {
    pub role: String,
    pub resource: String,
    pub guarantee: i64,
    pub consumed: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitCause {
    /// No connected agent at all.
    NoAgents,
    /// Nobody is subscribed in the role.
    NoFrameworks {
        role: String,
    },
    UnknownFramework {
        framework_id: String,
    },
    RoleNotSubscribed {
        framework_id: String,
        role: String,
    },
    FrameworkInactive {
        framework_id: String,
    },
    Suppressed {
        framework_id: String,
        role: String,
    },
    /// The framework declined `agents` of the `of_agents` agents that could serve it
    /// (for a request: that have room for it) until at least `until_ms`.
    Filtered {
        framework_id: String,
        role: String,
        agents: usize,
        of_agents: usize,
        until_ms: u64,
    },
    /// No connected agent meets this constraint.
    ConstraintUnmatched {
        framework_id: String,
        role: String,
        constraint: Constraint,
    },
    /// Each constraint is met by some agent, but no agent meets them all.
    ConstraintsExcludeAll {
        framework_id: String,
        role: String,
        constraints: Vec<Constraint>,
    },
    /// No eligible agent has that much, even when idle.
    TooLarge {
        resource: String,
        asked: i64,
        max_total: i64,
    },
    /// No eligible agent has that much free now.
    NotFree {
        resource: String,
        asked: i64,
        max_free: i64,
    },
    /// Each resource is free somewhere, but no eligible agent has all of it at once.
    NoSingleAgentFits {
        asked: Resources,
    },
    /// `role` (the role asked for, or an ancestor) would go past its limit: it
    /// consumes `consumed` of `limit`, and the request needs `asked` more unreserved.
    QuotaLimit {
        role: String,
        resource: String,
        limit: i64,
        consumed: i64,
        asked: i64,
    },
    /// Unreserved resources are kept for other roles' guarantees: of `unallocated`,
    /// the role may take `allowance`; `held_back` is kept for `guarantees`.
    HeadroomHeld {
        resource: String,
        asked: i64,
        allowance: i64,
        unallocated: i64,
        held_back: i64,
        guarantees: Vec<UnmetGuarantee>,
    },
}

fn amount(name: &str, v: i64) -> String {
    match name {
        CPUS => format_cpus(v),
        MEM | DISK => format_bytes(v),
        _ => v.to_string(),
    }
}

impl fmt::Display for WaitCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use WaitCause::*;
        match self {
            NoAgents => f.write_str("no agent is connected"),
            NoFrameworks { role } => write!(f, "no framework is subscribed in role {role}"),
            UnknownFramework { framework_id } => {
                write!(f, "framework {framework_id} is not subscribed")
            }
            RoleNotSubscribed { framework_id, role } => {
                write!(f, "framework {framework_id} is not subscribed in role {role}")
            }
            FrameworkInactive { framework_id } => {
                write!(f, "framework {framework_id} is disconnected")
            }
            Suppressed { framework_id, role } => write!(
                f,
                "framework {framework_id} suppressed offers in role {role} (REVIVE to get them)"
            ),
            Filtered {
                framework_id,
                agents,
                of_agents,
                until_ms,
                ..
            } => write!(
                f,
                "framework {framework_id} declined {agents} of {of_agents} agents that could serve it, \
                 the first until {until_ms} ms (REVIVE clears this)"
            ),
            ConstraintUnmatched { constraint, .. } => {
                write!(f, "no connected agent meets the constraint {constraint}")
            }
            ConstraintsExcludeAll { constraints, .. } => {
                let list: Vec<String> = constraints.iter().map(|c| c.to_string()).collect();
                write!(f, "no connected agent meets all of {}", list.join(", "))
            }
            TooLarge {
                resource,
                asked,
                max_total,
            } => write!(
                f,
                "{resource}: asks {}, no eligible agent has that much (the largest has {})",
                amount(resource, *asked),
                amount(resource, *max_total)
            ),
            NotFree {
                resource,
                asked,
                max_free,
            } => write!(
                f,
                "{resource}: asks {}, the most any eligible agent has free is {}",
                amount(resource, *asked),
                amount(resource, *max_free)
            ),
            NoSingleAgentFits { asked } => {
                write!(f, "no single eligible agent has {asked} free at once")
            }
            QuotaLimit {
                role,
                resource,
                limit,
                consumed,
                asked,
            } => write!(
                f,
                "{resource}: role {role} consumes {} of its limit {}, and this needs {} more",
                amount(resource, *consumed),
                amount(resource, *limit),
                amount(resource, *asked)
            ),
            HeadroomHeld {
                resource,
                asked,
                allowance,
                unallocated,
                held_back,
                guarantees,
            } => {
                let who: Vec<String> = guarantees
                    .iter()
                    .map(|g| {
                        format!(
                            "{} ({} of {})",
                            g.role,
                            amount(resource, g.consumed),
                            amount(resource, g.guarantee)
                        )
                    })
                    .collect();
                write!(
                    f,
                    "{resource}: asks {}, but of {} unallocated only {} may go to this role; {} is held for the guarantees of {}",
                    amount(resource, *asked),
                    amount(resource, *unallocated),
                    amount(resource, *allowance),
                    amount(resource, *held_back),
                    if who.is_empty() { "other roles".to_string() } else { who.join(", ") }
                )
            }
        }
    }
}

impl Allocator {
    /// Why role `role` gets no (or fewer) offers: its frameworks' suppression, filters
    /// and constraints, and per resource its limit and the headroom held back.
    pub fn explain_role(&self, role: &str, now_ms: u64) -> WaitExplanation {
        let st = &self.st;
        let role = normalize_role(role);
        let node = st.roles.find(role);
        let live = st.connected_agents();
        let mut causes = Vec::new();
        if live.is_empty() {
            causes.push(WaitCause::NoAgents);
        }
        let mut clients: Vec<ClientId> = match node {
            Some(n) => st
                .client_ids
                .iter()
                .filter(|((_, r), &c)| *r == n && st.client(c).registered)
                .map(|(_, &c)| c)
                .collect(),
            None => Vec::new(),
        };
        clients.sort_by(|a, b| st.client(*a).framework.cmp(&st.client(*b).framework));
        if clients.is_empty() {
            causes.push(WaitCause::NoFrameworks {
                role: role.to_string(),
            });
        }
        for &c in &clients {
            let cl = st.client(c);
            let fid = cl.framework.clone();
            if !st.frameworks.get(&fid).is_some_and(|f| f.active) {
                causes.push(WaitCause::FrameworkInactive {
                    framework_id: fid.clone(),
                });
            }
            if cl.suppressed {
                causes.push(WaitCause::Suppressed {
                    framework_id: fid.clone(),
                    role: role.to_string(),
                });
            }
            let eligible: Vec<AgentIdx> =
                live.iter().copied().filter(|&ai| st.meets(c, ai)).collect();
            if let Some(cause) = st.filtered(c, &eligible, now_ms, false) {
                causes.push(cause);
            }
            causes.extend(st.constraint_causes(c, &live, &eligible));
        }
        let mut rows = Vec::new();
        for k in 0..st.kinds.len() {
            if st.total.get(k) <= 0 {
                continue;
            }
            let row = st.row(k, 0, node, &live);
            let name = st.kinds.name(k);
            if let Some(n) = node {
                for m in st.roles.path_up(n) {
                    if let Some(limit) = st.quota.limit_of(m, k) {
                        let consumed = st.quota.consumed(m).get(k);
                        if consumed >= limit {
                            causes.push(WaitCause::QuotaLimit {
                                role: st.roles.path(m).to_string(),
                                resource: name.to_string(),
                                limit,
                                consumed,
                                asked: 0,
                            });
                        }
                    }
                }
            }
            if let Some(allowance) = row.headroom_allowance {
                let unallocated = st.quota.available(k);
                if allowance < unallocated {
                    causes.push(st.headroom_cause(k, node, 0, allowance));
                }
            }
            rows.push(row);
        }
        WaitExplanation {
            role: role.to_string(),
            framework_id: None,
            asked: Resources::new(),
            eligible_agents: live.len(),
            resources: rows,
            causes,
        }
    }

    /// Why framework `framework_id` would not be offered `asked` in `role` now.
    pub fn explain_request(
        &self,
        framework_id: &str,
        role: &str,
        asked: &Resources,
        now_ms: u64,
    ) -> WaitExplanation {
        let st = &self.st;
        let role = normalize_role(role);
        let node = st.roles.find(role);
        let live = st.connected_agents();
        let mut causes = Vec::new();
        if live.is_empty() {
            causes.push(WaitCause::NoAgents);
        }
        let client = match st.frameworks.get(framework_id) {
            None => {
                causes.push(WaitCause::UnknownFramework {
                    framework_id: framework_id.to_string(),
                });
                None
            }
            Some(fw) => {
                let c = fw
                    .clients
                    .iter()
                    .copied()
                    .find(|&c| Some(st.client(c).role) == node);
                if c.is_none() {
                    causes.push(WaitCause::RoleNotSubscribed {
                        framework_id: framework_id.to_string(),
                        role: role.to_string(),
                    });
                }
                if !fw.active {
                    causes.push(WaitCause::FrameworkInactive {
                        framework_id: framework_id.to_string(),
                    });
                }
                if c.is_some_and(|c| st.client(c).suppressed) {
                    causes.push(WaitCause::Suppressed {
                        framework_id: framework_id.to_string(),
                        role: role.to_string(),
                    });
                }
                c
            }
        };
        let eligible: Vec<AgentIdx> = live
            .iter()
            .copied()
            .filter(|&ai| client.is_none_or(|c| st.meets(c, ai)))
            .collect();
        if let Some(c) = client {
            causes.extend(st.constraint_causes(c, &live, &eligible));
        }
        // The request by kind (a request names no reservation).
        let mut ask = Qty::default();
        let mut names = Vec::new();
        for x in asked.unreserved().to_proto() {
            let k = st.kinds.find(&x.name);
            if let Some(k) = k {
                ask.add_at(k, x.value);
            }
            names.push((x.name, k, x.value));
        }
        let mut rows = Vec::new();
        let mut each_fits = true;
        for (name, k, want) in &names {
            let row = match k {
                Some(k) => st.row(*k, *want, node, &eligible),
                None => ResourceWait {
                    name: name.clone(),
                    asked: *want,
                    max_free: 0,
                    max_total: 0,
                    consumed: 0,
                    limit_room: None,
                    headroom_allowance: None,
                },
            };
            if !eligible.is_empty() {
                if *want > row.max_total {
                    each_fits = false;
                    causes.push(WaitCause::TooLarge {
                        resource: name.clone(),
                        asked: *want,
                        max_total: row.max_total,
                    });
                } else if *want > row.max_free {
                    each_fits = false;
                    causes.push(WaitCause::NotFree {
                        resource: name.clone(),
                        asked: *want,
                        max_free: row.max_free,
                    });
                }
            }
            if let Some(k) = *k {
                // What must come from the unreserved pool: what no reservation the
                // role may use covers, on the agent with the most of it.
                let reserved = eligible
                    .iter()
                    .map(|&ai| st.usable(ai, node, false).get(k))
                    .max()
                    .unwrap_or(0);
                let needed = (*want - reserved).max(0);
                if let (Some(n), true) = (node, needed > 0) {
                    for m in st.roles.path_up(n) {
                        if let Some(limit) = st.quota.limit_of(m, k) {
                            let consumed = st.quota.consumed(m).get(k);
                            if consumed + needed > limit {
                                causes.push(WaitCause::QuotaLimit {
                                    role: st.roles.path(m).to_string(),
                                    resource: name.clone(),
                                    limit,
                                    consumed,
                                    asked: needed,
                                });
                            }
                        }
                    }
                }
                if let Some(allowance) = row.headroom_allowance {
                    if needed > allowance {
                        causes.push(st.headroom_cause(k, node, needed, allowance));
                    }
                }
            }
            rows.push(row);
        }
        let fitting: Vec<AgentIdx> = eligible
            .iter()
            .copied()
            .filter(|&ai| st.usable(ai, node, true).covers(&ask))
            .collect();
        if each_fits && fitting.is_empty() && !eligible.is_empty() && !ask.is_zero() {
            causes.push(WaitCause::NoSingleAgentFits {
                asked: asked.unreserved(),
            });
        }
        if let Some(c) = client {
            if let Some(cause) = st.filtered(c, &fitting, now_ms, true) {
                causes.push(cause);
            }
        }
        WaitExplanation {
            role: role.to_string(),
            framework_id: Some(framework_id.to_string()),
            asked: asked.clone(),
            eligible_agents: eligible.len(),
            resources: rows,
            causes,
        }
    }
}

impl State {
    fn connected_agents(&self) -> Vec<AgentIdx> {
        self.agent_ids
            .values()
            .copied()
            .filter(|&ai| self.agent(ai).active)
            .collect()
    }

    /// Free resources of an agent that role `node` may be offered: reservations for
    /// it or an ancestor, plus (with `unreserved`) the unreserved ones.
    fn usable(&self, ai: AgentIdx, node: Option<NodeId>, unreserved: bool) -> Qty {
        let a = self.agent(ai);
        let mut q = if unreserved {
            a.free_unreserved.clone()
        } else {
            Qty::default()
        };
        if let Some(n) = node {
            for (t, r) in &a.free_reserved {
                if self.roles.is_ancestor_or_self(*t, n) {
                    q.add(r);
                }
            }
        }
        q
    }

    /// All resources of an agent that role `node` could ever be offered.
    fn usable_total(&self, ai: AgentIdx, node: Option<NodeId>) -> Qty {
        let mut q = Qty::default();
        for &(k, tag, v) in self.agent(ai).total.parts() {
            let ok = match (tag, node) {
                (None, _) => true,
                (Some(t), Some(n)) => self.roles.is_ancestor_or_self(t, n),
                (Some(_), None) => false,
            };
            if ok {
                q.add_at(k, v);
            }
        }
        q
    }

    fn row(&self, k: Kind, asked: i64, node: Option<NodeId>, agents: &[AgentIdx]) -> ResourceWait {
        let max_free = agents
            .iter()
            .map(|&ai| self.usable(ai, node, true).get(k))
            .max()
            .unwrap_or(0);
        let max_total = agents
            .iter()
            .map(|&ai| self.usable_total(ai, node).get(k))
            .max()
            .unwrap_or(0);
        let mut limit_room: Option<i64> = None;
        if let Some(n) = node {
            for m in self.roles.path_up(n) {
                if let Some(limit) = self.quota.limit_of(m, k) {
                    let room = (limit - self.quota.consumed(m).get(k)).max(0);
                    limit_room = Some(limit_room.map_or(room, |r| r.min(room)));
                }
            }
        }
        let headroom_allowance = (self.quota.required(k) > 0)
            .then(|| self.quota.surplus(k) + node.map_or(0, |n| self.quota.relief(n).get(k)));
        ResourceWait {
            name: self.kinds.name(k).to_string(),
            asked,
            max_free,
            max_total,
            consumed: node.map_or(0, |n| self.quota.consumed(n).get(k)),
            limit_room,
            headroom_allowance,
        }
    }

    fn headroom_cause(
        &self,
        k: Kind,
        node: Option<NodeId>,
        asked: i64,
        allowance: i64,
    ) -> WaitCause {
        let unallocated = self.quota.available(k);
        let guarantees = self
            .quota
            .unmet()
            .into_iter()
            .filter(|&(m, kind, _, _)| {
                kind == k && node.is_none_or(|n| !self.roles.is_ancestor_or_self(m, n))
            })
            .map(|(m, _, guarantee, consumed)| UnmetGuarantee {
                role: self.roles.path(m).to_string(),
                resource: self.kinds.name(k).to_string(),
                guarantee,
                consumed,
            })
            .collect();
        WaitCause::HeadroomHeld {
            resource: self.kinds.name(k).to_string(),
            asked,
            allowance,
            unallocated,
            held_back: (unallocated - allowance).max(0),
            guarantees,
        }
    }

    /// Filters of client `c` on `agents`; with `all_only`, a cause only when every
    /// one of them is filtered.
    fn filtered(
        &self,
        c: ClientId,
        agents: &[AgentIdx],
        now: u64,
        all_only: bool,
    ) -> Option<WaitCause> {
        let untils: Vec<u64> = agents
            .iter()
            .filter_map(|&ai| self.agent(ai).filters.get(&c).copied())
            .filter(|&until| until > now)
            .collect();
        if untils.is_empty() || (all_only && untils.len() < agents.len()) {
            return None;
        }
        let cl = self.client(c);
        Some(WaitCause::Filtered {
            framework_id: cl.framework.clone(),
            role: self.roles.path(cl.role).to_string(),
            agents: untils.len(),
            of_agents: agents.len(),
            until_ms: *untils.iter().min().expect("not empty"),
        })
    }

    fn constraint_causes(
        &self,
        c: ClientId,
        live: &[AgentIdx],
        eligible: &[AgentIdx],
    ) -> Vec<WaitCause> {
        let cl = self.client(c);
        if cl.constraints.is_empty() || live.is_empty() || !eligible.is_empty() {
            return Vec::new();
        }
        let (fid, role) = (cl.framework.clone(), self.roles.path(cl.role).to_string());
        let unmatched: Vec<WaitCause> = cl
            .constraints
            .iter()
            .filter(|k| {
                !live.iter().any(|&ai| {
                    let a = self.agent(ai);
                    k.is_met(&a.hostname, &a.attributes)
                })
            })
            .map(|k| WaitCause::ConstraintUnmatched {
                framework_id: fid.clone(),
                role: role.clone(),
                constraint: k.clone(),
            })
            .collect();
        if unmatched.is_empty() {
            vec![WaitCause::ConstraintsExcludeAll {
                framework_id: fid,
                role,
                constraints: cl.constraints.clone(),
            }]
        } else {
            unmatched
        }
    }
}
