//! Code and data: `--workdir` syncs, `--download`, `--env-file`, with real agents over QUIC.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use skyward_common::protocol::{TaskId, TaskKind, TaskSpec};
use skyward_common::workdir::{
    tree_digest, DownloadEvent, DownloadSpec, EntryKind, SyncEvent, SyncRequest, SyncStart,
    TreeEntry,
};
use skyward_coordinator::workdir::sync_workdir;
use skyward_tests::{run, spawn_agent, task_output, wait_connected, Sandbox};

const LIMIT: Duration = Duration::from_secs(120);
const BIG: usize = 200 * 1024 * 1024;

/// `len` pseudo-random bytes from a fixed seed (xorshift64*): incompressible, reproducible.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::encode(Sha256::digest(&bytes))
}

/// A tree with an ignored file and directory, a nested dir, an executable, a link and a
/// 200 MB incompressible file.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("src/deep")).unwrap();
    std::fs::create_dir_all(root.join("scratch")).unwrap();
    std::fs::create_dir_all(root.join(".git")).unwrap();
    std::fs::write(root.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(root.join(".gitignore"), "*.log\nscratch/\n").unwrap();
    std::fs::write(root.join("debug.log"), "ignored\n").unwrap();
    std::fs::write(root.join("scratch/tmp.txt"), "ignored too\n").unwrap();
    std::fs::write(root.join("src/deep/data.txt"), "version 1\n".repeat(1000)).unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("src/deep/data.txt", root.join("latest")).unwrap();
    std::fs::write(root.join("big.bin"), noise(BIG, 42)).unwrap();
}

