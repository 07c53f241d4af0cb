//! The table, the verdicts and BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::footprint::{self, mb, Footprint, CLI_NODES, CLI_SAMPLE_AT, CLI_SLEEP_S};
use crate::stats::{median_duration, micros, thousands, Latency, Pairs};
use crate::{COLD_RUNS, IN_FLIGHT, MANY, PAIRS, PIPELINED, SEQUENTIAL, WARMUP};

/// Targets from the issue.
const TARGET_P50_US: f64 = 250.0;
const TARGET_TASKS_PER_S: f64 = 30_000.0;
const TARGET_COLD: Duration = Duration::from_secs(1);
const TARGET_RATIO: f64 = 2.0;
/// The performance issue's stricter dispatch targets: the round trip within 1.5x of bare
/// quinn's, pipelined throughput at least 80% of bare quinn's.
const TARGET_ROUND_TRIP_RATIO: f64 = 1.5;
const TARGET_THROUGHPUT_SHARE: f64 = 0.8;
/// The performance issue's targets (stricter than the core issue's 10 MB and 20 MB).
const TARGET_AGENT_BINARY_MB: f64 = 8.0;
const TARGET_AGENT_RSS_MB: f64 = 15.0;
/// Percent of one core; informational in this issue.
const TARGET_AGENT_CPU_PERCENT: f64 = 0.5;
/// A cold `.ci/run` (empty target dir, 2 cores) must leave room under CI's 90-minute limit.
const TARGET_CI_COLD_MINUTES: u64 = 60;
/// The step name `scripts/cold-cost.sh ci` records.
const CI_STEP: &str = ".ci/run";

pub struct Results {
    pub sky_latency: Latency,
    pub bare_latency: Latency,
    /// Pipelined tasks (requests) per second, Skyward paired with bare quinn: 1 agent (peer)
    /// and [`MANY`].
    pub one: Pairs,
    pub many: Pairs,
    /// The typed no-op ([`crate::skyward::TypedNoop`]) on 1 agent, beside the bare figures,
    /// and pipelined on [`MANY`].
    pub typed_latency: Latency,
    pub typed_one: Pairs,
    pub typed_many: Pairs,
    /// The same declared never to block ([`crate::skyward::TypedInPlaceNoop`]).
    pub typed_in_place_latency: Latency,
    pub typed_in_place_one: Pairs,
    pub typed_in_place_many: Pairs,
    /// Counted cold runs (the warm-up excluded).
    pub cold: Vec<Duration>,
    pub cold_warmup: Duration,
    pub footprint: Footprint,
    /// Ray and SSH, measured in the same run.
    pub peers: crate::peers::PeerResults,
    /// 1 GiB transfers beside scp, rsync and bare quinn.
    pub bulk: crate::bulk::BulkResults,
    /// A no-op broadcast to pools of growing size.
    pub fan_out: Vec<crate::fanout::FanOut>,
    /// Swarms of in-process agents: fan-out at 1,000 and the coordinator's cost at 10,000.
    pub swarms: Vec<crate::swarm::Scale>,
    /// A cloud node's bootstrap script, from its start to the agent connected.
    pub boot: crate::boot::Boot,
}

impl Results {
    fn cold_median(&self) -> Duration {
        median_duration(&self.cold)
    }

    fn cold_max(&self) -> Duration {
        self.cold.iter().copied().max().unwrap_or_default()
    }

