//! Property tests of the allocator: random operations from fixed seeds (a tiny
//! xorshift, so a failure replays exactly), checked against a model that keeps its
//! own books the way the master does.
//!
//! After every step: what is held on an agent (offers and tasks, per role tag) never
//! exceeds its total, and the allocator's free part and each role's quota consumption
//! agree with the model. After every round: each offer is for a connected agent, an
//! active framework in one of its unsuppressed roles, unfiltered, its constraints met,
//! worth offering, with reserved resources only of its role or an ancestor; no role
//! goes past a limit; and the headroom for unmet guarantees never shrinks below what
//! it was.

use std::collections::{BTreeMap, BTreeSet};

use agora_allocator::{Allocation, Allocator, Constraint, Quota, WaitCause};
use agora_proto::Resources;

const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;

/// Roles used by the test: a small tree.
const ROLES: [&str; 6] = ["a", "a/x", "a/y", "b", "b/z", "c"];
const TOP: [&str; 3] = ["a", "b", "c"];

/// xorshift64*: a tiny deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.below(v.len() as u64) as usize].clone())
        }
    }
}

fn is_ancestor_or_self(a: &str, r: &str) -> bool {
    r == a || r.starts_with(&format!("{a}/"))
}

fn children(n: &str) -> Vec<&'static str> {
    ROLES
        .iter()
        .copied()
        .filter(|r| r.rsplit_once('/').is_some_and(|(p, _)| p == n))
        .collect()
}

/// (name, role, amount) entries of a bag.
fn entries(r: &Resources) -> Vec<(String, String, i64)> {
    r.to_proto()
        .into_iter()
        .map(|x| (x.name, x.role, x.value))
        .collect()
}

/// A random part of `r`, entry by entry (mem in whole MiB).
fn random_part(rng: &mut Rng, r: &Resources) -> Resources {
    let mut out = Resources::new();
    for (n, role, v) in entries(r) {
        let take = if n == "mem" {
            (rng.below((v / MIB) as u64 + 1) as i64 * MIB).min(v)
        } else {
            rng.below(v as u64 + 1) as i64
        };
        out.add_scalar(&n, &role, take);
    }
    out
}

struct AgentM {
    total: Resources,
    dynamic: Resources,
    active: bool,
    hostname: String,
    attributes: BTreeMap<String, String>,
}

struct FrameworkM {
    roles: Vec<String>,
    active: bool,
    suppressed: BTreeSet<String>,
    constraints: BTreeMap<String, Vec<Constraint>>,
}

#[derive(Default)]
struct Model {
    agents: BTreeMap<String, AgentM>,
    frameworks: BTreeMap<String, FrameworkM>,
    offers: Vec<Allocation>,
    /// Tasks: (framework, role, agent, resources).
    used: Vec<(String, String, String, Resources)>,
    /// (framework, role, agent) -> refused until.
    filters: BTreeMap<(String, String, String), u64>,
    quotas: BTreeMap<String, Quota>,
}

impl Model {
    fn held_on(&self, agent: &str) -> Resources {
        let mut held = Resources::new();
        for o in self.offers.iter().filter(|o| o.agent_id == agent) {
            held.add(&o.resources);
        }
        for (_, _, ag, r) in &self.used {
            if ag == agent {
                held.add(r);
            }
        }
        held
    }

    fn free_on(&self, agent: &str) -> Resources {
        let total = &self.agents[agent].total;
        total
            .checked_sub(&self.held_on(agent))
            .unwrap_or_else(|| panic!("model overcommitted {agent}"))
    }

    /// Everything allocated: (role, resources).
    fn allocations(&self) -> Vec<(&str, &Resources)> {
        self.offers
            .iter()
            .map(|o| (o.role.as_str(), &o.resources))
            .chain(self.used.iter().map(|(_, r, _, res)| (r.as_str(), res)))
            .collect()
    }

