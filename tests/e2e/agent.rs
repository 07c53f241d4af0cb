//! The agent's own behaviour against an in-process coordinator: cancel, reconnect, lease,
//! shutdown. Real agent processes, real QUIC, real certificates.

use std::process::{Child, Command};
use std::time::Duration;

use skyward_common::identity::PoolCa;
use skyward_common::protocol::{TaskEvent, TaskOutcome};
use skyward_coordinator::{Coordinator, CoordinatorConfig, CoordinatorEvent};
use skyward_tests::{
    bin, command, connected_within, spawn_agent, task_output, wait_connected, Sandbox,
};

fn coordinator() -> Coordinator {
    skyward_common::install_crypto_provider();
    Coordinator::start(CoordinatorConfig {
        pool: "agent-test".into(),
        bind: ([127, 0, 0, 1], 0).into(),
        state_dir: None,
    })
    .unwrap()
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_whole_process_group() {
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    let node = wait_connected(&coordinator, "node-1").await;
    // A task whose children ignore SIGTERM: only the KILL after the grace period ends them.
    let mut task = coordinator
        .start_task(
            &node,
            command(&[
                "sh",
                "-c",
                "trap '' TERM; sleep 600 & sleep 600 & echo up; wait",
            ]),
        )
        .await
        .unwrap();
    loop {
        match task.output.next().await.unwrap() {
            Some(TaskEvent::Output { data, .. }) if data.as_ref() == b"up\n" => break,
            Some(_) => continue,
            None => panic!("task ended early"),
        }
    }
    assert!(
        sandbox
            .processes()
            .iter()
            .filter(|(_, cmd)| cmd.contains("sleep 600"))
            .count()
            >= 2
    );
    task.input.cancel().await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Some(TaskEvent::Finished(outcome)) = task.output.next().await.unwrap() {
                return outcome;
            }
        }
    })
    .await
    .expect("no outcome after cancel");
    assert_eq!(outcome, TaskOutcome::Cancelled);
    let sleepers: Vec<_> = sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("sleep"))
        .collect();
    assert!(sleepers.is_empty(), "survived cancel: {sleepers:?}");
    drop(task);
    assert_eq!(node.running(), 0);
    let _ = agent.kill();
    let _ = agent.wait();
}

