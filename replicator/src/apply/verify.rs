//! Phase 5: the destination's root digest, recomputed from what is on disk.
//!
//! Only a destination whose digest equals the sender's is declared complete. Contents come
//! from the chunk lists just written or verified (never re-read); everything else — kinds,
//! sizes, attributes, links — is read again from disk for what this run touched (and for
//! files with other names, whose ctime a change to another name moves), and taken from the
//! prepare walk for what it left alone. The same pass writes the new receiver index
//! (a stream in volume order, like the manifest), unless it would equal the last one.

use std::collections::HashMap;
use std::path::Path;

use super::plan::Plan;
use super::spool::Planned;
use super::{ApplyError, Destination};
use crate::chunk::Segment;
use crate::index::{Fingerprint, IndexReader, IndexWriter, XattrsSeen, now_ns};
use crate::manifest::{DigestBuilder, Entry, EntryKind, RelPath, RootDigest, VolumeMode};
use crate::snapshot::entry_of;
use crate::volume::StatInfo;
use crate::volume::walk::{Scanned, WalkOptions, scan_one};

impl Destination {
    /// Recomputes the destination's digest from what is on disk, entry by entry, using the
    /// chunk lists just written or verified for file contents. Entries this run created,
    /// replaced or changed (and every directory, once anything changed) are read again; the
    /// rest are as the prepare walk saw them — that walk also found everything the manifest
    /// lacks, and the commit removed it.
    pub(super) fn verify(&mut self) -> Result<(RootDigest, Option<IndexWriter>), ApplyError> {
        let scan_start = now_ns();
        let file = self.state.index_file();
        let mut index = NewIndex {
            writer: IndexWriter::create(&file, self.header.chunker, scan_start)
                .map_err(|e| tracing::warn!("cannot write the receiver index: {e}"))
                .ok(),
            old: IndexReader::open(&file, self.header.chunker),
            same: true,
        };
        let mut digest = DigestBuilder::new(&self.header);
        if self.header.mode == VolumeMode::Block {
            let (e, _) = self
                .last
                .as_ref()
                .ok_or_else(|| ApplyError::Manifest("empty block manifest".into()))?;
            let s = scan_one(&self.path, &RelPath::root(), WalkOptions { xattrs: false })
                .map_err(|err| ApplyError::Manifest(err.to_string()))?
                .ok_or_else(|| ApplyError::Manifest("destination vanished".into()))?;
            let size = if s.stat.is_file() {
                s.stat.size
            } else {
                e.size()
            };
            let got = Entry {
                path: RelPath::root(),
                kind: EntryKind::File {
                    size,
                    segments: e.segments().to_vec(),
                },
                meta: Default::default(),
            };
            digest
                .add(&got)
                .map_err(|err| ApplyError::Manifest(err.to_string()))?;
            if s.stat.is_file() {
                let xattrs = XattrsSeen::Unknown; // not listed
                index.record(&RelPath::root(), &s.stat, xattrs, e.segments(), scan_start);
            }
            return Ok((digest.finish(), index.changed()));
        }
        let mut steps = self.steps()?;
        let mut check = Verifier {
            root: &self.path,
            links: HashMap::new(),
            index,
            digest,
        };
        while let Some(step) = steps.next(&self.links)? {
            let Planned::Entry {
                entry: e,
                have,
                plan,
            } = step
            else {
                continue; // removed by the commit
            };
            // What this run did not touch is as the prepare walk saw it; the rest is read again.
            // So is a file whose inode has other names, or gains one: a link made or a name
            // replaced or removed elsewhere changed its ctime, and a stale stat in the index
            // would keep the next sync from finding chunks there.
            let untouched = |s: &Scanned| {
                !self.touched
                    || (matches!(plan, Plan::Keep { meta: false })
                        && !matches!(e.kind, EntryKind::Dir)
                        && s.stat.nlink <= 1
                        && !self.links.gaining.contains(&e.path))
            };
            match have {
                Some(s) if untouched(&s) => check.add(&s, &e, self.prepared_at)?,
                _ => {
                    let s = scan_one(&self.path, &e.path, WalkOptions::default())
                        .map_err(|err| ApplyError::Manifest(err.to_string()))?
                        .ok_or_else(|| {
                            ApplyError::LocalChanged(format!("{} vanished during the sync", e.path))
                        })?;
                    check.add(&s, &e, scan_start)?;
                }
            }
        }
        Ok((check.digest.finish(), check.index.changed()))
    }
}

/// The receiver index this verify pass writes, and whether it differs from the last one.
struct NewIndex {
    writer: Option<IndexWriter>,
    old: Option<IndexReader>,
    /// No record so far differs from the old index's.
    same: bool,
}

impl NewIndex {
    fn record(
        &mut self,
        path: &RelPath,
        stat: &StatInfo,
        xattrs: XattrsSeen<'_>,
        segments: &[Segment],
        seen_at: i128,
    ) {
        let Some(writer) = &mut self.writer else {
            return;
        };
        if self.same {
            let racy = Fingerprint::from(stat).is_racy(seen_at);
            self.same = self
                .old
                .as_mut()
                .and_then(|o| o.get(path))
                .is_some_and(|o| {
                    o.locates(stat)
                        && o.racy == racy
                        && o.xattrs_seen() == xattrs
                        && o.segments == segments
                });
        }
        writer.record_seen_at(path, stat, xattrs, segments, seen_at);
    }

    /// The new index, unless it is the old one again (the common case when nothing changed:
    /// then nothing is written).
    fn changed(self) -> Option<IndexWriter> {
        let writer = self.writer?;
        let old_records = self.old.map(|mut o| o.count_all());
        let same = self.same && old_records == Some(writer.records());
        (!same).then_some(writer)
    }
}

/// Recomputes the digest of the destination from what is on disk, entry by entry in volume
/// order, and records each regular file in the new receiver index.
struct Verifier<'a> {
    root: &'a Path,
    /// The first name seen of each multiply-linked inode.
    links: HashMap<(u64, u64), RelPath>,
    index: NewIndex,
    digest: DigestBuilder,
}

impl Verifier<'_> {
    /// Adds one entry as found on disk (`s`, read at `seen_at`) where the manifest has `want`:
    /// a file's content is taken to be the chunk list just written or verified when its size
    /// agrees.
    fn add(&mut self, s: &Scanned, want: &Entry, seen_at: i128) -> Result<(), ApplyError> {
        let inode = (s.stat.dev, s.stat.ino);
        let entry = if let Some(target) = self.links.get(&inode) {
            Entry {
                path: s.path.clone(),
                kind: EntryKind::HardLink {
                    target: target.clone(),
                },
                meta: Default::default(),
            }
        } else {
            if s.stat.is_file() && s.stat.nlink > 1 {
                self.links.insert(inode, s.path.clone());
            }
            let segments = match &want.kind {
                EntryKind::File { size, segments } if *size == s.stat.size => segments.clone(),
                _ => Vec::new(),
            };
            let size = segments.iter().map(Segment::len).sum();
            if s.stat.is_file() && size == s.stat.size {
                // Every entry here was walked or scanned with its attributes listed after its
                // stat (or taken from an index record that vouched for them).
                let xattrs = XattrsSeen::Listed(&s.xattrs);
                self.index
                    .record(&s.path, &s.stat, xattrs, &segments, seen_at);
            }
            entry_of(s, self.root, Some((size, segments)))
                .map_err(|err| ApplyError::Manifest(err.to_string()))?
        };
        self.digest
            .add(&entry)
            .map_err(|err| ApplyError::Manifest(err.to_string()))
    }
}
