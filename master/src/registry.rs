//! The registry's file: `<data dir>/registry.redb`, where the records the master
//! core decides on ([`RegistryOp`], defined with the core) are kept durably.
//!
//! The shell writes every op of one input in one durable transaction before it sends
//! any message of that input (see `server.rs`).

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;

pub use agora_master_core::registry::*;

/// File name under the master's data dir.
pub const FILE: &str = "registry.redb";

/// Layout version; a master refuses a registry with a version it does not know.
const VERSION: u64 = 1;

/// (kind, key) -> JSON of the entry.
const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Where a (kind, key) pair lives and what it holds, for the file.
fn entry_of(op: &RegistryOp) -> (&'static str, String, Option<Vec<u8>>) {
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
        RegistryOp::PutFunction { name, entry } => ("function", name.clone(), json(entry)),
        RegistryOp::RemoveFunction { name } => ("function", name.clone(), None),
        RegistryOp::SetTenantLimit { role, limit } => {
            ("tenant-limit", role.clone(), limit.as_ref().and_then(json))
        }
        RegistryOp::SetFunctionsFramework { framework_id } => (
            "functions-framework",
            String::new(),
            (!framework_id.is_empty())
                .then(|| json(framework_id))
                .flatten(),
        ),
        RegistryOp::TellLost {
            framework_id,
            task_id,
            at_ms,
        } => ("lost", format!("{framework_id}\0{task_id}"), json(at_ms)),
    }
}

/// The registry file.
pub struct RegistryStore {
    db: Database,
    path: PathBuf,
    /// Mirror of the file, to keep the removed-framework set bounded there too.
    state: Registry,
}

