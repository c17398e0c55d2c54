//! Operator requests on roles (weights, quotas, `explain`) and the master registry:
//! what the core records durably, and how a restarted master starts again from it.

use std::collections::{BTreeMap, BTreeSet};

use agora_proto::resources::{format_bytes, format_cpus, CPUS, MEM};
use agora_proto::v1;
use agora_proto::Resources;

use super::{MasterCore, Refused};
use crate::registry::{FrameworkEntry, QuotaEntry, Registry, RegistryOp};
use agora_allocator::{Quota, WaitCause, WaitExplanation};

fn amount(name: &str, v: i64) -> String {
    match name {
        CPUS => format_cpus(v),
        MEM => format_bytes(v),
        _ => v.to_string(),
    }
}

fn quota_resources(map: &BTreeMap<String, i64>) -> Vec<v1::Resource> {
    map.iter()
        .map(|(name, v)| v1::Resource {
            name: name.clone(),
            value: *v,
            role: String::new(),
        })
        .collect()
}

fn render_amounts(map: &BTreeMap<String, i64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(n, v)| format!("{n} {}", amount(n, *v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// State kept while a restarted master waits for its agents to come back.
#[derive(Debug, Default)]
pub(super) struct Recovery {
    /// Agents admitted before the restart that have not re-registered yet.
    pub expected: BTreeSet<String>,
    /// Offers are held back until this time or until every expected agent is back.
    pub deadline_ms: u64,
    /// Explicit reconciliations of tasks not known yet, answered when recovery ends.
    pub deferred: BTreeSet<(String, String)>,
}

/// Most reconciliations a recovering master holds back to answer later.
const MAX_DEFERRED_RECONCILES: usize = 100_000;

impl MasterCore {
    /// Records a registry change: the shell takes it (`take_registry_ops`) and writes
    /// it durably before it sends any message produced by the same input.
    pub(super) fn persist(&mut self, op: RegistryOp) {
        self.registry.apply(&op);
        self.registry_ops.push(op);
    }

    /// Registry changes since the last call, in order. The shell writes them in one
    /// durable transaction after every input and before it carries out the outputs.
    pub fn take_registry_ops(&mut self) -> Vec<RegistryOp> {
        std::mem::take(&mut self.registry_ops)
    }

    /// What the registry holds now (as the shell last wrote it, or is about to).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// `agora acl set FILE`: a policy that parses replaces the one in force, at once
    /// for every later request; an empty text removes it (everything allowed).
    pub(super) fn set_policy(&mut self, text: &str) -> Result<(), Refused> {
        let text = if text.trim().is_empty() {
            String::new()
        } else {
            let policy = crate::acl::Policy::parse(text)
                .map_err(|e| format!("the access policy is not valid: {e}"))?;
            policy.to_json()
        };
        self.persist(RegistryOp::SetPolicy { text });
        Ok(())
    }

    /// `agora role weight set ROLE W`.
    pub(super) fn set_weight(&mut self, role: &str, weight: f64) -> Result<(), Refused> {
        let role = role.trim();
        self.allocator
            .set_weight(role, weight)
            .map_err(|e| format!("cannot set the weight of role `{role}`: {e}"))?;
        self.persist(RegistryOp::SetWeight {
            role: role.to_string(),
            weight,
        });
        Ok(())
    }

    /// `agora quota set ROLE --guarantee .. --limit ..`: the resources named replace
    /// theirs in the role's quota, the others are kept;
    /// both empty remove the quota. As in Mesos, guarantees that the registered
    /// agents could not all hold are refused unless `force`.
    pub(super) fn set_quota(
        &mut self,
        role: &str,
        guarantee: &Resources,
        limit: &Resources,
        force: bool,
    ) -> Result<(), Refused> {
        let role = role.trim();
        if role == "*" || role.is_empty() {
            return Err("the default role `*` cannot have a quota; name a role".into());
        }
        let current = self.allocator.quota(role).cloned();
        if guarantee.is_empty() && limit.is_empty() {
            if current.is_none() {
                return Err(Refused(format!(
                    "role `{role}` has no quota to remove (`agora quota get` lists the quotas)"
                )));
            }
            self.allocator
                .set_quota(role, Quota::new())
                .map_err(|e| format!("cannot remove the quota of role `{role}`: {e}"))?;
            self.persist(RegistryOp::SetQuota {
                role: role.to_string(),
                quota: QuotaEntry::default(),
            });
            return Ok(());
        }
        let before = current.clone().unwrap_or_default();
        let mut q = current.unwrap_or_default();
        for (what, res) in [("guarantee", guarantee), ("limit", limit)] {
            if res.unreserved() != *res {
                return Err(Refused(format!(
                    "a quota {what} is an amount, not reserved resources: write `cpus:2`, not `cpus(role):2`"
                )));
            }
            for n in res.names() {
                let v = res.get(&n);
                if what == "guarantee" {
                    q.guarantee.insert(n, v);
                } else {
                    q.limit.insert(n, v);
                }
            }
        }
        for (n, g) in &q.guarantee {
            if let Some(l) = q.limit.get(n) {
                if g > l {
                    return Err(Refused(format!(
                        "the guarantee of {n} ({}) is above its limit ({})",
                        amount(n, *g),
                        amount(n, *l)
                    )));
                }
            }
        }
        if !force {
            self.check_guarantees_fit(role, &q, &before)?;
        }
        self.allocator
            .set_quota(role, q.clone())
            .map_err(|e| format!("cannot set the quota of role `{role}`: {e}"))?;
        self.persist(RegistryOp::SetQuota {
            role: role.to_string(),
            quota: QuotaEntry {
                guarantee: q.guarantee,
                limit: q.limit,
            },
        });
        Ok(())
    }

    /// Refuses `quota` for `role` when it raises a guarantee and the guarantees of all
    /// roles, with it, need more of that resource than the registered agents have in
    /// total. A guarantee inside an ancestor's guarantee of the same resource is
    /// counted in the ancestor's. Lowering is always allowed.
    fn check_guarantees_fit(
        &self,
        role: &str,
        quota: &Quota,
        before: &Quota,
    ) -> Result<(), Refused> {
        let mut all: BTreeMap<&str, &Quota> = self.allocator.quotas().collect();
        all.insert(role, quota);
        let capacity = self.allocator.total_capacity();
        let agents = self.agents.len();
        for (name, g) in &quota.guarantee {
            if before.guarantee.get(name).is_some_and(|b| b >= g) {
                continue;
            }
            let mut needed: i64 = 0;
            for (r, q) in &all {
                let Some(g) = q.guarantee.get(name) else {
                    continue;
                };
                let inside_ancestor = all.iter().any(|(a, aq)| {
                    r.strip_prefix(*a).is_some_and(|rest| rest.starts_with('/'))
                        && aq.guarantee.contains_key(name)
                });
                if !inside_ancestor {
                    needed = needed.saturating_add(*g);
                }
            }
            let have = capacity.get(name).copied().unwrap_or(0);
            if needed > have {
                return Err(Refused(format!(
                    "the cluster cannot hold this guarantee: with it, the quotas guarantee {} of {name} \
                     but the {agents} registered agent(s) have {} in all, so other roles would wait for \
                     ever; lower it, or pass --force to set it anyway",
                    amount(name, needed),
                    amount(name, have)
                )));
            }
        }
        Ok(())
    }

    /// Every role with a weight, a quota or a subscribed framework (or just `role`).
    pub fn roles(&self, role: &str) -> Result<Vec<v1::RoleSummary>, Refused> {
        let mut frameworks: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (fid, f) in &self.frameworks {
            for r in self.allocator.framework_roles(fid).unwrap_or_default() {
                frameworks
                    .entry(r)
                    .or_default()
                    .push(format!("{fid} ({})", f.name));
            }
        }
        // What each role has reserved on the agents, and the part no task uses.
        let mut reserved: BTreeMap<String, (Resources, Resources)> = BTreeMap::new();
        for (id, a) in &self.agents {
            let held = self.agent_reserved(id, &a.total);
            let free = self.allocator.agent_free(id).unwrap_or_default();
            for r in held.roles() {
                let e = reserved.entry(r.clone()).or_default();
                e.0.add(&held.of_role(&r));
                e.1.add(&free.of_role(&r));
            }
        }
        let mut names: BTreeSet<String> = frameworks.keys().cloned().collect();
        names.extend(self.registry.weights.keys().cloned());
        names.extend(self.registry.quotas.keys().cloned());
        names.extend(reserved.keys().cloned());
        let role = role.trim();
        if !role.is_empty() {
            if !names.contains(role) {
                agora_allocator::validate_role(role)
                    .map_err(|e| format!("`{role}` is not a role name: {e}"))?;
            }
            names = [role.to_string()].into();
        }
        Ok(names
            .into_iter()
            .map(|r| {
                let q = self.allocator.quota(&r).cloned().unwrap_or_default();
                let (held, free) = reserved.remove(&r).unwrap_or_default();
                v1::RoleSummary {
                    reserved: held.unreserved().to_proto(),
                    reserved_free: free.unreserved().to_proto(),
                    weight: self.allocator.weight(&r),
                    guarantee: quota_resources(&q.guarantee),
                    limit: quota_resources(&q.limit),
                    consumed: self.allocator.role_consumed(&r).to_proto(),
                    frameworks: frameworks.remove(&r).unwrap_or_default(),
                    role: r,
                }
            })
            .collect())
    }

    /// One cause as an operator should read it (times relative to now).
    pub(super) fn render_cause(&self, c: &WaitCause, now: u64) -> String {
        match c {
            WaitCause::Filtered {
                framework_id,
                agents,
                of_agents,
                until_ms,
                ..
            } => format!(
                "framework {framework_id} declined {agents} of {of_agents} agents that could serve it, \
                 for {:.1} s more (REVIVE clears this)",
                until_ms.saturating_sub(now) as f64 / 1000.0
            ),
            other => other.to_string(),
        }
    }

    fn render_explanation(&self, w: &WaitExplanation, lines: &mut Vec<String>, now: u64) {
        lines.push(format!(
            "  agents eligible: {} of {} registered",
            w.eligible_agents,
            self.agents.len()
        ));
        for r in &w.resources {
            let mut row = format!(
                "  {}: most free on an eligible agent {} (largest {})",
                r.name,
                amount(&r.name, r.max_free),
                amount(&r.name, r.max_total)
            );
            if r.asked > 0 {
                row = format!(
                    "  {}: asks {};{}",
                    r.name,
                    amount(&r.name, r.asked),
                    &row[r.name.len() + 3..]
                );
            }
            row.push_str(&format!("; role consumes {}", amount(&r.name, r.consumed)));
            if let Some(room) = r.limit_room {
                row.push_str(&format!("; room under its limit {}", amount(&r.name, room)));
            }
            if let Some(h) = r.headroom_allowance {
                row.push_str(&format!(
                    "; may take {} without eating other roles' guarantees",
                    amount(&r.name, h)
                ));
            }
            lines.push(row);
        }
        if w.causes.is_empty() {
            lines.push("  nothing holds offers back: the next allocation round offers".into());
        } else {
            lines.push("  held back by:".into());
            for c in &w.causes {
                lines.push(format!("  - {}", self.render_cause(c, now)));
            }
        }
    }

    /// `agora explain ROLE|TASK`: the whole answer, one fact per line.
    /// `agora explain TARGET` (a task or a role), as of `now` (monotonic).
    pub fn explain(&self, target: &str, now: u64) -> Result<String, Refused> {
        let target = target.trim();
        if target.is_empty() {
            return Err("name a task id or a role to explain".into());
        }
        let mut lines = Vec::new();
        // A task waiting to be placed by its framework.
        for (fid, f) in &self.frameworks {
            if let Some(p) = f.pending.iter().find(|p| p.task_id == target) {
                let ask = Resources::from_proto(&p.resources).unwrap_or_default();
                lines.push(format!(
                    "task {target} ({}) of framework {fid} ({}) is waiting to be placed; it asks {ask}",
                    if p.name.is_empty() { "unnamed" } else { &p.name },
                    f.name
                ));
                lines.push(format!("  why: {}", self.explain_pending(fid, p, now)));
                for role in self.allocator.framework_roles(fid).unwrap_or_default() {
                    lines.push(format!("in role {role}:"));
                    let w = self.allocator.explain_request(fid, &role, &ask, now);
                    self.render_explanation(&w, &mut lines, now);
                }
                return Ok(lines.join("\n"));
            }
        }
        let describe = |rec: &super::TaskRecord, live: bool| {
            let st = &rec.status;
            let fname = self
                .frameworks
                .get(&rec.framework_id)
                .map(|f| f.name.as_str())
                .unwrap_or("gone");
            let mut s = format!(
                "task {target} of framework {} ({fname}) {} {} on agent {}",
                rec.framework_id,
                if live { "is" } else { "ended" },
                st.state().short_name(),
                if rec.agent_id.is_empty() {
                    "-"
                } else {
                    &rec.agent_id
                },
            );
            if st.reason != 0 {
                s.push_str(&format!(", reason {}", st.reason().short_name()));
            }
            if !st.message.is_empty() {
                s.push_str(&format!(": {}", st.message));
            }
            if let Some(c) = st.exit_code {
                s.push_str(&format!(" (exit code {c})"));
            }
            s.push_str(&format!("\n  resources: {}", rec.resources));
            s
        };
        if let Some(rec) = self.tasks.values().find(|t| t.info.task_id == target) {
            return Ok(describe(rec, true));
        }
        if let Some(rec) = self
            .completed
            .iter()
            .rev()
            .find(|t| t.info.task_id == target)
        {
            return Ok(describe(rec, false));
        }
        // Otherwise a role: one with a weight, a quota, a framework or a reservation.
        // Anything else is not answered as if it were a role (an id of a task this
        // master no longer tracks would read as an empty role).
        let known = self.roles("")?.into_iter().any(|r| r.role == target)
            || self.allocator.role_consumed(target) != Resources::new();
        if !known {
            return Err(Refused(format!(
                "no task or role is named `{target}`: not a task this master tracks (waiting, \
                 running or among the recently finished; `agora ps --all` lists them) and not \
                 a role with a weight, a quota, a reservation or a framework (`agora role ls`)"
            )));
        }
        let summary = self.roles(target)?.remove(0);
        let q = self.allocator.quota(target).cloned().unwrap_or_default();
        lines.push(format!(
            "role {target}: weight {}; quota guarantee {}, limit {}; consumes {}",
            summary.weight,
            render_amounts(&q.guarantee),
            render_amounts(&q.limit),
            Resources::from_proto(&summary.consumed).unwrap_or_default()
        ));
        if summary.frameworks.is_empty() {
            lines.push("  frameworks: none".into());
        } else {
            lines.push(format!("  frameworks: {}", summary.frameworks.join(", ")));
        }
        let w = self.allocator.explain_role(target, now);
        self.render_explanation(&w, &mut lines, now);
        if let Some(r) = &self.recovery {
            lines.push(format!(
                "  the master restarted and holds offers until {} more agent(s) re-register",
                r.expected.len()
            ));
        }
        Ok(lines.join("\n"))
    }

    /// Starts a new core from the registry of a previous run of this master: weights,
    /// quotas, frameworks (disconnected, their failover timeouts counting from now),
    /// and the agents it waits for before making offers (at most `reregister_ms`).
    pub(super) fn recover(&mut self, reg: Registry, now: u64) {
        for (role, w) in &reg.weights {
            if let Err(e) = self.allocator.set_weight(role, *w) {
                tracing::warn!("registry: weight of {role} not restored: {e}");
            }
        }
        for (role, q) in &reg.quotas {
            let quota = Quota {
                guarantee: q.guarantee.clone(),
                limit: q.limit.clone(),
            };
            if let Err(e) = self.allocator.set_quota(role, quota) {
                tracing::warn!("registry: quota of {role} not restored: {e}");
            }
        }
        for (fid, f) in &reg.frameworks {
            self.restore_framework(fid, f, now);
        }
        let expected: BTreeSet<String> = reg
            .agents
            .iter()
            .filter(|(_, a)| !a.unreachable)
            .map(|(id, _)| id.clone())
            .collect();
        if !expected.is_empty() {
            tracing::info!(
                agents = expected.len(),
                frameworks = reg.frameworks.len(),
                "master recovered its registry; offers wait for agents to re-register (at most {} s)",
                self.cfg.agent_reregister_ms / 1000
            );
            self.recovery = Some(Recovery {
                expected,
                deadline_ms: now + self.cfg.agent_reregister_ms,
                deferred: BTreeSet::new(),
            });
        }
        self.registry = reg;
    }

    /// A framework known before the restart: disconnected until it re-subscribes
    /// with its id, and torn down if it does not within its failover timeout.
    fn restore_framework(&mut self, fid: &str, f: &FrameworkEntry, now: u64) {
        self.frameworks.insert(
            fid.to_string(),
            super::FrameworkState {
                name: f.name.clone(),
                conn: None,
                failover_ms: f.failover_ms,
                disconnected_at: Some(now),
                pending: Vec::new(),
                partition_aware: f.partition_aware,
                // Told again when it re-subscribes, before it can launch anything.
                user: String::new(),
                principal: String::new(),
            },
        );
        self.allocator.add_framework_roles(fid, &f.roles);
        self.allocator.set_framework_active(fid, false);
        let constraints: Vec<_> = f
            .offer_constraints
            .iter()
            .filter_map(|t| agora_allocator::Constraint::parse(t).ok())
            .collect();
        for role in &f.roles {
            if let Err(e) = self
                .allocator
                .set_constraints(fid, role, constraints.clone())
            {
                tracing::warn!(framework = %fid, "registry: constraints not restored: {e}");
            }
        }
    }

    /// True while a restarted master must not offer: some agents it knew may still
    /// come back with tasks, whose resources would otherwise be offered twice.
    pub(super) fn recovery_holds_offers(&mut self, now: u64) -> bool {
        let Some(r) = &self.recovery else {
            return false;
        };
        if !r.expected.is_empty() && now < r.deadline_ms {
            return true;
        }
        let missing: Vec<String> = r.expected.iter().cloned().collect();
        let deferred = self.recovery.take().map(|r| r.deferred).unwrap_or_default();
        for agent_id in missing {
            tracing::warn!(agent = %agent_id, "agent did not re-register after the master restarted; marked unreachable");
            let mut entry = self.registry.agents.get(&agent_id).cloned().unwrap_or(
                crate::registry::AgentEntry {
                    hostname: String::new(),
                    unreachable: true,
                    token: String::new(),
                    gone: false,
                },
            );
            entry.unreachable = true;
            self.persist(RegistryOp::PutAgent { agent_id, entry });
        }
        // Now every task the master will learn of is known: answer what waited.
        let mut by_fw: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (fid, tid) in deferred {
            by_fw.entry(fid).or_default().push(tid);
        }
        for (fid, ids) in by_fw {
            if let Some(conn) = self.frameworks.get(&fid).and_then(|f| f.conn) {
                self.reconcile(conn, &fid, ids);
            }
        }
        false
    }

    /// Holds an explicit reconciliation of an unknown task while the master waits
    /// for agents after a restart; false when not recovering (answer now).
    pub(super) fn defer_reconcile(&mut self, fid: &str, task_id: &str) -> bool {
        match &mut self.recovery {
            Some(r) if r.deferred.len() < MAX_DEFERRED_RECONCILES => {
                r.deferred.insert((fid.to_string(), task_id.to_string()));
                true
            }
            _ => false,
        }
    }

    /// The framework was told this task is LOST while its agent may still run it:
    /// recorded (durably, across restarts) so that if the agent brings it back the
    /// task is killed and LOST stays its one end.
    pub(super) fn told_lost(&mut self, key: &(String, String)) {
        if !self.registry.lost_tasks.contains_key(key) {
            self.persist(RegistryOp::TellLost {
                framework_id: key.0.clone(),
                task_id: key.1.clone(),
                at_ms: self.wall_ms,
            });
        }
    }

    /// The agent whose installation registered with this token before, if any.
    pub(super) fn agent_by_token(&self, token: &str) -> Option<String> {
        if token.is_empty() {
            return None;
        }
        self.registry
            .agents
            .iter()
            .find(|(_, a)| a.token == token && !a.gone)
            .map(|(id, _)| id.clone())
    }

    /// An agent (re-)registered: note it in the registry and in the recovery.
    pub(super) fn registry_agent_back(&mut self, agent_id: &str, hostname: &str, token: &str) {
        if let Some(r) = &mut self.recovery {
            r.expected.remove(agent_id);
        }
        let entry = crate::registry::AgentEntry {
            hostname: hostname.to_string(),
            unreachable: false,
            token: token.to_string(),
            gone: false,
        };
        if self.registry.agents.get(agent_id) != Some(&entry) {
            self.persist(RegistryOp::PutAgent {
                agent_id: agent_id.to_string(),
                entry,
            });
        }
        if let Some(list) = self.registry.reservations.get(agent_id).cloned() {
            let mut by_role: BTreeMap<String, Resources> = BTreeMap::new();
            for r in list {
                by_role
                    .entry(r.role.clone())
                    .or_default()
                    .add_scalar(&r.name, "", r.value);
            }
            for (role, res) in by_role {
                let have = self
                    .allocator
                    .dynamic_reservations(agent_id)
                    .unwrap_or_default();
                let mut tagged = Resources::new();
                for n in res.names() {
                    tagged.add_scalar(&n, &role, res.get(&n));
                }
                if have.contains(&tagged) {
                    continue;
                }
                if let Err(e) = self.allocator.reserve(agent_id, &role, &res) {
                    tracing::warn!(agent = %agent_id, "registry: reservation for {role} not restored: {e}");
                }
            }
        }
    }
}
