//! Artifacts between the masters of a group. Modules and inputs live in each
//! master's artifact store, not in the Raft log (they are large and
//! content-addressed): the leader pushes every upload to every other master and
//! answers the uploader once a majority holds it, and a leader asked for an
//! artifact it lacks fetches it from a peer first.

use std::net::SocketAddr;
use std::time::Duration;

use agora_net::tls::{self, Identity};
use agora_net::{read_frame, transfer, write_frame};
use agora_proto::v1::{self, stream_open, StreamOpen};

use crate::artifacts::ArtifactStore;
use crate::error::{Error, Result};
use crate::raft::group::Node;

/// Bound on copying one artifact to or from one peer.
const COPY_LIMIT: Duration = Duration::from_secs(120);
const CONNECT_LIMIT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct Replicas {
    pub node: Node,
    pub identity: Identity,
}

impl Replicas {
    /// The other members of the group and their QUIC addresses.
    fn peers(&self) -> Vec<(u64, SocketAddr)> {
        use openraft::async_runtime::WatchReceiver as _;
        let m = self.node.raft.metrics().borrow_watched().clone();
        m.membership_config
            .nodes()
            .filter(|(id, _)| **id != self.node.id)
            .filter_map(|(id, n)| tls::resolve(&n.quic).ok().map(|a| (*id, a)))
            .collect()
    }

    /// Members in all (this master included).
    fn members(&self) -> usize {
        self.peers().len() + 1
    }

    /// Copies `sha` (already in `store`) to every peer at once; returns once a
    /// majority of the group holds it, or fails saying how many do. The copies to
    /// the others go on in the background.
    pub async fn push(&self, store: &ArtifactStore, sha: &str) -> Result<()> {
        let peers = self.peers();
        let n = peers.len() + 1;
        let need = n / 2 + 1;
        if need <= 1 {
            return Ok(());
        }
        let Some(path) = store.path(sha) else {
            return Err(Error::ArtifactMissing(sha.to_string()));
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(peers.len());
        for (id, addr) in peers {
            let (identity, path, sha, tx) = (
                self.identity.clone(),
                path.clone(),
                sha.to_string(),
                tx.clone(),
            );
            tokio::spawn(async move {
                let r = tokio::time::timeout(COPY_LIMIT, put_to(addr, &identity, &path, &sha))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::PeerCopy(format!("no end within {COPY_LIMIT:?}")))
                    });
                if let Err(e) = &r {
                    tracing::warn!(peer = id, %addr, "copying artifact {sha} to master {id}: {e}");
                }
                let _ = tx.send(r.is_ok()).await;
            });
        }
        drop(tx);
        let mut have = 1;
        while let Some(ok) = rx.recv().await {
            if ok {
                have += 1;
                if have >= need {
                    return Ok(());
                }
            }
        }
        Err(Error::NotReplicated { have, need, of: n })
    }

    /// Fetches `sha` into `store` from the first peer that has it.
    pub async fn fetch(&self, store: &ArtifactStore, sha: &str) -> Result<()> {
        let mut why = Vec::new();
        for (id, addr) in self.peers() {
            let r = tokio::time::timeout(COPY_LIMIT, get_from(addr, &self.identity, store, sha))
                .await
                .unwrap_or_else(|_| Err(Error::PeerCopy(format!("no end within {COPY_LIMIT:?}"))));
            match r {
                Ok(()) => {
                    tracing::info!(peer = id, "fetched artifact {sha} from master {id}");
                    return Ok(());
                }
                Err(e) => why.push(format!("master {id}: {e}")),
            }
        }
        Err(Error::PeerCopy(if why.is_empty() {
            format!("no other master to fetch artifact {sha} from")
        } else {
            format!("artifact {sha}: {}", why.join("; "))
        }))
    }

    pub fn replicated(&self) -> bool {
        self.members() > 1
    }
}

async fn dial(addr: SocketAddr, identity: &Identity) -> Result<quinn::Connection> {
    let endpoint = tls::client_endpoint(addr, identity)?;
    Ok(tls::connect_within(&endpoint, addr, CONNECT_LIMIT).await?)
}

async fn put_to(
    addr: SocketAddr,
    identity: &Identity,
    path: &std::path::Path,
    sha: &str,
) -> Result<()> {
    let size = tokio::fs::metadata(path).await?.len();
    let conn = dial(addr, identity).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let open = StreamOpen {
        kind: Some(stream_open::Kind::Put(v1::ArtifactPut {
            sha256: sha.into(),
            size,
        })),
    };
    write_frame(&mut send, &open).await?;
    let first: v1::ArtifactHeader = read_frame(&mut recv)
        .await?
        .ok_or_else(|| Error::PeerCopy("the peer closed the stream".into()))?;
    if !first.error.is_empty() {
        return Err(Error::PeerCopy(first.error));
    }
    if !first.present {
        transfer::send_file(&mut send, path).await?;
        send.finish()?;
        let done: v1::ArtifactHeader = read_frame(&mut recv)
            .await?
            .ok_or_else(|| Error::PeerCopy("the peer closed the stream".into()))?;
        if !done.error.is_empty() {
            return Err(Error::PeerCopy(done.error));
        }
    }
    conn.close(0u32.into(), b"copied");
    Ok(())
}

async fn get_from(
    addr: SocketAddr,
    identity: &Identity,
    store: &ArtifactStore,
    sha: &str,
) -> Result<()> {
    let conn = dial(addr, identity).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let open = StreamOpen {
        kind: Some(stream_open::Kind::Get(v1::ArtifactGet {
            sha256: sha.into(),
        })),
    };
    write_frame(&mut send, &open).await?;
    send.finish()?;
    let h: v1::ArtifactHeader = read_frame(&mut recv)
        .await?
        .ok_or_else(|| Error::PeerCopy("the peer closed the stream".into()))?;
    if !h.error.is_empty() {
        return Err(Error::PeerCopy(h.error));
    }
    if h.size > transfer::MAX_ARTIFACT {
        return Err(Error::PeerCopy(format!(
            "artifact of {} bytes is over the limit",
            h.size
        )));
    }
    transfer::receive_to_file(&mut recv, &store.dest(sha), sha, h.size).await?;
    conn.close(0u32.into(), b"copied");
    Ok(())
}
