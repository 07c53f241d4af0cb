//! VastAI: a marketplace of single machines. Every offer is one machine, so a pool of N
//! nodes rents N offers; nodes of one pool are kept on one physical cluster where one has
//! enough matching machines, and joined by an overlay network there.
//!
//! The API's shapes and quirks (see `docs/cloud-apis.md` and the `vastai` CLI):
//! - search is `POST /api/v0/bundles/` with `{field: {op: value}}` filters; the CLI sends
//!   numbers as strings, except the fields it scales (`gpu_ram`, `cpu_ram`: GB to MB), which
//!   it sends as numbers; GPU names use spaces ("RTX 4090");
//! - renting is `PUT /api/v0/asks/{offer}/` -> `{"success": true, "new_contract": ID}`;
//!   `onstart` (with `args`) is limited to 4096 characters, so the bootstrap goes gzipped;
//! - errors are `{"success": false, "error", "msg"}`, and a gone offer may come as
//!   `invalid_args` with `no_such_ask` only in `msg`; some answers say `success: false`
//!   with a 200;
//! - a wrong key answers 404 to a search (not 401), no key 403 "This action requires login.";
//! - 429s carry `{"detail": ...}`; `Retry-After` is honoured here, bounded;
//! - `actual_status` is null right after creation, then `loading`, then `running`; once
//!   `exited`, `unknown` or `offline` it never becomes `running`;
//! - instances are containers: no systemd; the agent is started by `onstart`;
//! - a container port is published by a docker-style option as an `env` key, as the CLI
//!   does (`{"-p 7444:7444/udp": "1"}`); the host maps it to a port of its own, which the
//!   instance then reports in `ports` (`{"7444/udp": [{"HostIp": "0.0.0.0", "HostPort":
//!   "41022"}]}`) beside the host's `public_ipaddr`. Only hosts with `direct_port_count`
//!   above 0 can publish ports, and nothing limits who reaches them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};
use sha2::Digest;
use tokio::time::Instant;

use super::http::{retry_after, Retry};
use super::{
    ErrorKind, Instance, NodeBootstrap, Provider, ProviderError, ProviderStatus, ProvisionRequest,
    NODE_TAG, POOL_TAG,
};
use skyward_core::catalog::{self, Accelerator, DeviceKind};
use skyward_core::offer::{Market, Offer, OfferedAccelerator};
use skyward_core::spec::PoolSpec;

const PROVIDER: &str = "vastai";
/// The public API; `VAST_URL` or [`VastAiConfig::api_url`] override it.
pub const DEFAULT_API_URL: &str = "https://console.vast.ai";
/// The image nodes run when the spec names none: a CUDA base image.
pub const DEFAULT_IMAGE: &str = "nvidia/cuda:12.4.1-base-ubuntu22.04";
/// `onstart`, `args` and `args_str` together may hold this many characters.
pub const ONSTART_LIMIT: usize = 4096;
/// Instance labels hold at most this many characters.
pub const LABEL_LIMIT: usize = 256;
/// The smallest disk VastAI rents, and the disk nodes get when the spec names none (GB).
pub const MIN_DISK_GB: u32 = 8;
pub const DEFAULT_DISK_GB: u32 = 32;
/// The range of bids VastAI accepts, in $/h.
pub const MIN_BID: f64 = 0.001;
pub const MAX_BID: f64 = 128.0;
/// How VastAI launches a container that runs `onstart` (the CLI's default).
const RUNTYPE: &str = "ssh";
/// Offers a search returns at most.
const SEARCH_LIMIT: u32 = 64;
/// Vendors report a little less GPU memory than the marketed size (a 16 GB T4 shows
/// 15360 MB): the `gpu_ram` filter asks for this share of the catalog's size.
const GPU_RAM_SHARE: f64 = 0.9;
/// Statuses from which an instance never reaches `running`.
const STUCK: &[&str] = &["exited", "unknown", "offline"];

/// One HTTP exchange, and connecting for it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls are sent again as [`Retry`] says: up to 5 sends, after `Retry-After` when the answer
/// gives one (at most 30 s), else after the SDK's 0.15 s x 1.5^n.
const RETRY: Retry = Retry {
    tries: 5,
    first_backoff: Duration::from_millis(150),
    factor: 1.5,
    max_backoff: Duration::from_secs(30),
    max_wait: Duration::from_secs(30),
};
/// How many other offers one provisioning tries in place of gone ones.
const MAX_SUBSTITUTES: usize = 4;
/// The first pause between polls; it doubles up to the configured poll interval.
const FIRST_POLL: Duration = Duration::from_millis(250);
/// Polls an instance may be missing from the listing before it counts as gone.
const MISSING_POLLS: u32 = 3;

const AUTH_HINT: &str =
    "set VAST_API_KEY (or run `vastai set api-key KEY`) to a key from https://cloud.vast.ai/manage-keys/";
const NO_OFFERS_HINT: &str = "lower min_reliability, widen geolocation, or try another accelerator";
const GONE_HINT: &str =
    "the offer was rented by someone else: choose another (`skyward offers --provider vastai`)";

/// How Skyward uses VastAI. The key never appears in `Debug` output.
#[derive(Clone)]
pub struct VastAiConfig {
    /// Country codes offers must be in ("US", or "US,CA"); `None`: anywhere. A spec's region
    /// takes precedence.
    pub geolocation: Option<String>,
    /// The least host reliability (0..1) an offer needs.
    pub min_reliability: f64,
    /// Spot (interruptible) bids are the offer's `min_bid` times this (at least 1).
    pub bid_multiplier: f64,
    /// When set, each instance destroys itself this long after it starts.
    pub auto_shutdown: Option<Duration>,
    /// The API's base URL; `None` is [`DEFAULT_API_URL`].
    pub api_url: Option<String>,
    pub api_key: Option<String>,
    /// How long instances get to reach `running` after they are created.
    pub running_timeout: Duration,
    /// How long teardown waits for every instance of a pool to be gone.
    pub teardown_timeout: Duration,
    /// The longest pause between two polls of the API.
    pub poll_interval: Duration,
}

impl Default for VastAiConfig {
    fn default() -> Self {
        VastAiConfig {
            geolocation: None,
            min_reliability: 0.9,
            bid_multiplier: 1.0,
            auto_shutdown: None,
            api_url: None,
            api_key: None,
            running_timeout: Duration::from_secs(900),
            teardown_timeout: Duration::from_secs(180),
            poll_interval: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for VastAiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VastAiConfig")
            .field("geolocation", &self.geolocation)
            .field("min_reliability", &self.min_reliability)
            .field("bid_multiplier", &self.bid_multiplier)
            .field("auto_shutdown", &self.auto_shutdown)
            .field("api_url", &self.api_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("running_timeout", &self.running_timeout)
            .field("teardown_timeout", &self.teardown_timeout)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

/// Where the key came from (for `skyward providers`), or where it was looked for.
#[derive(Debug, Clone)]
enum KeySource {
    Found(String),
    Missing(String),
}

/// The key the `vastai` CLI would use: `VAST_API_KEY`, else the file `vastai set api-key`
/// writes (`$XDG_CONFIG_HOME/vastai/vast_api_key`, by default
/// `~/.config/vastai/vast_api_key`), else the legacy `~/.vast_api_key`.
/// `var` reads the environment (a parameter, for tests).
fn find_key(var: &dyn Fn(&str) -> Option<String>) -> (Option<String>, KeySource) {
    let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if let Some(key) = var("VAST_API_KEY") {
        return (
            Some(key.trim().to_string()),
            KeySource::Found("VAST_API_KEY".into()),
        );
    }
    let home = var("HOME").map(PathBuf::from);
    let config = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".config")));
    let files: Vec<PathBuf> = config
        .map(|c| c.join("vastai").join("vast_api_key"))
        .into_iter()
        .chain(home.map(|h| h.join(".vast_api_key")))
        .collect();
    for file in &files {
        if let Ok(text) = std::fs::read_to_string(file) {
            let key = text.trim();
            if !key.is_empty() {
                return (
                    Some(key.to_string()),
                    KeySource::Found(file.display().to_string()),
                );
            }
        }
    }
    let looked: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let looked = if looked.is_empty() {
        "no key file (HOME is not set)".to_string()
    } else {
        format!("no key in {}", looked.join(" or "))
    };
    (
        None,
        KeySource::Missing(format!("VAST_API_KEY is not set and {looked}")),
    )
}

/// What the pool remembers between `failed_nodes` calls, so that the API is not polled at
/// the pool's pace.
struct FailedCheck {
    at: Instant,
    failed: Vec<(String, String)>,
}

pub struct VastAi {
    config: VastAiConfig,
    key_source: KeySource,
    /// The API root (`https://console.vast.ai`), or why it is unusable.
    base: Result<Url, String>,
    http: Result<reqwest::Client, String>,
    /// Cluster ids and prices of offers seen in searches, by offer id.
    seen: Mutex<HashMap<u64, RawOffer>>,
    failed_checks: Mutex<HashMap<String, FailedCheck>>,
}

impl std::fmt::Debug for VastAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VastAi")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What an API call is for, as far as reading its errors and sending it again are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Search,
    Rent,
    Other,
}

