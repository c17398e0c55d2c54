//! Access control: which principal may do what to which role, OS user or function,
//! in the manner of Mesos's local authorizer (its ACLs): a policy lists, per action,
//! rules of a subject (principals) and an object (roles, users or functions); the
//! first rule whose subject names the principal and whose object names the object
//! decides, a rule whose object is `NONE` denies, and when no rule decides,
//! `permissive` does.
//!
//! The file format (JSON, `agora acl set FILE`):
//!
//! ```json
//! {
//!   "permissive": false,
//!   "register_frameworks": [
//!     {"principals": {"values": ["alice"]}, "roles": {"values": ["tenant-a/*"]}}
//!   ],
//!   "run_native_tasks": [
//!     {"principals": {"values": ["alice"]}, "users": {"values": ["nobody"]}}
//!   ],
//!   "manage_acls": [
//!     {"principals": {"values": ["admin"]}, "objects": {"type": "ANY"}}
//!   ]
//! }
//! ```
//!
//! An entity is `{"values": [...]}` or `{"type": "ANY"}` / `{"type": "NONE"}`. A role
//! value `tenant-a/*` names `tenant-a` and every role beneath it; `*` alone is the
//! default role. Principals `NONE` names requests without a principal. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Every action a policy can allow, with the kind of object its rules name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Subscribe a framework in a role.
    RegisterFrameworks,
    /// Launch WebAssembly tasks in a role.
    RunWasmTasks,
    /// Launch native commands as an OS user.
    RunNativeTasks,
    /// See tasks, their logs, sandboxes and explanations, of a role.
    ViewTasks,
    /// Kill tasks of a role.
    KillTasks,
    /// Tear down frameworks of a role.
    TeardownFrameworks,
    /// Deploy functions into a role.
    DeployFunctions,
    /// Remove functions of a role.
    RemoveFunctions,
    /// Invoke a function, by name.
    InvokeFunctions,
    /// Change a role's weight.
    UpdateWeights,
    /// Change a role's quota.
    UpdateQuotas,
    /// Reserve resources for a role, or unreserve them.
    ReserveResources,
    /// Change a role's function tenant limit.
    SetTenantLimits,
    /// See the agents and masters and change the masters' group, mark agents gone.
    ManageCluster,
    /// Read and replace the policy itself.
    ManageAcls,
}

/// What a rule's object names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Roles,
    Users,
    Functions,
    /// Actions on the cluster as a whole: only `ANY` or `NONE` mean anything.
    Objects,
}

impl ObjectKind {
    /// The key of the object in a rule (`"roles"`, `"users"`, ...).
    pub fn key(self) -> &'static str {
        match self {
            ObjectKind::Roles => "roles",
            ObjectKind::Users => "users",
            ObjectKind::Functions => "functions",
            ObjectKind::Objects => "objects",
        }
    }
}

impl Action {
    pub const ALL: [Action; 15] = [
        Action::RegisterFrameworks,
        Action::RunWasmTasks,
        Action::RunNativeTasks,
        Action::ViewTasks,
        Action::KillTasks,
        Action::TeardownFrameworks,
        Action::DeployFunctions,
        Action::RemoveFunctions,
        Action::InvokeFunctions,
        Action::UpdateWeights,
        Action::UpdateQuotas,
        Action::ReserveResources,
        Action::SetTenantLimits,
        Action::ManageCluster,
        Action::ManageAcls,
    ];

