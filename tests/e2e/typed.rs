//! The Rust library API (`skyward_coordinator::api`) and typed tasks: pools built in this
//! test process with the local provider, real agent processes (the stock one and the
//! typed-map example's custom one), real QUIC with real certificates, on loopback.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use skyward::{
    Command, ComputePool, Error, Local, OutputStream, Phase, RunError, Task, TaskContext,
    TaskOutcome, TaskResult,
};
use skyward_tests::{bin, run, Sandbox};
use typed_map::Sum;

/// A local pool of `nodes` nodes running `agent`, its state under the sandbox.
async fn pool(sandbox: &Sandbox, agent: &str, nodes: usize) -> ComputePool {
    ComputePool::builder()
        .provider(Local)
        .nodes(nodes)
        .agent_binary(bin(agent))
        .home(sandbox.path().join("home"))
        .tasks_per_node(3)
        .build()
        .await
        .expect("pool comes up")
}

/// Waits (bounded, off the runtime's threads) until nothing runs in the sandbox.
async fn nothing_left(sandbox: &Sandbox) {
    let dir = sandbox.path().to_path_buf();
    let left = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = skyward_tests::processes_under(&dir);
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert!(left.is_empty(), "left running: {left:?}");
}

/// `Sum` as a newer build of the task would send it.
#[derive(Serialize, Deserialize)]
struct SumV2 {
    values: Vec<u64>,
}

impl Task for SumV2 {
    const NAME: &'static str = "sum";
    const VERSION: u32 = 2;
    type Output = u64;
    fn run(self, _ctx: &TaskContext) -> TaskResult<u64> {
        Ok(self.values.iter().sum())
    }
}

