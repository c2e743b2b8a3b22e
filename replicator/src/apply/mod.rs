//! The receiver's side: turning a manifest plus chunks into a durable, verified destination.
//!
//! Phases, each finishing before the next starts:
//! 1. **prepare** — walk the destination (`stat` only) and load the receiver index; mark the
//!    destination *incomplete* in its state file.
//! 2. **plan** — for each incoming entry decide what to do ([`plan::Plan`]) and which chunks
//!    must come from the sender (the want list).
//! 3. **write** — build every new file under a temp name in its final directory, from local
//!    copies and received chunks (each verified against its name), set its metadata.
//! 4. **commit** — `syncfs` the temp files, rename them into place, remove what the source no
//!    longer has, set directory metadata deepest first, `syncfs` again.
//! 5. **verify** — recompute the result's root digest (reading again what this run touched);
//!    only if it equals the sender's is the state file switched to *complete, root R*.
//!
//! In a streamed session (an empty destination, see docs/protocol.md) phases 2 and 3 run
//! entry by entry: each file is planned and written as soon as its chunks arrive.
//!
//! Nothing under a final name changes before phase 4, so an abort in phases 1–3 leaves the
//! destination as it was (temp files are removed on a clean abort, kept for resume if the
//! connection broke). See docs/architecture.md for the crash-safety argument.

pub mod flusher;
pub mod fsops;
mod local;
pub mod plan;
mod verify;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode};

use crate::chunk::{ChunkId, Segment};
use crate::index::{IndexReader, IndexWriter, now_ns};
use crate::manifest::store::StoreWriter;
use crate::manifest::{
    DigestBuilder, Entry, EntryKind, Header, RelPath, RootDigest, VolumeMode, encode_entry,
};
use crate::progress::Progress;
use crate::protocol::message::WantHint;
use crate::state::TargetState;
use crate::volume::walk::{Listing, WalkOptions, scan_one, walk};
use fsops::{VolumeDir, os, temp_name};
use local::{LocalReader, PendingClone, range_has, range_is_zero};
use plan::{ChunkPlaces, Loc, Plan, SourceFiles, Src, WantList, chunks_by_offset, offsets};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("destination {0} is not a directory but the source is a tree")]
    NotADirectory(PathBuf),
    #[error("destination {0} is a directory but the source is a block volume")]
    IsADirectory(PathBuf),
    #[error("destination device {path} holds {have} bytes, the source {need}")]
    DeviceTooSmall { path: PathBuf, have: u64, need: u64 },
    #[error(
        "destination changed during the sync: {0} no longer holds the expected data; run the sync again"
    )]
    LocalChanged(String),
    #[error("received chunk {got} where {want} was expected")]
    UnexpectedChunk { got: ChunkId, want: ChunkId },
    #[error("{0}")]
    Chunk(#[from] crate::protocol::message::ChunkError),
    #[error("the sender stopped before sending every wanted chunk")]
    MissingChunks,
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("after applying, the destination digest is {got} but the source's is {want}")]
    DigestMismatch { got: RootDigest, want: RootDigest },
}

fn io_err(
    what: &'static str,
    path: &dyn std::fmt::Display,
) -> impl FnOnce(io::Error) -> ApplyError {
    let path = path.to_string();
    move |source| ApplyError::Io { what, path, source }
}

/// Supplies received chunks, in want order, already verified.
pub trait ChunkFeed {
    /// The next chunk from the sender, which must be `expect`. `base` is the chunk this
    /// receiver hinted `expect` starts with, and its bytes: the sender may send only the rest.
    fn next_chunk(
        &mut self,
        expect: ChunkId,
        base: Option<(ChunkId, &[u8])>,
    ) -> Result<Bytes, ApplyError>;
}

/// Counters of the receiving side.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyStats {
    pub entries: u64,
    pub files: u64,
    pub bytes_total: u64,
    pub chunks_total: u64,
    pub chunks_wanted: u64,
    pub bytes_wanted: u64,
    pub bytes_copied_locally: u64,
    pub files_written: u64,
    pub deleted: u64,
}

/// A destination declared complete: its root digest and counters, and the receiver index
/// still to be saved.
pub struct Committed {
    pub root: RootDigest,
    pub stats: ApplyStats,
    /// The new receiver index, unless it is the one loaded.
    index: Option<IndexWriter>,
    dest: Destination,
}

impl Committed {
    /// Saves the receiver index. It is a cache (a stale one only costs re-reading files), so
    /// this runs after `Done` has gone back, off the sender's wait. Files this run changed
    /// were recorded racy by the verify scan (too close to their change to vouch for them);
    /// once the racy margin has passed they are looked at again, so that the next sync can
    /// trust them without reading them.
    pub fn save_index(self) {
        let Some(index) = self.index else { return };
        let dest = &self.dest;
        let path = dest.state.index_file();
        let racy = index.racy();
        let mut saved = index.finish();
        if saved.is_ok() && racy > 0 {
            let margin = std::time::Duration::from_nanos(crate::index::RACY_MARGIN_FINE_NS as u64);
            let since = dest
                .last_change
                .map_or(std::time::Duration::ZERO, |c| c.elapsed());
            std::thread::sleep(margin.saturating_sub(since));
            saved = crate::index::settle_racy(&path, dest.header.chunker, now_ns(), |p| {
                scan_one(&dest.path, p, WalkOptions { xattrs: false })
                    .ok()
                    .flatten()
                    .map(|s| s.stat)
            });
        }
        if let Err(e) = saved {
            tracing::warn!(path = %path.display(), "cannot save the receiver index: {e}");
        }
    }
}

