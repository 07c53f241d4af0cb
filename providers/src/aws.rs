//! AWS EC2 through aws-sdk-ec2: offers from the instance types offered in the region's
//! availability zones (spot prices from the price history, on-demand prices from a bundled
//! table), AMI auto-detection, the default VPC's subnets, a security group per pool that only
//! lets the pool's nodes talk to each other (and, with `--reverse`, the coordinator's one
//! address reach the agent port), and instances tagged with their pool. A pool's nodes go to
//! one subnet (the one the first node's fleet chose), and to a placement group of the pool's
//! own when the config asks for one.
//!
//! Credentials come through the standard AWS chain (environment, `aws configure` files);
//! `AWS_ENDPOINT_URL` (or the config's `endpoint_url`) points the SDK elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, Filter, FleetLaunchTemplateConfigRequest,
    FleetLaunchTemplateOverridesRequest, FleetLaunchTemplateSpecificationRequest,
    FleetOnDemandAllocationStrategy, FleetType, InstanceStateName, InstanceType, IpPermission,
    IpRange, Ipv6Range, LaunchTemplateBlockDeviceMappingRequest,
    LaunchTemplateEbsBlockDeviceRequest,
    LaunchTemplateInstanceNetworkInterfaceSpecificationRequest, LaunchTemplatePlacementRequest,
    LaunchTemplateTagSpecificationRequest, LocationType, OnDemandOptionsRequest, PlacementStrategy,
    RequestLaunchTemplateData, ResourceType, ShutdownBehavior, SpotAllocationStrategy,
    SpotOptionsRequest, Tag, TagSpecification, TargetCapacitySpecificationRequest, UserIdGroupPair,
};
use base64::Engine;

use super::aws_prices::PriceTable;
use super::{
    ErrorKind, Instance, Provider, ProviderError, ProviderStatus, ProvisionRequest, Teardown,
    NODE_TAG, POOL_TAG,
};
use crate::bootstrap::Reverse;
use skyward_core::catalog::{self, DeviceKind};
use skyward_core::offer::{Market, Offer, OfferedAccelerator};
use skyward_core::spec::PoolSpec;

const NAME: &str = "aws";
/// How long instances get to reach `running`, and to be gone after termination.
const STATE_POLLING: super::Polling = super::Polling {
    first: POLL,
    max: POLL,
    limit: Duration::from_secs(300),
};
const POLL: Duration = Duration::from_secs(2);
/// How long a delete is sent again while what it deletes is still in use (terminated
/// instances take a minute or two to let go of their security group).
const IN_USE_POLLING: super::Polling = super::Polling {
    first: POLL,
    max: POLL,
    limit: Duration::from_secs(120),
};

/// AMI name patterns tried in order: a GPU deep-learning image for accelerated types, Ubuntu
/// otherwise; Amazon Linux 2023 (the ECS-optimised GPU variant carries NVIDIA drivers) as
/// the fallback where the preferred images are not published.
const GPU_IMAGES: &[(&str, &str)] = &[
    (
        "amazon",
        "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)*",
    ),
    (
        "amazon",
        "Deep Learning Base OSS Nvidia Driver GPU AMI (Amazon Linux 2023)*",
    ),
    ("amazon", "al2023-ami-ecs-gpu-hvm-*-x86_64-ebs"),
];
const NEURON_IMAGES: &[(&str, &str)] = &[
    ("amazon", "Deep Learning AMI Neuron (Ubuntu 22.04)*"),
    ("amazon", "al2023-ami-ecs-neuron-hvm-*-x86_64"),
];
const CPU_IMAGES: &[(&str, &str)] = &[
    (
        "099720109477",
        "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*",
    ),
    (
        "099720109477",
        "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*",
    ),
    ("amazon", "al2023-ami-2023*-x86_64"),
    ("amazon", "al2023-ami-ecs-hvm-*-x86_64"),
];

/// The provider as a value: `Aws { region, ami, subnet_id, allocation_strategy }`.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    pub region: String,
    /// AMI for every node; `None` detects one per instance type.
    pub ami: Option<String>,
    /// Subnet for every node; `None` uses the default VPC's subnet in the chosen zone.
    pub subnet_id: Option<String>,
    /// How an instant EC2 fleet picks spot capacity across the zones' subnets:
    /// `price-capacity-optimized`, `lowest-price`, `capacity-optimized`...
    pub allocation_strategy: String,
    /// Overrides the EC2 endpoint (`AWS_ENDPOINT_URL` does the same from the environment).
    pub endpoint_url: Option<String>,
    /// A placement group of the pool's own, with this strategy (`cluster` for the lowest
    /// latency between nodes, `spread`, `partition`); `None` places nodes as EC2 likes.
    pub placement_group: Option<String>,
    /// On-demand prices; `None` uses the table bundled with this build.
    pub price_table: Option<PriceTable>,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: "us-east-1".into(),
            ami: None,
            subnet_id: None,
            allocation_strategy: "price-capacity-optimized".into(),
            endpoint_url: None,
            placement_group: None,
            price_table: None,
        }
    }
}

impl AwsConfig {
    /// Applies `--provider-opt aws.KEY=VALUE` settings.
    pub fn apply(&mut self, mut settings: super::Settings) -> Result<(), String> {
        if let Some(region) = settings.take("region")? {
            self.region = region;
        }
        self.ami = settings.take("ami")?.or(self.ami.take());
        self.subnet_id = settings.take("subnet_id")?.or(self.subnet_id.take());
        if let Some(strategy) = settings.take::<String>("allocation_strategy")? {
            const STRATEGIES: &[&str] = &[
                "price-capacity-optimized",
                "capacity-optimized",
                "capacity-optimized-prioritized",
                "lowest-price",
                "diversified",
            ];
            if !STRATEGIES.contains(&strategy.as_str()) {
                return Err(format!(
                    "aws.allocation_strategy {strategy:?}: use one of {}",
                    STRATEGIES.join(", ")
                ));
            }
            self.allocation_strategy = strategy;
        }
        self.endpoint_url = settings.take("endpoint_url")?.or(self.endpoint_url.take());
        if let Some(strategy) = settings.take::<String>("placement_group")? {
            const STRATEGIES: &[&str] = &["cluster", "spread", "partition"];
            if !STRATEGIES.contains(&strategy.as_str()) {
                return Err(format!(
                    "aws.placement_group {strategy:?}: use one of {}",
                    STRATEGIES.join(", ")
                ));
            }
            self.placement_group = Some(strategy);
        }
        if let Some(path) = settings.take::<std::path::PathBuf>("price_table")? {
            self.price_table = Some(PriceTable::load(&path)?);
        }
        settings.finish(&[
            "region",
            "ami",
            "subnet_id",
            "allocation_strategy",
            "endpoint_url",
            "placement_group",
            "price_table",
        ])
    }

