//! One sync between two local paths: the sender and receiver sessions joined in-process.
//!
//! This is what `replicator sync SRC DST` runs when both ends are local. The sender scans on
//! this thread (with hash workers), the receiver applies on another, and they talk through the
//! same messages a network sync uses.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::chunk::ChunkerParams;
use crate::index::now_ns;
use crate::manifest::VolumeMode;
use crate::progress::{NoProgress, Progress};
use crate::protocol::SessionError;
use crate::protocol::compression::Compression;
use crate::protocol::dry_run::DryRun;
use crate::protocol::message::Unfinished;
use crate::protocol::receiver::{Patching, ReceiverOptions, ReceiverReport, run_receiver};
use crate::protocol::sender::{SenderOptions, SenderReport, run_sender};
use crate::snapshot::SnapshotOptions;
use crate::state::StateDir;
use crate::transport::{MessageRx, MessageTx, inproc};
use crate::volume;

/// Options shared by the CLI and library users.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub chunker: ChunkerParams,
    /// Re-read every source file instead of trusting the index (`--checksum`).
    pub checksum: bool,
    /// Compress chunks on the wire; pointless in-process, so off by default for local syncs.
    pub compress: Compression,
    pub state_dir: PathBuf,
    pub threads: usize,
    /// Only report what the sync would change (`--dry-run`: [`DryRun::Ask`]); see
    /// [`crate::protocol::dry_run`].
    pub dry_run: DryRun,
    /// Patch large files with small changes at their final name instead of rebuilding them
    /// under a temp name (`--inplace`, see `apply/patch.rs`): a crash in the commit may
    /// leave such a file part old, part new until the rerun.
    pub inplace: bool,
    /// The source is in use (`--live`): a chunk that changes or vanishes after the scan is
    /// skipped instead of failing the sync, which then ends unfinished ([`Summary::complete`]
    /// false): nothing is committed, the partial files are kept, and a rerun resumes them.
    /// Pre-copy rounds of a move use it; the final round, with the application stopped,
    /// must not.
    pub live: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            chunker: ChunkerParams::default(),
            checksum: false,
            compress: Compression::Never,
            state_dir: StateDir::default_location(),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            dry_run: DryRun::Refuse,
            inplace: false,
            live: false,
        }
    }
}

/// The `--json` summary: one object per sync.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub mode: VolumeMode,
    pub source: String,
    pub destination: String,
    pub files: u64,
    pub entries: u64,
    /// Manifest items on the wire: every entry, or with `manifest_delta` only the changed
    /// entries and the removed paths.
    pub entries_sent: u64,
    /// The manifest went as a delta against the one both ends kept from their last sync.
    pub manifest_delta: bool,
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub chunks_total: u64,
    pub chunks_sent: u64,
    pub bytes_sent_raw: u64,
    pub bytes_sent_wire: u64,
    pub bytes_received_wire: u64,
    pub bytes_copied_locally: u64,
    pub files_written: u64,
    /// Of `files_written`, those patched at their final name (`--inplace`).
    pub files_patched: u64,
    pub deleted: u64,
    pub duration_ms: u64,
    pub root: String,
    /// Nothing was changed: `chunks_sent`, `bytes_sent_raw`, `bytes_copied_locally`,
    /// `files_written` and `deleted` say what the sync would do, `root` what the destination
    /// would become.
    pub dry_run: bool,
    /// The destination matches the source (`root`) and is durable. False only for a `--live`
    /// sync in which chunks changed while they were sent: nothing was committed, and
    /// `files_unfinished` files miss some of the `chunks_stale` chunks until the next run.
    pub complete: bool,
    pub files_unfinished: u64,
    pub chunks_stale: u64,
}

impl SyncError {
    /// Whether the sync failed because the source changed while it was read (a running
    /// application wrote a file after the scan): rerunning it may succeed, and a copy taken
    /// with the application stopped will.
    pub fn source_changed(&self) -> bool {
        matches!(
            self,
            SyncError::Session(SessionError::Serve(
                crate::snapshot::ServeError::Changed { .. }
            ))
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{path}: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to sync: {0}")]
    Nested(String),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("{0}")]
    Usage(String),
    /// The peer refused the session (identity, version, busy volume, bad request).
    #[error("{message}")]
    Refused {
        code: crate::net::open::CloseCode,
        message: String,
    },
    /// The connection failed or broke; rerunning resumes.
    #[error("{0}")]
    Connection(String),
}

/// Canonical form of a path that may not exist yet (its parent must, or be creatable).
pub fn canonical_target(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => canonical_target(parent).join(name),
        _ => abs,
    }
}

