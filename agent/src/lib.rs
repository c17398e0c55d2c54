//! The Agora agent: advertises this machine's resources to the master, runs tasks
//! through executor processes, and reports their status.
//!
//! The decisions are made by `agora-agent-core` (tasks, executors, status update
//! streams), a pure crate; this crate is its shell.
//!
//! - `checkpoint`: the checkpoint's redb file, written after every input.
//! - `gc`: removal of old sandboxes.
//! - `server`: the I/O shell (master link, executor socket, fetching, sandboxes).
//! - `http`: the HTTP server that proxies `/fn/NAME/...` to local function hosts.

pub mod checkpoint;
mod error;
pub mod gc;
pub mod http;
pub mod identity;
pub mod server;
mod tenants;

pub use error::{Error, Result};