    /// Defaults, with the region from `AWS_REGION` / `AWS_DEFAULT_REGION` when set.
    pub fn from_env() -> Self {
        let region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| "us-east-1".into());
        AwsConfig {
            region,
            ..AwsConfig::default()
        }
    }
}

pub struct Aws {
    config: AwsConfig,
    /// One client per region used (a spec's --region, else the config's).
    clients: tokio::sync::Mutex<HashMap<String, aws_sdk_ec2::Client>>,
    /// Regions this provider provisioned in, which teardown searches besides the default.
    regions_used: std::sync::Mutex<std::collections::BTreeSet<String>>,
    prices: PriceTable,
}

/// The agent port of a reverse pool, open to the coordinator's address alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AgentPort {
    port: u16,
    allow_from: IpAddr,
}

impl AgentPort {
    fn of(reverse: &Reverse) -> Result<AgentPort, ProviderError> {
        let Some(allow_from) = reverse.allow_from else {
            return Err(ProviderError::new(
                NAME,
                ErrorKind::Invalid,
                "--reverse needs the coordinator's public address",
            )
            .hint("pass --public-ip ADDRESS"));
        };
        Ok(AgentPort {
            port: reverse.agent_port,
            // An IPv4-mapped IPv6 address is the IPv4 address the traffic really comes from.
            allow_from: allow_from.to_canonical(),
        })
    }

    /// The ingress rule: UDP to the agent port from the coordinator's one address.
    fn rule(&self) -> IpPermission {
        const DESCRIPTION: &str = "Skyward coordinator (--reverse)";
        let rule = IpPermission::builder()
            .ip_protocol("udp")
            .from_port(i32::from(self.port))
            .to_port(i32::from(self.port));
        match self.allow_from {
            IpAddr::V4(ip) => rule.ip_ranges(
                IpRange::builder()
                    .cidr_ip(format!("{ip}/32"))
                    .description(DESCRIPTION)
                    .build(),
            ),
            IpAddr::V6(ip) => rule.ipv6_ranges(
                Ipv6Range::builder()
                    .cidr_ipv6(format!("{ip}/128"))
                    .description(DESCRIPTION)
                    .build(),
            ),
        }
        .build()
    }

    /// Where the coordinator dials the agent of a running instance: its public address of
    /// the coordinator's family, the one the rule lets the coordinator's traffic reach.
    fn address_of(&self, instance: &aws_sdk_ec2::types::Instance) -> Option<SocketAddr> {
        let running = instance.state().and_then(|s| s.name()) == Some(&InstanceStateName::Running);
        let address = match self.allow_from {
            IpAddr::V4(_) => instance.public_ip_address(),
            IpAddr::V6(_) => instance.ipv6_address(),
        };
        let ip: IpAddr = address?.parse().ok()?;
        running.then_some(SocketAddr::new(ip, self.port))
    }
}

/// The launch template's network: the pool's group on the primary interface; with
/// `--reverse` that interface also gets a public address of the coordinator's family, even
/// in a subnet that does not hand one out by itself, for the coordinator to dial.
fn with_network(
    data: aws_sdk_ec2::types::builders::RequestLaunchTemplateDataBuilder,
    group: &str,
    reverse: Option<AgentPort>,
) -> aws_sdk_ec2::types::builders::RequestLaunchTemplateDataBuilder {
    let Some(reverse) = reverse else {
        return data.security_group_ids(group);
    };
    // With an interface given, EC2 takes the groups there (and the fleet's subnet for it).
    let interface = LaunchTemplateInstanceNetworkInterfaceSpecificationRequest::builder()
        .device_index(0)
        .groups(group)
        .delete_on_termination(true);
    let interface = match reverse.allow_from {
        IpAddr::V4(_) => interface.associate_public_ip_address(true),
        IpAddr::V6(_) => interface.ipv6_address_count(1),
    };
    data.network_interfaces(interface.build())
}

impl Aws {
    pub fn new(config: AwsConfig) -> Self {
        Aws {
            clients: Default::default(),
            regions_used: Default::default(),
            prices: config
                .price_table
                .clone()
                .unwrap_or_else(PriceTable::bundled),
            config,
        }
    }

