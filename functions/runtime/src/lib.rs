//! Agora's serverless function runtime: a fresh WebAssembly instance per HTTP request.
//!
//! A process (the agent's function host executor) builds one [`FunctionHost`] (one
//! wasmtime engine with the pooling allocator, fuel and epoch interruption), loads
//! functions into it ([`FunctionHost::load`], or [`FunctionRegistry::deploy`] to
//! also serve them) and serves them over HTTP ([`router`], [`serve_tcp`], [`serve`]).
//!
//! Two guest styles, detected from the module's bytes:
//! - a WASI preview 1 command speaking CGI/1.1: the request body on stdin, the request
//!   in CGI meta-variables, a CGI response on stdout ([`cgi`](crate::cgi) has the
//!   details);
//! - a `wasi:http/proxy` component, as `wasmtime serve` runs it.
//!
//! Each request has its own memory, fuel and deadline; one exceeding them gets a 5xx
//! with a short reason ([`Failure`]) and the function keeps serving. Each function has
//! a concurrency limit, each tenant another, the host a pool of instance slots; above
//! them requests wait in a bounded queue for a bounded time (429 and 503 with
//! `Retry-After` past either). [`MetricsSnapshot`] counts what happened.
//!
//! Layout: `host` (engine, linkers, artifact cache, ticker), `function` (one request's
//! path), `admission` (queues and limits), `guest/` (the two styles), `cgi` (the CGI
//! protocol), `limits` and `outcome` (limits in the store, and the one mapping of
//! endings to HTTP answers), `metrics`, `registry`, `http`. The agent's function host
//! executor process (`agora executor fn`) is built on all of them in `agora-fn-host`;
//! what master, agent and gateway share with this crate (metrics snapshots, the
//! outbound allow-list) is in `agora-fn-api`, which does not link wasmtime.
//!
//! This crate owns the WebAssembly side of functions; it must never be a dependency
//! of the master, the agent or the gateway (they use `agora-fn-api`), nor talk to a
//! master itself.

#![warn(missing_docs)]

mod admission;
mod artifact_cache;
mod cgi;
mod error;
mod function;
mod guest;
mod host;
mod http;
mod limits;
mod metrics;
mod outcome;
mod registry;
mod request;
mod spec;
mod units;

pub use agora_fn_api::outbound;
pub use cgi::parse_cgi_response;
pub use error::FunctionError;
pub use function::{Captured, GuestOutput, RequestLog, GUEST_OUTPUT_LIMIT};
pub use function::{Function, Reading};
pub use host::{FunctionHost, HostConfig, EPOCH_TICK};
pub use http::{router, serve, serve_tcp, HttpConfig};
pub use metrics::{ErrorCounts, LatencyHistogram, MetricsSnapshot, LATENCY_BUCKETS_US};
pub use outcome::{ErrorClass, Failure};
pub use registry::FunctionRegistry;
pub use request::FunctionRequest;
pub use spec::{
    is_valid_name, FunctionSpec, GuestKind, ModuleSource, DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT,
    MAX_NAME_LEN, MAX_TIMEOUT,
};
