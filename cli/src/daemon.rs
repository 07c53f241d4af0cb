//! The background coordinator of a pool that outlives a command (`skyward pool up`): it owns
//! the pool (its record, its coordinator endpoint, its nodes), serves `exec`, `pool status`
//! and `logs` on a Unix socket only its user can open, keeps every task's output in a log
//! file of the pool's, and tears the pool down on SIGTERM (`skyward pool down`) or when its
//! TTL ends.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use skyward_common::frame::{read_frame, write_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::cli::{interrupt_signals, pool_plan};
use crate::exit::{or_exit, FAILURE, USAGE};
use crate::output::{accelerator_lines, OutputMode, Renderer};
use crate::persistent::{
    check_pool_name, socket_path, ControlReply, ControlRequest, NodeStatus, PlaceStatus,
    PoolStatus, TaskStatus, UpArgs, MAX_CONTROL_FRAME,
};
use skyward_common::protocol::TaskEvent;
use skyward_coordinator::job::JobRequest;
use skyward_coordinator::pool::Pool;
use skyward_coordinator::run::{RunError, RunEvent, TaskReport};
use skyward_coordinator::server::Admitted;
use skyward_coordinator::session::PoolSession;
use skyward_coordinator::store::skyward_home;
use skyward_core::lifecycle::{self, Lifecycle, Phase};

/// A task's log stops growing past this (the task runs on); the log says so.
const MAX_TASK_LOG: u64 = 256 * 1024 * 1024;
/// `pool status` lists this many of the most recent tasks.
const STATUS_TASKS: usize = 100;
/// How long a client has to say what it wants.
const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// How much of a log one reply carries.
const LOG_CHUNK: usize = 64 * 1024;

#[derive(Debug)]
struct TaskEntry {
    command: String,
    node: Option<String>,
    /// `None` until the task ends; then how it ended and its exit code.
    ended: Option<(String, Option<i32>)>,
    started: bool,
    since: Instant,
    log_bytes: u64,
    /// The task's log file, open while the task runs (opened at its first output).
    log: Option<std::fs::File>,
    /// Since when its node has been out of reach (its output held there), until resumed.
    unreachable_since: Option<Instant>,
}

struct Daemon {
    session: PoolSession,
    pool: OnceLock<Pool>,
    started: Instant,
    ttl: Option<Duration>,
    /// Progress lines while the pool comes up, for `pool up` to show.
    notes: Mutex<Vec<String>>,
    /// Bumped on every note, phase change and task event: what watchers and log followers
    /// wait on.
    changed: watch::Sender<u64>,
    tasks: Mutex<BTreeMap<u64, TaskEntry>>,
    next_task: Mutex<u64>,
    logs: PathBuf,
    /// Detached jobs, stopped when the pool goes.
    detached: Mutex<Vec<AbortHandle>>,
    /// What became of each node replaced to keep the pool's size, oldest first.
    replacements: Mutex<Vec<String>>,
    /// How many new nodes may replace lost ones, and how fast.
    budget: skyward_core::membership::Budget,
    /// How offers are chosen: where replacements may come from when the pool's own offer
    /// has none.
    selection: skyward_core::selection::Selection,
}

