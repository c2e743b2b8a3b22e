//! Phase 3: building new files under temp names from local copies and received chunks.
//!
//! Every file to build is written under its temp name in its final directory (so the
//! commit's rename is atomic), with its chunks in order: copies from the destination are
//! verified by hash as they are read (or cloned in the kernel where the index vouches for
//! them), received chunks were verified by the feed. Big files are handed to the flusher as
//! they finish. A block volume is written in place, range by range.

use std::fs::File;
use std::os::unix::fs::FileExt;

use rustix::fs::{self as rfs, FileType, Mode};

use super::behind::WriteBehind;
use super::fsops::{self, os, temp_name};
use super::local::{LocalReader, PendingClone, range_has, range_is_zero};
use super::patch;
use super::plan::{ChunkPlaces, Plan, Src, offsets};
use super::readahead::{Consumed, ReadAhead};
use super::spool::Planned;
use super::{ApplyError, ChunkFeed, Destination, DstChunks, flusher, io_err, split};
use crate::chunk::Segment;
use crate::chunk::window::MIN_SLOTS;
use crate::manifest::{Entry, EntryKind, RelPath, VolumeMode};
use crate::progress::Progress;

impl Destination {
    /// Phase 3 for one entry, in a streamed session: writes the entry planned last, taking the
    /// chunks it needs from the sender from `feed` now.
    pub fn write_planned(
        &mut self,
        feed: &mut dyn ChunkFeed,
        progress: &dyn Progress,
    ) -> Result<(), ApplyError> {
        let Some((e, p)) = self.last.take() else {
            return Ok(());
        };
        self.written = self.planned.len();
        let result = self.write_entry(&e, &p, feed, progress);
        self.last = Some((e, p));
        if result.is_ok() {
            self.forget_unheld_sources();
        }
        result
    }

    /// A streamed session numbers every file it writes a chunk to, and only the files its
    /// window holds chunks of can be copied from later; once the numbers reach twice the
    /// window's slots, the others are dropped. A million files keep a window's worth of names.
    fn forget_unheld_sources(&mut self) {
        let ChunkPlaces::Recent(window) = &mut self.local else {
            return;
        };
        if self.sources.len() < 2 * window.slots().max(MIN_SLOTS)
            || !self.suffix_bases.is_empty()
            || matches!(self.dst_chunks, DstChunks::Placed(_))
        {
            return;
        }
        let before = self.sources.len();
        self.sources
            .retain(window.values_mut().map(|(file, _)| file));
        tracing::trace!(
            before,
            after = self.sources.len(),
            "source files renumbered"
        );
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
        self.read_ahead = self.start_read_ahead();
        let written = self.write_steps(feed, progress);
        self.read_ahead = None; // stops and joins the thread
        written
    }

    fn write_steps(
        &mut self,
        feed: &mut dyn ChunkFeed,
        progress: &dyn Progress,
    ) -> Result<(), ApplyError> {
        let mut steps = self.planned.read().map_err(self.scratch_err())?;
        while let Some(step) = steps.next().map_err(self.scratch_err())? {
            self.written += 1;
            if let Planned::Entry { entry, plan, .. } = step {
                self.write_entry(&entry, &plan, feed, progress)?;
            }
        }
        Ok(())
    }

