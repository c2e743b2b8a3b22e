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
//! be re-read on the next sync. [`IndexEntry::vouches`] ignores racy entries, so the
//! next sync reads such a file again; [`IndexEntry::locates`] still offers them as places where
//! a chunk may be found, which is safe because every chunk read from such a place is verified.
//!
//! A record also keeps the file's extended attributes as the scan listed them
//! ([`XattrsSeen`]). Setting or removing an attribute stamps the file's ctime, so while a
//! file's fingerprint is unchanged and its record not racy, the walk need not list them
//! again ([`IndexEntry::vouched_xattrs`]): a sixth of a cold walk's time in a sync that
//! changes little, and more where every file has attributes (SELinux labels). Linux's
//! filesystems all stamp the ctime so (the quick-check already trusts it for content); on a
//! source where that cannot be relied on, `--checksum` makes the sender list every file's
//! attributes again, as it re-reads every file.
//!
//! The file holds records in volume order, an end mark and a BLAKE3 checksum. Syncs read it
//! ([`IndexReader`]) and write it ([`IndexWriter`]) as streams, in step with the walk or the
//! manifest, so neither end holds it whole; [`FileIndex`] is the whole index in memory, for
//! tests and tools.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use crate::chunk::{ChunkerParams, Segment};
use crate::codec::{DecodeError, Reader, StreamDecoder, Writer};
use crate::manifest::{self, Limits, RelPath, Xattrs};
use crate::state::PendingFile;
use crate::volume::StatInfo;

/// Timestamps within this much of the scan start are not trusted, on filesystems whose
/// timestamps have whole seconds (or coarser clocks).
pub const RACY_MARGIN_COARSE_NS: i128 = 1_000_000_000;
/// The same on filesystems with sub-second timestamps.
pub const RACY_MARGIN_FINE_NS: i128 = 50_000_000;

const MAGIC: &[u8; 4] = b"RPLI";
/// Version 2: records in volume order with an end mark, so the file can be written and read
/// as a stream. Version 3: records keep the attributes they listed. Version 4: the head names
/// the boot the index was written in ([`this_boot`]). Versions 2 and 3 are still read, as
/// written before this boot; an index of another version is ignored (the next scan reads
/// every file once).
const VERSION: u64 = 4;
const VERSION_3: u64 = 3;
const VERSION_2: u64 = 2;

/// This boot of the host (16 bytes of a hash of the kernel's boot id).
///
/// A record written before the host last started vouches for nothing: a power cut can leave
/// a file holding bytes written just before it under the stat the record has, because data
/// can reach the disk before the journal records the file's new times (`fdatasync`,
/// write-back, the first half of an `fsync`). A database replaying its log after the cut
/// leaves pages already on disk alone, so their times stay old too. Such records are read as
/// racy: the next scan reads the file, and chunks found through it are verified as always.
/// `REPLICATOR_BOOT_ID` stands in for the kernel's id (tests play a reboot with it). Where
/// neither can be read, every boot looks the same and records are trusted as before.
pub fn this_boot() -> [u8; 16] {
    static BOOT: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        let id = std::env::var("REPLICATOR_BOOT_ID")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok())
            .unwrap_or_default();
        let mut boot = [0u8; 16];
        boot.copy_from_slice(&blake3::hash(id.trim().as_bytes()).as_bytes()[..16]);
        boot
    })
}

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

/// What the scan that records a file saw of its extended attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrsSeen<'a> {
    /// Listed after the recorded stat was taken (or vouched for by the record before).
    Listed(&'a [(Vec<u8>, Vec<u8>)]),
    /// Not listed: the next walk lists them.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub fingerprint: Fingerprint,
    pub segments: Vec<Segment>,
    /// Recorded too close to the file's last change to vouch for its content.
    pub racy: bool,
    /// The file's extended attributes when recorded, if they were listed.
    pub xattrs: Option<Xattrs>,
}

impl IndexEntry {
    /// True if `stat` shows the file unchanged since this record and the record may be trusted
    /// (it is not racy): its content is this chunk list without reading it.
    pub fn vouches(&self, stat: &StatInfo) -> bool {
        !self.racy && self.locates(stat)
    }

    /// True if `stat` shows the file unchanged, racy or not: where chunks probably are
    /// (callers verify what they read).
    pub fn locates(&self, stat: &StatInfo) -> bool {
        self.fingerprint == Fingerprint::from(stat)
    }