    /// How many times slower Skyward is than bare quinn, per compared row.
    fn ratios(&self) -> [(&'static str, f64); 4] {
        [
            (
                "p50 round trip",
                latency_ratio(self.sky_latency.p50, self.bare_latency.p50),
            ),
            (
                "p99 round trip",
                latency_ratio(self.sky_latency.p99, self.bare_latency.p99),
            ),
            ("1-agent throughput", self.one.slowdown()),
            ("many-agent throughput", self.many.slowdown()),
        ]
    }
}

pub(crate) fn latency_ratio(sky: Duration, bare: Duration) -> f64 {
    sky.as_secs_f64() / bare.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// A results row comparing a latency with bare quinn's.
fn latency_row(what: &str, sky: Duration, bare: Duration, target: String) -> [String; 5] {
    [
        what.into(),
        us(sky),
        us(bare),
        format!("{:.2}x", latency_ratio(sky, bare)),
        target,
    ]
}

/// A results row comparing pipelined throughput with bare quinn's: the medians of each side's
/// runs, and the median of the pairs' ratios.
fn throughput_row(what: String, pairs: &Pairs, target: String) -> [String; 5] {
    [
        what,
        per_s(pairs.sky_median()),
        per_s(pairs.peer_median()),
        format!("{:.2}x", pairs.slowdown()),
        target,
    ]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", micros(d))
}

fn per_s(v: f64) -> String {
    format!("{}/s", thousands(v))
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// The table, as Markdown (which also reads fine in a terminal).
pub fn table(r: &Results) -> String {
    let ratios = r.ratios();
    let share_target = format!("≥ {:.0}% of bare", TARGET_THROUGHPUT_SHARE * 100.0);
    let builtin_target = format!("≥ {}/s; {share_target}", thousands(TARGET_TASKS_PER_S));
    let rows: Vec<[String; 5]> = vec![
        [
            "no-op round trip p50, 1 agent".into(),
            us(r.sky_latency.p50),
            us(r.bare_latency.p50),
            format!("{:.2}x", ratios[0].1),
            format!("≤ {TARGET_P50_US:.0} µs; ≤ {TARGET_ROUND_TRIP_RATIO}x bare"),
        ],
        [
            "no-op round trip p99, 1 agent".into(),
            us(r.sky_latency.p99),
            us(r.bare_latency.p99),
            format!("{:.2}x", ratios[1].1),
            format!("≤ {TARGET_RATIO:.0}x bare"),
        ],
        throughput_row(
            format!("pipelined no-op, 1 agent, {IN_FLIGHT} in flight"),
            &r.one,
            builtin_target.clone(),
        ),
        throughput_row(
            format!("pipelined no-op, {MANY} agents, {IN_FLIGHT} in flight"),
            &r.many,
            builtin_target,
        ),
        latency_row(
            "typed no-op round trip p50, 1 agent",
            r.typed_latency.p50,
            r.bare_latency.p50,
            format!("≤ {TARGET_ROUND_TRIP_RATIO}x bare"),
        ),
        latency_row(
            "typed no-op round trip p99, 1 agent",
            r.typed_latency.p99,
            r.bare_latency.p99,
            "—".into(),
        ),
        throughput_row(
            format!("pipelined typed no-op, 1 agent, {IN_FLIGHT} in flight"),
            &r.typed_one,
            share_target.clone(),
        ),
        throughput_row(
            format!("pipelined typed no-op, {MANY} agents, {IN_FLIGHT} in flight"),
            &r.typed_many,
            share_target.clone(),
        ),
        latency_row(
            "typed no-op run in place, round trip p50",
            r.typed_in_place_latency.p50,
            r.bare_latency.p50,
            format!("≤ {TARGET_ROUND_TRIP_RATIO}x bare"),
        ),
        throughput_row(
            format!("pipelined typed no-op run in place, 1 agent, {IN_FLIGHT} in flight"),
            &r.typed_in_place_one,
            share_target.clone(),
        ),
        throughput_row(
            format!("pipelined typed no-op run in place, {MANY} agents, {IN_FLIGHT} in flight"),
            &r.typed_in_place_many,
            share_target,
        ),
        [
            format!("cold `skyward run --nodes {MANY} --on all -- true`, median"),
            secs(r.cold_median()),
            "—".into(),
            "—".into(),
            format!("≤ {} s", TARGET_COLD.as_secs()),
        ],
        [
            format!("cold `skyward run --nodes {MANY} --on all -- true`, max"),
            secs(r.cold_max()),
            "—".into(),
            "—".into(),
            "—".into(),
        ],
    ];
    render(
        ["measurement", "skyward", "bare quinn", "ratio", "target"],
        &rows,
    )
}

/// A Markdown table with padded columns.
pub fn render<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |", padded.join(" | "))
    };
    let mut out = String::new();
    out.push_str(&line(&header.map(String::from)));
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&format!("|-{}-|", rule.join("-|-")));
    for row in rows {
        out.push('\n');
        out.push_str(&line(row));
    }
    out
}

fn megabytes(bytes: u64) -> String {
    format!("{:.2} MB", mb(bytes))
}

fn percent(value: f64) -> String {
    format!("{value:.2}%")
}

/// The footprint table.
pub fn footprint_table(f: &Footprint) -> String {
    let rows: Vec<[String; 3]> = vec![
        [
            "`skyward-agent` binary, stripped release".into(),
            megabytes(f.agent_binary_bytes),
            format!("≤ {TARGET_AGENT_BINARY_MB:.0} MB"),
        ],
        [
            format!(
                "agent idle RSS (VmRSS), 1-agent pool, {} s after connecting",
                footprint::SETTLE.as_secs()
            ),
            megabytes(f.agent_rss_bytes),
            format!("≤ {TARGET_AGENT_RSS_MB:.0} MB"),
        ],
        [
            format!(
                "agent idle CPU (utime+stime) over {} s, % of one core",
                footprint::CPU_WINDOW.as_secs()
            ),
            percent(f.agent_cpu_percent()),
            format!("< {TARGET_AGENT_CPU_PERCENT}% (informational)"),
        ],
        [
            format!("`skyward` CLI RSS (VmRSS), {CLI_NODES} local nodes up and idle"),
            megabytes(f.cli_rss_bytes),
            "— (informational)".into(),
        ],
        [
            String::from("`skyward` CLI peak RSS (VmHWM), read at the same moment"),
            megabytes(f.cli_hwm_bytes),
            "— (informational)".into(),
        ],
    ];
    let cold = cold_costs().into_iter().map(|c| {
        [
            format!(
                "cold `{}`: fresh clone, empty target dir, {} cores ({}, {})",
                c.step, c.cores, c.commit, c.date
            ),
            format!(
                "{}m{:02}s, peak {:.1} GB",
                c.seconds / 60,
                c.seconds % 60,
                c.peak_kib as f64 / 1_048_576.0
            ),
            if c.step == CI_STEP {
                format!("≤ {TARGET_CI_COLD_MINUTES} min (CI's limit: 90)")
            } else {
                "— (informational)".into()
            },
        ]
    });
    let rows: Vec<[String; 3]> = rows.into_iter().chain(cold).collect();
    render(["footprint", "measured", "target"], &rows)
}