impl RegistryStore {
    /// Opens (or creates) `<dir>/registry.redb` and reads what it holds.
    pub fn open(dir: &Path) -> anyhow::Result<(RegistryStore, Registry)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(FILE);
        let db = Database::create(&path).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the master registry {}: {e} (is another master using this data dir?)",
                path.display()
            )
        })?;
        let state = Self::read(&db, &path)?;
        Ok((
            RegistryStore {
                db,
                path,
                state: state.clone(),
            },
            state,
        ))
    }

    fn read(db: &Database, path: &Path) -> anyhow::Result<Registry> {
        let bad = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("master registry {} is unreadable: {e}", path.display())
        };
        {
            let w = db.begin_write().map_err(|e| bad(&e))?;
            {
                let mut meta = w.open_table(META).map_err(|e| bad(&e))?;
                let v = meta.get("version").map_err(|e| bad(&e))?.map(|g| g.value());
                match v {
                    None => {
                        meta.insert("version", VERSION).map_err(|e| bad(&e))?;
                    }
                    Some(VERSION) => {}
                    Some(other) => anyhow::bail!(
                        "master registry {} has layout version {other}; this master knows {VERSION}. \
                         Use the master release that wrote it, or move the file away to start empty",
                        path.display()
                    ),
                }
                w.open_table(ENTRIES).map_err(|e| bad(&e))?;
            }
            w.commit().map_err(|e| bad(&e))?;
        }
        let r = db.begin_read().map_err(|e| bad(&e))?;
        let t = r.open_table(ENTRIES).map_err(|e| bad(&e))?;
        let mut reg = Registry::default();
        for row in t.iter().map_err(|e| bad(&e))? {
            let (k, v) = row.map_err(|e| bad(&e))?;
            let (kind, key) = k.value();
            let (kind, key) = (kind.to_string(), key.to_string());
            let bytes = v.value();
            let what = format!("entry {kind}/{key}");
            let de_err = |e: serde_json::Error| bad(&format!("{what}: {e}"));
            match kind.as_str() {
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
                "function" => {
                    reg.functions
                        .insert(key, serde_json::from_slice(bytes).map_err(de_err)?);
                }
                "tenant-limit" => {
                    reg.tenant_limits
                        .insert(key, serde_json::from_slice(bytes).map_err(de_err)?);
                }
                "functions-framework" => {
                    reg.functions_framework = Some(serde_json::from_slice(bytes).map_err(de_err)?);
                }
                "lost" => {
                    let Some((fid, tid)) = key.split_once('\0') else {
                        return Err(bad(&format!("{what}: no framework/task separator")));
                    };
                    reg.lost_tasks.insert(
                        (fid.to_string(), tid.to_string()),
                        serde_json::from_slice(bytes).map_err(de_err)?,
                    );
                }
                other => tracing::warn!("master registry: ignoring unknown entry kind {other}"),
            }
        }
        Ok(reg)
    }

    /// Writes `ops` in one durable transaction (fsync before it returns).
    pub fn commit(&mut self, ops: &[RegistryOp]) -> anyhow::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let err = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("writing the master registry {}: {e}", self.path.display())
        };
        let before: Vec<String> = self.state.removed_frameworks.keys().cloned().collect();
        let lost_before: Vec<(String, String)> = self.state.lost_tasks.keys().cloned().collect();
        for op in ops {
            self.state.apply(op);
        }
        let w = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut t = w.open_table(ENTRIES).map_err(|e| err(&e))?;
            for op in ops {
                let (kind, key, value) = entry_of(op);
                match value {
                    Some(v) => {
                        t.insert((kind, key.as_str()), v.as_slice())
                            .map_err(|e| err(&e))?;
                    }
                    None => {
                        t.remove((kind, key.as_str())).map_err(|e| err(&e))?;
                    }
                }
                if let RegistryOp::RemoveFramework { framework_id, .. } = op {
                    t.remove(("framework", framework_id.as_str()))
                        .map_err(|e| err(&e))?;
                }
                if let RegistryOp::RemoveAgent { agent_id } = op {
                    t.remove(("reservations", agent_id.as_str()))
                        .map_err(|e| err(&e))?;
                }
            }
            // Removed ids the bound pushed out of the set leave the file too.
            for id in before {
                if !self.state.removed_frameworks.contains_key(&id) {
                    t.remove(("removed", id.as_str())).map_err(|e| err(&e))?;
                }
            }
            for k in lost_before {
                if !self.state.lost_tasks.contains_key(&k) {
                    let key = format!("{}\0{}", k.0, k.1);
                    t.remove(("lost", key.as_str())).map_err(|e| err(&e))?;
                }
            }
        }
        w.commit().map_err(|e| err(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ops() -> Vec<RegistryOp> {
        vec![
            RegistryOp::PutAgent {
                agent_id: "a1".into(),
                entry: AgentEntry {
                    hostname: "h1".into(),
                    unreachable: false,
                    token: "t1".into(),
                },
            },
            RegistryOp::PutAgent {
                agent_id: "a2".into(),
                entry: AgentEntry {
                    hostname: "h2".into(),
                    unreachable: false,
                    token: String::new(),
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
    fn functions_and_the_functions_framework_id_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = RegistryStore::open(dir.path()).unwrap();
        let entry = |hex: &str| FunctionEntry {
            deploy_hex: hex.into(),
        };
        let limit = |n: u32| TenantLimitEntry {
            max_concurrency: n,
            queue_len: 2 * n,
            max_queue_wait_ms: 500,
        };
        store
            .commit(&[
                RegistryOp::PutFunction {
                    name: "echo".into(),
                    entry: entry("0a04"),
                },
                RegistryOp::PutFunction {
                    name: "gone".into(),
                    entry: entry("0a05"),
                },
                RegistryOp::SetFunctionsFramework {
                    framework_id: "fw-1".into(),
                },
                RegistryOp::SetTenantLimit {
                    role: "tenant-a".into(),
                    limit: Some(limit(4)),
                },
                RegistryOp::SetTenantLimit {
                    role: "tenant-b".into(),
                    limit: Some(limit(2)),
                },
            ])
            .unwrap();
        store
            .commit(&[
                RegistryOp::PutFunction {
                    name: "echo".into(),
                    entry: entry("0a06"),
                },
                RegistryOp::RemoveFunction {
                    name: "gone".into(),
                },
                RegistryOp::SetTenantLimit {
                    role: "tenant-b".into(),
                    limit: None,
                },
            ])
            .unwrap();
        drop(store);
        let (mut store, reg) = RegistryStore::open(dir.path()).unwrap();
        assert_eq!(
            reg.tenant_limits,
            BTreeMap::from([("tenant-a".to_string(), limit(4))]),
            "a removed limit stays removed"
        );
        assert_eq!(reg.functions.len(), 1);
        assert_eq!(reg.functions["echo"], entry("0a06"), "a replace wins");
        assert_eq!(reg.functions_framework.as_deref(), Some("fw-1"));
        store
            .commit(&[RegistryOp::SetFunctionsFramework {
                framework_id: String::new(),
            }])
            .unwrap();
        drop(store);
        let (_, reg) = RegistryStore::open(dir.path()).unwrap();
        assert_eq!(reg.functions_framework, None);
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
