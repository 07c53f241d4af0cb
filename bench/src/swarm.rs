//! Many agents on one machine (the issue's item 3 at 1,000 agents and item 4 at 10,000).
//!
//! Three processes: this one measures; a second hosts the coordinator (so that its CPU time
//! and memory in /proc are the coordinator's alone); a third runs every agent as the real
//! agent code (`skyward_agent::run_on`) on one shared UDP socket, each with its own token,
//! key and certificate, enrolled and connected as a separate node would be.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skyward_coordinator::{Coordinator, CoordinatorConfig, NodeHandle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinSet;

use crate::footprint::{clock_ticks, cpu_percent, read_proc, stat_cpu_ticks, status_bytes};
use crate::stats::Latency;

/// Agents per measured swarm.
pub const SIZES: [usize; 2] = [1_000, 10_000];
/// Untimed broadcasts, then timed ones, per swarm.
pub const BROADCAST_WARMUP: usize = 3;
pub const BROADCAST_ROUNDS: usize = 10;
/// How long every agent of a swarm gets to enroll and connect.
const CONNECT_LIMIT: Duration = Duration::from_secs(300);
/// Quiet time after the last agent connected, before the at-rest window: enrollment's
/// stragglers and the first health reports are over by then.
pub const SETTLE: Duration = Duration::from_secs(6);
/// The at-rest window: two health reports from every agent fall in it.
pub const REST_WINDOW: Duration = Duration::from_secs(10);
/// Agents that share one UDP socket and loopback address: fewer than the coordinator's
/// limit on enrollments at once from one address
/// ([`MAX_ENROLLING_PER_ADDRESS`](skyward_common::limits::MAX_ENROLLING_PER_ADDRESS)).
pub const AGENTS_PER_ADDRESS: usize = 25;
const _: () = assert!(AGENTS_PER_ADDRESS < skyward_common::limits::MAX_ENROLLING_PER_ADDRESS);
/// Agents started at once, then a pause: 500 a second.
const WAVE: usize = 50;
const WAVE_PAUSE: Duration = Duration::from_millis(100);
/// A swarm agent exits when its coordinator has been gone this long.
const SWARM_LEASE: Duration = Duration::from_secs(60);
/// How long the coordinator host and the swarm get to exit after `quit`.
const EXIT_GRACE: Duration = Duration::from_secs(60);
/// Bound on one answer from the coordinator host (a whole set of broadcasts).
const ANSWER_LIMIT: Duration = Duration::from_secs(180);

/// One swarm's figures, all of the coordinator's process.
#[derive(Debug, Clone)]
pub struct Scale {
    pub nodes: usize,
    /// From starting the swarm to every agent connected (enrollment included).
    pub connect: Duration,
    /// RSS before any agent came.
    pub rss_empty: u64,
    /// RSS with every agent connected and idle, and CPU over [`REST_WINDOW`] then.
    pub rss_rest: u64,
    pub cpu_rest_percent: f64,
    /// No-op broadcast to every agent, gathered.
    pub broadcast: Latency,
    /// CPU over the timed broadcasts, and RSS after them.
    pub cpu_broadcast_percent: f64,
    pub rss_broadcast: u64,
    /// The swarm process's RSS at rest (all the agents together).
    pub swarm_rss: u64,
}

impl Scale {
    /// What one more connected, idle agent costs the coordinator: the slope of RSS at rest
    /// between two swarm sizes (which cancels what any pool costs).
    pub fn per_connection(small: &Scale, large: &Scale) -> Option<f64> {
        let agents = large.nodes.checked_sub(small.nodes).filter(|n| *n > 0)?;
        Some((large.rss_rest as f64 - small.rss_rest as f64) / agents as f64)
    }
}

/// Every size in [`SIZES`], one after another.
pub async fn measure(exe: &Path, scratch: &Path) -> Result<Vec<Scale>> {
    let mut results = Vec::new();
    for nodes in SIZES {
        crate::progress(&format!(
            "swarm of {nodes} agents in one process, the coordinator in another"
        ));
        let dir = scratch.join(format!("swarm-{nodes}"));
        std::fs::create_dir_all(&dir)?;
        let scale = measure_one(exe, &dir, nodes).await;
        // Thousands of work dirs: gone before the next swarm, whatever happened.
        let _ = std::fs::remove_dir_all(&dir);
        let scale = scale.with_context(|| format!("swarm of {nodes} agents"))?;
        crate::progress(&format!(
            "  connected in {:.1} s; coordinator at rest {:.1}% CPU, {:.0} MB; broadcast p50 {:.0} ms at {:.0}% CPU",
            scale.connect.as_secs_f64(),
            scale.cpu_rest_percent,
            crate::footprint::mb(scale.rss_rest),
            scale.broadcast.p50.as_secs_f64() * 1e3,
            scale.cpu_broadcast_percent
        ));
        results.push(scale);
    }
    Ok(results)
}

