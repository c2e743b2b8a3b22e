//! Phase 2: deciding, entry by entry as the manifest arrives, what the receiver will do.
//!
//! Each entry is checked (volume order, a parent directory before it), met with what the
//! prepare walk found at its path (the walk's spool is read in step: paths the manifest
//! skips are removals), planned ([`Plan`]) and written to the spool of planned steps. Hard
//! links are checked once the manifest has ended, by one more pass over that spool.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;

use super::fsops::temp_name;
use super::local::{range_has, range_is_zero};
use super::patch;
use super::plan::{self, ChunkPlaces, Loc, Plan, Src, chunks_by_offset, first_offsets, offsets};
use super::readahead::{self, ReadRun};
use super::spool::{Planned, Spool};
use super::{ApplyError, Destination, DstChunks, located, split};
use crate::chunk::{ChunkId, Segment};
use crate::index::IndexReader;
use crate::manifest::store::StoreWriter;
use crate::manifest::{Entry, EntryKind, RelPath, VolumeMode, encode_entry};
use crate::volume::StatInfo;
use crate::volume::walk::Scanned;

/// Hard links wait for the end of the manifest to be checked: whether a target is an
/// earlier regular file, and whether it is kept as it is, are in the spool by then.
/// Memory grows with hard links only.
#[derive(Debug, Default)]
pub(super) struct Links {
    pending: Vec<PendingLink>,
    /// Links found already in place: their target is kept, and the destination has both
    /// names on one inode.
    pub(super) kept: HashSet<RelPath>,
    /// Targets of the links this run makes: their inode gains a name, so its ctime changes.
    pub(super) gaining: HashSet<RelPath>,
}

#[derive(Debug)]
struct PendingLink {
    path: RelPath,
    target: RelPath,
    /// The inode the destination has at `path`, if a regular file.
    inode: Option<(u64, u64)>,
}

/// What the check of hard links needs to know about a target.
#[derive(Clone, Copy, Debug)]
struct Target {
    kept: bool,
    inode: Option<(u64, u64)>,
}

fn file_inode(have: Option<&Scanned>) -> Option<(u64, u64)> {
    have.filter(|h| h.stat.is_file())
        .map(|h| (h.stat.dev, h.stat.ino))
}

