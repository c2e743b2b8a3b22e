//! The sender's side of a snapshot: walk the source, chunk what changed, emit entries in order.
//!
//! Scanning is a small pipeline: this thread walks the tree (cheap `stat`s) while worker threads
//! read, chunk and hash file contents; a reorder buffer puts results back into volume order
//! before they are emitted, so the manifest streams out while later files are still hashing.
//! Files whose fingerprint matches the sender's index are not read at all. Nothing here holds
//! the whole tree: the index is read and written as a stream in volume order, and chunks the
//! receiver asks for later are found again in the kept manifest ([`WantedChunks`]).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::chunk::{ChunkId, Chunker, ChunkerParams, Segment, parallel};
use crate::index::{IndexReader, IndexWriter, XattrsSeen};
use crate::manifest::store::StoredEntries;
use crate::manifest::{Entry, EntryKind, Meta, RelPath};
use crate::volume::sparse::{self, SparseReader};
use crate::volume::walk::{Scanned, WalkError, WalkOptions, full_path, walk_with};
use crate::volume::{
    self, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, S_IFSOCK, StatInfo,
};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: unsupported file type {mode:o}")]
    FileType { path: PathBuf, mode: u32 },
    #[error("{0}")]
    Emit(String),
}

#[derive(Clone, Copy, Debug)]
pub struct SnapshotOptions {
    pub chunker: ChunkerParams,
    /// Ignore the index: read every file (`--checksum`).
    pub checksum: bool,
    pub threads: usize,
    /// Hand small files' chunks to `emit` as cut ([`Contents`]): a streamed first sync sends
    /// them right after their entry, and need not read and hash them a second time.
    pub keep_contents: bool,
}

/// Files up to this size have their chunks kept from the cut to the send when
/// [`SnapshotOptions::keep_contents`] asks for it.
pub const KEEP_FILE_MAX: u64 = 1 << 20;

/// At most this many bytes of kept chunks are between the cut and the send at once; a file
/// that does not fit is read back at the send, as large files always are.
pub const KEEP_BUDGET: u64 = 8 << 20;

/// A small file's chunks (its non-zero segments, in order) as the scan cut and hashed them.
///
/// They are exactly the bytes the entry's chunk ids name, so sending them needs neither a
/// second read nor a second hash, and a file rewritten after its cut cannot send bytes that
/// differ from its entry. What they hold of [`KEEP_BUDGET`] is given back when they drop.
pub struct Contents<'a> {
    pub chunks: Vec<Vec<u8>>,
    _held: Reservation<'a>,
}

/// The bytes of kept chunks between the cut and the send, bounded by [`KEEP_BUDGET`].
#[derive(Default)]
struct KeepBudget {
    used: AtomicU64,
}

impl KeepBudget {
    fn reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= KEEP_BUDGET).then_some(used + bytes)
            })
            .ok()
            .map(|_| Reservation {
                budget: self,
                bytes,
            })
    }
}

/// A share of [`KEEP_BUDGET`], given back on drop.
struct Reservation<'a> {
    budget: &'a KeepBudget,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Counters of a scan.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanStats {
    pub entries: u64,
    pub files: u64,
    pub bytes_total: u64,
    /// Bytes actually read from the source (skips unchanged files and holes).
    pub bytes_read: u64,
    pub chunks_total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("peer asked for chunk {0}, which is not in the rest of the snapshot")]
    Unknown(ChunkId),
    #[error(
        "source changed during the sync: {path} (chunk {id} no longer matches); run the sync again"
    )]
    Changed { path: PathBuf, id: ChunkId },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot keep this sync's manifest in the state directory: {0}")]
    Spool(#[source] io::Error),
}

/// Reads chunks back from the source, checking each against its name, with the last file
/// opened kept open (chunks are asked for in volume order, so runs come from one file).
pub struct ChunkReader {
    root: PathBuf,
    open: Option<(RelPath, File)>,
}

