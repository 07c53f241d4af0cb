//! The agent's life: enroll once, then stay connected, reconnecting with backoff and jitter,
//! until the coordinator says shut down, a signal arrives, or the lease runs out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use skyward_common::frame::{read_frame, write_frame};
use skyward_common::limits::{HEALTH_INTERVAL, HELLO_TIMEOUT, MAX_CONTROL_FRAME};
use skyward_common::protocol::{
    close_code, AgentMessage, CoordinatorMessage, Hello, ALPN_ENROLL, ALPN_NODE,
    COORDINATOR_SERVER_NAME,
};
use skyward_common::transport;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::runner::{self, Tasks};
use crate::{inventory, AgentConfig, OnPoolEnd};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long one attempt to reach the coordinator (QUIC + TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the agent until it is told to stop. Every running task is stopped before it returns.
pub async fn run(config: AgentConfig) -> Result<()> {
    run_with(config, crate::typed::Registry::default()).await
}

/// [`run`], with the typed tasks of `registry` (a custom agent's).
pub async fn run_with(config: AgentConfig, registry: crate::typed::Registry) -> Result<()> {
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("creating work dir {}", config.work_dir.display()))?;
    // Before any inventory is read: the node reports the MIG devices the layout made. A
    // refusal is reported in the inventory, not a reason to stay away.
    let mig = config.mig.clone();
    if let Err(e) =
        tokio::task::spawn_blocking(move || crate::mig::apply_at_startup(mig.as_deref())).await
    {
        tracing::warn!("applying the MIG layout failed: {e}");
    }
    let tasks = Tasks::with_registry(
        config.node_id.clone(),
        config.work_dir.clone(),
        Arc::new(registry),
    );
    // Spot interruption notices, when watched; the unused sender keeps an unwatched channel
    // quiet rather than closed.
    let (_no_watch, unwatched) = tokio::sync::watch::channel(None);
    let notices: Notices = match &config.spot_watch {
        Some(watch) => crate::interruption::spawn(watch.clone()),
        None => unwatched,
    };
    // Which side dials: the agent (the default), or the coordinator (--listen).
    let (endpoint, dial) = match (config.listen, &config.coordinator) {
        (Some(listen), _) => (listening_endpoint(&config, listen)?, None),
        (None, Some(coordinator)) => {
            let coordinator = resolve(coordinator).await?;
            let bind: SocketAddr = if coordinator.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            (transport::endpoint(bind, None)?, Some(coordinator))
        }
        (None, None) => bail!(
            "give the coordinator's address (--coordinator HOST:PORT), or --listen ADDR for the coordinator to dial this agent"
        ),
    };
    let work = async {
        match dial {
            Some(coordinator) => {
                stay_connected(&config, &endpoint, coordinator, &tasks, &notices).await
            }
            None => stay_listening(&config, &endpoint, &tasks, &notices).await,
        }
    };

    let deadline = async {
        match config.deadline {
            Some(at) => {
                let left = at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            None => std::future::pending().await,
        }
    };

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let result = tokio::select! {
        r = work => r,
        _ = deadline => Err(PoolOver("the pool's deadline (its TTL) passed".into()).into()),
        _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
    };
    tasks.stop_all().await;
    endpoint.close(close_code::NORMAL.into(), b"agent exiting");
    // Let the close reach the coordinator rather than leaving it to time out.
    let _ = tokio::time::timeout(Duration::from_millis(300), endpoint.wait_idle()).await;
    match result {
        Err(e) if e.downcast_ref::<PoolOver>().is_some() => {
            tracing::warn!("{e}: every task is stopped");
            if config.on_pool_end == OnPoolEnd::Poweroff {
                power_off();
            }
            // A clean exit: a service manager must not start the agent again.
            Ok(())
        }
        // Restarting cannot help (the token is spent or refused, and no certificate works):
        // a cloud machine ends as at its lease, rather than restart the agent for ever.
        Err(e) if crate::enroll::never_joins(&e) && config.on_pool_end == OnPoolEnd::Poweroff => {
            tracing::error!("{e:#}: this node can never join its pool");
            power_off();
            Ok(())
        }
        other => other,
    }
}

/// One agent dialing its coordinator on an endpoint it may share with other agents of the
/// same process, until the coordinator says shut down or the lease passes. The benchmark's
/// swarm runs thousands this way on one UDP socket; signals, the MIG layout, spot notices and
/// the deadline belong to the host process and are not handled here.
pub async fn run_on(
    config: AgentConfig,
    registry: Arc<crate::typed::Registry>,
    endpoint: &quinn::Endpoint,
) -> Result<()> {
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("creating work dir {}", config.work_dir.display()))?;
    let coordinator = config
        .coordinator
        .as_deref()
        .context("run_on dials the coordinator: give its address")?;
    let coordinator = resolve(coordinator).await?;
    let tasks = Tasks::with_registry(config.node_id.clone(), config.work_dir.clone(), registry);
    let (_no_watch, unwatched) = tokio::sync::watch::channel(None);
    let result = stay_connected(&config, endpoint, coordinator, &tasks, &unwatched).await;
    tasks.stop_all().await;
    result
}

