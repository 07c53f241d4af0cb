//! What a node reports about itself when it connects.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub hostname: String,
    /// e.g. "Debian GNU/Linux 12 (bookworm)".
    pub os: String,
    pub kernel: String,
    pub arch: String,
    pub cpu_count: u32,
    pub cpu_model: String,
    pub memory_bytes: u64,
    /// Size and free space of the file system holding the agent's work dir.
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
    pub interfaces: Vec<NetworkInterface>,
    pub gpus: Vec<Gpu>,
    pub agent_version: String,
    /// AWS Inferentia/Trainium devices. Last, so that the fields before it keep their places
    /// in the binary encoding; absent in JSON from agents that predate it.
    #[serde(default)]
    pub neuron_devices: Vec<NeuronDevice>,
    /// The outcome of the MIG layout the pool asked for (`--mig`); `None` when it asked for
    /// none. Appended after `neuron_devices` for the same reason.
    #[serde(default)]
    pub mig: Option<MigLayoutReport>,
}

/// What became of a MIG layout (`1g.10gb`, `3g.40gb,2g.20gb,1g.10gb`), which the agent
/// applies to every GPU at startup, before it reads the rest of its inventory: the MIG
/// devices it made are in [`Gpu::mig_devices`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigLayoutReport {
    /// The layout as asked for.
    pub requested: String,
    /// Why the layout is not in place on every GPU, in one line naming each GPU that refused
    /// (no MIG support, an unknown profile, a mode change awaiting a reset); `None` when it
    /// is. A pool whose node reports an error here cannot have the layout it asked for.
    pub error: Option<String>,
    /// The GPUs the agent repartitioned; a GPU that already had the layout (an agent
    /// restart) is left alone and not listed.
    pub changed_gpus: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub utilization_percent: Option<u32>,
    pub driver_version: String,
    pub cuda_version: String,
    pub mig_mode_current: Option<bool>,
    pub mig_mode_pending: Option<bool>,
    pub mig_devices: Vec<MigDevice>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigDevice {
    /// `MIG-...`
    pub uuid: String,
    /// e.g. `1g.10gb`.
    pub profile: String,
    pub memory_bytes: u64,
    pub parent_gpu_index: u32,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
}

/// One AWS Neuron device (Inferentia or Trainium), from `neuron-ls` or, without it, from its
/// `/dev/neuronN` file alone (then only `index` is known).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeuronDevice {
    pub index: u32,
    /// NeuronCores on the device; 0 when unknown.
    #[serde(default)]
    pub core_count: u32,
    /// Device memory; 0 when unknown.
    #[serde(default)]
    pub memory_bytes: u64,
    /// PCI address, e.g. `00:1e.0`; empty when unknown.
    #[serde(default)]
    pub pci_bdf: String,
    /// Indices of the devices it has a direct link to.
    #[serde(default)]
    pub connected_to: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_accelerator_inventory_round_trips_within_a_control_frame() {
        // 8 GPUs with 7 MIG devices each, and 16 Neuron devices: more than any node has.
        let inventory = Inventory {
            gpus: (0..8)
                .map(|index| Gpu {
                    index,
                    uuid: format!("GPU-{index:08}-0000-0000-0000-000000000000"),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_bytes: 81559 << 20,
                    mig_mode_current: Some(true),
                    mig_mode_pending: Some(true),
                    mig_devices: (0..7)
                        .map(|i| MigDevice {
                            uuid: format!("MIG-{index:04}{i:04}-0000-0000-0000-000000000000"),
                            profile: "1g.10gb".into(),
                            memory_bytes: 9984 << 20,
                            parent_gpu_index: index,
                            gpu_instance_id: 7 + i,
                            compute_instance_id: 0,
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            neuron_devices: (0..16)
                .map(|index| NeuronDevice {
                    index,
                    core_count: 8,
                    memory_bytes: 96 << 30,
                    pci_bdf: "cc:00.0".into(),
                    connected_to: vec![(index + 1) % 16, (index + 15) % 16],
                })
                .collect(),
            mig: Some(MigLayoutReport {
                requested: "1g.10gb".into(),
                error: None,
                changed_gpus: (0..8).collect(),
            }),
            ..Default::default()
        };
        let bytes = crate::codec::encode(&inventory).unwrap();
        assert!(
            bytes.len() < crate::limits::MAX_CONTROL_FRAME / 4,
            "{}",
            bytes.len()
        );
        let back: Inventory = crate::codec::decode(&bytes).unwrap();
        assert_eq!(back, inventory);
    }
}