impl ChunkReader {
    /// Reads below `root` (a tree), or `root` itself for the root path (a block volume).
    pub fn new(root: &Path) -> Self {
        ChunkReader {
            root: root.to_path_buf(),
            open: None,
        }
    }

    pub fn read(&mut self, at: &ChunkAt) -> Result<Vec<u8>, ServeError> {
        let path = full_path(&self.root, &at.path);
        let file = match &self.open {
            Some((p, f)) if *p == at.path => f,
            _ => {
                let f = File::open(&path).map_err(|source| ServeError::Read {
                    path: path.clone(),
                    source,
                })?;
                &self.open.insert((at.path.clone(), f)).1
            }
        };
        read_chunk(file, &path, at.offset, at.len, &at.id)
    }
}

/// Where a chunk of the snapshot is: a file and an offset in it.
#[derive(Clone, Debug)]
pub struct ChunkAt {
    pub id: ChunkId,
    pub path: RelPath,
    pub offset: u64,
    pub len: u32,
}

/// Finds the chunks a receiver wants in the snapshot's manifest, as kept on disk.
///
/// A receiver asks for each chunk where it first needs it from the wire, planning entries in
/// volume order, so its wants come in manifest order: one forward pass over the manifest finds
/// them all, and the sender holds no map of where every chunk is (that map was the larger part
/// of its memory on trees of many files).
pub struct WantedChunks<R> {
    entries: StoredEntries<R>,
    /// The file being searched: its path and segments, the next segment and its offset.
    file: Option<(RelPath, Vec<Segment>, usize, u64)>,
}

impl<R: Read> WantedChunks<R> {
    pub fn new(entries: StoredEntries<R>) -> Self {
        WantedChunks {
            entries,
            file: None,
        }
    }

    /// The next place at or after the last chunk found that holds `id`.
    pub fn locate(&mut self, id: &ChunkId) -> Result<ChunkAt, ServeError> {
        loop {
            if let Some((path, segments, next, offset)) = &mut self.file {
                while let Some(seg) = segments.get(*next) {
                    let here = *offset;
                    *next += 1;
                    *offset += seg.len();
                    if let Segment::Chunk { id: found, len } = *seg
                        && found == *id
                    {
                        return Ok(ChunkAt {
                            id: *id,
                            path: path.clone(),
                            offset: here,
                            len,
                        });
                    }
                }
            }
            let entry = self
                .entries
                .next()
                .ok_or(ServeError::Unknown(*id))?
                .map_err(ServeError::Spool)?;
            if let EntryKind::File { segments, .. } = entry.kind {
                self.file = Some((entry.path, segments, 0, 0));
            }
        }
    }
}

/// Reads the chunk `id` back from `file` (at `path`) and checks it still has that hash: the
/// source may have changed since it was scanned.
fn read_chunk(
    file: &File,
    path: &Path,
    offset: u64,
    len: u32,
    id: &ChunkId,
) -> Result<Vec<u8>, ServeError> {
    // Read into spare capacity (no zero-filling first); a short read means the file shrank.
    let mut buf = Vec::with_capacity(len as usize);
    let read_err = |source| ServeError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = file;
    reader.seek(io::SeekFrom::Start(offset)).map_err(read_err)?;
    reader
        .take(u64::from(len))
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() < len as usize || ChunkId::of(&buf) != *id {
        return Err(ServeError::Changed {
            path: path.to_path_buf(),
            id: *id,
        });
    }
    Ok(buf)
}

/// Builds the mirrored metadata of an entry.
pub fn meta_of(s: &Scanned) -> Meta {
    Meta {
        perm: s.stat.mode & 0o7777,
        uid: s.stat.uid,
        gid: s.stat.gid,
        mtime_sec: s.stat.mtime_sec,
        mtime_nsec: s.stat.mtime_nsec,
        xattrs: s.xattrs.clone(),
    }
}

