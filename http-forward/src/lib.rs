//! One HTTP forwarding path for Agora's front doors (the master's, which forwards to
//! an agent over TCP, and each agent's, which forwards to a function host over its
//! Unix socket).
//!
//! What every hop does the same way:
//!
//! - **Headers.** One list of hop-by-hop headers ([`HOP_BY_HOP`], RFC 9110 section
//!   7.6.1, plus every header named in `Connection`) is removed from requests and
//!   responses; `X-Forwarded-For` gets the client's address appended. `Host` is
//!   passed on as the client sent it (the function sees the name it was called by).
//! - **One body limit**, [`MAX_BODY`] unless a caller sets [`Limits`] of its own,
//!   enforced while bodies stream: a request whose `Content-Length` is over it is
//!   refused before a byte of its body is read ([`Forward::new`]); a body without a
//!   length that passes it mid-stream ends the upstream request with an error (the
//!   upstream connection is aborted) and [`Forward::body_too_large`] says so, for a
//!   413 if no response has started (otherwise the client's connection is cut). A
//!   response is held to the same idea: over the limit by its `Content-Length`,
//!   [`Forward::response`] refuses it (a 502 for the caller); past it mid-stream, its
//!   body ends with an error, which cuts the client's connection.
//! - **Streaming both ways.** [`RequestBody`] hands the client's body frames to the
//!   upstream as they arrive and [`ResponseBody`] the upstream's frames to the client
//!   as they come: nothing here collects a body, so memory is bounded by the buffers
//!   of the connections, whatever the size of a body.
//! - **Retries.** A streamed body cannot be sent twice, so [`Forward::attempt`] makes
//!   one more upstream request only while the body has not been touched: the client's
//!   body sits in a slot until the first upstream request polls it. A caller may thus
//!   retry an attempt that failed before it sent anything (a refused connection), and
//!   no other.
//!
//! The forwarding types know HTTP types only (`http`, `http-body`): the callers bring
//! their own clients (hyper's pooled client over TCP, hyper connections over Unix
//! sockets) and their own error answers. [`serve`] is the one accept loop both doors
//! run: connection caps, header timeouts, bounded heads.

pub mod panics;
pub mod serve;
mod text;
pub use panics::catch_panics;
pub use serve::serve;
pub use text::plain_text;

use std::any::Any;
use std::error::Error as StdError;
use std::fmt;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};

/// The error type bodies carry.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The one body limit of function requests and responses, at every hop (the master,
/// the agent, the function host): 16 MiB. A guest's output is capped at the same
/// size by default, so a response within its guest's limits passes every hop.
pub const MAX_BODY: u64 = 16 << 20;

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1):
/// never forwarded, in either direction. `Proxy-Connection` is not standard but still
/// sent by some clients; the proxy authentication headers are meant for the proxy,
/// not the function. Headers named in `Connection` go too ([`strip_hop_by_hop`]).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Removes the hop-by-hop headers: those [`HOP_BY_HOP`] lists and those the
/// `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends `client` to `X-Forwarded-For` (one header, the values comma-separated,
/// earlier hops first).
pub fn add_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let earlier: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let value = if earlier.is_empty() {
        client.to_string()
    } else {
        format!("{}, {client}", earlier.join(", "))
    };
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// The `Content-Length` a message declares, if it declares one that parses.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The body limits of one front door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body passed upstream.
    pub request_body: u64,
    /// Largest response body passed back.
    pub response_body: u64,
}

impl Limits {
    /// The same limit both ways.
    pub const fn both(bytes: u64) -> Self {
        Limits {
            request_body: bytes,
            response_body: bytes,
        }
    }
}

impl Default for Limits {
    /// [`MAX_BODY`] both ways.
    fn default() -> Self {
        Limits::both(MAX_BODY)
    }
}

/// A body over its limit: declared so (`declared`, by `Content-Length`), or found so
/// while it streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    pub limit: u64,
    pub declared: Option<u64>,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.declared {
            Some(n) => write!(
                f,
                "body of {n} bytes is larger than the limit of {} bytes",
                self.limit
            ),
            None => write!(f, "body larger than the limit of {} bytes", self.limit),
        }
    }
}

impl StdError for TooLarge {}

/// Why a forwarded body ended early.
#[derive(Debug)]
pub enum BodyError {
    /// It passed its limit; what came before was passed on, the rest was not read.
    TooLarge(TooLarge),
    /// The peer it was read from failed (a client that left, a host that crashed).
    Peer(BoxError),
    /// An earlier attempt took the request body (a bug in the caller: see
    /// [`Forward::attempt`]).
    Taken,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::TooLarge(t) => t.fmt(f),
            BodyError::Peer(e) => write!(f, "the body was cut off: {e}"),
            BodyError::Taken => f.write_str("the request body went to an earlier attempt"),
        }
    }
}