    /// Quota consumption of `n`: allocations in its subtree plus unallocated
    /// reservations for roles in its subtree.
    fn consumed(&self, n: &str, kind: &str) -> i64 {
        let mut c = 0;
        for (role, r) in self.allocations() {
            for (name, tag, v) in entries(r) {
                if name != kind {
                    continue;
                }
                if is_ancestor_or_self(n, role) {
                    c += v;
                }
                if !tag.is_empty() && is_ancestor_or_self(n, &tag) {
                    c -= v; // an allocated reservation is not an unallocated one
                }
            }
        }
        for a in self.agents.values() {
            for (name, tag, v) in entries(&a.total) {
                if name == kind && !tag.is_empty() && is_ancestor_or_self(n, &tag) {
                    c += v;
                }
            }
        }
        c
    }

    fn guarantee(&self, n: &str, kind: &str) -> i64 {
        self.quotas
            .get(n)
            .and_then(|q| q.guarantee.get(kind).copied())
            .unwrap_or(0)
    }

    fn limit(&self, n: &str, kind: &str) -> Option<i64> {
        self.quotas.get(n).and_then(|q| q.limit.get(kind).copied())
    }

    /// req(n) = max(0, guarantee - consumed, Σ req(children)).
    fn req(&self, n: &str, kind: &str) -> i64 {
        let kids: i64 = children(n).iter().map(|c| self.req(c, kind)).sum();
        (self.guarantee(n, kind) - self.consumed(n, kind))
            .max(kids)
            .max(0)
    }

    fn required(&self, kind: &str) -> i64 {
        TOP.iter().map(|t| self.req(t, kind)).sum()
    }

    /// Unreserved, unallocated resources on connected agents.
    fn available(&self, kind: &str) -> i64 {
        self.agents
            .iter()
            .filter(|(_, a)| a.active)
            .map(|(id, _)| {
                entries(&self.free_on(id))
                    .into_iter()
                    .filter(|(n, role, _)| n == kind && role.is_empty())
                    .map(|(_, _, v)| v)
                    .sum::<i64>()
            })
            .sum()
    }

    /// The single role a framework holds resources in on an agent, if only one.
    fn only_role_on(&self, fw: &str, agent: &str) -> Option<String> {
        let roles: BTreeSet<&str> = self
            .offers
            .iter()
            .filter(|o| o.framework_id == fw && o.agent_id == agent)
            .map(|o| o.role.as_str())
            .chain(
                self.used
                    .iter()
                    .filter(|(f, _, a, _)| f == fw && a == agent)
                    .map(|(_, r, _, _)| r.as_str()),
            )
            .collect();
        (roles.len() == 1).then(|| roles.into_iter().next().unwrap().to_string())
    }
}

/// Gives back an offer as the master does when it rescinds one.
fn rescind(a: &mut Allocator, o: &Allocation) {
    a.recover_role(&o.framework_id, &o.role, &o.agent_id, &o.resources, None);
}

