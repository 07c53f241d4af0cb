//! Hostile bytes into every decoder the network reaches: whatever arrives, decoding returns
//! an error or a value, never panics, and never allocates much past the frame limit of the
//! stream it arrived on. Valid messages of every kind survive a round trip.
//!
//! Case counts are bounded so that the whole file runs in seconds (PROPTEST_CASES raises them
//! for a longer soak).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;

use bytes::Bytes;
use proptest::prelude::*;
use serde::{de::DeserializeOwned, Serialize};
use skyward_common::codec;
use skyward_common::frame::{decode_frames, encode_frame, read_frame, FrameError};
use skyward_common::inventory::{Gpu, Inventory, MigDevice, NetworkInterface};
use skyward_common::limits::{
    MAX_CONTROL_FRAME, MAX_DECODE_AMPLIFICATION, MAX_ENROLL_FRAME, MAX_TASK_FRAME,
};
use skyward_common::protocol::{
    AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse, Health, Hello, OutputStream,
    Probe, ProbeReport, Reach, TaskEvent, TaskKind, TaskOutcome, TaskRequest, TaskSpec,
};
use skyward_common::workdir::{
    BulkOffer, Chunk, DownloadEvent, DownloadSpec, EntryKind, SyncEvent, SyncRequest, SyncStart,
    TreeEntry,
};

/// Counts the bytes this thread has allocated, so a test can measure one decode's peak.
struct Counting;