/// The synced copy on a node matches the tree: same files and contents, the executable
/// still executable, the link a link, the ignored files and `.git` absent.
fn assert_same_tree(source: &Path, copy: &Path) {
    for file in [".gitignore", "src/deep/data.txt", "run.sh", "big.bin"] {
        assert_eq!(
            sha256_file(&source.join(file)),
            sha256_file(&copy.join(file)),
            "{file} differs in {}",
            copy.display()
        );
    }
    let mode = std::fs::metadata(copy.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "run.sh lost its mode");
    assert_eq!(
        std::fs::read_link(copy.join("latest")).unwrap(),
        Path::new("src/deep/data.txt")
    );
    for absent in ["debug.log", "scratch", ".git"] {
        assert!(
            std::fs::symlink_metadata(copy.join(absent)).is_err(),
            "{absent} was synced"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_reaches_every_node_once_and_then_only_what_changed() {
    let sandbox = Sandbox::new();
    let coordinator = skyward_tests::loopback_coordinator("workdir-sync");
    let mut agents = [
        spawn_agent(&sandbox, &coordinator, "node-1", "1m"),
        spawn_agent(&sandbox, &coordinator, "node-2", "1m"),
    ];
    let nodes = [
        wait_connected(&coordinator, "node-1").await,
        wait_connected(&coordinator, "node-2").await,
    ];
    let tree = sandbox.path().join("tree");
    make_tree(&tree);

    let started = std::time::Instant::now();
    let first = sync_workdir(&coordinator, &nodes, &tree, &[])
        .await
        .unwrap();
    eprintln!("first sync in {:?}: {first:?}", started.elapsed());
    assert_eq!(first.nodes.len(), 2);
    for node in &first.nodes {
        // Everything went, incompressible as it is, and nothing ignored went, over the
        // coordinator's TCP port (the nodes dialed in).
        assert_eq!(node.sent_files, 4, "{node:?}");
        assert!(node.over_tcp, "{node:?}");
        assert!(node.sent_bytes > BIG as u64, "{node:?}");
        assert!(node.sent_bytes < BIG as u64 + (1 << 20), "{node:?}");
        let copy = sandbox.path().join(&node.node).join(&first.dir);
        assert_same_tree(&tree, &copy);
    }

    // Tasks run inside the synced tree.
    for node in &nodes {
        let mut spec = skyward_tests::command(&["sh", "-c", "./run.sh && sha256sum big.bin"]);
        if let TaskKind::Command { cwd, .. } = &mut spec.kind {
            *cwd = Some(first.dir.clone());
        }
        let mut task = coordinator.start_task(node, spec).await.unwrap();
        let out = String::from_utf8(task_output(&mut task).await).unwrap();
        let big = sha256_file(&tree.join("big.bin"));
        assert_eq!(out, format!("ran\n{big}  big.bin\n"), "on {}", node.node_id);
    }

    // Unchanged: nothing but the announcement goes.
    let again = sync_workdir(&coordinator, &nodes, &tree, &[])
        .await
        .unwrap();
    assert_eq!(again.tree, first.tree);
    for node in &again.nodes {
        assert_eq!(node.sent_files, 0, "{node:?}");
        assert!(!node.over_tcp, "nothing to send, no connection: {node:?}");
        assert!(node.sent_bytes < 64 * 1024, "{node:?}");
    }

    // One file changed: only that file goes (the new manifest with it).
    std::fs::write(tree.join("src/deep/data.txt"), "version 2\n".repeat(1000)).unwrap();
    let changed = sync_workdir(&coordinator, &nodes, &tree, &[])
        .await
        .unwrap();
    assert_ne!(changed.tree, first.tree);
    for node in &changed.nodes {
        assert_eq!(node.sent_files, 1, "{node:?}");
        assert!(node.over_tcp, "{node:?}");
        assert!(node.sent_bytes < 64 * 1024, "{node:?}");
        let copy = sandbox.path().join(&node.node).join(&changed.dir);
        assert_same_tree(&tree, &copy);
    }

    for agent in &mut agents {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    coordinator.close().await;
}

/// A coordinator-side stream that tries to write outside the tree, or to download from
/// outside the task's directory, is refused with a reason; the agent writes nothing there
/// and runs the next task as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sync_and_download_streams_are_refused_and_the_agent_lives_on() {
    let sandbox = Sandbox::new();
    let coordinator = skyward_tests::loopback_coordinator("workdir-hostile");
    let mut agent = spawn_agent(&sandbox, &coordinator, "node-1", "1m");
    let node = wait_connected(&coordinator, "node-1").await;
    let file = |path: &str| TreeEntry {
        path: path.into(),
        kind: EntryKind::File {
            mode: 0o644,
            size: 1,
            sha256: Sha256::digest(b"x").into(),
        },
    };
    let link = |path: &str, target: &str| TreeEntry {
        path: path.into(),
        kind: EntryKind::Symlink {
            target: target.into(),
        },
    };
    let hostile = [
        vec![file("../escaped")],
        vec![file("/tmp/escaped")],
        vec![link("up", "../../..")],
        vec![link("via", "."), file("via/x")],
    ];
    for entries in hostile {
        let start = SyncStart {
            tree: tree_digest(&entries),
            entries: entries.len() as u32,
            bytes: entries
                .iter()
                .filter(|e| matches!(e.kind, EntryKind::File { .. }))
                .count() as u64,
            bulk: None,
        };
        let spec = TaskSpec {
            task: TaskId { id: 0, attempt: 0 },
            kind: TaskKind::Sync(start),
            env: Vec::new(),
            timeout_ms: None,
        };
        let (mut send, mut recv, _) = node.open_transfer(spec).await.unwrap();
        let first: SyncEvent = skyward_common::frame::read_frame(&mut recv, 1 << 20)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, SyncEvent::NeedManifest);
        skyward_common::frame::write_frame(&mut send, &SyncRequest::Entries(entries.clone()))
            .await
            .unwrap();
        let answer: SyncEvent = skyward_common::frame::read_frame(&mut recv, 1 << 20)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(&answer, SyncEvent::Failed(why) if !why.is_empty()),
            "{entries:?} got {answer:?}"
        );
    }
    assert!(!sandbox.path().join("escaped").exists());
    assert!(!Path::new("/tmp/escaped").exists());

    let spec = TaskSpec {
        task: TaskId { id: 0, attempt: 0 },
        kind: TaskKind::Download(DownloadSpec {
            cwd: None,
            paths: vec!["../node-1.log".into()],
            limit: 1 << 20,
        }),
        env: Vec::new(),
        timeout_ms: None,
    };
    let (_send, mut recv, _) = node.open_transfer(spec).await.unwrap();
    let answer: DownloadEvent = skyward_common::frame::read_frame(&mut recv, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&answer, DownloadEvent::Failed(why) if why.contains("..")),
        "{answer:?}"
    );

    let mut task = coordinator
        .start_task(&node, skyward_tests::command(&["echo", "still here"]))
        .await
        .unwrap();
    assert_eq!(task_output(&mut task).await, b"still here\n");
    let _ = agent.kill();
    let _ = agent.wait();
    coordinator.close().await;
}