/// `skyward pool serve NAME ...`: run the pool until SIGTERM or its TTL.
pub async fn serve(args: UpArgs) -> i32 {
    let checked = check_pool_name(&args.name)
        .and_then(|()| pool_plan(&args.pool))
        .and_then(|plan| Ok((plan, skyward_home()?)));
    let (plan, home) = or_exit!(checked, USAGE);
    let (mut sigint, mut sigterm) = or_exit!(interrupt_signals(), FAILURE);
    // The record first: its name is unique, so of two coordinators started for one name
    // (two `pool up` at once) the second stops here, before it touches the first's socket.
    let session = match PoolSession::start(&plan, &home, &args.name) {
        Ok(session) => session,
        Err(error) => {
            eprintln!("skyward: {error}");
            return crate::exit::start_error(&error);
        }
    };
    let socket = socket_path(&home, &args.name);
    // A socket left by a coordinator that died: `pool up` checked that none is alive.
    let _ = std::fs::remove_file(&socket);
    let listener = match bind_owner_only(&socket) {
        Ok(listener) => listener,
        Err(message) => {
            eprintln!("skyward: {message}");
            crate::pool_session::finish(&session, &mut sigint).await;
            return FAILURE;
        }
    };
    let logs = session.dir.join("logs");
    let daemon = Arc::new(Daemon {
        session,
        pool: OnceLock::new(),
        started: Instant::now(),
        ttl: plan.spec.ttl,
        notes: Mutex::new(Vec::new()),
        changed: watch::channel(0).0,
        tasks: Mutex::new(BTreeMap::new()),
        next_task: Mutex::new(1),
        logs,
        detached: Mutex::new(Vec::new()),
        replacements: Mutex::new(Vec::new()),
        budget: skyward_core::membership::Budget::per_place(plan.max_replacements, plan.spec.nodes),
        selection: plan.selection.clone(),
    });
    let accepting = tokio::spawn(accept(listener, daemon.clone()));
    if let Some(warning) = daemon.session.unreachable_warning(&plan) {
        daemon.note(format!("skyward: {warning}"));
    }
    let mut renderer = Renderer::new(
        OutputMode::Raw,
        NoteWriter::new(&daemon),
        NoteWriter::new(&daemon),
    );
    let up = tokio::select! {
        up = crate::pool_session::bring_up(&daemon.session, &plan, &mut renderer, false) => up,
        _ = sigint.recv() => Err("stopped (SIGINT) before the pool was up".into()),
        _ = sigterm.recv() => Err("stopped (SIGTERM) before the pool was up".into()),
    };
    let code = match up {
        Ok(pool) => {
            let _ = daemon.pool.set(pool);
            // The pool state says it is up (`bring_up` told it); watchers look again.
            daemon.changed.send_modify(|n| *n += 1);
            eprintln!("skyward: pool {} is up", args.name);
            let keeping = tokio::spawn(keep_node_count(daemon.clone()));
            daemon
                .detached
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(keeping.abort_handle());
            let ttl = async {
                match plan.spec.ttl {
                    Some(ttl) => {
                        tokio::time::sleep(ttl.saturating_sub(daemon.started.elapsed())).await
                    }
                    None => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                _ = ttl => "the pool's TTL passed",
                _ = sigint.recv() => "SIGINT",
                _ = sigterm.recv() => "SIGTERM",
            };
            eprintln!("skyward: {why}: tearing down pool {}", args.name);
            0
        }
        Err(message) => {
            daemon.changed.send_modify(|n| *n += 1);
            eprintln!("skyward: {message}");
            FAILURE
        }
    };
    daemon.happened(lifecycle::Event::TeardownRequested);
    for job in daemon
        .detached
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        job.abort();
    }
    let clean = crate::pool_session::finish(&daemon.session, &mut sigint).await;
    daemon.changed.send_modify(|n| *n += 1);
    accepting.abort();
    let _ = std::fs::remove_file(&socket);
    match clean {
        true => code,
        false => FAILURE,
    }
}

/// Keeps the pool at its size within its replacement budget (see
/// [`skyward_coordinator::keeper`]); what became of each lost node is in `pool status`.
async fn keep_node_count(daemon: Arc<Daemon>) {
    use skyward_coordinator::keeper::{keep_size, Kept};
    let Ok(pool) = daemon.ready_pool() else {
        return;
    };
    let mut on_news = |news: Kept<'_>| match news {
        Kept::Progress(event) => daemon.session.record_progress(&event),
        Kept::Replacement(line) => daemon.note_replacement(line),
        // The pool state says it: `pool status` asks it.
        Kept::Shortfall(_) => {}
    };
    keep_size(
        pool,
        &daemon.session.providers,
        &daemon.selection,
        daemon.budget.clone(),
        &mut on_news,
    )
    .await;
}

