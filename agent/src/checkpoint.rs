//! The checkpoint's file, `<work>/checkpoint.redb`: where the records the agent core
//! decides on ([`CheckpointDelta`], defined with the core) are kept durably. The shell
//! writes each delta before it acts on the outputs of the same input, so an update is
//! on disk before it is sent (at-least-once delivery across restarts).

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

pub use agora_agent_core::checkpoint::*;

use crate::error::{Error, Result};

/// File name under the agent's work dir.
pub const FILE: &str = "checkpoint.redb";

/// Layout version; an agent refuses a checkpoint with a version it does not know.
const VERSION: u32 = 1;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TASKS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tasks");
const EXECUTORS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("executors");
/// Tasks that ended and were acknowledged (`CompletedTask`), by sequence number.
const COMPLETED: TableDefinition<u64, &[u8]> = TableDefinition::new("completed");
const META_KEY: &str = "meta";

/// The checkpoint file.
pub struct Checkpoint {
    db: Database,
    path: PathBuf,
}

impl Checkpoint {
    /// Opens (or creates) `<work_dir>/checkpoint.redb`.
    pub fn open(work_dir: &Path) -> Result<Checkpoint> {
        let path = work_dir.join(FILE);
        let db = Database::create(&path).map_err(|cause| Error::CheckpointOpen {
            path: path.clone(),
            cause,
        })?;
        let cp = Checkpoint { db, path };
        // Make sure the tables exist, so that readers never meet a missing table.
        let tx = cp.db.begin_write()?;
        {
            tx.open_table(META)?;
            tx.open_table(TASKS)?;
            tx.open_table(EXECUTORS)?;
            tx.open_table(COMPLETED)?;
        }
        tx.commit()?;
        Ok(cp)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything recorded.
    pub fn load(&self) -> Result<CheckpointState> {
        let bad = |what: &'static str, cause: prost::DecodeError| Error::CheckpointRecord {
            path: self.path.clone(),
            what,
            cause,
        };
        let tx = self.db.begin_read()?;
        let mut state = CheckpointState::default();
        let meta = tx.open_table(META)?;
        if let Some(v) = meta.get(META_KEY)? {
            let m = MetaRecord::decode(v.value()).map_err(|e| bad("meta", e))?;
            if m.version != VERSION {
                return Err(Error::CheckpointVersion {
                    path: self.path.clone(),
                    found: m.version,
                    known: VERSION,
                });
            }
            state.agent_id = Some(m.agent_id).filter(|s| !s.is_empty());
            state.update_seq = m.update_seq;
        }
        let tasks = tx.open_table(TASKS)?;
        for row in tasks.iter()? {
            let (k, v) = row?;
            let (fw, task) = k.value();
            let r = TaskRecord::decode(v.value()).map_err(|e| bad("task", e))?;
            state.tasks.insert((fw.to_string(), task.to_string()), r);
        }
        let execs = tx.open_table(EXECUTORS)?;
        for row in execs.iter()? {
            let (k, v) = row?;
            let (fw, ex) = k.value();
            let r = ExecutorRecord::decode(v.value()).map_err(|e| bad("executor", e))?;
            state.executors.insert((fw.to_string(), ex.to_string()), r);
        }
        let done = tx.open_table(COMPLETED)?;
        for row in done.iter()? {
            let (k, v) = row?;
            let r = agora_proto::v1::CompletedTask::decode(v.value())
                .map_err(|e| bad("completed task", e))?;
            state.completed.insert(k.value(), r);
        }
        Ok(state)
    }

    /// Writes one delta in one transaction (with an fsync when `delta.durable`).
    pub fn write(&self, delta: &CheckpointDelta) -> Result<()> {
        self.write_all(std::slice::from_ref(delta), delta.durable)
    }