impl VastAiConfig {
    /// Applies `--provider-opt vastai.KEY=VALUE` settings.
    pub fn apply(&mut self, mut settings: super::Settings) -> Result<(), String> {
        self.geolocation = settings.take("geolocation")?.or(self.geolocation.take());
        if let Some(reliability) = settings.take::<f64>("min_reliability")? {
            if !(0.0..=1.0).contains(&reliability) {
                return Err(
                    "vastai.min_reliability is a fraction between 0 and 1, e.g. 0.95".into(),
                );
            }
            self.min_reliability = reliability;
        }
        if let Some(multiplier) = settings.take::<f64>("bid_multiplier")? {
            if multiplier <= 0.0 {
                return Err("vastai.bid_multiplier must be positive, e.g. 1.2".into());
            }
            self.bid_multiplier = multiplier;
        }
        if let Some(after) = settings.take::<humantime::Duration>("auto_shutdown")? {
            self.auto_shutdown = Some(after.into());
        }
        self.api_url = settings.take("api_url")?.or(self.api_url.take());
        settings.finish(&[
            "geolocation",
            "min_reliability",
            "bid_multiplier",
            "auto_shutdown",
            "api_url",
        ])
    }
}

impl VastAi {
    /// Never fails: a missing key or a bad URL is reported by every call that needs them
    /// (and by [`Provider::status`]), so that other providers stay usable.
    pub fn new(config: VastAiConfig) -> Self {
        let key_source = match &config.api_key {
            Some(_) => KeySource::Found("the configuration".into()),
            None => KeySource::Missing("no API key was configured".into()),
        };
        Self::with_source(config, key_source)
    }

    /// From `VAST_API_KEY` (else the key file `vastai set api-key` writes) and `VAST_URL`
    /// (default `https://console.vast.ai`).
    pub fn from_env() -> Self {
        match Self::from_env_with(|_| Ok::<(), std::convert::Infallible>(())) {
            Ok(vastai) => vastai,
            Err(never) => match never {},
        }
    }

    /// Like [`from_env`](Self::from_env), with `tune` adjusting the config first.
    pub fn from_env_with<E>(
        tune: impl FnOnce(&mut VastAiConfig) -> Result<(), E>,
    ) -> Result<Self, E> {
        let var = |name: &str| std::env::var(name).ok();
        let (api_key, key_source) = find_key(&var);
        let mut config = VastAiConfig {
            api_key,
            api_url: var("VAST_URL").filter(|v| !v.trim().is_empty()),
            ..VastAiConfig::default()
        };
        tune(&mut config)?;
        Ok(Self::with_source(config, key_source))
    }

