//! NVIDIA GPUs and their MIG devices, as the node reports them when it connects.
//!
//! NVML first: `nvml-wrapper` loads libnvidia-ml at run time (dlopen), so an agent on a
//! machine without the driver still starts and simply finds nothing. When NVML cannot be
//! loaded, `nvidia-smi` on PATH is asked instead and its output parsed by pattern (its
//! formats vary by driver). Every tool run has a deadline and an output cap
//! ([`crate::tool`]); a failure yields an empty list and a warning, never a refused start.
//!
//! `SKYWARD_NVML=off` skips NVML and goes straight to `nvidia-smi`: the end-to-end tests set
//! it, with a fake `nvidia-smi` first on PATH, so that they exercise the fallback the same
//! way on machines with and without a GPU.

use std::collections::BTreeMap;
use std::time::Instant;

use skyward_common::inventory::{Gpu, MigDevice};

use crate::tool::{self, ToolError};

/// Set to `off` (or `0`, `false`, `no`) to skip NVML and use `nvidia-smi` only.
pub const NVML_ENV: &str = "SKYWARD_NVML";
const MIB: u64 = 1024 * 1024;

/// Every `--query-gpu` field the inventory uses; older drivers lack some of them.
const QUERY_FIELDS: &[&str] = &[
    "index",
    "uuid",
    "name",
    "memory.total",
    "memory.used",
    "utilization.gpu",
    "driver_version",
    "mig.mode.current",
    "mig.mode.pending",
];
/// What every driver since long before MIG answers.
const MINIMAL_FIELDS: &[&str] = &["index", "uuid", "name", "memory.total"];

/// The GPUs of this machine, found before `deadline`; empty when it has none or none could
/// be read in time.
pub fn detect(deadline: Instant) -> Vec<Gpu> {
    if nvml_enabled() {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match nvml::detect_bounded(timeout) {
            nvml::Outcome::Gpus(gpus) => return gpus,
            nvml::Outcome::Unavailable(reason) => {
                tracing::debug!("NVML unavailable ({reason}); asking nvidia-smi");
            }
            nvml::Outcome::TimedOut => {
                // nvidia-smi goes through NVML too: it would hang the same way.
                tracing::warn!(
                    "GPU inventory: NVML did not answer within {timeout:?}; reporting no GPUs"
                );
                return Vec::new();
            }
        }
    }
    match detect_with(&mut |args| tool::run_until("nvidia-smi", args, deadline)) {
        Ok(gpus) => gpus,
        Err(ToolError::NotFound(_)) => {
            tracing::debug!("no NVML and no nvidia-smi: no NVIDIA GPUs");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!("GPU inventory: {e}; reporting no GPUs");
            Vec::new()
        }
    }
}

fn nvml_enabled() -> bool {
    std::env::var(NVML_ENV).map_or(true, |v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "off" | "0" | "false" | "no"
        )
    })
}

/// The `nvidia-smi` fallback, with `run` standing for `nvidia-smi ARGS` (tests replay
/// captured outputs through it). Errs only when not even the GPU list could be read.
pub fn detect_with(
    run: &mut dyn FnMut(&[&str]) -> Result<String, ToolError>,
) -> Result<Vec<Gpu>, ToolError> {
    let mut gpus = query_gpus(run)?;
    if gpus.is_empty() {
        return Ok(gpus);
    }
    // The banner: the CUDA version (no query field has it) and the MIG device table.
    let banner = match run(&[]) {
        Ok(text) => parse_banner(&text),
        Err(e) if e.is_fatal() => {
            tracing::warn!(
                "GPU inventory: {e}; GPUs reported without CUDA version and MIG devices"
            );
            return Ok(gpus);
        }
        Err(e) => {
            tracing::debug!("nvidia-smi banner: {e}");
            Banner::default()
        }
    };
    for gpu in &mut gpus {
        if let Some(cuda) = &banner.cuda_version {
            gpu.cuda_version = cuda.clone();
        }
        if gpu.driver_version.is_empty() {
            gpu.driver_version = banner.driver_version.clone().unwrap_or_default();
        }
    }
    if gpus.iter().any(|g| g.mig_mode_current == Some(true)) {
        if let Err(e) = add_mig_devices(&mut gpus, &banner, run) {
            tracing::warn!("GPU inventory: MIG devices: {e}");
        }
    }
    Ok(gpus)
}

/// `--query-gpu` with every field, dropping a field an older driver refuses and, for a
/// failure that names none, trying once with the minimal set.
pub(crate) fn query_gpus(
    run: &mut dyn FnMut(&[&str]) -> Result<String, ToolError>,
) -> Result<Vec<Gpu>, ToolError> {
    let mut fields: Vec<&str> = QUERY_FIELDS.to_vec();
    let mut tried_minimal = false;
    loop {
        let query = format!("--query-gpu={}", fields.join(","));
        let e = match run(&[&query, "--format=csv,noheader,nounits"]) {
            Ok(text) => return Ok(parse_query_gpu(&text, &fields)),
            Err(e) => e,
        };
        if e.is_fatal() {
            return Err(e);
        }
        if e.output().contains("No devices were found") {
            return Ok(Vec::new());
        }
        match invalid_field(e.output()) {
            Some(bad) if bad != "index" && fields.contains(&bad) => {
                tracing::debug!("nvidia-smi does not know {bad}; asking without it");
                fields.retain(|f| *f != bad);
            }
            _ if !tried_minimal && fields != MINIMAL_FIELDS => {
                tried_minimal = true;
                fields = MINIMAL_FIELDS.to_vec();
            }
            _ => return Err(e),
        }
    }
}

/// The field named by `Field "mig.mode.current" is not a valid field to query.`
fn invalid_field(message: &str) -> Option<&str> {
    let start = message.find("Field \"")? + "Field \"".len();
    let len = message[start..].find('"')?;
    Some(&message[start..start + len])
}

