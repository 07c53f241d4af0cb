//! Where nodes come from. Every provider (local processes now, clouds later) implements the
//! same trait: create nodes that run the agent with their bootstrap, and remove every node
//! of a pool, found by the pool's name rather than by a list that a crash could lose.

pub mod local;

use async_trait::async_trait;

pub use local::LocalProvider;

/// What one node needs to join: its id and its single-use token.
#[derive(Debug, Clone)]
pub struct NodeBootstrap {
    pub node_id: String,
    pub token: String,
}

#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    pub pool: String,
    /// `host:port` the agents dial.
    pub coordinator: String,
    pub ca_pin: String,
    pub nodes: Vec<NodeBootstrap>,
}

/// A node the provider created.
#[derive(Debug, Clone)]
pub struct Instance {
    pub node_id: String,
    /// The provider's own id for it (a pid, an instance id).
    pub provider_id: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{provider}: {message}")]
pub struct ProviderError {
    pub provider: String,
    pub message: String,
}

#[async_trait]
pub trait Provider: Send + Sync {
    fn name(&self) -> &str;

    /// Creates the nodes. On error, whatever was created stays findable by [`teardown`](Self::teardown).
    async fn provision(&self, request: &ProvisionRequest) -> Result<Vec<Instance>, ProviderError>;

    /// Nodes that died before connecting, with what is known about why.
    async fn failed_nodes(&self, pool: &str) -> Vec<(String, String)>;

    /// Removes every node of `pool`, waiting until they are gone.
    async fn teardown(&self, pool: &str) -> Result<(), ProviderError>;
}