fn run(seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let mut a = Allocator::new();
    let mut m = Model::default();
    let mut now: u64 = 0;
    let (mut next_agent, mut next_fw) = (0u64, 0u64);
    let mut offers_made = 0usize;
    let mut reservations_made = 0usize;
    // How often the interesting cases came up (printed with --nocapture).
    let (mut tagged_offers, mut rounds_with_guarantees, mut rounds_at_limit) = (0, 0, 0);

    for step in 0..steps {
        let op = rng.below(100);
        let ctx = format!("seed {seed}, step {step}, op {op}");
        match op {
            // A new agent, sometimes with a static reservation.
            0..=4 => {
                let id = format!("a{next_agent}");
                next_agent += 1;
                let mut total = Resources::cpus_mem(
                    1000 * (1 + rng.below(8) as i64),
                    GIB * (1 + rng.below(16) as i64),
                );
                if rng.chance(30) {
                    let role = rng.pick(&ROLES).unwrap();
                    total.add_scalar("cpus", role, 1000 * (1 + rng.below(2) as i64));
                    total.add_scalar("mem", role, GIB);
                }
                let zone = format!("z{}", rng.below(3));
                let hostname = format!("h{}", rng.below(20));
                let attributes: BTreeMap<String, String> = [("zone".to_string(), zone)].into();
                a.add_agent(&id, total.clone(), Resources::new());
                a.set_agent_attributes(&id, &hostname, attributes.clone())
                    .unwrap();
                m.agents.insert(
                    id,
                    AgentM {
                        total,
                        dynamic: Resources::new(),
                        active: true,
                        hostname,
                        attributes,
                    },
                );
            }
            // An agent leaves: its offers are rescinded and its tasks end first.
            5..=6 => {
                let ids: Vec<String> = m.agents.keys().cloned().collect();
                if let Some(id) = rng.pick(&ids) {
                    for o in m.offers.iter().filter(|o| o.agent_id == id) {
                        rescind(&mut a, o);
                    }
                    m.offers.retain(|o| o.agent_id != id);
                    for (f, r, _, res) in m.used.iter().filter(|(_, _, ag, _)| *ag == id) {
                        a.recover_role(f, r, &id, res, None);
                    }
                    m.used.retain(|(_, _, ag, _)| *ag != id);
                    a.remove_agent(&id);
                    m.agents.remove(&id);
                    m.filters.retain(|(_, _, ag), _| *ag != id);
                }
            }
            // Agents disconnect (offers rescinded) and reconnect.
            7..=9 => {
                let ids: Vec<String> = m.agents.keys().cloned().collect();
                if let Some(id) = rng.pick(&ids) {
                    let active = !m.agents[&id].active;
                    if !active {
                        for o in m.offers.iter().filter(|o| o.agent_id == id) {
                            rescind(&mut a, o);
                        }
                        m.offers.retain(|o| o.agent_id != id);
                    }
                    a.set_agent_active(&id, active);
                    m.agents.get_mut(&id).unwrap().active = active;
                }
            }
            // A framework subscribes in 1 to 3 roles.
            10..=12 => {
                let id = format!("f{next_fw}");
                next_fw += 1;
                let mut roles: Vec<String> = Vec::new();
                for _ in 0..1 + rng.below(3) {
                    let r = rng.pick(&ROLES).unwrap().to_string();
                    if !roles.contains(&r) {
                        roles.push(r);
                    }
                }
                a.add_framework_roles(&id, &roles);
                m.frameworks.insert(
                    id,
                    FrameworkM {
                        roles,
                        active: true,
                        suppressed: BTreeSet::new(),
                        constraints: BTreeMap::new(),
                    },
                );
            }
            // A framework disconnects (offers rescinded) or comes back.
            13..=14 => {
                let ids: Vec<String> = m.frameworks.keys().cloned().collect();
                if let Some(id) = rng.pick(&ids) {
                    let active = !m.frameworks[&id].active;
                    if !active {
                        for o in m.offers.iter().filter(|o| o.framework_id == id) {
                            rescind(&mut a, o);
                        }
                        m.offers.retain(|o| o.framework_id != id);
                    }
                    a.set_framework_active(&id, active);
                    m.frameworks.get_mut(&id).unwrap().active = active;
                }
            }
            // Teardown: offers rescinded; its tasks stay until they end.
            15 => {
                let ids: Vec<String> = m.frameworks.keys().cloned().collect();
                if let Some(id) = rng.pick(&ids) {
                    for o in m.offers.iter().filter(|o| o.framework_id == id) {
                        rescind(&mut a, o);
                    }
                    m.offers.retain(|o| o.framework_id != id);
                    a.remove_framework(&id);
                    m.frameworks.remove(&id);
                    m.filters.retain(|(f, _, _), _| *f != id);
                }
            }
            // Suppress or revive one role (revive drops that role's filters).
            16..=18 => {
                let ids: Vec<String> = m.frameworks.keys().cloned().collect();
                if let Some(id) = rng.pick(&ids) {
                    let f = m.frameworks.get_mut(&id).unwrap();
                    let role = rng.pick(&f.roles).unwrap();
                    let suppress = !f.suppressed.contains(&role);
                    a.suppress_role(&id, &role, suppress).unwrap();
                    if suppress {
                        f.suppressed.insert(role);
                    } else {
                        f.suppressed.remove(&role);
                        m.filters.retain(|(ff, r, _), _| !(*ff == id && *r == role));
                    }
                }
            }
            // Constraints of one role.
            19..=20 => {
                let ids: Vec<String> = m.frameworks.keys().cloned().collect();
                if let Some(id) = rng.pick(&ids) {
                    let f = m.frameworks.get_mut(&id).unwrap();
                    let role = rng.pick(&f.roles).unwrap();
                    let choices = [
                        "zone=z0",
                        "zone~z[",
                        "zone~z*",
                        "hostname~h1*",
                        "gpu",
                        "zone",
                    ];
                    let mut cs = Vec::new();
                    for _ in 0..rng.below(3) {
                        cs.push(Constraint::parse(rng.pick(&choices).unwrap()).unwrap());
                    }
                    a.set_constraints(&id, &role, cs.clone()).unwrap();
                    f.constraints.insert(role, cs);
                }
            }
            // Accept part of an offer (a task) and give the rest back, filtered.
            21..=36 => {
                if !m.offers.is_empty() {
                    let i = rng.below(m.offers.len() as u64) as usize;
                    let o = m.offers.swap_remove(i);
                    let part = random_part(&mut rng, &o.resources);
                    let rest = o.resources.checked_sub(&part).expect("a part");
                    if !part.is_empty() {
                        m.used.push((
                            o.framework_id.clone(),
                            o.role.clone(),
                            o.agent_id.clone(),
                            part,
                        ));
                    }
                    let until = now + rng.below(5_000);
                    a.recover_role(&o.framework_id, &o.role, &o.agent_id, &rest, Some(until));
                    m.filters
                        .insert((o.framework_id, o.role, o.agent_id), until);
                }
            }
            // Decline a whole offer, filtered or not; without naming the role when
            // the framework holds resources in one role only on that agent.
            37..=46 => {
                if !m.offers.is_empty() {
                    let i = rng.below(m.offers.len() as u64) as usize;
                    let o = m.offers[i].clone();
                    let until = rng.chance(50).then(|| now + rng.below(5_000));
                    if m.only_role_on(&o.framework_id, &o.agent_id).is_some() {
                        a.recover(&o.framework_id, &o.agent_id, &o.resources, until);
                    } else {
                        a.recover_role(&o.framework_id, &o.role, &o.agent_id, &o.resources, until);
                    }
                    m.offers.swap_remove(i);
                    if let Some(u) = until {
                        m.filters.insert((o.framework_id, o.role, o.agent_id), u);
                    }
                }
            }
            // A task ends.
            47..=56 => {
                if !m.used.is_empty() {
                    let i = rng.below(m.used.len() as u64) as usize;
                    let (f, r, ag, res) = m.used.swap_remove(i);
                    a.recover_role(&f, &r, &ag, &res, None);
                }
            }
            // Tasks reported by an agent for a subscribed framework and role.
            57..=58 => {
                let ids: Vec<String> = m.agents.keys().cloned().collect();
                let fws: Vec<String> = m.frameworks.keys().cloned().collect();
                if let (Some(ag), Some(f)) = (rng.pick(&ids), rng.pick(&fws)) {
                    let role = rng.pick(&m.frameworks[&f].roles).unwrap();
                    let part = random_part(&mut rng, &m.free_on(&ag));
                    if !part.is_empty() {
                        a.track_used_role(&f, &role, &ag, &part);
                        m.used.push((f, role, ag, part));
                    }
                }
            }
            // RESERVE free unreserved cpus (and maybe mem) for a role.
            59..=62 => {
                let ids: Vec<String> = m.agents.keys().cloned().collect();
                if let Some(ag) = rng.pick(&ids) {
                    let role = rng.pick(&ROLES).unwrap();
                    let mut want = Resources::new();
                    want.add_scalar("cpus", "", 500 * (1 + rng.below(4) as i64));
                    if rng.chance(50) {
                        want.add_scalar("mem", "", GIB);
                    }
                    let free = m.free_on(&ag);
                    let mut ok = free.contains(&want);
                    for n in ROLES.iter().filter(|n| is_ancestor_or_self(n, role)) {
                        for (k, _, v) in entries(&want) {
                            if m.limit(n, &k).is_some_and(|l| m.consumed(n, &k) + v > l) {
                                ok = false;
                            }
                        }
                    }
                    let got = a.reserve(&ag, role, &want);
                    assert_eq!(
                        got.is_ok(),
                        ok,
                        "{ctx}: reserve {want} for {role} on {ag}: {got:?}"
                    );
                    if got.is_ok() {
                        reservations_made += 1;
                        let mut tagged = Resources::new();
                        for (k, _, v) in entries(&want) {
                            tagged.add_scalar(&k, role, v);
                        }
                        let am = m.agents.get_mut(&ag).unwrap();
                        am.total.sub(&want);
                        am.total.add(&tagged);
                        am.dynamic.add(&tagged);
                    }
                }
            }
            // UNRESERVE part of a dynamic reservation.
            63..=65 => {
                let ids: Vec<String> = m
                    .agents
                    .iter()
                    .filter(|(_, a)| !a.dynamic.is_empty())
                    .map(|(id, _)| id.clone())
                    .collect();
                if let Some(ag) = rng.pick(&ids) {
                    let es = entries(&m.agents[&ag].dynamic);
                    let (k, role, v) = rng.pick(&es).unwrap();
                    let mut tagged = Resources::new();
                    tagged.add_scalar(&k, &role, if k == "mem" { v } else { 500.min(v) });
                    let ok = m.free_on(&ag).contains(&tagged);
                    let got = a.unreserve(&ag, &role, &tagged);
                    assert_eq!(
                        got.is_ok(),
                        ok,
                        "{ctx}: unreserve {tagged} on {ag}: {got:?}"
                    );
                    if got.is_ok() {
                        let am = m.agents.get_mut(&ag).unwrap();
                        am.total.sub(&tagged);
                        am.total.add(&tagged.unreserved());
                        am.dynamic.sub(&tagged);
                    }
                }
            }
            // Quotas and weights change at run time.
            66..=69 => {
                let role = rng.pick(&ROLES).unwrap();
                let mut q = Quota::new();
                if rng.chance(60) {
                    q = q.guarantee("cpus", 1000 * rng.below(6) as i64);
                }
                if rng.chance(20) {
                    q = q.guarantee("mem", GIB * rng.below(8) as i64);
                }
                if rng.chance(60) {
                    let floor = q.guarantee.get("cpus").copied().unwrap_or(0);
                    q = q.limit("cpus", floor + 1000 * rng.below(10) as i64);
                }
                a.set_quota(role, q.clone()).unwrap();
                if q.is_empty() {
                    m.quotas.remove(role);
                } else {
                    m.quotas.insert(role.to_string(), q);
                }
            }
            70..=71 => {
                let role = rng.pick(&ROLES).unwrap();
                a.set_weight(role, 0.5 + rng.below(8) as f64 / 2.0).unwrap();
            }
            // Explanations never fail and agree on the basics.
            72..=73 => {
                let role = rng.pick(&ROLES).unwrap();
                let e = a.explain_role(role, now);
                let subscribed = m
                    .frameworks
                    .values()
                    .any(|f| f.roles.iter().any(|r| r == role));
                assert_eq!(
                    e.causes.contains(&WaitCause::NoFrameworks {
                        role: role.to_string()
                    }),
                    !subscribed,
                    "{ctx}"
                );
                if let Some(f) = rng.pick(&m.frameworks.keys().cloned().collect::<Vec<_>>()) {
                    let e = a.explain_request(&f, role, &Resources::cpus_mem(1000, GIB), now);
                    assert_eq!(e.resources.len(), 2, "{ctx}");
                }
            }
            74..=81 => now += rng.below(3_000),
            // An allocation round.
            _ => {
                let kinds = ["cpus", "mem"];
                let before: Vec<(String, &str, i64)> = ROLES
                    .iter()
                    .flat_map(|n| kinds.iter().map(move |k| (n.to_string(), *k)))
                    .map(|(n, k)| {
                        let c = m.consumed(&n, k);
                        (n, k, c)
                    })
                    .collect();
                let headroom_before: Vec<i64> = kinds
                    .iter()
                    .map(|k| m.available(k) - m.required(k))
                    .collect();
                if kinds.iter().any(|k| m.required(k) > 0) {
                    rounds_with_guarantees += 1;
                }
                if ROLES.iter().any(|n| {
                    m.limit(n, "cpus")
                        .is_some_and(|l| m.consumed(n, "cpus") >= l)
                }) {
                    rounds_at_limit += 1;
                }
                let round = a.allocate(now);
                tagged_offers += round
                    .iter()
                    .filter(|o| o.resources.unreserved() != o.resources)
                    .count();
                let mut seen = BTreeSet::new();
                for al in &round {
                    let key = (
                        al.framework_id.clone(),
                        al.role.clone(),
                        al.agent_id.clone(),
                    );
                    assert!(seen.insert(key.clone()), "{ctx}: two offers for {key:?}");
                    let ag = m
                        .agents
                        .get(&al.agent_id)
                        .unwrap_or_else(|| panic!("{ctx}: unknown agent"));
                    assert!(ag.active, "{ctx}: offer of a disconnected agent");
                    let f = m
                        .frameworks
                        .get(&al.framework_id)
                        .unwrap_or_else(|| panic!("{ctx}: offer to unknown {}", al.framework_id));
                    assert!(f.active, "{ctx}: offer to an inactive framework");
                    assert!(
                        f.roles.contains(&al.role),
                        "{ctx}: role {} not subscribed",
                        al.role
                    );
                    assert!(
                        !f.suppressed.contains(&al.role),
                        "{ctx}: suppressed role offered"
                    );
                    assert!(
                        m.filters.get(&key).is_none_or(|u| *u <= now),
                        "{ctx}: {key:?} offered while filtered"
                    );
                    for c in f.constraints.get(&al.role).into_iter().flatten() {
                        assert!(c.is_met(&ag.hostname, &ag.attributes), "{ctx}: {c} not met");
                    }
                    assert!(
                        al.resources.milli_cpus() >= 10 || al.resources.mem_bytes() >= 32 * MIB,
                        "{ctx}: offer too small: {}",
                        al.resources
                    );
                    for (_, tag, _) in entries(&al.resources) {
                        assert!(
                            tag.is_empty() || is_ancestor_or_self(&tag, &al.role),
                            "{ctx}: reserved for {tag} offered to {}",
                            al.role
                        );
                    }
                    assert!(
                        m.free_on(&al.agent_id).contains(&al.resources),
                        "{ctx}: {} offered, not free on {}",
                        al.resources,
                        al.agent_id
                    );
                    m.offers.push(al.clone());
                    offers_made += 1;
                }
                for (n, k, was) in before {
                    if let Some(limit) = m.limit(&n, k) {
                        let now_c = m.consumed(&n, k);
                        assert!(
                            now_c <= limit.max(was),
                            "{ctx}: {n} consumes {now_c} {k}, limit {limit} (was {was})"
                        );
                    }
                }
                for (i, k) in kinds.iter().enumerate() {
                    let after = m.available(k) - m.required(k);
                    assert!(
                        after >= headroom_before[i].min(0),
                        "{ctx}: headroom for {k} fell to {after} (was {})",
                        headroom_before[i]
                    );
                }
            }
        }
        // After every step: nothing is held twice, and the books agree.
        for (id, ag) in &m.agents {
            let held = m.held_on(id);
            assert!(
                ag.total.contains(&held),
                "{ctx}: {id} holds {held} of {}",
                ag.total
            );
            assert_eq!(
                a.agent_free(id)
                    .unwrap_or_else(|| panic!("{ctx}: lost {id}")),
                ag.total.checked_sub(&held).unwrap(),
                "{ctx}: free part of {id}"
            );
            assert_eq!(
                a.dynamic_reservations(id).unwrap(),
                ag.dynamic,
                "{ctx}: {id}"
            );
        }
        for n in ROLES {
            let want = Resources::cpus_mem(m.consumed(n, "cpus"), m.consumed(n, "mem"));
            assert_eq!(a.role_consumed(n), want, "{ctx}: consumption of {n}");
        }
    }
    eprintln!(
        "seed {seed}: {offers_made} offers ({tagged_offers} with reservations), \
         {reservations_made} reservations, {rounds_with_guarantees} rounds with unmet \
         guarantees, {rounds_at_limit} with a role at its cpu limit"
    );
    assert!(
        offers_made > steps / 20,
        "seed {seed}: {offers_made} offers"
    );
    assert!(reservations_made > 0, "seed {seed}: no reservation made");
}

#[test]
fn random_operations_keep_every_invariant() {
    for seed in [1, 0x9E37_79B9_7F4A_7C15, 42, 7_777_777, 2024] {
        run(seed, 3_000);
    }
}
