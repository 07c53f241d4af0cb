//! The VastAI provider against a stand-in of its API: offer search and its filters, spot
//! bids, pools on one cluster joined by an overlay, instances that boot from their gzipped
//! onstart and join a real coordinator, stuck instances replaced, gone offers, auth errors,
//! rate limits, auto-shutdown, and the CLI.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skyward_coordinator::pool::PoolProgress;
use skyward_coordinator::{Coordinator, Pool};
use skyward_core::offer::Market;
use skyward_core::{selection::Selection, spec::Allocation, spec::PoolSpec};
use skyward_providers::vastai::{self, VastAi, VastAiConfig};
use skyward_providers::{ErrorKind, NodeBootstrap, Provider, ProvisionRequest};
use skyward_tests::standins::vastai::{Caller, Gone, VastAiStandIn, KEY};
use skyward_tests::{command, run, task_output, Sandbox};

const CLI_LIMIT: Duration = Duration::from_secs(120);

fn provider(standin: &VastAiStandIn, tweak: impl FnOnce(&mut VastAiConfig)) -> Arc<VastAi> {
    let mut config = standin.config();
    tweak(&mut config);
    Arc::new(VastAi::new(config))
}

fn coordinator(pool: &str) -> Arc<Coordinator> {
    skyward_tests::loopback_coordinator(pool)
}

fn rtx4090(nodes: usize) -> PoolSpec {
    let mut spec = PoolSpec::new(nodes).accelerator("RTX 4090".parse().unwrap());
    spec.connect_timeout = Duration::from_secs(60);
    spec
}

/// Brings a pool up on `provider`; returns it (or the error) and each failed attempt's
/// error kind and message.
async fn up(
    provider: &Arc<VastAi>,
    coordinator: Arc<Coordinator>,
    selection: Selection,
    spec: &PoolSpec,
) -> (Result<Pool, String>, Vec<(ErrorKind, String)>) {
    let providers: Vec<Arc<dyn Provider>> = vec![provider.clone()];
    let failed = Mutex::new(Vec::new());
    let mut on_progress = |event: PoolProgress<'_>| {
        if let PoolProgress::AttemptFailed { error, .. } = event {
            failed.lock().unwrap().push((error.kind, error.to_string()));
        }
    };
    let result = Pool::up(coordinator, &providers, &selection, spec, &mut on_progress)
        .await
        .map_err(|e| e.to_string());
    (result, failed.into_inner().unwrap())
}

async fn output(pool: &Pool, index: usize, argv: &[&str]) -> String {
    let mut task = pool
        .coordinator()
        .start_task(&pool.nodes()[index], command(argv))
        .await
        .unwrap();
    String::from_utf8(task_output(&mut task).await).unwrap()
}

/// Fails the test unless the stand-in holds nothing and no process is left in the sandbox.
fn assert_nothing_left(standin: &VastAiStandIn, sandbox: &Sandbox) {
    assert!(
        standin.instances().is_empty(),
        "instances left: {:#?}",
        standin.instances()
    );
    assert!(
        standin.overlays().is_empty(),
        "overlays left: {:?}",
        standin.overlays()
    );
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {left:?}");
}

