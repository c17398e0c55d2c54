//! The master's Raft log, vote and state machine, kept in the registry's own file
//! (`<data dir>/registry.redb`, layout 3) next to the registry entries they produce:
//!
//! | table | key → value |
//! |---|---|
//! | `raft_log` | log index → JSON of the entry |
//! | `raft_meta` | `vote`, `committed`, `purged`, `cluster`, `node` → JSON |
//! | `entries` | the registry (see `registry.rs`): the state machine |
//! | `raft_sm` | `applied`, `membership` → JSON, written with `entries` |
//! | `raft_snapshot` | `meta`, `data`: the last snapshot built or installed |
//!
//! One file, so an applied index is atomic with the registry it describes. Log
//! appends and votes are fsynced before openraft is told they are flushed; applies
//! are not (the next append's fsync carries them; after a crash openraft applies
//! the lost tail again from the log, and applying is deterministic).
//!
//! redb blocks, so every call runs on tokio's blocking pool.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::TryStreamExt;
use openraft::storage::{EntryResponder, RaftLogStorage, RaftStateMachine};
use openraft::{OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use super::types::*;
use crate::error::{Error, Result};
use crate::registry::{self, Registry};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_sm");
const SNAP: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");

/// Largest snapshot this master builds or accepts (the registry is bounded far
/// below it; see `registry` for its limits).
pub const MAX_SNAPSHOT: usize = 1 << 30;

fn ioe<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::other(e.to_string())
}

#[allow(
    clippy::expect_used,
    reason = "our own records (derived Serialize, map keys strings or integers): serde_json cannot fail on them"
)]
fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("raft records serialize")
}

fn from_json<T: DeserializeOwned>(what: &str, b: &[u8]) -> io::Result<T> {
    serde_json::from_slice(b)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}")))
}

/// Runs a redb call on the blocking pool.
async fn blocking<T: Send + 'static>(
    db: &Arc<Database>,
    f: impl FnOnce(&Database) -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(ioe)?
}

fn get_json<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> io::Result<Option<T>> {
    let r = db.begin_read().map_err(ioe)?;
    let t = r.open_table(table).map_err(ioe)?;
    let v = t.get(key).map_err(ioe)?;
    v.map(|g| from_json(key, g.value())).transpose()
}

/// Who this file belongs to: a hash of the cluster's CA certificate, and the
/// master's id in the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub cluster: String,
    pub node: u64,
}

/// Opens the Raft side of `<dir>/registry.redb`, refusing a file written for another
/// cluster or another master id, or whose log is damaged. Returns the log store and
/// the state machine, which share the file.
pub fn open(dir: &Path, owner: &Owner) -> Result<(LogStore, RegistrySm)> {
    let (db, path) = registry::open_file(dir)?;
    let refuse = |cause: String| Error::RaftLog {
        path: path.clone(),
        cause,
    };
    let w = db.begin_write().map_err(|e| refuse(e.to_string()))?;
    {
        let mut m = w.open_table(META).map_err(|e| refuse(e.to_string()))?;
        let read = |m: &redb::Table<&str, &[u8]>, key: &str| -> Result<Option<Vec<u8>>> {
            Ok(m.get(key)
                .map_err(|e| refuse(e.to_string()))?
                .map(|g| g.value().to_vec()))
        };
        let cluster: Option<String> = read(&m, "cluster")?
            .map(|b| from_json("raft_meta/cluster", &b))
            .transpose()
            .map_err(|e| refuse(e.to_string()))?;
        let node: Option<u64> = read(&m, "node")?
            .map(|b| from_json("raft_meta/node", &b))
            .transpose()
            .map_err(|e| refuse(e.to_string()))?;
        match (cluster, node) {
            (None, None) => {
                m.insert("cluster", to_json(&owner.cluster).as_slice())
                    .map_err(|e| refuse(e.to_string()))?;
                m.insert("node", to_json(&owner.node).as_slice())
                    .map_err(|e| refuse(e.to_string()))?;
            }
            (Some(c), Some(n)) if c == owner.cluster && n == owner.node => {}
            (c, n) => {
                return Err(Error::ForeignLog {
                    path: path.clone(),
                    found: format!(
                        "master {} of the cluster whose CA hashes to {}",
                        n.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                        c.as_deref().unwrap_or("?")
                    ),
                    expected: format!(
                        "master {} of the cluster whose CA hashes to {}",
                        owner.node, owner.cluster
                    ),
                })
            }
        }
        w.open_table(LOG).map_err(|e| refuse(e.to_string()))?;
        w.open_table(SM).map_err(|e| refuse(e.to_string()))?;
        w.open_table(SNAP).map_err(|e| refuse(e.to_string()))?;
    }
    w.commit().map_err(|e| refuse(e.to_string()))?;
    check_log(&db).map_err(|e| refuse(e.to_string()))?;
    let reg = registry::read(&db, &path)?;
    let sm = RegistrySm {
        db: db.clone(),
        path: path.clone(),
        registry: Arc::new(Mutex::new(reg)),
    };
    Ok((LogStore { db, path }, sm))
}

