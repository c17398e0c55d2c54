//! Agora's WebAssembly executor: runs tasks' WASI preview 1 modules under wasmtime with
//! fuel, memory, time and output limits ([`runner`]), and speaks the agent's executor
//! protocol over a Unix socket ([`executor`]).

mod disk;
mod error;
pub mod executor;
mod limiter;
mod output;
pub mod runner;

pub use error::{Error, Result};
pub use executor::run_executor;
pub use limiter::{MemoryLimiter, MAX_TABLE_ELEMENTS};
pub use runner::{validate_module, KillSwitch, Runner};