/// A request for `nodes` nodes of `pool` with fresh tokens from `coordinator`.
fn request(coordinator: &Coordinator, spec: &PoolSpec) -> ProvisionRequest {
    ProvisionRequest {
        pool: coordinator.pool().to_string(),
        nodes: (1..=spec.nodes)
            .map(|i| {
                let id = format!("node-{i}");
                NodeBootstrap {
                    token: coordinator.issue_token(&id),
                    node_id: id,
                }
            })
            .collect(),
        spec: spec.clone(),
        bootstrap: coordinator.bootstrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_map_fields_and_the_search_sends_the_cli_filters() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 101, "dph_total": 0.40, "min_bid": 0.20}));
    standin.add_offer(json!({"id": 102, "dph_total": 0.35, "geolocation": "Quebec, CA"}));
    standin.add_offer(json!({"id": 103, "dph_total": 0.33, "reliability": 0.80}));
    standin.add_offer(json!({"id": 104, "dph_total": 0.31, "verified": false}));
    standin.add_offer(json!({"id": 105, "dph_total": 0.32, "rented": true}));
    standin.add_offer(json!({"id": 106, "dph_total": 0.70, "num_gpus": 2}));
    standin.add_offer(json!({"id": 107, "dph_total": 0.20, "gpu_name": "RTX 3090"}));
    standin.add_offer(
        json!({"id": 108, "dph_total": 0.30, "geolocation": "Nevada, US",
        "cpu_cores_effective": 8.0, "cpu_ram": 32100}),
    );
    standin.add_offer(json!({"id": 109, "dph_total": 0.25, "external": true}));
    standin.add_offer(json!({"id": 110, "dph_total": 0.26, "cpu_cores_effective": 4.0}));
    standin.add_offer(json!({"id": 111, "dph_total": 0.27, "disk_space": 10.0}));

    let vast = provider(&standin, |c| {
        c.geolocation = Some("US".into());
        c.min_reliability = 0.95;
    });
    let mut spec = rtx4090(1);
    spec.vcpus = Some(8);
    spec.memory_gb = Some(16.0);
    let offers = vast.offers(&spec).await.unwrap();
    let ids: Vec<&str> = offers.iter().map(|o| o.provider_ref.as_str()).collect();
    assert_eq!(ids, ["108", "101"], "cheapest first, every filter applied");
    let texas = &offers[1];
    assert_eq!(texas.provider, "vastai");
    assert_eq!(texas.region, "Texas, US");
    assert_eq!(texas.instance_type, "1x RTX 4090 (offer 101)");
    assert_eq!(texas.accelerator_label(), "RTX 4090");
    assert_eq!(texas.vcpus, 16);
    assert_eq!(texas.memory_gb, 64.3, "cpu_ram is in MB");
    assert_eq!(texas.on_demand_per_hour, Some(0.40));
    assert_eq!(
        texas.spot_per_hour, None,
        "only the on-demand market was searched"
    );
    assert!(spec.mismatch(texas).is_none());

    let searches = standin.searches();
    assert_eq!(searches.len(), 1);
    let q = &searches[0];
    assert_eq!(q["verified"], json!({"eq": true}));
    assert_eq!(q["external"], json!({"eq": false}));
    assert_eq!(q["rentable"], json!({"eq": true}));
    assert_eq!(q["rented"], json!({"eq": false}));
    assert_eq!(q["reliability"], json!({"gte": "0.95"}));
    assert_eq!(
        q["gpu_name"],
        json!({"eq": "RTX 4090"}),
        "spaces, as VastAI spells it"
    );
    assert_eq!(q["num_gpus"], json!({"eq": "1"}));
    assert_eq!(q["gpu_ram"], json!({"gte": 21600.0}), "MB");
    assert_eq!(q["cpu_cores_effective"], json!({"gte": "8"}));
    assert_eq!(q["cpu_ram"], json!({"gte": 16000.0}), "MB");
    assert_eq!(q["disk_space"], json!({"gte": "32"}));
    assert_eq!(q["geolocation"], json!({"eq": "US"}));
    assert_eq!(q["type"], "on-demand");
    assert_eq!(q["order"], json!([["dph_total", "asc"]]));

    // A spec's region is searched as a country code and kept as the offers' region.
    let wide = provider(&standin, |c| c.min_reliability = 0.7);
    let mut in_canada = rtx4090(1);
    in_canada.region = Some("CA".into());
    let offers = wide.offers(&in_canada).await.unwrap();
    assert_eq!(offers.len(), 1, "{offers:?}");
    assert_eq!(
        (offers[0].provider_ref.as_str(), offers[0].region.as_str()),
        ("102", "CA")
    );
    assert!(in_canada.mismatch(&offers[0]).is_none());
    // A lower reliability floor lets the 0.80 host in.
    let offers = wide.offers(&rtx4090(1)).await.unwrap();
    assert!(offers.iter().any(|o| o.provider_ref == "103"), "{offers:?}");
    assert_eq!(standin.searches()[2]["reliability"], json!({"gte": "0.7"}));

    // Nothing left: NoOffers, with what to change.
    let strict = provider(&standin, |c| c.min_reliability = 0.999);
    let error = strict.offers(&rtx4090(1)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::NoOffers);
    assert!(
        error
            .to_string()
            .contains("lower min_reliability, widen geolocation, or try another accelerator"),
        "{error}"
    );
    // Accelerators VastAI never has are refused without a call.
    let asked = standin.requests().len();
    let neuron = strict
        .offers(&PoolSpec::new(1).accelerator("TRN1".parse().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(neuron.kind, ErrorKind::NoOffers);
    assert_eq!(standin.requests().len(), asked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_pools_bid_min_bid_times_the_multiplier() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 201, "dph_total": 0.50, "min_bid": 0.20}));
    standin.add_offer(json!({"id": 202, "dph_total": 0.45, "min_bid": 0.26}));
    standin.add_offer(json!({"id": 203, "dph_total": 0.30, "min_bid": null}));
    let vast = provider(&standin, |c| c.bid_multiplier = 1.5);

    let spot = rtx4090(1).allocation(Allocation::Spot);
    let offers = vast.offers(&spot).await.unwrap();
    let ids: Vec<&str> = offers.iter().map(|o| o.provider_ref.as_str()).collect();
    assert_eq!(ids, ["201", "202"], "bid offers only, lowest bid first");
    assert_eq!(offers[0].spot_per_hour, Some(0.3));
    assert_eq!(offers[0].on_demand_per_hour, None);
    let search = standin.searches().pop().unwrap();
    assert_eq!(search["type"], "bid");
    assert_eq!(search["order"], json!([["min_bid", "asc"]]));

    // Both markets: both prices, one offer each.
    let either = vast
        .offers(&rtx4090(1).allocation(Allocation::SpotIfAvailable))
        .await
        .unwrap();
    let o201 = either.iter().find(|o| o.provider_ref == "201").unwrap();
    assert_eq!(
        (o201.spot_per_hour, o201.on_demand_per_hour),
        (Some(0.3), Some(0.5))
    );
    assert_eq!(either.iter().filter(|o| o.provider_ref == "201").count(), 1);
    assert!(either
        .iter()
        .any(|o| o.provider_ref == "203" && o.spot_per_hour.is_none()));

    let (pool, failed) = up(&vast, coordinator("vast-spot"), Selection::Cheapest, &spot).await;
    let pool = pool.unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(pool.offer().1, Market::Spot);
    let rentals = standin.rentals();
    assert_eq!(rentals.len(), 1);
    let (offer, body, status) = &rentals[0];
    assert_eq!((*offer, *status), (201, 200));
    let price = body["price"].as_f64().expect("a bid");
    assert!((price - 0.3).abs() < 1e-9, "bid {price}");
    assert_eq!(body["client_id"], "me");
    assert_eq!(body["runtype"], "ssh");
    assert_eq!(body["image"], vastai::DEFAULT_IMAGE);
    assert!(body["disk"].as_f64().unwrap() >= 8.0);
    assert_eq!(standin.instances()[0].price, Some(0.3));
    assert_eq!(output(&pool, 0, &["echo", "outbid"]).await, "outbid\n");
    pool.down().await;
    assert_nothing_left(&standin, &sandbox);

    // A multiplier under 1 would bid under the minimum: refused before any call.
    let low = provider(&standin, |c| c.bid_multiplier = 0.5);
    let asked = standin.requests().len();
    let error = low.offers(&spot).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Invalid);
    assert!(error.to_string().contains("bid_multiplier"), "{error}");
    assert_eq!(standin.requests().len(), asked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_cluster_join_an_overlay_run_work_and_leave_nothing() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(&sandbox.path().join("hosts")).await;
    standin.add_offer(json!({"id": 301, "dph_total": 0.30, "cluster_id": 7}));
    standin.add_offer(json!({"id": 302, "dph_total": 0.32, "cluster_id": 7}));
    standin.add_offer(json!({"id": 303, "dph_total": 0.31}));
    standin.add_offer(json!({"id": 304, "dph_total": 0.29, "cluster_id": 9, "reliability": 0.5}));
    let vast = provider(&standin, |_| {});
    let coordinator = coordinator("vast-e2e");
    let (pool, failed) = up(&vast, coordinator, Selection::Cheapest, &rtx4090(2)).await;
    let pool = pool.unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(pool.offer().0.provider_ref, "301");

    // Both machines from cluster 7, although 303 is cheaper than 302.
    let rentals = standin.rentals();
    let rented: Vec<u64> = rentals.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(rented, [301, 302]);
    let overlays = standin.overlays();
    assert_eq!(overlays.len(), 1, "{overlays:?}");
    assert_eq!(overlays[0].name, vastai::overlay_name("vast-e2e"));
    assert_eq!(overlays[0].cluster_id, 7);
    let mut members = overlays[0].instances.clone();
    members.sort_unstable();
    let instances = standin.instances();
    let mut ids: Vec<u64> = instances.iter().map(|i| i.id).collect();
    ids.sort_unstable();
    assert_eq!(members, ids, "every instance joined the overlay");
    for (node, (_, body, status)) in ["node-1", "node-2"].iter().zip(&rentals) {
        assert_eq!(*status, 200);
        let onstart = body["onstart"].as_str().unwrap();
        assert!(onstart.len() <= 4096, "{} characters", onstart.len());
        assert!(
            onstart.starts_with("#!/bin/sh\necho '")
                && onstart.ends_with("| base64 -d | gunzip -c | sh\n"),
            "the gzipped loader: {onstart}"
        );
        assert!(
            !onstart.contains("SKYWARD_TOKEN"),
            "the token travels compressed only"
        );
        let label = body["label"].as_str().unwrap();
        assert_eq!(
            vastai::parse_label(label),
            Some(("vast-e2e".to_string(), node.to_string()))
        );
        assert_eq!(body["env"], json!({"NCCL_SOCKET_IFNAME": "eth0"}));
        assert!(body.get("price").is_none(), "on-demand rents carry no bid");
    }
    // The instances were seen loading before running.
    let listings = standin
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v0/instances/")
        .count();
    assert!(listings >= 3, "{listings} listings");

    // Both nodes booted from their onstart and run work, inside their container's env.
    for (index, node) in ["node-1", "node-2"].iter().enumerate() {
        let out = output(
            &pool,
            index,
            &[
                "sh",
                "-c",
                "echo $SKYWARD_NODE_ID $NCCL_SOCKET_IFNAME $CONTAINER_ID",
            ],
        )
        .await;
        let container = instances
            .iter()
            .find(|i| vastai::parse_label(&i.label).is_some_and(|(_, n)| n == *node))
            .unwrap()
            .id;
        assert_eq!(out, format!("{node} eth0 {container}\n"));
    }
    assert_eq!(standin.booted(), ids);
    assert!(
        standin.boot_errors().is_empty(),
        "{:?}",
        standin.boot_errors()
    );

    pool.down().await;
    let mut deleted: Vec<u64> = standin
        .deletes()
        .into_iter()
        .map(|(id, caller)| {
            assert_eq!(caller, Caller::User);
            id
        })
        .collect();
    deleted.sort_unstable();
    assert_eq!(deleted, ids);
    assert!(standin
        .requests()
        .iter()
        .any(|r| r.method == "DELETE" && r.path == "/api/v0/overlay/" && r.status == 200));
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exited_instance_is_destroyed_and_replaced_on_another_offer() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 401, "dph_total": 0.30}));
    standin.add_offer(json!({"id": 402, "dph_total": 0.35}));
    standin.exit_next(1);
    let vast = provider(&standin, |_| {});
    let (pool, failed) = up(
        &vast,
        coordinator("vast-exit"),
        Selection::Cheapest,
        &rtx4090(1),
    )
    .await;
    let pool = pool.unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    assert!(
        failed.is_empty(),
        "the provider replaced it itself: {failed:?}"
    );
    let rented: Vec<u64> = standin.rentals().iter().map(|(id, _, _)| *id).collect();
    assert_eq!(rented, [401, 402]);
    let deletes = standin.deletes();
    assert_eq!(deletes.len(), 1, "the exited instance was destroyed");
    let live = standin.instances();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].offer_id, 402);
    assert_ne!(deletes[0].0, live[0].id);
    assert_eq!(output(&pool, 0, &["echo", "replaced"]).await, "replaced\n");
    pool.down().await;
    assert_nothing_left(&standin, &sandbox);

    // Replaced once: a replacement that exits too is reported.
    standin.exit_next(2);
    let coordinator = coordinator("vast-exit-twice");
    let spec = rtx4090(1);
    let offer = vast.offers(&spec).await.unwrap().remove(0);
    let error = vast
        .provision(&request(&coordinator, &spec), &offer, Market::OnDemand)
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Capacity);
    assert!(
        error.to_string().contains("is exited") && error.to_string().contains("already replaced"),
        "{error}"
    );
    assert!(
        error.to_string().contains("OCI runtime create failed"),
        "{error}"
    );
    assert!(!error.to_string().contains('\n'));
    vast.teardown("vast-exit-twice").await.unwrap();
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_offer_falls_back_to_the_next_cheapest() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 501, "dph_total": 0.20}));
    standin.add_offer(json!({"id": 502, "dph_total": 0.25}));
    standin.add_offer(json!({"id": 503, "dph_total": 0.28}));
    standin.make_gone(501, Gone::InvalidArgs);
    let vast = provider(&standin, |_| {});
    let (pool, failed) = up(
        &vast,
        coordinator("vast-gone"),
        Selection::Cheapest,
        &rtx4090(1),
    )
    .await;
    let pool = pool.unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    assert_eq!(failed.len(), 1, "{failed:?}");
    let (kind, message) = &failed[0];
    assert_eq!(
        *kind,
        ErrorKind::Capacity,
        "invalid_args with no_such_ask in msg is a gone offer"
    );
    assert!(
        message.contains("offer 501") && message.contains("rented by someone else"),
        "{message}"
    );
    assert_eq!(pool.offer().0.provider_ref, "502");
    assert_eq!(
        output(&pool, 0, &["echo", "fell back"]).await,
        "fell back\n"
    );
    pool.down().await;
    assert_nothing_left(&standin, &sandbox);

    // A gone offer for a further node is replaced by the provider itself, within bounds.
    standin.make_gone(502, Gone::NoSuchAsk);
    let (pool, failed) = up(&vast, coordinator("vast-gone-2"), Selection::Cheapest, &{
        let mut spec = rtx4090(2);
        spec.max_price_per_hour = Some(0.3);
        spec
    })
    .await;
    let error = pool.err().expect("two offers of three are gone");
    // 501 and 502 fail as the chosen offer; on 503, node-2 finds both spares gone.
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(
        failed.iter().all(|(kind, _)| *kind == ErrorKind::Capacity),
        "{failed:?}"
    );
    assert!(error.contains("every attempt failed"), "{error}");
    standin.add_offer(json!({"id": 504, "dph_total": 0.29}));
    let (pool, failed) = up(&vast, coordinator("vast-gone-3"), Selection::Cheapest, &{
        let mut spec = rtx4090(2);
        spec.max_price_per_hour = Some(0.3);
        spec
    })
    .await;
    let pool = pool.unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    // 501 and 502 fail as the chosen offer; on 503, node-2 skips both and takes 504.
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(pool.offer().0.provider_ref, "503");
    let mut live: Vec<u64> = standin.instances().iter().map(|i| i.offer_id).collect();
    live.sort_unstable();
    assert_eq!(live, [503, 504]);
    pool.down().await;
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_errors_say_how_to_fix_them_and_keys_stay_secret() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 601}));

    // A wrong key: VastAI answers the search 404, which is not "no offers".
    let wrong = provider(&standin, |c| c.api_key = Some("vast-wrong-key".into()));
    let error = wrong.offers(&rtx4090(1)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth);
    assert!(error.message.contains("wrong API key"), "{error}");
    assert!(error.to_string().contains("set VAST_API_KEY"), "{error}");
    assert_eq!(standin.requests().last().unwrap().status, 404);
    let status = wrong.status().await;
    assert!(status.configured && !status.working, "{status:?}");
    assert!(
        status.detail.contains("Invalid user key") && status.detail.contains("VAST_API_KEY"),
        "{}",
        status.detail
    );
    assert_eq!(standin.requests().last().unwrap().status, 401);
    assert!(!format!("{wrong:?}").contains("vast-wrong-key"));
    assert!(!error.to_string().contains("vast-wrong-key"));

    // Renting with a wrong key: 401.
    let good = provider(&standin, |_| {});
    let offer = good.offers(&rtx4090(1)).await.unwrap().remove(0);
    let coordinator = coordinator("vast-auth");
    let error = wrong
        .provision(
            &request(&coordinator, &rtx4090(1)),
            &offer,
            Market::OnDemand,
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth);
    assert!(error.message.contains("refused the API key"), "{error}");
    assert!(standin.instances().is_empty());

    // No key: no call at all, and the fix named.
    let asked = standin.requests().len();
    let keyless = provider(&standin, |c| c.api_key = None);
    let error = keyless.offers(&rtx4090(1)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth);
    assert!(error.to_string().contains("VAST_API_KEY"), "{error}");
    assert!(!keyless.status().await.configured);
    assert_eq!(standin.requests().len(), asked);

    // The stand-in answers a request without a key as VastAI does.
    let raw = reqwest::Client::new()
        .get(format!("{}/api/v0/instances/?owner=me", standin.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 403);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["msg"], "This action requires login.");
    let good_status = good.status().await;
    assert!(good_status.working, "{good_status:?}");
    assert!(!good_status.detail.contains(KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_waited_out_as_retry_after_says_and_bounded() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 701}));
    let vast = provider(&standin, |_| {});
    standin.rate_limit(2, Some("1"));
    let started = Instant::now();
    let offers = vast.offers(&rtx4090(1)).await.unwrap();
    assert_eq!(offers.len(), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "Retry-After honoured: {:?}",
        started.elapsed()
    );
    let statuses: Vec<u16> = standin.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 429, 200]);

    // Without end: a bounded number of tries, then the error names the wait.
    standin.rate_limit(100, Some("0"));
    let error = vast.offers(&rtx4090(1)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Quota);
    assert!(error.message.contains("too frequent"), "{error}");
    assert!(error.to_string().contains("wait a minute"), "{error}");
    let tries = standin.requests().len() - 3;
    assert!((2..=6).contains(&tries), "{tries} tries");

    // Teardown outlasts a burst longer than one call's retries.
    standin.rate_limit(7, Some("0"));
    vast.teardown("vast-limited").await.unwrap();
    assert_eq!(
        standin
            .requests()
            .iter()
            .rev()
            .take(2)
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        [200, 200],
        "listed the instances and the overlays in the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onstart_scripts_over_4096_characters_are_refused_before_renting() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 801}));
    let vast = provider(&standin, |_| {});
    let coordinator = coordinator("vast-long");
    let spec = rtx4090(1);
    let offer = vast.offers(&spec).await.unwrap().remove(0);
    let mut request = request(&coordinator, &spec);
    // A CA that does not compress: the gzipped script cannot fit.
    let noise: String = (0..6000u32)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761).rotate_left(7) ^ 0x5bd1_e995;
            char::from(b'A' + (x % 26) as u8)
        })
        .collect();
    request.bootstrap.ca_pem = noise;
    let error = vast
        .provision(&request, &offer, Market::OnDemand)
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Invalid);
    assert!(error.to_string().contains("4096"), "{error}");
    assert!(standin.rentals().is_empty(), "nothing was rented");

    // The stand-in enforces the limit as VastAI does.
    let too_long = "x".repeat(4097);
    let raw = reqwest::Client::new()
        .put(format!("{}/api/v0/asks/801/", standin.url()))
        .bearer_auth(KEY)
        .json(&json!({"client_id": "me", "image": "ubuntu", "disk": 10, "onstart": too_long}))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"], "invalid_args");
    assert!(standin.instances().is_empty());
}

