//! Moving files between the coordinator and its nodes: a working tree synced to every node
//! before a job ([`TaskKind::Sync`](crate::protocol::TaskKind::Sync)), and results brought
//! back after it ([`TaskKind::Download`](crate::protocol::TaskKind::Download)).
//!
//! A sync stream, after `TaskRequest::Start` with a [`SyncStart`]:
//! 1. the agent answers [`SyncEvent::NeedManifest`] unless it kept this tree's manifest;
//!    the coordinator then sends the manifest as [`SyncRequest::Entries`] frames;
//! 2. the agent answers [`SyncEvent::Want`]: the entries whose contents its cache lacks;
//! 3. the coordinator sends those contents, in that order, as [`SyncRequest::Chunk`]s (each
//!    file's chunks add up to exactly its declared size);
//!
//!    or, where the `Start` offered a [`BulkOffer`] and the agent could take it up: the agent
//!    dials the coordinator's TCP port with TLS (its node certificate, ALPN
//!    [`ALPN_BULK`](crate::protocol::ALPN_BULK)), writes the offer's ticket there, and answers
//!    [`SyncEvent::WantBulk`] instead; the same `Chunk` frames then come over that connection,
//!    which ends after the last. TLS records on TCP cost far less CPU per byte than QUIC's
//!    per-packet encryption. The control (this list) stays on the stream;
//! 4. the agent writes the tree out and answers [`SyncEvent::Ready`] (or
//!    [`SyncEvent::Failed`] at any point), and the stream ends.
//!
//! A download stream, after `TaskRequest::Start` with a [`DownloadSpec`]: the agent sends
//! [`DownloadEvent`]s (a directory, or a file followed by its chunks), then `Done`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::limits::{MAX_SYNC_COMPONENT, MAX_SYNC_PATH};

/// A SHA-256 digest: of a file's contents, or of a whole manifest (a tree's identity).
pub type Digest = [u8; 32];

/// What a sync stream's `Start` carries: which tree, and how big its manifest is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStart {
    /// SHA-256 of the manifest's entries in their encoded form ([`tree_digest`]).
    pub tree: Digest,
    /// How many entries the manifest has.
    pub entries: u32,
    /// Sum of the files' sizes.
    pub bytes: u64,
    /// Where the contents may come over TCP instead, if the coordinator offers it.
    pub bulk: Option<BulkOffer>,
}

/// A coordinator's offer to send a sync's contents over TLS on TCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkOffer {
    /// The TCP port, at the address the agent reaches the coordinator at.
    pub port: u16,
    /// Names this sync on the connection; good once, and only with the node's certificate.
    pub ticket: [u8; 16],
}

/// One entry of a tree's manifest. Paths are relative, `/`-separated, in walk order (a
/// directory before what it holds).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TreeEntry {
    pub path: String,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    /// `mode`: the permission bits (0o777 at most).
    File {
        mode: u32,
        size: u64,
        sha256: Digest,
    },
    Symlink {
        target: String,
    },
}

/// Coordinator-to-agent frames on a sync stream, after `Start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// Part of the manifest (in order; all of them add up to [`SyncStart::entries`]).
    Entries(Vec<TreeEntry>),
    /// Part of a wanted file's contents.
    Chunk(Chunk),
}

/// At most [`SYNC_CHUNK`](crate::limits::SYNC_CHUNK) bytes of a file, zstd-compressed when
/// that made them smaller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub compressed: bool,
    pub data: Bytes,
}

/// zstd level for file chunks: fast, and most of the gain on source and text.
const ZSTD_LEVEL: i32 = 3;
/// After a chunk that did not shrink, this many go uncompressed before trying again: data
/// that does not compress (archives, weights, media) then costs almost no CPU.
const SKIP_AFTER_INCOMPRESSIBLE: u32 = 32;

/// Packs one file's chunks, compressing each while compression pays.
#[derive(Debug, Default)]
pub struct Packer {
    skip: u32,
}

