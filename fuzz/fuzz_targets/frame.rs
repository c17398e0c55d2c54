//! The frame codec as a stream's reader meets it: `read_frame_limited` takes a
//! `StreamOpen` and then the frames its kind says follow (chunks after an upload or
//! a snapshot, an operator's request, Raft RPCs, agent or scheduler messages), from
//! bytes that may lie about their lengths or stop anywhere. The first byte picks the
//! limit (the first-frame limit of an unknown peer up to the 16 MiB default).
//! Every frame read must be one whose declared length was within the limit, and
//! every message read must be written back by `write_frame_limited` and read back
//! equal, or refused as too large when its canonical encoding is longer than the
//! (shorter, valid) bytes it was read from.
#![no_main]
use agora_fuzz::block_on;
use agora_net::{read_frame_limited, write_frame_limited, FrameError, MAX_FRAME};
use agora_proto::v1::{self, stream_open::Kind};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, mut rest)) = data.split_first() else {
        return;
    };
    let limit = match which % 4 {
        0 => 16,
        1 => 4 * 1024,
        2 => 64 * 1024,
        _ => MAX_FRAME,
    };
    let r = &mut rest;
    let Some(open) = read::<v1::StreamOpen>(r, limit) else {
        return;
    };
    // What follows the first frame, as the master's and the agent's streams read it.
    for _ in 0..64 {
        let more = match &open.kind {
            Some(Kind::Put(_)) | Some(Kind::RaftSnapshot(_)) => {
                read::<v1::DataChunk>(r, limit).is_some()
            }
            Some(Kind::Agent(_)) => read::<v1::AgentToMaster>(r, limit).is_some(),
            Some(Kind::Scheduler(_)) => read::<v1::Call>(r, limit).is_some(),
            Some(Kind::Raft(_)) => read::<v1::RaftReply>(r, limit).is_some(),
            Some(Kind::Get(_)) => read::<v1::ArtifactHeader>(r, limit).is_some(),
            Some(Kind::Operator(_)) => read::<v1::OperatorResponse>(r, limit).is_some(),
            Some(Kind::Leader(_)) => read::<v1::LeaderInfo>(r, limit).is_some(),
            None => read::<v1::ExecutorToAgent>(r, limit).is_some(),
        };
        if !more {
            break;
        }
    }
});

/// Reads one frame; `None` at the end of the bytes or on an error (which ends a
/// stream), after checking that the error is the right one.
fn read<M>(r: &mut &[u8], limit: usize) -> Option<M>
where
    M: Message + Default + PartialEq + std::fmt::Debug,
{
    let before: &[u8] = r;
    match block_on(read_frame_limited::<_, M>(r, limit)) {
        Ok(Some(m)) => {
            let declared = u32::from_be_bytes(before[..4].try_into().unwrap()) as usize;
            assert!(
                declared <= limit,
                "a frame of {declared} bytes read past the limit {limit}"
            );
            assert_eq!(
                before.len() - r.len(),
                4 + declared,
                "the frame read is not the frame declared"
            );
            // Written back, it is a frame the reader takes again, to an equal message.
            // Protobuf allows encodings shorter than the canonical one (a repeated
            // scalar sent unpacked, one tag per element, is re-encoded packed), so a
            // message read within the limit may not be written within it: the writer
            // must then refuse it, naming its size (fuzz/regressions/frame).
            let mut out = Vec::new();
            match block_on(write_frame_limited(&mut out, &m, limit)) {
                Ok(()) => {}
                Err(FrameError::TooLarge { size, limit: l }) => {
                    assert!(
                        size == m.encoded_len() && size > l && l == limit,
                        "refused a {} byte message as {size} bytes past {l}",
                        m.encoded_len()
                    );
                    return Some(m);
                }
                Err(e) => panic!("writing a message read within the limit failed: {e}"),
            }
            assert_eq!(out.len(), 4 + m.encoded_len());
            let again: M = block_on(read_frame_limited(&mut out.as_slice(), limit))
                .expect("our own frame reads")
                .expect("our own frame is there");
            if again != m {
                assert!(
                    format!("{m:?}").contains("NaN"),
                    "{m:?} came back as {again:?}"
                );
            }
            Some(m)
        }
        Ok(None) => {
            assert!(before.is_empty(), "a clean end with bytes left");
            None
        }
        Err(FrameError::TooLarge { size, limit: l }) => {
            assert!(size > limit && l == limit);
            None
        }
        Err(FrameError::Truncated) => {
            let declared = before
                .get(..4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize);
            assert!(
                declared.is_none_or(|d| before.len() < 4 + d),
                "a whole frame read as truncated"
            );
            None
        }
        Err(FrameError::Decode(_)) => None,
        Err(FrameError::Io(e)) => panic!("i/o error from a byte slice: {e}"),
    }
}