    async fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(region) {
            return client.clone();
        }
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()));
        if let Some(url) = &self.config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let client = aws_sdk_ec2::Client::new(&loader.load().await);
        clients.insert(region.to_string(), client.clone());
        client
    }

    /// The regions a pool's instances may be in: the default and every one used here.
    fn regions_to_search(&self) -> Vec<String> {
        let mut regions = self.regions_used.lock().expect("regions lock").clone();
        regions.insert(self.config.region.clone());
        regions.into_iter().collect()
    }

    /// Instance types offered per zone of the region.
    async fn zones_by_type(
        &self,
        region: &str,
    ) -> Result<BTreeMap<String, Vec<String>>, ProviderError> {
        let mut pages = self
            .client(region)
            .await
            .describe_instance_type_offerings()
            .location_type(LocationType::AvailabilityZone)
            .into_paginator()
            .send();
        let mut zones: BTreeMap<String, Vec<String>> = BTreeMap::new();
        while let Some(page) = pages.next().await {
            for offering in page.map_err(api_error)?.instance_type_offerings() {
                if let (Some(kind), Some(zone)) = (offering.instance_type(), offering.location()) {
                    zones
                        .entry(kind.as_str().to_string())
                        .or_default()
                        .push(zone.to_string());
                }
            }
        }
        Ok(zones)
    }

    /// The latest spot price per (type, zone).
    async fn spot_prices(
        &self,
        region: &str,
        types: &[String],
    ) -> Result<HashMap<(String, String), f64>, ProviderError> {
        let mut prices = HashMap::new();
        for chunk in types.chunks(100) {
            let mut pages = self
                .client(region)
                .await
                .describe_spot_price_history()
                .set_instance_types(Some(
                    chunk
                        .iter()
                        .map(|t| InstanceType::from(t.as_str()))
                        .collect(),
                ))
                .product_descriptions("Linux/UNIX")
                .product_descriptions("Linux/UNIX (Amazon VPC)")
                .start_time(aws_sdk_ec2::primitives::DateTime::from(
                    SystemTime::now() - Duration::from_secs(3 * 3600),
                ))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                for entry in page.map_err(api_error)?.spot_price_history() {
                    let (Some(kind), Some(zone), Some(price)) = (
                        entry.instance_type(),
                        entry.availability_zone(),
                        entry.spot_price(),
                    ) else {
                        continue;
                    };
                    if let Ok(price) = price.parse::<f64>() {
                        // Newest first: the first price seen per (type, zone) is the current one.
                        prices
                            .entry((kind.as_str().to_string(), zone.to_string()))
                            .or_insert(price);
                    }
                }
            }
        }
        Ok(prices)
    }

    async fn find_image(
        &self,
        region: &str,
        patterns: &[(&str, &str)],
    ) -> Result<String, ProviderError> {
        for (owner, pattern) in patterns {
            let images = self
                .client(region)
                .await
                .describe_images()
                .owners(*owner)
                .filters(filter("name", [*pattern]))
                .filters(filter("state", ["available"]))
                .filters(filter("architecture", ["x86_64"]))
                .send()
                .await
                .map_err(api_error)?;
            if let Some(newest) = images
                .images()
                .iter()
                .max_by(|a, b| a.creation_date().cmp(&b.creation_date()))
                .and_then(|i| i.image_id())
            {
                return Ok(newest.to_string());
            }
        }
        Err(ProviderError::new(
            NAME,
            ErrorKind::Invalid,
            format!("no AMI found in {region}"),
        )
        .hint("pass --image ami-... (or AwsConfig::ami)"))
    }

    /// Subnets to launch in, one per zone offering the type: the configured subnet, or the
    /// default VPC's. Returns (subnet, vpc) pairs.
    async fn subnets(
        &self,
        region: &str,
        zones: &[String],
    ) -> Result<Vec<(String, String)>, ProviderError> {
        let client = self.client(region).await;
        let subnets = match &self.config.subnet_id {
            Some(id) => client.describe_subnets().subnet_ids(id).send().await,
            None => {
                let vpcs = client
                    .describe_vpcs()
                    .filters(filter("isDefault", ["true"]))
                    .send()
                    .await
                    .map_err(api_error)?;
                let Some(vpc) = vpcs.vpcs().first().and_then(|v| v.vpc_id()) else {
                    return Err(ProviderError::new(
                        NAME,
                        ErrorKind::Invalid,
                        format!("no default VPC in {region}"),
                    )
                    .hint("pass a subnet (AwsConfig::subnet_id)"));
                };
                client
                    .describe_subnets()
                    .filters(filter("vpc-id", [vpc]))
                    .send()
                    .await
            }
        }
        .map_err(api_error)?;
        let mut chosen: Vec<(String, String)> = Vec::new();
        let mut zones_used: Vec<String> = Vec::new();
        for subnet in subnets.subnets() {
            let (Some(id), Some(vpc), Some(zone)) = (
                subnet.subnet_id(),
                subnet.vpc_id(),
                subnet.availability_zone(),
            ) else {
                continue;
            };
            let wanted = self.config.subnet_id.is_some() || zones.iter().any(|z| z == zone);
            if wanted && !zones_used.iter().any(|z| z == zone) {
                zones_used.push(zone.to_string());
                chosen.push((id.to_string(), vpc.to_string()));
            }
        }
        if chosen.is_empty() {
            return Err(ProviderError::new(
                NAME,
                ErrorKind::Capacity,
                format!("no subnet in a zone offering it ({})", zones.join(", ")),
            )
            .hint("try another instance type or region"));
        }
        Ok(chosen)
    }

    /// The pool's security group: members may reach each other on every port (NCCL, the
    /// preflight mesh check); nothing else comes in, since agents dial out, except with
    /// `--reverse` the agent port from the coordinator's one address.
    async fn security_group(
        &self,
        region: &str,
        pool: &str,
        vpc: &str,
        reverse: Option<AgentPort>,
    ) -> Result<String, ProviderError> {
        let client = self.client(region).await;
        let existing = client
            .describe_security_groups()
            .filters(filter(&format!("tag:{POOL_TAG}"), [pool]))
            .filters(filter("vpc-id", [vpc]))
            .send()
            .await
            .map_err(api_error)?;
        let id = match existing
            .security_groups()
            .first()
            .and_then(|g| g.group_id())
        {
            Some(id) => id.to_string(),
            None => {
                self.create_security_group(region, pool, vpc, reverse)
                    .await?
            }
        };
        if let Some(reverse) = reverse {
            match client
                .authorize_security_group_ingress()
                .group_id(&id)
                .ip_permissions(reverse.rule())
                .send()
                .await
            {
                Ok(_) => {}
                // A group left by an earlier attempt of this pool may have it already.
                Err(e) if e.code() == Some("InvalidPermission.Duplicate") => {}
                Err(e) => return Err(api_error(e)),
            }
        }
        Ok(id)
    }

    /// The pool's placement group `skyward-<pool>`, made with `strategy` (an earlier attempt's
    /// is reused: the name is the pool's).
    async fn placement_group(
        &self,
        region: &str,
        pool: &str,
        strategy: &str,
    ) -> Result<String, ProviderError> {
        let name = format!("skyward-{pool}");
        let created = self
            .client(region)
            .await
            .create_placement_group()
            .group_name(&name)
            .strategy(PlacementStrategy::from(strategy))
            .tag_specifications(tags(ResourceType::PlacementGroup, &[(POOL_TAG, pool)]))
            .send()
            .await;
        match created {
            Ok(_) => Ok(name),
            Err(e) if e.code() == Some("InvalidPlacementGroup.Duplicate") => Ok(name),
            Err(e) => Err(api_error(e)),
        }
    }

    /// The subnet an instance was launched in.
    async fn subnet_of(&self, region: &str, instance: &str) -> Result<String, ProviderError> {
        let out = self
            .client(region)
            .await
            .describe_instances()
            .instance_ids(instance)
            .send()
            .await
            .map_err(api_error)?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find_map(|i| i.subnet_id())
            .unwrap_or_default()
            .to_string())
    }

    async fn create_security_group(
        &self,
        region: &str,
        pool: &str,
        vpc: &str,
        reverse: Option<AgentPort>,
    ) -> Result<String, ProviderError> {
        let client = self.client(region).await;
        let created = client
            .create_security_group()
            .group_name(format!("skyward-{pool}"))
            // EC2 takes only `a-zA-Z0-9 ._-:/()#,@[]+=&;{}!$*` here (no apostrophe).
            .description(match reverse {
                None => format!("Skyward pool {pool}: traffic between the pool nodes only"),
                Some(r) => format!(
                    "Skyward pool {pool}: traffic between the pool nodes, and UDP {} from the coordinator",
                    r.port
                ),
            })
            .vpc_id(vpc)
            .tag_specifications(tags(ResourceType::SecurityGroup, &[(POOL_TAG, pool)]))
            .send()
            .await
            .map_err(api_error)?;
        let id = created.group_id().unwrap_or_default().to_string();
        client
            .authorize_security_group_ingress()
            .group_id(&id)
            .ip_permissions(
                IpPermission::builder()
                    .ip_protocol("-1")
                    .user_id_group_pairs(UserIdGroupPair::builder().group_id(&id).build())
                    .build(),
            )
            .send()
            .await
            .map_err(api_error)?;
        Ok(id)
    }

    /// The pool's instances that are not yet terminated, with their node tag and state.
    async fn pool_instances(
        &self,
        region: &str,
        pool: &str,
    ) -> Result<Vec<(String, String, InstanceStateName)>, ProviderError> {
        let mut pages = self
            .client(region)
            .await
            .describe_instances()
            .filters(filter(&format!("tag:{POOL_TAG}"), [pool]))
            .filters(filter(
                "instance-state-name",
                ["pending", "running", "stopping", "stopped", "shutting-down"],
            ))
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            for reservation in page.map_err(api_error)?.reservations() {
                for instance in reservation.instances() {
                    let node = instance
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some(NODE_TAG))
                        .and_then(|t| t.value())
                        .unwrap_or_default();
                    let state = instance
                        .state()
                        .and_then(|s| s.name())
                        .cloned()
                        .unwrap_or(InstanceStateName::Pending);
                    found.push((
                        instance.instance_id().unwrap_or_default().to_string(),
                        node.to_string(),
                        state,
                    ));
                }
            }
        }
        Ok(found)
    }
}

