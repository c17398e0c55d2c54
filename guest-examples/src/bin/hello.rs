//! `hello [ARGS...]`: greets, echoes its arguments and the `GREETING` variable.

fn main() {
    println!("hello from agora");
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("args: {}", args.join(" "));
    match std::env::var("GREETING") {
        Ok(value) => println!("GREETING={value}"),
        Err(_) => println!("GREETING unset"),
    }
}