    /// The name of the action's rule list in the policy file.
    pub fn name(self) -> &'static str {
        match self {
            Action::RegisterFrameworks => "register_frameworks",
            Action::RunWasmTasks => "run_wasm_tasks",
            Action::RunNativeTasks => "run_native_tasks",
            Action::ViewTasks => "view_tasks",
            Action::KillTasks => "kill_tasks",
            Action::TeardownFrameworks => "teardown_frameworks",
            Action::DeployFunctions => "deploy_functions",
            Action::RemoveFunctions => "remove_functions",
            Action::InvokeFunctions => "invoke_functions",
            Action::UpdateWeights => "update_weights",
            Action::UpdateQuotas => "update_quotas",
            Action::ReserveResources => "reserve_resources",
            Action::SetTenantLimits => "set_tenant_limits",
            Action::ManageCluster => "manage_cluster",
            Action::ManageAcls => "manage_acls",
        }
    }

    /// What its rules' objects name.
    pub fn object_kind(self) -> ObjectKind {
        match self {
            Action::RunNativeTasks => ObjectKind::Users,
            Action::InvokeFunctions => ObjectKind::Functions,
            Action::ManageCluster | Action::ManageAcls => ObjectKind::Objects,
            _ => ObjectKind::Roles,
        }
    }

    /// The action in a sentence: "kill tasks of role", "run native tasks as user".
    fn phrase(self) -> &'static str {
        match self {
            Action::RegisterFrameworks => "register frameworks in role",
            Action::RunWasmTasks => "run wasm tasks in role",
            Action::RunNativeTasks => "run native tasks as user",
            Action::ViewTasks => "view tasks of role",
            Action::KillTasks => "kill tasks of role",
            Action::TeardownFrameworks => "tear down frameworks of role",
            Action::DeployFunctions => "deploy functions into role",
            Action::RemoveFunctions => "remove functions of role",
            Action::InvokeFunctions => "invoke function",
            Action::UpdateWeights => "change the weight of role",
            Action::UpdateQuotas => "change the quota of role",
            Action::ReserveResources => "reserve resources for role",
            Action::SetTenantLimits => "change the tenant limit of role",
            Action::ManageCluster => "manage the cluster",
            Action::ManageAcls => "read or change the access policy",
        }
    }
}

/// The subject or the object of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Entity {
    Values {
        values: Vec<String>,
    },
    Type {
        #[serde(rename = "type")]
        kind: EntityType,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EntityType {
    Any,
    None,
}

/// One rule: a subject and an object. Read from the file with the object under the
/// key its action names (`roles`, `users`, `functions`, `objects`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub principals: Entity,
    pub object: Entity,
}

/// A whole policy.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Policy {
    /// What happens when no rule decides.
    pub permissive: bool,
    pub rules: BTreeMap<Action, Vec<Rule>>,
}

/// The principal of the master's own components (the functions gateway), which no
/// policy judges; no certificate can name it (principals have no ':').
pub const SYSTEM_PRINCIPAL: &str = ":system";

/// Most rules in one policy, all actions together.
pub const MAX_RULES: usize = 10_000;
/// Most values in one entity.
pub const MAX_VALUES: usize = 10_000;
/// Longest policy file accepted.
pub const MAX_POLICY_BYTES: usize = 4 << 20;

/// Whether an action is allowed, and by what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by rule `index` of the action (or by `permissive`: `None`).
    Allowed { rule: Option<usize> },
    /// Denied by rule `index` (its object `NONE`), or because no rule allowed it
    /// and the policy is not permissive (`None`).
    Denied { rule: Option<usize> },
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

/// A refusal, as the user reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub principal: String,
    pub action: Action,
    pub object: String,
    pub rule: Option<usize>,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = if self.principal.is_empty() {
            "a client without a principal".to_string()
        } else {
            format!("principal {}", self.principal)
        };
        let what = match self.action.object_kind() {
            ObjectKind::Objects => self.action.phrase().to_string(),
            _ => format!("{} {}", self.action.phrase(), self.object),
        };
        let name = self.action.name();
        match self.rule {
            Some(i) => write!(
                f,
                "permission denied: {who} may not {what} (rule {name}[{i}])"
            ),
            None => write!(
                f,
                "permission denied: {who} may not {what} (rule {name}: no rule allows it)"
            ),
        }
    }
}

impl Policy {
    /// The policy of a cluster nobody configured: everything allowed.
    pub fn allow_all() -> Policy {
        Policy {
            permissive: true,
            rules: BTreeMap::new(),
        }
    }

