//! `skyward-bench`: measures Skyward's dispatch path on loopback against bare quinn with the
//! same TLS setup, and the agent's and the CLI's footprint; prints the tables and writes
//! `BENCHMARKS.md`.
//!
//! Run `cargo build --release` first (it builds `skyward` and `skyward-agent` next to this
//! binary), then `cargo run --release -p skyward-bench`. Every loop is bounded in count and
//! time, and all traffic stays on 127.0.0.1.

mod bare;
mod boot;
mod bulk;
mod check;
mod fanout;
mod footprint;
mod peer_report;
mod peers;
mod report;
mod skyward;
mod stats;
mod swarm;
mod tls;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::report::Results;
use crate::skyward::Noop;
use crate::stats::{Latency, Pairs};

/// Untimed no-op tasks before the sequential measurement.
const WARMUP: usize = 500;
/// Timed sequential round trips.
const SEQUENTIAL: usize = 5_000;
/// Tasks (requests) per pipelined measurement.
const PIPELINED: usize = 20_000;
/// Tasks (requests) outstanding at once in a pipelined measurement.
const IN_FLIGHT: usize = 256;
/// Repetitions of each peer measurement (Ray, ssh); the median is reported.
const REPEATS: usize = 3;
/// Skyward/bare quinn pairs of each pipelined measurement (see [`stats::Pairs`]); odd, so
/// that the median is one pair's.
const PAIRS: usize = 9;
/// Cold `skyward run` invocations; the first is a warm-up and not counted.
const COLD_RUNS: usize = 10;
/// Nodes in the multi-agent measurements and the cold run.
const MANY: usize = 8;

/// Time bounds shared by the measurements.
pub struct Limits {
    /// Longest one measurement phase may take before the benchmark fails.
    pub phase: Duration,
}

const LIMITS: Limits = Limits {
    phase: Duration::from_secs(180),
};

