//! Skyward for programs: make a pool from a program, run commands and typed tasks on it,
//! and tear it down.
//!
//! [`ComputePool::builder`] provisions a pool exactly as `skyward run` does (providers,
//! selection, the same QUIC coordinator and agents), records it in the state store so that
//! `skyward pool list` and `skyward down` see it, and hands back a [`ComputePool`]:
//!
//! - [`ComputePool::run`]: one command on one node, its output and exit status;
//! - [`ComputePool::broadcast`]: one command on every node (each told its rank), one result
//!   per node in rank order;
//! - [`ComputePool::stream`]: one command, its output as it comes;
//! - [`ComputePool::submit`] and [`ComputePool::map`]: typed tasks ([`Task`]) that a custom
//!   agent (`skyward_agent::Agent::new().register::<T>()`) runs by value, their typed outputs
//!   back, a map's in input order.
//!
//! Every call is a future: dropping it (or a `tokio::time::timeout` around it running out)
//! cancels its tasks on the nodes. [`ComputePool::shutdown`] tears the pool down; a pool
//! dropped without it (an early return, a panic) is torn down by a task spawned on the
//! current Tokio runtime, and local agents are killed with the pool even if that runtime
//! stops first. Cloud machines of a pool whose teardown never ran end by themselves: each
//! agent stops and powers its machine off once it has not reached its coordinator for its
//! lease (10 minutes), or at the pool's [`ttl`](ComputePoolBuilder::ttl); `skyward down`
//! removes them at once.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use skyward::{Command, ComputePool, Local, Selection, Task, TaskContext, TaskResult};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Sum {
//!     values: Vec<u64>,
//! }
//!
//! impl Task for Sum {
//!     const NAME: &'static str = "sum";
//!     const VERSION: u32 = 1;
//!     type Output = u64;
//!     fn run(self, _ctx: &TaskContext) -> TaskResult<u64> {
//!         Ok(self.values.iter().sum())
//!     }
//! }
//!
//! # async fn example() -> Result<(), skyward::Error> {
//! let pool = ComputePool::builder()
//!     .provider(Local::default())
//!     .selection(Selection::Cheapest)
//!     .nodes(2)
//!     // A custom agent: `skyward_agent::Agent::new().register::<Sum>().main()`.
//!     .agent_binary("target/release/my-agent")
//!     .build()
//!     .await?;
//! let out = pool.run(Command::new("uname").arg("-a")).await?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! let chunks = vec![vec![1, 2], vec![3, 4]];
//! let sums: Vec<u64> = pool.map(chunks.into_iter().map(|values| Sum { values })).await?;
//! assert_eq!(sums, vec![3, 7]);
//! pool.shutdown().await?;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use skyward_common::limits::MAX_TYPED_OUTPUT;
use skyward_common::protocol::{TaskEvent, TaskSpec};
use tokio::sync::{mpsc, oneshot};

use skyward_coordinator::keeper::{self, Kept};
use skyward_coordinator::pool::{self, Pool, PoolProgress};
use skyward_coordinator::preflight::Preflight;
use skyward_coordinator::run::{
    job_nodes, run_job, Attempt, Job, JobDriver, JobNews, RunEvent, TaskPlan, TaskReport,
};
use skyward_coordinator::server::{Admitted, Coordinator, CoordinatorConfig, NodeHandle};
use skyward_coordinator::session::record;
use skyward_coordinator::store::{Owner, Store};
use skyward_core::jobs::{self, JobSpec};
use skyward_core::lifecycle;
use skyward_core::membership::Budget;
use skyward_core::slots::GpuRequest;
use skyward_core::slots::SlotTask;
use skyward_core::spec::{AcceleratorRequest, PoolSpec};
use skyward_providers::local::LocalProvider;
use skyward_providers::{self as provider, Provider, ProviderContext, ProviderOptions};

pub use skyward_common::protocol::{OutputStream, TaskOutcome};
pub use skyward_common::typed::{Task, TaskContext, TaskResult, TypedError};
pub use skyward_coordinator::pool::{FailedAttempt, ProvisionError};
pub use skyward_coordinator::run::RunError;
pub use skyward_core::lifecycle::Phase;
pub use skyward_core::selection::Selection;
pub use skyward_core::spec::Allocation;
pub use skyward_providers::ErrorKind;

