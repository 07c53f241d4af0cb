//! A pool's async shell around the pure [`selection`]:
//! ask every provider for offers, try them in the selection's order (tearing down each
//! failed attempt), wait for every agent to enroll and connect, hand out the nodes, and tear
//! everything down at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::server::{Coordinator, CoordinatorEvent, NodeHandle};
use skyward_core::offer::{Market, Offer};
use skyward_core::selection::{self, Attempt, Candidate, Selection};
pub use skyward_core::spec::PoolSpec;
use skyward_providers::bootstrap::{Reverse, AGENT_PORT};
use skyward_providers::{
    ErrorKind, Instance, NodeBootstrap, Provider, ProviderError, ProvisionRequest,
};

/// Progress reports while a pool comes up.
pub enum PoolProgress<'a> {
    /// Providers are being asked for offers.
    Searching { providers: usize },
    /// About to ask the attempt's provider for machines (nothing of it exists yet).
    Provisioning { attempt: &'a Attempt, nodes: usize },
    /// The provider created these.
    Provisioned {
        attempt: &'a Attempt,
        instances: &'a [Instance],
    },
    AttemptFailed {
        attempt: &'a Attempt,
        error: &'a ProviderError,
    },
    NodeReady {
        node: &'a NodeHandle,
        ready: usize,
        total: usize,
    },
}

/// Why a pool could not be brought up: what kind of failure decided it, and every attempt
/// made, so that a program can tell refused credentials from missing capacity, a quota, a bad
/// request, machines that never connected or an API fault.
#[derive(Debug, thiserror::Error)]
#[error("pool {pool}: {message}")]
pub struct ProvisionError {
    pub pool: String,
    /// Every attempt and why it failed, or why none was made, in words.
    pub message: String,
    /// The attempts' kind ([`ErrorKind::of_all`]); `NoOffers` when nothing fits the spec,
    /// `Invalid` when no provider can do what it asks, the providers' own when they could not
    /// be asked for offers.
    pub kind: ErrorKind,
    /// Every provisioning attempt made, in order.
    pub attempts: Vec<FailedAttempt>,
}

/// One provisioning attempt that was given up.
#[derive(Debug, Clone)]
pub struct FailedAttempt {
    pub provider: String,
    pub instance_type: String,
    pub region: String,
    pub market: Market,
    pub kind: ErrorKind,
    /// Why it was given up, with what it had made and what became of that.
    pub message: String,
}

impl std::fmt::Display for FailedAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} in {} ({}): {}",
            self.provider, self.instance_type, self.region, self.market, self.message
        )
    }
}

/// A failure with its kind: one try to replace a node, or a wait for agents.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// How often the wait re-checks the provider for nodes that died and the coordinator for
/// connections it may have missed.
const POLL: Duration = Duration::from_millis(100);
/// How often providers are asked for nodes that died before connecting.
const FAILED_NODES_POLL: Duration = Duration::from_secs(2);

pub struct Pool {
    coordinator: Arc<Coordinator>,
    provider: Arc<dyn Provider>,
    offer: Offer,
    market: Market,
    /// In rank order; a replaced node's successor takes its place.
    nodes: std::sync::RwLock<Vec<NodeHandle>>,
    /// What the pool was asked for, and the nodes' own deadline: a replacement gets the same.
    spec: PoolSpec,
    deadline: Option<u64>,
    /// The number of the next node id (`node-N`) a replacement gets.
    next_node: std::sync::atomic::AtomicUsize,
    /// Every provider with machines of this pool: `provider`, and any a replacement fell
    /// back to.
    providers: std::sync::RwLock<Vec<Arc<dyn Provider>>>,
    /// The provider holding each node's machine, until the machine is removed.
    machines: Machines,
    /// Removes the machine of every node the coordinator gives up.
    reaper: tokio::task::JoinHandle<()>,
}

/// The provider holding each live node's machine, by node id.
type Machines = Arc<std::sync::Mutex<HashMap<String, Arc<dyn Provider>>>>;

