//! Runs a job (one task, a broadcast, or a map) on a pool's nodes and streams its events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use skyward_common::limits::OUTPUT_CHUNK;
use skyward_common::protocol::{OutputStream, TaskEvent, TaskKind, TaskOutcome, TaskSpec};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{AbortHandle, JoinSet};

use crate::pool::Pool;
use crate::preflight::{Preflight, PreflightError};
use crate::server::{Coordinator, CoordinatorEvent, JobTicket, NodeHandle, TaskError};
use skyward_core::jobs::{self, AttemptFailure, End, JobNode, JobSpec, NO_NODE_LEFT};
use skyward_core::slots::{node_slots, slot_env, GpuRequest, SlotTask};
use skyward_core::training::{training_env, Mesh};

/// What feeds a task's stdin. `Sync` so that a job (and the future running it) can move
/// between threads.
pub type TaskInput = Box<dyn AsyncRead + Send + Sync + Unpin>;

/// One task of a job.
#[derive(Debug, Clone)]
pub struct TaskPlan {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Index of the node the task must run on (broadcast), or any node.
    pub node: Option<usize>,
    /// GPU slots the task needs; it starts only once they are free.
    pub gpus: GpuRequest,
    /// Where the task runs, relative to the agent's work dir (a synced workdir's
    /// [`SyncReport::dir`](crate::workdir::SyncReport)); `None` is the work dir itself.
    pub cwd: Option<String>,
}

pub struct Job {
    pub tasks: Vec<TaskPlan>,
    /// How many times a task whose node is lost runs again on another node (tasks pinned to
    /// a node and tasks holding GPU slots are not moved).
    pub retries: u32,
    /// Tasks at once on one node, for tasks without a GPU request (slots limit the others).
    pub per_node: usize,
    pub timeout: Option<Duration>,
    /// Fed to the first task's stdin.
    pub stdin: Option<TaskInput>,
}

impl Job {
    /// One task on every node, each told its rank, the world size, every node's address and
    /// where rank 0 listens ([`skyward_core::training`]), once the preflight has checked that every
    /// node reaches rank 0 there (and every other node, with [`Preflight::Mesh`]).
    pub async fn broadcast(
        pool: &Pool,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        preflight: Preflight,
    ) -> Result<Vec<TaskPlan>, PreflightError> {
        let mesh =
            crate::preflight::check(&pool.shared_coordinator(), &pool.nodes(), &env, preflight)
                .await?;
        Ok(Self::broadcast_on(&mesh, argv, env))
    }