/// Attaches each GPU's MIG devices from `nvidia-smi -L`, with ids and memory from the
/// banner's MIG table or, without one, from `nvidia-smi mig -lci` / `-lgi` and `-lgip`.
fn add_mig_devices(
    gpus: &mut [Gpu],
    banner: &Banner,
    run: &mut dyn FnMut(&[&str]) -> Result<String, ToolError>,
) -> Result<(), ToolError> {
    let listed = parse_list(&run(&["-L"])?);
    // Each device, and whether its ids are known yet.
    let mut migs: Vec<(MigDevice, bool)> = Vec::new();
    for gpu in &listed {
        for mig in &gpu.migs {
            let mut device = MigDevice {
                uuid: mig.uuid.clone(),
                profile: mig.profile.clone(),
                parent_gpu_index: gpu.index,
                ..Default::default()
            };
            let row = banner
                .mig_devices
                .iter()
                .find(|r| r.gpu == gpu.index && r.device == mig.device);
            let ids = row
                .map(|r| (r.gpu_instance_id, r.compute_instance_id))
                .or(mig.ids);
            if let Some((gi, ci)) = ids {
                device.gpu_instance_id = gi;
                device.compute_instance_id = ci;
            }
            device.memory_bytes = row.map_or(0, |r| r.memory_total_bytes);
            migs.push((device, ids.is_some()));
        }
    }
    if migs.iter().any(|(m, known)| !known || m.memory_bytes == 0) {
        fill_from_mig_listings(&mut migs, run)?;
    }
    for gpu in gpus.iter_mut() {
        gpu.mig_devices = migs
            .iter()
            .filter(|(m, _)| m.parent_gpu_index == gpu.index)
            .map(|(m, _)| m.clone())
            .collect();
    }
    Ok(())
}

/// Ids and memory for MIG devices the banner did not place. `-L` does not say which GPU
/// and compute instance a device is, so devices of one profile on one GPU are matched with
/// that profile's instances in id order: exact when a profile appears once, and in any case
/// a consistent set of ids (the UUID is what selects a device).
fn fill_from_mig_listings(
    migs: &mut [(MigDevice, bool)],
    run: &mut dyn FnMut(&[&str]) -> Result<String, ToolError>,
) -> Result<(), ToolError> {
    if migs.iter().any(|(_, known)| !known) {
        let mut instances: Vec<(u32, String, u32, u32)> = match run(&["mig", "-lci"]) {
            Ok(text) => parse_mig_lci(&text)
                .into_iter()
                .map(|c| (c.gpu, c.profile, c.gpu_instance_id, c.instance_id))
                .collect(),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                tracing::debug!("nvidia-smi mig -lci: {e}");
                Vec::new()
            }
        };
        if instances.is_empty() {
            instances = match run(&["mig", "-lgi"]) {
                Ok(text) => parse_mig_lgi(&text)
                    .into_iter()
                    .map(|g| (g.gpu, g.profile, g.instance_id, 0))
                    .collect(),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    tracing::debug!("nvidia-smi mig -lgi: {e}");
                    Vec::new()
                }
            };
        }
        instances.sort();
        let mut taken = vec![false; instances.len()];
        for (mig, known) in migs.iter_mut().filter(|(_, known)| !known) {
            let found = instances
                .iter()
                .enumerate()
                .position(|(i, (gpu, profile, ..))| {
                    !taken[i] && *gpu == mig.parent_gpu_index && *profile == mig.profile
                });
            if let Some(i) = found {
                taken[i] = true;
                mig.gpu_instance_id = instances[i].2;
                mig.compute_instance_id = instances[i].3;
                *known = true;
            }
        }
    }
    if migs.iter().any(|(m, _)| m.memory_bytes == 0) {
        let memory: BTreeMap<(u32, String), u64> = match run(&["mig", "-lgip"]) {
            Ok(text) => parse_mig_lgip(&text)
                .into_iter()
                .map(|p| ((p.gpu, p.profile), p.memory_bytes))
                .collect(),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                tracing::debug!("nvidia-smi mig -lgip: {e}");
                BTreeMap::new()
            }
        };
        for (mig, _) in migs.iter_mut().filter(|(m, _)| m.memory_bytes == 0) {
            if let Some(bytes) = memory.get(&(mig.parent_gpu_index, mig.profile.clone())) {
                mig.memory_bytes = *bytes;
            }
        }
    }
    Ok(())
}

// ---- Parsers: pure functions from a tool's output to model values. ----

/// A `--query-gpu=... --format=csv[,noheader][,nounits]` answer. `fields` names the columns
/// asked for; a header line, when present, names them instead (units in brackets dropped).
/// Values that are `[N/A]`, `[Not Supported]` and the like stay empty.
pub fn parse_query_gpu(text: &str, fields: &[&str]) -> Vec<Gpu> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut columns: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
    let mut first = lines.next();
    if let Some(line) = first {
        let cells = split_csv(line);
        if cells.first().is_some_and(|c| c.parse::<u32>().is_err()) {
            columns = cells
                .iter()
                .map(|c| c.split(" [").next().unwrap_or(c).trim().to_string())
                .collect();
            first = None;
        }
    }
    let mut gpus = Vec::new();
    for (row, line) in first.into_iter().chain(lines).enumerate() {
        let mut cells = split_csv(line);
        if cells.len() < columns.len() {
            tracing::debug!("nvidia-smi row with too few values: {line:?}");
            continue;
        }
        // A name with a comma in it: give the surplus back to the name.
        if cells.len() > columns.len() {
            if let Some(at) = columns.iter().position(|c| c == "name") {
                let extra = cells.len() - columns.len();
                let joined = cells[at..=at + extra].join(", ");
                cells.splice(at..=at + extra, [joined]);
            } else {
                continue;
            }
        }
        let mut gpu = Gpu {
            index: row as u32,
            ..Default::default()
        };
        for (column, cell) in columns.iter().zip(&cells) {
            let Some(value) = known(cell) else { continue };
            match column.as_str() {
                "index" => gpu.index = number(value).map_or(gpu.index, |n| n as u32),
                "uuid" => gpu.uuid = value.to_string(),
                "name" => gpu.name = value.to_string(),
                "memory.total" => gpu.memory_total_bytes = mebibytes(value).unwrap_or(0),
                "memory.used" => gpu.memory_used_bytes = mebibytes(value).unwrap_or(0),
                "utilization.gpu" => gpu.utilization_percent = number(value).map(|n| n as u32),
                "driver_version" => gpu.driver_version = value.to_string(),
                "mig.mode.current" => gpu.mig_mode_current = mig_mode(value),
                "mig.mode.pending" => gpu.mig_mode_pending = mig_mode(value),
                _ => {}
            }
        }
        gpus.push(gpu);
    }
    gpus
}

