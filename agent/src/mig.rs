//! MIG partitioning: the layout a pool asks for (`--mig`), applied to every GPU of the node
//! once at startup, before the inventory is read, so that the node reports its MIG devices.
//!
//! A layout is one profile (`1g.10gb`: as many instances of it as each GPU holds) or a list
//! (`3g.40gb,2g.20gb,1g.10gb`: exactly these on each GPU). Only `nvidia-smi` changes MIG
//! settings (the NVML side of [`crate::gpu`] stays read only), every run of it bounded in
//! time ([`crate::tool`]). A GPU that already has the layout is left alone, so restarting
//! the agent destroys nothing. A layout the node cannot take (a GPU without MIG, an unknown
//! profile, a mode change that needs a reset) is refused in one line naming the GPU; the
//! agent still connects and reports it ([`MigLayoutReport`] in the inventory), so that the
//! coordinator can fail the pool with that message.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use skyward_common::inventory::{Gpu, MigLayoutReport};

use crate::gpu::{self, GpuInstanceProfile};
use crate::tool::{self, ToolError, TOOL_TIMEOUT};

/// How long one state-changing `nvidia-smi` run (mode change, instance creation) may take:
/// enabling MIG may reset the GPU, which takes seconds.
pub const MIG_CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
pub use skyward_common::mig::MIG_BUDGET;

/// The slices of a full GPU when its profiles do not say (every MIG GPU but the A30 has 7).
const DEFAULT_SLICES: u32 = 7;

pub use skyward_common::mig::Layout;

/// The compute slices a profile takes: the `N` of `Ng.`.
fn slices(profile: &str) -> u32 {
    profile
        .split_once('g')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

/// One GPU instance to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub profile: String,
    pub profile_id: u32,
}

/// The GPU instances that give a GPU named `gpu_name`, whose `nvidia-smi mig -lgip` listed
/// `profiles`, the `layout`; largest first, the order in which placement succeeds best.
/// Counts come from the profiles' totals: what fits once the GPU's instances are removed.
pub fn plan(
    layout: &Layout,
    gpu_name: &str,
    profiles: &[GpuInstanceProfile],
) -> Result<Vec<Planned>, String> {
    let known = |name: &str| {
        profiles.iter().find(|p| p.profile == name).ok_or_else(|| {
            let names: Vec<&str> = profiles.iter().map(|p| p.profile.as_str()).collect();
            format!(
                "{name} is not a MIG profile of {gpu_name} (its profiles: {})",
                names.join(", ")
            )
        })
    };
    let mut planned: Vec<Planned> = match layout {
        Layout::Fill(name) => {
            let profile = known(name)?;
            if profile.total == 0 {
                return Err(format!("{gpu_name} has no room for a {name} instance"));
            }
            (0..profile.total)
                .map(|_| Planned {
                    profile: name.clone(),
                    profile_id: profile.profile_id,
                })
                .collect()
        }
        Layout::Exact(names) => {
            let mut planned = Vec::new();
            for name in names {
                let profile = known(name)?;
                let asked = names.iter().filter(|n| *n == name).count() as u32;
                if asked > profile.total {
                    return Err(format!(
                        "{} does not fit {gpu_name}: it holds at most {} {name}",
                        names.join(","),
                        profile.total
                    ));
                }
                planned.push(Planned {
                    profile: name.clone(),
                    profile_id: profile.profile_id,
                });
            }
            // The full-GPU profile names the GPU's slice count (7g on most, 4g on an A30).
            let capacity = profiles
                .iter()
                .map(|p| slices(&p.profile))
                .max()
                .unwrap_or(DEFAULT_SLICES);
            let taken: u32 = names.iter().map(|n| slices(n)).sum();
            if taken > capacity {
                return Err(format!(
                    "{} does not fit {gpu_name}: it takes {taken} slices of its {capacity}",
                    names.join(",")
                ));
            }
            planned
        }
    };
    planned.sort_by_key(|p| std::cmp::Reverse(slices(&p.profile)));
    Ok(planned)
}

/// `nvidia-smi ARGS`, as [`apply`] runs it (tests replay captured answers through it).
pub type Run<'a> = &'a mut dyn FnMut(&[&str]) -> Result<String, ToolError>;

