//! `wasi:http/proxy` components, run as `wasmtime serve` runs them: a fresh instance
//! per request from the function's `ProxyPre`, the request handed to the guest's
//! `wasi:http/incoming-handler`, the response it sets read back.
//!
//! They run on wasmtime's async API inside the request's own task. The epoch callback
//! yields to tokio at every tick, so a guest burning CPU shares its worker thread, and
//! dropping the future at the deadline cancels a guest that is blocked in the host.
//!
//! Differences from `wasmtime serve`: the guest sees the path after `/fn/NAME`
//! (so a component written for `/` works unchanged under any function name); outgoing
//! HTTP requests go only where the function's allow-list says ([`crate::outbound`];
//! others get `HTTP request denied`), at most [`MAX_OUTGOING_PER_REQUEST`] per
//! request, and time out by the request's deadline; the response is collected (up to
//! the output limit) before it is sent, so that a guest failing half-way through its
//! body gets a clean 5xx instead of a truncated 200; the guest's stdout and stderr are
//! captured for the request log (`wasmtime serve` inherits them).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, Request, Response, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{
    RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use crate::cgi;
use crate::error::{error_text, FunctionError};
use crate::function::CapturePipe;
use crate::limits::{self, HasLimits, LimitState, RequestLimits};
use crate::metrics::{FunctionMetrics, OutboundCounters};
use crate::outbound::OutboundAllowList;
use crate::outcome::{self, ErrorClass, Failure, GuestEnd};
use crate::request::FunctionRequest;

/// After the deadline, how long to wait for the epoch to stop a guest before the
/// request's future is dropped anyway (a guest blocked in a host call never sees the
/// epoch).
const DEADLINE_GRACE: Duration = Duration::from_millis(50);

/// Most outgoing HTTP requests one function request may send; more are denied, so
/// that one request cannot fan out without bound.
pub(crate) const MAX_OUTGOING_PER_REQUEST: u32 = 16;

/// Store data of one `wasi:http` request.
pub(crate) struct ProxyCtx {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutgoingHooks,
    limits: LimitState,
}

impl WasiView for ProxyCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ProxyCtx {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl HasLimits for ProxyCtx {
    fn limits(&mut self) -> &mut LimitState {
        &mut self.limits
    }
}

/// Outgoing requests of one function request: sent (by wasmtime-wasi-http's
/// `default_send_request`) when the function's allow-list names their scheme and
/// authority and the request has sent fewer than [`MAX_OUTGOING_PER_REQUEST`];
/// denied (`HttpRequestDenied`) otherwise. Their connect, first-byte and
/// between-bytes timeouts end by the request's deadline (a guest's request-options
/// may only shorten them); the whole call ends with the request's store anyway.
struct OutgoingHooks {
    allowed: OutboundAllowList,
    counters: Arc<OutboundCounters>,
    deadline: Instant,
    sent: u32,
}

type IoFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;

impl OutgoingHooks {
    /// Why `uri` may not be called now, if it may not.
    fn refusal(&self, uri: &Uri) -> Option<&'static str> {
        if !self.allowed.allows_uri(uri) {
            Some("not in the function's allowed outbound hosts")
        } else if self.sent >= MAX_OUTGOING_PER_REQUEST {
            Some("over the limit of outgoing requests per request")
        } else {
            None
        }
    }
}