#[async_trait]
impl Provider for Aws {
    fn name(&self) -> &str {
        NAME
    }

    async fn offers(&self, spec: &PoolSpec) -> Result<Vec<Offer>, ProviderError> {
        // A spec's region is where to look; otherwise the configured one.
        let region = spec.region.as_deref().unwrap_or(&self.config.region);
        let zones = self.zones_by_type(region).await?;
        if zones.is_empty() {
            return Err(ProviderError::new(
                NAME,
                ErrorKind::NoOffers,
                format!("no instance types offered in {region}"),
            )
            .hint("try another region"));
        }
        let mut infos = Vec::new();
        let names: Vec<String> = zones.keys().cloned().collect();
        for chunk in names.chunks(100) {
            let out = self
                .client(region)
                .await
                .describe_instance_types()
                .set_instance_types(Some(
                    chunk
                        .iter()
                        .map(|t| InstanceType::from(t.as_str()))
                        .collect(),
                ))
                .send()
                .await
                .map_err(api_error)?;
            infos.extend(out.instance_types().iter().cloned());
        }
        let mut offers: Vec<Offer> = infos
            .iter()
            .filter_map(|info| {
                let kind = info.instance_type()?.as_str().to_string();
                let accelerator = accelerator_of(info);
                Some(Offer {
                    provider: NAME.into(),
                    region: region.to_string(),
                    instance_type: kind.clone(),
                    accelerator,
                    vcpus: info
                        .v_cpu_info()
                        .and_then(|v| v.default_v_cpus())
                        .unwrap_or(0) as u32,
                    memory_gb: info
                        .memory_info()
                        .and_then(|m| m.size_in_mib())
                        .unwrap_or(0) as f64
                        / 1024.0,
                    on_demand_per_hour: self.prices.price(&kind, region),
                    spot_per_hour: None,
                    available: true,
                    spot_available: None,
                    provider_ref: zones.get(&kind).map(|z| z.join(",")).unwrap_or_default(),
                })
            })
            .filter(|offer| spec.mismatch(offer).is_none())
            .collect();
        if spec.allocation.markets().contains(&Market::Spot) && !offers.is_empty() {
            let kinds: Vec<String> = offers.iter().map(|o| o.instance_type.clone()).collect();
            let spot = self.spot_prices(region, &kinds).await?;
            for offer in &mut offers {
                offer.spot_per_hour = spot
                    .iter()
                    .filter(|((kind, _), _)| *kind == offer.instance_type)
                    .map(|(_, price)| *price)
                    .min_by(f64::total_cmp);
            }
        }
        offers.sort_by(|a, b| a.instance_type.cmp(&b.instance_type));
        Ok(offers)
    }