/// What can go wrong; every message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The builder was given something unusable; nothing was created.
    #[error("{0}")]
    Invalid(String),
    /// No machines could be had, or none became nodes: its `kind` says why (refused
    /// credentials, no capacity, a quota, a bad request, machines that never connected, an
    /// API fault, nothing that fits) and its `attempts` what was tried. Whatever was made was
    /// removed.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// The pool's own bookkeeping failed (its record, its coordinator), or its teardown.
    #[error("{0}")]
    Pool(String),
    /// A typed task did not produce its output: it returned an error, panicked (the message
    /// is the panic's), or the agent does not know it (or knows another version).
    #[error("task `{task}` on {node}: {message}")]
    Task {
        task: String,
        node: String,
        message: String,
    },
    /// A command or task has no outcome of its own: its `RunError` says why (its node was
    /// lost, no node can take it, the node broke the protocol, it is over a size limit, a
    /// broadcast's preflight failed).
    #[error(transparent)]
    Run(#[from] RunError),
    /// A typed value could not be encoded or decoded, or is over its size limit.
    #[error(transparent)]
    Typed(#[from] TypedError),
}

/// Where a pool's nodes come from: [`Local`] or [`Cloud`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderChoice {
    name: String,
    options: Vec<(String, String)>,
}

/// Nodes as agent processes on this machine (the `local` provider), dialing the pool's
/// coordinator on loopback exactly as cloud nodes do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Local;

impl From<Local> for ProviderChoice {
    fn from(_: Local) -> Self {
        ProviderChoice {
            name: "local".into(),
            options: Vec::new(),
        }
    }
}

/// A cloud provider by name (`aws`, `digitalocean`, `verda`, `vastai`), with the settings
/// `--provider-opt NAME.KEY=VALUE` takes on the command line; credentials come from the
/// environment as for the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cloud {
    choice: ProviderChoice,
}

impl Cloud {
    pub fn new(name: impl Into<String>) -> Self {
        Cloud {
            choice: ProviderChoice {
                name: name.into(),
                options: Vec::new(),
            },
        }
    }

    /// One setting: `Cloud::new("aws").option("ami", "ami-0123")`.
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.choice.options.push((key.into(), value.into()));
        self
    }
}

impl From<Cloud> for ProviderChoice {
    fn from(cloud: Cloud) -> Self {
        cloud.choice
    }
}

/// A program to run on a node (never through a shell unless it is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Option<Duration>,
}

impl Command {
    pub fn new(program: impl Into<String>) -> Self {
        Command {
            argv: vec![program.into()],
            env: Vec::new(),
            timeout: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.argv.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds a variable to the command's environment on the node.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Kills the command on its node (TERM, then KILL) past this; it ends as
    /// [`TaskOutcome::TimedOut`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn plan(&self, node: Option<usize>) -> TaskPlan {
        TaskPlan {
            argv: self.argv.clone(),
            env: self.env.clone(),
            node,
            gpus: GpuRequest::None,
            cwd: None,
        }
    }
}

/// A finished command: where it ran, how it ended, and everything it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub node: String,
    pub outcome: TaskOutcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CommandOutput {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.outcome.success()
    }

    /// The exit code a shell would report.
    pub fn exit_code(&self) -> i32 {
        self.outcome.exit_code()
    }
}

/// A piece of a command's output, as the node sent it (not split into lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: OutputStream,
    pub data: Bytes,
}

/// Sets up a pool; [`ComputePoolBuilder::build`] provisions it.
#[derive(Debug, Clone)]
pub struct ComputePoolBuilder {
    providers: Vec<ProviderChoice>,
    selection: Selection,
    nodes: usize,
    accelerator: Option<String>,
    cpu: Option<u32>,
    memory_gb: Option<f64>,
    allocation: Allocation,
    region: Option<String>,
    max_price: Option<f64>,
    ttl: Option<Duration>,
    connect_timeout: Option<Duration>,
    node_timeout: Option<Duration>,
    agent_binary: Option<PathBuf>,
    home: Option<PathBuf>,
    listen: Option<SocketAddr>,
    advertise: Option<SocketAddr>,
    tasks_per_node: Option<usize>,
    max_replacements: u32,
}

impl Default for ComputePoolBuilder {
    fn default() -> Self {
        ComputePoolBuilder {
            providers: Vec::new(),
            selection: Selection::default(),
            nodes: 1,
            accelerator: None,
            cpu: None,
            memory_gb: None,
            allocation: Allocation::default(),
            region: None,
            max_price: None,
            ttl: None,
            connect_timeout: None,
            node_timeout: None,
            agent_binary: None,
            home: None,
            listen: None,
            advertise: None,
            tasks_per_node: None,
            max_replacements: 3,
        }
    }
}

impl ComputePoolBuilder {
    /// Adds a provider; several are tried in the order of the [`selection`](Self::selection).
    /// Without any, the pool is local.
    pub fn provider(mut self, provider: impl Into<ProviderChoice>) -> Self {
        self.providers.push(provider.into());
        self
    }

