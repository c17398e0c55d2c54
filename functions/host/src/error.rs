//! The one error type of `agora-fn-host`: why the function host executor could not
//! start or ended badly.

use std::path::PathBuf;

use agora_executor_link::LinkError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The link to the agent broke (a bad frame, or the agent did not come back).
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot start the function host: {0}")]
    Host(agora_fn_runtime::FunctionError),
    #[error("cannot connect to the agent at {}: {cause}", .socket.display())]
    Connect {
        socket: PathBuf,
        cause: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
