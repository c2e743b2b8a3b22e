//! Driving the receiving side of a session over a transport.

use std::path::Path;

use bytes::Bytes;

use super::SessionError;
use super::dry_run::{ChangeBatch, DryRun};
use super::message::{
    ChunkData, DoneStats, Hello, MAX_WANT, ManifestSent, Message, PROTOCOL_VERSION, SuffixData,
    Unfinished,
};
use super::phase::ReceiverPhase;
use super::sender::header;
use crate::apply::{ApplyError, ApplyStats, ChunkFeed, Committed, Destination};
use crate::chunk::ChunkId;
use crate::manifest::delta::{DeltaError, Merger};
use crate::manifest::store::{StoredEntries, StoredManifest};
use crate::manifest::{Entry, EntryKind, Header, Limits, RootDigest, VolumeMode};
use crate::progress::Progress;
use crate::state::TargetState;
use crate::transport::{MessageRx, MessageTx};

#[derive(Clone, Copy, Debug)]
pub struct ReceiverReport {
    pub mode: VolumeMode,
    pub root: RootDigest,
    pub stats: ApplyStats,
    pub manifest: ManifestSent,
    /// Source bytes the sender had to read (from `ChunksEnd`).
    pub sender_bytes_read: u64,
    /// A dry run: `stats` say what the sync would do; nothing was changed.
    pub dry_run: bool,
    /// A live session in which chunks went stale: nothing was committed, partial files are
    /// kept for the next run.
    pub unfinished: Option<Unfinished>,
}

/// Most manifest entries a receiver accepts unless told otherwise: a peer cannot make it
/// plan an endless manifest.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000_000;

/// How a receiver runs.
pub struct ReceiverOptions {
    /// Most manifest entries accepted.
    pub max_entries: u64,
    /// Whether device nodes in the manifest are created. A node names a device of the host it
    /// lands on, not of the one it came from, and whoever can open it there reaches that
    /// device: a server accepts them only when told to (`serve --allow-devices`), as an rsync
    /// daemon, running its modules as `nobody`, cannot create them. A local sync or a pull,
    /// where the user picked the source, creates them as `cp -a` and `rsync -a` do.
    pub allow_devices: bool,
    /// Called once `Done` is on its way, before the receiver index is saved (which may wait
    /// out the racy margin): a server marks the volume as finishing here, so that a new
    /// session waits for the index instead of being refused as busy.
    pub on_done: Option<Box<dyn FnOnce() + Send>>,
    /// Whether this is a dry run ([`super::dry_run`]).
    pub dry_run: DryRun,
    /// Whether large files with small changes are patched at their final name
    /// ([`crate::apply::Destination::patch_in_place`]).
    pub inplace: Patching,
}

/// Whether a receiver patches large files in place (`--inplace`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Patching {
    /// Every file is rebuilt under a temp name and renamed into place.
    #[default]
    Off,
    /// Asked for at this end (a local sync, a pull).
    On,
    /// As the sender's hello asks: a server's pushing client owns that choice, as it owns
    /// what the volume holds.
    AsAsked,
}

impl Patching {
    /// [`Patching::On`] if `asked`.
    pub fn when(asked: bool) -> Self {
        match asked {
            true => Patching::On,
            false => Patching::Off,
        }
    }
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            max_entries: DEFAULT_MAX_ENTRIES,
            allow_devices: false,
            on_done: None,
            dry_run: DryRun::Refuse,
            inplace: Patching::Off,
        }
    }
}

