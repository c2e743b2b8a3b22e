//! The receiver's side: turning a manifest plus chunks into a durable, verified destination.
//!
//! Phases, each finishing before the next starts:
//! 1. **prepare** — walk the destination (`stat` only) into a spool file, and note where the
//!    receiver index says its chunks are; mark the destination *incomplete* in its state file.
//! 2. **plan** — for each incoming entry decide what to do ([`plan::Plan`]) and which chunks
//!    must come from the sender (the want list).
//! 3. **write** — build every new file under a temp name in its final directory, from local
//!    copies and received chunks (each verified against its name), set its metadata.
//! 4. **commit** — make the temp files durable, rename them into place, remove what the source
//!    no longer has, set directory metadata deepest first, make all that durable: `fsync`s of
//!    the inodes changed when they are few, `syncfs` otherwise ([`durable`]).
//! 5. **verify** — recompute the result's root digest (reading again what this run touched);
//!    only if it equals the sender's is the state file switched to *complete, root R*.
//!
//! In a streamed session (an empty destination, see docs/protocol.md) phases 2 and 3 run
//! entry by entry: each file is planned and written as soon as its chunks arrive.
//!
//! Memory does not grow with the volume's entries: the walk and the manifest both come in
//! volume order, so planning merges the walk's spool with the incoming entries, and each
//! planned entry goes to a second spool ([`spool`]) that the write, commit and verify passes
//! read front to back. What stays in memory grows with chunks instead (where the
//! destination's chunks are, what this run wants) and with hard-linked inodes.
//!
//! Nothing under a final name changes before phase 4, so an abort in phases 1–3 leaves the
//! destination as it was (temp files are removed on a clean abort, kept for resume if the
//! connection broke). See docs/architecture.md for the crash-safety argument.

mod behind;
mod changes;
mod commit;
mod durable;
pub mod flusher;
pub mod fsops;
mod local;
mod partials;
mod patch;
pub mod plan;
mod planning;
mod readahead;
mod retired;
mod spool;
#[cfg(test)]
mod tests;
mod verify;
mod write;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::chunk::window::ChunkWindow;
use crate::chunk::{ChunkId, Segment};
use crate::index::{IndexEntry, IndexReader, IndexWriter, now_ns};
use crate::manifest::store::StoreWriter;
use crate::manifest::{DigestBuilder, Entry, EntryKind, Header, RelPath, RootDigest, VolumeMode};
use crate::protocol::message::WantHint;
use crate::state::TargetState;
use crate::volume::StatInfo;
use crate::volume::walk::{Scanned, WalkError, WalkOptions, scan_one, walk_with};
use fsops::VolumeDir;
use plan::{ChunkFilter, ChunkPlaces, Loc, Plan, SourceFiles, WantList, chunks_by_offset};
use planning::Links;
use spool::{Planned, Spool, SpoolReader};

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
    #[error("received {got} where chunk {want} was due")]
    NotAChunk { got: &'static str, want: ChunkId },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("after applying, the destination digest is {got} but the source's is {want}")]
    DigestMismatch { got: RootDigest, want: RootDigest },
}

fn io_err(
    what: &'static str,
    path: &dyn std::fmt::Display,
) -> impl FnOnce(io::Error) -> ApplyError + use<> {
    let path = path.to_string();
    move |source| ApplyError::Io { what, path, source }
}

