//! One coordinator's pool from its record to its teardown, as `skyward run` and the background
//! coordinator of `skyward pool up` both drive it: record the pool before anything exists,
//! start the coordinator, bring the nodes up (recording every attempt and instance), run jobs
//! (recording every task attempt), and tear down, forgetting the pool only once nothing is left.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::job::{build_job, JobRequest};
use crate::plan::{advertise, default_listen, make_providers, PoolPlan};
use crate::pool::{self, Pool, PoolProgress};
use crate::run::{run_job, RunEvent, TaskReport};
use crate::server::{Coordinator, CoordinatorConfig};
use crate::store::{InstanceRecord, Owner, Placement, PoolState, Store};
use skyward_core::lifecycle;
use skyward_providers::Provider;

/// Why a pool session could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The plan cannot work (its providers refuse its spec, an address is wrong): nothing
    /// was recorded or started.
    #[error("{0}")]
    Plan(String),
    /// Recording the pool or starting its coordinator failed.
    #[error("{0}")]
    Failed(String),
}

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
    /// starts its coordinator; nothing is provisioned yet.
    pub fn start(plan: &PoolPlan, home: &Path, name: &str) -> Result<PoolSession, StartError> {
        let dir = home.join("pools").join(name);
        let (providers, advertise) = Self::providers(plan, &dir).map_err(StartError::Plan)?;
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
            .map_err(StartError::Failed)?;
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
                return Err(StartError::Failed(format!("starting the coordinator: {e}")));
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

    /// What [`PoolSession::start`] refuses as [`StartError::Plan`], found without recording or
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
    /// provider is called and each instance it creates; `on_progress` sees every step after
    /// it is recorded.
    pub async fn bring_up(
        &self,
        plan: &PoolPlan,
        on_progress: &mut (dyn FnMut(&PoolProgress<'_>) + Send),
    ) -> Result<Pool, String> {
        let mut record_then_tell = |event: PoolProgress<'_>| {
            self.record_progress(&event);
            on_progress(&event);
        };
        let up = Pool::up(
            self.coordinator.clone(),
            &self.providers,
            &plan.selection,
            &plan.spec,
            &mut record_then_tell,
        )
        .await
        .map_err(|e| e.to_string());
        let phase = match &up {
            Ok(_) => lifecycle::Event::Up,
            Err(why) => lifecycle::Event::ProvisionFailed(why.clone()),
        };
        // Provisioning happens once: its end is always an event the phase allows.
        let _ = self.coordinator.lifecycle_event(phase);
        up
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
    // From here no job starts and no place is refilled; asked again, it is already so.
    let _ = coordinator.lifecycle_event(lifecycle::Event::TeardownRequested);
    let removed = pool::teardown(coordinator, providers).await;
    let _ = coordinator.lifecycle_event(lifecycle::Event::TeardownFinished);
    match removed {
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
