//! QUIC and TLS configuration for both ends, and the UDP sockets they run on.
//!
//! The coordinator accepts two ALPNs: [`ALPN_NODE`] (client certificate required, checked
//! after the handshake because rustls cannot make it depend on the ALPN) and [`ALPN_ENROLL`]
//! (no client certificate). Agents trust the coordinator through the pool CA they were given
//! the pin of, whatever address they reach it at.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::identity::{fingerprint, CertifiedKey};
use crate::limits;
use crate::protocol::{ALPN_BULK, ALPN_ENROLL, ALPN_NODE};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto configuration: {0}")]
    NoInitialCipherSuite(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("bad CA pin {0:?}: expected 64 hex characters (the SHA-256 of the pool CA)")]
    BadPin(String),
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// UDP socket buffer size: the kernel default (~208 KiB) drops packets under load and stalls
/// handshakes; the kernel caps this at net.core.{r,w}mem_max unless raised there.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Coordinator side: quinn server config for a pool.
pub fn server_config(
    ca: &CertificateDer<'static>,
    identity: &CertifiedKey,
) -> Result<quinn::ServerConfig, TransportError> {
    let provider = provider();
    let client_verifier = pool_client_verifier(ca, &provider)?;
    quic_server(
        provider,
        client_verifier,
        identity,
        &[ALPN_NODE, ALPN_ENROLL],
        Side::Coordinator,
    )
}

/// The coordinator's check of client certificates: one that is shown must chain to the pool
/// CA `ca`; none at all passes the handshake, for the protocols that take none, and the
/// others refuse it after the handshake, by ALPN.
fn pool_client_verifier(
    ca: &CertificateDer<'static>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TransportError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()?,
    )
}

/// A quinn server config for `side`: TLS 1.3, `verifier` for clients.
fn quic_server(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    identity: &CertifiedKey,
    alpns: &[&[u8]],
    side: Side,
) -> Result<quinn::ServerConfig, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.private_key())?;
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport(side)));
    Ok(config)
}

/// A quinn client config for `side` and `tls`, speaking `alpn`.
fn quic_client(
    mut tls: rustls::ClientConfig,
    alpn: &[u8],
    side: Side,
) -> Result<quinn::ClientConfig, TransportError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let transport = transport(side);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Coordinator side: TLS over TCP on its TCP port. The agent download (HTTP/1.1) takes no
/// client certificate: the binary is public, the channel only has to be the coordinator's.
/// A sync's contents ([`ALPN_BULK`]) need a node certificate of the pool CA, checked after
/// the handshake as for [`ALPN_NODE`]; one that is shown is always checked here.
pub fn tcp_server_config(
    ca: &CertificateDer<'static>,
    identity: &CertifiedKey,
) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let provider = provider();
    let client_verifier = pool_client_verifier(ca, &provider)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(identity.chain.clone(), identity.private_key())?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec(), ALPN_BULK.to_vec()];
    Ok(Arc::new(tls))
}

/// Agent side: TLS over TCP to the coordinator's TCP port for a sync's contents: the
/// coordinator checked against the pinned pool CA, as on QUIC; the node's certificate shown.
pub fn bulk_client_config(
    ca_pin: &str,
    identity: &CertifiedKey,
) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let mut tls = pinned_client(ca_pin, Some(identity))?;
    tls.alpn_protocols = vec![ALPN_BULK.to_vec()];
    Ok(Arc::new(tls))
}

/// Agent side: config for an enrollment connection (no client certificate).
pub fn enroll_client_config(ca_pin: &str) -> Result<quinn::ClientConfig, TransportError> {
    client_config(ca_pin, None, ALPN_ENROLL)
}

/// Agent side: config for an enrolled node's mTLS connection.
pub fn node_client_config(
    ca_pin: &str,
    identity: &CertifiedKey,
) -> Result<quinn::ClientConfig, TransportError> {
    client_config(ca_pin, Some(identity), ALPN_NODE)
}