/// Runs a whole session as the receiver into `dst`, accepting at most `opts.max_entries`
/// entries, and device nodes only if `opts.allow_devices`; the receiver index is saved last,
/// after `opts.on_done`.
pub fn run_receiver(
    dst: &Path,
    state: TargetState,
    tx: &mut dyn MessageTx,
    rx: &mut dyn MessageRx,
    progress: &dyn Progress,
    opts: ReceiverOptions,
) -> Result<ReceiverReport, SessionError> {
    let mut dest: Option<Destination> = None;
    let result = session(dst, state, tx, rx, progress, &opts, &mut dest);
    if let Err(e) = &result {
        if !matches!(e, SessionError::Peer(_) | SessionError::Transport(_)) {
            let _ = tx.send(Message::Error {
                message: e.to_string(),
            });
        }
        // A failure on purpose (source error, bad data) leaves the destination as it was; a
        // broken connection keeps partial files so the rerun resumes.
        if let Some(d) = dest.as_mut() {
            if e.is_disconnect() {
                d.keep_for_resume();
            } else {
                d.discard();
            }
        }
    }
    let (report, committed) = result?;
    if let Some(done) = opts.on_done {
        done();
    }
    if let Some(committed) = committed {
        committed.save_index();
    }
    Ok(report)
}

/// What a receiver accepts of a manifest's entries.
#[derive(Clone, Copy)]
struct EntryLimits {
    max_entries: u64,
    allow_devices: bool,
}

impl EntryLimits {
    /// Refuses the entry that would be one too many, or a device node not allowed.
    fn check(&self, entries_so_far: u64, e: &Entry) -> Result<(), SessionError> {
        let max = self.max_entries;
        if entries_so_far >= max {
            return Err(SessionError::Protocol(format!(
                "the manifest has more than {max} entries, this receiver's limit"
            )));
        }
        if let EntryKind::CharDevice { rdev } | EntryKind::BlockDevice { rdev } = e.kind
            && !self.allow_devices
        {
            let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
            return Err(SessionError::Refused(format!(
                "{} is a {} ({major}:{minor}); this receiver does not create device nodes \
                 (replicator serve --allow-devices)",
                e.path,
                e.kind.name()
            )));
        }
        Ok(())
    }
}

struct Feed<'a> {
    rx: &'a mut dyn MessageRx,
    phase: ReceiverPhase,
}

impl Feed<'_> {
    fn next(&mut self) -> Result<Message, SessionError> {
        let msg = self.rx.recv()?;
        self.phase = self.phase.accept(&msg).map_err(SessionError::Protocol)?;
        if let Message::Error { message } = msg {
            return Err(SessionError::Peer(message));
        }
        Ok(msg)
    }
}

/// Adapts the session's message stream to the apply engine, remembering a session error so it
/// is reported as such (not as a generic apply failure).
struct ChunkStream<'a, 'b> {
    feed: &'a mut Feed<'b>,
    error: Option<SessionError>,
    /// A live session: the sender may send `Stale` in place of a chunk.
    live: bool,
}

impl ChunkFeed for ChunkStream<'_, '_> {
    fn next_chunk(
        &mut self,
        expect: ChunkId,
        base: Option<(ChunkId, &[u8])>,
    ) -> Result<Option<Bytes>, ApplyError> {
        match self.feed.next() {
            Ok(Message::Chunk(c)) if c.id == expect => Ok(Some(c.decode_verified()?)),
            Ok(Message::Suffix(c)) if c.id == expect => Ok(Some(c.decode_verified(base)?)),
            Ok(Message::Stale(id)) if id == expect && self.live => Ok(None),
            Ok(Message::Stale(_)) if !self.live => {
                self.error = Some(SessionError::Protocol(
                    "a stale chunk in a session that is not live".into(),
                ));
                Err(ApplyError::MissingChunks)
            }
            Ok(
                Message::Chunk(ChunkData { id: got, .. })
                | Message::Suffix(SuffixData { id: got, .. })
                | Message::Stale(got),
            ) => Err(ApplyError::UnexpectedChunk { got, want: expect }),
            Ok(other) => Err(ApplyError::NotAChunk {
                got: other.name(),
                want: expect,
            }),
            Err(e) => {
                self.error = Some(e);
                Err(ApplyError::MissingChunks)
            }
        }
    }
}

