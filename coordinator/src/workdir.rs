//! Code and data: a working tree synced to every node before a job ([`sync_workdir`]), and
//! files brought back from a node after it ([`download`]).
//!
//! A sync sends each node the tree's manifest (paths, modes, sizes, SHA-256 of contents,
//! link targets; `.gitignore` honoured, `.git/` left out) unless the node kept it, then only
//! the contents the node's cache lacks, in zstd-compressed chunks (sent as they are when
//! they do not shrink). The node writes the tree out to `workdir/<tree sha256>/` in its work
//! dir, which becomes the tasks' cwd. The wire format is in `skyward_common::workdir`.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::RecvStream;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use skyward_common::frame::{encode_frame, read_frame};
use skyward_common::limits::{
    MAX_DOWNLOAD_ENTRIES, MAX_SYNC_ENTRIES, MAX_TASK_FRAME, SYNC_CHUNK, SYNC_ENTRIES_FRAME,
    TRANSFER_IDLE_TIMEOUT, WORKDIR_CACHE_MAX,
};
use skyward_common::protocol::{TaskId, TaskKind, TaskSpec};
use skyward_common::workdir::{
    check_relative_path, check_symlink_target, tree_digest, Chunk, Digest, DownloadEvent,
    DownloadSpec, EntryKind, Packer, SyncEvent, SyncRequest, SyncStart, TreeEntry,
};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::server::{Coordinator, NodeHandle};

/// A local directory as it will be synced: its manifest and where its files are.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    entries: Vec<TreeEntry>,
    digest: Digest,
    bytes: u64,
}

impl Tree {
    /// Walks `root` (honouring `.gitignore`, `.ignore` and git's excludes, leaving `.git/`
    /// out, following no link) and hashes every file. Blocking.
    pub fn scan(root: &Path) -> Result<Tree, String> {
        Self::scan_excluding(root, &[])
    }

    /// [`Tree::scan`], leaving out `exclude` too where it lies inside `root` (the downloads
    /// folder, lest results travel back out on the next run).
    pub fn scan_excluding(root: &Path, exclude: &[PathBuf]) -> Result<Tree, String> {
        let shown = root.display();
        let meta = std::fs::metadata(root).map_err(|e| format!("--workdir {shown}: {e}"))?;
        if !meta.is_dir() {
            return Err(format!(
                "--workdir {shown} is not a directory: give the directory to sync"
            ));
        }
        let root = &std::fs::canonicalize(root).map_err(|e| format!("--workdir {shown}: {e}"))?;
        let exclude: Vec<PathBuf> = exclude
            .iter()
            .filter_map(|p| {
                std::fs::canonicalize(p)
                    .or_else(|_| std::path::absolute(p))
                    .ok()
            })
            .collect();
        let walk = ignore::WalkBuilder::new(root)
            .hidden(false)
            .require_git(false)
            .follow_links(false)
            .filter_entry(move |entry| {
                entry.file_name() != ".git" && !exclude.iter().any(|e| e == entry.path())
            })
            .sort_by_file_name(|a, b| a.cmp(b))
            .build();
        let mut entries = Vec::new();
        let mut bytes: u64 = 0;
        for item in walk {
            let item = item.map_err(|e| format!("--workdir {shown}: {e}"))?;
            if item.depth() == 0 {
                continue;
            }
            let rel = item
                .path()
                .strip_prefix(root)
                .map_err(|e| format!("--workdir {shown}: {e}"))?;
            let path = rel
                .to_str()
                .ok_or_else(|| {
                    format!(
                        "--workdir: {} is not UTF-8: rename it or add it to .gitignore",
                        item.path().display()
                    )
                })?
                .to_string();
            check_relative_path(&path)
                .map_err(|why| format!("--workdir: {why}: rename it or add it to .gitignore"))?;
            let Some(file_type) = item.file_type() else {
                continue;
            };
            let kind = if file_type.is_dir() {
                EntryKind::Dir
            } else if file_type.is_symlink() {
                let target = std::fs::read_link(item.path())
                    .map_err(|e| format!("{}: {e}", item.path().display()))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| format!("{}: link target is not UTF-8", item.path().display()))?
                    .to_string();
                check_symlink_target(&path, &target).map_err(|why| {
                    format!("--workdir: {why}: links must stay inside the tree; copy what it points at in, or add it to .gitignore")
                })?;
                EntryKind::Symlink { target }
            } else if file_type.is_file() {
                let (size, sha256, mode) = hash_file(item.path())?;
                bytes += size;
                EntryKind::File { mode, size, sha256 }
            } else {
                tracing::warn!("--workdir: left out {path}: not a file, directory or link");
                continue;
            };
            entries.push(TreeEntry { path, kind });
            if entries.len() > MAX_SYNC_ENTRIES as usize {
                return Err(format!(
                    "--workdir {shown} has over {MAX_SYNC_ENTRIES} files and directories: add the ones the job does not need to .gitignore"
                ));
            }
        }
        if bytes > WORKDIR_CACHE_MAX {
            return Err(format!(
                "--workdir {shown} holds {} of files; nodes keep at most {}: add large data to .gitignore and fetch it on the nodes",
                human_bytes(bytes),
                human_bytes(WORKDIR_CACHE_MAX)
            ));
        }
        Ok(Tree {
            root: root.to_path_buf(),
            digest: tree_digest(&entries),
            entries,
            bytes,
        })
    }

    /// The tree's identity: SHA-256 of its manifest, in hex.
    pub fn id(&self) -> String {
        hex::encode(self.digest)
    }

    pub fn entries(&self) -> &[TreeEntry] {
        &self.entries
    }

    /// Sum of the files' sizes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn hash_file(path: &Path) -> Result<(u64, Digest, u32), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(err)?;
    let mode = file.metadata().map_err(err)?.permissions().mode() & 0o777;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finalize().into(), mode))
}

