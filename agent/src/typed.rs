//! The typed tasks an agent knows ([`Registry`]) and how it runs one
//! ([`TaskKind::Typed`](skyward_common::protocol::TaskKind::Typed)): the task is decoded,
//! run on a blocking thread with panics caught, and its encoded output sent back in
//! [`TaskEvent::Result`] pieces before the outcome.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use skyward_common::frame::{read_frame, write_frame};
use skyward_common::limits::{MAX_TASK_FRAME, MAX_TYPED_INPUT, TYPED_RESULT_CHUNK};
use skyward_common::protocol::{TaskEvent, TaskOutcome, TaskRequest, TaskSpec};
use skyward_common::typed::{self, Task, TaskContext};

use crate::runner::Tasks;
use crate::task_threads::STARTED_WITHIN;

/// Runs one registered task type: decode, run, encode. `Err` is the task's failure
/// message; an undecodable input is `Ok(Err)` of the outer kind below.
type Runner = Box<dyn Fn(&[u8], &TaskContext) -> Result<Bytes, Failure> + Send + Sync>;

/// How a typed task did not produce its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// It never ran: unknown name, other version, undecodable input.
    NotStarted(String),
    /// It ran and returned an error, panicked, or its output could not be sent.
    Failed(String),
}

impl Failure {
    fn outcome(self) -> TaskOutcome {
        match self {
            Failure::NotStarted(error) => TaskOutcome::FailedToStart { error },
            Failure::Failed(error) => TaskOutcome::Failed { error },
        }
    }
}

/// The typed tasks this agent runs, by name; the stock agent's is empty.
#[derive(Default)]
pub struct Registry {
    tasks: BTreeMap<&'static str, Registered>,
}

struct Registered {
    version: u32,
    /// [`Task::BLOCKING`].
    blocking: bool,
    runner: Runner,
}

impl Registry {
    /// Adds `T`; a second type under the same name replaces the first.
    pub fn register<T: Task>(&mut self) {
        let runner: Runner = Box::new(|payload, ctx| {
            let task = typed::decode_input::<T>(payload)
                .map_err(|e| Failure::NotStarted(format!("cannot decode the input: {e}")))?;
            let output = task
                .run(ctx)
                .map_err(|e| Failure::Failed(format!("task `{}` failed: {e}", T::NAME)))?;
            typed::encode_output::<T>(&output).map_err(|e| Failure::Failed(e.to_string()))
        });
        let registered = Registered {
            version: T::VERSION,
            blocking: T::BLOCKING,
            runner,
        };
        self.tasks.insert(T::NAME, registered);
    }

    /// Whether task `name` is run in place, on the async threads: one that declared it never
    /// blocks, or a name this agent does not know (refused at once).
    pub fn runs_in_place(&self, name: &str) -> bool {
        self.tasks.get(name).is_none_or(|task| !task.blocking)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.keys().copied().collect()
    }

