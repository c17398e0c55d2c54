//! The functions framework's decisions, without I/O: given the deployed functions,
//! their hosts and the load measured on them, and the time, how many hosts each
//! function should have, which to launch and which to kill.
//!
//! The framework's shell (`framework.rs`) feeds it events (deploys, host status
//! updates, load samples, requests waiting at the master) and carries out its
//! [`Plan`]: launches through offers, kills through KILL calls. Time is passed in.
//!
//! Scaling rule, per function:
//! - `target` is sticky: it only moves on a reason, and hosts that end while the
//!   target still wants them are replaced (with a backoff after failures);
//! - a request waiting at the master with no host raises it to at least 1 (cold start);
//! - busy (requests queued on a host, or in flight at 80% of the hosts' concurrency)
//!   adds one host, once the hosts already starting are up;
//! - idle (no new request for the idle timeout) brings it down to `min_instances`
//!   (zero: scale to zero);
//! - it stays within `min_instances ..= cap`, cap being `max_instances`, or one host per
//!   agent when that is 0.
//!
//! A deploy that changes what hosts run (module, limits, resources) starts a new
//! generation: hosts of the old one keep serving until one of the new one runs, then
//! they are killed.

use std::collections::BTreeMap;

use agora_proto::v1::{FunctionDeploy, TaskState};

/// Tuning of the planner.
#[derive(Debug, Clone)]
pub struct PlannerConfig {
    /// No new request for this long: scale down to `min_instances`.
    pub idle_timeout_ms: u64,
    /// First delay before replacing a host that failed; doubles per failure in a row.
    pub backoff_base_ms: u64,
    /// Longest such delay.
    pub backoff_max_ms: u64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            idle_timeout_ms: 60_000,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
        }
    }
}

/// What one host (a task of the functions framework) is doing, as far as we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Accepted into an offer; no update yet.
    Launching,
    /// STAGING or STARTING.
    Starting,
    /// RUNNING: serving requests.
    Running,
    /// A kill was sent; its terminal update has not come yet.
    Killing,
}

/// One function host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub function: String,
    pub agent_id: String,
    pub state: HostState,
    /// The function's generation it was launched for.
    pub generation: u64,
    /// When it was launched (ms), to prefer killing the newest.
    pub since_ms: u64,
}

/// Load of one function summed over its hosts' agents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Requests received so far (a counter; falls when a host goes away).
    pub requests: u64,
    pub in_flight: u64,
    pub queued: u64,
}

/// A function as the planner keeps it.
#[derive(Debug, Clone)]
pub struct FunctionPlan {
    pub spec: FunctionDeploy,
    /// Hosts wanted now.
    pub target: u32,
    pub generation: u64,
    pub load: Load,
    /// Requests held at the master waiting for a host.
    pub waiting: u32,
    last_activity_ms: u64,
    /// Host failures in a row (reset by a host reaching RUNNING).
    pub failures: u32,
    /// No launch before this time (backoff after failures).
    not_before_ms: u64,
    /// Why the last host that failed ended.
    pub last_failure: Option<String>,
}

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Function name -> hosts to launch (through the next fitting offers).
    pub launch: BTreeMap<String, u32>,
    /// Task ids to kill.
    pub kill: Vec<String>,
}

/// The planner. Iteration order is by name and task id, so plans are deterministic.
#[derive(Debug, Default)]
pub struct Planner {
    cfg: PlannerConfig,
    functions: BTreeMap<String, FunctionPlan>,
    hosts: BTreeMap<String, Host>,
    /// Agents that can host functions (the cap when `max_instances` is 0).
    agents: u32,
}

/// Whether two deploys of one function need different hosts.
fn same_hosts(a: &FunctionDeploy, b: &FunctionDeploy) -> bool {
    a.module == b.module
        && a.function == b.function
        && a.resources == b.resources
        && a.role == b.role
}

impl Planner {
    pub fn new(cfg: PlannerConfig) -> Planner {
        Planner {
            cfg,
            functions: BTreeMap::new(),
            hosts: BTreeMap::new(),
            agents: 1,
        }
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.cfg
    }

