//! The preflight of a broadcast: before the job starts, rank 0's node listens on the port the
//! job will use (which proves it free there) and every other node connects to it through
//! each address of rank 0 that peers might use. The first address every node reaches
//! becomes `MASTER_ADDR`; each node's interface is the one its connection left from. A node
//! that reaches none is named, with the address, in one line, instead of the job's
//! rendezvous hanging for minutes. Every wait is bounded.
//!
//! [`Preflight::Mesh`] goes on to check every pair: each other node in turn listens on its
//! own address and every node connects to it, because NCCL's rings connect workers to each
//! other, not only to rank 0.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use skyward_common::limits::PROBE_CONNECT_TIMEOUT;
use skyward_common::protocol::{Probe, ProbeReport, Reach, TaskEvent, TaskOutcome, TaskSpec};
use tokio::task::JoinSet;

use crate::server::{Coordinator, NodeHandle, RemoteTask};
use skyward_core::training::{interface_of, master_candidates, nproc_per_node, Mesh, MeshNode};

/// The port torch uses by default: the one firewalls are most often opened for.
const CONVENTIONAL_PORT: u16 = 29500;
/// Ports tried on rank 0 before giving up on finding a free one.
const PORT_ATTEMPTS: usize = 5;
/// How long rank 0's agent has to say it listens (or cannot).
const LISTEN_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connecting node has to report, its own connect timeout included.
const REPORT_TIMEOUT: Duration = PROBE_CONNECT_TIMEOUT.saturating_add(Duration::from_secs(10));
/// The listener's own limit, should the coordinator never stop it.
const LISTENER_LIFETIME: Duration = Duration::from_secs(60);
/// How long rank 0's agent has to close the port once told to.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("preflight: {0}")]
pub struct PreflightError(pub String);

/// How much of the network a broadcast's preflight checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Preflight {
    /// Every node reaches rank 0 at `MASTER_ADDR:MASTER_PORT`.
    #[default]
    Master,
    /// That, and every node reaches every other node at its private address.
    Mesh,
}

impl std::str::FromStr for Preflight {
    type Err = String;
    fn from_str(text: &str) -> Result<Preflight, String> {
        match text {
            "master" => Ok(Preflight::Master),
            "mesh" => Ok(Preflight::Mesh),
            other => Err(format!(
                "--preflight {other:?}: use master (every node reaches rank 0) or mesh (every pair of nodes)"
            )),
        }
    }
}

/// Finds where the broadcast's processes meet on `nodes` (in rank order), checking that every
/// node reaches rank 0 there (and, with [`Preflight::Mesh`], every other node). `env` is the
/// user's: a `MASTER_ADDR` or `MASTER_PORT` in it is the only one tried.
pub async fn check(
    coordinator: &Arc<Coordinator>,
    nodes: &[NodeHandle],
    env: &[(String, String)],
    extent: Preflight,
) -> Result<Mesh, PreflightError> {
    let Some(master) = nodes.first() else {
        return Err(PreflightError("a broadcast needs at least one node".into()));
    };
    let wanted = |key: &str| env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v);
    let wanted_addr = wanted("MASTER_ADDR")
        .map(|a| {
            a.parse::<IpAddr>().map_err(|_| {
                PreflightError(format!(
                    "MASTER_ADDR={a:?} is not an IP address: give one, or leave it out and Skyward picks rank 0's"
                ))
            })
        })
        .transpose()?;
    let wanted_port = wanted("MASTER_PORT")
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| PreflightError(format!("MASTER_PORT={p:?} is not a port number")))
        })
        .transpose()?;
    // One node meets itself: loopback always works.
    let candidates = match (wanted_addr, nodes.len()) {
        (Some(address), _) => vec![address],
        (None, 1) => vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        (None, _) => master_candidates(master.address, &master.inventory),
    };
    let loopback = candidates.iter().all(IpAddr::is_loopback);
    let ports = match wanted_port {
        Some(port) => vec![port],
        None => port_choices(loopback),
    };
    let nonce = rand::random::<u64>();

    let (port, mut listener) = listen(coordinator, master, &candidates, &ports, nonce).await?;
    let targets: Vec<SocketAddr> = candidates
        .iter()
        .map(|&ip| SocketAddr::new(ip, port))
        .collect();
    let mut probes = JoinSet::new();
    for (rank, node) in nodes.iter().enumerate().skip(1) {
        let (coordinator, node, targets) = (coordinator.clone(), node.clone(), targets.clone());
        probes.spawn(async move { (rank, connect(&coordinator, &node, targets, nonce).await) });
    }
    let mut reports: Vec<(String, Result<Vec<Reach>, String>)> = nodes
        .iter()
        .skip(1)
        .map(|n| (n.node_id.clone(), Err("no report".to_string())))
        .collect();
    while let Some(Ok((rank, report))) = probes.join_next().await {
        reports[rank - 1].1 = report;
    }
    stop_listening(master, &mut listener).await;

    let (chosen, froms) = choose(&master.node_id, &targets, &reports).map_err(PreflightError)?;
    let mut mesh_nodes = vec![MeshNode {
        address: if nodes.len() == 1 && wanted_addr.is_none() {
            // Alone, it meets itself on loopback; its peers-to-be would use this.
            master_candidates(master.address, &master.inventory)[0]
        } else {
            chosen.ip()
        },
        interface: None,
        nproc: nproc_per_node(&master.inventory),
    }];
    mesh_nodes[0].interface = interface_of(&master.inventory, mesh_nodes[0].address);
    for (node, from) in nodes.iter().skip(1).zip(froms) {
        mesh_nodes.push(MeshNode {
            address: from.ip(),
            interface: interface_of(&node.inventory, from.ip()),
            nproc: nproc_per_node(&node.inventory),
        });
    }
    let mesh = Mesh {
        master: chosen,
        nodes: mesh_nodes,
    };
    if extent == Preflight::Mesh {
        check_pairs(coordinator, nodes, &mesh).await?;
    }
    Ok(mesh)
}

