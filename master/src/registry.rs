//! The registry's file: `<data dir>/registry.redb`, where the records the master
//! core decides on ([`RegistryOp`], defined with the core) are kept durably.
//!
//! The shell writes every op of one input in one durable transaction before it sends
//! any message of that input (see `server.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::error::{Error, Result};
use serde::Serialize;

pub use agora_master_core::registry::*;

/// File name under the master's data dir.
pub const FILE: &str = "registry.redb";

/// Layout version; a master refuses a registry with a version it does not know.
/// 2: the functions framework's deployments are its framework state (`state`
/// entries); version 1 kept them as `function`, `tenant-limit` and
/// `functions-framework` entries, which opening migrates ([`migrate_v1`]).
/// 3: the file also holds the master's Raft log, vote and snapshot
/// (`crate::raft::store`); the entries are its state machine. Layout 2 opens as is.
const VERSION: u64 = 3;

/// (kind, key) -> JSON of the entry.
const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Where a (kind, key) pair lives and what it holds, for the file.
fn entry_of(op: &RegistryOp) -> (&'static str, String, Option<Vec<u8>>) {
    #[allow(
        clippy::expect_used,
        reason = "the core's records (derived Serialize, string map keys): serde_json cannot fail on them"
    )]
    fn json<T: Serialize>(v: &T) -> Option<Vec<u8>> {
        Some(serde_json::to_vec(v).expect("registry entries serialize"))
    }
    match op {
        RegistryOp::PutAgent { agent_id, entry } => ("agent", agent_id.clone(), json(entry)),
        RegistryOp::RemoveAgent { agent_id } => ("agent", agent_id.clone(), None),
        RegistryOp::PutFramework {
            framework_id,
            entry,
        } => ("framework", framework_id.clone(), json(entry)),
        RegistryOp::RemoveFramework {
            framework_id,
            removed_ms,
        } => ("removed", framework_id.clone(), json(removed_ms)),
        RegistryOp::ForgetFramework { framework_id } => ("removed", framework_id.clone(), None),
        RegistryOp::SetWeight { role, weight } => (
            "weight",
            role.clone(),
            (*weight != 1.0).then(|| json(weight)).flatten(),
        ),
        RegistryOp::SetQuota { role, quota } => (
            "quota",
            role.clone(),
            (!(quota.guarantee.is_empty() && quota.limit.is_empty()))
                .then(|| json(quota))
                .flatten(),
        ),
        RegistryOp::SetReservations {
            agent_id,
            resources,
        } => (
            "reservations",
            agent_id.clone(),
            (!resources.is_empty()).then(|| json(resources)).flatten(),
        ),
        // The value as it is: a framework's state is its own bytes.
        RegistryOp::PutFrameworkState {
            framework_id,
            key,
            value,
        } => (
            "state",
            format!("{framework_id}\0{key}"),
            Some(value.clone()),
        ),
        RegistryOp::RemoveFrameworkState { framework_id, key } => {
            ("state", format!("{framework_id}\0{key}"), None)
        }
        RegistryOp::TellLost {
            framework_id,
            task_id,
            at_ms,
        } => ("lost", format!("{framework_id}\0{task_id}"), json(at_ms)),
        RegistryOp::SetPolicy { text } => (
            "policy",
            String::new(),
            (!text.is_empty()).then(|| text.clone().into_bytes()),
        ),
    }
}

/// The registry file written directly, one durable transaction a commit, with no
/// Raft log: what the master did before issue 12, kept for tests and tools that need
/// a registry file without a group. The master writes through [`crate::raft`].
pub struct RegistryStore {
    db: Arc<Database>,
    path: PathBuf,
    /// Mirror of the file, to keep the removed-framework set bounded there too.
    state: Registry,
}

impl RegistryStore {
    /// Opens (or creates) `<dir>/registry.redb` and reads what it holds.
    pub fn open(dir: &Path) -> Result<(RegistryStore, Registry)> {
        let (db, path) = open_file(dir)?;
        let state = read(&db, &path)?;
        Ok((
            RegistryStore {
                db,
                path,
                state: state.clone(),
            },
            state,
        ))
    }

