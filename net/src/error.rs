//! The one error type of `agora-net`: what failed while setting up certificates,
//! reaching a peer or moving an artifact, in words a user can act on.
//!
//! Each message is the whole sentence, cause included, so `{e}` and `{e:#}` print the
//! same thing; only wrapped lower errors (`Frame`, `Io`) are transparent.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::frame::FrameError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A read or write failed without more to say than the operating system's words.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A file or socket operation failed; `what` says which ("cannot write /x/ca.key").
    #[error("{what}: {cause}")]
    File { what: String, cause: std::io::Error },
    /// A certificate or key file is missing, unreadable or unusable; the message names
    /// the file and says what to do.
    #[error("{0}")]
    Certificates(String),
    /// Generating or signing a certificate, or building a TLS configuration, failed.
    #[error("{what}: {cause}")]
    Tls { what: String, cause: String },
    /// The master did not answer within the time bound.
    #[error(
        "no answer from the master at {addr} within {}: is it running? check --master / AGORA_MASTER",
        agora_proto::units::format_duration(*.timeout)
    )]
    NoAnswer {
        addr: SocketAddr,
        timeout: std::time::Duration,
    },
    /// A connection to the master could not be made or was refused; the message says
    /// why (certificates of another cluster, not an Agora master, ...).
    #[error("{0}")]
    Connect(String),
    /// No master of the group leads (an election is on, or a majority is down).
    #[error("no master leads the group now ({0}); if this lasts, a majority of the masters may be down: check `agora masters`")]
    NoLeader(String),
    /// An address given by the user is not HOST:PORT or does not resolve.
    #[error("{0}")]
    Address(String),
    /// An artifact is larger than any this cluster accepts.
    #[error("artifact of {size} bytes exceeds the limit of {limit} bytes")]
    ArtifactTooLarge { size: u64, limit: u64 },
    /// An artifact's destination has no directory to put it in.
    #[error("{} has no parent directory", .0.display())]
    NoParent(PathBuf),
    /// The sender's stream ended early.
    #[error("stream ended after {got} of {expected} bytes")]
    TransferTruncated { got: u64, expected: u64 },
    /// The sender sent more than it announced.
    #[error("sender sent more than the announced {expected} bytes")]
    TransferOversized { expected: u64 },
    /// The size received differs from the size announced.
    #[error("received {got} bytes, expected {expected}")]
    TransferSize { got: u64, expected: u64 },
    /// The bytes received do not have the announced sha256.
    #[error("content hash is {got}, expected {expected}")]
    TransferHash { got: String, expected: String },
}

impl Error {
    /// An I/O failure with the context that says what was being done.
    pub(crate) fn file(what: impl Into<String>, cause: std::io::Error) -> Error {
        Error::File {
            what: what.into(),
            cause,
        }
    }

    pub(crate) fn tls(what: impl Into<String>, cause: impl std::fmt::Display) -> Error {
        Error::Tls {
            what: what.into(),
            cause: cause.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
