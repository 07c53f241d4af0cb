//! Runs one task per stream: a command in its own process group, its output streamed back
//! in sequence-numbered chunks as it is produced, its end reported exactly once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use skyward_common::frame::{encode_frame, read_frame, write_frame};
use skyward_common::limits::{
    KILL_GRACE, MAX_REMEMBERED_TASKS, MAX_TASK_FRAME, MAX_TASK_START_FRAME, OUTPUT_CHUNK,
};
use skyward_common::protocol::{
    OutputStream, TaskEvent, TaskId, TaskKind, TaskOutcome, TaskRequest, TaskSpec,
};
use skyward_common::transport::take_end_if_here;
use std::os::fd::OwnedFd;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::journal::{Journal, PumpEnd, Stop};

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
    /// Every command task's journal until its end was delivered: a lost connection's
    /// tasks run on, and a coordinator back on another resumes them.
    live: Mutex<HashMap<TaskId, Arc<Journal>>>,
    /// Every attempt started here (the latest [`MAX_REMEMBERED_TASKS`]), to refuse one twice.
    started: Mutex<(HashSet<TaskId>, std::collections::VecDeque<TaskId>)>,
    /// The typed tasks this agent knows.
    pub registry: Arc<crate::typed::Registry>,
    /// Where those that may block run.
    pub task_threads: Arc<crate::task_threads::TaskThreads>,
    /// Where command tasks' processes are forked.
    spawner: Spawner,
}

/// The thread that forks command tasks' processes, started with the first. A task's
/// `PR_SET_PDEATHSIG` fires when the thread that forked it ends, so the fork must happen on a
/// thread that lives as long as the agent (tokio's blocking threads end after 10 s idle);
/// and on the async threads it would hold one, and the agent's networking, until the exec.
#[derive(Default)]
struct Spawner {
    requests: Mutex<Option<std::sync::mpsc::Sender<SpawnRequest>>>,
}

