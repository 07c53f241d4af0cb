//! The coordinator's QUIC endpoint: enrollment, node connections, task streams.
//!
//! Every connection is either an enrollment (token + CSR in, certificate out, then closed) or
//! an enrolled node's mTLS connection. Anything else is rejected with a log line and a
//! [`CoordinatorEvent::Rejected`], and changes nothing in the pool.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream};
use skyward_common::frame::{read_frame, write_frame, FrameError};
use skyward_common::identity::{fingerprint, node_id_from_cert, write_private, PoolCa};
use skyward_common::inventory::Inventory;
use skyward_common::limits::{
    DEFAULT_LEASE, DEFAULT_NODE_TIMEOUT, DEFAULT_TOKEN_TTL, ENROLL_REQUEST_TIMEOUT,
    HEALTH_INTERVAL, HELLO_TIMEOUT, MAX_CONTROL_FRAME, MAX_ENROLL_FRAME, MAX_TASK_FRAME,
    MAX_TASK_SPEC, MAX_TYPED_INPUT, NODE_CERT_VALIDITY, OUTPUT_ACK_BYTES, OUTPUT_ACK_DELAY,
};
use skyward_common::protocol::{
    close_code, is_valid_node_id, AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse,
    Health, Interruption, TaskEvent, TaskId, TaskKind, TaskRequest, TaskSpec, ALPN_ENROLL,
    ALPN_NODE,
};
use skyward_common::transport;
use tokio::sync::{broadcast, mpsc};

use crate::tcp::{BulkTicket, BulkTickets};
use skyward_core::admission::{Admission, Refusal};
use skyward_core::jobs::{self, AttemptFailure, JobId, JobSpec};
use skyward_core::lifecycle::{self, InvalidTransition, Lifecycle};
use skyward_core::membership::Budget;
use skyward_core::pool_state::{self, PoolState, Replacement};
use skyward_core::roster::{self, Roster};
use skyward_core::slots::node_slots;
use skyward_core::task::{Delivery, TaskProgress, TaskProtocolError};
use skyward_core::tokens::TokenRejection;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] skyward_common::identity::IdentityError),
    #[error(transparent)]
    Transport(#[from] skyward_common::transport::TransportError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("agent binary: {0}")]
    Agent(String),
    #[error("creating state dir {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
}

/// Why a connection or message was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("unknown protocol {0:?} (expected skyward/1 or skyward-enroll/1)")]
    UnknownAlpn(String),
    #[error("no client certificate on a node connection")]
    NoClientCertificate,
    #[error("client certificate does not name a node: {0}")]
    BadCertificate(String),
    #[error("enrollment for {node_id}: {reason}")]
    Token {
        node_id: String,
        reason: TokenRejection,
    },
    #[error("enrollment: {0}")]
    BadEnrollment(String),
    #[error("enrollment refused: {0}")]
    Refused(Refusal),
    #[error("{node}: {error}")]
    Frame { node: String, error: String },
    /// Task streams are the coordinator's to open, each on the connection of the node it
    /// gave the task to: a stream the agent opens is a claim to a task it was not given.
    #[error("{node} opened a stream of its own beside its control stream (only the coordinator opens task streams)")]
    ForeignStream { node: String },
    /// The node was given up and fenced: its certificate is refused and its agent told to
    /// shut down.
    #[error("{node} was given up ({reason}): told to shut down")]
    Fenced { node: String, reason: String },
    /// A certificate of the node id other than its live one (an earlier attempt's machine,
    /// or one whose certificate was renewed since): told to shut down.
    #[error("{node} connected with a certificate that is no longer its own: told to shut down")]
    StaleCertificate { node: String },
}

#[derive(Debug, Clone)]
pub enum CoordinatorEvent {
    NodeConnected(NodeHandle),
    NodeDisconnected {
        node_id: String,
        reason: String,
    },
    Rejected {
        peer: SocketAddr,
        rejection: Rejection,
    },
    /// The coordinator gave the node up (silent past the node timeout, or its machine gone)
    /// and fenced it: it gets no more work, and its agent is told to shut down if it comes
    /// back.
    NodeLost {
        node_id: String,
        reason: String,
    },
    /// What the pool state says of a place changed (a replacement failed, or the budget left
    /// a place empty): a job waiting for a refill looks again.
    PlacesChanged,
    /// The node's machine is about to be taken away.
    NodeInterrupted {
        node_id: String,
        notice: Interruption,
    },
}

pub struct CoordinatorConfig {
    pub pool: String,
    pub bind: SocketAddr,
    /// Where the CA and coordinator keys are written (mode 0600); `None` keeps them in memory.
    pub state_dir: Option<PathBuf>,
}

/// How nodes reach this coordinator and get the agent, beyond the bound address.
#[derive(Debug, Clone, Default)]
pub struct Advertise {
    /// The address nodes dial (a public address in front of the bound one); `None` is the
    /// bound address itself. A port of 0 means the bound port.
    pub address: Option<SocketAddr>,
    /// Agent binaries served over HTTPS (on the same port number, over TCP) to nodes whose
    /// image has none.
    pub agent_binaries: Vec<PathBuf>,
    /// Where nodes fetch the agent instead, if the user hosts it (`{arch}` = `uname -m`).
    pub agent_url: Option<String>,
    /// The SHA-256 (hex) of the agent at `agent_url`, which nodes check before running it.
    pub agent_sha256: Option<String>,
}

/// A connected node, cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    pub node_id: String,
    /// The address the node's connection comes from.
    pub address: IpAddr,
    pub inventory: Arc<Inventory>,
    /// Shared by every handle of the node, across its connections: a handle taken before
    /// it reconnected (a pool's, a run's) reaches it where it is now.
    state: Arc<NodeState>,
    control: mpsc::Sender<CoordinatorMessage>,
    /// Where the node may fetch a sync's contents over TCP: the port and the tickets. Only
    /// for a node that dialed in (one this coordinator dials may not reach it).
    bulk: Option<(u16, Arc<BulkTickets>)>,
}

/// A node's state across its connections.
#[derive(Debug)]
struct NodeState {
    /// The current connection, swapped when the node reconnects.
    connection: Mutex<Connection>,
    /// Tasks running there (each task's guard holds the counter).
    running: Arc<AtomicU32>,
    health: Mutex<Option<Health>>,
    /// The provider's notice that the machine goes away, once one came.
    interruption: Mutex<Option<Interruption>>,
    /// Whether it is still in the pool (and when it was last heard from) is the roster's
    /// to say, for this generation of the node id.
    state: Arc<Mutex<PoolState>>,
    node_id: String,
    generation: u64,
    /// Wakes whoever waits for the node (a task to start or resume, a download to start
    /// over): it connected again, or was given up.
    changed: tokio::sync::Notify,
}

impl NodeState {
    fn lost_reason(&self) -> Option<String> {
        self.state
            .lock()
            .expect("pool state lock")
            .roster()
            .fate(&self.node_id, self.generation)
    }

    fn connection(&self) -> Connection {
        self.connection.lock().expect("connection lock").clone()
    }
}

impl NodeHandle {
    /// Tasks this coordinator has running on the node now.
    pub fn running(&self) -> u32 {
        self.state.running.load(Ordering::Relaxed)
    }

    /// Why the coordinator gave the node up (`no health report for 30s`), if it did.
    pub fn lost_reason(&self) -> Option<String> {
        self.state.lost_reason()
    }

    /// The notice that the node's machine goes away, if one came.
    pub fn interruption(&self) -> Option<Interruption> {
        self.state
            .interruption
            .lock()
            .expect("interruption lock")
            .clone()
    }

    /// The node's last health report, if one has arrived.
    pub fn health(&self) -> Option<Health> {
        self.state.health.lock().expect("health lock").clone()
    }

    /// The node's current connection.
    fn connection(&self) -> Connection {
        self.state.connection()
    }

    /// Waits, up to `wait`, for the node to be connected (at once when it is); an error once
    /// it is given up or not back in time.
    pub async fn wait_connected(&self, wait: Duration) -> Result<(), TaskError> {
        let deadline = tokio::time::Instant::now() + wait;
        open_connection(&self.node_id, &self.state, wait, deadline, None)
            .await
            .map(drop)
    }

    /// Which of the node's connections is current (a new one after each reconnect).
    pub fn connection_id(&self) -> usize {
        self.connection().stable_id()
    }

    pub fn is_connected(&self) -> bool {
        self.connection().close_reason().is_none()
    }

    /// A ticket for one sync's contents over the TCP port, if the node may use it.
    pub fn bulk_ticket(&self) -> Option<BulkTicket> {
        let (port, tickets) = self.bulk.as_ref()?;
        Some(tickets.issue(&self.node_id, *port))
    }

