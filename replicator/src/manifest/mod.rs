//! Snapshots of a volume: entries with their attributes and chunk lists, and the root digest.
//!
//! A manifest is a header followed by entries in volume order (see [`RelPath`]'s `Ord`). Its
//! encoding (`encode`) is deterministic and versioned, and the root digest is the BLAKE3 hash
//! of that encoding, so it covers contents (through chunk ids) and every mirrored attribute.
//! Two volumes mirror each other iff their manifests, hence their digests, are equal.

pub mod delta;
mod encode;
mod path;
pub mod store;

pub use encode::{
    Limits, decode_entry, decode_file_body, decode_header, decode_mode, decode_patch,
    decode_xattrs, encode_entry, encode_file_body, encode_header, encode_mode, encode_patch,
    encode_xattrs, rel_path,
};
pub use path::{MAX_NAME, MAX_PATH, PathError, RelPath};

use std::fmt;

use crate::chunk::{ChunkerParams, Segment};
use crate::codec::{from_hex, to_hex};

/// Version of the manifest encoding; bumped on any change to `encode`.
pub const MANIFEST_VERSION: u32 = 1;

/// What kind of volume a manifest describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeMode {
    /// A directory tree mirrored like `rsync -aHAXS --delete`.
    Tree,
    /// A disk image or block device mirrored byte for byte; a single root entry.
    Block,
}

impl fmt::Display for VolumeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VolumeMode::Tree => "tree",
            VolumeMode::Block => "block",
        })
    }
}

/// What the digest depends on besides the entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub mode: VolumeMode,
    pub chunker: ChunkerParams,
}

/// Attributes mirrored for every entry but hard links (which share their target's inode).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by name.
    pub xattrs: Xattrs,
}

/// Extended attributes as they are kept: `(name, value)`, sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
        segments: Vec<Segment>,
    },
    Symlink {
        target: Vec<u8>,
    },
    Fifo,
    Socket,
    CharDevice {
        rdev: u64,
    },
    BlockDevice {
        rdev: u64,
    },
    /// Another name for the regular file at `target`, which comes earlier in the manifest.
    HardLink {
        target: RelPath,
    },
}

impl EntryKind {
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::Dir => "directory",
            EntryKind::File { .. } => "file",
            EntryKind::Symlink { .. } => "symlink",
            EntryKind::Fifo => "fifo",
            EntryKind::Socket => "socket",
            EntryKind::CharDevice { .. } => "char device",
            EntryKind::BlockDevice { .. } => "block device",
            EntryKind::HardLink { .. } => "hard link",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: RelPath,
    pub kind: EntryKind,
    pub meta: Meta,
}

impl Entry {
    pub fn segments(&self) -> &[Segment] {
        match &self.kind {
            EntryKind::File { segments, .. } => segments,
            _ => &[],
        }
    }

    pub fn size(&self) -> u64 {
        match &self.kind {
            EntryKind::File { size, .. } => *size,
            _ => 0,
        }
    }
}

/// The BLAKE3 digest of a whole manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RootDigest(pub [u8; 32]);

impl RootDigest {
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        from_hex::<32>(s).map(RootDigest)
    }
}

impl fmt::Debug for RootDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootDigest({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for RootDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Computes a root digest incrementally, entry by entry, checking the volume order.
pub struct DigestBuilder {
    hasher: blake3::Hasher,
    last: Option<RelPath>,
    entries: u64,
}

/// The entries fed to a [`DigestBuilder`] were not in strictly increasing volume order.
#[derive(Debug, thiserror::Error)]
#[error("manifest entry {path} is out of order or duplicated")]
pub struct OrderError {
    pub path: RelPath,
}

impl DigestBuilder {
    pub fn new(header: &Header) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&encode_header(header));
        DigestBuilder {
            hasher,
            last: None,
            entries: 0,
        }
    }

    pub fn add(&mut self, entry: &Entry) -> Result<(), OrderError> {
        self.add_encoded(entry, &encode_entry(entry))
    }

    /// Adds an entry whose encoding the caller already has (avoids encoding twice).
    pub fn add_encoded(&mut self, entry: &Entry, encoded: &[u8]) -> Result<(), OrderError> {
        if let Some(last) = &self.last
            && *last >= entry.path
        {
            return Err(OrderError {
                path: entry.path.clone(),
            });
        }
        self.last = Some(entry.path.clone());
        self.hasher.update(encoded);
        self.entries += 1;
        Ok(())
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    pub fn finish(&self) -> RootDigest {
        RootDigest(*self.hasher.finalize().as_bytes())
    }
}

#[cfg(test)]
pub(crate) use encode::tests as encode_tests;