/// One cold build or run, as `scripts/cold-cost.sh` measured it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdCost {
    pub step: String,
    pub seconds: u64,
    pub peak_kib: u64,
    pub commit: String,
    pub date: String,
    pub cores: u32,
}

/// The cold costs recorded in `bench/cold-costs.tsv` (a 20-minute cold build is no part of a
/// bench run: `scripts/cold-cost.sh` measures it from a fresh clone and records it there).
pub fn cold_costs() -> Vec<ColdCost> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("cold-costs.tsv");
    parse_cold_costs(&std::fs::read_to_string(path).unwrap_or_default())
}

/// Tab-separated rows: step, seconds, peak KiB, commit, date, cores; `#` starts a comment.
pub fn parse_cold_costs(text: &str) -> Vec<ColdCost> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let [step, seconds, peak_kib, commit, date, cores] = f.as_slice() else {
                return None;
            };
            Some(ColdCost {
                step: step.to_string(),
                seconds: seconds.parse().ok()?,
                peak_kib: peak_kib.parse().ok()?,
                commit: commit.to_string(),
                date: date.to_string(),
                cores: cores.parse().ok()?,
            })
        })
        .collect()
}

/// One line per footprint row.
pub fn footprint_verdicts(f: &Footprint) -> Vec<String> {
    let binary = mb(f.agent_binary_bytes);
    let rss = mb(f.agent_rss_bytes);
    let cpu = f.agent_cpu_percent();
    let ci = cold_costs().into_iter().find(|c| c.step == CI_STEP).map(|c| {
        format!(
            "- cold `.ci/run` ≤ {TARGET_CI_COLD_MINUTES} min on {} cores: **{}** ({}m{:02}s at {}).",
            c.cores,
            met(c.seconds <= TARGET_CI_COLD_MINUTES * 60),
            c.seconds / 60,
            c.seconds % 60,
            c.commit
        )
    });
    let mut verdicts = vec![
        format!(
            "- `skyward-agent` binary ≤ {TARGET_AGENT_BINARY_MB:.0} MB: **{}** ({binary:.2} MB, {} bytes).",
            met(binary <= TARGET_AGENT_BINARY_MB),
            thousands(f.agent_binary_bytes as f64)
        ),
        format!(
            "- idle agent RSS ≤ {TARGET_AGENT_RSS_MB:.0} MB: **{}** ({rss:.2} MB VmRSS; peak VmHWM {:.2} MB).",
            met(rss <= TARGET_AGENT_RSS_MB),
            mb(f.agent_hwm_bytes)
        ),
        format!(
            "- idle agent CPU < {TARGET_AGENT_CPU_PERCENT}% of one core (informational): **{}** ({cpu:.2}%: {} clock ticks in {:.2} s; one tick = {:.2}%).",
            met(cpu < TARGET_AGENT_CPU_PERCENT),
            f.agent_cpu_ticks,
            f.agent_cpu_wall.as_secs_f64(),
            f.agent_cpu_resolution()
        ),
        format!(
            "- `skyward` CLI with {CLI_NODES} local nodes up: {:.2} MB VmRSS, {:.2} MB VmHWM, read {:.2} s after spawn (no target).",
            mb(f.cli_rss_bytes),
            mb(f.cli_hwm_bytes),
            f.cli_sampled_at.as_secs_f64()
        ),
    ];
    verdicts.extend(ci);
    verdicts
}

pub fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