    async fn provision(
        &self,
        request: &ProvisionRequest,
        offer: &Offer,
        market: Market,
    ) -> Result<Vec<Instance>, ProviderError> {
        let region = offer.region.as_str();
        self.regions_used
            .lock()
            .expect("regions lock")
            .insert(region.to_string());
        let zones: Vec<String> = offer
            .provider_ref
            .split(',')
            .filter(|z| !z.is_empty())
            .map(String::from)
            .collect();
        let image = match (&request.spec.image, &self.config.ami) {
            (Some(image), _) | (None, Some(image)) => image.clone(),
            (None, None) => {
                let patterns = match offer.accelerator.as_ref().map(|a| a.accelerator.kind) {
                    Some(DeviceKind::NvidiaGpu | DeviceKind::AmdGpu) => GPU_IMAGES,
                    Some(DeviceKind::AwsNeuron) => NEURON_IMAGES,
                    None => CPU_IMAGES,
                };
                self.find_image(region, patterns).await?
            }
        };
        let subnets = self.subnets(region, &zones).await?;
        let reverse = match &request.bootstrap.reverse {
            Some(reverse) => Some(AgentPort::of(reverse)?),
            None => None,
        };
        let group = self
            .security_group(region, &request.pool, &subnets[0].1, reverse)
            .await?;
        let placement = match &self.config.placement_group {
            Some(strategy) => Some(
                self.placement_group(region, &request.pool, strategy)
                    .await?,
            ),
            None => None,
        };
        let client = self.client(region).await;
        // Every EC2 node watches its metadata service for a spot interruption notice.
        let mut request = request.clone();
        request.bootstrap.spot_watch = Some("aws".into());
        let request = &request;
        let mut subnets = subnets;
        let mut created = Vec::new();
        for node in &request.nodes {
            let user_data = request.user_data(node);
            if user_data.len() > 16 * 1024 {
                return Err(ProviderError::new(
                    NAME,
                    ErrorKind::Invalid,
                    format!("user-data is {} bytes; EC2 takes 16 KiB", user_data.len()),
                ));
            }
            let mut node_tags: Vec<(String, String)> = request.tags(node);
            node_tags.push(("Name".into(), format!("{}-{}", request.pool, node.node_id)));
            let pairs: Vec<(&str, &str)> = node_tags
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            // One launch template per node (its user-data is its own), then an instant fleet
            // over every zone's subnet, so EC2 places it by the allocation strategy.
            let data = RequestLaunchTemplateData::builder()
                .image_id(&image)
                .user_data(base64::engine::general_purpose::STANDARD.encode(&user_data))
                // The lease ends in a shutdown: the instance then goes, not just stops.
                .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
                .tag_specifications(launch_tags(ResourceType::Instance, &pairs))
                .tag_specifications(launch_tags(ResourceType::Volume, &pairs));
            let mut data = with_network(data, &group, reverse);
            if let Some(name) = &placement {
                data = data.placement(
                    LaunchTemplatePlacementRequest::builder()
                        .group_name(name)
                        .build(),
                );
            }
            if let Some(disk) = request.spec.disk_gb {
                data = data.block_device_mappings(
                    LaunchTemplateBlockDeviceMappingRequest::builder()
                        .device_name("/dev/sda1")
                        .ebs(
                            LaunchTemplateEbsBlockDeviceRequest::builder()
                                .volume_size(disk as i32)
                                .delete_on_termination(true)
                                .build(),
                        )
                        .build(),
                );
            }
            let template = client
                .create_launch_template()
                .launch_template_name(format!("skyward-{}-{}", request.pool, node.node_id))
                .launch_template_data(data.build())
                .tag_specifications(tags(
                    ResourceType::LaunchTemplate,
                    &[(POOL_TAG, &request.pool)],
                ))
                .send()
                .await
                .map_err(api_error)?;
            let template_id = template
                .launch_template()
                .and_then(|t| t.launch_template_id())
                .unwrap_or_default()
                .to_string();
            let overrides = subnets
                .iter()
                .map(|(subnet, _)| {
                    FleetLaunchTemplateOverridesRequest::builder()
                        .instance_type(InstanceType::from(offer.instance_type.as_str()))
                        .subnet_id(subnet)
                        .build()
                })
                .collect();
            let capacity = TargetCapacitySpecificationRequest::builder()
                .total_target_capacity(1)
                .default_target_capacity_type(match market {
                    Market::Spot => DefaultTargetCapacityType::Spot,
                    Market::OnDemand => DefaultTargetCapacityType::OnDemand,
                })
                .build();
            let fleet = client
                .create_fleet()
                .r#type(FleetType::Instant)
                .target_capacity_specification(capacity)
                .spot_options(
                    SpotOptionsRequest::builder()
                        .allocation_strategy(SpotAllocationStrategy::from(
                            self.config.allocation_strategy.as_str(),
                        ))
                        .build(),
                )
                .on_demand_options(
                    OnDemandOptionsRequest::builder()
                        .allocation_strategy(FleetOnDemandAllocationStrategy::LowestPrice)
                        .build(),
                )
                .launch_template_configs(
                    FleetLaunchTemplateConfigRequest::builder()
                        .launch_template_specification(
                            FleetLaunchTemplateSpecificationRequest::builder()
                                .launch_template_id(&template_id)
                                .version("$Latest")
                                .build(),
                        )
                        .set_overrides(Some(overrides))
                        .build(),
                )
                .tag_specifications(tags(ResourceType::Instance, &pairs))
                .send()
                .await
                .map_err(api_error)?;
            let ids: Vec<String> = fleet
                .instances()
                .iter()
                .flat_map(|i| i.instance_ids().iter().cloned())
                .collect();
            let Some(id) = ids.into_iter().next() else {
                let (code, message) = fleet
                    .errors()
                    .first()
                    .map(|e| {
                        (
                            e.error_code().unwrap_or("unknown"),
                            e.error_message().unwrap_or(""),
                        )
                    })
                    .unwrap_or(("unknown", "the fleet started no instance"));
                return Err(run_error(
                    code,
                    message,
                    &offer.instance_type,
                    &request.pool,
                    market,
                ));
            };
            if subnets.len() > 1 && request.nodes.len() > 1 {
                // The nodes talk to each other (NCCL, a cluster placement group): the rest
                // go where the first one went.
                let subnet = self.subnet_of(region, &id).await?;
                if subnets.iter().any(|(s, _)| *s == subnet) {
                    subnets.retain(|(s, _)| *s == subnet);
                }
            }
            created.push(Instance {
                node_id: node.node_id.clone(),
                provider_id: id,
                address: None,
            });
        }
        // Wait (bounded) for every instance to run; one that terminates instead failed.
        let mut poller = STATE_POLLING.start();
        loop {
            let states = self.pool_instances(region, &request.pool).await?;
            let mine: Vec<&(String, String, InstanceStateName)> = states
                .iter()
                .filter(|(id, ..)| created.iter().any(|c| c.provider_id == *id))
                .collect();
            if mine.len() < created.len() {
                return Err(ProviderError::new(
                    NAME,
                    ErrorKind::Capacity,
                    "an instance terminated before running",
                )
                .hint(
                    "spot capacity may have been reclaimed: try spot-if-available or another zone",
                ));
            }
            if mine
                .iter()
                .all(|(_, _, state)| *state == InstanceStateName::Running)
            {
                return Ok(created);
            }
            if !poller.pause().await {
                return Err(ProviderError::new(
                    NAME,
                    ErrorKind::Api,
                    "instances did not reach running in time",
                ));
            }
        }
    }

