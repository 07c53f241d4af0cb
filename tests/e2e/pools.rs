//! Pools that outlive a command: `skyward pool up`, then `exec`, `pool status`, `logs` and
//! `pool down` from separate CLI processes, against the real background coordinator and
//! real agents.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use skyward_tests::{run, Finished, Sandbox};

const LIMIT: Duration = Duration::from_secs(60);

fn sky(sandbox: &Sandbox, args: &[&str]) -> Finished {
    run(sandbox.skyward().args(args), LIMIT)
}

/// The states of the pool's tasks, by number.
fn task_states(status: &serde_json::Value) -> Vec<(u64, String)> {
    status["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            (
                t["task"].as_u64().expect("number"),
                t["state"].as_str().expect("state").to_string(),
            )
        })
        .collect()
}

/// The pids of local node `node`'s agent (one, unless it is gone).
fn agent_of(sandbox: &Sandbox, node: &str) -> Vec<i32> {
    sandbox
        .processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("skyward-agent") && cmd.contains(&format!("nodes/{node} ")))
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits (until `deadline`) for a map job's first two inputs to end, then stops node-1's
/// agent (SIGSTOP): silent from then on, its machine removed once it is given up.
fn stop_node_1_once_two_inputs_ended(
    sandbox: &Sandbox,
    records: &std::path::Path,
    deadline: Instant,
) {
    while std::fs::read_dir(records).unwrap().count() < 2 {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopped = agent_of(sandbox, "node-1");
    assert_eq!(stopped.len(), 1, "{:?}", sandbox.processes());
    // SAFETY: signalling the agent process found above.
    unsafe {
        libc::kill(stopped[0], libc::SIGSTOP);
    }
}

/// The node each input ran on, as its record says (empty for an input with no record).
fn nodes_that_ran(records: &std::path::Path, inputs: &[String]) -> Vec<String> {
    inputs
        .iter()
        .map(|i| {
            std::fs::read_to_string(records.join(i))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

/// Each node of a `pool status --json` and its state, in rank order.
fn node_states(status: &serde_json::Value) -> Vec<(&str, &str)> {
    status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| (n["node"].as_str().unwrap(), n["state"].as_str().unwrap()))
        .collect()
}

fn no_pools(sandbox: &Sandbox) {
    let out = sky(sandbox, &["pool", "list"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), "no pools", "{out:?}");
}

#[test]
fn a_pool_outlives_its_commands() {
    let sandbox = Sandbox::new();
    let up = sky(&sandbox, &["pool", "up", "demo", "--nodes", "2"]);
    assert_eq!(up.code, Some(0), "{up:?}");
    assert!(up.stderr.contains("pool demo is up (2 nodes)"), "{up:?}");
    let again = sky(&sandbox, &["pool", "up", "demo"]);
    assert_eq!(again.code, Some(2), "{again:?}");
    assert!(again.stderr.contains("already up"), "{again:?}");

    // Past the runtime's idle-thread keep-alive (10 s): local agents die with the thread that
    // started them, so this catches one that was started from a passing thread.
    std::thread::sleep(Duration::from_secs(11));

    let all = sky(
        &sandbox,
        &[
            "exec",
            "demo",
            "--on",
            "all",
            "--",
            "sh",
            "-c",
            "echo rank=$SKYWARD_NODE_RANK",
        ],
    );
    assert_eq!(all.code, Some(0), "{all:?}");
    let mut lines: Vec<&str> = all.stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["[node-1] rank=0", "[node-2] rank=1"], "{all:?}");

    let failing = sky(
        &sandbox,
        &[
            "exec",
            "demo",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(failing.code, Some(3), "{failing:?}");
    assert_eq!(failing.stdout, "out\n");
    assert!(failing.stderr.contains("err"), "{failing:?}");

    let input = sandbox.path().join("input.txt");
    std::fs::write(&input, "fed through the pool\n").unwrap();
    let fed = run(
        sandbox
            .skyward()
            .args(["exec", "demo", "--", "cat"])
            .stdin(std::fs::File::open(&input).unwrap()),
        LIMIT,
    );
    assert_eq!(fed.code, Some(0), "{fed:?}");
    assert_eq!(fed.stdout, "fed through the pool\n");

    let detached = sky(
        &sandbox,
        &[
            "exec",
            "demo",
            "--detach",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3; do echo line $i; sleep 0.3; done; exit 4",
        ],
    );
    assert_eq!(detached.code, Some(0), "{detached:?}");
    let number = detached.stdout.trim().to_string();
    assert_eq!(
        number, "5",
        "tasks are numbered across the pool: {detached:?}"
    );
    let followed = sky(&sandbox, &["logs", "demo", &number, "--follow"]);
    assert_eq!(followed.code, Some(0), "{followed:?}");
    assert_eq!(followed.stdout, "line 1\nline 2\nline 3\n");
    assert!(
        followed.stderr.contains("task 5 exit code 4"),
        "{followed:?}"
    );
    // Read again once it has ended: the same log.
    let again = sky(&sandbox, &["logs", "demo", &number]);
    assert_eq!(again.stdout, followed.stdout);
    let unknown = sky(&sandbox, &["logs", "demo", "99"]);
    assert_eq!(unknown.code, Some(2), "{unknown:?}");
    assert!(unknown.stderr.contains("no task 99"), "{unknown:?}");

    let status = sandbox.pool_status("demo");
    assert_eq!(status["provider"], "local");
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().all(|n| n["state"] == "connected"), "{status}");
    let expected: Vec<(u64, String)> = [(1, 0), (2, 0), (3, 3), (4, 0), (5, 4)]
        .iter()
        .map(|(task, code)| (*task, format!("exit code {code}")))
        .collect();
    assert_eq!(task_states(&status), expected, "{status}");
    let list = sky(&sandbox, &["pool", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list[0]["name"], "demo");
    assert_eq!(list[0]["condition"], "running");

    let down = sky(&sandbox, &["pool", "down", "demo"]);
    assert_eq!(down.code, Some(0), "{down:?}");
    no_pools(&sandbox);
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "left running: {left:?}");
}

#[test]
fn ctrl_c_cancels_an_exec_and_a_dead_coordinator_is_reported() {
    let sandbox = Sandbox::new();
    let up = sky(&sandbox, &["pool", "up", "held"]);
    assert_eq!(up.code, Some(0), "{up:?}");
    let mut exec = sandbox
        .skyward()
        .args([
            "exec",
            "held",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 97",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut first = String::new();
    BufReader::new(exec.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    assert_eq!(first, "started\n");
    let sleeping = |sandbox: &Sandbox| {
        sandbox
            .processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.starts_with("sleep 97"))
            .count()
    };
    // `started` may arrive before the shell has become `sleep`.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeping(&sandbox) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sleeping(&sandbox), 1, "{:?}", sandbox.processes());
    // The pool's one phase counts the job while it runs.
    assert_eq!(sandbox.pool_status("held")["phase"], "up, 1 job running");
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(exec.id() as i32, libc::SIGINT);
    }
    let code = exec.wait().expect("wait").code();
    assert_eq!(code, Some(130));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeping(&sandbox) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sleeping(&sandbox), 0, "the task outlived its exec");
    let status = sandbox.pool_status("held");
    assert_eq!(task_states(&status), [(1, "cancelled".to_string())]);
    // The cancelled job no longer counts (its end is recorded before its count drops).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = status;
    while status["phase"] != "up, idle" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        status = sandbox.pool_status("held");
    }
    assert_eq!(status["phase"], "up, idle", "{status}");

    // The background coordinator dies: every command says so, and how to clean up.
    let pid = status["pid"].as_i64().expect("pid") as i32;
    // SAFETY: signalling the background coordinator by the pid it reported.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(300));
    for args in [
        &["exec", "held", "--", "true"][..],
        &["pool", "status", "held"][..],
    ] {
        let out = sky(&sandbox, args);
        assert_eq!(out.code, Some(255), "{args:?}: {out:?}");
        assert!(out.stderr.contains("is gone"), "{out:?}");
        assert!(out.stderr.contains("skyward down held"), "{out:?}");
    }
    let again = sky(&sandbox, &["pool", "up", "held"]);
    assert_eq!(again.code, Some(2), "{again:?}");
    assert!(again.stderr.contains("left behind"), "{again:?}");
    let down = sky(&sandbox, &["down", "held"]);
    assert_eq!(down.code, Some(0), "{down:?}");
    no_pools(&sandbox);
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "left running: {left:?}");
}

/// Silence is noticed whether or not a job runs, and between connections too: an idle
/// pool's node stopped past the node timeout (its connection gone well before, the agent's
/// QUIC idle timeout being shorter) is given up and replaced, and its machine is removed
/// through its provider (here: the stopped agent is killed), not left to bill until its lease.
#[test]
fn a_silent_node_of_an_idle_pool_is_replaced_and_its_machine_removed() {
    let sandbox = Sandbox::new();
    let up = run(
        sandbox.skyward().env("SKYWARD_IDLE_TIMEOUT", "2s").args([
            "pool",
            "up",
            "quiet",
            "--nodes",
            "2",
            "--node-timeout",
            "6s",
        ]),
        LIMIT,
    );
    assert_eq!(up.code, Some(0), "{up:?}");
    let stopped = agent_of(&sandbox, "node-1");
    assert_eq!(stopped.len(), 1, "{:?}", sandbox.processes());
    // SAFETY: signalling the agent process found above.
    unsafe {
        libc::kill(stopped[0], libc::SIGSTOP);
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        let status = sandbox.pool_status("quiet");
        if node_states(&status) == [("node-3", "connected"), ("node-2", "connected")] {
            break status;
        }
        if Instant::now() >= deadline {
            // SAFETY: as above; the pool is torn down by the sandbox either way.
            unsafe {
                libc::kill(stopped[0], libc::SIGCONT);
            }
            panic!("the silent node was not replaced: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let replaced = status["replacements"][0].as_str().unwrap_or_default();
    assert_eq!(
        replaced, "node-1 (no health report for 6s) replaced by node-3",
        "{status}"
    );
    // Still stopped: only its removal can end it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent_of(&sandbox, "node-1").is_empty() {
        if Instant::now() >= deadline {
            // SAFETY: as above.
            unsafe {
                libc::kill(stopped[0], libc::SIGCONT);
            }
            panic!(
                "the given-up node's machine was not removed: {:?}",
                sandbox.processes()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The coordinator says so once its provider's call returns, just after the process went.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(sandbox.path().join("home/pools/quiet/coordinator.log"))
            .unwrap_or_default();
        if log.contains("its machine at local was removed") {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = sandbox.pool_status("quiet");
    let nodes: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node-3", "node-2"], "{status}");
    let down = sky(&sandbox, &["pool", "down", "quiet"]);
    assert_eq!(down.code, Some(0), "{down:?}");
}

/// Replacements have a budget: when every new machine is taken away at once (here every
/// local agent watches one stand-in metadata service that announces an interruption), the
/// pool stops replacing after 3 new nodes per place an hour (4 in all for a pool of 2),
/// waiting longer before each, and says why it is smaller.
#[test]
fn a_pool_whose_machines_keep_being_taken_stops_replacing_at_its_budget() {
    let sandbox = Sandbox::new();
    let imds = skyward_tests::imds::Imds::start();
    // Local agents inherit the CLI's environment: they watch the stand-in metadata service.
    let up = run(
        sandbox
            .skyward()
            .env("SKYWARD_SPOT_WATCH", "aws")
            .env("SKYWARD_IMDS", imds.address.to_string())
            .args(["pool", "up", "reclaimed", "--nodes", "2"]),
        LIMIT,
    );
    assert_eq!(up.code, Some(0), "{up:?}");
    imds.post_instance_action("terminate", "2026-12-07T18:00:00Z");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = sandbox.pool_status("reclaimed");
        if status["shortfall"].is_string()
            && status["replacements"].as_array().map_or(0, Vec::len) >= 6
        {
            break status;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let lines: Vec<&str> = status["replacements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let replaced = lines.iter().filter(|l| l.contains(" replaced by ")).count();
    let stopped = lines
        .iter()
        .filter(|l| l.contains(" not replaced: ") && l.ends_with("(--max-replacements raises it)"))
        .count();
    assert_eq!((replaced, stopped), (4, 2), "{status}");
    // Which limit a place met first depends on the order the notices came in.
    let shortfall = status["shortfall"].as_str().unwrap();
    assert!(
        shortfall.starts_with("replacements stopped: ")
            && shortfall.ends_with(
                " in the last hour already (--max-replacements raises it); the pool runs with 0 of 2 nodes"
            ),
        "{status}"
    );
    // The pool state says so of each place.
    let places: Vec<&str> = status["places"]
        .as_array()
        .expect("places")
        .iter()
        .map(|p| p["state"].as_str().unwrap())
        .collect();
    assert_eq!(places.len(), 2, "{status}");
    assert!(
        places.iter().all(|p| p.starts_with("left empty: ")),
        "{status}"
    );
    // No more: the budget holds.
    let later = sandbox.pool_status("reclaimed");
    assert_eq!(later["replacements"], status["replacements"], "{later}");
    let down = sky(&sandbox, &["pool", "down", "reclaimed"]);
    assert_eq!(down.code, Some(0), "{down:?}");
}

/// `skyward run` keeps its pool's size within the same budget, and says once on stderr when
/// the budget leaves a place empty: here every machine, the replacements too, is taken away
/// (every local agent watches one stand-in metadata service that announces an interruption).
#[test]
fn a_run_says_once_when_its_replacement_budget_is_spent() {
    let sandbox = Sandbox::new();
    let imds = skyward_tests::imds::Imds::start();
    let records = sandbox.path().join("records");
    std::fs::create_dir_all(&records).unwrap();
    let template = format!(
        "sh -c 'echo $SKYWARD_NODE_ID > {}/{{}}; sleep 2'",
        records.display()
    );
    let inputs: Vec<String> = (1..=12).map(|i| i.to_string()).collect();
    let mut command = sandbox.skyward();
    command
        .env("SKYWARD_SPOT_WATCH", "aws")
        .env("SKYWARD_IMDS", imds.address.to_string())
        .args([
            "run",
            "--nodes",
            "2",
            "--retries",
            "1",
            "--max-replacements",
            "1",
        ])
        .args(["--map", &template])
        .args(&inputs);
    let running = std::thread::spawn(move || run(&mut command, Duration::from_secs(90)));
    // Once tasks run (the pool is up and kept), every machine gets its notice.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&records).unwrap().next().is_none() {
        assert!(Instant::now() < deadline, "no task started");
        std::thread::sleep(Duration::from_millis(50));
    }
    imds.post_instance_action("terminate", "2026-12-07T18:00:00Z");
    let finished = running.join().expect("the run's thread");
    assert_ne!(finished.code, Some(0), "{finished:?}");
    let said: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.starts_with("skyward: replacements stopped: "))
        .collect();
    assert_eq!(said.len(), 1, "{}", finished.stderr);
    assert!(
        said[0].ends_with("(--max-replacements raises it); the pool runs with 0 of 2 nodes")
            || said[0].ends_with("(--max-replacements raises it); the pool runs with 1 of 2 nodes"),
        "{}",
        finished.stderr
    );
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(10))
        .is_empty());
}

/// A coordinator's own pause is not its nodes' silence: a background coordinator frozen
/// (SIGSTOP) for twice the node timeout gives no node up once it runs again, and keeps both
/// through the node timeout after it.
#[test]
fn a_coordinator_frozen_past_the_node_timeout_gives_no_node_up() {
    let sandbox = Sandbox::new();
    let up = sky(
        &sandbox,
        &[
            "pool",
            "up",
            "paused",
            "--nodes",
            "2",
            "--node-timeout",
            "4s",
        ],
    );
    assert_eq!(up.code, Some(0), "{up:?}");
    let coordinator = sandbox.pool_status("paused")["pid"].as_i64().expect("pid") as i32;
    // SAFETY: signalling the background coordinator by the pid it reported.
    unsafe { libc::kill(coordinator, libc::SIGSTOP) };
    // The fault itself: frozen for twice the node timeout.
    std::thread::sleep(Duration::from_secs(8));
    // SAFETY: as above.
    unsafe { libc::kill(coordinator, libc::SIGCONT) };
    let resumed = Instant::now();
    let both = [("node-1", "connected"), ("node-2", "connected")];
    // Watched past one node timeout after the resume: both nodes stay, none replaced.
    while resumed.elapsed() < Duration::from_secs(6) {
        let status = sandbox.pool_status("paused");
        let states = node_states(&status);
        assert!(
            states
                .iter()
                .all(|(node, state)| ["node-1", "node-2"].contains(node)
                    && ["connected", "reconnecting"].contains(state)),
            "{status}"
        );
        assert_eq!(status["replacements"], serde_json::json!([]), "{status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(node_states(&sandbox.pool_status("paused")), both);
    let down = sky(&sandbox, &["pool", "down", "paused"]);
    assert_eq!(down.code, Some(0), "{down:?}");
}

#[test]
fn a_lost_node_is_replaced_and_the_pool_keeps_its_size() {
    let sandbox = Sandbox::new();
    let up = sky(&sandbox, &["pool", "up", "kept", "--nodes", "2"]);
    assert_eq!(up.code, Some(0), "{up:?}");
    let agent_of_node_2 = agent_of(&sandbox, "node-2");
    assert_eq!(agent_of_node_2.len(), 1, "{:?}", sandbox.processes());
    // SAFETY: killing the agent process found above.
    unsafe {
        libc::kill(agent_of_node_2[0], libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = sandbox.pool_status("kept");
        if node_states(&status) == [("node-1", "connected"), ("node-3", "connected")] {
            break status;
        }
        assert!(Instant::now() < deadline, "not replaced: {status}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let replaced = status["replacements"][0].as_str().unwrap_or_default();
    assert!(
        replaced.starts_with("node-2 (") && replaced.ends_with("replaced by node-3"),
        "{status}"
    );
    // Given up on its provider's word (the pool's machine check), well before its silence.
    assert!(replaced.contains("local: agent exited"), "{status}");
    assert_eq!(
        status["places"],
        serde_json::json!([
            {"node": "node-1", "state": "held"},
            {"node": "node-3", "state": "held"}
        ]),
        "{status}"
    );
    let all = sky(
        &sandbox,
        &[
            "exec",
            "kept",
            "--on",
            "all",
            "--",
            "sh",
            "-c",
            "echo $SKYWARD_NODE_ID",
        ],
    );
    assert_eq!(all.code, Some(0), "{all:?}");
    let mut lines: Vec<&str> = all.stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["[node-1] node-1", "[node-3] node-3"], "{all:?}");
    let down = sky(&sandbox, &["pool", "down", "kept"]);
    assert_eq!(down.code, Some(0), "{down:?}");
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "left running: {left:?}");
}

/// A pool left smaller (its replacement budget allows none) gives new work only to the nodes
/// it still has: the pool state that gave node-1 up places every job's tasks, so none is
/// sent to a fenced node (before, a new `exec` went to node-1, the least loaded, and failed).
#[test]
fn a_pool_left_smaller_gives_new_work_only_to_the_nodes_it_has() {
    let sandbox = Sandbox::new();
    let up = sky(
        &sandbox,
        &[
            "pool",
            "up",
            "smaller",
            "--nodes",
            "2",
            "--max-replacements",
            "0",
        ],
    );
    assert_eq!(up.code, Some(0), "{up:?}");
    let agent_of_node_1 = agent_of(&sandbox, "node-1");
    assert_eq!(agent_of_node_1.len(), 1, "{:?}", sandbox.processes());
    // SAFETY: killing the agent process found above.
    unsafe {
        libc::kill(agent_of_node_1[0], libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = sandbox.pool_status("smaller");
        let empty = status["places"][0]["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("left empty"));
        if empty {
            break;
        }
        assert!(Instant::now() < deadline, "node-1 not given up: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..3 {
        let exec = sky(
            &sandbox,
            &["exec", "smaller", "--", "sh", "-c", "echo $SKYWARD_NODE_ID"],
        );
        assert_eq!(exec.code, Some(0), "{exec:?}");
        assert_eq!(exec.stdout.trim(), "node-2", "{exec:?}");
    }
    let down = sky(&sandbox, &["pool", "down", "smaller"]);
    assert_eq!(down.code, Some(0), "{down:?}");
}

#[test]
fn a_pool_is_sent_an_unchanged_workdir_once_and_results_come_back() {
    let sandbox = Sandbox::new();
    let tree = sandbox.path().join("project");
    std::fs::create_dir_all(tree.join("src")).unwrap();
    std::fs::write(tree.join("src/data.txt"), "the data\n").unwrap();
    let up = sky(&sandbox, &["pool", "up", "code", "--nodes", "2"]);
    assert_eq!(up.code, Some(0), "{up:?}");
    let tree_arg = tree.to_string_lossy().into_owned();
    let into = sandbox.path().join("results");
    let into_arg = into.to_string_lossy().into_owned();
    let exec = |args: &[&str]| {
        let mut all = vec!["exec", "code", "--on", "all", "--workdir", &tree_arg];
        all.extend_from_slice(args);
        sky(&sandbox, &all)
    };
    let first = exec(&[
        "--download",
        "out",
        "--download-to",
        &into_arg,
        "--",
        "sh",
        "-c",
        "mkdir out; cp src/data.txt out/copy.txt; cat src/data.txt",
    ]);
    assert_eq!(first.code, Some(0), "{first:?}");
    assert_eq!(first.stdout.matches("the data").count(), 2, "{first:?}");
    assert_eq!(first.stderr.matches("sent 1 files").count(), 2, "{first:?}");
    for node in ["node-1", "node-2"] {
        let copy = std::fs::read_to_string(into.join(node).join("out/copy.txt")).unwrap();
        assert_eq!(copy, "the data\n");
    }
    // The nodes keep it: the same tree again sends no file.
    let again = exec(&["--", "cat", "src/data.txt"]);
    assert_eq!(again.code, Some(0), "{again:?}");
    assert_eq!(again.stderr.matches("sent 0 files").count(), 2, "{again:?}");
    let down = sky(&sandbox, &["pool", "down", "code"]);
    assert_eq!(down.code, Some(0), "{down:?}");
}

#[test]
fn pool_up_refuses_bad_input_and_leaves_nothing_when_it_fails() {
    let sandbox = Sandbox::new();
    for (args, hint) in [
        (&["pool", "up", "Bad_Name"][..], "lowercase letters"),
        (
            &["pool", "up", "ok", "--nodes", "0"][..],
            "--nodes must be at least 1",
        ),
        (
            &["pool", "up", "ok", "--accelerator", "H1000"][..],
            "unknown accelerator",
        ),
        (
            &["exec", "nowhere", "--", "true"][..],
            "skyward pool up nowhere",
        ),
        (&["exec", "nowhere"][..], "nothing to run"),
    ] {
        let out = sky(&sandbox, args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        let first = out.stderr.lines().next().unwrap_or_default();
        assert!(first.contains(hint), "{args:?}: {out:?}");
    }
    no_pools(&sandbox);

    // Agents that cannot start: the pool fails, says why, and nothing is left of it.
    let failing = run(
        sandbox
            .skyward()
            .args(["pool", "up", "broken", "--connect-timeout", "10s"])
            .env("SKYWARD_AGENT_BIN", "/bin/false"),
        LIMIT,
    );
    assert_eq!(failing.code, Some(255), "{failing:?}");
    assert!(failing.stderr.contains("agent exited"), "{failing:?}");
    no_pools(&sandbox);

    // A TTL ends the pool by itself.
    let short = sky(&sandbox, &["pool", "up", "brief", "--ttl", "2s"]);
    assert_eq!(short.code, Some(0), "{short:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = sky(&sandbox, &["pool", "list"]);
        if list.stdout.trim() == "no pools" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the TTL did not end it: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "left running: {left:?}");
}

/// A long map job on a pool that keeps its size gives its queued tasks to the node that
/// replaced a lost one, and the lost node's running task moves (`--retries`) through the same
/// placement: every input ends once, and the replacement takes a share.
#[test]
fn a_running_map_job_gives_its_queued_tasks_to_a_replacement() {
    let sandbox = Sandbox::new();
    let up = run(
        sandbox.skyward().env("SKYWARD_IDLE_TIMEOUT", "2s").args([
            "pool",
            "up",
            "long",
            "--nodes",
            "2",
            "--node-timeout",
            "4s",
        ]),
        LIMIT,
    );
    assert_eq!(up.code, Some(0), "{up:?}");
    let records = sandbox.path().join("records");
    std::fs::create_dir_all(&records).unwrap();
    let template = format!(
        "sh -c 'sleep 1; echo $SKYWARD_NODE_ID > {}/{{}}'",
        records.display()
    );
    let inputs: Vec<String> = (1..=24).map(|i| i.to_string()).collect();
    let job = run(
        sandbox
            .skyward()
            .args([
                "exec",
                "long",
                "--detach",
                "--retries",
                "1",
                "--map",
                &template,
            ])
            .args(&inputs),
        LIMIT,
    );
    assert_eq!(job.code, Some(0), "{job:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    stop_node_1_once_two_inputs_ended(&sandbox, &records, deadline);
    while std::fs::read_dir(&records).unwrap().count() < inputs.len() {
        assert!(
            Instant::now() < deadline,
            "not every input ended: {:?}, pool {}",
            std::fs::read_dir(&records).unwrap().count(),
            sandbox.pool_status("long")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ran_on = nodes_that_ran(&records, &inputs);
    assert!(
        ran_on.iter().any(|node| node == "node-3"),
        "the replacement took no queued task: {ran_on:?}"
    );
    let down = sky(&sandbox, &["pool", "down", "long"]);
    assert_eq!(down.code, Some(0), "{down:?}");
}

/// `skyward run` keeps its pool's size too while a job that can use a new node runs (the
/// same keeper as `pool up`): a map job whose node goes silent gets a replacement, which takes
/// queued tasks and the lost node's moved one, and every input ends once.
#[test]
fn a_run_map_job_replaces_a_silent_node_and_uses_it() {
    let sandbox = Sandbox::new();
    let records = sandbox.path().join("records");
    std::fs::create_dir_all(&records).unwrap();
    let template = format!(
        "sh -c 'sleep 1; echo $SKYWARD_NODE_ID > {}/{{}}'",
        records.display()
    );
    let inputs: Vec<String> = (1..=24).map(|i| i.to_string()).collect();
    let mut command = sandbox.skyward();
    command
        .env("SKYWARD_IDLE_TIMEOUT", "2s")
        .args([
            "run",
            "--nodes",
            "2",
            "--node-timeout",
            "4s",
            "--retries",
            "1",
        ])
        .args(["--map", &template])
        .args(&inputs);
    let running = std::thread::spawn(move || run(&mut command, Duration::from_secs(90)));
    let deadline = Instant::now() + Duration::from_secs(60);
    stop_node_1_once_two_inputs_ended(&sandbox, &records, deadline);
    let finished = running.join().expect("the run's thread");
    assert_eq!(finished.code, Some(0), "{finished:?}");
    assert!(
        finished.stderr.contains("replaced by node-3"),
        "{}",
        finished.stderr
    );
    let ran_on = nodes_that_ran(&records, &inputs);
    assert!(
        ran_on.iter().all(|node| !node.is_empty()),
        "not every input ran: {ran_on:?}"
    );
    assert!(
        ran_on.iter().any(|node| node == "node-3"),
        "the replacement took no task: {ran_on:?}"
    );
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(10))
        .is_empty());
}
