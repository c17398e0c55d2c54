//! A wasm task's disk limit, enforced in front of WASI so that the guest sees ENOSPC
//! ("no space left on device") when a write or a create would take its sandbox past
//! its limits, and the task fails with `REASON_DISK_LIMIT` if it then fails.
//!
//! Two halves: [`rewrite`] wraps a guest's sandbox-growing WASI imports, once per
//! module before it is compiled, so that each such call first calls one of the host
//! functions [`add_to_linker`] defines; those charge the task's [`DiskQuota`] and
//! answer 0 (go on) or `ERRNO_NOSPC` (the guest's call returns that, and wasmtime-wasi
//! never sees it). See `rewrite.rs` for why the call has to pass through the guest.
//!
//! The quota charges what a call names: the bytes of a write, rounded up to whole
//! 4 KiB blocks (so a scatter of one-byte writes into a sparse file cannot allocate
//! thousands of times what it is charged), and one entry per create (opening an
//! existing file with `O_CREAT` counts as one). That is cheap and never too little.
//! The task's first charge measures the sandbox (`agora_executor_link::disk::measure`)
//! so that its inputs count; after that, only a charge that would pass a limit
//! measures again, and starts from what the sandbox really holds. A guest that writes
//! no file pays nothing; one far from its limits pays a counter per call.
//!
//! Writes to the standard streams (fds 0-2) are not charged: they go to the task's
//! capped output files, outside its root. Once the guest closes one of them or
//! renumbers another descriptor onto it (so fd 1 may now be a file of the sandbox),
//! writes to that fd are charged like any other.

mod rewrite;

use std::path::PathBuf;

use agora_executor_link::disk::{measure, DiskExceeded, DiskLimits, DiskUse};
use wasmtime::{Caller, Extern, Linker};

use crate::runner::TaskCtx;
pub(crate) use rewrite::{rewrite, DISK_MODULE, REWRITE_VERSION};

/// WASI preview 1 errno `nospc`.
const ERRNO_NOSPC: i32 = 51;
/// `oflags::creat`.
const OFLAGS_CREAT: i32 = 1;
/// What one write is charged at least, and the unit it is rounded up to: a
/// filesystem block.
const BLOCK: u64 = 4096;

/// One task's disk accounting.
pub(crate) struct DiskQuota {
    /// The host directory preopened as the guest's `/`; `None`: no filesystem.
    root: Option<PathBuf>,
    limits: DiskLimits,
    /// Bytes and entries charged: at least what the sandbox holds. `None` until the
    /// first charge, which measures the sandbox (so the inputs count).
    charged: Option<DiskUse>,
    /// The limit a refused call went past, first one kept.
    exceeded: Option<DiskExceeded>,
    /// Standard streams the guest closed or renumbered over: writes to them are
    /// charged from then on.
    released_stdio: [bool; 3],
}

impl DiskQuota {
    pub(crate) fn new(root: Option<PathBuf>, limits: DiskLimits) -> Self {
        DiskQuota {
            root,
            limits,
            charged: None,
            exceeded: None,
            released_stdio: [false; 3],
        }
    }

    pub(crate) fn none() -> Self {
        Self::new(None, DiskLimits::default())
    }

    /// The limit a call of the guest's was refused at, if any.
    pub(crate) fn exceeded(&self) -> Option<DiskExceeded> {
        self.exceeded
    }

    /// What the sandbox holds at the task's end, for its usage report: measured when
    /// the guest wrote or created anything there (it already paid one walk for its
    /// first charge); a guest that did not is not walked, and reports nothing.
    pub(crate) fn final_use(&self) -> DiskUse {
        match self.charged {
            Some(_) => self.measure_now(),
            None => DiskUse::default(),
        }
    }

    /// What the sandbox holds, measured; what was charged when it cannot be.
    fn measure_now(&self) -> DiskUse {
        let charged = self.charged.unwrap_or_default();
        match &self.root {
            Some(root) => measure(root, self.limits.walk_bound()).unwrap_or(charged),
            None => charged,
        }
    }

