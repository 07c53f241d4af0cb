//! Every rejection the coordinator promises, attempted for real by a test client against a
//! live pool with a real agent, which must not notice any of it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use skyward_common::frame::{read_frame, write_frame};
use skyward_common::identity::{CertifiedKey, NodeKey, PoolCa};
use skyward_common::limits::{
    ENROLL_FAILURE_BURST, ENROLL_FAILURE_REFILL, MAX_AGENT_OPENED_STREAMS,
    MAX_ENROLLING_PER_ADDRESS, MAX_ENROLL_FRAME,
};
use skyward_common::protocol::{
    close_code, AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse, Hello,
    OutputStream, TaskEvent, TaskOutcome, TaskSpec, ALPN_ENROLL, ALPN_NODE,
    COORDINATOR_SERVER_NAME,
};
use skyward_common::transport;
use skyward_coordinator::{Coordinator, CoordinatorConfig, CoordinatorEvent, Rejection};
use skyward_core::admission::Refusal;
use skyward_core::tokens::TokenRejection;
use skyward_tests::{spawn_agent, task_output, wait_connected, Sandbox};
use tokio::sync::broadcast;

/// Everything the coordinator logs in this test process, to check the log lines themselves.
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer_buf = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_writer(move || LogWriter(writer_buf.clone()))
            .with_ansi(false)
            .with_env_filter("skyward_coordinator=info")
            .try_init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Attacker {
    endpoint: quinn::Endpoint,
    coordinator: SocketAddr,
    pin: String,
}

/// An enrollment connection held open, stream and all.
type Held = (quinn::Connection, quinn::SendStream, quinn::RecvStream);

impl Attacker {
    /// Opens as many enrollment connections as one address may hold, each with its stream
    /// open and a byte sent (the coordinator counts it from then), and keeps them.
    async fn hold_every_enrollment_connection(&self) -> Vec<Held> {
        let mut held = Vec::new();
        for _ in 0..MAX_ENROLLING_PER_ADDRESS {
            let conn = self.connect(None, ALPN_ENROLL).await.unwrap();
            let (mut send, recv) = conn.open_bi().await.unwrap();
            send.write_all(&[0]).await.unwrap();
            held.push((conn, send, recv));
        }
        held
    }

    async fn connect(
        &self,
        identity: Option<&CertifiedKey>,
        alpn: &[u8],
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        let config = transport::client_config(&self.pin, identity, alpn).unwrap();
        self.endpoint
            .connect_with(config, self.coordinator, COORDINATOR_SERVER_NAME)
            .unwrap()
            .await
    }

    /// Enrolls exactly as an agent does; returns the identity or the coordinator's reason.
    async fn enroll(&self, node_id: &str, token: &str) -> Result<CertifiedKey, String> {
        self.enroll_with_key(node_id, token, &NodeKey::generate(node_id).unwrap())
            .await
    }

    /// Enrolls as `node_id` with the CSR of `key`, whatever name that CSR carries.
    async fn enroll_with_key(
        &self,
        node_id: &str,
        token: &str,
        key: &NodeKey,
    ) -> Result<CertifiedKey, String> {
        let conn = self
            .connect(None, ALPN_ENROLL)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let request = EnrollRequest {
            node_id: node_id.into(),
            token: token.into(),
            csr_der: key.csr_der.clone().into(),
            agent_version: "test".into(),
        };
        write_frame(&mut send, &request)
            .await
            .map_err(|e| e.to_string())?;
        let response = read_frame::<_, EnrollResponse>(&mut recv, MAX_ENROLL_FRAME)
            .await
            .map_err(|e| format!("{e:?}"))?
            .ok_or("no response")?;
        conn.close(0u32.into(), b"");
        match response {
            EnrollResponse::Accepted { cert_der, .. } => Ok(CertifiedKey {
                chain: vec![cert_der.to_vec().into()],
                key_pkcs8_der: key.key.serialize_der(),
            }),
            EnrollResponse::Rejected { reason } => Err(reason),
            EnrollResponse::Busy {
                reason,
                retry_after_ms,
            } => Err(format!("busy, retry after {retry_after_ms} ms: {reason}")),
        }
    }
}

