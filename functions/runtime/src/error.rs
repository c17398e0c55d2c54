//! The crate's error type: why a function could not be loaded or the host not set up.
//!
//! What goes wrong while serving a request is not an error of this kind but an HTTP
//! answer ([`crate::Failure`]); the function stays loaded and keeps serving.

use std::path::PathBuf;

/// Why a function could not be loaded, or the host could not be created. Every
/// message names the object at fault and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// The spec asks for something invalid (bad name, zero concurrency, ...).
    #[error("function {name:?}: {message}")]
    InvalidSpec {
        /// The function's name as given.
        name: String,
        /// What is wrong with the spec.
        message: String,
    },
    /// The module file could not be read.
    #[error("function {name:?}: cannot read module {}: {cause}", path.display())]
    ReadModule {
        /// The function's name.
        name: String,
        /// The file that was read.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The bytes are not something this host can run, or do not match their sha256.
    #[error("function {name:?}: {message}")]
    InvalidModule {
        /// The function's name.
        name: String,
        /// What is wrong with the module, as a sentence.
        message: String,
    },
    /// The wasmtime engine (or something it needs) could not be set up.
    #[error("cannot set up the function host: {0}")]
    Host(String),
}

impl FunctionError {
    pub(crate) fn spec(name: &str, message: impl Into<String>) -> Self {
        FunctionError::InvalidSpec {
            name: name.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn module(name: &str, message: impl Into<String>) -> Self {
        FunctionError::InvalidModule {
            name: name.to_string(),
            message: message.into(),
        }
    }
}

/// An error and its causes on one line, without repeats (wasmtime's errors carry the
/// same text at several levels of their chain).
pub(crate) fn error_text(e: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let line = cause.to_string();
        let line = line.lines().next().unwrap_or("").trim().to_string();
        if !line.is_empty() && !parts.iter().any(|p| p.contains(&line)) {
            parts.push(line);
        }
    }
    parts.join(": ")
}