/// Refuses SRC inside DST or DST inside SRC (a sync would chase its own output).
pub fn check_not_nested(src: &Path, dst: &Path) -> Result<(), SyncError> {
    if src == dst {
        return Err(SyncError::Nested(format!(
            "{} is both source and destination",
            src.display()
        )));
    }
    if dst.starts_with(src) {
        return Err(SyncError::Nested(format!(
            "destination {} is inside source {}",
            dst.display(),
            src.display()
        )));
    }
    if src.starts_with(dst) {
        return Err(SyncError::Nested(format!(
            "source {} is inside destination {}",
            src.display(),
            dst.display()
        )));
    }
    Ok(())
}

/// The canonical path of a source volume and its mode (tree or block).
pub fn source_volume(src: &Path) -> Result<(PathBuf, VolumeMode), SyncError> {
    let src = src.canonicalize().map_err(|source| SyncError::Source {
        path: src.to_path_buf(),
        source,
    })?;
    let mode = volume::detect_mode(&src).map_err(|source| SyncError::Source {
        path: src.clone(),
        source,
    })?;
    Ok((src, mode))
}

/// Syncs `src` to `dst` on this machine.
pub fn sync_local(
    src: &Path,
    dst: &Path,
    opts: &SyncOptions,
    progress: &dyn Progress,
) -> Result<Summary, SyncError> {
    opts.chunker.validate().map_err(SyncError::Usage)?;
    let started = Instant::now();
    let (src, mode) = source_volume(src)?;
    let dst = canonical_target(dst);
    check_not_nested(&src, &dst)?;
    let states = StateDir::new(opts.state_dir.clone());
    let (mut s_tx, mut r_rx, _) = inproc::pipe(64);
    let (mut r_tx, mut s_rx, _) = inproc::pipe(64);
    let target = states.target(&dst);
    let (sent, received) = std::thread::scope(|s| {
        let receiver = s.spawn(|| -> Result<(ReceiverReport, u64), SessionError> {
            let report = run_receiver(
                &dst,
                target,
                &mut r_tx,
                &mut r_rx,
                progress,
                // Both ends are this user's: devices are copied as `cp -a` copies them.
                ReceiverOptions {
                    allow_devices: true,
                    dry_run: opts.dry_run,
                    inplace: Patching::when(opts.inplace),
                    ..ReceiverOptions::default()
                },
            )?;
            Ok((report, r_tx.wire_bytes()))
        });
        // The receiver drives the progress display of a local sync.
        let sent = run_source(&src, mode, opts, &mut s_tx, &mut s_rx, &NoProgress);
        let wire = s_tx.wire_bytes();
        drop(s_tx);
        drop(s_rx);
        let received = receiver
            .join()
            .unwrap_or_else(|_| Err(SessionError::Protocol("receiver thread panicked".into())));
        (sent.map(|r| (r, wire)), received)
    });
    // The receiver's error says more (it knows what it could not apply), unless the sender's
    // is the cause (a source read error is reported to the receiver as a peer error).
    let ((report, wire_sent), (_, wire_back)) = match (sent, received) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), Ok(_)) => return Err(e.into()),
        (Ok(_), Err(e)) => return Err(e.into()),
        (Err(se), Err(re)) => {
            return Err(match re {
                SessionError::Peer(_) | SessionError::Transport(_) => se.into(),
                re => re.into(),
            });
        }
    };
    let ends = Ends {
        mode,
        source: src.display().to_string(),
        destination: dst.display().to_string(),
        started,
    };
    Ok(ends.seen_by_sender(&report, wire_sent, wire_back))
}

/// The sending half of any sync: scans `src` (trusting its quick-check index unless
/// `--checksum`), streams it over `tx`/`rx`, and saves the refreshed index (once the scan is
/// complete, while the receiver commits).
pub fn run_source(
    src: &Path,
    mode: VolumeMode,
    opts: &SyncOptions,
    tx: &mut dyn MessageTx,
    rx: &mut dyn MessageRx,
    progress: &dyn Progress,
) -> Result<SenderReport, SessionError> {
    let states = StateDir::new(opts.state_dir.clone());
    let state = states.source(src);
    let sender_opts = SenderOptions {
        mode,
        snapshot: SnapshotOptions {
            chunker: opts.chunker,
            checksum: opts.checksum,
            threads: opts.threads,
            keep_contents: false,
        },
        compress: opts.compress,
        state,
        dry_run: opts.dry_run,
        inplace: opts.inplace,
        live: opts.live,
    };
    run_sender(src, sender_opts, now_ns(), tx, rx, progress)
}

