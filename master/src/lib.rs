//! The Agora master: turns agents' resources into offers, launches frameworks' tasks
//! on agents and relays their status.
//!
//! - `allocator`: the pure DRF allocator.
//! - `core`: the pure state machine (agents, frameworks, offers, tasks).
//! - `server`: the QUIC shell that feeds the core and carries out its outputs.
//! - `artifacts`: the content-addressed store of modules and inputs.
//! - `functions`: the built-in functions framework and the HTTP front door for
//!   functions (`/fn/NAME/...`).

pub mod allocator;
pub mod artifacts;
pub mod core;
pub mod functions;
pub mod registry;
pub mod server;
