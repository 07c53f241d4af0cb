//! Task output that survives slow readers, outages and long runs (issue 17): every byte
//! once and in order, with the agent's bounds reached for real.

use std::time::{Duration, Instant};

use skyward_common::protocol::{TaskEvent, TaskOutcome, TaskSpec};
use skyward_tests::{agent_command, dir_bytes, loopback_coordinator, wait_connected, Sandbox};

/// The agent's bounds for one task's output in this test: 64 KiB of memory, 1 MiB of spill
/// (its defaults are 16 MiB and 1 GiB; the agent's own settings lower them).
const MEMORY: usize = 64 * 1024;
const SPILL: usize = 1024 * 1024;

/// Starts `sh -c script` on `node`: no input, no timeout.
async fn start_sh(
    coordinator: &skyward_coordinator::Coordinator,
    node: &skyward_coordinator::NodeHandle,
    script: String,
) -> skyward_coordinator::server::RemoteTask {
    let spec = TaskSpec::command(
        0,
        0,
        vec!["sh".into(), "-c".into(), script],
        vec![],
        None,
        false,
    );
    coordinator.start_task(node, spec).await.unwrap()
}

/// A reader slower than its task, over bursts that add up to 23 times the spill's bound:
/// every byte arrives in order, the exit code once, and no spill file outlives its output.
/// Before, a sent chunk left in memory ahead of spilled ones kept the spill from ever being
/// reclaimed, and once it was full the task waited for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_every_burst_through_a_spill_many_times_smaller() {
    let sandbox = Sandbox::new();
    let coordinator = loopback_coordinator("rel-spill");
    let mut agent = agent_command(&sandbox, &coordinator, "node-1", "10m")
        .args(["--task-memory", &MEMORY.to_string()])
        .args(["--task-spill", &SPILL.to_string()])
        .spawn()
        .expect("spawn skyward-agent");
    let node = wait_connected(&coordinator, "node-1").await;
    // 12 bursts of 2,000,000 'x' and a newline (24 MB), a pause between them.
    const BURSTS: usize = 12;
    const BURST: usize = 2_000_000;
    let script = format!(
        "for i in $(seq {BURSTS}); do head -c {BURST} /dev/zero | tr '\\0' x; echo; sleep 0.05; done"
    );
    let mut task = start_sh(&coordinator, &node, script).await;
    let spill_dir = sandbox.path().join("node-1/.skyward-spill");
    let spill_bytes = || dir_bytes(&spill_dir);
    let (mut received, mut newlines, mut outcomes, mut most_spilled) = (0usize, 0usize, 0, 0);
    let mut last_seq = None;
    // Bounded: 24 MB at this reader's pace take about 6 s; a task that waits for good is
    // caught here.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, task.output.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stuck after {received} of {} bytes, {} bytes spilled",
                    BURSTS * (BURST + 1),
                    spill_bytes()
                )
            })
            .expect("task stream");
        match event {
            Some(TaskEvent::Output { seq, data, .. }) => {
                assert_eq!(seq, last_seq.map_or(0, |s| s + 1), "in order, none twice");
                last_seq = Some(seq);
                for byte in data.iter() {
                    match byte {
                        b'x' => {}
                        b'\n' => newlines += 1,
                        other => panic!("a byte that was never written: {other}"),
                    }
                }
                received += data.len();
                most_spilled = most_spilled.max(spill_bytes());
                // The slow reader: 4 MB/s, well under what the task writes.
                tokio::time::sleep(Duration::from_micros(data.len() as u64 / 4)).await;
            }
            Some(TaskEvent::Finished(outcome)) => {
                assert_eq!(outcome, TaskOutcome::Exited { code: 0 });
                outcomes += 1;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(received, BURSTS * (BURST + 1), "every byte, once");
    assert_eq!(newlines, BURSTS);
    assert_eq!(outcomes, 1, "the exit code, once");
    assert!(
        most_spilled > 0,
        "the reader was slow enough to make the agent spill"
    );
    assert!(
        most_spilled <= SPILL as u64,
        "the spill held {most_spilled} bytes, over its {SPILL}"
    );
    drop(task);
    let settle = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&spill_dir).is_ok_and(|d| d.count() > 0) {
        assert!(Instant::now() < settle, "spill files outlived their output");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();
}

/// The lines a chatty test task prints: numbered, each 119 bytes, so that a line lost,
/// repeated or out of order shows.
fn numbered_line(i: usize) -> String {
    format!("line {i:06} {i:0100}\n")
}

/// A shell loop printing `lines` numbered lines, 100 every 0.1 s, then exiting with `code`.
fn chatty_script(lines: usize, code: i32) -> String {
    format!(
        "i=0; while [ $i -lt {lines} ]; do printf 'line %06d %0100d\\n' $i $i; i=$((i+1)); \
         if [ $((i % 100)) = 0 ]; then sleep 0.1; fi; done; exit {code}"
    )
}

/// Every file named `name` under `dir`, searched a few levels down.
fn files_named(dir: &std::path::Path, name: &str, depth: usize) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() && depth > 0 {
            found.extend(files_named(&path, name, depth - 1));
        } else if entry.file_name() == name {
            found.push(path);
        }
    }
    found
}