    /// Opens a stream for a file transfer ([`TaskKind::Sync`], [`TaskKind::Download`]) and
    /// sends its `Start`; the caller goes on in that transfer's frames
    /// (`skyward_common::workdir`). Returns the streams and the bytes sent so far.
    pub async fn open_transfer(
        &self,
        spec: TaskSpec,
    ) -> Result<(SendStream, RecvStream, usize), TaskError> {
        let size = spec_size(&spec);
        if size > MAX_TASK_SPEC {
            return Err(TaskError::TooLarge(size));
        }
        let lost = |reason: String| TaskError::Lost {
            node: self.node_id.clone(),
            reason,
        };
        let (mut send, recv) = self
            .connection()
            .open_bi()
            .await
            .map_err(|e| lost(e.to_string()))?;
        let mut frame = Vec::new();
        skyward_common::frame::encode_frame(&TaskRequest::Start(spec), &mut frame)
            .map_err(|e| lost(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(|e| lost(e.to_string()))?;
        Ok((send, recv, frame.len()))
    }
}

struct Inner {
    pool: String,
    advertised: SocketAddr,
    agent_url: Option<String>,
    /// The digest of the agent nodes may download, per `uname -m` (`*`: any).
    agent_sha256: Vec<(String, String)>,
    /// The agent URL is this coordinator's own download server.
    serves_agent: bool,
    ca: PoolCa,
    /// Every node id's tokens, live certificate, generation, silence and fence, and the
    /// pool's places once it keeps its size: one state decides every node's fate.
    state: Arc<Mutex<PoolState>>,
    /// Where the replacements the pool state asks for go: the pool's keeper, once one runs.
    keeper: Mutex<Option<mpsc::UnboundedSender<PlaceNews>>>,
    /// Where each job's starts, stops and ends go: its driver (see [`Coordinator::submit_job`]).
    job_drivers: Mutex<HashMap<JobId, mpsc::UnboundedSender<jobs::Action>>>,
    next_job: AtomicU64,
    /// Enrollment connections and failures per source address.
    admission: Mutex<Admission>,
    nodes: Mutex<HashMap<String, NodeHandle>>,
    /// Every node's latest handle, connected or between connections, until it is forgotten.
    known: Mutex<HashMap<String, NodeHandle>>,
    /// Every node that ever connected: what its handles share across its connections.
    node_states: Mutex<HashMap<String, Arc<NodeState>>>,
    events: broadcast::Sender<CoordinatorEvent>,
    /// Client configs for dialing listening agents: to enroll them, and once enrolled.
    dial_enroll: quinn::ClientConfig,
    dial_node: quinn::ClientConfig,
    /// How long the node certificates this coordinator signs are valid, in seconds.
    node_cert_secs: AtomicU64,
    /// How long an enrollment connection may go without its request, in milliseconds.
    enroll_request_ms: AtomicU64,
    /// The TCP port and the syncs waiting on it, if it could be bound.
    bulk: Option<(u16, Arc<BulkTickets>)>,
}

/// What the pool state asks of the pool's keeper (see [`Coordinator::keep_places`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaceNews {
    /// Start a node for the place (see [`Replacement`]); then say how it went
    /// ([`Coordinator::replaced`], [`Coordinator::replacement_failed`]).
    Replace(Replacement),
    /// What became of a place, for the user.
    Report(String),
}

/// A job counted as running in the pool's phase, until dropped (it ended, its caller left,
/// or it was stopped). See [`Coordinator::admit_job`].
pub struct Admitted(Arc<Coordinator>);

impl Drop for Admitted {
    fn drop(&mut self) {
        // Refused only once the pool is gone: nothing left to count.
        let _ = self.0.lifecycle_event(lifecycle::Event::JobEnded);
    }
}

/// A job handed to the pool state: what it asks of the job's driver comes on `actions`.
/// Dropping it cancels the job: its attempts stop and free what they hold.
pub struct JobTicket {
    pub job: JobId,
    pub actions: mpsc::UnboundedReceiver<jobs::Action>,
    inner: std::sync::Weak<Inner>,
}

impl Drop for JobTicket {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner
                .job_drivers
                .lock()
                .expect("job drivers lock")
                .remove(&self.job);
            inner.pool_event(pool_state::Event::Job(jobs::Event::Cancel {
                job: self.job,
            }));
        }
    }
}

/// One pool's coordinator endpoint.
pub struct Coordinator {
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
    next_task: AtomicU64,
    /// Tasks dialing listening agents, stopped with the coordinator.
    dialers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// The TCP port's accept loop, stopped with the coordinator.
    tcp_server: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // The keeper's channel closes with the coordinator: it stops.
        self.inner.keeper.lock().expect("keeper lock").take();
        for (_, dialer) in self.dialers.lock().expect("dialers lock").drain() {
            dialer.abort();
        }
        if let Some(server) = &self.tcp_server {
            server.abort();
        }
    }
}

impl Coordinator {
    /// Starts a coordinator reachable at its bound address, serving no agent downloads.
    pub fn start(config: CoordinatorConfig) -> Result<Self, StartError> {
        Self::start_advertised(config, Advertise::default())
    }