fn task_message(result: Result<u64, Error>) -> String {
    match result {
        Err(Error::Task { task, message, .. }) => {
            assert_eq!(task, "sum");
            message
        }
        other => panic!("expected a task error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_map_keeps_input_order_and_panics_and_versions_are_errors() {
    let sandbox = Sandbox::new();
    let pool = pool(&sandbox, "typed-map-agent", 2).await;
    // Chunks of different lengths finish out of order; the outputs must not.
    let chunks: Vec<Vec<u64>> = (0..20u64).map(|i| (0..(20 - i) * 50).collect()).collect();
    let expected: Vec<u64> = chunks.iter().map(|c| c.iter().sum()).collect();
    let sums = pool
        .map(chunks.into_iter().map(|values| Sum { values }))
        .await
        .unwrap();
    assert_eq!(sums, expected);

    let message = task_message(
        pool.submit(Sum {
            values: vec![u64::MAX, 1],
        })
        .await,
    );
    assert!(message.contains("panicked: sum overflows u64"), "{message}");
    let mut inputs: Vec<Sum> = (0..6).map(|i| Sum { values: vec![i] }).collect();
    inputs[4].values = vec![u64::MAX, u64::MAX];
    let message = task_message(pool.map(inputs).await.map(|_| 0));
    assert!(message.contains("input 4 of the map"), "{message}");
    assert!(message.contains("sum overflows u64"), "{message}");

    // The agent survived its tasks' panics.
    assert_eq!(pool.submit(Sum { values: vec![1, 2] }).await.unwrap(), 3);
    let message = task_message(pool.submit(SumV2 { values: vec![1] }).await);
    assert!(
        message.contains("version 2 was sent, but this agent has version 1"),
        "{message}"
    );
    pool.shutdown().await.unwrap();
    nothing_left(&sandbox).await;
}

/// Typed tasks are not resumed (README, "What survives which fault"): a call whose node is
/// lost fails with `Error::Run(RunError::NodeLost)`, naming the node, once the node timeout
/// passes, rather than waiting on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_call_whose_node_is_lost_fails_as_lost() {
    let sandbox = Sandbox::new();
    let pool = ComputePool::builder()
        .provider(Local)
        .nodes(1)
        .agent_binary(bin("typed-map-agent"))
        .home(sandbox.path().join("home"))
        .node_timeout(Duration::from_secs(3))
        .build()
        .await
        .expect("pool comes up");
    let agents: Vec<i32> = skyward_tests::processes_under(sandbox.path())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("typed-map-agent") && cmd.contains("--node-id"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(agents.len(), 1, "the node's agent");
    // SAFETY: freezing this test's own agent (thawed below).
    unsafe { libc::kill(agents[0], libc::SIGSTOP) };
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        pool.submit(Sum { values: vec![1, 2] }),
    )
    .await
    .expect("the call ends once the node is lost");
    // SAFETY: as above.
    unsafe { libc::kill(agents[0], libc::SIGCONT) };
    match result {
        Err(Error::Run(RunError::NodeLost { node, reason })) => {
            assert_eq!(node, "node-1", "{reason}");
            assert!(reason.contains("no health report"), "{reason}");
        }
        other => panic!("expected Error::Run(RunError::NodeLost), got {other:?}"),
    }
    pool.shutdown().await.unwrap();
    nothing_left(&sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_agent_refuses_typed_tasks_by_name() {
    let sandbox = Sandbox::new();
    let pool = pool(&sandbox, "skyward-agent", 1).await;
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        pool.submit(Sum { values: vec![1] }),
    )
    .await
    .expect("an unknown task must be refused, not hang");
    let message = task_message(result);
    assert!(
        message.contains("this agent does not know task `sum`; it knows: no typed tasks"),
        "{message}"
    );
    assert!(
        message.contains("skyward_agent::Agent::register"),
        "{message}"
    );
    pool.shutdown().await.unwrap();
    nothing_left(&sandbox).await;
}

/// Waits (bounded) for the process whose pid `file` holds to be gone.
async fn process_ends(file: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    let pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    while Instant::now() < deadline {
        // SAFETY: signal 0 only asks whether the pid exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn sleeper(pid_file: &Path) -> Command {
    Command::new("sh").arg("-c").arg(format!(
        "echo $$ > {}; echo started; exec sleep 600",
        pid_file.display()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_call_cancels_its_command_on_the_node() {
    let sandbox = Sandbox::new();
    let pool = pool(&sandbox, "skyward-agent", 1).await;

    // A timeout around a call drops its future.
    let timed = sandbox.path().join("timed.pid");
    let result = tokio::time::timeout(Duration::from_secs(2), pool.run(sleeper(&timed))).await;
    assert!(result.is_err(), "the sleeper finished: {result:?}");
    assert!(
        process_ends(&timed).await,
        "the timed-out command still runs"
    );
    // A call counts as one of the pool's jobs while it runs, and no longer once dropped.
    assert_eq!(pool.phase(), Phase::Ready { jobs: 0 });

    // So does dropping a stream.
    let streamed = sandbox.path().join("streamed.pid");
    let mut stream = pool.stream(sleeper(&streamed)).await.unwrap();
    let first = stream.next().await.expect("the command's first output");
    assert_eq!(first.data.as_ref(), b"started\n");
    assert_eq!(pool.phase(), Phase::Ready { jobs: 1 });
    drop(stream);
    assert_eq!(pool.phase(), Phase::Ready { jobs: 0 });
    assert!(
        process_ends(&streamed).await,
        "the dropped stream's command still runs"
    );

    // The pool goes on.
    let out = pool
        .run(Command::new("echo").arg("still here"))
        .await
        .unwrap();
    assert!(out.success());
    assert_eq!(out.stdout, b"still here\n");
    pool.shutdown().await.unwrap();
    nothing_left(&sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_as_it_comes() {
    let sandbox = Sandbox::new();
    let pool = pool(&sandbox, "skyward-agent", 1).await;
    let started = Instant::now();
    let mut stream = pool
        .stream(Command::new("sh").args([
            "-c",
            "echo first; sleep 3; echo second; echo oops >&2; exit 3",
        ]))
        .await
        .unwrap();
    let first = stream.next().await.unwrap();
    let first_after = started.elapsed();
    assert_eq!(first.stream, OutputStream::Stdout);
    assert_eq!(first.data.as_ref(), b"first\n");
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.push(chunk);
    }
    let ended_after = started.elapsed();
    assert!(
        first_after + Duration::from_secs(2) < ended_after,
        "the first line came at {first_after:?}, the end at {ended_after:?}: not as it came"
    );
    assert!(rest
        .iter()
        .any(|c| c.stream == OutputStream::Stderr && c.data.as_ref() == b"oops\n"));
    assert_eq!(
        stream.finish().await.unwrap(),
        TaskOutcome::Exited { code: 3 }
    );
    pool.shutdown().await.unwrap();
    nothing_left(&sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_in_a_row_and_a_dropped_pool_is_torn_down() {
    let sandbox = Sandbox::new();
    let listed = |sandbox: &Sandbox| {
        let out = run(
            sandbox.skyward().args(["pool", "list"]),
            Duration::from_secs(30),
        );
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        out.stdout
    };

    let first = pool(&sandbox, "typed-map-agent", 2).await;
    let first_name = first.name().to_string();
    assert!(
        listed(&sandbox).contains(&first_name),
        "the CLI sees library pools"
    );
    assert_eq!(first.submit(Sum { values: vec![2, 3] }).await.unwrap(), 5);
    first.shutdown().await.unwrap();
    nothing_left(&sandbox).await;
    assert!(!listed(&sandbox).contains(&first_name));

    let second = pool(&sandbox, "skyward-agent", 2).await;
    assert_ne!(second.name(), first_name);
    let all = second
        .broadcast(Command::new("sh").args(["-c", "echo $RANK of $WORLD_SIZE"]))
        .await
        .unwrap();
    let said: Vec<String> = all
        .iter()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .collect();
    assert_eq!(said, ["0 of 2\n", "1 of 2\n"]);
    let second_name = second.name().to_string();
    // No shutdown: dropping the pool tears it down.
    drop(second);
    nothing_left(&sandbox).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed(&sandbox).contains(&second_name) {
        assert!(Instant::now() < deadline, "the dropped pool stays recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_typed_map_example_sums_on_two_nodes() {
    let sandbox = Sandbox::new();
    let out = run(
        std::process::Command::new(bin("typed-map"))
            .env("SKYWARD_HOME", sandbox.path().join("home"))
            .stdin(std::process::Stdio::null()),
        Duration::from_secs(120),
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let sums: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("chunk "))
        .collect();
    assert_eq!(sums.len(), 20, "{}", out.stdout);
    assert_eq!(sums[0], "chunk 0: 45");
    assert_eq!(sums[19], "chunk 19: 1945");
    assert!(
        out.stdout.contains("all 20 sums are right"),
        "{}",
        out.stdout
    );
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "left running: {left:?}");
}

/// The error of a pool that cannot be had, as a program sees it.
fn provision_error(result: Result<ComputePool, Error>) -> skyward::ProvisionError {
    match result {
        Err(Error::Provision(e)) => e,
        Err(other) => panic!("not a provisioning error: {other:?}"),
        Ok(_) => panic!("the pool came up"),
    }
}

/// A program tells why a pool could not be had from the error's kind, not its words:
/// credentials a cloud refuses, nothing that fits, machines whose agents never connect; and
/// the error lists each attempt with what became of its machines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pool_says_what_kind_of_failure_it_was_and_lists_its_attempts() {
    let sandbox = Sandbox::new();
    let home = sandbox.path().join("home");

    // A cloud that refuses the credentials (the stand-in knows no token this process has).
    let standin = skyward_tests::standins::digitalocean::DigitalOceanStandIn::start(
        &sandbox.path().join("do"),
    )
    .await;
    let refused = ComputePool::builder()
        .provider(skyward::Cloud::new("digitalocean").option("api_url", standin.url()))
        .home(&home)
        .advertise(([127, 0, 0, 1], 9).into())
        .agent_binary(bin("skyward-agent"))
        .build()
        .await;
    let refused = provision_error(refused);
    assert_eq!(refused.kind, skyward::ErrorKind::Auth, "{refused}");
    assert!(refused.attempts.is_empty(), "{refused:?}");
    assert!(
        refused.to_string().contains("DIGITALOCEAN_TOKEN"),
        "{refused}"
    );

    // Nothing fits: the local provider has no GPUs.
    let unfit = ComputePool::builder()
        .provider(Local)
        .accelerator("A100")
        .agent_binary(bin("skyward-agent"))
        .home(&home)
        .build()
        .await;
    let unfit = provision_error(unfit);
    assert_eq!(unfit.kind, skyward::ErrorKind::NoOffers, "{unfit}");

    // Machines are made but their agents never connect.
    let silent = sandbox.path().join("silent-agent");
    std::fs::write(&silent, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&silent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hollow = ComputePool::builder()
        .provider(Local)
        .nodes(2)
        .agent_binary(&silent)
        .connect_timeout(Duration::from_secs(1))
        .home(&home)
        .build()
        .await;
    let hollow = provision_error(hollow);
    assert_eq!(hollow.kind, skyward::ErrorKind::Unreachable, "{hollow}");
    assert_eq!(hollow.attempts.len(), 1, "{hollow:?}");
    let attempt = &hollow.attempts[0];
    assert_eq!(
        (attempt.provider.as_str(), attempt.kind),
        ("local", skyward::ErrorKind::Unreachable)
    );
    assert!(
        attempt.message.starts_with(
            "2 machine(s) created, given up: 2 of 2 nodes never connected: node-1, node-2"
        ) && attempt.message.ends_with("removed them"),
        "{attempt}"
    );
    nothing_left(&sandbox).await;
}

/// A program's pool keeps its size as `skyward pool up`'s does (one keeper drives both): a
/// node silent past the node timeout is given up, its machine removed (here its stopped
/// agent killed), and a new node takes its place and rank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_pool_replaces_a_silent_node_and_removes_its_machine() {
    let sandbox = Sandbox::new();
    let pool = ComputePool::builder()
        .provider(Local)
        .nodes(2)
        .node_timeout(Duration::from_secs(3))
        .agent_binary(bin("skyward-agent"))
        .home(sandbox.path().join("home"))
        .build()
        .await
        .expect("pool comes up");
    let agent_of = |node: &str| -> Vec<i32> {
        skyward_tests::processes_under(sandbox.path())
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&format!("--node-id {node} ")))
            .map(|(pid, _)| pid)
            .collect()
    };
    let stopped = agent_of("node-1");
    assert_eq!(stopped.len(), 1, "{:?}", sandbox.processes());
    // SAFETY: signalling the agent process found above.
    unsafe {
        libc::kill(stopped[0], libc::SIGSTOP);
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    while pool.nodes() != ["node-3", "node-2"] || !agent_of("node-1").is_empty() {
        if Instant::now() >= deadline {
            // SAFETY: as above.
            unsafe {
                libc::kill(stopped[0], libc::SIGCONT);
            }
            panic!(
                "not replaced, or its machine left: nodes {:?}, replacements {:?}, processes {:?}",
                pool.nodes(),
                pool.replacements(),
                sandbox.processes()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        pool.replacements(),
        ["node-1 (no health report for 3s) replaced by node-3"]
    );
    assert_eq!(pool.shortfall(), None, "the pool is whole again");
    let outputs = pool
        .broadcast(Command::new("sh").arg("-c").arg("echo $SKYWARD_NODE_ID"))
        .await
        .expect("both nodes run it");
    let ran: Vec<String> = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .collect();
    assert_eq!(ran, ["node-3", "node-2"]);
    pool.shutdown().await.expect("teardown");
    nothing_left(&sandbox).await;
}
