//! What the HTTP front-door targets (`http_door`, `master_http_door`) share: how an
//! input is cut into a client's writes, and what every answer must look like.

/// The input cut at each `\xff\xfe` (bytes a request head cannot hold anyway).
pub fn split_writes(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(2).position(|w| w == b"\xff\xfe") {
        parts.push(&rest[..at]);
        rest = &rest[at + 2..];
    }
    parts.push(rest);
    parts
}

/// The answer of `door`, if any, starts with a status line (HTTP/1.1, or HTTP/1.0
/// for an HTTP/1.0 request) of a valid code other than 500, which is what a caught
/// handler panic gives.
pub fn check_answer(door: &str, answer: &[u8]) {
    if answer.is_empty() {
        return;
    }
    let head = || String::from_utf8_lossy(&answer[..answer.len().min(64)]).into_owned();
    assert!(
        answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
        "{door}: not a status line: {:?}",
        head()
    );
    let code = answer
        .get(9..12)
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse::<u16>().ok());
    let Some(code) = code else {
        panic!("{door}: no status code: {:?}", head());
    };
    assert!((100..=599).contains(&code), "{door}: status {code}");
    assert_ne!(
        code,
        500,
        "{door}: a request handler panicked (caught by the door's guard): {:?}",
        head()
    );
}
