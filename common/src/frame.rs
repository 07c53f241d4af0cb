//! Length-prefixed frames: a 4-byte big-endian payload length, then the encoded message.
//!
//! Every read names its maximum frame size (see [`crate::limits`]); a larger declared
//! length is rejected before any payload byte is buffered.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{self, CodecError};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {declared} bytes exceeds the limit of {max} bytes")]
    TooLarge { declared: usize, max: usize },
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// True when the peer sent bytes that break the protocol (as opposed to a dropped stream).
    pub fn is_protocol_violation(&self) -> bool {
        matches!(
            self,
            FrameError::TooLarge { .. } | FrameError::Codec(_) | FrameError::Truncated
        )
    }

    /// True when the stream broke because its connection did (the peer may come back on
    /// another), as opposed to the peer stopping or resetting this one stream.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, FrameError::Io(e) if e.kind() == std::io::ErrorKind::NotConnected)
    }
}

/// Encodes `msg` as one frame appended to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    codec::encode_into(msg, out)?;
    let payload_len = out.len() - start - HEADER_LEN;
    let len = u32::try_from(payload_len).map_err(|_| FrameError::TooLarge {
        declared: payload_len,
        max: u32::MAX as usize,
    })?;
    out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Splits one complete frame off the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the payload and the number of bytes consumed.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let declared = u32::from_be_bytes(header.try_into().expect("4-byte slice")) as usize;
    if declared > max {
        return Err(FrameError::TooLarge { declared, max });
    }
    let end = HEADER_LEN + declared;
    Ok(buf.get(HEADER_LEN..end).map(|payload| (payload, end)))
}

/// Decodes every complete frame in `buf` (a whole byte sequence, as a fuzzer would feed it).
pub fn decode_frames<T: DeserializeOwned>(
    mut buf: &[u8],
    max: usize,
) -> Result<Vec<T>, FrameError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Some((payload, consumed)) = split_frame(buf, max)? else {
            return Err(FrameError::Truncated);
        };
        out.push(codec::decode(payload)?);
        buf = &buf[consumed..];
    }
    Ok(out)
}

/// Writes one frame holding `msg`.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut buf = Vec::with_capacity(64);
    encode_frame(msg, &mut buf)?;
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame of at most `max` payload bytes.
///
/// Returns `Ok(None)` on a clean end of stream at a frame boundary.
pub async fn read_frame<R, T>(r: &mut R, max: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut header[filled..]).await? {
            0 if filled == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => filled += n,
        }
    }
    let declared = u32::from_be_bytes(header) as usize;
    if declared > max {
        return Err(FrameError::TooLarge { declared, max });
    }
    let mut payload = vec![0u8; declared];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
    Ok(Some(codec::decode(&payload)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_TASK_FRAME;
    use crate::protocol::{
        AgentMessage, OutputStream, ProbeReport, Reach, TaskEvent, TaskOutcome, TaskRequest,
        TaskSpec,
    };
    use proptest::prelude::*;

    fn arb_outcome() -> impl Strategy<Value = TaskOutcome> {
        prop_oneof![
            any::<i32>().prop_map(|code| TaskOutcome::Exited { code }),
            any::<i32>().prop_map(|signal| TaskOutcome::Signaled { signal }),
            Just(TaskOutcome::TimedOut),
            Just(TaskOutcome::Cancelled),
            ".{0,40}".prop_map(|error| TaskOutcome::FailedToStart { error }),
        ]
    }

    fn arb_event() -> impl Strategy<Value = TaskEvent> {
        prop_oneof![
            any::<u32>().prop_map(|pid| TaskEvent::Started { pid }),
            (
                any::<u64>(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(seq, err, data)| TaskEvent::Output {
                    seq,
                    stream: if err {
                        OutputStream::Stderr
                    } else {
                        OutputStream::Stdout
                    },
                    data: data.into(),
                }),
            arb_outcome().prop_map(TaskEvent::Finished),
            (any::<u16>(), any::<bool>(), ".{0,40}").prop_map(|(port, ok, error)| {
                let target = std::net::SocketAddr::from(([10, 251, 0, 1], port));
                TaskEvent::Probe(ProbeReport::Reached(vec![Reach {
                    target,
                    from: if ok { Ok(target) } else { Err(error) },
                }]))
            }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_frames::<TaskRequest>(&bytes, MAX_TASK_FRAME);
            let _ = decode_frames::<TaskEvent>(&bytes, MAX_TASK_FRAME);
            let _ = decode_frames::<AgentMessage>(&bytes, MAX_TASK_FRAME);
            let _ = crate::codec::decode::<TaskRequest>(&bytes);
            let _ = crate::codec::decode::<AgentMessage>(&bytes);
        }

        #[test]
        fn task_events_round_trip(events in proptest::collection::vec(arb_event(), 0..20)) {
            let mut buf = Vec::new();
            for event in &events {
                encode_frame(event, &mut buf).unwrap();
            }
            let decoded: Vec<TaskEvent> = decode_frames(&buf, MAX_TASK_FRAME).unwrap();
            prop_assert_eq!(decoded, events);
        }

        #[test]
        fn task_specs_round_trip(
            argv in proptest::collection::vec(".{0,20}", 1..6),
            env in proptest::collection::vec((".{1,10}", ".{0,20}"), 0..4),
            id in any::<u64>(), attempt in any::<u32>(), timeout in proptest::option::of(any::<u64>()),
        ) {
            let spec = TaskRequest::Start(TaskSpec::command(id, attempt, argv, env, timeout, false));
            let mut buf = Vec::new();
            encode_frame(&spec, &mut buf).unwrap();
            let decoded: Vec<TaskRequest> = decode_frames(&buf, MAX_TASK_FRAME).unwrap();
            prop_assert_eq!(decoded, vec![spec]);
        }

        #[test]
        fn truncated_frames_are_errors_not_panics(event in arb_event(), cut in 0usize..64) {
            let mut buf = Vec::new();
            encode_frame(&event, &mut buf).unwrap();
            let cut = cut.min(buf.len().saturating_sub(1));
            prop_assert!(decode_frames::<TaskEvent>(&buf[..cut], MAX_TASK_FRAME).is_err() || cut == 0);
        }
    }

    #[test]
    fn oversized_declared_length_is_rejected_before_buffering() {
        let buf = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        match split_frame(&buf, 1024) {
            Err(FrameError::TooLarge { declared, max }) => {
                assert_eq!(declared, u32::MAX as usize);
                assert_eq!(max, 1024);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn async_reader_rejects_oversized_and_truncated_frames() {
        let mut oversized: &[u8] = &[0, 0x10, 0, 0, 0];
        let err = read_frame::<_, TaskEvent>(&mut oversized, 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");

        let mut truncated: &[u8] = &[0, 0, 0, 9, 1, 2];
        let err = read_frame::<_, TaskEvent>(&mut truncated, 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");

        let mut empty: &[u8] = &[];
        assert!(read_frame::<_, TaskEvent>(&mut empty, 1024)
            .await
            .unwrap()
            .is_none());
    }
}