/// Issue 17's second case: a background coordinator frozen (SIGSTOP) past the connection's
/// idle timeout while a task prints. The agent's connection dies with output in flight and
/// the task runs on; once the coordinator is back, the run goes on from what it had handed
/// on: every line once and in order, the exit code once, the pool's task log complete.
/// Before, a chunk was dropped once written into the stream, and the resume found it gone
/// (`exec` ended 255 with part of the output).
#[test]
fn a_chatty_task_loses_nothing_while_its_coordinator_is_frozen_past_the_idle_timeout() {
    use skyward_tests::run;
    use std::io::BufRead;
    use std::process::Stdio;
    const LINES: usize = 6_000;
    let limit = Duration::from_secs(60);
    let sandbox = Sandbox::new();
    // A 2 s idle timeout (the agent's setting; the shorter side's wins) and small bounds,
    // which the frozen seconds' output overflows from memory into the spill.
    let settings = [
        ("SKYWARD_IDLE_TIMEOUT", "2s"),
        ("SKYWARD_TASK_MEMORY", "65536"),
        ("SKYWARD_TASK_SPILL", "16777216"),
    ];
    let up = run(
        sandbox
            .skyward()
            .envs(settings)
            .args(["pool", "up", "frozen", "--node-timeout", "1m"]),
        limit,
    );
    assert_eq!(up.code, Some(0), "{up:?}");
    let status = sandbox.pool_status("frozen");
    let coordinator = status["pid"].as_i64().expect("pid") as i32;

    let mut exec = sandbox
        .skyward()
        .args(["exec", "frozen", "--", "sh", "-c", &chatty_script(LINES, 7)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = exec.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let take = |until: usize, got: &mut Vec<String>| {
        let deadline = Instant::now() + limit;
        while got.len() < until {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => got.push(line),
                Err(_) => break,
            }
        }
    };
    take(500, &mut got);
    assert_eq!(got.len(), 500, "the task's first lines");
    // SAFETY: signalling the background coordinator by the pid it reported.
    unsafe { libc::kill(coordinator, libc::SIGSTOP) };
    // The fault itself: frozen for 2.5 idle timeouts while the task prints on.
    std::thread::sleep(Duration::from_secs(5));
    // SAFETY: as above.
    unsafe { libc::kill(coordinator, libc::SIGCONT) };
    take(LINES + 1, &mut got);
    let code = exec.wait().expect("exec").code();
    reader.join().expect("reader");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut exec.stderr.take().unwrap(), &mut stderr).unwrap();
    let expected: Vec<String> = (0..LINES)
        .map(|i| numbered_line(i).trim_end().to_string())
        .collect();
    let first_wrong = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert!(
        got.len() == LINES && first_wrong.is_none(),
        "{} of {LINES} lines, first wrong at {first_wrong:?}; exec: {code:?} {stderr}",
        got.len()
    );
    assert_eq!(code, Some(7), "the task's exit code, once: {stderr}");
    // The user saw why the output stopped, and that it came back with nothing lost.
    assert!(
        stderr.contains("skyward: node-1: connection lost (")
            && stderr.contains("its task runs on there, its output held on the node"),
        "{stderr}"
    );
    assert!(
        stderr.contains("skyward: task 0: node-1 back after")
            && stderr.contains("of output it held"),
        "{stderr}"
    );
    // The outage did break the connection: the agent resumed the task on a new one.
    let agent_logs: String = files_named(sandbox.path(), "agent.log", 6)
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    assert!(
        agent_logs.contains("resuming a task on a new connection"),
        "the freeze never broke the connection: {agent_logs}"
    );
    let logs = run(sandbox.skyward().args(["logs", "frozen", "1"]), limit);
    assert_eq!(logs.code, Some(0), "{logs:?}");
    assert!(
        logs.stdout
            == expected
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        "the pool's task log is not the task's output ({} bytes)",
        logs.stdout.len()
    );
    let down = run(sandbox.skyward().args(["pool", "down", "frozen"]), limit);
    assert_eq!(down.code, Some(0), "{down:?}");
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "left running: {left:?}");
}