    /// Reads a policy file, naming what is wrong: an unknown action or key, an
    /// object under the wrong key, an entity that is neither values nor a type, a
    /// bad role pattern, or too many rules.
    pub fn parse(text: &str) -> Result<Policy, String> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(format!(
                "the policy is {} bytes, more than the {MAX_POLICY_BYTES} allowed",
                text.len()
            ));
        }
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| format!("the policy is not a JSON object: {e}"))?;
        let mut policy = Policy::default();
        let mut count = 0usize;
        for (key, value) in raw {
            if key == "permissive" {
                policy.permissive = value
                    .as_bool()
                    .ok_or_else(|| "\"permissive\" must be true or false".to_string())?;
                continue;
            }
            let Some(action) = Action::ALL.into_iter().find(|a| a.name() == key) else {
                let known: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
                return Err(format!(
                    "unknown action {key:?}: the policy knows \"permissive\" and {}",
                    known.join(", ")
                ));
            };
            let list = value
                .as_array()
                .ok_or_else(|| format!("{key} must be a list of rules"))?;
            let mut rules = Vec::with_capacity(list.len());
            for (i, item) in list.iter().enumerate() {
                count += 1;
                if count > MAX_RULES {
                    return Err(format!("the policy has more than {MAX_RULES} rules"));
                }
                rules.push(parse_rule(action, item).map_err(|e| format!("{key}[{i}]: {e}"))?);
            }
            policy.rules.insert(action, rules);
        }
        Ok(policy)
    }

    /// The policy as a file `parse` reads back (the same rules, in order).
    pub fn to_json(&self) -> String {
        let mut out = serde_json::Map::new();
        out.insert(
            "permissive".into(),
            serde_json::Value::Bool(self.permissive),
        );
        for (action, rules) in &self.rules {
            let list = rules
                .iter()
                .map(|r| {
                    let mut m = serde_json::Map::new();
                    m.insert("principals".into(), entity_json(&r.principals));
                    m.insert(action.object_kind().key().into(), entity_json(&r.object));
                    serde_json::Value::Object(m)
                })
                .collect();
            out.insert(action.name().into(), serde_json::Value::Array(list));
        }
        serde_json::to_string_pretty(&serde_json::Value::Object(out)).unwrap_or_default()
    }

    /// Whether `principal` ("" for none) may do `action` to `object` (a role, an OS
    /// user, a function name; ignored for cluster-wide actions).
    pub fn decide(&self, principal: &str, action: Action, object: &str) -> Decision {
        let kind = action.object_kind();
        for (i, rule) in self.rules.get(&action).into_iter().flatten().enumerate() {
            if !principal_matches(&rule.principals, principal) {
                continue;
            }
            match &rule.object {
                Entity::Type {
                    kind: EntityType::None,
                } => return Decision::Denied { rule: Some(i) },
                Entity::Type {
                    kind: EntityType::Any,
                } => return Decision::Allowed { rule: Some(i) },
                Entity::Values { values } => {
                    if values.iter().any(|v| object_matches(kind, v, object)) {
                        return Decision::Allowed { rule: Some(i) };
                    }
                }
            }
        }
        if self.permissive {
            Decision::Allowed { rule: None }
        } else {
            Decision::Denied { rule: None }
        }
    }

    /// `decide` as a result whose error is the sentence a user reads.
    pub fn check(&self, principal: &str, action: Action, object: &str) -> Result<(), Denied> {
        match self.decide(principal, action, object) {
            Decision::Allowed { .. } => Ok(()),
            Decision::Denied { rule } => Err(Denied {
                principal: principal.to_string(),
                action,
                object: object.to_string(),
                rule,
            }),
        }
    }
}

fn entity_json(e: &Entity) -> serde_json::Value {
    serde_json::to_value(e).unwrap_or(serde_json::Value::Null)
}

