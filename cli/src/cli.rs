//! The `skyward` command line.

use skyward_coordinator::keeper::{keep_size, Kept};
use skyward_core::membership::Budget;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::exit::{or_exit, FAILURE, USAGE};
use crate::output::{OutputMode, Renderer};
use crate::persistent;
use skyward_coordinator::job::{exit_code, JobRequest, On};
use skyward_coordinator::plan::{make_providers, portable_agent, PoolPlan};
use skyward_coordinator::pool;
use skyward_coordinator::preflight::Preflight;
use skyward_coordinator::run::TaskReport;
use skyward_coordinator::session::{forget, record, PoolSession};
use skyward_coordinator::store::{skyward_home, PoolRecord, PoolState, Store};
use skyward_core::selection::Selection;
use skyward_core::slots::{self, GpuRequest};
use skyward_core::spec::{parse_memory_gb, AcceleratorRequest, Allocation, PoolSpec};
use skyward_providers::{self as provider, LocalProvider, ProviderOptions};

#[derive(Parser, Debug)]
#[command(
    name = "skyward",
    version,
    about = "Ephemeral compute pools: provision, run, tear down."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Bring up a pool, run a command on it, stream its output, tear the pool down.
    Run(Box<RunArgs>),
    /// List what the providers offer for a spec, cheapest first.
    Offers(OffersArgs),
    /// Which providers are configured here, and whether their credentials work.
    Providers(ProvidersArgs),
    /// Check that nodes can reach this machine and get an agent, and say how they connect.
    Doctor(DoctorArgs),
    /// Pools that outlive a command (`pool up`, `pool status`, `pool down`), and the list of
    /// every pool this machine's coordinators made that still exists.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Run a command on a pool started with `skyward pool up`, streaming its output.
    Exec(Box<persistent::ExecArgs>),
    /// The output of a task run on a pool started with `skyward pool up`.
    Logs(persistent::LogsArgs),
    /// An interactive terminal on a node of a pool started with `skyward pool up`, over the
    /// agent's own connection (no SSH key, no open port).
    Shell(persistent::ShellArgs),
    /// Remove pools a skyward left behind (killed, crashed, or its teardown failed): their
    /// machines and everything made for them.
    Down(DownArgs),
    /// The settings `run` (or `pool up NAME`) would take from skyward.toml, the user's config
    /// file and SKYWARD_* variables, and where each comes from.
    Config(ConfigArgs),
    /// A shell completion script on stdout (e.g. `skyward completions bash > ~/.local/share/bash-completion/completions/skyward`).
    Completions(CompletionsArgs),
    /// Man pages for skyward and each of its commands, written into a directory.
    Man(ManArgs),
}

#[derive(Args, Debug)]
struct ConfigArgs {
    /// As `skyward pool up NAME` would see them, with the [pools.NAME] sections.
    #[arg(long, value_name = "NAME")]
    pool: Option<String>,
    /// One JSON array on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
struct ManArgs {
    /// Where to write skyward.1, skyward-run.1, ... (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum PoolCommand {
    /// List the pools recorded here: running ones and ones left behind.
    List(PoolListArgs),
    /// Start a pool that stays up after this command returns, served by a background
    /// coordinator; `skyward exec NAME -- CMD` runs on it, `skyward pool down NAME` ends it.
    Up(Box<persistent::UpArgs>),
    /// A pool's nodes, their accelerators, its tasks and what it has cost so far.
    Status(persistent::StatusArgs),
    /// Tear pools down (the same as `skyward down`).
    Down(DownArgs),
    /// The background coordinator of `pool up` (started by it, not by hand).
    #[command(hide = true)]
    Serve(Box<persistent::UpArgs>),
}

#[derive(Args, Debug)]
struct PoolListArgs {
    /// One JSON array on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct DownArgs {
    /// The pools to remove (`skyward pool list` names them).
    #[arg(
        value_name = "POOL",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pools: Vec<String>,
    /// Every pool recorded here, and every pool whose instances carry the project's tag at
    /// a provider with credentials here, recorded or not.
    #[arg(long)]
    all: bool,
    /// With --all: a provider's own parameter for that search (e.g. aws.region=eu-west-1).
    #[arg(
        long = "provider-opt",
        value_name = "PROVIDER.KEY=VALUE",
        requires = "all"
    )]
    provider_opt: Vec<String>,
}

/// What the nodes are and where they come from (shared by `run` and `offers`).
#[derive(Args, Debug)]
struct SpecArgs {
    /// Providers to choose from, comma-separated, in order of preference.
    #[arg(long, default_value = "local")]
    provider: String,
    /// How to choose among the providers' offers: first, cheapest or available.
    #[arg(long, default_value = "first", value_parser = str::parse::<Selection>)]
    selection: Selection,
    /// Accelerators per node: H100, H100:8, "RTX 4090", A100-80GB:2...
    #[arg(long, value_parser = str::parse::<AcceleratorRequest>)]
    accelerator: Option<AcceleratorRequest>,
    /// Least vCPUs per node.
    #[arg(long)]
    cpu: Option<u32>,
    /// Least memory per node (8GB, 512MB).
    #[arg(long, value_parser = parse_memory_gb)]
    memory: Option<f64>,
    /// spot, on-demand, or spot-if-available (spot, then on-demand when there is no spot capacity).
    #[arg(long, default_value = "on-demand", value_parser = str::parse::<Allocation>)]
    allocation: Allocation,
    /// Only offers in this region.
    #[arg(long)]
    region: Option<String>,
    /// Highest price per node-hour, USD.
    #[arg(long, value_name = "USD")]
    max_price: Option<f64>,
    /// Boot disk per node, GB.
    #[arg(long, value_name = "GB")]
    disk: Option<u32>,
    /// Image overriding the provider's default (AMI id, image slug, docker image).
    #[arg(long)]
    image: Option<String>,
    /// A provider setting, PROVIDER.KEY=VALUE (repeatable): aws.ami, aws.subnet_id,
    /// aws.allocation_strategy, aws.region, digitalocean.region, verda.region,
    /// vastai.min_reliability, vastai.geolocation, vastai.bid_multiplier, vastai.auto_shutdown...
    #[arg(long = "provider-opt", value_name = "PROVIDER.KEY=VALUE")]
    provider_opt: Vec<String>,
}

