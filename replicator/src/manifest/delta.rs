//! Manifest deltas: only what changed since a base manifest both ends hold.
//!
//! An incremental sync of a large tree changes a few entries, yet a full manifest repeats
//! every entry with its chunk list (~125 bytes each). When both ends still hold the manifest
//! of their last completed sync ([`super::store`]), the sender walks it alongside the new one
//! and sends only entries that are new or differ ("put") and paths that are gone ("remove");
//! the receiver merges those into the base and gets the new manifest back, entry for entry, in
//! volume order. A changed file whose chunk list mostly survives (a 4 MiB write into a 256 MiB
//! file changes ~65 of its ~4,000 segments) goes as a [`FilePatch`]: runs of the base entry's
//! segments by position, and only the new segments in full. Both directions are I/O-free over iterators, so they are tested together:
//! `merge(base, diff(base, new)) == new` for any two sorted manifests.

use std::collections::HashMap;
use std::io;
use std::iter::Peekable;

use super::{Entry, EntryKind, Meta, RelPath};
use crate::chunk::{Segment, push_segment};

/// Why a delta could not be merged into the base.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta entry {0} is out of order or repeated")]
    OutOfOrder(RelPath),
    #[error("the delta changes or removes {0}, which the base manifest does not have")]
    NotInBase(RelPath),
    #[error("cannot read the base manifest: {0}")]
    Base(#[from] io::Error),
    #[error("the patch of {path} does not fit its base entry: {why}")]
    BadPatch { path: RelPath, why: &'static str },
}

/// A changed regular file, described against the base manifest's file at the same path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePatch {
    pub path: RelPath,
    pub meta: Meta,
    pub size: u64,
    pub ops: Vec<SegmentOp>,
}

/// One step of rebuilding a file's segment list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentOp {
    /// The base entry's segments `start..start + count`.
    Base { start: u64, count: u64 },
    /// A segment given in full.
    New(Segment),
}

/// Files with fewer segments than this are always sent whole: a patch would barely be smaller.
const PATCH_MIN_SEGMENTS: usize = 16;

impl FilePatch {
    /// The new entry: `base`'s segments where the patch says, the patch's own elsewhere.
    /// Fails unless `base` is a file at the same path, every run lies within its segments,
    /// the result adds up to the patch's size, and it has at most twice the base's segments
    /// plus the patch's own (so a few bytes of patch cannot make a huge list).
    pub fn apply(self, base: &Entry) -> Result<Entry, DeltaError> {
        let bad = |why| DeltaError::BadPatch {
            path: self.path.clone(),
            why,
        };
        let EntryKind::File {
            segments: old,
            size: _,
        } = &base.kind
        else {
            return Err(bad("the base entry is not a regular file"));
        };
        if base.path != self.path {
            return Err(bad("the base entry has another path"));
        }
        let own = self
            .ops
            .iter()
            .filter(|op| matches!(op, SegmentOp::New(_)))
            .count();
        let most = old.len().saturating_mul(2).saturating_add(own);
        let mut segments = Vec::new();
        for op in &self.ops {
            match *op {
                SegmentOp::New(s) => push_segment(&mut segments, s),
                SegmentOp::Base { start, count } => {
                    let run = usize::try_from(start)
                        .ok()
                        .zip(usize::try_from(count).ok())
                        .and_then(|(s, c)| old.get(s..s.checked_add(c)?))
                        .filter(|run| !run.is_empty())
                        .ok_or_else(|| bad("a run of base segments is out of range"))?;
                    if segments.len() + run.len() > most {
                        return Err(bad("it would make more than twice the base's segments"));
                    }
                    for s in run {
                        push_segment(&mut segments, *s);
                    }
                }
            }
        }
        let total = segments
            .iter()
            .try_fold(0u64, |t, s| t.checked_add(s.len()));
        if total != Some(self.size) {
            return Err(bad("the segments do not add up to the size"));
        }
        Ok(Entry {
            path: self.path,
            kind: EntryKind::File {
                size: self.size,
                segments,
            },
            meta: self.meta,
        })
    }
}