/// One line per target.
pub fn verdicts(r: &Results) -> Vec<String> {
    let p50 = micros(r.sky_latency.p50);
    let (one, many) = (r.one.sky_median(), r.many.sky_median());
    let throughput = match (one >= TARGET_TASKS_PER_S, many >= TARGET_TASKS_PER_S) {
        (true, true) => "met",
        (false, false) => "not met",
        _ => "partly met",
    };
    let ratios = r.ratios();
    let within = ratios.iter().all(|(_, ratio)| *ratio <= TARGET_RATIO);
    // Throughput ratios are bare / skyward: their inverse is Skyward's share of bare's.
    let (share_one, share_many) = (1.0 / ratios[2].1, 1.0 / ratios[3].1);
    let typed = latency_ratio(r.typed_latency.p50, r.bare_latency.p50);
    let typed_in_place = latency_ratio(r.typed_in_place_latency.p50, r.bare_latency.p50);
    let percent = |pairs: &Pairs| pairs.share() * 100.0;
    let shares_met =
        |pairs: [&Pairs; 2]| met(pairs.iter().all(|p| p.share() >= TARGET_THROUGHPUT_SHARE));
    let ratio_detail: Vec<String> = ratios
        .iter()
        .map(|(what, ratio)| format!("{what} {ratio:.2}x"))
        .collect();
    vec![
        format!(
            "- p50 no-op round trip ≤ {TARGET_P50_US:.0} µs: **{}** ({p50:.0} µs).",
            met(p50 <= TARGET_P50_US)
        ),
        format!(
            "- ≥ {} no-op tasks/s pipelined: **{throughput}** ({} tasks/s with 1 agent, {} tasks/s with {MANY} agents).",
            thousands(TARGET_TASKS_PER_S),
            thousands(one),
            thousands(many)
        ),
        format!(
            "- {MANY}-node cold run ≤ {} s: **{}** (median {}, max {} over {} runs).",
            TARGET_COLD.as_secs(),
            met(r.cold_median() <= TARGET_COLD),
            secs(r.cold_median()),
            secs(r.cold_max()),
            r.cold.len()
        ),
        format!(
            "- within {TARGET_RATIO:.0}x of bare quinn (the core issue's target): **{}** ({}).",
            met(within),
            ratio_detail.join(", ")
        ),
        format!(
            "- p50 round trip within {TARGET_ROUND_TRIP_RATIO}x of bare quinn's (the performance issue's): **{}** ({:.2}x).",
            met(ratios[0].1 <= TARGET_ROUND_TRIP_RATIO),
            ratios[0].1
        ),
        format!(
            "- the same for the typed no-op: **{}** ({typed:.2}x on a blocking thread, {typed_in_place:.2}x run in place).",
            met(typed <= TARGET_ROUND_TRIP_RATIO && typed_in_place <= TARGET_ROUND_TRIP_RATIO)
        ),
        format!(
            "- pipelined throughput ≥ {:.0}% of bare quinn's (the performance issue's): **{}** ({:.0}% with 1 agent, {:.0}% with {MANY}).",
            TARGET_THROUGHPUT_SHARE * 100.0,
            met(share_one >= TARGET_THROUGHPUT_SHARE && share_many >= TARGET_THROUGHPUT_SHARE),
            share_one * 100.0,
            share_many * 100.0
        ),
        format!(
            "- the same for the typed no-op: on a blocking thread (a task that may block, the default) **{}** ({:.0}% with 1 agent, {:.0}% with {MANY}); run in place (one declared never to block) **{}** ({:.0}% with 1 agent, {:.0}% with {MANY}).",
            shares_met([&r.typed_one, &r.typed_many]),
            percent(&r.typed_one),
            percent(&r.typed_many),
            shares_met([&r.typed_in_place_one, &r.typed_in_place_many]),
            percent(&r.typed_in_place_one),
            percent(&r.typed_in_place_many)
        ),
    ]
}

