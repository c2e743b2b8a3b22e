//! Test support: an independent description of a volume, and helpers to run the binary.
//!
//! [`describe`] walks a tree with plain `std::fs` calls and hashes whole files with BLAKE3, so
//! "DST mirrors SRC" is checked without the engine's own walker, chunker or digest.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod cluster;
pub mod edits;
pub mod net;
pub mod power;

/// Everything `rsync -aHAXS` mirrors about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desc {
    pub kind: &'static str,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub content: Option<String>,
    pub target: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For hard-linked files: the first path (in sorted order) of the inode.
    pub link_group: Option<Vec<u8>>,
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else {
        "unknown"
    }
}

fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(path, &mut names[..]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 65536];
        let name_os = std::ffi::OsStr::from_bytes(name);
        if let Ok(len) = rustix::fs::lgetxattr(path, name_os, &mut value[..]) {
            out.push((name.to_vec(), value[..len].to_vec()));
        }
    }
    out.sort();
    out
}

/// Describes every entry under `root` (the root itself as the empty path).
pub fn describe(root: &Path) -> BTreeMap<Vec<u8>, Desc> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    let mut stack = vec![(PathBuf::from(root), Vec::new())];
    let mut all = Vec::new();
    while let Some((path, rel)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        if meta.is_dir() {
            for e in std::fs::read_dir(&path).expect("read_dir") {
                let e = e.expect("entry");
                let name = e.file_name().as_bytes().to_vec();
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(&name);
                stack.push((e.path(), r));
            }
        }
        all.push((path, rel, meta));
    }
    all.sort_by(|a, b| a.1.cmp(&b.1));
    for (path, rel, meta) in all {
        let kind = kind_of(meta.file_type());
        let link_group = (kind == "file" && meta.nlink() > 1).then(|| {
            inodes
                .entry((meta.dev(), meta.ino()))
                .or_insert_with(|| rel.clone())
                .clone()
        });
        let content = (kind == "file").then(|| {
            let data = std::fs::read(&path).expect("read");
            blake3::hash(&data).to_hex().to_string()
        });
        let target = (kind == "symlink").then(|| {
            std::fs::read_link(&path)
                .expect("readlink")
                .as_os_str()
                .as_bytes()
                .to_vec()
        });
        out.insert(
            rel,
            Desc {
                kind,
                perm: if kind == "symlink" {
                    0
                } else {
                    meta.mode() & 0o7777
                },
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                size: if kind == "dir" { 0 } else { meta.size() },
                content,
                target,
                rdev: meta.rdev(),
                xattrs: xattrs(&path),
                link_group,
            },
        );
    }
    out
}

/// Asserts that `dst` mirrors `src`, naming the first difference.
pub fn assert_mirrors(src: &Path, dst: &Path) {
    let a = describe(src);
    let b = describe(dst);
    for (path, da) in &a {
        match b.get(path) {
            None => panic!(
                "{:?} missing from destination",
                String::from_utf8_lossy(path)
            ),
            Some(db) => assert_eq!(da, db, "{:?} differs", String::from_utf8_lossy(path)),
        }
    }
    for path in b.keys() {
        assert!(
            a.contains_key(path),
            "{:?} exists only in destination",
            String::from_utf8_lossy(path)
        );
    }
}

/// Blocks actually allocated to a file, in bytes.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// What a test needs from this machine (`what`) is missing, for `why`: the test prints that
/// it skipped, unless `require_var=1` (set by CI wherever the machine has it) makes the
/// absence a failure.
pub fn skip_unless_required(require_var: &str, what: &str, why: &str) {
    assert!(
        std::env::var(require_var).as_deref() != Ok("1"),
        "{what} is required ({require_var}=1) but unavailable: {why}"
    );
    eprintln!("SKIPPED: {what} is unavailable: {why}");
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The `replicator` binary built for these tests.
pub fn replicator_bin() -> PathBuf {
    workspace_bin("replicator", "replicator")
}

/// A binary of this workspace, built (once per test process) in the profile of the tests, so
/// it is never older than the library under test.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == package) {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", package, "--bins"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        scrub_cargo_env(&mut cmd);
        let status = cmd.status().expect("cargo build");
        assert!(status.success(), "building {package} failed");
        built.push(package.to_string());
    }
    dir.join(bin)
}

/// Removes what cargo sets for a test process from a nested cargo command: build scripts
/// (ring's) watch some of these, so passing them on would rebuild the TLS stack every run.
pub fn scrub_cargo_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
            || k == "CARGO_TARGET_TMPDIR"
            || k == "OUT_DIR"
        {
            cmd.env_remove(&key);
        }
    }
}

/// The command `replicator sync --json SRC DST` with a private state dir.
pub fn sync_command(src: &Path, dst: &Path, state: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(replicator_bin());
    cmd.arg("sync")
        .arg("--json")
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .arg(src)
        .arg(dst);
    cmd
}

/// Runs `replicator sync --json SRC DST` with a private state dir; returns output.
pub fn run_sync(src: &Path, dst: &Path, state: &Path, extra: &[&str]) -> Output {
    sync_command(src, dst, state, extra)
        .output()
        .expect("run replicator")
}

/// Runs `replicator sync SRC DST` with `REPLICATOR_CRASH_AT=at`: the process kills itself
/// (SIGKILL) on reaching that point.
pub fn crash_sync(src: &Path, dst: &Path, state: &Path, at: &str) -> Output {
    crash_sync_with(src, dst, state, at, &[])
}

/// [`crash_sync`] with more arguments for `sync`.
pub fn crash_sync_with(src: &Path, dst: &Path, state: &Path, at: &str, extra: &[&str]) -> Output {
    Command::new(replicator_bin())
        .env("REPLICATOR_CRASH_AT", at)
        .arg("sync")
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .arg(src)
        .arg(dst)
        .output()
        .expect("run replicator")
}

/// Parses the JSON summary of a successful run (panics with stderr otherwise).
pub fn summary(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "sync failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json summary")
}

/// Lets every timestamp written so far age past the quick check's racy window.
pub fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(1100));
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    replicator::demo::seeded_bytes(seed, len)
}