fn session(
    dst: &Path,
    state: TargetState,
    tx: &mut dyn MessageTx,
    rx: &mut dyn MessageRx,
    progress: &dyn Progress,
    opts: &ReceiverOptions,
    slot: &mut Option<Destination>,
) -> Result<(ReceiverReport, Option<Committed>), SessionError> {
    let limits = EntryLimits {
        max_entries: opts.max_entries,
        allow_devices: opts.allow_devices,
    };
    let mut feed = Feed {
        rx,
        phase: ReceiverPhase::Hello,
    };
    let Message::Hello(hello) = feed.next()? else {
        unreachable!("the phase machine admits only hello first")
    };
    // A refused dry run is reported after our hello, as a version mismatch is.
    let agreed = opts.dry_run.agree(hello.dry_run);
    let dry_run = agreed == Ok(true);
    // An empty destination will want every chunk: asking for them would only cost a round
    // trip and a second pass over the source, so the sender streams them with the manifest.
    let stream = !dry_run && hello.mode == VolumeMode::Tree && is_empty_dir(dst);
    let inplace = hello.mode == VolumeMode::Tree
        && !stream
        && match opts.inplace {
            Patching::Off => false,
            Patching::On => true,
            Patching::AsAsked => hello.inplace,
        };
    let header = header(hello.mode, hello.chunker);
    // A delta needs the manifest the sender offers, intact. It only shortens the wire: the
    // merged manifest is checked against the sender's root and planned against what the
    // destination holds now, so the destination need not still be as that manifest says.
    let base = match stream {
        false => stored_base(&state, &header, &hello.bases),
        true => None,
    };
    // Any receiver of this version takes stale chunks from a live source.
    let live = hello.live && !dry_run;
    tx.send(Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        stream,
        bases: base.iter().map(StoredManifest::root).collect(),
        dry_run,
        inplace,
        live,
        ..hello.clone()
    }))?;
    if hello.version != PROTOCOL_VERSION {
        return Err(SessionError::Version {
            ours: PROTOCOL_VERSION,
            theirs: hello.version,
        });
    }
    if let Err(why) = hello.chunker.validate() {
        return Err(SessionError::Protocol(why));
    }
    agreed.map_err(SessionError::Protocol)?;
    progress.phase("scanning");
    let started = std::time::Instant::now();
    let dest = slot.insert(match dry_run {
        true => Destination::look(dst, header, state)?,
        false => Destination::prepare(dst, header, state)?,
    });
    if inplace {
        dest.patch_in_place();
    }
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        stream,
        "destination walked"
    );
    if stream {
        if !dest.is_empty() {
            return Err(SessionError::Apply(ApplyError::LocalChanged(format!(
                "{} (it was empty when the sync started)",
                dst.display()
            ))));
        }
        feed.phase = ReceiverPhase::StreamedManifest;
        dest.stream();
    }
    let merger = match base {
        Some(base) => {
            feed.phase = ReceiverPhase::DeltaManifest;
            let entries = base.entries(Limits::default()).map_err(DeltaError::Base)?;
            Some(Merger::new(entries))
        }
        None => None,
    };
    let (count, root, manifest) =
        receive_manifest(&mut feed, dest, merger, stream, live, limits, progress)?;
    if dest.manifest_digest() != root || dest.stats.entries != count {
        return Err(SessionError::Protocol(format!(
            "manifest digest or entry count does not match what was announced ({count} entries, root {root})"
        )));
    }
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        entries = count,
        "manifest received and planned"
    );
    let start = SessionStart {
        root,
        mode: hello.mode,
        manifest,
        started,
    };
    if dry_run {
        return report_changes(dest, tx, start, progress).map(|report| (report, None));
    }
    progress.set_total(dest.progress_total());
    let wants = dest.take_wants();
    let hints = dest.want_hints();
    if stream {
        return finish(feed, tx, slot, start, progress);
    }
    let mut chunks = ChunkStream {
        feed: &mut feed,
        error: None,
        live,
    };
    let (sent, written) = std::thread::scope(|s| {
        let sender = s.spawn(|| -> Result<(), SessionError> {
            for batch in hints.chunks(MAX_WANT) {
                tx.send(Message::WantHints(batch.to_vec()))?;
            }
            for batch in wants.chunks(MAX_WANT) {
                tx.send(Message::Want(batch.to_vec()))?;
            }
            tx.send(Message::WantEnd)?;
            Ok(())
        });
        let written = dest.write(&mut chunks, progress);
        if written.is_err() && chunks.error.is_none() {
            // Keep reading so the sender can finish and the want thread is not left blocked.
            while !matches!(chunks.feed.phase, ReceiverPhase::Finished)
                && chunks.feed.next().is_ok()
            {}
        }
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(SessionError::Protocol("want sender panicked".into())));
        (sent, written)
    });
    if let Some(e) = chunks.error.take() {
        return Err(e);
    }
    written?;
    sent?;
    finish(feed, tx, slot, start, progress)
}