impl WasiHttpHooks for OutgoingHooks {
    fn send_request(
        &mut self,
        request: axum::http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<
        dyn Future<Output = wasmtime_wasi_http::Result<(axum::http::Response<WasiBody>, IoFuture)>>
            + Send,
    > {
        if let Some(why) = self.refusal(request.uri()) {
            self.counters.record(false);
            tracing::debug!(
                scheme = request.uri().scheme_str().unwrap_or(""),
                authority = request.uri().authority().map_or("", |a| a.as_str()),
                why,
                "outgoing HTTP request denied"
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        self.sent += 1;
        self.counters.record(true);
        let options = bounded_options(
            options,
            self.deadline.saturating_duration_since(Instant::now()),
        );
        Box::new(async move {
            let (response, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as IoFuture,
            ))
        })
    }
}

/// The guest's timeouts, none longer than `remaining` (the time left until the
/// request's deadline), which is also the default of each.
fn bounded_options(options: Option<RequestOptions>, remaining: Duration) -> RequestOptions {
    let options = options.unwrap_or_default();
    let bound = |asked: Option<Duration>| Some(asked.map_or(remaining, |d| d.min(remaining)));
    RequestOptions {
        connect_timeout: bound(options.connect_timeout),
        first_byte_timeout: bound(options.first_byte_timeout),
        between_bytes_timeout: bound(options.between_bytes_timeout),
    }
}

/// The linker every component is prepared against: WASI 0.2 (the CLI interfaces
/// too, which Rust's std imports, like `wasmtime serve -S cli`) and `wasi:http`.
pub(crate) fn linker(engine: &Engine) -> Result<Linker<ProxyCtx>, FunctionError> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
        .map_err(|e| {
            FunctionError::Host(format!(
                "cannot add WASI and wasi:http to the component linker: {}",
                error_text(&e)
            ))
        })?;
    Ok(linker)
}

/// Resolves the component's imports once and checks that it exports
/// `wasi:http/incoming-handler`.
pub(crate) fn prepare(
    name: &str,
    linker: &Linker<ProxyCtx>,
    component: &Component,
) -> Result<ProxyPre<ProxyCtx>, FunctionError> {
    let pre = linker.instantiate_pre(component).map_err(|e| {
        FunctionError::module(
            name,
            format!(
                "cannot link component ({}); components may import WASI 0.2 and wasi:http \
                 0.2 up to what wasmtime 48 provides (with Rust, build with `wasi = \"=0.13.3\"`)",
                error_text(&e)
            ),
        )
    })?;
    ProxyPre::new(pre).map_err(|e| {
        FunctionError::module(
            name,
            format!(
                "component does not export wasi:http/incoming-handler ({}); is it a \
                 wasi:http/proxy component?",
                error_text(&e)
            ),
        )
    })
}

/// Runs one request in a fresh instance, the guest's stdout and stderr going to
/// `output`, its outgoing requests going only where `outbound` allows (counted in
/// `metrics`). Returns the response (or why there is none) and the fuel burnt.
pub(crate) async fn run(
    engine: &Engine,
    pre: &ProxyPre<ProxyCtx>,
    request: FunctionRequest,
    limits: &RequestLimits,
    outbound: &OutboundAllowList,
    metrics: &FunctionMetrics,
    output: (CapturePipe, CapturePipe),
) -> (Result<Response<Bytes>, Failure>, u64) {
    let (stdout, stderr) = output;
    let hooks = OutgoingHooks {
        allowed: outbound.clone(),
        counters: Arc::clone(metrics.outbound()),
        deadline: Instant::now() + limits.timeout,
        sent: 0,
    };
    let mut store = Store::new(
        engine,
        ProxyCtx {
            wasi: WasiCtxBuilder::new().stdout(stdout).stderr(stderr).build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks,
            limits: LimitState::new(limits.memory),
        },
    );
    let initial_fuel = match limits::arm(&mut store, limits, true) {
        Ok(fuel) => fuel,
        Err(e) => return (Err(internal("cannot set up the request's limits", &e)), 0),
    };
    let hyper_request = match to_hyper(request) {
        Ok(r) => r,
        Err(message) => return (Err(Failure::new(ErrorClass::Internal, message)), 0),
    };
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let resources = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, hyper_request)
        .and_then(|req| Ok((req, store.data_mut().http().new_response_outparam(sender)?)));
    let (incoming, outparam) = match resources {
        Ok(r) => r,
        Err(e) => return (Err(internal("cannot hand the request to the guest", &e)), 0),
    };

