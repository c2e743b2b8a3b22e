//! The deterministic, versioned binary encoding of manifest headers and entries.
//!
//! Layout (all integers LEB128 varints unless noted, strings length-prefixed):
//! header = "RPLM" version:u32 mode:u8 chunk_min chunk_avg chunk_max
//! entry  = kind:u8 path [meta] body
//! meta   = perm uid gid mtime_sec:zigzag mtime_nsec xattr_count (name value)*
//! body   = file: size seg_count (0 id:32B len | 1 len)*; symlink: target;
//!          char/block device: rdev; hard link: target path (no meta); others: empty.
//! patch  = path meta size op_count (0 id:32B len | 1 len | 2 base_start base_count)*
//!          (delta sessions: a changed file described against the base entry's segments)
//! Decoding validates everything a peer could abuse: path safety, size limits, and that a
//! file's segments add up to its size.

use super::delta::{FilePatch, SegmentOp};
use super::{Entry, EntryKind, Header, MAX_NAME, MAX_PATH, Meta, RelPath, VolumeMode};
use crate::chunk::{ChunkId, ChunkerParams, Segment, push_segment};
use crate::codec::{DecodeError, Reader, Writer};

const MAGIC: &[u8; 4] = b"RPLM";

/// Decoder limits; the defaults are generous for real volumes and small enough to stop abuse.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_xattrs: usize,
    pub max_xattr_value: usize,
    pub max_segments: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_xattrs: 1024,
            max_xattr_value: 64 * 1024,
            max_segments: 1 << 24,
        }
    }
}

mod tag {
    pub const DIR: u8 = 0;
    pub const FILE: u8 = 1;
    pub const SYMLINK: u8 = 2;
    pub const FIFO: u8 = 3;
    pub const SOCKET: u8 = 4;
    pub const CHAR: u8 = 5;
    pub const BLOCK: u8 = 6;
    pub const HARDLINK: u8 = 7;
    pub const SEG_CHUNK: u8 = 0;
    pub const SEG_ZERO: u8 = 1;
    /// In a [`super::FilePatch`] only: a run of the base entry's segments.
    pub const SEG_BASE: u8 = 2;
}

pub fn encode_header(h: &Header) -> Vec<u8> {
    let mut w = Writer::new();
    w.raw(MAGIC);
    w.varint(u64::from(h.version));
    encode_mode(&mut w, h.mode);
    h.chunker.encode(&mut w);
    w.buf
}

/// A volume mode's byte (0 tree, 1 block), in a manifest header and a Hello.
pub fn encode_mode(w: &mut Writer, mode: VolumeMode) {
    w.u8(match mode {
        VolumeMode::Tree => 0,
        VolumeMode::Block => 1,
    });
}

pub fn decode_mode(r: &mut Reader<'_>) -> Result<VolumeMode, DecodeError> {
    match r.u8()? {
        0 => Ok(VolumeMode::Tree),
        1 => Ok(VolumeMode::Block),
        t => Err(DecodeError::UnknownTag {
            what: "volume mode",
            tag: u64::from(t),
        }),
    }
}

pub fn decode_header(r: &mut Reader<'_>) -> Result<Header, DecodeError> {
    if r.take(4)? != MAGIC {
        return Err(DecodeError::Invalid {
            what: "manifest header",
            why: "bad magic",
        });
    }
    let version = r.u32("manifest version")?;
    let mode = decode_mode(r)?;
    let chunker = ChunkerParams::decode(r)?;
    if chunker.validate().is_err() {
        return Err(DecodeError::Invalid {
            what: "manifest header",
            why: "chunk sizes out of range",
        });
    }
    Ok(Header {
        version,
        mode,
        chunker,
    })
}

pub fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut w = Writer::new();
    let t = match &e.kind {
        EntryKind::Dir => tag::DIR,
        EntryKind::File { .. } => tag::FILE,
        EntryKind::Symlink { .. } => tag::SYMLINK,
        EntryKind::Fifo => tag::FIFO,
        EntryKind::Socket => tag::SOCKET,
        EntryKind::CharDevice { .. } => tag::CHAR,
        EntryKind::BlockDevice { .. } => tag::BLOCK,
        EntryKind::HardLink { .. } => tag::HARDLINK,
    };
    w.u8(t);
    w.bytes(e.path.as_bytes());
    if !matches!(e.kind, EntryKind::HardLink { .. }) {
        encode_meta(&mut w, &e.meta);
    }
    match &e.kind {
        EntryKind::File { size, segments } => encode_file_body(&mut w, *size, segments),
        EntryKind::Symlink { target } => w.bytes(target),
        EntryKind::CharDevice { rdev } | EntryKind::BlockDevice { rdev } => w.varint(*rdev),
        EntryKind::HardLink { target } => w.bytes(target.as_bytes()),
        EntryKind::Dir | EntryKind::Fifo | EntryKind::Socket => {}
    }
    w.buf
}

