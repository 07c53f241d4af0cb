//! A command task's output, kept apart from the stream that carries it, so that the task
//! outlives a lost connection: the coordinator opens a new stream, says which chunk it got
//! last (`TaskRequest::Resume`), and the journal sends the rest and the task's end, each
//! once.
//!
//! Bounded: up to [`MAX_TASK_JOURNAL`] bytes in memory (what is not sent yet, and the last
//! chunks sent, which a dying connection may not have delivered); past that, chunks go to a
//! spill file in the agent's work dir, up to [`MAX_TASK_SPILL`]; past that, the task's pipes
//! wait until a stream takes its output.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

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
    Spilled { offset: u64, len: usize },
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
    /// How many kept chunks are in the spill file (counted, not searched for on every push).
    spilled: usize,
    /// The spill file, its path, and how far it is written.
    spill: Option<(std::fs::File, PathBuf, u64)>,
    spill_path: PathBuf,
    spill_limit: u64,
    /// Chunks below this were written to some stream.
    sent: u64,
    outcome: Option<TaskOutcome>,
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
        Journal::with_limits(spill_path, MAX_TASK_JOURNAL, MAX_TASK_SPILL)
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
                spill: None,
                spill_path,
                spill_limit,
                sent: 0,
                outcome: None,
                generation: 0,
            }),
            changed: Notify::new(),
            stop: watch::channel(None).0,
        }
    }

    /// Adds a chunk of output: in memory while there is room, else to the spill file, else
    /// it waits until a stream has taken some.
    pub async fn push(&self, stream: OutputStream, data: Bytes) {
        loop {
            let waiting = self.changed.notified();
            {
                let mut state = self.state.lock().expect("journal lock");
                state.trim_sent();
                if state.try_push(stream, &data) {
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

    /// Makes a new stream the current one, from chunk `from` on; older streams stop. `None`
    /// when chunks from `from` on are no longer kept.
    pub fn attach(&self, from: u64) -> Option<u64> {
        let mut state = self.state.lock().expect("journal lock");
        if from < state.first_seq || from > state.next_seq {
            return None;
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
                Body::Spilled { offset, len } => {
                    let Some((file, _, _)) = &state.spill else {
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
                next = seq + 1;
                let mut state = self.state.lock().expect("journal lock");
                state.sent = state.sent.max(next);
                drop(state);
                // A producer may be waiting for room.
                self.changed.notify_waiters();
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
            if let Some((_, path, _)) = &state.spill {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl State {
    /// Keeps `data` in memory, or in the spill file once memory is full (and for as long as
    /// spilled chunks wait, so that order holds); false when both are full.
    fn try_push(&mut self, stream: OutputStream, data: &Bytes) -> bool {
        let body = if self.spilled == 0
            && (self.memory_bytes + data.len() <= self.memory_limit || self.chunks.is_empty())
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

    /// Appends `data` to the spill file (made on first use, owner-only); `None` when it is
    /// full or cannot be written.
    fn spill_write(&mut self, data: &Bytes) -> Option<Body> {
        if self.spill.is_none() {
            if let Some(dir) = self.spill_path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&self.spill_path)
                .map_err(|e| tracing::warn!("cannot spill task output: {e}"))
                .ok()?;
            self.spill = Some((file, self.spill_path.clone(), 0));
        }
        let limit = self.spill_limit;
        let (file, _, end) = self.spill.as_mut()?;
        if *end + data.len() as u64 > limit {
            return None;
        }
        file.write_all(data)
            .map_err(|e| tracing::warn!("cannot spill task output: {e}"))
            .ok()?;
        let body = Body::Spilled {
            offset: *end,
            len: data.len(),
        };
        *end += data.len() as u64;
        Some(body)
    }

    /// Drops the oldest chunks already sent while memory is over half full; once every
    /// spilled chunk is gone, the spill file starts over.
    fn trim_sent(&mut self) {
        while self.memory_bytes > self.memory_limit / 2
            || self
                .chunks
                .front()
                .is_some_and(|c| matches!(c.body, Body::Spilled { .. }))
        {
            match self.chunks.front() {
                Some(chunk) if chunk.seq < self.sent => {
                    match &chunk.body {
                        Body::Memory(data) => self.memory_bytes -= data.len(),
                        Body::Spilled { .. } => self.spilled -= 1,
                    }
                    self.first_seq = chunk.seq + 1;
                    self.chunks.pop_front();
                }
                _ => break,
            }
        }
        if self.spilled == 0 {
            if let Some((file, _, end)) = self.spill.as_mut() {
                if *end > 0 && file.set_len(0).is_ok() {
                    *end = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &tempfile::TempDir, memory: usize, spill: u64) -> Journal {
        Journal::with_limits(dir.path().join("spill/task-1.0.out"), memory, spill)
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
        let spill = dir.path().join("spill/task-1.0.out");
        assert!(
            spill.exists(),
            "memory held one chunk; the rest went to disk"
        );
        let expected: String = (0..10).map(|i| format!("line {i}\n")).collect();
        assert_eq!(replay(&journal, 0), expected);
        assert_eq!(replay(&journal, 7), "line 7\nline 8\nline 9\n");
        drop(journal);
        assert!(!spill.exists(), "the spill goes with the journal");
    }

    #[tokio::test]
    async fn output_nobody_sent_is_never_dropped_and_the_task_waits_for_room() {
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
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!more.is_finished(), "nothing unsent is ever dropped");
        // Once everything went out, sent chunks make room and the spill starts over.
        journal.state.lock().unwrap().sent = 3;
        journal.changed.notify_waiters();
        tokio::time::timeout(std::time::Duration::from_secs(5), more)
            .await
            .expect("room once sent output can go")
            .unwrap();
        assert_eq!(journal.attach(0), None, "sent chunks were let go");
        assert_eq!(replay(&journal, 3), "abcdefgh");
    }
}
