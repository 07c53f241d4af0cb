//! Task output that survives slow readers, outages and long runs (issue 17): every byte
//! once and in order, with the agent's bounds reached for real.

use std::time::{Duration, Instant};

use skyward_common::protocol::{TaskEvent, TaskOutcome, TaskSpec};
use skyward_tests::{agent_command, dir_bytes, loopback_coordinator, wait_connected, Sandbox};

/// The agent's bounds for one task's output in this test: 64 KiB of memory, 1 MiB of spill
/// (its defaults are 16 MiB and 1 GiB; the agent's own settings lower them).
const MEMORY: usize = 64 * 1024;
const SPILL: usize = 1024 * 1024;

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
    let mut task = coordinator
        .start_task(
            &node,
            TaskSpec::command(
                0,
                0,
                vec!["sh".into(), "-c".into(), script],
                vec![],
                None,
                false,
            ),
        )
        .await
        .unwrap();
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
