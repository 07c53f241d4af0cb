//! Verda (formerly DataCrunch): GPU and CPU instances through its REST API
//! (`https://api.verda.com/v1`), OAuth2 client credentials for auth.
//!
//! Offers are the instance types (`/instance-types`, prices as strings or numbers) in every
//! location (`/locations`, codes treated as data) with capacity from `/instance-availability`.
//! A node is a startup script (`/scripts`, the node's bootstrap) plus an instance that runs it,
//! tagged with the pool and node and naming the pool's SSH key (`/ssh-keys`: Verda creates no
//! instance without one; nobody holds its private half); teardown finds the pool's instances by
//! tag (hostname prefix as a fallback), deletes them with one `PUT /instances` action, then the
//! pool's scripts and its key. The API's shapes: `docs/cloud-apis.md#verda`.
//!
//! Reversed (`--reverse`), agents listen on their instance's public `ip` (null until it runs).
//! Verda's API has no firewall or security-group call, so there is no rule to open and the
//! agent port is reachable from anywhere: the agents' mutual TLS, pinned to the pool's CA,
//! is what keeps everyone else out.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::time::Instant;

use super::http::{retry_after, transient, Retry, Sent};
use super::{
    ErrorKind, Instance, NodeBootstrap, Provider, ProviderError, ProviderStatus, ProvisionRequest,
    NODE_TAG, POOL_TAG,
};
use skyward_core::catalog;
use skyward_core::offer::{Market, Offer, OfferedAccelerator};
use skyward_core::spec::PoolSpec;

const NAME: &str = "verda";
/// The public API, `/v1` included (as `VERDA_BASE_URL` spells it too).
pub const DEFAULT_BASE_URL: &str = "https://api.verda.com/v1";
/// The image nodes boot when the spec names none: Ubuntu with CUDA and Docker, from the API docs.
pub const DEFAULT_IMAGE: &str = "ubuntu-24.04-cuda-12.8-open-docker";
/// OS volume size when the spec names none, GB.
pub const DEFAULT_DISK_GB: u32 = 100;
/// Verda takes at most this many tags per instance.
const MAX_TAGS: usize = 10;
/// The largest response body read from the API.
const MAX_BODY: usize = 16 << 20;
/// Calls are sent again as [`Retry`] says: 4 sends at most, after `Retry-After` (30 s at
/// most) or 0.5 s doubling up to 4 s.
const RETRY: Retry = Retry {
    tries: 4,
    first_backoff: Duration::from_millis(500),
    factor: 2.0,
    max_backoff: Duration::from_secs(4),
    max_wait: Duration::from_secs(30),
};
/// Delete rounds before teardown gives up on instances the API keeps refusing to delete.
const DELETE_ROUNDS: u32 = 3;
/// Longest a hostname may be (one DNS label).
const MAX_HOSTNAME: usize = 63;

const CREDENTIALS_HINT: &str =
    "set VERDA_CLIENT_ID and VERDA_CLIENT_SECRET to a Verda API client's id and secret";
const REGION_HINT: &str = "drop --region to auto-discover";

/// Statuses of an instance that will never reach `running` by itself.
const FAILED_STATUSES: &[&str] = &[
    "error",
    "offline",
    "discontinued",
    "no_capacity",
    "notfound",
];
/// Statuses of an instance on its way out (or already gone).
const GONE_STATUSES: &[&str] = &["deleting", "deleted", "discontinued", "notfound"];

/// Where the Verda API is and who calls it. `None` fields take their defaults (or, for the
/// credentials, make every call fail with [`ErrorKind::Auth`] and a hint).
#[derive(Clone, Default)]
pub struct VerdaConfig {
    /// Only this location (e.g. `FIN-01`); `None` discovers every location the API lists.
    pub region: Option<String>,
    /// The API root, `/v1` included; default [`DEFAULT_BASE_URL`].
    pub base_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// The secret never appears in debug output.
impl std::fmt::Debug for VerdaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerdaConfig")
            .field("region", &self.region)
            .field("base_url", &self.base_url)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How long the provider waits for things, and how often it looks.
#[derive(Debug, Clone, Copy)]
pub struct VerdaTiming {
    /// The longest pause between two polls of an instance (polls start at 0.5 s and double).
    pub poll: Duration,
    /// How long instances get to reach `running`.
    pub boot_limit: Duration,
    /// How long deleted instances get to disappear from the listing.
    pub delete_limit: Duration,
    /// The least time between two listings for [`Provider::failed_nodes`], which the pool
    /// asks for many times a second while agents connect.
    pub failed_check: Duration,
}

impl Default for VerdaTiming {
    fn default() -> Self {
        VerdaTiming {
            poll: Duration::from_secs(5),
            boot_limit: Duration::from_secs(15 * 60),
            delete_limit: Duration::from_secs(5 * 60),
            failed_check: Duration::from_secs(10),
        }
    }
}

/// A string that never appears in debug output or logs.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug)]
struct Token {
    access: Secret,
    refresh: Option<Secret>,
    /// When to refresh: ahead of expiry by a minute, or half the lifetime when shorter.
    refresh_at: Instant,
}

/// The HTTP side: base URL, client, credentials and the cached token.
#[derive(Debug)]
struct Api {
    base: String,
    http: Result<reqwest::Client, String>,
    /// The client id and secret, or the error every call answers with.
    credentials: Result<(String, Secret), ProviderError>,
    token: tokio::sync::Mutex<Option<Token>>,
}

/// An answer with a success status.
struct Reply {
    status: StatusCode,
    body: String,
}

/// When `failed_nodes` last listed a pool's instances, and what it found.
type FailedCheck = (Instant, Vec<(String, String)>);

/// The Verda provider.
pub struct Verda {
    api: Arc<Api>,
    region: Option<String>,
    timing: VerdaTiming,
    /// The last answer of `failed_nodes` per pool, and when it was asked.
    failed_cache: Mutex<HashMap<String, FailedCheck>>,
    /// The instances the latest provisioning of each pool created: an earlier attempt's
    /// leftovers must not count as this attempt's failed nodes.
    current: Mutex<HashMap<String, HashSet<String>>>,
}

impl std::fmt::Debug for Verda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verda")
            .field("base_url", &self.api.base)
            .field("region", &self.region)
            .field("configured", &self.api.credentials.is_ok())
            .field("timing", &self.timing)
            .finish()
    }
}

impl VerdaConfig {
    /// Applies `--provider-opt verda.KEY=VALUE` settings.
    pub fn apply(&mut self, mut settings: super::Settings) -> Result<(), String> {
        self.region = settings.take("region")?.or(self.region.take());
        self.base_url = settings.take("base_url")?.or(self.base_url.take());
        settings.finish(&["region", "base_url"])
    }
}

impl Verda {
    /// A provider for `config`. Never fails: a missing credential or a bad URL is reported by
    /// every call instead, so that listing other providers keeps working.
    pub fn new(config: VerdaConfig) -> Verda {
        Self::build(config, false)
    }

    /// From `VERDA_CLIENT_ID`, `VERDA_CLIENT_SECRET` and `VERDA_BASE_URL` (with `/v1`).
    /// `VERDA_API_KEY` alone is answered with an error asking for the id and secret.
    pub fn from_env() -> Verda {
        match Self::from_env_with(|_| Ok::<(), std::convert::Infallible>(())) {
            Ok(verda) => verda,
            Err(never) => match never {},
        }
    }

