//! Pools that outlive a command: `skyward pool up NAME` starts a background coordinator (one
//! process per pool, in a session of its own) and returns once the pool is up; `exec`,
//! `pool status` and `logs` reach it over a Unix socket in the pool's directory, which only
//! its owner can open; `pool down` (or `down`) asks it to tear down with SIGTERM, as for any
//! pool. This module is the client side and the socket's messages; [`crate::daemon`] serves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use serde::{Deserialize, Serialize};
use skyward_common::frame::{read_frame, write_frame};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use crate::cli::{
    interrupt_signals, job_request, open_store, output_mode, pool_plan, JobArgs, PoolArgs,
};
use crate::exit::{or_exit, FAILURE, USAGE};
use crate::output::Renderer;
use skyward_coordinator::job::{exit_code, JobRequest};
use skyward_coordinator::run::{RunEvent, TaskReport};
use skyward_coordinator::session::PoolSession;
use skyward_coordinator::store::skyward_home;

/// The largest control message: an output chunk or a status with its task list.
pub const MAX_CONTROL_FRAME: usize = 4 * 1024 * 1024;
/// How long `pool up` waits for its background coordinator to open its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The pool's name: lowercase letters, digits and dashes, starting with a letter.
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub pool: PoolArgs,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  skyward exec train -- nvidia-smi\n  skyward exec train --on all -- torchrun train.py\n  skyward exec train --detach -- python3 long.py   # then: skyward logs train TASK -f"
)]
pub struct ExecArgs {
    /// The pool (`skyward pool up NAME` started it).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Start the tasks and return at once, printing their numbers (`skyward logs NAME N`
    /// shows their output); otherwise output streams here and Ctrl-C cancels the tasks.
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub job: JobArgs,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  skyward shell train             # a login shell on the least busy node\n  skyward shell train node-2 -- htop"
)]
pub struct ShellArgs {
    /// The pool (`skyward pool up NAME` started it).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The node (`skyward pool status NAME` lists them); default: the least busy.
    #[arg(value_name = "NODE")]
    pub node: Option<String>,
    /// A program to run on the terminal instead of the login shell, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(value_name = "NAME")]
    pub name: String,
    /// One JSON object on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The task's number (`skyward pool status NAME` lists them).
    #[arg(value_name = "TASK")]
    pub task: u64,
    /// Keep printing output as it comes until the task ends.
    #[arg(short, long)]
    pub follow: bool,
}

/// What a client asks the background coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Report progress until the pool is up or has failed.
    Watch,
    /// Run a job; with `detach` it runs on after this connection closes, otherwise closing
    /// the connection cancels it.
    Exec {
        job: JobRequest,
        detach: bool,
    },
    /// The attached job's stdin.
    Stdin(Bytes),
    StdinEof,
    Status,
    /// A task's output so far, and with `follow` what it prints until it ends.
    Logs {
        task: u64,
        follow: bool,
    },
    /// A terminal on a node (any node: `None`); then `Stdin` and `Resize` until it ends.
    Shell {
        node: Option<String>,
        argv: Vec<String>,
        term: String,
        rows: u16,
        cols: u16,
    },
    /// The shell's window has a new size.
    Resize {
        rows: u16,
        cols: u16,
    },
}

/// What the background coordinator answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlReply {
    /// A line for the user (stderr).
    Note(String),
    Ready,
    /// The pool could not come up (it is being torn down), or a job could not start.
    Failed(String),
    /// A job's tasks got these pool-wide numbers; the pool has `nodes` nodes.
    Accepted {
        tasks: Vec<u64>,
        nodes: usize,
    },
    Event(RunEvent),
    Done(Vec<TaskReport>),
    Status(Box<PoolStatus>),
    Log(Bytes),
    /// The log is complete as far as it goes; `ended` says how the task ended, if it has.
    LogEnd {
        ended: Option<String>,
    },
    /// The request cannot be served, and why.
    Refused(String),
}

