//! DigitalOcean: one droplet per node, from the sizes `GET /v2/sizes` lists, booted with the
//! node's user-data and tagged with its pool and node so that teardown finds them by tag.
//!
//! The API's shapes and traps (see `docs/cloud-apis.md` and the official OpenAPI spec):
//! - errors are `{"id", "message", "request_id"?}`; only the status and the `id` (any case)
//!   decide what an error means, never the message text;
//! - creating a droplet answers 202 with `status: "new"`; it is usable once `active`;
//! - listing by `tag_name` (and deleting by it) leaves out GPU droplets, which only
//!   `type=gpus` lists, and `type` cannot be combined with `tag_name`;
//! - in `networks.v4`, private entries may come first, with `"gateway": "nil"`;
//! - tags hold only letters, digits, `:`, `-` and `_`, at most 255 characters;
//! - 429 answers carry `ratelimit-reset` (Unix time) and sometimes `Retry-After`;
//! - a Cloud Firewall may only name tags that exist, its name must be unique in the account,
//!   and one without outbound rules blocks all outbound traffic;
//! - VPC names are unique in the account (letters, digits, `-` and `.`); a VPC that still has
//!   members (droplets that are going away count for a while) or is its region's default
//!   refuses deletion with 403; the first VPC made in a region without one becomes its
//!   default.
//!
//! Every pool's droplets are in a VPC of the pool's own, `skyward-<pool>` (see [`vpc_name`]),
//! made in the droplets' region before them (or reused from an earlier attempt of the same
//! pool there), so that multi-node training traffic stays between the pool's droplets.
//! Teardown finds it by name, after the droplets, and deletes it once it has no members.
//!
//! With `--reverse`, a pool gets a Cloud Firewall of its own (see [`firewall_request`]),
//! applied through the pool's tag and created before the droplets: the agent port is open to
//! the coordinator's address alone. Teardown finds it by name, after the droplets are gone.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::http::Retry;
use super::{
    ErrorKind, Instance, NodeBootstrap, Provider, ProviderError, ProviderStatus, ProvisionRequest,
    Teardown, NODE_TAG, POOL_TAG,
};
use crate::bootstrap::Reverse;
use skyward_core::catalog::{self, DeviceKind};
use skyward_core::offer::{Market, Offer, OfferedAccelerator};
use skyward_core::spec::PoolSpec;

const PROVIDER: &str = "digitalocean";
/// The public API; `DIGITALOCEAN_API_URL` or [`DigitalOceanConfig::api_url`] override it.
pub const DEFAULT_API_URL: &str = "https://api.digitalocean.com";
/// Where droplets go when the spec names no region.
pub const DEFAULT_REGION: &str = "nyc1";
/// The image of CPU droplets when the spec names none.
pub const DEFAULT_CPU_IMAGE: &str = "ubuntu-24-04-x64";
/// DigitalOcean refuses user-data over 64 KiB.
pub const USER_DATA_LIMIT: usize = 64 * 1024;
/// Tags: letters, digits, colons, dashes and underscores, at most 255 characters.
const TAG_LIMIT: usize = 255;
/// Droplet, firewall and VPC names: at most 255 characters.
const NAME_LIMIT: usize = 255;
/// A VPC's description: at most 255 characters.
const DESCRIPTION_LIMIT: usize = 255;
/// Error messages and names from the API, as they are quoted in ours.
const QUOTE_LIMIT: usize = 300;
/// How many of a VPC's members an error names.
const MEMBERS_NAMED: usize = 5;
/// Every port of a protocol, as firewall rules spell it.
const ALL_PORTS: &str = "0";

/// The largest page the API serves, and how many pages a listing may take.
const PER_PAGE: u32 = 200;
const MAX_PAGES: u32 = 50;
/// One HTTP exchange, and connecting for it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls are sent again as [`Retry`] says (4 sends at most); a 429 waits for the rate
/// limit's reset, 30 s at most.
const RETRY: Retry = Retry {
    tries: 4,
    first_backoff: Duration::from_millis(500),
    factor: 2.0,
    max_backoff: Duration::from_secs(8),
    max_wait: Duration::from_secs(30),
};
/// The first pause between polls; it doubles up to the configured poll interval.
const FIRST_POLL: Duration = Duration::from_millis(250);
/// The pool waits on `failed_nodes` every 100 ms; the API is asked at most this often.
const FAILED_CHECK_INTERVAL: Duration = Duration::from_secs(10);

const AUTH_HINT: &str = "check DIGITALOCEAN_TOKEN and that it has read/write scope";
const CAPACITY_HINT: &str = "try another region (--region) or another size";

/// Where and how to reach DigitalOcean. The token never appears in `Debug` output.
#[derive(Clone)]
pub struct DigitalOceanConfig {
    /// The region offers default to when the spec names none.
    pub region: String,
    /// The API's base URL; `None` is [`DEFAULT_API_URL`].
    pub api_url: Option<String>,
    /// A read/write API token.
    pub token: Option<String>,
    /// How long droplets get to become `active` after they are created.
    pub active_timeout: Duration,
    /// How long teardown waits for every droplet of a pool to be gone.
    pub teardown_timeout: Duration,
    /// The longest pause between two polls of the API.
    pub poll_interval: Duration,
}

impl Default for DigitalOceanConfig {
    fn default() -> Self {
        DigitalOceanConfig {
            region: DEFAULT_REGION.into(),
            api_url: None,
            token: None,
            active_timeout: Duration::from_secs(600),
            teardown_timeout: Duration::from_secs(180),
            poll_interval: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for DigitalOceanConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigitalOceanConfig")
            .field("region", &self.region)
            .field("api_url", &self.api_url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("active_timeout", &self.active_timeout)
            .field("teardown_timeout", &self.teardown_timeout)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

impl DigitalOceanConfig {
    /// Applies `--provider-opt digitalocean.KEY=VALUE` settings.
    pub fn apply(&mut self, mut settings: super::Settings) -> Result<(), String> {
        if let Some(region) = settings.take("region")? {
            self.region = region;
        }
        self.api_url = settings.take("api_url")?.or(self.api_url.take());
        settings.finish(&["region", "api_url"])
    }

    /// `DIGITALOCEAN_TOKEN`, `DIGITALOCEAN_API_URL` and `DIGITALOCEAN_REGION` from the
    /// environment; empty values count as unset.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        DigitalOceanConfig {
            region: var("DIGITALOCEAN_REGION").unwrap_or_else(|| DEFAULT_REGION.into()),
            api_url: var("DIGITALOCEAN_API_URL"),
            token: var("DIGITALOCEAN_TOKEN").map(|t| t.trim().to_string()),
            ..DigitalOceanConfig::default()
        }
    }
}

/// What the pool remembers between `failed_nodes` calls, so that the API is not polled at
/// the pool's pace.
#[derive(Default)]
struct FailedCheck {
    at: Option<Instant>,
    failed: Vec<(String, String)>,
}

pub struct DigitalOcean {
    config: DigitalOceanConfig,
    /// The API's base URL, or why it is unusable.
    base: Result<Url, String>,
    /// The HTTP client, or why none could be built.
    http: Result<reqwest::Client, String>,
    failed_checks: Mutex<HashMap<String, FailedCheck>>,
}

impl std::fmt::Debug for DigitalOcean {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigitalOcean")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl DigitalOcean {
    /// Never fails: a missing token or a bad URL is reported by every call that needs them
    /// (and by [`Provider::status`]), so that other providers stay usable.
    pub fn new(config: DigitalOceanConfig) -> Self {
        // reqwest finds rustls' process-wide provider; make sure there is one.
        skyward_common::install_crypto_provider();
        let base = super::http::http_base(
            config.api_url.as_deref().unwrap_or(DEFAULT_API_URL),
            "DigitalOcean API URL",
        );
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect could carry the token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("skyward/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"));
        DigitalOcean {
            config,
            base,
            http,
            failed_checks: Mutex::new(HashMap::new()),
        }
    }

    /// From `DIGITALOCEAN_TOKEN`, `DIGITALOCEAN_API_URL` (default
    /// `https://api.digitalocean.com`) and `DIGITALOCEAN_REGION` (default `nyc1`).
    pub fn from_env() -> Self {
        Self::new(DigitalOceanConfig::from_env())
    }

    pub fn config(&self) -> &DigitalOceanConfig {
        &self.config
    }

    fn error(kind: ErrorKind, message: impl Into<String>) -> ProviderError {
        ProviderError::new(PROVIDER, kind, message)
    }

    /// The client, base URL and token, or the error every call reports without them.
    fn ready(&self) -> Result<(&reqwest::Client, &Url, &str), ProviderError> {
        let token = self.config.token.as_deref().ok_or_else(|| {
            Self::error(ErrorKind::Auth, "DIGITALOCEAN_TOKEN is not set")
                .hint("export DIGITALOCEAN_TOKEN with a read/write API token")
        })?;
        let base = self.base.as_ref().map_err(|why| {
            Self::error(ErrorKind::Invalid, why.clone()).hint(
                "set DIGITALOCEAN_API_URL to an http(s) URL such as https://api.digitalocean.com",
            )
        })?;
        let http = self
            .http
            .as_ref()
            .map_err(|why| Self::error(ErrorKind::Api, why.clone()))?;
        Ok((http, base, token))
    }

    /// How this provider polls, for up to `limit`.
    fn polling(&self, limit: Duration) -> super::Polling {
        super::Polling {
            first: FIRST_POLL,
            max: self.config.poll_interval,
            limit,
        }
    }

    /// One API call: `path` under the base URL with `query`, an optional JSON body, sent again
    /// as [`RETRY`] says (a 429 after the rate limit resets). Returns the status and body of any
    /// 2xx answer and of a 404 when `allow_404`; every other answer is an error.
    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
        allow_404: bool,
    ) -> Result<(StatusCode, bytes::Bytes), ProviderError> {
        let allowed: &[StatusCode] = if allow_404 {
            &[StatusCode::NOT_FOUND]
        } else {
            &[]
        };
        self.call_allowing(what, method, path, query, body, allowed)
            .await
    }