    /// The broadcast's tasks on `mesh`; the user's `env` goes last, so it wins.
    pub fn broadcast_on(
        mesh: &Mesh,
        argv: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Vec<TaskPlan> {
        (0..mesh.nodes.len())
            .map(|rank| {
                let mut task_env = training_env(mesh, rank);
                task_env.extend(env.iter().cloned());
                TaskPlan {
                    argv: argv.clone(),
                    env: task_env,
                    node: Some(rank),
                    gpus: GpuRequest::None,
                    cwd: None,
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum RunEvent {
    Started {
        task: usize,
        node: String,
    },
    Output {
        task: usize,
        node: String,
        stream: OutputStream,
        data: Bytes,
    },
    Finished {
        task: usize,
        report: TaskReport,
    },
    /// A task's node was lost; the task runs again on another node.
    Retrying {
        task: usize,
        from: String,
        to: String,
        attempt: u32,
        reason: String,
    },
    /// A node's connection was lost while it ran `tasks` of this run: they run on there,
    /// their output held on the node, and resume when it is back within `wait_ms`.
    NodeUnreachable {
        node: String,
        reason: String,
        tasks: usize,
        wait_ms: u64,
    },
    /// A task went on on its node's new connection after `outage_ms` (from when the loss was
    /// seen); `held_bytes` of its output, held on the node, come now. `waited_for_room`: the
    /// node's room for unacknowledged output was full and the task paused meanwhile.
    Resumed {
        task: usize,
        node: String,
        outage_ms: u64,
        held_bytes: u64,
        waited_for_room: bool,
    },
    /// A node's machine is about to be taken away (a spot interruption notice).
    NodeInterrupted {
        node: String,
        notice: skyward_common::protocol::Interruption,
    },
    /// A workdir sync or a download reached a node: a line for people, and the same as a
    /// JSON object (text, so that the event keeps a compact binary encoding).
    Transfer {
        line: String,
        json: String,
    },
}

/// How a task ended: its outcome on the node, or why the coordinator lost track of it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskReport {
    pub node: String,
    pub outcome: Result<TaskOutcome, RunError>,
}

/// Why a task has no outcome of its own: a program tells these apart by variant, a person by
/// the line each says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum RunError {
    /// No node can take the task: none fits what it asks for, or every one that could was
    /// given up.
    #[error("{0}")]
    Unplaceable(String),
    /// Its node was given up (silent, interrupted, its machine gone) or its connection did
    /// not come back within the node timeout, and no retry was left.
    #[error("connection to {node}: {reason}")]
    NodeLost { node: String, reason: String },
    /// The node broke the task protocol (an output out of order, a stream that ended
    /// without an outcome).
    #[error("{node}: {message}")]
    Protocol { node: String, message: String },
    /// The task is over a size limit (its command line and environment, or its input).
    #[error("{0}")]
    TooLarge(String),
    /// A broadcast's nodes failed its preflight (they cannot reach rank 0, or a probe did
    /// not run): nothing was started.
    #[error("{0}")]
    Preflight(String),
    /// This side failed (forwarding the task's input, a worker that stopped).
    #[error("{0}")]
    Internal(String),
}

impl From<TaskError> for RunError {
    fn from(error: TaskError) -> RunError {
        match error {
            TaskError::Lost { node, reason } => RunError::NodeLost { node, reason },
            TaskError::Protocol { node, error } => RunError::Protocol {
                node,
                message: error,
            },
            error @ (TaskError::TooLarge(_) | TaskError::InputTooLarge(_)) => {
                RunError::TooLarge(error.to_string())
            }
        }
    }
}

impl TaskReport {
    pub fn success(&self) -> bool {
        matches!(&self.outcome, Ok(o) if o.success())
    }

    /// The exit code the CLI reports: the task's own, or 255 (as ssh does) when the
    /// coordinator lost the task.
    pub fn exit_code(&self) -> i32 {
        match &self.outcome {
            Ok(outcome) => outcome.exit_code(),
            Err(_) => 255,
        }
    }
}

/// Runs every task of `job` on `pool`, sending events as they happen; returns one report per
/// task, in input order. Dropping the future cancels every task still running.
pub async fn run_job(pool: &Pool, mut job: Job, events: mpsc::Sender<RunEvent>) -> Vec<TaskReport> {
    let coordinator = pool.shared_coordinator();
    let spec = JobSpec {
        tasks: job
            .tasks
            .iter()
            .map(|t| SlotTask {
                pin: t.node,
                gpus: t.gpus.clone(),
            })
            .collect(),
        nodes: job_nodes(pool),
        per_node: job.per_node,
        retries: job.retries,
        stdin_task: job.stdin.is_some().then_some(0),
    };
    let mut reports: Vec<Option<TaskReport>> = vec![None; job.tasks.len()];
    let launch = command_attempts(&coordinator, &mut job, events.clone());
    let mut driver = JobDriver::submit(&coordinator, spec, launch, |report: &TaskReport| {
        report.outcome.as_ref().err().map(ToString::to_string)
    });
    while let Some(news) = driver.next().await {
        let event = match news {
            JobNews::Ended { task, end } => {
                let report = end.unwrap_or_else(|not_run| TaskReport {
                    node: match &not_run {
                        NotRun::Lost { node, .. } => node.clone(),
                        NotRun::Unplaceable(_) => String::new(),
                    },
                    outcome: Err(not_run.into()),
                });
                reports[task] = Some(announce_end(&events, task, report).await);
                continue;
            }
            JobNews::Retrying {
                task,
                from,
                to,
                attempt,
                reason,
            } => RunEvent::Retrying {
                task,
                from,
                to,
                attempt,
                reason,
            },
            JobNews::NodeInterrupted { node, notice } => RunEvent::NodeInterrupted { node, notice },
            JobNews::NodeUnreachable {
                node,
                reason,
                tasks,
                wait_ms,
            } => RunEvent::NodeUnreachable {
                node,
                reason,
                tasks,
                wait_ms,
            },
        };
        let _ = events.send(event).await;
    }
    reports
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| TaskReport {
                node: String::new(),
                outcome: Err(RunError::Unplaceable(NO_NODE_LEFT.into())),
            })
        })
        .collect()
}

/// The pool's nodes as a job sees them when submitted.
pub fn job_nodes(pool: &Pool) -> Vec<JobNode> {
    pool.nodes()
        .iter()
        .map(|n| JobNode {
            id: n.node_id.clone(),
            slots: node_slots(&n.inventory),
            running: n.running() as usize,
        })
        .collect()
}

/// How a command job's attempts run: each one's task spec (its plan, its GPU slots' env,
/// stdin for the first task's first attempt), driven by [`drive_task`].
fn command_attempts(
    coordinator: &Arc<Coordinator>,
    job: &mut Job,
    events: mpsc::Sender<RunEvent>,
) -> impl FnMut(&jobs::Start, NodeHandle) -> Attempt<TaskReport> + Send + 'static {
    let ids: Vec<u64> = (0..job.tasks.len())
        .map(|_| coordinator.next_task_id())
        .collect();
    let plans = Arc::new(job.tasks.clone());
    let timeout = job.timeout.map(|t| t.as_millis() as u64);
    let mut stdin = job.stdin.take();
    let coordinator = coordinator.clone();
    move |start, node| {
        let task = start.task;
        let stdin = match (task, start.attempt) {
            (0, 0) => stdin.take(),
            _ => None,
        };
        let plan = &plans[task];
        let mut env = plan.env.clone();
        env.extend(slot_env(&start.slots));
        let mut spec = TaskSpec::command(
            ids[task],
            start.attempt,
            plan.argv.clone(),
            env,
            timeout,
            stdin.is_some(),
        );
        if let TaskKind::Command { cwd, .. } = &mut spec.kind {
            cwd.clone_from(&plan.cwd);
        }
        let (coordinator, events) = (coordinator.clone(), events.clone());
        Box::pin(async move { drive_task(&coordinator, &node, task, spec, stdin, &events).await })
    }
}