    /// The open file.
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    /// Writes `ops` in one durable transaction (fsync before it returns).
    pub fn commit(&mut self, ops: &[RegistryOp]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let err = |e: &dyn std::fmt::Display| Error::RegistryWrite {
            path: self.path.clone(),
            cause: e.to_string(),
        };
        let w = self.db.begin_write().map_err(|e| err(&e))?;
        apply_ops(&w, &mut self.state, ops).map_err(|e| err(&e))?;
        w.commit().map_err(|e| err(&e))?;
        Ok(())
    }
}

/// Opens (or creates) `<dir>/registry.redb` at the current layout, migrating older
/// layouts in place.
pub(crate) fn open_file(dir: &Path) -> Result<(Arc<Database>, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|cause| Error::DataDir {
        path: dir.into(),
        cause,
    })?;
    let path = dir.join(FILE);
    let db = Database::create(&path).map_err(|cause| Error::RegistryOpen {
        path: path.clone(),
        cause,
    })?;
    let bad = |e: &dyn std::fmt::Display| Error::RegistryUnreadable {
        path: path.clone(),
        cause: e.to_string(),
    };
    let w = db.begin_write().map_err(|e| bad(&e))?;
    {
        let mut meta = w.open_table(META).map_err(|e| bad(&e))?;
        let v = meta.get("version").map_err(|e| bad(&e))?.map(|g| g.value());
        match v {
            None | Some(2) => {}
            Some(VERSION) => {}
            Some(1) => migrate_v1(&w, &path).map_err(|e| bad(&e))?,
            Some(other) => {
                return Err(Error::RegistryVersion {
                    path,
                    found: other,
                    known: VERSION,
                })
            }
        }
        // Layout 2 to 3 adds the Raft tables (created by `raft::store`); the
        // entries become the state machine as they are.
        meta.insert("version", VERSION).map_err(|e| bad(&e))?;
        w.open_table(ENTRIES).map_err(|e| bad(&e))?;
    }
    w.commit().map_err(|e| bad(&e))?;
    Ok((Arc::new(db), path))
}

/// Reads the whole registry from the file.
pub(crate) fn read(db: &Database, path: &Path) -> Result<Registry> {
    let bad = |e: &dyn std::fmt::Display| Error::RegistryUnreadable {
        path: path.into(),
        cause: e.to_string(),
    };
    let r = db.begin_read().map_err(|e| bad(&e))?;
    let t = r.open_table(ENTRIES).map_err(|e| bad(&e))?;
    let mut reg = Registry::default();
    for row in t.iter().map_err(|e| bad(&e))? {
        let (k, v) = row.map_err(|e| bad(&e))?;
        let (kind, key) = k.value();
        read_entry(&mut reg, kind, key, v.value()).map_err(|e| bad(&e))?;
    }
    Ok(reg)
}

