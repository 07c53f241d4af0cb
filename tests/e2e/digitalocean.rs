//! The DigitalOcean provider against the DigitalOcean stand-in: offers from sizes, droplets
//! that boot from their user-data and whose agents join, in a VPC of the pool's own,
//! fallback after a capacity error, auth errors, rate limits, GPU droplets at teardown, VPCs
//! found by name after a crash and deleted once empty, and the CLI. Every request our client
//! sends and every answer the stand-in gives is checked against the official OpenAPI spec.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use skyward_coordinator::pool::{self, PoolProgress};
use skyward_coordinator::{Coordinator, Pool};
use skyward_core::offer::{Market, Offer};
use skyward_core::{selection::Selection, spec::PoolSpec};
use skyward_providers::digitalocean::{self, DigitalOcean, DigitalOceanConfig};
use skyward_providers::{ErrorKind, NodeBootstrap, Provider, ProvisionRequest, NODE_TAG, POOL_TAG};
use skyward_tests::openapi;
use skyward_tests::standins::digitalocean::{DigitalOceanStandIn, VpcInfo, TOKEN};
use skyward_tests::{command, run, task_output, Sandbox};

const CLI_LIMIT: Duration = Duration::from_secs(120);

fn provider(standin: &DigitalOceanStandIn) -> Arc<DigitalOcean> {
    Arc::new(DigitalOcean::new(standin.config()))
}

/// The VPCs named after `pool`.
fn pool_vpcs(standin: &DigitalOceanStandIn, pool: &str) -> Vec<VpcInfo> {
    standin
        .vpcs()
        .into_iter()
        .filter(|v| v.name == format!("skyward-{pool}"))
        .collect()
}

fn coordinator(pool: &str) -> Arc<Coordinator> {
    skyward_tests::loopback_coordinator(pool)
}

fn cpu_spec(nodes: usize) -> PoolSpec {
    let mut spec = PoolSpec::new(nodes);
    spec.vcpus = Some(4);
    spec.memory_gb = Some(8.0);
    spec.connect_timeout = Duration::from_secs(60);
    spec
}

