//! The coordinator's TCP port: the number of its QUIC port where that is free on TCP, so
//! that one port number opened in a firewall serves both. Every connection is TLS; its ALPN
//! says what it is for:
//! - [`ALPN_BULK`]: a node dialing in for a sync's contents, with its node certificate
//!   (checked against the pool CA) and the ticket its sync's `Start` offered
//!   ([`skyward_common::workdir::BulkOffer`]). The connection goes to that sync.
//! - anything else (HTTP/1.1, or no ALPN): the agent download ([`crate::download`]), where
//!   this coordinator serves agent binaries; no client certificate.
//!
//! Connections are bounded in number ([`MAX_TCP_CONNECTIONS`]) and in the time to their
//! handshake and first bytes; nothing a peer sends before that can hold a slot for long.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use skyward_common::identity::node_id_from_cert;
use skyward_common::limits::{BULK_CONNECT_TIMEOUT, MAX_TCP_CONNECTIONS};
use skyward_common::protocol::ALPN_BULK;
use skyward_common::workdir::BulkOffer;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};

use crate::download::AgentBinary;

/// A connection on the TCP port, its TLS handshake done.
pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Binds the TCP port: `bound`'s port number when it is free, else any.
pub fn bind(bound: SocketAddr) -> std::io::Result<TcpListener> {
    let bind = |addr: SocketAddr| {
        let socket = std::net::TcpListener::bind(addr)?;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket)
    };
    bind(bound).or_else(|_| bind(SocketAddr::new(bound.ip(), 0)))
}

/// Syncs waiting for their node's connection, by ticket.
#[derive(Default)]
pub struct BulkTickets {
    waiting: Mutex<HashMap<[u8; 16], Waiting>>,
}

/// Shows how many wait, never the tickets themselves.
impl std::fmt::Debug for BulkTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.waiting.lock().map(|w| w.len()).unwrap_or_default();
        f.debug_struct("BulkTickets")
            .field("waiting", &waiting)
            .finish()
    }
}

struct Waiting {
    node_id: String,
    deliver: oneshot::Sender<TlsStream>,
}

/// One sync's ticket: the offer to put in its `Start`, and where the connection arrives.
/// Dropping it withdraws the offer.
pub struct BulkTicket {
    offer: BulkOffer,
    arrival: oneshot::Receiver<TlsStream>,
    tickets: Arc<BulkTickets>,
}

impl BulkTickets {
    /// A fresh ticket, good for one connection from `node_id` to `port`.
    pub fn issue(self: &Arc<Self>, node_id: &str, port: u16) -> BulkTicket {
        let (deliver, arrival) = oneshot::channel();
        let mut waiting = self.waiting.lock().expect("tickets lock");
        let ticket = loop {
            let ticket: [u8; 16] = rand::random();
            if !waiting.contains_key(&ticket) {
                break ticket;
            }
        };
        waiting.insert(
            ticket,
            Waiting {
                node_id: node_id.to_string(),
                deliver,
            },
        );
        BulkTicket {
            offer: BulkOffer { port, ticket },
            arrival,
            tickets: self.clone(),
        }
    }

    /// Hands `stream` to the sync holding `ticket`, if `node_id` is the node it was issued
    /// for; a ticket is good once, whoever tried it.
    fn redeem(&self, ticket: &[u8; 16], node_id: &str, stream: TlsStream) -> Result<(), String> {
        let waiting = self
            .waiting
            .lock()
            .expect("tickets lock")
            .remove(ticket)
            .ok_or("an unknown or spent ticket")?;
        if waiting.node_id != node_id {
            return Err(format!(
                "a ticket issued to {}, presented by {node_id}",
                waiting.node_id
            ));
        }
        waiting
            .deliver
            .send(stream)
            .map_err(|_| "the sync had already given up".to_string())
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.lock().expect("tickets lock").len()
    }
}

impl BulkTicket {
    pub fn offer(&self) -> BulkOffer {
        self.offer.clone()
    }

    /// The node's connection, once it arrives (within [`BULK_CONNECT_TIMEOUT`]).
    pub async fn connection(mut self) -> Result<TlsStream, String> {
        match tokio::time::timeout(BULK_CONNECT_TIMEOUT, &mut self.arrival).await {
            Ok(Ok(stream)) => Ok(stream),
            _ => Err(format!(
                "the node said it dialed the TCP port {}, but no connection came with its ticket within {}s",
                self.offer.port,
                BULK_CONNECT_TIMEOUT.as_secs()
            )),
        }
    }
}

impl Drop for BulkTicket {
    fn drop(&mut self) {
        self.tickets
            .waiting
            .lock()
            .expect("tickets lock")
            .remove(&self.offer.ticket);
    }
}

/// Serves the TCP port until the task is dropped. `binaries`: the agent downloads, if this
/// coordinator serves them.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    binaries: Option<Arc<Vec<AgentBinary>>>,
    tickets: Arc<BulkTickets>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let (acceptor, binaries, tickets) = (acceptor.clone(), binaries.clone(), tickets.clone());
        tokio::spawn(async move {
            let result = async {
                let _ = tcp.set_nodelay(true);
                let stream = tokio::time::timeout(BULK_CONNECT_TIMEOUT, acceptor.accept(tcp))
                    .await
                    .map_err(|_| "no TLS handshake in time".to_string())?
                    .map_err(|e| format!("TLS: {e}"))?;
                if stream.get_ref().1.alpn_protocol() == Some(ALPN_BULK) {
                    // The sync holds the connection from here, not a slot.
                    drop(slot);
                    return take_bulk(stream, &tickets).await;
                }
                let result = match &binaries {
                    Some(binaries) => crate::download::handle(stream, binaries).await,
                    None => Err("no agent download served here".to_string()),
                };
                drop(slot);
                result
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(%peer, "TCP port: {e}");
            }
        });
    }
}

/// A node's connection for a sync's contents: its certificate names the node, its first 16
/// bytes the ticket.
async fn take_bulk(mut stream: TlsStream, tickets: &BulkTickets) -> Result<(), String> {
    let node_id = {
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or("a sync connection without a node certificate")?;
        node_id_from_cert(cert).map_err(|e| format!("a sync connection's certificate: {e}"))?
    };
    let mut ticket = [0u8; 16];
    tokio::time::timeout(BULK_CONNECT_TIMEOUT, stream.read_exact(&mut ticket))
        .await
        .map_err(|_| format!("{node_id} sent no ticket in time"))?
        .map_err(|e| format!("{node_id}'s ticket: {e}"))?;
    tickets
        .redeem(&ticket, &node_id, stream)
        .map_err(|why| format!("{node_id}'s sync connection: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_withdrawn_when_its_sync_drops_it() {
        let tickets = Arc::new(BulkTickets::default());
        let first = tickets.issue("node-1", 4000);
        let second = tickets.issue("node-2", 4000);
        assert_eq!(first.offer().port, 4000);
        assert_ne!(first.offer().ticket, second.offer().ticket);
        assert_eq!(tickets.waiting(), 2);
        drop(first);
        assert_eq!(tickets.waiting(), 1);
        drop(second);
        assert_eq!(tickets.waiting(), 0);
    }
}
