//! Skyward itself: no-op tasks through a real coordinator to real `skyward-agent` processes,
//! and the cold `skyward run` command line.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use skyward_common::protocol::{TaskEvent, TaskSpec};
use skyward_common::typed::{Task, TaskContext, TaskResult};
use skyward_coordinator::pool::PoolProgress;
use skyward_coordinator::server::RemoteTask;
use skyward_coordinator::{Coordinator, CoordinatorConfig, NodeHandle, Pool};
use skyward_core::{selection::Selection, spec::PoolSpec};
use skyward_providers::{LocalProvider, Provider};
use tokio::task::JoinSet;

use crate::stats::Latency;
use crate::Limits;

/// How long the agents of a benchmark pool get to enroll and connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A no-op task produces `Finished` and nothing else; more events than this is a bug.
const MAX_EVENTS_PER_NOOP: usize = 16;
/// Bound on one cold `skyward run`.
const COLD_RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A local pool of real agent processes under `root`.
pub async fn pool_up(agent_bin: &Path, root: &Path, nodes: usize) -> Result<Pool> {
    let coordinator = Arc::new(Coordinator::start(CoordinatorConfig {
        pool: format!("bench-{nodes}"),
        bind: ([127, 0, 0, 1], 0).into(),
        state_dir: None,
    })?);
    let provider: Arc<dyn Provider> = Arc::new(LocalProvider::new(
        Ok(agent_bin.to_path_buf()),
        root.join(format!("pool-{nodes}")),
    ));
    let mut spec = PoolSpec::new(nodes);
    spec.connect_timeout = CONNECT_TIMEOUT;
    let mut ignore = |_: PoolProgress<'_>| {};
    let pool = Pool::up(
        coordinator,
        &[provider],
        &Selection::First,
        &spec,
        &mut ignore,
    )
    .await
    .with_context(|| format!("bringing up a local pool of {nodes} agents"))?;
    ensure!(
        pool.nodes().len() == nodes,
        "pool came up with {} nodes, expected {nodes}",
        pool.nodes().len()
    );
    Ok(pool)
}

/// The typed task that does nothing: what a typed no-op costs beyond the built-in one is the
/// typed path itself (decode the input, run on a blocking thread, encode the output).
#[derive(Serialize, Deserialize)]
pub struct TypedNoop;

impl Task for TypedNoop {
    const NAME: &'static str = "bench-noop";
    const VERSION: u32 = 1;
    type Output = ();
    fn run(self, _: &TaskContext) -> TaskResult<()> {
        Ok(())
    }
}

/// [`TypedNoop`] declared never to block ([`Task::BLOCKING`]): the agent runs it in place,
/// without the hand-off to a blocking thread and back.
#[derive(Serialize, Deserialize)]
pub struct TypedInPlaceNoop;

impl Task for TypedInPlaceNoop {
    const NAME: &'static str = "bench-noop-in-place";
    const VERSION: u32 = 1;
    const BLOCKING: bool = false;
    type Output = ();
    fn run(self, _: &TaskContext) -> TaskResult<()> {
        Ok(())
    }
}

/// Which no-op a measurement sends.
#[derive(Debug, Clone, Copy)]
pub enum Noop {
    /// `TaskKind::Noop`, answered by the agent's runner itself.
    Builtin,
    /// [`TypedNoop`], for an agent that registered it (`skyward-bench typed-agent`).
    Typed,
    /// [`TypedInPlaceNoop`], likewise.
    TypedInPlace,
    /// The command `true`: a process started and reaped on the node.
    TrueCommand,
}

impl Noop {
    fn spec(self, coordinator: &Coordinator) -> Result<TaskSpec> {
        Ok(match self {
            Noop::Builtin => TaskSpec::noop(0),
            Noop::Typed => skyward_common::typed::spec(&TypedNoop)?,
            Noop::TypedInPlace => skyward_common::typed::spec(&TypedInPlaceNoop)?,
            // A fresh id, as `skyward run` gives its tasks: the agent tracks commands by id.
            Noop::TrueCommand => TaskSpec::command(
                coordinator.next_task_id(),
                0,
                vec!["true".into()],
                Vec::new(),
                None,
                false,
            ),
        })
    }
}

/// One no-op task of `kind`, start to `None`: checks it finished successfully.
async fn noop_of(coordinator: &Coordinator, node: &NodeHandle, kind: Noop) -> Result<()> {
    run_to_end(coordinator, node, kind.spec(coordinator)?).await
}

/// One no-op task, start to `None`: checks it finished with exit code 0.
pub async fn noop(coordinator: &Coordinator, node: &NodeHandle) -> Result<()> {
    run_to_end(coordinator, node, TaskSpec::noop(0)).await
}