/// The pool is over without the coordinator having said so.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PoolOver(String);

/// Powers the machine off, trying the usual commands in turn; a machine that refuses (a
/// container) is left to its provider's own limits.
fn power_off() {
    for (program, args) in [
        ("poweroff", &[][..]),
        ("systemctl", &["poweroff"][..]),
        ("shutdown", &["-h", "now"][..]),
    ] {
        match crate::tool::run(program, args, crate::tool::TOOL_TIMEOUT) {
            Ok(_) => {
                tracing::warn!("powering the machine off ({program})");
                return;
            }
            Err(e) => tracing::warn!("cannot power off with {program}: {e}"),
        }
    }
    tracing::error!("could not power the machine off: it stays until its provider removes it");
}

/// The agent's own endpoint when the coordinator dials it: before enrollment it shows a
/// throwaway certificate and speaks only enrollment; after, its node certificate.
fn listening_endpoint(config: &AgentConfig, listen: SocketAddr) -> Result<quinn::Endpoint> {
    let server = match crate::enroll::load(&config.work_dir)? {
        Some(identity) => transport::agent_listener_config(&config.ca_pin, &identity, ALPN_NODE)?,
        None => {
            crate::enroll::require_token(config)?;
            let throwaway = skyward_common::identity::throwaway_listener_identity(&config.node_id)?;
            transport::agent_listener_config(&config.ca_pin, &throwaway, ALPN_ENROLL)?
        }
    };
    let endpoint = transport::endpoint(listen, Some(server))?;
    tracing::info!(node = %config.node_id, "listening on {} for the coordinator", endpoint.local_addr()?);
    Ok(endpoint)
}

/// The direction reversed: wait for the coordinator to dial in, enroll on the first such
/// connection if needed, then serve each connection it makes, until told to shut down or the
/// lease passes without one.
async fn stay_listening(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
    tasks: &Arc<Tasks>,
    notices: &Notices,
) -> Result<()> {
    let mut last_contact = Instant::now();
    let mut enrolled = crate::enroll::load(&config.work_dir)?.is_some();
    loop {
        let inventory = collect_inventory(config).await;
        let remaining = config.lease.saturating_sub(last_contact.elapsed());
        let Some(conn) = tokio::time::timeout(remaining, next_handshake(endpoint))
            .await
            .map_err(|_| {
                PoolOver(format!(
                    "no coordinator dialed in for {} (the pool's lease)",
                    humantime::format_duration(config.lease)
                ))
            })?
        else {
            bail!("the listening endpoint closed");
        };
        if !enrolled {
            let token = crate::enroll::require_token(config)?;
            let identity = match crate::enroll::exchange(config, token, &conn).await {
                Ok(identity) => identity,
                Err(e) if crate::enroll::never_joins(&e) => return Err(e),
                // A connection lost mid-way, a coordinator busy for now: it dials again.
                Err(e) => {
                    tracing::warn!("enrollment: {e:#}; waiting for the coordinator to dial again");
                    continue;
                }
            };
            crate::enroll::save(config, &identity)?;
            endpoint.set_server_config(Some(transport::agent_listener_config(
                &config.ca_pin,
                &identity,
                ALPN_NODE,
            )?));
            enrolled = true;
            last_contact = Instant::now();
            continue;
        }
        match serve_session(config, conn, inventory, tasks, notices).await {
            Ok(Session::Shutdown(reason)) => {
                tracing::info!("coordinator asked us to shut down: {reason}");
                return Ok(());
            }
            Ok(Session::Lost { reason, .. }) => {
                tracing::warn!("coordinator connection lost: {reason}")
            }
            Err(e) => tracing::warn!("coordinator session failed: {e:#}"),
        }
        // The certificate may have been renewed during the session.
        if let Some(identity) = crate::enroll::load(&config.work_dir)? {
            endpoint.set_server_config(Some(transport::agent_listener_config(
                &config.ca_pin,
                &identity,
                ALPN_NODE,
            )?));
        }
        last_contact = Instant::now();
    }
}