/// One destination volume being brought to match a manifest.
pub struct Destination {
    path: PathBuf,
    header: Header,
    state: TargetState,
    vol: Option<VolumeDir>,
    existing: Listing,
    /// Manifest entries planned so far that the prepare walk found (each path once): when
    /// this reaches the listing's size, the destination holds nothing the source lacks.
    matched: usize,
    /// The receiver index, read along with the manifest (both in volume order).
    index: Option<IndexReader>,
    /// Chunks available somewhere in the destination (trusted by index, or planned this run).
    local: ChunkPlaces,
    /// The files `local` points into.
    sources: SourceFiles,
    /// Block image: the chunk at each offset, when the index vouches for the image (a
    /// regular file whose stat is unchanged since the last sync wrote it).
    in_place: HashMap<u64, (ChunkId, u32)>,
    /// Whether this run changed anything on disk (then the verify scan waits out the racy
    /// window, so what it records can be trusted by the next sync).
    touched: bool,
    /// When the prepare walk started: the time its stat results are recorded at.
    prepared_at: i128,
    /// When this run last changed the destination (before its final sync).
    last_change: Option<std::time::Instant>,
    entries: Vec<(Entry, Plan)>,
    want: WantList,
    /// Wanted chunks that start with the old file's chunk at the same offset (appends): that
    /// chunk's place, length and id. Sent as hints; the sender may send only what follows.
    suffix_bases: HashMap<ChunkId, (Loc, u32, ChunkId)>,
    digest: DigestBuilder,
    /// A copy of the manifest, kept once the destination is complete (the next delta's base).
    store: Option<StoreWriter>,
    /// Created in this run; removed again on a clean abort.
    created_temps: Vec<(RelPath, Vec<u8>)>,
    created_dirs: Vec<RelPath>,
    kept_inodes: HashSet<(u64, u64)>,
    /// Syncs big finished files while later ones are written.
    flusher: flusher::Flusher,
    /// Bytes of small files written since the last early `syncfs`.
    unsynced: u64,
    pub stats: ApplyStats,
}

impl Destination {
    /// Phase 1: look at the destination and mark it incomplete.
    pub fn prepare(path: &Path, header: Header, state: TargetState) -> Result<Self, ApplyError> {
        let prepared_at = now_ns();
        let index_file = state.index_file();
        let mut existing = Listing::default();
        let mut vol = None;
        match header.mode {
            VolumeMode::Tree => {
                match std::fs::symlink_metadata(path) {
                    Ok(m) if !m.is_dir() => {
                        return Err(ApplyError::NotADirectory(path.to_path_buf()));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        std::fs::create_dir_all(path)
                            .map_err(io_err("cannot create", &path.display()))?;
                    }
                    Err(e) => return Err(io_err("cannot stat", &path.display())(e)),
                }
                walk(path, WalkOptions::default(), &mut |s| {
                    existing.insert(s);
                    Ok(())
                })
                .map_err(|e| ApplyError::Manifest(e.to_string()))?;
                vol = Some(VolumeDir::open(path).map_err(io_err("cannot open", &path.display()))?);
            }
            VolumeMode::Block => {
                if let Ok(m) = std::fs::metadata(path)
                    && m.is_dir()
                {
                    return Err(ApplyError::IsADirectory(path.to_path_buf()));
                }
                if let Some(s) = scan_one(path, &RelPath::root(), WalkOptions { xattrs: false })
                    .map_err(|e| ApplyError::Manifest(e.to_string()))?
                {
                    existing.insert(s);
                }
            }
        }
        state
            .mark_incomplete(path)
            .map_err(io_err("cannot write state of", &path.display()))?;
        // Where chunks probably are: files whose stat is unchanged since the index recorded
        // them. Every chunk read from these is verified, so racy records may be used too.
        let mut local = ChunkPlaces::default();
        let mut sources = SourceFiles::default();
        let records = IndexReader::open(&index_file, header.chunker);
        if header.mode == VolumeMode::Tree {
            for (p, e) in records.into_iter().flatten() {
                let Some(have) = existing.get(&p) else {
                    continue;
                };
                if !have.stat.is_file() || !e.locates(&have.stat) {
                    continue;
                }
                let Some((dir, name)) = p.split_last() else {
                    continue;
                };
                let file = sources.add(&dir, name);
                for (off, seg) in offsets(&e.segments) {
                    if let Segment::Chunk { id, .. } = seg {
                        local.add(id, Loc { file, offset: off });
                    }
                }
            }
        }
        // A second pass over the index goes along with the manifest.
        let mut index = IndexReader::open(&index_file, header.chunker);
        // A block image the index vouches for needs no reading to know what it holds.
        let in_place = match existing.get(&RelPath::root()) {
            Some(have) if header.mode == VolumeMode::Block && have.stat.is_file() => index
                .as_mut()
                .and_then(|i| i.get(&RelPath::root()))
                .filter(|e| e.vouches(&have.stat))
                .map(|e| chunks_by_offset(&e.segments))
                .unwrap_or_default(),
            _ => HashMap::new(),
        };
        let store = StoreWriter::create(&state.manifest_file(), &header)
            .map_err(|e| tracing::warn!("cannot keep this manifest for the next delta: {e}"))
            .ok();
        Ok(Destination {
            path: path.to_path_buf(),
            digest: DigestBuilder::new(&header),
            store,
            header,
            state,
            vol,
            existing,
            matched: 0,
            index,
            local,
            sources,
            in_place,
            touched: false,
            prepared_at,
            last_change: None,
            entries: Vec::new(),
            want: WantList::default(),
            suffix_bases: HashMap::new(),
            created_temps: Vec::new(),
            created_dirs: Vec::new(),
            kept_inodes: HashSet::new(),
            flusher: flusher::Flusher::default(),
            unsynced: 0,
            stats: ApplyStats::default(),
        })
    }

