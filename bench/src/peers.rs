//! The tools users would pick instead, measured in the same run: Ray (a `@ray.remote` no-op,
//! through `bench/peers/ray_noop.py` in a venv) and SSH (`ssh host true` against a local sshd
//! on a loopback port). Either may be missing on a machine; the bench then says so in the
//! table instead of leaving the row out.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use tokio::process::{Child, Command};

use crate::stats::Latency;
use crate::Limits;

/// Where `scripts/bench.sh` installs the peers' Python tools (as scripts/test.sh does moto).
const DEFAULT_TOOLS_DIR: &str = "/var/tmp/skyward-tools";
/// Ray's whole run (start-up, warm-up, both measurements, shutdown) must end within this.
const RAY_TIME_LIMIT: Duration = Duration::from_secs(300);
/// Untimed and timed sequential Ray calls; Ray takes about a millisecond each.
pub const RAY_WARMUP: usize = 200;
pub const RAY_SEQUENTIAL: usize = 2_000;
/// Ray tasks submitted at once, then gathered with one `ray.get`.
pub const RAY_PIPELINED: usize = 20_000;
/// Longest accepted line of the Ray script's output.
const MAX_RAY_OUTPUT: usize = 64 * 1024;
/// `ssh host true` invocations: untimed, then timed (the median is reported).
pub const SSH_WARMUP: usize = 2;
pub const SSH_RUNS: usize = 20;
/// Bound on one `ssh`, `scp` or `rsync` invocation.
pub const SSH_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the local sshd gets to listen.
const SSHD_START_TIMEOUT: Duration = Duration::from_secs(10);
const SSHD: &str = "/usr/sbin/sshd";
const INSTALL_HINT: &str = "run scripts/bench.sh, which installs the peers";

/// Ray's numbers, as `ray_noop.py` prints them.
#[derive(Debug, Clone, Deserialize)]
pub struct RayNumbers {
    pub ray_version: String,
    pub init_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Tasks per second, one value per repetition.
    pub pipelined_per_s: Vec<f64>,
}

/// The venv's Python, or why there is none.
fn ray_python() -> Result<PathBuf> {
    let tools = std::env::var_os("SKYWARD_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TOOLS_DIR));
    let python = tools.join("ray/bin/python");
    ensure!(
        python.is_file(),
        "Ray is not installed ({} missing): {INSTALL_HINT}",
        python.display()
    );
    Ok(python)
}

/// Runs the Ray script in a session of its own under a fresh temp dir; whatever happens, every
/// process left with that dir on its command line (Ray's raylet, GCS and workers) is killed
/// and the dir removed.
pub async fn ray(repeats: usize) -> Result<RayNumbers> {
    let python = ray_python()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/ray_noop.py");
    // Short and under /tmp: Ray puts unix sockets in it, whose paths are limited to 107 bytes.
    let temp = tempfile::Builder::new()
        .prefix("sbray-")
        .tempdir_in("/tmp")
        .context("creating Ray's temp dir")?;
    let mut command = Command::new(&python);
    command
        .arg(&script)
        .arg("--temp-dir")
        .arg(temp.path())
        .args(["--warmup", &RAY_WARMUP.to_string()])
        .args(["--sequential", &RAY_SEQUENTIAL.to_string()])
        .args(["--pipelined", &RAY_PIPELINED.to_string()])
        .args(["--repeats", &repeats.to_string()])
        .args(["--time-limit", &RAY_TIME_LIMIT.as_secs().to_string()])
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let outcome = async {
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let output = tokio::time::timeout(
            RAY_TIME_LIMIT + Duration::from_secs(10),
            child.wait_with_output(),
        )
        .await
        .with_context(|| format!("Ray took longer than {RAY_TIME_LIMIT:?}"))??;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
            bail!(
                "the Ray script exited with {}: {}",
                output.status,
                last.unwrap_or("no error output")
            );
        }
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("the Ray script printed no result line")?;
        ensure!(
            line.len() <= MAX_RAY_OUTPUT,
            "the Ray result line is too long"
        );
        let numbers: RayNumbers =
            serde_json::from_str(line).context("reading the Ray script's result")?;
        ensure!(
            !numbers.pipelined_per_s.is_empty() && numbers.p50_us > 0.0,
            "the Ray script reported no measurements"
        );
        anyhow::Ok(numbers)
    }
    .await;
    kill_processes_mentioning(temp.path());
    let _ = temp.close();
    outcome
}

