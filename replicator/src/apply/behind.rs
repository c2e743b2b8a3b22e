//! Write-behind: a large file streams through a few MiB of page cache, not through all of it.
//!
//! Written through the page cache as is, a 256 MiB file becomes 256 MiB of dirty pages, each
//! a page the kernel took from free memory. On virtual machines that hand free memory back to
//! their host (free page reporting, ballooning: the kind of host this was measured on), the
//! first touch of each such page is a fault in the host: writing 512 MiB into a new file took
//! 1.42 s of wall time (1.27 s of it system time) against 0.36 s when the file's pages were
//! recycled as below. On any machine a copy that fills the cache pushes out what the
//! applications there had in it, and leaves the commit's `fsync` a large backlog.
//!
//! So, every [`WINDOW`] of a large file written, the writer asks the kernel to drop that
//! window (`POSIX_FADV_DONTNEED`). On dirty pages that only starts their write-out; asked
//! again [`LAG`] windows later, once they are clean, the kernel frees them, and the next
//! windows reuse those pages. This is advice only: pages still under write-out are left in
//! place, and durability is the flusher's and the commit's business as before
//! ([`super::flusher`], [`super::durable`]). The cost is that the file is not in the cache
//! after the sync; an application started on the copy reads it from the disk, as it would
//! after a reboot.
//!
//! Smaller files (up to [`LAG`] windows) get the same two pieces of advice: when each is
//! written, and again once [`RECENT_BYTES`] of later files have been ([`RecentFiles`]).
//! Files under [`SMALL_ADVICE_MIN`] get none. Advice on a dirty file submits its write-out
//! at once, one request per file, where the kernel's flusher would have merged the pages of
//! many files written side by side into few: on 100,000 files of up to 2 KiB that cost the
//! receiver ~50 µs of CPU per file (measured), more than the few pages it recycles save.

use std::collections::VecDeque;
use std::fs::File;
use std::num::NonZeroU64;

use rustix::fs::{Advice, fadvise};

/// How much of a file is written between two pieces of advice.
pub const WINDOW: u64 = 8 << 20;

/// Windows between starting a window's write-out and dropping its pages.
const LAG: u64 = 2;

/// Where one file's write-behind stands; a file too small for it does nothing.
#[derive(Debug, Default)]
pub struct WriteBehind {
    enabled: bool,
    /// Windows up to here have had their write-out started.
    started: u64,
    /// Windows up to here have been asked to leave the cache.
    dropped: u64,
}

impl WriteBehind {
    /// Write-behind for a file that will hold `size` bytes: only files of more than
    /// [`LAG`] windows, since a smaller one never has a window to drop.
    pub fn for_size(size: u64) -> Self {
        WriteBehind {
            enabled: size > LAG * WINDOW,
            ..Self::default()
        }
    }

    /// Whether this file gets advice window by window (else it is a small file, for
    /// [`RecentFiles`]).
    pub fn active(&self) -> bool {
        self.enabled
    }

    /// Notes that `file` holds everything it will get below `end`; the windows that
    /// completes get their advice. Ranges never written (holes) get it too, harmlessly.
    pub fn wrote_to(&mut self, file: &File, end: u64) {
        if !self.enabled {
            return;
        }
        while end >= self.started + WINDOW {
            drop_window(file, self.started);
            self.started += WINDOW;
            if self.started - self.dropped > LAG * WINDOW {
                drop_window(file, self.dropped);
                self.dropped += WINDOW;
            }
        }
    }
}

/// Bytes of small files written after one before it is asked out of the cache again.
const RECENT_BYTES: u64 = LAG * WINDOW;

/// Smallest file [`RecentFiles`] gives advice: 16 pages.
pub const SMALL_ADVICE_MIN: u64 = 64 << 10;

/// Most small files held open for their second piece of advice.
const RECENT_FILES: usize = 128;

/// The small files written last, each held by a descriptor until its second advice.
#[derive(Debug, Default)]
pub struct RecentFiles {
    files: VecDeque<(File, u64)>,
    bytes: u64,
}

