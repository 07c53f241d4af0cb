//! Where nodes come from. Every provider (local processes now, clouds next) implements the
//! same trait: list offers for a spec, create nodes from one offer with each node's
//! bootstrap, and remove every node of a pool, found by the pool's name rather than by a
//! list that a crash could lose.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "aws")]
pub mod aws_prices;
pub mod bootstrap;
#[cfg(feature = "digitalocean")]
pub mod digitalocean;
#[cfg(feature = "http")]
pub mod http;
pub mod local;
#[cfg(feature = "vastai")]
pub mod vastai;
#[cfg(feature = "verda")]
pub mod verda;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

pub use local::LocalProvider;

use crate::bootstrap::Bootstrap;
use skyward_core::offer::{Market, Offer};
use skyward_core::spec::PoolSpec;

/// What one node needs to join: its id and its single-use token.
#[derive(Clone)]
pub struct NodeBootstrap {
    pub node_id: String,
    pub token: String,
}

/// The token is a secret: it never appears in debug output.
impl std::fmt::Debug for NodeBootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBootstrap")
            .field("node_id", &self.node_id)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    pub pool: String,
    pub nodes: Vec<NodeBootstrap>,
    pub spec: PoolSpec,
    /// How nodes reach and trust the coordinator.
    pub bootstrap: Bootstrap,
}

impl ProvisionRequest {
    /// The user-data script that makes `node` join this pool.
    pub fn user_data(&self, node: &NodeBootstrap) -> String {
        self.bootstrap.user_data(&self.pool, node)
    }

    /// Tags every instance of the pool carries, so that teardown finds them by pool.
    pub fn tags(&self, node: &NodeBootstrap) -> Vec<(String, String)> {
        vec![
            (POOL_TAG.to_string(), self.pool.clone()),
            (NODE_TAG.to_string(), node.node_id.clone()),
        ]
    }
}

/// Tag (or label) naming the pool an instance belongs to.
pub const POOL_TAG: &str = "skyward-pool";
/// Tag naming the node id of an instance.
pub const NODE_TAG: &str = "skyward-node";

/// A node the provider created.
#[derive(Debug, Clone)]
pub struct Instance {
    pub node_id: String,
    /// The provider's own id for it (a pid, an instance id).
    pub provider_id: String,
    /// Where its agent listens, when the coordinator dials the agents (`--reverse`).
    pub address: Option<std::net::SocketAddr>,
}

/// What went wrong, as far as choosing what to try next is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Nothing matches the spec.
    NoOffers,
    /// The offer exists but there is no capacity for it now.
    Capacity,
    /// An account limit was reached.
    Quota,
    /// Credentials are missing or refused.
    Auth,
    /// The provider refused the request as invalid.
    Invalid,
    /// The API failed or could not be reached.
    Api,
    /// Machines were made, but their agents never connected to the coordinator, or failed
    /// before they did (a bad image, a host that never starts its container, a network that
    /// does not reach back).
    Unreachable,
}

