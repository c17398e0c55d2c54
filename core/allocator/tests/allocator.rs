//! The allocator's rules, one test (or a few) each: weighted and hierarchical DRF,
//! quota limits and guarantees, reservations, filters, min allocatable, per-role
//! suppression, constraints, multi-role frameworks, and the explanation data.

use std::collections::BTreeMap;

use agora_allocator::{
    Allocation, Allocator, AllocatorConfig, AllocatorError, Constraint, Quota, WaitCause,
};
use agora_proto::Resources;

const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;

fn cpus_mem(c: i64, m: i64) -> Resources {
    Resources::cpus_mem(c, m)
}

/// `amounts` reserved for `role`.
fn reserved(role: &str, cpus: i64, mem: i64) -> Resources {
    let mut r = Resources::new();
    r.add_scalar("cpus", role, cpus);
    r.add_scalar("mem", role, mem);
    r
}

fn sum(rs: &[&Resources]) -> Resources {
    let mut out = Resources::new();
    for r in rs {
        out.add(r);
    }
    out
}

/// Runs rounds in which every offer that can hold `task` launches one (kept for
/// good) and gives the rest back without a filter; returns tasks per
/// (framework, role).
fn fill(a: &mut Allocator, task: &Resources, rounds: usize) -> BTreeMap<(String, String), usize> {
    let mut count = BTreeMap::new();
    for round in 0..rounds {
        let offers = a.allocate(round as u64);
        if offers.is_empty() {
            break;
        }
        for o in offers {
            if o.resources.unreserved().contains(task) {
                let rest = o.resources.checked_sub(task).expect("unreserved offer");
                a.recover_role(&o.framework_id, &o.role, &o.agent_id, &rest, None);
                *count.entry((o.framework_id, o.role)).or_insert(0) += 1;
            } else {
                a.recover_role(&o.framework_id, &o.role, &o.agent_id, &o.resources, None);
            }
        }
    }
    count
}

fn tasks_of(count: &BTreeMap<(String, String), usize>, fw: &str) -> usize {
    count
        .iter()
        .filter(|((f, _), _)| f == fw)
        .map(|(_, n)| n)
        .sum()
}

fn agents(a: &mut Allocator, n: usize, per: Resources) {
    for i in 0..n {
        a.add_agent(&format!("a{i:02}"), per.clone(), Resources::new());
    }
}

// ---- fairness ---------------------------------------------------------------------

#[test]
fn weights_split_offers_in_ratio() {
    let mut a = Allocator::new();
    agents(&mut a, 10, cpus_mem(8_000, 64 * GIB));
    a.set_weight("light", 1.0).unwrap();
    a.set_weight("heavy", 3.0).unwrap();
    a.add_framework("fl", "light");
    a.add_framework("fh", "heavy");
    // 80 cpus, tasks of 0.25 cpu: 320 tasks fill the cluster.
    let count = fill(&mut a, &cpus_mem(250, 512 * MIB), 10_000);
    let (l, h) = (tasks_of(&count, "fl"), tasks_of(&count, "fh"));
    assert_eq!(l + h, 320, "the cluster is full");
    let ratio = h as f64 / l as f64;
    assert!((2.8..=3.2).contains(&ratio), "heavy {h} light {l}: {ratio}");
}

#[test]
fn hierarchical_roles_share_their_parents_weight() {
    let run = |web_weight: f64| {
        let mut a = Allocator::new();
        agents(&mut a, 10, cpus_mem(8_000, 64 * GIB));
        a.set_weight("eng/web", web_weight).unwrap();
        a.add_framework("web", "eng/web");
        a.add_framework("batch", "eng/batch");
        a.add_framework("ops", "ops");
        let count = fill(&mut a, &cpus_mem(250, 512 * MIB), 10_000);
        let t = |f| tasks_of(&count, f) as f64;
        (t("web"), t("batch"), t("ops"))
    };
    // Weights 1: eng (web and batch together) and ops get half each.
    let (web, batch, ops) = run(1.0);
    assert_eq!(web + batch + ops, 320.0);
    assert!(
        ((web + batch) / ops - 1.0).abs() < 0.05,
        "{web} {batch} {ops}"
    );
    assert!((web / batch - 1.0).abs() < 0.1, "{web} {batch}");
    // eng/web weighs 3 among its siblings: it takes 3/4 of eng's half, and eng as a
    // whole still gets no more than ops.
    let (web, batch, ops) = run(3.0);
    assert!(
        ((web + batch) / ops - 1.0).abs() < 0.05,
        "{web} {batch} {ops}"
    );
    assert!((web / batch - 3.0).abs() < 0.3, "{web} {batch}");
}