    /// How offers are ordered (default: [`Selection::First`]).
    pub fn selection(mut self, selection: Selection) -> Self {
        self.selection = selection;
        self
    }

    /// How many nodes (default 1).
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// Accelerators per node, as `--accelerator` takes them: `A100`, `H100:8`.
    pub fn accelerator(mut self, accelerator: impl Into<String>) -> Self {
        self.accelerator = Some(accelerator.into());
        self
    }

    /// Least vCPUs per node.
    pub fn cpu(mut self, vcpus: u32) -> Self {
        self.cpu = Some(vcpus);
        self
    }

    /// Least memory per node, in GB.
    pub fn memory_gb(mut self, gb: f64) -> Self {
        self.memory_gb = Some(gb);
        self
    }

    /// Spot, on-demand, or spot if available (default: on-demand).
    pub fn allocation(mut self, allocation: Allocation) -> Self {
        self.allocation = allocation;
        self
    }

    /// Only offers in this region.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Highest price per node-hour, in USD.
    pub fn max_price(mut self, per_node_hour: f64) -> Self {
        self.max_price = Some(per_node_hour);
        self
    }

    /// The pool's longest life: past it every node stops its tasks and powers itself off
    /// (cloud) or exits (local), whether or not this program is still there.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long nodes get to come up and connect (default: 60 s local, 5 min cloud).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// A node silent this long is lost, and its tasks fail (default 30 s).
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = Some(timeout);
        self
    }

    /// The agent the nodes run: local nodes start it, cloud nodes download it from the
    /// coordinator (it must then be a Linux build). A custom agent with typed tasks goes
    /// here. Default: `SKYWARD_AGENT_BIN`, else the `skyward-agent` beside this program.
    pub fn agent_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.agent_binary = Some(path.into());
        self
    }

    /// Where the state store and the pool's files live (default: `SKYWARD_HOME`, else
    /// `$XDG_DATA_HOME/skyward`, else `~/.local/share/skyward`, as for the CLI).
    pub fn home(mut self, home: impl Into<PathBuf>) -> Self {
        self.home = Some(home.into());
        self
    }

    /// The coordinator's address (default 127.0.0.1 on a free port: enough for local nodes;
    /// cloud nodes need an address they reach, e.g. `0.0.0.0:7443` with
    /// [`advertise`](Self::advertise)).
    pub fn listen(mut self, address: SocketAddr) -> Self {
        self.listen = Some(address);
        self
    }

    /// The address nodes dial, when it differs from the listening one.
    pub fn advertise(mut self, address: SocketAddr) -> Self {
        self.advertise = Some(address);
        self
    }

    /// Typed tasks of a [`map`](ComputePool::map) at once on one node (default: the node's
    /// CPU count).
    pub fn tasks_per_node(mut self, tasks: usize) -> Self {
        self.tasks_per_node = Some(tasks);
        self
    }

    fn spec(&self) -> Result<PoolSpec, Error> {
        if self.nodes == 0 {
            return Err(Error::Invalid("nodes must be at least 1".into()));
        }
        if self.cpu == Some(0) {
            return Err(Error::Invalid("cpu must be at least 1".into()));
        }
        if self.tasks_per_node == Some(0) {
            return Err(Error::Invalid("tasks_per_node must be at least 1".into()));
        }
        if self.max_price.is_some_and(|p| p.is_nan() || p <= 0.0) {
            return Err(Error::Invalid(
                "max_price must be a positive price per node-hour, e.g. 2.5".into(),
            ));
        }
        let mut spec = PoolSpec::new(self.nodes);
        spec.accelerator = match &self.accelerator {
            Some(text) => Some(text.parse::<AcceleratorRequest>().map_err(Error::Invalid)?),
            None => None,
        };
        spec.vcpus = self.cpu;
        spec.memory_gb = self.memory_gb;
        spec.allocation = self.allocation;
        spec.region = self.region.clone();
        spec.max_price_per_hour = self.max_price;
        skyward_core::spec::check_ttl(self.ttl, "ttl").map_err(Error::Invalid)?;
        spec.ttl = self.ttl;
        let cloud = self.providers.iter().any(|p| p.name != "local");
        spec.connect_timeout = self.connect_timeout.unwrap_or(if cloud {
            Duration::from_secs(300)
        } else {
            Duration::from_secs(60)
        });
        Ok(spec)
    }

    /// How many new nodes may take the place of lost ones, per place an hour (default 3; 0
    /// never replaces). A node interrupted, silent past the node timeout or gone by its
    /// provider's word is given up, its machine removed, and a new node started in its place
    /// from the pool's own offer first, as `skyward pool up` does; see
    /// [`ComputePool::replacements`].
    pub fn max_replacements(mut self, per_place: u32) -> Self {
        self.max_replacements = per_place;
        self
    }

    /// Provisions the pool and returns once every node's agent is connected. Bad settings
    /// are refused before anything is created; a failed provisioning is torn down before
    /// the error is returned.
    pub async fn build(self) -> Result<ComputePool, Error> {
        skyward_common::install_crypto_provider();
        let spec = self.spec()?;
        let providers_chosen = match self.providers.is_empty() {
            true => vec![ProviderChoice::from(Local)],
            false => self.providers.clone(),
        };
        let names: Vec<&str> = providers_chosen.iter().map(|p| p.name.as_str()).collect();
        let names = names.join(",");
        let provider_opts: Vec<String> = providers_chosen
            .iter()
            .flat_map(|p| {
                p.options
                    .iter()
                    .map(move |(key, value)| format!("{}.{key}={value}", p.name))
            })
            .collect();
        let options = ProviderOptions::parse(provider_opts.iter().map(String::as_str))
            .map_err(Error::Invalid)?;
        let home = match &self.home {
            Some(home) => home.clone(),
            None => skyward_coordinator::store::skyward_home().map_err(Error::Invalid)?,
        };
        let agent_bin = match &self.agent_binary {
            Some(path) if path.is_file() => Ok(path.clone()),
            Some(path) => {
                return Err(Error::Invalid(format!(
                    "agent binary {} is not a file: build it first (cargo build --bins) or fix the path",
                    path.display()
                )))
            }
            None => LocalProvider::find_agent_binary(),
        };
        let local = names.split(',').any(|n| n == "local");
        if let (true, Err(why)) = (local, &agent_bin) {
            return Err(Error::Invalid(why.clone()));
        }
        let pool_name = format!("sky-{:08x}", rand::random::<u32>());
        let pool_dir = home.join("pools").join(&pool_name);
        let providers = provider::from_names_with(
            &names,
            &ProviderContext {
                agent_bin: agent_bin.clone(),
                local_root: pool_dir.join("nodes"),
            },
            &options,
        )
        .map_err(Error::Invalid)?;
        pool::check(&spec, &providers).map_err(Error::Invalid)?;
        let advertise = if local && providers.len() == 1 {
            skyward_coordinator::Advertise::default()
        } else {
            let binary = agent_bin.map_err(Error::Invalid)?;
            skyward_coordinator::download::elf_arch(&binary).map_err(Error::Invalid)?;
            skyward_coordinator::Advertise {
                address: self.advertise,
                agent_binaries: vec![binary],
                ..Default::default()
            }
        };
        // Recorded before anything exists, so that nothing this pool creates goes unrecorded.
        let store = Store::open(&home)
            .and_then(|store| {
                store
                    .add_pool(
                        &pool_name,
                        Owner::this_process(),
                        &names,
                        &provider_opts,
                        &pool_dir,
                    )
                    .map(|()| store)
            })
            .map_err(Error::Pool)?;
        let store = Mutex::new(store);
        let coordinator = match Coordinator::start_advertised(
            CoordinatorConfig {
                pool: pool_name.clone(),
                bind: self
                    .listen
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
                state_dir: Some(pool_dir.join("identity")),
            },
            advertise,
        ) {
            Ok(coordinator) => Arc::new(coordinator),
            Err(e) => {
                record(&store, |s| s.remove_pool(&pool_name));
                let _ = std::fs::remove_dir_all(&pool_dir);
                return Err(Error::Pool(format!("starting the coordinator: {e}")));
            }
        };
        if let Some(timeout) = self.node_timeout {
            coordinator.set_node_timeout(timeout);
        }
        let up = {
            let mut on_progress = |event: PoolProgress<'_>| {
                skyward_coordinator::session::record_progress(&store, &pool_name, &event)
            };
            Pool::up(
                coordinator.clone(),
                &providers,
                &self.selection,
                &spec,
                &mut on_progress,
            )
            .await
        };
        let shared = Arc::new(Shared {
            name: pool_name.clone(),
            dir: pool_dir,
            coordinator,
            providers,
            store,
            torn_down: AtomicBool::new(false),
            keeper: Mutex::new(None),
            replacements: Mutex::new(Vec::new()),
        });
        let phase = match &up {
            Ok(_) => lifecycle::Event::Up,
            Err(e) => lifecycle::Event::ProvisionFailed(e.message.clone()),
        };
        // Provisioning happens once: its end is always an event the phase allows.
        let _ = shared.coordinator.lifecycle_event(phase);
        let pool = match up {
            Ok(pool) => Arc::new(pool),
            Err(e) => {
                // Whatever an attempt left behind goes too, and the coordinator stops.
                let _ = shared.teardown().await;
                return Err(Error::Provision(e));
            }
        };
        let keeper = tokio::spawn(keep_size(
            pool.clone(),
            shared.clone(),
            self.selection.clone(),
            Budget::per_place(self.max_replacements, spec.nodes),
        ));
        *lock(&shared.keeper) = Some(keeper.abort_handle());
        Ok(ComputePool {
            pool,
            tasks_per_node: self.tasks_per_node,
            shared,
        })
    }
}

