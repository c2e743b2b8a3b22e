//! Driving the sending side of a session over a transport.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;

use super::SessionError;
use super::compression::{CompressPolicy, Compression};
use super::message::{ChunkData, DoneStats, Hello, Message, PROTOCOL_VERSION};
use super::phase::SenderPhase;
use crate::chunk::{ChunkId, ChunkerParams, Segment};
use crate::index::FileIndex;
use crate::manifest::{
    DigestBuilder, Header, MANIFEST_VERSION, RootDigest, VolumeMode, encode_entry,
};
use crate::progress::Progress;
use crate::snapshot::{ScanStats, SnapshotOptions, read_chunk, scan_block, scan_tree};
use crate::transport::{MessageRx, MessageTx};
use crate::volume::walk::full_path;

#[derive(Clone, Copy, Debug)]
pub struct SenderOptions {
    pub mode: VolumeMode,
    pub snapshot: SnapshotOptions,
    /// Whether chunk payloads are compressed with zstd (see [`super::compression`]).
    pub compress: Compression,
}

#[derive(Clone, Copy, Debug)]
pub struct SenderReport {
    pub root: RootDigest,
    pub scan: ScanStats,
    pub chunks_sent: u64,
    pub bytes_sent_raw: u64,
    /// What the receiver reported with `Done`.
    pub receiver: DoneStats,
}

pub fn header(mode: VolumeMode, chunker: ChunkerParams) -> Header {
    Header {
        version: MANIFEST_VERSION,
        mode,
        chunker,
    }
}

/// Runs a whole session as the sender of `src`. `index` is read and refreshed.
pub fn run_sender(
    src: &Path,
    opts: SenderOptions,
    index: &mut FileIndex,
    scan_start_ns: i128,
    tx: &mut dyn MessageTx,
    rx: &mut dyn MessageRx,
    progress: &dyn Progress,
) -> Result<SenderReport, SessionError> {
    let result = session(src, opts, index, scan_start_ns, tx, rx, progress);
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
    index: &mut FileIndex,
    scan_start_ns: i128,
    tx: &mut dyn MessageTx,
    rx: &mut dyn MessageRx,
    progress: &dyn Progress,
) -> Result<SenderReport, SessionError> {
    let chunker = opts.snapshot.chunker;
    tx.send(Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        mode: opts.mode,
        chunker,
        compress: opts.compress != Compression::Never,
        stream: false,
    }))?;
    let mut phase = SenderPhase::Hello;
    let stream = match next(&mut phase, rx)? {
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
        Message::Hello(h) => h.stream,
        _ => unreachable!("the phase machine admits only hello first"),
    };

    let started = std::time::Instant::now();
    let mut digest = DigestBuilder::new(&header(opts.mode, chunker));
    let mut policy = CompressPolicy::new(opts.compress);
    let mut streamed = Streamed::default();
    progress.restart(if stream { "sending" } else { "scanning" }, 0);
    // A transport failure inside the scan's callback, kept as it was (the scan only carries
    // text) so it is reported as a broken connection.
    let mut failed: Option<SessionError> = None;
    let (mut map, scan) = match opts.mode {
        VolumeMode::Tree => {
            let scanned = scan_tree(src, opts.snapshot, index, scan_start_ns, &mut |entry| {
                progress.advance(entry.size());
                let encoded = encode_entry(&entry);
                digest
                    .add_encoded(&entry, &encoded)
                    .map_err(|e| e.to_string())?;
                let path = entry.path.clone();
                let segments = match (&entry.kind, stream) {
                    (crate::manifest::EntryKind::File { segments, .. }, true) => segments.clone(),
                    _ => Vec::new(),
                };
                let sent = tx.send(Message::Entry(entry)).map_err(SessionError::from);
                sent.and_then(|()| streamed.send_new_chunks(src, &path, &segments, &mut policy, tx))
                    .map_err(|e| {
                        let shown = e.to_string();
                        failed = Some(e);
                        shown
                    })
            });
            match (scanned, failed.take()) {
                (Err(_), Some(e)) => return Err(e),
                (scanned, _) => scanned?,
            }
        }
        VolumeMode::Block => {
            let (entry, map, stats) = scan_block(src, opts.snapshot, index, scan_start_ns)?;
            progress.advance(entry.size());
            digest
                .add(&entry)
                .map_err(|e| SessionError::Protocol(e.to_string()))?;
            tx.send(Message::Entry(entry))?;
            (map, stats)
        }
    };
    let root = digest.finish();
    tx.send(Message::ManifestEnd {
        entries: digest.entries(),
        root,
    })?;

    tracing::debug!(
        ms = started.elapsed().as_millis(),
        entries = digest.entries(),
        "manifest sent"
    );
    let mut report = SenderReport {
        root,
        scan,
        chunks_sent: streamed.chunks,
        bytes_sent_raw: streamed.bytes,
        receiver: DoneStats::default(),
    };
    if !stream {
        serve_wants(
            &mut map,
            &mut report,
            &mut policy,
            &mut phase,
            tx,
            rx,
            progress,
        )?;
    }
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        chunks = report.chunks_sent,
        "chunks sent"
    );
    tx.send(Message::ChunksEnd {
        bytes_read: report.scan.bytes_read,
    })?;
    let done = next(&mut phase, rx)?;
    tracing::debug!(ms = started.elapsed().as_millis(), "receiver done");
    match done {
        Message::Done { root: got, stats } if got == root => Ok(SenderReport {
            receiver: stats,
            ..report
        }),
        Message::Done { root: got, .. } => Err(SessionError::DigestMismatch { got, want: root }),
        other => Err(SessionError::Protocol(format!(
            "unexpected {}",
            other.name()
        ))),
    }
}

