//! Nothing orphaned: a `skyward run` killed with SIGKILL leaves its pool recorded on disk;
//! `skyward pool list` shows it as left behind and `skyward down` removes every machine and
//! everything else made for it, and `down --all` also what carries the project's tag at a
//! provider without being recorded. A pool whose skyward still runs is handed back to it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use skyward_tests::standins::digitalocean::{DigitalOceanStandIn, TOKEN};
use skyward_tests::{run, Sandbox};

const LIMIT: Duration = Duration::from_secs(120);

/// Starts `skyward ARGS` and returns once its tasks have printed `started` `tasks` times.
fn start_run(mut cmd: std::process::Command, tasks: usize) -> Child {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("skyward starts");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + LIMIT;
    let mut started = 0;
    while started < tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.ends_with("started") => started += 1,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "the tasks did not start: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    child
}

fn pool_list(sandbox: &Sandbox) -> Vec<Value> {
    let out = run(sandbox.skyward().args(["pool", "list", "--json"]), LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_skyward_leaves_a_pool_that_pool_list_shows_and_down_removes() {
    let sandbox = Sandbox::new();
    let standin = DigitalOceanStandIn::start(&sandbox.path().join("droplets")).await;
    let against_standin = |cmd: &mut std::process::Command| {
        cmd.env("DIGITALOCEAN_API_URL", standin.url())
            .env("DIGITALOCEAN_TOKEN", TOKEN);
    };
    let mut cmd = sandbox.skyward();
    against_standin(&mut cmd);
    cmd.args([
        "run",
        "--provider",
        "digitalocean",
        "--cpu",
        "4",
        "--memory",
        "8GB",
        "--nodes",
        "2",
        "--on",
        "all",
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
    ]);
    let mut skyward = tokio::task::spawn_blocking(move || start_run(cmd, 2))
        .await
        .unwrap();
    // No teardown, no goodbye: the machines stay.
    skyward.kill().unwrap();
    skyward.wait().unwrap();
    assert_eq!(standin.droplets().len(), 2);

    let pools = pool_list(&sandbox);
    assert_eq!(pools.len(), 1, "{pools:#?}");
    let pool = &pools[0];
    let name = pool["name"].as_str().unwrap().to_string();
    assert_eq!(pool["condition"], "left behind", "{pool:#}");
    assert_eq!(pool["owner_alive"], false);
    assert_eq!(pool["providers"], "digitalocean");
    assert_eq!(pool["placements"][0]["provider"], "digitalocean");
    assert_eq!(pool["placements"][0]["region"], "nyc1");
    let mut ids: Vec<String> = pool["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["provider_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut droplets: Vec<String> = standin
        .droplets()
        .iter()
        .map(|d| d.id.to_string())
        .collect();
    droplets.sort();
    assert_eq!(ids, droplets, "the store has the droplets' ids");
    // And what ran on them: both tasks, still running when it was killed.
    let tasks = pool["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert!(tasks.iter().all(|t| t["state"] == "running"), "{tasks:?}");
    let table = run(sandbox.skyward().args(["pool", "list"]), LIMIT);
    assert!(
        table.stdout.contains(&name)
            && table.stdout.contains("left behind")
            && table.stdout.contains("2 running"),
        "{}",
        table.stdout
    );

    // A name that is not recorded changes nothing.
    let out = run(
        sandbox.skyward().args(["down", &name, "sky-00000000"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains("no pool sky-00000000 is recorded here: `skyward pool list`"),
        "{}",
        out.stderr
    );
    assert_eq!(standin.droplets().len(), 2);

    // A pool this machine never recorded (another machine's, or from before the store), a
    // GPU droplet that only `type=gpus` lists; and a droplet that is none of Skyward's.
    standin.add_droplet(
        "ghost-node-1",
        "gpu-h100x1-80gb",
        "tor1",
        &["skyward-pool:ghost".into(), "skyward-node:node-1".into()],
    );
    let theirs = standin.add_droplet("theirs", "s-2vcpu-4gb", "nyc1", &[]);

    let mut down = sandbox.skyward();
    against_standin(&mut down);
    let out = run(down.args(["down", "--all"]), LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!("pool {name}: removed"))
            && out
                .stdout
                .contains("pool ghost (found at digitalocean by its tag): removed"),
        "{}",
        out.stdout
    );
    let left: Vec<u64> = standin.droplets().iter().map(|d| d.id).collect();
    assert_eq!(
        left,
        [theirs],
        "only the droplet that is not Skyward's stays"
    );
    assert!(
        standin.vpcs().iter().all(|v| v.default),
        "the pool's VPC went too: {:?}",
        standin.vpcs()
    );
    assert!(pool_list(&sandbox).is_empty());
    assert!(!sandbox.path().join("home/pools").join(&name).exists());
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[test]
fn down_hands_a_running_pool_back_to_its_skyward() {
    let sandbox = Sandbox::new();
    let mut cmd = sandbox.skyward();
    cmd.args([
        "run",
        "--nodes",
        "2",
        "--on",
        "all",
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
    ]);
    let skyward = start_run(cmd, 2);
    let pools = pool_list(&sandbox);
    assert_eq!(pools.len(), 1, "{pools:#?}");
    assert_eq!(pools[0]["condition"], "running");
    assert_eq!(pools[0]["owner"]["pid"], skyward.id());
    let name = pools[0]["name"].as_str().unwrap().to_string();

    let out = run(sandbox.skyward().args(["down", &name]), LIMIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "pool {name}: asking its skyward (pid {}) to tear it down",
            skyward.id()
        )) && out.stdout.contains(&format!("pool {name}: removed")),
        "{}",
        out.stdout
    );
    let finished = skyward.wait_with_output().unwrap();
    assert_eq!(
        finished.status.code(),
        Some(143),
        "it tore down on SIGTERM: {}",
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(pool_list(&sandbox).is_empty());
    let left = sandbox.wait_for_no_processes(Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {left:?}");
}