/// Keeps `pool` at its size (the same keeper as `skyward pool up`'s), recording what
/// becomes of each lost node.
async fn keep_size(pool: Arc<Pool>, shared: Arc<Shared>, selection: Selection, budget: Budget) {
    let mut on_news = |news: Kept<'_>| match news {
        Kept::Progress(event) => {
            skyward_coordinator::session::record_progress(&shared.store, &shared.name, &event)
        }
        Kept::Replacement(line) => {
            tracing::warn!(pool = %shared.name, "{line}");
            lock(&shared.replacements).push(line);
        }
        Kept::Shortfall(_) => {}
    };
    keeper::keep_size(&pool, &shared.providers, &selection, budget, &mut on_news).await
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a pool's teardown needs, shared with the teardown a dropped pool spawns.
struct Shared {
    name: String,
    dir: PathBuf,
    coordinator: Arc<Coordinator>,
    providers: Vec<Arc<dyn Provider>>,
    store: Mutex<Store>,
    torn_down: AtomicBool,
    /// The task keeping the pool at its size, stopped before the teardown.
    keeper: Mutex<Option<tokio::task::AbortHandle>>,
    /// What became of each lost node, oldest first.
    replacements: Mutex<Vec<String>>,
}

impl Shared {
    /// Stops the agents, removes the nodes, and forgets the pool (or records that its
    /// teardown failed, for `skyward down`). Runs once; later calls do nothing.
    async fn teardown(&self) -> Result<(), Error> {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(keeper) = lock(&self.keeper).take() {
            keeper.abort();
        }
        skyward_coordinator::session::tear_down(
            &self.name,
            &self.dir,
            &self.coordinator,
            &self.providers,
            &self.store,
        )
        .await
        .map_err(Error::Pool)
    }
}

