//! The masters' Raft group (openraft 0.10, pinned): the registry is its replicated
//! state machine. Everything that names openraft lives under this module.
//!
//! - `types`: the type configuration (`Agora`) and short names for openraft's types.
//! - `group`: starting a master's node, its settings, knowing when it leads.
//! - `store`: log, vote, state machine and snapshots in `registry.redb`.

pub mod group;
pub mod store;
pub mod types;
