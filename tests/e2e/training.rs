//! A broadcast as a multi-node training job, on real separate hosts: agents in network
//! namespaces of their own that share a private network (a switch), each reaching the
//! coordinator over a link of its own. The job's tasks meet for real through the address
//! and port the preflight chose (rank 0 listens, the others connect and exchange ranks, as
//! torch's and gloo's rendezvous do), and a host cut off the private network is named by
//! the preflight in seconds. Needs root, as CI runs it.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use skyward_coordinator::pool::PoolProgress;
use skyward_coordinator::preflight::Preflight;
use skyward_coordinator::run::{run_job, Job, RunEvent};
use skyward_coordinator::{Coordinator, CoordinatorConfig, Pool};
use skyward_core::offer::{Market, Offer};
use skyward_core::{selection::Selection, spec::PoolSpec};
use skyward_providers::{
    Instance, LocalProvider, Provider, ProviderError, ProviderStatus, ProvisionRequest,
};
use skyward_tests::netns::TestCluster;
use skyward_tests::{bin, Sandbox};
use tokio::sync::mpsc;

/// Rank 0 listens on MASTER_PORT without SO_REUSEADDR (so the port must really be free);
/// the other ranks connect to MASTER_ADDR, retrying while rank 0 starts, send their rank and
/// read back every rank rank 0 saw. Each rank prints its environment and what it saw.
const RENDEZVOUS: &str = r#"
import os, socket, time
e = os.environ
keys = ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "NODE_RANK", "LOCAL_RANK",
        "NNODES", "NPROC_PER_NODE", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
        "SKYWARD_NODE_IPS"]
print("env " + " ".join(k + "=" + e.get(k, "-") for k in keys), flush=True)
rank, world = int(e["RANK"]), int(e["WORLD_SIZE"])
addr, port = e["MASTER_ADDR"], int(e["MASTER_PORT"])
deadline = time.monotonic() + 30
if rank == 0:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("", port))
    server.listen(world)
    server.settimeout(30)
    peers = []
    while len(peers) < world - 1:
        conn, _ = server.accept()
        conn.settimeout(10)
        peers.append((int(conn.makefile().readline()), conn))
    seen = ",".join(str(r) for r in sorted([0] + [r for r, _ in peers]))
    for _, conn in peers:
        conn.sendall((seen + "\n").encode())
        conn.close()
else:
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    conn.settimeout(30)
    conn.sendall(("%d\n" % rank).encode())
    seen = conn.makefile().readline().strip()
print("rank %d saw %s" % (rank, seen), flush=True)
"#;

/// Starts each node's agent on its own host of the cluster, as a cloud would start a machine.
struct NamespaceProvider {
    /// Each host's namespace, in node order.
    namespaces: Vec<String>,
    dir: std::path::PathBuf,
    local: LocalProvider,
    agents: Mutex<Vec<(String, Child)>>,
}

impl NamespaceProvider {
    fn new(cluster: &TestCluster, sandbox: &Sandbox) -> Arc<Self> {
        Arc::new(NamespaceProvider {
            namespaces: cluster
                .hosts
                .iter()
                .map(|h| h.namespace().to_string())
                .collect(),
            dir: sandbox.path().to_path_buf(),
            local: LocalProvider::new(Ok(bin("skyward-agent")), sandbox.path().join("local")),
            agents: Mutex::new(Vec::new()),
        })
    }

    fn logs(&self) -> String {
        let mut logs = String::new();
        for (node, _) in self.agents.lock().unwrap().iter() {
            let log = std::fs::read_to_string(self.dir.join(format!("{node}.log")));
            logs.push_str(&format!("--- {node}\n{}\n", log.unwrap_or_default()));
        }
        logs
    }