/// One attempt of a task, run to its end: what it reports.
pub type Attempt<R> = std::pin::Pin<Box<dyn std::future::Future<Output = R> + Send>>;

/// Makes the attempt a start asks for, on its node.
pub type Launch<R> = dyn FnMut(&jobs::Start, NodeHandle) -> Attempt<R> + Send;

/// Why a task ended without a report of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRun {
    /// No node could (any longer) take it.
    Unplaceable(String),
    /// It is pinned to `node`, which was given up before it started there.
    Lost { node: String, reason: String },
}

impl From<NotRun> for RunError {
    fn from(not_run: NotRun) -> RunError {
        match not_run {
            NotRun::Unplaceable(why) => RunError::Unplaceable(why),
            NotRun::Lost { node, reason } => RunError::NodeLost { node, reason },
        }
    }
}

/// What a job's driver has to say, in the order it happened.
#[derive(Debug)]
pub enum JobNews<R> {
    /// A task ended: its last attempt's report, or why it never ran there.
    Ended { task: usize, end: Result<R, NotRun> },
    /// A task's node was lost or interrupted; its next attempt started on `to`.
    Retrying {
        task: usize,
        from: String,
        to: String,
        attempt: u32,
        reason: String,
    },
    NodeInterrupted {
        node: String,
        notice: skyward_common::protocol::Interruption,
    },
    /// A node's connection was lost while it ran `tasks` of this job.
    NodeUnreachable {
        node: String,
        reason: String,
        tasks: usize,
        wait_ms: u64,
    },
}

/// A job's driver: it hands the job to the pool state ([`Coordinator::submit_job`]), which
/// decides where each attempt runs and when a task moves or ends
/// ([`skyward_core::jobs`]); the driver starts and stops the attempts it is asked to
/// (`launch` makes one: a command, a typed task), says when each attempt's stream ended,
/// and passes on what a caller wants to know. Dropping it cancels the job: its attempts
/// stop and free what they hold.
pub struct JobDriver<R> {
    coordinator: Arc<Coordinator>,
    /// The job's nodes by id: a handle reaches its node across its connections (an attempt
    /// started while its node is between connections waits for it).
    handles: HashMap<String, NodeHandle>,
    ticket: JobTicket,
    launch: Box<Launch<R>>,
    /// Why an attempt's report is a failure that may move its task (its node lost), if it is.
    failure: fn(&R) -> Option<String>,
    /// Each running attempt: its number, node and handle.
    current: HashMap<usize, (u32, String, AbortHandle)>,
    /// Reports of attempts that ended (or could not start), until the state says whether
    /// they are their task's.
    ended: HashMap<(usize, u32), Result<R, NotRun>>,
    running: JoinSet<(usize, u32, R)>,
    node_events: broadcast::Receiver<CoordinatorEvent>,
    node_events_open: bool,
}