thread_local! {
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = CURRENT.try_with(|current| {
        let now = current.get() + delta;
        current.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call goes straight to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        track(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most bytes this thread held at once while `f` ran, counting from zero at its start.
fn peak_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    CURRENT.with(|c| c.set(0));
    PEAK.with(|p| p.set(0));
    let out = f();
    (out, PEAK.with(|p| p.get()).max(0) as usize)
}

/// What decoding bytes from a stream whose frames are at most `limit` may allocate.
/// Enrollment, open to anyone, allocates no more than its frame again: its messages hold only
/// strings and bytes. Elsewhere a small element may decode from a byte or two into a larger
/// value (an empty string into 24 bytes), bounded by [`MAX_DECODE_AMPLIFICATION`].
fn budget(limit: usize) -> usize {
    if limit == MAX_ENROLL_FRAME {
        2 * limit + 1024
    } else {
        limit * MAX_DECODE_AMPLIFICATION
    }
}

/// Decodes `bytes` every way a peer could make us: as frames on the stream that carries `T`,
/// and as one bare payload. Checks the allocation bound; returns whether the framed decode
/// succeeded.
fn decode_hostile<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<bool, TestCaseError> {
    let (framed, peak) = peak_allocation(|| decode_frames::<T>(bytes, limit).map(|v| v.len()));
    prop_assert!(
        peak <= budget(limit),
        "decoding {} bytes as {} frames allocated {peak} bytes (budget {})",
        bytes.len(),
        std::any::type_name::<T>(),
        budget(limit)
    );
    if let Err(e) = &framed {
        prop_assert!(e.is_protocol_violation(), "{e}");
    }
    let (_, peak) = peak_allocation(|| codec::decode::<T>(bytes).is_ok());
    prop_assert!(
        peak <= budget(limit),
        "decoding {} bytes as one {} allocated {peak} bytes",
        bytes.len(),
        std::any::type_name::<T>()
    );
    Ok(framed.is_ok())
}

/// Every message type the network delivers, each at the limit of the stream it travels on.
fn decode_as_every_message(bytes: &[u8]) -> Result<(), TestCaseError> {
    decode_hostile::<EnrollRequest>(bytes, MAX_ENROLL_FRAME)?;
    decode_hostile::<EnrollResponse>(bytes, MAX_ENROLL_FRAME)?;
    decode_hostile::<AgentMessage>(bytes, MAX_CONTROL_FRAME)?;
    decode_hostile::<CoordinatorMessage>(bytes, MAX_CONTROL_FRAME)?;
    decode_hostile::<TaskRequest>(bytes, MAX_TASK_FRAME)?;
    decode_hostile::<TaskEvent>(bytes, MAX_TASK_FRAME)?;
    decode_hostile::<SyncRequest>(bytes, MAX_TASK_FRAME)?;
    decode_hostile::<SyncEvent>(bytes, MAX_TASK_FRAME)?;
    decode_hostile::<DownloadEvent>(bytes, MAX_TASK_FRAME)?;
    Ok(())
}

/// A postcard varint.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn short_string() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port)))
}

fn arb_enroll_request() -> impl Strategy<Value = EnrollRequest> {
    (
        short_string(),
        short_string(),
        arb_bytes(600),
        short_string(),
    )
        .prop_map(|(node_id, token, csr_der, agent_version)| EnrollRequest {
            node_id,
            token,
            csr_der,
            agent_version,
        })
}

fn arb_enroll_response() -> impl Strategy<Value = EnrollResponse> {
    prop_oneof![
        (arb_bytes(600), any::<i64>()).prop_map(|(cert_der, not_after_unix)| {
            EnrollResponse::Accepted {
                cert_der,
                not_after_unix,
            }
        }),
        short_string().prop_map(|reason| EnrollResponse::Rejected { reason }),
    ]
}

fn arb_gpu() -> impl Strategy<Value = Gpu> {
    (
        any::<u32>(),
        short_string(),
        any::<u64>(),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<bool>()),
        proptest::collection::vec((short_string(), short_string(), any::<u64>()), 0..3),
    )
        .prop_map(|(index, name, memory, util, mig, devices)| Gpu {
            index,
            uuid: format!("GPU-{index}"),
            name,
            memory_total_bytes: memory,
            memory_used_bytes: memory / 2,
            utilization_percent: util,
            driver_version: "550.54".into(),
            cuda_version: "12.4".into(),
            mig_mode_current: mig,
            mig_mode_pending: mig,
            mig_devices: devices
                .into_iter()
                .map(|(uuid, profile, memory_bytes)| MigDevice {
                    uuid,
                    profile,
                    memory_bytes,
                    parent_gpu_index: index,
                    gpu_instance_id: 1,
                    compute_instance_id: 0,
                })
                .collect(),
        })
}

fn arb_agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        (
            short_string(),
            any::<u32>(),
            proptest::collection::vec(arb_gpu(), 0..4),
            proptest::collection::vec(
                (
                    short_string(),
                    proptest::collection::vec(any::<[u8; 4]>(), 0..3)
                ),
                0..3
            ),
        )
            .prop_map(|(hostname, cpu_count, gpus, interfaces)| {
                AgentMessage::Hello(Box::new(Hello {
                    agent_version: "0.1.0".into(),
                    inventory: Inventory {
                        hostname,
                        cpu_count,
                        gpus,
                        interfaces: interfaces
                            .into_iter()
                            .map(|(name, ips)| NetworkInterface {
                                name,
                                addresses: ips.into_iter().map(Into::into).collect(),
                            })
                            .collect(),
                        ..Inventory::default()
                    },
                }))
            }),
        // Finite floats only: NaN never equals itself, whatever the wire did.
        (
            any::<u32>(),
            -1.0e6f32..1.0e6,
            any::<u64>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(running, load, mem, held, waiting)| {
                AgentMessage::Health(Health {
                    running_tasks: running,
                    load_avg_1m: load,
                    memory_available_bytes: mem,
                    output_held_bytes: held,
                    tasks_waiting_for_room: waiting,
                })
            }),
    ]
}

fn arb_coordinator_message() -> impl Strategy<Value = CoordinatorMessage> {
    prop_oneof![
        (short_string(), any::<u32>()).prop_map(|(pool, health_interval_ms)| {
            CoordinatorMessage::Welcome {
                pool,
                health_interval_ms,
            }
        }),
        short_string().prop_map(|reason| CoordinatorMessage::Shutdown { reason }),
    ]
}

