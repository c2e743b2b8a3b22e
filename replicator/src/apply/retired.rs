//! Old files the commit replaces or removes, freed after the sync has reported done.
//!
//! Removing the last name of a large file frees its blocks inside that `rename` or `unlink`:
//! ~65 ms per 256 MiB on this project's test machines (ext4), paid in the commit pass while
//! the sender waits, and in a migration's final delta while the application is down. A
//! rebuilt database file or a merged-away index segment is exactly such a file. An `O_PATH`
//! descriptor held across the removal keeps the inode alive, so the freeing happens when the
//! descriptor is closed, after `Done` has gone back ([`super::Committed::save_index`]).
//!
//! Nothing visible changes: no name points at a held inode, and its data is never read. A
//! crash before the close leaves an orphan inode, which the filesystem's own recovery frees
//! (ext4's orphan list, XFS's unlinked list). Files inside a removed directory (a dropped
//! database, a deleted index) are held too, at the cost of one `stat` of each regular file
//! the removal unlinks.

use std::os::fd::OwnedFd;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};

use super::fsops::os;
use crate::volume::StatInfo;

/// Smallest file whose freeing is deferred: below it, freeing costs less than holding.
pub const MIN_SIZE: u64 = 4 << 20;

/// Most inodes held at once; the commit keeps other descriptors open too (see
/// [`super::durable::EACH_MAX`]), and the process's limit is often 1024.
pub const MAX_HELD: usize = 128;

/// Inodes whose last name the commit removed, freed when this is released or dropped.
#[derive(Debug, Default)]
pub struct Retired {
    held: Vec<OwnedFd>,
    bytes: u64,
}

impl Retired {
    /// Whether a file is worth holding when its name goes: a regular file with one name
    /// (removing one of several frees nothing) of at least [`MIN_SIZE`].
    pub fn worth_holding(stat: &StatInfo) -> bool {
        stat.is_file() && stat.nlink == 1 && stat.size >= MIN_SIZE
    }

    /// Holds the inode `name` in `dir` names, if the walk `found` it worth holding, it
    /// still is, and there is room. Call it just before removing or replacing the name; a
    /// file that is not held is simply freed by the removal, as without this.
    pub fn hold(&mut self, found: &StatInfo, dir: &OwnedFd, name: &[u8]) {
        if !Self::worth_holding(found) || self.held.len() >= MAX_HELD {
            return;
        }
        // O_PATH opens no file for I/O: nothing blocks (a FIFO put there meanwhile) and
        // no permission is needed beyond the directory's.
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let Ok(fd) = rfs::openat(dir, os(name), flags, Mode::empty()) else {
            return;
        };
        let Ok(now) = rfs::fstat(&fd).map(|st| StatInfo::from(&st)) else {
            return;
        };
        if Self::worth_holding(&now) {
            self.bytes += now.size;
            self.held.push(fd);
        }
    }

    /// Holds `name` in `dir` as [`Self::hold`] does, for a file no walk has looked at: one
    /// inside a directory being removed.
    pub fn hold_unseen(&mut self, dir: &OwnedFd, name: &[u8]) {
        if self.held.len() >= MAX_HELD {
            return;
        }
        if let Ok(st) = rfs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            self.hold(&StatInfo::from(&st), dir, name);
        }
    }

    /// How many inodes are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Closes every held descriptor, which frees the inodes' blocks now.
    pub fn release(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let files = self.held.len();
        self.held.clear();
        tracing::debug!(
            files,
            bytes = self.bytes,
            ms = started.elapsed().as_millis(),
            "replaced and removed files freed"
        );
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn dir_fd(path: &std::path::Path) -> OwnedFd {
        rfs::open(path, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap()
    }

    #[test]
    fn a_held_file_keeps_its_blocks_until_released_and_small_or_linked_ones_are_not_held() {
        let tmp = tempfile::tempdir().unwrap();
        let big = vec![7u8; MIN_SIZE as usize];
        std::fs::write(tmp.path().join("big"), &big).unwrap();
        std::fs::write(tmp.path().join("small"), b"x").unwrap();
        std::fs::write(tmp.path().join("linked"), &big).unwrap();
        std::fs::hard_link(tmp.path().join("linked"), tmp.path().join("other")).unwrap();
        std::fs::create_dir(tmp.path().join("dir")).unwrap();
        let meta = std::fs::metadata(tmp.path().join("big")).unwrap();
        let found = StatInfo::from(&meta);
        assert!(Retired::worth_holding(&found));
        let linked = StatInfo::from(&std::fs::metadata(tmp.path().join("linked")).unwrap());
        assert!(!Retired::worth_holding(&linked));

        let d = dir_fd(tmp.path());
        let mut retired = Retired::default();
        retired.hold(&linked, &d, b"linked");
        assert_eq!(
            retired.len(),
            0,
            "what the walk found not worth it is not opened"
        );
        // What the name holds now decides: the walk's stat may be stale.
        for name in [&b"small"[..], b"linked", b"dir", b"missing", b"big"] {
            retired.hold(&found, &d, name);
        }
        assert_eq!(retired.len(), 1, "only the big file with one name is held");

        let ino = meta.ino();
        std::fs::remove_file(tmp.path().join("big")).unwrap();
        // The inode lives on, nameless, with its blocks until the descriptor closes.
        let held = rfs::fstat(&retired.held[0]).unwrap();
        assert_eq!((held.st_ino, held.st_nlink), (ino, 0));
        assert!(u64::try_from(held.st_blocks).unwrap() * 512 >= MIN_SIZE);
        retired.release();
        assert_eq!(retired.len(), 0);
    }

    #[test]
    fn no_more_than_max_held_are_held() {
        let tmp = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(tmp.path().join("sparse")).unwrap();
        f.set_len(MIN_SIZE).unwrap();
        let found = StatInfo::from(&f.metadata().unwrap());
        let d = dir_fd(tmp.path());
        let mut retired = Retired::default();
        for _ in 0..MAX_HELD + 5 {
            retired.hold(&found, &d, b"sparse");
        }
        assert_eq!(retired.len(), MAX_HELD);
    }
}
