//! Content-defined chunking (FastCDC 2020) and chunk names (BLAKE3).
//!
//! A volume's bytes are cut where the content says so, not at fixed offsets, so an insertion
//! shifts only the chunk it lands in. Each chunk is named by the BLAKE3 hash of its bytes, which
//! lets either side ask "do I have this already?" anywhere in a volume, and lets the receiver
//! verify every chunk before it is stored. All-zero chunks are not named: they become
//! [`Segment::Zero`], which is neither sent nor written (holes stay holes).

pub mod parallel;
pub mod table;
pub mod window;

use std::fmt;
use std::io::{self, Read};

use fastcdc::v2020::{self, Normalization};

use crate::codec::{DecodeError, Reader, Writer, from_hex, to_hex};

/// The name of a chunk: the BLAKE3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// The first 128 bits, as a key for tables of many chunks where the whole id is checked
    /// again before anything is trusted: half the memory of whole ids, and finding two chunks
    /// with one prefix takes ~2^64 work.
    pub fn prefix(&self) -> u128 {
        let mut first = [0u8; 16];
        first.copy_from_slice(&self.0[..16]);
        u128::from_le_bytes(first)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        from_hex::<32>(s).map(ChunkId)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One piece of a file's or block volume's content, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// `len` bytes whose BLAKE3 hash is `id`.
    Chunk { id: ChunkId, len: u32 },
    /// `len` zero bytes: a hole, never sent and never written.
    Zero { len: u64 },
}

impl Segment {
    pub fn len(&self) -> u64 {
        match *self {
            Segment::Chunk { len, .. } => u64::from(len),
            Segment::Zero { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends a segment, merging runs of zeros so a sparse volume's list stays short.
pub fn push_segment(list: &mut Vec<Segment>, seg: Segment) {
    if let (Some(Segment::Zero { len: last }), Segment::Zero { len }) = (list.last_mut(), seg) {
        *last += len;
        return;
    }
    list.push(seg);
}

/// Chunk size bounds in bytes (FastCDC's minimum, average and maximum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkerParams {
    /// 16/64/256 KiB: see docs/chunking.md for the measurements behind these.
    fn default() -> Self {
        ChunkerParams {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
        }
    }
}

impl ChunkerParams {
    /// `min avg max` as varints: how manifest headers, Hellos and indexes carry them.
    pub fn encode(&self, w: &mut Writer) {
        w.varint(u64::from(self.min));
        w.varint(u64::from(self.avg));
        w.varint(u64::from(self.max));
    }

    /// Reads what [`ChunkerParams::encode`] wrote (not yet validated).
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(ChunkerParams {
            min: r.u32("chunk min")?,
            avg: r.u32("chunk avg")?,
            max: r.u32("chunk max")?,
        })
    }

    /// Checks the bounds FastCDC accepts (and that they are ordered).
    pub fn validate(&self) -> Result<(), String> {
        let (min, avg, max) = (self.min as usize, self.avg as usize, self.max as usize);
        let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max
            && min % 2 == 0
            && avg % 2 == 0
            && max % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "invalid chunk sizes min={min} avg={avg} max={max}: need {}<=min<=avg<=max<={}, \
                 avg>={}, all even",
                v2020::MINIMUM_MIN,
                v2020::MAXIMUM_MAX,
                v2020::AVERAGE_MIN
            ))
        }
    }
}

/// True when every byte is zero (vectorises well; used on every chunk).
pub fn is_zero(data: &[u8]) -> bool {
    let mut iter = data.chunks_exact(64);
    let all = iter.by_ref().all(|block| block == [0u8; 64]);
    all && iter.remainder().iter().all(|&b| b == 0)
}

/// Streams a reader through FastCDC with a large reusable buffer.
///
/// Unlike `fastcdc::v2020::StreamCDC` this does not allocate per chunk nor shift the buffer
/// after every chunk: chunks are handed out as slices of the buffer, which is compacted only
/// when less than one maximum-size chunk remains.
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    buf: Vec<u8>,
}

