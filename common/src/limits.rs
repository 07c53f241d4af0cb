//! Every bound on untrusted input, in one place.

use std::time::Duration;

/// Largest frame on an enrollment stream (a CSR and a token fit in a few KiB).
pub const MAX_ENROLL_FRAME: usize = 16 * 1024;
/// Largest frame on the control stream (the inventory of a large GPU node fits comfortably).
pub const MAX_CONTROL_FRAME: usize = 256 * 1024;
/// Largest frame on a task stream: a task spec with its argv and env, or one output chunk.
pub const MAX_TASK_FRAME: usize = 1024 * 1024;
/// Output a task keeps in memory until its coordinator acknowledges it (sent or not: a
/// chunk in flight may never arrive). Past it, output spills to disk.
pub const MAX_TASK_JOURNAL: usize = 16 * 1024 * 1024;
/// Unacknowledged output a task keeps on disk (in the agent's work dir) past
/// [`MAX_TASK_JOURNAL`]; past it, the task's pipes wait until acknowledgements make room.
pub const MAX_TASK_SPILL: u64 = 1024 * 1024 * 1024;
/// How many task attempts an agent remembers having started, to refuse a duplicated
/// dispatch of one (the oldest are forgotten first).
pub const MAX_REMEMBERED_TASKS: usize = 100_000;
/// Output is read from a task's pipes and sent in chunks of at most this many bytes.
pub const OUTPUT_CHUNK: usize = 64 * 1024;
/// The coordinator acknowledges a task's output (`TaskRequest::Ack`) once this much was
/// handed on since its last acknowledgement, or [`OUTPUT_ACK_DELAY`] after the first chunk
/// it has not acknowledged: one small frame per quarter MiB of a chatty task, none for a
/// task whose end comes first.
pub const OUTPUT_ACK_BYTES: u64 = 256 * 1024;
pub const OUTPUT_ACK_DELAY: Duration = Duration::from_millis(10);
/// Largest argv + env a task may carry, checked before the task is sent.
pub const MAX_TASK_SPEC: usize = 512 * 1024;
/// Largest encoded input of a typed task, checked by the coordinator before it sends the
/// task and by the agent before it reads it.
pub const MAX_TYPED_INPUT: usize = 64 * 1024 * 1024;
/// Largest encoded output of a typed task, checked by the agent before it sends it (past
/// it the task fails) and by the coordinator as the pieces arrive.
pub const MAX_TYPED_OUTPUT: usize = 64 * 1024 * 1024;
/// A typed task's output travels in pieces of at most this many bytes, each a frame.
pub const TYPED_RESULT_CHUNK: usize = 512 * 1024;
/// Largest first frame of a task stream: a typed task's `Start` carries its whole input.
/// Only the coordinator, authenticated by the pinned CA, can send one.
pub const MAX_TASK_START_FRAME: usize = MAX_TYPED_INPUT + MAX_TASK_FRAME;

/// Task streams the coordinator may have open to one agent at once.
pub const MAX_TASK_STREAMS_PER_AGENT: u32 = 512;
/// Streams an agent may open towards the coordinator (the control stream, plus slack): QUIC
/// itself holds the agent to it. The coordinator closes a connection whose agent opens any
/// stream besides its control stream.
pub const MAX_AGENT_OPENED_STREAMS: u32 = 4;
/// Bytes a peer may send on one stream beyond what has been read: a task's output waits on
/// the node (its process blocked on a full pipe) until the coordinator reads it, so this is
/// what one task's output can hold in the reader's memory. Quinn's default, made explicit.
pub const MAX_STREAM_BUFFER: u32 = 1280 * 1024;
/// What the agent lets one stream from the coordinator hold unread: a workdir sync streams
/// into one, and at 1.25 MiB a 100 ms link would carry only 12.5 MB/s; 16 MiB carries
/// 160 MB/s there. [`MAX_CONNECTION_BUFFER`] still bounds all streams together.
pub const MAX_TRANSFER_STREAM_BUFFER: u32 = 16 * 1024 * 1024;
/// The same over all streams of one connection together.
pub const MAX_CONNECTION_BUFFER: u32 = 64 * 1024 * 1024;
/// What one end keeps sent but unacknowledged over all streams of a connection. Quinn's
/// default (10 MB) would hold a workdir sync under the agent's 16 MiB stream window: 100 MB/s
/// on a 100 ms link at most. Memory only while that much is in flight.
pub const MAX_SEND_BUFFER: u32 = 64 * 1024 * 1024;
const _: () = assert!(MAX_SEND_BUFFER >= MAX_TRANSFER_STREAM_BUFFER);