/// How the next entry of a new manifest goes to the receiver.
#[derive(Debug, PartialEq, Eq)]
pub enum Sending {
    /// Identical in the base: nothing.
    Nothing,
    /// New, or changed too much to patch: the whole entry.
    Entry,
    /// A changed file: these ops against the base file's segments.
    Patch(Vec<SegmentOp>),
}

/// The ops rebuilding `new` from `old`, if they are worth it (at least half of the segments
/// come from `old`).
fn diff_segments(old: &[Segment], new: &[Segment]) -> Option<Vec<SegmentOp>> {
    // The receiver refuses a patch that makes more than twice the base's segments (plus
    // the patch's own); so does this, before any work.
    if old.len() < PATCH_MIN_SEGMENTS || new.len() < PATCH_MIN_SEGMENTS || new.len() > 2 * old.len()
    {
        return None;
    }
    let mut first: HashMap<&Segment, usize> = HashMap::with_capacity(old.len());
    for (i, s) in old.iter().enumerate() {
        first.entry(s).or_insert(i);
    }
    let mut ops: Vec<SegmentOp> = Vec::new();
    let mut reused = 0;
    let mut i = 0;
    while i < new.len() {
        // Continue the run in progress if the base continues the same way; else jump.
        let next_in_run = match ops.last() {
            Some(SegmentOp::Base { start, count }) => Some((start + count) as usize),
            _ => None,
        };
        let j = match next_in_run.filter(|&j| old.get(j) == Some(&new[i])) {
            Some(j) => j,
            None => match first.get(&new[i]) {
                Some(&j) => j,
                None => {
                    ops.push(SegmentOp::New(new[i]));
                    i += 1;
                    continue;
                }
            },
        };
        let mut n = 1;
        while i + n < new.len() && j + n < old.len() && new[i + n] == old[j + n] {
            n += 1;
        }
        match ops.last_mut() {
            Some(SegmentOp::Base { start, count }) if (*start + *count) as usize == j => {
                *count += n as u64;
            }
            _ => ops.push(SegmentOp::Base {
                start: j as u64,
                count: n as u64,
            }),
        }
        reused += n;
        i += n;
    }
    (reused * 2 >= new.len()).then_some(ops)
}

/// Sender side: walks the base manifest alongside the new one.
pub struct Differ<I: Iterator<Item = io::Result<Entry>>> {
    base: Peekable<I>,
}

impl<I: Iterator<Item = io::Result<Entry>>> Differ<I> {
    pub fn new(base: I) -> Self {
        Differ {
            base: base.peekable(),
        }
    }

    /// Takes the next entry of the new manifest: pushes onto `removed` the base paths before
    /// it that are gone, and says how the entry goes (not at all if identical in the base).
    pub fn entry(&mut self, entry: &Entry, removed: &mut Vec<RelPath>) -> io::Result<Sending> {
        while let Some(gone) = next_before(&mut self.base, &entry.path) {
            removed.push(gone?.path);
        }
        let Some(b) = next_at(&mut self.base, &entry.path) else {
            return Ok(Sending::Entry);
        };
        Ok(match (&b.kind, &entry.kind) {
            _ if b == *entry => Sending::Nothing,
            (EntryKind::File { segments: old, .. }, EntryKind::File { segments, .. }) => {
                diff_segments(old, segments).map_or(Sending::Entry, Sending::Patch)
            }
            _ => Sending::Entry,
        })
    }

    /// After the last new entry: the base paths left over, all gone.
    pub fn finish(self, removed: &mut Vec<RelPath>) -> io::Result<()> {
        for b in self.base {
            removed.push(b?.path);
        }
        Ok(())
    }
}

/// Receiver side: rebuilds the new manifest from the base and the delta as it arrives.
pub struct Merger<I: Iterator<Item = io::Result<Entry>>> {
    base: Peekable<I>,
    last: Option<RelPath>,
}

impl<I: Iterator<Item = io::Result<Entry>>> Merger<I> {
    pub fn new(base: I) -> Self {
        Merger {
            base: base.peekable(),
            last: None,
        }
    }