    /// Runs task `name` at `version` on `payload` here, on this thread; a panic becomes a
    /// failure carrying its message.
    pub fn run(
        &self,
        name: &str,
        version: u32,
        payload: &[u8],
        ctx: &TaskContext,
    ) -> Result<Bytes, Failure> {
        let Some(Registered {
            version: known_version,
            runner,
            ..
        }) = self.tasks.get(name)
        else {
            let known = match self.names() {
                names if names.is_empty() => "no typed tasks".to_string(),
                names => names.join(", "),
            };
            return Err(Failure::NotStarted(format!(
                "this agent does not know task `{name}`; it knows: {known}; build a custom agent with skyward_agent::Agent::register"
            )));
        };
        if *known_version != version {
            return Err(Failure::NotStarted(format!(
                "task `{name}` version {version} was sent, but this agent has version {known_version}: build the agent and the program from the same task crate"
            )));
        }
        if payload.len() > MAX_TYPED_INPUT {
            return Err(Failure::NotStarted(format!(
                "task `{name}`: input of {} bytes; the limit is {MAX_TYPED_INPUT}",
                payload.len()
            )));
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| runner(payload, ctx))) {
            Ok(result) => result,
            Err(panic) => Err(Failure::Failed(format!(
                "task `{name}` panicked: {}",
                panic_message(panic.as_ref())
            ))),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// Runs a typed task from its stream and sends its output but for the last piece; returns
/// its outcome and that piece, for the caller to send with `Finished` in one write (a small
/// output then costs one write in all), or `None` when nobody is left to tell.
///
/// A task that may block ([`Task::BLOCKING`], the default) runs on a blocking thread, one of
/// [`crate::task_threads::TaskThreads`]' drainers; one queued for [`STARTED_WITHIN`] without
/// starting asks for another drainer. The caller giving up (a `Cancel`, its side of the
/// stream reset, or it stopped reading) ends it as cancelled at once; the task's thread is
/// told through [`TaskContext::is_cancelled`] and its output is dropped. One that declared
/// it never blocks runs here, in place, to its end.
pub async fn run(
    spec: &TaskSpec,
    name: &str,
    version: u32,
    payload: Bytes,
    send: &mut SendStream,
    mut recv: RecvStream,
    tasks: Arc<Tasks>,
) -> Option<(TaskOutcome, Option<Bytes>)> {
    // No `Started`: the task runs in this agent's process, so there is no pid to tell, and
    // a frame of its own would cost each short task a write and often a packet.
    let ctx = TaskContext::new(tasks.node_id.clone(), tasks.work_dir.clone(), spec.task);
    let result = if tasks.registry.runs_in_place(name) {
        tasks.registry.run(name, version, &payload, &ctx)
    } else {
        let (thread_ctx, registry, task_name) =
            (ctx.clone(), tasks.registry.clone(), name.to_string());
        let (finished, mut work) = tokio::sync::oneshot::channel();
        let started = tasks.task_threads.submit(move || {
            // Given up while it was queued: nobody wants what it would make.
            if !thread_ctx.is_cancelled() {
                let _ = finished.send(registry.run(&task_name, version, &payload, &thread_ctx));
            }
        });
        let limit = spec.timeout_ms.map(std::time::Duration::from_millis);
        let timeout = async {
            match limit {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timeout);
        let unstick = tokio::time::sleep(STARTED_WITHIN);
        tokio::pin!(unstick);
        let mut waiting_to_start = true;
        // Made once, outside the loop: a frame read is not cancel-safe.
        let gave_up = gave_up(&mut recv);
        tokio::pin!(gave_up);
        loop {
            tokio::select! {
                finished = &mut work => break match finished {
                    Ok(result) => result,
                    Err(_) => Err(Failure::Failed(format!("task `{name}` did not finish"))),
                },
                _ = &mut unstick, if waiting_to_start => {
                    waiting_to_start = false;
                    if !started.load(Ordering::Acquire) {
                        tasks.task_threads.unstick();
                    }
                }
                _ = &mut gave_up => {
                    ctx.cancel();
                    tracing::debug!(task = %spec.task, "typed task cancelled by its caller");
                    return Some((TaskOutcome::Cancelled, None));
                }
                _ = send.stopped() => {
                    ctx.cancel();
                    return None;
                }
                _ = &mut timeout => {
                    ctx.cancel();
                    return Some((TaskOutcome::TimedOut, None));
                }
            }
        }
    };
    match result {
        Ok(output) => {
            let mut pieces = output.chunks(TYPED_RESULT_CHUNK);
            let last = pieces.next_back().map(|piece| output.slice_ref(piece));
            for piece in pieces {
                let piece = TaskEvent::Result(output.slice_ref(piece));
                write_frame(send, &piece).await.ok()?;
            }
            Some((TaskOutcome::Exited { code: 0 }, last))
        }
        Err(failure) => Some((failure.outcome(), None)),
    }
}

/// Returns once the caller no longer wants the task: it sent `Cancel` or reset its side of
/// the stream. The stream's clean end is not one: a typed task takes no input, and its
/// caller ends the stream with the task (and cancels by stopping the output).
async fn gave_up(recv: &mut RecvStream) {
    loop {
        match read_frame::<_, TaskRequest>(recv, MAX_TASK_FRAME).await {
            Ok(None) => return std::future::pending().await,
            Ok(Some(TaskRequest::Cancel)) | Err(_) => return,
            Ok(Some(other)) => tracing::debug!("typed task ignores {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use skyward_common::protocol::TaskId;
    use skyward_common::typed::TaskResult;

    #[derive(Serialize, Deserialize)]
    struct Half(u64);

    impl Task for Half {
        const NAME: &'static str = "half";
        const VERSION: u32 = 2;
        type Output = u64;
        fn run(self, _ctx: &TaskContext) -> TaskResult<u64> {
            if self.0 % 2 == 1 {
                return Err(format!("{} is odd", self.0).into());
            }
            assert!(self.0 != 4, "four is right out");
            Ok(self.0 / 2)
        }
    }

    fn ctx() -> TaskContext {
        TaskContext::new("node-1".into(), "/tmp".into(), TaskId { id: 1, attempt: 0 })
    }

    fn registry() -> Registry {
        let mut registry = Registry::default();
        registry.register::<Half>();
        registry
    }

    fn input(n: u64) -> Bytes {
        typed::encode_input(&Half(n)).unwrap()
    }

    /// `Half`, declared never to block.
    #[derive(Serialize, Deserialize)]
    struct QuickHalf(u64);

    impl Task for QuickHalf {
        const NAME: &'static str = "quick-half";
        const VERSION: u32 = 1;
        const BLOCKING: bool = false;
        type Output = u64;
        fn run(self, _ctx: &TaskContext) -> TaskResult<u64> {
            Ok(self.0 / 2)
        }
    }

    #[test]
    fn only_tasks_declared_never_to_block_and_unknown_names_run_in_place() {
        let mut registry = registry();
        registry.register::<QuickHalf>();
        assert!(!registry.runs_in_place("half"));
        assert!(registry.runs_in_place("quick-half"));
        assert!(registry.runs_in_place("sum"));
        let input = typed::encode_input(&QuickHalf(8)).unwrap();
        let out = registry.run("quick-half", 1, &input, &ctx()).unwrap();
        assert_eq!(typed::decode_output::<QuickHalf>(&out).unwrap(), 4);
    }

    #[test]
    fn runs_a_registered_task() {
        let out = registry().run("half", 2, &input(10), &ctx()).unwrap();
        assert_eq!(typed::decode_output::<Half>(&out).unwrap(), 5);
    }

    #[test]
    fn errors_and_panics_are_failures_with_their_message() {
        let failure = registry().run("half", 2, &input(3), &ctx()).unwrap_err();
        assert_eq!(
            failure,
            Failure::Failed("task `half` failed: 3 is odd".into())
        );
        let failure = registry().run("half", 2, &input(4), &ctx()).unwrap_err();
        assert!(
            matches!(&failure, Failure::Failed(m) if m.contains("panicked: four is right out")),
            "{failure:?}"
        );
    }

    #[test]
    fn unknown_names_versions_and_inputs_never_start() {
        let Err(Failure::NotStarted(message)) = registry().run("sum", 1, &input(2), &ctx()) else {
            panic!("an unknown task ran");
        };
        assert!(
            message.contains("does not know task `sum`; it knows: half"),
            "{message}"
        );
        assert!(
            message.contains("skyward_agent::Agent::register"),
            "{message}"
        );
        let Err(Failure::NotStarted(message)) = Registry::default().run("sum", 1, &[], &ctx())
        else {
            panic!("an unknown task ran");
        };
        assert!(message.contains("it knows: no typed tasks"), "{message}");
        let Err(Failure::NotStarted(message)) = registry().run("half", 1, &input(2), &ctx()) else {
            panic!("a task of another version ran");
        };
        assert!(
            message.contains("version 1 was sent, but this agent has version 2"),
            "{message}"
        );
        let Err(Failure::NotStarted(message)) = registry().run("half", 2, &[0xff; 11], &ctx())
        else {
            panic!("a malformed input ran");
        };
        assert!(message.contains("cannot decode the input"), "{message}");
    }
}