fn split_csv(line: &str) -> Vec<String> {
    line.split(',').map(|c| c.trim().to_string()).collect()
}

/// The value, or `None` for what nvidia-smi prints when it has none: `[N/A]`,
/// `[Not Supported]`, `[Unknown Error]`, `[Insufficient Permissions]`, `N/A`, empty.
fn known(cell: &str) -> Option<&str> {
    let v = cell.trim();
    let lower = v.to_ascii_lowercase();
    if v.is_empty()
        || v.starts_with('[')
        || lower == "n/a"
        || lower == "not supported"
        || lower == "unknown error"
    {
        None
    } else {
        Some(v)
    }
}

/// The leading number of `81559`, `81559 MiB` or `45 %`.
fn number(value: &str) -> Option<f64> {
    let token = value.split_whitespace().next()?;
    let digits = token.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == '%');
    digits
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
}

/// A memory value in MiB (`81559` with nounits, `81559 MiB` without), in bytes.
fn mebibytes(value: &str) -> Option<u64> {
    let n = number(value)?;
    let scale = if value.contains("GiB") { 1024.0 } else { 1.0 };
    Some((n * scale * MIB as f64) as u64)
}

fn mig_mode(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "enabled" => Some(true),
        "disabled" => Some(false),
        _ => None,
    }
}

/// What the plain `nvidia-smi` table says beyond the query fields.
#[derive(Debug, Default, PartialEq)]
pub struct Banner {
    pub driver_version: Option<String>,
    pub cuda_version: Option<String>,
    pub mig_devices: Vec<BannerMig>,
}

/// One row of the banner's `MIG devices:` table.
#[derive(Debug, PartialEq)]
pub struct BannerMig {
    pub gpu: u32,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    /// The `Device N` of `nvidia-smi -L`.
    pub device: u32,
    pub memory_total_bytes: u64,
}