/// `node_id`'s handle once it has disconnected and connected again (within 20 s).
async fn reconnected(
    events: &mut tokio::sync::broadcast::Receiver<CoordinatorEvent>,
    node_id: &str,
) -> Option<skyward_coordinator::NodeHandle> {
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut seen_disconnect = false;
        loop {
            match events.recv().await {
                Ok(CoordinatorEvent::NodeDisconnected { node_id: id, .. }) if id == node_id => {
                    seen_disconnect = true
                }
                Ok(CoordinatorEvent::NodeConnected(node))
                    if seen_disconnect && node.node_id == node_id =>
                {
                    return node
                }
                _ => {}
            }
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_re_established_with_the_same_certificate() {
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let mut events = coordinator.subscribe();
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    wait_connected(&coordinator, "node-1").await;
    assert!(coordinator.disconnect("node-1", "test"));
    // The token is spent: reconnecting must use the certificate in the work dir.
    let reconnected = reconnected(&mut events, "node-1")
        .await
        .expect("the agent did not reconnect");
    let mut task = coordinator
        .start_task(&reconnected, command(&["echo", "back"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"back\n");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// A fake `poweroff` (and the others an agent may try) in `sandbox`, logging its calls.
fn fake_power_commands(sandbox: &Sandbox) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = sandbox.path().join("power-bin");
    std::fs::create_dir_all(&dir).unwrap();
    for command in ["poweroff", "shutdown", "systemctl"] {
        let path = dir.join(command);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{command} $*\" >> '{}'\n",
                dir.join("calls").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn with_fake_power(command: &mut std::process::Command, fakes: &std::path::Path) {
    let path = std::env::var("PATH").unwrap_or_default();
    command.env("PATH", format!("{}:{path}", fakes.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gives_up_when_its_lease_runs_out() {
    let sandbox = Sandbox::new();
    let fakes = fake_power_commands(&sandbox);
    let coordinator = coordinator();
    let mut agent_cmd = skyward_tests::agent_command(&sandbox, &coordinator, "node-1", "2s");
    with_fake_power(&mut agent_cmd, &fakes);
    let mut agent = agent_cmd.spawn().unwrap();
    let node = wait_connected(&coordinator, "node-1").await;
    let mut task = coordinator
        .start_task(&node, skyward_tests::command(&["sleep", "600"]))
        .await
        .unwrap();
    assert!(matches!(
        task.output.next().await.unwrap(),
        Some(TaskEvent::Started { .. })
    ));
    coordinator.close().await;
    drop(coordinator);
    let status = wait_exit(&mut agent, Duration::from_secs(30));
    // A clean exit: a service manager must not start it again for another lease.
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(sandbox.path().join("node-1.log")).unwrap();
    assert!(log.contains("unreachable for 2s"), "{log}");
    // Its task went with it; by default (a local node) the machine stays on.
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
    assert!(
        !fakes.join("calls").exists(),
        "no poweroff without --on-pool-end poweroff"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_agent_powers_its_machine_off_when_the_lease_runs_out() {
    let sandbox = Sandbox::new();
    let fakes = fake_power_commands(&sandbox);
    let coordinator = coordinator();
    let mut agent_cmd = skyward_tests::agent_command(&sandbox, &coordinator, "node-1", "2s");
    agent_cmd.args(["--on-pool-end", "poweroff"]);
    with_fake_power(&mut agent_cmd, &fakes);
    let mut agent = agent_cmd.spawn().unwrap();
    wait_connected(&coordinator, "node-1").await;
    coordinator.close().await;
    drop(coordinator);
    let status = wait_exit(&mut agent, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let calls = std::fs::read_to_string(fakes.join("calls")).unwrap_or_default();
    assert_eq!(calls, "poweroff \n", "the first power command worked");
}

/// An agent that can never join (its token refused, no certificate to fall back on) ends as
/// at its lease on a cloud machine: it powers the machine off and exits cleanly, so that the
/// service manager does not restart it for ever (before: exit 1, restarted every 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_agent_that_can_never_join_powers_its_machine_off() {
    let sandbox = Sandbox::new();
    let fakes = fake_power_commands(&sandbox);
    let coordinator = coordinator();
    let mut agent_cmd = skyward_tests::agent_command(&sandbox, &coordinator, "node-1", "10m");
    agent_cmd
        .args(["--on-pool-end", "poweroff"])
        .env("SKYWARD_TOKEN", "a-token-this-pool-never-issued");
    with_fake_power(&mut agent_cmd, &fakes);
    let mut agent = agent_cmd.spawn().unwrap();
    let status = wait_exit(&mut agent, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(sandbox.path().join("node-1.log")).unwrap();
    assert!(log.contains("can never join its pool"), "{log}");
    assert_eq!(
        std::fs::read_to_string(fakes.join("calls")).unwrap_or_default(),
        "poweroff \n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_pools_deadline_an_agent_stops_even_with_its_coordinator_there() {
    let sandbox = Sandbox::new();
    let fakes = fake_power_commands(&sandbox);
    let coordinator = coordinator();
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3;
    let mut agent_cmd = skyward_tests::agent_command(&sandbox, &coordinator, "node-1", "10m");
    agent_cmd
        .args(["--on-pool-end", "poweroff", "--deadline"])
        .arg(deadline.to_string());
    with_fake_power(&mut agent_cmd, &fakes);
    let mut agent = agent_cmd.spawn().unwrap();
    let node = wait_connected(&coordinator, "node-1").await;
    let mut task = coordinator
        .start_task(&node, skyward_tests::command(&["sleep", "600"]))
        .await
        .unwrap();
    assert!(matches!(
        task.output.next().await.unwrap(),
        Some(TaskEvent::Started { .. })
    ));
    let status = wait_exit(&mut agent, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(sandbox.path().join("node-1.log")).unwrap();
    assert!(
        log.contains("the pool's deadline (its TTL) passed"),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(fakes.join("calls")).unwrap_or_default(),
        "poweroff \n"
    );
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_tasks_and_the_agent_exits_cleanly() {
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    let node = wait_connected(&coordinator, "node-1").await;
    let mut task = coordinator
        .start_task(&node, command(&["sleep", "600"]))
        .await
        .unwrap();
    assert!(matches!(
        task.output.next().await.unwrap(),
        Some(TaskEvent::Started { .. })
    ));
    coordinator.shutdown_nodes("test over").await;
    let status = wait_exit(&mut agent, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
}

#[test]
fn an_agent_without_a_token_or_certificate_says_what_to_pass() {
    let sandbox = Sandbox::new();
    let out = Command::new(bin("skyward-agent"))
        .args([
            "--coordinator",
            "127.0.0.1:9",
            "--ca-pin",
            &"ab".repeat(32),
            "--node-id",
            "node-1",
        ])
        .arg("--work-dir")
        .arg(sandbox.path().join("w"))
        .env_remove("SKYWARD_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pass --token or set SKYWARD_TOKEN"),
        "{stderr}"
    );
}

#[test]
fn a_malformed_pin_is_refused_at_start() {
    let sandbox = Sandbox::new();
    let out = Command::new(bin("skyward-agent"))
        .args([
            "--coordinator",
            "127.0.0.1:9",
            "--ca-pin",
            "xyz",
            "--node-id",
            "node-1",
            "--token",
            "t",
        ])
        .arg("--work-dir")
        .arg(sandbox.path().join("w"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("64 hex characters"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_report_health_with_their_load() {
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    let node = wait_connected(&coordinator, "node-1").await;
    // The first health report follows the hello at once; later ones every few seconds.
    let health = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(health) = node.health() {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no health report");
    assert!(health.memory_available_bytes > 0);
    assert!(health.load_avg_1m >= 0.0);
    assert_eq!(health.running_tasks, 0);
    assert!(node.inventory.memory_bytes >= health.memory_available_bytes);
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_booted_from_its_user_data_joins_and_runs_work() {
    use skyward_providers::NodeBootstrap;
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let node = NodeBootstrap {
        node_id: "node-3".into(),
        token: coordinator.issue_token("node-3"),
    };
    let user_data = coordinator.bootstrap().user_data("agent-test", &node);
    let booted = skyward_tests::node::BootedNode::boot(sandbox.path(), "vm-1", &user_data).unwrap();
    assert!(
        booted
            .boot_log
            .contains("agent for node-3 of pool agent-test started"),
        "{}",
        booted.boot_log
    );
    let handle = connected_within(&coordinator, "node-3", Duration::from_secs(20))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the booted node never connected; agent log:\n{}",
                booted.agent_log()
            )
        });
    let mut task = coordinator
        .start_task(&handle, command(&["pwd"]))
        .await
        .unwrap();
    let pwd = String::from_utf8(task_output(&mut task).await).unwrap();
    assert_eq!(
        pwd.trim(),
        booted.dir().join("skyward/work").display().to_string()
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(booted.dir().join("skyward/agent.env"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the env file holds the token");
    booted.destroy();
    assert!(sandbox
        .wait_for_no_processes(Duration::from_secs(5))
        .is_empty());
}

/// A node runs only the agent binary its user-data vouches for: the coordinator's digest of
/// the file it serves travels in the user-data, and a binary changed since (on the
/// coordinator's disk, or on the way) is refused before it runs (before: any binary the TLS
/// check let through ran as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_an_agent_binary_its_user_data_does_not_vouch_for() {
    use skyward_providers::NodeBootstrap;
    skyward_common::install_crypto_provider();
    let sandbox = Sandbox::new();
    let served = sandbox.path().join("skyward-agent-served");
    std::fs::copy(bin("skyward-agent"), &served).unwrap();
    let coordinator = Coordinator::start_advertised(
        CoordinatorConfig {
            pool: "tampered".into(),
            bind: ([127, 0, 0, 1], 0).into(),
            state_dir: None,
        },
        skyward_coordinator::Advertise {
            agent_binaries: vec![served.clone()],
            ..Default::default()
        },
    )
    .unwrap();
    let bootstrap = coordinator.bootstrap();
    let digest = skyward_coordinator::download::sha256_of(&served).unwrap();
    assert_eq!(
        bootstrap.agent_sha256,
        [(std::env::consts::ARCH.to_string(), digest.clone())]
    );
    // The binary changes after the coordinator vouched for it.
    let mut tampered = std::fs::read(&served).unwrap();
    tampered.extend_from_slice(b"tampered");
    std::fs::write(&served, tampered).unwrap();
    let node = NodeBootstrap {
        node_id: "node-1".into(),
        token: coordinator.issue_token("node-1"),
    };
    let boot = skyward_tests::node::BootedNode::boot_image(
        sandbox.path(),
        "tampered-vm",
        &bootstrap.user_data("tampered", &node),
        false,
    );
    let error = boot.err().expect("the tampered agent was run");
    assert!(
        error.contains(&format!("not {digest}: refusing to run it")),
        "{error}"
    );
    assert!(!sandbox
        .path()
        .join("tampered-vm/skyward/skyward-agent")
        .exists());
    assert!(
        connected_within(&coordinator, "node-1", Duration::from_secs(2))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_image_downloads_the_agent_from_the_coordinator() {
    use skyward_providers::NodeBootstrap;
    skyward_common::install_crypto_provider();
    let sandbox = Sandbox::new();
    let coordinator = Coordinator::start_advertised(
        CoordinatorConfig {
            pool: "download".into(),
            bind: ([127, 0, 0, 1], 0).into(),
            state_dir: None,
        },
        skyward_coordinator::Advertise {
            agent_binaries: vec![bin("skyward-agent")],
            ..Default::default()
        },
    )
    .unwrap();
    let bootstrap = coordinator.bootstrap();
    let url = bootstrap.agent_url.clone().expect("an agent URL");
    assert!(
        url.starts_with("https://127.0.0.1:") && url.ends_with("/agent/linux-{arch}"),
        "{url}"
    );
    let node = NodeBootstrap {
        node_id: "node-1".into(),
        token: coordinator.issue_token("node-1"),
    };
    let booted = skyward_tests::node::BootedNode::boot_image(
        sandbox.path(),
        "stock-vm",
        &bootstrap.user_data("download", &node),
        false,
    )
    .unwrap();
    let handle = connected_within(&coordinator, "node-1", Duration::from_secs(30))
        .await
        .unwrap_or_else(|| {
            panic!(
                "node never connected; boot log:\n{}\nagent log:\n{}",
                booted.boot_log,
                booted.agent_log()
            )
        });
    let downloaded = std::fs::read(booted.dir().join("skyward/skyward-agent")).unwrap();
    assert!(
        downloaded == std::fs::read(bin("skyward-agent")).unwrap(),
        "the downloaded agent differs"
    );
    let mut task = coordinator
        .start_task(&handle, command(&["echo", "fetched"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"fetched\n");

    // The download is only trusted through the pool CA: without it, curl refuses the server.
    let https = url.replace("{arch}", std::env::consts::ARCH);
    let untrusted = Command::new("curl")
        .args(["-fsS", "-o", "/dev/null", &https])
        .output()
        .unwrap();
    assert!(
        !untrusted.status.success(),
        "curl trusted the coordinator without the pool CA"
    );
    let wrong_arch = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(booted.dir().join("skyward/ca.pem"))
        .arg(url.replace("{arch}", "riscv64"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong_arch.stdout).contains("no agent for linux-riscv64"));
    booted.destroy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_in_its_own_network_namespace_fetches_the_agent_and_joins_over_the_link() {
    use skyward_providers::NodeBootstrap;
    skyward_common::install_crypto_provider();
    let sandbox = Sandbox::new();
    let net = skyward_tests::netns::TestNet::create().expect("a network namespace for the node");
    let coordinator = Coordinator::start_advertised(
        CoordinatorConfig {
            pool: "netns".into(),
            bind: (net.host_ip, 0).into(),
            state_dir: None,
        },
        skyward_coordinator::Advertise {
            agent_binaries: vec![bin("skyward-agent")],
            ..Default::default()
        },
    )
    .unwrap();
    let node = NodeBootstrap {
        node_id: "node-1".into(),
        token: coordinator.issue_token("node-1"),
    };
    let user_data = coordinator.bootstrap().user_data("netns", &node);
    assert!(user_data.contains(&format!("coordinator='{}:", net.host_ip)));
    let booted = skyward_tests::node::BootedNode::boot_on(
        sandbox.path(),
        "ns-vm",
        &user_data,
        false,
        Some(&net),
    )
    .unwrap();
    let handle = connected_within(&coordinator, "node-1", Duration::from_secs(30))
        .await
        .unwrap_or_else(|| {
            panic!(
                "node never connected; boot log:\n{}\nagent log:\n{}",
                booted.boot_log,
                booted.agent_log()
            )
        });
    assert_eq!(
        handle.address,
        std::net::IpAddr::V4(net.node_ip),
        "the node came over the link"
    );
    let reported: Vec<std::net::IpAddr> = handle
        .inventory
        .interfaces
        .iter()
        .flat_map(|i| i.addresses.clone())
        .collect();
    assert!(
        reported.contains(&std::net::IpAddr::V4(net.node_ip)),
        "inventory: {reported:?}"
    );
    let mut task = coordinator
        .start_task(&handle, command(&["sh", "-c", "echo in-namespace"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"in-namespace\n");
    booted.destroy();
    drop(booted);
    coordinator.close().await;
}

/// A listening agent (direction reversed) for `coordinator`'s pool, on a free loopback port.
fn spawn_listening_agent(
    sandbox: &Sandbox,
    coordinator: &Coordinator,
    node_id: &str,
    listen: std::net::SocketAddr,
    prefix: &[String],
) -> Child {
    let mut argv: Vec<String> = prefix.to_vec();
    argv.push(bin("skyward-agent").display().to_string());
    Command::new(&argv[0])
        .args(&argv[1..])
        .args([
            "--listen",
            &listen.to_string(),
            "--ca-pin",
            &coordinator.ca_pin(),
            "--node-id",
            node_id,
        ])
        .arg("--work-dir")
        .arg(sandbox.path().join(node_id))
        .current_dir(sandbox.path())
        .env("SKYWARD_TOKEN", coordinator.issue_token(node_id))
        .stderr(std::fs::File::create(sandbox.path().join(format!("{node_id}.log"))).unwrap())
        .spawn()
        .unwrap()
}

fn free_udp() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_agent_admits_only_its_pools_coordinator() {
    use skyward_common::identity::PoolCa;
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let listen = free_udp();
    let mut agent = spawn_listening_agent(&sandbox, &coordinator, "node-1", listen, &[]);
    // A coordinator of another pool (its CA unknown to the agent) tries first.
    let foreign = PoolCa::generate("other")
        .unwrap()
        .issue_server_cert()
        .unwrap();
    let endpoint = skyward_common::transport::endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
    let config = skyward_common::transport::coordinator_enroll_dial_config(&foreign).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match endpoint
                .connect_with(config.clone(), listen, "node-1")
                .unwrap()
                .await
            {
                // Refused in the handshake, or accepted by TLS 1.3's client side only to be
                // closed at once: either way no stream is ever served.
                Err(e) => return e.to_string(),
                Ok(conn) => {
                    if let Err(e) = conn.accept_bi().await {
                        return e.to_string();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the agent never answered");
    assert!(
        refused.contains("UnknownIssuer")
            || refused.contains("pinned pool CA")
            || refused.contains("certificate"),
        "{refused}"
    );
    // The pool's own coordinator then enrolls and serves it.
    coordinator.dial("node-1", listen);
    let node = wait_connected(&coordinator, "node-1").await;
    let mut task = coordinator
        .start_task(&node, command(&["echo", "dialed"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"dialed\n");
    // Dropped connections are redialed by the coordinator, with the certificate this time.
    assert!(coordinator.disconnect("node-1", "test"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let node = wait_connected(&coordinator, "node-1").await;
    let mut task = coordinator
        .start_task(&node, command(&["echo", "again"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"again\n");
    let log = std::fs::read_to_string(sandbox.path().join("node-1.log")).unwrap();
    assert!(log.contains("refused a connection"), "{log}");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Reverse mode: a node's certificate and key, in whoever's hands (its host, a task there),
/// chain to the pool's CA but cannot act as the coordinator toward another listening node:
/// node-2 does not hand its enrollment token to a client holding node-1's identity (seen
/// before the fix: the handshake passed and node-2 sent its enrollment request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_certificate_cannot_act_as_the_coordinator_toward_a_listening_node() {
    use rustls::pki_types::CertificateDer;
    use skyward_common::identity::CertifiedKey;
    use skyward_common::transport;
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let (listen_1, listen_2) = (free_udp(), free_udp());
    let mut agent_1 = spawn_listening_agent(&sandbox, &coordinator, "node-1", listen_1, &[]);
    let mut agent_2 = spawn_listening_agent(&sandbox, &coordinator, "node-2", listen_2, &[]);
    coordinator.dial("node-1", listen_1);
    wait_connected(&coordinator, "node-1").await;
    // node-1's identity, as its host finds it (beside its work dir).
    let dir = sandbox.path().join("node-1.identity");
    let stolen = CertifiedKey {
        chain: vec![
            CertificateDer::from(std::fs::read(dir.join("node.crt")).unwrap()),
            coordinator.ca().cert_der().clone(),
        ],
        key_pkcs8_der: std::fs::read(dir.join("node.key")).unwrap(),
    };
    let endpoint = transport::endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
    let impostor = transport::coordinator_enroll_dial_config(&stolen).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match endpoint
                .connect_with(impostor.clone(), listen_2, "node-2")
                .unwrap()
                .await
            {
                // Not listening yet.
                Err(quinn::ConnectionError::TimedOut) => continue,
                Err(e) => return e.to_string(),
                // TLS 1.3's client side may finish before the server refuses it: what matters
                // is that node-2 never opens its enrollment stream towards this client.
                Ok(conn) => {
                    match tokio::time::timeout(Duration::from_secs(5), conn.accept_bi()).await {
                        Ok(Ok(_)) => panic!("node-2 sent its enrollment to a node's certificate"),
                        Ok(Err(e)) => return e.to_string(),
                        Err(_) => panic!("node-2 kept a node's certificate's connection open"),
                    }
                }
            }
        }
    })
    .await
    .expect("node-2 never answered");
    assert!(refused.contains("certificate"), "{refused}");
    // The pool's coordinator then enrolls node-2, and both nodes run its tasks.
    coordinator.dial("node-2", listen_2);
    for node in ["node-1", "node-2"] {
        let handle = wait_connected(&coordinator, node).await;
        let mut task = coordinator
            .start_task(&handle, command(&["echo", node]))
            .await
            .unwrap();
        assert_eq!(task_output(&mut task).await, format!("{node}\n").as_bytes());
    }
    let log = std::fs::read_to_string(sandbox.path().join("node-2.log")).unwrap();
    assert!(log.contains("not the pool coordinator's"), "{log}");
    // A task's default working directory does not hold its node's key: it is kept beside it,
    // owner-only.
    let handle = wait_connected(&coordinator, "node-1").await;
    let mut task = coordinator
        .start_task(&handle, command(&["ls", "-a"]))
        .await
        .unwrap();
    let listed = String::from_utf8(task_output(&mut task).await).unwrap();
    assert!(
        !listed.contains("node.key") && !listed.contains("node.crt"),
        "{listed}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    for agent in [&mut agent_1, &mut agent_2] {
        let _ = agent.kill();
        let _ = agent.wait();
    }
}

/// A UDP relay in front of `target` that passes on only the first datagram of each client
/// (its handshake's first flight) and drops the rest: a dialer whose handshake stalls.
async fn stalling_relay(target: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::sync::Arc;
    use tokio::net::UdpSocket;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let address = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, client)) = front.recv_from(&mut buf).await {
            if !seen.insert(client) {
                continue;
            }
            let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let _ = upstream.send_to(&buf[..n], target).await;
            let back = front.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, _)) = upstream.recv_from(&mut buf).await {
                    let _ = back.send_to(&buf[..n], client).await;
                }
            });
        }
    });
    address
}

/// A listening agent runs handshakes side by side, each with a deadline: dialers that stall
/// mid-handshake do not keep the coordinator out (before: one handshake at a time, each
/// stalled one holding the agent until QUIC's 30 s idle timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_do_not_keep_the_coordinator_from_a_listening_agent() {
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let listen = free_udp();
    let mut agent = spawn_listening_agent(&sandbox, &coordinator, "node-1", listen, &[]);
    let relay = stalling_relay(listen).await;
    let log = sandbox.path().join("node-1.log");
    let listening = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(
            std::time::Instant::now() < listening,
            "the agent never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three dialers whose handshakes reach the agent and then go silent.
    let stranger = PoolCa::generate("stranger")
        .unwrap()
        .issue_server_cert()
        .unwrap();
    let config = skyward_common::transport::coordinator_enroll_dial_config(&stranger).unwrap();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let endpoint =
            skyward_common::transport::endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
        let connecting = endpoint
            .connect_with(config.clone(), relay, "node-1")
            .unwrap();
        stalled.push((endpoint, tokio::spawn(connecting)));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dialed = std::time::Instant::now();
    coordinator.dial("node-1", listen);
    let node = connected_within(&coordinator, "node-1", Duration::from_secs(20))
        .await
        .expect("the coordinator never got through");
    assert!(
        dialed.elapsed() < Duration::from_secs(4),
        "the coordinator waited {:?} behind stalled handshakes",
        dialed.elapsed()
    );
    let mut task = coordinator
        .start_task(&node, command(&["echo", "through"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"through\n");
    drop(stalled);
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reversed_across_a_network_namespace_the_coordinator_reaches_the_node() {
    let sandbox = Sandbox::new();
    let net = skyward_tests::netns::TestNet::create().expect("a network namespace for the node");
    skyward_common::install_crypto_provider();
    let coordinator = Coordinator::start(CoordinatorConfig {
        pool: "reverse-ns".into(),
        bind: (net.host_ip, 0).into(),
        state_dir: None,
    })
    .unwrap();
    let listen: std::net::SocketAddr = (net.node_ip, 7443).into();
    let mut agent =
        spawn_listening_agent(&sandbox, &coordinator, "node-1", listen, &net.exec_prefix());
    coordinator.dial("node-1", listen);
    let node = wait_connected(&coordinator, "node-1").await;
    assert_eq!(node.address, std::net::IpAddr::V4(net.node_ip));
    let mut task = coordinator
        .start_task(&node, command(&["echo", "through the link"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"through the link\n");
    let _ = agent.kill();
    let _ = agent.wait();
    coordinator.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_renewed_over_the_live_connection_before_it_expires() {
    use skyward_common::identity::{node_id_from_cert, not_after};
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    coordinator.set_node_cert_validity(Duration::from_secs(12));
    let mut events = coordinator.subscribe();
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    wait_connected(&coordinator, "node-1").await;
    let cert_path = sandbox.path().join("node-1.identity/node.crt");
    let first = std::fs::read(&cert_path).unwrap();
    let first_expiry = not_after(&first).unwrap();

    // Two thirds of the way, the agent asks for a new one on the connection it has.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let renewed = loop {
        let now = std::fs::read(&cert_path).unwrap_or_default();
        if !now.is_empty() && now != first {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(node_id_from_cert(&renewed).unwrap(), "node-1");
    assert!(not_after(&renewed).unwrap() > first_expiry);

    // Past the first certificate's end, a new connection gets in with the renewed one.
    let wait = first_expiry
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(1)).await;
    assert!(coordinator.disconnect("node-1", "test"));
    let reconnected = reconnected(&mut events, "node-1")
        .await
        .expect("the agent reconnected with its renewed certificate");
    let mut task = coordinator
        .start_task(&reconnected, command(&["echo", "renewed"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"renewed\n");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_outlives_a_lost_connection_and_its_output_arrives_once() {
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    let node = wait_connected(&coordinator, "node-1").await;
    let script = "i=1; while [ $i -le 30 ]; do echo line $i; i=$((i+1)); sleep 0.1; done";
    let mut task = coordinator
        .start_task(&node, command(&["sh", "-c", script]))
        .await
        .unwrap();
    let mut output = Vec::new();
    let mut blipped = false;
    let outcome = loop {
        match task
            .output
            .next()
            .await
            .expect("the task is resumed, not lost")
        {
            Some(TaskEvent::Output { data, .. }) => {
                output.extend_from_slice(&data);
                // A few lines in, the connection drops; the agent comes back on a new one.
                if !blipped && output.iter().filter(|&&b| b == b'\n').count() >= 5 {
                    assert!(coordinator.disconnect("node-1", "a network blip"));
                    blipped = true;
                }
            }
            Some(TaskEvent::Finished(outcome)) => break outcome,
            Some(_) => {}
            None => panic!("the task stream ended without an outcome"),
        }
    };
    assert!(blipped);
    assert_eq!(outcome, TaskOutcome::Exited { code: 0 });
    // Every line once, in order: none lost while disconnected, none repeated after.
    let expected: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8(output).unwrap(), expected);
    let log = std::fs::read_to_string(sandbox.path().join("node-1.log")).unwrap();
    assert!(log.contains("resuming a task on a new connection"), "{log}");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// A partition: the node's link goes down for 30 s while its task prints continuously. Once
/// the link is back, the output has arrived complete and in order (the same hash as what the
/// task printed) and the task's end exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_partition_loses_and_repeats_no_output() {
    use sha2::Digest;
    use skyward_providers::NodeBootstrap;
    skyward_common::install_crypto_provider();
    let sandbox = Sandbox::new();
    let net = std::sync::Arc::new(
        skyward_tests::netns::TestNet::create().expect("a network namespace for the node"),
    );
    let coordinator = Coordinator::start_advertised(
        CoordinatorConfig {
            pool: "partition".into(),
            bind: (net.host_ip, 0).into(),
            state_dir: None,
        },
        skyward_coordinator::Advertise {
            agent_binaries: vec![bin("skyward-agent")],
            ..Default::default()
        },
    )
    .unwrap();
    // The node is not given up while it is cut off.
    coordinator.set_node_timeout(Duration::from_secs(120));
    let node = NodeBootstrap {
        node_id: "node-1".into(),
        token: coordinator.issue_token("node-1"),
    };
    let user_data = coordinator.bootstrap().user_data("partition", &node);
    let booted = skyward_tests::node::BootedNode::boot_on(
        sandbox.path(),
        "ns-vm",
        &user_data,
        false,
        Some(&net),
    )
    .unwrap();
    let handle = connected_within(&coordinator, "node-1", Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("node never connected; agent log:\n{}", booted.agent_log()));
    // About 40 s of output, a line every 10 ms or so.
    let lines = 3000;
    let script =
        format!("i=1; while [ $i -le {lines} ]; do echo line $i; i=$((i+1)); sleep 0.01; done");
    let mut task = coordinator
        .start_task(&handle, command(&["sh", "-c", &script]))
        .await
        .unwrap();
    let mut output = Vec::new();
    let mut partition = None;
    let outcome = loop {
        match task
            .output
            .next()
            .await
            .expect("the task is resumed, not lost")
        {
            Some(TaskEvent::Output { data, .. }) => {
                output.extend_from_slice(&data);
                if partition.is_none() && output.iter().filter(|&&b| b == b'\n').count() >= 100 {
                    net.set_link(false).expect("link down");
                    let net = net.clone();
                    partition = Some(tokio::task::spawn_blocking(move || {
                        std::thread::sleep(Duration::from_secs(30));
                        net.set_link(true)
                    }));
                }
            }
            Some(TaskEvent::Finished(outcome)) => break outcome,
            Some(_) => {}
            None => panic!("the task stream ended without an outcome"),
        }
    };
    let partition = partition.expect("the link went down");
    partition.await.unwrap().expect("link up again");
    assert_eq!(outcome, TaskOutcome::Exited { code: 0 });
    assert!(task.output.next().await.unwrap().is_none(), "one end, once");
    let expected: String = (1..=lines).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&output)),
        hex::encode(sha2::Sha256::digest(expected.as_bytes())),
        "{} bytes arrived, {} printed",
        output.len(),
        expected.len()
    );
    booted.destroy();
    drop(booted);
    coordinator.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_attempt_of_a_task_never_runs_twice_on_a_node() {
    use skyward_common::protocol::TaskSpec;
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    let node = wait_connected(&coordinator, "node-1").await;
    let id = coordinator.next_task_id();
    let spec = |attempt| {
        TaskSpec::command(
            id,
            attempt,
            vec!["sh".into(), "-c".into(), "echo ran >> ran.log".into()],
            Vec::new(),
            None,
            false,
        )
    };
    let mut first = coordinator.start_task(&node, spec(0)).await.unwrap();
    assert_eq!(task_output(&mut first).await, b"");
    // A duplicated dispatch of the same attempt is refused; the next attempt runs.
    let mut again = coordinator.start_task(&node, spec(0)).await.unwrap();
    let refused = loop {
        match again.output.next().await.unwrap() {
            Some(TaskEvent::Finished(outcome)) => break outcome,
            Some(_) => {}
            None => panic!("no outcome"),
        }
    };
    assert!(
        matches!(&refused, TaskOutcome::FailedToStart { error } if error.contains("already ran on this node")),
        "{refused:?}"
    );
    let mut retry = coordinator.start_task(&node, spec(1)).await.unwrap();
    task_output(&mut retry).await;
    let ran = std::fs::read_to_string(sandbox.path().join("node-1/ran.log")).unwrap();
    assert_eq!(ran, "ran\nran\n", "attempts 0 and 1, once each");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_produced_while_disconnected_is_delivered_once_on_reconnect() {
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    let node = wait_connected(&coordinator, "node-1").await;
    let mut task = coordinator
        .start_task(
            &node,
            command(&["sh", "-c", "echo before; sleep 0.5; echo after; exit 3"]),
        )
        .await
        .unwrap();
    let mut output = Vec::new();
    while !output.ends_with(b"before\n") {
        match task.output.next().await.unwrap() {
            Some(TaskEvent::Output { data, .. }) => output.extend_from_slice(&data),
            Some(_) => {}
            None => panic!("ended early"),
        }
    }
    // The connection drops and the agent is frozen while its task ends: the rest of the
    // output and the exit code happen with nobody connected.
    assert!(coordinator.disconnect("node-1", "a network blip"));
    // SAFETY: signalling the agent this test started.
    unsafe {
        libc::kill(agent.id() as i32, libc::SIGSTOP);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    unsafe {
        libc::kill(agent.id() as i32, libc::SIGCONT);
    }
    let outcome = loop {
        match task.output.next().await.expect("resumed, not lost") {
            Some(TaskEvent::Output { data, .. }) => output.extend_from_slice(&data),
            Some(TaskEvent::Finished(outcome)) => break outcome,
            Some(_) => {}
            None => panic!("no outcome"),
        }
    };
    assert_eq!(outcome, TaskOutcome::Exited { code: 3 });
    assert_eq!(output, b"before\nafter\n");
    assert!(
        task.output.next().await.unwrap().is_none(),
        "delivered once"
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Many agents in one process (the benchmark's swarm): the real agent code, each with its own
/// token, key, certificate and connection, on one shared UDP socket. All run work, and all
/// hear the pool's shutdown and end at once, long before their lease: none keeps dialing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_agents_share_a_socket_and_all_hear_the_shutdown() {
    const AGENTS: usize = 20;
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let endpoint = skyward_common::transport::endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
    let registry = std::sync::Arc::new(skyward_agent::Registry::default());
    let mut agents = tokio::task::JoinSet::new();
    for i in 1..=AGENTS {
        let node_id = format!("node-{i}");
        let config = skyward_agent::AgentConfig {
            coordinator: Some(coordinator.local_addr().to_string()),
            listen: None,
            ca_pin: coordinator.ca_pin(),
            token: Some(coordinator.issue_token(&node_id)),
            work_dir: sandbox.path().join(&node_id),
            node_id,
            lease: Duration::from_secs(600),
            mig: None,
            deadline: None,
            on_pool_end: skyward_agent::OnPoolEnd::Exit,
            spot_watch: None,
        };
        let (endpoint, registry) = (endpoint.clone(), registry.clone());
        agents.spawn(async move { skyward_agent::run_on(config, registry, &endpoint).await });
    }
    for i in 1..=AGENTS {
        let node = wait_connected(&coordinator, &format!("node-{i}")).await;
        let mut task = coordinator
            .start_task(&node, command(&["true"]))
            .await
            .unwrap();
        task_output(&mut task).await;
        assert_eq!(node.address.to_string(), "127.0.0.1");
    }
    coordinator.shutdown_nodes("test over").await;
    coordinator.close().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut ended = 0;
        while let Some(result) = agents.join_next().await {
            result.unwrap().expect("an agent ended with an error");
            ended += 1;
        }
        ended
    })
    .await
    .expect("agents still running after the shutdown: some never heard it");
    assert_eq!(ended, AGENTS);
}

/// A typed task whose output is `len` bytes; it never blocks, so the agent runs it in place.
#[derive(serde::Serialize, serde::Deserialize)]
struct Fill {
    len: usize,
}

impl skyward_common::typed::Task for Fill {
    const NAME: &'static str = "fill";
    const VERSION: u32 = 1;
    const BLOCKING: bool = false;
    type Output = Vec<u8>;
    fn run(
        self,
        _: &skyward_common::typed::TaskContext,
    ) -> skyward_common::typed::TaskResult<Vec<u8>> {
        Ok((0..self.len).map(|i| (i % 251) as u8).collect())
    }
}

/// Set by [`Wait`] once it runs, and once it saw its cancellation.
static WAITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// How many [`Wait`]s are running now.
static WAITS_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SAW_CANCEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A typed task that waits `ms` and answers `true`, or `false` once cancelled: it blocks,
/// so the agent runs it on a blocking thread.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wait {
    ms: u64,
}

impl skyward_common::typed::Task for Wait {
    const NAME: &'static str = "wait";
    const VERSION: u32 = 1;
    type Output = bool;
    fn run(
        self,
        ctx: &skyward_common::typed::TaskContext,
    ) -> skyward_common::typed::TaskResult<bool> {
        use std::sync::atomic::Ordering;
        WAITING.store(true, Ordering::SeqCst);
        WAITS_RUNNING.fetch_add(1, Ordering::SeqCst);
        let _running = scopeguard(|| {
            WAITS_RUNNING.fetch_sub(1, Ordering::SeqCst);
        });
        let end = std::time::Instant::now() + Duration::from_millis(self.ms);
        while std::time::Instant::now() < end {
            if ctx.is_cancelled() {
                SAW_CANCEL.store(true, Ordering::SeqCst);
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(true)
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

fn typed_spec<T: skyward_common::typed::Task>(task: &T) -> skyward_common::protocol::TaskSpec {
    skyward_common::typed::spec(task).unwrap()
}

/// Every event of one task, start to end.
async fn all_events(
    coordinator: &Coordinator,
    node: &skyward_coordinator::NodeHandle,
    spec: skyward_common::protocol::TaskSpec,
) -> Vec<TaskEvent> {
    let mut task = coordinator.start_task(node, spec).await.unwrap();
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(10), task.output.next())
        .await
        .expect("the task's next event took over 10s")
        .unwrap()
    {
        events.push(event);
    }
    events
}

/// The lean task streams: a no-op answers `Finished` alone; a typed task (which runs in the
/// agent's own process: no `Started`) sends its output in pieces, in order, the last one
/// with `Finished`, whether it runs in place or on a blocking thread. Neither takes input:
/// the coordinator ends their streams with the task, which is no cancellation; dropping
/// the task's output is. Tasks that block hold the agent's task threads but not a task
/// queued behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_op_answers_finished_alone_and_a_typed_output_comes_in_pieces() {
    use skyward_common::limits::TYPED_RESULT_CHUNK;
    use skyward_common::protocol::TaskSpec;
    use std::sync::atomic::Ordering;
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let endpoint = skyward_common::transport::endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
    let mut registry = skyward_agent::Registry::default();
    registry.register::<Fill>();
    registry.register::<Wait>();
    let config = skyward_agent::AgentConfig {
        coordinator: Some(coordinator.local_addr().to_string()),
        listen: None,
        ca_pin: coordinator.ca_pin(),
        token: Some(coordinator.issue_token("node-1")),
        work_dir: sandbox.path().join("node-1"),
        node_id: "node-1".into(),
        lease: Duration::from_secs(600),
        mig: None,
        deadline: None,
        on_pool_end: skyward_agent::OnPoolEnd::Exit,
        spot_watch: None,
    };
    let agent = tokio::spawn(async move {
        skyward_agent::run_on(config, std::sync::Arc::new(registry), &endpoint).await
    });
    let node = wait_connected(&coordinator, "node-1").await;
    let finished = TaskEvent::Finished(TaskOutcome::Exited { code: 0 });

    assert_eq!(
        all_events(&coordinator, &node, TaskSpec::noop(0)).await,
        std::slice::from_ref(&finished)
    );

    for len in [0, 100, 2 * TYPED_RESULT_CHUNK + 7] {
        let mut events = all_events(&coordinator, &node, typed_spec(&Fill { len })).await;
        assert_eq!(events.pop(), Some(finished.clone()), "len {len}");
        let mut output = Vec::new();
        for event in &events {
            match event {
                TaskEvent::Result(piece) => output.extend_from_slice(piece),
                other => panic!("len {len}: {other:?} before Finished"),
            }
        }
        // The encoded output: its length, then the bytes.
        assert_eq!(
            events.len(),
            output.len().div_ceil(TYPED_RESULT_CHUNK),
            "len {len}"
        );
        let decoded = skyward_common::typed::decode_output::<Fill>(&output).unwrap();
        assert_eq!(
            decoded,
            (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>()
        );
    }

    // The stream's end, sent with the task, does not cancel it: it runs its 300 ms out.
    let events = all_events(&coordinator, &node, typed_spec(&Wait { ms: 300 })).await;
    let ran_out = skyward_common::typed::encode_output::<Wait>(&true).unwrap();
    assert_eq!(
        events,
        [TaskEvent::Result(ran_out.clone()), finished.clone()]
    );
    assert!(!SAW_CANCEL.load(Ordering::SeqCst));

    // Dropping the task (its output) cancels it.
    WAITING.store(false, Ordering::SeqCst);
    let task = coordinator
        .start_task(&node, typed_spec(&Wait { ms: 60_000 }))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !WAITING.load(Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "the task never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(task);
    while !SAW_CANCEL.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped task was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Tasks that block hold the agent's task threads (one per core), but not the tasks
    // queued behind them: a quick one still finishes long before the others would.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while WAITS_RUNNING.load(Ordering::SeqCst) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled task never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut blocking = Vec::new();
    for _ in 0..cores {
        let task = typed_spec(&Wait { ms: 60_000 });
        blocking.push(coordinator.start_task(&node, task).await.unwrap());
    }
    while WAITS_RUNNING.load(Ordering::SeqCst) < cores {
        assert!(
            std::time::Instant::now() < deadline,
            "the blocking tasks never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events = all_events(&coordinator, &node, typed_spec(&Wait { ms: 0 })).await;
    assert_eq!(events, [TaskEvent::Result(ran_out), finished]);
    drop(blocking);

    coordinator.shutdown_nodes("test over").await;
    coordinator.close().await;
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("the agent did not end after the shutdown")
        .unwrap()
        .unwrap();
}

/// A command's process dies with its agent, whatever thread forked it and however long ago:
/// here the agent is killed outright, long after its first task, and its task goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_process_dies_with_its_agent() {
    let sandbox = Sandbox::new();
    let coordinator = coordinator();
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "10m");
    let node = wait_connected(&coordinator, "node-1").await;
    let mut first = coordinator
        .start_task(&node, command(&["true"]))
        .await
        .unwrap();
    task_output(&mut first).await;
    let mut task = coordinator
        .start_task(&node, command(&["sleep", "600"]))
        .await
        .unwrap();
    let pid = loop {
        match tokio::time::timeout(Duration::from_secs(10), task.output.next())
            .await
            .expect("no Started within 10s")
            .unwrap()
        {
            Some(TaskEvent::Started { pid }) => break pid as i32,
            Some(_) => {}
            None => panic!("the task ended before it started"),
        }
    };
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    };
    assert!(alive(pid), "the task's process is running");
    agent.kill().unwrap();
    agent.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the task's process outlived its agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