    /// What the recording scan saw of the file's attributes.
    pub fn xattrs_seen(&self) -> XattrsSeen<'_> {
        match &self.xattrs {
            Some(x) => XattrsSeen::Listed(x),
            None => XattrsSeen::Unknown,
        }
    }

    /// The file's extended attributes without listing them, if this record lists them and
    /// its ctime, which every attribute change stamps, is unchanged since (and the record is
    /// not racy, so a change in the same tick cannot hide).
    pub fn vouched_xattrs(&self, stat: &StatInfo) -> Option<&[(Vec<u8>, Vec<u8>)]> {
        self.vouches(stat)
            .then_some(self.xattrs.as_deref())
            .flatten()
    }
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
        let e = self.entries.get(path)?;
        e.vouches(stat).then_some(&e.segments[..])
    }

    /// The recorded chunk list of `path` if `stat` is unchanged, racy or not: where chunks
    /// probably are (callers verify what they read).
    pub fn locate(&self, path: &RelPath, stat: &StatInfo) -> Option<&[Segment]> {
        let e = self.entries.get(path)?;
        e.locates(stat).then_some(&e.segments[..])
    }

    /// Records a file; marks it racy if its stat is too close to `scan_start_ns`.
    pub fn record(
        &mut self,
        path: RelPath,
        stat: &StatInfo,
        xattrs: XattrsSeen<'_>,
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
                xattrs: match xattrs {
                    XattrsSeen::Listed(x) => Some(x.to_vec()),
                    XattrsSeen::Unknown => None,
                },
            },
        );
    }

    /// The whole index as [`IndexWriter`] writes it: records in volume order, then the end.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        encode_head(&mut w, self.params.unwrap_or_default());
        let mut paths: Vec<&RelPath> = self.entries.keys().collect();
        paths.sort();
        for path in &paths {
            let e = &self.entries[*path];
            encode_record(
                &mut w,
                path,
                &e.fingerprint,
                e.racy,
                e.xattrs_seen(),
                &e.segments,
            );
        }
        w.u8(TAG_END);
        w.varint(paths.len() as u64);
        let sum = blake3::hash(&w.buf);
        w.hash(sum.as_bytes());
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let body = checked_body(bytes)?;
        let mut r = Reader::new(body);
        let head = decode_head(&mut r)?;
        let mut entries = PathMap::default();
        loop {
            match decode_item(&mut r, head.version)? {
                Item::Record(path, mut e) => {
                    e.racy |= head.earlier_boot;
                    entries.insert(path, e);
                }
                Item::End(n) if n == entries.len() as u64 => break,
                Item::End(_) => {
                    return Err(DecodeError::Invalid {
                        what: "index",
                        why: "record count differs from the end mark",
                    });
                }
            }
        }
        r.finish()?;
        Ok(FileIndex {
            params: Some(head.params),
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

/// One item of an index file: a record, or the end mark with the number of records.
enum Item {
    Record(RelPath, IndexEntry),
    End(u64),
}

const TAG_END: u8 = 0;
const TAG_RECORD: u8 = 1;

/// The file without its last 32 bytes, if those are the BLAKE3 hash of the rest: an index is
/// a cache, but a damaged one would name wrong chunks for unchanged files.
fn checked_body(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    let split = bytes.len().saturating_sub(32);
    let (body, sum) = bytes.split_at(split);
    if sum.len() < 32 || blake3::hash(body).as_bytes()[..] != *sum {
        return Err(DecodeError::Invalid {
            what: "index",
            why: "checksum does not match",
        });
    }
    Ok(body)
}

/// Checks an index file's checksum in one pass over it, then rewinds it for reading.
fn check_file(file: &mut File) -> io::Result<bool> {
    let len = file.metadata()?.len();
    let Some(body) = len.checked_sub(32) else {
        return Ok(false);
    };
    let mut hasher = blake3::Hasher::new();
    io::copy(&mut (&mut *file).take(body), &mut hasher)?;
    let mut sum = [0u8; 32];
    file.read_exact(&mut sum)?;
    file.seek(io::SeekFrom::Start(0))?;
    Ok(*hasher.finalize().as_bytes() == sum)
}

fn encode_head(w: &mut Writer, p: ChunkerParams) {
    w.raw(MAGIC);
    w.varint(VERSION);
    w.raw(&this_boot());
    p.encode(w);
}

/// What the head of an index says.
struct Head {
    /// The format version (2 to 4).
    version: u64,
    /// Written before this boot (or by a version that did not say): no record vouches.
    earlier_boot: bool,
    params: ChunkerParams,
}

fn decode_head(r: &mut Reader<'_>) -> Result<Head, DecodeError> {
    let magic = r.take(4)?;
    let version = r.varint()?;
    if magic != MAGIC || ![VERSION, VERSION_3, VERSION_2].contains(&version) {
        return Err(DecodeError::Invalid {
            what: "index",
            why: "unknown format",
        });
    }
    let earlier_boot = version < VERSION || r.take(16)? != this_boot();
    Ok(Head {
        version,
        earlier_boot,
        params: ChunkerParams::decode(r)?,
    })
}

/// A record's flag: too close to the file's last change to vouch for it.
const FLAG_RACY: u8 = 1;
/// A record's flag: the attributes the scan listed follow. (In version 2: the file had none.)
const FLAG_XATTRS: u8 = 2;

/// `1 path mtime_sec mtime_nsec ctime_sec ctime_nsec ino flags [xattrs] size segment_count
/// segment*` (the attributes, size and segments as a manifest's file entry has them).
fn encode_record(
    w: &mut Writer,
    path: &RelPath,
    f: &Fingerprint,
    racy: bool,
    xattrs: XattrsSeen<'_>,
    segments: &[Segment],
) {
    w.u8(TAG_RECORD);
    w.bytes(path.as_bytes());
    w.varint_signed(f.mtime_sec);
    w.varint(u64::from(f.mtime_nsec));
    w.varint_signed(f.ctime_sec);
    w.varint(u64::from(f.ctime_nsec));
    w.varint(f.ino);
    let racy = if racy { FLAG_RACY } else { 0 };
    match xattrs {
        XattrsSeen::Listed(x) => {
            w.u8(racy | FLAG_XATTRS);
            manifest::encode_xattrs(w, x);
        }
        XattrsSeen::Unknown => w.u8(racy),
    }
    manifest::encode_file_body(w, f.size, segments);
}

fn decode_item(r: &mut Reader<'_>, version: u64) -> Result<Item, DecodeError> {
    match r.u8()? {
        TAG_END => return Ok(Item::End(r.varint()?)),
        TAG_RECORD => {}
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "index item",
                tag: u64::from(tag),
            });
        }
    }
    let path = manifest::rel_path(r, "index path")?;
    let mtime_sec = r.varint_signed()?;
    let mtime_nsec = r.u32("mtime nsec")?;
    let ctime_sec = r.varint_signed()?;
    let ctime_nsec = r.u32("ctime nsec")?;
    let ino = r.varint()?;
    let flags = r.u8()?;
    let (racy, xattrs) = if version == VERSION_2 {
        // Its second flag said "no attributes"; any other made the record racy.
        let none = flags & FLAG_XATTRS != 0;
        (flags & !FLAG_XATTRS != 0, none.then(Vec::new))
    } else if flags & !(FLAG_RACY | FLAG_XATTRS) != 0 {
        return Err(DecodeError::UnknownTag {
            what: "index record flags",
            tag: u64::from(flags),
        });
    } else {
        let xattrs = if flags & FLAG_XATTRS != 0 {
            Some(manifest::decode_xattrs(r, &Limits::default())?)
        } else {
            None
        };
        (flags & FLAG_RACY != 0, xattrs)
    };
    let (size, segments) = manifest::decode_file_body(r, &Limits::default())?;
    let fingerprint = Fingerprint {
        size,
        mtime_sec,
        mtime_nsec,
        ctime_sec,
        ctime_nsec,
        ino,
    };
    Ok(Item::Record(
        path,
        IndexEntry {
            fingerprint,
            segments,
            racy,
            xattrs,
        },
    ))
}