/// A provisioned pool whose agents are connected. See the [module docs](self).
pub struct ComputePool {
    /// Command jobs go through [`run_job`]; several may run at once.
    pool: Arc<Pool>,
    tasks_per_node: Option<usize>,
    shared: Arc<Shared>,
}

impl ComputePool {
    pub fn builder() -> ComputePoolBuilder {
        ComputePoolBuilder::default()
    }

    /// The pool's name, as `skyward pool list` shows it.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The node ids, in rank order (`node-1` first; a replacement in its lost node's place).
    pub fn nodes(&self) -> Vec<String> {
        self.pool
            .nodes()
            .iter()
            .map(|n| n.node_id.clone())
            .collect()
    }

    /// What became of each node that was lost (`node-1 (why) replaced by node-3`, or why
    /// none took its place), oldest first.
    pub fn replacements(&self) -> Vec<String> {
        lock(&self.shared.replacements).clone()
    }

    /// Why the pool runs with fewer nodes than asked, once its replacement budget left a
    /// place empty (`replacements stopped: ...; the pool runs with 1 of 2 nodes`); `None`
    /// while it is whole.
    pub fn shortfall(&self) -> Option<String> {
        self.shared.coordinator.shortfall()
    }

    /// Runs `command` on the least loaded node; its whole output and how it ended. A
    /// command that exits non-zero is `Ok` (see [`CommandOutput::success`]); `Err` means
    /// the coordinator lost the task. Command jobs (`run`, `broadcast`) of one pool run one
    /// after another; typed tasks and streams run beside them.
    pub async fn run(&self, command: Command) -> Result<CommandOutput, Error> {
        let _counted = self.admit()?;
        let mut outputs = self.command_job(vec![command.plan(None)], &command).await?;
        Ok(outputs.remove(0))
    }

    /// Runs `command` on every node, each told its rank and the pool's layout (`RANK`,
    /// `WORLD_SIZE`, `MASTER_ADDR`..., once a preflight found that the nodes reach rank 0);
    /// one result per node, in rank order.
    pub async fn broadcast(&self, command: Command) -> Result<Vec<CommandOutput>, Error> {
        let _counted = self.admit()?;
        let plans = {
            Job::broadcast(
                &self.pool,
                command.argv.clone(),
                command.env.clone(),
                Preflight::default(),
            )
            .await
            .map_err(|e| RunError::Preflight(e.to_string()))?
        };
        self.command_job(plans, &command).await
    }

