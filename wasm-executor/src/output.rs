//! A guest's stdout/stderr as WASI streams: the executors' one capped file
//! (`agora_executor_link::output::CappedFile`) behind the stream traits wasmtime-wasi
//! asks for.

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use agora_executor_link::output::CappedFile;
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
    inner: Arc<Mutex<CappedFile>>,
}

impl CappedOutput {
    pub(crate) fn new(file: File, limit: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(CappedFile::new(file, limit))),
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
        c.flush()
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