    /// Phase 2: plan one manifest entry (entries arrive in volume order).
    pub fn plan(&mut self, entry: Entry) -> Result<(), ApplyError> {
        let encoded = encode_entry(&entry);
        self.digest
            .add_encoded(&entry, &encoded)
            .map_err(|e| ApplyError::Manifest(e.to_string()))?;
        StoreWriter::keep(&mut self.store, &encoded);
        if self.header.mode == VolumeMode::Block && !entry.path.is_root() {
            return Err(ApplyError::Manifest(
                "a block manifest has a single root entry".into(),
            ));
        }
        if let EntryKind::HardLink { target } = &entry.kind {
            let ok = self
                .earlier(target)
                .is_some_and(|e| matches!(e.kind, EntryKind::File { .. }));
            if !ok {
                return Err(ApplyError::Manifest(format!(
                    "hard link {} points to {}, which is not an earlier regular file",
                    entry.path, target
                )));
            }
        }
        if let Some((parent, _)) = entry.path.split_last() {
            let parent_ok = self
                .earlier(&parent)
                .is_some_and(|e| matches!(e.kind, EntryKind::Dir));
            if !parent_ok {
                return Err(ApplyError::Manifest(format!(
                    "entry {} has no parent directory before it",
                    entry.path
                )));
            }
        }
        let plan = self.plan_entry(&entry)?;
        self.stats.entries += 1;
        if let EntryKind::File { size, segments } = &entry.kind {
            self.stats.files += 1;
            self.stats.bytes_total += size;
            self.stats.chunks_total += segments
                .iter()
                .filter(|s| matches!(s, Segment::Chunk { .. }))
                .count() as u64;
        }
        self.entries.push((entry, plan));
        Ok(())
    }

    /// An entry planned earlier, found by binary search (entries arrive in volume order, which
    /// the digest builder enforces before anything else looks at an entry).
    fn earlier(&self, path: &RelPath) -> Option<&Entry> {
        self.entries
            .binary_search_by(|(e, _)| e.path.cmp(path))
            .ok()
            .map(|i| &self.entries[i].0)
    }

    fn plan_entry(&mut self, e: &Entry) -> Result<Plan, ApplyError> {
        let have = self.existing.get(&e.path);
        self.matched += usize::from(have.is_some());
        Ok(match &e.kind {
            EntryKind::Dir => match have {
                Some(h) if h.stat.is_dir() => Plan::Dir {
                    create: false,
                    replace: false,
                },
                Some(_) => Plan::Dir {
                    create: true,
                    replace: true,
                },
                None => Plan::Dir {
                    create: true,
                    replace: false,
                },
            },
            EntryKind::File { segments, .. } => {
                if let Some(h) = have
                    && h.stat.is_file()
                    && self
                        .index
                        .as_mut()
                        .and_then(|i| i.get(&e.path))
                        .is_some_and(|r| r.vouches(&h.stat) && r.segments == *segments)
                    // Two names of one destination inode cannot both stay if the source has
                    // two separate files: the second one is rebuilt.
                    && (h.stat.nlink == 1 || self.kept_inodes.insert((h.stat.dev, h.stat.ino)))
                {
                    return Ok(Plan::Keep {
                        meta: self.header.mode == VolumeMode::Tree
                            && plan::meta_differs(h, &e.meta, false),
                    });
                }
                self.plan_build(e, segments)?
            }
            EntryKind::HardLink { target } => {
                let target_kept = self
                    .entries
                    .binary_search_by(|(t, _)| t.path.cmp(target))
                    .is_ok_and(|i| matches!(self.entries[i].1, Plan::Keep { .. }));
                let same_inode = match (have, self.existing.get(target)) {
                    (Some(a), Some(b)) => {
                        a.stat.is_file() && a.stat.ino == b.stat.ino && a.stat.dev == b.stat.dev
                    }
                    _ => false,
                };
                if target_kept && same_inode {
                    Plan::Keep { meta: false }
                } else {
                    Plan::Link
                }
            }
            kind => match have {
                Some(h) if plan::same_special(h, kind) => Plan::Keep {
                    meta: plan::meta_differs(h, &e.meta, matches!(kind, EntryKind::Symlink { .. })),
                },
                _ => Plan::Special,
            },
        })
    }

