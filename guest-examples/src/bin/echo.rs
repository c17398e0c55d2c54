//! `echo`: a CGI function (Agora's WASI preview 1 function style) that describes the
//! request it received.
//!
//! The response is `text/plain`, one `name: value` line per CGI meta-variable it saw
//! (`REQUEST_METHOD`, `SCRIPT_NAME`, `PATH_INFO`, `QUERY_STRING`, `CONTENT_TYPE`,
//! `CONTENT_LENGTH`, `SERVER_PROTOCOL`, then every `HTTP_*` header variable, sorted),
//! a blank line, and the request body unchanged. `?status=CODE` makes it answer with
//! that status (`Status: CODE Echo`), to exercise the `Status` header.
//!
//! It logs one line per request on stderr, which the host keeps in the function's
//! log (`agora fn logs echo`): `echo: METHOD PATH_INFO N bytes`.

use std::io::{Read, Write};

const META: [&str; 7] = [
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "SERVER_PROTOCOL",
];

fn main() {
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("echo: cannot read the request body: {e}");
        std::process::exit(1);
    }
    let _ = writeln!(
        std::io::stderr(),
        "echo: {} {} {} bytes",
        std::env::var("REQUEST_METHOD").unwrap_or_default(),
        std::env::var("PATH_INFO").unwrap_or_default(),
        body.len()
    );
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    let status = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("status="))
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|code| (100..=999).contains(code));

    let mut out = Vec::with_capacity(body.len() + 512);
    if let Some(code) = status {
        out.extend_from_slice(format!("Status: {code} Echo\r\n").as_bytes());
    }
    out.extend_from_slice(b"Content-Type: text/plain\r\n\r\n");
    for name in META {
        let value = std::env::var(name).unwrap_or_default();
        out.extend_from_slice(format!("{name}: {value}\n").as_bytes());
    }
    let mut headers: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| name.starts_with("HTTP_"))
        .collect();
    headers.sort();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\n").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(&body);

    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(1);
    }
}