/// Each node but rank 0 (already checked) listens in turn on its private address, and every
/// other node connects there; every pair that fails is named.
async fn check_pairs(
    coordinator: &Arc<Coordinator>,
    nodes: &[NodeHandle],
    mesh: &Mesh,
) -> Result<(), PreflightError> {
    let mut problems = Vec::new();
    for (rank, node) in nodes.iter().enumerate().skip(1) {
        let address = mesh.nodes[rank].address;
        let nonce = rand::random::<u64>();
        // Any free port will do: nothing of the job's listens here.
        let ports = port_choices(true);
        let (port, mut listener) = listen(coordinator, node, &[address], &ports, nonce).await?;
        let target = SocketAddr::new(address, port);
        let mut probes = JoinSet::new();
        for (other_rank, other) in nodes.iter().enumerate().filter(|(r, _)| *r != rank) {
            let (coordinator, other) = (coordinator.clone(), other.clone());
            probes.spawn(async move {
                (
                    other_rank,
                    connect(&coordinator, &other, vec![target], nonce).await,
                )
            });
        }
        let mut reports = Vec::new();
        while let Some(Ok(report)) = probes.join_next().await {
            reports.push(report);
        }
        stop_listening(node, &mut listener).await;
        reports.sort_by_key(|(other_rank, _)| *other_rank);
        for (other_rank, report) in reports {
            let other = &nodes[other_rank].node_id;
            match report.as_ref().map(|r| r.first().map(|reach| &reach.from)) {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(why))) => problems.push(format!(
                    "{other} cannot reach {} at {target} ({why})",
                    node.node_id
                )),
                Ok(None) => problems.push(format!("{other} reported nothing for {target}")),
                Err(why) => problems.push(format!("{other} could not run its probe ({why})")),
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(PreflightError(format!(
        "{}; check that the nodes share a network and that traffic between them is open",
        problems.join("; ")
    )))
}

/// The conventional port first for machines of their own; random ones in a range below
/// Linux's ephemeral ports otherwise, and for a local pool, which shares this machine with
/// whatever else runs on it.
fn port_choices(loopback: bool) -> Vec<u16> {
    let random = (0..PORT_ATTEMPTS).map(|_| 20_000 + rand::random::<u16>() % 10_000);
    if loopback {
        random.collect()
    } else {
        std::iter::once(CONVENTIONAL_PORT)
            .chain(random)
            .take(PORT_ATTEMPTS)
            .collect()
    }
}

/// Where rank 0 listens: every address of the candidates' kind, as the job's rendezvous
/// will, or loopback alone for a local pool.
fn listen_address(candidates: &[IpAddr], port: u16) -> SocketAddr {
    let ip = match candidates {
        [one] if one.is_loopback() => *one,
        [first, ..] if first.is_ipv6() => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, port)
}

/// Starts rank 0's listener on the first free port of `ports`.
async fn listen(
    coordinator: &Coordinator,
    master: &NodeHandle,
    candidates: &[IpAddr],
    ports: &[u16],
    nonce: u64,
) -> Result<(u16, RemoteTask), PreflightError> {
    let mut refusals = Vec::new();
    for &port in ports {
        let probe = Probe {
            listen: Some(listen_address(candidates, port)),
            connect: Vec::new(),
            nonce,
        };
        let spec = TaskSpec::probe(probe, LISTENER_LIFETIME.as_millis() as u64);
        let mut task = coordinator.start_task(master, spec).await.map_err(|e| {
            PreflightError(format!("starting the probe on {}: {e}", master.node_id))
        })?;
        let answer = tokio::time::timeout(LISTEN_ANSWER_TIMEOUT, async {
            loop {
                match task.output.next().await {
                    Ok(Some(TaskEvent::Probe(ProbeReport::Listening { .. }))) => return Ok(()),
                    Ok(Some(TaskEvent::Finished(TaskOutcome::FailedToStart { error }))) => {
                        return Err(Some(error))
                    }
                    Ok(Some(TaskEvent::Finished(outcome))) => {
                        return Err(Some(format!("the probe ended: {outcome}")))
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return Err(None),
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(())) => return Ok((port, task)),
            Ok(Err(Some(error))) => refusals.push(error),
            Ok(Err(None)) => {
                return Err(PreflightError(format!(
                    "{} lost its probe while starting to listen on port {port}",
                    master.node_id
                )))
            }
            Err(_) => {
                return Err(PreflightError(format!(
                    "{} did not start listening on port {port} within {}s",
                    master.node_id,
                    LISTEN_ANSWER_TIMEOUT.as_secs()
                )))
            }
        }
    }
    // The agent says "cannot listen on ADDRESS: why".
    let last = refusals.last().map(String::as_str).unwrap_or("no answer");
    Err(PreflightError(match ports {
        [_] => format!("{} {last}", master.node_id),
        _ => format!(
            "{} found no free port (tried {}): {last}",
            master.node_id,
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }))
}

/// Has `node` connect to every target; its results, or why there are none.
async fn connect(
    coordinator: &Coordinator,
    node: &NodeHandle,
    targets: Vec<SocketAddr>,
    nonce: u64,
) -> Result<Vec<Reach>, String> {
    let probe = Probe {
        listen: None,
        connect: targets,
        nonce,
    };
    let spec = TaskSpec::probe(probe, REPORT_TIMEOUT.as_millis() as u64);
    let work = async {
        let mut task = coordinator
            .start_task(node, spec)
            .await
            .map_err(|e| e.to_string())?;
        let mut reached = None;
        loop {
            match task.output.next().await.map_err(|e| e.to_string())? {
                Some(TaskEvent::Probe(ProbeReport::Reached(results))) => reached = Some(results),
                Some(TaskEvent::Finished(outcome)) => {
                    return reached.ok_or_else(|| format!("its probe ended: {outcome}"))
                }
                Some(_) => {}
                None => return reached.ok_or_else(|| "its probe ended without a report".into()),
            }
        }
    };
    tokio::time::timeout(REPORT_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("no report within {}s", REPORT_TIMEOUT.as_secs())))
}

/// Tells rank 0 to close the port, and waits (bounded) until it has, so the job can bind it.
async fn stop_listening(master: &NodeHandle, listener: &mut RemoteTask) {
    let _ = listener.input.cancel().await;
    let stopped = tokio::time::timeout(STOP_TIMEOUT, async {
        while let Ok(Some(event)) = listener.output.next().await {
            if matches!(event, TaskEvent::Finished(_)) {
                return;
            }
        }
    })
    .await;
    if stopped.is_err() {
        tracing::warn!(node = %master.node_id, "the probe listener did not stop in time; the job may find its port taken");
    }
}

/// The first target every node reached, with where each node's connection left from; or
/// one line naming each node that did not reach the target most nodes reached.
fn choose(
    master: &str,
    targets: &[SocketAddr],
    reports: &[(String, Result<Vec<Reach>, String>)],
) -> Result<(SocketAddr, Vec<SocketAddr>), String> {
    let reached = |report: &Result<Vec<Reach>, String>, t: usize| -> Option<SocketAddr> {
        report
            .as_ref()
            .ok()
            .and_then(|r| r.get(t))
            .and_then(|reach| reach.from.as_ref().ok().copied())
    };
    let count = |t: usize| {
        reports
            .iter()
            .filter(|(_, r)| reached(r, t).is_some())
            .count()
    };
    if let Some(t) = (0..targets.len()).find(|&t| count(t) == reports.len()) {
        let froms = reports.iter().filter_map(|(_, r)| reached(r, t)).collect();
        return Ok((targets[t], froms));
    }
    // The address most nodes reached is the one the others are missing.
    let best = (0..targets.len())
        .rev()
        .max_by_key(|&t| count(t))
        .unwrap_or(0);
    let target = targets.get(best).copied();
    let mut problems = Vec::new();
    for (node, report) in reports {
        match (report, target) {
            (Err(why), _) => problems.push(format!("{node} could not run its probe ({why})")),
            (Ok(results), Some(target)) => {
                if let Some(Err(why)) = results.get(best).map(|r| &r.from) {
                    problems.push(format!("{node} cannot reach {master} at {target} ({why})"));
                }
            }
            (Ok(_), None) => {}
        }
    }
    let others: Vec<String> = targets
        .iter()
        .filter(|t| Some(**t) != target)
        .map(SocketAddr::to_string)
        .collect();
    let also = if others.is_empty() {
        String::new()
    } else {
        format!(" (also tried {})", others.join(", "))
    };
    Err(format!(
        "{}{also}; check that the nodes share a network and that the port is open between them",
        problems.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(target: &str, from: Result<&str, &str>) -> Reach {
        Reach {
            target: target.parse().unwrap(),
            from: from.map(|f| f.parse().unwrap()).map_err(str::to_string),
        }
    }

    fn targets() -> Vec<SocketAddr> {
        vec![
            "10.0.9.1:29500".parse().unwrap(),
            "10.0.0.1:29500".parse().unwrap(),
        ]
    }

    #[test]
    fn the_first_address_everyone_reached_wins() {
        let reports = vec![
            (
                "node-2".to_string(),
                Ok(vec![
                    reach("10.0.9.1:29500", Err("network unreachable")),
                    reach("10.0.0.1:29500", Ok("10.0.0.2:40000")),
                ]),
            ),
            (
                "node-3".to_string(),
                Ok(vec![
                    reach("10.0.9.1:29500", Err("network unreachable")),
                    reach("10.0.0.1:29500", Ok("10.0.0.3:40001")),
                ]),
            ),
        ];
        let (chosen, froms) = choose("node-1", &targets(), &reports).unwrap();
        assert_eq!(chosen, targets()[1]);
        assert_eq!(
            froms,
            vec![
                "10.0.0.2:40000".parse::<SocketAddr>().unwrap(),
                "10.0.0.3:40001".parse().unwrap()
            ]
        );
        // Nobody to connect (one node): the first address.
        assert_eq!(choose("node-1", &targets(), &[]).unwrap().0, targets()[0]);
    }

    #[test]
    fn a_node_that_reaches_nothing_is_named_with_the_address_the_others_reached() {
        let reports = vec![
            (
                "node-2".to_string(),
                Ok(vec![
                    reach("10.0.9.1:29500", Err("network unreachable")),
                    reach("10.0.0.1:29500", Ok("10.0.0.2:40000")),
                ]),
            ),
            (
                "node-3".to_string(),
                Ok(vec![
                    reach("10.0.9.1:29500", Err("network unreachable")),
                    reach("10.0.0.1:29500", Err("timed out after 5s")),
                ]),
            ),
            (
                "node-4".to_string(),
                Err("no report within 15s".to_string()),
            ),
        ];
        let message = choose("node-1", &targets(), &reports).unwrap_err();
        assert_eq!(
            message,
            "node-3 cannot reach node-1 at 10.0.0.1:29500 (timed out after 5s); \
             node-4 could not run its probe (no report within 15s) (also tried 10.0.9.1:29500); \
             check that the nodes share a network and that the port is open between them"
        );
        assert!(!message.contains("node-2"));
    }

    #[test]
    fn when_nobody_reaches_anything_the_first_address_is_named() {
        let reports = vec![(
            "node-2".to_string(),
            Ok(vec![
                reach("10.0.9.1:29500", Err("connection refused")),
                reach("10.0.0.1:29500", Err("no route to host")),
            ]),
        )];
        let message = choose("node-1", &targets(), &reports).unwrap_err();
        assert!(
            message.starts_with("node-2 cannot reach node-1 at 10.0.9.1:29500 (connection refused) (also tried 10.0.0.1:29500)"),
            "{message}"
        );
    }

    #[test]
    fn the_extent_is_master_or_mesh() {
        assert_eq!("master".parse(), Ok(Preflight::Master));
        assert_eq!("mesh".parse(), Ok(Preflight::Mesh));
        assert_eq!(Preflight::default(), Preflight::Master);
        let refused = "all".parse::<Preflight>().unwrap_err();
        assert!(
            refused.contains("master") && refused.contains("mesh"),
            "{refused}"
        );
    }

    #[test]
    fn ports_and_listen_addresses() {
        let cloud = port_choices(false);
        assert_eq!(cloud[0], CONVENTIONAL_PORT);
        assert_eq!(cloud.len(), PORT_ATTEMPTS);
        let local = port_choices(true);
        assert_eq!(local.len(), PORT_ATTEMPTS);
        assert!(local.iter().all(|p| (20_000..30_000).contains(p)));
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(listen_address(&[lo], 9).to_string(), "127.0.0.1:9");
        assert_eq!(listen_address(&[v4, lo], 9).to_string(), "0.0.0.0:9");
        assert_eq!(listen_address(&[v6], 9).to_string(), "[::]:9");
    }
}
