//! `noop`: the smallest useful CGI function; answers `200 OK` with `ok` and reads
//! nothing. The function benchmark uses it, so what it measures is the host, not the
//! guest.

use std::io::Write;

fn main() {
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(b"Content-Type: text/plain\r\n\r\nok\n")
        .is_err()
    {
        std::process::exit(1);
    }
}
