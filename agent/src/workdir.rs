//! The node's side of working-tree syncs and downloads (see `skyward_common::workdir`).
//!
//! Synced files live in a content-addressed cache in the work dir
//! (`.skyward-cache/blobs/<sha256>`), so a file this node already has is never sent again;
//! each sync writes its tree out afresh, as copies, to `workdir/<tree sha256>/` (a task may
//! change its files without touching the cache). The cache is pruned after each sync: past
//! [`WORKDIR_CACHE_MAX`] bytes the files used least recently go (never the current tree's),
//! and only the latest [`WORKDIR_TREES_KEPT`] written-out trees stay.
//!
//! Nothing the coordinator sends is trusted: every path and link is checked before anything
//! is written ([`validate_manifest`]), each file's bytes must match its declared size and
//! hash, and trees are written into a fresh directory where only checked directories exist,
//! so no write follows a link.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use quinn::{RecvStream, SendStream};
use rustls_pki_types::ServerName;
use sha2::{Digest as _, Sha256};
use skyward_common::frame::{read_frame, write_frame};
use skyward_common::limits::{
    BULK_DIAL_TIMEOUT, MAX_SYNC_ENTRIES, MAX_SYNC_PATH, MAX_TASK_FRAME, SYNC_CHUNK,
    TRANSFER_IDLE_TIMEOUT, WORKDIR_CACHE_MAX, WORKDIR_TREES_KEPT,
};
use skyward_common::protocol::COORDINATOR_SERVER_NAME;
use skyward_common::transport;
use skyward_common::workdir::{
    check_relative_path, check_symlink_target, tree_digest, BulkOffer, Chunk, Digest,
    DownloadEvent, DownloadSpec, EntryKind, Packer, SyncEvent, SyncRequest, SyncStart, TreeEntry,
};
use tokio::io::{AsyncRead, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Most bytes of manifest (paths and link targets) one sync may hold in memory.
const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;
/// Manifests kept in the cache (the latest ones), so an unchanged tree needs none sent.
const MANIFESTS_KEPT: usize = 64;
/// Left-over partial files older than this are from a sync that died; they go.
const STALE_INCOMING: Duration = Duration::from_secs(3600);
/// Most paths one download may ask for.
const MAX_DOWNLOAD_PATHS: usize = 1024;

/// How to reach the coordinator's TCP port for a sync's contents.
#[derive(Debug, Clone)]
pub struct BulkDial {
    /// The address this session's connection reaches the coordinator at.
    pub coordinator: IpAddr,
    /// The pool CA's pin, which the coordinator's certificate must chain to.
    pub ca_pin: String,
}

/// Serves one sync stream to its end: answers `Ready` or `Failed`.
pub async fn serve_sync(
    start: SyncStart,
    mut send: SendStream,
    mut recv: RecvStream,
    work_dir: PathBuf,
    bulk: &BulkDial,
) {
    let tree = hex::encode(start.tree);
    let event = match sync(start, &mut send, &mut recv, &work_dir, bulk).await {
        Ok(dir) => {
            tracing::info!(%tree, %dir, "working tree synced");
            SyncEvent::Ready { dir }
        }
        Err(why) => {
            tracing::warn!(%tree, "sync failed: {why}");
            SyncEvent::Failed(why)
        }
    };
    if write_frame(&mut send, &event).await.is_ok() {
        let _ = send.finish();
        // Wait for the coordinator to read the answer before the stream goes.
        let _ = tokio::time::timeout(TRANSFER_IDLE_TIMEOUT, send.stopped()).await;
    }
}

async fn sync(
    start: SyncStart,
    send: &mut SendStream,
    recv: &mut RecvStream,
    work_dir: &Path,
    bulk: &BulkDial,
) -> Result<String, String> {
    if start.entries > MAX_SYNC_ENTRIES {
        return Err(format!(
            "a tree of {} entries; the limit is {MAX_SYNC_ENTRIES}",
            start.entries
        ));
    }
    if start.bytes > WORKDIR_CACHE_MAX {
        return Err(format!(
            "a tree of {} bytes; this node's cache holds at most {WORKDIR_CACHE_MAX}",
            start.bytes
        ));
    }
    let cache = Cache::open(work_dir)?;
    let kept = {
        let cache = cache.clone();
        blocking(move || Ok(cache.manifest(&start.tree))).await?
    };
    let entries = match kept {
        Some(entries) => {
            validate_manifest(&start, &entries)?;
            entries
        }
        None => {
            write_frame(send, &SyncEvent::NeedManifest)
                .await
                .map_err(|e| format!("sending to the coordinator: {e}"))?;
            let entries = receive_manifest(&start, recv).await?;
            validate_manifest(&start, &entries)?;
            let (cache, entries) = (cache.clone(), entries);
            blocking(move || {
                cache.keep_manifest(&start.tree, &entries)?;
                Ok(entries)
            })
            .await?
        }
    };
    let entries = std::sync::Arc::new(entries);
    let wanted = {
        let (cache, entries) = (cache.clone(), entries.clone());
        blocking(move || Ok(cache.wanted(&entries))).await?
    };
    let over_tcp = match &start.bulk {
        Some(offer) if !wanted.is_empty() => match dial_bulk(offer, bulk, work_dir).await {
            Ok(tcp) => Some(tcp),
            Err(why) => {
                tracing::info!(
                    "the coordinator's TCP port {}: {why}; taking the contents over QUIC",
                    offer.port
                );
                None
            }
        },
        _ => None,
    };
    let sent_to = |e: skyward_common::frame::FrameError| format!("sending to the coordinator: {e}");
    match over_tcp {
        Some(mut tcp) => {
            write_frame(send, &SyncEvent::WantBulk(wanted.clone()))
                .await
                .map_err(sent_to)?;
            receive_files(&cache, &entries, wanted, &mut tcp).await?;
        }
        None => {
            write_frame(send, &SyncEvent::Want(wanted.clone()))
                .await
                .map_err(sent_to)?;
            if !wanted.is_empty() {
                receive_files(&cache, &entries, wanted, recv).await?;
            }
        }
    }
    let tree = hex::encode(start.tree);
    let work_dir = work_dir.to_path_buf();
    blocking(move || {
        let dir = materialise(&cache, &work_dir, &tree, &entries)?;
        cache.prune(&work_dir, &tree, &entries);
        Ok(dir)
    })
    .await
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(format!("sync worker failed: {e}")))
}

