//! Driving the sending side of a session over a transport.

use std::collections::HashMap;
use std::path::Path;

use super::SessionError;
use super::compression::{CompressPolicy, Compression};
use super::dry_run::{DryRun, Outcome};
use super::message::{
    ChunkData, DoneStats, Hello, MAX_BASES, ManifestSent, Message, PROTOCOL_VERSION, SuffixData,
    Unfinished,
};
use super::phase::SenderPhase;
use crate::chunk::window::ChunkWindow;
use crate::chunk::{ChunkId, ChunkerParams, Segment};
use crate::index::{IndexReader, IndexWriter};
use crate::manifest::delta::{DeltaError, Differ, FilePatch, Sending};
use crate::manifest::store::{Shelf, StoreWriter, StoredEntries, StoredManifest};
use crate::manifest::{
    DigestBuilder, Entry, Header, Limits, MANIFEST_VERSION, RelPath, RootDigest, VolumeMode,
    encode_entry,
};
use crate::progress::Progress;
use crate::snapshot::{
    ChunkAt, ChunkReader, Contents, ScanStats, ServeError, SnapshotOptions, WantedChunks,
    scan_block, scan_tree,
};
use crate::state::SourceState;
use crate::transport::{MessageRx, MessageTx};

#[derive(Clone, Debug)]
pub struct SenderOptions {
    pub mode: VolumeMode,
    pub snapshot: SnapshotOptions,
    /// Whether chunk payloads are compressed with zstd (see [`super::compression`]).
    pub compress: Compression,
    /// The source's state files. The refreshed quick-check index is saved as soon as every
    /// chunk is sent (while the receiver commits): it describes the source alone, whatever
    /// the receiver's verdict. The manifest is kept once the receiver confirms it, as the
    /// base the next session may send a delta against.
    pub state: SourceState,
    /// Whether this is a dry run ([`super::dry_run`]): nothing is sent, nothing saved.
    pub dry_run: DryRun,
    /// Ask the receiver to patch large files in place (a pushing client's `--inplace`).
    pub inplace: bool,
    /// The source is in use (`--live`): a chunk that changed or vanished since the scan is
    /// reported `Stale` and the session goes on, ending unfinished, instead of failing.
    pub live: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct SenderReport {
    pub root: RootDigest,
    pub scan: ScanStats,
    pub chunks_sent: u64,
    pub bytes_sent_raw: u64,
    pub manifest: ManifestSent,
    /// What the receiver reported with `Done`.
    pub receiver: DoneStats,
    /// A dry run: `chunks_sent`, `bytes_sent_raw` and `receiver` say what the sync would
    /// send and do; nothing was sent or changed.
    pub dry_run: bool,
    /// A live session in which chunks went stale: what the receiver left unfinished.
    pub unfinished: Option<Unfinished>,
}

pub fn header(mode: VolumeMode, chunker: ChunkerParams) -> Header {
    Header {
        version: MANIFEST_VERSION,
        mode,
        chunker,
    }
}

/// Runs a whole session as the sender of `src`. Its quick-check index is read and refreshed.
/// Whether `path`'s inode changed (its ctime) after `since_ns`, or it is gone.
fn changed_since(path: &Path, since_ns: i128) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).map_or(true, |m| {
        // The kernel stamps ctime from a coarse clock, a tick behind `since_ns`'s. Any
        // margin is safe: an index record vouches only for an unchanged ctime, so the index
        // that lied holds one from before its own, earlier sync.
        i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec())
            > since_ns - crate::index::RACY_MARGIN_COARSE_NS
    })
}

/// Removes an index that named wrong chunks for a file that looked unchanged.
fn drop_index(index: &Path) {
    if std::fs::remove_file(index).is_ok() {
        tracing::info!(path = %index.display(), "dropped the source index after a mismatch");
    }
}

