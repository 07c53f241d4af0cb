//! Preflight probes: before a distributed job starts, rank 0's node listens on the port the
//! job will use and every other node connects to it through the addresses the job will use,
//! so that a network that would leave the job's rendezvous hanging for minutes is found in
//! seconds, and named.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use skyward_common::frame::{read_frame, write_frame};
use skyward_common::limits::{
    MAX_PROBE_TARGETS, MAX_TASK_FRAME, PROBE_CONNECT_TIMEOUT, PROBE_LISTEN_MAX,
};
use skyward_common::protocol::{Probe, ProbeReport, Reach, TaskEvent, TaskOutcome, TaskRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// How long the listener waits for a connector to hang up after greeting it.
const HANGUP_WAIT: Duration = Duration::from_secs(2);

/// What the listener says first: a fixed tag and the probe's nonce.
fn greeting(nonce: u64) -> [u8; 16] {
    let mut greeting = [0u8; 16];
    greeting[..8].copy_from_slice(b"skyprobe");
    greeting[8..].copy_from_slice(&nonce.to_be_bytes());
    greeting
}

/// Runs a probe task; returns its outcome, or `None` when nobody is left to tell.
pub async fn run(
    probe: &Probe,
    timeout_ms: Option<u64>,
    send: &mut SendStream,
    recv: RecvStream,
) -> Option<TaskOutcome> {
    if probe.connect.len() > MAX_PROBE_TARGETS {
        return Some(TaskOutcome::FailedToStart {
            error: format!(
                "a probe of {} addresses; the limit is {MAX_PROBE_TARGETS}",
                probe.connect.len()
            ),
        });
    }
    let mut greeter = None;
    if let Some(address) = probe.listen {
        let listener = match listen(address) {
            Ok(listener) => listener,
            Err(e) => {
                return Some(TaskOutcome::FailedToStart {
                    error: format!("cannot listen on {address}: {}", describe(&e)),
                })
            }
        };
        let address = listener.local_addr().unwrap_or(address);
        tracing::debug!(%address, "probe listening");
        greeter = Some(Greeter::start(listener, probe.nonce));
        let listening = TaskEvent::Probe(ProbeReport::Listening { address });
        write_frame(send, &listening).await.ok()?;
    }
    if !probe.connect.is_empty() {
        let reached = reach_all(&probe.connect, probe.nonce).await;
        let report = TaskEvent::Probe(ProbeReport::Reached(reached));
        write_frame(send, &report).await.ok()?;
    }
    let Some(greeter) = greeter else {
        return Some(TaskOutcome::Exited { code: 0 });
    };
    let limit = timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(PROBE_LISTEN_MAX)
        .min(PROBE_LISTEN_MAX);
    let outcome = match tokio::time::timeout(limit, stop_requested(recv)).await {
        Ok(()) => TaskOutcome::Exited { code: 0 },
        Err(_) => TaskOutcome::TimedOut,
    };
    // The port is free again before the outcome says so: the job may bind it at once.
    greeter.stop().await;
    Some(outcome)
}

/// Binds without `SO_REUSEADDR`, as the job's own program may: a port this can bind, it can.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(address)?;
    socket.listen(64)
}

/// The listener's side: greets every connection until stopped.
struct Greeter {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Greeter {
    fn start(listener: TcpListener, nonce: u64) -> Greeter {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        Greeter {
            stop: Some(stop),
            task: tokio::spawn(greet(listener, nonce, stopped)),
        }
    }

