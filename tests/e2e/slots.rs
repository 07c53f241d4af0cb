//! GPU slot scheduling end to end: each local agent asks a fake `nvidia-smi` (first on the
//! PATH they inherit, NVML off) and reports one H100 split into 7 MIG devices, with UUIDs of
//! its own node; `skyward run --slice` must run one task per MIG device at once and make the
//! rest wait for a free one.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use skyward_tests::{run, Sandbox};

const LIMIT: Duration = Duration::from_secs(90);
const MIGS_PER_NODE: usize = 7;

/// The UUID the fake gives MIG device `device` of `node-<n>`.
fn mig_uuid(node: usize, device: usize) -> String {
    format!("MIG-0000000{node}-0000-4000-8000-00000000000{device}")
}

/// An H100 in MIG mode with 7 1g.10gb devices, whose UUIDs carry the asking agent's node
/// number (read from its `--node-id` argument: the agent is the script's parent). What the
/// agent asks beyond the GPU query and the device list is refused, as an older driver would.
fn fake_nvidia_smi() -> String {
    let migs: String = (0..MIGS_PER_NODE)
        .map(|d| {
            format!("  MIG 1g.10gb     Device  {d}: (UUID: MIG-0000000$n-0000-4000-8000-00000000000{d})\n")
        })
        .collect();
    format!(
        r#"#!/bin/sh
node=$(tr '\0' '\n' < /proc/$PPID/cmdline | sed -n '/^--node-id$/{{n;p;q;}}')
n=${{node#node-}}
case "$*" in
--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,driver_version,mig.mode.current,mig.mode.pending\ --format=csv,noheader,nounits)
    echo "0, GPU-0000000$n-0000-4000-8000-000000000000, NVIDIA H100 80GB HBM3, 81559, 24, [N/A], 550.54.15, Enabled, Enabled" ;;
-L)
    echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000000$n-0000-4000-8000-000000000000)"
    cat <<EOF
{migs}EOF
    ;;
*)
    exit 2 ;;
esac
"#
    )
}

/// Writes the fake as `<sandbox>/bin/nvidia-smi` and returns the directory.
fn install_fake(sandbox: &Sandbox) -> PathBuf {
    let bin = sandbox.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = bin.join("nvidia-smi");
    std::fs::write(&path, fake_nvidia_smi()).unwrap();
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

/// What one task wrote about itself.
#[derive(Debug)]
struct TaskRecord {
    input: String,
    start_ns: u128,
    end_ns: u128,
    cuda: String,
    nvidia: String,
    node: String,
}

fn read_records(dir: &Path) -> Vec<TaskRecord> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let fields: Vec<&str> = text.split_whitespace().collect();
            assert_eq!(fields.len(), 5, "{text:?}");
            TaskRecord {
                input: entry.file_name().to_string_lossy().into_owned(),
                start_ns: fields[0].parse().unwrap(),
                end_ns: fields[1].parse().unwrap(),
                cuda: fields[2].into(),
                nvidia: fields[3].into(),
                node: fields[4].into(),
            }
        })
        .collect()
}

#[test]
fn two_nodes_of_seven_mig_slices_run_fourteen_tasks_at_once_and_the_fifteenth_waits() {
    let sandbox = Sandbox::new();
    let bin = install_fake(&sandbox);
    let records = sandbox.path().join("records");
    std::fs::create_dir_all(&records).unwrap();
    // Each task notes when it ran and on which device; the sleep keeps the 14 overlapping.
    let template = format!(
        "sh -c 'start=$(date +%s%N); echo \"$CUDA_VISIBLE_DEVICES\"; sleep 3; \
         echo \"$start $(date +%s%N) $CUDA_VISIBLE_DEVICES $NVIDIA_VISIBLE_DEVICES $SKYWARD_NODE_ID\" > {}/{{}}'",
        records.display()
    );
    let inputs: Vec<String> = (1..=15).map(|i| i.to_string()).collect();
    let out = run(
        skyward_with_fake(&sandbox, &bin)
            .args(["run", "--nodes", "2", "--slice", "--map", &template])
            .args(&inputs),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");

    let mut tasks = read_records(&records);
    assert_eq!(tasks.len(), 15, "{tasks:?}");
    tasks.sort_by_key(|t| t.start_ns);
    for t in &tasks {
        assert_eq!(t.cuda, t.nvidia, "{t:?}");
        // The device is one the task's own node reported.
        let n: usize = t.node.trim_start_matches("node-").parse().unwrap();
        let own: Vec<String> = (0..MIGS_PER_NODE).map(|d| mig_uuid(n, d)).collect();
        assert!(own.contains(&t.cuda), "{t:?} not one of {own:?}");
        // Each task printed its device, prefixed by its node.
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(&format!("[{}] ", t.node)) && l.ends_with(&t.cuda)),
            "{t:?} not in {}",
            out.stdout
        );
    }
    let (first, last) = tasks.split_at(14);
    let distinct: BTreeSet<&str> = first.iter().map(|t| t.cuda.as_str()).collect();
    let every_slice: BTreeSet<String> = (1..=2)
        .flat_map(|n| (0..MIGS_PER_NODE).map(move |d| mig_uuid(n, d)))
        .collect();
    assert_eq!(
        distinct,
        every_slice.iter().map(String::as_str).collect(),
        "{first:?}"
    );
    let latest_start = first.iter().map(|t| t.start_ns).max().unwrap();
    let earliest_end = first.iter().map(|t| t.end_ns).min().unwrap();
    assert!(
        latest_start < earliest_end,
        "the first 14 did not all run at once: {first:?}"
    );
    let fifteenth = &last[0];
    assert_eq!(fifteenth.input, "15", "inputs start in order: {tasks:?}");
    let freed = first
        .iter()
        .find(|t| t.cuda == fifteenth.cuda)
        .expect("the 15th reuses a slice");
    assert!(
        fifteenth.start_ns > freed.end_ns,
        "the 15th started on {} before its task ended: {fifteenth:?} {freed:?}",
        fifteenth.cuda
    );
    // No slice ever held two tasks at once.
    let mut by_slice: HashMap<&str, Vec<&TaskRecord>> = HashMap::new();
    for t in &tasks {
        by_slice.entry(&t.cuda).or_default().push(t);
    }
    for (slice, held) in by_slice {
        for pair in held.windows(2) {
            assert!(pair[1].start_ns > pair[0].end_ns, "{slice}: {pair:?}");
        }
    }
}