    /// [`call`](Self::call), returning the status and body of any 2xx answer and of the
    /// `allowed` ones.
    async fn call_allowing(
        &self,
        what: &str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
        allowed: &[StatusCode],
    ) -> Result<(StatusCode, bytes::Bytes), ProviderError> {
        let (http, base, token) = self.ready()?;
        let api = super::http::Api {
            provider: PROVIDER,
            http,
            base,
            token,
            url_variable: "DIGITALOCEAN_API_URL",
        };
        let query: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let url = api.url("", path, &query);
        let idempotent = super::http::idempotent(&method);
        let asked =
            |headers: &reqwest::header::HeaderMap| rate_limit_wait(headers, SystemTime::now());
        let (status, bytes) = api
            .call(what, method.clone(), &url, body, idempotent, &RETRY, asked)
            .await?;
        match status.is_success() || allowed.contains(&status) {
            true => Ok((status, bytes)),
            false => Err(api_error(what, &method, path, status, &bytes)),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ProviderError> {
        let (_, bytes) = self
            .call(what, Method::GET, path, query, None, false)
            .await?;
        parse(what, &bytes)
    }

    /// Every page of a listing, following `links.pages.next` (its page number only: the
    /// host always stays the configured one).
    async fn list_all<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        query: &[(&str, String)],
        key: &str,
    ) -> Result<Vec<T>, ProviderError> {
        let mut items = Vec::new();
        let mut page = 1u32;
        for _ in 0..MAX_PAGES {
            let mut q: Vec<(&str, String)> = query.to_vec();
            q.push(("per_page", PER_PAGE.to_string()));
            q.push(("page", page.to_string()));
            let mut body: serde_json::Value = self.get_json(what, path, &q).await?;
            let list = body
                .get_mut(key)
                .map(serde_json::Value::take)
                .unwrap_or(serde_json::Value::Array(Vec::new()));
            let list: Vec<T> = serde_json::from_value(list).map_err(|e| {
                Self::error(
                    ErrorKind::Api,
                    format!("{what}: unexpected answer from DigitalOcean: {e}"),
                )
                .hint("DIGITALOCEAN_API_URL may point at something else than the DigitalOcean API")
            })?;
            let got = list.len();
            items.extend(list);
            let links: Links = body
                .get("links")
                .cloned()
                .and_then(|l| serde_json::from_value(l).ok())
                .unwrap_or_default();
            match links.next_page() {
                Some(next) if next > page && got > 0 => page = next,
                _ => return Ok(items),
            }
        }
        Err(Self::error(
            ErrorKind::Api,
            format!("{what}: more than {MAX_PAGES} pages of {PER_PAGE}"),
        )
        .hint("report this: the listing does not end"))
    }

    async fn sizes(&self) -> Result<Vec<Size>, ProviderError> {
        self.list_all("listing sizes", "/v2/sizes", &[], "sizes")
            .await
    }

    /// Every droplet of `pool`: those its tag lists, and the GPU droplets (which only
    /// `type=gpus` lists, and not together with `tag_name`) that carry its tag.
    async fn pool_droplets(&self, pool: &str) -> Result<Vec<Droplet>, ProviderError> {
        let tag = pool_tag(pool)?;
        let mut droplets: Vec<Droplet> = self
            .list_all(
                "listing the pool's droplets",
                "/v2/droplets",
                &[("tag_name", tag.clone())],
                "droplets",
            )
            .await?;
        let gpus: Vec<Droplet> = self
            .list_all(
                "listing GPU droplets",
                "/v2/droplets",
                &[("type", "gpus".to_string())],
                "droplets",
            )
            .await?;
        let seen: HashSet<u64> = droplets.iter().map(|d| d.id).collect();
        droplets.extend(
            gpus.into_iter()
                .filter(|d| d.tags.contains(&tag) && !seen.contains(&d.id)),
        );
        Ok(droplets)
    }

    async fn create(
        &self,
        request: &ProvisionRequest,
        node: &NodeBootstrap,
        offer: &Offer,
        image: &str,
        user_data: String,
        vpc_uuid: &str,
    ) -> Result<Droplet, ProviderError> {
        let tags = request
            .tags(node)
            .iter()
            .map(|(key, value)| tag(key, value))
            .collect::<Result<Vec<_>, _>>()?;
        let body = json!({
            "name": droplet_name(&request.pool, &node.node_id),
            "region": offer.region,
            "size": offer.instance_type,
            "image": image,
            "user_data": user_data,
            "tags": tags,
            "vpc_uuid": vpc_uuid,
        });
        let what = format!(
            "creating a {} droplet in {} for {}",
            offer.instance_type, offer.region, node.node_id
        );
        let (_, bytes) = self
            .call(&what, Method::POST, "/v2/droplets", &[], Some(&body), false)
            .await?;
        let created: DropletEnvelope = parse(&what, &bytes)?;
        Ok(created.droplet)
    }

    /// Polls each droplet until it is `active`, within the configured time; returns them as
    /// they were when found active, by id.
    async fn wait_active(
        &self,
        created: &[(String, u64)],
    ) -> Result<HashMap<u64, Droplet>, ProviderError> {
        let mut poller = self.polling(self.config.active_timeout).start();
        let mut pending: Vec<(String, u64)> = created.to_vec();
        let mut active = HashMap::new();
        loop {
            let mut still = Vec::new();
            for (node_id, id) in pending {
                let what = format!("checking droplet {id} ({node_id})");
                let (status, bytes) = self
                    .call(
                        &what,
                        Method::GET,
                        &format!("/v2/droplets/{id}"),
                        &[],
                        None,
                        true,
                    )
                    .await?;
                if status == StatusCode::NOT_FOUND {
                    return Err(Self::error(
                        ErrorKind::Capacity,
                        format!("droplet {id} ({node_id}) disappeared before it became active"),
                    )
                    .hint(CAPACITY_HINT));
                }
                let droplet = parse::<DropletEnvelope>(&what, &bytes)?.droplet;
                match droplet.status.as_str() {
                    "active" => {
                        tracing::info!(
                            node = %node_id,
                            droplet = id,
                            ip = public_ipv4(&droplet).unwrap_or("none"),
                            "droplet active"
                        );
                        active.insert(id, droplet);
                    }
                    "off" | "archive" => {
                        return Err(Self::error(
                            ErrorKind::Capacity,
                            format!(
                                "droplet {id} ({node_id}) is {} instead of starting",
                                droplet.status
                            ),
                        )
                        .hint(CAPACITY_HINT))
                    }
                    _ => still.push((node_id, id)),
                }
            }
            if still.is_empty() {
                return Ok(active);
            }
            if !poller.pause().await {
                let ids: Vec<String> = still.iter().map(|(_, id)| id.to_string()).collect();
                return Err(Self::error(
                    ErrorKind::Capacity,
                    format!(
                        "droplets {} not active after {}",
                        ids.join(", "),
                        humantime::format_duration(self.config.active_timeout)
                    ),
                )
                .hint(CAPACITY_HINT));
            }
            pending = still;
        }
    }

    async fn delete_by_id(&self, id: u64) -> Result<(), ProviderError> {
        self.call(
            &format!("deleting droplet {id}"),
            Method::DELETE,
            &format!("/v2/droplets/{id}"),
            &[],
            None,
            true,
        )
        .await
        .map(|_| ())
    }

    async fn check_failed(&self, pool: &str) -> Result<Vec<(String, String)>, ProviderError> {
        Ok(self
            .pool_droplets(pool)
            .await?
            .into_iter()
            .filter(|d| matches!(d.status.as_str(), "off" | "archive"))
            .map(|d| {
                let node = d.node_id().unwrap_or_else(|| d.name.clone());
                let why = format!("droplet {} ({}) is {}", d.id, d.name, d.status);
                (node, why)
            })
            .collect())
    }

    /// Creates the pool's Cloud Firewall (`body`, from [`firewall_request`]) after removing
    /// any left from an earlier attempt (names are unique in an account).
    async fn open_agent_port(
        &self,
        pool: &str,
        body: &serde_json::Value,
    ) -> Result<(), ProviderError> {
        let tag = pool_tag(pool)?;
        // A firewall may only name existing tags, and the droplets that would create the
        // pool's tag come after it. Creating an existing tag is harmless; should this fail,
        // the firewall's creation says why.
        if let Err(e) = self
            .call(
                &format!("creating the tag {tag}"),
                Method::POST,
                "/v2/tags",
                &[],
                Some(&json!({ "name": tag })),
                false,
            )
            .await
        {
            if e.kind != ErrorKind::Invalid {
                return Err(e);
            }
            tracing::debug!("{e}");
        }
        for leftover in self.pool_firewalls(pool).await? {
            self.delete_firewall(&leftover).await?;
        }
        let what = format!("creating the firewall of pool {pool}");
        let (_, bytes) = self
            .call(&what, Method::POST, "/v2/firewalls", &[], Some(body), false)
            .await?;
        let created: FirewallEnvelope = parse(&what, &bytes)?;
        if created.firewall.status == "failed" {
            return Err(Self::error(
                ErrorKind::Api,
                format!("{what}: firewall {} failed", created.firewall.id),
            )
            .hint(
                "try again; if it persists, look at the firewall in the DigitalOcean control panel",
            ));
        }
        tracing::info!(pool, firewall = %created.firewall.id, "agent port opened to the coordinator");
        Ok(())
    }

    /// The Cloud Firewalls of `pool`, found by name.
    async fn pool_firewalls(&self, pool: &str) -> Result<Vec<Firewall>, ProviderError> {
        let name = firewall_name(pool)?;
        let firewalls: Vec<Firewall> = self
            .list_all("listing firewalls", "/v2/firewalls", &[], "firewalls")
            .await?;
        Ok(firewalls.into_iter().filter(|f| f.name == name).collect())
    }

    async fn delete_firewall(&self, firewall: &Firewall) -> Result<(), ProviderError> {
        self.call(
            &format!("deleting firewall {} ({})", firewall.id, firewall.name),
            Method::DELETE,
            &format!("/v2/firewalls/{}", firewall.id),
            &[],
            None,
            true,
        )
        .await
        .map(|_| ())
    }

    /// Removes the pool's firewalls. A token that may not list firewalls cannot have made
    /// one either: that is no error.
    async fn delete_firewalls(&self, pool: &str) -> Result<(), ProviderError> {
        let firewalls = match self.pool_firewalls(pool).await {
            Ok(firewalls) => firewalls,
            Err(e) if e.kind == ErrorKind::Auth => {
                tracing::warn!("{e}");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for firewall in &firewalls {
            self.delete_firewall(firewall).await.map_err(|e| {
                e.hint(format!(
                    "delete the firewall {} in the DigitalOcean control panel, or run `doctl compute firewall delete {}`",
                    firewall.name, firewall.id
                ))
            })?;
        }
        Ok(())
    }

    /// Removes every droplet of `pool`, waiting (bounded) until they are gone.
    async fn delete_droplets(&self, pool: &str) -> Result<(), ProviderError> {
        let tag = pool_tag(pool)?;
        // Every non-GPU droplet of the pool at once; GPU droplets are deleted by id below.
        self.call(
            &format!("deleting the droplets tagged {tag}"),
            Method::DELETE,
            "/v2/droplets",
            &[("tag_name", tag.clone())],
            None,
            true,
        )
        .await?;
        let mut poller = self.polling(self.config.teardown_timeout).start();
        let mut deleted: HashSet<u64> = HashSet::new();
        loop {
            let left = self.pool_droplets(pool).await?;
            if left.is_empty() {
                return Ok(());
            }
            let mut last_error = None;
            for droplet in &left {
                if deleted.contains(&droplet.id) {
                    continue;
                }
                match self.delete_by_id(droplet.id).await {
                    Ok(()) => {
                        deleted.insert(droplet.id);
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            if !poller.pause().await {
                let ids: Vec<String> = left.iter().map(|d| d.id.to_string()).collect();
                let cause = last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                return Err(Self::error(
                    ErrorKind::Api,
                    format!(
                        "droplets {} of pool {pool} still exist after {}{cause}",
                        ids.join(", "),
                        humantime::format_duration(self.config.teardown_timeout)
                    ),
                )
                .hint(format!(
                    "delete them in the DigitalOcean control panel (tag {tag}), or run `doctl compute droplet delete --tag-name {tag}`; then the firewall {}, if the pool has one, and the VPC {}",
                    firewall_name(pool)?,
                    vpc_name(pool)?
                )));
            }
        }
    }

    /// The VPCs of `pool`, found by name (in any region: names are unique in the account).
    async fn pool_vpcs(&self, pool: &str) -> Result<Vec<Vpc>, ProviderError> {
        let name = vpc_name(pool)?;
        let vpcs: Vec<Vpc> = self
            .list_all("listing VPCs", "/v2/vpcs", &[], "vpcs")
            .await?;
        Ok(vpcs.into_iter().filter(|v| v.name == name).collect())
    }

    /// The id of `pool`'s VPC in `region` (`body`, from [`vpc_request`]): the one an earlier
    /// attempt of the pool left there, else a new one. The pool's VPC in another region goes
    /// first, as its name is taken.
    async fn ensure_vpc(
        &self,
        pool: &str,
        region: &str,
        body: &serde_json::Value,
    ) -> Result<String, ProviderError> {
        let mut reused = None;
        for vpc in self.pool_vpcs(pool).await? {
            if reused.is_none() && vpc.region.eq_ignore_ascii_case(region) {
                reused = Some(vpc.id);
            } else {
                self.delete_vpc(pool, &vpc).await?;
            }
        }
        if let Some(id) = reused {
            tracing::info!(pool, vpc = %id, region, "reusing the pool's VPC");
            return Ok(id);
        }
        let what = format!("creating the VPC of pool {pool} in {region}");
        let (_, bytes) = self
            .call(&what, Method::POST, "/v2/vpcs", &[], Some(body), false)
            .await
            .map_err(|e| match e.kind {
                ErrorKind::Invalid => {
                    let name = body["name"].as_str().unwrap_or_default();
                    e.hint(format!(
                        "VPC names are unique in the account: if a VPC {name} exists that Skyward cannot delete, delete it in the DigitalOcean control panel"
                    ))
                }
                _ => e,
            })?;
        let created: VpcEnvelope = parse(&what, &bytes)?;
        if created.vpc.default {
            tracing::warn!(
                pool,
                vpc = %created.vpc.id,
                region,
                "{region} had no default VPC, so DigitalOcean made the pool's VPC its default; it cannot be deleted at teardown"
            );
        }
        tracing::info!(pool, vpc = %created.vpc.id, region, "VPC created");
        Ok(created.vpc.id)
    }

    /// Deletes one VPC of `pool`, retrying (bounded) while DigitalOcean refuses because it
    /// still has members: droplets being deleted stay members for a while. A region's
    /// default VPC can never be deleted; it is left, with a warning.
    async fn delete_vpc(&self, pool: &str, vpc: &Vpc) -> Result<(), ProviderError> {
        if vpc.default {
            tracing::warn!(
                pool,
                vpc = %vpc.id,
                region = %vpc.region,
                "the VPC {} is its region's default VPC, which DigitalOcean never deletes: left in place",
                vpc.name
            );
            return Ok(());
        }
        let what = format!("deleting VPC {} ({})", vpc.name, vpc.id);
        let path = format!("/v2/vpcs/{}", vpc.id);
        let refused = [
            StatusCode::NOT_FOUND,
            StatusCode::FORBIDDEN,
            StatusCode::CONFLICT,
        ];
        let mut poller = self.polling(self.config.teardown_timeout).start();
        loop {
            let (status, bytes) = self
                .call_allowing(&what, Method::DELETE, &path, &[], None, &refused)
                .await?;
            if status.is_success() || status == StatusCode::NOT_FOUND {
                tracing::info!(pool, vpc = %vpc.id, "VPC deleted");
                return Ok(());
            }
            tracing::debug!(pool, vpc = %vpc.id, "VPC not deletable yet ({status}); retrying");
            if !poller.pause().await {
                let refusal = api_error(&what, &Method::DELETE, &path, status, &bytes).message;
                let members = match self.vpc_members(vpc).await {
                    Ok(members) if !members.is_empty() => {
                        let mut named: Vec<String> = members
                            .iter()
                            .take(MEMBERS_NAMED)
                            .map(|m| super::http::one_line(&format!("{} ({})", m.name, m.urn), 120))
                            .collect();
                        if members.len() > MEMBERS_NAMED {
                            named.push(format!("{} more", members.len() - MEMBERS_NAMED));
                        }
                        format!("; its members: {}", named.join(", "))
                    }
                    Ok(_) => String::new(),
                    Err(e) => format!("; listing its members failed: {}", e.message),
                };
                return Err(Self::error(
                    ErrorKind::Api,
                    format!(
                        "{refusal}; still refused after {}{members}",
                        humantime::format_duration(self.config.teardown_timeout)
                    ),
                )
                .hint(format!(
                    "delete what is left in the VPC {} of pool {pool}, then the VPC, in the DigitalOcean control panel, or run `doctl vpcs delete {}`",
                    vpc.name, vpc.id
                )));
            }
        }
    }

    /// What is still in `vpc`.
    async fn vpc_members(&self, vpc: &Vpc) -> Result<Vec<VpcMember>, ProviderError> {
        self.list_all(
            &format!("listing the members of VPC {}", vpc.id),
            &format!("/v2/vpcs/{}/members", vpc.id),
            &[],
            "members",
        )
        .await
    }

    /// Removes the pool's VPCs, found by name. A token that may not list VPCs cannot have
    /// made one either: that is no error.
    async fn delete_vpcs(&self, pool: &str) -> Result<(), ProviderError> {
        let vpcs = match self.pool_vpcs(pool).await {
            Ok(vpcs) => vpcs,
            Err(e) if e.kind == ErrorKind::Auth => {
                tracing::warn!("{e}");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for vpc in &vpcs {
            self.delete_vpc(pool, vpc).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for DigitalOcean {
    fn name(&self) -> &str {
        PROVIDER
    }

    async fn offers(&self, spec: &PoolSpec) -> Result<Vec<Offer>, ProviderError> {
        let sizes = self.sizes().await?;
        let mut offers = Vec::new();
        for size in sizes.into_iter().filter(|s| s.available) {
            let accelerator = match &size.gpu_info {
                None => None,
                Some(gpu) => match gpu.accelerator() {
                    Some(accelerator) => Some(accelerator),
                    None => {
                        tracing::debug!(size = %size.slug, model = %gpu.model, "unknown GPU model; size skipped");
                        continue;
                    }
                },
            };
            let regions: Vec<&String> = match &spec.region {
                Some(wanted) => size
                    .regions
                    .iter()
                    .filter(|r| r.eq_ignore_ascii_case(wanted))
                    .take(1)
                    .collect(),
                None => {
                    let home = &self.config.region;
                    size.regions
                        .iter()
                        .filter(|r| r.eq_ignore_ascii_case(home))
                        .chain(
                            size.regions
                                .iter()
                                .filter(|r| !r.eq_ignore_ascii_case(home)),
                        )
                        .collect()
                }
            };
            for region in regions {
                offers.push(Offer {
                    provider: PROVIDER.into(),
                    region: region.clone(),
                    instance_type: size.slug.clone(),
                    accelerator: accelerator.clone(),
                    vcpus: size.vcpus,
                    memory_gb: size.memory as f64 / 1024.0,
                    on_demand_per_hour: Some(size.price_hourly),
                    // DigitalOcean sells no spot capacity.
                    spot_per_hour: None,
                    available: true,
                    spot_available: None,
                    provider_ref: default_image(&size.slug, accelerator.as_ref()),
                });
            }
        }
        Ok(offers)
    }

    async fn provision(
        &self,
        request: &ProvisionRequest,
        offer: &Offer,
        market: Market,
    ) -> Result<Vec<Instance>, ProviderError> {
        if market == Market::Spot {
            return Err(
                Self::error(ErrorKind::NoOffers, "DigitalOcean sells no spot droplets")
                    .hint("use --allocation on-demand or spot-if-available"),
            );
        }
        self.ready()?;
        // The firewall's rules are checked before anything is created, too.
        let firewall = match &request.bootstrap.reverse {
            Some(reverse) => Some((
                reverse.agent_port,
                firewall_request(&request.pool, reverse)?,
            )),
            None => None,
        };
        let vpc_body = vpc_request(&request.pool, &offer.region)?;
        let image = request
            .spec
            .image
            .clone()
            .filter(|i| !i.trim().is_empty())
            .or_else(|| Some(offer.provider_ref.clone()).filter(|i| !i.is_empty()))
            .unwrap_or_else(|| default_image(&offer.instance_type, offer.accelerator.as_ref()));
        // Every node's user-data is checked before anything is created.
        let mut scripts = Vec::new();
        for node in &request.nodes {
            let user_data = request.user_data(node);
            if user_data.len() > USER_DATA_LIMIT {
                return Err(Self::error(
                    ErrorKind::Invalid,
                    format!(
                        "the user-data of {} is {} bytes, over DigitalOcean's 64 KiB limit",
                        node.node_id,
                        user_data.len()
                    ),
                )
                .hint("use an image with skyward-agent preinstalled, or have nodes download the agent instead of embedding it"));
            }
            scripts.push(user_data);
        }
        // The pool's own network: multi-node training talks droplet to droplet in it.
        let vpc = self
            .ensure_vpc(&request.pool, &offer.region, &vpc_body)
            .await?;
        if let Some((_, body)) = &firewall {
            self.open_agent_port(&request.pool, body).await?;
        }
        let mut created = Vec::new();
        for (node, user_data) in request.nodes.iter().zip(scripts) {
            let droplet = self
                .create(request, node, offer, &image, user_data, &vpc)
                .await?;
            tracing::info!(node = %node.node_id, droplet = droplet.id, status = %droplet.status, "droplet created");
            created.push((node.node_id.clone(), droplet.id));
        }
        let active = self.wait_active(&created).await?;
        Ok(created
            .into_iter()
            .map(|(node_id, id)| Instance {
                // Known now when the droplet already has its public address; else
                // `listen_addresses` gives it later.
                address: firewall.as_ref().and_then(|(agent_port, _)| {
                    listen_address(active.get(&id)?, *agent_port).map(|(_, address)| address)
                }),
                node_id,
                provider_id: id.to_string(),
            })
            .collect())
    }

    async fn failed_nodes(&self, pool: &str) -> Vec<(String, String)> {
        {
            let checks = self.failed_checks.lock().expect("failed checks lock");
            if let Some(check) = checks.get(pool) {
                if check
                    .at
                    .is_some_and(|at| at.elapsed() < FAILED_CHECK_INTERVAL)
                {
                    return check.failed.clone();
                }
            }
        }
        let failed = match self.check_failed(pool).await {
            Ok(failed) => failed,
            Err(e) => {
                tracing::warn!("checking the droplets of pool {pool}: {e}");
                Vec::new()
            }
        };
        let mut checks = self.failed_checks.lock().expect("failed checks lock");
        let check = checks.entry(pool.to_string()).or_default();
        check.at = Some(Instant::now());
        check.failed = failed.clone();
        failed
    }

    async fn teardown(&self, pool: &str) -> Result<(), ProviderError> {
        self.failed_checks
            .lock()
            .expect("failed checks lock")
            .remove(pool);
        // Independent steps, each tried whatever became of the others. The firewall and the
        // VPC go last: droplets that could not be deleted stay behind the firewall, and a VPC
        // cannot be deleted while it has members.
        let mut teardown = Teardown::new(PROVIDER, pool);
        teardown
            .step("deleting its droplets", || self.delete_droplets(pool))
            .await;
        teardown
            .step("deleting its firewall", || self.delete_firewalls(pool))
            .await;
        teardown
            .step("deleting its VPC", || self.delete_vpcs(pool))
            .await;
        teardown.finish()
    }

    async fn terminate(&self, pool: &str, node_id: &str) -> Result<(), ProviderError> {
        for droplet in self.pool_droplets(pool).await? {
            if droplet.node_id().as_deref() == Some(node_id) {
                self.delete_by_id(droplet.id).await?;
            }
        }
        Ok(())
    }

    fn supports_reverse(&self) -> bool {
        true
    }

    async fn pools(&self) -> Result<Vec<String>, ProviderError> {
        let mut droplets: Vec<Droplet> = self
            .list_all("listing droplets", "/v2/droplets", &[], "droplets")
            .await?;
        // GPU droplets are listed only on their own.
        droplets.extend(
            self.list_all::<Droplet>(
                "listing GPU droplets",
                "/v2/droplets",
                &[("type", "gpus".to_string())],
                "droplets",
            )
            .await?,
        );
        let pools: std::collections::BTreeSet<String> = droplets
            .iter()
            .flat_map(|d| d.tags.iter())
            .filter_map(|t| untag(POOL_TAG, t))
            .collect();
        Ok(pools.into_iter().collect())
    }

    async fn listen_addresses(
        &self,
        pool: &str,
        reverse: &Reverse,
    ) -> Result<Vec<(String, SocketAddr)>, ProviderError> {
        let agent_port = reverse.agent_port;
        Ok(self
            .pool_droplets(pool)
            .await?
            .iter()
            .filter_map(|droplet| listen_address(droplet, agent_port))
            .collect())
    }

    async fn status(&self) -> ProviderStatus {
        let mut status = ProviderStatus {
            provider: PROVIDER.into(),
            configured: self.config.token.is_some(),
            working: false,
            detail: String::new(),
        };
        if !status.configured {
            status.detail = "DIGITALOCEAN_TOKEN is not set: export a read/write API token".into();
            return status;
        }
        match self
            .get_json::<AccountEnvelope>("checking the token", "/v2/account", &[])
            .await
        {
            Ok(answer) => {
                status.working = true;
                let base = self
                    .base
                    .as_ref()
                    .map(super::http::base_display)
                    .unwrap_or_default();
                status.detail = match answer.account.status {
                    Some(account) => format!("token accepted by {base} (account {account})"),
                    None => format!("token accepted by {base}"),
                };
            }
            Err(e) => {
                status.detail = match &e.hint {
                    Some(hint) => format!("{}: {hint}", e.message),
                    None => e.message,
                }
            }
        }
        status
    }
}

// ---- API shapes (only the fields used; unknown fields are ignored) ----

#[derive(Debug, Default, Deserialize)]
struct Links {
    #[serde(default)]
    pages: Option<Pages>,
}

#[derive(Debug, Default, Deserialize)]
struct Pages {
    #[serde(default)]
    next: Option<String>,
}

impl Links {
    /// The page number `links.pages.next` points at.
    fn next_page(&self) -> Option<u32> {
        let next = self.pages.as_ref()?.next.as_deref()?;
        let url = Url::parse(next)
            .or_else(|_| Url::parse("http://placeholder.invalid").and_then(|b| b.join(next)))
            .ok()?;
        url.query_pairs()
            .find(|(k, _)| k == "page")
            .and_then(|(_, v)| v.parse().ok())
    }
}

#[derive(Debug, Deserialize)]
struct Size {
    slug: String,
    /// MiB.
    memory: u64,
    vcpus: u32,
    #[serde(default)]
    price_hourly: f64,
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default = "yes")]
    available: bool,
    #[serde(default)]
    gpu_info: Option<GpuInfo>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct GpuInfo {
    #[serde(default)]
    count: Option<u32>,
    #[serde(default)]
    model: String,
    #[serde(default)]
    vram: Option<Amount>,
}

#[derive(Debug, Deserialize)]
struct Amount {
    amount: f64,
    #[serde(default)]
    unit: String,
}

impl GpuInfo {
    fn accelerator(&self) -> Option<OfferedAccelerator> {
        let memory_gb = self
            .vram
            .as_ref()
            .map(|v| match v.unit.to_ascii_lowercase().as_str() {
                "mib" | "mb" => v.amount / 1024.0,
                "tib" | "tb" => v.amount * 1024.0,
                _ => v.amount,
            });
        Some(OfferedAccelerator {
            accelerator: catalog::identify(&self.model, memory_gb)?,
            count: self.count.unwrap_or(1).max(1),
        })
    }
}

#[derive(Debug, Deserialize)]
struct DropletEnvelope {
    droplet: Droplet,
}

#[derive(Debug, Deserialize)]
struct Droplet {
    id: u64,
    #[serde(default)]
    name: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    networks: Networks,
}

#[derive(Debug, Default, Deserialize)]
struct Networks {
    #[serde(default)]
    v4: Vec<NetworkV4>,
}

/// `gateway` is a string, and "nil" on private interfaces: it is never parsed as an address.
#[derive(Debug, Deserialize)]
struct NetworkV4 {
    #[serde(default)]
    ip_address: String,
    #[serde(rename = "type", default)]
    kind: String,
}

impl Droplet {
    /// The node id its node tag names.
    fn node_id(&self) -> Option<String> {
        self.tags.iter().find_map(|t| untag(NODE_TAG, t))
    }
}

/// The droplet's public IPv4 address, wherever it is in the list.
fn public_ipv4(droplet: &Droplet) -> Option<&str> {
    droplet
        .networks
        .v4
        .iter()
        .find(|n| n.kind == "public" && !n.ip_address.is_empty())
        .map(|n| n.ip_address.as_str())
}

/// Where the coordinator dials an active droplet's listening agent: its node id, and its
/// public IPv4 address with the agent port (the firewall opens that port there).
fn listen_address(droplet: &Droplet, agent_port: u16) -> Option<(String, SocketAddr)> {
    if droplet.status != "active" {
        return None;
    }
    let ip: Ipv4Addr = public_ipv4(droplet)?.parse().ok()?;
    Some((droplet.node_id()?, SocketAddr::from((ip, agent_port))))
}

#[derive(Debug, Deserialize)]
struct FirewallEnvelope {
    firewall: Firewall,
}

/// A Cloud Firewall; its rules are never read back (their `ports` come as strings or
/// numbers).
#[derive(Debug, Deserialize)]
struct Firewall {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    status: String,
}

#[derive(Debug, Deserialize)]
struct VpcEnvelope {
    vpc: Vpc,
}

#[derive(Debug, Deserialize)]
struct Vpc {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    region: String,
    /// The region's default VPC, which DigitalOcean never deletes.
    #[serde(default)]
    default: bool,
}

#[derive(Debug, Deserialize)]
struct VpcMember {
    #[serde(default)]
    name: String,
    #[serde(default)]
    urn: String,
}

#[derive(Debug, Deserialize)]
struct AccountEnvelope {
    account: Account,
}

#[derive(Debug, Deserialize)]
struct Account {
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    id: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    request_id: Option<String>,
}

// ---- helpers ----

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(bytes).map_err(|e| {
        DigitalOcean::error(
            ErrorKind::Api,
            format!("{what}: unexpected answer from DigitalOcean: {e}"),
        )
        .hint("DIGITALOCEAN_API_URL may point at something else than the DigitalOcean API")
    })
}

/// How long a 429 asks to wait: `Retry-After` (seconds) where the answer has it, else until
/// `ratelimit-reset` (Unix seconds); at least a quarter second. `None` when it says neither.
fn rate_limit_wait(headers: &reqwest::header::HeaderMap, now: SystemTime) -> Option<Duration> {
    let number = |name: &str| -> Option<u64> {
        headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok()
    };
    let wait = if let Some(seconds) = number("retry-after") {
        Duration::from_secs(seconds)
    } else {
        let reset = number("ratelimit-reset")?;
        let now = now.duration_since(UNIX_EPOCH).ok()?;
        Duration::from_secs(reset).saturating_sub(now)
    };
    Some(wait.max(Duration::from_millis(250)))
}

/// Turns a failed answer into an error by its status and `id`, never by its message.
fn api_error(
    what: &str,
    method: &Method,
    path: &str,
    status: StatusCode,
    body: &[u8],
) -> ProviderError {
    let parsed: ApiErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let id = parsed.id.to_ascii_lowercase();
    let message = if parsed.message.trim().is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no message")
            .to_string()
    } else {
        super::http::one_line(parsed.message.trim().trim_end_matches('.'), QUOTE_LIMIT)
    };
    let request_id = parsed
        .request_id
        .map(|r| format!(", request {r}"))
        .unwrap_or_default();
    let code = if id.is_empty() {
        status.as_u16().to_string()
    } else {
        format!("{} {id}", status.as_u16())
    };
    let text = format!("{what}: {message} ({code}{request_id})");
    let creating = *method == Method::POST && path == "/v2/droplets";
    let error = |kind| DigitalOcean::error(kind, text.clone());
    match (status.as_u16(), id.as_str()) {
        (401, _) | (_, "unauthorized") => error(ErrorKind::Auth).hint(AUTH_HINT),
        (403, _) | (_, "forbidden") => error(ErrorKind::Auth).hint(AUTH_HINT),
        (429, _) | (_, "too_many_requests") => error(ErrorKind::Quota)
            .hint("DigitalOcean's rate limit (250 requests a minute, 5000 an hour): wait a minute and retry"),
        (422, _) | (_, "unprocessable_entity") if creating => {
            error(ErrorKind::Capacity).hint(CAPACITY_HINT)
        }
        (500..=599, _) | (_, "server_error") => {
            error(ErrorKind::Api).hint("DigitalOcean's API failed; try again in a few minutes")
        }
        (404, _) | (_, "not_found") => error(ErrorKind::Invalid)
            .hint("the resource does not exist; check the size, region and image slugs"),
        _ => error(ErrorKind::Invalid).hint("check the size, region and image (--image) asked for"),
    }
}

/// The image a size boots when the spec names none: the AI/ML-ready base image of GPU sizes
/// (`gpu-h100x1-80gb` -> `gpu-h100x1-base`, AMD sizes -> `gpu-amd-base`), Ubuntu otherwise.
fn default_image(size_slug: &str, accelerator: Option<&OfferedAccelerator>) -> String {
    match accelerator {
        None => DEFAULT_CPU_IMAGE.into(),
        Some(a) if a.accelerator.kind == DeviceKind::AmdGpu => "gpu-amd-base".into(),
        Some(_) => match size_slug.rsplit_once('-') {
            Some((stem, _)) if stem.starts_with("gpu-") => format!("{stem}-base"),
            _ => format!("{size_slug}-base"),
        },
    }
}

/// `key:value`, with the value escaped so that every tag is valid and no two values share
/// one: lower-case letters, digits and `-` stay, every other byte becomes `_` and two hex
/// digits.
pub fn tag(key: &str, value: &str) -> Result<String, ProviderError> {
    let mut tag = format!("{key}:");
    for byte in value.bytes() {
        if byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' {
            tag.push(byte as char);
        } else {
            tag.push_str(&format!("_{byte:02x}"));
        }
    }
    if tag.len() > TAG_LIMIT {
        return Err(DigitalOcean::error(
            ErrorKind::Invalid,
            format!("the tag for {key} {value:?} would be {} characters, over DigitalOcean's {TAG_LIMIT}", tag.len()),
        )
        .hint("use a shorter pool name"));
    }
    Ok(tag)
}

/// The value of a `key:value` tag made by [`tag`], if `tag` is one.
pub fn untag(key: &str, tag: &str) -> Option<String> {
    let escaped = tag.strip_prefix(key)?.strip_prefix(':')?;
    let mut bytes = Vec::with_capacity(escaped.len());
    let mut rest = escaped.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'_' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The tag every droplet of `pool` carries.
pub fn pool_tag(pool: &str) -> Result<String, ProviderError> {
    tag(POOL_TAG, pool)
}

/// The name of `pool`'s Cloud Firewall: `skyward-` and the pool name, escaped where needed.
pub fn firewall_name(pool: &str) -> Result<String, ProviderError> {
    pool_resource_name(pool, "firewall")
}

/// The name of `pool`'s VPC: `skyward-` and the pool name, escaped where needed.
pub fn vpc_name(pool: &str) -> Result<String, ProviderError> {
    pool_resource_name(pool, "VPC")
}

/// The body of `POST /v2/vpcs` for `pool`'s VPC in `region`; DigitalOcean picks an IP range
/// that overlaps none of the account's.
pub fn vpc_request(pool: &str, region: &str) -> Result<serde_json::Value, ProviderError> {
    let description: String = format!("Skyward pool {pool}")
        .chars()
        .take(DESCRIPTION_LIMIT)
        .collect();
    Ok(json!({
        "name": vpc_name(pool)?,
        "region": region,
        "description": description,
    }))
}

/// The name of a resource of `pool` (its firewall, its VPC): `skyward-` and the pool name
/// with every byte other than lower-case letters, digits and `-` written as `.` and two hex
/// digits, in the characters firewall and VPC names allow and such that no two pools share
/// one (names are unique in an account, and teardown finds them by it).
fn pool_resource_name(pool: &str, what: &str) -> Result<String, ProviderError> {
    let mut name = String::from("skyward-");
    for byte in pool.bytes() {
        if byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' {
            name.push(byte as char);
        } else {
            name.push_str(&format!(".{byte:02x}"));
        }
    }
    if name.len() > NAME_LIMIT {
        return Err(DigitalOcean::error(
            ErrorKind::Invalid,
            format!(
                "the {what} name for pool {pool:?} would be {} characters, over DigitalOcean's {NAME_LIMIT}",
                name.len()
            ),
        )
        .hint("use a shorter pool name"));
    }
    Ok(name)
}

/// The Cloud Firewall of a pool in reverse mode, applied to every droplet through the pool's
/// tag: inbound, UDP `agent_port` from the coordinator's address alone and everything from
/// the pool's own droplets (multi-node training talks node to node); outbound, everything
/// (a firewall with no outbound rules would block all of it).
pub fn firewall_request(pool: &str, reverse: &Reverse) -> Result<serde_json::Value, ProviderError> {
    let coordinator = match reverse.allow_from {
        Some(IpAddr::V4(ip)) => format!("{ip}/32"),
        // Agents listen on 0.0.0.0 and droplets are dialed at their IPv4 address: an IPv6
        // source would never be let in.
        Some(IpAddr::V6(ip)) => {
            return Err(DigitalOcean::error(
                ErrorKind::Invalid,
                format!("--public-ip {ip} is IPv6, but DigitalOcean droplets are dialed over IPv4"),
            )
            .hint("give --public-ip the IPv4 address this machine's traffic leaves from"))
        }
        None => {
            return Err(DigitalOcean::error(
                ErrorKind::Invalid,
                "--reverse needs the coordinator's public address to open the agent port to",
            )
            .hint("add --public-ip with the IPv4 address this machine's traffic leaves from"))
        }
    };
    let tag = pool_tag(pool)?;
    let from_pool = |protocol: &str| json!({"protocol": protocol, "ports": ALL_PORTS, "sources": {"tags": [tag]}});
    let to_anywhere = |protocol: &str| {
        json!({"protocol": protocol, "ports": ALL_PORTS,
            "destinations": {"addresses": ["0.0.0.0/0", "::/0"]}})
    };
    Ok(json!({
        "name": firewall_name(pool)?,
        "inbound_rules": [
            {"protocol": "udp", "ports": reverse.agent_port.to_string(),
                "sources": {"addresses": [coordinator]}},
            from_pool("tcp"),
            from_pool("udp"),
            from_pool("icmp"),
        ],
        "outbound_rules": [to_anywhere("tcp"), to_anywhere("udp"), to_anywhere("icmp")],
        "tags": [tag],
    }))
}

/// `<pool>-<node id>`, in the characters droplet names allow (letters, digits, `.`, `-`;
/// starting and ending with a letter or digit).
pub fn droplet_name(pool: &str, node_id: &str) -> String {
    let raw = format!("{pool}-{node_id}");
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut name: String = trimmed.chars().take(NAME_LIMIT).collect();
    while name.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        name.pop();
    }
    if name.is_empty() {
        "skyward-node".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_valid_and_round_trip() {
        for value in ["sky-0a1b2c3d", "Pool_1", "a:b c/ü", "", "node-7"] {
            let t = tag(POOL_TAG, value).unwrap();
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-:".contains(&b)),
                "{t}"
            );
            assert_eq!(untag(POOL_TAG, &t).as_deref(), Some(value), "{t}");
            assert_eq!(untag(NODE_TAG, &t), None);
        }
        assert_eq!(tag(POOL_TAG, "sky-1").unwrap(), "skyward-pool:sky-1");
        assert_ne!(tag(POOL_TAG, "A").unwrap(), tag(POOL_TAG, "a").unwrap());
        assert_ne!(tag(POOL_TAG, "a_b").unwrap(), tag(POOL_TAG, "a:b").unwrap());
        let long = tag(POOL_TAG, &"x".repeat(300)).unwrap_err();
        assert!(long.to_string().contains("shorter pool name"), "{long}");
    }

    #[test]
    fn droplet_names_follow_the_api_pattern() {
        assert_eq!(droplet_name("sky-1", "node-2"), "sky-1-node-2");
        assert_eq!(droplet_name("_my pool_", "node-1"), "my-pool--node-1");
        assert_eq!(droplet_name("___", "___"), "skyward-node");
        assert_eq!(droplet_name(&"a".repeat(300), "node-1").len(), 255);
    }

    #[test]
    fn default_images_follow_the_size() {
        let h100 = OfferedAccelerator {
            accelerator: catalog::find("H100").unwrap(),
            count: 1,
        };
        let mi300x = OfferedAccelerator {
            accelerator: catalog::find("MI300X").unwrap(),
            count: 1,
        };
        assert_eq!(default_image("s-4vcpu-8gb", None), "ubuntu-24-04-x64");
        assert_eq!(
            default_image("gpu-h100x1-80gb", Some(&h100)),
            "gpu-h100x1-base"
        );
        assert_eq!(
            default_image("gpu-h100x8-640gb", Some(&h100)),
            "gpu-h100x8-base"
        );
        assert_eq!(
            default_image("gpu-mi300x1-192gb", Some(&mi300x)),
            "gpu-amd-base"
        );
    }

    #[test]
    fn errors_are_classified_by_status_and_id_only() {
        let post = Method::POST;
        let get = Method::GET;
        let e = api_error(
            "x",
            &get,
            "/v2/sizes",
            StatusCode::UNAUTHORIZED,
            br#"{"id":"Unauthorized","message":"Unable to authenticate you"}"#,
        );
        assert_eq!(e.kind, ErrorKind::Auth);
        assert_eq!(e.hint.as_deref(), Some(AUTH_HINT));
        assert_eq!(
            e.to_string(),
            "digitalocean: x: Unable to authenticate you (401 unauthorized) (check DIGITALOCEAN_TOKEN and that it has read/write scope)"
        );
        let body = br#"{"id":"unprocessable_entity","message":"Size is not available in this region.","request_id":"r1"}"#;
        let e = api_error(
            "x",
            &post,
            "/v2/droplets",
            StatusCode::UNPROCESSABLE_ENTITY,
            body,
        );
        assert_eq!(e.kind, ErrorKind::Capacity);
        assert!(e.to_string().contains("request r1"), "{e}");
        // The same message with another status and id is no capacity error: text decides
        // nothing.
        let other = br#"{"id":"bad_request","message":"Size is not available in this region."}"#;
        let e = api_error("x", &post, "/v2/droplets", StatusCode::BAD_REQUEST, other);
        assert_eq!(e.kind, ErrorKind::Invalid);
        let e = api_error("x", &get, "/v2/sizes", StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(e.kind, ErrorKind::Api);
        assert!(e.to_string().contains("(502)"), "{e}");
    }

    #[test]
    fn rate_limit_waits_follow_the_headers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(rate_limit_wait(&headers, now), None);
        headers.insert("ratelimit-reset", "1002".parse().unwrap());
        assert_eq!(rate_limit_wait(&headers, now), Some(Duration::from_secs(2)));
        headers.insert("ratelimit-reset", "900".parse().unwrap());
        assert_eq!(
            rate_limit_wait(&headers, now),
            Some(Duration::from_millis(250))
        );
        // An explicit Retry-After wins over the hourly window's reset.
        headers.insert("ratelimit-reset", "4600".parse().unwrap());
        headers.insert("retry-after", "3".parse().unwrap());
        assert_eq!(rate_limit_wait(&headers, now), Some(Duration::from_secs(3)));
    }

    #[test]
    fn networks_with_private_entries_first_and_nil_gateways_parse() {
        let droplet: Droplet = serde_json::from_value(json!({
            "id": 7, "name": "n", "status": "active",
            "tags": ["skyward-pool:p", "skyward-node:node-3"],
            "networks": {"v4": [
                {"ip_address": "10.128.0.5", "netmask": "255.255.0.0", "gateway": "nil", "type": "private"},
                {"ip_address": "203.0.113.9", "netmask": "255.255.255.0", "gateway": "203.0.113.1", "type": "public"}
            ], "v6": []}
        }))
        .unwrap();
        assert_eq!(public_ipv4(&droplet), Some("203.0.113.9"));
        assert_eq!(droplet.node_id().as_deref(), Some("node-3"));
    }

    #[test]
    fn listen_addresses_are_public_ipv4_of_active_droplets_with_a_node_tag() {
        let droplet = |status: &str, tags: &[&str], v4: serde_json::Value| -> Droplet {
            serde_json::from_value(json!({
                "id": 7, "name": "n", "status": status, "tags": tags,
                "networks": {"v4": v4, "v6": []}
            }))
            .unwrap()
        };
        let private_first = json!([
            {"ip_address": "10.128.0.5", "netmask": "255.255.0.0", "gateway": "nil", "type": "private"},
            {"ip_address": "203.0.113.9", "netmask": "255.255.255.0", "gateway": "203.0.113.1", "type": "public"}
        ]);
        let tags = ["skyward-pool:p", "skyward-node:node-3"];
        assert_eq!(
            listen_address(&droplet("active", &tags, private_first.clone()), 7444),
            Some(("node-3".into(), "203.0.113.9:7444".parse().unwrap()))
        );
        assert_eq!(
            listen_address(&droplet("new", &tags, private_first.clone()), 7444),
            None
        );
        assert_eq!(
            listen_address(&droplet("active", &["skyward-pool:p"], private_first), 7444),
            None,
            "no node tag, no node to dial"
        );
        let private_only = json!([
            {"ip_address": "10.128.0.5", "netmask": "255.255.0.0", "gateway": "nil", "type": "private"}
        ]);
        assert_eq!(
            listen_address(&droplet("active", &tags, private_only), 7444),
            None,
            "a private address is never dialed"
        );
    }

    #[test]
    fn firewall_names_follow_the_api_pattern_and_differ_per_pool() {
        let valid = |name: &str| {
            name.len() >= 2
                && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        };
        assert_eq!(firewall_name("sky-1a2b").unwrap(), "skyward-sky-1a2b");
        let names: Vec<String> = ["a_b", "a.b", "A", "a", "a:b c/ü", ""]
            .iter()
            .map(|pool| firewall_name(pool).unwrap())
            .collect();
        for name in &names {
            assert!(valid(name), "{name}");
        }
        let distinct: HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        let long = firewall_name(&"_".repeat(100)).unwrap_err();
        assert!(long.to_string().contains("shorter pool name"), "{long}");
    }

    #[test]
    fn vpc_names_follow_the_api_pattern_and_ip_ranges_are_left_to_digitalocean() {
        // The spec's pattern for VPC names: ^[a-zA-Z0-9\-\.]+$
        let valid = |name: &str| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        };
        assert_eq!(vpc_name("sky-1a2b").unwrap(), "skyward-sky-1a2b");
        let names: Vec<String> = ["a_b", "a.b", "A", "a", "a:b c/ü", ""]
            .iter()
            .map(|pool| vpc_name(pool).unwrap())
            .collect();
        for name in &names {
            assert!(valid(name), "{name}");
        }
        let distinct: HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        let long = vpc_name(&"_".repeat(100)).unwrap_err();
        assert!(long.to_string().contains("VPC name"), "{long}");
        assert!(long.to_string().contains("shorter pool name"), "{long}");

        assert_eq!(
            vpc_request("sky-1", "tor1").unwrap(),
            json!({"name": "skyward-sky-1", "region": "tor1", "description": "Skyward pool sky-1"}),
            "no ip_range: DigitalOcean picks one that overlaps nothing of the account's"
        );
        // The longest pool name a VPC name allows makes a description over 255 characters:
        // it is cut there.
        let pool = "p".repeat(NAME_LIMIT - "skyward-".len());
        let body = vpc_request(&pool, "nyc1").unwrap();
        assert_eq!(body["name"].as_str().unwrap().len(), NAME_LIMIT);
        assert_eq!(
            body["description"].as_str().unwrap().chars().count(),
            DESCRIPTION_LIMIT
        );
    }

    #[test]
    fn api_error_messages_are_one_bounded_line() {
        let body = json!({"id": "forbidden", "message": format!("a\n{}", "x".repeat(1000))});
        let e = api_error(
            "x",
            &Method::DELETE,
            "/v2/vpcs/v",
            StatusCode::FORBIDDEN,
            body.to_string().as_bytes(),
        );
        assert!(!e.message.contains('\n'), "{e}");
        assert!(e.message.len() < QUOTE_LIMIT + 50, "{}", e.message.len());
    }

    #[test]
    fn the_firewall_opens_the_agent_port_to_the_coordinator_alone() {
        let reverse = Reverse {
            agent_port: 7444,
            allow_from: Some("198.51.100.7".parse().unwrap()),
        };
        let body = firewall_request("sky-1", &reverse).unwrap();
        assert_eq!(body["name"], "skyward-sky-1");
        assert_eq!(body["tags"], json!(["skyward-pool:sky-1"]));
        let inbound = body["inbound_rules"].as_array().unwrap();
        let from_addresses: Vec<&serde_json::Value> = inbound
            .iter()
            .filter(|r| r["sources"].get("addresses").is_some())
            .collect();
        assert_eq!(
            from_addresses,
            [&json!({"protocol": "udp", "ports": "7444",
                "sources": {"addresses": ["198.51.100.7/32"]}})],
            "the only rule open to an address"
        );
        for rule in inbound
            .iter()
            .filter(|r| r["sources"].get("tags").is_some())
        {
            assert_eq!(rule["sources"], json!({"tags": ["skyward-pool:sky-1"]}));
        }
        assert_eq!(inbound.len(), 4);
        // Outbound stays open: without outbound rules the droplets could send nothing.
        let outbound = body["outbound_rules"].as_array().unwrap();
        let protocols: Vec<&str> = outbound
            .iter()
            .map(|r| r["protocol"].as_str().unwrap())
            .collect();
        assert_eq!(protocols, ["tcp", "udp", "icmp"]);
        assert!(outbound.iter().all(|r| r["ports"] == "0"
            && r["destinations"] == json!({"addresses": ["0.0.0.0/0", "::/0"]})));

        let v6 = Reverse {
            allow_from: Some("2001:db8::7".parse().unwrap()),
            ..reverse.clone()
        };
        let e = firewall_request("sky-1", &v6).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.to_string().contains("IPv4"), "{e}");
        let none = Reverse {
            allow_from: None,
            ..reverse
        };
        let e = firewall_request("sky-1", &none).unwrap_err();
        assert!(e.to_string().contains("--public-ip"), "{e}");
    }

    #[test]
    fn next_links_give_page_numbers_only() {
        let links: Links = serde_json::from_value(json!({"pages": {
            "next": "https://elsewhere.example/v2/sizes?page=3&per_page=200", "last": "x"}}))
        .unwrap();
        assert_eq!(links.next_page(), Some(3));
        let links: Links = serde_json::from_value(json!({})).unwrap();
        assert_eq!(links.next_page(), None);
    }

    #[test]
    fn the_token_stays_out_of_debug_output() {
        let provider = DigitalOcean::new(DigitalOceanConfig {
            token: Some("dop_v1_secret".into()),
            ..DigitalOceanConfig::default()
        });
        let shown = format!("{provider:?}");
        assert!(!shown.contains("dop_v1_secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[tokio::test]
    async fn without_a_token_calls_fail_with_auth_and_status_says_why() {
        let provider = DigitalOcean::new(DigitalOceanConfig::default());
        let e = provider.offers(&PoolSpec::new(1)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Auth);
        assert!(
            e.to_string().contains("DIGITALOCEAN_TOKEN is not set"),
            "{e}"
        );
        let status = provider.status().await;
        assert!(!status.configured && !status.working);
        assert!(
            status.detail.contains("DIGITALOCEAN_TOKEN"),
            "{}",
            status.detail
        );
    }
}
