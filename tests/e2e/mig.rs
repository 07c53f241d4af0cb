//! MIG layouts end to end: real agents started with `SKYWARD_MIG`, a stateful fake
//! `nvidia-smi` first on their PATH (NVML off), an in-process coordinator reading the
//! inventory they report.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use skyward_common::inventory::{Inventory, MigLayoutReport};
use skyward_coordinator::Coordinator;
use skyward_tests::{bin, loopback_coordinator, wait_connected, Sandbox};

const GPU_UUID: &str = "GPU-f4548330-27be-041a-ad8e-95b3005644b8";

/// An H100 NVL as driver 550 shows it, with state in files beside the script: `mode` (MIG
/// mode), `instances` (`<gpu instance id> <profile>` lines) and `next_gi`. `-mig 1` turns
/// the mode on, `mig -cgi IDS -C` makes instances (each with its compute instance), which
/// `-L` and `mig -lgi` then list, `-dci`/`-dgi` remove them; `mig -lgip` answers with the
/// captured listing. Every call is logged to `calls.log`.
const FAKE_H100NVL: &str = r#"#!/bin/sh
dir=$(dirname "$0")
echo "$*" >> "$dir/calls.log"
mode=$(cat "$dir/mode")
gpu=GPU-f4548330-27be-041a-ad8e-95b3005644b8
profile_id() {
    case $1 in 1g.12gb) echo 19 ;; 3g.47gb) echo 9 ;; 7g.94gb) echo 0 ;; esac
}
case "$*" in
--query-gpu=*)
    echo "0, $gpu, NVIDIA H100 NVL, 95830, 0, 0, 550.90.07, $mode, $mode" ;;
"")
    echo "| NVIDIA-SMI 550.90.07        Driver Version: 550.90.07      CUDA Version: 12.4     |" ;;
-L)
    echo "GPU 0: NVIDIA H100 NVL (UUID: $gpu)"
    n=0
    while read -r gi profile; do
        printf '  MIG %-11s Device %2d: (UUID: MIG-%08d-58ab-5d66-9f62-1adbdbe5c7c3)\n' "$profile" "$n" "$gi"
        n=$((n + 1))
    done < "$dir/instances" ;;
"-i 0 -mig 1")
    echo Enabled > "$dir/mode"
    echo "Enabled MIG Mode for GPU 00000000:00:1E.0"
    echo "All done." ;;
"mig -i 0 -lgip"|"mig -lgip")
    [ "$mode" = Enabled ] || { echo "No MIG-enabled devices found."; exit 6; }
    cat "$dir/lgip.txt" ;;
"mig -i 0 -lgi"|"mig -lgi")
    [ -s "$dir/instances" ] || { echo "No GPU instances found: Not Found"; exit 6; }
    while read -r gi profile; do
        printf '|   0  MIG %-12s %4d %8d          0:1     |\n' "$profile" "$(profile_id "$profile")" "$gi"
    done < "$dir/instances" ;;
"mig -i 0 -dci")
    [ -s "$dir/instances" ] || { echo "No compute instances found: Not Found"; exit 6; }
    echo "Successfully destroyed compute instances on GPU 0" ;;
"mig -i 0 -dgi")
    [ -s "$dir/instances" ] || { echo "No GPU instances found: Not Found"; exit 6; }
    : > "$dir/instances"
    echo "Successfully destroyed GPU instances on GPU 0" ;;
"mig -i 0 -cgi "*" -C")
    next=$(cat "$dir/next_gi")
    for id in $(echo "$5" | tr , ' '); do
        case $id in
        19) p=1g.12gb ;; 9) p=3g.47gb ;; 0) p=7g.94gb ;;
        *) echo "Unable to create a GPU instance on GPU 0 using profile $id: Invalid Argument"; exit 2 ;;
        esac
        echo "$next $p" >> "$dir/instances"
        echo "Successfully created GPU instance ID $next on GPU 0 using profile MIG $p (ID $id)"
        next=$((next + 1))
    done
    echo "$next" > "$dir/next_gi" ;;
*)
    echo "fake nvidia-smi: unexpected arguments: $*" >&2
    exit 2 ;;
esac
"#;

/// A consumer GPU: no MIG mode to query, and `-mig 1` refused as the driver does.
const FAKE_RTX4090: &str = r#"#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls.log"
case "$*" in
--query-gpu=*)
    echo "0, GPU-0f0e0d0c-0b0a-0908-0706-050403020100, NVIDIA GeForce RTX 4090, 24564, 1, 7, 550.90.07, [N/A], [N/A]" ;;
