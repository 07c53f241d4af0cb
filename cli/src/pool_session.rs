//! The command line's side of a pool session: a progress bar and a line per node while the
//! pool comes up, and what a Ctrl-C says while it is torn down.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use skyward_coordinator::plan::PoolPlan;
use skyward_coordinator::pool::{Pool, PoolProgress};
use skyward_coordinator::session::{tear_down, PoolSession};

use crate::output::Renderer;

/// Brings `session`'s pool up, rendering each failed attempt and ready node; `bar`: draw a
/// progress bar on a terminal's stderr.
pub async fn bring_up<O: Write + Send, E: Write + Send>(
    session: &PoolSession,
    plan: &PoolPlan,
    renderer: &mut Renderer<O, E>,
    bar: bool,
) -> Result<Pool, String> {
    let progress = (bar && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(plan.spec.nodes as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {pos}/{len} nodes ready ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let mut on_progress = |event: &PoolProgress<'_>| match event {
        PoolProgress::Searching { providers } => {
            if let Some(bar) = &progress {
                bar.set_message(format!("asking {providers} provider(s) for offers:"));
            }
        }
        PoolProgress::Provisioning { attempt, nodes } => {
            if let Some(bar) = &progress {
                bar.set_message(format!(
                    "starting {nodes} x {} on {} ({}):",
                    attempt.offer.instance_type, attempt.offer.provider, attempt.market
                ));
            }
        }
        PoolProgress::Provisioned { .. } => {}
        PoolProgress::AttemptFailed { attempt, error } => {
            renderer.attempt_failed(attempt, error);
        }
        PoolProgress::NodeReady { node, .. } => match &progress {
            // Lines printed while the bar is drawn would be garbled by it.
            Some(bar) => {
                bar.inc(1);
                bar.suspend(|| renderer.node_ready(node));
            }
            None => renderer.node_ready(node),
        },
    };
    let up = session.bring_up(plan, &mut on_progress).await;
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    up
}

/// Tears the pool down; a SIGINT meanwhile only says what is still being removed. Once
/// nothing is left the pool's files and record go; otherwise the record says the teardown
/// failed, for `skyward down`. Returns whether everything is gone.
pub async fn finish(session: &PoolSession, interrupts: &mut tokio::signal::unix::Signal) -> bool {
    let name = &session.name;
    let teardown = tear_down(
        name,
        &session.dir,
        &session.coordinator,
        &session.providers,
        &session.store,
    );
    tokio::pin!(teardown);
    let torn_down = loop {
        tokio::select! {
            result = &mut teardown => break result,
            _ = interrupts.recv() => eprintln!("skyward: still removing the nodes of pool {name}; they will be gone in a few seconds"),
        }
    };
    match torn_down {
        Ok(()) => true,
        Err(message) => {
            eprintln!("skyward: {message}");
            false
        }
    }
}