/// An index file read one record at a time, in volume order. The sender's scan walks in the
/// same order, so it consults the last scan's records without holding them: memory is one read
/// buffer whatever the number of files.
pub struct IndexReader {
    input: StreamDecoder<File>,
    /// The next record not yet asked for.
    ahead: Option<(RelPath, IndexEntry)>,
    ended: bool,
    /// Records decoded so far.
    read: u64,
    /// The file's format version.
    version: u64,
    /// Written before this boot: every record is read as racy ([`this_boot`]).
    earlier_boot: bool,
}

/// Every record, in volume order.
impl Iterator for IndexReader {
    type Item = (RelPath, IndexEntry);

    fn next(&mut self) -> Option<(RelPath, IndexEntry)> {
        self.ahead.take().or_else(|| self.read_next())
    }
}

impl IndexReader {
    /// Opens the index at `path`; `None` if there is none usable (missing, another format,
    /// other chunk sizes): then every file is read.
    pub fn open(path: &Path, params: ChunkerParams) -> Option<Self> {
        let mut file = File::open(path).ok()?;
        let mut head = [0u8; 64];
        let n = file.read(&mut head).ok()?;
        if decode_head(&mut Reader::new(&head[..n])).is_err() {
            tracing::info!(path = %path.display(), "quick-check index of another version; reading every file once");
            return None;
        }
        file.rewind().ok()?;
        if !check_file(&mut file).unwrap_or(false) {
            tracing::warn!(path = %path.display(), "quick-check index is damaged; ignoring it");
            return None;
        }
        let mut input = StreamDecoder::new(file);
        match input.next(decode_head) {
            Ok(Some(head)) if head.params == params => {
                if head.earlier_boot {
                    tracing::debug!(path = %path.display(), "quick-check index written before this boot");
                }
                Some(IndexReader {
                    input,
                    ahead: None,
                    ended: false,
                    read: 0,
                    version: head.version,
                    earlier_boot: head.earlier_boot,
                })
            }
            Ok(Some(_)) => {
                tracing::info!(path = %path.display(), "index was built with other chunk sizes; ignoring it");
                None
            }
            _ => None,
        }
    }