async fn expect_rejection(
    events: &mut broadcast::Receiver<CoordinatorEvent>,
    what: &str,
    matches: impl Fn(&Rejection) -> bool,
) -> Rejection {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(CoordinatorEvent::Rejected { rejection, .. }) if matches(&rejection) => {
                    return rejection
                }
                Ok(_) => continue,
                Err(e) => panic!("event stream: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("no rejection for {what}"))
}

fn node_identity_from(
    ca: &PoolCa,
    node_id: &str,
    valid: (time::OffsetDateTime, time::OffsetDateTime),
) -> CertifiedKey {
    let key = NodeKey::generate(node_id).unwrap();
    let (cert, _) = ca
        .sign_node_csr_between(&key.csr_der, node_id, valid.0, valid.1)
        .unwrap();
    CertifiedKey {
        chain: vec![cert],
        key_pkcs8_der: key.key.serialize_der(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_logged_and_leaves_the_pool_untouched() {
    let log = captured_log();
    skyward_common::install_crypto_provider();
    let sandbox = Sandbox::new();
    let coordinator = Coordinator::start(CoordinatorConfig {
        pool: "sec".into(),
        bind: ([127, 0, 0, 1], 0).into(),
        state_dir: Some(sandbox.path().join("identity")),
    })
    .unwrap();
    let mut events = coordinator.subscribe();

    // A real agent joins the pool first.
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    wait_connected(&coordinator, "node-1").await;

    let attacker = Attacker {
        endpoint: transport::endpoint(([127, 0, 0, 1], 0).into(), None).unwrap(),
        coordinator: coordinator.local_addr(),
        pin: coordinator.ca_pin(),
    };
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);

    // No client certificate on a node connection.
    if let Ok(conn) = attacker.connect(None, ALPN_NODE).await {
        let _ = conn.open_bi().await;
    }
    expect_rejection(&mut events, "no client certificate", |r| {
        *r == Rejection::NoClientCertificate
    })
    .await;

    // A certificate from another pool's CA.
    let foreign = node_identity_from(
        &PoolCa::generate("other").unwrap(),
        "node-1",
        (now - hour, now + hour),
    );
    // In TLS 1.3 the client may finish its side before the server has judged its
    // certificate, so the verdict is read from the coordinator, not from connect().
    let _ = attacker.connect(Some(&foreign), ALPN_NODE).await;
    let r = expect_rejection(&mut events, "foreign CA", |r| {
        matches!(r, Rejection::Handshake(_))
    })
    .await;
    assert!(r.to_string().contains("UnknownIssuer"), "{r}");

    // An expired certificate from the right CA.
    let expired = node_identity_from(coordinator.ca(), "node-1", (now - 2 * hour, now - hour));
    let _ = attacker.connect(Some(&expired), ALPN_NODE).await;
    let r = expect_rejection(&mut events, "expired certificate", |r| {
        matches!(r, Rejection::Handshake(_))
    })
    .await;
    assert!(r.to_string().contains("certificate expired"), "{r}");

    // An unknown ALPN.
    assert!(attacker.connect(None, b"h3").await.is_err());
    let r = expect_rejection(&mut events, "unknown ALPN", |r| {
        matches!(r, Rejection::Handshake(_))
    })
    .await;
    assert!(
        r.to_string().to_lowercase().contains("known protocol"),
        "{r}"
    );

    // A reused token.
    let token = coordinator.issue_token("node-5");
    attacker
        .enroll("node-5", &token)
        .await
        .expect("first use of a token works");
    let reason = attacker.enroll("node-5", &token).await.unwrap_err();
    assert!(reason.contains("already used"), "{reason}");
    expect_rejection(&mut events, "reused token", |r| {
        matches!(
            r,
            Rejection::Token {
                reason: TokenRejection::AlreadyUsed,
                ..
            }
        )
    })
    .await;

    // An expired token.
    let token = coordinator.issue_token_with_ttl("node-6", Duration::from_millis(1));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(attacker
        .enroll("node-6", &token)
        .await
        .unwrap_err()
        .contains("expired"));
    expect_rejection(&mut events, "expired token", |r| {
        matches!(
            r,
            Rejection::Token {
                reason: TokenRejection::Expired,
                ..
            }
        )
    })
    .await;

    // A token for another node; the rightful node can still use it afterwards.
    let token = coordinator.issue_token("node-7");
    assert!(attacker
        .enroll("node-8", &token)
        .await
        .unwrap_err()
        .contains("bound to node-7"));
    expect_rejection(&mut events, "token for another node", |r| {
        matches!(
            r,
            Rejection::Token {
                reason: TokenRejection::WrongNode { .. },
                ..
            }
        )
    })
    .await;
    attacker
        .enroll("node-7", &token)
        .await
        .expect("the rejected attempt spent nothing");

    // An oversized frame, from a properly enrolled node.
    let id = attacker
        .enroll("node-9", &coordinator.issue_token("node-9"))
        .await
        .unwrap();
    let conn = attacker.connect(Some(&id), ALPN_NODE).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 0]).await.unwrap();
    let r = expect_rejection(&mut events, "oversized frame", |r| {
        matches!(r, Rejection::Frame { .. })
    })
    .await;
    assert!(r.to_string().contains("exceeds the limit"), "{r}");
    assert_eq!(
        conn.closed().await,
        quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: close_code::FRAME_TOO_LARGE.into(),
            reason: "bad frame".into()
        })
    );

    // A malformed frame.
    let id = attacker
        .enroll("node-10", &coordinator.issue_token("node-10"))
        .await
        .unwrap();
    let conn = attacker.connect(Some(&id), ALPN_NODE).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let r = expect_rejection(&mut events, "malformed frame", |r| {
        matches!(r, Rejection::Frame { .. })
    })
    .await;
    assert!(r.to_string().contains("malformed"), "{r}");

    // Each rejection has its log line.
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    for needle in [
        "rejected: no client certificate",
        "rejected: TLS handshake failed",
        "UnknownIssuer",
        "certificate expired",
        "token already used",
        "token expired",
        "token is bound to node-7, not node-8",
        "exceeds the limit",
        "malformed",
    ] {
        assert!(
            text.contains(needle),
            "no log line with {needle:?} in:\n{text}"
        );
    }

    // The pool did not notice: node-1 is still connected and runs work.
    let node = coordinator.node("node-1").expect("node-1 still connected");
    let mut task = coordinator
        .start_task(
            &node,
            TaskSpec::command(
                0,
                0,
                vec!["echo".into(), "still here".into()],
                vec![],
                None,
                false,
            ),
        )
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"still here\n");

    let _ = agent.kill();
    let _ = agent.wait();
    coordinator.close().await;
}