#[test]
fn frameworks_in_a_role_go_by_their_share_in_it_after_the_roles() {
    let mut a = Allocator::new();
    agents(&mut a, 3, cpus_mem(4_000, 4 * GIB));
    a.add_framework("big", "r1");
    a.add_framework("small", "r1");
    a.add_framework("other", "r2");
    a.track_used("big", "a00", &cpus_mem(2_000, GIB));
    a.track_used("other", "a01", &cpus_mem(1_000, GIB));
    let offers = a.allocate(0);
    let who: Vec<(&str, &str)> = offers
        .iter()
        .map(|o| (o.agent_id.as_str(), o.framework_id.as_str()))
        .collect();
    // 12 cpus in all. r1 holds 2/12, r2 1/12: a00 (2 cpus, 3 GiB free) goes to r2,
    // which then holds 3/12 cpus and 4/12 mem. a01 goes to r1 (2/12 < 4/12), to its
    // framework holding least in r1: "small". r1 now holds 5/12: a02 goes to r2.
    assert_eq!(
        who,
        vec![("a00", "other"), ("a01", "small"), ("a02", "other")]
    );
}

// ---- quota ------------------------------------------------------------------------

#[test]
fn quota_limit_is_never_exceeded_counting_descendants() {
    let mut a = Allocator::new();
    agents(&mut a, 4, cpus_mem(2_000, 4 * GIB));
    a.set_quota("eng", Quota::new().limit("cpus", 3_000))
        .unwrap();
    a.add_framework("web", "eng/web");
    a.add_framework("batch", "eng/batch");
    for round in 0..5 {
        let offers = a.allocate(round);
        let cpus: i64 = offers.iter().map(|o| o.resources.milli_cpus()).sum();
        assert_eq!(cpus, 3_000, "round {round}: eng's limit, no more, no less");
        // Mem is not limited: it is offered whole, even without cpus.
        let mem: i64 = offers.iter().map(|o| o.resources.mem_bytes()).sum();
        assert_eq!(mem, 16 * GIB);
        assert_eq!(a.role_consumed("eng").milli_cpus(), 3_000);
        for o in offers {
            a.recover(&o.framework_id, &o.agent_id, &o.resources, None);
        }
    }
    // A limit lowered at run time below what is held takes nothing back, and
    // nothing more is offered.
    a.track_used("web", "a00", &cpus_mem(1_000, GIB));
    a.set_quota("eng", Quota::new().limit("cpus", 500)).unwrap();
    let offers = a.allocate(10);
    assert!(
        offers.iter().all(|o| o.resources.milli_cpus() == 0),
        "{offers:?}"
    );
}

#[test]
fn guarantee_holds_headroom_back_from_other_roles() {
    let mut a = Allocator::new();
    agents(&mut a, 5, cpus_mem(2_000, 4 * GIB)); // 10 cpus
    a.set_quota("prod", Quota::new().guarantee("cpus", 4_000))
        .unwrap();
    a.add_framework("fp", "prod");
    a.suppress("fp", true); // no demand yet: the guarantee still holds 4 cpus
    a.add_framework("fd", "dev");
    let offers = a.allocate(0);
    assert!(offers.iter().all(|o| o.framework_id == "fd"));
    let dev_cpus: i64 = offers.iter().map(|o| o.resources.milli_cpus()).sum();
    assert_eq!(dev_cpus, 6_000, "dev gets all but prod's guarantee");
    // Once prod asks, its guarantee is there for it.
    a.suppress("fp", false);
    let offers = a.allocate(1);
    let prod_cpus: i64 = offers
        .iter()
        .filter(|o| o.role == "prod")
        .map(|o| o.resources.milli_cpus())
        .sum();
    assert_eq!(prod_cpus, 4_000);
    assert!(offers.iter().all(|o| o.role == "prod"));
}