/// Adds one row of the entries table to `reg`.
fn read_entry(reg: &mut Registry, kind: &str, key: &str, bytes: &[u8]) -> Result<(), String> {
    let key = key.to_string();
    let what = format!("entry {kind}/{key}");
    let de_err = |e: serde_json::Error| format!("{what}: {e}");
    match kind {
        "agent" => {
            reg.agents
                .insert(key, serde_json::from_slice(bytes).map_err(de_err)?);
        }
        "framework" => {
            reg.frameworks
                .insert(key, serde_json::from_slice(bytes).map_err(de_err)?);
        }
        "removed" => {
            reg.removed_frameworks
                .insert(key, serde_json::from_slice(bytes).map_err(de_err)?);
        }
        "weight" => {
            reg.weights
                .insert(key, serde_json::from_slice(bytes).map_err(de_err)?);
        }
        "quota" => {
            reg.quotas
                .insert(key, serde_json::from_slice(bytes).map_err(de_err)?);
        }
        "reservations" => {
            reg.reservations
                .insert(key, serde_json::from_slice(bytes).map_err(de_err)?);
        }
        "state" => {
            let Some((fid, k)) = key.split_once('\0') else {
                return Err(format!("{what}: no framework/key separator"));
            };
            reg.framework_state
                .entry(fid.to_string())
                .or_default()
                .insert(k.to_string(), bytes.to_vec());
        }
        "lost" => {
            let Some((fid, tid)) = key.split_once('\0') else {
                return Err(format!("{what}: no framework/task separator"));
            };
            reg.lost_tasks.insert(
                (fid.to_string(), tid.to_string()),
                serde_json::from_slice(bytes).map_err(de_err)?,
            );
        }
        "policy" => {
            let text = std::str::from_utf8(bytes).map_err(|e| format!("{what}: {e}"))?;
            reg.policy = Some(
                agora_master_core::acl::Policy::parse(text).map_err(|e| format!("{what}: {e}"))?,
            );
        }
        other => tracing::warn!("master registry: ignoring unknown entry kind {other}"),
    }
    Ok(())
}

/// Every row of the entries table, in key order: what a Raft snapshot carries.
pub(crate) fn dump_entries(
    r: &redb::ReadTransaction,
) -> Result<Vec<(String, String, Vec<u8>)>, redb::Error> {
    let t = r.open_table(ENTRIES)?;
    let mut rows = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        let (kind, key) = k.value();
        rows.push((kind.to_string(), key.to_string(), v.value().to_vec()));
    }
    Ok(rows)
}

/// Replaces the entries table with `rows` (a Raft snapshot being installed) and
/// returns the registry they hold.
pub(crate) fn replace_entries(
    w: &WriteTransaction,
    rows: &[(String, String, Vec<u8>)],
) -> Result<Registry, String> {
    let mut t = w.open_table(ENTRIES).map_err(|e| e.to_string())?;
    t.retain(|_, _| false).map_err(|e| e.to_string())?;
    let mut reg = Registry::default();
    for (kind, key, value) in rows {
        read_entry(&mut reg, kind, key, value)?;
        t.insert((kind.as_str(), key.as_str()), value.as_slice())
            .map_err(|e| e.to_string())?;
    }
    Ok(reg)
}

/// Applies `ops` to `state` and writes what changes to the entries table in `w`;
/// the one way the registry's file changes, for a direct commit and for the Raft
/// state machine alike.
pub(crate) fn apply_ops(
    w: &WriteTransaction,
    state: &mut Registry,
    ops: &[RegistryOp],
) -> Result<(), redb::Error> {
    let before: Vec<String> = state.removed_frameworks.keys().cloned().collect();
    let lost_before: Vec<(String, String)> = state.lost_tasks.keys().cloned().collect();
    for op in ops {
        state.apply(op);
    }
    let mut t = w.open_table(ENTRIES)?;
    for op in ops {
        let (kind, key, value) = entry_of(op);
        match value {
            Some(v) => {
                t.insert((kind, key.as_str()), v.as_slice())?;
            }
            None => {
                t.remove((kind, key.as_str()))?;
            }
        }
        if let RegistryOp::RemoveFramework { framework_id, .. } = op {
            t.remove(("framework", framework_id.as_str()))?;
            // Its state goes with it.
            let prefix = format!("{framework_id}\0");
            let keys: Vec<String> = t
                .range(("state", prefix.as_str())..)?
                .map_while(|row| {
                    let (k, _) = row.ok()?;
                    let (kind, key) = k.value();
                    (kind == "state" && key.starts_with(&prefix)).then(|| key.to_string())
                })
                .collect();
            for k in keys {
                t.remove(("state", k.as_str()))?;
            }
        }
        if let RegistryOp::RemoveAgent { agent_id } = op {
            t.remove(("reservations", agent_id.as_str()))?;
        }
    }
    // Removed ids the bound pushed out of the set leave the file too.
    for id in before {
        if !state.removed_frameworks.contains_key(&id) {
            t.remove(("removed", id.as_str()))?;
        }
    }
    for k in lost_before {
        if !state.lost_tasks.contains_key(&k) {
            let key = format!("{}\0{}", k.0, k.1);
            t.remove(("lost", key.as_str()))?;
        }
    }
    Ok(())
}

