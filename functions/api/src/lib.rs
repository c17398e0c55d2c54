//! What the function runtime, the function host executor, the gateway (the built-in
//! functions framework), the master and the agents share, without the runtime itself:
//! the metrics a host reports ([`MetricsSnapshot`] and its parts, as JSON on
//! `GET /fn-metrics`), the guest styles ([`GuestKind`]), the outbound allow-list
//! ([`outbound`]: its syntax, parser and matching, all pure), the parser of a CGI
//! guest's response ([`cgi`], pure) and where a host's
//! socket is in its sandbox ([`socket_path`]).
//!
//! This crate must never link wasmtime (nor anything that does): the master and the
//! agent depend on it, and they do not run WebAssembly functions themselves.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod cgi;
pub mod outbound;

/// The one error type of `agora-fn-api`: what is wrong with a module's bytes or an
/// outbound allow-list, each a sentence a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The bytes do not start with WebAssembly's magic number.
    #[error("not a WebAssembly module or component (bad magic number; {len} bytes)")]
    NotWasm {
        /// How many bytes there were.
        len: usize,
    },
    /// WebAssembly, but neither a core module nor a component of a known version.
    #[error("not a WebAssembly module or component (unsupported version)")]
    UnsupportedVersion,
    /// An allow-list longer than [`outbound::MAX_ENTRIES`].
    #[error("{0} allowed outbound hosts is more than the {max} allowed", max = outbound::MAX_ENTRIES)]
    TooManyOutbound(usize),
    /// An allow-list entry and what is wrong with it.
    #[error("allowed outbound host {entry:?}: {why}")]
    Outbound {
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        why: String,
    },
    /// A function's output is not a CGI response ([`cgi::parse_response`]): the
    /// sentence says what is wrong with it.
    #[error("{0}")]
    BadCgiResponse(String),
}

/// The host's Unix socket in its task's sandbox, which the agent's front door
/// forwards requests to.
pub const SOCKET_NAME: &str = "fn.sock";

/// The socket of the host whose task's sandbox is `sandbox`.
pub fn socket_path(sandbox: &Path) -> PathBuf {
    sandbox.join(SOCKET_NAME)
}

/// Upper bounds of the latency histogram's buckets, in microseconds; a last, unbounded
/// bucket follows. Fixed so that snapshots from many hosts add up bucket by bucket.
pub const LATENCY_BUCKETS_US: [u64; 18] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000, 60_000_000,
];

/// Which of the two guest styles a module is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestKind {
    /// A WASI preview 1 command speaking CGI on stdin/stdout.
    CgiModule,
    /// A `wasi:http/proxy` component.
    HttpComponent,
}

impl GuestKind {
    /// Tells a core module from a component by the header, with a sentence for anything
    /// else.
    pub fn detect(bytes: &[u8]) -> Result<GuestKind, Error> {
        if !bytes.starts_with(b"\0asm") {
            return Err(Error::NotWasm { len: bytes.len() });
        }
        match bytes.get(4..8) {
            Some([1, 0, 0, 0]) => Ok(GuestKind::CgiModule),
            Some([_, _, 1, 0]) => Ok(GuestKind::HttpComponent),
            _ => Err(Error::UnsupportedVersion),
        }
    }
}

/// A function's metrics at one moment. Counters only grow while the function stays
/// loaded; `in_flight` and `queued` are gauges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// The function's name.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// Its guest style.
    pub kind: GuestKind,
    /// sha256 of its module.
    pub sha256: String,
    /// Requests received (including those refused by the queue).
    pub requests: u64,
    /// Requests answered by the guest itself, whatever status it chose.
    pub responses: u64,
    /// Requests that failed, by class.
    pub errors: ErrorCounts,
    /// Time from receipt to answer (queueing included), successes and failures.
    pub latency: LatencyHistogram,
    /// Fuel burnt by all requests together (0 while fuel is unlimited and unused).
    pub fuel_used: u64,
    /// Requests running now.
    pub in_flight: u64,
    /// Requests waiting for a slot now.
    pub queued: u64,
    /// Outgoing HTTP requests of its components that were sent (allow-listed, within
    /// the per-request cap), whatever their outcome.
    #[serde(default)]
    pub outbound_allowed: u64,
    /// Outgoing HTTP requests of its components that were refused (not allow-listed,
    /// or over the per-request cap).
    #[serde(default)]
    pub outbound_denied: u64,
}

