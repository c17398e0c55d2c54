//! `fetch-http`: a `wasi:http/proxy` component that calls out with
//! `wasi:http/outgoing-handler`, for the tests of Agora's outbound allow-list.
//!
//! `GET /?url=http://HOST[:PORT]/PATH` fetches that URL (percent-encoded or not; up to
//! the next `&`) and answers `200 OK` with `upstream status CODE`, a newline and the
//! upstream body (its first MiB). `&n=COUNT` (1 to 64) fetches it COUNT times, one
//! after the other, and answers with the last. When a fetch fails the answer is `502`
//! with the error code (`HttpRequestDenied`, `ConnectionRefused`, ...) and, after
//! earlier successes, how many there were. A request without a usable `url` gets
//! `400` and a usage line.

use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};
use wasi::io::streams::StreamError;

/// Most fetches one request may ask for.
const MAX_FETCHES: u32 = 64;
/// Most of an upstream body kept; the rest is not read.
const MAX_BODY: usize = 1 << 20;
/// Bytes asked for per read of the upstream body.
const READ_CHUNK: u64 = 64 * 1024;

const USAGE: &str = "usage: GET /?url=http://HOST[:PORT]/PATH[&n=COUNT]\n";

struct FetchHttp;

wasi::http::proxy::export!(FetchHttp);

impl wasi::exports::http::incoming_handler::Guest for FetchHttp {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let query = path.split_once('?').map_or("", |(_, q)| q);
        let (status, body) = answer(query);
        respond(response_out, status, body.as_bytes());
    }
}

/// The status and body for a request with this query string.
fn answer(query: &str) -> (u16, String) {
    let Some(url) = param(query, "url").and_then(percent_decode) else {
        return (400, USAGE.into());
    };
    let count = match param(query, "n") {
        None => 1,
        Some(n) => match n.parse::<u32>() {
            Ok(n) if (1..=MAX_FETCHES).contains(&n) => n,
            _ => return (400, format!("n must be 1 to {MAX_FETCHES}\n{USAGE}")),
        },
    };
    let target = match Target::parse(&url) {
        Ok(t) => t,
        Err(why) => return (400, format!("{why}\n{USAGE}")),
    };
    let mut last = (0, Vec::new());
    for done in 0..count {
        match fetch(&target) {
            Ok(got) => last = got,
            Err(why) if done == 0 => return (502, format!("{why}\n")),
            Err(why) => return (502, format!("{why} after {done} successful fetches\n")),
        }
    }
    let (status, body) = last;
    (
        200,
        format!(
            "upstream status {status}\n{}",
            String::from_utf8_lossy(&body)
        ),
    )
}

/// The value of `name` in a query string, as written.
fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `%XX` escapes decoded; `None` if the result is not UTF-8 or an escape is cut.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where to send the request: `http[s]://AUTHORITY[/PATH][?QUERY]`.
struct Target {
    scheme: Scheme,
    authority: String,
    path_with_query: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            return Err(format!("url {url:?} is not http:// or https://"));
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() {
            return Err(format!("url {url:?} has no host"));
        }
        let path_with_query = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(Target {
            scheme,
            authority: authority.to_string(),
            path_with_query,
        })
    }
}

/// One GET of `target`: the upstream status and (the first [`MAX_BODY`] bytes of) its
/// body, or the error code's name.
fn fetch(target: &Target) -> Result<(u16, Vec<u8>), String> {
    let request = OutgoingRequest::new(Fields::new());
    request
        .set_scheme(Some(&target.scheme))
        .map_err(|()| "the host refused the scheme".to_string())?;
    request
        .set_authority(Some(&target.authority))
        .map_err(|()| format!("the host refused the authority {:?}", target.authority))?;
    request
        .set_path_with_query(Some(&target.path_with_query))
        .map_err(|()| format!("the host refused the path {:?}", target.path_with_query))?;
    let future = outgoing_handler::handle(request, None).map_err(|e| code_name(&e))?;
    let response = loop {
        match future.get() {
            None => future.subscribe().block(),
            Some(Ok(Ok(response))) => break response,
            Some(Ok(Err(code))) => return Err(code_name(&code)),
            Some(Err(())) => return Err("the response was already taken".into()),
        }
    };
    let status = response.status();
    let body = response
        .consume()
        .map_err(|()| "the response body was already taken".to_string())?;
    let stream = body
        .stream()
        .map_err(|()| "the response body stream was already taken".to_string())?;
    let mut out = Vec::new();
    while out.len() < MAX_BODY {
        match stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => {
                let room = MAX_BODY - out.len();
                out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(format!(
                    "reading the upstream body failed: {}",
                    e.to_debug_string()
                ))
            }
        }
    }
    Ok((status, out))
}

/// `HttpRequestDenied`, `ConnectionRefused`, ...: the code's name, with its payload
/// if it has one.
fn code_name(code: &ErrorCode) -> String {
    let text = format!("{code:?}");
    match text.strip_prefix("ErrorCode::") {
        Some(name) => name.to_string(),
        None => text,
    }
}

fn respond(response_out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::new();
    // A valid name and value: cannot fail; ignore rather than abort if a host disagrees.
    let _ = headers.append(&"content-type".to_string(), &b"text/plain".to_vec());
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(outgoing) = response.body() else {
        return;
    };
    ResponseOutparam::set(response_out, Ok(response));
    let Ok(out) = outgoing.write() else {
        return;
    };
    // At most 4096 bytes per write (wasi:io's guaranteed minimum); a failed write
    // means the client went away, and then there is no one to tell.
    for chunk in body.chunks(4096) {
        if out.blocking_write_and_flush(chunk).is_err() {
            break;
        }
    }
    drop(out);
    let _ = OutgoingBody::finish(outgoing, None);
}
