//! A command task's output, kept apart from the stream that carries it, so that the task
//! outlives a lost connection: the coordinator opens a new stream, says which chunk it got
//! last (`TaskRequest::Resume`), and the journal sends the rest and the task's end, each
//! once.
//!
//! A chunk is kept until the coordinator acknowledges it (`TaskRequest::Ack`: it handed the
//! chunk on), not merely until it was written into a stream: a connection that dies with
//! chunks in flight, or a coordinator frozen past the idle timeout, loses none of them.
//!
//! Bounded: up to [`MAX_TASK_JOURNAL`] bytes of unacknowledged output in memory; past that,
//! chunks go to spill segment files in the agent's work dir, up to [`MAX_TASK_SPILL`] bytes
//! held at once; past that, the task's pipes wait until acknowledgements make room. A segment
//! file is removed as soon as its last chunk is acknowledged, so a task may print any amount
//! over any time: only what was never acknowledged counts against the bounds. The agent's
//! `--task-memory` and `--task-spill` lower them (tests use that to reach them quickly).

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use quinn::SendStream;
use skyward_common::frame::write_frame;
use skyward_common::limits::{MAX_TASK_JOURNAL, MAX_TASK_SPILL};
use skyward_common::protocol::{OutputStream, TaskEvent, TaskOutcome};
use tokio::sync::{watch, Notify};

/// Why a task is being stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The coordinator asked.
    Cancelled,
    /// The coordinator dropped the task (stopped reading its output).
    Abandoned,
}

pub struct Journal {
    state: Mutex<State>,
    changed: Notify,
    /// Set once the task must stop; every attached stream can set it.
    pub stop: watch::Sender<Option<Stop>>,
}

/// Where a chunk's bytes are.
#[derive(Clone)]
enum Body {
    Memory(Bytes),
    /// In spill segment `segment`, at `offset`.
    Spilled {
        segment: u64,
        offset: u64,
        len: usize,
    },
}

/// One spill file: chunks are written at explicit offsets, never at the file's cursor.
struct Segment {
    id: u64,
    file: std::fs::File,
    path: PathBuf,
    written: u64,
    /// Kept chunks stored here; at 0 the file is removed.
    live: usize,
}

/// The spill segments, oldest first, and the bytes their files take on disk (what the
/// spill's bound counts: a segment's space comes back when its last chunk goes).
struct Spill {
    segments: VecDeque<Segment>,
    next_id: u64,
    held: u64,
}

/// The bounds of every journal this agent makes: memory, then spill.
static LIMITS: OnceLock<(usize, u64)> = OnceLock::new();

/// Sets the agent's journal bounds (once, at start; later calls are ignored).
pub fn set_limits(memory: usize, spill: u64) {
    let _ = LIMITS.set((memory.max(1), spill));
}

/// Output a journal holds that was never acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub chunks: u64,
    pub bytes: u64,
    pub waiting_for_room: bool,
}

struct Chunk {
    seq: u64,
    stream: OutputStream,
    body: Body,
}

struct State {
    /// Chunks kept, in order; `chunks[0]` has sequence number `first_seq`.
    chunks: VecDeque<Chunk>,
    first_seq: u64,
    next_seq: u64,
    memory_bytes: usize,
    memory_limit: usize,
    /// How many kept chunks are spilled (counted, not searched for on every push).
    spilled: usize,
    spill: Spill,
    /// Segment `n` is `<spill_path>.<n>`.
    spill_path: PathBuf,
    spill_limit: u64,
    /// The coordinator handed on every chunk below this: they are dropped.
    acked: u64,
    outcome: Option<TaskOutcome>,
    /// The task's next chunk found memory and spill full: its pipes wait for room.
    waiting_for_room: bool,
    /// The task waited for room since a stream last attached.
    waited_for_room: bool,
    /// Which attached stream is current: an older one stops at its next step.
    generation: u64,
}

/// A chunk ready to go out: its sequence number, stream and bytes.
type SendableChunk = (u64, OutputStream, Bytes);

/// How a stream's pump ended.
#[derive(Debug, PartialEq, Eq)]
pub enum PumpEnd {
    /// Everything, the end included, went out; the stream is finished.
    Delivered,
    /// A newer stream took over.
    Replaced,
    /// The connection broke: a coordinator may resume on another.
    ConnectionLost,
    /// The coordinator stopped reading: nobody wants the task any more.
    Stopped,
}