/// A pool as `skyward pool status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    /// The background coordinator's process.
    pub pid: u32,
    pub provider: String,
    pub region: String,
    pub instance_type: String,
    /// `spot` or `on-demand`.
    pub market: String,
    /// Per node-hour, USD, when the provider says.
    pub price_per_hour: Option<f64>,
    pub up_seconds: u64,
    /// Every node's price times the time since the pool came up.
    pub cost_so_far: Option<f64>,
    /// Until the pool's TTL ends it.
    pub ttl_left_seconds: Option<u64>,
    /// Where the pool is in its life: `up, idle`, `up, 2 jobs running`, `being torn down`.
    #[serde(default)]
    pub phase: String,
    pub nodes: Vec<NodeStatus>,
    /// The most recent tasks, newest last.
    pub tasks: Vec<TaskStatus>,
    /// Nodes replaced to keep the pool's size (or that could not be), oldest first.
    pub replacements: Vec<String>,
    /// Why the pool runs with fewer nodes than asked, once its replacement budget is spent.
    #[serde(default)]
    pub shortfall: Option<String>,
    /// Each of the pool's places, in rank order, while it keeps its size: the node that holds
    /// it (or held it last) and `held`, `a new node is starting`, `a new node starts in N s`
    /// or `left empty: WHY`.
    #[serde(default)]
    pub places: Vec<PlaceStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaceStatus {
    pub node: String,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub address: String,
    /// `connected`, `reconnecting`, `lost: WHY` or `interrupted: NOTICE`.
    pub state: String,
    pub running_tasks: u32,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// One line per GPU, MIG device and Neuron device.
    pub accelerators: Vec<String>,
    pub load_avg_1m: Option<f32>,
    pub memory_available_bytes: Option<u64>,
    /// Task output the node holds that the coordinator has not acknowledged (from its last
    /// health report).
    pub output_held_bytes: Option<u64>,
    /// Its tasks paused because that room is full.
    pub tasks_waiting_for_room: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// The pool-wide number `skyward logs` takes.
    pub task: u64,
    pub command: String,
    pub node: Option<String>,
    /// `queued`, `running`, `exit code N`, `cancelled`...
    pub state: String,
    pub exit_code: Option<i32>,
    /// Seconds since it started (or was queued).
    pub age_seconds: u64,
}

/// Where a pool's background coordinator listens.
pub fn socket_path(home: &Path, name: &str) -> PathBuf {
    home.join("pools").join(name).join("control.sock")
}

/// A name a provider can tag machines with and a socket path can hold.
pub fn check_pool_name(name: &str) -> Result<(), String> {
    let ok = (1..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "pool name {name:?}: use up to 40 lowercase letters, digits and dashes, starting with a letter (e.g. train-1)"
        )),
    }
}

/// Why a pool's background coordinator cannot be reached, in one line with what to do.
enum Unreachable {
    /// Nothing of that name is recorded (exit 2).
    NoSuchPool(String),
    /// It was, and its coordinator is gone or not answering (exit 255).
    Gone(String),
}

impl Unreachable {
    fn report(self) -> i32 {
        match self {
            Unreachable::NoSuchPool(message) => {
                eprintln!("skyward: {message}");
                USAGE
            }
            Unreachable::Gone(message) => {
                eprintln!("skyward: {message}");
                FAILURE
            }
        }
    }
}

/// Connects to pool `name`'s background coordinator.
async fn connect(name: &str) -> Result<UnixStream, Unreachable> {
    let home = skyward_home().map_err(Unreachable::NoSuchPool)?;
    let record = open_store()
        .and_then(|store| store.pool(name))
        .map_err(Unreachable::Gone)?;
    let Some(record) = record else {
        return Err(Unreachable::NoSuchPool(format!(
            "no pool {name} is up: `skyward pool up {name}` starts one, `skyward pool list` shows what there is"
        )));
    };
    if !record.owner.alive() {
        return Err(Unreachable::Gone(format!(
            "the background coordinator of pool {name} (pid {}) is gone; its nodes stop by themselves once they miss it for their lease (10 minutes), and `skyward down {name}` removes them now",
            record.owner.pid
        )));
    }
    UnixStream::connect(socket_path(&home, name))
        .await
        .map_err(|e| Unreachable::Gone(format!(
            "pool {name} is not served here (pid {} owns it, {e}): it is not a `skyward pool up` pool, or it is still starting or already stopping",
            record.owner.pid
        )))
}

