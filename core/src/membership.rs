//! Which node holds each of a pool's places, which nodes were given up, and when a place
//! may be filled again. Sans I/O: the driver (the background coordinator's keeper) feeds it
//! what happened with the time it happened, and carries out the actions it answers with.
//!
//! A place whose node is lost (silent, interrupted, gone by its provider's word) gets a
//! new node, within a budget: at most [`Budget::per_place`] new nodes per place and
//! [`Budget::per_pool`] for the whole pool in any [`Budget::window`]. A node that is lost
//! soon after it came up ([`Budget::short_life`]) makes the next try wait (doubling from
//! [`Budget::backoff_min`] up to [`Budget::backoff_max`]) and, after two such in a row,
//! start from the next offer in the selection's order rather than the pool's own. A failed
//! try waits the same way. Once the budget is spent the place stays empty, and the pool
//! says so.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How many new nodes a pool may start in place of lost ones, and how fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// New nodes per place within [`Budget::window`].
    pub per_place: u32,
    /// New nodes for the whole pool within [`Budget::window`].
    pub per_pool: u32,
    pub window: Duration,
    /// The first wait after a node that lived less than [`Budget::short_life`], or after a
    /// failed try; it doubles with each one in a row.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub short_life: Duration,
}

impl Budget {
    /// The default for a pool of `nodes`: 3 new nodes per place an hour, and at most
    /// twice the pool's size (4 at least) an hour in all.
    pub fn for_nodes(nodes: usize) -> Budget {
        Budget::per_place(3, nodes)
    }

    /// `per_place` new nodes per place an hour (`--max-replacements`), and the pool's
    /// total as the larger of that and twice the pool's size, 4 at least.
    pub fn per_place(per_place: u32, nodes: usize) -> Budget {
        let nodes = u32::try_from(nodes).unwrap_or(u32::MAX);
        Budget {
            per_place,
            per_pool: per_place.max(nodes.saturating_mul(2)).max(4),
            window: Duration::from_secs(3600),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            short_life: Duration::from_secs(120),
        }
    }
}

/// What happened to the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `node` is gone for `reason`: silent past the node timeout, interrupted, or gone by its
    /// provider's word. Said of a node that holds no place, or more than once, it is ignored.
    NodeLost { node: String, reason: String },
    /// The new node for `place` is up.
    Started { place: usize, node: String },
    /// Starting a new node for `place` failed.
    StartFailed { place: usize, error: String },
    /// Time passed: a place's wait may be over.
    Tick,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Give `node` up for good: refuse its certificate, tell its agent to shut down.
    Fence { node: String, reason: String },
    /// Start a node for `place` in place of `lost` (which keeps the place until then):
    /// from the pool's own offer first, or from the next offer first when
    /// `next_offer_first` (the pool's own kept losing its machines soon after they came up).
    Start {
        place: usize,
        lost: String,
        next_offer_first: bool,
    },
    /// Tell the user (the pool's log and `pool status`).
    Report(String),
}

/// Where a place stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaceState {
    /// Its node is up.
    Held,
    /// Its node was lost; a new one starts at `until`.
    Waiting { until: Instant },
    /// A new node is being started.
    Starting,
    /// Its node was lost and the budget allows no new one: the pool is smaller.
    Empty { why: String },
}

