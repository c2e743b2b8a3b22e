//! Micro-benchmarks of the engine's per-byte stages, each alone: content-defined chunking
//! with BLAKE3 naming, zstd (levels 1 and 3) on a chunk, and decoding + verifying a received
//! chunk frame.
//! `cargo bench -p benches --bench engine` (criterion; the data is seeded).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use replicator::chunk::{ChunkId, Chunker, ChunkerParams};
use replicator::manifest::Limits;
use replicator::protocol::compression::{FAST, STRONG};
use replicator::protocol::message::{ChunkData, Message};

const LEN: usize = 16 << 20;

/// Half text-like, half random: chunk boundaries and compression both have work to do.
fn data() -> Vec<u8> {
    let mut v = replicator::demo::seeded_text(1, LEN / 2);
    v.extend(replicator::demo::seeded_bytes(2, LEN / 2));
    v
}

fn chunk_and_hash(c: &mut Criterion) {
    let data = data();
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(10);
    g.bench_function("fastcdc+blake3", |b| {
        let mut chunker = Chunker::new(ChunkerParams::default());
        b.iter(|| {
            let (segments, total) = chunker
                .segments(&data[..], |_, _, _| Ok(()))
                .expect("in-memory read");
            black_box((segments.len(), total))
        })
    });
    g.bench_function("blake3 only", |b| b.iter(|| black_box(ChunkId::of(&data))));
    g.finish();
}

fn compress(c: &mut Criterion) {
    let text = replicator::demo::seeded_text(3, 64 << 10);
    let random = replicator::demo::seeded_bytes(4, 64 << 10);
    let mut g = c.benchmark_group("zstd per 64 KiB chunk");
    g.throughput(Throughput::Bytes(64 << 10));
    for (name, chunk) in [("text", &text), ("random", &random)] {
        let id = ChunkId::of(chunk);
        for level in [FAST, STRONG] {
            g.bench_function(format!("{name}, level {level}"), |b| {
                b.iter(|| black_box(ChunkData::encode(id, chunk, Some(level))))
            });
        }
    }
    g.finish();
}

fn decode_and_verify(c: &mut Criterion) {
    let chunk = replicator::demo::seeded_text(5, 64 << 10);
    let id = ChunkId::of(&chunk);
    let mut g = c.benchmark_group("receive a 64 KiB chunk frame");
    g.throughput(Throughput::Bytes(64 << 10));
    for (name, level) in [("raw", None), ("zstd", Some(FAST))] {
        let frame = Message::Chunk(ChunkData::encode(id, &chunk, level)).encode_frame();
        let body = Bytes::from(frame[4..].to_vec());
        let limits = Limits::default();
        g.bench_function(name, |b| {
            b.iter(|| {
                let Ok(Message::Chunk(c)) = Message::decode_frame(&body, &limits) else {
                    panic!("a chunk frame");
                };
                black_box(c.decode_verified().expect("verifies"))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, chunk_and_hash, compress, decode_and_verify);
criterion_main!(benches);
