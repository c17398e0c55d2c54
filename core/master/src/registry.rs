//! The master's registry: what must survive a master restart (kill -9 included).
//!
//! Mesos keeps the same things in its replicated log: the agents it admitted, the
//! frameworks it knows (with their failover timeouts), role weights, quotas and
//! dynamic reservations. Tasks are *not* here: after a restart the agents bring them
//! back when they re-register, so the registry never has to be written per task.
//!
//! The core decides what changes ([`RegistryOp`] outputs, the registry's one write
//! path); this module holds the records and the resulting [`Registry`], which the core
//! rebuilds itself from after a restart. Where the records live (a redb file, later a
//! replicated log) is the shell's business: see `agora-master`'s `registry` module. The
//! shell makes every op of one input durable before it sends any message of that
//! input, so, for example, a framework never hears SUBSCRIBED for an id a restarted
//! master would not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An agent the master admitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEntry {
    pub hostname: String,
    /// Removed after missing heartbeats: its tasks were reported UNREACHABLE/LOST and
    /// are adopted again if it returns. A restarted master does not wait for it.
    #[serde(default)]
    pub unreachable: bool,
    /// The agent installation's `registration_token` (see AgentHello).
    #[serde(default)]
    pub token: String,
    /// Marked gone by the operator (`agora agent gone`): its tasks ended GONE, and it
    /// is never taken back (a new identity joins as a new agent).
    #[serde(default)]
    pub gone: bool,
}

/// A framework the master knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameworkEntry {
    pub name: String,
    pub roles: Vec<String>,
    pub failover_ms: u64,
    #[serde(default)]
    pub offer_constraints: Vec<String>,
    #[serde(default)]
    pub partition_aware: bool,
    /// Who registered it: only they may subscribe as it again. Empty (a framework of
    /// a client without a principal, or of an older master): anyone may.
    #[serde(default)]
    pub principal: String,
}

/// A role's quota: amounts per resource name (milli-cpus, bytes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuotaEntry {
    pub guarantee: BTreeMap<String, i64>,
    pub limit: BTreeMap<String, i64>,
}

/// Longest key of a framework's state record (SET_STATE), in bytes.
pub const MAX_STATE_KEY: usize = 256;
/// Largest value of a framework's state record, in bytes.
pub const MAX_STATE_VALUE: usize = 256 << 10;
/// Most state records one framework may keep.
pub const MAX_STATE_KEYS: usize = 10_000;

/// One change to the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RegistryOp {
    PutAgent {
        agent_id: String,
        entry: AgentEntry,
    },
    RemoveAgent {
        agent_id: String,
    },
    PutFramework {
        framework_id: String,
        entry: FrameworkEntry,
    },
    /// Torn down or failed over too late: the id may never subscribe again.
    RemoveFramework {
        framework_id: String,
        removed_ms: u64,
    },
    /// A removed framework's id is forgotten (the bound on remembered ones).
    ForgetFramework {
        framework_id: String,
    },
    /// Weight 1 (the default) removes the entry.
    SetWeight {
        role: String,
        weight: f64,
    },
    /// An empty quota removes the entry.
    SetQuota {
        role: String,
        quota: QuotaEntry,
    },
    /// A framework that is not partition-aware was told the task is LOST while its
    /// agent may still run it (the agent stopped answering, or a restarted master
    /// did not know the task): if the agent brings it back it is killed, not adopted.
    TellLost {
        framework_id: String,
        task_id: String,
        at_ms: u64,
    },
    /// The dynamic reservations on one agent; empty removes the entry.
    SetReservations {
        agent_id: String,
        resources: Vec<Reserved>,
    },
    /// One record of a framework's own state (SET_STATE), e.g. the built-in
    /// functions framework's deployments. Removed with the framework.
    PutFrameworkState {
        framework_id: String,
        key: String,
        #[serde(with = "hex_bytes")]
        value: Vec<u8>,
    },
    RemoveFrameworkState {
        framework_id: String,
        key: String,
    },
    /// The access policy (`agora acl set`), as its JSON text; empty removes it
    /// (everything allowed again).
    SetPolicy {
        text: String,
    },
}

/// Values in JSON as hex strings, not arrays of numbers.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// Most removed framework ids remembered; the oldest are forgotten first.
pub const MAX_REMOVED_FRAMEWORKS: usize = 10_000;
/// Most told-LOST tasks remembered; the oldest are forgotten first.
pub const MAX_LOST_TASKS: usize = 100_000;