    /// Starts a coordinator that nodes reach as `advertise` says.
    pub fn start_advertised(
        config: CoordinatorConfig,
        advertise: Advertise,
    ) -> Result<Self, StartError> {
        let ca = PoolCa::generate(&config.pool)?;
        // The certificate names every address a node may use to check the agent download.
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in [advertise.address.map(|a| a.ip()), Some(config.bind.ip())]
            .into_iter()
            .flatten()
        {
            if !ip.is_unspecified() && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        let server_identity = ca.issue_server_cert_for(&ips)?;
        if let Some(dir) = &config.state_dir {
            create_private_dir(dir)?;
            ca.save(dir)?;
            write_private(&dir.join("coordinator.key"), &server_identity.key_pkcs8_der)?;
        }
        let server = transport::server_config(ca.cert_der(), &server_identity)?;
        let endpoint = transport::endpoint(config.bind, Some(server))?;
        let bound = endpoint.local_addr().map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
        let advertised = match advertise.address {
            Some(addr) if addr.port() == 0 => SocketAddr::new(addr.ip(), bound.port()),
            Some(addr) => addr,
            None => bound,
        };
        // Agent binaries are served where no URL of the user's own is given.
        let serve_binaries = advertise.agent_url.is_none() && !advertise.agent_binaries.is_empty();
        let binaries = if serve_binaries {
            advertise
                .agent_binaries
                .iter()
                .map(|path| crate::download::AgentBinary::new(path.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(StartError::Agent)?
        } else {
            Vec::new()
        };
        let agent_sha256 = match &advertise.agent_sha256 {
            Some(digest) if advertise.agent_url.is_some() => {
                vec![("*".to_string(), digest.clone())]
            }
            _ => binaries
                .iter()
                .map(|b| (b.arch.to_string(), b.sha256.clone()))
                .collect(),
        };
        // The TCP port: agent downloads where served, and syncs' contents. Without it the
        // contents go on the QUIC streams, so only the downloads make it a must.
        let mut tcp_server = None;
        let tcp_port = match crate::tcp::bind(bound).and_then(|l| Ok((l.local_addr()?.port(), l))) {
            Ok((port, listener)) => {
                let tickets = Arc::new(BulkTickets::default());
                let tls = transport::tcp_server_config(ca.cert_der(), &server_identity)?;
                let binaries = serve_binaries.then(|| Arc::new(binaries));
                tcp_server = Some(tokio::spawn(crate::tcp::serve(
                    listener,
                    tls,
                    binaries,
                    tickets.clone(),
                )));
                Some((port, tickets))
            }
            Err(source) if serve_binaries => {
                return Err(StartError::Bind {
                    addr: bound,
                    source,
                })
            }
            Err(e) => {
                tracing::warn!(
                    "no TCP port beside {bound} ({e}): syncs send their contents over QUIC"
                );
                None
            }
        };
        let agent_url = match (&advertise.agent_url, &tcp_port) {
            (Some(url), _) => Some(url.clone()),
            (None, Some((port, _))) if serve_binaries => Some(format!(
                "https://{}/agent/linux-{{arch}}",
                SocketAddr::new(advertised.ip(), *port)
            )),
            _ => None,
        };
        let (events, _) = broadcast::channel(4096);
        let dial_enroll = transport::coordinator_enroll_dial_config(&server_identity)?;
        let dial_node = transport::coordinator_dial_config(ca.cert_der(), &server_identity)?;
        let inner = Arc::new(Inner {
            pool: config.pool,
            advertised,
            serves_agent: serve_binaries,
            agent_url,
            agent_sha256,
            ca,
            state: Arc::new(Mutex::new(PoolState::new(Roster::new(
                DEFAULT_NODE_TIMEOUT,
            )))),
            keeper: Mutex::new(None),
            known: Mutex::new(HashMap::new()),
            job_drivers: Mutex::new(HashMap::new()),
            next_job: AtomicU64::new(0),
            admission: Mutex::new(Admission::default()),
            nodes: Mutex::new(HashMap::new()),
            node_states: Mutex::new(HashMap::new()),
            events,
            dial_enroll,
            dial_node,
            node_cert_secs: AtomicU64::new(NODE_CERT_VALIDITY.as_secs()),
            enroll_request_ms: AtomicU64::new(ENROLL_REQUEST_TIMEOUT.as_millis() as u64),
            bulk: tcp_port,
        });
        tokio::spawn(accept_loop(endpoint.clone(), inner.clone()));
        tokio::spawn(watch_silence(Arc::downgrade(&inner)));
        Ok(Coordinator {
            dialers: Mutex::new(HashMap::new()),
            tcp_server,
            inner,
            endpoint,
            next_task: AtomicU64::new(1),
        })
    }

    /// The address nodes are told to dial.
    pub fn advertised_addr(&self) -> SocketAddr {
        self.inner.advertised
    }

    pub fn pool(&self) -> &str {
        &self.inner.pool
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    /// The pin agents need: hex SHA-256 of this pool's CA.
    pub fn ca_pin(&self) -> String {
        self.inner.ca.pin()
    }

    /// What nodes are told to reach and trust this coordinator.
    pub fn bootstrap(&self) -> skyward_providers::bootstrap::Bootstrap {
        skyward_providers::bootstrap::Bootstrap {
            coordinator: self.inner.advertised.to_string(),
            ca_pin: self.ca_pin(),
            ca_pem: self.inner.ca.cert_pem(),
            agent_url: self.inner.agent_url.clone(),
            agent_url_pinned: self.inner.serves_agent,
            agent_sha256: self.inner.agent_sha256.clone(),
            lease: DEFAULT_LEASE,
            reverse: None,
            mig: None,
            deadline: None,
            spot_watch: None,
        }
    }

    /// The pool CA, for tests that must forge what an attacker could not.
    pub fn ca(&self) -> &PoolCa {
        &self.inner.ca
    }

    pub fn issue_token(&self, node_id: &str) -> String {
        self.issue_token_with_ttl(node_id, DEFAULT_TOKEN_TTL)
    }

    pub fn issue_token_with_ttl(&self, node_id: &str, ttl: Duration) -> String {
        self.inner
            .state()
            .roster_mut()
            .issue_token(node_id, ttl, Instant::now())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CoordinatorEvent> {
        self.inner.events.subscribe()
    }

    pub fn node(&self, node_id: &str) -> Option<NodeHandle> {
        self.inner
            .nodes
            .lock()
            .expect("nodes lock")
            .get(node_id)
            .cloned()
    }

    /// The latest handle of node `node_id`, connected or between connections (a task
    /// started through it waits for the node within the node timeout); `None` for a node
    /// that never connected or was forgotten.
    pub fn node_handle(&self, node_id: &str) -> Option<NodeHandle> {
        self.inner
            .known
            .lock()
            .expect("known nodes lock")
            .get(node_id)
            .cloned()
    }

    /// How long a node may be silent, or a task's node out of reach, before it is given up.
    pub fn node_timeout(&self) -> Duration {
        self.inner.state().roster().timeout()
    }

    /// How long a node may stay silent (missed health reports) before it counts as lost and
    /// its connection is closed; nodes connecting from now on report health often enough.
    pub fn set_node_timeout(&self, timeout: Duration) {
        self.inner
            .state()
            .roster_mut()
            .set_timeout(timeout.max(Duration::from_millis(1)));
    }

    /// How long the node certificates signed from now on are valid (agents renew theirs
    /// two thirds of the way through).
    pub fn set_node_cert_validity(&self, validity: Duration) {
        self.inner
            .node_cert_secs
            .store(validity.as_secs().max(1), Ordering::Relaxed);
    }

    /// How long an enrollment connection may go without sending its request (default
    /// [`ENROLL_REQUEST_TIMEOUT`]); each that runs out spends one of its address's attempts.
    pub fn set_enroll_request_timeout(&self, timeout: Duration) {
        self.inner
            .enroll_request_ms
            .store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// A task id no other task of this coordinator has (ids start at 1: 0 asks for one).
    pub fn next_task_id(&self) -> u64 {
        self.next_task.fetch_add(1, Ordering::Relaxed)
    }

    /// Opens a task stream on `node` and sends the task.
    pub async fn start_task(
        &self,
        node: &NodeHandle,
        mut spec: TaskSpec,
    ) -> Result<RemoteTask, TaskError> {
        if spec.task.id == 0 {
            spec.task.id = self.next_task.fetch_add(1, Ordering::Relaxed);
        }
        let size = spec_size(&spec);
        if size > MAX_TASK_SPEC {
            return Err(TaskError::TooLarge(size));
        }
        if let TaskKind::Typed { payload, .. } = &spec.kind {
            if payload.len() > MAX_TYPED_INPUT {
                return Err(TaskError::InputTooLarge(payload.len()));
            }
        }
        let lost = |reason: String| TaskError::Lost {
            node: node.node_id.clone(),
            reason,
        };
        let running = RunningGuard::new(node.state.running.clone());
        let task = spec.task;
        let resumable = matches!(
            spec.kind,
            TaskKind::Command { .. } | TaskKind::Terminal { .. }
        );
        // A node between connections gets the task once it is back (within the node
        // timeout), as a running task is resumed then.
        let wait = self.node_timeout();
        let deadline = tokio::time::Instant::now() + wait;
        let start = TaskRequest::Start(spec);
        let (connection, send, recv) = loop {
            let connection =
                open_connection(&node.node_id, &node.state, wait, deadline, None).await?;
            match open_task(&connection, &start).await {
                Ok((send, recv)) => break (connection, send, recv),
                // It went between the check and the open: its next connection.
                Err(e) if connection.close_reason().is_some() => {
                    tracing::debug!(node = %node.node_id, %task, "start on a closing connection: {e}");
                }
                Err(e) => return Err(lost(e.to_string())),
            }
        };
        let send = Arc::new(tokio::sync::Mutex::new(send));
        Ok(RemoteTask {
            input: TaskInput { send: send.clone() },
            output: TaskOutput {
                node_id: node.node_id.clone(),
                recv,
                progress: TaskProgress::default(),
                _running: running,
                inner: self.inner.clone(),
                task,
                unanswered: resumable.then_some(start),
                resumable,
                connection,
                node: node.state.clone(),
                send,
                handed_on: HandedOn::default(),
                acknowledger: None,
                last_outage: None,
                on_resumed_stream: false,
            },
        })
    }

    /// Dials a listening agent (the direction reversed, for a coordinator that nodes cannot
    /// reach) and keeps dialing it, with backoff, whenever it is not connected, until the
    /// coordinator is dropped. Enrollment and the node session then run as if it had dialed in.
    /// A node already being dialed is left as it is: `false`.
    pub fn dial(&self, node_id: &str, address: SocketAddr) -> bool {
        let mut dialers = self.dialers.lock().expect("dialers lock");
        if dialers.contains_key(node_id) {
            return false;
        }
        let task = tokio::spawn(dial_loop(
            self.endpoint.clone(),
            self.inner.clone(),
            node_id.to_string(),
            address,
        ));
        dialers.insert(node_id.to_string(), task);
        true
    }

    /// How many listening nodes this coordinator dials.
    pub fn dialing(&self) -> usize {
        self.dialers.lock().expect("dialers lock").len()
    }

    /// Drops a node's connection (its agent reconnects by itself); false if it was not connected.
    pub fn disconnect(&self, node_id: &str, reason: &str) -> bool {
        match self.node(node_id) {
            Some(node) => {
                node.connection()
                    .close(close_code::NORMAL.into(), reason.as_bytes());
                true
            }
            None => false,
        }
    }

    /// Gives a node up for `reason` (its machine is gone) and fences it: its connection is
    /// closed, its tasks are lost at once, not waited for, whether it is connected now or
    /// between connections, and should it come back its agent is told to shut down; false
    /// if it never connected.
    pub fn give_up(&self, node_id: &str, reason: &str) -> bool {
        let known = self.inner.state().roster().has_connected(node_id);
        self.inner.node_event(roster::Event::GiveUp {
            node: node_id.to_string(),
            reason: reason.to_string(),
        });
        known
    }

    /// From now on the pool keeps its size: its places, held by `nodes` in rank order, are
    /// refilled within `budget` whenever their node is given up (silent, interrupted, its
    /// machine gone). The replacements to start come on the returned channel, which closes
    /// with the coordinator; a second call replaces the first.
    pub fn keep_places(
        &self,
        nodes: Vec<String>,
        budget: Budget,
    ) -> mpsc::UnboundedReceiver<PlaceNews> {
        let (news, receiver) = mpsc::unbounded_channel();
        *self.inner.keeper.lock().expect("keeper lock") = Some(news);
        self.inner
            .pool_event(pool_state::Event::KeepPlaces { nodes, budget });
        receiver
    }

    /// The node started for `place` is up: it holds the place, and every job's tasks may
    /// start there.
    pub fn replaced(&self, place: usize, node: &NodeHandle) {
        self.inner.pool_event(pool_state::Event::Replaced {
            place,
            node: node.node_id.clone(),
            slots: node_slots(&node.inventory),
        });
    }

    /// Hands a job to the pool state, which places its tasks alongside every other job's
    /// (GPU slots included) and moves them off nodes given up or interrupted. Its starts,
    /// stops and ends come on the ticket, which cancels the job when dropped.
    pub fn submit_job(&self, spec: JobSpec) -> JobTicket {
        let job = JobId(self.inner.next_job.fetch_add(1, Ordering::Relaxed));
        let (actions, receiver) = mpsc::unbounded_channel();
        // Before the job is known: its first starts must find their way.
        self.inner
            .job_drivers
            .lock()
            .expect("job drivers lock")
            .insert(job, actions);
        self.inner
            .pool_event(pool_state::Event::Job(jobs::Event::Submit { job, spec }));
        JobTicket {
            job,
            actions: receiver,
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// An attempt of a job's task ended (see [`jobs::Event::AttemptEnded`]).
    pub fn attempt_ended(
        &self,
        job: JobId,
        task: usize,
        attempt: u32,
        failure: Option<AttemptFailure>,
    ) {
        self.inner
            .pool_event(pool_state::Event::Job(jobs::Event::AttemptEnded {
                job,
                task,
                attempt,
                failure,
            }));
    }

    /// Starting a node for `place` failed: it is tried again after a wait, within the budget.
    pub fn replacement_failed(&self, place: usize, error: &str) {
        self.inner.pool_event(pool_state::Event::ReplacementFailed {
            place,
            error: error.to_string(),
        });
    }

    /// Where the pool is in its life, and how many jobs run.
    pub fn lifecycle(&self) -> Lifecycle {
        self.inner.state().lifecycle().clone()
    }

    /// Tells the pool state the pool came up, failed, runs or ends a job, or goes; an event
    /// its phase does not allow (a job on a pool coming up or going) is refused and changes
    /// nothing. Once the pool goes, no place is refilled.
    pub fn lifecycle_event(&self, event: lifecycle::Event) -> Result<(), InvalidTransition> {
        let actions = self
            .inner
            .state()
            .handle(pool_state::Event::Lifecycle(event), Instant::now());
        let refused = actions.iter().find_map(|a| match a {
            pool_state::Action::Refused(refused) => Some(refused.clone()),
            _ => None,
        });
        carry_out(&self.inner, actions);
        refused.map_or(Ok(()), Err)
    }

    /// Counts a job as running in the pool's phase until the returned admission is dropped;
    /// a pool coming up or going refuses it, saying which. The background coordinator admits
    /// every `exec` and `shell` this way, the library every call.
    pub fn admit_job(self: &Arc<Self>) -> Result<Admitted, InvalidTransition> {
        self.lifecycle_event(lifecycle::Event::JobStarted)?;
        Ok(Admitted(self.clone()))
    }

    /// Each place of a pool that keeps its size, in rank order: its node (the holder, or the
    /// last one) and where the place stands; empty while the pool does not keep its size.
    pub fn places(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        self.inner
            .state()
            .places()
            .into_iter()
            .map(|(node, state)| (node, state.describe(now)))
            .collect()
    }

    /// Whether a place of the pool is being refilled (a new node starting, or one waiting to
    /// start): a task no node can take now may have one soon.
    /// It is asked on a job's every turn, so it copies nothing.
    pub fn refilling(&self) -> bool {
        self.inner.state().refilling()
    }

    /// Why the pool runs with fewer nodes than asked, once its replacement budget is spent.
    pub fn shortfall(&self) -> Option<String> {
        self.inner.state().shortfall()
    }

    /// Forgets nodes of a provisioning attempt that was given up (their agents told to shut
    /// down first): their state, their live certificates and their tokens, so that the next
    /// attempt's nodes of the same ids start afresh and the earlier ones' certificates are
    /// refused once the new ones enroll.
    pub fn forget_nodes(&self, node_ids: &[String]) {
        let forget = roster::Event::Forget {
            nodes: node_ids.to_vec(),
        };
        self.inner.node_event(forget);
        for node_id in node_ids {
            self.inner
                .node_states
                .lock()
                .expect("node states lock")
                .remove(node_id);
            self.inner.nodes.lock().expect("nodes lock").remove(node_id);
            self.inner
                .known
                .lock()
                .expect("known nodes lock")
                .remove(node_id);
        }
    }

    /// Why node `node_id` was given up and fenced, if it was.
    pub fn fenced(&self, node_id: &str) -> Option<String> {
        self.inner
            .state()
            .roster()
            .fenced(node_id)
            .map(String::from)
    }

    /// Revokes every token issued so far for these nodes (a provisioning attempt that was
    /// torn down): a late machine of that attempt cannot enroll with them.
    pub fn revoke_tokens(&self, node_ids: &[String]) {
        self.inner.state().roster_mut().revoke_tokens(node_ids);
    }

    /// Tells every connected agent to stop its tasks and exit.
    pub async fn shutdown_nodes(&self, reason: &str) {
        let nodes: Vec<NodeHandle> = self
            .inner
            .nodes
            .lock()
            .expect("nodes lock")
            .values()
            .cloned()
            .collect();
        for node in &nodes {
            let _ = node
                .control
                .send(CoordinatorMessage::Shutdown {
                    reason: reason.to_string(),
                })
                .await;
        }
        // Each agent closes its connection once it has the message. Closing the endpoint
        // before then could drop a queued message, and an agent that never heard it keeps
        // dialing until its lease runs out.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for node in &nodes {
            if tokio::time::timeout_at(deadline, node.connection().closed())
                .await
                .is_err()
            {
                break;
            }
        }
    }

    /// Closes the endpoint, giving peers a moment to hear about it.
    pub async fn close(&self) {
        self.inner.keeper.lock().expect("keeper lock").take();
        for (_, dialer) in self.dialers.lock().expect("dialers lock").drain() {
            dialer.abort();
        }
        if let Some(server) = &self.tcp_server {
            server.abort();
        }
        self.endpoint
            .close(close_code::POOL_SHUTDOWN.into(), b"pool down");
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }
}

/// `node`'s open connection, once it has one other than `lost` (the one a task's stream was
/// on), waiting until `deadline` (`wait` from when the wait began, for the error) unless
/// the node is given up first.
async fn open_connection(
    node_id: &str,
    node: &NodeState,
    wait: Duration,
    deadline: tokio::time::Instant,
    lost: Option<usize>,
) -> Result<Connection, TaskError> {
    // The node's connection when it is usable now; an error once it is given up.
    let usable = || -> Result<Option<Connection>, TaskError> {
        if let Some(reason) = node.lost_reason() {
            return Err(TaskError::Lost {
                node: node_id.to_string(),
                reason,
            });
        }
        let connection = node.connection();
        let open = connection.close_reason().is_none() && Some(connection.stable_id()) != lost;
        Ok(open.then_some(connection))
    };
    // Every dispatch comes here: the common case looks once and registers nothing.
    if let Some(connection) = usable()? {
        return Ok(connection);
    }
    loop {
        // Listening before looking again: a reconnect or give-up in between is not missed.
        let changed = node.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Some(connection) = usable()? {
            return Ok(connection);
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            let what = match lost {
                Some(_) => "connection lost",
                None => "not connected",
            };
            return Err(TaskError::Lost {
                node: node_id.to_string(),
                reason: format!(
                    "{what} and not back within {}",
                    humantime::format_duration(wait)
                ),
            });
        }
    }
}

/// Opens a task's stream on `connection` and sends its `Start`. A task that takes no input
/// has its stream's end go with it: then the agent need not stop the stream, nor this side
/// reset it, when the task is done.
async fn open_task(
    connection: &Connection,
    start: &TaskRequest,
) -> Result<(SendStream, RecvStream), String> {
    let (mut send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, start)
        .await
        .map_err(|e| e.to_string())?;
    if !matches!(start, TaskRequest::Start(spec) if spec.kind.takes_input()) {
        send.finish().map_err(|e| e.to_string())?;
    }
    Ok((send, recv))
}

fn spec_size(spec: &TaskSpec) -> usize {
    let argv = match &spec.kind {
        skyward_common::protocol::TaskKind::Command { argv, .. }
        | skyward_common::protocol::TaskKind::Terminal { argv, .. } => {
            argv.iter().map(String::len).sum()
        }
        skyward_common::protocol::TaskKind::Noop => 0,
        skyward_common::protocol::TaskKind::Probe(probe) => probe.connect.len() * 32,
        // The input has a limit of its own, checked apart.
        skyward_common::protocol::TaskKind::Typed { name, .. } => name.len(),
        skyward_common::protocol::TaskKind::Sync(_) => 64,
        skyward_common::protocol::TaskKind::Download(download) => {
            download.paths.iter().map(String::len).sum::<usize>()
                + download.cwd.as_ref().map_or(0, String::len)
        }
    };
    argv + spec
        .env
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StartError::StateDir {
            path: dir.display().to_string(),
            source,
        })
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("task spec is {0} bytes of argv and env; the limit is {MAX_TASK_SPEC}")]
    TooLarge(usize),
    #[error("typed task input is {0} bytes; the limit is {MAX_TYPED_INPUT} (send less per task)")]
    InputTooLarge(usize),
    /// The node was given up, or its connection did not come back in time.
    #[error("connection to {node}: {reason}")]
    Lost { node: String, reason: String },
    #[error("{node}: {error}")]
    Protocol { node: String, error: String },
}

/// A task running on a node.
pub struct RemoteTask {
    pub input: TaskInput,
    pub output: TaskOutput,
}

/// The coordinator's side of a task's input: stdin and cancellation. A task that takes no
/// input ([`TaskKind::takes_input`]: no-op and typed tasks) has it ended at its start, so
/// these calls fail; such a task is cancelled by dropping its [`TaskOutput`].
pub struct TaskInput {
    /// The task's current stream: a resumed task's is replaced by the output side.
    send: Arc<tokio::sync::Mutex<SendStream>>,
}

impl TaskInput {
    pub async fn stdin(&mut self, data: Bytes) -> Result<(), FrameError> {
        write_frame(&mut *self.send.lock().await, &TaskRequest::Stdin(data)).await
    }

    pub async fn close_stdin(&mut self) -> Result<(), FrameError> {
        write_frame(&mut *self.send.lock().await, &TaskRequest::StdinEof).await
    }

    pub async fn cancel(&mut self) -> Result<(), FrameError> {
        write_frame(&mut *self.send.lock().await, &TaskRequest::Cancel).await
    }

    /// A terminal task's window has a new size.
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), FrameError> {
        let resize = TaskRequest::Resize { rows, cols };
        write_frame(&mut *self.send.lock().await, &resize).await
    }

    /// A guard that cancels the task when dropped, unless disarmed first. A task outlives
    /// its stream (so that it survives a lost connection): without this, a task whose
    /// caller went away would run on, unwatched, on its node.
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop {
            send: Some(self.send.clone()),
        }
    }
}

/// See [`TaskInput::cancel_on_drop`].
pub struct CancelOnDrop {
    send: Option<Arc<tokio::sync::Mutex<SendStream>>>,
}

impl CancelOnDrop {
    /// The task ended: nothing to cancel.
    pub fn disarm(&mut self) {
        self.send = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(send) = self.send.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut send = send.lock().await;
                let _ = write_frame(&mut *send, &TaskRequest::Cancel).await;
                let _ = send.finish();
            });
        }
    }
}

