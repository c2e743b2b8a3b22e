//! Progress reporting as a seam: the engine reports, the CLI decides how to show it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::dry_run::Change;

/// Receives progress from a sync. Implementations must be cheap: called per chunk.
pub trait Progress: Send + Sync {
    /// Total bytes the receiver will account for (known once the manifest is in).
    fn set_total(&self, _bytes: u64) {}
    /// Bytes of the destination brought up to date (written, copied or verified).
    fn advance(&self, _bytes: u64) {}
    /// A short description of the current phase.
    fn phase(&self, _name: &str) {}
    /// A new phase counted from zero towards `total` bytes (the sender: scanning, then
    /// sending; its total grows as the receiver's wants arrive).
    fn restart(&self, name: &str, total: u64) {
        self.phase(name);
        self.set_total(total);
    }
    /// A dry run's planned change (shown by whichever end the user runs).
    fn change(&self, _change: &Change) {}
}

/// Reports nothing.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// Counts bytes; handy in tests.
#[derive(Debug, Default)]
pub struct CountingProgress {
    pub total: AtomicU64,
    pub done: AtomicU64,
}

impl Progress for CountingProgress {
    fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }

    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
}