async fn measure_one(exe: &Path, dir: &Path, nodes: usize) -> Result<Scale> {
    let plan = dir.join("plan");
    let mut host = Host::start(exe, &plan, nodes).await?;
    let pid = host.pid;
    let rss_empty = rss(pid)?;
    let mut swarm = Command::new(exe)
        .arg("swarm")
        .arg(&plan)
        .arg(dir.join("agents"))
        // The swarm ends when this pipe closes, should this process die first.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the swarm")?;
    let swarm_pid = swarm.id().context("the swarm exited at once")?;
    let started = Instant::now();
    host.ask(&format!("wait {}", CONNECT_LIMIT.as_secs()), "ready")
        .await?;
    let connect = started.elapsed();

    tokio::time::sleep(SETTLE).await;
    let (cpu_rest_percent, rss_rest) = {
        let before = cpu_ticks(pid)?;
        let window = Instant::now();
        tokio::time::sleep(REST_WINDOW).await;
        let ticks = cpu_ticks(pid)?.saturating_sub(before);
        (
            cpu_percent(ticks, clock_ticks(), window.elapsed()),
            rss(pid)?,
        )
    };
    let swarm_rss = rss(swarm_pid)?;

    let before = cpu_ticks(pid)?;
    let window = Instant::now();
    let answer = host
        .ask(
            &format!("broadcast {BROADCAST_WARMUP} {BROADCAST_ROUNDS}"),
            "broadcast",
        )
        .await?;
    let cpu_broadcast_percent = cpu_percent(
        cpu_ticks(pid)?.saturating_sub(before),
        clock_ticks(),
        window.elapsed(),
    );
    let rss_broadcast = rss(pid)?;
    let samples = answer
        .iter()
        .map(|us| us.parse::<u64>().map(Duration::from_micros))
        .collect::<Result<Vec<_>, _>>()
        .context("reading the broadcast times")?;
    ensure!(
        samples.len() == BROADCAST_ROUNDS,
        "expected {BROADCAST_ROUNDS} broadcast times, got {}",
        samples.len()
    );

    host.ask("quit", "bye").await?;
    host.wait().await?;
    // The swarm's stdin stays open until it has exited: closing it means "abandon".
    let status = tokio::time::timeout(EXIT_GRACE, swarm.wait())
        .await
        .context("the swarm's agents did not all exit after the coordinator shut them down")??;
    ensure!(status.success(), "the swarm exited with {status}");
    Ok(Scale {
        nodes,
        connect,
        rss_empty,
        rss_rest,
        cpu_rest_percent,
        broadcast: Latency::from_samples(samples),
        cpu_broadcast_percent,
        rss_broadcast,
        swarm_rss,
    })
}

fn rss(pid: u32) -> Result<u64> {
    status_bytes(&read_proc(pid, "status")?, "VmRSS").context("no VmRSS in /proc/PID/status")
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    stat_cpu_ticks(&read_proc(pid, "stat")?).context("unreadable /proc/PID/stat")
}

/// The coordinator host process, driven one line at a time over its stdin and stdout.
struct Host {
    child: Child,
    pid: u32,
    input: ChildStdin,
    output: Lines<BufReader<ChildStdout>>,
}

impl Host {
    async fn start(exe: &Path, plan: &Path, nodes: usize) -> Result<Host> {
        let mut child = Command::new(exe)
            .arg("swarm-coordinator")
            .arg(nodes.to_string())
            .arg(plan)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the coordinator host")?;
        let pid = child.id().context("the coordinator host exited at once")?;
        let input = child.stdin.take().context("no stdin")?;
        let output = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let mut host = Host {
            child,
            pid,
            input,
            output,
        };
        host.expect("planned").await?;
        Ok(host)
    }

    /// Sends `command`, then reads the answer: a line starting with `word`; its other words.
    async fn ask(&mut self, command: &str, word: &str) -> Result<Vec<String>> {
        self.input
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.input.flush().await?;
        self.expect(word).await
    }

    async fn expect(&mut self, word: &str) -> Result<Vec<String>> {
        let line = tokio::time::timeout(ANSWER_LIMIT, self.output.next_line())
            .await
            .with_context(|| format!("the coordinator host did not answer {word:?} in time"))??
            .with_context(|| format!("the coordinator host exited before {word:?}"))?;
        let mut words = line.split_whitespace().map(str::to_string);
        match words.next() {
            Some(first) if first == word => Ok(words.collect()),
            _ => bail!("the coordinator host answered {line:?}, expected {word:?}"),
        }
    }