/// A file's `size segment_count segment*` (also the quick-check index's record body).
pub fn encode_file_body(w: &mut Writer, size: u64, segments: &[Segment]) {
    w.varint(size);
    w.varint(segments.len() as u64);
    for s in segments {
        encode_segment(w, s);
    }
}

fn encode_meta(w: &mut Writer, m: &Meta) {
    w.varint(u64::from(m.perm));
    w.varint(u64::from(m.uid));
    w.varint(u64::from(m.gid));
    w.varint_signed(m.mtime_sec);
    w.varint(u64::from(m.mtime_nsec));
    encode_xattrs(w, &m.xattrs);
}

/// `count (name value)*`, as a manifest entry's attributes (and an index record's) are kept.
pub fn encode_xattrs(w: &mut Writer, xattrs: &[(Vec<u8>, Vec<u8>)]) {
    w.varint(xattrs.len() as u64);
    for (name, value) in xattrs {
        w.bytes(name);
        w.bytes(value);
    }
}

fn encode_segment(w: &mut Writer, s: &Segment) {
    match s {
        Segment::Chunk { id, len } => {
            w.u8(tag::SEG_CHUNK);
            w.hash(&id.0);
            w.varint(u64::from(*len));
        }
        Segment::Zero { len } => {
            w.u8(tag::SEG_ZERO);
            w.varint(*len);
        }
    }
}

/// `path meta size op_count op*`, op = `0 id len` (chunk) | `1 len` (zeros) |
/// `2 start count` (the base entry's segments `start..start+count`).
pub fn encode_patch(p: &FilePatch) -> Vec<u8> {
    let mut w = Writer::new();
    w.bytes(p.path.as_bytes());
    encode_meta(&mut w, &p.meta);
    w.varint(p.size);
    w.varint(p.ops.len() as u64);
    for op in &p.ops {
        match op {
            SegmentOp::New(s) => encode_segment(&mut w, s),
            SegmentOp::Base { start, count } => {
                w.u8(tag::SEG_BASE);
                w.varint(*start);
                w.varint(*count);
            }
        }
    }
    w.buf
}

/// Decodes a [`FilePatch`]; checking it against its base is [`FilePatch::apply`]'s job.
pub fn decode_patch(r: &mut Reader<'_>, limits: &Limits) -> Result<FilePatch, DecodeError> {
    let path = rel_path(r, "patch path")?;
    let meta = decode_meta(r, limits)?;
    let size = r.varint()?;
    let n = r.varint_max("patch op count", limits.max_segments as u64)? as usize;
    let mut ops = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let op = match r.u8()? {
            tag::SEG_BASE => SegmentOp::Base {
                start: r.varint_max("base segment", limits.max_segments as u64)?,
                count: r.varint_max("base segment count", limits.max_segments as u64)?,
            },
            t => SegmentOp::New(decode_segment(r, t)?),
        };
        ops.push(op);
    }
    Ok(FilePatch {
        path,
        meta,
        size,
        ops,
    })
}

fn decode_segment(r: &mut Reader<'_>, t: u8) -> Result<Segment, DecodeError> {
    let seg = match t {
        tag::SEG_CHUNK => {
            let id = ChunkId(r.hash()?);
            let len = r.varint_max("chunk length", u64::from(u32::MAX))? as u32;
            Segment::Chunk { id, len }
        }
        tag::SEG_ZERO => Segment::Zero { len: r.varint()? },
        t => {
            return Err(DecodeError::UnknownTag {
                what: "segment",
                tag: u64::from(t),
            });
        }
    };
    if seg.is_empty() {
        return Err(DecodeError::Invalid {
            what: "segment",
            why: "empty",
        });
    }
    Ok(seg)
}