impl Journal {
    /// A journal that spills to `spill_path` (made only if needed, removed with the journal).
    pub fn new(spill_path: PathBuf) -> Journal {
        let (memory, spill) = *LIMITS.get_or_init(|| (MAX_TASK_JOURNAL, MAX_TASK_SPILL));
        Journal::with_limits(spill_path, memory, spill)
    }

    fn with_limits(spill_path: PathBuf, memory_limit: usize, spill_limit: u64) -> Journal {
        Journal {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                first_seq: 0,
                next_seq: 0,
                memory_bytes: 0,
                memory_limit,
                spilled: 0,
                spill: Spill {
                    segments: VecDeque::new(),
                    next_id: 0,
                    held: 0,
                },
                spill_path,
                spill_limit,
                acked: 0,
                outcome: None,
                waiting_for_room: false,
                waited_for_room: false,
                generation: 0,
            }),
            changed: Notify::new(),
            stop: watch::channel(None).0,
        }
    }

    /// Adds a chunk of output: in memory while there is room, else to the spill file, else
    /// it waits until acknowledgements make room.
    pub async fn push(&self, stream: OutputStream, data: Bytes) {
        loop {
            let waiting = self.changed.notified();
            {
                let mut state = self.state.lock().expect("journal lock");
                let pushed = state.try_push(stream, &data);
                state.waiting_for_room = !pushed;
                state.waited_for_room |= !pushed;
                if pushed {
                    drop(state);
                    self.changed.notify_waiters();
                    return;
                }
            }
            waiting.await;
        }
    }

    /// The task ended: its outcome follows the last chunk.
    pub fn finish(&self, outcome: TaskOutcome) {
        self.state.lock().expect("journal lock").outcome = Some(outcome);
        self.changed.notify_waiters();
    }

    pub fn is_finished(&self) -> bool {
        self.state.lock().expect("journal lock").outcome.is_some()
    }

    /// The coordinator handed on every chunk below `next`: they go, and their room with
    /// them. Never past what exists, whatever a peer says.
    pub fn ack(&self, next: u64) {
        let mut state = self.state.lock().expect("journal lock");
        let next = next.min(state.next_seq);
        if next <= state.acked {
            return;
        }
        state.acked = next;
        state.trim_acked();
        drop(state);
        // A producer may be waiting for room.
        self.changed.notify_waiters();
    }

    /// What the journal holds that was never acknowledged: chunks and bytes (memory and
    /// spill together), and whether the task is waiting for room.
    pub fn held(&self) -> Held {
        self.state.lock().expect("journal lock").held()
    }

    /// What a resumed stream says first: the output held from its resume point on, and
    /// whether the task waited for room since the last stream attached (then forgotten).
    pub fn resumed(&self) -> TaskEvent {
        let mut state = self.state.lock().expect("journal lock");
        let held = state.held();
        let waited_for_room = std::mem::take(&mut state.waited_for_room) || held.waiting_for_room;
        TaskEvent::Resumed {
            held_bytes: held.bytes,
            waited_for_room,
        }
    }

    /// Makes a new stream the current one, from chunk `from` on (the coordinator has every
    /// chunk before it, which counts as their acknowledgement); older streams stop. `None`
    /// when chunks from `from` on are no longer kept.
    pub fn attach(&self, from: u64) -> Option<u64> {
        let mut state = self.state.lock().expect("journal lock");
        if from < state.first_seq || from > state.next_seq {
            return None;
        }
        if from > state.acked {
            state.acked = from;
            state.trim_acked();
        }
        state.generation += 1;
        let generation = state.generation;
        drop(state);
        self.changed.notify_waiters();
        Some(generation)
    }

    /// The chunks from `next` on (read back from the spill file where they went there), and
    /// the outcome once there is no chunk left to send. `None` when a newer stream took over.
    fn batch(
        &self,
        generation: u64,
        next: u64,
    ) -> Option<(Vec<SendableChunk>, Option<TaskOutcome>)> {
        let state = self.state.lock().expect("journal lock");
        if state.generation != generation {
            return None;
        }
        let skip = next.saturating_sub(state.first_seq) as usize;
        let mut batch = Vec::new();
        let mut bytes = 0;
        for chunk in state.chunks.iter().skip(skip) {
            let data = match &chunk.body {
                Body::Memory(data) => data.clone(),
                Body::Spilled {
                    segment,
                    offset,
                    len,
                } => {
                    let Some(file) = state.spill.file(*segment) else {
                        tracing::error!("spilled task output lost its segment file");
                        break;
                    };
                    let mut buf = vec![0u8; *len];
                    if file.read_exact_at(&mut buf, *offset).is_err() {
                        tracing::error!("reading back spilled task output failed");
                        break;
                    }
                    Bytes::from(buf)
                }
            };
            bytes += data.len();
            batch.push((chunk.seq, chunk.stream, data));
            // Read back a little at a time: the rest stays where it is.
            if bytes >= 4 * 1024 * 1024 {
                break;
            }
        }
        let outcome = match state.chunks.len() > skip {
            true => None,
            false => state.outcome.clone(),
        };
        Some((batch, outcome))
    }

    /// Writes the journal to `send` from chunk `next` on, then the outcome, as they come.
    pub async fn pump(&self, send: &mut SendStream, generation: u64, mut next: u64) -> PumpEnd {
        loop {
            let waiting = self.changed.notified();
            let Some((batch, outcome)) = self.batch(generation, next) else {
                return PumpEnd::Replaced;
            };
            if batch.is_empty() && outcome.is_none() {
                // A silent task's coordinator may give it up (drop its stream) meanwhile.
                tokio::select! {
                    _ = waiting => {}
                    stopped = send.stopped() => {
                        return match stopped {
                            Ok(_) => PumpEnd::Stopped,
                            Err(_) => PumpEnd::ConnectionLost,
                        };
                    }
                }
                continue;
            }
            for (seq, stream, data) in batch {
                let event = TaskEvent::Output { seq, stream, data };
                if let Err(e) = write_frame(send, &event).await {
                    return match e.is_connection_lost() {
                        true => PumpEnd::ConnectionLost,
                        false => PumpEnd::Stopped,
                    };
                }
                // Kept until acknowledged: this stream may die with the chunk in flight.
                next = seq + 1;
            }
            if let Some(outcome) = outcome {
                if let Err(e) = write_frame(send, &TaskEvent::Finished(outcome)).await {
                    return match e.is_connection_lost() {
                        true => PumpEnd::ConnectionLost,
                        false => PumpEnd::Stopped,
                    };
                }
                let _ = send.finish();
                // Delivered once the coordinator acknowledged it all (or stopped reading after
                // the end); a connection that breaks first may still see it resumed.
                return match send.stopped().await {
                    Ok(_) => PumpEnd::Delivered,
                    Err(_) => PumpEnd::ConnectionLost,
                };
            }
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Ok(state) = self.state.lock() {
            for segment in &state.spill.segments {
                let _ = std::fs::remove_file(&segment.path);
            }
        }
    }
}

