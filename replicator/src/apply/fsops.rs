//! Filesystem operations relative to directory handles, never following symlinks.
//!
//! The receiver never joins a peer-supplied path onto the volume path. It opens the volume root
//! once and walks to a parent directory one component at a time with
//! `openat(O_DIRECTORY | O_NOFOLLOW)`, then acts on the last component with the `*at` calls and
//! their no-follow flags. A symlink planted anywhere along a path therefore makes the operation
//! fail instead of escaping the volume.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::codec;
use crate::manifest::{Meta, RelPath};

/// Name used for a file while it is being written: hidden, in the same directory as the final
/// name (so the rename is atomic), and deterministic (so a rerun finds and resumes it).
pub fn temp_name(name: &[u8]) -> Vec<u8> {
    temp_name_with(&blake3::hash(name).to_hex()[..16])
}

fn temp_name_with(hex: &str) -> Vec<u8> {
    format!(".rpl-{hex}.tmp").into_bytes()
}

/// True for names [`temp_name`] produces.
pub fn is_temp_name(name: &[u8]) -> bool {
    name.len() == 25 && name.starts_with(b".rpl-") && name.ends_with(b".tmp")
}

/// The 8 bytes a name [`temp_name`] produces is made from (its hex digits), for keeping many
/// temp names in a third of their room; `None` for any other name, and for one that the tag
/// would not give back exactly (upper-case digits).
pub fn temp_tag(name: &[u8]) -> Option<[u8; 8]> {
    if !is_temp_name(name) {
        return None;
    }
    let hex = std::str::from_utf8(&name[5..21]).ok()?;
    codec::from_hex(hex).filter(|tag| codec::to_hex(tag) == hex)
}

/// The temp name `tag` was taken from (see [`temp_tag`]).
pub fn temp_name_of(tag: &[u8; 8]) -> Vec<u8> {
    temp_name_with(&codec::to_hex(tag))
}

