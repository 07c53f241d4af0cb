//! `skyward run` as a user runs it.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use skyward_tests::{run, Sandbox};

const LIMIT: Duration = Duration::from_secs(60);

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[test]
fn one_node_prints_raw_output_and_exits_zero() {
    let sandbox = Sandbox::new();
    let out = run(
        sandbox
            .skyward()
            .args(["run", "--", "python3", "-c", "print(6*7)"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, "42\n");
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
}

#[test]
fn the_remote_exit_code_is_the_cli_exit_code() {
    let sandbox = Sandbox::new();
    let out = run(
        sandbox.skyward().args(["run", "--", "sh", "-c", "exit 7"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(7), "{out:?}");
}

#[test]
fn broadcast_runs_on_every_node_with_rank_and_world() {
    let sandbox = Sandbox::new();
    let out = run(
        sandbox.skyward().args([
            "run",
            "--nodes",
            "3",
            "--on",
            "all",
            "--",
            "sh",
            "-c",
            "echo rank=$SKYWARD_NODE_RANK of=$SKYWARD_NUM_NODES ips=$SKYWARD_NODE_IPS id=$SKYWARD_NODE_ID; hostname",
        ]),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for rank in 0..3 {
        let node = format!("node-{}", rank + 1);
        let line = format!("[{node}] rank={rank} of=3 ips=127.0.0.1,127.0.0.1,127.0.0.1 id={node}");
        assert!(
            out.stdout.lines().any(|l| l == line),
            "missing {line:?} in {}",
            out.stdout
        );
        let host_line = format!("[{node}] {}", hostname.trim());
        assert!(
            out.stdout.lines().any(|l| l == host_line),
            "missing {host_line:?}"
        );
    }
    assert_eq!(out.stdout.lines().count(), 6);
}

#[test]
fn map_fans_tasks_out_over_all_nodes() {
    let sandbox = Sandbox::new();
    let mut cmd = sandbox.skyward();
    cmd.args([
        "run",
        "--nodes",
        "4",
        "--json",
        "--map",
        "sh -c \"echo item-{}\"",
    ]);
    cmd.args((1..=8).map(|i| i.to_string()));
    let out = run(&mut cmd, LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    let events = json_lines(&out.stdout);
    let mut seen = std::collections::BTreeMap::new();
    let mut nodes = std::collections::BTreeSet::new();
    for e in events.iter().filter(|e| e["event"] == "output") {
        seen.insert(
            e["task"].as_u64().unwrap(),
            e["data"].as_str().unwrap().to_string(),
        );
        nodes.insert(e["node"].as_str().unwrap().to_string());
    }
    for task in 0..8u64 {
        assert_eq!(seen[&task], format!("item-{}\n", task + 1));
    }
    assert_eq!(nodes.len(), 4, "every node ran something: {nodes:?}");
    let ready = events.iter().filter(|e| e["event"] == "node_ready").count();
    assert_eq!(ready, 4);
    let ready_event = events.iter().find(|e| e["event"] == "node_ready").unwrap();
    assert!(ready_event["inventory"]["cpu_count"].as_u64().unwrap() >= 1);
    assert!(ready_event["inventory"]["memory_bytes"].as_u64().unwrap() > 0);
    assert!(!ready_event["inventory"]["interfaces"]
        .as_array()
        .unwrap()
        .is_empty());
    let exits = events.iter().filter(|e| e["event"] == "task_exit").count();
    assert_eq!(exits, 8);
    assert_eq!(events.last().unwrap()["event"], "pool_down");
}

#[test]
fn map_exit_code_is_the_first_failure_with_a_summary() {
    let sandbox = Sandbox::new();
    let out = run(
        sandbox.skyward().args([
            "run",
            "--nodes",
            "2",
            "--map",
            "sh -c \"exit {}\"",
            "0",
            "3",
            "0",
            "5",
        ]),
        LIMIT,
    );
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("2 of 4 tasks failed"), "{}", out.stderr);
    assert!(out.stderr.contains("task 1 on node-"), "{}", out.stderr);
    assert!(out.stderr.contains("task 3 on node-"), "{}", out.stderr);
}

#[test]
fn per_node_limits_concurrency() {
    let sandbox = Sandbox::new();
    // Each task marks itself running in the node's work dir, waits (bounded) until it sees a
    // second task running beside it, and prints how many it saw. Without the limit some
    // would see 3 or 4; without concurrency the first would see only itself.
    let script = "touch run.$SKYWARD_TASK_ID; i=0; \
        while [ $(ls run.* | wc -l) -lt 2 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; \
        ls run.* | wc -l; sleep 0.2; rm run.$SKYWARD_TASK_ID";
    let out = run(
        sandbox.skyward().args([
            "run",
            "--nodes",
            "1",
            "--per-node",
            "2",
            "--map",
            &format!("sh -c '{script}' {{}}"),
            "a",
            "b",
            "c",
            "d",
        ]),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let counts: Vec<u32> = out
        .stdout
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 4);
    assert!(
        counts.iter().all(|&c| c <= 2),
        "more than 2 at once: {counts:?}"
    );
    assert_eq!(
        counts[0], 2,
        "the first two tasks did not run together: {counts:?}"
    );
}

#[test]
fn signals_and_failures_map_to_shell_exit_codes() {
    let sandbox = Sandbox::new();
    let killed = run(
        sandbox
            .skyward()
            .args(["run", "--", "sh", "-c", "kill -TERM $$"]),
        LIMIT,
    );
    assert_eq!(killed.code, Some(143), "{killed:?}");
    assert!(
        killed.stderr.contains("killed by signal 15"),
        "{}",
        killed.stderr
    );
    let missing = run(
        sandbox.skyward().args(["run", "--", "no-such-program-xyz"]),
        LIMIT,
    );
    assert_eq!(missing.code, Some(127), "{missing:?}");
    assert!(
        missing.stderr.contains("no-such-program-xyz"),
        "{}",
        missing.stderr
    );
}

#[test]
fn timeout_kills_the_task_and_exits_124() {
    let sandbox = Sandbox::new();
    let started = std::time::Instant::now();
    // The task ignores SIGTERM, so only the KILL after the grace period stops it.
    let out = run(
        sandbox.skyward().args([
            "run",
            "--timeout",
            "1s",
            "--",
            "sh",
            "-c",
            "trap '' TERM; sleep 60",
        ]),
        LIMIT,
    );
    assert_eq!(out.code, Some(124), "{out:?}");
    assert!(out.stderr.contains("timed out"), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
}

#[test]
fn stdin_is_forwarded_to_a_single_task() {
    let sandbox = Sandbox::new();
    let mut child = sandbox
        .skyward()
        .args(["run", "--", "sh", "-c", "wc -c; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let payload = vec![b'x'; 3 * 1024 * 1024 + 17];
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\ndone\n", 3 * 1024 * 1024 + 17)
    );
}

#[test]
fn env_flags_reach_the_task() {
    let sandbox = Sandbox::new();
    let out = run(
        sandbox.skyward().args([
            "run",
            "--env",
            "GREETING=hello world",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\"",
        ]),
        LIMIT,
    );
    assert_eq!(out.stdout, "hello world\n", "{out:?}");
}

#[test]
fn bad_command_lines_fail_in_one_line_and_start_nothing() {
    let sandbox = Sandbox::new();
    for args in [
        &["run", "--nodes", "0", "--", "true"][..],
        &["run", "hostname"][..],
        &["run", "--provider", "nimbus", "--", "true"][..],
        &["run", "--env", "oops", "--", "true"][..],
    ] {
        let out = run(sandbox.skyward().args(args), LIMIT);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
        assert!(out.stderr.starts_with("skyward: "), "{}", out.stderr);
    }
    assert!(
        !sandbox.path().join("home/pools").exists(),
        "a pool was created"
    );
    assert!(sandbox.processes().is_empty());
}

#[test]
fn a_missing_agent_binary_is_named_with_the_fix() {
    let sandbox = Sandbox::new();
    let out = run(
        sandbox
            .skyward()
            .env("SKYWARD_AGENT_BIN", sandbox.path().join("nope"))
            .args(["run", "--", "true"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("SKYWARD_AGENT_BIN"), "{}", out.stderr);
}

#[test]
fn agents_that_never_connect_fail_the_pool_naming_the_nodes() {
    let sandbox = Sandbox::new();
    // An "agent" that starts but never dials: the wait must time out and name every node.
    let fake = sandbox.path().join("silent-agent");
    std::fs::write(&fake, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run(
        sandbox.skyward().env("SKYWARD_AGENT_BIN", &fake).args([
            "run",
            "--nodes",
            "2",
            "--connect-timeout",
            "1s",
            "--",
            "true",
        ]),
        LIMIT,
    );
    assert_eq!(out.code, Some(255), "{out:?}");
    assert!(
        out.stderr
            .contains("2 of 2 nodes never connected: node-1, node-2"),
        "{}",
        out.stderr
    );
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(10))
        .is_empty());
}

#[test]
fn an_agent_that_dies_early_is_reported_with_its_last_words() {
    let sandbox = Sandbox::new();
    let fake = sandbox.path().join("broken-agent");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'cannot open GPU device' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run(
        sandbox
            .skyward()
            .env("SKYWARD_AGENT_BIN", &fake)
            .args(["run", "--", "true"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(255), "{out:?}");
    assert!(
        out.stderr.contains("node-1: agent exited"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("cannot open GPU device"),
        "{}",
        out.stderr
    );
}

/// Starts `skyward --json` and returns once `started` tasks have reported task_started.
fn start_and_wait_for_tasks(
    sandbox: &Sandbox,
    args: &[&str],
    started: usize,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::BufRead;
    let mut child = sandbox
        .skyward()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            if line.contains("\"task_started\"") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    for _ in 0..started {
        rx.recv_timeout(LIMIT).expect("tasks did not start");
    }
    (child, reader)
}

fn wait_exit(child: &mut std::process::Child) -> Option<i32> {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(std::time::Instant::now() < deadline, "CLI did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctrl_c_tears_down_every_agent_and_task() {
    let sandbox = Sandbox::new();
    let (mut child, reader) = start_and_wait_for_tasks(
        &sandbox,
        &[
            "run",
            "--json",
            "--nodes",
            "2",
            "--on",
            "all",
            "--",
            "sh",
            "-c",
            "trap '' TERM; sleep 600",
        ],
        2,
    );
    let before = sandbox.processes();
    assert!(
        before.len() >= 4,
        "expected 2 agents and 2 tasks, saw {before:?}"
    );
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    assert_eq!(wait_exit(&mut child), Some(130));
    let left = sandbox.wait_for_no_processes(Duration::from_secs(5));
    assert!(left.is_empty(), "left behind after Ctrl-C: {left:?}");
    let stdout = reader.join().unwrap();
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.contains("\"pool_down\""),
        "last event should be pool_down: {stdout}"
    );
    assert!(
        !std::fs::read_dir(sandbox.path().join("home/pools"))
            .unwrap()
            .any(|_| true),
        "pool dir not removed"
    );
}

#[test]
fn sigterm_to_the_cli_also_tears_down() {
    let sandbox = Sandbox::new();
    let (mut child, _reader) =
        start_and_wait_for_tasks(&sandbox, &["run", "--json", "--", "sleep", "600"], 1);
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(wait_exit(&mut child), Some(143));
    let left = sandbox.wait_for_no_processes(Duration::from_secs(5));
    assert!(left.is_empty(), "left behind after SIGTERM: {left:?}");
}

#[test]
fn a_killed_cli_still_leaves_no_agent_behind() {
    let sandbox = Sandbox::new();
    let (mut child, _reader) = start_and_wait_for_tasks(
        &sandbox,
        &[
            "run", "--json", "--nodes", "2", "--on", "all", "--", "sleep", "600",
        ],
        2,
    );
    child.kill().unwrap();
    let _ = child.wait();
    let left = sandbox.wait_for_no_processes(Duration::from_secs(15));
    assert!(
        left.is_empty(),
        "left behind after kill -9 of the CLI: {left:?}"
    );
}

#[test]
fn offers_and_providers_answer_in_tables_and_json() {
    let sandbox = Sandbox::new();
    let offers = run(sandbox.skyward().args(["offers", "--json"]), LIMIT);
    assert_eq!(offers.code, Some(0), "{offers:?}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&offers.stdout).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["provider"], "local");
    assert!(list[0]["vcpus"].as_u64().unwrap() >= 1);
    let table = run(sandbox.skyward().args(["offers"]), LIMIT);
    assert!(
        table.stdout.contains("$/h on-demand") && table.stdout.contains("local"),
        "{}",
        table.stdout
    );

    let providers = run(sandbox.skyward().args(["providers", "--json"]), LIMIT);
    assert_eq!(providers.code, Some(0), "{providers:?}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&providers.stdout).unwrap();
    assert_eq!(list[0]["provider"], "local");
    assert_eq!(list[0]["working"], true);
}

#[test]
fn a_spec_no_provider_can_meet_is_refused_with_what_to_try() {
    let sandbox = Sandbox::new();
    let gpu = run(
        sandbox
            .skyward()
            .args(["run", "--accelerator", "H100:8", "--", "true"]),
        LIMIT,
    );
    assert_eq!(gpu.code, Some(255), "{gpu:?}");
    assert!(
        gpu.stderr.contains("no offers for 1 x H100:8"),
        "{}",
        gpu.stderr
    );
    assert!(
        gpu.stderr.contains("local nodes have no H100"),
        "{}",
        gpu.stderr
    );
    let big = run(
        sandbox
            .skyward()
            .args(["run", "--cpu", "100000", "--", "true"]),
        LIMIT,
    );
    assert_eq!(big.code, Some(255), "{big:?}");
    assert!(
        big.stderr.contains("local: no offer fits"),
        "{}",
        big.stderr
    );
    assert!(sandbox.processes().is_empty());
    let pools = sandbox.path().join("home/pools");
    assert!(!pools.exists() || std::fs::read_dir(pools).unwrap().next().is_none());
}

#[test]
fn reversed_the_coordinator_dials_listening_agents() {
    let sandbox = Sandbox::new();
    // Each task prints its agent's command line: the agents must be listening, not dialing.
    let out = run(
        sandbox.skyward().args([
            "run",
            "--reverse",
            "--nodes",
            "2",
            "--on",
            "all",
            "--",
            "sh",
            "-c",
            "echo $SKYWARD_NODE_ID; tr '\\0' ' ' < /proc/$PPID/cmdline; echo",
        ]),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    for node in ["node-1", "node-2"] {
        assert!(
            out.stdout.contains(&format!("[{node}] {node}")),
            "{}",
            out.stdout
        );
    }
    let agent_lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("skyward-agent"))
        .collect();
    assert_eq!(agent_lines.len(), 2, "{}", out.stdout);
    for line in agent_lines {
        assert!(line.contains("--listen 127.0.0.1:"), "{line}");
        assert!(!line.contains("--coordinator"), "{line}");
    }
    // Teardown stops the dialing too: no redial noise once the pool is down.
    assert!(!out.stderr.contains("cannot dial"), "{}", out.stderr);
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
}

/// `skyward run --reverse ARGS -- true` against an EC2 endpoint nothing answers at: each
/// refusal must come before any call.
fn reverse_on_aws(sandbox: &Sandbox, args: &[&str]) -> skyward_tests::Finished {
    run_on_unreachable_aws(sandbox, &[&["--reverse"], args].concat())
}

/// `skyward run --provider aws ARGS -- true` against an EC2 endpoint nothing answers at.
fn run_on_unreachable_aws(sandbox: &Sandbox, args: &[&str]) -> skyward_tests::Finished {
    run(
        sandbox
            .skyward()
            .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "unused")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .args(["run", "--provider", "aws"])
            .args(args)
            .args(["--", "true"]),
        LIMIT,
    )
}

/// A plain-HTTP agent URL would have nodes run whatever answers there as root: refused
/// before any call unless the binary's SHA-256 comes with it, which the bootstrap checks.
#[test]
fn a_plain_http_agent_url_needs_the_binarys_digest() {
    let sandbox = Sandbox::new();
    let url = ["--agent-url", "http://198.51.100.7/agent"];
    let on_aws = |args: &[&str]| run_on_unreachable_aws(&sandbox, &[&url[..], args].concat());
    let out = on_aws(&[]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("is not HTTPS") && out.stderr.contains("--agent-sha256 HEX"),
        "{}",
        out.stderr
    );
    let out = on_aws(&["--agent-sha256", "not-a-digest"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("64 hex digits"), "{}", out.stderr);
}

#[test]
fn reverse_on_a_cloud_says_what_it_needs_before_creating_anything() {
    let sandbox = Sandbox::new();
    // The agent port opens to one address: the user's.
    let out = reverse_on_aws(&sandbox, &[]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains("--reverse on aws needs --public-ip ADDRESS"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    // Nodes cannot download the agent from a coordinator they cannot reach.
    let out = reverse_on_aws(&sandbox, &["--public-ip", "198.51.100.7"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("pass --agent-url URL") && out.stderr.contains("--image"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    // And --public-ip means nothing without --reverse.
    let out = run(
        sandbox
            .skyward()
            .args(["run", "--public-ip", "198.51.100.7", "--", "true"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--reverse"), "{}", out.stderr);
}

#[test]
fn a_mig_layout_the_nodes_cannot_take_is_refused_before_anything_starts() {
    let sandbox = Sandbox::new();
    // Every cloud endpoint points where nothing answers: a refusal must come before any call.
    let refused = |args: &[&str]| {
        let out = run(
            sandbox
                .skyward()
                .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
                .env("AWS_SECRET_ACCESS_KEY", "unused")
                .env("AWS_DEFAULT_REGION", "us-east-1")
                .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
                .env("VAST_API_KEY", "unused")
                .env("VAST_URL", "http://127.0.0.1:9")
                .arg("run")
                .args(args)
                .args(["--", "true"]),
            LIMIT,
        );
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        // The first line says it all (clap adds a pointer to --help below its own).
        out.stderr.lines().next().unwrap_or_default().to_string()
    };
    let typo = refused(&["--mig", "1g10gb"]);
    assert!(
        typo.contains("\"1g10gb\" is not a profile") && typo.contains("--mig 1g.10gb"),
        "{typo}"
    );
    let containers = refused(&[
        "--provider",
        "vastai",
        "--accelerator",
        "A100",
        "--mig",
        "1g.10gb",
    ]);
    assert!(
        containers.contains("vastai nodes cannot partition GPUs with MIG"),
        "{containers}"
    );
    let no_mig = refused(&[
        "--provider",
        "aws",
        "--accelerator",
        "T4",
        "--mig",
        "1g.10gb",
    ]);
    assert!(
        no_mig.contains("T4 has no MIG") && no_mig.contains("A100"),
        "{no_mig}"
    );
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
}

#[test]
fn a_pool_ends_at_its_ttl_whatever_its_tasks_do() {
    let sandbox = Sandbox::new();
    let started = std::time::Instant::now();
    let out = run(
        sandbox
            .skyward()
            .args(["run", "--ttl", "3s", "--", "sleep", "600"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(124), "{out:?}");
    assert!(
        out.stderr
            .contains("the pool's TTL passed: stopping tasks and tearing down pool"),
        "{}",
        out.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
}

/// A pool may not outlive its CA and coordinator certificates (before: they lasted 30 days
/// and a longer --ttl, or none, broke the pool on day 30): a longer --ttl is refused in one
/// line before anything is made, and an agent checks a coordinator certificate that lasts as
/// long as any pool may.
#[test]
fn a_ttl_longer_than_the_pools_certificates_is_refused_before_anything_is_made() {
    let sandbox = Sandbox::new();
    for command in [
        &["run", "--ttl", "3651d", "--", "true"][..],
        &["pool", "up", "long", "--ttl", "20years"],
    ] {
        let out = run(sandbox.skyward().args(command), LIMIT);
        assert_eq!(out.code, Some(2), "{out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
        assert!(
            out.stderr.contains(
                "longer than a pool's certificates last (3650 days): give --ttl 3650d or less"
            ),
            "{out:?}"
        );
    }
    assert!(sandbox.processes().is_empty(), "{:?}", sandbox.processes());
    let ca = skyward_common::identity::PoolCa::generate("long").unwrap();
    let coordinator = ca.issue_server_cert().unwrap();
    for cert in [ca.cert_der(), &coordinator.chain[0]] {
        let until = skyward_common::identity::not_after(cert).unwrap();
        let left = until.duration_since(std::time::SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3649 * 86400), "{left:?}");
    }
}

#[test]
fn a_spot_interruption_notice_reaches_the_user_at_once() {
    use std::io::{BufRead, BufReader};
    let sandbox = Sandbox::new();
    let imds = skyward_tests::imds::Imds::start();
    // Local agents inherit the CLI's environment: they watch the stand-in metadata service.
    let mut skyward = sandbox
        .skyward()
        .env("SKYWARD_SPOT_WATCH", "aws")
        .env("SKYWARD_IMDS", imds.address.to_string())
        .args(["run", "--", "sh", "-c", "echo started; sleep 12; echo done"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(skyward.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    imds.post_instance_action("terminate", "2026-11-27T14:30:00Z");
    let out = skyward.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "skyward: node-1: aws spot interruption notice: terminate at 2026-11-27T14:30:00Z"
        ),
        "{stderr}"
    );
    // IMDSv2: every question came with a session token.
    assert!(imds.tokens_issued() >= 1);
    assert_eq!(imds.refused(), 0);
}

#[test]
fn a_task_whose_node_is_lost_runs_again_on_another_node() {
    let sandbox = Sandbox::new();
    let run = skyward_tests::MovingRun::start(sandbox.skyward().args([
        "run",
        "--nodes",
        "2",
        "--retries",
        "1",
        // Lost after 3 s without a health report, rather than QUIC's 30 s of silence.
        "--node-timeout",
        "3s",
        // Stdin forwarded once cannot be forwarded again: a task fed it is not moved.
        "--no-stdin",
        "--",
        "sh",
        "-c",
        "echo on $SKYWARD_NODE_ID; sleep 2; echo finished on $SKYWARD_NODE_ID",
    ]));
    let lost = run.first.clone();
    // The node's machine goes away: its agent dies without a word (and its task with it).
    let agents: Vec<i32> = skyward_tests::processes_under(sandbox.path())
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.contains("skyward-agent") && cmd.contains(&format!("--node-id {lost} "))
        })
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(agents.len(), 1, "{lost}'s agent");
    // SAFETY: signalling a process this test's skyward started.
    unsafe {
        libc::kill(agents[0], libc::SIGKILL);
    }
    run.assert_moved("no health report for 3s)");
}

/// Load: 1,000 tasks at once over 8 agents, each printing, through the real CLI: every line
/// arrives exactly once, and the coordinator's memory stays bounded.
#[test]
fn a_thousand_concurrent_printing_tasks_over_eight_agents_lose_no_line() {
    let sandbox = Sandbox::new();
    let inputs: Vec<String> = (1..=1000).map(|i| i.to_string()).collect();
    let mut command = sandbox.skyward();
    command
        .args(["run", "--nodes", "8", "--per-node", "125", "--map"])
        // Each task prints, then stays a moment, so that all 1,000 run at once.
        .arg("sh -c 'for i in 1 2 3 4 5; do echo task-{} line-$i; done; sleep 2'")
        .args(&inputs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn skyward");
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let reading = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
        text
    });
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    // The peak resident set so far (VmHWM), read until the process is gone.
    let mut peak_kib = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = reading.join().unwrap();
    let errors = errors.join().unwrap();
    assert_eq!(status.code(), Some(0), "{errors}");
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5000, "{errors}");
    lines.sort_unstable();
    lines.dedup();
    assert_eq!(lines.len(), 5000, "a line came twice");
    for task in [1, 500, 1000] {
        for line in 1..=5 {
            let wanted = format!("task-{task} line-{line}");
            assert!(
                lines.iter().any(|l| l.ends_with(&wanted)),
                "missing {wanted}"
            );
        }
    }
    // Bounded: output streams through, nothing piles up per task (a debug build).
    assert!(
        peak_kib > 0 && peak_kib < 200 * 1024,
        "peak RSS {peak_kib} KiB"
    );
    eprintln!("peak coordinator RSS: {} MiB", peak_kib / 1024);
}