/// Refuses a log that Raft could not trust: an entry that does not decode, an
/// index stored under another key, a gap, or a purge or commit mark beyond the log.
fn check_log(db: &Database) -> io::Result<()> {
    let purged: Option<LogId> = get_json(db, META, "purged")?;
    let committed: Option<Option<LogId>> = get_json(db, META, "committed")?;
    let r = db.begin_read().map_err(ioe)?;
    let t = r.open_table(LOG).map_err(ioe)?;
    let mut prev: Option<u64> = None;
    let mut last: Option<LogId> = purged;
    for row in t.iter().map_err(ioe)? {
        let (k, v) = row.map_err(ioe)?;
        let index = k.value();
        let e: Entry = from_json(&format!("raft_log entry {index}"), v.value())?;
        if e.log_id.index != index {
            return Err(ioe(format!(
                "raft_log entry {index} holds the entry of index {}",
                e.log_id.index
            )));
        }
        if let Some(p) = prev {
            if index != p + 1 {
                return Err(ioe(format!(
                    "raft_log has a gap: entry {} follows entry {p}",
                    index
                )));
            }
        } else if let Some(pu) = purged {
            if index != pu.index + 1 {
                return Err(ioe(format!(
                    "raft_log starts at entry {index} but entries up to {} were purged",
                    pu.index
                )));
            }
        }
        prev = Some(index);
        last = Some(e.log_id);
    }
    if let Some(Some(c)) = committed {
        if last.is_none_or(|l| l.index < c.index) {
            return Err(ioe(format!(
                "raft_meta says entry {} was committed but the log ends at {:?}",
                c.index,
                last.map(|l| l.index)
            )));
        }
    }
    Ok(())
}

/// The log and the vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl LogStore {
    /// The registry file this log lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl RaftLogReader<Agora> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        blocking(&self.db, move |db| {
            let r = db.begin_read().map_err(ioe)?;
            let t = r.open_table(LOG).map_err(ioe)?;
            let mut out = Vec::new();
            for row in t.range::<u64>(range).map_err(ioe)? {
                let (k, v) = row.map_err(ioe)?;
                out.push(from_json(
                    &format!("raft_log entry {}", k.value()),
                    v.value(),
                )?);
            }
            Ok(out)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        blocking(&self.db, |db| get_json(db, META, "vote")).await
    }
}

