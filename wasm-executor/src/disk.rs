//! NOT WIRED YET: `wrap_linker` is not called (delegating to wasmtime-wasi's own
//! definition through `Func::call_async` loses the guest's memory export and
//! traps). The quota is still measured at a task's end when exceeded.
//!
//! A wasm task's disk limit, enforced in the WASI layer so that the guest sees
//! ENOSPC ("no space left on device") when a write or a create would take its
//! sandbox past its limits.
//!
//! wasmtime-wasi 48 keeps its preview 1 implementation (the `WasiSnapshotPreview1`
//! trait, the descriptor table) private, so there is no filesystem to swap in.
//! Instead the linker's definitions of the calls that grow a sandbox (`fd_write`,
//! `fd_pwrite`, `path_open` with `O_CREAT`, `path_create_directory`,
//! `path_symlink`) are shadowed by wrappers that charge the call to a
//! [`DiskQuota`] and then call wasmtime-wasi's own definition (looked up once per
//! store in a copy of the linker taken before shadowing).
//!
//! The quota charges every byte a write names (an overwrite counts as growth) and
//! every create (opening an existing file with `O_CREAT` counts as one), which is
//! cheap and never too little. Only when a charge would pass a limit does it measure
//! the sandbox (`agora_executor_link::disk::measure`) and start again from what it
//! really holds; so a guest far from its limits pays a counter per write and nothing
//! at launch.

use std::path::PathBuf;

use agora_executor_link::disk::{measure, DiskExceeded, DiskLimits, DiskUse};
use wasmtime::{Caller, Extern, Func, Linker};

use crate::runner::TaskCtx;

/// WASI preview 1 errno `nospc`.
const ERRNO_NOSPC: i32 = 51;
/// `oflags::creat`.
const OFLAGS_CREAT: i32 = 1;
const WASI: &str = "wasi_snapshot_preview1";

/// The sandbox calls wrapped, in the order of [`DiskQuota::originals`].
const WRAPPED: [&str; 5] = [
    "fd_write",
    "fd_pwrite",
    "path_open",
    "path_create_directory",
    "path_symlink",
];

/// One task's disk accounting.
pub(crate) struct DiskQuota {
    /// The host directory preopened as the guest's `/`; `None`: no filesystem.
    root: Option<PathBuf>,
    limits: DiskLimits,
    /// Bytes and entries charged: at least what the sandbox holds.
    charged: DiskUse,
    /// The limit a refused call went past, first one kept.
    exceeded: Option<DiskExceeded>,
    /// wasmtime-wasi's own definitions of [`WRAPPED`] in this store.
    originals: [Option<Func>; 5],
}

impl DiskQuota {
    /// `staged`: what the agent put in the sandbox before the launch (its inputs).
    pub(crate) fn new(root: Option<PathBuf>, limits: DiskLimits, staged: DiskUse) -> Self {
        DiskQuota {
            root,
            limits,
            charged: staged,
            exceeded: None,
            originals: [None; 5],
        }
    }

    pub(crate) fn none() -> Self {
        Self::new(None, DiskLimits::default(), DiskUse::default())
    }

    /// The limit a call of the guest's was refused at, if any.
    pub(crate) fn exceeded(&self) -> Option<DiskExceeded> {
        self.exceeded
    }

    /// What the sandbox holds now, measured (for the task's usage report).
    pub(crate) fn measured(&self) -> DiskUse {
        match &self.root {
            Some(r) => measure(r, self.limits.walk_bound()).unwrap_or(self.charged),
            None => DiskUse::default(),
        }
    }

    /// Charges `bytes` and `files` about to be added; false (and nothing charged) when
    /// the sandbox would then go past a limit.
    pub(crate) fn charge(&mut self, bytes: u64, files: u64) -> bool {
        let after = |c: DiskUse| DiskUse {
            bytes: c.bytes.saturating_add(bytes),
            files: c.files.saturating_add(files),
            truncated: false,
        };
        if self.limits.exceeded(after(self.charged)).is_none() {
            self.charged = after(self.charged);
            return true;
        }
        // Near a limit: count what is really there.
        if let Some(root) = &self.root {
            if let Ok(now) = measure(root, self.limits.walk_bound()) {
                self.charged = now;
            }
        }
        match self.limits.exceeded(after(self.charged)) {
            None => {
                self.charged = after(self.charged);
                true
            }
            Some(e) => {
                tracing::debug!(limit = %e, "a guest's write or create refused");
                self.exceeded.get_or_insert(e);
                false
            }
        }
    }
}