/// Binds the control socket so that only this user can connect: the directory is 0700 and
/// the socket 0600 (and each client's uid is checked as well).
fn bind_owner_only(socket: &std::path::Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = socket.parent().unwrap_or(std::path::Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let listener = UnixListener::bind(socket).map_err(|e| {
        format!(
            "cannot listen on {}: {e}; a shorter SKYWARD_HOME helps if the path is long",
            socket.display()
        )
    })?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    Ok(listener)
}

async fn accept(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_client(daemon.clone(), stream));
            }
            Err(e) => {
                tracing::warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_client(daemon: Arc<Daemon>, stream: UnixStream) {
    // SAFETY: getuid cannot fail and touches no memory.
    let me = unsafe { libc::getuid() };
    match stream.peer_cred() {
        Ok(peer) if peer.uid() == me => {}
        _ => return,
    }
    let (mut from_client, mut to_client) = stream.into_split();
    let first = tokio::time::timeout(
        REQUEST_WAIT,
        read_frame::<_, ControlRequest>(&mut from_client, MAX_CONTROL_FRAME),
    )
    .await;
    let Ok(Ok(Some(request))) = first else {
        return;
    };
    let _ = match request {
        ControlRequest::Watch => watch_startup(&daemon, &mut to_client).await,
        ControlRequest::Status => {
            let reply = match daemon.status() {
                Ok(status) => ControlReply::Status(Box::new(status)),
                Err(why) => ControlReply::Refused(why),
            };
            write_frame(&mut to_client, &reply).await
        }
        ControlRequest::Exec { job, detach } => {
            exec(daemon, job, detach, from_client, &mut to_client).await
        }
        ControlRequest::Logs { task, follow } => logs(&daemon, task, follow, &mut to_client).await,
        ControlRequest::Shell {
            node,
            argv,
            term,
            rows,
            cols,
        } => {
            let terminal = Terminal {
                node,
                argv,
                term,
                rows,
                cols,
            };
            shell(&daemon, terminal, from_client, &mut to_client).await
        }
        ControlRequest::Stdin(_) | ControlRequest::StdinEof | ControlRequest::Resize { .. } => {
            let reply = ControlReply::Refused("stdin without a job".into());
            write_frame(&mut to_client, &reply).await
        }
    };
}

type Sent = Result<(), skyward_common::frame::FrameError>;

/// Sends the progress notes so far and as they come, until the pool is up or has failed.
async fn watch_startup(daemon: &Daemon, to_client: &mut OwnedWriteHalf) -> Sent {
    let mut changed = daemon.changed.subscribe();
    let mut seen = 0;
    loop {
        let (notes, lifecycle) = {
            let notes = daemon.notes.lock().unwrap_or_else(|p| p.into_inner());
            (notes[seen..].to_vec(), daemon.lifecycle())
        };
        seen += notes.len();
        for note in notes {
            write_frame(to_client, &ControlReply::Note(note)).await?;
        }
        let last = match (lifecycle.phase(), lifecycle.failure()) {
            (Phase::Provisioning, _) => None,
            // Up, and the pool handed over (a moment later): ready for requests.
            (Phase::Ready { .. }, _) if daemon.pool.get().is_none() => None,
            (Phase::Ready { .. }, _) => Some(ControlReply::Ready),
            (_, Some(why)) => Some(ControlReply::Failed(why.to_string())),
            (_, None) => Some(ControlReply::Failed("the pool is being torn down".into())),
        };
        if let Some(last) = last {
            return write_frame(to_client, &last).await;
        }
        if changed.changed().await.is_err() {
            return Ok(());
        }
    }
}

/// Runs a job. Attached, its events go to the client as they come and the client leaving
/// cancels it; detached, it runs on by itself and only its logs keep its output.
async fn exec(
    daemon: Arc<Daemon>,
    job: JobRequest,
    detach: bool,
    from_client: OwnedReadHalf,
    to_client: &mut OwnedWriteHalf,
) -> Sent {
    let (nodes, ticket) = match daemon.begin_job() {
        Ok((pool, ticket)) => (pool.nodes().len(), ticket),
        Err(why) => return write_frame(to_client, &ControlReply::Refused(why)).await,
    };
    let numbers = daemon.admit(&job, nodes);
    let first = numbers[0];
    let accepted = ControlReply::Accepted {
        tasks: numbers.clone(),
        nodes,
    };
    write_frame(to_client, &accepted).await?;
    if detach {
        let running = daemon.clone();
        let handle = tokio::spawn(async move {
            let _counted = ticket;
            let Ok(pool) = running.ready_pool() else {
                return;
            };
            let (events, mut received) = mpsc::channel(64);
            let job_run = running.session.run(pool, &job, None, first, events);
            let logging = async {
                while let Some(event) = received.recv().await {
                    running.observe(first, &event);
                }
            };
            let (result, ()) = tokio::join!(job_run, logging);
            if let Err(message) = result {
                running.end_all(&numbers, &format!("did not start: {message}"));
            }
            running.end_all(&numbers, "cancelled");
        });
        daemon
            .detached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle.abort_handle());
        return Ok(());
    }
    let Ok(pool) = daemon.ready_pool() else {
        return Ok(());
    };
    // Frames from the client are read apart from the job: a read cut short by another
    // branch would lose bytes of a frame.
    let (client_tx, mut client_rx) = mpsc::channel::<Option<ControlRequest>>(8);
    let reader = tokio::spawn(read_requests(from_client, client_tx));
    let (stdin, mut stdin_writer) = match job.stdin {
        true => {
            let (reader, writer) = tokio::io::duplex(256 * 1024);
            (
                Some(Box::new(reader) as skyward_coordinator::run::TaskInput),
                Some(writer),
            )
        }
        false => (None, None),
    };
    let (events, mut received) = mpsc::channel(64);
    let sent = {
        let job_run = daemon.session.run(pool, &job, stdin, first, events);
        tokio::pin!(job_run);
        let result = loop {
            tokio::select! {
                result = &mut job_run => break Some(result),
                Some(event) = received.recv() => {
                    daemon.observe(first, &event);
                    if write_frame(to_client, &ControlReply::Event(event)).await.is_err() {
                        break None;
                    }
                }
                request = client_rx.recv() => match request {
                    Some(Some(ControlRequest::Stdin(data))) => {
                        if let Some(writer) = &mut stdin_writer {
                            if writer.write_all(&data).await.is_err() {
                                stdin_writer = None;
                            }
                        }
                    }
                    // Dropping the writer is the task's end of input.
                    Some(Some(ControlRequest::StdinEof)) => stdin_writer = None,
                    Some(Some(_)) => {}
                    // The client left: the job's future goes, which cancels its tasks.
                    Some(None) | None => break None,
                },
            }
        };
        match result {
            Some(result) => {
                // Events sent before the job's end may still wait in the channel.
                while let Ok(event) = received.try_recv() {
                    daemon.observe(first, &event);
                    write_frame(to_client, &ControlReply::Event(event)).await?;
                }
                match result {
                    Ok(reports) => write_frame(to_client, &ControlReply::Done(reports)).await,
                    Err(message) => {
                        daemon.end_all(&numbers, &format!("did not start: {message}"));
                        write_frame(to_client, &ControlReply::Failed(message)).await
                    }
                }
            }
            None => Ok(()),
        }
    };
    reader.abort();
    daemon.end_all(&numbers, "cancelled");
    drop(ticket);
    sent
}

