//! Deciding, entry by entry, what the receiver must do and where each chunk will come from.
//!
//! Planning reads the destination as it is (a `stat` walk plus the receiver index) and never
//! modifies it. For every chunk of a file to build it picks the cheapest correct source:
//! already in a partial temp file left by an interrupted run, elsewhere in the destination, or
//! from the sender. Sources other than the sender are verified by hash when read.

use crate::chunk::{ChunkId, Segment};
use crate::manifest::{Entry, EntryKind, Meta, RelPath};
use crate::volume::walk::Scanned;

/// A byte range of a file currently in the destination (final or temp name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub dir: RelPath,
    pub name: Vec<u8>,
    pub offset: u64,
}

/// Where one segment of a file being built comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Src {
    /// A hole: nothing to write.
    Zero,
    /// Already present at this offset in the partial temp file being resumed.
    InPlace,
    /// Copy from the destination (verified when read).
    Local(Loc),
    /// Wait for it from the sender.
    Wire,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Already right; only metadata may need setting.
    Keep { meta: bool },
    /// Build a regular file in its temp file, then rename it into place.
    Build { sources: Vec<Src>, resume: bool },
    /// (Re)create a hard link to an earlier entry.
    Link,
    /// Create a symlink, FIFO, socket or device node under a temp name, then rename it.
    Special,
    /// A directory: create it if missing, replacing a non-directory if need be.
    Dir { create: bool, replace: bool },
}

impl Plan {
    /// Bytes this plan must receive from the sender.
    pub fn wire_bytes(&self, entry: &Entry) -> u64 {
        match self {
            Plan::Build { sources, .. } => entry
                .segments()
                .iter()
                .zip(sources)
                .filter(|(_, s)| **s == Src::Wire)
                .map(|(seg, _)| seg.len())
                .sum(),
            _ => 0,
        }
    }
}

/// True if an existing entry's attributes differ from the wanted ones.
pub fn meta_differs(have: &Scanned, want: &Meta, is_symlink: bool) -> bool {
    let s = &have.stat;
    (!is_symlink && s.mode & 0o7777 != want.perm)
        || s.uid != want.uid
        || s.gid != want.gid
        || s.mtime_sec != want.mtime_sec
        || s.mtime_nsec != want.mtime_nsec
        || have.xattrs != want.xattrs
}

/// True if the existing entry is of the same kind as `kind` and needs no re-creation.
pub fn same_special(have: &Scanned, kind: &EntryKind) -> bool {
    use crate::volume::{S_IFBLK, S_IFCHR, S_IFIFO, S_IFLNK, S_IFSOCK};
    let ft = have.stat.file_type();
    match kind {
        EntryKind::Symlink { target } => {
            ft == S_IFLNK && have.link_target.as_deref() == Some(target)
        }
        EntryKind::Fifo => ft == S_IFIFO,
        EntryKind::Socket => ft == S_IFSOCK,
        EntryKind::CharDevice { rdev } => ft == S_IFCHR && have.stat.rdev == *rdev,
        EntryKind::BlockDevice { rdev } => ft == S_IFBLK && have.stat.rdev == *rdev,
        _ => false,
    }
}

/// Chunk ids in the order the receiver will consume them, without duplicates.
#[derive(Debug, Default)]
pub struct WantList {
    pub order: Vec<ChunkId>,
    pub bytes: u64,
}

impl WantList {
    pub fn push(&mut self, id: ChunkId, len: u64) {
        self.order.push(id);
        self.bytes += len;
    }
}

/// Offsets of each segment of a file.
pub fn offsets(segments: &[Segment]) -> impl Iterator<Item = (u64, &Segment)> {
    segments.iter().scan(0u64, |off, seg| {
        let here = *off;
        *off += seg.len();
        Some((here, seg))
    })
}