impl SpecArgs {
    fn provider_options(&self) -> Result<ProviderOptions, String> {
        ProviderOptions::parse(self.provider_opt.iter().map(String::as_str))
    }

    fn spec(&self, nodes: usize, connect_timeout: Duration) -> Result<PoolSpec, String> {
        if self.cpu == Some(0) {
            return Err("--cpu must be at least 1".into());
        }
        if self.max_price.is_some_and(|p| p.is_nan() || p <= 0.0) {
            return Err("--max-price must be a positive price per node-hour, e.g. 2.5".into());
        }
        let mut spec = PoolSpec::new(nodes);
        spec.accelerator = self.accelerator;
        spec.vcpus = self.cpu;
        spec.memory_gb = self.memory;
        spec.allocation = self.allocation;
        spec.region = self.region.clone();
        spec.max_price_per_hour = self.max_price;
        spec.disk_gb = self.disk;
        spec.image = self.image.clone();
        spec.connect_timeout = connect_timeout;
        Ok(spec)
    }
}

#[derive(Args, Debug)]
struct OffersArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// One JSON array on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DoctorArgs {
    /// The --listen address `skyward run` would use.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// The --advertise address `skyward run` would use.
    #[arg(long)]
    advertise: Option<SocketAddr>,
}

#[derive(Args, Debug)]
struct ProvidersArgs {
    /// One JSON array on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  skyward run -- python3 -c 'print(6*7)'\n  skyward run --nodes 3 --on all -- hostname\n  skyward run --nodes 4 --map 'sh -c \"echo {}\"' 1 2 3 4 5 6 7 8"
)]
struct RunArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    pool: PoolArgs,
}