impl Chunker {
    pub fn new(params: ChunkerParams) -> Self {
        let (mask_s, mask_l) = v2020::select_masks(params.avg as usize, Normalization::Level1);
        let cap = (params.max as usize * 4).max(4 << 20);
        Chunker {
            params,
            mask_s,
            mask_l,
            buf: vec![0; cap],
        }
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Cuts everything `reader` yields; calls `on_chunk(offset, bytes)` for each chunk in order.
    pub fn run<R: Read>(
        &mut self,
        mut reader: R,
        mut on_chunk: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<u64> {
        let max = self.params.max as usize;
        let (mut start, mut end) = (0usize, 0usize);
        let mut offset = 0u64;
        let mut eof = false;
        loop {
            if !eof && end - start < max {
                self.buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                while end < self.buf.len() {
                    let n = match reader.read(&mut self.buf[end..]) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    if n == 0 {
                        eof = true;
                        break;
                    }
                    end += n;
                }
            }
            if start == end {
                return Ok(offset);
            }
            let window = &self.buf[start..end];
            let (_, len) = v2020::cut(
                window,
                self.params.min as usize,
                self.params.avg as usize,
                self.params.max as usize,
                self.mask_s,
                self.mask_l,
                self.mask_s << 1,
                self.mask_l << 1,
            );
            let len = if len == 0 { window.len() } else { len };
            on_chunk(offset, &window[..len])?;
            offset += len as u64;
            start += len;
        }
    }

    /// Cuts a reader into segments: named chunks, and zero runs for all-zero chunks.
    pub fn segments<R: Read>(
        &mut self,
        reader: R,
        mut on_data: impl FnMut(u64, &[u8], ChunkId) -> io::Result<()>,
    ) -> io::Result<(Vec<Segment>, u64)> {
        let mut segments = Vec::new();
        let total = self.run(reader, |offset, data| {
            if is_zero(data) {
                push_segment(
                    &mut segments,
                    Segment::Zero {
                        len: data.len() as u64,
                    },
                );
            } else {
                let id = ChunkId::of(data);
                on_data(offset, data, id)?;
                segments.push(Segment::Chunk {
                    id,
                    len: data.len() as u32,
                });
            }
            Ok(())
        })?;
        Ok((segments, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), so tests need no fixtures.
    pub fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn boundaries(data: &[u8], params: ChunkerParams) -> Vec<(u64, usize)> {
        let mut out = Vec::new();
        Chunker::new(params)
            .run(data, |off, c| {
                out.push((off, c.len()));
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn golden_boundaries_on_seeded_data() {
        // Pins the chunker: if these change, every existing index and manifest is invalidated.
        let data = seeded_bytes(42, 1 << 20);
        let b = boundaries(&data, ChunkerParams::default());
        let lens: Vec<usize> = b.iter().map(|&(_, l)| l).collect();
        assert_eq!(lens.iter().sum::<usize>(), 1 << 20);
        let digest = blake3::hash(format!("{lens:?}").as_bytes());
        assert_eq!(
            (lens.len(), lens[0], &digest.to_hex()[..16]),
            (12, 110_203, "48894363be004660")
        );
    }

    #[test]
    fn chunking_is_independent_of_read_sizes() {
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(1000);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data = seeded_bytes(7, 3 << 20);
        let p = ChunkerParams::default();
        let mut slow = Vec::new();
        Chunker::new(p)
            .run(Dribble(&data), |o, c| {
                slow.push((o, c.len()));
                Ok(())
            })
            .unwrap();
        assert_eq!(slow, boundaries(&data, p));
    }

    #[test]
    fn insertion_changes_few_chunks() {
        let data = seeded_bytes(3, 4 << 20);
        let mut edited = data.clone();
        edited.splice(100_000..100_000, seeded_bytes(9, 1024));
        let p = ChunkerParams::default();
        let ids = |d: &[u8]| {
            let mut v = Vec::new();
            Chunker::new(p)
                .run(d, |_, c| {
                    v.push(ChunkId::of(c));
                    Ok(())
                })
                .unwrap();
            v
        };
        let before: std::collections::HashSet<_> = ids(&data).into_iter().collect();
        let after = ids(&edited);
        let new = after.iter().filter(|id| !before.contains(id)).count();
        assert!(new <= 2, "{new} new chunks after a 1 KiB insertion");
    }

    #[test]
    fn zero_runs_become_zero_segments() {
        let mut data = seeded_bytes(1, 300_000);
        data.extend(std::iter::repeat_n(0u8, 2_000_000));
        data.extend(seeded_bytes(2, 300_000));
        let (segs, total) = Chunker::new(ChunkerParams::default())
            .segments(&data[..], |_, _, _| Ok(()))
            .unwrap();
        assert_eq!(total, data.len() as u64);
        assert_eq!(segs.iter().map(Segment::len).sum::<u64>(), total);
        let zeros: u64 = segs
            .iter()
            .filter(|s| matches!(s, Segment::Zero { .. }))
            .map(Segment::len)
            .sum();
        assert!(zeros > 1_500_000, "only {zeros} zero bytes recognised");
    }

    #[test]
    fn params_are_validated() {
        assert!(ChunkerParams::default().validate().is_ok());
        let bad = ChunkerParams {
            min: 100_000,
            avg: 4096,
            max: 65536,
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[5] = 1;
        assert!(!is_zero(&v));
    }
}