#[test]
fn unmet_guarantees_are_offered_first() {
    let mut a = Allocator::new();
    agents(&mut a, 3, cpus_mem(2_000, 4 * GIB));
    a.set_quota("prod", Quota::new().guarantee("cpus", 3_000))
        .unwrap();
    a.add_framework("fp", "prod");
    a.add_framework("fd", "dev");
    // prod holds more than dev (DRF alone would pick dev) but is short of its
    // guarantee: it is offered first, chopped to what it misses (1 cpu).
    a.track_used("fp", "a00", &cpus_mem(2_000, GIB));
    let offers = a.allocate(0);
    assert_eq!(offers[0].framework_id, "fp");
    assert_eq!(offers[0].agent_id, "a00");
    assert_eq!(offers[0].resources, cpus_mem(0, 3 * GIB));
    assert_eq!(offers[1].framework_id, "fp");
    assert_eq!(offers[1].agent_id, "a01");
    assert_eq!(offers[1].resources.milli_cpus(), 1_000);
    // Then the rest goes by DRF; a01's other cpu goes to dev.
    let dev: Vec<&Allocation> = offers.iter().filter(|o| o.framework_id == "fd").collect();
    assert_eq!(
        dev.iter().map(|o| o.resources.milli_cpus()).sum::<i64>(),
        3_000
    );
}

#[test]
fn weights_and_quotas_are_checked() {
    let mut a = Allocator::new();
    for w in [
        0.0,
        -1.0,
        1e308,
        1e-300,
        f64::NAN,
        f64::INFINITY,
        0.000_9,
        1_000_001.0,
    ] {
        assert!(
            matches!(
                a.set_weight("eng", w),
                Err(AllocatorError::InvalidWeight { .. })
            ),
            "weight {w} accepted"
        );
    }
    for w in [0.001, 1.0, 2.5, 1_000_000.0] {
        a.set_weight("eng", w).unwrap();
    }
    assert!(matches!(
        a.set_weight("eng//x", 1.0),
        Err(AllocatorError::InvalidRole { .. })
    ));
    let e = a
        .set_quota("eng", Quota::new().guarantee("cpus", 2).limit("cpus", 1))
        .unwrap_err();
    assert!(e.to_string().contains("above its limit"), "{e}");
    a.set_quota("eng", Quota::new().limit("cpus", 1)).unwrap();
    assert_eq!(a.quota("eng"), Some(&Quota::new().limit("cpus", 1)));
    a.set_quota("eng", Quota::new()).unwrap();
    assert_eq!(a.quota("eng"), None);
}

// ---- reservations -----------------------------------------------------------------

#[test]
fn static_reservations_go_only_to_their_role_subtree_and_keep_their_tag() {
    let mut a = Allocator::new();
    let total = sum(&[
        &reserved("tenant-a", 2_000, 2 * GIB),
        &cpus_mem(2_000, 2 * GIB),
    ]);
    a.add_agent("a1", total, Resources::new());
    a.add_framework("other", "other");
    a.add_framework("sub", "tenant-a/batch");
    // "other" holds nothing elsewhere... both have share 0; ties go by role path
    // ("other" < "tenant-a"): "other" takes the unreserved part, "sub" the
    // reservation of its parent role, in two offers of one round.
    let offers = a.allocate(0);
    assert_eq!(
        offers,
        vec![
            Allocation {
                framework_id: "other".into(),
                agent_id: "a1".into(),
                role: "other".into(),
                resources: cpus_mem(2_000, 2 * GIB),
            },
            Allocation {
                framework_id: "sub".into(),
                agent_id: "a1".into(),
                role: "tenant-a/batch".into(),
                resources: reserved("tenant-a", 2_000, 2 * GIB),
            },
        ]
    );
    // Given back, and "sub" gone: the reservation is offered to nobody else.
    for o in &offers {
        a.recover(&o.framework_id, &o.agent_id, &o.resources, None);
    }
    a.remove_framework("sub");
    let offers = a.allocate(1);
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].resources, cpus_mem(2_000, 2 * GIB));
}

