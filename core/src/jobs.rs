//! Every job's tasks on one pool: which attempt of each task runs where, which GPU slots it
//! holds, when a task moves to another node and when it ends. Sans I/O, like the rest of the
//! [`crate::pool_state`] it is part of: a job's driver submits the job, carries out the
//! starts and stops it is asked for, and says when each attempt's stream ended; the pool
//! state tells it of nodes given up, interrupted or replaced, in the same step that decides
//! their fate, so that a fenced node is never given work.
//!
//! One ledger of GPU slots serves every job: a slot one job's task holds is not given to
//! another's, and a task moved elsewhere is placed by the same rules as any other.

use std::collections::{BTreeMap, HashMap};

use crate::slots::{Slot, SlotScheduler, SlotTask};

/// Why a task that no node left could take ended.
pub const NO_NODE_LEFT: &str =
    "no node left could take it (every one that could was lost or is about to be taken away)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// One of the pool's nodes as a job sees it when submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobNode {
    pub id: String,
    pub slots: Vec<Slot>,
    /// Tasks already running there (other work), counted towards the per-node limit.
    pub running: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    pub tasks: Vec<SlotTask>,
    /// The pool's nodes in place order; a task's pin is an index here.
    pub nodes: Vec<JobNode>,
    /// Tasks at once on one node, for tasks without a GPU request.
    pub per_node: usize,
    /// How many times a task whose node is lost runs again elsewhere.
    pub retries: u32,
    /// The task fed stdin, which cannot be fed again: it never moves.
    pub stdin_task: Option<usize>,
}

/// Why an attempt's stream ended without the task's own outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptFailure {
    pub reason: String,
    /// Whether the attempt's node was still connected when the stream ended.
    pub node_connected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Submit {
        job: JobId,
        spec: JobSpec,
    },
    /// The stream of `attempt` of `task` ended: with the task's outcome, or `failure`.
    AttemptEnded {
        job: JobId,
        task: usize,
        attempt: u32,
        failure: Option<AttemptFailure>,
    },
    /// The job's driver is gone: every attempt it runs stops, what they hold is free.
    Cancel {
        job: JobId,
    },
}

/// An attempt to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub job: JobId,
    pub task: usize,
    /// 0 for the first attempt.
    pub attempt: u32,
    pub node: String,
    pub slots: Vec<Slot>,
    /// The node an earlier attempt left and why (a retry).
    pub moved: Option<Moved>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub from: String,
    pub reason: String,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// With what `attempt`, its last, reported.
    Ran { attempt: u32 },
    /// No node could (any longer) take it.
    Unplaceable(String),
    /// It is pinned to `node`, which was given up before it started.
    Lost { node: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start(Start),
    /// Stop an attempt: its task moved elsewhere, or its job was cancelled.
    Stop {
        job: JobId,
        task: usize,
        attempt: u32,
    },
    /// The task ended, once.
    Ended {
        job: JobId,
        task: usize,
        end: End,
    },
    /// Every task of the job ended.
    Done {
        job: JobId,
    },
}

impl Action {
    pub fn job(&self) -> JobId {
        match self {
            Action::Start(start) => start.job,
            Action::Stop { job, .. } | Action::Ended { job, .. } | Action::Done { job } => *job,
        }
    }
}

/// What the rest of the pool state knows that the jobs need.
pub struct Context<'a> {
    /// Why a node was given up, if it was.
    pub fenced: &'a dyn Fn(&str) -> Option<String>,
    /// Whether a place is being refilled: a task no node can take now may have one soon.
    pub refilling: bool,
}

#[derive(Debug)]
struct Attempt {
    number: u32,
    /// Its node's index and id (the index's place may be renewed while it runs).
    node: usize,
    node_id: String,
}

#[derive(Debug)]
struct Job {
    scheduler: SlotScheduler,
    /// Node id by index; a replacement takes its lost node's index.
    nodes: Vec<String>,
    movable: Vec<bool>,
    retries: u32,
    /// Attempts so far, per task (the current one's number).
    attempts: Vec<u32>,
    current: HashMap<usize, Attempt>,
    /// Tasks put back in line to run elsewhere, until they start again.
    moving: HashMap<usize, Moved>,
}

/// Every job of the pool, and the GPU slots their running attempts hold.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: BTreeMap<JobId, Job>,
    /// (node id, device id) held by (job, task).
    held: HashMap<(String, String), (JobId, usize)>,
}

impl Jobs {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The slots running attempts hold, by (node id, device id).
    pub fn held(&self) -> impl Iterator<Item = (&(String, String), &(JobId, usize))> {
        self.held.iter()
    }

