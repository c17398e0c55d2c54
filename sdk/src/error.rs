//! The one error type of `agora-sdk`. Messages are whole sentences, cause included
//! (so `{e}` and `{e:#}` print the same); the CLI prints them as they are.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reaching the master failed (address, certificates, no answer, a frame).
    #[error(transparent)]
    Net(#[from] agora_net::Error),
    /// No `--config`/`AGORA_CONFIG` was given and no local `agora dev` wrote one.
    #[error(
        "no client config found: start a cluster with `agora dev` (it writes ~/.agora/dev/client.json), \
         or pass --config FILE / set AGORA_CONFIG"
    )]
    NoConfig,
    #[error("the client config names no master")]
    NoMaster,
    #[error("cannot read the client config {}: {cause}", .path.display())]
    ReadConfig {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "the client config {} is not valid JSON of the expected shape: {cause}",
        .path.display()
    )]
    BadConfig {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("cannot write {}: {cause}", .path.display())]
    WriteConfig {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A file to upload could not be read.
    #[error("cannot read {}: {cause}", .path.display())]
    ReadFile {
        path: PathBuf,
        cause: agora_net::Error,
    },
    /// The connection to the master broke and dialling it again did not help.
    #[error("master connection lost: {0}")]
    ConnectionLost(quinn::ConnectionError),
    /// A stream to the master was closed under us.
    #[error("the stream to the master is closed: {0}")]
    StreamClosed(#[from] quinn::ClosedStream),
    /// An operator request got no answer in time.
    #[error("the master did not answer within 30 s")]
    NoAnswer,
    /// The master closed an operator request's stream without an answer.
    #[error("the master refused the request: {0}")]
    RequestRefused(String),
    /// The master answered an operator request with an error: its words.
    #[error("{0}")]
    Master(String),
    /// The master refused an upload before any byte was sent.
    #[error("upload refused: {0}")]
    UploadRefused(String),
    /// The master closed the upload stream at once (the text is its reason).
    #[error("the master refused the upload: {0}")]
    UploadClosed(String),
    #[error("the master closed the upload stream")]
    UploadEnded,
    /// The master refused the bytes of an upload (size or hash mismatch, ...).
    #[error("{0}")]
    UploadFailed(String),
    /// A TEARDOWN was sent but the master did not close the session in time.
    #[error("the master did not confirm the TEARDOWN within {0:?}; the framework ends when its failover timeout does")]
    TeardownUnconfirmed(Duration),
    /// The scheduler session is over: no call can be sent.
    #[error("the connection to the master is closed")]
    Closed,
    /// SUBSCRIBE was refused, or could not be sent or answered.
    #[error("{0}")]
    Subscribe(String),
    /// The master refused a SET_STATE (its words).
    #[error("{0}")]
    StateRefused(String),
    #[error("the scheduler session ended before the master stored {key:?}")]
    StateSessionEnded { key: String },
    #[error("the master did not confirm storing {key:?} within {timeout:?} (unreachable?)")]
    StateTimeout { key: String, timeout: Duration },
}

impl From<agora_net::FrameError> for Error {
    fn from(e: agora_net::FrameError) -> Error {
        Error::Net(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
