//! The chaos suite (issue 17): a `pool up` pool of local nodes, some of them in network
//! namespaces of their own, runs tasks that print verifiable streams (sequence-numbered lines
//! with running checksums) and exit with known codes, while faults are injected at random:
//! agents and the background coordinator frozen (SIGSTOP, SIGCONT), links cut and restored,
//! slow and stalled readers, agents killed (the tasks run with `--retries`). At the end it
//! checks the invariants (every line once and in order, every exit code once, no task stuck
//! past its bound, nothing left running, no namespace left) and prints a table.
//!
//! Run it as `scripts/chaos.sh [--seconds N | --minutes N] [--seed N]` (root: namespaces).
//! Every loop here is bounded in count and time; all traffic stays on loopback and on the
//! links to the namespaces this program makes and removes.
//!
//! The same binary is the pool's agent launcher (`SKYWARD_AGENT_BIN`): asked to start the
//! agent of a node it placed in a namespace, it starts it there, dialing the coordinator
//! through that namespace's link.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use skyward_tests::netns::TestNet;
use skyward_tests::{bin, processes_under, run, Sandbox};

/// Set in the pool's environment: this binary was started as a node's agent.
const WRAP: &str = "SKYWARD_CHAOS_WRAP";
/// The real agent.
const AGENT: &str = "SKYWARD_CHAOS_AGENT";
/// `NAMESPACE@HOST_IP,...`: the namespaces nodes may be placed in, and the address that
/// reaches the coordinator from each.
const PLACES: &str = "SKYWARD_CHAOS_NETNS";
/// A folder holding, per namespace, the pid of the agent placed there (`NAMESPACE.pid`).
const CLAIMS: &str = "SKYWARD_CHAOS_CLAIMS";

const POOL: &str = "chaos";

