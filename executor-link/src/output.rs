//! A task's stdout or stderr file with a size cap, the same for every executor.
//!
//! Output past the cap is dropped (the task still sees its writes succeed, so a
//! chatty program is not turned into a failing one) and one marker line,
//! `[agora: output truncated at N bytes]`, is appended, on a line of its own. The
//! wasm executor writes a guest's output through it directly; the native executor
//! copies a command's pipe into it.

use std::fs::File;
use std::io::{self, Write};

/// Output cap of a stream when the launch sets none (`output_limit_bytes` 0).
pub const DEFAULT_OUTPUT_LIMIT: u64 = 64 << 20;

/// The cap a launch's `output_limit_bytes` asks for (0: the default).
pub fn output_limit(asked: u64) -> u64 {
    if asked == 0 {
        DEFAULT_OUTPUT_LIMIT
    } else {
        asked
    }
}

/// A file that keeps up to `limit` bytes of what is written to it, then marks once.
#[derive(Debug)]
pub struct CappedFile {
    file: File,
    limit: u64,
    written: u64,
    truncated: bool,
    /// Last byte kept, so the marker starts on a line of its own.
    last: Option<u8>,
}

impl CappedFile {
    pub fn new(file: File, limit: u64) -> Self {
        CappedFile {
            file,
            limit,
            written: 0,
            truncated: false,
            last: None,
        }
    }

    /// Keeps what fits under the cap; past it, writes the marker once. Errors are the
    /// file's own.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        let room = usize::try_from(self.limit.saturating_sub(self.written)).unwrap_or(usize::MAX);
        let keep = buf.get(..room).unwrap_or(buf);
        if let Some(&last) = keep.last() {
            self.file.write_all(keep)?;
            self.written += keep.len() as u64;
            self.last = Some(last);
        }
        if keep.len() < buf.len() && !self.truncated {
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

    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    /// Bytes of output kept (the marker not counted).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether output went past the cap.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_cap_then_marks_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut out = CappedFile::new(File::create(&path).unwrap(), 10);
        out.write(b"0123456").unwrap();
        out.write(b"789abc").unwrap();
        out.write(b"more").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "0123456789\n[agora: output truncated at 10 bytes]\n");
        assert_eq!((out.written(), out.truncated()), (10, true));
    }

    #[test]
    fn marker_needs_no_extra_newline_after_a_full_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut out = CappedFile::new(File::create(&path).unwrap(), 4);
        out.write(b"abc\nd").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "abc\n[agora: output truncated at 4 bytes]\n");
    }

    #[test]
    fn within_the_cap_nothing_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut out = CappedFile::new(File::create(&path).unwrap(), 4);
        out.write(b"abcd").unwrap();
        out.write(b"").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abcd");
        assert!(!out.truncated());
    }
}