/// What runs, and how (shared by `run` and `exec`).
#[derive(Args, Debug)]
pub struct JobArgs {
    /// Where the command runs: one (the least loaded node) or all (every node, each told its
    /// rank).
    #[arg(long, default_value = "one", value_parser = str::parse::<On>)]
    on: On,
    /// With --on all: what the preflight checks before the tasks start: master (every node
    /// reaches rank 0) or mesh (every pair of nodes).
    #[arg(long, default_value = "master", value_parser = str::parse::<Preflight>)]
    preflight: Preflight,
    /// Run TEMPLATE once per input, `{}` replaced by the input (appended if absent).
    #[arg(long, value_name = "TEMPLATE")]
    map: Option<String>,
    /// With --map: tasks at once on each node.
    #[arg(long, default_value_t = 1)]
    per_node: usize,
    /// Whole GPUs per task, all on one node; each task waits until they are free and sees
    /// only them (CUDA_VISIBLE_DEVICES). With --map, tasks fill every GPU of every node.
    #[arg(long, value_name = "N", conflicts_with = "slice")]
    gpus: Option<u32>,
    /// One GPU slot per task: a MIG device or a whole GPU (`--slice=1g.10gb`: only MIG
    /// devices of that profile). With --map, tasks fill every slot of every node.
    #[arg(long, value_name = "PROFILE", num_args = 0..=1, require_equals = true)]
    slice: Option<Option<String>>,
    /// Kill each task after this long (e.g. 30s, 5m); it then exits with 124.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Run a task again on another node this many times if its node is lost (not tasks
    /// pinned to a node by --on all, nor one fed stdin).
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Set an environment variable for the task (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Add the variables of a dotenv-style file (KEY=VALUE lines; repeatable; --env wins).
    #[arg(long, value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Sync this directory to every node before the tasks start (honouring .gitignore;
    /// unchanged files are not sent again) and run the tasks inside it.
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// After the tasks, bring this file or directory (relative to the task's directory) back
    /// from each node that ran a task, into DOWNLOAD_TO/NODE_ID/PATH (repeatable).
    #[arg(long, value_name = "PATH")]
    download: Vec<String>,
    /// Where --download puts each node's files.
    #[arg(long, value_name = "DIR", default_value = "skyward-downloads")]
    download_to: PathBuf,
    /// Most bytes --download brings back from one node (e.g. 500M, 10GiB).
    #[arg(long, value_name = "SIZE", default_value = "10GiB", value_parser = skyward_coordinator::workdir::parse_size)]
    download_limit: u64,
    /// One JSON object per event on stdout (node ready, output, task exit, pool down).
    #[arg(long)]
    pub(crate) json: bool,
    /// Do not forward this terminal's stdin to the task.
    #[arg(short = 'n', long)]
    no_stdin: bool,
    /// Inputs for --map.
    #[arg(value_name = "INPUT")]
    inputs: Vec<String>,
    /// The command to run, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// What the pool is (shared by `run` and `pool up`).
#[derive(Args, Debug)]
pub struct PoolArgs {
    /// Number of nodes in the pool.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// A node silent this long (no health report) is lost: its tasks fail, or run again
    /// elsewhere with --retries.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    node_timeout: Duration,
    /// New nodes that may take the place of each lost one (silent, interrupted, gone) per
    /// hour; the pool as a whole may start the larger of this and twice its size, 4 at
    /// least. Past it the pool stays smaller (`pool status` says why). A `run` replaces
    /// nodes only for a job that can use them (a --map, or --retries).
    #[arg(long, value_name = "N", default_value_t = 3)]
    max_replacements: u32,
    #[command(flatten)]
    spec: SpecArgs,
    /// How long nodes get to come up and connect (default: 60s for local nodes, 5m for cloud
    /// machines, 3m more with --mig).
    #[arg(long, value_parser = humantime::parse_duration)]
    connect_timeout: Option<Duration>,
    /// Address the coordinator listens on (UDP for agents, TCP for the agent download);
    /// default 127.0.0.1:0, or 0.0.0.0:0 with --reverse on a cloud.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address nodes dial, when it differs from --listen (a public IP, a port forward).
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Linux skyward-agent served to cloud nodes whose image lacks one (default: the one
    /// beside this skyward, when it is a Linux build).
    #[arg(long, value_name = "PATH")]
    agent_binary: Option<PathBuf>,
    /// URL cloud nodes fetch the agent from instead (`{arch}` becomes `uname -m`).
    #[arg(long, value_name = "URL")]
    agent_url: Option<String>,
    /// The SHA-256 (64 hex digits) of the agent at --agent-url: nodes run it only if it
    /// matches. Needed for a plain-HTTP URL.
    #[arg(long, value_name = "HEX", value_parser = sha256_hex, requires = "agent_url")]
    agent_sha256: Option<String>,
    /// Reverse the connection direction: agents listen and the coordinator dials them (for a
    /// coordinator behind NAT that nodes cannot reach).
    #[arg(long)]
    reverse: bool,
    /// With --reverse on a cloud: this machine's public address, the only one the nodes'
    /// agent port (UDP 7444) is opened to.
    #[arg(long, value_name = "IP", requires = "reverse")]
    public_ip: Option<std::net::IpAddr>,
    /// Partition every GPU with MIG when the nodes boot: one profile to fill each GPU with
    /// (1g.10gb) or exactly these profiles on each (3g.40gb,2g.20gb,1g.10gb).
    #[arg(long, value_name = "LAYOUT", value_parser = mig_layout)]
    mig: Option<String>,
    /// The pool's longest life (e.g. 2h): past it the run ends and tears down, and every node
    /// stops its tasks and powers itself off (cloud) even if this skyward is gone.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
}

pub async fn main(cli: Cli) -> i32 {
    // Commands that only print (tables, scripts, logs) end quietly when their reader does
    // (`skyward pool list | head`), as other command-line tools do. The others keep SIGPIPE
    // ignored: they write to sockets, where a gone peer must be an error, not their death.
    let only_prints = matches!(
        cli.command,
        Command::Offers(_)
            | Command::Providers(_)
            | Command::Doctor(_)
            | Command::Config(_)
            | Command::Completions(_)
            | Command::Man(_)
            | Command::Logs(_)
            | Command::Pool(PoolCommand::List(_) | PoolCommand::Status(_))
    );
    if only_prints {
        // SAFETY: restoring a signal's default disposition before any thread writes.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Offers(args) => offers(args).await,
        Command::Providers(args) => providers(args).await,
        Command::Doctor(args) => doctor(args).await,
        Command::Pool(PoolCommand::List(args)) => pool_list(args),
        Command::Pool(PoolCommand::Up(args)) => persistent::up(*args).await,
        Command::Pool(PoolCommand::Serve(args)) => persistent::serve(*args).await,
        Command::Pool(PoolCommand::Status(args)) => persistent::status(args).await,
        Command::Pool(PoolCommand::Down(args)) => down(args).await,
        Command::Exec(args) => persistent::exec(*args).await,
        Command::Logs(args) => persistent::logs(args).await,
        Command::Shell(args) => persistent::shell(args).await,
        Command::Down(args) => down(args).await,
        Command::Config(args) => config(args),
        Command::Completions(args) => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(args.shell, &mut command, "skyward", &mut std::io::stdout());
            0
        }
        Command::Man(args) => man(args),
    }
}

/// Parses the command line with the settings of config files and `SKYWARD_*` variables
/// added (see [`crate::config`]); on a refusal, says why and returns the exit code.
pub fn parse(argv: Vec<std::ffi::OsString>) -> Result<Cli, i32> {
    use clap::Parser;
    let files = crate::config::Files::load();
    let expanded = match crate::config::expand(argv, &files) {
        Ok(expanded) => expanded,
        Err(crate::config::ExpandError::CommandLine(error)) => {
            let _ = error.print();
            return Err(error.exit_code());
        }
        Err(crate::config::ExpandError::Config(message)) => {
            eprintln!("skyward: {message}");
            return Err(USAGE);
        }
    };
    Cli::try_parse_from(&expanded.argv).map_err(|error| {
        match expanded.blame(&error) {
            Some(source) => {
                let text = error.kind().as_str().unwrap_or("invalid setting");
                let detail = error.to_string();
                let first = detail.lines().next().unwrap_or(text);
                eprintln!(
                    "skyward: {} (set in {source})",
                    first.trim_start_matches("error: ")
                );
            }
            None => {
                let _ = error.print();
            }
        }
        error.exit_code()
    })
}

fn config(args: ConfigArgs) -> i32 {
    let files = crate::config::Files::load();
    if let Some(error) = &files.error {
        eprintln!("skyward: {error}");
        return USAGE;
    }
    if let Some(pool) = &args.pool {
        if let Err(message) = persistent::check_pool_name(pool) {
            eprintln!("skyward: {message}");
            return USAGE;
        }
    }
    let resolved = crate::config::resolve(&files, args.pool.as_deref());
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&resolved).unwrap_or_else(|_| "[]".into())
        );
        return 0;
    }
    let (project, user) = files.paths();
    let shown = |path: Option<&std::path::Path>| match path {
        Some(path) if path.is_file() => path.display().to_string(),
        Some(path) => format!("{} (none)", path.display()),
        None => format!("none ({} here or above)", crate::config::PROJECT_FILE),
    };
    println!("project file: {}", shown(project));
    println!("user file:    {}", shown(user.as_deref()));
    if let Some(pool) = &args.pool {
        if !files.has_pool(pool) {
            println!("no [pools.{pool}] section: the defaults apply");
        }
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(["key", "value", "from", "variable"]);
    for setting in &resolved {
        table.add_row([
            setting.key.to_string(),
            setting.value.clone().unwrap_or_else(|| "-".into()),
            setting.source.clone(),
            setting.env_var.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{table}");
    0
}

fn man(args: ManArgs) -> i32 {
    let command = <Cli as clap::CommandFactory>::command();
    let write = || -> std::io::Result<usize> {
        std::fs::create_dir_all(&args.out)?;
        let mut pages = 0;
        let mut render = |command: clap::Command, name: String| -> std::io::Result<()> {
            let mut page = Vec::new();
            clap_mangen::Man::new(
                command
                    .display_name(name.clone())
                    .bin_name(name.replace('-', " ")),
            )
            .render(&mut page)?;
            std::fs::write(args.out.join(format!("{name}.1")), page)?;
            pages += 1;
            Ok(())
        };
        render(command.clone(), "skyward".into())?;
        for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
            let name = format!("skyward-{}", sub.get_name());
            render(sub.clone(), name.clone())?;
            for nested in sub.get_subcommands().filter(|c| !c.is_hide_set()) {
                render(nested.clone(), format!("{name}-{}", nested.get_name()))?;
            }
        }
        Ok(pages)
    };
    match write() {
        Ok(pages) => {
            println!("{pages} man pages in {}", args.out.display());
            0
        }
        Err(e) => {
            eprintln!("skyward: writing man pages to {}: {e}", args.out.display());
            FAILURE
        }
    }
}

pub(crate) fn pool_plan(args: &PoolArgs) -> Result<PoolPlan, String> {
    if args.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    skyward_core::spec::check_ttl(args.ttl, "--ttl")?;
    Ok(PoolPlan {
        provider_options: args.spec.provider_options()?,
        provider_opts: args.spec.provider_opt.clone(),
        listen: args.listen,
        advertise: args.advertise,
        agent_binary: args.agent_binary.clone(),
        agent_url: args.agent_url.clone(),
        agent_sha256: args.agent_sha256.clone(),
        spec: {
            let connect_timeout = args.connect_timeout.unwrap_or_else(|| {
                default_connect_timeout(&args.spec.provider, args.mig.is_some())
            });
            let mut spec = args.spec.spec(args.nodes, connect_timeout)?;
            spec.reverse = args.reverse;
            spec.public_ip = args.public_ip;
            spec.mig = args.mig.clone();
            spec.ttl = args.ttl;
            spec
        },
        selection: args.spec.selection.clone(),
        providers: args.spec.provider.clone(),
        node_timeout: args.node_timeout,
        max_replacements: args.max_replacements,
    })
}

/// The job the command line asks for. `pool`: the pool's own arguments when the pool is made
/// for this job (`run`), so that a GPU request no node of it could meet is refused now.
pub(crate) fn job_request(args: &JobArgs, pool: Option<&PoolArgs>) -> Result<JobRequest, String> {
    if args.per_node == 0 {
        return Err("--per-node must be at least 1".into());
    }
    let gpus = gpu_request(args, pool)?;
    let mut env = Vec::new();
    for file in &args.env_file {
        env.extend(crate::envfile::read(file)?);
    }
    // Later entries win in the task's environment: --env over --env-file.
    for kv in &args.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => {
                return Err(format!(
                    "--env {kv:?} is not KEY=VALUE: write e.g. --env FOO=bar"
                ))
            }
        }
    }
    // Absolute, so that a background coordinator (`exec`) reads and writes the same places.
    let absolute = |path: &std::path::Path| {
        std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let workdir = match &args.workdir {
        Some(dir) if !dir.is_dir() => {
            return Err(format!(
                "--workdir {} is not a directory: give the directory to sync",
                dir.display()
            ))
        }
        Some(dir) => Some(absolute(dir)?),
        None => None,
    };
    let downloads = args
        .download
        .iter()
        .map(|path| skyward_coordinator::workdir::check_download_path(path))
        .collect::<Result<Vec<_>, _>>()?;
    let argvs = if let Some(template) = &args.map {
        if !args.command.is_empty() {
            return Err(
                "give either --map TEMPLATE INPUTS... or a command after `--`, not both".into(),
            );
        }
        if args.inputs.is_empty() {
            return Err("--map needs inputs after the template, e.g. --map 'echo {}' a b c".into());
        }
        if args.on == On::All {
            return Err("--map spreads tasks over the nodes itself; drop --on all".into());
        }
        map_argvs(template, &args.inputs)?
    } else if !args.inputs.is_empty() {
        return Err(format!(
            "unexpected arguments {:?}: put the command after `--` (skyward run -- CMD ARGS...)",
            args.inputs
        ));
    } else if args.command.is_empty() {
        return Err(
            "nothing to run: put the command after `--`, e.g. skyward run -- hostname".into(),
        );
    } else {
        vec![args.command.clone()]
    };
    let single = args.map.is_none() && args.on == On::One;
    Ok(JobRequest {
        on: args.on,
        preflight: args.preflight,
        argvs,
        env,
        per_node: args.per_node,
        gpus,
        timeout: args.timeout,
        retries: args.retries,
        stdin: single && !args.no_stdin && !std::io::stdin().is_terminal(),
        workdir,
        downloads,
        download_to: absolute(&args.download_to)?,
        download_limit: args.download_limit,
    })
}

/// How a job's events are shown on a pool of `nodes`.
pub(crate) fn output_mode(json: bool, request: &JobRequest, nodes: usize) -> OutputMode {
    match (json, request.spans_nodes(nodes)) {
        (true, _) => OutputMode::Json,
        (false, true) => OutputMode::Prefixed,
        (false, false) => OutputMode::Raw,
    }
}

/// The GPU request of `--gpus` / `--slice`, refused now if the spec's nodes cannot meet it.
/// A local pool without `--accelerator` has whatever GPUs this machine has: it is checked
/// against the nodes' inventories once they are up.
fn gpu_request(args: &JobArgs, pool: Option<&PoolArgs>) -> Result<GpuRequest, String> {
    let request = match (&args.gpus, &args.slice) {
        (Some(0), _) => return Err("--gpus must be at least 1 (or drop it)".into()),
        (Some(n), _) => GpuRequest::Gpus(*n),
        (None, Some(Some(profile))) if profile.trim().is_empty() => {
            return Err(
                "--slice= needs a MIG profile, e.g. --slice=1g.10gb (or plain --slice)".into(),
            )
        }
        (None, Some(profile)) => GpuRequest::Slice {
            profile: profile.clone(),
        },
        (None, None) => GpuRequest::None,
    };
    if let Some(pool) = pool {
        let only_local = pool.spec.provider.split(',').all(|p| p.trim() == "local");
        if pool.spec.accelerator.is_some() || !only_local {
            slots::fits(&request, pool.spec.accelerator.as_ref())?;
        }
    }
    Ok(request)
}

fn map_argvs(template: &str, inputs: &[String]) -> Result<Vec<Vec<String>>, String> {
    let words = shlex::split(template)
        .filter(|w| !w.is_empty())
        .ok_or_else(|| format!("--map template {template:?} has unbalanced quotes"))?;
    let has_slot = words.iter().any(|w| w.contains("{}"));
    Ok(inputs
        .iter()
        .map(|input| {
            let mut argv: Vec<String> = words.iter().map(|w| w.replace("{}", input)).collect();
            if !has_slot {
                argv.push(input.clone());
            }
            argv
        })
        .collect())
}

/// SIGINT and SIGTERM, as a command that tears down on either takes them.
pub(crate) fn interrupt_signals() -> Result<(Signal, Signal), String> {
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => Ok((i, t)),
        _ => Err("cannot install signal handlers".into()),
    }
}

