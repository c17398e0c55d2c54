//! `memhog [STEP_MIB]`: allocates STEP_MIB (default 8) MiB at a time, touching every
//! byte, and prints the running total, until allocation fails. The failure is the
//! standard library's: it prints `memory allocation of N bytes failed` and aborts
//! (a wasm trap), which is what most real programs do when memory runs out.

const MIB: usize = 1024 * 1024;

fn main() {
    let step_mib = match std::env::args().nth(1) {
        None => 8,
        Some(arg) => match arg.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("memhog: STEP_MIB must be a positive integer, got {arg:?}");
                std::process::exit(2);
            }
        },
    };
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        // `resize` writes every byte, so the pages are really committed.
        let mut chunk = Vec::with_capacity(step_mib * MIB);
        chunk.resize(step_mib * MIB, 0xa5);
        chunks.push(chunk);
        println!("allocated {} MiB", chunks.len() * step_mib);
    }
}