"")
    echo "| NVIDIA-SMI 550.90.07        Driver Version: 550.90.07      CUDA Version: 12.4     |" ;;
"-i 0 -mig 1")
    echo "Unable to enable MIG Mode for GPU 00000000:01:00.0: Not Supported"
    echo "Treating as warning and moving on."
    echo "All done."
    exit 3 ;;
*)
    echo "fake nvidia-smi: unexpected arguments: $*" >&2
    exit 2 ;;
esac
"#;

/// The captured `nvidia-smi mig -lgip` of an H100 NVL (see agent/testdata/nvidia-smi/README.md).
fn lgip_fixture() -> String {
    include_str!("../../agent/testdata/nvidia-smi/mig-lgip-h100nvl.txt").to_string()
}

/// Installs `script` as `nvidia-smi` in `<sandbox>/bin`, with MIG mode off and no instances.
fn install_fake(sandbox: &Sandbox, script: &str) -> PathBuf {
    let bin = sandbox.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = bin.join("nvidia-smi");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(bin.join("mode"), "Disabled\n").unwrap();
    std::fs::write(bin.join("instances"), "").unwrap();
    std::fs::write(bin.join("next_gi"), "1\n").unwrap();
    std::fs::write(bin.join("lgip.txt"), lgip_fixture()).unwrap();
    bin
}

/// A real agent for `node_id`, started with `SKYWARD_MIG=layout`, the fake in `fake_bin`
/// first on its PATH and NVML off; logs to `<sandbox>/<node_id>.log`.
fn spawn_agent_with_mig(
    sandbox: &Sandbox,
    coordinator: &Coordinator,
    node_id: &str,
    fake_bin: &Path,
    layout: &str,
) -> Child {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![fake_bin.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    let log =
        std::fs::File::create(sandbox.path().join(format!("{node_id}.log"))).expect("agent log");
    Command::new(bin("skyward-agent"))
        .args(["--coordinator", &coordinator.local_addr().to_string()])
        .args(["--ca-pin", &coordinator.ca_pin(), "--node-id", node_id])
        .args(["--lease", "1m"])
        .arg("--work-dir")
        .arg(sandbox.path().join(node_id))
        .env("SKYWARD_TOKEN", coordinator.issue_token(node_id))
        .env("PATH", std::env::join_paths(dirs).unwrap())
        .env("SKYWARD_NVML", "off")
        .env("SKYWARD_MIG", layout)
        .stderr(log)
        .spawn()
        .expect("spawn skyward-agent")
}

/// What `node_id` reported once connected; the agent is stopped after.
async fn reported_inventory(
    sandbox: &Sandbox,
    coordinator: &Coordinator,
    node_id: &str,
    fake_bin: &Path,
    layout: &str,
) -> Inventory {
    let mut agent = spawn_agent_with_mig(sandbox, coordinator, node_id, fake_bin, layout);
    let node = wait_connected(coordinator, node_id).await;
    assert!(node.is_connected());
    let _ = agent.kill();
    let _ = agent.wait();
    (*node.inventory).clone()
}

/// The logged calls that change MIG state, emptying the log.
fn state_changes(fake_bin: &Path) -> Vec<String> {
    let log = fake_bin.join("calls.log");
    let calls = std::fs::read_to_string(&log).expect("the fake was called");
    std::fs::write(&log, "").unwrap();
    calls
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .any(|a| matches!(a, "-mig" | "-cgi" | "-dci" | "-dgi"))
        })
        .map(str::to_string)
        .collect()
}