/// The coordinator's side of a task's output.
pub struct TaskOutput {
    node_id: String,
    recv: RecvStream,
    progress: TaskProgress,
    _running: RunningGuard,
    inner: Arc<Inner>,
    task: TaskId,
    /// Commands outlive a lost connection on their node and are resumed on its next one.
    resumable: bool,
    /// The connection the task's stream is on.
    connection: Connection,
    /// The task's node: once given up, there is nothing to resume.
    node: Arc<NodeState>,
    send: Arc<tokio::sync::Mutex<SendStream>>,
    /// The output chunks and bytes the caller has taken so far.
    handed_on: HandedOn,
    /// Tells the acknowledger what was handed on; made with the first chunk of output.
    acknowledger: Option<tokio::sync::watch::Sender<HandedOn>>,
    /// How long the task's node was out of reach before its last resume.
    last_outage: Option<Duration>,
    /// A command's task while nothing came from it: should its `Start` have died with its
    /// connection, a resume finds no such task on the node, and it is started there again.
    unanswered: Option<TaskRequest>,
    /// This stream came from a `Resume`.
    on_resumed_stream: bool,
}

/// How far a task's output was handed on: chunks below `next_seq`, `bytes` in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct HandedOn {
    next_seq: u64,
    bytes: u64,
}