    async fn failed_nodes(&self, pool: &str) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for region in self.regions_to_search() {
            failed.extend(self.failed_in(&region, pool).await);
        }
        failed
    }

    async fn teardown(&self, pool: &str) -> Result<(), ProviderError> {
        for region in self.regions_to_search() {
            self.teardown_in(&region, pool).await?;
        }
        Ok(())
    }

    async fn terminate(&self, pool: &str, node_id: &str) -> Result<(), ProviderError> {
        for region in self.regions_to_search() {
            let ids: Vec<String> = self
                .pool_instances(&region, pool)
                .await?
                .into_iter()
                .filter(|(_, node, state)| {
                    node == node_id && *state != InstanceStateName::ShuttingDown
                })
                .map(|(id, ..)| id)
                .collect();
            if !ids.is_empty() {
                self.client(&region)
                    .await
                    .terminate_instances()
                    .set_instance_ids(Some(ids))
                    .send()
                    .await
                    .map_err(api_error)?;
            }
        }
        Ok(())
    }

    fn supports_reverse(&self) -> bool {
        true
    }

    async fn pools(&self) -> Result<Vec<String>, ProviderError> {
        let mut pools = std::collections::BTreeSet::new();
        for region in self.regions_to_search() {
            let mut pages = self
                .client(&region)
                .await
                .describe_instances()
                .filters(filter("tag-key", [POOL_TAG]))
                .filters(filter(
                    "instance-state-name",
                    ["pending", "running", "stopping", "stopped", "shutting-down"],
                ))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                for reservation in page.map_err(api_error)?.reservations() {
                    for instance in reservation.instances() {
                        pools.extend(
                            instance
                                .tags()
                                .iter()
                                .filter(|t| t.key() == Some(POOL_TAG))
                                .filter_map(|t| t.value().map(str::to_string)),
                        );
                    }
                }
            }
        }
        Ok(pools.into_iter().collect())
    }

    async fn listen_addresses(
        &self,
        pool: &str,
        reverse: &Reverse,
    ) -> Result<Vec<(String, SocketAddr)>, ProviderError> {
        // The coordinator's address family decides which public address of a node to dial.
        let reverse = AgentPort::of(reverse)?;
        let mut found = Vec::new();
        for region in self.regions_to_search() {
            let mut pages = self
                .client(&region)
                .await
                .describe_instances()
                .filters(filter(&format!("tag:{POOL_TAG}"), [pool]))
                .filters(filter("instance-state-name", ["running"]))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                for reservation in page.map_err(api_error)?.reservations() {
                    for instance in reservation.instances() {
                        let node = instance
                            .tags()
                            .iter()
                            .find(|t| t.key() == Some(NODE_TAG))
                            .and_then(|t| t.value());
                        if let (Some(node), Some(address)) = (node, reverse.address_of(instance)) {
                            found.push((node.to_string(), address));
                        }
                    }
                }
            }
        }
        Ok(found)
    }

    async fn status(&self) -> ProviderStatus {
        let region = self.config.region.as_str();
        let client = self.client(region).await;
        // Without credentials the SDK fails with a dispatch error, not an auth one: ask the
        // credential chain first, so that "not configured" says what to set.
        use aws_sdk_ec2::config::ProvideCredentials;
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .load()
            .await;
        let credentials = match sdk.credentials_provider() {
            Some(chain) => chain.provide_credentials().await.map(drop).is_ok(),
            None => false,
        };
        if !credentials {
            return ProviderStatus {
                provider: NAME.into(),
                configured: false,
                working: false,
                detail: "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run `aws configure`".into(),
            };
        }
        let (configured, working, detail) = match client.describe_regions().send().await {
            Ok(_) => (
                true,
                true,
                format!(
                    "region {region}; on-demand prices as of {} ({})",
                    self.prices.as_of, self.prices.source
                ),
            ),
            Err(e) => {
                let error = api_error(e);
                (error.kind != ErrorKind::Auth, false, error.to_string())
            }
        };
        ProviderStatus {
            provider: NAME.into(),
            configured,
            working,
            detail,
        }
    }
}

