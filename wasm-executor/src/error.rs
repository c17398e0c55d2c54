//! The one error type of `agora-wasm-executor`: why the executor could not start or
//! ended badly, and why a module was refused before it was submitted.

use agora_executor_link::LinkError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The link to the agent broke (a bad frame, or the agent did not come back).
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// wasmtime could not be set up (the message says which part).
    #[error("{0}")]
    Engine(String),
    /// A module `validate_module` refused: the sentence a failed task would carry.
    #[error("{0}")]
    InvalidModule(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
