//! Footprint: the agent binary's size, an idle agent's memory and CPU, and the `skyward` CLI's
//! memory with a local pool of 8 nodes up. Read from `/proc` (Linux only), every wait bounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::skyward;

/// How long the connected agent sits idle before its memory is read.
pub const SETTLE: Duration = Duration::from_secs(3);
/// The idle window over which the agent's CPU time is measured.
pub const CPU_WINDOW: Duration = Duration::from_secs(5);
/// Nodes in the CLI memory measurement.
pub const CLI_NODES: usize = 8;
/// How long the CLI's task sleeps, which keeps its pool up.
pub const CLI_SLEEP_S: u64 = 4;
/// When the CLI's memory is read, counted from its spawn (once its agents are seen).
pub const CLI_SAMPLE_AT: Duration = Duration::from_millis(2_500);
/// Bound on finding the agents of a pool in `/proc`.
const FIND_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two scans of `/proc`.
const POLL: Duration = Duration::from_millis(50);
/// Bound on the whole `skyward run` of the CLI measurement.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the number of `/proc` entries looked at in one scan.
const MAX_PROC_ENTRIES: usize = 1_000_000;
/// Linux's USER_HZ, the unit of `/proc/<pid>/stat`'s times, when `getconf` cannot say.
const DEFAULT_CLOCK_TICKS: u64 = 100;

/// What the footprint measurements found.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// Size of target/release/skyward-agent in bytes.
    pub agent_binary_bytes: u64,
    /// The idle agent's VmRSS and VmHWM, in bytes.
    pub agent_rss_bytes: u64,
    pub agent_hwm_bytes: u64,
    /// utime + stime over the idle window, in clock ticks, and the ticks per second.
    pub agent_cpu_ticks: u64,
    pub clock_ticks: u64,
    /// The idle window as actually measured (wall time).
    pub agent_cpu_wall: Duration,
    /// The CLI's VmRSS and VmHWM with its pool up, in bytes, and when (since spawn) it was read.
    pub cli_rss_bytes: u64,
    pub cli_hwm_bytes: u64,
    pub cli_sampled_at: Duration,
}

impl Footprint {
    /// Percent of one core the idle agent used.
    pub fn agent_cpu_percent(&self) -> f64 {
        cpu_percent(self.agent_cpu_ticks, self.clock_ticks, self.agent_cpu_wall)
    }

    /// The smallest nonzero CPU percentage the window can show (one clock tick).
    pub fn agent_cpu_resolution(&self) -> f64 {
        cpu_percent(1, self.clock_ticks, self.agent_cpu_wall)
    }
}

/// Runs all four measurements; `scratch` is the bench's temp dir, removed by the caller.
pub async fn measure(skyward_bin: &Path, agent_bin: &Path, scratch: &Path) -> Result<Footprint> {
    let agent_binary_bytes = std::fs::metadata(agent_bin)
        .with_context(|| format!("reading the size of {}", agent_bin.display()))?
        .len();
    crate::progress(&format!(
        "skyward-agent binary: {} bytes",
        crate::stats::thousands(agent_binary_bytes as f64)
    ));

    let root = scratch.join("footprint");
    std::fs::create_dir_all(&root)?;
    crate::progress("bringing up a local pool of 1 agent for the idle footprint");
    let pool = skyward::pool_up(agent_bin, &root, 1).await?;
    let idle = idle_agent(&root).await;
    pool.down().await;
    let (agent_rss_bytes, agent_hwm_bytes, agent_cpu_ticks, agent_cpu_wall) = idle?;
    let clock_ticks = clock_ticks();

    let home = scratch.join("footprint-home");
    std::fs::create_dir_all(&home)?;
    crate::progress(&format!(
        "skyward run --nodes {CLI_NODES} --on one -- sleep {CLI_SLEEP_S}: sampling the CLI's memory"
    ));
    let (cli_rss_bytes, cli_hwm_bytes, cli_sampled_at) = cli_memory(skyward_bin, &home).await?;

    let footprint = Footprint {
        agent_binary_bytes,
        agent_rss_bytes,
        agent_hwm_bytes,
        agent_cpu_ticks,
        clock_ticks,
        agent_cpu_wall,
        cli_rss_bytes,
        cli_hwm_bytes,
        cli_sampled_at,
    };
    crate::progress(&format!(
        "  idle agent RSS {:.1} MB, CPU {:.3}% of a core; CLI RSS {:.1} MB with {CLI_NODES} nodes",
        mb(footprint.agent_rss_bytes),
        footprint.agent_cpu_percent(),
        mb(footprint.cli_rss_bytes)
    ));
    Ok(footprint)
}