/// A dry run's end: the planned changes go to the sender (and to this end's progress), then
/// what the sync would move; nothing is written.
fn report_changes(
    dest: &mut Destination,
    tx: &mut dyn MessageTx,
    start: SessionStart,
    progress: &dyn Progress,
) -> Result<ReceiverReport, SessionError> {
    progress.phase("dry run");
    let mut batch = ChangeBatch::default();
    let outcome = dest.changes(|change| -> Result<(), SessionError> {
        progress.change(&change);
        if let Some(full) = batch.push(change) {
            tx.send(Message::Changes(full))?;
        }
        Ok(())
    })?;
    if let Some(rest) = batch.rest() {
        tx.send(Message::Changes(rest))?;
    }
    tx.send(Message::DryRunEnd(outcome))?;
    tx.flush()?;
    tracing::debug!(ms = start.started.elapsed().as_millis(), "dry run planned");
    Ok(ReceiverReport {
        mode: start.mode,
        root: start.root,
        stats: dest.stats,
        manifest: start.manifest,
        sender_bytes_read: 0,
        dry_run: true,
        unfinished: None,
    })
}

/// What the end of a session needs to know about its start.
struct SessionStart {
    root: RootDigest,
    mode: VolumeMode,
    manifest: ManifestSent,
    started: std::time::Instant,
}

/// The manifest phase: every entry (merged into the base in a delta session) is planned as
/// it arrives, and in a streamed session written with its chunks. Returns the announced
/// count and root, and how the manifest came.
fn receive_manifest(
    feed: &mut Feed<'_>,
    dest: &mut Destination,
    mut merger: Option<Merger<StoredEntries>>,
    stream: bool,
    live: bool,
    limits: EntryLimits,
    progress: &dyn Progress,
) -> Result<(u64, RootDigest, ManifestSent), SessionError> {
    let plan = &mut |dest: &mut Destination, e: Entry| -> Result<(), SessionError> {
        limits.check(dest.stats.entries, &e)?;
        Ok(dest.plan(e)?)
    };
    let mut manifest = ManifestSent {
        delta: merger.is_some(),
        sent: 0,
    };
    loop {
        let msg = feed.next()?;
        if matches!(
            msg,
            Message::Entry(_) | Message::Removed(_) | Message::Patch(_)
        ) {
            manifest.sent += 1;
        }
        match msg {
            Message::Entry(e) if stream => {
                plan(dest, e)?;
                let mut chunks = ChunkStream {
                    feed,
                    error: None,
                    live,
                };
                let written = dest.write_planned(&mut chunks, progress);
                if let Some(e) = chunks.error.take() {
                    return Err(e);
                }
                written?;
            }
            Message::Entry(e) => match &mut merger {
                Some(m) => m.put(e, &mut |e| plan(dest, e))?,
                None => plan(dest, e)?,
            },
            Message::Removed(path) => match &mut merger {
                Some(m) => m.remove(path, &mut |e| plan(dest, e))?,
                None => unreachable!("the phase machine admits removals in delta sessions only"),
            },
            Message::Patch(patch) => match &mut merger {
                Some(m) => m.patch(patch, &mut |e| plan(dest, e))?,
                None => unreachable!("the phase machine admits patches in delta sessions only"),
            },
            Message::Chunk(ChunkData { id, .. }) | Message::Stale(id) => {
                return Err(SessionError::Protocol(format!(
                    "chunk {id} arrived where no chunk was due"
                )));
            }
            Message::ManifestEnd { entries, root } => {
                if let Some(m) = merger.take() {
                    m.finish(&mut |e| plan(dest, e))?;
                }
                dest.end_manifest()?;
                return Ok((entries, root, manifest));
            }
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {}",
                    other.name()
                )));
            }
        }
    }
}