async fn request(stream: &mut UnixStream, request: &ControlRequest) -> Result<(), String> {
    write_frame(stream, request)
        .await
        .map_err(|e| format!("talking to the background coordinator: {e}"))
}

async fn reply(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<ControlReply, String> {
    match read_frame(stream, MAX_CONTROL_FRAME).await {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err("the background coordinator hung up".into()),
        Err(e) => Err(format!("the background coordinator's answer: {e}")),
    }
}

/// `skyward pool up NAME ...`: checks everything, starts the background coordinator and
/// reports its progress until the pool is up (exit 0) or has failed.
pub async fn up(args: UpArgs) -> i32 {
    let checked = check_pool_name(&args.name)
        .and_then(|()| pool_plan(&args.pool))
        .and_then(|plan| Ok((plan, skyward_home()?)));
    let (plan, home) = or_exit!(checked, USAGE);
    if let Err(message) = PoolSession::check(&plan, &home, &args.name) {
        eprintln!("skyward: {message}");
        return USAGE;
    }
    match open_store().and_then(|store| store.pool(&args.name)) {
        Ok(None) => {}
        Ok(Some(record)) if record.owner.alive() => {
            eprintln!(
                "skyward: pool {0} is already up: `skyward exec {0} -- CMD` runs on it",
                args.name
            );
            return USAGE;
        }
        Ok(Some(_)) => {
            eprintln!(
                "skyward: a pool named {0} was left behind: `skyward down {0}` removes it first",
                args.name
            );
            return USAGE;
        }
        Err(message) => {
            eprintln!("skyward: {message}");
            return FAILURE;
        }
    }
    let dir = home.join("pools").join(&args.name);
    let log = dir.join("coordinator.log");
    let mut child = or_exit!(spawn_background(&dir, &log), FAILURE);
    let (mut sigint, mut sigterm) = or_exit!(interrupt_signals(), FAILURE);
    let socket = socket_path(&home, &args.name);
    let watching = async {
        let deadline = tokio::time::Instant::now() + SOCKET_WAIT;
        let mut stream = loop {
            if let Ok(stream) = UnixStream::connect(&socket).await {
                break stream;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the background coordinator exited ({status}) before the pool came up: {}",
                    last_lines(&log, 5)
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the background coordinator did not open {} within {}s; see {}",
                    socket.display(),
                    SOCKET_WAIT.as_secs(),
                    log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        request(&mut stream, &ControlRequest::Watch).await?;
        loop {
            match reply(&mut stream).await {
                Ok(ControlReply::Note(line)) => eprintln!("{line}"),
                Ok(ControlReply::Ready) => return Ok(()),
                Ok(ControlReply::Failed(message)) => return Err(message),
                Ok(other) => return Err(format!("unexpected answer {other:?}")),
                Err(message) => {
                    return Err(format!("{message}; see {}", log.display()));
                }
            }
        }
    };
    let interrupted = tokio::select! {
        result = watching => match result {
            Ok(()) => {
                eprintln!(
                    "skyward: pool {0} is up ({1} node{2}): `skyward exec {0} -- CMD` runs on it, `skyward pool status {0}` shows it, `skyward pool down {0}` ends it",
                    args.name,
                    plan.spec.nodes,
                    if plan.spec.nodes == 1 { "" } else { "s" }
                );
                return 0;
            }
            Err(message) => {
                eprintln!("skyward: {message}");
                // A coordinator that failed tears its pool down and exits by itself.
                let _ = tokio::time::timeout(Duration::from_secs(600), async {
                    while let Ok(None) = child.try_wait() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
                .await;
                return FAILURE;
            }
        },
        _ = sigint.recv() => ("SIGINT", 130),
        _ = sigterm.recv() => ("SIGTERM", 143),
    };
    // Stopped before the pool was up: nothing of it should stay.
    eprintln!(
        "skyward: {}: stopping pool {} and removing its nodes",
        interrupted.0, args.name
    );
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    loop {
        tokio::select! {
            _ = child.wait() => break,
            _ = sigint.recv() => eprintln!("skyward: still removing the nodes of pool {}; they will be gone in a few seconds", args.name),
        }
    }
    interrupted.1
}

/// Starts `skyward pool serve ...` with this command's arguments, in a session of its own
/// (a Ctrl-C at this terminal does not reach it), its output going to `log`.
fn spawn_background(dir: &Path, log: &Path) -> Result<tokio::process::Child, String> {
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::process::CommandExt;
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // `skyward pool up ARGS...` becomes `skyward pool serve ARGS...`.
    match argv.get(..2) {
        Some([pool, up]) if pool == "pool" && up == "up" => argv[1] = "serve".into(),
        _ => return Err("`pool up` must come first on the command line".into()),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let output = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this skyward: {e}"))?;
    let mut command = std::process::Command::new(exe);
    command
        .args(argv)
        .stdin(std::process::Stdio::null())
        .stdout(output.try_clone().map_err(|e| e.to_string())?)
        .stderr(output);
    // SAFETY: setsid is async-signal-safe and touches no parent memory.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    tokio::process::Command::from(command)
        .spawn()
        .map_err(|e| format!("cannot start the background coordinator: {e}"))
}

/// The last `n` lines of a log, joined for a one-line message.
fn last_lines(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.len() {
        0 => format!("no output in {}", log.display()),
        len => lines[len.saturating_sub(n)..].join(" | "),
    }
}

/// `skyward pool serve`: the background coordinator itself.
pub async fn serve(args: UpArgs) -> i32 {
    crate::daemon::serve(args).await
}

/// `skyward exec NAME ...`: runs a job on the pool, streaming it as `skyward run` would.
pub async fn exec(args: ExecArgs) -> i32 {
    let job = or_exit!(job_request(&args.job, None), USAGE);
    let mut stream = match connect(&args.name).await {
        Ok(stream) => stream,
        Err(unreachable) => return unreachable.report(),
    };
    let (mut sigint, mut sigterm) = or_exit!(interrupt_signals(), FAILURE);
    let exec = ControlRequest::Exec {
        job: job.clone(),
        detach: args.detach,
    };
    if let Err(message) = request(&mut stream, &exec).await {
        eprintln!("skyward: {message}");
        return FAILURE;
    }
    let (tasks, nodes) = match reply(&mut stream).await {
        Ok(ControlReply::Accepted { tasks, nodes }) => (tasks, nodes),
        Ok(ControlReply::Refused(message) | ControlReply::Failed(message)) | Err(message) => {
            eprintln!("skyward: {message}");
            return FAILURE;
        }
        Ok(other) => {
            eprintln!("skyward: unexpected answer {other:?}");
            return FAILURE;
        }
    };
    if args.detach {
        for task in &tasks {
            println!("{task}");
        }
        eprintln!(
            "skyward: started on pool {0}; `skyward logs {0} {1} -f` follows the output",
            args.name, tasks[0]
        );
        return 0;
    }
    let mut renderer = Renderer::terminal(output_mode(args.job.json, &job, nodes));
    let (mut from_pool, to_pool) = stream.into_split();
    // The write half stays open for the whole job: its end means the client left.
    let _held_open = match job.stdin {
        true => {
            tokio::spawn(forward_stdin(to_pool));
            None
        }
        false => Some(to_pool),
    };
    let cancelled = |signal: &str| {
        eprintln!(
            "skyward: {signal}: cancelling the tasks on pool {} (the pool stays up)",
            args.name
        );
    };
    loop {
        let answer = tokio::select! {
            answer = reply(&mut from_pool) => answer,
            _ = sigint.recv() => { cancelled("SIGINT"); return 130; }
            _ = sigterm.recv() => { cancelled("SIGTERM"); return 143; }
        };
        match answer {
            Ok(ControlReply::Event(event)) => renderer.event(&event),
            Ok(ControlReply::Done(reports)) => {
                renderer.summary(&reports, &job.labels());
                return exit_code(&reports);
            }
            Ok(ControlReply::Failed(message) | ControlReply::Refused(message)) | Err(message) => {
                eprintln!("skyward: {message}");
                return FAILURE;
            }
            Ok(other) => {
                eprintln!("skyward: unexpected answer {other:?}");
                return FAILURE;
            }
        }
    }
}

/// Sends this process's stdin to the pool as it comes; its end is the task's end of input.
async fn forward_stdin(mut to_pool: tokio::net::unix::OwnedWriteHalf) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; skyward_common::limits::OUTPUT_CHUNK];
    loop {
        let message = match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => ControlRequest::StdinEof,
            Ok(n) => ControlRequest::Stdin(Bytes::copy_from_slice(&buf[..n])),
        };
        let end = matches!(message, ControlRequest::StdinEof);
        if write_frame(&mut to_pool, &message).await.is_err() || end {
            // Closing the write half would read as the client leaving.
            std::future::pending::<()>().await;
        }
    }
}

/// This terminal's size, rows by columns (24 x 80 when it has none).
fn window_size() -> (u16, u16) {
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into `size`, which outlives the call.
    let ok = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    match ok && size.ws_row > 0 && size.ws_col > 0 {
        true => (size.ws_row, size.ws_col),
        false => (24, 80),
    }
}

/// This terminal in raw mode (keys go to the remote terminal as typed, Ctrl-C included)
/// until dropped, which restores it.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr/tcsetattr read and write one termios each, owned here.
        unsafe {
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return None;
            }
        }
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0);
        }
    }
}