fn main() -> std::process::ExitCode {
    if std::env::var_os(WRAP).is_some() {
        wrap_agent();
    }
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("skyward-chaos: {e}");
            eprintln!(
                "usage: skyward-chaos [--seconds N | --minutes N] [--seed N] [--report FILE]"
            );
            return std::process::ExitCode::from(2);
        }
    };
    match run_chaos(&options) {
        Ok(report) => {
            println!("{}", report.table());
            if let Some(path) = &options.report {
                if let Err(e) = std::fs::write(path, report.table()) {
                    eprintln!("skyward-chaos: writing {}: {e}", path.display());
                    return std::process::ExitCode::FAILURE;
                }
            }
            match report.violations.is_empty() {
                true => std::process::ExitCode::SUCCESS,
                false => std::process::ExitCode::FAILURE,
            }
        }
        Err(e) => {
            eprintln!("skyward-chaos: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Starts the real agent with the arguments the local provider gave, inside a namespace no
/// live agent holds (dialing the coordinator through the namespace's link), else as it is:
/// a node that replaces one killed in a namespace takes its place there. Replaces this
/// process: the provider's pid is the agent's.
fn wrap_agent() -> ! {
    let agent = std::env::var(AGENT).expect("SKYWARD_CHAOS_AGENT");
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let places = std::env::var(PLACES).unwrap_or_default();
    let claims = std::env::var_os(CLAIMS).map(std::path::PathBuf::from);
    // Held until the exec (the file is opened close-on-exec), so that nodes starting at once
    // do not take the same namespace.
    let lock = claims
        .as_ref()
        .and_then(|dir| std::fs::File::create(dir.join("lock")).ok());
    if let Some(lock) = &lock {
        // SAFETY: locking a file this process opened.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(lock), libc::LOCK_EX) };
    }
    let place = claims.as_ref().and_then(|dir| {
        places.split(',').find_map(|entry| {
            let (namespace, host_ip) = entry.split_once('@')?;
            let claim = dir.join(format!("{namespace}.pid"));
            if claimant(&claim).is_some() {
                return None;
            }
            std::fs::write(&claim, std::process::id().to_string()).ok()?;
            Some((namespace.to_string(), host_ip.to_string()))
        })
    });
    // The coordinator listens on every address; the agent dials the one it can reach.
    if let Some(i) = args.iter().position(|a| a == "--coordinator") {
        if let Some(address) = args.get_mut(i + 1) {
            let port = address.rsplit(':').next().unwrap_or_default().to_string();
            let host = place.as_ref().map_or("127.0.0.1", |(_, ip)| ip.as_str());
            *address = format!("{host}:{port}");
        }
    }
    let error = match place {
        Some((namespace, _)) => Command::new("ip")
            .args(["netns", "exec", &namespace, &agent])
            .args(&args)
            .exec(),
        None => Command::new(&agent).args(&args).exec(),
    };
    eprintln!("skyward-chaos: cannot start the agent: {error}");
    std::process::exit(127)
}

/// The live agent whose pid `claim` names, if it still runs (a killed one's pid names a
/// zombie or nothing).
fn claimant(claim: &std::path::Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(claim).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let alive = cmdline
        .windows(b"skyward-agent".len())
        .any(|w| w == b"skyward-agent");
    alive.then_some(pid)
}

struct Options {
    duration: Duration,
    seed: u64,
    report: Option<std::path::PathBuf>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut options = Options {
            duration: Duration::from_secs(60),
            seed: rand::rng().random(),
            report: None,
        };
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                "--seconds" => options.duration = Duration::from_secs(number(&value(&arg)?)?),
                "--minutes" => options.duration = Duration::from_secs(60 * number(&value(&arg)?)?),
                "--seed" => options.seed = number(&value(&arg)?)?,
                "--report" => options.report = Some(value(&arg)?.into()),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if options.duration < Duration::from_secs(20)
            || options.duration > Duration::from_secs(4 * 3600)
        {
            return Err("give 20 seconds to 4 hours".into());
        }
        Ok(options)
    }
}

fn number(text: &str) -> Result<u64, String> {
    text.parse().map_err(|_| format!("{text} is not a number"))
}

/// The kinds of fault, in the table's order.
const KINDS: [&str; 6] = [
    "agent frozen",
    "coordinator frozen",
    "link cut",
    "agent killed",
    "slow reader",
    "stalled reader",
];

#[derive(Default)]
struct Report {
    seed: u64,
    seconds: u64,
    nodes: usize,
    namespaced: usize,
    faults: BTreeMap<&'static str, u64>,
    tasks: u64,
    retried: u64,
    bytes: u64,
    lines: u64,
    violations: Vec<String>,
    /// The largest output a node said it held at a resume.
    largest_held: u64,
    /// From a coordinator's SIGCONT to the next line at each reader that was waiting.
    return_to_byte_ms: Vec<u64>,
}

impl Report {
    fn table(&self) -> String {
        let mut out = format!(
            "chaos: {} s, seed {}, {} nodes ({} in network namespaces)\n\n| fault | injected |\n| --- | --- |\n",
            self.seconds, self.seed, self.nodes, self.namespaced
        );
        for kind in KINDS {
            out += &format!(
                "| {kind} | {} |\n",
                self.faults.get(kind).copied().unwrap_or(0)
            );
        }
        let mut latencies = self.return_to_byte_ms.clone();
        latencies.sort_unstable();
        let pct = |p: f64| match latencies.is_empty() {
            true => "-".to_string(),
            false => {
                let i = ((latencies.len() - 1) as f64 * p).round() as usize;
                format!("{} ms", latencies[i])
            }
        };
        out += &format!(
            "\n| tasks | retried | lines verified | bytes verified | largest output held at a resume | coordinator back to next byte (p50, p99) | violations |\n| --- | --- | --- | --- | --- | --- | --- |\n| {} | {} | {} | {} | {} | {}, {} | {} |\n",
            self.tasks,
            self.retried,
            self.lines,
            self.bytes,
            skyward_coordinator::workdir::human_bytes(self.largest_held),
            pct(0.5),
            pct(0.99),
            self.violations.len()
        );
        for violation in &self.violations {
            out += &format!("\nviolation: {violation}");
        }
        out
    }
}

/// What every task checker and fault shares.
struct Shared {
    report: Mutex<Report>,
    /// Set while the background coordinator is frozen; readers waiting then measure the
    /// time from its return to their next line.
    coordinator_back_at: Mutex<Option<Instant>>,
    stopping: AtomicBool,
}

fn run_chaos(options: &Options) -> Result<Report, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the chaos suite puts nodes in network namespaces: run it as root".into());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let sandbox = Sandbox::new();
    let nodes = 4;
    let nets: Vec<TestNet> = (0..2)
        .map(|_| TestNet::create())
        .collect::<Result<_, _>>()?;
    let places: Vec<String> = nets
        .iter()
        .map(|net| format!("{}@{}", net.namespace(), net.host_ip))
        .collect();
    let claims = sandbox.path().join("netns-claims");
    std::fs::create_dir_all(&claims).map_err(|e| e.to_string())?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let sky = || {
        let mut command = sandbox.skyward();
        command
            .env("SKYWARD_AGENT_BIN", &me)
            .env(WRAP, "1")
            .env(AGENT, bin("skyward-agent"))
            .env(PLACES, places.join(","))
            .env(CLAIMS, &claims)
            // Short enough that a fault breaks connections; bounds small enough that
            // outages reach the spill.
            .env("SKYWARD_IDLE_TIMEOUT", "3s")
            .env("SKYWARD_TASK_MEMORY", "262144")
            .env("SKYWARD_TASK_SPILL", "8388608");
        command
    };
    let limit = Duration::from_secs(120);
    let up = run(
        sky().args([
            "pool",
            "up",
            POOL,
            "--nodes",
            &nodes.to_string(),
            "--node-timeout",
            "90s",
            // The suite kills an agent every 6-12 s: far past the budget a real pool keeps
            // against machines that keep being taken.
            "--max-replacements",
            "1000",
            "--listen",
            "0.0.0.0:0",
        ]),
        limit,
    );
    if up.code != Some(0) {
        return Err(format!("pool up failed: {}", up.stderr.trim()));
    }
    let status = run(sky().args(["pool", "status", POOL, "--json"]), limit);
    let status: serde_json::Value =
        serde_json::from_str(&status.stdout).map_err(|e| format!("pool status: {e}"))?;
    let coordinator_pid = status["pid"].as_i64().ok_or("pool status has no pid")? as i32;

    let shared = Arc::new(Shared {
        report: Mutex::new(Report {
            seed: options.seed,
            seconds: options.duration.as_secs(),
            nodes,
            namespaced: nets.len(),
            ..Report::default()
        }),
        coordinator_back_at: Mutex::new(None),
        stopping: AtomicBool::new(false),
    });
    // The longest a fault lasts: up to a minute in a long run, a few seconds in a short one.
    let longest = Duration::from_secs((options.duration.as_secs() / 10).clamp(3, 60));
    let started = Instant::now();
    let end = started + options.duration;
    let mut workers = Vec::new();
    let mut next_task = 0u64;
    // The nodes whose agents are connected, by `pool status`.
    let connected = || -> Vec<String> {
        let status = run(sky().args(["pool", "status", POOL, "--json"]), limit);
        let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap_or_default();
        status["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter(|n| n["state"].as_str() == Some("connected"))
                    .filter_map(|n| n["node"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut faults: Vec<Fault> = Vec::new();
    // When each kind of fault may start next (in `KINDS`' order).
    let mut next_fault = [Instant::now() + Duration::from_secs(2); INJECTED.len()];
    // Bounded: the loop ends at `end`; each pass sleeps 100 ms.
    while Instant::now() < end {
        workers.retain(|w: &std::thread::JoinHandle<()>| !w.is_finished());
        while workers.len() < TASKS_AT_ONCE {
            next_task += 1;
            let task = Workload::random(next_task, &mut rng, longest);
            let sky = sky();
            let shared = shared.clone();
            workers.push(std::thread::spawn(move || task.run(sky, &shared)));
        }
        let now = Instant::now();
        faults.retain_mut(|fault| {
            if !fault.try_end() {
                return true;
            }
            // The next of its kind comes a little after, not at once.
            let next = &mut next_fault[fault.kind.index()];
            *next = (*next).max(now + fault.kind.gap(&mut rng) / 2);
            false
        });
        for kind in INJECTED {
            if now < next_fault[kind.index()] {
                continue;
            }
            let context = FaultContext {
                connected: &connected,
                sandbox: &sandbox,
                coordinator: coordinator_pid,
                nets: &nets,
                claims: &claims,
                active: &faults,
                longest,
                shared: &shared,
            };
            match Fault::start(kind, &mut rng, &context) {
                Some(fault) => {
                    *shared
                        .report
                        .lock()
                        .unwrap()
                        .faults
                        .entry(kind.name())
                        .or_default() += 1;
                    faults.push(fault);
                    next_fault[kind.index()] = now + kind.gap(&mut rng);
                }
                // Nothing to do it to now (all taken, too few agents): try again soon.
                None => next_fault[kind.index()] = now + Duration::from_millis(500),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every fault ends now; the tasks already running finish (each within its bound).
    for mut fault in faults.drain(..) {
        fault.end();
    }
    shared.stopping.store(true, Ordering::SeqCst);
    for worker in workers {
        let _ = worker.join();
    }
    let down = run(sky().args(["pool", "down", POOL]), limit);
    let mut report = std::mem::take(&mut *shared.report.lock().unwrap());
    if down.code != Some(0) {
        report
            .violations
            .push(format!("pool down failed: {}", down.stderr.trim()));
    }
    let left = sandbox.wait_for_no_processes(Duration::from_secs(20));
    if !left.is_empty() {
        report.violations.push(format!("left running: {left:?}"));
    }
    let names: Vec<String> = nets.iter().map(|n| n.namespace().to_string()).collect();
    drop(nets);
    let listed = Command::new("ip").args(["netns", "list"]).output();
    let listed = listed
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for name in names {
        if listed
            .lines()
            .any(|line| line.split_whitespace().next() == Some(name.as_str()))
        {
            report
                .violations
                .push(format!("namespace {name} left behind"));
        }
    }
    Ok(report)
}

/// The faults the suite injects itself (readers are the workloads' own).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    AgentFrozen,
    CoordinatorFrozen,
    LinkCut,
    AgentKilled,
}

const INJECTED: [Kind; 4] = [
    Kind::AgentFrozen,
    Kind::CoordinatorFrozen,
    Kind::LinkCut,
    Kind::AgentKilled,
];

/// Tasks running at any time.
const TASKS_AT_ONCE: usize = 6;

impl Kind {
    fn index(self) -> usize {
        INJECTED.iter().position(|k| *k == self).unwrap_or(0)
    }

    fn name(self) -> &'static str {
        KINDS[self.index()]
    }

    /// The time from one fault of the kind starting to the next: short enough for hundreds
    /// of each in 30 minutes, long enough that the pool does work between them.
    fn gap(self, rng: &mut rand::rngs::StdRng) -> Duration {
        let millis = match self {
            Kind::AgentFrozen | Kind::LinkCut => rng.random_range(2_000..6_000),
            Kind::CoordinatorFrozen => rng.random_range(3_000..8_000),
            Kind::AgentKilled => rng.random_range(6_000..12_000),
        };
        Duration::from_millis(millis)
    }
}

/// How long a fault lasts: mostly short (1 s to `short`), one in eight up to `longest`, and
/// log-uniform, so that brief outages are the common case and long ones still come.
fn lasting(rng: &mut rand::rngs::StdRng, short: Duration, longest: Duration) -> Duration {
    let top = match rng.random_ratio(1, 8) {
        true => longest,
        false => short.min(longest),
    };
    let (low, high) = (1_000f64.ln(), (top.as_millis().max(1_001) as f64).ln());
    Duration::from_millis(rng.random_range(low..=high).exp() as u64)
}

/// What a fault may act on.
struct FaultContext<'a> {
    /// The nodes whose agents are connected now.
    connected: &'a dyn Fn() -> Vec<String>,
    sandbox: &'a Sandbox,
    coordinator: i32,
    nets: &'a [TestNet],
    claims: &'a std::path::Path,
    active: &'a [Fault],
    longest: Duration,
    shared: &'a Arc<Shared>,
}

/// One fault in progress.
struct Fault {
    kind: Kind,
    /// The agent frozen, or the namespace cut off.
    target: String,
    until: Instant,
    undo: Box<dyn FnMut() + Send>,
}

impl Fault {
    /// Starts a fault of `kind`; `None` when there is nothing to do it to now (two agents
    /// frozen already, the coordinator frozen, no namespace with an agent left to cut off,
    /// too few agents to kill one).
    fn start(kind: Kind, rng: &mut rand::rngs::StdRng, at: &FaultContext) -> Option<Fault> {
        let active = |k: Kind| at.active.iter().filter(move |f| f.kind == k);
        let agents: Vec<i32> = processes_under(at.sandbox.path())
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("skyward-agent") && cmd.contains("--node-id"))
            .map(|(pid, _)| pid)
            .collect();
        let signal = |pid: i32, signal: i32| {
            // SAFETY: signalling a process of this run's pool by pid.
            unsafe { libc::kill(pid, signal) };
        };
        let short = Duration::from_secs(10);
        match kind {
            Kind::AgentFrozen => {
                if active(kind).count() >= 2 {
                    return None;
                }
                let frozen: Vec<String> = active(kind).map(|f| f.target.clone()).collect();
                let free: Vec<i32> = agents
                    .into_iter()
                    .filter(|pid| !frozen.contains(&pid.to_string()))
                    .collect();
                let pid = *free.get(rng.random_range(0..free.len().max(1)))?;
                signal(pid, libc::SIGSTOP);
                Some(Fault {
                    kind,
                    target: pid.to_string(),
                    until: Instant::now() + lasting(rng, short, at.longest),
                    undo: Box::new(move || signal(pid, libc::SIGCONT)),
                })
            }
            Kind::CoordinatorFrozen => {
                if active(kind).count() > 0 {
                    return None;
                }
                // Well under the node timeout (90 s), which a frozen coordinator's nodes
                // would otherwise pass in its eyes once it is back; mostly a few seconds.
                let lasting = lasting(
                    rng,
                    Duration::from_secs(6),
                    at.longest.min(Duration::from_secs(30)),
                );
                let coordinator = at.coordinator;
                signal(coordinator, libc::SIGSTOP);
                let shared = at.shared.clone();
                Some(Fault {
                    kind,
                    target: "coordinator".into(),
                    until: Instant::now() + lasting,
                    undo: Box::new(move || {
                        signal(coordinator, libc::SIGCONT);
                        *shared.coordinator_back_at.lock().unwrap() = Some(Instant::now());
                    }),
                })
            }
            Kind::LinkCut => {
                // Only a namespace an agent is in now: a cut that cuts nobody off is no fault.
                let cut: Vec<String> = active(kind).map(|f| f.target.clone()).collect();
                let candidates: Vec<&TestNet> = at
                    .nets
                    .iter()
                    .filter(|net| !cut.iter().any(|c| c == net.namespace()))
                    .filter(|net| {
                        claimant(&at.claims.join(format!("{}.pid", net.namespace()))).is_some()
                    })
                    .collect();
                let net = *candidates.get(rng.random_range(0..candidates.len().max(1)))?;
                net.set_link(false).ok()?;
                let host_if = net.host_interface().to_string();
                Some(Fault {
                    kind,
                    target: net.namespace().to_string(),
                    until: Instant::now() + lasting(rng, short, at.longest),
                    undo: Box::new(move || {
                        let _ = Command::new("ip")
                            .args(["link", "set", &host_if, "up"])
                            .status();
                    }),
                })
            }
            Kind::AgentKilled => {
                // `pool status` would wait for a frozen coordinator.
                if at.active.iter().any(|f| f.kind == Kind::CoordinatorFrozen) {
                    return None;
                }
                // Only a node that has connected: a pool replaces a lost node once, and gives
                // up when the replacement dies before it connects (then goes on smaller).
                // Keep at least two: the killed one's tasks run again elsewhere, and the pool
                // starts a node in its place.
                let connected = (at.connected)();
                if connected.len() < 3 {
                    return None;
                }
                let node = &connected[rng.random_range(0..connected.len())];
                let pid = *processes_under(at.sandbox.path())
                    .into_iter()
                    .filter(|(_, cmd)| {
                        cmd.contains("skyward-agent") && cmd.contains(&format!("--node-id {node} "))
                    })
                    .map(|(pid, _)| pid)
                    .collect::<Vec<_>>()
                    .first()?;
                signal(pid, libc::SIGKILL);
                Some(Fault {
                    kind,
                    target: pid.to_string(),
                    until: Instant::now(),
                    undo: Box::new(|| {}),
                })
            }
        }
    }

    /// Ends the fault if its time is up.
    fn try_end(&mut self) -> bool {
        if Instant::now() < self.until {
            return false;
        }
        self.end();
        true
    }

    fn end(&mut self) {
        (self.undo)();
    }
}

/// Something a workload's reader does at one line of its task's output.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Episode {
    /// Reads the next `lines` lines slowly (20 ms every 10 lines: slower than most tasks
    /// print).
    Slow { lines: u64 },
    /// Stops reading for a while.
    Stall(Duration),
}

/// Retries each task runs with: kills come every 6-12 s, so a long task may lose several
/// nodes.
const RETRIES: u64 = 10;

/// One task: `lines` numbered lines of `width` bytes, `per_beat` every 50 ms, then exit
/// `code`; its reader's `episodes`, by the line each starts at.
struct Workload {
    id: u64,
    lines: u64,
    width: usize,
    per_beat: u64,
    code: i32,
    episodes: Vec<(u64, Episode)>,
}

impl Workload {
    fn random(id: u64, rng: &mut rand::rngs::StdRng, longest: Duration) -> Workload {
        let lines = rng.random_range(500..20_000);
        let mut episodes: Vec<(u64, Episode)> = (0..rng.random_range(0..=3))
            .map(|_| {
                let at = rng.random_range(0..lines);
                let episode = match rng.random_bool(0.5) {
                    true => Episode::Slow {
                        lines: rng.random_range(200..3_000),
                    },
                    false => Episode::Stall(lasting(rng, Duration::from_secs(10), longest)),
                };
                (at, episode)
            })
            .collect();
        episodes.sort_by_key(|(at, _)| *at);
        Workload {
            id,
            lines,
            width: rng.random_range(40..400),
            per_beat: rng.random_range(20..400),
            code: rng.random_range(0..100),
            episodes,
        }
    }

    /// The generator: a Python program (the tests need python3 anyway) printing lines
    /// `w<id> <seq> <checksum> <padding>`, the checksum running over the sequence.
    fn script(&self) -> String {
        format!(
            "import sys, time\n\
             c = 0\n\
             out = sys.stdout\n\
             for i in range({lines}):\n\
             \x20   c = (c * 1000003 + i + {id}) & 0xFFFFFFFFFFFFFFFF\n\
             \x20   out.write('w{id} %d %016x %s\\n' % (i, c, 'x' * {width}))\n\
             \x20   if i % {beat} == {beat} - 1:\n\
             \x20       out.flush(); time.sleep(0.05)\n\
             out.flush()\n\
             sys.exit({code})\n",
            lines = self.lines,
            id = self.id,
            width = self.width,
            beat = self.per_beat,
            code = self.code,
        )
    }

    /// The longest the task may take after `restarts` retries: its own pace three times
    /// over per attempt, its reader's own pauses, and five minutes for faults.
    fn bound(&self, restarts: u64) -> Duration {
        let beats = self.lines / self.per_beat + 1;
        let pace = Duration::from_millis(beats * 50);
        let reader: Duration = self
            .episodes
            .iter()
            .map(|(_, episode)| match episode {
                Episode::Slow { lines } => Duration::from_millis(lines / 10 * 20),
                Episode::Stall(pause) => *pause,
            })
            .sum();
        pace * 3 * (1 + restarts as u32) + reader + Duration::from_secs(300)
    }

    fn run(self, mut sky: Command, shared: &Shared) {
        let started = Instant::now();
        let mut child: Child = match sky
            .args([
                "exec",
                POOL,
                "-n",
                "--retries",
                &RETRIES.to_string(),
                "--",
                "python3",
                "-c",
                &self.script(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                shared
                    .report
                    .lock()
                    .unwrap()
                    .violations
                    .push(format!("w{}: spawn: {e}", self.id));
                return;
            }
        };
        let mut stderr = child.stderr.take().expect("stderr");
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let pid = child.id() as i32;
        // Each retry starts the task over: its bound grows by an attempt's share.
        let (first_bound, per_retry) = (self.bound(0), self.bound(1) - self.bound(0));
        let restarts = Arc::new(AtomicU64::new(0));
        // The watchdog: a task past its bound is stuck; its exec is killed.
        let stuck = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let stuck = stuck.clone();
            let restarts = restarts.clone();
            let finished = Arc::new(AtomicBool::new(false));
            let done = finished.clone();
            let thread = std::thread::spawn(move || {
                let deadline =
                    || started + first_bound + per_retry * restarts.load(Ordering::SeqCst) as u32;
                while Instant::now() < deadline() && !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                if !done.load(Ordering::SeqCst) {
                    stuck.store(true, Ordering::SeqCst);
                    // SAFETY: killing our own child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            });
            (finished, thread)
        };
        let mut check = Check::new(self.id);
        let (mut stalls, mut slow_stretches) = (0u64, 0u64);
        let mut episodes = self.episodes.iter().peekable();
        let mut slow_until = 0u64;
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut last_line_at = Instant::now();
        for line in stdout.split(b'\n') {
            let Ok(line) = line else { break };
            let now = Instant::now();
            if let Some(back) = *shared.coordinator_back_at.lock().unwrap() {
                // A reader waiting since before the coordinator came back.
                if last_line_at < back && now >= back {
                    shared
                        .report
                        .lock()
                        .unwrap()
                        .return_to_byte_ms
                        .push((now - back).as_millis() as u64);
                }
            }
            last_line_at = now;
            check.line(&line);
            restarts.store(check.restarts, Ordering::SeqCst);
            // Each episode once, in whichever attempt first reaches its line.
            while let Some((_, episode)) = episodes.next_if(|(at, _)| check.next >= *at) {
                match *episode {
                    Episode::Slow { lines } => {
                        slow_stretches += 1;
                        slow_until = check.next + lines;
                    }
                    Episode::Stall(pause) => {
                        stalls += 1;
                        std::thread::sleep(pause);
                    }
                }
            }
            if check.next < slow_until && check.next.is_multiple_of(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let status = child.wait();
        watchdog.0.store(true, Ordering::SeqCst);
        let _ = watchdog.1.join();
        let errors = errors.join().unwrap_or_default();
        let mut report = shared.report.lock().unwrap();
        report.tasks += 1;
        *report.faults.entry("slow reader").or_default() += slow_stretches;
        *report.faults.entry("stalled reader").or_default() += stalls;
        report.lines += check.verified_lines;
        report.bytes += check.verified_bytes;
        let retries = errors.matches("running it again on").count() as u64;
        report.retried += u64::from(retries > 0);
        for held in errors.lines().filter_map(held_at_resume) {
            report.largest_held = report.largest_held.max(held);
        }
        let id = self.id;
        let tail = || errors.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        if stuck.load(Ordering::SeqCst) {
            report.violations.push(format!(
                "w{id}: stuck past its bound of {:?} at line {}: {}",
                first_bound + per_retry * check.restarts as u32,
                check.next,
                tail()
            ));
            return;
        }
        if let Some(problem) = check.problem {
            report.violations.push(format!("w{id}: {problem}"));
        }
        if check.restarts > retries {
            report.violations.push(format!(
                "w{id}: output started over {} times with {retries} retries said",
                check.restarts
            ));
        }
        if check.next != self.lines {
            report.violations.push(format!(
                "w{id}: {} of {} lines: {}",
                check.next,
                self.lines,
                tail()
            ));
        }
        match status.ok().and_then(|s| s.code()) {
            Some(code) if code == self.code => {}
            other => report.violations.push(format!(
                "w{id}: exit {other:?}, the task's was {}: {}",
                self.code,
                tail()
            )),
        }
    }
}

/// `skyward: task 0: node-3 back after 5s; resumed with 3.2 MiB of output it held`: the bytes.
fn held_at_resume(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once("resumed with ")?;
    let (amount, _) = rest.split_once(" of output it held")?;
    let (value, unit) = amount.split_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((value * scale) as u64)
}

/// Checks one task's lines as they come: its id, the next sequence number (or 0: a retry
/// starting over), the running checksum.
struct Check {
    id: u64,
    next: u64,
    checksum: u64,
    restarts: u64,
    verified_lines: u64,
    verified_bytes: u64,
    problem: Option<String>,
}

impl Check {
    fn new(id: u64) -> Check {
        Check {
            id,
            next: 0,
            checksum: 0,
            restarts: 0,
            verified_lines: 0,
            verified_bytes: 0,
            problem: None,
        }
    }

    fn line(&mut self, line: &[u8]) {
        if self.problem.is_some() {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let mut fields = text.split(' ');
        let (Some(id), Some(seq), Some(sum), Some(pad), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            self.problem = Some(format!(
                "a line never printed, after line {}: {text:.80}",
                self.next
            ));
            return;
        };
        let seq: Option<u64> = seq.parse().ok();
        if seq == Some(0) && self.next > 0 {
            // An attempt run again elsewhere starts over.
            self.restarts += 1;
            self.next = 0;
            self.checksum = 0;
        }
        let expected = (self.checksum.wrapping_mul(1_000_003)).wrapping_add(self.next + self.id);
        let good = id == format!("w{}", self.id)
            && seq == Some(self.next)
            && sum == format!("{expected:016x}")
            && pad.bytes().all(|b| b == b'x');
        if !good {
            self.problem = Some(format!(
                "line {} was wrong (lost, repeated or out of order): {text:.80}",
                self.next
            ));
            return;
        }
        self.checksum = expected;
        self.next += 1;
        self.verified_lines += 1;
        self.verified_bytes += line.len() as u64 + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: u64, seq: u64, sum: u64) -> Vec<u8> {
        format!("w{id} {seq} {sum:016x} xxx").into_bytes()
    }

    /// The checker accepts exactly the generator's stream: a missing, repeated or altered
    /// line is a violation; a retry starting over is counted, not one.
    #[test]
    fn the_checker_catches_a_lost_a_repeated_and_an_altered_line() {
        let sums = |id: u64, n: u64| {
            let mut c = 0u64;
            (0..n)
                .map(|i| {
                    c = c.wrapping_mul(1_000_003).wrapping_add(i + id);
                    c
                })
                .collect::<Vec<_>>()
        };
        let s = sums(7, 4);
        let mut good = Check::new(7);
        for (i, sum) in s.iter().enumerate() {
            good.line(&line(7, i as u64, *sum));
        }
        assert!(good.problem.is_none());
        assert_eq!(good.next, 4);
        let mut lost = Check::new(7);
        lost.line(&line(7, 0, s[0]));
        lost.line(&line(7, 2, s[2]));
        assert!(lost.problem.is_some());
        let mut repeated = Check::new(7);
        repeated.line(&line(7, 0, s[0]));
        repeated.line(&line(7, 1, s[1]));
        repeated.line(&line(7, 1, s[1]));
        assert!(repeated.problem.is_some());
        let mut altered = Check::new(7);
        altered.line(&line(7, 0, s[0] ^ 1));
        assert!(altered.problem.is_some());
        let mut retried = Check::new(7);
        retried.line(&line(7, 0, s[0]));
        retried.line(&line(7, 1, s[1]));
        retried.line(&line(7, 0, s[0]));
        assert!(retried.problem.is_none());
        assert_eq!(retried.restarts, 1);
        assert_eq!(
            held_at_resume(
                "skyward: task 0: node-3 back after 5s; resumed with 3.5 MiB of output it held"
            ),
            Some(3_670_016)
        );
    }
}