    /// Like [`from_env`](Self::from_env), with `tune` adjusting the config first.
    pub fn from_env_with<E>(
        tune: impl FnOnce(&mut VerdaConfig) -> Result<(), E>,
    ) -> Result<Verda, E> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let config = VerdaConfig {
            region: None,
            base_url: var("VERDA_BASE_URL"),
            client_id: var("VERDA_CLIENT_ID"),
            client_secret: var("VERDA_CLIENT_SECRET"),
        };
        let mut config = config;
        tune(&mut config)?;
        let api_key_only = var("VERDA_API_KEY").is_some();
        Ok(Self::build(config, api_key_only))
    }

    fn build(config: VerdaConfig, api_key_set: bool) -> Verda {
        let base = config
            .base_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .unwrap_or(DEFAULT_BASE_URL)
            .trim_end_matches('/')
            .to_string();
        let credentials = match (
            config.client_id.filter(|v| !v.is_empty()),
            config.client_secret.filter(|v| !v.is_empty()),
        ) {
            (Some(id), Some(secret)) => Ok((id, Secret(secret))),
            (None, None) if api_key_set => Err(ProviderError::new(
                NAME,
                ErrorKind::Auth,
                "VERDA_API_KEY is set, but Verda's API takes no API key: it issues a client id and a secret",
            )
            .hint("set VERDA_CLIENT_ID and VERDA_CLIENT_SECRET instead")),
            (Some(_), None) => Err(ProviderError::new(
                NAME,
                ErrorKind::Auth,
                "VERDA_CLIENT_ID is set but VERDA_CLIENT_SECRET is not",
            )
            .hint(CREDENTIALS_HINT)),
            (None, Some(_)) => Err(ProviderError::new(
                NAME,
                ErrorKind::Auth,
                "VERDA_CLIENT_SECRET is set but VERDA_CLIENT_ID is not",
            )
            .hint(CREDENTIALS_HINT)),
            (None, None) => Err(ProviderError::new(
                NAME,
                ErrorKind::Auth,
                "no Verda credentials",
            )
            .hint(CREDENTIALS_HINT)),
        };
        Verda {
            api: Arc::new(Api {
                http: http_client(&base),
                base,
                credentials,
                token: tokio::sync::Mutex::new(None),
            }),
            region: config
                .region
                .map(|r| r.trim().to_string())
                .filter(|r| !r.is_empty()),
            timing: VerdaTiming::default(),
            failed_cache: Mutex::new(HashMap::new()),
            current: Mutex::new(HashMap::new()),
        }
    }

    /// The same provider with other waits (tests use short ones).
    pub fn with_timing(mut self, timing: VerdaTiming) -> Verda {
        self.timing = timing;
        self
    }

    /// The API root calls go to.
    pub fn base_url(&self) -> &str {
        &self.api.base
    }

    async fn create_script(&self, name: &str, script: &str) -> Result<String, ProviderError> {
        self.post_for_id("/scripts", &request_body(&wire::NewScript { name, script }))
            .await
    }

    /// `POST path`, answered with the new object's id (plain text, or JSON).
    async fn post_for_id(&self, path: &str, body: &Value) -> Result<String, ProviderError> {
        let reply = self
            .api
            .request(Method::POST, path, &[], Some(body))
            .await?;
        parse_id(&reply.body).ok_or_else(|| {
            self.api.unexpected(
                &format!("POST {path}"),
                reply.status,
                "did not answer with an id",
            )
        })
    }

    /// Every instance the API lists, deleted ones included.
    async fn all_instances(&self) -> Result<Vec<wire::Instance>, ProviderError> {
        self.api.get("/instances", &[]).await
    }

    /// Every instance of `pool` the API lists, deleted ones included.
    async fn pool_instances(&self, pool: &str) -> Result<Vec<wire::Instance>, ProviderError> {
        Ok(self
            .all_instances()
            .await?
            .into_iter()
            .filter(|instance| belongs_to(instance, pool))
            .collect())
    }

    /// How this provider polls, for up to `limit`: 0.5 s, doubling up to its poll interval.
    fn polling(&self, limit: Duration) -> super::Polling {
        super::Polling {
            first: Duration::from_millis(500),
            max: self.timing.poll,
            limit,
        }
    }

    /// Polls `created` (node id, instance id) until every instance runs, one fails, or the
    /// boot limit passes; returns the public address of each instance that had one by then.
    async fn wait_running(
        &self,
        created: &[(String, String)],
    ) -> Result<HashMap<String, IpAddr>, ProviderError> {
        let mut addresses = HashMap::new();
        let mut poller = self.polling(self.timing.boot_limit).start();
        let mut pending: Vec<&(String, String)> = created.iter().collect();
        let mut missing: HashMap<&str, u32> = HashMap::new();
        let mut last_status: HashMap<&str, String> = HashMap::new();
        loop {
            let mut still = Vec::new();
            for entry in pending {
                let (node_id, id) = (&entry.0, &entry.1);
                let instance: wire::Instance = match self
                    .api
                    .get(&format!("/instances/{}", path_segment(id)), &[])
                    .await
                {
                    Ok(instance) => instance,
                    // Just after create the instance may not be readable yet: a few tries.
                    Err(e) if e.kind == ErrorKind::Invalid => {
                        let count = missing.entry(id.as_str()).or_default();
                        *count += 1;
                        if *count >= 3 {
                            return Err(e);
                        }
                        still.push(entry);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let status = instance.status.0.clone();
                match status.as_str() {
                    "running" => {
                        if let Some(ip) = public_ip(&instance) {
                            addresses.insert(id.clone(), ip);
                        }
                        tracing::debug!(
                            node = %node_id,
                            instance = %id,
                            ip = %instance.ip.0,
                            "verda instance running"
                        );
                    }
                    "no_capacity" => {
                        return Err(ProviderError::new(
                            NAME,
                            ErrorKind::Capacity,
                            format!(
                                "instance {id} for {node_id} went from ordered to no_capacity"
                            ),
                        ))
                    }
                    failed if FAILED_STATUSES.contains(&failed) || GONE_STATUSES.contains(&failed) => {
                        return Err(ProviderError::new(
                            NAME,
                            ErrorKind::Api,
                            format!("instance {id} for {node_id} is {failed} instead of running"),
                        )
                        .hint("another instance type or location may work; see the Verda console for why"))
                    }
                    _ => {
                        last_status.insert(id.as_str(), status);
                        still.push(entry);
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(addresses);
            }
            if !poller.pause().await {
                let waiting: Vec<String> = pending
                    .iter()
                    .map(|(node, id)| {
                        format!(
                            "{node} ({id}, {})",
                            last_status
                                .get(id.as_str())
                                .map_or("unknown", |s| s.as_str())
                        )
                    })
                    .collect();
                return Err(ProviderError::new(
                    NAME,
                    ErrorKind::Capacity,
                    format!(
                        "instances not running after {}: {}",
                        humantime::format_duration(self.timing.boot_limit),
                        waiting.join(", ")
                    ),
                )
                .hint("another instance type or location may start faster"));
            }
        }
    }

    /// One delete action for `ids`; returns what the API said about those it did not delete.
    async fn delete_instances(&self, ids: &[String]) -> Result<Vec<String>, ProviderError> {
        let reply = self
            .api
            .request(
                Method::PUT,
                "/instances",
                &[],
                Some(&request_body(&wire::InstanceAction {
                    id: ids,
                    action: "delete",
                    volume_ids: None,
                })),
            )
            .await?;
        if reply.status == StatusCode::MULTI_STATUS {
            return Ok(partial_failures(&reply.body));
        }
        Ok(Vec::new())
    }

    /// Deletes the pool's instances and waits (bounded) until the listing no longer has them.
    async fn delete_pool_instances(&self, pool: &str) -> Result<(), ProviderError> {
        let mut failures: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for round in 0..DELETE_ROUNDS {
            let alive: Vec<String> = self
                .pool_instances(pool)
                .await?
                .iter()
                .filter(|i| !is_gone(i))
                .filter_map(|i| i.id.get().map(str::to_string))
                .collect();
            if alive.is_empty() {
                failures.clear();
                break;
            }
            seen.extend(alive.iter().cloned());
            tracing::debug!(pool, count = alive.len(), round, "deleting verda instances");
            failures = match self.delete_instances(&alive).await {
                Ok(failed) => failed,
                // One bad id can fail the whole action: delete the others one by one.
                Err(e) if alive.len() > 1 && e.kind != ErrorKind::Auth => {
                    let mut failed = Vec::new();
                    for id in &alive {
                        match self.delete_instances(std::slice::from_ref(id)).await {
                            Ok(more) => failed.extend(more),
                            Err(e)
                                if e.kind == ErrorKind::Invalid
                                    && e.message.contains("not_found") => {}
                            Err(e) => failed.push(format!("{id}: {}", e.message)),
                        }
                    }
                    failed
                }
                Err(e) => vec![e.message],
            };
            if failures.is_empty() {
                break;
            }
            tracing::warn!(
                pool,
                "verda refused to delete some instances: {}",
                failures.join("; ")
            );
            tokio::time::sleep(backoff(round + 1, self.timing.poll)).await;
        }
        // Wait until they are gone, whatever the action's answer: the listing is the truth.
        let mut poller = self.polling(self.timing.delete_limit).start();
        loop {
            let left: Vec<String> = self
                .pool_instances(pool)
                .await?
                .iter()
                .filter(|i| !matches!(i.status.0.as_str(), "deleted" | "discontinued" | "notfound"))
                .map(|i| format!("{} ({})", i.id.0, i.status.0))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if !poller.pause().await {
                let why = if failures.is_empty() {
                    String::new()
                } else {
                    format!("; the API said: {}", failures.join("; "))
                };
                return Err(ProviderError::new(
                    NAME,
                    ErrorKind::Api,
                    one_line(&format!(
                        "instances of pool {pool} still there after {}: {}{why}",
                        humantime::format_duration(self.timing.delete_limit),
                        left.join(", ")
                    )),
                )
                .hint("delete them in the Verda console (they are tagged skyward-pool) or run the teardown again"));
            }
        }
    }

    /// Deletes the startup scripts this pool registered (they hold single-use tokens).
    async fn delete_pool_scripts(&self, pool: &str) -> Result<(), ProviderError> {
        let scripts: Vec<wire::Named> = self.api.get("/scripts", &[]).await?;
        let ids: Vec<String> = scripts
            .iter()
            .filter(|s| is_pool_script(&s.name.0, pool))
            .filter_map(|s| s.id.get().map(str::to_string))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let bulk = self
            .api
            .request(
                Method::DELETE,
                "/scripts",
                &[],
                Some(&request_body(&wire::DeleteScripts { scripts: &ids })),
            )
            .await;
        if bulk.is_ok() {
            return Ok(());
        }
        for id in &ids {
            let path = format!("/scripts/{}", path_segment(id));
            match self.api.request(Method::DELETE, &path, &[], None).await {
                Ok(_) => {}
                Err(e) if e.message.contains("not_found") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The id of the pool's SSH key, registered now unless an earlier provisioning of the
    /// same pool did. Verda refuses to create an instance without a key of the account
    /// (`docs/cloud-apis.md#verda`); Skyward never logs in over SSH, so the key is a fresh
    /// Ed25519 pair whose private half is dropped here: nobody can use it to log in.
    async fn pool_ssh_key(&self, pool: &str) -> Result<String, ProviderError> {
        let name = ssh_key_name(pool);
        if let Some(id) = self.pool_ssh_key_ids(pool).await?.into_iter().next() {
            return Ok(id);
        }
        let key = unusable_ssh_public_key(&name).map_err(|why| {
            ProviderError::new(
                NAME,
                ErrorKind::Api,
                format!("cannot make the pool's SSH key: {why}"),
            )
        })?;
        self.post_for_id(
            "/ssh-keys",
            &request_body(&wire::NewSshKey {
                name: &name,
                key: &key,
            }),
        )
        .await
    }

    /// The ids of the SSH keys registered for `pool` (by exact name, so that pool `a` never
    /// takes pool `a-b`'s).
    async fn pool_ssh_key_ids(&self, pool: &str) -> Result<Vec<String>, ProviderError> {
        let name = ssh_key_name(pool);
        let keys: Vec<wire::Named> = self.api.get("/ssh-keys", &[]).await?;
        Ok(keys
            .into_iter()
            .filter(|k| k.name.0 == name)
            .filter_map(|k| k.id.get().map(str::to_string))
            .collect())
    }

    /// Deletes the pool's SSH keys (after its instances: a key is only a name on the account,
    /// but a user's listing should not fill up with dead pools' keys).
    async fn delete_pool_ssh_keys(&self, pool: &str) -> Result<(), ProviderError> {
        for id in self.pool_ssh_key_ids(pool).await? {
            let path = format!("/ssh-keys/{}", path_segment(&id));
            match self.api.request(Method::DELETE, &path, &[], None).await {
                Ok(_) => {}
                Err(e) if e.message.contains("not_found") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for Verda {
    fn name(&self) -> &str {
        NAME
    }

    async fn offers(&self, spec: &PoolSpec) -> Result<Vec<Offer>, ProviderError> {
        let types: Vec<wire::InstanceType> = self
            .api
            .get("/instance-types", &[("currency", "usd")])
            .await?;
        let listed: Vec<wire::Location> = self.api.get("/locations", &[]).await?;
        let listed: Vec<String> = listed
            .into_iter()
            .filter_map(|l| l.code.get().map(str::to_string))
            .collect();
        let locations = match self.region.as_deref().or(spec.region.as_deref()) {
            Some(wanted) => match listed.iter().find(|c| c.eq_ignore_ascii_case(wanted)) {
                Some(code) => vec![code.clone()],
                None => {
                    return Err(ProviderError::new(
                        NAME,
                        ErrorKind::Invalid,
                        format!(
                            "location {wanted:?} is not one of Verda's locations ({})",
                            listed.join(", ")
                        ),
                    )
                    .hint(REGION_HINT))
                }
            },
            // Region auto-discovered: every location the API lists.
            None => listed,
        };
        let spot_flags: Vec<bool> = spec
            .allocation
            .markets()
            .iter()
            .map(|m| *m == Market::Spot)
            .collect();
        // Capacity per (location, spot): the types with capacity, or None when unknown.
        let mut queries = tokio::task::JoinSet::new();
        for location in &locations {
            for &spot in &spot_flags {
                let (api, location) = (self.api.clone(), location.clone());
                queries.spawn(async move {
                    let answer: Result<Vec<wire::Availability>, _> = api
                        .get(
                            "/instance-availability",
                            &[
                                ("is_spot", if spot { "true" } else { "false" }),
                                ("location_code", location.as_str()),
                            ],
                        )
                        .await;
                    (location, spot, answer)
                });
            }
        }
        let mut capacity: HashMap<(String, bool), Option<HashSet<String>>> = HashMap::new();
        while let Some(joined) = queries.join_next().await {
            let Ok((location, spot, answer)) = joined else {
                continue;
            };
            let types = match answer {
                Ok(answer) => Some(available_types(&answer, &location)),
                Err(e) if e.kind == ErrorKind::Auth => return Err(e),
                Err(e) => {
                    tracing::warn!("verda: availability in {location} unknown: {e}");
                    None
                }
            };
            capacity.insert((location, spot), types);
        }
        let mut offers = Vec::new();
        for instance_type in &types {
            let Some(shape) = Shape::parse(instance_type) else {
                continue;
            };
            for location in &locations {
                let has_capacity = |spot: bool| match capacity.get(&(location.clone(), spot)) {
                    Some(Some(types)) => types.contains(&shape.name),
                    // Unknown (or not asked): let the create call find out.
                    Some(None) | None => true,
                };
                let available = has_capacity(false);
                let spot_available = spot_flags.contains(&true).then(|| has_capacity(true));
                offers.push(Offer {
                    provider: NAME.into(),
                    region: location.clone(),
                    instance_type: shape.name.clone(),
                    accelerator: shape.accelerator.clone(),
                    vcpus: shape.vcpus,
                    memory_gb: shape.memory_gb,
                    on_demand_per_hour: shape.on_demand,
                    spot_per_hour: shape.spot,
                    available,
                    spot_available,
                    provider_ref: shape.id.clone(),
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
        self.api.credentials()?;
        self.current
            .lock()
            .expect("current lock")
            .insert(request.pool.clone(), HashSet::new());
        self.failed_cache
            .lock()
            .expect("cache lock")
            .remove(&request.pool);
        let image = request
            .spec
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        let disk = request.spec.disk_gb.unwrap_or(DEFAULT_DISK_GB);
        let agent_port = request.bootstrap.reverse.as_ref().map(|r| r.agent_port);
        if let Some(reverse) = &request.bootstrap.reverse {
            tracing::info!(
                pool = %request.pool,
                "{}",
                open_port_notice(reverse.agent_port, reverse.allow_from)
            );
        }
        let ssh_key = self.pool_ssh_key(&request.pool).await?;
        let mut created: Vec<(String, String)> = Vec::new();
        for node in &request.nodes {
            let host = hostname(&request.pool, &node.node_id);
            let script_id = self
                .create_script(&script_name(&request.pool, node), &request.user_data(node))
                .await?;
            let body = request_body(&wire::CreateInstance {
                instance_type: &offer.instance_type,
                image: &image,
                hostname: &host,
                description: format!("skyward pool {} {}", request.pool, node.node_id),
                location_code: &offer.region,
                startup_script_id: &script_id,
                ssh_key_ids: [&ssh_key],
                is_spot: market == Market::Spot,
                os_volume: wire::OsVolume {
                    name: format!("{host}-os"),
                    size: disk,
                },
                tags: request
                    .tags(node)
                    .into_iter()
                    .take(MAX_TAGS)
                    .map(|(key, value)| wire::Tag { key, value })
                    .collect(),
            });
            let reply = self
                .api
                .request(Method::POST, "/instances", &[], Some(&body))
                .await
                .map_err(|e| with_location_hint(e, &offer.region))?;
            let id = parse_id(&reply.body).ok_or_else(|| {
                self.api.unexpected(
                    "POST /instances",
                    reply.status,
                    "did not answer with an instance id",
                )
            })?;
            tracing::debug!(node = %node.node_id, instance = %id, "verda instance ordered");
            self.current
                .lock()
                .expect("current lock")
                .entry(request.pool.clone())
                .or_default()
                .insert(id.clone());
            created.push((node.node_id.clone(), id));
        }
        let addresses = self.wait_running(&created).await?;
        Ok(created
            .into_iter()
            .map(|(node_id, provider_id)| Instance {
                // Reversed, the coordinator dials it there; an instance still without an
                // address is found later through `listen_addresses`.
                address: agent_port
                    .zip(addresses.get(&provider_id))
                    .map(|(port, ip)| SocketAddr::new(*ip, port)),
                node_id,
                provider_id,
            })
            .collect())
    }

    async fn failed_nodes(&self, pool: &str) -> Vec<(String, String)> {
        if let Some((at, answer)) = self.failed_cache.lock().expect("cache lock").get(pool) {
            if at.elapsed() < self.timing.failed_check {
                return answer.clone();
            }
        }
        let current = self
            .current
            .lock()
            .expect("current lock")
            .get(pool)
            .cloned();
        let failed: Vec<(String, String)> = match self.pool_instances(pool).await {
            Ok(instances) => instances
                .iter()
                .filter(|i| current.as_ref().is_none_or(|ids| ids.contains(&i.id.0)))
                .filter(|i| FAILED_STATUSES.contains(&i.status.0.as_str()))
                .map(|i| {
                    (
                        node_of(i, pool),
                        format!(
                            "Verda instance {} ({} in {}) is {}",
                            i.id.0, i.instance_type.0, i.location.0, i.status.0
                        ),
                    )
                })
                .collect(),
            Err(e) => {
                tracing::warn!("verda: cannot check the pool's instances: {e}");
                Vec::new()
            }
        };
        self.failed_cache
            .lock()
            .expect("cache lock")
            .insert(pool.to_string(), (Instant::now(), failed.clone()));
        failed
    }

    async fn teardown(&self, pool: &str) -> Result<(), ProviderError> {
        self.api.credentials()?;
        let instances = self.delete_pool_instances(pool).await;
        // Scripts go even when some instance stayed: they hold the nodes' tokens.
        let scripts = self.delete_pool_scripts(pool).await;
        // A key still named by a live instance stays until a later teardown removes both.
        let keys = match &instances {
            Ok(()) => self.delete_pool_ssh_keys(pool).await,
            Err(_) => Ok(()),
        };
        self.failed_cache.lock().expect("cache lock").remove(pool);
        if instances.is_ok() {
            self.current.lock().expect("current lock").remove(pool);
        }
        instances?;
        scripts?;
        keys
    }

    async fn terminate(&self, pool: &str, node_id: &str) -> Result<(), ProviderError> {
        self.api.credentials()?;
        let ids: Vec<String> = self
            .pool_instances(pool)
            .await?
            .iter()
            .filter(|i| !is_gone(i) && node_of(i, pool) == node_id)
            .filter_map(|i| i.id.get().map(str::to_string))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        match self.delete_instances(&ids).await? {
            failed if failed.is_empty() => Ok(()),
            failed => Err(ProviderError::new(
                NAME,
                ErrorKind::Api,
                format!("deleting {node_id} of pool {pool}: {}", failed.join("; ")),
            )),
        }
    }

    fn supports_reverse(&self) -> bool {
        true
    }

    async fn pools(&self) -> Result<Vec<String>, ProviderError> {
        self.api.credentials()?;
        let pools: std::collections::BTreeSet<String> = self
            .all_instances()
            .await?
            .iter()
            .filter(|i| !is_gone(i))
            .filter_map(pool_of)
            .collect();
        Ok(pools.into_iter().collect())
    }

    /// Verda has no firewall to open the agent port to one address, so it needs none.
    fn reverse_needs_public_ip(&self) -> bool {
        false
    }

    async fn listen_addresses(
        &self,
        pool: &str,
        reverse: &crate::bootstrap::Reverse,
    ) -> Result<Vec<(String, SocketAddr)>, ProviderError> {
        let port = reverse.agent_port;
        let current = self
            .current
            .lock()
            .expect("current lock")
            .get(pool)
            .cloned();
        Ok(self
            .pool_instances(pool)
            .await?
            .iter()
            // An earlier attempt's leftovers are not this attempt's nodes.
            .filter(|i| current.as_ref().is_none_or(|ids| ids.contains(&i.id.0)))
            .filter_map(|i| Some((node_of(i, pool), SocketAddr::new(public_ip(i)?, port))))
            .collect())
    }

    async fn status(&self) -> ProviderStatus {
        let configured = self.api.credentials.is_ok();
        let (working, detail) = match self.api.get::<Vec<wire::Location>>("/locations", &[]).await {
            Ok(locations) => {
                let codes: Vec<String> = locations
                    .into_iter()
                    .filter_map(|l| l.code.get().map(str::to_string))
                    .collect();
                let region = match &self.region {
                    Some(region) => format!("region {region}"),
                    None => "region auto-discovered".into(),
                };
                (
                    true,
                    format!(
                        "{}: locations {} ({region})",
                        self.api.base,
                        codes.join(", ")
                    ),
                )
            }
            Err(e) => (false, e.to_string()),
        };
        ProviderStatus {
            provider: NAME.into(),
            configured,
            working,
            detail,
        }
    }
}

impl Api {
    fn credentials(&self) -> Result<&(String, Secret), ProviderError> {
        self.credentials.as_ref().map_err(Clone::clone)
    }

    fn http(&self) -> Result<&reqwest::Client, ProviderError> {
        self.http
            .as_ref()
            .map_err(|why| ProviderError::new(NAME, ErrorKind::Invalid, why.clone()))
    }

    fn unexpected(&self, what: &str, status: StatusCode, why: &str) -> ProviderError {
        ProviderError::new(
            NAME,
            ErrorKind::Api,
            format!("{what} {why} (HTTP {})", status.as_u16()),
        )
        .hint(format!("check that {} is Verda's API", self.base))
    }

    /// A current access token: the cached one, a refreshed one when it is due (or when
    /// `rejected`, the one the API just refused, is still the cached one), else a new one.
    async fn access_token(&self, rejected: Option<&str>) -> Result<String, ProviderError> {
        let (id, secret) = self.credentials()?;
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            let refused = rejected.is_some_and(|r| r == token.access.0);
            if !refused && Instant::now() < token.refresh_at {
                return Ok(token.access.0.clone());
            }
        }
        let refresh = cached.as_ref().and_then(|t| t.refresh.clone());
        let mut fresh = None;
        if let Some(refresh) = refresh {
            match self
                .grant(&wire::GrantRequest::RefreshToken {
                    refresh_token: &refresh.0,
                })
                .await
            {
                Ok(token) => fresh = Some(token),
                Err(e) => {
                    tracing::debug!("verda: token refresh refused ({e}); authenticating again")
                }
            }
        }
        let token = match fresh {
            Some(token) => token,
            None => {
                self.grant(&wire::GrantRequest::ClientCredentials {
                    client_id: id,
                    client_secret: &secret.0,
                })
                .await?
            }
        };
        let access = token.access.0.clone();
        *cached = Some(token);
        Ok(access)
    }

    async fn grant(&self, body: &wire::GrantRequest<'_>) -> Result<Token, ProviderError> {
        let http = self.http()?;
        let url = format!("{}/oauth2/token", self.base);
        let what = "POST /oauth2/token";
        let mut sends = 0;
        let (status, text) = loop {
            sends += 1;
            // A grant changes nothing on the account: sending it again is safe.
            let (sent, asked, failure) = match http.post(&url).json(&body).send().await {
                Ok(response) => {
                    let status = response.status();
                    let asked = retry_after(response.headers());
                    let text = read_body(response, what).await?;
                    if !transient(status) {
                        break (status, text);
                    }
                    (
                        Sent::Answered(status),
                        asked,
                        api_error(what, status, &text),
                    )
                }
                Err(e) => (Sent::of(&e), None, transport_error(what, &e)),
            };
            match RETRY.wait_before_next(sends, sent, true, asked) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(failure),
            }
        };
        if !status.is_success() {
            let mut e = api_error(what, status, &text);
            if matches!(status.as_u16(), 400 | 401 | 403) {
                e.kind = ErrorKind::Auth;
                e.hint = Some(format!(
                    "check VERDA_CLIENT_ID and VERDA_CLIENT_SECRET (and VERDA_BASE_URL, now {})",
                    self.base
                ));
            }
            return Err(e);
        }
        let answer: wire::Grant = serde_json::from_str(&text).map_err(|_| {
            self.unexpected("POST /oauth2/token", status, "did not answer with a token")
        })?;
        let access = answer
            .access_token
            .get()
            .map(str::to_string)
            .ok_or_else(|| {
                self.unexpected(
                    "POST /oauth2/token",
                    status,
                    "answered without access_token",
                )
            })?;
        let lifetime = answer
            .expires_in
            .0
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(3600.0)
            .min(86_400.0);
        let lifetime = Duration::from_secs_f64(lifetime);
        let margin = (lifetime / 2).min(Duration::from_secs(60));
        Ok(Token {
            access: Secret(access),
            refresh: answer.refresh_token.get().map(|t| Secret(t.to_string())),
            refresh_at: Instant::now() + lifetime - margin,
        })
    }

    /// One API call, authenticated: refreshes the token once on a 401, retries idempotent
    /// calls after transient failures (bounded), and turns error answers into
    /// [`ProviderError`]s. `Ok` only for 2xx answers.
    async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Reply, ProviderError> {
        let http = self.http()?;
        let what = format!("{method} {path}");
        let idempotent = super::http::idempotent(&method);
        let mut token = self.access_token(None).await?;
        let mut reauthenticated = false;
        let mut sends = 0u32;
        loop {
            sends += 1;
            let mut builder = http
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(&token)
                .header(reqwest::header::ACCEPT, "application/json");
            if !query.is_empty() {
                builder = builder.query(query);
            }
            if let Some(body) = body {
                builder = builder.json(body);
            }
            let response = match builder.send().await {
                Ok(response) => response,
                Err(e) => match RETRY.wait_before_next(sends, Sent::of(&e), idempotent, None) {
                    Some(wait) => {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    None => return Err(transport_error(&what, &e)),
                },
            };
            let status = response.status();
            let asked = retry_after(response.headers());
            let text = read_body(response, &what).await?;
            tracing::debug!(call = %what, status = status.as_u16(), "verda api");
            if status.is_success() {
                return Ok(Reply { status, body: text });
            }
            if status == StatusCode::UNAUTHORIZED && !reauthenticated {
                reauthenticated = true;
                token = self.access_token(Some(&token)).await?;
                continue;
            }
            let error = api_error(&what, status, &text);
            // A 503 that says there is no capacity is an answer, not a fault to wait out.
            if error.kind == ErrorKind::Capacity {
                return Err(error);
            }
            match RETRY.wait_before_next(sends, Sent::Answered(status), idempotent, asked) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(error),
            }
        }
    }

    /// `GET path`, its answer read as `T`.
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, ProviderError> {
        let reply = self.request(Method::GET, path, query, None).await?;
        serde_json::from_str(&reply.body).map_err(|e| {
            self.unexpected(
                &format!("GET {path}"),
                reply.status,
                &format!("answered in a shape Skyward does not know ({e})"),
            )
        })
    }
}

/// The HTTP client: bounded waits, no redirects (the token must not follow one), no proxy for
/// a loopback API (a stand-in).
fn http_client(base: &str) -> Result<reqwest::Client, String> {
    let url = reqwest::Url::parse(base).map_err(|_| {
        format!(
            "Verda base URL {base:?} is not a URL: set VERDA_BASE_URL to e.g. {DEFAULT_BASE_URL}"
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "Verda base URL {base:?} is not an http(s) URL: set VERDA_BASE_URL to e.g. {DEFAULT_BASE_URL}"
        ));
    }
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    };
    skyward_common::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(format!("skyward/{}", skyward_common::VERSION));
    if loopback {
        builder = builder.no_proxy();
    }
    builder
        .build()
        .map_err(|e| format!("cannot make an HTTP client for Verda: {e}"))
}

/// Reads a body up to [`MAX_BODY`] bytes.
async fn read_body(mut response: reqwest::Response, what: &str) -> Result<String, ProviderError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(what, &e))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ProviderError::new(
                NAME,
                ErrorKind::Api,
                format!("{what}: answer larger than {} MiB", MAX_BODY >> 20),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn transport_error(what: &str, error: &reqwest::Error) -> ProviderError {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    // Error chains are short; the bound only guards against a cycle.
    for _ in 0..8 {
        let Some(cause) = source else { break };
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    ProviderError::new(
        NAME,
        ErrorKind::Api,
        super::http::one_line(&format!("{what}: {message}"), 400),
    )
    .hint("check the network and VERDA_BASE_URL")
}

/// An error answer `{code, message}` as a [`ProviderError`] of the right kind.
fn api_error(what: &str, status: StatusCode, body: &str) -> ProviderError {
    let parsed: Option<wire::ErrorAnswer> = serde_json::from_str(body).ok();
    let code = parsed
        .as_ref()
        .map(|e| e.code.0.to_ascii_lowercase())
        .unwrap_or_default();
    let message = parsed
        .as_ref()
        .and_then(|e| e.message.get().or(e.error.get()).map(str::to_string))
        .unwrap_or_else(|| {
            let snippet: String = body.chars().take(200).collect();
            if snippet.trim().is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("no message")
                    .to_string()
            } else {
                snippet
            }
        });
    let lower = message.to_ascii_lowercase();
    let code_part = if code.is_empty() {
        String::new()
    } else {
        format!("{code}, ")
    };
    let text = one_line(&format!(
        "{what}: {message} ({code_part}HTTP {})",
        status.as_u16()
    ));
    let (kind, hint): (ErrorKind, Option<&str>) = if status == StatusCode::UNAUTHORIZED
        || code == "unauthorized_request"
    {
        (
            ErrorKind::Auth,
            Some("check VERDA_CLIENT_ID and VERDA_CLIENT_SECRET"),
        )
    } else if code == "insufficient_funds" {
        (
            ErrorKind::Quota,
            Some("add funds to the Verda account or choose a cheaper instance"),
        )
    } else if status == StatusCode::SERVICE_UNAVAILABLE && lower.contains("not enough resources") {
        (ErrorKind::Capacity, None)
    } else if matches!(
        code.as_str(),
        "invalid_request" | "forbidden_action" | "not_found"
    ) || (status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS)
    {
        (ErrorKind::Invalid, None)
    } else {
        (ErrorKind::Api, None)
    };
    let error = ProviderError::new(NAME, kind, text);
    match hint {
        Some(hint) => error.hint(hint),
        None => error,
    }
}

/// A create refused for its location ("Region not available") says how to get another one.
fn with_location_hint(error: ProviderError, location: &str) -> ProviderError {
    let lower = error.message.to_ascii_lowercase();
    if error.kind == ErrorKind::Invalid
        && (lower.contains("region") || lower.contains("location"))
        && error.hint.is_none()
    {
        let mut error = error.hint(REGION_HINT);
        error.message = format!("{} [location {location}]", error.message);
        error
    } else {
        error
    }
}

/// What a 207 answer says about the instances that were not deleted. Its shape is not
/// documented: any list of objects with an id and an error or failure status is read.
fn partial_failures(body: &str) -> Vec<String> {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return vec![format!(
            "partial failure: {}",
            super::http::one_line(body, 400)
        )];
    };
    let items: Vec<&Value> = match &value {
        Value::Array(items) => items.iter().collect(),
        Value::Object(map) => map.values().filter_map(Value::as_array).flatten().collect(),
        _ => Vec::new(),
    };
    let mut failed = Vec::new();
    for item in items {
        let id = ["id", "instance_id", "instanceId"]
            .iter()
            .find_map(|k| str_field(item, k))
            .unwrap_or_else(|| "?".into());
        let status = ["status", "result"]
            .iter()
            .find_map(|k| str_field(item, k))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let code = ["statusCode", "status_code"]
            .iter()
            .find_map(|k| item.get(*k).and_then(number))
            .unwrap_or(0.0);
        let error = ["error", "message"]
            .iter()
            .find_map(|k| match item.get(*k) {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(v @ Value::Object(_)) => {
                    Some(str_field(v, "message").unwrap_or_else(|| v.to_string()))
                }
                _ => None,
            });
        let not_found = error
            .as_deref()
            .is_some_and(|e| e.to_ascii_lowercase().contains("not found"))
            || code == 404.0;
        let failed_here = !not_found
            && (matches!(status.as_str(), "error" | "failed" | "failure")
                || code >= 400.0
                || item.get("success") == Some(&Value::Bool(false))
                || (error.is_some() && !matches!(status.as_str(), "success" | "ok")));
        if failed_here {
            failed.push(one_line(&format!(
                "{id}: {}",
                error.unwrap_or_else(|| status.clone())
            )));
        }
    }
    failed
}

/// The instance types with capacity in `location`, from
/// `[{"location_code": "FIN-01", "availabilities": ["1H100.80S.22V", ...]}]`.
fn available_types(answer: &[wire::Availability], location: &str) -> HashSet<String> {
    answer
        .iter()
        .filter(|entry| {
            entry
                .location_code
                .get()
                .is_none_or(|c| c.eq_ignore_ascii_case(location))
        })
        .flat_map(|entry| entry.availabilities.iter())
        .filter_map(|t| t.get().map(str::to_string))
        .collect()
}

/// What an instance type is, as Skyward offers it.
struct Shape {
    id: String,
    name: String,
    accelerator: Option<OfferedAccelerator>,
    vcpus: u32,
    memory_gb: f64,
    on_demand: Option<f64>,
    spot: Option<f64>,
}

impl Shape {
    fn parse(t: &wire::InstanceType) -> Option<Shape> {
        let name = t.instance_type.get()?.to_string();
        let gpus = t.gpu.number_of_gpus.0.unwrap_or(0.0).max(0.0) as u32;
        let accelerator = if gpus > 0 {
            let per_gpu = t
                .gpu_memory
                .size_in_gigabytes
                .0
                .map(|total| total / gpus as f64);
            [&t.gpu.description, &t.model, &t.name]
                .into_iter()
                .filter_map(|vendor| vendor.get())
                .find_map(|vendor| catalog::identify(vendor, per_gpu))
                .map(|accelerator| OfferedAccelerator {
                    accelerator,
                    count: gpus,
                })
        } else {
            None
        };
        let price = |p: wire::Number| p.0.filter(|p| p.is_finite() && *p > 0.0);
        Some(Shape {
            id: t.id.0.clone(),
            name,
            accelerator,
            vcpus: t.cpu.number_of_cores.0.unwrap_or(0.0).max(0.0) as u32,
            memory_gb: t.memory.size_in_gigabytes.0.unwrap_or(0.0),
            on_demand: price(t.price_per_hour),
            spot: price(t.spot_price).or_else(|| price(t.spot_price_per_hour)),
        })
    }
}

/// A request's JSON body. Plain structs of text, numbers and lists always serialize.
fn request_body<T: serde::Serialize>(request: &T) -> Value {
    serde_json::to_value(request).expect("a request of plain fields serializes")
}

/// A number sent as a JSON number or as a string ("5.00").
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A field as a string (numbers too), if present and not empty.
fn str_field(value: &Value, key: &str) -> Option<String> {
    match value.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Verda's requests and answers, typed. The answers are read leniently, as the API writes
/// them: ids and numbers come as JSON text or numbers, a missing or null field is empty, tags
/// come as a list of `{key, value}` or as one object (`docs/cloud-apis.md#verda`).
mod wire {
    use serde::{Deserialize, Deserializer, Serialize};
    use serde_json::Value;

    /// A field as text: a JSON string or number; anything else (null, absent) is empty.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Text(pub String);

    impl Text {
        pub fn get(&self) -> Option<&str> {
            (!self.0.is_empty()).then_some(self.0.as_str())
        }
    }

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
            Ok(Text(match Value::deserialize(d)? {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            }))
        }
    }

    /// A number sent as a JSON number or as a string ("5.00"); `None` when it is neither.
    #[derive(Debug, Clone, Copy, Default, PartialEq)]
    pub struct Number(pub Option<f64>);

    impl<'de> Deserialize<'de> for Number {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Number, D::Error> {
            Ok(Number(super::number(&Value::deserialize(d)?)))
        }
    }

    /// An instance's tags, `[{"key": k, "value": v}]` or `{k: v}`.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Tags(pub Vec<(String, String)>);

    impl Tags {
        pub fn get(&self, key: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    impl<'de> Deserialize<'de> for Tags {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Tags, D::Error> {
            let text = |v: &Value| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            };
            Ok(Tags(match Value::deserialize(d)? {
                Value::Array(tags) => tags
                    .iter()
                    .filter_map(|t| {
                        Some((t.get("key")?.as_str()?.to_string(), text(t.get("value")?)?))
                    })
                    .collect(),
                Value::Object(map) => map
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect(),
                _ => Vec::new(),
            }))
        }
    }

    /// `GET /instances`, `GET /instances/{id}`.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct Instance {
        pub id: Text,
        pub hostname: Text,
        pub status: Text,
        /// Null until it runs.
        pub ip: Text,
        pub instance_type: Text,
        pub location: Text,
        pub tags: Tags,
    }

    /// `GET /scripts`, `GET /ssh-keys`: what Skyward reads of them.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct Named {
        pub id: Text,
        pub name: Text,
    }

    /// `GET /locations`.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct Location {
        pub code: Text,
    }

    /// `GET /instance-availability`: the types with capacity, per location.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct Availability {
        pub location_code: Text,
        pub availabilities: Vec<Text>,
    }

    /// `GET /instance-types`.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct InstanceType {
        pub id: Text,
        pub instance_type: Text,
        pub model: Text,
        pub name: Text,
        pub gpu: Gpu,
        pub gpu_memory: Size,
        pub cpu: Cores,
        pub memory: Size,
        pub price_per_hour: Number,
        pub spot_price: Number,
        pub spot_price_per_hour: Number,
    }

    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct Gpu {
        pub number_of_gpus: Number,
        pub description: Text,
    }

    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct Size {
        pub size_in_gigabytes: Number,
    }

    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct Cores {
        pub number_of_cores: Number,
    }

    /// `POST /oauth2/token`: a client's credentials, or the refresh token of the last grant.
    #[derive(Serialize)]
    #[serde(tag = "grant_type", rename_all = "snake_case")]
    pub enum GrantRequest<'a> {
        ClientCredentials {
            client_id: &'a str,
            client_secret: &'a str,
        },
        RefreshToken {
            refresh_token: &'a str,
        },
    }

    /// An error answer: `{"code": ..., "message": ...}` (some carry `error` instead).
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct ErrorAnswer {
        pub code: Text,
        pub message: Text,
        pub error: Text,
    }

    /// `POST /oauth2/token`'s answer.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(default)]
    pub struct Grant {
        pub access_token: Text,
        pub refresh_token: Text,
        pub expires_in: Number,
    }

    /// `POST /instances`.
    #[derive(Debug, Clone, Serialize)]
    pub struct CreateInstance<'a> {
        pub instance_type: &'a str,
        pub image: &'a str,
        pub hostname: &'a str,
        pub description: String,
        pub location_code: &'a str,
        pub startup_script_id: &'a str,
        pub ssh_key_ids: [&'a str; 1],
        pub is_spot: bool,
        pub os_volume: OsVolume,
        pub tags: Vec<Tag>,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct OsVolume {
        pub name: String,
        pub size: u32,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct Tag {
        pub key: String,
        pub value: String,
    }

    /// `PUT /instances`: an action on instances.
    #[derive(Debug, Clone, Serialize)]
    pub struct InstanceAction<'a> {
        pub id: &'a [String],
        pub action: &'static str,
        pub volume_ids: Option<Vec<String>>,
    }

    /// `POST /scripts`, `POST /ssh-keys`.
    #[derive(Debug, Clone, Serialize)]
    pub struct NewScript<'a> {
        pub name: &'a str,
        pub script: &'a str,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct NewSshKey<'a> {
        pub name: &'a str,
        pub key: &'a str,
    }

    /// `DELETE /scripts`.
    #[derive(Debug, Clone, Serialize)]
    pub struct DeleteScripts<'a> {
        pub scripts: &'a [String],
    }
}

/// An id answered as plain text, as a JSON string, or as an object with `id`.
fn parse_id(body: &str) -> Option<String> {
    let body = body.trim();
    let id = match serde_json::from_str::<Value>(body) {
        Ok(Value::String(s)) => s,
        Ok(Value::Object(map)) => ["id", "instance_id", "script_id"]
            .iter()
            .find_map(|k| str_field(&Value::Object(map.clone()), k))?,
        Ok(Value::Number(n)) => n.to_string(),
        _ => body.to_string(),
    };
    let id = id.trim().to_string();
    let plausible = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    plausible.then_some(id)
}

/// An id as one URL path segment.
fn path_segment(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect()
}

/// The pool an instance is of: its pool tag, else what the hostname `<pool>-node-<n>` that
/// the provider gives every node says.
fn pool_of(instance: &wire::Instance) -> Option<String> {
    if let Some(pool) = instance.tags.get(POOL_TAG) {
        return Some(pool.to_string());
    }
    let (pool, number) = instance.hostname.get()?.rsplit_once("-node-")?;
    (!pool.is_empty() && !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
        .then(|| pool.to_string())
}

/// Whether an instance is one of `pool`'s: by its pool tag, else (an instance without one)
/// by the hostname prefix the provider gives every node of the pool.
fn belongs_to(instance: &wire::Instance, pool: &str) -> bool {
    match instance.tags.get(POOL_TAG) {
        Some(owner) => owner == pool,
        // The whole prefix before `-node-N`, so that pool `a` never claims pool `a-b`'s.
        None => pool_of(instance).is_some_and(|owner| owner == hostname_prefix(pool)),
    }
}

/// The node id of one of `pool`'s instances: its node tag, else what its hostname says.
fn node_of(instance: &wire::Instance, pool: &str) -> String {
    if let Some(node) = instance.tags.get(NODE_TAG) {
        return node.to_string();
    }
    let host = &instance.hostname.0;
    match host.strip_prefix(&format!("{}-", hostname_prefix(pool))) {
        Some(node) if !node.is_empty() => node.to_string(),
        _ if !host.is_empty() => host.clone(),
        _ => "unknown node".into(),
    }
}

/// The public address of a running instance: `ip` is null until it runs.
fn public_ip(instance: &wire::Instance) -> Option<IpAddr> {
    if instance.status.0 != "running" {
        return None;
    }
    instance.ip.get()?.trim().parse().ok()
}

/// What reversing opens on Verda, said once per provisioning: no firewall call exists, so the
/// agent port is open to every address and mutual TLS is the guard.
fn open_port_notice(agent_port: u16, allow_from: Option<IpAddr>) -> String {
    let not_only = allow_from
        .map(|ip| format!(" (not only {ip})"))
        .unwrap_or_default();
    format!(
        "verda has no firewall API: UDP port {agent_port} of the pool's instances is reachable from any address{not_only}; each agent admits only a coordinator holding a certificate of the pool's CA"
    )
}

fn is_gone(instance: &wire::Instance) -> bool {
    GONE_STATUSES.contains(&instance.status.0.as_str())
}

/// The pool's part of every hostname: lower case letters, digits and dashes.
fn hostname_prefix(pool: &str) -> String {
    let cleaned: String = pool
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches('-');
    let prefix: String = trimmed.chars().take(MAX_HOSTNAME - 16).collect();
    if prefix.is_empty() {
        "skyward".into()
    } else {
        prefix
    }
}

/// `<pool>-<node id>`, cleaned to a valid hostname.
fn hostname(pool: &str, node_id: &str) -> String {
    let node: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let host = format!("{}-{}", hostname_prefix(pool), node.trim_matches('-'));
    host.chars()
        .take(MAX_HOSTNAME)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

fn script_prefix(pool: &str) -> String {
    format!("skyward-{pool}-")
}

fn script_name(pool: &str, node: &NodeBootstrap) -> String {
    format!("{}{}", script_prefix(pool), node.node_id)
}

/// Whether a startup script is one of `pool`'s: `skyward-<pool>-node-<n>` exactly, so that
/// tearing down pool `a` leaves pool `a-b`'s scripts alone.
fn is_pool_script(name: &str, pool: &str) -> bool {
    name.strip_prefix(&script_prefix(pool))
        .and_then(|rest| rest.strip_prefix("node-"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The name of the pool's SSH key on the account.
fn ssh_key_name(pool: &str) -> String {
    format!("skyward-{pool}-ssh-key")
}

/// An OpenSSH `ssh-ed25519` public key line for a fresh key pair whose private half is
/// dropped before this returns: a key nobody can log in with.
fn unusable_ssh_public_key(comment: &str) -> Result<String, rcgen::Error> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    Ok(openssh_ed25519_line(pair.public_key_raw(), comment))
}

/// `ssh-ed25519 <base64 of the SSH wire encoding> <comment>` (RFC 8709: the algorithm name
/// and the 32-byte key, each as a length-prefixed string).
fn openssh_ed25519_line(public_key: &[u8], comment: &str) -> String {
    const ALGORITHM: &[u8] = b"ssh-ed25519";
    let mut wire = Vec::with_capacity(8 + ALGORITHM.len() + public_key.len());
    for part in [ALGORITHM, public_key] {
        wire.extend_from_slice(&(part.len() as u32).to_be_bytes());
        wire.extend_from_slice(part);
    }
    use base64::Engine as _;
    format!(
        "ssh-ed25519 {} {comment}",
        base64::engine::general_purpose::STANDARD.encode(wire)
    )
}

/// 0.5 s doubling per round, at most `max`.
fn backoff(round: u32, max: Duration) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1u32 << round.min(16))
        .min(max)
}

/// An error body on one bounded line.
fn one_line(text: &str) -> String {
    super::http::one_line(text, 400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An API answer, read as the provider reads it.
    fn read<T: serde::de::DeserializeOwned>(answer: Value) -> T {
        serde_json::from_value(answer).expect("a lenient shape reads anything")
    }

    #[test]
    fn prices_come_as_strings_or_numbers() {
        assert_eq!(number(&json!("5.00")), Some(5.0));
        assert_eq!(number(&json!(" 1.29 ")), Some(1.29));
        assert_eq!(number(&json!(17.52)), Some(17.52));
        assert_eq!(number(&json!(null)), None);
        assert_eq!(number(&json!("n/a")), None);
    }

    #[test]
    fn instance_types_map_onto_the_catalog() {
        let t = json!({
            "id": "abc", "instance_type": "8A100.80S.176V", "price_per_hour": "14.00",
            "spot_price": 4.5, "cpu": {"number_of_cores": 176},
            "gpu": {"description": "8x A100 SXM4 80GB", "number_of_gpus": 8},
            "memory": {"size_in_gigabytes": 960}, "gpu_memory": {"size_in_gigabytes": 640}
        });
        let shape = Shape::parse(&read(t)).unwrap();
        let a = shape.accelerator.unwrap();
        assert_eq!((a.accelerator.name, a.count), ("A100-80GB", 8));
        assert_eq!((shape.vcpus, shape.memory_gb), (176, 960.0));
        assert_eq!((shape.on_demand, shape.spot), (Some(14.0), Some(4.5)));
        let cpu = json!({"instance_type": "CPU.4V.16G", "price_per_hour": "0.05", "spot_price": "0",
            "gpu": {"description": "", "number_of_gpus": 0}});
        let shape = Shape::parse(&read(cpu)).unwrap();
        assert!(shape.accelerator.is_none());
        assert_eq!(shape.spot, None, "a zero spot price is no spot market");
    }

    #[test]
    fn ids_come_as_text_or_json() {
        assert_eq!(parse_id("abc-123\n").as_deref(), Some("abc-123"));
        assert_eq!(parse_id("\"abc-123\"").as_deref(), Some("abc-123"));
        assert_eq!(parse_id("{\"id\":\"abc-123\"}").as_deref(), Some("abc-123"));
        assert_eq!(parse_id("<html>oops</html>"), None);
        assert_eq!(parse_id(""), None);
    }

    #[test]
    fn errors_map_to_kinds_and_stay_on_one_line() {
        let e = api_error(
            "POST /instances",
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"code":"service_unavailable","message":"Not enough resources to deploy a 1 GPU instance type 1V100.6V in FIN-03"}"#,
        );
        assert_eq!(e.kind, ErrorKind::Capacity);
        assert!(e.message.contains("Not enough resources"), "{}", e.message);
        let e = api_error(
            "GET /instances",
            StatusCode::UNAUTHORIZED,
            r#"{"code":"unauthorized_request","message":"Invalid token"}"#,
        );
        assert_eq!(e.kind, ErrorKind::Auth);
        let e = api_error(
            "POST /instances",
            StatusCode::PAYMENT_REQUIRED,
            r#"{"code":"insufficient_funds","message":"Not enough\nfunds"}"#,
        );
        assert_eq!(e.kind, ErrorKind::Quota);
        assert!(!e.to_string().contains('\n'));
        let e = with_location_hint(
            api_error(
                "POST /instances",
                StatusCode::BAD_REQUEST,
                r#"{"code":"invalid_request","message":"Region not available"}"#,
            ),
            "FIN-09",
        );
        assert_eq!(e.hint.as_deref(), Some(REGION_HINT));
        let e = api_error(
            "GET /x",
            StatusCode::BAD_GATEWAY,
            "<html>\nbad gateway</html>",
        );
        assert_eq!(e.kind, ErrorKind::Api);
    }

    #[test]
    fn partial_delete_answers_name_the_failures() {
        let body = r#"[{"id":"a","status":"success"},{"id":"b","status":"error","error":"server_error"},
            {"instanceId":"c","statusCode":404,"error":"Instance not found"}]"#;
        assert_eq!(partial_failures(body), ["b: server_error"]);
    }

    #[test]
    fn an_instance_names_its_pool_by_tag_else_by_hostname() {
        let tagged: wire::Instance =
            read(json!({"hostname": "x", "tags": [{"key": POOL_TAG, "value": "Team Pool"}]}));
        assert_eq!(pool_of(&tagged).as_deref(), Some("Team Pool"));
        let as_object: wire::Instance = read(json!({"hostname": "x", "tags": {POOL_TAG: "p"}}));
        assert_eq!(pool_of(&as_object).as_deref(), Some("p"));
        let untagged: wire::Instance =
            read(json!({"hostname": hostname("sky-1a2b3c4d", "node-12"), "tags": null}));
        assert_eq!(pool_of(&untagged).as_deref(), Some("sky-1a2b3c4d"));
        for other in ["my-box", "sky-node-", "-node-1", "web-node-x"] {
            assert_eq!(
                pool_of(&read(json!({ "hostname": other }))),
                None,
                "{other}"
            );
        }
    }

    #[test]
    fn hostnames_are_valid_and_carry_the_pool() {
        assert_eq!(hostname("sky-0a1b2c3d", "node-1"), "sky-0a1b2c3d-node-1");
        assert_eq!(hostname("My_Pool!", "node-2"), "my-pool-node-2");
        let long = hostname(&"x".repeat(200), "node-10");
        assert!(
            long.len() <= MAX_HOSTNAME && long.ends_with("-node-10"),
            "{long}"
        );
        let instance: wire::Instance = read(json!({"hostname": "sky-1-node-1", "tags": []}));
        assert!(belongs_to(&instance, "sky-1"));
        assert!(!belongs_to(&instance, "sky-10"));
        let tagged: wire::Instance = read(
            json!({"hostname": "sky-1-node-1", "tags": [{"key": POOL_TAG, "value": "other"}]}),
        );
        assert!(
            !belongs_to(&tagged, "sky-1"),
            "the tag wins over the hostname"
        );
    }

    #[test]
    fn only_a_running_instance_with_an_ip_has_a_public_address() {
        let ip = |v: Value| public_ip(&read(v));
        assert_eq!(ip(json!({"status": "provisioning", "ip": null})), None);
        assert_eq!(
            ip(json!({"status": "provisioning", "ip": "203.0.113.5"})),
            None,
            "not running yet"
        );
        assert_eq!(ip(json!({"status": "running", "ip": null})), None);
        assert_eq!(ip(json!({"status": "running"})), None);
        assert_eq!(ip(json!({"status": "running", "ip": "not an ip"})), None);
        assert_eq!(
            ip(json!({"status": "running", "ip": " 203.0.113.5 "})),
            Some(IpAddr::from([203, 0, 113, 5]))
        );
        assert_eq!(
            ip(json!({"status": "running", "ip": "2001:db8::7"})),
            "2001:db8::7".parse().ok()
        );
    }

    #[test]
    fn the_open_port_notice_is_honest_about_what_is_open() {
        let notice = open_port_notice(7444, Some(IpAddr::from([198, 51, 100, 7])));
        assert!(notice.contains("UDP port 7444"), "{notice}");
        assert!(
            notice.contains("any address (not only 198.51.100.7)"),
            "{notice}"
        );
        assert!(notice.contains("certificate of the pool's CA"), "{notice}");
        assert!(!open_port_notice(7444, None).contains("not only"));
    }

    #[test]
    fn a_pool_never_claims_the_scripts_or_instances_of_a_pool_whose_name_it_prefixes() {
        assert!(is_pool_script("skyward-a-node-1", "a"));
        assert!(is_pool_script("skyward-a-b-node-12", "a-b"));
        assert!(!is_pool_script("skyward-a-b-node-1", "a"));
        assert!(!is_pool_script("skyward-a-node-", "a"));
        assert!(!is_pool_script("skyward-a-ssh-key", "a"));
        let untagged = |host: &str| -> wire::Instance { read(json!({ "hostname": host })) };
        assert!(belongs_to(&untagged("a-node-1"), "a"));
        assert!(!belongs_to(&untagged("a-b-node-1"), "a"));
        assert!(belongs_to(&untagged("a-b-node-1"), "a-b"));
    }

    #[test]
    fn the_pool_key_is_an_openssh_ed25519_line_of_a_fresh_pair() {
        use base64::Engine as _;
        let line = unusable_ssh_public_key("skyward-p-ssh-key").unwrap();
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts.len(), 3, "{line}");
        assert_eq!((parts[0], parts[2]), ("ssh-ed25519", "skyward-p-ssh-key"));
        let wire = base64::engine::general_purpose::STANDARD
            .decode(parts[1])
            .unwrap();
        // string "ssh-ed25519", then string <32-byte key>.
        assert_eq!(wire.len(), 4 + 11 + 4 + 32);
        assert_eq!(&wire[..4], &11u32.to_be_bytes());
        assert_eq!(&wire[4..15], b"ssh-ed25519");
        assert_eq!(&wire[15..19], &32u32.to_be_bytes());
        let again = unusable_ssh_public_key("skyward-p-ssh-key").unwrap();
        assert_ne!(line, again, "each pool gets a pair of its own");
        // Exact names: pool `a` never claims pool `a-ssh`'s key.
        assert_ne!(ssh_key_name("a-ssh"), ssh_key_name("a"));
        assert!(!ssh_key_name("a-ssh").starts_with(&ssh_key_name("a")));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let config = VerdaConfig {
            client_id: Some("id-1".into()),
            client_secret: Some("s3cr3t-value".into()),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("s3cr3t-value"));
        let verda = Verda::new(config);
        let shown = format!("{verda:?} {:?}", verda.api);
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
