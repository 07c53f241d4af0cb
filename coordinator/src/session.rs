//! One coordinator's pool from its record to its teardown, as `skyward run` and the background
//! coordinator of `skyward pool up` both drive it: record the pool before anything exists,
//! start the coordinator, bring the nodes up (recording every attempt and instance), run jobs
//! (recording every task attempt), and tear down, forgetting the pool only once nothing is left.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use crate::job::{build_job, JobRequest};
use crate::output::Renderer;
use crate::plan::{advertise, default_listen, make_providers, PoolPlan};
use crate::pool::{self, Pool, PoolProgress};
use crate::provider::Provider;
use crate::run::{run_job, RunEvent, TaskReport};
use crate::server::{Coordinator, CoordinatorConfig};
use crate::store::{InstanceRecord, Owner, Placement, PoolState, Store};

/// The value of a `Result<_, String>`, or: say why on stderr and return `$code` from the
/// calling command.
macro_rules! or_exit {
    ($result:expr, $code:expr) => {
        match $result {
            Ok(value) => value,
            Err(message) => {
                eprintln!("skyward: {message}");
                return $code;
            }
        }
    };
}
pub(crate) use or_exit;

/// Exit code for a command line that was wrong (nothing was started).
pub const USAGE: i32 = 2;
/// Exit code when Skyward itself failed (as ssh uses 255).
pub const FAILURE: i32 = 255;

pub struct PoolSession {
    pub name: String,
    /// Where the pool's own files live (identities, local nodes' work dirs, logs).
    pub dir: PathBuf,
    pub coordinator: Arc<Coordinator>,
    pub providers: Vec<Arc<dyn Provider>>,
    pub store: Mutex<Store>,
}