    /// Written before this boot (or by an older version): no record vouches for its file.
    pub fn written_before_this_boot(&self) -> bool {
        self.earlier_boot
    }

    /// The record of `path`, if there is one. Paths must come in volume order: records before
    /// `path` are passed over for good.
    pub fn get(&mut self, path: &RelPath) -> Option<&IndexEntry> {
        loop {
            match &self.ahead {
                Some((p, _)) if p > path => return None,
                Some((p, _)) if p == path => return self.ahead.as_ref().map(|(_, e)| e),
                _ => {
                    self.ahead = self.read_next();
                    self.ahead.as_ref()?;
                }
            }
        }
    }

    /// Like [`FileIndex::lookup`], moving the chunk list out: the chunk list recorded for
    /// `path` if `stat` shows the file unchanged and the record is not racy (paths in volume
    /// order, as for [`IndexReader::get`]).
    pub fn take_trusted(&mut self, path: &RelPath, stat: &StatInfo) -> Option<Vec<Segment>> {
        self.get(path)?;
        let (_, e) = self.ahead.take()?;
        e.vouches(stat).then_some(e.segments)
    }

    /// The attributes recorded for `path` if its record vouches for the file `stat` shows
    /// ([`IndexEntry::vouched_xattrs`]; paths in volume order, as for [`IndexReader::get`]):
    /// what a walk takes instead of listing them.
    pub fn vouched_xattrs(&mut self, path: &RelPath, stat: &StatInfo) -> Option<Xattrs> {
        self.get(path)?.vouched_xattrs(stat).map(<[_]>::to_vec)
    }

    /// The number of records in the whole index (reading what is left of it).
    pub fn count_all(&mut self) -> u64 {
        while self.read_next().is_some() {}
        self.read
    }

    fn read_next(&mut self) -> Option<(RelPath, IndexEntry)> {
        if self.ended {
            return None;
        }
        let version = self.version;
        match self.input.next(|r| decode_item(r, version)) {
            Ok(Some(Item::Record(p, mut e))) => {
                self.read += 1;
                e.racy |= self.earlier_boot;
                Some((p, e))
            }
            Ok(Some(Item::End(_)) | None) => {
                self.ended = true;
                None
            }
            Err(e) => {
                // A damaged index only costs re-reading the files it no longer describes.
                tracing::warn!("quick-check index is damaged, ignoring the rest: {e}");
                self.ended = true;
                None
            }
        }
    }
}

/// Writes an index record by record, in volume order, as a scan produces them;
/// [`IndexWriter::finish`] puts it under its final name (after fsync). Dropped unfinished, it
/// removes its temp file.
pub struct IndexWriter {
    file: PendingFile,
    path: PathBuf,
    scan_start_ns: i128,
    records: u64,
    /// The first write error: later records are dropped and `finish` reports it.
    failed: Option<io::Error>,
    scratch: Writer,
    /// Of everything written, for the checksum at the end.
    hasher: blake3::Hasher,
    racy: u64,
}

