//! One pool's state: where the pool is in its life and how many jobs run (the
//! [`Lifecycle`]), who each node id is and whether it is still in the pool (the [`Roster`]),
//! and, once the pool keeps its size, which node holds each place and when a lost one is
//! replaced (the [`Membership`]). Sans I/O, one `handle(event, now)`: a node given
//! up for any reason (silence, an interruption notice, its machine gone, its driver's word)
//! is fenced and its place filled in the same step, so that no loop elsewhere has to notice
//! it. The coordinator's endpoint feeds it and carries out the node actions; the pool's
//! keeper carries out the replacements and says how they went.

use std::time::Instant;

use crate::jobs::{self, Context, Jobs};
use crate::lifecycle::{self, InvalidTransition, Lifecycle, Phase};
use crate::membership::{self, Budget, Membership, PlaceState};
use crate::roster::{self, Roster};
use crate::slots::Slot;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// What happened to a node id: enrollment, hello, message, renewal, give-up, forget,
    /// and the ticks that measure silence (and end a place's wait before its replacement).
    Node(roster::Event),
    /// The provider's notice that `node`'s machine goes away: given up at once while the
    /// pool keeps its size (its place is filled before the machine goes); otherwise its
    /// driver decides.
    Interrupted { node: String, reason: String },
    /// From now on keep the pool's places, held by `nodes` in rank order, within `budget`.
    KeepPlaces { nodes: Vec<String>, budget: Budget },
    /// The new node for `place` is up, with its GPU `slots`.
    Replaced {
        place: usize,
        node: String,
        slots: Vec<Slot>,
    },
    /// Starting a new node for `place` failed.
    ReplacementFailed { place: usize, error: String },
    /// The pool came up, failed, runs a job or ends one, or goes.
    Lifecycle(lifecycle::Event),
    /// A job submitted or cancelled, or one of its attempts ended.
    Job(jobs::Event),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// For the coordinator's endpoint: sign, welcome, refuse, fence (see [`roster::Action`]).
    Node(roster::Action),
    /// Start a node for a place whose node was given up.
    Replace(Replacement),
    /// Tell the user what became of a place (the pool's log and `pool status`).
    Report(String),
    /// What the pool's phase asks (announce it ready, failed or down; tear down).
    Lifecycle(lifecycle::Action),
    /// The event is not one the pool's phase allows: a job on a pool coming up or going.
    Refused(InvalidTransition),
    /// For a job's driver: start or stop an attempt, a task or the job ended.
    Job(jobs::Action),
}

/// A place to refill: start a node for `place` in place of `lost` (given up for `why`),
/// from the pool's own offer first, or from the next offer first when `next_offer_first`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    pub place: usize,
    pub lost: String,
    pub why: String,
    pub next_offer_first: bool,
}

/// The pool's nodes and places.
#[derive(Debug, Default)]
pub struct PoolState {
    lifecycle: Lifecycle,
    roster: Roster,
    membership: Option<Membership>,
    jobs: Jobs,
}

impl PoolState {
    pub fn new(roster: Roster) -> PoolState {
        PoolState {
            lifecycle: Lifecycle::new(),
            roster,
            membership: None,
            jobs: Jobs::default(),
        }
    }

    /// Every job's tasks and the GPU slots they hold.
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Whether the pool is going (or gone): nothing is replaced any more.
    fn going(&self) -> bool {
        matches!(self.lifecycle.phase(), Phase::TearingDown | Phase::Down)
    }

    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    pub fn roster_mut(&mut self) -> &mut Roster {
        &mut self.roster
    }

    /// Whether the pool keeps its size.
    pub fn keeps_places(&self) -> bool {
        self.membership.is_some()
    }

    /// Each place's node (the holder, or the last one) and state, in rank order; none
    /// while the pool does not keep its size.
    pub fn places(&self) -> Vec<(String, PlaceState)> {
        self.membership
            .iter()
            .flat_map(|m| {
                m.places()
                    .map(|(node, state)| (node.to_string(), state.clone()))
            })
            .collect()
    }

    /// Whether a place is being refilled: a new node starting, or one waiting to start.
    pub fn refilling(&self) -> bool {
        self.membership.as_ref().is_some_and(|m| {
            m.places().any(|(_, state)| {
                matches!(state, PlaceState::Starting | PlaceState::Waiting { .. })
            })
        })
    }