/// The entry for a non-file (or a file whose segments are given).
pub fn entry_of(
    s: &Scanned,
    root: &Path,
    segments: Option<(u64, Vec<Segment>)>,
) -> Result<Entry, SnapshotError> {
    let kind = match s.stat.file_type() {
        S_IFDIR => EntryKind::Dir,
        S_IFREG => {
            let (size, segments) = segments.unwrap_or((0, Vec::new()));
            EntryKind::File { size, segments }
        }
        S_IFLNK => EntryKind::Symlink {
            target: s.link_target.clone().unwrap_or_default(),
        },
        S_IFIFO => EntryKind::Fifo,
        S_IFSOCK => EntryKind::Socket,
        S_IFCHR => EntryKind::CharDevice { rdev: s.stat.rdev },
        S_IFBLK => EntryKind::BlockDevice { rdev: s.stat.rdev },
        mode => {
            return Err(SnapshotError::FileType {
                path: full_path(root, &s.path),
                mode,
            });
        }
    };
    Ok(Entry {
        path: s.path.clone(),
        kind,
        meta: meta_of(s),
    })
}

/// Files at least this large are cut by several threads at once (when the scan has them):
/// one thread cuts and hashes ~500 MB/s, and a changed large file is read in full.
pub const PARALLEL_CUT_MIN: u64 = 32 << 20;

/// Reads and chunks one file, on up to `threads` threads if it is large. Returns `None` if
/// it vanished before it could be opened.
///
/// With `keep`, a file cut on this thread also has its chunks' bytes pushed there, as long
/// as they total at most `limit` bytes; past that (the file grew) nothing is kept.
pub fn chunk_file(
    chunker: &mut Chunker,
    threads: usize,
    path: &Path,
    stat: &StatInfo,
    keep: Option<(&mut Vec<Vec<u8>>, u64)>,
) -> Result<Option<(u64, Vec<Segment>, u64)>, SnapshotError> {
    let read_err = |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(read_err(source)),
    };
    let size = if stat.file_type() == S_IFBLK {
        volume::volume_size(&file).map_err(read_err)?
    } else {
        stat.size
    };
    if threads > 1 && size >= PARALLEL_CUT_MIN {
        let cut = parallel::segments_parallel(chunker.params(), size, threads, |start, end| {
            Ok(SparseReader::range(&file, start, end))
        })
        .map_err(read_err)?;
        // A file that shrank while being read is cut once more on this thread, which
        // records what it finds.
        if let Some(segments) = cut {
            let read = sparse::data_bytes(&file, size).map_err(read_err)?;
            return Ok(Some((size, segments, read)));
        }
    }
    let mut reader = SparseReader::new(&file, size);
    let (segments, total) = match keep {
        None => chunker.segments(&mut reader, |_, _, _| Ok(())),
        Some((kept, limit)) => {
            // `None` once the chunks outgrew `limit`: from then on nothing is kept.
            let mut room = Some(limit);
            chunker.segments(&mut reader, |_, data, _| {
                match room.and_then(|r| r.checked_sub(data.len() as u64)) {
                    Some(left) => {
                        room = Some(left);
                        kept.push(data.to_vec());
                    }
                    None => {
                        room = None;
                        kept.clear();
                    }
                }
                Ok(())
            })
        }
    }
    .map_err(read_err)?;
    Ok(Some((total, segments, reader.bytes_read)))
}

struct Job {
    seq: u64,
    scanned: Scanned,
}

/// A file the workers cut: its entry, the bytes read, and its chunks if kept.
struct Cut<'a> {
    entry: Entry,
    read: u64,
    contents: Option<Contents<'a>>,
}

type Done<'a> = (u64, Result<Option<Cut<'a>>, SnapshotError>);

/// An entry waiting for its turn to be emitted, with the stat its index record needs.
struct Ready<'a> {
    cut: Cut<'a>,
    stat: StatInfo,
}