    async fn wait(mut self) -> Result<()> {
        drop(self.input);
        let status = tokio::time::timeout(EXIT_GRACE, self.child.wait())
            .await
            .context("the coordinator host did not exit")??;
        ensure!(
            status.success(),
            "the coordinator host exited with {status}"
        );
        Ok(())
    }
}

/// The agents' side of the plan file: where to dial, what to pin, and each node's token.
struct Plan {
    coordinator: String,
    ca_pin: String,
    nodes: Vec<(String, String)>,
}

impl Plan {
    fn write(path: &Path, coordinator: &Coordinator, nodes: usize) -> Result<Vec<String>> {
        let mut text = format!("{}\n{}\n", coordinator.local_addr(), coordinator.ca_pin());
        let ids: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
        for id in &ids {
            text.push_str(&format!("{id} {}\n", coordinator.issue_token(id)));
        }
        // Tokens: readable by this user only.
        skyward_common::identity::write_private(path, text.as_bytes())?;
        Ok(ids)
    }

    fn read(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the swarm plan {}", path.display()))?;
        let mut lines = text.lines();
        let coordinator = lines.next().context("plan without an address")?.to_string();
        let ca_pin = lines.next().context("plan without a CA pin")?.to_string();
        let nodes = lines
            .map(|line| {
                line.split_once(' ')
                    .map(|(id, token)| (id.to_string(), token.to_string()))
                    .context("a plan line without a token")
            })
            .collect::<Result<_>>()?;
        Ok(Plan {
            coordinator,
            ca_pin,
            nodes,
        })
    }
}

/// Logs to stderr, warnings only by default: thousands of agents would drown the bench's
/// output in their info lines (`SKYWARD_LOG=info` shows them).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKYWARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init()
        .ok();
}

/// `skyward-bench swarm-coordinator NODES PLAN`: a coordinator that writes a plan for
/// `NODES` agents, then answers `wait SECS`, `broadcast WARMUP ROUNDS` and `quit` on stdin.
pub async fn coordinator_main(args: &[String]) -> Result<()> {
    let [nodes, plan] = args else {
        bail!("usage: skyward-bench swarm-coordinator NODES PLAN");
    };
    let nodes: usize = nodes.parse().context("NODES: a number")?;
    let coordinator = Arc::new(Coordinator::start(CoordinatorConfig {
        pool: "bench-swarm".into(),
        bind: ([127, 0, 0, 1], 0).into(),
        state_dir: None,
    })?);
    let ids = Plan::write(Path::new(plan), &coordinator, nodes)?;
    let say = |line: String| -> Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };
    say("planned".into())?;
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    let mut connected = Vec::new();
    while let Some(line) = commands.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["wait", secs] => {
                let limit = Duration::from_secs(secs.parse()?);
                connected = wait_connected(&coordinator, &ids, limit).await?;
                say("ready".into())?;
            }
            ["broadcast", warmup, rounds] => {
                for _ in 0..warmup.parse::<usize>()? {
                    broadcast(&coordinator, &connected).await?;
                }
                let mut times = vec!["broadcast".to_string()];
                for _ in 0..rounds.parse::<usize>()? {
                    let took = broadcast(&coordinator, &connected).await?;
                    times.push(took.as_micros().to_string());
                }
                say(times.join(" "))?;
            }
            ["quit"] => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    coordinator.shutdown_nodes("the benchmark is over").await;
    coordinator.close().await;
    say("bye".into())
}