impl StdError for BodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            BodyError::TooLarge(t) => Some(t),
            BodyError::Peer(e) => Some(e.as_ref()),
            BodyError::Taken => None,
        }
    }
}

/// What the attempts of one request share: the client's body until an attempt takes
/// it, and what became of it.
struct Shared<B> {
    body: Mutex<Option<B>>,
    /// Body bytes passed upstream.
    sent: AtomicU64,
    /// The body passed the limit.
    over_limit: AtomicBool,
    /// Reading the client's body failed.
    client_failed: AtomicBool,
}

/// One client request on its way upstream: its head with the hop-by-hop headers
/// removed and `X-Forwarded-For` added, and its body, not read yet.
pub struct Forward<B> {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    shared: Arc<Shared<B>>,
    size_hint: SizeHint,
    end_stream: bool,
    limits: Limits,
}

impl<B> Forward<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Takes a client's request, or refuses it at once (nothing of its body read)
    /// when its `Content-Length` is over `limits.request_body`. `client` is the
    /// address the request came from, for `X-Forwarded-For`.
    pub fn new(
        request: Request<B>,
        client: Option<IpAddr>,
        limits: Limits,
    ) -> Result<Self, TooLarge> {
        let (parts, body) = request.into_parts();
        if let Some(n) = declared_length(&parts.headers) {
            if n > limits.request_body {
                return Err(TooLarge {
                    limit: limits.request_body,
                    declared: Some(n),
                });
            }
        }
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        if let Some(ip) = client {
            add_forwarded_for(&mut headers, ip);
        }
        Ok(Forward {
            method: parts.method,
            uri: parts.uri,
            headers,
            size_hint: body.size_hint(),
            end_stream: body.is_end_stream(),
            shared: Arc::new(Shared {
                body: Mutex::new(Some(body)),
                sent: AtomicU64::new(0),
                over_limit: AtomicBool::new(false),
                client_failed: AtomicBool::new(false),
            }),
            limits,
        })
    }

    /// The request's method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request's URI as the client sent it.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The headers that will go upstream.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The limits this request is held to.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The upstream request for one attempt at `uri` (HTTP/1.1; the extensions of
    /// the client's request stay behind). None once an earlier attempt has taken the
    /// body, i.e. once it may have sent some of it: such a request cannot be sent
    /// again. An attempt that failed before its body was polled (the connection was
    /// refused, or a pooled connection was found closed before the request went on
    /// it) leaves the body for the next.
    pub fn attempt(&self, uri: Uri) -> Option<Request<RequestBody<B>>> {
        if !self.can_retry() {
            return None;
        }
        let mut request = Request::new(RequestBody {
            shared: Arc::clone(&self.shared),
            inner: None,
            size_hint: self.size_hint,
            end_stream: self.end_stream,
            limit: self.limits.request_body,
            done: false,
        });
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers.clone();
        Some(request)
    }

    /// Whether another attempt can still be made (no attempt has taken the body).
    pub fn can_retry(&self) -> bool {
        self.shared
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Whether the request body passed the limit while it streamed: then the
    /// attempt's error is that, and the client's answer is 413.
    pub fn body_too_large(&self) -> bool {
        self.shared.over_limit.load(Ordering::Acquire)
    }

    /// Whether reading the client's body failed (the client left or sent a broken
    /// body): then the attempt's error is that.
    pub fn client_body_failed(&self) -> bool {
        self.shared.client_failed.load(Ordering::Acquire)
    }

    /// Request body bytes passed upstream so far.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Acquire)
    }

    /// The upstream's response, to pass back to the client: hop-by-hop headers
    /// removed, its body held to `limits.response_body` as it streams. Refused when
    /// its `Content-Length` is over that already (the caller answers 502).
    pub fn response<R>(&self, response: Response<R>) -> Result<Response<ResponseBody<R>>, TooLarge>
    where
        R: Body<Data = Bytes> + Unpin,
        R::Error: Into<BoxError>,
    {
        let limit = self.limits.response_body;
        let (mut parts, body) = response.into_parts();
        // A response to HEAD declares the length of a body it does not carry.
        if self.method != Method::HEAD {
            if let Some(n) = declared_length(&parts.headers) {
                if n > limit {
                    return Err(TooLarge {
                        limit,
                        declared: Some(n),
                    });
                }
            }
        }
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, ResponseBody::new(body, limit)))
    }
}