/// Supplies received chunks, in want order, already verified.
pub trait ChunkFeed {
    /// The next chunk from the sender, which must be `expect`. `base` is the chunk this
    /// receiver hinted `expect` starts with, and its bytes: the sender may send only the rest.
    /// `None`: the chunk went stale at a live source (see [`Destination::unfinished`]).
    fn next_chunk(
        &mut self,
        expect: ChunkId,
        base: Option<(ChunkId, &[u8])>,
    ) -> Result<Option<Bytes>, ApplyError>;
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
    /// Of `files_written`, those patched at their final name ([`patch`]).
    pub files_patched: u64,
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
    /// trust them without reading them. First, the large old files the commit replaced or
    /// removed are freed ([`retired`]).
    pub fn save_index(mut self) {
        // Off the sender's wait too: the blocks of the large files this sync replaced.
        self.dest.retired.release();
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
    /// What the prepare walk found, read along with the manifest (both in volume order).
    found: Found,
    /// The same, for another pass (building `dst_chunks`).
    walked: Spool<Scanned>,
    /// The prepare walk found something below the root.
    found_below_root: bool,
    /// The prepare walk found a temp file (one an interrupted run left): only then may a
    /// file to build have a partial temp file to resume.
    found_temp: bool,
    /// Every planned entry and every destination path the manifest lacks, in volume order.
    planned: Spool<Planned>,
    /// The entry planned last: a streamed session writes it at once; a block volume has
    /// no other.
    last: Option<(Entry, Plan)>,
    /// The directories among the entries on the path to the one planned last.
    ancestors: Vec<RelPath>,
    links: Links,
    /// The receiver index, read along with the manifest (both in volume order).
    index: Option<IndexReader>,
    /// Where chunks planned this run will be (a later occurrence copies the first).
    local: ChunkPlaces,
    /// Where the destination's chunks are, per its index.
    dst_chunks: DstChunks,
    /// The files `local` and `dst_chunks` point into.
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
    want: WantList,
    /// Wanted chunks that start with the old file's chunk at the same offset (appends): that
    /// chunk's place, length and id. Sent as hints; the sender may send only what follows.
    suffix_bases: HashMap<ChunkId, (Loc, u32, ChunkId)>,
    digest: DigestBuilder,
    /// A copy of the manifest, kept once the destination is complete (the next delta's base).
    store: Option<StoreWriter>,
    /// Records of `planned` the write phase has started on: a clean abort removes what they
    /// created.
    written: u64,
    /// The write phase created something (a temp file or a directory).
    created: bool,
    /// Some planned step has work for the commit pass (beyond what `created` implies).
    commit_work: bool,
    /// Destination inodes with several names that one of them keeps (see `plan_entry`).
    kept_inodes: HashSet<(u64, u64)>,
    /// Large files with small changes are patched at their final name ([`patch`]).
    patching: bool,
    /// The receiver index is gone: this run writes into files at their final names
    /// ([`Destination::before_writing_in_place`]).
    index_dropped: bool,
    /// Bytes of every file in the manifest: what the progress bar covers.
    bytes_planned: u64,
    /// What the write phase will read of the destination, in write order (a delta only).
    read_runs: Option<Spool<readahead::ReadRun>>,
    /// Asks the kernel for those ranges ahead of the write phase, while it runs.
    read_ahead: Option<readahead::ReadAhead>,
    /// Syncs big finished files while later ones are written.
    flusher: flusher::Flusher,
    /// What the commit makes durable: the inodes this run changed, or the filesystem.
    durable: durable::Durable,
    /// Bytes of small files written since the last early `syncfs`.
    unsynced: u64,
    /// The small files written last, whose pages are asked out of the cache in turn.
    recent: behind::RecentFiles,
    /// Large old files the commit replaced or removed, freed once the sync is done.
    retired: retired::Retired,
    /// Chunks a live source no longer held when they were due: every place they were
    /// planned at stays unwritten.
    stale: HashSet<ChunkId>,
    /// Files (or the block volume) left missing a stale chunk.
    unfinished_files: u64,
    /// What the last run recorded of its temp files, and what this one writes.
    partials: partials::Partials,
    pub stats: ApplyStats,
}

/// Where the destination's chunks are, for copies across files: a filter until a lookup
/// needs a place, then a table built by one pass over the walk's spool and the index.
enum DstChunks {
    Filtered(ChunkFilter),
    Placed(ChunkPlaces),
}

/// The index record of a regular file the walk found, if its stat still matches (the file
/// then probably holds the chunks listed: every chunk read from it is verified).
fn located<'a>(index: &'a mut Option<IndexReader>, s: &Scanned) -> Option<&'a IndexEntry> {
    index
        .as_mut()?
        .get(&s.path)
        .filter(|r| s.stat.is_file() && r.locates(&s.stat))
}