/// Dials the coordinator's TCP port as `offer` says, shows the node's certificate, and
/// names the sync with the offer's ticket; within [`BULK_DIAL_TIMEOUT`].
async fn dial_bulk(
    offer: &BulkOffer,
    bulk: &BulkDial,
    work_dir: &Path,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let identity = crate::enroll::load(work_dir)
        .map_err(|e| format!("the node's certificate: {e:#}"))?
        .ok_or("this node has no certificate of its own")?;
    let tls = transport::bulk_client_config(&bulk.ca_pin, &identity).map_err(|e| e.to_string())?;
    let address = SocketAddr::new(bulk.coordinator, offer.port);
    let name = ServerName::try_from(COORDINATOR_SERVER_NAME).map_err(|e| e.to_string())?;
    let dial = async {
        let tcp = TcpStream::connect(address).await?;
        tcp.set_nodelay(true)?;
        let mut stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        stream.write_all(&offer.ticket).await?;
        stream.flush().await?;
        std::io::Result::Ok(stream)
    };
    match tokio::time::timeout(BULK_DIAL_TIMEOUT, dial).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", BULK_DIAL_TIMEOUT.as_secs())),
    }
}

async fn next_request<R: AsyncRead + Unpin>(recv: &mut R) -> Result<Option<SyncRequest>, String> {
    match tokio::time::timeout(
        TRANSFER_IDLE_TIMEOUT,
        read_frame::<_, SyncRequest>(recv, MAX_TASK_FRAME),
    )
    .await
    {
        Ok(Ok(request)) => Ok(request),
        Ok(Err(e)) => Err(format!("reading from the coordinator: {e}")),
        Err(_) => Err(format!(
            "the coordinator sent nothing for {}s",
            TRANSFER_IDLE_TIMEOUT.as_secs()
        )),
    }
}

async fn receive_manifest(
    start: &SyncStart,
    recv: &mut RecvStream,
) -> Result<Vec<TreeEntry>, String> {
    let mut entries: Vec<TreeEntry> = Vec::new();
    let mut held = 0usize;
    while entries.len() < start.entries as usize {
        match next_request(recv).await? {
            Some(SyncRequest::Entries(more)) => {
                if entries.len() + more.len() > start.entries as usize {
                    return Err(format!(
                        "the manifest has more entries than the {} announced",
                        start.entries
                    ));
                }
                for entry in &more {
                    held += entry_bytes(entry);
                }
                if held > MAX_MANIFEST_BYTES {
                    return Err(format!(
                        "the manifest holds over {MAX_MANIFEST_BYTES} bytes of paths"
                    ));
                }
                entries.extend(more);
            }
            Some(SyncRequest::Chunk(_)) => return Err("file contents before the manifest".into()),
            None => return Err("the stream ended in the middle of the manifest".into()),
        }
    }
    Ok(entries)
}

