//! AWS against moto: offers, the whole path (instances boot from the user-data read back from
//! EC2, agents join, a task runs, teardown leaves nothing), spot, capacity errors and
//! throttling through a fault-injecting proxy, and teardown by tag.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use skyward_coordinator::pool::PoolProgress;
use skyward_coordinator::{Coordinator, Pool};
use skyward_core::offer::Market;
use skyward_core::spec::{parse_memory_gb, Allocation};
use skyward_core::{selection::Selection, spec::PoolSpec};
use skyward_providers::aws::{Aws, AwsConfig};
use skyward_providers::{ErrorKind, NodeBootstrap, Provider, ProvisionRequest, POOL_TAG};
use skyward_tests::moto::{self, Fault, FaultProxy, Hypervisor, Moto};
use skyward_tests::{run, task_output, Sandbox};

const LIMIT: Duration = Duration::from_secs(60);

fn aws(url: &str) -> Arc<Aws> {
    moto::fake_credentials();
    Arc::new(Aws::new(AwsConfig {
        endpoint_url: Some(url.to_string()),
        ..AwsConfig::default()
    }))
}

/// A provider whose pools get a cluster placement group of their own.
fn placed_aws(url: &str) -> Arc<Aws> {
    moto::fake_credentials();
    Arc::new(Aws::new(AwsConfig {
        endpoint_url: Some(url.to_string()),
        placement_group: Some("cluster".into()),
        ..AwsConfig::default()
    }))
}

fn coordinator(pool: &str) -> Arc<Coordinator> {
    skyward_tests::loopback_coordinator(pool)
}

fn small_spec(nodes: usize) -> PoolSpec {
    let mut spec = PoolSpec::new(nodes);
    spec.vcpus = Some(2);
    spec.memory_gb = Some(parse_memory_gb("4GB").unwrap());
    spec.connect_timeout = Duration::from_secs(60);
    spec
}

/// The pool's instances that are not terminated: (id, type, lifecycle).
async fn live_instances(url: &str, pool: &str) -> Vec<(String, String, String)> {
    live_instances_with_nodes(url, pool)
        .await
        .into_iter()
        .map(|(id, kind, lifecycle, ..)| (id, kind, lifecycle))
        .collect()
}