/// The spool of the prepare walk, read in step with the manifest.
struct Found {
    reader: SpoolReader<Scanned>,
    ahead: Option<Scanned>,
}

impl Found {
    fn peek(&mut self) -> io::Result<Option<&Scanned>> {
        if self.ahead.is_none() {
            self.ahead = self.reader.next()?;
        }
        Ok(self.ahead.as_ref())
    }

    /// The next entry found before `bound` (all that are left, without one): a path the
    /// manifest lacks.
    fn take_before(&mut self, bound: Option<&RelPath>) -> io::Result<Option<Scanned>> {
        Ok(match self.peek()? {
            Some(s) if bound.is_none_or(|b| s.path < *b) => self.ahead.take(),
            _ => None,
        })
    }

    /// The entry found at `path`, once every entry before it has been taken.
    fn take_at(&mut self, path: &RelPath) -> io::Result<Option<Scanned>> {
        Ok(match self.peek()? {
            Some(s) if s.path == *path => self.ahead.take(),
            _ => None,
        })
    }
}

impl Destination {
    /// Phase 1: look at the destination and mark it incomplete.
    pub fn prepare(path: &Path, header: Header, state: TargetState) -> Result<Self, ApplyError> {
        Self::prepare_with(path, header, state, false)
    }

    /// Phase 1 of a dry run: look at the destination and change nothing, neither it (an
    /// absent one is planned as empty, not created) nor its state. Only [`Self::plan`],
    /// [`Self::end_manifest`] and [`Self::changes`] may follow.
    pub fn look(path: &Path, header: Header, state: TargetState) -> Result<Self, ApplyError> {
        Self::prepare_with(path, header, state, true)
    }