pub fn run_sender(
    src: &Path,
    opts: SenderOptions,
    scan_start_ns: i128,
    tx: &mut dyn MessageTx,
    rx: &mut dyn MessageRx,
    progress: &dyn Progress,
) -> Result<SenderReport, SessionError> {
    let index = opts.state.index.clone();
    let result = session(src, opts, scan_start_ns, tx, rx, progress);
    if let Err(SessionError::Serve(ServeError::Changed { path, .. })) = &result {
        // A chunk read back does not match what the scan recorded: the file changed since (a
        // running application wrote it), or the index named wrong chunks for a file that
        // looked unchanged (its stat restored by a tool, say). A change since the scan moved
        // the file's ctime, which no tool can set back, and its stale record will not vouch
        // for it; otherwise the index lied, and the next run reads every file again.
        if !changed_since(path, scan_start_ns) {
            drop_index(&index);
        }
    }
    if let Err(e) = &result
        && !matches!(e, SessionError::Peer(_) | SessionError::Transport(_))
    {
        let _ = tx.send(Message::Error {
            message: e.to_string(),
        });
    }
    result
}

fn session(
    src: &Path,
    opts: SenderOptions,
    scan_start_ns: i128,
    tx: &mut dyn MessageTx,
    rx: &mut dyn MessageRx,
    progress: &dyn Progress,
) -> Result<SenderReport, SessionError> {
    let chunker = opts.snapshot.chunker;
    let header = header(opts.mode, chunker);
    let shelf = Shelf::new(opts.state.manifests.clone());
    let mut kept = shelf.open_all(&header);
    kept.truncate(MAX_BASES);
    let offered: Vec<RootDigest> = kept.iter().map(StoredManifest::root).collect();
    tx.send(Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        mode: opts.mode,
        chunker,
        compress: opts.compress != Compression::Never,
        stream: false,
        bases: offered.clone(),
        dry_run: opts.dry_run == DryRun::Ask,
        inplace: opts.inplace,
        live: opts.live,
    }))?;
    let mut phase = SenderPhase::Hello;
    let (stream, agreed, dry_run, live) = match next(&mut phase, rx)? {
        Message::Hello(h) if h.version != PROTOCOL_VERSION => {
            return Err(SessionError::Version {
                ours: PROTOCOL_VERSION,
                theirs: h.version,
            });
        }
        Message::Hello(h) if h.stream && opts.mode == VolumeMode::Block => {
            return Err(SessionError::Protocol(
                "the receiver asked for a streamed block session".into(),
            ));
        }
        Message::Hello(h)
            if h.bases.len() > 1
                || (!h.bases.is_empty() && h.stream)
                || h.bases.iter().any(|b| !offered.contains(b)) =>
        {
            return Err(SessionError::Protocol(
                "the receiver asked for a delta against a manifest that was not offered".into(),
            ));
        }
        Message::Hello(h) if opts.dry_run == DryRun::Ask && !h.dry_run => {
            return Err(SessionError::Protocol(
                "the receiver did not agree to a dry run".into(),
            ));
        }
        Message::Hello(h) => {
            let dry_run = opts.dry_run.agree(h.dry_run);
            (
                h.stream,
                h.bases.first().copied(),
                dry_run.map_err(SessionError::Protocol)?,
                opts.live && h.live,
            )
        }
        _ => unreachable!("the phase machine admits only hello first"),
    };
    let mut manifest = Manifest {
        digest: DigestBuilder::new(&header),
        differ: match kept.into_iter().find(|m| Some(m.root()) == agreed) {
            Some(base) => Some(Differ::new(
                base.entries(Limits::default()).map_err(DeltaError::Base)?,
            )),
            None => None,
        },
        removed: Vec::new(),
        // A dry run keeps nothing and is asked for no chunks.
        store: match dry_run {
            true => None,
            false => Some(shelf.writer(&header).map_err(ServeError::Spool)?),
        },
        sent: 0,
    };
    let mut reuse = IndexReader::open(&opts.state.index, chunker);
    if reuse
        .as_ref()
        .is_some_and(IndexReader::written_before_this_boot)
    {
        tracing::info!("source index written before this boot: every file is read once");
    }
    // A dry run leaves the source's state as it found it.
    let mut record = match dry_run {
        true => None,
        false => IndexWriter::create(&opts.state.index, chunker, scan_start_ns)
            .map_err(|e| tracing::warn!("cannot refresh the source index: {e}"))
            .ok(),
    };
    let mut reader = ChunkReader::new(src);

    let started = std::time::Instant::now();
    let mut out = Outgoing {
        policy: if stream {
            CompressPolicy::for_first_copy(opts.compress)
        } else {
            CompressPolicy::new(opts.compress)
        },
        chunks: 0,
        bytes: 0,
        live,
        stale: 0,
        index_lied: false,
        scan_start_ns,
    };
    progress.restart(if stream { "sending" } else { "scanning" }, 0);
    // A transport failure inside the scan's callback, kept as it was (the scan only carries
    // text) so it is reported as a broken connection.
    let mut failed: Option<SessionError> = None;
    let scan = match opts.mode {
        VolumeMode::Tree => {
            // Streamed sessions send each chunk after the entry it first appears in.
            let mut seen = SentChunks::default();
            let snapshot = SnapshotOptions {
                keep_contents: stream,
                ..opts.snapshot
            };
            let scanned = scan_tree(
                src,
                snapshot,
                reuse.as_mut(),
                record.as_mut(),
                &mut |entry, contents| {
                    progress.advance(entry.size());
                    let path = entry.path.clone();
                    let segments = match (&entry.kind, stream) {
                        (crate::manifest::EntryKind::File { segments, .. }, true) => {
                            segments.clone()
                        }
                        _ => Vec::new(),
                    };
                    manifest
                        .send(entry, tx)
                        .and_then(|()| {
                            let file = FileChunks {
                                path,
                                segments: &segments,
                                contents,
                            };
                            send_new_chunks(&mut seen, &mut reader, file, &mut out, tx)
                        })
                        .map_err(|e| {
                            let shown = e.to_string();
                            failed = Some(e);
                            shown
                        })
                },
            );
            match (scanned, failed.take()) {
                (Err(_), Some(e)) => return Err(e),
                (scanned, _) => scanned?,
            }
        }
        VolumeMode::Block => {
            let (entry, stats) = scan_block(src, opts.snapshot, reuse.as_mut(), record.as_mut())?;
            progress.advance(entry.size());
            manifest.send(entry, tx)?;
            stats
        }
    };
    drop(reuse);
    let (root, entries, sent, store) = manifest.finish(tx)?;
    tracing::debug!(ms = started.elapsed().as_millis(), entries, "manifest sent");
    let Some(mut store) = store else {
        let outcome = receive_changes(&mut phase, rx, progress)?;
        return Ok(SenderReport {
            root,
            scan,
            chunks_sent: outcome.chunks_wanted,
            bytes_sent_raw: outcome.bytes_wanted,
            manifest: sent,
            receiver: outcome.stats,
            dry_run: true,
            unfinished: None,
        });
    };
    if !stream {
        let mut wanted = WantedChunks::new(
            store
                .read_back(Limits::default())
                .map_err(ServeError::Spool)?,
        );
        let mut serve = Serve {
            wanted: &mut wanted,
            reader: &mut reader,
            out: &mut out,
            max_hints: scan.chunks_total,
        };
        serve.run(&mut phase, tx, rx, progress)?;
    }
    let report = SenderReport {
        root,
        scan,
        chunks_sent: out.chunks,
        bytes_sent_raw: out.bytes,
        manifest: sent,
        receiver: DoneStats::default(),
        dry_run: false,
        unfinished: None,
    };
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        chunks = report.chunks_sent,
        "chunks sent"
    );
    tx.send(Message::ChunksEnd {
        bytes_read: report.scan.bytes_read,
    })?;
    if out.index_lied {
        // See `run_sender`: a chunk of a file that did not change since the scan was wrong.
        drop(record);
        drop_index(&opts.state.index);
    } else if let Some(Err(e)) = record.map(IndexWriter::finish) {
        let path = opts.state.index.display();
        tracing::warn!(path = %path, "cannot save the source index: {e}");
    }
    let done = next(&mut phase, rx)?;
    tracing::debug!(ms = started.elapsed().as_millis(), "receiver done");
    match done {
        Message::Done { root: got, stats } if got == root => {
            if let Err(e) = shelf.publish(store, root) {
                tracing::warn!("cannot keep this manifest for the next delta: {e}");
            }
            Ok(SenderReport {
                receiver: stats,
                ..report
            })
        }
        Message::Done { root: got, .. } => Err(SessionError::DigestMismatch { got, want: root }),
        Message::Unfinished(u) if out.stale > 0 => {
            tracing::info!(
                files = u.files,
                chunks = u.chunks,
                "the receiver kept its partial files: chunks changed while they were sent"
            );
            Ok(SenderReport {
                unfinished: Some(u),
                ..report
            })
        }
        Message::Unfinished(_) => Err(SessionError::Protocol(
            "the receiver reported the sync unfinished, yet no chunk went stale".into(),
        )),
        other => Err(SessionError::Protocol(format!(
            "unexpected {}",
            other.name()
        ))),
    }
}

