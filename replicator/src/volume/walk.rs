//! Depth-first walk of a directory tree in volume order, with the attributes we mirror.
//!
//! The walk visits a directory, then its children sorted by name bytes, recursing into
//! subdirectories as it meets them: exactly [`RelPath`]'s order, so the walk's output *is* a
//! manifest's entry order and two walks can be merged without sorting. It never follows
//! symlinks and never crosses into a path the caller excludes.
//!
//! A caller that knows a regular file's extended attributes (its quick-check index vouches
//! for them, see [`crate::index`]) hands them over through [`walk_with`]'s hook, and the walk
//! does not list them: by full path, that listing was a sixth of a cold walk's time.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::OwnedFd;
use rustix::fs::{self as rfs, AtFlags, Dir, Mode, OFlags};
use rustix::io::Errno;

use super::{S_IFLNK, StatInfo, xattr};
use crate::manifest::{RelPath, Xattrs};

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
    let Some(xattrs) = xattrs_of(&full, opts)? else {
        return Ok(None);
    };
    Ok(Some(Scanned {
        path: rel.clone(),
        stat,
        xattrs,
        link_target,
    }))
}

/// The visitor of a walk: called for every entry, in volume order.
pub type Visit<'v> = dyn FnMut(Scanned) -> Result<(), WalkError> + 'v;

/// Asked for each regular file below the root, after its stat: its extended attributes if
/// they are known, so the walk does not list them.
pub type KnownXattrs<'k> = dyn FnMut(&RelPath, &StatInfo) -> Option<Xattrs> + 'k;

/// Walks `root` in volume order, calling `visit` for every entry (the root first).
/// Entries that vanish during the walk are skipped: the source may be live.
pub fn walk(root: &Path, opts: WalkOptions, visit: &mut Visit<'_>) -> Result<(), WalkError> {
    walk_with(root, opts, &mut |_, _| None, visit)
}

/// [`walk`], taking the attributes of the regular files `known_xattrs` vouches for from it.
pub fn walk_with(
    root: &Path,
    opts: WalkOptions,
    known_xattrs: &mut KnownXattrs<'_>,
    visit: &mut Visit<'_>,
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
        let fd = match rfs::open(root, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(WalkError::io(root, e.into())),
        };
        let mut walker = Walker {
            root,
            opts,
            known_xattrs,
            visit,
        };
        walker.walk_fd(&RelPath::root(), &fd)?;
    }
    Ok(())
}

/// How the walk opens directories: never through a symlink.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// The extended attributes of `full` if `opts` asks for them (else none); `None` if it
/// vanished meanwhile.
fn xattrs_of(full: &Path, opts: WalkOptions) -> Result<Option<Xattrs>, WalkError> {
    if !opts.xattrs {
        return Ok(Some(Vec::new()));
    }
    match xattr::read_all(full) {
        Ok(x) => Ok(Some(x)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WalkError::io(full, e)),
    }
}

/// A walk below the root, directory by directory.
struct Walker<'w, 'k, 'v> {
    root: &'w Path,
    opts: WalkOptions,
    known_xattrs: &'w mut KnownXattrs<'k>,
    visit: &'w mut Visit<'v>,
}