/// Enrollment connections one source address may hold at once.
pub const MAX_ENROLLING_PER_ADDRESS: usize = 32;
/// Failed enrollments (a bad token, a malformed request) one source address may make in a
/// burst; after that its attempts are refused unread, one more allowed per
/// [`ENROLL_FAILURE_REFILL`].
pub const ENROLL_FAILURE_BURST: u32 = 10;
pub const ENROLL_FAILURE_REFILL: Duration = Duration::from_secs(1);

/// How long an enrolling agent has to send its request once connected.
pub const ENROLL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connected agent has to open its control stream and say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of a bootstrap token handed to a node.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Lifetime of a node certificate issued at enrollment.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest node id accepted (ids are DNS-label-like: `node-1`).
pub const MAX_NODE_ID_LEN: usize = 63;

/// QUIC keep-alive (the agent's side only), so idle connections stay open through NATs and
/// a dead peer is noticed. Longer than [`HEALTH_INTERVAL`], so that a connected agent's
/// health reports make pings unneeded.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A connection silent for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A node that sends no health report (nor any message) this long is lost, by default.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an agent sends a health message on its control stream: three fit in
/// [`DEFAULT_NODE_TIMEOUT`]. Every report costs the coordinator a datagram in and an
/// acknowledgement out; 10,000 idle agents at this interval cost it a few percent of a core.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// How long an agent keeps trying to reach a silent coordinator before it gives up.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10 * 60);
/// Grace between SIGTERM and SIGKILL when a task is cancelled or times out.
pub const KILL_GRACE: Duration = Duration::from_secs(3);
/// How long a preflight probe waits for one TCP connection and its greeting.
pub const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a probe listener stays up, whatever its task asks: the port it holds is the one
/// the job is about to use.
pub const PROBE_LISTEN_MAX: Duration = Duration::from_secs(120);
/// Most addresses one probe connects to.
pub const MAX_PROBE_TARGETS: usize = 64;
/// Decoding a frame of n bytes allocates at most this many times n. A hostile frame can make
/// a byte or two decode into a larger value (an empty string into 24 bytes, a few zero bytes
/// into a whole GPU record); serde never preallocates for more elements than there are bytes
/// left. Enrollment messages hold only strings and bytes and cost their size.
/// `common/tests/hostile_input.rs` measures every message type against it.
pub const MAX_DECODE_AMPLIFICATION: usize = 64;

/// Most entries (files, directories, links) in one synced tree's manifest.
pub const MAX_SYNC_ENTRIES: u32 = 200_000;
/// Longest path in a synced tree or a download, and longest name in it.
pub const MAX_SYNC_PATH: usize = 4096;
pub const MAX_SYNC_COMPONENT: usize = 255;
/// A file's contents travel in chunks of at most this many bytes (before compression),
/// so that every chunk fits a task frame.
pub const SYNC_CHUNK: usize = 512 * 1024;
/// Bytes of manifest entries per frame.
pub const SYNC_ENTRIES_FRAME: usize = 512 * 1024;
/// The agent's content cache of synced files: past this many bytes after a sync, the
/// files used least recently (and not by the tree just synced) are removed. A tree larger
/// than this is refused.
pub const WORKDIR_CACHE_MAX: u64 = 32 * 1024 * 1024 * 1024;
/// Synced trees an agent keeps written out (the latest ones); older ones are removed.
pub const WORKDIR_TREES_KEPT: usize = 4;
/// How long a sync or download stream may stay silent.
pub const TRANSFER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent tries to reach the coordinator's TCP port for a sync's contents before
/// it takes them on the QUIC stream instead (a firewall that passes only UDP drops the
/// dial silently).
pub const BULK_DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the coordinator waits for the TCP connection an agent said it dialed; and, on
/// its TCP port, for any TLS handshake and for the ticket on a sync's connection.
pub const BULK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS connections the coordinator's TCP port serves at once (agent downloads and syncs'
/// contents); more wait to be accepted.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// Default most bytes one node's downloads may bring back.
pub const DEFAULT_DOWNLOAD_LIMIT: u64 = 10 * 1024 * 1024 * 1024;
/// Most files and directories one node's downloads may bring back.
pub const MAX_DOWNLOAD_ENTRIES: u64 = 1_000_000;
