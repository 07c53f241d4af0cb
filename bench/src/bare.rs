//! The baseline: bare quinn with Skyward's own TLS and transport configuration, and nothing
//! else. Laid out like a pool: this process is the QUIC server (as the coordinator is) and
//! opens one bidirectional stream per request; each peer is a separate process (as an agent
//! is) that dialed in with a node certificate signed by the same CA and echoes every stream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rustls::pki_types::CertificateDer;
use skyward_common::identity::{write_private, CertifiedKey, NodeKey, PoolCa};
use skyward_common::limits::NODE_CERT_VALIDITY;
use skyward_common::protocol::{close_code, ALPN_NODE, COORDINATOR_SERVER_NAME};
use skyward_common::transport;
use tokio::process::Child;
use tokio::task::JoinSet;

use crate::stats::Latency;
use crate::Limits;

/// The request, and the echoed response.
const MESSAGE: [u8; 32] = *b"skyward-bench 32-byte request...";
/// Largest response accepted.
const MAX_RESPONSE: usize = 1024;
/// How long peers get to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer exits on its own after this long whatever happens.
const PEER_LIFETIME: Duration = Duration::from_secs(900);
/// How long a peer gets to exit once its connection is closed.
const PEER_EXIT_GRACE: Duration = Duration::from_secs(5);

/// The server end and its connected echo peers.
pub struct Baseline {
    endpoint: quinn::Endpoint,
    connections: Vec<quinn::Connection>,
    peers: Vec<Child>,
}

impl Baseline {
    /// Starts a server on loopback and `peers` echo peer processes (this same executable,
    /// run as `echo-peer`), each with its own CA-signed node certificate in `dir`.
    pub async fn start(exe: &Path, dir: &Path, peers: usize) -> Result<Baseline> {
        Self::start_as(exe, dir, peers, "echo-peer").await
    }