fn parse_rule(action: Action, item: &serde_json::Value) -> Result<Rule, String> {
    let obj = item
        .as_object()
        .ok_or_else(|| "a rule must be an object with \"principals\" and an object".to_string())?;
    let want = action.object_kind().key();
    for key in obj.keys() {
        if key != "principals" && key != want {
            return Err(format!(
                "unknown key {key:?}: a rule of {} has \"principals\" and {want:?}",
                action.name()
            ));
        }
    }
    let entity = |key: &str| -> Result<Entity, String> {
        let v = obj.get(key).ok_or_else(|| format!("missing {key:?}"))?;
        let e: Entity = serde_json::from_value(v.clone()).map_err(|_| {
            format!("{key:?} must be {{\"values\": [..]}} or {{\"type\": \"ANY\"}} or {{\"type\": \"NONE\"}}")
        })?;
        if let Entity::Values { values } = &e {
            if values.len() > MAX_VALUES {
                return Err(format!("{key:?} has more than {MAX_VALUES} values"));
            }
            for v in values {
                if v.is_empty() {
                    return Err(format!("{key:?} has an empty value"));
                }
            }
        }
        Ok(e)
    };
    let principals = entity("principals")?;
    let object = entity(want)?;
    if action.object_kind() == ObjectKind::Roles {
        if let Entity::Values { values } = &object {
            for v in values {
                check_role_pattern(v).map_err(|e| format!("role {v:?}: {e}"))?;
            }
        }
    }
    Ok(Rule { principals, object })
}

/// A role pattern: `*` (the default role), a role, or a role followed by `/*`.
fn check_role_pattern(v: &str) -> Result<(), String> {
    if v == "*" {
        return Ok(());
    }
    let base = v.strip_suffix("/*").unwrap_or(v);
    if base.is_empty() || base.split('/').any(|seg| seg.is_empty() || seg == "*") {
        return Err("expected a role such as tenant-a or tenant-a/web, or tenant-a/* for it and every role beneath it".into());
    }
    Ok(())
}

fn principal_matches(subject: &Entity, principal: &str) -> bool {
    match subject {
        Entity::Type {
            kind: EntityType::Any,
        } => true,
        Entity::Type {
            kind: EntityType::None,
        } => principal.is_empty(),
        Entity::Values { values } => !principal.is_empty() && values.iter().any(|v| v == principal),
    }
}