    /// The read-ahead of what this write phase copies from the destination, if planning
    /// noted any. Only advice: when it cannot start, the copies read as they go.
    fn start_read_ahead(&mut self) -> Option<ReadAhead> {
        let runs = self.read_runs.as_mut()?.read();
        let root = self.vol.as_ref()?.root_path();
        match runs.and_then(|runs| ReadAhead::start(root, runs)) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!("no read-ahead for the write phase: {e}");
                None
            }
        }
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
                    // Set aside, not removed: a run that fails puts it back, the commit
                    // removes it.
                    let aside = temp_name(&name);
                    fsops::remove_any(d, &aside).map_err(io_err("cannot replace", &shown))?;
                    rfs::renameat(d, os(&name), d, os(&aside))
                        .map_err(|e| io_err("cannot replace", &shown)(e.into()))?;
                }
                if let Err(e) = rfs::mkdirat(d, os(&name), Mode::from_raw_mode(0o700)) {
                    if *replace {
                        let _ = rfs::renameat(d, os(&temp_name(&name)), d, os(&name));
                    }
                    return Err(io_err("cannot create directory", &shown)(e.into()));
                }
                if *replace {
                    self.sources.note_set_aside(&parent, &name);
                }
                self.created = true;
            }
            (
                Plan::Build {
                    sources,
                    resume,
                    patch,
                },
                EntryKind::File { size, segments },
            ) => {
                let (parent, name) = split(&e.path);
                let temp = temp_name(&name);
                let vol = self.vol.as_mut().expect("tree");
                let d = vol
                    .dir(&parent)
                    .map_err(io_err("cannot open directory", &parent))?;
                let file = fsops::create_temp(d, &temp, *resume)
                    .map_err(io_err("cannot create", &shown))?;
                self.created = true;
                let mut reader = LocalReader::default();
                let mut clone = PendingClone::default();
                // A patch's temp file is read back by the commit and removed unsynced: its
                // pages should stay in the cache, and need never reach the disk.
                let mut behind = WriteBehind::for_size(if *patch { 0 } else { *size });
                // Offsets of chunks the temp file does not hold: left as they are by a patch,
                // or stale at a live source (then `missing`: the file is not finished).
                let mut not_held: Vec<u64> = Vec::new();
                let mut missing = false;
                for ((off, seg), src) in offsets(segments).zip(sources) {
                    let Segment::Chunk { id, len } = *seg else {
                        continue;
                    };
                    if *patch && patch::keeps(src) {
                        // Left as it is in the file being patched.
                        not_held.push(off);
                        progress.advance(u64::from(len));
                        continue;
                    }
                    if let Src::Clone(loc) = src
                        && clone.extend(loc, off, len)
                    {
                        progress.advance(u64::from(len));
                        continue;
                    }
                    let vol = self.vol.as_mut().expect("tree");
                    self.stats.bytes_copied_locally += clone.flush(
                        &mut reader,
                        vol,
                        &self.sources,
                        &file,
                        &self.read_ahead,
                        &mut behind,
                    )?;
                    let data = match src {
                        Src::Clone(loc) => {
                            clone.start(loc, off, len);
                            progress.advance(u64::from(len));
                            continue;
                        }
                        Src::Zero | Src::InPlace => None,
                        Src::Local(_) if self.stale.contains(&id) => {
                            // Planned as a copy of where the stale chunk was to be written.
                            not_held.push(off);
                            missing = true;
                            self.read_ahead.consumed(u64::from(len));
                            None
                        }
                        Src::Local(loc) => {
                            let d = reader.read(vol, &self.sources, loc, len, &id)?;
                            self.stats.bytes_copied_locally += u64::from(len);
                            self.read_ahead.consumed(u64::from(len));
                            Some(d)
                        }
                        Src::Wire => {
                            let base = match self.suffix_bases.get(&id) {
                                Some((at, len, base)) => {
                                    let data = reader.read(vol, &self.sources, at, *len, base)?;
                                    self.read_ahead.consumed(u64::from(*len));
                                    Some((*base, data))
                                }
                                None => None,
                            };
                            let base = base.as_ref().map(|(id, b)| (*id, &b[..]));
                            let got = feed.next_chunk(id, base)?;
                            if got.is_none() {
                                self.stale.insert(id);
                                not_held.push(off);
                                missing = true;
                            }
                            got
                        }
                    };
                    if let Some(data) = data {
                        file.write_all_at(&data, off)
                            .map_err(io_err("cannot write", &shown))?;
                        behind.wrote_to(&file, off + u64::from(len));
                        if *src == Src::Wire {
                            crate::crashpoint::reached("chunk");
                        }
                    }
                    progress.advance(u64::from(len));
                }
                let vol = self.vol.as_mut().expect("tree");
                self.stats.bytes_copied_locally += clone.flush(
                    &mut reader,
                    vol,
                    &self.sources,
                    &file,
                    &self.read_ahead,
                    &mut behind,
                )?;
                // A new temp file whose last segment was written is `size` long already; a
                // resumed or patched one, or one ending in a hole or a chunk not written, is
                // sized here.
                let sized = !*resume
                    && !*patch
                    && !missing
                    && (*size == 0 || matches!(segments.last(), Some(Segment::Chunk { .. })));
                if !sized {
                    file.set_len(*size).map_err(io_err("cannot size", &shown))?;
                }
                progress.advance(
                    segments
                        .iter()
                        .filter(|s| matches!(s, Segment::Zero { .. }))
                        .map(Segment::len)
                        .sum(),
                );
                self.partials.wrote(&e.path, *size, segments, &not_held);
                if missing {
                    // Kept as a partial file for the next run; this run commits nothing.
                    self.unfinished_files += 1;
                    return Ok(());
                }
                self.stats.files_written += 1;
                if *patch {
                    // The commit copies what it holds into the file and removes it: a crash
                    // before then loses nothing the rerun cannot check and fetch again.
                    self.stats.files_patched += 1;
                    return Ok(());
                }
                fsops::apply_meta_fd(&file, &e.meta)
                    .map_err(io_err("cannot set attributes of", &shown))?;
                if !behind.active() {
                    self.recent.wrote(&file, *size);
                }
                if *size >= flusher::EARLY_SYNC_MIN {
                    self.flusher.submit(file, shown);
                } else {
                    self.durable.add(file);
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
                self.created = true;
                // No descriptor to fsync a symlink or a device node through.
                self.durable.whole_filesystem();
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
            .last
            .clone()
            .ok_or_else(|| ApplyError::Manifest("empty block manifest".into()))?;
        self.written = self.planned.len();
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
            if self.touched {
                self.before_writing_in_place()?;
            }
            if !is_device && have > size {
                file.set_len(size).map_err(io_err("cannot size", &shown))?;
            }
            let mut buf = Vec::new();
            let mut unsynced = 0;
            let mut behind = WriteBehind::for_size(size);
            let mut missing = false;
            for ((off, seg), src) in offsets(e.segments()).zip(sources) {
                if unsynced >= flusher::EARLY_SYNC_EVERY {
                    // Let the disk work through what is written so far while more arrives.
                    let handle = file.try_clone().map_err(io_err("cannot sync", &shown))?;
                    self.flusher.submit(handle, shown.clone());
                    unsynced = 0;
                }
                match (*seg, src) {
                    (Segment::Chunk { id, .. }, Src::Wire) => {
                        let Some(data) = feed.next_chunk(id, None)? else {
                            self.stale.insert(id);
                            missing = true;
                            progress.advance(seg.len());
                            continue;
                        };
                        file.write_all_at(&data, off)
                            .map_err(io_err("cannot write", &shown))?;
                        behind.wrote_to(&file, off + data.len() as u64);
                        crate::crashpoint::reached("chunk");
                        self.stats.files_written = 1;
                        unsynced += data.len() as u64;
                    }
                    (Segment::Chunk { id, .. }, Src::Local(_)) if self.stale.contains(&id) => {
                        missing = true;
                    }
                    (Segment::Chunk { id, len }, Src::Local(loc)) => {
                        if !range_has(&file, loc.offset, len, &id, &mut buf) {
                            return Err(ApplyError::LocalChanged(shown.clone()));
                        }
                        file.write_all_at(&buf, off)
                            .map_err(io_err("cannot write", &shown))?;
                        behind.wrote_to(&file, off + u64::from(len));
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
            self.unfinished_files = u64::from(missing);
        }
        self.flusher.finish()?;
        file.sync_all().map_err(io_err("cannot sync", &shown))?;
        Ok(())
    }
}