async fn run(args: RunArgs) -> i32 {
    let planned = pool_plan(&args.pool)
        .and_then(|plan| Ok((plan, job_request(&args.job, Some(&args.pool))?)))
        .and_then(|planned| Ok((planned, skyward_home()?)));
    let ((plan, request), home) = or_exit!(planned, USAGE);
    let (mut sigint, mut sigterm) = or_exit!(interrupt_signals(), FAILURE);
    let pool_name = format!("sky-{:08x}", rand::random::<u32>());
    let session = match PoolSession::start(&plan, &home, &pool_name) {
        Ok(session) => session,
        Err(error) => {
            eprintln!("skyward: {error}");
            return crate::exit::start_error(&error);
        }
    };
    let mut renderer = Renderer::terminal(output_mode(args.job.json, &request, plan.spec.nodes));
    if let Some(warning) = session.unreachable_warning(&plan) {
        renderer.note(&warning);
    }
    let labels = request.labels();
    let stdin = request
        .stdin
        .then(|| Box::new(tokio::io::stdin()) as skyward_coordinator::run::TaskInput);
    let work = async {
        let pool = crate::pool_session::bring_up(&session, &plan, &mut renderer, true).await?;
        let (events, mut shown) = tokio::sync::mpsc::channel(64);
        let running = session.run(&pool, &request, stdin, 0, events);
        let showing = async {
            while let Some(event) = shown.recv().await {
                renderer.event(&event);
            }
        };
        // The pool keeps its size while a job that can use a new node runs (a map's queued
        // tasks, or tasks that move with --retries), with the same keeper as `pool up`.
        let keeping = async {
            if request.retries > 0 || request.argvs.len() > 1 {
                // Said once, when the budget first leaves a place empty.
                let mut told_shortfall = false;
                let mut on_news = |news: Kept<'_>| match news {
                    Kept::Progress(event) => session.record_progress(&event),
                    Kept::Replacement(line) => eprintln!("skyward: {line}"),
                    Kept::Shortfall(Some(why)) if !told_shortfall => {
                        told_shortfall = true;
                        eprintln!("skyward: {why}");
                    }
                    Kept::Shortfall(_) => {}
                };
                let budget = Budget::per_place(plan.max_replacements, plan.spec.nodes);
                keep_size(
                    &pool,
                    &session.providers,
                    &plan.selection,
                    budget,
                    &mut on_news,
                )
                .await;
            }
            std::future::pending().await
        };
        let (reports, ()) = tokio::select! {
            ended = async { tokio::join!(running, showing) } => ended,
            never = keeping => never,
        };
        pool.down().await;
        reports
    };
    let ttl = async {
        match plan.spec.ttl {
            Some(ttl) => tokio::time::sleep(ttl).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        result = work => Ended::Finished(result),
        _ = ttl => Ended::Signal("the pool's TTL passed", 124),
        _ = sigint.recv() => Ended::Signal("SIGINT", 130),
        _ = sigterm.recv() => Ended::Signal("SIGTERM", 143),
    };
    if let Ended::Signal(name, _) = &ended {
        renderer.note(&format!(
            "{name}: stopping tasks and tearing down pool {pool_name}"
        ));
    }
    crate::pool_session::finish(&session, &mut sigint).await;
    renderer.pool_down(&pool_name);

    match ended {
        Ended::Signal(_, code) => code,
        Ended::Finished(Err(message)) => {
            eprintln!("skyward: {message}");
            FAILURE
        }
        Ended::Finished(Ok(reports)) => {
            renderer.summary(&reports, &labels);
            exit_code(&reports)
        }
    }
}

