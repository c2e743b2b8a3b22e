//! Driving the sending side of a session over a transport.

use std::path::Path;

use super::SessionError;
use super::compression::{CompressPolicy, Compression};
use super::message::{ChunkData, DoneStats, Hello, Message, PROTOCOL_VERSION};
use super::phase::SenderPhase;
use crate::chunk::ChunkerParams;
use crate::index::FileIndex;
use crate::manifest::{
    DigestBuilder, Header, MANIFEST_VERSION, RootDigest, VolumeMode, encode_entry,
};
use crate::progress::Progress;
use crate::snapshot::{ScanStats, SnapshotOptions, scan_block, scan_tree};
use crate::transport::{MessageRx, MessageTx};

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
    }))?;
    let mut phase = SenderPhase::Hello;
    let next = |phase: &mut SenderPhase, rx: &mut dyn MessageRx| -> Result<Message, SessionError> {
        let msg = rx.recv()?;
        *phase = phase.accept(&msg).map_err(SessionError::Protocol)?;
        if let Message::Error { message } = msg {
            return Err(SessionError::Peer(message));
        }
        Ok(msg)
    };
    match next(&mut phase, rx)? {
        Message::Hello(h) if h.version != PROTOCOL_VERSION => {
            return Err(SessionError::Version {
                ours: PROTOCOL_VERSION,
                theirs: h.version,
            });
        }
        _ => {}
    }

    let started = std::time::Instant::now();
    let mut digest = DigestBuilder::new(&header(opts.mode, chunker));
    progress.restart("scanning", 0);
    let (mut map, scan) = match opts.mode {
        VolumeMode::Tree => scan_tree(src, opts.snapshot, index, scan_start_ns, &mut |entry| {
            progress.advance(entry.size());
            let encoded = encode_entry(&entry);
            digest
                .add_encoded(&entry, &encoded)
                .map_err(|e| e.to_string())?;
            tx.send(Message::Entry(entry)).map_err(|e| e.to_string())
        })?,
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
        chunks_sent: 0,
        bytes_sent_raw: 0,
        receiver: DoneStats::default(),
    };
    let mut policy = CompressPolicy::new(opts.compress);
    let mut wanted = 0;
    progress.restart("sending", 0);
    loop {
        match next(&mut phase, rx)? {
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
            Message::WantEnd => break,
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {}",
                    other.name()
                )));
            }
        }
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
