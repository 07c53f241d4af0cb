//! What a user asks for: resources per node, how many nodes, how to pay, where, how much.
//! Parsing and matching are pure; providers turn a spec into offers.

use std::str::FromStr;
use std::time::Duration;

use crate::catalog::{self, Accelerator};
use crate::offer::{Market, Offer};

/// How instances are paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allocation {
    Spot,
    #[default]
    OnDemand,
    /// Spot where there is spot capacity, on-demand otherwise.
    SpotIfAvailable,
}

impl Allocation {
    /// The markets to try, in order.
    pub fn markets(self) -> &'static [Market] {
        match self {
            Allocation::Spot => &[Market::Spot],
            Allocation::OnDemand => &[Market::OnDemand],
            Allocation::SpotIfAvailable => &[Market::Spot, Market::OnDemand],
        }
    }
}

impl FromStr for Allocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spot" => Ok(Allocation::Spot),
            "on-demand" | "ondemand" => Ok(Allocation::OnDemand),
            "spot-if-available" => Ok(Allocation::SpotIfAvailable),
            other => Err(format!(
                "unknown allocation {other:?}: use spot, on-demand or spot-if-available"
            )),
        }
    }
}

/// Accelerators per node: `H100`, `H100:8`, `RTX 4090:2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceleratorRequest {
    pub accelerator: &'static Accelerator,
    pub count: u32,
}

impl FromStr for AcceleratorRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, count) = match s.rsplit_once(':') {
            Some((name, count)) => {
                let count: u32 = count.trim().parse().map_err(|_| {
                    format!(
                        "accelerator count {count:?} in {s:?} is not a number: write e.g. H100:8"
                    )
                })?;
                (name, count)
            }
            None => (s, 1),
        };
        if count == 0 {
            return Err(format!("accelerator count in {s:?} must be at least 1"));
        }
        let accelerator = catalog::find(name.trim()).map_err(|e| e.to_string())?;
        Ok(AcceleratorRequest { accelerator, count })
    }
}

impl std::fmt::Display for AcceleratorRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.count {
            1 => write!(f, "{}", self.accelerator.name),
            n => write!(f, "{}:{n}", self.accelerator.name),
        }
    }
}

/// Parses a memory size in GB: `8GB`, `8G`, `8`, `512MB`, `16GiB`.
pub fn parse_memory_gb(s: &str) -> Result<f64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (number, scale) = [
        ("gib", 1.073_741_824),
        ("gb", 1.0),
        ("g", 1.0),
        ("mib", 0.001_048_576),
        ("mb", 0.001),
        ("m", 0.001),
    ]
    .iter()
    .find_map(|(suffix, scale)| lower.strip_suffix(suffix).map(|n| (n.trim(), *scale)))
    .unwrap_or((lower.as_str(), 1.0));
    match number.parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(n * scale),
        _ => Err(format!(
            "memory {s:?} is not a size: write e.g. 8GB or 512MB"
        )),
    }
}

/// A region the user named matches an offer's region exactly, or as its last part
/// ("US" matches VastAI's "Texas, US"), ignoring case.
fn region_matches(wanted: &str, offered: &str) -> bool {
    offered.eq_ignore_ascii_case(wanted)
        || offered
            .rsplit_once(',')
            .is_some_and(|(_, last)| last.trim().eq_ignore_ascii_case(wanted.trim()))
}

/// Everything a pool asks for.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub nodes: usize,
    pub accelerator: Option<AcceleratorRequest>,
    /// Least vCPUs per node.
    pub vcpus: Option<u32>,
    /// Least memory per node, in GB.
    pub memory_gb: Option<f64>,
    pub allocation: Allocation,
    /// Restrict offers to this region (provider's own naming); `None` lets providers choose.
    pub region: Option<String>,
    /// Highest price per node-hour, in USD, for the market used.
    pub max_price_per_hour: Option<f64>,
    /// Boot disk per node, in GB.
    pub disk_gb: Option<u32>,
    /// Image (AMI, slug, docker image) overriding the provider's default.
    pub image: Option<String>,
    /// How long agents get to enroll and connect after provisioning.
    pub connect_timeout: Duration,
    /// The coordinator dials the agents instead of the agents dialing it (for a coordinator
    /// that nodes cannot reach, behind NAT).
    pub reverse: bool,
    /// With `reverse`: the address this coordinator's traffic comes from, the only one the
    /// cloud nodes' agent port is opened to.
    pub public_ip: Option<std::net::IpAddr>,
    /// MIG layout every GPU of every node gets at bootstrap: one profile to fill each GPU
    /// with (`1g.10gb`) or exactly these (`3g.40gb,2g.20gb,1g.10gb`).
    pub mig: Option<String>,
    /// The pool's longest life: past it every node stops its tasks and powers itself off
    /// (cloud) or exits (local), whether or not its coordinator is still there.
    pub ttl: Option<Duration>,
}