/// Fails the test unless `answer` is a `status` refusal in VastAI's error shape, with
/// `error` as its error and a message that contains `says`.
async fn assert_refused(
    what: &str,
    answer: reqwest::Response,
    status: u16,
    error: &str,
    says: &str,
) {
    assert_eq!(answer.status().as_u16(), status, "{what}");
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["success"], false, "{what}: {body}");
    assert_eq!(body["error"], error, "{what}: {body}");
    let msg = body["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(says), "{what}: {msg:?} does not say {says:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rentals_and_searches_that_vastai_refuses_are_refused_beside_the_valid_ones() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 1301, "rentable": false}));
    standin.add_offer(json!({"id": 1302}));
    // reqwest finds rustls' process-wide provider; no provider made one here.
    skyward_common::install_crypto_provider();
    let client = reqwest::Client::new();
    let rent = |offer: u64, body: &Value| {
        client
            .put(format!("{}/api/v0/asks/{offer}/", standin.url()))
            .bearer_auth(KEY)
            .json(body)
            .send()
    };
    // Valid, at each limit a refusal below passes by one: each refusal changes one field.
    let valid = json!({
        "client_id": "me", "image": "i".repeat(1024), "disk": 10, "onstart": "true",
        "args": ["--flag"], "env": {"X": "v".repeat(256)},
    });
    let with = |key: &str, value: Value| {
        let mut body = valid.clone();
        body[key] = value;
        body
    };
    let refused = [
        (
            "image of 1025 characters",
            with("image", json!("i".repeat(1025))),
            "image",
        ),
        ("disk not a number", with("disk", json!("lots")), "disk"),
        (
            "onstart not a string",
            with("onstart", json!(42)),
            "onstart",
        ),
        ("args not strings", with("args", json!([1])), "args"),
        (
            "an env value of 257 characters",
            with("env", json!({"X": "v".repeat(257)})),
            "env",
        ),
    ];
    for (what, body, says) in &refused {
        let answer = rent(1302, body).await.unwrap();
        assert_refused(what, answer, 400, "invalid_args", says).await;
    }
    // A machine that is not rentable is no ask, whatever the body.
    let answer = rent(1301, &valid).await.unwrap();
    assert_refused("an offer not rentable", answer, 404, "no_such_ask", "1301").await;
    assert!(
        standin.instances().is_empty(),
        "a refused rental made an instance"
    );

    let answer = rent(1302, &valid).await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["success"], true, "{body}");
    let id = body["new_contract"].as_u64().unwrap();
    assert_eq!(standin.instances().len(), 1);

    // An `order` entry is a field and a direction.
    let search = |order: Value| {
        client
            .post(format!("{}/api/v0/bundles/", standin.url()))
            .bearer_auth(KEY)
            .json(&json!({"type": "on-demand", "order": order}))
            .send()
    };
    let answer = search(json!([["dph_total"]])).await.unwrap();
    assert_refused(
        "an order without a direction",
        answer,
        400,
        "invalid_args",
        "order",
    )
    .await;
    let answer = search(json!([["dph_total", "asc"]])).await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let body: Value = answer.json().await.unwrap();
    assert!(body["offers"].is_array(), "{body}");

    let gone = client
        .delete(format!("{}/api/v0/instances/{id}/", standin.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status().as_u16(), 200);
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_shutdown_destroys_the_instance_with_its_own_key() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 901}));
    let vast = provider(&standin, |c| c.auto_shutdown = Some(Duration::from_secs(3)));
    let coordinator = coordinator("vast-timer");
    let spec = rtx4090(1);
    let offer = vast.offers(&spec).await.unwrap().remove(0);
    let instances = vast
        .provision(&request(&coordinator, &spec), &offer, Market::OnDemand)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    let id: u64 = instances[0].provider_id.parse().unwrap();
    skyward_tests::wait_connected(&coordinator, "node-1").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !standin.instances().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the instance did not destroy itself:\n{}",
            standin.node_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(standin.deletes(), [(id, Caller::Container(id))]);
    let rentals = standin.rentals();
    assert!(rentals[0].1["onstart"].as_str().unwrap().len() <= 4096);
    vast.teardown("vast-timer").await.unwrap();
    assert_nothing_left(&standin, &sandbox);
}

