//! The receiver's scratch files: what the prepare walk found, and every planned entry, each
//! kept on disk in volume order instead of in memory.
//!
//! A receiver goes over its entries several times (plan, write, commit, verify), and a
//! volume may hold millions of them; holding them all cost ~0.5 KB of memory per entry. Both
//! the walk and the manifest come in volume order, so each pass only needs to read a spool
//! front to back: memory is one read buffer per open reader, whatever the volume's size.
//!
//! A spool is an unnamed file in the destination's state directory (`O_TMPFILE`, or a name
//! removed at once): it disappears with the process, needs no cleanup and is never fsynced.
//! The encoding is private to this module and to one process; a record that does not decode
//! means the file was damaged under us, which is an I/O error.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::plan::{Loc, Plan, Src};
use super::readahead::ReadRun;
use crate::codec::{DecodeError, Reader, StreamDecoder, Writer};
use crate::manifest::{Entry, Limits, MAX_PATH, RelPath, decode_entry, encode_entry, rel_path};
use crate::volume::StatInfo;
use crate::volume::walk::Scanned;

/// A record kept in a spool.
pub trait Record: Sized {
    fn encode(&self, w: &mut Writer);
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

/// Records appended to an unnamed scratch file; read back from the start any number of times.
pub struct Spool<T> {
    out: BufWriter<File>,
    scratch: Writer,
    len: u64,
    _records: PhantomData<T>,
}

impl<T: Record> Spool<T> {
    /// An empty spool in `dir` (created if missing).
    pub fn create(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = tempfile::tempfile_in(dir)?;
        Ok(Spool {
            out: BufWriter::with_capacity(256 * 1024, file),
            scratch: Writer::new(),
            len: 0,
            _records: PhantomData,
        })
    }

    pub fn push(&mut self, record: &T) -> io::Result<()> {
        self.scratch.buf.clear();
        record.encode(&mut self.scratch);
        self.out.write_all(&self.scratch.buf)?;
        self.len += 1;
        Ok(())
    }

    /// Records pushed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Reads every record pushed so far, in order. The reader has its own position, so
    /// several may be open at once, and pushing may go on meanwhile.
    pub fn read(&mut self) -> io::Result<SpoolReader<T>> {
        self.out.flush()?;
        let file = self.out.get_ref().try_clone()?;
        Ok(SpoolReader {
            input: StreamDecoder::new(At { file, pos: 0 }),
            left: self.len,
            _records: PhantomData,
        })
    }
}

/// Reads a spool's records in the order they were pushed.
pub struct SpoolReader<T> {
    input: StreamDecoder<At>,
    /// Records still to come (the writer may have pushed more since this reader opened).
    left: u64,
    _records: PhantomData<T>,
}

impl<T: Record> SpoolReader<T> {
    /// The next record; `None` after the last one pushed when this reader was opened.
    pub fn next(&mut self) -> io::Result<Option<T>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        match self.input.next(T::decode)? {
            Some(r) => Ok(Some(r)),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "scratch file ends early",
            )),
        }
    }
}

/// A file read from an offset of its own (`pread`): clones of one descriptor share the
/// file position, readers of a spool must not.
struct At {
    file: File,
    pos: u64,
}