fn attacker_against(coordinator: &Coordinator) -> Attacker {
    Attacker {
        endpoint: transport::endpoint(([127, 0, 0, 1], 0).into(), None).unwrap(),
        coordinator: coordinator.local_addr(),
        pin: coordinator.ca_pin(),
    }
}

fn hostile_coordinator(pool: &str) -> Coordinator {
    skyward_common::install_crypto_provider();
    Coordinator::start(CoordinatorConfig {
        pool: pool.into(),
        bind: ([127, 0, 0, 1], 0).into(),
        state_dir: None,
    })
    .unwrap()
}

/// One source address may hold only so many enrollment connections at once; the next is
/// refused before it is read, and a place frees up when one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_connections_per_address_are_bounded() {
    let coordinator = hostile_coordinator("sec-conns");
    let mut events = coordinator.subscribe();
    let attacker = attacker_against(&coordinator);
    let mut held = attacker.hold_every_enrollment_connection().await;
    let extra = attacker.connect(None, ALPN_ENROLL).await.unwrap();
    let r = expect_rejection(&mut events, "one enrollment connection too many", |r| {
        matches!(
            r,
            Rejection::Refused(Refusal::TooManyConnections { limit, .. })
                if *limit == MAX_ENROLLING_PER_ADDRESS
        )
    })
    .await;
    assert!(r.to_string().contains("enrollment connections"), "{r}");
    assert!(matches!(
        extra.closed().await,
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == close_code::ENROLLMENT_REJECTED.into()
    ));
    // Dropping one frees its place: a real enrollment from the same address then works.
    let (conn, _, _) = held.pop().unwrap();
    conn.close(0u32.into(), b"");
    drop(conn);
    let mut enrolled = None;
    for _ in 0..50 {
        match attacker
            .enroll("node-1", &coordinator.issue_token("node-1"))
            .await
        {
            Ok(identity) => {
                enrolled = Some(identity);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(enrolled.is_some(), "no place freed up");
    drop(held);
    coordinator.close().await;
}

/// Failed enrollments spend an address's budget: past the burst, even a good token is refused
/// unread, until time refills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_enrollments_per_address_are_rate_limited() {
    let coordinator = hostile_coordinator("sec-rate");
    let mut events = coordinator.subscribe();
    let attacker = attacker_against(&coordinator);
    let started = std::time::Instant::now();
    for i in 0..ENROLL_FAILURE_BURST {
        let reason = attacker
            .enroll("node-1", &format!("{i:064x}"))
            .await
            .unwrap_err();
        assert!(reason.contains("unknown token"), "{reason}");
    }
    // The burst is spent (unless the test was so slow that time refilled it).
    let refills = (started.elapsed().as_secs_f64() / ENROLL_FAILURE_REFILL.as_secs_f64()) as u32;
    for _ in 0..refills {
        let _ = attacker.enroll("node-1", "not-a-token").await;
    }
    let token = coordinator.issue_token("node-1");
    let reason = attacker.enroll("node-1", &token).await.unwrap_err();
    // Refused unread, and told when to come back.
    assert!(reason.starts_with("busy, retry after "), "{reason}");
    assert!(reason.contains("too many failed enrollments"), "{reason}");
    expect_rejection(&mut events, "rate-limited enrollment", |r| {
        matches!(r, Rejection::Refused(Refusal::TooManyFailures { .. }))
    })
    .await;
    // The refused token was never looked at: once the budget refills, it works.
    tokio::time::sleep(ENROLL_FAILURE_REFILL + Duration::from_millis(200)).await;
    attacker
        .enroll("node-1", &token)
        .await
        .expect("the refill allows one more attempt, and the token is unspent");
    coordinator.close().await;
}

/// Enrollment connections that never send a request spend their address's budget as failed
/// requests do (before: a timeout spent nothing, so a stranger could hold connections open
/// again and again at no cost): past the burst, even a good token is refused unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_connections_that_never_ask_spend_their_addresss_budget() {
    let coordinator = hostile_coordinator("sec-silent");
    coordinator.set_enroll_request_timeout(Duration::from_millis(300));
    let attacker = attacker_against(&coordinator);
    let started = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..ENROLL_FAILURE_BURST + 2 {
        silent.push(attacker.connect(None, ALPN_ENROLL).await.unwrap());
    }
    // Each is closed by the coordinator once its time is up.
    for conn in &silent {
        let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await;
        assert!(
            closed.is_ok(),
            "a silent enrollment connection was kept open"
        );
    }
    // The burst is spent (unless the test was so slow that time refilled some of it).
    let refills = (started.elapsed().as_secs_f64() / ENROLL_FAILURE_REFILL.as_secs_f64()) as u32;
    for _ in 0..refills {
        let _ = attacker.enroll("node-1", "not-a-token").await;
    }
    let reason = attacker
        .enroll("node-1", &coordinator.issue_token("node-1"))
        .await
        .unwrap_err();
    assert!(reason.contains("too many failed enrollments"), "{reason}");
    coordinator.close().await;
}

