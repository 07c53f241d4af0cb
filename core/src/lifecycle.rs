//! The pool's life as a pure state machine: no I/O, no clocks; the async shell feeds it
//! events and carries out the actions it returns.
//!
//! Provisioning -> WaitingForAgents -> Ready <-> Running -> TearingDown -> Down,
//! with Failed reachable from provisioning and waiting (teardown still follows).

use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Provisioning,
    WaitingForAgents,
    Ready,
    Running,
    TearingDown,
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Provisioned,
    ProvisionFailed(String),
    AgentReady(String),
    AgentLost(String),
    WaitTimedOut,
    RunStarted,
    RunFinished,
    TeardownRequested,
    TeardownFinished,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the wait for agents (the shell arms the timeout).
    AwaitAgents,
    /// Every expected agent is connected.
    AnnounceReady,
    /// Tear down whatever was created, then report `error`.
    Fail {
        error: String,
    },
    Teardown,
    AnnounceDown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {event:?} is not valid in phase {phase:?}")]
pub struct InvalidTransition {
    pub phase: Phase,
    pub event: Event,
}

#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Phase,
    expected: BTreeSet<String>,
    ready: BTreeSet<String>,
}

impl Lifecycle {
    pub fn new(expected: impl IntoIterator<Item = String>) -> Self {
        Lifecycle {
            phase: Phase::Provisioning,
            expected: expected.into_iter().collect(),
            ready: BTreeSet::new(),
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn ready_count(&self) -> usize {
        self.ready.len()
    }

    /// Nodes expected but not (or no longer) connected, in order.
    pub fn missing(&self) -> Vec<String> {
        self.expected.difference(&self.ready).cloned().collect()
    }

    pub fn handle(&mut self, event: Event) -> Result<Vec<Action>, InvalidTransition> {
        use Event as E;
        use Phase as P;
        let invalid = |phase: &Phase, event: Event| InvalidTransition {
            phase: phase.clone(),
            event,
        };
        let actions = match (&self.phase, event) {
            (P::Provisioning, E::Provisioned) => {
                self.phase = P::WaitingForAgents;
                let mut actions = vec![Action::AwaitAgents];
                // Agents may dial in before the provider call returns.
                if self.all_ready() {
                    self.phase = P::Ready;
                    actions.push(Action::AnnounceReady);
                }
                actions
            }
            (P::Provisioning, E::ProvisionFailed(error)) => {
                self.phase = P::TearingDown;
                vec![Action::Fail { error }, Action::Teardown]
            }
            (P::Provisioning | P::WaitingForAgents, E::AgentReady(node)) => {
                if !self.expected.contains(&node) {
                    return Err(invalid(&self.phase, E::AgentReady(node)));
                }
                self.ready.insert(node);
                if self.phase == P::WaitingForAgents && self.all_ready() {
                    self.phase = P::Ready;
                    vec![Action::AnnounceReady]
                } else {
                    vec![]
                }
            }
            (P::WaitingForAgents, E::WaitTimedOut) => {
                self.phase = P::TearingDown;
                vec![
                    Action::Fail {
                        error: format!(
                            "{} of {} nodes never connected: {}",
                            self.missing().len(),
                            self.expected.len(),
                            self.missing().join(", ")
                        ),
                    },
                    Action::Teardown,
                ]
            }
            (P::Ready | P::Running, E::AgentReady(node)) if self.expected.contains(&node) => {
                self.ready.insert(node);
                vec![]
            }
            (_, E::AgentLost(node)) => {
                self.ready.remove(&node);
                vec![]
            }
            (P::Ready, E::RunStarted) => {
                self.phase = P::Running;
                vec![]
            }
            (P::Running, E::RunFinished) => {
                self.phase = P::Ready;
                vec![]
            }
            (P::TearingDown, E::TeardownRequested) => vec![],
            (P::Down, E::TeardownRequested) => vec![],
            (_, E::TeardownRequested) => {
                self.phase = P::TearingDown;
                vec![Action::Teardown]
            }
            (P::TearingDown, E::TeardownFinished) => {
                self.phase = P::Down;
                vec![Action::AnnounceDown]
            }
            (phase, event) => return Err(invalid(phase, event)),
        };
        Ok(actions)
    }

    fn all_ready(&self) -> bool {
        self.expected.is_subset(&self.ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn ready_once_every_node_has_connected() {
        let mut pool = Lifecycle::new(nodes(2));
        assert_eq!(
            pool.handle(Event::Provisioned).unwrap(),
            vec![Action::AwaitAgents]
        );
        assert_eq!(
            pool.handle(Event::AgentReady("node-2".into())).unwrap(),
            vec![]
        );
        assert_eq!(pool.missing(), vec!["node-1".to_string()]);
        assert_eq!(
            pool.handle(Event::AgentReady("node-1".into())).unwrap(),
            vec![Action::AnnounceReady]
        );
        assert_eq!(pool.phase(), &Phase::Ready);
    }

    #[test]
    fn agents_connecting_before_provisioning_returns_still_count() {
        let mut pool = Lifecycle::new(nodes(1));
        pool.handle(Event::AgentReady("node-1".into())).unwrap();
        assert_eq!(
            pool.handle(Event::Provisioned).unwrap(),
            vec![Action::AwaitAgents, Action::AnnounceReady]
        );
    }

    #[test]
    fn timeout_names_the_nodes_that_never_enrolled_and_tears_down() {
        let mut pool = Lifecycle::new(nodes(3));
        pool.handle(Event::Provisioned).unwrap();
        pool.handle(Event::AgentReady("node-2".into())).unwrap();
        let actions = pool.handle(Event::WaitTimedOut).unwrap();
        assert_eq!(
            actions,
            vec![
                Action::Fail {
                    error: "2 of 3 nodes never connected: node-1, node-3".into()
                },
                Action::Teardown
            ]
        );
        assert_eq!(
            pool.handle(Event::TeardownFinished).unwrap(),
            vec![Action::AnnounceDown]
        );
        assert_eq!(pool.phase(), &Phase::Down);
    }

    #[test]
    fn unknown_nodes_and_out_of_order_events_are_refused() {
        let mut pool = Lifecycle::new(nodes(1));
        assert!(pool.handle(Event::AgentReady("node-9".into())).is_err());
        assert!(pool.handle(Event::RunStarted).is_err());
        assert!(pool.handle(Event::TeardownFinished).is_err());
        assert_eq!(pool.phase(), &Phase::Provisioning);
    }

    #[test]
    fn run_and_teardown_cycle() {
        let mut pool = Lifecycle::new(nodes(1));
        pool.handle(Event::Provisioned).unwrap();
        pool.handle(Event::AgentReady("node-1".into())).unwrap();
        pool.handle(Event::RunStarted).unwrap();
        assert!(pool.handle(Event::RunStarted).is_err());
        pool.handle(Event::RunFinished).unwrap();
        assert_eq!(
            pool.handle(Event::TeardownRequested).unwrap(),
            vec![Action::Teardown]
        );
        assert_eq!(pool.handle(Event::TeardownRequested).unwrap(), vec![]);
        pool.handle(Event::TeardownFinished).unwrap();
        assert_eq!(pool.handle(Event::TeardownRequested).unwrap(), vec![]);
    }

    #[test]
    fn provisioning_failure_tears_down() {
        let mut pool = Lifecycle::new(nodes(1));
        let actions = pool.handle(Event::ProvisionFailed("quota".into())).unwrap();
        assert_eq!(
            actions,
            vec![
                Action::Fail {
                    error: "quota".into()
                },
                Action::Teardown
            ]
        );
    }
}