/// How long a dialer gets to finish its handshake with a listening agent.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Handshakes a listening agent runs at once, in all and per source address: a dialer that
/// stalls holds one slot until its deadline, never the agent.
const MAX_HANDSHAKES: usize = 64;
const MAX_HANDSHAKES_PER_ADDRESS: usize = 4;

/// The next connection whose handshake completes (the pool's coordinator: the listener
/// admits no other certificate), running handshakes side by side so that a dialer that
/// stalls or fails cannot keep the coordinator waiting behind it. `None` once the endpoint
/// closed.
async fn next_handshake(endpoint: &quinn::Endpoint) -> Option<quinn::Connection> {
    let mut handshakes = tokio::task::JoinSet::new();
    let mut per_address: std::collections::HashMap<std::net::IpAddr, usize> = Default::default();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let incoming = incoming?;
                let from = incoming.remote_address().ip();
                let pending = per_address.entry(from).or_default();
                if handshakes.len() >= MAX_HANDSHAKES || *pending >= MAX_HANDSHAKES_PER_ADDRESS {
                    incoming.refuse();
                    continue;
                }
                *pending += 1;
                handshakes.spawn(async move {
                    (from, tokio::time::timeout(HANDSHAKE_DEADLINE, incoming).await)
                });
            }
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                let Ok((from, result)) = done else { continue };
                if let Some(pending) = per_address.get_mut(&from) {
                    *pending = pending.saturating_sub(1);
                    if *pending == 0 {
                        per_address.remove(&from);
                    }
                }
                match result {
                    Ok(Ok(conn)) => return Some(conn),
                    // A peer without the coordinator's certificate ends here, before any stream.
                    Ok(Err(e)) => tracing::warn!("refused a connection: {e}"),
                    Err(_) => tracing::warn!(
                        "refused a connection from {from}: its handshake took over {HANDSHAKE_DEADLINE:?}"
                    ),
                }
            }
        }
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving coordinator address {addr:?} (expected host:port)"))?
        .next()
        .with_context(|| format!("coordinator address {addr:?} resolved to nothing"))
}

async fn stay_connected(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
    coordinator: SocketAddr,
    tasks: &Arc<Tasks>,
    notices: &Notices,
) -> Result<()> {
    let mut identity = crate::enroll::load_or_enroll(config, endpoint, coordinator).await?;
    let mut last_contact = Instant::now();
    let mut failures = 0u32;
    loop {
        // The certificate may have been renewed during the last session.
        if let Some(renewed) = crate::enroll::load(&config.work_dir)? {
            identity = renewed;
        }
        let client = transport::node_client_config(&config.ca_pin, &identity)?;
        // A connection attempt never outlasts the lease: a silent coordinator must not keep
        // the agent (and its node's bill) alive past it.
        let remaining = config.lease.saturating_sub(last_contact.elapsed());
        let attempt_limit = remaining.min(CONNECT_TIMEOUT);
        match serve_connection(
            config,
            endpoint,
            &client,
            coordinator,
            attempt_limit,
            tasks,
            notices,
        )
        .await
        {
            Ok(Session::Shutdown(reason)) => {
                tracing::info!("coordinator asked us to shut down: {reason}");
                return Ok(());
            }
            Ok(Session::Lost {
                was_connected,
                reason,
            }) => {
                tracing::warn!("connection to coordinator lost: {reason}");
                if was_connected {
                    last_contact = Instant::now();
                    failures = 0;
                }
            }
            Err(e) => tracing::warn!("cannot reach coordinator {coordinator}: {e:#}"),
        }
        if last_contact.elapsed() >= config.lease {
            return Err(PoolOver(format!(
                "coordinator {coordinator} unreachable for {} (the pool's lease)",
                humantime::format_duration(config.lease)
            ))
            .into());
        }
        failures += 1;
        let remaining = config.lease.saturating_sub(last_contact.elapsed());
        tokio::time::sleep(backoff(failures).min(remaining)).await;
    }
}

