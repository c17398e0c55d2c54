//! The Agora master: turns agents' resources into offers, launches frameworks' tasks
//! on agents and relays their status.
//!
//! The decisions are made by pure crates of their own: `agora-master-core` (the state
//! machine) and `agora-allocator` (DRF); this crate is their shell.
//!
//! - `registry`: the registry's redb file.
//! - `raft`: the masters' Raft group (openraft): log, vote and state machine in the
//!   registry's file.
//! - `server`: the QUIC shell that feeds the core and carries out its outputs.
//! - `artifacts`: the content-addressed store of modules and inputs.
//! - `server` also defines [`server::FunctionsDoor`], through which `agora fn`
//!   operator requests reach the functions framework when one runs beside this
//!   master (the cli plugs in `agora-fn-gateway`); the master itself runs no
//!   functions and links no WebAssembly runtime.

pub mod artifacts;
mod error;
pub mod raft;
pub mod registry;
mod replicate;
pub mod server;

pub use error::{Error, Result};
