//! The Skyward agent: the small program that runs on every node.
//!
//! It enrolls with a single-use token (its key never leaves the node), keeps one mutually
//! authenticated QUIC connection to the coordinator, reports its inventory and health, and
//! runs each task it is sent in a process group of its own, streaming output as it comes.

pub mod enroll;
pub mod inventory;
pub mod runner;
pub mod session;

use std::path::PathBuf;
use std::time::Duration;

/// Everything an agent needs to know, from flags or the environment.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the coordinator's QUIC endpoint.
    pub coordinator: String,
    /// Hex SHA-256 of the pool CA: the only trust anchor the agent needs.
    pub ca_pin: String,
    /// Single-use bootstrap token; not needed once the work dir holds a certificate.
    pub token: Option<String>,
    pub node_id: String,
    /// Where the agent keeps its key and certificate and where tasks run by default.
    pub work_dir: PathBuf,
    /// How long the agent keeps trying to reach a silent coordinator before it gives up and exits.
    pub lease: Duration,
}

pub use session::run;