impl Aws {
    async fn failed_in(&self, region: &str, pool: &str) -> Vec<(String, String)> {
        match self.pool_instances(region, pool).await {
            Ok(instances) => instances
                .into_iter()
                .filter(|(_, _, state)| {
                    matches!(
                        state,
                        InstanceStateName::ShuttingDown
                            | InstanceStateName::Stopped
                            | InstanceStateName::Stopping
                    )
                })
                .map(|(id, node, state)| (node, format!("instance {id} is {}", state.as_str())))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Terminates the pool's instances in `region`, then its launch templates and group.
    /// Removes what pool `pool` made in `region`, as independent steps: its instances, its
    /// launch templates, its placement group (only when the pool asks for one: a user
    /// without that permission who asked for none is never refused there) and its security
    /// group. A failed step does not stop the others; the error names each one that failed.
    async fn teardown_in(&self, region: &str, pool: &str) -> Result<(), ProviderError> {
        let client = self.client(region).await;
        let client = &client;
        let mut teardown = Teardown::new(NAME, pool);
        teardown
            .step("terminating its instances", || {
                self.terminate_instances(region, pool)
            })
            .await;
        teardown
            .step("deleting its launch templates", || async move {
                let templates = client
                    .describe_launch_templates()
                    .filters(filter(&format!("tag:{POOL_TAG}"), [pool]))
                    .send()
                    .await
                    .map_err(api_error)?;
                for template in templates.launch_templates() {
                    if let Some(id) = template.launch_template_id() {
                        client
                            .delete_launch_template()
                            .launch_template_id(id)
                            .send()
                            .await
                            .map_err(api_error)?;
                    }
                }
                Ok(())
            })
            .await;
        if self.config.placement_group.is_some() {
            teardown
                .step("deleting its placement group", || async move {
                    let groups = client
                        .describe_placement_groups()
                        .filters(filter(&format!("tag:{POOL_TAG}"), [pool]))
                        .send()
                        .await
                        .map_err(api_error)?;
                    for group in groups.placement_groups() {
                        let Some(name) = group.group_name() else {
                            continue;
                        };
                        retry_while_in_use("InvalidPlacementGroup.InUse", || {
                            client.delete_placement_group().group_name(name).send()
                        })
                        .await?;
                    }
                    Ok(())
                })
                .await;
        }
        teardown
            .step("deleting its security group", || async move {
                let groups = client
                    .describe_security_groups()
                    .filters(filter(&format!("tag:{POOL_TAG}"), [pool]))
                    .send()
                    .await
                    .map_err(api_error)?;
                // The group can only go once no instance uses it: retry while EC2 says so.
                for group in groups.security_groups() {
                    let Some(id) = group.group_id() else { continue };
                    retry_while_in_use("DependencyViolation", || {
                        client.delete_security_group().group_id(id).send()
                    })
                    .await?;
                }
                Ok(())
            })
            .await;
        teardown.finish()
    }

    /// Terminates the pool's instances in `region` and waits (bounded) until EC2 says each
    /// is shutting down.
    async fn terminate_instances(&self, region: &str, pool: &str) -> Result<(), ProviderError> {
        let client = self.client(region).await;
        let instances = self.pool_instances(region, pool).await?;
        let ids: Vec<String> = instances.iter().map(|(id, ..)| id.clone()).collect();
        if !ids.is_empty() {
            client
                .terminate_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
                .map_err(api_error)?;
        }
        let mut poller = STATE_POLLING.start();
        while !self
            .pool_instances(region, pool)
            .await?
            .iter()
            .all(|(_, _, state)| *state == InstanceStateName::ShuttingDown)
        {
            if !poller.pause().await {
                return Err(ProviderError::new(
                    NAME,
                    ErrorKind::Api,
                    format!("instances of pool {pool} still running after terminate"),
                ));
            }
        }
        Ok(())
    }
}

/// Runs a delete, and again as [`IN_USE_POLLING`] says while EC2 answers `code`: what is
/// deleted can only go once the pool's instances are gone.
async fn retry_while_in_use<T, E, R, F>(
    code: &str,
    mut delete: impl FnMut() -> F,
) -> Result<(), ProviderError>
where
    F: std::future::Future<Output = Result<T, aws_sdk_ec2::error::SdkError<E, R>>>,
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let mut poller = IN_USE_POLLING.start();
    loop {
        match delete().await {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(code) && poller.pause().await => {}
            Err(e) => return Err(api_error(e)),
        }
    }
}

/// The accelerators of an instance type, through the catalog.
fn accelerator_of(info: &aws_sdk_ec2::types::InstanceTypeInfo) -> Option<OfferedAccelerator> {
    if let Some(gpu) = info.gpu_info().and_then(|g| g.gpus().first()) {
        let memory_gb = gpu
            .memory_info()
            .and_then(|m| m.size_in_mib())
            .map(|mib| mib as f64 / 1024.0);
        let accelerator = catalog::identify(gpu.name()?, memory_gb)?;
        return Some(OfferedAccelerator {
            accelerator,
            count: gpu.count().unwrap_or(1).max(1) as u32,
        });
    }
    // Neuron devices: by instance family (trn1, trn2, inf1, inf2).
    let kind = info.instance_type()?.as_str();
    let (family, _) = kind.split_once('.')?;
    let name = match family {
        "trn1" | "trn1n" => "Trainium",
        "trn2" => "Trainium2",
        "inf1" => "Inferentia",
        "inf2" => "Inferentia2",
        _ => return None,
    };
    let count = info
        .neuron_info()
        .and_then(|n| n.neuron_devices().first())
        .and_then(|d| d.count())
        .unwrap_or(1)
        .max(1) as u32;
    Some(OfferedAccelerator {
        accelerator: catalog::find(name).ok()?,
        count,
    })
}

fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(String::from).collect()))
        .build()
}