impl IndexWriter {
    /// Starts the index of a scan that began at `scan_start_ns` (the racy rule's reference).
    pub fn create(path: &Path, params: ChunkerParams, scan_start_ns: i128) -> io::Result<Self> {
        let mut file = PendingFile::create(path)?;
        let mut head = Writer::new();
        encode_head(&mut head, params);
        file.write_all(&head.buf)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head.buf);
        Ok(IndexWriter {
            hasher,
            racy: 0,
            file,
            path: path.to_path_buf(),
            scan_start_ns,
            records: 0,
            failed: None,
            scratch: Writer::new(),
        })
    }

    /// Records a file (paths in volume order); racy if its stat is too close to the scan start.
    pub fn record(
        &mut self,
        path: &RelPath,
        stat: &StatInfo,
        xattrs: XattrsSeen<'_>,
        segments: &[Segment],
    ) {
        self.record_seen_at(path, stat, xattrs, segments, self.scan_start_ns);
    }

    /// Like [`IndexWriter::record`] for a stat taken at `seen_at` rather than at the start.
    pub fn record_seen_at(
        &mut self,
        path: &RelPath,
        stat: &StatInfo,
        xattrs: XattrsSeen<'_>,
        segments: &[Segment],
        seen_at: i128,
    ) {
        let fingerprint = Fingerprint::from(stat);
        let racy = fingerprint.is_racy(seen_at);
        self.write(path, &fingerprint, racy, xattrs, segments);
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Racy records written: files too recently changed to vouch for, worth a second look
    /// once the racy margin has passed ([`settle_racy`]).
    pub fn racy(&self) -> u64 {
        self.racy
    }

    fn write(
        &mut self,
        path: &RelPath,
        fingerprint: &Fingerprint,
        racy: bool,
        xattrs: XattrsSeen<'_>,
        segments: &[Segment],
    ) {
        if self.failed.is_some() {
            return;
        }
        self.racy += u64::from(racy);
        self.scratch.buf.clear();
        encode_record(&mut self.scratch, path, fingerprint, racy, xattrs, segments);
        self.hasher.update(&self.scratch.buf);
        match self.file.write_all(&self.scratch.buf) {
            Ok(()) => self.records += 1,
            Err(e) => self.failed = Some(e),
        }
    }

    /// Ends the index, makes it durable and puts it under its final name.
    pub fn finish(mut self) -> io::Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut end = Writer::new();
        end.u8(TAG_END);
        end.varint(self.records);
        self.hasher.update(&end.buf);
        end.hash(self.hasher.finalize().as_bytes());
        self.file.write_all(&end.buf)?;
        self.file.commit(&self.path, true)
    }
}