/// The manifest on its way to the receiver: digested, kept for the next delta, and sent in
/// full or, against an agreed base, as changed entries, patches and removed paths.
struct Manifest {
    digest: DigestBuilder,
    differ: Option<Differ<StoredEntries>>,
    removed: Vec<RelPath>,
    /// The manifest as sent, kept on disk: the next delta's base once the receiver confirms
    /// it, and where this session finds the chunks the receiver asks for. None in a dry run.
    store: Option<StoreWriter>,
    /// Entries, patches and removals sent.
    sent: u64,
}

impl Manifest {
    fn send(&mut self, entry: Entry, tx: &mut dyn MessageTx) -> Result<(), SessionError> {
        let encoded = encode_entry(&entry);
        self.digest
            .add_encoded(&entry, &encoded)
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        if let Some(store) = &mut self.store {
            store.add(&encoded).map_err(ServeError::Spool)?;
        }
        let sending = match &mut self.differ {
            Some(d) => d
                .entry(&entry, &mut self.removed)
                .map_err(DeltaError::Base)?,
            None => Sending::Entry,
        };
        self.send_removed(tx)?;
        let msg = match sending {
            Sending::Nothing => return Ok(()),
            Sending::Entry => Message::Entry(entry),
            Sending::Patch(ops) => Message::Patch(FilePatch {
                size: entry.size(),
                path: entry.path,
                meta: entry.meta,
                ops,
            }),
        };
        self.sent += 1;
        tx.send(msg)?;
        Ok(())
    }

