//! A command task's output, kept apart from the stream that carries it, so that the task
//! outlives a lost connection: the coordinator opens a new stream, says which chunk it got
//! last (`TaskRequest::Resume`), and the journal sends the rest and the task's end, each
//! once. Bounded: what is not sent yet, plus the last chunks sent (which a dying connection
//! may not have delivered), up to [`MAX_TASK_JOURNAL`]; past it the task's pipes wait.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use quinn::SendStream;
use skyward_common::frame::write_frame;
use skyward_common::limits::MAX_TASK_JOURNAL;
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

struct State {
    /// Output chunks kept, in order; `chunks[0]` has sequence number `first_seq`.
    chunks: VecDeque<(u64, OutputStream, Bytes)>,
    first_seq: u64,
    next_seq: u64,
    bytes: usize,
    /// Chunks below this were written to some stream.
    sent: u64,
    outcome: Option<TaskOutcome>,
    /// Which attached stream is current: an older one stops at its next step.
    generation: u64,
}

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
    pub fn new() -> Journal {
        Journal {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                first_seq: 0,
                next_seq: 0,
                bytes: 0,
                sent: 0,
                outcome: None,
                generation: 0,
            }),
            changed: Notify::new(),
            stop: watch::channel(None).0,
        }
    }

    /// Adds a chunk of output, waiting while the journal is full of chunks not sent yet.
    pub async fn push(&self, stream: OutputStream, data: Bytes) {
        loop {
            let waiting = self.changed.notified();
            {
                let mut state = self.state.lock().expect("journal lock");
                state.trim_sent();
                if state.bytes + data.len() <= MAX_TASK_JOURNAL || state.chunks.is_empty() {
                    let seq = state.next_seq;
                    state.next_seq += 1;
                    state.bytes += data.len();
                    state.chunks.push_back((seq, stream, data));
                    drop(state);
                    self.changed.notify_waiters();
                    return;
                }
            }
            // Full of what nobody has sent: the task waits on its pipe until a stream takes it.
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

    /// Writes the journal to `send` from chunk `next` on, then the outcome, as they come.
    pub async fn pump(&self, send: &mut SendStream, generation: u64, mut next: u64) -> PumpEnd {
        loop {
            let waiting = self.changed.notified();
            let (batch, outcome) = {
                let state = self.state.lock().expect("journal lock");
                if state.generation != generation {
                    return PumpEnd::Replaced;
                }
                let skip = next.saturating_sub(state.first_seq) as usize;
                let batch: Vec<(u64, OutputStream, Bytes)> =
                    state.chunks.iter().skip(skip).cloned().collect();
                let outcome = match batch.is_empty() {
                    true => state.outcome.clone(),
                    false => None,
                };
                (batch, outcome)
            };
            if batch.is_empty() && outcome.is_none() {
                waiting.await;
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

impl Default for Journal {
    fn default() -> Self {
        Journal::new()
    }
}

impl State {
    /// Drops the oldest chunks already sent while the journal is over its bound.
    fn trim_sent(&mut self) {
        while self.bytes > MAX_TASK_JOURNAL / 2 {
            match self.chunks.front() {
                Some((seq, _, data)) if *seq < self.sent => {
                    self.bytes -= data.len();
                    self.first_seq = seq + 1;
                    self.chunks.pop_front();
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_attaches_only_where_the_journal_still_has_the_output() {
        let journal = Journal::new();
        for i in 0..3 {
            journal
                .push(OutputStream::Stdout, Bytes::from(format!("{i}\n")))
                .await;
        }
        assert_eq!(journal.attach(0), Some(1));
        assert_eq!(journal.attach(3), Some(2), "caught up: nothing to replay");
        assert_eq!(journal.attach(4), None, "output that does not exist yet");
        assert!(!journal.is_finished());
        journal.finish(TaskOutcome::Exited { code: 0 });
        assert!(journal.is_finished());
    }

    #[tokio::test]
    async fn output_nobody_sent_is_never_dropped_and_the_task_waits_for_room() {
        let journal = std::sync::Arc::new(Journal::new());
        let chunk = Bytes::from(vec![b'x'; MAX_TASK_JOURNAL / 4]);
        for _ in 0..4 {
            journal.push(OutputStream::Stdout, chunk.clone()).await;
        }
        // Full of unsent output: the next chunk waits.
        let more = {
            let journal = journal.clone();
            let chunk = chunk.clone();
            tokio::spawn(async move { journal.push(OutputStream::Stdout, chunk).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!more.is_finished());
        // Once the first two went out, the oldest sent ones make room.
        journal.state.lock().unwrap().sent = 2;
        journal.changed.notify_waiters();
        tokio::time::timeout(std::time::Duration::from_secs(5), more)
            .await
            .expect("room once sent output can go")
            .unwrap();
        assert_eq!(journal.attach(0), None, "chunk 0 was sent and dropped");
        assert!(journal.attach(2).is_some(), "unsent ones stay");
    }
}
