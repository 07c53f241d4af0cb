//! Shared harness for Skyward's end-to-end tests: finds the real binaries, gives each test a
//! sandbox (its own SKYWARD_HOME), and finds the processes a test left behind.

pub mod imds;
pub mod moto;
pub mod netns;
pub mod node;
pub mod openapi;
pub mod standins;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A built binary of the workspace (`skyward`, `skyward-agent`), from the same target dir
/// as this test. `scripts/test.sh` builds them before the tests run.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<name>; a binary of the
    // workspace (the benchmark's) runs from target/<profile>/ itself.
    let dir = exe.parent().expect("target dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target dir")
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, which scripts/test.sh does)",
        path.display()
    );
    path
}

/// Environment variables through which a cloud provider finds credentials or endpoints.
pub const CLOUD_ENV_PREFIXES: &[&str] = &["AWS_", "DIGITALOCEAN_", "VERDA_", "VAST_"];

/// A directory of its own for one test; every process still running under it is killed and
/// the directory removed on drop.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// `skyward pool status POOL --json` in this sandbox, parsed; fails the test with what
    /// it printed when it does not answer.
    pub fn pool_status(&self, pool: &str) -> serde_json::Value {
        let out = run(
            self.skyward().args(["pool", "status", pool, "--json"]),
            Duration::from_secs(60),
        );
        assert_eq!(out.code, Some(0), "{out:?}");
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
    }

    pub fn new() -> Self {
        Sandbox {
            dir: tempfile::Builder::new()
                .prefix("skyward-test-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `skyward` with this sandbox as its home and stdin closed.
    pub fn skyward(&self) -> Command {
        let mut cmd = Command::new(bin("skyward"));
        // Never let a test reach a real cloud with a developer's own credentials.
        for (key, _) in std::env::vars() {
            if CLOUD_ENV_PREFIXES.iter().any(|p| key.starts_with(p)) {
                cmd.env_remove(key);
            }
        }
        // Nor through credential files under the developer's home, nor through the EC2
        // metadata service, which AWS's default credential chain would otherwise probe
        // (a link-local address, not loopback) when it finds no credentials.
        cmd.env("HOME", self.path().join("user-home"))
            .env("XDG_CONFIG_HOME", self.path().join("user-home/.config"))
            .env("AWS_EC2_METADATA_DISABLED", "true");
        cmd.env("SKYWARD_HOME", self.path().join("home"))
            .env("SKYWARD_AGENT_BIN", bin("skyward-agent"))
            .env_remove("SKYWARD_LOG")
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// Processes whose command line or working directory lies inside the sandbox.
    pub fn processes(&self) -> Vec<(i32, String)> {
        processes_under(self.path())
    }

    /// Waits (bounded) until no process runs inside the sandbox; returns those that remain.
    pub fn wait_for_no_processes(&self, limit: Duration) -> Vec<(i32, String)> {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.processes();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (pid, _) in self.processes() {
            // SAFETY: signalling a process by pid.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Every live process (not a zombie) whose argv or environment mentions `dir` or whose cwd
/// is inside it (a background coordinator is known by its `SKYWARD_HOME`).
pub fn processes_under(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let proc_dir = entry.path();
        let state = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        if state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmdline = std::fs::read(proc_dir.join("cmdline"))
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(proc_dir.join("cwd"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let environ = std::fs::read(proc_dir.join("environ"))
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .unwrap_or_default();
        if cmdline.contains(&needle) || cwd.starts_with(&needle) || environ.contains(&needle) {
            found.push((pid, format!("{} (cwd {cwd})", cmdline.trim())));
        }
    }
    found
}

/// What a finished command printed and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion, killing it and failing the test if it takes longer than `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Finished {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned(),
    }
}

/// The bytes of the files directly in `dir` (0 when it does not exist): what a spill
/// directory holds on disk.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Starts a real `skyward-agent` for `node_id` against an in-process coordinator, logging to
/// `<sandbox>/<node_id>.log`.
pub fn spawn_agent(
    sandbox: &Sandbox,
    coordinator: &skyward_coordinator::Coordinator,
    node_id: &str,
    lease: &str,
) -> std::process::Child {
    agent_command(sandbox, coordinator, node_id, lease)
        .spawn()
        .expect("spawn skyward-agent")
}

/// The command [`spawn_agent`] runs, for a test to add to.
pub fn agent_command(
    sandbox: &Sandbox,
    coordinator: &skyward_coordinator::Coordinator,
    node_id: &str,
    lease: &str,
) -> Command {
    agent_command_in(sandbox, coordinator, node_id, lease, &[])
}

/// [`agent_command`] run through `prefix` (a network namespace's
/// [`netns::TestNet::exec_prefix`]; empty: none).
pub fn agent_command_in(
    sandbox: &Sandbox,
    coordinator: &skyward_coordinator::Coordinator,
    node_id: &str,
    lease: &str,
    prefix: &[String],
) -> Command {
    let log =
        std::fs::File::create(sandbox.path().join(format!("{node_id}.log"))).expect("agent log");
    let agent = bin("skyward-agent");
    let mut command = match prefix.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(agent);
            command
        }
        None => Command::new(agent),
    };
    command
        .args(["--coordinator", &coordinator.local_addr().to_string()])
        .args([
            "--ca-pin",
            &coordinator.ca_pin(),
            "--node-id",
            node_id,
            "--lease",
            lease,
        ])
        .arg("--work-dir")
        .arg(sandbox.path().join(node_id))
        .env("SKYWARD_TOKEN", coordinator.issue_token(node_id))
        .stderr(log);
    command
}

/// Waits (at most 20 s) until `node_id` is connected to `coordinator`.
pub async fn wait_connected(
    coordinator: &skyward_coordinator::Coordinator,
    node_id: &str,
) -> skyward_coordinator::NodeHandle {
    connected_within(coordinator, node_id, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("{node_id} did not connect"))
}

/// `node_id`'s handle once it is connected, or `None` after `limit`.
pub async fn connected_within(
    coordinator: &skyward_coordinator::Coordinator,
    node_id: &str,
    limit: Duration,
) -> Option<skyward_coordinator::NodeHandle> {
    tokio::time::timeout(limit, async {
        loop {
            if let Some(node) = coordinator.node(node_id) {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .ok()
}

/// Reads a task to its end; returns its stdout and stderr together, in arrival order.
pub async fn task_output(task: &mut skyward_coordinator::server::RemoteTask) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(event) = task.output.next().await.expect("task stream") {
        if let skyward_common::protocol::TaskEvent::Output { data, .. } = event {
            out.extend_from_slice(&data);
        }
    }
    out
}

/// A coordinator for `pool` in this test process, on a loopback port of its own.
pub fn loopback_coordinator(pool: &str) -> std::sync::Arc<skyward_coordinator::Coordinator> {
    skyward_common::install_crypto_provider();
    std::sync::Arc::new(
        skyward_coordinator::Coordinator::start(skyward_coordinator::CoordinatorConfig {
            pool: pool.into(),
            bind: ([127, 0, 0, 1], 0).into(),
            state_dir: None,
        })
        .expect("start a coordinator on loopback"),
    )
}

/// A coordinator that dials listening agents (`--reverse`) on hosts of the test's own
/// network namespaces: bound to every address, as a loopback-bound socket cannot send to them.
pub fn dialing_coordinator(pool: &str) -> std::sync::Arc<skyward_coordinator::Coordinator> {
    skyward_common::install_crypto_provider();
    std::sync::Arc::new(
        skyward_coordinator::Coordinator::start(skyward_coordinator::CoordinatorConfig {
            pool: pool.into(),
            bind: ([0, 0, 0, 0], 0).into(),
            state_dir: None,
        })
        .expect("start a coordinator"),
    )
}

/// A command task with no env, timeout or stdin: what most tests run on a node.
pub fn command(argv: &[&str]) -> skyward_common::protocol::TaskSpec {
    skyward_common::protocol::TaskSpec::command(
        0,
        0,
        argv.iter().map(|s| s.to_string()).collect(),
        vec![],
        None,
        false,
    )
}

/// What a reversed pool's agents listen on, as `Provider::listen_addresses` is asked it.
pub fn agent_listening() -> skyward_providers::bootstrap::Reverse {
    skyward_providers::bootstrap::Reverse {
        agent_port: skyward_providers::bootstrap::AGENT_PORT,
        allow_from: None,
    }
}

/// A `skyward run` of one task on two nodes, `echo on $SKYWARD_NODE_ID; sleep ...; echo
/// finished on $SKYWARD_NODE_ID`, whose node a test takes away once it has started.
pub struct MovingRun {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// The node the task started on.
    pub first: String,
}

impl MovingRun {
    /// Spawns `cmd` (its task printing as above) and waits for the task's first line.
    pub fn start(cmd: &mut Command) -> MovingRun {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("skyward starts");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("the task's first line");
        let first = line
            .trim()
            .strip_prefix("on ")
            .unwrap_or_else(|| panic!("expected `on node-N`, got {line:?}"))
            .to_string();
        MovingRun {
            child,
            stdout,
            first,
        }
    }

    /// Waits for the run to end and checks that it succeeded, the task finishing on the
    /// other node only, and that stderr said it lost the first for a reason starting
    /// with `reason`. Returns stderr.
    pub fn assert_moved(mut self, reason: &str) -> String {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).expect("the run's output");
        let out = self.child.wait_with_output().expect("the run ends");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{rest}\n{stderr}");
        let lost = &self.first;
        let other = if lost == "node-1" { "node-2" } else { "node-1" };
        assert!(rest.contains(&format!("finished on {other}")), "{rest}");
        assert!(!rest.contains(&format!("finished on {lost}")), "{rest}");
        assert!(
            stderr.contains(&format!("skyward: task 0 lost {lost} ({reason}"))
                && stderr.contains(&format!("running it again on {other} (attempt 1)")),
            "{stderr}"
        );
        stderr
    }
}

/// One node's machine removed, the others left: provisions `nodes` nodes of `offer` at
/// `provider` for `coordinator`'s pool, terminates node-1 and waits (bounded) until
/// `live_nodes` (the node ids whose machines the cloud, or its stand-in, still holds) says
/// that node-1's machine went and every other stayed; then tears the pool down and waits
/// until none is left. Any cloud's `terminate` is checked the same way.
pub async fn check_terminate_removes_one_node<F, Fut>(
    provider: &dyn skyward_providers::Provider,
    coordinator: &skyward_coordinator::Coordinator,
    spec: &skyward_core::spec::PoolSpec,
    offer: &skyward_core::offer::Offer,
    live_nodes: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    use skyward_providers::{NodeBootstrap, ProvisionRequest};
    let pool = coordinator.pool().to_string();
    let ids: Vec<String> = (1..=spec.nodes).map(|i| format!("node-{i}")).collect();
    let request = ProvisionRequest {
        pool: pool.clone(),
        nodes: ids
            .iter()
            .map(|id| NodeBootstrap {
                node_id: id.clone(),
                token: coordinator.issue_token(id),
            })
            .collect(),
        spec: spec.clone(),
        bootstrap: coordinator.bootstrap(),
    };
    provider
        .provision(&request, offer, skyward_core::offer::Market::OnDemand)
        .await
        .expect("provision");
    let sorted = |mut nodes: Vec<String>| {
        nodes.sort();
        nodes
    };
    assert_eq!(
        sorted(live_nodes().await),
        ids,
        "every node's machine exists"
    );
    provider
        .terminate(&pool, "node-1")
        .await
        .expect("terminate node-1");
    // Terminating what is already going is no error.
    provider
        .terminate(&pool, "node-1")
        .await
        .expect("terminate node-1 again");
    let others = ids[1..].to_vec();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let live = sorted(live_nodes().await);
        if live == others {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after terminating node-1, the machines left are {live:?}, not {others:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    provider.teardown(&pool).await.expect("teardown");
    assert_eq!(live_nodes().await, Vec::<String>::new(), "nothing is left");
}