fn object_matches(kind: ObjectKind, value: &str, object: &str) -> bool {
    match kind {
        ObjectKind::Roles => match value.strip_suffix("/*") {
            Some(base) if value != "*" => {
                object == base
                    || object
                        .strip_prefix(base)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
            _ => value == object,
        },
        _ => value == object,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_TENANTS: &str = r#"{
      "permissive": false,
      "register_frameworks": [
        {"principals": {"values": ["alice"]}, "roles": {"values": ["tenant-a/*"]}},
        {"principals": {"values": ["bob"]}, "roles": {"values": ["tenant-b"]}},
        {"principals": {"values": ["ops"]}, "roles": {"type": "ANY"}}
      ],
      "kill_tasks": [
        {"principals": {"values": ["mallory"]}, "roles": {"type": "NONE"}},
        {"principals": {"type": "ANY"}, "roles": {"values": ["shared"]}}
      ],
      "run_native_tasks": [
        {"principals": {"values": ["alice"]}, "users": {"values": ["nobody"]}}
      ],
      "manage_acls": [
        {"principals": {"values": ["ops"]}, "objects": {"type": "ANY"}}
      ]
    }"#;

    #[test]
    fn the_first_matching_rule_decides_and_role_trees_match_beneath() {
        let p = Policy::parse(TWO_TENANTS).unwrap();
        let reg = Action::RegisterFrameworks;
        assert_eq!(
            p.decide("alice", reg, "tenant-a"),
            Decision::Allowed { rule: Some(0) }
        );
        assert!(p.decide("alice", reg, "tenant-a/web/x").allowed());
        assert!(
            !p.decide("alice", reg, "tenant-ab").allowed(),
            "a prefix is not a parent"
        );
        assert!(!p.decide("alice", reg, "tenant-b").allowed());
        assert!(p.decide("bob", reg, "tenant-b").allowed());
        assert!(
            !p.decide("bob", reg, "tenant-b/sub").allowed(),
            "no /*: that role only"
        );
        assert!(p.decide("ops", reg, "anything").allowed());
        assert_eq!(
            p.decide("eve", reg, "tenant-a"),
            Decision::Denied { rule: None }
        );
        assert!(!p.decide("", reg, "tenant-a").allowed());
        assert_eq!(
            p.decide("mallory", Action::KillTasks, "shared"),
            Decision::Denied { rule: Some(0) },
            "NONE denies before a later rule allows"
        );
        assert!(p.decide("eve", Action::KillTasks, "shared").allowed());
        assert!(p
            .decide("alice", Action::RunNativeTasks, "nobody")
            .allowed());
        assert!(!p.decide("alice", Action::RunNativeTasks, "root").allowed());
        assert!(p.decide("ops", Action::ManageAcls, "").allowed());
        assert!(!p.decide("alice", Action::ManageAcls, "").allowed());
    }

    #[test]
    fn denials_are_sentences_naming_the_rule() {
        let p = Policy::parse(TWO_TENANTS).unwrap();
        let e = p
            .check("bob", Action::RegisterFrameworks, "tenant-a")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "permission denied: principal bob may not register frameworks in role tenant-a (rule register_frameworks: no rule allows it)"
        );
        let e = p.check("mallory", Action::KillTasks, "shared").unwrap_err();
        assert_eq!(
            e.to_string(),
            "permission denied: principal mallory may not kill tasks of role shared (rule kill_tasks[0])"
        );
        let e = p.check("", Action::ManageAcls, "").unwrap_err();
        assert_eq!(
            e.to_string(),
            "permission denied: a client without a principal may not read or change the access policy (rule manage_acls: no rule allows it)"
        );
    }

    #[test]
    fn permissive_decides_when_no_rule_does() {
        let p = Policy::parse(r#"{"permissive": true, "kill_tasks": [{"principals": {"values": ["a"]}, "roles": {"type": "NONE"}}]}"#).unwrap();
        assert!(p.decide("b", Action::KillTasks, "r").allowed());
        assert!(!p.decide("a", Action::KillTasks, "r").allowed());
        assert!(Policy::allow_all()
            .decide("", Action::ManageAcls, "")
            .allowed());
        assert!(!Policy::parse("{}")
            .unwrap()
            .decide("x", Action::ViewTasks, "r")
            .allowed());
    }

    #[test]
    fn bad_policies_are_named() {
        let cases = [
            ("[]", "not a JSON object"),
            (r#"{"permissive": "yes"}"#, "\"permissive\" must be true or false"),
            (r#"{"kill_task": []}"#, "unknown action \"kill_task\""),
            (r#"{"kill_tasks": {}}"#, "kill_tasks must be a list of rules"),
            (
                r#"{"kill_tasks": [{"principals": {"values": ["a"]}, "users": {"type": "ANY"}}]}"#,
                "kill_tasks[0]: unknown key \"users\": a rule of kill_tasks has \"principals\" and \"roles\"",
            ),
            (
                r#"{"kill_tasks": [{"principals": {"values": ["a"]}}]}"#,
                "kill_tasks[0]: missing \"roles\"",
            ),
            (
                r#"{"kill_tasks": [{"principals": {"type": "SOME"}, "roles": {"type": "ANY"}}]}"#,
                "kill_tasks[0]: \"principals\" must be",
            ),
            (
                r#"{"kill_tasks": [{"principals": {"values": ["a"]}, "roles": {"values": ["a//b"]}}]}"#,
                "kill_tasks[0]: role \"a//b\": expected a role",
            ),
            (
                r#"{"kill_tasks": [{"principals": {"values": [""]}, "roles": {"type": "ANY"}}]}"#,
                "has an empty value",
            ),
        ];
        for (text, want) in cases {
            let e = Policy::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_policy_reads_back_as_written() {
        let p = Policy::parse(TWO_TENANTS).unwrap();
        let again = Policy::parse(&p.to_json()).unwrap();
        assert_eq!(p, again);
    }

    /// A thousand rules: the last one still decides, the others are skipped.
    #[test]
    fn a_thousand_rules_are_searched_in_order() {
        let rules: Vec<String> = (0..1000)
            .map(|i| {
                format!(
                    r#"{{"principals": {{"values": ["p{i}"]}}, "roles": {{"values": ["r{i}"]}}}}"#
                )
            })
            .collect();
        let text = format!(r#"{{"kill_tasks": [{}]}}"#, rules.join(","));
        let p = Policy::parse(&text).unwrap();
        assert_eq!(
            p.decide("p999", Action::KillTasks, "r999"),
            Decision::Allowed { rule: Some(999) }
        );
        assert!(!p.decide("p999", Action::KillTasks, "r998").allowed());
    }
}