/// A summary's `complete`, `files_unfinished` and `chunks_stale`.
fn ending(unfinished: Option<Unfinished>) -> (bool, u64, u64) {
    match unfinished {
        None => (true, 0, 0),
        Some(u) => (false, u.files, u.chunks),
    }
}

/// What a summary says about the two ends, whichever side this process played.
pub struct Ends {
    pub mode: VolumeMode,
    pub source: String,
    pub destination: String,
    pub started: Instant,
}

impl Ends {
    /// Summary as seen by the sending side (the receiver's figures come with `Done`).
    pub fn seen_by_sender(self, r: &SenderReport, wire_sent: u64, wire_back: u64) -> Summary {
        let (complete, files_unfinished, chunks_stale) = ending(r.unfinished);
        Summary {
            mode: self.mode,
            source: self.source,
            destination: self.destination,
            files: r.scan.files,
            entries: r.scan.entries,
            entries_sent: r.manifest.sent,
            manifest_delta: r.manifest.delta,
            bytes_total: r.scan.bytes_total,
            bytes_read: r.scan.bytes_read,
            chunks_total: r.scan.chunks_total,
            chunks_sent: r.chunks_sent,
            bytes_sent_raw: r.bytes_sent_raw,
            bytes_sent_wire: wire_sent,
            bytes_received_wire: wire_back,
            bytes_copied_locally: r.receiver.bytes_copied_locally,
            files_written: r.receiver.files_written,
            files_patched: r.receiver.files_patched,
            deleted: r.receiver.deleted,
            duration_ms: self.started.elapsed().as_millis() as u64,
            root: r.root.to_hex(),
            dry_run: r.dry_run,
            complete,
            files_unfinished,
            chunks_stale,
        }
    }

