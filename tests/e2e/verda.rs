//! The Verda provider against its stand-in: offers from string and number prices and
//! per-location capacity, OAuth tokens and their refresh, whole pools whose instances boot
//! from their startup scripts and join a real coordinator, spot, capacity fallback, partial
//! deletes, refused creates, reversed pools dialed in namespaces of their own, and the CLI.
//! Nothing leaves loopback and the tests' own network namespaces.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use skyward_common::protocol::TaskSpec;
use skyward_coordinator::pool::PoolProgress;
use skyward_coordinator::{Coordinator, Pool};
use skyward_core::offer::{Market, Offer};
use skyward_core::{selection::Selection, spec::Allocation, spec::PoolSpec};
use skyward_providers::verda::{Verda, VerdaConfig, VerdaTiming, DEFAULT_IMAGE};
use skyward_providers::{ErrorKind, NodeBootstrap, Provider, ProvisionRequest, NODE_TAG, POOL_TAG};
use skyward_tests::standins::verda::{IdFormat, VerdaStandin, CLIENT_ID, CLIENT_SECRET};
use skyward_tests::{bin, run, task_output, Sandbox};

const CLI_LIMIT: Duration = Duration::from_secs(90);

fn timing() -> VerdaTiming {
    VerdaTiming {
        poll: Duration::from_millis(300),
        boot_limit: Duration::from_secs(30),
        delete_limit: Duration::from_secs(20),
        failed_check: Duration::from_millis(200),
    }
}

fn verda_with(standin: &VerdaStandin, region: Option<&str>, secret: &str) -> Verda {
    Verda::new(VerdaConfig {
        region: region.map(str::to_string),
        base_url: Some(standin.url()),
        client_id: Some(CLIENT_ID.into()),
        client_secret: Some(secret.into()),
    })
    .with_timing(timing())
}

fn verda(standin: &VerdaStandin) -> Verda {
    verda_with(standin, None, CLIENT_SECRET)
}

fn coordinator(pool: &str) -> Arc<Coordinator> {
    skyward_tests::loopback_coordinator(pool)
}

fn find<'a>(offers: &'a [Offer], instance_type: &str, region: &str) -> &'a Offer {
    offers
        .iter()
        .find(|o| o.instance_type == instance_type && o.region == region)
        .unwrap_or_else(|| panic!("no offer {instance_type} in {region}: {offers:#?}"))
}

/// The attempts that failed while a pool came up: what kind of error, and its message.
type Failures = Vec<(ErrorKind, String)>;

/// Brings a pool up on Verda alone; returns it with every attempt that failed.
async fn up(
    coordinator: Arc<Coordinator>,
    provider: Verda,
    selection: Selection,
    spec: &PoolSpec,
) -> (Result<Pool, String>, Failures) {
    let providers: Vec<Arc<dyn Provider>> = vec![Arc::new(provider)];
    let failed = Mutex::new(Vec::new());
    let mut on_progress = |event: PoolProgress<'_>| {
        if let PoolProgress::AttemptFailed { error, .. } = event {
            failed
                .lock()
                .unwrap()
                .push((error.kind, error.message.clone()));
        }
    };
    let pool = Pool::up(coordinator, &providers, &selection, spec, &mut on_progress)
        .await
        .map_err(|e| e.to_string());
    (pool, failed.into_inner().unwrap())
}

fn request(coordinator: &Coordinator, spec: &PoolSpec, nodes: &[&str]) -> ProvisionRequest {
    ProvisionRequest {
        pool: coordinator.pool().to_string(),
        nodes: nodes
            .iter()
            .map(|id| NodeBootstrap {
                node_id: id.to_string(),
                token: coordinator.issue_token(id),
            })
            .collect(),
        spec: spec.clone(),
        bootstrap: coordinator.bootstrap(),
    }
}

fn tag<'a>(body: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    body["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)?
        .get("value")?
        .as_str()
}