    pub fn functions(&self) -> &BTreeMap<String, FunctionPlan> {
        &self.functions
    }

    pub fn function(&self, name: &str) -> Option<&FunctionPlan> {
        self.functions.get(name)
    }

    pub fn hosts(&self) -> &BTreeMap<String, Host> {
        &self.hosts
    }

    /// Hosts of `name` (task id, host), any state.
    pub fn hosts_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a String, &'a Host)> {
        self.hosts.iter().filter(move |(_, h)| h.function == name)
    }

    /// Number of agents able to host functions (at least 1 is assumed).
    pub fn set_agents(&mut self, n: u32) {
        self.agents = n.max(1);
    }

    /// Adds or replaces a function. Replacing it with other module, limits or
    /// resources starts a new generation of hosts.
    pub fn deploy(&mut self, spec: FunctionDeploy, now: u64) {
        match self.functions.get_mut(&spec.name) {
            Some(f) => {
                if !same_hosts(&f.spec, &spec) {
                    f.generation += 1;
                    f.failures = 0;
                    f.not_before_ms = 0;
                    f.last_failure = None;
                }
                f.spec = spec;
                f.last_activity_ms = now;
            }
            None => {
                let name = spec.name.clone();
                let target = spec.min_instances;
                self.functions.insert(
                    name,
                    FunctionPlan {
                        spec,
                        target,
                        generation: 0,
                        load: Load::default(),
                        waiting: 0,
                        last_activity_ms: now,
                        failures: 0,
                        not_before_ms: 0,
                        last_failure: None,
                    },
                );
            }
        }
    }

    /// Forgets a function; returns the hosts to kill.
    pub fn remove(&mut self, name: &str) -> Vec<String> {
        self.functions.remove(name);
        let ids: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.function == name && h.state != HostState::Killing)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            if let Some(h) = self.hosts.get_mut(id) {
                h.state = HostState::Killing;
            }
        }
        ids
    }

    /// Forgets every host (the framework was registered anew: the master has
    /// killed the old one's tasks).
    pub fn clear_hosts(&mut self) {
        self.hosts.clear();
    }

    /// The roles of the deployed functions, sorted.
    pub fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self
            .functions
            .values()
            .map(|f| f.spec.role.clone())
            .collect();
        roles.sort();
        roles.dedup();
        roles
    }

    /// A host was put into an ACCEPT.
    pub fn launched(&mut self, task_id: &str, function: &str, agent_id: &str, now: u64) {
        let generation = self.functions.get(function).map_or(0, |f| f.generation);
        self.hosts.insert(
            task_id.to_string(),
            Host {
                function: function.to_string(),
                agent_id: agent_id.to_string(),
                state: HostState::Launching,
                generation,
                since_ms: now,
            },
        );
    }

    /// A status update of a host. A task the planner does not know (a master or
    /// framework restart) is adopted when its function is deployed (`function` parsed
    /// from its id by the caller) and killed otherwise: returns true when it must be
    /// killed.
    pub fn update(
        &mut self,
        task_id: &str,
        function: Option<&str>,
        agent_id: &str,
        state: TaskState,
        message: &str,
        now: u64,
    ) -> bool {
        let terminal = is_terminal(state);
        if !self.hosts.contains_key(task_id) {
            if terminal {
                return false;
            }
            match function.and_then(|n| self.functions.get(n)) {
                Some(f) => {
                    let (name, generation) = (f.spec.name.clone(), f.generation);
                    self.hosts.insert(
                        task_id.to_string(),
                        Host {
                            function: name,
                            agent_id: agent_id.to_string(),
                            state: HostState::Starting,
                            generation,
                            since_ms: now,
                        },
                    );
                }
                None => return true,
            }
        }
        if terminal {
            let Some(host) = self.hosts.remove(task_id) else {
                return false;
            };
            let expected = host.state == HostState::Killing || state == TaskState::TaskFinished;
            if let Some(f) = self.functions.get_mut(&host.function) {
                if !expected && host.generation == f.generation {
                    f.failures = f.failures.saturating_add(1);
                    let shift = f.failures.saturating_sub(1).min(16);
                    let delay = self
                        .cfg
                        .backoff_base_ms
                        .saturating_mul(1 << shift)
                        .min(self.cfg.backoff_max_ms);
                    f.not_before_ms = now + delay;
                    f.last_failure = Some(format!(
                        "host {task_id} ended {}: {message}",
                        state.as_str_name()
                    ));
                }
            }
            return false;
        }
        let Some(host) = self.hosts.get_mut(task_id) else {
            return false;
        };
        if !agent_id.is_empty() {
            host.agent_id = agent_id.to_string();
        }
        match state {
            TaskState::TaskRunning => {
                if host.state != HostState::Killing {
                    host.state = HostState::Running;
                }
                let generation = host.generation;
                if let Some(f) = self.functions.get_mut(&host.function) {
                    if generation == f.generation {
                        f.failures = 0;
                        f.not_before_ms = 0;
                        f.last_failure = None;
                    }
                }
            }
            TaskState::TaskKilling => host.state = HostState::Killing,
            _ => {
                if host.state == HostState::Launching {
                    host.state = HostState::Starting;
                }
            }
        }
        false
    }

    /// The latest load of a function, summed over its hosts.
    pub fn observe_load(&mut self, name: &str, load: Load, now: u64) {
        if let Some(f) = self.functions.get_mut(name) {
            if load.requests > f.load.requests || load.in_flight > 0 || load.queued > 0 {
                f.last_activity_ms = now;
            }
            f.load = load;
        }
    }

    /// Requests held at the master for this function, waiting for a host.
    pub fn set_waiting(&mut self, name: &str, waiting: u32, now: u64) {
        if let Some(f) = self.functions.get_mut(name) {
            if waiting > 0 {
                f.last_activity_ms = now;
            }
            f.waiting = waiting;
        }
    }

    /// Decides what to launch and kill now, and records the kills.
    pub fn decide(&mut self, now: u64) -> Plan {
        let mut plan = Plan::default();
        let names: Vec<String> = self.functions.keys().cloned().collect();
        for name in names {
            self.decide_one(&name, now, &mut plan);
        }
        for id in &plan.kill {
            if let Some(h) = self.hosts.get_mut(id) {
                h.state = HostState::Killing;
            }
        }
        plan
    }

    fn decide_one(&mut self, name: &str, now: u64, plan: &mut Plan) {
        let Some(f) = self.functions.get(name) else {
            return;
        };
        let generation = f.generation;
        // Current-generation hosts not being killed, newest last.
        let mut live: Vec<(&String, &Host)> = self
            .hosts
            .iter()
            .filter(|(_, h)| {
                h.function == name && h.generation == generation && h.state != HostState::Killing
            })
            .collect();
        live.sort_by_key(|(id, h)| {
            (
                h.state == HostState::Running,
                std::cmp::Reverse(h.since_ms),
                (*id).clone(),
            )
        });
        let running = live
            .iter()
            .filter(|(_, h)| h.state == HostState::Running)
            .count() as u32;
        let live_n = live.len() as u32;
        let starting = live_n - running;

        let min = f.spec.min_instances;
        let cap = if f.spec.max_instances > 0 {
            f.spec.max_instances
        } else {
            self.agents
        }
        .max(min);
        let per_host = u64::from(
            f.spec
                .function
                .as_ref()
                .map_or(0, |i| i.max_concurrency)
                .max(1),
        );
        let busy = f.load.queued > 0
            || (running > 0 && f.load.in_flight * 10 >= 8 * per_host * u64::from(running));
        let quiet = f.waiting == 0 && f.load.in_flight == 0 && f.load.queued == 0;
        let idle = quiet && now.saturating_sub(f.last_activity_ms) >= self.cfg.idle_timeout_ms;

        let mut target = f.target;
        if f.waiting > 0 && target == 0 {
            target = 1;
        }
        if busy && starting == 0 && target <= live_n {
            target = live_n + 1;
        }
        if idle {
            target = min;
        }
        let target = target.clamp(min, cap);

        if live_n < target && now >= f.not_before_ms {
            plan.launch.insert(name.to_string(), target - live_n);
        }
        if live_n > target {
            // Not yet running first, then the newest.
            let excess = (live_n - target) as usize;
            plan.kill
                .extend(live.iter().take(excess).map(|(id, _)| (*id).clone()));
        }
        // An older generation goes once the new one serves (or nothing is wanted).
        if running > 0 || target == 0 {
            plan.kill.extend(
                self.hosts
                    .iter()
                    .filter(|(_, h)| {
                        h.function == name
                            && h.generation != generation
                            && h.state != HostState::Killing
                    })
                    .map(|(id, _)| id.clone()),
            );
        }
        if let Some(f) = self.functions.get_mut(name) {
            f.target = target;
        }
    }
}