/// What `skyward shell` asked for.
struct Terminal {
    node: Option<String>,
    argv: Vec<String>,
    term: String,
    rows: u16,
    cols: u16,
}

/// A terminal task on a node, its output going to the client as it comes and the client's
/// keys and window sizes to it, until it ends; the client leaving cancels it.
async fn shell(
    daemon: &Daemon,
    terminal: Terminal,
    from_client: OwnedReadHalf,
    to_client: &mut OwnedWriteHalf,
) -> Sent {
    let (pool, _counted) = match daemon.begin_job() {
        Ok(admitted) => admitted,
        Err(why) => return write_frame(to_client, &ControlReply::Refused(why)).await,
    };
    let coordinator = &daemon.session.coordinator;
    // The node's current connection (it may have reconnected since the pool came up).
    let live: Vec<_> = pool
        .nodes()
        .iter()
        .filter_map(|n| coordinator.node(&n.node_id))
        .filter(|n| n.is_connected() && n.lost_reason().is_none())
        .collect();
    let node = match &terminal.node {
        Some(id) => live.iter().find(|n| &n.node_id == id),
        None => live.iter().min_by_key(|n| n.running()),
    };
    let Some(node) = node.cloned() else {
        let names: Vec<&str> = live.iter().map(|n| n.node_id.as_str()).collect();
        let why = match &terminal.node {
            Some(id) => format!(
                "pool {} has no connected node {id}; its nodes: {}",
                daemon.session.name,
                names.join(", ")
            ),
            None => format!("pool {} has no connected node", daemon.session.name),
        };
        return write_frame(to_client, &ControlReply::Refused(why)).await;
    };
    let label = match terminal.argv.is_empty() {
        true => "(shell)".to_string(),
        false => shlex::try_join(terminal.argv.iter().map(String::as_str))
            .unwrap_or_else(|_| terminal.argv.join(" ")),
    };
    let number = daemon.admit_labels(vec![label])[0];
    let spec = skyward_common::protocol::TaskSpec::terminal(
        0,
        terminal.argv,
        terminal.term,
        terminal.rows,
        terminal.cols,
    );
    let remote = match coordinator.start_task(&node, spec).await {
        Ok(remote) => remote,
        Err(e) => {
            daemon.end_all(&[number], &format!("did not start: {e}"));
            return write_frame(to_client, &ControlReply::Failed(e.to_string())).await;
        }
    };
    let accepted = ControlReply::Accepted {
        tasks: vec![number],
        nodes: 1,
    };
    write_frame(to_client, &accepted).await?;
    let node_id = node.node_id.clone();
    daemon.observe(
        number,
        &RunEvent::Started {
            task: 0,
            node: node_id.clone(),
        },
    );
    let (mut input, mut output) = (remote.input, remote.output);
    let mut cancel_on_drop = input.cancel_on_drop();
    // Both directions are read apart from this loop: a read cut short would lose bytes.
    let (events_tx, mut events) = mpsc::channel(16);
    let reading = tokio::spawn(async move {
        loop {
            let event = output.next().await;
            let more = matches!(
                event,
                Ok(Some(TaskEvent::Output { .. } | TaskEvent::Started { .. }))
            );
            if events_tx.send(event).await.is_err() || !more {
                return;
            }
        }
    });
    let (client_tx, mut client_rx) = mpsc::channel::<Option<ControlRequest>>(8);
    let requests = tokio::spawn(read_requests(from_client, client_tx));
    let ended = |outcome| RunEvent::Finished {
        task: 0,
        report: TaskReport {
            node: node_id.clone(),
            outcome,
        },
    };
    let sent = loop {
        tokio::select! {
            event = events.recv() => {
                let event = match event {
                    Some(Ok(Some(TaskEvent::Output { stream, data, .. }))) => RunEvent::Output {
                        task: 0,
                        node: node_id.clone(),
                        stream,
                        data,
                    },
                    Some(Ok(Some(TaskEvent::Started { .. } | TaskEvent::Probe(_) | TaskEvent::Result(_) | TaskEvent::Resumed { .. }))) => continue,
                    Some(Ok(Some(TaskEvent::Finished(outcome)))) => ended(Ok(outcome)),
                    Some(Ok(None)) | None => ended(Err(RunError::Protocol {
                        node: node_id.clone(),
                        message: "the terminal ended without an outcome".into(),
                    })),
                    Some(Err(e)) => ended(Err(e.into())),
                };
                daemon.observe(number, &event);
                if let RunEvent::Finished { report, .. } = event {
                    cancel_on_drop.disarm();
                    break write_frame(to_client, &ControlReply::Done(vec![report])).await;
                }
                if let Err(e) = write_frame(to_client, &ControlReply::Event(event)).await {
                    break Err(e);
                }
            }
            request = client_rx.recv() => {
                let sent = match request {
                    Some(Some(ControlRequest::Stdin(data))) => input.stdin(data).await,
                    Some(Some(ControlRequest::StdinEof)) => input.close_stdin().await,
                    Some(Some(ControlRequest::Resize { rows, cols })) => input.resize(rows, cols).await,
                    Some(Some(_)) => Ok(()),
                    // The client left: the guard cancels the terminal.
                    Some(None) | None => break Ok(()),
                };
                if let Err(e) = sent {
                    tracing::debug!("shell input: {e}");
                }
            }
        }
    };
    reading.abort();
    requests.abort();
    daemon.end_all(&[number], "cancelled");
    sent
}

