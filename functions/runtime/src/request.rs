//! A request to a function, as the host hands it over, independent of how it arrived.

use axum::http::{HeaderMap, Method, Version};
use bytes::Bytes;

/// One invocation of a function: the HTTP request with the `/fn/NAME` prefix taken
/// off and the body already read (and size-capped) by the caller.
#[derive(Clone, Debug)]
pub struct FunctionRequest {
    /// The HTTP method.
    pub method: Method,
    /// The path after `/fn/NAME`, as sent (not percent-decoded): empty or starting
    /// with `/`.
    pub path_info: String,
    /// The raw query string, without the `?`; empty when there is none.
    pub query: String,
    /// HTTP version of the request (CGI's `SERVER_PROTOCOL`).
    pub version: Version,
    /// The request headers.
    pub headers: HeaderMap,
    /// The whole request body.
    pub body: Bytes,
    /// The client's address, when known (CGI's `REMOTE_ADDR`).
    pub remote_addr: Option<String>,
}

impl FunctionRequest {
    /// A bodiless `GET` of `path_info` (with an optional `?query`), for tests and tools.
    pub fn get(path_and_query: &str) -> Self {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, query),
            None => (path_and_query, ""),
        };
        FunctionRequest {
            method: Method::GET,
            path_info: path.to_string(),
            query: query.to_string(),
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            remote_addr: None,
        }
    }

    /// `path_info` and `?query` together; `/` when both are empty.
    pub fn path_and_query(&self) -> String {
        let path = if self.path_info.is_empty() {
            "/"
        } else {
            &self.path_info
        };
        if self.query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", self.query)
        }
    }
}
