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

use crate::pool::{GpuHold, Pool};
use crate::preflight::{Preflight, PreflightError};
use crate::server::{Coordinator, CoordinatorEvent, NodeHandle, TaskError};
use skyward_core::slots::{node_slots, GpuRequest, SlotScheduler, SlotTask};
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
    let nodes = pool.nodes();
    let loads = nodes.iter().map(|n| n.running() as usize).collect();
    let slots = nodes.iter().map(|n| node_slots(&n.inventory)).collect();
    let slot_tasks: Vec<SlotTask> = job
        .tasks
        .iter()
        .map(|t| SlotTask {
            pin: t.node,
            gpus: t.gpus.clone(),
        })
        .collect();
    let mut reports: Vec<Option<TaskReport>> = vec![None; job.tasks.len()];
    let mut scheduler = match SlotScheduler::new(slots, job.per_node, &slot_tasks) {
        Ok(scheduler) => scheduler.with_running(loads),
        // A task no node could ever take: none starts (the CLI checks this before).
        Err(message) => {
            return vec![
                TaskReport {
                    node: String::new(),
                    outcome: Err(RunError::Unplaceable(message)),
                };
                job.tasks.len()
            ];
        }
    };
    let mut node_events = pool.shared_coordinator().subscribe();
    let mut node_events_open = true;
    let coordinator = pool.shared_coordinator();
    let mut stdin = job.stdin.take();
    let mut attempts = Attempts::new(pool, nodes, &job, events.clone());
    // One placement across the pool's jobs: slots another job's tasks hold are not given
    // out, and tasks waiting for slots look again whenever any job frees some.
    let gpus = pool.gpu_ledger();
    let mut gpus_freed = gpus.freed();
    let mut gpu_holds: HashMap<usize, GpuHold> = HashMap::new();
    'assign: loop {
        // A node the pool put in place of a lost one takes that place's tasks from now on.
        attempts.adopt_replacements(&mut scheduler);
        // A task no node left could take ends now rather than wait for ever; while the pool
        // refills a place, it waits for the new node.
        let stranded = match coordinator.refilling() {
            true => Vec::new(),
            false => scheduler.unplaceable(),
        };
        for task in stranded {
            attempts.moving.remove(&task);
            gpu_holds.remove(&task);
            let report = TaskReport {
                node: String::new(),
                outcome: Err(RunError::Unplaceable(NO_NODE_LEFT.into())),
            };
            reports[task] = Some(announce_end(&events, task, report).await);
        }
        // Only GPU tasks waiting to start need the other jobs' holds: a job's loop turns once
        // per task end, and most jobs hold no slot at all.
        if scheduler.waiting_for_slots() {
            scheduler.held_elsewhere(|node, slot| {
                gpus.is_held(&attempts.nodes[node].node_id, &slot.device_id())
            });
        }
        gpus_freed.borrow_and_update();
        for placement in scheduler.assign() {
            if !placement.slots.is_empty() {
                let devices = placement.slots.iter().map(|s| s.device_id()).collect();
                let node = &attempts.nodes[placement.node].node_id;
                gpu_holds.insert(placement.task, gpus.hold(node, devices));
            }
            // Only the first task is fed stdin.
            let input = if placement.task == 0 {
                stdin.take()
            } else {
                None
            };
            if let Some((from, reason)) = attempts.moving.remove(&placement.task) {
                let _ = events
                    .send(RunEvent::Retrying {
                        task: placement.task,
                        from,
                        to: attempts.nodes[placement.node].node_id.clone(),
                        attempt: attempts.count[placement.task],
                        reason,
                    })
                    .await;
            }
            attempts.start(placement.task, placement.node, placement.env(), input);
        }
        if scheduler.done() {
            break;
        }
        let joined = loop {
            tokio::select! {
                // With nothing running, a job whose tasks wait (for GPU slots, or for the node
                // the pool is starting in a lost one's place) waits on the events below.
                joined = attempts.running.join_next(), if !attempts.running.is_empty() || !(scheduler.waiting_for_slots() || (node_events_open && coordinator.refilling())) => break joined,
                Ok(()) = gpus_freed.changed(), if scheduler.waiting_for_slots() => continue 'assign,
                event = node_events.recv(), if node_events_open => match event {
                    Ok(CoordinatorEvent::NodeInterrupted { node_id, notice }) => {
                        let why = format!(
                            "{} interruption notice: {} at {}",
                            notice.source, notice.action, notice.at
                        );
                        let _ = events
                            .send(RunEvent::NodeInterrupted { node: node_id.clone(), notice })
                            .await;
                        let Some(index) = attempts.nodes.iter().position(|n| n.node_id == node_id) else {
                            continue;
                        };
                        // It takes no new task; its tasks that may move start again elsewhere
                        // now rather than when the machine goes.
                        scheduler.retire(index);
                        for task in attempts.running_on(index) {
                            attempts.move_elsewhere(task, index, &mut scheduler, &mut gpu_holds, why.clone());
                        }
                        continue 'assign;
                    }
                    // Perhaps a node that replaced a lost one: it may take waiting tasks.
                    Ok(CoordinatorEvent::NodeConnected(_)) => continue 'assign,
                    // A refill failed or stopped: tasks waiting for it may be stranded.
                    Ok(CoordinatorEvent::PlacesChanged) => continue 'assign,
                    // Given up (silent, its machine gone by its provider's word, interrupted
                    // while the pool keeps its size): it takes no new task, and its tasks
                    // end (and move, with retries) as their streams say it is lost.
                    Ok(CoordinatorEvent::NodeLost { node_id, .. }) => {
                        if let Some(index) = attempts.nodes.iter().position(|n| n.node_id == node_id) {
                            scheduler.retire(index);
                            continue 'assign;
                        }
                    }
                    Ok(CoordinatorEvent::NodeDisconnected { node_id, reason }) => {
                        let Some(index) = attempts.nodes.iter().position(|n| n.node_id == node_id) else {
                            continue;
                        };
                        let tasks = attempts.running_on(index).len();
                        // A node given up is reported by its tasks' retries or failures.
                        if tasks > 0 && attempts.nodes[index].lost_reason().is_none() {
                            let wait_ms = coordinator.node_timeout().as_millis() as u64;
                            let _ = events
                                .send(RunEvent::NodeUnreachable { node: node_id, reason, tasks, wait_ms })
                                .await;
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => node_events_open = false,
                },
            }
        };
        let (task, node, report) = match joined {
            Some(Ok(done)) => done,
            // An attempt stopped because its task moved elsewhere.
            Some(Err(e)) if e.is_cancelled() => continue,
            _ => break,
        };
        if !attempts.ended(task, node) {
            // An attempt that moved elsewhere ended anyway: the current one speaks for it.
            continue;
        }
        if let Err(reason) = &report.outcome {
            if !attempts.nodes[node].is_connected() {
                scheduler.retire(node);
            }
            let reason = attempts.nodes[node]
                .lost_reason()
                .unwrap_or_else(|| reason.to_string());
            if attempts.move_elsewhere(task, node, &mut scheduler, &mut gpu_holds, reason) {
                continue;
            }
        }
        scheduler.finished(task);
        gpu_holds.remove(&task);
        reports[task] = Some(announce_end(&events, task, report).await);
    }
    attempts.running.shutdown().await;
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

/// The attempts of a job's tasks: each task's id, its attempts so far, where its current one
/// runs, and the moves of those whose node is lost or about to be.
struct Attempts<'a> {
    coordinator: Arc<Coordinator>,
    pool: &'a Pool,
    /// The job's nodes, by the scheduler's index; a lost one's place may be taken by the
    /// node the pool put in its place (see `adopt_replacements`).
    nodes: Vec<NodeHandle>,
    /// Tasks put back in line to run elsewhere, with the node they left and why, until they
    /// start again.
    moving: HashMap<usize, (String, String)>,
    job: &'a Job,
    events: mpsc::Sender<RunEvent>,
    ids: Vec<u64>,
    count: Vec<u32>,
    /// Fed stdin, which cannot be fed again: such a task does not move.
    fed_stdin: Vec<bool>,
    current: HashMap<usize, (usize, AbortHandle)>,
    running: JoinSet<(usize, usize, TaskReport)>,
}