/// `skyward shell NAME [NODE] [-- CMD]`: a terminal on a node over the agent's connection.
pub async fn shell(args: ShellArgs) -> i32 {
    use std::io::{IsTerminal, Write};
    let mut stream = match connect(&args.name).await {
        Ok(stream) => stream,
        Err(unreachable) => return unreachable.report(),
    };
    let (rows, cols) = window_size();
    let open = ControlRequest::Shell {
        node: args.node.clone(),
        argv: args.command.clone(),
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
        rows,
        cols,
    };
    if let Err(message) = request(&mut stream, &open).await {
        eprintln!("skyward: {message}");
        return FAILURE;
    }
    match reply(&mut stream).await {
        Ok(ControlReply::Accepted { .. }) => {}
        Ok(ControlReply::Refused(message)) => {
            eprintln!("skyward: {message}");
            return USAGE;
        }
        Ok(ControlReply::Failed(message)) | Err(message) => {
            eprintln!("skyward: {message}");
            return FAILURE;
        }
        Ok(other) => {
            eprintln!("skyward: unexpected answer {other:?}");
            return FAILURE;
        }
    }
    let terminal = std::io::stdin().is_terminal();
    let raw = terminal.then(RawMode::enter).flatten();
    let (mut from_pool, to_pool) = stream.into_split();
    let forwarding = tokio::spawn(forward_keys(to_pool));
    let mut stdout = std::io::stdout();
    let code = loop {
        match reply(&mut from_pool).await {
            Ok(ControlReply::Event(RunEvent::Output { data, .. })) => {
                let _ = stdout.write_all(&data);
                let _ = stdout.flush();
            }
            Ok(ControlReply::Event(_)) => {}
            Ok(ControlReply::Done(reports)) => break exit_code(&reports),
            Ok(ControlReply::Failed(message)) | Err(message) => {
                drop(raw);
                eprintln!("skyward: {message}");
                forwarding.abort();
                return FAILURE;
            }
            Ok(other) => {
                drop(raw);
                eprintln!("skyward: unexpected answer {other:?}");
                forwarding.abort();
                return FAILURE;
            }
        }
    };
    forwarding.abort();
    drop(raw);
    code
}