/// What the numbers were measured on.
pub struct Machine {
    pub cpus: String,
    pub model: String,
    pub memory: String,
    pub kernel: String,
    pub date: String,
    /// The commit the binaries were built from, and whether the tree had other changes.
    pub source: String,
    /// `/proc/loadavg`'s 1, 5 and 15 minute averages when the run began and ended.
    pub load_before: String,
    pub load_after: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, name: &str| {
            text.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_else(|| "unknown".into())
        };
        let cpus = command_output("nproc", &[]).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "unknown".into())
        });
        let kernel = command_output("uname", &["-r"]).unwrap_or_else(|| "unknown".into());
        Machine {
            cpus,
            model: field(&cpuinfo, "model name"),
            memory: field(&meminfo, "MemTotal"),
            kernel,
            date: utc_now(),
            source: source(),
            load_before: load_average(),
            load_after: String::new(),
        }
    }

    /// Records the load average at the end of the run.
    pub fn finish(&mut self) {
        self.load_after = load_average();
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// `commit abc1234`, noting uncommitted changes outside the benchmark's own files.
fn source() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.to_string_lossy();
    let Some(commit) = command_output("git", &["-C", &root, "rev-parse", "--short", "HEAD"]) else {
        return "unknown (not a git checkout)".into();
    };
    let dirty = command_output(
        "git",
        &[
            "-C",
            &root,
            "status",
            "--porcelain",
            "--",
            ".",
            ":(exclude)bench",
            ":(exclude)BENCHMARKS.md",
        ],
    );
    match dirty {
        Some(changes) => format!(
            "commit {commit} plus uncommitted changes to {} file(s) outside `bench/`",
            changes.lines().count()
        ),
        None => format!("commit {commit}"),
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `YYYY-MM-DD HH:MM UTC`, from the system clock.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `131,000/170,000, ...`: each pair's Skyward and bare quinn figures.
fn pair_list(pairs: &Pairs) -> String {
    pairs
        .sky
        .iter()
        .zip(&pairs.peer)
        .map(|(sky, peer)| format!("{}/{}", thousands(*sky), thousands(*peer)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The whole BENCHMARKS.md.
pub fn markdown(r: &Results, machine: &Machine, table: &str, footprint_table: &str) -> String {
    let mut md = String::new();
    let cold: Vec<String> = r
        .cold
        .iter()
        .map(|d| format!("{:.3}", d.as_secs_f64()))
        .collect();
    let _ = write!(
        md,
        "# Benchmarks

Generated by `skyward-bench` (`bench/`); every number below was measured by one run of it.

## How to run

```sh
scripts/bench.sh   # installs the peers (sshd, rsync, Ray in a venv), builds, runs the suite
```

It runs `cargo build --release` (which builds target/release/skyward and skyward-agent) and
then `cargo run --release -p skyward-bench`, which prints the tables and rewrites this file.
`--no-write` prints the tables without touching this file; `--out PATH` writes elsewhere;
`--strict` fails the run when a peer (Ray, sshd) could not be measured, which is otherwise
written in the table as \"not measured\" with the reason. `--check BENCHMARKS.md` (what CI
runs after the tests) reruns the two dispatch comparisons with bare quinn briefly and fails
when a ratio is more than 25% worse than the one recorded here (or than parity, where the
recorded run had Skyward ahead of bare quinn: noise, since bare quinn is the ceiling). For profiles,
`cargo build --profile profiling --workspace` builds the same optimised code with symbols
and line tables into target/profiling/ (for `perf record` or `valgrind --tool=callgrind`).
Everything runs on 127.0.0.1.

## Results

{table}

Ratio = how many times slower Skyward is than bare quinn (latency: skyward / bare;
throughput: bare / skyward, the median of paired runs' ratios), so ≤ 2.00x means \"within 2x
of bare quinn\".

### Verdicts

{verdicts}

## Side by side with Ray and SSH

{peers_table}

Skyward faster by = the peer's time / Skyward's (throughput: Skyward's / the peer's).

{peers_verdicts}

## Bulk data

{bulk_table}

Ratio = Skyward's speed / the peer's (for the fan-out row: the time to {bulk_nodes} nodes / the
time to 1).

{bulk_verdicts}

{gaps}

## Fan-out

{fan_out_table}

The first sizes are local pools of real `skyward-agent` processes, the swarm rows are
described under Coordinator scale. One round starts a no-op task on every node at once and
ends when the last has finished; for the agent processes, {fan_out_rounds} timed rounds after 3
untimed.

{fan_out_verdicts}

## Coordinator scale

{scale_table}

A swarm is one process running every agent with the real agent code
(`skyward_agent::run_on`, each agent with its own token, key, certificate and connection,
{per_address} agents per loopback address and UDP socket, started 500 a second); the coordinator
runs in a process of its own (`skyward-bench swarm-coordinator`), so that `/proc` shows its
CPU time and memory alone. At rest = {rest} s after the last agent connected, CPU over the
next {rest_window} s; broadcasts = {rounds} timed no-op broadcasts to every agent after {warmup_rounds} untimed
(their times are the fan-out table's swarm rows). MB = 10^6 bytes.

{scale_verdicts}

## Time to ready on a node

{boot_table}

Each boot runs the real user-data script (`deploy/bootstrap.sh`, as the coordinator fills it
in) on the test harness's simulated machine (`skyward_tests::node::BootedNode`: its own
directory, the fakes of a cloud image's tools, loopback network), with a coordinator in the
bench process; timed from the script's start until the coordinator has the node connected.
The stock image fetches the agent from the coordinator over HTTPS, checked against the pool
CA. {boots} boots of each; median and max.

{boot_verdicts}

## Footprint

{footprint_table}

MB = 10^6 bytes. Read from `/proc` by the bench, after the measurements above. The cold rows
come from `scripts/cold-cost.sh` (kept in `bench/cold-costs.tsv`): wall time from a fresh clone
with nothing beside it and an empty target dir, and the peak of the machine's memory in use
above where it started (GB = 2^30 bytes); `scripts/test.sh` runs right after the build, as a
user's would. The two `-p skyward` rows are the library crate alone, as a program that uses it
builds it (`scripts/cold-cost.sh library`): with one HTTP provider (`--no-default-features
--features verda`) it skips the AWS SDK, which is most of the full build's time and memory.

### Verdicts

{footprint_verdicts}

## Machine

- CPUs (`nproc`): {cpus}
- CPU model: {model}
- Memory (MemTotal): {memory}
- Kernel (`uname -r`): {kernel}
- Date: {date}
- Source: {source}
- Load average (1/5/15 min) when the run began: {load_before}; when it ended: {load_after}.
  Other work on the machine during the run moves these numbers; compare runs only with
  similar load.

## What is measured

- **No-op round trip**: a local pool of 1 real `skyward-agent` process (`Pool::up` with
  `LocalProvider`), the coordinator in the bench process. One task = `start_task` with
  `TaskSpec::noop(0)` (a new QUIC stream, the `Start` frame), then `TaskOutput::next` until
  `None` (the `Finished` frame, checked to be exit code 0). {WARMUP} warm-up tasks, then
  {SEQUENTIAL} timed sequential tasks; nearest-rank p50 / p99.
- **Pipelined no-op**: {PIPELINED} no-op tasks with {IN_FLIGHT} in flight (a tokio `JoinSet`),
  round-robin over the pool's nodes, with 1 and with {MANY} agents; tasks/s over the whole
  batch. {PAIRS} runs, each followed at once by a bare quinn run over as many peer
  connections: a pair shares the machine's state of the moment. The table gives each side's
  median run and the median of the pairs' ratios, which the verdicts judge (runs as
  Skyward/bare quinn tasks/s: 1 agent {one}; {MANY} agents {many}).
- **Typed no-op**: the same counts ({WARMUP} + {SEQUENTIAL} sequential; {PAIRS} pipelined
  runs of {PIPELINED} with {IN_FLIGHT} in flight, each paired with a 1-peer bare quinn run:
  {typed_one} on a blocking thread, {typed_in_place_one} in place) on a pool of 1 agent that is this bench run as
  `typed-agent` (the stock agent program with its `TypedNoop` and `TypedInPlaceNoop` tasks
  registered, started through a wrapper script): `TaskKind::Typed` with the encoded unit
  value, answered with `Finished` (the encoded `()` is empty: no `Result` piece). `TypedNoop`
  may block, as a task does by default, so the agent runs it on its task threads;
  `TypedInPlaceNoop` declares `BLOCKING = false` and runs in place, on the agent's async
  threads. Their round-trip ratios are to the bare quinn p50 above, measured earlier in the
  same run. Then {PAIRS} pipelined runs of each on a pool of {MANY} such agents, each paired
  with a bare quinn run over {MANY} peers ({typed_many} on a blocking thread,
  {typed_in_place_many} in place).
- **Cold end-to-end**: `target/release/skyward run --nodes {MANY} --on all -- true` from process
  spawn to exit (exit status 0 asserted), `SKYWARD_HOME` in a fresh temp dir. {COLD_RUNS} runs,
  the first a warm-up ({warmup:.3} s, not counted); counted runs in seconds: {cold}.
- **Bare quinn baseline** (same run, alternating with the Skyward measurements): a server
  endpoint with `transport::server_config` and a certificate from `PoolCa::issue_server_cert`,
  and echo peers in separate processes (this binary run as `echo-peer`, 2 tokio workers like
  the agent) connecting with `transport::client_config(pin, Some(node cert signed by the same
  CA), ALPN_NODE)` through `transport::endpoint`. As in Skyward, the server side opens one
  bidirectional stream per request (the coordinator opens task streams towards the agent):
  32 bytes out, stream finished, 32 bytes echoed back. Same counts: {WARMUP} + {SEQUENTIAL}
  sequential; {PIPELINED} with {IN_FLIGHT} in flight over 1 and over {MANY} peer connections,
  paired with Skyward's runs as above.
- The bench process uses a 2-worker tokio runtime, as the `skyward` CLI does. While one
  side is measured the other side's processes sit idle (the {MANY} echo peers stay connected
  throughout; the Skyward pools are brought up one at a time).
- With few CPUs the coordinator, the agents and the peers share cores, so the multi-agent
  rows measure contention between processes as much as fan-out across nodes.
- **Binary size**: the file size of `target/release/skyward-agent` (the release profile strips
  symbols).
- **Idle agent**: a fresh local pool of 1 agent (`Pool::up` with `LocalProvider`, as above),
  the agent's pid found by scanning `/proc/*/cmdline` for an `argv[0]` ending in
  `skyward-agent` with the pool's work-dir root in its arguments. Once `Pool::up` has returned
  (agent connected) and {settle} s more of idleness, `VmRSS` (and `VmHWM`) from
  `/proc/<pid>/status`; then utime + stime from `/proc/<pid>/stat` before and after
  {window} s of idleness, divided by the wall time between the two reads, in percent of one
  core. `/proc` counts CPU time in clock ticks ({ticks}/s here), so the resolution is one tick
  over the window.
- **CLI memory**: `target/release/skyward run --nodes {CLI_NODES} --on one -- sleep {CLI_SLEEP_S}`
  with `SKYWARD_HOME` in the temp dir; once `/proc` shows its {CLI_NODES} agents (under that
  `SKYWARD_HOME`) and at least {sample_at:.1} s after spawn, `VmRSS` and `VmHWM` of the CLI
  process (which hosts the coordinator); the run is then awaited and must exit with 0 and
  leave no agent behind.
{peers_method}{bulk_method}",
        verdicts = verdicts(r).join("\n"),
        peers_table = crate::peer_report::dispatch_table(r),
        peers_verdicts = crate::peer_report::dispatch_verdicts(r).join("\n"),
        peers_method = crate::peer_report::dispatch_method(r),
        bulk_table = crate::peer_report::bulk_table(r),
        bulk_verdicts = crate::peer_report::bulk_verdicts(r).join("\n"),
        bulk_method = crate::peer_report::bulk_method(r),
        bulk_nodes = crate::bulk::BULK_NODES,
        gaps = crate::peer_report::GAPS,
        fan_out_table = crate::fanout::table(&r.fan_out, &r.swarms),
        fan_out_rounds = crate::fanout::ROUNDS,
        fan_out_verdicts = crate::fanout::verdicts(&r.swarms).join("\n"),
        scale_table = crate::swarm::table(&r.swarms),
        boot_table = crate::boot::table(&r.boot),
        boot_verdicts = crate::boot::verdicts(&r.boot).join("\n"),
        boots = crate::boot::BOOTS,
        scale_verdicts = crate::swarm::verdicts(&r.swarms).join("\n"),
        per_address = crate::swarm::AGENTS_PER_ADDRESS,
        rest = crate::swarm::SETTLE.as_secs(),
        rest_window = crate::swarm::REST_WINDOW.as_secs(),
        warmup_rounds = crate::swarm::BROADCAST_WARMUP,
        rounds = crate::swarm::BROADCAST_ROUNDS,
        WARMUP = thousands(WARMUP as f64),
        SEQUENTIAL = thousands(SEQUENTIAL as f64),
        PIPELINED = thousands(PIPELINED as f64),
        cpus = machine.cpus,
        model = machine.model,
        memory = machine.memory,
        kernel = machine.kernel,
        date = machine.date,
        source = machine.source,
        load_before = machine.load_before,
        load_after = machine.load_after,
        one = pair_list(&r.one),
        many = pair_list(&r.many),
        typed_one = pair_list(&r.typed_one),
        typed_in_place_one = pair_list(&r.typed_in_place_one),
        typed_many = pair_list(&r.typed_many),
        typed_in_place_many = pair_list(&r.typed_in_place_many),
        warmup = r.cold_warmup.as_secs_f64(),
        cold = cold.join(", "),
        footprint_verdicts = footprint_verdicts(&r.footprint).join("\n"),
        settle = footprint::SETTLE.as_secs(),
        window = footprint::CPU_WINDOW.as_secs(),
        ticks = r.footprint.clock_ticks,
        sample_at = CLI_SAMPLE_AT.as_secs_f64(),
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }

    #[test]
    fn table_and_verdicts_render() {
        let lat = |p50, p99| Latency {
            p50: Duration::from_micros(p50),
            p99: Duration::from_micros(p99),
        };
        let pairs = |runs: &[(f64, f64)]| {
            let mut pairs = Pairs::default();
            for (sky, bare) in runs {
                pairs.push(*sky, *bare);
            }
            pairs
        };
        let r = Results {
            sky_latency: lat(200, 400),
            bare_latency: lat(80, 300),
            one: pairs(&[
                (20_000.0, 40_000.0),
                (25_000.0, 40_000.0),
                (22_000.0, 40_000.0),
            ]),
            many: pairs(&[(35_000.0, 50_000.0); 3]),
            typed_latency: lat(240, 500),
            typed_one: pairs(&[(18_000.0, 40_000.0); 3]),
            typed_many: pairs(&[(30_000.0, 50_000.0); 3]),
            typed_in_place_latency: lat(120, 300),
            typed_in_place_one: pairs(&[(27_000.0, 40_000.0); 3]),
            typed_in_place_many: pairs(&[(45_000.0, 50_000.0); 3]),
            cold: vec![
                Duration::from_millis(800),
                Duration::from_millis(1200),
                Duration::from_millis(900),
            ],
            cold_warmup: Duration::from_millis(1500),
            footprint: Footprint {
                agent_binary_bytes: 5_010_368,
                agent_rss_bytes: 8_192 * 1024,
                agent_hwm_bytes: 9_000 * 1024,
                agent_cpu_ticks: 1,
                clock_ticks: 100,
                agent_cpu_wall: Duration::from_secs(5),
                cli_rss_bytes: 30_000 * 1024,
                cli_hwm_bytes: 31_000 * 1024,
                cli_sampled_at: Duration::from_millis(2_500),
            },
            peers: crate::peers::PeerResults {
                sky_true: lat(900, 1500),
                true_one: vec![800.0; 3],
                true_many: vec![1_200.0; 3],
                ssh_true: Ok(vec![Duration::from_millis(300); 3]),
                ray: Err("Ray is not installed".into()),
            },
            fan_out: vec![crate::fanout::FanOut {
                nodes: 100,
                latency: lat(40_000, 90_000),
            }],
            swarms: Vec::new(),
            boot: crate::boot::Boot {
                preinstalled: vec![Duration::from_millis(400); 3],
                downloaded: vec![Duration::from_millis(900); 3],
            },
            bulk: crate::bulk::BulkResults {
                scan: vec![Duration::from_secs(1); 3],
                upload_one: vec![Duration::from_secs(3); 3],
                upload_many: vec![Duration::from_secs(9); 3],
                download: vec![Duration::from_secs(4); 3],
                bare: vec![Duration::from_secs(2); 3],
                tls: vec![Duration::from_secs(1); 3],
                scp: Ok(vec![Duration::from_secs(4); 3]),
                rsync: Err("rsync is not installed".into()),
            },
        };
        let t = table(&r);
        assert!(t.contains("| 200 µs"), "{t}");
        assert!(t.contains("22,000/s"), "{t}");
        let typed = t
            .lines()
            .find(|l| l.contains("typed no-op round trip p50"))
            .unwrap_or_default();
        assert!(
            typed.contains("| 240 µs") && typed.contains("| 3.00x"),
            "{t}"
        );
        let v = verdicts(&r).join("\n");
        assert!(v.contains("≤ 250 µs: **met** (200 µs)"), "{v}");
        assert!(v.contains("**partly met**"), "{v}");
        assert!(v.contains("**met** (median 0.900 s, max 1.200 s"), "{v}");
        assert!(
            v.contains("within 2x of bare quinn (the core issue's target): **not met**"),
            "{v}"
        );
        assert!(v.contains("p50 round trip within 1.5x of bare quinn's (the performance issue's): **not met** (2.50x)"), "{v}");
        assert!(v.contains("pipelined throughput ≥ 80% of bare quinn's (the performance issue's): **not met** (55% with 1 agent, 70% with 8)"), "{v}");
        let ft = footprint_table(&r.footprint);
        assert!(ft.contains("| 5.01 MB"), "{ft}");
        assert!(ft.contains("| 0.20%"), "{ft}");
        let fv = footprint_verdicts(&r.footprint).join("\n");
        assert!(
            fv.contains("≤ 8 MB: **met** (5.01 MB, 5,010,368 bytes)"),
            "{fv}"
        );
        assert!(fv.contains("≤ 15 MB: **met** (8.39 MB VmRSS"), "{fv}");
        let fan = crate::fanout::table(&r.fan_out, &r.swarms);
        let row = fan
            .lines()
            .find(|l| l.contains("100 agents"))
            .unwrap_or_default();
        assert!(
            row.contains("| 40.0 ms") && row.contains("| 90.0 ms"),
            "{fan}"
        );
        let fan_verdicts = crate::fanout::verdicts(&r.swarms).join("\n");
        assert!(
            fan_verdicts.contains("1000 agents ≤ 250 ms: **not measured**"),
            "{fan_verdicts}"
        );
        assert!(
            fv.contains("**met** (0.20%: 1 clock ticks in 5.00 s"),
            "{fv}"
        );
        assert!(fv.contains("30.72 MB VmRSS"), "{fv}");
        let md = markdown(&r, &Machine::probe(), &t, &ft);
        assert!(md.contains("## Machine"));
        assert!(md.contains("## Footprint"));
        assert!(md.contains(&ft));
        assert!(
            md.contains("not measured: Ray is not installed"),
            "an unmeasured peer is named in the table: {md}"
        );
        assert!(
            md.contains("`ssh host true` ≥ 50x: **met** (333.3x)"),
            "{md}"
        );
        assert!(md.contains("vs `scp` ≥ 1x: **met** (1.00x)"), "{md}");
        assert!(
            md.contains("vs bare quinn ≥ 0.8x: **not met** (0.67x)"),
            "{md}"
        );
        assert!(md.contains("time < 2x: **not met** (3.00x)"), "{md}");
        assert!(md.contains("`rsync -e ssh`: **not measured**"), "{md}");
        assert!(md.contains("| TCP+TLS 2.00x"), "{md}");
        assert!(
            md.contains("| pipelined `true` commands, 8 agents, 256 in flight | 1,200/s"),
            "{md}"
        );
        assert!(
            v.contains(
                "run in place (one declared never to block) **not met** (68% with 1 agent, 90% with 8)"
            ),
            "{v}"
        );
        assert!(
            md.contains("| 0.67x "),
            "a bulk ratio has two decimals: {md}"
        );
    }

    #[test]
    fn cold_costs_parse_rows_and_skip_comments_and_bad_lines() {
        let text = "# step\tseconds\tpeak_kib\tcommit\tdate\tcores\n\
                    cargo build --release\t1180\t8388608\tabc1234\t2026-12-07\t2\n\
                    broken line\n\
                    .ci/run\tnot-a-number\t1\tabc1234\t2026-12-07\t2\n";
        assert_eq!(
            parse_cold_costs(text),
            vec![ColdCost {
                step: "cargo build --release".into(),
                seconds: 1180,
                peak_kib: 8_388_608,
                commit: "abc1234".into(),
                date: "2026-12-07".into(),
                cores: 2,
            }]
        );
    }
}
