//! The Agora agent: advertises this machine's resources to the master, runs tasks
//! through executor processes, and reports their status.
//!
//! - `core`: the pure state machine (tasks, executors, status update streams).
//! - `checkpoint`: what survives a restart (redb), written after every input.
//! - `gc`: removal of old sandboxes.
//! - `server`: the I/O shell (master link, executor socket, fetching, sandboxes).
//! - `http`: the HTTP server that proxies `/fn/NAME/...` to local function hosts.

pub mod checkpoint;
pub mod core;
pub mod gc;
pub mod http;
pub mod server;
mod tenants;
