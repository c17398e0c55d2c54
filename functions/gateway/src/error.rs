//! The one error type of `agora-fn-gateway`: why an `agora fn` request or the
//! gateway's start failed, in words the operator can act on. Each message is the
//! whole sentence, cause included, so `{e}` and `{e:#}` agree.
//!
//! (`WaitError`, why one HTTP request found no host, is an answer the front door maps
//! to a status code, not an error of this crate's API.)

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to the master failed.
    #[error(transparent)]
    Sdk(#[from] agora_sdk::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The certificates for agents' HTTPS doors could not be loaded.
    #[error(transparent)]
    Tls(#[from] agora_net::Error),
    #[error("cannot listen for HTTP on {bind} (in use? pass another --http address): {cause}")]
    HttpBind {
        bind: SocketAddr,
        cause: std::io::Error,
    },
    /// A deploy or a tenant limit was refused; the message names what to change.
    #[error("{0}")]
    Invalid(String),
    #[error("no function named {0:?} is deployed (see `agora fn ls`)")]
    UnknownFunction(String),
    #[error("the functions framework has not subscribed to the master yet; try again in a moment")]
    NotSubscribed,
    #[error("function {name} not deployed: {cause}")]
    NotDeployed { name: String, cause: Box<Error> },
    #[error("tenant limit of role {role} not set: {cause}")]
    TenantLimitNotSet { role: String, cause: Box<Error> },
    #[error("function {name} not removed: {cause}")]
    NotRemoved { name: String, cause: Box<Error> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
