//! The environment of a broadcast as a distributed-training job: where rank 0 listens, the
//! address each node's peers use and the interface carrying it, and the variables that
//! `torchrun`, `torch.distributed`, JAX and DeepSpeed read. Pure: the network facts come
//! from the preflight (`skyward_coordinator::preflight`).
//!
//! Skyward starts one process per node. For a program started directly (`python train.py`,
//! DeepSpeed's `init_distributed`), that is the world: `WORLD_SIZE` is the number of nodes,
//! `RANK` the node's rank, `LOCAL_RANK` 0. `torchrun` reads its own settings from the `PET_`
//! variables (the node count, this node's rank, `NPROC_PER_NODE` processes per node, rank 0's
//! address and port), starts that many workers, and gives each its own `RANK`, `LOCAL_RANK`
//! and `WORLD_SIZE` (nodes x processes per node).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use skyward_common::inventory::Inventory;

/// Most addresses of rank 0 the preflight tries.
const MAX_CANDIDATES: usize = 8;

/// Where a broadcast's processes meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// Rank 0's address and the port it is free to listen on (`MASTER_ADDR`, `MASTER_PORT`).
    pub master: SocketAddr,
    /// Every node, in rank order.
    pub nodes: Vec<MeshNode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshNode {
    /// The address its peers reach it at.
    pub address: IpAddr,
    /// The interface carrying that address, when known.
    pub interface: Option<String>,
    /// Processes `torchrun` starts on it: one per GPU (or MIG device), at least one.
    pub nproc: u32,
}

/// Rank 0's addresses that its peers may use, most likely first, for the preflight to try.
///
/// A node that dialed in from loopback shares this machine with its peers (a local pool):
/// loopback it is. Otherwise the node's own IPv4 addresses, private ones (where clouds put
/// the network between a pool's machines) before public ones, and among each the address its
/// connection came from before the others; container bridges (`docker0`, `br-*`, `veth*`...)
/// only ever reach this one machine and are left out. A node that shows no such address is
/// tried at the address its connection came from.
pub fn master_candidates(connected_from: IpAddr, inventory: &Inventory) -> Vec<IpAddr> {
    if connected_from.is_loopback() {
        return vec![connected_from];
    }
    let own: Vec<Ipv4Addr> = inventory
        .interfaces
        .iter()
        .filter(|i| !is_container_bridge(&i.name))
        .flat_map(|i| i.addresses.iter())
        .filter_map(|a| match a {
            IpAddr::V4(v4) if usable(v4) => Some(*v4),
            _ => None,
        })
        .collect();
    let mut ordered: Vec<IpAddr> = Vec::new();
    for private in [true, false] {
        let group = own.iter().filter(|a| is_private(a) == private);
        let source_first = group
            .clone()
            .filter(|a| IpAddr::V4(**a) == connected_from)
            .chain(group.filter(|a| IpAddr::V4(**a) != connected_from));
        for address in source_first {
            if !ordered.contains(&IpAddr::V4(*address)) {
                ordered.push(IpAddr::V4(*address));
            }
        }
    }
    ordered.truncate(MAX_CANDIDATES);
    if ordered.is_empty() {
        ordered.push(connected_from);
    }
    ordered
}

fn usable(address: &Ipv4Addr) -> bool {
    !(address.is_loopback()
        || address.is_unspecified()
        || address.is_link_local()
        || address.is_multicast()
        || address.is_broadcast())
}

/// RFC 1918, and the shared space (100.64.0.0/10) that Tailscale and carrier NAT use.
fn is_private(address: &Ipv4Addr) -> bool {
    address.is_private() || (address.octets()[0] == 100 && (64..128).contains(&address.octets()[1]))
}