fn decode_meta(r: &mut Reader<'_>, limits: &Limits) -> Result<Meta, DecodeError> {
    let meta = Meta {
        perm: r.varint_max("permission bits", 0o7777)? as u32,
        uid: r.u32("uid")?,
        gid: r.u32("gid")?,
        mtime_sec: r.varint_signed()?,
        mtime_nsec: r.varint_max("mtime nanoseconds", 999_999_999)? as u32,
        xattrs: decode_xattrs(r, limits)?,
    };
    Ok(meta)
}

/// What [`encode_xattrs`] wrote: names non-empty, without NUL, sorted and unique.
pub fn decode_xattrs(r: &mut Reader<'_>, limits: &Limits) -> Result<super::Xattrs, DecodeError> {
    let mut xattrs = Vec::new();
    let n = r.varint_max("xattr count", limits.max_xattrs as u64)? as usize;
    let mut last: Option<&[u8]> = None;
    for _ in 0..n {
        let name = r.bytes("xattr name", MAX_NAME)?;
        let value = r.bytes("xattr value", limits.max_xattr_value)?;
        if name.is_empty() || name.contains(&0) || last.is_some_and(|l| l >= name) {
            return Err(DecodeError::Invalid {
                what: "xattr list",
                why: "names must be non-empty, without NUL, sorted and unique",
            });
        }
        last = Some(name);
        xattrs.push((name.to_vec(), value.to_vec()));
    }
    Ok(xattrs)
}

/// A validated volume path (manifest entries, hard link targets, removed paths).
pub fn rel_path(r: &mut Reader<'_>, what: &'static str) -> Result<RelPath, DecodeError> {
    let bytes = r.bytes(what, MAX_PATH)?;
    RelPath::new(bytes.to_vec()).map_err(|e| DecodeError::Invalid { what, why: e.why })
}

/// Decodes one entry from the front of `r`.
pub fn decode_entry(r: &mut Reader<'_>, limits: &Limits) -> Result<Entry, DecodeError> {
    let t = r.u8()?;
    if t > tag::HARDLINK {
        return Err(DecodeError::UnknownTag {
            what: "entry kind",
            tag: u64::from(t),
        });
    }
    let path = rel_path(r, "entry path")?;
    let meta = if t == tag::HARDLINK {
        Meta::default()
    } else {
        decode_meta(r, limits)?
    };
    let kind = match t {
        tag::DIR => EntryKind::Dir,
        tag::FIFO => EntryKind::Fifo,
        tag::SOCKET => EntryKind::Socket,
        tag::CHAR => EntryKind::CharDevice { rdev: r.varint()? },
        tag::BLOCK => EntryKind::BlockDevice { rdev: r.varint()? },
        tag::SYMLINK => {
            let target = r.bytes("symlink target", MAX_PATH)?;
            if target.is_empty() || target.contains(&0) {
                return Err(DecodeError::Invalid {
                    what: "symlink target",
                    why: "empty or contains NUL",
                });
            }
            EntryKind::Symlink {
                target: target.to_vec(),
            }
        }
        tag::HARDLINK => EntryKind::HardLink {
            target: rel_path(r, "hard link target")?,
        },
        _ => {
            let (size, segments) = decode_file_body(r, limits)?;
            EntryKind::File { size, segments }
        }
    };
    if path.is_root() && !matches!(kind, EntryKind::Dir | EntryKind::File { .. }) {
        return Err(DecodeError::Invalid {
            what: "root entry",
            why: "must be a directory or a file",
        });
    }
    Ok(Entry { path, kind, meta })
}

