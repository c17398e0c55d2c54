//! CGI/1.1 (RFC 3875) for WASI preview 1 functions: the request becomes environment
//! variables and stdin; the guest's stdout is parsed back into an HTTP response.
//!
//! Only the parts of CGI that make sense without a web server around the guest are
//! kept: no `PATH_TRANSLATED`, no local redirects (a `Location` without a `Status`
//! becomes a `302`, as most servers do for absolute URLs). The response parser is
//! `agora_fn_api::cgi` (pure, fuzzed on its own).

use crate::outcome::{ErrorClass, Failure};
use axum::http::header;
use axum::http::{Response, Version};
use bytes::Bytes;

use crate::request::FunctionRequest;

/// `SERVER_SOFTWARE`.
const SERVER_SOFTWARE: &str = concat!("agora-functions/", env!("CARGO_PKG_VERSION"));

/// The CGI meta-variables for `request` to function `name`, in a stable order.
pub(crate) fn meta_variables(name: &str, request: &FunctionRequest) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(12 + request.headers.len());
    let mut set = |k: &str, v: String| env.push((k.to_string(), v));
    set("GATEWAY_INTERFACE", "CGI/1.1".to_string());
    set("SERVER_SOFTWARE", SERVER_SOFTWARE.to_string());
    set("SERVER_PROTOCOL", protocol(request.version).to_string());
    set("REQUEST_METHOD", request.method.as_str().to_string());
    set("SCRIPT_NAME", format!("/fn/{name}"));
    set("PATH_INFO", request.path_info.clone());
    set("QUERY_STRING", request.query.clone());
    if !request.body.is_empty() {
        set("CONTENT_LENGTH", request.body.len().to_string());
    }
    if let Some(ct) = request.headers.get(header::CONTENT_TYPE) {
        set(
            "CONTENT_TYPE",
            String::from_utf8_lossy(ct.as_bytes()).into_owned(),
        );
    }
    if let Some(host) = request.headers.get(header::HOST) {
        let host = String::from_utf8_lossy(host.as_bytes());
        let (server, port) = match host.rsplit_once(':') {
            Some((server, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                (server.to_string(), port.to_string())
            }
            _ => (host.to_string(), "80".to_string()),
        };
        set("SERVER_NAME", server);
        set("SERVER_PORT", port);
    }
    if let Some(addr) = &request.remote_addr {
        set("REMOTE_ADDR", addr.clone());
    }

    // HTTP_*: one variable per header name, repeated values joined with ", ". The body
    // headers are already CONTENT_TYPE/CONTENT_LENGTH (RFC 3875 section 4.1.18).
    for name in request.headers.keys() {
        if name == header::CONTENT_TYPE || name == header::CONTENT_LENGTH {
            continue;
        }
        let values: Vec<String> = request
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let var = format!(
            "HTTP_{}",
            name.as_str().to_ascii_uppercase().replace('-', "_")
        );
        env.push((var, values.join(", ")));
    }
    env
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Parses a CGI response: header lines (`\n` or `\r\n`), a blank line, the body.
/// What is wrong with the output is a bad-response [`Failure`] (a 502 with a short
/// sentence saying why).
pub fn parse_cgi_response(output: Bytes) -> Result<Response<Bytes>, Failure> {
    #[cfg(test)]
    test_hook::panic_on_marker(&output);
    agora_fn_api::cgi::parse_response(output)
        .map_err(|e| Failure::new(ErrorClass::BadResponse, e.to_string()))
}

/// Removes the headers the server sets itself (`agora_fn_api::cgi`).
pub(crate) fn strip_hop_by_hop(headers: &mut axum::http::HeaderMap) {
    agora_fn_api::cgi::strip_hop_by_hop(headers)
}

/// Tests only: a guest output carrying [`test_hook::PANIC_MARKER`] makes the
/// response handling panic, so that tests can show what a panic there costs (that
/// request, not its connection).
#[cfg(test)]
pub(crate) mod test_hook {
    /// The bytes that trigger the panic.
    pub(crate) const PANIC_MARKER: &[u8] = b"agora-test-panic-in-cgi-handling";

    pub(crate) fn panic_on_marker(output: &[u8]) {
        if output
            .windows(PANIC_MARKER.len())
            .any(|w| w == PANIC_MARKER)
        {
            panic!("test hook: the guest's output asked for a panic in CGI response handling");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::HeaderValue;
    use axum::http::{HeaderMap, Method};

    #[test]
    fn builds_meta_variables() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("example.com:8080"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let request = FunctionRequest {
            method: Method::POST,
            path_info: "/a/b".to_string(),
            query: "x=1".to_string(),
            version: Version::HTTP_11,
            headers,
            body: Bytes::from_static(b"hello"),
            remote_addr: Some("127.0.0.1".to_string()),
        };
        let env = meta_variables("echo", &request);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("REQUEST_METHOD"), Some("POST"));
        assert_eq!(get("SCRIPT_NAME"), Some("/fn/echo"));
        assert_eq!(get("PATH_INFO"), Some("/a/b"));
        assert_eq!(get("QUERY_STRING"), Some("x=1"));
        assert_eq!(get("CONTENT_LENGTH"), Some("5"));
        assert_eq!(get("CONTENT_TYPE"), Some("text/plain"));
        assert_eq!(get("SERVER_NAME"), Some("example.com"));
        assert_eq!(get("SERVER_PORT"), Some("8080"));
        assert_eq!(get("HTTP_X_MULTI"), Some("a, b"));
        assert_eq!(get("HTTP_HOST"), Some("example.com:8080"));
        assert_eq!(get("HTTP_CONTENT_TYPE"), None);
    }
}
