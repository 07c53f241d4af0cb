//! The one accelerator catalog: names and aliases users type, and how each provider's own
//! naming ("nvidia_h100", "H100 SXM", "1x H100 SXM5 80GB", GpuInfo "H100") maps onto them.
//!
//! Vendor strings are matched by model token: the string is normalised (upper case, no
//! spaces, dashes or underscores) and the longest catalog token it contains wins, so "A10G"
//! is not an "A10", "L40S" is not an "L4" and "GB200" is not a "B200".

/// What kind of device an accelerator is (decides how the agent finds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    NvidiaGpu,
    AmdGpu,
    AwsNeuron,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Accelerator {
    /// The canonical name, as shown in tables.
    pub name: &'static str,
    /// Other names users type for it.
    pub aliases: &'static [&'static str],
    /// The model token vendor strings contain (normalised form).
    pub token: &'static str,
    /// Memory per device in GB, as sold.
    pub memory_gb: u32,
    /// For variants told apart by memory (A100 40 GB vs 80 GB): the least memory that counts.
    pub min_memory_gb: Option<u32>,
    pub kind: DeviceKind,
    /// Whether the device can be partitioned with MIG.
    pub mig: bool,
}

macro_rules! accel {
    ($name:literal, [$($alias:literal),*], $token:literal, $mem:literal, $min:expr, $kind:ident, $mig:literal) => {
        Accelerator {
            name: $name,
            aliases: &[$($alias),*],
            token: $token,
            memory_gb: $mem,
            min_memory_gb: $min,
            kind: DeviceKind::$kind,
            mig: $mig,
        }
    };
}

/// Every accelerator Skyward knows, most specific variants first where tokens are shared.
pub static CATALOG: &[Accelerator] = &[
    accel!(
        "GB200",
        ["GB200-NVL72"],
        "GB200",
        186,
        None,
        NvidiaGpu,
        true
    ),
    accel!("B200", [], "B200", 180, None, NvidiaGpu, true),
    accel!("H200", ["H200-141GB"], "H200", 141, None, NvidiaGpu, true),
    accel!(
        "H100",
        ["H100-80GB", "H100-SXM", "H100-PCIE", "H100-NVL"],
        "H100",
        80,
        None,
        NvidiaGpu,
        true
    ),
    accel!(
        "A100-80GB",
        ["A100-SXM4-80GB", "A100-80G"],
        "A100",
        80,
        Some(80),
        NvidiaGpu,
        true
    ),
    accel!(
        "A100",
        ["A100-40GB", "A100-SXM4", "A100-PCIE"],
        "A100",
        40,
        None,
        NvidiaGpu,
        true
    ),
    accel!("L40S", [], "L40S", 48, None, NvidiaGpu, false),
    accel!("L40", [], "L40", 48, None, NvidiaGpu, false),
    accel!("L4", [], "L4", 24, None, NvidiaGpu, false),
    accel!("A10G", [], "A10G", 24, None, NvidiaGpu, false),
    accel!("A10", [], "A10", 24, None, NvidiaGpu, false),
    accel!("A6000", ["RTX-A6000"], "A6000", 48, None, NvidiaGpu, false),
    accel!("A40", [], "A40", 48, None, NvidiaGpu, false),
    accel!(
        "V100",
        ["V100-16GB", "V100-32GB"],
        "V100",
        16,
        None,
        NvidiaGpu,
        false
    ),
    accel!("T4", [], "T4", 16, None, NvidiaGpu, false),
    accel!(
        "RTX 6000 Ada",
        ["RTX 6000", "RTX6000 ADA GENERATION"],
        "RTX6000ADA",
        48,
        None,
        NvidiaGpu,
        false
    ),
    accel!(
        "RTX 5090",
        ["GeForce RTX 5090"],
        "RTX5090",
        32,
        None,
        NvidiaGpu,
        false
    ),
    accel!(
        "RTX 4090",
        ["GeForce RTX 4090"],
        "RTX4090",
        24,
        None,
        NvidiaGpu,
        false
    ),
    accel!(
        "RTX 3090",
        ["GeForce RTX 3090"],
        "RTX3090",
        24,
        None,
        NvidiaGpu,
        false
    ),
    accel!("MI300X", ["AMD-MI300X"], "MI300X", 192, None, AmdGpu, false),
    accel!("MI325X", [], "MI325X", 256, None, AmdGpu, false),
    accel!(
        "Trainium",
        ["TRN1", "TRAINIUM1"],
        "TRAINIUM",
        32,
        None,
        AwsNeuron,
        false
    ),
    accel!(
        "Trainium2",
        ["TRN2"],
        "TRAINIUM2",
        96,
        None,
        AwsNeuron,
        false
    ),
    accel!(
        "Inferentia",
        ["INF1", "INFERENTIA1"],
        "INFERENTIA",
        8,
        None,
        AwsNeuron,
        false
    ),
    accel!(
        "Inferentia2",
        ["INF2"],
        "INFERENTIA2",
        32,
        None,
        AwsNeuron,
        false
    ),
];