impl Spill {
    fn file(&self, id: u64) -> Option<&std::fs::File> {
        self.segments
            .iter()
            .find(|s| s.id == id)
            .map(|segment| &segment.file)
    }

    /// A spilled chunk of segment `id` was let go; segments left empty at the front are
    /// removed (chunks go in order, so the front empties first).
    fn release(&mut self, id: u64) {
        if let Some(segment) = self.segments.iter_mut().find(|s| s.id == id) {
            segment.live -= 1;
        }
        while self.segments.front().is_some_and(|s| s.live == 0) {
            if let Some(segment) = self.segments.pop_front() {
                self.held -= segment.written;
                let _ = std::fs::remove_file(&segment.path);
            }
        }
    }
}

impl State {
    fn held(&self) -> Held {
        Held {
            chunks: self.chunks.len() as u64,
            bytes: self.memory_bytes as u64 + self.spill.held,
            waiting_for_room: self.waiting_for_room,
        }
    }

    /// Keeps `data` in memory, or spilled once memory is full (the chunks' order is the
    /// queue's, wherever their bytes are); false when both are full.
    fn try_push(&mut self, stream: OutputStream, data: &Bytes) -> bool {
        let body = if self.memory_bytes + data.len() <= self.memory_limit || self.chunks.is_empty()
        {
            self.memory_bytes += data.len();
            Body::Memory(data.clone())
        } else {
            match self.spill_write(data) {
                Some(body) => {
                    self.spilled += 1;
                    body
                }
                None => return false,
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.chunks.push_back(Chunk { seq, stream, body });
        true
    }

    /// Writes `data` to the newest spill segment, or a new one (owner-only) when that is
    /// full; `None` when the spill holds its limit or cannot be written.
    fn spill_write(&mut self, data: &Bytes) -> Option<Body> {
        if self.spill.held + data.len() as u64 > self.spill_limit {
            return None;
        }
        // Segments of an eighth of the limit: space comes back an eighth at a time.
        let segment_size = (self.spill_limit / 8).max(1);
        let fits = self
            .spill
            .segments
            .back()
            .is_some_and(|s| s.written == 0 || s.written + data.len() as u64 <= segment_size);
        if !fits {
            let id = self.spill.next_id;
            let mut path = self.spill_path.clone().into_os_string();
            path.push(format!(".{id}"));
            let path = PathBuf::from(path);
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| tracing::warn!("cannot spill task output: {e}"))
                .ok()?;
            self.spill.next_id += 1;
            self.spill.segments.push_back(Segment {
                id,
                file,
                path,
                written: 0,
                live: 0,
            });
        }
        let segment = self.spill.segments.back_mut()?;
        let offset = segment.written;
        segment
            .file
            .write_all_at(data, offset)
            .map_err(|e| tracing::warn!("cannot spill task output: {e}"))
            .ok()?;
        segment.written += data.len() as u64;
        segment.live += 1;
        self.spill.held += data.len() as u64;
        Some(Body::Spilled {
            segment: segment.id,
            offset,
            len: data.len(),
        })
    }

    /// Drops the acknowledged chunks (the oldest: acknowledgements come in order), wherever
    /// their bytes are; a spill segment goes with its last chunk.
    fn trim_acked(&mut self) {
        while let Some(chunk) = self.chunks.front().filter(|c| c.seq < self.acked) {
            match chunk.body {
                Body::Memory(ref data) => self.memory_bytes -= data.len(),
                Body::Spilled { segment, .. } => {
                    self.spilled -= 1;
                    self.spill.release(segment);
                }
            }
            self.first_seq = chunk.seq + 1;
            self.chunks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &tempfile::TempDir, memory: usize, spill: u64) -> Journal {
        Journal::with_limits(dir.path().join("spill/task-1.0.out"), memory, spill)
    }

    /// How many spill segment files are on disk.
    fn spill_files(dir: &tempfile::TempDir) -> usize {
        std::fs::read_dir(dir.path().join("spill"))
            .map(|entries| entries.count())
            .unwrap_or(0)
    }

    /// Waits (yielding, bounded) until the task's next chunk found no room.
    async fn until_waiting(journal: &Journal) {
        for _ in 0..10_000 {
            if journal.held().waiting_for_room {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the push never found the journal full");
    }

    fn replay(journal: &Journal, from: u64) -> String {
        let generation = journal.attach(from).expect("kept");
        let (batch, _) = journal.batch(generation, from).unwrap();
        batch
            .iter()
            .map(|(_, _, data)| String::from_utf8_lossy(data).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_stream_attaches_only_where_the_journal_still_has_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(&dir, 1024, 1024);
        for i in 0..3 {
            journal
                .push(OutputStream::Stdout, Bytes::from(format!("{i}\n")))
                .await;
        }
        assert_eq!(replay(&journal, 0), "0\n1\n2\n");
        assert_eq!(replay(&journal, 3), "", "caught up: nothing to replay");
        assert_eq!(journal.attach(4), None, "output that does not exist yet");
        assert!(!journal.is_finished());
        journal.finish(TaskOutcome::Exited { code: 0 });
        assert!(journal.is_finished());
    }

    #[tokio::test]
    async fn past_memory_output_spills_to_disk_in_order_and_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(&dir, 8, 1024);
        for i in 0..10 {
            journal
                .push(OutputStream::Stdout, Bytes::from(format!("line {i}\n")))
                .await;
        }
        assert!(
            spill_files(&dir) > 0,
            "memory held one chunk; the rest went to disk"
        );
        let expected: String = (0..10).map(|i| format!("line {i}\n")).collect();
        assert_eq!(replay(&journal, 0), expected);
        assert_eq!(replay(&journal, 7), "line 7\nline 8\nline 9\n");
        drop(journal);
        assert_eq!(spill_files(&dir), 0, "the spill goes with the journal");
    }

    #[tokio::test]
    async fn output_nobody_acknowledged_is_never_dropped_and_the_task_waits_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let journal = std::sync::Arc::new(journal(&dir, 8, 16));
        // One chunk in memory, two on disk (16 bytes): full.
        for _ in 0..3 {
            journal
                .push(OutputStream::Stdout, Bytes::from_static(b"12345678"))
                .await;
        }
        let more = {
            let journal = journal.clone();
            tokio::spawn(async move {
                journal
                    .push(OutputStream::Stdout, Bytes::from_static(b"abcdefgh"))
                    .await
            })
        };
        until_waiting(&journal).await;
        assert!(
            !more.is_finished(),
            "nothing unacknowledged is ever dropped"
        );
        assert_eq!(
            journal.held(),
            Held {
                chunks: 3,
                bytes: 24,
                waiting_for_room: true
            }
        );
        // Once the coordinator acknowledged everything, the room comes back and the spill
        // starts over.
        journal.ack(3);
        tokio::time::timeout(std::time::Duration::from_secs(5), more)
            .await
            .expect("room once acknowledged output can go")
            .unwrap();
        assert_eq!(journal.attach(0), None, "acknowledged chunks were let go");
        assert_eq!(replay(&journal, 3), "abcdefgh");
        assert!(!journal.held().waiting_for_room);
    }

    /// Issue 17's second case: chunks written into a stream whose connection then died (or
    /// whose coordinator froze) were dropped as sent, and the resume found them gone. Now a
    /// chunk stays until acknowledged, however far a stream got with it.
    #[tokio::test]
    async fn chunks_written_into_a_dying_stream_are_kept_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(&dir, 16, 1024);
        for i in 0..6 {
            journal
                .push(OutputStream::Stdout, Bytes::from(format!("chunk {i}\n")))
                .await;
        }
        // A stream took every chunk (written into it), and the connection died.
        let generation = journal.attach(0).unwrap();
        let (batch, _) = journal.batch(generation, 0).unwrap();
        assert_eq!(batch.len(), 6);
        // The coordinator had handed on two, and received four before the link broke.
        journal.ack(2);
        assert_eq!(replay(&journal, 4), "chunk 4\nchunk 5\n");
        assert_eq!(journal.attach(3), None, "the resume acknowledged chunk 3");
        // An acknowledgement past the output that exists drops nothing that is to come.
        journal.ack(100);
        assert_eq!(journal.held().chunks, 0);
        journal
            .push(OutputStream::Stderr, Bytes::from_static(b"later\n"))
            .await;
        assert_eq!(replay(&journal, 6), "later\n");
    }

    /// Issue 17's first case: a reader that keeps up only partly, over bursts that add up to
    /// many times the spill's limit. The spill's room must come back as chunks go; before, the
    /// delivered chunks left in memory ahead of the spilled ones kept the spill file from ever
    /// starting over, and the task waited for good once it was full.
    #[tokio::test]
    async fn a_lagging_reader_never_stops_a_task_that_prints_past_every_limit() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(&dir, 64, 256);
        let chunk = Bytes::from_static(b"0123456789abcdef");
        // 4,000 chunks of 16 bytes: 64,000 bytes, 250 times the spill's limit.
        for i in 0..4_000u64 {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                journal.push(OutputStream::Stdout, chunk.clone()),
            )
            .await
            .unwrap_or_else(|_| panic!("chunk {i} waited for good"));
            // The reader is 10 chunks behind (160 bytes: past memory, into the spill).
            journal.ack(i.saturating_sub(10));
        }
        assert!(
            spill_files(&dir) <= 9,
            "{} segment files",
            spill_files(&dir)
        );
        journal.ack(4_000);
        journal
            .push(OutputStream::Stdout, Bytes::from_static(b"end"))
            .await;
        assert_eq!(replay(&journal, 4_000), "end");
        assert_eq!(
            spill_files(&dir),
            0,
            "every spilled chunk went: no file is left"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Over any sequence of pushes and sends: every chunk from the journal's first kept
        /// one on reads back as it was pushed (spilled or not, after any reclaim), the bounds
        /// hold, and no segment file outlives its chunks.
        #[test]
        fn kept_output_reads_back_exactly_and_the_bounds_hold(
            steps in proptest::collection::vec((1usize..40, 0u64..6), 1..300),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let (memory, spill) = (64, 256);
                let journal = journal(&dir, memory, spill);
                let mut pushed: Vec<Vec<u8>> = Vec::new();
                for (len, lag) in steps {
                    let n = pushed.len() as u64;
                    // The reader takes everything up to `lag` chunks behind, so the push
                    // always finds room once trimmed (a chunk is at most 40 bytes).
                    journal.ack(n.saturating_sub(lag));
                    let data: Vec<u8> = (0..len).map(|i| b'a' + ((n as usize + i) % 26) as u8).collect();
                    tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        journal.push(OutputStream::Stdout, Bytes::from(data.clone())),
                    )
                    .await
                    .expect("room once acknowledged chunks go");
                    pushed.push(data);
                    check_bounds(&journal, &dir, memory.max(40), spill);
                }
                let first = journal.state.lock().unwrap().first_seq;
                assert_eq!(read_all(&journal, first), pushed[first as usize..].concat());
                journal.ack(pushed.len() as u64);
                journal.push(OutputStream::Stdout, Bytes::from_static(b"z")).await;
                assert_eq!(spill_files(&dir), 0, "segments go with their chunks");
            });
        }

        /// Any interleaving of a task printing, a stream writing chunks out, the coordinator
        /// receiving and acknowledging some of them, and the connection dying with chunks in
        /// flight: every resume finds what the coordinator has not received, byte for byte;
        /// exactly the unacknowledged chunks are held; the bounds hold throughout.
        #[test]
        fn a_resume_always_finds_what_the_coordinator_did_not_receive(
            ops in proptest::collection::vec((0u8..4, 1usize..40), 1..400),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (memory, spill) = (64, 256);
            let journal = journal(&dir, memory, spill);
            let mut pushed: Vec<Vec<u8>> = Vec::new();
            // The model: what the current stream wrote, what the coordinator received, what
            // it acknowledged (acked <= received <= written <= pushed).
            let (mut written, mut received, mut acked) = (0usize, 0usize, 0usize);
            let mut generation = journal.attach(0).unwrap();
            for (op, n) in ops {
                match op {
                    0 => {
                        let data: Vec<u8> =
                            (0..n).map(|i| b'a' + ((pushed.len() + i) % 26) as u8).collect();
                        // Full: the task would wait; nothing is kept or dropped.
                        if journal.state.lock().unwrap().try_push(OutputStream::Stdout, &Bytes::from(data.clone())) {
                            pushed.push(data);
                        }
                    }
                    1 => {
                        let (batch, _) = journal.batch(generation, written as u64).unwrap();
                        for (seq, _, data) in batch.iter().take(n) {
                            assert_eq!(*seq, written as u64);
                            assert_eq!(data.as_ref(), pushed[written].as_slice());
                            written += 1;
                        }
                        received = received.max(written.saturating_sub(n % 3));
                    }
                    2 => {
                        acked = (acked + n).min(received);
                        journal.ack(acked as u64);
                    }
                    _ => {
                        // The connection dies: what was in flight is gone with it.
                        generation = journal.attach(received as u64).expect("kept from the received point");
                        acked = received;
                        written = received;
                    }
                }
                assert_eq!(journal.held().chunks as usize, pushed.len() - acked);
                check_bounds(&journal, &dir, memory.max(40), spill);
            }
            assert_eq!(read_all(&journal, received as u64), pushed[received..].concat());
        }
    }

    /// Memory and spill within their bounds, and the spill's count matching the disk.
    fn check_bounds(journal: &Journal, dir: &tempfile::TempDir, memory: usize, spill: u64) {
        let state = journal.state.lock().unwrap();
        assert!(state.spill.held <= spill, "spill over its limit");
        assert!(state.memory_bytes <= memory, "memory over its limit");
        assert_eq!(state.spill.segments.len(), spill_files(dir));
        let spilled_bytes: u64 = state
            .chunks
            .iter()
            .filter_map(|c| match c.body {
                Body::Spilled { len, .. } => Some(len as u64),
                Body::Memory(_) => None,
            })
            .sum();
        assert!(spilled_bytes <= state.spill.held);
        let on_disk: u64 = std::fs::read_dir(dir.path().join("spill"))
            .map(|d| d.flatten().map(|e| e.metadata().unwrap().len()).sum())
            .unwrap_or(0);
        assert_eq!(
            on_disk, state.spill.held,
            "the bound counts what is on disk"
        );
    }

    /// Everything a stream attached at `from` would send, in order.
    fn read_all(journal: &Journal, from: u64) -> Vec<u8> {
        let generation = journal.attach(from).expect("kept");
        let mut got = Vec::new();
        let mut next = from;
        loop {
            let (batch, _) = journal.batch(generation, next).unwrap();
            if batch.is_empty() {
                return got;
            }
            for (seq, _, data) in batch {
                assert_eq!(seq, next, "in order, none skipped");
                next = seq + 1;
                got.extend_from_slice(&data);
            }
        }
    }
}