    /// A put: the unchanged base entries before it, then `entry` (replacing the base's entry
    /// at the same path, if any), go to `emit`.
    pub fn put<E: From<DeltaError>>(
        &mut self,
        entry: Entry,
        emit: &mut impl FnMut(Entry) -> Result<(), E>,
    ) -> Result<(), E> {
        self.advance(&entry.path)?;
        self.emit_before(&entry.path, emit)?;
        next_at(&mut self.base, &entry.path);
        emit(entry)
    }

    /// A patch: like a put, with the entry rebuilt from the base's file at the same path.
    pub fn patch<E: From<DeltaError>>(
        &mut self,
        patch: FilePatch,
        emit: &mut impl FnMut(Entry) -> Result<(), E>,
    ) -> Result<(), E> {
        let base = self.take(&patch.path, emit)?;
        emit(patch.apply(&base)?)
    }

    /// A remove: the unchanged base entries before `path` go to `emit`; the base's entry at
    /// `path` is dropped (it must exist).
    pub fn remove<E: From<DeltaError>>(
        &mut self,
        path: RelPath,
        emit: &mut impl FnMut(Entry) -> Result<(), E>,
    ) -> Result<(), E> {
        self.take(&path, emit).map(drop)
    }

    /// The base entry at `path`, which must exist, once the unchanged base entries before it
    /// went to `emit`.
    fn take<E: From<DeltaError>>(
        &mut self,
        path: &RelPath,
        emit: &mut impl FnMut(Entry) -> Result<(), E>,
    ) -> Result<Entry, E> {
        self.advance(path)?;
        self.emit_before(path, emit)?;
        match self.base.next() {
            Some(Ok(b)) if b.path == *path => Ok(b),
            Some(Err(e)) => Err(DeltaError::Base(e).into()),
            _ => Err(DeltaError::NotInBase(path.clone()).into()),
        }
    }

    /// The end of the delta: the rest of the base is unchanged.
    pub fn finish<E: From<DeltaError>>(
        mut self,
        emit: &mut impl FnMut(Entry) -> Result<(), E>,
    ) -> Result<(), E> {
        for b in self.base.by_ref() {
            emit(b.map_err(DeltaError::Base)?)?;
        }
        Ok(())
    }

    /// Delta paths must strictly increase.
    fn advance(&mut self, path: &RelPath) -> Result<(), DeltaError> {
        if self.last.as_ref().is_some_and(|last| last >= path) {
            return Err(DeltaError::OutOfOrder(path.clone()));
        }
        self.last = Some(path.clone());
        Ok(())
    }

    fn emit_before<E: From<DeltaError>>(
        &mut self,
        path: &RelPath,
        emit: &mut impl FnMut(Entry) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(b) = next_before(&mut self.base, path) {
            emit(b.map_err(DeltaError::Base)?)?;
        }
        Ok(())
    }
}

/// The base's next entry if it comes before `path`, or its read error; `None` once the base
/// is at or past `path`.
fn next_before<I: Iterator<Item = io::Result<Entry>>>(
    base: &mut Peekable<I>,
    path: &RelPath,
) -> Option<io::Result<Entry>> {
    base.next_if(|b| b.as_ref().map_or(true, |b| b.path < *path))
}