/// [`live_instances`], each with its node tag (empty when it has none) and its state.
async fn live_instances_with_nodes(
    url: &str,
    pool: &str,
) -> Vec<(String, String, String, String, String)> {
    let ec2 = moto::client(url).await;
    let out = ec2
        .describe_instances()
        .filters(moto::tag_filter(POOL_TAG, pool))
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
        .map(|i| {
            (
                i.instance_id().unwrap_or_default().to_string(),
                i.instance_type()
                    .map(|t| t.as_str().to_string())
                    .unwrap_or_default(),
                i.instance_lifecycle()
                    .map(|l| l.as_str().to_string())
                    .unwrap_or_else(|| "on-demand".into()),
                i.tags()
                    .iter()
                    .find(|t| t.key() == Some(skyward_providers::NODE_TAG))
                    .and_then(|t| t.value())
                    .unwrap_or_default()
                    .to_string(),
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_come_from_the_types_offered_in_the_region_with_prices() {
    let moto = Moto::start();
    let provider = aws(&moto.url);
    let spec = PoolSpec::new(1).accelerator("A10G".parse().unwrap());
    let offers = provider.offers(&spec).await.unwrap();
    let g5 = offers
        .iter()
        .find(|o| o.instance_type == "g5.xlarge")
        .unwrap_or_else(|| {
            panic!(
                "no g5.xlarge among {:?}",
                offers.iter().map(|o| &o.instance_type).collect::<Vec<_>>()
            )
        });
    assert_eq!(g5.accelerator_label(), "A10G");
    assert_eq!(
        g5.on_demand_per_hour,
        Some(1.006),
        "from the bundled price table"
    );
    assert!(g5.vcpus == 4 && g5.memory_gb >= 15.9, "{g5:?}");
    assert!(offers
        .iter()
        .all(|o| o.accelerator_label().starts_with("A10G")));
    assert!(
        g5.provider_ref.contains("us-east-1"),
        "zones offering it: {}",
        g5.provider_ref
    );

    let spot = provider
        .offers(&spec.clone().allocation(Allocation::Spot))
        .await
        .unwrap();
    let g5 = spot
        .iter()
        .find(|o| o.instance_type == "g5.xlarge")
        .unwrap();
    assert!(
        g5.spot_per_hour.is_some(),
        "spot price from the price history: {g5:?}"
    );

    let h100 = PoolSpec::new(1).accelerator("H100:8".parse().unwrap());
    let p5 = provider.offers(&h100).await.unwrap();
    assert!(
        p5.iter()
            .any(|o| o.instance_type == "p5.48xlarge" && o.accelerator_label() == "H100:8"),
        "{p5:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_boots_from_its_user_data_runs_work_and_leaves_nothing() {
    let sandbox = Sandbox::new();
    let moto = Moto::start();
    let _hypervisor = Hypervisor::start(&moto.url, sandbox.path().join("ec2"));
    let provider = aws(&moto.url);
    let coordinator = coordinator("aws-path");
    let providers: Vec<Arc<dyn Provider>> = vec![provider.clone()];
    let mut ignore = |_: PoolProgress<'_>| {};
    let pool = Pool::up(
        coordinator.clone(),
        &providers,
        &Selection::Cheapest,
        &small_spec(2),
        &mut ignore,
    )
    .await
    .expect("a pool on moto");
    assert_eq!(pool.nodes().len(), 2);
    let (offer, market) = pool.offer();
    assert_eq!(
        (offer.instance_type.as_str(), market),
        ("t3.medium", Market::OnDemand),
        "the cheapest type with 2 vCPUs and 4 GB"
    );
    let live = live_instances(&moto.url, "aws-path").await;
    assert_eq!(live.len(), 2, "{live:?}");

    // The pool's security group lets members reach each other and nothing else in (no agent
    // port: without --reverse the agents dial out).
    let ec2 = moto::client(&moto.url).await;
    let groups = ec2
        .describe_security_groups()
        .filters(moto::tag_filter(POOL_TAG, "aws-path"))
        .send()
        .await
        .unwrap();
    let group = &groups.security_groups()[0];
    let rules = group.ip_permissions();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        rules[0].user_id_group_pairs()[0].group_id(),
        group.group_id()
    );
    assert!(rules[0].ip_ranges().is_empty(), "no ingress from addresses");

    let mut task = pool
        .coordinator()
        .start_task(
            &pool.nodes()[1],
            skyward_tests::command(&["echo", "on ec2"]),
        )
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"on ec2\n");
    drop(task);
    pool.down().await;
    assert!(live_instances(&moto.url, "aws-path").await.is_empty());
    let groups = ec2
        .describe_security_groups()
        .filters(moto::tag_filter(POOL_TAG, "aws-path"))
        .send()
        .await
        .unwrap();
    assert!(
        groups.security_groups().is_empty(),
        "the security group went with the pool"
    );
    let templates = ec2.describe_launch_templates().send().await.unwrap();
    assert!(
        templates.launch_templates().is_empty(),
        "launch templates went with the pool"
    );
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(10))
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_pools_run_on_spot_instances() {
    let sandbox = Sandbox::new();
    let moto = Moto::start();
    let _hypervisor = Hypervisor::start(&moto.url, sandbox.path().join("ec2"));
    let provider = aws(&moto.url);
    let providers: Vec<Arc<dyn Provider>> = vec![provider];
    let mut ignore = |_: PoolProgress<'_>| {};
    let spec = small_spec(1).allocation(Allocation::SpotIfAvailable);
    let pool = Pool::up(
        coordinator("aws-spot"),
        &providers,
        &Selection::Cheapest,
        &spec,
        &mut ignore,
    )
    .await
    .unwrap();
    assert_eq!(pool.offer().1, Market::Spot, "spot is tried first");
    let live = live_instances(&moto.url, "aws-spot").await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].2, "spot", "{live:?}");
    pool.down().await;
    assert!(live_instances(&moto.url, "aws-spot").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_error_falls_back_with_what_to_try() {
    let sandbox = Sandbox::new();
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.url).await;
    proxy.inject(Fault::FleetError {
        code: "InsufficientInstanceCapacity".into(),
        count: 1,
    });
    let _hypervisor = Hypervisor::start(&moto.url, sandbox.path().join("ec2"));
    let providers: Vec<Arc<dyn Provider>> = vec![aws(&proxy.url)];
    let failures = Mutex::new(Vec::new());
    let mut on_progress = |event: PoolProgress<'_>| {
        if let PoolProgress::AttemptFailed { attempt, error } = event {
            failures
                .lock()
                .unwrap()
                .push(format!("{}: {error}", attempt.offer.instance_type));
        }
    };
    let pool = Pool::up(
        coordinator("aws-capacity"),
        &providers,
        &Selection::Cheapest,
        &small_spec(1),
        &mut on_progress,
    )
    .await
    .expect("falls back to the next offer");
    let failures = failures.into_inner().unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].starts_with("t3.medium: aws: No instances available"),
        "{failures:?}"
    );
    assert!(
        failures[0].contains("spot-if-available"),
        "says what to try: {failures:?}"
    );
    assert_ne!(pool.offer().0.instance_type, "t3.medium");
    assert_eq!(proxy.calls("CreateFleet"), 2);
    pool.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.url).await;
    proxy.inject(Fault::Throttle {
        action: "DescribeInstanceTypeOfferings".into(),
        count: 2,
    });
    let offers = aws(&proxy.url)
        .offers(&small_spec(1))
        .await
        .expect("offers after the retries");
    assert!(!offers.is_empty());
    assert!(proxy.calls("DescribeInstanceTypeOfferings") >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_finds_a_lost_pool_by_its_tag() {
    let moto = Moto::start();
    provision(&aws(&moto.url), "aws-lost", 2).await;
    assert_eq!(live_instances(&moto.url, "aws-lost").await.len(), 2);
    // A new provider value (as after a crash) knows nothing but the pool's name.
    aws(&moto.url).teardown("aws-lost").await.unwrap();
    assert!(live_instances(&moto.url, "aws-lost").await.is_empty());
}

#[test]
fn the_cli_lists_aws_offers_and_status_against_moto() {
    let sandbox = Sandbox::new();
    let moto = Moto::start();
    let with_moto = |cmd: &mut std::process::Command| {
        cmd.env("AWS_ENDPOINT_URL", &moto.url)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true");
    };
    let mut offers = sandbox.skyward();
    offers.args([
        "offers",
        "--provider",
        "aws",
        "--accelerator",
        "A10G",
        "--json",
    ]);
    with_moto(&mut offers);
    let out = run(&mut offers, Duration::from_secs(120));
    assert_eq!(out.code, Some(0), "{out:?}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        list.iter()
            .any(|o| o["instance_type"] == "g5.xlarge" && o["accelerator"]["name"] == "A10G"),
        "{}",
        out.stdout
    );

    // A provider option reaches the provider's config: offers come from the region it names.
    let mut elsewhere = sandbox.skyward();
    elsewhere.args([
        "offers",
        "--provider",
        "aws",
        "--provider-opt",
        "aws.region=eu-west-1",
        "--cpu",
        "2",
        "--json",
    ]);
    with_moto(&mut elsewhere);
    let out = run(&mut elsewhere, Duration::from_secs(120));
    assert_eq!(out.code, Some(0), "{out:?}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        !list.is_empty() && list.iter().all(|o| o["region"] == "eu-west-1"),
        "{}",
        out.stdout
    );

    let mut providers = sandbox.skyward();
    providers.args(["providers", "--json"]);
    with_moto(&mut providers);
    let out = run(&mut providers, Duration::from_secs(120));
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let aws = list
        .iter()
        .find(|p| p["provider"] == "aws")
        .expect("aws is listed");
    assert_eq!(aws["working"], true, "{aws}");
    // When the bundled on-demand prices are from.
    assert!(
        aws["detail"]
            .as_str()
            .is_some_and(|d| d.contains("on-demand prices as of 2025-06-01 (bundled)")),
        "{aws}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_in_the_spec_is_where_offers_come_from_and_instances_go() {
    let moto = Moto::start();
    let provider = aws(&moto.url);
    let coordinator = coordinator("aws-region");
    let mut spec = small_spec(1);
    spec.region = Some("eu-west-1".into());
    let offers = provider.offers(&spec).await.unwrap();
    assert!(!offers.is_empty());
    assert!(
        offers
            .iter()
            .all(|o| o.region == "eu-west-1" && o.provider_ref.contains("eu-west-1")),
        "{:?}",
        offers.first()
    );
    let offer = offers
        .iter()
        .find(|o| o.instance_type == "t3.medium")
        .unwrap();
    let request = ProvisionRequest {
        pool: "aws-region".into(),
        nodes: vec![NodeBootstrap {
            node_id: "node-1".into(),
            token: coordinator.issue_token("node-1"),
        }],
        spec,
        bootstrap: coordinator.bootstrap(),
    };
    provider
        .provision(&request, offer, Market::OnDemand)
        .await
        .unwrap();
    let ec2 = moto::client_in(&moto.url, "eu-west-1").await;
    let live = |ec2: aws_sdk_ec2::Client| async move {
        ec2.describe_instances()
            .filters(moto::tag_filter(POOL_TAG, "aws-region"))
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("instance-state-name")
                    .values("running")
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .reservations()
            .iter()
            .map(|r| r.instances().len())
            .sum::<usize>()
    };
    assert_eq!(live(ec2.clone()).await, 1, "the instance is in eu-west-1");
    assert_eq!(
        live(moto::client(&moto.url).await).await,
        0,
        "and not in the default region"
    );
    provider.teardown("aws-region").await.unwrap();
    assert_eq!(live(ec2).await, 0, "teardown searched the region it used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverse_pool_opens_the_agent_port_to_the_coordinator_alone_and_is_dialed() {
    let sandbox = Sandbox::new();
    let moto = Moto::start();
    // The provider sees EC2 through the proxy, which reports an instance's public IP only
    // once the hypervisor has booted it in a namespace of its own: moto's invented public
    // IPs never reach the coordinator.
    let proxy = FaultProxy::start(&moto.url).await;
    let hypervisor = Hypervisor::start(&moto.url, sandbox.path().join("ec2"));
    hypervisor.set_boot_isolated(true);
    proxy.report_public_addresses_of(&hypervisor);
    let providers: Vec<Arc<dyn Provider>> = vec![aws(&proxy.url)];
    let mut spec = small_spec(1);
    spec.reverse = true;
    spec.public_ip = Some("198.51.100.7".parse().unwrap());
    let mut ignore = |_: PoolProgress<'_>| {};
    let pool = Pool::up(
        skyward_tests::dialing_coordinator("aws-reverse"),
        &providers,
        &Selection::Cheapest,
        &spec,
        &mut ignore,
    )
    .await
    .expect("a reverse pool on moto");

    // The pool's group: the pool's own nodes, and UDP 7444 from the coordinator's address
    // alone.
    let ec2 = moto::client(&moto.url).await;
    let groups = ec2
        .describe_security_groups()
        .filters(moto::tag_filter(POOL_TAG, "aws-reverse"))
        .send()
        .await
        .unwrap();
    assert_eq!(groups.security_groups().len(), 1);
    let group = &groups.security_groups()[0];
    let rules = group.ip_permissions();
    assert_eq!(rules.len(), 2, "{rules:?}");
    let members = rules
        .iter()
        .find(|r| r.ip_protocol() == Some("-1"))
        .unwrap();
    assert_eq!(
        members.user_id_group_pairs()[0].group_id(),
        group.group_id()
    );
    assert!(members.ip_ranges().is_empty() && members.ipv6_ranges().is_empty());
    let agent = rules
        .iter()
        .find(|r| r.ip_protocol() == Some("udp"))
        .unwrap();
    assert_eq!(
        (agent.from_port(), agent.to_port()),
        (Some(7444), Some(7444))
    );
    let sources: Vec<&str> = agent
        .ip_ranges()
        .iter()
        .filter_map(|r| r.cidr_ip())
        .collect();
    assert_eq!(sources, ["198.51.100.7/32"]);
    assert!(agent.ipv6_ranges().is_empty() && agent.user_id_group_pairs().is_empty());

    // The coordinator dialed the instance at its namespace address, the public IP the proxy
    // reports for it.
    let live = live_instances(&moto.url, "aws-reverse").await;
    assert_eq!(live.len(), 1, "{live:?}");
    let address = hypervisor
        .public_address(&live[0].0)
        .expect("the instance booted isolated");
    let reported = moto::client(&proxy.url)
        .await
        .describe_instances()
        .instance_ids(&live[0].0)
        .send()
        .await
        .unwrap();
    let instance = &reported.reservations()[0].instances()[0];
    assert_eq!(
        instance.public_ip_address(),
        Some(address.to_string().as_str())
    );
    let node = &pool.nodes()[0];
    assert_eq!(node.address, std::net::IpAddr::V4(address));

    let mut task = pool
        .coordinator()
        .start_task(
            node,
            skyward_tests::command(&["sh", "-c", "echo $SKYWARD_NODE_ID"]),
        )
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"node-1\n");
    drop(task);

    pool.down().await;
    assert!(live_instances(&moto.url, "aws-reverse").await.is_empty());
    let groups = ec2
        .describe_security_groups()
        .filters(moto::tag_filter(POOL_TAG, "aws-reverse"))
        .send()
        .await
        .unwrap();
    assert!(
        groups.security_groups().is_empty(),
        "the group and its agent port rule went with the pool"
    );
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(10))
        .is_empty());
}

