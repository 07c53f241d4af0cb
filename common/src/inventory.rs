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