impl Drop for Pool {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

/// How often the providers are asked which of the pool's machines are gone (reclaimed,
/// offline): sooner than their silence would say it.
const MACHINE_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Tends the machines of `machines`, one task per pool: every [`MACHINE_CHECK`] it asks their
/// providers which are gone and has `coordinator` give those nodes up; and it removes the
/// machine of each node the coordinator gives up (lost, silent, interrupted, gone), so that
/// a fenced node bills no longer than its provider takes to remove it. Nodes given up
/// before it started, or while it lagged behind, are found by asking the coordinator which
/// are fenced.
async fn tend_machines(coordinator: Arc<Coordinator>, machines: Machines) {
    let mut events = coordinator.subscribe();
    let mut machine_check = tokio::time::interval(MACHINE_CHECK);
    let mut sweep = true;
    loop {
        let lost: Vec<String> = match sweep {
            true => machines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .filter(|node| coordinator.fenced(node).is_some())
                .cloned()
                .collect(),
            false => Vec::new(),
        };
        sweep = false;
        for node in lost {
            let provider = machines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&node);
            if let Some(provider) = provider {
                let pool = coordinator.pool().to_string();
                tokio::spawn(async move { terminate(&provider, &pool, &node).await });
            }
        }
        tokio::select! {
            event = events.recv() => match event {
                Ok(CoordinatorEvent::NodeLost { .. }) | Err(RecvError::Lagged(_)) => sweep = true,
                Ok(_) => {}
                Err(RecvError::Closed) => return,
            },
            _ = machine_check.tick() => give_up_gone_machines(&coordinator, &machines).await,
        }
    }
}

/// Gives up each node of `machines` whose provider says its machine is gone.
async fn give_up_gone_machines(coordinator: &Coordinator, machines: &Machines) {
    let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
    for provider in machines.lock().unwrap_or_else(|p| p.into_inner()).values() {
        if !providers.iter().any(|p| Arc::ptr_eq(p, provider)) {
            providers.push(provider.clone());
        }
    }
    for provider in providers {
        for (node, why) in provider.failed_nodes(coordinator.pool()).await {
            let ours = machines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&node)
                .is_some_and(|p| Arc::ptr_eq(p, &provider));
            if ours {
                coordinator.give_up(&node, &format!("{}: {why}", provider.name()));
            }
        }
    }
}

/// Removes `node`'s machine at `provider`, saying in the log what came of it.
async fn terminate(provider: &Arc<dyn Provider>, pool: &str, node: &str) {
    match provider.terminate(pool, node).await {
        Ok(()) => tracing::warn!(node = %node, "its machine at {} was removed", provider.name()),
        Err(e) => {
            tracing::warn!(node = %node, "removing its machine: {e} (the pool's teardown tries again)")
        }
    }
}

/// An attempt in a line: provider, instance type, region and market.
fn describe(attempt: &Attempt) -> String {
    format!(
        "{} {} in {} ({})",
        attempt.offer.provider, attempt.offer.instance_type, attempt.offer.region, attempt.market
    )
}

/// Asks every provider for offers at once; one provider's failure is its candidate's error.
pub async fn candidates(providers: &[Arc<dyn Provider>], spec: &PoolSpec) -> Vec<Candidate> {
    candidates_and_refusals(providers, spec)
        .await
        .into_iter()
        .map(|(candidate, _)| candidate)
        .collect()
}

/// [`candidates`], each with the kind of its provider's refusal when it could not be asked.
async fn candidates_and_refusals(
    providers: &[Arc<dyn Provider>],
    spec: &PoolSpec,
) -> Vec<(Candidate, Option<ErrorKind>)> {
    let mut queries = JoinSet::new();
    for (index, provider) in providers.iter().enumerate() {
        let (provider, spec) = (provider.clone(), spec.clone());
        queries.spawn(async move { (index, provider.offers(&spec).await) });
    }
    let mut answers: Vec<Option<Result<Vec<Offer>, ProviderError>>> = vec![None; providers.len()];
    while let Some(Ok((index, answer))) = queries.join_next().await {
        answers[index] = Some(answer);
    }
    providers
        .iter()
        .zip(answers)
        .map(|(provider, answer)| {
            let (offers, refusal) = match answer {
                Some(Ok(offers)) => (
                    Ok(offers
                        .into_iter()
                        .filter(|o| spec.mismatch(o).is_none())
                        .collect()),
                    None,
                ),
                Some(Err(e)) => (Err(e.to_string()), Some(e.kind)),
                None => (
                    Err(format!("{}: offer query did not finish", provider.name())),
                    Some(ErrorKind::Api),
                ),
            };
            let candidate = Candidate {
                provider: provider.name().to_string(),
                offers,
            };
            (candidate, refusal)
        })
        .collect()
}