/// What a sync did.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// The tree's id (SHA-256 of its manifest, hex).
    pub tree: String,
    pub files: usize,
    pub bytes: u64,
    /// Where the tree is on every node, relative to the agent's work dir: the tasks' cwd.
    pub dir: String,
    pub nodes: Vec<NodeSync>,
}

/// What one node's sync sent.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSync {
    pub node: String,
    /// Files whose contents were sent (the node's cache had the rest).
    pub sent_files: usize,
    /// Bytes put on the stream: manifest, contents (compressed) and framing.
    pub sent_bytes: u64,
    /// The contents went over the TCP port (the node dialed it), not the QUIC stream.
    pub over_tcp: bool,
    pub seconds: f64,
}

/// Scans `root` (leaving `exclude` out) and syncs it to every node of `nodes` at once.
pub async fn sync_workdir(
    coordinator: &Coordinator,
    nodes: &[NodeHandle],
    root: &Path,
    exclude: &[PathBuf],
) -> Result<SyncReport, String> {
    let (root, exclude) = (root.to_path_buf(), exclude.to_vec());
    let tree = tokio::task::spawn_blocking(move || Tree::scan_excluding(&root, &exclude))
        .await
        .map_err(|e| format!("scanning the workdir: {e}"))??;
    sync_tree(coordinator, nodes, Arc::new(tree)).await
}