    /// Returns once the listening socket and every connection it accepted are closed.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn greet(listener: TcpListener, nonce: u64, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was accepted.
                tracing::debug!("probe accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        connections.spawn(async move {
            // Closed with a reset, never through TIME_WAIT: an accepted connection, like the
            // listener, holds the port against a job that binds it without SO_REUSEADDR.
            let _ = stream.set_zero_linger();
            if stream.write_all(&greeting(nonce)).await.is_err() {
                return;
            }
            // The connector hangs up once it has read the greeting.
            let mut sink = [0u8; 64];
            let _ = tokio::time::timeout(HANGUP_WAIT, async {
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

/// Waits for the coordinator to stop the listener: a cancel, or the end of the stream.
async fn stop_requested(mut recv: RecvStream) {
    loop {
        match read_frame::<_, TaskRequest>(&mut recv, MAX_TASK_FRAME).await {
            Ok(Some(TaskRequest::Cancel)) | Ok(None) | Err(_) => return,
            Ok(Some(_)) => {}
        }
    }
}

/// Connects to every target at once.
async fn reach_all(targets: &[SocketAddr], nonce: u64) -> Vec<Reach> {
    let mut attempts = JoinSet::new();
    for (index, &target) in targets.iter().enumerate() {
        attempts.spawn(async move { (index, reach(target, nonce).await) });
    }
    let mut results: Vec<Option<Reach>> = vec![None; targets.len()];
    while let Some(Ok((index, reach))) = attempts.join_next().await {
        results[index] = Some(reach);
    }
    results
        .into_iter()
        .zip(targets)
        .map(|(reach, &target)| {
            reach.unwrap_or_else(|| Reach {
                target,
                from: Err("the attempt failed".into()),
            })
        })
        .collect()
}

async fn reach(target: SocketAddr, nonce: u64) -> Reach {
    let attempt = async {
        let mut stream = TcpStream::connect(target).await.map_err(|e| describe(&e))?;
        let from = stream.local_addr().map_err(|e| describe(&e))?;
        let mut answer = [0u8; 16];
        stream.read_exact(&mut answer).await.map_err(|e| {
            format!(
                "connected, but the probe did not answer ({}): is another program on the port?",
                describe(&e)
            )
        })?;
        if answer != greeting(nonce) {
            return Err("connected, but another program answered on the port".to_string());
        }
        // Hanging up first leaves TIME_WAIT here, on an ephemeral port, not on the listener's.
        Ok(from)
    };
    let from = match tokio::time::timeout(PROBE_CONNECT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "timed out after {}s",
            PROBE_CONNECT_TIMEOUT.as_secs()
        )),
    };
    Reach { target, from }
}

/// An I/O error in the words people search for ("connection refused"), without the errno.
fn describe(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::HostUnreachable => "no route to host".into(),
        ErrorKind::NetworkUnreachable => "network unreachable".into(),
        ErrorKind::AddrInUse => "address already in use".into(),
        ErrorKind::AddrNotAvailable => "address not available on this node".into(),
        ErrorKind::ConnectionReset => "connection reset".into(),
        ErrorKind::UnexpectedEof => "connection closed".into(),
        ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_greeting_carries_the_nonce() {
        assert_eq!(&greeting(1)[..8], b"skyprobe");
        assert_ne!(greeting(1), greeting(2));
    }

    #[tokio::test]
    async fn a_listener_greets_and_a_connector_reports_where_it_came_from() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = listener.local_addr().unwrap();
        let greeter = Greeter::start(listener, 7);
        let reached = reach_all(&[address], 7).await;
        assert_eq!(reached[0].target, address);
        let from = reached[0].from.clone().unwrap();
        assert!(from.ip().is_loopback(), "{from}");
        // A probe with another nonce is someone else's: not reached.
        let wrong = reach_all(&[address], 8).await;
        assert!(
            wrong[0]
                .from
                .as_ref()
                .unwrap_err()
                .contains("another program"),
            "{wrong:?}"
        );
        greeter.stop().await;
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_refused_and_a_held_one_cannot_be_bound() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = held.local_addr().unwrap();
        let error = listen(address).expect_err("the port is held");
        assert_eq!(describe(&error), "address already in use");
        drop(held);
        let refused = reach_all(&[address], 1).await;
        assert_eq!(refused[0].from, Err("connection refused".to_string()));
    }

    #[tokio::test]
    async fn the_port_is_free_again_once_the_listener_is_stopped() {
        // Below Linux's ephemeral range, as the preflight's ports are: a port the system hands
        // out (port 0) may be given at once to another test's outgoing connection.
        let listener = (0..100)
            .find_map(|_| {
                let port = 20_000 + rand::random::<u16>() % 10_000;
                listen(SocketAddr::from(([127, 0, 0, 1], port))).ok()
            })
            .expect("a free port below the ephemeral range");
        let address = listener.local_addr().unwrap();
        let greeter = Greeter::start(listener, 3);
        for reach in reach_all(&[address, address, address], 3).await {
            reach.from.unwrap();
        }
        greeter.stop().await;
        // Bound again at once without SO_REUSEADDR, as a job's program might.
        listen(address).unwrap_or_else(|e| {
            // Which sockets hold it, for whoever reads the failure.
            let port = format!(":{}", address.port());
            let holders: Vec<String> = std::process::Command::new("ss")
                .arg("-tan")
                .output()
                .map(|out| {
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| l.contains(&port))
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            panic!("{address} still held: {e}: {holders:#?}")
        });
    }
}