async fn offers(args: OffersArgs) -> i32 {
    let spec = or_exit!(args.spec.spec(1, Duration::from_secs(60)), USAGE);
    let providers = match args.spec.provider_options().and_then(|options| {
        make_providers(&args.spec.provider, &options, std::env::temp_dir(), false)
    }) {
        Ok(providers) => providers,
        Err(message) => {
            eprintln!("skyward: {message}");
            return USAGE;
        }
    };
    let candidates = pool::candidates(&providers, &spec).await;
    let mut rows: Vec<&skyward_core::offer::Offer> = candidates
        .iter()
        .filter_map(|c| c.offers.as_ref().ok())
        .flatten()
        .collect();
    let sort_market = spec.allocation.markets()[0];
    rows.sort_by(|a, b| {
        let price = |o: &skyward_core::offer::Offer| o.price(sort_market).unwrap_or(f64::INFINITY);
        price(a).total_cmp(&price(b))
    });
    let errors: Vec<&String> = candidates
        .iter()
        .filter_map(|c| c.offers.as_ref().err())
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into())
        );
    } else {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        table.set_header([
            "provider",
            "region",
            "instance",
            "accelerator",
            "vCPU",
            "RAM GB",
            "$/h on-demand",
            "$/h spot",
            "capacity",
        ]);
        let price = |p: Option<f64>| p.map(|p| format!("{p:.4}")).unwrap_or_else(|| "-".into());
        for offer in &rows {
            table.add_row([
                offer.provider.clone(),
                offer.region.clone(),
                offer.instance_type.clone(),
                offer.accelerator_label(),
                offer.vcpus.to_string(),
                format!("{:.1}", offer.memory_gb),
                price(offer.on_demand_per_hour),
                price(offer.spot_per_hour),
                match (offer.available, offer.spot_available) {
                    (true, None | Some(true)) => "yes",
                    (true, Some(false)) => "on-demand only",
                    (false, Some(true)) => "spot only",
                    (false, _) => "no",
                }
                .to_string(),
            ]);
        }
        println!("{table}");
    }
    for error in &errors {
        eprintln!("skyward: {error}");
    }
    match (rows.is_empty(), errors.is_empty()) {
        (false, _) => 0,
        (true, true) => {
            eprintln!("skyward: no offers for {}", spec.describe());
            1
        }
        (true, false) => FAILURE,
    }
}