/// Layout 1 to 2: the functions the master's built-in functions framework kept as
/// `function` entries (a hex prost `FunctionDeploy`) and the tenant limits
/// (`tenant-limit`, JSON) become that framework's state under its fixed id
/// ([`agora_fn_api::gateway_state`]), so deployed functions survive the upgrade. The
/// old framework id (`functions-framework`) is dropped: the gateway now subscribes
/// with the fixed id, and the old framework's hosts end at its failover timeout
/// while the gateway starts new ones.
fn migrate_v1(w: &redb::WriteTransaction, path: &Path) -> Result<(), redb::Error> {
    use agora_fn_api::gateway_state::{FRAMEWORK_ID, FUNCTION_PREFIX, TENANT_PREFIX};
    use prost::Message;

    #[derive(serde::Deserialize)]
    struct FunctionEntry {
        deploy_hex: String,
    }
    #[derive(serde::Deserialize)]
    struct TenantLimitEntry {
        max_concurrency: u32,
        queue_len: u32,
        max_queue_wait_ms: u64,
    }
    let mut t = w.open_table(ENTRIES)?;
    let mut old: Vec<(String, String, Vec<u8>)> = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        let (kind, key) = k.value();
        if matches!(kind, "function" | "tenant-limit" | "functions-framework") {
            old.push((kind.to_string(), key.to_string(), v.value().to_vec()));
        }
    }
    let mut moved = 0;
    for (kind, key, bytes) in old {
        t.remove((kind.as_str(), key.as_str()))?;
        let state = match kind.as_str() {
            "function" => serde_json::from_slice::<FunctionEntry>(&bytes)
                .ok()
                .and_then(|e| hex::decode(e.deploy_hex).ok())
                .map(|v| (format!("{FUNCTION_PREFIX}{key}"), v)),
            "tenant-limit" => serde_json::from_slice::<TenantLimitEntry>(&bytes)
                .ok()
                .map(|e| {
                    let limit = agora_proto::v1::TenantLimit {
                        role: key.clone(),
                        max_concurrency: e.max_concurrency,
                        queue_len: e.queue_len,
                        max_queue_wait_ms: e.max_queue_wait_ms,
                    };
                    (format!("{TENANT_PREFIX}{key}"), limit.encode_to_vec())
                }),
            _ => continue,
        };
        match state {
            Some((k, v)) => {
                let row = format!("{FRAMEWORK_ID}\0{k}");
                t.insert(("state", row.as_str()), v.as_slice())?;
                moved += 1;
            }
            None => tracing::warn!(
                "master registry: {kind} entry {key:?} is unreadable; dropped while migrating"
            ),
        }
    }
    tracing::info!(
        entries = moved,
        "master registry {}: migrated from layout 1 (functions now kept as the functions framework's state)",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// One op of every kind (and bytes of every value in framework state), for the
    /// registry's tests and the Raft store's and wire's.
    pub(crate) fn ops() -> Vec<RegistryOp> {
        vec![
            RegistryOp::PutFrameworkState {
                framework_id: "f1".into(),
                key: "k".into(),
                value: vec![0, 1, 2, 255],
            },
            RegistryOp::PutAgent {
                agent_id: "a1".into(),
                entry: AgentEntry {
                    hostname: "h1".into(),
                    unreachable: false,
                    token: "t1".into(),
                    gone: false,
                },
            },
            RegistryOp::PutAgent {
                agent_id: "a2".into(),
                entry: AgentEntry {
                    hostname: "h2".into(),
                    unreachable: false,
                    token: String::new(),
                    gone: true,
                },
            },
            RegistryOp::PutFramework {
                framework_id: "f1".into(),
                entry: FrameworkEntry {
                    name: "web".into(),
                    roles: vec!["eng/web".into()],
                    failover_ms: 60_000,
                    offer_constraints: vec!["zone=a".into()],
                    partition_aware: true,
                    principal: "alice".into(),
                },
            },
            RegistryOp::PutFramework {
                framework_id: "f2".into(),
                entry: FrameworkEntry {
                    name: "batch".into(),
                    roles: vec!["*".into()],
                    failover_ms: 1_000,
                    offer_constraints: vec![],
                    partition_aware: false,
                    principal: String::new(),
                },
            },
            RegistryOp::RemoveFramework {
                framework_id: "f2".into(),
                removed_ms: 42,
            },
            RegistryOp::SetWeight {
                role: "eng".into(),
                weight: 3.0,
            },
            RegistryOp::SetQuota {
                role: "eng".into(),
                quota: QuotaEntry {
                    guarantee: [("cpus".to_string(), 2000)].into(),
                    limit: [("mem".to_string(), 1 << 30)].into(),
                },
            },
            RegistryOp::SetReservations {
                agent_id: "a1".into(),
                resources: vec![Reserved {
                    name: "cpus".into(),
                    role: "eng".into(),
                    value: 1000,
                }],
            },
            RegistryOp::RemoveAgent {
                agent_id: "a2".into(),
            },
            RegistryOp::TellLost {
                framework_id: "f1".into(),
                task_id: "t1".into(),
                at_ms: 7,
            },
        ]
    }

    #[test]
    fn what_is_committed_is_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, empty) = RegistryStore::open(dir.path()).unwrap();
        assert_eq!(empty, Registry::default());
        let ops = ops();
        store.commit(&ops[..5]).unwrap();
        store.commit(&ops[5..]).unwrap();
        drop(store);
        let (_, reg) = RegistryStore::open(dir.path()).unwrap();
        let mut expect = Registry::default();
        for op in &ops {
            expect.apply(op);
        }
        assert_eq!(reg, expect);
        assert_eq!(reg.agents.keys().collect::<Vec<_>>(), ["a1"]);
        assert_eq!(reg.frameworks.keys().collect::<Vec<_>>(), ["f1"]);
        assert_eq!(reg.removed_frameworks.get("f2"), Some(&42));
        assert_eq!(reg.weights.get("eng"), Some(&3.0));
        assert_eq!(reg.reservations["a1"][0].value, 1000);
    }

    #[test]
    fn defaults_and_empties_remove_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = RegistryStore::open(dir.path()).unwrap();
        store.commit(&ops()).unwrap();
        store
            .commit(&[
                RegistryOp::SetWeight {
                    role: "eng".into(),
                    weight: 1.0,
                },
                RegistryOp::SetQuota {
                    role: "eng".into(),
                    quota: QuotaEntry::default(),
                },
                RegistryOp::RemoveAgent {
                    agent_id: "a1".into(),
                },
            ])
            .unwrap();
        drop(store);
        let (_, reg) = RegistryStore::open(dir.path()).unwrap();
        assert!(reg.weights.is_empty());
        assert!(reg.quotas.is_empty());
        assert!(reg.agents.is_empty());
        assert!(
            reg.reservations.is_empty(),
            "an agent's reservations go with it"
        );
    }

    #[test]
    fn framework_state_survives_a_reopen_and_goes_with_its_framework() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = RegistryStore::open(dir.path()).unwrap();
        let put = |fid: &str, key: &str, value: &[u8]| RegistryOp::PutFrameworkState {
            framework_id: fid.into(),
            key: key.into(),
            value: value.to_vec(),
        };
        store
            .commit(&[
                put("f1", "function/echo", b"\x0a\x04"),
                put("f1", "function/gone", b"\x0a\x05"),
                put("f1", "tenant/a", b"\x00"),
                put("f2", "x", b"y"),
            ])
            .unwrap();
        store
            .commit(&[
                put("f1", "function/echo", b"\x0a\x06"),
                RegistryOp::RemoveFrameworkState {
                    framework_id: "f1".into(),
                    key: "function/gone".into(),
                },
            ])
            .unwrap();
        drop(store);
        let (mut store, reg) = RegistryStore::open(dir.path()).unwrap();
        assert_eq!(
            reg.framework_state["f1"],
            BTreeMap::from([
                ("function/echo".to_string(), b"\x0a\x06".to_vec()),
                ("tenant/a".to_string(), b"\x00".to_vec()),
            ]),
            "a replace wins; a removed key stays removed"
        );
        store
            .commit(&[RegistryOp::RemoveFramework {
                framework_id: "f1".into(),
                removed_ms: 5,
            }])
            .unwrap();
        drop(store);
        let (_, reg) = RegistryStore::open(dir.path()).unwrap();
        assert!(!reg.framework_state.contains_key("f1"), "removed with f1");
        assert_eq!(reg.framework_state["f2"]["x"], b"y".to_vec());
    }

    #[test]
    fn a_layout_1_registry_keeps_its_functions_as_the_gateways_state() {
        use agora_fn_api::gateway_state::FRAMEWORK_ID;
        use prost::Message;
        let dir = tempfile::tempdir().unwrap();
        let deploy = agora_proto::v1::FunctionDeploy {
            name: "echo".into(),
            role: "acme".into(),
            ..Default::default()
        };
        {
            // As a master of layout 1 wrote it.
            let db = Database::create(dir.path().join(FILE)).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(META).unwrap().insert("version", 1).unwrap();
            {
                let mut t = w.open_table(ENTRIES).unwrap();
                let function = format!(
                    "{{\"deploy_hex\":\"{}\"}}",
                    hex::encode(deploy.encode_to_vec())
                );
                t.insert(("function", "echo"), function.as_bytes()).unwrap();
                t.insert(
                    ("tenant-limit", "acme"),
                    &br#"{"max_concurrency":4,"queue_len":8,"max_queue_wait_ms":500}"#[..],
                )
                .unwrap();
                t.insert(("functions-framework", ""), &br#""m-F0001""#[..])
                    .unwrap();
                t.insert(("weight", "eng"), &b"3.0"[..]).unwrap();
            }
            w.commit().unwrap();
        }
        let (_, reg) = RegistryStore::open(dir.path()).unwrap();
        let state = &reg.framework_state[FRAMEWORK_ID];
        assert_eq!(state.len(), 2, "{state:?}");
        let back =
            agora_proto::v1::FunctionDeploy::decode(state["function/echo"].as_slice()).unwrap();
        assert_eq!(back, deploy);
        let limit = agora_proto::v1::TenantLimit::decode(state["tenant/acme"].as_slice()).unwrap();
        assert_eq!(
            (
                limit.role.as_str(),
                limit.max_concurrency,
                limit.queue_len,
                limit.max_queue_wait_ms
            ),
            ("acme", 4, 8, 500)
        );
        assert_eq!(reg.weights["eng"], 3.0, "the rest is read as before");
        // Migrated once: the file now has layout 3.
        let (_, again) = RegistryStore::open(dir.path()).unwrap();
        assert_eq!(again, reg);
    }

    #[test]
    fn removed_framework_ids_are_bounded_oldest_first() {
        let mut reg = Registry::default();
        for i in 0..(MAX_REMOVED_FRAMEWORKS as u64 + 5) {
            reg.apply(&RegistryOp::RemoveFramework {
                framework_id: format!("f{i:06}"),
                removed_ms: i,
            });
        }
        assert_eq!(reg.removed_frameworks.len(), MAX_REMOVED_FRAMEWORKS);
        assert!(!reg.removed_frameworks.contains_key("f000000"));
        assert!(reg.removed_frameworks.contains_key("f000005"));
    }

    #[test]
    fn an_unknown_layout_version_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(FILE)).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(META).unwrap().insert("version", 99).unwrap();
            w.commit().unwrap();
        }
        let err = RegistryStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("layout version 99"), "{err}");
        assert!(err.contains("move the file away"), "{err}");
    }
}