/// Rewrites the index at `path` after a second look at its racy records, once the racy margin
/// has passed since their files last changed: a file still showing the recorded stat is
/// recorded as seen at `scan_start_ns` (taken before any `stat_of` call); a changed or
/// vanished one stays racy. The receiver does this for the files it has just written, so the
/// next sync can trust them without reading them.
pub fn settle_racy(
    path: &Path,
    params: ChunkerParams,
    scan_start_ns: i128,
    stat_of: impl Fn(&RelPath) -> Option<StatInfo>,
) -> io::Result<()> {
    let Some(old) = IndexReader::open(path, params) else {
        return Ok(());
    };
    let mut new = IndexWriter::create(path, params, scan_start_ns)?;
    for (p, e) in old {
        match stat_of(&p).filter(|s| e.racy && e.locates(s)) {
            // The receiver wrote the file and set its attributes itself: what it recorded of
            // them holds as its content does.
            Some(stat) => new.record(&p, &stat, e.xattrs_seen(), &e.segments),
            None => new.write(&p, &e.fingerprint, e.racy, e.xattrs_seen(), &e.segments),
        }
    }
    new.finish()
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
        idx.record(p.clone(), &stat(1_000), XattrsSeen::Unknown, vec![], now);
        assert!(idx.lookup(&p, &stat(1_000)).is_none());
        assert!(
            idx.locate(&p, &stat(1_000)).is_some(),
            "racy entries still locate chunks"
        );
        idx.record(p.clone(), &stat(990), XattrsSeen::Unknown, vec![], now);
        assert!(idx.lookup(&p, &stat(990)).is_some());
        assert!(idx.lookup(&p, &stat(991)).is_none());
    }

    #[test]
    fn records_written_before_this_boot_do_not_vouch() {
        let mut idx = FileIndex::new(ChunkerParams::default());
        let p = path("f");
        let now = 1_000 * 1_000_000_000i128;
        idx.record(p.clone(), &stat(990), XattrsSeen::Unknown, segs(1), now);
        let bytes = idx.encode();
        let read = FileIndex::decode(&bytes).unwrap();
        assert!(
            read.lookup(&p, &stat(990)).is_some(),
            "written in this boot"
        );
        // The same index written in another boot: its id follows the magic and version.
        let mut other = bytes[..bytes.len() - 32].to_vec();
        other[5] ^= 1;
        let sum = blake3::hash(&other);
        other.extend_from_slice(sum.as_bytes());
        let read = FileIndex::decode(&other).unwrap();
        assert!(
            read.lookup(&p, &stat(990)).is_none(),
            "written in another boot"
        );
        assert!(
            read.locate(&p, &stat(990)).is_some(),
            "its records still say where chunks may be"
        );
    }

    #[test]
    fn settling_trusts_racy_records_whose_files_kept_their_stat() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("index");
        let params = ChunkerParams::default();
        let (kept, changed, gone) = (path("kept"), path("changed"), path("gone"));
        let then = 1_000 * 1_000_000_000i128;
        let write = || {
            let mut w = IndexWriter::create(&file, params, then).unwrap();
            for p in [&changed, &gone, &kept] {
                w.record(p, &stat(1_000), XattrsSeen::Unknown, &segs(1));
            }
            assert_eq!(w.racy(), 3);
            w.finish().unwrap();
        };
        write();
        let load = || FileIndex::load(&file, params);
        assert!(
            load().lookup(&kept, &stat(1_000)).is_none(),
            "racy at first"
        );
        let later = 1_002 * 1_000_000_000i128;
        settle_racy(&file, params, later, |p| match p.as_bytes() {
            b"kept" => Some(stat(1_000)),
            b"changed" => Some(stat(1_001)),
            _ => None,
        })
        .unwrap();
        let settled = load();
        assert_eq!(settled.entries.len(), 3);
        assert!(settled.lookup(&kept, &stat(1_000)).is_some());
        assert!(settled.lookup(&changed, &stat(1_000)).is_none());
        assert!(settled.lookup(&changed, &stat(1_001)).is_none());
        assert!(settled.lookup(&gone, &stat(1_000)).is_none());
        // Settling too early leaves records racy.
        write();
        settle_racy(&file, params, then, |_| Some(stat(1_000))).unwrap();
        assert!(load().lookup(&kept, &stat(1_000)).is_none());
    }

    fn path(p: &str) -> RelPath {
        RelPath::new(p.as_bytes().to_vec()).unwrap()
    }

    /// A version 2 record with `flags`, as the build before version 3 wrote it, decoded.
    fn version_2_record(flags: u8) -> Result<IndexEntry, DecodeError> {
        let mut w = Writer::new();
        let f = Fingerprint::from(&stat(990));
        encode_record(&mut w, &path("f"), &f, false, XattrsSeen::Unknown, &segs(1));
        let flag_at = w.buf.len() - 37; // before the size, the count (a byte each), a chunk (34)
        assert_eq!(w.buf[flag_at], 0);
        w.buf[flag_at] = flags;
        match decode_item(&mut Reader::new(&w.buf), VERSION_2)? {
            Item::Record(_, e) => Ok(e),
            Item::End(_) => panic!("not a record"),
        }
    }

    #[test]
    fn a_record_vouches_for_its_attributes_only_while_its_stat_holds_and_it_is_not_racy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("index");
        let params = ChunkerParams::default();
        let then = 1_000 * 1_000_000_000i128;
        let label = vec![(
            b"security.selinux".to_vec(),
            b"system_u:object_r:x_t:s0".to_vec(),
        )];
        let mut w = IndexWriter::create(&file, params, then).unwrap();
        w.record(&path("bare"), &stat(990), XattrsSeen::Listed(&[]), &segs(1));
        w.record(
            &path("labelled"),
            &stat(990),
            XattrsSeen::Listed(&label),
            &segs(2),
        );
        w.record(&path("unlisted"), &stat(990), XattrsSeen::Unknown, &segs(3));
        w.record(
            &path("fresh"),
            &stat(1_000),
            XattrsSeen::Listed(&label),
            &segs(4),
        );
        w.finish().unwrap();
        let load = || FileIndex::load(&file, params);
        let idx = load();
        let vouched =
            |p: &str, st: StatInfo| idx.entries[&path(p)].vouched_xattrs(&st).map(<[_]>::to_vec);
        assert_eq!(vouched("bare", stat(990)), Some(vec![]));
        assert_eq!(vouched("labelled", stat(990)), Some(label.clone()));
        assert_eq!(vouched("labelled", stat(991)), None, "ctime moved");
        assert_eq!(vouched("unlisted", stat(990)), None);
        assert_eq!(vouched("fresh", stat(1_000)), None, "racy");
        // Settled, a racy record keeps what it saw of the attributes.
        settle_racy(&file, params, then + 2_000_000_000, |_| Some(stat(1_000))).unwrap();
        let settled = load();
        let fresh = &settled.entries[&path("fresh")];
        assert_eq!(fresh.vouched_xattrs(&stat(1_000)), Some(&label[..]));
        assert_eq!(settled.entries[&path("unlisted")].xattrs, None);
    }

    /// A version 2 record (this build's predecessor) is still read: flag 2 said "no
    /// attributes", and any other flag made it racy. Version 3 refuses flags it does not know
    /// (what follows them is unknown too) and rejects a badly ordered attribute list.
    #[test]
    fn record_flags_of_both_versions_are_read_conservatively() {
        let e = version_2_record(0).unwrap();
        assert!(!e.racy && e.xattrs.is_none());
        let e = version_2_record(FLAG_RACY).unwrap();
        assert!(e.racy && e.xattrs.is_none());
        let e = version_2_record(FLAG_XATTRS).unwrap();
        assert!(!e.racy && e.xattrs == Some(vec![]));
        let e = version_2_record(FLAG_XATTRS | 4).unwrap();
        assert!(e.racy, "unknown flag");
        assert_eq!(e.vouched_xattrs(&stat(990)), None);

        let mut w = Writer::new();
        let f = Fingerprint::from(&stat(990));
        let unsorted = vec![(b"user.b".to_vec(), vec![]), (b"user.a".to_vec(), vec![])];
        encode_record(
            &mut w,
            &path("f"),
            &f,
            false,
            XattrsSeen::Listed(&unsorted),
            &segs(1),
        );
        assert!(decode_item(&mut Reader::new(&w.buf), VERSION).is_err());
        let mut w = Writer::new();
        encode_record(&mut w, &path("f"), &f, false, XattrsSeen::Unknown, &segs(1));
        let flag_at = w.buf.len() - 37;
        assert_eq!(w.buf[flag_at], 0);
        w.buf[flag_at] = 4;
        assert!(decode_item(&mut Reader::new(&w.buf), VERSION).is_err());
    }

    fn segs(n: u8) -> Vec<Segment> {
        vec![Segment::Chunk {
            id: ChunkId([n; 32]),
            len: 5,
        }]
    }

    #[test]
    fn a_streamed_index_answers_in_volume_order_and_skips_what_it_passed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("index");
        let now = 1_000 * 1_000_000_000i128;
        let mut w = IndexWriter::create(&file, ChunkerParams::default(), now).unwrap();
        w.record(&path("a"), &stat(990), XattrsSeen::Unknown, &segs(1));
        w.record(&path("a/b"), &stat(990), XattrsSeen::Unknown, &segs(2));
        w.record(&path("a.x"), &stat(1_000), XattrsSeen::Unknown, &segs(3)); // racy
        w.record(&path("c"), &stat(990), XattrsSeen::Unknown, &segs(4));
        w.record(&path("d"), &stat(990), XattrsSeen::Unknown, &segs(5));
        w.finish().unwrap();

        let mut r = IndexReader::open(&file, ChunkerParams::default()).unwrap();
        assert_eq!(r.take_trusted(&path("a"), &stat(990)), Some(segs(1)));
        assert_eq!(
            r.take_trusted(&path("a/b"), &stat(991)),
            None,
            "changed stat"
        );
        assert_eq!(r.take_trusted(&path("a.x"), &stat(1_000)), None, "racy");
        assert_eq!(
            r.take_trusted(&path("b"), &stat(990)),
            None,
            "never recorded"
        );
        assert_eq!(
            r.take_trusted(&path("d"), &stat(990)),
            Some(segs(5)),
            "c passed over"
        );
        assert_eq!(
            r.take_trusted(&path("c"), &stat(990)),
            None,
            "behind the reader now"
        );
        assert_eq!(r.take_trusted(&path("e"), &stat(990)), None);

        // The same file loads whole for the receiver, and an index it saves streams back.
        let whole = FileIndex::load(&file, ChunkerParams::default());
        assert_eq!(whole.entries.len(), 5);
        assert_eq!(whole.locate(&path("a.x"), &stat(1_000)), Some(&segs(3)[..]));
        whole.save(&file).unwrap();
        let mut again = IndexReader::open(&file, ChunkerParams::default()).unwrap();
        assert_eq!(again.take_trusted(&path("c"), &stat(990)), Some(segs(4)));
        let other = ChunkerParams {
            avg: ChunkerParams::default().avg * 2,
            ..ChunkerParams::default()
        };
        assert!(
            IndexReader::open(&file, other).is_none(),
            "other chunk sizes"
        );
    }

    #[test]
    fn an_unfinished_or_damaged_index_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("index");
        let now = 1_000 * 1_000_000_000i128;
        let mut w = IndexWriter::create(&file, ChunkerParams::default(), now).unwrap();
        w.record(&path("a"), &stat(990), XattrsSeen::Unknown, &segs(1));
        drop(w);
        assert!(
            !file.exists(),
            "dropped unfinished: nothing under the final name"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temp left"
        );

        let mut w = IndexWriter::create(&file, ChunkerParams::default(), now).unwrap();
        w.record(&path("a"), &stat(990), XattrsSeen::Unknown, &segs(1));
        w.record(&path("b"), &stat(990), XattrsSeen::Unknown, &segs(2));
        w.finish().unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let n = bytes.len();
        bytes[n - 40] ^= 0xff; // a chunk id in the last record
        std::fs::write(&file, &bytes).unwrap();
        assert!(IndexReader::open(&file, ChunkerParams::default()).is_none());
        assert!(FileIndex::decode(&bytes).is_err());
        assert!(
            FileIndex::load(&file, ChunkerParams::default())
                .entries
                .is_empty()
        );
        bytes[n - 10] ^= 0xff;
        bytes.truncate(n - 3);
        std::fs::write(&file, &bytes).unwrap();
        assert!(
            IndexReader::open(&file, ChunkerParams::default()).is_none(),
            "cut short"
        );
    }

    proptest::proptest! {
        #[test]
        fn written_records_read_back_in_order(
            names in proptest::collection::btree_set("[a-c]{1,3}(/[a-c]{1,2})?", 0..30),
            asked in proptest::collection::vec(proptest::bool::ANY, 30),
            bare in proptest::collection::vec(proptest::bool::ANY, 30),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("index");
            let mut paths: Vec<RelPath> = names.iter().map(|n| path(n)).collect();
            paths.sort();
            let mut w = IndexWriter::create(&file, ChunkerParams::default(), i128::MAX / 2).unwrap();
            for (i, p) in paths.iter().enumerate() {
                let xattrs = if bare[i] { XattrsSeen::Listed(&[]) } else { XattrsSeen::Unknown };
                w.record(p, &stat(10), xattrs, &segs(i as u8));
            }
            w.finish().unwrap();
            let whole = FileIndex::load(&file, ChunkerParams::default());
            proptest::prop_assert_eq!(whole.entries.len(), paths.len());
            let mut r = IndexReader::open(&file, ChunkerParams::default()).unwrap();
            for (i, p) in paths.iter().enumerate() {
                if asked[i] {
                    let vouched = r.get(p).map(|e| e.vouched_xattrs(&stat(10)).is_some());
                    proptest::prop_assert_eq!(vouched, Some(bare[i]));
                    proptest::prop_assert_eq!(r.take_trusted(p, &stat(10)), Some(segs(i as u8)));
                }
            }
        }
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
            XattrsSeen::Unknown,
            segs,
            i128::MAX / 2,
        );
        let back = FileIndex::decode(&idx.encode()).unwrap();
        assert_eq!(back.entries, idx.entries);
    }
}