/// The one agent under `root`: memory after [`SETTLE`], then CPU over [`CPU_WINDOW`].
async fn idle_agent(root: &Path) -> Result<(u64, u64, u64, Duration)> {
    let pids = wait_for_agents(root, 1).await?;
    ensure!(
        pids.len() == 1,
        "expected 1 agent under {}, found {pids:?}",
        root.display()
    );
    let pid = pids[0];
    tokio::time::sleep(SETTLE).await;
    let status = read_proc(pid, "status")?;
    let rss = status_bytes(&status, "VmRSS").context("no VmRSS in the agent's status")?;
    let hwm = status_bytes(&status, "VmHWM").context("no VmHWM in the agent's status")?;

    let before = stat_cpu_ticks(&read_proc(pid, "stat")?).context("parsing the agent's stat")?;
    let start = Instant::now();
    tokio::time::sleep(CPU_WINDOW).await;
    let after = stat_cpu_ticks(&read_proc(pid, "stat")?).context("parsing the agent's stat")?;
    let wall = start.elapsed();
    // The same process throughout: still an agent under `root`.
    ensure!(
        find_agents(root)?.contains(&pid),
        "agent {pid} went away during the idle measurement"
    );
    Ok((rss, hwm, after.saturating_sub(before), wall))
}

/// `skyward run --nodes 8 --on one -- sleep 4`: the CLI's VmRSS and VmHWM once its agents
/// are running and about [`CLI_SAMPLE_AT`] after spawn; the run must then exit with 0.
async fn cli_memory(skyward_bin: &Path, home: &Path) -> Result<(u64, u64, Duration)> {
    let nodes = CLI_NODES.to_string();
    let sleep = CLI_SLEEP_S.to_string();
    let args = [
        "run", "--nodes", &nodes, "--on", "one", "--", "sleep", &sleep,
    ];
    let mut child = tokio::process::Command::new(skyward_bin)
        .args(args)
        .env("SKYWARD_HOME", home)
        .env_remove("SKYWARD_AGENT_BIN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", skyward_bin.display()))?;
    let spawned = Instant::now();
    let pid = child.id().context("the skyward CLI exited at once")?;
    let sample = async {
        let agents = wait_for_agents(home, CLI_NODES).await?;
        ensure!(
            agents.len() == CLI_NODES,
            "expected {CLI_NODES} agents under {}, found {}",
            home.display(),
            agents.len()
        );
        if let Some(left) = CLI_SAMPLE_AT.checked_sub(spawned.elapsed()) {
            tokio::time::sleep(left).await;
        }
        let at = spawned.elapsed();
        let status = read_proc(pid, "status")?;
        let rss = status_bytes(&status, "VmRSS").context("no VmRSS in the CLI's status")?;
        let hwm = status_bytes(&status, "VmHWM").context("no VmHWM in the CLI's status")?;
        anyhow::Ok((rss, hwm, at))
    };
    let sampled = sample.await;
    if sampled.is_err() {
        // SIGTERM first, so that the CLI tears its pool down; the bounded wait below and
        // kill_on_drop are the backstops.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let mut stderr = child.stderr.take();
    let read_stderr = async {
        let mut text = String::new();
        if let Some(pipe) = stderr.as_mut() {
            use tokio::io::AsyncReadExt as _;
            let _ = pipe.read_to_string(&mut text).await;
        }
        text
    };
    let waited = tokio::time::timeout(CLI_TIMEOUT, async {
        let (text, status) = tokio::join!(read_stderr, child.wait());
        (text, status)
    })
    .await;
    let (stderr_text, status) = match waited {
        Ok((text, status)) => (text, status.context("waiting for the skyward CLI")?),
        Err(_) => {
            let _ = child.kill().await;
            bail!("skyward run took longer than {CLI_TIMEOUT:?}");
        }
    };
    let sampled = sampled?;
    if !status.success() {
        bail!(
            "skyward {} exited with {status}: {}",
            args.join(" "),
            stderr_text.trim()
        );
    }
    // Its teardown must have taken the agents with it.
    ensure!(
        find_agents(home)?.is_empty(),
        "agents under {} outlived the skyward CLI",
        home.display()
    );
    Ok(sampled)
}

/// Polls `/proc` until `count` agents under `root` run, for at most [`FIND_TIMEOUT`].
async fn wait_for_agents(root: &Path, count: usize) -> Result<Vec<u32>> {
    let deadline = Instant::now() + FIND_TIMEOUT;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        last = find_agents(root)?;
        if last.len() >= count {
            return Ok(last);
        }
        tokio::time::sleep(POLL).await;
    }
    bail!(
        "found {} of {count} skyward-agent processes under {} after {FIND_TIMEOUT:?}",
        last.len(),
        root.display()
    )
}

