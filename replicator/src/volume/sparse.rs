//! Reading a file's bytes without reading its holes.
//!
//! [`SparseReader`] asks the filesystem where data lives (`SEEK_DATA`/`SEEK_HOLE`) and yields
//! zeros for holes without a read system call, so the chunker sees the file's logical content
//! (chunk boundaries do not depend on how the file happens to be allocated) while holes are
//! neither read from disk, sent, nor written. Filesystems and block devices that cannot report
//! holes are read in full.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

pub struct SparseReader<'a> {
    file: &'a File,
    pos: u64,
    size: u64,
    /// Current data region `[start, end)`; bytes before `start` from `pos` are a hole.
    region: Option<(u64, u64)>,
    holes_supported: bool,
    /// Bytes actually read from the file (excluding holes).
    pub bytes_read: u64,
}

impl<'a> SparseReader<'a> {
    /// Reads `file` up to `size` bytes (the size seen when it was stat'ed).
    pub fn new(file: &'a File, size: u64) -> Self {
        SparseReader {
            file,
            pos: 0,
            size,
            region: None,
            holes_supported: true,
            bytes_read: 0,
        }
    }

    /// Reads `file[start..end]` (holes as zeros), for one of several threads cutting a file.
    pub fn range(file: &'a File, start: u64, end: u64) -> Self {
        SparseReader {
            pos: start,
            ..SparseReader::new(file, end)
        }
    }

    /// Finds the data region at or after `pos`.
    fn locate(&mut self) -> io::Result<(u64, u64)> {
        if !self.holes_supported {
            return Ok((self.pos, self.size));
        }
        let data = match rustix::fs::seek(self.file, SeekFrom::Data(self.pos)) {
            Ok(d) => d.min(self.size),
            Err(Errno::NXIO) => self.size, // only a hole remains
            Err(Errno::INVAL) | Err(Errno::NOTSUP) => {
                self.holes_supported = false;
                return Ok((self.pos, self.size));
            }
            Err(e) => return Err(e.into()),
        };
        let hole = if data >= self.size {
            self.size
        } else {
            match rustix::fs::seek(self.file, SeekFrom::Hole(data)) {
                Ok(h) => h.min(self.size),
                Err(Errno::NXIO) => self.size,
                Err(e) => return Err(e.into()),
            }
        };
        Ok((data, hole))
    }
}

/// The bytes of `file[..size]` that are not holes: what reading it through a
/// [`SparseReader`] costs.
pub fn data_bytes(file: &File, size: u64) -> io::Result<u64> {
    let mut probe = SparseReader::new(file, size);
    let mut total = 0;
    while probe.pos < size {
        let (start, end) = probe.locate()?;
        total += end.saturating_sub(start);
        probe.pos = end.max(start).max(probe.pos + 1);
    }
    Ok(total)
}

impl Read for SparseReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let (start, end) = match self.region {
            Some((s, e)) if self.pos < e => (s, e),
            _ => {
                let r = self.locate()?;
                self.region = Some(r);
                r
            }
        };
        if self.pos < start {
            let n = (start - self.pos).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            self.pos += n as u64;
            return Ok(n);
        }
        if start >= end {
            // No data left at all: the rest is a hole.
            let n = (self.size - self.pos).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            self.pos += n as u64;
            return Ok(n);
        }
        let want = (end - self.pos).min(buf.len() as u64) as usize;
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            // The file shrank under us: stop here, the manifest records what we saw.
            self.size = self.pos;
            return Ok(0);
        }
        self.pos += n as u64;
        self.bytes_read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn holes_read_as_zeros_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[9u8; 4096], 4 << 20).unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        let mut r = SparseReader::new(&f, 8 << 20);
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 8 << 20);
        assert!(all[..4096].iter().all(|&b| b == 7));
        assert!(all[(4 << 20)..(4 << 20) + 4096].iter().all(|&b| b == 9));
        assert_eq!(all.iter().filter(|&&b| b != 0).count(), 8192);
        // Data regions are block-granular; anything near 8 MiB means holes were read.
        assert!(r.bytes_read < 1 << 20, "read {} bytes", r.bytes_read);
        assert_eq!(data_bytes(&f, 8 << 20).unwrap(), r.bytes_read);
        let mut part = Vec::new();
        SparseReader::range(&f, (4 << 20) - 10, (4 << 20) + 10)
            .read_to_end(&mut part)
            .unwrap();
        assert_eq!(part, [&[0u8; 10][..], &[9u8; 10][..]].concat());
    }
}
