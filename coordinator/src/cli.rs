//! The `skyward` command line.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::output::{OutputMode, Renderer};
use crate::pool::{self, Pool, PoolProgress, PoolSpec};
use crate::provider::{LocalProvider, Provider};
use crate::run::{run_job, Job, TaskPlan, TaskReport};
use crate::server::{Coordinator, CoordinatorConfig};

/// Exit code for a command line that was wrong (nothing was started).
const USAGE: i32 = 2;
/// Exit code when Skyward itself failed (as ssh uses 255).
const FAILURE: i32 = 255;

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
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum On {
    /// One node: the least loaded.
    One,
    /// Every node (broadcast), each told its rank.
    All,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  skyward run -- python3 -c 'print(6*7)'\n  skyward run --nodes 3 --on all -- hostname\n  skyward run --nodes 4 --map 'sh -c \"echo {}\"' 1 2 3 4 5 6 7 8"
)]
struct RunArgs {
    /// Number of nodes in the pool.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Where the command runs.
    #[arg(long, value_enum, default_value = "one")]
    on: On,
    /// Run TEMPLATE once per input, `{}` replaced by the input (appended if absent).
    #[arg(long, value_name = "TEMPLATE")]
    map: Option<String>,
    /// With --map: tasks at once on each node.
    #[arg(long, default_value_t = 1)]
    per_node: usize,
    /// Kill each task after this long (e.g. 30s, 5m); it then exits with 124.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Set an environment variable for the task (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Where nodes come from.
    #[arg(long, default_value = "local")]
    provider: String,
    /// How long nodes get to come up and connect.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// One JSON object per event on stdout (node ready, output, task exit, pool down).
    #[arg(long)]
    json: bool,
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

pub async fn main(cli: Cli) -> i32 {
    match cli.command {
        Command::Run(args) => run(args).await,
    }
}

/// What `skyward run` will do, checked before anything is created.
struct Plan {
    spec: PoolSpec,
    on: On,
    /// argv per task for a map, or the one argv otherwise.
    argvs: Vec<Vec<String>>,
    env: Vec<(String, String)>,
    per_node: usize,
    timeout: Option<Duration>,
    mode: OutputMode,
    forward_stdin: bool,
}

fn plan(args: RunArgs) -> Result<Plan, String> {
    if args.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    if args.per_node == 0 {
        return Err("--per-node must be at least 1".into());
    }
    if args.provider != "local" {
        return Err(format!(
            "unknown provider {:?}: this build has `local` only; drop --provider to run on local agents",
            args.provider
        ));
    }
    let env = args
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!(
                "--env {kv:?} is not KEY=VALUE: write e.g. --env FOO=bar"
            )),
        })
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
    let many = args.nodes > 1 && (args.on == On::All || args.map.is_some());
    let mode = match (args.json, many) {
        (true, _) => OutputMode::Json,
        (false, true) => OutputMode::Prefixed,
        (false, false) => OutputMode::Raw,
    };
    let single = args.map.is_none() && args.on == On::One;
    Ok(Plan {
        spec: PoolSpec {
            nodes: args.nodes,
            connect_timeout: args.connect_timeout,
        },
        on: args.on,
        argvs,
        env,
        per_node: args.per_node,
        timeout: args.timeout,
        mode,
        forward_stdin: single && !args.no_stdin && !std::io::stdin().is_terminal(),
    })
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

/// `SKYWARD_HOME`, else `$XDG_DATA_HOME/skyward`, else `~/.local/share/skyward`.
fn skyward_home() -> Result<PathBuf, String> {
    if let Some(home) = std::env::var_os("SKYWARD_HOME") {
        return Ok(PathBuf::from(home));
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(data).join("skyward"));
    }
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".local/share/skyward"))
        .ok_or_else(|| "cannot find a data directory: set SKYWARD_HOME".into())
}

