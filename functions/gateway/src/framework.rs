//! The functions framework's shell: an `agora-sdk` scheduler that carries out the
//! planner's decisions. It subscribes in the roles of the deployed functions, places
//! hosts on offers of agents that serve HTTP, kills hosts the planner no longer
//! wants, acknowledges every update, suppresses offers while it needs none and
//! revives them when a host is wanted.
//!
//! Host task ids are `fn.<name>.<suffix>` (a name never contains `:` or `/`, and the
//! suffix has no `.`), so that after a restart the tasks the master reports can be
//! told apart by function; each host runs in an executor of its own, `fn-<task id>`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use agora_proto::v1::{FunctionDeploy, TaskState};
use agora_proto::Resources;
use agora_sdk::{Client, ClientConfig, Event, FrameworkInfo, Offer, Scheduler, TaskInfo};

use super::load::{refresh_agents, run_poller};
use super::planner::HostState;
use super::Functions;

/// The framework's name, as `agora ps` shows it.
pub const FRAMEWORK_NAME: &str = "agora-functions";
/// Hosts keep running this long while the framework is away (a master restart).
const FAILOVER_SECS: f64 = 300.0;
/// Decisions are taken on every event, and at least this often (idle timeouts,
/// backoffs).
const DECIDE_EVERY: Duration = Duration::from_millis(250);
/// Implicit reconciliation this often: after a master restart, tasks of agents that
/// re-register later are learnt this way.
const RECONCILE_EVERY: Duration = Duration::from_secs(15);
/// Offers declined are not offered again for this long (unless we revive).
const REFUSE_SECONDS: f64 = 5.0;

/// The function a host task belongs to, from its id.
pub fn function_of_task(task_id: &str) -> Option<&str> {
    task_id
        .strip_prefix("fn.")?
        .rsplit_once('.')
        .map(|(name, _)| name)
        .filter(|n| !n.is_empty())
}

fn framework_info(roles: Vec<String>, framework_id: String) -> FrameworkInfo {
    FrameworkInfo {
        name: FRAMEWORK_NAME.into(),
        roles: if roles.is_empty() {
            vec!["*".into()]
        } else {
            roles
        },
        framework_id,
        failover_timeout_seconds: FAILOVER_SECS,
        ..Default::default()
    }
}

