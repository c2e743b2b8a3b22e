//! Cutting one large input on several threads into exactly the chunks one thread would cut.
//!
//! A changed 256 MiB file is read and cut again in full by every incremental sync (and by
//! every pre-copy round of a migration): at ~500 MB/s for one thread, that is the longest
//! step of a small edit to a large file. FastCDC's next boundary depends only on where the
//! last chunk ended and on the bytes after it, so two cuttings of the same bytes that share
//! one boundary agree from there on. Each thread cuts one share of the input from the
//! share's start (as if a chunk began there) and a margin past its end; the lists are then
//! stitched at the first boundary an earlier list has in common with the next. Cuttings that
//! do not meet within the margin (a long run of zeros is cut every `max` bytes from wherever
//! a cutting started) are extended on this thread, from the earlier list's end, until they
//! do or until the next share is covered. The result is the single-thread cutting, chunk for
//! chunk, whatever the number of threads (a property test checks it).

use std::io::{self, Read};

use super::{ChunkId, Chunker, ChunkerParams, Segment, is_zero, push_segment};

/// One chunk of a cutting: where it ends and its id (`None`: all zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cut {
    end: u64,
    id: Option<ChunkId>,
}

/// How far past its share each thread cuts, in maximum chunk sizes: real data meets within a
/// chunk or two.
const MARGIN_CHUNKS: u64 = 4;

/// Cuts the `size` bytes `open(start, end)` reads (any range, from any thread) into segments,
/// with up to `threads` threads. `None` if the input ended early (it shrank while being
/// read): the caller cuts it on one thread, which records what it saw.
pub fn segments_parallel<R: Read>(
    params: ChunkerParams,
    size: u64,
    threads: usize,
    open: impl Fn(u64, u64) -> io::Result<R> + Sync,
) -> io::Result<Option<Vec<Segment>>> {
    let margin = MARGIN_CHUNKS * u64::from(params.max);
    // Shares much smaller than the margin would be cut twice for nothing.
    let shares = (threads as u64).min(size / (4 * margin)).max(1);
    let start_of = |i: u64| size / shares * i;
    let cut = |start: u64, end: u64| cut_range(params, &open, start, end, size);
    let lists: Vec<io::Result<Option<Vec<Cut>>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..shares)
            .map(|i| {
                let end = if i + 1 == shares {
                    size
                } else {
                    (start_of(i + 1) + margin).min(size)
                };
                let cut = &cut;
                s.spawn(move || cut(start_of(i), end))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("cutting thread panicked")))
            })
            .collect()
    });
    let mut lists = lists.into_iter();
    let Some(mut out) = lists.next().transpose()?.flatten() else {
        return Ok(None);
    };
    for (i, next) in (1..).zip(lists) {
        let Some(next) = next? else { return Ok(None) };
        let start = start_of(i);
        loop {
            if let Some((upto, from)) = meeting(&out, start, &next) {
                out.truncate(upto);
                out.extend_from_slice(&next[from..]);
                break;
            }
            let from = out.last().map_or(0, |c| c.end);
            let next_end = next.last().map_or(start, |c| c.end);
            if from >= next_end {
                break; // `out` covers this share already; meet the one after
            }
            match cut(from, (next_end + margin).min(size))? {
                Some(more) => out.extend(more),
                None => return Ok(None),
            }
        }
    }
    if out.last().map_or(0, |c| c.end) != size {
        return Ok(None);
    }
    let mut segments = Vec::with_capacity(out.len());
    let mut at = 0;
    for c in out {
        let len = c.end - at;
        at = c.end;
        match c.id {
            Some(id) => segments.push(Segment::Chunk {
                id,
                len: u32::try_from(len).expect("chunks are at most `max` bytes"),
            }),
            None => push_segment(&mut segments, Segment::Zero { len }),
        }
    }
    Ok(Some(segments))
}

/// The cutting of `start..end` as if a chunk began at `start`. Unless `end` is the end of the
/// input, the last chunk is dropped: the end of the range cut it, not the content. `None` if
/// the range could not be read in full.
fn cut_range<R: Read>(
    params: ChunkerParams,
    open: &impl Fn(u64, u64) -> io::Result<R>,
    start: u64,
    end: u64,
    size: u64,
) -> io::Result<Option<Vec<Cut>>> {
    let mut cuts = Vec::new();
    let read = Chunker::new(params).run(open(start, end)?, |off, data| {
        cuts.push(Cut {
            end: start + off + data.len() as u64,
            id: (!is_zero(data)).then(|| ChunkId::of(data)),
        });
        Ok(())
    })?;
    if start + read != end {
        return Ok(None);
    }
    if end < size {
        cuts.pop();
    }
    Ok(Some(cuts))
}

/// Where `out` and `next` (a cutting from `start`) first share a boundary at or after
/// `start`: how many of `out`'s cuts to keep, and the first of `next`'s to append.
fn meeting(out: &[Cut], start: u64, next: &[Cut]) -> Option<(usize, usize)> {
    let first = out.partition_point(|c| c.end < start);
    // A boundary of `out` exactly at `start` takes all of `next`.
    let mut j = 0;
    for (i, c) in out.iter().enumerate().skip(first) {
        if c.end == start {
            return Some((i + 1, 0));
        }
        while j < next.len() && next[j].end < c.end {
            j += 1;
        }
        match next.get(j) {
            Some(n) if n.end == c.end => return Some((i + 1, j + 1)),
            Some(_) => {}
            None => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::tests::seeded_bytes;
    use proptest::prelude::*;

    fn one_thread(params: ChunkerParams, data: &[u8]) -> Vec<Segment> {
        Chunker::new(params)
            .segments(data, |_, _, _| Ok(()))
            .unwrap()
            .0
    }

    fn threads(params: ChunkerParams, data: &[u8], n: usize) -> Option<Vec<Segment>> {
        segments_parallel(params, data.len() as u64, n, |s, e| {
            Ok(&data[s as usize..e as usize])
        })
        .unwrap()
    }

    const SMALL: ChunkerParams = ChunkerParams {
        min: 256,
        avg: 1024,
        max: 4096,
    };

    /// Random bytes with runs of zeros and repeats: the places where cuttings that started
    /// apart take longest to meet.
    fn arb_input() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                (any::<u64>(), 1usize..40_000).prop_map(|(seed, len)| seeded_bytes(seed, len)),
                (1usize..60_000).prop_map(|len| vec![0u8; len]),
                (1usize..20_000).prop_map(|len| vec![7u8; len]),
            ],
            1..12,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn several_threads_cut_exactly_what_one_thread_cuts(data in arb_input(), n in 1usize..6) {
            prop_assert_eq!(threads(SMALL, &data, n), Some(one_thread(SMALL, &data)));
        }
    }

    #[test]
    fn a_large_input_with_the_default_sizes_is_cut_the_same_on_two_threads() {
        let mut data = seeded_bytes(5, 6 << 20);
        data.extend(std::iter::repeat_n(0u8, 3 << 20));
        data.extend(seeded_bytes(6, 5 << 20));
        let p = ChunkerParams::default();
        assert_eq!(threads(p, &data, 2), Some(one_thread(p, &data)));
        assert_eq!(threads(p, &data, 3), Some(one_thread(p, &data)));
    }

    #[test]
    fn an_input_that_ends_early_is_left_to_one_thread() {
        let data = seeded_bytes(8, 2 << 20);
        let short = segments_parallel(SMALL, data.len() as u64, 2, |s, e| {
            Ok(&data[s as usize..(e as usize).min(1 << 20)])
        })
        .unwrap();
        assert_eq!(short, None);
    }
}
