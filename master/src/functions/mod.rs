//! The built-in functions framework and the master's HTTP front door for functions.
//!
//! `agora fn deploy` registers a function with the master (an operator request,
//! persisted in the registry before it is acknowledged). The functions framework, a
//! framework like any other written with `agora-sdk` and connected to this master
//! with the cluster's client certificate, places function hosts on agents through
//! offers (a host is a task with `TaskInfo.function`, run by `agora executor fn`),
//! scales them by the load it reads from the agents' `GET /fn-metrics`, and kills
//! them after idle. The master's HTTP server forwards `/fn/NAME/...` to an agent with
//! a running host, and holds requests for a function without one while a host starts
//! (cold start).
//!
//! - `planner`: the pure decisions (how many hosts, which to launch and kill);
//! - `service`: the state shared by the operator API, the framework and the HTTP
//!   server (deployed specs, hosts, load, requests waiting for a host);
//! - `framework`: the sdk loop carrying out the planner's decisions;
//! - `load`: polling the agents' metrics, and summing them per function;
//! - `proxy`: the HTTP routes (`/fn/...`, `/fn`, `/fn-metrics`, `/metrics`);
//! - `prometheus`: `/metrics` in Prometheus's text format.

mod framework;
mod load;
pub mod planner;
mod prometheus;
mod proxy;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use framework::{function_of_task, FRAMEWORK_NAME};
pub use service::{
    normalize, Functions, Persist, Recovered, DEFAULT_HOST_CPUS_MILLI, HOST_MEM_MARGIN,
};

/// How the master runs its functions framework and HTTP server.
#[derive(Debug, Clone)]
pub struct FunctionsConfig {
    /// Where the HTTP server listens (`/fn/...`, `/fn`, `/fn-metrics`); None: no HTTP.
    pub http: Option<SocketAddr>,
    /// Whether a failure to listen there stops the master. A default address that is
    /// taken (several masters on one machine) only costs the HTTP server, said in the
    /// log; an address the operator asked for must work.
    pub http_required: bool,
    /// The cluster's CA and a client certificate and key (role client), which the
    /// framework subscribes with.
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Hosts of a function that has had no request for this long are stopped, down
    /// to its `min_instances`.
    pub idle_timeout: Duration,
}

/// Largest request body the master forwards to a function.
pub const MAX_BODY: usize = 16 << 20;
/// Longest a request waits at the master for a host of its function to start.
pub const MAX_HOST_WAIT: Duration = Duration::from_secs(30);
/// Requests of one function that may wait at the master for a host at once.
pub const MAX_WAITERS: u32 = 1024;

pub(crate) use framework::run as run_framework;
pub(crate) use proxy::serve as serve_http;
