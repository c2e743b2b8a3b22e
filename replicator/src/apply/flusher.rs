//! Getting big files onto the disk while the sync goes on.
//!
//! A volume is complete only once everything written is durable, which the commit ensures
//! ([`super::durable`]). Left alone, the kernel holds most of a large copy in dirty pages
//! until then, so the disk idles during the transfer and the commit waits for all of it. Each
//! big file the write phase finishes is handed to a thread that `fsync`s it; the disk works
//! while later files arrive, and the commit finds little left to do. The queue is short, so a
//! disk slower than the link holds back the writer instead of piling up dirty memory.

use std::fs::File;
use std::io;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, bounded};

use super::ApplyError;

/// Files at least this large are synced early; smaller ones wait for the commit's `syncfs`.
pub const EARLY_SYNC_MIN: u64 = 8 << 20;

/// Bytes written between two early syncs: a `syncfs` after this much of smaller files, an
/// `fdatasync` after this much of an image.
pub const EARLY_SYNC_EVERY: u64 = 256 << 20;

/// Files waiting for their early sync.
const QUEUE: usize = 2;

/// What to make durable: one file's data, or the whole filesystem holding this handle.
enum Job {
    File(File),
    Filesystem(File),
}

/// A background thread syncing finished files, started on first use.
#[derive(Default)]
pub struct Flusher {
    queue: Option<Sender<(Job, String)>>,
    worker: Option<JoinHandle<Result<(), (String, io::Error)>>>,
}

impl Flusher {
    /// Queues `file` (named `shown` in errors) for an early `fsync`.
    pub fn submit(&mut self, file: File, shown: String) {
        self.queue(Job::File(file), shown);
    }

    /// Queues an early `syncfs` of the filesystem holding `handle` (an open directory).
    pub fn submit_filesystem(&mut self, handle: File, shown: String) {
        self.queue(Job::Filesystem(handle), shown);
    }

    fn queue(&mut self, job: Job, shown: String) {
        let queue = self.queue.get_or_insert_with(|| {
            let (tx, rx) = bounded::<(Job, String)>(QUEUE);
            self.worker = Some(std::thread::spawn(move || {
                for (job, shown) in rx {
                    let synced = match job {
                        // Attributes too: with few inodes changed, the commit syncs
                        // no filesystem after this ([`super::durable`]).
                        Job::File(f) => f.sync_all(),
                        Job::Filesystem(f) => super::fsops::syncfs(&f),
                    };
                    synced.map_err(|e| (shown, e))?;
                }
                Ok(())
            }));
            tx
        });
        // A worker that stopped on an error has dropped its end: `finish` reports why.
        let _ = queue.send((job, shown));
    }

    /// Waits for every queued sync; the first failure names its file.
    pub fn finish(&mut self) -> Result<(), ApplyError> {
        self.queue = None;
        let (path, e) = match self.worker.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => return Ok(()),
            Some(Ok(Err(failed))) => failed,
            Some(Err(_)) => (
                "early sync".into(),
                io::Error::other("sync thread panicked"),
            ),
        };
        Err(super::io_err("cannot sync", &path)(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_files_are_synced_and_finish_reports_success() {
        let dir = tempfile::tempdir().unwrap();
        let mut flusher = Flusher::default();
        assert!(flusher.finish().is_ok(), "nothing queued");
        for i in 0..5 {
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, vec![i as u8; 4096]).unwrap();
            flusher.submit(File::open(&path).unwrap(), path.display().to_string());
        }
        let handle = File::open(dir.path()).unwrap();
        flusher.submit_filesystem(handle, dir.path().display().to_string());
        assert!(flusher.finish().is_ok());
    }
}
