//! A small seeded generator (SplitMix64), so every workload is the same bytes on every run
//! and every machine (given the same /usr for the binary parts) without a `rand` dependency.

#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// A generator for one named part of a workload, independent of the others.
    pub fn derive(seed: u64, part: &str) -> Self {
        let tag = blake3_u64(part.as_bytes());
        Rng::new(seed.rotate_left(17) ^ tag)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi);
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.range(0, i as u64) as usize;
            items.swap(i, j);
        }
    }
}

fn blake3_u64(data: &[u8]) -> u64 {
    let h = replicator::chunk::ChunkId::of(data);
    u64::from_le_bytes(h.0[..8].try_into().unwrap_or([0; 8]))
}

/// Words for text-like files: compressible like prose and logs, with enough variety that
/// content-defined chunk boundaries fall naturally.
const WORDS: &[&str] = &[
    "the",
    "volume",
    "replica",
    "chunk",
    "index",
    "write",
    "ahead",
    "log",
    "segment",
    "commit",
    "checkpoint",
    "page",
    "buffer",
    "node",
    "cluster",
    "shard",
    "primary",
    "lease",
    "epoch",
    "digest",
    "stream",
    "latency",
    "throughput",
    "request",
    "response",
    "error",
    "warning",
    "info",
    "debug",
    "user",
    "session",
    "token",
    "table",
    "column",
    "row",
    "query",
    "plan",
    "scan",
    "merge",
    "sort",
    "hash",
    "join",
    "insert",
    "update",
    "delete",
    "select",
    "from",
    "where",
    "and",
    "or",
    "not",
    "null",
    "true",
    "false",
    "2026-11-27T08:30:00Z",
    "GET",
    "POST",
    "/api/v1/items",
    "200",
    "404",
    "503",
    "ms",
    "bytes",
    "of",
    "to",
    "in",
    "a",
    "is",
    "was",
    "for",
    "on",
    "with",
    "by",
    "at",
    "it",
    "as",
    "be",
    "this",
    "that",
    "which",
];

/// Appends `len` bytes of text-like content (words, spaces, newlines, some numbers).
pub fn text(rng: &mut Rng, len: usize, out: &mut Vec<u8>) {
    let end = out.len() + len;
    let mut line = 0usize;
    while out.len() < end {
        let r = rng.next_u64();
        if r % 11 == 0 {
            out.extend_from_slice((r >> 20).to_string().as_bytes());
        } else {
            out.extend_from_slice(WORDS[(r >> 8) as usize % WORDS.len()].as_bytes());
        }
        line += 1;
        if line >= 8 + (r >> 40) as usize % 8 {
            out.push(b'\n');
            line = 0;
        } else {
            out.push(b' ');
        }
    }
    out.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_parts_differ() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        let mut p = Rng::derive(1, "tree");
        let mut q = Rng::derive(1, "image");
        assert_ne!(p.next_u64(), q.next_u64());
    }

    #[test]
    fn text_has_exact_length_and_lines() {
        let mut out = Vec::new();
        text(&mut Rng::new(3), 10_000, &mut out);
        assert_eq!(out.len(), 10_000);
        assert!(out.iter().filter(|&&b| b == b'\n').count() > 50);
        let mut again = Vec::new();
        text(&mut Rng::new(3), 10_000, &mut again);
        assert_eq!(out, again);
    }

    #[test]
    fn range_stays_in_bounds() {
        let mut r = Rng::new(9);
        for _ in 0..10_000 {
            let v = r.range(5, 9);
            assert!((5..=9).contains(&v));
        }
    }
}