fn arb_task_request() -> impl Strategy<Value = TaskRequest> {
    let kind = prop_oneof![
        (
            proptest::collection::vec(short_string(), 0..5),
            proptest::option::of(short_string()),
            any::<bool>()
        )
            .prop_map(|(argv, cwd, stdin)| TaskKind::Command { argv, cwd, stdin }),
        Just(TaskKind::Noop),
        (
            proptest::option::of(arb_addr()),
            proptest::collection::vec(arb_addr(), 0..4),
            any::<u64>()
        )
            .prop_map(|(listen, connect, nonce)| TaskKind::Probe(Probe {
                listen,
                connect,
                nonce
            })),
        (short_string(), any::<u32>(), arb_bytes(300)).prop_map(|(name, version, payload)| {
            TaskKind::Typed {
                name,
                version,
                payload,
            }
        }),
        (
            any::<[u8; 32]>(),
            any::<u32>(),
            any::<u64>(),
            proptest::option::of((any::<u16>(), any::<[u8; 16]>()))
        )
            .prop_map(|(tree, entries, bytes, bulk)| {
                TaskKind::Sync(SyncStart {
                    tree,
                    entries,
                    bytes,
                    bulk: bulk.map(|(port, ticket)| BulkOffer { port, ticket }),
                })
            }),
        (
            proptest::option::of(short_string()),
            proptest::collection::vec(short_string(), 0..4),
            any::<u64>()
        )
            .prop_map(|(cwd, paths, limit)| TaskKind::Download(DownloadSpec {
                cwd,
                paths,
                limit
            })),
    ];
    let spec = (
        any::<u64>(),
        any::<u32>(),
        kind,
        proptest::collection::vec((short_string(), short_string()), 0..4),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(id, attempt, kind, env, timeout_ms)| TaskSpec {
            task: skyward_common::protocol::TaskId { id, attempt },
            kind,
            env,
            timeout_ms,
        });
    prop_oneof![
        spec.prop_map(TaskRequest::Start),
        arb_bytes(300).prop_map(TaskRequest::Stdin),
        Just(TaskRequest::StdinEof),
        Just(TaskRequest::Cancel),
        any::<u64>().prop_map(|next_seq| TaskRequest::Ack { next_seq }),
    ]
}

fn arb_chunk() -> impl Strategy<Value = Chunk> {
    (any::<bool>(), arb_bytes(300)).prop_map(|(compressed, data)| Chunk { compressed, data })
}

fn arb_sync_request() -> impl Strategy<Value = SyncRequest> {
    let kind = prop_oneof![
        Just(EntryKind::Dir),
        (any::<u32>(), any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(mode, size, sha256)| { EntryKind::File { mode, size, sha256 } }),
        short_string().prop_map(|target| EntryKind::Symlink { target }),
    ];
    prop_oneof![
        proptest::collection::vec(
            (short_string(), kind).prop_map(|(path, kind)| TreeEntry { path, kind }),
            0..6
        )
        .prop_map(SyncRequest::Entries),
        arb_chunk().prop_map(SyncRequest::Chunk),
    ]
}

fn arb_transfer_event() -> impl Strategy<Value = DownloadEvent> {
    prop_oneof![
        short_string().prop_map(|path| DownloadEvent::Dir { path }),
        (short_string(), any::<u32>(), any::<u64>())
            .prop_map(|(path, mode, size)| DownloadEvent::File { path, mode, size }),
        arb_chunk().prop_map(DownloadEvent::Chunk),
        (short_string(), short_string())
            .prop_map(|(path, why)| DownloadEvent::Missing { path, why }),
        Just(DownloadEvent::Done),
        short_string().prop_map(DownloadEvent::Failed),
    ]
}

fn arb_task_event() -> impl Strategy<Value = TaskEvent> {
    let outcome = prop_oneof![
        any::<i32>().prop_map(|code| TaskOutcome::Exited { code }),
        any::<i32>().prop_map(|signal| TaskOutcome::Signaled { signal }),
        Just(TaskOutcome::TimedOut),
        Just(TaskOutcome::Cancelled),
        short_string().prop_map(|error| TaskOutcome::FailedToStart { error }),
        short_string().prop_map(|error| TaskOutcome::Failed { error }),
    ];
    let reach = (
        arb_addr(),
        prop_oneof![arb_addr().prop_map(Ok), short_string().prop_map(Err)],
    )
        .prop_map(|(target, from)| Reach { target, from });
    prop_oneof![
        any::<u32>().prop_map(|pid| TaskEvent::Started { pid }),
        (any::<u64>(), any::<bool>(), arb_bytes(300)).prop_map(|(seq, err, data)| {
            TaskEvent::Output {
                seq,
                stream: if err {
                    OutputStream::Stderr
                } else {
                    OutputStream::Stdout
                },
                data,
            }
        }),
        outcome.prop_map(TaskEvent::Finished),
        arb_addr().prop_map(|address| TaskEvent::Probe(ProbeReport::Listening { address })),
        proptest::collection::vec(reach, 0..4)
            .prop_map(|r| TaskEvent::Probe(ProbeReport::Reached(r))),
        arb_bytes(300).prop_map(TaskEvent::Result),
        (any::<u64>(), any::<bool>()).prop_map(|(held_bytes, waited_for_room)| {
            TaskEvent::Resumed {
                held_bytes,
                waited_for_room,
            }
        }),
    ]
}

