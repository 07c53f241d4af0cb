//! The Skyward agent: the small program that runs on every node.
//!
//! It enrolls with a single-use token (its key never leaves the node), keeps one mutually
//! authenticated QUIC connection to the coordinator, reports its inventory and health, and
//! runs each task it is sent in a process group of its own, streaming output as it comes.
//! A custom agent adds typed tasks ([`skyward_common::typed::Task`]) to it: see [`Agent`].

pub mod cli;
pub mod enroll;
pub mod gpu;
pub mod interruption;
pub mod inventory;
pub mod journal;
pub mod mig;
pub mod neuron;
pub mod probe;
pub mod pty;
pub mod runner;
pub mod session;
pub mod task_threads;
pub mod tool;
pub mod typed;
pub mod workdir;

use std::path::PathBuf;
use std::time::Duration;

/// Everything an agent needs to know, from flags or the environment.
#[derive(Clone)]
pub struct AgentConfig {
    /// `host:port` of the coordinator's QUIC endpoint, when the agent dials it.
    pub coordinator: Option<String>,
    /// Where to listen instead, for a coordinator that dials its agents (one behind NAT).
    pub listen: Option<std::net::SocketAddr>,
    /// Hex SHA-256 of the pool CA: the only trust anchor the agent needs.
    pub ca_pin: String,
    /// Single-use bootstrap token; not needed once the work dir holds a certificate.
    pub token: Option<String>,
    pub node_id: String,
    /// Where tasks run by default; the key and certificate are kept beside it, in
    /// `WORK_DIR.identity` (see [`enroll::identity_dir`]).
    pub work_dir: PathBuf,
    /// How long the agent keeps trying to reach a silent coordinator before it gives up and exits.
    pub lease: Duration,
    /// The MIG layout to give every GPU at startup (`1g.10gb`, `3g.40gb,2g.20gb,1g.10gb`);
    /// see [`mig`].
    pub mig: Option<String>,
    /// When the pool ends whatever happens (its TTL), if it has one.
    pub deadline: Option<std::time::SystemTime>,
    /// What to do when the pool is over without the coordinator saying so.
    pub on_pool_end: OnPoolEnd,
    /// Which interruption notices to watch for (spot instances).
    pub spot_watch: Option<interruption::Watch>,
}

/// What an agent does once its pool is over without a word from the coordinator (the lease
/// ran out, or the pool's deadline passed), after stopping every task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnPoolEnd {
    /// Exit (a local node, or a machine something else removes).
    #[default]
    Exit,
    /// Power the machine off: on a cloud machine set to terminate on shutdown, that ends
    /// its bill even if nobody ever tears the pool down.
    Poweroff,
}

impl std::str::FromStr for OnPoolEnd {
    type Err = String;
    fn from_str(text: &str) -> Result<OnPoolEnd, String> {
        match text {
            "exit" => Ok(OnPoolEnd::Exit),
            "poweroff" => Ok(OnPoolEnd::Poweroff),
            other => Err(format!("{other:?}: use exit or poweroff")),
        }
    }
}

/// Everything but the token, which must never reach a log.
impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("coordinator", &self.coordinator)
            .field("listen", &self.listen)
            .field("ca_pin", &self.ca_pin)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("node_id", &self.node_id)
            .field("work_dir", &self.work_dir)
            .field("lease", &self.lease)
            .field("mig", &self.mig)
            .field("deadline", &self.deadline)
            .field("on_pool_end", &self.on_pool_end)
            .field("spot_watch", &self.spot_watch)
            .finish()
    }
}

pub use cli::Agent;
pub use session::{run, run_on, run_with};
pub use typed::Registry;

#[cfg(test)]
mod tests {
    #[test]
    fn debug_output_never_shows_the_token() {
        let config = super::AgentConfig {
            coordinator: Some("127.0.0.1:1".into()),
            listen: None,
            ca_pin: "00".into(),
            token: Some("s3cret-token".into()),
            node_id: "node-1".into(),
            work_dir: "/tmp".into(),
            lease: std::time::Duration::from_secs(1),
            mig: None,
            deadline: None,
            on_pool_end: super::OnPoolEnd::Exit,
            spot_watch: None,
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
