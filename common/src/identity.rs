//! Pool identities: a CA per pool (made with rcgen), the coordinator's server certificate,
//! node certificates issued from CSRs, and the CA pin agents use to trust the coordinator.
//!
//! Private keys are generated where they are used and never travel: the CA and coordinator
//! keys stay on the coordinator's disk (mode 0600), each node's key on its node.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::protocol::{is_valid_node_id, COORDINATOR_SERVER_NAME};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate error: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("malformed certificate signing request: {0}")]
    BadCsr(rcgen::Error),
    #[error("certificate does not name a valid node id")]
    NoNodeId,
    #[error("cannot parse certificate")]
    BadCertificate,
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Tolerance for clocks that disagree a little between coordinator and nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// A private key with its certificate chain (leaf first), ready for rustls.
pub struct CertifiedKey {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pkcs8_der: Vec<u8>,
}

/// Shows the certificates' fingerprints, never the key.
impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field(
                "chain",
                &self
                    .chain
                    .iter()
                    .map(|c| fingerprint(c))
                    .collect::<Vec<_>>(),
            )
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertifiedKey {
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone()))
    }
}

/// How long a pool's CA and its coordinator's certificate are valid: longer than any pool
/// is let live (a `--ttl` beyond it is refused), so neither needs reissuing while the pool is
/// up. The pool's life bounds what a leaked coordinator key could do: the CA pin is per pool.
pub const POOL_CERT_LIFE: Duration = Duration::from_secs(3650 * 24 * 3600);

/// The certificate authority of one pool.
pub struct PoolCa {
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl PoolCa {
    /// Makes a fresh CA named after the pool.
    pub fn generate(pool: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(&format!("skyward pool {pool} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let (not_before, _) = validity(Duration::ZERO);
        params.not_before = not_before;
        params.not_after = not_before + POOL_CERT_LIFE;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(PoolCa {
            cert_der: cert.der().clone(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate in PEM, for tools on a node (curl, wget) that check downloads.
    pub fn cert_pem(&self) -> String {
        pem_certificate(&self.cert_der)
    }

    /// The pin an agent is given to recognise this pool's coordinator: hex SHA-256 of the CA.
    pub fn pin(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Issues the coordinator's own server certificate (with a key made here).
    pub fn issue_server_cert(&self) -> Result<CertifiedKey, IdentityError> {
        self.issue_server_cert_for(&[])
    }

    /// Like [`issue_server_cert`](Self::issue_server_cert), also valid for `ips`, so that
    /// plain HTTPS clients on nodes (curl, wget) can check the coordinator at its address.
    pub fn issue_server_cert_for(
        &self,
        ips: &[std::net::IpAddr],
    ) -> Result<CertifiedKey, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![COORDINATOR_SERVER_NAME.to_string()])?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
        params.distinguished_name = common_name("skyward coordinator");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Client auth too: with the connection direction reversed, the coordinator dials
        // the agents and shows this certificate as their client.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (not_before, _) = validity(Duration::ZERO);
        params.not_before = not_before;
        params.not_after = not_before + POOL_CERT_LIFE;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key_pkcs8_der: key.serialize_der(),
        })
    }

    /// Signs a node's CSR. Only the CSR's public key is used: the name is the node id the
    /// coordinator bound the token to, and usage is client authentication only.
    pub fn sign_node_csr(
        &self,
        csr_der: &[u8],
        node_id: &str,
        lifetime: Duration,
    ) -> Result<(CertificateDer<'static>, SystemTime), IdentityError> {
        let (not_before, not_after) = validity(lifetime);
        self.sign_node_csr_between(csr_der, node_id, not_before, not_after)
    }

    /// Like [`sign_node_csr`](Self::sign_node_csr) with an explicit validity window (tests use
    /// it to make expired certificates).
    pub fn sign_node_csr_between(
        &self,
        csr_der: &[u8],
        node_id: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<(CertificateDer<'static>, SystemTime), IdentityError> {
        if !is_valid_node_id(node_id) {
            return Err(IdentityError::NoNodeId);
        }
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut request =
            CertificateSigningRequestParams::from_der(&der).map_err(IdentityError::BadCsr)?;
        let mut params = CertificateParams::new(vec![node_id.to_string()])?;
        params.distinguished_name = common_name(node_id);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Server auth too: with the direction reversed, the agent is the QUIC server.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        request.params = params;
        let cert = request.signed_by(&self.issuer)?;
        Ok((cert.der().clone(), not_after.into()))
    }

    /// Writes the CA to `dir`: the key with mode 0600, the certificate beside it.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        write_private(&dir.join("ca.key"), self.key_pem.as_bytes())?;
        write_file(&dir.join("ca.der"), &self.cert_der)
    }
}

/// A throwaway self-signed certificate for an agent that listens before it has enrolled: it
/// only has to carry the handshake; the coordinator trusts the token, not this certificate.
pub fn throwaway_listener_identity(node_id: &str) -> Result<CertifiedKey, IdentityError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![node_id.to_string()])?;
    params.distinguished_name = common_name(node_id);
    let (not_before, not_after) = validity(Duration::from_secs(24 * 3600));
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.self_signed(&key)?;
    Ok(CertifiedKey {
        chain: vec![cert.der().clone()],
        key_pkcs8_der: key.serialize_der(),
    })
}

/// A node's freshly generated key and the CSR for it.
pub struct NodeKey {
    pub key: KeyPair,
    pub csr_der: Vec<u8>,
}

impl NodeKey {
    pub fn generate(node_id: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![node_id.to_string()])?;
        params.distinguished_name = common_name(node_id);
        let csr = params.serialize_request(&key)?;
        Ok(NodeKey {
            csr_der: csr.der().to_vec(),
            key,
        })
    }
}

/// When a certificate stops being valid.
pub fn not_after(der: &[u8]) -> Result<std::time::SystemTime, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::BadCertificate)?;
    let secs = cert.validity().not_after.timestamp();
    Ok(std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

/// The node id a certificate names (its common name), if it is a valid one.
pub fn node_id_from_cert(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::BadCertificate)?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(IdentityError::NoNodeId)?;
    if !is_valid_node_id(cn) {
        return Err(IdentityError::NoNodeId);
    }
    Ok(cn.to_string())
}