impl PoolSession {
    /// Checks `plan` against its providers, records the pool (owned by this process) and
    /// starts its coordinator; nothing is provisioned yet. An error carries the exit code:
    /// [`USAGE`] when the plan cannot work (nothing was recorded).
    pub fn start(plan: &PoolPlan, home: &Path, name: &str) -> Result<PoolSession, (String, i32)> {
        let dir = home.join("pools").join(name);
        let (providers, advertise) =
            Self::providers(plan, &dir).map_err(|message| (message, USAGE))?;
        // Recorded before anything exists, so that nothing this pool creates can go unrecorded.
        let store = Store::open(home)
            .and_then(|store| {
                store
                    .add_pool(
                        name,
                        Owner::this_process(),
                        &plan.providers,
                        &plan.provider_opts,
                        &dir,
                    )
                    .map(|()| store)
            })
            .map_err(|message| (message, FAILURE))?;
        let store = Mutex::new(store);
        let coordinator = match Coordinator::start_advertised(
            CoordinatorConfig {
                pool: name.to_string(),
                bind: plan
                    .listen
                    .unwrap_or_else(|| default_listen(plan, &providers)),
                state_dir: Some(dir.join("identity")),
            },
            advertise,
        ) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                forget(&store, name);
                return Err((format!("starting the coordinator: {e}"), FAILURE));
            }
        };
        coordinator.set_node_timeout(plan.node_timeout);
        Ok(PoolSession {
            name: name.to_string(),
            dir,
            coordinator,
            providers,
            store,
        })
    }

    /// What [`PoolSession::start`] refuses with [`USAGE`], found without recording or
    /// starting anything.
    pub fn check(plan: &PoolPlan, home: &Path, name: &str) -> Result<(), String> {
        Self::providers(plan, &home.join("pools").join(name)).map(drop)
    }

    /// The plan's providers, checked against its spec, and how their nodes reach this
    /// coordinator.
    fn providers(
        plan: &PoolPlan,
        dir: &Path,
    ) -> Result<(Vec<Arc<dyn Provider>>, crate::Advertise), String> {
        let providers = make_providers(
            &plan.providers,
            &plan.provider_options,
            dir.join("nodes"),
            true,
        )?;
        pool::check(&plan.spec, &providers)?;
        let advertise = advertise(plan, &providers)?;
        Ok((providers, advertise))
    }

    /// Said once before the nodes come up when cloud nodes could not reach this coordinator.
    pub fn unreachable_warning(&self, plan: &PoolPlan) -> Option<String> {
        let remote = self.providers.iter().any(|p| p.name() != "local");
        let address = self.coordinator.advertised_addr();
        (remote && !plan.spec.reverse && address.ip().is_loopback()).then(|| format!(
            "cloud nodes cannot reach {address}: pass --listen 0.0.0.0:7443 --advertise PUBLIC_IP:7443 (UDP and TCP open)"
        ))
    }

    /// Provisions the pool and waits for every agent, recording each attempt before its
    /// provider is called and each instance it creates. `bar`: draw a progress bar on a
    /// terminal's stderr.
    pub async fn bring_up<O: Write + Send, E: Write + Send>(
        &self,
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
        let mut on_progress = |event: PoolProgress<'_>| match event {
            PoolProgress::Searching { providers } => {
                if let Some(bar) = &progress {
                    bar.set_message(format!("asking {providers} provider(s) for offers:"));
                }
            }
            PoolProgress::Provisioning { attempt, nodes } => {
                self.record_progress(&event);
                if let Some(bar) = &progress {
                    bar.set_message(format!(
                        "starting {nodes} x {} on {} ({}):",
                        attempt.offer.instance_type, attempt.offer.provider, attempt.market
                    ));
                }
            }
            PoolProgress::Provisioned { .. } => self.record_progress(&event),
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
        let up = Pool::up(
            self.coordinator.clone(),
            &self.providers,
            &plan.selection,
            &plan.spec,
            &mut on_progress,
        )
        .await;
        if let Some(bar) = &progress {
            bar.finish_and_clear();
        }
        up.map_err(|e| e.to_string())
    }

    /// Records what provisioning is about to create (before the call) and what it created.
    pub fn record_progress(&self, event: &PoolProgress<'_>) {
        record_progress(&self.store, &self.name, event);
    }

    /// Runs `request` on `pool`, recording each task attempt under the pool-wide number
    /// `first_task + its index` and sending every event to `events` as it happens (a slow
    /// reader slows the job down rather than piling its output up here). Its `--workdir` is
    /// on every node before any task starts; its `--download`s come back once they ended.
    pub async fn run(
        &self,
        pool: &Pool,
        request: &JobRequest,
        stdin: Option<crate::run::TaskInput>,
        first_task: u64,
        events: mpsc::Sender<RunEvent>,
    ) -> Result<Vec<TaskReport>, String> {
        let cwd = match &request.workdir {
            Some(dir) => {
                let report = crate::workdir::sync_workdir(
                    &pool.shared_coordinator(),
                    &pool.nodes(),
                    dir,
                    std::slice::from_ref(&request.download_to),
                )
                .await?;
                for event in crate::workdir::sync_events(&report) {
                    let _ = events.send(event).await;
                }
                Some(report.dir)
            }
            None => None,
        };
        let job = build_job(pool, request, stdin, cwd.clone()).await?;
        let (events_tx, mut events_rx) = mpsc::channel(64);
        let running = run_job(pool, job, events_tx);
        let recording = async {
            // Each task's current attempt, for the state store.
            let mut attempts: std::collections::HashMap<usize, u32> = Default::default();
            let number = |task: &usize| first_task + *task as u64;
            while let Some(event) = events_rx.recv().await {
                match &event {
                    RunEvent::Started { task, node } => {
                        let attempt = attempts.get(task).copied().unwrap_or(0);
                        record(&self.store, |s| {
                            s.task_started(&self.name, number(task), attempt, node)
                        });
                    }
                    RunEvent::Retrying { task, attempt, .. } => {
                        let lost = attempt.saturating_sub(1);
                        attempts.insert(*task, *attempt);
                        record(&self.store, |s| {
                            s.task_ended(&self.name, number(task), lost, "lost", None)
                        });
                    }
                    RunEvent::Finished { task, report } => {
                        let attempt = attempts.get(task).copied().unwrap_or(0);
                        let (state, code) = match &report.outcome {
                            Ok(outcome) => ("finished", Some(outcome.exit_code())),
                            Err(_) => ("lost", None),
                        };
                        record(&self.store, |s| {
                            s.task_ended(&self.name, number(task), attempt, state, code)
                        });
                    }
                    _ => {}
                }
                let _ = events.send(event).await;
            }
        };
        let (reports, ()) = tokio::join!(running, recording);
        if !request.downloads.is_empty() {
            let ran: std::collections::BTreeSet<&str> =
                reports.iter().map(|r| r.node.as_str()).collect();
            let nodes: Vec<_> = pool
                .nodes()
                .into_iter()
                .filter(|n| ran.contains(n.node_id.as_str()))
                .collect();
            let downloads = crate::workdir::download_all(
                &nodes,
                cwd.as_deref(),
                &request.downloads,
                &request.download_to,
                request.download_limit,
                pool.shared_coordinator().node_timeout(),
            )
            .await?;
            for event in crate::workdir::download_events(&downloads) {
                let _ = events.send(event).await;
            }
        }
        Ok(reports)
    }

    /// Tears the pool down; a SIGINT meanwhile only says what is still being removed. Once
    /// nothing is left the pool's files and record go; otherwise the record says the teardown
    /// failed, for `skyward down`. Returns whether everything is gone.
    pub async fn finish(&self, interrupts: &mut tokio::signal::unix::Signal) -> bool {
        let name = &self.name;
        let teardown = tear_down(
            name,
            &self.dir,
            &self.coordinator,
            &self.providers,
            &self.store,
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
}

/// Tears pool `name` down; once nothing is left its files (`dir`) and record go, otherwise
/// the record says the teardown failed, for `skyward down`, and the error says so.
pub async fn tear_down(
    name: &str,
    dir: &Path,
    coordinator: &Coordinator,
    providers: &[Arc<dyn Provider>],
    store: &Mutex<Store>,
) -> Result<(), String> {
    record(store, |s| s.set_state(name, PoolState::TearingDown));
    match pool::teardown(coordinator, providers).await {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(dir);
            forget(store, name);
            Ok(())
        }
        Err(e) => {
            record(store, |s| s.set_state(name, PoolState::TeardownFailed));
            Err(format!(
                "pool {name} may have left machines behind ({e}): `skyward down {name}` tries again"
            ))
        }
    }
}