    /// Charges `bytes` and `files` about to be added; false (and nothing charged) when
    /// the sandbox would then go past a limit.
    pub(crate) fn charge(&mut self, bytes: u64, files: u64) -> bool {
        if self.limits == DiskLimits::default() {
            return true;
        }
        let after = |c: DiskUse| DiskUse {
            bytes: c.bytes.saturating_add(bytes),
            files: c.files.saturating_add(files),
            truncated: false,
        };
        if let Some(charged) = self.charged {
            if self.limits.exceeded(after(charged)).is_none() {
                self.charged = Some(after(charged));
                return true;
            }
        }
        // The first charge, or near a limit: count what is really there.
        let now = self.measure_now();
        self.charged = Some(now);
        match self.limits.exceeded(after(now)) {
            None => {
                self.charged = Some(after(now));
                true
            }
            Some(e) => {
                tracing::debug!(limit = %e, "a guest's write or create refused");
                self.exceeded.get_or_insert(e);
                false
            }
        }
    }

    /// Whether a write to `fd` is charged: not without limits, nor to a standard
    /// stream the guest has not replaced.
    fn charges_writes_to(&self, fd: u32) -> bool {
        self.limits != DiskLimits::default() && !self.is_unreleased_stdio(fd)
    }

    /// A write of `len` bytes to `fd`.
    fn charge_write(&mut self, fd: u32, len: u64) -> bool {
        if len == 0 || !self.charges_writes_to(fd) {
            return true;
        }
        self.charge(len.div_ceil(BLOCK).saturating_mul(BLOCK), 0)
    }

    fn is_unreleased_stdio(&self, fd: u32) -> bool {
        usize::try_from(fd)
            .ok()
            .and_then(|i| self.released_stdio.get(i))
            .is_some_and(|released| !released)
    }

    fn release_fd(&mut self, fd: u32) {
        if let Some(released) = usize::try_from(fd)
            .ok()
            .and_then(|i| self.released_stdio.get_mut(i))
        {
            *released = true;
        }
    }
}

/// 0, or the errno a refused charge gives the guest.
fn errno(allowed: bool) -> i32 {
    if allowed {
        0
    } else {
        ERRNO_NOSPC
    }
}

/// Defines the [`DISK_MODULE`] functions the rewritten guests call.
pub(crate) fn add_to_linker(linker: &mut Linker<TaskCtx>) -> wasmtime::Result<()> {
    use rewrite::charge;
    linker.func_wrap(
        DISK_MODULE,
        charge::WRITE,
        |mut caller: Caller<'_, TaskCtx>, fd: i32, iovs: i32, n: i32| -> i32 {
            // Output to the standard streams (most writes) costs no look at memory.
            if !caller.data().disk.charges_writes_to(fd as u32) {
                return 0;
            }
            let len = first_ciovec_len(&mut caller, iovs as u32, n as u32);
            errno(caller.data_mut().disk.charge_write(fd as u32, len))
        },
    )?;
    linker.func_wrap(
        DISK_MODULE,
        charge::OPEN,
        |mut caller: Caller<'_, TaskCtx>, oflags: i32| -> i32 {
            errno(oflags & OFLAGS_CREAT == 0 || caller.data_mut().disk.charge(0, 1))
        },
    )?;
    linker.func_wrap(
        DISK_MODULE,
        charge::CREATE,
        // A directory takes a block as it is made; a symlink's target may.
        |mut caller: Caller<'_, TaskCtx>| -> i32 { errno(caller.data_mut().disk.charge(BLOCK, 1)) },
    )?;
    linker.func_wrap(
        DISK_MODULE,
        charge::RELEASE_FD,
        |mut caller: Caller<'_, TaskCtx>, fd: i32| -> i32 {
            caller.data_mut().disk.release_fd(fd as u32);
            0
        },
    )?;
    Ok(())
}