fn tags(resource: ResourceType, pairs: &[(&str, &str)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(resource)
        .set_tags(Some(
            pairs
                .iter()
                .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                .collect(),
        ))
        .build()
}

/// An SDK error as a provider error, classified by EC2's error code (never its message).
fn api_error<E, R>(error: aws_sdk_ec2::error::SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = error.code().map(str::to_string);
    let message = error.message().map(str::to_string);
    match (code.as_deref(), message) {
        (Some(code), message) => {
            let kind = classify(code);
            let text = format!("{code}: {}", message.unwrap_or_default());
            let error = ProviderError::new(NAME, kind, text);
            match kind {
                ErrorKind::Auth => error.hint("check the AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or `aws configure`)"),
                _ => error,
            }
        }
        (None, _) => ProviderError::new(
            NAME,
            ErrorKind::Api,
            format!(
                "cannot reach EC2: {}",
                aws_sdk_ec2::error::DisplayErrorContext(&error)
            ),
        )
        .hint("check the network, AWS_REGION and AWS_ENDPOINT_URL"),
    }
}

fn classify(code: &str) -> ErrorKind {
    match code {
        "InsufficientInstanceCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientCapacity"
        | "SpotMaxPriceTooLow"
        | "InsufficientFreeAddressesInSubnet"
        | "Unsupported" => ErrorKind::Capacity,
        "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "MaxSpotInstanceCountExceeded"
        | "PendingVerification" => ErrorKind::Quota,
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "OptInRequired"
        | "Blocked" => ErrorKind::Auth,
        code if code.starts_with("Invalid") => ErrorKind::Invalid,
        _ => ErrorKind::Api,
    }
}

/// A fleet's launch error, with what to try for the common ones.
fn run_error(
    code: &str,
    message: &str,
    instance_type: &str,
    pool: &str,
    market: Market,
) -> ProviderError {
    let kind = classify(code);
    let error = ProviderError::new(NAME, kind, format!("{code}: {message}"));
    match kind {
        ErrorKind::Capacity => ProviderError {
            message: format!("No instances available: {instance_type} ({market}) for pool {pool}: {code}: {message}"),
            ..error
        }
        .hint("try another region, --allocation spot-if-available, or ask AWS for more quota"),
        ErrorKind::Quota => error.hint("raise the EC2 quota for this instance family (Service Quotas) or use another type"),
        ErrorKind::Auth => error.hint("check the AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or `aws configure`)"),
        _ => error,
    }
}

fn launch_tags(
    resource: ResourceType,
    pairs: &[(&str, &str)],
) -> LaunchTemplateTagSpecificationRequest {
    LaunchTemplateTagSpecificationRequest::builder()
        .resource_type(resource)
        .set_tags(Some(
            pairs
                .iter()
                .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                .collect(),
        ))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::AGENT_PORT;

    #[test]
    fn error_codes_classify() {
        assert_eq!(
            classify("InsufficientInstanceCapacity"),
            ErrorKind::Capacity
        );
        assert_eq!(classify("VcpuLimitExceeded"), ErrorKind::Quota);
        assert_eq!(classify("AuthFailure"), ErrorKind::Auth);
        assert_eq!(classify("InvalidAMIID.NotFound"), ErrorKind::Invalid);
        assert_eq!(classify("RequestLimitExceeded"), ErrorKind::Api);
    }

    fn agent_port(allow_from: &str) -> AgentPort {
        AgentPort::of(&Reverse {
            agent_port: AGENT_PORT,
            allow_from: Some(allow_from.parse().unwrap()),
        })
        .unwrap()
    }

    #[test]
    fn the_agent_port_opens_to_the_coordinator_address_alone() {
        let rule = agent_port("198.51.100.7").rule();
        assert_eq!(rule.ip_protocol(), Some("udp"));
        assert_eq!((rule.from_port(), rule.to_port()), (Some(7444), Some(7444)));
        let sources: Vec<_> = rule.ip_ranges().iter().map(|r| r.cidr_ip()).collect();
        assert_eq!(sources, [Some("198.51.100.7/32")]);
        assert!(rule.ipv6_ranges().is_empty() && rule.user_id_group_pairs().is_empty());

        let rule = agent_port("2001:db8::7").rule();
        let sources: Vec<_> = rule.ipv6_ranges().iter().map(|r| r.cidr_ipv6()).collect();
        assert_eq!(sources, [Some("2001:db8::7/128")]);
        assert!(rule.ip_ranges().is_empty());

        // An IPv4 address written as IPv6 is still the IPv4 address traffic comes from.
        let rule = agent_port("::ffff:198.51.100.7").rule();
        assert_eq!(rule.ip_ranges()[0].cidr_ip(), Some("198.51.100.7/32"));
    }

    #[test]
    fn reverse_without_the_coordinator_address_is_refused() {
        let error = AgentPort::of(&Reverse {
            agent_port: AGENT_PORT,
            allow_from: None,
        })
        .unwrap_err();
        assert_eq!(error.kind, ErrorKind::Invalid);
        assert!(error.to_string().contains("--public-ip"), "{error}");
    }

    #[test]
    fn a_running_instance_is_dialed_at_its_public_address_of_the_coordinator_family() {
        use aws_sdk_ec2::types::{Instance as Ec2Instance, InstanceState};
        let instance = |state: InstanceStateName| {
            Ec2Instance::builder()
                .state(InstanceState::builder().name(state).build())
                .public_ip_address("203.0.113.9")
                .ipv6_address("2001:db8::9")
                .private_ip_address("10.0.0.9")
                .build()
        };
        let running = instance(InstanceStateName::Running);
        assert_eq!(
            agent_port("198.51.100.7").address_of(&running),
            Some("203.0.113.9:7444".parse().unwrap())
        );
        assert_eq!(
            agent_port("2001:db8::7").address_of(&running),
            Some("[2001:db8::9]:7444".parse().unwrap())
        );
        let pending = instance(InstanceStateName::Pending);
        assert_eq!(agent_port("198.51.100.7").address_of(&pending), None);
        let private_only = Ec2Instance::builder()
            .state(
                InstanceState::builder()
                    .name(InstanceStateName::Running)
                    .build(),
            )
            .private_ip_address("10.0.0.9")
            .build();
        assert_eq!(agent_port("198.51.100.7").address_of(&private_only), None);
    }

    #[test]
    fn reverse_nodes_get_a_public_address_on_an_interface_in_the_pool_group() {
        let forward = with_network(RequestLaunchTemplateData::builder(), "sg-1", None).build();
        assert_eq!(forward.security_group_ids(), ["sg-1"]);
        assert!(forward.network_interfaces().is_empty());

        let reverse = with_network(
            RequestLaunchTemplateData::builder(),
            "sg-1",
            Some(agent_port("198.51.100.7")),
        )
        .build();
        // EC2 refuses groups both on the template and on an interface.
        assert!(reverse.security_group_ids().is_empty());
        let interface = &reverse.network_interfaces()[0];
        assert_eq!(interface.device_index(), Some(0));
        assert_eq!(interface.groups(), ["sg-1"]);
        assert_eq!(interface.associate_public_ip_address(), Some(true));
        assert_eq!(interface.subnet_id(), None, "the fleet picks the subnet");

        let ipv6 = with_network(
            RequestLaunchTemplateData::builder(),
            "sg-1",
            Some(agent_port("2001:db8::7")),
        )
        .build();
        assert_eq!(ipv6.network_interfaces()[0].ipv6_address_count(), Some(1));
    }
}
