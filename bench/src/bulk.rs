//! Bulk data: 1 GiB of incompressible bytes uploaded with the real workdir sync to one node
//! and to 4 nodes at once, and downloaded back, beside `scp` and `rsync -e ssh` to a local
//! sshd and a bare quinn transfer with the same TLS setup. Every copy is deleted after its run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use skyward_common::limits::DEFAULT_DOWNLOAD_LIMIT;
use skyward_coordinator::workdir::{download_all, sync_tree, Tree};
use tokio::process::Command;

use crate::bare::Baseline;
use crate::peers::{run_timed, Sshd, SSH_COMMAND_TIMEOUT};
use crate::tls::TlsBaseline;
use crate::Limits;

/// The data set: one file of this many seeded pseudo-random bytes.
pub const BULK_BYTES: u64 = 1 << 30;
/// Runs of each transfer; the median is reported.
pub const BULK_RUNS: usize = 3;
/// Nodes in the fan-out upload.
pub const BULK_NODES: usize = 4;
const FILE_NAME: &str = "data.bin";
/// Fixed so that every run (and every machine) moves the same bytes.
const SEED: u64 = 0x5eed_0000_0000_0007;
/// scp's cipher when sshd offers it: the fastest on CPUs with AES instructions.
pub const SCP_CIPHER: &str = "aes128-gcm@openssh.com";

/// What was measured, in seconds per run.
pub struct BulkResults {
    /// `Tree::scan` (walk and SHA-256) of the workdir, per one-node run.
    pub scan: Vec<Duration>,
    /// `sync_tree` to one fresh node, after the scan.
    pub upload_one: Vec<Duration>,
    /// `sync_tree` to [`BULK_NODES`] fresh nodes at once, after the scan.
    pub upload_many: Vec<Duration>,
    /// `download_all` of the file from one node.
    pub download: Vec<Duration>,
    /// The same bytes over one bare quinn stream.
    pub bare: Vec<Duration>,
    /// The same bytes over one bare TCP+TLS connection ([`crate::tls`]), each run right
    /// after a bare quinn run.
    pub tls: Vec<Duration>,
    pub scp: Result<Vec<Duration>, String>,
    pub rsync: Result<Vec<Duration>, String>,
}

/// MiB/s for moving [`BULK_BYTES`] in `d`.
pub fn mib_per_s(d: Duration) -> f64 {
    BULK_BYTES as f64 / (1024.0 * 1024.0) / d.as_secs_f64().max(1e-9)
}

/// Writes the data set: splitmix64 output, which no compressor shrinks.
fn write_data(path: &Path) -> Result<()> {
    const BLOCK: usize = 4 << 20;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| path.display().to_string())?,
    );
    let mut state = SEED;
    let mut block = vec![0u8; BLOCK];
    for _ in 0..BULK_BYTES as usize / BLOCK {
        for word in block.chunks_exact_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        file.write_all(&block)?;
    }
    file.flush()?;
    Ok(())
}

/// Size of the file at `path`, checked to be the whole data set.
fn check_copy(path: &Path) -> Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("{} was not written", path.display()))?
        .len();
    ensure!(
        len == BULK_BYTES,
        "{} has {len} bytes, not {BULK_BYTES}",
        path.display()
    );
    Ok(())
}