impl Read for At {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// No limit beyond the input's own length: spools hold only what this process wrote.
const ANY: usize = usize::MAX;

fn encode_stat(w: &mut Writer, s: &StatInfo) {
    for v in [
        u64::from(s.mode),
        u64::from(s.uid),
        u64::from(s.gid),
        s.size,
    ] {
        w.varint(v);
    }
    w.varint_signed(s.mtime_sec);
    w.varint(u64::from(s.mtime_nsec));
    w.varint_signed(s.ctime_sec);
    w.varint(u64::from(s.ctime_nsec));
    for v in [s.ino, s.dev, s.nlink, s.rdev] {
        w.varint(v);
    }
}

fn decode_stat(r: &mut Reader<'_>) -> Result<StatInfo, DecodeError> {
    Ok(StatInfo {
        mode: r.u32("mode")?,
        uid: r.u32("uid")?,
        gid: r.u32("gid")?,
        size: r.varint()?,
        mtime_sec: r.varint_signed()?,
        mtime_nsec: r.u32("mtime nanoseconds")?,
        ctime_sec: r.varint_signed()?,
        ctime_nsec: r.u32("ctime nanoseconds")?,
        ino: r.varint()?,
        dev: r.varint()?,
        nlink: r.varint()?,
        rdev: r.varint()?,
    })
}

/// Everything of a [`Scanned`] but its path.
fn encode_found(w: &mut Writer, s: &Scanned) {
    encode_stat(w, &s.stat);
    w.varint(s.xattrs.len() as u64);
    for (name, value) in &s.xattrs {
        w.bytes(name);
        w.bytes(value);
    }
    match &s.link_target {
        Some(t) => {
            w.u8(1);
            w.bytes(t);
        }
        None => w.u8(0),
    }
}

fn decode_found(r: &mut Reader<'_>, path: RelPath) -> Result<Scanned, DecodeError> {
    let stat = decode_stat(r)?;
    let n = r.varint_max("xattr count", ANY as u64)?;
    let mut xattrs = Vec::new();
    for _ in 0..n {
        let name = r.bytes("xattr name", ANY)?.to_vec();
        xattrs.push((name, r.bytes("xattr value", ANY)?.to_vec()));
    }
    let link_target = match r.u8()? {
        0 => None,
        _ => Some(r.bytes("symlink target", MAX_PATH)?.to_vec()),
    };
    Ok(Scanned {
        path,
        stat,
        xattrs,
        link_target,
    })
}

/// What the prepare walk found: one entry of the destination.
impl Record for Scanned {
    fn encode(&self, w: &mut Writer) {
        w.bytes(self.path.as_bytes());
        encode_found(w, self);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let path = rel_path(r, "path")?;
        decode_found(r, path)
    }
}

/// One step of the receiver's work, in volume order: a manifest entry with what the
/// destination held at its path and what to do, or a destination path the manifest lacks.
#[derive(Clone, Debug)]
pub enum Planned {
    Entry {
        entry: Entry,
        /// What the prepare walk found at the entry's path.
        have: Option<Scanned>,
        plan: Plan,
    },
    /// In the destination, not in the manifest: removed by the commit.
    Extra(Scanned),
}

mod tag {
    pub const ENTRY: u8 = 0;
    pub const EXTRA: u8 = 1;
    pub const KEEP: u8 = 0;
    pub const BUILD: u8 = 1;
    pub const LINK: u8 = 2;
    pub const SPECIAL: u8 = 3;
    pub const DIR: u8 = 4;
    pub const SRC_ZERO: u8 = 0;
    pub const SRC_IN_PLACE: u8 = 1;
    pub const SRC_LOCAL: u8 = 2;
    pub const SRC_CLONE: u8 = 3;
    pub const SRC_WIRE: u8 = 4;
}

fn encode_plan(w: &mut Writer, plan: &Plan) {
    match plan {
        Plan::Keep { meta } => {
            w.u8(tag::KEEP);
            w.u8(u8::from(*meta));
        }
        Plan::Build {
            sources,
            resume,
            patch,
        } => {
            w.u8(tag::BUILD);
            w.u8(u8::from(*resume) | u8::from(*patch) << 1);
            w.varint(sources.len() as u64);
            for src in sources {
                let (t, loc) = match src {
                    Src::Zero => (tag::SRC_ZERO, None),
                    Src::InPlace => (tag::SRC_IN_PLACE, None),
                    Src::Local(l) => (tag::SRC_LOCAL, Some(l)),
                    Src::Clone(l) => (tag::SRC_CLONE, Some(l)),
                    Src::Wire => (tag::SRC_WIRE, None),
                };
                w.u8(t);
                if let Some(l) = loc {
                    w.varint(u64::from(l.file));
                    w.varint(l.offset);
                }
            }
        }
        Plan::Link => w.u8(tag::LINK),
        Plan::Special => w.u8(tag::SPECIAL),
        Plan::Dir { create, replace } => {
            w.u8(tag::DIR);
            w.u8(u8::from(*create) | u8::from(*replace) << 1);
        }
    }
}

fn decode_plan(r: &mut Reader<'_>) -> Result<Plan, DecodeError> {
    let flag = |r: &mut Reader<'_>| -> Result<bool, DecodeError> { Ok(r.u8()? != 0) };
    Ok(match r.u8()? {
        tag::KEEP => Plan::Keep { meta: flag(r)? },
        tag::BUILD => {
            let bits = r.u8()?;
            let (resume, patch) = (bits & 1 != 0, bits & 2 != 0);
            let n = r.varint_max("source count", ANY as u64)?;
            let mut sources = Vec::new();
            for _ in 0..n {
                let loc = |r: &mut Reader<'_>| -> Result<Loc, DecodeError> {
                    Ok(Loc {
                        file: r.u32("file number")?,
                        offset: r.varint()?,
                    })
                };
                sources.push(match r.u8()? {
                    tag::SRC_ZERO => Src::Zero,
                    tag::SRC_IN_PLACE => Src::InPlace,
                    tag::SRC_LOCAL => Src::Local(loc(r)?),
                    tag::SRC_CLONE => Src::Clone(loc(r)?),
                    tag::SRC_WIRE => Src::Wire,
                    t => {
                        return Err(DecodeError::UnknownTag {
                            what: "chunk source",
                            tag: u64::from(t),
                        });
                    }
                });
            }
            Plan::Build {
                sources,
                resume,
                patch,
            }
        }
        tag::LINK => Plan::Link,
        tag::SPECIAL => Plan::Special,
        tag::DIR => {
            let bits = r.u8()?;
            Plan::Dir {
                create: bits & 1 != 0,
                replace: bits & 2 != 0,
            }
        }
        t => {
            return Err(DecodeError::UnknownTag {
                what: "plan",
                tag: u64::from(t),
            });
        }
    })
}