#[test]
fn dynamic_reservations_move_resources_with_checks() {
    let mut a = Allocator::new();
    let total = sum(&[&cpus_mem(4_000, 4 * GIB), &reserved("static", 1_000, 0)]);
    a.add_agent("a1", total, Resources::new());
    a.add_framework("fb", "tenant-b");
    a.add_framework("fo", "other");
    a.suppress("fb", true);

    a.reserve("a1", "tenant-b", &cpus_mem(1_000, GIB)).unwrap();
    assert_eq!(
        a.dynamic_reservations("a1").unwrap(),
        reserved("tenant-b", 1_000, GIB)
    );
    assert_eq!(a.role_consumed("tenant-b"), cpus_mem(1_000, GIB));
    // "other" is offered the unreserved rest only.
    let o = a.allocate(0);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].resources, cpus_mem(3_000, 3 * GIB));
    a.recover("fo", "a1", &o[0].resources, Some(1_000_000));
    // tenant-b's framework gets its reservation, tagged (and the rest, which
    // "other" declined).
    a.suppress("fb", false);
    let o = a.allocate(1);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].framework_id, "fb");
    assert_eq!(
        o[0].resources,
        sum(&[&reserved("tenant-b", 1_000, GIB), &cpus_mem(3_000, 3 * GIB)])
    );
    // In use: cannot be unreserved.
    assert!(matches!(
        a.unreserve("a1", "tenant-b", &cpus_mem(1_000, GIB)),
        Err(AllocatorError::ReservationInUse { .. })
    ));
    a.recover("fb", "a1", &o[0].resources, Some(1_000_000));
    // Unreserve (with or without the tag) gives it back to everyone.
    a.unreserve("a1", "tenant-b", &reserved("tenant-b", 500, 0))
        .unwrap();
    a.unreserve("a1", "tenant-b", &cpus_mem(500, GIB)).unwrap();
    assert!(a.dynamic_reservations("a1").unwrap().is_empty());
    assert!(a.role_consumed("tenant-b").is_empty());
    a.suppress("fo", false);
    let o = a.allocate(2);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].resources, cpus_mem(4_000, 4 * GIB));
    a.recover("fo", "a1", &o[0].resources, None);

    // The checks.
    assert!(matches!(
        a.reserve("a1", "tenant-b", &cpus_mem(5_000, 0)),
        Err(AllocatorError::NotFree { .. })
    ));
    assert!(matches!(
        a.reserve("a1", "tenant-b", &reserved("static", 100, 0)),
        Err(AllocatorError::AlreadyReserved { .. })
    ));
    assert!(matches!(
        a.unreserve("a1", "static", &cpus_mem(1_000, 0)),
        Err(AllocatorError::NotReserved { .. })
    ));
    assert!(matches!(
        a.reserve("nope", "tenant-b", &cpus_mem(1, 0)),
        Err(AllocatorError::UnknownAgent(_))
    ));
    assert!(matches!(
        a.reserve("a1", "*", &cpus_mem(1, 0)),
        Err(AllocatorError::InvalidRole { .. })
    ));
    a.set_quota("tenant-b", Quota::new().limit("cpus", 1_500))
        .unwrap();
    a.reserve("a1", "tenant-b", &cpus_mem(1_000, 0)).unwrap();
    let e = a
        .reserve("a1", "tenant-b", &cpus_mem(1_000, 0))
        .unwrap_err();
    assert_eq!(
        e,
        AllocatorError::OverLimit {
            role: "tenant-b".into(),
            limited_role: "tenant-b".into(),
            resource: "cpus".into(),
            limit: 1_500,
            consumed: 1_000,
            amount: 1_000,
        }
    );
}