    /// Why the pool is smaller than asked, once its budget left a place empty.
    pub fn shortfall(&self) -> Option<String> {
        self.membership.as_ref()?.shortfall()
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        // Tasks that wait while a place is refilled may have no node left once it is not.
        let was_refilling = !self.jobs.is_empty() && self.refilling();
        match event {
            Event::Node(event) => {
                let tick = matches!(event, roster::Event::Tick { .. });
                let answered = self.roster.handle(event, now);
                self.follow(answered, now, &mut actions);
                if tick {
                    self.membership_says(membership::Event::Tick, now, &mut actions);
                }
            }
            Event::Interrupted { node, reason } => {
                if self.membership.is_some() {
                    let given_up = self.roster.handle(
                        roster::Event::GiveUp {
                            node: node.clone(),
                            reason: reason.clone(),
                        },
                        now,
                    );
                    self.follow(given_up, now, &mut actions);
                }
                // Its tasks that may move start again elsewhere before the machine goes.
                self.jobs_say(
                    |jobs, c| jobs.node_interrupted(&node, &reason, c),
                    &mut actions,
                );
            }
            Event::KeepPlaces { .. } if self.going() => {}
            Event::KeepPlaces { nodes, budget } => {
                self.membership = Some(Membership::new(nodes.clone(), budget, now));
                // A node given up before the pool began to keep its size loses its place now.
                for node in nodes {
                    self.lose_if_fenced(node, now, &mut actions);
                }
            }
            Event::Replaced { place, node, slots } => {
                let started = membership::Event::Started {
                    place,
                    node: node.clone(),
                };
                self.membership_says(started, now, &mut actions);
                // Given up while it came up (before it held the place): the place goes on.
                self.lose_if_fenced(node.clone(), now, &mut actions);
                if self.roster.fenced(&node).is_none() {
                    self.jobs_say(
                        |jobs, c| jobs.place_renewed(place, &node, &slots, c),
                        &mut actions,
                    );
                }
            }
            Event::ReplacementFailed { place, error } => self.membership_says(
                membership::Event::StartFailed { place, error },
                now,
                &mut actions,
            ),
            Event::Lifecycle(event) => match self.lifecycle.handle(event) {
                Ok(answered) => {
                    // A pool that goes keeps no size: no place is refilled from now on.
                    if self.going() {
                        self.membership = None;
                    }
                    actions.extend(answered.into_iter().map(Action::Lifecycle));
                }
                Err(refused) => actions.push(Action::Refused(refused)),
            },
            Event::Job(event) => self.jobs_say(|jobs, c| jobs.handle(event, c), &mut actions),
        }
        if was_refilling && !self.refilling() {
            self.jobs_say(|jobs, c| jobs.look_again(c), &mut actions);
        }
        actions
    }