impl Packer {
    pub fn pack(&mut self, raw: &[u8]) -> Chunk {
        if self.skip > 0 {
            self.skip -= 1;
        } else {
            match zstd::bulk::compress(raw, ZSTD_LEVEL) {
                // Worth it only when it saves more than a sixteenth.
                Ok(packed) if packed.len() < raw.len() - raw.len() / 16 => {
                    return Chunk {
                        compressed: true,
                        data: packed.into(),
                    }
                }
                _ => self.skip = SKIP_AFTER_INCOMPRESSIBLE,
            }
        }
        Chunk {
            compressed: false,
            data: Bytes::copy_from_slice(raw),
        }
    }
}

impl Chunk {
    /// The chunk's bytes, refused if they are more than `max` or empty (a chunk that
    /// carries nothing is a stream going nowhere).
    pub fn unpack(self, max: usize) -> Result<Bytes, String> {
        let raw = if self.compressed {
            // Decompression stops at `max`: a small frame cannot expand past it.
            zstd::bulk::decompress(&self.data, max)
                .map(Bytes::from)
                .map_err(|e| format!("a chunk does not decompress within {max} bytes: {e}"))?
        } else {
            self.data
        };
        if raw.len() > max {
            return Err(format!(
                "a chunk of {} bytes where at most {max} were due",
                raw.len()
            ));
        }
        if raw.is_empty() {
            return Err("an empty chunk".into());
        }
        Ok(raw)
    }
}

/// Agent-to-coordinator frames on a sync stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncEvent {
    /// This node has not kept the tree's manifest: send it.
    NeedManifest,
    /// Send the contents of these entries (indices into the manifest, ascending, files only).
    Want(Vec<u32>),
    /// The same, over the TCP connection this agent dialed with the offer's ticket.
    WantBulk(Vec<u32>),
    /// The tree is written out at `dir`, relative to the agent's work dir.
    Ready { dir: String },
    /// Why the sync failed; the stream ends.
    Failed(String),
}

/// What a download stream's `Start` carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadSpec {
    /// The directory the paths are relative to, relative to the agent's work dir (the
    /// task's cwd); `None` is the work dir itself.
    pub cwd: Option<String>,
    /// Files or directories (taken whole) to send back.
    pub paths: Vec<String>,
    /// Most bytes of file contents to send; past it the agent stops with `Failed`.
    pub limit: u64,
}

/// Agent-to-coordinator frames on a download stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownloadEvent {
    Dir {
        path: String,
    },
    /// Exactly `size` bytes of [`DownloadEvent::Chunk`]s follow.
    File {
        path: String,
        mode: u32,
        size: u64,
    },
    Chunk(Chunk),
    /// A requested path that is not there (or not a file or directory).
    Missing {
        path: String,
        why: String,
    },
    /// Every path was sent; the stream ends.
    Done,
    Failed(String),
}

/// The identity of a tree: SHA-256 over its entries' encoding, so that two trees with the
/// same paths, modes, contents and links are one tree.
pub fn tree_digest(entries: &[TreeEntry]) -> Digest {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = Vec::new();
    for entry in entries {
        buf.clear();
        // Entries are plain data; encoding them cannot fail.
        if crate::codec::encode_into(entry, &mut buf).is_ok() {
            hasher.update((buf.len() as u64).to_be_bytes());
            hasher.update(&buf);
        }
    }
    hasher.finalize().into()
}