/// Everything the registry holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    pub agents: BTreeMap<String, AgentEntry>,
    pub frameworks: BTreeMap<String, FrameworkEntry>,
    /// Removed framework id -> when (ms since the epoch).
    pub removed_frameworks: BTreeMap<String, u64>,
    pub weights: BTreeMap<String, f64>,
    pub quotas: BTreeMap<String, QuotaEntry>,
    pub reservations: BTreeMap<String, Vec<Reserved>>,
    /// Framework id -> its state records (key -> value), see SET_STATE.
    pub framework_state: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// (framework id, task id) -> when it was told LOST (see `RegistryOp::TellLost`).
    pub lost_tasks: BTreeMap<(String, String), u64>,
    /// The access policy; `None`: none set, everything allowed.
    pub policy: Option<crate::acl::Policy>,
}

/// An amount of one resource reserved for a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserved {
    pub name: String,
    pub role: String,
    pub value: i64,
}

impl Registry {
    pub fn apply(&mut self, op: &RegistryOp) {
        match op {
            RegistryOp::PutAgent { agent_id, entry } => {
                self.agents.insert(agent_id.clone(), entry.clone());
            }
            RegistryOp::RemoveAgent { agent_id } => {
                self.agents.remove(agent_id);
                self.reservations.remove(agent_id);
            }
            RegistryOp::PutFramework {
                framework_id,
                entry,
            } => {
                self.frameworks.insert(framework_id.clone(), entry.clone());
            }
            RegistryOp::RemoveFramework {
                framework_id,
                removed_ms,
            } => {
                self.frameworks.remove(framework_id);
                self.framework_state.remove(framework_id);
                self.removed_frameworks
                    .insert(framework_id.clone(), *removed_ms);
                while self.removed_frameworks.len() > MAX_REMOVED_FRAMEWORKS {
                    let oldest = self
                        .removed_frameworks
                        .iter()
                        .min_by_key(|(id, t)| (**t, (*id).clone()))
                        .map(|(id, _)| id.clone());
                    match oldest {
                        Some(id) => self.removed_frameworks.remove(&id),
                        None => break,
                    };
                }
            }
            RegistryOp::ForgetFramework { framework_id } => {
                self.removed_frameworks.remove(framework_id);
            }
            RegistryOp::SetWeight { role, weight } => {
                if *weight == 1.0 {
                    self.weights.remove(role);
                } else {
                    self.weights.insert(role.clone(), *weight);
                }
            }
            RegistryOp::SetQuota { role, quota } => {
                if quota.guarantee.is_empty() && quota.limit.is_empty() {
                    self.quotas.remove(role);
                } else {
                    self.quotas.insert(role.clone(), quota.clone());
                }
            }
            RegistryOp::TellLost {
                framework_id,
                task_id,
                at_ms,
            } => {
                self.lost_tasks
                    .insert((framework_id.clone(), task_id.clone()), *at_ms);
                while self.lost_tasks.len() > MAX_LOST_TASKS {
                    let oldest = self
                        .lost_tasks
                        .iter()
                        .min_by_key(|(k, t)| (**t, (*k).clone()))
                        .map(|(k, _)| k.clone());
                    match oldest {
                        Some(k) => self.lost_tasks.remove(&k),
                        None => break,
                    };
                }
            }
            RegistryOp::SetReservations {
                agent_id,
                resources,
            } => {
                if resources.is_empty() {
                    self.reservations.remove(agent_id);
                } else {
                    self.reservations
                        .insert(agent_id.clone(), resources.clone());
                }
            }
            RegistryOp::PutFrameworkState {
                framework_id,
                key,
                value,
            } => {
                self.framework_state
                    .entry(framework_id.clone())
                    .or_default()
                    .insert(key.clone(), value.clone());
            }
            RegistryOp::SetPolicy { text } => {
                // Checked before the op was made; a text that no longer parses (a
                // newer master's) leaves the policy as it was.
                if text.is_empty() {
                    self.policy = None;
                } else {
                    match crate::acl::Policy::parse(text) {
                        Ok(policy) => self.policy = Some(policy),
                        Err(e) => tracing::error!("the registry's access policy does not parse here ({e}); keeping the one in force"),
                    }
                }
            }
            RegistryOp::RemoveFrameworkState { framework_id, key } => {
                if let Some(state) = self.framework_state.get_mut(framework_id) {
                    state.remove(key);
                    if state.is_empty() {
                        self.framework_state.remove(framework_id);
                    }
                }
            }
        }
    }
}
