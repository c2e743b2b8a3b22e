//! Read-ahead for the write phase of a delta: the destination's bytes that the write phase
//! will copy are asked of the kernel (`posix_fadvise(WILLNEED)`) from a thread, a bounded
//! distance ahead of the copying.
//!
//! Why: the write phase builds one file after the other, and each copy from a cold old file
//! waited for the disk in turn. A hundred appended files meant a hundred cold reads in a
//! row, and a rebuilt 256 MiB file read its old data only as the copy reached it. Asked
//! ahead, those reads run while the write phase copies, waits for chunks or writes, and
//! the page cache holds the data when the copy comes to it.
//!
//! Advice only. The ranges are what planning decided to copy (runs of the old file, the
//! bases of appends, chunks found elsewhere in the destination). The write phase checks or
//! vouches for every byte as before, so a range that changed or vanished meanwhile changes
//! nothing but the cache. A file that cannot be opened is skipped.
//!
//! Bounded: at most [`AHEAD`] bytes are advised beyond what the write phase has copied, so
//! a large delta does not push its own data out of the cache before it is used. A streamed
//! session (a first sync) has no read-ahead: what it copies it has just written.

use std::fs::File;
use std::num::NonZeroU64;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::fsops::VolumeDir;
use super::plan::{Loc, Src, offsets};
use super::spool::SpoolReader;
use crate::chunk::{ChunkId, Segment};
use crate::manifest::RelPath;

/// Most bytes advised beyond what the write phase has copied.
pub const AHEAD: u64 = 128 << 20;

/// Bytes asked for in one call, so that stopping and the bound are checked often.
const STEP: u64 = 4 << 20;

/// A range of one destination file that the write phase will read, in write order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRun {
    pub dir: RelPath,
    pub name: Vec<u8>,
    pub offset: u64,
    pub len: u64,
}

/// The ranges of destination files that building a file reads, by file number, in the
/// order the write phase reads them; adjacent ranges of one file are merged. `suffix_base`
/// gives, for a chunk from the sender, the old chunk it extends, if it is sent as a suffix.
pub fn local_runs(
    segments: &[Segment],
    sources: &[Src],
    suffix_base: impl Fn(&ChunkId) -> Option<(Loc, u32)>,
) -> Vec<(u32, u64, u64)> {
    let mut runs: Vec<(u32, u64, u64)> = Vec::new();
    for ((_, seg), src) in offsets(segments).zip(sources) {
        let Segment::Chunk { id, len } = *seg else {
            continue;
        };
        let (loc, len) = match src {
            Src::Local(loc) | Src::Clone(loc) => (*loc, u64::from(len)),
            Src::Wire => match suffix_base(&id) {
                Some((loc, base_len)) => (loc, u64::from(base_len)),
                None => continue,
            },
            Src::Zero | Src::InPlace => continue,
        };
        match runs.last_mut() {
            Some((file, at, run)) if *file == loc.file && *at + *run == loc.offset => *run += len,
            _ => runs.push((loc.file, loc.offset, len)),
        }
    }
    runs
}

/// What the write phase and the read-ahead thread share.
#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    moved: Condvar,
}

#[derive(Default)]
struct Progress {
    /// Bytes the write phase has read locally so far.
    consumed: u64,
    /// The write phase is over: the thread ends.
    stopped: bool,
}

/// The read-ahead thread of one write phase; stopped and joined when dropped.
pub struct ReadAhead {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ReadAhead {
    /// Starts advising the ranges `runs` yields, opening files under `root`.
    pub fn start(root: &std::path::Path, runs: SpoolReader<ReadRun>) -> std::io::Result<Self> {
        let vol = VolumeDir::open(root)?;
        Self::start_with(runs, AHEAD, vol, advise)
    }

    /// [`start`](Self::start) with the bound and the advice given (tests watch the calls).
    fn start_with(
        mut runs: SpoolReader<ReadRun>,
        ahead: u64,
        mut vol: VolumeDir,
        mut advise: impl FnMut(&File, u64, u64) + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("readahead".into())
            .spawn(move || {
                let mut advised = 0u64;
                let mut open: Option<(RelPath, Vec<u8>, Option<File>)> = None;
                while let Ok(Some(run)) = runs.next() {
                    if !matches!(&open, Some((d, n, _)) if *d == run.dir && *n == run.name) {
                        let file = vol.open_read(&run.dir, &run.name).ok();
                        open = Some((run.dir.clone(), run.name.clone(), file));
                    }
                    let mut at = run.offset;
                    let end = run.offset.saturating_add(run.len);
                    while at < end {
                        if !theirs.wait_below(advised, ahead) {
                            return;
                        }
                        let step = (end - at).min(STEP);
                        if let Some((_, _, Some(file))) = &open {
                            advise(file, at, step);
                        }
                        (at, advised) = (at + step, advised + step);
                    }
                }
            })?;
        Ok(ReadAhead {
            shared,
            thread: Some(thread),
        })
    }

    /// The write phase has read `bytes` more of the ranges.
    pub fn consumed(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.shared.update(|p| p.consumed += bytes);
    }
}

impl Shared {
    /// Changes the progress and wakes the thread.
    fn update(&self, change: impl FnOnce(&mut Progress)) {
        change(&mut self.progress.lock().unwrap_or_else(|e| e.into_inner()));
        self.moved.notify_one();
    }

