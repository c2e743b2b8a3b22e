//! What a volume is on disk: a directory tree, or a block volume (disk image or block device).
//!
//! This module only *reads*: it walks trees in volume order with the attributes we mirror
//! ([`walk`]), reads file contents without reading holes ([`sparse`]), and reads extended
//! attributes ([`xattr`]). Writing a volume is the receiver's business (`apply`).

pub mod sparse;
pub mod walk;
pub mod xattr;

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::manifest::VolumeMode;

/// The `stat` fields the engine uses, captured once per entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StatInfo {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    pub ino: u64,
    pub dev: u64,
    pub nlink: u64,
    pub rdev: u64,
}

impl From<&Metadata> for StatInfo {
    fn from(m: &Metadata) -> Self {
        StatInfo {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            ctime_sec: m.ctime(),
            ctime_nsec: m.ctime_nsec() as u32,
            ino: m.ino(),
            dev: m.dev(),
            nlink: m.nlink(),
            rdev: m.rdev(),
        }
    }
}

impl From<&rustix::fs::Stat> for StatInfo {
    // The field types of `struct stat` differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    fn from(s: &rustix::fs::Stat) -> Self {
        StatInfo {
            mode: s.st_mode as u32,
            uid: s.st_uid as u32,
            gid: s.st_gid as u32,
            size: s.st_size as u64,
            mtime_sec: s.st_mtime as i64,
            mtime_nsec: s.st_mtime_nsec as u32,
            ctime_sec: s.st_ctime as i64,
            ctime_nsec: s.st_ctime_nsec as u32,
            ino: s.st_ino as u64,
            dev: s.st_dev as u64,
            nlink: s.st_nlink as u64,
            rdev: s.st_rdev as u64,
        }
    }
}

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;

impl StatInfo {
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == S_IFDIR
    }

    pub fn is_file(&self) -> bool {
        self.file_type() == S_IFREG
    }
}

/// Decides how to treat SRC: a directory is a tree; a regular file or block device is a block
/// volume. Anything else (a symlink to follow, a FIFO) is refused.
pub fn detect_mode(src: &Path) -> io::Result<VolumeMode> {
    let meta = std::fs::metadata(src)?;
    let ft = meta.file_type();
    if ft.is_dir() {
        Ok(VolumeMode::Tree)
    } else if ft.is_file() || ft.is_block_device() {
        Ok(VolumeMode::Block)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is neither a directory, a regular file nor a block device",
                src.display()
            ),
        ))
    }
}

/// Size of a regular file or block device (block devices report 0 in `st_size`).
pub fn volume_size(file: &std::fs::File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        let end = f.seek(SeekFrom::End(0))?;
        f.seek(SeekFrom::Start(0))?;
        Ok(end)
    } else {
        Ok(meta.len())
    }
}
