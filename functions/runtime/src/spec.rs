//! What a function is: its module, its owner and its limits.

use std::path::PathBuf;
use std::time::Duration;

pub use agora_fn_api::GuestKind;
use agora_proto::units::{format_bytes, format_duration, MIB};
use bytes::Bytes;

use crate::error::FunctionError;
use crate::outbound::OutboundAllowList;

/// Longest accepted name of a function or a tenant.
pub const MAX_NAME_LEN: usize = 64;
/// Memory limit when the spec gives none.
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 * MIB;
/// Deadline when the spec gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest deadline a function may ask for: requests are short by design.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Where a function's module comes from.
#[derive(Clone, Debug)]
pub enum ModuleSource {
    /// The module's bytes, already in memory (e.g. fetched from the artifact store).
    Bytes(Bytes),
    /// A file to read. When the spec gives the sha256 and the host's artifact cache
    /// already holds the compiled module, the file is not read at all.
    Path(PathBuf),
}

/// Everything needed to load a function. Build one with [`FunctionSpec::new`] and
/// adjust the public fields; [`crate::FunctionHost::load`] checks them.
#[derive(Clone, Debug)]
pub struct FunctionSpec {
    /// Name in URLs (`/fn/NAME`): 1 to 64 of `A-Z a-z 0-9 _ . -`, not starting with `.`.
    pub name: String,
    /// The owner (a role); concurrency limits are also enforced per tenant. Same
    /// character rules as `name`.
    pub tenant: String,
    /// The module: a WASI preview 1 command (CGI style) or a `wasi:http/proxy`
    /// component; which one is detected from the bytes.
    pub module: ModuleSource,
    /// Lower-case hex sha256 of the module bytes; `None` computes it. When given, it
    /// is checked against the bytes whenever they are read.
    pub sha256: Option<String>,
    /// Linear memory a request may use, in bytes (all its memories together).
    pub memory_limit: u64,
    /// Fuel (roughly, wasm instructions) a request may burn; 0 = unlimited.
    pub fuel: u64,
    /// Wall-clock deadline of one request, from instantiation to response.
    pub timeout: Duration,
    /// Requests of this function that may run at once on this host.
    pub max_concurrency: u32,
    /// Requests that may wait for a free slot beyond `max_concurrency`; more get 429.
    pub queue_len: u32,
    /// Longest a request waits in the queue before it gets 503.
    pub max_queue_wait: Duration,
    /// Where a `wasi:http` component may send outgoing requests; empty (the default)
    /// denies them all. CGI modules have no network and ignore it.
    pub allowed_outbound_hosts: OutboundAllowList,
}

impl FunctionSpec {
    /// A spec with the defaults: 64 MiB of memory, unlimited fuel, a 5 s deadline,
    /// 16 concurrent requests, a queue of 64 waiting at most 1 s, no outgoing requests.
    pub fn new(name: impl Into<String>, tenant: impl Into<String>, module: ModuleSource) -> Self {
        FunctionSpec {
            name: name.into(),
            tenant: tenant.into(),
            module,
            sha256: None,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            fuel: 0,
            timeout: DEFAULT_TIMEOUT,
            max_concurrency: 16,
            queue_len: 64,
            max_queue_wait: Duration::from_secs(1),
            allowed_outbound_hosts: OutboundAllowList::default(),
        }
    }

    /// Checks everything that does not need the module; `max_memory` is the most the
    /// host's instance pool allows per instance.
    pub(crate) fn validate(&self, max_memory: u64) -> Result<(), FunctionError> {
        check_name("function name", &self.name).map_err(|m| FunctionError::spec(&self.name, m))?;
        check_name("tenant", &self.tenant).map_err(|m| FunctionError::spec(&self.name, m))?;
        if let Some(sha) = &self.sha256 {
            if !is_sha256_hex(sha) {
                return Err(FunctionError::spec(
                    &self.name,
                    format!("sha256 {sha:?} is not 64 lower-case hex digits"),
                ));
            }
        }
        if self.memory_limit == 0 {
            return Err(FunctionError::spec(
                &self.name,
                "memory limit must be above 0",
            ));
        }
        if self.memory_limit > max_memory {
            return Err(FunctionError::spec(
                &self.name,
                format!(
                    "memory limit of {} is more than this host allows per instance ({}); \
                     ask for less or raise HostConfig::max_memory_per_instance",
                    format_bytes(self.memory_limit),
                    format_bytes(max_memory)
                ),
            ));
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return Err(FunctionError::spec(
                &self.name,
                format!(
                    "timeout must be above 0 and at most {}, got {}",
                    format_duration(MAX_TIMEOUT),
                    format_duration(self.timeout)
                ),
            ));
        }
        if self.max_concurrency == 0 {
            return Err(FunctionError::spec(
                &self.name,
                "max_concurrency must be at least 1",
            ));
        }
        if self.max_queue_wait > MAX_TIMEOUT {
            return Err(FunctionError::spec(
                &self.name,
                format!(
                    "max_queue_wait must be at most {}",
                    format_duration(MAX_TIMEOUT)
                ),
            ));
        }
        Ok(())
    }
}

/// Names appear in URLs, metrics and file names: keep them to a safe alphabet.
/// Whether `name` is a valid function or tenant name (1 to [`MAX_NAME_LEN`] letters,
/// digits, `_`, `.` and `-`, not starting with `.`).
pub fn is_valid_name(name: &str) -> bool {
    check_name("name", name).is_ok()
}

pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME_LEN} characters, got {name:?}"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("{what} {name:?} must not start with '.'"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{what} {name:?} contains {bad:?}; use only letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("function name", "echo-2.v1_x").is_ok());
        assert!(check_name("function name", "").is_err());
        assert!(check_name("function name", ".hidden").is_err());
        assert!(check_name("function name", "a/b")
            .unwrap_err()
            .contains("'/'"));
        assert!(check_name("function name", &"x".repeat(65)).is_err());
    }

    #[test]
    fn kinds_are_detected() {
        assert_eq!(
            GuestKind::detect(b"\0asm\x01\0\0\0"),
            Ok(GuestKind::CgiModule)
        );
        assert_eq!(
            GuestKind::detect(b"\0asm\x0d\0\x01\0"),
            Ok(GuestKind::HttpComponent)
        );
        assert!(GuestKind::detect(b"hello")
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(GuestKind::detect(b"\0asm\x02\0\0\0")
            .unwrap_err()
            .to_string()
            .contains("version"));
    }
}