fn entry_bytes(entry: &TreeEntry) -> usize {
    let target = match &entry.kind {
        EntryKind::Symlink { target } => target.len(),
        _ => 0,
    };
    entry.path.len() + target + 64
}

/// Checks a manifest against its announcement before anything is written: its digest, its
/// size, every path (relative, no `..`, no NUL, within limits, no duplicates), that every
/// entry's parent is a directory listed before it (so nothing is written through a link),
/// and that every link stays inside the tree.
pub fn validate_manifest(start: &SyncStart, entries: &[TreeEntry]) -> Result<(), String> {
    if entries.len() != start.entries as usize {
        return Err(format!(
            "{} manifest entries where {} were announced",
            entries.len(),
            start.entries
        ));
    }
    if tree_digest(entries) != start.tree {
        return Err("the manifest does not match the tree's digest".into());
    }
    let mut dirs: HashSet<&str> = HashSet::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut total: u64 = 0;
    for entry in entries {
        let path = entry.path.as_str();
        check_relative_path(path)?;
        if !seen.insert(path) {
            return Err(format!("{path:?} is listed twice"));
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !dirs.contains(parent) {
                return Err(format!(
                    "{path:?} comes before its directory {parent:?} (or that is no directory)"
                ));
            }
        }
        match &entry.kind {
            EntryKind::Dir => {
                dirs.insert(path);
            }
            EntryKind::File { mode, size, .. } => {
                if mode & !0o777 != 0 {
                    return Err(format!(
                        "{path:?} has mode {mode:o}; only 0o777 bits are kept"
                    ));
                }
                total = total.saturating_add(*size);
            }
            EntryKind::Symlink { target } => check_symlink_target(path, target)?,
        }
    }
    if total != start.bytes {
        return Err(format!(
            "the manifest's files add up to {total} bytes where {} were announced",
            start.bytes
        ));
    }
    Ok(())
}

/// Receives the wanted files' contents into the cache: the network is read here while a
/// blocking worker checks, hashes and writes them.
async fn receive_files<R: AsyncRead + Unpin>(
    cache: &Cache,
    entries: &std::sync::Arc<Vec<TreeEntry>>,
    wanted: Vec<u32>,
    recv: &mut R,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<Chunk>(8);
    let writer = {
        let (cache, entries) = (cache.clone(), entries.clone());
        tokio::task::spawn_blocking(move || cache.receive(&entries, &wanted, rx))
    };
    let mut failure = None;
    loop {
        tokio::select! {
            // The worker has everything it wanted (or gave up): stop reading.
            _ = tx.closed() => break,
            request = next_request(recv) => match request {
                Ok(Some(SyncRequest::Chunk(chunk))) => {
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Ok(Some(SyncRequest::Entries(_))) => {
                    failure = Some("manifest entries among file contents".to_string());
                    break;
                }
                // The worker says what was missing.
                Ok(None) => break,
                Err(why) => {
                    failure = Some(why);
                    break;
                }
            },
        }
    }
    drop(tx);
    let written = writer
        .await
        .unwrap_or_else(|e| Err(format!("sync worker failed: {e}")));
    match (written, failure) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(why)) => Err(why),
        (Err(why), None) => Err(why),
    }
}

/// The content cache in a work dir: `blobs/<sha256>` (read-only files) and
/// `manifests/<tree sha256>`.
#[derive(Clone)]
struct Cache {
    blobs: PathBuf,
    manifests: PathBuf,
}