    /// [`Baseline::start`] with peers run as `role`: `echo-peer` or `sink-peer` (which takes
    /// a whole stream, then answers with the byte count; see [`Baseline::bulk`]).
    pub async fn start_as(exe: &Path, dir: &Path, peers: usize, role: &str) -> Result<Baseline> {
        let ca = PoolCa::generate("bench-bare")?;
        let server_identity = ca.issue_server_cert()?;
        let server = transport::server_config(ca.cert_der(), &server_identity)?;
        let endpoint = transport::endpoint(([127, 0, 0, 1], 0).into(), Some(server))?;
        let addr = endpoint.local_addr()?;
        let mut children = Vec::with_capacity(peers);
        for i in 1..=peers {
            let node_id = format!("node-{i}");
            let key = NodeKey::generate(&node_id)?;
            let (cert, _) = ca.sign_node_csr(&key.csr_der, &node_id, NODE_CERT_VALIDITY)?;
            let key_path = dir.join(format!("{node_id}.key"));
            let cert_path = dir.join(format!("{node_id}.der"));
            write_private(&key_path, &key.key.serialize_der())?;
            std::fs::write(&cert_path, &cert).with_context(|| cert_path.display().to_string())?;
            let args = [
                role.into(),
                addr.to_string().into(),
                ca.pin().into(),
                cert_path.into_os_string(),
                key_path.into_os_string(),
            ];
            children.push(spawn_peer(exe, &args)?);
        }
        let mut connections = Vec::with_capacity(peers);
        let accept = async {
            while connections.len() < peers {
                let incoming = endpoint.accept().await.context("server endpoint closed")?;
                connections.push(incoming.await?);
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(CONNECT_TIMEOUT, accept)
            .await
            .context("echo peers did not connect in time")??;
        Ok(Baseline {
            endpoint,
            connections,
            peers: children,
        })
    }

    /// Sequential round trips on the first connection.
    pub async fn round_trips(
        &self,
        warmup: usize,
        count: usize,
        limits: &Limits,
    ) -> Result<Latency> {
        let conn = self.connections.first().context("no peer")?;
        let work = async {
            for _ in 0..warmup {
                request(conn).await?;
            }
            let mut samples = Vec::with_capacity(count);
            for _ in 0..count {
                let start = Instant::now();
                request(conn).await?;
                samples.push(start.elapsed());
            }
            anyhow::Ok(samples)
        };
        let samples = tokio::time::timeout(limits.phase, work)
            .await
            .with_context(|| {
                format!("sequential requests took longer than {:?}", limits.phase)
            })??;
        Ok(Latency::from_samples(samples))
    }

    /// `total` requests with at most `in_flight` outstanding, round-robin over the first
    /// `peers` connections; returns requests per second.
    pub async fn throughput(
        &self,
        peers: usize,
        total: usize,
        in_flight: usize,
        limits: &Limits,
    ) -> Result<f64> {
        ensure!(
            peers >= 1 && peers <= self.connections.len(),
            "only {} peers",
            self.connections.len()
        );
        let connections: Vec<quinn::Connection> = self.connections[..peers].to_vec();
        let start = Instant::now();
        let work = async {
            let mut running = JoinSet::new();
            let (mut started, mut done) = (0usize, 0usize);
            while done < total {
                while started < total && running.len() < in_flight {
                    let conn = connections[started % connections.len()].clone();
                    running.spawn(async move { request(&conn).await });
                    started += 1;
                }
                match running.join_next().await {
                    Some(result) => {
                        result.context("request panicked")??;
                        done += 1;
                    }
                    None => bail!("ran out of requests after {done} of {total}"),
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(limits.phase, work)
            .await
            .with_context(|| {
                format!(
                    "{total} pipelined requests took longer than {:?}",
                    limits.phase
                )
            })??;
        Ok(total as f64 / start.elapsed().as_secs_f64())
    }

    /// Closes every connection and waits (bounded) for the peers to exit.
    pub async fn stop(mut self) {
        for conn in &self.connections {
            conn.close(close_code::NORMAL.into(), b"bench done");
        }
        self.endpoint
            .close(close_code::NORMAL.into(), b"bench done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        for child in &mut self.peers {
            if tokio::time::timeout(PEER_EXIT_GRACE, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    /// The contents of `file` (`bytes` long) over one new stream to the first peer, a sink;
    /// the time until the sink confirms it received every byte.
    pub async fn bulk(&self, file: &Path, bytes: u64, limits: &Limits) -> Result<Duration> {
        use tokio::io::AsyncReadExt as _;
        let conn = self.connections.first().context("no peer")?;
        let start = Instant::now();
        let work = async {
            let mut source = tokio::fs::File::open(file).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            // The same chunk size the workdir sync reads files in.
            let mut buf = vec![0u8; skyward_common::limits::SYNC_CHUNK];
            loop {
                let n = source.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                send.write_all(&buf[..n]).await?;
            }
            send.finish()?;
            let answer = recv.read_to_end(8).await?;
            let received = u64::from_le_bytes(
                answer
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("the sink's answer is not 8 bytes"))?,
            );
            ensure!(
                received == bytes,
                "the sink received {received} of {bytes} bytes"
            );
            anyhow::Ok(())
        };
        tokio::time::timeout(limits.phase, work)
            .await
            .with_context(|| format!("a bulk transfer took longer than {:?}", limits.phase))??;
        Ok(start.elapsed())
    }
}

/// A peer process: this executable run as `args[0]` with the rest; its errors reach the
/// bench's stderr, and it is killed if the bench lets go of it.
pub fn spawn_peer(exe: &Path, args: &[std::ffi::OsString]) -> Result<Child> {
    tokio::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} as {:?}", exe.display(), args.first()))
}

/// One request: a new stream, 32 bytes out, the echo back.
async fn request(conn: &quinn::Connection) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&MESSAGE).await?;
    send.finish()?;
    let response = recv.read_to_end(MAX_RESPONSE).await?;
    ensure!(
        response == MESSAGE,
        "echo peer answered {} bytes that differ",
        response.len()
    );
    Ok(())
}

/// The peer process: `echo-peer ADDR PIN CERT KEY` (or `sink-peer ...`). Dials like an
/// agent, then echoes (or sinks) every stream the server opens until the connection closes
/// (or [`PEER_LIFETIME`] passes).
pub fn peer_main(role: &str, args: &[String]) -> Result<()> {
    let [addr, pin, cert, key] = args else {
        bail!("usage: skyward-bench {role} ADDR PIN CERT KEY");
    };
    let sink = role == "sink-peer";
    let addr: SocketAddr = addr.parse().context("peer address")?;
    let identity = CertifiedKey {
        chain: vec![CertificateDer::from(
            std::fs::read(PathBuf::from(cert)).context("peer cert")?,
        )],
        key_pkcs8_der: std::fs::read(PathBuf::from(key)).context("peer key")?,
    };
    // The same runtime shape as skyward-agent.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let endpoint = transport::endpoint(([127, 0, 0, 1], 0).into(), None)?;
        let client = transport::client_config(pin, Some(&identity), ALPN_NODE)?;
        let serve = async {
            let conn = endpoint
                .connect_with(client, addr, COORDINATOR_SERVER_NAME)?
                .await
                .context("connecting to the bench server")?;
            while let Ok((send, recv)) = conn.accept_bi().await {
                if sink {
                    tokio::spawn(sink_stream(send, recv));
                } else {
                    tokio::spawn(echo(send, recv));
                }
            }
            anyhow::Ok(())
        };
        let result = tokio::time::timeout(PEER_LIFETIME, serve).await;
        endpoint.close(close_code::NORMAL.into(), b"peer exiting");
        let _ = tokio::time::timeout(Duration::from_millis(300), endpoint.wait_idle()).await;
        match result {
            Ok(r) => r,
            Err(_) => bail!("echo peer gave up after {PEER_LIFETIME:?}"),
        }
    })
}

async fn echo(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    if let Ok(data) = recv.read_to_end(MAX_RESPONSE).await {
        if send.write_all(&data).await.is_ok() {
            let _ = send.finish();
        }
    }
}

/// Reads a stream to its end, keeping nothing, and answers with the byte count (u64 LE).
async fn sink_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut received: u64 = 0;
    while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
        received += chunk.bytes.len() as u64;
    }
    if send.write_all(&received.to_le_bytes()).await.is_ok() {
        let _ = send.finish();
    }
}
