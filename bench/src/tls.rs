//! The TCP+TLS bulk baseline: the bulk file over one TLS 1.3 connection on TCP, with the
//! same rustls provider (ring) and the same kind of pool identities as the bare quinn
//! baseline (a server certificate and a node certificate signed by one pool CA, both
//! checked). It answers the question the bulk gap raises: how much faster bytes move when
//! they are encrypted per 16 KiB TLS record on a TCP stream than per ~1,452-byte QUIC
//! packet, measured beside bare quinn on the same machine in the same run.
//!
//! Laid out as a side channel would be: this process listens (as the coordinator does) and
//! sends; the peer, a separate process with a 2-worker runtime like an agent, dials in, reads
//! a connection's bytes to their end and answers with their count.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use skyward_common::identity::{write_private, NodeKey, PoolCa};
use skyward_common::limits::{NODE_CERT_VALIDITY, SYNC_CHUNK};
use skyward_common::protocol::COORDINATOR_SERVER_NAME;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;

use crate::Limits;

/// The ALPN both ends insist on, so that nothing else can be mistaken for this channel.
const ALPN_BULK: &[u8] = b"skyward-bench-bulk/1";
/// The peer exits on its own after this long whatever happens.
const PEER_LIFETIME: Duration = Duration::from_secs(900);
/// How long the peer gets to dial in for each transfer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The peer's read buffer.
const READ_BUFFER: usize = 256 * 1024;

/// The listening end and its sink peer.
pub struct TlsBaseline {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    peer: Child,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: CertificateDer<'static>) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    Ok(Arc::new(roots))
}

impl TlsBaseline {
    /// Listens on loopback and starts the sink peer (this executable run as
    /// `tls-sink-peer`) with a node certificate of a fresh pool CA, its files in `dir`.
    pub async fn start(exe: &Path, dir: &Path) -> Result<TlsBaseline> {
        let ca = PoolCa::generate("bench-tls")?;
        let server_identity = ca.issue_server_cert()?;
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            roots(ca.cert_der().clone())?,
            provider.clone(),
        )
        .build()?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(server_identity.chain.clone(), server_identity.private_key())?;
        server.alpn_protocols = vec![ALPN_BULK.to_vec()];
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;

        let node_id = "node-tls";
        let key = NodeKey::generate(node_id)?;
        let (cert, _) = ca.sign_node_csr(&key.csr_der, node_id, NODE_CERT_VALIDITY)?;
        let (ca_path, cert_path, key_path) = (
            dir.join("tls-ca.der"),
            dir.join("tls-node.der"),
            dir.join("tls-node.key"),
        );
        std::fs::write(&ca_path, ca.cert_der()).context("writing the bench CA")?;
        std::fs::write(&cert_path, &cert).context("writing the node certificate")?;
        write_private(&key_path, &key.key.serialize_der())?;
        let args = [
            "tls-sink-peer".into(),
            listener.local_addr()?.to_string().into(),
            ca_path.into_os_string(),
            cert_path.into_os_string(),
            key_path.into_os_string(),
        ];
        let peer = crate::bare::spawn_peer(exe, &args)?;
        Ok(TlsBaseline {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            peer,
        })
    }

    /// The contents of `file` (`bytes` long) over the peer's next connection, once its
    /// handshake is done; the time until the peer confirms it received every byte.
    pub async fn bulk(&self, file: &Path, bytes: u64, limits: &Limits) -> Result<Duration> {
        let (tcp, _) = tokio::time::timeout(CONNECT_TIMEOUT, self.listener.accept())
            .await
            .context("the TLS sink peer did not dial in")??;
        tcp.set_nodelay(true)?;
        let mut tls = self.acceptor.accept(tcp).await.context("TLS handshake")?;
        ensure!(
            tls.get_ref().1.alpn_protocol() == Some(ALPN_BULK),
            "the peer did not speak {}",
            String::from_utf8_lossy(ALPN_BULK)
        );
        let start = Instant::now();
        let work = async {
            let mut source = tokio::fs::File::open(file).await?;
            // The same chunk size the workdir sync reads files in.
            let mut buf = vec![0u8; SYNC_CHUNK];
            loop {
                let n = source.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                tls.write_all(&buf[..n]).await?;
            }
            // close_notify and the TCP FIN: the peer's end of input.
            tls.shutdown().await?;
            let mut answer = [0u8; 8];
            tls.read_exact(&mut answer).await?;
            let received = u64::from_le_bytes(answer);
            ensure!(
                received == bytes,
                "the TLS sink received {received} of {bytes} bytes"
            );
            anyhow::Ok(())
        };
        tokio::time::timeout(limits.phase, work)
            .await
            .with_context(|| {
                format!("a TLS bulk transfer took longer than {:?}", limits.phase)
            })??;
        Ok(start.elapsed())
    }

    /// Stops listening; the peer's next dial fails and it exits.
    pub async fn stop(self) {
        let TlsBaseline {
            listener, mut peer, ..
        } = self;
        drop(listener);
        if tokio::time::timeout(Duration::from_secs(5), peer.wait())
            .await
            .is_err()
        {
            let _ = peer.kill().await;
        }
    }
}

/// The peer process: `tls-sink-peer ADDR CA CERT KEY`. Dials `ADDR` again and again, each
/// time reading the connection to its end and answering with the byte count (u64 LE), until
/// a dial fails (the bench stopped listening) or [`PEER_LIFETIME`] passes.
pub fn peer_main(args: &[String]) -> Result<()> {
    let [addr, ca, cert, key] = args else {
        bail!("usage: skyward-bench tls-sink-peer ADDR CA CERT KEY");
    };
    let read = |path: &String| std::fs::read(PathBuf::from(path)).with_context(|| path.clone());
    let ca = CertificateDer::from(read(ca)?);
    let chain = vec![CertificateDer::from(read(cert)?)];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(read(key)?));
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![ALPN_BULK.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let server_name = ServerName::try_from(COORDINATOR_SERVER_NAME)?;
    // The same runtime shape as skyward-agent.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let serve = async {
            let mut buf = vec![0u8; READ_BUFFER];
            // A refused dial is the bench saying it is done.
            while let Ok(tcp) = TcpStream::connect(addr.as_str()).await {
                tcp.set_nodelay(true)?;
                // So is a connection it had queued but never took up.
                let Ok(mut tls) = connector.connect(server_name.clone(), tcp).await else {
                    break;
                };
                let mut received: u64 = 0;
                loop {
                    let n = tls.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    received += n as u64;
                }
                tls.write_all(&received.to_le_bytes()).await?;
                tls.shutdown().await?;
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(PEER_LIFETIME, serve).await {
            Ok(result) => result,
            Err(_) => bail!("the TLS sink peer gave up after {PEER_LIFETIME:?}"),
        }
    })
}