/// Syncs a scanned tree to every node of `nodes` at once; the first failure is the error.
pub async fn sync_tree(
    coordinator: &Coordinator,
    nodes: &[NodeHandle],
    tree: Arc<Tree>,
) -> Result<SyncReport, String> {
    let mut syncs = tokio::task::JoinSet::new();
    for (index, node) in nodes.iter().enumerate() {
        let (node, tree, id) = (node.clone(), tree.clone(), coordinator.next_task_id());
        syncs.spawn(async move { (index, sync_node(&node, &tree, id).await) });
    }
    let mut done: Vec<Option<(String, NodeSync)>> = vec![None; nodes.len()];
    while let Some(joined) = syncs.join_next().await {
        let (index, result) = joined.map_err(|e| format!("sync task failed: {e}"))?;
        done[index] = Some(result?);
    }
    let mut dir = None;
    let mut reports = Vec::new();
    for (node_dir, report) in done.into_iter().flatten() {
        if dir.get_or_insert_with(|| node_dir.clone()) != &node_dir {
            return Err(format!(
                "{} put the tree at {node_dir}, another node at {}: run one agent version on all nodes",
                report.node,
                dir.unwrap_or_default()
            ));
        }
        reports.push(report);
    }
    Ok(SyncReport {
        tree: tree.id(),
        files: tree
            .entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::File { .. }))
            .count(),
        bytes: tree.bytes,
        dir: dir.unwrap_or_default(),
        nodes: reports,
    })
}

/// Writes one frame and returns its size on the wire.
async fn send_frame<T: Serialize, W: AsyncWrite + Unpin>(
    send: &mut W,
    msg: &T,
) -> Result<u64, String> {
    let mut frame = Vec::new();
    encode_frame(msg, &mut frame).map_err(|e| e.to_string())?;
    send.write_all(&frame).await.map_err(|e| e.to_string())?;
    Ok(frame.len() as u64)
}

async fn next_event<T: serde::de::DeserializeOwned>(
    recv: &mut RecvStream,
    wait: Duration,
) -> Result<Option<T>, String> {
    match tokio::time::timeout(wait, read_frame::<_, T>(recv, MAX_TASK_FRAME)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {}s", wait.as_secs())),
    }
}

/// Syncs `tree` to one node; returns where the node put it, and what was sent.
async fn sync_node(node: &NodeHandle, tree: &Tree, id: u64) -> Result<(String, NodeSync), String> {
    let started = Instant::now();
    let name = &node.node_id;
    let fail = |why: String| format!("syncing the workdir to {name}: {why}");
    // Nothing to offer for an empty tree: no contents to send.
    let mut ticket = node.bulk_ticket().filter(|_| tree.bytes > 0);
    let spec = TaskSpec {
        task: TaskId { id, attempt: 0 },
        kind: TaskKind::Sync(SyncStart {
            tree: tree.digest,
            entries: tree.entries.len() as u32,
            bytes: tree.bytes,
            bulk: ticket.as_ref().map(|t| t.offer()),
        }),
        env: Vec::new(),
        timeout_ms: None,
    };
    let (mut send, mut recv, start_bytes) = node
        .open_transfer(spec)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut sent = start_bytes as u64;
    let mut sent_files = 0;
    let mut over_tcp = false;
    let mut manifest_sent = false;
    // Writing a large tree out takes the node a while after the last byte arrives.
    let mut wait = TRANSFER_IDLE_TIMEOUT;
    loop {
        match next_event::<SyncEvent>(&mut recv, wait)
            .await
            .map_err(fail)?
        {
            Some(SyncEvent::NeedManifest) if !manifest_sent => {
                manifest_sent = true;
                let mut batch = Vec::new();
                let mut batch_bytes = 0;
                for entry in &tree.entries {
                    batch_bytes += entry.path.len() + 64;
                    if let EntryKind::Symlink { target } = &entry.kind {
                        batch_bytes += target.len();
                    }
                    batch.push(entry.clone());
                    if batch_bytes >= SYNC_ENTRIES_FRAME / 2 {
                        let entries = SyncRequest::Entries(std::mem::take(&mut batch));
                        sent += send_frame(&mut send, &entries).await.map_err(fail)?;
                        batch_bytes = 0;
                    }
                }
                if !batch.is_empty() {
                    sent += send_frame(&mut send, &SyncRequest::Entries(batch))
                        .await
                        .map_err(fail)?;
                }
            }
            Some(SyncEvent::Want(wanted)) => {
                check_wanted(&tree.entries, &wanted).map_err(fail)?;
                sent_files = wanted.len();
                // The offer, if any, was not taken up.
                ticket = None;
                let sending = send_files(&mut send, tree, wanted).await;
                sent += sent_or_why(sending, &mut recv).await.map_err(fail)?;
                wait = TRANSFER_IDLE_TIMEOUT + Duration::from_secs(tree.bytes / (50 << 20));
            }
            Some(SyncEvent::WantBulk(wanted)) => {
                let offered = ticket.take().ok_or_else(|| {
                    fail("the node asked for the contents over TCP, which was not offered".into())
                })?;
                check_wanted(&tree.entries, &wanted).map_err(fail)?;
                sent_files = wanted.len();
                over_tcp = true;
                let mut tcp = offered.connection().await.map_err(fail)?;
                let sending = async {
                    let bytes = send_files(&mut tcp, tree, wanted).await?;
                    tcp.shutdown().await.map_err(|e| e.to_string())?;
                    Ok(bytes)
                }
                .await;
                sent += sent_or_why(sending, &mut recv).await.map_err(fail)?;
                wait = TRANSFER_IDLE_TIMEOUT + Duration::from_secs(tree.bytes / (50 << 20));
            }
            Some(SyncEvent::Ready { dir }) => {
                check_relative_path(&dir)
                    .map_err(|why| fail(format!("the node put the tree at {why}")))?;
                let _ = send.finish();
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(node = %name, tree = %tree.id(), sent, sent_files, over_tcp, seconds, "workdir synced");
                return Ok((
                    dir,
                    NodeSync {
                        node: name.clone(),
                        sent_files,
                        sent_bytes: sent,
                        over_tcp,
                        seconds,
                    },
                ));
            }
            Some(SyncEvent::Failed(why)) => return Err(fail(why)),
            Some(other) => return Err(fail(format!("unexpected {other:?}"))),
            None => return Err(fail("the node ended the stream".into())),
        }
    }
}