fn mig_devices(inventory: &Inventory) -> Vec<(String, String)> {
    assert_eq!(inventory.gpus.len(), 1, "{inventory:?}");
    inventory.gpus[0]
        .mig_devices
        .iter()
        .map(|m| (m.profile.clone(), m.uuid.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_partitions_the_gpu_reports_it_and_keeps_it_across_restarts() {
    let sandbox = Sandbox::new();
    let coordinator = loopback_coordinator("mig-test");
    let fake = install_fake(&sandbox, FAKE_H100NVL);

    // First start: MIG mode on, seven 1g.12gb instances made, and reported.
    let first = reported_inventory(&sandbox, &coordinator, "node-1", &fake, "1g.12gb").await;
    assert_eq!(
        first.mig,
        Some(MigLayoutReport {
            requested: "1g.12gb".into(),
            error: None,
            changed_gpus: vec![0],
        })
    );
    assert_eq!(
        state_changes(&fake),
        vec!["-i 0 -mig 1", "mig -i 0 -cgi 19,19,19,19,19,19,19 -C"]
    );
    let gpu = &first.gpus[0];
    assert_eq!(gpu.uuid, GPU_UUID);
    assert_eq!(gpu.mig_mode_current, Some(true));
    let devices = mig_devices(&first);
    assert_eq!(devices.len(), 7, "{devices:?}");
    assert!(
        devices
            .iter()
            .all(|(profile, uuid)| profile == "1g.12gb" && uuid.starts_with("MIG-")),
        "{devices:?}"
    );
    assert!(
        gpu.mig_devices
            .iter()
            .all(|m| m.memory_bytes == (10.62 * 1024.0 * 1024.0 * 1024.0) as u64),
        "memory from the captured -lgip: {gpu:?}"
    );

    // A restart with the same layout (the GPU keeps its state): nothing destroyed or made,
    // the same devices reported.
    let again = reported_inventory(&sandbox, &coordinator, "node-2", &fake, "1g.12gb").await;
    assert_eq!(state_changes(&fake), Vec::<String>::new());
    let report = again.mig.clone().expect("a MIG report");
    assert_eq!((report.error, report.changed_gpus), (None, vec![]));
    assert_eq!(mig_devices(&again), devices);

    // Another layout replaces the instances.
    let other =
        reported_inventory(&sandbox, &coordinator, "node-3", &fake, "3g.47gb, 3g.47gb").await;
    assert_eq!(
        state_changes(&fake),
        vec!["mig -i 0 -dci", "mig -i 0 -dgi", "mig -i 0 -cgi 9,9 -C"]
    );
    assert_eq!(other.mig.as_ref().expect("a MIG report").error, None);
    let profiles: Vec<String> = mig_devices(&other).into_iter().map(|(p, _)| p).collect();
    assert_eq!(profiles, vec!["3g.47gb", "3g.47gb"]);

    // A profile this GPU does not have: refused, the instances left as they were.
    let refused =
        reported_inventory(&sandbox, &coordinator, "node-4", &fake, "3g.40gb,1g.10gb").await;
    assert_eq!(
        refused.mig.as_ref().expect("a MIG report").error.as_deref(),
        Some("cannot apply MIG layout 3g.40gb,1g.10gb: GPU 0: 3g.40gb is not a MIG profile of NVIDIA H100 NVL (its profiles: 1g.12gb, 3g.47gb, 7g.94gb)")
    );
    assert_eq!(state_changes(&fake), Vec::<String>::new());
    assert_eq!(mig_devices(&refused).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_gpu_refuses_and_the_agent_still_connects_and_says_why() {
    let sandbox = Sandbox::new();
    let coordinator = loopback_coordinator("mig-refused");
    let fake = install_fake(&sandbox, FAKE_RTX4090);
    let mut agent = spawn_agent_with_mig(&sandbox, &coordinator, "node-1", &fake, "1g.10gb");
    let node = wait_connected(&coordinator, "node-1").await;
    assert_eq!(
        node.inventory.mig,
        Some(MigLayoutReport {
            requested: "1g.10gb".into(),
            error: Some("cannot apply MIG layout 1g.10gb: GPU 0: NVIDIA GeForce RTX 4090 has no MIG support (nvidia-smi -i 0 -mig 1: Unable to enable MIG Mode for GPU 00000000:01:00.0: Not Supported)".into()),
            changed_gpus: vec![],
        })
    );
    assert_eq!(node.inventory.gpus.len(), 1);
    assert_eq!(node.inventory.gpus[0].name, "NVIDIA GeForce RTX 4090");
    assert!(node.inventory.gpus[0].mig_devices.is_empty());
    assert_eq!(state_changes(&fake), vec!["-i 0 -mig 1"]);
    // Still a working node: it runs tasks.
    let mut task = coordinator
        .start_task(
            &node,
            skyward_common::protocol::TaskSpec::command(
                0,
                0,
                vec!["echo".into(), "up".into()],
                vec![],
                None,
                false,
            ),
        )
        .await
        .unwrap();
    assert_eq!(skyward_tests::task_output(&mut task).await, b"up\n");
    let log = std::fs::read_to_string(sandbox.path().join("node-1.log")).unwrap();
    assert!(log.contains("has no MIG support"), "{log}");
    let _ = agent.kill();
    let _ = agent.wait();
}