type SpawnRequest = (
    tokio::process::Command,
    tokio::sync::oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

impl Spawner {
    /// Spawns `command` on the spawner thread; the command is dropped there right after,
    /// closing the parent's copies of the child's stdio (a terminal's slave side).
    async fn spawn(
        &self,
        command: tokio::process::Command,
    ) -> std::io::Result<tokio::process::Child> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        {
            let mut requests = self.requests.lock().expect("spawner lock");
            if requests.is_none() {
                *requests = Some(start_spawner(tokio::runtime::Handle::current())?);
            }
            let requests = requests.as_ref().expect("just started");
            if let Err(std::sync::mpsc::SendError((mut command, _))) =
                requests.send((command, reply))
            {
                return command.spawn();
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread ended")))
    }
}

/// The spawner thread, forking in `runtime`'s context (so the child's exit reaches it);
/// it ends when the runner, and so the sender, goes.
fn start_spawner(
    runtime: tokio::runtime::Handle,
) -> std::io::Result<std::sync::mpsc::Sender<SpawnRequest>> {
    let (requests, incoming) = std::sync::mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("skyward-spawner".into())
        .spawn(move || {
            let _runtime = runtime.enter();
            for (mut command, reply) in incoming {
                let spawned = command.spawn();
                drop(command);
                let _ = reply.send(spawned);
            }
        })?;
    Ok(requests)
}

impl Tasks {
    /// The bytes of output every live task holds unacknowledged, and how many tasks wait
    /// for room.
    pub fn output_held(&self) -> (u64, u32) {
        let live = self.live.lock().expect("task table poisoned");
        live.values()
            .map(|journal| journal.held())
            .fold((0, 0), |(bytes, waiting), held| {
                (
                    bytes + held.bytes,
                    waiting + u32::from(held.waiting_for_room),
                )
            })
    }

    pub fn new(node_id: String, work_dir: PathBuf) -> Arc<Self> {
        Self::with_registry(node_id, work_dir, Default::default())
    }

    /// A runner that also knows the typed tasks of `registry`.
    pub fn with_registry(
        node_id: String,
        work_dir: PathBuf,
        registry: Arc<crate::typed::Registry>,
    ) -> Arc<Self> {
        Arc::new(Tasks {
            node_id,
            work_dir,
            groups: Mutex::new(HashSet::new()),
            live: Mutex::new(HashMap::new()),
            started: Mutex::new(Default::default()),
            registry,
            task_threads: Default::default(),
            spawner: Spawner::default(),
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

/// Serves one task stream opened by the coordinator; `bulk` says how to reach its TCP port.
pub async fn serve(
    mut send: SendStream,
    mut recv: RecvStream,
    tasks: Arc<Tasks>,
    bulk: Arc<crate::workdir::BulkDial>,
) {
    let spec =
        // A typed task's Start carries its whole input: the one larger frame.
        match tokio::time::timeout(START_TIMEOUT, read_frame(&mut recv, MAX_TASK_START_FRAME))
            .await
        {
            Ok(Ok(Some(TaskRequest::Start(spec)))) => spec,
            Ok(Ok(Some(TaskRequest::Resume { task, next_seq }))) => {
                return resume(send, recv, tasks, task, next_seq).await;
            }
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
    // The task's last frames before `Finished`, to go out with it in one write.
    let mut tail = Vec::new();
    let outcome = match &spec.kind {
        TaskKind::Sync(start) => {
            let work_dir = tasks.work_dir.clone();
            return crate::workdir::serve_sync(start.clone(), send, recv, work_dir, &bulk).await;
        }
        TaskKind::Download(download) => {
            let work_dir = tasks.work_dir.clone();
            return crate::workdir::serve_download(download.clone(), send, work_dir).await;
        }
        TaskKind::Noop => {
            // The coordinator ends a no-op's stream with the task: read to its end, the
            // stream is dropped quietly, not stopped (a frame, and a wake to send it).
            take_end_if_here(&mut recv);
            Some(TaskOutcome::Exited { code: 0 })
        }
        TaskKind::Command { .. } | TaskKind::Terminal { .. } => {
            return start_command(spec, send, recv, tasks).await
        }
        TaskKind::Probe(probe) => crate::probe::run(probe, spec.timeout_ms, &mut send, recv).await,
        TaskKind::Typed {
            name,
            version,
            payload,
        } => crate::typed::run(
            &spec,
            name,
            *version,
            payload.clone(),
            &mut send,
            recv,
            tasks,
        )
        .await
        .map(|(outcome, last_piece)| {
            match last_piece.map(|piece| encode_frame(&TaskEvent::Result(piece), &mut tail)) {
                Some(Err(e)) => {
                    tail.clear();
                    TaskOutcome::Failed {
                        error: format!("cannot send the task's output: {e}"),
                    }
                }
                _ => outcome,
            }
        }),
    };
    if let Some(outcome) = outcome {
        tracing::debug!(task = %spec.task, %outcome, "task finished");
        if encode_frame(&TaskEvent::Finished(outcome), &mut tail).is_ok()
            && send.write_all(&tail).await.is_ok()
        {
            let _ = send.finish();
        }
    }
}

/// Starts a command task whose journal outlives this stream, and pumps its output here.
async fn start_command(spec: TaskSpec, mut send: SendStream, recv: RecvStream, tasks: Arc<Tasks>) {
    let spill = tasks
        .work_dir
        .join(".skyward-spill")
        .join(format!("{}.out", spec.task));
    let journal = Arc::new(Journal::new(spill));
    let fresh = {
        let mut started = tasks.started.lock().expect("task table poisoned");
        let (seen, order) = &mut *started;
        match seen.insert(spec.task) {
            false => false,
            true => {
                order.push_back(spec.task);
                if order.len() > MAX_REMEMBERED_TASKS {
                    if let Some(oldest) = order.pop_front() {
                        seen.remove(&oldest);
                    }
                }
                tasks
                    .live
                    .lock()
                    .expect("task table poisoned")
                    .insert(spec.task, journal.clone());
                true
            }
        }
    };
    if !fresh {
        // The same attempt is never run twice on a node.
        let outcome = TaskOutcome::FailedToStart {
            error: format!("{} already ran on this node", spec.task),
        };
        if write_frame(&mut send, &TaskEvent::Finished(outcome))
            .await
            .is_ok()
        {
            let _ = send.finish();
        }
        return;
    }
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let task_id = spec.task;
    tokio::spawn(run_command(
        spec,
        recv,
        journal.clone(),
        tasks.clone(),
        started_tx,
    ));
    // A task that did not start has its outcome in the journal already.
    if let Ok(Ok(pid)) = started.await {
        if write_frame(&mut send, &TaskEvent::Started { pid })
            .await
            .is_err()
        {
            // Its coordinator may come back for it on another connection.
            return;
        }
    }
    let Some(generation) = journal.attach(0) else {
        return;
    };
    let end = journal.pump(&mut send, generation, 0).await;
    after_pump(&tasks, task_id, &journal, end);
}

/// A coordinator back on a new connection goes on with a task from chunk `next_seq`.
async fn resume(
    mut send: SendStream,
    recv: RecvStream,
    tasks: Arc<Tasks>,
    task: TaskId,
    next_seq: u64,
) {
    let journal = tasks
        .live
        .lock()
        .expect("task table poisoned")
        .get(&task)
        .cloned();
    let Some(journal) = journal else {
        // Unknown here (never ran, or its end was delivered): the stream just ends.
        tracing::warn!(%task, "resume of a task this node does not have");
        let _ = send.finish();
        return;
    };
    let Some(generation) = journal.attach(next_seq) else {
        tracing::warn!(%task, next_seq, "resume from output this node no longer keeps");
        let _ = send.finish();
        return;
    };
    let resumed = journal.resumed();
    tracing::info!(%task, next_seq, ?resumed, "resuming a task on a new connection");
    if write_frame(&mut send, &resumed).await.is_err() {
        return;
    }
    // A resumed task's stdin stayed with the stream it started on.
    let input = Input {
        stdin: None,
        window: None,
    };
    tokio::spawn(forward_requests(recv, input, journal.clone()));
    let end = journal.pump(&mut send, generation, next_seq).await;
    after_pump(&tasks, task, &journal, end);
}

fn after_pump(tasks: &Tasks, task: TaskId, journal: &Journal, end: PumpEnd) {
    match end {
        PumpEnd::Delivered => {
            tasks
                .live
                .lock()
                .expect("task table poisoned")
                .remove(&task);
        }
        PumpEnd::Stopped => {
            // Nobody reads its output any more: the task has no reason to run.
            let _ = journal.stop.send(Some(Stop::Abandoned));
            tasks
                .live
                .lock()
                .expect("task table poisoned")
                .remove(&task);
        }
        PumpEnd::ConnectionLost => {
            tracing::info!(%task, "connection lost; the task runs on for its coordinator to resume");
        }
        PumpEnd::Replaced => {}
    }
}

enum KillReason {
    TimedOut,
    Cancelled,
    /// Nobody is listening any more (the coordinator dropped the task's stream).
    Abandoned,
}

/// What a command task runs, and how.
struct Launch {
    argv: Vec<String>,
    cwd: Option<String>,
    wants_stdin: bool,
    /// A terminal task: `TERM` and the window's rows and columns.
    terminal: Option<(String, u16, u16)>,
}

impl Launch {
    fn of(kind: &TaskKind) -> Option<Launch> {
        match kind {
            TaskKind::Command { argv, cwd, stdin } => Some(Launch {
                argv: argv.clone(),
                cwd: cwd.clone(),
                wants_stdin: *stdin,
                terminal: None,
            }),
            TaskKind::Terminal {
                argv,
                term,
                rows,
                cols,
            } => Some(Launch {
                argv: match argv.is_empty() {
                    true => login_shell(),
                    false => argv.clone(),
                },
                cwd: None,
                wants_stdin: true,
                terminal: Some((term.clone(), *rows, *cols)),
            }),
            _ => None,
        }
    }
}

/// The node's login shell: bash where there is one.
fn login_shell() -> Vec<String> {
    let shell = ["/bin/bash", "/usr/bin/bash"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .unwrap_or("/bin/sh");
    vec![shell.to_string(), "-l".to_string()]
}

/// Runs a command, its output and outcome going to `journal`; `started` says its pid, or
/// that it did not start.
async fn run_command(
    spec: TaskSpec,
    recv: RecvStream,
    journal: Arc<Journal>,
    tasks: Arc<Tasks>,
    started: tokio::sync::oneshot::Sender<Result<u32, ()>>,
) {
    let Some(launch) = Launch::of(&spec.kind) else {
        return;
    };
    let outcome = command_outcome(&spec, &launch, recv, &journal, &tasks, started).await;
    journal.finish(outcome);
}

async fn command_outcome(
    spec: &TaskSpec,
    launch: &Launch,
    recv: RecvStream,
    journal: &Arc<Journal>,
    tasks: &Tasks,
    started: tokio::sync::oneshot::Sender<Result<u32, ()>>,
) -> TaskOutcome {
    let Some(program) = launch.argv.first() else {
        let _ = started.send(Err(()));
        return TaskOutcome::FailedToStart {
            error: "empty command".into(),
        };
    };
    let dir = resolve_cwd(&tasks.work_dir, launch.cwd.as_deref());
    let mut command = tokio::process::Command::new(program);
    command
        .args(&launch.argv[1..])
        .current_dir(&dir)
        // The agent's enrollment token is its secret, not the task's (spent or not, it would
        // end up in whatever the task prints or logs).
        .env_remove("SKYWARD_TOKEN")
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("SKYWARD_NODE_ID", &tasks.node_id)
        .env("SKYWARD_TASK_ID", spec.task.id.to_string());
    // A terminal task's stdio is the slave side of a pseudo-terminal; the agent keeps the
    // master side, through which output comes, input goes and the window is resized.
    let mut master = None;
    match &launch.terminal {
        None => {
            command
                .stdin(if launch.wants_stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
        }
        Some((term, rows, cols)) => {
            let stdio = crate::pty::open(*rows, *cols).and_then(|pty| {
                let (a, b) = (pty.slave.try_clone()?, pty.slave.try_clone()?);
                command
                    .stdin(pty.slave)
                    .stdout(a)
                    .stderr(b)
                    .env("TERM", term);
                Ok(pty.master)
            });
            match stdio {
                Ok(fd) => master = Some(fd),
                Err(e) => {
                    let _ = started.send(Err(()));
                    return TaskOutcome::FailedToStart {
                        error: format!("no pseudo-terminal: {e}"),
                    };
                }
            }
        }
    }
    let terminal = master.is_some();
    // SAFETY: prctl, setsid and ioctl are async-signal-safe; the closure touches no memory
    // of the parent.
    unsafe {
        command.pre_exec(move || {
            // If the agent dies without cleaning up, the task's leader dies with it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // Its own session (and so its own process group, as for every task).
            if terminal {
                crate::pty::become_session_leader()?;
            }
            Ok(())
        });
    }
    // The slave side stays open only in the child: its end is the master's end of output.
    // The spawner drops the command, and the parent's copy with it, right after the fork.
    let spawned = tasks.spawner.spawn(command).await;
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = started.send(Err(()));
            return TaskOutcome::FailedToStart {
                error: format!("{program}: {e}"),
            };
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

    let mut stop_rx = journal.stop.subscribe();
    let (input, mut stdout, mut stderr): (Input, Output, Output) = match master {
        Some(master) => {
            let resize = Arc::new(master);
            let file = |fd: &OwnedFd| -> Option<tokio::fs::File> {
                Some(tokio::fs::File::from_std(std::fs::File::from(
                    fd.try_clone().ok()?,
                )))
            };
            let writer = file(&resize).map(|f| Box::new(f) as Box<dyn AsyncWrite + Send + Unpin>);
            let reader = file(&resize).map(|f| Box::new(f) as Box<dyn AsyncRead + Send + Unpin>);
            (
                Input {
                    stdin: writer,
                    window: Some(resize),
                },
                reader,
                None,
            )
        }
        None => (
            Input {
                stdin: child
                    .stdin
                    .take()
                    .map(|pipe| Box::new(pipe) as Box<dyn AsyncWrite + Send + Unpin>),
                window: None,
            },
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
        ),
    };
    let requests = tokio::spawn(forward_requests(recv, input, journal.clone()));
    let _ = started.send(Ok(pid as u32));
    let (mut out_buf, mut err_buf) = (vec![0u8; OUTPUT_CHUNK], vec![0u8; OUTPUT_CHUNK]);
    let (mut out_open, mut err_open) = (stdout.is_some(), stderr.is_some());
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
    // A chunk read but not yet kept: the journal had no room. The pipes are not read
    // meanwhile (so the task waits), but a timeout or a cancel still acts.
    let mut unkept: Option<(OutputStream, Bytes)> = None;

    while status.is_none() || out_open || err_open || unkept.is_some() {
        let keeping = unkept.clone();
        tokio::select! {
            () = keep(keeping, journal), if unkept.is_some() => unkept = None,
            chunk = read_chunk(&mut stdout, &mut out_buf), if out_open && unkept.is_none() => {
                match chunk {
                    Some(data) => unkept = Some((OutputStream::Stdout, data)),
                    None => out_open = false,
                }
            },
            chunk = read_chunk(&mut stderr, &mut err_buf), if err_open && unkept.is_none() => {
                match chunk {
                    Some(data) => unkept = Some((OutputStream::Stderr, data)),
                    None => err_open = false,
                }
            },
            exit = child.wait(), if status.is_none() => {
                status = Some(exit);
                // The task is its process group: whatever it left behind goes with it.
                signal_group(pid, libc::SIGKILL);
                drain_until = Instant::now() + DRAIN_AFTER_EXIT;
            },
            Ok(()) = stop_rx.changed(), if killer.reason.is_none() && status.is_none() => {
                match *stop_rx.borrow() {
                    Some(Stop::Cancelled) => killer.kill(KillReason::Cancelled),
                    Some(Stop::Abandoned) => killer.kill(KillReason::Abandoned),
                    None => {}
                }
            },
            _ = tokio::time::sleep_until(deadline), if killer.reason.is_none() && status.is_none() => {
                killer.kill(KillReason::TimedOut);
            },
            _ = tokio::time::sleep_until(killer.kill_at), if status.is_none() => {
                signal_group(pid, libc::SIGKILL);
                killer.kill_at = far;
            },
            // Only pipes are given up on, never output read but waiting for room.
            _ = tokio::time::sleep_until(drain_until), if unkept.is_none() => {
                tracing::warn!(task = %spec.task, "output pipes still held open after the task exited; not waiting for them");
                break;
            },
        }
    }
    requests.abort();
    match (killer.reason, status) {
        (Some(KillReason::TimedOut), _) => TaskOutcome::TimedOut,
        (Some(KillReason::Cancelled), _) => TaskOutcome::Cancelled,
        (_, Some(Ok(status))) => outcome_of(status),
        (_, Some(Err(e))) => TaskOutcome::FailedToStart {
            error: format!("waiting for {program}: {e}"),
        },
        (_, None) => TaskOutcome::Cancelled,
    }
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

/// Keeps one chunk of output in the journal, once it has room (cancel-safe: the chunk is
/// kept whole or not at all).
async fn keep(chunk: Option<(OutputStream, Bytes)>, journal: &Journal) {
    if let Some((stream, data)) = chunk {
        journal.push(stream, data).await;
    }
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

type Output = Option<Box<dyn AsyncRead + Send + Unpin>>;

/// Where a task's requests go: its stdin, and for a terminal task its window.
struct Input {
    stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    window: Option<Arc<OwnedFd>>,
}

/// The next chunk of a task's output; `None` at its end. A terminal's master side ends with
/// EIO once no process holds the slave side.
async fn read_chunk(pipe: &mut Output, buf: &mut [u8]) -> Option<Bytes> {
    let pipe = pipe.as_mut()?;
    match pipe.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(Bytes::copy_from_slice(&buf[..n])),
    }
}

/// Reads the coordinator's frames after `Start` (or `Resume`): stdin data, end of stdin,
/// acknowledgements of output, cancel. A stream the coordinator reset counts as
/// cancellation; one whose connection broke does not (the coordinator may resume on
/// another).
async fn forward_requests(mut recv: RecvStream, input: Input, journal: Arc<Journal>) {
    let Input { mut stdin, window } = input;
    loop {
        match read_frame::<_, TaskRequest>(&mut recv, MAX_TASK_FRAME).await {
            Ok(Some(TaskRequest::Stdin(data))) => {
                if let Some(pipe) = stdin.as_mut() {
                    // A terminal's master side is a file: flush, or the keys wait.
                    if pipe.write_all(&data).await.is_err() || pipe.flush().await.is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Some(TaskRequest::StdinEof)) => {
                // A terminal's input never ends but by the EOF character, at a line's start.
                if let (Some(pipe), Some(_)) = (stdin.as_mut(), &window) {
                    let _ = pipe.write_all(b"\x04").await;
                    let _ = pipe.flush().await;
                }
                stdin = None;
            }
            Ok(Some(TaskRequest::Resize { rows, cols })) => {
                if let Some(fd) = &window {
                    use std::os::fd::AsRawFd;
                    if let Err(e) = crate::pty::resize(fd.as_raw_fd(), rows, cols) {
                        tracing::debug!("resizing a terminal: {e}");
                    }
                }
            }
            Ok(Some(TaskRequest::Ack { next_seq })) => journal.ack(next_seq),
            // Read on after it: the output up to the task's end still needs acknowledging,
            // or a cancelled task with much to print would wait for room for good.
            Ok(Some(TaskRequest::Cancel)) => {
                let _ = journal.stop.send(Some(Stop::Cancelled));
            }
            Ok(Some(TaskRequest::Start(_) | TaskRequest::Resume { .. })) => {
                tracing::warn!("second Start on one task stream ignored");
            }
            // The coordinator finished its side: no more requests, the task runs on.
            Ok(None) => {
                stdin = None;
                std::future::pending::<()>().await;
            }
            Err(e) if e.is_connection_lost() => return,
            Err(e) => {
                tracing::debug!("task stream from coordinator broke: {e}");
                let _ = journal.stop.send(Some(Stop::Abandoned));
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