/// Waits (bounded) until the stand-in reports `n` booted instances.
async fn wait_booted(standin: &VerdaStandin, n: usize) {
    for _ in 0..200 {
        if standin.live_instances().iter().filter(|i| i.booted).count() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{n} instances never booted: {:#?}\n{}",
        standin.live_instances(),
        standin.node_logs()
    );
}

/// Nothing of the pool is left: no instance, no script, no SSH key, no process.
fn assert_nothing_left(standin: &VerdaStandin, sandbox: &Sandbox) {
    assert!(
        standin.ssh_keys().is_empty(),
        "SSH keys left: {:?}",
        standin
            .ssh_keys()
            .iter()
            .map(|k| &k.name)
            .collect::<Vec<_>>()
    );
    assert!(
        standin.live_instances().is_empty(),
        "instances left: {:#?}",
        standin.live_instances()
    );
    assert!(
        standin.scripts().is_empty(),
        "startup scripts left: {:?}",
        standin
            .scripts()
            .iter()
            .map(|s| &s.name)
            .collect::<Vec<_>>()
    );
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_map_types_prices_and_capacity_per_location() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    let provider = verda(&standin);
    let spec = PoolSpec::new(1).allocation(Allocation::SpotIfAvailable);
    let offers = provider.offers(&spec).await.unwrap();
    assert_eq!(offers.len(), 6 * 3, "one offer per type and location");

    // Prices as strings.
    let h100 = find(&offers, "1H100.80S.30V", "FIN-01");
    let accel = h100.accelerator.as_ref().unwrap();
    assert_eq!((accel.accelerator.name, accel.count), ("H100", 1));
    assert_eq!(h100.on_demand_per_hour, Some(2.19));
    assert_eq!(h100.spot_per_hour, Some(0.99));
    assert_eq!((h100.vcpus, h100.memory_gb), (30, 120.0));
    assert!(h100.available);
    assert_eq!(h100.provider, "verda");
    // Prices as numbers, eight GPUs whose memory is given in total.
    let eight = find(&offers, "8H100.80S.176V", "FIN-02");
    let accel = eight.accelerator.as_ref().unwrap();
    assert_eq!((accel.accelerator.name, accel.count), ("H100", 8));
    assert_eq!(eight.on_demand_per_hour, Some(17.52));
    assert_eq!(eight.spot_per_hour, Some(8.0));
    assert!(eight.available, "on-demand capacity in FIN-02");
    assert!(!find(&offers, "8H100.80S.176V", "ICE-01").available);
    // Mixed: a number on demand, a string for spot.
    let a100 = find(&offers, "1A100.40S.22V", "FIN-01");
    assert_eq!(a100.accelerator.as_ref().unwrap().accelerator.name, "A100");
    assert_eq!(
        (a100.on_demand_per_hour, a100.spot_per_hour),
        (Some(1.29), Some(0.45))
    );
    let v100 = find(&offers, "1V100.6V", "ICE-01");
    assert_eq!(v100.accelerator.as_ref().unwrap().accelerator.name, "V100");
    let cpu = find(&offers, "CPU.4V.16G", "ICE-01");
    assert!(cpu.accelerator.is_none());
    assert_eq!(
        (cpu.on_demand_per_hour, cpu.spot_per_hour),
        (Some(0.082), Some(0.029))
    );

    let requests = standin.requests();
    assert!(requests.contains(&"GET /v1/instance-types?currency=usd".to_string()));
    for location in ["FIN-01", "FIN-02", "ICE-01"] {
        for spot in ["true", "false"] {
            let asked =
                format!("GET /v1/instance-availability?is_spot={spot}&location_code={location}");
            assert!(
                requests.contains(&asked),
                "{asked} missing from {requests:#?}"
            );
        }
    }

    // Capacity follows the market asked for.
    let spot = provider
        .offers(&PoolSpec::new(1).allocation(Allocation::Spot))
        .await
        .unwrap();
    assert!(find(&spot, "1H100.80S.30V", "FIN-01").available_on(Market::Spot));
    assert!(!find(&spot, "1H100.80S.30V", "FIN-02").available_on(Market::Spot));
    assert!(!find(&spot, "1A100.40S.22V", "FIN-02").available_on(Market::Spot));
    // With spot-if-available both markets are asked, and judged apart.
    let both = provider
        .offers(&PoolSpec::new(1).allocation(Allocation::SpotIfAvailable))
        .await
        .unwrap();
    let a100 = find(&both, "1A100.40S.22V", "FIN-02");
    assert!(
        a100.available_on(Market::OnDemand) && !a100.available_on(Market::Spot),
        "{a100:?}"
    );
    let on_demand = provider.offers(&PoolSpec::new(1)).await.unwrap();
    assert!(find(&on_demand, "1A100.40S.22V", "FIN-02").available);
    assert!(!find(&on_demand, "1H100.80S.30V", "ICE-01").available);
    standin.set_availability("ICE-01", false, &["1H100.80S.30V"]);
    let later = provider.offers(&PoolSpec::new(1)).await.unwrap();
    assert!(find(&later, "1H100.80S.30V", "ICE-01").available);
    assert!(!find(&later, "CPU.4V.16G", "ICE-01").available);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_region_asks_only_there_and_an_unknown_one_says_how_to_fix_it() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    // Configured region, in any case.
    let offers = verda_with(&standin, Some("ice-01"), CLIENT_SECRET)
        .offers(&PoolSpec::new(1))
        .await
        .unwrap();
    assert_eq!(offers.len(), 6);
    assert!(offers.iter().all(|o| o.region == "ICE-01"), "{offers:#?}");
    let availability: Vec<String> = standin
        .requests()
        .into_iter()
        .filter(|r| r.contains("/instance-availability"))
        .collect();
    assert_eq!(
        availability,
        ["GET /v1/instance-availability?is_spot=false&location_code=ICE-01"]
    );
    // The spec's region (--region) without a configured one.
    let mut spec = PoolSpec::new(1);
    spec.region = Some("FIN-02".into());
    let offers = verda(&standin).offers(&spec).await.unwrap();
    assert!(!offers.is_empty() && offers.iter().all(|o| o.region == "FIN-02"));
    // A location the API does not list.
    spec.region = Some("XX-99".into());
    let error = verda(&standin).offers(&spec).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Invalid);
    let shown = error.to_string();
    assert!(shown.contains("drop --region to auto-discover"), "{shown}");
    assert!(shown.contains("FIN-01, FIN-02, ICE-01"), "{shown}");
    assert!(!shown.contains('\n'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_cached_refreshed_before_expiry_and_after_a_401() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    standin.set_token_lifetime(Duration::from_secs(4));
    let provider = verda(&standin);
    let grants = || standin.grants();
    assert!(provider.status().await.working);
    assert!(provider.status().await.working);
    assert_eq!(
        grants(),
        [("client_credentials".to_string(), true)],
        "one token for both calls"
    );
    // Past the refresh point (half of a short lifetime), still before expiry.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(provider.status().await.working);
    assert_eq!(grants().len(), 2);
    assert_eq!(grants()[1], ("refresh_token".to_string(), true));
    // The API forgets the access token: a 401, one refresh, the call goes through.
    standin.expire_access_tokens();
    let status = provider.status().await;
    assert!(status.working, "{status:?}");
    assert_eq!(grants().len(), 3);
    assert_eq!(grants()[2], ("refresh_token".to_string(), true));
    // Both tokens revoked: the refresh fails, the client authenticates again.
    standin.revoke_all_tokens();
    assert!(provider.offers(&PoolSpec::new(1)).await.is_ok());
    assert_eq!(
        grants()[3..],
        [
            ("refresh_token".to_string(), false),
            ("client_credentials".to_string(), true)
        ]
    );
    // No token or secret in debug output.
    let shown = format!("{provider:?}");
    assert!(!shown.contains(CLIENT_SECRET), "{shown}");
    let issued = standin.issued_tokens();
    assert!(issued.len() >= 8);
    for token in issued {
        assert!(!shown.contains(&token), "{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_fail_with_auth_and_name_the_fix() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    let wrong = "not-the-secret-9d1e";
    let provider = verda_with(&standin, None, wrong);
    let error = provider.offers(&PoolSpec::new(1)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth);
    let shown = error.to_string();
    assert!(shown.contains("VERDA_CLIENT_SECRET"), "{shown}");
    assert!(!shown.contains(wrong) && !shown.contains('\n'), "{shown}");
    let status = provider.status().await;
    assert!(status.configured && !status.working, "{status:?}");
    assert!(
        status.detail.contains("Invalid client credentials"),
        "{status:?}"
    );
    // Missing credentials: constructs, then every call says what to set.
    let missing = Verda::new(VerdaConfig {
        base_url: Some(standin.url()),
        ..Default::default()
    });
    let error = missing.offers(&PoolSpec::new(1)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth);
    assert!(error
        .to_string()
        .contains("set VERDA_CLIENT_ID and VERDA_CLIENT_SECRET"));
    let status = missing.status().await;
    assert!(!status.configured && !status.working);
    assert!(standin.grants().len() == 2, "{:?}", standin.grants());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_boots_from_startup_scripts_runs_work_and_is_deleted() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    let coordinator = coordinator("verda-e2e");
    let (pool, failed) = up(
        coordinator,
        verda(&standin),
        Selection::Cheapest,
        &PoolSpec::new(2),
    )
    .await;
    let pool = pool.unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    assert!(failed.is_empty(), "{failed:?}");
    let (offer, market) = pool.offer();
    assert_eq!(
        (offer.instance_type.as_str(), offer.region.as_str(), market),
        ("CPU.4V.16G", "FIN-01", Market::OnDemand)
    );
    assert_eq!(pool.nodes().len(), 2);
    wait_booted(&standin, 2).await;
    let instances = standin.live_instances();
    assert_eq!(instances.len(), 2);
    assert!(instances.iter().all(|i| i.status == "running"));

    let creates = standin.create_requests();
    assert_eq!(creates.len(), 2);
    let scripts = standin.scripts();
    // Verda refuses a create without a key: the pool registered one of its own, once, and
    // every instance names it.
    let keys = standin.ssh_keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].name, "skyward-verda-e2e-ssh-key");
    assert!(keys[0].text.starts_with("ssh-ed25519 "), "{}", keys[0].text);
    for (n, body) in creates.iter().enumerate() {
        let node = format!("node-{}", n + 1);
        assert_eq!(body["instance_type"], "CPU.4V.16G");
        assert_eq!(body["location_code"], "FIN-01");
        assert_eq!(body["image"], DEFAULT_IMAGE);
        assert_eq!(body["is_spot"], false);
        assert_eq!(body["hostname"], format!("verda-e2e-{node}"));
        assert_eq!(body["ssh_key_ids"], serde_json::json!([keys[0].id]));
        assert_eq!(body["os_volume"]["size"], 100);
        assert_eq!(tag(body, POOL_TAG), Some("verda-e2e"));
        assert_eq!(tag(body, NODE_TAG), Some(node.as_str()));
        let script = scripts
            .iter()
            .find(|s| body["startup_script_id"] == s.id.as_str())
            .expect("the instance runs a registered startup script");
        assert!(script.text.contains(&format!("node_id='{node}'")));
    }

    let mut task = pool
        .coordinator()
        .start_task(
            &pool.nodes()[1],
            TaskSpec::command(0, 0, vec!["pwd".into()], vec![], None, false),
        )
        .await
        .unwrap();
    let pwd = String::from_utf8(task_output(&mut task).await).unwrap();
    assert_eq!(
        pwd.trim(),
        sandbox
            .path()
            .join("verda-e2e-node-2/skyward/work")
            .display()
            .to_string(),
        "the task ran on the node booted from its startup script"
    );
    drop(task);
    pool.down().await;

    let deletes = standin.action_requests();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0]["action"], "delete");
    assert!(deletes[0]["volume_ids"].is_null());
    assert_eq!(deletes[0]["id"].as_array().unwrap().len(), 2);
    assert_eq!(standin.instances().len(), 2);
    assert!(standin.instances().iter().all(|i| i.deleted));
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_pools_ask_for_spot_and_survive_a_partial_delete() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    standin.set_id_format(IdFormat::JsonString);
    let coordinator = coordinator("verda-spot");
    let spec = PoolSpec::new(2).allocation(Allocation::Spot);
    let (pool, _) = up(coordinator, verda(&standin), Selection::Cheapest, &spec).await;
    let pool = pool.unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    let (offer, market) = pool.offer();
    assert_eq!(market, Market::Spot);
    assert_eq!(offer.spot_per_hour, Some(0.029));
    let creates = standin.create_requests();
    assert_eq!(creates.len(), 2);
    assert!(creates.iter().all(|b| b["is_spot"] == true), "{creates:?}");
    assert!(standin.live_instances().iter().all(|i| i.is_spot));

    // The first delete answers 207: one instance refused, the other deleted.
    standin.fail_next_deletes(1);
    pool.down().await;
    let deletes = standin.action_requests();
    assert_eq!(
        deletes.len(),
        2,
        "the refused instance is deleted again: {deletes:?}"
    );
    assert_eq!(deletes[0]["id"].as_array().unwrap().len(), 2);
    assert_eq!(deletes[1]["id"].as_array().unwrap().len(), 1);
    assert_eq!(deletes[1]["id"][0], deletes[0]["id"][0]);
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_error_falls_back_to_the_next_cheapest_offer() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    standin.fail_capacity("CPU.4V.16G", "FIN-01");
    let coordinator = coordinator("verda-fallback");
    let (pool, failed) = up(
        coordinator,
        verda(&standin),
        Selection::Cheapest,
        &PoolSpec::new(1),
    )
    .await;
    let pool = pool.unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, ErrorKind::Capacity);
    assert!(
        failed[0]
            .1
            .contains("Not enough resources to deploy a 0 GPU instance type CPU.4V.16G in FIN-01"),
        "{failed:?}"
    );
    let (offer, _) = pool.offer();
    assert_eq!(
        (offer.instance_type.as_str(), offer.region.as_str()),
        ("CPU.4V.16G", "FIN-02")
    );
    let creates = standin.create_requests();
    assert_eq!(creates.len(), 2);
    assert_eq!(creates[0]["location_code"], "FIN-01");
    assert_eq!(creates[1]["location_code"], "FIN-02");
    // The failed attempt's script went with it; only the running node's is left.
    let scripts = standin.scripts();
    assert_eq!(scripts.len(), 1);
    assert_eq!(
        creates[1]["startup_script_id"],
        scripts[0].id.as_str(),
        "{scripts:?}"
    );
    pool.down().await;
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failed_instances_say_why_and_leave_nothing_behind() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    let coordinator = coordinator("verda-refused");
    let provider = verda(&standin);
    let spec = PoolSpec::new(1);
    let offers = provider.offers(&spec).await.unwrap();
    let request = request(&coordinator, &spec, &["node-1"]);

    // A location that stopped taking deployments.
    standin.make_region_unavailable("ICE-01");
    let offer = find(&offers, "CPU.4V.16G", "ICE-01");
    let error = provider
        .provision(&request, offer, Market::OnDemand)
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Invalid);
    assert_eq!(
        error.hint.as_deref(),
        Some("drop --region to auto-discover")
    );
    assert!(error.message.contains("Region not available"), "{error}");
    provider.teardown("verda-refused").await.unwrap();
    assert!(standin.scripts().is_empty(), "the script went at teardown");

    // No money left.
    standin.inject(
        Method::POST,
        "/v1/instances",
        StatusCode::PAYMENT_REQUIRED,
        "insufficient_funds",
        "Not enough funds to deploy the instance",
        1,
    );
    let offer = find(&offers, "CPU.4V.16G", "FIN-01");
    let error = provider
        .provision(&request, offer, Market::OnDemand)
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Quota, "{error}");
    assert!(error.to_string().contains("add funds"), "{error}");

    // An instance that ends in error instead of running.
    standin.set_boot_outcome(Some("error"));
    let error = provider
        .provision(&request, offer, Market::OnDemand)
        .await
        .unwrap_err();
    assert!(
        error.message.contains("is error instead of running"),
        "{error}"
    );
    assert_eq!(standin.live_instances().len(), 1);
    provider.teardown("verda-refused").await.unwrap();
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untagged_instances_are_found_by_hostname_and_reported_when_they_fail() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    standin.omit_tags(true);
    standin.set_id_format(IdFormat::JsonObject);
    let coordinator = coordinator("verda-untagged");
    let provider = verda(&standin);
    let spec = PoolSpec::new(1);
    let offers = provider.offers(&spec).await.unwrap();
    let request = request(&coordinator, &spec, &["node-1"]);
    let created = provider
        .provision(
            &request,
            find(&offers, "CPU.8V.32G", "ICE-01"),
            Market::OnDemand,
        )
        .await
        .unwrap();
    assert_eq!(created.len(), 1);
    let live = standin.live_instances();
    assert_eq!(created[0].provider_id, live[0].id, "the JSON id was read");
    assert_eq!(created[0].node_id, "node-1");
    assert!(provider.failed_nodes("verda-untagged").await.is_empty());
    assert!(provider.failed_nodes("another-pool").await.is_empty());

    standin.set_status(&live[0].id, "offline");
    tokio::time::sleep(timing().failed_check).await;
    let failed = provider.failed_nodes("verda-untagged").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "node-1");
    assert!(failed[0].1.contains("is offline"), "{failed:?}");

    // Another pool's teardown leaves it alone; its own finds it by hostname.
    provider.teardown("verda-untagged-2").await.unwrap();
    assert_eq!(standin.live_instances().len(), 1);
    provider.teardown("verda-untagged").await.unwrap();
    assert_nothing_left(&standin, &sandbox);
}