/// The whole flow from the command line: the tree synced to two nodes, a dotenv file in the
/// tasks' environment, each node's results brought back into a folder of its own.
#[test]
fn run_syncs_the_workdir_reads_env_files_and_downloads_per_node() {
    let sandbox = Sandbox::new();
    let tree = sandbox.path().join("project");
    std::fs::create_dir_all(tree.join("data")).unwrap();
    std::fs::write(tree.join("data/input.txt"), "input data\n").unwrap();
    std::fs::write(
        tree.join("job.sh"),
        "#!/bin/sh\nmkdir -p out/sub\necho \"$GREETING from $SKYWARD_NODE_ID\" > out/sub/hello.txt\ncp data/input.txt out/copy.txt\n",
    )
    .unwrap();
    std::fs::set_permissions(tree.join("job.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let env_file = sandbox.path().join("job.env");
    std::fs::write(&env_file, "# settings\nexport GREETING=\"hello world\"\n").unwrap();
    let downloads = sandbox.path().join("results");

    let out = run(
        sandbox
            .skyward()
            .args(["run", "--nodes", "2", "--on", "all", "--workdir"])
            .arg(&tree)
            .arg("--env-file")
            .arg(&env_file)
            .args([
                "--download",
                "out/",
                "--download",
                "absent.txt",
                "--download-to",
            ])
            .arg(&downloads)
            .args(["--", "./job.sh"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    for node in ["node-1", "node-2"] {
        let hello = std::fs::read_to_string(downloads.join(node).join("out/sub/hello.txt"))
            .unwrap_or_else(|e| panic!("{node}: {e}: {out:?}"));
        assert_eq!(hello, format!("hello world from {node}\n"));
        let copy = std::fs::read_to_string(downloads.join(node).join("out/copy.txt")).unwrap();
        assert_eq!(copy, "input data\n");
        // The local node dialed in, so the contents came over the coordinator's TCP port.
        let synced = out
            .stderr
            .lines()
            .find(|l| l.contains(&format!("{node}: workdir synced")));
        assert!(
            synced.is_some_and(|l| l.ends_with("s over TCP")),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr
                .contains(&format!("{node}: nothing to download at absent.txt")),
            "{}",
            out.stderr
        );
    }
    assert!(!downloads.join("node-1/absent.txt").exists());
}

#[test]
fn bad_download_paths_workdirs_and_env_files_are_refused_before_anything_starts() {
    let sandbox = Sandbox::new();
    for (args, expect) in [
        (
            vec!["--download", "../outside"],
            "--download \"../outside\"",
        ),
        (vec!["--download", "/etc/passwd"], "is absolute"),
        (
            vec!["--workdir", "/nonexistent/dir"],
            "--workdir /nonexistent/dir is not a directory",
        ),
    ] {
        let out = run(
            sandbox
                .skyward()
                .arg("run")
                .args(&args)
                .args(["--", "true"]),
            LIMIT,
        );
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    }

    let env_file = sandbox.path().join("bad.env");
    std::fs::write(&env_file, "A=1\n# fine\nTOKEN='sup3r-secret-value\n").unwrap();
    let out = run(
        sandbox
            .skyward()
            .args(["run", "--env-file"])
            .arg(&env_file)
            .args(["--", "true"]),
        LIMIT,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains(&format!("{}:3:", env_file.display())),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("sup3r"), "the value reached the error");
    assert!(
        !sandbox.path().join("home/pools").exists()
            || std::fs::read_dir(sandbox.path().join("home/pools"))
                .unwrap()
                .next()
                .is_none(),
        "a pool was made"
    );
}

/// Where the node's firewall passes the QUIC port but drops every TCP packet, a sync waits
/// out its dial of the TCP port and takes the contents on the QUIC stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_takes_the_quic_stream_where_the_tcp_port_cannot_be_reached() {
    use skyward_coordinator::{Coordinator, CoordinatorConfig};
    let sandbox = Sandbox::new();
    let net = skyward_tests::netns::TestNet::create().expect("a network namespace for the node");
    net.exec(&["iptables", "-A", "OUTPUT", "-p", "tcp", "-j", "DROP"])
        .expect("a firewall rule in the node's namespace (install iptables)");
    skyward_common::install_crypto_provider();
    let coordinator = Coordinator::start(CoordinatorConfig {
        pool: "bulk-fallback".into(),
        bind: (net.host_ip, 0).into(),
        state_dir: None,
    })
    .unwrap();
    let mut argv = net.exec_prefix();
    argv.push(skyward_tests::bin("skyward-agent").display().to_string());
    let mut agent = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .args(["--coordinator", &coordinator.local_addr().to_string()])
        .args(["--ca-pin", &coordinator.ca_pin(), "--node-id", "node-1"])
        .args(["--lease", "1m"])
        .arg("--work-dir")
        .arg(sandbox.path().join("node-1"))
        .env("SKYWARD_TOKEN", coordinator.issue_token("node-1"))
        .stderr(std::fs::File::create(sandbox.path().join("node-1.log")).unwrap())
        .spawn()
        .unwrap();
    let node = wait_connected(&coordinator, "node-1").await;
    let tree = sandbox.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("data.bin"), noise(3 << 20, 7)).unwrap();
    let synced = tokio::time::timeout(LIMIT, sync_workdir(&coordinator, &[node], &tree, &[]))
        .await
        .expect("the sync finished")
        .unwrap();
    let report = &synced.nodes[0];
    assert_eq!(report.sent_files, 1, "{report:?}");
    assert!(!report.over_tcp, "{report:?}");
    let copy = sandbox.path().join("node-1").join(&synced.dir);
    assert_eq!(
        sha256_file(&copy.join("data.bin")),
        sha256_file(&tree.join("data.bin"))
    );
    let log = std::fs::read_to_string(sandbox.path().join("node-1.log")).unwrap();
    assert!(log.contains("taking the contents over QUIC"), "{log}");
    let _ = agent.kill();
    let _ = agent.wait();
    coordinator.close().await;
}