/// Entries by sequence number, `None` for a file that vanished before it could be read.
type Pending<'a> = BTreeMap<u64, Option<Ready<'a>>>;

/// Puts a worker's result in its place in `pending`, with the stat the walk saw.
fn absorb<'a>(
    (seq, result): Done<'a>,
    pending: &mut Pending<'a>,
    stats_of: &mut HashMap<u64, StatInfo>,
) -> Result<(), SnapshotError> {
    let stat = stats_of.remove(&seq).unwrap_or_default();
    pending.insert(seq, result?.map(|cut| Ready { cut, stat }));
    Ok(())
}

impl Ready<'_> {
    /// An entry the scan did not read: not a file, a hard link, or a file the index vouches for.
    fn unread(entry: Entry, stat: StatInfo) -> Self {
        Ready {
            cut: Cut {
                entry,
                read: 0,
                contents: None,
            },
            stat,
        }
    }
}

/// Reads and chunks the file of `job`, keeping its chunks when `opts` asks and `budget`
/// has room.
fn cut_file<'a>(
    chunker: &mut Chunker,
    opts: SnapshotOptions,
    root: &Path,
    job: &Job,
    budget: &'a KeepBudget,
) -> Result<Option<Cut<'a>>, SnapshotError> {
    let threads = opts.threads.max(1);
    let stat = &job.scanned.stat;
    let held = (opts.keep_contents && stat.size <= KEEP_FILE_MAX)
        .then(|| budget.reserve(stat.size))
        .flatten();
    let mut kept = Vec::new();
    let keep = held.as_ref().map(|h| (&mut kept, h.bytes));
    let full = full_path(root, &job.scanned.path);
    let Some((size, segments, read)) = chunk_file(chunker, threads, &full, stat, keep)? else {
        return Ok(None);
    };
    let chunks = segments
        .iter()
        .filter(|s| matches!(s, Segment::Chunk { .. }))
        .count();
    let contents = held.filter(|_| kept.len() == chunks).map(|held| Contents {
        chunks: kept,
        _held: held,
    });
    let entry = entry_of(&job.scanned, root, Some((size, segments)))?;
    Ok(Some(Cut {
        entry,
        read,
        contents,
    }))
}

