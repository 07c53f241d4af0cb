//! Which offer to try first, and what to fall back to: pure, over the offers every provider
//! returned. The async shell (`skyward_coordinator::pool`) walks the attempts in order.

use std::str::FromStr;
use std::sync::Arc;

use crate::offer::{Market, Offer};
use crate::spec::PoolSpec;

/// One provider's answer to "what do you have for this spec?".
#[derive(Debug, Clone)]
pub struct Candidate {
    pub provider: String,
    /// Offers that fit the spec, or why none could be listed.
    pub offers: Result<Vec<Offer>, String>,
}

/// A user's own ordering: candidate indices, most preferred first; others are not tried.
pub type CustomSelection = Arc<dyn Fn(&[Candidate], &PoolSpec) -> Vec<usize> + Send + Sync>;

#[derive(Clone, Default)]
pub enum Selection {
    /// Providers in the order given, each one's offers cheapest first, whether or not the
    /// provider reports capacity right now.
    #[default]
    First,
    /// Every provider's offers with capacity now, cheapest first across all of them.
    Cheapest,
    /// Providers in the order given, only offers with capacity now.
    Available,
    Custom(CustomSelection),
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Selection::First => "first",
            Selection::Cheapest => "cheapest",
            Selection::Available => "available",
            Selection::Custom(_) => "custom",
        })
    }
}

impl FromStr for Selection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "first" => Ok(Selection::First),
            "cheapest" => Ok(Selection::Cheapest),
            "available" => Ok(Selection::Available),
            other => Err(format!(
                "unknown selection {other:?}: use first, cheapest or available"
            )),
        }
    }
}

/// One try: this offer, on this market, at this price per node-hour.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// Index into the candidates.
    pub candidate: usize,
    pub offer: Offer,
    pub market: Market,
    pub price: f64,
}