async fn read_requests(
    mut from_client: OwnedReadHalf,
    requests: mpsc::Sender<Option<ControlRequest>>,
) {
    loop {
        let request = read_frame::<_, ControlRequest>(&mut from_client, MAX_CONTROL_FRAME)
            .await
            .ok()
            .flatten();
        let end = request.is_none();
        if requests.send(request).await.is_err() || end {
            return;
        }
    }
}

/// Sends task `task`'s log so far, and with `follow`, what it adds until the task ends.
async fn logs(daemon: &Daemon, task: u64, follow: bool, to_client: &mut OwnedWriteHalf) -> Sent {
    let name = &daemon.session.name;
    let mut changed = daemon.changed.subscribe();
    let Some(mut ended) = daemon.task_ended(task) else {
        let why =
            format!("pool {name} has no task {task}: `skyward pool status {name}` lists its tasks");
        return write_frame(to_client, &ControlReply::Refused(why)).await;
    };
    let path = daemon.log_path(task);
    let mut offset = 0u64;
    let mut buf = vec![0u8; LOG_CHUNK];
    loop {
        // Whatever the task wrote before it was seen to end is in the file by now.
        if let Ok(mut file) = tokio::fs::File::open(&path).await {
            use tokio::io::AsyncSeekExt;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(skyward_common::frame::FrameError::Io)?;
            loop {
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(skyward_common::frame::FrameError::Io)?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                let chunk = ControlReply::Log(Bytes::copy_from_slice(&buf[..n]));
                write_frame(to_client, &chunk).await?;
            }
        }
        if ended.is_some() || !follow {
            return write_frame(to_client, &ControlReply::LogEnd { ended }).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changed.changed()).await;
        ended = daemon.task_ended(task).flatten();
    }
}