/// Shadows the sandbox-growing calls of `linker` (which already holds wasmtime-wasi's
/// preview 1) with charging wrappers.
#[allow(dead_code)]
pub(crate) fn wrap_linker(linker: &mut Linker<TaskCtx>) -> wasmtime::Result<()> {
    let originals = std::sync::Arc::new(linker.clone());
    linker.allow_shadowing(true);

    let o = originals.clone();
    linker.func_wrap_async(
        WASI,
        "fd_write",
        move |mut caller: Caller<'_, TaskCtx>, (fd, iovs, n, out): (i32, i32, i32, i32)| {
            let o = o.clone();
            Box::new(async move {
                if fd > 2 {
                    let len = first_ciovec_len(&mut caller, iovs, n);
                    if len > 0 && !caller.data_mut().disk.charge(len, 0) {
                        return Ok(ERRNO_NOSPC);
                    }
                }
                let f = original(&o, &mut caller, 0)?;
                f.typed::<(i32, i32, i32, i32), i32>(&caller)?
                    .call_async(&mut caller, (fd, iovs, n, out))
                    .await
            })
        },
    )?;
    let o = originals.clone();
    linker.func_wrap_async(
        WASI,
        "fd_pwrite",
        move |mut caller: Caller<'_, TaskCtx>,
              (fd, iovs, n, off, out): (i32, i32, i32, i64, i32)| {
            let o = o.clone();
            Box::new(async move {
                let len = first_ciovec_len(&mut caller, iovs, n);
                if len > 0 && !caller.data_mut().disk.charge(len, 0) {
                    return Ok(ERRNO_NOSPC);
                }
                let f = original(&o, &mut caller, 1)?;
                f.typed::<(i32, i32, i32, i64, i32), i32>(&caller)?
                    .call_async(&mut caller, (fd, iovs, n, off, out))
                    .await
            })
        },
    )?;
    let o = originals.clone();
    linker.func_wrap_async(
        WASI,
        "path_open",
        move |mut caller: Caller<'_, TaskCtx>,
              args: (i32, i32, i32, i32, i32, i64, i64, i32, i32)| {
            let o = o.clone();
            Box::new(async move {
                if args.4 & OFLAGS_CREAT != 0 && !caller.data_mut().disk.charge(0, 1) {
                    return Ok(ERRNO_NOSPC);
                }
                let f = original(&o, &mut caller, 2)?;
                f.typed::<(i32, i32, i32, i32, i32, i64, i64, i32, i32), i32>(&caller)?
                    .call_async(&mut caller, args)
                    .await
            })
        },
    )?;
    let o = originals.clone();
    linker.func_wrap_async(
        WASI,
        "path_create_directory",
        move |mut caller: Caller<'_, TaskCtx>, args: (i32, i32, i32)| {
            let o = o.clone();
            Box::new(async move {
                if !caller.data_mut().disk.charge(0, 1) {
                    return Ok(ERRNO_NOSPC);
                }
                let f = original(&o, &mut caller, 3)?;
                f.typed::<(i32, i32, i32), i32>(&caller)?
                    .call_async(&mut caller, args)
                    .await
            })
        },
    )?;
    let o = originals;
    linker.func_wrap_async(
        WASI,
        "path_symlink",
        move |mut caller: Caller<'_, TaskCtx>, args: (i32, i32, i32, i32, i32)| {
            let o = o.clone();
            Box::new(async move {
                if !caller.data_mut().disk.charge(0, 1) {
                    return Ok(ERRNO_NOSPC);
                }
                let f = original(&o, &mut caller, 4)?;
                f.typed::<(i32, i32, i32, i32, i32), i32>(&caller)?
                    .call_async(&mut caller, args)
                    .await
            })
        },
    )?;
    Ok(())
}

/// wasmtime-wasi's own definition of `WRAPPED[i]` in this store, looked up once.
#[allow(dead_code)]
fn original(
    originals: &Linker<TaskCtx>,
    caller: &mut Caller<'_, TaskCtx>,
    i: usize,
) -> wasmtime::Result<Func> {
    if let Some(f) = caller.data().disk.originals[i] {
        return Ok(f);
    }
    let f = match originals.get(&mut *caller, WASI, WRAPPED[i]) {
        Ok(Extern::Func(f)) => f,
        _ => {
            return Err(wasmtime::Error::msg(format!(
                "{WASI}::{} is missing",
                WRAPPED[i]
            )))
        }
    };
    caller.data_mut().disk.originals[i] = Some(f);
    Ok(f)
}

/// The length of the first non-empty buffer of a ciovec array: what wasmtime-wasi 48
/// writes in one `fd_write` (it writes only that one). 0 when the array cannot be
/// read (the real call then reports the fault).
#[allow(dead_code)]
fn first_ciovec_len(caller: &mut Caller<'_, TaskCtx>, iovs: i32, n: i32) -> u64 {
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return 0;
    };
    let data = mem.data(&*caller);
    let (Ok(base), Ok(n)) = (usize::try_from(iovs as u32), usize::try_from(n as u32)) else {
        return 0;
    };
    for i in 0..n.min(1024) {
        let at = base.saturating_add(i * 8);
        let Some(len) = data.get(at + 4..at + 8) else {
            return 0;
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
        if len > 0 {
            return u64::from(len);
        }
    }
    0
}