    /// Picks a source for every segment of a file to build.
    fn plan_build(&mut self, e: &Entry, segments: &[Segment]) -> Result<Plan, ApplyError> {
        let block = self.header.mode == VolumeMode::Block;
        let (dir, name) = match e.path.split_last() {
            Some((d, n)) => (d, n.to_vec()),
            None => (RelPath::root(), Vec::new()),
        };
        let temp = temp_name(&name);
        let temp_path = (!block).then(|| dir.join(&temp).ok()).flatten();
        // A partial temp file from an interrupted run (tree), or the device/image itself (block).
        let partial: Option<File> = if block {
            self.existing
                .get(&e.path)
                .and_then(|_| File::open(&self.path).ok())
        } else {
            match &temp_path {
                Some(tp) if self.existing.get(tp).is_some_and(|s| s.stat.is_file()) => {
                    self.vol_mut().open_read(&dir, &temp).ok()
                }
                _ => None,
            }
        };
        // The old file at this path: what the index vouches it holds at each offset, or else
        // the file itself, to check by hash.
        let have = self
            .existing
            .get(&e.path)
            .filter(|h| !block && h.stat.is_file());
        let vouched = have.and_then(|h| {
            let r = self.index.as_mut()?.get(&e.path)?;
            r.vouches(&h.stat).then(|| chunks_by_offset(&r.segments))
        });
        let has_old = have.is_some();
        // Opened only for offsets the index does not vouch for.
        let mut old: Option<File> = None;
        let mut sources = Vec::with_capacity(segments.len());
        // This entry's numbers in `self.sources`: the old file and the file being built.
        let (mut old_file, mut new_file) = (None, None);
        let mut resume = false;
        let mut buf = Vec::new();
        for (off, seg) in offsets(segments) {
            let Segment::Chunk { id, len } = *seg else {
                sources.push(Src::Zero);
                continue;
            };
            let src = if block && self.in_place.get(&off) == Some(&(id, len)) {
                Src::InPlace
            } else if partial
                .as_ref()
                .is_some_and(|f| range_has(f, off, len, &id, &mut buf))
            {
                resume = true;
                Src::InPlace
            } else if vouched
                .as_ref()
                .is_some_and(|at| at.get(&off) == Some(&(id, len)))
            {
                let file = self.sources.add_once(&mut old_file, &dir, &name);
                Src::Clone(Loc { file, offset: off })
            } else if let Some(loc) = vouched.as_ref().and_then(|_| self.local.get(&id)) {
                // Where the index vouches for the old file, a chunk it does not list at this
                // offset is rarely there: after an insertion every later chunk moved, and
                // reading each at its old offset would hash the whole file for nothing.
                // The chunk places know where it is.
                Src::Local(loc)
            } else if has_old && {
                if old.is_none() {
                    old = self.vol_mut().open_read(&dir, &name).ok();
                }
                old.as_ref()
                    .is_some_and(|f| range_has(f, off, len, &id, &mut buf))
            } {
                let file = self.sources.add_once(&mut old_file, &dir, &name);
                Src::Local(Loc { file, offset: off })
            } else if let Some(loc) = self.local.get(&id) {
                Src::Local(loc)
            } else {
                // Not seen before in this run (a second occurrence finds it in `local`).
                self.want.push(id, u64::from(len));
                if let Some(&(base, base_len)) = vouched.as_ref().and_then(|at| at.get(&off))
                    && base_len < len
                {
                    let file = self.sources.add_once(&mut old_file, &dir, &name);
                    let at = Loc { file, offset: off };
                    self.suffix_bases.insert(id, (at, base_len, base));
                }
                Src::Wire
            };
            if !matches!(src, Src::Local(_) | Src::Clone(_)) {
                // Later occurrences copy it from here (in block mode: from the volume itself,
                // at an offset that is written once and never again).
                let name: &[u8] = if block { &[] } else { &temp };
                let file = self.sources.add_once(&mut new_file, &dir, name);
                self.local.add(&id, Loc { file, offset: off });
            }
            sources.push(src);
        }
        // An existing file that already holds exactly this content (the index could not vouch
        // for it, but every chunk checked out) is kept rather than rewritten.
        // A hard-linked inode can stay under its first name only (see `plan_entry`).
        if let Some(f) = &old
            && self.existing.get(&e.path).is_some_and(|h| {
                h.stat.size == e.size()
                    && (h.stat.nlink == 1 || !self.kept_inodes.contains(&(h.stat.dev, h.stat.ino)))
            })
            && offsets(segments)
                .zip(&sources)
                .all(|((off, seg), src)| match src {
                    Src::Local(l) | Src::Clone(l) => Some(l.file) == old_file && l.offset == off,
                    Src::Zero => range_is_zero(f, off, seg.len(), &mut buf),
                    _ => false,
                })
        {
            let have = self.existing.get(&e.path).expect("checked above");
            if have.stat.nlink > 1 {
                self.kept_inodes.insert((have.stat.dev, have.stat.ino));
            }
            return Ok(Plan::Keep {
                meta: plan::meta_differs(have, &e.meta, false),
            });
        }
        Ok(Plan::Build { sources, resume })
    }