impl Daemon {
    /// Says what became of a lost node: on the pool's log and in `pool status`.
    fn note_replacement(&self, line: String) {
        eprintln!("skyward: {line}");
        self.replacements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Where the pool is in its life: the one phase, kept in the pool state, for every
    /// request to check and `pool status` to show.
    fn lifecycle(&self) -> Lifecycle {
        self.session.coordinator.lifecycle()
    }

    /// Tells the pool's lifecycle what happened. Only events its phase allows are sent here
    /// (the daemon brings the pool up once and tears it down once); jobs go through
    /// [`Daemon::begin_job`], which answers a refusal.
    fn happened(&self, event: lifecycle::Event) {
        if let Err(refused) = self.session.coordinator.lifecycle_event(event) {
            tracing::error!("pool lifecycle: {refused:?}");
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Admits a job: the pool, and a ticket that counts the job as running until dropped;
    /// a pool coming up or going away refuses it, saying which.
    fn begin_job(&self) -> Result<(&Pool, Admitted), String> {
        let name = &self.session.name;
        // Counted from here: dropped (the job ends) on every way out.
        let ticket = self
            .session
            .coordinator
            .admit_job()
            .map_err(|refused| format!("pool {name}: {refused}"))?;
        match self.pool.get() {
            Some(pool) => Ok((pool, ticket)),
            None => Err(format!("pool {name} is still coming up")),
        }
    }

    fn note(&self, line: String) {
        eprintln!("{line}");
        self.notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The pool, once it is up and until it goes.
    fn ready_pool(&self) -> Result<&Pool, String> {
        let name = &self.session.name;
        match (self.lifecycle().phase(), self.pool.get()) {
            (Phase::Ready { .. }, Some(pool)) => Ok(pool),
            (Phase::Provisioning, _) => Err(format!("pool {name} is still coming up")),
            _ => Err(format!("pool {name} is being torn down")),
        }
    }

    /// Numbers the job's tasks, pool-wide.
    fn admit(&self, job: &JobRequest, nodes: usize) -> Vec<u64> {
        let labels = job.labels();
        let labels = (0..job.task_count(nodes))
            .map(|i| {
                labels
                    .get(i)
                    .or(labels.first())
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        self.admit_labels(labels)
    }

    /// Numbers tasks with these command lines, pool-wide.
    fn admit_labels(&self, labels: Vec<String>) -> Vec<u64> {
        let mut next = self.next_task.lock().unwrap_or_else(|p| p.into_inner());
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        labels
            .into_iter()
            .map(|command| {
                let number = *next;
                *next += 1;
                tasks.insert(
                    number,
                    TaskEntry {
                        command,
                        node: None,
                        ended: None,
                        started: false,
                        since: Instant::now(),
                        log_bytes: 0,
                        log: None,
                        unreachable_since: None,
                    },
                );
                number
            })
            .collect()
    }

    fn log_path(&self, task: u64) -> PathBuf {
        self.logs.join(format!("{task}.log"))
    }

    /// Keeps what an event says about task `first + its index`: its node, its state, its
    /// output (in its log).
    fn observe(&self, first: u64, event: &RunEvent) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            RunEvent::Started { task, node } => {
                if let Some(entry) = tasks.get_mut(&(first + *task as u64)) {
                    entry.node = Some(node.clone());
                    entry.started = true;
                    entry.since = Instant::now();
                }
            }
            RunEvent::Retrying { task, to, .. } => {
                if let Some(entry) = tasks.get_mut(&(first + *task as u64)) {
                    entry.node = Some(to.clone());
                }
            }
            RunEvent::Output { task, data, .. } => {
                let number = first + *task as u64;
                if let Some(entry) = tasks.get_mut(&number) {
                    self.append_log(number, entry, data);
                }
            }
            RunEvent::Finished { task, report } => {
                if let Some(entry) = tasks.get_mut(&(first + *task as u64)) {
                    entry.log = None;
                    if !report.node.is_empty() {
                        entry.node = Some(report.node.clone());
                    }
                    entry.ended = Some(match &report.outcome {
                        Ok(outcome) => (outcome.to_string(), Some(outcome.exit_code())),
                        Err(why) => (format!("lost: {why}"), None),
                    });
                }
            }
            RunEvent::NodeUnreachable { node, .. } => {
                for entry in tasks.values_mut() {
                    if entry.ended.is_none() && entry.node.as_ref() == Some(node) {
                        entry.unreachable_since.get_or_insert_with(Instant::now);
                    }
                }
            }
            RunEvent::Resumed { task, .. } => {
                if let Some(entry) = tasks.get_mut(&(first + *task as u64)) {
                    entry.unreachable_since = None;
                }
            }
            RunEvent::NodeInterrupted { .. } | RunEvent::Transfer { .. } => {}
        }
        drop(tasks);
        self.changed.send_modify(|n| *n += 1);
    }

    fn append_log(&self, task: u64, entry: &mut TaskEntry, data: &[u8]) {
        if entry.log_bytes >= MAX_TASK_LOG {
            return;
        }
        let kept = &data[..data.len().min((MAX_TASK_LOG - entry.log_bytes) as usize)];
        entry.log_bytes += kept.len() as u64;
        let written = (|| {
            if entry.log.is_none() {
                std::fs::create_dir_all(&self.logs)?;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path(task))?;
                entry.log = Some(file);
            }
            let Some(log) = entry.log.as_mut() else {
                return Ok(());
            };
            log.write_all(kept)?;
            if kept.len() < data.len() {
                let note = format!(
                    "\n[skyward: the log stops here at {MAX_TASK_LOG} bytes; the task runs on]\n"
                );
                log.write_all(note.as_bytes())?;
            }
            std::io::Result::Ok(())
        })();
        if let Err(e) = written {
            tracing::warn!("task {task}'s log: {e}");
        }
    }

    /// Ends every task of `numbers` that has not ended, saying how.
    fn end_all(&self, numbers: &[u64], how: &str) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for number in numbers {
            if let Some(entry) = tasks.get_mut(number) {
                entry.log = None;
                entry.ended.get_or_insert_with(|| (how.to_string(), None));
            }
        }
        drop(tasks);
        self.changed.send_modify(|n| *n += 1);
    }

    /// `None`: no such task; `Some(None)`: it has not ended; otherwise how it ended.
    fn task_ended(&self, task: u64) -> Option<Option<String>> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks
            .get(&task)
            .map(|entry| entry.ended.as_ref().map(|(how, _)| how.clone()))
    }

    fn status(&self) -> Result<PoolStatus, String> {
        let pool = self.ready_pool()?;
        let (offer, market) = pool.offer();
        let price = offer.price(market);
        let up = self.started.elapsed();
        let coordinator = &self.session.coordinator;
        let nodes = pool
            .nodes()
            .iter()
            .map(|node| {
                // The node's current connection: it may have reconnected since it came up.
                let node = coordinator
                    .node(&node.node_id)
                    .unwrap_or_else(|| node.clone());
                let health = node.health();
                NodeStatus {
                    node: node.node_id.clone(),
                    address: node.address.to_string(),
                    state: match (node.lost_reason(), node.interruption()) {
                        (Some(why), _) => format!("lost: {why}"),
                        (None, Some(notice)) => format!(
                            "interrupted: {} {} at {}",
                            notice.source, notice.action, notice.at
                        ),
                        (None, None) if node.is_connected() => match &health {
                            Some(h) if h.tasks_waiting_for_room > 0 => format!(
                                "connected; {} task(s) paused, {} of output held unacknowledged (a slow reader)",
                                h.tasks_waiting_for_room,
                                skyward_coordinator::workdir::human_bytes(h.output_held_bytes)
                            ),
                            _ => "connected".into(),
                        },
                        (None, None) => "reconnecting".into(),
                    },
                    running_tasks: node.running(),
                    cpus: node.inventory.cpu_count,
                    memory_bytes: node.inventory.memory_bytes,
                    accelerators: accelerator_lines(&node.node_id, &node.inventory),
                    load_avg_1m: health.as_ref().map(|h| h.load_avg_1m),
                    memory_available_bytes: health.as_ref().map(|h| h.memory_available_bytes),
                    output_held_bytes: health.as_ref().map(|h| h.output_held_bytes),
                    tasks_waiting_for_room: health.map(|h| h.tasks_waiting_for_room),
                }
            })
            .collect::<Vec<_>>();
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let recent: Vec<TaskStatus> = tasks
            .iter()
            .rev()
            .take(STATUS_TASKS)
            .rev()
            .map(|(number, entry)| TaskStatus {
                task: *number,
                command: entry.command.clone(),
                node: entry.node.clone(),
                state: match (&entry.ended, entry.started) {
                    (Some((how, _)), _) => how.clone(),
                    (None, true) => match entry.unreachable_since {
                        Some(since) => format!(
                            "running; its node out of reach for {}, its output held there",
                            humantime::format_duration(Duration::from_secs(
                                since.elapsed().as_secs()
                            ))
                        ),
                        None => "running".into(),
                    },
                    (None, false) => "queued".into(),
                },
                exit_code: entry.ended.as_ref().and_then(|(_, code)| *code),
                age_seconds: entry.since.elapsed().as_secs(),
            })
            .collect();
        Ok(PoolStatus {
            name: self.session.name.clone(),
            pid: std::process::id(),
            provider: offer.provider.clone(),
            region: offer.region.clone(),
            instance_type: offer.instance_type.clone(),
            market: market.to_string(),
            price_per_hour: price,
            up_seconds: up.as_secs(),
            cost_so_far: price.map(|p| p * nodes.len() as f64 * up.as_secs_f64() / 3600.0),
            ttl_left_seconds: self.ttl.map(|ttl| ttl.saturating_sub(up).as_secs()),
            nodes,
            tasks: recent,
            phase: self.lifecycle().phase().to_string(),
            replacements: self
                .replacements
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            shortfall: coordinator.shortfall(),
            places: coordinator
                .places()
                .into_iter()
                .map(|(node, state)| PlaceStatus { node, state })
                .collect(),
        })
    }
}

/// Lines the renderer writes while the pool comes up, kept as notes for `pool up` to show.
struct NoteWriter {
    daemon: Arc<Daemon>,
    line: Vec<u8>,
}

impl NoteWriter {
    fn new(daemon: &Arc<Daemon>) -> Self {
        NoteWriter {
            daemon: daemon.clone(),
            line: Vec::new(),
        }
    }
}

impl Write for NoteWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        while let Some(end) = self.line.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.line.drain(..=end).collect();
            self.daemon
                .note(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