impl PlaceState {
    /// What `pool status` says of the place at `now`.
    pub fn describe(&self, now: Instant) -> String {
        match self {
            PlaceState::Held => "held".into(),
            PlaceState::Starting => "a new node is starting".into(),
            PlaceState::Waiting { until } => format!(
                "a new node starts in {} s",
                until.saturating_duration_since(now).as_secs_f64().ceil()
            ),
            PlaceState::Empty { why } => format!("left empty: {why}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Place {
    /// The node that holds it, or held it last.
    node: String,
    /// When that node came up.
    since: Instant,
    state: PlaceState,
    /// When new nodes were started for it, within the window.
    starts: VecDeque<Instant>,
    /// Nodes lost soon after they came up, and failed tries, in a row.
    setbacks: u32,
    /// Of those, nodes lost soon after they came up, in a row.
    short_lived: u32,
}

/// The pool's places and the nodes given up.
#[derive(Debug, Clone)]
pub struct Membership {
    budget: Budget,
    places: Vec<Place>,
    /// Every node given up: none of them holds a place again.
    fenced: HashSet<String>,
    /// When new nodes were started, pool-wide, within the window.
    starts: VecDeque<Instant>,
}

impl Membership {
    /// A pool whose places are held by `nodes` (in rank order), all up at `now`.
    pub fn new(nodes: Vec<String>, budget: Budget, now: Instant) -> Membership {
        Membership {
            budget,
            places: nodes
                .into_iter()
                .map(|node| Place {
                    node,
                    since: now,
                    state: PlaceState::Held,
                    starts: VecDeque::new(),
                    setbacks: 0,
                    short_lived: 0,
                })
                .collect(),
            fenced: HashSet::new(),
            starts: VecDeque::new(),
        }
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::NodeLost { node, reason } => {
                let held = self
                    .places
                    .iter()
                    .position(|p| p.node == node && p.state == PlaceState::Held);
                if let Some(index) = held {
                    self.fenced.insert(node.clone());
                    actions.push(Action::Fence {
                        node: node.clone(),
                        reason: reason.clone(),
                    });
                    let place = &mut self.places[index];
                    if now.saturating_duration_since(place.since) < self.budget.short_life {
                        place.short_lived += 1;
                        place.setbacks += 1;
                    } else {
                        place.short_lived = 0;
                        place.setbacks = 0;
                    }
                    self.schedule(index, now, &mut actions);
                }
            }
            Event::Started { place, node } => {
                if let Some(p) = self.places.get_mut(place) {
                    if p.state == PlaceState::Starting && !self.fenced.contains(&node) {
                        p.node = node;
                        p.since = now;
                        p.state = PlaceState::Held;
                    } else {
                        // Not asked for (or a node given up): it holds no place.
                        self.fenced.insert(node.clone());
                        actions.push(Action::Fence {
                            node,
                            reason: "started for a place that did not want it".into(),
                        });
                    }
                }
            }
            Event::StartFailed { place, error } => {
                if self
                    .places
                    .get(place)
                    .is_some_and(|p| p.state == PlaceState::Starting)
                {
                    actions.push(Action::Report(format!(
                        "{} not replaced: {error}",
                        self.places[place].node
                    )));
                    self.places[place].setbacks += 1;
                    self.schedule(place, now, &mut actions);
                }
            }
            Event::Tick => {}
        }
        for index in 0..self.places.len() {
            if let PlaceState::Waiting { until } = self.places[index].state {
                if until <= now {
                    self.start(index, now, &mut actions);
                }
            }
        }
        actions
    }

    /// After a loss or a failed try: start a new node for `index` now, later, or never.
    fn schedule(&mut self, index: usize, now: Instant, actions: &mut Vec<Action>) {
        if self.leave_empty_if_spent(index, now, actions) {
            return;
        }
        let place = &mut self.places[index];
        match place.setbacks {
            0 => self.start(index, now, actions),
            setbacks => {
                let wait = self
                    .budget
                    .backoff_min
                    .saturating_mul(1u32 << (setbacks - 1).min(16))
                    .min(self.budget.backoff_max);
                place.state = PlaceState::Waiting { until: now + wait };
            }
        }
    }

    /// Leaves place `index` empty, and says so, when its budget or the pool's is spent.
    fn leave_empty_if_spent(
        &mut self,
        index: usize,
        now: Instant,
        actions: &mut Vec<Action>,
    ) -> bool {
        let window = self.budget.window;
        let recent = |starts: &mut VecDeque<Instant>| {
            while starts
                .front()
                .is_some_and(|at| now.saturating_duration_since(*at) >= window)
            {
                starts.pop_front();
            }
            starts.len() as u32
        };
        let pool_starts = recent(&mut self.starts);
        let place = &mut self.places[index];
        let place_starts = recent(&mut place.starts);
        let spent = if place_starts >= self.budget.per_place {
            format!(
                "{place_starts} new nodes for this place in the last {} already (--max-replacements raises it)",
                human(window)
            )
        } else if pool_starts >= self.budget.per_pool {
            format!(
                "{pool_starts} new nodes for the pool in the last {} already (--max-replacements raises it)",
                human(window)
            )
        } else {
            return false;
        };
        actions.push(Action::Report(format!(
            "{} not replaced: {spent}",
            place.node
        )));
        place.state = PlaceState::Empty { why: spent };
        true
    }

    /// Starts a new node for `index`, unless the budget was spent while it waited.
    fn start(&mut self, index: usize, now: Instant, actions: &mut Vec<Action>) {
        if self.leave_empty_if_spent(index, now, actions) {
            return;
        }
        let place = &mut self.places[index];
        place.state = PlaceState::Starting;
        place.starts.push_back(now);
        self.starts.push_back(now);
        actions.push(Action::Start {
            place: index,
            lost: place.node.clone(),
            next_offer_first: place.short_lived >= 2,
        });
    }

    /// When the driver should send [`Event::Tick`] next, if a place waits.
    pub fn next_wake(&self) -> Option<Instant> {
        self.places
            .iter()
            .filter_map(|p| match p.state {
                PlaceState::Waiting { until } => Some(until),
                _ => None,
            })
            .min()
    }

    /// Each place's node (the holder, or the last one) and state, in rank order.
    pub fn places(&self) -> impl Iterator<Item = (&str, &PlaceState)> {
        self.places.iter().map(|p| (p.node.as_str(), &p.state))
    }

    /// Whether `node` was given up.
    pub fn is_fenced(&self, node: &str) -> bool {
        self.fenced.contains(node)
    }

    /// Why the pool is smaller than asked, if the budget left places empty.
    pub fn shortfall(&self) -> Option<String> {
        let empty: Vec<&str> = self
            .places
            .iter()
            .filter_map(|p| match &p.state {
                PlaceState::Empty { why } => Some(why.as_str()),
                _ => None,
            })
            .collect();
        let first = empty.first()?;
        Some(format!(
            "replacements stopped: {first}; the pool runs with {} of {} nodes",
            self.places.len() - empty.len(),
            self.places.len()
        ))
    }
}

fn human(duration: Duration) -> String {
    match duration.as_secs() {
        3600 => "hour".into(),
        secs if secs % 60 == 0 => format!("{} min", secs / 60),
        secs => format!("{secs} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Fence { node, .. } => format!("fence {node}"),
                Action::Start {
                    place,
                    lost,
                    next_offer_first,
                } => format!(
                    "start {place} for {lost}{}",
                    if *next_offer_first {
                        " (next offer)"
                    } else {
                        ""
                    }
                ),
                Action::Report(line) => format!("report {line}"),
            })
            .collect()
    }

    fn lost(node: &str) -> Event {
        Event::NodeLost {
            node: node.into(),
            reason: "no health report for 30s".into(),
        }
    }

    #[test]
    fn a_lost_node_is_fenced_and_its_place_filled_at_once_when_it_lived_long() {
        let t0 = Instant::now();
        let mut pool = Membership::new(
            vec!["node-1".into(), "node-2".into()],
            Budget::for_nodes(2),
            t0,
        );
        let later = t0 + Duration::from_secs(600);
        assert_eq!(
            names(&pool.handle(lost("node-2"), later)),
            ["fence node-2", "start 1 for node-2"]
        );
        // Said again (the coordinator's event after the fence): nothing more.
        assert!(pool.handle(lost("node-2"), later).is_empty());
        assert!(pool
            .handle(
                Event::Started {
                    place: 1,
                    node: "node-3".into()
                },
                later
            )
            .is_empty());
        assert_eq!(
            pool.places().map(|(n, _)| n).collect::<Vec<_>>(),
            ["node-1", "node-3"]
        );
        assert!(pool.is_fenced("node-2"));
        assert_eq!(pool.shortfall(), None);
    }

    #[test]
    fn machines_lost_at_once_wait_longer_each_time_move_offers_and_stop_at_the_budget() {
        let t0 = Instant::now();
        let mut pool = Membership::new(vec!["node-1".into()], Budget::per_place(3, 1), t0);
        let mut now = t0;
        let mut node = 1;
        let mut waits = Vec::new();
        let mut next_offer = Vec::new();
        loop {
            let actions = pool.handle(lost(&format!("node-{node}")), now);
            if let Some(Action::Report(line)) = actions.last() {
                assert_eq!(
                    line,
                    &format!("node-{node} not replaced: 3 new nodes for this place in the last hour already (--max-replacements raises it)")
                );
                break;
            }
            let until = pool.next_wake().expect("a wait");
            waits.push(until - now);
            now = until;
            let actions = pool.handle(Event::Tick, now);
            let Some(Action::Start {
                next_offer_first, ..
            }) = actions.first()
            else {
                panic!("{actions:?}");
            };
            next_offer.push(*next_offer_first);
            node += 1;
            pool.handle(
                Event::Started {
                    place: 0,
                    node: format!("node-{node}"),
                },
                now,
            );
            now += Duration::from_secs(1);
        }
        assert_eq!(waits, [1, 2, 4].map(Duration::from_secs));
        assert_eq!(next_offer, [false, true, true]);
        assert_eq!(
            pool.shortfall().as_deref(),
            Some("replacements stopped: 3 new nodes for this place in the last hour already (--max-replacements raises it); the pool runs with 0 of 1 nodes")
        );
        // An hour on, the budget is back, but an empty place stays empty: nothing to lose.
        assert!(pool
            .handle(Event::Tick, now + Duration::from_secs(3600))
            .is_empty());
    }

    #[test]
    fn a_failed_start_waits_and_tries_again() {
        let t0 = Instant::now();
        let mut pool = Membership::new(vec!["node-1".into()], Budget::for_nodes(1), t0);
        let now = t0 + Duration::from_secs(600);
        pool.handle(lost("node-1"), now);
        let actions = pool.handle(
            Event::StartFailed {
                place: 0,
                error: "no capacity".into(),
            },
            now,
        );
        assert_eq!(names(&actions), ["report node-1 not replaced: no capacity"]);
        let until = pool.next_wake().expect("a wait");
        assert_eq!(until - now, Duration::from_secs(1));
        assert_eq!(
            names(&pool.handle(Event::Tick, until)),
            ["start 0 for node-1"]
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        Lose(usize),
        LoseUnknown,
        Start(usize),
        Fail(usize),
        Wait(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..4).prop_map(Step::Lose),
            Just(Step::LoseUnknown),
            (0usize..4).prop_map(Step::Start),
            (0usize..4).prop_map(Step::Fail),
            (0u64..400).prop_map(Step::Wait),
        ]
    }

    proptest! {
        /// Over any sequence of losses, starts, failures and time: a node holds at most one
        /// place and a fenced node none; every loss of a holder fences it exactly once; the
        /// starts stay within the budget over every window; and a place is never left
        /// without a node, a start, a wait or a reason while the budget lasts.
        #[test]
        fn the_budget_and_fencing_hold_whatever_happens(steps in proptest::collection::vec(step(), 1..120)) {
            let t0 = Instant::now();
            let budget = Budget::per_place(2, 3);
            let mut pool = Membership::new((1..=3).map(|i| format!("node-{i}")).collect(), budget.clone(), t0);
            let mut now = t0;
            let mut next = 4;
            let mut fences: Vec<String> = Vec::new();
            let mut starts: Vec<(usize, Instant)> = Vec::new();
            for step in steps {
                let event = match step {
                    Step::Lose(place) => match pool.places().nth(place % 3) {
                        Some((node, _)) => lost(node),
                        None => continue,
                    },
                    Step::LoseUnknown => lost("node-999"),
                    Step::Start(place) => {
                        next += 1;
                        Event::Started { place: place % 3, node: format!("node-{next}") }
                    }
                    Step::Fail(place) => Event::StartFailed { place: place % 3, error: "no".into() },
                    Step::Wait(secs) => {
                        now += Duration::from_secs(secs);
                        Event::Tick
                    }
                };
                for action in pool.handle(event, now) {
                    match action {
                        Action::Fence { node, .. } => {
                            prop_assert!(!fences.contains(&node), "{node} fenced twice");
                            fences.push(node);
                        }
                        Action::Start { place, .. } => starts.push((place, now)),
                        Action::Report(_) => {}
                    }
                }
                let held: Vec<&str> = pool
                    .places()
                    .filter(|(_, s)| **s == PlaceState::Held)
                    .map(|(n, _)| n)
                    .collect();
                let unique: HashSet<&&str> = held.iter().collect();
                prop_assert_eq!(unique.len(), held.len());
                for node in &held {
                    prop_assert!(!pool.is_fenced(node), "{node} holds a place, fenced");
                }
                for (_, at) in &starts {
                    let in_window = |place: Option<usize>| starts
                        .iter()
                        .filter(|(p, t)| place.is_none_or(|x| x == *p) && *t <= *at && at.saturating_duration_since(*t) < budget.window)
                        .count() as u32;
                    prop_assert!(in_window(None) <= budget.per_pool);
                    for place in 0..3 {
                        prop_assert!(in_window(Some(place)) <= budget.per_place);
                    }
                }
                for (_, state) in pool.places() {
                    if let PlaceState::Waiting { until } = state {
                        prop_assert!(*until > now, "a wait that is over was not started");
                    }
                }
            }
        }
    }
}