    // The guest owns the store: when it ends, the store (and with it the body's
    // sending half) goes away, so reading the body can never wait for a guest that is
    // no longer running.
    let pre = pre.clone();
    let guest = async move {
        let result = async {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, incoming, outparam)
                .await
        }
        .await;
        let data = store.data();
        let seen = (data.limits.deadline_hit, data.limits.memory.denied());
        let fuel = limits::fuel_used(&store, initial_fuel);
        drop(store);
        (result, seen, fuel)
    };
    let output_limit = limits.output;
    let response = async move {
        match receiver.await {
            Ok(Ok(response)) => Some(collect(response, output_limit).await),
            Ok(Err(code)) => Some(Err(Failure::new(
                ErrorClass::BadResponse,
                format!("the component answered with an error: {code:?}"),
            ))),
            // Never set: the guest's ending says why.
            Err(_) => None,
        }
    };

    let both = async { tokio::join!(guest, response) };
    let ((result, (deadline_hit, memory_denied), fuel), response) =
        match tokio::time::timeout(limits.timeout + DEADLINE_GRACE, both).await {
            Ok(done) => done,
            // Dropping the futures dropped the store: the instance is gone.
            // (The fuel it burnt went with the store; it is not counted.)
            Err(_) => return (Err(outcome::deadline(limits.timeout)), 0),
        };

    let outcome = match result {
        Err(error) => Err(outcome::classify(&GuestEnd {
            error: &error,
            deadline_hit,
            memory_denied,
            fuel_limit: limits.fuel,
            timeout: limits.timeout,
            output_full: None,
        })),
        Ok(()) => match response {
            Some(response) => response,
            None => Err(Failure::new(
                ErrorClass::BadResponse,
                "the component returned without setting a response (response-outparam::set)",
            )),
        },
    };
    (outcome, fuel)
}

fn internal(what: &str, e: &wasmtime::Error) -> Failure {
    Failure::new(ErrorClass::Internal, format!("{what}: {}", error_text(e)))
}

/// The request as hyper hands it to `wasi:http`: the path after `/fn/NAME`, and an
/// authority (`wasi:http` requires one; `localhost` when the client sent no Host).
fn to_hyper(request: FunctionRequest) -> Result<Request<Full<Bytes>>, String> {
    let uri: Uri = request
        .path_and_query()
        .parse()
        .map_err(|e| format!("cannot pass the request path to the component: {e}"))?;
    let mut out = Request::new(Full::new(request.body));
    *out.method_mut() = request.method;
    *out.uri_mut() = uri;
    *out.version_mut() = request.version;
    *out.headers_mut() = request.headers;
    if !out.headers().contains_key(header::HOST) {
        out.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    Ok(out)
}

/// Reads the component's whole response body, up to `limit` bytes.
async fn collect(
    response: Response<HyperOutgoingBody>,
    limit: u64,
) -> Result<Response<Bytes>, Failure> {
    let (mut parts, body) = response.into_parts();
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let bytes = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(outcome::output_limit(limit))
        }
        Err(e) => {
            return Err(Failure::new(
                ErrorClass::BadResponse,
                format!("the component's response body failed: {e}"),
            ))
        }
    };
    cgi::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_timeouts_end_by_the_deadline() {
        let left = Duration::from_secs(2);
        let none = bounded_options(None, left);
        assert_eq!(
            (
                none.connect_timeout,
                none.first_byte_timeout,
                none.between_bytes_timeout
            ),
            (Some(left), Some(left), Some(left))
        );
        let asked = bounded_options(
            Some(RequestOptions {
                connect_timeout: Some(Duration::from_millis(100)),
                first_byte_timeout: Some(Duration::from_secs(60)),
                between_bytes_timeout: None,
            }),
            left,
        );
        assert_eq!(asked.connect_timeout, Some(Duration::from_millis(100)));
        assert_eq!(asked.first_byte_timeout, Some(left));
        assert_eq!(asked.between_bytes_timeout, Some(left));
    }

    #[test]
    fn outgoing_requests_are_capped_per_request() {
        let mut hooks = OutgoingHooks {
            allowed: OutboundAllowList::parse(&["http://127.0.0.1:*"]).unwrap(),
            counters: Arc::default(),
            deadline: Instant::now(),
            sent: 0,
        };
        let ok: Uri = "http://127.0.0.1:9/".parse().unwrap();
        let other: Uri = "http://127.0.0.2:9/".parse().unwrap();
        assert_eq!(hooks.refusal(&ok), None);
        assert!(hooks
            .refusal(&other)
            .unwrap()
            .contains("allowed outbound hosts"));
        hooks.sent = MAX_OUTGOING_PER_REQUEST;
        assert!(hooks.refusal(&ok).unwrap().contains("limit"));
    }
}