/// A client config with full control over what is presented; the security tests use it to
/// attempt what a real agent never would (no certificate, a foreign CA, another ALPN).
pub fn client_config(
    ca_pin: &str,
    identity: Option<&CertifiedKey>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TransportError> {
    let tls = pinned_client(ca_pin, identity)?;
    // The agent is the client here: the coordinator opens task streams towards it.
    quic_client(tls, alpn, Side::Agent)
}

/// TLS 1.3 to the coordinator, checked against the pinned pool CA, showing `identity`.
fn pinned_client(
    ca_pin: &str,
    identity: Option<&CertifiedKey>,
) -> Result<rustls::ClientConfig, TransportError> {
    let provider = provider();
    let pin = parse_pin(ca_pin)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier { pin, provider }));
    Ok(match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.private_key())?,
        None => builder.with_no_client_auth(),
    })
}

/// Which end of a pool connection a config is for, whichever of them dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Coordinator,
    Agent,
}

/// This process's QUIC idle timeout, when set (the agent's `--idle-timeout`).
static IDLE_TIMEOUT: OnceLock<Duration> = OnceLock::new();

/// Sets this process's QUIC idle timeout (once, at start; later calls are ignored). The
/// shorter of the two sides' applies to a connection, so an agent's setting is its
/// connection's; keep-alives go at a third of it at most.
pub fn set_idle_timeout(timeout: Duration) {
    let _ = IDLE_TIMEOUT.set(timeout);
}

/// One side's transport settings.
fn transport(side: Side) -> quinn::TransportConfig {
    let agent_side = side == Side::Agent;
    // The coordinator opens the task streams; the agent only its control stream (plus slack).
    let peer_streams = if agent_side {
        limits::MAX_TASK_STREAMS_PER_AGENT
    } else {
        limits::MAX_AGENT_OPENED_STREAMS
    };
    let mut transport = quinn::TransportConfig::default();
    // Only the agent pings. Its health reports already show the coordinator it is there,
    // and its own packets keep a NAT mapping open. Pings from the coordinator as well would
    // double an idle pool's packets: 4,000 a second for 10,000 agents.
    let idle_timeout = *IDLE_TIMEOUT.get().unwrap_or(&limits::IDLE_TIMEOUT);
    transport.keep_alive_interval(agent_side.then_some(limits::KEEP_ALIVE.min(idle_timeout / 3)));
    transport.max_idle_timeout(Some(
        idle_timeout
            .try_into()
            .expect("idle timeout fits a QUIC varint"),
    ));
    transport.max_concurrent_bidi_streams(peer_streams.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // A stream towards the agent may carry a workdir sync: a window large enough for a long
    // link's bandwidth-delay product.
    transport.stream_receive_window(if agent_side {
        limits::MAX_TRANSFER_STREAM_BUFFER.into()
    } else {
        limits::MAX_STREAM_BUFFER.into()
    });
    transport.receive_window(limits::MAX_CONNECTION_BUFFER.into());
    transport.send_window(limits::MAX_SEND_BUFFER.into());
    transport
}

fn parse_pin(pin: &str) -> Result<[u8; 32], TransportError> {
    let bytes = hex::decode(pin.trim()).map_err(|_| TransportError::BadPin(pin.to_string()))?;
    bytes
        .try_into()
        .map_err(|_| TransportError::BadPin(pin.to_string()))
}

/// Agent side, direction reversed: the agent listens and only a client holding the
/// coordinator's certificate of the pinned pool CA gets through the handshake (a node's
/// certificate of the same pool does not: see [`crate::identity::names_coordinator`]).
/// `alpn` is [`ALPN_ENROLL`] with a throwaway identity, or [`ALPN_NODE`] with the node's.
pub fn agent_listener_config(
    ca_pin: &str,
    identity: &CertifiedKey,
    alpn: &[u8],
) -> Result<quinn::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaClientVerifier {
        pin: parse_pin(ca_pin)?,
        provider: provider.clone(),
    });
    // The coordinator, the client here, opens the task streams.
    quic_server(provider, verifier, identity, &[alpn], Side::Agent)
}

