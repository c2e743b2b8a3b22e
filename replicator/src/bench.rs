//! `replicator bench`: what a link can carry, and what this host's CPU can feed it.
//!
//! `bench HOST:PORT` streams generated chunks through the real protocol (TLS, lanes, framing,
//! the server's hash check) to a serving peer that keeps nothing, and reports throughput, RTT
//! and the CPU time of both ends. `bench --local PATH` runs the sender's pipeline on the
//! user's own data: chunking and hashing on every core, then zstd on one.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::chunk::Segment;
use crate::chunk::{ChunkId, ChunkerParams};
use crate::digest::digest_volume;
use crate::manifest::{Entry, VolumeMode};
use crate::net::client::{ClientOptions, open_session};
use crate::net::open::Direction;
use crate::protocol::compression::FAST;
use crate::protocol::message::{ChunkData, Message};
use crate::snapshot::{
    ChunkAt, ChunkReader, SnapshotError, SnapshotOptions, scan_block, scan_tree,
};
use crate::sync::{SyncError, SyncOptions};
use crate::transport::{MessageRx, MessageTx};
use crate::volume;

/// CPU time (user + system) this process has used, in seconds, from `/proc/self/stat`.
pub fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name. USER_HZ
    // is 100 on Linux.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

#[derive(Clone, Debug, Serialize)]
pub struct LinkReport {
    pub peer: String,
    pub lanes: u8,
    pub seconds: f64,
    pub bytes: u64,
    pub bytes_on_wire: u64,
    pub megabytes_per_second: f64,
    pub rtt_ms: f64,
    pub client_cpu_seconds: f64,
    pub server_cpu_seconds: f64,
    pub compressed: bool,
    /// The largest UDP payload the path carried by the end (path MTU discovery).
    pub path_mtu: u16,
    /// QUIC packets the client declared lost.
    pub lost_packets: u64,
}

/// Streams generated chunks to `address` for `duration`.
pub fn link(
    address: &str,
    client: &ClientOptions,
    duration: Duration,
    compress: bool,
) -> Result<LinkReport, SyncError> {
    // A pool of distinct chunks: random data, or text-like data when testing compression.
    let pool: Vec<Message> = (0..64u64)
        .map(|i| {
            let data = if compress {
                crate::demo::seeded_text(i, 64 << 10)
            } else {
                crate::demo::seeded_bytes(i, 64 << 10)
            };
            Message::Chunk(ChunkData::encode(
                ChunkId::of(&data),
                &data,
                compress.then_some(FAST),
            ))
        })
        .collect();
    let opts = SyncOptions {
        compress: if compress {
            crate::protocol::compression::Compression::Always
        } else {
            crate::protocol::compression::Compression::Never
        },
        ..SyncOptions::default()
    };
    let mut session = open_session(address, Direction::Bench, "", &opts, client)?;
    let cpu_start = process_cpu_seconds();
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut i = 0;
    let sent = (|| {
        while started.elapsed() < duration {
            let msg = pool[i % pool.len()].clone();
            i += 1;
            bytes += 64 << 10;
            session.tx.send(msg)?;
        }
        session.tx.send(Message::ChunksEnd { bytes_read: 0 })
    })();
    let outcome = sent
        .map_err(|e| e.to_string())
        .and_then(|()| session.rx.recv().map_err(|e| e.to_string()));
    let seconds = started.elapsed().as_secs_f64();
    let client_cpu = process_cpu_seconds() - cpu_start;
    let rtt = session.conn.rtt();
    let path = session.conn.stats().path;
    let wire = session.tx.wire_bytes();
    let result = match outcome {
        Ok(Message::BenchResult {
            bytes: got,
            cpu_micros,
        }) if got == bytes => Ok(LinkReport {
            peer: address.to_string(),
            lanes: client.lanes,
            seconds,
            bytes,
            bytes_on_wire: wire,
            megabytes_per_second: bytes as f64 / seconds / 1e6,
            rtt_ms: rtt.as_secs_f64() * 1e3,
            client_cpu_seconds: client_cpu,
            server_cpu_seconds: cpu_micros as f64 / 1e6,
            compressed: compress,
            path_mtu: path.current_mtu,
            lost_packets: path.lost_packets,
        }),
        Ok(Message::BenchResult { bytes: got, .. }) => Err(SyncError::Connection(format!(
            "the server verified {got} bytes of the {bytes} sent"
        ))),
        Ok(Message::Error { message }) => Err(SyncError::Connection(message)),
        Ok(other) => Err(SyncError::Connection(format!(
            "unexpected {} from the server",
            other.name()
        ))),
        Err(e) => Err(SyncError::Connection(e)),
    };
    session.finish(false, result.is_ok());
    result
}