/// Connects, subscribes and serves until the master stops (the task is aborted).
pub(crate) async fn run(functions: Arc<Functions>, cfg: ClientConfig) {
    let mut backoff = Duration::from_millis(100);
    let client = loop {
        match Client::connect(&cfg).await {
            Ok(c) => break Arc::new(c),
            Err(e) if functions.leader_http().is_some() => {
                // Its master follows another that leads: expected, and said by
                // `agora masters`; the framework subscribes when its master leads.
                tracing::debug!(
                    "functions framework: the master at {} follows: {e:#}; retrying",
                    cfg.master
                );
                tokio::time::sleep(backoff).await; // reconnect backoff
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(
                    "functions framework: cannot connect to the master at {}: {e:#}; retrying",
                    cfg.master
                );
                tokio::time::sleep(backoff).await; // reconnect backoff
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    let poller = tokio::spawn(run_poller(functions.clone(), client.clone()));
    let _poller = AbortOnDrop(poller);
    refresh_agents(&functions, &client).await;
    loop {
        let sched = subscribe(&functions, &client).await;
        let mut fw = Framework {
            functions: functions.clone(),
            client: client.clone(),
            sched,
            seq: 0,
            suppressed: false,
            roles: Vec::new(),
            wanting: BTreeSet::new(),
        };
        fw.serve().await;
        tracing::warn!("functions framework: the scheduler session ended; subscribing again");
        tokio::time::sleep(Duration::from_secs(1)).await; // resubscribe backoff
    }
}

/// SUBSCRIBE with the gateway's fixed framework id
/// ([`agora_fn_api::gateway_state::FRAMEWORK_ID`]): after a master restart that is
/// the framework of the previous run, whose hosts and state (its deployments) come
/// back; the master accepts an id it does not know (a first start). Only if the
/// master refuses that id (the framework was torn down, and its state with it) does
/// the gateway register anew, under an id the master picks, for as long as this
/// process runs. Retried until it works.
async fn subscribe(functions: &Functions, client: &Client) -> Scheduler {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (roles, known) = {
            let s = functions.lock();
            let known = s
                .framework_id
                .clone()
                .unwrap_or_else(|| agora_fn_api::gateway_state::FRAMEWORK_ID.to_string());
            (s.planner.roles(), known)
        };
        let attempt = match client
            .subscribe(framework_info(roles.clone(), known.clone()))
            .await
        {
            Ok(s) => Ok(s),
            Err(e) if e.to_string().contains("was removed") => {
                tracing::warn!("functions framework: re-subscribing as {known} failed ({e:#}); registering anew");
                client.subscribe(framework_info(roles, String::new())).await
            }
            Err(e) => Err(e),
        };
        match attempt {
            Ok(sched) => {
                let id = sched.framework_id().to_string();
                functions.recover(sched.stored_state());
                functions.set_store(std::sync::Arc::new(sched.state_writer()));
                {
                    let mut s = functions.lock();
                    if s.framework_id.as_deref().is_some_and(|k| k != id) {
                        // A new framework: the old one's tasks are not ours to track.
                        s.planner.clear_hosts();
                    }
                    s.framework_id = Some(id.clone());
                }
                tracing::info!(framework = %id, "functions framework subscribed");
                if let Err(e) = sched.reconcile(vec![]).await {
                    tracing::warn!("functions framework: reconcile: {e:#}");
                }
                return sched;
            }
            Err(e) => {
                tracing::warn!("functions framework: SUBSCRIBE failed: {e:#}; retrying");
                tokio::time::sleep(backoff).await; // resubscribe backoff
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

struct Framework {
    functions: Arc<Functions>,
    client: Arc<Client>,
    sched: Scheduler,
    seq: u64,
    suppressed: bool,
    /// Roles subscribed in (as last sent).
    roles: Vec<String>,
    /// Roles with hosts wanted at the last decision (a new one triggers REVIVE).
    wanting: BTreeSet<String>,
}

impl Framework {
    async fn serve(&mut self) {
        self.roles = self.functions.lock().planner.roles();
        let mut decide = tokio::time::interval(DECIDE_EVERY);
        decide.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
        reconcile.tick().await; // the first tick is immediate: subscribe reconciled
        loop {
            tokio::select! {
                ev = self.sched.next_event() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => return,
                },
                _ = self.functions.woken() => {}
                _ = decide.tick() => {}
                _ = reconcile.tick() => {
                    if let Err(e) = self.sched.reconcile(vec![]).await {
                        tracing::debug!("functions framework: reconcile: {e:#}");
                    }
                }
            }
            self.act().await;
        }
    }

    /// Decides, kills what is not wanted, keeps the roles and offer flow in line.
    /// Returns the functions to launch hosts for (name -> count).
    async fn act(&mut self) -> std::collections::BTreeMap<String, u32> {
        let (plan, queued, roles, wanting) = {
            let mut s = self.functions.lock();
            let plan = s.planner.decide(crate::now_ms());
            let queued = std::mem::take(&mut s.kill_queue);
            let roles = s.planner.roles();
            let wanting: BTreeSet<String> = plan
                .launch
                .keys()
                .filter_map(|n| s.planner.function(n).map(|f| f.spec.role.clone()))
                .collect();
            (plan, queued, roles, wanting)
        };
        let mut killed = false;
        for id in plan.kill.iter().chain(&queued) {
            tracing::info!(task = %id, function = function_of_task(id).unwrap_or(""), "stopping function host");
            if let Err(e) = self.sched.kill(id).await {
                tracing::warn!(task = %id, "functions framework: kill: {e:#}");
            }
            killed = true;
        }
        if killed {
            self.functions.hosts_changed();
        }
        if roles != self.roles && !roles.is_empty() {
            let id = self.sched.framework_id().to_string();
            if let Err(e) = self
                .sched
                .update_framework(framework_info(roles.clone(), id))
                .await
            {
                tracing::warn!("functions framework: UPDATE_FRAMEWORK: {e:#}");
            }
            self.roles = roles;
            self.wanting.clear(); // new roles: revive below if anything is wanted
        }
        if wanting.is_empty() {
            if !self.suppressed {
                let _ = self.sched.suppress().await;
                self.suppressed = true;
            }
        } else if self.suppressed || !wanting.is_subset(&self.wanting) {
            let _ = self.sched.revive().await;
            self.suppressed = false;
        }
        self.wanting = wanting;
        plan.launch
    }

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Offers(offers) => self.on_offers(offers).await,
            Event::Update(status) => {
                if let Err(e) = self.sched.acknowledge(&status).await {
                    tracing::warn!("functions framework: acknowledge: {e:#}");
                }
                let state = status.state();
                let now = crate::now_ms();
                let (kill, unknown_agent) = {
                    let mut s = self.functions.lock();
                    let kill = s.planner.update(
                        &status.task_id,
                        function_of_task(&status.task_id),
                        &status.agent_id,
                        state,
                        &status.message,
                        now,
                    );
                    let unknown = state == TaskState::TaskRunning
                        && !s.agent_http.contains_key(&status.agent_id);
                    (kill, unknown)
                };
                match state {
                    TaskState::TaskRunning => {
                        tracing::info!(task = %status.task_id, agent = %status.agent_id, "function host running")
                    }
                    s if s.is_terminal() => {
                        tracing::info!(task = %status.task_id, state = s.as_str_name(), "function host ended: {}", status.message)
                    }
                    _ => {}
                }
                if unknown_agent {
                    refresh_agents(&self.functions, &self.client).await;
                }
                if kill {
                    tracing::info!(task = %status.task_id, "killing a host of a function that is no longer deployed");
                    let _ = self.sched.kill(&status.task_id).await;
                }
                self.functions.hosts_changed();
            }
            Event::Error(e) => {
                tracing::warn!("functions framework: the master refused a call: {e}")
            }
            Event::Disconnected(why) => {
                tracing::warn!("functions framework: lost the master ({why}); reconnecting")
            }
            Event::Reconnected => {
                // The session re-subscribed with the roles it started with.
                let id = self.sched.framework_id().to_string();
                let _ = self
                    .sched
                    .update_framework(framework_info(self.roles.clone(), id))
                    .await;
                self.suppressed = true; // make the next decision revive if needed
                self.wanting.clear();
            }
            Event::Failure {
                agent_id,
                executor_id,
                message,
                ..
            } => {
                tracing::debug!(agent = %agent_id, executor = ?executor_id, "functions framework: failure: {message}")
            }
            Event::Rescind(_) | Event::Message { .. } | Event::Heartbeat => {}
        }
    }

    async fn on_offers(&mut self, mut offers: Vec<Offer>) {
        let unknown = {
            let s = self.functions.lock();
            offers
                .iter()
                .any(|o| !s.agent_http.contains_key(&o.agent_id))
        };
        if unknown {
            refresh_agents(&self.functions, &self.client).await;
        }
        let mut wants = self.act().await;
        // Spread: agents with fewer hosts first.
        {
            let s = self.functions.lock();
            let count = |agent: &str| {
                s.planner
                    .hosts()
                    .values()
                    .filter(|h| h.agent_id == agent && h.state != HostState::Killing)
                    .count()
            };
            offers.sort_by_cached_key(|o| count(&o.agent_id));
        }
        for offer in offers {
            let tasks = self.place(&offer, &mut wants);
            let r = if tasks.is_empty() {
                self.sched
                    .decline(vec![offer.offer_id.clone()], Some(REFUSE_SECONDS))
                    .await
            } else {
                for t in &tasks {
                    tracing::info!(task = %t.task_id, agent = %offer.agent_id, "launching function host");
                }
                self.sched
                    .accept(vec![offer.offer_id.clone()], tasks, Some(REFUSE_SECONDS))
                    .await
            };
            if let Err(e) = r {
                tracing::warn!(
                    "functions framework: answering offer {}: {e:#}",
                    offer.offer_id
                );
            }
        }
    }

    /// Host tasks for the wanted functions that fit in `offer`.
    fn place(
        &mut self,
        offer: &Offer,
        wants: &mut std::collections::BTreeMap<String, u32>,
    ) -> Vec<TaskInfo> {
        let now = crate::now_ms();
        let mut s = self.functions.lock();
        if !s.agent_http.contains_key(&offer.agent_id) {
            return Vec::new(); // the agent serves no HTTP: no function can be reached there
        }
        let Ok(mut have) = Resources::from_proto(&offer.resources) else {
            return Vec::new();
        };
        let mut tasks = Vec::new();
        for (name, n) in wants.iter_mut() {
            let Some(spec) = s.planner.function(name).map(|f| f.spec.clone()) else {
                continue;
            };
            if spec.role != offer.role {
                continue;
            }
            let Ok(want) = Resources::from_proto(&spec.resources) else {
                continue;
            };
            while *n > 0 {
                let ask = if have.of_role("").contains(&want) {
                    want.clone()
                } else if spec.role != "*"
                    && have
                        .of_role(&spec.role)
                        .contains(&want.with_role(&spec.role))
                {
                    want.with_role(&spec.role)
                } else {
                    break;
                };
                have.sub(&ask);
                self.seq += 1;
                let task_id = format!("fn.{name}.{:x}-{}", now, self.seq);
                s.planner.launched(&task_id, name, &offer.agent_id, now);
                tasks.push(host_task(&spec, &task_id, &offer.agent_id, &ask));
                *n -= 1;
            }
        }
        tasks
    }
}

fn host_task(spec: &FunctionDeploy, task_id: &str, agent_id: &str, res: &Resources) -> TaskInfo {
    TaskInfo {
        task_id: task_id.into(),
        name: format!("fn:{}", spec.name),
        agent_id: agent_id.into(),
        resources: res.to_proto(),
        module: spec.module.clone(),
        function: spec.function.clone(),
        executor_id: format!("fn-{task_id}"),
        ..Default::default()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_name_their_function() {
        assert_eq!(function_of_task("fn.echo.18c-1"), Some("echo"));
        assert_eq!(function_of_task("fn.my.func-2.18c-1"), Some("my.func-2"));
        assert_eq!(function_of_task("fn..x"), None);
        assert_eq!(function_of_task("task-1"), None);
    }
}
