//! Typed tasks: a Rust value sent to a node, run there by a custom agent that registered
//! its type, and its typed output sent back.
//!
//! Both ends share the task type (a small library crate both the coordinator program and
//! the custom agent depend on). The value travels encoded by [`crate::codec`] in
//! [`TaskKind::Typed`](crate::protocol::TaskKind::Typed), its output in
//! [`TaskEvent::Result`](crate::protocol::TaskEvent::Result) pieces; both are bounded by
//! [`MAX_TYPED_INPUT`] and [`MAX_TYPED_OUTPUT`].
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use skyward_common::typed::{Task, TaskContext, TaskResult};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Sum {
//!     values: Vec<u64>,
//! }
//!
//! impl Task for Sum {
//!     const NAME: &'static str = "sum";
//!     const VERSION: u32 = 1;
//!     type Output = u64;
//!     fn run(self, _ctx: &TaskContext) -> TaskResult<u64> {
//!         Ok(self.values.iter().sum())
//!     }
//! }
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::limits::{MAX_TYPED_INPUT, MAX_TYPED_OUTPUT};
use crate::protocol::TaskId;

/// What a task's `run` returns: its output, or an error whose message the caller gets.
pub type TaskResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A unit of work a coordinator program sends to a node by value.
///
/// The agent runs `run` on a blocking thread (it may compute, sleep, read files); a panic
/// in it comes back to the caller as an error carrying the panic message. `NAME` and
/// `VERSION` identify the type on the wire: change `VERSION` whenever the type's encoding
/// or meaning changes, so that an agent built with the old one refuses it by name.
pub trait Task: Serialize + DeserializeOwned + Send + 'static {
    /// The name the agent knows the task by; unique among one agent's registered tasks.
    const NAME: &'static str;
    /// The version of the task's type and behaviour; both ends must agree.
    const VERSION: u32;
    /// Whether `run` may block: sleep, wait on I/O or a lock, or compute for more than some
    /// microseconds. The agent runs such a task on a blocking thread, which costs each task
    /// a hand-off to that thread and back (the larger part of a short task's dispatch). A
    /// task that does none of that may say `false`: the agent then runs it in place, on its
    /// async threads. Such a task cannot be cancelled or timed out while it runs, and one
    /// that blocks after all stalls the agent's networking, health reports included.
    const BLOCKING: bool = true;
    /// What the task sends back.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// Runs the task on the node.
    fn run(self, ctx: &TaskContext) -> TaskResult<Self::Output>;
}

/// What a running task may know about where it runs.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The node's id (`node-1`).
    pub node_id: String,
    /// The agent's work dir, where command tasks run by default.
    pub work_dir: PathBuf,
    /// This task's id on the node.
    pub task: TaskId,
    cancelled: Arc<AtomicBool>,
}

impl TaskContext {
    pub fn new(node_id: String, work_dir: PathBuf, task: TaskId) -> Self {
        TaskContext {
            node_id,
            work_dir,
            task,
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True once the caller gave the task up (cancelled, timed out, dropped its future):
    /// nobody will read the output any more, so a long task should return early. A
    /// thread cannot be killed, so a task that never looks runs to its end unheard.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Marks the task cancelled (the agent does, when its caller gives up).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

/// Why a typed value could not cross the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypedError {
    #[error("task {task} encodes to {size} bytes; the limit is {limit} (send less per task, e.g. smaller chunks)")]
    TooLarge {
        task: String,
        size: usize,
        limit: usize,
    },
    #[error("task {task}: {error}")]
    Codec { task: String, error: String },
}

fn encode_bounded<V: Serialize>(task: &str, value: &V, limit: usize) -> Result<Bytes, TypedError> {
    let encoded = crate::codec::encode(value).map_err(|e| TypedError::Codec {
        task: task.to_string(),
        error: e.to_string(),
    })?;
    if encoded.len() > limit {
        return Err(TypedError::TooLarge {
            task: task.to_string(),
            size: encoded.len(),
            limit,
        });
    }
    Ok(Bytes::from(encoded))
}

fn decode_bounded<V: DeserializeOwned>(
    task: &str,
    bytes: &[u8],
    limit: usize,
) -> Result<V, TypedError> {
    if bytes.len() > limit {
        return Err(TypedError::TooLarge {
            task: task.to_string(),
            size: bytes.len(),
            limit,
        });
    }
    crate::codec::decode(bytes).map_err(|e| TypedError::Codec {
        task: task.to_string(),
        error: e.to_string(),
    })
}

/// The task spec that runs `task` on a node.
pub fn spec<T: Task>(task: &T) -> Result<crate::protocol::TaskSpec, TypedError> {
    Ok(crate::protocol::TaskSpec::typed(
        T::NAME,
        T::VERSION,
        encode_input(task)?,
    ))
}

/// A task's value as it travels ([`MAX_TYPED_INPUT`] at most).
pub fn encode_input<T: Task>(task: &T) -> Result<Bytes, TypedError> {
    encode_bounded(T::NAME, task, MAX_TYPED_INPUT)
}

/// A task's value from the wire; malformed or oversize bytes are an error, never a panic.
pub fn decode_input<T: Task>(bytes: &[u8]) -> Result<T, TypedError> {
    decode_bounded(T::NAME, bytes, MAX_TYPED_INPUT)
}

/// A task's output as it travels ([`MAX_TYPED_OUTPUT`] at most).
pub fn encode_output<T: Task>(output: &T::Output) -> Result<Bytes, TypedError> {
    encode_bounded(T::NAME, output, MAX_TYPED_OUTPUT)
}

/// A task's output from the wire.
pub fn decode_output<T: Task>(bytes: &[u8]) -> Result<T::Output, TypedError> {
    decode_bounded(T::NAME, bytes, MAX_TYPED_OUTPUT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Echo(Vec<u8>);

    impl Task for Echo {
        const NAME: &'static str = "echo";
        const VERSION: u32 = 1;
        type Output = Vec<u8>;
        fn run(self, _ctx: &TaskContext) -> TaskResult<Vec<u8>> {
            Ok(self.0)
        }
    }

    #[test]
    fn values_round_trip() {
        let bytes = encode_input(&Echo(vec![1, 2, 3])).unwrap();
        assert_eq!(decode_input::<Echo>(&bytes).unwrap(), Echo(vec![1, 2, 3]));
        let out = encode_output::<Echo>(&vec![9]).unwrap();
        assert_eq!(decode_output::<Echo>(&out).unwrap(), vec![9]);
    }

    #[test]
    fn oversize_and_malformed_values_are_errors() {
        let big = Echo(vec![0; MAX_TYPED_INPUT + 1]);
        let err = encode_input(&big).unwrap_err();
        assert!(
            matches!(err, TypedError::TooLarge { ref task, .. } if task == "echo"),
            "{err}"
        );
        let err = decode_output::<Echo>(&[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(err, TypedError::Codec { .. }), "{err}");
    }
}