// ---- filters, min allocatable, suppression ---------------------------------------------

#[test]
fn filters_are_per_framework_role_and_agent() {
    let mut a = Allocator::new();
    a.add_agent("a1", cpus_mem(2_000, 2 * GIB), Resources::new());
    a.add_framework_roles("f", &["r1", "r2"]);
    let o = a.allocate(0);
    assert_eq!((o.len(), o[0].role.as_str()), (1, "r1"));
    a.recover("f", "a1", &o[0].resources, Some(10_000));
    // r1 declined a1; r2 has not.
    let o = a.allocate(1);
    assert_eq!((o.len(), o[0].role.as_str()), (1, "r2"));
    a.recover_role("f", "r2", "a1", &o[0].resources, Some(20_000));
    assert!(a.allocate(2).is_empty());
    // r1's filter ends first; reviving r2 drops its filter.
    assert_eq!(a.allocate(10_000)[0].role, "r1");
    a.recover_role("f", "r1", "a1", &cpus_mem(2_000, 2 * GIB), Some(30_000));
    a.suppress_role("f", "r2", false).unwrap();
    assert_eq!(a.allocate(10_001)[0].role, "r2");
}

#[test]
fn min_allocatable_is_configurable() {
    let setup = |a: &mut Allocator| {
        a.add_agent("a1", cpus_mem(1_000, 8 * GIB), Resources::new());
        a.add_framework("f", "r");
        a.track_used("f", "a1", &cpus_mem(500, 0));
    };
    // Default: cpus 0.01 or mem 32 MiB; 0.5 cpu is enough.
    let mut a = Allocator::new();
    setup(&mut a);
    assert_eq!(a.allocate(0).len(), 1);
    // At least 1 cpu and 1 GiB: not worth an offer.
    let mut a = Allocator::with_config(AllocatorConfig {
        min_allocatable: vec![cpus_mem(1_000, GIB)],
    });
    setup(&mut a);
    assert!(a.allocate(0).is_empty());
    a.recover("f", "a1", &cpus_mem(500, 0), None);
    assert_eq!(a.allocate(1).len(), 1);
    // Below the defaults on every dimension: no offer.
    let mut a = Allocator::new();
    a.add_agent("a1", cpus_mem(5, 16 * MIB), Resources::new());
    a.add_framework("f", "r");
    assert!(a.allocate(0).is_empty());
}

#[test]
fn a_framework_may_suppress_one_of_its_roles() {
    let mut a = Allocator::new();
    agents(&mut a, 2, cpus_mem(1_000, GIB));
    a.add_framework_roles("f", &["batch", "web"]);
    a.suppress_role("f", "batch", true).unwrap();
    let o = a.allocate(0);
    assert_eq!(o.len(), 2);
    assert!(o.iter().all(|o| o.role == "web"));
    for o in &o {
        a.recover(&o.framework_id, &o.agent_id, &o.resources, None);
    }
    a.suppress_role("f", "batch", false).unwrap();
    a.suppress_role("f", "web", true).unwrap();
    let o = a.allocate(1);
    assert!(o.len() == 2 && o.iter().all(|o| o.role == "batch"));
    assert_eq!(
        a.suppress_role("f", "ops", true),
        Err(AllocatorError::RoleNotSubscribed {
            framework_id: "f".into(),
            role: "ops".into()
        })
    );
}

// ---- constraints and multi-role frameworks -------------------------------------------------

