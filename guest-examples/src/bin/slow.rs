//! `slow`: a CGI function that sleeps `?ms=N` milliseconds (default 100, at most one
//! hour) and then answers `slept N ms`, to exercise concurrency limits and queues.

use std::io::Write;
use std::time::Duration;

const MAX_MS: u64 = 3_600_000;

fn main() {
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    let ms = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .map(|n| n.parse::<u64>())
        .unwrap_or(Ok(100));
    let ms = match ms {
        Ok(ms) => ms.min(MAX_MS),
        Err(_) => {
            print!("Status: 400 Bad Request\r\nContent-Type: text/plain\r\n\r\nslow: ms must be a number of milliseconds\n");
            return;
        }
    };
    std::thread::sleep(Duration::from_millis(ms));
    let mut stdout = std::io::stdout().lock();
    let answer = format!("Content-Type: text/plain\r\n\r\nslept {ms} ms\n");
    if stdout.write_all(answer.as_bytes()).is_err() {
        std::process::exit(1);
    }
}
