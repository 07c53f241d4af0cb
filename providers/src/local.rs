//! The local provider: each node is a real `skyward-agent` process on this machine, in a
//! work dir of its own, dialing the coordinator on loopback exactly as a cloud node would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};

use super::{
    ErrorKind, Instance, NodeBootstrap, Provider, ProviderError, ProviderStatus, ProvisionRequest,
};
use skyward_core::offer::{Market, Offer};
use skyward_core::spec::PoolSpec;

/// How long an agent gets to stop its tasks and exit after SIGTERM before it is killed.
const AGENT_EXIT_GRACE: Duration = Duration::from_secs(6);

pub struct LocalProvider {
    agent_bin: Result<PathBuf, String>,
    root: PathBuf,
    agents: Mutex<HashMap<String, Vec<(String, Child)>>>,
}

/// The agent's settings variables whose values this provider gives it as flags.
const DECIDED_BY_THE_PROVIDER: [&str; 8] = [
    "SKYWARD_COORDINATOR",
    "SKYWARD_LISTEN",
    "SKYWARD_CA_PIN",
    "SKYWARD_TOKEN",
    "SKYWARD_NODE_ID",
    "SKYWARD_WORK_DIR",
    "SKYWARD_MIG",
    "SKYWARD_DEADLINE",
];

impl LocalProvider {
    /// `root` holds one work dir per node (`root/<node id>`). Without an agent binary the
    /// provider still lists its offer but cannot provision.
    pub fn new(agent_bin: Result<PathBuf, String>, root: PathBuf) -> Self {
        LocalProvider {
            agent_bin,
            root,
            agents: Mutex::new(HashMap::new()),
        }
    }