/// The body of one upstream attempt: the client's body, taken from the request's
/// slot when first polled, passed on frame by frame, and ended with
/// [`BodyError::TooLarge`] (the rest left unread) once it passes the limit.
pub struct RequestBody<B> {
    shared: Arc<Shared<B>>,
    inner: Option<B>,
    size_hint: SizeHint,
    end_stream: bool,
    limit: u64,
    done: bool,
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let inner = match &mut this.inner {
            Some(inner) => inner,
            None => {
                let taken = this
                    .shared
                    .body
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                match taken {
                    Some(body) => this.inner.insert(body),
                    None => {
                        this.done = true;
                        return Poll::Ready(Some(Err(BodyError::Taken)));
                    }
                }
            }
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            None => {
                this.done = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                this.done = true;
                this.inner = None;
                this.shared.client_failed.store(true, Ordering::Release);
                Poll::Ready(Some(Err(BodyError::Peer(e.into()))))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    let sent = this.shared.sent.fetch_add(n, Ordering::AcqRel) + n;
                    if sent > this.limit {
                        // Not a byte more: the client's body is dropped unread, which
                        // tells its server to close the connection after the answer.
                        this.done = true;
                        this.inner = None;
                        this.shared.over_limit.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(BodyError::TooLarge(TooLarge {
                            limit: this.limit,
                            declared: None,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            _ if self.done => true,
            Some(b) => b.is_end_stream(),
            None => self.end_stream,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => self.size_hint,
        }
    }
}

/// An upstream response's body on its way back: passed on frame by frame, ended with
/// [`BodyError::TooLarge`] past its limit. It can hold what must live as long as the
/// response streams (a lease on a host, a tenant's slot: [`ResponseBody::hold`]) and
/// run something once it ended cleanly ([`ResponseBody::on_complete`], e.g. to put a
/// connection back in its pool).
pub struct ResponseBody<R> {
    inner: R,
    limit: u64,
    seen: u64,
    ended: bool,
    failed: bool,
    held: Vec<Box<dyn Any + Send>>,
    on_complete: Option<Box<dyn FnOnce() + Send>>,
    /// `R::is_end_stream`, for `Drop` (which cannot ask for `R: Body`).
    at_end: fn(&R) -> bool,
}

impl<R: Body> ResponseBody<R> {
    /// `inner`, held to `limit` bytes.
    pub fn new(inner: R, limit: u64) -> Self {
        ResponseBody {
            inner,
            limit,
            seen: 0,
            ended: false,
            failed: false,
            held: Vec::new(),
            on_complete: None,
            at_end: R::is_end_stream,
        }
    }
}

impl<R> ResponseBody<R> {
    /// Keeps `value` until the body has ended or is dropped.
    pub fn hold(mut self, value: impl Send + 'static) -> Self {
        self.held.push(Box::new(value));
        self
    }

    /// Runs `f` once the body has been read to its end without error (not when it is
    /// dropped before that, nor when it fails).
    pub fn on_complete(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_complete = Some(Box::new(f));
        self
    }

    fn finish(&mut self, clean: bool) {
        if let Some(f) = self.on_complete.take() {
            if clean {
                f();
            }
        }
        self.held.clear();
    }
}

impl<R> Body for ResponseBody<R>
where
    R: Body<Data = Bytes> + Unpin,
    R::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.ended || this.failed {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => {
                this.ended = true;
                this.finish(true);
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                this.failed = true;
                this.finish(false);
                Poll::Ready(Some(Err(BodyError::Peer(e.into()))))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.failed = true;
                        this.finish(false);
                        return Poll::Ready(Some(Err(BodyError::TooLarge(TooLarge {
                            limit: this.limit,
                            declared: None,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<R> Drop for ResponseBody<R> {
    fn drop(&mut self) {
        // A server may stop polling once the body says it is at its end (a known
        // length all read, or none at all); that is a clean end too.
        let clean = self.ended || (!self.failed && (self.at_end)(&self.inner));
        self.finish(clean);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_with_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("x"));
        h.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("x"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        h.insert(header::HOST, HeaderValue::from_static("example"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host", "x-kept"]);
    }

    #[test]
    fn forwarded_for_appends_to_earlier_hops() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let mut h = HeaderMap::new();
        add_forwarded_for(&mut h, ip);
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3");
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        add_forwarded_for(&mut h, "::1".parse().unwrap());
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, ::1");
    }

    #[test]
    fn a_declared_length_over_the_limit_is_refused_before_the_body() {
        let request = Request::post("/fn/x")
            .header(header::CONTENT_LENGTH, "11")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let refused = Forward::new(request, None, Limits::both(10)).err();
        assert_eq!(
            refused,
            Some(TooLarge {
                limit: 10,
                declared: Some(11)
            })
        );
    }
}