/// Decodes what [`encode_file_body`] wrote: the size and the segments, which must add up to it.
pub fn decode_file_body(
    r: &mut Reader<'_>,
    limits: &Limits,
) -> Result<(u64, Vec<Segment>), DecodeError> {
    let size = r.varint()?;
    let n = r.varint_max("segment count", limits.max_segments as u64)? as usize;
    let mut segments = Vec::with_capacity(n.min(1024));
    let mut total = 0u64;
    for _ in 0..n {
        let t = r.u8()?;
        let seg = decode_segment(r, t)?;
        total = total.checked_add(seg.len()).ok_or(DecodeError::Invalid {
            what: "file",
            why: "segment lengths overflow",
        })?;
        let before = segments.len();
        push_segment(&mut segments, seg);
        if segments.len() == before {
            return Err(DecodeError::Invalid {
                what: "file",
                why: "adjacent zero segments must be merged",
            });
        }
    }
    if total != size {
        return Err(DecodeError::Invalid {
            what: "file",
            why: "segments do not add up to the size",
        });
    }
    Ok((size, segments))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(1u8..=255, 1..12).prop_filter("valid component", |n| {
            !n.contains(&b'/') && n != b"." && n != b".."
        })
    }

    pub fn arb_path() -> impl Strategy<Value = RelPath> {
        proptest::collection::vec(arb_name(), 0..4)
            .prop_map(|comps| RelPath::new(comps.join(&b'/')).expect("generated path is valid"))
    }

    fn arb_segments() -> impl Strategy<Value = Vec<Segment>> {
        proptest::collection::vec(
            prop_oneof![
                (any::<[u8; 32]>(), 1u32..100_000).prop_map(|(h, len)| Segment::Chunk {
                    id: ChunkId(h),
                    len
                }),
                (1u64..1 << 40).prop_map(|len| Segment::Zero { len }),
            ],
            0..8,
        )
        .prop_map(|segs| {
            let mut out = Vec::new();
            for s in segs {
                push_segment(&mut out, s);
            }
            out
        })
    }

    fn arb_meta() -> impl Strategy<Value = Meta> {
        (
            0u32..=0o7777,
            any::<u32>(),
            any::<u32>(),
            any::<i64>(),
            0u32..1_000_000_000,
            proptest::collection::btree_map(
                arb_name(),
                proptest::collection::vec(any::<u8>(), 0..20),
                0..3,
            ),
        )
            .prop_map(|(perm, uid, gid, mtime_sec, mtime_nsec, x)| Meta {
                perm,
                uid,
                gid,
                mtime_sec,
                mtime_nsec,
                xattrs: x.into_iter().collect(),
            })
    }

    pub fn arb_entry() -> impl Strategy<Value = Entry> {
        let kind = prop_oneof![
            Just(EntryKind::Dir),
            arb_segments().prop_map(|segments| EntryKind::File {
                size: segments.iter().map(Segment::len).sum(),
                segments
            }),
            arb_name().prop_map(|target| EntryKind::Symlink { target }),
            Just(EntryKind::Fifo),
            Just(EntryKind::Socket),
            any::<u64>().prop_map(|rdev| EntryKind::CharDevice { rdev }),
            any::<u64>().prop_map(|rdev| EntryKind::BlockDevice { rdev }),
            arb_path().prop_map(|target| EntryKind::HardLink { target }),
        ];
        (arb_path(), kind, arb_meta()).prop_map(|(path, kind, meta)| {
            let meta = if matches!(kind, EntryKind::HardLink { .. }) {
                Meta::default()
            } else {
                meta
            };
            let kind = if path.is_root() { EntryKind::Dir } else { kind };
            Entry { path, kind, meta }
        })
    }

    proptest! {
        #[test]
        fn entries_round_trip(e in arb_entry()) {
            let bytes = encode_entry(&e);
            let mut r = Reader::new(&bytes);
            let back = decode_entry(&mut r, &Limits::default()).unwrap();
            prop_assert!(r.finish().is_ok());
            prop_assert_eq!(back, e);
        }

        #[test]
        fn decoding_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_entry(&mut Reader::new(&data), &Limits::default());
            let _ = decode_header(&mut Reader::new(&data));
        }
    }

    #[test]
    fn traversal_paths_are_rejected() {
        let mut e = Entry {
            path: RelPath::new(b"ok".to_vec()).unwrap(),
            kind: EntryKind::Dir,
            meta: Meta::default(),
        };
        let mut bytes = encode_entry(&e);
        // Patch the path bytes "ok" into "..": same length, so the framing stays valid.
        let pos = bytes.windows(2).position(|w| w == b"ok").unwrap();
        bytes[pos..pos + 2].copy_from_slice(b"..");
        assert!(decode_entry(&mut Reader::new(&bytes), &Limits::default()).is_err());
        e.kind = EntryKind::File {
            size: 10,
            segments: vec![Segment::Zero { len: 9 }],
        };
        let bytes = encode_entry(&e);
        let err = decode_entry(&mut Reader::new(&bytes), &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("add up"), "{err}");
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            version: 1,
            mode: VolumeMode::Block,
            chunker: ChunkerParams::default(),
        };
        let bytes = encode_header(&h);
        assert_eq!(decode_header(&mut Reader::new(&bytes)).unwrap(), h);
    }
}
