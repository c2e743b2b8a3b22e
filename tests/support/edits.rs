//! Random edits of a source tree, for the property tests: files written, appended to,
//! removed, linked, renamed and replaced by directories, in a few directories with few
//! names, so that edits collide.
#![allow(clippy::unwrap_used)] // test equipment: a panic is the failure report

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use crate::bytes;

/// One edit.
#[derive(Debug, Clone)]
pub enum Op {
    Write {
        dir: u8,
        name: u8,
        seed: u64,
        len: usize,
    },
    Append {
        dir: u8,
        name: u8,
        seed: u64,
    },
    /// A file big enough for `--inplace` to patch (1.5 MB).
    Big {
        dir: u8,
        name: u8,
        seed: u64,
    },
    /// 5,000 bytes written at `at` (modulo its size) over the `pick`-th (modulo their count)
    /// regular file of at least 1 MiB, or of any size if there is none, in place: the same
    /// inode, its other bytes kept.
    Overwrite {
        pick: u8,
        seed: u64,
        at: u32,
    },
    Remove {
        dir: u8,
        name: u8,
    },
    Symlink {
        dir: u8,
        name: u8,
        target: u8,
    },
    /// A new name for the `pick`-th (modulo their count) regular file of the tree, so that
    /// nearly every such op links something.
    HardLink {
        dir: u8,
        name: u8,
        pick: u8,
    },
    /// `f{name}` moved to `f{to_name}` in `to_dir` (a file or symlink; nothing if neither).
    Rename {
        dir: u8,
        name: u8,
        to_dir: u8,
        to_name: u8,
    },
    /// `f{name}` replaced by a directory holding one file.
    ToDir {
        dir: u8,
        name: u8,
        seed: u64,
    },
    /// `f{name}` replaced by a named pipe.
    Fifo {
        dir: u8,
        name: u8,
    },
    /// An extended attribute set on `f{name}` if it is a file or directory, or with `name`
    /// `None` on the directory itself; an empty value removes it.
    Xattr {
        dir: u8,
        name: Option<u8>,
        value: u8,
    },
    /// `f{name}`'s mtime set, its content left alone.
    Touch {
        dir: u8,
        name: u8,
        secs: u32,
    },
    RemoveDir {
        dir: u8,
    },
    Chmod {
        dir: u8,
        name: u8,
        mode: u32,
    },
}

/// Any edit, the common ones more often.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u8..6, 0u64..6, 0usize..300_000).prop_map(|(dir, name, seed, len)| Op::Write { dir, name, seed, len }),
        2 => (0u8..4, 0u8..6, 0u64..1000).prop_map(|(dir, name, seed)| Op::Append { dir, name, seed }),
        2 => (0u8..4, 0u8..6, 0u64..6).prop_map(|(dir, name, seed)| Op::Big { dir, name, seed }),
        2 => (any::<u8>(), 0u64..1000, any::<u32>())
            .prop_map(|(pick, seed, at)| Op::Overwrite { pick, seed, at }),
        1 => (0u8..4, 0u8..6).prop_map(|(dir, name)| Op::Remove { dir, name }),
        1 => (0u8..4, 0u8..6, 0u8..6).prop_map(|(dir, name, target)| Op::Symlink { dir, name, target }),
        2 => (0u8..4, 0u8..6, any::<u8>()).prop_map(|(dir, name, pick)| Op::HardLink { dir, name, pick }),
        2 => (0u8..4, 0u8..6, 0u8..4, 0u8..6)
            .prop_map(|(dir, name, to_dir, to_name)| Op::Rename { dir, name, to_dir, to_name }),
        1 => (0u8..4, 0u8..6, 0u64..6).prop_map(|(dir, name, seed)| Op::ToDir { dir, name, seed }),
        1 => (0u8..4, 0u8..6).prop_map(|(dir, name)| Op::Fifo { dir, name }),
        1 => (0u8..4, proptest::option::of(0u8..6), 0u8..4)
            .prop_map(|(dir, name, value)| Op::Xattr { dir, name, value }),
        1 => (0u8..4, 0u8..6, 0u32..4).prop_map(|(dir, name, secs)| Op::Touch { dir, name, secs }),
        1 => (1u8..4).prop_map(|dir| Op::RemoveDir { dir }),
        1 => (0u8..4, 0u8..6, prop_oneof![Just(0o644u32), Just(0o600), Just(0o755), Just(0o4711)])
            .prop_map(|(dir, name, mode)| Op::Chmod { dir, name, mode }),
    ]
}

fn dir_path(root: &Path, dir: u8) -> PathBuf {
    if dir == 0 {
        root.to_path_buf()
    } else {
        root.join(format!("d{dir}")).join("inner")
    }
}