impl Destination {
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
        self.check_parent(&entry)?;
        // What the destination has before this entry, the manifest lacks.
        while let Some(extra) = self
            .found
            .take_before(Some(&entry.path))
            .map_err(self.scratch_err())?
        {
            self.planned
                .push(&Planned::Extra(extra))
                .map_err(self.scratch_err())?;
            self.commit_work = true;
        }
        let have = self
            .found
            .take_at(&entry.path)
            .map_err(self.scratch_err())?;
        if let EntryKind::HardLink { target } = &entry.kind {
            if *target >= entry.path {
                return Err(not_an_earlier_file(&entry.path, target));
            }
            self.links.pending.push(PendingLink {
                path: entry.path.clone(),
                target: target.clone(),
                inode: file_inode(have.as_ref()),
            });
        }
        let plan = self.plan_entry(&entry, have.as_ref())?;
        if let (Plan::Build { sources, patch, .. }, EntryKind::File { segments, .. }) =
            (&plan, &entry.kind)
        {
            self.note_read_runs(segments, sources, *patch)?;
        }
        self.stats.entries += 1;
        if let EntryKind::File { size, segments } = &entry.kind {
            self.stats.files += 1;
            self.stats.bytes_total += size;
            self.stats.chunks_total += segments
                .iter()
                .filter(|s| matches!(s, Segment::Chunk { .. }))
                .count() as u64;
            self.bytes_planned += size;
        }
        self.commit_work |= match &plan {
            Plan::Keep { meta } => *meta,
            // Decided at the end of the manifest.
            Plan::Link => false,
            Plan::Dir { create, .. } => {
                *create
                    || have
                        .as_ref()
                        .is_none_or(|h| plan::meta_differs(h, &entry.meta, false))
            }
            Plan::Build { .. } | Plan::Special => true,
        };
        let record = Planned::Entry { entry, have, plan };
        self.planned.push(&record).map_err(self.scratch_err())?;
        if let Planned::Entry { entry, plan, .. } = record {
            self.last = Some((entry, plan));
        }
        Ok(())
    }

    /// Notes what building a file will read of the destination, for the write phase's
    /// read-ahead. Only a delta into a tree has one: a streamed session copies what it has
    /// just written, and a block volume's local copies are rare. A patch reads nothing of
    /// what it leaves as it is.
    fn note_read_runs(
        &mut self,
        segments: &[Segment],
        sources: &[Src],
        patch: bool,
    ) -> Result<(), ApplyError> {
        if self.want.unasked || self.header.mode == VolumeMode::Block {
            return Ok(());
        }
        let read: Cow<'_, [Src]> = match patch {
            true => sources
                .iter()
                .map(|s| match patch::keeps(s) {
                    true => Src::Zero,
                    false => s.clone(),
                })
                .collect(),
            false => Cow::Borrowed(sources),
        };
        let bases = &self.suffix_bases;
        let runs = readahead::local_runs(segments, &read, |id| {
            bases.get(id).map(|&(at, len, _)| (at, len))
        });
        if runs.is_empty() {
            return Ok(());
        }
        let mut spool = match self.read_runs.take() {
            Some(spool) => spool,
            None => Spool::create(&self.state.dir).map_err(self.scratch_err())?,
        };
        for (file, offset, len) in runs {
            let (dir, name) = self.sources.get(file);
            let run = ReadRun {
                dir: dir.clone(),
                name: name.into_owned(),
                offset,
                len,
            };
            spool.push(&run).map_err(self.scratch_err())?;
        }
        self.read_runs = Some(spool);
        Ok(())
    }

    /// Every entry but the root needs a directory entry before it as its parent; a tree's
    /// root is a directory, an image's a file. Entries come
    /// in volume order (the digest builder checks that first), so the parent, if any, is
    /// among the directories on the path to the entry before.
    fn check_parent(&mut self, entry: &Entry) -> Result<(), ApplyError> {
        if let Some((parent, _)) = entry.path.split_last() {
            while self
                .ancestors
                .last()
                .is_some_and(|a| !parent.starts_with(a))
            {
                self.ancestors.pop();
            }
            if self.ancestors.last() != Some(&parent) {
                return Err(ApplyError::Manifest(format!(
                    "entry {} has no parent directory before it",
                    entry.path
                )));
            }
        } else {
            let (is, want) = match self.header.mode {
                VolumeMode::Tree => (
                    matches!(entry.kind, EntryKind::Dir),
                    "tree manifest is not a directory",
                ),
                VolumeMode::Block => (
                    matches!(entry.kind, EntryKind::File { .. }),
                    "block manifest is not a file",
                ),
            };
            if !is {
                return Err(ApplyError::Manifest(format!("the root of a {want}")));
            }
        }
        if matches!(entry.kind, EntryKind::Dir) {
            self.ancestors.push(entry.path.clone());
        }
        Ok(())
    }

    /// The end of the manifest: what the destination has after the last entry, the manifest
    /// lacks; every hard link's target is checked, and links already in place are kept.
    pub fn end_manifest(&mut self) -> Result<(), ApplyError> {
        if self.stats.entries == 0 {
            // An empty manifest would otherwise leave the destination as it is and call it
            // a mirror of nothing.
            return Err(ApplyError::Manifest(
                "the manifest has no root entry".into(),
            ));
        }
        while let Some(extra) = self.found.take_before(None).map_err(self.scratch_err())? {
            self.planned
                .push(&Planned::Extra(extra))
                .map_err(self.scratch_err())?;
            self.commit_work = true;
        }
        if self.links.pending.is_empty() {
            return Ok(());
        }
        let mut targets: HashMap<RelPath, Option<Target>> = self
            .links
            .pending
            .iter()
            .map(|l| (l.target.clone(), None))
            .collect();
        let mut steps = self.planned.read().map_err(self.scratch_err())?;
        while let Some(step) = steps.next().map_err(self.scratch_err())? {
            if let Planned::Entry { entry, have, plan } = step
                && matches!(entry.kind, EntryKind::File { .. })
                && let Some(t) = targets.get_mut(&entry.path)
            {
                *t = Some(Target {
                    kept: matches!(plan, Plan::Keep { .. }),
                    inode: file_inode(have.as_ref()),
                });
            }
        }
        for link in std::mem::take(&mut self.links.pending) {
            let Some(target) = targets.get(&link.target).copied().flatten() else {
                return Err(not_an_earlier_file(&link.path, &link.target));
            };
            if target.kept && link.inode.is_some() && link.inode == target.inode {
                self.links.kept.insert(link.path);
            } else {
                self.links.gaining.insert(link.target);
                self.commit_work = true;
            }
        }
        Ok(())
    }

    fn plan_entry(&mut self, e: &Entry, have: Option<&Scanned>) -> Result<Plan, ApplyError> {
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
                self.plan_build(e, segments, have)?
            }
            // Kept instead if `end_manifest` finds it in place.
            EntryKind::HardLink { .. } => Plan::Link,
            kind => match have {
                Some(h) if plan::same_special(h, kind) => Plan::Keep {
                    meta: plan::meta_differs(h, &e.meta, matches!(kind, EntryKind::Symlink { .. })),
                },
                _ => Plan::Special,
            },
        })
    }

    /// Where a copy of chunk `id` is in the destination: planned this run, or (the filter
    /// permitting) in a file the index locates; the table of those is built on first need.
    fn find_local(&mut self, id: &ChunkId) -> Result<Option<Loc>, ApplyError> {
        if let Some(loc) = self.local.get(id) {
            return Ok(Some(loc));
        }
        if let DstChunks::Filtered(filter) = &self.dst_chunks {
            if !filter.may_hold(id) {
                return Ok(None);
            }
            let started = std::time::Instant::now();
            let places = self.place_dst_chunks()?;
            tracing::debug!(
                ms = started.elapsed().as_millis(),
                "chunk places of the destination found"
            );
            self.dst_chunks = DstChunks::Placed(places);
        }
        Ok(match &self.dst_chunks {
            DstChunks::Placed(places) => places.get(id),
            DstChunks::Filtered(_) => None,
        })
    }

    /// Where every chunk of the files the index locates is: one pass over the walk's spool
    /// and the index, both in volume order.
    fn place_dst_chunks(&mut self) -> Result<ChunkPlaces, ApplyError> {
        let mut places = ChunkPlaces::default();
        let mut records = IndexReader::open(&self.state.index_file(), self.header.chunker);
        let mut walked = self.walked.read().map_err(self.scratch_err())?;
        while let Some(s) = walked.next().map_err(self.scratch_err())? {
            if let Some(r) = located(&mut records, &s)
                && let Some((dir, name)) = s.path.split_last()
            {
                let file = self.sources.add(&dir, name);
                for (off, seg) in offsets(&r.segments) {
                    if let Segment::Chunk { id, .. } = seg {
                        places.add(id, Loc { file, offset: off });
                    }
                }
            }
        }
        Ok(places)
    }

    /// A partial temp file for `name` in `dir` left by an interrupted run, if there is one
    /// (`open_read` refuses anything but a regular file). Not looked for where the prepare
    /// walk met none: a first sync into an empty volume makes no failed `open` per file.
    fn partial_temp(&mut self, dir: &RelPath, temp: &[u8]) -> Option<File> {
        if !self.found_temp {
            return None;
        }
        self.vol.as_mut()?.open_read(dir, temp).ok()
    }

    /// Picks a source for every segment of a file to build.
    fn plan_build(
        &mut self,
        e: &Entry,
        segments: &[Segment],
        have: Option<&Scanned>,
    ) -> Result<Plan, ApplyError> {
        let block = self.header.mode == VolumeMode::Block;
        let (dir, name) = split(&e.path);
        let temp = temp_name(&name);
        // A partial temp file from an interrupted run (tree), or the device/image itself (block).
        let partial: Option<File> = if block {
            have.and_then(|_| File::open(&self.path).ok())
        } else {
            self.partial_temp(&dir, &temp)
        };
        // What the run that left the temp file recorded it holds, if it is as it was then.
        let held = match &partial {
            Some(f) if !block => rustix::fs::fstat(f)
                .ok()
                .and_then(|st| self.partials.held(&e.path, &StatInfo::from(&st))),
            _ => None,
        };
        // The old file at this path: what the index vouches it holds at each offset, or else
        // the file itself, to check by hash.
        let have = have.filter(|h| !block && h.stat.is_file());
        let vouched = have.and_then(|h| {
            let r = self.index.as_mut()?.get(&e.path)?;
            r.vouches(&h.stat)
                .then(|| (chunks_by_offset(&r.segments), first_offsets(&r.segments)))
        });
        let (vouched, vouched_ids) = match vouched {
            Some((at, ids)) => (Some(at), ids),
            None => (None, HashMap::new()),
        };
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
            } else if match &held {
                // Exact about the temp file while its stat holds: what it does not list
                // (a stale chunk, a patch's hole) is not there, and need not be read.
                Some(at) => at.get(&off) == Some(&(id, len)),
                None => partial
                    .as_ref()
                    .is_some_and(|f| range_has(f, off, len, &id, &mut buf)),
            } {
                resume = true;
                Src::InPlace
            } else if vouched
                .as_ref()
                .is_some_and(|at| at.get(&off) == Some(&(id, len)))
            {
                let file = self.sources.add_once(&mut old_file, &dir, &name);
                Src::Clone(Loc { file, offset: off })
            } else if let Some(&at) = vouched_ids.get(&id.prefix()) {
                // Where the index vouches for the old file, a chunk it does not list at this
                // offset is rarely there: after an insertion every later chunk moved, and
                // reading each at its old offset would hash the whole file for nothing.
                // The index says where in the old file it is now.
                let file = self.sources.add_once(&mut old_file, &dir, &name);
                Src::Local(Loc { file, offset: at })
            } else if let Some(loc) = match vouched {
                Some(_) => self.find_local(&id)?,
                None => None,
            } {
                Src::Local(loc)
            } else if have.is_some() && {
                if old.is_none() {
                    old = self.vol_mut().open_read(&dir, &name).ok();
                }
                old.as_ref()
                    .is_some_and(|f| range_has(f, off, len, &id, &mut buf))
            } {
                let file = self.sources.add_once(&mut old_file, &dir, &name);
                Src::Local(Loc { file, offset: off })
            } else if let Some(loc) = self.find_local(&id)? {
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
        if let (Some(f), Some(have)) = (&old, have)
            && have.stat.size == e.size()
            && (have.stat.nlink == 1 || !self.kept_inodes.contains(&(have.stat.dev, have.stat.ino)))
            && offsets(segments)
                .zip(&sources)
                .all(|((off, seg), src)| match src {
                    Src::Local(l) | Src::Clone(l) => Some(l.file) == old_file && l.offset == off,
                    Src::Zero => range_is_zero(f, off, seg.len(), &mut buf),
                    _ => false,
                })
        {
            if have.stat.nlink > 1 {
                self.kept_inodes.insert((have.stat.dev, have.stat.ino));
            }
            return Ok(Plan::Keep {
                meta: plan::meta_differs(have, &e.meta, false),
            });
        }
        let patch = self.patching
            && have.is_some_and(|h| patch::worth_patching(h, e.size()))
            && vouched.is_some()
            && patch::changed_bytes(segments, &sources) <= e.size() / 2;
        Ok(Plan::Build {
            sources,
            resume,
            patch,
        })
    }
}

fn not_an_earlier_file(path: &RelPath, target: &RelPath) -> ApplyError {
    ApplyError::Manifest(format!(
        "hard link {path} points to {target}, which is not an earlier regular file"
    ))
}