impl MetricsSnapshot {
    /// Adds `other`'s counters, gauges and histogram to these (summing one function
    /// over several hosts). Identity fields stay as they are; a histogram with other
    /// bucket bounds is not added (all hosts use [`LATENCY_BUCKETS_US`]).
    pub fn add(&mut self, other: &MetricsSnapshot) {
        self.requests += other.requests;
        self.responses += other.responses;
        self.errors.add(&other.errors);
        if self.latency.bounds_us == other.latency.bounds_us
            && self.latency.counts.len() == other.latency.counts.len()
        {
            for (mine, theirs) in self.latency.counts.iter_mut().zip(&other.latency.counts) {
                *mine += theirs;
            }
            self.latency.count += other.latency.count;
            self.latency.sum_us += other.latency.sum_us;
        }
        self.fuel_used += other.fuel_used;
        self.in_flight += other.in_flight;
        self.queued += other.queued;
        self.outbound_allowed += other.outbound_allowed;
        self.outbound_denied += other.outbound_denied;
    }
}

/// Failed requests by [`ErrorClass`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    /// Fuel exhausted.
    pub fuel: u64,
    /// Memory limit reached.
    pub memory: u64,
    /// Deadline exceeded.
    pub deadline: u64,
    /// Trapped or exited non-zero for another reason.
    pub trap: u64,
    /// Answer not a valid response.
    pub bad_response: u64,
    /// Answer over the output limit.
    pub output_limit: u64,
    /// Refused: queue full (429).
    pub queue_full: u64,
    /// Refused: waited too long (503).
    pub queue_timeout: u64,
    /// Refused: no instance slot on the host (503).
    pub overloaded: u64,
    /// Host failure.
    pub internal: u64,
}

impl ErrorCounts {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &ErrorCounts) {
        self.fuel += other.fuel;
        self.memory += other.memory;
        self.deadline += other.deadline;
        self.trap += other.trap;
        self.bad_response += other.bad_response;
        self.output_limit += other.output_limit;
        self.queue_full += other.queue_full;
        self.queue_timeout += other.queue_timeout;
        self.overloaded += other.overloaded;
        self.internal += other.internal;
    }

    /// All failures together.
    pub fn total(&self) -> u64 {
        self.fuel
            + self.memory
            + self.deadline
            + self.trap
            + self.bad_response
            + self.output_limit
            + self.queue_full
            + self.queue_timeout
            + self.overloaded
            + self.internal
    }
}

/// A fixed-bucket latency histogram: `counts[i]` requests took at most
/// `bounds_us[i]` µs (and more than the bound before it); the last count is the
/// overflow bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// Bucket upper bounds in µs ([`LATENCY_BUCKETS_US`]).
    pub bounds_us: Vec<u64>,
    /// One count per bound, plus the overflow bucket.
    pub counts: Vec<u64>,
    /// All requests counted.
    pub count: u64,
    /// Sum of all latencies, in µs.
    pub sum_us: u64,
}

impl LatencyHistogram {
    /// The bucket bound at or below which a fraction `q` (0..=1) of requests fell:
    /// an upper estimate of that quantile. `None` when empty or in the overflow bucket.
    pub fn quantile_upper_bound_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let target = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= target {
                return self.bounds_us.get(i).copied();
            }
        }
        None
    }
}

/// How the built-in functions framework (the gateway, `agora-fn-gateway`) keeps its
/// deployments in the master's registry: as its framework state (SET_STATE), under
/// a fixed framework id. The master knows these only to migrate registries written
/// before the gateway left it (layout version 1).
pub mod gateway_state {
    /// The gateway's framework id. Fixed, so that the gateway re-subscribes as itself
    /// after a master restart (its hosts and state come back) without keeping its id
    /// anywhere: the master accepts SUBSCRIBE with an id it does not know (as Mesos
    /// does after a failover) and the state lives with the framework.
    pub const FRAMEWORK_ID: &str = "agora-functions";
    /// Key of a deployed function: this prefix and its name; the value is the
    /// normalised `FunctionDeploy`, prost-encoded.
    pub const FUNCTION_PREFIX: &str = "function/";
    /// Key of a role's tenant limit: this prefix and the role; the value is the
    /// `TenantLimit`, prost-encoded.
    pub const TENANT_PREFIX: &str = "tenant/";
}