/// Exponential backoff with "equal jitter": half fixed, half random, so that a pool's agents
/// do not all come back at the same instant after a coordinator restart.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    let half = exp / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// How long after a refused renewal the agent asks again.
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// When to renew the certificate in the work dir: two thirds of the way from now to its
/// expiry. `None` without one.
fn renewal_time(config: &AgentConfig) -> Option<tokio::time::Instant> {
    let identity = crate::enroll::load(&config.work_dir).ok()??;
    let expires = skyward_common::identity::not_after(identity.chain.first()?).ok()?;
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Some(tokio::time::Instant::now() + left * 2 / 3)
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A session's helper task, aborted when the session ends, whichever way it ends: the
/// task holds the connection, which would otherwise outlive the session.
struct EndsWithSession<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for EndsWithSession<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The latest interruption notice, once one came.
type Notices = tokio::sync::watch::Receiver<Option<skyward_common::protocol::Interruption>>;

enum Session {
    Shutdown(String),
    Lost { was_connected: bool, reason: String },
}

async fn serve_connection(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    coordinator: SocketAddr,
    connect_timeout: Duration,
    tasks: &Arc<Tasks>,
    notices: &Notices,
) -> Result<Session> {
    // Inventory first: the coordinator gives a new connection only a few seconds to say
    // hello, and probing GPUs can take longer than that.
    let inventory = collect_inventory(config).await;
    let connecting = endpoint.connect_with(client.clone(), coordinator, COORDINATOR_SERVER_NAME)?;
    let conn = tokio::time::timeout(connect_timeout, connecting)
        .await
        .context("no answer")??;
    serve_session(config, conn, inventory, tasks, notices).await
}

/// The node's inventory, probed on a blocking thread.
async fn collect_inventory(config: &AgentConfig) -> skyward_common::inventory::Inventory {
    let work_dir = config.work_dir.clone();
    match tokio::task::spawn_blocking(move || inventory::collect(&work_dir)).await {
        Ok(inventory) => inventory,
        Err(e) => {
            tracing::warn!("inventory probe failed: {e}");
            skyward_common::inventory::Inventory::default()
        }
    }
}

/// One session on an established connection, whichever side dialed: the agent opens the
/// control stream, says hello, sends health, and serves the task streams the coordinator opens.
async fn serve_session(
    config: &AgentConfig,
    conn: quinn::Connection,
    inventory: skyward_common::inventory::Inventory,
    tasks: &Arc<Tasks>,
    notices: &Notices,
) -> Result<Session> {
    let coordinator = conn.remote_address();
    let (mut control_send, mut control_recv) = conn.open_bi().await?;
    let hello = AgentMessage::Hello(Box::new(Hello {
        agent_version: skyward_common::VERSION.to_string(),
        inventory,
    }));
    write_frame(&mut control_send, &hello).await?;
    let welcome = tokio::time::timeout(
        HELLO_TIMEOUT,
        read_frame::<_, CoordinatorMessage>(&mut control_recv, MAX_CONTROL_FRAME),
    )
    .await
    .context("no welcome from the coordinator")??;
    let health_interval = match welcome {
        Some(CoordinatorMessage::Welcome {
            pool,
            health_interval_ms,
        }) => {
            tracing::info!(%pool, node = %config.node_id, "connected to coordinator {coordinator}");
            Duration::from_millis(health_interval_ms.max(100) as u64)
        }
        Some(CoordinatorMessage::Shutdown { reason }) => return Ok(Session::Shutdown(reason)),
        Some(CoordinatorMessage::Renewed { .. }) => {
            bail!("the coordinator sent a certificate before welcoming us")
        }
        None => bail!("the coordinator closed the control stream before welcoming us"),
    };

    // The control stream is read in its own task: a frame read is not cancel-safe.
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(8);
    let _control_reader = EndsWithSession(tokio::spawn(async move {
        loop {
            let msg =
                read_frame::<_, CoordinatorMessage>(&mut control_recv, MAX_CONTROL_FRAME).await;
            let end = !matches!(msg, Ok(Some(_)));
            if control_tx.send(msg).await.is_err() || end {
                return;
            }
        }
    }));
    // Task streams are taken in a loop of their own: one wake per stream, with no timers
    // or other branches to poll again each time.
    let task_conn = conn.clone();
    let task_table = tasks.clone();
    // A sync's contents may come over the coordinator's TCP port, at the address this
    // connection reaches it at.
    let bulk = Arc::new(crate::workdir::BulkDial {
        coordinator: coordinator.ip(),
        ca_pin: config.ca_pin.clone(),
    });
    let mut accepting = EndsWithSession(tokio::spawn(async move {
        loop {
            match task_conn.accept_bi().await {
                Ok((send, recv)) => {
                    tokio::spawn(runner::serve(send, recv, task_table.clone(), bulk.clone()));
                }
                Err(e) => return e.to_string(),
            }
        }
    }));
    // A notice that came while disconnected is told now; later ones as they come.
    let mut notices = notices.clone();
    // Read first: the borrow must not be held across the write's await.
    let pending = notices.borrow_and_update().clone();
    if let Some(notice) = pending {
        write_frame(&mut control_send, &AgentMessage::Interruption(notice)).await?;
    }
    // The certificate is renewed two thirds of the way to its expiry, over this connection.
    let mut renew_at = renewal_time(config);
    let mut renewing: Option<skyward_common::identity::NodeKey> = None;
    let mut health = tokio::time::interval(health_interval.min(HEALTH_INTERVAL * 12));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let session = loop {
        tokio::select! {
            _ = health.tick() => {
                let (held, waiting) = tasks.output_held();
                let msg = AgentMessage::Health(inventory::health(tasks.running(), held, waiting));
                if let Err(e) = write_frame(&mut control_send, &msg).await {
                    break Session::Lost { was_connected: true, reason: e.to_string() };
                }
            }
            _ = sleep_until_some(renew_at), if renewing.is_none() => {
                let key = skyward_common::identity::NodeKey::generate(&config.node_id)?;
                let msg = AgentMessage::Renew { csr_der: key.csr_der.clone().into() };
                if let Err(e) = write_frame(&mut control_send, &msg).await {
                    break Session::Lost { was_connected: true, reason: e.to_string() };
                }
                renewing = Some(key);
            }
            Ok(()) = notices.changed() => {
                let notice = notices.borrow_and_update().clone();
                if let Some(notice) = notice {
                    if let Err(e) = write_frame(&mut control_send, &AgentMessage::Interruption(notice)).await {
                        break Session::Lost { was_connected: true, reason: e.to_string() };
                    }
                }
            }
            msg = control_rx.recv() => match msg {
                Some(Ok(Some(CoordinatorMessage::Shutdown { reason }))) => break Session::Shutdown(reason),
                Some(Ok(Some(CoordinatorMessage::Welcome { .. }))) => {
                    tracing::warn!("unexpected second welcome ignored");
                }
                Some(Ok(Some(CoordinatorMessage::Renewed { result }))) => {
                    match (renewing.take(), result) {
                        (Some(key), Ok(cert_der)) => {
                            let identity = skyward_common::identity::CertifiedKey {
                                chain: vec![rustls_pki_types::CertificateDer::from(cert_der.to_vec())],
                                key_pkcs8_der: key.key.serialize_der(),
                            };
                            crate::enroll::save(config, &identity)?;
                            tracing::info!("certificate renewed");
                            renew_at = renewal_time(config);
                        }
                        (Some(_), Err(e)) => {
                            tracing::warn!("the coordinator did not renew the certificate: {e}");
                            renew_at = Some(tokio::time::Instant::now() + RENEW_RETRY);
                        }
                        (None, _) => tracing::warn!("a certificate nobody asked for, ignored"),
                    }
                }
                Some(Ok(None)) | None => break Session::Lost { was_connected: true, reason: "control stream closed".into() },
                Some(Err(e)) => break Session::Lost { was_connected: true, reason: e.to_string() },
            },
            ended = &mut accepting.0 => {
                let reason = ended.unwrap_or_else(|e| format!("task stream loop ended: {e}"));
                break Session::Lost { was_connected: true, reason };
            }
        }
    };
    if let Session::Shutdown(_) = session {
        conn.close(close_code::NORMAL.into(), b"shutting down");
    }
    Ok(session)
}
