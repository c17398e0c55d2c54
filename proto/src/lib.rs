//! Agora's wire format and the plumbing every process shares: generated protobuf
//! types (`v1`), the frame codec, the `Resources` arithmetic, artifact hashing and the
//! QUIC/TLS set-up (certificates, endpoints).

pub mod executor_link;
pub mod frame;
pub mod resources;
pub mod tls;
pub mod transfer;
pub mod units;

/// Types generated from `proto/agora.proto`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/agora.v1.rs"));
}

pub use frame::{
    read_frame, read_frame_limited, write_frame, write_queued, FrameBatch, FrameError, MAX_FRAME,
};
pub use resources::Resources;

/// sha256 of some bytes, as lower-case hex: the name of an artifact.
/// The executor a task runs in when it names none: one per framework and kind on
/// each agent. The master needs the same rule as the agent to route SHUTDOWN and
/// MESSAGE calls, hence here.
pub fn default_executor_id(native: bool) -> &'static str {
    if native {
        "default-native"
    } else {
        "default"
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// True when `s` looks like a sha256 artifact name (64 lower-case hex digits).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl v1::TaskState {
    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        use v1::TaskState::*;
        matches!(
            self,
            TaskFinished | TaskFailed | TaskKilled | TaskError | TaskLost | TaskDropped | TaskGone
        )
    }

    /// The state's short name as users see it: `RUNNING`, `FAILED`, ...
    pub fn short_name(self) -> &'static str {
        self.as_str_name().trim_start_matches("TASK_")
    }
}

impl v1::Reason {
    pub fn short_name(self) -> &'static str {
        self.as_str_name().trim_start_matches("REASON_")
    }
}

/// Milliseconds since the Unix epoch, for timestamps that cross the wire. Shells call
/// this; cores receive time as a parameter.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