impl Cache {
    fn open(work_dir: &Path) -> Result<Cache, String> {
        let root = work_dir.join(".skyward-cache");
        let cache = Cache {
            blobs: root.join("blobs"),
            manifests: root.join("manifests"),
        };
        for dir in [&cache.blobs, &cache.manifests] {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(cache)
    }

    fn blob(&self, sha256: &Digest) -> PathBuf {
        self.blobs.join(hex::encode(sha256))
    }

    /// A manifest kept by an earlier sync of the same tree, if it is still whole.
    fn manifest(&self, tree: &Digest) -> Option<Vec<TreeEntry>> {
        let path = self.manifests.join(hex::encode(tree));
        let size = std::fs::metadata(&path).ok()?.len();
        if size > (MAX_MANIFEST_BYTES + MAX_SYNC_ENTRIES as usize * 64) as u64 {
            return None;
        }
        let bytes = std::fs::read(&path).ok()?;
        let entries: Vec<TreeEntry> = skyward_common::codec::decode(&bytes).ok()?;
        // A damaged copy is as good as none: the coordinator sends it again.
        (tree_digest(&entries) == *tree).then(|| {
            touch(&path);
            entries
        })
    }

    fn keep_manifest(&self, tree: &Digest, entries: &[TreeEntry]) -> Result<(), String> {
        let bytes = skyward_common::codec::encode(&entries.to_vec()).map_err(|e| e.to_string())?;
        let path = self.manifests.join(hex::encode(tree));
        let partial = self
            .manifests
            .join(format!("incoming-{:016x}", rand::random::<u64>()));
        std::fs::write(&partial, bytes)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&partial);
                format!("{}: {e}", path.display())
            })
    }

    /// Indices of the file entries whose contents the cache lacks (each content once).
    fn wanted(&self, entries: &[TreeEntry]) -> Vec<u32> {
        let mut asked = HashSet::new();
        let mut wanted = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            if let EntryKind::File { size, sha256, .. } = &entry.kind {
                let have = std::fs::metadata(self.blob(sha256))
                    .map(|m| m.len() == *size)
                    .unwrap_or(false);
                if *size > 0 && !have && asked.insert(*sha256) {
                    wanted.push(index as u32);
                }
            }
        }
        wanted
    }

    /// Writes the wanted files from `chunks` into the cache, each checked against its size
    /// and hash before it is kept.
    fn receive(
        &self,
        entries: &[TreeEntry],
        wanted: &[u32],
        mut chunks: mpsc::Receiver<Chunk>,
    ) -> Result<(), String> {
        for &index in wanted {
            let Some(TreeEntry {
                path,
                kind: EntryKind::File { size, sha256, .. },
            }) = entries.get(index as usize)
            else {
                return Err(format!("wanted entry {index} is no file"));
            };
            let partial = Partial::create(&self.blobs)?;
            let mut file = &partial.file;
            let mut hasher = Sha256::new();
            let mut got: u64 = 0;
            while got < *size {
                let chunk = chunks
                    .blocking_recv()
                    .ok_or_else(|| format!("the stream ended in the middle of {path}"))?;
                let due = (*size - got).min(SYNC_CHUNK as u64) as usize;
                let data = chunk.unpack(due).map_err(|why| format!("{path}: {why}"))?;
                hasher.update(&data);
                file.write_all(&data)
                    .map_err(|e| format!("writing {path} into the cache: {e}"))?;
                got += data.len() as u64;
            }
            if <[u8; 32]>::from(hasher.finalize()) != *sha256 {
                return Err(format!(
                    "{path}: contents do not match their hash (did the file change while syncing?)"
                ));
            }
            partial.keep(&self.blob(sha256))?;
        }
        Ok(())
    }

    /// Removes what this node no longer needs: written-out trees past the latest
    /// [`WORKDIR_TREES_KEPT`], manifests past [`MANIFESTS_KEPT`], and cached files (never
    /// the current tree's) past [`WORKDIR_CACHE_MAX`] bytes, least recently used first.
    fn prune(&self, work_dir: &Path, current: &str, entries: &[TreeEntry]) {
        let trees = work_dir.join("workdir");
        let mut old_trees: Vec<(SystemTime, PathBuf)> = listing(&trees)
            .into_iter()
            .filter(|(name, _, _)| name != current && is_digest_name(name))
            .map(|(_, path, meta)| (modified(&meta), path))
            .collect();
        old_trees.sort_by_key(|tree| std::cmp::Reverse(tree.0));
        for (_, path) in old_trees.iter().skip(WORKDIR_TREES_KEPT.saturating_sub(1)) {
            remove(path);
        }
        for dir in [&trees, &self.blobs, &self.manifests] {
            for (name, path, meta) in listing(dir) {
                if name.starts_with("incoming-") && age(&meta) > STALE_INCOMING {
                    remove(&path);
                }
            }
        }

        let mut manifests: Vec<(SystemTime, PathBuf)> = listing(&self.manifests)
            .into_iter()
            .filter(|(name, _, _)| is_digest_name(name))
            .map(|(_, path, meta)| (modified(&meta), path))
            .collect();
        manifests.sort_by_key(|manifest| std::cmp::Reverse(manifest.0));
        for (_, path) in manifests.iter().skip(MANIFESTS_KEPT) {
            remove(path);
        }

        let in_use: HashSet<String> = entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::File { sha256, .. } => Some(hex::encode(sha256)),
                _ => None,
            })
            .collect();
        let mut blobs: Vec<(SystemTime, u64, String, PathBuf)> = listing(&self.blobs)
            .into_iter()
            .filter(|(name, _, _)| is_digest_name(name))
            .map(|(name, path, meta)| (modified(&meta), meta.len(), name, path))
            .collect();
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        blobs.sort_by_key(|blob| blob.0);
        for (_, size, name, path) in blobs {
            if total <= WORKDIR_CACHE_MAX {
                break;
            }
            if !in_use.contains(&name) {
                remove(&path);
                total = total.saturating_sub(size);
            }
        }
    }
}

