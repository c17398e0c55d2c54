//! The one place where every way a request can fail becomes an HTTP status, a class
//! for the metrics and a short plain-text reason.

use std::time::Duration;

use agora_proto::units::{format_bytes, format_duration};
use axum::http::header::{self, HeaderValue};
use axum::http::{Response, StatusCode};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use wasmtime::Trap;

use crate::error::error_text;

/// Why a request failed, for the per-function error counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The request burnt all its fuel (500).
    Fuel,
    /// The request hit its memory limit (500).
    Memory,
    /// The request ran past its deadline (504).
    Deadline,
    /// The guest trapped or exited with a non-zero code for another reason (500).
    Trap,
    /// The guest's answer was not a valid response (502).
    BadResponse,
    /// The guest's answer was larger than the output limit (502).
    OutputLimit,
    /// The function's queue was full (429).
    QueueFull,
    /// The request waited in the queue longer than allowed (503).
    QueueTimeout,
    /// The host had no free instance slot (503).
    Overloaded,
    /// Something failed in the host itself (500).
    Internal,
}

impl ErrorClass {
    /// All classes, in the order the metrics list them.
    pub const ALL: [ErrorClass; 10] = [
        ErrorClass::Fuel,
        ErrorClass::Memory,
        ErrorClass::Deadline,
        ErrorClass::Trap,
        ErrorClass::BadResponse,
        ErrorClass::OutputLimit,
        ErrorClass::QueueFull,
        ErrorClass::QueueTimeout,
        ErrorClass::Overloaded,
        ErrorClass::Internal,
    ];

    /// The HTTP status a failure of this class answers with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorClass::Fuel | ErrorClass::Memory | ErrorClass::Trap | ErrorClass::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ErrorClass::Deadline => StatusCode::GATEWAY_TIMEOUT,
            ErrorClass::BadResponse | ErrorClass::OutputLimit => StatusCode::BAD_GATEWAY,
            ErrorClass::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            ErrorClass::QueueTimeout | ErrorClass::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub(crate) fn index(self) -> usize {
        ErrorClass::ALL.iter().position(|&c| c == self).unwrap_or(0)
    }
}

/// A request that did not get the guest's own answer: what to send instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The class, which also fixes the status.
    pub class: ErrorClass,
    /// A short reason, sent as the plain-text body: e.g. `deadline of 5s exceeded`.
    pub message: String,
    /// For overload answers: when to try again (`Retry-After`, whole seconds).
    pub retry_after: Option<u64>,
}

impl Failure {
    /// A failure of `class`, with the sentence its answer carries.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Failure {
            class,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The HTTP status to answer with.
    pub fn status(&self) -> StatusCode {
        self.class.status()
    }

    /// The HTTP answer: the status, `text/plain` with the reason and a newline, and
    /// `Retry-After` when set.
    pub fn to_response(&self, function: &str) -> Response<Bytes> {
        let body = format!("function {function}: {}\n", self.message);
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// What the host saw when a guest ran, before it is turned into a [`Failure`].
pub(crate) struct GuestEnd<'a> {
    /// The error the guest call (or instantiation) returned.
    pub error: &'a wasmtime::Error,
    /// Set when the epoch callback stopped the guest at its deadline.
    pub deadline_hit: bool,
    /// The memory limit, when a growth past it was refused.
    pub memory_denied: Option<u64>,
    /// The request's fuel, when limited.
    pub fuel_limit: Option<u64>,
    /// The request's deadline.
    pub timeout: Duration,
    /// The output pipe filled up.
    pub output_full: Option<u64>,
}

/// Classifies a guest that ended in an error. `exit(0)` is not an error and never
/// gets here.
pub(crate) fn classify(end: &GuestEnd<'_>) -> Failure {
    if end.deadline_hit {
        return deadline(end.timeout);
    }
    let trap = end.error.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::OutOfFuel) {
        let fuel = end.fuel_limit.unwrap_or(u64::MAX);
        return Failure::new(ErrorClass::Fuel, format!("fuel limit of {fuel} exhausted"));
    }
    // A refused growth explains the failure that follows it (Rust's allocator aborts
    // with a trap; other programs exit non-zero).
    if let Some(limit) = end.memory_denied {
        return Failure::new(
            ErrorClass::Memory,
            format!("memory limit of {} reached", format_bytes(limit)),
        );
    }
    if let Some(limit) = end.output_full {
        return output_limit(limit);
    }
    if let Some(exit) = end.error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Failure::new(ErrorClass::Trap, format!("exited with code {}", exit.0));
    }
    if end
        .error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return Failure::new(
            ErrorClass::Overloaded,
            format!(
                "no free instance slot on this host ({})",
                error_text(end.error)
            ),
        );
    }
    let text = error_text(end.error);
    match trap {
        Some(trap) => Failure::new(ErrorClass::Trap, format!("trapped: {trap}")),
        None => Failure::new(ErrorClass::Trap, format!("failed: {text}")),
    }
}

pub(crate) fn deadline(timeout: Duration) -> Failure {
    Failure::new(
        ErrorClass::Deadline,
        format!("deadline of {} exceeded", format_duration(timeout)),
    )
}

pub(crate) fn output_limit(limit: u64) -> Failure {
    Failure::new(
        ErrorClass::OutputLimit,
        format!(
            "response larger than the output limit of {}",
            format_bytes(limit)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(error: &wasmtime::Error) -> GuestEnd<'_> {
        GuestEnd {
            error,
            deadline_hit: false,
            memory_denied: None,
            fuel_limit: Some(1000),
            timeout: Duration::from_secs(5),
            output_full: None,
        }
    }

    #[test]
    fn limits_are_named() {
        let fuel = wasmtime::Error::new(Trap::OutOfFuel);
        let f = classify(&end(&fuel));
        assert_eq!(
            (f.class, f.message.as_str()),
            (ErrorClass::Fuel, "fuel limit of 1000 exhausted")
        );
        assert_eq!(f.status(), StatusCode::INTERNAL_SERVER_ERROR);

        let unreachable = wasmtime::Error::new(Trap::UnreachableCodeReached);
        let mut e = end(&unreachable);
        e.memory_denied = Some(64 << 20);
        assert_eq!(classify(&e).message, "memory limit of 64MiB reached");
        e.deadline_hit = true;
        let f = classify(&e);
        assert_eq!(
            (f.class, f.message.as_str()),
            (ErrorClass::Deadline, "deadline of 5s exceeded")
        );
        assert_eq!(f.status(), StatusCode::GATEWAY_TIMEOUT);

        let exit = wasmtime::Error::new(wasmtime_wasi::I32Exit(3));
        assert_eq!(classify(&end(&exit)).message, "exited with code 3");
    }

    #[test]
    fn responses_carry_reason_and_retry_after() {
        let mut f = Failure::new(ErrorClass::QueueFull, "queue full");
        f.retry_after = Some(2);
        let r = f.to_response("echo");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.body().as_ref(), b"function echo: queue full\n");
    }
}