/// A real agent refused by the enrollment limits is not turned away for good: it tries
/// again with backoff, within its lease, and enrolls once its address has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refused_for_now_enrolls_once_its_address_has_room() {
    let sandbox = Sandbox::new();
    let coordinator = hostile_coordinator("sec-busy");
    let attacker = attacker_against(&coordinator);
    // The agent shares the attacker's address (loopback), which holds every enrollment
    // connection it may.
    let held = attacker.hold_every_enrollment_connection().await;
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-2", "60s");
    let log_path = sandbox.path().join("node-2.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("trying again") {
            break log;
        }
        assert!(std::time::Instant::now() < deadline, "no retry: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        log.contains("too many enrollments from this address"),
        "{log}"
    );
    assert!(coordinator.node("node-2").is_none());
    drop(held);
    let node = wait_connected(&coordinator, "node-2").await;
    assert_eq!(node.node_id, "node-2");
    let _ = agent.kill();
    let _ = agent.wait();
    coordinator.close().await;
}

/// An enrolled node may have only MAX_AGENT_OPENED_STREAMS streams open towards the
/// coordinator: QUIC itself holds it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_open_more_streams_than_the_limit() {
    let coordinator = hostile_coordinator("sec-streams");
    let attacker = attacker_against(&coordinator);
    let id = attacker
        .enroll("node-1", &coordinator.issue_token("node-1"))
        .await
        .unwrap();
    let conn = attacker.connect(Some(&id), ALPN_NODE).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..MAX_AGENT_OPENED_STREAMS {
        streams.push(
            tokio::time::timeout(Duration::from_secs(5), conn.open_bi())
                .await
                .expect("streams up to the limit open")
                .unwrap(),
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(1), conn.open_bi())
            .await
            .is_err(),
        "a stream past the limit of {MAX_AGENT_OPENED_STREAMS} opened"
    );
    drop(streams);
    conn.close(0u32.into(), b"");
    coordinator.close().await;
}

/// A task's output that the coordinator does not read is held on its node within bounds:
/// at most `MAX_TASK_JOURNAL` in the agent's memory, the rest in a spill file in its work
/// dir (up to `MAX_TASK_SPILL`, past which the task waits), all of it delivered once read,
/// and the spill file gone after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_task_output_is_held_on_the_node_within_bounds() {
    use skyward_common::limits::MAX_TASK_JOURNAL;
    let sandbox = Sandbox::new();
    let coordinator = hostile_coordinator("sec-output");
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    let node = wait_connected(&coordinator, "node-1").await;
    let marker = sandbox.path().join("all-written");
    let total = 4 * MAX_TASK_JOURNAL;
    let mut task = coordinator
        .start_task(
            &node,
            TaskSpec::command(
                0,
                0,
                vec![
                    "sh".into(),
                    "-c".into(),
                    format!("head -c {total} /dev/zero && touch {}", marker.display()),
                ],
                vec![],
                None,
                false,
            ),
        )
        .await
        .unwrap();
    // Nobody reads: the task writes everything anyway (bounded in time: loopback and a
    // local disk take 64 MiB in well under this).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the task never finished writing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spill_dir = sandbox.path().join("node-1/.skyward-spill");
    let spilled = skyward_tests::dir_bytes(&spill_dir);
    assert!(
        spilled >= (total - MAX_TASK_JOURNAL) as u64 / 2,
        "past its memory bound the output went to disk: {spilled} bytes spilled"
    );
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", agent.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        (rss_kib as usize) * 1024 < total,
        "the agent holds {rss_kib} KiB: not the {total} bytes of output"
    );
    let out = task_output(&mut task).await;
    assert_eq!(out.len(), total);
    drop(task);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&spill_dir)
        .map(|d| d.count())
        .unwrap_or(0)
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the spill file stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();
    coordinator.close().await;
}