impl RecentFiles {
    /// `file`, `size` bytes, is written: its write-out starts now; the files written
    /// [`RECENT_BYTES`] or [`RECENT_FILES`] before it are asked to leave the cache. A file
    /// under [`SMALL_ADVICE_MIN`] is left to the kernel.
    pub fn wrote(&mut self, file: &File, size: u64) {
        if size < SMALL_ADVICE_MIN {
            return;
        }
        let _ = fadvise(file, 0, None, Advice::DontNeed);
        // Without a second descriptor the file only misses its second advice.
        let Ok(held) = file.try_clone() else {
            return;
        };
        self.files.push_back((held, size));
        self.bytes += size;
        while self.bytes > RECENT_BYTES || self.files.len() > RECENT_FILES {
            let Some((old, size)) = self.files.pop_front() else {
                break;
            };
            self.bytes -= size;
            let _ = fadvise(&old, 0, None, Advice::DontNeed);
        }
    }
}

/// Advises the kernel to drop the window at `at`. A refusal (a filesystem without page
/// cache advice) changes nothing but speed, so it is ignored.
fn drop_window(file: &File, at: u64) {
    let _ = fadvise(file, at, NonZeroU64::new(WINDOW), Advice::DontNeed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn small_files_get_no_advice() {
        let w = WriteBehind::for_size(LAG * WINDOW);
        assert!(!w.active());
        assert!(WriteBehind::for_size(LAG * WINDOW + 1).active());
    }

    #[test]
    fn recent_files_are_held_within_their_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let mut recent = RecentFiles::default();
        let small = vec![5u8; SMALL_ADVICE_MIN as usize];
        for n in 0..(RECENT_FILES + 10) {
            let path = dir.path().join(n.to_string());
            std::fs::write(&path, &small).unwrap();
            recent.wrote(&File::open(&path).unwrap(), SMALL_ADVICE_MIN);
        }
        assert_eq!(recent.files.len(), RECENT_FILES);
        assert_eq!(recent.bytes, SMALL_ADVICE_MIN * RECENT_FILES as u64);
        let big = dir.path().join("big");
        std::fs::write(&big, vec![7u8; 1 << 20]).unwrap();
        for _ in 0..(RECENT_BYTES >> 20) + 1 {
            recent.wrote(&File::open(&big).unwrap(), 1 << 20);
        }
        assert!(recent.bytes <= RECENT_BYTES);
        assert_eq!(std::fs::read(&big).unwrap(), vec![7u8; 1 << 20]);
        let held = recent.files.len();
        recent.wrote(&File::open(&big).unwrap(), 0);
        recent.wrote(&File::open(&big).unwrap(), SMALL_ADVICE_MIN - 1);
        assert_eq!(recent.files.len(), held, "files under 64 KiB are not held");
    }

    #[test]
    fn advice_follows_the_writes_window_by_window_and_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let size = 5 * WINDOW + 123;
        let mut w = WriteBehind::for_size(size);
        let piece: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut at = 0;
        while at < size {
            let len = (size - at).min(piece.len() as u64) as usize;
            file.write_all_at(&piece[..len], at).unwrap();
            at += len as u64;
            w.wrote_to(&file, at);
        }
        assert_eq!(w.started, 5 * WINDOW);
        assert_eq!(w.dropped, 3 * WINDOW, "dropped lags started by LAG windows");
        // A jump over a hole advises the windows it covers, without writing them.
        w.wrote_to(&file, 9 * WINDOW);
        assert_eq!((w.started, w.dropped), (9 * WINDOW, 7 * WINDOW));
        // Advice never changes what the file holds.
        let mut back = vec![0u8; piece.len()];
        for n in 0..(size / piece.len() as u64) {
            file.read_exact_at(&mut back, n * piece.len() as u64)
                .unwrap();
            assert_eq!(back, piece);
        }
    }
}
