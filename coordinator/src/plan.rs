//! How a pool is made, whoever asks (`skyward run`, `skyward pool up`, the background
//! coordinator): the plan checked before anything is created, the providers it names, where
//! the coordinator listens and what cloud nodes dial and download. The command line builds
//! a [`PoolPlan`] from its arguments; nothing here reads them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use skyward_core::selection::Selection;
use skyward_core::spec::PoolSpec;
use skyward_providers::{
    self as provider, LocalProvider, Provider, ProviderContext, ProviderOptions,
};

/// How `skyward run` and `skyward pool up` make a pool, checked before anything is created.
pub struct PoolPlan {
    pub provider_options: ProviderOptions,
    /// The `--provider-opt` settings as given, for the state store.
    pub provider_opts: Vec<String>,
    pub listen: Option<SocketAddr>,
    pub advertise: Option<SocketAddr>,
    pub agent_binary: Option<PathBuf>,
    pub agent_url: Option<String>,
    /// The SHA-256 (hex) of the agent at `agent_url`: nodes run it only if it matches.
    pub agent_sha256: Option<String>,
    pub spec: PoolSpec,
    pub selection: Selection,
    pub providers: String,
    pub node_timeout: Duration,
    /// New nodes per place an hour that may replace lost ones (see
    /// [`crate::keeper::keep_size`]).
    pub max_replacements: u32,
}

/// Loopback, unless the coordinator dials cloud nodes (`--reverse`): then from any address,
/// on a port of the system's choosing (nodes never dial it).
pub fn default_listen(plan: &PoolPlan, providers: &[Arc<dyn Provider>]) -> SocketAddr {
    let cloud = providers.iter().any(|p| p.name() != "local");
    match plan.spec.reverse && cloud {
        true => SocketAddr::from(([0, 0, 0, 0], 0)),
        false => SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

/// How cloud nodes reach this coordinator and get the agent. Only needed when a provider
/// other than `local` is in the list.
pub fn advertise(
    plan: &PoolPlan,
    providers: &[Arc<dyn Provider>],
) -> Result<crate::Advertise, String> {
    if providers.iter().all(|p| p.name() == "local") {
        return Ok(crate::Advertise::default());
    }
    if plan.spec.reverse && plan.agent_url.is_none() {
        // Nodes cannot reach a coordinator they cannot dial to download the agent from it.
        return match plan.spec.image {
            Some(_) => Ok(crate::Advertise {
                address: plan.advertise,
                ..Default::default()
            }),
            None => Err("with --reverse, cloud nodes cannot download the agent from this coordinator: pass --agent-url URL (a Linux skyward-agent they can fetch) or --image with skyward-agent preinstalled".into()),
        };
    }
    if let Some(url) = &plan.agent_url {
        if !url.starts_with("https://") && plan.agent_sha256.is_none() {
            return Err(format!(
                "--agent-url {url} is not HTTPS: nodes would run whatever answers there as root; give --agent-sha256 HEX (the binary's SHA-256) or an https:// URL"
            ));
        }
        return Ok(crate::Advertise {
            address: plan.advertise,
            agent_binaries: Vec::new(),
            agent_url: plan.agent_url.clone(),
            agent_sha256: plan.agent_sha256.clone(),
        });
    }
    let binary = match &plan.agent_binary {
        Some(path) => path.clone(),
        None => portable_agent().map_or_else(LocalProvider::find_agent_binary, Ok)?,
    };
    // Refuse now what nodes could not run (a macOS build, a missing file).
    crate::download::elf_arch(&binary)?;
    Ok(crate::Advertise {
        address: plan.advertise,
        agent_binaries: vec![binary],
        ..Default::default()
    })
}

/// The agent built for old glibc by `scripts/build-agent.sh`, beside this `skyward`: it runs
/// on every image, where the plain build needs this machine's glibc.
pub fn portable_agent() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let portable = exe.with_file_name(format!("skyward-agent-linux-{}", std::env::consts::ARCH));
    portable.is_file().then_some(portable)
}

/// The providers named on the command line. `need_agent`: refuse up front when the local
/// provider is asked to start nodes without an agent binary to run.
pub fn make_providers(
    names: &str,
    options: &ProviderOptions,
    local_root: PathBuf,
    need_agent: bool,
) -> Result<Vec<Arc<dyn Provider>>, String> {
    let agent_bin = LocalProvider::find_agent_binary();
    if need_agent && names.split(',').any(|n| n.trim() == "local") {
        if let Err(message) = &agent_bin {
            return Err(message.clone());
        }
    }
    provider::from_names_with(
        names,
        &ProviderContext {
            agent_bin,
            local_root,
        },
        options,
    )
}