/// The decoded `Key=Value` pairs of a form the proxy saw.
fn form_pairs(form: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://form/?{form}"))
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

/// The subnets a CreateFleet call let EC2 choose from.
fn fleet_subnets(form: &str) -> Vec<String> {
    form_pairs(form)
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("LaunchTemplateConfigs.1.Overrides.") && k.ends_with(".SubnetId")
        })
        .map(|(_, v)| v)
        .collect()
}

/// The pool's security groups that exist now.
async fn security_groups(url: &str, pool: &str) -> usize {
    moto::client(url)
        .await
        .describe_security_groups()
        .filters(moto::tag_filter(POOL_TAG, pool))
        .send()
        .await
        .unwrap()
        .security_groups()
        .len()
}

/// Provisions `nodes` t3.medium instances of `pool` through `provider`, as a pool would.
async fn provision(provider: &Aws, pool: &str, nodes: usize) {
    let coordinator = coordinator(pool);
    let spec = small_spec(nodes);
    let offers = provider.offers(&spec).await.unwrap();
    let offer = offers
        .iter()
        .find(|o| o.instance_type == "t3.medium")
        .unwrap();
    let request = ProvisionRequest {
        pool: pool.into(),
        nodes: (1..=nodes)
            .map(|i| NodeBootstrap {
                node_id: format!("node-{i}"),
                token: coordinator.issue_token(&format!("node-{i}")),
            })
            .collect(),
        spec,
        bootstrap: coordinator.bootstrap(),
    };
    provider
        .provision(&request, offer, Market::OnDemand)
        .await
        .unwrap();
}

