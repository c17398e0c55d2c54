//! The Agora agent: advertises this machine's resources to the master, runs tasks
//! through executor processes, and reports their status.
//!
//! - `core`: the pure state machine (tasks, executors, status update streams).
//! - `gc`: removal of old sandboxes.
//! - `server`: the I/O shell (master link, executor socket, fetching, sandboxes).

pub mod core;
pub mod gc;
pub mod server;
