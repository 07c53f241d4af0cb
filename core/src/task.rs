//! A task stream's progress as seen by the coordinator: pure sequence checking, so a
//! resumed stream delivers every output chunk exactly once.

use skyward_common::protocol::{TaskEvent, TaskOutcome};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskProtocolError {
    #[error("output chunk {got} arrived when {expected} was next: chunks were lost")]
    Gap { expected: u64, got: u64 },
    #[error("event after the task finished")]
    AfterFinish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// New: pass it on.
    Deliver,
    /// Already seen (a resend after reconnect): drop it.
    Duplicate,
}

#[derive(Debug, Default, Clone)]
pub struct TaskProgress {
    next_seq: u64,
    outcome: Option<TaskOutcome>,
}

impl TaskProgress {
    /// The next output sequence number expected: every chunk below it has been delivered.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn outcome(&self) -> Option<&TaskOutcome> {
        self.outcome.as_ref()
    }

    pub fn observe(&mut self, event: &TaskEvent) -> Result<Delivery, TaskProtocolError> {
        if self.outcome.is_some() {
            return Err(TaskProtocolError::AfterFinish);
        }
        match event {
            TaskEvent::Output { seq, .. } if *seq < self.next_seq => Ok(Delivery::Duplicate),
            TaskEvent::Output { seq, .. } if *seq > self.next_seq => Err(TaskProtocolError::Gap {
                expected: self.next_seq,
                got: *seq,
            }),
            TaskEvent::Output { .. } => {
                self.next_seq += 1;
                Ok(Delivery::Deliver)
            }
            TaskEvent::Started { .. }
            | TaskEvent::Probe(_)
            | TaskEvent::Result(_)
            | TaskEvent::Resumed { .. } => Ok(Delivery::Deliver),
            TaskEvent::Finished(outcome) => {
                self.outcome = Some(outcome.clone());
                Ok(Delivery::Deliver)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyward_common::protocol::OutputStream;

    fn out(seq: u64) -> TaskEvent {
        TaskEvent::Output {
            seq,
            stream: OutputStream::Stdout,
            data: bytes::Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn chunks_are_delivered_once_in_order() {
        let mut p = TaskProgress::default();
        assert_eq!(p.observe(&out(0)), Ok(Delivery::Deliver));
        assert_eq!(p.observe(&out(1)), Ok(Delivery::Deliver));
        assert_eq!(p.observe(&out(0)), Ok(Delivery::Duplicate));
        assert_eq!(
            p.observe(&out(5)),
            Err(TaskProtocolError::Gap {
                expected: 2,
                got: 5
            })
        );
        assert_eq!(p.next_seq(), 2);
        let fin = TaskEvent::Finished(TaskOutcome::Exited { code: 3 });
        assert_eq!(p.observe(&fin), Ok(Delivery::Deliver));
        assert_eq!(p.outcome(), Some(&TaskOutcome::Exited { code: 3 }));
        assert_eq!(p.observe(&out(2)), Err(TaskProtocolError::AfterFinish));
    }
}