    fn vol_mut(&mut self) -> &mut VolumeDir {
        self.vol
            .as_mut()
            .expect("tree destinations have a volume handle")
    }

    /// True if the prepare walk found nothing below the destination's root.
    pub fn is_empty(&self) -> bool {
        self.existing.iter().all(|s| s.path.is_root())
    }

    /// Phase 3 for one entry, in a streamed session: writes the entry planned last, taking the
    /// chunks it needs from the sender from `feed` now.
    pub fn write_planned(
        &mut self,
        feed: &mut dyn ChunkFeed,
        progress: &dyn Progress,
    ) -> Result<(), ApplyError> {
        let Some((e, p)) = self.entries.pop() else {
            return Ok(());
        };
        let result = self.write_entry(&e, &p, feed, progress);
        self.entries.push((e, p));
        result
    }

    /// The digest of the manifest received so far.
    pub fn manifest_digest(&self) -> RootDigest {
        self.digest.finish()
    }

    /// The ordered list of chunks to request from the sender.
    pub fn take_wants(&mut self) -> Vec<ChunkId> {
        self.stats.chunks_wanted = self.want.order.len() as u64;
        self.stats.bytes_wanted = self.want.bytes;
        std::mem::take(&mut self.want.order)
    }

    /// Hints for the sender: wanted chunks that start with a chunk this destination holds.
    pub fn want_hints(&self) -> Vec<WantHint> {
        self.suffix_bases
            .iter()
            .map(|(id, (_, base_len, base))| WantHint {
                id: *id,
                base: *base,
                base_len: *base_len,
            })
            .collect()
    }

    /// Total bytes the progress bar covers.
    pub fn progress_total(&self) -> u64 {
        self.entries.iter().map(|(e, _)| e.size()).sum()
    }

    /// Phase 3: build temp files from local copies and the feed.
    pub fn write(
        &mut self,
        feed: &mut dyn ChunkFeed,
        progress: &dyn Progress,
    ) -> Result<(), ApplyError> {
        progress.phase("writing");
        if self.header.mode == VolumeMode::Block {
            return self.write_block(feed, progress);
        }
        let entries = std::mem::take(&mut self.entries);
        let result = (|| {
            for (e, p) in &entries {
                self.write_entry(e, p, feed, progress)?;
            }
            Ok(())
        })();
        self.entries = entries;
        result
    }