    /// Waits until fewer than `ahead` bytes past `advised` are unconsumed; false once stopped.
    fn wait_below(&self, advised: u64, ahead: u64) -> bool {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        while !p.stopped && advised >= p.consumed.saturating_add(ahead) {
            p = self.moved.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        !p.stopped
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.shared.update(|p| p.stopped = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Asks the kernel to start reading `[offset, offset+len)` of `file` into the page cache.
fn advise(file: &File, offset: u64, len: u64) {
    let _ = rustix::fs::fadvise(
        file,
        offset,
        NonZeroU64::new(len),
        rustix::fs::Advice::WillNeed,
    );
}

/// Optional read-ahead: what the write phase reports to when there is one.
pub trait Consumed {
    fn consumed(&self, bytes: u64);
}

impl Consumed for Option<ReadAhead> {
    fn consumed(&self, bytes: u64) {
        if let Some(r) = self {
            r.consumed(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::spool::Spool;
    use std::sync::mpsc;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn chunk(n: u8, len: u32) -> Segment {
        Segment::Chunk { id: id(n), len }
    }

    fn at(file: u32, offset: u64) -> Loc {
        Loc { file, offset }
    }

    #[test]
    fn runs_merge_adjacent_ranges_of_one_file_in_write_order() {
        let segments = [
            chunk(1, 100),
            chunk(2, 50),
            Segment::Zero { len: 10 },
            chunk(3, 70),
            chunk(4, 30),
            chunk(5, 40),
            chunk(6, 20),
        ];
        let sources = [
            Src::Clone(at(0, 0)),
            Src::Clone(at(0, 100)),
            Src::Zero,
            Src::Local(at(0, 150)), // continues file 0's run
            Src::Local(at(7, 500)), // another file
            Src::Wire,              // a suffix of file 0's chunk at 220
            Src::Wire,              // sent whole
        ];
        let base = |c: &ChunkId| (*c == id(5)).then_some((at(0, 220), 25));
        assert_eq!(
            local_runs(&segments, &sources, base),
            vec![(0, 0, 220), (7, 500, 30), (0, 220, 25)]
        );
    }

    #[test]
    fn nothing_to_read_means_no_runs() {
        let segments = [chunk(1, 10), chunk(2, 10)];
        assert!(local_runs(&segments, &[Src::Wire, Src::InPlace], |_| None).is_empty());
    }

    /// A volume with `files` files of `len` bytes each, and a spool of runs covering them.
    fn volume(files: usize, len: u64) -> (tempfile::TempDir, Spool<ReadRun>) {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        let mut runs = Spool::create(&dir.path().join("scratch")).unwrap();
        for i in 0..files {
            let name = format!("f{i}");
            std::fs::write(vol.join(&name), vec![7u8; len as usize]).unwrap();
            runs.push(&ReadRun {
                dir: RelPath::root(),
                name: name.into_bytes(),
                offset: 0,
                len,
            })
            .unwrap();
        }
        // A run of a file that is not there: skipped, still counted.
        runs.push(&ReadRun {
            dir: RelPath::root(),
            name: b"gone".to_vec(),
            offset: 0,
            len,
        })
        .unwrap();
        (dir, runs)
    }

    #[test]
    fn advice_stays_within_the_bound_of_what_was_consumed() {
        let (dir, mut runs) = volume(4, 3 * STEP);
        let (tx, rx) = mpsc::channel();
        let vol = VolumeDir::open(&dir.path().join("vol")).unwrap();
        let ahead = 2 * STEP;
        let r = ReadAhead::start_with(runs.read().unwrap(), ahead, vol, move |_, off, len| {
            tx.send((off, len)).unwrap();
        })
        .unwrap();
        // Two steps are advised before anything is consumed, then nothing more.
        let first: Vec<_> = (0..2).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(first, vec![(0, STEP), (STEP, STEP)]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "advised past the bound");
        // Consuming one step lets one more through.
        r.consumed(STEP);
        assert_eq!(rx.recv().unwrap(), (2 * STEP, STEP));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "advised past the bound");
        // Consuming everything lets the rest through, in order; the missing file is skipped.
        r.consumed(12 * STEP);
        let rest: Vec<_> = rx.iter().take(9).collect();
        assert_eq!(rest.len(), 9, "every step of the three other files");
        assert!(
            rest.iter()
                .all(|&(off, len)| len == STEP && off % STEP == 0)
        );
        drop(r);
        assert!(rx.try_recv().is_err(), "the missing file was advised");
    }

    #[test]
    fn dropping_stops_a_thread_waiting_at_the_bound() {
        let (dir, mut runs) = volume(8, STEP);
        let vol = VolumeDir::open(&dir.path().join("vol")).unwrap();
        let calls = Arc::new(Mutex::new(0u32));
        let counted = Arc::clone(&calls);
        let r = ReadAhead::start_with(runs.read().unwrap(), STEP, vol, move |_, _, _| {
            *counted.lock().unwrap() += 1;
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(r); // joins: would hang if the waiting thread did not see the stop
        assert_eq!(*calls.lock().unwrap(), 1);
    }

    #[test]
    fn real_advice_on_real_files_is_harmless() {
        let (dir, mut runs) = volume(2, STEP + 1);
        let r = ReadAhead::start(&dir.path().join("vol"), runs.read().unwrap()).unwrap();
        r.consumed(3 * STEP);
        drop(r);
    }
}