/// Records what provisioning pool `pool` is about to create (before the call) and what it
/// created, so that `skyward down` finds it after a crash.
pub fn record_progress(store: &Mutex<Store>, pool: &str, event: &PoolProgress<'_>) {
    match event {
        PoolProgress::Provisioning { attempt, .. } => record(store, |s| {
            s.add_placement(
                pool,
                &Placement {
                    provider: attempt.offer.provider.clone(),
                    region: attempt.offer.region.clone(),
                    instance_type: attempt.offer.instance_type.clone(),
                },
            )
        }),
        PoolProgress::Provisioned { attempt, instances } => {
            for instance in instances.iter() {
                record(store, |s| {
                    s.add_instance(
                        pool,
                        &InstanceRecord {
                            provider: attempt.offer.provider.clone(),
                            region: attempt.offer.region.clone(),
                            node: instance.node_id.clone(),
                            provider_id: instance.provider_id.clone(),
                        },
                    )
                });
            }
        }
        _ => {}
    }
}

/// Writes to the state store; a failed write is logged (the CLI shows warnings), not fatal:
/// the run goes on.
pub fn record(store: &Mutex<Store>, write: impl FnOnce(&Store) -> Result<(), String>) {
    let store = store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Err(message) = write(&store) {
        tracing::warn!("state store: {message}");
    }
}

/// Forgets a pool of which nothing is left.
pub fn forget(store: &Mutex<Store>, pool: &str) {
    record(store, |s| s.remove_pool(pool));
}