/// Applies an op; returns the bytes of file content it wrote (what a sync may have to move).
pub fn apply(root: &Path, op: &Op) -> u64 {
    use std::os::unix::fs::PermissionsExt;
    let file = |dir: u8, name: u8| dir_path(root, dir).join(format!("f{name}"));
    let clear = |p: &Path| {
        if let Ok(m) = fs::symlink_metadata(p) {
            if m.is_dir() {
                fs::remove_dir_all(p).unwrap()
            } else {
                fs::remove_file(p).unwrap()
            }
        }
    };
    match *op {
        Op::Write {
            dir,
            name,
            seed,
            len,
        } => {
            fs::create_dir_all(dir_path(root, dir)).unwrap();
            let p = file(dir, name);
            clear(&p);
            // Few distinct seeds: files share content, so dedup paths are exercised.
            fs::write(&p, bytes(seed, len)).unwrap();
            len as u64
        }
        Op::Append { dir, name, seed } => {
            let p = file(dir, name);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() => {
                    use std::io::Write;
                    let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
                    f.write_all(&bytes(seed, 1000)).unwrap();
                    m.len() + 1000
                }
                _ => 0,
            }
        }
        Op::Big { dir, name, seed } => apply(
            root,
            &Op::Write {
                dir,
                name,
                seed,
                len: 1_500_000,
            },
        ),
        Op::Overwrite { pick, seed, at } => {
            use std::os::unix::fs::FileExt;
            let files = regular_files(root);
            let big: Vec<&PathBuf> = files
                .iter()
                .filter(|f| fs::metadata(f).unwrap().len() >= 1 << 20)
                .collect();
            let pool: Vec<&PathBuf> = match big.is_empty() {
                true => files.iter().collect(),
                false => big,
            };
            let Some(p) = pool.get(usize::from(pick) % pool.len().max(1)) else {
                return 0;
            };
            let len = fs::metadata(p).unwrap().len();
            let at = u64::from(at) % len.max(1);
            let f = fs::OpenOptions::new().write(true).open(p).unwrap();
            f.write_all_at(&bytes(seed, 5000), at).unwrap();
            // The chunks around the change may move whole.
            len.max(at + 5000)
        }
        Op::Remove { dir, name } => {
            clear(&file(dir, name));
            0
        }
        Op::Symlink { dir, name, target } => {
            fs::create_dir_all(dir_path(root, dir)).unwrap();
            let p = file(dir, name);
            clear(&p);
            std::os::unix::fs::symlink(format!("f{target}"), &p).unwrap();
            0
        }
        Op::HardLink { dir, name, pick } => {
            let p = file(dir, name);
            let files = regular_files(root);
            if let Some(t) = files.get(usize::from(pick) % files.len().max(1))
                && !t.starts_with(&p)
            {
                fs::create_dir_all(dir_path(root, dir)).unwrap();
                clear(&p);
                fs::hard_link(t, &p).unwrap();
            }
            // A new name moves no data: the file's content is already there, or is counted
            // by the op that wrote it.
            0
        }
        Op::Rename {
            dir,
            name,
            to_dir,
            to_name,
        } => {
            let (from, to) = (file(dir, name), file(to_dir, to_name));
            if from != to && fs::symlink_metadata(&from).is_ok_and(|m| !m.is_dir()) {
                fs::create_dir_all(dir_path(root, to_dir)).unwrap();
                clear(&to);
                fs::rename(&from, &to).unwrap();
            }
            // The data is on the destination already, under the old name.
            0
        }
        Op::ToDir { dir, name, seed } => {
            let p = file(dir, name);
            clear(&p);
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join("x"), bytes(seed, 5000)).unwrap();
            5000
        }
        Op::Fifo { dir, name } => {
            fs::create_dir_all(dir_path(root, dir)).unwrap();
            let p = file(dir, name);
            clear(&p);
            let mode = rustix::fs::Mode::from_raw_mode(0o640);
            rustix::fs::mknodat(rustix::fs::CWD, &p, rustix::fs::FileType::Fifo, mode, 0).unwrap();
            0
        }
        Op::Xattr { dir, name, value } => {
            let p = match name {
                Some(name) => file(dir, name),
                None => dir_path(root, dir),
            };
            let key = "user.edit";
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() || m.is_dir() => {
                    if value == 0 {
                        let _ = rustix::fs::lremovexattr(&p, key);
                    } else {
                        let v = vec![b'v'; usize::from(value) * 7];
                        rustix::fs::lsetxattr(&p, key, &v, rustix::fs::XattrFlags::empty())
                            .unwrap();
                    }
                }
                _ => {}
            }
            0
        }
        Op::Touch { dir, name, secs } => {
            let p = file(dir, name);
            if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
                let at = std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(1_500_000_000 + u64::from(secs));
                fs::File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_modified(at)
                    .unwrap();
            }
            0
        }
        Op::RemoveDir { dir } => {
            let _ = fs::remove_dir_all(root.join(format!("d{dir}")));
            0
        }
        Op::Chmod { dir, name, mode } => {
            let p = file(dir, name);
            if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            }
            0
        }
    }
}

/// The regular files under `root`, sorted by path.
fn regular_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let kind = e.file_type().unwrap();
            if kind.is_dir() {
                stack.push(e.path());
            } else if kind.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}