#[test]
fn more_gpus_than_the_accelerator_spec_gives_is_refused_before_provisioning() {
    let sandbox = Sandbox::new();
    for args in [
        &[
            "run",
            "--accelerator",
            "H100:2",
            "--gpus",
            "3",
            "--",
            "true",
        ][..],
        &["run", "--provider", "aws", "--gpus", "3", "--", "true"][..],
    ] {
        let out = run(sandbox.skyward().args(args), LIMIT);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("skyward: --gpus 3 ") && out.stderr.contains("--accelerator"),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert!(
        !sandbox.path().join("home/pools").exists(),
        "a pool was created"
    );
    assert!(sandbox.processes().is_empty());
}

#[test]
fn a_local_pool_without_the_gpus_asked_for_fails_before_any_task_starts() {
    let sandbox = Sandbox::new();
    let bin = install_fake(&sandbox);
    let ran = sandbox.path().join("ran");
    let out = run(
        skyward_with_fake(&sandbox, &bin).args([
            "run",
            "--gpus",
            "2",
            "--",
            "touch",
            ran.to_str().unwrap(),
        ]),
        LIMIT,
    );
    assert_eq!(out.code, Some(255), "{out:?}");
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("skyward: "))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    assert!(errors[0].contains("--gpus 2"), "{}", out.stderr);
    assert!(errors[0].contains("use --slice"), "{}", out.stderr);
    assert!(!ran.exists(), "the task ran");
    assert!(
        sandbox
            .wait_for_no_processes(Duration::from_secs(5))
            .is_empty(),
        "nodes left running: {:?}",
        sandbox.processes()
    );
}

/// One placement across jobs: on a `pool up` pool whose node has 7 MIG slices, a job holding
/// all 7 and a second job started while it runs never share a slice; the second waits for
/// one to be freed.
#[test]
fn concurrent_jobs_on_one_pool_never_share_a_gpu_slot() {
    let sandbox = Sandbox::new();
    let bin = install_fake(&sandbox);
    let (records, started) = (
        sandbox.path().join("records"),
        sandbox.path().join("started"),
    );
    std::fs::create_dir_all(&records).unwrap();
    std::fs::create_dir_all(&started).unwrap();
    let up = run(
        skyward_with_fake(&sandbox, &bin).args(["pool", "up", "gpus"]),
        LIMIT,
    );
    assert_eq!(up.code, Some(0), "{up:?}");
    let note = |input: &str, sleep: u32| {
        format!(
            "start=$(date +%s%N); touch {started}/{input}; sleep {sleep}; \
             echo \"$start $(date +%s%N) $CUDA_VISIBLE_DEVICES $NVIDIA_VISIBLE_DEVICES $SKYWARD_NODE_ID\" > {records}/{input}",
            started = started.display(),
            records = records.display(),
        )
    };
    let template = format!("sh -c '{}'", note("{}", 4));
    let inputs: Vec<String> = (1..=MIGS_PER_NODE).map(|i| format!("a{i}")).collect();
    let first = run(
        skyward_with_fake(&sandbox, &bin)
            .args(["exec", "gpus", "--detach", "--slice", "--map", &template])
            .args(&inputs),
        LIMIT,
    );
    assert_eq!(first.code, Some(0), "{first:?}");
    let deadline = std::time::Instant::now() + LIMIT;
    while std::fs::read_dir(&started).unwrap().count() < MIGS_PER_NODE {
        assert!(
            std::time::Instant::now() < deadline,
            "the first job's tasks never all started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = run(
        skyward_with_fake(&sandbox, &bin).args([
            "exec",
            "gpus",
            "--slice",
            "--",
            "sh",
            "-c",
            &note("b", 0),
        ]),
        LIMIT,
    );
    assert_eq!(second.code, Some(0), "{second:?}");
    while std::fs::read_dir(&records).unwrap().count() < MIGS_PER_NODE + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first job never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let tasks = read_records(&records);
    let later = tasks
        .iter()
        .find(|t| t.input == "b")
        .expect("the second job's record");
    let earliest_end = tasks
        .iter()
        .filter(|t| t.input != "b")
        .map(|t| t.end_ns)
        .min()
        .unwrap();
    assert!(
        later.start_ns > earliest_end,
        "the second job started on {} before any slice was free: {tasks:?}",
        later.cuda
    );
    let mut by_slice: HashMap<&str, Vec<&TaskRecord>> = HashMap::new();
    for t in &tasks {
        by_slice.entry(&t.cuda).or_default().push(t);
    }
    for (slice, held) in by_slice.iter_mut() {
        held.sort_by_key(|t| t.start_ns);
        for pair in held.windows(2) {
            assert!(
                pair[1].start_ns > pair[0].end_ns,
                "{slice} held twice: {pair:?}"
            );
        }
    }
    let down = run(sandbox.skyward().args(["pool", "down", "gpus"]), LIMIT);
    assert_eq!(down.code, Some(0), "{down:?}");
}
