//! Runs one task per stream: a command in its own process group, its output streamed back
//! in sequence-numbered chunks as it is produced, its end reported exactly once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use skyward_common::frame::{read_frame, write_frame, FrameError};
use skyward_common::limits::{KILL_GRACE, MAX_TASK_FRAME, OUTPUT_CHUNK};
use skyward_common::protocol::{
    OutputStream, TaskEvent, TaskKind, TaskOutcome, TaskRequest, TaskSpec,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long to wait for a task's first frame once its stream is open.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// After the task's main process exits, how long to keep reading pipes that processes
/// which left its group may still hold open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// What every task runner shares: who we are and which process groups are alive.
pub struct Tasks {
    pub node_id: String,
    pub work_dir: PathBuf,
    groups: Mutex<HashSet<i32>>,
}

impl Tasks {
    pub fn new(node_id: String, work_dir: PathBuf) -> Arc<Self> {
        Arc::new(Tasks {
            node_id,
            work_dir,
            groups: Mutex::new(HashSet::new()),
        })
    }

    pub fn running(&self) -> u32 {
        self.groups.lock().expect("task table poisoned").len() as u32
    }

    /// Stops every running task: TERM to each group, KILL to what is left after the grace.
    pub async fn stop_all(&self) {
        let groups: Vec<i32> = self
            .groups
            .lock()
            .expect("task table poisoned")
            .iter()
            .copied()
            .collect();
        if groups.is_empty() {
            return;
        }
        tracing::info!(count = groups.len(), "stopping running tasks");
        for &pgid in &groups {
            signal_group(pgid, libc::SIGTERM);
        }
        let deadline = Instant::now() + KILL_GRACE;
        while Instant::now() < deadline && self.running() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for &pgid in &groups {
            signal_group(pgid, libc::SIGKILL);
        }
    }
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Serves one task stream opened by the coordinator.
pub async fn serve(mut send: SendStream, mut recv: RecvStream, tasks: Arc<Tasks>) {
    let spec =
        match tokio::time::timeout(START_TIMEOUT, read_frame(&mut recv, MAX_TASK_FRAME)).await {
            Ok(Ok(Some(TaskRequest::Start(spec)))) => spec,
            Ok(Ok(Some(other))) => {
                tracing::warn!("task stream began with {other:?} instead of Start; dropping it");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!("bad task stream: {e}");
                return;
            }
            Err(_) => {
                tracing::warn!("task stream opened but no task arrived within {START_TIMEOUT:?}");
                return;
            }
        };
    let outcome = match &spec.kind {
        TaskKind::Noop => Some(TaskOutcome::Exited { code: 0 }),
        TaskKind::Command { argv, cwd, stdin } => {
            run_command(&spec, argv, cwd.as_deref(), *stdin, &mut send, recv, &tasks).await
        }
        TaskKind::Probe(probe) => crate::probe::run(probe, spec.timeout_ms, &mut send, recv).await,
    };
    if let Some(outcome) = outcome {
        tracing::debug!(task = %spec.task, %outcome, "task finished");
        if write_frame(&mut send, &TaskEvent::Finished(outcome))
            .await
            .is_ok()
        {
            let _ = send.finish();
        }
    }
}

enum KillReason {
    TimedOut,
    Cancelled,
    /// Nobody is listening any more (the coordinator dropped the task's stream).
    Abandoned,
}

/// Runs a command; returns the outcome to report, or `None` when nobody is left to tell.
async fn run_command(
    spec: &TaskSpec,
    argv: &[String],
    cwd: Option<&str>,
    wants_stdin: bool,
    send: &mut SendStream,
    recv: RecvStream,
    tasks: &Tasks,
) -> Option<TaskOutcome> {
    let Some(program) = argv.first() else {
        return Some(TaskOutcome::FailedToStart {
            error: "empty command".into(),
        });
    };
    let dir = resolve_cwd(&tasks.work_dir, cwd);
    let mut command = tokio::process::Command::new(program);
    command
        .args(&argv[1..])
        .current_dir(&dir)
        // The agent's enrollment token is its secret, not the task's (spent or not, it would
        // end up in whatever the task prints or logs).
        .env_remove("SKYWARD_TOKEN")
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("SKYWARD_NODE_ID", &tasks.node_id)
        .env("SKYWARD_TASK_ID", spec.task.id.to_string())
        .stdin(if wants_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            // If the agent dies without cleaning up, the task's leader dies with it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Some(TaskOutcome::FailedToStart {
                error: format!("{program}: {e}"),
            })
        }
    };
    let pid = child.id().unwrap_or(0) as i32;
    tasks
        .groups
        .lock()
        .expect("task table poisoned")
        .insert(pid);
    let _registered = scopeguard(|| {
        tasks
            .groups
            .lock()
            .expect("task table poisoned")
            .remove(&pid);
    });

    let (cancel_tx, mut cancel_rx) = watch::channel(false);
    let requests = tokio::spawn(forward_requests(recv, child.stdin.take(), cancel_tx));

    let mut listening = write_frame(send, &TaskEvent::Started { pid: pid as u32 })
        .await
        .is_ok();
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (mut out_buf, mut err_buf) = (vec![0u8; OUTPUT_CHUNK], vec![0u8; OUTPUT_CHUNK]);
    let (mut out_open, mut err_open) = (true, true);
    let mut seq = 0u64;
    let mut status: Option<std::io::Result<ExitStatus>> = None;
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let deadline = spec
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms))
        .unwrap_or(far);
    let mut killer = Killer {
        pgid: pid,
        reason: None,
        kill_at: far,
    };
    let mut drain_until = far;

    while status.is_none() || out_open || err_open {
        tokio::select! {
            chunk = read_chunk(&mut stdout, &mut out_buf), if out_open => {
                out_open = relay(chunk, OutputStream::Stdout, send, &mut seq, &mut listening, &mut killer).await;
            },
            chunk = read_chunk(&mut stderr, &mut err_buf), if err_open => {
                err_open = relay(chunk, OutputStream::Stderr, send, &mut seq, &mut listening, &mut killer).await;
            },
            exit = child.wait(), if status.is_none() => {
                status = Some(exit);
                // The task is its process group: whatever it left behind goes with it.
                signal_group(pid, libc::SIGKILL);
                drain_until = Instant::now() + DRAIN_AFTER_EXIT;
            },
            changed = cancel_rx.changed(), if killer.reason.is_none() && status.is_none() => {
                if changed.is_ok() && *cancel_rx.borrow() {
                    killer.kill(KillReason::Cancelled);
                } else {
                    listening = false;
                    killer.kill(KillReason::Abandoned);
                }
            },
            _ = tokio::time::sleep_until(deadline), if killer.reason.is_none() && status.is_none() => {
                killer.kill(KillReason::TimedOut);
            },
            _ = tokio::time::sleep_until(killer.kill_at), if status.is_none() => {
                signal_group(pid, libc::SIGKILL);
                killer.kill_at = far;
            },
            _ = tokio::time::sleep_until(drain_until) => {
                tracing::warn!(task = %spec.task, "output pipes still held open after the task exited; not waiting for them");
                break;
            },
        }
    }
    requests.abort();
    if !listening {
        return None;
    }
    Some(match (killer.reason, status) {
        (Some(KillReason::TimedOut), _) => TaskOutcome::TimedOut,
        (Some(KillReason::Cancelled), _) => TaskOutcome::Cancelled,
        (_, Some(Ok(status))) => outcome_of(status),
        (_, Some(Err(e))) => TaskOutcome::FailedToStart {
            error: format!("waiting for {program}: {e}"),
        },
        (_, None) => TaskOutcome::Cancelled,
    })
}