/// Pids of the `skyward-agent` processes whose command line mentions `root`.
pub fn find_agents(root: &Path) -> Result<Vec<u32>> {
    let root = root.to_string_lossy();
    let mut pids = Vec::new();
    let entries = std::fs::read_dir("/proc").context("reading /proc")?;
    for entry in entries.take(MAX_PROC_ENTRIES).flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while we look: an unreadable one is not ours.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if is_agent_under(&cmdline_args(&cmdline), &root) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

pub(crate) fn read_proc(pid: u32, file: &str) -> Result<String> {
    let path = PathBuf::from(format!("/proc/{pid}/{file}"));
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// `/proc/<pid>/cmdline`'s NUL-separated arguments.
pub fn cmdline_args(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `argv[0]` ends with `skyward-agent` and some argument mentions `root`.
pub fn is_agent_under(args: &[String], root: &str) -> bool {
    !root.is_empty()
        && args.first().is_some_and(|a| a.ends_with("skyward-agent"))
        && args[1..].iter().any(|a| a.contains(root))
}

/// A `/proc/<pid>/status` size field (`VmRSS:  1234 kB`) in bytes.
pub fn status_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    let mut words = line.split_once(':')?.1.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`, in clock ticks. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses, so fields are counted from
/// the last `)`.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state): utime is field 14, so index 11 here.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// Clock ticks per second (`getconf CLK_TCK`), else Linux's usual 100.
pub(crate) fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_CLOCK_TICKS)
}

/// CPU time in ticks over a wall-clock window, as a percentage of one core.
pub fn cpu_percent(ticks: u64, clock_ticks: u64, wall: Duration) -> f64 {
    let wall = wall.as_secs_f64();
    if clock_ticks == 0 || wall <= 0.0 {
        return 0.0;
    }
    ticks as f64 / clock_ticks as f64 / wall * 100.0
}

/// Bytes in MB (10^6 bytes).
pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tskyward-agent\nUmask:\t0022\nState:\tS (sleeping)\n\
VmPeak:\t  600000 kB\nVmHWM:\t    9000 kB\nVmRSS:\t    8192 kB\nRssAnon:\t    2048 kB\n\
Threads:\t3\n";

    #[test]
    fn status_fields_in_bytes() {
        assert_eq!(status_bytes(STATUS, "VmRSS"), Some(8192 * 1024));
        assert_eq!(status_bytes(STATUS, "VmHWM"), Some(9000 * 1024));
        assert_eq!(status_bytes(STATUS, "VmSwap"), None);
        // A field name that is a prefix of another does not match it.
        assert_eq!(status_bytes(STATUS, "Rss"), None);
        assert_eq!(status_bytes("VmRSS:\tlots kB\n", "VmRSS"), None);
        assert_eq!(status_bytes("VmRSS:\t12\n", "VmRSS"), None);
    }

    #[test]
    fn stat_cpu_fields() {
        let stat = "4242 (skyward-agent) S 1 4242 4242 0 -1 4194560 700 0 0 0 37 12 0 0 20 0 3 0 \
                    123456 600000000 2048 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some(49));
        // A command name with spaces and parentheses does not shift the fields.
        let odd = "7 (a) b (c) S 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 1 1";
        assert_eq!(stat_cpu_ticks(odd), Some(11));
        assert_eq!(stat_cpu_ticks("7 (x) S 1 2"), None);
        assert_eq!(stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn agent_command_lines() {
        let raw = b"/w/target/release/skyward-agent\0--coordinator\x00127.0.0.1:4433\0--work-dir\0/tmp/skyward-bench-x/footprint/pool-1/node-1\0";
        let args = cmdline_args(raw);
        assert_eq!(args.len(), 5);
        assert!(is_agent_under(&args, "/tmp/skyward-bench-x/footprint"));
        assert!(!is_agent_under(&args, "/tmp/skyward-bench-y"));
        assert!(!is_agent_under(&args, ""));
        let other = cmdline_args(b"/usr/bin/vim\0/tmp/skyward-bench-x/footprint/notes\0");
        assert!(!is_agent_under(&other, "/tmp/skyward-bench-x/footprint"));
        // Only argv[0] names the program: the root in argv[0] alone does not count.
        let renamed = cmdline_args(b"/tmp/skyward-bench-x/footprint/skyward-agent\0");
        assert!(!is_agent_under(&renamed, "/tmp/skyward-bench-x/footprint"));
        assert!(cmdline_args(b"").is_empty());
    }

    #[test]
    fn cpu_percent_of_a_core() {
        let p = cpu_percent(5, 100, Duration::from_secs(5));
        assert!((p - 1.0).abs() < 1e-9, "{p}");
        assert_eq!(cpu_percent(0, 100, Duration::from_secs(5)), 0.0);
        assert_eq!(cpu_percent(3, 100, Duration::ZERO), 0.0);
        assert!((mb(10_000_000) - 10.0).abs() < 1e-9);
    }
}