impl Record for Planned {
    fn encode(&self, w: &mut Writer) {
        match self {
            Planned::Entry { entry, have, plan } => {
                w.u8(tag::ENTRY);
                w.bytes(&encode_entry(entry));
                match have {
                    Some(s) => {
                        w.u8(1);
                        encode_found(w, s);
                    }
                    None => w.u8(0),
                }
                encode_plan(w, plan);
            }
            Planned::Extra(s) => {
                w.u8(tag::EXTRA);
                s.encode(w);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.u8()? {
            tag::ENTRY => {
                let encoded = r.bytes("entry", ANY)?;
                let limits = Limits {
                    max_xattrs: ANY,
                    max_xattr_value: ANY,
                    max_segments: ANY,
                };
                let entry = decode_entry(&mut Reader::new(encoded), &limits)?;
                let have = match r.u8()? {
                    0 => None,
                    _ => Some(decode_found(r, entry.path.clone())?),
                };
                let plan = decode_plan(r)?;
                Ok(Planned::Entry { entry, have, plan })
            }
            tag::EXTRA => Ok(Planned::Extra(Scanned::decode(r)?)),
            t => Err(DecodeError::UnknownTag {
                what: "spool record",
                tag: u64::from(t),
            }),
        }
    }
}

/// A range the write phase will read: its file's directory and name, offset and length.
impl Record for ReadRun {
    fn encode(&self, w: &mut Writer) {
        w.bytes(self.dir.as_bytes());
        w.bytes(&self.name);
        w.varint(self.offset);
        w.varint(self.len);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(ReadRun {
            dir: rel_path(r, "directory")?,
            name: r.bytes("file name", MAX_PATH)?.to_vec(),
            offset: r.varint()?,
            len: r.varint()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkId, Segment};
    use crate::manifest::{EntryKind, Meta};
    use proptest::prelude::*;

    fn arb_scanned() -> impl Strategy<Value = Scanned> {
        (
            crate::manifest::encode_tests::arb_path(),
            any::<(u32, u32, u32, u64, i64, u32, i64, u32)>(),
            any::<(u64, u64, u64, u64)>(),
            proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 1..8),
                    proptest::collection::vec(any::<u8>(), 0..8),
                ),
                0..3,
            ),
            proptest::option::of(proptest::collection::vec(1u8.., 1..16)),
        )
            .prop_map(|(path, a, b, xattrs, link_target)| Scanned {
                path,
                stat: StatInfo {
                    mode: a.0,
                    uid: a.1,
                    gid: a.2,
                    size: a.3,
                    mtime_sec: a.4,
                    mtime_nsec: a.5,
                    ctime_sec: a.6,
                    ctime_nsec: a.7,
                    ino: b.0,
                    dev: b.1,
                    nlink: b.2,
                    rdev: b.3,
                },
                xattrs,
                link_target,
            })
    }

    fn arb_plan() -> impl Strategy<Value = Plan> {
        let loc = (any::<u32>(), any::<u64>()).prop_map(|(file, offset)| Loc { file, offset });
        let src = prop_oneof![
            Just(Src::Zero),
            Just(Src::InPlace),
            Just(Src::Wire),
            loc.clone().prop_map(Src::Local),
            loc.prop_map(Src::Clone),
        ];
        prop_oneof![
            any::<bool>().prop_map(|meta| Plan::Keep { meta }),
            (proptest::collection::vec(src, 0..6), any::<(bool, bool)>()).prop_map(
                |(sources, (resume, patch))| Plan::Build {
                    sources,
                    resume,
                    patch
                }
            ),
            Just(Plan::Link),
            Just(Plan::Special),
            any::<(bool, bool)>().prop_map(|(create, replace)| Plan::Dir { create, replace }),
        ]
    }

    fn same_scanned(a: &Scanned, b: &Scanned) -> bool {
        a.path == b.path
            && a.stat == b.stat
            && a.xattrs == b.xattrs
            && a.link_target == b.link_target
    }

    proptest! {
        /// A damaged record is an error, never a panic.
        #[test]
        fn garbage_does_not_decode_into_a_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            crate::apply::decode_scratch_records(&data);
        }

        /// Read-ahead ranges read back as pushed.
        #[test]
        fn read_runs_read_back_as_pushed(
            runs in proptest::collection::vec(
                (crate::manifest::encode_tests::arb_entry(),
                 proptest::collection::vec(any::<u8>(), 1..40), any::<u64>(), any::<u64>())
                    .prop_map(|(e, name, offset, len)| ReadRun { dir: e.path, name, offset, len }),
                0..20,
            )
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut spool = Spool::create(dir.path()).unwrap();
            for r in &runs {
                spool.push(r).unwrap();
            }
            let mut reader = spool.read().unwrap();
            for want in &runs {
                prop_assert_eq!(&reader.next().unwrap().unwrap(), want);
            }
            prop_assert!(reader.next().unwrap().is_none());
        }

        /// Whatever is pushed reads back the same, in order, from every reader.
        #[test]
        fn planned_records_read_back_as_pushed(
            records in proptest::collection::vec(
                prop_oneof![
                    (crate::manifest::encode_tests::arb_entry(),
                     proptest::option::of(arb_scanned()), arb_plan())
                        .prop_map(|(entry, have, plan)| {
                            let have = have.map(|h| Scanned { path: entry.path.clone(), ..h });
                            Planned::Entry { entry, have, plan }
                        }),
                    arb_scanned().prop_map(Planned::Extra),
                ],
                0..20,
            )
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut spool = Spool::create(dir.path()).unwrap();
            for r in &records {
                spool.push(r).unwrap();
            }
            for _ in 0..2 {
                let mut reader = spool.read().unwrap();
                for want in &records {
                    let got = reader.next().unwrap().unwrap();
                    match (want, &got) {
                        (
                            Planned::Entry { entry: e1, have: h1, plan: p1 },
                            Planned::Entry { entry: e2, have: h2, plan: p2 },
                        ) => {
                            prop_assert_eq!(e1, e2);
                            prop_assert_eq!(p1, p2);
                            prop_assert_eq!(h1.is_some(), h2.is_some());
                            if let (Some(a), Some(b)) = (h1, h2) {
                                prop_assert!(same_scanned(a, b));
                            }
                        }
                        (Planned::Extra(a), Planned::Extra(b)) => prop_assert!(same_scanned(a, b)),
                        _ => prop_assert!(false, "record kinds differ"),
                    }
                }
                prop_assert!(reader.next().unwrap().is_none());
            }
        }
    }

    #[test]
    fn a_reader_sees_what_was_pushed_before_it_opened_and_the_spool_file_has_no_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(dir.path()).unwrap();
        let entry = |p: &[u8]| Planned::Entry {
            entry: Entry {
                path: RelPath::new(p.to_vec()).unwrap(),
                kind: EntryKind::File {
                    size: 5,
                    segments: vec![Segment::Chunk {
                        id: ChunkId::of(b"hello"),
                        len: 5,
                    }],
                },
                meta: Meta::default(),
            },
            have: None,
            plan: Plan::Build {
                sources: vec![Src::Wire],
                resume: false,
                patch: false,
            },
        };
        spool.push(&entry(b"a")).unwrap();
        let mut early = spool.read().unwrap();
        spool.push(&entry(b"b")).unwrap();
        assert!(early.next().unwrap().is_some());
        assert!(early.next().unwrap().is_none(), "opened before b");
        let mut late = spool.read().unwrap();
        assert!(late.next().unwrap().is_some());
        match late.next().unwrap() {
            Some(Planned::Entry { entry, .. }) => assert_eq!(entry.path.as_bytes(), b"b"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(spool.len(), 2);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "a spool leaves no file behind"
        );
    }
}
