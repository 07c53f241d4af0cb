//! A pool's async shell around the pure [`Lifecycle`]: provision through a provider, wait for
//! every agent to enroll and connect, hand out the nodes, tear everything down.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::lifecycle::{Action, Event, Lifecycle};
use crate::provider::{NodeBootstrap, Provider, ProvisionRequest};
use crate::server::{Coordinator, CoordinatorEvent, NodeHandle};

#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub nodes: usize,
    /// How long agents get to enroll and connect after provisioning.
    pub connect_timeout: Duration,
}

/// Progress reports while a pool comes up.
pub enum PoolProgress<'a> {
    Provisioning {
        nodes: usize,
        provider: &'a str,
    },
    NodeReady {
        node: &'a NodeHandle,
        ready: usize,
        total: usize,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("pool {pool}: {message}")]
pub struct PoolError {
    pub pool: String,
    pub message: String,
}

/// How often the wait re-checks the provider for nodes that died and the coordinator for
/// connections it may have missed.
const POLL: Duration = Duration::from_millis(100);

pub struct Pool {
    coordinator: Arc<Coordinator>,
    provider: Arc<dyn Provider>,
    nodes: Vec<NodeHandle>,
    lifecycle: Lifecycle,
}

impl Pool {
    /// Provisions `spec.nodes` nodes and returns once every agent is connected. On failure,
    /// everything provisioned is torn down before the error is returned.
    pub async fn up(
        coordinator: Arc<Coordinator>,
        provider: Arc<dyn Provider>,
        spec: &PoolSpec,
        on_progress: &mut (dyn FnMut(PoolProgress<'_>) + Send),
    ) -> Result<Pool, PoolError> {
        let pool = coordinator.pool().to_string();
        let node_ids: Vec<String> = (1..=spec.nodes).map(|i| format!("node-{i}")).collect();
        let mut lifecycle = Lifecycle::new(node_ids.clone());
        let mut events = coordinator.subscribe();
        let request = ProvisionRequest {
            pool: pool.clone(),
            coordinator: coordinator.local_addr().to_string(),
            ca_pin: coordinator.ca_pin(),
            nodes: node_ids
                .iter()
                .map(|id| NodeBootstrap {
                    node_id: id.clone(),
                    token: coordinator.issue_token(id),
                })
                .collect(),
        };
        on_progress(PoolProgress::Provisioning {
            nodes: spec.nodes,
            provider: provider.name(),
        });
        let mut ready: Vec<Option<NodeHandle>> = vec![None; spec.nodes];
        let fail = |lifecycle: &mut Lifecycle, event: Event| -> PoolError {
            let actions = lifecycle.handle(event).unwrap_or_default();
            let message = actions
                .into_iter()
                .find_map(|a| match a {
                    Action::Fail { error } => Some(error),
                    _ => None,
                })
                .unwrap_or_else(|| "failed".into());
            PoolError {
                pool: pool.clone(),
                message,
            }
        };
        let result: Result<(), PoolError> = async {
            if let Err(e) = provider.provision(&request).await {
                return Err(fail(&mut lifecycle, Event::ProvisionFailed(e.to_string())));
            }
            lifecycle.handle(Event::Provisioned).map_err(|e| PoolError {
                pool: pool.clone(),
                message: e.to_string(),
            })?;
            let deadline = Instant::now() + spec.connect_timeout;
            while *lifecycle.phase() == crate::lifecycle::Phase::WaitingForAgents {
                let connected = tokio::select! {
                    event = events.recv() => match event {
                        Ok(CoordinatorEvent::NodeConnected(node)) => Some(node),
                        Ok(_) | Err(RecvError::Lagged(_)) => None,
                        Err(RecvError::Closed) => return Err(PoolError { pool: pool.clone(), message: "coordinator stopped".into() }),
                    },
                    _ = tokio::time::sleep(POLL) => {
                        let failed = provider.failed_nodes(&pool).await;
                        if !failed.is_empty() {
                            let detail: Vec<String> = failed.iter().map(|(node, why)| format!("{node}: {why}")).collect();
                            let _ = lifecycle.handle(Event::TeardownRequested);
                            return Err(PoolError { pool: pool.clone(), message: format!("nodes failed before connecting: {}", detail.join("; ")) });
                        }
                        // Catch connections whose events were missed.
                        lifecycle.missing().iter().find_map(|id| coordinator.node(id))
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        let waited = humantime::format_duration(spec.connect_timeout);
                        let err = fail(&mut lifecycle, Event::WaitTimedOut);
                        return Err(PoolError { message: format!("{} (waited {waited}; raise --connect-timeout or check the agent logs)", err.message), ..err });
                    }
                };
                if let Some(node) = connected {
                    if let Some(index) = node_ids.iter().position(|id| *id == node.node_id) {
                        if ready[index].is_none() {
                            let _ = lifecycle.handle(Event::AgentReady(node.node_id.clone()));
                            ready[index] = Some(node.clone());
                            on_progress(PoolProgress::NodeReady {
                                node: &node,
                                ready: lifecycle.ready_count(),
                                total: spec.nodes,
                            });
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            teardown(&coordinator, provider.as_ref()).await;
            return Err(e);
        }
        Ok(Pool {
            coordinator,
            provider,
            nodes: ready.into_iter().flatten().collect(),
            lifecycle,
        })
    }

    /// The nodes in order: `node-1` first.
    pub fn nodes(&self) -> &[NodeHandle] {
        &self.nodes
    }

    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    pub fn shared_coordinator(&self) -> Arc<Coordinator> {
        self.coordinator.clone()
    }

    pub fn name(&self) -> &str {
        self.coordinator.pool()
    }

    pub(crate) fn lifecycle(&mut self) -> &mut Lifecycle {
        &mut self.lifecycle
    }

    /// Stops every task and removes every node.
    pub async fn down(mut self) {
        let _ = self.lifecycle.handle(Event::TeardownRequested);
        teardown(&self.coordinator, self.provider.as_ref()).await;
        let _ = self.lifecycle.handle(Event::TeardownFinished);
    }
}

/// Tells agents to stop, then has the provider remove every node of the pool. Safe to call
/// at any point, including when provisioning was interrupted halfway.
pub async fn teardown(coordinator: &Coordinator, provider: &dyn Provider) {
    coordinator.shutdown_nodes("pool is being torn down").await;
    if let Err(e) = provider.teardown(coordinator.pool()).await {
        tracing::error!("teardown: {e}");
        eprintln!("skyward: teardown: {e}");
    }
    coordinator.close().await;
}