/// The end of a session: the sender's `ChunksEnd`, then commit, verify and `Done`.
fn finish(
    mut feed: Feed<'_>,
    tx: &mut dyn MessageTx,
    slot: &mut Option<Destination>,
    start: SessionStart,
    progress: &dyn Progress,
) -> Result<(ReceiverReport, Option<Committed>), SessionError> {
    let SessionStart {
        root,
        mode,
        manifest,
        started,
    } = start;
    let sender_bytes_read = match feed.next()? {
        Message::ChunksEnd { bytes_read } => bytes_read,
        other => {
            return Err(SessionError::Protocol(format!(
                "unexpected {} after the last chunk",
                other.name()
            )));
        }
    };
    tracing::debug!(ms = started.elapsed().as_millis(), "chunks received");
    let dest = slot.as_mut().expect("destination prepared above");
    if let Some(unfinished) = dest.unfinished() {
        // Every file that got all its chunks is kept with the rest: the next run finds them
        // complete, and commits the volume as a whole.
        dest.keep_for_resume();
        tracing::info!(
            files = unfinished.files,
            chunks = unfinished.chunks,
            "chunks changed at the source while they were sent: partial files kept, nothing committed"
        );
        tx.send(Message::Unfinished(unfinished))?;
        tx.flush()?;
        // Nothing was committed: the files the write phase finished wait as temp files.
        let stats = ApplyStats {
            files_written: 0,
            files_patched: 0,
            ..dest.stats
        };
        let report = ReceiverReport {
            mode,
            root,
            stats,
            manifest,
            sender_bytes_read,
            dry_run: false,
            unfinished: Some(unfinished),
        };
        return Ok((report, None));
    }
    let dest = slot.take().expect("destination prepared above");
    let committed = dest.commit(root, progress)?;
    let (got, stats) = (committed.root, committed.stats);
    tracing::debug!(ms = started.elapsed().as_millis(), "committed and verified");
    tx.send(Message::Done {
        root: got,
        stats: DoneStats {
            files_written: stats.files_written,
            files_patched: stats.files_patched,
            deleted: stats.deleted,
            bytes_copied_locally: stats.bytes_copied_locally,
        },
    })?;
    tx.flush()?;
    let report = ReceiverReport {
        mode,
        root: got,
        stats,
        manifest,
        sender_bytes_read,
        dry_run: false,
        unfinished: None,
    };
    Ok((report, Some(committed)))
}

/// The manifest `state`'s destination was last completed at, if it is one of those `offered`
/// and intact (its hash is its root).
fn stored_base(
    state: &TargetState,
    header: &Header,
    offered: &[RootDigest],
) -> Option<StoredManifest> {
    if offered.is_empty() {
        return None;
    }
    match StoredManifest::open(&state.manifest_file(), header) {
        Ok(Some(stored)) if offered.contains(&stored.root()) => Some(stored),
        Ok(_) => None,
        Err(e) => {
            let path = state.manifest_file();
            tracing::warn!(path = %path.display(), "cannot read the last manifest (asking for a full one): {e}");
            None
        }
    }
}

/// True if `path` is missing or an empty directory.
fn is_empty_dir(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Ok(mut items) => items.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}
