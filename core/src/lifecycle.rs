//! A pool's life as a pure state machine: no I/O, no clocks. Whoever drives a pool (the
//! background coordinator of `skyward pool up`) feeds it what happened and carries out the
//! actions it returns; a refusal is an answer to give the user (no job on a pool that is
//! coming up or going away).
//!
//! Provisioning -> Ready (with its running jobs counted) -> TearingDown -> Down; a pool
//! whose provisioning failed goes to TearingDown too, and keeps the failure to tell.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Machines are being made and their agents awaited.
    Provisioning,
    /// Every node is up; `jobs` run now.
    Ready {
        jobs: usize,
    },
    /// What was made is being removed (after a failure, if [`Lifecycle::failure`] says one).
    TearingDown,
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Provisioning finished: every node is up.
    Up,
    /// Provisioning failed for this reason.
    ProvisionFailed(String),
    /// A job asks to start.
    JobStarted,
    /// A job that started has ended.
    JobEnded,
    /// The pool is to go (a signal, its TTL, `skyward down`).
    TeardownRequested,
    TeardownFinished,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Tell whoever waits that the pool is up.
    AnnounceReady,
    /// Tell whoever waits that the pool failed, and why.
    AnnounceFailure(String),
    /// Remove whatever was made.
    Teardown,
    AnnounceDown,
}

/// An event the pool's phase does not allow; its message is the user's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", refusal(.phase, .event, .failure.as_deref()))]
pub struct InvalidTransition {
    pub phase: Phase,
    pub event: Event,
    failure: Option<String>,
}

fn refusal(phase: &Phase, event: &Event, failure: Option<&str>) -> String {
    match (phase, failure) {
        (Phase::Provisioning, _) => "the pool is still coming up".into(),
        (Phase::TearingDown | Phase::Down, Some(why)) => {
            format!("the pool failed ({why}) and is being torn down")
        }
        (Phase::TearingDown, None) => "the pool is being torn down".into(),
        (Phase::Down, None) => "the pool is down".into(),
        (Phase::Ready { .. }, _) => format!("{event:?} does not happen to a pool that is up"),
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Provisioning => f.write_str("coming up"),
            Phase::Ready { jobs: 0 } => f.write_str("up, idle"),
            Phase::Ready { jobs: 1 } => f.write_str("up, 1 job running"),
            Phase::Ready { jobs } => write!(f, "up, {jobs} jobs running"),
            Phase::TearingDown => f.write_str("being torn down"),
            Phase::Down => f.write_str("down"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Phase,
    failure: Option<String>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Lifecycle {
            phase: Phase::Provisioning,
            failure: None,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Why provisioning failed, once it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    pub fn handle(&mut self, event: Event) -> Result<Vec<Action>, InvalidTransition> {
        use Event as E;
        use Phase as P;
        let actions = match (&mut self.phase, event) {
            (P::Provisioning, E::Up) => {
                self.phase = P::Ready { jobs: 0 };
                vec![Action::AnnounceReady]
            }
            (P::Provisioning, E::ProvisionFailed(why)) => {
                self.failure = Some(why.clone());
                self.phase = P::TearingDown;
                vec![Action::AnnounceFailure(why), Action::Teardown]
            }
            (P::Ready { jobs }, E::JobStarted) => {
                *jobs += 1;
                vec![]
            }
            // A job that ran on may end while the pool goes (its tasks are being stopped).
            (P::Ready { jobs }, E::JobEnded) if *jobs > 0 => {
                *jobs -= 1;
                vec![]
            }
            (P::TearingDown | P::Down, E::JobEnded) => vec![],
            (P::TearingDown | P::Down, E::TeardownRequested) => vec![],
            (P::Provisioning | P::Ready { .. }, E::TeardownRequested) => {
                self.phase = P::TearingDown;
                vec![Action::Teardown]
            }
            (P::TearingDown, E::TeardownFinished) => {
                self.phase = P::Down;
                vec![Action::AnnounceDown]
            }
            (phase, event) => {
                return Err(InvalidTransition {
                    phase: phase.clone(),
                    event,
                    failure: self.failure.clone(),
                })
            }
        };
        Ok(actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_pool_comes_up_counts_its_jobs_and_goes() {
        let mut pool = Lifecycle::new();
        assert_eq!(
            pool.handle(Event::JobStarted).unwrap_err().to_string(),
            "the pool is still coming up"
        );
        assert_eq!(pool.handle(Event::Up).unwrap(), vec![Action::AnnounceReady]);
        pool.handle(Event::JobStarted).unwrap();
        pool.handle(Event::JobStarted).unwrap();
        assert_eq!(pool.phase().to_string(), "up, 2 jobs running");
        pool.handle(Event::JobEnded).unwrap();
        assert_eq!(pool.phase(), &Phase::Ready { jobs: 1 });
        assert_eq!(
            pool.handle(Event::TeardownRequested).unwrap(),
            vec![Action::Teardown]
        );
        assert_eq!(
            pool.handle(Event::JobStarted).unwrap_err().to_string(),
            "the pool is being torn down"
        );
        // The job that was running ends as its tasks are stopped.
        pool.handle(Event::JobEnded).unwrap();
        assert_eq!(pool.handle(Event::TeardownRequested).unwrap(), vec![]);
        assert_eq!(
            pool.handle(Event::TeardownFinished).unwrap(),
            vec![Action::AnnounceDown]
        );
        assert_eq!(pool.phase(), &Phase::Down);
    }

    #[test]
    fn a_failed_pool_says_why_and_tears_down() {
        let mut pool = Lifecycle::new();
        assert_eq!(
            pool.handle(Event::ProvisionFailed("no offers".into()))
                .unwrap(),
            vec![
                Action::AnnounceFailure("no offers".into()),
                Action::Teardown
            ]
        );
        assert_eq!(pool.failure(), Some("no offers"));
        assert_eq!(
            pool.handle(Event::JobStarted).unwrap_err().to_string(),
            "the pool failed (no offers) and is being torn down"
        );
        assert!(pool.handle(Event::Up).is_err());
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Up),
            Just(Event::ProvisionFailed("why".into())),
            Just(Event::JobStarted),
            Just(Event::JobEnded),
            Just(Event::TeardownRequested),
            Just(Event::TeardownFinished),
        ]
    }

    proptest! {
        /// Whatever happens: a pool is announced ready at most once and only before any
        /// teardown, torn down at most once, never runs a job outside Ready, never counts
        /// fewer jobs than it admitted minus those ended, and a refused event changes
        /// nothing.
        #[test]
        fn the_phase_follows_its_rules_under_any_sequence(events in proptest::collection::vec(event(), 0..40)) {
            let mut pool = Lifecycle::new();
            let (mut ready, mut teardowns, mut running) = (0, 0, 0usize);
            for event in events {
                let before = pool.phase().clone();
                match pool.handle(event.clone()) {
                    Ok(actions) => {
                        ready += actions.iter().filter(|a| **a == Action::AnnounceReady).count();
                        teardowns += actions.iter().filter(|a| **a == Action::Teardown).count();
                        match (&before, &event) {
                            (Phase::Ready { .. }, Event::JobStarted) => running += 1,
                            (Phase::Ready { .. }, Event::JobEnded) => running -= 1,
                            _ => {}
                        }
                        if let Phase::Ready { jobs } = pool.phase() {
                            prop_assert_eq!(*jobs, running);
                            prop_assert_eq!(teardowns, 0);
                        }
                    }
                    Err(_) => prop_assert_eq!(pool.phase(), &before),
                }
                prop_assert!(ready <= 1 && teardowns <= 1);
            }
        }
    }
}