/// All bulk measurements, in `scratch/bulk` (removed afterwards whatever happens).
pub async fn measure(
    exe: &Path,
    agent_bin: &Path,
    scratch: &Path,
    sshd: &std::result::Result<Sshd, String>,
    limits: &Limits,
) -> Result<BulkResults> {
    let dir = scratch.join("bulk");
    std::fs::create_dir_all(&dir)?;
    let outcome = measure_in(exe, agent_bin, &dir, sshd, limits).await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

async fn measure_in(
    exe: &Path,
    agent_bin: &Path,
    dir: &Path,
    sshd: &std::result::Result<Sshd, String>,
    limits: &Limits,
) -> Result<BulkResults> {
    let source = dir.join("workdir");
    std::fs::create_dir_all(&source)?;
    let data = source.join(FILE_NAME);
    crate::progress(&format!("writing {} MiB of test data", BULK_BYTES >> 20));
    {
        let data = data.clone();
        tokio::task::spawn_blocking(move || write_data(&data)).await??;
    }
    let mut r = BulkResults {
        scan: Vec::new(),
        upload_one: Vec::new(),
        upload_many: Vec::new(),
        download: Vec::new(),
        bare: Vec::new(),
        tls: Vec::new(),
        scp: Ok(Vec::new()),
        rsync: Ok(Vec::new()),
    };
    let peers_dir = dir.join("bare");
    std::fs::create_dir_all(&peers_dir)?;
    let baseline = Baseline::start_as(exe, &peers_dir, 1, "sink-peer").await?;
    let tls = TlsBaseline::start(exe, &peers_dir).await;
    let bare = async {
        let tls = tls.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let (mut quinn, mut tcp) = (Vec::new(), Vec::new());
        for _ in 0..BULK_RUNS {
            quinn.push(baseline.bulk(&data, BULK_BYTES, limits).await?);
            tcp.push(tls.bulk(&data, BULK_BYTES, limits).await?);
        }
        anyhow::Ok((quinn, tcp))
    }
    .await;
    baseline.stop().await;
    if let Ok(tls) = tls {
        tls.stop().await;
    }
    (r.bare, r.tls) = bare?;
    crate::progress(&format!("  bare quinn: {}", rates(&r.bare)));
    crate::progress(&format!("  bare TCP+TLS: {}", rates(&r.tls)));

    for run in 0..BULK_RUNS {
        let (scan, one, download) =
            skyward_one(agent_bin, &dir.join(format!("one-{run}")), &source, limits).await?;
        r.scan.push(scan);
        r.upload_one.push(one);
        r.download.push(download);
        r.upload_many.push(
            skyward_many(agent_bin, &dir.join(format!("many-{run}")), &source, limits).await?,
        );
        crate::progress(&format!(
            "  skyward run {}/{BULK_RUNS}: scan {:.2} s, upload to 1 node {:.0} MiB/s, to {BULK_NODES} nodes {:.2} s, download {:.0} MiB/s",
            run + 1,
            scan.as_secs_f64(),
            crate::bulk::mib_per_s(one),
            r.upload_many[run].as_secs_f64(),
            mib_per_s(download)
        ));
    }

    match sshd {
        Ok(sshd) => {
            r.scp = ssh_copies(&dir.join("scp"), |dest| scp(sshd, &data, dest)).await;
            r.rsync = ssh_copies(&dir.join("rsync"), |dest| rsync(sshd, &data, dest)).await;
        }
        Err(why) => {
            r.scp = Err(why.clone());
            r.rsync = Err(why.clone());
        }
    }
    for (what, runs) in [("scp", &r.scp), ("rsync", &r.rsync)] {
        match runs {
            Ok(runs) => crate::progress(&format!("  {what}: {}", rates(runs))),
            Err(why) => crate::progress(&format!("  {what} not measured: {why}")),
        }
    }
    Ok(r)
}

fn rates(runs: &[Duration]) -> String {
    runs.iter()
        .map(|d| format!("{:.0} MiB/s", mib_per_s(*d)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One fresh node: scan, upload, then download the file back; the pool's dirs are removed.
async fn skyward_one(
    agent_bin: &Path,
    root: &Path,
    source: &Path,
    limits: &Limits,
) -> Result<(Duration, Duration, Duration)> {
    std::fs::create_dir_all(root)?;
    let pool = crate::skyward::pool_up(agent_bin, root, 1).await?;
    let work = async {
        let started = Instant::now();
        let tree = scan(source).await?;
        let scanned = started.elapsed();
        let started = Instant::now();
        let report = sync_tree(pool.coordinator(), &pool.nodes(), tree)
            .await
            .map_err(anyhow::Error::msg)?;
        let uploaded = started.elapsed();
        over_tcp(&report)?;
        let into = root.join("downloads");
        let started = Instant::now();
        let downloads = download_all(
            &pool.nodes(),
            Some(&report.dir),
            &[FILE_NAME.to_string()],
            &into,
            DEFAULT_DOWNLOAD_LIMIT,
            pool.coordinator().node_timeout(),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let downloaded = started.elapsed();
        ensure!(
            downloads.iter().map(|d| d.bytes).sum::<u64>() == BULK_BYTES,
            "the download brought back {} bytes",
            downloads.iter().map(|d| d.bytes).sum::<u64>()
        );
        check_copy(&into.join(&pool.nodes()[0].node_id).join(FILE_NAME))?;
        anyhow::Ok((scanned, uploaded, downloaded))
    };
    let outcome = tokio::time::timeout(limits.phase, work).await;
    pool.down().await;
    let _ = std::fs::remove_dir_all(root);
    outcome.with_context(|| format!("a 1-node transfer took longer than {:?}", limits.phase))?
}

/// [`BULK_NODES`] fresh nodes: the upload to all at once (after the scan, not timed).
async fn skyward_many(
    agent_bin: &Path,
    root: &Path,
    source: &Path,
    limits: &Limits,
) -> Result<Duration> {
    std::fs::create_dir_all(root)?;
    let pool = crate::skyward::pool_up(agent_bin, root, BULK_NODES).await?;
    let work = async {
        let tree = scan(source).await?;
        let started = Instant::now();
        let report = sync_tree(pool.coordinator(), &pool.nodes(), tree)
            .await
            .map_err(anyhow::Error::msg)?;
        let elapsed = started.elapsed();
        ensure!(
            report.nodes.len() == BULK_NODES && report.bytes == BULK_BYTES,
            "the sync reached {} nodes with {} bytes",
            report.nodes.len(),
            report.bytes
        );
        over_tcp(&report)?;
        anyhow::Ok(elapsed)
    };
    let outcome = tokio::time::timeout(limits.phase, work).await;
    pool.down().await;
    let _ = std::fs::remove_dir_all(root);
    outcome.with_context(|| {
        format!(
            "a {BULK_NODES}-node upload took longer than {:?}",
            limits.phase
        )
    })?
}

/// The figures are of the contents over the coordinator's TCP port, the way a node that can
/// reach it gets them.
fn over_tcp(report: &skyward_coordinator::workdir::SyncReport) -> Result<()> {
    ensure!(
        report.nodes.iter().all(|node| node.over_tcp),
        "a node took the contents over QUIC, not the TCP port: {:?}",
        report.nodes
    );
    Ok(())
}

async fn scan(source: &Path) -> Result<Arc<Tree>> {
    let source = source.to_path_buf();
    let tree = tokio::task::spawn_blocking(move || Tree::scan(&source))
        .await?
        .map_err(anyhow::Error::msg)?;
    ensure!(
        tree.bytes() == BULK_BYTES,
        "the scanned tree has {} bytes",
        tree.bytes()
    );
    Ok(Arc::new(tree))
}

/// [`BULK_RUNS`] copies into a fresh `dest` each, checked and removed after each run.
async fn ssh_copies<F, Fut>(dest: &Path, copy: F) -> std::result::Result<Vec<Duration>, String>
where
    F: Fn(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<Duration>>,
{
    let mut runs = Vec::new();
    for _ in 0..BULK_RUNS {
        let _ = std::fs::remove_dir_all(dest);
        std::fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        let outcome = async {
            let elapsed = copy(dest.to_path_buf()).await?;
            check_copy(&dest.join(FILE_NAME))?;
            anyhow::Ok(elapsed)
        }
        .await;
        let _ = std::fs::remove_dir_all(dest);
        runs.push(outcome.map_err(|e| format!("{e:#}"))?);
    }
    Ok(runs)
}

async fn scp(sshd: &Sshd, data: &Path, dest: PathBuf) -> Result<Duration> {
    let mut command = Command::new("scp");
    command
        .args(["-q", "-c", SCP_CIPHER, "-P", &sshd.port().to_string()])
        .args(sshd.ssh_options())
        .arg(data)
        .arg(format!("{}:{}/", sshd.destination(), dest.display()));
    run_timed(command, "scp", SSH_COMMAND_TIMEOUT).await
}

async fn rsync(sshd: &Sshd, data: &Path, dest: PathBuf) -> Result<Duration> {
    let mut command = Command::new("rsync");
    command
        .args(["-a", "-e", &sshd.ssh_for_rsync()])
        .arg(data)
        .arg(format!("{}:{}/", sshd.destination(), dest.display()));
    run_timed(command, "rsync -e ssh", SSH_COMMAND_TIMEOUT).await
}