impl<R: Send + 'static> JobDriver<R> {
    pub fn submit(
        coordinator: &Arc<Coordinator>,
        spec: JobSpec,
        launch: impl FnMut(&jobs::Start, NodeHandle) -> Attempt<R> + Send + 'static,
        failure: fn(&R) -> Option<String>,
    ) -> Self {
        // Before the job is submitted: nothing of its nodes' news is missed.
        let node_events = coordinator.subscribe();
        JobDriver {
            ticket: coordinator.submit_job(spec),
            coordinator: coordinator.clone(),
            handles: HashMap::new(),
            launch: Box::new(launch),
            failure,
            current: HashMap::new(),
            ended: HashMap::new(),
            running: JoinSet::new(),
            node_events,
            node_events_open: true,
        }
    }

    /// The next news of the job; `None` once every task ended.
    pub async fn next(&mut self) -> Option<JobNews<R>> {
        loop {
            tokio::select! {
                action = self.ticket.actions.recv() => match action {
                    Some(jobs::Action::Start(start)) => {
                        self.start(&start);
                        if let Some(moved) = start.moved {
                            return Some(JobNews::Retrying {
                                task: start.task,
                                from: moved.from,
                                to: start.node,
                                attempt: start.attempt,
                                reason: moved.reason,
                            });
                        }
                    }
                    Some(jobs::Action::Stop { task, attempt, .. }) => {
                        if self.current.get(&task).map(|(a, ..)| *a) == Some(attempt) {
                            let (_, _, stop) = self.current.remove(&task).expect("checked");
                            stop.abort();
                        }
                    }
                    Some(jobs::Action::Ended { task, end, .. }) => {
                        let end = match end {
                            End::Ran { attempt } => {
                                let report = self.ended.remove(&(task, attempt));
                                self.ended.retain(|(t, _), _| *t != task);
                                report.unwrap_or_else(|| Err(NotRun::Lost {
                                    node: String::new(),
                                    reason: "its report was lost".into(),
                                }))
                            }
                            End::Unplaceable(why) => Err(NotRun::Unplaceable(why)),
                            End::Lost { node, reason } => Err(NotRun::Lost { node, reason }),
                        };
                        return Some(JobNews::Ended { task, end });
                    }
                    Some(jobs::Action::Done { .. }) | None => {
                        self.running.shutdown().await;
                        return None;
                    }
                },
                Some(joined) = self.running.join_next(), if !self.running.is_empty() => {
                    // An attempt stopped because its task moved elsewhere ends cancelled.
                    if let Ok((task, attempt, report)) = joined {
                        self.attempt_ended(task, attempt, report);
                    }
                }
                event = self.node_events.recv(), if self.node_events_open => match event {
                    Ok(CoordinatorEvent::NodeInterrupted { node_id, notice }) => {
                        return Some(JobNews::NodeInterrupted { node: node_id, notice });
                    }
                    Ok(CoordinatorEvent::NodeDisconnected { node_id, reason }) => {
                        let tasks = self.current.values().filter(|(_, node, _)| *node == node_id).count();
                        // A node given up is reported by its tasks' retries or failures.
                        if tasks > 0 && self.coordinator.fenced(&node_id).is_none() {
                            let wait_ms = self.coordinator.node_timeout().as_millis() as u64;
                            return Some(JobNews::NodeUnreachable { node: node_id, reason, tasks, wait_ms });
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => self.node_events_open = false,
                },
            }
        }
    }

    fn start(&mut self, start: &jobs::Start) {
        if !self.handles.contains_key(&start.node) {
            if let Some(handle) = self.coordinator.node_handle(&start.node) {
                self.handles.insert(start.node.clone(), handle);
            }
        }
        let (task, number) = (start.task, start.attempt);
        let Some(node) = self.handles.get(&start.node).cloned() else {
            // Not a node of this pool (forgotten since): the attempt fails without starting.
            let reason = "not one of the pool's nodes".to_string();
            let lost = NotRun::Lost {
                node: start.node.clone(),
                reason: reason.clone(),
            };
            self.ended.insert((task, number), Err(lost));
            let failure = AttemptFailure {
                reason,
                node_connected: false,
            };
            self.coordinator
                .attempt_ended(self.ticket.job, task, number, Some(failure));
            return;
        };
        let attempt = (self.launch)(start, node);
        let stop = self
            .running
            .spawn(async move { (task, number, attempt.await) });
        self.current
            .insert(task, (number, start.node.clone(), stop));
    }

    /// An attempt's stream ended: the pool state decides whether the task moves or ends.
    fn attempt_ended(&mut self, task: usize, attempt: u32, report: R) {
        let node = match self.current.get(&task) {
            Some((number, node, _)) if *number == attempt => node.clone(),
            _ => return,
        };
        self.current.remove(&task);
        let failure = (self.failure)(&report).map(|reason| AttemptFailure {
            reason,
            node_connected: self.handles.get(&node).is_some_and(|n| n.is_connected()),
        });
        self.ended.insert((task, attempt), Ok(report));
        self.coordinator
            .attempt_ended(self.ticket.job, task, attempt, failure);
    }
}

/// Says that `task` ended with `report`, and hands the report back for the job's list.
async fn announce_end(
    events: &mpsc::Sender<RunEvent>,
    task: usize,
    report: TaskReport,
) -> TaskReport {
    let _ = events
        .send(RunEvent::Finished {
            task,
            report: report.clone(),
        })
        .await;
    report
}

async fn drive_task(
    coordinator: &Coordinator,
    node: &NodeHandle,
    task: usize,
    spec: TaskSpec,
    stdin: Option<TaskInput>,
    events: &mpsc::Sender<RunEvent>,
) -> TaskReport {
    let report = |outcome| TaskReport {
        node: node.node_id.clone(),
        outcome,
    };
    let remote = match coordinator.start_task(node, spec).await {
        Ok(remote) => remote,
        Err(e) => return report(Err(e.into())),
    };
    let (mut input, mut output) = (remote.input, remote.output);
    // Should this driver be dropped (its job's future was), the task stops on its node too.
    let mut cancel_on_drop = input.cancel_on_drop();
    let node_id = node.node_id.clone();
    // Stdin flows while output is read; the input half stays alive until the task ends.
    let feeding = async move {
        if let Some(mut stdin) = stdin {
            let mut buf = vec![0u8; OUTPUT_CHUNK];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input
                            .stdin(Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            let _ = input.close_stdin().await;
        }
        std::future::pending::<()>().await;
        drop(input);
    };
    let reading = async {
        loop {
            match output.next().await {
                Ok(Some(TaskEvent::Started { .. })) => {
                    let _ = events
                        .send(RunEvent::Started {
                            task,
                            node: node_id.clone(),
                        })
                        .await;
                }
                Ok(Some(TaskEvent::Output { stream, data, .. })) => {
                    let _ = events
                        .send(RunEvent::Output {
                            task,
                            node: node_id.clone(),
                            stream,
                            data,
                        })
                        .await;
                }
                Ok(Some(TaskEvent::Resumed {
                    held_bytes,
                    waited_for_room,
                })) => {
                    let outage = output.last_outage().unwrap_or_default();
                    let _ = events
                        .send(RunEvent::Resumed {
                            task,
                            node: node_id.clone(),
                            outage_ms: outage.as_millis() as u64,
                            held_bytes,
                            waited_for_room,
                        })
                        .await;
                }
                Ok(Some(TaskEvent::Finished(outcome))) => return report(Ok(outcome)),
                // Only probe and typed tasks report these; a command has nothing to say with one.
                Ok(Some(TaskEvent::Probe(_) | TaskEvent::Result(_))) => {}
                Ok(None) => {
                    return report(Err(RunError::Protocol {
                        node: node_id.clone(),
                        message: "task stream ended without an outcome".into(),
                    }))
                }
                Err(e) => return report(Err(e.into())),
            }
        }
    };
    let ended = tokio::select! {
        r = reading => r,
        _ = feeding => report(Err(RunError::Internal("stdin forwarding stopped unexpectedly".into()))),
    };
    cancel_on_drop.disarm();
    ended
}