    /// Writes deltas, in order, in one transaction (with an fsync when `durable`).
    pub fn write_all(&self, deltas: &[CheckpointDelta], durable: bool) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        {
            let mut meta = tx.open_table(META)?;
            if let Some(last) = deltas.last() {
                let m = MetaRecord {
                    version: VERSION,
                    agent_id: last.agent_id.clone().unwrap_or_default(),
                    update_seq: last.update_seq,
                };
                meta.insert(META_KEY, m.encode_to_vec().as_slice())?;
            }
            let mut tasks = tx.open_table(TASKS)?;
            let mut execs = tx.open_table(EXECUTORS)?;
            let mut done = tx.open_table(COMPLETED)?;
            for delta in deltas {
                for (k, r) in &delta.completed {
                    match r {
                        Some(r) => {
                            done.insert(*k, r.encode_to_vec().as_slice())?;
                        }
                        None => {
                            done.remove(*k)?;
                        }
                    }
                }
                for ((fw, id), r) in &delta.tasks {
                    match r {
                        Some(r) => {
                            tasks
                                .insert((fw.as_str(), id.as_str()), r.encode_to_vec().as_slice())?;
                        }
                        None => {
                            tasks.remove((fw.as_str(), id.as_str()))?;
                        }
                    }
                }
                for ((fw, id), r) in &delta.executors {
                    match r {
                        Some(r) => {
                            execs
                                .insert((fw.as_str(), id.as_str()), r.encode_to_vec().as_slice())?;
                        }
                        None => {
                            execs.remove((fw.as_str(), id.as_str()))?;
                        }
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Makes every earlier write durable (an empty durable commit).
    pub fn sync(&self) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.commit()?;
        Ok(())
    }
}

/// Group commit over a [`Checkpoint`]. The shell queues each input's delta while it
/// holds the core (so deltas queue in the order they were made) and, before acting on
/// that input's outputs, waits until every durable delta queued so far is on disk.
/// Whoever waits first writes everything queued in one transaction with one fsync,
/// so inputs handled at the same time share it; deltas that need not be durable ride
/// along with the next write (or `flush`).
pub struct Writer {
    checkpoint: Checkpoint,
    state: Mutex<WriterState>,
    synced_cv: Condvar,
}

#[derive(Default)]
struct WriterState {
    queue: Vec<CheckpointDelta>,
    /// Tickets: the number of deltas queued so far.
    queued: u64,
    /// Every delta with a lower ticket is on disk.
    synced: u64,
    /// The ticket after the last durable delta queued.
    durable_upto: u64,
    /// Someone is writing.
    busy: bool,
    /// Transactions written with an fsync (for tests and tuning).
    syncs: u64,
}

/// What to wait for before acting on an input's outputs (see [`Writer::settle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl Writer {
    pub fn new(checkpoint: Checkpoint) -> Writer {
        Writer {
            checkpoint,
            state: Mutex::default(),
            synced_cv: Condvar::new(),
        }
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    fn lock(&self) -> MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a delta (call in the order the deltas were made) and says what must be
    /// on disk before the outputs of the same input are acted on: every durable delta
    /// queued so far, this one included.
    pub fn submit(&self, delta: Option<CheckpointDelta>) -> Ticket {
        let mut st = self.lock();
        if let Some(d) = delta {
            st.queued += 1;
            if d.durable {
                st.durable_upto = st.queued;
            }
            st.queue.push(d);
        }
        Ticket(st.durable_upto)
    }

    /// Returns once everything the ticket asks for is on disk, writing it if nobody
    /// else is. An error is that of the write that should have made it so.
    pub fn settle(&self, ticket: Ticket) -> Result<()> {
        let mut st = self.lock();
        loop {
            if st.synced >= ticket.0 {
                return Ok(());
            }
            if !st.busy {
                return self.write_queue(st, true);
            }
            st = self
                .synced_cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Writes what is queued, if anything and if nobody is writing (with an fsync
    /// only when some of it must be durable). For a timer, so that the file does not
    /// lag behind an idle agent.
    pub fn flush(&self) -> Result<()> {
        let st = self.lock();
        if st.busy || st.queue.is_empty() {
            return Ok(());
        }
        let durable = st.durable_upto > st.synced;
        self.write_queue(st, durable)
    }

    /// Everything written so far made durable (at a clean stop).
    pub fn sync(&self) -> Result<()> {
        let mut st = self.lock();
        while st.busy {
            st = self
                .synced_cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if st.queue.is_empty() {
            drop(st);
            return self.checkpoint.sync();
        }
        self.write_queue(st, true)
    }

    /// Number of fsynced transactions so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Writes the whole queue in one transaction, as the only writer.
    fn write_queue(&self, mut st: MutexGuard<'_, WriterState>, durable: bool) -> Result<()> {
        let batch = std::mem::take(&mut st.queue);
        let upto = st.queued;
        st.busy = true;
        drop(st);
        let result = self.checkpoint.write_all(&batch, durable);
        let mut st = self.lock();
        st.busy = false;
        match &result {
            Ok(()) if durable => {
                // Also made durable: every non-durable write before it.
                st.synced = upto;
                st.syncs += 1;
            }
            Ok(()) => {}
            // Kept for the next attempt (each waiter tries once and reports).
            Err(_) => {
                let later = std::mem::replace(&mut st.queue, batch);
                st.queue.extend(later);
            }
        }
        self.synced_cv.notify_all();
        result
    }
}
