//! What a run that stops before its commit tells the next about its big temp files.
//!
//! A broken connection or an unfinished live sync keeps every temp file for the rerun, which
//! resumes a temp file by hash-checking each chunk at its offset. For a big file that is a
//! full read: the write phase asked the temp file's pages out of the cache as it wrote them,
//! so a 1 GiB volume meant 1 GiB read back from the disk, once per pre-copy round of a live
//! database. So the run records, for each temp file of 1 MiB or more it finished writing
//! (with or without its stale chunks; a patch's too, whose unchanged ranges are holes), the
//! chunks it holds at each offset and the temp file's stat, once the racy margin has passed.
//! While the temp file's stat is unchanged, the next run takes that list as exact, as the
//! receiver index is trusted for finished files: a listed chunk is there, any other is not,
//! and nothing is read back. The record is removed when a run starts, so only the run that wrote
//! it is believed; a run killed without writing one leaves hashing as before.

use std::collections::HashMap;
use std::path::Path;

use super::fsops::temp_name;
use super::plan::chunks_by_offset;
use super::split;
use crate::chunk::{ChunkId, ChunkerParams, Segment};
use crate::index::{FileIndex, XattrsSeen, now_ns};
use crate::manifest::RelPath;
use crate::state::TargetState;
use crate::volume::StatInfo;
use crate::volume::walk::{WalkOptions, scan_one};

/// Smallest temp file recorded: hash-checking smaller ones costs little.
pub const RECORD_MIN: u64 = 1 << 20;

/// Most segments held for the record (~40 bytes each; every sync keeps them until it
/// commits, not knowing whether it will): 64 GiB of temp files at the average chunk size.
/// Files past that are hash-checked by the rerun as before.
const MAX_SEGMENTS: usize = 1 << 20;

/// The id recorded for a chunk the temp file does not hold (stale at a live source, or left
/// as it is by a patch): no chunk's id, so nothing is trusted there.
const NOT_HELD: ChunkId = ChunkId([0; 32]);

/// The records the last run left, and those this run makes.
#[derive(Default)]
pub struct Partials {
    loaded: Option<FileIndex>,
    written: Vec<(RelPath, Vec<Segment>)>,
    /// Segments in `written`.
    segments: usize,
}

impl Partials {
    /// Takes the record the last run left in `state` (it is removed: a later run that
    /// changes a temp file and is killed must not leave it believed).
    pub fn take(state: &TargetState, params: ChunkerParams) -> Self {
        let path = state.partials_file();
        if !path.exists() {
            return Partials::default();
        }
        let loaded = FileIndex::load(&path, params);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), "cannot remove the partial-file record: {e}");
            return Partials::default();
        }
        Partials {
            loaded: Some(loaded),
            ..Partials::default()
        }
    }

    /// The chunks at each offset of the temp file of `path`, if it was recorded with the
    /// stat `temp` has now.
    pub fn held(&self, path: &RelPath, temp: &StatInfo) -> Option<HashMap<u64, (ChunkId, u32)>> {
        let segments = self.loaded.as_ref()?.lookup(path, temp)?;
        Some(chunks_by_offset(segments))
    }

    /// Notes that the temp file of `path`, `size` bytes, holds `segments` except the chunks
    /// at the offsets `not_held` (in increasing order).
    pub fn wrote(&mut self, path: &RelPath, size: u64, segments: &[Segment], not_held: &[u64]) {
        if size < RECORD_MIN || self.segments + segments.len() > MAX_SEGMENTS {
            return;
        }
        self.segments += segments.len();
        let mut not_held = not_held.iter().peekable();
        let mut off = 0;
        let held = segments
            .iter()
            .map(|seg| {
                let here = off;
                off += seg.len();
                while not_held.next_if(|&&at| at < here).is_some() {}
                match *seg {
                    Segment::Chunk { len, .. } if not_held.next_if_eq(&&here).is_some() => {
                        Segment::Chunk { id: NOT_HELD, len }
                    }
                    seg => seg,
                }
            })
            .collect();
        self.written.push((path.clone(), held));
    }

    /// Records the temp files written below `root` (already synced), once the racy margin
    /// has passed since they were last written, for the next run in `state`.
    pub fn save(&mut self, root: &Path, state: &TargetState, params: ChunkerParams) {
        if self.written.is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_nanos(
            crate::index::RACY_MARGIN_FINE_NS as u64,
        ));
        let recorded_at = now_ns();
        let mut index = FileIndex::new(params);
        self.segments = 0;
        for (path, segments) in self.written.drain(..) {
            let (dir, name) = split(&path);
            let Ok(temp) = dir.join(&temp_name(&name)) else {
                continue;
            };
            if let Ok(Some(s)) = scan_one(root, &temp, WalkOptions { xattrs: false }) {
                index.record(path, &s.stat, XattrsSeen::Unknown, segments, recorded_at);
            }
        }
        if let Err(e) = index.save(&state.partials_file()) {
            tracing::warn!("cannot record the partial files for the rerun: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report
    use super::*;

    #[test]
    fn a_record_vouches_for_what_was_written_while_the_temp_file_is_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        std::fs::create_dir_all(root.join("d")).unwrap();
        let state = TargetState {
            dir: tmp.path().join("state"),
        };
        std::fs::create_dir_all(&state.dir).unwrap();
        let params = ChunkerParams::default();
        let temp = root
            .join("d")
            .join(std::str::from_utf8(&temp_name(b"f")).unwrap());
        std::fs::write(&temp, vec![7u8; 2 << 20]).unwrap();
        let path = RelPath::new(b"d/f".to_vec()).unwrap();
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let segments = [
            Segment::Chunk {
                id: a,
                len: 1 << 20,
            },
            Segment::Chunk {
                id: b,
                len: 1 << 20,
            },
        ];
        let mut made = Partials::default();
        made.wrote(&path, 2 << 20, &segments, &[1 << 20]);
        // Too small to be worth a record.
        made.wrote(
            &RelPath::new(b"small".to_vec()).unwrap(),
            100,
            &segments,
            &[],
        );
        made.save(&root, &state, params);

        let stat = |p: &Path| StatInfo::from(&std::fs::metadata(p).unwrap());
        let taken = Partials::take(&state, params);
        assert!(!state.partials_file().exists(), "taken once");
        let held = taken.held(&path, &stat(&temp)).unwrap();
        assert_eq!(held.get(&0), Some(&(a, 1 << 20)));
        assert_ne!(held.get(&(1 << 20)), Some(&(b, 1 << 20)), "not held");
        assert!(
            taken
                .held(&RelPath::new(b"small".to_vec()).unwrap(), &stat(&temp))
                .is_none()
        );

        // Written since: not believed.
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&temp)
            .unwrap()
            .write_all_at(b"x", 5)
            .unwrap();
        assert!(taken.held(&path, &stat(&temp)).is_none());
        assert!(
            Partials::take(&state, params)
                .held(&path, &stat(&temp))
                .is_none()
        );
    }
}