/// The node may only ask for file entries of the manifest, each once, in order.
fn check_wanted(entries: &[TreeEntry], wanted: &[u32]) -> Result<(), String> {
    let mut last = None;
    for &index in wanted {
        if last.is_some_and(|l| index <= l) {
            return Err("the node asked for files out of order".into());
        }
        last = Some(index);
        match entries.get(index as usize) {
            Some(TreeEntry {
                kind: EntryKind::File { .. },
                ..
            }) => {}
            _ => {
                return Err(format!(
                    "the node asked for entry {index}, which is no file"
                ))
            }
        }
    }
    Ok(())
}

/// What sending the contents came to: the bytes sent, or, where it failed, why. A node that
/// gave up says why on the stream before it stops reading, which beats the write's error.
async fn sent_or_why(sending: Result<u64, String>, recv: &mut RecvStream) -> Result<u64, String> {
    match sending {
        Ok(bytes) => Ok(bytes),
        Err(why) => Err(
            match next_event::<SyncEvent>(recv, Duration::from_secs(5)).await {
                Ok(Some(SyncEvent::Failed(reason))) => reason,
                _ => why,
            },
        ),
    }
}

/// Streams the contents of the `wanted` entries: a blocking reader reads and compresses
/// while this sends. Returns the bytes sent.
async fn send_files<W: AsyncWrite + Unpin>(
    send: &mut W,
    tree: &Tree,
    wanted: Vec<u32>,
) -> Result<u64, String> {
    let files: Vec<(PathBuf, u64)> = wanted
        .iter()
        .filter_map(|&i| match &tree.entries[i as usize] {
            TreeEntry {
                path,
                kind: EntryKind::File { size, .. },
            } => Some((tree.root.join(path), *size)),
            _ => None,
        })
        .collect();
    let (tx, mut rx) = mpsc::channel::<Result<Chunk, String>>(8);
    let reader = tokio::task::spawn_blocking(move || {
        for (path, size) in files {
            if let Err(why) = read_chunks(&path, size, &tx) {
                let _ = tx.blocking_send(Err(why));
                return;
            }
        }
    });
    let mut sent = 0;
    while let Some(chunk) = rx.recv().await {
        sent += send_frame(send, &SyncRequest::Chunk(chunk?)).await?;
    }
    let _ = reader.await;
    Ok(sent)
}