/// The chunks a streamed session has sent so far: each goes out once, right after the entry
/// of the first file that holds it.
#[derive(Default)]
struct Streamed {
    sent: HashSet<ChunkId>,
    chunks: u64,
    bytes: u64,
}

impl Streamed {
    /// Sends the chunks of the file `path` (just announced) that no earlier entry had, read
    /// back from the source and checked against their names.
    fn send_new_chunks(
        &mut self,
        src: &Path,
        path: &crate::manifest::RelPath,
        segments: &[Segment],
        policy: &mut CompressPolicy,
        tx: &mut dyn MessageTx,
    ) -> Result<(), SessionError> {
        let full = full_path(src, path);
        let mut file: Option<File> = None;
        let mut offset = 0;
        for seg in segments {
            let here = offset;
            offset += seg.len();
            let Segment::Chunk { id, len } = *seg else {
                continue;
            };
            if !self.sent.insert(id) {
                continue;
            }
            let f = match &file {
                Some(f) => f,
                None => file.insert(File::open(&full).map_err(|source| {
                    crate::snapshot::ServeError::Read {
                        path: full.clone(),
                        source,
                    }
                })?),
            };
            let data = read_chunk(f, &full, here, len, &id)?;
            self.chunks += 1;
            self.bytes += u64::from(len);
            tx.send(Message::Chunk(ChunkData::encode_owned(
                id,
                data,
                policy.compress(),
            )))?;
            policy.sent(u64::from(len), std::time::Instant::now());
        }
        Ok(())
    }
}

/// The next message from the receiver, checked against the session's order.
fn next(phase: &mut SenderPhase, rx: &mut dyn MessageRx) -> Result<Message, SessionError> {
    let msg = rx.recv()?;
    *phase = phase.accept(&msg).map_err(SessionError::Protocol)?;
    if let Message::Error { message } = msg {
        return Err(SessionError::Peer(message));
    }
    Ok(msg)
}

/// Sends the chunks the receiver asks for, want by want, until its `WantEnd`.
fn serve_wants(
    map: &mut crate::snapshot::SourceMap,
    report: &mut SenderReport,
    policy: &mut CompressPolicy,
    phase: &mut SenderPhase,
    tx: &mut dyn MessageTx,
    rx: &mut dyn MessageRx,
    progress: &dyn Progress,
) -> Result<(), SessionError> {
    progress.restart("sending", 0);
    let mut wanted = 0;
    loop {
        match next(phase, rx)? {
            Message::Want(ids) => {
                wanted += ids.iter().map(|id| map.len_of(id)).sum::<u64>();
                progress.set_total(wanted);
                for id in ids {
                    let data = map.read(&id)?;
                    let len = data.len() as u64;
                    report.chunks_sent += 1;
                    report.bytes_sent_raw += len;
                    let chunk = ChunkData::encode_owned(id, data, policy.compress());
                    tx.send(Message::Chunk(chunk))?;
                    policy.sent(len, std::time::Instant::now());
                    progress.advance(len);
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