impl TaskOutput {
    /// The next event, each output chunk exactly once; `None` after `Finished`.
    ///
    /// Calling it again says the last event was handed on: for a command, its output up to
    /// there is acknowledged to the agent (in batches), which then drops it. An agent keeps
    /// unacknowledged output through any outage, within its bounds.
    pub async fn next(&mut self) -> Result<Option<TaskEvent>, TaskError> {
        self.acknowledge();
        loop {
            if self.progress.outcome().is_some() {
                self.acknowledger = None;
                return Ok(None);
            }
            let event = match read_frame::<_, TaskEvent>(&mut self.recv, MAX_TASK_FRAME).await {
                Err(e) if e.is_connection_lost() && self.resumable => {
                    let lost_at = Instant::now();
                    self.resume().await?;
                    self.last_outage = Some(lost_at.elapsed());
                    continue;
                }
                // The node never had the task (its `Start` died with the connection, unseen
                // by the agent, which saw nothing of it): start it there now.
                Ok(None) if self.on_resumed_stream && self.unanswered.is_some() => {
                    self.start_again().await?;
                    continue;
                }
                other => other,
            };
            // The task answered: a resume finds it from now on.
            self.unanswered = None;
            let event = event.map_err(|e| self.read_error(e))?.ok_or_else(|| {
                self.error("the task stream ended before the task finished".into())
            })?;
            match self.progress.observe(&event) {
                Ok(Delivery::Deliver) => {
                    match &event {
                        TaskEvent::Output { data, .. } => {
                            self.handed_on = HandedOn {
                                next_seq: self.progress.next_seq(),
                                bytes: self.handed_on.bytes + data.len() as u64,
                            };
                        }
                        TaskEvent::Finished(_) => {
                            // Nothing follows `Finished`; its stream's end came with it, and
                            // the agent lets the output go with it: no acknowledgement.
                            transport::take_end_if_here(&mut self.recv);
                            self.acknowledger = None;
                        }
                        _ => {}
                    }
                    return Ok(Some(event));
                }
                Ok(Delivery::Duplicate) => continue,
                Err(e @ (TaskProtocolError::Gap { .. } | TaskProtocolError::AfterFinish)) => {
                    return Err(self.error(e.to_string()))
                }
            }
        }
    }

    /// How long the node was out of reach before the task's last resume (`None`: never).
    /// Read it on [`TaskEvent::Resumed`], the first event of a resumed stream.
    pub fn last_outage(&self) -> Option<Duration> {
        self.last_outage
    }

    /// Tells the acknowledger how far the output was handed on (starting it at the first
    /// chunk of a command's output; other tasks keep no journal to acknowledge).
    fn acknowledge(&mut self) {
        if self.handed_on.next_seq == 0 || !self.resumable || self.progress.outcome().is_some() {
            return;
        }
        match &self.acknowledger {
            Some(acknowledger) => {
                acknowledger.send_if_modified(|last| {
                    let changed = *last != self.handed_on;
                    *last = self.handed_on;
                    changed
                });
            }
            None => {
                let (tx, rx) = tokio::sync::watch::channel(self.handed_on);
                tokio::spawn(send_acks(self.send.clone(), rx));
                self.acknowledger = Some(tx);
            }
        }
    }

    /// Waits (up to the node timeout) for the node to come back on a new connection and
    /// goes on with the task there, from the first output chunk not yet seen.
    async fn resume(&mut self) -> Result<(), TaskError> {
        let wait = self.inner.state().roster().timeout();
        let deadline = tokio::time::Instant::now() + wait;
        let lost = |node: &str, reason: String| TaskError::Lost {
            node: node.to_string(),
            reason,
        };
        let old = self.connection.stable_id();
        let connection =
            open_connection(&self.node_id, &self.node, wait, deadline, Some(old)).await?;
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| lost(&self.node_id, e.to_string()))?;
        let resume = TaskRequest::Resume {
            task: self.task,
            next_seq: self.progress.next_seq(),
        };
        write_frame(&mut send, &resume)
            .await
            .map_err(|e| lost(&self.node_id, e.to_string()))?;
        tracing::info!(node = %self.node_id, task = %self.task, "resumed the task on the node's new connection");
        *self.send.lock().await = send;
        self.recv = recv;
        self.on_resumed_stream = true;
        self.connection = connection;
        Ok(())
    }

    /// Sends the task's `Start` again on the node's current connection.
    async fn start_again(&mut self) -> Result<(), TaskError> {
        let start = self
            .unanswered
            .as_ref()
            .expect("a task that never answered");
        tracing::info!(node = %self.node_id, task = %self.task, "the node never got the task; starting it there again");
        let (send, recv) =
            open_task(&self.connection, start)
                .await
                .map_err(|e| TaskError::Lost {
                    node: self.node_id.clone(),
                    reason: e.to_string(),
                })?;
        *self.send.lock().await = send;
        self.recv = recv;
        self.on_resumed_stream = false;
        Ok(())
    }

    /// A failed read of the task's stream: bytes that break the protocol are the node's
    /// fault; a stream cut off is a lost node (given up: the reason it was).
    fn read_error(&self, error: FrameError) -> TaskError {
        if error.is_protocol_violation() {
            return self.error(error.to_string());
        }
        TaskError::Lost {
            node: self.node_id.clone(),
            reason: self.node.lost_reason().unwrap_or_else(|| error.to_string()),
        }
    }

    fn error(&self, error: String) -> TaskError {
        TaskError::Protocol {
            node: self.node_id.clone(),
            error,
        }
    }
}

/// Acknowledges a task's output as it is handed on, on whichever stream the task is on now
/// (a resume swaps it): once [`OUTPUT_ACK_BYTES`] were handed on since the last
/// acknowledgement, or [`OUTPUT_ACK_DELAY`] after the first that was not. Ends when the task
/// output's side drops its sender (the task ended, or nobody reads it).
async fn send_acks(
    send: Arc<tokio::sync::Mutex<SendStream>>,
    mut handed_on: tokio::sync::watch::Receiver<HandedOn>,
) {
    let mut acked = HandedOn::default();
    loop {
        let deadline = tokio::time::Instant::now() + OUTPUT_ACK_DELAY;
        loop {
            let now = *handed_on.borrow_and_update();
            if now.bytes - acked.bytes >= OUTPUT_ACK_BYTES {
                break;
            }
            match tokio::time::timeout_at(deadline, handed_on.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => break,
            }
        }
        let now = *handed_on.borrow_and_update();
        if now.next_seq > acked.next_seq {
            let ack = TaskRequest::Ack {
                next_seq: now.next_seq,
            };
            // A broken stream is the resume's business: the next acknowledgement goes on
            // the stream it opens (and its `Resume` acknowledges as much).
            let _ = write_frame(&mut *send.lock().await, &ack).await;
            acked = now;
        }
        if handed_on.changed().await.is_err() {
            return;
        }
    }
}

struct RunningGuard(Arc<AtomicU32>);

impl RunningGuard {
    fn new(counter: Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        RunningGuard(counter)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, inner: Arc<Inner>) {
    while let Some(incoming) = endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            if let Err(rejection) = handle_connection(incoming, &inner).await {
                reject(&inner, peer, rejection);
            }
        });
    }
}

/// How long one dial attempt may take, and the longest wait between attempts.
/// How long [`Coordinator::shutdown_nodes`] waits for the agents to close their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(5);

async fn dial_loop(
    endpoint: quinn::Endpoint,
    inner: Arc<Inner>,
    node_id: String,
    address: SocketAddr,
) {
    let mut failures = 0u32;
    loop {
        let connected = inner
            .nodes
            .lock()
            .expect("nodes lock")
            .get(&node_id)
            .is_some_and(|n| n.is_connected());
        if !connected {
            let enrolled = inner.state().roster().is_enrolled(&node_id);
            let config = if enrolled {
                &inner.dial_node
            } else {
                &inner.dial_enroll
            };
            // The node's certificate names its node id: that is the name to check.
            let attempt = match endpoint.connect_with(config.clone(), address, &node_id) {
                Ok(connecting) => tokio::time::timeout(DIAL_TIMEOUT, connecting).await.ok(),
                // The pool is going away: nothing left to dial for.
                Err(quinn::ConnectError::EndpointStopping) => return,
                Err(e) => {
                    tracing::warn!(node = %node_id, "cannot dial {address}: {e}");
                    None
                }
            };
            match attempt {
                Some(Ok(conn)) => {
                    failures = 0;
                    let served = if enrolled {
                        serve_node(conn, &inner, false).await
                    } else {
                        enroll(conn, &inner, None).await
                    };
                    if let Err(rejection) = served {
                        reject(&inner, address, rejection);
                    }
                    continue;
                }
                Some(Err(e)) => tracing::debug!(node = %node_id, "dialing {address}: {e}"),
                None => tracing::debug!(node = %node_id, "dialing {address}: no answer"),
            }
            failures = failures.saturating_add(1);
        }
        let wait = Duration::from_millis(50)
            .saturating_mul(1u32 << failures.min(8))
            .min(DIAL_BACKOFF_MAX);
        tokio::time::sleep(wait).await;
    }
}

