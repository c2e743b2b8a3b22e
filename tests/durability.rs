//! Durable means fsynced, checked on the system calls of real syncs.
//!
//! A power cut loses whatever the kernel had not written out, so what a sync promises rests
//! on the order of its calls: a file's data is synced before the rename that gives it its
//! name (or no name ever shows a half-written file), and every directory whose entries
//! changed is synced before the destination is declared complete (its state file says
//! `complete`, the summary is printed). These tests run `replicator sync` under `strace -f`
//! and check that order call by call, on both ways a commit makes itself durable: `fsync` of
//! the few inodes it changed, and `syncfs` when it changed many (or created the root). The
//! same three syncs are then pushed over QUIC to a `replicator serve` run under `strace`,
//! the receiving end of a migration: there the state file's `complete` is the declaration,
//! written before the client is told `Done`.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::net::{Ident, ServerProc, client_sync};
use integration_tests::{assert_mirrors, bytes, settle, sync_command};

/// The calls traced: what writes data, what changes a directory, what syncs.
const TRACED: &str = "trace=fsync,fdatasync,syncfs,write,pwrite64,pwritev,pwritev2,\
copy_file_range,fallocate,ftruncate,rename,renameat,renameat2,unlink,unlinkat,rmdir,mkdir,\
mkdirat,link,linkat,symlink,symlinkat,mknod,mknodat";

/// One system call, positioned by the trace lines where it started and where it returned
/// (the same line unless another thread's call came in between).
#[derive(Debug)]
struct Call {
    start: usize,
    end: usize,
    name: String,
    args: String,
}

impl Call {
    /// The paths of the descriptors among its arguments (`strace -y` prints `3</a/b>`).
    fn fds(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut rest = self.args.as_str();
        while let Some(open) = rest.find('<') {
            let digits = rest[..open].bytes().rev().take_while(u8::is_ascii_digit);
            if digits.count() == 0 {
                rest = &rest[open + 1..];
                continue;
            }
            let Some(close) = rest[open..].find('>') else {
                break;
            };
            out.push(PathBuf::from(&rest[open + 1..open + close]));
            rest = &rest[open + close + 1..];
        }
        out
    }