/// Brings a pool up on `provider`; returns it (or the error) and each failed attempt as
/// `(instance, region, kind, error)`.
async fn up(
    coordinator: Arc<Coordinator>,
    provider: Arc<DigitalOcean>,
    spec: &PoolSpec,
) -> (
    Result<Pool, String>,
    Vec<(String, String, ErrorKind, String)>,
) {
    let failed = Mutex::new(Vec::new());
    let mut on_progress = |event: PoolProgress<'_>| {
        if let PoolProgress::AttemptFailed { attempt, error } = event {
            failed.lock().unwrap().push((
                attempt.offer.instance_type.clone(),
                attempt.offer.region.clone(),
                error.kind,
                error.to_string(),
            ));
        }
    };
    let providers: Vec<Arc<dyn Provider>> = vec![provider];
    let result = Pool::up(
        coordinator,
        &providers,
        &Selection::Cheapest,
        spec,
        &mut on_progress,
    )
    .await
    .map_err(|e| e.to_string());
    (result, failed.into_inner().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_map_gpu_and_cpu_sizes_over_every_page_and_filter_by_region() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    // Three sizes a page: the client must follow `links.pages.next` to see them all.
    standin.set_max_per_page(3);
    let provider = provider(&standin);
    let offers = provider.offers(&PoolSpec::new(1)).await.unwrap();

    let find = |slug: &str, region: &str| {
        offers
            .iter()
            .find(|o| o.instance_type == slug && o.region == region)
            .unwrap_or_else(|| panic!("no {slug} in {region} among {offers:#?}"))
    };
    let cpu = find("s-4vcpu-8gb", "nyc3");
    assert_eq!(cpu.provider, "digitalocean");
    assert_eq!((cpu.vcpus, cpu.memory_gb), (4, 8.0));
    assert_eq!(cpu.on_demand_per_hour, Some(0.07143));
    assert_eq!(cpu.spot_per_hour, None, "DigitalOcean has no spot market");
    assert!(cpu.accelerator.is_none());
    assert_eq!(cpu.provider_ref, "ubuntu-24-04-x64");

    let h100 = find("gpu-h100x1-80gb", "tor1");
    let a = h100.accelerator.as_ref().expect("an accelerator");
    assert_eq!((a.accelerator.name, a.count), ("H100", 1));
    assert_eq!((h100.vcpus, h100.memory_gb), (20, 240.0));
    assert_eq!(h100.provider_ref, "gpu-h100x1-base");
    let h100x8 = find("gpu-h100x8-640gb", "nyc2");
    assert_eq!(h100x8.accelerator.as_ref().unwrap().count, 8);
    assert_eq!(h100x8.on_demand_per_hour, Some(23.92));
    let l40s = find("gpu-l40sx1-48gb", "tor1");
    assert_eq!(l40s.accelerator.as_ref().unwrap().accelerator.name, "L40S");
    let mi300x = find("gpu-mi300x1-192gb", "atl1");
    assert_eq!(
        mi300x.accelerator.as_ref().unwrap().accelerator.name,
        "MI300X"
    );
    assert_eq!(mi300x.provider_ref, "gpu-amd-base");

    assert!(
        !offers.iter().any(|o| o.instance_type == "s-8vcpu-16gb"),
        "a size that is not available is no offer"
    );
    assert!(
        !offers
            .iter()
            .any(|o| o.instance_type == "gpu-zz9000x1-16gb"),
        "a GPU the catalog does not know is no offer (it is not a CPU size either)"
    );
    // One offer per size and region, the configured region (nyc1) first.
    let regions: Vec<&str> = offers
        .iter()
        .filter(|o| o.instance_type == "s-1vcpu-1gb")
        .map(|o| o.region.as_str())
        .collect();
    assert_eq!(regions, ["nyc1", "nyc3", "sfo3", "ams3", "tor1"]);

    // Every page was asked for, with the largest page size the API serves.
    let pages: Vec<(String, String)> = standin
        .requests()
        .iter()
        .filter(|r| r.path == "/v2/sizes")
        .map(|r| {
            (
                r.param("page").unwrap_or("-").to_string(),
                r.param("per_page").unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert_eq!(
        pages,
        (1..=4)
            .map(|p| (p.to_string(), "200".to_string()))
            .collect::<Vec<_>>()
    );

    // A region in the spec keeps only that region.
    let mut in_tor1 = PoolSpec::new(1);
    in_tor1.region = Some("tor1".into());
    let offers = provider.offers(&in_tor1).await.unwrap();
    assert!(offers.iter().all(|o| o.region == "tor1"), "{offers:#?}");
    let mut slugs: Vec<&str> = offers.iter().map(|o| o.instance_type.as_str()).collect();
    slugs.sort();
    assert_eq!(
        slugs,
        [
            "c-4",
            "gpu-h100x1-80gb",
            "gpu-h100x8-640gb",
            "gpu-l40sx1-48gb",
            "s-1vcpu-1gb",
            "s-2vcpu-4gb"
        ]
    );

    // Through the pool's own matching: H100:8 leaves the one size with eight.
    let spec = PoolSpec::new(1).accelerator("H100:8".parse().unwrap());
    let providers: Vec<Arc<dyn Provider>> = vec![provider.clone()];
    let candidates = pool::candidates(&providers, &spec).await;
    let fitting = candidates[0].offers.as_ref().unwrap();
    assert!(!fitting.is_empty());
    assert!(
        fitting
            .iter()
            .all(|o| o.instance_type == "gpu-h100x8-640gb"),
        "{fitting:#?}"
    );
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_comes_up_on_droplets_that_boot_from_user_data_and_is_gone_after_down() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(&sandbox.path().join("droplets")).await;
    let provider = provider(&standin);
    let coordinator = coordinator("do-e2e");
    let (pool, failed) = up(coordinator, provider, &cpu_spec(2)).await;
    let pool = pool.unwrap_or_else(|e| {
        panic!(
            "pool did not come up: {e}\nboot errors: {:?}\ncontract violations: {:#?}",
            standin.boot_errors(),
            standin.violations()
        )
    });
    assert!(failed.is_empty(), "{failed:?}");
    let (offer, _) = pool.offer();
    assert_eq!(
        (offer.instance_type.as_str(), offer.region.as_str()),
        ("s-4vcpu-8gb", "nyc1"),
        "the cheapest size with 4 vCPUs and 8 GB, in the configured region first"
    );

    let droplets = standin.droplets();
    assert_eq!(droplets.len(), 2, "{droplets:#?}");
    let pool_tag = format!("{POOL_TAG}:do-e2e");
    for (droplet, node) in droplets.iter().zip(["node-1", "node-2"]) {
        assert_eq!(droplet.name, format!("do-e2e-{node}"));
        assert_eq!(droplet.status, "active");
        assert_eq!(
            (droplet.size.as_str(), droplet.region.as_str()),
            ("s-4vcpu-8gb", "nyc1")
        );
        assert_eq!(droplet.image, "ubuntu-24-04-x64");
        assert!(droplet.tags.contains(&pool_tag), "{:?}", droplet.tags);
        assert!(
            droplet.tags.contains(&format!("{NODE_TAG}:{node}")),
            "{:?}",
            droplet.tags
        );
        let user_data = droplet.user_data.as_deref().expect("user-data");
        assert!(user_data.starts_with("#!/bin/sh"), "{user_data}");
        assert!(user_data.contains(&format!("node_id='{node}'")));
        assert!(!droplet.gpu);
    }
    // Both droplets are in the pool's own VPC, made in their region before them, and not in
    // the region's default one.
    let vpcs = pool_vpcs(&standin, "do-e2e");
    assert_eq!(vpcs.len(), 1, "{:#?}", standin.vpcs());
    let vpc = &vpcs[0];
    assert_eq!(vpc.region, "nyc1");
    assert!(!vpc.default, "{vpc:?}");
    assert_ne!(Some(&vpc.id), standin.default_vpc("nyc1").as_ref());
    for droplet in &droplets {
        assert_eq!(droplet.vpc_uuid, vpc.id, "{droplet:#?}");
    }
    let mut members = standin.vpc_members(&vpc.id);
    members.sort();
    assert_eq!(members, ["do-e2e-node-1", "do-e2e-node-2"]);
    let requests = standin.requests();
    let vpc_create = requests
        .iter()
        .position(|r| r.method == "POST" && r.path == "/v2/vpcs")
        .expect("a VPC was created");
    assert_eq!(
        requests[vpc_create].body.as_ref().unwrap(),
        &json!({"name": "skyward-do-e2e", "region": "nyc1", "description": "Skyward pool do-e2e"}),
        "no ip_range: DigitalOcean picks one"
    );
    let droplet_creates: Vec<&skyward_tests::standins::digitalocean::Recorded> = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/v2/droplets")
        .collect();
    assert_eq!(droplet_creates.len(), 2);
    for create in &droplet_creates {
        assert_eq!(create.body.as_ref().unwrap()["vpc_uuid"], json!(vpc.id));
    }
    assert!(
        requests
            .iter()
            .position(|r| r.method == "POST" && r.path == "/v2/droplets")
            > Some(vpc_create)
    );
    let mut booted = standin.booted();
    booted.sort();
    assert_eq!(booted, ["do-e2e-node-1", "do-e2e-node-2"]);
    // Droplets were polled until active before the pool waited for agents.
    assert!(standin
        .requests()
        .iter()
        .any(|r| r.method == "GET" && r.path == format!("/v2/droplets/{}", droplets[0].id)));

    // The agents that joined are the droplets' own: work runs on them.
    assert_eq!(pool.nodes().len(), 2);
    let mut task = pool
        .coordinator()
        .start_task(
            &pool.nodes()[1],
            command(&["sh", "-c", "echo on $SKYWARD_NODE_ID"]),
        )
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"on node-2\n");
    drop(task);

    pool.down().await;
    assert!(
        standin.droplets().is_empty(),
        "droplets left after down: {:#?}",
        standin.droplets()
    );
    assert!(standin.requests().iter().any(|r| r.method == "DELETE"
        && r.path == "/v2/droplets"
        && r.param("tag_name") == Some(pool_tag.as_str())));
    assert!(
        pool_vpcs(&standin, "do-e2e").is_empty(),
        "the pool's VPC is left after down: {:#?}",
        standin.vpcs()
    );
    assert!(
        standin.default_vpc("nyc1").is_some(),
        "the region's default VPC stays"
    );
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(
        standin.boot_errors().is_empty(),
        "{:?}",
        standin.boot_errors()
    );
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_error_falls_back_to_the_next_cheapest_offer() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(&sandbox.path().join("droplets")).await;
    standin.make_unavailable("s-4vcpu-8gb", "nyc1");
    let coordinator = coordinator("do-fallback");
    let (pool, failed) = up(coordinator, provider(&standin), &cpu_spec(1)).await;
    let pool = pool.unwrap_or_else(|e| {
        panic!(
            "pool did not come up: {e}\ncontract violations: {:#?}",
            standin.violations()
        )
    });
    assert_eq!(failed.len(), 1, "{failed:?}");
    let (size, region, kind, message) = &failed[0];
    assert_eq!((size.as_str(), region.as_str()), ("s-4vcpu-8gb", "nyc1"));
    assert_eq!(*kind, ErrorKind::Capacity);
    assert!(
        message.contains("Size is not available in this region")
            && message.contains("422 unprocessable_entity")
            && message.contains("try another region"),
        "{message}"
    );
    let (offer, _) = pool.offer();
    assert_eq!(
        (offer.instance_type.as_str(), offer.region.as_str()),
        ("s-4vcpu-8gb", "nyc3"),
        "the same price in the next region comes next"
    );
    let droplets = standin.droplets();
    assert_eq!(droplets.len(), 1);
    assert_eq!(droplets[0].region, "nyc3");
    // The failed attempt's VPC in nyc1 went with its cleanup; the pool's VPC is in nyc3 now.
    let vpcs = pool_vpcs(&standin, "do-fallback");
    assert_eq!(vpcs.len(), 1, "{:#?}", standin.vpcs());
    assert_eq!(vpcs[0].region, "nyc3");
    assert_eq!(droplets[0].vpc_uuid, vpcs[0].id);
    let vpcs_created: Vec<String> = standin
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/v2/vpcs" && r.status == 201)
        .map(|r| {
            r.body.as_ref().unwrap()["region"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(vpcs_created, ["nyc1", "nyc3"]);
    let refused = standin
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.status == 422)
        .count();
    assert_eq!(refused, 1);
    let mut task = pool
        .coordinator()
        .start_task(&pool.nodes()[0], command(&["echo", "fell back"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"fell back\n");
    drop(task);
    pool.down().await;
    assert!(standin.droplets().is_empty());
    assert!(pool_vpcs(&standin, "do-fallback").is_empty());
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(10))
        .is_empty());
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_missing_token_says_how_to_fix_it() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    let wrong = DigitalOcean::new(DigitalOceanConfig {
        token: Some("dop_v1_wrong".into()),
        ..standin.config()
    });
    let error = wrong.offers(&PoolSpec::new(1)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth);
    assert_eq!(
        error.hint.as_deref(),
        Some("check DIGITALOCEAN_TOKEN and that it has read/write scope")
    );
    let text = error.to_string();
    assert!(
        text.contains("Unable to authenticate you")
            && text.contains("401 unauthorized")
            && !text.contains('\n'),
        "{text}"
    );
    assert!(!text.contains("dop_v1_wrong"), "the token leaked: {text}");
    let status = wrong.status().await;
    assert!(status.configured && !status.working, "{status:?}");
    assert!(
        status.detail.contains("read/write scope"),
        "{}",
        status.detail
    );

    let asked = standin.requests().len();
    let missing = DigitalOcean::new(DigitalOceanConfig {
        token: None,
        ..standin.config()
    });
    let error = missing.offers(&PoolSpec::new(1)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth);
    assert!(
        error.to_string().contains("DIGITALOCEAN_TOKEN is not set"),
        "{error}"
    );
    assert_eq!(
        standin.requests().len(),
        asked,
        "nothing is sent without a token"
    );

    let good = provider(&standin).status().await;
    assert!(good.configured && good.working, "{good:?}");
    assert!(good.detail.contains(&standin.url()), "{}", good.detail);
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_waited_out_within_bounds_and_server_errors_reported() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    let provider = provider(&standin);
    standin.rate_limit_next(2);
    let offers = provider.offers(&PoolSpec::new(1)).await.unwrap();
    assert!(!offers.is_empty());
    let statuses: Vec<u16> = standin.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 429, 200]);

    // More 429s than the retries allow: a Quota error, after a bounded number of tries.
    standin.rate_limit_next(100);
    let started = Instant::now();
    let error = provider.offers(&PoolSpec::new(1)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(error.kind, ErrorKind::Quota);
    assert!(error.to_string().contains("rate limit"), "{error}");
    let tries = standin.requests().len() - statuses.len();
    assert_eq!(tries, 4, "one try and three retries");
    standin.rate_limit_next(0);

    standin.fail_next(1);
    let error = provider.offers(&PoolSpec::new(1)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Api);
    assert!(error.to_string().contains("500 server_error"), "{error}");
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_finds_gpu_droplets_that_only_type_gpus_lists() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    let provider = provider(&standin);
    let tags = |pool: &str, node: &str| {
        vec![
            digitalocean::tag(POOL_TAG, pool).unwrap(),
            digitalocean::tag(NODE_TAG, node).unwrap(),
        ]
    };
    let gpu = standin.add_droplet(
        "gpu-pool-node-1",
        "gpu-h100x1-80gb",
        "tor1",
        &tags("gpu-pool", "node-1"),
    );
    let cpu = standin.add_droplet(
        "gpu-pool-node-2",
        "s-2vcpu-4gb",
        "tor1",
        &tags("gpu-pool", "node-2"),
    );
    let other_gpu = standin.add_droplet(
        "other-node-1",
        "gpu-h100x1-80gb",
        "tor1",
        &tags("other", "node-1"),
    );
    let untagged = standin.add_droplet("mine", "gpu-l40sx1-48gb", "tor1", &[]);

    // The trap is real here: listing by tag leaves the GPU droplet out, and `type` cannot
    // be combined with `tag_name`.
    let client = reqwest::Client::new();
    let list = |query: Vec<(&'static str, String)>| {
        client
            .get(format!("{}/v2/droplets", standin.url()))
            .bearer_auth(TOKEN)
            .query(&query)
            .send()
    };
    let pool_tag = digitalocean::pool_tag("gpu-pool").unwrap();
    let by_tag: serde_json::Value = list(vec![("tag_name", pool_tag.clone())])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<u64> = by_tag["droplets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [cpu]);
    let both = list(vec![
        ("tag_name", pool_tag.clone()),
        ("type", "gpus".into()),
    ])
    .await
    .unwrap();
    assert_eq!(both.status(), 400);

    // The rest of what the stand-in serves answers in the spec's shapes too (checked by
    // `assert_contract` below): regions with paging, and a multi-create.
    let regions: serde_json::Value = client
        .get(format!("{}/v2/regions?per_page=2", standin.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(regions["regions"].as_array().unwrap().len(), 2);
    assert!(regions["links"]["pages"]["next"].is_string(), "{regions}");
    standin.set_boot(false);
    let multi = client
        .post(format!("{}/v2/droplets", standin.url()))
        .bearer_auth(TOKEN)
        .json(
            &json!({"names": ["multi-1", "multi-2"], "region": "nyc1", "size": "s-1vcpu-1gb",
            "image": "ubuntu-24-04-x64", "tags": ["multi"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(multi.status(), 202);
    let multi: serde_json::Value = multi.json().await.unwrap();
    let multi_ids: Vec<u64> = multi["droplets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_u64().unwrap())
        .collect();
    assert_eq!(multi_ids.len(), 2);

    // A droplet that went off is a failed node, named by its node tag.
    standin.set_status(gpu, "off");
    let failed = provider.failed_nodes("gpu-pool").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "node-1");
    assert!(failed[0].1.contains("is off"), "{failed:?}");

    let before = standin.requests().len();
    provider.teardown("gpu-pool").await.unwrap();
    let mut left: Vec<u64> = standin.droplets().iter().map(|d| d.id).collect();
    left.sort();
    let mut kept = vec![other_gpu, untagged];
    kept.extend(&multi_ids);
    kept.sort();
    assert_eq!(left, kept, "only the pool's droplets go");
    let sent = &standin.requests()[before..];
    assert!(sent
        .iter()
        .any(|r| r.method == "GET" && r.param("type") == Some("gpus")));
    assert!(sent
        .iter()
        .any(|r| r.method == "DELETE" && r.path == format!("/v2/droplets/{gpu}")));
    assert!(
        !sent
            .iter()
            .any(|r| r.path == format!("/v2/droplets/{other_gpu}")),
        "another pool's GPU droplet was touched"
    );
    assert!(
        sent.iter()
            .all(|r| !(r.param("type").is_some() && r.param("tag_name").is_some())),
        "the client combined type and tag_name"
    );
    // Our own trap probe above answered 400 in the spec's error shape, too.
    standin.assert_contract();
}

/// Sends `body` to the stand-in's `path` as our client would; the status and the answer.
async fn post_raw(
    standin: &DigitalOceanStandIn,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    // reqwest finds rustls' process-wide provider; no provider made one here.
    skyward_common::install_crypto_provider();
    let answer = reqwest::Client::new()
        .post(format!("{}{path}", standin.url()))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (
        status,
        answer.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// Fails the test unless `answer` is a 422 `unprocessable_entity` in DigitalOcean's error
/// shape whose message contains `says`.
fn assert_unprocessable(what: &str, (status, body): &(u16, serde_json::Value), says: &str) {
    assert_eq!(*status, 422, "{what}: {body}");
    assert_eq!(body["id"], "unprocessable_entity", "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(says),
        "{what}: {message:?} does not say {says:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_that_digitalocean_refuses_are_refused_with_422_beside_the_valid_one() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    standin.set_boot(false);
    let vpc = standin.default_vpc("nyc1").unwrap();
    let names: Vec<String> = (1..=11).map(|i| format!("sky-{i}")).collect();
    // Valid in every field a refusal below breaks: each refusal changes one field of it.
    let valid = json!({
        "names": &names[..10], "size": "s-1vcpu-1gb", "region": "nyc1",
        "image": "ubuntu-24-04-x64", "tags": ["skyward-pool:sky", "node_1"],
        "user_data": "#!/bin/sh\ntrue\n", "vpc_uuid": vpc,
    });
    let with = |key: &str, value: serde_json::Value| {
        let mut body = valid.clone();
        body[key] = value;
        body
    };
    let without = |key: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(key);
        body
    };
    let single = |name: &str| {
        let mut body = without("names");
        body["name"] = json!(name);
        body
    };
    let refused = [
        ("11 names", with("names", json!(names)), "at most 10"),
        ("no image", without("image"), "invalid image"),
        ("a name with _ and a space", single("sky_1 node"), "Name"),
        (
            "a tag with a space",
            with("tags", json!(["bad tag"])),
            "tag",
        ),
        (
            "user_data not a string",
            with("user_data", json!(42)),
            "user_data",
        ),
        (
            "vpc_uuid not a string",
            with("vpc_uuid", json!(7)),
            "vpc_uuid",
        ),
        (
            "a size not available",
            json!({"name": "x", "size": "s-8vcpu-16gb", "region": "nyc1",
                   "image": "ubuntu-24-04-x64"}),
            "Size is not available in this region.",
        ),
    ];
    for (what, body, says) in &refused {
        let answer = post_raw(&standin, "/v2/droplets", body).await;
        assert_unprocessable(what, &answer, says);
    }
    assert!(
        standin.droplets().is_empty(),
        "a refused create made droplets"
    );

    let (status, created) = post_raw(&standin, "/v2/droplets", &valid).await;
    assert_eq!(status, 202, "{created}");
    assert_eq!(
        created["droplets"].as_array().unwrap().len(),
        10,
        "{created}"
    );
    assert_eq!(standin.droplets().len(), 10);

    // The account may hold 25 droplets: the 25th is created, the 26th refused.
    for i in 11..=24 {
        standin.add_droplet(&format!("sky-{i}"), "s-1vcpu-1gb", "nyc1", &[]);
    }
    let (status, created) = post_raw(&standin, "/v2/droplets", &single("sky-25")).await;
    assert_eq!(status, 202, "{created}");
    let answer = post_raw(&standin, "/v2/droplets", &single("sky-26")).await;
    assert_unprocessable("a 26th droplet", &answer, "exceed your droplet limit");
    assert_eq!(standin.droplets().len(), 25);

    // A VPC's ip_range is a string in CIDR notation.
    let vpc = json!({"name": "sky-vpc", "region": "nyc1"});
    let mut bad_range = vpc.clone();
    bad_range["ip_range"] = json!(5);
    let answer = post_raw(&standin, "/v2/vpcs", &bad_range).await;
    assert_unprocessable("ip_range not a string", &answer, "ip_range");
    assert!(standin.vpcs().iter().all(|v| v.name != "sky-vpc"));
    let mut good_range = vpc;
    good_range["ip_range"] = json!("10.200.0.0/20");
    let (status, made) = post_raw(&standin, "/v2/vpcs", &good_range).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["vpc"]["ip_range"], "10.200.0.0/20", "{made}");

    // The refused requests break the spec (recorded as such); every answer is in its shapes.
    let answers: Vec<String> = standin
        .violations()
        .into_iter()
        .filter(|v| v.contains(" -> "))
        .collect();
    assert!(
        answers.is_empty(),
        "answers off the spec:\n  {}",
        answers.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_user_data_is_refused_before_anything_is_created() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    let provider = provider(&standin);
    let offer = provider
        .offers(&cpu_spec(1))
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.instance_type == "s-4vcpu-8gb")
        .unwrap();
    let coordinator = coordinator("do-big");
    let mut bootstrap = coordinator.bootstrap();
    // A CA bundle that pushes the script past DigitalOcean's 64 KiB.
    bootstrap.ca_pem = "x".repeat(70 * 1024);
    let request = ProvisionRequest {
        pool: "do-big".into(),
        nodes: vec![
            NodeBootstrap {
                node_id: "node-1".into(),
                token: coordinator.issue_token("node-1"),
            },
            NodeBootstrap {
                node_id: "node-2".into(),
                token: coordinator.issue_token("node-2"),
            },
        ],
        spec: cpu_spec(2),
        bootstrap,
    };
    let error = provider
        .provision(&request, &offer, Market::OnDemand)
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Invalid);
    let text = error.to_string();
    assert!(
        text.contains("node-1") && text.contains("over DigitalOcean's 64 KiB limit"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
    assert!(
        !standin.requests().iter().any(|r| r.method == "POST"),
        "nothing is created when any node's user-data is too big"
    );
    assert!(standin.droplets().is_empty());
    standin.assert_contract();
}

#[test]
fn the_contract_check_catches_wrong_shapes() {
    let spec = openapi::digitalocean();
    let create = json!({
        "name": "sky-1-node-1", "region": "nyc1", "size": "s-4vcpu-8gb",
        "image": "ubuntu-24-04-x64", "user_data": "#!/bin/sh\n", "tags": ["skyward-pool:sky-1"]
    });
    assert_eq!(
        spec.check_request("POST", "/v2/droplets", &[], Some(&create)),
        Vec::<String>::new()
    );
    let mut typo = create.clone();
    typo["userdata"] = typo["user_data"].take();
    typo.as_object_mut().unwrap().remove("user_data");
    assert!(!spec
        .check_request("POST", "/v2/droplets", &[], Some(&typo))
        .is_empty());
    let mut bad_name = create.clone();
    bad_name["name"] = json!("sky_1 node");
    assert!(!spec
        .check_request("POST", "/v2/droplets", &[], Some(&bad_name))
        .is_empty());
    let mut no_image = create.clone();
    no_image.as_object_mut().unwrap().remove("image");
    assert!(!spec
        .check_request("POST", "/v2/droplets", &[], Some(&no_image))
        .is_empty());
    // The pool's firewall, as the client makes it, fits the spec; a name with a space or a
    // firewall without rules does not.
    let reverse = skyward_providers::bootstrap::Reverse {
        agent_port: 7444,
        allow_from: Some("198.51.100.7".parse().unwrap()),
    };
    let firewall = digitalocean::firewall_request("sky-1", &reverse).unwrap();
    assert_eq!(
        spec.check_request("POST", "/v2/firewalls", &[], Some(&firewall)),
        Vec::<String>::new()
    );
    let mut bad_name = firewall.clone();
    bad_name["name"] = json!("sky 1");
    assert!(!spec
        .check_request("POST", "/v2/firewalls", &[], Some(&bad_name))
        .is_empty());
    let no_rules = json!({"name": "skyward-sky-1", "tags": ["skyward-pool:sky-1"]});
    assert!(!spec
        .check_request("POST", "/v2/firewalls", &[], Some(&no_rules))
        .is_empty());
    // The pool's VPC too: a name outside the pattern, no region or a misspelt field do not.
    let vpc = digitalocean::vpc_request("sky-1", "nyc1").unwrap();
    assert_eq!(
        spec.check_request("POST", "/v2/vpcs", &[], Some(&vpc)),
        Vec::<String>::new()
    );
    let mut bad_name = vpc.clone();
    bad_name["name"] = json!("skyward_sky 1");
    assert!(!spec
        .check_request("POST", "/v2/vpcs", &[], Some(&bad_name))
        .is_empty());
    let mut no_region = vpc.clone();
    no_region.as_object_mut().unwrap().remove("region");
    assert!(!spec
        .check_request("POST", "/v2/vpcs", &[], Some(&no_region))
        .is_empty());
    let mut typo = vpc.clone();
    typo["iprange"] = json!("10.10.10.0/24");
    assert!(!spec
        .check_request("POST", "/v2/vpcs", &[], Some(&typo))
        .is_empty());
    let mut in_vpc = create.clone();
    in_vpc["vpc_uuid"] = json!("5a4981aa-9653-4bd1-bef5-000000000001");
    assert_eq!(
        spec.check_request("POST", "/v2/droplets", &[], Some(&in_vpc)),
        Vec::<String>::new()
    );
    assert!(!spec
        .check_request("DELETE", "/v2/vpcs/not-a-uuid", &[], None)
        .is_empty());
    let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(spec
        .check_request("GET", "/v2/sizes", &q(&[("per_page", "200")]), None)
        .is_empty());
    assert!(!spec
        .check_request("GET", "/v2/sizes", &q(&[("per_page", "500")]), None)
        .is_empty());
    assert!(!spec
        .check_request("GET", "/v2/droplets", &q(&[("type", "gpu")]), None)
        .is_empty());
    assert!(!spec
        .check_request("GET", "/v2/droplets", &q(&[("tags", "x")]), None)
        .is_empty());
    assert!(!spec
        .check_request("GET", "/v2/droplets/abc", &[], None)
        .is_empty());

    let json_headers = vec![("content-type".to_string(), "application/json".to_string())];
    let size = json!({"slug": "s-1vcpu-1gb", "memory": 1024, "vcpus": 1, "disk": 25, "transfer": 1.0,
        "price_monthly": 6.0, "price_hourly": 0.00893, "regions": ["nyc1"], "available": true,
        "description": "Basic"});
    let sizes = json!({"sizes": [size], "links": {}, "meta": {"total": 1}});
    let body = serde_json::to_vec(&sizes).unwrap();
    assert_eq!(
        spec.check_response("GET", "/v2/sizes", 200, &json_headers, &body),
        Vec::<String>::new()
    );
    let mut odd = sizes.clone();
    odd["sizes"][0]["memory"] = json!(1000.5);
    let body = serde_json::to_vec(&odd).unwrap();
    assert!(!spec
        .check_response("GET", "/v2/sizes", 200, &json_headers, &body)
        .is_empty());
    let mut no_meta = sizes.clone();
    no_meta.as_object_mut().unwrap().remove("meta");
    let body = serde_json::to_vec(&no_meta).unwrap();
    assert!(!spec
        .check_response("GET", "/v2/sizes", 200, &json_headers, &body)
        .is_empty());
    // A droplet needs its networks (and much else).
    let droplet = json!({"droplet": {"id": 1, "name": "x", "status": "active"}});
    let body = serde_json::to_vec(&droplet).unwrap();
    assert!(!spec
        .check_response("GET", "/v2/droplets/1", 200, &json_headers, &body)
        .is_empty());
    // Errors need an id and a message, 204s no body.
    let body = serde_json::to_vec(&json!({"message": "nope"})).unwrap();
    assert!(!spec
        .check_response("GET", "/v2/droplets/1", 404, &json_headers, &body)
        .is_empty());
    assert!(!spec
        .check_response("DELETE", "/v2/droplets/1", 204, &[], b"{}")
        .is_empty());
    assert!(spec
        .check_response("DELETE", "/v2/droplets/1", 204, &[], b"")
        .is_empty());

    // VPCs: the answer's id is a UUID and its urn a VPC's; listings need their meta.
    let id = "5a4981aa-9653-4bd1-bef5-000000000001";
    let vpc = json!({"id": id, "urn": format!("do:vpc:{id}"), "name": "skyward-sky-1",
        "description": "", "region": "nyc1", "ip_range": "10.110.0.0/20", "default": false,
        "created_at": "2026-03-02T10:20:30Z"});
    let body = serde_json::to_vec(&json!({ "vpc": vpc })).unwrap();
    assert_eq!(
        spec.check_response("POST", "/v2/vpcs", 201, &json_headers, &body),
        Vec::<String>::new()
    );
    for (key, wrong) in [("id", "vpc-1"), ("urn", "vpc:1")] {
        let mut odd = vpc.clone();
        odd[key] = json!(wrong);
        let body = serde_json::to_vec(&json!({ "vpc": odd })).unwrap();
        assert!(
            !spec
                .check_response("POST", "/v2/vpcs", 201, &json_headers, &body)
                .is_empty(),
            "{key}"
        );
    }
    let list = json!({"vpcs": [vpc], "links": {}, "meta": {"total": 1}});
    let body = serde_json::to_vec(&list).unwrap();
    assert!(spec
        .check_response("GET", "/v2/vpcs", 200, &json_headers, &body)
        .is_empty());
    let mut no_meta = list.clone();
    no_meta.as_object_mut().unwrap().remove("meta");
    let body = serde_json::to_vec(&no_meta).unwrap();
    assert!(!spec
        .check_response("GET", "/v2/vpcs", 200, &json_headers, &body)
        .is_empty());
    // A refused deletion is an error in the API's shape.
    let path = format!("/v2/vpcs/{id}");
    let body = serde_json::to_vec(
        &json!({"id": "forbidden", "message": "Can not delete VPC with members"}),
    )
    .unwrap();
    assert!(spec
        .check_response("DELETE", &path, 403, &json_headers, &body)
        .is_empty());
    let body = serde_json::to_vec(&json!({"message": "Can not delete VPC with members"})).unwrap();
    assert!(!spec
        .check_response("DELETE", &path, 403, &json_headers, &body)
        .is_empty());
}

/// `skyward` with the stand-in as its DigitalOcean.
fn skyward_against(
    sandbox: &Sandbox,
    standin: &DigitalOceanStandIn,
    token: Option<&str>,
) -> std::process::Command {
    let mut cmd = sandbox.skyward();
    cmd.env("DIGITALOCEAN_API_URL", standin.url())
        .env_remove("DIGITALOCEAN_REGION");
    match token {
        Some(token) => cmd.env("DIGITALOCEAN_TOKEN", token),
        None => cmd.env_remove("DIGITALOCEAN_TOKEN"),
    };
    cmd
}

async fn cli(mut cmd: std::process::Command) -> skyward_tests::Finished {
    tokio::task::spawn_blocking(move || run(&mut cmd, CLI_LIMIT))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_offers_and_provider_status_from_digitalocean() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;

    let mut cmd = skyward_against(&sandbox, &standin, Some(TOKEN));
    cmd.args([
        "offers",
        "--provider",
        "digitalocean",
        "--cpu",
        "4",
        "--memory",
        "8GB",
        "--json",
    ]);
    let offers = cli(cmd).await;
    assert_eq!(offers.code, Some(0), "{offers:?}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&offers.stdout).unwrap();
    assert!(!list.is_empty());
    assert!(list.iter().all(|o| o["provider"] == "digitalocean"));
    assert!(list
        .iter()
        .all(|o| o["vcpus"].as_u64().unwrap() >= 4 && o["memory_gb"].as_f64().unwrap() >= 8.0));
    assert_eq!(list[0]["instance_type"], "s-4vcpu-8gb", "cheapest first");
    assert_eq!(list[0]["region"], "nyc1");
    assert_eq!(list[0]["on_demand_per_hour"], 0.07143);
    assert_eq!(list[0]["spot_per_hour"], serde_json::Value::Null);

    let mut cmd = skyward_against(&sandbox, &standin, Some(TOKEN));
    cmd.args([
        "offers",
        "--provider",
        "digitalocean",
        "--accelerator",
        "H100",
        "--json",
    ]);
    let gpus = cli(cmd).await;
    assert_eq!(gpus.code, Some(0), "{gpus:?}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&gpus.stdout).unwrap();
    let slugs: std::collections::BTreeSet<&str> = list
        .iter()
        .map(|o| o["instance_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        slugs.into_iter().collect::<Vec<_>>(),
        ["gpu-h100x1-80gb", "gpu-h100x8-640gb"]
    );
    assert_eq!(list[0]["accelerator"]["name"], "H100");

    let mut cmd = skyward_against(&sandbox, &standin, Some(TOKEN));
    cmd.args(["providers", "--json"]);
    let providers = cli(cmd).await;
    assert_eq!(providers.code, Some(0), "{providers:?}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&providers.stdout).unwrap();
    let entry = list
        .iter()
        .find(|p| p["provider"] == "digitalocean")
        .expect("digitalocean is listed");
    assert_eq!(entry["configured"], true);
    assert_eq!(entry["working"], true, "{entry}");

    let mut cmd = skyward_against(&sandbox, &standin, Some("dop_v1_wrong"));
    cmd.args(["providers", "--json"]);
    let refused = cli(cmd).await;
    assert_eq!(refused.code, Some(0), "{refused:?}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&refused.stdout).unwrap();
    let entry = list
        .iter()
        .find(|p| p["provider"] == "digitalocean")
        .unwrap();
    assert_eq!(
        (&entry["configured"], &entry["working"]),
        (&json!(true), &json!(false))
    );
    assert!(
        entry["detail"]
            .as_str()
            .unwrap()
            .contains("check DIGITALOCEAN_TOKEN and that it has read/write scope"),
        "{entry}"
    );
    assert!(!refused.stdout.contains("dop_v1_wrong") && !refused.stderr.contains("dop_v1_wrong"));

    let mut cmd = skyward_against(&sandbox, &standin, Some("dop_v1_wrong"));
    cmd.args(["offers", "--provider", "digitalocean"]);
    let failed = cli(cmd).await;
    assert_eq!(failed.code, Some(255), "{failed:?}");
    assert!(
        failed
            .stderr
            .contains("check DIGITALOCEAN_TOKEN and that it has read/write scope"),
        "{}",
        failed.stderr
    );

    // Without a token, DigitalOcean says so and the local provider is untouched.
    let asked = standin.requests().len();
    let mut cmd = skyward_against(&sandbox, &standin, None);
    cmd.args(["providers", "--json"]);
    let unset = cli(cmd).await;
    assert_eq!(unset.code, Some(0), "{unset:?}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&unset.stdout).unwrap();
    let entry = list
        .iter()
        .find(|p| p["provider"] == "digitalocean")
        .unwrap();
    assert_eq!(entry["configured"], false);
    let mut cmd = skyward_against(&sandbox, &standin, None);
    cmd.args(["offers", "--provider", "local", "--json"]);
    let local = cli(cmd).await;
    assert_eq!(local.code, Some(0), "{local:?}");
    assert_eq!(standin.requests().len(), asked, "no call without a token");
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skyward_run_on_digitalocean_boots_droplets_runs_and_deletes_them() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(&sandbox.path().join("droplets")).await;
    let mut cmd = skyward_against(&sandbox, &standin, Some(TOKEN));
    cmd.args([
        "run",
        "--provider",
        "digitalocean",
        "--cpu",
        "4",
        "--memory",
        "8GB",
        "--nodes",
        "2",
        "--on",
        "all",
        "--",
        "sh",
        "-c",
        "echo hello from $SKYWARD_NODE_ID",
    ]);
    let out = cli(cmd).await;
    assert_eq!(
        out.code,
        Some(0),
        "{out:?}\nboot errors: {:?}\ncontract violations: {:#?}",
        standin.boot_errors(),
        standin.violations()
    );
    assert!(
        out.stdout.contains("hello from node-1") && out.stdout.contains("hello from node-2"),
        "{}",
        out.stdout
    );
    let created: Vec<_> = standin
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v2/droplets")
        .collect();
    assert_eq!(created.len(), 2);
    let vpc_uuids: Vec<&serde_json::Value> = created
        .iter()
        .map(|r| &r.body.as_ref().unwrap()["vpc_uuid"])
        .collect();
    assert!(vpc_uuids[0].is_string(), "{vpc_uuids:?}");
    assert_eq!(vpc_uuids[0], vpc_uuids[1], "both nodes in one VPC");
    assert!(
        standin.droplets().is_empty(),
        "droplets left: {:#?}",
        standin.droplets()
    );
    let vpcs: Vec<String> = standin.vpcs().into_iter().map(|v| v.name).collect();
    assert!(
        vpcs.iter().all(|name| name.starts_with("default-")),
        "VPCs left: {vpcs:?}"
    );
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {left:?}");
    standin.assert_contract();
}

fn reverse_spec(nodes: usize) -> PoolSpec {
    let mut spec = cpu_spec(nodes);
    spec.reverse = true;
    // A documentation address: only ever written into the firewall, never contacted.
    spec.public_ip = Some("198.51.100.7".parse().unwrap());
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverse_pool_is_dialed_behind_a_firewall_open_to_the_coordinator_alone() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(&sandbox.path().join("droplets")).await;
    standin.set_boot_isolated(true);
    let provider = provider(&standin);
    let pool_name = "do-reverse";
    let coordinator = skyward_tests::dialing_coordinator(pool_name);
    let (pool, failed) = up(coordinator, provider.clone(), &reverse_spec(2)).await;
    let pool = pool.unwrap_or_else(|e| {
        panic!(
            "pool did not come up: {e}\nboot errors: {:?}\ncontract violations: {:#?}",
            standin.boot_errors(),
            standin.violations()
        )
    });
    assert!(failed.is_empty(), "{failed:?}");

    // One firewall, made before any droplet and applied through the pool's tag.
    let pool_tag = format!("{POOL_TAG}:{pool_name}");
    let firewalls = standin.firewalls();
    assert_eq!(firewalls.len(), 1, "{firewalls:#?}");
    let firewall = &firewalls[0];
    assert_eq!(firewall["name"], format!("skyward-{pool_name}"));
    assert_eq!(firewall["tags"], json!([pool_tag]));
    let requests = standin.requests();
    let position = |method: &str, path: &str| {
        requests
            .iter()
            .position(|r| r.method == method && r.path == path && r.status < 300)
            .unwrap_or_else(|| panic!("no {method} {path}"))
    };
    assert!(position("POST", "/v2/tags") < position("POST", "/v2/firewalls"));
    assert!(position("POST", "/v2/vpcs") < position("POST", "/v2/droplets"));
    let vpcs = pool_vpcs(&standin, pool_name);
    assert_eq!(vpcs.len(), 1);
    assert!(standin.droplets().iter().all(|d| d.vpc_uuid == vpcs[0].id));
    assert!(position("POST", "/v2/firewalls") < position("POST", "/v2/droplets"));
    // The agent port is open to the coordinator's address alone; every other inbound rule
    // admits the pool's own droplets only.
    let inbound = firewall["inbound_rules"].as_array().unwrap();
    let open_to_addresses: Vec<&serde_json::Value> = inbound
        .iter()
        .filter(|r| r["sources"].get("addresses").is_some())
        .collect();
    assert_eq!(
        open_to_addresses,
        [&json!({"protocol": "udp", "ports": "7444",
            "sources": {"addresses": ["198.51.100.7/32"]}})]
    );
    assert!(
        inbound
            .iter()
            .filter(|r| r["sources"].get("addresses").is_none())
            .all(|r| r["sources"] == json!({"tags": [pool_tag]})),
        "{inbound:#?}"
    );
    // And the droplets can still send: a firewall without outbound rules blocks it all.
    let outbound = firewall["outbound_rules"].as_array().unwrap();
    for protocol in ["tcp", "udp"] {
        assert!(
            outbound.iter().any(|r| r["protocol"] == protocol
                && r["ports"] == "0"
                && r["destinations"]["addresses"] == json!(["0.0.0.0/0", "::/0"])),
            "{outbound:#?}"
        );
    }

    // Each droplet's public address is its own namespace's, and that is where the
    // coordinator dialed its agent.
    let mut addresses = provider
        .listen_addresses(pool_name, &skyward_tests::agent_listening())
        .await
        .unwrap();
    addresses.sort();
    let nodes: Vec<&str> = addresses.iter().map(|(node, _)| node.as_str()).collect();
    assert_eq!(nodes, ["node-1", "node-2"]);
    for (node, address) in &addresses {
        assert_eq!(address.port(), 7444);
        let std::net::IpAddr::V4(ip) = address.ip() else {
            panic!("{address} is no IPv4 address");
        };
        assert_eq!(ip.octets()[..2], [10, 251], "{node} at {address}");
        let nodes = pool.nodes();
        let handle = nodes.iter().find(|n| n.node_id == *node).unwrap();
        assert_eq!(handle.address, address.ip(), "{node}");
    }

    let mut task = pool
        .coordinator()
        .start_task(
            &pool.nodes()[1],
            command(&["sh", "-c", "echo on $SKYWARD_NODE_ID"]),
        )
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"on node-2\n");
    drop(task);

    pool.down().await;
    assert!(
        standin.droplets().is_empty(),
        "droplets left after down: {:#?}",
        standin.droplets()
    );
    assert!(
        standin.firewalls().is_empty(),
        "firewalls left after down: {:#?}",
        standin.firewalls()
    );
    assert!(pool_vpcs(&standin, pool_name).is_empty());
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(
        standin.boot_errors().is_empty(),
        "{:?}",
        standin.boot_errors()
    );
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_firewall_is_found_by_name_after_a_crash_and_only_its_own() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    // Nothing boots: no droplet ever gets a public address to dial.
    standin.set_boot(false);
    let provider = provider(&standin);
    let offer = provider
        .offers(&cpu_spec(1))
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.instance_type == "s-4vcpu-8gb")
        .unwrap();
    let coordinator = coordinator("do-crash");
    let request = |pool: &str, public_ip: &str| {
        let mut bootstrap = coordinator.bootstrap();
        bootstrap.reverse = Some(skyward_providers::bootstrap::Reverse {
            agent_port: skyward_providers::bootstrap::AGENT_PORT,
            allow_from: Some(public_ip.parse().unwrap()),
        });
        ProvisionRequest {
            pool: pool.into(),
            nodes: vec![NodeBootstrap {
                node_id: "node-1".into(),
                token: coordinator.issue_token("node-1"),
            }],
            spec: reverse_spec(1),
            bootstrap,
        }
    };

    // An IPv6 --public-ip could never reach agents dialed over IPv4: refused up front.
    let error = provider
        .provision(
            &request("do-crash", "2001:db8::7"),
            &offer,
            Market::OnDemand,
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Invalid);
    assert!(error.to_string().contains("IPv4"), "{error}");
    assert!(!standin.requests().iter().any(|r| r.method == "POST"));

    let instances = provider
        .provision(
            &request("do-crash", "198.51.100.7"),
            &offer,
            Market::OnDemand,
        )
        .await
        .unwrap();
    assert_eq!(
        instances[0].address, None,
        "no public address, nothing to dial"
    );
    provider
        .provision(
            &request("do-other", "198.51.100.8"),
            &offer,
            Market::OnDemand,
        )
        .await
        .unwrap();
    // Provisioning the same pool again replaces its leftover firewall (names are unique).
    provider
        .provision(
            &request("do-crash", "198.51.100.7"),
            &offer,
            Market::OnDemand,
        )
        .await
        .unwrap();
    let names = || -> Vec<String> {
        let mut names: Vec<String> = standin
            .firewalls()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(), ["skyward-do-crash", "skyward-do-other"]);
    assert!(
        provider
            .listen_addresses("do-crash", &skyward_tests::agent_listening())
            .await
            .unwrap()
            .is_empty(),
        "droplets that did not boot isolated have no public address"
    );

    // A provider that knows nothing of the pool, as after a crash, finds and removes its
    // droplets and then its firewall, and leaves the other pool's alone.
    let after_crash = DigitalOcean::new(standin.config());
    let before = standin.requests().len();
    after_crash.teardown("do-crash").await.unwrap();
    assert_eq!(names(), ["skyward-do-other"]);
    assert!(pool_vpcs(&standin, "do-crash").is_empty());
    assert_eq!(pool_vpcs(&standin, "do-other").len(), 1);
    let droplets = standin.droplets();
    assert_eq!(droplets.len(), 1, "{droplets:#?}");
    assert!(droplets[0].name.starts_with("do-other"));
    let sent = &standin.requests()[before..];
    let last_droplet_call = sent
        .iter()
        .rposition(|r| r.path.starts_with("/v2/droplets"))
        .unwrap();
    let firewall_delete = sent
        .iter()
        .position(|r| r.method == "DELETE" && r.path.starts_with("/v2/firewalls/"))
        .unwrap();
    assert!(
        last_droplet_call < firewall_delete,
        "the firewall goes after the droplets"
    );
    after_crash.teardown("do-other").await.unwrap();
    assert!(standin.firewalls().is_empty() && standin.droplets().is_empty());
    assert!(pool_vpcs(&standin, "do-other").is_empty());
    // A pool that never had a firewall tears down as before.
    after_crash.teardown("do-never").await.unwrap();
    standin.assert_contract();
}

/// What `provision` is given for `nodes` nodes of `pool` that dial the coordinator.
fn plain_request(coordinator: &Coordinator, pool: &str, nodes: usize) -> ProvisionRequest {
    ProvisionRequest {
        pool: pool.into(),
        nodes: (1..=nodes)
            .map(|n| {
                let node_id = format!("node-{n}");
                NodeBootstrap {
                    token: coordinator.issue_token(&node_id),
                    node_id,
                }
            })
            .collect(),
        spec: cpu_spec(nodes),
        bootstrap: coordinator.bootstrap(),
    }
}

async fn cpu_offer(provider: &DigitalOcean, region: &str) -> Offer {
    provider
        .offers(&cpu_spec(1))
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.instance_type == "s-4vcpu-8gb" && o.region == region)
        .unwrap()
}

/// The `DELETE /v2/vpcs/{id}` answers among `requests`, in order.
fn vpc_deletes(requests: &[skyward_tests::standins::digitalocean::Recorded], id: &str) -> Vec<u16> {
    requests
        .iter()
        .filter(|r| r.method == "DELETE" && r.path == format!("/v2/vpcs/{id}"))
        .map(|r| r.status)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_vpc_is_reused_by_its_next_attempt_and_found_by_name_after_a_crash() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    standin.set_boot(false);
    let provider = provider(&standin);
    let coordinator = coordinator("do-vpc");
    let nyc1 = cpu_offer(&provider, "nyc1").await;
    provider
        .provision(
            &plain_request(&coordinator, "do-vpc", 2),
            &nyc1,
            Market::OnDemand,
        )
        .await
        .unwrap();
    let vpcs = pool_vpcs(&standin, "do-vpc");
    assert_eq!(vpcs.len(), 1, "{:#?}", standin.vpcs());
    let vpc = vpcs[0].clone();
    // Another attempt of the same pool in the same region reuses the VPC: names are unique
    // in the account.
    provider
        .provision(
            &plain_request(&coordinator, "do-vpc", 1),
            &nyc1,
            Market::OnDemand,
        )
        .await
        .unwrap();
    assert_eq!(pool_vpcs(&standin, "do-vpc"), std::slice::from_ref(&vpc));
    let droplets = standin.droplets();
    assert_eq!(droplets.len(), 3);
    assert!(
        droplets.iter().all(|d| d.vpc_uuid == vpc.id),
        "{droplets:#?}"
    );
    let created = |region: &str| {
        standin
            .requests()
            .iter()
            .filter(|r| {
                r.method == "POST"
                    && r.path == "/v2/vpcs"
                    && r.body.as_ref().unwrap()["region"] == region
            })
            .count()
    };
    assert_eq!(created("nyc1"), 1);
    // Another pool gets a VPC of its own.
    provider
        .provision(
            &plain_request(&coordinator, "do-vpc-2", 1),
            &nyc1,
            Market::OnDemand,
        )
        .await
        .unwrap();
    let other = pool_vpcs(&standin, "do-vpc-2");
    assert_eq!(other.len(), 1);
    assert_ne!(other[0].id, vpc.id);

    // A provider that knows nothing of the pool, as after a crash, finds its VPC by name
    // and deletes it once the droplets are gone; the other pool's stays.
    let after_crash = DigitalOcean::new(standin.config());
    let before = standin.requests().len();
    after_crash.teardown("do-vpc").await.unwrap();
    assert!(
        pool_vpcs(&standin, "do-vpc").is_empty(),
        "{:#?}",
        standin.vpcs()
    );
    assert_eq!(pool_vpcs(&standin, "do-vpc-2"), other);
    let left: Vec<String> = standin.droplets().into_iter().map(|d| d.name).collect();
    assert_eq!(left, ["do-vpc-2-node-1"]);
    let sent = &standin.requests()[before..];
    assert_eq!(vpc_deletes(sent, &vpc.id), [204]);
    let vpc_delete = sent
        .iter()
        .position(|r| r.method == "DELETE" && r.path.starts_with("/v2/vpcs/"))
        .unwrap();
    let last_droplet_call = sent
        .iter()
        .rposition(|r| r.path.starts_with("/v2/droplets"))
        .unwrap();
    assert!(
        last_droplet_call < vpc_delete,
        "the VPC goes after the droplets"
    );
    assert!(
        !sent
            .iter()
            .any(|r| r.path == format!("/v2/vpcs/{}", other[0].id)),
        "another pool's VPC was touched"
    );

    // A VPC of the pool left in another region is replaced, as its name is taken.
    let client = reqwest::Client::new();
    let made = client
        .post(format!("{}/v2/vpcs", standin.url()))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "skyward-do-moved", "region": "nyc3", "ip_range": "10.250.0.0/24"}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201);
    let stale: serde_json::Value = made.json().await.unwrap();
    let stale_id = stale["vpc"]["id"].as_str().unwrap().to_string();
    let again = client
        .post(format!("{}/v2/vpcs", standin.url()))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "skyward-do-moved", "region": "nyc1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 422, "VPC names are unique in the account");
    provider
        .provision(
            &plain_request(&coordinator, "do-moved", 1),
            &nyc1,
            Market::OnDemand,
        )
        .await
        .unwrap();
    let moved = pool_vpcs(&standin, "do-moved");
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].region, "nyc1");
    assert_ne!(moved[0].id, stale_id);
    assert_eq!(vpc_deletes(&standin.requests(), &stale_id), [204]);

    // The region's default VPC cannot be deleted: 403 in the API's error shape.
    let default = standin.default_vpc("nyc1").unwrap();
    let refused = client
        .delete(format!("{}/v2/vpcs/{default}", standin.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error["id"], "forbidden");

    after_crash.teardown("do-vpc-2").await.unwrap();
    after_crash.teardown("do-moved").await.unwrap();
    let vpcs: Vec<String> = standin.vpcs().into_iter().map(|v| v.name).collect();
    assert!(
        vpcs.iter().all(|name| name.starts_with("default-")),
        "{vpcs:?}"
    );
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vpc_delete_refused_while_deleted_droplets_linger_is_retried_until_it_succeeds() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    standin.set_boot(false);
    // Deleted droplets stay members of their VPC for a while, as on DigitalOcean.
    standin.set_member_linger(Duration::from_millis(1500));
    let provider = provider(&standin);
    let coordinator = coordinator("do-linger");
    let nyc1 = cpu_offer(&provider, "nyc1").await;
    provider
        .provision(
            &plain_request(&coordinator, "do-linger", 2),
            &nyc1,
            Market::OnDemand,
        )
        .await
        .unwrap();
    let vpc = pool_vpcs(&standin, "do-linger")[0].clone();
    let before = standin.requests().len();
    provider.teardown("do-linger").await.unwrap();
    assert!(standin.droplets().is_empty());
    assert!(
        pool_vpcs(&standin, "do-linger").is_empty(),
        "{:#?}",
        standin.vpcs()
    );
    let statuses = vpc_deletes(&standin.requests()[before..], &vpc.id);
    let (last, refused) = statuses.split_last().expect("the VPC was deleted");
    assert_eq!(*last, 204, "{statuses:?}");
    assert!(!refused.is_empty(), "never refused: {statuses:?}");
    assert!(refused.iter().all(|s| *s == 403), "{statuses:?}");
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vpc_that_never_empties_is_an_error_naming_it_and_what_is_in_it() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    standin.set_boot(false);
    let provider = DigitalOcean::new(DigitalOceanConfig {
        teardown_timeout: Duration::from_secs(1),
        ..standin.config()
    });
    let coordinator = coordinator("do-stuck");
    let nyc1 = cpu_offer(&provider, "nyc1").await;
    provider
        .provision(
            &plain_request(&coordinator, "do-stuck", 1),
            &nyc1,
            Market::OnDemand,
        )
        .await
        .unwrap();
    let vpc = pool_vpcs(&standin, "do-stuck")[0].clone();
    // A droplet of no pool of ours, put in the pool's VPC by hand.
    let stranger = standin.add_droplet("stranger", "s-1vcpu-1gb", "nyc1", &[]);
    standin.set_vpc(stranger, &vpc.id);

    let started = Instant::now();
    let error = provider.teardown("do-stuck").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "bounded");
    assert_eq!(error.kind, ErrorKind::Api);
    let text = error.to_string();
    assert!(
        text.contains("skyward-do-stuck")
            && text.contains(&vpc.id)
            && text.contains("403 forbidden")
            && text.contains(&format!("stranger (do:droplet:{stranger})")),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
    assert!(
        error
            .hint
            .as_deref()
            .is_some_and(|h| h.contains(&format!("doctl vpcs delete {}", vpc.id))),
        "{error:?}"
    );
    assert_eq!(pool_vpcs(&standin, "do-stuck"), std::slice::from_ref(&vpc));
    let left: Vec<u64> = standin.droplets().iter().map(|d| d.id).collect();
    assert_eq!(
        left,
        [stranger],
        "the pool's own droplets went, the stranger stayed"
    );

    // Once the stranger is gone, a teardown finishes the job.
    let gone = reqwest::Client::new()
        .delete(format!("{}/v2/droplets/{stranger}", standin.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    provider.teardown("do-stuck").await.unwrap();
    assert!(pool_vpcs(&standin, "do-stuck").is_empty());
    standin.assert_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vpc_that_became_its_regions_default_is_left_without_waiting() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(sandbox.path()).await;
    standin.set_boot(false);
    // An account that never used nyc1: the first VPC made there becomes its default, which
    // DigitalOcean never deletes.
    standin.remove_default_vpc("nyc1");
    let provider = provider(&standin);
    let coordinator = coordinator("do-first");
    let nyc1 = cpu_offer(&provider, "nyc1").await;
    provider
        .provision(
            &plain_request(&coordinator, "do-first", 1),
            &nyc1,
            Market::OnDemand,
        )
        .await
        .unwrap();
    let vpc = pool_vpcs(&standin, "do-first")[0].clone();
    assert!(vpc.default, "{vpc:?}");
    assert_eq!(standin.droplets()[0].vpc_uuid, vpc.id);
    let started = Instant::now();
    provider.teardown("do-first").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited for a deletion that can never happen"
    );
    assert!(standin.droplets().is_empty());
    assert_eq!(pool_vpcs(&standin, "do-first"), std::slice::from_ref(&vpc));
    assert!(vpc_deletes(&standin.requests(), &vpc.id).is_empty());
    standin.assert_contract();
}

/// A node given up has its droplet deleted on its own: the pool's others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_a_node_deletes_its_droplet_alone() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(&sandbox.path().join("droplets")).await;
    let provider = provider(&standin);
    let coordinator = coordinator("do-one");
    let offer = cpu_offer(&provider, "nyc1").await;
    skyward_tests::check_terminate_removes_one_node(
        provider.as_ref(),
        &coordinator,
        &cpu_spec(2),
        &offer,
        || {
            let live: Vec<String> = standin
                .droplets()
                .iter()
                .filter_map(|d| d.tags.iter().find_map(|t| digitalocean::untag(NODE_TAG, t)))
                .collect();
            std::future::ready(live)
        },
    )
    .await;
    standin.assert_contract();
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {left:?}");
}