#[derive(Clone, Debug, Serialize)]
pub struct LocalReport {
    pub path: String,
    pub threads: usize,
    pub bytes: u64,
    pub chunks: u64,
    /// Reading, chunking and hashing on `threads` threads.
    pub scan_megabytes_per_second: f64,
    /// zstd (the wire setting) on one thread, over up to `compress_sample_bytes`.
    pub compress_megabytes_per_second: f64,
    pub compress_sample_bytes: u64,
    /// Compressed size / raw size over the sample.
    pub compress_ratio: f64,
}

/// At most this much data goes through the compression pass.
const COMPRESS_SAMPLE: u64 = 256 << 20;

/// Measures the sender's pipeline on the volume at `path`.
pub fn local(
    path: &Path,
    chunker: ChunkerParams,
    threads: usize,
) -> Result<LocalReport, SnapshotError> {
    let started = Instant::now();
    let (_, stats) = digest_volume(path, chunker, threads)?;
    let scan_secs = started.elapsed().as_secs_f64();
    // Second pass for compression: the chunks, read back through the source map.
    let mode = volume::detect_mode(path).map_err(|source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let opts = SnapshotOptions {
        chunker,
        checksum: true,
        threads,
        keep_contents: false,
    };
    // The first chunks of the volume, up to the sample size, and where they are.
    let mut sample: Vec<ChunkAt> = Vec::new();
    let mut sampled = 0u64;
    let mut take = |e: &Entry| {
        for (offset, seg) in crate::apply::plan::offsets(e.segments()) {
            if let Segment::Chunk { id, len } = *seg
                && sampled < COMPRESS_SAMPLE
            {
                sampled += u64::from(len);
                let path = e.path.clone();
                sample.push(ChunkAt {
                    id,
                    path,
                    offset,
                    len,
                });
            }
        }
    };
    match mode {
        VolumeMode::Tree => {
            scan_tree(path, opts, None, None, &mut |e, _| {
                take(&e);
                Ok(())
            })?;
        }
        VolumeMode::Block => take(&scan_block(path, opts, None, None)?.0),
    }
    let mut reader = ChunkReader::new(path);
    let (mut raw, mut packed, mut secs) = (0u64, 0u64, 0f64);
    for at in &sample {
        let Ok(data) = reader.read(at) else { continue };
        let id = at.id;
        let t = Instant::now();
        let c = ChunkData::encode(id, &data, Some(FAST));
        secs += t.elapsed().as_secs_f64();
        raw += data.len() as u64;
        packed += Bytes::len(&c.payload) as u64;
    }
    Ok(LocalReport {
        path: path.display().to_string(),
        threads,
        bytes: stats.bytes_total,
        chunks: stats.chunks_total,
        scan_megabytes_per_second: stats.bytes_total as f64 / scan_secs.max(1e-9) / 1e6,
        compress_megabytes_per_second: raw as f64 / secs.max(1e-9) / 1e6,
        compress_sample_bytes: raw,
        compress_ratio: if raw == 0 {
            1.0
        } else {
            packed as f64 / raw as f64
        },
    })
}