/// Reads exactly `size` bytes of `path` into packed chunks.
fn read_chunks(
    path: &Path,
    size: u64,
    chunks: &mpsc::Sender<Result<Chunk, String>>,
) -> Result<(), String> {
    let changed = || format!("{} changed while syncing: run again", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut packer = Packer::default();
    let mut buf = vec![0u8; SYNC_CHUNK];
    let mut left = size;
    while left > 0 {
        let want = left.min(SYNC_CHUNK as u64) as usize;
        file.read_exact(&mut buf[..want]).map_err(|_| changed())?;
        if chunks.blocking_send(Ok(packer.pack(&buf[..want]))).is_err() {
            return Ok(());
        }
        left -= want as u64;
    }
    Ok(())
}

/// What a download brought back from one node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DownloadReport {
    pub node: String,
    /// Where the files are: `<download-to>/<node id>`.
    pub into: PathBuf,
    pub files: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// Requested paths the node did not have, and why.
    pub missing: Vec<(String, String)>,
    /// Times the download started over after its connection broke.
    pub restarts: u32,
}

/// How many times one node's download is tried when its connection breaks partway; each
/// try starts over (the files already written are written again).
const DOWNLOAD_ATTEMPTS: u32 = 3;

/// Brings `paths` (relative to `cwd` in the node's work dir; files or whole directories) back
/// from `node` into `into` (`<download-to>/<node id>`), keeping their relative paths; at most
/// `limit` bytes. Every path received is checked to lie under a requested one, and nothing is
/// written through a link. A download whose connection breaks starts over once the node is
/// back (waiting up to `reconnect_wait`, the coordinator's node timeout), up to
/// 3 tries in all.
pub async fn download(
    node: &NodeHandle,
    cwd: Option<&str>,
    paths: &[String],
    into: &Path,
    limit: u64,
    reconnect_wait: Duration,
) -> Result<DownloadReport, String> {
    let name = node.node_id.clone();
    let fail = |why: String| format!("downloading from {name}: {why}");
    let requested: Vec<String> = paths
        .iter()
        .map(|p| check_download_path(p))
        .collect::<Result<_, _>>()?;
    std::fs::create_dir_all(into).map_err(|e| fail(format!("{}: {e}", into.display())))?;
    let mut restarts = 0;
    loop {
        node.wait_connected(reconnect_wait)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let connection = node.connection_id();
        match download_once(node, cwd, &requested, into, limit).await {
            Ok(mut report) => {
                report.node = name;
                report.into = into.to_path_buf();
                report.restarts = restarts;
                return Ok(report);
            }
            // Whatever the transfer said as it broke off (a stream reset, a file cut short),
            // the cause was its connection.
            Err(why)
                if (node.connection_id() != connection || !node.is_connected())
                    && restarts + 1 < DOWNLOAD_ATTEMPTS =>
            {
                restarts += 1;
                tracing::info!(node = %name, "the download's connection broke ({why}); starting it over once the node is back");
            }
            Err(why) => return Err(fail(why)),
        }
    }
}

