//! `sleep`: a task that blocks in a WASI host call, to check that kills and deadlines
//! end a task whatever it is doing.
//!
//! - `sleep MS`: sleeps MS milliseconds (one `poll_oneoff` clock subscription), then
//!   prints `slept MS ms`;
//! - `sleep --read PATH`: opens PATH and reads it to its end (on a FIFO nobody writes
//!   to, this blocks in `path_open` or `fd_read`), then prints how many bytes it read.

use std::io::Read;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, path] if flag == "--read" => {
            println!("sleep: reading {path}");
            let mut data = Vec::new();
            let read = std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut data));
            match read {
                Ok(n) => println!("read {n} bytes"),
                Err(e) => {
                    eprintln!("sleep: cannot read {path}: {e}");
                    std::process::exit(1);
                }
            }
        }
        [ms] => match ms.parse::<u64>() {
            Ok(ms) => {
                println!("sleep: sleeping {ms} ms");
                std::thread::sleep(Duration::from_millis(ms));
                println!("slept {ms} ms");
            }
            Err(_) => {
                eprintln!("sleep: {ms:?} is not a number of milliseconds");
                std::process::exit(2);
            }
        },
        _ => {
            eprintln!("usage: sleep MS | sleep --read PATH");
            std::process::exit(2);
        }
    }
}
