//! Messages exchanged between coordinator and agent.
//!
//! Connection layout (one QUIC connection per agent, protocol chosen by ALPN):
//! - [`ALPN_ENROLL`]: the agent has no certificate yet. It opens one bidirectional stream,
//!   sends an [`EnrollRequest`] (token + CSR) and reads an [`EnrollResponse`].
//! - [`ALPN_NODE`]: mutual TLS. The agent opens the control stream and sends
//!   [`AgentMessage::Hello`]; the coordinator answers [`CoordinatorMessage::Welcome`]. Each task
//!   is a bidirectional stream opened by the coordinator: [`TaskRequest`]s flow to the agent,
//!   [`TaskEvent`]s (output chunks with sequence numbers, then the outcome) flow back.

use std::net::SocketAddr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::inventory::Inventory;

/// ALPN of an enrolled node's connection. The number is the protocol version.
pub const ALPN_NODE: &[u8] = b"skyward/1";
/// ALPN of an enrollment connection (no client certificate yet).
pub const ALPN_ENROLL: &[u8] = b"skyward-enroll/1";
/// TLS on TCP, a node dialing the coordinator for a sync's contents
/// ([`crate::workdir::BulkOffer`]); node certificate required.
pub const ALPN_BULK: &[u8] = b"skyward-bulk/1";
/// The name in the coordinator's certificate; agents connect to any address under this name
/// and trust it through the pinned pool CA, so a coordinator's IP may change freely.
pub const COORDINATOR_SERVER_NAME: &str = "coordinator.skyward.invalid";

/// Application error codes used when closing a connection, so the peer can tell why.
pub mod close_code {
    pub const NORMAL: u32 = 0;
    pub const PROTOCOL_VIOLATION: u32 = 1;
    pub const FRAME_TOO_LARGE: u32 = 2;
    pub const MALFORMED_FRAME: u32 = 3;
    pub const UNAUTHORIZED: u32 = 4;
    pub const ENROLLMENT_REJECTED: u32 = 5;
    pub const POOL_SHUTDOWN: u32 = 6;
    pub const REPLACED: u32 = 7;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub node_id: String,
    pub token: String,
    /// DER-encoded PKCS#10 request for the key the agent generated; the key never leaves the node.
    pub csr_der: Bytes,
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Accepted {
        cert_der: Bytes,
        /// Seconds since the Unix epoch after which the certificate is no longer valid.
        not_after_unix: i64,
    },
    Rejected {
        reason: String,
    },
    /// Not judged: the address has spent its enrollment budget for now. Try again after
    /// `retry_after_ms` (the token was not looked at, so it is still good). Appended for the
    /// encoding's sake.
    Busy {
        reason: String,
        retry_after_ms: u64,
    },
}

/// Control-stream messages from agent to coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(Box<Hello>),
    Health(Health),
    /// The machine is about to be taken away (a spot interruption notice).
    Interruption(Interruption),
    /// A new certificate for this node, for a fresh key (its DER CSR), before the current
    /// one expires.
    Renew {
        csr_der: Bytes,
    },
}

/// A provider's notice that the node's machine will be reclaimed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interruption {
    /// Who said so (`aws spot`).
    pub source: String,
    /// What will happen: `terminate`, `stop`, `hibernate`.
    pub action: String,
    /// When, as the provider wrote it.
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub agent_version: String,
    pub inventory: Inventory,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub running_tasks: u32,
    pub load_avg_1m: f32,
    pub memory_available_bytes: u64,
    /// Task output held for the coordinator, not acknowledged yet (memory and spill).
    pub output_held_bytes: u64,
    /// Tasks whose room for unacknowledged output is full: they wait (their readers are
    /// slower than they print, or their coordinator is away).
    pub tasks_waiting_for_room: u32,
}

/// Control-stream messages from coordinator to agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    Welcome {
        pool: String,
        health_interval_ms: u32,
    },
    /// The pool is going away: stop every task and exit.
    Shutdown { reason: String },
    /// The renewed certificate (DER), or why there is none.
    Renewed { result: Result<Bytes, String> },
}