/// Coordinator side, direction reversed: dialing an agent that has enrolled. The agent must
/// show a certificate of this pool's CA naming `node_id` (the server name used to connect).
pub fn coordinator_dial_config(
    ca: &CertificateDer<'static>,
    identity: &CertifiedKey,
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain.clone(), identity.private_key())?;
    quic_client(tls, ALPN_NODE, Side::Coordinator)
}

/// Coordinator side, direction reversed: dialing an agent that has not enrolled yet. Its
/// certificate is a throwaway and cannot be checked; nothing secret flows this way (the
/// agent sends its token only after checking the coordinator's certificate against the pin).
pub fn coordinator_enroll_dial_config(
    identity: &CertifiedKey,
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = provider();
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(UncheckedEnrollmentServer { provider }))
        .with_client_auth_cert(identity.chain.clone(), identity.private_key())?;
    quic_client(tls, ALPN_ENROLL, Side::Coordinator)
}

/// Binds a UDP socket with enlarged buffers and wraps it in a quinn endpoint.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransportError> {
    let bind = |source| TransportError::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind)?;
    // Best effort: a smaller buffer than asked for still works, only slower under load.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into()).map_err(bind)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind)
}

/// The signature checks each verifier here makes the same way: with its own crypto provider.
macro_rules! provider_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Accepts a client whose chain holds the pinned CA, whose leaf that CA signed, and whose
/// leaf is the coordinator's (not a node's of the same pool): the coordinator, when it dials
/// a listening agent.
#[derive(Debug)]
struct PinnedCaClientVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl rustls::server::danger::ClientCertVerifier for PinnedCaClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let pin = hex::encode(self.pin);
        let ca = intermediates
            .iter()
            .find(|cert| fingerprint(cert) == pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the client's chain does not contain the pinned pool CA".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = verifier.verify_client_cert(end_entity, &[], now)?;
        // A node's certificate chains to the same CA: only the coordinator's gets through.
        if !crate::identity::names_coordinator(end_entity) {
            return Err(rustls::Error::General(
                "the client's certificate is not the pool coordinator's".into(),
            ));
        }
        Ok(verified)
    }

    provider_signature_checks!();
}

/// The one server whose certificate goes unchecked: a listening agent before enrollment,
/// which has only a throwaway certificate. Signatures are still checked, so the handshake is
/// sound; what it proves is only that the peer holds the throwaway key.
#[derive(Debug)]
struct UncheckedEnrollmentServer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for UncheckedEnrollmentServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    provider_signature_checks!();
}

/// Trusts a server whose chain contains the CA with the pinned SHA-256 and whose leaf that CA
/// signed for the expected name. The pin is all an agent needs to carry in its user-data.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pin = hex::encode(self.pin);
        let ca = intermediates
            .iter()
            .find(|cert| fingerprint(cert) == pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the coordinator's certificate chain does not contain the pinned pool CA"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    provider_signature_checks!();
}

/// Reads `recv`'s end if it has already arrived, without waiting. A stream read to its end
/// is dropped quietly; one that is not gets stopped, and its connection woken to send that.
/// A chunk of data still unread, if any, is given up.
pub fn take_end_if_here(recv: &mut quinn::RecvStream) {
    use std::future::Future;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = std::pin::pin!(recv.read_chunk(usize::MAX, true)).poll(&mut cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_end_may_keep_more_in_flight_than_quinns_default() {
        for side in [Side::Coordinator, Side::Agent] {
            let shown = format!("{:?}", transport(side));
            let expected = format!("send_window: {}", limits::MAX_SEND_BUFFER);
            assert!(shown.contains(&expected), "{side:?}: {shown}");
        }
    }
}
