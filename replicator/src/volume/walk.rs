//! Depth-first walk of a directory tree in volume order, with the attributes we mirror.
//!
//! The walk visits a directory, then its children sorted by name bytes, recursing into
//! subdirectories as it meets them: exactly [`RelPath`]'s order, so the walk's output *is* a
//! manifest's entry order and two walks can be merged without sorting. It never follows
//! symlinks and never crosses into a path the caller excludes.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{S_IFLNK, StatInfo, xattr};
use crate::manifest::RelPath;

/// One entry as found on disk.
#[derive(Clone, Debug)]
pub struct Scanned {
    pub path: RelPath,
    pub stat: StatInfo,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub link_target: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Path(#[from] crate::manifest::PathError),
    #[error("stopped: {0}")]
    Stopped(String),
}

impl WalkError {
    pub fn io(path: &Path, source: io::Error) -> Self {
        WalkError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct WalkOptions {
    /// Read extended attributes (costs a syscall or two per entry).
    pub xattrs: bool,
}

impl Default for WalkOptions {
    fn default() -> Self {
        WalkOptions { xattrs: true }
    }
}

/// Absolute path of `rel` under `root`.
pub fn full_path(root: &Path, rel: &RelPath) -> PathBuf {
    if rel.is_root() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel.as_bytes()))
    }
}

/// Stats one path without following a final symlink; `None` if it does not exist.
pub fn scan_one(
    root: &Path,
    rel: &RelPath,
    opts: WalkOptions,
) -> Result<Option<Scanned>, WalkError> {
    let full = full_path(root, rel);
    let meta = match std::fs::symlink_metadata(&full) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WalkError::io(&full, e)),
    };
    let stat = StatInfo::from(&meta);
    let link_target = if stat.file_type() == S_IFLNK {
        match std::fs::read_link(&full) {
            Ok(t) => Some(t.into_os_string().into_encoded_bytes()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(WalkError::io(&full, e)),
        }
    } else {
        None
    };
    let xattrs = if opts.xattrs {
        match xattr::read_all(&full) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(WalkError::io(&full, e)),
        }
    } else {
        Vec::new()
    };
    Ok(Some(Scanned {
        path: rel.clone(),
        stat,
        xattrs,
        link_target,
    }))
}

/// Walks `root` in volume order, calling `visit` for every entry (the root first).
/// Entries that vanish during the walk are skipped: the source may be live.
pub fn walk(
    root: &Path,
    opts: WalkOptions,
    visit: &mut dyn FnMut(Scanned) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let Some(top) = scan_one(root, &RelPath::root(), opts)? else {
        return Err(WalkError::io(
            root,
            io::Error::new(io::ErrorKind::NotFound, "volume root does not exist"),
        ));
    };
    let is_dir = top.stat.is_dir();
    visit(top)?;
    if is_dir {
        walk_dir(root, &RelPath::root(), opts, visit)?;
    }
    Ok(())
}

fn walk_dir(
    root: &Path,
    dir: &RelPath,
    opts: WalkOptions,
    visit: &mut dyn FnMut(Scanned) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let full = full_path(root, dir);
    let reader = match std::fs::read_dir(&full) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(WalkError::io(&full, e)),
    };
    let mut names: Vec<Vec<u8>> = Vec::new();
    for item in reader {
        let item = item.map_err(|e| WalkError::io(&full, e))?;
        names.push(item.file_name().into_encoded_bytes());
    }
    names.sort_unstable();
    for name in names {
        let path = dir.join(&name)?;
        let Some(scanned) = scan_one(root, &path, opts)? else {
            continue;
        };
        let is_dir = scanned.stat.is_dir();
        visit(scanned)?;
        if is_dir {
            walk_dir(root, &path, opts, visit)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_order_matches_volume_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in ["a", "a/b", "a.b", "c"] {
            std::fs::create_dir(r.join(d)).unwrap();
        }
        for f in ["a/z", "a/b/x", "a.b/y", "0"] {
            std::fs::write(r.join(f), b"x").unwrap();
        }
        std::os::unix::fs::symlink("/nonexistent", r.join("c/dangling")).unwrap();
        let mut seen = Vec::new();
        walk(r, WalkOptions::default(), &mut |s| {
            seen.push(s.path.clone());
            Ok(())
        })
        .unwrap();
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
        assert_eq!(seen.len(), 10);
        assert!(seen.iter().any(|p| p.as_bytes() == b"c/dangling"));
    }
}
