//! Deciding, entry by entry, what the receiver must do and where each chunk will come from.
//!
//! Planning reads the destination as it is (a `stat` walk plus the receiver index) and never
//! modifies it. For every chunk of a file to build it picks the cheapest correct source:
//! already in a partial temp file left by an interrupted run, elsewhere in the destination, or
//! from the sender. Sources other than the sender are verified by hash when read.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use super::fsops;
use crate::chunk::table::ChunkTable;
use crate::chunk::window::ChunkWindow;
use crate::chunk::{ChunkId, Segment};
use crate::manifest::{Entry, EntryKind, Meta, RelPath};
use crate::volume::walk::Scanned;

/// A byte range of a file currently in the destination (final or temp name): the file is an
/// index into the destination's [`SourceFiles`], so a million of these stay small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub file: u32,
    pub offset: u64,
}

/// Where chunks can be found in the destination. Every chunk read from such a place is
/// checked against its whole id, so two chunks with one prefix (see [`ChunkTable`]) could
/// only fail a sync (as a changed destination does), never corrupt it. Ids planned from the
/// peer's manifest are keys here too, so the table keeps std's keyed SipHash.
#[derive(Debug)]
pub enum ChunkPlaces {
    /// Every chunk added, the first place of each.
    All(ChunkTable<Loc>),
    /// A streamed session's recent chunks, by the rule the sender follows (see
    /// [`ChunkWindow`]): a chunk it sends takes its slot, and a later occurrence is copied
    /// from it while the slot holds it. Bounded memory; slot choice by a peer's ids can only
    /// make that peer send more.
    Recent(ChunkWindow<(u32, u64)>),
}

impl Default for ChunkPlaces {
    fn default() -> Self {
        ChunkPlaces::All(ChunkTable::default())
    }
}

impl ChunkPlaces {
    pub fn get(&self, id: &ChunkId) -> Option<Loc> {
        match self {
            ChunkPlaces::All(t) => t.get(id).copied(),
            ChunkPlaces::Recent(w) => w.get(id).map(|&(file, offset)| Loc { file, offset }),
        }
    }

    /// Records `loc` for `id`: unless a place is known already, or, in a window, in its slot.
    pub fn add(&mut self, id: &ChunkId, loc: Loc) {
        match self {
            ChunkPlaces::All(t) => {
                t.insert_new(id, loc);
            }
            ChunkPlaces::Recent(w) => w.put(id, (loc.file, loc.offset)),
        }
    }
}

/// Which chunks the destination may hold, per its index: a Bloom filter of 16 bits per
/// chunk (2 MiB per million) that answers "no" for all but ~0.06% of chunks it lacks. It
/// stands in for [`ChunkPlaces`] of the whole destination until a lookup needs a place, so
/// a sync whose new chunks are nowhere in the destination (the usual incremental) never
/// builds that table.
#[derive(Debug, Default)]
pub struct ChunkFilter {
    words: Vec<u64>,
}

/// Bits set per chunk.
const FILTER_PROBES: u64 = 8;

impl ChunkFilter {
    /// A filter for up to `chunks` chunks at the designed error rate (more only raise it).
    pub fn with_capacity(chunks: u64) -> Self {
        let bits = chunks.saturating_mul(16);
        ChunkFilter {
            words: vec![0; usize::try_from(bits.div_ceil(64)).unwrap_or(usize::MAX)],
        }
    }

