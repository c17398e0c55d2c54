//! Agora's wire format: generated protobuf types (`v1`), the `Resources` arithmetic,
//! and artifact names (sha256). Pure: no I/O, no async runtime, no clock; the cores
//! depend on it, so it must stay that way (`cargo tree -p agora-proto` shows no tokio).
//! The plumbing that moves these messages (frames, QUIC/TLS) is `agora-net`.

pub mod resources;
pub mod time;
pub mod units;

/// Types generated from `proto/agora.proto`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/agora.v1.rs"));
}

pub use resources::Resources;
pub use time::Now;

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

/// sha256 of some bytes, as lower-case hex: the name of an artifact.
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
