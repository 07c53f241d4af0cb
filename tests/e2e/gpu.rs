//! GPU inventory end to end: a fake `nvidia-smi` first on the local agents' PATH (they inherit
//! the CLI's environment), NVML switched off so that the fallback runs the same way on a
//! machine with a real GPU.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skyward_tests::{run, Sandbox};

const LIMIT: Duration = Duration::from_secs(60);
/// Illustrative, not a capture: the `nvidia-smi` banner of driver 550 on an H100 in MIG mode.
const BANNER: &str = include_str!("../../agent/testdata/nvidia-smi-h100-mig-banner.txt");

const GPU_UUID: &str = "GPU-5b3c1a2e-8f4d-4c6b-9a7e-1d2c3b4a5f60";
const MIG_UUIDS: [&str; 2] = [
    "MIG-0c4d9f8e-7b6a-5c4d-8e3f-2a1b0c9d8e7f",
    "MIG-7e6d5c4b-3a2f-5e1d-9c8b-7a6f5e4d3c2b",
];

/// An H100 80GB in MIG mode with two 1g.10gb devices, answering the queries the agent makes
/// in the formats of driver 550 (the `-L` layout is that of the captured fixtures; the banner
/// is illustrative). Every call is logged to `calls.log` beside the script.
fn fake_h100_mig() -> String {
    format!(
        r#"#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls.log"
case "$*" in
--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,driver_version,mig.mode.current,mig.mode.pending\ --format=csv,noheader,nounits)
    echo "0, {GPU_UUID}, NVIDIA H100 80GB HBM3, 81559, 24, [N/A], 550.54.15, Enabled, Enabled" ;;
-L)
    cat <<'EOF'
GPU 0: NVIDIA H100 80GB HBM3 (UUID: {GPU_UUID})
  MIG 1g.10gb     Device  0: (UUID: {mig0})
  MIG 1g.10gb     Device  1: (UUID: {mig1})
EOF
    ;;
"")
    cat "$(dirname "$0")/banner.txt"
    ;;
*)
    echo "fake nvidia-smi: unexpected arguments: $*" >&2
    exit 2 ;;
esac
"#,
        mig0 = MIG_UUIDS[0],
        mig1 = MIG_UUIDS[1],
    )
}

/// Writes `script` as `<sandbox>/bin/nvidia-smi` and returns the directory.
fn install_fake(sandbox: &Sandbox, script: &str) -> PathBuf {
    let bin = sandbox.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = bin.join("nvidia-smi");
    std::fs::write(&path, script).unwrap();
    // The same illustrative banner the agent's parser tests read.
    std::fs::write(bin.join("banner.txt"), BANNER).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// `skyward` with `bin` first on PATH and NVML off, so the agents ask the fake.
fn skyward_with_fake(sandbox: &Sandbox, bin: &Path) -> std::process::Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = sandbox.skyward();
    cmd.env("PATH", std::env::join_paths(dirs).unwrap())
        .env("SKYWARD_NVML", "off");
    cmd
}

fn node_ready(stdout: &str) -> serde_json::Value {
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let ready: Vec<_> = events
        .into_iter()
        .filter(|e| e["event"] == "node_ready")
        .collect();
    assert_eq!(ready.len(), 1, "{stdout}");
    ready.into_iter().next().unwrap()
}

