//! The CGI/1.1 response (RFC 3875 section 6) a WASI preview 1 function writes on its
//! stdout, parsed into an HTTP response: header lines (`\n` or `\r\n`), a blank
//! line, the body. `Status` sets the status (a `Location` without one is a `302`);
//! the headers that frame the body or describe the connection are dropped, as the
//! server frames the body itself.
//!
//! Pure (no wasmtime, no I/O), so that it can be fuzzed on its own (`fuzz/`, target
//! `cgi`): any bytes give either a response or an [`Error::BadCgiResponse`] saying
//! what is wrong, never a panic.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::Error;

/// Most header lines a response may have.
pub const MAX_RESPONSE_HEADERS: usize = 100;

/// Parses a CGI response; what is wrong with it is an [`Error::BadCgiResponse`], a
/// sentence saying why.
pub fn parse_response(output: Bytes) -> Result<Response<Bytes>, Error> {
    parse(output).map_err(Error::BadCgiResponse)
}

fn parse(output: Bytes) -> Result<Response<Bytes>, String> {
    if output.is_empty() {
        return Err("the function wrote nothing on stdout (a CGI response needs headers, a blank line and a body)".to_string());
    }
    let (head_len, body_start) = find_head_end(&output).ok_or_else(|| {
        "the function's output has no blank line after its headers, so it is not a CGI response"
            .to_string()
    })?;
    if head_len == 0 {
        return Err("the function's output starts with a blank line: a CGI response needs at least one header, e.g. Content-Type".to_string());
    }
    let head = output.get(..head_len).unwrap_or_default();

    let mut status: Option<StatusCode> = None;
    let mut headers = HeaderMap::new();
    for (index, raw) in head.split(|&b| b == b'\n').enumerate() {
        let line_no = index + 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if headers.len() >= MAX_RESPONSE_HEADERS {
            return Err(format!(
                "the function's response has more than {MAX_RESPONSE_HEADERS} headers"
            ));
        }
        let mut parts = line.splitn(2, |&b| b == b':');
        let name = parts.next().unwrap_or_default();
        let value = trim(parts.next().ok_or_else(|| {
            format!(
                "header line {line_no} of the function's output has no ':' ({:?})",
                preview(line)
            )
        })?);
        if name.eq_ignore_ascii_case(b"status") {
            status = Some(parse_status(value).ok_or_else(|| {
                format!(
                    "the function's Status header {:?} is not a status code like `404 Not Found`",
                    preview(value)
                )
            })?);
            continue;
        }
        let name = HeaderName::from_bytes(name).map_err(|_| {
            format!(
                "header line {line_no} of the function's output has an invalid name {:?}",
                preview(name)
            )
        })?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| format!("header {name} of the function's output has an invalid value"))?;
        // The server frames the body itself; these would contradict it.
        if is_hop_by_hop(&name) {
            continue;
        }
        headers.append(name, value);
    }
    let status = status.unwrap_or(if headers.contains_key(header::LOCATION) {
        StatusCode::FOUND
    } else {
        StatusCode::OK
    });

    let body = output.slice(body_start..);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// (length of the header block, start of the body) for the first blank line.
fn find_head_end(output: &[u8]) -> Option<(usize, usize)> {
    // The output may start with the blank line itself (no headers at all).
    if output.starts_with(b"\r\n") {
        return Some((0, 2));
    }
    if output.starts_with(b"\n") {
        return Some((0, 1));
    }
    for (nl, _) in output.iter().enumerate().filter(|(_, b)| **b == b'\n') {
        let rest = output.get(nl + 1..).unwrap_or_default();
        let blank = if rest.starts_with(b"\r\n") {
            2
        } else if rest.starts_with(b"\n") {
            1
        } else {
            continue;
        };
        let head_end = if nl > 0 && output.get(nl - 1) == Some(&b'\r') {
            nl - 1
        } else {
            nl
        };
        return Some((head_end, nl + 1 + blank));
    }
    None
}

fn parse_status(value: &[u8]) -> Option<StatusCode> {
    let code = value.split(|&b| b == b' ').next()?;
    if code.len() != 3 {
        return None;
    }
    StatusCode::from_bytes(code).ok()
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// Removes the headers that describe the connection or the framing of the body, which
/// the server sets itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::CONTENT_LENGTH
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
}

/// At most 40 characters of a line, for error messages.
fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text.chars().take(40).collect();
    if text.chars().count() > 40 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Response<Bytes>, String> {
        parse_response(Bytes::copy_from_slice(s.as_bytes())).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_crlf_and_lf_responses() {
        let r = parse("Content-Type: text/plain\r\nX-A: 1\r\n\r\nhello").unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-a"], "1");
        assert_eq!(r.body().as_ref(), b"hello");

        let r = parse("Status: 404 Not Found\nContent-Type: text/plain\n\nnope\n").unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.body().as_ref(), b"nope\n");

        let r = parse("Location: https://example.com/\n\n").unwrap();
        assert_eq!(r.status(), StatusCode::FOUND);
        assert!(r.body().is_empty());
    }

    #[test]
    fn drops_framing_headers() {
        let r = parse("Content-Length: 999\nTransfer-Encoding: chunked\nX-B: 2\n\nbody").unwrap();
        assert!(r.headers().get("content-length").is_none());
        assert!(r.headers().get("transfer-encoding").is_none());
        assert_eq!(r.headers()["x-b"], "2");
    }

    #[test]
    fn rejects_what_is_not_cgi() {
        assert!(parse("").unwrap_err().contains("wrote nothing"));
        assert!(parse("just text").unwrap_err().contains("no blank line"));
        assert!(parse("\nbody").unwrap_err().contains("at least one header"));
        assert!(parse("\r\nbody")
            .unwrap_err()
            .contains("at least one header"));
        assert!(parse("no colon here\n\nbody")
            .unwrap_err()
            .contains("line 1"));
        assert!(parse("Status: teapot\n\n").unwrap_err().contains("Status"));
        assert!(parse("Bad Name: x\n\n")
            .unwrap_err()
            .contains("invalid name"));
    }
}