    /// The `skyward-agent` beside the running executable, or `SKYWARD_AGENT_BIN`.
    pub fn find_agent_binary() -> Result<PathBuf, String> {
        if let Some(path) = std::env::var_os("SKYWARD_AGENT_BIN") {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "SKYWARD_AGENT_BIN={} is not a file: point it at a built skyward-agent",
                    path.display()
                ))
            };
        }
        let exe = std::env::current_exe().map_err(|e| format!("cannot locate skyward: {e}"))?;
        let beside = exe.with_file_name("skyward-agent");
        if beside.is_file() {
            Ok(beside)
        } else {
            Err(format!(
                "skyward-agent not found at {}: build it with `cargo build --release` (it is part of the workspace) or set SKYWARD_AGENT_BIN",
                beside.display()
            ))
        }
    }

    pub fn work_dir(&self, node_id: &str) -> PathBuf {
        self.root.join(node_id)
    }

    fn spawn(
        &self,
        request: &ProvisionRequest,
        node: &NodeBootstrap,
        listen: Option<SocketAddr>,
    ) -> Result<Child, ProviderError> {
        let agent_bin = self
            .agent_bin
            .as_ref()
            .map_err(|why| ProviderError::new("local", ErrorKind::Invalid, why.clone()))?;
        let dir = self.work_dir(&node.node_id);
        std::fs::create_dir_all(&dir).map_err(|e| self.error(format!("{}: {e}", dir.display())))?;
        let log = std::fs::File::create(dir.join("agent.log"))
            .map_err(|e| self.error(format!("{}/agent.log: {e}", dir.display())))?;
        let mut command = Command::new(agent_bin);
        match listen {
            Some(address) => command.arg("--listen").arg(address.to_string()),
            None => command
                .arg("--coordinator")
                .arg(&request.bootstrap.coordinator),
        };
        if let Some(layout) = &request.bootstrap.mig {
            command.arg("--mig").arg(layout);
        }
        if let Some(deadline) = request.bootstrap.deadline {
            command.arg("--deadline").arg(deadline.to_string());
        }
        command
            .arg("--ca-pin")
            .arg(&request.bootstrap.ca_pin)
            .arg("--node-id")
            .arg(&node.node_id)
            .arg("--work-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| self.error(e.to_string()))?)
            .stderr(log)
            // Its own group, so a Ctrl-C at the terminal reaches the CLI, which tears down in order.
            .process_group(0)
            .kill_on_drop(true);
        // What this provider decides for the agent comes as the flags above, never from
        // variables this process inherited: the CLI's settings share some of the agent's
        // names (SKYWARD_LISTEN: where the coordinator listens, to the agent: listen instead
        // of dialing; SKYWARD_MIG). The agent's other variables (its idle timeout, memory
        // bounds, spot watch) pass through.
        for var in DECIDED_BY_THE_PROVIDER {
            command.env_remove(var);
        }
        // The token goes in the environment: argv is readable by every user.
        command.env("SKYWARD_TOKEN", &node.token);
        // SAFETY: prctl is async-signal-safe and touches no parent memory.
        unsafe {
            command.pre_exec(|| {
                // Should the CLI die without tearing down (kill -9), its agents still go.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        command
            .spawn()
            .map_err(|e| self.error(format!("cannot start {}: {e}", agent_bin.display())))
    }

    fn error(&self, message: String) -> ProviderError {
        ProviderError::new("local", ErrorKind::Api, message)
    }

    /// This machine, as the one offer the local provider has.
    fn this_machine() -> Offer {
        let vcpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_gb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .map(|kib| (kib / (1024.0 * 1024.0) * 10.0).round() / 10.0)
            .unwrap_or(0.0);
        Offer {
            provider: "local".into(),
            region: "local".into(),
            instance_type: "process".into(),
            accelerator: None,
            vcpus,
            memory_gb,
            on_demand_per_hour: Some(0.0),
            spot_per_hour: None,
            available: true,
            spot_available: None,
            provider_ref: String::new(),
        }
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        "local"
    }

    async fn offers(&self, spec: &PoolSpec) -> Result<Vec<Offer>, ProviderError> {
        if let Some(wanted) = &spec.accelerator {
            // Local GPUs come with the accelerators work; until then, say where GPUs are.
            return Err(ProviderError::new(
                "local",
                ErrorKind::NoOffers,
                format!("local nodes have no {}", wanted.accelerator.name),
            )
            .hint("use a cloud provider for accelerators"));
        }
        Ok(vec![Self::this_machine()])
    }

    async fn provision(
        &self,
        request: &ProvisionRequest,
        _offer: &Offer,
        _market: Market,
    ) -> Result<Vec<Instance>, ProviderError> {
        let mut instances = Vec::new();
        for node in &request.nodes {
            // Local nodes share this machine's ports: each gets a free one of its own.
            let listen = match request.bootstrap.reverse {
                Some(_) => Some(free_udp_port()?),
                None => None,
            };
            let child = self.spawn(request, node, listen)?;
            let pid = child.id().unwrap_or(0);
            self.agents
                .lock()
                .expect("agents lock")
                .entry(request.pool.clone())
                .or_default()
                .push((node.node_id.clone(), child));
            instances.push(Instance {
                node_id: node.node_id.clone(),
                provider_id: format!("pid {pid}"),
                address: listen,
            });
        }
        Ok(instances)
    }

    async fn failed_nodes(&self, pool: &str) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        let mut agents = self.agents.lock().expect("agents lock");
        for (node_id, child) in agents.get_mut(pool).into_iter().flatten() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.work_dir(node_id).join("agent.log");
                failed.push((
                    node_id.clone(),
                    format!("agent exited ({status}): {}", last_line(&log)),
                ));
            }
        }
        failed
    }

    async fn status(&self) -> ProviderStatus {
        ProviderStatus {
            provider: "local".into(),
            configured: true,
            working: self.agent_bin.is_ok(),
            detail: match &self.agent_bin {
                Ok(path) => format!("agent {}", path.display()),
                Err(why) => why.clone(),
            },
        }
    }

    fn supports_reverse(&self) -> bool {
        true
    }

    fn reverse_needs_public_ip(&self) -> bool {
        false
    }

    async fn teardown(&self, pool: &str) -> Result<(), ProviderError> {
        let agents = self
            .agents
            .lock()
            .expect("agents lock")
            .remove(pool)
            .unwrap_or_default();
        stop_agents(agents).await;
        Ok(())
    }

    async fn terminate(&self, pool: &str, node_id: &str) -> Result<(), ProviderError> {
        let agents = {
            let mut all = self.agents.lock().expect("agents lock");
            let Some(of_pool) = all.get_mut(pool) else {
                return Ok(());
            };
            let (gone, kept) = std::mem::take(of_pool)
                .into_iter()
                .partition(|(node, _)| node == node_id);
            *of_pool = kept;
            gone
        };
        stop_agents(agents).await;
        Ok(())
    }
}

/// SIGTERM to every agent, then SIGKILL to any still there after the grace (one that is
/// stopped, or hung, as a lost node's may be).
async fn stop_agents(agents: Vec<(String, tokio::process::Child)>) {
    for (_, child) in &agents {
        if let Some(pid) = child.id() {
            // SAFETY: signalling a pid we spawned and have not reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    for (node_id, mut child) in agents {
        match tokio::time::timeout(AGENT_EXIT_GRACE, child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(node = %node_id, "agent did not exit after SIGTERM; killing it");
                let _ = child.kill().await;
            }
        }
    }
}

/// A loopback UDP address no one is using now, for a listening agent.
fn free_udp_port() -> Result<SocketAddr, ProviderError> {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .map_err(|e| ProviderError::new("local", ErrorKind::Api, format!("no free UDP port: {e}")))
}

fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("no output in {}", log.display()))
}
