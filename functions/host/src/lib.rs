//! The function host executor (`agora executor fn`): the process the agent starts for
//! each function host task. It loads one function into an `agora-fn-runtime`
//! [`FunctionHost`](agora_fn_runtime::FunctionHost), serves it on a Unix socket in the
//! task's sandbox, and speaks the executor link (`agora-executor-link`) with the
//! agent like the wasm and native executors. See [`executor`].
//!
//! This crate owns that process and nothing else: it never talks to a master, and
//! the master and agent never depend on it (the agent finds the socket with
//! `agora_fn_api::socket_path`).

mod error;
pub mod executor;

pub use error::{Error, Result};
pub use executor::{run_executor, socket_path, DEFAULT_TENANT, SOCKET_NAME};
