//! First contact: trade the bootstrap token and a CSR for a node certificate.

use std::path::Path;

use anyhow::{bail, Context, Result};
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
    let conn = endpoint
        .connect_with(client, coordinator, COORDINATOR_SERVER_NAME)?
        .await
        .with_context(|| format!("connecting to coordinator {coordinator} to enroll"))?;
    let identity = exchange(config, token, &conn).await?;
    save(config, &identity)?;
    Ok(identity)
}

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
        EnrollResponse::Rejected { reason } => bail!("enrollment rejected: {reason}"),
    }
}