/// A coordinator on this machine's end of a new network namespace's link (node timeout
/// 60 s), and the command that starts node-1's agent inside the namespace with a 2 s idle
/// timeout, so that a cut of a few seconds breaks the connection; the caller adds its own
/// arguments and spawns it.
fn across_a_link(
    sandbox: &Sandbox,
    pool: &str,
) -> (
    std::sync::Arc<skyward_tests::netns::TestNet>,
    skyward_coordinator::Coordinator,
    std::process::Command,
) {
    skyward_common::install_crypto_provider();
    let net = std::sync::Arc::new(
        skyward_tests::netns::TestNet::create().expect("a network namespace for the node"),
    );
    let coordinator =
        skyward_coordinator::Coordinator::start(skyward_coordinator::CoordinatorConfig {
            pool: pool.into(),
            bind: (net.host_ip, 0).into(),
            state_dir: None,
        })
        .unwrap();
    coordinator.set_node_timeout(Duration::from_secs(60));
    let mut agent =
        skyward_tests::agent_command_in(sandbox, &coordinator, "node-1", "10m", &net.exec_prefix());
    agent.args(["--idle-timeout", "2s"]);
    (net, coordinator, agent)
}

/// Issue 17's third test: the link to a node in a network namespace cut for 2.5 idle
/// timeouts while its task prints. The connection dies with output in flight; once the link
/// is back and the agent has redialled, every line arrives once and in order, and the exit
/// code once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_task_loses_nothing_through_a_cut_link() {
    const LINES: usize = 6_000;
    let sandbox = Sandbox::new();
    let (net, coordinator, mut agent) = across_a_link(&sandbox, "rel-cut");
    let mut agent = agent
        .args(["--task-memory", "65536"])
        .args(["--task-spill", "16777216"])
        .spawn()
        .expect("spawn skyward-agent");
    let node = wait_connected(&coordinator, "node-1").await;
    let mut task = start_sh(&coordinator, &node, chatty_script(LINES, 7)).await;
    let mut output = Vec::new();
    let mut cut = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, task.output.next())
            .await
            .unwrap_or_else(|_| panic!("stuck after {} bytes", output.len()));
        match event {
            Ok(Some(TaskEvent::Output { data, .. })) => {
                output.extend_from_slice(&data);
                if cut.is_none() && output.len() >= 500 * numbered_line(0).len() {
                    net.set_link(false).expect("link down");
                    let net = net.clone();
                    // The fault itself: 5 s without a link.
                    cut = Some(tokio::task::spawn_blocking(move || {
                        std::thread::sleep(Duration::from_secs(5));
                        net.set_link(true)
                    }));
                }
            }
            Ok(Some(TaskEvent::Finished(outcome))) => break outcome,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the task stream ended without an outcome"),
            Err(e) => panic!(
                "lost after {} of {} bytes: {e}",
                output.len(),
                LINES * numbered_line(0).len()
            ),
        }
    };
    cut.expect("the link was cut")
        .await
        .unwrap()
        .expect("link up again");
    assert_eq!(outcome, TaskOutcome::Exited { code: 7 });
    assert!(task.output.next().await.unwrap().is_none(), "one end, once");
    let expected: String = (0..LINES).map(numbered_line).collect();
    let first_wrong = output
        .iter()
        .zip(expected.as_bytes())
        .position(|(a, b)| a != b);
    assert!(
        output.len() == expected.len() && first_wrong.is_none(),
        "{} of {} bytes, first wrong at {first_wrong:?}",
        output.len(),
        expected.len()
    );
    let log = std::fs::read_to_string(sandbox.path().join("node-1.log")).unwrap();
    assert!(
        log.contains("resuming a task on a new connection"),
        "the cut never broke the connection: {log}"
    );
    let _ = agent.kill();
    let _ = agent.wait();
    coordinator.close().await;
}