/// One try of [`download`]: the files as they come, or why it stopped.
async fn download_once(
    node: &NodeHandle,
    cwd: Option<&str>,
    requested: &[String],
    into: &Path,
    limit: u64,
) -> Result<DownloadReport, String> {
    let spec = TaskSpec {
        task: TaskId { id: 0, attempt: 0 },
        kind: TaskKind::Download(DownloadSpec {
            cwd: cwd.map(str::to_string),
            paths: requested.to_vec(),
            limit,
        }),
        env: Vec::new(),
        timeout_ms: None,
    };
    let (send, mut recv, _) = node.open_transfer(spec).await.map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<DownloadEvent>(8);
    let writer = {
        let (into, requested) = (into.to_path_buf(), requested.to_vec());
        tokio::task::spawn_blocking(move || write_download(&into, &requested, limit, rx))
    };
    let mut failure = None;
    loop {
        match next_event::<DownloadEvent>(&mut recv, TRANSFER_IDLE_TIMEOUT).await {
            Ok(Some(DownloadEvent::Done)) => break,
            Ok(Some(DownloadEvent::Failed(why))) => {
                failure = Some(why);
                break;
            }
            Ok(Some(event)) => {
                if tx.send(event).await.is_err() {
                    break;
                }
            }
            Ok(None) => {
                failure = Some("the node ended the stream before it was done".into());
                break;
            }
            Err(why) => {
                failure = Some(why);
                break;
            }
        }
    }
    drop(tx);
    drop(send);
    let written = writer
        .await
        .unwrap_or_else(|e| Err(format!("download writer failed: {e}")));
    match (written, failure) {
        // The stream's own failure first: a file cut short is its consequence.
        (_, Some(why)) | (Err(why), None) => Err(why),
        (Ok(report), None) => Ok(report),
    }
}

/// A `--download` path checked as given: relative to the task's cwd and never leaving it.
pub fn check_download_path(path: &str) -> Result<String, String> {
    let trimmed = path.trim_end_matches('/');
    check_relative_path(trimmed).map_err(|why| {
        format!("--download {path:?}: {why}: give a path inside the task's directory, e.g. --download out/")
    })?;
    Ok(trimmed.to_string())
}

/// Writes a download's events under `into`, checking each path against the request.
fn write_download(
    into: &Path,
    requested: &[String],
    limit: u64,
    mut events: mpsc::Receiver<DownloadEvent>,
) -> Result<DownloadReport, String> {
    let mut report = DownloadReport::default();
    let mut entries: u64 = 0;
    let mut current: Option<(String, std::fs::File, u64)> = None;
    while let Some(event) = events.blocking_recv() {
        let is_chunk = matches!(event, DownloadEvent::Chunk(_));
        if !is_chunk {
            if let Some((path, _, left)) = &current {
                if *left > 0 {
                    return Err(format!("{path} arrived short by {left} bytes"));
                }
            }
            current = None;
            entries += 1;
            if entries > MAX_DOWNLOAD_ENTRIES {
                return Err(format!("over {MAX_DOWNLOAD_ENTRIES} files and directories"));
            }
        }
        match event {
            DownloadEvent::Dir { path } => {
                check_requested(&path, requested)?;
                make_dirs(into, &path)?;
            }
            DownloadEvent::File { path, mode, size } => {
                check_requested(&path, requested)?;
                if report.bytes.saturating_add(size) > limit {
                    return Err(format!(
                        "{path} would pass the limit of {} (raise --download-limit)",
                        human_bytes(limit)
                    ));
                }
                if let Some((parent, _)) = path.rsplit_once('/') {
                    make_dirs(into, parent)?;
                }
                let dest = into.join(&path);
                if std::fs::symlink_metadata(&dest).is_ok_and(|m| !m.is_file()) {
                    return Err(format!(
                        "{}: already there and not a file: remove it or pick another --download-to",
                        dest.display()
                    ));
                }
                let file = std::fs::File::options()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(|e| format!("{}: {e}", dest.display()))?;
                file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
                    .map_err(|e| format!("{}: {e}", dest.display()))?;
                report.files += 1;
                report.bytes += size;
                current = Some((path, file, size));
            }
            DownloadEvent::Chunk(chunk) => {
                let Some((path, file, left)) = current.as_mut() else {
                    return Err("file contents outside any file".into());
                };
                let due = (*left).min(SYNC_CHUNK as u64) as usize;
                if due == 0 {
                    return Err(format!("{path} arrived longer than announced"));
                }
                let data = chunk.unpack(due).map_err(|why| format!("{path}: {why}"))?;
                file.write_all(&data).map_err(|e| format!("{path}: {e}"))?;
                *left -= data.len() as u64;
            }
            DownloadEvent::Missing { path, why } => {
                check_requested(&path, requested)?;
                report.missing.push((path, why));
            }
            DownloadEvent::Done | DownloadEvent::Failed(_) => {}
        }
    }
    if let Some((path, _, left)) = &current {
        if *left > 0 {
            return Err(format!("{path} arrived short by {left} bytes"));
        }
    }
    Ok(report)
}