/// A file being received into a directory: removed unless kept.
struct Partial {
    path: PathBuf,
    file: File,
    kept: bool,
}

impl Partial {
    fn create(dir: &Path) -> Result<Partial, String> {
        let path = dir.join(format!("incoming-{:016x}", rand::random::<u64>()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Partial {
            path,
            file,
            kept: false,
        })
    }

    /// Makes the file read-only and moves it to `to`.
    fn keep(mut self, to: &Path) -> Result<(), String> {
        self.file
            .set_permissions(std::fs::Permissions::from_mode(0o444))
            .and_then(|()| std::fs::rename(&self.path, to))
            .map_err(|e| format!("{}: {e}", to.display()))?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes the tree out as `workdir/<tree>` in the work dir (replacing an earlier copy) and
/// returns that path, relative to the work dir. Everything is made in a fresh directory
/// that is renamed into place at the end; links are made last, so no write goes through one.
fn materialise(
    cache: &Cache,
    work_dir: &Path,
    tree: &str,
    entries: &[TreeEntry],
) -> Result<String, String> {
    let trees = work_dir.join("workdir");
    std::fs::create_dir_all(&trees).map_err(|e| format!("{}: {e}", trees.display()))?;
    let fresh = trees.join(format!("incoming-{:016x}", rand::random::<u64>()));
    std::fs::create_dir(&fresh).map_err(|e| format!("{}: {e}", fresh.display()))?;
    let mut cleanup = RemoveOnDrop(Some(fresh.clone()));
    let err = |path: &str, e: std::io::Error| format!("writing {path}: {e}");
    let mut used = HashMap::new();
    for entry in entries {
        let dest = fresh.join(&entry.path);
        match &entry.kind {
            EntryKind::Dir => std::fs::create_dir(&dest).map_err(|e| err(&entry.path, e))?,
            EntryKind::File { mode, size, sha256 } => {
                let mut out = File::options()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(|e| err(&entry.path, e))?;
                if *size > 0 {
                    let blob = cache.blob(sha256);
                    let mut from = File::open(&blob).map_err(|e| err(&entry.path, e))?;
                    // Kernel-side copy (copy_file_range), a reflink where the filesystem can.
                    let copied =
                        std::io::copy(&mut from, &mut out).map_err(|e| err(&entry.path, e))?;
                    if copied != *size {
                        return Err(format!(
                            "{}: the cached copy has {copied} bytes, not {size}",
                            entry.path
                        ));
                    }
                    used.insert(*sha256, blob);
                }
                out.set_permissions(std::fs::Permissions::from_mode(*mode))
                    .map_err(|e| err(&entry.path, e))?;
            }
            EntryKind::Symlink { .. } => {}
        }
    }
    for entry in entries {
        if let EntryKind::Symlink { target } = &entry.kind {
            std::os::unix::fs::symlink(target, fresh.join(&entry.path))
                .map_err(|e| err(&entry.path, e))?;
        }
    }
    // Recently used files are the last the pruning removes.
    for blob in used.values() {
        touch(blob);
    }
    let dest = trees.join(tree);
    if std::fs::symlink_metadata(&dest).is_ok() {
        remove(&dest);
    }
    std::fs::rename(&fresh, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    cleanup.0 = None;
    touch(&dest);
    Ok(format!("workdir/{tree}"))
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            remove(&path);
        }
    }
}

fn is_digest_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `(name, path, metadata)` of each entry of `dir` (none if it cannot be read).
fn listing(dir: &Path) -> Vec<(String, PathBuf, std::fs::Metadata)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            let name = entry.file_name().into_string().ok()?;
            Some((name, entry.path(), meta))
        })
        .collect()
}

