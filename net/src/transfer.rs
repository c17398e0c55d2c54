//! Moving artifact bytes (modules, input files) over a stream as `DataChunk` frames,
//! verifying the sha256 on arrival. Used for uploads (client -> master) and fetches
//! (master -> agent) alike, so there is one way bytes travel.

use std::path::Path;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::frame::{read_frame, write_frame};
use agora_proto::v1::DataChunk;

/// Largest artifact accepted anywhere (module or input file).
pub const MAX_ARTIFACT: u64 = 1024 * 1024 * 1024;
const CHUNK: usize = 256 * 1024;

/// Streams a file as DataChunk frames; the last frame has `last = true`.
pub async fn send_file<W: AsyncWrite + Unpin>(w: &mut W, path: &Path) -> Result<()> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            write_frame(
                w,
                &DataChunk {
                    data: Vec::new(),
                    last: true,
                },
            )
            .await?;
            return Ok(());
        }
        #[allow(clippy::indexing_slicing, reason = "read returns at most buf.len()")]
        write_frame(
            w,
            &DataChunk {
                data: buf[..n].to_vec(),
                last: false,
            },
        )
        .await?;
    }
}

/// Streams bytes already in memory.
pub async fn send_bytes<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<()> {
    for c in bytes.chunks(CHUNK) {
        write_frame(
            w,
            &DataChunk {
                data: c.to_vec(),
                last: false,
            },
        )
        .await?;
    }
    write_frame(
        w,
        &DataChunk {
            data: Vec::new(),
            last: true,
        },
    )
    .await?;
    Ok(())
}

/// Receives DataChunk frames into `dest` (via a temporary file beside it, renamed into
/// place only when the size and sha256 match). Refuses more than `expected_size` bytes.
pub async fn receive_to_file<R: AsyncRead + Unpin>(
    r: &mut R,
    dest: &Path,
    expected_sha: &str,
    expected_size: u64,
) -> Result<()> {
    if expected_size > MAX_ARTIFACT {
        return Err(Error::ArtifactTooLarge {
            size: expected_size,
            limit: MAX_ARTIFACT,
        });
    }
    let dir = dest
        .parent()
        .ok_or_else(|| Error::NoParent(dest.to_path_buf()))?;
    tokio::fs::create_dir_all(dir).await?;
    // One partial file per receive: two uploads (or fetches) of the same artifact at
    // once must not write into, or rename away, each other's file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}.{n}.partial",
        expected_sha,
        std::process::id()
    ));
    let result = async {
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Error::file(format!("cannot create {}", tmp.display()), e))?;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        loop {
            let chunk: DataChunk = read_frame(r).await?.ok_or(Error::TransferTruncated {
                got,
                expected: expected_size,
            })?;
            got += chunk.data.len() as u64;
            if got > expected_size {
                return Err(Error::TransferOversized {
                    expected: expected_size,
                });
            }
            hasher.update(&chunk.data);
            f.write_all(&chunk.data).await?;
            if chunk.last {
                break;
            }
        }
        if got != expected_size {
            return Err(Error::TransferSize {
                got,
                expected: expected_size,
            });
        }
        let sha = hex::encode(hasher.finalize());
        if sha != expected_sha {
            return Err(Error::TransferHash {
                got: sha,
                expected: expected_sha.to_string(),
            });
        }
        f.sync_all().await?;
        tokio::fs::rename(&tmp, dest).await.map_err(|e| {
            Error::file(format!("cannot move the upload into {}", dest.display()), e)
        })?;
        Ok::<_, Error>(())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// sha256 and size of a file, read in chunks.
pub async fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        #[allow(clippy::indexing_slicing, reason = "read returns at most buf.len()")]
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roundtrip_verifies_hash_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let sha = agora_proto::sha256_hex(&data);
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let send = async { send_bytes(&mut a, &data).await.unwrap() };
        let dest = dir.path().join("x");
        let recv = receive_to_file(&mut b, &dest, &sha, data.len() as u64);
        let ((), r) = tokio::join!(send, recv);
        r.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), data);

        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let send = async { send_bytes(&mut a, b"other bytes").await.unwrap() };
        let dest2 = dir.path().join("y");
        let recv = receive_to_file(&mut b, &dest2, &sha, 11);
        let ((), r) = tokio::join!(send, recv);
        assert!(r.unwrap_err().to_string().contains("content hash"));
        assert!(!dest2.exists());
        // No partial file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn two_receives_of_the_same_artifact_at_once_both_succeed() {
        // Regression: both wrote (and renamed) the same partial file, so one of two
        // simultaneous `agora run`s of a module failed with "No such file or directory".
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 13) as u8).collect();
        let sha = agora_proto::sha256_hex(&data);
        let dest = dir.path().join(&sha);
        let (mut a1, mut b1) = tokio::io::duplex(1024);
        let (mut a2, mut b2) = tokio::io::duplex(1024);
        let (s1, s2, r1, r2) = tokio::join!(
            send_bytes(&mut a1, &data),
            send_bytes(&mut a2, &data),
            receive_to_file(&mut b1, &dest, &sha, data.len() as u64),
            receive_to_file(&mut b2, &dest, &sha, data.len() as u64),
        );
        s1.unwrap();
        s2.unwrap();
        r1.unwrap();
        r2.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
