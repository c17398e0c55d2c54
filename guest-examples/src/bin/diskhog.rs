//! `diskhog bytes MIB` writes MIB MiB to `/big` in 1 MiB writes; `diskhog files N`
//! creates N empty files under `/many/`. Either prints what it did on stdout, or,
//! at the first error, says how far it got and the error on stderr and exits 1 (the
//! disk limit tests).

use std::io::Write;
use std::process::exit;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1);
    match args.first().map(String::as_str) {
        Some("bytes") => {
            let mut f = std::fs::File::create("/big").unwrap_or_else(|e| fail("create /big", 0, e));
            let chunk = vec![7u8; 1 << 20];
            for i in 0..n {
                if let Err(e) = f.write_all(&chunk) {
                    fail("write", i << 20, e);
                }
            }
            println!("wrote {} bytes", n << 20);
        }
        Some("files") => {
            std::fs::create_dir_all("/many").unwrap_or_else(|e| fail("mkdir /many", 0, e));
            for i in 0..n {
                if let Err(e) = std::fs::File::create(format!("/many/{i}")) {
                    fail("create", i, e);
                }
            }
            println!("created {n} files");
        }
        _ => {
            eprintln!("usage: diskhog bytes MIB | files N");
            exit(2);
        }
    }
}

fn fail(what: &str, done: u64, e: std::io::Error) -> ! {
    eprintln!("{what} failed after {done}: {e}");
    exit(1);
}