/// The plain `nvidia-smi` output: `Driver Version: 550.54.15`, `CUDA Version: 12.4`, and the
/// `MIG devices:` table (`| GPU GI CI MIG | used MiB / total MiB | ...`) when there is one.
pub fn parse_banner(text: &str) -> Banner {
    let after = |label: &str| {
        text.lines().find_map(|line| {
            let start = line.find(label)? + label.len();
            let token = line[start..].split_whitespace().next()?;
            let token = token.trim_matches('|');
            token
                .starts_with(|c: char| c.is_ascii_digit())
                .then(|| token.to_string())
        })
    };
    let mut banner = Banner {
        driver_version: after("Driver Version:"),
        cuda_version: after("CUDA Version:"),
        mig_devices: Vec::new(),
    };
    let mut in_mig_table = false;
    for line in text.lines() {
        if line.contains("MIG devices:") {
            in_mig_table = true;
            continue;
        }
        if !in_mig_table {
            continue;
        }
        if line.contains("Processes:") {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", "0    7   0   0", "12MiB / 9984MiB", ...
        let Some(ids) = cells.get(1) else { continue };
        let ids: Vec<u32> = ids
            .split_whitespace()
            .map_while(|t| t.parse().ok())
            .collect();
        let [gpu, gi, ci, device] = ids[..] else {
            continue;
        };
        let memory_total_bytes = cells
            .get(2)
            .and_then(|c| c.split('/').nth(1))
            .and_then(|total| {
                let total = total.trim();
                let n = number(total)?;
                let scale = if total.contains("GiB") { 1024.0 } else { 1.0 };
                Some((n * scale * MIB as f64) as u64)
            })
            .unwrap_or(0);
        banner.mig_devices.push(BannerMig {
            gpu,
            gpu_instance_id: gi,
            compute_instance_id: ci,
            device,
            memory_total_bytes,
        });
    }
    banner
}

/// One GPU of `nvidia-smi -L`, with the MIG devices listed under it.
#[derive(Debug, Default, PartialEq)]
pub struct ListedGpu {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub migs: Vec<ListedMig>,
}

#[derive(Debug, Default, PartialEq)]
pub struct ListedMig {
    /// e.g. `1g.10gb`.
    pub profile: String,
    /// The `N` of `Device N:`.
    pub device: u32,
    pub uuid: String,
    /// GPU and compute instance ids, where the UUID spells them (R450 drivers printed
    /// `MIG-GPU-<gpu uuid>/<gi>/<ci>`).
    pub ids: Option<(u32, u32)>,
}

/// `nvidia-smi -L`: `GPU 0: NAME (UUID: GPU-...)` lines, each followed by its
/// `  MIG 1g.10gb Device 0: (UUID: MIG-...)` lines.
pub fn parse_list(text: &str) -> Vec<ListedGpu> {
    let mut gpus: Vec<ListedGpu> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("GPU ") {
            let Some((index, rest)) = rest.split_once(':') else {
                continue;
            };
            let Ok(index) = index.trim().parse() else {
                continue;
            };
            let name = rest
                .split(" (UUID:")
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            gpus.push(ListedGpu {
                index,
                name,
                uuid: uuid_in(rest).unwrap_or_default(),
                migs: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("MIG ") {
            let mut tokens = rest.split_whitespace();
            let Some(profile) = tokens.next() else {
                continue;
            };
            let device = tokens
                .skip_while(|t| *t != "Device")
                .nth(1)
                .and_then(|t| t.trim_end_matches(':').parse().ok());
            let (Some(device), Some(uuid), Some(gpu)) = (device, uuid_in(rest), gpus.last_mut())
            else {
                continue;
            };
            let ids = uuid.strip_prefix("MIG-GPU-").and_then(|rest| {
                let mut parts = rest.split('/').skip(1);
                Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
            });
            gpu.migs.push(ListedMig {
                profile: profile.to_string(),
                device,
                uuid,
                ids,
            });
        }
    }
    gpus
}

fn uuid_in(text: &str) -> Option<String> {
    let start = text.find("(UUID:")? + "(UUID:".len();
    let len = text[start..].find(')')?;
    Some(text[start..start + len].trim().to_string()).filter(|u| !u.is_empty())
}

/// The cells of a table row (`|   0  MIG 1g.10gb   19   7   0:1   |`) around its `MIG <profile>`
/// name: the numbers before it, the profile, and the tokens after it.
fn mig_row(line: &str) -> Option<(Vec<u32>, String, Vec<&str>)> {
    let line = line.trim();
    if !line.starts_with('|') {
        return None;
    }
    let tokens: Vec<&str> = line
        .split(|c: char| c == '|' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .collect();
    let at = tokens.iter().position(|t| *t == "MIG")?;
    let before = tokens[..at]
        .iter()
        .map(|t| t.parse().ok())
        .collect::<Option<Vec<u32>>>()?;
    let profile = tokens.get(at + 1)?.to_string();
    Some((before, profile, tokens[at + 2..].to_vec()))
}

/// One GPU instance of `nvidia-smi mig -lgi`.
#[derive(Debug, PartialEq)]
pub struct GpuInstance {
    pub gpu: u32,
    pub profile: String,
    pub profile_id: u32,
    pub instance_id: u32,
}

/// `nvidia-smi mig -lgi`: `| GPU  Name  Profile ID  Instance ID  Placement |` rows.
pub fn parse_mig_lgi(text: &str) -> Vec<GpuInstance> {
    text.lines()
        .filter_map(mig_row)
        .filter_map(|(before, profile, after)| {
            let [gpu] = before[..] else { return None };
            Some(GpuInstance {
                gpu,
                profile,
                profile_id: after.first()?.parse().ok()?,
                instance_id: after.get(1)?.parse().ok()?,
            })
        })
        .collect()
}

/// One compute instance of `nvidia-smi mig -lci`.
#[derive(Debug, PartialEq)]
pub struct ComputeInstance {
    pub gpu: u32,
    pub gpu_instance_id: u32,
    pub profile: String,
    pub profile_id: u32,
    pub instance_id: u32,
}

/// `nvidia-smi mig -lci`: `| GPU  GPU-instance-ID  Name  Profile ID  Instance ID  [Placement] |`
/// rows (older drivers print no Placement column).
pub fn parse_mig_lci(text: &str) -> Vec<ComputeInstance> {
    text.lines()
        .filter_map(mig_row)
        .filter_map(|(before, profile, after)| {
            let [gpu, gpu_instance_id] = before[..] else {
                return None;
            };
            Some(ComputeInstance {
                gpu,
                gpu_instance_id,
                profile,
                profile_id: after.first()?.parse().ok()?,
                instance_id: after.get(1)?.parse().ok()?,
            })
        })
        .collect()
}

/// One GPU instance profile of `nvidia-smi mig -lgip`.
#[derive(Debug, PartialEq)]
pub struct GpuInstanceProfile {
    pub gpu: u32,
    pub profile: String,
    pub profile_id: u32,
    pub free: u32,
    pub total: u32,
    pub memory_bytes: u64,
}

/// `nvidia-smi mig -lgip`: per profile a row `| GPU  MIG name  ID  free/total  memory GiB ... |`
/// and a second row of engine counts (without a name, so skipped).
pub fn parse_mig_lgip(text: &str) -> Vec<GpuInstanceProfile> {
    text.lines()
        .filter_map(mig_row)
        .filter_map(|(before, profile, after)| {
            let [gpu] = before[..] else { return None };
            let (free, total) = after.get(1)?.split_once('/')?;
            let gib: f64 = after.get(2)?.parse().ok()?;
            Some(GpuInstanceProfile {
                gpu,
                profile,
                profile_id: after.first()?.parse().ok()?,
                free: free.parse().ok()?,
                total: total.parse().ok()?,
                memory_bytes: (gib * 1024.0 * MIB as f64) as u64,
            })
        })
        .collect()
}

/// `12040` (what NVML and the CUDA driver API return) as `12.4`.
fn cuda_version_string(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

/// The profile in a MIG device's NVML name: `NVIDIA H100 80GB HBM3 MIG 1g.10gb` -> `1g.10gb`.
fn profile_in_name(name: &str) -> Option<String> {
    let mut tokens = name.split_whitespace();
    tokens.find(|t| *t == "MIG")?;
    tokens.next().map(str::to_string)
}

mod nvml {
    //! The NVML side: read only, no setting is ever changed.

    use std::sync::mpsc;
    use std::time::Duration;

    use nvml_wrapper::{Device, Nvml};
    use skyward_common::inventory::{Gpu, MigDevice};

    pub enum Outcome {
        Gpus(Vec<Gpu>),
        Unavailable(String),
        TimedOut,
    }

    /// NVML in a thread of its own: a driver call that hangs (a GPU fallen off the bus) costs
    /// `timeout`, then the thread is left behind.
    pub fn detect_bounded(timeout: Duration) -> Outcome {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || {
                let _ = tx.send(detect());
            });
        if let Err(e) = spawned {
            return Outcome::Unavailable(format!("cannot start a thread: {e}"));
        }
        match rx.recv_timeout(timeout) {
            Ok(Ok(gpus)) => Outcome::Gpus(gpus),
            Ok(Err(reason)) => Outcome::Unavailable(reason),
            Err(mpsc::RecvTimeoutError::Timeout) => Outcome::TimedOut,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Outcome::Unavailable("the NVML thread stopped".into())
            }
        }
    }

    fn detect() -> Result<Vec<Gpu>, String> {
        let nvml = Nvml::init().map_err(|e| e.to_string())?;
        let count = nvml.device_count().map_err(|e| e.to_string())?;
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        let cuda_version = nvml
            .sys_cuda_driver_version()
            .map(super::cuda_version_string)
            .unwrap_or_default();
        let mut gpus = Vec::new();
        for i in 0..count {
            let device = match nvml.device_by_index(i) {
                Ok(device) => device,
                Err(e) => {
                    tracing::warn!("GPU inventory: NVML GPU {i}: {e}");
                    continue;
                }
            };
            let index = device.index().unwrap_or(i);
            let (memory_total_bytes, memory_used_bytes) = memory(&nvml, &device);
            // NotSupported on GPUs without MIG.
            let mig = device.mig_mode().ok();
            let mig_mode_current = mig.as_ref().map(|m| m.current == 1);
            let mig_devices = if mig_mode_current == Some(true) {
                mig_devices(&nvml, &device, index)
            } else {
                Vec::new()
            };
            gpus.push(Gpu {
                index,
                uuid: device.uuid().unwrap_or_default(),
                name: device.name().unwrap_or_default(),
                memory_total_bytes,
                memory_used_bytes,
                // NotSupported in MIG mode.
                utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                driver_version: driver_version.clone(),
                cuda_version: cuda_version.clone(),
                mig_mode_current,
                mig_mode_pending: mig.as_ref().map(|m| m.pending == 1),
                mig_devices,
            });
        }
        Ok(gpus)
    }

    /// Total and used memory: `nvmlDeviceGetMemoryInfo_v2` (what nvml-wrapper calls), or the
    /// first version on drivers that predate it.
    fn memory(nvml: &Nvml, device: &Device<'_>) -> (u64, u64) {
        if let Ok(info) = device.memory_info() {
            return (info.total, info.used);
        }
        if let Ok(get) = &nvml.lib().nvmlDeviceGetMemoryInfo {
            // SAFETY: the symbol was resolved from the loaded library; the handle is live
            // while `nvml` is; the struct is plain data NVML fills in.
            unsafe {
                let mut info = std::mem::zeroed();
                if (*get)(device.handle(), &mut info) == 0 {
                    return (info.total, info.used);
                }
            }
        }
        (0, 0)
    }

    fn mig_devices(nvml: &Nvml, parent: &Device<'_>, parent_index: u32) -> Vec<MigDevice> {
        // The most MIG devices the GPU can hold; unused slots answer NotFound.
        let slots = parent.mig_device_count().unwrap_or(0);
        let lib = nvml.lib();
        let mut devices = Vec::new();
        for slot in 0..slots {
            let Ok(mig) = parent.mig_device_by_index(slot) else {
                continue;
            };
            // SAFETY: a handle NVML just gave us, used while `nvml` lives.
            let handle = unsafe { mig.handle() };
            let mut gpu_instance_id = 0;
            if let Ok(get) = &lib.nvmlDeviceGetGpuInstanceId {
                // SAFETY: resolved symbol, live handle, out-pointer to a local.
                if unsafe { (*get)(handle, &mut gpu_instance_id) } != 0 {
                    gpu_instance_id = 0;
                }
            }
            let mut compute_instance_id = 0;
            if let Ok(get) = &lib.nvmlDeviceGetComputeInstanceId {
                // SAFETY: as above.
                if unsafe { (*get)(handle, &mut compute_instance_id) } != 0 {
                    compute_instance_id = 0;
                }
            }
            let name = mig.name().unwrap_or_default();
            let memory_bytes = match mig.memory_info() {
                Ok(info) => info.total,
                Err(_) => mig
                    .attributes()
                    .map(|a| a.memory_size_mb * super::MIB)
                    .unwrap_or(0),
            };
            devices.push(MigDevice {
                uuid: mig.uuid().unwrap_or_default(),
                profile: super::profile_in_name(&name).unwrap_or_default(),
                memory_bytes,
                parent_gpu_index: parent_index,
                gpu_instance_id,
                compute_instance_id,
            });
        }
        devices
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tool::TOOL_TIMEOUT;
    use std::path::PathBuf;

    /// The captured outputs in `agent/testdata/nvidia-smi` (see its README.md).
    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/nvidia-smi")
    }

    fn fixture(name: &str) -> String {
        let path = fixtures().join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
    }

    fn check_query_gpu_a100(text: &str) {
        // With a header and units: the header names the columns, whatever was asked for.
        let gpus = parse_query_gpu(text, QUERY_FIELDS);
        assert_eq!(
            gpus,
            vec![Gpu {
                index: 0,
                name: "NVIDIA A100-SXM4-40GB".into(),
                memory_total_bytes: 40960 * MIB,
                mig_mode_current: Some(false),
                ..Default::default()
            }]
        );
    }

    fn check_list_h100nvl_mig(text: &str) {
        let gpus = parse_list(text);
        assert_eq!(
            gpus,
            vec![ListedGpu {
                index: 0,
                name: "NVIDIA H100 NVL".into(),
                uuid: "GPU-f4548330-27be-041a-ad8e-95b3005644b8".into(),
                migs: vec![
                    ListedMig {
                        profile: "1g.12gb".into(),
                        device: 0,
                        uuid: "MIG-1baf66e9-58ab-5d66-9f62-1adbdbe5c7c3".into(),
                        ids: None,
                    },
                    ListedMig {
                        profile: "1g.12gb".into(),
                        device: 1,
                        uuid: "MIG-3eb7b629-9a3c-550d-976d-86d336ed8d2e".into(),
                        ids: None,
                    },
                ],
            }]
        );
    }

    fn check_lgip_h100nvl(text: &str) {
        let profiles = parse_mig_lgip(text);
        let summary: Vec<(u32, &str, u32, u32, u32, u64)> = profiles
            .iter()
            .map(|p| {
                (
                    p.gpu,
                    p.profile.as_str(),
                    p.profile_id,
                    p.free,
                    p.total,
                    p.memory_bytes / MIB,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, "1g.12gb", 19, 7, 7, 10874), // 10.62 GiB
                (0, "3g.47gb", 9, 2, 2, 47226),  // 46.12 GiB
                (0, "7g.94gb", 0, 1, 1, 94842),  // 92.62 GiB
            ]
        );
    }

    fn check_lgi_h100(text: &str) {
        assert_eq!(
            parse_mig_lgi(text),
            vec![GpuInstance {
                gpu: 0,
                profile: "1g.10gb".into(),
                profile_id: 19,
                instance_id: 7,
            }]
        );
    }

    fn check_lci_h100(text: &str) {
        assert_eq!(
            parse_mig_lci(text),
            vec![ComputeInstance {
                gpu: 0,
                gpu_instance_id: 7,
                profile: "1g.10gb".into(),
                profile_id: 0,
                instance_id: 0,
            }]
        );
    }

    type Check = fn(&str);
    const FIXTURE_CHECKS: &[(&str, Check)] = &[
        ("query-gpu-a100.csv", check_query_gpu_a100),
        ("list-h100nvl-mig.txt", check_list_h100nvl_mig),
        ("mig-lgip-h100nvl.txt", check_lgip_h100nvl),
        ("mig-lgi-h100.txt", check_lgi_h100),
        ("mig-lci-h100.txt", check_lci_h100),
    ];

    #[test]
    fn every_fixture_parses_to_what_it_shows() {
        let mut on_disk: Vec<String> = std::fs::read_dir(fixtures())
            .unwrap_or_else(|e| panic!("{}: {e}", fixtures().display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != "README.md")
            .collect();
        on_disk.sort();
        let mut checked: Vec<String> = FIXTURE_CHECKS.iter().map(|(n, _)| n.to_string()).collect();
        checked.sort();
        assert_eq!(
            on_disk, checked,
            "a fixture without a check, or a check without its fixture"
        );
        for (name, check) in FIXTURE_CHECKS {
            check(&fixture(name));
        }
    }

    #[test]
    fn query_noheader_nounits_with_mig_and_not_available_values() {
        let text = "0, GPU-1e4b8a2c-5d3f-4e7a-9b1c-2d3e4f5a6b7c, NVIDIA H100 80GB HBM3, 81559, 23, [N/A], 550.54.15, Enabled, Enabled\n\
                    1, GPU-9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d, NVIDIA H100 80GB HBM3, 81559, 0, 0, 550.54.15, Disabled, Enabled\n";
        let gpus = parse_query_gpu(text, QUERY_FIELDS);
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            gpus[0],
            Gpu {
                index: 0,
                uuid: "GPU-1e4b8a2c-5d3f-4e7a-9b1c-2d3e4f5a6b7c".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 81559 * MIB,
                memory_used_bytes: 23 * MIB,
                utilization_percent: None,
                driver_version: "550.54.15".into(),
                cuda_version: String::new(),
                mig_mode_current: Some(true),
                mig_mode_pending: Some(true),
                mig_devices: Vec::new(),
            }
        );
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[1].utilization_percent, Some(0));
        assert_eq!(gpus[1].mig_mode_current, Some(false));
        assert_eq!(gpus[1].mig_mode_pending, Some(true));
    }

    #[test]
    fn query_without_mig_support_and_with_units() {
        // A consumer GPU: no MIG, values with units (no `nounits`), no header.
        let text = "0, GPU-0f0e0d0c-0b0a-0908-0706-050403020100, NVIDIA GeForce RTX 4090, 24564 MiB, 1 MiB, 7 %, 535.183.01, [N/A], [N/A]\n";
        let gpus = parse_query_gpu(text, QUERY_FIELDS);
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].memory_total_bytes, 24564 * MIB);
        assert_eq!(gpus[0].memory_used_bytes, MIB);
        assert_eq!(gpus[0].utilization_percent, Some(7));
        assert_eq!(gpus[0].mig_mode_current, None);
        assert_eq!(gpus[0].mig_mode_pending, None);
        // Other spellings of "no value".
        let text = "0, GPU-x, Tesla K80, 11441, N/A, Not Supported, 470.256.02, , [Unknown Error]";
        let gpu = &parse_query_gpu(text, QUERY_FIELDS)[0];
        assert_eq!(gpu.memory_used_bytes, 0);
        assert_eq!(gpu.utilization_percent, None);
        assert_eq!(gpu.mig_mode_current, None);
        assert_eq!(gpu.mig_mode_pending, None);
    }

    #[test]
    fn query_edge_cases() {
        assert!(parse_query_gpu("", QUERY_FIELDS).is_empty());
        assert!(parse_query_gpu("\n\n", QUERY_FIELDS).is_empty());
        // A header line alone: no GPUs.
        assert!(parse_query_gpu("index, name, memory.total [MiB]\n", QUERY_FIELDS).is_empty());
        // Fewer fields asked (an older driver): only those are read.
        let gpus = parse_query_gpu("3, GPU-abc, Tesla V100-SXM2-16GB, 16160", MINIMAL_FIELDS);
        assert_eq!(gpus[0].index, 3);
        assert_eq!(gpus[0].memory_total_bytes, 16160 * MIB);
        assert_eq!(gpus[0].mig_mode_current, None);
        // A comma in a name goes back into the name; a short row is skipped.
        let gpus = parse_query_gpu("0, GPU-a, Odd, Name, 1024\n1, GPU-b\n", MINIMAL_FIELDS);
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].name, "Odd, Name");
        assert_eq!(gpus[0].memory_total_bytes, 1024 * MIB);
    }

    #[test]
    fn list_variants() {
        // No MIG, two GPUs.
        let text = "GPU 0: Tesla T4 (UUID: GPU-aaaaaaaa-1111-2222-3333-444444444444)\n\
                    GPU 1: Tesla T4 (UUID: GPU-bbbbbbbb-1111-2222-3333-444444444444)\n";
        let gpus = parse_list(text);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[1].name, "Tesla T4");
        assert!(gpus.iter().all(|g| g.migs.is_empty()));
        // R450 drivers spelled the instance ids in the MIG UUID.
        let text = "GPU 0: A100-SXM4-40GB (UUID: GPU-e91edf3b-b297-37c1-a2a7-7601c7b8c0a5)\n  \
                    MIG 3g.20gb Device 0: (UUID: MIG-GPU-e91edf3b-b297-37c1-a2a7-7601c7b8c0a5/1/0)\n";
        let gpus = parse_list(text);
        assert_eq!(gpus[0].migs[0].profile, "3g.20gb");
        assert_eq!(gpus[0].migs[0].ids, Some((1, 0)));
        // A MIG line before any GPU line, and noise, are ignored.
        assert!(
            parse_list("  MIG 1g.10gb Device 0: (UUID: MIG-x)\nNo devices found.\n").is_empty()
        );
    }

    #[test]
    fn lci_of_older_drivers_has_no_placement_column() {
        let text = "+--------------------------------------------------------------------+\n\
                    | Compute instances:                                                 |\n\
                    | GPU     GPU       Name             Profile   Instance              |\n\
                    |       Instance                       ID        ID                  |\n\
                    |         ID                                                         |\n\
                    |====================================================================|\n\
                    |   0      1       MIG 3g.20gb          2         0                  |\n\
                    |   0      2       MIG 3g.20gb          2         0                  |\n\
                    +--------------------------------------------------------------------+\n";
        let cis = parse_mig_lci(text);
        assert_eq!(cis.len(), 2);
        assert_eq!((cis[1].gpu_instance_id, cis[1].instance_id), (2, 0));
        assert_eq!(cis[1].profile, "3g.20gb");
        assert!(parse_mig_lci("No compute instances found.").is_empty());
        assert!(parse_mig_lgi("No GPU instances found.").is_empty());
    }

    /// NOT a capture: an illustrative `nvidia-smi` banner in the layout of driver 550 on an
    /// H100 80GB in MIG mode with two 1g.10gb devices (values made up to match the fixtures).
    const BANNER_H100_MIG: &str = include_str!("../testdata/nvidia-smi-h100-mig-banner.txt");

    const QUERY_H100_MIG: &str = "0, GPU-5b3c1a2e-8f4d-4c6b-9a7e-1d2c3b4a5f60, NVIDIA H100 80GB HBM3, 81559, 24, [N/A], 550.54.15, Enabled, Enabled\n";
    const LIST_H100_MIG: &str = "\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5b3c1a2e-8f4d-4c6b-9a7e-1d2c3b4a5f60)
  MIG 1g.10gb     Device  0: (UUID: MIG-0c4d9f8e-7b6a-5c4d-8e3f-2a1b0c9d8e7f)
  MIG 1g.10gb     Device  1: (UUID: MIG-7e6d5c4b-3a2f-5e1d-9c8b-7a6f5e4d3c2b)
