//! Keeps a pool at its size within its replacement budget, whoever drives the pool (the
//! background coordinator of `skyward pool up`, or a program through the library): a node
//! that is interrupted (a spot notice), lost (silent past the node timeout, busy or idle) or
//! gone by its provider's word is given up and fenced (and its machine removed, see
//! [`Pool::up`]), and a new node takes its place, as the pure [`Membership`] decides: when,
//! from which offer first, or no more.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;

use crate::pool::{candidates, Pool, PoolProgress};
use crate::server::CoordinatorEvent;
use skyward_core::membership::{Action, Budget, Event, Membership};
use skyward_core::selection::{self, Attempt, Selection};
use skyward_providers::Provider;

/// How often the pool's nodes are checked for ones to replace (besides the coordinator's
/// events, which are acted on as they come).
const NODE_CHECK: Duration = Duration::from_secs(5);

/// What the keeper has to say, for whoever shows the pool.
pub enum Kept<'a> {
    /// A replacement coming up.
    Progress(PoolProgress<'a>),
    /// What became of a lost node (replaced by which, or why not).
    Replacement(String),
    /// Why the pool is smaller than asked, once its budget left a place empty; `None` while
    /// it is whole.
    Shortfall(Option<String>),
}

/// Keeps `pool` at its size until its coordinator stops: replacements come from the pool's
/// own offer first, then from `providers`' other offers in `selection`'s order, within
/// `budget`. Runs until the coordinator closes; abort it to stop sooner.
pub async fn keep_size(
    pool: &Pool,
    providers: &[Arc<dyn Provider>],
    selection: &Selection,
    budget: Budget,
    on_news: &mut (dyn FnMut(Kept<'_>) + Send),
) {
    let coordinator = pool.coordinator();
    let mut events = coordinator.subscribe();
    let mut tick = tokio::time::interval(NODE_CHECK);
    let held = pool.nodes().iter().map(|n| n.node_id.clone()).collect();
    let mut membership = Membership::new(held, budget, Instant::now());
    // Why each node was lost, for the line that says what replaced it.
    let mut why_lost: HashMap<String, String> = HashMap::new();
    loop {
        let mut happened: VecDeque<Event> = VecDeque::new();
        let wake = membership.next_wake();
        tokio::select! {
            event = events.recv() => match event {
                Ok(CoordinatorEvent::NodeLost { node_id, reason }) => {
                    happened.push_back(Event::NodeLost { node: node_id, reason })
                }
                Ok(CoordinatorEvent::NodeInterrupted { node_id, notice }) => {
                    happened.push_back(Event::NodeLost {
                        node: node_id,
                        reason: format!("{} interruption notice: {} at {}", notice.source, notice.action, notice.at),
                    })
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                let nodes = pool.nodes();
                for node in &nodes {
                    // Events can be missed (a lagging receiver): the node's state says it too.
                    if let Some(why) = node.lost_reason() {
                        happened.push_back(Event::NodeLost { node: node.node_id.clone(), reason: why });
                    }
                }
                for provider in pool.providers() {
                    for (node, why) in provider.failed_nodes(pool.name()).await {
                        if nodes.iter().any(|n| n.node_id == node) {
                            happened.push_back(Event::NodeLost {
                                node,
                                reason: format!("{}: {why}", provider.name()),
                            });
                        }
                    }
                }
            }
            _ = sleep_until_some(wake) => happened.push_back(Event::Tick),
        }
        while let Some(event) = happened.pop_front() {
            if let Event::NodeLost { node, reason } = &event {
                why_lost
                    .entry(node.clone())
                    .or_insert_with(|| reason.clone());
            }
            for action in membership.handle(event, Instant::now()) {
                match action {
                    Action::Fence { node, reason } => {
                        // Connected or between connections: its tasks stop waiting for it,
                        // and should it come back it is told to shut down.
                        coordinator.give_up(&node, &reason);
                    }
                    Action::Start {
                        place,
                        lost,
                        next_offer_first,
                    } => {
                        let why = why_lost.get(&lost).cloned().unwrap_or_default();
                        tracing::warn!("{lost} ({why}): starting a node in its place");
                        let fallbacks = fallbacks(pool, providers, selection).await;
                        let replaced = pool
                            .replace(&lost, &fallbacks, next_offer_first, &mut |event| {
                                on_news(Kept::Progress(event))
                            })
                            .await;
                        happened.push_back(match replaced {
                            Ok(new) => {
                                on_news(Kept::Replacement(format!(
                                    "{lost} ({why}) replaced by {}",
                                    new.node_id
                                )));
                                Event::Started {
                                    place,
                                    node: new.node_id,
                                }
                            }
                            Err(failure) => Event::StartFailed {
                                place,
                                error: failure.message,
                            },
                        });
                    }
                    Action::Report(line) => on_news(Kept::Replacement(line)),
                }
            }
        }
        on_news(Kept::Shortfall(membership.shortfall()));
    }
}

/// Every offer of `providers` that could take one node of `pool`, in `selection`'s order:
/// where a replacement goes when the pool's own offer has no machine.
async fn fallbacks(
    pool: &Pool,
    providers: &[Arc<dyn Provider>],
    selection: &Selection,
) -> Vec<(Arc<dyn Provider>, Attempt)> {
    let mut spec = pool.spec().clone();
    spec.nodes = 1;
    let candidates = candidates(providers, &spec).await;
    selection::plan(selection, &candidates, &spec)
        .into_iter()
        .filter_map(|attempt| Some((providers.get(attempt.candidate)?.clone(), attempt)))
        .collect()
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