    async fn command_job(
        &self,
        tasks: Vec<TaskPlan>,
        command: &Command,
    ) -> Result<Vec<CommandOutput>, Error> {
        let mut outputs: Vec<(Vec<u8>, Vec<u8>)> = vec![Default::default(); tasks.len()];
        let job = Job {
            tasks,
            retries: 0,
            per_node: usize::MAX,
            timeout: command.timeout,
            stdin: None,
        };
        let (events_tx, mut events) = mpsc::channel(64);
        let running = run_job(&self.pool, job, events_tx);
        let collecting = async {
            while let Some(event) = events.recv().await {
                if let RunEvent::Output {
                    task, stream, data, ..
                } = event
                {
                    let (stdout, stderr) = &mut outputs[task];
                    match stream {
                        OutputStream::Stdout => stdout.extend_from_slice(&data),
                        OutputStream::Stderr => stderr.extend_from_slice(&data),
                    }
                }
            }
        };
        let (reports, ()) = tokio::join!(running, collecting);
        reports
            .into_iter()
            .zip(outputs)
            .map(
                |(TaskReport { node, outcome }, (stdout, stderr))| match outcome {
                    Ok(outcome) => Ok(CommandOutput {
                        node,
                        outcome,
                        stdout,
                        stderr,
                    }),
                    Err(why) => Err(Error::Run(why)),
                },
            )
            .collect()
    }

    /// Starts `command` on the least loaded node and returns its output as it comes.
    /// Dropping the stream cancels the command on its node.
    pub async fn stream(&self, command: Command) -> Result<CommandStream, Error> {
        let counted = self.admit()?;
        let spec = JobSpec {
            tasks: vec![SlotTask::default()],
            nodes: job_nodes(&self.pool),
            per_node: usize::MAX,
            retries: 0,
            stdin_task: None,
        };
        let task = TaskSpec::command(
            0,
            0,
            command.argv.clone(),
            command.env.clone(),
            command.timeout.map(|t| t.as_millis() as u64),
            false,
        );
        let (chunks_tx, chunks) = mpsc::channel(64);
        let (started_tx, started) = oneshot::channel::<String>();
        // No retries: the job's one attempt takes these.
        let mut first = Some((task, chunks_tx, started_tx));
        let coordinator = self.shared.coordinator.clone();
        let launch =
            move |start: &jobs::Start, node: NodeHandle| -> Attempt<Result<TaskOutcome, Error>> {
                let (coordinator, node_id, first) =
                    (coordinator.clone(), start.node.clone(), first.take());
                Box::pin(async move {
                    // No retries: the job has one attempt, and it takes these.
                    let Some((task, chunks_tx, started_tx)) = first else {
                        let again = "a stream's command started twice".to_string();
                        return Err(Error::Run(RunError::Internal(again)));
                    };
                    let remote = coordinator
                        .start_task(&node, task)
                        .await
                        .map_err(RunError::from)?;
                    let _ = started_tx.send(node_id.clone());
                    let (_input, mut output) = (remote.input, remote.output);
                    loop {
                        match output.next().await {
                            Ok(Some(TaskEvent::Output { stream, data, .. })) => {
                                // A caller that stopped reading still gets the end.
                                let _ = chunks_tx.send(OutputChunk { stream, data }).await;
                            }
                            Ok(Some(TaskEvent::Finished(outcome))) => return Ok(outcome),
                            Ok(Some(_)) => {}
                            Ok(None) => {
                                return Err(Error::Run(RunError::Protocol {
                                    node: node_id,
                                    message: "the task stream ended without an outcome".into(),
                                }))
                            }
                            Err(e) => return Err(Error::Run(e.into())),
                        }
                    }
                })
            };
        let mut driver = JobDriver::submit(&self.shared.coordinator, spec, launch, run_failure);
        let (end_tx, mut end) = oneshot::channel();
        let reader = tokio::spawn(async move {
            let mut ended = Err(Error::Run(RunError::Internal(
                "the command's job ended without it".into(),
            )));
            while let Some(news) = driver.next().await {
                if let JobNews::Ended { end, .. } = news {
                    ended = end.unwrap_or_else(|not_run| Err(Error::Run(not_run.into())));
                }
            }
            let _ = end_tx.send(ended);
        });
        let reader = AbortOnDrop(reader);
        match started.await {
            Ok(node) => Ok(CommandStream {
                node,
                chunks,
                end,
                reader,
                _counted: counted,
            }),
            // It never started: its end says why.
            Err(_) => Err(match (&mut end).await {
                Ok(Err(e)) => e,
                _ => Error::Run(RunError::Internal("the command never started".into())),
            }),
        }
    }