    fn send_removed(&mut self, tx: &mut dyn MessageTx) -> Result<(), SessionError> {
        for path in self.removed.drain(..) {
            self.sent += 1;
            tx.send(Message::Removed(path))?;
        }
        Ok(())
    }

    /// Sends what is left of a delta and `ManifestEnd`; the root, the entry count and the
    /// manifest's copy, to keep once the receiver confirms the root.
    fn finish(
        mut self,
        tx: &mut dyn MessageTx,
    ) -> Result<(RootDigest, u64, ManifestSent, Option<StoreWriter>), SessionError> {
        let delta = self.differ.is_some();
        if let Some(d) = self.differ.take() {
            d.finish(&mut self.removed).map_err(DeltaError::Base)?;
            self.send_removed(tx)?;
            tracing::debug!(
                sent = self.sent,
                entries = self.digest.entries(),
                "manifest sent as a delta"
            );
        }
        let (root, entries) = (self.digest.finish(), self.digest.entries());
        tx.send(Message::ManifestEnd { entries, root })?;
        let sent = ManifestSent {
            delta,
            sent: self.sent,
        };
        Ok((root, entries, sent, self.store))
    }
}

/// Chunks on their way to the receiver: compressed or not as the policy says, counted.
struct Outgoing {
    policy: CompressPolicy,
    chunks: u64,
    bytes: u64,
    /// A live session: a chunk no longer in the source goes as `Stale`.
    live: bool,
    /// `Stale` messages sent.
    stale: u64,
    /// A chunk of a file whose ctime did not move since the scan was wrong.
    index_lied: bool,
    scan_start_ns: i128,
}

