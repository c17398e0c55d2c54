//! How Agora's processes reach each other, and what shells read that cores may not:
//!
//! - `frame`: the one frame codec (length-prefixed protobuf) over async streams;
//! - `tls`: certificates, roles and QUIC endpoints with mutual TLS;
//! - `leader`: finding the leading master of a group;
//! - `transfer`: artifact bytes over a stream, checked against their sha256;
//! - `gate`: caps on the connections a listener holds, in all and per address;
//! - `clock`: the monotonic clock that times every timeout, and wall-clock stamps.
//!
//! The cores never depend on this crate: they get messages already decoded and time
//! as a parameter.

pub mod clock;
mod error;
pub mod frame;
pub mod gate;
pub mod leader;
pub mod tls;
pub mod transfer;

pub use clock::{unix_millis, Monotonic};
pub use error::{Error, Result};
pub use frame::{
    read_frame, read_frame_limited, write_frame, write_frame_limited, write_queued, FrameBatch,
    FrameError, MAX_FRAME,
};