    /// Its quoted string arguments (names relative to a directory descriptor, or paths).
    fn strings(&self) -> Vec<String> {
        self.args
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// The file a data-writing call writes to.
    fn written(&self) -> Option<PathBuf> {
        let fds = self.fds();
        match self.name.as_str() {
            "copy_file_range" => fds.get(1).cloned(),
            "write" | "pwrite64" | "pwritev" | "pwritev2" | "fallocate" | "ftruncate" => {
                fds.first().cloned()
            }
            _ => None,
        }
    }

    /// For a call that changes directory entries: the directories changed and the full
    /// paths of the entries (new name first for a rename).
    fn entries(&self) -> Vec<(PathBuf, PathBuf)> {
        let (fds, names) = (self.fds(), self.strings());
        let at = |dir: Option<&PathBuf>, name: &str| {
            let full = match dir {
                Some(d) if !name.starts_with('/') => d.join(name),
                _ => PathBuf::from(name),
            };
            let parent = full.parent().map(Path::to_path_buf).unwrap_or_default();
            (parent, full)
        };
        match self.name.as_str() {
            "rename" | "link" => names.iter().rev().map(|n| at(None, n)).collect(),
            "symlink" => names.get(1).map(|n| at(None, n)).into_iter().collect(),
            "unlink" | "rmdir" | "mkdir" | "mknod" => {
                names.first().map(|n| at(None, n)).into_iter().collect()
            }
            "renameat" | "renameat2" | "linkat" => {
                let mut v = Vec::new();
                if let (Some(n), Some(d)) = (names.get(1), fds.get(1)) {
                    v.push(at(Some(d), n));
                }
                if let (Some(n), Some(d)) = (names.first(), fds.first()) {
                    v.push(at(Some(d), n));
                }
                v
            }
            "symlinkat" => match (names.get(1), fds.first()) {
                (Some(n), Some(d)) => vec![at(Some(d), n)],
                _ => Vec::new(),
            },
            "unlinkat" | "mkdirat" | "mknodat" => match (names.first(), fds.first()) {
                (Some(n), Some(d)) => vec![at(Some(d), n)],
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    }
}

/// Parses `strace -f -y` output into calls that returned successfully, joining the halves of
/// calls another thread interrupted (`<unfinished ...>` / `<... name resumed>`).
fn parse(trace: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut pending: std::collections::HashMap<String, (usize, String, String)> =
        Default::default();
    for (i, line) in trace.lines().enumerate() {
        let Some((pid, text)) = line.split_once(' ') else {
            continue;
        };
        let text = text.trim_start();
        if let Some(resumed) = text.strip_prefix("<... ") {
            let Some((name, rest)) = resumed.split_once(" resumed>") else {
                continue;
            };
            let Some((start, pname, head)) = pending.remove(pid) else {
                continue;
            };
            assert_eq!(name, pname, "resumed call of pid {pid}: {line}");
            if let Some(args) = returned(rest) {
                calls.push(Call {
                    start,
                    end: i,
                    name: pname,
                    args: format!("{head}{args}"),
                });
            }
            continue;
        }
        let Some((name, after)) = text.split_once('(') else {
            continue;
        };
        if let Some(head) = after.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_string(), (i, name.to_string(), head.to_string()));
        } else if let Some(args) = returned(after) {
            calls.push(Call {
                start: i,
                end: i,
                name: name.to_string(),
                args: args.to_string(),
            });
        }
    }
    calls
}

/// The arguments of a call that returned something other than an error.
fn returned(after: &str) -> Option<&str> {
    // strace pads short calls: `fsync(3</a>)   = 0`.
    let (args, ret) = after.rsplit_once(" = ")?;
    let args = args.trim_end().strip_suffix(')')?;
    (!ret.starts_with('-')).then_some(args)
}

/// A sync under `strace`, and its calls.
struct Traced {
    calls: Vec<Call>,
    summary: serde_json::Value,
    /// The traced process prints the summary that declares the destination complete (a
    /// local sync does; a server only writes its state file, then tells the client).
    prints_summary: bool,
}

/// `cmd` run by `strace -f`, which writes the calls of its every thread to `log`.
fn under_strace(cmd: &Command, log: &Path) -> Command {
    let mut strace = Command::new("strace");
    strace
        .args(["-f", "-y", "-qq", "-s", "256", "-e", TRACED, "-o"])
        .arg(log)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    strace
}

/// The calls `strace` wrote to `log` (removed after reading).
fn read_trace(log: &Path) -> Vec<Call> {
    let trace = fs::read_to_string(log).unwrap();
    fs::remove_file(log).unwrap();
    parse(&trace)
}

fn traced_sync(src: &Path, dst: &Path, state: &Path) -> Traced {
    let log = state.with_extension("trace");
    let out = under_strace(&sync_command(src, dst, state, &[]), &log)
        .output()
        .unwrap_or_else(|e| panic!("cannot run strace ({e}): install it (apt-get install strace)"));
    Traced {
        summary: integration_tests::summary(&out),
        calls: read_trace(&log),
        prints_summary: true,
    }
}

/// Both ends of a push to `replicator serve` over QUIC on loopback; the server, started
/// for this one session under `strace`, is the end traced.
struct Push {
    server: Ident,
    client: Ident,
    root: PathBuf,
    state: PathBuf,
}

impl Push {
    fn new(dir: &Path) -> Push {
        Push {
            server: Ident::create(&dir.join("server-id")),
            client: Ident::create(&dir.join("client-id")),
            root: dir.join("volumes"),
            state: dir.join("client-state"),
        }
    }

