//! `files [INPUT [OUTPUT]]`: reads INPUT (default `/input.txt`) and writes to OUTPUT
//! (default `/result.txt`) a summary line `lines=L words=W bytes=B` followed by the
//! input upper-cased. Prints the summary on stdout. A missing input exits 1.

use std::process::exit;

fn main() {
    let mut args = std::env::args().skip(1);
    let input = args.next().unwrap_or_else(|| "/input.txt".to_string());
    let output = args.next().unwrap_or_else(|| "/result.txt".to_string());

    let data = match std::fs::read(&input) {
        Ok(data) => data,
        Err(e) => {
            eprintln!("files: cannot read input {input}: {e}");
            exit(1);
        }
    };

    let lines = match data.last() {
        None => 0,
        Some(b'\n') => data.iter().filter(|&&b| b == b'\n').count(),
        Some(_) => data.iter().filter(|&&b| b == b'\n').count() + 1,
    };
    let words = data
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .count();
    let summary = format!("lines={lines} words={words} bytes={}", data.len());

    // Proper Unicode upper-casing for text; byte-wise ASCII for anything else.
    let upper = match std::str::from_utf8(&data) {
        Ok(text) => text.to_uppercase().into_bytes(),
        Err(_) => data.to_ascii_uppercase(),
    };
    let mut result = Vec::with_capacity(summary.len() + 1 + upper.len());
    result.extend_from_slice(summary.as_bytes());
    result.push(b'\n');
    result.extend_from_slice(&upper);

    if let Err(e) = std::fs::write(&output, &result) {
        eprintln!("files: cannot write output {output}: {e}");
        exit(1);
    }
    println!("{summary}");
}
