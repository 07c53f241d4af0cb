//! A spot interruption notice on one node of a pool: the run moves that node's tasks (those
//! with retries left) to another node at once, rather than when the machine goes, and
//! places nothing new there. Nodes boot from their user-data, as a cloud's do; only node-2
//! watches a metadata service, a stand-in on loopback.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use skyward_common::protocol::TaskOutcome;
use skyward_coordinator::pool::PoolProgress;
use skyward_coordinator::run::{run_job, Job, RunEvent, TaskPlan};
use skyward_coordinator::Pool;
use skyward_core::offer::{Market, Offer};
use skyward_core::slots::GpuRequest;
use skyward_core::{selection::Selection, spec::PoolSpec};
use skyward_providers::{Instance, Provider, ProviderError, ProviderStatus, ProvisionRequest};
use skyward_tests::imds::Imds;
use skyward_tests::node::BootedNode;
use skyward_tests::Sandbox;
use tokio::sync::mpsc;

/// Boots each node from its user-data on this machine; node-2's agent watches `imds`.
struct SpotCloud {
    name: &'static str,
    root: std::path::PathBuf,
    imds: String,
    booted: Mutex<Vec<BootedNode>>,
    /// Whether it has machines to give; a replacement falls back elsewhere when not.
    capacity: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Provider for SpotCloud {
    fn name(&self) -> &str {
        self.name
    }

    async fn offers(&self, _spec: &PoolSpec) -> Result<Vec<Offer>, ProviderError> {
        Ok(vec![Offer {
            provider: self.name.into(),
            region: "test-1".into(),
            instance_type: "small".into(),
            accelerator: None,
            vcpus: 1,
            memory_gb: 1.0,
            on_demand_per_hour: Some(0.1),
            spot_per_hour: None,
            available: true,
            spot_available: None,
            provider_ref: String::new(),
        }])
    }

    async fn provision(
        &self,
        request: &ProvisionRequest,
        _offer: &Offer,
        _market: Market,
    ) -> Result<Vec<Instance>, ProviderError> {
        if !self.capacity.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ProviderError::new(
                self.name,
                skyward_providers::ErrorKind::Capacity,
                "no capacity",
            ));
        }
        let mut instances = Vec::new();
        for node in &request.nodes {
            let mut bootstrap = request.bootstrap.clone();
            if node.node_id == "node-2" {
                bootstrap.spot_watch = Some(format!("aws={}", self.imds));
            }
            let user_data = bootstrap.user_data(&request.pool, node);
            let booted = BootedNode::boot(&self.root, &node.node_id, &user_data)
                .map_err(|e| ProviderError::new(self.name, skyward_providers::ErrorKind::Api, e))?;
            self.booted.lock().unwrap().push(booted);
            instances.push(Instance {
                node_id: node.node_id.clone(),
                provider_id: node.node_id.clone(),
                address: None,
            });
        }
        Ok(instances)
    }

    async fn failed_nodes(&self, _pool: &str) -> Vec<(String, String)> {
        Vec::new()
    }

    async fn teardown(&self, _pool: &str) -> Result<(), ProviderError> {
        for node in self.booted.lock().unwrap().drain(..) {
            node.destroy();
        }
        Ok(())
    }

    async fn terminate(&self, _pool: &str, node_id: &str) -> Result<(), ProviderError> {
        self.booted.lock().unwrap().retain(|node| {
            let this = node.dir().ends_with(node_id);
            if this {
                node.destroy();
            }
            !this
        });
        Ok(())
    }

    async fn status(&self) -> ProviderStatus {
        ProviderStatus {
            provider: self.name.into(),
            configured: true,
            working: true,
            detail: String::new(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_notice_moves_the_nodes_tasks_elsewhere_at_once() {
    let sandbox = Sandbox::new();
    let imds = Imds::start();
    let cloud = Arc::new(SpotCloud {
        name: "spotcloud",
        root: sandbox.path().join("machines"),
        imds: imds.address.to_string(),
        booted: Mutex::new(Vec::new()),
        capacity: true.into(),
    });
    let providers: Vec<Arc<dyn Provider>> = vec![cloud.clone()];
    let pool = Pool::up(
        skyward_tests::loopback_coordinator("spot"),
        &providers,
        &Selection::First,
        &PoolSpec::new(2),
        &mut |_: PoolProgress<'_>| {},
    )
    .await
    .expect("a pool of two booted nodes");

    // One long task per node; each prints where it runs.
    let task = TaskPlan {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo on $SKYWARD_NODE_ID; sleep 12; echo done on $SKYWARD_NODE_ID".into(),
        ],
        env: Vec::new(),
        node: None,
        gpus: GpuRequest::None,
        cwd: None,
    };
    let job = Job {
        tasks: vec![task.clone(), task],
        retries: 1,
        per_node: 1,
        timeout: Some(Duration::from_secs(60)),
        stdin: None,
    };
    let (events_tx, mut events) = mpsc::channel(64);
    let collecting = async {
        let mut seen = Vec::new();
        let mut noticed = false;
        while let Some(event) = events.recv().await {
            if let RunEvent::Output { data, .. } = &event {
                let text = String::from_utf8_lossy(data).into_owned();
                // Both tasks run: now AWS says node-2 is about to go.
                if !noticed
                    && seen
                        .iter()
                        .filter(|l: &&String| l.starts_with("on "))
                        .count()
                        == 1
                    && text.starts_with("on ")
                {
                    imds.post_instance_action("terminate", "2026-11-27T15:00:00Z");
                    noticed = true;
                }
                seen.push(text);
            }
            if let RunEvent::Retrying {
                from, to, reason, ..
            } = &event
            {
                seen.push(format!("moved from {from} to {to}: {reason}"));
            }
        }
        seen
    };
    let (reports, seen) = tokio::join!(run_job(&pool, job, events_tx), collecting);
    let text = seen.concat();
    assert!(
        reports
            .iter()
            .all(|r| matches!(r.outcome, Ok(TaskOutcome::Exited { code: 0 }))),
        "{reports:?}\n{text}"
    );
    assert!(
        text.contains(
            "moved from node-2 to node-1: aws spot interruption notice: terminate at 2026-11-27T15:00:00Z"
        ),
        "{text}"
    );
    // Both tasks ended on node-1; the one on node-2 never got to its end there.
    assert_eq!(text.matches("done on node-1").count(), 2, "{text}");
    assert!(!text.contains("done on node-2"), "{text}");

    // A pool that keeps its size (`skyward pool up`) replaces the interrupted node: the new
    // one comes from the same provider, boots from its own user-data and takes its place.
    let mut provisioned = Vec::new();
    let replacement = pool
        .replace("node-2", &[], false, &mut |event: PoolProgress<'_>| {
            if let PoolProgress::Provisioned { instances, .. } = event {
                provisioned.extend(instances.iter().map(|i| i.node_id.clone()));
            }
        })
        .await
        .expect("a replacement node");
    assert_eq!(replacement.node_id, "node-3");
    assert_eq!(provisioned, ["node-3"]);
    let ids: Vec<String> = pool.nodes().iter().map(|n| n.node_id.clone()).collect();
    assert_eq!(ids, ["node-1", "node-3"]);
    let mut on_new = pool
        .shared_coordinator()
        .start_task(
            &replacement,
            skyward_tests::command(&["sh", "-c", "echo on $SKYWARD_NODE_ID"]),
        )
        .await
        .expect("a task on the new node");
    let printed = skyward_tests::task_output(&mut on_new).await;
    assert_eq!(String::from_utf8_lossy(&printed), "on node-3\n");
    // The same offer has no machine left: the next replacement comes from the next
    // provider's offer, as the selection orders them, and that provider joins the pool.
    cloud
        .capacity
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let other = Arc::new(SpotCloud {
        name: "othercloud",
        root: sandbox.path().join("other-machines"),
        imds: imds.address.to_string(),
        booted: Mutex::new(Vec::new()),
        capacity: true.into(),
    });
    let other_offer = other.offers(&PoolSpec::new(1)).await.unwrap().remove(0);
    let fallback = skyward_core::selection::Attempt {
        candidate: 1,
        price: 0.2,
        offer: other_offer,
        market: Market::OnDemand,
    };
    let fallback_again = fallback.clone();
    let mut failed = Vec::new();
    let fallen_back = pool
        .replace(
            "node-3",
            &[(other.clone() as Arc<dyn Provider>, fallback)],
            false,
            &mut |event: PoolProgress<'_>| {
                if let PoolProgress::AttemptFailed { error, .. } = event {
                    failed.push(error.to_string());
                }
            },
        )
        .await
        .expect("a replacement from the other provider");
    assert_eq!(fallen_back.node_id, "node-5", "node-4 was the failed try");
    assert!(failed[0].contains("no capacity"), "{failed:?}");
    let providers: Vec<String> = pool
        .providers()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    assert_eq!(providers, ["spotcloud", "othercloud"]);
    let ids: Vec<String> = pool.nodes().iter().map(|n| n.node_id.clone()).collect();
    assert_eq!(ids, ["node-1", "node-5"]);
    // The pool's own offer has machines again, but kept losing them soon after they came
    // up: the next offer goes first.
    cloud
        .capacity
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let booted_before = other.booted.lock().unwrap().len();
    let moved = pool
        .replace(
            "node-5",
            &[(other.clone() as Arc<dyn Provider>, fallback_again)],
            true,
            &mut |_: PoolProgress<'_>| {},
        )
        .await
        .expect("a replacement from the next offer first");
    assert_eq!(moved.node_id, "node-6");
    assert_eq!(other.booted.lock().unwrap().len(), booted_before + 1);
    // Teardown reaches every provider with a machine of the pool.
    pool.down().await;
    assert!(other.booted.lock().unwrap().is_empty());
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(10))
        .is_empty());
}