/// Applies `layout` to every GPU of the node through `run`: enables MIG mode where it is
/// off, and replaces each GPU's instances unless they already are the layout. Never fails:
/// what could not be done is the report's `error`, one line naming each GPU that refused.
pub fn apply(layout: &str, run: Run<'_>) -> MigLayoutReport {
    let mut report = MigLayoutReport {
        requested: layout.to_string(),
        ..Default::default()
    };
    let parsed = match Layout::parse(layout) {
        Ok(parsed) => parsed,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    let gpus = match gpu::query_gpus(run) {
        Ok(gpus) => gpus,
        Err(ToolError::NotFound(_)) => {
            report.error = Some(format!(
                "cannot apply MIG layout {layout}: nvidia-smi is not installed (no NVIDIA driver on this node)"
            ));
            return report;
        }
        Err(e) => {
            report.error = Some(format!(
                "cannot apply MIG layout {layout}: listing the GPUs failed: {e}"
            ));
            return report;
        }
    };
    if gpus.is_empty() {
        report.error = Some(format!(
            "cannot apply MIG layout {layout}: this node has no NVIDIA GPU"
        ));
        return report;
    }
    let mut errors = Vec::new();
    for gpu in &gpus {
        match apply_to_gpu(gpu, &parsed, run) {
            Ok(true) => report.changed_gpus.push(gpu.index),
            Ok(false) => {}
            Err(GpuError::Refused(e)) => errors.push(format!("GPU {}: {e}", gpu.index)),
            // A missing or hung nvidia-smi fails every other GPU the same way.
            Err(GpuError::Tool(e)) => {
                errors.push(format!("GPU {}: {e}", gpu.index));
                break;
            }
        }
    }
    if !errors.is_empty() {
        report.error = Some(format!(
            "cannot apply MIG layout {layout}: {}",
            errors.join("; ")
        ));
    }
    report
}

enum GpuError {
    /// The GPU cannot take the layout; the others may.
    Refused(String),
    /// nvidia-smi itself is missing or hangs: no use going on.
    Tool(ToolError),
}

impl From<ToolError> for GpuError {
    fn from(e: ToolError) -> Self {
        GpuError::Tool(e)
    }
}

/// Runs a command that may fail for a reason the GPU states (`Ok(Err(what it said))`); a
/// missing or hung tool ends it all.
fn stated(run: Run<'_>, args: &[&str]) -> Result<Result<String, String>, GpuError> {
    match run(args) {
        Ok(out) => Ok(Ok(out)),
        Err(e) if e.is_fatal() => Err(GpuError::Tool(e)),
        Err(e) => Ok(Err(telling_line(e.output()).unwrap_or(e.to_string()))),
    }
}

/// The line of a tool's output that says what went wrong (its first line when none seems
/// to), for one-line messages: `-cgi` prints a success line for each instance it made first.
fn telling_line(text: &str) -> Option<String> {
    let lines = || text.lines().map(str::trim).filter(|l| !l.is_empty());
    let telling = [
        "unable",
        "fail",
        "error",
        "not supported",
        "insufficient",
        "warning",
    ];
    lines()
        .find(|l| {
            let lower = l.to_ascii_lowercase();
            telling.iter().any(|t| lower.contains(t))
        })
        .or_else(|| lines().next())
        .map(str::to_string)
}

/// What nvidia-smi prints when a GPU has no instances to list or destroy.
fn says_none_exist(said: &str) -> bool {
    let lower = said.to_ascii_lowercase();
    lower.contains("no gpu instance") || lower.contains("not found")
}

/// Gives one GPU the layout; `Ok(true)` when its instances were (re)created, `Ok(false)` when
/// it already had them.
fn apply_to_gpu(gpu: &Gpu, layout: &Layout, run: Run<'_>) -> Result<bool, GpuError> {
    let index = gpu.index.to_string();
    let index = index.as_str();
    let name = if gpu.name.is_empty() {
        "this GPU"
    } else {
        &gpu.name
    };
    if gpu.mig_mode_current != Some(true) {
        enable_mig_mode(gpu, name, run)?;
    }
    let profiles: Vec<GpuInstanceProfile> = match stated(run, &["mig", "-i", index, "-lgip"])? {
        Ok(text) => gpu::parse_mig_lgip(&text)
            .into_iter()
            .filter(|p| p.gpu == gpu.index)
            .collect(),
        Err(said) => {
            return Err(GpuError::Refused(format!(
                "{name} lists no MIG profiles (nvidia-smi mig -lgip: {said})"
            )))
        }
    };
    if profiles.is_empty() {
        return Err(GpuError::Refused(format!(
            "{name} lists no MIG profiles: it does not support MIG"
        )));
    }
    let planned = plan(layout, name, &profiles).map_err(GpuError::Refused)?;
    let mut wanted: Vec<String> = planned.iter().map(|p| p.profile.clone()).collect();
    wanted.sort_unstable();

    // When the instances cannot be listed (no root), the devices alone decide.
    let instances = gpu_instances(gpu.index, run)?;
    let devices = mig_devices(gpu.index, run)?;
    let sorted = |profiles: &[String]| {
        let mut sorted: Vec<String> = profiles.to_vec();
        sorted.sort_unstable();
        sorted
    };
    let in_place =
        sorted(&devices) == wanted && instances.as_deref().is_none_or(|i| sorted(i) == wanted);
    if in_place {
        tracing::info!("GPU {index}: MIG layout already in place");
        return Ok(false);
    }
    if instances.as_ref().is_none_or(|i| !i.is_empty()) || !devices.is_empty() {
        tracing::info!("GPU {index}: replacing MIG instances {instances:?}");
        // Fails when there are only bare GPU instances, without compute instances: fine.
        if let Err(said) = stated(run, &["mig", "-i", index, "-dci"])? {
            tracing::debug!("GPU {index}: nvidia-smi mig -dci: {said}");
        }
        match stated(run, &["mig", "-i", index, "-dgi"])? {
            Err(said) if !says_none_exist(&said) => {
                return Err(GpuError::Refused(format!(
                    "cannot remove the MIG instances of {name} (is a process using them?): {said}"
                )))
            }
            _ => {}
        }
    }
    let ids: Vec<String> = planned.iter().map(|p| p.profile_id.to_string()).collect();
    let ids = ids.join(",");
    tracing::info!("GPU {index}: creating MIG instances {wanted:?}");
    if let Err(said) = stated(run, &["mig", "-i", index, "-cgi", &ids, "-C"])? {
        return Err(GpuError::Refused(format!(
            "creating MIG instances {} on {name} failed: {said}",
            wanted.join(",")
        )));
    }
    let mut made = mig_devices(gpu.index, run)?;
    made.sort_unstable();
    if made != wanted {
        return Err(GpuError::Refused(format!(
            "{name} shows MIG devices [{}] after creating [{}]",
            made.join(","),
            wanted.join(",")
        )));
    }
    Ok(true)
}

/// `nvidia-smi -i N -mig 1`, then checks that the mode took effect: a GPU without MIG keeps
/// it off (whether or not the command admits failure), one in use leaves it pending.
fn enable_mig_mode(gpu: &Gpu, name: &str, run: Run<'_>) -> Result<(), GpuError> {
    let index = gpu.index.to_string();
    tracing::info!("GPU {index}: enabling MIG mode");
    let said = match stated(run, &["-i", &index, "-mig", "1"])? {
        Ok(out) => telling_line(&out).unwrap_or_default(),
        Err(said) => said,
    };
    let now = gpu::query_gpus(run)?
        .into_iter()
        .find(|g| g.index == gpu.index);
    match now {
        Some(g) if g.mig_mode_current == Some(true) => Ok(()),
        Some(g) if g.mig_mode_pending == Some(true) => Err(GpuError::Refused(format!(
            "MIG mode on {name} is pending: it takes effect after a GPU reset (nvidia-smi -i {index} -r, with no process using the GPU) or a reboot"
        ))),
        _ => Err(GpuError::Refused(format!(
            "{name} has no MIG support (nvidia-smi -i {index} -mig 1: {})",
            if said.is_empty() { "MIG mode stayed off" } else { &said }
        ))),
    }
}

/// The profiles of GPU `index`'s GPU instances (`nvidia-smi mig -lgi`); `None` when they
/// cannot be listed.
fn gpu_instances(index: u32, run: Run<'_>) -> Result<Option<Vec<String>>, GpuError> {
    let text = match stated(run, &["mig", "-i", &index.to_string(), "-lgi"])? {
        Ok(text) => text,
        // nvidia-smi fails to list when there is nothing to list.
        Err(said) if says_none_exist(&said) => return Ok(Some(Vec::new())),
        Err(said) => {
            tracing::debug!("GPU {index}: nvidia-smi mig -lgi: {said}");
            return Ok(None);
        }
    };
    Ok(Some(
        gpu::parse_mig_lgi(&text)
            .into_iter()
            .filter(|g| g.gpu == index)
            .map(|g| g.profile)
            .collect(),
    ))
}

/// The profiles of GPU `index`'s MIG devices: GPU instances with a compute instance, as
/// `nvidia-smi -L` lists them.
fn mig_devices(index: u32, run: Run<'_>) -> Result<Vec<String>, GpuError> {
    let text = stated(run, &["-L"])?
        .map_err(|said| GpuError::Refused(format!("nvidia-smi -L failed: {said}")))?;
    Ok(gpu::parse_list(&text)
        .into_iter()
        .filter(|g| g.index == index)
        .flat_map(|g| g.migs)
        .map(|m| m.profile)
        .collect())
}

/// `nvidia-smi` with what is left of `deadline`: [`MIG_CHANGE_TIMEOUT`] at most for a
/// command that changes MIG state, [`TOOL_TIMEOUT`] for one that only reads.
fn run_nvidia_smi(args: &[&str], deadline: Instant) -> Result<String, ToolError> {
    let changes = args
        .iter()
        .any(|a| matches!(*a, "-mig" | "-cgi" | "-dgi" | "-dci"));
    let cap = if changes {
        MIG_CHANGE_TIMEOUT
    } else {
        TOOL_TIMEOUT
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ToolError::TimedOut("nvidia-smi".into(), Duration::ZERO));
    }
    tool::run("nvidia-smi", args, left.min(cap))
}