    fn write_entry(
        &mut self,
        e: &Entry,
        p: &Plan,
        feed: &mut dyn ChunkFeed,
        progress: &dyn Progress,
    ) -> Result<(), ApplyError> {
        let shown = e.path.to_string();
        match (p, &e.kind) {
            (
                Plan::Dir {
                    create: true,
                    replace,
                },
                _,
            ) if !e.path.is_root() => {
                let (parent, name) = split(&e.path);
                let vol = self.vol_mut();
                let d = vol
                    .dir(&parent)
                    .map_err(io_err("cannot open directory", &parent))?;
                if *replace {
                    fsops::remove_any(d, &name).map_err(io_err("cannot replace", &shown))?;
                }
                rfs::mkdirat(d, os(&name), Mode::from_raw_mode(0o700))
                    .map_err(|e| io_err("cannot create directory", &shown)(e.into()))?;
                self.created_dirs.push(e.path.clone());
            }
            (Plan::Build { sources, resume }, EntryKind::File { size, segments }) => {
                let (parent, name) = split(&e.path);
                let temp = temp_name(&name);
                let vol = self.vol.as_mut().expect("tree");
                let d = vol
                    .dir(&parent)
                    .map_err(io_err("cannot open directory", &parent))?;
                let file = fsops::create_temp(d, &temp, *resume)
                    .map_err(io_err("cannot create", &shown))?;
                self.created_temps.push((parent.clone(), temp.clone()));
                let mut reader = LocalReader::default();
                let mut clone = PendingClone::default();
                for ((off, seg), src) in offsets(segments).zip(sources) {
                    let Segment::Chunk { id, len } = *seg else {
                        continue;
                    };
                    if let Src::Clone(loc) = src
                        && clone.extend(loc, off, len)
                    {
                        progress.advance(u64::from(len));
                        continue;
                    }
                    let vol = self.vol.as_mut().expect("tree");
                    self.stats.bytes_copied_locally +=
                        clone.flush(&mut reader, vol, &self.sources, &file)?;
                    let data = match src {
                        Src::Clone(loc) => {
                            clone.start(loc, off, len);
                            progress.advance(u64::from(len));
                            continue;
                        }
                        Src::Zero | Src::InPlace => None,
                        Src::Local(loc) => {
                            let d = reader.read(vol, &self.sources, loc, len, &id)?;
                            self.stats.bytes_copied_locally += u64::from(len);
                            Some(d)
                        }
                        Src::Wire => {
                            let base = match self.suffix_bases.get(&id) {
                                Some((at, len, base)) => {
                                    Some((*base, reader.read(vol, &self.sources, at, *len, base)?))
                                }
                                None => None,
                            };
                            let base = base.as_ref().map(|(id, b)| (*id, &b[..]));
                            Some(feed.next_chunk(id, base)?)
                        }
                    };
                    if let Some(data) = data {
                        file.write_all_at(&data, off)
                            .map_err(io_err("cannot write", &shown))?;
                        if *src == Src::Wire {
                            crate::crashpoint::reached("chunk");
                        }
                    }
                    progress.advance(u64::from(len));
                }
                let vol = self.vol.as_mut().expect("tree");
                self.stats.bytes_copied_locally +=
                    clone.flush(&mut reader, vol, &self.sources, &file)?;
                file.set_len(*size).map_err(io_err("cannot size", &shown))?;
                progress.advance(
                    segments
                        .iter()
                        .filter(|s| matches!(s, Segment::Zero { .. }))
                        .map(Segment::len)
                        .sum(),
                );
                fsops::apply_meta_fd(&file, &e.meta)
                    .map_err(io_err("cannot set attributes of", &shown))?;
                self.stats.files_written += 1;
                if *size >= flusher::EARLY_SYNC_MIN {
                    self.flusher.submit(file, shown);
                } else {
                    self.unsynced += size;
                    if self.unsynced >= flusher::EARLY_SYNC_EVERY {
                        self.unsynced = 0;
                        let vol = self.vol.as_mut().expect("tree");
                        let root = vol.root_path().display().to_string();
                        let handle = vol
                            .dir(&RelPath::root())
                            .and_then(|d| d.try_clone())
                            .map_err(io_err("cannot sync", &root))?;
                        self.flusher.submit_filesystem(File::from(handle), root);
                    }
                }
            }
            (Plan::Special, kind) => {
                let (parent, name) = split(&e.path);
                let temp = temp_name(&name);
                let vol = self.vol_mut();
                let d = vol
                    .dir(&parent)
                    .map_err(io_err("cannot open directory", &parent))?;
                fsops::remove_any(d, &temp).map_err(io_err("cannot clear", &shown))?;
                let perm = Mode::from_raw_mode(e.meta.perm);
                let made = match kind {
                    EntryKind::Symlink { target } => rfs::symlinkat(os(target), d, os(&temp)),
                    EntryKind::Fifo => rfs::mknodat(d, os(&temp), FileType::Fifo, perm, 0),
                    EntryKind::Socket => rfs::mknodat(d, os(&temp), FileType::Socket, perm, 0),
                    EntryKind::CharDevice { rdev } => {
                        rfs::mknodat(d, os(&temp), FileType::CharacterDevice, perm, *rdev)
                    }
                    EntryKind::BlockDevice { rdev } => {
                        rfs::mknodat(d, os(&temp), FileType::BlockDevice, perm, *rdev)
                    }
                    _ => unreachable!("special plans are only made for special kinds"),
                };
                made.map_err(|err| io_err("cannot create", &shown)(err.into()))?;
                let d = self
                    .vol_mut()
                    .dir(&parent)
                    .map_err(io_err("cannot open directory", &parent))?;
                fsops::apply_meta_at(d, &temp, &e.meta, matches!(kind, EntryKind::Symlink { .. }))
                    .map_err(io_err("cannot set attributes of", &shown))?;
                self.created_temps.push((parent, temp));
            }
            _ => {}
        }
        Ok(())
    }