/// Encodes `msgs` as frames, decodes them back at `limit`, and checks nothing changed.
fn round_trip<T>(msgs: &[T], limit: usize) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut buf = Vec::new();
    for msg in msgs {
        encode_frame(msg, &mut buf).unwrap();
    }
    let decoded: Vec<T> =
        decode_frames(&buf, limit).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&decoded, msgs);
    // A prefix is an error, or (cut at a frame boundary) the messages before the cut.
    let cut = buf.len() / 2;
    match decode_frames::<T>(&buf[..cut], limit) {
        Ok(prefix) => {
            prop_assert!(prefix.len() <= msgs.len() && prefix[..] == msgs[..prefix.len()])
        }
        Err(e) => prop_assert!(e.is_protocol_violation(), "{e}"),
    }
    Ok(())
}

/// The encoding of a valid message, then one of its bytes changed or a huge length spliced
/// in: the inputs most likely to reach deep into a decoder.
fn mutated<T: Serialize + std::fmt::Debug>(
    msg: impl Strategy<Value = T>,
) -> impl Strategy<Value = Vec<u8>> {
    (
        msg,
        any::<prop::sample::Index>(),
        any::<u8>(),
        any::<u64>(),
        0u8..3,
    )
        .prop_map(|(msg, at, byte, huge, how)| {
            let mut payload = codec::encode(&msg).unwrap();
            if payload.is_empty() {
                return framed(&payload);
            }
            let at = at.index(payload.len());
            match how {
                0 => payload[at] = byte,
                1 => {
                    payload.truncate(at);
                    payload.extend(varint(huge));
                }
                _ => {
                    let tail = payload.split_off(at);
                    payload.extend(varint(huge | 1 << 40));
                    payload.extend(tail);
                }
            }
            framed(&payload)
        })
}