    /// Summary as seen by the receiving side (the sender's read figure comes with
    /// `ChunksEnd`). `wire_sent` is what the source sent, `wire_back` what went back to it.
    pub fn seen_by_receiver(self, r: &ReceiverReport, wire_sent: u64, wire_back: u64) -> Summary {
        let (complete, files_unfinished, chunks_stale) = ending(r.unfinished);
        Summary {
            mode: self.mode,
            source: self.source,
            destination: self.destination,
            files: r.stats.files,
            entries: r.stats.entries,
            entries_sent: r.manifest.sent,
            manifest_delta: r.manifest.delta,
            bytes_total: r.stats.bytes_total,
            bytes_read: r.sender_bytes_read,
            chunks_total: r.stats.chunks_total,
            chunks_sent: r.stats.chunks_wanted,
            bytes_sent_raw: r.stats.bytes_wanted,
            bytes_sent_wire: wire_sent,
            bytes_received_wire: wire_back,
            bytes_copied_locally: r.stats.bytes_copied_locally,
            files_written: r.stats.files_written,
            files_patched: r.stats.files_patched,
            deleted: r.stats.deleted,
            duration_ms: self.started.elapsed().as_millis() as u64,
            root: r.root.to_hex(),
            dry_run: r.dry_run,
            complete,
            files_unfinished,
            chunks_stale,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report
    use super::*;
    use crate::chunk::ChunkId;
    use crate::chunk::window::{ChunkWindow, MAX_SLOTS};
    use crate::progress::NoProgress;
    use std::fs;

    /// A first sync is streamed, and both ends decide by their windows which chunks go on the
    /// wire. Unit tests run with a window of 16 slots growing to 64, so 600 one-chunk files
    /// drawn from 300 contents grow the window, evict and reuse slots all the time (and the
    /// receiver renumbers the files it can copy from): the copy must be exact, and exactly the
    /// chunks the window rule says are sent.
    #[test]
    fn a_streamed_first_sync_sends_what_the_window_rule_says_and_mirrors_the_source() {
        const { assert!(MAX_SLOTS < 300, "the test needs evictions") };
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        let content = |k: u64| format!("content {k:03} ").repeat(1 + (k % 40) as usize);
        let mut window: ChunkWindow<()> = ChunkWindow::default();
        let mut expected = 0;
        let mut pick = 1u64;
        for i in 0..600 {
            pick = pick
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let body = content((pick >> 33) % 300);
            // Names sort as they are created: the window sees them in this order.
            fs::write(src.join(format!("f{i:04}")), &body).unwrap();
            if window.first(&ChunkId::of(body.as_bytes())) {
                expected += 1;
            }
        }
        let opts = SyncOptions {
            state_dir: tmp.path().join("state"),
            ..SyncOptions::default()
        };
        let first = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        assert_eq!(first.chunks_sent, expected);
        assert!(
            expected < 600 && expected > 300,
            "some copied, some sent again"
        );
        for i in 0..600 {
            let name = format!("f{i:04}");
            assert_eq!(
                fs::read(src.join(&name)).unwrap(),
                fs::read(dst.join(&name)).unwrap(),
                "{name}"
            );
        }
        let again = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        assert_eq!(again.chunks_sent, 0);
        assert_eq!(again.root, first.root);
    }

    /// Runs the source side of a sync of `src` against `peer`, a test receiver on its own
    /// thread holding the other ends of the pipes; the sync must fail. Returns the sender's
    /// error and what `peer` returned.
    fn source_failing_against<T: Send + 'static>(
        src: &Path,
        opts: &SyncOptions,
        peer: impl FnOnce(inproc::InprocTx, inproc::InprocRx) -> T + Send + 'static,
    ) -> (String, T) {
        let (mut s_tx, r_rx, _) = inproc::pipe(64);
        let (r_tx, mut s_rx, _) = inproc::pipe(64);
        let peer = std::thread::spawn(move || peer(r_tx, r_rx));
        let sent = run_source(
            src,
            VolumeMode::Tree,
            opts,
            &mut s_tx,
            &mut s_rx,
            &NoProgress,
        );
        drop((s_tx, s_rx));
        (sent.unwrap_err().to_string(), peer.join().unwrap())
    }

    /// A source of one small file `f`, and options keeping state beside it in `tmp`.
    fn one_file_source(tmp: &Path) -> (PathBuf, SyncOptions) {
        let src = tmp.join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), b"data").unwrap();
        let opts = SyncOptions {
            state_dir: tmp.join("state"),
            ..SyncOptions::default()
        };
        (src, opts)
    }

    /// A receiver that answers `Unfinished` though no chunk went stale (a live session or
    /// not) is refused: the sender would otherwise report a copy that is there as unfinished,
    /// or, worse, a deployer would take it for a round that made progress.
    #[test]
    fn a_receiver_cannot_call_a_sync_unfinished_that_sent_every_chunk() {
        use crate::protocol::message::{Message, Unfinished};
        let tmp = tempfile::tempdir().unwrap();
        let (src, mut opts) = one_file_source(tmp.path());
        opts.live = true;
        let (err, _) = source_failing_against(&src, &opts, move |mut r_tx, mut r_rx| {
            let Ok(Message::Hello(h)) = r_rx.recv() else {
                panic!("no hello")
            };
            assert!(h.live);
            r_tx.send(Message::Hello(h)).unwrap();
            while !matches!(r_rx.recv().unwrap(), Message::ManifestEnd { .. }) {}
            r_tx.send(Message::WantEnd).unwrap();
            while !matches!(r_rx.recv().unwrap(), Message::ChunksEnd { .. }) {}
            r_tx.send(Message::Unfinished(Unfinished {
                files: 1,
                chunks: 1,
            }))
            .unwrap();
            let _ = r_rx.recv();
        });
        assert!(err.contains("yet no chunk went stale"), "{err}");
        let kept = StateDir::new(opts.state_dir.clone()).source(&src.canonicalize().unwrap());
        let shelf = crate::manifest::store::Shelf::new(kept.manifests);
        assert!(
            shelf
                .open_all(&crate::protocol::sender::header(
                    VolumeMode::Tree,
                    opts.chunker
                ))
                .is_empty(),
            "a manifest was kept as confirmed"
        );
    }

    /// Only the end the user runs may make a sync a dry run: a receiver that answers a
    /// real sync's hello with one is refused by the sender, which sends it nothing, and a
    /// sender asking a receiver that was not told to is refused too.
    #[test]
    fn a_peer_cannot_turn_a_real_sync_into_a_dry_run() {
        use crate::protocol::message::{Hello, Message};
        let tmp = tempfile::tempdir().unwrap();
        let (src, opts) = one_file_source(tmp.path());
        let (err, said) = source_failing_against(&src, &opts, move |mut r_tx, mut r_rx| {
            let Ok(Message::Hello(h)) = r_rx.recv() else {
                panic!("no hello")
            };
            assert!(!h.dry_run);
            r_tx.send(Message::Hello(Hello { dry_run: true, ..h }))
                .unwrap();
            match r_rx.recv() {
                Ok(Message::Error { message }) => message,
                Ok(m) => panic!("the sender went on with {}", m.name()),
                Err(e) => e.to_string(),
            }
        });
        assert!(err.contains("asked for a dry run"), "{err}");
        assert!(said.contains("asked for a dry run"));

        let dst = tmp.path().join("dst");
        let (mut s_tx, mut r_rx, _) = inproc::pipe(64);
        let (mut r_tx, mut s_rx, _) = inproc::pipe(64);
        let receiver = std::thread::spawn(move || {
            let target = StateDir::new(tmp.path().join("state")).target(&dst);
            let got = run_receiver(
                &dst,
                target,
                &mut r_tx,
                &mut r_rx,
                &NoProgress,
                ReceiverOptions::default(),
            );
            (got.map(|_| ()).unwrap_err().to_string(), dst.exists(), tmp)
        });
        let asking = SyncOptions {
            dry_run: DryRun::Ask,
            ..opts
        };
        let sent = run_source(
            &src,
            VolumeMode::Tree,
            &asking,
            &mut s_tx,
            &mut s_rx,
            &NoProgress,
        );
        drop((s_tx, s_rx));
        assert!(sent.is_err());
        let (err, created, _tmp) = receiver.join().unwrap();
        assert!(err.contains("asked for a dry run"), "{err}");
        assert!(!created, "the refused dry run created the destination");
    }

    /// A file an application writes while it is being sent (a migration's pre-copy of a
    /// live database) fails the sync, but the source index stays: the write moved the file's
    /// ctime past the scan, so its record cannot vouch for it, and the next sync reads the
    /// files that changed, not the whole volume again.
    #[test]
    fn a_file_changed_while_it_is_sent_fails_the_sync_and_keeps_the_source_index() {
        use crate::chunk::Segment;
        use crate::manifest::EntryKind;
        use crate::protocol::message::{Hello, Message};
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        let data = |seed: u8| {
            (0..300_000u32)
                .map(|i| (i % 251) as u8 ^ seed)
                .collect::<Vec<_>>()
        };
        fs::write(src.join("a"), data(1)).unwrap();
        let opts = SyncOptions {
            state_dir: tmp.path().join("state"),
            ..SyncOptions::default()
        };
        sync_local(&src, &tmp.path().join("first"), &opts, &NoProgress).unwrap();
        let index = StateDir::new(opts.state_dir.clone())
            .source(&src.canonicalize().unwrap())
            .index;
        assert!(index.exists());

        let file = src.join("a");
        let (err, said) = source_failing_against(&src, &opts, move |mut r_tx, mut r_rx| {
            let Ok(Message::Hello(h)) = r_rx.recv() else {
                panic!("no hello")
            };
            r_tx.send(Message::Hello(Hello {
                bases: Vec::new(),
                ..h
            }))
            .unwrap();
            let mut wanted = None;
            loop {
                match r_rx.recv().unwrap() {
                    Message::Entry(e) => {
                        if let EntryKind::File { segments, .. } = e.kind
                            && let Some(Segment::Chunk { id, .. }) = segments.first()
                        {
                            wanted = Some(*id);
                        }
                    }
                    Message::ManifestEnd { .. } => break,
                    _ => {}
                }
            }
            // The application writes the file after the scan, before its chunks are read.
            fs::write(&file, data(2)).unwrap();
            r_tx.send(Message::Want(vec![wanted.expect("a chunk of a")]))
                .unwrap();
            // The sender may have failed on the want and hung up already.
            let _ = r_tx.send(Message::WantEnd);
            loop {
                match r_rx.recv() {
                    Ok(Message::Error { message }) => return message,
                    Ok(_) => {}
                    Err(e) => return e.to_string(),
                }
            }
        });
        assert!(err.contains("source changed during the sync"), "{err}");
        assert!(said.contains("source changed"));
        assert!(
            index.exists(),
            "the index was dropped for a change made during the sync"
        );
    }

    /// Runs `f` once: when the sender starts serving wants (the scan is over), or with
    /// `at_size`, when the scan reports an entry of that size (hashed, its chunks not yet
    /// read back). The application writing its files at the worst moment.
    struct Meddler<F: Fn() + Send + Sync> {
        once: std::sync::Once,
        at_size: Option<u64>,
        f: F,
    }

    impl<F: Fn() + Send + Sync> Progress for Meddler<F> {
        fn restart(&self, name: &str, _total: u64) {
            if name == "sending" && self.at_size.is_none() {
                self.once.call_once(&self.f);
            }
        }

        fn advance(&self, bytes: u64) {
            if self.at_size == Some(bytes) {
                self.once.call_once(&self.f);
            }
        }
    }

    fn overwrite(path: &Path, at: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .write_all_at(data, at)
            .unwrap();
    }

    const BIG: usize = 3_000_017;

    /// A local sync as [`sync_local`] runs it, with `progress` given to the sender (whose
    /// phases say when the scan is over).
    fn sync_watching_sender(
        src: &Path,
        dst: &Path,
        opts: &SyncOptions,
        progress: &dyn Progress,
    ) -> Result<Summary, SessionError> {
        let (mut s_tx, mut r_rx, _) = inproc::pipe(64);
        let (mut r_tx, mut s_rx, _) = inproc::pipe(64);
        let (src, mode) = source_volume(src).unwrap();
        let dst = canonical_target(dst);
        let target = StateDir::new(opts.state_dir.clone()).target(&dst);
        let receiver_opts = ReceiverOptions {
            inplace: Patching::when(opts.inplace),
            ..ReceiverOptions::default()
        };
        let started = Instant::now();
        std::thread::scope(|s| {
            let receiver = s.spawn(|| {
                run_receiver(
                    &dst,
                    target,
                    &mut r_tx,
                    &mut r_rx,
                    &NoProgress,
                    receiver_opts,
                )
            });
            let sent = run_source(&src, mode, opts, &mut s_tx, &mut s_rx, progress);
            drop((s_tx, s_rx));
            let _ = receiver.join().unwrap();
            let ends = Ends {
                mode,
                source: src.display().to_string(),
                destination: dst.display().to_string(),
                started,
            };
            sent.map(|r| ends.seen_by_sender(&r, 0, 0))
        })
    }

    /// A database writes a page of a file after the scan and removes another file: without
    /// `--live` that fails the sync; with it the stale chunks are skipped, nothing under a
    /// final name changes, and the rerun sends only the chunks that changed since.
    #[test]
    fn a_live_sync_skips_what_changed_while_it_was_sent_and_the_rerun_finishes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        for (name, seed, len) in [("big", 1, BIG), ("small", 2, 10_000), ("gone", 3, 20_000)] {
            fs::write(src.join(name), crate::demo::seeded_bytes(seed, len)).unwrap();
        }
        let opts = SyncOptions {
            state_dir: tmp.path().join("state"),
            live: true,
            ..SyncOptions::default()
        };
        let first = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        assert!(first.complete);
        let before: Vec<Vec<u8>> = ["big", "small", "gone"]
            .iter()
            .map(|n| fs::read(dst.join(n)).unwrap())
            .collect();
        for (name, seed, len) in [
            ("big", 11, BIG),
            ("small", 12, 10_000),
            ("gone", 13, 20_000),
        ] {
            fs::write(src.join(name), crate::demo::seeded_bytes(seed, len)).unwrap();
        }
        let (big, gone) = (src.join("big"), src.join("gone"));
        let meddler = Meddler {
            once: std::sync::Once::new(),
            at_size: None,
            f: move || {
                overwrite(&big, 1_500_000, &[0xAA; 1000]);
                fs::remove_file(&gone).unwrap();
            },
        };
        let live = sync_watching_sender(&src, &dst, &opts, &meddler).unwrap();
        assert!(!live.complete);
        assert_eq!(live.files_unfinished, 2, "big and gone");
        assert!(live.chunks_stale >= 2, "{live:?}");
        assert_eq!(live.files_written, 0);
        for (name, old) in ["big", "small", "gone"].iter().zip(&before) {
            assert_eq!(&fs::read(dst.join(name)).unwrap(), old, "{name} changed");
        }
        use crate::state::SyncStatus;
        let state = StateDir::new(opts.state_dir.clone()).target(&dst.canonicalize().unwrap());
        let status = || state.read().unwrap().status;
        assert!(matches!(status(), SyncStatus::Incomplete { .. }));
        // The big temp file's chunks are recorded, so the rerun need not read them back.
        assert!(state.partials_file().exists());

        let rerun = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        assert!(rerun.complete);
        assert!(!dst.join("gone").exists());
        for name in ["big", "small"] {
            assert_eq!(
                fs::read(src.join(name)).unwrap(),
                fs::read(dst.join(name)).unwrap()
            );
        }
        // The chunk or two around the page written; the rest was kept from the live run.
        assert!(rerun.chunks_sent <= 3, "{rerun:?}");
        assert!(rerun.bytes_sent_raw < live.bytes_sent_raw / 4, "{rerun:?}");
        let names: Vec<_> = fs::read_dir(&dst)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no partial file left: {names:?}");
        assert!(matches!(status(), SyncStatus::Complete { .. }));
        assert!(
            !state.partials_file().exists(),
            "a run believes only its last run"
        );
    }

    /// A first (streamed) sync of a big file written while its chunks are read back, and
    /// the same without `--live`: it fails, and the destination keeps nothing.
    #[test]
    fn a_live_first_sync_of_a_file_written_meanwhile_ends_unfinished_and_resumes() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        fs::write(src.join("big"), crate::demo::seeded_bytes(1, BIG)).unwrap();
        fs::write(src.join("small"), crate::demo::seeded_bytes(2, 5_000)).unwrap();
        let big = src.join("big");
        let meddler = |seed: u8| Meddler {
            once: std::sync::Once::new(),
            at_size: Some(BIG as u64),
            f: {
                let big = big.clone();
                move || overwrite(&big, 2_000_000, &[seed; 4096])
            },
        };
        let mut opts = SyncOptions {
            state_dir: tmp.path().join("state"),
            ..SyncOptions::default()
        };
        let err = sync_watching_sender(&src, &dst, &opts, &meddler(1)).unwrap_err();
        assert!(SyncError::from(err).source_changed());
        assert!(!dst.join("big").exists() && !dst.join("small").exists());

        opts.live = true;
        let live = sync_watching_sender(&src, &dst, &opts, &meddler(2)).unwrap();
        assert!(!live.complete);
        assert_eq!(live.files_unfinished, 1);
        assert!(!dst.join("big").exists() && !dst.join("small").exists());
        let rerun = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        assert!(rerun.complete, "{rerun:?}");
        assert!(rerun.chunks_sent <= 3, "{rerun:?}");
        for name in ["big", "small"] {
            assert_eq!(
                fs::read(src.join(name)).unwrap(),
                fs::read(dst.join(name)).unwrap()
            );
        }
    }

    /// A disk image written while it is sent: the block receiver writes in place, so an
    /// unfinished run leaves the image part new (as an interrupted one does) and marked
    /// incomplete; the rerun sends what changed since and what went stale.
    #[test]
    fn a_live_block_sync_of_an_image_written_meanwhile_ends_unfinished_and_resumes() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("disk.img"), tmp.path().join("copy.img"));
        fs::write(&src, crate::demo::seeded_bytes(1, BIG)).unwrap();
        let opts = SyncOptions {
            state_dir: tmp.path().join("state"),
            live: true,
            ..SyncOptions::default()
        };
        assert!(sync_local(&src, &dst, &opts, &NoProgress).unwrap().complete);
        overwrite(&src, 100_000, &crate::demo::seeded_bytes(2, 300_000));
        let meddler = Meddler {
            once: std::sync::Once::new(),
            at_size: None,
            f: {
                let src = src.clone();
                move || overwrite(&src, 200_000, &[9; 4096])
            },
        };
        let live = sync_watching_sender(&src, &dst, &opts, &meddler).unwrap();
        assert!(!live.complete, "{live:?}");
        assert_eq!(live.files_unfinished, 1);
        let state = StateDir::new(opts.state_dir.clone()).target(&dst.canonicalize().unwrap());
        let incomplete = matches!(
            state.read().unwrap().status,
            crate::state::SyncStatus::Incomplete { .. }
        );
        assert!(incomplete);
        let rerun = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        assert!(rerun.complete);
        assert!(rerun.chunks_sent <= 3, "{rerun:?}");
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    }

    /// The names under `dir` and their contents, temp files apart.
    fn contents(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        fs::read_dir(dir)
            .map(|items| {
                items
                    .map(|e| e.unwrap())
                    .filter(|e| {
                        !crate::apply::fsops::is_temp_name(e.file_name().as_encoded_bytes())
                    })
                    .map(|e| {
                        (
                            e.file_name().into_string().unwrap(),
                            fs::read(e.path()).unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

        /// Whatever the application writes while a live sync runs, and wherever: the sync
        /// either finishes or changes nothing under a final name, and a plain rerun mirrors
        /// the source and leaves no temp file behind.
        #[test]
        fn a_live_sync_finishes_or_changes_nothing_and_a_rerun_mirrors(
            files in proptest::collection::vec((0usize..2_500_000, 0u64..1000), 1..5),
            synced_before in proptest::prelude::any::<bool>(),
            rewrite in proptest::collection::vec(proptest::prelude::any::<bool>(), 5),
            writes in proptest::collection::vec((0usize..5, 0.0f64..1.0, 1usize..40_000), 0..6),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
            fs::create_dir(&src).unwrap();
            let name = |i: usize| src.join(format!("f{i}"));
            for (i, &(len, seed)) in files.iter().enumerate() {
                fs::write(name(i), crate::demo::seeded_bytes(seed, len)).unwrap();
            }
            let opts = SyncOptions {
                state_dir: tmp.path().join("state"),
                live: true,
                ..SyncOptions::default()
            };
            if synced_before {
                sync_local(&src, &dst, &opts, &NoProgress).unwrap();
                for (i, &(len, seed)) in files.iter().enumerate() {
                    if rewrite[i] {
                        fs::write(name(i), crate::demo::seeded_bytes(seed + 7, len)).unwrap();
                    }
                }
            }
            let sizes: Vec<usize> = files.iter().map(|f| f.0).collect();
            let paths: Vec<PathBuf> = (0..files.len()).map(name).collect();
            let meddler = Meddler {
                once: std::sync::Once::new(),
                // A first sync is streamed: meddle once the largest file is hashed.
                at_size: (!synced_before).then(|| *sizes.iter().max().unwrap() as u64),
                f: move || {
                    for &(i, at, len) in &writes {
                        let Some(path) = paths.get(i) else { continue };
                        let at = (at * sizes[i] as f64) as u64;
                        overwrite(path, at, &vec![0xA5; len]);
                    }
                },
            };
            let before = contents(&dst);
            let live = sync_watching_sender(&src, &dst, &opts, &meddler).unwrap();
            if !live.complete {
                proptest::prop_assert_eq!(contents(&dst), before);
                proptest::prop_assert!(live.chunks_stale > 0);
            }
            let plain = SyncOptions { live: false, ..opts };
            let rerun = sync_local(&src, &dst, &plain, &NoProgress).unwrap();
            proptest::prop_assert!(rerun.complete);
            proptest::prop_assert_eq!(contents(&dst), contents(&src));
            let left = fs::read_dir(&dst).unwrap().count();
            proptest::prop_assert_eq!(left, files.len(), "temp files left");
        }
    }

    /// A live `--inplace` sync of a big file changed in place, written again while it is
    /// sent: the patch waits staged (the file keeps its old contents and inode), and the
    /// rerun patches it, resuming the staged ranges from the record.
    #[test]
    fn a_live_patch_in_place_ends_unfinished_leaving_the_file_and_the_rerun_patches_it() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        fs::write(src.join("db"), crate::demo::seeded_bytes(1, 4 * BIG)).unwrap();
        let opts = SyncOptions {
            state_dir: tmp.path().join("state"),
            live: true,
            inplace: true,
            ..SyncOptions::default()
        };
        sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        let (old, inode) = (
            fs::read(dst.join("db")).unwrap(),
            fs::metadata(dst.join("db")).unwrap().ino(),
        );
        overwrite(
            &src.join("db"),
            1_000_000,
            &crate::demo::seeded_bytes(2, 200_000),
        );
        overwrite(
            &src.join("db"),
            9_000_000,
            &crate::demo::seeded_bytes(3, 200_000),
        );
        let db = src.join("db");
        let meddler = Meddler {
            once: std::sync::Once::new(),
            at_size: None,
            f: move || overwrite(&db, 9_050_000, &[7; 4096]),
        };
        let live = sync_watching_sender(&src, &dst, &opts, &meddler).unwrap();
        assert!(!live.complete, "{live:?}");
        assert_eq!(
            fs::read(dst.join("db")).unwrap(),
            old,
            "patched while unfinished"
        );
        let rerun = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        assert!(rerun.complete);
        assert_eq!(rerun.files_patched, 1, "{rerun:?}");
        assert!(rerun.chunks_sent <= 3, "{rerun:?}");
        assert_eq!(fs::metadata(dst.join("db")).unwrap().ino(), inode);
        assert_eq!(
            fs::read(src.join("db")).unwrap(),
            fs::read(dst.join("db")).unwrap()
        );
    }
}