impl<'a> Attempts<'a> {
    fn new(
        pool: &'a Pool,
        nodes: Vec<NodeHandle>,
        job: &'a Job,
        events: mpsc::Sender<RunEvent>,
    ) -> Self {
        let tasks = job.tasks.len();
        let coordinator = pool.shared_coordinator();
        Attempts {
            ids: (0..tasks).map(|_| coordinator.next_task_id()).collect(),
            coordinator,
            pool,
            moving: HashMap::new(),
            nodes,
            job,
            events,
            count: vec![0; tasks],
            fed_stdin: vec![false; tasks],
            current: HashMap::new(),
            running: JoinSet::new(),
        }
    }

    /// Starts `task`'s current attempt on `node`, with `env` (its GPU slots') added.
    fn start(
        &mut self,
        task: usize,
        node: usize,
        env: Vec<(String, String)>,
        stdin: Option<TaskInput>,
    ) {
        let plan = &self.job.tasks[task];
        let mut task_env = plan.env.clone();
        task_env.extend(env);
        self.fed_stdin[task] |= stdin.is_some();
        let mut spec = TaskSpec::command(
            self.ids[task],
            self.count[task],
            plan.argv.clone(),
            task_env,
            self.job.timeout.map(|t| t.as_millis() as u64),
            stdin.is_some(),
        );
        if let TaskKind::Command { cwd, .. } = &mut spec.kind {
            cwd.clone_from(&plan.cwd);
        }
        let (coordinator, handle, events) = (
            self.coordinator.clone(),
            self.nodes[node].clone(),
            self.events.clone(),
        );
        let stop = self.running.spawn(async move {
            let report = drive_task(&coordinator, &handle, task, spec, stdin, &events).await;
            (task, node, report)
        });
        self.current.insert(task, (node, stop));
    }