    fn prepare_with(
        path: &Path,
        header: Header,
        state: TargetState,
        dry_run: bool,
    ) -> Result<Self, ApplyError> {
        let prepared_at = now_ns();
        let index_file = state.index_file();
        let scratch = state.dir.clone();
        let scratch_err = || io_err("cannot write a scratch file in", &scratch.display());
        let mut found = Spool::create(&scratch).map_err(scratch_err())?;
        let planned = Spool::create(&scratch).map_err(scratch_err())?;
        let mut vol = None;
        // Which chunks the destination probably holds: those of files whose stat is unchanged
        // since the index recorded them (every chunk read is verified, so racy records count
        // too). A chunk takes at least 34 bytes of an index record.
        let index_len = std::fs::metadata(&index_file).map_or(0, |m| m.len());
        let mut filter = ChunkFilter::with_capacity(index_len / 34);
        let mut found_below_root = false;
        let mut found_temp = false;
        let mut durable = durable::Durable::default();
        match header.mode {
            VolumeMode::Tree => {
                match std::fs::symlink_metadata(path) {
                    Ok(m) if !m.is_dir() => {
                        return Err(ApplyError::NotADirectory(path.to_path_buf()));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound && dry_run => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        std::fs::create_dir_all(path)
                            .map_err(io_err("cannot create", &path.display()))?;
                        // Its name and its parents' are made durable by a `syncfs`.
                        durable.whole_filesystem();
                    }
                    Err(e) => return Err(io_err("cannot stat", &path.display())(e)),
                }
                let absent = dry_run && std::fs::symlink_metadata(path).is_err();
                // The index is in volume order too: it is read in step with the walk.
                // It also vouches for files' attributes, which the walk then does not list:
                // asked just before the file is visited.
                let records = RefCell::new(IndexReader::open(&index_file, header.chunker));
                let mut known_xattrs = |p: &RelPath, st: &StatInfo| {
                    records.borrow_mut().as_mut()?.vouched_xattrs(p, st)
                };
                let visit = &mut |s: Scanned| {
                    found_below_root |= !s.path.is_root();
                    found_temp |= s.stat.is_file()
                        && s.path
                            .split_last()
                            .is_some_and(|(_, n)| fsops::is_temp_name(n));
                    if let Some(r) = located(&mut records.borrow_mut(), &s) {
                        for seg in &r.segments {
                            if let Segment::Chunk { id, .. } = seg {
                                filter.add(id);
                            }
                        }
                    }
                    found.push(&s).map_err(|e| WalkError::io(&scratch, e))
                };
                if !absent {
                    walk_with(path, WalkOptions::default(), &mut known_xattrs, visit)
                        .map_err(|e| ApplyError::Manifest(e.to_string()))?;
                    vol = Some(
                        VolumeDir::open(path).map_err(io_err("cannot open", &path.display()))?,
                    );
                }
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
                    found.push(&s).map_err(scratch_err())?;
                }
            }
        }
        if !dry_run {
            state
                .mark_incomplete(path)
                .map_err(io_err("cannot write state of", &path.display()))?;
        }
        let partials = match (dry_run, header.mode) {
            (false, VolumeMode::Tree) => partials::Partials::take(&state, header.chunker),
            _ => partials::Partials::default(),
        };
        let mut walked = found;
        let mut found = Found {
            reader: walked.read().map_err(scratch_err())?,
            ahead: None,
        };
        // A second pass over the index goes along with the manifest.
        let mut index = IndexReader::open(&index_file, header.chunker);
        if index
            .as_ref()
            .is_some_and(IndexReader::written_before_this_boot)
        {
            tracing::info!("receiver index written before this boot: every file is read back once");
        }
        // A block image the index vouches for needs no reading to know what it holds.
        let in_place = match found.peek().map_err(scratch_err())? {
            Some(have) if header.mode == VolumeMode::Block && have.stat.is_file() => index
                .as_mut()
                .and_then(|i| i.get(&RelPath::root()))
                .filter(|e| e.vouches(&have.stat))
                .map(|e| chunks_by_offset(&e.segments))
                .unwrap_or_default(),
            _ => HashMap::new(),
        };
        let store = match dry_run {
            true => None,
            false => StoreWriter::create(&state.manifest_file(), &header)
                .map_err(|e| tracing::warn!("cannot keep this manifest for the next delta: {e}"))
                .ok(),
        };
        Ok(Destination {
            path: path.to_path_buf(),
            digest: DigestBuilder::new(&header),
            store,
            header,
            state,
            vol,
            found,
            walked,
            found_below_root,
            found_temp,
            planned,
            last: None,
            ancestors: Vec::new(),
            links: Links::default(),
            index,
            local: ChunkPlaces::default(),
            dst_chunks: DstChunks::Filtered(filter),
            sources: SourceFiles::default(),
            in_place,
            touched: false,
            prepared_at,
            last_change: None,
            want: WantList::default(),
            suffix_bases: HashMap::new(),
            written: 0,
            created: false,
            commit_work: false,
            kept_inodes: HashSet::new(),
            patching: false,
            index_dropped: false,
            bytes_planned: 0,
            read_runs: None,
            read_ahead: None,
            flusher: flusher::Flusher::default(),
            durable,
            unsynced: 0,
            recent: behind::RecentFiles::default(),
            retired: retired::Retired::default(),
            stale: HashSet::new(),
            unfinished_files: 0,
            partials,
            stats: ApplyStats::default(),
        })
    }

    /// The error of a scratch-file operation, formatted only if there is one (planning
    /// touches the spools several times per entry).
    fn scratch_err(&self) -> impl FnOnce(io::Error) -> ApplyError + '_ {
        |source| ApplyError::Io {
            what: "cannot use a scratch file in",
            path: self.state.dir.display().to_string(),
            source,
        }
    }

    /// Reads the planned steps from the start.
    fn steps(&mut self) -> Result<Steps, ApplyError> {
        let reader = self.planned.read().map_err(self.scratch_err())?;
        Ok(Steps {
            reader,
            scratch: self.state.dir.clone(),
        })
    }

    /// Called before this run first writes into a file at its final name (a patch, a disk
    /// image): the receiver index goes, durably, first. A power cut can leave new bytes in
    /// such a file under its old stat, and the index would then vouch for old chunks there
    /// (a file whose source went back to them would be kept as it is). The run that
    /// completes writes a new index; one that does not leaves the next to read the files.
    fn before_writing_in_place(&mut self) -> Result<(), ApplyError> {
        if !self.index_dropped {
            self.state.drop_index().map_err(io_err(
                "cannot remove the receiver index in",
                &self.state.dir.display(),
            ))?;
            self.index_dropped = true;
        }
        Ok(())
    }

    fn vol_mut(&mut self) -> &mut VolumeDir {
        self.vol
            .as_mut()
            .expect("tree destinations have a volume handle")
    }

    /// True if the prepare walk found nothing below the destination's root.
    pub fn is_empty(&self) -> bool {
        !self.found_below_root
    }

    /// The digest of the manifest received so far.
    pub fn manifest_digest(&self) -> RootDigest {
        self.digest.finish()
    }

    /// After the write phase of a live session in which chunks went stale: what is left
    /// unfinished. Such a run must not commit: it keeps its partial files
    /// ([`Destination::keep_for_resume`]), and the next run resumes them (chunks at their
    /// offsets trusted from the run's record, see `partials.rs`, or else hash-checked), so it
    /// sends only what changed since and what went stale.
    pub fn unfinished(&self) -> Option<crate::protocol::message::Unfinished> {
        (!self.stale.is_empty()).then_some(crate::protocol::message::Unfinished {
            files: self.unfinished_files,
            chunks: self.stale.len() as u64,
        })
    }

    /// A streamed session: the sender sends every chunk new to the destination unasked, so
    /// wanted chunks are only counted, not listed.
    pub fn stream(&mut self) {
        self.want.unasked = true;
        self.local = ChunkPlaces::Recent(ChunkWindow::default());
    }

    /// Patch large files with small changes at their final name instead of rebuilding them
    /// under a temp name (`--inplace`, see [`patch`]). A streamed session has nothing to patch.
    pub fn patch_in_place(&mut self) {
        self.patching = self.header.mode == VolumeMode::Tree;
    }

    /// The ordered list of chunks to request from the sender.
    pub fn take_wants(&mut self) -> Vec<ChunkId> {
        self.stats.chunks_wanted = self.want.count;
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
        self.bytes_planned
    }
}