fn modified(meta: &std::fs::Metadata) -> SystemTime {
    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

fn age(meta: &std::fs::Metadata) -> Duration {
    SystemTime::now()
        .duration_since(modified(meta))
        .unwrap_or_default()
}

fn touch(path: &Path) {
    if let Ok(file) = File::open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Removes a file, link or whole directory (links are removed, not followed).
fn remove(path: &Path) {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return,
    };
    if let Err(e) = result {
        tracing::warn!("removing {}: {e}", path.display());
    }
}

/// Serves one download stream: every requested path, then `Done` (or `Failed`).
pub async fn serve_download(spec: DownloadSpec, mut send: SendStream, work_dir: PathBuf) {
    let (tx, mut rx) = mpsc::channel::<DownloadEvent>(8);
    let reader = tokio::task::spawn_blocking(move || send_paths(&spec, &work_dir, &tx));
    let mut broken = false;
    while let Some(event) = rx.recv().await {
        if let Err(e) = write_frame(&mut send, &event).await {
            tracing::debug!("download stream broke: {e}");
            broken = true;
            break;
        }
    }
    drop(rx);
    let end = match reader.await {
        Ok(Ok(())) => DownloadEvent::Done,
        Ok(Err(why)) => {
            tracing::warn!("download failed: {why}");
            DownloadEvent::Failed(why)
        }
        Err(e) => DownloadEvent::Failed(format!("download worker failed: {e}")),
    };
    if !broken && write_frame(&mut send, &end).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(TRANSFER_IDLE_TIMEOUT, send.stopped()).await;
    }
}

/// A download path as given, checked: relative to the task's cwd and never leaving it.
pub fn download_path(path: &str) -> Result<String, String> {
    let trimmed = path.trim_end_matches('/');
    check_relative_path(trimmed).map_err(|why| format!("download {path:?}: {why}"))?;
    Ok(trimmed.to_string())
}

