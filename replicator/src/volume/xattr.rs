//! Reading extended attributes without following symlinks.
//!
//! Every namespace the kernel lets us list is mirrored (`user.*` always; `trusted.*`,
//! `security.*` and POSIX ACLs in `system.*` when running as root). Filesystems without xattr
//! support simply report none.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::io::Errno;

/// Lists and reads all extended attributes of `path` (not following a final symlink), sorted.
pub fn read_all(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match list(path) {
        Ok(n) => n,
        Err(e) if unsupported(e) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        match get(path, name) {
            Ok(value) => out.push((name.to_vec(), value)),
            // Vanished between list and get: a live source; skip it.
            Err(Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort();
    Ok(out)
}

fn unsupported(e: Errno) -> bool {
    e == Errno::NOTSUP || e == Errno::OPNOTSUPP
}

fn list(path: &Path) -> Result<Vec<u8>, Errno> {
    loop {
        let size = rustix::fs::llistxattr_query(path)?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn get(path: &Path, name: &[u8]) -> Result<Vec<u8>, Errno> {
    let name = OsStr::from_bytes(name);
    loop {
        let size = rustix::fs::lgetxattr_query(path, name)?;
        let mut buf = vec![0u8; size];
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}
