//! Wire messages of a sync session and their framing.
//!
//! A frame is `len:u32 (big endian) | type:u8 | payload`, `len` counting type and payload.
//! Payloads use the [`crate::codec`] primitives; entries use the manifest encoding. Every
//! decoder enforces [`MAX_FRAME`] and per-field limits before allocating. See docs/protocol.md.

use bytes::Bytes;

use super::compression::FAST;
use super::dry_run::{self, Change, Outcome};
use crate::chunk::{ChunkId, ChunkerParams};
use crate::codec::{DecodeError, Reader, Writer};
use crate::manifest::delta::FilePatch;
use crate::manifest::{self, Entry, Limits, RelPath, RootDigest, VolumeMode};

/// Version of the session protocol (also carried in the QUIC ALPN).
pub const PROTOCOL_VERSION: u32 = 7;
/// Largest frame either side accepts (a maximal chunk plus headers fits comfortably).
pub const MAX_FRAME: usize = 17 << 20;
/// Most chunk ids in one `Want` message.
pub const MAX_WANT: usize = 16_384;
/// Longest error text.
pub const MAX_ERROR: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub mode: VolumeMode,
    pub chunker: ChunkerParams,
    /// The sender may compress chunk payloads with zstd.
    pub compress: bool,
    /// Receiver only: the destination is empty, so every chunk will be wanted. The sender
    /// then sends each file's chunks right after its entry (first occurrences only) instead
    /// of waiting for wants, and the receiver writes each file as it arrives.
    pub stream: bool,
    /// Manifests the session can be a delta against (see [`crate::manifest::delta`]). The
    /// sender offers the roots of the last manifests it completed (at most [`MAX_BASES`]); a
    /// receiver holding one of them echoes that one alone, and the sender then sends only
    /// changes against it. Anything else (none, or a root not offered) means a full manifest.
    pub bases: Vec<RootDigest>,
    /// A dry run ([`super::dry_run`]): asked by either side, echoed by the receiver.
    pub dry_run: bool,
    /// Sender: the receiver should patch large files with small changes at their final
    /// name (a pushing client's `--inplace`); receiver: whether it will.
    pub inplace: bool,
    /// Sender: the source is in use (`--live`), so a chunk may change after the scan; it may
    /// then send `Stale` in place of that chunk. Receiver: echoed, it will take `Stale`.
    pub live: bool,
}

/// Most delta bases a hello may offer.
pub const MAX_BASES: usize = 8;

/// Bits of the hello's flags byte.
mod hello_flags {
    pub const COMPRESS: u8 = 1;
    pub const STREAM: u8 = 2;
    /// A count (1 to [`super::MAX_BASES`]) and that many base roots follow the flags.
    pub const BASE: u8 = 4;
    pub const DRY_RUN: u8 = 8;
    pub const INPLACE: u8 = 16;
    pub const LIVE: u8 = 32;
}

/// How a chunk's payload is encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Raw = 0,
    Zstd = 1,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkData {
    pub id: ChunkId,
    pub encoding: Encoding,
    /// Length of the chunk once decoded.
    pub raw_len: u32,
    pub payload: Bytes,
}

/// How the manifest went over the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManifestSent {
    /// Against a base both ends kept ([`crate::manifest::delta`]), or in full.
    pub delta: bool,
    /// `Entry`, `Patch` and `Removed` messages.
    pub sent: u64,
}

/// A wanted chunk that starts with a chunk the receiver holds (an appended file's new chunk
/// at the offset of its old last one): the sender may send only what follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WantHint {
    pub id: ChunkId,
    pub base: ChunkId,
    pub base_len: u32,
}

/// A chunk sent as the bytes that follow a chunk the receiver said it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuffixData {
    pub id: ChunkId,
    pub base: ChunkId,
    pub encoding: Encoding,
    /// Length of the whole chunk once decoded (the base's bytes and the tail).
    pub raw_len: u32,
    /// The tail, raw or zstd.
    pub payload: Bytes,
}