/// A download cut off partway (the link to its node down for 2.5 idle timeouts, the link
/// slowed so that the cut comes mid-transfer) starts over once the node is back and brings
/// every byte. Before, the download failed with the connection (`--download` then lost the
/// run's results).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_off_partway_starts_over_once_its_node_is_back() {
    const BYTES: usize = 24_000_000;
    let sandbox = Sandbox::new();
    let (net, coordinator, mut agent) = across_a_link(&sandbox, "rel-download");
    // About 10 MB/s from the node: the file takes a few seconds to come.
    net.limit_rate("80mbit").expect("slow the link");
    let mut agent = agent.spawn().expect("spawn skyward-agent");
    let node = wait_connected(&coordinator, "node-1").await;
    let script = format!("mkdir -p out && head -c {BYTES} /dev/urandom > out/big");
    let mut task = start_sh(&coordinator, &node, script).await;
    loop {
        match task.output.next().await.expect("the task's stream") {
            Some(TaskEvent::Finished(outcome)) => {
                assert_eq!(outcome, TaskOutcome::Exited { code: 0 });
                break;
            }
            Some(_) => {}
            None => panic!("the task stream ended without an outcome"),
        }
    }
    let into = sandbox.path().join("downloaded");
    let download = tokio::spawn({
        let (node, into) = (node.clone(), into.clone());
        async move {
            skyward_coordinator::workdir::download(
                &node,
                None,
                &["out".to_string()],
                &into,
                1 << 30,
                Duration::from_secs(60),
            )
            .await
        }
    });
    // Bounded: the file grows within the deadline, or the test fails.
    let partial = into.join("out/big");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 2_000_000 {
        assert!(Instant::now() < deadline, "the download never got going");
        assert!(!download.is_finished(), "the download ended before the cut");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    net.set_link(false).expect("link down");
    tokio::time::sleep(Duration::from_secs(5)).await;
    net.set_link(true).expect("link up");
    let report = tokio::time::timeout(Duration::from_secs(90), download)
        .await
        .expect("the download finished in time")
        .unwrap()
        .expect("the download completed");
    assert_eq!(report.restarts, 1, "{report:?}");
    assert_eq!((report.files, report.bytes), (1, BYTES as u64));
    let sent = std::fs::read(sandbox.path().join("node-1/out/big")).unwrap();
    let got = std::fs::read(&partial).unwrap();
    assert!(
        sent == got,
        "{} bytes came of {}, not the same",
        got.len(),
        sent.len()
    );
    let _ = agent.kill();
    let _ = agent.wait();
    coordinator.close().await;
}