    /// Runs one typed task on the least loaded node and returns its output. The node's
    /// agent must have `T` registered, at `T::VERSION`.
    pub async fn submit<T: Task>(&self, task: T) -> Result<T::Output, Error> {
        let _counted = self.admit()?;
        let payload = skyward_common::typed::encode_input(&task)?;
        drop(task);
        let mut outputs = self
            .typed_job::<T>(vec![payload], usize::MAX)
            .await
            .map_err(|(_, e)| e)?;
        Ok(skyward_common::typed::decode_output::<T>(
            &outputs.remove(0),
        )?)
    }

    /// Runs every task, spread over the nodes (several at once on each, see
    /// [`tasks_per_node`](ComputePoolBuilder::tasks_per_node)); the outputs in input order.
    /// The first failure is returned, naming the task's index, and the others are cancelled.
    pub async fn map<T, I>(&self, tasks: I) -> Result<Vec<T::Output>, Error>
    where
        T: Task,
        I: IntoIterator<Item = T>,
    {
        let _counted = self.admit()?;
        let payloads = tasks
            .into_iter()
            .map(|task| skyward_common::typed::encode_input(&task))
            .collect::<Result<Vec<Bytes>, _>>()?;
        let at_once = self.tasks_per_node.unwrap_or_else(|| {
            let nodes = self.pool.nodes();
            let cores = nodes.iter().map(|n| n.inventory.cpu_count).max();
            cores.unwrap_or(1) as usize
        });
        let outputs = self
            .typed_job::<T>(payloads, at_once.max(1))
            .await
            .map_err(|(index, e)| match e {
                Error::Task {
                    task,
                    node,
                    message,
                } => Error::Task {
                    task,
                    node,
                    message: format!("input {index} of the map: {message}"),
                },
                other => other,
            })?;
        outputs
            .iter()
            .map(|output| Ok(skyward_common::typed::decode_output::<T>(output)?))
            .collect()
    }

    /// Runs one typed task of `T` per payload as one job of the pool state, which places
    /// them with every other job's tasks (at most `per_node` at once on a node); the outputs
    /// in input order, or the first failure and its input's index (the rest are cancelled).
    async fn typed_job<T: Task>(
        &self,
        payloads: Vec<Bytes>,
        per_node: usize,
    ) -> Result<Vec<Bytes>, (usize, Error)> {
        let total = payloads.len();
        if total == 0 {
            return Ok(Vec::new());
        }
        let spec = JobSpec {
            tasks: vec![SlotTask::default(); total],
            nodes: job_nodes(&self.pool),
            per_node,
            retries: 0,
            stdin_task: None,
        };
        let payloads = Arc::new(payloads);
        let coordinator = self.shared.coordinator.clone();
        let launch =
            move |start: &jobs::Start, node: NodeHandle| -> Attempt<Result<Bytes, Error>> {
                let (coordinator, payload) = (coordinator.clone(), payloads[start.task].clone());
                Box::pin(async move {
                    run_typed(&coordinator, &node, T::NAME, T::VERSION, payload).await
                })
            };
        let mut driver = JobDriver::submit(&self.shared.coordinator, spec, launch, run_failure);
        let mut outputs: Vec<Option<Bytes>> = vec![None; total];
        while let Some(news) = driver.next().await {
            // Returning drops the driver, which cancels the job's other tasks.
            if let JobNews::Ended { task, end } = news {
                match end {
                    Ok(Ok(output)) => outputs[task] = Some(output),
                    Ok(Err(e)) => return Err((task, e)),
                    Err(not_run) => return Err((task, Error::Run(not_run.into()))),
                }
            }
        }
        outputs
            .into_iter()
            .enumerate()
            .map(|(index, output)| {
                output.ok_or_else(|| {
                    let never = RunError::Internal(format!("input {index} never ran"));
                    (index, Error::Run(never))
                })
            })
            .collect()
    }

    /// Tears the pool down: stops every task, removes every node, forgets the pool in the
    /// state store. An error means machines may be left: `skyward down NAME` tries again.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.shared.teardown().await
    }

    /// Where the pool is in its life: [`Phase::Ready`] counts the calls running now (each
    /// `run`, `broadcast`, `submit` and `map` until it returns, each stream until dropped).
    pub fn phase(&self) -> Phase {
        self.shared.coordinator.lifecycle().phase().clone()
    }

    /// Counts a call as a job of the pool while it runs.
    fn admit(&self) -> Result<Admitted, Error> {
        self.shared.coordinator.admit_job().map_err(|refused| {
            Error::Run(RunError::Unplaceable(format!(
                "pool {}: {refused}",
                self.shared.name
            )))
        })
    }
}

