//! Selection and fallback through a real pool: providers that fail on purpose in front of
//! real local agents, so the attempts, the teardown of each failed one and the final choice
//! are all observed for real.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use skyward_coordinator::pool::PoolProgress;
use skyward_coordinator::{Coordinator, CoordinatorConfig, Pool};
use skyward_core::offer::{Market, Offer};
use skyward_core::selection::{Candidate, CustomSelection};
use skyward_core::{selection::Selection, spec::PoolSpec};
use skyward_providers::{
    ErrorKind, Instance, LocalProvider, Provider, ProviderError, ProviderStatus, ProvisionRequest,
};
use skyward_tests::{bin, task_output, Sandbox};

/// A provider with one offer at `price` that either fails with `failure` or starts real
/// local agents.
struct Scripted {
    name: String,
    price: f64,
    failure: Option<ErrorKind>,
    local: LocalProvider,
    provisions: AtomicUsize,
    teardowns: AtomicUsize,
}

impl Scripted {
    fn new(sandbox: &Sandbox, name: &str, price: f64, failure: Option<ErrorKind>) -> Arc<Self> {
        Self::running(sandbox, name, price, failure, bin("skyward-agent"))
    }

    /// Machines are made and run real agents, but the agents of the nodes that
    /// `hollow_nodes` (a shell pattern) matches dial an address where no coordinator listens,
    /// so they never connect (a host whose network is broken).
    fn partly_hollow(sandbox: &Sandbox, name: &str, price: f64, hollow_nodes: &str) -> Arc<Self> {
        let program = sandbox.path().join(format!("{name}-agent"));
        let agent = bin("skyward-agent");
        std::fs::write(
            &program,
            format!(
                "#!/bin/sh\n\
                 case \" $* \" in *\" \"{hollow_nodes}\" \"*) ;; *) exec {agent} \"$@\";; esac\n\
                 previous=\n\
                 for arg in \"$@\"; do\n\
                 shift\n\
                 [ \"$previous\" = --coordinator ] && arg=127.0.0.1:9\n\
                 set -- \"$@\" \"$arg\"\n\
                 previous=$arg\n\
                 done\n\
                 exec {agent} \"$@\"\n",
                agent = agent.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &program,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        Self::running(sandbox, name, price, None, program)
    }

    /// Machines are made, but what runs on them never becomes an agent (a bad image, a
    /// marketplace host that never starts its container).
    fn hollow(sandbox: &Sandbox, name: &str, price: f64) -> Arc<Self> {
        let program = sandbox.path().join(format!("{name}-not-an-agent"));
        std::fs::write(&program, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(
            &program,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        Self::running(sandbox, name, price, None, program)
    }

    fn running(
        sandbox: &Sandbox,
        name: &str,
        price: f64,
        failure: Option<ErrorKind>,
        program: std::path::PathBuf,
    ) -> Arc<Self> {
        Arc::new(Scripted {
            name: name.into(),
            price,
            failure,
            local: LocalProvider::new(Ok(program), sandbox.path().join(name)),
            provisions: AtomicUsize::new(0),
            teardowns: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl Provider for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    async fn offers(&self, _spec: &PoolSpec) -> Result<Vec<Offer>, ProviderError> {
        Ok(vec![Offer {
            provider: self.name.clone(),
            region: "test-1".into(),
            instance_type: format!("{}-type", self.name),
            accelerator: None,
            vcpus: 1,
            memory_gb: 1.0,
            on_demand_per_hour: Some(self.price),
            spot_per_hour: None,
            available: true,
            spot_available: None,
            provider_ref: String::new(),
        }])
    }

    async fn provision(
        &self,
        request: &ProvisionRequest,
        offer: &Offer,
        market: Market,
    ) -> Result<Vec<Instance>, ProviderError> {
        self.provisions.fetch_add(1, Ordering::SeqCst);
        match self.failure {
            Some(kind) => Err(ProviderError::new(
                &self.name,
                kind,
                "Not enough resources to deploy",
            )),
            None => self.local.provision(request, offer, market).await,
        }
    }

    async fn failed_nodes(&self, pool: &str) -> Vec<(String, String)> {
        self.local.failed_nodes(pool).await
    }

    async fn teardown(&self, pool: &str) -> Result<(), ProviderError> {
        self.teardowns.fetch_add(1, Ordering::SeqCst);
        self.local.teardown(pool).await
    }

    async fn terminate(&self, pool: &str, node_id: &str) -> Result<(), ProviderError> {
        self.local.terminate(pool, node_id).await
    }

    async fn status(&self) -> ProviderStatus {
        self.local.status().await
    }
}

fn coordinator() -> Arc<Coordinator> {
    skyward_common::install_crypto_provider();
    Arc::new(
        Coordinator::start(CoordinatorConfig {
            pool: "sel".into(),
            bind: ([127, 0, 0, 1], 0).into(),
            state_dir: None,
        })
        .unwrap(),
    )
}

/// Node `index` of `pool` runs `echo text`; then the pool goes, leaving no process behind.
async fn echoes_then_goes(pool: Pool, index: usize, text: &str, sandbox: &Sandbox) {
    let mut task = pool
        .coordinator()
        .start_task(
            &pool.nodes()[index],
            skyward_tests::command(&["echo", text]),
        )
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, format!("{text}\n").as_bytes());
    drop(task);
    pool.down().await;
    assert!(sandbox
        .wait_for_no_processes(std::time::Duration::from_secs(10))
        .is_empty());
}

async fn up(
    providers: &[Arc<Scripted>],
    selection: Selection,
    nodes: usize,
) -> (Result<Pool, String>, Vec<String>) {
    up_with(providers, selection, PoolSpec::new(nodes)).await
}

async fn up_with(
    providers: &[Arc<Scripted>],
    selection: Selection,
    spec: PoolSpec,
) -> (Result<Pool, String>, Vec<String>) {
    let dyn_providers: Vec<Arc<dyn Provider>> = providers
        .iter()
        .map(|p| p.clone() as Arc<dyn Provider>)
        .collect();
    let failed = Mutex::new(Vec::new());
    let mut on_progress = |event: PoolProgress<'_>| {
        if let PoolProgress::AttemptFailed { attempt, error } = event {
            failed
                .lock()
                .unwrap()
                .push(format!("{}: {}", attempt.offer.provider, error.message));
        }
    };
    let result = Pool::up(
        coordinator(),
        &dyn_providers,
        &selection,
        &spec,
        &mut on_progress,
    )
    .await
    .map_err(|e| e.to_string());
    (result, failed.into_inner().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cheapest_falls_back_after_a_capacity_error_and_cleans_up_the_attempt() {
    let sandbox = Sandbox::new();
    let cheap = Scripted::new(&sandbox, "cheap", 1.0, Some(ErrorKind::Capacity));
    let dear = Scripted::new(&sandbox, "dear", 3.0, None);
    let middle = Scripted::new(&sandbox, "middle", 2.0, None);
    let (pool, failed) = up(
        &[dear.clone(), cheap.clone(), middle.clone()],
        Selection::Cheapest,
        2,
    )
    .await;
    let pool = pool.expect("the pool falls back to the next cheapest offer");
    assert_eq!(failed, ["cheap: Not enough resources to deploy"]);
    assert_eq!(pool.offer().0.provider, "middle");
    assert_eq!(pool.nodes().len(), 2);
    assert_eq!(
        cheap.teardowns.load(Ordering::SeqCst),
        1,
        "the failed attempt was torn down"
    );
    assert_eq!(
        dear.provisions.load(Ordering::SeqCst),
        0,
        "the dearest offer was never tried"
    );
    echoes_then_goes(pool, 1, "picked", &sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_keeps_list_order() {
    let sandbox = Sandbox::new();
    let dear = Scripted::new(&sandbox, "dear", 3.0, None);
    let cheap = Scripted::new(&sandbox, "cheap", 1.0, None);
    let (pool, failed) = up(&[dear.clone(), cheap.clone()], Selection::First, 1).await;
    let pool = pool.unwrap();
    assert!(failed.is_empty());
    assert_eq!(pool.offer().0.provider, "dear");
    assert_eq!(cheap.provisions.load(Ordering::SeqCst), 0);
    pool.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_selection_decides() {
    let sandbox = Sandbox::new();
    let a = Scripted::new(&sandbox, "a", 1.0, None);
    let b = Scripted::new(&sandbox, "b", 2.0, None);
    let only_b: CustomSelection = Arc::new(|candidates: &[Candidate], _: &PoolSpec| {
        candidates
            .iter()
            .position(|c| c.provider == "b")
            .into_iter()
            .collect()
    });
    let (pool, _) = up(&[a.clone(), b.clone()], Selection::Custom(only_b), 1).await;
    let pool = pool.unwrap();
    assert_eq!(pool.offer().0.provider, "b");
    assert_eq!(a.provisions.load(Ordering::SeqCst), 0);
    pool.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_everything_fails_the_error_lists_every_attempt() {
    let sandbox = Sandbox::new();
    let a = Scripted::new(&sandbox, "a", 1.0, Some(ErrorKind::Capacity));
    let b = Scripted::new(&sandbox, "b", 2.0, Some(ErrorKind::Quota));
    let (pool, failed) = up(&[a.clone(), b.clone()], Selection::Cheapest, 1).await;
    let error = pool.err().expect("nothing can be provisioned");
    assert_eq!(failed.len(), 2);
    assert!(error.contains("every attempt failed"), "{error}");
    assert!(
        error.contains("a a-type in test-1 (on-demand): a: Not enough resources"),
        "{error}"
    );
    assert!(
        error.contains("b b-type in test-1 (on-demand): b: Not enough resources"),
        "{error}"
    );
    assert_eq!(a.teardowns.load(Ordering::SeqCst), 1);
    assert_eq!(b.teardowns.load(Ordering::SeqCst), 1);
}

/// Machines that exist but none of whose agents connect are given up like a refused attempt:
/// the attempt is torn down and the next offer in the selection's order is tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_whose_agents_never_connect_give_way_to_the_next_offer() {
    let sandbox = Sandbox::new();
    let hollow = Scripted::hollow(&sandbox, "hollow", 1.0);
    let sound = Scripted::new(&sandbox, "sound", 2.0, None);
    let mut spec = PoolSpec::new(2);
    spec.connect_timeout = std::time::Duration::from_secs(2);
    let (pool, failed) = up_with(&[sound.clone(), hollow.clone()], Selection::Cheapest, spec).await;
    let pool = pool.expect("the pool falls back to the next offer");
    assert_eq!(pool.offer().0.provider, "sound");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].starts_with(
            "hollow: 2 machine(s) created, given up: 2 of 2 nodes never connected: node-1, node-2 (waited 2s"
        ),
        "{failed:?}"
    );
    assert_eq!(
        hollow.teardowns.load(Ordering::SeqCst),
        1,
        "the attempt was torn down"
    );
    let ids: Vec<String> = pool.nodes().iter().map(|n| n.node_id.clone()).collect();
    assert_eq!(ids, ["node-1", "node-2"]);
    echoes_then_goes(pool, 0, "sound", &sandbox).await;
}

/// One node of an attempt whose agent never connects is replaced on its own: its machine is
/// removed and its id refused, and a node from the same offer takes its place; the others
/// stay, and the next offer is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_agent_never_connects_is_replaced_on_its_own_from_the_same_offer() {
    let sandbox = Sandbox::new();
    let flaky = Scripted::partly_hollow(&sandbox, "flaky", 1.0, "node-2");
    let spare = Scripted::new(&sandbox, "spare", 2.0, None);
    let mut spec = PoolSpec::new(3);
    spec.connect_timeout = std::time::Duration::from_secs(3);
    let (pool, failed) = up_with(&[spare.clone(), flaky.clone()], Selection::Cheapest, spec).await;
    let pool = pool.expect("the missing node is replaced");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(pool.offer().0.provider, "flaky");
    let ids: Vec<String> = pool.nodes().iter().map(|n| n.node_id.clone()).collect();
    assert_eq!(ids, ["node-1", "node-3", "node-4"]);
    assert_eq!(flaky.provisions.load(Ordering::SeqCst), 2);
    assert_eq!(flaky.teardowns.load(Ordering::SeqCst), 0);
    assert_eq!(spare.provisions.load(Ordering::SeqCst), 0);
    let hollow: Vec<(i32, String)> = sandbox
        .processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("/node-2 "))
        .collect();
    assert!(
        hollow.is_empty(),
        "the hollow node's machine still runs: {hollow:?}"
    );
    assert!(
        pool.coordinator().node("node-2").is_none(),
        "the hollow node is no node of the pool"
    );
    echoes_then_goes(pool, 2, "replaced", &sandbox).await;
}

/// When no offer gives a node in place of one that never connected, the pool fails and its
/// error lists what was tried; everything it made, at every provider, is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_no_offer_gives_the_missing_node_the_pool_fails_and_removes_everything() {
    let sandbox = Sandbox::new();
    // node-2 never connects, nor does node-3, its replacement from the same offer.
    let flaky = Scripted::partly_hollow(&sandbox, "flaky", 1.0, "node-[23]");
    let full = Scripted::new(&sandbox, "full", 2.0, Some(ErrorKind::Capacity));
    let mut spec = PoolSpec::new(2);
    spec.connect_timeout = std::time::Duration::from_secs(2);
    let (pool, _) = up_with(&[full.clone(), flaky.clone()], Selection::Cheapest, spec).await;
    let error = pool.err().expect("no offer gives the missing node");
    assert!(error.contains("every attempt failed"), "{error}");
    assert!(
        error.contains("1 of 1 nodes never connected: node-2"),
        "{error}"
    );
    assert!(error.contains("replacing node-2"), "{error}");
    assert!(error.contains("full"), "{error}");
    assert!(
        error.contains("removed every machine of the pool"),
        "{error}"
    );
    assert!(sandbox
        .wait_for_no_processes(std::time::Duration::from_secs(10))
        .is_empty());
}