    fn stop_agents(&self) {
        for (_, agent) in self.agents.lock().unwrap().iter_mut() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

#[async_trait]
impl Provider for NamespaceProvider {
    fn name(&self) -> &str {
        "netns"
    }

    async fn offers(&self, spec: &PoolSpec) -> Result<Vec<Offer>, ProviderError> {
        self.local.offers(spec).await
    }

    async fn provision(
        &self,
        request: &ProvisionRequest,
        _offer: &Offer,
        _market: Market,
    ) -> Result<Vec<Instance>, ProviderError> {
        let mut instances = Vec::new();
        for (node, namespace) in request.nodes.iter().zip(&self.namespaces) {
            let log = std::fs::File::create(self.dir.join(format!("{}.log", node.node_id)))
                .expect("agent log");
            let agent = Command::new("ip")
                .args(["netns", "exec", namespace])
                .arg(bin("skyward-agent"))
                .args(["--coordinator", &request.bootstrap.coordinator])
                .args(["--ca-pin", &request.bootstrap.ca_pin])
                .args(["--node-id", &node.node_id, "--lease", "2m"])
                .arg("--work-dir")
                .arg(self.dir.join(&node.node_id))
                .env("SKYWARD_TOKEN", &node.token)
                .env("SKYWARD_LOG", "info")
                .stderr(log)
                .spawn()
                .expect("start an agent in its namespace");
            instances.push(Instance {
                node_id: node.node_id.clone(),
                provider_id: agent.id().to_string(),
                address: None,
            });
            self.agents
                .lock()
                .unwrap()
                .push((node.node_id.clone(), agent));
        }
        Ok(instances)
    }

    async fn failed_nodes(&self, _pool: &str) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for (node, agent) in self.agents.lock().unwrap().iter_mut() {
            if let Ok(Some(status)) = agent.try_wait() {
                failed.push((node.clone(), format!("its agent exited: {status}")));
            }
        }
        failed
    }

    async fn teardown(&self, _pool: &str) -> Result<(), ProviderError> {
        self.stop_agents();
        Ok(())
    }

    async fn terminate(&self, _pool: &str, node_id: &str) -> Result<(), ProviderError> {
        for (node, agent) in self.agents.lock().unwrap().iter_mut() {
            if node == node_id {
                let _ = agent.kill();
                let _ = agent.wait();
            }
        }
        Ok(())
    }

    async fn status(&self) -> ProviderStatus {
        self.local.status().await
    }
}

/// Runs `job` on `pool`; every task's report and its output, by task.
async fn run(pool: &mut Pool, job: Job) -> (Vec<bool>, BTreeMap<usize, String>) {
    let (events_tx, mut events) = mpsc::channel(64);
    let collecting = async {
        let mut outputs: BTreeMap<usize, String> = BTreeMap::new();
        while let Some(event) = events.recv().await {
            if let RunEvent::Output { task, data, .. } = event {
                outputs
                    .entry(task)
                    .or_default()
                    .push_str(&String::from_utf8_lossy(&data));
            }
        }
        outputs
    };
    let (reports, outputs) = tokio::join!(run_job(pool, job, events_tx), collecting);
    (reports.iter().map(|r| r.success()).collect(), outputs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broadcast_meets_across_hosts_and_the_preflight_names_a_cut_off_host() {
    const NODES: usize = 3;
    let sandbox = Sandbox::new();
    let cluster = TestCluster::create(NODES).expect("hosts in network namespaces");
    skyward_common::install_crypto_provider();
    let coordinator = Arc::new(
        Coordinator::start(CoordinatorConfig {
            pool: "training".into(),
            bind: (cluster.coordinator_ip(), 0).into(),
            state_dir: None,
        })
        .expect("a coordinator on the hosts' links"),
    );
    let provider = NamespaceProvider::new(&cluster, &sandbox);
    let providers = vec![provider.clone() as Arc<dyn Provider>];
    let mut pool = Pool::up(
        coordinator,
        &providers,
        &Selection::First,
        &PoolSpec::new(NODES),
        &mut |_: PoolProgress<'_>| {},
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", provider.logs()));
    for (index, node) in pool.nodes().iter().enumerate() {
        assert_eq!(
            node.address,
            std::net::IpAddr::V4(cluster.hosts[index].node_ip),
            "{} came over its own link",
            node.node_id
        );
    }

    // The preflight finds rank 0's private address (the address its connection came from
    // leads to no other host) and a free port; the ranks meet there for real.
    let argv = vec!["python3".to_string(), "-c".into(), RENDEZVOUS.into()];
    let tasks = Job::broadcast(&pool, argv.clone(), Vec::new(), Preflight::Master)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", provider.logs()));
    let job = Job {
        tasks,
        retries: 0,
        per_node: usize::MAX,
        timeout: Some(Duration::from_secs(60)),
        stdin: None,
    };
    let (succeeded, outputs) = run(&mut pool, job).await;
    assert_eq!(succeeded, vec![true; NODES], "{outputs:#?}");
    let ips: Vec<String> = (0..NODES)
        .map(|i| cluster.private_ip(i).to_string())
        .collect();
    let mut ports = Vec::new();
    for rank in 0..NODES {
        let out = &outputs[&rank];
        assert!(
            out.lines().any(|l| l == format!("rank {rank} saw 0,1,2")),
            "rank {rank}: {out}"
        );
        let env = out
            .lines()
            .find(|l| l.starts_with("env "))
            .expect("env line");
        for expected in [
            format!("MASTER_ADDR={}", ips[0]),
            "WORLD_SIZE=3".into(),
            format!("RANK={rank}"),
            format!("NODE_RANK={rank}"),
            "LOCAL_RANK=0".into(),
            "NNODES=3".into(),
            "NPROC_PER_NODE=1".into(),
            "NCCL_SOCKET_IFNAME=eth0".into(),
            "GLOO_SOCKET_IFNAME=eth0".into(),
            format!("SKYWARD_NODE_IPS={}", ips.join(",")),
        ] {
            assert!(
                env.split(' ').any(|kv| kv == expected),
                "rank {rank}: {expected} missing from {env}"
            );
        }
        ports.push(
            env.split(' ')
                .find_map(|kv| kv.strip_prefix("MASTER_PORT="))
                .expect("MASTER_PORT")
                .to_string(),
        );
    }
    assert!(
        ports.iter().all(|p| *p == ports[0]),
        "ports agree: {ports:?}"
    );

    // Every pair of nodes reaches each other: the mesh preflight passes.
    Job::broadcast(&pool, argv.clone(), Vec::new(), Preflight::Mesh)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", provider.logs()));
    // Then node-3 cannot reach node-2 (a firewall on node-3), while both still reach rank 0:
    // the rank-0 preflight cannot see it, the mesh one names the pair both ways.
    cluster.hosts[2]
        .exec(&["iptables", "-A", "OUTPUT", "-d", &ips[1], "-j", "DROP"])
        .expect("a firewall rule in node-3's namespace");
    Job::broadcast(&pool, argv.clone(), Vec::new(), Preflight::Master)
        .await
        .expect("every node still reaches rank 0");
    let message = Job::broadcast(&pool, argv.clone(), Vec::new(), Preflight::Mesh)
        .await
        .expect_err("the mesh preflight sees the blocked pair")
        .to_string();
    assert!(message.starts_with("preflight: "), "{message}");
    assert!(
        message.contains(&format!("node-3 cannot reach node-2 at {}:", ips[1]))
            && message.contains(&format!("node-2 cannot reach node-3 at {}:", ips[2])),
        "{message}"
    );
    assert!(!message.contains("node-1 cannot"), "{message}");
    assert!(!message.contains("reach node-1"), "{message}");

    // node-3 loses the private network: the preflight says so, naming it and the address,
    // within seconds rather than after a rendezvous timeout.
    cluster.cut(2).expect("cut node-3's link");
    let started = Instant::now();
    let error = Job::broadcast(&pool, argv, Vec::new(), Preflight::Master)
        .await
        .expect_err("the preflight fails with node-3 cut off");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "preflight: node-3 cannot reach node-1 at {}:",
            ips[0]
        )),
        "{message}"
    );
    assert!(!message.contains("node-2 cannot"), "{message}");
    assert!(
        message.contains("check that the nodes share a network"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );

    pool.down().await;
    provider.stop_agents();
    drop(cluster);
}

/// How long a local `skyward run` may take.
const CLI_LIMIT: Duration = Duration::from_secs(90);

#[test]
fn a_local_broadcast_meets_on_loopback_at_one_port() {
    let sandbox = Sandbox::new();
    let out = skyward_tests::run(
        sandbox.skyward().args([
            "run",
            "--nodes",
            "2",
            "--on",
            "all",
            "--",
            "sh",
            "-c",
            "echo $MASTER_ADDR $MASTER_PORT $WORLD_SIZE $RANK $NNODES $PET_NODE_RANK ${NCCL_SOCKET_IFNAME:-unset}",
        ]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let port = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("[node-1] 127.0.0.1 "))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{}", out.stdout))
        .to_string();
    for (rank, node) in ["node-1", "node-2"].iter().enumerate() {
        let line = format!("[{node}] 127.0.0.1 {port} 2 {rank} 2 {rank} unset");
        assert!(
            out.stdout.lines().any(|l| l == line),
            "{line:?} missing from {}",
            out.stdout
        );
    }
}

#[test]
fn a_port_taken_on_rank_0_fails_the_preflight_before_any_task_starts() {
    let sandbox = Sandbox::new();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let out = skyward_tests::run(
        sandbox.skyward().args([
            "run",
            "--nodes",
            "2",
            "--on",
            "all",
            "--env",
            &format!("MASTER_PORT={port}"),
            "--",
            "echo",
            "started",
        ]),
        CLI_LIMIT,
    );
    assert_eq!(out.code, Some(255), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "skyward: preflight: node-1 cannot listen on 127.0.0.1:{port}: address already in use"
        )),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("started"), "{}", out.stdout);
    drop(held);
}
