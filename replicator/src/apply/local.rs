//! Reading the destination back while building new files: chunks copied from elsewhere in
//! the volume (verified by hash as they are read), runs the index vouches for (copied in the
//! kernel), and zero checks that skip holes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use rustix::fs as rfs;

use super::behind::WriteBehind;
use super::fsops::{self, VolumeDir};
use super::plan::{Loc, SourceFiles};
use super::readahead::Consumed;
use super::{ApplyError, io_err};
use crate::chunk::ChunkId;

/// True if `file[off..off+len]` hashes to `id`.
pub(super) fn range_has(file: &File, off: u64, len: u32, id: &ChunkId, buf: &mut Vec<u8>) -> bool {
    buf.resize(len as usize, 0);
    file.read_exact_at(buf, off).is_ok() && ChunkId::of(buf) == *id
}

/// True if `file[off..off+len]` reads as zeros. Only the parts the filesystem says hold data
/// are read: holes are zeros by definition (a fresh copy of a disk image is mostly holes).
pub(super) fn range_is_zero(file: &File, off: u64, len: u64, buf: &mut Vec<u8>) -> bool {
    use rustix::fs::SeekFrom;
    use rustix::io::Errno;
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let (data, hole) = match rfs::seek(file, SeekFrom::Data(pos)) {
            Ok(d) if d >= end => return true,
            Ok(d) => match rfs::seek(file, SeekFrom::Hole(d)) {
                Ok(h) => (d, h.min(end)),
                Err(_) => (d, end),
            },
            Err(Errno::NXIO) => return true, // nothing but a hole from here on
            Err(_) => (pos, end),            // no hole support: read it all
        };
        if !range_reads_zero(file, data, hole - data, buf) {
            return false;
        }
        pos = hole;
    }
    true
}

fn range_reads_zero(file: &File, off: u64, len: u64, buf: &mut Vec<u8>) -> bool {
    buf.resize(1 << 20, 0);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        if file.read_exact_at(&mut buf[..n], off + done).is_err()
            || !crate::chunk::is_zero(&buf[..n])
        {
            return false;
        }
        done += n as u64;
    }
    true
}

/// Most bytes copied by one `copy_file_range` of a run.
const COPY_STEP: u64 = 16 << 20;

/// A run of vouched ranges to copy in the kernel: contiguous in the source file and in the
/// file being built.
#[derive(Default)]
pub(super) struct PendingClone {
    run: Option<(Loc, u64, u64)>,
}

impl PendingClone {
    pub(super) fn start(&mut self, from: &Loc, to: u64, len: u32) {
        self.run = Some((*from, to, u64::from(len)));
    }

    /// Adds the range if it continues the run; false if it does not (flush, then start).
    pub(super) fn extend(&mut self, from: &Loc, to: u64, len: u32) -> bool {
        match &mut self.run {
            Some((run, run_to, run_len))
                if run.file == from.file
                    && run.offset + *run_len == from.offset
                    && *run_to + *run_len == to =>
            {
                *run_len += u64::from(len);
                true
            }
            _ => false,
        }
    }

    /// Copies the run, if any, into `dst`, [`COPY_STEP`] bytes at a time, telling `copied`
    /// (the read-ahead keeps its distance from there) and `behind` after each; returns the
    /// bytes copied.
    pub(super) fn flush(
        &mut self,
        reader: &mut LocalReader,
        vol: &mut VolumeDir,
        files: &SourceFiles,
        dst: &File,
        copied: &dyn Consumed,
        behind: &mut WriteBehind,
    ) -> Result<u64, ApplyError> {
        let Some((from, to, len)) = self.run.take() else {
            return Ok(0);
        };
        let src = reader.open(vol, files, from.file)?;
        let mut done = 0;
        while done < len {
            let step = (len - done).min(COPY_STEP);
            fsops::copy_range(src, from.offset + done, dst, to + done, step).map_err(
                |e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => {
                        ApplyError::LocalChanged(files.shown(from.file))
                    }
                    _ => io_err("cannot copy", &files.shown(from.file))(e),
                },
            )?;
            copied.consumed(step);
            done += step;
            behind.wrote_to(dst, to + done);
        }
        Ok(len)
    }
}

/// Reads chunks back from the destination, keeping the last file open.
#[derive(Default)]
pub(super) struct LocalReader {
    open: Option<(u32, File)>,
}

impl LocalReader {
    pub(super) fn read(
        &mut self,
        vol: &mut VolumeDir,
        files: &SourceFiles,
        loc: &Loc,
        len: u32,
        id: &ChunkId,
    ) -> Result<Bytes, ApplyError> {
        let f = self.open(vol, files, loc.file)?;
        let mut buf = Vec::new();
        if !range_has(f, loc.offset, len, id, &mut buf) {
            return Err(ApplyError::LocalChanged(files.shown(loc.file)));
        }
        Ok(Bytes::from(buf))
    }

    /// Source file number `file`, opened (or still open from the last call).
    fn open(
        &mut self,
        vol: &mut VolumeDir,
        files: &SourceFiles,
        file: u32,
    ) -> Result<&File, ApplyError> {
        if !matches!(&self.open, Some((n, _)) if *n == file) {
            let (dir, name) = files.current(file);
            let f = vol
                .open_read(dir, &name)
                .map_err(|_| ApplyError::LocalChanged(files.shown(file)))?;
            self.open = Some((file, f));
        }
        let Some((_, f)) = &self.open else {
            unreachable!("opened above")
        };
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what a copy reports.
    struct Steps(std::cell::RefCell<Vec<u64>>);

    impl Consumed for Steps {
        fn consumed(&self, bytes: u64) {
            self.0.borrow_mut().push(bytes);
        }
    }

    #[test]
    fn a_long_run_is_copied_and_reported_step_by_step() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(COPY_STEP * 5 / 2) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        std::fs::write(dir.path().join("old"), &data).unwrap();
        let dst = File::create(dir.path().join("new")).unwrap();
        let mut vol = VolumeDir::open(dir.path()).unwrap();
        let mut files = SourceFiles::default();
        let file = files.add(&crate::manifest::RelPath::root(), b"old");
        let mut clone = PendingClone::default();
        clone.start(&Loc { file, offset: 0 }, 0, 1);
        assert!(clone.extend(&Loc { file, offset: 1 }, 1, data.len() as u32 - 1));
        let steps = Steps(Default::default());
        let copied = clone
            .flush(
                &mut LocalReader::default(),
                &mut vol,
                &files,
                &dst,
                &steps,
                &mut WriteBehind::default(),
            )
            .unwrap();
        assert_eq!(copied, data.len() as u64);
        assert_eq!(
            steps.0.into_inner(),
            vec![COPY_STEP, COPY_STEP, COPY_STEP / 2]
        );
        assert_eq!(std::fs::read(dir.path().join("new")).unwrap(), data);
    }

    #[test]
    fn zero_ranges_are_found_in_holes_and_in_written_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(8 << 20).unwrap(); // all hole
        f.write_all_at(&[0u8; 65536], 1 << 20).unwrap(); // allocated zeros
        f.write_all_at(b"data", 5 << 20).unwrap();
        let mut buf = Vec::new();
        assert!(range_is_zero(&f, 0, 5 << 20, &mut buf));
        assert!(range_is_zero(&f, (5 << 20) + 4, 3 << 20, &mut buf));
        assert!(!range_is_zero(&f, 4 << 20, 2 << 20, &mut buf));
        assert!(!range_is_zero(&f, (5 << 20) + 2, 1, &mut buf));
    }
}