    fn write_block(
        &mut self,
        feed: &mut dyn ChunkFeed,
        progress: &dyn Progress,
    ) -> Result<(), ApplyError> {
        let (e, p) = self
            .entries
            .first()
            .cloned()
            .ok_or_else(|| ApplyError::Manifest("empty block manifest".into()))?;
        let shown = self.path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(io_err("cannot open", &shown))?;
        let is_device = file
            .metadata()
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        let have = crate::volume::volume_size(&file).map_err(io_err("cannot size", &shown))?;
        let size = e.size();
        if is_device && have < size {
            return Err(ApplyError::DeviceTooSmall {
                path: self.path.clone(),
                have,
                need: size,
            });
        }
        if let Plan::Build { sources, .. } = &p {
            self.touched = sources.iter().any(|s| *s != Src::InPlace) || have != size;
            if !is_device && have > size {
                file.set_len(size).map_err(io_err("cannot size", &shown))?;
            }
            let mut buf = Vec::new();
            let mut unsynced = 0;
            for ((off, seg), src) in offsets(e.segments()).zip(sources) {
                if unsynced >= flusher::EARLY_SYNC_EVERY {
                    // Let the disk work through what is written so far while more arrives.
                    let handle = file.try_clone().map_err(io_err("cannot sync", &shown))?;
                    self.flusher.submit(handle, shown.clone());
                    unsynced = 0;
                }
                match (*seg, src) {
                    (Segment::Chunk { id, .. }, Src::Wire) => {
                        let data = feed.next_chunk(id, None)?;
                        file.write_all_at(&data, off)
                            .map_err(io_err("cannot write", &shown))?;
                        crate::crashpoint::reached("chunk");
                        self.stats.files_written = 1;
                        unsynced += data.len() as u64;
                    }
                    (Segment::Chunk { id, len }, Src::Local(loc)) => {
                        if !range_has(&file, loc.offset, len, &id, &mut buf) {
                            return Err(ApplyError::LocalChanged(shown.clone()));
                        }
                        file.write_all_at(&buf, off)
                            .map_err(io_err("cannot write", &shown))?;
                        self.stats.bytes_copied_locally += u64::from(len);
                    }
                    (Segment::Zero { len }, _) if off < have => {
                        // Only punch where the old content may hold data.
                        let end = (off + len).min(have);
                        if !range_is_zero(&file, off, end - off, &mut buf) {
                            fsops::zero_range(&file, off, end - off)
                                .map_err(io_err("cannot zero", &shown))?;
                        }
                    }
                    _ => {}
                }
                progress.advance(seg.len());
            }
            if !is_device {
                file.set_len(size).map_err(io_err("cannot size", &shown))?;
            }
        }
        self.flusher.finish()?;
        file.sync_all().map_err(io_err("cannot sync", &shown))?;
        Ok(())
    }

    /// Removes what this run created; used when the sync is abandoned on purpose.
    pub fn discard(&mut self) {
        let Some(vol) = self.vol.as_mut() else { return };
        // Directories whose entries we touch; their mtimes are put back afterwards.
        let mut touched: Vec<RelPath> = Vec::new();
        for (dir, temp) in self.created_temps.drain(..).rev() {
            if let Ok(d) = vol.dir(&dir) {
                let _ = fsops::remove_any(d, &temp);
            }
            touched.push(dir);
        }
        for dir in self.created_dirs.drain(..).rev() {
            let (parent, name) = split(&dir);
            vol.invalidate();
            if let Ok(d) = vol.dir(&parent) {
                let _ = rfs::unlinkat(d, os(&name), AtFlags::REMOVEDIR);
            }
            touched.push(parent);
        }
        touched.sort();
        touched.dedup();
        for dir in touched {
            if let Some(had) = self.existing.get(&dir)
                && had.stat.is_dir()
                && let Ok(d) = vol.dir(&dir)
            {
                let _ = fsops::set_mtime_fd(d, had.stat.mtime_sec, had.stat.mtime_nsec);
            }
        }
    }

    /// Phases 4 and 5: make everything durable and visible, then verify and record.
    pub fn commit(
        mut self,
        expected: RootDigest,
        progress: &dyn Progress,
    ) -> Result<Committed, ApplyError> {
        progress.phase("committing");
        let t = std::time::Instant::now();
        if self.header.mode == VolumeMode::Tree {
            self.commit_tree()?;
        }
        progress.phase("verifying");
        tracing::debug!(
            touched = self.touched,
            ms = t.elapsed().as_millis(),
            "committed"
        );
        let t = std::time::Instant::now();
        let (root, index) = self.verify()?;
        tracing::debug!(ms = t.elapsed().as_millis(), "verified");
        if root != expected {
            return Err(ApplyError::DigestMismatch {
                got: root,
                want: expected,
            });
        }
        self.state
            .mark_complete(&self.path, root)
            .map_err(io_err("cannot write state of", &self.path.display()))?;
        if let Some(Err(e)) = self.store.take().map(StoreWriter::publish) {
            tracing::warn!("cannot keep this manifest for the next delta: {e}");
        }
        Ok(Committed {
            root,
            stats: self.stats,
            index,
            dest: self,
        })
    }