impl Outgoing {
    /// Sends the chunk `read` gave, or in a live session, `Stale` if the source no longer
    /// holds it (changed or removed since the scan); `send` sends a chunk read intact.
    fn send_read(
        &mut self,
        tx: &mut dyn MessageTx,
        id: ChunkId,
        read: Result<Vec<u8>, ServeError>,
        send: impl FnOnce(&mut Self, &mut dyn MessageTx, Vec<u8>) -> Result<(), SessionError>,
    ) -> Result<(), SessionError> {
        let gone = match &read {
            Err(ServeError::Changed { .. }) => true,
            Err(ServeError::Read { source, .. }) => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        };
        match read {
            Err(e) if gone && self.live => {
                // Outside a live session `run_sender` makes this check on the error.
                if let ServeError::Changed { path, .. } = &e {
                    self.index_lied |= !changed_since(path, self.scan_start_ns);
                }
                tracing::debug!(chunk = %id, "stale: {e}");
                self.stale += 1;
                tx.send(Message::Stale(id))?;
                Ok(())
            }
            Err(e) => Err(e.into()),
            Ok(data) => send(self, tx, data),
        }
    }

    fn send(
        &mut self,
        tx: &mut dyn MessageTx,
        id: ChunkId,
        data: Vec<u8>,
    ) -> Result<(), SessionError> {
        let len = data.len() as u64;
        let chunk = ChunkData::encode_owned(id, data, self.policy.level());
        self.send_counted(tx, Message::Chunk(chunk), len)
    }

    /// Sends `data` as what follows its first `base_len` bytes, the chunk `base`, which the
    /// receiver holds; only the tail counts as sent.
    fn send_suffix(
        &mut self,
        tx: &mut dyn MessageTx,
        id: ChunkId,
        base: ChunkId,
        base_len: usize,
        data: &[u8],
    ) -> Result<(), SessionError> {
        let len = (data.len() - base_len) as u64;
        let suffix = SuffixData::encode(id, base, base_len, data, self.policy.level());
        self.send_counted(tx, Message::Suffix(suffix), len)
    }

    /// Sends one chunk's message carrying `len` bytes of chunk data, and counts them.
    fn send_counted(
        &mut self,
        tx: &mut dyn MessageTx,
        msg: Message,
        len: u64,
    ) -> Result<(), SessionError> {
        self.chunks += 1;
        self.bytes += len;
        let before = std::time::Instant::now();
        tx.send(msg)?;
        let now = std::time::Instant::now();
        self.policy.sent(len, now - before, now);
        Ok(())
    }
}

/// True if the first `len` bytes of `data` (and not all of it) are the chunk `base`.
fn starts_with(data: &[u8], base: ChunkId, len: usize) -> bool {
    len < data.len() && ChunkId::of(&data[..len]) == base
}

/// The chunks a streamed session has sent that the receiver can still copy: the window both
/// ends keep by one rule (see [`ChunkWindow`]), at most 4 MiB however large the volume.
#[derive(Default)]
struct SentChunks(ChunkWindow<()>);

impl SentChunks {
    /// True if `id` must be sent: not sent yet, or its slot taken since.
    fn first(&mut self, id: &ChunkId) -> bool {
        self.0.first(id)
    }
}

/// A file just announced in a streamed session: its path and segments, and its chunks when
/// the scan kept them.
struct FileChunks<'a, 'b> {
    path: RelPath,
    segments: &'a [Segment],
    contents: Option<Contents<'b>>,
}

