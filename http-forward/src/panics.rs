//! A panic while one request is handled fails that request only.
//!
//! Without this, a handler that panics unwinds through the connection's task:
//! hyper drops the connection (every request kept alive or pipelined on it is
//! lost), and the client sees a reset instead of an answer. [`catch_panics`] wraps
//! a router so that such a panic becomes a `500` for the request that caused it,
//! logged (tracing, with the door and the function named in the path), while the
//! connection and every other request go on. A panic while a response *body*
//! streams cannot become a status any more: that body ends with an error and the
//! connection is closed, which costs that connection only.
//!
//! No lock is left poisoned for everyone: the locks on the doors' paths take the
//! data back from a poisoned lock (`PoisonError::into_inner`), as their state holds
//! no invariant across an unlock.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Response, StatusCode};
use axum::middleware::Next;
use axum::Router;
use futures_util::FutureExt as _;

/// `router` with every request's handling guarded: a panic gives that request a
/// `500` naming an internal error (logged with `door` and the function name).
pub fn catch_panics(router: Router, door: &'static str) -> Router {
    router.layer(axum::middleware::from_fn_with_state(door, guard))
}

async fn guard(State(door): State<&'static str>, request: Request, next: Next) -> Response<Body> {
    let method = request.method().clone();
    let function = function_name(request.uri().path()).map(str::to_string);
    match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let message = panic_message(&*panic);
            let function = function.as_deref().unwrap_or("");
            tracing::error!(
                door,
                function,
                %method,
                panic = %message,
                "a request handler panicked; the request gets 500, the connection goes on"
            );
            internal_error(function)
        }
    }
}

/// NAME in `/fn/NAME[/...]`.
fn function_name(path: &str) -> Option<&str> {
    let name = path.strip_prefix("/fn/")?.split('/').next()?;
    (!name.is_empty()).then_some(name)
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// The answer to a request whose handler panicked: short, and naming no detail of
/// the panic (that is in the log).
fn internal_error(function: &str) -> Response<Body> {
    let text = if function.is_empty() {
        "internal error while handling this request (logged)\n".to_string()
    } else {
        format!("function {function}: internal error while handling this request (logged)\n")
    };
    crate::plain_text(StatusCode::INTERNAL_SERVER_ERROR, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;
    use axum::routing::any;
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::TokioIo;

    /// A handler that panics on a crafted path and answers otherwise.
    async fn handler(request: Request) -> &'static str {
        if request.uri().path().ends_with("/boom") {
            panic!("crafted input reached the handler");
        }
        "fine\n"
    }

    async fn send(
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        path: &str,
    ) -> (StatusCode, String) {
        let request = http::Request::get(path)
            .header(header::HOST, "door.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_panicking_request_gets_500_and_the_connection_goes_on() {
        let router = Router::new().route("/fn/{name}/{*path}", any(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = agora_net::gate::Gate::new("test door", crate::serve::DEFAULT_CAPS);
        let server = tokio::spawn(crate::serve(listener, router, gate, "test door"));

        // One keep-alive connection for every request below.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);

        let (status, body) = send(&mut sender, "/fn/echo/ok").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "fine\n");

        let (status, body) = send(&mut sender, "/fn/echo/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("function echo: internal error"), "{body}");
        assert!(
            !body.contains("crafted input"),
            "the panic's text stays in the log: {body}"
        );

        // The same connection serves the next request.
        assert!(!sender.is_closed());
        let (status, body) = send(&mut sender, "/fn/echo/again").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "fine\n");

        drop(sender);
        conn.await.unwrap().unwrap();
        server.abort();
    }

    #[test]
    fn names_the_function_of_the_path() {
        assert_eq!(function_name("/fn/echo/x"), Some("echo"));
        assert_eq!(function_name("/fn/echo"), Some("echo"));
        assert_eq!(function_name("/fn/"), None);
        assert_eq!(function_name("/other"), None);
    }
}