/// How long past a pool's TTL its nodes wait for their coordinator to end it before they
/// stop by themselves.
pub const NODE_DEADLINE_GRACE: Duration = Duration::from_secs(60);

impl Pool {
    /// Provisions `spec.nodes` nodes from the first offer that works and returns once every
    /// agent is connected. An attempt none of whose agents connect (or whose machines refuse
    /// the MIG layout) is torn down before the next offer is tried; a node of a working
    /// attempt whose agent does not connect is removed and replaced on its own, from the same
    /// offer first, then the next offers. On failure, everything provisioned is torn down
    /// before the error, which lists every attempt, is returned.
    pub async fn up(
        coordinator: Arc<Coordinator>,
        providers: &[Arc<dyn Provider>],
        selection: &Selection,
        spec: &PoolSpec,
        on_progress: &mut (dyn FnMut(PoolProgress<'_>) + Send),
    ) -> Result<Pool, ProvisionError> {
        let pool = coordinator.pool().to_string();
        let error =
            |kind: ErrorKind, message: String, attempts: Vec<FailedAttempt>| ProvisionError {
                pool: pool.clone(),
                message,
                kind,
                attempts,
            };
        on_progress(PoolProgress::Searching {
            providers: providers.len(),
        });
        if let Err(message) = check(spec, providers) {
            return Err(error(ErrorKind::Invalid, message, Vec::new()));
        }
        let (candidates, refusals): (Vec<Candidate>, Vec<Option<ErrorKind>>) =
            candidates_and_refusals(providers, spec)
                .await
                .into_iter()
                .unzip();
        let attempts = selection::plan(selection, &candidates, spec);
        if attempts.is_empty() {
            // Every provider refused to be asked (credentials, say): that is the kind.
            let kind = match refusals.iter().all(Option::is_some) {
                true => ErrorKind::of_all(refusals.into_iter().flatten()),
                false => None,
            };
            return Err(error(
                kind.unwrap_or(ErrorKind::NoOffers),
                no_offers(spec, &candidates),
                Vec::new(),
            ));
        }

        let node_ids: Vec<String> = (1..=spec.nodes).map(|i| format!("node-{i}")).collect();
        // The TTL counts from now, whichever attempt succeeds. Nodes wait a little past it,
        // so that a coordinator still there ends the pool in order; without one they stop.
        let deadline = spec.ttl.map(|ttl| {
            (std::time::SystemTime::now() + ttl + NODE_DEADLINE_GRACE)
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
        let mut failures: Vec<FailedAttempt> = Vec::new();
        let every_attempt_failed = |failures: Vec<FailedAttempt>| {
            let lines: Vec<String> = failures.iter().map(ToString::to_string).collect();
            error(
                ErrorKind::of_all(failures.iter().map(|f| f.kind)).unwrap_or(ErrorKind::Api),
                format!("every attempt failed:\n  {}", lines.join("\n  ")),
                failures,
            )
        };
        for (index, attempt) in attempts.iter().enumerate() {
            let provider = &providers[attempt.candidate];
            let failed = |kind: ErrorKind, message: String| FailedAttempt {
                provider: attempt.offer.provider.clone(),
                instance_type: attempt.offer.instance_type.clone(),
                region: attempt.offer.region.clone(),
                market: attempt.market,
                kind,
                message,
            };
            // Fresh tokens per attempt: an earlier attempt's nodes must not be able to join.
            let bootstrap = node_bootstrap(&coordinator, spec, deadline);
            let request = ProvisionRequest {
                pool: pool.clone(),
                bootstrap,
                nodes: node_ids
                    .iter()
                    .map(|id| NodeBootstrap {
                        node_id: id.clone(),
                        token: coordinator.issue_token(id),
                    })
                    .collect(),
                spec: spec.clone(),
            };
            // Per attempt: an earlier attempt's connections are no news for this one.
            let mut events = coordinator.subscribe();
            on_progress(PoolProgress::Provisioning {
                attempt,
                nodes: spec.nodes,
            });
            let instances = match provider
                .provision(&request, &attempt.offer, attempt.market)
                .await
            {
                Ok(instances) => instances,
                Err(e) => {
                    on_progress(PoolProgress::AttemptFailed { attempt, error: &e });
                    // A late machine of this attempt cannot enroll as one of the next's.
                    coordinator.revoke_tokens(&node_ids);
                    if let Err(cleanup) = provider.teardown(&pool).await {
                        tracing::error!("cleaning up after a failed attempt: {cleanup}");
                    }
                    failures.push(failed(e.kind, e.to_string()));
                    continue;
                }
            };
            provisioned(&coordinator, spec, attempt, &instances, on_progress);
            let waited = wait_for_agents(
                &coordinator,
                provider.as_ref(),
                spec,
                &node_ids,
                &mut events,
                on_progress,
            )
            .await;
            let failure = match waited {
                Ok(waited) if !waited.ready.is_empty() => {
                    let up = Pool::new(
                        coordinator.clone(),
                        provider.clone(),
                        attempt,
                        spec,
                        deadline,
                        waited.ready,
                        &instances,
                    );
                    if waited.missing.is_empty() {
                        return Ok(up);
                    }
                    let fallbacks: Vec<(Arc<dyn Provider>, Attempt)> = attempts[index + 1..]
                        .iter()
                        .map(|a| (providers[a.candidate].clone(), a.clone()))
                        .collect();
                    match up.fill(&waited.missing, &fallbacks, on_progress).await {
                        Ok(()) => return Ok(up),
                        Err(unfilled) => {
                            // No offer gave the missing nodes: the pool is given up whole.
                            let removed = match teardown(&coordinator, &up.providers()).await {
                                Ok(()) => "removed every machine of the pool".to_string(),
                                Err(cleanup) => format!("removing them failed: {cleanup}"),
                            };
                            failures.push(failed(
                                unfilled.kind,
                                format!("{}; {removed}", unfilled.message),
                            ));
                            return Err(every_attempt_failed(failures));
                        }
                    }
                }
                Ok(waited) => Failure {
                    kind: ErrorKind::Unreachable,
                    message: describe_missing(&waited.missing, node_ids.len(), spec),
                },
                Err(failure) => failure,
            };
            // Machines exist but none of them is of use (no agent connected, a MIG layout
            // refused): the offer is given up and the next tried, as for an attempt the
            // provider refused.
            let message = format!(
                "{} machine(s) created, given up: {}",
                instances.len(),
                failure.message
            );
            on_progress(PoolProgress::AttemptFailed {
                attempt,
                error: &ProviderError::new(provider.name(), failure.kind, message.clone()),
            });
            coordinator
                .shutdown_nodes("this provisioning attempt was given up")
                .await;
            coordinator.forget_nodes(&node_ids);
            let removed = match provider.teardown(&pool).await {
                Ok(()) => "removed them".to_string(),
                Err(cleanup) => {
                    tracing::error!("cleaning up after a failed attempt: {cleanup}");
                    format!("removing them failed: {cleanup}")
                }
            };
            failures.push(failed(failure.kind, format!("{message}; {removed}")));
        }
        Err(every_attempt_failed(failures))
    }

    /// A pool of `nodes` from `attempt`, whose machines (`made`, connected or not) `provider`
    /// made; from now on the machine of any node the coordinator gives up is terminated.
    fn new(
        coordinator: Arc<Coordinator>,
        provider: Arc<dyn Provider>,
        attempt: &Attempt,
        spec: &PoolSpec,
        deadline: Option<u64>,
        nodes: Vec<NodeHandle>,
        made: &[Instance],
    ) -> Pool {
        let machines: Machines = Arc::new(std::sync::Mutex::new(
            made.iter()
                .map(|instance| (instance.node_id.clone(), provider.clone()))
                .collect(),
        ));
        let reaper = tokio::spawn(tend_machines(coordinator.clone(), machines.clone()));
        Pool {
            providers: std::sync::RwLock::new(vec![provider.clone()]),
            provider,
            offer: attempt.offer.clone(),
            market: attempt.market,
            nodes: std::sync::RwLock::new(nodes),
            spec: spec.clone(),
            deadline,
            next_node: std::sync::atomic::AtomicUsize::new(spec.nodes + 1),
            machines,
            reaper,
            coordinator,
        }
    }

    /// Puts a node in place of each of `missing` (machines made whose agents never
    /// connected): the machine goes, its id is refused from now on, and a new node comes from
    /// the pool's own offer first, then `fallbacks` in order.
    async fn fill(
        &self,
        missing: &[(String, String)],
        fallbacks: &[(Arc<dyn Provider>, Attempt)],
        on_progress: &mut (dyn FnMut(PoolProgress<'_>) + Send),
    ) -> Result<(), Failure> {
        for (node, why) in missing {
            self.coordinator.forget_nodes(std::slice::from_ref(node));
            self.terminate_machine(node).await;
            let why = describe_missing(&[(node.clone(), why.clone())], 1, &self.spec);
            tracing::warn!("{why}: its machine was removed; starting a node in its place");
            self.replace(node, fallbacks, false, on_progress)
                .await
                .map_err(|e| Failure {
                    kind: e.kind,
                    message: format!("{why}, its machine removed; {e}"),
                })?;
        }
        Ok(())
    }

    /// Removes the machine of `node` through the provider that made it, if it is still
    /// there; a failure is logged (the pool's teardown tries again).
    async fn terminate_machine(&self, node: &str) {
        let provider = self
            .machines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        if let Some(provider) = provider {
            terminate(&provider, self.name(), node).await;
        }
    }

    /// The nodes in rank order (`node-1` first, a replacement in its predecessor's place).
    pub fn nodes(&self) -> Vec<NodeHandle> {
        self.nodes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Provisions a node in place of `lost` (lost, interrupted, never connected, or gone by
    /// its provider's word) and waits for its agent; the new node (`node-N`, a number not
    /// used before) then takes `lost`'s place in [`Pool::nodes`]. The pool's own provider and
    /// offer are tried first, then each of `fallbacks` in order (other providers' offers, as
    /// the selection ordered them); with `next_offer_first`, the fallbacks first and the own
    /// offer last. A try whose machine is made but whose agent does not connect has that
    /// machine removed before the next. The lost node's own machine is removed once the
    /// coordinator gives it up (see [`Pool::up`]).
    pub async fn replace(
        &self,
        lost: &str,
        fallbacks: &[(Arc<dyn Provider>, Attempt)],
        next_offer_first: bool,
        on_progress: &mut (dyn FnMut(PoolProgress<'_>) + Send),
    ) -> Result<NodeHandle, Failure> {
        let own = Attempt {
            candidate: 0,
            offer: self.offer.clone(),
            market: self.market,
            price: self.offer.price(self.market).unwrap_or(0.0),
        };
        let mut failures = Vec::new();
        let others = fallbacks
            .iter()
            .filter(|(_, a)| !(a.offer.same_as(&own.offer) && a.market == own.market))
            .map(|(p, a)| (p, a));
        let own = std::iter::once((&self.provider, &own));
        // The pool's own offer kept losing its machines soon after they came up: the next
        // offers first, the own one last.
        let tries: Vec<_> = match next_offer_first {
            false => own.chain(others).collect(),
            true => others.chain(own).collect(),
        };
        for (provider, attempt) in tries {
            match self
                .replace_from(lost, provider, attempt, on_progress)
                .await
            {
                Ok(node) => return Ok(node),
                Err(e) => {
                    on_progress(PoolProgress::AttemptFailed {
                        attempt,
                        error: &ProviderError::new(provider.name(), e.kind, e.message.clone()),
                    });
                    failures.push(e);
                }
            }
        }
        let messages: Vec<&str> = failures.iter().map(|f| f.message.as_str()).collect();
        Err(Failure {
            kind: ErrorKind::of_all(failures.iter().map(|f| f.kind)).unwrap_or(ErrorKind::NoOffers),
            message: format!("replacing {lost}: {}", messages.join("; ")),
        })
    }

    /// One try of [`Pool::replace`]: one node from `attempt`'s offer at `provider`; what a
    /// failed try made is removed.
    async fn replace_from(
        &self,
        lost: &str,
        provider: &Arc<dyn Provider>,
        attempt: &Attempt,
        on_progress: &mut (dyn FnMut(PoolProgress<'_>) + Send),
    ) -> Result<NodeHandle, Failure> {
        let number = self
            .next_node
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let node_id = format!("node-{number}");
        let coordinator = &self.coordinator;
        let mut spec = self.spec.clone();
        spec.nodes = 1;
        let request = ProvisionRequest {
            pool: self.name().to_string(),
            bootstrap: node_bootstrap(coordinator, &spec, self.deadline),
            nodes: vec![NodeBootstrap {
                node_id: node_id.clone(),
                token: coordinator.issue_token(&node_id),
            }],
            spec: spec.clone(),
        };
        // Before anything exists there: the pool's teardown must reach whatever this makes.
        {
            let mut providers = self.providers.write().unwrap_or_else(|p| p.into_inner());
            if !providers.iter().any(|p| Arc::ptr_eq(p, provider)) {
                providers.push(provider.clone());
            }
        }
        self.machines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node_id.clone(), provider.clone());
        let mut events = coordinator.subscribe();
        on_progress(PoolProgress::Provisioning { attempt, nodes: 1 });
        let ids = [node_id.clone()];
        let made = match provider
            .provision(&request, &attempt.offer, attempt.market)
            .await
        {
            Ok(instances) => {
                provisioned(coordinator, &spec, attempt, &instances, on_progress);
                wait_for_agents(
                    coordinator,
                    provider.as_ref(),
                    &spec,
                    &ids,
                    &mut events,
                    on_progress,
                )
                .await
                .and_then(|mut waited| match waited.ready.pop() {
                    Some(node) => Ok(node),
                    None => Err(Failure {
                        kind: ErrorKind::Unreachable,
                        message: describe_missing(&waited.missing, 1, &spec),
                    }),
                })
            }
            Err(e) => Err(Failure {
                kind: e.kind,
                message: e.to_string(),
            }),
        }
        .map_err(|e| Failure {
            kind: e.kind,
            message: format!("{}: {}", describe(attempt), e.message),
        });
        let node = match made {
            Ok(node) => node,
            Err(e) => {
                coordinator.forget_nodes(&ids);
                self.terminate_machine(&node_id).await;
                return Err(e);
            }
        };
        let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        match nodes.iter().position(|n| n.node_id == lost) {
            Some(index) => nodes[index] = node.clone(),
            None => nodes.push(node.clone()),
        }
        Ok(node)
    }

    /// What the pool was asked for.
    pub fn spec(&self) -> &PoolSpec {
        &self.spec
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

    /// The provider the pool's machines came from when it came up.
    pub fn provider(&self) -> Arc<dyn Provider> {
        self.provider.clone()
    }

    /// Every provider with machines of this pool: [`Pool::provider`], and any a replacement
    /// fell back to.
    pub fn providers(&self) -> Vec<Arc<dyn Provider>> {
        self.providers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The offer the pool runs on, and how it is paid for.
    pub fn offer(&self) -> (&Offer, Market) {
        (&self.offer, self.market)
    }

    /// Stops every task and removes every node.
    pub async fn down(self) {
        let _ = teardown(&self.coordinator, &self.providers()).await;
    }
}

/// Reports what `attempt` created, and with `--reverse` starts dialing the nodes whose
/// addresses the provider already knows.
fn provisioned(
    coordinator: &Coordinator,
    spec: &PoolSpec,
    attempt: &Attempt,
    instances: &[Instance],
    on_progress: &mut (dyn FnMut(PoolProgress<'_>) + Send),
) {
    on_progress(PoolProgress::Provisioned { attempt, instances });
    if spec.reverse {
        for instance in instances {
            if let Some(address) = instance.address {
                coordinator.dial(&instance.node_id, address);
            }
        }
    }
}

/// What a node of `spec` boots with, with tokens to be issued per node.
fn node_bootstrap(
    coordinator: &Coordinator,
    spec: &PoolSpec,
    deadline: Option<u64>,
) -> skyward_providers::bootstrap::Bootstrap {
    let mut bootstrap = coordinator.bootstrap();
    bootstrap.mig = spec.mig.clone();
    bootstrap.deadline = deadline;
    bootstrap.reverse = reverse_of(spec);
    // Reversed, nodes cannot reach this coordinator to download the agent from it: the image
    // has it, or the user's own --agent-url serves it.
    if spec.reverse && bootstrap.agent_url_pinned {
        bootstrap.agent_url = None;
    }
    bootstrap
}

/// Why a MIG layout cannot be had, known before anything is provisioned.
fn mig_refusal(spec: &PoolSpec, providers: &[Arc<dyn Provider>]) -> Option<String> {
    let layout = spec.mig.as_ref()?;
    if let Some(p) = providers.iter().find(|p| !p.supports_mig()) {
        return Some(format!(
            "--mig {layout}: {} nodes cannot partition GPUs with MIG; drop --mig or use another provider",
            p.name()
        ));
    }
    let wanted = spec.accelerator.as_ref()?;
    (!wanted.accelerator.mig).then(|| {
        let able: Vec<&str> = skyward_core::catalog::CATALOG
            .iter()
            .filter(|a| a.mig)
            .map(|a| a.name)
            .collect();
        format!(
            "--mig {layout}: {} has no MIG; choose one of {}",
            wanted.accelerator.name,
            able.join(", ")
        )
    })
}

/// What no provider can do for `spec`, refused before anything is created (the CLI asks
/// before it even starts its coordinator).
pub fn check(spec: &PoolSpec, providers: &[Arc<dyn Provider>]) -> Result<(), String> {
    if spec.reverse {
        if let Some(p) = providers.iter().find(|p| !p.supports_reverse()) {
            let able: Vec<&str> = providers
                .iter()
                .filter(|p| p.supports_reverse())
                .map(|p| p.name())
                .collect();
            return Err(format!(
                "{} cannot yet start agents that the coordinator dials: drop --reverse{}",
                p.name(),
                if able.is_empty() {
                    String::new()
                } else {
                    format!(", or use {}", able.join(", "))
                }
            ));
        }
        if spec.public_ip.is_none() {
            if let Some(p) = providers.iter().find(|p| p.reverse_needs_public_ip()) {
                return Err(format!(
                    "--reverse on {} needs --public-ip ADDRESS: the address this machine's traffic leaves from (e.g. `curl -s https://checkip.amazonaws.com`), the only one the nodes' agent port opens to",
                    p.name()
                ));
            }
        }
    }
    match mig_refusal(spec, providers) {
        Some(message) => Err(message),
        None => Ok(()),
    }
}

/// Why nothing could be tried, with what each provider said.
fn no_offers(spec: &PoolSpec, candidates: &[Candidate]) -> String {
    let reasons: Vec<String> = candidates
        .iter()
        .map(|c| match &c.offers {
            Err(e) => e.clone(),
            Ok(offers) if offers.is_empty() => format!("{}: no offer fits", c.provider),
            Ok(_) => format!(
                "{}: offers fit but none within the price limit and allocation",
                c.provider
            ),
        })
        .collect();
    format!(
        "no offers for {}: {}; try another accelerator or size, another region, a higher --max-price, or another --allocation",
        spec.describe(),
        reasons.join("; ")
    )
}

/// Why a node is missing when the connect timeout passed without its agent.
const NEVER_CONNECTED: &str = "never connected";

/// The nodes of `missing` (of `total` waited for) in one line: those the connect timeout
/// passed for together, with what to do about it, then each that failed with its reason.
fn describe_missing(missing: &[(String, String)], total: usize, spec: &PoolSpec) -> String {
    let (silent, failed): (Vec<_>, Vec<_>) =
        missing.iter().partition(|(_, why)| why == NEVER_CONNECTED);
    let mut parts: Vec<String> = failed
        .iter()
        .map(|(node, why)| format!("{node}: {why}"))
        .collect();
    if !silent.is_empty() {
        let nodes: Vec<&str> = silent.iter().map(|(node, _)| node.as_str()).collect();
        parts.push(format!(
            "{} of {total} nodes never connected: {} (waited {}; raise --connect-timeout, check the agent logs, or run `skyward doctor` to check that nodes can reach this coordinator)",
            nodes.len(),
            nodes.join(", "),
            humantime::format_duration(spec.connect_timeout)
        ));
    }
    parts.join("; ")
}

/// What a wait for a provisioning attempt's agents came to.
struct Waited {
    /// The nodes whose agents connected, in the order of the ids waited for.
    ready: Vec<NodeHandle>,
    /// The nodes whose agents did not, and why (their provider says the machine failed, or
    /// the connect timeout passed).
    missing: Vec<(String, String)>,
}

/// Waits until every node of `node_ids` has connected, has failed by its provider's word, or
/// the connect timeout has passed. An error gives the whole attempt up (a MIG layout the
/// machines refused, the coordinator stopped).
async fn wait_for_agents(
    coordinator: &Coordinator,
    provider: &dyn Provider,
    spec: &PoolSpec,
    node_ids: &[String],
    events: &mut tokio::sync::broadcast::Receiver<CoordinatorEvent>,
    on_progress: &mut (dyn FnMut(PoolProgress<'_>) + Send),
) -> Result<Waited, Failure> {
    let pool = coordinator.pool();
    let mut ready: Vec<Option<NodeHandle>> = vec![None; node_ids.len()];
    let mut failed: HashMap<String, String> = HashMap::new();
    let deadline = Instant::now() + spec.connect_timeout;
    let mut last_failure_check = Instant::now();
    let waiting = |ready: &[Option<NodeHandle>], failed: &HashMap<String, String>| -> Vec<String> {
        node_ids
            .iter()
            .zip(ready)
            .filter(|(id, node)| node.is_none() && !failed.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect()
    };
    loop {
        let still = waiting(&ready, &failed);
        if still.is_empty() {
            break;
        }
        let connected = tokio::select! {
            event = events.recv() => match event {
                Ok(CoordinatorEvent::NodeConnected(node)) => Some(node),
                Ok(_) | Err(RecvError::Lagged(_)) => None,
                Err(RecvError::Closed) => return Err(Failure { kind: ErrorKind::Api, message: "coordinator stopped".into() }),
            },
            _ = tokio::time::sleep(POLL) => {
                // Asking a cloud provider is an API call: do it every few seconds only.
                if last_failure_check.elapsed() >= FAILED_NODES_POLL {
                    last_failure_check = Instant::now();
                    // Only the nodes waited for: a node being replaced may be failed too.
                    for (node, why) in provider.failed_nodes(pool).await {
                        if still.contains(&node) {
                            failed.insert(node, why);
                        }
                    }
                    if let Some(reverse) = reverse_of(spec) {
                        dial_listening_nodes(coordinator, provider, &reverse).await;
                    }
                }
                // Catch connections whose events were missed.
                still.iter().find_map(|id| coordinator.node(id))
            },
            _ = tokio::time::sleep_until(deadline) => {
                for node in still {
                    failed.insert(node, NEVER_CONNECTED.to_string());
                }
                break;
            }
        };
        if let Some(node) = connected {
            // A node without the MIG layout the pool asked for is no node of this pool.
            if let Some(report) = &node.inventory.mig {
                if let Some(why) = &report.error {
                    return Err(Failure {
                        kind: ErrorKind::Invalid,
                        message: format!(
                            "{}: MIG layout {} not applied: {why}",
                            node.node_id, report.requested
                        ),
                    });
                }
            }
            if let Some(index) = node_ids.iter().position(|id| *id == node.node_id) {
                if ready[index].is_none() && !failed.contains_key(&node.node_id) {
                    ready[index] = Some(node.clone());
                    on_progress(PoolProgress::NodeReady {
                        node: &node,
                        ready: ready.iter().flatten().count(),
                        total: node_ids.len(),
                    });
                }
            }
        }
    }
    let missing = node_ids
        .iter()
        .filter_map(|id| failed.remove(id).map(|why| (id.clone(), why)))
        .collect();
    Ok(Waited {
        ready: ready.into_iter().flatten().collect(),
        missing,
    })
}

/// How the coordinator reaches a `--reverse` pool's agents; `None` when they dial it.
fn reverse_of(spec: &PoolSpec) -> Option<Reverse> {
    spec.reverse.then_some(Reverse {
        agent_port: AGENT_PORT,
        allow_from: spec.public_ip,
    })
}

/// Dials the listening nodes whose addresses the provider knows by now and were not dialed
/// yet; a provider that cannot say is asked again at the next poll.
async fn dial_listening_nodes(
    coordinator: &Coordinator,
    provider: &dyn Provider,
    reverse: &Reverse,
) {
    match provider.listen_addresses(coordinator.pool(), reverse).await {
        Ok(addresses) => {
            for (node_id, address) in addresses {
                if coordinator.dial(&node_id, address) {
                    tracing::info!(node = %node_id, "dialing the listening agent at {address}");
                }
            }
        }
        Err(e) => tracing::warn!("asking for the nodes' addresses: {e}"),
    }
}

/// Tells agents to stop, then has each provider remove every node of the pool. Safe to call
/// at any point, including when provisioning was interrupted halfway.
pub async fn teardown(
    coordinator: &Coordinator,
    providers: &[Arc<dyn Provider>],
) -> Result<(), String> {
    coordinator.shutdown_nodes("pool is being torn down").await;
    let mut failures = Vec::new();
    for provider in providers {
        if let Err(e) = provider.teardown(coordinator.pool()).await {
            tracing::error!("teardown: {e}");
            eprintln!("skyward: teardown: {e}");
            failures.push(e.to_string());
        }
    }
    coordinator.close().await;
    match failures.is_empty() {
        true => Ok(()),
        false => Err(failures.join("; ")),
    }
}