/// One task, start to `None`: checks it finished with exit code 0 and sent only a few events.
async fn run_to_end(coordinator: &Coordinator, node: &NodeHandle, spec: TaskSpec) -> Result<()> {
    let RemoteTask { input, mut output } = coordinator.start_task(node, spec).await?;
    let mut finished = false;
    let mut events = 0;
    while let Some(event) = output.next().await? {
        events += 1;
        ensure!(
            events <= MAX_EVENTS_PER_NOOP,
            "task sent more than {MAX_EVENTS_PER_NOOP} events"
        );
        if let TaskEvent::Finished(outcome) = event {
            ensure!(outcome.success(), "task ended with {outcome}");
            finished = true;
        }
    }
    // The input half stays open until the task ends, as `skyward run` keeps it.
    drop(input);
    ensure!(finished, "task stream ended without Finished");
    Ok(())
}

/// Sequential `true` commands (a real process spawned by the agent) on the pool's first
/// node: `warmup` untimed, then `count` timed.
pub async fn true_round_trips(
    pool: &Pool,
    warmup: usize,
    count: usize,
    limits: &Limits,
) -> Result<Latency> {
    let coordinator = pool.coordinator();
    let node = pool.nodes().first().context("empty pool")?.clone();
    let work = async {
        for _ in 0..warmup {
            noop_of(coordinator, &node, Noop::TrueCommand).await?;
        }
        let mut samples = Vec::with_capacity(count);
        for _ in 0..count {
            let start = Instant::now();
            noop_of(coordinator, &node, Noop::TrueCommand).await?;
            samples.push(start.elapsed());
        }
        anyhow::Ok(samples)
    };
    let samples = tokio::time::timeout(limits.phase, work)
        .await
        .with_context(|| {
            format!(
                "sequential `true` tasks took longer than {:?}",
                limits.phase
            )
        })??;
    Ok(Latency::from_samples(samples))
}

/// Sequential no-op round trips on the pool's first node: `warmup` untimed, then `count` timed.
pub async fn round_trips(
    pool: &Pool,
    kind: Noop,
    warmup: usize,
    count: usize,
    limits: &Limits,
) -> Result<Latency> {
    let coordinator = pool.coordinator();
    let nodes = pool.nodes();
    let node = nodes.first().context("empty pool")?;
    let work = async {
        for _ in 0..warmup {
            noop_of(coordinator, node, kind).await?;
        }
        let mut samples = Vec::with_capacity(count);
        for _ in 0..count {
            let start = Instant::now();
            noop_of(coordinator, node, kind).await?;
            samples.push(start.elapsed());
        }
        anyhow::Ok(samples)
    };
    let samples = tokio::time::timeout(limits.phase, work)
        .await
        .with_context(|| format!("sequential no-op tasks took longer than {:?}", limits.phase))??;
    Ok(Latency::from_samples(samples))
}

/// `total` no-op tasks with at most `in_flight` running, round-robin over the pool's nodes;
/// returns tasks per second.
pub async fn throughput(
    pool: &Pool,
    kind: Noop,
    total: usize,
    in_flight: usize,
    limits: &Limits,
) -> Result<f64> {
    let coordinator = pool.shared_coordinator();
    let nodes = pool.nodes().to_vec();
    ensure!(!nodes.is_empty(), "empty pool");
    let start = Instant::now();
    let work = async {
        let mut running = JoinSet::new();
        let (mut started, mut done) = (0usize, 0usize);
        while done < total {
            while started < total && running.len() < in_flight {
                let coordinator = coordinator.clone();
                let node = nodes[started % nodes.len()].clone();
                running.spawn(async move { noop_of(&coordinator, &node, kind).await });
                started += 1;
            }
            match running.join_next().await {
                Some(result) => {
                    result.context("no-op task panicked")??;
                    done += 1;
                }
                None => bail!("ran out of tasks after {done} of {total}"),
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(limits.phase, work)
        .await
        .with_context(|| {
            format!(
                "{total} pipelined no-op tasks took longer than {:?}",
                limits.phase
            )
        })??;
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// `skyward run --nodes N --on all -- true`, from spawning the process to its exit.
pub async fn cold_run(skyward_bin: &Path, home: &Path, nodes: usize) -> Result<Duration> {
    let mut command = tokio::process::Command::new(skyward_bin);
    command
        .args([
            "run",
            "--nodes",
            &nodes.to_string(),
            "--on",
            "all",
            "--",
            "true",
        ])
        .env("SKYWARD_HOME", home)
        .env_remove("SKYWARD_AGENT_BIN");
    crate::peers::run_timed(
        command,
        &format!("skyward run --nodes {nodes} --on all -- true"),
        COLD_RUN_TIMEOUT,
    )
    .await
}