/// Teardown is a list of independent steps that touches only what the pool made: a user who
/// may not describe placement groups, and asked for none, tears down a pool without being
/// refused; when a step does fail, the steps after it still run, the error names the step,
/// and a later teardown finishes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_touches_only_what_the_pool_made_and_goes_on_past_a_failed_step() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.url).await;
    proxy.inject(Fault::Unauthorized {
        action: "DescribePlacementGroups".into(),
        count: usize::MAX,
    });
    let plain = aws(&proxy.url);
    provision(&plain, "aws-plain", 1).await;
    assert_eq!(security_groups(&moto.url, "aws-plain").await, 1);
    plain
        .teardown("aws-plain")
        .await
        .expect("a teardown with nothing refused");
    assert_eq!(proxy.calls("DescribePlacementGroups"), 0);
    assert!(live_instances(&moto.url, "aws-plain").await.is_empty());
    assert_eq!(security_groups(&moto.url, "aws-plain").await, 0);

    // A pool that asked for a placement group, torn down by a user who may not list them.
    let placed = placed_aws(&proxy.url);
    provision(&placed, "aws-refused", 1).await;
    assert_eq!(moto.placement_groups().len(), 1);
    let error = placed.teardown("aws-refused").await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Auth, "{error}");
    let text = error.to_string();
    assert!(
        text.contains("pool aws-refused: one step of its teardown failed, the other steps ran: deleting its placement group: UnauthorizedOperation"),
        "{text}"
    );
    // A refusal is not tried again; the steps after it ran.
    assert_eq!(proxy.calls("DescribePlacementGroups"), 1);
    assert!(live_instances(&moto.url, "aws-refused").await.is_empty());
    assert_eq!(security_groups(&moto.url, "aws-refused").await, 0);
    assert_eq!(moto.placement_groups().len(), 1, "the refused step left it");

    // With the permission, a later teardown (`skyward down`) removes what is left.
    let unrefused = placed_aws(&moto.url);
    unrefused
        .teardown("aws-refused")
        .await
        .expect("the rest removed");
    assert!(moto.placement_groups().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_group_keeps_the_pool_in_one_subnet_and_goes_with_it() {
    let sandbox = Sandbox::new();
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.url).await;
    let _hypervisor = Hypervisor::start(&moto.url, sandbox.path().join("ec2"));
    moto::fake_credentials();
    let provider = placed_aws(&proxy.url);
    let providers: Vec<Arc<dyn Provider>> = vec![provider.clone()];
    let mut ignore = |_: PoolProgress<'_>| {};
    let pool = Pool::up(
        coordinator("aws-placed"),
        &providers,
        &Selection::Cheapest,
        &small_spec(2),
        &mut ignore,
    )
    .await
    .expect("a placed pool on moto");

    let groups = moto.placement_groups();
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(
        (groups[0].name.as_str(), groups[0].strategy.as_str()),
        ("skyward-aws-placed", "cluster")
    );
    assert!(
        groups[0]
            .tags
            .contains(&(POOL_TAG.to_string(), "aws-placed".to_string())),
        "{groups:?}"
    );
    // Every node's launch template puts it in the group.
    let templates = proxy.forms("CreateLaunchTemplate");
    assert_eq!(templates.len(), 2);
    for form in &templates {
        assert!(
            form_pairs(form).contains(&(
                "LaunchTemplateData.Placement.GroupName".into(),
                "skyward-aws-placed".into()
            )),
            "{form}"
        );
    }
    // The first node may go to any zone's subnet; the second only where the first went.
    let fleets = proxy.forms("CreateFleet");
    assert_eq!(fleets.len(), 2);
    let (first, second) = (fleet_subnets(&fleets[0]), fleet_subnets(&fleets[1]));
    assert!(first.len() > 1, "moto offers several zones: {first:?}");
    let ec2 = moto::client(&moto.url).await;
    let described = ec2
        .describe_instances()
        .filters(moto::tag_filter(POOL_TAG, "aws-placed"))
        .send()
        .await
        .unwrap();
    let subnets: std::collections::BTreeSet<&str> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.subnet_id())
        .collect();
    assert_eq!(subnets.len(), 1, "{subnets:?}");
    assert_eq!(
        second,
        subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );

    pool.down().await;
    assert!(moto.placement_groups().is_empty());
    assert!(live_instances(&moto.url, "aws-placed").await.is_empty());
}