impl ErrorKind {
    /// One kind for several failures: theirs when they share it; otherwise the one a user
    /// can act on first (credentials, then quota, then a bad request, then capacity, then
    /// machines that did not connect, then API faults).
    pub fn of_all(kinds: impl IntoIterator<Item = ErrorKind>) -> Option<ErrorKind> {
        const PRECEDENCE: [ErrorKind; 7] = [
            ErrorKind::Auth,
            ErrorKind::Quota,
            ErrorKind::Invalid,
            ErrorKind::Capacity,
            ErrorKind::Unreachable,
            ErrorKind::Api,
            ErrorKind::NoOffers,
        ];
        let kinds: Vec<ErrorKind> = kinds.into_iter().collect();
        PRECEDENCE.into_iter().find(|k| kinds.contains(k))
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider}: {message}{}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
pub struct ProviderError {
    pub provider: String,
    pub kind: ErrorKind,
    pub message: String,
    /// What the user can do about it.
    pub hint: Option<String>,
}

impl ProviderError {
    pub fn new(provider: &str, kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            provider: provider.to_string(),
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// A pool's teardown as independent steps: each is tried (again, twice at most, after a
/// failure that may pass) whatever became of the others, and the result names every step
/// that failed, so that one refused call (a least-privilege user, a scoped token) does not
/// leave the rest behind.
pub struct Teardown {
    provider: String,
    pool: String,
    failed: Vec<ProviderError>,
}

/// Tries per teardown step, and the wait before the second (doubled before the third).
const TEARDOWN_TRIES: u32 = 3;
const TEARDOWN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Teardown {
    pub fn new(provider: &str, pool: &str) -> Teardown {
        Teardown {
            provider: provider.to_string(),
            pool: pool.to_string(),
            failed: Vec::new(),
        }
    }

    /// Runs step `what`; a refusal (credentials, permissions, a bad request) is not tried
    /// again, another failure up to 3 times in all.
    pub async fn step<F, Fut>(&mut self, what: &str, mut run: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), ProviderError>>,
    {
        let mut wait = TEARDOWN_RETRY;
        for attempt in 1..=TEARDOWN_TRIES {
            match run().await {
                Ok(()) => return,
                Err(e)
                    if attempt == TEARDOWN_TRIES
                        || matches!(e.kind, ErrorKind::Auth | ErrorKind::Invalid) =>
                {
                    tracing::warn!(pool = %self.pool, "teardown step {what} failed: {e}");
                    self.failed.push(ProviderError {
                        message: format!("{what}: {}", e.message),
                        ..e
                    });
                    return;
                }
                Err(e) => {
                    tracing::info!(pool = %self.pool, "teardown step {what} failed, trying again: {e}");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }

    /// Ok when every step worked; otherwise one error naming each failed step, of the first
    /// failure's kind: one step's hint stays the error's hint, several steps' go with each.
    pub fn finish(mut self) -> Result<(), ProviderError> {
        let preface = |steps: &str| {
            format!(
                "pool {}: {steps} of its teardown failed, the other steps ran: ",
                self.pool
            )
        };
        match self.failed.len() {
            0 => Ok(()),
            1 => {
                let only = self.failed.remove(0);
                Err(ProviderError {
                    message: preface("one step") + &only.message,
                    ..only
                })
            }
            n => {
                let steps: Vec<String> = self
                    .failed
                    .iter()
                    .map(|e| match &e.hint {
                        Some(hint) => format!("{} ({hint})", e.message),
                        None => e.message.clone(),
                    })
                    .collect();
                Err(ProviderError::new(
                    &self.provider,
                    self.failed[0].kind,
                    preface(&format!("{n} steps")) + &steps.join("; "),
                ))
            }
        }
    }
}

/// How a provider polls its API until something happens (machines running, gone): the first
/// pause, each one after it doubled up to `max`, and never past `limit` in all. One polling
/// loop for every provider: `let mut poller = polling.start(); loop { round; if done
/// { break } if !poller.pause().await { give up } }`.
#[derive(Debug, Clone, Copy)]
pub struct Polling {
    pub first: std::time::Duration,
    pub max: std::time::Duration,
    pub limit: std::time::Duration,
}

/// The pauses of one polling, as [`Polling`] says: between rounds, [`Poller::pause`] waits
/// and says whether another round may run.
#[derive(Debug)]
pub struct Poller {
    deadline: tokio::time::Instant,
    pause: std::time::Duration,
    max: std::time::Duration,
}

impl Polling {
    /// Starts the clock.
    pub fn start(&self) -> Poller {
        Poller {
            deadline: tokio::time::Instant::now() + self.limit,
            pause: self.first.min(self.max),
            max: self.max,
        }
    }
}

impl Poller {
    /// Waits before the next round (never past the limit); false once the limit has passed.
    pub async fn pause(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now >= self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause.min(self.deadline - now)).await;
        self.pause = (self.pause * 2).min(self.max);
        true
    }
}

/// Whether a provider can be used from here, for `skyward providers`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProviderStatus {
    pub provider: String,
    /// Credentials (or whatever the provider needs) were found.
    pub configured: bool,
    /// A read-only call with them succeeded.
    pub working: bool,
    pub detail: String,
}

#[async_trait]
pub trait Provider: Send + Sync {
    fn name(&self) -> &str;

    /// Offers for the spec's resources (providers may filter server-side; the caller still
    /// checks each against the spec).
    async fn offers(&self, spec: &PoolSpec) -> Result<Vec<Offer>, ProviderError>;

    /// Creates one node per bootstrap from `offer` on `market`. On error, whatever was
    /// created stays findable by [`teardown`](Self::teardown).
    async fn provision(
        &self,
        request: &ProvisionRequest,
        offer: &Offer,
        market: Market,
    ) -> Result<Vec<Instance>, ProviderError>;

    /// Nodes that died before connecting, with what is known about why.
    async fn failed_nodes(&self, pool: &str) -> Vec<(String, String)>;

    /// Removes every node of `pool`, waiting until they are gone.
    async fn teardown(&self, pool: &str) -> Result<(), ProviderError>;

    /// Removes the machine of one node of `pool` (given up: lost, silent, or never
    /// connected), leaving the pool's other machines and resources alone. Returns once the
    /// provider has accepted the removal; a node with no machine (already gone) is no error.
    async fn terminate(&self, pool: &str, node_id: &str) -> Result<(), ProviderError>;

    /// Checks credentials with a read-only call.
    async fn status(&self) -> ProviderStatus;

    /// Whether nodes can listen for the coordinator to dial them (`--reverse`): the provider
    /// must start agents listening, open that port to the coordinator, and give addresses.
    fn supports_reverse(&self) -> bool {
        false
    }

    /// The pools that have instances here carrying the project's pool tag, whether or not
    /// this machine recorded them: what `skyward down --all` also removes. None by default
    /// (nothing of a local pool outlives its skyward).
    async fn pools(&self) -> Result<Vec<String>, ProviderError> {
        Ok(Vec::new())
    }

    /// Whether its nodes can take a MIG layout (`--mig`): the agent needs the driver's
    /// MIG controls, which containers (VastAI) do not get.
    fn supports_mig(&self) -> bool {
        true
    }

    /// Whether `--reverse` needs the coordinator's public address, to open the agent port
    /// to it alone (every cloud; not local processes).
    fn reverse_needs_public_ip(&self) -> bool {
        true
    }

    /// Where the listening agents of `pool` can be dialed (`--reverse`, as `reverse` says),
    /// for the nodes whose address is known by now (clouds give one once a machine runs).
    async fn listen_addresses(
        &self,
        _pool: &str,
        _reverse: &crate::bootstrap::Reverse,
    ) -> Result<Vec<(String, std::net::SocketAddr)>, ProviderError> {
        Ok(Vec::new())
    }
}

/// What providers need from the environment they run in.
#[derive(Debug, Clone)]
pub struct ProviderContext {
    /// The agent binary local nodes run, or why there is none.
    pub agent_bin: Result<PathBuf, String>,
    /// Where local nodes get their work dirs.
    pub local_root: PathBuf,
}

/// Every provider name Skyward knows.
pub const KNOWN: &[&str] = &["local", "aws", "digitalocean", "verda", "vastai"];

/// `PROVIDER.KEY=VALUE` settings from the command line (`--provider-opt`), which set the
/// fields of the providers' config values (`vastai.min_reliability=0.95`, `aws.ami=ami-...`).
#[derive(Debug, Clone, Default)]
pub struct ProviderOptions {
    entries: Vec<(String, String, String)>,
}

impl ProviderOptions {
    /// Parses `PROVIDER.KEY=VALUE` options.
    pub fn parse<'a>(options: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut entries = Vec::new();
        for option in options {
            let parsed = option
                .split_once('=')
                .and_then(|(name, value)| name.split_once('.').map(|(p, k)| (p, k, value)))
                .filter(|(p, k, _)| !p.is_empty() && !k.is_empty());
            let Some((provider, key, value)) = parsed else {
                return Err(format!(
                    "--provider-opt {option:?} is not PROVIDER.KEY=VALUE: write e.g. vastai.min_reliability=0.95"
                ));
            };
            entries.push((provider.to_string(), key.to_string(), value.to_string()));
        }
        Ok(ProviderOptions { entries })
    }

    /// The settings for one provider.
    pub fn settings(&self, provider: &str) -> Settings {
        Settings {
            provider: provider.to_string(),
            entries: self
                .entries
                .iter()
                .filter(|(p, ..)| p == provider)
                .map(|(_, k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// One provider's settings, taken key by key; what is left over is an error.
pub struct Settings {
    provider: String,
    entries: Vec<(String, String)>,
}

impl Settings {
    /// Takes `key`, parsed; an unparsable value is an error naming the option.
    pub fn take<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, String> {
        let Some(index) = self.entries.iter().position(|(k, _)| k == key) else {
            return Ok(None);
        };
        let (_, value) = self.entries.remove(index);
        value.parse().map(Some).map_err(|_| {
            format!(
                "--provider-opt {}.{key}={value:?}: not a valid value",
                self.provider
            )
        })
    }

    /// Fails on any key not taken, listing the ones this provider has.
    pub fn finish(self, known: &[&str]) -> Result<(), String> {
        match self.entries.first() {
            None => Ok(()),
            Some((key, _)) => Err(format!(
                "unknown option {}.{key}: {} takes {}",
                self.provider,
                self.provider,
                known.join(", ")
            )),
        }
    }
}

/// Makes the providers named in a comma-separated list, in order.
pub fn from_names(
    names: &str,
    context: &ProviderContext,
) -> Result<Vec<Arc<dyn Provider>>, String> {
    from_names_with(names, context, &ProviderOptions::default())
}

/// Like [`from_names`], with `--provider-opt` settings applied to each provider's config.
pub fn from_names_with(
    names: &str,
    context: &ProviderContext,
    options: &ProviderOptions,
) -> Result<Vec<Arc<dyn Provider>>, String> {
    let listed: Vec<&str> = names.split(',').map(str::trim).collect();
    if let Some((provider, key, _)) = options
        .entries
        .iter()
        .find(|(p, ..)| !listed.contains(&p.as_str()))
    {
        return Err(format!(
            "--provider-opt {provider}.{key} is for {provider}, which is not in --provider {names}"
        ));
    }
    let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if providers.iter().any(|p| p.name() == name) {
            return Err(format!("provider {name:?} is listed twice"));
        }
        providers.push(match name {
            "local" => Arc::new(LocalProvider::new(
                context.agent_bin.clone(),
                context.local_root.clone(),
            )),
            // Without a token it still constructs; its calls then fail with Auth and a hint.
            #[cfg(feature = "digitalocean")]
            "digitalocean" => {
                let mut config = digitalocean::DigitalOceanConfig::from_env();
                config.apply(options.settings("digitalocean"))?;
                Arc::new(digitalocean::DigitalOcean::new(config))
            }
            // Without a client id and secret it still constructs; its calls fail with Auth.
            #[cfg(feature = "verda")]
            "verda" => Arc::new(verda::Verda::from_env_with(|config| {
                config.apply(options.settings("verda"))
            })?),
            // Without a key it still constructs; its calls then fail with Auth and a hint.
            #[cfg(feature = "vastai")]
            "vastai" => Arc::new(vastai::VastAi::from_env_with(|config| {
                config.apply(options.settings("vastai"))
            })?),
            // Credentials come through the standard AWS chain when the API is first called.
            #[cfg(feature = "aws")]
            "aws" => {
                let mut config = aws::AwsConfig::from_env();
                config.apply(options.settings("aws"))?;
                Arc::new(aws::Aws::new(config))
            }
            other if KNOWN.contains(&other) => {
                return Err(format!(
                    "provider {other} is not in this build: enable the cargo feature \"{other}\" of skyward"
                ))
            }
            other => {
                return Err(format!(
                    "unknown provider {other:?}: known providers are {}",
                    KNOWN.join(", ")
                ))
            }
        });
    }
    if providers.is_empty() {
        return Err("no provider given: use e.g. --provider local".into());
    }
    Ok(providers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> ProviderContext {
        ProviderContext {
            agent_bin: Err("none".into()),
            local_root: std::env::temp_dir(),
        }
    }

    #[test]
    fn several_failures_take_the_kind_a_user_acts_on_first() {
        use ErrorKind::*;
        assert_eq!(ErrorKind::of_all([]), None);
        assert_eq!(ErrorKind::of_all([Capacity, Capacity]), Some(Capacity));
        assert_eq!(ErrorKind::of_all([Capacity, Auth, Api]), Some(Auth));
        assert_eq!(ErrorKind::of_all([Api, Unreachable]), Some(Unreachable));
        assert_eq!(ErrorKind::of_all([NoOffers, Api]), Some(Api));
        assert_eq!(ErrorKind::of_all([Capacity, Quota]), Some(Quota));
    }

    /// Run by scripts/test.sh with `--no-default-features`: a build without a cloud's
    /// feature still compiles, and naming that cloud says which feature to enable.
    #[cfg(not(any(
        feature = "aws",
        feature = "digitalocean",
        feature = "verda",
        feature = "vastai"
    )))]
    #[test]
    fn a_cloud_left_out_of_the_build_says_which_feature_to_enable() {
        for cloud in ["aws", "digitalocean", "verda", "vastai"] {
            let error = from_names(cloud, &context()).err().expect("refused");
            assert_eq!(
                error,
                format!("provider {cloud} is not in this build: enable the cargo feature \"{cloud}\" of skyward")
            );
        }
        assert!(from_names("local", &context()).is_ok());
    }

    /// Tests that name every cloud: built with all of them (the default features).
    #[cfg(all(
        feature = "aws",
        feature = "digitalocean",
        feature = "verda",
        feature = "vastai"
    ))]
    mod every_cloud {
        use super::*;
        #[test]
        fn provider_options_parse_and_apply_or_say_what_is_wrong() {
            assert!(ProviderOptions::parse(["junk"])
                .unwrap_err()
                .contains("PROVIDER.KEY=VALUE"));
            assert!(ProviderOptions::parse(["aws.=x"]).is_err());
            let options = ProviderOptions::parse(["vastai.min_reliability=0.95"]).unwrap();
            let err = from_names_with("local", &context(), &options)
                .err()
                .unwrap();
            assert!(err.contains("which is not in --provider local"), "{err}");
            let bogus = ProviderOptions::parse(["vastai.bogus=1"]).unwrap();
            let err = from_names_with("vastai", &context(), &bogus).err().unwrap();
            assert!(
                err.contains("unknown option vastai.bogus") && err.contains("min_reliability"),
                "{err}"
            );
            let range = ProviderOptions::parse(["vastai.min_reliability=95"]).unwrap();
            assert!(from_names_with("vastai", &context(), &range)
                .err()
                .unwrap()
                .contains("between 0 and 1"));
            let nan = ProviderOptions::parse(["vastai.bid_multiplier=lots"]).unwrap();
            assert!(from_names_with("vastai", &context(), &nan)
                .err()
                .unwrap()
                .contains("not a valid value"));
            let strategy = ProviderOptions::parse(["aws.allocation_strategy=random"]).unwrap();
            assert!(from_names_with("aws", &context(), &strategy)
                .err()
                .unwrap()
                .contains("price-capacity-optimized"));
            let fine = ProviderOptions::parse([
                "aws.ami=ami-1",
                "verda.region=FIN-02",
                "digitalocean.region=ams3",
            ])
            .unwrap();
            assert_eq!(
                from_names_with("aws,verda,digitalocean", &context(), &fine)
                    .unwrap()
                    .len(),
                3
            );
        }

        #[test]
        fn aws_settings_reach_its_config() {
            let mut config = aws::AwsConfig::default();
            let options = ProviderOptions::parse([
                "aws.ami=ami-123",
                "aws.subnet_id=subnet-9",
                "aws.region=eu-west-1",
            ])
            .unwrap();
            config.apply(options.settings("aws")).unwrap();
            assert_eq!(config.ami.as_deref(), Some("ami-123"));
            assert_eq!(config.subnet_id.as_deref(), Some("subnet-9"));
            assert_eq!(config.region, "eu-west-1");
            assert_eq!(config.placement_group, None);

            let options = ProviderOptions::parse(["aws.placement_group=cluster"]).unwrap();
            config.apply(options.settings("aws")).unwrap();
            assert_eq!(config.placement_group.as_deref(), Some("cluster"));
            let options = ProviderOptions::parse(["aws.placement_group=tight"]).unwrap();
            let refused = config.apply(options.settings("aws")).unwrap_err();
            assert!(
                refused.contains("cluster, spread, partition"),
                "names the choices: {refused}"
            );
        }
    }
}