/// Agent A, a real enrolled identity, tries every way to act as or on node B: enroll under
/// B's name, get a certificate naming B through its CSR, and push events for a task it was
/// never given on a stream of its own. Each is refused and logged; B and its task carry on.
/// A revoked token enrolls nothing (its provisioning attempt was torn down, or its node
/// given up), while a later one for the same node id does; and a node given up is fenced:
/// when it connects again it is told to shut down in place of a welcome, and never counts as
/// connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_and_fenced_nodes_are_refused() {
    let coordinator = hostile_coordinator("sec-fence");
    let mut events = coordinator.subscribe();
    let attacker = attacker_against(&coordinator);
    let early = coordinator.issue_token("node-1");
    coordinator.revoke_tokens(&["node-1".to_string()]);
    let reason = attacker.enroll("node-1", &early).await.unwrap_err();
    assert!(reason.contains("token revoked"), "{reason}");
    expect_rejection(&mut events, "revoked token", |r| {
        matches!(
            r,
            Rejection::Token {
                reason: TokenRejection::Revoked,
                ..
            }
        )
    })
    .await;
    let identity = attacker
        .enroll("node-1", &coordinator.issue_token("node-1"))
        .await
        .expect("a token issued after the revocation works");

    let hello = AgentMessage::Hello(Box::new(Hello {
        agent_version: skyward_common::VERSION.into(),
        inventory: Default::default(),
    }));
    let conn = attacker.connect(Some(&identity), ALPN_NODE).await.unwrap();
    let (mut control, mut control_recv) = conn.open_bi().await.unwrap();
    write_frame(&mut control, &hello).await.unwrap();
    let welcome: Option<CoordinatorMessage> =
        read_frame(&mut control_recv, 64 * 1024).await.unwrap();
    assert!(
        matches!(welcome, Some(CoordinatorMessage::Welcome { .. })),
        "{welcome:?}"
    );
    wait_connected(&coordinator, "node-1").await;

    assert!(coordinator.give_up("node-1", "its machine is gone"));
    assert_eq!(
        coordinator.fenced("node-1").as_deref(),
        Some("its machine is gone")
    );
    let again = attacker.connect(Some(&identity), ALPN_NODE).await.unwrap();
    let (mut control, mut control_recv) = again.open_bi().await.unwrap();
    write_frame(&mut control, &hello).await.unwrap();
    let told: Option<CoordinatorMessage> = read_frame(&mut control_recv, 64 * 1024).await.unwrap();
    match told {
        Some(CoordinatorMessage::Shutdown { reason }) => assert_eq!(
            reason,
            "node-1 was given up (its machine is gone) and is no longer in pool sec-fence"
        ),
        other => panic!("expected a shutdown, got {other:?}"),
    }
    again.close(0u32.into(), b"shutting down");
    expect_rejection(
        &mut events,
        "fenced node",
        |r| matches!(r, Rejection::Fenced { node, .. } if node == "node-1"),
    )
    .await;
    assert!(coordinator.node("node-1").is_none_or(|n| !n.is_connected()));
    coordinator.close().await;
}