fn is_terminal(s: TaskState) -> bool {
    matches!(
        s,
        TaskState::TaskFinished
            | TaskState::TaskFailed
            | TaskState::TaskKilled
            | TaskState::TaskError
            | TaskState::TaskLost
            | TaskState::TaskDropped
            | TaskState::TaskGone
            | TaskState::TaskUnknown
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_proto::v1::{FunctionInfo, WasmModule};

    const IDLE: u64 = 2_000;

    fn planner() -> Planner {
        Planner::new(PlannerConfig {
            idle_timeout_ms: IDLE,
            backoff_base_ms: 500,
            backoff_max_ms: 4_000,
        })
    }

    fn spec(name: &str, min: u32, max: u32) -> FunctionDeploy {
        FunctionDeploy {
            name: name.into(),
            module: Some(WasmModule {
                sha256: "ab".repeat(32),
                size: 10,
                ..Default::default()
            }),
            role: "*".into(),
            function: Some(FunctionInfo {
                name: name.into(),
                max_concurrency: 10,
                ..Default::default()
            }),
            min_instances: min,
            max_instances: max,
            resources: vec![],
        }
    }

    fn launches(p: &Plan, name: &str) -> u32 {
        p.launch.get(name).copied().unwrap_or(0)
    }

    /// Launches what the plan asks (as offers would) and brings the hosts to RUNNING.
    fn place_and_run(pl: &mut Planner, plan: &Plan, now: u64, next_id: &mut u32) -> Vec<String> {
        let mut ids = Vec::new();
        for (name, n) in &plan.launch {
            for _ in 0..*n {
                *next_id += 1;
                let id = format!("fn.{name}.{next_id}");
                pl.launched(&id, name, "a1", now);
                pl.update(&id, None, "a1", TaskState::TaskRunning, "", now);
                ids.push(id);
            }
        }
        ids
    }

    #[test]
    fn min_instances_are_launched_at_deploy_and_kept() {
        let mut pl = planner();
        pl.deploy(spec("f", 2, 0), 0);
        pl.set_agents(3);
        let plan = pl.decide(0);
        assert_eq!(launches(&plan, "f"), 2);
        // Launched but not yet running: nothing more is asked.
        pl.launched("t1", "f", "a1", 0);
        pl.launched("t2", "f", "a2", 0);
        assert_eq!(pl.decide(10), Plan::default());
        // Long idle never goes below min.
        assert_eq!(pl.decide(10 * IDLE), Plan::default());
    }

    #[test]
    fn a_waiting_request_cold_starts_one_host_and_busy_adds_one_more() {
        let mut pl = planner();
        pl.set_agents(4);
        pl.deploy(spec("f", 0, 0), 0);
        assert_eq!(
            pl.decide(0),
            Plan::default(),
            "scale to zero: nothing at deploy"
        );
        pl.set_waiting("f", 3, 100);
        let plan = pl.decide(100);
        assert_eq!(launches(&plan, "f"), 1, "a cold start launches one host");
        let mut next = 0;
        place_and_run(&mut pl, &plan, 100, &mut next);
        pl.set_waiting("f", 0, 200);
        assert_eq!(pl.decide(200), Plan::default());
        // 8 in flight of 10 per host: busy -> one more host.
        pl.observe_load(
            "f",
            Load {
                requests: 20,
                in_flight: 8,
                queued: 0,
            },
            1_000,
        );
        let plan = pl.decide(1_000);
        assert_eq!(launches(&plan, "f"), 1);
        pl.launched("t-new", "f", "a2", 1_000);
        // Still busy, but a host is starting: wait for it.
        pl.observe_load(
            "f",
            Load {
                requests: 40,
                in_flight: 9,
                queued: 2,
            },
            1_500,
        );
        assert_eq!(pl.decide(1_500), Plan::default());
        pl.update("t-new", None, "a2", TaskState::TaskRunning, "", 1_600);
        // Two running, 9 of 20 in flight but queued > 0: still busy -> a third.
        assert_eq!(launches(&pl.decide(1_700), "f"), 1);
    }

    #[test]
    fn idle_scales_down_to_min_then_to_zero() {
        let mut pl = planner();
        pl.set_agents(4);
        pl.deploy(spec("keep", 1, 0), 0);
        pl.deploy(spec("zero", 0, 0), 0);
        let mut next = 0;
        let plan = pl.decide(0);
        place_and_run(&mut pl, &plan, 0, &mut next);
        pl.set_waiting("zero", 1, 0);
        let plan = pl.decide(0);
        place_and_run(&mut pl, &plan, 0, &mut next);
        pl.set_waiting("zero", 0, 0);
        // Both busy for a while: each gets a second host.
        for f in ["keep", "zero"] {
            pl.observe_load(
                f,
                Load {
                    requests: 5,
                    in_flight: 0,
                    queued: 3,
                },
                500,
            );
        }
        let plan = pl.decide(500);
        assert_eq!((launches(&plan, "keep"), launches(&plan, "zero")), (1, 1));
        place_and_run(&mut pl, &plan, 500, &mut next);
        for f in ["keep", "zero"] {
            pl.observe_load(
                f,
                Load {
                    requests: 9,
                    in_flight: 0,
                    queued: 0,
                },
                600,
            );
        }
        assert_eq!(
            pl.decide(600 + IDLE - 1),
            Plan::default(),
            "not idle long enough"
        );
        let plan = pl.decide(600 + IDLE);
        assert!(plan.launch.is_empty());
        // keep: 2 -> 1 (its newest goes), zero: 2 -> 0.
        let kept: Vec<_> = pl.hosts_of("keep").map(|(id, _)| id.clone()).collect();
        assert_eq!(plan.kill.len(), 3, "{plan:?}");
        assert!(plan.kill.contains(&kept[1]) && !plan.kill.contains(&kept[0]));
        assert_eq!(pl.function("zero").unwrap().target, 0);
        assert_eq!(pl.function("keep").unwrap().target, 1);
        // The kills are recorded: nothing is asked twice.
        assert_eq!(pl.decide(600 + IDLE + 1), Plan::default());
        for id in plan.kill {
            pl.update(&id, None, "", TaskState::TaskKilled, "killed", 700 + IDLE);
        }
        assert_eq!(pl.hosts_of("zero").count(), 0);
        assert_eq!(
            pl.function("zero").unwrap().failures,
            0,
            "a kill is no failure"
        );
        // A new request after scale to zero cold-starts again.
        pl.set_waiting("zero", 1, 10 * IDLE);
        assert_eq!(launches(&pl.decide(10 * IDLE), "zero"), 1);
    }

    #[test]
    fn a_lost_host_is_replaced_after_a_backoff() {
        let mut pl = planner();
        pl.deploy(spec("f", 1, 0), 0);
        let mut next = 0;
        let plan = pl.decide(0);
        let ids = place_and_run(&mut pl, &plan, 0, &mut next);
        pl.update(
            &ids[0],
            None,
            "a1",
            TaskState::TaskLost,
            "agent gone",
            1_000,
        );
        let f = pl.function("f").unwrap();
        assert_eq!(f.failures, 1);
        assert!(f
            .last_failure
            .as_deref()
            .unwrap()
            .contains("TASK_LOST: agent gone"));
        assert_eq!(pl.decide(1_000), Plan::default(), "backoff first");
        assert_eq!(launches(&pl.decide(1_500), "f"), 1, "then a replacement");
        // A second failure in a row doubles the backoff.
        pl.launched("t2", "f", "a1", 1_500);
        pl.update("t2", None, "a1", TaskState::TaskFailed, "trap", 1_600);
        assert_eq!(pl.decide(2_500), Plan::default());
        assert_eq!(launches(&pl.decide(2_600), "f"), 1);
        // RUNNING resets the count.
        pl.launched("t3", "f", "a1", 2_600);
        pl.update("t3", None, "a1", TaskState::TaskRunning, "", 2_700);
        assert_eq!(pl.function("f").unwrap().failures, 0);
    }

    #[test]
    fn max_instances_caps_and_zero_means_one_per_agent() {
        let mut pl = planner();
        pl.set_agents(2);
        pl.deploy(spec("capped", 0, 3), 0);
        pl.deploy(spec("per-agent", 0, 0), 0);
        let mut next = 0;
        for step in 0..6u64 {
            let now = step * 100;
            for f in ["capped", "per-agent"] {
                pl.observe_load(
                    f,
                    Load {
                        requests: step,
                        in_flight: 0,
                        queued: 5,
                    },
                    now,
                );
            }
            let plan = pl.decide(now);
            place_and_run(&mut pl, &plan, now, &mut next);
        }
        assert_eq!(pl.hosts_of("capped").count(), 3);
        assert_eq!(pl.hosts_of("per-agent").count(), 2);
        // An agent more raises the per-agent cap.
        pl.set_agents(3);
        assert_eq!(launches(&pl.decide(700), "per-agent"), 1);
    }

    #[test]
    fn redeploy_with_a_new_module_rolls_hosts_over_and_remove_kills_all() {
        let mut pl = planner();
        pl.deploy(spec("f", 1, 0), 0);
        let mut next = 0;
        let plan = pl.decide(0);
        let old = place_and_run(&mut pl, &plan, 0, &mut next);
        // Only min/max changed: same hosts.
        let mut s = spec("f", 1, 5);
        pl.deploy(s.clone(), 10);
        assert_eq!(pl.decide(10), Plan::default());
        // A new module: a new host first; the old one serves until it runs.
        s.module.as_mut().unwrap().sha256 = "cd".repeat(32);
        pl.deploy(s, 20);
        let plan = pl.decide(20);
        assert_eq!(launches(&plan, "f"), 1);
        assert!(plan.kill.is_empty());
        pl.launched("new", "f", "a1", 20);
        assert_eq!(pl.decide(30), Plan::default());
        pl.update("new", None, "a1", TaskState::TaskRunning, "", 40);
        assert_eq!(pl.decide(40).kill, old);
        // A killed old-generation host does not count as a failure.
        pl.update(&old[0], None, "a1", TaskState::TaskKilled, "", 50);
        assert_eq!(pl.function("f").unwrap().failures, 0);
        assert_eq!(pl.remove("f"), vec!["new".to_string()]);
        assert!(pl.function("f").is_none());
        assert_eq!(pl.decide(60), Plan::default());
    }

    #[test]
    fn unknown_tasks_are_adopted_or_killed() {
        let mut pl = planner();
        pl.deploy(spec("f", 1, 0), 0);
        assert!(!pl.update("fn.f.9", Some("f"), "a1", TaskState::TaskRunning, "", 5));
        assert_eq!(pl.hosts()["fn.f.9"].state, HostState::Running);
        assert_eq!(pl.decide(5), Plan::default(), "the adopted host counts");
        assert!(pl.update(
            "fn.gone.1",
            Some("gone"),
            "a1",
            TaskState::TaskRunning,
            "",
            5
        ));
        assert!(!pl.update(
            "fn.gone.2",
            Some("gone"),
            "a1",
            TaskState::TaskFinished,
            "",
            5
        ));
    }
}