/// What a receiver left unfinished after a live session in which chunks went stale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unfinished {
    /// Files (or the block volume) that miss at least one chunk.
    pub files: u64,
    /// Distinct chunks the sender reported stale.
    pub chunks: u64,
}

/// What the receiver reports with `Done`, so both ends can print the same summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoneStats {
    pub files_written: u64,
    /// Of `files_written`, those patched at their final name (`--inplace`).
    pub files_patched: u64,
    pub deleted: u64,
    pub bytes_copied_locally: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Both sides, first: versions and what is about to be synced.
    Hello(Hello),
    /// Sender: one manifest entry, in volume order (in a delta session: a new or changed one).
    Entry(Entry),
    /// Sender, delta sessions only: this path of the base manifest is gone.
    Removed(RelPath),
    /// Sender, delta sessions only: a changed file, against the base's file at its path.
    Patch(FilePatch),
    /// Sender: the manifest is complete; its digest and entry count.
    ManifestEnd { entries: u64, root: RootDigest },
    /// Receiver: chunks it lacks, in the order it will consume them.
    Want(Vec<ChunkId>),
    /// Receiver: no more wants.
    WantEnd,
    /// Sender: one chunk's data.
    Chunk(ChunkData),
    /// Receiver, before its wants: wanted chunks that start with a chunk it holds.
    WantHints(Vec<WantHint>),
    /// Sender: a hinted chunk, as the bytes after its base (in place of a `Chunk`).
    Suffix(SuffixData),
    /// Sender: every wanted chunk was sent; how many source bytes it had to read.
    ChunksEnd { bytes_read: u64 },
    /// Receiver: the volume is durable and its digest is `root`; what applying it took.
    Done { root: RootDigest, stats: DoneStats },
    /// Sender, live sessions only, in place of a `Chunk` or `Suffix`: the wanted chunk is no
    /// longer in the source (the application changed or removed the file since the scan).
    Stale(ChunkId),
    /// Receiver, in place of `Done`, after one or more `Stale`: nothing was committed; the
    /// files still missing chunks and the rest are kept for the next run to finish.
    Unfinished(Unfinished),
    /// Receiver, dry runs only, in place of wants: what the sync would change.
    Changes(Vec<Change>),
    /// Receiver, dry runs only: the last message; what the sync would move.
    DryRunEnd(Outcome),
    /// Either side: the session failed; the text says why.
    Error { message: String },
    /// Bench sessions only: what the sink verified and the CPU time it spent.
    BenchResult { bytes: u64, cpu_micros: u64 },
}