";

    #[test]
    fn banner_versions_and_mig_table() {
        let banner = parse_banner(BANNER_H100_MIG);
        assert_eq!(banner.driver_version.as_deref(), Some("550.54.15"));
        assert_eq!(banner.cuda_version.as_deref(), Some("12.4"));
        assert_eq!(
            banner.mig_devices,
            vec![
                BannerMig {
                    gpu: 0,
                    gpu_instance_id: 9,
                    compute_instance_id: 0,
                    device: 0,
                    memory_total_bytes: 9984 * MIB,
                },
                BannerMig {
                    gpu: 0,
                    gpu_instance_id: 10,
                    compute_instance_id: 0,
                    device: 1,
                    memory_total_bytes: 9984 * MIB,
                },
            ]
        );
        // An old banner: no CUDA version, no MIG table.
        let old =
            "| NVIDIA-SMI 396.44                 Driver Version: 396.44                    |\n";
        let banner = parse_banner(old);
        assert_eq!(banner.driver_version.as_deref(), Some("396.44"));
        assert_eq!(banner.cuda_version, None);
        assert!(banner.mig_devices.is_empty());
        assert_eq!(parse_banner("CUDA Version: N/A").cuda_version, None);
    }

    /// What the replayed tool prints, or how it fails.
    type Answer = Result<String, fn() -> ToolError>;

    /// Replays tool outputs by argument list, recording what was asked.
    struct Replay {
        answers: Vec<(Vec<&'static str>, Answer)>,
        asked: Vec<Vec<String>>,
    }

    impl Replay {
        fn new() -> Self {
            Replay {
                answers: Vec::new(),
                asked: Vec::new(),
            }
        }

        fn answer(mut self, args: &[&'static str], out: &str) -> Self {
            self.answers.push((args.to_vec(), Ok(out.to_string())));
            self
        }

        fn fail(mut self, args: &[&'static str], err: fn() -> ToolError) -> Self {
            self.answers.push((args.to_vec(), Err(err)));
            self
        }

        fn run(&mut self, args: &[&str]) -> Result<String, ToolError> {
            self.asked
                .push(args.iter().map(|a| a.to_string()).collect());
            let found = self.answers.iter().find(|(want, _)| {
                // Empty matches only the bare command; otherwise each given argument.
                (want.is_empty() == args.is_empty())
                    && want.len() <= args.len()
                    && want.iter().zip(args).all(|(w, a)| {
                        // `--query-gpu=...` and `--format=...` by prefix, others exactly.
                        a == w || (w.starts_with("--") && a.starts_with(w))
                    })
            });
            match found {
                Some((_, Ok(out))) => Ok(out.clone()),
                Some((_, Err(err))) => Err(err()),
                None => Err(failed("unknown arguments")),
            }
        }
    }

    fn failed(output: &str) -> ToolError {
        ToolError::Failed {
            program: "nvidia-smi".into(),
            status: "exit status: 2".into(),
            output: output.into(),
        }
    }

    const FULL_QUERY: &str = "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,driver_version,mig.mode.current,mig.mode.pending";

    #[test]
    fn h100_in_mig_mode_from_query_banner_and_list() {
        let mut replay = Replay::new()
            .answer(
                &[FULL_QUERY, "--format=csv,noheader,nounits"],
                QUERY_H100_MIG,
            )
            .answer(&[], BANNER_H100_MIG)
            .answer(&["-L"], LIST_H100_MIG);
        let gpus = detect_with(&mut |args| replay.run(args)).unwrap();
        assert_eq!(gpus.len(), 1);
        let gpu = &gpus[0];
        assert_eq!(gpu.uuid, "GPU-5b3c1a2e-8f4d-4c6b-9a7e-1d2c3b4a5f60");
        assert_eq!(gpu.cuda_version, "12.4");
        assert_eq!(gpu.driver_version, "550.54.15");
        assert_eq!(gpu.mig_mode_current, Some(true));
        assert_eq!(
            gpu.mig_devices,
            vec![
                MigDevice {
                    uuid: "MIG-0c4d9f8e-7b6a-5c4d-8e3f-2a1b0c9d8e7f".into(),
                    profile: "1g.10gb".into(),
                    memory_bytes: 9984 * MIB,
                    parent_gpu_index: 0,
                    gpu_instance_id: 9,
                    compute_instance_id: 0,
                },
                MigDevice {
                    uuid: "MIG-7e6d5c4b-3a2f-5e1d-9c8b-7a6f5e4d3c2b".into(),
                    profile: "1g.10gb".into(),
                    memory_bytes: 9984 * MIB,
                    parent_gpu_index: 0,
                    gpu_instance_id: 10,
                    compute_instance_id: 0,
                },
            ]
        );
        // The banner placed every device: no `mig -l...` listing was needed.
        assert!(replay
            .asked
            .iter()
            .all(|a| a.first().map(String::as_str) != Some("mig")));
    }

    #[test]
    fn without_a_mig_table_ids_and_memory_come_from_the_mig_listings() {
        // The H100 NVL of the fixtures: `-L` lists its devices; `mig -lci` fails (as it does
        // without root), `mig -lgi` answers; memory comes from `mig -lgip`.
        let query = "0, GPU-f4548330-27be-041a-ad8e-95b3005644b8, NVIDIA H100 NVL, 95830, 0, [N/A], 550.90.07, Enabled, Enabled\n";
        let lgi = "\
+-------------------------------------------------------+
| GPU instances:                                        |
| GPU   Name             Profile  Instance   Placement  |
|                          ID       ID       Start:Size |
|=======================================================|
|   0  MIG 1g.12gb         19       13          6:1     |
|   0  MIG 1g.12gb         19       11          4:1     |
+-------------------------------------------------------+
";
        let mut replay = Replay::new()
            .answer(&[FULL_QUERY, "--format=csv,noheader,nounits"], query)
            .answer(
                &[],
                "| NVIDIA-SMI 550.90.07   Driver Version: 550.90.07   CUDA Version: 12.4 |\n",
            )
            .answer(&["-L"], &fixture("list-h100nvl-mig.txt"))
            .fail(&["mig", "-lci"], || failed("Insufficient Permissions"))
            .answer(&["mig", "-lgi"], lgi)
            .answer(&["mig", "-lgip"], &fixture("mig-lgip-h100nvl.txt"));
        let gpus = detect_with(&mut |args| replay.run(args)).unwrap();
        let migs = &gpus[0].mig_devices;
        assert_eq!(migs.len(), 2);
        assert_eq!(migs[0].uuid, "MIG-1baf66e9-58ab-5d66-9f62-1adbdbe5c7c3");
        // Same profile twice: matched in instance id order.
        assert_eq!((migs[0].gpu_instance_id, migs[1].gpu_instance_id), (11, 13));
        assert!(
            migs.iter()
                .all(|m| m.memory_bytes == (10.62 * 1024.0 * MIB as f64) as u64),
            "{migs:?}"
        );
        assert!(migs
            .iter()
            .all(|m| m.profile == "1g.12gb" && m.parent_gpu_index == 0));
    }

    #[test]
    fn a_field_an_older_driver_refuses_is_dropped_and_the_query_retried() {
        let short =
            "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,driver_version";
        let mut replay = Replay::new()
            .fail(&[FULL_QUERY, "--format"], || {
                failed("Field \"mig.mode.current\" is not a valid field to query.")
            })
            .fail(&["--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,driver_version,mig.mode.pending", "--format"], || {
                failed("Field \"mig.mode.pending\" is not a valid field to query.")
            })
            .answer(&[short, "--format"], "0, GPU-k80, Tesla K80, 11441, 0, 0, 418.87.00\n")
            .answer(&[], "| NVIDIA-SMI 418.87.00    Driver Version: 418.87.00    CUDA Version: 10.1     |\n");
        let gpus = detect_with(&mut |args| replay.run(args)).unwrap();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].name, "Tesla K80");
        assert_eq!(gpus[0].cuda_version, "10.1");
        assert_eq!(gpus[0].mig_mode_current, None);
        assert_eq!(replay.asked.len(), 4, "{:?}", replay.asked);
        assert!(replay
            .asked
            .iter()
            .all(|a| a.first().map(String::as_str) != Some("-L")));
    }

    #[test]
    fn an_unexplained_failure_falls_back_to_the_minimal_fields_once() {
        let mut replay = Replay::new()
            .fail(&[FULL_QUERY, "--format"], || failed("Unknown Error"))
            .answer(
                &["--query-gpu=index,uuid,name,memory.total", "--format"],
                "0, GPU-a, Tesla P100-PCIE-16GB, 16280\n",
            );
        let gpus = detect_with(&mut |args| replay.run(args)).unwrap();
        assert_eq!(gpus[0].memory_total_bytes, 16280 * MIB);
        assert_eq!(
            gpus[0].cuda_version, "",
            "the banner failed: no CUDA version"
        );

        let mut replay = Replay::new().fail(&["--query-gpu"], || failed("Unknown Error"));
        assert!(detect_with(&mut |args| replay.run(args)).is_err());
        assert_eq!(replay.asked.len(), 2, "full, then minimal, then give up");
    }

    #[test]
    fn no_devices_missing_tool_and_hangs() {
        let mut replay = Replay::new().fail(&["--query-gpu"], || failed("No devices were found"));
        assert_eq!(
            detect_with(&mut |args| replay.run(args)).unwrap(),
            Vec::new()
        );
        assert_eq!(replay.asked.len(), 1);

        let mut replay = Replay::new().fail(&["--query-gpu"], || {
            ToolError::NotFound("nvidia-smi".into())
        });
        assert!(matches!(
            detect_with(&mut |args| replay.run(args)),
            Err(ToolError::NotFound(_))
        ));

        // A hang is not retried: each try would cost another timeout.
        let mut replay = Replay::new().fail(&["--query-gpu"], || {
            ToolError::TimedOut("nvidia-smi".into(), TOOL_TIMEOUT)
        });
        assert!(matches!(
            detect_with(&mut |args| replay.run(args)),
            Err(ToolError::TimedOut(..))
        ));
        assert_eq!(replay.asked.len(), 1);

        // A hang after the query: the GPUs so far, nothing more asked.
        let mut replay = Replay::new()
            .answer(&[FULL_QUERY, "--format"], QUERY_H100_MIG)
            .fail(&[], || {
                ToolError::TimedOut("nvidia-smi".into(), TOOL_TIMEOUT)
            });
        let gpus = detect_with(&mut |args| replay.run(args)).unwrap();
        assert_eq!(gpus.len(), 1);
        assert!(gpus[0].mig_devices.is_empty());
        assert_eq!(replay.asked.len(), 2);
    }

    #[test]
    fn small_helpers() {
        assert_eq!(
            invalid_field("Field \"mig.mode.current\" is not a valid field to query."),
            Some("mig.mode.current")
        );
        assert_eq!(invalid_field("Unknown Error"), None);
        assert_eq!(cuda_version_string(12040), "12.4");
        assert_eq!(cuda_version_string(11080), "11.8");
        assert_eq!(
            profile_in_name("NVIDIA H100 80GB HBM3 MIG 1g.10gb").as_deref(),
            Some("1g.10gb")
        );
        assert_eq!(profile_in_name("NVIDIA H100 80GB HBM3"), None);
    }

    #[test]
    fn nvml_can_be_switched_off_and_a_machine_without_it_still_answers() {
        // Whatever this machine has, detection returns (no panic, bounded by the deadline).
        let _ = detect(Instant::now() + std::time::Duration::from_secs(8));
        assert!(nvml_enabled() || std::env::var(NVML_ENV).is_ok());
    }
}