    fn with_source(mut config: VastAiConfig, key_source: KeySource) -> Self {
        // reqwest finds rustls' process-wide provider; make sure there is one.
        skyward_common::install_crypto_provider();
        config.api_key = config
            .api_key
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty());
        let key_source = match (&config.api_key, key_source) {
            (None, KeySource::Found(_)) => KeySource::Missing("the API key is empty".into()),
            (_, source) => source,
        };
        let base = parse_base(config.api_url.as_deref().unwrap_or(DEFAULT_API_URL));
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect could carry the key to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("skyward/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"));
        VastAi {
            config,
            key_source,
            base,
            http,
            seen: Mutex::new(HashMap::new()),
            failed_checks: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &VastAiConfig {
        &self.config
    }

    fn error(kind: ErrorKind, message: impl Into<String>) -> ProviderError {
        ProviderError::new(PROVIDER, kind, message)
    }

    /// The client, base URL and key, or the error every call reports without them.
    fn ready(&self) -> Result<(&reqwest::Client, &Url, &str), ProviderError> {
        let key = match (&self.config.api_key, &self.key_source) {
            (Some(key), _) => key.as_str(),
            (None, KeySource::Missing(why)) => {
                return Err(Self::error(ErrorKind::Auth, format!("no API key: {why}"))
                    .hint("export VAST_API_KEY or run `vastai set api-key KEY`"))
            }
            (None, KeySource::Found(_)) => {
                return Err(Self::error(ErrorKind::Auth, "no API key").hint(AUTH_HINT))
            }
        };
        let base = self.base.as_ref().map_err(|why| {
            Self::error(ErrorKind::Invalid, why.clone())
                .hint("set VAST_URL to an http(s) URL such as https://console.vast.ai")
        })?;
        let http = self
            .http
            .as_ref()
            .map_err(|why| Self::error(ErrorKind::Api, why.clone()))?;
        if !(self.config.bid_multiplier.is_finite() && self.config.bid_multiplier >= 1.0) {
            return Err(Self::error(
                ErrorKind::Invalid,
                format!(
                    "bid_multiplier {} is not a number of at least 1 (bids under min_bid are refused)",
                    self.config.bid_multiplier
                ),
            )
            .hint("set bid_multiplier to 1.0 or more"));
        }
        Ok((http, base, key))
    }

    /// How this provider polls, for up to `limit`.
    fn polling(&self, limit: Duration) -> super::Polling {
        super::Polling {
            first: FIRST_POLL,
            max: self.config.poll_interval,
            limit,
        }
    }

    /// One API call, `path` under `/api/v0`, sent again as [`RETRY`] says. Returns the status
    /// and body of whatever answer ended it.
    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
        idempotent: bool,
    ) -> Result<(StatusCode, bytes::Bytes), ProviderError> {
        let (http, base, key) = self.ready()?;
        let api = super::http::Api {
            provider: PROVIDER,
            http,
            base,
            token: key,
            url_variable: "VAST_URL",
        };
        let url = api.url("/api/v0", path, query);
        api.call(what, method, &url, body, idempotent, &RETRY, retry_after)
            .await
    }

    /// A call whose every non-2xx answer (and every `success: false`) is an error.
    async fn call_ok(
        &self,
        what: &str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
        kind: Call,
    ) -> Result<bytes::Bytes, ProviderError> {
        // A search is a read sent as a POST; a rental is a create sent as a PUT.
        let idempotent = match kind {
            Call::Search => true,
            Call::Rent => false,
            Call::Other => super::http::idempotent(&method),
        };
        let (status, bytes) = self
            .call(what, method, path, query, body, idempotent)
            .await?;
        check(what, status, bytes, kind)
    }

    /// Offers for one market, as VastAI lists them (unfiltered here).
    async fn search(
        &self,
        spec: &PoolSpec,
        market: Market,
    ) -> Result<Vec<RawOffer>, ProviderError> {
        let query = self.search_query(spec, market)?;
        let what = format!("searching {} offers", market_word(market));
        let bytes = self
            .call_ok(
                &what,
                Method::POST,
                "/bundles/",
                &[],
                Some(&query),
                Call::Search,
            )
            .await?;
        let answer: Offers = parse(&what, &bytes)?;
        let mut seen = self.seen.lock().expect("seen lock");
        if seen.len() > 10_000 {
            seen.clear();
        }
        for offer in &answer.offers {
            seen.insert(offer.id, offer.clone());
        }
        Ok(answer.offers)
    }

    /// The search body the CLI would send for `spec` on `market`.
    fn search_query(&self, spec: &PoolSpec, market: Market) -> Result<Value, ProviderError> {
        let mut q = Map::new();
        // The CLI's defaults.
        q.insert("verified".into(), json!({"eq": true}));
        q.insert("external".into(), json!({"eq": false}));
        q.insert("rentable".into(), json!({"eq": true}));
        q.insert("rented".into(), json!({"eq": false}));
        q.insert(
            "reliability".into(),
            json!({"gte": number_text(self.config.min_reliability)}),
        );
        if let Some(wanted) = &spec.accelerator {
            let accelerator = wanted.accelerator;
            if accelerator.kind == DeviceKind::AwsNeuron {
                return Err(Self::error(
                    ErrorKind::NoOffers,
                    format!("VastAI has no {} machines", accelerator.name),
                )
                .hint("use --provider aws for Trainium and Inferentia"));
            }
            let names = vast_gpu_names(accelerator);
            q.insert(
                "gpu_name".into(),
                match names.as_slice() {
                    [one] => json!({"eq": one}),
                    many => json!({"in": many}),
                },
            );
            q.insert("num_gpus".into(), json!({"eq": wanted.count.to_string()}));
            let floor_gb = accelerator.min_memory_gb.unwrap_or(accelerator.memory_gb) as f64;
            q.insert(
                "gpu_ram".into(),
                json!({"gte": (floor_gb * GPU_RAM_SHARE * 1000.0).round()}),
            );
        }
        if let Some(vcpus) = spec.vcpus {
            q.insert(
                "cpu_cores_effective".into(),
                json!({"gte": vcpus.to_string()}),
            );
        }
        if let Some(memory) = spec.memory_gb {
            q.insert("cpu_ram".into(), json!({"gte": (memory * 1000.0).round()}));
        }
        let disk = disk_gb(spec);
        q.insert("disk_space".into(), json!({"gte": disk.to_string()}));
        if spec.reverse {
            // The agent's port must be published, which hosts without direct ports cannot.
            q.insert("direct_port_count".into(), json!({"gte": "1"}));
        }
        let codes = self.geolocations(spec);
        match codes.as_slice() {
            [] => {}
            [one] => {
                q.insert("geolocation".into(), json!({"eq": one}));
            }
            many => {
                q.insert("geolocation".into(), json!({"in": many}));
            }
        }
        let price_field = match market {
            Market::OnDemand => "dph_total",
            Market::Spot => "min_bid",
        };
        if let Some(max) = spec.max_price_per_hour {
            let limit = match market {
                Market::OnDemand => max,
                Market::Spot => max / self.config.bid_multiplier,
            };
            q.insert(price_field.into(), json!({"lte": number_text(limit)}));
        }
        q.insert("order".into(), json!([[price_field, "asc"]]));
        q.insert(
            "type".into(),
            json!(match market {
                Market::OnDemand => "on-demand",
                Market::Spot => "bid",
            }),
        );
        q.insert("limit".into(), json!(SEARCH_LIMIT));
        q.insert("allocated_storage".into(), json!(disk as f64));
        Ok(Value::Object(q))
    }

    /// Country codes to search in: the spec's region, else the configured geolocation.
    fn geolocations(&self, spec: &PoolSpec) -> Vec<String> {
        spec.region
            .as_deref()
            .or(self.config.geolocation.as_deref())
            .unwrap_or("")
            .split(',')
            .map(|c| c.trim().to_ascii_uppercase())
            .filter(|c| !c.is_empty())
            .collect()
    }

    /// The offer Skyward shows for a VastAI offer on `markets`, or `None` when it cannot
    /// serve the spec (an unknown GPU where one is wanted, too unreliable).
    fn to_offer(&self, raw: &RawOffer, spec: &PoolSpec, markets: &[Market]) -> Option<Offer> {
        let reliability = raw.reliability.or(raw.reliability2).unwrap_or(0.0);
        if reliability + 1e-9 < self.config.min_reliability {
            return None;
        }
        let count = raw.num_gpus.unwrap_or(0);
        let gpu_name = raw.gpu_name.as_deref().unwrap_or("").trim();
        let accelerator = if count > 0 && !gpu_name.is_empty() {
            catalog::identify(gpu_name, raw.gpu_ram.map(|mb| mb / 1000.0))
                .map(|accelerator| OfferedAccelerator { accelerator, count })
        } else {
            None
        };
        if spec.accelerator.is_some() && accelerator.is_none() {
            return None;
        }
        let instance_type = if gpu_name.is_empty() || count == 0 {
            format!("cpu (offer {})", raw.id)
        } else {
            format!("{count}x {gpu_name} (offer {})", raw.id)
        };
        Some(Offer {
            provider: PROVIDER.into(),
            region: region_of(raw.geolocation.as_deref(), spec.region.as_deref()),
            instance_type,
            accelerator,
            vcpus: raw.cpu_cores_effective.unwrap_or(0.0).max(0.0).floor() as u32,
            memory_gb: (raw.cpu_ram.unwrap_or(0.0) / 100.0).round() / 10.0,
            on_demand_per_hour: if markets.contains(&Market::OnDemand) {
                raw.dph_total
            } else {
                None
            },
            spot_per_hour: if markets.contains(&Market::Spot) {
                raw.min_bid.map(|b| self.bid(b))
            } else {
                None
            },
            available: true,
            spot_available: None,
            provider_ref: raw.id.to_string(),
        })
    }

    /// What Skyward bids for an offer whose minimum bid is `min_bid`: that times the
    /// multiplier, to the millionth, never under the minimum.
    fn bid(&self, min_bid: f64) -> f64 {
        let bid = (min_bid * self.config.bid_multiplier * 1e6).round() / 1e6;
        bid.max((min_bid * 1e6 - 1e-3).ceil() / 1e6)
    }

    /// Whether `raw` could stand in for the chosen offer: it fits the spec within the price.
    fn fits(&self, raw: &RawOffer, spec: &PoolSpec, market: Market) -> bool {
        self.to_offer(raw, spec, &[market])
            .is_some_and(|o| spec.mismatch(&o).is_none() && spec.price(&o, market).is_some())
    }

    fn price_of(&self, raw: &RawOffer, market: Market) -> f64 {
        match market {
            Market::OnDemand => raw.dph_total,
            Market::Spot => raw.min_bid.map(|b| self.bid(b)),
        }
        .unwrap_or(f64::INFINITY)
    }

    /// The `onstart` of one node: the optional auto-shutdown timer and the node's bootstrap,
    /// gzipped behind a loader, checked against VastAI's limit.
    fn onstart(
        &self,
        request: &ProvisionRequest,
        node: &NodeBootstrap,
    ) -> Result<String, ProviderError> {
        let mut script = String::new();
        let needs_curl =
            self.config.auto_shutdown.is_some() || request.bootstrap.agent_url.is_some();
        if needs_curl {
            script.push_str(FETCH_TOOLS);
        }
        if let Some(after) = self.config.auto_shutdown {
            let root = self
                .base
                .as_ref()
                .map(super::http::base_display)
                .unwrap_or_default();
            script.push_str(&auto_shutdown_script(after, &root));
        }
        script.push_str(&request.user_data(node));
        let packed = crate::bootstrap::compress(&script);
        if packed.len() > ONSTART_LIMIT {
            return Err(Self::error(
                ErrorKind::Invalid,
                format!(
                    "the onstart of {} is {} characters even gzipped, over VastAI's {ONSTART_LIMIT}",
                    node.node_id,
                    packed.len()
                ),
            )
            .hint("turn auto_shutdown off or use a shorter pool name"));
        }
        Ok(packed)
    }

    async fn rent(
        &self,
        rent: &Rent<'_>,
        offer_id: u64,
        bid: Option<f64>,
    ) -> Result<u64, ProviderError> {
        let mut body = json!({
            "client_id": "me",
            "image": rent.image,
            "env": rent.env,
            "disk": rent.disk,
            "label": rent.label,
            "onstart": rent.onstart,
            "runtype": RUNTYPE,
        });
        if let Some(price) = bid {
            if !(MIN_BID..=MAX_BID).contains(&price) {
                return Err(Self::error(
                    ErrorKind::Invalid,
                    format!(
                        "the bid of ${price}/h for offer {offer_id} is outside VastAI's {MIN_BID}..{MAX_BID}"
                    ),
                )
                .hint("adjust bid_multiplier"));
            }
            body["price"] = json!(price);
        }
        let what = format!("renting offer {offer_id} for {}", rent.node_id);
        let bytes = self
            .call_ok(
                &what,
                Method::PUT,
                &format!("/asks/{offer_id}/"),
                &[],
                Some(&body),
                Call::Rent,
            )
            .await?;
        let answer: Created = parse(&what, &bytes)?;
        let id = answer.new_contract.ok_or_else(|| {
            Self::error(
                ErrorKind::Api,
                format!("{what}: the answer names no new_contract"),
            )
            .hint("VAST_URL may point at something else than the VastAI API")
        })?;
        tracing::info!(node = %rent.node_id, offer = offer_id, instance = id, "VastAI instance created");
        Ok(id)
    }

    async fn create_overlay(&self, cluster_id: u64, name: &str) -> Result<(), ProviderError> {
        self.call_ok(
            &format!("creating overlay {name} on cluster {cluster_id}"),
            Method::POST,
            "/overlay/",
            &[],
            Some(&json!({"cluster_id": cluster_id, "name": name})),
            Call::Other,
        )
        .await
        .map(|_| ())
    }

    async fn join_overlay(&self, name: &str, instance_id: u64) -> Result<(), ProviderError> {
        self.call_ok(
            &format!("joining instance {instance_id} to overlay {name}"),
            Method::PUT,
            "/overlay/",
            &[],
            Some(&json!({"name": name, "instance_id": instance_id})),
            Call::Other,
        )
        .await
        .map(|_| ())
    }

    /// Deletes the overlay named `name` if it exists; whether it did.
    async fn delete_overlay(&self, name: &str) -> Result<bool, ProviderError> {
        let what = "listing overlays";
        let bytes = self
            .call_ok(what, Method::GET, "/overlay/", &[], None, Call::Other)
            .await?;
        let overlays: Vec<Overlay> = parse(what, &bytes)?;
        if !overlays.iter().any(|o| o.name == name) {
            return Ok(false);
        }
        let what = format!("deleting overlay {name}");
        let (status, bytes) = self
            .call(
                &what,
                Method::DELETE,
                "/overlay/",
                &[],
                Some(&json!({"overlay_name": name})),
                true,
            )
            .await?;
        if status != StatusCode::NOT_FOUND {
            check(&what, status, bytes, Call::Other)?;
        }
        Ok(true)
    }

    async fn instances(&self) -> Result<Vec<RawInstance>, ProviderError> {
        let what = "listing instances";
        let bytes = self
            .call_ok(
                what,
                Method::GET,
                "/instances/",
                &[("owner", "me")],
                None,
                Call::Other,
            )
            .await?;
        Ok(parse::<Instances>(what, &bytes)?.instances)
    }

    async fn pool_instances(&self, pool: &str) -> Result<Vec<RawInstance>, ProviderError> {
        Ok(self
            .instances()
            .await?
            .into_iter()
            .filter(|i| i.pool().as_deref() == Some(pool))
            .collect())
    }

    /// Destroys an instance; one already gone is fine.
    async fn destroy(&self, id: u64) -> Result<(), ProviderError> {
        let what = format!("destroying instance {id}");
        let (status, bytes) = self
            .call(
                &what,
                Method::DELETE,
                &format!("/instances/{id}/"),
                &[],
                Some(&json!({})),
                true,
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        check(&what, status, bytes, Call::Other).map(|_| ())
    }

    /// Rents `offer` (or, when it is gone and substitutes are allowed, the next spare) for
    /// one node and joins it to the overlay. Returns the instance and the offer used.
    async fn rent_with_substitutes(
        &self,
        plan: &mut Plan,
        rent: &Rent<'_>,
        first: Candidate,
        may_substitute: bool,
    ) -> Result<(u64, u64), ProviderError> {
        let mut candidate = first;
        loop {
            plan.tried.insert(candidate.id);
            match self.rent(rent, candidate.id, candidate.bid).await {
                Ok(instance) => {
                    if let Some(name) = &plan.overlay {
                        self.join_overlay(name, instance).await?;
                    }
                    return Ok((instance, candidate.id));
                }
                Err(e) if e.kind == ErrorKind::Capacity && may_substitute => {
                    if plan.substitutes >= MAX_SUBSTITUTES {
                        return Err(e);
                    }
                    let Some(next) = plan.next_spare() else {
                        return Err(e);
                    };
                    plan.substitutes += 1;
                    tracing::warn!("{e}; trying offer {} instead", next.id);
                    candidate = next;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Polls until every created instance runs. One that gets stuck is destroyed and
    /// replaced once, on another offer.
    async fn wait_running(
        &self,
        plan: &mut Plan,
        rents: &[Rent<'_>],
        created: &mut [Node],
        request: &ProvisionRequest,
        market: Market,
    ) -> Result<(), ProviderError> {
        let mut poller = self.polling(self.config.running_timeout).start();
        loop {
            let listed: HashMap<u64, RawInstance> = self
                .instances()
                .await?
                .into_iter()
                .map(|i| (i.id, i))
                .collect();
            let mut pending = Vec::new();
            for (index, node) in created.iter_mut().enumerate() {
                if node.running {
                    continue;
                }
                let (status, detail) = match listed.get(&node.instance) {
                    Some(instance) => {
                        node.missing = 0;
                        (
                            instance.actual_status.clone().unwrap_or_default(),
                            instance.status_msg.clone().unwrap_or_default(),
                        )
                    }
                    None => {
                        node.missing += 1;
                        if node.missing < MISSING_POLLS {
                            pending.push(node.instance.to_string());
                            continue;
                        }
                        ("gone".to_string(), String::new())
                    }
                };
                if status == "running" {
                    node.running = true;
                    tracing::info!(node = %rents[index].node_id, instance = node.instance, "VastAI instance running");
                    continue;
                }
                if !(STUCK.contains(&status.as_str()) || status == "gone") {
                    pending.push(node.instance.to_string());
                    continue;
                }
                let detail = super::http::one_line(&detail, 300);
                let why = format!(
                    "instance {} ({}) on offer {} is {status}{}",
                    node.instance,
                    rents[index].node_id,
                    node.offer,
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                );
                if let Err(e) = self.destroy(node.instance).await {
                    tracing::warn!("{why}; destroying it: {e}");
                }
                if node.replaced {
                    return Err(Self::error(
                        ErrorKind::Capacity,
                        format!("{why}, and it already replaced one that failed"),
                    )
                    .hint("try another offer or a higher min_reliability"));
                }
                if plan.spares.is_none() {
                    self.load_spares(plan, &request.spec, market).await?;
                }
                let Some(next) = plan.next_spare() else {
                    return Err(Self::error(
                        ErrorKind::Capacity,
                        format!("{why}, and no other matching offer is left to retry on"),
                    )
                    .hint(NO_OFFERS_HINT));
                };
                tracing::warn!("{why}; retrying on offer {}", next.id);
                let (instance, offer) = self
                    .rent_with_substitutes(plan, &rents[index], next, true)
                    .await?;
                *node = Node {
                    instance,
                    offer,
                    running: false,
                    replaced: true,
                    missing: 0,
                };
                pending.push(instance.to_string());
            }
            if pending.is_empty() {
                return Ok(());
            }
            if !poller.pause().await {
                return Err(Self::error(
                    ErrorKind::Capacity,
                    format!(
                        "instances {} not running after {}",
                        pending.join(", "),
                        humantime::format_duration(self.config.running_timeout)
                    ),
                )
                .hint("the host may be slow to pull the image: try another offer or a smaller --image"));
            }
        }
    }

    /// Fills `plan.spares` from a fresh search.
    async fn load_spares(
        &self,
        plan: &mut Plan,
        spec: &PoolSpec,
        market: Market,
    ) -> Result<(), ProviderError> {
        let listing = self.search(spec, market).await?;
        self.set_spares(plan, listing, spec, market);
        Ok(())
    }

    /// Fills `plan.spares` with the offers of `listing` that fit and were not tried,
    /// cheapest first (only those in the overlay's cluster when there is one).
    fn set_spares(&self, plan: &mut Plan, listing: Vec<RawOffer>, spec: &PoolSpec, market: Market) {
        let mut spares: Vec<RawOffer> = listing
            .into_iter()
            .filter(|o| !plan.tried.contains(&o.id) && self.fits(o, spec, market))
            .filter(|o| plan.cluster.is_none() || o.cluster_id == plan.cluster)
            .collect();
        spares.sort_by(|a, b| {
            self.price_of(a, market)
                .total_cmp(&self.price_of(b, market))
        });
        plan.spares = Some(
            spares
                .into_iter()
                .map(|o| Candidate {
                    id: o.id,
                    bid: match market {
                        Market::Spot => o.min_bid.map(|b| self.bid(b)),
                        Market::OnDemand => None,
                    },
                })
                .collect(),
        );
    }

    async fn check_failed(&self, pool: &str) -> Result<Vec<(String, String)>, ProviderError> {
        Ok(self
            .pool_instances(pool)
            .await?
            .into_iter()
            .filter_map(|i| {
                let status = i.actual_status.as_deref()?;
                if !STUCK.contains(&status) {
                    return None;
                }
                let node = i.node().unwrap_or_else(|| format!("instance {}", i.id));
                let detail = one_line(i.status_msg.as_deref().unwrap_or(""));
                let why = if detail.is_empty() {
                    format!("VastAI instance {} is {status}", i.id)
                } else {
                    format!("VastAI instance {} is {status}: {detail}", i.id)
                };
                Some((node, why))
            })
            .collect())
    }
}

/// The offers one provisioning may use, and what it has tried.
struct Plan {
    /// Other offers that fit, cheapest first; `None` until first needed.
    spares: Option<VecDeque<Candidate>>,
    tried: HashSet<u64>,
    substitutes: usize,
    /// The cluster every node must be on (when the pool has an overlay).
    cluster: Option<u64>,
    overlay: Option<String>,
}

impl Plan {
    fn next_spare(&mut self) -> Option<Candidate> {
        let spares = self.spares.as_mut()?;
        while let Some(next) = spares.pop_front() {
            if !self.tried.contains(&next.id) {
                return Some(next);
            }
        }
        None
    }
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u64,
    /// The bid, for spot.
    bid: Option<f64>,
}

/// Everything a node's rental sends but the offer and the bid.
struct Rent<'a> {
    node_id: &'a str,
    image: &'a str,
    env: &'a Value,
    disk: u32,
    label: String,
    onstart: String,
}

/// A created instance being waited for.
struct Node {
    instance: u64,
    offer: u64,
    running: bool,
    /// It already replaced one that got stuck.
    replaced: bool,
    /// Polls in a row it was missing from the listing.
    missing: u32,
}

#[async_trait]
impl Provider for VastAi {
    fn name(&self) -> &str {
        PROVIDER
    }

    async fn offers(&self, spec: &PoolSpec) -> Result<Vec<Offer>, ProviderError> {
        self.ready()?;
        let mut offers: Vec<Offer> = Vec::new();
        let mut index: HashMap<u64, usize> = HashMap::new();
        for &market in spec.allocation.markets() {
            for raw in self.search(spec, market).await? {
                let Some(offer) = self.to_offer(&raw, spec, &[market]) else {
                    continue;
                };
                match index.get(&raw.id) {
                    Some(&i) => {
                        let known = &mut offers[i];
                        known.on_demand_per_hour =
                            known.on_demand_per_hour.or(offer.on_demand_per_hour);
                        known.spot_per_hour = known.spot_per_hour.or(offer.spot_per_hour);
                    }
                    None => {
                        index.insert(raw.id, offers.len());
                        offers.push(offer);
                    }
                }
            }
        }
        if offers.is_empty() {
            return Err(Self::error(
                ErrorKind::NoOffers,
                format!("no offers available for {}", spec.describe()),
            )
            .hint(NO_OFFERS_HINT));
        }
        Ok(offers)
    }

    async fn provision(
        &self,
        request: &ProvisionRequest,
        offer: &Offer,
        market: Market,
    ) -> Result<Vec<Instance>, ProviderError> {
        self.ready()?;
        let primary: u64 = offer.provider_ref.trim().parse().map_err(|_| {
            Self::error(
                ErrorKind::Invalid,
                format!("offer {:?} is not a VastAI offer id", offer.provider_ref),
            )
            .hint("use an offer from `skyward offers --provider vastai`")
        })?;
        let primary_bid = match market {
            Market::OnDemand => None,
            Market::Spot => Some(offer.spot_per_hour.ok_or_else(|| {
                Self::error(
                    ErrorKind::NoOffers,
                    format!("offer {primary} is not sold as interruptible"),
                )
                .hint("use --allocation on-demand or spot-if-available")
            })?),
        };
        let spec = &request.spec;
        let image = spec
            .image
            .as_deref()
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .unwrap_or(DEFAULT_IMAGE);
        let disk = disk_gb(spec);
        let nodes = request.nodes.len();
        let mut plan = Plan {
            spares: None,
            tried: HashSet::from([primary]),
            substitutes: 0,
            cluster: None,
            overlay: None,
        };
        // Several nodes need several machines: on the chosen one's cluster when it has
        // enough of them that fit, else wherever they are cheapest.
        if nodes > 1 {
            let listing = self.search(spec, market).await?;
            let cluster = listing
                .iter()
                .find(|o| o.id == primary)
                .and_then(|o| o.cluster_id)
                .or_else(|| {
                    self.seen
                        .lock()
                        .expect("seen lock")
                        .get(&primary)
                        .and_then(|o| o.cluster_id)
                });
            let fitting: Vec<&RawOffer> = listing
                .iter()
                .filter(|o| o.id != primary && self.fits(o, spec, market))
                .collect();
            let in_cluster = fitting
                .iter()
                .filter(|o| cluster.is_some() && o.cluster_id == cluster)
                .count();
            if cluster.is_some() && in_cluster >= nodes - 1 {
                plan.cluster = cluster;
            } else {
                tracing::warn!(
                    "no VastAI cluster has {nodes} matching machines with offer {primary}: nodes will reach each other only over the internet"
                );
            }
            self.set_spares(&mut plan, listing, spec, market);
            let spare_count = plan.spares.as_ref().map_or(0, VecDeque::len);
            if spare_count < nodes - 1 {
                return Err(Self::error(
                    ErrorKind::NoOffers,
                    format!(
                        "{nodes} nodes need {nodes} VastAI offers (each is one machine), but only {} fit",
                        spare_count + 1
                    ),
                )
                .hint(NO_OFFERS_HINT));
            }
            if let Some(cluster) = plan.cluster {
                plan.overlay = Some(overlay_name(&request.pool));
                tracing::info!(
                    cluster,
                    "all {nodes} nodes on one VastAI cluster, joined by an overlay network"
                );
            }
        }
        let mut env = match plan.overlay {
            // Inside an overlay, eth0 is the overlay interface.
            Some(_) => json!({"NCCL_SOCKET_IFNAME": "eth0"}),
            None => json!({}),
        };
        if let Some(reverse) = &request.bootstrap.reverse {
            env[port_option(reverse.agent_port)] = json!("1");
            let only = reverse
                .allow_from
                .map(|ip| format!(", not only to {ip}"))
                .unwrap_or_default();
            tracing::warn!(
                "VastAI has no source filter: each node's UDP port {} is open to anyone{only}, guarded by the agent's mutual TLS with the pool's CA",
                reverse.agent_port
            );
        }
        // Every node's label and onstart are checked before anything is created.
        let mut rents = Vec::with_capacity(nodes);
        for node in &request.nodes {
            rents.push(Rent {
                node_id: &node.node_id,
                image,
                env: &env,
                disk,
                label: label(&request.pool, &node.node_id)?,
                onstart: self.onstart(request, node)?,
            });
        }
        if let (Some(cluster), Some(name)) = (plan.cluster, plan.overlay.clone()) {
            self.create_overlay(cluster, &name).await?;
        }
        let mut created: Vec<Node> = Vec::with_capacity(nodes);
        for (index, rent) in rents.iter().enumerate() {
            // The chosen offer is the pool's choice: when it is gone, the pool chooses again.
            let (first, may_substitute) = if index == 0 {
                (
                    Candidate {
                        id: primary,
                        bid: primary_bid,
                    },
                    false,
                )
            } else {
                let next = plan.next_spare().ok_or_else(|| {
                    Self::error(
                        ErrorKind::Capacity,
                        format!("no VastAI offer is left for {}", rent.node_id),
                    )
                    .hint(NO_OFFERS_HINT)
                })?;
                (next, true)
            };
            let (instance, offer) = self
                .rent_with_substitutes(&mut plan, rent, first, may_substitute)
                .await?;
            created.push(Node {
                instance,
                offer,
                running: false,
                replaced: false,
                missing: 0,
            });
        }
        self.wait_running(&mut plan, &rents, &mut created, request, market)
            .await?;
        // Hosts may report a port mapping only a little after the instance runs: those not
        // known yet come from `listen_addresses` while the pool waits.
        let addresses: HashMap<String, SocketAddr> =
            if let Some(reverse) = &request.bootstrap.reverse {
                self.listen_addresses(&request.pool, reverse)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .collect()
            } else {
                HashMap::new()
            };
        Ok(rents
            .iter()
            .zip(&created)
            .map(|(rent, node)| Instance {
                node_id: rent.node_id.to_string(),
                provider_id: node.instance.to_string(),
                address: addresses.get(rent.node_id).copied(),
            })
            .collect())
    }

    async fn failed_nodes(&self, pool: &str) -> Vec<(String, String)> {
        let interval = (self.config.poll_interval * 2).max(Duration::from_millis(200));
        if let Some(check) = self.failed_checks.lock().expect("failed lock").get(pool) {
            if check.at.elapsed() < interval {
                return check.failed.clone();
            }
        }
        let failed = match self.check_failed(pool).await {
            Ok(failed) => failed,
            Err(e) => {
                tracing::warn!("checking the VastAI instances of pool {pool}: {e}");
                Vec::new()
            }
        };
        self.failed_checks.lock().expect("failed lock").insert(
            pool.to_string(),
            FailedCheck {
                at: Instant::now(),
                failed: failed.clone(),
            },
        );
        failed
    }

    async fn teardown(&self, pool: &str) -> Result<(), ProviderError> {
        self.failed_checks.lock().expect("failed lock").remove(pool);
        // The published port goes with its instance: there is no rule to remove.
        if self.ready().is_err() {
            // Without a key (or a URL) nothing can have been created.
            return Ok(());
        }
        let overlay = overlay_name(pool);
        let mut poller = self.polling(self.config.teardown_timeout).start();
        let mut deleted: HashSet<u64> = HashSet::new();
        let mut overlay_left = true;
        let mut last_error: Option<ProviderError> = None;
        loop {
            // A failed listing (a rate limit, a blip) is retried until the deadline; a
            // refused key will not get better.
            let left = match self.pool_instances(pool).await {
                Ok(left) => Some(left),
                Err(e) if e.kind == ErrorKind::Auth => return Err(e),
                Err(e) => {
                    last_error = Some(e);
                    None
                }
            };
            for instance in left.iter().flatten() {
                if deleted.contains(&instance.id) {
                    continue;
                }
                match self.destroy(instance.id).await {
                    Ok(()) => {
                        deleted.insert(instance.id);
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            if overlay_left {
                match self.delete_overlay(&overlay).await {
                    Ok(existed) => overlay_left = existed,
                    Err(e) => last_error = Some(e),
                }
            }
            if left.as_ref().is_some_and(Vec::is_empty) && !overlay_left {
                return Ok(());
            }
            if !poller.pause().await {
                let ids: Vec<String> = match &left {
                    Some(left) => left.iter().map(|i| i.id.to_string()).collect(),
                    None => vec!["(unknown: the listing failed)".to_string()],
                };
                let what = match (ids.is_empty(), overlay_left) {
                    (false, true) => format!("instances {} and overlay {overlay}", ids.join(", ")),
                    (false, false) => format!("instances {}", ids.join(", ")),
                    (true, _) => format!("overlay {overlay}"),
                };
                let cause = last_error
                    .take()
                    .map(|e| format!(" (last error: {})", e.message))
                    .unwrap_or_default();
                return Err(Self::error(
                    ErrorKind::Api,
                    format!(
                        "{what} of pool {pool} still exist after {}{cause}",
                        humantime::format_duration(self.config.teardown_timeout)
                    ),
                )
                .hint("destroy them at https://cloud.vast.ai/instances/ or with `vastai destroy instance ID` and `vastai delete overlay NAME`"));
            }
        }
    }

    async fn terminate(&self, pool: &str, node_id: &str) -> Result<(), ProviderError> {
        if self.ready().is_err() {
            // Without a key (or a URL) nothing can have been created.
            return Ok(());
        }
        for instance in self.pool_instances(pool).await? {
            if instance.node().as_deref() == Some(node_id) {
                self.destroy(instance.id).await?;
            }
        }
        Ok(())
    }

    async fn status(&self) -> ProviderStatus {
        let mut status = ProviderStatus {
            provider: PROVIDER.into(),
            configured: self.config.api_key.is_some(),
            working: false,
            detail: String::new(),
        };
        let source = match &self.key_source {
            KeySource::Found(source) => source.clone(),
            KeySource::Missing(why) => {
                status.detail =
                    format!("{why}: export VAST_API_KEY or run `vastai set api-key KEY`");
                return status;
            }
        };
        let what = "checking the API key";
        match self
            .call_ok(what, Method::GET, "/users/current/", &[], None, Call::Other)
            .await
            .and_then(|bytes| parse::<Value>(what, &bytes))
        {
            Ok(_) => {
                status.working = true;
                let base = self
                    .base
                    .as_ref()
                    .map(super::http::base_display)
                    .unwrap_or_default();
                status.detail = format!("key from {source} accepted by {base}");
            }
            Err(e) => {
                status.detail = match &e.hint {
                    Some(hint) => format!("{} (key from {source}): {hint}", e.message),
                    None => format!("{} (key from {source})", e.message),
                }
            }
        }
        status
    }

    fn supports_reverse(&self) -> bool {
        true
    }

    async fn pools(&self) -> Result<Vec<String>, ProviderError> {
        let pools: std::collections::BTreeSet<String> = self
            .instances()
            .await?
            .iter()
            .filter_map(|i| i.pool())
            .collect();
        Ok(pools.into_iter().collect())
    }

    /// VastAI cannot filter the published port by source, so there is nothing to open to
    /// the coordinator's address alone.
    fn reverse_needs_public_ip(&self) -> bool {
        false
    }

    /// Instances are containers without the driver's MIG controls.
    fn supports_mig(&self) -> bool {
        false
    }

    async fn listen_addresses(
        &self,
        pool: &str,
        reverse: &crate::bootstrap::Reverse,
    ) -> Result<Vec<(String, SocketAddr)>, ProviderError> {
        let port = reverse.agent_port;
        Ok(self
            .pool_instances(pool)
            .await?
            .iter()
            .filter_map(|i| Some((i.node()?, i.listen_address(port)?)))
            .collect())
    }
}

// ---- API shapes (only the fields used; unknown fields are ignored; numbers may be strings) ----

#[derive(Debug, Deserialize)]
struct Offers {
    #[serde(default)]
    offers: Vec<RawOffer>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct RawOffer {
    #[serde(deserialize_with = "id_number")]
    id: u64,
    #[serde(default, deserialize_with = "lenient_u32")]
    num_gpus: Option<u32>,
    #[serde(default)]
    gpu_name: Option<String>,
    /// MB per GPU.
    #[serde(default, deserialize_with = "lenient_f64")]
    gpu_ram: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    cpu_cores_effective: Option<f64>,
    /// MB.
    #[serde(default, deserialize_with = "lenient_f64")]
    cpu_ram: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    dph_total: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    min_bid: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    reliability: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    reliability2: Option<f64>,
    #[serde(default)]
    geolocation: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    cluster_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Created {
    #[serde(default, deserialize_with = "lenient_u64")]
    new_contract: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Instances {
    #[serde(default)]
    instances: Vec<RawInstance>,
}

#[derive(Debug, Deserialize)]
struct RawInstance {
    #[serde(deserialize_with = "id_number")]
    id: u64,
    #[serde(default)]
    actual_status: Option<String>,
    #[serde(default)]
    status_msg: Option<String>,
    #[serde(default)]
    label: Option<String>,
    /// The host's address (kept loose: a listing must never fail on it).
    #[serde(default)]
    public_ipaddr: Option<Value>,
    /// Published container ports: `{"7444/udp": [{"HostIp": "0.0.0.0", "HostPort": "41022"}]}`.
    #[serde(default)]
    ports: Option<Value>,
}

impl RawInstance {
    /// Where the container's UDP `port` can be reached: the host's public address and the
    /// host port mapped to it, once the instance runs and the host reports both.
    fn listen_address(&self, port: u16) -> Option<SocketAddr> {
        if self.actual_status.as_deref() != Some("running") {
            return None;
        }
        let ip: IpAddr = self.public_ipaddr.as_ref()?.as_str()?.trim().parse().ok()?;
        let host_port = self
            .ports
            .as_ref()?
            .get(format!("{port}/udp"))?
            .as_array()?
            .iter()
            .find_map(|binding| {
                number(binding.get("HostPort")?)
                    .filter(|p| p.fract() == 0.0 && (1.0..=65535.0).contains(p))
                    .map(|p| p as u16)
            })?;
        Some(SocketAddr::new(ip, host_port))
    }

    fn pool(&self) -> Option<String> {
        parse_label(self.label.as_deref()?).map(|(pool, _)| pool)
    }

    fn node(&self) -> Option<String> {
        parse_label(self.label.as_deref()?).map(|(_, node)| node)
    }
}

#[derive(Debug, Deserialize)]
struct Overlay {
    #[serde(default)]
    name: String,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    success: Option<bool>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    detail: Option<Value>,
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n: &f64| n.is_finite())
}

fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Option::<Value>::deserialize(d)?.as_ref().and_then(number))
}

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<Value>::deserialize(d)?
        .as_ref()
        .and_then(number)
        .filter(|n| *n >= 0.0 && n.fract() == 0.0)
        .map(|n| n as u64))
}

fn lenient_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(lenient_u64(d)?.and_then(|n| u32::try_from(n).ok()))
}

fn id_number<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    lenient_u64(d)?.ok_or_else(|| serde::de::Error::custom("id is not a whole number"))
}

// ---- helpers ----

/// VastAI's names for a catalog accelerator (its `gpu_name` values use spaces: "RTX 4090").
pub fn vast_gpu_names(accelerator: &Accelerator) -> Vec<String> {
    let known: &[&str] = match accelerator.name {
        "H100" => &["H100 SXM", "H100 PCIE", "H100 NVL"],
        "H200" => &["H200", "H200 NVL"],
        "A100" | "A100-80GB" => &["A100 SXM4", "A100 PCIE", "A100X"],
        "A6000" => &["RTX A6000"],
        "V100" => &["Tesla V100"],
        "T4" => &["Tesla T4"],
        "RTX 6000 Ada" => &["RTX 6000Ada"],
        _ => &[],
    };
    if known.is_empty() {
        vec![accelerator.name.replace('_', " ")]
    } else {
        known.iter().map(|n| n.to_string()).collect()
    }
}

/// The `env` key that publishes a container's UDP `port`, as the CLI's `-p` makes it.
pub fn port_option(port: u16) -> String {
    format!("-p {port}:{port}/udp")
}

/// The disk nodes get: the spec's, raised to VastAI's minimum.
fn disk_gb(spec: &PoolSpec) -> u32 {
    spec.disk_gb.unwrap_or(DEFAULT_DISK_GB).max(MIN_DISK_GB)
}

fn market_word(market: Market) -> &'static str {
    match market {
        Market::OnDemand => "on-demand",
        Market::Spot => "interruptible",
    }
}

/// A number the way the CLI sends one: as a short string ("0.9", "2").
fn number_text(n: f64) -> String {
    let text = format!("{:.6}", n);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// An offer's region: its geolocation ("Texas, US"), or the region the spec asked for when
/// it names the geolocation or its country code (so that the spec's region check holds).
fn region_of(geolocation: Option<&str>, wanted: Option<&str>) -> String {
    let Some(geo) = geolocation.map(str::trim).filter(|g| !g.is_empty()) else {
        return "unknown".into();
    };
    let country = geo.rsplit(',').next().unwrap_or(geo).trim();
    match wanted.map(str::trim) {
        Some(w) if w.eq_ignore_ascii_case(country) || w.eq_ignore_ascii_case(geo) => w.to_string(),
        _ => geo.to_string(),
    }
}

fn parse_base(url: &str) -> Result<Url, String> {
    let trimmed = url.trim().trim_end_matches('/');
    // `VAST_URL` is the server root; accept one that names the API path as well.
    super::http::http_base(
        trimmed.strip_suffix("/api/v0").unwrap_or(trimmed),
        "VastAI URL",
    )
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(bytes).map_err(|e| {
        VastAi::error(
            ErrorKind::Api,
            format!("{what}: unexpected answer from VastAI: {e}"),
        )
        .hint("VAST_URL may point at something else than the VastAI API")
    })
}

/// The body of a successful answer, or the error a failed one means.
fn check(
    what: &str,
    status: StatusCode,
    bytes: bytes::Bytes,
    kind: Call,
) -> Result<bytes::Bytes, ProviderError> {
    if status.is_success() {
        let refused = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.success == Some(false))
            .unwrap_or(false);
        if !refused {
            return Ok(bytes);
        }
    }
    Err(api_error(what, status, &bytes, kind))
}

/// What a failed answer means, from its status, `error` and `msg` (a gone offer may be an
/// `invalid_args` with `no_such_ask` only in `msg`).
fn api_error(what: &str, status: StatusCode, body: &[u8], kind: Call) -> ProviderError {
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let code = parsed.error.unwrap_or_default();
    let detail = match parsed.detail {
        Some(Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
        None => None,
    };
    let message = one_line(
        parsed
            .msg
            .as_deref()
            .or(detail.as_deref())
            .filter(|m| !m.trim().is_empty())
            .unwrap_or(status.canonical_reason().unwrap_or("no message")),
    );
    let both = format!("{code} {message}").to_ascii_lowercase();
    let tag = if code.is_empty() {
        status.as_u16().to_string()
    } else {
        format!("{} {code}", status.as_u16())
    };
    let error = |kind: ErrorKind, text: String| VastAi::error(kind, text);
    let plain = format!("{what}: {message} ({tag})");
    let code = code.to_ascii_lowercase();
    if both.contains("no_such_ask")
        || status == StatusCode::GONE
        || (kind == Call::Rent && status == StatusCode::NOT_FOUND && code != "auth_error")
    {
        return error(ErrorKind::Capacity, plain).hint(GONE_HINT);
    }
    if status == StatusCode::FORBIDDEN && both.contains("requires login") {
        return error(
            ErrorKind::Auth,
            format!("{what}: VastAI got no API key: {message} ({tag})"),
        )
        .hint(AUTH_HINT);
    }
    if kind == Call::Search && status == StatusCode::NOT_FOUND {
        return error(
            ErrorKind::Auth,
            format!("{what}: VastAI answered 404, which its offer search does for a wrong API key: {message} ({tag})"),
        )
        .hint(AUTH_HINT);
    }
    if status == StatusCode::UNAUTHORIZED || code == "auth_error" {
        return error(
            ErrorKind::Auth,
            format!("{what}: VastAI refused the API key: {message} ({tag})"),
        )
        .hint(AUTH_HINT);
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return error(
            ErrorKind::Quota,
            format!("{what}: VastAI's rate limit: {message} ({tag})"),
        )
        .hint("wait a minute and retry");
    }
    if both.contains("no offers") || both.contains("no_offers") {
        return error(ErrorKind::NoOffers, plain).hint(NO_OFFERS_HINT);
    }
    if code == "invalid_price" {
        return error(ErrorKind::Invalid, plain).hint(format!(
            "bids are min_bid x bid_multiplier and must lie within {MIN_BID}..{MAX_BID} $/h: adjust bid_multiplier"
        ));
    }
    if both.contains("credit") || both.contains("balance") {
        return error(ErrorKind::Quota, plain).hint("add credit at https://cloud.vast.ai/billing/");
    }
    if status == StatusCode::FORBIDDEN {
        return error(ErrorKind::Auth, plain).hint(AUTH_HINT);
    }
    if status.is_server_error() {
        return error(ErrorKind::Api, plain)
            .hint("VastAI's API failed; try again in a few minutes");
    }
    error(ErrorKind::Invalid, plain).hint("check the image (--image) and disk (--disk) asked for")
}

/// Bytes kept as they are in labels; every other byte is `%` and two hex digits.
fn label_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn label_unescape(value: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut rest = value.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%' {
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

/// The label of one node's instance: `skyward-pool=<pool> skyward-node=<node>`, escaped,
/// at most [`LABEL_LIMIT`] characters; teardown finds a pool's instances by it.
pub fn label(pool: &str, node_id: &str) -> Result<String, ProviderError> {
    let label = format!(
        "{POOL_TAG}={} {NODE_TAG}={}",
        label_escape(pool),
        label_escape(node_id)
    );
    if label.len() > LABEL_LIMIT {
        return Err(VastAi::error(
            ErrorKind::Invalid,
            format!(
                "the label for pool {pool:?} would be {} characters, over VastAI's {LABEL_LIMIT}",
                label.len()
            ),
        )
        .hint("use a shorter pool name"));
    }
    Ok(label)
}

/// The pool and node a label made by [`label`] names.
pub fn parse_label(label: &str) -> Option<(String, String)> {
    let mut pool = None;
    let mut node = None;
    for part in label.split_whitespace() {
        if let Some(value) = part
            .strip_prefix(POOL_TAG)
            .and_then(|r| r.strip_prefix('='))
        {
            pool = label_unescape(value);
        } else if let Some(value) = part
            .strip_prefix(NODE_TAG)
            .and_then(|r| r.strip_prefix('='))
        {
            node = label_unescape(value);
        }
    }
    Some((pool?, node?))
}

/// The overlay network of a pool: `skyward-<pool>-<hash>`, in `[a-z0-9-]` (the only
/// characters VastAI keeps), unique per pool name.
pub fn overlay_name(pool: &str) -> String {
    let cleaned: String = pool
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned: String = cleaned.trim_matches('-').chars().take(40).collect();
    let cleaned = cleaned.trim_end_matches('-');
    let digest = hex::encode(&sha2::Sha256::digest(pool.as_bytes())[..4]);
    if cleaned.is_empty() {
        format!("skyward-{digest}")
    } else {
        format!("skyward-{cleaned}-{digest}")
    }
}

/// Installs curl when the image has neither curl nor wget (stock CUDA images have
/// neither): the agent download and the auto-shutdown use it.
const FETCH_TOOLS: &str = r#"#!/bin/sh
if ! command -v curl >/dev/null 2>&1 && ! command -v wget >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl ca-certificates) >/dev/null 2>&1 || true
fi
"#;

/// A timer that destroys the instance `after` its start, through VastAI's per-instance key
/// (`CONTAINER_API_KEY`, set in every instance with `CONTAINER_ID`), stopping it when the
/// destroy is refused. The key goes to curl on stdin, never on a command line.
pub fn auto_shutdown_script(after: Duration, api_root: &str) -> String {
    let url = format!("{api_root}/api/v0/instances/");
    format!(
        r#"if [ -n "${{CONTAINER_ID:-}}" ] && [ -n "${{CONTAINER_API_KEY:-}}" ] && command -v curl >/dev/null 2>&1; then
    (
        trap '' HUP
        sleep {secs}
        u={url}"$CONTAINER_ID/"
        h() {{ printf 'header = "Authorization: Bearer %s"\n' "$CONTAINER_API_KEY"; }}
        h | curl -fsS -m 30 -K - -X DELETE "$u" ||
            h | curl -fsS -m 30 -K - -X PUT -H 'Content-Type: application/json' -d '{{"state":"stopped"}}' "$u"
    ) </dev/null >/dev/null 2>&1 &
    echo "skyward: this instance destroys itself in {secs} s"
else
    echo "skyward: no CONTAINER_ID, CONTAINER_API_KEY or curl: no auto-shutdown" >&2
fi
"#,
        secs = after.as_secs().max(1),
        url = shell_quote(&url),
    )
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// An error body on one bounded line.
fn one_line(text: &str) -> String {
    super::http::one_line(text, 300)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyward_core::spec::Allocation;

    fn provider(config: VastAiConfig) -> VastAi {
        VastAi::new(VastAiConfig {
            api_key: Some("vast-secret-key".into()),
            api_url: Some("http://127.0.0.1:9".into()),
            ..config
        })
    }

    #[test]
    fn labels_round_trip_and_are_bounded() {
        for (pool, node) in [("sky-0a1b", "node-1"), ("my pool=1", "node 2"), ("ü%", "n")] {
            let l = label(pool, node).unwrap();
            assert!(l.len() <= LABEL_LIMIT);
            assert!(!l.contains("  "), "{l}");
            assert_eq!(
                parse_label(&l),
                Some((pool.to_string(), node.to_string())),
                "{l}"
            );
        }
        assert_eq!(
            label("sky-1", "node-2").unwrap(),
            "skyward-pool=sky-1 skyward-node=node-2"
        );
        assert_eq!(parse_label("someone else's instance"), None);
        let long = label(&"x".repeat(300), "node-1").unwrap_err();
        assert!(long.to_string().contains("shorter pool name"), "{long}");
    }

    #[test]
    fn overlay_names_keep_to_the_allowed_characters() {
        for pool in ["sky-0a1b2c3d", "My_Pool", "___", &"p".repeat(100)] {
            let name = overlay_name(pool);
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{name}"
            );
            assert!(name.len() <= 60, "{name}");
            assert!(!name.ends_with('-') && !name.contains("--"), "{name}");
        }
        assert_ne!(overlay_name("A"), overlay_name("a"));
        assert!(overlay_name("sky-1").starts_with("skyward-sky-1-"));
    }

    #[test]
    fn search_bodies_follow_the_cli() {
        let p = provider(VastAiConfig {
            geolocation: Some("us, ca".into()),
            min_reliability: 0.95,
            ..VastAiConfig::default()
        });
        let mut spec = PoolSpec::new(2).accelerator("H100:8".parse().unwrap());
        spec.vcpus = Some(32);
        spec.memory_gb = Some(64.0);
        spec.max_price_per_hour = Some(20.0);
        let q = p.search_query(&spec, Market::OnDemand).unwrap();
        assert_eq!(q["verified"], json!({"eq": true}));
        assert_eq!(q["external"], json!({"eq": false}));
        assert_eq!(q["rentable"], json!({"eq": true}));
        assert_eq!(q["rented"], json!({"eq": false}));
        assert_eq!(q["reliability"], json!({"gte": "0.95"}));
        assert_eq!(
            q["gpu_name"],
            json!({"in": ["H100 SXM", "H100 PCIE", "H100 NVL"]})
        );
        assert_eq!(q["num_gpus"], json!({"eq": "8"}));
        assert_eq!(q["gpu_ram"], json!({"gte": 72000.0}));
        assert_eq!(q["cpu_cores_effective"], json!({"gte": "32"}));
        assert_eq!(q["cpu_ram"], json!({"gte": 64000.0}));
        assert_eq!(q["geolocation"], json!({"in": ["US", "CA"]}));
        assert_eq!(q["dph_total"], json!({"lte": "20"}));
        assert_eq!(q["type"], "on-demand");
        assert_eq!(q["order"], json!([["dph_total", "asc"]]));

        let spot = p
            .search_query(
                &PoolSpec::new(1)
                    .accelerator("RTX 4090".parse().unwrap())
                    .allocation(Allocation::Spot),
                Market::Spot,
            )
            .unwrap();
        assert_eq!(spot["type"], "bid");
        assert_eq!(spot["gpu_name"], json!({"eq": "RTX 4090"}));
        let neuron = p
            .search_query(
                &PoolSpec::new(1).accelerator("TRN1".parse().unwrap()),
                Market::OnDemand,
            )
            .unwrap_err();
        assert_eq!(neuron.kind, ErrorKind::NoOffers);
    }

    #[test]
    fn reverse_pools_publish_the_agent_port_on_hosts_that_can() {
        assert_eq!(port_option(7444), "-p 7444:7444/udp");
        let p = provider(VastAiConfig::default());
        let mut spec = PoolSpec::new(1);
        let q = p.search_query(&spec, Market::OnDemand).unwrap();
        assert!(q.get("direct_port_count").is_none());
        spec.reverse = true;
        let q = p.search_query(&spec, Market::OnDemand).unwrap();
        assert_eq!(q["direct_port_count"], json!({"gte": "1"}));
    }

    #[test]
    fn listen_addresses_are_the_public_ip_and_the_mapped_host_port() {
        let instance = |fields: Value| -> RawInstance {
            let mut base = json!({
                "id": 1, "actual_status": "running", "public_ipaddr": "203.0.113.9\n",
                "ports": {
                    "22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41000"}],
                    "7444/udp": [
                        {"HostIp": "0.0.0.0", "HostPort": "41022"},
                        {"HostIp": "::", "HostPort": "41022"}
                    ]
                }
            });
            for (k, v) in fields.as_object().unwrap() {
                base[k.as_str()] = v.clone();
            }
            serde_json::from_value(base).unwrap()
        };
        assert_eq!(
            instance(json!({})).listen_address(7444),
            Some("203.0.113.9:41022".parse().unwrap()),
            "the host's port, not the container's"
        );
        assert_eq!(
            instance(
                json!({"ports": {"7444/udp": [{"HostIp": "::", "HostPort": 41023}]},
                "public_ipaddr": "2001:db8::9"})
            )
            .listen_address(7444),
            Some("[2001:db8::9]:41023".parse().unwrap())
        );
        // Not yet known, or not for this port and protocol: no address, never a guess.
        for fields in [
            json!({"actual_status": "loading"}),
            json!({"ports": null}),
            json!({"ports": {}}),
            json!({"ports": {"7444/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41022"}]}}),
            json!({"ports": {"7444/udp": [{"HostIp": "0.0.0.0", "HostPort": "0"}]}}),
            json!({"ports": {"7444/udp": "41022"}}),
            json!({"public_ipaddr": null}),
            json!({"public_ipaddr": ""}),
            json!({"public_ipaddr": 7}),
        ] {
            let raw = instance(fields.clone());
            assert_eq!(raw.listen_address(7444), None, "{fields}");
        }
        assert_eq!(instance(json!({})).listen_address(7445), None);
    }

    #[test]
    fn offers_map_prices_units_and_regions() {
        let p = provider(VastAiConfig {
            bid_multiplier: 1.5,
            ..VastAiConfig::default()
        });
        let raw: RawOffer = serde_json::from_value(json!({
            "id": 4242, "num_gpus": 2, "gpu_name": "A100 SXM4", "gpu_ram": 81920,
            "cpu_cores_effective": "31.5", "cpu_ram": 257843, "dph_total": 2.5,
            "min_bid": 0.2, "reliability2": 0.99, "geolocation": "Texas, US", "cluster_id": 7
        }))
        .unwrap();
        let spec = PoolSpec::new(1).accelerator("A100-80GB:2".parse().unwrap());
        let o = p
            .to_offer(&raw, &spec, &[Market::OnDemand, Market::Spot])
            .unwrap();
        assert_eq!(o.accelerator_label(), "A100-80GB:2");
        assert_eq!(o.vcpus, 31);
        assert_eq!(o.memory_gb, 257.8);
        assert_eq!(o.on_demand_per_hour, Some(2.5));
        assert_eq!(o.spot_per_hour, Some(0.3));
        assert_eq!(o.region, "Texas, US");
        assert_eq!(o.provider_ref, "4242");
        assert_eq!(spec.mismatch(&o), None);
        let mut in_us = spec.clone();
        in_us.region = Some("us".into());
        let o = p.to_offer(&raw, &in_us, &[Market::OnDemand]).unwrap();
        assert_eq!((o.region.as_str(), o.spot_per_hour), ("us", None));
        assert_eq!(in_us.mismatch(&o), None);
        let unreliable = RawOffer {
            reliability2: Some(0.5),
            ..raw.clone()
        };
        assert!(p
            .to_offer(&unreliable, &spec, &[Market::OnDemand])
            .is_none());
    }

    #[test]
    fn errors_read_both_error_and_msg() {
        let e = api_error(
            "renting offer 1",
            StatusCode::BAD_REQUEST,
            br#"{"success":false,"error":"invalid_args","msg":"error 404/3603: no_such_ask  Instance type by id 1 is not available."}"#,
            Call::Rent,
        );
        assert_eq!(e.kind, ErrorKind::Capacity);
        assert!(!e.to_string().contains('\n'));
        let e = api_error(
            "x",
            StatusCode::UNAUTHORIZED,
            br#"{"success":false,"error":"auth_error","msg":"Invalid user key"}"#,
            Call::Other,
        );
        assert_eq!(e.kind, ErrorKind::Auth);
        assert!(e.to_string().contains("VAST_API_KEY"), "{e}");
        let e = api_error(
            "x",
            StatusCode::FORBIDDEN,
            br#"{"success":false,"error":"not_logged_in","msg":"This action requires login."}"#,
            Call::Other,
        );
        assert_eq!(e.kind, ErrorKind::Auth);
        assert!(e.message.contains("no API key"), "{e}");
        let e = api_error("x", StatusCode::NOT_FOUND, b"{}", Call::Search);
        assert_eq!(e.kind, ErrorKind::Auth);
        assert!(e.message.contains("wrong API key"), "{e}");
        let e = api_error(
            "x",
            StatusCode::TOO_MANY_REQUESTS,
            br#"{"detail": "API requests too frequent endpoint threshold=2"}"#,
            Call::Other,
        );
        assert_eq!(e.kind, ErrorKind::Quota);
        assert!(e.message.contains("too frequent"), "{e}");
        let e = api_error(
            "x",
            StatusCode::BAD_REQUEST,
            br#"{"success":false,"error":"invalid_price","msg":"bid too low"}"#,
            Call::Rent,
        );
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.to_string().contains("bid_multiplier"), "{e}");
        let e = api_error("x", StatusCode::BAD_GATEWAY, b"<html>", Call::Other);
        assert_eq!(e.kind, ErrorKind::Api);
        // A 200 that says success: false is an error too.
        let refused = check(
            "x",
            StatusCode::OK,
            bytes::Bytes::from_static(br#"{"success":false,"error":"invalid_args","msg":"disk"}"#),
            Call::Other,
        );
        assert_eq!(refused.unwrap_err().kind, ErrorKind::Invalid);
    }

    #[test]
    fn keys_come_from_the_environment_then_the_cli_files() {
        let dir = std::env::temp_dir().join(format!("skyward-vast-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(".config/vastai")).unwrap();
        let home = dir.display().to_string();
        let env = |vars: Vec<(&'static str, String)>| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
            }
        };
        let (key, source) = find_key(&env(vec![("HOME", home.clone())]));
        assert_eq!(key, None);
        assert!(
            matches!(&source, KeySource::Missing(why) if why.contains("VAST_API_KEY") && why.contains(".vast_api_key"))
        );
        std::fs::write(dir.join(".vast_api_key"), "legacy\n").unwrap();
        let (key, _) = find_key(&env(vec![("HOME", home.clone())]));
        assert_eq!(key.as_deref(), Some("legacy"));
        std::fs::write(dir.join(".config/vastai/vast_api_key"), " current \n").unwrap();
        let (key, source) = find_key(&env(vec![("HOME", home.clone())]));
        assert_eq!(key.as_deref(), Some("current"));
        assert!(
            matches!(&source, KeySource::Found(f) if f.ends_with(".config/vastai/vast_api_key"))
        );
        let (key, source) = find_key(&env(vec![
            ("HOME", home.clone()),
            ("VAST_API_KEY", "from-env".into()),
        ]));
        assert_eq!(key.as_deref(), Some("from-env"));
        assert!(matches!(&source, KeySource::Found(s) if s == "VAST_API_KEY"));
        std::fs::create_dir_all(dir.join("xdg/vastai")).unwrap();
        std::fs::write(dir.join("xdg/vastai/vast_api_key"), "xdg").unwrap();
        let (key, _) = find_key(&env(vec![
            ("HOME", home),
            ("XDG_CONFIG_HOME", dir.join("xdg").display().to_string()),
        ]));
        assert_eq!(key.as_deref(), Some("xdg"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_key_stays_out_of_debug_output() {
        let p = provider(VastAiConfig::default());
        let shown = format!("{p:?}");
        assert!(!shown.contains("vast-secret-key"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[tokio::test]
    async fn without_a_key_calls_fail_with_auth_and_status_says_why() {
        let p = VastAi::with_source(
            VastAiConfig::default(),
            KeySource::Missing("VAST_API_KEY is not set and no key in /h/.vast_api_key".into()),
        );
        let e = p.offers(&PoolSpec::new(1)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Auth);
        assert!(e.to_string().contains("vastai set api-key"), "{e}");
        let status = p.status().await;
        assert!(!status.configured && !status.working);
        assert!(status.detail.contains("VAST_API_KEY"), "{}", status.detail);
        assert!(
            p.teardown("pool").await.is_ok(),
            "nothing to tear down without a key"
        );
    }

    #[test]
    fn a_real_onstart_with_every_option_fits_with_room_to_spare() {
        let pool = "sky-0a1b2c3d";
        let ca = skyward_common::identity::PoolCa::generate(pool).unwrap();
        let request = ProvisionRequest {
            pool: pool.into(),
            nodes: vec![NodeBootstrap {
                node_id: "node-16".into(),
                token: "t".repeat(64),
            }],
            spec: PoolSpec::new(16),
            bootstrap: crate::bootstrap::Bootstrap {
                coordinator: "[2001:db8::1234:5678]:7443".into(),
                ca_pin: ca.pin(),
                ca_pem: ca.cert_pem(),
                agent_url: Some("https://[2001:db8::1234:5678]:7444/agent/linux-{arch}".into()),
                agent_url_pinned: true,
                agent_sha256: vec![("x86_64".into(), "ab".repeat(32))],
                lease: Duration::from_secs(600),
                reverse: Some(crate::bootstrap::Reverse {
                    agent_port: crate::bootstrap::AGENT_PORT,
                    allow_from: Some("2001:db8::1".parse().unwrap()),
                }),
                mig: None,
                deadline: None,
                spot_watch: None,
            },
        };
        let p = provider(VastAiConfig {
            auto_shutdown: Some(Duration::from_secs(86_400)),
            api_url: Some("https://console.vast.ai".into()),
            ..VastAiConfig::default()
        });
        let onstart = p.onstart(&request, &request.nodes[0]).unwrap();
        assert!(
            onstart.len() <= 3600,
            "{} characters: little room left under 4096",
            onstart.len()
        );
    }

    #[test]
    fn the_shutdown_timer_is_valid_sh_and_keeps_the_key_off_command_lines() {
        let script = auto_shutdown_script(Duration::from_secs(3600), "https://console.vast.ai");
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", &format!("{FETCH_TOOLS}{script}")])
            .status()
            .unwrap();
        assert!(status.success());
        assert!(script.contains("sleep 3600"));
        assert!(script.contains("'https://console.vast.ai/api/v0/instances/'\"$CONTAINER_ID/\""));
        assert!(!script.contains("-H \"Authorization"), "{script}");
    }
}