fn config(cases: u32) -> ProptestConfig {
    // A bounded run by default; PROPTEST_CASES, when set higher, soaks longer.
    let soak = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    ProptestConfig {
        cases: cases.max(soak),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        decode_as_every_message(&bytes)?;
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header(payload in proptest::collection::vec(any::<u8>(), 0..4096)) {
        decode_as_every_message(&framed(&payload))?;
    }

    #[test]
    fn declared_lengths_inside_payloads_cannot_inflate_allocation(
        tag in 0u8..8, lengths in proptest::collection::vec(any::<u64>(), 1..6), tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        // A variant tag, then a run of length prefixes claiming vast strings and sequences.
        let mut payload = vec![tag];
        for n in lengths {
            payload.extend(varint(n));
        }
        payload.extend(tail);
        decode_as_every_message(&framed(&payload))?;
        decode_as_every_message(&payload)?;
    }

    #[test]
    fn mutated_enrollment_messages(bytes in mutated(arb_enroll_request())) {
        decode_as_every_message(&bytes)?;
    }

    #[test]
    fn mutated_control_messages(bytes in mutated(arb_agent_message())) {
        decode_as_every_message(&bytes)?;
    }

    #[test]
    fn mutated_task_messages(bytes in prop_oneof![mutated(arb_task_request()), mutated(arb_task_event())]) {
        decode_as_every_message(&bytes)?;
    }

    #[test]
    fn mutated_transfer_messages(bytes in prop_oneof![
        mutated(arb_sync_request()),
        mutated(arb_transfer_event()),
        mutated(proptest::collection::vec(any::<u32>(), 0..8).prop_map(SyncEvent::Want)),
        mutated(proptest::collection::vec(any::<u32>(), 0..8).prop_map(SyncEvent::WantBulk)),
    ]) {
        decode_as_every_message(&bytes)?;
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn enrollment_messages_round_trip(
        requests in proptest::collection::vec(arb_enroll_request(), 0..4),
        responses in proptest::collection::vec(arb_enroll_response(), 0..4),
    ) {
        round_trip(&requests, MAX_ENROLL_FRAME)?;
        round_trip(&responses, MAX_ENROLL_FRAME)?;
    }

    #[test]
    fn control_messages_round_trip(
        agent in proptest::collection::vec(arb_agent_message(), 0..4),
        coordinator in proptest::collection::vec(arb_coordinator_message(), 0..4),
    ) {
        round_trip(&agent, MAX_CONTROL_FRAME)?;
        round_trip(&coordinator, MAX_CONTROL_FRAME)?;
    }

    #[test]
    fn task_messages_round_trip(
        requests in proptest::collection::vec(arb_task_request(), 0..6),
        events in proptest::collection::vec(arb_task_event(), 0..6),
    ) {
        round_trip(&requests, MAX_TASK_FRAME)?;
        round_trip(&events, MAX_TASK_FRAME)?;
    }

    #[test]
    fn the_stream_reader_buffers_nothing_past_its_limit(
        declared in any::<u32>(), limit in 0usize..(64 * 1024), body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut input = declared.to_be_bytes().to_vec();
        input.extend(&body);
        let (result, peak) = peak_allocation(|| {
            rt.block_on(read_frame::<_, TaskEvent>(&mut input.as_slice(), limit))
        });
        if declared as usize > limit {
            prop_assert!(matches!(result, Err(FrameError::TooLarge { .. })), "{result:?}");
            prop_assert!(peak < 4096, "a rejected frame allocated {peak} bytes");
        } else {
            prop_assert!(peak <= budget(limit), "{peak} bytes for a frame of at most {limit}");
            if declared as usize > body.len() {
                prop_assert!(matches!(result, Err(FrameError::Truncated)), "{result:?}");
            }
        }
    }
}

/// The worst length bombs, written by hand: a few bytes claiming the largest sequences of
/// the largest elements each message holds.
#[test]
fn hand_made_length_bombs_stay_within_budget() {
    let huge = varint(u64::MAX >> 1);
    let bombs: Vec<Vec<u8>> = vec![
        // AgentMessage::Hello, hostname "", os "", kernel "", arch "", 0 cpus, model "",
        // memory/disk 0, then interfaces claiming a vast count.
        [vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0], huge.clone()].concat(),
        // ... and the same for gpus, after an empty interface list.
        [vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], huge.clone()].concat(),
        // TaskRequest::Start with an argv claiming a vast count.
        [vec![0, 1, 0, 0], huge.clone()].concat(),
        // TaskEvent::Probe(Reached(..)) claiming a vast count.
        [vec![3, 1], huge.clone()].concat(),
    ];
    for bomb in bombs {
        for input in [framed(&bomb), bomb.clone()] {
            decode_as_every_message(&input).unwrap();
        }
    }
}

/// A vast count backed by as many real bytes as the frame holds, so that the decoder does
/// preallocate and does decode every element: the costliest frames there are.
#[test]
fn length_bombs_backed_by_a_full_frame_stay_within_budget() {
    fn bomb(head: &[u8], limit: usize) -> Vec<u8> {
        let n = limit - head.len() - 10;
        framed(&[head.to_vec(), varint(n as u64), vec![0; n]].concat())
    }
    let control = [
        // Hello's GPUs: each element a few zero bytes, each decoded into a whole `Gpu`.
        (&[0u8; 11][..], MAX_CONTROL_FRAME),
        // Hello's interfaces.
        (&[0u8; 10][..], MAX_CONTROL_FRAME),
    ];
    for (head, limit) in control {
        let input = bomb(head, limit);
        decode_hostile::<AgentMessage>(&input, limit).unwrap();
    }
    // A task's argv of empty strings, then its env of empty pairs.
    for head in [&[0u8, 0, 0, 0][..], &[0u8, 0, 0, 1, 0, 0, 0][..]] {
        decode_hostile::<TaskRequest>(&bomb(head, MAX_TASK_FRAME), MAX_TASK_FRAME).unwrap();
    }
    // A probe report of many reaches.
    decode_hostile::<TaskEvent>(&bomb(&[3, 1], MAX_TASK_FRAME), MAX_TASK_FRAME).unwrap();
    // An enrollment request whose CSR fills the frame.
    decode_hostile::<EnrollRequest>(&bomb(&[0, 0], MAX_ENROLL_FRAME), MAX_ENROLL_FRAME).unwrap();
}