#[test]
fn constraints_pin_frameworks_to_agents() {
    let attrs = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut a = Allocator::new();
    agents(&mut a, 3, cpus_mem(1_000, GIB));
    a.set_agent_attributes("a00", "edge-1.example", attrs(&[("zone", "edge-1")]))
        .unwrap();
    a.set_agent_attributes(
        "a01",
        "edge-2.example",
        attrs(&[("zone", "edge-2"), ("gpu", "1")]),
    )
    .unwrap();
    a.set_agent_attributes("a02", "core-1.example", attrs(&[("zone", "core")]))
        .unwrap();
    a.add_framework("f", "r");
    let offered_to = |a: &mut Allocator, c: Vec<Constraint>| -> Vec<String> {
        a.set_constraints("f", "r", c).unwrap();
        let o = a.allocate(0);
        for o in &o {
            a.recover(&o.framework_id, &o.agent_id, &o.resources, None);
        }
        o.into_iter().map(|o| o.agent_id).collect()
    };
    let c = |s: &str| Constraint::parse(s).unwrap();
    assert_eq!(offered_to(&mut a, vec![c("zone=edge-1")]), ["a00"]);
    assert_eq!(offered_to(&mut a, vec![c("gpu")]), ["a01"]);
    assert_eq!(offered_to(&mut a, vec![c("zone~edge-*")]), ["a00", "a01"]);
    assert_eq!(offered_to(&mut a, vec![c("hostname~core-*")]), ["a02"]);
    assert_eq!(
        offered_to(&mut a, vec![c("hostname=edge-2.example")]),
        ["a01"]
    );
    assert_eq!(
        offered_to(&mut a, vec![c("zone~edge-*"), c("gpu")]),
        ["a01"]
    );
    assert!(offered_to(&mut a, vec![c("rack")]).is_empty());
    assert_eq!(offered_to(&mut a, vec![]).len(), 3);
    // Attributes that change move the agent in or out.
    a.set_constraints("f", "r", vec![c("zone=edge-1")]).unwrap();
    a.set_agent_attributes("a02", "core-1.example", attrs(&[("zone", "edge-1")]))
        .unwrap();
    a.add_agent("a03", cpus_mem(1_000, GIB), Resources::new());
    let o: Vec<String> = a.allocate(1).into_iter().map(|o| o.agent_id).collect();
    assert_eq!(o, ["a00", "a02"]);
}

#[test]
fn a_multi_role_framework_gets_one_role_per_offer() {
    let mut a = Allocator::new();
    agents(&mut a, 4, cpus_mem(1_000, GIB));
    a.add_agent(
        "a99",
        sum(&[&reserved("web", 1_000, GIB), &cpus_mem(1_000, GIB)]),
        Resources::new(),
    );
    a.add_framework_roles("f", &["batch", "web"]);
    assert_eq!(a.framework_roles("f").unwrap(), ["batch", "web"]);
    let o = a.allocate(0);
    // One offer per agent and role; roles alternate by share; the reservation for
    // web comes in an offer of role web.
    let got: Vec<(&str, &str)> = o
        .iter()
        .map(|o| (o.agent_id.as_str(), o.role.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a00", "batch"),
            ("a01", "web"),
            ("a02", "batch"),
            ("a03", "web"),
            ("a99", "batch"),
            ("a99", "web"),
        ]
    );
    assert_eq!(o[5].resources, reserved("web", 1_000, GIB));
    // Resources given back without naming the role find theirs.
    for o in &o {
        a.recover(&o.framework_id, &o.agent_id, &o.resources, None);
    }
    // What remains counted is web's reservation: unallocated, it still counts
    // against web's quota.
    assert!(a.role_consumed("batch").is_empty());
    assert_eq!(a.role_consumed("web"), cpus_mem(1_000, GIB));
}

// ---- explanations -------------------------------------------------------------------