struct Options {
    /// Where the report goes; `None` prints only.
    out: Option<PathBuf>,
    /// Fail when a peer (Ray, sshd) could not be measured.
    strict: bool,
    /// Only the CI's short regression check against the ratios recorded in this file.
    check: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(role @ ("echo-peer" | "sink-peer")) = args.first().map(String::as_str) {
        skyward_common::install_crypto_provider();
        return match bare::peer_main(role, &args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("skyward-bench {role}: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.first().map(String::as_str) == Some("tls-sink-peer") {
        return match tls::peer_main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("skyward-bench tls-sink-peer: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.first().map(String::as_str) == Some("typed-agent") {
        // The stock agent's program with the typed no-ops registered, under its usual name.
        let agent_args = std::iter::once("skyward-agent".to_string()).chain(args[1..].to_vec());
        return skyward_agent::Agent::new()
            .register::<skyward::TypedNoop>()
            .register::<skyward::TypedInPlaceNoop>()
            .run_from_args(agent_args);
    }
    if let Some(role @ ("swarm" | "swarm-coordinator")) = args.first().map(String::as_str) {
        return run_role(role, &args[1..]);
    }
    let options = match parse_options(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("skyward-bench: {e:#}");
            eprintln!(
                "usage: skyward-bench [--out PATH | --no-write] [--strict] | --check BENCHMARKS.md"
            );
            return ExitCode::from(2);
        }
    };
    skyward_common::install_crypto_provider();
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("skyward-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skyward-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The processes of the many-agent measurement (see [`swarm`]).
fn run_role(role: &str, args: &[String]) -> ExitCode {
    skyward_common::install_crypto_provider();
    swarm::init_logging();
    let outcome = runtime().map_err(anyhow::Error::from).and_then(|runtime| {
        runtime.block_on(async {
            match role {
                "swarm" => swarm::swarm_main(args).await,
                _ => swarm::coordinator_main(args).await,
            }
        })
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skyward-bench {role}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The same runtime shape as the `skyward` CLI, which hosts the coordinator.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn parse_options(args: &[String]) -> Result<Options> {
    let default_out = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|root| root.join("BENCHMARKS.md"));
    let mut options = Options {
        out: default_out,
        strict: false,
        check: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => {
                options.out = Some(PathBuf::from(args.next().context("--out needs a path")?))
            }
            "--no-write" => options.out = None,
            "--strict" => options.strict = true,
            "--check" => {
                options.check = Some(PathBuf::from(
                    args.next()
                        .context("--check needs the BENCHMARKS.md to compare with")?,
                ))
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(options)
}

/// `skyward` and `skyward-agent` beside this executable (target/release/).
fn binaries() -> Result<(PathBuf, PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let skyward = exe.with_file_name("skyward");
    let agent = exe.with_file_name("skyward-agent");
    for bin in [&skyward, &agent] {
        if !bin.is_file() {
            bail!(
                "{} not found: run `cargo build --release` first, then `cargo run --release -p skyward-bench`",
                bin.display()
            );
        }
    }
    Ok((exe, skyward, agent))
}

pub(crate) fn progress(message: &str) {
    eprintln!("skyward-bench: {message}");
}

async fn run(options: Options) -> Result<()> {
    let (exe, skyward_bin, agent_bin) = binaries()?;
    if let Some(recorded) = &options.check {
        let scratch = tempfile::Builder::new()
            .prefix("skyward-bench-check-")
            .tempdir()
            .context("creating a temp dir")?;
        return check::run(&exe, &agent_bin, recorded, scratch.path()).await;
    }
    let mut machine = report::Machine::probe();
    progress(&format!("load average at start: {}", machine.load_before));
    let scratch = tempfile::Builder::new()
        .prefix("skyward-bench-")
        .tempdir()
        .context("creating a temp dir")?;
    let results = measure(&exe, &skyward_bin, &agent_bin, scratch.path()).await;
    // Remove the agents' work dirs and the cold runs' SKYWARD_HOME whatever happened.
    let removed = scratch.close();
    let results = results?;
    removed.context("removing the benchmark's temp dir")?;

    machine.finish();
    let table = report::table(&results);
    let footprint_table = report::footprint_table(&results.footprint);
    println!("{table}");
    println!("{}", report::verdicts(&results).join("\n"));
    println!();
    println!("{}", peer_report::dispatch_table(&results));
    println!("{}", peer_report::dispatch_verdicts(&results).join("\n"));
    println!();
    println!("{}", peer_report::bulk_table(&results));
    println!("{}", peer_report::bulk_verdicts(&results).join("\n"));
    println!();
    println!("{}", fanout::table(&results.fan_out, &results.swarms));
    println!("{}", fanout::verdicts(&results.swarms).join("\n"));
    println!();
    println!("{}", swarm::table(&results.swarms));
    println!("{}", swarm::verdicts(&results.swarms).join("\n"));
    println!();
    println!("{}", boot::table(&results.boot));
    println!("{}", boot::verdicts(&results.boot).join("\n"));
    println!();
    println!("{footprint_table}");
    println!(
        "{}",
        report::footprint_verdicts(&results.footprint).join("\n")
    );
    if let Some(out) = options.out {
        let markdown = report::markdown(&results, &machine, &table, &footprint_table);
        std::fs::write(&out, markdown).with_context(|| format!("writing {}", out.display()))?;
        progress(&format!("wrote {}", out.display()));
    }
    if options.strict && peer_report::any_unmeasured(&results) {
        bail!("--strict: a peer could not be measured (see the table)");
    }
    Ok(())
}

async fn measure(
    exe: &Path,
    skyward_bin: &Path,
    agent_bin: &Path,
    scratch: &Path,
) -> Result<Results> {
    let boot = boot::measure(agent_bin, scratch).await?;
    let peers_dir = scratch.join("bare");
    std::fs::create_dir_all(&peers_dir)?;
    progress(&format!(
        "starting the bare quinn baseline with {MANY} echo peers"
    ));
    let baseline = bare::Baseline::start(exe, &peers_dir, MANY).await?;
    let outcome = async {
        let builtin = measure_with_baseline(&baseline, agent_bin, scratch).await?;
        let typed = measure_typed(exe, &baseline, scratch).await?;
        anyhow::Ok((builtin, typed))
    }
    .await;
    baseline.stop().await;
    let ((sky_latency, bare_latency, one, many), [typed, typed_in_place]) = outcome?;

    let sshd = peers::Sshd::start().await.map_err(|e| format!("{e:#}"));
    let peers = peers::measure(agent_bin, scratch, &sshd, REPEATS, &LIMITS).await?;
    let bulk = bulk::measure(exe, agent_bin, scratch, &sshd, &LIMITS).await?;
    drop(sshd);

    let fan_out = fanout::measure(agent_bin, scratch, &LIMITS).await?;
    let swarms = swarm::measure(exe, scratch).await?;

    let home = scratch.join("home");
    std::fs::create_dir_all(&home)?;
    let mut cold = Vec::with_capacity(COLD_RUNS - 1);
    let mut cold_warmup = Duration::ZERO;
    for i in 0..COLD_RUNS {
        let elapsed = skyward::cold_run(skyward_bin, &home, MANY).await?;
        progress(&format!(
            "cold run {}/{COLD_RUNS}{}: {:.3} s",
            i + 1,
            if i == 0 { " (warm-up)" } else { "" },
            elapsed.as_secs_f64()
        ));
        if i == 0 {
            cold_warmup = elapsed;
        } else {
            cold.push(elapsed);
        }
    }

    // Last, with nothing else of the bench's running, so that the idle agent is really idle.
    let footprint = footprint::measure(skyward_bin, agent_bin, scratch).await?;
    Ok(Results {
        sky_latency,
        bare_latency,
        one,
        many,
        typed_latency: typed.latency,
        typed_one: typed.one,
        typed_many: typed.many,
        typed_in_place_latency: typed_in_place.latency,
        typed_in_place_one: typed_in_place.one,
        typed_in_place_many: typed_in_place.many,
        cold,
        cold_warmup,
        footprint,
        peers,
        bulk,
        fan_out,
        swarms,
        boot,
    })
}

type Measured = (Latency, Latency, Pairs, Pairs);

/// Skyward and bare quinn, alternating so that both see the same machine state.
async fn measure_with_baseline(
    baseline: &bare::Baseline,
    agent_bin: &Path,
    scratch: &Path,
) -> Result<Measured> {
    progress("bringing up a local pool of 1 agent");
    let pool = skyward::pool_up(agent_bin, scratch, 1).await?;
    let one = async {
        progress(&format!(
            "sequential no-op round trips: {WARMUP} warm-up + {SEQUENTIAL} timed"
        ));
        let sky_latency =
            skyward::round_trips(&pool, Noop::Builtin, WARMUP, SEQUENTIAL, &LIMITS).await?;
        let bare_latency = baseline.round_trips(WARMUP, SEQUENTIAL, &LIMITS).await?;
        progress(&format!(
            "  skyward p50 {:.0} us p99 {:.0} us; bare quinn p50 {:.0} us p99 {:.0} us",
            stats::micros(sky_latency.p50),
            stats::micros(sky_latency.p99),
            stats::micros(bare_latency.p50),
            stats::micros(bare_latency.p99)
        ));
        let one = pipelined_pairs(&pool, Noop::Builtin, baseline, 1, PAIRS).await?;
        anyhow::Ok((sky_latency, bare_latency, one))
    }
    .await;
    pool.down().await;
    let (sky_latency, bare_latency, one) = one?;

    progress(&format!("bringing up a local pool of {MANY} agents"));
    let pool = skyward::pool_up(agent_bin, scratch, MANY).await?;
    let many = pipelined_pairs(&pool, Noop::Builtin, baseline, MANY, PAIRS).await;
    pool.down().await;
    Ok((sky_latency, bare_latency, one, many?))
}

/// The typed no-ops, on a blocking thread and in place, on a pool of 1 agent that registered
/// them: this executable run as `typed-agent`, through a wrapper script (the local provider
/// starts a program by path). Their pipelined runs are paired with bare quinn runs over as
/// many peers; then the same pipelined runs on a pool of [`MANY`].
async fn measure_typed(
    exe: &Path,
    baseline: &bare::Baseline,
    scratch: &Path,
) -> Result<[TypedMeasured; 2]> {
    use std::os::unix::fs::PermissionsExt;
    let wrapper = scratch.join("typed-agent");
    let quoted = exe.display().to_string().replace('\'', "'\\''");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec '{quoted}' typed-agent \"$@\"\n"),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    progress("bringing up a local pool of 1 agent with the typed no-ops registered");
    let root = scratch.join("typed");
    let pool = skyward::pool_up(&wrapper, &root, 1).await?;
    let measure = |kind: Noop, label: &'static str| {
        let pool = &pool;
        async move {
            let latency = skyward::round_trips(pool, kind, WARMUP, SEQUENTIAL, &LIMITS).await?;
            progress(&format!(
                "  {label} p50 {:.0} us p99 {:.0} us",
                stats::micros(latency.p50),
                stats::micros(latency.p99),
            ));
            let pairs = pipelined_pairs(pool, kind, baseline, 1, PAIRS).await?;
            anyhow::Ok((latency, pairs))
        }
    };
    let measured = async {
        let blocking = measure(Noop::Typed, "typed no-op").await?;
        let in_place = measure(Noop::TypedInPlace, "typed no-op run in place").await?;
        anyhow::Ok([blocking, in_place])
    }
    .await;
    pool.down().await;
    let [(latency, one), (in_place_latency, in_place_one)] = measured?;

    progress(&format!(
        "bringing up a local pool of {MANY} agents with the typed no-ops registered"
    ));
    let pool = skyward::pool_up(&wrapper, &scratch.join("typed-many"), MANY).await?;
    let many = async {
        let blocking = pipelined_pairs(&pool, Noop::Typed, baseline, MANY, PAIRS).await?;
        let in_place = pipelined_pairs(&pool, Noop::TypedInPlace, baseline, MANY, PAIRS).await?;
        anyhow::Ok((blocking, in_place))
    }
    .await;
    pool.down().await;
    let (many, in_place_many) = many?;
    Ok([
        TypedMeasured { latency, one, many },
        TypedMeasured {
            latency: in_place_latency,
            one: in_place_one,
            many: in_place_many,
        },
    ])
}

/// One typed no-op's figures: its round trips on 1 agent, and its pipelined runs paired
/// with bare quinn's, on 1 agent and on [`MANY`].
struct TypedMeasured {
    latency: Latency,
    one: Pairs,
    many: Pairs,
}

/// `pairs` pipelined runs of `kind` on `pool`, each followed at once by bare quinn's over as
/// many peer connections as the pool has nodes.
pub(crate) async fn pipelined_pairs(
    pool: &skyward_coordinator::Pool,
    kind: Noop,
    baseline: &bare::Baseline,
    nodes: usize,
    pairs: usize,
) -> Result<Pairs> {
    let mut measured = Pairs::default();
    for pair in 1..=pairs {
        let sky = skyward::throughput(pool, kind, PIPELINED, IN_FLIGHT, &LIMITS).await?;
        let bare = baseline
            .throughput(nodes, PIPELINED, IN_FLIGHT, &LIMITS)
            .await?;
        progress(&format!(
            "pipelined {kind:?} x{nodes} pair {pair}/{pairs}: skyward {} tasks/s, bare quinn {} req/s",
            stats::thousands(sky),
            stats::thousands(bare)
        ));
        measured.push(sky, bare);
    }
    Ok(measured)
}