impl RaftLogStorage<Agora> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState, io::Error> {
        blocking(&self.db, |db| {
            let purged: Option<LogId> = get_json(db, META, "purged")?;
            let r = db.begin_read().map_err(ioe)?;
            let t = r.open_table(LOG).map_err(ioe)?;
            let last = match t.last().map_err(ioe)? {
                Some((k, v)) => Some(
                    from_json::<Entry>(&format!("raft_log entry {}", k.value()), v.value())?.log_id,
                ),
                None => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let vote = to_json(vote);
        blocking(&self.db, move |db| {
            let w = db.begin_write().map_err(ioe)?;
            w.open_table(META)
                .map_err(ioe)?
                .insert("vote", vote.as_slice())
                .map_err(ioe)?;
            w.commit().map_err(ioe)
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not needed for safety (the state machine says what is applied), so not
        // fsynced: the next append carries it.
        let committed = to_json(&committed);
        blocking(&self.db, move |db| {
            let mut w = db.begin_write().map_err(ioe)?;
            w.set_durability(Durability::None).map_err(ioe)?;
            w.open_table(META)
                .map_err(ioe)?
                .insert("committed", committed.as_slice())
                .map_err(ioe)?;
            w.commit().map_err(ioe)
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        blocking(&self.db, |db| {
            Ok(get_json::<Option<LogId>>(db, META, "committed")?.flatten())
        })
        .await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
    {
        let rows: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, to_json(&e)))
            .collect();
        let r = blocking(&self.db, move |db| {
            let w = db.begin_write().map_err(ioe)?;
            {
                let mut t = w.open_table(LOG).map_err(ioe)?;
                for (index, row) in &rows {
                    t.insert(*index, row.as_slice()).map_err(ioe)?;
                }
            }
            // Durable (fsync) before openraft counts the entries as ours.
            w.commit().map_err(ioe)
        })
        .await;
        callback.io_completed(match &r {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        });
        r
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> Result<(), io::Error> {
        let from = last.map(|l| l.index + 1).unwrap_or(0);
        blocking(&self.db, move |db| {
            let w = db.begin_write().map_err(ioe)?;
            w.open_table(LOG)
                .map_err(ioe)?
                .retain_in(from.., |_, _| false)
                .map_err(ioe)?;
            w.commit().map_err(ioe)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let purged = to_json(&Some(log_id));
        blocking(&self.db, move |db| {
            let w = db.begin_write().map_err(ioe)?;
            w.open_table(META)
                .map_err(ioe)?
                .insert("purged", purged.as_slice())
                .map_err(ioe)?;
            w.open_table(LOG)
                .map_err(ioe)?
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(ioe)?;
            w.commit().map_err(ioe)
        })
        .await
    }
}

/// The state machine: the registry, in the file's `entries` table and mirrored in
/// memory for the shell (which rebuilds its core from it on becoming leader).
#[derive(Clone)]
pub struct RegistrySm {
    db: Arc<Database>,
    path: PathBuf,
    registry: Arc<Mutex<Registry>>,
}

impl RegistrySm {
    /// What the registry holds now (everything applied so far).
    pub fn registry(&self) -> Registry {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The registry file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A snapshot's body: the registry's rows, each as three length-prefixed byte
/// strings (kind, key, value).
fn encode_rows(rows: &[(String, String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, key, value) in rows {
        for part in [kind.as_bytes(), key.as_bytes(), value.as_slice()] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

fn decode_rows(mut b: &[u8]) -> io::Result<Vec<(String, String, Vec<u8>)>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot: {why}"));
    let take = |b: &mut &[u8]| -> io::Result<Vec<u8>> {
        let (len, rest) = b
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("truncated length"))?;
        let n = u32::from_be_bytes(*len) as usize;
        let (part, rest) = rest
            .split_at_checked(n)
            .ok_or_else(|| bad("truncated row"))?;
        *b = rest;
        Ok(part.to_vec())
    };
    let mut rows = Vec::new();
    while !b.is_empty() {
        let kind = String::from_utf8(take(&mut b)?).map_err(|_| bad("kind is not UTF-8"))?;
        let key = String::from_utf8(take(&mut b)?).map_err(|_| bad("key is not UTF-8"))?;
        let value = take(&mut b)?;
        rows.push((kind, key, value));
    }
    Ok(rows)
}

impl RaftSnapshotBuilder<Agora> for RegistrySm {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        blocking(&self.db, |db| {
            // One read transaction: the rows and what they have applied agree.
            let (meta, data) = {
                let r = db.begin_read().map_err(ioe)?;
                let sm = r.open_table(SM).map_err(ioe)?;
                let applied: Option<LogId> = sm
                    .get("applied")
                    .map_err(ioe)?
                    .map(|g| from_json("raft_sm/applied", g.value()))
                    .transpose()?;
                let membership: StoredMembership = sm
                    .get("membership")
                    .map_err(ioe)?
                    .map(|g| from_json("raft_sm/membership", g.value()))
                    .transpose()?
                    .unwrap_or_default();
                let rows = registry::dump_entries(&r).map_err(ioe)?;
                let meta = SnapshotMeta {
                    last_log_id: applied,
                    last_membership: membership,
                };
                (meta, encode_rows(&rows))
            };
            if data.len() > MAX_SNAPSHOT {
                return Err(ioe(format!(
                    "the registry is {} bytes, over the snapshot limit of {MAX_SNAPSHOT}",
                    data.len()
                )));
            }
            let w = db.begin_write().map_err(ioe)?;
            {
                let mut s = w.open_table(SNAP).map_err(ioe)?;
                s.insert("meta", to_json(&meta).as_slice()).map_err(ioe)?;
                s.insert("data", data.as_slice()).map_err(ioe)?;
            }
            w.commit().map_err(ioe)?;
            Ok(Snapshot {
                meta,
                snapshot: std::io::Cursor::new(data),
            })
        })
        .await
    }
}

impl RaftStateMachine<Agora> for RegistrySm {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        blocking(&self.db, |db| {
            let applied: Option<LogId> = get_json(db, SM, "applied")?;
            let membership: StoredMembership = get_json(db, SM, "membership")?.unwrap_or_default();
            Ok((applied, membership))
        })
        .await
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<Agora>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let all: Vec<EntryResponder<Agora>> = entries.try_collect().await?;
        let registry = self.registry.clone();
        let path = self.path.clone();
        let (entries, responders): (Vec<Entry>, Vec<_>) = all.into_iter().unzip();
        blocking(&self.db, move |db| {
            // Everything ready goes in one transaction. Not fsynced: see the module.
            let mut w = db.begin_write().map_err(ioe)?;
            w.set_durability(Durability::None).map_err(ioe)?;
            let mut reg = registry.lock().unwrap_or_else(PoisonError::into_inner);
            // Applied to a copy: a failed write leaves the mirror as the file is.
            let mut next = reg.clone();
            {
                let mut m = w.open_table(SM).map_err(ioe)?;
                for entry in &entries {
                    match &entry.payload {
                        EntryPayload::Blank => {}
                        EntryPayload::Normal(RegistryBatch(ops)) => {
                            registry::apply_ops(&w, &mut next, ops).map_err(|e| {
                                ioe(format!(
                                    "applying entry {} to {}: {e}",
                                    entry.log_id.index,
                                    path.display()
                                ))
                            })?;
                        }
                        EntryPayload::Membership(mem) => {
                            let sm = StoredMembership::new(Some(entry.log_id), mem.clone());
                            m.insert("membership", to_json(&sm).as_slice())
                                .map_err(ioe)?;
                        }
                    }
                }
                if let Some(last) = entries.last() {
                    m.insert("applied", to_json(&Some(last.log_id)).as_slice())
                        .map_err(ioe)?;
                }
            }
            w.commit().map_err(ioe)?;
            *reg = next;
            Ok(())
        })
        .await?;
        for r in responders.into_iter().flatten() {
            r.send(());
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let rows = decode_rows(&data)?;
        let meta = meta.clone();
        let registry = self.registry.clone();
        blocking(&self.db, move |db| {
            let w = db.begin_write().map_err(ioe)?;
            let reg = registry::replace_entries(&w, &rows)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            {
                let mut m = w.open_table(SM).map_err(ioe)?;
                m.insert("applied", to_json(&meta.last_log_id).as_slice())
                    .map_err(ioe)?;
                m.insert("membership", to_json(&meta.last_membership).as_slice())
                    .map_err(ioe)?;
                let mut s = w.open_table(SNAP).map_err(ioe)?;
                s.insert("meta", to_json(&meta).as_slice()).map_err(ioe)?;
                s.insert("data", data.as_slice()).map_err(ioe)?;
            }
            w.commit().map_err(ioe)?;
            *registry.lock().unwrap_or_else(PoisonError::into_inner) = reg;
            Ok(())
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        blocking(&self.db, |db| {
            let r = db.begin_read().map_err(ioe)?;
            let s = r.open_table(SNAP).map_err(ioe)?;
            let (Some(meta), Some(data)) =
                (s.get("meta").map_err(ioe)?, s.get("data").map_err(ioe)?)
            else {
                return Ok(None);
            };
            Ok(Some(Snapshot {
                meta: from_json::<SnapshotMeta>("raft_snapshot/meta", meta.value())?,
                snapshot: std::io::Cursor::new(data.value().to_vec()),
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryStore;
    use openraft::storage::RaftLogStorage;
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::StorageError;

    fn owner() -> Owner {
        Owner {
            cluster: "c0ffee".into(),
            node: 1,
        }
    }

    struct Builder;

    impl StoreBuilder<Agora, LogStore, RegistrySm, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, RegistrySm), StorageError<Agora>> {
            let dir = tempfile::tempdir().expect("temp dir");
            let (log, sm) = open(dir.path(), &owner()).expect("open");
            Ok((dir, log, sm))
        }
    }

    /// openraft's own contract for log and state machine storage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_keeps_openraft_storage_contract() {
        Suite::test_all(Builder)
            .await
            .expect("openraft storage suite");
    }

    fn entry(index: u64, payload: EntryPayload) -> Entry {
        Entry {
            log_id: openraft::testing::log_id::<Agora>(1, 1, index),
            payload,
        }
    }

    async fn apply(sm: &mut RegistrySm, entries: Vec<Entry>) {
        let stream = futures_util::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
        sm.apply(stream).await.expect("apply");
    }

    #[tokio::test]
    async fn ops_applied_through_raft_give_the_registry_a_direct_commit_gives() {
        let direct = tempfile::tempdir().unwrap();
        let (mut store, _) = RegistryStore::open(direct.path()).unwrap();
        let ops = crate::registry::tests::ops();
        store.commit(&ops[..2]).unwrap();
        store.commit(&ops[2..]).unwrap();
        drop(store);
        let (_, want) = RegistryStore::open(direct.path()).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = open(dir.path(), &owner()).unwrap();
        apply(
            &mut sm,
            vec![
                entry(1, EntryPayload::Blank),
                entry(2, EntryPayload::Normal(RegistryBatch(ops[..2].to_vec()))),
                entry(3, EntryPayload::Normal(RegistryBatch(ops[2..].to_vec()))),
            ],
        )
        .await;
        assert_eq!(sm.registry(), want, "the mirror");
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
        drop(sm);
        let (_, mut sm) = open(dir.path(), &owner()).unwrap();
        assert_eq!(sm.registry(), want, "the file, reopened");

        // A snapshot carries it to another master whole.
        let snap = sm.build_snapshot().await.unwrap();
        let other = tempfile::tempdir().unwrap();
        let (_, mut sm2) = open(other.path(), &Owner { node: 2, ..owner() }).unwrap();
        sm2.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(sm2.registry(), want);
        assert_eq!(
            sm2.applied_state().await.unwrap().0.map(|l| l.index),
            Some(3)
        );
    }

    #[tokio::test]
    async fn a_truncated_snapshot_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = open(dir.path(), &owner()).unwrap();
        apply(
            &mut sm,
            vec![entry(
                1,
                EntryPayload::Normal(RegistryBatch(crate::registry::tests::ops())),
            )],
        )
        .await;
        let before = sm.registry();
        let snap = sm.build_snapshot().await.unwrap();
        let mut bytes = snap.snapshot.into_inner();
        bytes.truncate(bytes.len() - 3);
        let err = sm
            .install_snapshot(&snap.meta, std::io::Cursor::new(bytes))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("snapshot: truncated"), "{err}");
        assert_eq!(sm.registry(), before);
    }

    #[tokio::test]
    async fn a_layout_2_registry_opens_as_the_state_machine() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _) = RegistryStore::open(dir.path()).unwrap();
            store.commit(&crate::registry::tests::ops()).unwrap();
            // As a layout-2 master left it: no Raft tables, version 2.
            let db = &store_db(&store);
            let w = db.begin_write().unwrap();
            w.open_table(TableDefinition::<&str, u64>::new("meta"))
                .unwrap()
                .insert("version", 2)
                .unwrap();
            w.delete_table(LOG).ok();
            w.delete_table(META).ok();
            w.delete_table(SM).ok();
            w.delete_table(SNAP).ok();
            w.commit().unwrap();
        }
        let (mut log, sm) = open(dir.path(), &owner()).unwrap();
        let mut want = Registry::default();
        for op in crate::registry::tests::ops() {
            want.apply(&op);
        }
        assert_eq!(sm.registry(), want);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(
            state.last_log_id, None,
            "an empty log: a group to initialize"
        );
    }

    fn store_db(store: &RegistryStore) -> Arc<Database> {
        store.database()
    }

    #[tokio::test]
    async fn a_file_of_another_cluster_or_master_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path(), &owner()).unwrap());
        let err = open(
            dir.path(),
            &Owner {
                cluster: "beef".into(),
                node: 1,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("Raft log of master 1 of the cluster whose CA hashes to c0ffee"),
            "{err}"
        );
        assert!(
            err.contains("this is master 1 of the cluster whose CA hashes to beef"),
            "{err}"
        );
        let err = open(dir.path(), &Owner { node: 2, ..owner() })
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("this is master 2"), "{err}");
        // The right owner still opens it.
        open(dir.path(), &owner()).unwrap();
    }

    #[tokio::test]
    async fn a_damaged_log_is_refused_naming_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), &owner()).unwrap();
        let entries: Vec<Entry> = (1..=3).map(|i| entry(i, EntryPayload::Blank)).collect();
        log.append(entries, IOFlushed::noop()).await.unwrap();
        let db = log.db.clone();
        drop(log);
        {
            let w = db.begin_write().unwrap();
            w.open_table(LOG)
                .unwrap()
                .insert(2u64, &b"{not json"[..])
                .unwrap();
            w.commit().unwrap();
        }
        drop(db);
        let err = open(dir.path(), &owner()).err().unwrap().to_string();
        assert!(err.contains("raft_log entry 2"), "{err}");
        assert!(err.contains("refusing to serve from it"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), &owner()).unwrap();
        let entries: Vec<Entry> = [1, 2, 4].map(|i| entry(i, EntryPayload::Blank)).into();
        log.append(entries, IOFlushed::noop()).await.unwrap();
        drop(log);
        let err = open(dir.path(), &owner()).err().unwrap().to_string();
        assert!(err.contains("gap: entry 4 follows entry 2"), "{err}");
    }
}
