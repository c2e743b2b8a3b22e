//! The sender's side of a snapshot: walk the source, chunk what changed, emit entries in order.
//!
//! Scanning is a small pipeline: this thread walks the tree (cheap `stat`s) while worker threads
//! read, chunk and hash file contents; a reorder buffer puts results back into volume order
//! before they are emitted, so the manifest streams out while later files are still hashing.
//! Files whose fingerprint matches the sender's index are not read at all. The returned
//! [`SourceMap`] says where each chunk can be read back when the receiver asks for it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::chunk::{ChunkId, Chunker, ChunkerParams, Segment};
use crate::index::FileIndex;
use crate::manifest::{Entry, EntryKind, Meta, RelPath};
use crate::volume::sparse::SparseReader;
use crate::volume::walk::{Scanned, WalkError, WalkOptions, full_path, walk};
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

#[derive(Clone, Copy, Debug)]
struct Location {
    file: u32,
    offset: u64,
    len: u32,
}

/// Where each chunk of the snapshot lives in the source, to serve the receiver's wants.
#[derive(Debug)]
pub struct SourceMap {
    root: PathBuf,
    files: Vec<RelPath>,
    chunks: HashMap<ChunkId, Location>,
    open: Option<(u32, File)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("peer asked for chunk {0} which is not in the snapshot")]
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
}

impl SourceMap {
    pub fn new(root: &Path) -> Self {
        SourceMap {
            root: root.to_path_buf(),
            files: Vec::new(),
            chunks: HashMap::new(),
            open: None,
        }
    }

    /// Registers the chunks of a file entry as readable from `path`.
    pub fn add_file(&mut self, path: &RelPath, segments: &[Segment]) {
        let file = self.files.len() as u32;
        let mut offset = 0u64;
        let mut any = false;
        for seg in segments {
            if let Segment::Chunk { id, len } = *seg {
                self.chunks
                    .entry(id)
                    .or_insert(Location { file, offset, len });
                any = true;
            }
            offset += seg.len();
        }
        if any {
            self.files.push(path.clone());
        }
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(id)
    }

    /// True if the first occurrence of `id` in the snapshot is in the file `path` at `offset`.
    pub fn first_seen_at(&self, id: &ChunkId, path: &RelPath, offset: u64) -> bool {
        self.chunks
            .get(id)
            .is_some_and(|l| l.offset == offset && self.files[l.file as usize] == *path)
    }

    /// The length of a chunk in the snapshot (0 if it is not there).
    pub fn len_of(&self, id: &ChunkId) -> u64 {
        self.chunks.get(id).map_or(0, |l| u64::from(l.len))
    }