/// A reader that stops reading: the task pauses once the node's room for unacknowledged
/// output is full, `pool status` says so (and how much is held), and once the reader reads
/// again everything arrives, once, and the task ends.
#[test]
fn a_stalled_reader_pauses_its_task_and_pool_status_says_why() {
    use skyward_tests::run;
    use std::io::Read;
    use std::process::Stdio;
    const BYTES: usize = 8_000_000;
    let limit = Duration::from_secs(60);
    let sandbox = Sandbox::new();
    let settings = [
        ("SKYWARD_TASK_MEMORY", "65536"),
        ("SKYWARD_TASK_SPILL", "1048576"),
    ];
    let up = run(
        sandbox
            .skyward()
            .envs(settings)
            .args(["pool", "up", "stall"]),
        limit,
    );
    assert_eq!(up.code, Some(0), "{up:?}");
    let script = format!("head -c {BYTES} /dev/zero | tr '\\0' x; exit 3");
    let mut exec = sandbox
        .skyward()
        .args(["exec", "stall", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    // Nobody reads exec's output yet: the pipes, the coordinator and the node fill up. The
    // node's next health report (every 10 s) says its task waits.
    let deadline = Instant::now() + Duration::from_secs(45);
    let node = loop {
        let status = sandbox.pool_status("stall");
        let node = status["nodes"][0].clone();
        if node["tasks_waiting_for_room"].as_u64() == Some(1) {
            break node;
        }
        assert!(
            Instant::now() < deadline,
            "the node never said its task waits: {status}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let held = node["output_held_bytes"].as_u64().expect("held bytes");
    assert!(
        held > 1_000_000,
        "memory and spill are full: {held} bytes held"
    );
    let state = node["state"].as_str().unwrap_or_default();
    assert!(state.contains("1 task(s) paused"), "{state}");
    // The reader reads again: everything comes, once.
    let mut out = Vec::new();
    exec.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let code = exec.wait().expect("exec").code();
    assert_eq!(out.len(), BYTES);
    assert!(out.iter().all(|&b| b == b'x'));
    assert_eq!(code, Some(3));
    let down = run(sandbox.skyward().args(["pool", "down", "stall"]), limit);
    assert_eq!(down.code, Some(0), "{down:?}");
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "left running: {left:?}");
}

/// A handle taken before its node reconnected (a pool's, a run's) reaches the node where it
/// is now: a task started through it right after the connection dropped waits for the node
/// and runs. Before, such a handle kept the closed connection and every task started
/// through it failed at once (the chaos suite found it: exit 255 after any reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_handle_from_before_a_reconnect_still_starts_tasks() {
    let sandbox = Sandbox::new();
    let coordinator = loopback_coordinator("rel-handle");
    let mut agent = agent_command(&sandbox, &coordinator, "node-1", "10m")
        .spawn()
        .expect("spawn skyward-agent");
    let before = wait_connected(&coordinator, "node-1").await;
    assert!(coordinator.disconnect("node-1", "test"));
    let mut task = coordinator
        .start_task(
            &before,
            skyward_tests::command(&["echo", "after the reconnect"]),
        )
        .await
        .expect("the task waits for the node to be back");
    assert_eq!(
        skyward_tests::task_output(&mut task).await,
        b"after the reconnect\n"
    );
    assert!(before.is_connected(), "the old handle follows the node");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// A long job in a `pool up` pool whose nodes die one after another: its task moves to the
/// node the pool started in place of the first one lost. Before, a job moved tasks only
/// among the nodes it started with, so once both of those were gone the task failed (exit
/// 255) although the pool had a healthy node and retries were left.
#[test]
fn a_task_moves_onto_the_node_that_replaced_one_its_job_lost() {
    use skyward_tests::run;
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let limit = Duration::from_secs(60);
    let sandbox = Sandbox::new();
    let up = run(
        sandbox
            .skyward()
            .args(["pool", "up", "moving", "--nodes", "2"]),
        limit,
    );
    assert_eq!(up.code, Some(0), "{up:?}");
    // Local nodes share this machine's files: the task ends once the test says so.
    let done = sandbox.path().join("done");
    let script = format!(
        "while [ ! -e {} ]; do echo on $SKYWARD_NODE_ID; sleep 0.1; done; echo finished on $SKYWARD_NODE_ID",
        done.display()
    );
    let mut exec = sandbox
        .skyward()
        .args(["exec", "moving", "-n", "--retries", "2", "--", "sh", "-c"])
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut lines = BufReader::new(exec.stdout.take().unwrap()).lines();
    // Bounded: each wait below ends within the deadline or fails the test.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stderr = exec.stderr.take().unwrap();
    // The next line, or the test fails with what exec said.
    let mut last = String::new();
    let mut next_line = || {
        assert!(
            Instant::now() < deadline,
            "no line expected came in time; the last: {last}"
        );
        match lines.next() {
            Some(Ok(line)) => {
                last.clone_from(&line);
                line
            }
            _ => {
                let mut said = String::new();
                let _ = std::io::Read::read_to_string(&mut stderr, &mut said);
                panic!("exec's output ended: {said}");
            }
        }
    };
    let kill_agent_of = |node: &str| {
        let agents: Vec<i32> = sandbox
            .processes()
            .into_iter()
            .filter(|(_, cmd)| {
                cmd.contains("skyward-agent") && cmd.contains(&format!("nodes/{node} "))
            })
            .map(|(pid, _)| pid)
            .collect();
        assert_eq!(agents.len(), 1, "{node}'s agent: {:?}", sandbox.processes());
        // SAFETY: killing an agent of this test's pool.
        unsafe { libc::kill(agents[0], libc::SIGKILL) };
    };
    let on = |line: String| line.strip_prefix("on ").expect("on NODE").to_string();
    let first = on(next_line());
    kill_agent_of(&first);
    let second = loop {
        let node = on(next_line());
        if node != first {
            break node;
        }
    };
    // The pool replaces the node lost (its replacement may have taken the task already);
    // once it has a node besides the task's, that one goes too.
    loop {
        let status = sandbox.pool_status("moving");
        let other = status["nodes"].as_array().expect("nodes").iter().any(|n| {
            let id = n["node"].as_str().unwrap_or_default();
            id != first && id != second && n["state"].as_str() == Some("connected")
        });
        if other {
            break;
        }
        assert!(Instant::now() < deadline, "never replaced: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    kill_agent_of(&second);
    let third = loop {
        let node = on(next_line());
        if node != second {
            break node;
        }
    };
    // Both nodes the job started with are gone: it runs on a replacement.
    assert!(
        !["node-1", "node-2"].contains(&third.as_str()),
        "{first}, then {second}, then {third}"
    );
    std::fs::write(&done, "").unwrap();
    while next_line() != format!("finished on {third}") {}
    let mut said = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut said).unwrap();
    let code = exec.wait().expect("exec").code();
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains(&format!("running it again on {third}")),
        "{said}"
    );
    let down = run(sandbox.skyward().args(["pool", "down", "moving"]), limit);
    assert_eq!(down.code, Some(0), "{down:?}");
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "left running: {left:?}");
}