static STARTUP_REPORT: OnceLock<MigLayoutReport> = OnceLock::new();

/// Applies the layout the agent was started with (`--mig`), once per process: a reconnecting
/// agent reports the same outcome. Blocks for up to [`MIG_BUDGET`]; an empty layout is none.
pub fn apply_at_startup(layout: Option<&str>) {
    let Some(layout) = layout.map(str::trim).filter(|l| !l.is_empty()) else {
        return;
    };
    STARTUP_REPORT.get_or_init(|| {
        let deadline = Instant::now() + MIG_BUDGET;
        let report = apply(layout, &mut |args| run_nvidia_smi(args, deadline));
        match &report.error {
            Some(e) => tracing::error!("{e}"),
            None => tracing::info!(
                "MIG layout {layout} in place (repartitioned GPUs: {:?})",
                report.changed_gpus
            ),
        }
        report
    });
}

/// What [`apply_at_startup`] did, for the inventory; `None` when no layout was asked for.
pub fn startup_report() -> Option<MigLayoutReport> {
    STARTUP_REPORT.get().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/nvidia-smi")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
    }

    /// The H100 NVL's profiles, from the captured `nvidia-smi mig -lgip`.
    fn h100nvl_profiles() -> Vec<GpuInstanceProfile> {
        gpu::parse_mig_lgip(&fixture("mig-lgip-h100nvl.txt"))
    }

    const H100NVL: &str = "NVIDIA H100 NVL";

    fn ids(planned: &[Planned]) -> Vec<u32> {
        planned.iter().map(|p| p.profile_id).collect()
    }

    #[test]
    fn the_captured_lgip_lists_the_h100_nvl_profiles() {
        let profiles = h100nvl_profiles();
        let summary: Vec<(&str, u32, u32, u32)> = profiles
            .iter()
            .map(|p| (p.profile.as_str(), p.profile_id, p.free, p.total))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("1g.12gb", 19, 7, 7),
                ("3g.47gb", 9, 2, 2),
                ("7g.94gb", 0, 1, 1)
            ]
        );
    }

    #[test]
    fn fill_takes_as_many_as_the_gpu_holds() {
        let profiles = h100nvl_profiles();
        let plan1 = plan(&Layout::Fill("1g.12gb".into()), H100NVL, &profiles).unwrap();
        assert_eq!(ids(&plan1), vec![19; 7]);
        let plan3 = plan(&Layout::Fill("3g.47gb".into()), H100NVL, &profiles).unwrap();
        assert_eq!(ids(&plan3), vec![9, 9]);
        // The total counts, not what is free now: the GPU's instances are replaced.
        let mut busy = h100nvl_profiles();
        busy[0].free = 2;
        let plan_busy = plan(&Layout::Fill("1g.12gb".into()), H100NVL, &busy).unwrap();
        assert_eq!(plan_busy.len(), 7);
    }

    #[test]
    fn an_explicit_list_is_checked_and_created_largest_first() {
        let profiles = h100nvl_profiles();
        let layout = Layout::parse("1g.12gb,3g.47gb,1g.12gb").unwrap();
        let planned = plan(&layout, H100NVL, &profiles).unwrap();
        assert_eq!(ids(&planned), vec![9, 19, 19]);
        assert_eq!(planned[0].profile, "3g.47gb");
        // All seven slices.
        let full = Layout::parse("3g.47gb,3g.47gb,1g.12gb").unwrap();
        assert_eq!(
            ids(&plan(&full, H100NVL, &profiles).unwrap()),
            vec![9, 9, 19]
        );
    }

    #[test]
    fn a_list_the_gpu_cannot_take_is_refused_naming_why() {
        let profiles = h100nvl_profiles();
        let refuse = |layout: &str| plan(&Layout::parse(layout).unwrap(), H100NVL, &profiles);
        assert_eq!(
            refuse("3g.40gb,2g.20gb,1g.10gb").unwrap_err(),
            "3g.40gb is not a MIG profile of NVIDIA H100 NVL (its profiles: 1g.12gb, 3g.47gb, 7g.94gb)"
        );
        assert_eq!(
            refuse("1g.10gb").unwrap_err(),
            "1g.10gb is not a MIG profile of NVIDIA H100 NVL (its profiles: 1g.12gb, 3g.47gb, 7g.94gb)"
        );
        assert_eq!(
            refuse("3g.47gb,3g.47gb,3g.47gb").unwrap_err(),
            "3g.47gb,3g.47gb,3g.47gb does not fit NVIDIA H100 NVL: it holds at most 2 3g.47gb"
        );
        assert_eq!(
            refuse("3g.47gb,3g.47gb,1g.12gb,1g.12gb").unwrap_err(),
            "3g.47gb,3g.47gb,1g.12gb,1g.12gb does not fit NVIDIA H100 NVL: it takes 8 slices of its 7"
        );
        assert_eq!(
            refuse("7g.94gb,1g.12gb").unwrap_err(),
            "7g.94gb,1g.12gb does not fit NVIDIA H100 NVL: it takes 8 slices of its 7"
        );
    }

    #[test]
    fn an_a30_has_four_slices() {
        let lgip = "\
|   0  MIG 1g.6gb        14     4/4        5.81       No     14     1     0   |
|   0  MIG 2g.12gb        5     2/2        11.69      No     28     2     0   |
|   0  MIG 4g.24gb        0     1/1        23.44      No     56     4     1   |
";
        let profiles = gpu::parse_mig_lgip(lgip);
        let layout = Layout::parse("2g.12gb,1g.6gb,1g.6gb").unwrap();
        assert_eq!(
            ids(&plan(&layout, "NVIDIA A30", &profiles).unwrap()),
            vec![5, 14, 14]
        );
        let layout = Layout::parse("2g.12gb,2g.12gb,1g.6gb").unwrap();
        assert!(plan(&layout, "NVIDIA A30", &profiles)
            .unwrap_err()
            .contains("takes 5 slices of its 4"));
    }

    #[test]
    fn the_telling_line_of_a_tool_answer() {
        let cgi = "Successfully created GPU instance ID 13 on GPU 0 using profile MIG 1g.12gb (ID 19)\n\
                   Unable to create a GPU instance on GPU 0 using profile 9: Insufficient Resources\n";
        assert_eq!(
            telling_line(cgi).as_deref(),
            Some(
                "Unable to create a GPU instance on GPU 0 using profile 9: Insufficient Resources"
            )
        );
        assert_eq!(
            telling_line("\n  All done.\n").as_deref(),
            Some("All done.")
        );
        assert_eq!(telling_line(""), None);
    }

    /// A stateful `nvidia-smi` of GPUs answering as driver 550 does: `-mig 1` turns MIG mode
    /// on (or leaves it pending, or says Not Supported), `-cgi` makes instances that `-L` and
    /// `-lgi` then list, `-dci`/`-dgi` remove them. Every call is recorded.
    struct FakeSmi {
        gpus: Vec<FakeGpu>,
        calls: Vec<String>,
        /// Fails this command (its argv joined by spaces) as a hung tool would.
        hang_on: Option<&'static str>,
    }

    #[derive(Clone)]
    struct FakeGpu {
        name: &'static str,
        /// `None`: no MIG (a consumer GPU).
        profiles: Option<&'static str>,
        mig: bool,
        /// `-mig 1` only makes the mode pending (the GPU is in use).
        stays_pending: bool,
        pending: bool,
        /// (GPU instance id, profile name).
        instances: Vec<(u32, String)>,
        next_gi: u32,
    }

    impl FakeGpu {
        fn h100nvl() -> Self {
            FakeGpu {
                name: H100NVL,
                profiles: Some("1g.12gb:19:7,3g.47gb:9:2,7g.94gb:0:1"),
                mig: false,
                stays_pending: false,
                pending: false,
                instances: Vec::new(),
                next_gi: 1,
            }
        }

        fn rtx4090() -> Self {
            FakeGpu {
                name: "NVIDIA GeForce RTX 4090",
                profiles: None,
                ..FakeGpu::h100nvl()
            }
        }

        fn profile_table(&self) -> Vec<(String, u32, u32)> {
            self.profiles
                .unwrap_or_default()
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let mut parts = p.split(':');
                    let name = parts.next().unwrap().to_string();
                    let id = parts.next().unwrap().parse().unwrap();
                    let total = parts.next().unwrap().parse().unwrap();
                    (name, id, total)
                })
                .collect()
        }
    }

    fn failed(output: &str) -> ToolError {
        ToolError::Failed {
            program: "nvidia-smi".into(),
            status: "exit status: 6".into(),
            output: output.into(),
        }
    }

    impl FakeSmi {
        fn new(gpus: Vec<FakeGpu>) -> Self {
            FakeSmi {
                gpus,
                calls: Vec::new(),
                hang_on: None,
            }
        }

        /// The calls that change MIG state.
        fn changes(&self) -> Vec<&str> {
            self.calls
                .iter()
                .map(String::as_str)
                .filter(|c| {
                    ["-mig", "-cgi", "-dgi", "-dci"]
                        .iter()
                        .any(|a| c.contains(a))
                })
                .collect()
        }

        fn run(&mut self, args: &[&str]) -> Result<String, ToolError> {
            let line = args.join(" ");
            self.calls.push(line.clone());
            if self.hang_on == Some(line.as_str()) {
                return Err(ToolError::TimedOut("nvidia-smi".into(), TOOL_TIMEOUT));
            }
            let mode = |on: bool| if on { "Enabled" } else { "Disabled" };
            match args {
                [query, _format] if query.starts_with("--query-gpu=") => Ok(self
                    .gpus
                    .iter()
                    .enumerate()
                    .map(|(i, g)| {
                        let (current, pending) = match g.profiles {
                            Some(_) => (mode(g.mig), mode(g.mig || g.pending)),
                            None => ("[N/A]", "[N/A]"),
                        };
                        format!("{i}, GPU-{i:08}-aaaa-bbbb-cccc-dddddddddddd, {}, 95830, 0, 0, 550.90.07, {current}, {pending}\n", g.name)
                    })
                    .collect()),
                ["-L"] => {
                    let mut out = String::new();
                    for (i, g) in self.gpus.iter().enumerate() {
                        out += &format!("GPU {i}: {} (UUID: GPU-{i:08}-aaaa-bbbb-cccc-dddddddddddd)\n", g.name);
                        for (device, (gi, profile)) in g.instances.iter().enumerate() {
                            out += &format!("  MIG {profile:<11} Device {device:>2}: (UUID: MIG-{i:04}{gi:04}-aaaa-5bbb-8ccc-dddddddddddd)\n");
                        }
                    }
                    Ok(out)
                }
                ["-i", i, "-mig", "1"] => {
                    let g = &mut self.gpus[i.parse::<usize>().unwrap()];
                    if g.profiles.is_none() {
                        // As the driver prints it, with a success status.
                        return Ok("Unable to enable MIG Mode for GPU 00000000:01:00.0: Not Supported\nTreating as warning and moving on.\nAll done.\n".into());
                    }
                    if g.stays_pending {
                        g.pending = true;
                        return Ok("Warning: MIG mode is in pending enable state for GPU 00000000:07:00.0:In use by another client\nAll done.\n".into());
                    }
                    g.mig = true;
                    Ok("Enabled MIG Mode for GPU 00000000:07:00.0\nAll done.\n".into())
                }
                ["mig", "-i", i, command, rest @ ..] => {
                    let index: u32 = i.parse().unwrap();
                    let g = &mut self.gpus[index as usize];
                    if !g.mig {
                        return Err(failed("No MIG-enabled devices found."));
                    }
                    match (*command, rest) {
                        ("-lgip", []) => {
                            let mut out = String::from("| GPU instance profiles: |\n");
                            for (name, id, total) in g.profile_table() {
                                out += &format!("|   {index}  MIG {name:<12} {id:>3}     {total}/{total}        10.62      No     16     1     0   |\n|                                                             1     1     0   |\n");
                            }
                            Ok(out)
                        }
                        ("-lgi", []) if g.instances.is_empty() => {
                            Err(failed("No GPU instances found: Not Found"))
                        }
                        ("-lgi", []) => Ok(g
                            .instances
                            .iter()
                            .map(|(gi, p)| format!("|   {index}  MIG {p}         19       {gi}          0:1     |\n"))
                            .collect()),
                        ("-dci", []) if g.instances.is_empty() => {
                            Err(failed("No compute instances found: Not Found"))
                        }
                        ("-dci", []) => Ok("Successfully destroyed compute instances\n".into()),
                        ("-dgi", []) if g.instances.is_empty() => {
                            Err(failed("No GPU instances found: Not Found"))
                        }
                        ("-dgi", []) => {
                            g.instances.clear();
                            Ok("Successfully destroyed GPU instances\n".into())
                        }
                        ("-cgi", [ids, "-C"]) => {
                            let table = g.profile_table();
                            for id in ids.split(',') {
                                let id: u32 = id.parse().unwrap();
                                let name = &table.iter().find(|p| p.1 == id).unwrap().0;
                                g.instances.push((g.next_gi, name.clone()));
                                g.next_gi += 1;
                            }
                            Ok("Successfully created GPU instances\n".into())
                        }
                        _ => Err(failed("unknown arguments")),
                    }
                }
                _ => Err(failed("unknown arguments")),
            }
        }

        fn apply(&mut self, layout: &str) -> MigLayoutReport {
            apply(layout, &mut |args| self.run(args))
        }

        fn profiles_of(&self, gpu: usize) -> Vec<&str> {
            let mut profiles: Vec<&str> = self.gpus[gpu]
                .instances
                .iter()
                .map(|(_, p)| p.as_str())
                .collect();
            profiles.sort_unstable();
            profiles
        }
    }

    #[test]
    fn a_fresh_gpu_gets_mig_mode_and_the_layout_and_a_restart_changes_nothing() {
        let mut smi = FakeSmi::new(vec![FakeGpu::h100nvl(), FakeGpu::h100nvl()]);
        let report = smi.apply("1g.12gb");
        assert_eq!(
            report,
            MigLayoutReport {
                requested: "1g.12gb".into(),
                error: None,
                changed_gpus: vec![0, 1],
            }
        );
        assert_eq!(
            smi.changes(),
            vec![
                "-i 0 -mig 1",
                "mig -i 0 -cgi 19,19,19,19,19,19,19 -C",
                "-i 1 -mig 1",
                "mig -i 1 -cgi 19,19,19,19,19,19,19 -C",
            ]
        );
        assert_eq!(smi.profiles_of(1), vec!["1g.12gb"; 7]);
        // The devices as the inventory reads them.
        let gpus = gpu::detect_with(&mut |args| smi.run(args)).unwrap();
        assert_eq!(gpus[0].mig_devices.len(), 7);
        assert!(gpus[0].mig_devices[0].uuid.starts_with("MIG-"));

        // The agent restarts with the same layout: nothing is destroyed or created.
        smi.calls.clear();
        let again = smi.apply("1g.12gb");
        assert_eq!(again.error, None);
        assert!(again.changed_gpus.is_empty());
        assert_eq!(smi.changes(), Vec::<&str>::new(), "{:?}", smi.calls);
    }

    #[test]
    fn another_layout_replaces_the_instances() {
        let mut smi = FakeSmi::new(vec![FakeGpu::h100nvl()]);
        assert_eq!(smi.apply("1g.12gb").error, None);
        smi.calls.clear();
        let report = smi.apply("1g.12gb,3g.47gb");
        assert_eq!(report.error, None);
        assert_eq!(report.changed_gpus, vec![0]);
        assert_eq!(
            smi.changes(),
            vec!["mig -i 0 -dci", "mig -i 0 -dgi", "mig -i 0 -cgi 9,19 -C"]
        );
        assert_eq!(smi.profiles_of(0), vec!["1g.12gb", "3g.47gb"]);
    }

    #[test]
    fn a_consumer_gpu_is_refused_by_name_and_the_others_still_get_the_layout() {
        let mut smi = FakeSmi::new(vec![FakeGpu::rtx4090(), FakeGpu::h100nvl()]);
        let report = smi.apply("1g.12gb");
        assert_eq!(
            report.error.as_deref(),
            Some("cannot apply MIG layout 1g.12gb: GPU 0: NVIDIA GeForce RTX 4090 has no MIG support (nvidia-smi -i 0 -mig 1: Unable to enable MIG Mode for GPU 00000000:01:00.0: Not Supported)")
        );
        assert_eq!(report.changed_gpus, vec![1]);
        assert_eq!(smi.profiles_of(1), vec!["1g.12gb"; 7]);
        // Nothing but the mode change was tried on the 4090.
        assert!(
            !smi.calls.iter().any(|c| c.starts_with("mig -i 0")),
            "{:?}",
            smi.calls
        );
    }

    #[test]
    fn a_mode_change_that_needs_a_reset_is_reported_not_waited_for() {
        let mut gpu = FakeGpu::h100nvl();
        gpu.stays_pending = true;
        let mut smi = FakeSmi::new(vec![gpu]);
        let report = smi.apply("1g.12gb");
        let error = report.error.unwrap();
        assert!(
            error.contains("GPU 0: MIG mode on NVIDIA H100 NVL is pending")
                && error.contains("GPU reset (nvidia-smi -i 0 -r"),
            "{error}"
        );
        assert_eq!(smi.changes(), vec!["-i 0 -mig 1"]);
    }

    #[test]
    fn an_unknown_profile_is_refused_before_anything_is_destroyed() {
        let mut smi = FakeSmi::new(vec![FakeGpu::h100nvl()]);
        smi.apply("3g.47gb,3g.47gb");
        smi.calls.clear();
        let report = smi.apply("3g.40gb,2g.20gb,1g.10gb");
        assert_eq!(
            report.error.as_deref(),
            Some("cannot apply MIG layout 3g.40gb,2g.20gb,1g.10gb: GPU 0: 3g.40gb is not a MIG profile of NVIDIA H100 NVL (its profiles: 1g.12gb, 3g.47gb, 7g.94gb)")
        );
        assert_eq!(smi.changes(), Vec::<&str>::new());
        assert_eq!(smi.profiles_of(0), vec!["3g.47gb", "3g.47gb"]);
    }

    #[test]
    fn bad_syntax_no_gpu_no_driver_and_a_hang_are_reported() {
        let mut smi = FakeSmi::new(vec![FakeGpu::h100nvl()]);
        let report = smi.apply("3g40gb");
        assert!(report
            .error
            .unwrap()
            .starts_with("invalid MIG layout \"3g40gb\""));
        assert!(
            smi.calls.is_empty(),
            "nothing run for a layout that does not parse"
        );

        let mut smi = FakeSmi::new(Vec::new());
        assert_eq!(
            smi.apply("1g.12gb").error.as_deref(),
            Some("cannot apply MIG layout 1g.12gb: this node has no NVIDIA GPU")
        );

        let report = apply("1g.12gb", &mut |_| {
            Err(ToolError::NotFound("nvidia-smi".into()))
        });
        assert!(report
            .error
            .unwrap()
            .contains("nvidia-smi is not installed"));

        // A hang on the first GPU: the second is not tried (it would hang the same way).
        let mut smi = FakeSmi::new(vec![FakeGpu::h100nvl(), FakeGpu::h100nvl()]);
        smi.hang_on = Some("-i 0 -mig 1");
        let report = smi.apply("1g.12gb");
        assert!(report
            .error
            .unwrap()
            .contains("GPU 0: nvidia-smi did not finish"));
        assert!(
            !smi.calls.iter().any(|c| c.contains("-i 1")),
            "{:?}",
            smi.calls
        );
    }

    #[test]
    fn no_layout_no_report() {
        apply_at_startup(None);
        apply_at_startup(Some("  "));
        assert_eq!(startup_report(), None);
    }
}
