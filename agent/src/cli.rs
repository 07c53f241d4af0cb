//! The agent program as a library: the stock `skyward-agent` is `Agent::new().main()`; a
//! custom agent is the same program with typed tasks registered
//! (`Agent::new().register::<Sum>().main()`), taking the same flags and environment.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use skyward_common::typed::Task;

use crate::typed::Registry;
use crate::AgentConfig;

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
    /// Where tasks run by default; the node's key and certificate are kept beside it, in
    /// WORK_DIR.identity (owner-only), out of the tasks' reach by default.
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
    #[arg(long, env = "SKYWARD_ON_POOL_END", default_value = "exit", value_parser = str::parse::<crate::OnPoolEnd>)]
    on_pool_end: crate::OnPoolEnd,
    /// Watch for spot interruption notices and tell the coordinator at once: aws (EC2's
    /// instance metadata service; SKYWARD_IMDS=HOST:PORT points elsewhere) or aws=HOST:PORT.
    #[arg(long, env = "SKYWARD_SPOT_WATCH", value_parser = crate::interruption::Watch::parse)]
    spot_watch: Option<crate::interruption::Watch>,
    /// How long a silent connection to the coordinator lasts before it counts as lost and
    /// the agent dials again (QUIC's idle timeout: the shorter of the two sides' wins).
    #[arg(long, env = "SKYWARD_IDLE_TIMEOUT", value_name = "DURATION",
          default_value = "30s", value_parser = parse_idle_timeout)]
    idle_timeout: Duration,
    /// Bytes of one task's output held in memory before it spills to the work dir.
    #[arg(long, env = "SKYWARD_TASK_MEMORY", value_name = "BYTES",
          default_value_t = skyward_common::limits::MAX_TASK_JOURNAL)]
    task_memory: usize,
    /// Bytes of one task's output held in spill files at once; past them the task's pipes
    /// wait until its output is taken (files go as their output does).
    #[arg(long, env = "SKYWARD_TASK_SPILL", value_name = "BYTES",
          default_value_t = skyward_common::limits::MAX_TASK_SPILL)]
    task_spill: u64,
}

/// A node agent: the stock one, or a custom one with typed tasks registered.
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # use skyward_common::typed::{Task, TaskContext, TaskResult};
/// # #[derive(Serialize, Deserialize)] struct Sum { values: Vec<u64> }
/// # impl Task for Sum {
/// #     const NAME: &'static str = "sum"; const VERSION: u32 = 1; type Output = u64;
/// #     fn run(self, _: &TaskContext) -> TaskResult<u64> { Ok(self.values.iter().sum()) }
/// # }
/// fn main() -> std::process::ExitCode {
///     skyward_agent::Agent::new().register::<Sum>().main()
/// }
/// ```
#[derive(Default)]
pub struct Agent {
    registry: Registry,
}

impl Agent {
    /// The stock agent: commands, probes, no typed tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds typed task `T`: the agent runs it when a coordinator program submits one.
    pub fn register<T: Task>(mut self) -> Self {
        self.registry.register::<T>();
        self
    }

    /// The names of the registered typed tasks, sorted.
    pub fn task_names(&self) -> Vec<&'static str> {
        self.registry.names()
    }

    /// Runs the agent from this process's flags and environment (those of `skyward-agent`)
    /// until its pool ends; the exit code says how it ended.
    pub fn main(self) -> ExitCode {
        self.run_from_args(std::env::args_os())
    }

    /// [`Agent::main`] with the given arguments (the first is the program name).
    pub fn run_from_args<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args = match Args::try_parse_from(args) {
            Ok(args) => args,
            Err(e) => e.exit(),
        };
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            // Colours only for a person: a log file (agent.log, the journal) gets plain text,
            // which is also what the coordinator quotes when an agent dies.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("SKYWARD_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .try_init()
            .ok();
        skyward_common::install_crypto_provider();
        crate::journal::set_limits(args.task_memory, args.task_spill);
        skyward_common::transport::set_idle_timeout(args.idle_timeout);
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
        match runtime.block_on(crate::session::run_with(config, self.registry)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("skyward-agent: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// An idle timeout between 1 s and 10 min: shorter would drop connections on any hiccup,
/// longer would hide a dead coordinator past a typical lease.
fn parse_idle_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&timeout) {
        return Err(format!("{text} is out of range: give 1s to 10m"));
    }
    Ok(timeout)
}