/// One node id has one live certificate: once node-2 enrolls again (a later attempt's
/// machine), the earlier certificate is refused and its holder told to shut down, so two
/// machines never take turns as one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_latest_certificate_of_a_node_id_connects() {
    let coordinator = hostile_coordinator("sec-live");
    let mut events = coordinator.subscribe();
    let attacker = attacker_against(&coordinator);
    let earlier = attacker
        .enroll("node-2", &coordinator.issue_token("node-2"))
        .await
        .unwrap();
    let later = attacker
        .enroll("node-2", &coordinator.issue_token("node-2"))
        .await
        .unwrap();
    let hello = AgentMessage::Hello(Box::new(Hello {
        agent_version: skyward_common::VERSION.into(),
        inventory: Default::default(),
    }));
    let answer = |identity: CertifiedKey| {
        let (attacker, hello) = (&attacker, hello.clone());
        async move {
            let conn = attacker.connect(Some(&identity), ALPN_NODE).await.unwrap();
            let (mut control, mut control_recv) = conn.open_bi().await.unwrap();
            write_frame(&mut control, &hello).await.unwrap();
            let reply: Option<CoordinatorMessage> =
                read_frame(&mut control_recv, 64 * 1024).await.unwrap();
            (conn, reply)
        }
    };
    let (stale, reply) = answer(earlier).await;
    match reply {
        Some(CoordinatorMessage::Shutdown { reason }) => assert_eq!(
            reason,
            "this certificate of node-2 was replaced by a newer one: this machine is no longer node-2 of pool sec-live"
        ),
        other => panic!("expected a shutdown, got {other:?}"),
    }
    stale.close(0u32.into(), b"shutting down");
    expect_rejection(&mut events, "stale certificate", |r| {
        *r == Rejection::StaleCertificate {
            node: "node-2".into(),
        }
    })
    .await;
    let (_live, reply) = answer(later).await;
    assert!(
        matches!(reply, Some(CoordinatorMessage::Welcome { .. })),
        "{reply:?}"
    );
    wait_connected(&coordinator, "node-2").await;
    coordinator.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_cannot_act_on_another_nodes_tasks() {
    let log = captured_log();
    skyward_common::install_crypto_provider();
    let sandbox = Sandbox::new();
    let coordinator = Coordinator::start(CoordinatorConfig {
        pool: "sec-identity".into(),
        bind: ([127, 0, 0, 1], 0).into(),
        state_dir: None,
    })
    .unwrap();
    let mut events = coordinator.subscribe();
    let mut agent_b = spawn_agent(&sandbox, &coordinator, "node-b", "10m");
    let node_b = wait_connected(&coordinator, "node-b").await;
    // B's task is mid-run while A acts.
    let mut task_b = coordinator
        .start_task(
            &node_b,
            TaskSpec::command(
                0,
                0,
                vec!["sh".into(), "-c".into(), "sleep 2; echo b-done".into()],
                vec![],
                None,
                false,
            ),
        )
        .await
        .unwrap();

    let attacker = attacker_against(&coordinator);
    // A's own token does not enroll it as B.
    let token_a = coordinator.issue_token("node-a");
    let reason = attacker.enroll("node-b", &token_a).await.unwrap_err();
    assert!(reason.contains("bound to node-a, not node-b"), "{reason}");
    // A CSR naming B yields a certificate naming A: the name is the token's, not the CSR's.
    let key_naming_b = NodeKey::generate("node-b").unwrap();
    let identity_a = attacker
        .enroll_with_key("node-a", &token_a, &key_naming_b)
        .await
        .unwrap();
    assert_eq!(
        skyward_common::identity::node_id_from_cert(&identity_a.chain[0]).unwrap(),
        "node-a"
    );

    // A connects as itself: B's connection is not displaced.
    let conn = attacker
        .connect(Some(&identity_a), ALPN_NODE)
        .await
        .unwrap();
    let (mut control, _control_recv) = conn.open_bi().await.unwrap();
    write_frame(
        &mut control,
        &AgentMessage::Hello(Box::new(Hello {
            agent_version: skyward_common::VERSION.into(),
            inventory: Default::default(),
        })),
    )
    .await
    .unwrap();
    wait_connected(&coordinator, "node-a").await;
    let b_now = coordinator.node("node-b").expect("node-b still connected");
    assert!(b_now.is_connected());
    assert_eq!(b_now.address, node_b.address);

    // A claims B's task: a stream of its own carrying that task's events.
    let (mut forged, _forged_recv) = conn.open_bi().await.unwrap();
    for event in [
        TaskEvent::Output {
            seq: 0,
            stream: OutputStream::Stdout,
            data: "forged\n".into(),
        },
        TaskEvent::Finished(TaskOutcome::Exited { code: 0 }),
    ] {
        let _ = write_frame(&mut forged, &event).await;
    }
    let r = expect_rejection(
        &mut events,
        "a stream opened by node-a",
        |r| matches!(r, Rejection::ForeignStream { node } if node == "node-a"),
    )
    .await;
    assert!(r
        .to_string()
        .contains("only the coordinator opens task streams"));
    assert_eq!(
        conn.closed().await,
        quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: close_code::PROTOCOL_VIOLATION.into(),
            reason: "only the coordinator opens streams".into()
        })
    );

    // B's task ran to its own end, untouched.
    let mut output = Vec::new();
    let mut outcome = None;
    while let Some(event) = task_b.output.next().await.unwrap() {
        match event {
            TaskEvent::Output { data, .. } => output.extend_from_slice(&data),
            TaskEvent::Finished(o) => outcome = Some(o),
            _ => {}
        }
    }
    assert_eq!(output, b"b-done\n");
    assert_eq!(outcome, Some(TaskOutcome::Exited { code: 0 }));
    assert!(coordinator.node("node-b").unwrap().is_connected());
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    for needle in [
        "token is bound to node-a, not node-b",
        "rejected: node-a opened a stream of its own",
    ] {
        assert!(
            text.contains(needle),
            "no log line with {needle:?} in:\n{text}"
        );
    }

    let _ = agent_b.kill();
    let _ = agent_b.wait();
    coordinator.close().await;
}

