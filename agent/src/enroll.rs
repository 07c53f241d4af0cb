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
            identity_dir(&config.work_dir).display()
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
    config
        .token
        .as_deref()
        .ok_or_else(|| NoIdentity(identity_dir(&config.work_dir).display().to_string()).into())
}

/// No certificate to connect with and no token to enroll with: this agent can never join.
#[derive(Debug, thiserror::Error)]
#[error("no certificate in {0} and no enrollment token: pass --token or set SKYWARD_TOKEN")]
pub struct NoIdentity(String);

/// Whether `error` means this agent can never join its pool: its token was refused (spent,
/// revoked, expired) or it has neither a certificate nor a token. Trying again cannot help.
pub fn never_joins(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.is::<Rejected>() || cause.is::<NoIdentity>())
}

/// Where a node keeps its key and certificate: beside its work dir, not in it (`WORK.identity`,
/// owner-only), so that a task's default working directory does not hold the node's key.
pub fn identity_dir(work_dir: &Path) -> std::path::PathBuf {
    let dir = work_dir
        .canonicalize()
        .unwrap_or_else(|_| work_dir.to_path_buf());
    match dir.file_name() {
        Some(name) => dir.with_file_name(format!("{}.identity", name.to_string_lossy())),
        None => dir.join(".skyward-identity"),
    }
}

/// Keeps the identity beside the work dir: the key owner-only, so a restart needs no new
/// token.
pub fn save(config: &AgentConfig, identity: &CertifiedKey) -> Result<()> {
    let dir = identity_dir(&config.work_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} owner-only", dir.display()))?;
    save_in(&dir, identity)
}

/// Where a replacement's files wait until they are moved in.
const KEY_NEW: &str = "node.key.new";
const CERT_NEW: &str = "node.crt.new";

/// Replaces the identity in `dir` so that a crash at any point leaves a key and certificate
/// that belong together (the token is spent: a mismatched pair could never connect again).
/// Both new files are written and flushed beside the old ones, then the key is moved over,
/// then the certificate; [`load`] finishes a replacement a crash cut between the two moves,
/// and drops one that had not begun to move.
fn save_in(dir: &Path, identity: &CertifiedKey) -> Result<()> {
    let cert = identity
        .chain
        .first()
        .context("an identity without a certificate")?;
    write_private(&dir.join(KEY_NEW), &identity.key_pkcs8_der)?;
    write_private(&dir.join(CERT_NEW), cert)?;
    let moved = |from: &str, to: &str| {
        std::fs::rename(dir.join(from), dir.join(to))
            .with_context(|| format!("moving {from} to {to} in {}", dir.display()))
    };
    moved(KEY_NEW, KEY_FILE)?;
    moved(CERT_NEW, CERT_FILE)?;
    // The moves themselves reach the disk.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Finishes or drops a replacement a crash interrupted (see [`save_in`]).
fn recover(dir: &Path) -> Result<()> {
    let (key_new, cert_new) = (dir.join(KEY_NEW), dir.join(CERT_NEW));
    if key_new.exists() {
        // Nothing moved yet: the old pair stands.
        for file in [&key_new, &cert_new] {
            match std::fs::remove_file(file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| file.display().to_string())
                }
                _ => {}
            }
        }
    } else if cert_new.exists() {
        // The new key is in place and its certificate was whole before it moved.
        std::fs::rename(&cert_new, dir.join(CERT_FILE))
            .with_context(|| format!("finishing the renewal in {}", dir.display()))?;
    }
    Ok(())
}

/// The identity an earlier enrollment kept for the node whose work dir is `work_dir`, if any.
pub fn load(work_dir: &Path) -> Result<Option<CertifiedKey>> {
    load_from(&identity_dir(work_dir))
}

fn load_from(dir: &Path) -> Result<Option<CertifiedKey>> {
    if !dir.exists() {
        return Ok(None);
    }
    recover(dir)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(key: &[u8], cert: &[u8]) -> CertifiedKey {
        CertifiedKey {
            key_pkcs8_der: key.to_vec(),
            chain: vec![CertificateDer::from(cert.to_vec())],
        }
    }

    fn pair(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        let loaded = load_from(dir).unwrap().unwrap();
        (loaded.key_pkcs8_der, loaded.chain[0].to_vec())
    }

    #[test]
    fn the_identity_lives_beside_the_work_dir_not_in_it() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let dir = identity_dir(&work);
        assert_eq!(
            dir,
            root.path().canonicalize().unwrap().join("work.identity")
        );
        assert!(!dir.starts_with(work.canonicalize().unwrap()));
    }

    #[test]
    fn a_renewal_cut_short_by_a_crash_leaves_a_pair_that_belongs_together() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        save_in(dir, &identity(b"key 1", b"cert 1")).unwrap();
        assert_eq!(pair(dir), (b"key 1".to_vec(), b"cert 1".to_vec()));

        // A crash while the new files were written: the old pair stands.
        std::fs::write(dir.join(KEY_NEW), b"key 2").unwrap();
        std::fs::write(dir.join(CERT_NEW), b"cert").unwrap();
        assert_eq!(pair(dir), (b"key 1".to_vec(), b"cert 1".to_vec()));
        assert!(!dir.join(KEY_NEW).exists() && !dir.join(CERT_NEW).exists());

        // A crash between the two moves: the new certificate joins the new key.
        std::fs::write(dir.join(KEY_FILE), b"key 3").unwrap();
        std::fs::write(dir.join(CERT_NEW), b"cert 3").unwrap();
        assert_eq!(pair(dir), (b"key 3".to_vec(), b"cert 3".to_vec()));

        // A whole renewal, and the key stays owner-only.
        save_in(dir, &identity(b"key 4", b"cert 4")).unwrap();
        assert_eq!(pair(dir), (b"key 4".to_vec(), b"cert 4".to_vec()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