    /// The bits of `id`: double hashing over the id's last 16 bytes (uniform for real chunks;
    /// the first 16 key the tables, so the two do not fail together).
    fn probes(&self, id: &ChunkId) -> impl Iterator<Item = (usize, u64)> + use<> {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&id.0[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let (h1, h2) = (word(16), word(24) | 1);
        let bits = self.words.len() as u128 * 64;
        (0..FILTER_PROBES).map(move |i| {
            let h = h1.wrapping_add(i.wrapping_mul(h2));
            let bit = ((u128::from(h) * bits) >> 64) as u64;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    pub fn add(&mut self, id: &ChunkId) {
        if self.words.is_empty() {
            return;
        }
        for (w, b) in self.probes(id) {
            self.words[w] |= b;
        }
    }

    /// False if `id` was certainly never added.
    pub fn may_hold(&self, id: &ChunkId) -> bool {
        !self.words.is_empty() && self.probes(id).all(|(w, b)| self.words[w] & b != 0)
    }
}

/// The destination files that chunks may be copied from, each named once. A million of them
/// are a million directory numbers and name ends plus the names' bytes: files are added in
/// volume order, so a directory is stored once per run of its files, and a temp name (most of
/// a first sync's) is kept as the 8 bytes it is made from.
#[derive(Debug, Default)]
pub struct SourceFiles {
    dirs: Vec<RelPath>,
    /// Per file: its directory's number ([`TEMP`] set for a temp name kept as its tag) and
    /// where its name ends in `names`.
    files: Vec<(u32, usize)>,
    names: Vec<u8>,
    /// Files the write phase set aside under their temp name, a directory taking their place:
    /// their chunks are read from there.
    set_aside: HashSet<(RelPath, Vec<u8>)>,
}

/// Marks a file whose name is kept as a [`fsops::temp_tag`].
const TEMP: u32 = 1 << 31;

impl SourceFiles {
    /// Adds the file `name` in directory `dir`; returns its number.
    pub fn add(&mut self, dir: &RelPath, name: &[u8]) -> u32 {
        match fsops::temp_tag(name) {
            Some(tag) => self.push(dir, &tag, true),
            None => self.push(dir, name, false),
        }
    }

    /// Adds a file as stored: its name, or with `temp` its temp name's tag.
    fn push(&mut self, dir: &RelPath, stored: &[u8], temp: bool) -> u32 {
        if self.dirs.last() != Some(dir) {
            self.dirs.push(dir.clone());
        }
        let dir = u32::try_from(self.dirs.len() - 1)
            .ok()
            .filter(|d| d & TEMP == 0)
            .expect("fewer than 2^31 directories");
        self.names.extend_from_slice(stored);
        self.files
            .push((if temp { dir | TEMP } else { dir }, self.names.len()));
        u32::try_from(self.files.len() - 1).expect("fewer than 2^32 source files")
    }

    /// The number of `dir`/`name`, kept in `slot`: added on first use, once per plan.
    pub fn add_once(&mut self, slot: &mut Option<u32>, dir: &RelPath, name: &[u8]) -> u32 {
        *slot.get_or_insert_with(|| self.add(dir, name))
    }

    /// File number `file` as stored: its directory, its name or tag, whether it is a tag.
    fn stored(&self, file: u32) -> (&RelPath, &[u8], bool) {
        let i = file as usize;
        let start = i.checked_sub(1).map_or(0, |prev| self.files[prev].1);
        let (dir, end) = self.files[i];
        let name = &self.names[start..end];
        (&self.dirs[(dir & !TEMP) as usize], name, dir & TEMP != 0)
    }

    /// The directory and name of file number `file`.
    pub fn get(&self, file: u32) -> (&RelPath, Cow<'_, [u8]>) {
        let (dir, stored, temp) = self.stored(file);
        let name = match <&[u8; 8]>::try_from(stored) {
            Ok(tag) if temp => Cow::Owned(fsops::temp_name_of(tag)),
            _ => Cow::Borrowed(stored),
        };
        (dir, name)
    }

    /// Where file number `file` is now: as [`SourceFiles::get`] names it, or the temp name
    /// it was set aside under.
    pub fn current(&self, file: u32) -> (&RelPath, Cow<'_, [u8]>) {
        let (dir, name) = self.get(file);
        if !self.set_aside.is_empty() && self.set_aside.contains(&(dir.clone(), name.to_vec())) {
            return (dir, Cow::Owned(fsops::temp_name(&name)));
        }
        (dir, name)
    }

    /// Notes that the write phase renamed `dir`/`name` to its temp name.
    pub fn note_set_aside(&mut self, dir: &RelPath, name: &[u8]) {
        self.set_aside.insert((dir.clone(), name.to_vec()));
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Keeps only the files `refs` number, renumbering them (in their old order, so a
    /// directory stays stored once per run of its files).
    pub fn retain<'a>(&mut self, refs: impl Iterator<Item = &'a mut u32>) {
        let mut refs: Vec<&mut u32> = refs.collect();
        let mut live: Vec<u32> = refs.iter().map(|r| **r).collect();
        live.sort_unstable();
        live.dedup();
        let mut kept = SourceFiles {
            set_aside: std::mem::take(&mut self.set_aside),
            ..SourceFiles::default()
        };
        for &file in &live {
            let (dir, stored, temp) = self.stored(file);
            kept.push(dir, stored, temp);
        }
        for r in &mut refs {
            let (Ok(new) | Err(new)) = live.binary_search(r);
            **r = new as u32;
        }
        *self = kept;
    }

    /// File number `file` as a path for messages.
    pub fn shown(&self, file: u32) -> String {
        let (dir, name) = self.get(file);
        format!("{dir}/{}", String::from_utf8_lossy(&name))
    }
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
    /// Copy from the destination without reading it here (`copy_file_range`: done in the
    /// kernel, and a block-sharing clone on filesystems that can): the index vouches for
    /// these bytes, as it does for files kept as they are.
    Clone(Loc),
    /// Wait for it from the sender.
    Wire,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Already right; only metadata may need setting.
    Keep { meta: bool },
    /// Build a regular file in its temp file, then rename it into place. With `patch`, the
    /// temp file holds only what differs from the file at the final name (sparse, at the
    /// same offsets: [`Src::Clone`] of the old file at the same offset marks what is left
    /// as it is), and the commit copies those ranges into that file ([`super::patch`]).
    Build {
        sources: Vec<Src>,
        resume: bool,
        patch: bool,
    },
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
    pub count: u64,
    pub bytes: u64,
    /// Only counted: in a streamed session the sender sends every new chunk unasked.
    pub unasked: bool,
}

impl WantList {
    pub fn push(&mut self, id: ChunkId, len: u64) {
        if !self.unasked {
            self.order.push(id);
        }
        self.count += 1;
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

/// The chunk at each offset of a file, holes left out.
pub fn chunks_by_offset(segments: &[Segment]) -> HashMap<u64, (ChunkId, u32)> {
    offsets(segments)
        .filter_map(|(off, seg)| match *seg {
            Segment::Chunk { id, len } => Some((off, (id, len))),
            Segment::Zero { .. } => None,
        })
        .collect()
}

/// Where each chunk of a file first is, by [`ChunkId::prefix`] (whole ids are checked when
/// read).
pub fn first_offsets(segments: &[Segment]) -> HashMap<u128, u64> {
    let mut at = HashMap::new();
    for (off, seg) in offsets(segments) {
        if let Segment::Chunk { id, .. } = seg {
            at.entry(id.prefix()).or_insert(off);
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunk_filter_holds_what_was_added_and_little_else() {
        let id = |i: u64| ChunkId::of(&i.to_le_bytes());
        let mut filter = ChunkFilter::with_capacity(10_000);
        for i in 0..10_000 {
            filter.add(&id(i));
        }
        assert!((0..10_000).all(|i| filter.may_hold(&id(i))));
        let false_hits = (10_000..110_000)
            .filter(|i| filter.may_hold(&id(*i)))
            .count();
        assert!(
            false_hits < 300,
            "{false_hits} of 100,000 absent chunks hit"
        );
        let empty = ChunkFilter::with_capacity(0);
        assert!(!empty.may_hold(&id(1)));
    }

    #[test]
    fn source_files_give_back_what_was_added_with_each_directory_run_stored_once() {
        let dir = |p: &[u8]| RelPath::new(p.to_vec()).unwrap();
        let mut files = SourceFiles::default();
        let added = [
            (dir(b""), &b"top"[..]),
            (dir(b"a"), b"x"),
            (dir(b"a"), b""),
            (dir(b"a"), b"yy"),
            (dir(b"a/b"), b"z"),
            (dir(b"a"), b"w"),
        ];
        for (i, (d, n)) in added.iter().enumerate() {
            assert_eq!(files.add(d, n), i as u32);
        }
        for (i, (d, n)) in added.iter().enumerate() {
            let (dir, name) = files.get(i as u32);
            assert_eq!((dir, &*name), (d, *n));
        }
        assert_eq!(files.dirs.len(), 4, "a run of one directory is stored once");
        let mut slot = None;
        let n = files.add_once(&mut slot, &dir(b"c"), b"v");
        assert_eq!(
            files.add_once(&mut slot, &dir(b"d"), b"u"),
            n,
            "once per slot"
        );
        assert_eq!(files.shown(n), "c/v");
    }

    #[test]
    fn temp_names_are_kept_as_their_tags_and_given_back_whole() {
        let dir = RelPath::new(b"d".to_vec()).unwrap();
        let mut files = SourceFiles::default();
        let temp = fsops::temp_name(b"data.db");
        // Temp-shaped but not hex, or hex that would come back in lower case: kept as it is.
        let odd = b".rpl-0123456789abcdeZ.tmp".to_vec();
        let upper = b".rpl-0123456789ABCDEF.tmp".to_vec();
        let names = [&temp, &odd, &upper, &b"plain".to_vec()];
        let numbers: Vec<u32> = names.iter().map(|n| files.add(&dir, n)).collect();
        assert_eq!(files.names.len(), 8 + 25 + 25 + 5);
        for (n, name) in numbers.iter().zip(names) {
            let (d, got) = files.get(*n);
            assert_eq!((d, &*got), (&dir, &name[..]));
        }
        assert_eq!(
            files.shown(numbers[0]),
            format!("d/{}", String::from_utf8_lossy(&temp))
        );
    }

    #[test]
    fn retained_source_files_keep_their_names_under_new_numbers() {
        let dir = |p: &[u8]| RelPath::new(p.to_vec()).unwrap();
        let mut files = SourceFiles::default();
        for (d, n) in [
            (b"a", b"1"),
            (b"a", b"2"),
            (b"b", b"3"),
            (b"b", b"4"),
            (b"c", b"5"),
        ] {
            files.add(&dir(d), n);
        }
        // Held twice, out of order: file 3 (b/4), file 0 (a/1), file 3 again.
        let mut held = [3u32, 0, 3];
        files.retain(held.iter_mut());
        assert_eq!(files.len(), 2);
        assert_eq!(held, [1, 0, 1]);
        assert_eq!(files.shown(0), "a/1");
        assert_eq!(files.shown(1), "b/4");
        assert_eq!(files.add(&dir(b"b"), b"6"), 2);
        assert_eq!(files.dirs.len(), 2, "b's run goes on");
    }
}
