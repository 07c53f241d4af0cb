//! Time to ready on a cloud node's path (the issue's item 6): from the moment the node's
//! user-data script (the real `deploy/bootstrap.sh`, filled in by the coordinator) starts to
//! the agent's enrollment and connection, on an image with the agent preinstalled and on a
//! stock image that downloads it from the coordinator over HTTPS. The node is the test
//! harness's simulated machine (`skyward_tests::node::BootedNode`) on loopback.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyward_coordinator::{Advertise, Coordinator, CoordinatorConfig};
use skyward_providers::NodeBootstrap;
use skyward_tests::node::BootedNode;

use crate::report::{met, render};
use crate::stats::median_duration;

/// Boots per image; the median is reported.
pub const BOOTS: usize = 5;
/// Bound on one boot, script start to connection.
const BOOT_LIMIT: Duration = Duration::from_secs(60);
/// The issue's targets.
const TARGET_PREINSTALLED: Duration = Duration::from_secs(2);
const TARGET_DOWNLOADED: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Boot {
    pub preinstalled: Vec<Duration>,
    pub downloaded: Vec<Duration>,
}

pub async fn measure(agent_bin: &Path, scratch: &Path) -> Result<Boot> {
    let mut boot = Boot {
        preinstalled: Vec::with_capacity(BOOTS),
        downloaded: Vec::with_capacity(BOOTS),
    };
    for preinstalled in [true, false] {
        for round in 1..=BOOTS {
            let took = boot_once(agent_bin, scratch, preinstalled, round).await?;
            crate::progress(&format!(
                "boot {round}/{BOOTS}, agent {}: connected {:.3} s after the script started",
                if preinstalled {
                    "preinstalled"
                } else {
                    "downloaded"
                },
                took.as_secs_f64()
            ));
            if preinstalled {
                boot.preinstalled.push(took);
            } else {
                boot.downloaded.push(took);
            }
        }
    }
    Ok(boot)
}

async fn boot_once(
    agent_bin: &Path,
    scratch: &Path,
    preinstalled: bool,
    round: usize,
) -> Result<Duration> {
    let coordinator = Coordinator::start_advertised(
        CoordinatorConfig {
            pool: "bench-boot".into(),
            bind: ([127, 0, 0, 1], 0).into(),
            state_dir: None,
        },
        Advertise {
            agent_binaries: vec![agent_bin.to_path_buf()],
            ..Default::default()
        },
    )?;
    let node = NodeBootstrap {
        node_id: "node-1".into(),
        token: coordinator.issue_token("node-1"),
    };
    let user_data = coordinator.bootstrap().user_data("bench-boot", &node);
    let root = scratch.join(format!("boot-{preinstalled}-{round}"));
    std::fs::create_dir_all(&root)?;
    let started = Instant::now();
    // The script runs to its end (it starts the agent in the background) on a blocking thread.
    let booted = tokio::task::spawn_blocking(move || {
        BootedNode::boot_image(&root, "vm", &user_data, preinstalled)
    })
    .await
    .context("the boot panicked")?
    .map_err(|e| anyhow::anyhow!("booting the node: {e}"))?;
    let connected = async {
        loop {
            if coordinator.node("node-1").is_some_and(|n| n.is_connected()) {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let outcome = tokio::time::timeout(BOOT_LIMIT, connected).await;
    let agent_log = booted.agent_log();
    booted.destroy();
    coordinator.close().await;
    match outcome {
        Ok(took) => Ok(took),
        Err(_) => bail!("the node did not connect within {BOOT_LIMIT:?}; agent log:\n{agent_log}"),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

pub fn table(boot: &Boot) -> String {
    let row = |what: &str, samples: &[Duration], target: Duration| {
        [
            what.to_string(),
            secs(median_duration(samples)),
            secs(samples.iter().copied().max().unwrap_or_default()),
            format!("≤ {} s", target.as_secs()),
        ]
    };
    render(
        ["script start → agent connected", "median", "max", "target"],
        &[
            row(
                "agent preinstalled",
                &boot.preinstalled,
                TARGET_PREINSTALLED,
            ),
            row(
                "agent downloaded from the coordinator",
                &boot.downloaded,
                TARGET_DOWNLOADED,
            ),
        ],
    )
}

pub fn verdicts(boot: &Boot) -> Vec<String> {
    let line = |what: &str, samples: &[Duration], target: Duration| {
        let median = median_duration(samples);
        format!(
            "- {what} ≤ {} s: **{}** (median {}).",
            target.as_secs(),
            met(median <= target),
            secs(median)
        )
    };
    vec![
        line(
            "Preinstalled agent, script start to connected",
            &boot.preinstalled,
            TARGET_PREINSTALLED,
        ),
        line(
            "Downloaded agent, script start to connected",
            &boot.downloaded,
            TARGET_DOWNLOADED,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_judge_the_median() {
        let ms = Duration::from_millis;
        let boot = Boot {
            preinstalled: vec![ms(300), ms(250), ms(9_000)],
            downloaded: vec![ms(6_000), ms(5_500), ms(7_000)],
        };
        let v = verdicts(&boot).join("\n");
        assert!(v.contains("≤ 2 s: **met** (median 0.300 s)"), "{v}");
        assert!(v.contains("≤ 5 s: **not met** (median 6.000 s)"), "{v}");
        let t = table(&boot);
        assert!(t.contains("| 9.000 s"), "{t}");
    }
}
