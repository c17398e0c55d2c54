//! The Agora master: turns agents' resources into offers, launches frameworks' tasks
//! on agents and relays their status.
//!
//! The decisions are made by pure crates of their own: `agora-master-core` (the state
//! machine) and `agora-allocator` (DRF); this crate is their shell.
//!
//! - `registry`: the registry's redb file.
//! - `server`: the QUIC shell that feeds the core and carries out its outputs.
//! - `artifacts`: the content-addressed store of modules and inputs.
//! - `functions`: the built-in functions framework and the HTTP front door for
//!   functions (`/fn/NAME/...`).

pub mod artifacts;
pub mod functions;
pub mod registry;
pub mod server;