/// What [`scan_tree`] hands each entry to, in volume order; an error stops the scan.
pub type Emit<'e> = dyn for<'c> FnMut(Entry, Option<Contents<'c>>) -> Result<(), String> + 'e;

/// Walks `root` and emits its entries in volume order.
///
/// `reuse` (the last scan's index) is consulted for unchanged files, `record` receives every
/// file's chunk list; `emit` receives every entry (with its chunks when they were kept, see
/// [`SnapshotOptions::keep_contents`]) and may stop the scan by returning an error.
pub fn scan_tree(
    root: &Path,
    opts: SnapshotOptions,
    reuse: Option<&mut IndexReader>,
    mut record: Option<&mut IndexWriter>,
    emit: &mut Emit<'_>,
) -> Result<ScanStats, SnapshotError> {
    let mut stats = ScanStats::default();
    let threads = opts.threads.max(1);
    // Before the channels: the chunks in them hold shares of it.
    let budget = KeepBudget::default();
    let (job_tx, job_rx) = bounded::<Job>(threads * 4);
    let (done_tx, done_rx) = bounded::<Done>(1024);

    std::thread::scope(|scope| {
        for _ in 0..threads {
            let job_rx: Receiver<Job> = job_rx.clone();
            let done_tx: Sender<Done> = done_tx.clone();
            let budget = &budget;
            scope.spawn(move || {
                let mut chunker = Chunker::new(opts.chunker);
                for job in job_rx {
                    let result = cut_file(&mut chunker, opts, root, &job, budget);
                    if done_tx.send((job.seq, result)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        drop(job_rx);

        let mut pending: Pending = BTreeMap::new();
        let mut stats_of: HashMap<u64, StatInfo> = HashMap::new();
        let mut next_seq = 0u64;
        let mut next_emit = 0u64;
        let mut links: HashMap<(u64, u64), RelPath> = HashMap::new();

        // Emits every entry that is ready, in order.
        let mut flush = |pending: &mut Pending,
                         next_emit: &mut u64,
                         stats: &mut ScanStats|
         -> Result<(), SnapshotError> {
            while let Some(slot) = pending.remove(next_emit) {
                *next_emit += 1;
                let Some(Ready {
                    cut:
                        Cut {
                            entry,
                            read,
                            contents,
                        },
                    stat,
                }) = slot
                else {
                    continue;
                };
                stats.entries += 1;
                stats.bytes_read += read;
                if let EntryKind::File { size, segments } = &entry.kind {
                    stats.files += 1;
                    stats.bytes_total += size;
                    stats.chunks_total += segments
                        .iter()
                        .filter(|s| matches!(s, Segment::Chunk { .. }))
                        .count() as u64;
                    if let Some(index) = record.as_deref_mut() {
                        // The walk listed the attributes after taking `stat`, or the index
                        // vouched that there were none.
                        let xattrs = XattrsSeen::Listed(&entry.meta.xattrs);
                        index.record(&entry.path, &stat, xattrs, segments);
                    }
                }
                emit(entry, contents).map_err(SnapshotError::Emit)?;
            }
            Ok(())
        };

        // The walk asks the index for a file's attributes just before it visits the file,
        // which takes the file's chunk list: both in the walk's order.
        let reuse = RefCell::new(reuse);
        let mut known_xattrs = |path: &RelPath, st: &StatInfo| {
            let mut reuse = reuse.borrow_mut();
            let index = reuse.as_deref_mut().filter(|_| !opts.checksum)?;
            index.vouched_xattrs(path, st)
        };
        let walked = walk_with(
            root,
            WalkOptions::default(),
            &mut known_xattrs,
            &mut |scanned| {
                let seq = next_seq;
                next_seq += 1;
                let st = scanned.stat;
                let first_name = (st.is_file() && st.nlink > 1)
                    .then(|| links.get(&(st.dev, st.ino)).cloned())
                    .flatten();
                if let Some(first) = first_name {
                    let entry = Entry {
                        path: scanned.path.clone(),
                        kind: EntryKind::HardLink { target: first },
                        meta: Meta::default(),
                    };
                    pending.insert(seq, Some(Ready::unread(entry, st)));
                } else {
                    if st.is_file() && st.nlink > 1 {
                        links.insert((st.dev, st.ino), scanned.path.clone());
                    }
                    let reused = match reuse.borrow_mut().as_deref_mut() {
                        Some(index) if st.is_file() && !opts.checksum => {
                            index.take_trusted(&scanned.path, &st)
                        }
                        _ => None,
                    };
                    if let Some(segs) = reused {
                        let entry = entry_of(&scanned, root, Some((st.size, segs)))
                            .map_err(|e| WalkError::Stopped(e.to_string()))?;
                        pending.insert(seq, Some(Ready::unread(entry, st)));
                    } else if st.is_file() {
                        stats_of.insert(seq, st);
                        job_tx
                            .send(Job { seq, scanned })
                            .map_err(|_| WalkError::Stopped("hash workers stopped".into()))?;
                    } else {
                        let entry = entry_of(&scanned, root, None)
                            .map_err(|e| WalkError::Stopped(e.to_string()))?;
                        pending.insert(seq, Some(Ready::unread(entry, st)));
                    }
                }
                // Absorb finished work without blocking; block only when too far ahead.
                loop {
                    let msg = if next_seq - next_emit > 4096 {
                        done_rx.recv().ok()
                    } else {
                        done_rx.try_recv().ok()
                    };
                    let Some(msg) = msg else { break };
                    absorb(msg, &mut pending, &mut stats_of)
                        .map_err(|e| WalkError::Stopped(e.to_string()))?;
                    flush(&mut pending, &mut next_emit, &mut stats)
                        .map_err(|e| WalkError::Stopped(e.to_string()))?;
                }
                flush(&mut pending, &mut next_emit, &mut stats)
                    .map_err(|e| WalkError::Stopped(e.to_string()))
            },
        );
        drop(job_tx);
        walked?;
        for msg in done_rx.iter() {
            absorb(msg, &mut pending, &mut stats_of)?;
            flush(&mut pending, &mut next_emit, &mut stats)?;
        }
        flush(&mut pending, &mut next_emit, &mut stats)?;
        Ok(stats)
    })
}

/// Snapshots a block volume (disk image or block device) as a single root entry.
pub fn scan_block(
    path: &Path,
    opts: SnapshotOptions,
    reuse: Option<&mut IndexReader>,
    record: Option<&mut IndexWriter>,
) -> Result<(Entry, ScanStats), SnapshotError> {
    let meta = std::fs::metadata(path).map_err(|source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let stat = StatInfo::from(&meta);
    let root = RelPath::root();
    // Block devices do not update mtime on write: never trust their index entry.
    let reused = match reuse {
        Some(index) if stat.is_file() && !opts.checksum => index.take_trusted(&root, &stat),
        _ => None,
    };
    let (size, segments, read) = match reused {
        Some(segs) => (stat.size, segs, 0),
        None => {
            let mut chunker = Chunker::new(opts.chunker);
            chunk_file(&mut chunker, opts.threads, path, &stat, None)?.ok_or_else(|| {
                SnapshotError::Read {
                    path: path.to_path_buf(),
                    source: io::Error::new(io::ErrorKind::NotFound, "volume vanished"),
                }
            })?
        }
    };
    if let Some(index) = record
        && stat.is_file()
    {
        index.record(&root, &stat, XattrsSeen::Unknown, &segments);
    }
    let stats = ScanStats {
        entries: 1,
        files: 1,
        bytes_total: size,
        bytes_read: read,
        chunks_total: segments
            .iter()
            .filter(|s| matches!(s, Segment::Chunk { .. }))
            .count() as u64,
    };
    let entry = Entry {
        path: root,
        kind: EntryKind::File { size, segments },
        meta: Meta::default(),
    };
    Ok((entry, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{
        Header, Limits, MANIFEST_VERSION, VolumeMode, encode_entry, encode_header,
    };

    fn file(path: &str, chunks: &[(u8, u32)]) -> Entry {
        let segments: Vec<Segment> = chunks
            .iter()
            .map(|&(n, len)| Segment::Chunk {
                id: ChunkId([n; 32]),
                len,
            })
            .collect();
        Entry {
            path: RelPath::new(path.as_bytes().to_vec()).unwrap(),
            kind: EntryKind::File {
                size: segments.iter().map(Segment::len).sum(),
                segments,
            },
            meta: Meta::default(),
        }
    }

    #[test]
    fn wanted_chunks_are_found_going_forward_only() {
        let header = Header {
            version: MANIFEST_VERSION,
            mode: VolumeMode::Tree,
            chunker: ChunkerParams::default(),
        };
        let mut bytes = encode_header(&header);
        let root = Entry {
            path: RelPath::root(),
            kind: EntryKind::Dir,
            meta: Meta::default(),
        };
        for e in [
            root,
            file("a", &[(1, 10), (2, 20)]),
            file("b", &[(3, 30), (1, 10)]),
        ] {
            bytes.extend(encode_entry(&e));
        }
        let entries = StoredEntries::new(&bytes[..], Limits::default()).unwrap();
        let mut wanted = WantedChunks::new(entries);
        let at = |w: &mut WantedChunks<&[u8]>, n: u8| {
            w.locate(&ChunkId([n; 32]))
                .map(|at| (at.path.to_string(), at.offset, at.len))
        };
        assert_eq!(at(&mut wanted, 1).unwrap(), ("a".into(), 0, 10));
        // 2 is passed over: asked later, it is behind the search.
        assert_eq!(at(&mut wanted, 3).unwrap(), ("b".into(), 0, 30));
        assert_eq!(
            at(&mut wanted, 1).unwrap(),
            ("b".into(), 30, 10),
            "a later copy"
        );
        assert!(matches!(at(&mut wanted, 2), Err(ServeError::Unknown(_))));
        assert!(matches!(at(&mut wanted, 9), Err(ServeError::Unknown(_))));
    }

    /// A file as scanned: its path, its entry and its chunks if they were kept.
    type ScannedFile = (String, Entry, Option<Vec<Vec<u8>>>);

    /// Scans `root` with `keep_contents`, returning each file's path, entry and kept chunks.
    fn scan_keeping(root: &Path, keep: bool) -> Vec<ScannedFile> {
        let opts = SnapshotOptions {
            chunker: ChunkerParams::default(),
            checksum: true,
            threads: 2,
            keep_contents: keep,
        };
        let mut files = Vec::new();
        scan_tree(root, opts, None, None, &mut |entry, contents| {
            if matches!(entry.kind, EntryKind::File { .. }) {
                let chunks = contents.map(|c| c.chunks);
                files.push((entry.path.to_string(), entry, chunks));
            }
            Ok(())
        })
        .unwrap();
        files
    }

    #[test]
    fn small_files_keep_the_chunks_they_were_cut_into_and_large_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let noise = crate::demo::seeded_bytes;
        std::fs::write(root.join("one-chunk"), noise(1, 5000)).unwrap();
        std::fs::write(root.join("several-chunks"), noise(2, 700 << 10)).unwrap();
        // Data, a run of zeros (a zero segment has no bytes to keep), data.
        let mut gappy = noise(3, 100 << 10);
        gappy.extend(vec![0u8; 300 << 10]);
        gappy.extend(noise(4, 100 << 10));
        std::fs::write(root.join("with-zeros"), gappy).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(
            root.join("too-large"),
            noise(5, (KEEP_FILE_MAX + 1) as usize),
        )
        .unwrap();

        let files = scan_keeping(root, true);
        assert_eq!(files.len(), 5);
        for (name, entry, chunks) in &files {
            let on_disk = std::fs::read(root.join(name)).unwrap();
            if name == "too-large" {
                assert!(
                    chunks.is_none(),
                    "a file over KEEP_FILE_MAX is read back at the send"
                );
                continue;
            }
            let chunks = chunks
                .as_ref()
                .unwrap_or_else(|| panic!("{name} was not kept"));
            let mut kept = chunks.iter();
            let mut offset = 0usize;
            for seg in entry.segments() {
                if let Segment::Chunk { id, len } = *seg {
                    let data = kept.next().unwrap();
                    assert_eq!(
                        ChunkId::of(data),
                        id,
                        "{name}: a kept chunk is its id's bytes"
                    );
                    assert_eq!(&on_disk[offset..offset + len as usize], &data[..]);
                }
                offset += seg.len() as usize;
            }
            assert!(
                kept.next().is_none(),
                "{name}: one kept chunk per chunk segment"
            );
        }
        let several = files.iter().find(|f| f.0 == "several-chunks").unwrap();
        assert!(several.2.as_ref().unwrap().len() > 1);

        for (name, _, chunks) in scan_keeping(root, false) {
            assert!(chunks.is_none(), "{name} kept although nobody asked");
        }
    }

    #[test]
    fn the_keep_budget_is_a_bound_and_shares_come_back_when_dropped() {
        let budget = KeepBudget::default();
        let a = budget.reserve(KEEP_BUDGET - 10).unwrap();
        assert!(
            budget.reserve(11).is_none(),
            "past the budget nothing is kept"
        );
        let b = budget.reserve(10).unwrap();
        drop(a);
        let c = budget.reserve(KEEP_BUDGET - 10).unwrap();
        drop((b, c));
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
    }
}