/// Reversed (`--reverse`): each instance boots in a network namespace of its own, its agent
/// listens on the instance's public `ip`, and the coordinator dials it there. Verda has no
/// firewall API, so there is no rule to check: the agents' pinned mutual TLS is the guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversed_pool_listens_on_its_instances_ips_and_is_dialed_there() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    standin.set_boot_isolated(true);
    let pool_name = "verda-reverse";
    let provider = Arc::new(verda(&standin));
    assert!(provider.supports_reverse());
    assert!(
        !provider.reverse_needs_public_ip(),
        "no firewall to open to one address"
    );
    let mut spec = PoolSpec::new(2);
    spec.reverse = true;
    // A documentation address: the provider has nowhere to write it, and nothing contacts it.
    spec.public_ip = Some("198.51.100.7".parse().unwrap());
    let providers: Vec<Arc<dyn Provider>> = vec![provider.clone()];
    let pool = Pool::up(
        skyward_tests::dialing_coordinator(pool_name),
        &providers,
        &Selection::Cheapest,
        &spec,
        &mut |_: PoolProgress<'_>| {},
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", standin.node_logs()));
    assert_eq!(pool.nodes().len(), 2);
    wait_booted(&standin, 2).await;

    let instances = standin.live_instances();
    let scripts = standin.scripts();
    let mut expected = Vec::new();
    for instance in &instances {
        let node = instance
            .tags
            .iter()
            .find(|(k, _)| k == NODE_TAG)
            .map(|(_, v)| v.clone())
            .expect("node tag");
        let address = instance
            .address
            .unwrap_or_else(|| panic!("{node} booted without a namespace: {instance:?}"));
        assert_eq!(
            address.octets()[..2],
            [10, 251],
            "a test namespace's address"
        );
        // The startup script makes the agent listen, and never names the coordinator to dial.
        let script = &scripts
            .iter()
            .find(|s| s.id == instance.startup_script_id)
            .expect("the instance's startup script")
            .text;
        assert!(script.contains("listen='0.0.0.0:7444'"), "{script}");
        let env = std::fs::read_to_string(
            sandbox
                .path()
                .join(&instance.hostname)
                .join("skyward/agent.env"),
        )
        .unwrap();
        assert!(env.contains("SKYWARD_LISTEN=0.0.0.0:7444\n"), "{env}");
        assert!(!env.contains("SKYWARD_COORDINATOR"), "{env}");
        // Its connection comes from the address the stand-in reported: the coordinator dialed it.
        let nodes = pool.nodes();
        let handle = nodes
            .iter()
            .find(|n| n.node_id == node)
            .unwrap_or_else(|| panic!("{node} is not in the pool"));
        assert_eq!(handle.address, std::net::IpAddr::V4(address), "{node}");
        expected.push((node, std::net::SocketAddr::from((address, 7444))));
    }
    expected.sort();
    let mut listed = provider
        .listen_addresses(pool_name, &skyward_tests::agent_listening())
        .await
        .unwrap();
    listed.sort();
    assert_eq!(listed, expected);
    assert!(provider
        .listen_addresses("another-pool", &skyward_tests::agent_listening())
        .await
        .unwrap()
        .is_empty());

    let node = pool.nodes()[1].clone();
    let mut task = pool
        .coordinator()
        .start_task(
            &node,
            TaskSpec::command(
                0,
                0,
                vec!["printenv".into(), "SKYWARD_NODE_ID".into()],
                vec![],
                None,
                false,
            ),
        )
        .await
        .unwrap();
    let printed = String::from_utf8(task_output(&mut task).await).unwrap();
    assert_eq!(printed.trim(), node.node_id);
    drop(task);
    pool.down().await;

    assert!(provider
        .listen_addresses(pool_name, &skyward_tests::agent_listening())
        .await
        .unwrap()
        .is_empty());
    assert_nothing_left(&standin, &sandbox);
}