/// Every attempt in the order to try them: spot before on-demand where the allocation allows
/// both, then as the selection says.
pub fn plan(selection: &Selection, candidates: &[Candidate], spec: &PoolSpec) -> Vec<Attempt> {
    let only_available = !matches!(selection, Selection::First);
    let order: Vec<usize> = match selection {
        Selection::Custom(choose) => {
            let mut seen = std::collections::HashSet::new();
            choose(candidates, spec)
                .into_iter()
                .filter(|&i| i < candidates.len() && seen.insert(i))
                .collect()
        }
        _ => (0..candidates.len()).collect(),
    };
    let mut attempts = Vec::new();
    for &market in spec.allocation.markets() {
        let mut for_market: Vec<Attempt> = Vec::new();
        for &candidate in &order {
            let Ok(offers) = &candidates[candidate].offers else {
                continue;
            };
            let mut mine: Vec<Attempt> = offers
                .iter()
                .filter(|o| {
                    (o.available_on(market) || !only_available) && spec.mismatch(o).is_none()
                })
                .filter_map(|o| {
                    spec.price(o, market).map(|price| Attempt {
                        candidate,
                        offer: o.clone(),
                        market,
                        price,
                    })
                })
                .collect();
            mine.sort_by(|a, b| a.price.total_cmp(&b.price));
            for_market.extend(mine);
        }
        if matches!(selection, Selection::Cheapest) {
            // Stable: equal prices keep the providers' list order.
            for_market.sort_by(|a, b| a.price.total_cmp(&b.price));
        }
        attempts.extend(for_market);
    }
    attempts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Allocation;

    fn offer(
        provider: &str,
        instance: &str,
        on_demand: Option<f64>,
        spot: Option<f64>,
        available: bool,
    ) -> Offer {
        Offer {
            provider: provider.into(),
            region: "r".into(),
            instance_type: instance.into(),
            accelerator: None,
            vcpus: 4,
            memory_gb: 16.0,
            on_demand_per_hour: on_demand,
            spot_per_hour: spot,
            available,
            spot_available: None,
            provider_ref: String::new(),
        }
    }

    fn candidates() -> Vec<Candidate> {
        vec![
            Candidate {
                provider: "aws".into(),
                offers: Ok(vec![
                    offer("aws", "big", Some(3.0), Some(1.0), true),
                    offer("aws", "small", Some(2.0), None, false),
                ]),
            },
            Candidate {
                provider: "verda".into(),
                offers: Ok(vec![offer("verda", "v", Some(1.5), Some(0.7), true)]),
            },
            Candidate {
                provider: "vastai".into(),
                offers: Err("auth failed".into()),
            },
        ]
    }

    fn names(attempts: &[Attempt]) -> Vec<String> {
        attempts
            .iter()
            .map(|a| {
                format!(
                    "{}/{}/{}",
                    a.offer.provider, a.offer.instance_type, a.market
                )
            })
            .collect()
    }

    #[test]
    fn cheapest_compares_across_providers() {
        let spec = PoolSpec::new(1);
        let attempts = plan(&Selection::Cheapest, &candidates(), &spec);
        assert_eq!(names(&attempts), ["verda/v/on-demand", "aws/big/on-demand"]);
        assert_eq!(attempts[0].price, 1.5);
    }

    #[test]
    fn first_keeps_list_order_and_tries_unavailable_offers_too() {
        let attempts = plan(&Selection::First, &candidates(), &PoolSpec::new(1));
        assert_eq!(
            names(&attempts),
            [
                "aws/small/on-demand",
                "aws/big/on-demand",
                "verda/v/on-demand"
            ]
        );
    }

    #[test]
    fn available_keeps_list_order_with_capacity_only() {
        let attempts = plan(&Selection::Available, &candidates(), &PoolSpec::new(1));
        assert_eq!(names(&attempts), ["aws/big/on-demand", "verda/v/on-demand"]);
    }

    #[test]
    fn spot_if_available_tries_every_spot_offer_before_on_demand() {
        let spec = PoolSpec::new(1).allocation(Allocation::SpotIfAvailable);
        let attempts = plan(&Selection::Cheapest, &candidates(), &spec);
        assert_eq!(
            names(&attempts),
            [
                "verda/v/spot",
                "aws/big/spot",
                "verda/v/on-demand",
                "aws/big/on-demand"
            ]
        );
        let spot_only = PoolSpec::new(1).allocation(Allocation::Spot);
        assert_eq!(
            plan(&Selection::Cheapest, &candidates(), &spot_only).len(),
            2
        );
    }

    #[test]
    fn spot_capacity_is_judged_apart_from_on_demand_capacity() {
        let mut spot_full = offer("verda", "v", Some(1.5), Some(0.7), true);
        spot_full.spot_available = Some(false);
        let candidates = vec![Candidate {
            provider: "verda".into(),
            offers: Ok(vec![spot_full]),
        }];
        let spec = PoolSpec::new(1).allocation(Allocation::SpotIfAvailable);
        assert_eq!(
            names(&plan(&Selection::Cheapest, &candidates, &spec)),
            ["verda/v/on-demand"]
        );
    }

    #[test]
    fn a_custom_closure_orders_and_filters_providers() {
        let prefer_verda: CustomSelection =
            Arc::new(|candidates: &[Candidate], _spec: &PoolSpec| {
                candidates
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.provider == "verda")
                    .map(|(i, _)| i)
                    .chain([99, 1])
                    .collect()
            });
        let attempts = plan(
            &Selection::Custom(prefer_verda),
            &candidates(),
            &PoolSpec::new(1),
        );
        assert_eq!(names(&attempts), ["verda/v/on-demand"]);
    }

    #[test]
    fn price_limit_and_spec_filter_offers_out() {
        let mut spec = PoolSpec::new(1);
        spec.max_price_per_hour = Some(1.6);
        assert_eq!(
            names(&plan(&Selection::Cheapest, &candidates(), &spec)),
            ["verda/v/on-demand"]
        );
        spec.vcpus = Some(64);
        assert!(plan(&Selection::Cheapest, &candidates(), &spec).is_empty());
    }

    #[test]
    fn selections_parse() {
        assert!(matches!("cheapest".parse(), Ok(Selection::Cheapest)));
        assert!("best"
            .parse::<Selection>()
            .unwrap_err()
            .contains("first, cheapest or available"));
    }
}
