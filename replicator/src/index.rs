//! The quick-check index: what each file's chunk list was when it was last read or written.
//!
//! Both ends keep one, outside the volume (in the state directory). The sender uses it to skip
//! re-reading source files whose size, mtime, ctime and inode are unchanged; the receiver uses
//! it to know which destination files already hold which chunks without reading them.
//!
//! Racy entries (trap: a file modified in the same timestamp tick as the scan that read it) are
//! never trusted: an entry whose ctime or mtime is not older than the scan start minus a margin
//! is recorded as *racy*. The margin is one timestamp tick with room to spare: 1 s where the
//! filesystem keeps whole seconds ([`RACY_MARGIN_COARSE_NS`]), 50 ms where it keeps sub-second
//! times ([`RACY_MARGIN_FINE_NS`]; the kernel stamps files from a clock that ticks at least
//! every 10 ms). Too wide a margin costs real time: every file the receiver just wrote would
//! be re-read on the next sync. [`FileIndex::lookup`] ignores racy entries, so the
//! next sync reads such a file again; [`FileIndex::locate`] still offers them as places where a
//! chunk may be found, which is safe because every chunk read from such a place is verified.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use crate::chunk::{ChunkerParams, Segment};
use crate::codec::{DecodeError, Reader, Writer};
use crate::manifest::{self, Entry, EntryKind, Limits, Meta, RelPath};
use crate::volume::StatInfo;

/// Timestamps within this much of the scan start are not trusted, on filesystems whose
/// timestamps have whole seconds (or coarser clocks).
pub const RACY_MARGIN_COARSE_NS: i128 = 1_000_000_000;
/// The same on filesystems with sub-second timestamps.
pub const RACY_MARGIN_FINE_NS: i128 = 50_000_000;

const MAGIC: &[u8; 4] = b"RPLI";
const VERSION: u64 = 1;

/// The stat fields that must be unchanged for a file's chunk list to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    pub ino: u64,
}

impl From<&StatInfo> for Fingerprint {
    fn from(s: &StatInfo) -> Self {
        Fingerprint {
            size: s.size,
            mtime_sec: s.mtime_sec,
            mtime_nsec: s.mtime_nsec,
            ctime_sec: s.ctime_sec,
            ctime_nsec: s.ctime_nsec,
            ino: s.ino,
        }
    }
}

impl Fingerprint {
    fn newest_ns(&self) -> i128 {
        let ns = |s: i64, n: u32| i128::from(s) * 1_000_000_000 + i128::from(n);
        ns(self.mtime_sec, self.mtime_nsec).max(ns(self.ctime_sec, self.ctime_nsec))
    }

    /// True if this stat was taken too close to the file's last change to be trusted later.
    pub fn is_racy(&self, scan_start_ns: i128) -> bool {
        // The ctime is always stamped by the kernel's clock, so its nanoseconds tell whether
        // this filesystem keeps sub-second times (exactly zero by chance: one in 10^9).
        let margin = if self.ctime_nsec == 0 {
            RACY_MARGIN_COARSE_NS
        } else {
            RACY_MARGIN_FINE_NS
        };
        self.newest_ns() >= scan_start_ns - margin
    }
}

/// Nanoseconds since the epoch, for racy checks.
pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub fingerprint: Fingerprint,
    pub segments: Vec<Segment>,
    /// Recorded too close to the file's last change to vouch for its content.
    pub racy: bool,
}

/// Maps keyed by volume paths. Their keys come from this host's own disk (a walk, its own
/// index), so a fast hash with a per-process seed serves: SipHash was ~5% of the CPU of a
/// sync that changed nothing.
pub type PathMap<V> = HashMap<RelPath, V, foldhash::fast::RandomState>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileIndex {
    pub params: Option<ChunkerParams>,
    pub entries: PathMap<IndexEntry>,
}

impl FileIndex {
    pub fn new(params: ChunkerParams) -> Self {
        FileIndex {
            params: Some(params),
            entries: PathMap::default(),
        }
    }

    /// The recorded chunk list of `path` if `stat` shows the file unchanged since and the
    /// record is not racy: the content may be trusted without reading it.
    pub fn lookup(&self, path: &RelPath, stat: &StatInfo) -> Option<&[Segment]> {
        self.locate(path, stat).filter(|_| !self.entries[path].racy)
    }

    /// The recorded chunk list of `path` if `stat` is unchanged, racy or not: where chunks
    /// probably are (callers verify what they read).
    pub fn locate(&self, path: &RelPath, stat: &StatInfo) -> Option<&[Segment]> {
        let e = self.entries.get(path)?;
        (e.fingerprint == Fingerprint::from(stat)).then_some(&e.segments[..])
    }

