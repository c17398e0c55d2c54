//! WASI preview 1 commands speaking CGI: a fresh instance per request from the
//! function's `InstancePre`, the body on stdin, the request in the environment, the
//! response parsed from stdout; stderr is captured for the request log.
//!
//! They run on wasmtime's async API with asynchronous WASI, inside the request's own
//! task, as components do: the epoch callback yields to tokio at every tick, so a
//! guest burning CPU shares its worker thread, and dropping the request's future (at
//! its deadline, or when its client goes away) drops the store, which cancels a host
//! call the guest waits in (a sleep) and frees its instance slot at once.

use agora_proto::units::{format_bytes, KIB};
use axum::http::Response;
use bytes::Bytes;
use wasmtime::{Engine, ExternType, InstancePre, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

use crate::cgi;
use crate::error::{error_text, FunctionError};
use crate::function::CapturePipe;
use crate::limits::{self, HasLimits, LimitState, RequestLimits};
use crate::outcome::{self, ErrorClass, Failure, GuestEnd};

/// Store data of one CGI request.
pub(crate) struct CgiCtx {
    wasi: WasiP1Ctx,
    limits: LimitState,
}

impl HasLimits for CgiCtx {
    fn limits(&mut self) -> &mut LimitState {
        &mut self.limits
    }
}

/// The linker every CGI function is prepared against: WASI preview 1, nothing else.
pub(crate) fn linker(engine: &Engine) -> Result<Linker<CgiCtx>, FunctionError> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |ctx: &mut CgiCtx| &mut ctx.wasi).map_err(
        |e| {
            FunctionError::Host(format!(
                "cannot add WASI preview 1 to the linker: {}",
                error_text(&e)
            ))
        },
    )?;
    Ok(linker)
}

/// Checks that the module is a WASI command this host can run and resolves its imports
/// once, so each request only instantiates.
pub(crate) fn prepare(
    name: &str,
    linker: &Linker<CgiCtx>,
    module: &Module,
    memory_limit: u64,
) -> Result<InstancePre<CgiCtx>, FunctionError> {
    match module.get_export("_start") {
        Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => {}
        Some(_) => {
            return Err(FunctionError::module(
                name,
                "module exports `_start`, but not as a function without parameters or results",
            ))
        }
        None => {
            return Err(FunctionError::module(
                name,
                "module has no `_start` function: CGI functions must be WASI commands \
                 (build a binary, not a library, for wasm32-wasip1)",
            ))
        }
    }
    if let Some(pages) = module.resources_required().max_initial_memory_size {
        let declared = pages.saturating_mul(64 * KIB);
        if declared > memory_limit {
            return Err(FunctionError::module(
                name,
                format!(
                    "module declares {} of initial memory, more than the function's memory limit of {}",
                    format_bytes(declared),
                    format_bytes(memory_limit)
                ),
            ));
        }
    }
    linker.instantiate_pre(module).map_err(|e| {
        FunctionError::module(
            name,
            format!(
                "cannot link module ({}); CGI functions may import only WASI preview 1 \
                 (wasi_snapshot_preview1)",
                error_text(&e)
            ),
        )
    })
}

/// Runs one request in a fresh instance, the guest's stderr going to `stderr`.
/// Returns the response (or why there is none) and the fuel burnt. The caller bounds
/// it by the deadline: a guest waiting in a host call sees no epoch.
pub(crate) async fn run(
    engine: &Engine,
    pre: &InstancePre<CgiCtx>,
    name: &str,
    env: &[(String, String)],
    body: Bytes,
    limits: &RequestLimits,
    stderr: CapturePipe,
) -> (Result<Response<Bytes>, Failure>, u64) {
    // The output pipe refuses writes past its capacity; a guest that fills it
    // exactly is treated as over the limit (it cannot be told from one that was cut).
    let output_cap = usize::try_from(limits.output).unwrap_or(usize::MAX);
    let stdout = MemoryOutputPipe::new(output_cap);
    let wasi = WasiCtxBuilder::new()
        .stdin(MemoryInputPipe::new(body))
        .stdout(stdout.clone())
        .stderr(stderr)
        .envs(env)
        .arg(name)
        .build_p1();
    let mut store = Store::new(
        engine,
        CgiCtx {
            wasi,
            limits: LimitState::new(limits.memory),
        },
    );
    let initial_fuel = match limits::arm(&mut store, limits, true) {
        Ok(fuel) => fuel,
        Err(e) => {
            let failure = Failure::new(
                ErrorClass::Internal,
                format!("cannot set up the request's limits: {}", error_text(&e)),
            );
            return (Err(failure), 0);
        }
    };

    let result = async {
        let instance = pre.instantiate_async(&mut store).await?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call_async(&mut store, ()).await
    }
    .await;
    let fuel = limits::fuel_used(&store, initial_fuel);
    let deadline_hit = store.data().limits.deadline_hit;
    let memory_denied = store.data().limits.memory.denied();
    // The store holds the other ends of the pipes: drop it so they can be taken
    // without a copy.
    drop(store);
    let Some(output) = take(stdout) else {
        let failure = Failure::new(
            ErrorClass::Internal,
            "the guest's output was still in use after it ended",
        );
        tracing::error!(function = name, "{}", failure.message);
        return (Err(failure), fuel);
    };
    let output_full = (output.len() >= output_cap).then_some(limits.output);

    let outcome = match result {
        Err(error) if !is_clean_exit(&error) => Err(outcome::classify(&GuestEnd {
            error: &error,
            deadline_hit,
            memory_denied,
            fuel_limit: limits.fuel,
            timeout: limits.timeout,
            output_full,
        })),
        _ if output_full.is_some() => Err(outcome::output_limit(limits.output)),
        _ => cgi::parse_cgi_response(output),
    };
    (outcome, fuel)
}

fn is_clean_exit(error: &wasmtime::Error) -> bool {
    error.downcast_ref::<I32Exit>().is_some_and(|e| e.0 == 0)
}

/// The pipe's bytes, without a copy. Only call it once the store (which holds the
/// guest's handles to the pipe) is gone: `None` means some handle is still alive.
fn take(pipe: MemoryOutputPipe) -> Option<Bytes> {
    pipe.try_into_inner().map(|bytes| bytes.freeze())
}