/// Streamed sessions: sends the chunks of `file` that the receiver cannot copy from an
/// earlier file or segment (see [`SentChunks`]), in order: the scan's own bytes when it kept
/// them, else read back from the source and checked against their names.
fn send_new_chunks(
    seen: &mut SentChunks,
    reader: &mut ChunkReader,
    file: FileChunks<'_, '_>,
    out: &mut Outgoing,
    tx: &mut dyn MessageTx,
) -> Result<(), SessionError> {
    let mut kept = file.contents.map(|c| c.chunks.into_iter());
    let mut at = ChunkAt {
        id: ChunkId([0; 32]),
        path: file.path,
        offset: 0,
        len: 0,
    };
    for seg in file.segments {
        if let Segment::Chunk { id, len } = *seg {
            let cut = kept.as_mut().and_then(Iterator::next);
            if seen.first(&id) {
                let read = match cut {
                    Some(data) => Ok(data),
                    None => {
                        (at.id, at.len) = (id, len);
                        reader.read(&at)
                    }
                };
                out.send_read(tx, id, read, |out, tx, data| out.send(tx, id, data))?;
            }
        }
        at.offset += seg.len();
    }
    Ok(())
}

/// The next message from the receiver, checked against the session's order.
/// A dry run's answer to the manifest: each change is shown as it comes.
fn receive_changes(
    phase: &mut SenderPhase,
    rx: &mut dyn MessageRx,
    progress: &dyn Progress,
) -> Result<Outcome, SessionError> {
    loop {
        match next(phase, rx)? {
            Message::Changes(changes) => changes.iter().for_each(|c| progress.change(c)),
            Message::DryRunEnd(outcome) => return Ok(outcome),
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {} in a dry run",
                    other.name()
                )));
            }
        }
    }
}

fn next(phase: &mut SenderPhase, rx: &mut dyn MessageRx) -> Result<Message, SessionError> {
    let msg = rx.recv()?;
    *phase = phase.accept(&msg).map_err(SessionError::Protocol)?;
    if let Message::Error { message } = msg {
        return Err(SessionError::Peer(message));
    }
    Ok(msg)
}

/// Serving the receiver's wants: each is found in the kept manifest, read back and sent.
struct Serve<'a> {
    wanted: &'a mut WantedChunks<std::fs::File>,
    reader: &'a mut ChunkReader,
    out: &'a mut Outgoing,
    /// Hints kept at most (the snapshot's chunk count): a peer cannot grow them without bound.
    max_hints: u64,
}

impl Serve<'_> {
    /// Sends the chunks the receiver asks for, want by want, until its `WantEnd`.
    fn run(
        &mut self,
        phase: &mut SenderPhase,
        tx: &mut dyn MessageTx,
        rx: &mut dyn MessageRx,
        progress: &dyn Progress,
    ) -> Result<(), SessionError> {
        progress.restart("sending", 0);
        let mut wanted = 0;
        let mut hints: HashMap<ChunkId, (ChunkId, usize)> = HashMap::new();
        loop {
            match next(phase, rx)? {
                Message::WantHints(list) => {
                    if (hints.len() + list.len()) as u64 > self.max_hints {
                        return Err(SessionError::Protocol(
                            "more append hints than the snapshot has chunks".into(),
                        ));
                    }
                    hints.extend(list.iter().map(|h| (h.id, (h.base, h.base_len as usize))));
                }
                Message::Want(ids) => {
                    // Found first, so the progress total grows by the batch before it is sent.
                    let found = ids
                        .iter()
                        .map(|id| self.wanted.locate(id))
                        .collect::<Result<Vec<_>, _>>()?;
                    wanted += found.iter().map(|at| u64::from(at.len)).sum::<u64>();
                    progress.set_total(wanted);
                    for at in &found {
                        let read = self.reader.read(at);
                        let hint = hints.remove(&at.id);
                        self.out
                            .send_read(tx, at.id, read, |out, tx, data| match hint {
                                Some((base, base_len)) if starts_with(&data, base, base_len) => {
                                    out.send_suffix(tx, at.id, base, base_len, &data)
                                }
                                _ => out.send(tx, at.id, data),
                            })?;
                        progress.advance(u64::from(at.len));
                    }
                    // The receiver may be waiting for the last of these.
                    tx.flush()?;
                }
                Message::WantEnd => return Ok(()),
                other => {
                    return Err(SessionError::Protocol(format!(
                        "unexpected {}",
                        other.name()
                    )));
                }
            }
        }
    }
}