mod ty {
    pub const HELLO: u8 = 1;
    pub const ENTRY: u8 = 2;
    pub const MANIFEST_END: u8 = 3;
    pub const WANT: u8 = 4;
    pub const WANT_END: u8 = 5;
    pub const CHUNK: u8 = 6;
    pub const CHUNKS_END: u8 = 7;
    pub const DONE: u8 = 8;
    pub const ERROR: u8 = 9;
    pub const BENCH_RESULT: u8 = 10;
    pub const REMOVED: u8 = 11;
    pub const PATCH: u8 = 12;
    pub const WANT_HINTS: u8 = 13;
    pub const SUFFIX: u8 = 14;
    pub const CHANGES: u8 = 15;
    pub const DRY_RUN_END: u8 = 16;
    pub const STALE: u8 = 17;
    pub const UNFINISHED: u8 = 18;
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Entry(_) => "entry",
            Message::Removed(_) => "removed",
            Message::Patch(_) => "patch",
            Message::WantHints(_) => "want-hints",
            Message::Suffix(_) => "suffix",
            Message::ManifestEnd { .. } => "manifest-end",
            Message::Want(_) => "want",
            Message::WantEnd => "want-end",
            Message::Chunk(_) => "chunk",
            Message::ChunksEnd { .. } => "chunks-end",
            Message::Done { .. } => "done",
            Message::Stale(_) => "stale",
            Message::Unfinished(_) => "unfinished",
            Message::Changes(_) => "changes",
            Message::DryRunEnd(_) => "dry-run-end",
            Message::BenchResult { .. } => "bench-result",
            Message::Error { .. } => "error",
        }
    }

    /// Bytes this message occupies on the wire (frame header included).
    pub fn wire_len(&self) -> usize {
        match self {
            // Avoid copying chunk payloads just to measure them.
            Message::Chunk(c) => 4 + 1 + 32 + 1 + 5 + 5 + c.payload.len(),
            other => 4 + other.encode_body().len(),
        }
    }

    /// Type byte and payload (without the length prefix).
    pub fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Message::Hello(h) => {
                w.u8(ty::HELLO);
                w.varint(u64::from(h.version));
                manifest::encode_mode(&mut w, h.mode);
                h.chunker.encode(&mut w);
                let mut flags = 0;
                if h.compress {
                    flags |= hello_flags::COMPRESS;
                }
                if h.stream {
                    flags |= hello_flags::STREAM;
                }
                if !h.bases.is_empty() {
                    flags |= hello_flags::BASE;
                }
                if h.dry_run {
                    flags |= hello_flags::DRY_RUN;
                }
                if h.inplace {
                    flags |= hello_flags::INPLACE;
                }
                if h.live {
                    flags |= hello_flags::LIVE;
                }
                w.u8(flags);
                if !h.bases.is_empty() {
                    w.varint(h.bases.len() as u64);
                    for base in &h.bases {
                        w.hash(&base.0);
                    }
                }
            }
            Message::Entry(e) => {
                w.u8(ty::ENTRY);
                w.raw(&manifest::encode_entry(e));
            }
            Message::Removed(path) => {
                w.u8(ty::REMOVED);
                w.bytes(path.as_bytes());
            }
            Message::Patch(p) => {
                w.u8(ty::PATCH);
                w.raw(&manifest::encode_patch(p));
            }
            Message::WantHints(hints) => {
                w.u8(ty::WANT_HINTS);
                w.varint(hints.len() as u64);
                for h in hints {
                    w.hash(&h.id.0);
                    w.hash(&h.base.0);
                    w.varint(u64::from(h.base_len));
                }
            }
            Message::Suffix(c) => {
                w.u8(ty::SUFFIX);
                w.hash(&c.id.0);
                w.hash(&c.base.0);
                w.u8(c.encoding as u8);
                w.varint(u64::from(c.raw_len));
                w.bytes(&c.payload);
            }
            Message::ManifestEnd { entries, root } => {
                w.u8(ty::MANIFEST_END);
                w.varint(*entries);
                w.hash(&root.0);
            }
            Message::Want(ids) => {
                w.u8(ty::WANT);
                w.varint(ids.len() as u64);
                for id in ids {
                    w.hash(&id.0);
                }
            }
            Message::WantEnd => w.u8(ty::WANT_END),
            Message::Chunk(c) => {
                w.u8(ty::CHUNK);
                w.hash(&c.id.0);
                w.u8(c.encoding as u8);
                w.varint(u64::from(c.raw_len));
                w.bytes(&c.payload);
            }
            Message::ChunksEnd { bytes_read } => {
                w.u8(ty::CHUNKS_END);
                w.varint(*bytes_read);
            }
            Message::Done { root, stats } => {
                w.u8(ty::DONE);
                w.hash(&root.0);
                w.varint(stats.files_written);
                w.varint(stats.files_patched);
                w.varint(stats.deleted);
                w.varint(stats.bytes_copied_locally);
            }
            Message::Stale(id) => {
                w.u8(ty::STALE);
                w.hash(&id.0);
            }
            Message::Unfinished(u) => {
                w.u8(ty::UNFINISHED);
                w.varint(u.files);
                w.varint(u.chunks);
            }
            Message::Changes(changes) => {
                w.u8(ty::CHANGES);
                dry_run::encode_changes(&mut w, changes);
            }
            Message::DryRunEnd(outcome) => {
                w.u8(ty::DRY_RUN_END);
                dry_run::encode_outcome(&mut w, outcome);
            }
            Message::Error { message } => {
                w.u8(ty::ERROR);
                let m = message.as_bytes();
                w.bytes(&m[..m.len().min(MAX_ERROR)]);
            }
            Message::BenchResult { bytes, cpu_micros } => {
                w.u8(ty::BENCH_RESULT);
                w.varint(*bytes);
                w.varint(*cpu_micros);
            }
        }
        w.buf
    }

    /// The full frame: length prefix, type and payload.
    pub fn encode_frame(&self) -> Vec<u8> {
        let body = self.encode_body();
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// The frame split in two for vectored writes: everything up to a chunk's payload, and
    /// the payload itself (shared, not copied). Other messages are all header.
    pub fn encode_frame_parts(&self) -> (Bytes, Option<Bytes>) {
        let Message::Chunk(c) = self else {
            return (Bytes::from(self.encode_frame()), None);
        };
        let mut w = Writer::new();
        w.u8(ty::CHUNK);
        w.hash(&c.id.0);
        w.u8(c.encoding as u8);
        w.varint(u64::from(c.raw_len));
        w.varint(c.payload.len() as u64);
        let len = w.buf.len() + c.payload.len();
        let mut head = Vec::with_capacity(4 + w.buf.len());
        head.extend_from_slice(&(len as u32).to_be_bytes());
        head.extend_from_slice(&w.buf);
        (Bytes::from(head), Some(c.payload.clone()))
    }

    /// Decodes a received frame body, sharing (not copying) a chunk's payload with `body`.
    pub fn decode_frame(body: &Bytes, limits: &Limits) -> Result<Message, DecodeError> {
        Self::decode(body, Some(body), limits)
    }

    /// Decodes a frame body (type + payload) received from a peer.
    pub fn decode_body(body: &[u8], limits: &Limits) -> Result<Message, DecodeError> {
        Self::decode(body, None, limits)
    }

    /// `shared`, when given, holds `body`: a chunk's payload then points into it.
    fn decode(
        body: &[u8],
        shared: Option<&Bytes>,
        limits: &Limits,
    ) -> Result<Message, DecodeError> {
        if body.len() > MAX_FRAME {
            return Err(DecodeError::TooLong {
                what: "frame",
                len: body.len() as u64,
                limit: MAX_FRAME as u64,
            });
        }
        let mut r = Reader::new(body);
        let msg = match r.u8()? {
            ty::HELLO => {
                let version = r.u32("version")?;
                let mode = manifest::decode_mode(&mut r)?;
                let chunker = ChunkerParams::decode(&mut r)?;
                if chunker.validate().is_err() {
                    return Err(DecodeError::Invalid {
                        what: "hello",
                        why: "chunk sizes out of range",
                    });
                }
                let flags = r.u8()?;
                let known = hello_flags::COMPRESS
                    | hello_flags::STREAM
                    | hello_flags::BASE
                    | hello_flags::DRY_RUN
                    | hello_flags::INPLACE
                    | hello_flags::LIVE;
                if flags & !known != 0 {
                    return Err(DecodeError::Invalid {
                        what: "hello",
                        why: "unknown flags",
                    });
                }
                Message::Hello(Hello {
                    version,
                    mode,
                    chunker,
                    compress: flags & hello_flags::COMPRESS != 0,
                    stream: flags & hello_flags::STREAM != 0,
                    bases: match flags & hello_flags::BASE {
                        0 => Vec::new(),
                        _ => {
                            let n = r.varint_max("delta bases", MAX_BASES as u64)?;
                            if n == 0 {
                                return Err(DecodeError::Invalid {
                                    what: "hello",
                                    why: "a base flag without bases",
                                });
                            }
                            (0..n)
                                .map(|_| r.hash().map(RootDigest))
                                .collect::<Result<_, _>>()?
                        }
                    },
                    dry_run: flags & hello_flags::DRY_RUN != 0,
                    inplace: flags & hello_flags::INPLACE != 0,
                    live: flags & hello_flags::LIVE != 0,
                })
            }
            ty::ENTRY => Message::Entry(manifest::decode_entry(&mut r, limits)?),
            ty::PATCH => Message::Patch(manifest::decode_patch(&mut r, limits)?),
            ty::WANT_HINTS => {
                let n = r.varint_max("hint count", MAX_WANT as u64)? as usize;
                let mut hints = Vec::with_capacity(n);
                for _ in 0..n {
                    hints.push(WantHint {
                        id: ChunkId(r.hash()?),
                        base: ChunkId(r.hash()?),
                        base_len: r
                            .varint_max("hint base length", fastcdc::v2020::MAXIMUM_MAX as u64)?
                            as u32,
                    });
                }
                Message::WantHints(hints)
            }
            ty::SUFFIX => {
                let id = ChunkId(r.hash()?);
                let base = ChunkId(r.hash()?);
                let (encoding, raw_len, payload) = decode_payload_fields(&mut r, shared)?;
                Message::Suffix(SuffixData {
                    id,
                    base,
                    encoding,
                    raw_len,
                    payload,
                })
            }
            ty::REMOVED => Message::Removed(manifest::rel_path(&mut r, "removed path")?),
            ty::MANIFEST_END => Message::ManifestEnd {
                entries: r.varint()?,
                root: RootDigest(r.hash()?),
            },
            ty::WANT => {
                let n = r.varint_max("want count", MAX_WANT as u64)? as usize;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(ChunkId(r.hash()?));
                }
                Message::Want(ids)
            }
            ty::WANT_END => Message::WantEnd,
            ty::CHUNK => {
                let id = ChunkId(r.hash()?);
                let (encoding, raw_len, payload) = decode_payload_fields(&mut r, shared)?;
                if encoding == Encoding::Raw && payload.len() != raw_len as usize {
                    return Err(DecodeError::Invalid {
                        what: "chunk",
                        why: "raw payload length differs from the chunk length",
                    });
                }
                Message::Chunk(ChunkData {
                    id,
                    encoding,
                    raw_len,
                    payload,
                })
            }
            ty::CHUNKS_END => Message::ChunksEnd {
                bytes_read: r.varint()?,
            },
            ty::DONE => Message::Done {
                root: RootDigest(r.hash()?),
                stats: DoneStats {
                    files_written: r.varint()?,
                    files_patched: r.varint()?,
                    deleted: r.varint()?,
                    bytes_copied_locally: r.varint()?,
                },
            },
            ty::STALE => Message::Stale(ChunkId(r.hash()?)),
            ty::UNFINISHED => Message::Unfinished(Unfinished {
                files: r.varint()?,
                chunks: r.varint()?,
            }),
            ty::CHANGES => Message::Changes(dry_run::decode_changes(&mut r)?),
            ty::DRY_RUN_END => Message::DryRunEnd(dry_run::decode_outcome(&mut r)?),
            ty::ERROR => Message::Error {
                message: String::from_utf8_lossy(r.bytes("error text", MAX_ERROR)?).into_owned(),
            },
            ty::BENCH_RESULT => Message::BenchResult {
                bytes: r.varint()?,
                cpu_micros: r.varint()?,
            },
            t => {
                return Err(DecodeError::UnknownTag {
                    what: "message type",
                    tag: u64::from(t),
                });
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

/// `encoding raw_len payload`, as a `Chunk` and a `Suffix` carry them. With `shared` (which
/// holds the frame), the payload points into it instead of being copied.
fn decode_payload_fields(
    r: &mut Reader<'_>,
    shared: Option<&Bytes>,
) -> Result<(Encoding, u32, Bytes), DecodeError> {
    let encoding = match r.u8()? {
        0 => Encoding::Raw,
        1 => Encoding::Zstd,
        t => {
            return Err(DecodeError::UnknownTag {
                what: "chunk encoding",
                tag: u64::from(t),
            });
        }
    };
    let raw_len = r.varint_max("chunk length", fastcdc::v2020::MAXIMUM_MAX as u64)? as u32;
    let payload = r.bytes("chunk payload", MAX_FRAME)?;
    let payload = match shared {
        Some(b) => b.slice_ref(payload),
        None => Bytes::copy_from_slice(payload),
    };
    Ok((encoding, raw_len, payload))
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {id}: payload does not decompress: {why}")]
    Decompress { id: ChunkId, why: String },
    #[error("chunk {id}: decoded length {got} differs from announced {want}")]
    Length { id: ChunkId, got: usize, want: u32 },
    #[error("chunk {id}: data hashes to {got}; rejected")]
    Hash { id: ChunkId, got: ChunkId },
    #[error("chunk {id}: sent as what follows {base}, which this receiver did not offer")]
    NotOffered { id: ChunkId, base: ChunkId },
}

thread_local! {
    /// One zstd context per thread, reused for every chunk (creating one per chunk cost ~2%
    /// of a full copy's CPU), with the level it is set to. `None` if zstd could not make one
    /// (then each call makes its own).
    static COMPRESSOR: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, i32)>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(FAST).ok().map(|c| (c, FAST)));
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

impl ChunkData {
    /// Like [`ChunkData::encode`], taking the data without a copy when it goes raw.
    pub fn encode_owned(id: ChunkId, data: Vec<u8>, level: Option<i32>) -> ChunkData {
        if level.is_some() {
            let c = Self::encode(id, &data, level);
            if c.encoding == Encoding::Zstd {
                return c;
            }
        }
        ChunkData {
            id,
            encoding: Encoding::Raw,
            raw_len: data.len() as u32,
            payload: Bytes::from(data),
        }
    }

    /// Encodes a chunk, compressed at zstd `level` when one is given and that makes it
    /// smaller.
    pub fn encode(id: ChunkId, data: &[u8], level: Option<i32>) -> ChunkData {
        if let Some(level) = level
            && let Ok(z) = COMPRESSOR.with_borrow_mut(|c| match c {
                Some((c, set)) => {
                    if *set != level {
                        c.set_compression_level(level)?;
                        *set = level;
                    }
                    c.compress(data)
                }
                None => zstd::bulk::compress(data, level),
            })
            && z.len() < data.len()
        {
            return ChunkData {
                id,
                encoding: Encoding::Zstd,
                raw_len: data.len() as u32,
                payload: Bytes::from(z),
            };
        }
        ChunkData {
            id,
            encoding: Encoding::Raw,
            raw_len: data.len() as u32,
            payload: Bytes::copy_from_slice(data),
        }
    }

    /// Decodes the payload and checks it against the chunk's name.
    pub fn decode_verified(&self) -> Result<Bytes, ChunkError> {
        let data = decode_payload(self.id, self.encoding, &self.payload, self.raw_len as usize)?;
        verified(self.id, data, self.raw_len)
    }
}

impl SuffixData {
    /// The tail of `data` (whose first `base_len` bytes are the chunk `base`), compressed
    /// when asked and when that makes it smaller.
    pub fn encode(
        id: ChunkId,
        base: ChunkId,
        base_len: usize,
        data: &[u8],
        level: Option<i32>,
    ) -> Self {
        let tail = ChunkData::encode(id, &data[base_len..], level);
        SuffixData {
            id,
            base,
            encoding: tail.encoding,
            raw_len: data.len() as u32,
            payload: tail.payload,
        }
    }

    /// The whole chunk: `base` (the bytes of the chunk this receiver offered, already
    /// verified) then the decoded tail, checked against the chunk's name.
    pub fn decode_verified(&self, base: Option<(ChunkId, &[u8])>) -> Result<Bytes, ChunkError> {
        let base = match base {
            Some((id, bytes)) if id == self.base && bytes.len() < self.raw_len as usize => bytes,
            _ => {
                return Err(ChunkError::NotOffered {
                    id: self.id,
                    base: self.base,
                });
            }
        };
        let limit = self.raw_len as usize - base.len();
        let tail = decode_payload(self.id, self.encoding, &self.payload, limit)?;
        let mut data = Vec::with_capacity(self.raw_len as usize);
        data.extend_from_slice(base);
        data.extend_from_slice(&tail);
        verified(self.id, Bytes::from(data), self.raw_len)
    }
}

/// A payload decoded, at most `limit` bytes.
fn decode_payload(
    id: ChunkId,
    encoding: Encoding,
    payload: &Bytes,
    limit: usize,
) -> Result<Bytes, ChunkError> {
    match encoding {
        Encoding::Raw => Ok(payload.clone()),
        Encoding::Zstd => DECOMPRESSOR
            .with_borrow_mut(|d| match d {
                Some(d) => d.decompress(payload, limit),
                None => zstd::bulk::decompress(payload, limit),
            })
            .map(Bytes::from)
            .map_err(|e| ChunkError::Decompress {
                id,
                why: e.to_string(),
            }),
    }
}

/// `data` if it has the announced length and hashes to `id`.
fn verified(id: ChunkId, data: Bytes, raw_len: u32) -> Result<Bytes, ChunkError> {
    if data.len() != raw_len as usize {
        return Err(ChunkError::Length {
            id,
            got: data.len(),
            want: raw_len,
        });
    }
    let got = ChunkId::of(&data);
    if got != id {
        return Err(ChunkError::Hash { id, got });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::encode_tests::arb_entry;
    use proptest::prelude::*;

    fn round_trip(m: &Message) -> Message {
        let frame = m.encode_frame();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len + 4, frame.len());
        Message::decode_body(&frame[4..], &Limits::default()).unwrap()
    }

    proptest! {
        #[test]
        fn entries_round_trip(e in arb_entry()) {
            let m = Message::Entry(e);
            prop_assert_eq!(round_trip(&m), m);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::decode_body(&data, &Limits::default());
        }
    }

    #[test]
    fn every_message_round_trips() {
        let data = vec![5u8; 10_000];
        let id = ChunkId::of(&data);
        let msgs = vec![
            Message::Hello(Hello {
                version: 1,
                mode: VolumeMode::Tree,
                chunker: ChunkerParams::default(),
                compress: true,
                stream: true,
                bases: Vec::new(),
                dry_run: false,
                inplace: true,
                live: true,
            }),
            Message::Hello(Hello {
                version: 3,
                mode: VolumeMode::Block,
                chunker: ChunkerParams::default(),
                compress: false,
                stream: false,
                bases: vec![RootDigest([7; 32]), RootDigest([8; 32])],
                dry_run: true,
                inplace: false,
                live: false,
            }),
            Message::Stale(ChunkId([9; 32])),
            Message::Unfinished(Unfinished {
                files: 2,
                chunks: 300,
            }),
            Message::Changes(vec![
                Change {
                    action: super::dry_run::Action::Delete,
                    dir: true,
                    path: RelPath::new(b"old".to_vec()).unwrap(),
                },
                Change {
                    action: super::dry_run::Action::Attrs,
                    dir: true,
                    path: RelPath::root(),
                },
            ]),
            Message::DryRunEnd(Outcome {
                chunks_wanted: 3,
                bytes_wanted: 70_000,
                stats: DoneStats {
                    files_written: 2,
                    files_patched: 1,
                    deleted: 1,
                    bytes_copied_locally: 9,
                },
            }),
            Message::Removed(RelPath::new(b"a/b c".to_vec()).unwrap()),
            Message::WantHints(vec![WantHint {
                id,
                base: ChunkId([3; 32]),
                base_len: 4000,
            }]),
            Message::Suffix(SuffixData::encode(
                id,
                ChunkId::of(&data[..4000]),
                4000,
                &data,
                Some(FAST),
            )),
            Message::Patch(FilePatch {
                path: RelPath::new(b"big".to_vec()).unwrap(),
                meta: Default::default(),
                size: 10_100,
                ops: vec![
                    crate::manifest::delta::SegmentOp::Base {
                        start: 3,
                        count: 1000,
                    },
                    crate::manifest::delta::SegmentOp::New(crate::chunk::Segment::Zero {
                        len: 100,
                    }),
                    crate::manifest::delta::SegmentOp::New(crate::chunk::Segment::Chunk {
                        id,
                        len: 10_000,
                    }),
                ],
            }),
            Message::ManifestEnd {
                entries: 7,
                root: RootDigest([9; 32]),
            },
            Message::Want(vec![id, ChunkId([1; 32])]),
            Message::WantEnd,
            Message::Chunk(ChunkData::encode(id, &data, Some(FAST))),
            Message::Chunk(ChunkData::encode(id, &data, None)),
            Message::ChunksEnd {
                bytes_read: 1 << 40,
            },
            Message::Done {
                root: RootDigest([2; 32]),
                stats: DoneStats {
                    files_written: 3,
                    files_patched: 2,
                    deleted: 1,
                    bytes_copied_locally: 99,
                },
            },
            Message::Error {
                message: "boom".into(),
            },
            Message::BenchResult {
                bytes: 1 << 33,
                cpu_micros: 12_345,
            },
        ];
        for m in msgs {
            assert_eq!(round_trip(&m), m);
            let (head, payload) = m.encode_frame_parts();
            let mut joined = head.to_vec();
            joined.extend_from_slice(payload.as_deref().unwrap_or_default());
            assert_eq!(joined, m.encode_frame());
            let body = Bytes::from(joined[4..].to_vec());
            assert_eq!(Message::decode_frame(&body, &Limits::default()).unwrap(), m);
            assert!(m.wire_len().abs_diff(m.encode_frame().len()) <= 12);
        }
    }

    #[test]
    fn compression_is_used_only_when_it_shrinks() {
        let zeros = vec![1u8; 65536];
        let c = ChunkData::encode(ChunkId::of(&zeros), &zeros, Some(FAST));
        assert_eq!(c.encoding, Encoding::Zstd);
        assert_eq!(c.decode_verified().unwrap(), zeros);
        let noise = crate::demo::seeded_bytes(5, 65536);
        let c = ChunkData::encode(ChunkId::of(&noise), &noise, Some(FAST));
        assert_eq!(c.encoding, Encoding::Raw);
    }

    #[test]
    fn one_thread_compresses_at_either_level_in_turn() {
        use super::super::compression::STRONG;
        let text = crate::demo::seeded_text(6, 65536);
        let id = ChunkId::of(&text);
        let mut sizes = Vec::new();
        for level in [FAST, STRONG, FAST, STRONG] {
            let c = ChunkData::encode(id, &text, Some(level));
            assert_eq!(c.encoding, Encoding::Zstd);
            assert_eq!(c.decode_verified().unwrap(), text);
            sizes.push(c.payload.len());
        }
        // The shared context really changes level each time, and level 3 packs tighter.
        assert_eq!((sizes[0], sizes[1]), (sizes[2], sizes[3]));
        assert!(sizes[1] < sizes[0], "{sizes:?}");
    }

    #[test]
    fn a_suffix_needs_the_base_it_was_offered_and_must_hash_to_its_name() {
        let data = crate::demo::seeded_bytes(7, 30_000);
        let (id, base) = (ChunkId::of(&data), ChunkId::of(&data[..20_000]));
        let s = SuffixData::encode(id, base, 20_000, &data, None);
        assert_eq!(s.payload.len(), 10_000, "only the tail goes");
        assert_eq!(
            s.decode_verified(Some((base, &data[..20_000]))).unwrap(),
            data
        );
        assert!(matches!(
            s.decode_verified(None),
            Err(ChunkError::NotOffered { .. })
        ));
        let other = ChunkId([1; 32]);
        assert!(matches!(
            s.decode_verified(Some((other, &data[..20_000]))),
            Err(ChunkError::NotOffered { .. })
        ));
        // The receiver's base bytes differ from the sender's: the result fails its hash.
        let mut wrong = data[..20_000].to_vec();
        wrong[5] ^= 1;
        assert!(matches!(
            s.decode_verified(Some((base, &wrong))),
            Err(ChunkError::Hash { .. })
        ));
        let z = SuffixData::encode(id, base, 20_000, &data, Some(FAST));
        assert_eq!(
            z.decode_verified(Some((base, &data[..20_000]))).unwrap(),
            data
        );
    }

    #[test]
    fn a_chunk_with_the_wrong_hash_is_rejected() {
        let data = vec![1u8; 1000];
        let mut c = ChunkData::encode(ChunkId::of(&data), &data, None);
        c.id = ChunkId([0; 32]);
        assert!(matches!(c.decode_verified(), Err(ChunkError::Hash { .. })));
    }
}
