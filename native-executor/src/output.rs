//! A task's stdout/stderr: a pipe drained by a thread into a file with a size cap.
//!
//! A plain file handed to the command could not be capped, so the command writes into
//! a pipe and [`spawn_copier`] copies. Past the cap the copier keeps draining (the
//! command is not blocked or failed for being chatty) and appends one marker line,
//! `[agora: output truncated at N bytes]`, as the wasm executor does. The copier also
//! keeps the last line it saw, for error messages (a shell's "not found").
//!
//! The capping is the executors' one `CappedFile` (agora-executor-link).

use std::fs::File;
use std::io::{self, Read};

use agora_executor_link::output::CappedFile;
use std::sync::mpsc;
use std::time::Duration;

/// Longest last line kept for messages.
const TAIL_MAX: usize = 512;

/// What a copier did, once its pipe closed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Copied {
    pub written: u64,
    pub truncated: bool,
    /// The last non-empty line of the output (cut to 512 bytes), cap or no cap.
    pub last_line: String,
    /// A write to the file failed; the rest of the output was discarded.
    pub error: Option<String>,
}

/// Remembers the last non-empty line of a byte stream.
#[derive(Default)]
struct Tail {
    current: Vec<u8>,
    last: Vec<u8>,
}

impl Tail {
    fn push(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                if !self.current.is_empty() {
                    self.last = std::mem::take(&mut self.current);
                }
            } else if self.current.len() < TAIL_MAX {
                self.current.push(b);
            }
        }
    }

    fn line(&self) -> String {
        let bytes = if self.current.is_empty() {
            &self.last
        } else {
            &self.current
        };
        String::from_utf8_lossy(bytes).trim().to_string()
    }
}

/// A running copier; `finish` waits (bounded) for its pipe to close.
pub(crate) struct Copier {
    done: mpsc::Receiver<Copied>,
}

impl Copier {
    /// Waits up to `timeout` for the copier to drain the pipe. A pipe still open
    /// after the task's processes are gone was handed to a process outside the group
    /// (possible in posix mode); its copier is left to finish whenever that ends.
    pub(crate) fn finish(self, timeout: Duration) -> Option<Copied> {
        self.done.recv_timeout(timeout).ok()
    }
}

/// Copies `pipe` into `file` (capped at `limit` bytes) on a thread of its own.
pub(crate) fn spawn_copier(
    name: String,
    mut pipe: impl Read + Send + 'static,
    file: File,
    limit: u64,
) -> io::Result<Copier> {
    let (tx, done) = mpsc::sync_channel(1);
    std::thread::Builder::new().name(name).spawn(move || {
        let mut out = CappedFile::new(file, limit);
        let mut tail = Tail::default();
        let mut error = None;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    #[allow(clippy::indexing_slicing, reason = "read returns at most buf.len()")]
                    let data = &buf[..n];
                    tail.push(data);
                    if error.is_none() {
                        if let Err(e) = out.write(data) {
                            error = Some(e.to_string());
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error.get_or_insert(e.to_string());
                    break;
                }
            }
        }
        let _ = tx.send(Copied {
            written: out.written(),
            truncated: out.truncated(),
            last_line: tail.line(),
            error,
        });
    })?;
    Ok(Copier { done })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copier_drains_past_the_cap_and_keeps_the_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("err");
        let input: Vec<u8> = b"first\nsh: 1: nosuch: not found\n\n".repeat(100);
        let copier = spawn_copier(
            "test".into(),
            io::Cursor::new(input),
            File::create(&path).unwrap(),
            20,
        )
        .unwrap();
        let copied = copier.finish(Duration::from_secs(10)).unwrap();
        assert_eq!(copied.written, 20);
        assert!(copied.truncated);
        assert_eq!(copied.last_line, "sh: 1: nosuch: not found");
        assert!(copied.error.is_none());
    }

    #[test]
    fn tail_of_an_unterminated_line() {
        let mut t = Tail::default();
        t.push(b"one\ntwo");
        assert_eq!(t.line(), "two");
        t.push(b"\n");
        assert_eq!(t.line(), "two");
    }
}
