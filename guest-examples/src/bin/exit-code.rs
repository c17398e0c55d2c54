//! `exit-code N`: exits with code N (2 when N is missing or not a number).

fn main() {
    let arg = std::env::args().nth(1);
    match arg.as_deref().map(str::parse::<i32>) {
        Some(Ok(code)) => {
            eprintln!("exiting with {code}");
            std::process::exit(code);
        }
        Some(Err(_)) => {
            eprintln!("exit-code: {:?} is not an integer", arg.unwrap_or_default());
            std::process::exit(2);
        }
        None => {
            eprintln!("usage: exit-code N");
            std::process::exit(2);
        }
    }
}