/// TERM now, KILL at `kill_at` unless the group is gone by then; the first reason sticks.
struct Killer {
    pgid: i32,
    reason: Option<KillReason>,
    kill_at: Instant,
}

impl Killer {
    fn kill(&mut self, reason: KillReason) {
        if self.reason.is_none() {
            signal_group(self.pgid, libc::SIGTERM);
            self.kill_at = Instant::now() + KILL_GRACE;
            self.reason = Some(reason);
        }
    }
}

/// Sends one chunk of output if anyone is listening; returns whether the pipe is still open.
/// A failed send means the coordinator dropped the task, which then has no reason to run.
async fn relay(
    chunk: Option<Bytes>,
    stream: OutputStream,
    send: &mut SendStream,
    seq: &mut u64,
    listening: &mut bool,
    killer: &mut Killer,
) -> bool {
    let Some(data) = chunk else {
        return false;
    };
    if *listening && send_output(send, seq, stream, data).await.is_err() {
        *listening = false;
        killer.kill(KillReason::Abandoned);
    }
    true
}

fn outcome_of(status: ExitStatus) -> TaskOutcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => TaskOutcome::Exited { code },
        (None, Some(signal)) => TaskOutcome::Signaled { signal },
        (None, None) => TaskOutcome::Exited { code: -1 },
    }
}

fn resolve_cwd(work_dir: &Path, cwd: Option<&str>) -> PathBuf {
    match cwd {
        Some(dir) => work_dir.join(dir),
        None => work_dir.to_path_buf(),
    }
}

async fn read_chunk<R: AsyncRead + Unpin>(pipe: &mut R, buf: &mut [u8]) -> Option<Bytes> {
    match pipe.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(Bytes::copy_from_slice(&buf[..n])),
    }
}

async fn send_output(
    send: &mut SendStream,
    seq: &mut u64,
    stream: OutputStream,
    data: Bytes,
) -> Result<(), FrameError> {
    let event = TaskEvent::Output {
        seq: *seq,
        stream,
        data,
    };
    *seq += 1;
    write_frame(send, &event).await
}

/// Reads the coordinator's frames after `Start`: stdin data, end of stdin, cancel.
/// A broken stream counts as cancellation: nobody is left to read the task's output.
async fn forward_requests(
    mut recv: RecvStream,
    mut stdin: Option<tokio::process::ChildStdin>,
    cancel: watch::Sender<bool>,
) {
    loop {
        match read_frame::<_, TaskRequest>(&mut recv, MAX_TASK_FRAME).await {
            Ok(Some(TaskRequest::Stdin(data))) => {
                if let Some(pipe) = stdin.as_mut() {
                    if pipe.write_all(&data).await.is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Some(TaskRequest::StdinEof)) => stdin = None,
            Ok(Some(TaskRequest::Cancel)) => {
                let _ = cancel.send(true);
                return;
            }
            Ok(Some(TaskRequest::Start(_))) => {
                tracing::warn!("second Start on one task stream ignored");
            }
            // The coordinator finished its side: no more requests, the task runs on.
            Ok(None) => {
                stdin = None;
                std::future::pending::<()>().await;
            }
            Err(e) => {
                tracing::debug!("task stream from coordinator broke: {e}");
                drop(cancel);
                return;
            }
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}