/// SIGKILLs every process whose command line mentions `marker` (never this process).
fn kill_processes_mentioning(marker: &Path) {
    let marker = marker.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&marker) {
            // SAFETY: kill(2) with a positive pid read from /proc just now.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// A local sshd on a loopback port, with its own host key and one authorized client key, in
/// a temp dir; stopped (and the dir removed) when dropped.
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    user: String,
}

impl Sshd {
    pub async fn start() -> Result<Sshd> {
        ensure!(
            Path::new(SSHD).is_file(),
            "openssh-server is not installed ({SSHD} missing): {INSTALL_HINT}"
        );
        let dir = tempfile::Builder::new()
            .prefix("skyward-bench-sshd-")
            .tempdir()
            .context("creating the sshd temp dir")?;
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.path().join(key))
                .stdin(Stdio::null())
                .status()
                .await
                .context("running ssh-keygen (openssh-client)")?;
            ensure!(status.success(), "ssh-keygen exited with {status}");
        }
        std::fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )?;
        let port = free_port()?;
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}\n\
                 HostKey {dir}/host_key\n\
                 AuthorizedKeysFile {dir}/authorized_keys\n\
                 PidFile none\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 Subsystem sftp internal-sftp\n",
                dir = dir.path().display()
            ),
        )?;
        // sshd run as root insists on its privilege separation dir.
        let _ = std::fs::create_dir_all("/run/sshd");
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting sshd")?;
        let user = current_user().await?;
        let mut sshd = Sshd {
            child,
            dir,
            port,
            user,
        };
        let deadline = Instant::now() + SSHD_START_TIMEOUT;
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                break;
            }
            if let Some(status) = sshd.child.try_wait()? {
                bail!("sshd exited with {status} before listening");
            }
            ensure!(
                Instant::now() < deadline,
                "sshd did not listen on 127.0.0.1:{port} within {SSHD_START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(sshd)
    }

    /// `user@127.0.0.1`.
    pub fn destination(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }

    /// The options every ssh-based client here needs, for `ssh`'s own command line.
    pub fn ssh_options(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.dir.path().join("client_key").display().to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// `ssh -p PORT OPTIONS`, as one string for `rsync -e`.
    pub fn ssh_for_rsync(&self) -> String {
        format!("ssh -p {} {}", self.port, self.ssh_options().join(" "))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ssh host true`, `SSH_WARMUP` untimed then `runs` timed.
    pub async fn true_round_trips(&self, runs: usize) -> Result<Vec<Duration>> {
        let mut samples = Vec::with_capacity(runs);
        for i in 0..SSH_WARMUP + runs {
            let mut command = Command::new("ssh");
            command
                .args(["-p", &self.port.to_string()])
                .args(self.ssh_options())
                .arg(self.destination())
                .arg("true");
            let elapsed = run_timed(command, "ssh host true", SSH_COMMAND_TIMEOUT).await?;
            if i >= SSH_WARMUP {
                samples.push(elapsed);
            }
        }
        Ok(samples)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Runs `command` to completion within `limit`, checking it succeeded; returns its wall time.
pub async fn run_timed(mut command: Command, what: &str, limit: Duration) -> Result<Duration> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let start = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("{what} took longer than {limit:?}"))??;
    let elapsed = start.elapsed();
    ensure!(
        output.status.success(),
        "{what} exited with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(elapsed)
}

/// A loopback TCP port free right now (sshd binds it a moment later).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

async fn current_user() -> Result<String> {
    let output = Command::new("id")
        .arg("-un")
        .output()
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => anyhow::anyhow!("`id` not found"),
            _ => e.into(),
        })?;
    let user = String::from_utf8_lossy(&output.stdout).trim().to_string();
    ensure!(
        output.status.success() && !user.is_empty(),
        "cannot tell the current user"
    );
    Ok(user)
}

/// `repeats` pipelined runs of [`TRUE_PIPELINED`] `true` commands on `pool`, in tasks/s.
async fn true_pipelined(
    pool: &skyward_coordinator::Pool,
    repeats: usize,
    limits: &Limits,
) -> Result<Vec<f64>> {
    let mut runs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        runs.push(
            crate::skyward::throughput(
                pool,
                crate::skyward::Noop::TrueCommand,
                TRUE_PIPELINED,
                crate::IN_FLIGHT,
                limits,
            )
            .await?,
        );
    }
    Ok(runs)
}

/// Dispatch peers' numbers, with Skyward's `true` command measured beside them.
pub struct PeerResults {
    /// `true` as a Skyward command task on a ready node.
    pub sky_true: Latency,
    /// [`TRUE_PIPELINED`] `true` commands at once, tasks/s per run: on 1 node and on
    /// [`crate::MANY`].
    pub true_one: Vec<f64>,
    pub true_many: Vec<f64>,
    /// `ssh host true`, one wall time per run; or why SSH could not be measured.
    pub ssh_true: Result<Vec<Duration>, String>,
    pub ray: Result<RayNumbers, String>,
}

/// Untimed and timed Skyward `true` commands.
pub const TRUE_WARMUP: usize = 20;
pub const TRUE_RUNS: usize = 200;
/// `true` commands per pipelined run (each a process on the node), [`crate::IN_FLIGHT`] at
/// once.
pub const TRUE_PIPELINED: usize = 2_000;

/// Skyward's `true` beside `ssh host true` (alternating batches on the same machine state),
/// then Ray's no-op. A peer that cannot run is recorded with the reason, not an error.
pub async fn measure(
    agent_bin: &Path,
    scratch: &Path,
    sshd: &Result<Sshd, String>,
    repeats: usize,
    limits: &Limits,
) -> Result<PeerResults> {
    crate::progress("bringing up a local pool of 1 agent for `true` commands");
    // A root of its own: a local pool's dir is not reused by a second pool.
    let pool = crate::skyward::pool_up(agent_bin, &scratch.join("true-command"), 1).await?;
    let measured = async {
        let latency =
            crate::skyward::true_round_trips(&pool, TRUE_WARMUP, TRUE_RUNS, limits).await?;
        let runs = true_pipelined(&pool, repeats, limits).await?;
        anyhow::Ok((latency, runs))
    }
    .await;
    pool.down().await;
    let (sky_true, true_one) = measured?;
    crate::progress(&format!(
        "  skyward `true` p50 {:.0} us; pipelined {:?}/s",
        crate::stats::micros(sky_true.p50),
        true_one
    ));
    crate::progress(&format!(
        "bringing up a local pool of {} agents for `true` commands",
        crate::MANY
    ));
    let pool = crate::skyward::pool_up(agent_bin, &scratch.join("true-many"), crate::MANY).await?;
    let true_many = true_pipelined(&pool, repeats, limits).await;
    pool.down().await;
    let true_many = true_many?;
    crate::progress(&format!(
        "  skyward `true` on {} agents: pipelined {:?}/s",
        crate::MANY,
        true_many
    ));
    let ssh_true = match sshd {
        Ok(sshd) => {
            crate::progress(&format!("ssh host true: {SSH_RUNS} runs"));
            sshd.true_round_trips(SSH_RUNS)
                .await
                .map_err(|e| format!("{e:#}"))
        }
        Err(why) => Err(why.clone()),
    };
    crate::progress(&format!(
        "Ray: {RAY_WARMUP} warm-up + {RAY_SEQUENTIAL} sequential no-ops, {repeats} x {RAY_PIPELINED} at once"
    ));
    let ray = ray(repeats).await.map_err(|e| format!("{e:#}"));
    match &ray {
        Ok(r) => crate::progress(&format!(
            "  Ray {} p50 {:.0} us, pipelined {:?}/s",
            r.ray_version, r.p50_us, r.pipelined_per_s
        )),
        Err(why) => crate::progress(&format!("  Ray not measured: {why}")),
    }
    Ok(PeerResults {
        sky_true,
        true_one,
        true_many,
        ssh_true,
        ray,
    })
}