async fn providers(args: ProvidersArgs) -> i32 {
    let providers = or_exit!(
        make_providers(
            &provider::KNOWN.join(","),
            &ProviderOptions::default(),
            std::env::temp_dir(),
            false,
        ),
        FAILURE
    );
    let mut statuses = Vec::new();
    for provider in &providers {
        statuses.push(provider.status().await);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&statuses).unwrap_or_else(|_| "[]".into())
        );
    } else {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        table.set_header(["provider", "configured", "working", "detail"]);
        let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
        for status in &statuses {
            table.add_row([
                status.provider.clone(),
                yes(status.configured),
                yes(status.working),
                status.detail.clone(),
            ]);
        }
        println!("{table}");
    }
    0
}

/// How reachable an address is from nodes elsewhere.
fn reach_of(ip: std::net::IpAddr) -> (&'static str, &'static str) {
    let private = match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_link_local()
                || (v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]))
        }
        std::net::IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if ip.is_loopback() {
        (
            "warn",
            "loopback: only nodes on this machine (the local provider) can reach it",
        )
    } else if ip.is_unspecified() {
        (
            "warn",
            "unspecified: pass --advertise with the address nodes should dial",
        )
    } else if private {
        ("warn", "private: cloud nodes reach it only over a VPN or peering; behind NAT, forward the port and --advertise the public address")
    } else {
        (
            "ok",
            "public: open this UDP and TCP port to the nodes in your firewall",
        )
    }
}

async fn doctor(args: DoctorArgs) -> i32 {
    let mut findings: Vec<(&str, String, String)> = Vec::new();
    findings.push((
        "info",
        "direction".into(),
        "by default agents dial the coordinator (QUIC over UDP; the agent download over TCP, same port number) and nodes need no open port; with `skyward run --reverse --public-ip YOUR_IP` the coordinator dials the agents instead (for a coordinator behind NAT): they listen on UDP 7444, which the provider opens to YOUR_IP alone (AWS security group, DigitalOcean firewall; VastAI maps the port; Verda has no firewall, so mTLS alone guards it), and nodes need the agent preinstalled or --agent-url".into(),
    ));
    let udp = std::net::UdpSocket::bind(args.listen);
    let tcp = std::net::TcpListener::bind(args.listen);
    match (&udp, &tcp) {
        (Ok(_), Ok(_)) => findings.push((
            "ok",
            "listen".into(),
            format!("{} is free for UDP and TCP", args.listen),
        )),
        (Err(e), _) | (_, Err(e)) => findings.push((
            "fail",
            "listen".into(),
            format!(
                "cannot bind {}: {e}; choose another --listen port",
                args.listen
            ),
        )),
    }
    drop((udp, tcp));
    let advertised = args.advertise.unwrap_or(args.listen);
    let (level, why) = reach_of(advertised.ip());
    findings.push((level, "advertise".into(), format!("{advertised}: {why}")));
    match portable_agent() {
        Some(path) => findings.push(("ok", "agent".into(), format!("portable agent {}", path.display()))),
        None => match LocalProvider::find_agent_binary() {
            Ok(path) => findings.push((
                "warn",
                "agent".into(),
                format!("{} needs this machine's glibc; run scripts/build-agent.sh for one that runs on every image", path.display()),
            )),
            Err(e) => findings.push(("fail", "agent".into(), e)),
        },
    }
    if let Ok(providers) = make_providers(
        &provider::KNOWN.join(","),
        &ProviderOptions::default(),
        std::env::temp_dir(),
        false,
    ) {
        for provider in providers {
            let status = provider.status().await;
            let level = match (status.configured, status.working) {
                (true, true) => "ok",
                (false, _) => "info",
                (true, false) => "fail",
            };
            findings.push((
                level,
                format!("provider {}", status.provider),
                status.detail,
            ));
        }
    }
    for (level, what, detail) in &findings {
        println!("{level:>4}  {what}: {detail}");
    }
    if findings.iter().any(|(level, ..)| *level == "fail") {
        1
    } else {
        0
    }
}

enum Ended {
    Finished(Result<Vec<TaskReport>, String>),
    Signal(&'static str, i32),
}

/// The state store under the user's data dir.
pub(crate) fn open_store() -> Result<Store, String> {
    Store::open(&skyward_home()?)
}

/// What a recorded pool is now, in a word or two.
fn pool_condition(pool: &PoolRecord) -> &'static str {
    match (pool.owner.alive(), pool.state) {
        (true, PoolState::Up) => "running",
        (true, PoolState::TearingDown) => "tearing down",
        (_, PoolState::TeardownFailed) => "teardown failed",
        (false, PoolState::Up) => "left behind",
        (false, PoolState::TearingDown) => "left behind (teardown cut short)",
    }
}

