use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use skyward_agent::AgentConfig;

/// Skyward node agent: dials its coordinator over mutually authenticated QUIC and runs tasks.
#[derive(Parser, Debug)]
#[command(name = "skyward-agent", version)]
struct Args {
    /// Coordinator address, host:port (the agent dials it).
    #[arg(long, env = "SKYWARD_COORDINATOR", required_unless_present = "listen")]
    coordinator: Option<String>,
    /// Listen on this address for the coordinator to dial instead (a coordinator behind NAT);
    /// only a client with a certificate of the pinned pool CA gets through.
    #[arg(long, env = "SKYWARD_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// SHA-256 (hex) of the pool CA certificate.
    #[arg(long, env = "SKYWARD_CA_PIN")]
    ca_pin: String,
    /// Single-use enrollment token (prefer the environment: argv is visible to other users).
    #[arg(long, env = "SKYWARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This node's id, as the coordinator named it.
    #[arg(long, env = "SKYWARD_NODE_ID")]
    node_id: String,
    /// Directory for the node's key, certificate and task working directories.
    #[arg(long, env = "SKYWARD_WORK_DIR")]
    work_dir: PathBuf,
    /// Exit after the coordinator has been unreachable this long (e.g. 10m, 30s).
    #[arg(long, env = "SKYWARD_LEASE", default_value = "10m", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Partition every GPU with MIG at startup: one profile to fill each GPU with (1g.10gb),
    /// or exactly these profiles on each (3g.40gb,2g.20gb,1g.10gb).
    #[arg(long, env = "SKYWARD_MIG", value_name = "LAYOUT")]
    mig: Option<String>,
    /// The pool's end, in Unix seconds: past it the agent stops its tasks and ends as for a
    /// lost lease, whatever the coordinator says.
    #[arg(long, env = "SKYWARD_DEADLINE", value_name = "UNIX_SECONDS")]
    deadline: Option<u64>,
    /// What to do once the lease runs out or the deadline passes, after stopping every task:
    /// exit, or poweroff (cloud machines, which then terminate).
    #[arg(long, env = "SKYWARD_ON_POOL_END", default_value = "exit", value_parser = str::parse::<skyward_agent::OnPoolEnd>)]
    on_pool_end: skyward_agent::OnPoolEnd,
    /// Watch for spot interruption notices and tell the coordinator at once: aws (EC2's
    /// instance metadata service; SKYWARD_IMDS=HOST:PORT points elsewhere) or aws=HOST:PORT.
    #[arg(long, env = "SKYWARD_SPOT_WATCH", value_parser = skyward_agent::interruption::Watch::parse)]
    spot_watch: Option<skyward_agent::interruption::Watch>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKYWARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    skyward_common::install_crypto_provider();
    let config = AgentConfig {
        coordinator: args.coordinator,
        listen: args.listen,
        ca_pin: args.ca_pin,
        token: args.token,
        node_id: args.node_id,
        work_dir: args.work_dir,
        lease: args.lease,
        mig: args.mig,
        deadline: args
            .deadline
            .map(|secs| std::time::UNIX_EPOCH + Duration::from_secs(secs)),
        on_pool_end: args.on_pool_end,
        spot_watch: args.spot_watch,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skyward-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(skyward_agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("skyward-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
