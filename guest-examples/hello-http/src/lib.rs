//! `hello-http`: a `wasi:http/proxy` component, the format `wasmtime serve` and Spin run.
//!
//! It answers every request with `200 OK` and `hello from a wasi:http component:
//! METHOD PATH_WITH_QUERY`, plus an `x-agora-guest: hello-http` header. A path that
//! ends in `/spin` burns CPU forever instead, so tests can check that fuel and
//! deadlines stop components too.
//!
//! It logs one line per request on stdout (`hello-http: METHOD PATH_WITH_QUERY`) and,
//! before spinning, one on stderr, which the host keeps in the function's log
//! (`agora fn logs NAME`).

use std::hint::black_box;
use std::io::Write as _;

use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct HelloHttp;

wasi::http::proxy::export!(HelloHttp);

impl wasi::exports::http::incoming_handler::Guest for HelloHttp {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let method = method_name(&request.method());
        // Writes to the host's log never fail the request: ignore their errors.
        let _ = writeln!(std::io::stdout(), "hello-http: {method} {path}");
        if path.split('?').next().unwrap_or("").ends_with("/spin") {
            let _ = writeln!(std::io::stderr(), "hello-http: spinning until stopped");
            spin();
        }

        let headers = Fields::new();
        // Both names and values are valid, so these cannot fail; ignore rather than
        // abort if a host ever disagrees.
        let _ = headers.append(&"content-type".to_string(), &b"text/plain".to_vec());
        let _ = headers.append(&"x-agora-guest".to_string(), &b"hello-http".to_vec());
        let response = OutgoingResponse::new(headers);
        let Ok(body) = response.body() else {
            return;
        };
        ResponseOutparam::set(response_out, Ok(response));

        let Ok(mut out) = body.write() else {
            return;
        };
        let text = format!("hello from a wasi:http component: {method} {path}\n");
        // A write fails only when the client went away; nothing to tell anyone then.
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        drop(out);
        let _ = OutgoingBody::finish(body, None);
    }
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other.clone(),
    }
}

/// Never returns: only fuel or a deadline stops it.
fn spin() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}
