//! Placement of tasks onto nodes: pure, so every rule is tested without a network.
//!
//! Each task is either pinned to a node (broadcast) or free; a free task goes to the
//! least-loaded node with room (ties to the earliest node), at most `per_node` at once.

use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct Scheduler {
    per_node: usize,
    running: Vec<usize>,
    /// Tasks not started: (task, pin, a node it must not go to).
    queue: VecDeque<(usize, Option<usize>, Option<usize>)>,
    finished: usize,
    total: usize,
    /// Nodes that take no new free task (lost, or about to be taken away).
    retired: Vec<bool>,
}

impl Scheduler {
    /// `pins[i]` is the node index task `i` must run on, if any.
    pub fn new(node_count: usize, per_node: usize, pins: Vec<Option<usize>>) -> Self {
        Scheduler {
            per_node: per_node.max(1),
            running: vec![0; node_count],
            total: pins.len(),
            queue: pins
                .into_iter()
                .enumerate()
                .map(|(task, pin)| (task, pin, None))
                .collect(),
            finished: 0,
            retired: vec![false; node_count],
        }
    }

    /// `node` takes no new free task from now on; tasks pinned to it still go there.
    pub fn retire(&mut self, node: usize) {
        if let Some(retired) = self.retired.get_mut(node) {
            *retired = true;
        }
    }

    /// Counts tasks already running on each node (from earlier work) towards its load.
    pub fn with_running(mut self, running: Vec<usize>) -> Self {
        assert_eq!(running.len(), self.running.len(), "one load per node");
        self.running = running;
        self
    }

    /// Takes every task that can start now, in input order, with the node for each.
    pub fn assign(&mut self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut waiting = VecDeque::new();
        while let Some((task, pin, avoid)) = self.queue.pop_front() {
            let node = match pin {
                Some(node) if self.running[node] < self.per_node => Some(node),
                Some(_) => None,
                None => self.least_loaded(avoid),
            };
            match node {
                Some(node) => {
                    self.running[node] += 1;
                    out.push((task, node));
                }
                None => waiting.push_back((task, pin, avoid)),
            }
        }
        self.queue = waiting;
        out
    }

    pub fn finished(&mut self, node: usize) {
        self.running[node] = self.running[node].saturating_sub(1);
        self.finished += 1;
    }

    /// A task ended whose node's place was since given to a new node ([`renew`](Self::renew)):
    /// it counts as done but frees nothing there.
    pub fn finished_orphan(&mut self) {
        self.finished += 1;
    }

    /// Task `task` (free, or pinned to `pin`), started on `node` (`None`: on a node whose
    /// place was since renewed), must run again, not on `avoid`: its place there is free,
    /// and it goes first in the queue.
    pub fn requeue(
        &mut self,
        task: usize,
        node: Option<usize>,
        pin: Option<usize>,
        avoid: Option<usize>,
    ) {
        if let Some(running) = node.and_then(|node| self.running.get_mut(node)) {
            *running = running.saturating_sub(1);
        }
        self.queue.push_front((task, pin, avoid));
    }

    /// Takes out of the queue, as ended, the queued tasks `cannot_run(task, pin, avoid)`
    /// says can never start; returns them.
    pub fn drop_queued(
        &mut self,
        mut cannot_run: impl FnMut(usize, Option<usize>, Option<usize>) -> bool,
    ) -> Vec<usize> {
        let mut dropped = Vec::new();
        self.queue.retain(|&(task, pin, avoid)| {
            let drop = cannot_run(task, pin, avoid);
            if drop {
                dropped.push(task);
            }
            !drop
        });
        self.finished += dropped.len();
        dropped
    }

    /// A new node takes `node`'s place: it takes free tasks again, and nothing runs there
    /// yet (the old node's tasks that still end are orphans, see
    /// [`finished_orphan`](Self::finished_orphan)).
    pub fn renew(&mut self, node: usize) {
        if let (Some(retired), Some(running)) =
            (self.retired.get_mut(node), self.running.get_mut(node))
        {
            *retired = false;
            *running = 0;
        }
    }

    pub fn done(&self) -> bool {
        self.finished >= self.total
    }

    fn least_loaded(&self, avoid: Option<usize>) -> Option<usize> {
        self.running
            .iter()
            .enumerate()
            .filter(|(i, &load)| load < self.per_node && !self.retired[*i] && avoid != Some(*i))
            .min_by_key(|(i, &load)| (load, *i))
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_fills_nodes_evenly_then_waits_for_room() {
        let mut s = Scheduler::new(4, 1, vec![None; 8]);
        assert_eq!(s.assign(), vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert_eq!(s.assign(), vec![]);
        s.finished(2);
        assert_eq!(s.assign(), vec![(4, 2)]);
        for node in [0, 1, 3, 2] {
            s.finished(node);
        }
        assert_eq!(s.assign(), vec![(5, 0), (6, 1), (7, 2)]);
        assert!(!s.done());
        for node in [0, 1, 2] {
            s.finished(node);
        }
        assert!(s.done());
    }

    #[test]
    fn a_retired_node_takes_no_new_free_task_but_keeps_its_pinned_ones() {
        let mut s = Scheduler::new(2, 1, vec![None, None, None, Some(0)]);
        assert_eq!(s.assign(), vec![(0, 0), (1, 1)]);
        s.retire(0);
        s.finished(0);
        s.finished(1);
        // Task 2 waits for node 1 rather than take node 0; the pinned task 3 still runs there.
        assert_eq!(s.assign(), vec![(2, 1), (3, 0)]);
        s.retire(7);
    }

    #[test]
    fn per_node_allows_several_at_once() {
        let mut s = Scheduler::new(2, 2, vec![None; 5]);
        assert_eq!(s.assign(), vec![(0, 0), (1, 1), (2, 0), (3, 1)]);
        s.finished(1);
        assert_eq!(s.assign(), vec![(4, 1)]);
    }

    #[test]
    fn broadcast_pins_one_task_per_node() {
        let mut s = Scheduler::new(3, 1, vec![Some(0), Some(1), Some(2)]);
        assert_eq!(s.assign(), vec![(0, 0), (1, 1), (2, 2)]);
    }

    #[test]
    fn one_task_goes_to_the_least_loaded_node() {
        let mut s = Scheduler::new(3, usize::MAX, vec![None]).with_running(vec![2, 0, 1]);
        assert_eq!(s.assign(), vec![(0, 1)]);
    }
}