/// A received path must be safe and one of the requested paths or under one.
fn check_requested(path: &str, requested: &[String]) -> Result<(), String> {
    check_relative_path(path).map_err(|why| format!("the node sent {why}"))?;
    let under = requested.iter().any(|r| {
        path == r
            || path
                .strip_prefix(r.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    });
    if !under {
        return Err(format!("the node sent {path:?}, which was not asked for"));
    }
    Ok(())
}

/// Makes `into/path` a directory, refusing to go through any link on the way.
fn make_dirs(into: &Path, path: &str) -> Result<(), String> {
    let mut dir = into.to_path_buf();
    for part in path.split('/') {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                "{}: already there and not a directory: remove it or pick another --download-to",
                dir.display()
            ))
            }
            Err(_) => std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?,
        }
    }
    Ok(())
}

/// Downloads from each node in turn; each report, or the first error.
pub async fn download_all(
    nodes: &[NodeHandle],
    cwd: Option<&str>,
    paths: &[String],
    download_to: &Path,
    limit: u64,
    reconnect_wait: Duration,
) -> Result<Vec<DownloadReport>, String> {
    let mut reports = Vec::new();
    for node in nodes {
        let into = download_to.join(&node.node_id);
        reports.push(download(node, cwd, paths, &into, limit, reconnect_wait).await?);
    }
    Ok(reports)
}

/// Parses a size: bytes, or with a unit (`500M`, `10GiB`, `2g`; powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: write e.g. 500M or 10GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{text:?} is not a size: write e.g. 500M or 10GiB")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `1.5 GiB`, `200.0 MiB`, `12 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// What a sync sent to each node, as run events.
pub fn sync_events(report: &SyncReport) -> Vec<crate::run::RunEvent> {
    report
        .nodes
        .iter()
        .map(|node| crate::run::RunEvent::Transfer {
            line: format!(
                "{}: workdir synced ({} files, {}): sent {} files, {} in {:.1}s{}",
                node.node,
                report.files,
                human_bytes(report.bytes),
                node.sent_files,
                human_bytes(node.sent_bytes),
                node.seconds,
                if node.over_tcp { " over TCP" } else { "" }
            ),
            json: serde_json::json!({
                "event": "workdir_synced",
                "node": node.node,
                "tree": report.tree,
                "files": report.files,
                "bytes": report.bytes,
                "sent_files": node.sent_files,
                "sent_bytes": node.sent_bytes,
                "over_tcp": node.over_tcp,
                "seconds": node.seconds,
            })
            .to_string(),
        })
        .collect()
}

