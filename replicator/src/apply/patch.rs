//! Patching a large file at its final name (`sync --inplace`): the commit writes only what
//! changed.
//!
//! Rebuilding a 10 GiB database file under a temp name to change 4 MiB of it writes and
//! syncs 10 GiB, and in a migration's final delta the application is down meanwhile. When
//! patching is asked for, a file the receiver index vouches for (one name, at least
//! [`MIN_SIZE`], at most half of it changed) is built as usual under its temp name, except
//! that the temp file holds only the ranges that differ, at their offsets (sparse), each
//! chunk verified as for any build. The commit copies those ranges over the file at its final
//! name, zeroes its new holes, sets its size and attributes, and removes the temp file.
//!
//! The trade, and why it is asked for, as rsync's `--inplace` is: from the first range the
//! commit copies until the commit's sync, the file under its final name is part old, part new.
//! A crash there leaves it so, with the destination marked *incomplete*; the rerun finds the
//! file no longer matches its index record, checks it chunk by chunk and finishes it. Failing
//! before the commit (a bad chunk, a lost connection, a refused manifest) leaves it untouched,
//! as for any build. A migration's destination, which nothing uses until the move is over, is
//! the natural user.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use rustix::fs::{self as rfs, Mode, OFlags};

use super::fsops::{self, os, temp_name};
use super::plan::{Src, offsets};
use crate::chunk::Segment;
use crate::manifest::Meta;
use crate::volume::StatInfo;
use crate::volume::walk::Scanned;

/// Smallest file patched: below it a rebuild costs little, and keeps the file whole.
pub const MIN_SIZE: u64 = 1 << 20;

/// Whether the file the destination has (`have`) may be patched into one of `size` bytes:
/// a regular file with one name (a patch would reach every name), both sizes at least
/// [`MIN_SIZE`], that this process may open for writing as it is.
pub fn worth_patching(have: &Scanned, size: u64) -> bool {
    let s = &have.stat;
    s.is_file()
        && s.nlink == 1
        && s.size >= MIN_SIZE
        && size >= MIN_SIZE
        && writable(s, rustix::process::geteuid().as_raw())
}

/// Whether a process of `euid` may open the file for writing: root may, its owner if its
/// mode lets the owner write. A rebuild needs neither (its temp file is its own), so a
/// read-only file is rebuilt rather than failing the commit.
fn writable(s: &StatInfo, euid: u32) -> bool {
    euid == 0 || (s.uid == euid && s.mode & 0o200 != 0)
}

/// Whether a patch leaves the file's bytes at this source as they are: a [`Src::Clone`]
/// of the old file is planned only at the same offset, for a chunk the index says is there.
pub fn keeps(src: &Src) -> bool {
    matches!(src, Src::Clone(_))
}

/// Whether a patch writes this segment: data, not a hole, and not kept.
fn writes(seg: &Segment, src: &Src) -> bool {
    matches!(seg, Segment::Chunk { .. }) && !keeps(src)
}

/// Bytes of a file's data that a patch writes: all but what it keeps and its holes.
pub fn changed_bytes(segments: &[Segment], sources: &[Src]) -> u64 {
    segments
        .iter()
        .zip(sources)
        .filter(|(seg, src)| writes(seg, src))
        .map(|(seg, _)| seg.len())
        .sum()
}

/// The ranges a patch copies from the temp file, contiguous ones merged.
fn copied_runs(segments: &[Segment], sources: &[Src]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for ((off, seg), src) in offsets(segments).zip(sources) {
        if !writes(seg, src) {
            continue;
        }
        match runs.last_mut() {
            Some((at, len)) if *at + *len == off => *len += seg.len(),
            _ => runs.push((off, seg.len())),
        }
    }
    runs
}

/// Copies the changed ranges of `name` in directory `d` from its temp file into it, zeroes
/// its holes, sets its size and attributes, and removes the temp file. `was` is the file
/// the walk found: a file of another inode under that name (replaced during the sync) is
/// refused, not patched. Returns the patched file, to be made durable.
pub fn apply(
    d: &OwnedFd,
    name: &[u8],
    segments: &[Segment],
    sources: &[Src],
    meta: &Meta,
    was: &StatInfo,
) -> io::Result<File> {
    let temp = temp_name(name);
    let open = |name: &[u8], flags: OFlags| -> io::Result<File> {
        let fd = rfs::openat(
            d,
            os(name),
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    };
    let from = open(&temp, OFlags::RDONLY)?;
    let to = open(name, OFlags::WRONLY)?;
    let now = rfs::fstat(&to)?;
    if now.st_dev != was.dev || now.st_ino != was.ino {
        return Err(io::Error::other(
            "replaced by another file during the sync; not patched",
        ));
    }
    for (off, len) in copied_runs(segments, sources) {
        fsops::copy_range(&from, off, &to, off, len)?;
        crate::crashpoint::reached("patch");
    }
    for (off, seg) in offsets(segments) {
        if let Segment::Zero { len } = seg {
            fsops::zero_range(&to, off, *len)?;
        }
    }
    to.set_len(segments.iter().map(Segment::len).sum())?;
    fsops::apply_meta_fd(&to, meta)?;
    rfs::unlinkat(d, os(&temp), rfs::AtFlags::empty())?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::plan::Loc;
    use crate::chunk::ChunkId;

    #[test]
    fn only_files_this_process_may_open_for_writing_are_patched() {
        let stat = |uid, mode| StatInfo {
            uid,
            mode: 0o100_000u32 | mode,
            ..StatInfo::default()
        };
        assert!(writable(&stat(1000, 0o644), 1000));
        assert!(
            !writable(&stat(1000, 0o444), 1000),
            "read-only to its owner"
        );
        assert!(!writable(&stat(1001, 0o666), 1000), "another user's");
        assert!(writable(&stat(1001, 0o444), 0), "root writes anything");
    }

    #[test]
    fn a_patch_copies_every_range_but_what_it_keeps_and_the_holes() {
        let chunk = |len| Segment::Chunk {
            id: ChunkId::of(b"x"),
            len,
        };
        let kept = Src::Clone(Loc { file: 0, offset: 0 });
        let segments = [
            chunk(10),
            chunk(20),
            chunk(5),
            Segment::Zero { len: 7 },
            chunk(3),
            chunk(4),
        ];
        let sources = [
            kept.clone(),
            Src::Wire,
            Src::Local(Loc {
                file: 1,
                offset: 99,
            }),
            Src::Zero,
            Src::InPlace,
            kept,
        ];
        assert_eq!(copied_runs(&segments, &sources), [(10, 25), (42, 3)]);
        assert_eq!(changed_bytes(&segments, &sources), 28);
    }
}