/// The length of the first non-empty buffer of a ciovec array: what wasmtime-wasi 48
/// writes in one `fd_write` or `fd_pwrite` (it writes only that one). 0 when the array
/// cannot be read (the real call then reports the fault).
fn first_ciovec_len(caller: &mut Caller<'_, TaskCtx>, iovs: u32, n: u32) -> u64 {
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return 0;
    };
    let data = mem.data(&*caller);
    let base = iovs as usize;
    for i in 0..(n as usize).min(1024) {
        let at = base.saturating_add(i * 8);
        let Some(len) = data
            .get(at.saturating_add(4)..)
            .and_then(|b| b.first_chunk::<4>())
        else {
            return 0;
        };
        let len = u32::from_le_bytes(*len);
        if len > 0 {
            return u64::from(len);
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(dir: &std::path::Path, bytes: u64, files: u64) -> DiskQuota {
        DiskQuota::new(Some(dir.to_path_buf()), DiskLimits { bytes, files })
    }

    #[test]
    fn the_first_charge_counts_what_the_sandbox_already_holds() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("input"), vec![1u8; 64 << 10]).unwrap();
        let mut q = quota(d.path(), 100 << 10, 0);
        // 64 KiB staged + 40 KiB > 100 KiB.
        assert!(!q.charge(40 << 10, 0));
        assert_eq!(q.exceeded(), Some(DiskExceeded::Bytes { limit: 100 << 10 }));
        assert!(q.charge(4 << 10, 0));
    }

    #[test]
    fn writes_are_charged_in_blocks_and_the_standard_streams_only_once_released() {
        let d = tempfile::tempdir().unwrap();
        let mut q = quota(d.path(), 8 * BLOCK, 0);
        assert!(q.charge_write(3, 1));
        assert!(q.charge_write(3, BLOCK + 1));
        assert_eq!(q.charged.unwrap().bytes, 3 * BLOCK);
        assert!(
            q.charge_write(1, 1 << 30),
            "stdout is the capped output file"
        );
        assert_eq!(q.charged.unwrap().bytes, 3 * BLOCK);
        q.release_fd(1);
        assert!(!q.charge_write(1, 1 << 30), "fd 1 may now be a file");
        assert!(q.charge_write(2, 1 << 30));
    }

    #[test]
    fn near_the_limit_the_sandbox_is_measured_again() {
        let d = tempfile::tempdir().unwrap();
        let mut q = quota(d.path(), 0, 3);
        for _ in 0..3 {
            assert!(q.charge(0, 1));
        }
        // Charged 3, but nothing was made: the measure lets a fourth through.
        assert!(q.charge(0, 1));
        for i in 0..3 {
            std::fs::write(d.path().join(i.to_string()), b"").unwrap();
        }
        assert!(q.charge(0, 1));
        assert!(q.charge(0, 1));
        // Charged 3 again; now the sandbox really holds 3.
        assert!(!q.charge(0, 1));
        assert_eq!(q.exceeded(), Some(DiskExceeded::Files { limit: 3 }));
    }

    /// The wrappers' idea of each WASI call's type is wasmtime-wasi's, and every host
    /// function they call is in the linker with the type the rewrite imports.
    #[test]
    fn the_hooks_match_the_linker() {
        use wasmtime::{Engine, Store, ValType};
        let engine = Engine::default();
        let linker = crate::runner::wasi_linker(&engine).unwrap();
        let mut store = Store::new(&engine, TaskCtx::placeholder());
        let params = |module: &str, name: &str, store: &mut Store<TaskCtx>| -> Vec<String> {
            let Ok(Extern::Func(f)) = linker.get(&mut *store, module, name) else {
                panic!("{module}::{name} is not in the linker");
            };
            let ty = f.ty(&*store);
            assert_eq!(
                ty.results().map(|r| r.to_string()).collect::<Vec<_>>(),
                ["i32"],
                "{module}::{name}"
            );
            ty.params().map(|p| p.to_string()).collect()
        };
        for (name, wasi_params, charge, passed) in rewrite::hooks() {
            let want: Vec<String> = wasi_params
                .iter()
                .map(|p| match p {
                    wasmparser::ValType::I32 => ValType::I32.to_string(),
                    wasmparser::ValType::I64 => ValType::I64.to_string(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(
                params("wasi_snapshot_preview1", name, &mut store),
                want,
                "{name}"
            );
            assert_eq!(
                params(DISK_MODULE, charge, &mut store),
                vec![ValType::I32.to_string(); passed],
                "{charge}"
            );
        }
    }

    #[test]
    fn without_limits_nothing_is_measured() {
        let mut q = DiskQuota::new(Some("/nonexistent/root".into()), DiskLimits::default());
        assert!(q.charge(u64::MAX, u64::MAX));
        assert!(q.charged.is_none());
    }
}
