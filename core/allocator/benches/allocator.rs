//! One allocation round at the sizes of Mesos's allocator benchmarks (agents ×
//! frameworks: 1,000 × 100, 5,000 × 500, 10,000 × 1,000), in the shape of Mesos's
//! `DeclineOffers`: every framework declines every offer with a long filter, and the
//! round after the declines is the one that matters (each framework has filtered the
//! agents it saw, and the allocator must find someone else for each of them).
//! Mesos reports about 1.06 s for that round at 10,000 × 1,000.
//!
//! Agents have cpus:16;mem:64GiB. Two layouts of frameworks:
//! - `own-role`: every framework in a role of its own (1,000 roles at the largest
//!   size: the role sorter does the work);
//! - `tree`: ten frameworks per role, the roles spread over ten parents
//!   (`team-3/svc-12`): both sorter levels and the role tree do the work.
//!
//! A third line per size adds quota and reservations: every hundredth framework's
//! role has a guarantee (so every round starts with the guarantees stage) and a
//! tenth of the agents have a static reservation for one role.
//!
//! Then two filter-heavy states, built directly (a decline with a long filter is
//! recorded for each (framework, agent) pair, which is what many rounds of declines
//! leave behind), own-role layout:
//! - `half-filtered`: every agent is filtered by the half of the frameworks that
//!   come first in fair order, the worst case for the walk (it steps over them);
//! - `all-filtered`: every framework filtered every agent, Mesos's worst case (a scan
//!   of agents × frameworks that finds nobody); here a round skips such agents at once.
//!
//! Times of the rounds after declines are their median. The baseline, measured in the
//! same run on the same sizes, is independent of the allocator: cloning every agent's
//! `Resources` once and touching every framework's id, the least any round making an
//! offer per agent must do. The ratio is what to compare across machines.
//!
//! Run: `cargo bench -p agora-master --bench allocator` (add `-- --quick` for the
//! smallest size only).

use std::hint::black_box;
use std::time::{Duration, Instant};

use agora_allocator::{Allocator, Quota};
use agora_proto::Resources;

const GIB: i64 = 1 << 30;
/// A long filter: refuse for a day.
const LONG_FILTER_MS: u64 = 86_400_000;
/// Rounds after the first one, each after every offer was declined.
const DECLINE_ROUNDS: usize = 7;

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    OwnRole,
    Tree,
    TreeWithQuota,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::OwnRole => "own-role",
            Layout::Tree => "tree",
            Layout::TreeWithQuota => "tree+quota",
        }
    }

    fn role(self, f: usize) -> String {
        match self {
            Layout::OwnRole => format!("role-{f:05}"),
            Layout::Tree | Layout::TreeWithQuota => {
                let svc = f / 10;
                format!("team-{}/svc-{svc:04}", svc % 10)
            }
        }
    }
}

fn setup(agents: usize, frameworks: usize, layout: Layout) -> (Allocator, Vec<String>) {
    let mut a = Allocator::new();
    let per_agent = Resources::cpus_mem(16_000, 64 * GIB);
    let mut ids = Vec::with_capacity(agents);
    for i in 0..agents {
        let id = format!("agent-{i:06}");
        let mut total = per_agent.clone();
        if layout == Layout::TreeWithQuota && i % 10 == 0 {
            // A static reservation of a quarter of the agent for one role.
            total = Resources::cpus_mem(12_000, 48 * GIB);
            let role = layout.role(i % frameworks);
            total.add_scalar("cpus", &role, 4_000);
            total.add_scalar("mem", &role, 16 * GIB);
        }
        a.add_agent(&id, total, Resources::new());
        ids.push(id);
    }
    for f in 0..frameworks {
        a.add_framework(&format!("framework-{f:05}"), &layout.role(f));
    }
    if layout == Layout::TreeWithQuota {
        // Every tenth role is guaranteed 4 agents' worth of cpus: the guarantees
        // stage has work in every round.
        for f in (0..frameworks).step_by(100) {
            a.set_quota(&layout.role(f), Quota::new().guarantee("cpus", 64_000))
                .expect("valid quota");
        }
    }
    (a, ids)
}

/// The trivial pass: clone every agent's resources once, touch every framework id.
fn baseline(agents: usize, frameworks: usize) -> Duration {
    let bags: Vec<Resources> = (0..agents)
        .map(|_| Resources::cpus_mem(16_000, 64 * GIB))
        .collect();
    let ids: Vec<String> = (0..frameworks)
        .map(|f| format!("framework-{f:05}"))
        .collect();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for r in &bags {
            black_box(r.clone());
        }
        for id in &ids {
            black_box(id.len());
        }
        best = best.min(t.elapsed());
    }
    best
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Line {
    first: Duration,
    first_offers: usize,
    after: Vec<(Duration, usize)>,
    base: Duration,
}

