//! The one error type of `agora-fn-host`: why the function host executor could not
//! start or ended badly.

use agora_executor_link::LinkError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The link to the agent broke (a bad frame, or the agent did not come back).
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot start the function host: {0}")]
    Host(agora_fn_runtime::FunctionError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