    /// Like [`FileIndex::lookup`], moving the chunk list out: a scan consults each record
    /// once, so the old index empties while the new one fills.
    pub fn take(&mut self, path: &RelPath, stat: &StatInfo) -> Option<Vec<Segment>> {
        self.lookup(path, stat)?;
        self.entries.remove(path).map(|e| e.segments)
    }

    /// Records a file; marks it racy if its stat is too close to `scan_start_ns`.
    pub fn record(
        &mut self,
        path: RelPath,
        stat: &StatInfo,
        segments: Vec<Segment>,
        scan_start_ns: i128,
    ) {
        let fingerprint = Fingerprint::from(stat);
        let racy = fingerprint.is_racy(scan_start_ns);
        self.entries.insert(
            path,
            IndexEntry {
                fingerprint,
                segments,
                racy,
            },
        );
    }

    /// Takes a second look at racy records once the racy margin has passed since their
    /// files last changed: a file still showing the recorded stat is recorded as seen at
    /// `scan_start_ns` (taken before any `stat_of` call); a changed or vanished one stays racy.
    pub fn settle_racy(
        &mut self,
        scan_start_ns: i128,
        stat_of: impl Fn(&RelPath) -> Option<StatInfo>,
    ) {
        for (path, e) in self.entries.iter_mut().filter(|(_, e)| e.racy) {
            if stat_of(path).is_some_and(|s| Fingerprint::from(&s) == e.fingerprint) {
                e.racy = e.fingerprint.is_racy(scan_start_ns);
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(MAGIC);
        w.varint(VERSION);
        let p = self.params.unwrap_or_default();
        w.varint(u64::from(p.min));
        w.varint(u64::from(p.avg));
        w.varint(u64::from(p.max));
        let mut paths: Vec<&RelPath> = self.entries.keys().collect();
        paths.sort();
        w.varint(paths.len() as u64);
        for path in paths {
            let e = &self.entries[path];
            let f = &e.fingerprint;
            w.varint(f.size);
            w.varint_signed(f.mtime_sec);
            w.varint(u64::from(f.mtime_nsec));
            w.varint_signed(f.ctime_sec);
            w.varint(u64::from(f.ctime_nsec));
            w.varint(f.ino);
            w.u8(u8::from(e.racy));
            // Reuse the manifest's file encoding for path + segments.
            w.raw(&manifest::encode_entry(&Entry {
                path: path.clone(),
                kind: EntryKind::File {
                    size: f.size,
                    segments: e.segments.clone(),
                },
                meta: Meta::default(),
            }));
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.take(4)? != MAGIC || r.varint()? != VERSION {
            return Err(DecodeError::Invalid {
                what: "index",
                why: "unknown format",
            });
        }
        let params = ChunkerParams {
            min: r.u32("chunk min")?,
            avg: r.u32("chunk avg")?,
            max: r.u32("chunk max")?,
        };
        let n = r.varint()?;
        let mut entries = PathMap::default();
        for _ in 0..n {
            let size = r.varint()?;
            let mtime_sec = r.varint_signed()?;
            let mtime_nsec = r.u32("mtime nsec")?;
            let ctime_sec = r.varint_signed()?;
            let ctime_nsec = r.u32("ctime nsec")?;
            let ino = r.varint()?;
            let racy = r.u8()? != 0;
            let entry = manifest::decode_entry(&mut r, &Limits::default())?;
            let EntryKind::File { segments, .. } = entry.kind else {
                return Err(DecodeError::Invalid {
                    what: "index",
                    why: "entry is not a file",
                });
            };
            entries.insert(
                entry.path,
                IndexEntry {
                    fingerprint: Fingerprint {
                        size,
                        mtime_sec,
                        mtime_nsec,
                        ctime_sec,
                        ctime_nsec,
                        ino,
                    },
                    segments,
                    racy,
                },
            );
        }
        r.finish()?;
        Ok(FileIndex {
            params: Some(params),
            entries,
        })
    }

    /// Loads an index; a missing, corrupt or differently-chunked index is an empty one.
    pub fn load(path: &Path, params: ChunkerParams) -> Self {
        let loaded = std::fs::read(path)
            .ok()
            .and_then(|bytes| FileIndex::decode(&bytes).ok());
        match loaded {
            Some(idx) if idx.params == Some(params) => idx,
            Some(_) => {
                tracing::info!(path = %path.display(), "index was built with other chunk sizes; ignoring it");
                FileIndex::new(params)
            }
            None => FileIndex::new(params),
        }
    }

    pub fn save(&self, path: &Path) -> io::Result<()> {
        crate::state::write_atomic(path, &self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkId;

    fn stat(ctime: i64) -> StatInfo {
        StatInfo {
            size: 5,
            mtime_sec: ctime - 10,
            ctime_sec: ctime,
            ino: 42,
            ..Default::default()
        }
    }

    #[test]
    fn racy_entries_are_not_recorded() {
        let mut idx = FileIndex::new(ChunkerParams::default());
        let p = RelPath::new(b"f".to_vec()).unwrap();
        let now = 1_000 * 1_000_000_000i128;
        idx.record(p.clone(), &stat(1_000), vec![], now);
        assert!(idx.lookup(&p, &stat(1_000)).is_none());
        assert!(
            idx.locate(&p, &stat(1_000)).is_some(),
            "racy entries still locate chunks"
        );
        idx.record(p.clone(), &stat(990), vec![], now);
        assert!(idx.lookup(&p, &stat(990)).is_some());
        assert!(idx.lookup(&p, &stat(991)).is_none());
    }

    #[test]
    fn settling_trusts_racy_records_whose_files_kept_their_stat() {
        let mut idx = FileIndex::new(ChunkerParams::default());
        let (kept, changed, gone) = (
            RelPath::new(b"kept".to_vec()).unwrap(),
            RelPath::new(b"changed".to_vec()).unwrap(),
            RelPath::new(b"gone".to_vec()).unwrap(),
        );
        let then = 1_000 * 1_000_000_000i128;
        for p in [&kept, &changed, &gone] {
            idx.record(p.clone(), &stat(1_000), vec![], then);
        }
        assert!(idx.lookup(&kept, &stat(1_000)).is_none(), "racy at first");
        let later = 1_002 * 1_000_000_000i128;
        idx.settle_racy(later, |p| match p.as_bytes() {
            b"kept" => Some(stat(1_000)),
            b"changed" => Some(stat(1_001)),
            _ => None,
        });
        assert!(idx.lookup(&kept, &stat(1_000)).is_some());
        assert!(idx.lookup(&changed, &stat(1_000)).is_none());
        assert!(idx.lookup(&changed, &stat(1_001)).is_none());
        assert!(idx.lookup(&gone, &stat(1_000)).is_none());
        // Settling too early leaves records racy.
        let mut early = FileIndex::new(ChunkerParams::default());
        early.record(kept.clone(), &stat(1_000), vec![], then);
        early.settle_racy(then, |_| Some(stat(1_000)));
        assert!(early.lookup(&kept, &stat(1_000)).is_none());
    }

    #[test]
    fn take_moves_a_trusted_record_out_and_leaves_the_rest() {
        let mut idx = FileIndex::new(ChunkerParams::default());
        let p = RelPath::new(b"f".to_vec()).unwrap();
        let segs = vec![Segment::Zero { len: 7 }];
        let now = 1_000 * 1_000_000_000i128;
        idx.record(p.clone(), &stat(990), segs.clone(), now);
        assert_eq!(idx.take(&p, &stat(991)), None, "changed stat: no record");
        assert_eq!(idx.take(&p, &stat(990)), Some(segs));
        assert_eq!(idx.take(&p, &stat(990)), None, "taken once");
        idx.record(p.clone(), &stat(1_000), vec![], now);
        assert_eq!(
            idx.take(&p, &stat(1_000)),
            None,
            "racy records are not trusted"
        );
    }

    #[test]
    fn the_racy_margin_follows_the_timestamp_resolution() {
        let now = 1_000 * 1_000_000_000i128;
        let at = |sec: i64, nsec: u32| Fingerprint {
            size: 1,
            mtime_sec: sec,
            mtime_nsec: nsec,
            ctime_sec: sec,
            ctime_nsec: nsec,
            ino: 1,
        };
        // Sub-second timestamps: 50 ms of margin.
        assert!(at(999, 960_000_000).is_racy(now));
        assert!(!at(999, 940_000_000).is_racy(now));
        // Whole seconds: a full second.
        assert!(at(999, 0).is_racy(now));
        assert!(!at(998, 0).is_racy(now));
    }

    #[test]
    fn round_trip() {
        let mut idx = FileIndex::new(ChunkerParams::default());
        let segs = vec![Segment::Chunk {
            id: ChunkId([3; 32]),
            len: 5,
        }];
        idx.record(
            RelPath::new(b"a/b".to_vec()).unwrap(),
            &stat(10),
            segs,
            i128::MAX / 2,
        );
        let back = FileIndex::decode(&idx.encode()).unwrap();
        assert_eq!(back.entries, idx.entries);
    }
}