impl Walker<'_, '_, '_> {
    /// Walks the children of the directory open as `fd`. Entries are looked at relative to it
    /// (`fstatat`, `readlinkat`, `openat`): a full path costs the kernel a lookup per component
    /// for every entry, which was most of a warm walk's time.
    fn walk_fd(&mut self, dir: &RelPath, fd: &OwnedFd) -> Result<(), WalkError> {
        let root = self.root;
        let shown = || full_path(root, dir);
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut items = Dir::read_from(fd).map_err(|e| WalkError::io(&shown(), e.into()))?;
        while let Some(item) = items.read() {
            let item = item.map_err(|e| WalkError::io(&shown(), e.into()))?;
            let name = item.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        drop(items);
        names.sort_unstable();
        for name in names {
            let path = dir.join(&name)?;
            let os_name = OsStr::from_bytes(&name);
            let stat = match rfs::statat(fd, os_name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(s) => StatInfo::from(&s),
                // Vanished since the listing: the source may be live.
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(WalkError::io(&full_path(root, &path), e.into())),
            };
            let link_target = if stat.file_type() == S_IFLNK {
                match rfs::readlinkat(fd, os_name, Vec::new()) {
                    Ok(t) => Some(t.into_bytes()),
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(WalkError::io(&full_path(root, &path), e.into())),
                }
            } else {
                None
            };
            // No `*xattrat` calls before Linux 6.13: these go by path.
            let known = if stat.is_file() && self.opts.xattrs {
                (self.known_xattrs)(&path, &stat)
            } else {
                None
            };
            let xattrs = match known {
                Some(x) => x,
                None => match xattrs_of(&full_path(root, &path), self.opts)? {
                    Some(x) => x,
                    None => continue,
                },
            };
            let is_dir = stat.is_dir();
            (self.visit)(Scanned {
                path: path.clone(),
                stat,
                xattrs,
                link_target,
            })?;
            if is_dir {
                match rfs::openat(fd, os_name, DIR_FLAGS, Mode::empty()) {
                    Ok(child) => self.walk_fd(&path, &child)?,
                    // Removed, or replaced by something else, since it was looked at.
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => {}
                    Err(e) => return Err(WalkError::io(&full_path(root, &path), e.into())),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paths a walk of `r` reports, checked to come in volume order; `during` sees each.
    fn walked(r: &Path, during: &mut dyn FnMut(&RelPath)) -> Vec<RelPath> {
        let mut seen: Vec<RelPath> = Vec::new();
        walk(r, WalkOptions::default(), &mut |s| {
            during(&s.path);
            seen.push(s.path);
            Ok(())
        })
        .unwrap();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "not in volume order");
        seen
    }

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
        let seen = walked(r, &mut |_| {});
        assert_eq!(seen.len(), 10);
        assert!(seen.iter().any(|p| p.as_bytes() == b"c/dangling"));
    }

    /// Large nested directories, an entry removed while the walk runs: the walk reports what
    /// is there, in order, skipping what vanished; a walk its visitor stops ends there.
    #[test]
    fn entries_that_vanish_are_skipped_and_a_stopped_walk_ends() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in ["big", "big/sub"] {
            std::fs::create_dir(r.join(d)).unwrap();
            for i in 0..700 {
                std::fs::write(r.join(format!("{d}/f{i:04}")), b"x").unwrap();
            }
        }
        let seen = walked(r, &mut |path| {
            if path.as_bytes() == b"big/f0100" {
                // Vanishes after the listing: skipped, not an error.
                std::fs::remove_file(r.join("big/f0500")).unwrap();
            }
        });
        assert_eq!(seen.len(), 1 + 2 + 1399);
        assert!(!seen.iter().any(|p| p.as_bytes() == b"big/f0500"));
        let mut visited = 0;
        let stopped = walk(r, WalkOptions::default(), &mut |_| {
            visited += 1;
            match visited {
                50 => Err(WalkError::Stopped("enough".into())),
                _ => Ok(()),
            }
        });
        assert!(matches!(stopped, Err(WalkError::Stopped(_))));
        assert_eq!(visited, 50);
    }

    /// The hook is asked about regular files only, after their stat; the attributes it
    /// vouches for are reported without listing the file's own, the others' are listed.
    #[test]
    fn attributes_the_hook_vouches_for_are_taken_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir(r.join("d")).unwrap();
        for f in ["d/bare", "d/listed", "d/vouched"] {
            std::fs::write(r.join(f), b"x").unwrap();
            rfs::lsetxattr(r.join(f), "user.a", b"1", rfs::XattrFlags::empty()).unwrap();
        }
        std::os::unix::fs::symlink("listed", r.join("d/link")).unwrap();
        let mut asked = Vec::new();
        let mut found = Vec::new();
        let kept = vec![(b"user.kept".to_vec(), b"2".to_vec())];
        let mut hook = |p: &RelPath, st: &StatInfo| {
            assert!(st.is_file() && st.size == 1, "{p}");
            asked.push(p.to_string());
            match p.as_bytes() {
                b"d/bare" => Some(Vec::new()),
                b"d/vouched" => Some(kept.clone()),
                _ => None,
            }
        };
        walk_with(r, WalkOptions::default(), &mut hook, &mut |s| {
            found.push((s.path.to_string(), s.xattrs));
            Ok(())
        })
        .unwrap();
        assert_eq!(asked, ["d/bare", "d/listed", "d/vouched"]);
        let xattrs = |name: &str| found.iter().find(|(p, _)| p == name).unwrap().1.clone();
        assert_eq!(xattrs("d/bare"), vec![]);
        assert_eq!(
            xattrs("d/listed"),
            vec![(b"user.a".to_vec(), b"1".to_vec())]
        );
        assert_eq!(xattrs("d/vouched"), kept);
    }

    /// The walk stats relative to directory handles, `scan_one` by path: both must record
    /// the same thing, or an index written from one would distrust what the other sees.
    #[test]
    fn walking_and_scanning_one_path_agree() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("d/e")).unwrap();
        std::fs::write(r.join("d/e/f"), b"data").unwrap();
        std::os::unix::fs::symlink("d/e/f", r.join("link")).unwrap();
        let mut count = 0;
        walk(r, WalkOptions::default(), &mut |s| {
            let one = scan_one(r, &s.path, WalkOptions::default())?.unwrap();
            assert_eq!(one.stat, s.stat, "{}", s.path);
            assert_eq!(one.link_target, s.link_target, "{}", s.path);
            assert_eq!(one.xattrs, s.xattrs, "{}", s.path);
            count += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(count, 5);
    }
}
