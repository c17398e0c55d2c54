//! The one frame codec used on every link: a u32 big-endian length followed by one
//! encoded protobuf message. Every read enforces a maximum frame size, so a peer can
//! never make us allocate more than that.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Default upper bound on one frame (16 MiB), as DESIGN.md says.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// What a frame's buffer starts with; it grows as its bytes arrive.
const FIRST_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    }
}

/// Writes one message as a frame and flushes it.
pub async fn write_frame<W, M>(w: &mut W, msg: &M) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    write_frame_limited(w, msg, MAX_FRAME).await
}

/// [`write_frame`] with another size limit (for peers that agree on larger frames,
/// as masters do for Raft).
pub async fn write_frame_limited<W, M>(w: &mut W, msg: &M, limit: usize) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    let len = msg.encoded_len();
    if len > limit {
        return Err(FrameError::TooLarge { size: len, limit });
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    #[allow(
        clippy::expect_used,
        reason = "a Vec grows as needed: prost fails an encode only for want of room"
    )]
    msg.encode(&mut buf)
        .expect("Vec has room for the encoded message");
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Frames gathered for one write. Under load a writer drains its queue into one
/// batch and writes it at once: one syscall and as few packets as the bytes need,
/// instead of a write and a flush per message.
#[derive(Default)]
pub struct FrameBatch {
    buf: Vec<u8>,
}

impl FrameBatch {
    /// Soft cap on a batch; writers stop draining their queue past it.
    pub const TARGET: usize = 256 * 1024;

    pub fn new() -> Self {
        Self::default()
    }

    pub fn push<M: Message>(&mut self, msg: &M) -> Result<(), FrameError> {
        let len = msg.encoded_len();
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge {
                size: len,
                limit: MAX_FRAME,
            });
        }
        self.buf.reserve(4 + len);
        self.buf.extend_from_slice(&(len as u32).to_be_bytes());
        #[allow(
            clippy::expect_used,
            reason = "a Vec grows as needed: prost fails an encode only for want of room"
        )]
        msg.encode(&mut self.buf)
            .expect("reserved room for the message");
        Ok(())
    }

    pub fn is_full(&self) -> bool {
        self.buf.len() >= Self::TARGET
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Writes and flushes everything gathered, leaving the batch empty.
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        w.write_all(&self.buf).await?;
        w.flush().await?;
        self.buf.clear();
        Ok(())
    }
}

/// Writes `first` and whatever else is already queued in `rx` as one batch.
pub async fn write_queued<W, M>(
    w: &mut W,
    first: M,
    rx: &mut tokio::sync::mpsc::Receiver<M>,
) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    let mut batch = FrameBatch::new();
    batch.push(&first)?;
    while !batch.is_full() {
        match rx.try_recv() {
            Ok(m) => batch.push(&m)?,
            Err(_) => break,
        }
    }
    batch.write_to(w).await
}

/// Reads one frame with the default size limit. `Ok(None)` is a clean end of stream
/// between frames.
pub async fn read_frame<R, M>(r: &mut R) -> Result<Option<M>, FrameError>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    read_frame_limited(r, MAX_FRAME).await
}

/// Reads one frame, refusing any whose declared length exceeds `limit` before
/// allocating for it.
pub async fn read_frame_limited<R, M>(r: &mut R, limit: usize) -> Result<Option<M>, FrameError>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        #[allow(clippy::indexing_slicing, reason = "got < 4: the loop's condition")]
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    // The buffer grows with the bytes that arrive, never to the declared size up
    // front: a peer that declares 16 MiB and sends nothing costs a chunk, not 16 MiB.
    let mut buf = Vec::with_capacity(size.min(FIRST_CHUNK));
    let got = r.take(size as u64).read_to_end(&mut buf).await?;
    if got < size {
        return Err(FrameError::Truncated);
    }
    Ok(Some(M::decode(buf.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_proto::v1::{Ping, StreamOpen};

    #[tokio::test]
    async fn a_declared_size_is_not_allocated_before_its_bytes_arrive() {
        // A frame that declares 16 MiB, sends 10 bytes and stops: truncated, and
        // the reader never held more than its first chunk.
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&(MAX_FRAME as u32).to_be_bytes())
            .await
            .unwrap();
        a.write_all(&[0u8; 10]).await.unwrap();
        drop(a);
        let err = read_frame::<_, Ping>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
        // A large frame that does arrive whole still reads back.
        let big = StreamOpen {
            kind: Some(agora_proto::v1::stream_open::Kind::Put(
                agora_proto::v1::ArtifactPut {
                    sha256: "x".repeat(300_000),
                    ..Default::default()
                },
            )),
        };
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let w = tokio::spawn(async move { write_frame(&mut a, &big).await.map(|_| big) });
        let got: StreamOpen = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(got, w.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn roundtrip_and_clean_eof() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &Ping { seq: 7 }).await.unwrap();
        drop(a);
        let got: Option<Ping> = read_frame(&mut b).await.unwrap();
        assert_eq!(got, Some(Ping { seq: 7 }));
        let end: Option<Ping> = read_frame(&mut b).await.unwrap();
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn a_batch_reads_back_as_separate_frames_in_order() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        for seq in 2..=5 {
            tx.send(Ping { seq }).await.unwrap();
        }
        write_queued(&mut a, Ping { seq: 1 }, &mut rx)
            .await
            .unwrap();
        drop(a);
        for seq in 1..=5 {
            assert_eq!(
                read_frame::<_, Ping>(&mut b).await.unwrap(),
                Some(Ping { seq })
            );
        }
        assert_eq!(read_frame::<_, Ping>(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_allocation() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_frame::<_, Ping>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { size, .. } if size == u32::MAX as usize));
        assert!(err.to_string().contains("exceeds the limit"));
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error_and_truncation_is_reported() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(&[0xff, 0xff, 0xff]).await.unwrap();
        let err = read_frame::<_, StreamOpen>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");

        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(&[1, 2]).await.unwrap();
        drop(a);
        let err = read_frame::<_, Ping>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
    }
}