/// Sends this process's stdin (keys, in raw mode) and window size changes to the shell.
async fn forward_keys(mut to_pool: tokio::net::unix::OwnedWriteHalf) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut resized = signal(SignalKind::window_change()).ok();
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 4096];
    let mut open = true;
    loop {
        let message = tokio::select! {
            read = stdin.read(&mut buf), if open => match read {
                Ok(0) | Err(_) => {
                    open = false;
                    ControlRequest::StdinEof
                }
                Ok(n) => ControlRequest::Stdin(Bytes::copy_from_slice(&buf[..n])),
            },
            Some(()) = async { resized.as_mut()?.recv().await } => {
                let (rows, cols) = window_size();
                ControlRequest::Resize { rows, cols }
            }
            else => std::future::pending::<ControlRequest>().await,
        };
        if write_frame(&mut to_pool, &message).await.is_err() {
            // Closing the write half would read as the client leaving.
            std::future::pending::<()>().await;
        }
    }
}

/// `skyward pool status NAME`.
pub async fn status(args: StatusArgs) -> i32 {
    let mut stream = match connect(&args.name).await {
        Ok(stream) => stream,
        Err(unreachable) => return unreachable.report(),
    };
    let status = match request(&mut stream, &ControlRequest::Status).await {
        Ok(()) => reply(&mut stream).await,
        Err(message) => Err(message),
    };
    let status = match status {
        Ok(ControlReply::Status(status)) => status,
        Ok(ControlReply::Refused(message)) | Err(message) => {
            eprintln!("skyward: {message}");
            return FAILURE;
        }
        Ok(other) => {
            eprintln!("skyward: unexpected answer {other:?}");
            return FAILURE;
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&status).unwrap_or_else(|_| "{}".into())
        );
    } else {
        print_status(&status);
    }
    0
}