fn run(agents: usize, frameworks: usize, layout: Layout) -> Line {
    let (mut a, _) = setup(agents, frameworks, layout);
    let base = baseline(agents, frameworks);
    let mut now = 1_000;
    let timed = |a: &mut Allocator, now: u64| {
        let t = Instant::now();
        let offers = a.allocate(now);
        (t.elapsed(), offers)
    };
    let (first, offers) = timed(&mut a, now);
    let first_offers = offers.len();
    let mut pending = offers;
    let mut after = Vec::new();
    for _ in 0..DECLINE_ROUNDS {
        // Every framework declines every offer with a long filter.
        for o in &pending {
            a.recover_role(
                &o.framework_id,
                &o.role,
                &o.agent_id,
                &o.resources,
                Some(now + LONG_FILTER_MS),
            );
        }
        now += 1_000;
        let (d, offers) = timed(&mut a, now);
        after.push((d, offers.len()));
        pending = offers;
    }
    Line {
        first,
        first_offers,
        after,
        base,
    }
}

/// One round with every agent filtered by the first `filtered` frameworks (in fair
/// order: all shares are 0, so by name).
fn filtered_round(
    agents: usize,
    frameworks: usize,
    filtered: usize,
) -> (Duration, usize, Duration) {
    let (mut a, ids) = setup(agents, frameworks, Layout::OwnRole);
    let t = Instant::now();
    for id in &ids {
        for f in 0..filtered {
            let role = Layout::OwnRole.role(f);
            a.recover_role(
                &format!("framework-{f:05}"),
                &role,
                id,
                &Resources::new(),
                Some(LONG_FILTER_MS),
            );
        }
    }
    let build = t.elapsed();
    let t = Instant::now();
    let offers = a.allocate(1_000);
    (t.elapsed(), offers.len(), build)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[(usize, usize)] = if quick {
        &[(1_000, 100)]
    } else {
        &[(1_000, 100), (5_000, 500), (10_000, 1_000)]
    };
    println!("allocator round, DeclineOffers shape (agents cpus:16;mem:64GiB; every offer declined with a 1-day filter)");
    println!("round 1: nobody filtered yet; after: the {DECLINE_ROUNDS} rounds that follow each decline (median, max)");
    println!("baseline: clone every agent's Resources once and touch every framework id (same sizes, same run)\n");
    println!(
        "{:>7} x {:>5}  {:<11} {:>12} {:>8}  {:>13} {:>10} {:>8}  {:>10}  {:>9}",
        "agents",
        "fws",
        "layout",
        "round 1 ms",
        "offers",
        "after ms(med)",
        "max ms",
        "offers",
        "base ms",
        "med/base"
    );
    for &(agents, frameworks) in sizes {
        for layout in [Layout::OwnRole, Layout::Tree, Layout::TreeWithQuota] {
            let l = run(agents, frameworks, layout);
            let mut times: Vec<Duration> = l.after.iter().map(|(d, _)| *d).collect();
            times.sort();
            let median = times[times.len() / 2];
            let max = *times.last().expect("rounds");
            let offers = l.after.iter().map(|(_, n)| n).min().expect("rounds");
            println!(
                "{:>7} x {:>5}  {:<11} {:>12.2} {:>8}  {:>13.2} {:>10.2} {:>8}  {:>10.3}  {:>8.1}x",
                agents,
                frameworks,
                layout.name(),
                ms(l.first),
                l.first_offers,
                ms(median),
                ms(max),
                offers,
                ms(l.base),
                median.as_secs_f64() / l.base.as_secs_f64()
            );
        }
    }
    println!("\nfilter-heavy states (own-role layout; one round each)");
    println!(
        "{:>7} x {:>5}  {:<14} {:>10} {:>8}  {:>10}  {:>9}  {:>14}",
        "agents", "fws", "state", "round ms", "offers", "base ms", "ms/base", "(build s)"
    );
    for &(agents, frameworks) in sizes {
        let base = baseline(agents, frameworks);
        for (name, filtered) in [
            ("half-filtered", frameworks / 2),
            ("all-filtered", frameworks),
        ] {
            let (d, offers, build) = filtered_round(agents, frameworks, filtered);
            println!(
                "{:>7} x {:>5}  {:<14} {:>10.2} {:>8}  {:>10.3}  {:>8.1}x  {:>14.1}",
                agents,
                frameworks,
                name,
                ms(d),
                offers,
                ms(base),
                d.as_secs_f64() / base.as_secs_f64(),
                build.as_secs_f64()
            );
        }
    }
}