    fn traced(&self, src: &Path, volume: &str) -> Traced {
        let log = self.root.with_extension("trace");
        let serve = ServerProc::command(
            &self.server,
            &self.root,
            &[&self.client],
            "127.0.0.1:0",
            &[],
        );
        let mut server = ServerProc::spawn(under_strace(&serve, &log), &self.server, &self.root);
        let out = client_sync(
            &self.client,
            &self.server.fingerprint,
            src.to_str().unwrap(),
            &format!("{}/{volume}", server.addr),
            &self.state,
            &[],
        );
        let summary = integration_tests::summary(&out);
        // SIGTERM to the server itself: strace told to stop would leave it running,
        // detached. strace ends once its tracee has, with the whole trace written.
        let pid = server.child.id();
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        for child in children.split_whitespace() {
            assert!(
                Command::new("kill")
                    .args(["-TERM", child])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        server.child.wait().unwrap();
        Traced {
            summary,
            calls: read_trace(&log),
            prints_summary: false,
        }
    }
}

impl Traced {
    /// Where the sync declares the destination complete: the first of the write of a state
    /// file saying `complete` and the write of the summary to stdout.
    fn declared(&self) -> usize {
        self.calls
            .iter()
            .filter(|c| c.name == "write")
            .filter(|c| {
                let to = c.fds();
                let state = to
                    .first()
                    .is_some_and(|p| p.to_string_lossy().contains(".state.json.tmp"))
                    && c.args.contains(r#"\"status\": \"complete\""#);
                state || (self.prints_summary && c.args.starts_with("1<"))
            })
            .map(|c| c.start)
            .min()
            .expect("neither a complete state file nor a summary was written")
    }

    /// True when the data of `path` (or the filesystem under `root`) was synced by a call
    /// that started after `after` and returned before `before`.
    fn synced(&self, path: &Path, root: &Path, after: usize, before: usize) -> bool {
        self.calls.iter().any(|c| {
            c.start > after
                && c.end < before
                && match c.name.as_str() {
                    "fsync" | "fdatasync" => c.fds().first().is_some_and(|p| p == path),
                    "syncfs" => c.fds().first().is_some_and(|p| p.starts_with(root)),
                    _ => false,
                }
        })
    }

    fn syncfs_calls(&self) -> usize {
        self.calls.iter().filter(|c| c.name == "syncfs").count()
    }

    /// Checks the order of one sync's calls into `dst` and returns how many names it
    /// checked: data synced before every rename of a temp file into place, and every changed
    /// directory synced before the destination is declared complete.
    fn check(&self, dst: &Path) -> usize {
        let declared = self.declared();
        let mut names = 0;
        for (i, c) in self.calls.iter().enumerate() {
            let entries = c.entries();
            let inside: Vec<_> = entries
                .iter()
                .filter(|(_, full)| full.starts_with(dst))
                .collect();
            if inside.is_empty() {
                continue;
            }
            assert!(
                c.start < declared,
                "{} after the destination was declared complete",
                c.args
            );
            if c.name.starts_with("rename") {
                let from = &entries[1].1;
                let temp = from.file_name().unwrap().to_string_lossy();
                if temp.starts_with(".rpl-") {
                    let wrote = self.calls[..i]
                        .iter()
                        .filter(|w| w.written().as_deref() == Some(from.as_path()))
                        .map(|w| w.end)
                        .max()
                        .unwrap_or(0);
                    assert!(
                        self.synced(from, dst, wrote, c.start),
                        "{} renamed into place before its data was synced",
                        from.display()
                    );
                    names += 1;
                }
            }
            for (dir, full) in inside {
                assert!(
                    self.synced(dir, dst, c.end, declared),
                    "{} changed in {} but that directory was not synced before the \
                     destination was declared complete",
                    full.display(),
                    dir.display()
                );
            }
        }
        names
    }
}

/// Rewrites `count` files of `dir` (with `tag` in each) and removes the next one.
fn edit(dir: &Path, count: usize, tag: &str) {
    for i in 0..count {
        fs::write(dir.join(format!("f{i}")), format!("{tag} {i}\n")).unwrap();
    }
    fs::remove_file(dir.join(format!("f{count}"))).unwrap();
}

/// The source every scenario starts from: 200 small files in one directory, a 3 MiB file,
/// a subdirectory.
fn make_source(src: &Path) {
    let dir = src.join("dir");
    fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..200 {
        fs::write(dir.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    fs::write(src.join("big"), bytes(3, 3 << 20)).unwrap();
    fs::write(dir.join("sub/small"), b"small").unwrap();
    settle();
}

/// Three syncs of `src` (made by [`make_source`]) to `dst`, each traced by `sync`, checked
/// call by call: the first, into a root the sync creates (synced with its filesystem); a
/// few changes (each inode fsynced on its own); many changes and a symlink (one syncfs).
fn three_syncs_are_durable(src: &Path, dst: &Path, mut sync: impl FnMut() -> Traced) {
    let dir = src.join("dir");
    let first = sync();
    assert_mirrors(src, dst);
    assert!(first.check(dst) > 200, "every file was checked");
    assert!(
        first.syncfs_calls() > 0,
        "a created root is synced with its filesystem"
    );

    // A few changes, in two directories, and a new one: each inode is fsynced on its own.
    edit(&dir, 2, "first edit");
    let mut big = bytes(3, 3 << 20);
    big[1 << 20..(1 << 20) + 4096].fill(7);
    fs::write(src.join("big"), &big).unwrap();
    fs::create_dir(dir.join("sub/new")).unwrap();
    fs::write(dir.join("sub/new/n"), b"n").unwrap();
    settle();
    let few = sync();
    assert_mirrors(src, dst);
    assert_eq!(few.check(dst), 4, "f0, f1, big and sub/new/n were replaced");
    assert_eq!(few.syncfs_calls(), 0, "few inodes: fsynced one by one");
    assert_eq!(few.summary["files_written"], 4, "{}", few.summary);

    // Many changes and a symlink: the commit syncs the filesystem instead.
    edit(&dir, 150, "second edit");
    symlink("f0", dir.join("link")).unwrap();
    settle();
    let many = sync();
    assert_mirrors(src, dst);
    assert_eq!(
        many.check(dst),
        151,
        "150 files, and the link made under a temp name"
    );
    assert!(many.syncfs_calls() > 0, "many inodes: one syncfs");
}

#[test]
fn data_and_directories_are_synced_before_a_sync_declares_the_volume_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    // Created by the sync, with a parent: the root's creation is synced too.
    let dst = tmp.path().join("volumes/dst");
    make_source(&src);
    three_syncs_are_durable(&src, &dst, || traced_sync(&src, &dst, &state));
}

#[test]
fn a_server_syncs_data_and_directories_before_it_declares_a_pushed_volume_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src);
    let push = Push::new(tmp.path());
    let dst = push.root.join("pushed");
    three_syncs_are_durable(&src, &dst, || push.traced(&src, "pushed"));
}