#[test]
fn a_price_table_made_from_the_aws_price_list_prices_the_offers() {
    let sandbox = Sandbox::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixtures = repo.join("tests/fixtures");
    let table = sandbox.path().join("aws-prices.csv");
    let made = std::process::Command::new("python3")
        .arg(repo.join("scripts/aws-prices.py"))
        .arg(fixtures.join("aws-price-list-us-east-1.csv"))
        .arg(fixtures.join("aws-price-list-eu-west-1.csv"))
        .output()
        .expect("python3 runs (scripts/test.sh installs it)");
    assert!(made.status.success(), "{made:?}");
    let text = String::from_utf8(made.stdout).unwrap();
    // Linux, shared tenancy, on-demand, per hour only; the oldest list's date.
    let rows: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        rows,
        [
            "instance_type,usd_per_hour,region",
            "t3.medium,0.0456,eu-west-1",
            "g5.xlarge,1.006,us-east-1",
            "t3.medium,0.042,us-east-1",
        ]
    );
    assert!(text.contains("# as-of: 2026-11-18\n"), "{text}");
    std::fs::write(&table, &text).unwrap();

    let moto = Moto::start();
    let t3_medium = |options: &[&str]| {
        let out = run(
            sandbox
                .skyward()
                .env("AWS_ENDPOINT_URL", &moto.url)
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .args(["offers", "--provider", "aws", "--cpu", "2", "--json"])
                .args(options),
            Duration::from_secs(120),
        );
        assert_eq!(out.code, Some(0), "{out:?}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
        list.iter()
            .find(|o| o["instance_type"] == "t3.medium")
            .map(|o| o["on_demand_per_hour"].clone())
            .expect("t3.medium is offered")
    };
    let with_table = format!("aws.price_table={}", table.display());
    assert_eq!(
        t3_medium(&[]),
        serde_json::json!(0.0416),
        "the bundled table"
    );
    assert_eq!(
        t3_medium(&["--provider-opt", &with_table]),
        serde_json::json!(0.042)
    );
    assert_eq!(
        t3_medium(&[
            "--provider-opt",
            &with_table,
            "--provider-opt",
            "aws.region=eu-west-1"
        ]),
        serde_json::json!(0.0456),
        "each region its own price"
    );

    // A table that is not one is refused before anything is asked of EC2.
    std::fs::write(&table, "instance_type,usd_per_hour\nt3.medium,0.04\n").unwrap();
    let out = run(
        sandbox
            .skyward()
            .args(["offers", "--provider", "aws", "--provider-opt", &with_table]),
        LIMIT,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("as-of") && out.stderr.contains("scripts/aws-prices.py"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
}

/// A node given up has its instance terminated on its own: the pool's others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_a_node_removes_its_instance_alone() {
    let moto = Moto::start();
    let provider = aws(&moto.url);
    let coordinator = coordinator("aws-one");
    let spec = small_spec(2);
    let offers = provider.offers(&spec).await.unwrap();
    let offer = offers
        .iter()
        .find(|o| o.instance_type == "t3.medium")
        .unwrap();
    let url = moto.url.clone();
    skyward_tests::check_terminate_removes_one_node(
        provider.as_ref(),
        &coordinator,
        &spec,
        offer,
        || {
            let url = url.clone();
            async move {
                // A terminated instance shuts down first: only pending and running ones live.
                live_instances_with_nodes(&url, "aws-one")
                    .await
                    .into_iter()
                    .filter(|(.., state)| state == "pending" || state == "running")
                    .map(|(.., node, _)| node)
                    .collect::<Vec<String>>()
            }
        },
    )
    .await;
}
