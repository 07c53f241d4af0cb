//! One pool's state: where the pool is in its life and how many jobs run (the
//! [`Lifecycle`]), who each node id is and whether it is still in the pool (the [`Roster`]),
//! and, once the pool keeps its size, which node holds each place and when a lost one is
//! replaced (the [`Membership`]). Sans I/O, one `handle(event, now)`: a node given
//! up for any reason (silence, an interruption notice, its machine gone, its driver's word)
//! is fenced and its place filled in the same step, so that no loop elsewhere has to notice
//! it. The coordinator's endpoint feeds it and carries out the node actions; the pool's
//! keeper carries out the replacements and says how they went.

use std::time::Instant;

use crate::lifecycle::{self, InvalidTransition, Lifecycle, Phase};
use crate::membership::{self, Budget, Membership, PlaceState};
use crate::roster::{self, Roster};

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
    /// The new node for `place` is up.
    Replaced { place: usize, node: String },
    /// Starting a new node for `place` failed.
    ReplacementFailed { place: usize, error: String },
    /// The pool came up, failed, runs a job or ends one, or goes.
    Lifecycle(lifecycle::Event),
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
}

impl PoolState {
    pub fn new(roster: Roster) -> PoolState {
        PoolState {
            lifecycle: Lifecycle::new(),
            roster,
            membership: None,
        }
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
                    let given_up = self
                        .roster
                        .handle(roster::Event::GiveUp { node, reason }, now);
                    self.follow(given_up, now, &mut actions);
                }
            }
            Event::KeepPlaces { .. } if self.going() => {}
            Event::KeepPlaces { nodes, budget } => {
                self.membership = Some(Membership::new(nodes.clone(), budget, now));
                // A node given up before the pool began to keep its size loses its place now.
                for node in nodes {
                    self.lose_if_fenced(node, now, &mut actions);
                }
            }
            Event::Replaced { place, node } => {
                let started = membership::Event::Started {
                    place,
                    node: node.clone(),
                };
                self.membership_says(started, now, &mut actions);
                // Given up while it came up (before it held the place): the place goes on.
                self.lose_if_fenced(node, now, &mut actions);
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
        }
        actions
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
                    node: "node-3".into()
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
            let mut pending: Vec<(usize, String)> = Vec::new();
            let mut asked_per_place: HashMap<usize, u32> = HashMap::new();
            let mut asked = 0u32;
            for step in steps {
                let nodes: Vec<String> = state.places().into_iter().map(|(n, _)| n).collect();
                let pick = |i: usize| nodes[i % nodes.len()].clone();
                let actions = match step {
                    Step::Heard(i) => state.handle(Event::Node(roster::Event::Heard { node: pick(i) }), now),
                    Step::Interrupt(i) => state.handle(Event::Interrupted { node: pick(i), reason: "notice".into() }, now),
                    Step::GiveUp(i) => state.handle(Event::Node(roster::Event::GiveUp { node: pick(i), reason: "gone".into() }), now),
                    Step::ReplacementUp => {
                        if pending.is_empty() { continue }
                        let (place, _) = pending.remove(0);
                        let node = format!("node-{next_node}");
                        next_node += 1;
                        join(&mut state, &node, now);
                        state.handle(Event::Replaced { place, node }, now)
                    }
                    Step::ReplacementFails => {
                        if pending.is_empty() { continue }
                        let (place, _) = pending.remove(0);
                        state.handle(Event::ReplacementFailed { place, error: "no capacity".into() }, now)
                    }
                    Step::Advance(secs) => {
                        now += Duration::from_secs(secs);
                        state.handle(Event::Node(roster::Event::Tick { paused: Duration::ZERO }), now)
                    }
                };
                for action in &actions {
                    if let Action::Replace(Replacement { place, lost, .. }) = action {
                        prop_assert!(pending.iter().all(|(p, _)| p != place), "two replacements for place {place}");
                        prop_assert!(state.roster().fenced(lost).is_some(), "{lost} replaced but not fenced");
                        pending.push((*place, lost.clone()));
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
                        PlaceState::Starting => prop_assert!(pending.iter().any(|(p, _)| *p == place)),
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
}