fn pool_list(args: PoolListArgs) -> i32 {
    let pools = or_exit!(open_store().and_then(|store| store.pools()), FAILURE);
    if args.json {
        let list: Vec<serde_json::Value> = pools
            .iter()
            .map(|pool| {
                let mut value = serde_json::to_value(pool).unwrap_or_default();
                value["condition"] = pool_condition(pool).into();
                value["owner_alive"] = pool.owner.alive().into();
                value
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return 0;
    }
    if pools.is_empty() {
        println!("no pools");
        return 0;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(["pool", "condition", "age", "where", "instances", "tasks"]);
    for pool in &pools {
        let places: Vec<String> = pool
            .placements
            .iter()
            .map(|p| format!("{} {} {}", p.provider, p.region, p.instance_type))
            .collect();
        let age = Duration::from_secs(now.saturating_sub(pool.created));
        table.add_row([
            pool.name.clone(),
            match pool.owner.alive() {
                true => format!("{} (pid {})", pool_condition(pool), pool.owner.pid),
                false => pool_condition(pool).to_string(),
            },
            humantime::format_duration(age).to_string(),
            if places.is_empty() {
                pool.providers.clone()
            } else {
                places.join(", ")
            },
            pool.instances.len().to_string(),
            task_summary(&pool.tasks),
        ]);
    }
    println!("{table}");
    0
}

/// `2 running, 5 finished, 1 lost`: a pool's task attempts by state.
fn task_summary(tasks: &[skyward_coordinator::store::TaskRecord]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for task in tasks {
        match counts.iter_mut().find(|(state, _)| *state == task.state) {
            Some((_, n)) => *n += 1,
            None => counts.push((&task.state, 1)),
        }
    }
    match counts.is_empty() {
        true => "-".into(),
        false => counts
            .iter()
            .map(|(state, n)| format!("{n} {state}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// How long `down` waits for a running skyward to tear its own pool down.
const OWNER_TEARDOWN_WAIT: Duration = Duration::from_secs(600);

pub(crate) async fn down(args: DownArgs) -> i32 {
    let store = match open_store() {
        Ok(store) => std::sync::Mutex::new(store),
        Err(message) => {
            eprintln!("skyward: {message}");
            return FAILURE;
        }
    };
    let recorded = or_exit!(
        store
            .lock()
            .map_err(|e| e.to_string())
            .and_then(|s| s.pools()),
        FAILURE
    );
    let scan_options = or_exit!(
        ProviderOptions::parse(args.provider_opt.iter().map(String::as_str)),
        USAGE
    );
    let targets: Vec<PoolRecord> = if args.all {
        recorded
    } else {
        // Every name must be known before anything is done.
        if let Some(unknown) = args
            .pools
            .iter()
            .find(|name| !recorded.iter().any(|p| &p.name == *name))
        {
            eprintln!(
                "skyward: no pool {unknown} is recorded here: `skyward pool list` shows the pools"
            );
            return USAGE;
        }
        recorded
            .into_iter()
            .filter(|p| args.pools.contains(&p.name))
            .collect()
    };
    let mut status = 0;
    let mut handled = Vec::new();
    for pool in targets {
        handled.push(pool.name.clone());
        match down_pool(&store, &pool).await {
            Ok(()) => println!("pool {}: removed", pool.name),
            Err(message) => {
                eprintln!("skyward: pool {}: {message}", pool.name);
                status = FAILURE;
            }
        }
    }
    if args.all && remove_tagged(&scan_options, &mut handled).await.is_err() {
        status = FAILURE;
    }
    if handled.is_empty() {
        println!("no pools");
    }
    status
}

/// Removes every pool not in `handled` whose instances carry the project's tag at a
/// provider configured here (credentials present): pools this machine never recorded.
async fn remove_tagged(options: &ProviderOptions, handled: &mut Vec<String>) -> Result<(), ()> {
    let names: Vec<&str> = provider::KNOWN
        .iter()
        .copied()
        .filter(|name| *name != "local")
        .collect();
    let providers = match make_providers(&names.join(","), options, std::env::temp_dir(), false) {
        Ok(providers) => providers,
        Err(message) => {
            eprintln!("skyward: {message}");
            return Err(());
        }
    };
    let mut result = Ok(());
    for provider in providers {
        if !provider.status().await.configured {
            continue;
        }
        let pools = match provider.pools().await {
            Ok(pools) => pools,
            Err(e) => {
                eprintln!("skyward: {}: cannot list its pools: {e}", provider.name());
                result = Err(());
                continue;
            }
        };
        let found: Vec<String> = pools.into_iter().filter(|p| !handled.contains(p)).collect();
        for pool in found {
            match provider.teardown(&pool).await {
                Ok(()) => println!(
                    "pool {pool} (found at {} by its tag): removed",
                    provider.name()
                ),
                Err(e) => {
                    eprintln!("skyward: pool {pool} at {}: {e}", provider.name());
                    result = Err(());
                }
            }
            handled.push(pool);
        }
    }
    result
}

/// Removes one recorded pool: its running skyward is asked to (SIGTERM), and whatever it
/// leaves is torn down here, provider by provider, region by region, found by the pool's tag.
async fn down_pool(store: &std::sync::Mutex<Store>, pool: &PoolRecord) -> Result<(), String> {
    if pool.owner.alive() {
        println!(
            "pool {}: asking its skyward (pid {}) to tear it down",
            pool.name, pool.owner.pid
        );
        // SAFETY: signalling a pid whose identity (start time) was just checked.
        unsafe {
            libc::kill(pool.owner.pid as i32, libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + OWNER_TEARDOWN_WAIT;
        while pool.owner.alive() {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "its skyward (pid {}) is still tearing it down after {}",
                    pool.owner.pid,
                    humantime::format_duration(OWNER_TEARDOWN_WAIT)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let still = store
            .lock()
            .map_err(|e| e.to_string())
            .and_then(|s| s.has_pool(&pool.name))?;
        if !still {
            return Ok(());
        }
    }
    record(store, |s| s.set_state(&pool.name, PoolState::TearingDown));
    let mut failures = Vec::new();
    for (names, options) in teardown_scopes(pool) {
        let providers = ProviderOptions::parse(options.iter().map(String::as_str))
            .and_then(|options| make_providers(&names, &options, pool.dir.join("nodes"), false));
        match providers {
            Ok(providers) => {
                for provider in providers {
                    if let Err(e) = provider.teardown(&pool.name).await {
                        failures.push(e.to_string());
                    }
                }
            }
            Err(message) => failures.push(message),
        }
    }
    if failures.is_empty() {
        let _ = std::fs::remove_dir_all(&pool.dir);
        forget(store, &pool.name);
        Ok(())
    } else {
        record(store, |s| {
            s.set_state(&pool.name, PoolState::TeardownFailed)
        });
        Err(failures.join("; "))
    }
}

/// The provider sets a pool's teardown needs: every provider it named, with its options;
/// and for AWS, whose teardown searches one region per client, each region an attempt
/// went to.
fn teardown_scopes(pool: &PoolRecord) -> Vec<(String, Vec<String>)> {
    let mut scopes = vec![(pool.providers.clone(), pool.options.clone())];
    let mut regions: Vec<&str> = pool
        .placements
        .iter()
        .filter(|p| p.provider == "aws")
        .map(|p| p.region.as_str())
        .collect();
    regions.sort_unstable();
    regions.dedup();
    for region in regions {
        let mut options: Vec<String> = pool
            .options
            .iter()
            .filter(|o| !o.starts_with("aws.region="))
            .cloned()
            .collect();
        options.push(format!("aws.region={region}"));
        scopes.push(("aws".into(), options));
    }
    scopes
}

/// How long nodes get to come up when `--connect-timeout` is not given: local agents start
/// in a moment; cloud machines boot an image first (GPU images take minutes); a MIG layout
/// adds the agents' budget for applying it before they connect.
fn default_connect_timeout(providers: &str, mig: bool) -> Duration {
    let cloud = providers.split(',').any(|p| p.trim() != "local");
    let boot = Duration::from_secs(if cloud { 300 } else { 60 });
    if mig {
        boot + skyward_common::mig::MIG_BUDGET
    } else {
        boot
    }
}

/// A `--mig` layout as the agents will read it, refused here before anything is provisioned.
fn mig_layout(text: &str) -> Result<String, String> {
    skyward_common::mig::Layout::parse(text).map(|_| text.trim().to_string())
}

/// A SHA-256 digest as 64 hex digits (lower-cased, as `sha256sum` prints it).
fn sha256_hex(text: &str) -> Result<String, String> {
    let digest = text.trim().to_ascii_lowercase();
    match digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        true => Ok(digest),
        false => Err("a SHA-256 is 64 hex digits, as `sha256sum FILE` prints it".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `skyward run ARGV...` asks for, and how its output would be shown.
    fn args(argv: &[&str]) -> Result<(JobRequest, OutputMode), String> {
        let mut full = vec!["skyward", "run"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(a) => {
                let plan = pool_plan(&a.pool)?;
                let request = job_request(&a.job, Some(&a.pool))?;
                let mode = output_mode(a.job.json, &request, plan.spec.nodes);
                Ok((request, mode))
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn map_fills_the_template() {
        let (plan, mode) = args(&["--nodes", "4", "--map", "sh -c \"echo {}\"", "1", "2"]).unwrap();
        assert_eq!(
            plan.argvs,
            vec![vec!["sh", "-c", "echo 1"], vec!["sh", "-c", "echo 2"]]
        );
        assert_eq!(mode, OutputMode::Prefixed);
        let (appended, _) = args(&["--map", "echo", "a"]).unwrap();
        assert_eq!(appended.argvs, vec![vec!["echo", "a"]]);
    }

    #[test]
    fn gpu_flags_become_the_request_of_every_task() {
        // A bare --slice takes no value, so the inputs after it stay inputs.
        let (plan, _) = args(&["--map", "echo", "--slice", "a", "b"]).unwrap();
        assert_eq!(plan.gpus, GpuRequest::Slice { profile: None });
        assert_eq!(plan.argvs, vec![vec!["echo", "a"], vec!["echo", "b"]]);
        let (plan, _) = args(&["--slice=1g.10gb", "--", "true"]).unwrap();
        assert_eq!(
            plan.gpus,
            GpuRequest::Slice {
                profile: Some("1g.10gb".into())
            }
        );
        let (plan, _) = args(&["--accelerator", "H100:8", "--gpus", "8", "--", "true"]).unwrap();
        assert_eq!(plan.gpus, GpuRequest::Gpus(8));
        // A local pool gets this machine's GPUs: checked once its nodes are up.
        assert_eq!(
            args(&["--gpus", "4", "--", "true"]).unwrap().0.gpus,
            GpuRequest::Gpus(4)
        );
        assert_eq!(args(&["--", "true"]).unwrap().0.gpus, GpuRequest::None);
    }

    #[test]
    fn bad_command_lines_say_how_to_fix_them() {
        for (argv, hint) in [
            (
                &["--nodes", "0", "--", "true"][..],
                "--nodes must be at least 1",
            ),
            (&[][..], "put the command after `--`"),
            (&["hostname"][..], "put the command after `--`"),
            (&["--map", "echo {}"][..], "--map needs inputs"),
            (&["--map", "echo", "a", "--", "true"][..], "not both"),
            (&["--env", "NOEQUALS", "--", "true"][..], "KEY=VALUE"),
            (
                &["--accelerator", "H1000", "--", "true"][..],
                "unknown accelerator",
            ),
            (
                &["--allocation", "cheap", "--", "true"][..],
                "spot-if-available",
            ),
            (
                &["--selection", "best", "--", "true"][..],
                "first, cheapest or available",
            ),
            (&["--memory", "lots", "--", "true"][..], "8GB"),
            (&["--max-price", "0", "--", "true"][..], "positive price"),
            (&["--on", "all", "--map", "echo", "a"][..], "drop --on all"),
            (
                &["--gpus", "0", "--", "true"][..],
                "--gpus must be at least 1",
            ),
            (
                &["--accelerator", "H100:2", "--gpus", "3", "--", "true"][..],
                "--accelerator H100:3",
            ),
            (
                &["--provider", "aws", "--gpus", "2", "--", "true"][..],
                "add --accelerator NAME:2",
            ),
            (
                &["--accelerator", "L4", "--slice=1g.10gb", "--", "true"][..],
                "needs MIG",
            ),
            (
                &["--gpus", "1", "--slice", "--", "true"][..],
                "cannot be used",
            ),
        ] {
            let err = args(argv)
                .err()
                .unwrap_or_else(|| panic!("{argv:?} accepted"));
            assert!(err.contains(hint), "{argv:?}: {err}");
        }
    }

    #[test]
    fn doctor_classifies_addresses() {
        let level = |ip: &str| reach_of(ip.parse().unwrap()).0;
        assert_eq!(level("127.0.0.1"), "warn");
        assert_eq!(level("0.0.0.0"), "warn");
        assert_eq!(level("192.168.1.5"), "warn");
        assert_eq!(level("100.64.0.1"), "warn");
        assert_eq!(level("fd00::1"), "warn");
        assert_eq!(level("203.0.113.7"), "ok");
        assert_eq!(level("2001:db8::1"), "ok");
    }

    #[test]
    fn clouds_and_mig_layouts_get_longer_to_connect() {
        let secs = |providers, mig| default_connect_timeout(providers, mig).as_secs();
        assert_eq!(secs("local", false), 60);
        assert_eq!(secs("aws", false), 300);
        assert_eq!(secs("local, verda", false), 300);
        assert_eq!(secs("aws", true), 480);
        assert_eq!(secs("local", true), 240);
    }

    #[test]
    fn exit_codes_follow_the_first_failure() {
        let report = |code| TaskReport {
            node: "node-1".into(),
            outcome: Ok(skyward_common::protocol::TaskOutcome::Exited { code }),
        };
        assert_eq!(exit_code(&[report(7)]), 7);
        assert_eq!(exit_code(&[report(0), report(3), report(4)]), 3);
        assert_eq!(exit_code(&[report(0), report(0)]), 0);
    }
}
