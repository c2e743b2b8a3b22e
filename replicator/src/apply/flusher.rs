//! Getting big files onto the disk while the sync goes on.
//!
//! A volume is complete only once everything written is durable, which the commit ensures with
//! one `syncfs`. Left alone, the kernel holds most of a large copy in dirty pages until then,
//! so the disk idles during the transfer and the commit waits for all of it. Each big file
//! the write phase finishes is handed to a thread that `fdatasync`s it; the disk works while
//! later files arrive, and the final `syncfs` finds little left to do. The queue is short, so a
//! disk slower than the link holds back the writer instead of piling up dirty memory.

use std::fs::File;
use std::io;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, bounded};

/// Files at least this large are synced early; smaller ones wait for the commit's `syncfs`.
pub const EARLY_SYNC_MIN: u64 = 8 << 20;

/// Files waiting for their early sync.
const QUEUE: usize = 2;

/// A background thread syncing finished files, started on first use.
#[derive(Default)]
pub struct Flusher {
    queue: Option<Sender<(File, String)>>,
    worker: Option<JoinHandle<Result<(), (String, io::Error)>>>,
}

impl Flusher {
    /// Queues `file` (named `shown` in errors) for an early `fdatasync`.
    pub fn submit(&mut self, file: File, shown: String) {
        let queue = self.queue.get_or_insert_with(|| {
            let (tx, rx) = bounded::<(File, String)>(QUEUE);
            self.worker = Some(std::thread::spawn(move || {
                for (f, shown) in rx {
                    f.sync_data().map_err(|e| (shown, e))?;
                }
                Ok(())
            }));
            tx
        });
        // A worker that stopped on an error has dropped its end: `finish` reports why.
        let _ = queue.send((file, shown));
    }

    /// Waits for every queued sync; the first failure names its file.
    pub fn finish(&mut self) -> Result<(), (String, io::Error)> {
        self.queue = None;
        match self.worker.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err((
                "early sync".into(),
                io::Error::other("sync thread panicked"),
            )),
        }
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
        assert!(flusher.finish().is_ok());
    }
}