impl Drop for ComputePool {
    /// A pool dropped without [`ComputePool::shutdown`] is torn down by a task on the
    /// current runtime; without one (or should the runtime stop first), the local provider's
    /// agents are killed as it is dropped, and cloud machines end at their lease or TTL.
    fn drop(&mut self) {
        if self.shared.torn_down.load(Ordering::SeqCst) {
            return;
        }
        let shared = self.shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::info!(pool = %shared.name, "pool dropped without shutdown: tearing it down");
                runtime.spawn(async move {
                    if let Err(e) = shared.teardown().await {
                        tracing::error!("{e}");
                    }
                });
            }
            Err(_) => tracing::warn!(
                pool = %shared.name,
                "pool dropped outside a Tokio runtime: its local agents stop with it; cloud machines end at their lease or TTL, or with `skyward down`"
            ),
        }
    }
}

/// A running command's output as it comes, then how it ended. Dropping it cancels the
/// command on its node.
pub struct CommandStream {
    node: String,
    chunks: mpsc::Receiver<OutputChunk>,
    end: oneshot::Receiver<Result<TaskOutcome, Error>>,
    reader: AbortOnDrop,
    /// Counts the command as a job of the pool until the stream is dropped.
    _counted: Admitted,
}

impl CommandStream {
    /// The node the command runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The next piece of output; `None` once the command has ended (then [`finish`]).
    ///
    /// [`finish`]: CommandStream::finish
    pub async fn next(&mut self) -> Option<OutputChunk> {
        self.chunks.recv().await
    }

    /// Waits for the command's end (output not read yet is dropped) and says how it ended.
    pub async fn finish(mut self) -> Result<TaskOutcome, Error> {
        while self.chunks.recv().await.is_some() {}
        let end = (&mut self.end).await;
        let _ = &self.reader;
        end.unwrap_or_else(|_| {
            Err(Error::Run(RunError::Internal(
                "the command's reader stopped".into(),
            )))
        })
    }
}

/// Aborts a spawned task when dropped: its streams close, which cancels its node's task.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one typed task on `node` and gathers its encoded output. Dropping the future drops
/// the task's stream, which the agent takes as cancellation.
/// Why a library call's attempt failed without an outcome of its own (its node lost, the
/// protocol broken), for the pool state to judge; `None` for the call's own result or error.
fn run_failure<T>(report: &Result<T, Error>) -> Option<String> {
    match report {
        Err(Error::Run(e)) => Some(e.to_string()),
        _ => None,
    }
}

async fn run_typed(
    coordinator: &Coordinator,
    node: &NodeHandle,
    name: &str,
    version: u32,
    payload: Bytes,
) -> Result<Bytes, Error> {
    let remote = coordinator
        .start_task(node, TaskSpec::typed(name, version, payload))
        .await
        .map_err(RunError::from)?;
    let (_input, mut output) = (remote.input, remote.output);
    let failed = |message: String| Error::Task {
        task: name.to_string(),
        node: node.node_id.clone(),
        message,
    };
    let mut result = Vec::new();
    loop {
        match output.next().await {
            Ok(Some(TaskEvent::Result(piece))) => {
                if result.len() + piece.len() > MAX_TYPED_OUTPUT {
                    return Err(failed(format!(
                        "output over the limit of {MAX_TYPED_OUTPUT} bytes: return less per task"
                    )));
                }
                result.extend_from_slice(&piece);
            }
            Ok(Some(TaskEvent::Finished(outcome))) => {
                return match outcome {
                    TaskOutcome::Exited { code: 0 } => Ok(Bytes::from(result)),
                    TaskOutcome::Failed { error } | TaskOutcome::FailedToStart { error } => {
                        Err(failed(error))
                    }
                    other => Err(failed(other.to_string())),
                };
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(Error::Run(RunError::Protocol {
                    node: node.node_id.clone(),
                    message: format!("the stream of task `{name}` ended without an outcome"),
                }))
            }
            Err(e) => return Err(Error::Run(e.into())),
        }
    }
}

/// The binary called `name` beside the running program: how a program finds the custom
/// agent built with it (`cargo build` puts a package's binaries in one directory).
pub fn binary_beside_this_program(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Invalid(format!("cannot locate this program: {e}")))?;
    let path = exe.with_file_name(name);
    match path.is_file() {
        true => Ok(path),
        false => Err(Error::Invalid(format!(
            "{} is missing: build it beside this program (cargo build --bins)",
            path.display()
        ))),
    }
}