/// `skyward` with only the given Verda variables (and no other cloud's) in its environment.
fn skyward(sandbox: &Sandbox, vars: &[(&str, &str)]) -> std::process::Command {
    let mut cmd = sandbox.skyward();
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", sandbox.path())
        .env("SKYWARD_HOME", sandbox.path().join("home"))
        .env("SKYWARD_AGENT_BIN", bin("skyward-agent"))
        // `providers` asks AWS too: never let its credential chain probe the metadata service.
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (key, value) in vars {
        cmd.env(key, value);
    }
    cmd
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON: {stdout:?}: {e}"))
}

#[test]
fn the_cli_lists_offers_and_status_from_the_standin() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    let url = standin.url();
    let env = [
        ("VERDA_BASE_URL", url.as_str()),
        ("VERDA_CLIENT_ID", CLIENT_ID),
        ("VERDA_CLIENT_SECRET", CLIENT_SECRET),
    ];
    let out = run(
        skyward(&sandbox, &env).args(["offers", "--provider", "verda", "--json"]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let offers = json(&out.stdout);
    let offers = offers.as_array().unwrap();
    assert_eq!(offers.len(), 18);
    let h100 = offers
        .iter()
        .find(|o| o["instance_type"] == "1H100.80S.30V" && o["region"] == "FIN-01")
        .unwrap();
    assert_eq!(h100["accelerator"]["name"], "H100");
    assert_eq!(h100["on_demand_per_hour"], 2.19);
    assert_eq!(h100["spot_per_hour"], 0.99);
    assert_eq!(h100["available"], true);
    let unavailable = offers
        .iter()
        .find(|o| o["instance_type"] == "8H100.80S.176V" && o["region"] == "ICE-01")
        .unwrap();
    assert_eq!(unavailable["available"], false);

    let out = run(
        skyward(&sandbox, &env).args([
            "offers",
            "--provider",
            "verda",
            "--accelerator",
            "H100:8",
            "--region",
            "FIN-02",
            "--json",
        ]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let offers = json(&out.stdout);
    assert_eq!(offers.as_array().unwrap().len(), 1, "{offers}");
    assert_eq!(offers[0]["instance_type"], "8H100.80S.176V");
    assert_eq!(offers[0]["accelerator"]["count"], 8);

    let out = run(
        skyward(&sandbox, &env).args(["providers", "--json"]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let statuses = json(&out.stdout);
    let verda = statuses
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["provider"] == "verda")
        .expect("verda is listed");
    assert_eq!(verda["configured"], true);
    assert_eq!(verda["working"], true, "{verda}");
    assert!(verda["detail"].as_str().unwrap().contains("FIN-01"));

    let wrong = [
        ("VERDA_BASE_URL", url.as_str()),
        ("VERDA_CLIENT_ID", CLIENT_ID),
        ("VERDA_CLIENT_SECRET", "wrong-secret-31f"),
    ];
    let out = run(
        skyward(&sandbox, &wrong).args(["providers", "--json"]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.contains("wrong-secret-31f"));
    let statuses = json(&out.stdout);
    let verda = statuses
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["provider"] == "verda")
        .unwrap();
    assert_eq!(
        (&verda["configured"], &verda["working"]),
        (&true.into(), &false.into())
    );
    assert!(verda["detail"]
        .as_str()
        .unwrap()
        .contains("VERDA_CLIENT_SECRET"));
}

#[test]
fn an_api_key_alone_is_answered_with_what_verda_needs() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    let url = standin.url();
    let env = [
        ("VERDA_BASE_URL", url.as_str()),
        ("VERDA_API_KEY", "vk-api-key-0d15ea5e"),
    ];
    let out = run(
        skyward(&sandbox, &env).args(["offers", "--provider", "verda"]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(255), "{out:?}");
    let stderr = out.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("VERDA_API_KEY"), "{stderr}");
    assert!(
        stderr.contains("set VERDA_CLIENT_ID and VERDA_CLIENT_SECRET"),
        "{stderr}"
    );
    assert!(!stderr.contains("vk-api-key-0d15ea5e"));
    assert!(standin.requests().is_empty(), "no call without credentials");

    // The local provider is not held back by Verda's missing credentials.
    let out = run(
        skyward(&sandbox, &env).args(["offers", "--provider", "local", "--json"]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = run(
        skyward(&sandbox, &env).args(["providers", "--json"]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let statuses = json(&out.stdout);
    let verda = statuses
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["provider"] == "verda")
        .unwrap();
    assert_eq!(verda["configured"], false);
    assert!(verda["detail"]
        .as_str()
        .unwrap()
        .contains("VERDA_CLIENT_ID and VERDA_CLIENT_SECRET"));
}

#[test]
fn skyward_run_on_verda_boots_runs_and_deletes() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    let url = standin.url();
    let env = [
        ("VERDA_BASE_URL", url.as_str()),
        ("VERDA_CLIENT_ID", CLIENT_ID),
        ("VERDA_CLIENT_SECRET", CLIENT_SECRET),
    ];
    let out = run(
        skyward(&sandbox, &env).args([
            "run",
            "--provider",
            "verda",
            "--selection",
            "cheapest",
            "--",
            "sh",
            "-c",
            "echo on-$SKYWARD_NODE_ID",
        ]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}\n{}", standin.node_logs());
    assert_eq!(out.stdout, "on-node-1\n");
    let instances = standin.instances();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].instance_type, "CPU.4V.16G");
    assert!(instances[0].deleted, "{instances:?}");
    assert!(instances[0].hostname.starts_with("sky-"), "{instances:?}");
    assert_nothing_left(&standin, &sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standin_answers_with_verdas_quirks() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    skyward_common::install_crypto_provider();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = standin.url();
    let refused = http.get(format!("{url}/locations")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized_request");
    let token: serde_json::Value = http
        .post(format!("{url}/oauth2/token"))
        .json(&serde_json::json!({"grant_type": "client_credentials",
            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(token["token_type"], "Bearer");
    let bearer = token["access_token"].as_str().unwrap().to_string();
    let get = |path: String| {
        let request = http.get(format!("{url}{path}")).bearer_auth(&bearer);
        async move { request.send().await.unwrap() }
    };
    // One SDK sends isSpot, the other is_spot.
    let camel: serde_json::Value =
        get("/instance-availability?isSpot=true&location_code=FIN-01".into())
            .await
            .json()
            .await
            .unwrap();
    assert_eq!(camel[0]["location_code"], "FIN-01");
    assert!(camel[0]["availabilities"]
        .as_array()
        .unwrap()
        .contains(&"1H100.80S.30V".into()));
    let one = "/instance-availability/1H100.80S.30V?isSpot=true&location_code=FIN-01";
    assert_eq!(get(one.into()).await.text().await.unwrap(), "true");
    standin.set_availability_as_strings(true);
    assert_eq!(get(one.into()).await.text().await.unwrap(), "\"true\"");
    // Prices as strings.
    let types: serde_json::Value = get("/instance-types?currency=usd".into())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(types[0]["price_per_hour"], "0.0820");
    // A script: 201 with a plain-text id, read back as a one-element array.
    let created = http
        .post(format!("{url}/scripts"))
        .bearer_auth(&bearer)
        .json(&serde_json::json!({"name": "s", "script": "#!/bin/sh\ntrue\n"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.text().await.unwrap();
    assert!(!id.starts_with('"'), "{id}");
    let read: serde_json::Value = get(format!("/scripts/{id}")).await.json().await.unwrap();
    assert_eq!(read.as_array().unwrap().len(), 1);
    assert_eq!(read[0]["id"], id.as_str());

    // A create that names no key of the account is refused, in the API's own (contradictory)
    // words, whether the list is empty, absent or names a key that does not exist.
    let create = |keys: Option<serde_json::Value>| {
        let mut body = serde_json::json!({
            "instance_type": "CPU.4V.16G", "image": "ubuntu-24.04", "hostname": "quirk-1",
            "description": "quirks", "location_code": "FIN-01", "is_spot": false,
        });
        if let Some(keys) = keys {
            body["ssh_key_ids"] = keys;
        }
        let request = http
            .post(format!("{url}/instances"))
            .bearer_auth(&bearer)
            .json(&body);
        async move { request.send().await.unwrap() }
    };
    for keys in [
        None,
        Some(serde_json::json!([])),
        Some(serde_json::Value::Null),
        Some(serde_json::json!(["00000000-0000-4000-a000-000000000000"])),
    ] {
        let refused = create(keys.clone()).await;
        assert_eq!(refused.status(), 400, "ssh_key_ids {keys:?}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "invalid_request");
        assert_eq!(
            body["message"],
            "SSH keys can be an array of UUID's, a single UUID string, null value or not defined"
        );
    }
    // A key that is not an OpenSSH public key is refused; a real one is registered.
    let add_key = |key: &str| {
        let request = http
            .post(format!("{url}/ssh-keys"))
            .bearer_auth(&bearer)
            .json(&serde_json::json!({"name": "k", "key": key}));
        async move { request.send().await.unwrap() }
    };
    assert_eq!(add_key("not a key").await.status(), 400);
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0sJ7+w2Cn5yQ1wH1N5Lr3v5Jp0wX9Wq1m0YbF6oQ5x k";
    let added = add_key(key).await;
    assert_eq!(added.status(), 201);
    let key_id = added.text().await.unwrap();
    assert_eq!(
        create(Some(serde_json::json!([key_id]))).await.status(),
        202
    );
    assert_eq!(create(Some(serde_json::json!(key_id))).await.status(), 202);
}

#[test]
fn a_machine_verda_reports_offline_loses_its_node_and_the_task_moves() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    let url = standin.url();
    let env = [
        ("VERDA_BASE_URL", url.as_str()),
        ("VERDA_CLIENT_ID", CLIENT_ID),
        ("VERDA_CLIENT_SECRET", CLIENT_SECRET),
    ];
    let run = skyward_tests::MovingRun::start(skyward(&sandbox, &env).args([
        "run",
        "--provider",
        "verda",
        "--selection",
        "cheapest",
        "--nodes",
        "2",
        "--retries",
        "1",
        "-n",
        "--",
        "sh",
        "-c",
        "echo on $SKYWARD_NODE_ID; sleep 15; echo finished on $SKYWARD_NODE_ID",
    ]));
    // Verda takes the machine away (its agent, here, does not even notice).
    let instance = standin
        .instances()
        .into_iter()
        .find(|i| i.hostname.ends_with(&format!("-{}", run.first)))
        .expect("the node's instance");
    standin.set_status(&instance.id, "offline");
    run.assert_moved("verda: ");
    assert_nothing_left(&standin, &sandbox);
}

/// A node given up has its instance deleted on its own: the pool's others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_a_node_deletes_its_instance_alone() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    let provider = verda(&standin);
    let coordinator = coordinator("verda-one");
    let spec = PoolSpec::new(2);
    let offers = provider.offers(&spec).await.unwrap();
    let offer = offers
        .iter()
        .find(|o| o.available)
        .expect("an offer with capacity");
    skyward_tests::check_terminate_removes_one_node(&provider, &coordinator, &spec, offer, || {
        let live: Vec<String> = standin
            .live_instances()
            .iter()
            // A deleted instance lingers in Verda's listing as `deleting` for a while.
            .filter(|i| i.status != "deleting")
            .filter_map(|i| {
                i.tags
                    .iter()
                    .find(|(key, _)| key == NODE_TAG)
                    .map(|(_, node)| node.clone())
            })
            .collect();
        std::future::ready(live)
    })
    .await;
    assert_nothing_left(&standin, &sandbox);
}

/// Calls are sent again as one policy says: a rate limit on the token call itself is waited
/// out (it was refused, nothing happened), a gateway error on a listing is retried (safe to
/// repeat), but a create that met a gateway error is not sent twice (it may have made a
/// machine already).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_waited_out_everywhere_and_creates_are_never_sent_twice() {
    let sandbox = Sandbox::new();
    let standin = VerdaStandin::start(sandbox.path());
    standin.inject(
        Method::POST,
        "/v1/oauth2/token",
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "Too many requests",
        2,
    );
    standin.inject(
        Method::GET,
        "/v1/instance-availability",
        StatusCode::BAD_GATEWAY,
        "bad_gateway",
        "Bad gateway",
        1,
    );
    let provider = verda(&standin);
    let offers = provider
        .offers(&PoolSpec::new(1))
        .await
        .expect("the rate limit and the gateway error are waited out");
    assert!(!offers.is_empty());
    let grants = standin
        .requests()
        .iter()
        .filter(|r| r.starts_with("POST /v1/oauth2/token"))
        .count();
    assert_eq!(grants, 3, "{:?}", standin.requests());

    standin.inject(
        Method::POST,
        "/v1/instances",
        StatusCode::BAD_GATEWAY,
        "bad_gateway",
        "Bad gateway",
        1,
    );
    let coordinator = coordinator("verda-once");
    let spec = PoolSpec::new(1);
    let request = request(&coordinator, &spec, &["node-1"]);
    let offer = find(&offers, "CPU.4V.16G", "FIN-01");
    let error = provider
        .provision(&request, offer, Market::OnDemand)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("Bad gateway"), "{error}");
    let creates = standin
        .requests()
        .iter()
        .filter(|r| r.starts_with("POST /v1/instances"))
        .count();
    assert_eq!(creates, 1, "{:?}", standin.requests());
    provider.teardown("verda-once").await.unwrap();
    assert_nothing_left(&standin, &sandbox);
}