/// Every way `secret` could be written out: as it is, and for a private key (PEM or PKCS#8
/// DER), its private scalar in hex and base64, and each base64 line of the key that holds part
/// of the scalar. Lines holding only the public key are left out: certificates carry it openly.
fn leak_forms(secret: &[u8]) -> Vec<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = String::from_utf8_lossy(secret).into_owned();
    let der = if text.contains("-----BEGIN") {
        let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        b64.decode(body).expect("PEM body")
    } else if secret.iter().all(|b| b.is_ascii_hexdigit()) {
        return vec![text];
    } else {
        secret.to_vec()
    };
    // ECPrivateKey { version 1, privateKey OCTET STRING (32) }: the P-256 scalar.
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("a P-256 private key")
        + 5;
    let scalar = &der[at..at + 32];
    let mut forms = vec![
        hex::encode(scalar),
        hex::encode_upper(scalar),
        b64.encode(scalar),
    ];
    let encoded = b64.encode(&der);
    for (i, line) in encoded.as_bytes().chunks(64).enumerate() {
        if i * 48 < at + 32 && at < (i + 1) * 48 {
            forms.push(String::from_utf8_lossy(line).into_owned());
        }
    }
    forms
}

/// A whole pool at the most verbose logging there is, CLI and agents alike, with a task that
/// prints its environment: no token, no private key (CA, coordinator, node) and no value
/// from an `--env-file` appears in any of it, in any encoding (the task prints its
/// environment but that value, and the value's hash to show it arrived).
#[test]
fn no_token_or_private_key_reaches_any_log() {
    let sandbox = Sandbox::new();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let env_secret = format!("env-file-secret-{nonce:016x}");
    let env_file = sandbox.path().join("secrets.env");
    std::fs::write(&env_file, format!("API_KEY=\"{env_secret}\"\n")).unwrap();
    let mut cmd = sandbox.skyward();
    cmd.env("SKYWARD_LOG", "trace")
        .args(["run", "--nodes", "2", "--on", "all", "--env-file"])
        .arg(&env_file)
        .args([
            "--",
            "sh",
            "-c",
            "sleep 3; env | grep -v '^API_KEY='; printf %s \"$API_KEY\" | sha256sum",
        ]);
    let cli = std::thread::spawn(move || skyward_tests::run(&mut cmd, Duration::from_secs(120)));

    // The pool's files go with it: gather its secrets and agent logs while it runs.
    let mut tokens = std::collections::BTreeSet::new();
    let mut keys = std::collections::BTreeMap::new();
    let mut agent_logs = std::collections::BTreeMap::new();
    let home = sandbox.path().join("home");
    while !cli.is_finished() {
        for (pid, cmdline) in sandbox.processes() {
            if !cmdline.contains("skyward-agent") {
                continue;
            }
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            for var in environ.split(|&b| b == 0) {
                if let Some(token) = var.strip_prefix(b"SKYWARD_TOKEN=") {
                    tokens.insert(String::from_utf8_lossy(token).into_owned());
                }
            }
        }
        let mut dirs = vec![home.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    dirs.push(path);
                } else if name.ends_with(".key") {
                    if let Ok(key) = std::fs::read(&path) {
                        if !key.is_empty() {
                            keys.insert(path, key);
                        }
                    }
                } else if name == "agent.log" {
                    if let Ok(log) = std::fs::read(&path) {
                        agent_logs.insert(path, log);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = cli.join().unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");

    // Everything that was there to leak was found, and the logs are as verbose as can be.
    assert_eq!(tokens.len(), 2, "tokens found: {tokens:?}");
    let key_names: Vec<String> = keys
        .keys()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for name in ["ca.key", "coordinator.key", "node.key"] {
        assert!(
            key_names.iter().any(|n| n == name),
            "no {name} in {key_names:?}"
        );
    }
    assert_eq!(agent_logs.len(), 2, "{:?}", agent_logs.keys());
    assert!(out.stderr.contains("TRACE"), "the CLI did not log at trace");
    for (path, log) in &agent_logs {
        let log = String::from_utf8_lossy(log);
        assert!(
            log.contains("TRACE") && log.contains("enrolled"),
            "{}: {log}",
            path.display()
        );
    }
    assert!(
        out.stdout.contains("SKYWARD_NODE_ID="),
        "the task printed no environment"
    );
    let arrived = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        env_secret.as_bytes(),
    ));
    assert_eq!(
        out.stdout.matches(&arrived).count(),
        2,
        "the --env-file value did not reach both tasks: {}",
        out.stdout
    );

    let mut haystacks = vec![
        ("CLI stdout".to_string(), out.stdout.clone()),
        ("CLI stderr".to_string(), out.stderr.clone()),
    ];
    for (path, log) in &agent_logs {
        haystacks.push((
            path.display().to_string(),
            String::from_utf8_lossy(log).into_owned(),
        ));
    }
    let mut secrets: Vec<(String, String)> = tokens
        .iter()
        .map(|t| ("a token".to_string(), t.clone()))
        .collect();
    secrets.push(("the --env-file value".to_string(), env_secret.clone()));
    for (path, key) in &keys {
        for form in leak_forms(key) {
            secrets.push((path.display().to_string(), form));
        }
    }
    for (name, text) in &haystacks {
        assert!(
            !text.contains("PRIVATE KEY"),
            "{name} holds a PEM private key"
        );
        for (what, form) in &secrets {
            assert!(
                !text.contains(form.as_str()),
                "{name} holds {what} (as {form:?})"
            );
        }
    }
}

/// Dials the coordinator's TCP port for a sync's contents as an agent would, showing
/// `identity` and naming `ticket`; then reads what comes. `Ok(bytes)`: the connection ended
/// cleanly after `bytes`; `Err`: the handshake or the connection failed.
async fn dial_tcp_port(
    address: SocketAddr,
    ca_pin: &str,
    identity: &CertifiedKey,
    ticket: &[u8; 16],
) -> Result<usize, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tls = transport::bulk_client_config(ca_pin, identity).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(COORDINATOR_SERVER_NAME).unwrap();
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(address).await?;
        let mut stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        stream.write_all(ticket).await?;
        stream.flush().await?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await?;
        std::io::Result::Ok(rest.len())
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .expect("the coordinator answered the TCP port in time")
        .map_err(|e| e.to_string())
}