/// Uppercase, with spaces, dashes, underscores and dots removed.
pub fn normalise(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ' ' | '-' | '_' | '.'))
        .flat_map(char::to_uppercase)
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {name:?}: known ones are {}", known())]
pub struct UnknownAccelerator {
    pub name: String,
}

fn known() -> String {
    CATALOG
        .iter()
        .map(|a| a.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Looks an accelerator up by the name or alias a user typed (any case, spaces or dashes).
pub fn find(name: &str) -> Result<&'static Accelerator, UnknownAccelerator> {
    let wanted = normalise(name);
    CATALOG
        .iter()
        .find(|a| {
            normalise(a.name) == wanted || a.aliases.iter().any(|alias| normalise(alias) == wanted)
        })
        .ok_or_else(|| UnknownAccelerator {
            name: name.to_string(),
        })
}

/// Which accelerator a provider's own name for a device is, given its memory where known.
pub fn identify(vendor_name: &str, memory_gb: Option<f64>) -> Option<&'static Accelerator> {
    let text = normalise(vendor_name);
    let token = CATALOG
        .iter()
        .filter(|a| text.contains(a.token))
        .map(|a| a.token)
        .max_by_key(|t| t.len())?;
    // Among entries sharing the token, the most specific one whose memory floor is met.
    CATALOG
        .iter()
        .filter(|a| a.token == token)
        .find(|a| match (a.min_memory_gb, memory_gb) {
            (Some(floor), Some(mem)) => mem + 0.5 >= floor as f64,
            (Some(_), None) => false,
            (None, _) => true,
        })
}

impl Accelerator {
    /// Whether a device identified as `offered` satisfies a request for `self`: the same
    /// model, and at least the memory a memory-specific name asks for.
    pub fn satisfied_by(&self, offered: &Accelerator) -> bool {
        offered.token == self.token && offered.memory_gb >= self.min_memory_gb.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_names_and_aliases_resolve() {
        assert_eq!(find("h100").unwrap().name, "H100");
        assert_eq!(find("RTX 4090").unwrap().name, "RTX 4090");
        assert_eq!(find("rtx4090").unwrap().name, "RTX 4090");
        assert_eq!(find("a100-80gb").unwrap().name, "A100-80GB");
        assert_eq!(find("trn1").unwrap().name, "Trainium");
        let err = find("H1000").unwrap_err();
        assert!(err.to_string().contains("known ones are GB200"), "{err}");
    }

    #[test]
    fn vendor_strings_map_onto_the_catalog() {
        let name = |s, mem| identify(s, mem).map(|a| a.name);
        // DigitalOcean gpu_info.model, VastAI gpu_name, Verda descriptions, AWS GpuInfo.
        assert_eq!(name("nvidia_h100", Some(80.0)), Some("H100"));
        assert_eq!(name("H100 SXM", None), Some("H100"));
        assert_eq!(name("1x H200 SXM5 141GB", Some(141.0)), Some("H200"));
        assert_eq!(name("A100", Some(40.0)), Some("A100"));
        assert_eq!(name("A100", Some(80.0)), Some("A100-80GB"));
        assert_eq!(name("A100_PCIE", None), Some("A100"));
        assert_eq!(name("A10G", Some(24.0)), Some("A10G"));
        assert_eq!(name("L40S", None), Some("L40S"));
        assert_eq!(name("L4", None), Some("L4"));
        assert_eq!(name("GB200", None), Some("GB200"));
        assert_eq!(name("RTX 4090", None), Some("RTX 4090"));
        assert_eq!(name("Instinct MI300X", None), Some("MI300X"));
        assert_eq!(name("GeForce GTX 1080", None), None);
    }

    #[test]
    fn a_memory_specific_request_is_not_met_by_the_smaller_variant() {
        let a100_80 = find("A100-80GB").unwrap();
        let a100 = find("A100").unwrap();
        assert!(a100.satisfied_by(identify("A100", Some(80.0)).unwrap()));
        assert!(a100.satisfied_by(identify("A100", Some(40.0)).unwrap()));
        assert!(a100_80.satisfied_by(identify("A100", Some(80.0)).unwrap()));
        assert!(!a100_80.satisfied_by(identify("A100", Some(40.0)).unwrap()));
        assert!(!find("H100")
            .unwrap()
            .satisfied_by(identify("H200", None).unwrap()));
    }

    #[test]
    fn every_name_and_alias_is_unique() {
        let mut seen = std::collections::HashSet::new();
        for a in CATALOG {
            for n in std::iter::once(a.name).chain(a.aliases.iter().copied()) {
                assert!(seen.insert(normalise(n)), "{n} appears twice");
            }
        }
    }
}