pub fn os(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

/// A destination volume root and a cache of the last directory opened under it.
pub struct VolumeDir {
    root_path: PathBuf,
    root: OwnedFd,
    cached: Option<(RelPath, OwnedFd)>,
}

impl VolumeDir {
    pub fn open(root: &Path) -> io::Result<Self> {
        let fd = rfs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(VolumeDir {
            root_path: root.to_path_buf(),
            root: fd,
            cached: None,
        })
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// Opens directory `dir` (relative to the root) without following symlinks.
    pub fn dir(&mut self, dir: &RelPath) -> io::Result<&OwnedFd> {
        if dir.is_root() {
            return Ok(&self.root);
        }
        let hit = matches!(&self.cached, Some((p, _)) if p == dir);
        if !hit {
            let mut fd = open_dir_at(&self.root, dir.components().next().unwrap_or(b"."))?;
            for comp in dir.components().skip(1) {
                fd = open_dir_at(&fd, comp)?;
            }
            self.cached = Some((dir.clone(), fd));
        }
        match &self.cached {
            Some((_, fd)) => Ok(fd),
            None => unreachable!("cache filled above"),
        }
    }

    /// Forgets the cached handle (after the directory may have been replaced).
    pub fn invalidate(&mut self) {
        self.cached = None;
    }

    /// Opens a regular file for reading, refusing symlinks and anything not a regular file.
    /// Non-blocking, so a path that became a FIFO since it was walked cannot hang the open.
    pub fn open_read(&mut self, dir: &RelPath, name: &[u8]) -> io::Result<File> {
        let d = self.dir(dir)?;
        let fd = rfs::openat(
            d,
            os(name),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        if !FileType::from_raw_mode(rfs::fstat(&fd)?.st_mode).is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(File::from(fd))
    }
}

fn open_dir_at(parent: &OwnedFd, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        parent,
        os(name),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Creates (or, with `resume`, reopens) a temp file for writing.
pub fn create_temp(dir: &OwnedFd, name: &[u8], resume: bool) -> io::Result<File> {
    let mut flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if !resume {
        flags |= OFlags::TRUNC;
    }
    let fd = rfs::openat(dir, os(name), flags, Mode::from_raw_mode(0o600))?;
    Ok(File::from(fd))
}

/// Removes `name` in `dir` whatever it is (a directory is removed with its contents).
pub fn remove_any(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    remove_any_with(dir, name, &mut |_, _| {})
}

/// Removes `name` in `dir` as [`remove_any`] does, calling `before_unlink` with each regular
/// file (or entry of unknown type) inside a removed directory just before its name goes: a
/// commit holds the large ones there, to free them after the sync ([`super::retired`]).
pub fn remove_any_with(
    dir: &OwnedFd,
    name: &[u8],
    before_unlink: &mut dyn FnMut(&OwnedFd, &[u8]),
) -> io::Result<()> {
    match rfs::unlinkat(dir, os(name), AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => remove_tree(dir, name, before_unlink),
        Err(e) => Err(e.into()),
    }
}

fn remove_tree(
    dir: &OwnedFd,
    name: &[u8],
    before_unlink: &mut dyn FnMut(&OwnedFd, &[u8]),
) -> io::Result<()> {
    let sub = match open_dir_at(dir, name) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for item in rfs::Dir::read_from(&sub)? {
        let item = item?;
        let n = item.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push((n.to_vec(), item.file_type()));
        }
    }
    for (n, kind) in names {
        if matches!(kind, FileType::RegularFile | FileType::Unknown) {
            before_unlink(&sub, &n);
        }
        remove_any_with(&sub, &n, before_unlink)?;
    }
    match rfs::unlinkat(dir, os(name), AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub fn stat_at(dir: &OwnedFd, name: &[u8]) -> io::Result<Option<rfs::Stat>> {
    match rfs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(Some(s)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn timestamps(meta: &Meta) -> Timestamps {
    let t = Timespec {
        tv_sec: meta.mtime_sec,
        tv_nsec: meta.mtime_nsec.into(),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Puts back a directory's mtime (after removing what an aborted sync created in it).
pub fn set_mtime_fd<Fd: AsFd>(fd: Fd, sec: i64, nsec: u32) -> io::Result<()> {
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec.into(),
    };
    rfs::futimens(
        &fd,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
    )?;
    Ok(())
}

/// Sets owner, mode, xattrs and mtime on an open file or directory, in the order that keeps
/// setuid/setgid bits (chown clears them, so mode comes after owner).
pub fn apply_meta_fd<Fd: AsFd>(fd: Fd, meta: &Meta) -> io::Result<()> {
    set_owner(rfs::fchown(
        &fd,
        Some(rfs::Uid::from_raw(meta.uid)),
        Some(rfs::Gid::from_raw(meta.gid)),
    ))?;
    rfs::fchmod(&fd, Mode::from_raw_mode(meta.perm))?;
    sync_xattrs_fd(&fd, &meta.xattrs)?;
    rfs::futimens(&fd, &timestamps(meta))?;
    Ok(())
}

/// Sets metadata on a symlink or special file without following it.
pub fn apply_meta_at(dir: &OwnedFd, name: &[u8], meta: &Meta, is_symlink: bool) -> io::Result<()> {
    set_owner(rfs::chownat(
        dir,
        os(name),
        Some(rfs::Uid::from_raw(meta.uid)),
        Some(rfs::Gid::from_raw(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    ))?;
    if !is_symlink {
        rfs::chmodat(
            dir,
            os(name),
            Mode::from_raw_mode(meta.perm),
            AtFlags::empty(),
        )?;
    }
    if !meta.xattrs.is_empty() || !is_symlink {
        let proc_path = proc_fd_path(dir, name);
        sync_xattrs_path(&proc_path, &meta.xattrs)?;
    }
    rfs::utimensat(dir, os(name), &timestamps(meta), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// `chown` may only fail with EPERM when we are not root and the owner is not ours; that is
/// reported (the final digest check then fails) rather than silently ignored.
fn set_owner(r: rustix::io::Result<()>) -> io::Result<()> {
    r.map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("cannot set owner: {e}")))
}

/// A path that reaches `name` inside an open directory without resolving the volume path
/// again (used for the xattr calls that have no `*at` form).
fn proc_fd_path(dir: &OwnedFd, name: &[u8]) -> PathBuf {
    use std::os::fd::AsRawFd;
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(os(name));
    p
}

fn sync_xattrs_fd<Fd: AsFd>(fd: Fd, want: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    let have = match list_fd(&fd) {
        Ok(h) => h,
        Err(Errno::NOTSUP) if want.is_empty() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for name in have.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if !want.iter().any(|(n, _)| n == name) {
            match rfs::fremovexattr(&fd, os(name)) {
                Ok(()) | Err(Errno::NODATA) => {}
                // Some system attributes cannot be removed; leave them.
                Err(Errno::PERM) | Err(Errno::NOTSUP) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    for (name, value) in want {
        rfs::fsetxattr(&fd, os(name), value, rfs::XattrFlags::empty()).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot set xattr {}: {e}", String::from_utf8_lossy(name)),
            )
        })?;
    }
    Ok(())
}

fn sync_xattrs_path(path: &Path, want: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    let have = match crate::volume::xattr::read_all(path) {
        Ok(h) => h,
        Err(_) if want.is_empty() => return Ok(()),
        Err(e) => return Err(e),
    };
    for (name, _) in &have {
        if !want.iter().any(|(n, _)| n == name) {
            let _ = rfs::lremovexattr(path, os(name));
        }
    }
    for (name, value) in want {
        if have.iter().any(|(n, v)| n == name && v == value) {
            continue;
        }
        rfs::lsetxattr(path, os(name), value, rfs::XattrFlags::empty())?;
    }
    Ok(())
}

fn list_fd<Fd: AsFd>(fd: Fd) -> Result<Vec<u8>, Errno> {
    loop {
        let size = rfs::flistxattr_query(&fd)?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match rfs::flistxattr(&fd, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Flushes everything written on the filesystem holding `fd`.
pub fn syncfs<Fd: AsFd>(fd: Fd) -> io::Result<()> {
    Ok(rfs::syncfs(fd)?)
}

/// Copies `len` bytes from `src` at `from` to `dst` at `to` inside the kernel
/// (`copy_file_range`: the filesystem may share the blocks instead of copying them), or
/// through a buffer where the kernel cannot. A source shorter than expected is
/// `UnexpectedEof`.
pub fn copy_range(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (mut from, mut to, mut left) = (from, to, len);
    while left > 0 {
        let step = left.min(1 << 30) as usize;
        match rfs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), step) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n as u64,
            Err(e) if e == rustix::io::Errno::INTR => {}
            Err(_) => break, // not supported here: copy by hand below
        }
    }
    let mut buf = vec![0u8; left.min(1 << 20) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], from)?;
        dst.write_all_at(&buf[..n], to)?;
        (from, to, left) = (from + n as u64, to + n as u64, left - n as u64);
    }
    Ok(())
}

/// Deallocates `[offset, offset+len)` of a regular file, or writes zeros where that is not
/// supported (block devices, some filesystems).
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let flags = rfs::FallocateFlags::PUNCH_HOLE | rfs::FallocateFlags::KEEP_SIZE;
    if rfs::fallocate(file, flags, offset, len).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The temp files an abandoned sync left anywhere under `volume` (found without following
/// symlinks): how many and how many bytes. With `remove`, they are deleted as they are found.
pub fn stale_temps(volume: &std::path::Path, remove: bool) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let (mut files, mut bytes) = (0, 0);
    let mut dirs = vec![volume.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                dirs.push(entry.path());
            } else if ft.is_file() && is_temp_name(entry.file_name().as_bytes()) {
                bytes += entry.metadata().map_or(0, |m| m.len());
                if remove {
                    std::fs::remove_file(entry.path())?;
                }
                files += 1;
            }
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn open_read_refuses_a_fifo_at_once_and_opens_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        rfs::mknodat(
            rfs::CWD,
            dir.path().join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::fs::write(dir.path().join("file"), b"data").unwrap();
        std::fs::create_dir(dir.path().join("dir")).unwrap();
        let mut vol = VolumeDir::open(dir.path()).unwrap();
        // A blocking open of a FIFO with no writer would never return.
        let fifo = vol.open_read(&RelPath::root(), b"fifo").unwrap_err();
        assert_eq!(fifo.kind(), io::ErrorKind::InvalidInput);
        assert!(vol.open_read(&RelPath::root(), b"dir").is_err());
        let mut got = String::new();
        let mut f = vol.open_read(&RelPath::root(), b"file").unwrap();
        io::Read::read_to_string(&mut f, &mut got).unwrap();
        assert_eq!(got, "data");
    }

    #[test]
    fn copy_range_copies_between_offsets_and_reports_a_short_source() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("src"), &data).unwrap();
        let src = File::open(dir.path().join("src")).unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("dst"))
            .unwrap();
        copy_range(&src, 1000, &dst, 5, 200_000).unwrap();
        let mut got = vec![0u8; 200_000];
        dst.read_exact_at(&mut got, 5).unwrap();
        assert_eq!(got, data[1000..201_000]);
        let short = copy_range(&src, 250_000, &dst, 0, 100_000).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
    }
}