async fn run(args: RunArgs) -> i32 {
    let plan = match plan(args) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("skyward: {message}");
            return USAGE;
        }
    };
    let (agent_bin, home) =
        match LocalProvider::find_agent_binary().and_then(|bin| Ok((bin, skyward_home()?))) {
            Ok(found) => found,
            Err(message) => {
                eprintln!("skyward: {message}");
                return USAGE;
            }
        };
    let (mut sigint, mut sigterm) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            eprintln!("skyward: cannot install signal handlers");
            return FAILURE;
        }
    };
    let pool_name = format!("sky-{:08x}", rand::random::<u32>());
    let pool_dir = home.join("pools").join(&pool_name);
    let bind: SocketAddr = ([127, 0, 0, 1], 0).into();
    let coordinator = match Coordinator::start(CoordinatorConfig {
        pool: pool_name.clone(),
        bind,
        state_dir: Some(pool_dir.join("identity")),
    }) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("skyward: starting the coordinator: {e}");
            return FAILURE;
        }
    };
    let provider: Arc<dyn Provider> =
        Arc::new(LocalProvider::new(agent_bin, pool_dir.join("nodes")));
    let mut renderer = Renderer::terminal(plan.mode);
    let labels: Vec<String> = plan
        .argvs
        .iter()
        .map(|argv| {
            shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_else(|_| argv.join(" "))
        })
        .collect();

    let work = execute(&plan, coordinator.clone(), provider.clone(), &mut renderer);
    let ended = tokio::select! {
        result = work => Ended::Finished(result),
        _ = sigint.recv() => Ended::Signal("SIGINT", 130),
        _ = sigterm.recv() => Ended::Signal("SIGTERM", 143),
    };
    if let Ended::Signal(name, _) = &ended {
        renderer.note(&format!(
            "{name}: stopping tasks and tearing down pool {pool_name}"
        ));
    }
    // A second Ctrl-C does not abandon the teardown: it says what is still going on.
    let teardown = pool::teardown(&coordinator, provider.as_ref());
    tokio::pin!(teardown);
    loop {
        tokio::select! {
            _ = &mut teardown => break,
            _ = sigint.recv() => eprintln!("skyward: still removing the nodes of pool {pool_name}; they will be gone in a few seconds"),
        }
    }
    let _ = std::fs::remove_dir_all(&pool_dir);
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

enum Ended {
    Finished(Result<Vec<TaskReport>, String>),
    Signal(&'static str, i32),
}

/// The task's own code for one task; for many, 0 only if all succeeded, else the first
/// failing task's code (in input order).
fn exit_code(reports: &[TaskReport]) -> i32 {
    match reports {
        [one] => one.exit_code(),
        many => many
            .iter()
            .find(|r| !r.success())
            .map(|r| match r.exit_code() {
                0 => 1,
                code => code,
            })
            .unwrap_or(0),
    }
}

async fn execute(
    plan: &Plan,
    coordinator: Arc<Coordinator>,
    provider: Arc<dyn Provider>,
    renderer: &mut Renderer<std::io::Stdout, std::io::Stderr>,
) -> Result<Vec<TaskReport>, String> {
    let progress = (plan.mode != OutputMode::Json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(plan.spec.nodes as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {pos}/{len} nodes ready ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let mut pool = {
        let mut on_progress = |event: PoolProgress<'_>| match event {
            PoolProgress::Provisioning { nodes, provider } => {
                if let Some(bar) = &progress {
                    bar.set_message(format!("starting {nodes} nodes on {provider}:"));
                }
            }
            PoolProgress::NodeReady { node, .. } => {
                if let Some(bar) = &progress {
                    bar.inc(1);
                }
                renderer.node_ready(node);
            }
        };
        let up = Pool::up(coordinator, provider, &plan.spec, &mut on_progress).await;
        if let Some(bar) = &progress {
            bar.finish_and_clear();
        }
        up.map_err(|e| e.to_string())?
    };
    let tasks = match plan.on {
        On::All => Job::broadcast(&pool, plan.argvs[0].clone(), plan.env.clone()),
        On::One => plan
            .argvs
            .iter()
            .map(|argv| TaskPlan {
                argv: argv.clone(),
                env: plan.env.clone(),
                node: None,
            })
            .collect(),
    };
    let job = Job {
        tasks,
        per_node: if plan.argvs.len() == 1 {
            usize::MAX
        } else {
            plan.per_node
        },
        timeout: plan.timeout,
        stdin: plan
            .forward_stdin
            .then(|| Box::new(tokio::io::stdin()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    };
    let (events_tx, mut events_rx) = mpsc::channel(64);
    let running = run_job(&mut pool, job, events_tx);
    let rendering = async {
        while let Some(event) = events_rx.recv().await {
            renderer.event(&event);
        }
    };
    let (reports, ()) = tokio::join!(running, rendering);
    pool.down().await;
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> Result<Plan, String> {
        let mut full = vec!["skyward", "run"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(a) => plan(a),
        }
    }

    #[test]
    fn map_fills_the_template() {
        let plan = args(&["--nodes", "4", "--map", "sh -c \"echo {}\"", "1", "2"]).unwrap();
        assert_eq!(
            plan.argvs,
            vec![vec!["sh", "-c", "echo 1"], vec!["sh", "-c", "echo 2"]]
        );
        assert_eq!(plan.mode, OutputMode::Prefixed);
        let appended = args(&["--map", "echo", "a"]).unwrap();
        assert_eq!(appended.argvs, vec![vec!["echo", "a"]]);
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
            (&["--provider", "aws", "--", "true"][..], "drop --provider"),
            (&["--on", "all", "--map", "echo", "a"][..], "drop --on all"),
        ] {
            let err = args(argv)
                .err()
                .unwrap_or_else(|| panic!("{argv:?} accepted"));
            assert!(err.contains(hint), "{argv:?}: {err}");
        }
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