/// Whether a certificate is the coordinator's: it names [`COORDINATOR_SERVER_NAME`], which
/// is not a valid node id (it has dots), so no certificate the CA signs for a node carries it.
/// A listening agent admits only such a client: a node's certificate, in whoever's hands,
/// chains to the same CA but cannot act as the coordinator.
pub fn names_coordinator(der: &[u8]) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let Ok(Some(names)) = cert.subject_alternative_name() else {
        return false;
    };
    names
        .value
        .general_names
        .iter()
        .any(|name| matches!(name, GeneralName::DNSName(dns) if *dns == COORDINATOR_SERVER_NAME))
}

/// A DER certificate as PEM text.
pub fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// A validity window starting a little in the past (clock skew) and lasting `lifetime`.
fn validity(lifetime: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - CLOCK_SKEW;
    (not_before, now + lifetime)
}

/// Writes a secret with owner-only permissions from the first byte on, flushed to disk.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    // On the disk before anything relies on it (a rename over an older copy, a restart).
    file.sync_all().map_err(io)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    std::fs::write(path, bytes).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificate_names_the_bound_node_not_the_csr() {
        let ca = PoolCa::generate("t").unwrap();
        let node = NodeKey::generate("node-evil").unwrap();
        let (cert, _) = ca
            .sign_node_csr(&node.csr_der, "node-2", Duration::from_secs(60))
            .unwrap();
        assert_eq!(node_id_from_cert(&cert).unwrap(), "node-2");
    }

    #[test]
    fn only_the_coordinators_certificate_names_the_coordinator() {
        let ca = PoolCa::generate("t").unwrap();
        let coordinator = ca.issue_server_cert().unwrap();
        assert!(names_coordinator(&coordinator.chain[0]));
        // Whatever name a node's CSR asks for, the CA signs the node id, never this one.
        let node = NodeKey::generate(COORDINATOR_SERVER_NAME).unwrap();
        let (cert, _) = ca
            .sign_node_csr(&node.csr_der, "node-1", Duration::from_secs(60))
            .unwrap();
        assert!(!names_coordinator(&cert));
        assert!(ca
            .sign_node_csr(
                &node.csr_der,
                COORDINATOR_SERVER_NAME,
                Duration::from_secs(60)
            )
            .is_err());
        assert!(!names_coordinator(b"junk"));
    }

    #[test]
    fn garbage_csr_is_an_error() {
        let ca = PoolCa::generate("t").unwrap();
        assert!(matches!(
            ca.sign_node_csr(b"not a csr", "node-1", Duration::from_secs(60)),
            Err(IdentityError::BadCsr(_))
        ));
        assert!(node_id_from_cert(b"junk").is_err());
    }

    #[test]
    fn ca_pem_round_trips_to_the_same_der() {
        let ca = PoolCa::generate("t").unwrap();
        let pem = ca.cert_pem();
        let parsed = ::pem::parse(&pem).unwrap();
        assert_eq!(parsed.contents(), ca.cert_der().as_ref());
        assert!(pem.lines().all(|l| l.len() <= 64));
    }

    #[test]
    fn pin_is_stable_and_distinct_per_pool() {
        let a = PoolCa::generate("a").unwrap();
        let b = PoolCa::generate("b").unwrap();
        assert_eq!(a.pin(), a.pin());
        assert_ne!(a.pin(), b.pin());
        assert_eq!(a.pin().len(), 64);
    }

    #[test]
    fn saved_ca_key_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        let ca = PoolCa::generate("t").unwrap();
        ca.save(&dir).unwrap();
        let mode = std::fs::metadata(dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("skyward-id-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