    /// Reads a chunk back from the source and checks it still has the same hash.
    pub fn read(&mut self, id: &ChunkId) -> Result<Vec<u8>, ServeError> {
        let loc = *self.chunks.get(id).ok_or(ServeError::Unknown(*id))?;
        let path = full_path(&self.root, &self.files[loc.file as usize]);
        if self.open.as_ref().map(|(f, _)| *f) != Some(loc.file) {
            let f = File::open(&path).map_err(|source| ServeError::Read {
                path: path.clone(),
                source,
            })?;
            self.open = Some((loc.file, f));
        }
        let Some((_, file)) = &self.open else {
            unreachable!("file opened above")
        };
        read_chunk(file, &path, loc.offset, loc.len, id)
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

/// Reads and chunks one file. Returns `None` if it vanished before it could be opened.
pub fn chunk_file(
    chunker: &mut Chunker,
    path: &Path,
    stat: &StatInfo,
) -> Result<Option<(u64, Vec<Segment>, u64)>, SnapshotError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SnapshotError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let size = if stat.file_type() == S_IFBLK {
        volume::volume_size(&file).map_err(|source| SnapshotError::Read {
            path: path.to_path_buf(),
            source,
        })?
    } else {
        stat.size
    };
    let mut reader = SparseReader::new(&file, size);
    let (segments, total) = chunker
        .segments(&mut reader, |_, _, _| Ok(()))
        .map_err(|source| SnapshotError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Some((total, segments, reader.bytes_read)))
}

struct Job {
    seq: u64,
    scanned: Scanned,
}

type Done = (u64, Result<Option<(Entry, u64)>, SnapshotError>);

/// Walks `root` and emits its entries in volume order.
///
/// `index` is consulted for unchanged files and refreshed with what was read; `emit` receives
/// every entry, with the source map that already holds its chunks, and may stop the scan by
/// returning an error.
pub fn scan_tree(
    root: &Path,
    opts: SnapshotOptions,
    index: &mut FileIndex,
    scan_start_ns: i128,
    emit: &mut dyn FnMut(Entry, &mut SourceMap) -> Result<(), String>,
) -> Result<(SourceMap, ScanStats), SnapshotError> {
    let mut map = SourceMap::new(root);
    let mut stats = ScanStats::default();
    let mut old_index = std::mem::replace(index, FileIndex::new(opts.chunker));
    let threads = opts.threads.max(1);
    let (job_tx, job_rx) = bounded::<Job>(threads * 4);
    let (done_tx, done_rx) = bounded::<Done>(1024);

    std::thread::scope(|scope| {
        for _ in 0..threads {
            let job_rx: Receiver<Job> = job_rx.clone();
            let done_tx: Sender<Done> = done_tx.clone();
            scope.spawn(move || {
                let mut chunker = Chunker::new(opts.chunker);
                for job in job_rx {
                    let full = full_path(root, &job.scanned.path);
                    let result = chunk_file(&mut chunker, &full, &job.scanned.stat).and_then(|r| {
                        r.map(|(size, segs, read)| {
                            entry_of(&job.scanned, root, Some((size, segs))).map(|e| (e, read))
                        })
                        .transpose()
                    });
                    if done_tx.send((job.seq, result)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        drop(job_rx);

        let mut pending: BTreeMap<u64, Option<(Entry, u64, StatInfo)>> = BTreeMap::new();
        let mut stats_of: HashMap<u64, StatInfo> = HashMap::new();
        let mut next_seq = 0u64;
        let mut next_emit = 0u64;
        let mut links: HashMap<(u64, u64), RelPath> = HashMap::new();

        // Emits every entry that is ready, in order.
        let mut flush = |pending: &mut BTreeMap<u64, Option<(Entry, u64, StatInfo)>>,
                         next_emit: &mut u64,
                         map: &mut SourceMap,
                         stats: &mut ScanStats,
                         index: &mut FileIndex|
         -> Result<(), SnapshotError> {
            while let Some(slot) = pending.remove(next_emit) {
                *next_emit += 1;
                let Some((entry, read, stat)) = slot else {
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
                    map.add_file(&entry.path, segments);
                    index.record(entry.path.clone(), &stat, segments.clone(), scan_start_ns);
                }
                emit(entry, map).map_err(SnapshotError::Emit)?;
            }
            Ok(())
        };

        let absorb = |(seq, result): Done,
                      pending: &mut BTreeMap<u64, Option<(Entry, u64, StatInfo)>>,
                      stats_of: &mut HashMap<u64, StatInfo>|
         -> Result<(), SnapshotError> {
            let stat = stats_of.remove(&seq).unwrap_or_default();
            pending.insert(seq, result?.map(|(e, read)| (e, read, stat)));
            Ok(())
        };

        let walked = walk(root, WalkOptions::default(), &mut |scanned| {
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
                pending.insert(seq, Some((entry, 0, st)));
            } else {
                if st.is_file() && st.nlink > 1 {
                    links.insert((st.dev, st.ino), scanned.path.clone());
                }
                let reuse = (st.is_file() && !opts.checksum)
                    .then(|| old_index.take(&scanned.path, &st))
                    .flatten();
                if let Some(segs) = reuse {
                    let entry = entry_of(&scanned, root, Some((st.size, segs)))
                        .map_err(|e| WalkError::Stopped(e.to_string()))?;
                    pending.insert(seq, Some((entry, 0, st)));
                } else if st.is_file() {
                    stats_of.insert(seq, st);
                    job_tx
                        .send(Job { seq, scanned })
                        .map_err(|_| WalkError::Stopped("hash workers stopped".into()))?;
                } else {
                    let entry = entry_of(&scanned, root, None)
                        .map_err(|e| WalkError::Stopped(e.to_string()))?;
                    pending.insert(seq, Some((entry, 0, st)));
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
                flush(&mut pending, &mut next_emit, &mut map, &mut stats, index)
                    .map_err(|e| WalkError::Stopped(e.to_string()))?;
            }
            flush(&mut pending, &mut next_emit, &mut map, &mut stats, index)
                .map_err(|e| WalkError::Stopped(e.to_string()))
        });
        drop(job_tx);
        walked?;
        for msg in done_rx.iter() {
            absorb(msg, &mut pending, &mut stats_of)?;
            flush(&mut pending, &mut next_emit, &mut map, &mut stats, index)?;
        }
        flush(&mut pending, &mut next_emit, &mut map, &mut stats, index)?;
        Ok((map, stats))
    })
}

/// Snapshots a block volume (disk image or block device) as a single root entry.
pub fn scan_block(
    path: &Path,
    opts: SnapshotOptions,
    index: &mut FileIndex,
    scan_start_ns: i128,
) -> Result<(Entry, SourceMap, ScanStats), SnapshotError> {
    let meta = std::fs::metadata(path).map_err(|source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let stat = StatInfo::from(&meta);
    let root = RelPath::root();
    // Block devices do not update mtime on write: never trust their index entry.
    let reusable = stat.is_file() && !opts.checksum;
    let (size, segments, read) = match reusable.then(|| index.lookup(&root, &stat)).flatten() {
        Some(segs) => (stat.size, segs.to_vec(), 0),
        None => {
            let mut chunker = Chunker::new(opts.chunker);
            chunk_file(&mut chunker, path, &stat)?.ok_or_else(|| SnapshotError::Read {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotFound, "volume vanished"),
            })?
        }
    };
    let mut fresh = FileIndex::new(opts.chunker);
    if stat.is_file() {
        fresh.record(root.clone(), &stat, segments.clone(), scan_start_ns);
    }
    *index = fresh;
    let mut map = SourceMap::new(path);
    map.add_file(&root, &segments);
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
    Ok((entry, map, stats))
}