    fn commit_tree(&mut self) -> Result<(), ApplyError> {
        let vol = self.vol.as_mut().expect("tree");
        let root_shown = vol.root_path().display().to_string();
        self.flusher.finish()?;
        let changed = !self.created_temps.is_empty() || !self.created_dirs.is_empty();
        if changed {
            // Temp file data must be durable before any rename makes it visible.
            fsops::syncfs(
                vol.dir(&RelPath::root())
                    .map_err(io_err("cannot open", &root_shown))?,
            )
            .map_err(io_err("cannot sync", &root_shown))?;
        }
        let mut touched = changed;
        for (e, p) in &self.entries {
            if matches!(p, Plan::Keep { meta: false } | Plan::Dir { .. }) {
                continue; // nothing to do here (directory attributes come last)
            }
            let shown = &e.path;
            let Some((parent, name)) = e.path.split_last() else {
                continue;
            };
            let name = name.to_vec();
            let was_dir = self.existing.get(&e.path).is_some_and(|s| s.stat.is_dir());
            match p {
                Plan::Build { .. } | Plan::Special => {
                    let d = vol
                        .dir(&parent)
                        .map_err(io_err("cannot open directory", &parent))?;
                    if was_dir {
                        fsops::remove_any(d, &name).map_err(io_err("cannot replace", shown))?;
                    }
                    rfs::renameat(d, os(&temp_name(&name)), d, os(&name))
                        .map_err(|err| io_err("cannot rename into place", shown)(err.into()))?;
                    crate::crashpoint::reached("rename");
                    touched = true;
                }
                Plan::Link => {
                    let EntryKind::HardLink { target } = &e.kind else {
                        continue;
                    };
                    let (tparent, tname) = split(target);
                    let temp = temp_name(&name);
                    let td = vol
                        .dir(&tparent)
                        .map_err(io_err("cannot open directory", &tparent))?;
                    let td = td
                        .try_clone()
                        .map_err(io_err("cannot open directory", &tparent))?;
                    let d = vol
                        .dir(&parent)
                        .map_err(io_err("cannot open directory", &parent))?;
                    if was_dir {
                        fsops::remove_any(d, &name).map_err(io_err("cannot replace", shown))?;
                    }
                    fsops::remove_any(d, &temp).map_err(io_err("cannot clear", shown))?;
                    rfs::linkat(&td, os(&tname), d, os(&temp), AtFlags::empty())
                        .map_err(|err| io_err("cannot link", shown)(err.into()))?;
                    rfs::renameat(d, os(&temp), d, os(&name))
                        .map_err(|err| io_err("cannot rename into place", shown)(err.into()))?;
                    touched = true;
                }
                Plan::Keep { meta: true } if !matches!(e.kind, EntryKind::Dir) => {
                    let d = vol
                        .dir(&parent)
                        .map_err(io_err("cannot open directory", &parent))?;
                    if let EntryKind::File { .. } = e.kind {
                        let f = rfs::openat(
                            d,
                            os(&name),
                            rfs::OFlags::RDONLY | rfs::OFlags::NOFOLLOW | rfs::OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(|err| io_err("cannot open", shown)(err.into()))?;
                        fsops::apply_meta_fd(&f, &e.meta)
                            .map_err(io_err("cannot set attributes of", shown))?;
                    } else {
                        let symlink = matches!(e.kind, EntryKind::Symlink { .. });
                        fsops::apply_meta_at(d, &name, &e.meta, symlink)
                            .map_err(io_err("cannot set attributes of", shown))?;
                    }
                    touched = true;
                }
                _ => {}
            }
        }
        // Remove what the source no longer has, children before parents. When every path the
        // prepare walk found is also in the manifest (the usual incremental), there is none.
        let mut extra: Vec<&RelPath> = Vec::new();
        if self.matched < self.existing.len() {
            let wanted: HashSet<&RelPath> = self.entries.iter().map(|(e, _)| &e.path).collect();
            extra.extend(
                self.existing
                    .iter()
                    .map(|s| &s.path)
                    .filter(|p| !wanted.contains(p)),
            );
        }
        extra.sort();
        vol.invalidate();
        for p in extra.into_iter().rev() {
            let (parent, name) = split(p);
            let Ok(d) = vol.dir(&parent) else { continue }; // parent already gone or replaced
            fsops::remove_any(d, &name).map_err(io_err("cannot delete", p))?;
            self.stats.deleted += 1;
            touched = true;
        }
        // Directory attributes last, deepest first: creating children changed their mtimes.
        let mut dirs: Vec<&(Entry, Plan)> = self
            .entries
            .iter()
            .filter(|(e, _)| matches!(e.kind, EntryKind::Dir))
            .collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.0.path.depth()));
        for (e, _) in dirs {
            let shown = &e.path;
            let have = self.existing.get(&e.path);
            if touched || have.is_none_or(|h| plan::meta_differs(h, &e.meta, false)) {
                let d = vol
                    .dir(&e.path)
                    .map_err(io_err("cannot open directory", shown))?;
                fsops::apply_meta_fd(d, &e.meta)
                    .map_err(io_err("cannot set attributes of", shown))?;
                touched = true;
            }
        }
        self.touched = touched;
        crate::crashpoint::reached("commit-sync");
        if touched {
            self.last_change = Some(std::time::Instant::now());
            fsops::syncfs(
                vol.dir(&RelPath::root())
                    .map_err(io_err("cannot open", &root_shown))?,
            )
            .map_err(io_err("cannot sync", &root_shown))?;
        }
        Ok(())
    }
}

fn split(p: &RelPath) -> (RelPath, Vec<u8>) {
    match p.split_last() {
        Some((d, n)) => (d, n.to_vec()),
        None => (RelPath::root(), Vec::new()),
    }
}