fn reject(inner: &Inner, peer: SocketAddr, rejection: Rejection) {
    tracing::warn!(%peer, "rejected: {rejection}");
    let _ = inner
        .events
        .send(CoordinatorEvent::Rejected { peer, rejection });
}

async fn handle_connection(incoming: quinn::Incoming, inner: &Arc<Inner>) -> Result<(), Rejection> {
    let conn = incoming
        .await
        .map_err(|e| Rejection::Handshake(e.to_string()))?;
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .unwrap_or_default();
    match alpn.as_slice() {
        a if a == ALPN_ENROLL => {
            let address = conn.remote_address().ip();
            let admitted = inner
                .admission
                .lock()
                .expect("admission lock")
                .begin(address, Instant::now());
            if let Err(refusal) = admitted {
                conn.close(
                    close_code::ENROLLMENT_REJECTED.into(),
                    b"too many enrollments from this address",
                );
                return Err(Rejection::Refused(refusal));
            }
            let result = enroll(conn, inner, Some(address)).await;
            inner.admission.lock().expect("admission lock").end(address);
            result
        }
        a if a == ALPN_NODE => serve_node(conn, inner, true).await,
        other => {
            conn.close(close_code::PROTOCOL_VIOLATION.into(), b"unknown protocol");
            Err(Rejection::UnknownAlpn(
                String::from_utf8_lossy(other).into_owned(),
            ))
        }
    }
}

/// Serves one enrollment connection. `peer` is the address that dialed in, held to the
/// failure budget; `None` when the coordinator dialed the node itself.
async fn enroll(
    conn: Connection,
    inner: &Arc<Inner>,
    peer: Option<IpAddr>,
) -> Result<(), Rejection> {
    let exchange = async {
        let (mut send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| Rejection::BadEnrollment(format!("no request stream: {e}")))?;
        let request = read_frame::<_, EnrollRequest>(&mut recv, MAX_ENROLL_FRAME)
            .await
            .map_err(|e| {
                if e.is_protocol_violation() {
                    spend_attempt(inner, peer);
                }
                Rejection::BadEnrollment(e.to_string())
            })?
            .ok_or_else(|| Rejection::BadEnrollment("empty request".into()))?;
        let outcome = answer_enrollment(inner, peer, &request);
        if let Err(rejection) = &outcome {
            if !matches!(rejection, Rejection::Refused(_)) {
                spend_attempt(inner, peer);
            }
        }
        let response = match &outcome {
            Ok(response) => response.clone(),
            // Refused unread: the agent may come back once the address's budget refills.
            Err(rejection @ Rejection::Refused(refusal)) => EnrollResponse::Busy {
                reason: rejection.to_string(),
                retry_after_ms: refusal.retry_after().as_millis() as u64,
            },
            Err(rejection) => EnrollResponse::Rejected {
                reason: rejection.to_string(),
            },
        };
        let _ = write_frame(&mut send, &response).await;
        let _ = send.finish();
        outcome.map(|_| request.node_id)
    };
    let waited = Duration::from_millis(inner.enroll_request_ms.load(Ordering::Relaxed));
    let result = match tokio::time::timeout(waited, exchange).await {
        Ok(result) => result,
        // A connection held open without a request costs its address an attempt, as a bad
        // request does: else a stranger could hold connections open again and again for free.
        Err(_) => {
            spend_attempt(inner, peer);
            Err(Rejection::BadEnrollment("no request in time".into()))
        }
    };
    if let Ok(node_id) = &result {
        tracing::info!(node = %node_id, "enrolled");
    }
    // The agent closes once it has read the answer; closing first could discard the answer.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    if result.is_err() {
        conn.close(
            close_code::ENROLLMENT_REJECTED.into(),
            b"enrollment rejected",
        );
    }
    result.map(|_| ())
}

/// A request from `peer` was judged and failed (a bad token or CSR, or bytes that are no
/// request at all), or never came in time: one of its attempts is spent. A request refused
/// unread spends nothing, or a refused address could never recover; a dropped connection
/// spends nothing either.
fn spend_attempt(inner: &Inner, peer: Option<IpAddr>) {
    if let Some(address) = peer {
        inner
            .admission
            .lock()
            .expect("admission lock")
            .failed(address, Instant::now());
    }
}

/// Judges one enrollment request from `peer`: refused unread while the address is over its
/// failure budget (its token is not even looked up), else signed or rejected.
fn answer_enrollment(
    inner: &Inner,
    peer: Option<IpAddr>,
    request: &EnrollRequest,
) -> Result<EnrollResponse, Rejection> {
    if let Some(address) = peer {
        inner
            .admission
            .lock()
            .expect("admission lock")
            .may_attempt(address, Instant::now())
            .map_err(Rejection::Refused)?;
    }
    sign_enrollment(inner, request)
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().expect("pool state lock")
    }

    /// Tells the pool state what happened to a node id and carries out what it decides
    /// (fences, replacements); returns its answer for the caller (sign, welcome, refuse...).
    fn node_event(&self, event: roster::Event) -> Vec<roster::Action> {
        self.pool_event(pool_state::Event::Node(event))
    }

    fn pool_event(&self, event: pool_state::Event) -> Vec<roster::Action> {
        let actions = self.state().handle(event, Instant::now());
        carry_out(self, actions)
    }

    fn node_cert_validity(&self) -> Duration {
        Duration::from_secs(self.node_cert_secs.load(Ordering::Relaxed))
    }
}

fn sign_enrollment(inner: &Inner, request: &EnrollRequest) -> Result<EnrollResponse, Rejection> {
    if !is_valid_node_id(&request.node_id) {
        return Err(Rejection::BadEnrollment(format!(
            "invalid node id {:?}",
            request.node_id.chars().take(80).collect::<String>()
        )));
    }
    let token_error = |reason| Rejection::Token {
        node_id: request.node_id.clone(),
        reason,
    };
    // Check first, sign, and only then spend the token: a bad CSR must not burn it.
    let asked = roster::Event::EnrollRequested {
        node: request.node_id.clone(),
        token: request.token.clone(),
    };
    if let Some(refused) = token_refusal(inner.node_event(asked)) {
        return Err(token_error(refused));
    }
    let (cert, not_after) = inner
        .ca
        .sign_node_csr(
            &request.csr_der,
            &request.node_id,
            inner.node_cert_validity(),
        )
        .map_err(|e| Rejection::BadEnrollment(e.to_string()))?;
    let signed = roster::Event::Signed {
        node: request.node_id.clone(),
        cert: fingerprint(&cert),
        token: Some(request.token.clone()),
    };
    if let Some(refused) = token_refusal(inner.node_event(signed)) {
        return Err(token_error(refused));
    }
    Ok(EnrollResponse::Accepted {
        cert_der: cert.to_vec().into(),
        not_after_unix: not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    })
}

/// The roster's answer to an enrollment step: why the token does not enroll, if it does not.
fn token_refusal(actions: Vec<roster::Action>) -> Option<TokenRejection> {
    actions.into_iter().find_map(|action| match action {
        roster::Action::RejectToken(rejection) => Some(rejection),
        _ => None,
    })
}

fn frame_rejection(conn: &Connection, node: &str, error: FrameError) -> Rejection {
    let code = match error {
        FrameError::TooLarge { .. } => close_code::FRAME_TOO_LARGE,
        _ => close_code::MALFORMED_FRAME,
    };
    conn.close(code.into(), b"bad frame");
    Rejection::Frame {
        node: node.to_string(),
        error: error.to_string(),
    }
}

/// Carries out the pool state's decisions: each node given up has its connection closed,
/// whoever waits for it (a task to start or resume) hears it at once, and the pool is told;
/// replacements and reports go to the pool's keeper. Returns the answers for the caller.
fn carry_out(inner: &Inner, actions: Vec<pool_state::Action>) -> Vec<roster::Action> {
    let mut answers = Vec::new();
    for action in actions {
        let (node, reason) = match action {
            pool_state::Action::Node(roster::Action::Fence { node, reason }) => (node, reason),
            pool_state::Action::Node(answer) => {
                answers.push(answer);
                continue;
            }
            pool_state::Action::Replace(replacement) => {
                tell_keeper(inner, PlaceNews::Replace(replacement));
                continue;
            }
            pool_state::Action::Report(line) => {
                tell_keeper(inner, PlaceNews::Report(line));
                let _ = inner.events.send(CoordinatorEvent::PlacesChanged);
                continue;
            }
            // The phase is read by whoever drives the pool (`Coordinator::lifecycle`); a
            // refusal is answered by `Coordinator::lifecycle_event`.
            pool_state::Action::Lifecycle(_) | pool_state::Action::Refused(_) => continue,
            pool_state::Action::Job(action) => {
                let mut drivers = inner.job_drivers.lock().expect("job drivers lock");
                let job = action.job();
                let done = matches!(action, jobs::Action::Done { .. });
                if let Some(driver) = drivers.get(&job) {
                    let _ = driver.send(action);
                }
                if done {
                    drivers.remove(&job);
                }
                continue;
            }
        };
        let state = inner
            .node_states
            .lock()
            .expect("node states lock")
            .get(&node)
            .cloned();
        if let Some(state) = state {
            state.changed.notify_waiters();
            let connection = state.connection();
            if connection.close_reason().is_none() {
                connection.close(close_code::NORMAL.into(), reason.as_bytes());
            }
        }
        tracing::warn!(node = %node, "node given up: {reason}");
        let _ = inner.events.send(CoordinatorEvent::NodeLost {
            node_id: node,
            reason,
        });
    }
    answers
}

