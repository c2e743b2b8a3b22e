//! Manifest deltas: only what changed since a base manifest both ends hold.
//!
//! An incremental sync of a large tree changes a few entries, yet a full manifest repeats
//! every entry with its chunk list (~125 bytes each). When both ends still hold the manifest
//! of their last completed sync ([`super::store`]), the sender walks it alongside the new one
//! and sends only entries that are new or differ ("put") and paths that are gone ("remove");
//! the receiver merges those into the base and gets the new manifest back, entry for entry, in
//! volume order. Both directions are I/O-free over iterators, so they are tested together:
//! `merge(base, diff(base, new)) == new` for any two sorted manifests.

use std::io;
use std::iter::Peekable;

use super::{Entry, RelPath};

/// Why a delta could not be merged into the base.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta entry {0} is out of order or repeated")]
    OutOfOrder(RelPath),
    #[error("the delta removes {0}, which the base manifest does not have")]
    NotInBase(RelPath),
    #[error("cannot read the base manifest: {0}")]
    Base(#[from] io::Error),
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
    /// it that are gone, and returns whether the entry must be sent (new, or not identical in
    /// the base).
    pub fn entry(&mut self, entry: &Entry, removed: &mut Vec<RelPath>) -> io::Result<bool> {
        loop {
            match self.base.peek() {
                None => return Ok(true),
                Some(Err(_)) => {
                    let Some(Err(e)) = self.base.next() else {
                        unreachable!("peeked an error")
                    };
                    return Err(e);
                }
                Some(Ok(b)) if b.path < entry.path => {
                    let Some(Ok(b)) = self.base.next() else {
                        unreachable!("peeked an entry")
                    };
                    removed.push(b.path);
                }
                Some(Ok(b)) if b.path == entry.path => {
                    let same = b == entry;
                    self.base.next();
                    return Ok(!same);
                }
                Some(Ok(_)) => return Ok(true),
            }
        }
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
        if matches!(self.base.peek(), Some(Ok(b)) if b.path == entry.path) {
            self.base.next();
        }
        emit(entry)
    }

    /// A remove: the unchanged base entries before `path` go to `emit`; the base's entry at
    /// `path` is dropped (it must exist).
    pub fn remove<E: From<DeltaError>>(
        &mut self,
        path: RelPath,
        emit: &mut impl FnMut(Entry) -> Result<(), E>,
    ) -> Result<(), E> {
        self.advance(&path)?;
        self.emit_before(&path, emit)?;
        match self.base.next() {
            Some(Ok(b)) if b.path == path => Ok(()),
            Some(Err(e)) => Err(DeltaError::Base(e).into()),
            _ => Err(DeltaError::NotInBase(path).into()),
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
        while let Some(next) = self.base.peek() {
            match next {
                Ok(b) if b.path >= *path => break,
                Ok(_) => {
                    let Some(Ok(b)) = self.base.next() else {
                        unreachable!("peeked an entry")
                    };
                    emit(b)?;
                }
                Err(_) => {
                    let Some(Err(e)) = self.base.next() else {
                        unreachable!("peeked an error")
                    };
                    return Err(DeltaError::Base(e).into());
                }
            }
        }
        Ok(())
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
            let send = d.entry(e, &mut removed).unwrap();
            out.extend(removed.drain(..).map(Change::Remove));
            if send {
                out.push(Change::Put(e.clone()));
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
            }
            prop_assert!(diff(&new, &new).is_empty());
        }
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