/// The TCP port hands a connection to a sync only for a node certificate of the pool and a
/// live ticket issued to that very node: a foreign certificate fails the handshake, a
/// made-up ticket or another node's gets the connection closed unread, and a ticket is
/// good once. The right node with its own ticket gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_port_takes_sync_contents_only_from_the_node_a_ticket_names() {
    let sandbox = Sandbox::new();
    let coordinator = skyward_tests::loopback_coordinator("tcp-port");
    let mut agents = [
        spawn_agent(&sandbox, &coordinator, "node-1", "1m"),
        spawn_agent(&sandbox, &coordinator, "node-2", "1m"),
    ];
    let node_1 = wait_connected(&coordinator, "node-1").await;
    let node_2 = wait_connected(&coordinator, "node-2").await;
    let pin = coordinator.ca_pin();
    let identity = |node: &str| {
        let dir = sandbox.path().join(format!("{node}.identity"));
        CertifiedKey {
            chain: vec![std::fs::read(dir.join("node.crt")).unwrap().into()],
            key_pkcs8_der: std::fs::read(dir.join("node.key")).unwrap(),
        }
    };
    let (own_1, own_2) = (identity("node-1"), identity("node-2"));

    let ticket = node_1
        .bulk_ticket()
        .expect("a node that dialed in is offered the TCP port");
    let address = SocketAddr::new(coordinator.local_addr().ip(), ticket.offer().port);

    // Another pool's certificate, naming the same node.
    let foreign_ca = PoolCa::generate("foreign").unwrap();
    let key = NodeKey::generate("node-1").unwrap();
    let (cert, _) = foreign_ca
        .sign_node_csr(&key.csr_der, "node-1", Duration::from_secs(600))
        .unwrap();
    let foreign = CertifiedKey {
        chain: vec![cert],
        key_pkcs8_der: key.key.serialize_der(),
    };
    let refused = dial_tcp_port(address, &pin, &foreign, &ticket.offer().ticket).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("alert")),
        "a foreign certificate: {refused:?}"
    );
    // The pool's own certificate with a made-up ticket.
    let made_up = dial_tcp_port(address, &pin, &own_1, &[7; 16]).await;
    assert!(matches!(made_up, Ok(0) | Err(_)), "{made_up:?}");
    // Node 2's certificate with node 1's ticket: refused, and the ticket is spent.
    let stolen = dial_tcp_port(address, &pin, &own_2, &ticket.offer().ticket).await;
    assert!(matches!(stolen, Ok(0) | Err(_)), "{stolen:?}");
    let late = tokio::spawn(async move { ticket.connection().await.map(|_| ()) });
    let again = dial_tcp_port(address, &pin, &own_1, &[0; 16]).await;
    assert!(matches!(again, Ok(0) | Err(_)), "{again:?}");
    assert!(
        late.await.unwrap().is_err(),
        "a spent ticket delivers nothing"
    );

    // Node 2 with a ticket of its own gets its connection to the sync.
    let ticket = node_2.bulk_ticket().unwrap();
    let offer = ticket.offer();
    let dialed =
        tokio::spawn(async move { dial_tcp_port(address, &pin, &own_2, &offer.ticket).await });
    let mut delivered = ticket
        .connection()
        .await
        .expect("the sync got its node's connection");
    tokio::io::AsyncWriteExt::write_all(&mut delivered, b"contents")
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut delivered)
        .await
        .unwrap();
    assert_eq!(dialed.await.unwrap(), Ok(8));
    for agent in &mut agents {
        let _ = agent.kill();
        let _ = agent.wait();
    }
}
