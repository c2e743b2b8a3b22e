//! What a commit makes durable, and how: the few inodes it changed, or the whole filesystem.
//!
//! `syncfs` flushes every dirty page of the filesystem, other writers' too. On a host where
//! another program had 1.5 GB unwritten, an incremental of three small files spent 1.2 s in
//! its commit instead of 18 ms, and a migration's final delta is exactly such a commit, made
//! while the application is down. So when a commit changes few inodes it `fsync`s just
//! those: each temp file before its rename (data and attributes, so no name ever shows a
//! half-written file), then each directory whose entries or attributes changed (the
//! renames, creations and removals themselves). Past [`EACH_MAX`] inodes one `syncfs` is
//! cheaper than many `fsync`s (a file at a time makes many-file syncs crawl), and the commit
//! falls back to it; it also does for what a plain descriptor cannot sync (symlinks and
//! device nodes, a hard link's count on its inode, a volume root created with its parents).

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use super::fsops;

/// Most inodes a commit phase `fsync`s one by one before it syncs the filesystem instead.
/// Each took 0.3–2 ms here, a `syncfs` with nothing else dirty a few ms.
pub const EACH_MAX: usize = 128;

/// Threads `fsync`ing a phase's inodes: a journaling filesystem commits concurrent `fsync`s
/// together, where one thread would wait for a journal commit per directory.
const SYNC_THREADS: usize = 4;

/// The inodes a commit phase has to make durable, or its decision to sync the filesystem.
#[derive(Default)]
pub struct Durable {
    /// Descriptors of the inodes to `fsync` when the phase ends.
    pending: Vec<OwnedFd>,
    /// This phase syncs the whole filesystem: too many inodes, or one that cannot be synced.
    whole: bool,
    /// How the last phase ended, for the log: inodes synced one by one, or `None` for a
    /// whole-filesystem sync.
    pub last: Option<usize>,
}

impl Durable {
    /// `inode` is final for this phase (a temp file written, a directory the commit pass
    /// left): it is synced when the phase ends.
    pub fn add(&mut self, inode: impl Into<OwnedFd>) {
        if self.count() {
            self.pending.push(inode.into());
        }
    }

    /// Like [`Durable::add`], for a descriptor the caller keeps.
    pub fn add_copy(&mut self, inode: &OwnedFd) -> io::Result<()> {
        if self.count() {
            self.pending.push(inode.try_clone()?);
        }
        Ok(())
    }

    /// Something in this phase cannot be synced through a descriptor of its own.
    pub fn whole_filesystem(&mut self) {
        self.whole = true;
        self.pending.clear();
    }

    /// Counts one more inode; whether it is still synced alone.
    fn count(&mut self) -> bool {
        if !self.whole && self.pending.len() == EACH_MAX {
            self.whole_filesystem();
        }
        !self.whole
    }

    /// How the last phase was made durable, for the log.
    pub fn how(&self) -> String {
        match self.last {
            Some(n) => format!("fsync of {n} inodes"),
            None => "syncfs".into(),
        }
    }

    /// Ends a phase: makes what it added durable, or the whole filesystem holding `root`
    /// (any descriptor on the volume), and starts counting the next phase afresh.
    pub fn sync(&mut self, root: impl AsFd) -> io::Result<()> {
        self.last = (!self.whole).then_some(self.pending.len());
        let whole = std::mem::take(&mut self.whole);
        let pending = std::mem::take(&mut self.pending);
        if whole {
            return fsops::syncfs(root);
        }
        std::thread::scope(|s| {
            let workers: Vec<_> = pending
                .chunks(pending.len().div_ceil(SYNC_THREADS).max(1))
                .map(|part| {
                    s.spawn(|| {
                        part.iter()
                            .try_for_each(|fd| rustix::fs::fsync(fd).map_err(io::Error::from))
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("fsync thread panicked")))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::File;

    fn file_in(dir: &tempfile::TempDir, name: &str) -> File {
        let path = dir.path().join(name);
        std::fs::write(&path, b"data").unwrap();
        File::open(path).unwrap()
    }

    #[test]
    fn few_inodes_are_synced_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Durable::default();
        for i in 0..3 {
            d.add(file_in(&dir, &format!("f{i}")));
        }
        d.sync(File::open(dir.path()).unwrap()).unwrap();
        assert_eq!(d.last, Some(3));
        assert!(d.pending.is_empty());
        d.add(File::open(dir.path()).unwrap());
        d.sync(File::open(dir.path()).unwrap()).unwrap();
        assert_eq!(d.last, Some(1), "the pass counts afresh");
    }

    #[test]
    fn too_many_inodes_fall_back_to_the_filesystem_and_drop_the_handles() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Durable::default();
        for i in 0..=EACH_MAX {
            d.add(file_in(&dir, &format!("f{i}")));
        }
        assert!(
            d.pending.is_empty(),
            "no descriptors held once the count is past"
        );
        d.sync(File::open(dir.path()).unwrap()).unwrap();
        assert_eq!(d.last, None);
        for _ in 0..=EACH_MAX {
            d.add(File::open(dir.path()).unwrap());
        }
        d.sync(File::open(dir.path()).unwrap()).unwrap();
        assert_eq!(d.last, None);
    }

    #[test]
    fn an_inode_without_a_descriptor_makes_the_phase_sync_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Durable::default();
        d.add(file_in(&dir, "f"));
        d.whole_filesystem();
        d.add(file_in(&dir, "g"));
        d.sync(File::open(dir.path()).unwrap()).unwrap();
        assert_eq!(d.last, None);
        d.add(File::open(dir.path()).unwrap());
        d.sync(File::open(dir.path()).unwrap()).unwrap();
        assert_eq!(d.last, Some(1), "the next phase decides for itself");
    }
}