/// Reads every requested path into `events`: files and directories, recursively; links and
/// other kinds of files inside them are left out (never followed).
fn send_paths(
    spec: &DownloadSpec,
    work_dir: &Path,
    events: &mpsc::Sender<DownloadEvent>,
) -> Result<(), String> {
    let base = match &spec.cwd {
        Some(cwd) => {
            check_relative_path(cwd).map_err(|why| format!("cwd: {why}"))?;
            work_dir.join(cwd)
        }
        None => work_dir.to_path_buf(),
    };
    if spec.paths.len() > MAX_DOWNLOAD_PATHS {
        return Err(format!(
            "{} paths; at most {MAX_DOWNLOAD_PATHS} per download",
            spec.paths.len()
        ));
    }
    let emit = |event: DownloadEvent| {
        events
            .blocking_send(event)
            .map_err(|_| "the coordinator went away".to_string())
    };
    let mut budget = spec.limit;
    for asked in &spec.paths {
        let path = download_path(asked)?;
        let full = base.join(&path);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(meta) => meta,
            Err(e) => {
                emit(DownloadEvent::Missing {
                    path,
                    why: e.to_string(),
                })?;
                continue;
            }
        };
        if meta.is_file() {
            send_file(&full, &path, &meta, &mut budget, spec.limit, &emit)?;
            continue;
        }
        if !meta.is_dir() {
            emit(DownloadEvent::Missing {
                path,
                why: "not a file or directory (links are not followed)".into(),
            })?;
            continue;
        }
        let mut dirs = vec![(full, path)];
        while let Some((dir, rel)) = dirs.pop() {
            emit(DownloadEvent::Dir { path: rel.clone() })?;
            let mut children: Vec<_> = std::fs::read_dir(&dir)
                .map_err(|e| format!("{rel}: {e}"))?
                .flatten()
                .collect();
            children.sort_by_key(|c| c.file_name());
            for child in children {
                let Ok(name) = child.file_name().into_string() else {
                    tracing::warn!("{rel}: left out a name that is not UTF-8");
                    continue;
                };
                let child_rel = format!("{rel}/{name}");
                if child_rel.len() > MAX_SYNC_PATH {
                    return Err(format!("{child_rel}: path too long"));
                }
                let Ok(meta) = child.metadata() else { continue };
                if meta.is_dir() {
                    dirs.push((child.path(), child_rel));
                } else if meta.is_file() {
                    send_file(
                        &child.path(),
                        &child_rel,
                        &meta,
                        &mut budget,
                        spec.limit,
                        &emit,
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn send_file(
    full: &Path,
    path: &str,
    meta: &std::fs::Metadata,
    budget: &mut u64,
    limit: u64,
    emit: &impl Fn(DownloadEvent) -> Result<(), String>,
) -> Result<(), String> {
    let size = meta.len();
    if size > *budget {
        return Err(format!(
            "{path}: the downloads pass the limit of {limit} bytes (raise --download-limit)"
        ));
    }
    *budget -= size;
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(full)
        .map_err(|e| format!("{path}: {e}"))?;
    emit(DownloadEvent::File {
        path: path.to_string(),
        mode: meta.permissions().mode() & 0o777,
        size,
    })?;
    let mut packer = Packer::default();
    let mut buf = vec![0u8; SYNC_CHUNK];
    let mut left = size;
    while left > 0 {
        let want = left.min(SYNC_CHUNK as u64) as usize;
        let n = file
            .read(&mut buf[..want])
            .map_err(|e| format!("{path}: {e}"))?;
        if n == 0 {
            return Err(format!("{path} shrank while it was being sent"));
        }
        emit(DownloadEvent::Chunk(packer.pack(&buf[..n])))?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, contents: &[u8]) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            kind: EntryKind::File {
                mode: 0o644,
                size: contents.len() as u64,
                sha256: Sha256::digest(contents).into(),
            },
        }
    }

    fn dir(path: &str) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            kind: EntryKind::Dir,
        }
    }

    fn link(path: &str, target: &str) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
        }
    }

    fn announce(entries: &[TreeEntry]) -> SyncStart {
        SyncStart {
            tree: tree_digest(entries),
            entries: entries.len() as u32,
            bytes: entries
                .iter()
                .map(|e| match e.kind {
                    EntryKind::File { size, .. } => size,
                    _ => 0,
                })
                .sum(),
            bulk: None,
        }
    }

    #[test]
    fn a_sound_manifest_passes() {
        let entries = vec![
            dir("src"),
            file("src/main.rs", b"fn main() {}"),
            link("src/lib.rs", "main.rs"),
            link("top", "src/main.rs"),
            dir("src/deep"),
            link("src/deep/up", "../main.rs"),
        ];
        validate_manifest(&announce(&entries), &entries).unwrap();
    }

    #[test]
    fn hostile_manifests_are_refused_without_panicking() {
        let cases: Vec<(&str, Vec<TreeEntry>)> = vec![
            ("`..`", vec![file("../escape", b"x")]),
            ("absolute", vec![file("/etc/passwd", b"x")]),
            ("NUL", vec![file("a\0b", b"x")]),
            ("empty", vec![file("", b"x")]),
            ("dot", vec![dir("a"), file("a/./b", b"x")]),
            ("absolute link", vec![link("a", "/etc")]),
            ("climbing link", vec![link("a", "../outside")]),
            ("deep climbing link", vec![dir("d"), link("d/a", "../../x")]),
            ("climb after a name", vec![dir("d"), link("a", "d/../..")]),
            (
                // A write into `via/x` would follow the link out of the tree.
                "a file under a link",
                vec![link("via", "."), file("via/x", b"x")],
            ),
            (
                "a parent that is a file",
                vec![file("f", b"x"), file("f/g", b"y")],
            ),
            (
                "a parent not listed first",
                vec![file("d/x", b"x"), dir("d")],
            ),
            ("listed twice", vec![file("a", b"x"), file("a", b"x")]),
            (
                "setuid mode",
                vec![TreeEntry {
                    path: "a".into(),
                    kind: EntryKind::File {
                        mode: 0o4755,
                        size: 0,
                        sha256: [0; 32],
                    },
                }],
            ),
            ("a name too long", vec![file(&"n".repeat(300), b"x")]),
            ("a path too long", {
                let mut entries = Vec::new();
                let mut path = String::new();
                while path.len() <= MAX_SYNC_PATH {
                    if !path.is_empty() {
                        path.push('/');
                    }
                    path.push_str(&"d".repeat(200));
                    entries.push(dir(&path));
                }
                entries
            }),
        ];
        for (what, entries) in cases {
            let result = validate_manifest(&announce(&entries), &entries);
            assert!(result.is_err(), "{what} was accepted");
        }

        // An announcement that does not match what follows.
        let entries = vec![file("a", b"xyz")];
        let mut start = announce(&entries);
        start.bytes = 1;
        assert!(validate_manifest(&start, &entries).is_err());
        let mut start = announce(&entries);
        start.tree[0] ^= 1;
        assert!(validate_manifest(&start, &entries).is_err());
        let mut start = announce(&entries);
        start.entries = 2;
        assert!(validate_manifest(&start, &entries).is_err());
    }

    #[test]
    fn a_tree_is_written_out_with_modes_and_links_and_bad_contents_are_refused() {
        let work = tempfile::tempdir().unwrap();
        let cache = Cache::open(work.path()).unwrap();
        let script = b"#!/bin/sh\necho hi\n";
        let mut entries = vec![
            dir("bin"),
            file("bin/run.sh", script),
            link("run", "bin/run.sh"),
            file("empty", b""),
        ];
        if let EntryKind::File { mode, .. } = &mut entries[1].kind {
            *mode = 0o755;
        }
        let wanted = cache.wanted(&entries);
        assert_eq!(wanted, vec![1], "the empty file needs no contents");

        // Contents that do not hash right are not kept.
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Chunk {
            compressed: false,
            data: bytes::Bytes::from_static(b"#!/bin/sh\necho no\n"),
        })
        .unwrap();
        drop(tx);
        assert!(cache.receive(&entries, &wanted, rx).is_err());
        assert_eq!(cache.wanted(&entries), vec![1]);
        // Nor more bytes than declared.
        let (tx, rx) = mpsc::channel(4);
        let mut long = script.to_vec();
        long.push(b'\n');
        tx.try_send(Chunk {
            compressed: false,
            data: long.into(),
        })
        .unwrap();
        drop(tx);
        assert!(cache.receive(&entries, &wanted, rx).is_err());
        assert!(
            listing(&cache.blobs).is_empty(),
            "partial files were left behind"
        );

        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Packer::default().pack(script)).unwrap();
        drop(tx);
        cache.receive(&entries, &wanted, rx).unwrap();
        assert!(cache.wanted(&entries).is_empty());

        let dir = materialise(&cache, work.path(), "t", &entries).unwrap();
        let root = work.path().join(&dir);
        assert_eq!(std::fs::read(root.join("run")).unwrap(), script);
        let mode = std::fs::metadata(root.join("bin/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(root.join("run")).unwrap(),
            Path::new("bin/run.sh")
        );
        assert_eq!(std::fs::metadata(root.join("empty")).unwrap().len(), 0);
        // A task changing its copy leaves the cache as it was.
        std::fs::write(root.join("bin/run.sh"), b"changed").unwrap();
        assert!(cache.wanted(&entries).is_empty());
        let again = materialise(&cache, work.path(), "t", &entries).unwrap();
        assert_eq!(
            std::fs::read(work.path().join(again).join("bin/run.sh")).unwrap(),
            script
        );
    }

    #[test]
    fn download_paths_never_leave_the_cwd() {
        assert_eq!(download_path("out/").unwrap(), "out");
        assert_eq!(download_path("a/b.txt").unwrap(), "a/b.txt");
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "/", "a\0"] {
            assert!(download_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn downloads_send_files_and_dirs_but_not_links_nor_past_the_limit() {
        let work = tempfile::tempdir().unwrap();
        let cwd = work.path().join("job");
        std::fs::create_dir_all(cwd.join("out/sub")).unwrap();
        std::fs::write(cwd.join("out/a.txt"), b"a").unwrap();
        std::fs::write(cwd.join("out/sub/b.txt"), b"bb").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", cwd.join("out/leak")).unwrap();
        let collect = |paths: &[&str], limit| {
            let spec = DownloadSpec {
                cwd: Some("job".into()),
                paths: paths.iter().map(|p| p.to_string()).collect(),
                limit,
            };
            let (tx, mut rx) = mpsc::channel(1024);
            let result = send_paths(&spec, work.path(), &tx);
            drop(tx);
            let mut events = Vec::new();
            while let Ok(event) = rx.try_recv() {
                events.push(event);
            }
            (result, events)
        };
        let (result, events) = collect(&["out/", "nothing"], 100);
        result.unwrap();
        let names: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                DownloadEvent::Dir { path } | DownloadEvent::File { path, .. } => {
                    Some(path.clone())
                }
                DownloadEvent::Missing { path, .. } => Some(format!("missing {path}")),
                _ => None,
            })
            .collect();
        assert_eq!(
            names,
            [
                "out",
                "out/a.txt",
                "out/sub",
                "out/sub/b.txt",
                "missing nothing"
            ]
        );
        let (result, _) = collect(&["out"], 2);
        assert!(result.unwrap_err().contains("--download-limit"));
        let (result, _) = collect(&["../job/out"], 100);
        assert!(result.is_err());
    }
}
