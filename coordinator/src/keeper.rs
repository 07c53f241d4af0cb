//! Keeps a pool at its size within its replacement budget, whoever drives the pool (the
//! background coordinator of `skyward pool up`, `skyward run`, or a program through the
//! library). Which node is given up, and when and from which offer a place is refilled, is
//! the pool state's to decide (`skyward_core::pool_state`, held by the coordinator): a node
//! interrupted (a spot notice), silent past the node timeout (busy or idle) or gone by its
//! provider's word (the pool's machine check) is fenced and its place asked to be refilled
//! in the same step. The keeper carries those asks out (provisioning through
//! [`Pool::replace`]) and says how each went.

use std::sync::Arc;

use crate::pool::{candidates, Pool, PoolProgress};
use crate::server::PlaceNews;
use skyward_core::membership::Budget;
use skyward_core::pool_state::Replacement;
use skyward_core::selection::{self, Attempt, Selection};
use skyward_providers::Provider;

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
    let held = pool.nodes().iter().map(|n| n.node_id.clone()).collect();
    let mut asks = coordinator.keep_places(held, budget);
    while let Some(ask) = asks.recv().await {
        match ask {
            PlaceNews::Report(line) => on_news(Kept::Replacement(line)),
            PlaceNews::Replace(Replacement {
                place,
                lost,
                why,
                next_offer_first,
            }) => {
                tracing::warn!("{lost} ({why}): starting a node in its place");
                let fallbacks = fallbacks(pool, providers, selection).await;
                let replaced = pool
                    .replace(&lost, &fallbacks, next_offer_first, &mut |event| {
                        on_news(Kept::Progress(event))
                    })
                    .await;
                match replaced {
                    Ok(new) => {
                        on_news(Kept::Replacement(format!(
                            "{lost} ({why}) replaced by {}",
                            new.node_id
                        )));
                        coordinator.replaced(place, &new);
                    }
                    Err(failure) => coordinator.replacement_failed(place, &failure.message),
                }
            }
        }
        on_news(Kept::Shortfall(coordinator.shortfall()));
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