fn print_status(status: &PoolStatus) {
    let money = |usd: Option<f64>| usd.map_or_else(|| "-".into(), |usd| format!("${usd:.2}"));
    let age = |secs: u64| humantime::format_duration(Duration::from_secs(secs)).to_string();
    println!(
        "pool {} ({}): up {}, {} x {} on {} {} ({}), {}/h per node, {} so far{}",
        status.name,
        status.phase,
        age(status.up_seconds),
        status.nodes.len(),
        status.instance_type,
        status.provider,
        status.region,
        status.market,
        money(status.price_per_hour),
        money(status.cost_so_far),
        status
            .ttl_left_seconds
            .map(|left| format!(", TTL ends it in {}", age(left)))
            .unwrap_or_default()
    );
    let mut nodes = comfy_table::Table::new();
    nodes.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    nodes.set_header([
        "node",
        "state",
        "address",
        "tasks",
        "vCPU",
        "RAM GB",
        "load",
        "accelerators",
    ]);
    for node in &status.nodes {
        nodes.add_row([
            node.node.clone(),
            node.state.clone(),
            node.address.clone(),
            node.running_tasks.to_string(),
            node.cpus.to_string(),
            format!("{:.1}", node.memory_bytes as f64 / 1e9),
            node.load_avg_1m
                .map_or_else(|| "-".into(), |l| format!("{l:.2}")),
            match node.accelerators.is_empty() {
                true => "-".into(),
                false => node
                    .accelerators
                    .iter()
                    .map(|line| {
                        line.split_once("] ")
                            .map_or(line.as_str(), |(_, about)| about)
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            },
        ]);
    }
    println!("{nodes}");
    for replacement in &status.replacements {
        println!("{replacement}");
    }
    for (rank, place) in status.places.iter().enumerate() {
        if place.state != "held" {
            println!("place {rank} (last {}): {}", place.node, place.state);
        }
    }
    if let Some(shortfall) = &status.shortfall {
        println!("{shortfall}");
    }
    if status.tasks.is_empty() {
        println!("no tasks yet");
        return;
    }
    let mut tasks = comfy_table::Table::new();
    tasks.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    tasks.set_header(["task", "state", "node", "age", "command"]);
    for task in &status.tasks {
        tasks.add_row([
            task.task.to_string(),
            task.state.clone(),
            task.node.clone().unwrap_or_else(|| "-".into()),
            age(task.age_seconds),
            task.command.clone(),
        ]);
    }
    println!("{tasks}");
}

/// `skyward logs NAME TASK [-f]`.
pub async fn logs(args: LogsArgs) -> i32 {
    use std::io::Write;
    let mut stream = match connect(&args.name).await {
        Ok(stream) => stream,
        Err(unreachable) => return unreachable.report(),
    };
    let logs = ControlRequest::Logs {
        task: args.task,
        follow: args.follow,
    };
    if let Err(message) = request(&mut stream, &logs).await {
        eprintln!("skyward: {message}");
        return FAILURE;
    }
    let mut stdout = std::io::stdout();
    loop {
        match reply(&mut stream).await {
            Ok(ControlReply::Log(data)) => {
                let _ = stdout.write_all(&data);
                let _ = stdout.flush();
            }
            Ok(ControlReply::LogEnd { ended }) => {
                if let Some(ended) = ended {
                    eprintln!("skyward: task {} {ended}", args.task);
                }
                return 0;
            }
            Ok(ControlReply::Refused(message)) => {
                eprintln!("skyward: {message}");
                return USAGE;
            }
            Ok(other) => {
                eprintln!("skyward: unexpected answer {other:?}");
                return FAILURE;
            }
            Err(message) => {
                eprintln!("skyward: {message}");
                return FAILURE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_are_tags_and_paths() {
        for good in ["train", "a", "train-1", "x0-9"] {
            assert!(check_pool_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(41);
        for bad in [
            "",
            "Train",
            "1st",
            "-a",
            "a-",
            "a_b",
            "a/b",
            "a.b",
            long.as_str(),
        ] {
            let err = check_pool_name(bad).unwrap_err();
            assert!(err.contains("lowercase letters"), "{bad}: {err}");
        }
    }

    #[test]
    fn control_messages_survive_the_wire() {
        let status = PoolStatus {
            name: "train".into(),
            pid: 7,
            provider: "local".into(),
            region: "here".into(),
            instance_type: "this-machine".into(),
            market: "on-demand".into(),
            price_per_hour: Some(1.5),
            up_seconds: 90,
            cost_so_far: Some(0.0375),
            ttl_left_seconds: None,
            phase: "up, 1 job running".into(),
            nodes: vec![],
            tasks: vec![TaskStatus {
                task: 3,
                command: "sleep 1".into(),
                node: Some("node-1".into()),
                state: "running".into(),
                exit_code: None,
                age_seconds: 4,
            }],
            replacements: vec!["node-2 (lost) replaced by node-3".into()],
            shortfall: None,
            places: vec![PlaceStatus {
                node: "node-3".into(),
                state: "held".into(),
            }],
        };
        let mut frame = Vec::new();
        skyward_common::frame::encode_frame(
            &ControlReply::Status(Box::new(status.clone())),
            &mut frame,
        )
        .unwrap();
        let decoded: Vec<ControlReply> =
            skyward_common::frame::decode_frames(&frame, MAX_CONTROL_FRAME).unwrap();
        match &decoded[..] {
            [ControlReply::Status(back)] => assert_eq!(**back, status),
            other => panic!("{other:?}"),
        }
    }
}