#[test]
fn explains_framework_states_filters_and_constraints() {
    let mut a = Allocator::new();
    let e = a.explain_request("f", "r", &cpus_mem(1_000, 0), 0);
    assert_eq!(
        e.causes,
        vec![
            WaitCause::NoAgents,
            WaitCause::UnknownFramework {
                framework_id: "f".into()
            }
        ]
    );
    agents(&mut a, 2, cpus_mem(2_000, 2 * GIB));
    a.add_framework("f", "r");
    let e = a.explain_request("f", "x", &cpus_mem(1_000, 0), 0);
    assert_eq!(
        e.causes,
        vec![WaitCause::RoleNotSubscribed {
            framework_id: "f".into(),
            role: "x".into()
        }]
    );
    assert!(!a
        .explain_request("f", "r", &cpus_mem(1_000, 0), 0)
        .is_waiting());

    // Filtered on every agent that could hold it.
    for o in a.allocate(0) {
        a.recover(
            &o.framework_id,
            &o.agent_id,
            &o.resources,
            Some(5_000 + o.agent_id.len() as u64),
        );
    }
    let e = a.explain_request("f", "r", &cpus_mem(1_000, 0), 100);
    assert_eq!(
        e.causes,
        vec![WaitCause::Filtered {
            framework_id: "f".into(),
            role: "r".into(),
            agents: 2,
            of_agents: 2,
            until_ms: 5_003
        }]
    );
    assert!(!a
        .explain_request("f", "r", &cpus_mem(1_000, 0), 6_000)
        .is_waiting());

    a.suppress_role("f", "r", true).unwrap();
    a.set_framework_active("f", false);
    let e = a.explain_role("r", 0);
    assert_eq!(
        e.causes,
        vec![
            WaitCause::FrameworkInactive {
                framework_id: "f".into()
            },
            WaitCause::Suppressed {
                framework_id: "f".into(),
                role: "r".into()
            },
            WaitCause::Filtered {
                framework_id: "f".into(),
                role: "r".into(),
                agents: 2,
                of_agents: 2,
                until_ms: 5_003
            },
        ]
    );
    a.set_framework_active("f", true);
    a.suppress("f", false);

    // Constraints: one no agent meets, then two that no agent meets together.
    a.set_agent_attributes("a00", "h0", [("zone".to_string(), "z0".to_string())].into())
        .unwrap();
    a.set_agent_attributes("a01", "h1", [("gpu".to_string(), "1".to_string())].into())
        .unwrap();
    let c = |s: &str| Constraint::parse(s).unwrap();
    a.set_constraints("f", "r", vec![c("zone=z0"), c("rack")])
        .unwrap();
    let e = a.explain_request("f", "r", &cpus_mem(1_000, 0), 0);
    assert_eq!(e.eligible_agents, 0);
    assert_eq!(
        e.causes,
        vec![WaitCause::ConstraintUnmatched {
            framework_id: "f".into(),
            role: "r".into(),
            constraint: c("rack")
        }]
    );
    a.set_constraints("f", "r", vec![c("zone=z0"), c("gpu")])
        .unwrap();
    let e = a.explain_role("r", 0);
    assert_eq!(
        e.causes,
        vec![WaitCause::ConstraintsExcludeAll {
            framework_id: "f".into(),
            role: "r".into(),
            constraints: vec![c("zone=z0"), c("gpu")]
        }]
    );
    assert_eq!(
        a.explain_role("nobody", 0).causes,
        vec![WaitCause::NoFrameworks {
            role: "nobody".into()
        }]
    );
}