/// A task's identity: retries and duplicate dispatches are told apart by `attempt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId {
    pub id: u64,
    pub attempt: u32,
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task-{}.{}", self.id, self.attempt)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskKind {
    /// Runs a program (never through a shell unless argv asks for one).
    Command {
        argv: Vec<String>,
        /// Relative paths resolve against the agent's work dir; `None` is the work dir itself.
        cwd: Option<String>,
        /// Whether [`TaskRequest::Stdin`] frames follow; otherwise stdin is /dev/null.
        stdin: bool,
    },
    /// Does nothing and succeeds: measures the dispatch path itself.
    Noop,
    /// A network check between nodes before a distributed job: see [`Probe`]. Last, so that
    /// the variants before it keep their tags in the binary encoding.
    Probe(Probe),
    /// A program on a pseudo-terminal of its own (`skyward shell`): its session's
    /// controlling terminal, sized `rows` x `cols` (changed by [`TaskRequest::Resize`]);
    /// what it writes comes back as stdout, [`TaskRequest::Stdin`] is typed into it. An empty
    /// `argv` is the node's login shell. Appended for the encoding's sake.
    Terminal {
        argv: Vec<String>,
        /// `TERM` for the program, e.g. `xterm-256color`.
        term: String,
        rows: u16,
        cols: u16,
    },
    /// A typed task ([`crate::typed::Task`]): the agent runs the task registered under
    /// `name` at `version` on `payload` (the task value, encoded) and answers its encoded
    /// output in [`TaskEvent::Result`] frames. Appended, for the encoding's sake.
    Typed {
        name: String,
        version: u32,
        /// At most [`MAX_TYPED_INPUT`](crate::limits::MAX_TYPED_INPUT) bytes.
        payload: Bytes,
    },
    /// Syncs a working tree into the agent's work dir (see [`crate::workdir`]); the stream
    /// then carries `SyncRequest`s and `SyncEvent`s instead of task frames. Appended last.
    Sync(crate::workdir::SyncStart),
    /// Sends files back (see [`crate::workdir`]): the stream carries `DownloadEvent`s.
    /// Appended last.
    Download(crate::workdir::DownloadSpec),
}

impl TaskKind {
    /// Whether the task reads its stream after `Start` (stdin, `Cancel`, `Resize`...). The
    /// coordinator ends the stream of a task that takes none with its `Start`; such a task
    /// is cancelled by its caller stopping its output (or resetting the stream), and the
    /// stream's end means only that nothing more comes.
    pub fn takes_input(&self) -> bool {
        !matches!(self, TaskKind::Noop | TaskKind::Typed { .. })
    }
}

/// What a probe task does: listen on a port and greet whoever connects, or connect to
/// addresses and check the greeting, reporting each result as a [`TaskEvent::Probe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Listen here (TCP) until the task is cancelled or times out; reported as
    /// [`ProbeReport::Listening`] once bound. A bind failure ends the task as
    /// [`TaskOutcome::FailedToStart`].
    pub listen: Option<SocketAddr>,
    /// Connect to each of these at once, each within
    /// [`PROBE_CONNECT_TIMEOUT`](crate::limits::PROBE_CONNECT_TIMEOUT), and report them
    /// together as [`ProbeReport::Reached`].
    pub connect: Vec<SocketAddr>,
    /// The listener greets with it, so that a connector knows it reached this probe and not
    /// some other program on the port.
    pub nonce: u64,
}

/// A probe's findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeReport {
    /// The listener is bound: the port was free.
    Listening { address: SocketAddr },
    /// One result per [`Probe::connect`] address, in the same order.
    Reached(Vec<Reach>),
}

/// Whether one address was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reach {
    pub target: SocketAddr,
    /// The local address the connection left from (it names the interface that carries
    /// traffic to the target), or why there was no greeting from the probe.
    pub from: Result<SocketAddr, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub task: TaskId,
    pub kind: TaskKind,
    /// Added to the agent's environment.
    pub env: Vec<(String, String)>,
    /// Killed (TERM, then KILL) and reported as timed out past this.
    pub timeout_ms: Option<u64>,
}

impl TaskSpec {
    pub fn command(
        id: u64,
        attempt: u32,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        timeout_ms: Option<u64>,
        stdin: bool,
    ) -> Self {
        TaskSpec {
            task: TaskId { id, attempt },
            kind: TaskKind::Command {
                argv,
                cwd: None,
                stdin,
            },
            env,
            timeout_ms,
        }
    }

    /// A probe task; `timeout_ms` bounds a listener's life.
    pub fn probe(probe: Probe, timeout_ms: u64) -> Self {
        TaskSpec {
            task: TaskId { id: 0, attempt: 0 },
            kind: TaskKind::Probe(probe),
            env: Vec::new(),
            timeout_ms: Some(timeout_ms),
        }
    }

    /// A program on a pseudo-terminal (`argv` empty: the node's login shell).
    pub fn terminal(id: u64, argv: Vec<String>, term: String, rows: u16, cols: u16) -> Self {
        TaskSpec {
            task: TaskId { id, attempt: 0 },
            kind: TaskKind::Terminal {
                argv,
                term,
                rows,
                cols,
            },
            env: Vec::new(),
            timeout_ms: None,
        }
    }

