//! The masters' Raft group (openraft 0.10, pinned): the registry is its replicated
//! state machine. Everything that names openraft lives under this module.
//!
//! - `types`: the type configuration (`Agora`) and short names for openraft's types.
//! - `group`: starting a master's node, its settings, knowing when it leads.
//! - `store`: log, vote, state machine and snapshots in `registry.redb`.
//! - `wire`: openraft's RPC types to and from the protobuf messages of `agora.proto`.
//! - `net`: the Raft RPCs over QUIC between masters (mutual TLS, master certificates).

pub mod group;
pub mod net;
pub mod store;
pub mod types;
pub mod wire;