impl PoolSpec {
    /// `nodes` nodes of any size, on demand.
    pub fn new(nodes: usize) -> Self {
        PoolSpec {
            nodes,
            accelerator: None,
            vcpus: None,
            memory_gb: None,
            allocation: Allocation::default(),
            region: None,
            max_price_per_hour: None,
            disk_gb: None,
            image: None,
            connect_timeout: Duration::from_secs(60),
            reverse: false,
            public_ip: None,
            mig: None,
            ttl: None,
        }
    }

    pub fn accelerator(mut self, request: AcceleratorRequest) -> Self {
        self.accelerator = Some(request);
        self
    }

    pub fn allocation(mut self, allocation: Allocation) -> Self {
        self.allocation = allocation;
        self
    }

    /// Why `offer` does not fit this spec, or `None` when it does. Price limits are checked
    /// per market by [`PoolSpec::price`].
    pub fn mismatch(&self, offer: &Offer) -> Option<String> {
        if let Some(wanted) = &self.accelerator {
            match &offer.accelerator {
                None => return Some("has no accelerator".into()),
                Some(offered) if !wanted.accelerator.satisfied_by(offered.accelerator) => {
                    return Some(format!(
                        "has {}, not {}",
                        offered.accelerator.name, wanted.accelerator.name
                    ))
                }
                Some(offered) if offered.count < wanted.count => {
                    return Some(format!(
                        "has {} {}, not {}",
                        offered.count, offered.accelerator.name, wanted.count
                    ))
                }
                Some(_) => {}
            }
        }
        if self.vcpus.is_some_and(|v| offer.vcpus < v) {
            return Some(format!("has {} vCPUs", offer.vcpus));
        }
        if self.memory_gb.is_some_and(|m| offer.memory_gb + 0.01 < m) {
            return Some(format!("has {} GB of memory", offer.memory_gb));
        }
        if self
            .region
            .as_ref()
            .is_some_and(|r| !region_matches(r, &offer.region))
        {
            return Some(format!("is in {}", offer.region));
        }
        None
    }

    /// The price per node-hour of `offer` on `market`, if it is sold there within the limit.
    pub fn price(&self, offer: &Offer, market: Market) -> Option<f64> {
        let price = offer.price(market)?;
        match self.max_price_per_hour {
            Some(limit) if price > limit => None,
            _ => Some(price),
        }
    }

    /// A short description for messages: "2 x H100:8 (spot-if-available)".
    pub fn describe(&self) -> String {
        let what = match (&self.accelerator, self.vcpus, self.memory_gb) {
            (Some(a), _, _) => a.to_string(),
            (None, None, None) => "any size".into(),
            (None, v, m) => {
                let mut parts = Vec::new();
                if let Some(v) = v {
                    parts.push(format!("{v} vCPUs"));
                }
                if let Some(m) = m {
                    parts.push(format!("{m} GB"));
                }
                parts.join(", ")
            }
        };
        let allocation = match self.allocation {
            Allocation::Spot => "spot",
            Allocation::OnDemand => "on-demand",
            Allocation::SpotIfAvailable => "spot-if-available",
        };
        format!("{} x {what} ({allocation})", self.nodes)
    }
}

