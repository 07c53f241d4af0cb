//! What this node is: read from /proc, /etc and the system, never guessed. Accelerators come
//! from [`crate::gpu`] (NVIDIA, through NVML or `nvidia-smi`) and [`crate::neuron`] (AWS).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use skyward_common::inventory::{Gpu, Inventory, NetworkInterface, NeuronDevice};
use skyward_common::protocol::Health;

/// Read once per connection. Accelerator detection may run tools for seconds, never longer
/// than [`ACCELERATOR_BUDGET`] (GPUs, MIG devices, Neuron devices).
pub fn collect(work_dir: &Path) -> Inventory {
    let (disk_total_bytes, disk_available_bytes) = disk_space(work_dir).unwrap_or((0, 0));
    let (gpus, neuron_devices) = accelerators();
    Inventory {
        hostname: hostname(),
        os: os_release().unwrap_or_else(|| std::env::consts::OS.to_string()),
        kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        cpu_count: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        cpu_model: cpu_model().unwrap_or_default(),
        memory_bytes: meminfo_kib("MemTotal:").unwrap_or(0) * 1024,
        disk_total_bytes,
        disk_available_bytes,
        interfaces: interfaces(),
        gpus,
        agent_version: skyward_common::VERSION.to_string(),
        neuron_devices,
        mig: crate::mig::startup_report(),
    }
}

/// How long accelerator detection (NVML, `nvidia-smi`, `neuron-ls`, all together) may take
/// before the node reports what it found so far. Below
/// [`HELLO_TIMEOUT`](skyward_common::limits::HELLO_TIMEOUT) with room to spare:
/// the session collects the inventory after opening its connection, and a coordinator waits
/// that long for the hello before it drops the connection.
pub const ACCELERATOR_BUDGET: Duration = Duration::from_secs(8);

/// GPUs and Neuron devices, within [`ACCELERATOR_BUDGET`]. This blocks: the session calls
/// [`collect`] on a blocking thread, before it connects.
fn accelerators() -> (Vec<Gpu>, Vec<NeuronDevice>) {
    let deadline = Instant::now() + ACCELERATOR_BUDGET;
    (
        crate::gpu::detect(deadline),
        crate::neuron::detect(deadline),
    )
}

/// `held` and `waiting`: the tasks' unacknowledged output, and how many wait for room.
pub fn health(running_tasks: u32, held: u64, waiting: u32) -> Health {
    Health {
        running_tasks,
        output_held_bytes: held,
        tasks_waiting_for_room: waiting,
        load_avg_1m: read_trimmed("/proc/loadavg")
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0),
        memory_available_bytes: meminfo_kib("MemAvailable:").unwrap_or(0) * 1024,
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn os_release() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    parse_os_release(&text)
}

fn parse_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn disk_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into the zeroed struct we own.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    let block = stat.f_frsize as u64;
    Some((stat.f_blocks as u64 * block, stat.f_bavail as u64 * block))
}

fn interfaces() -> Vec<NetworkInterface> {
    let mut by_name: BTreeMap<String, Vec<std::net::IpAddr>> = BTreeMap::new();
    for iface in if_addrs::get_if_addrs().unwrap_or_default() {
        by_name
            .entry(iface.name.clone())
            .or_default()
            .push(iface.ip());
    }
    by_name
        .into_iter()
        .map(|(name, addresses)| NetworkInterface { name, addresses })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let inv = collect(Path::new("/"));
        assert!(inv.cpu_count >= 1);
        assert!(inv.memory_bytes > 0);
        assert!(inv.disk_total_bytes > 0);
        assert!(!inv.hostname.is_empty());
        assert!(inv
            .interfaces
            .iter()
            .any(|i| i.addresses.iter().any(|a| a.is_loopback())));
    }

    #[test]
    fn accelerator_detection_ends_well_before_the_coordinator_gives_up_on_the_hello() {
        assert!(
            ACCELERATOR_BUDGET + Duration::from_secs(2) <= skyward_common::limits::HELLO_TIMEOUT
        );
    }

    #[test]
    fn os_release_pretty_name() {
        let text = "NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            parse_os_release(text).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
    }
}