/// `skyward` with the stand-in as its VastAI, and no other cloud reachable.
fn skyward_against(
    sandbox: &Sandbox,
    standin: &VastAiStandIn,
    key: Option<&str>,
) -> std::process::Command {
    let mut cmd = sandbox.skyward();
    let home = sandbox.path().join("user");
    let _ = std::fs::create_dir_all(&home);
    cmd.env("VAST_URL", standin.url())
        .env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("DIGITALOCEAN_TOKEN")
        .env_remove("VERDA_CLIENT_ID")
        .env_remove("VERDA_CLIENT_SECRET")
        .env("DIGITALOCEAN_API_URL", "http://127.0.0.1:9")
        .env("VERDA_BASE_URL", "http://127.0.0.1:9/v1");
    match key {
        Some(key) => cmd.env("VAST_API_KEY", key),
        None => cmd.env_remove("VAST_API_KEY"),
    };
    cmd
}

async fn cli(mut cmd: std::process::Command) -> skyward_tests::Finished {
    tokio::task::spawn_blocking(move || run(&mut cmd, CLI_LIMIT))
        .await
        .unwrap()
}

fn vast_status(stdout: &str) -> Value {
    let list: Vec<Value> = serde_json::from_str(stdout).unwrap();
    list.into_iter()
        .find(|p| p["provider"] == "vastai")
        .expect("vastai is listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_vastai_offers_and_status() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 1001, "dph_total": 0.41}));
    standin.add_offer(json!({"id": 1002, "dph_total": 0.37, "geolocation": "Sweden, SE"}));
    standin
        .add_offer(json!({"id": 1003, "dph_total": 0.2, "gpu_name": "H100 SXM", "gpu_ram": 81559}));

    let mut cmd = skyward_against(&sandbox, &standin, Some(KEY));
    cmd.args([
        "offers",
        "--provider",
        "vastai",
        "--accelerator",
        "RTX 4090",
        "--json",
    ]);
    let offers = cli(cmd).await;
    assert_eq!(offers.code, Some(0), "{offers:?}");
    let list: Vec<Value> = serde_json::from_str(&offers.stdout).unwrap();
    let refs: Vec<&str> = list
        .iter()
        .map(|o| o["provider_ref"].as_str().unwrap())
        .collect();
    assert_eq!(refs, ["1002", "1001"], "cheapest first, RTX 4090 only");
    assert_eq!(list[0]["provider"], "vastai");
    assert_eq!(list[0]["region"], "Sweden, SE");
    assert_eq!(list[0]["accelerator"]["name"], "RTX 4090");
    assert_eq!(list[0]["on_demand_per_hour"], 0.37);
    assert_eq!(standin.searches()[0]["gpu_name"], json!({"eq": "RTX 4090"}));

    let mut cmd = skyward_against(&sandbox, &standin, Some(KEY));
    cmd.args(["providers", "--json"]);
    let providers = cli(cmd).await;
    assert_eq!(providers.code, Some(0), "{providers:?}");
    let entry = vast_status(&providers.stdout);
    assert_eq!(
        (&entry["configured"], &entry["working"]),
        (&json!(true), &json!(true)),
        "{entry}"
    );
    assert!(
        entry["detail"]
            .as_str()
            .unwrap()
            .contains("key from VAST_API_KEY"),
        "{entry}"
    );
    assert!(!providers.stdout.contains(KEY));

    let mut cmd = skyward_against(&sandbox, &standin, Some("vast-wrong-key"));
    cmd.args(["providers", "--json"]);
    let refused = cli(cmd).await;
    let entry = vast_status(&refused.stdout);
    assert_eq!(
        (&entry["configured"], &entry["working"]),
        (&json!(true), &json!(false)),
        "{entry}"
    );
    assert!(
        entry["detail"]
            .as_str()
            .unwrap()
            .contains("set VAST_API_KEY"),
        "{entry}"
    );
    assert!(
        !refused.stdout.contains("vast-wrong-key") && !refused.stderr.contains("vast-wrong-key")
    );

    let mut cmd = skyward_against(&sandbox, &standin, Some("vast-wrong-key"));
    cmd.args([
        "offers",
        "--provider",
        "vastai",
        "--accelerator",
        "RTX 4090",
    ]);
    let failed = cli(cmd).await;
    assert_ne!(failed.code, Some(0), "{failed:?}");
    assert!(
        failed.stderr.contains("wrong API key") && failed.stderr.contains("set VAST_API_KEY"),
        "{}",
        failed.stderr
    );

    // The key `vastai set api-key` stored.
    let key_file = sandbox.path().join("user/.config/vastai/vast_api_key");
    std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let mut cmd = skyward_against(&sandbox, &standin, None);
    cmd.args(["providers", "--json"]);
    let from_file = cli(cmd).await;
    let entry = vast_status(&from_file.stdout);
    assert_eq!(entry["working"], true, "{entry}");
    assert!(
        entry["detail"]
            .as_str()
            .unwrap()
            .contains(".config/vastai/vast_api_key"),
        "{entry}"
    );
    std::fs::remove_file(&key_file).unwrap();

    // No key anywhere: said so, no call made, other providers still usable.
    let asked = standin.requests().len();
    let mut cmd = skyward_against(&sandbox, &standin, None);
    cmd.args(["providers", "--json"]);
    let unset = cli(cmd).await;
    assert_eq!(unset.code, Some(0), "{unset:?}");
    let entry = vast_status(&unset.stdout);
    assert_eq!(entry["configured"], false, "{entry}");
    assert!(
        entry["detail"]
            .as_str()
            .unwrap()
            .contains("vastai set api-key"),
        "{entry}"
    );
    let mut cmd = skyward_against(&sandbox, &standin, None);
    cmd.args(["offers", "--provider", "vastai,local", "--json"]);
    let mixed = cli(cmd).await;
    assert_eq!(mixed.code, Some(0), "{mixed:?}");
    assert!(
        mixed.stderr.contains("vastai: no API key"),
        "{}",
        mixed.stderr
    );
    assert_eq!(standin.requests().len(), asked, "no call without a key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skyward_run_on_vastai_boots_instances_runs_and_destroys_them() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(&sandbox.path().join("hosts")).await;
    standin.add_offer(json!({"id": 1101, "dph_total": 0.30, "cluster_id": 3}));
    standin.add_offer(json!({"id": 1102, "dph_total": 0.31, "cluster_id": 3}));
    let mut cmd = skyward_against(&sandbox, &standin, Some(KEY));
    cmd.args([
        "run",
        "--provider",
        "vastai",
        "--accelerator",
        "RTX 4090",
        "--nodes",
        "2",
        "--on",
        "all",
        "--",
        "sh",
        "-c",
        "echo hello from $SKYWARD_NODE_ID on $NCCL_SOCKET_IFNAME",
    ]);
    let out = cli(cmd).await;
    assert_eq!(out.code, Some(0), "{out:?}\n{}", standin.node_logs());
    assert!(
        out.stdout.contains("hello from node-1 on eth0")
            && out.stdout.contains("hello from node-2 on eth0"),
        "{}",
        out.stdout
    );
    assert_eq!(standin.rentals().len(), 2);
    assert_eq!(standin.boots(), 2);
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_pools_publish_the_agent_port_and_are_dialed_at_the_mapped_host_port() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(&sandbox.path().join("hosts")).await;
    standin.set_boot_isolated(true);
    standin.add_offer(json!({"id": 1201, "dph_total": 0.30}));
    // Cheaper, but its host cannot publish ports.
    standin.add_offer(json!({"id": 1202, "dph_total": 0.20, "direct_port_count": 0}));
    let vast = provider(&standin, |_| {});
    let pool_name = "vast-reverse";
    let coordinator = skyward_tests::dialing_coordinator(pool_name);
    let mut spec = rtx4090(1);
    spec.reverse = true;
    // A documentation address: VastAI cannot filter on it, so it is never used at all.
    spec.public_ip = Some("198.51.100.7".parse().unwrap());
    let (pool, failed) = up(&vast, coordinator, Selection::Cheapest, &spec).await;
    let pool = pool.unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(pool.offer().0.provider_ref, "1201");
    assert!(standin
        .searches()
        .iter()
        .all(|q| q["direct_port_count"] == json!({"gte": "1"})));

    // The create request published the agent's UDP port, and nothing else.
    let rentals = standin.rentals();
    assert_eq!(rentals.len(), 1, "{rentals:?}");
    assert_eq!(rentals[0].1["env"], json!({"-p 7444:7444/udp": "1"}));

    // The host mapped it to a port of its own, reported with the namespace's address, and
    // that is where the coordinator dialed: the container's 7444 itself is closed to
    // anything not mapped, so the node could only have connected through the host port.
    let instances = standin.instances();
    assert_eq!(instances.len(), 1);
    let instance = &instances[0];
    let public_ip = instance.public_ip.expect("booted isolated");
    let host_port = instance.ports["7444/udp"];
    assert_eq!(instance.ports.len(), 1, "{:?}", instance.ports);
    assert_ne!(
        host_port, 7444,
        "the stand-in maps another port, as hosts do"
    );
    let addresses = vast
        .listen_addresses(pool_name, &skyward_tests::agent_listening())
        .await
        .unwrap();
    assert_eq!(
        addresses,
        [(
            "node-1".to_string(),
            std::net::SocketAddr::new(public_ip.into(), host_port)
        )]
    );
    assert_eq!(pool.nodes()[0].address, std::net::IpAddr::V4(public_ip));

    let out = output(&pool, 0, &["sh", "-c", "echo $SKYWARD_NODE_ID"]).await;
    assert_eq!(out, "node-1\n");
    assert!(
        standin.boot_errors().is_empty(),
        "{:?}",
        standin.boot_errors()
    );

    let namespace = instance.namespace.clone().expect("booted isolated");
    pool.down().await;
    assert_eq!(
        standin
            .deletes()
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>(),
        [instance.id]
    );
    // The mapping lived with the instance's host: gone with it.
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.split_whitespace().any(|n| n == namespace),
        "{namespace} is left: {namespaces}"
    );
    assert_nothing_left(&standin, &sandbox);
}

/// A node given up has its instance destroyed on its own: the pool's others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_a_node_destroys_its_instance_alone() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(&sandbox.path().join("hosts")).await;
    standin.add_offer(json!({"id": 401, "dph_total": 0.30}));
    standin.add_offer(json!({"id": 402, "dph_total": 0.31}));
    let vast = provider(&standin, |_| {});
    let coordinator = coordinator("vast-one");
    let spec = rtx4090(2);
    let offers = vast.offers(&spec).await.unwrap();
    skyward_tests::check_terminate_removes_one_node(
        vast.as_ref(),
        &coordinator,
        &spec,
        &offers[0],
        || {
            let live: Vec<String> = standin
                .instances()
                .iter()
                .filter_map(|i| {
                    i.label
                        .split_whitespace()
                        .find_map(|part| part.strip_prefix("skyward-node="))
                        .map(str::to_string)
                })
                .collect();
            std::future::ready(live)
        },
    )
    .await;
    assert_nothing_left(&standin, &sandbox);
}