/// Decodes `data` as the records of the receiver's scratch files, for the fuzz target: a
/// damaged scratch file must give an error, never a panic.
#[doc(hidden)]
pub fn decode_scratch_records(data: &[u8]) {
    use spool::Record;
    let _ = Planned::decode(&mut crate::codec::Reader::new(data));
    let _ = Scanned::decode(&mut crate::codec::Reader::new(data));
    let _ = readahead::ReadRun::decode(&mut crate::codec::Reader::new(data));
}

/// The planned steps read back in order.
struct Steps {
    reader: SpoolReader<Planned>,
    scratch: PathBuf,
}

impl Steps {
    /// The next step, a hard link with the plan `end_manifest` decided for it.
    fn next(&mut self, links: &Links) -> Result<Option<Planned>, ApplyError> {
        let step = self.reader.next().map_err(|source| ApplyError::Io {
            what: "cannot read a scratch file in",
            path: self.scratch.display().to_string(),
            source,
        })?;
        Ok(step.map(|mut s| {
            if let Planned::Entry { entry, plan, .. } = &mut s
                && matches!(entry.kind, EntryKind::HardLink { .. })
                && links.kept.contains(&entry.path)
            {
                *plan = Plan::Keep { meta: false };
            }
            s
        }))
    }
}

fn split(p: &RelPath) -> (RelPath, Vec<u8>) {
    match p.split_last() {
        Some((d, n)) => (d, n.to_vec()),
        None => (RelPath::root(), Vec::new()),
    }
}