/// Every node of `ids` connected, within `limit`.
async fn wait_connected(
    coordinator: &Coordinator,
    ids: &[String],
    limit: Duration,
) -> Result<Vec<NodeHandle>> {
    let deadline = Instant::now() + limit;
    let mut next_report = Instant::now() + Duration::from_secs(5);
    loop {
        let connected: Vec<NodeHandle> = ids
            .iter()
            .filter_map(|id| coordinator.node(id))
            .filter(NodeHandle::is_connected)
            .collect();
        if connected.len() == ids.len() {
            return Ok(connected);
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(5);
            eprintln!(
                "skyward-bench swarm-coordinator: {} of {} agents connected",
                connected.len(),
                ids.len()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} of {} agents connected within {limit:?}",
                connected.len(),
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A no-op on every node at once; the time until the last one has ended.
pub async fn broadcast(coordinator: &Arc<Coordinator>, nodes: &[NodeHandle]) -> Result<Duration> {
    let start = Instant::now();
    let mut running = JoinSet::new();
    for node in nodes {
        let (coordinator, node) = (coordinator.clone(), node.clone());
        running.spawn(async move { crate::skyward::noop(&coordinator, &node).await });
    }
    while let Some(done) = running.join_next().await {
        done.context("a no-op task panicked")??;
    }
    Ok(start.elapsed())
}

/// `skyward-bench swarm PLAN ROOT`: every agent of the plan, in this process, on one UDP
/// socket, each with its work dir under `ROOT`; ends when all have ended (the coordinator
/// shut them down) or stdin closes.
pub async fn swarm_main(args: &[String]) -> Result<()> {
    let [plan, root] = args else {
        bail!("usage: skyward-bench swarm PLAN ROOT");
    };
    let plan = Plan::read(Path::new(plan))?;
    let root = PathBuf::from(root);
    let registry = Arc::new(skyward_agent::Registry::default());
    let mut agents = JoinSet::new();
    let mut endpoints = Vec::new();
    for (i, (node_id, token)) in plan.nodes.into_iter().enumerate() {
        // A few agents per loopback address, as real nodes each have their own: the
        // coordinator holds each address to a few enrollments at a time.
        if i % AGENTS_PER_ADDRESS == 0 {
            let n = i / AGENTS_PER_ADDRESS;
            let address = [127, 0, 1 + (n / 250) as u8, 1 + (n % 250) as u8];
            endpoints.push(skyward_common::transport::endpoint(
                (address, 0).into(),
                None,
            )?);
        }
        let endpoint = endpoints.last().context("no endpoint")?;
        // Started in waves, as a pool's machines boot over a few seconds: all at once, the
        // handshakes of thousands would starve each other on a small machine.
        if i > 0 && i % WAVE == 0 {
            tokio::time::sleep(WAVE_PAUSE).await;
        }
        let config = skyward_agent::AgentConfig {
            coordinator: Some(plan.coordinator.clone()),
            listen: None,
            ca_pin: plan.ca_pin.clone(),
            token: Some(token),
            work_dir: root.join(&node_id),
            node_id,
            lease: SWARM_LEASE,
            mig: None,
            deadline: None,
            on_pool_end: skyward_agent::OnPoolEnd::Exit,
            spot_watch: None,
        };
        let (endpoint, registry) = (endpoint.clone(), registry.clone());
        agents.spawn(async move {
            let node = config.node_id.clone();
            skyward_agent::run_on(config, registry, &endpoint)
                .await
                .with_context(|| node)
        });
    }
    let parent_gone = async {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut tokio::io::sink()).await;
    };
    let all_ended = async {
        let mut failed = Vec::new();
        while let Some(ended) = agents.join_next().await {
            let failure = match ended {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("an agent panicked: {e}"),
            };
            // At once: the other agents may run on for minutes.
            eprintln!("skyward-bench swarm: agent {failure}");
            failed.push(failure);
        }
        failed
    };
    tokio::select! {
        failed = all_ended => {
            if let Some(first) = failed.first() {
                bail!("{} agents failed; the first: {first}", failed.len());
            }
            Ok(())
        }
        _ = parent_gone => bail!("the benchmark went away"),
    }
}

/// The issue's item 4: 10,000 connected agents cost the coordinator at most this.
const TARGET_SCALE_AGENTS: usize = 10_000;
const TARGET_REST_CPU_PERCENT: f64 = 5.0;
const TARGET_RSS_BYTES: u64 = 1_000_000_000;
/// And one idle agent connection at most this.
const TARGET_PER_CONNECTION_BYTES: f64 = 64.0 * 1024.0;

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", crate::footprint::mb(bytes))
}

pub fn table(swarms: &[Scale]) -> String {
    let rows: Vec<[String; 8]> = swarms
        .iter()
        .map(|s| {
            [
                crate::stats::thousands(s.nodes as f64),
                format!("{:.1} s", s.connect.as_secs_f64()),
                mb(s.rss_empty),
                mb(s.rss_rest),
                format!("{:.1}%", s.cpu_rest_percent),
                format!("{:.0}%", s.cpu_broadcast_percent),
                mb(s.rss_broadcast),
                mb(s.swarm_rss),
            ]
        })
        .collect();
    crate::report::render(
        [
            "agents",
            "all connected after",
            "coordinator RSS, no agent",
            "RSS at rest",
            "CPU at rest (one core)",
            "CPU during broadcasts",
            "RSS after broadcasts",
            "swarm process RSS",
        ],
        &rows,
    )
}

pub fn verdicts(swarms: &[Scale]) -> Vec<String> {
    let mut lines = Vec::new();
    match swarms.iter().find(|s| s.nodes == TARGET_SCALE_AGENTS) {
        Some(s) => {
            lines.push(format!(
                "- {} agents, coordinator CPU at rest ≤ {TARGET_REST_CPU_PERCENT:.0}% of one core: **{}** ({:.1}%).",
                crate::stats::thousands(s.nodes as f64),
                crate::report::met(s.cpu_rest_percent <= TARGET_REST_CPU_PERCENT),
                s.cpu_rest_percent
            ));
            let peak = s.rss_rest.max(s.rss_broadcast);
            lines.push(format!(
                "- {} agents, coordinator RSS ≤ 1 GB at rest and after broadcasts: **{}** ({} at rest, {} after).",
                crate::stats::thousands(s.nodes as f64),
                crate::report::met(peak <= TARGET_RSS_BYTES),
                mb(s.rss_rest),
                mb(s.rss_broadcast)
            ));
        }
        None => lines.push(format!(
            "- {} agents: **not measured**.",
            crate::stats::thousands(TARGET_SCALE_AGENTS as f64)
        )),
    }
    let slope = match swarms {
        [small, .., large] => Scale::per_connection(small, large),
        _ => None,
    };
    lines.push(match slope {
        Some(bytes) => format!(
            "- An idle agent connection costs the coordinator ≤ 64 KB: **{}** ({:.1} KB: the RSS at rest grows by that per agent from {} to {} agents).",
            crate::report::met(bytes <= TARGET_PER_CONNECTION_BYTES),
            bytes / 1024.0,
            crate::stats::thousands(swarms[0].nodes as f64),
            crate::stats::thousands(swarms[swarms.len() - 1].nodes as f64)
        ),
        None => "- An idle agent connection ≤ 64 KB: **not measured** (needs two swarm sizes).".into(),
    });
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scale(nodes: usize, rss_rest: u64, cpu_rest_percent: f64) -> Scale {
        let ms = Duration::from_millis;
        Scale {
            nodes,
            connect: ms(2_000),
            rss_empty: 10_000_000,
            rss_rest,
            cpu_rest_percent,
            broadcast: Latency::from_samples(vec![ms(30), ms(40)]),
            cpu_broadcast_percent: 150.0,
            rss_broadcast: rss_rest + 1_000_000,
            swarm_rss: 100_000_000,
        }
    }

    #[test]
    fn per_connection_cost_is_the_slope_between_sizes() {
        let small = scale(1_000, 80_000_000, 0.5);
        let large = scale(10_000, 440_000_000, 3.0);
        assert_eq!(Scale::per_connection(&small, &large), Some(40_000.0));
        assert_eq!(Scale::per_connection(&large, &small), None);
        let v = verdicts(&[small, large]).join("\n");
        assert!(v.contains("≤ 5% of one core: **met** (3.0%)"), "{v}");
        assert!(
            v.contains(
                "≤ 1 GB at rest and after broadcasts: **met** (440 MB at rest, 441 MB after)"
            ),
            "{v}"
        );
        assert!(v.contains("≤ 64 KB: **met** (39.1 KB"), "{v}");
    }

    #[test]
    fn missed_targets_say_so() {
        let v = verdicts(&[
            scale(1_000, 80_000_000, 0.5),
            scale(10_000, 1_200_000_000, 7.5),
        ])
        .join("\n");
        assert!(v.contains("**not met** (7.5%)"), "{v}");
        assert!(
            v.contains("RSS ≤ 1 GB at rest and after broadcasts: **not met**"),
            "{v}"
        );
        assert!(v.contains("≤ 64 KB: **not met**"), "{v}");
        let one = verdicts(&[scale(1_000, 80_000_000, 0.5)]).join("\n");
        assert!(one.contains("10,000 agents: **not measured**"), "{one}");
    }

    #[test]
    fn plans_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan");
        std::fs::write(&path, "127.0.0.1:4433\nabcd\nnode-1 t1\nnode-2 t2\n").unwrap();
        let plan = Plan::read(&path).unwrap();
        assert_eq!(plan.coordinator, "127.0.0.1:4433");
        assert_eq!(plan.ca_pin, "abcd");
        assert_eq!(
            plan.nodes,
            vec![
                ("node-1".into(), "t1".into()),
                ("node-2".into(), "t2".into())
            ]
        );
        std::fs::write(&path, "127.0.0.1:4433\nabcd\nnode-1\n").unwrap();
        assert!(Plan::read(&path).is_err(), "a line without a token");
    }
}
