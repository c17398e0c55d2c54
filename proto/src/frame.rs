//! The one frame codec used on every link: a u32 big-endian length followed by one
//! encoded protobuf message. Every read enforces a maximum frame size, so a peer can
//! never make us allocate more than that.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Default upper bound on one frame (16 MiB), as DESIGN.md says.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

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
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            size: len,
            limit: MAX_FRAME,
        });
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf)
        .expect("Vec has room for the encoded message");
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
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
    let mut buf = vec![0u8; size];
    r.read_exact(&mut buf).await?;
    Ok(Some(M::decode(buf.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Ping, StreamOpen};

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
