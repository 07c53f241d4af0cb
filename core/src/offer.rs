//! Offers: what a provider can start right now, at what price.

use crate::catalog::Accelerator;

/// How an instance is paid for once chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Market {
    Spot,
    OnDemand,
}

impl std::fmt::Display for Market {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Market::Spot => "spot",
            Market::OnDemand => "on-demand",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OfferedAccelerator {
    pub accelerator: &'static Accelerator,
    /// Devices per node.
    pub count: u32,
}

/// Shown as `{"name": "H100", "count": 8, "memory_gb": 80}`: the catalog entry's name, not
/// the whole entry.
impl serde::Serialize for OfferedAccelerator {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("OfferedAccelerator", 3)?;
        s.serialize_field("name", self.accelerator.name)?;
        s.serialize_field("count", &self.count)?;
        s.serialize_field("memory_gb", &self.accelerator.memory_gb)?;
        s.end()
    }
}

/// One kind of node a provider can start: its size, place and prices per node-hour (USD).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Offer {
    pub provider: String,
    pub region: String,
    /// The provider's name for the size (instance type, size slug, offer).
    pub instance_type: String,
    pub accelerator: Option<OfferedAccelerator>,
    pub vcpus: u32,
    pub memory_gb: f64,
    pub on_demand_per_hour: Option<f64>,
    pub spot_per_hour: Option<f64>,
    /// Whether the provider reports capacity for it now (true where it cannot tell); for
    /// on-demand, and for spot too unless `spot_available` says otherwise.
    pub available: bool,
    /// Spot capacity, where the provider reports it apart from on-demand capacity.
    pub spot_available: Option<bool>,
    /// Whatever else the provider needs to start it (an offer id, an image); opaque here.
    pub provider_ref: String,
}

impl Offer {
    /// Whether `other` is the same machine type in the same place at the same provider.
    pub fn same_as(&self, other: &Offer) -> bool {
        self.provider == other.provider
            && self.region == other.region
            && self.instance_type == other.instance_type
    }

    pub fn price(&self, market: Market) -> Option<f64> {
        match market {
            Market::Spot => self.spot_per_hour,
            Market::OnDemand => self.on_demand_per_hour,
        }
    }

    /// Whether there is capacity for it on `market` now, as far as the provider can tell.
    pub fn available_on(&self, market: Market) -> bool {
        match market {
            Market::Spot => self.spot_available.unwrap_or(self.available),
            Market::OnDemand => self.available,
        }
    }

    /// "H100:8" or "cpu" for tables.
    pub fn accelerator_label(&self) -> String {
        match &self.accelerator {
            Some(a) if a.count == 1 => a.accelerator.name.to_string(),
            Some(a) => format!("{}:{}", a.accelerator.name, a.count),
            None => "-".into(),
        }
    }
}