/// Checks that `path` names something inside a tree: relative, `/`-separated plain names
/// (no `.`, `..` or empty ones), no NUL, within the length limits.
pub fn check_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.len() > MAX_SYNC_PATH {
        return Err(format!(
            "path of {} bytes; the limit is {MAX_SYNC_PATH}",
            path.len()
        ));
    }
    if path.contains('\0') {
        return Err(format!("{:?} holds a NUL byte", path));
    }
    if path.starts_with('/') {
        return Err(format!("{path:?} is absolute"));
    }
    for part in path.split('/') {
        match part {
            "" | "." => return Err(format!("{path:?} has an empty or `.` component")),
            ".." => return Err(format!("{path:?} climbs out with `..`")),
            long if long.len() > MAX_SYNC_COMPONENT => {
                return Err(format!(
                    "{path:?} has a name over {MAX_SYNC_COMPONENT} bytes"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks that a symlink at `link` (a checked relative path) pointing at `target` stays in
/// the tree however it is followed: the target is relative, climbs (`..`) only at its start
/// and no higher than the tree's root, and then only descends. A `..` after a name could
/// climb out of wherever another symlink named there leads, so it is refused.
pub fn check_symlink_target(link: &str, target: &str) -> Result<(), String> {
    if target.is_empty() || target.len() > MAX_SYNC_PATH || target.contains('\0') {
        return Err(format!(
            "{link}: link target is empty, too long or holds a NUL"
        ));
    }
    if target.starts_with('/') {
        return Err(format!(
            "{link} -> {target}: absolute link targets leave the tree"
        ));
    }
    let depth = link.split('/').count() - 1;
    let mut climbs = 0;
    let mut descended = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if descended => {
                return Err(format!(
                    "{link} -> {target}: `..` after a name may leave the tree"
                ))
            }
            ".." => climbs += 1,
            _ => descended = true,
        }
    }
    if climbs > depth {
        return Err(format!("{link} -> {target}: points outside the tree"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_inside() {
        for good in ["a", "a/b", "dir/.hidden", "x..y/z"] {
            assert!(check_relative_path(good).is_ok(), "{good}");
        }
        for bad in ["", "/etc", "a/../b", "..", "a//b", "./a", "a/", "a\0b"] {
            assert!(check_relative_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_relative_path(&"a".repeat(MAX_SYNC_COMPONENT + 1)).is_err());
    }

    #[test]
    fn symlinks_never_point_out() {
        for (link, target) in [
            ("a", "b"),
            ("d/a", "../b"),
            ("d/e/a", "../../b/c"),
            ("a", "./b"),
        ] {
            assert!(
                check_symlink_target(link, target).is_ok(),
                "{link} -> {target}"
            );
        }
        for (link, target) in [
            ("a", "/etc/passwd"),
            ("a", ".."),
            ("d/a", "../.."),
            ("a", "b/../.."),
            ("a", "b/.."),
            ("a", ""),
        ] {
            assert!(
                check_symlink_target(link, target).is_err(),
                "{link} -> {target}"
            );
        }
    }

    #[test]
    fn chunks_compress_when_it_pays_and_never_unpack_past_their_bound() {
        let text = b"hello hello hello hello ".repeat(1000);
        let mut packer = Packer::default();
        let chunk = packer.pack(&text);
        assert!(chunk.compressed && chunk.data.len() < text.len() / 10);
        assert_eq!(chunk.clone().unpack(text.len()).unwrap(), &text[..]);
        assert!(
            chunk.unpack(text.len() - 1).is_err(),
            "unpacked past its bound"
        );

        // Pseudo-random bytes do not shrink: sent as they are, and the next ones not tried.
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut packer = Packer::default();
        assert!(!packer.pack(&noise).compressed);
        assert_eq!(packer.skip, SKIP_AFTER_INCOMPRESSIBLE);
        assert!(!packer.pack(&text).compressed);

        let empty = Chunk {
            compressed: false,
            data: Bytes::new(),
        };
        assert!(empty.unpack(10).is_err());
        let garbage = Chunk {
            compressed: true,
            data: Bytes::from_static(b"not zstd at all"),
        };
        assert!(garbage.unpack(10).is_err());
    }

    #[test]
    fn the_tree_digest_covers_every_field() {
        let file = |mode| TreeEntry {
            path: "f".into(),
            kind: EntryKind::File {
                mode,
                size: 1,
                sha256: [0; 32],
            },
        };
        assert_eq!(tree_digest(&[file(0o644)]), tree_digest(&[file(0o644)]));
        assert_ne!(tree_digest(&[file(0o644)]), tree_digest(&[file(0o755)]));
    }
}
