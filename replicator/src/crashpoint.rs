//! Deterministic crash points for the interruption tests.
//!
//! When `REPLICATOR_CRASH_AT` names a point (`chunk:N`, `rename:N`, `patch:N`, `commit-sync`), the process
//! sends itself SIGKILL on reaching it: a real kill -9, no unwinding and no cleanup, at an exact
//! place instead of a random moment. Unset (always, outside tests) it costs one relaxed check.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

fn target() -> &'static Option<(String, u64)> {
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    TARGET.get_or_init(|| {
        let v = std::env::var("REPLICATOR_CRASH_AT").ok()?;
        match v.split_once(':') {
            Some((name, n)) => Some((name.to_string(), n.parse().ok()?)),
            None => Some((v, 1)),
        }
    })
}

static COUNTS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Marks that the process passed point `name` (one of `chunk`, `rename`, `patch`,
/// `commit-sync`).
pub fn reached(name: &str) {
    let Some((want, n)) = target() else { return };
    if want != name {
        return;
    }
    let slot = match name {
        "chunk" => 0,
        "rename" => 1,
        _ => 2,
    };
    if COUNTS[slot].fetch_add(1, Ordering::Relaxed) + 1 >= *n {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}
