//! `fib N`: naive recursive Fibonacci, a CPU-bound and call-heavy workload.

fn fib(n: u32) -> u64 {
    if n < 2 {
        n as u64
    } else {
        fib(n - 1).wrapping_add(fib(n - 2))
    }
}

fn main() {
    let arg = std::env::args().nth(1);
    let Some(Ok(n)) = arg.as_deref().map(str::parse::<u32>) else {
        eprintln!("usage: fib N (N a non-negative integer)");
        std::process::exit(2);
    };
    println!("fib({n}) = {}", fib(n));
}
