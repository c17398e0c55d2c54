//! Properties of the resource algebra under extreme values (issue 13): whatever a
//! peer puts in a resource list, conversion refuses it or yields a bag whose sums
//! and differences behave, and nothing panics or wraps.

use std::collections::BTreeMap;

use agora_proto::resources::MAX_AMOUNT;
use agora_proto::v1::Resource;
use agora_proto::Resources;
use proptest::prelude::*;

/// Amounts that hug the edges: zero, one, the cap and around it, i64's ends.
fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(1),
        Just(-1),
        Just(MAX_AMOUNT),
        Just(MAX_AMOUNT + 1),
        Just(MAX_AMOUNT / 2 + 1),
        Just(i64::MAX),
        Just(i64::MIN),
        Just(i64::MAX - 1),
        0..=MAX_AMOUNT,
        any::<i64>(),
    ]
}

fn resource() -> impl Strategy<Value = Resource> {
    (
        prop_oneof![Just("cpus"), Just("mem"), Just("disk"), Just("")],
        prop_oneof![Just(""), Just("a"), Just("b")],
        amount(),
    )
        .prop_map(|(n, r, v)| Resource {
            name: n.into(),
            role: r.into(),
            value: v,
        })
}

/// A bag that conversion accepts (amounts within the cap, some at it).
fn bag() -> impl Strategy<Value = Resources> {
    let valid = (
        prop_oneof![Just("cpus"), Just("mem"), Just("disk")],
        prop_oneof![Just(""), Just("a"), Just("b")],
        prop_oneof![
            Just(1i64),
            Just(MAX_AMOUNT),
            Just(MAX_AMOUNT / 2),
            Just(MAX_AMOUNT / 3),
            0..=MAX_AMOUNT
        ],
    )
        .prop_map(|(n, r, v)| Resource {
            name: n.into(),
            role: r.into(),
            value: v,
        });
    prop::collection::vec(valid, 0..4)
        .prop_filter_map("over the cap", |l| Resources::from_proto(&l).ok())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn conversion_accepts_exactly_the_lists_within_the_cap(list in prop::collection::vec(resource(), 0..8)) {
        let mut sums: BTreeMap<(String, String), i128> = BTreeMap::new();
        let mut ok = true;
        for r in &list {
            if r.name.is_empty() || r.value < 0 {
                ok = false;
                break;
            }
            let s = sums.entry((r.name.clone(), r.role.clone())).or_insert(0);
            *s += i128::from(r.value);
            if *s > i128::from(MAX_AMOUNT) {
                ok = false;
                break;
            }
        }
        let got = Resources::from_proto(&list);
        prop_assert_eq!(got.is_ok(), ok, "{:?} -> {:?}", list, got);
        if let Ok(bag) = got {
            for r in bag.to_proto() {
                prop_assert!(r.value > 0 && r.value <= MAX_AMOUNT);
                let want = sums[&(r.name.clone(), r.role.clone())];
                prop_assert_eq!(i128::from(r.value), want);
            }
        }
    }

    #[test]
    fn sums_and_differences_are_exact_for_accepted_bags(a in bag(), b in bag()) {
        let mut sum = a.clone();
        sum.add(&b);
        prop_assert!(sum.contains(&a));
        prop_assert!(sum.contains(&b));
        prop_assert_eq!(sum.checked_sub(&b), Some(a.clone()));
        prop_assert_eq!(sum.checked_sub(&a), Some(b.clone()));
        // contains and checked_sub agree, and a difference is never negative.
        prop_assert_eq!(a.contains(&b), a.checked_sub(&b).is_some());
        if let Some(d) = a.checked_sub(&b) {
            prop_assert!(d.to_proto().iter().all(|r| r.value > 0));
        }
        // Dropping roles keeps each resource's total.
        for n in sum.names() {
            prop_assert_eq!(sum.unreserved().get(&n), sum.get(&n));
        }
    }

    #[test]
    fn many_sums_of_capped_bags_never_wrap(bags in prop::collection::vec(bag(), 0..64)) {
        let mut total = Resources::new();
        for b in &bags {
            total.add(b);
        }
        for r in total.to_proto() {
            prop_assert!(r.value > 0, "{:?}", r);
        }
    }

    #[test]
    fn the_flag_parser_never_panics(s in "\\PC{0,40}") {
        let _ = Resources::parse(&s);
    }

    #[test]
    fn the_flag_parser_refuses_or_caps(n in any::<u64>(), frac in 0u32..1000, unit in prop_oneof![Just(""), Just("MiB"), Just("GiB"), Just("TiB"), Just("B")]) {
        for spec in [format!("cpus:{n}.{frac:03}"), format!("mem:{n}{unit}"), format!("cpus(a):{n};cpus(a):{n}")] {
            if let Ok(r) = Resources::parse(&spec) {
                for x in r.to_proto() {
                    prop_assert!(x.value > 0 && x.value <= MAX_AMOUNT, "{} -> {:?}", spec, x);
                }
            }
        }
    }
}