    /// The tasks whose current attempt runs on `node`.
    fn running_on(&self, node: usize) -> Vec<usize> {
        self.current
            .iter()
            .filter(|(_, (n, _))| *n == node)
            .map(|(task, _)| *task)
            .collect()
    }

    /// An attempt of `task` on `node` ended: whether it was the current one.
    fn ended(&mut self, task: usize, node: usize) -> bool {
        let current = self.current.get(&task).map(|(n, _)| *n) == Some(node);
        if current {
            self.current.remove(&task);
        }
        current
    }

    /// Puts `task` back in line to run again elsewhere, stopping its attempt on `from` if it
    /// runs and freeing what it held: the scheduler places it as it places any task (never
    /// on a node it retired, within the per-node limit, on free GPU slots, a replacement in
    /// a lost node's place included), not back on `from`. False when the task may not move
    /// (pinned, fed stdin, no retries left) or no node left could ever take it.
    fn move_elsewhere(
        &mut self,
        task: usize,
        from: usize,
        scheduler: &mut SlotScheduler,
        gpu_holds: &mut HashMap<usize, GpuHold>,
        reason: String,
    ) -> bool {
        let plan = &self.job.tasks[task];
        let movable = plan.node.is_none() && !self.fed_stdin[task];
        if !movable || self.count[task] >= self.job.retries {
            return false;
        }
        let from_id = self.nodes[from].node_id.clone();
        self.adopt_replacements(scheduler);
        // Once a new node holds the place, only the lost one is to be avoided, and it is gone.
        let avoid = (self.nodes[from].node_id == from_id).then_some(from);
        if !scheduler.has_place_for(task, avoid) || !scheduler.requeue(task, avoid) {
            return false;
        }
        if let Some((_, stop)) = self.current.remove(&task) {
            stop.abort();
        }
        gpu_holds.remove(&task);
        self.count[task] += 1;
        self.moving.insert(task, (from_id, reason));
        true
    }

    /// Takes in the nodes a pool put in place of this job's lost ones since it started (a
    /// pool that keeps its size replaces them while a long job runs): each takes its lost
    /// node's place in the scheduler, with its own GPU slots, for queued tasks and moves
    /// alike.
    fn adopt_replacements(&mut self, scheduler: &mut SlotScheduler) {
        // The job started with the pool's nodes in the pool's order, and a replacement takes
        // its lost node's place in that order.
        for (place, now) in self.pool.nodes().into_iter().enumerate() {
            match self.nodes.get_mut(place) {
                Some(node) if node.node_id != now.node_id => {
                    scheduler.renew(place, node_slots(&now.inventory));
                    *node = now;
                }
                _ => {}
            }
        }
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

/// Why a task that no node left could take ended.
const NO_NODE_LEFT: &str =
    "no node left could take it (every one that could was lost or is about to be taken away)";

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
