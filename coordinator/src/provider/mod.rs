//! Where nodes come from. Every provider (local processes now, clouds next) implements the
//! same trait: list offers for a spec, create nodes from one offer with each node's
//! bootstrap, and remove every node of a pool, found by the pool's name rather than by a
//! list that a crash could lose.

pub mod aws;
pub mod digitalocean;
pub mod local;
pub mod vastai;
pub mod verda;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

pub use local::LocalProvider;

use crate::bootstrap::Bootstrap;
use crate::offer::{Market, Offer};
use crate::spec::PoolSpec;

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

    /// Checks credentials with a read-only call.
    async fn status(&self) -> ProviderStatus;

    /// Whether nodes can listen for the coordinator to dial them (`--reverse`): the provider
    /// must start agents listening, open that port to the coordinator, and give addresses.
    fn supports_reverse(&self) -> bool {
        false
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

/// Makes the providers named in a comma-separated list, in order.
pub fn from_names(
    names: &str,
    context: &ProviderContext,
) -> Result<Vec<Arc<dyn Provider>>, String> {
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
            "digitalocean" => Arc::new(digitalocean::DigitalOcean::from_env()),
            // Without a client id and secret it still constructs; its calls fail with Auth.
            "verda" => Arc::new(verda::Verda::from_env()),
            // Without a key it still constructs; its calls then fail with Auth and a hint.
            "vastai" => Arc::new(vastai::VastAi::from_env()),
            // Credentials come through the standard AWS chain when the API is first called.
            "aws" => Arc::new(aws::Aws::new(aws::AwsConfig::from_env())),
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