    /// Tells the jobs something, with what they need to know of the nodes and places.
    fn jobs_say(
        &mut self,
        say: impl FnOnce(&mut Jobs, &Context<'_>) -> Vec<jobs::Action>,
        actions: &mut Vec<Action>,
    ) {
        let refilling = self.refilling();
        let roster = &self.roster;
        let fenced = |node: &str| roster.fenced(node).map(str::to_string);
        let context = Context {
            fenced: &fenced,
            refilling,
        };
        actions.extend(say(&mut self.jobs, &context).into_iter().map(Action::Job));
    }

    fn lose_if_fenced(&mut self, node: String, now: Instant, actions: &mut Vec<Action>) {
        if let Some(reason) = self.roster.fenced(&node) {
            let lost = membership::Event::NodeLost {
                reason: reason.to_string(),
                node,
            };
            self.membership_says(lost, now, actions);
        }
    }

    /// Passes the roster's answer on; each node it gave up loses its place, which the
    /// membership fills (now, later, or never).
    fn follow(&mut self, answered: Vec<roster::Action>, now: Instant, actions: &mut Vec<Action>) {
        for action in answered {
            if let roster::Action::Fence { node, reason } = &action {
                let lost = membership::Event::NodeLost {
                    node: node.clone(),
                    reason: reason.clone(),
                };
                actions.push(Action::Node(action.clone()));
                self.membership_says(lost, now, actions);
                // No job's task starts there from now on.
                let (node, reason) = (node.clone(), reason.clone());
                self.jobs_say(|jobs, c| jobs.node_given_up(&node, &reason, c), actions);
            } else {
                actions.push(Action::Node(action));
            }
        }
    }

    fn membership_says(
        &mut self,
        event: membership::Event,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let Some(membership) = self.membership.as_mut() else {
            return;
        };
        let answered = membership.handle(event, now);
        for action in answered {
            match action {
                // The roster fences (a node it gave up is fenced already; a node started for
                // a place that no longer wanted it is given up here).
                membership::Action::Fence { node, reason } => {
                    let given_up = self
                        .roster
                        .handle(roster::Event::GiveUp { node, reason }, now);
                    self.follow(given_up, now, actions);
                }
                membership::Action::Start {
                    place,
                    lost,
                    next_offer_first,
                } => actions.push(Action::Replace(Replacement {
                    place,
                    why: self.roster.fenced(&lost).unwrap_or_default().to_string(),
                    lost,
                    next_offer_first,
                })),
                membership::Action::Report(line) => actions.push(Action::Report(line)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn budget() -> Budget {
        Budget {
            per_place: 2,
            per_pool: 3,
            window: Duration::from_secs(3600),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(4),
            short_life: Duration::from_secs(30),
        }
    }

    /// Enrolls and connects `node`: its hello is welcomed.
    fn join(state: &mut PoolState, node: &str, now: Instant) {
        let token = state
            .roster_mut()
            .issue_token(node, Duration::from_secs(600), now);
        let asked = roster::Event::EnrollRequested {
            node: node.into(),
            token: token.clone(),
        };
        assert_eq!(
            state.handle(Event::Node(asked), now),
            [Action::Node(roster::Action::Sign)]
        );
        let signed = roster::Event::Signed {
            node: node.into(),
            cert: format!("cert of {node}"),
            token: Some(token),
        };
        assert!(state.handle(Event::Node(signed), now).is_empty());
        let hello = roster::Event::Hello {
            node: node.into(),
            cert: format!("cert of {node}"),
            connection: 1,
        };
        assert_eq!(
            state.handle(Event::Node(hello), now),
            [Action::Node(roster::Action::Welcome)]
        );
    }

    fn kept(nodes: usize, now: Instant) -> PoolState {
        let mut state = PoolState::new(Roster::new(TIMEOUT));
        let nodes: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
        for node in &nodes {
            join(&mut state, node, now);
        }
        state.handle(
            Event::KeepPlaces {
                nodes,
                budget: budget(),
            },
            now,
        );
        state
    }

    #[test]
    fn a_silent_node_is_fenced_and_its_place_refilled_in_one_step() {
        let t0 = Instant::now();
        let mut state = kept(2, t0);
        // node-2 keeps talking; node-1 falls silent.
        let later = t0 + Duration::from_secs(40);
        state.handle(
            Event::Node(roster::Event::Heard {
                node: "node-2".into(),
            }),
            later,
        );
        let actions = state.handle(
            Event::Node(roster::Event::Tick {
                paused: Duration::ZERO,
            }),
            later,
        );
        assert_eq!(
            actions,
            [
                Action::Node(roster::Action::Fence {
                    node: "node-1".into(),
                    reason: "no health report for 10s".into()
                }),
                Action::Replace(Replacement {
                    place: 0,
                    lost: "node-1".into(),
                    why: "no health report for 10s".into(),
                    next_offer_first: false
                })
            ]
        );
        join(&mut state, "node-3", later);
        assert!(state
            .handle(
                Event::Replaced {
                    place: 0,
                    node: "node-3".into(),
                    slots: Vec::new(),
                },
                later
            )
            .is_empty());
        assert_eq!(
            state
                .places()
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>(),
            ["node-3", "node-2"]
        );
    }

    #[test]
    fn an_interruption_gives_a_node_up_only_while_the_pool_keeps_its_size() {
        let t0 = Instant::now();
        let mut plain = PoolState::new(Roster::new(TIMEOUT));
        join(&mut plain, "node-1", t0);
        let notice = Event::Interrupted {
            node: "node-1".into(),
            reason: "spot interruption".into(),
        };
        assert!(plain.handle(notice.clone(), t0).is_empty());
        assert_eq!(plain.roster().fenced("node-1"), None);
        // A node that lived past the short life is replaced at once (a short-lived one after
        // a backoff).
        let mut state = kept(1, t0);
        let actions = state.handle(notice, t0 + Duration::from_secs(60));
        assert!(matches!(
            &actions[..],
            [
                Action::Node(roster::Action::Fence { .. }),
                Action::Replace(Replacement { place: 0, .. })
            ]
        ));
    }

    #[test]
    fn a_pool_that_goes_replaces_nothing_more() {
        let t0 = Instant::now();
        let mut state = kept(2, t0);
        state.handle(Event::Lifecycle(lifecycle::Event::Up), t0);
        assert_eq!(
            state.handle(Event::Lifecycle(lifecycle::Event::TeardownRequested), t0),
            [Action::Lifecycle(lifecycle::Action::Teardown)]
        );
        let later = t0 + Duration::from_secs(60);
        let actions = state.handle(
            Event::Node(roster::Event::GiveUp {
                node: "node-1".into(),
                reason: "gone".into(),
            }),
            later,
        );
        assert!(
            actions.iter().all(|a| !matches!(a, Action::Replace(_))),
            "{actions:?}"
        );
        assert!(matches!(
            state.handle(Event::Lifecycle(lifecycle::Event::JobStarted), later)[..],
            [Action::Refused(_)]
        ));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Heard(usize),
        Interrupt(usize),
        GiveUp(usize),
        /// The oldest replacement asked for comes up (as a fresh node id).
        ReplacementUp,
        ReplacementFails,
        /// Time passes (seconds), then a tick.
        Advance(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..12usize).prop_map(Step::Heard),
            1 => (0..12usize).prop_map(Step::Interrupt),
            1 => (0..12usize).prop_map(Step::GiveUp),
            3 => Just(Step::ReplacementUp),
            1 => Just(Step::ReplacementFails),
            3 => (1..15u64).prop_map(Step::Advance),
        ]
    }

    /// Carries out a node step on `state`, picking among `nodes`; a replacement that comes
    /// up is a fresh node id with `slots`. The state's answer, and the place and node of a
    /// replacement that came up.
    fn node_step(
        state: &mut PoolState,
        step: Step,
        nodes: &[String],
        pending: &mut Vec<usize>,
        next_node: &mut usize,
        now: &mut Instant,
        slots: Vec<crate::slots::Slot>,
    ) -> (Vec<Action>, Option<(usize, String)>) {
        let pick = |i: usize| nodes[i % nodes.len()].clone();
        let answer = match step {
            Step::Heard(i) => {
                state.handle(Event::Node(roster::Event::Heard { node: pick(i) }), *now)
            }
            Step::Interrupt(i) => state.handle(
                Event::Interrupted {
                    node: pick(i),
                    reason: "notice".into(),
                },
                *now,
            ),
            Step::GiveUp(i) => state.handle(
                Event::Node(roster::Event::GiveUp {
                    node: pick(i),
                    reason: "gone".into(),
                }),
                *now,
            ),
            Step::ReplacementUp | Step::ReplacementFails if pending.is_empty() => Vec::new(),
            Step::ReplacementUp => {
                let place = pending.remove(0);
                let node = format!("node-{next_node}");
                *next_node += 1;
                join(state, &node, *now);
                let answer = state.handle(
                    Event::Replaced {
                        place,
                        node: node.clone(),
                        slots,
                    },
                    *now,
                );
                return (answer, Some((place, node)));
            }
            Step::ReplacementFails => {
                let place = pending.remove(0);
                state.handle(
                    Event::ReplacementFailed {
                        place,
                        error: "no capacity".into(),
                    },
                    *now,
                )
            }
            Step::Advance(secs) => {
                *now += Duration::from_secs(secs);
                state.handle(
                    Event::Node(roster::Event::Tick {
                        paused: Duration::ZERO,
                    }),
                    *now,
                )
            }
        };
        (answer, None)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Over random silences, notices, give-ups, replacements that come up or fail, and
        /// time: a place has at most one replacement under way; a replacement is asked only
        /// for a place whose node was fenced; no fenced node holds a place; and while the
        /// budget allows, every place is held, being refilled or waiting out its backoff:
        /// it is left empty only once its own or the pool's budget is spent, and the pool
        /// then says so.
        #[test]
        fn the_pool_keeps_its_size_within_its_budget(steps in proptest::collection::vec(step(), 1..60)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut state = kept(3, t0);
            let mut next_node = 4;
            let mut pending: Vec<usize> = Vec::new();
            let mut asked_per_place: HashMap<usize, u32> = HashMap::new();
            let mut asked = 0u32;
            for step in steps {
                let nodes: Vec<String> = state.places().into_iter().map(|(n, _)| n).collect();
                let (actions, _) = node_step(&mut state, step, &nodes, &mut pending, &mut next_node, &mut now, Vec::new());
                for action in &actions {
                    if let Action::Replace(Replacement { place, lost, .. }) = action {
                        prop_assert!(!pending.contains(place), "two replacements for place {place}");
                        prop_assert!(state.roster().fenced(lost).is_some(), "{lost} replaced but not fenced");
                        pending.push(*place);
                        *asked_per_place.entry(*place).or_default() += 1;
                        asked += 1;
                    }
                }
                let b = budget();
                prop_assert!(asked <= b.per_pool);
                for (place, (node, place_state)) in state.places().into_iter().enumerate() {
                    prop_assert!(asked_per_place.get(&place).copied().unwrap_or(0) <= b.per_place);
                    match place_state {
                        PlaceState::Held => prop_assert!(state.roster().fenced(&node).is_none(), "fenced {node} holds place {place}"),
                        PlaceState::Starting => prop_assert!(pending.contains(&place)),
                        PlaceState::Waiting { until } => prop_assert!(until > now),
                        PlaceState::Empty { .. } => {
                            let spent = asked_per_place.get(&place).copied().unwrap_or(0) >= b.per_place || asked >= b.per_pool;
                            prop_assert!(spent, "place {place} left empty with budget left");
                            prop_assert!(state.shortfall().is_some());
                        }
                    }
                }
            }
        }
    }

    /// Node and task fates together: jobs submitted, attempts ending (well, failed, late),
    /// jobs cancelled, nodes heard, silent, interrupted, given up and replaced.
    mod nodes_and_tasks {
        use super::*;
        use crate::jobs::{self, AttemptFailure, End, JobId, JobNode, JobSpec};
        use crate::slots::{GpuRequest, Slot, SlotTask};
        use std::collections::{BTreeMap, BTreeSet, HashSet};

        #[derive(Debug, Clone)]
        enum Step {
            /// Tasks (each: 0 plain, 1 one GPU, 2 two GPUs, 3 a slice, 4 pinned to a node),
            /// retries, stdin, tasks per node.
            Submit(Vec<(u8, usize)>, u32, bool, usize),
            /// An open attempt ends: well, or failed with its node connected or not.
            End(usize, bool, bool),
            /// An attempt stopped earlier ends anyway.
            EndLate(usize),
            Cancel(usize),
            Node(super::Step),
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                3 => (proptest::collection::vec((0..5u8, 0..3usize), 1..6), 0..3u32, any::<bool>(), 1..3usize)
                    .prop_map(|(t, r, i, p)| Step::Submit(t, r, i, p)),
                6 => (0..20usize, any::<bool>(), any::<bool>()).prop_map(|(i, ok, c)| Step::End(i, ok, c)),
                1 => (0..20usize).prop_map(Step::EndLate),
                1 => (0..20usize).prop_map(Step::Cancel),
                9 => super::step().prop_map(Step::Node),
            ]
        }

        fn gpus() -> Vec<Slot> {
            vec![Slot::Gpu { index: 0 }, Slot::Gpu { index: 1 }]
        }

        type AttemptKey = (JobId, usize, u32);

        /// What the test knows from the actions it was given.
        #[derive(Default)]
        struct Model {
            /// Attempts started and not yet ended or stopped, with their node and slots.
            open: BTreeMap<AttemptKey, (String, Vec<String>)>,
            stopped: Vec<AttemptKey>,
            /// Every task's attempts started so far.
            started: HashMap<(JobId, usize), u32>,
            ended: HashSet<(JobId, usize)>,
            /// Live jobs and their task counts.
            jobs: BTreeMap<JobId, usize>,
            done: HashSet<JobId>,
            pending: Vec<usize>,
        }

        impl Model {
            /// Checks the state's answer to one step; `ended_now` is the attempt whose end
            /// the step said, if any.
            fn check(
                &mut self,
                state: &PoolState,
                actions: &[Action],
                ended_now: Option<AttemptKey>,
            ) -> Result<(), TestCaseError> {
                for action in actions {
                    match action {
                        Action::Replace(Replacement { place, .. }) => self.pending.push(*place),
                        Action::Job(jobs::Action::Start(start)) => {
                            let key = (start.job, start.task, start.attempt);
                            prop_assert!(
                                self.jobs.contains_key(&start.job),
                                "{key:?} of a job that is over"
                            );
                            prop_assert!(
                                !self.ended.contains(&(start.job, start.task)),
                                "{key:?} of a task that ended"
                            );
                            prop_assert!(
                                state.roster().fenced(&start.node).is_none(),
                                "{key:?} started on fenced {}",
                                start.node
                            );
                            if let Some(before) = self.started.get(&(start.job, start.task)) {
                                prop_assert!(start.attempt > *before, "{key:?} started again");
                            }
                            prop_assert!(
                                self.open
                                    .keys()
                                    .all(|(j, t, _)| (*j, *t) != (start.job, start.task)),
                                "{key:?} while another attempt runs"
                            );
                            prop_assert_eq!(start.moved.is_some(), start.attempt > 0);
                            let devices: Vec<String> =
                                start.slots.iter().map(Slot::device_id).collect();
                            for (other, (node, held)) in &self.open {
                                prop_assert!(
                                    !(node == &start.node
                                        && held.iter().any(|d| devices.contains(d))),
                                    "{key:?} takes a slot {other:?} holds on {node}"
                                );
                            }
                            self.started.insert((start.job, start.task), start.attempt);
                            self.open.insert(key, (start.node.clone(), devices));
                        }
                        Action::Job(jobs::Action::Stop { job, task, attempt }) => {
                            let key = (*job, *task, *attempt);
                            prop_assert!(
                                self.open.remove(&key).is_some(),
                                "{key:?} stopped but not running"
                            );
                            self.stopped.push(key);
                        }
                        Action::Job(jobs::Action::Ended { job, task, end }) => {
                            prop_assert!(
                                self.ended.insert((*job, *task)),
                                "{job:?} task {task} ended twice"
                            );
                            prop_assert!(
                                self.open.keys().all(|(j, t, _)| (*j, *t) != (*job, *task)),
                                "{job:?} task {task} ended while an attempt runs"
                            );
                            if let End::Ran { attempt } = end {
                                prop_assert_eq!(
                                    ended_now,
                                    Some((*job, *task, *attempt)),
                                    "a task ended with an attempt that did not just end"
                                );
                            }
                        }
                        Action::Job(jobs::Action::Done { job }) => {
                            let tasks = self.jobs.remove(job);
                            prop_assert!(tasks.is_some(), "{job:?} done twice or unknown");
                            prop_assert!(
                                (0..tasks.unwrap()).all(|t| self.ended.contains(&(*job, t))),
                                "{job:?} done with tasks left"
                            );
                            self.done.insert(*job);
                        }
                        _ => {}
                    }
                }
                // The state's slots are exactly those the open attempts hold.
                let held: BTreeSet<(String, String)> =
                    state.jobs().held().map(|(k, _)| k.clone()).collect();
                let open: BTreeSet<(String, String)> = self
                    .open
                    .values()
                    .flat_map(|(n, d)| d.iter().map(move |d| (n.clone(), d.clone())))
                    .collect();
                prop_assert_eq!(held, open);
                Ok(())
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(384))]
            /// Every task attempt ends exactly once (its own end, or stopped), every task and
            /// every job ends once, no GPU slot is held by two attempts, a fenced node is
            /// given no work, and once every running attempt ends (and replacements stop
            /// coming) every job is done.
            #[test]
            fn every_attempt_ends_once_and_no_slot_or_fenced_node_is_given_out(keep in any::<bool>(), steps in proptest::collection::vec(step(), 1..50)) {
                let t0 = Instant::now();
                let mut now = t0;
                let mut state = if keep { kept(3, t0) } else {
                    let mut state = PoolState::new(Roster::new(TIMEOUT));
                    for i in 1..=3 { join(&mut state, &format!("node-{i}"), t0); }
                    state
                };
                let mut pool: Vec<String> = (1..=3).map(|i| format!("node-{i}")).collect();
                let mut next_node = 4;
                let mut next_job = 0;
                let mut model = Model::default();
                let step_on = |state: &mut PoolState, model: &mut Model, pool: &mut Vec<String>, next_node: &mut usize, next_job: &mut u64, now: &mut Instant, step: Step| -> Result<(), TestCaseError> {
                    let mut ended_now = None;
                    let actions = match step {
                        Step::Submit(tasks, retries, stdin, per_node) => {
                            let job = JobId(*next_job);
                            *next_job += 1;
                            let tasks: Vec<SlotTask> = tasks.iter().map(|&(kind, node)| match kind {
                                0 => SlotTask { pin: None, gpus: GpuRequest::None },
                                1 => SlotTask { pin: None, gpus: GpuRequest::Gpus(1) },
                                2 => SlotTask { pin: None, gpus: GpuRequest::Gpus(2) },
                                3 => SlotTask { pin: None, gpus: GpuRequest::Slice { profile: None } },
                                _ => SlotTask { pin: Some(node), gpus: GpuRequest::None },
                            }).collect();
                            model.jobs.insert(job, tasks.len());
                            let spec = JobSpec {
                                nodes: pool.iter().map(|id| JobNode { id: id.clone(), slots: gpus(), running: 0 }).collect(),
                                tasks,
                                per_node,
                                retries,
                                stdin_task: stdin.then_some(0),
                            };
                            state.handle(Event::Job(jobs::Event::Submit { job, spec }), *now)
                        }
                        Step::End(i, ok, connected) => {
                            let Some(&key) = model.open.keys().nth(i % model.open.len().max(1)) else { return Ok(()) };
                            model.open.remove(&key);
                            ended_now = Some(key);
                            let failure = (!ok).then(|| AttemptFailure { reason: "connection lost".into(), node_connected: connected });
                            state.handle(Event::Job(jobs::Event::AttemptEnded { job: key.0, task: key.1, attempt: key.2, failure }), *now)
                        }
                        Step::EndLate(i) => {
                            let Some(&key) = model.stopped.get(i % model.stopped.len().max(1)) else { return Ok(()) };
                            let failure = Some(AttemptFailure { reason: "stopped".into(), node_connected: true });
                            state.handle(Event::Job(jobs::Event::AttemptEnded { job: key.0, task: key.1, attempt: key.2, failure }), *now)
                        }
                        Step::Cancel(i) => {
                            let Some(&job) = model.jobs.keys().nth(i % model.jobs.len().max(1)) else { return Ok(()) };
                            model.jobs.remove(&job);
                            let actions = state.handle(Event::Job(jobs::Event::Cancel { job }), *now);
                            model.check(state, &actions, None)?;
                            prop_assert!(model.open.keys().all(|(j, ..)| *j != job), "{job:?} cancelled with attempts left running");
                            return Ok(());
                        }
                        Step::Node(step) => {
                            let (actions, replaced) = node_step(state, step, pool, &mut model.pending, next_node, now, gpus());
                            if let Some((place, node)) = replaced {
                                pool[place] = node;
                            }
                            actions
                        }
                    };
                    model.check(state, &actions, ended_now)
                };
                for step in steps {
                    step_on(&mut state, &mut model, &mut pool, &mut next_node, &mut next_job, &mut now, step)?;
                }
                // Every running attempt ends, replacements stop coming: every job ends.
                for _ in 0..500 {
                    let step = if !model.open.is_empty() {
                        Step::End(0, true, true)
                    } else if !model.pending.is_empty() {
                        Step::Node(super::Step::ReplacementFails)
                    } else if !model.jobs.is_empty() {
                        Step::Node(super::Step::Advance(5))
                    } else {
                        break;
                    };
                    step_on(&mut state, &mut model, &mut pool, &mut next_node, &mut next_job, &mut now, step)?;
                }
                prop_assert!(model.jobs.is_empty(), "jobs never done: {:?}", model.jobs);
                prop_assert!(state.jobs().is_empty());
                prop_assert_eq!(state.jobs().held().count(), 0);
            }
        }
    }
}
