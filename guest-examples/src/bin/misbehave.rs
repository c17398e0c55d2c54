//! `misbehave`: a CGI function that breaks the limits on request, so tests can check
//! that a function survives its own bad requests.
//!
//! - `?spin`: burns CPU forever (only fuel or the deadline stops it);
//! - `?alloc=N`: allocates and touches N MiB, then answers;
//! - `?garbage`: writes output that is not a CGI response;
//! - `?count`: bumps a counter in the module's data and answers `count N`; always
//!   `count 1` when every request gets a fresh instance, as it must;
//! - otherwise answers `200 OK` with `fine`.

use std::hint::black_box;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Lives in linear memory: proof of whether an instance was reused.
static COUNTER: AtomicU64 = AtomicU64::new(0);

const MIB: usize = 1024 * 1024;

fn main() {
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    for pair in query.split('&') {
        if pair == "spin" {
            let mut counter: u64 = 0;
            loop {
                counter = black_box(counter.wrapping_add(1));
            }
        }
        if pair == "count" {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
            respond(&format!("count {n}\n"));
            return;
        }
        if pair == "garbage" {
            print!("this is not a CGI response");
            return;
        }
        if let Some(n) = pair.strip_prefix("alloc=") {
            let mib: usize = n.parse().unwrap_or(1);
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            for _ in 0..mib {
                // `resize` writes every byte, so the pages are really committed.
                let mut chunk = Vec::with_capacity(MIB);
                chunk.resize(MIB, 0xa5);
                chunks.push(chunk);
            }
            black_box(&chunks);
            respond(&format!("allocated {mib} MiB\n"));
            return;
        }
    }
    respond("fine\n");
}

fn respond(body: &str) {
    let mut stdout = std::io::stdout().lock();
    let answer = format!("Content-Type: text/plain\r\n\r\n{body}");
    if stdout.write_all(answer.as_bytes()).is_err() {
        std::process::exit(1);
    }
}
