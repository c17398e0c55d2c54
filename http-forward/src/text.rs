//! The doors' short plain-text answers.

use axum::body::Body;
use axum::http::header::{self, HeaderValue};
use axum::http::{Response, StatusCode};

/// `status` with `text` as a `text/plain; charset=utf-8` body: every refusal and
/// error the HTTP doors write themselves (the agent's, the master's gateway, a
/// function host's, and a panicking request's 500).
pub fn plain_text(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
