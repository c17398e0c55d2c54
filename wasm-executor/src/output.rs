//! A guest's stdout/stderr: a file in the sandbox with a size cap.
//!
//! Output past the cap is dropped (the guest still sees its writes succeed, so a chatty
//! program is not turned into a failing one) and a single marker line
//! `[agora: output truncated at N bytes]` is appended once.

use std::fs::File;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// How much a guest may hand us in one write (the same bound wasmtime-wasi's own file
/// streams use).
const WRITE_PERMIT: usize = 64 * 1024;

/// The output sink. Clones share one file and one byte count, as WASI requires of
/// every stream made from one stdout.
#[derive(Clone)]
pub(crate) struct CappedOutput {
    inner: Arc<Mutex<Capped>>,
}

struct Capped {
    file: File,
    limit: u64,
    written: u64,
    truncated: bool,
    /// Last byte kept, so the marker starts on a line of its own.
    last: Option<u8>,
}

impl CappedOutput {
    pub(crate) fn new(file: File, limit: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Capped {
                file,
                limit,
                written: 0,
                truncated: false,
                last: None,
            })),
        }
    }

    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        // A poisoned lock only means another writer panicked mid-write; the byte
        // count is still meaningful, so carry on.
        let mut c = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        c.write(buf)
    }

    fn flush(&self) -> io::Result<()> {
        let mut c = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        c.file.flush()
    }
}

impl Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        let room = usize::try_from(self.limit.saturating_sub(self.written)).unwrap_or(usize::MAX);
        let keep = room.min(buf.len());
        if keep > 0 {
            self.file.write_all(&buf[..keep])?;
            self.written += keep as u64;
            self.last = Some(buf[keep - 1]);
        }
        if keep < buf.len() && !self.truncated {
            self.truncated = true;
            let newline = if matches!(self.last, Some(b) if b != b'\n') {
                "\n"
            } else {
                ""
            };
            writeln!(
                self.file,
                "{newline}[agora: output truncated at {} bytes]",
                self.limit
            )?;
        }
        Ok(())
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    // WASI p1's fd_write goes through this p2 stream; writing synchronously here is
    // fine because the task runs on a thread of its own.
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedOutput {
    /// Always ready: writes never block for long.
    async fn ready(&mut self) {}
}

impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_all(&bytes)
            .map_err(|e| StreamError::LastOperationFailed(wasmtime::Error::new(e)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        CappedOutput::flush(self)
            .map_err(|e| StreamError::LastOperationFailed(wasmtime::Error::new(e)))
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.write_all(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(CappedOutput::flush(&self))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_cap_then_marks_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let out = CappedOutput::new(File::create(&path).unwrap(), 10);
        out.write_all(b"0123456").unwrap();
        out.write_all(b"789abc").unwrap();
        out.write_all(b"more").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "0123456789\n[agora: output truncated at 10 bytes]\n");
    }

    #[test]
    fn marker_needs_no_extra_newline_after_a_full_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let out = CappedOutput::new(File::create(&path).unwrap(), 4);
        out.write_all(b"abc\nd").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "abc\n[agora: output truncated at 4 bytes]\n");
    }
}