    pub fn noop(id: u64) -> Self {
        TaskSpec {
            task: TaskId { id, attempt: 0 },
            kind: TaskKind::Noop,
            env: Vec::new(),
            timeout_ms: None,
        }
    }

    /// A typed task of an encoded value (see [`crate::typed::spec`]), its id given by the
    /// coordinator.
    pub fn typed(name: &str, version: u32, payload: Bytes) -> Self {
        TaskSpec {
            task: TaskId { id: 0, attempt: 0 },
            kind: TaskKind::Typed {
                name: name.to_string(),
                version,
                payload,
            },
            env: Vec::new(),
            timeout_ms: None,
        }
    }
}

/// Task-stream frames from coordinator to agent. The first is always `Start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskRequest {
    Start(TaskSpec),
    Stdin(Bytes),
    StdinEof,
    /// Stop the task: TERM to its process group, KILL after a grace period.
    Cancel,
    /// On a new stream after the connection was lost: go on with this task from the output
    /// chunk numbered `next_seq` (every earlier one arrived), then its end.
    Resume {
        task: TaskId,
        next_seq: u64,
    },
    /// A [`TaskKind::Terminal`]'s window has a new size. Appended for the encoding's sake.
    Resize {
        rows: u16,
        cols: u16,
    },
    /// Every output chunk below `next_seq` was handed on (to a terminal, a task log or a
    /// library caller): the agent may drop them. Until then it keeps each chunk, whatever
    /// stream it went out on, so a connection that dies with chunks in flight loses none.
    /// Sent in batches; a `Resume` acknowledges what it names too. Appended last.
    Ack {
        next_seq: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Task-stream frames from agent to coordinator. `Finished` is always the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskEvent {
    /// A command's or terminal's process started; no-op, probe and typed tasks send none.
    Started {
        pid: u32,
    },
    /// One chunk of output. `seq` counts chunks of this task from 0, across both streams,
    /// so a resumed stream can continue after the last acknowledged chunk.
    Output {
        seq: u64,
        stream: OutputStream,
        data: Bytes,
    },
    Finished(TaskOutcome),
    /// What a [`TaskKind::Probe`] found; before `Finished`. Last, for the encoding's sake.
    Probe(ProbeReport),
    /// One piece of a [`TaskKind::Typed`] task's encoded output, before `Finished`: the
    /// pieces in order make the output (each at most [`TYPED_RESULT_CHUNK`]
    /// bytes, together at most [`MAX_TYPED_OUTPUT`]). Appended, for the encoding's sake.
    ///
    /// [`TYPED_RESULT_CHUNK`]: crate::limits::TYPED_RESULT_CHUNK
    /// [`MAX_TYPED_OUTPUT`]: crate::limits::MAX_TYPED_OUTPUT
    Result(Bytes),
    /// First on a resumed stream: the output the agent held from the resume point on (what
    /// comes now), and whether the task had to wait for room meanwhile (its memory and spill
    /// for unacknowledged output were full). Appended last.
    Resumed {
        held_bytes: u64,
        waited_for_room: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskOutcome {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    TimedOut,
    Cancelled,
    FailedToStart {
        error: String,
    },
    /// A typed task returned an error or panicked (the panic's message); appended, for the
    /// encoding's sake.
    Failed {
        error: String,
    },
}

impl TaskOutcome {
    pub fn success(&self) -> bool {
        matches!(self, TaskOutcome::Exited { code: 0 })
    }

    /// The exit code a shell would report for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            TaskOutcome::Exited { code } => *code,
            TaskOutcome::Signaled { signal } => 128 + signal,
            TaskOutcome::TimedOut => 124,
            TaskOutcome::Cancelled => 130,
            TaskOutcome::FailedToStart { .. } => 127,
            TaskOutcome::Failed { .. } => 1,
        }
    }
}

impl std::fmt::Display for TaskOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskOutcome::Exited { code } => write!(f, "exit code {code}"),
            TaskOutcome::Signaled { signal } => write!(f, "killed by signal {signal}"),
            TaskOutcome::TimedOut => write!(f, "timed out"),
            TaskOutcome::Cancelled => write!(f, "cancelled"),
            TaskOutcome::FailedToStart { error } => write!(f, "failed to start: {error}"),
            TaskOutcome::Failed { error } => write!(f, "failed: {error}"),
        }
    }
}

/// True for ids the coordinator hands out (`node-1`, `pool-a-node-12`): short, DNS-label-like.
pub fn is_valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= crate::limits::MAX_NODE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}