/// Interfaces of container and VM networks local to one machine.
fn is_container_bridge(name: &str) -> bool {
    ["docker", "br-", "veth", "virbr", "lxcbr", "cni", "podman"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// The interface that carries `address` on the node.
pub fn interface_of(inventory: &Inventory, address: IpAddr) -> Option<String> {
    inventory
        .interfaces
        .iter()
        .find(|i| i.addresses.contains(&address))
        .map(|i| i.name.clone())
}

/// One process per GPU slot (a whole GPU, or each MIG device of a split one), at least one.
pub fn nproc_per_node(inventory: &Inventory) -> u32 {
    (crate::slots::node_slots(inventory).len() as u32).max(1)
}

/// Every variable rank `rank` of `mesh` gets. The user's own `--env` goes after these, so
/// it wins.
pub fn training_env(mesh: &Mesh, rank: usize) -> Vec<(String, String)> {
    let nodes = mesh.nodes.len().to_string();
    let node = &mesh.nodes[rank];
    let (rank, nproc) = (rank.to_string(), node.nproc.to_string());
    let (addr, port) = (mesh.master.ip().to_string(), mesh.master.port().to_string());
    let ips: Vec<String> = mesh.nodes.iter().map(|n| n.address.to_string()).collect();
    let mut env: Vec<(&str, String)> = vec![
        ("MASTER_ADDR", addr.clone()),
        ("MASTER_PORT", port.clone()),
        ("WORLD_SIZE", nodes.clone()),
        ("RANK", rank.clone()),
        ("NODE_RANK", rank.clone()),
        ("LOCAL_RANK", "0".into()),
        ("NNODES", nodes.clone()),
        ("NPROC_PER_NODE", nproc.clone()),
        // torchrun's flags default to these (--nnodes, --node-rank, --nproc-per-node...).
        ("PET_NNODES", nodes.clone()),
        ("PET_NODE_RANK", rank.clone()),
        ("PET_NPROC_PER_NODE", nproc),
        ("PET_MASTER_ADDR", addr),
        ("PET_MASTER_PORT", port),
        // jax.distributed.initialize() with no arguments.
        ("JAX_COORDINATOR_ADDRESS", mesh.master.to_string()),
        ("JAX_NUM_PROCESSES", nodes.clone()),
        ("JAX_PROCESS_ID", rank.clone()),
        ("SKYWARD_NODE_RANK", rank),
        ("SKYWARD_NUM_NODES", nodes),
        ("SKYWARD_NODE_IPS", ips.join(",")),
    ];
    // On loopback (nodes sharing one machine) NCCL and Gloo find their way by themselves,
    // and a setting the provider gave the machine stays.
    if let Some(interface) = node
        .interface
        .as_ref()
        .filter(|_| !node.address.is_loopback())
    {
        env.push(("NCCL_SOCKET_IFNAME", interface.clone()));
        env.push(("GLOO_SOCKET_IFNAME", interface.clone()));
    }
    env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyward_common::inventory::{Gpu, MigDevice, NetworkInterface};

    fn inventory(interfaces: &[(&str, &[&str])]) -> Inventory {
        Inventory {
            interfaces: interfaces
                .iter()
                .map(|(name, addresses)| NetworkInterface {
                    name: name.to_string(),
                    addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_local_pool_meets_on_loopback() {
        let inv = inventory(&[("lo", &["127.0.0.1"]), ("eth0", &["192.168.1.5"])]);
        assert_eq!(
            master_candidates(ip("127.0.0.1"), &inv),
            vec![ip("127.0.0.1")]
        );
    }

    #[test]
    fn behind_nat_the_private_address_comes_first() {
        // An AWS node: its connection arrives from its public address, which no interface has.
        let inv = inventory(&[
            ("docker0", &["172.17.0.1"]),
            ("ens5", &["172.31.7.9", "fe80::1"]),
            ("lo", &["127.0.0.1", "::1"]),
        ]);
        assert_eq!(
            master_candidates(ip("54.1.2.3"), &inv),
            vec![ip("172.31.7.9")]
        );
    }

    #[test]
    fn the_connection_address_leads_its_group_and_private_precedes_public() {
        // A DigitalOcean droplet: public eth0 (its connection's source), private VPC eth1.
        let inv = inventory(&[
            ("eth0", &["203.0.113.7", "10.10.0.5"]),
            ("eth1", &["10.116.0.2"]),
            ("tailscale0", &["100.101.1.2"]),
        ]);
        assert_eq!(
            master_candidates(ip("203.0.113.7"), &inv),
            vec![
                ip("10.10.0.5"),
                ip("10.116.0.2"),
                ip("100.101.1.2"),
                ip("203.0.113.7")
            ]
        );
        assert_eq!(
            master_candidates(ip("10.116.0.2"), &inv)[0],
            ip("10.116.0.2")
        );
    }

    #[test]
    fn a_node_without_a_usable_address_is_tried_where_it_came_from() {
        let inv = inventory(&[("lo", &["127.0.0.1"]), ("eth0", &["fe80::1"])]);
        assert_eq!(
            master_candidates(ip("198.51.100.4"), &inv),
            vec![ip("198.51.100.4")]
        );
    }

    #[test]
    fn the_interface_is_the_one_carrying_the_address() {
        let inv = inventory(&[("eth0", &["10.0.0.2"]), ("eth1", &["10.1.0.2"])]);
        assert_eq!(interface_of(&inv, ip("10.1.0.2")).as_deref(), Some("eth1"));
        assert_eq!(interface_of(&inv, ip("10.9.9.9")), None);
    }

    #[test]
    fn processes_per_node_follow_the_gpus_and_their_mig_devices() {
        let mut inv = Inventory::default();
        assert_eq!(nproc_per_node(&inv), 1);
        inv.gpus = (0..4)
            .map(|index| Gpu {
                index,
                ..Default::default()
            })
            .collect();
        assert_eq!(nproc_per_node(&inv), 4);
        inv.gpus[0].mig_mode_current = Some(true);
        inv.gpus[0].mig_devices = vec![MigDevice::default(), MigDevice::default()];
        assert_eq!(nproc_per_node(&inv), 5);
    }

    fn mesh() -> Mesh {
        Mesh {
            master: "10.0.0.1:29500".parse().unwrap(),
            nodes: vec![
                MeshNode {
                    address: ip("10.0.0.1"),
                    interface: Some("eth0".into()),
                    nproc: 8,
                },
                MeshNode {
                    address: ip("10.0.0.2"),
                    interface: Some("ens5".into()),
                    nproc: 8,
                },
            ],
        }
    }

    fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn every_rank_is_told_where_to_meet_and_who_it_is() {
        let mesh = mesh();
        let env = training_env(&mesh, 1);
        for (key, value) in [
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("NODE_RANK", "1"),
            ("LOCAL_RANK", "0"),
            ("NNODES", "2"),
            ("NPROC_PER_NODE", "8"),
            ("PET_NNODES", "2"),
            ("PET_NODE_RANK", "1"),
            ("PET_NPROC_PER_NODE", "8"),
            ("PET_MASTER_ADDR", "10.0.0.1"),
            ("PET_MASTER_PORT", "29500"),
            ("JAX_COORDINATOR_ADDRESS", "10.0.0.1:29500"),
            ("JAX_NUM_PROCESSES", "2"),
            ("JAX_PROCESS_ID", "1"),
            ("SKYWARD_NODE_RANK", "1"),
            ("SKYWARD_NUM_NODES", "2"),
            ("SKYWARD_NODE_IPS", "10.0.0.1,10.0.0.2"),
            ("NCCL_SOCKET_IFNAME", "ens5"),
            ("GLOO_SOCKET_IFNAME", "ens5"),
        ] {
            assert_eq!(get(&env, key), Some(value), "{key}");
        }
        assert_eq!(
            get(&training_env(&mesh, 0), "NCCL_SOCKET_IFNAME"),
            Some("eth0")
        );
    }

    #[test]
    fn on_loopback_the_interface_is_left_to_nccl() {
        let mesh = Mesh {
            master: "127.0.0.1:21234".parse().unwrap(),
            nodes: vec![
                MeshNode {
                    address: ip("127.0.0.1"),
                    interface: Some("lo".into()),
                    nproc: 1,
                };
                2
            ],
        };
        let env = training_env(&mesh, 0);
        assert_eq!(get(&env, "NCCL_SOCKET_IFNAME"), None);
        assert_eq!(get(&env, "SKYWARD_NODE_IPS"), Some("127.0.0.1,127.0.0.1"));
    }
}