#[test]
fn node_ready_reports_the_gpu_and_its_mig_devices() {
    let sandbox = Sandbox::new();
    let bin = install_fake(&sandbox, &fake_h100_mig());
    let out = run(
        skyward_with_fake(&sandbox, &bin).args(["run", "--json", "--", "true"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let ready = node_ready(&out.stdout);
    let gpus = ready["inventory"]["gpus"].as_array().expect("gpus");
    assert_eq!(gpus.len(), 1, "{ready}");
    let gpu = &gpus[0];
    assert_eq!(gpu["index"], 0);
    assert_eq!(gpu["uuid"], GPU_UUID);
    assert_eq!(gpu["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(gpu["memory_total_bytes"], 81559u64 * 1024 * 1024);
    assert_eq!(gpu["memory_used_bytes"], 24u64 * 1024 * 1024);
    assert_eq!(gpu["utilization_percent"], serde_json::Value::Null);
    assert_eq!(gpu["driver_version"], "550.54.15");
    assert_eq!(gpu["cuda_version"], "12.4");
    assert_eq!(gpu["mig_mode_current"], true);
    assert_eq!(gpu["mig_mode_pending"], true);
    let migs = gpu["mig_devices"].as_array().expect("mig_devices");
    assert_eq!(migs.len(), 2, "{gpu}");
    for (i, (mig, gi)) in migs.iter().zip([9, 10]).enumerate() {
        assert_eq!(mig["uuid"], MIG_UUIDS[i], "{mig}");
        assert_eq!(mig["profile"], "1g.10gb", "{mig}");
        assert_eq!(mig["parent_gpu_index"], 0, "{mig}");
        assert_eq!(mig["gpu_instance_id"], gi, "{mig}");
        assert_eq!(mig["compute_instance_id"], 0, "{mig}");
        assert_eq!(mig["memory_bytes"], 9984u64 * 1024 * 1024, "{mig}");
    }
    assert_eq!(ready["inventory"]["neuron_devices"], serde_json::json!([]));
    // The agent asked the fake: the query, the banner, the MIG list.
    let calls = std::fs::read_to_string(bin.join("calls.log")).expect("the fake was called");
    assert!(
        calls.lines().any(|l| l.starts_with("--query-gpu=")),
        "{calls}"
    );
    assert!(calls.lines().any(|l| l == "-L"), "{calls}");
}

#[test]
fn the_terminal_shows_one_line_per_gpu_and_mig_device() {
    let sandbox = Sandbox::new();
    let bin = install_fake(&sandbox, &fake_h100_mig());
    let out = run(
        skyward_with_fake(&sandbox, &bin).args(["run", "--", "echo", "done"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, "done\n");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("[node-1] gpu"))
        .collect();
    assert_eq!(
        lines,
        vec![
            "[node-1] gpu 0: NVIDIA H100 80GB HBM3, 81559 MiB, MIG enabled".to_string(),
            format!("[node-1] gpu 0 mig 1g.10gb {}", MIG_UUIDS[0]),
            format!("[node-1] gpu 0 mig 1g.10gb {}", MIG_UUIDS[1]),
        ],
        "{}",
        out.stderr
    );
}

#[test]
fn a_cpu_only_node_prints_no_gpu_lines() {
    let sandbox = Sandbox::new();
    // nvidia-smi exists but finds nothing, as on a machine whose driver sees no GPU.
    let bin = install_fake(
        &sandbox,
        "#!/bin/sh\necho \"$*\" >> \"$(dirname \"$0\")/calls.log\"\necho 'No devices were found'\nexit 6\n",
    );
    let out = run(
        skyward_with_fake(&sandbox, &bin).args(["run", "--", "true"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stderr.contains("gpu"), "{}", out.stderr);
    assert!(bin.join("calls.log").is_file(), "the fake was not asked");
}

#[test]
fn a_hanging_nvidia_smi_does_not_keep_the_node_from_coming_up() {
    let sandbox = Sandbox::new();
    // The script runs in the sandbox so that a leftover would show in its process scan.
    let bin = install_fake(
        &sandbox,
        "#!/bin/sh\ncd \"$(dirname \"$0\")\"\ntouch called\nsleep 600\n",
    );
    let started = Instant::now();
    let out = run(
        skyward_with_fake(&sandbox, &bin).args(["run", "--json", "--", "true"]),
        Duration::from_secs(40),
    );
    let took = started.elapsed();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(bin.join("called").is_file(), "the fake was not asked");
    let ready = node_ready(&out.stdout);
    assert_eq!(ready["inventory"]["gpus"], serde_json::json!([]), "{ready}");
    // Bounded by the agent's accelerator budget (8 s), not by the fake's 600 s.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        sandbox
            .wait_for_no_processes(Duration::from_secs(5))
            .is_empty(),
        "the hung nvidia-smi was left running: {:?}",
        sandbox.processes()
    );
}