fn tell_keeper(inner: &Inner, news: PlaceNews) {
    if let Some(keeper) = inner.keeper.lock().expect("keeper lock").as_ref() {
        let _ = keeper.send(news);
    }
}

/// Gives up every node silent (no message, connected or not) past the node timeout, whether
/// or not a job runs. Only time this coordinator ran counts: after a pause of its own (the
/// process stopped, the machine suspended) each node's silence goes on from where it was,
/// so that a coordinator that was not listening does not blame its nodes. Ends with the
/// coordinator.
async fn watch_silence(inner: std::sync::Weak<Inner>) {
    let mut last_tick = Instant::now();
    loop {
        let timeout = match inner.upgrade() {
            Some(inner) => inner.state().roster().timeout(),
            None => return,
        };
        let period = (timeout / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let paused = now
            .duration_since(last_tick)
            .saturating_sub(period + SILENCE_WATCH_SLACK);
        last_tick = now;
        inner.node_event(roster::Event::Tick { paused });
    }
}

/// A silence watch tick later than its period by more than this is a pause of the
/// coordinator's own, not time its nodes were silent in.
const SILENCE_WATCH_SLACK: Duration = Duration::from_millis(500);

/// Serves an enrolled node's connection; `dialed_in`: the node dialed this coordinator (so
/// it can reach the TCP port too), rather than the other way round.
async fn serve_node(
    conn: Connection,
    inner: &Arc<Inner>,
    dialed_in: bool,
) -> Result<(), Rejection> {
    let cert = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().cloned());
    let Some(cert) = cert else {
        conn.close(
            close_code::UNAUTHORIZED.into(),
            b"client certificate required",
        );
        return Err(Rejection::NoClientCertificate);
    };
    let node_id = node_id_from_cert(&cert).map_err(|e| {
        conn.close(close_code::UNAUTHORIZED.into(), b"bad client certificate");
        Rejection::BadCertificate(e.to_string())
    })?;

    let (mut control_send, mut control_recv) =
        tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| Rejection::Frame {
                node: node_id.clone(),
                error: "no control stream in time".into(),
            })?
            .map_err(|e| Rejection::Frame {
                node: node_id.clone(),
                error: format!("connection ended before hello: {e}"),
            })?;
    let hello = match tokio::time::timeout(
        HELLO_TIMEOUT,
        read_frame::<_, AgentMessage>(&mut control_recv, MAX_CONTROL_FRAME),
    )
    .await
    {
        Ok(Ok(Some(AgentMessage::Hello(hello)))) => hello,
        Ok(Ok(Some(_))) | Ok(Ok(None)) | Err(_) => {
            conn.close(close_code::PROTOCOL_VIOLATION.into(), b"expected hello");
            return Err(Rejection::Frame {
                node: node_id,
                error: "the control stream did not start with a hello".into(),
            });
        }
        Ok(Err(e)) => return Err(frame_rejection(&conn, &node_id, e)),
    };
    let said_hello = roster::Event::Hello {
        node: node_id.clone(),
        cert: fingerprint(&cert),
        connection: conn.stable_id(),
    };
    let (decided, generation) = {
        let mut state = inner.state();
        let decided = state.handle(pool_state::Event::Node(said_hello), Instant::now());
        (decided, state.roster().generation(&node_id))
    };
    let answer = carry_out(inner, decided);
    let refusal = answer.into_iter().find_map(|action| match action {
        roster::Action::Refuse(roster::Refusal::Fenced { reason }) => Some((
            format!("{node_id} was given up ({reason}) and is no longer in pool {}", inner.pool),
            Rejection::Fenced {
                node: node_id.clone(),
                reason,
            },
        )),
        roster::Action::Refuse(roster::Refusal::Stale) => Some((
            format!(
                "this certificate of {node_id} was replaced by a newer one: this machine is no longer {node_id} of pool {}",
                inner.pool
            ),
            Rejection::StaleCertificate {
                node: node_id.clone(),
            },
        )),
        _ => None,
    });
    if let Some((reason, rejection)) = refusal {
        // In place of the welcome: the agent stops (and its machine powers off, on a cloud).
        if write_frame(&mut control_send, &CoordinatorMessage::Shutdown { reason })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.closed()).await;
        }
        conn.close(close_code::POOL_SHUTDOWN.into(), b"refused");
        return Err(rejection);
    }
    let node_timeout = inner.state().roster().timeout();
    // Three reports fit in the timeout, so one lost datagram's worth of delay is not a loss.
    let health_interval = HEALTH_INTERVAL
        .min(node_timeout / 3)
        .max(Duration::from_millis(100));
    let welcome = CoordinatorMessage::Welcome {
        pool: inner.pool.clone(),
        health_interval_ms: health_interval.as_millis() as u32,
    };
    write_frame(&mut control_send, &welcome)
        .await
        .map_err(|e| Rejection::Frame {
            node: node_id.clone(),
            error: e.to_string(),
        })?;

    let (control_tx, mut control_rx) = mpsc::channel::<CoordinatorMessage>(8);
    // What the node's earlier connections' handles share: they follow it to this one.
    let state = inner
        .node_states
        .lock()
        .expect("node states lock")
        .entry(node_id.clone())
        .or_insert_with(|| {
            Arc::new(NodeState {
                connection: Mutex::new(conn.clone()),
                running: Arc::new(AtomicU32::new(0)),
                health: Mutex::new(None),
                interruption: Mutex::new(None),
                state: inner.state.clone(),
                node_id: node_id.clone(),
                generation,
                changed: tokio::sync::Notify::new(),
            })
        })
        .clone();
    let replaced = std::mem::replace(
        &mut *state.connection.lock().expect("connection lock"),
        conn.clone(),
    );
    if replaced.stable_id() != conn.stable_id() {
        replaced.close(
            close_code::REPLACED.into(),
            b"replaced by a newer connection",
        );
    }
    state.changed.notify_waiters();
    let handle = NodeHandle {
        node_id: node_id.clone(),
        address: conn.remote_address().ip(),
        inventory: Arc::new(hello.inventory),
        state,
        control: control_tx,
        bulk: inner.bulk.clone().filter(|_| dialed_in),
    };
    inner
        .nodes
        .lock()
        .expect("nodes lock")
        .insert(node_id.clone(), handle.clone());
    inner
        .known
        .lock()
        .expect("known nodes lock")
        .insert(node_id.clone(), handle.clone());
    tracing::info!(node = %node_id, address = %handle.address, "node connected");
    let _ = inner
        .events
        .send(CoordinatorEvent::NodeConnected(handle.clone()));

    let writer = tokio::spawn(async move {
        while let Some(msg) = control_rx.recv().await {
            if write_frame(&mut control_send, &msg).await.is_err() {
                break;
            }
        }
    });
    let foreign = tokio::spawn({
        let (conn, node) = (conn.clone(), node_id.clone());
        async move {
            conn.accept_bi().await.ok()?;
            conn.close(
                close_code::PROTOCOL_VIOLATION.into(),
                b"only the coordinator opens streams",
            );
            Some(Rejection::ForeignStream { node })
        }
    });
    let result = loop {
        // Silence is the watchdog's to judge (`watch_silence`): it closes the connection of a
        // node it gives up, which ends this read.
        let message = read_frame::<_, AgentMessage>(&mut control_recv, MAX_CONTROL_FRAME).await;
        if let Ok(Some(_)) = &message {
            let heard = roster::Event::Heard {
                node: node_id.clone(),
            };
            inner.node_event(heard);
        }
        match message {
            Ok(Some(AgentMessage::Health(health))) => {
                *handle.state.health.lock().expect("health lock") = Some(health);
            }
            Ok(Some(AgentMessage::Renew { csr_der })) => {
                // The certificate names the node this connection authenticated as, whatever
                // the request says; a node given up gets none.
                let asked = roster::Event::RenewRequested {
                    node: node_id.clone(),
                };
                let allowed = match inner.node_event(asked).pop() {
                    Some(roster::Action::RefuseRenewal(why)) => Err(why),
                    _ => Ok(()),
                };
                let result = allowed.and_then(|()| {
                    let (cert, _) = inner
                        .ca
                        .sign_node_csr(&csr_der, &node_id, inner.node_cert_validity())
                        .map_err(|e| e.to_string())?;
                    let signed = roster::Event::Signed {
                        node: node_id.clone(),
                        cert: fingerprint(&cert),
                        token: None,
                    };
                    match token_refusal(inner.node_event(signed)) {
                        Some(_) => Err(format!("{node_id} was given up")),
                        None => Ok(bytes::Bytes::from(cert.to_vec())),
                    }
                });
                match &result {
                    Ok(_) => tracing::info!(node = %node_id, "renewed the node's certificate"),
                    Err(e) => {
                        tracing::warn!(node = %node_id, "refused to renew the node's certificate: {e}")
                    }
                }
                let _ = handle
                    .control
                    .send(CoordinatorMessage::Renewed { result })
                    .await;
            }
            Ok(Some(AgentMessage::Interruption(notice))) => {
                tracing::warn!(node = %node_id, "{} interruption notice: {} at {}", notice.source, notice.action, notice.at);
                *handle.state.interruption.lock().expect("interruption lock") =
                    Some(notice.clone());
                // A pool that keeps its size gives the node up now and starts its successor
                // before the machine goes; otherwise its run decides (below).
                inner.pool_event(pool_state::Event::Interrupted {
                    node: node_id.clone(),
                    reason: format!(
                        "{} interruption notice: {} at {}",
                        notice.source, notice.action, notice.at
                    ),
                });
                let _ = inner.events.send(CoordinatorEvent::NodeInterrupted {
                    node_id: node_id.clone(),
                    notice,
                });
            }
            Ok(Some(AgentMessage::Hello(_))) => {
                conn.close(close_code::PROTOCOL_VIOLATION.into(), b"second hello");
                break Err(Rejection::Frame {
                    node: node_id.clone(),
                    error: "second hello on the control stream".into(),
                });
            }
            Ok(None) => break Ok("control stream closed".to_string()),
            Err(FrameError::Io(e)) => break Ok(e.to_string()),
            Err(e) => break Err(frame_rejection(&conn, &node_id, e)),
        }
    };
    writer.abort();
    // The stream watcher closed the connection (ending the loop above) or is still waiting.
    foreign.abort();
    let result = match foreign.await {
        Ok(Some(rejection)) => Err(rejection),
        _ => result,
    };
    let reason = match (&result, handle.state.lost_reason()) {
        (_, Some(lost)) => lost,
        (Ok(reason), None) => reason.clone(),
        (Err(rejection), None) => rejection.to_string(),
    };
    {
        let mut nodes = inner.nodes.lock().expect("nodes lock");
        if nodes
            .get(&node_id)
            .is_some_and(|current| current.connection().stable_id() == conn.stable_id())
        {
            nodes.remove(&node_id);
        }
    }
    let closed = roster::Event::Closed {
        node: node_id.clone(),
        connection: conn.stable_id(),
    };
    inner.node_event(closed);
    tracing::info!(node = %node_id, "node disconnected: {reason}");
    let _ = inner
        .events
        .send(CoordinatorEvent::NodeDisconnected { node_id, reason });
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use skyward_common::identity::NodeKey;

    /// How a hostile request's token is made.
    #[derive(Debug, Clone)]
    enum TokenKind {
        Valid,
        ForAnotherNode,
        Spent,
        Expired,
        /// Anything at all: wrong length, not hex, empty, huge.
        Garbage(String),
        /// A real token one character short.
        Truncated,
    }

    /// How its CSR is made.
    #[derive(Debug, Clone)]
    enum CsrKind {
        Valid,
        /// A well-formed CSR naming some other node: the certificate must still name the
        /// node the token is bound to.
        NamingAnotherNode,
        Garbage(Vec<u8>),
        Truncated(usize),
    }

    fn token_kind() -> impl Strategy<Value = TokenKind> {
        prop_oneof![
            Just(TokenKind::Valid),
            Just(TokenKind::ForAnotherNode),
            Just(TokenKind::Spent),
            Just(TokenKind::Expired),
            Just(TokenKind::Truncated),
            prop_oneof![".{0,100}", "[0-9a-f]{0,80}", "x{1000,4000}"].prop_map(TokenKind::Garbage),
        ]
    }

    fn csr_kind() -> impl Strategy<Value = CsrKind> {
        prop_oneof![
            Just(CsrKind::Valid),
            Just(CsrKind::NamingAnotherNode),
            proptest::collection::vec(any::<u8>(), 0..12_000).prop_map(CsrKind::Garbage),
            any::<usize>().prop_map(CsrKind::Truncated),
        ]
    }

    fn node_id() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "node-[a-z0-9]{1,8}",
            1 => ".{0,80}",
            1 => "[a-z]{64,300}",
            1 => Just("-node".to_string()),
            1 => Just("NODE-1".to_string()),
        ]
    }

    fn enrolled(inner: &Inner) -> std::collections::HashSet<String> {
        inner
            .state()
            .roster()
            .enrolled()
            .map(String::from)
            .collect()
    }

    /// A coordinator on loopback and the runtime it needs, for judging requests directly.
    fn fuzz_coordinator() -> (tokio::runtime::Runtime, Coordinator) {
        skyward_common::install_crypto_provider();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let coordinator = {
            let _guard = rt.enter();
            Coordinator::start(CoordinatorConfig {
                pool: "fuzz".into(),
                bind: ([127, 0, 0, 1], 0).into(),
                state_dir: None,
            })
            .unwrap()
        };
        (rt, coordinator)
    }

    /// Malformed and hostile enrollment requests, judged by the handler itself: each gets the
    /// rejection it deserves, nothing panics, and a rejection changes nothing (no node enrolled
    /// or connected, no token spent).
    #[test]
    fn hostile_enrollment_requests_get_the_right_rejection_and_change_nothing() {
        let (rt, coordinator) = fuzz_coordinator();
        let _guard = rt.enter();
        let inner = &coordinator.inner;
        let mine = NodeKey::generate("node-mine").unwrap();
        let theirs = NodeKey::generate("node-someone-else").unwrap();
        let mut runner = TestRunner::new(Config {
            cases: 192,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (node_id(), token_kind(), csr_kind(), ".{0,40}");
        runner
            .run(&strategy, |(node, token_kind, csr_kind, version)| {
                // Tokens are issued to the node the request names (when it is a valid id).
                let token = match &token_kind {
                    TokenKind::Valid => coordinator.issue_token(&node),
                    TokenKind::ForAnotherNode => coordinator.issue_token("node-victim"),
                    TokenKind::Spent => {
                        let token = coordinator.issue_token(&node);
                        let spend = roster::Event::Signed {
                            node: node.clone(),
                            cert: "spent".into(),
                            token: Some(token.clone()),
                        };
                        prop_assert_eq!(inner.node_event(spend), vec![]);
                        token
                    }
                    TokenKind::Expired => coordinator.issue_token_with_ttl(&node, Duration::ZERO),
                    TokenKind::Garbage(garbage) => garbage.clone(),
                    TokenKind::Truncated => {
                        let mut token = coordinator.issue_token(&node);
                        token.pop();
                        token
                    }
                };
                let csr: Vec<u8> = match &csr_kind {
                    CsrKind::Valid => mine.csr_der.clone(),
                    CsrKind::NamingAnotherNode => theirs.csr_der.clone(),
                    CsrKind::Garbage(bytes) => bytes.clone(),
                    CsrKind::Truncated(at) => mine.csr_der[..at % mine.csr_der.len()].to_vec(),
                };
                let csr_ok = matches!(csr_kind, CsrKind::Valid | CsrKind::NamingAnotherNode);
                let request = EnrollRequest {
                    node_id: node.clone(),
                    token: token.clone(),
                    csr_der: csr.into(),
                    agent_version: version,
                };
                let before = enrolled(inner);
                let outcome = answer_enrollment(inner, Some([198, 51, 100, 7].into()), &request);
                let expected_token = match token_kind {
                    TokenKind::Valid => None,
                    TokenKind::ForAnotherNode => Some(TokenRejection::WrongNode {
                        bound_to: "node-victim".into(),
                        claimed: node.clone(),
                    }),
                    TokenKind::Spent => Some(TokenRejection::AlreadyUsed),
                    TokenKind::Expired => Some(TokenRejection::Expired),
                    TokenKind::Garbage(_) | TokenKind::Truncated => Some(TokenRejection::Unknown),
                };
                match (&outcome, is_valid_node_id(&node), expected_token, csr_ok) {
                    (Err(Rejection::BadEnrollment(why)), false, _, _) => {
                        prop_assert!(why.starts_with("invalid node id"), "{why}")
                    }
                    (Err(Rejection::Token { node_id, reason }), true, Some(expected), _) => {
                        prop_assert_eq!(node_id, &node);
                        prop_assert_eq!(reason, &expected);
                    }
                    (Err(Rejection::BadEnrollment(why)), true, None, false) => {
                        prop_assert!(why.contains("certificate signing request"), "{why}");
                        // A bad CSR must not burn the token.
                        let unspent =
                            inner
                                .state()
                                .roster()
                                .check_token(&token, &node, Instant::now());
                        prop_assert_eq!(unspent, Ok(()));
                    }
                    (Ok(EnrollResponse::Accepted { cert_der, .. }), true, None, true) => {
                        // The certificate names the token's node, whatever the CSR said.
                        prop_assert_eq!(node_id_from_cert(cert_der).unwrap(), node.clone());
                        prop_assert!(enrolled(inner).contains(&node));
                        let spent =
                            inner
                                .state()
                                .roster()
                                .check_token(&token, &node, Instant::now());
                        prop_assert_eq!(spent, Err(TokenRejection::AlreadyUsed));
                        return Ok(());
                    }
                    (outcome, valid, expected, csr_ok) => {
                        return Err(TestCaseError::fail(format!(
                            "valid id {valid}, token {expected:?}, csr ok {csr_ok}: got {outcome:?}"
                        )))
                    }
                }
                prop_assert_eq!(enrolled(inner), before);
                prop_assert!(inner.nodes.lock().unwrap().is_empty());
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn an_address_over_its_failure_budget_is_refused_unread() {
        let (rt, coordinator) = fuzz_coordinator();
        let _guard = rt.enter();
        let inner = &coordinator.inner;
        let address: IpAddr = [198, 51, 100, 9].into();
        let now = Instant::now();
        for _ in 0..skyward_common::limits::ENROLL_FAILURE_BURST {
            inner.admission.lock().unwrap().failed(address, now);
        }
        let key = NodeKey::generate("node-1").unwrap();
        let request = EnrollRequest {
            node_id: "node-1".into(),
            token: coordinator.issue_token("node-1"),
            csr_der: key.csr_der.into(),
            agent_version: "test".into(),
        };
        let refused = answer_enrollment(inner, Some(address), &request);
        assert!(
            matches!(
                refused,
                Err(Rejection::Refused(Refusal::TooManyFailures { .. }))
            ),
            "{refused:?}"
        );
        // Refused unread: the good token is still good, and works from elsewhere.
        assert!(enrolled(inner).is_empty());
        let other: IpAddr = [198, 51, 100, 10].into();
        assert!(matches!(
            answer_enrollment(inner, Some(other), &request),
            Ok(EnrollResponse::Accepted { .. })
        ));
    }
}