/// What each node sent back, and the paths it lacked, as run events.
pub fn download_events(downloads: &[DownloadReport]) -> Vec<crate::run::RunEvent> {
    let mut events = Vec::new();
    for download in downloads {
        for (path, why) in &download.missing {
            events.push(crate::run::RunEvent::Transfer {
                line: format!("{}: nothing to download at {path}: {why}", download.node),
                json: serde_json::json!({
                    "event": "download_missing",
                    "node": download.node,
                    "path": path,
                    "why": why,
                })
                .to_string(),
            });
        }
        let restarted = match download.restarts {
            0 => String::new(),
            n => format!(" (started over {n} time(s): its connection broke)"),
        };
        events.push(crate::run::RunEvent::Transfer {
            line: format!(
                "{}: downloaded {} files ({}) into {}{restarted}",
                download.node,
                download.files,
                human_bytes(download.bytes),
                download.into.display()
            ),
            json: serde_json::json!({
                "event": "downloaded",
                "node": download.node,
                "files": download.files,
                "bytes": download.bytes,
                "into": download.into,
                "restarts": download.restarts,
            })
            .to_string(),
        });
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_honours_gitignore_and_keeps_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("src/deep")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref").unwrap();
        std::fs::write(root.join(".gitignore"), "*.log\nbuild/\n").unwrap();
        std::fs::write(root.join("debug.log"), "noise").unwrap();
        std::fs::create_dir_all(root.join("build")).unwrap();
        std::fs::write(root.join("build/out.o"), "obj").unwrap();
        std::fs::write(root.join("src/deep/a.txt"), "a").unwrap();
        std::fs::write(root.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("src/deep/a.txt", root.join("a")).unwrap();
        let tree = Tree::scan(root).unwrap();
        let paths: Vec<&str> = tree.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                ".gitignore",
                "a",
                "run.sh",
                "src",
                "src/deep",
                "src/deep/a.txt"
            ]
        );
        assert!(tree
            .entries()
            .iter()
            .any(|e| e.path == "run.sh" && matches!(e.kind, EntryKind::File { mode: 0o755, .. })));
        assert_eq!(tree.bytes(), 13 + 1 + 10);
        // The same tree scanned again is the same tree, and a downloads folder inside it
        // (given relative to where skyward runs, as --download-to is) stays out.
        assert_eq!(Tree::scan(root).unwrap().id(), tree.id());
        std::fs::create_dir_all(root.join("results/node-1")).unwrap();
        std::fs::write(root.join("results/node-1/out.txt"), "result").unwrap();
        assert_ne!(Tree::scan(root).unwrap().id(), tree.id());
        let relative = root.join("src/../results");
        assert_eq!(
            Tree::scan_excluding(root, &[relative]).unwrap().id(),
            tree.id()
        );
        std::fs::remove_dir_all(root.join("results")).unwrap();

        std::os::unix::fs::symlink("../../etc", root.join("out")).unwrap();
        let err = Tree::scan(root).unwrap_err();
        assert!(err.contains("out") && err.contains(".gitignore"), "{err}");
    }

    #[test]
    fn received_paths_stay_under_what_was_asked() {
        let asked = vec!["out".to_string()];
        assert!(check_requested("out", &asked).is_ok());
        assert!(check_requested("out/a/b", &asked).is_ok());
        for bad in ["outside", "other/x", "../out", "/out", "out/../x"] {
            assert!(check_requested(bad, &asked).is_err(), "{bad}");
        }
        assert!(check_download_path("../x").is_err());
        assert!(check_download_path("/abs").is_err());
        assert_eq!(check_download_path("out/").unwrap(), "out");
    }

    #[test]
    fn downloads_never_write_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let into = dir.path().join("node-1");
        std::fs::create_dir(&into).unwrap();
        std::os::unix::fs::symlink(&outside, into.join("out")).unwrap();
        let (tx, rx) = mpsc::channel(8);
        tx.try_send(DownloadEvent::File {
            path: "out/x".into(),
            mode: 0o644,
            size: 1,
        })
        .unwrap();
        tx.try_send(DownloadEvent::Chunk(Packer::default().pack(b"x")))
            .unwrap();
        drop(tx);
        let err = write_download(&into, &["out".into()], 100, rx).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert_eq!(human_bytes(200 << 20), "200.0 MiB");
    }
}