/// Refuses a pool life (`ttl`) longer than the pool's certificates last
/// ([`POOL_CERT_LIFE`](skyward_common::identity::POOL_CERT_LIFE)): `setting` names it as the
/// user gave it (`--ttl`, `ttl`).
pub fn check_ttl(ttl: Option<Duration>, setting: &str) -> Result<(), String> {
    let most = skyward_common::identity::POOL_CERT_LIFE;
    match ttl {
        Some(ttl) if ttl > most => Err(format!(
            "{setting} of {} days is longer than a pool's certificates last ({} days): give {setting} {}d or less",
            ttl.as_secs() / 86400,
            most.as_secs() / 86400,
            most.as_secs() / 86400,
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_may_not_outlive_its_certificates() {
        let most = skyward_common::identity::POOL_CERT_LIFE;
        assert_eq!(check_ttl(None, "--ttl"), Ok(()));
        assert_eq!(check_ttl(Some(most), "--ttl"), Ok(()));
        assert_eq!(
            check_ttl(Some(most + Duration::from_secs(86400)), "--ttl").unwrap_err(),
            "--ttl of 3651 days is longer than a pool's certificates last (3650 days): give --ttl 3650d or less"
        );
    }
    use crate::offer::OfferedAccelerator;

    fn offer(accel: Option<(&str, u32)>, vcpus: u32, memory_gb: f64) -> Offer {
        Offer {
            provider: "p".into(),
            region: "r1".into(),
            instance_type: "t".into(),
            accelerator: accel.map(|(name, count)| OfferedAccelerator {
                accelerator: catalog::identify(name, None).unwrap(),
                count,
            }),
            vcpus,
            memory_gb,
            on_demand_per_hour: Some(2.0),
            spot_per_hour: Some(0.5),
            available: true,
            spot_available: None,
            provider_ref: String::new(),
        }
    }

    #[test]
    fn accelerator_requests_parse_with_counts() {
        let r: AcceleratorRequest = "H100:8".parse().unwrap();
        assert_eq!((r.accelerator.name, r.count), ("H100", 8));
        let r: AcceleratorRequest = "RTX 4090".parse().unwrap();
        assert_eq!((r.accelerator.name, r.count), ("RTX 4090", 1));
        assert!("H100:0"
            .parse::<AcceleratorRequest>()
            .unwrap_err()
            .contains("at least 1"));
        assert!("H100:x"
            .parse::<AcceleratorRequest>()
            .unwrap_err()
            .contains("H100:8"));
        assert!("Z9"
            .parse::<AcceleratorRequest>()
            .unwrap_err()
            .contains("unknown accelerator"));
    }

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_memory_gb("8GB"), Ok(8.0));
        assert_eq!(parse_memory_gb("8"), Ok(8.0));
        assert_eq!(parse_memory_gb("512MB"), Ok(0.512));
        assert!((parse_memory_gb("16GiB").unwrap() - 17.18).abs() < 0.01);
        assert!(parse_memory_gb("lots").unwrap_err().contains("8GB"));
        assert!(parse_memory_gb("-1G").is_err());
    }

    #[test]
    fn offers_are_matched_against_the_spec() {
        let mut spec = PoolSpec::new(1).accelerator("H100:8".parse().unwrap());
        assert_eq!(spec.mismatch(&offer(Some(("H100", 8)), 96, 1000.0)), None);
        assert_eq!(
            spec.mismatch(&offer(Some(("H100", 1)), 26, 200.0)).unwrap(),
            "has 1 H100, not 8"
        );
        assert_eq!(
            spec.mismatch(&offer(Some(("A100", 8)), 96, 1000.0))
                .unwrap(),
            "has A100, not H100"
        );
        assert_eq!(
            spec.mismatch(&offer(None, 4, 8.0)).unwrap(),
            "has no accelerator"
        );
        let mut texas = offer(Some(("H100", 8)), 96, 1000.0);
        texas.region = "Texas, US".into();
        spec.region = Some("us".into());
        assert_eq!(spec.mismatch(&texas), None);
        spec.region = Some("R2".into());
        assert_eq!(
            spec.mismatch(&offer(Some(("H100", 8)), 96, 1000.0))
                .unwrap(),
            "is in r1"
        );

        let mut cpu = PoolSpec::new(1);
        cpu.vcpus = Some(4);
        cpu.memory_gb = Some(8.0);
        assert_eq!(cpu.mismatch(&offer(None, 4, 8.0)), None);
        assert_eq!(cpu.mismatch(&offer(None, 2, 8.0)).unwrap(), "has 2 vCPUs");
        assert_eq!(
            cpu.mismatch(&offer(None, 4, 4.0)).unwrap(),
            "has 4 GB of memory"
        );
    }

    #[test]
    fn price_limits_apply_per_market() {
        let mut spec = PoolSpec::new(1);
        let o = offer(None, 4, 8.0);
        assert_eq!(spec.price(&o, Market::OnDemand), Some(2.0));
        spec.max_price_per_hour = Some(1.0);
        assert_eq!(spec.price(&o, Market::OnDemand), None);
        assert_eq!(spec.price(&o, Market::Spot), Some(0.5));
    }

    #[test]
    fn allocations_parse_and_order_markets() {
        assert_eq!("spot-if-available".parse(), Ok(Allocation::SpotIfAvailable));
        assert_eq!(
            Allocation::SpotIfAvailable.markets(),
            &[Market::Spot, Market::OnDemand]
        );
        assert!("cheap"
            .parse::<Allocation>()
            .unwrap_err()
            .contains("spot-if-available"));
    }
}
