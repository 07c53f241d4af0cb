//! First contact: trade the bootstrap token and a CSR for a node certificate.

use std::path::Path;

use anyhow::{Context, Result};
use rustls_pki_types::CertificateDer;
use skyward_common::frame::{read_frame, write_frame};
use skyward_common::identity::{write_private, CertifiedKey, NodeKey};
use skyward_common::limits::{ENROLL_REQUEST_TIMEOUT, MAX_ENROLL_FRAME};
use skyward_common::protocol::{
    close_code, EnrollRequest, EnrollResponse, COORDINATOR_SERVER_NAME,
};
use skyward_common::transport;

use crate::AgentConfig;

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";

/// Loads the node identity from the work dir, or enrolls to get one.
pub async fn load_or_enroll(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
    coordinator: std::net::SocketAddr,
) -> Result<CertifiedKey> {
    if let Some(identity) = load(&config.work_dir)? {
        tracing::info!(
            "using the certificate already in {}",
            config.work_dir.display()
        );
        return Ok(identity);
    }
    let token = require_token(config)?;
    let client = transport::enroll_client_config(&config.ca_pin)?;
    // A coordinator not up yet, a network blip or a busy address pass: try again, with
    // backoff, for as long as the lease lasts. A judged rejection (a bad token) does not.
    let started = tokio::time::Instant::now();
    let mut backoff = FIRST_RETRY;
    loop {
        let attempt = async {
            let conn = endpoint
                .connect_with(client.clone(), coordinator, COORDINATOR_SERVER_NAME)?
                .await
                .with_context(|| format!("connecting to coordinator {coordinator} to enroll"))?;
            exchange(config, token, &conn).await
        };
        let error = match attempt.await {
            Ok(identity) => {
                save(config, &identity)?;
                return Ok(identity);
            }
            Err(error) if !transient(&error) => return Err(error),
            Err(error) => error,
        };
        let wait = match error.downcast_ref::<Busy>() {
            Some(busy) => busy.0.max(FIRST_RETRY),
            None => backoff,
        };
        if started.elapsed() + wait >= config.lease {
            return Err(error.context(format!(
                "still not enrolled after {}s (the lease)",
                config.lease.as_secs()
            )));
        }
        tracing::warn!("enrollment: {error:#}; trying again in {wait:?}");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_RETRY);
    }
}

/// Whether an enrollment failure may pass by itself: the coordinator busy or unreachable
/// for now, the connection lost or closed by the coordinator's admission limit. A judged
/// rejection and a failed handshake (the wrong CA pin) do not.
fn transient(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        if cause.is::<Busy>() || cause.is::<tokio::time::error::Elapsed>() {
            return true;
        }
        if let Some(frame) = cause.downcast_ref::<skyward_common::frame::FrameError>() {
            return frame.is_connection_lost();
        }
        matches!(
            cause.downcast_ref::<quinn::ConnectionError>(),
            Some(
                quinn::ConnectionError::TimedOut
                    | quinn::ConnectionError::Reset
                    | quinn::ConnectionError::ApplicationClosed(_)
            )
        )
    })
}

/// The first pause between enrollment attempts, doubled up to [`MAX_RETRY`].
const FIRST_RETRY: std::time::Duration = std::time::Duration::from_millis(500);
const MAX_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// The coordinator judged the request and said no: trying again cannot help.
#[derive(Debug, thiserror::Error)]
#[error("enrollment rejected: {0}")]
pub struct Rejected(String);

/// The coordinator did not judge the request yet: try again after this long.
#[derive(Debug, thiserror::Error)]
#[error("enrollment refused for now ({1}); retry after {0:?}")]
pub struct Busy(std::time::Duration, String);

/// The token, or the error that says how to give one.
pub fn require_token(config: &AgentConfig) -> Result<&str> {
    config.token.as_deref().with_context(|| {
        format!(
            "no certificate in {} and no enrollment token: pass --token or set SKYWARD_TOKEN",
            config.work_dir.display()
        )
    })
}

/// Keeps the identity in the work dir: the key owner-only, so a restart needs no new token.
pub fn save(config: &AgentConfig, identity: &CertifiedKey) -> Result<()> {
    write_private(&config.work_dir.join(KEY_FILE), &identity.key_pkcs8_der)?;
    std::fs::write(config.work_dir.join(CERT_FILE), &identity.chain[0])
        .with_context(|| format!("writing the certificate to {}", config.work_dir.display()))
}

/// The identity kept in the work dir by an earlier enrollment, if any.
pub fn load(dir: &Path) -> Result<Option<CertifiedKey>> {
    let (key, cert) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
    if !key.exists() || !cert.exists() {
        return Ok(None);
    }
    Ok(Some(CertifiedKey {
        key_pkcs8_der: std::fs::read(&key).with_context(|| key.display().to_string())?,
        chain: vec![CertificateDer::from(
            std::fs::read(&cert).with_context(|| cert.display().to_string())?,
        )],
    }))
}

/// Trades the token and a CSR for a certificate on `conn`, a connection to the coordinator
/// made by either side (the agent dialing, or the coordinator dialing a listening agent;
/// either way the coordinator's certificate was checked against the pin first).
pub async fn exchange(
    config: &AgentConfig,
    token: &str,
    conn: &quinn::Connection,
) -> Result<CertifiedKey> {
    let node_key = NodeKey::generate(&config.node_id)?;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let request = EnrollRequest {
            node_id: config.node_id.clone(),
            token: token.to_string(),
            csr_der: node_key.csr_der.clone().into(),
            agent_version: skyward_common::VERSION.to_string(),
        };
        write_frame(&mut send, &request).await?;
        send.finish()?;
        read_frame::<_, EnrollResponse>(&mut recv, MAX_ENROLL_FRAME)
            .await?
            .context("the coordinator closed the enrollment stream without answering")
    };
    let response = tokio::time::timeout(ENROLL_REQUEST_TIMEOUT, exchange)
        .await
        .context("the coordinator did not answer the enrollment request in time")??;
    conn.close(close_code::NORMAL.into(), b"enrolled");
    match response {
        EnrollResponse::Accepted { cert_der, .. } => {
            tracing::info!(node = %config.node_id, "enrolled");
            Ok(CertifiedKey {
                chain: vec![CertificateDer::from(cert_der.to_vec())],
                key_pkcs8_der: node_key.key.serialize_der(),
            })
        }
        EnrollResponse::Rejected { reason } => Err(Rejected(reason).into()),
        EnrollResponse::Busy {
            reason,
            retry_after_ms,
        } => Err(Busy(std::time::Duration::from_millis(retry_after_ms), reason).into()),
    }
}