    pub fn handle(&mut self, event: Event, context: &Context<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Submit { job, spec } => self.submit(job, spec, context, &mut actions),
            Event::AttemptEnded {
                job,
                task,
                attempt,
                failure,
            } => self.attempt_ended(job, task, attempt, failure, context, &mut actions),
            Event::Cancel { job } => {
                if let Some(cancelled) = self.jobs.remove(&job) {
                    for (task, attempt) in cancelled.current {
                        actions.push(Action::Stop {
                            job,
                            task,
                            attempt: attempt.number,
                        });
                    }
                    self.held.retain(|_, (holder, _)| *holder != job);
                }
            }
        }
        self.settle(context, &mut actions);
        actions
    }

    /// `node` was given up: no task of any job starts there, and tasks pinned to it that
    /// have not started end. Running attempts end as their streams say.
    pub fn node_given_up(
        &mut self,
        node: &str,
        reason: &str,
        context: &Context<'_>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for (&id, job) in &mut self.jobs {
            for index in job.indices_of(node) {
                job.give_up(id, index, reason, &mut actions);
            }
        }
        self.settle(context, &mut actions);
        actions
    }

    /// `node`'s machine is about to be taken away: it takes no new task that could go
    /// elsewhere, and its running tasks that may move start again elsewhere now.
    pub fn node_interrupted(
        &mut self,
        node: &str,
        reason: &str,
        context: &Context<'_>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            let job = self.jobs.get_mut(&id).expect("listed");
            for index in job.indices_of(node) {
                job.scheduler.retire(index);
            }
            let mut running: Vec<usize> = job
                .current
                .iter()
                .filter(|(_, a)| a.node_id == node)
                .map(|(task, _)| *task)
                .collect();
            running.sort_unstable();
            for task in running {
                self.move_elsewhere(id, task, reason.to_string(), &mut actions);
            }
        }
        self.settle(context, &mut actions);
        actions
    }

    /// A new node with `slots` holds `place` now (its node was lost and replaced): every
    /// job's tasks may start there, on all its slots.
    pub fn place_renewed(
        &mut self,
        place: usize,
        node: &str,
        slots: &[Slot],
        context: &Context<'_>,
    ) -> Vec<Action> {
        for job in self.jobs.values_mut() {
            if job.nodes.get(place).is_some_and(|old| old != node) {
                job.scheduler.renew(place, slots.to_vec());
                job.nodes[place] = node.to_string();
            }
        }
        let mut actions = Vec::new();
        self.settle(context, &mut actions);
        actions
    }

    /// Looks again at every job (a place's refill failed or stopped, so a waiting task may
    /// have no node left).
    pub fn look_again(&mut self, context: &Context<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        self.settle(context, &mut actions);
        actions
    }

    fn submit(
        &mut self,
        id: JobId,
        spec: JobSpec,
        context: &Context<'_>,
        actions: &mut Vec<Action>,
    ) {
        let slots = spec.nodes.iter().map(|n| n.slots.clone()).collect();
        let placed = match spec.nodes.is_empty() {
            true => Err("the pool has no node to run it on".to_string()),
            false => SlotScheduler::new(slots, spec.per_node, &spec.tasks),
        };
        let scheduler = match placed {
            Ok(scheduler) => scheduler.with_running(spec.nodes.iter().map(|n| n.running).collect()),
            // A task no node could ever take: none starts (the CLI checks this before).
            Err(why) => {
                for task in 0..spec.tasks.len() {
                    actions.push(Action::Ended {
                        job: id,
                        task,
                        end: End::Unplaceable(why.clone()),
                    });
                }
                actions.push(Action::Done { job: id });
                return;
            }
        };
        let count = spec.tasks.len();
        let mut job = Job {
            scheduler,
            nodes: spec.nodes.iter().map(|n| n.id.clone()).collect(),
            movable: spec
                .tasks
                .iter()
                .enumerate()
                .map(|(i, t)| t.pin.is_none() && spec.stdin_task != Some(i))
                .collect(),
            retries: spec.retries,
            attempts: vec![0; count],
            current: HashMap::new(),
            moving: HashMap::new(),
        };
        // Nodes given up before the job came take nothing of it.
        for (index, node) in spec.nodes.iter().enumerate() {
            if let Some(reason) = (context.fenced)(&node.id) {
                job.give_up(id, index, &reason, actions);
            }
        }
        self.jobs.insert(id, job);
    }

    fn attempt_ended(
        &mut self,
        id: JobId,
        task: usize,
        number: u32,
        failure: Option<AttemptFailure>,
        context: &Context<'_>,
        actions: &mut Vec<Action>,
    ) {
        // A job cancelled, or an attempt stopped since: the current one speaks for it.
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.current.get(&task).map(|a| a.number) != Some(number) {
            return;
        }
        let attempt = job.current.remove(&task).expect("checked");
        if let Some(failure) = failure {
            // Its node's connection is gone and the place still its: no new task there.
            if !failure.node_connected && job.nodes[attempt.node] == attempt.node_id {
                job.scheduler.retire(attempt.node);
            }
            let reason = (context.fenced)(&attempt.node_id).unwrap_or(failure.reason);
            if self.requeue(id, task, &attempt, reason) {
                return;
            }
        }
        let job = self.jobs.get_mut(&id).expect("checked");
        job.scheduler.finished(task);
        self.release(id, task);
        actions.push(Action::Ended {
            job: id,
            task,
            end: End::Ran { attempt: number },
        });
    }

    /// Stops `task`'s running attempt and puts it back in line elsewhere, if it may move.
    fn move_elsewhere(
        &mut self,
        id: JobId,
        task: usize,
        reason: String,
        actions: &mut Vec<Action>,
    ) {
        let job = self.jobs.get_mut(&id).expect("listed");
        let Some(attempt) = job.current.remove(&task) else {
            return;
        };
        if self.requeue(id, task, &attempt, reason) {
            actions.push(Action::Stop {
                job: id,
                task,
                attempt: attempt.number,
            });
        } else {
            // It stays where it runs.
            let job = self.jobs.get_mut(&id).expect("listed");
            job.current.insert(task, attempt);
        }
    }

    /// Puts `task`, whose `attempt` is over (or about to be stopped), back in line to run
    /// again elsewhere, freeing what it held: the scheduler places it as any task (never on
    /// a retired node, within the per-node limit, on free slots, a replacement in a lost
    /// node's place included), not back on its node. False when the task may not move
    /// (pinned, fed stdin, no retries left) or no node left could ever take it.
    fn requeue(&mut self, id: JobId, task: usize, attempt: &Attempt, reason: String) -> bool {
        let job = self.jobs.get_mut(&id).expect("listed");
        if !job.movable[task] || job.attempts[task] >= job.retries {
            return false;
        }
        // Once a new node holds the place, only the lost one is to be avoided, and it is gone.
        let avoid = (job.nodes[attempt.node] == attempt.node_id).then_some(attempt.node);
        if !job.scheduler.has_place_for(task, avoid) || !job.scheduler.requeue(task, avoid) {
            return false;
        }
        job.attempts[task] += 1;
        job.moving.insert(
            task,
            Moved {
                from: attempt.node_id.clone(),
                reason,
            },
        );
        self.release(id, task);
        true
    }

    fn release(&mut self, id: JobId, task: usize) {
        self.held.retain(|_, holder| *holder != (id, task));
    }

    /// Ends the tasks no node can take any more, starts every task that can start, in job
    /// order, and ends the jobs whose tasks all ended.
    fn settle(&mut self, context: &Context<'_>, actions: &mut Vec<Action>) {
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            let job = self.jobs.get_mut(&id).expect("listed");
            // While the pool refills a place, a task no node can take now waits for the new one.
            if !context.refilling {
                for task in job.scheduler.unplaceable() {
                    job.moving.remove(&task);
                    self.held.retain(|_, holder| *holder != (id, task));
                    actions.push(Action::Ended {
                        job: id,
                        task,
                        end: End::Unplaceable(NO_NODE_LEFT.into()),
                    });
                }
            }
            if job.scheduler.waiting_for_slots() {
                let held = &self.held;
                let nodes = &job.nodes;
                job.scheduler.held_elsewhere(|node, slot| {
                    held.get(&(nodes[node].clone(), slot.device_id()))
                        .is_some_and(|(holder, _)| *holder != id)
                });
            }
            for placement in job.scheduler.assign() {
                let node = job.nodes[placement.node].clone();
                for slot in &placement.slots {
                    self.held
                        .insert((node.clone(), slot.device_id()), (id, placement.task));
                }
                let attempt = job.attempts[placement.task];
                job.current.insert(
                    placement.task,
                    Attempt {
                        number: attempt,
                        node: placement.node,
                        node_id: node.clone(),
                    },
                );
                actions.push(Action::Start(Start {
                    job: id,
                    task: placement.task,
                    attempt,
                    node,
                    slots: placement.slots,
                    moved: job.moving.remove(&placement.task),
                }));
            }
            if job.scheduler.done() {
                self.jobs.remove(&id);
                actions.push(Action::Done { job: id });
            }
        }
    }
}

impl Job {
    /// The node at `index` was given up: no task of this job starts there, and its tasks
    /// pinned there that have not started end as lost.
    fn give_up(&mut self, id: JobId, index: usize, reason: &str, actions: &mut Vec<Action>) {
        self.scheduler.retire(index);
        for task in self.scheduler.drop_pinned_to(index) {
            actions.push(Action::Ended {
                job: id,
                task,
                end: End::Lost {
                    node: self.nodes[index].clone(),
                    reason: reason.to_string(),
                },
            });
        }
    }

    fn indices_of(&self, node: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| *n == node)
            .map(|(i, _)| i)
            .collect()
    }
}