#[test]
fn explains_sizes_limits_and_headroom_with_numbers() {
    let mut a = Allocator::new();
    a.add_agent("a1", cpus_mem(4_000, 8 * GIB), Resources::new());
    a.add_agent("a2", cpus_mem(2_000, 16 * GIB), Resources::new());
    a.add_framework("f", "eng/web");
    a.add_framework("g", "prod");
    a.suppress("g", true);

    // Larger than any agent; larger than what is free.
    a.track_used("f", "a1", &cpus_mem(3_000, GIB));
    let e = a.explain_request("f", "eng/web", &cpus_mem(5_000, 20 * GIB), 0);
    assert_eq!(
        e.causes,
        vec![
            WaitCause::TooLarge {
                resource: "cpus".into(),
                asked: 5_000,
                max_total: 4_000
            },
            WaitCause::TooLarge {
                resource: "mem".into(),
                asked: 20 * GIB,
                max_total: 16 * GIB
            },
        ]
    );
    let e = a.explain_request("f", "eng/web", &cpus_mem(3_000, GIB), 0);
    assert_eq!(
        e.causes,
        vec![WaitCause::NotFree {
            resource: "cpus".into(),
            asked: 3_000,
            max_free: 2_000
        }]
    );
    assert_eq!(e.resources[0].max_free, 2_000);
    assert_eq!(e.resources[0].consumed, 3_000);
    // a1 has 1 cpu and 7 GiB free, a2 2 cpus and 16 GiB: 1.5 cpus and 15 GiB fit.
    let e = a.explain_request("f", "eng/web", &cpus_mem(1_500, 15 * GIB), 0);
    assert!(!e.is_waiting(), "{:?}", e.causes);
    // With 10 GiB of a2 used, 1.5 cpus are free only on a2 and 7 GiB only on a1.
    a.track_used("g", "a2", &cpus_mem(0, 10 * GIB));
    let e = a.explain_request("f", "eng/web", &cpus_mem(1_500, 7 * GIB), 0);
    assert_eq!(
        e.causes,
        vec![WaitCause::NoSingleAgentFits {
            asked: cpus_mem(1_500, 7 * GIB)
        }]
    );
    a.recover("g", "a2", &cpus_mem(0, 10 * GIB), None);

    // A limit of an ancestor.
    a.set_quota("eng", Quota::new().limit("cpus", 4_000))
        .unwrap();
    let e = a.explain_request("f", "eng/web", &cpus_mem(1_500, GIB), 0);
    assert_eq!(
        e.causes,
        vec![WaitCause::QuotaLimit {
            role: "eng".into(),
            resource: "cpus".into(),
            limit: 4_000,
            consumed: 3_000,
            asked: 1_500
        }]
    );
    assert_eq!(e.resources[0].limit_room, Some(1_000));
    a.set_quota("eng", Quota::new().limit("cpus", 3_000))
        .unwrap();
    assert!(a
        .explain_role("eng/web", 0)
        .causes
        .contains(&WaitCause::QuotaLimit {
            role: "eng".into(),
            resource: "cpus".into(),
            limit: 3_000,
            consumed: 3_000,
            asked: 0
        }));
    a.set_quota("eng", Quota::new()).unwrap();

    // Headroom: prod's guarantee of 2.5 cpus keeps them from eng/web. 3 cpus are
    // unallocated (1 on a1, 2 on a2): eng/web may take 0.5.
    a.set_quota("prod", Quota::new().guarantee("cpus", 2_500))
        .unwrap();
    let e = a.explain_request("f", "eng/web", &cpus_mem(1_000, GIB), 0);
    let held = WaitCause::HeadroomHeld {
        resource: "cpus".into(),
        asked: 1_000,
        allowance: 500,
        unallocated: 3_000,
        held_back: 2_500,
        guarantees: vec![agora_allocator::UnmetGuarantee {
            role: "prod".into(),
            resource: "cpus".into(),
            guarantee: 2_500,
            consumed: 0,
        }],
    };
    assert_eq!(e.causes, vec![held.clone()]);
    assert_eq!(e.resources[0].headroom_allowance, Some(500));
    assert!(held.to_string().contains("prod (0 of 2.5)"), "{held}");
    // The role-level view says the same with nothing asked; prod itself is not held.
    let r = a.explain_role("eng/web", 0);
    assert!(r.causes.iter().any(|c| matches!(
        c,
        WaitCause::HeadroomHeld {
            allowance: 500,
            held_back: 2_500,
            ..
        }
    )));
    assert!(!a
        .explain_request("g", "prod", &cpus_mem(2_500, GIB), 0)
        .causes
        .iter()
        .any(|c| matches!(c, WaitCause::HeadroomHeld { .. })));
    // And the round agrees: eng/web is offered 0.5 cpu at most.
    let offered: i64 = a
        .allocate(0)
        .iter()
        .filter(|o| o.role == "eng/web")
        .map(|o| o.resources.milli_cpus())
        .sum();
    assert_eq!(offered, 500);
}