/// A gateway error on a read is waited out, but a rental whose answer a gateway lost is never
/// sent again (it may have rented the machine, as here): the provisioning fails, and the
/// machine it made is found by its label and removed at teardown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rental_whose_answer_was_lost_is_not_sent_twice() {
    let sandbox = Sandbox::new();
    let standin = VastAiStandIn::start(sandbox.path()).await;
    standin.add_offer(json!({"id": 801}));
    standin.add_offer(json!({"id": 802}));
    let vast = provider(&standin, |_| {});
    standin.lose_answers("POST", "/api/v0/bundles/", 1);
    let spec = rtx4090(1);
    let offer = vast
        .offers(&spec)
        .await
        .expect("the search is sent again")
        .remove(0);
    standin.lose_answers("PUT", "/api/v0/asks/", 1);
    let coordinator = coordinator("vast-lost-answer");
    let error = vast
        .provision(&request(&coordinator, &spec), &offer, Market::OnDemand)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("502"), "{error}");
    let rentals = standin
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.starts_with("/api/v0/asks/"))
        .count();
    assert_eq!(rentals, 1, "{:?}", standin.requests());
    assert_eq!(
        standin.instances().len(),
        1,
        "the lost answer's rental happened"
    );
    vast.teardown("vast-lost-answer").await.unwrap();
    assert_nothing_left(&standin, &sandbox);
}
