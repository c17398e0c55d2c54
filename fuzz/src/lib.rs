//! What the fuzz targets share: a reader that turns fuzz bytes into choices and
//! protobuf payloads (and its writer, which builds the seed corpus), a `block_on`
//! for futures over byte slices, and the two core harnesses.
//!
//! Each harness plays the shell around a core: it feeds inputs built from the fuzz
//! bytes, some raw (protobuf payloads that decode or are skipped) and some built
//! from what the core said before (an offer it made, a task it launched, an update
//! awaiting acknowledgement), so that the fuzzer reaches deep states without having
//! to guess ids. After every input it checks what the core promises (see each
//! harness's `check`).

pub mod agent;
pub mod door;
pub mod master;

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Runs a future that never waits (reads from a `&[u8]`, writes to a `Vec<u8>`).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("a future over in-memory bytes kept waiting");
}

/// Whether to print every input fed and output seen (`AGORA_FUZZ_TRACE=1`), to
/// read what a crashing input did: `AGORA_FUZZ_TRACE=1 fuzz/target/*/release/TARGET
/// CRASH_FILE`.
pub fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("AGORA_FUZZ_TRACE").is_some())
}

/// Reads choices from fuzz bytes; every read past the end gives `None`.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.byte()?, self.byte()?]))
    }

    pub fn u64(&mut self) -> Option<u64> {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte()?;
        }
        Some(u64::from_be_bytes(b))
    }

    /// A length (one byte, or 255 then a u16) and that many bytes, or what is left.
    pub fn chunk(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            255 => usize::from(self.u16()?),
            n => usize::from(n),
        };
        let len = len.min(self.data.len());
        let (c, rest) = self.data.split_at(len);
        self.data = rest;
        Some(c)
    }

    pub fn string(&mut self) -> Option<String> {
        Some(String::from_utf8_lossy(self.chunk()?).into_owned())
    }

    /// One of `n` (n > 0).
    pub fn pick(&mut self, n: usize) -> Option<usize> {
        Some(usize::from(self.byte()?) % n)
    }

    /// A protobuf message from a chunk; `Some(None)` when it does not decode.
    pub fn message<M: prost::Message + Default>(&mut self) -> Option<Option<M>> {
        Some(M::decode(self.chunk()?).ok())
    }
}

/// Builds inputs in [`Reader`]'s format (the seed corpus).
#[derive(Default)]
pub struct Writer {
    pub bytes: Vec<u8>,
}

impl Writer {
    pub fn byte(&mut self, b: u8) -> &mut Self {
        self.bytes.push(b);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn chunk(&mut self, c: &[u8]) -> &mut Self {
        let len = u16::try_from(c.len()).expect("seed chunks are small");
        if len < 255 {
            self.bytes.push(len as u8);
        } else {
            self.bytes.push(255);
            self.u16(len);
        }
        self.bytes.extend_from_slice(c);
        self
    }

    pub fn message<M: prost::Message>(&mut self, m: &M) -> &mut Self {
        self.chunk(&m.encode_to_vec())
    }
}

/// Checks that a decoded message survives encoding: encode it, decode that, and
/// the two messages must be equal (prost drops unknown fields and keeps the last of
/// repeated scalars, so what decoded once is in canonical form). Map fields are
/// `HashMap`s, so the bytes themselves may differ in order and are not compared. A
/// NaN in a `double` field is unequal to itself: such a message must still decode
/// to one of the same encoded length.
pub fn roundtrip<M: prost::Message + Default + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.encode_to_vec();
    assert_eq!(bytes.len(), m.encoded_len(), "encoded_len disagrees: {m:?}");
    let again = M::decode(bytes.as_slice()).expect("a message we encoded decodes");
    if &again != m {
        assert!(
            format!("{m:?}").contains("NaN"),
            "decode(encode(m)) != m:\n{m:?}\n{again:?}"
        );
        assert_eq!(again.encoded_len(), bytes.len());
    }
}

/// Where the seed corpus of a target lives (`fuzz/corpus/<target>`).
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed seed corpora are what `master::seeds` and `agent::seeds` build
    /// (`AGORA_FUZZ_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml` writes
    /// them again).
    #[test]
    fn seed_corpora_are_current() {
        let write = std::env::var_os("AGORA_FUZZ_WRITE_SEEDS").is_some();
        for (target, seeds) in [
            ("master_core", master::seeds()),
            ("agent_core", agent::seeds()),
        ] {
            let dir = corpus_dir(target);
            for (name, bytes) in seeds {
                let path = dir.join(format!("seed-{name}"));
                if write {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, &bytes).unwrap();
                } else {
                    let committed = std::fs::read(&path).unwrap_or_else(|e| {
                        panic!("{path:?}: {e}; run with AGORA_FUZZ_WRITE_SEEDS=1")
                    });
                    assert_eq!(
                        committed, bytes,
                        "{path:?} is stale; run with AGORA_FUZZ_WRITE_SEEDS=1"
                    );
                }
            }
        }
    }

    /// The master's seeds reach what they are for: tasks launched, updates relayed.
    #[test]
    fn master_seeds_reach_launches_and_updates() {
        for (name, bytes) in master::seeds() {
            let mut m = master::Master::new();
            let mut r = Reader::new(&bytes);
            while m.step(&mut r).is_some() {}
            assert!(m.launched() > 0, "seed {name} launched nothing");
            if name.starts_with("launch") {
                assert!(m.relayed() > 0, "seed {name} relayed no update");
            }
        }
    }

    /// The agent's seeds launch tasks on executors and send updates.
    #[test]
    fn agent_seeds_reach_executors_and_updates() {
        for (name, bytes) in agent::seeds() {
            let mut a = agent::Agent::new();
            let mut r = Reader::new(&bytes);
            while a.step(&mut r).is_some() {}
            assert!(a.updates_sent() > 0, "seed {name} sent no update");
            if name.starts_with("wasm") || name.starts_with("native") {
                assert!(
                    a.launches() > 0,
                    "seed {name} launched nothing on an executor"
                );
            }
        }
    }
}