/// The base's next entry if it is at `path` (taken), else `None` (left in place).
fn next_at<I: Iterator<Item = io::Result<Entry>>>(
    base: &mut Peekable<I>,
    path: &RelPath,
) -> Option<Entry> {
    match base.next_if(|b| matches!(b, Ok(b) if b.path == *path)) {
        Some(Ok(b)) => Some(b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::encode_tests::arb_entry;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq)]
    enum Change {
        Put(Entry),
        Patch(FilePatch),
        Remove(RelPath),
    }

    fn sorted(mut entries: Vec<Entry>) -> Vec<Entry> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|a, b| a.path == b.path);
        entries
    }

    fn ok(entries: &[Entry]) -> impl Iterator<Item = io::Result<Entry>> + '_ {
        entries.iter().cloned().map(Ok)
    }

    fn diff(base: &[Entry], new: &[Entry]) -> Vec<Change> {
        let mut d = Differ::new(ok(base));
        let mut out = Vec::new();
        let mut removed = Vec::new();
        for e in new {
            let sending = d.entry(e, &mut removed).unwrap();
            out.extend(removed.drain(..).map(Change::Remove));
            match sending {
                Sending::Nothing => {}
                Sending::Entry => out.push(Change::Put(e.clone())),
                Sending::Patch(ops) => out.push(Change::Patch(FilePatch {
                    path: e.path.clone(),
                    meta: e.meta.clone(),
                    size: e.size(),
                    ops,
                })),
            }
        }
        d.finish(&mut removed).unwrap();
        out.extend(removed.drain(..).map(Change::Remove));
        out
    }

    fn merge(base: &[Entry], delta: Vec<Change>) -> Result<Vec<Entry>, DeltaError> {
        let mut m = Merger::new(ok(base));
        let mut out = Vec::new();
        let mut emit = |e: Entry| -> Result<(), DeltaError> {
            out.push(e);
            Ok(())
        };
        for c in delta {
            match c {
                Change::Put(e) => m.put(e, &mut emit)?,
                Change::Patch(p) => m.patch(p, &mut emit)?,
                Change::Remove(p) => m.remove(p, &mut emit)?,
            }
        }
        m.finish(&mut emit)?;
        Ok(out)
    }

    proptest! {
        /// Any new manifest is rebuilt exactly from any base and the delta between them.
        #[test]
        fn merging_a_diff_rebuilds_the_new_manifest(
            base in proptest::collection::vec(arb_entry(), 0..30),
            new in proptest::collection::vec(arb_entry(), 0..30),
            keep in proptest::collection::vec(any::<bool>(), 0..30),
        ) {
            let base = sorted(base);
            // Half-related manifests: some base entries carried over unchanged.
            let mut new = new;
            new.extend(base.iter().zip(&keep).filter(|(_, k)| **k).map(|(e, _)| e.clone()));
            let new = sorted(new);
            let delta = diff(&base, &new);
            prop_assert_eq!(merge(&base, delta.clone()).unwrap(), new.clone());
            // Nothing unchanged is sent, and an unchanged manifest costs nothing.
            for c in &delta {
                if let Change::Put(e) = c {
                    prop_assert!(!base.contains(e));
                }
                if let Change::Patch(p) = c {
                    let back = crate::manifest::decode_patch(
                        &mut crate::codec::Reader::new(&crate::manifest::encode_patch(p)),
                        &crate::manifest::Limits::default(),
                    );
                    prop_assert_eq!(back.as_ref(), Ok(p));
                }
            }
            prop_assert!(diff(&new, &new).is_empty());
        }
    }

    fn chunk(n: u32) -> Segment {
        Segment::Chunk {
            id: crate::chunk::ChunkId::of(&n.to_le_bytes()),
            len: 1000 + n,
        }
    }

    fn file(segments: Vec<Segment>) -> Entry {
        Entry {
            path: RelPath::new(b"big".to_vec()).unwrap(),
            kind: EntryKind::File {
                size: segments.iter().map(Segment::len).sum(),
                segments,
            },
            meta: Default::default(),
        }
    }

    proptest! {
        /// Edits of a long chunk list (overwrites, insertions, deletions, holes) are rebuilt
        /// exactly from the base and the ops, and a small edit costs a few ops.
        #[test]
        fn segment_patches_rebuild_the_new_list(
            len in 16usize..200,
            edits in proptest::collection::vec((0usize..200, 0u8..4, 0u32..1000), 0..6),
        ) {
            let old: Vec<Segment> = (0..len as u32).map(chunk).collect();
            let mut new = old.clone();
            for (at, what, n) in &edits {
                let at = at % (new.len() + 1);
                match what {
                    0 if at < new.len() => new[at] = chunk(5000 + n),
                    1 => new.insert(at, chunk(9000 + n)),
                    2 if at < new.len() => { new.remove(at); }
                    _ => push_hole(&mut new, at, u64::from(*n) + 1),
                }
            }
            // As a scanner would list them: adjacent holes merged.
            let new = new.into_iter().fold(Vec::new(), |mut v, s| {
                push_segment(&mut v, s);
                v
            });
            let base = file(old.clone());
            let target = file(new.clone());
            let mut d = Differ::new(std::iter::once(Ok(base.clone())));
            match d.entry(&target, &mut Vec::new()).unwrap() {
                Sending::Patch(ops) => {
                    prop_assert!(ops.len() <= 4 * edits.len() + 1, "{} ops", ops.len());
                    let patch = FilePatch { path: target.path.clone(), meta: target.meta.clone(), size: target.size(), ops };
                    prop_assert_eq!(patch.apply(&base).unwrap(), target);
                }
                Sending::Entry => prop_assert!(new.len() < 16 || edits.len() * 4 > len / 2),
                Sending::Nothing => prop_assert_eq!(old, new),
            }
        }
    }

    /// A hole in the list at `at`, merged with a neighbouring hole as the scanner would.
    fn push_hole(list: &mut Vec<Segment>, at: usize, len: u64) {
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            if i == at {
                push_segment(&mut out, Segment::Zero { len });
            }
            push_segment(&mut out, *s);
        }
        if at >= list.len() {
            push_segment(&mut out, Segment::Zero { len });
        }
        *list = out;
    }

    #[test]
    fn patches_that_do_not_fit_their_base_are_refused() {
        let base = file((0..20).map(chunk).collect());
        let patch = |ops| FilePatch {
            path: base.path.clone(),
            meta: Default::default(),
            size: base.size(),
            ops,
        };
        let whole = vec![SegmentOp::Base {
            start: 0,
            count: 20,
        }];
        assert_eq!(patch(whole).apply(&base).unwrap(), base);
        for (ops, why) in [
            (
                vec![SegmentOp::Base {
                    start: 0,
                    count: 21,
                }],
                "out of range",
            ),
            (
                vec![SegmentOp::Base {
                    start: u64::MAX,
                    count: 2,
                }],
                "out of range",
            ),
            (vec![SegmentOp::Base { start: 3, count: 0 }], "out of range"),
            (
                vec![SegmentOp::Base {
                    start: 0,
                    count: 19,
                }],
                "add up",
            ),
            (
                vec![
                    SegmentOp::Base {
                        start: 0,
                        count: 20,
                    };
                    3
                ],
                "more than twice the base",
            ),
        ] {
            let err = patch(ops).apply(&base).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        let dir = entry("big");
        let err = patch(vec![]).apply(&dir).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    fn entry(path: &str) -> Entry {
        Entry {
            path: RelPath::new(path.as_bytes().to_vec()).unwrap(),
            kind: crate::manifest::EntryKind::Dir,
            meta: Default::default(),
        }
    }

    #[test]
    fn a_delta_out_of_order_or_removing_unknown_paths_is_refused() {
        let base = vec![entry(""), entry("a"), entry("c")];
        let p = |s: &str| entry(s).path;
        let err = merge(&base, vec![Change::Remove(p("b"))]).unwrap_err();
        assert!(matches!(err, DeltaError::NotInBase(_)), "{err}");
        let err = merge(
            &base,
            vec![Change::Put(entry("c")), Change::Put(entry("a"))],
        )
        .unwrap_err();
        assert!(matches!(err, DeltaError::OutOfOrder(_)), "{err}");
        let err = merge(&base, vec![Change::Remove(p("a")), Change::Remove(p("a"))]).unwrap_err();
        assert!(matches!(err, DeltaError::OutOfOrder(_)), "{err}");
    }

    #[test]
    fn a_base_read_error_ends_the_merge() {
        let base = vec![
            Ok(entry("")),
            Err(io::Error::other("disk gone")),
            Ok(entry("z")),
        ];
        let mut m = Merger::new(base.into_iter());
        let mut emit = |_: Entry| -> Result<(), DeltaError> { Ok(()) };
        let err = m.put(entry("y"), &mut emit).unwrap_err();
        assert!(matches!(err, DeltaError::Base(_)), "{err}");
    }
}
