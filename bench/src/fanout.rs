//! Fan-out (the item 3): a no-op broadcast to every node of a pool of real agent
//! processes, timed from the first task's start to the last task's end.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::report::{met, render};
use crate::stats::Latency;
use crate::swarm::Scale;
use crate::Limits;

/// Pool sizes measured with one real agent process per node.
pub const SIZES: [usize; 2] = [10, 100];
/// Untimed broadcasts before the timed ones.
const WARMUP: usize = 3;
/// Timed broadcasts per pool size.
pub const ROUNDS: usize = 20;
/// The target: 1,000 agents gathered within this.
pub const TARGET_AGENTS: usize = 1000;
const TARGET: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct FanOut {
    pub nodes: usize,
    pub latency: Latency,
}

/// One pool per size in [`SIZES`]: `WARMUP` untimed broadcasts, then [`ROUNDS`] timed.
pub async fn measure(agent_bin: &Path, scratch: &Path, limits: &Limits) -> Result<Vec<FanOut>> {
    let mut results = Vec::new();
    for nodes in SIZES {
        crate::progress(&format!(
            "bringing up a local pool of {nodes} agents for fan-out"
        ));
        let pool = crate::skyward::pool_up(agent_bin, scratch, nodes).await?;
        let timed = tokio::time::timeout(limits.phase, async {
            for _ in 0..WARMUP {
                broadcast(&pool).await?;
            }
            let mut samples = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                samples.push(broadcast(&pool).await?);
            }
            anyhow::Ok(samples)
        })
        .await;
        pool.down().await;
        let samples = timed.with_context(|| {
            format!(
                "fan-out to {nodes} agents took longer than {:?}",
                limits.phase
            )
        })??;
        let latency = Latency::from_samples(samples);
        crate::progress(&format!(
            "  fan-out to {nodes} agents: p50 {:.1} ms, p99 {:.1} ms",
            latency.p50.as_secs_f64() * 1e3,
            latency.p99.as_secs_f64() * 1e3
        ));
        results.push(FanOut { nodes, latency });
    }
    Ok(results)
}

/// A no-op on every node of the pool at once; the time until the last one has ended.
async fn broadcast(pool: &skyward_coordinator::Pool) -> Result<Duration> {
    crate::swarm::broadcast(&pool.shared_coordinator(), &pool.nodes()).await
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Real agent processes, then the in-process swarms of [`crate::swarm`].
pub fn table(fan_out: &[FanOut], swarms: &[Scale]) -> String {
    let mut rows: Vec<[String; 4]> = fan_out
        .iter()
        .map(|f| {
            [
                format!("{} agents (one process each)", f.nodes),
                ms(f.latency.p50),
                ms(f.latency.p99),
                "—".into(),
            ]
        })
        .collect();
    for s in swarms {
        rows.push([
            format!("{} agents (one swarm process)", s.nodes),
            ms(s.broadcast.p50),
            ms(s.broadcast.p99),
            if s.nodes == TARGET_AGENTS {
                format!("≤ {} ms", TARGET.as_millis())
            } else {
                "—".into()
            },
        ]);
    }
    if !swarms.iter().any(|s| s.nodes == TARGET_AGENTS) {
        rows.push([
            format!("{TARGET_AGENTS} agents"),
            "not measured".into(),
            "not measured".into(),
            format!("≤ {} ms", TARGET.as_millis()),
        ]);
    }
    render(
        [
            "broadcast a no-op, gather every result",
            "p50",
            "p99",
            "target",
        ],
        &rows,
    )
}

pub fn verdicts(swarms: &[Scale]) -> Vec<String> {
    let target = TARGET.as_millis();
    vec![match swarms.iter().find(|s| s.nodes == TARGET_AGENTS) {
        Some(s) => format!(
            "- {TARGET_AGENTS} agents ≤ {target} ms: **{}** (p50 {}, p99 {}).",
            met(s.broadcast.p50 <= TARGET),
            ms(s.broadcast.p50),
            ms(s.broadcast.p99)
        ),
        None => format!("- {TARGET_AGENTS} agents ≤ {target} ms: **not measured**."),
    }]
}
