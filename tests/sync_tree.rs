//! Tree mode end to end: every awkward case of a real volume, through the real binary.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::ffi::OsStr;
use std::fs::{self, File, FileTimes};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use integration_tests::*;
use rustix::fs::{self as rfs, FileType, Mode};

/// A scratch directory with the paths of a source, a destination and a state directory.
fn volumes() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name| tmp.path().join(name);
    let (src, dst, state) = (path("src"), path("dst"), path("state"));
    (tmp, src, dst, state)
}

/// `count` files `d/f-<i>` of `len` seeded bytes each (seeds `seed`, `seed + 1`, ...).
fn small_files(src: &Path, count: u64, seed: u64, len: usize) {
    fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..count {
        fs::write(src.join(format!("d/f-{i}")), bytes(seed + i, len)).unwrap();
    }
}

fn set_mtime(path: &Path, secs: u64, nanos: u32) {
    let t = UNIX_EPOCH + Duration::new(secs, nanos);
    let f = File::options()
        .read(true)
        .open(path)
        .expect("open for times");
    f.set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .expect("set times");
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rfs::lsetxattr(path, name, value, rfs::XattrFlags::empty())
        .expect("setxattr (does the filesystem support user xattrs?)");
}

fn build_awkward_tree(src: &Path) {
    fs::create_dir_all(src.join("dir/nested/deeper")).unwrap();
    fs::write(src.join("plain.txt"), b"hello\n").unwrap();
    set_mtime(&src.join("plain.txt"), 1_600_000_000, 123_456_789);
    for (name, mode) in [("setuid", 0o4755), ("setgid", 0o2750), ("private", 0o600)] {
        fs::write(src.join(name), name.as_bytes()).unwrap();
        fs::set_permissions(src.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::create_dir(src.join("sticky")).unwrap();
    fs::set_permissions(src.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    set_xattr(&src.join("plain.txt"), "user.color", b"blue");
    set_xattr(&src.join("dir"), "user.dirattr", b"\x00\x01binary");
    // Hard links: a pair and a triple.
    fs::write(src.join("pair-a"), bytes(1, 50_000)).unwrap();
    fs::hard_link(src.join("pair-a"), src.join("dir/pair-b")).unwrap();
    fs::write(src.join("triple-1"), b"three names").unwrap();
    fs::hard_link(src.join("triple-1"), src.join("triple-2")).unwrap();
    fs::hard_link(src.join("triple-1"), src.join("dir/nested/triple-3")).unwrap();
    // Sparse: 32 MiB with 100 KB of data in the middle and at the end.
    let f = File::create(src.join("sparse.img")).unwrap();
    f.set_len(32 << 20).unwrap();
    f.write_all_at(&bytes(2, 100_000), 16 << 20).unwrap();
    f.write_all_at(&bytes(3, 4096), (32 << 20) - 4096).unwrap();
    drop(f);
    // Symlinks: relative, dangling, absolute.
    symlink("plain.txt", src.join("link-rel")).unwrap();
    symlink("does/not/exist", src.join("link-dangling")).unwrap();
    symlink("/etc/passwd", src.join("link-abs")).unwrap();
    // Odd names: spaces, newline, invalid UTF-8.
    fs::write(src.join("a name with spaces"), b"1").unwrap();
    fs::write(src.join("new\nline"), b"2").unwrap();
    fs::write(src.join(OsStr::from_bytes(b"bad-\xff\xfe-utf8")), b"3").unwrap();
    // A FIFO, and device nodes and foreign owners when we may create them.
    let d = rfs::open(src, rfs::OFlags::DIRECTORY, Mode::empty()).unwrap();
    rfs::mknodat(&d, "fifo", FileType::Fifo, Mode::from_raw_mode(0o640), 0).unwrap();
    if is_root() {
        rfs::mknodat(
            &d,
            "null-dev",
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rfs::makedev(1, 3),
        )
        .unwrap();
        rfs::chownat(
            &d,
            "private",
            Some(rfs::Uid::from_raw(1234)),
            Some(rfs::Gid::from_raw(5678)),
            rfs::AtFlags::empty(),
        )
        .unwrap();
        rfs::chownat(
            &d,
            "link-rel",
            Some(rfs::Uid::from_raw(42)),
            Some(rfs::Gid::from_raw(43)),
            rfs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        // chown clears setuid: set it again, as a real tree would have it.
        rfs::chownat(
            &d,
            "setuid",
            Some(rfs::Uid::from_raw(7)),
            None,
            rfs::AtFlags::empty(),
        )
        .unwrap();
        fs::set_permissions(src.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    } else {
        eprintln!("not root: skipping device nodes and foreign owners");
    }
    // Directory times last (creating children changes them).
    set_mtime(&src.join("dir/nested/deeper"), 1_500_000_000, 1);
    set_mtime(&src.join("dir/nested"), 1_500_000_001, 999_999_999);
    set_mtime(&src.join("dir"), 1_500_000_002, 5);
}

#[test]
fn every_awkward_case_is_mirrored() {
    let (_tmp, src, dst, state) = volumes();
    build_awkward_tree(&src);
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
    assert_eq!(s["mode"], "tree");
    // Holes were neither sent nor written.
    assert!(
        allocated(&dst.join("sparse.img")) < 1 << 20,
        "sparse file was filled in"
    );
    assert!(s["bytes_sent_raw"].as_u64().unwrap() < 1 << 20);
    // Digests agree, computed independently on each side.
    let digest = |p: &Path| {
        let out = Command::new(replicator_bin())
            .arg("digest")
            .arg(p)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(digest(&src), digest(&dst));
    assert_eq!(digest(&dst), s["root"].as_str().unwrap());
    // No bookkeeping of ours is left inside the destination.
    let leftovers: Vec<_> = describe(&dst)
        .into_keys()
        .filter(|p| p.windows(5).any(|w| w == b".rpl-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn deletions_renames_and_type_changes_are_applied() {
    let (_tmp, src, dst, state) = volumes();
    fs::create_dir_all(src.join("will-be-file/sub")).unwrap();
    fs::write(src.join("will-be-file/sub/x"), b"x").unwrap();
    fs::write(src.join("will-be-dir"), b"file").unwrap();
    symlink("target", src.join("will-be-regular")).unwrap();
    fs::write(src.join("deleted"), b"gone soon").unwrap();
    fs::write(src.join("moved"), bytes(9, 200_000)).unwrap();
    fs::write(src.join("linked"), b"shared").unwrap();
    fs::hard_link(src.join("linked"), src.join("linked-2")).unwrap();
    summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);

    fs::remove_dir_all(src.join("will-be-file")).unwrap();
    fs::write(src.join("will-be-file"), b"now a file").unwrap();
    fs::remove_file(src.join("will-be-dir")).unwrap();
    fs::create_dir(src.join("will-be-dir")).unwrap();
    fs::write(src.join("will-be-dir/inner"), b"inner").unwrap();
    fs::remove_file(src.join("will-be-regular")).unwrap();
    fs::write(src.join("will-be-regular"), b"regular").unwrap();
    fs::remove_file(src.join("deleted")).unwrap();
    fs::create_dir(src.join("new-home")).unwrap();
    fs::rename(src.join("moved"), src.join("new-home/moved")).unwrap();
    // Break the hard link: linked-2 becomes its own file with the same content.
    fs::remove_file(src.join("linked-2")).unwrap();
    fs::write(src.join("linked-2"), b"shared").unwrap();
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
    // The manifest went as a delta (here nearly every entry changed or went away).
    assert_eq!(s["manifest_delta"], true, "{s}");
    assert!(s["deleted"].as_u64().unwrap() >= 2);
    // The renamed file's data came from the destination itself, not over the wire.
    assert!(s["bytes_copied_locally"].as_u64().unwrap() >= 200_000);
    assert!(s["bytes_sent_raw"].as_u64().unwrap() < 1000, "{s}");
}

#[test]
fn incremental_sync_reads_and_sends_only_what_changed() {
    let (_tmp, src, dst, state) = volumes();
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big"), bytes(1, 8 << 20)).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("small-{i}")), bytes(100 + i, 3000)).unwrap();
    }
    settle();
    let first = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(first["chunks_sent"], first["chunks_total"]);
    settle();
    let nothing = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(nothing["chunks_sent"], 0);
    assert_eq!(nothing["bytes_read"], 0, "unchanged files were re-read");
    assert_eq!(nothing["files_written"], 0);

    let f = File::options()
        .append(true)
        .open(src.join("small-7"))
        .unwrap();
    f.write_all_at(b"appended", 3000).unwrap();
    let big = File::options().write(true).open(src.join("big")).unwrap();
    big.write_all_at(&bytes(77, 1000), 4 << 20).unwrap();
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
    assert!(s["chunks_sent"].as_u64().unwrap() <= 3, "{s}");
    assert!(s["bytes_read"].as_u64().unwrap() <= (8 << 20) + 3008, "{s}");
    // --checksum re-reads everything but still sends nothing new.
    let c = summary(&run_sync(&src, &dst, &state, &["--checksum"]));
    assert_eq!(
        c["bytes_read"].as_u64().unwrap(),
        (8 << 20) + 49 * 3000 + 3008
    );
    assert_eq!(c["chunks_sent"], 0);
}

/// `--inplace` patches a big file with a small change at its final name (same inode, only
/// the change written) and rebuilds, as without it, a small file, a file mostly rewritten and
/// a file with a second name (which must keep seeing the old content).
#[test]
fn inplace_patches_a_big_file_with_a_small_change_and_rebuilds_the_rest() {
    use std::os::unix::fs::MetadataExt;
    let (tmp, src, dst, state) = volumes();
    fs::create_dir(&src).unwrap();
    fs::write(src.join("db"), bytes(1, 8 << 20)).unwrap();
    fs::write(src.join("rewritten"), bytes(2, 2 << 20)).unwrap();
    fs::write(src.join("small"), bytes(3, 100_000)).unwrap();
    fs::write(src.join("linked"), bytes(4, 2 << 20)).unwrap();
    summary(&run_sync(&src, &dst, &state, &[]));
    let outside = tmp.path().join("second-name");
    fs::hard_link(dst.join("linked"), &outside).unwrap();
    // A sync that changes nothing records the new name's stat: the index vouches again.
    settle();
    summary(&run_sync(&src, &dst, &state, &[]));
    let inode = |name: &str| fs::metadata(dst.join(name)).unwrap().ino();
    let before: Vec<u64> = ["db", "rewritten", "small", "linked"].map(inode).to_vec();
    settle();

    let db = File::options().write(true).open(src.join("db")).unwrap();
    db.write_all_at(&bytes(10, 64 << 10), 3 << 20).unwrap();
    db.write_all_at(&bytes(11, 10_000), 8 << 20).unwrap();
    // A run of zeros is a hole in the manifest: the patch must clear it in the old file.
    db.write_all_at(&vec![0; 1 << 20], 6 << 20).unwrap();
    fs::write(src.join("rewritten"), bytes(12, 2 << 20)).unwrap();
    fs::write(src.join("small"), bytes(13, 100_000)).unwrap();
    let linked = File::options()
        .write(true)
        .open(src.join("linked"))
        .unwrap();
    linked.write_all_at(&bytes(14, 64 << 10), 1 << 20).unwrap();
    drop((db, linked));

    let dry = summary(&run_sync(&src, &dst, &state, &["--inplace", "-n"]));
    assert_eq!(
        (dry["files_written"].as_u64(), dry["files_patched"].as_u64()),
        (Some(4), Some(1)),
        "{dry}"
    );
    assert_eq!(
        before,
        ["db", "rewritten", "small", "linked"].map(inode).to_vec()
    );

    let s = summary(&run_sync(&src, &dst, &state, &["--inplace"]));
    assert_mirrors(&src, &dst);
    assert_eq!(
        (s["files_written"].as_u64(), s["files_patched"].as_u64()),
        (Some(4), Some(1)),
        "{s}"
    );
    assert_eq!(
        s["bytes_copied_locally"], dry["bytes_copied_locally"],
        "the dry run counts what the sync copies"
    );
    let after: Vec<u64> = ["db", "rewritten", "small", "linked"].map(inode).to_vec();
    assert_eq!(after[0], before[0], "db was patched where it is");
    for (i, name) in ["rewritten", "small", "linked"].iter().enumerate() {
        assert_ne!(
            after[i + 1],
            before[i + 1],
            "{name} was rebuilt under a temp name"
        );
    }
    assert_eq!(
        fs::read(&outside).unwrap(),
        bytes(4, 2 << 20),
        "a second name saw the change"
    );
    // Only the changed chunks came: a patch needs nothing the rebuild would not.
    assert!(
        s["bytes_sent_raw"].as_u64().unwrap() < (2 << 20) + 100_000 + (1 << 20),
        "{s}"
    );

    // Without the flag the same kind of change rebuilds the file.
    settle();
    let db = File::options().write(true).open(src.join("db")).unwrap();
    db.write_all_at(&bytes(15, 64 << 10), 5 << 20).unwrap();
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
    assert_eq!(s["files_patched"], 0, "{s}");
    assert_ne!(inode("db"), before[0]);
}

/// A first sync sends a repeated chunk once while it holds its slot in the window both ends
/// keep (docs/protocol.md, streamed sessions), and again after another chunk took the slot.
#[test]
fn a_first_sync_sends_a_repeated_chunk_again_only_after_its_window_slot_was_taken() {
    use replicator::chunk::ChunkId;
    use replicator::chunk::window::{MIN_SLOTS, slot};
    let content = |i: u32| format!("one small file, variant {i}\n").into_bytes();
    let a = content(0);
    // A sync of a few chunks keeps the window at its first size.
    let slot_of = |c: &[u8]| slot(&ChunkId::of(c), MIN_SLOTS);
    let find = |same: bool| {
        (1..)
            .map(content)
            .find(|x| (slot_of(x) == slot_of(&a)) == same)
    };
    let (b, c) = (find(true).unwrap(), find(false).unwrap());
    for (middle, sent) in [(&b, 3), (&c, 2)] {
        let (_tmp, src, dst, state) = volumes();
        fs::create_dir(&src).unwrap();
        for (name, body) in [("1", &a), ("2", middle), ("3", &a), ("4", &a)] {
            fs::write(src.join(name), body).unwrap();
        }
        let s = summary(&run_sync(&src, &dst, &state, &[]));
        assert_mirrors(&src, &dst);
        assert_eq!(s["chunks_total"], 4, "{s}");
        assert_eq!(s["chunks_sent"], sent, "{s}");
    }
}

#[test]
fn appending_to_a_file_sends_the_appended_bytes_not_its_old_last_chunk() {
    let (_tmp, src, dst, state) = volumes();
    fs::create_dir(&src).unwrap();
    // Incompressible, so the bytes sent are the bytes that changed.
    fs::write(src.join("log"), bytes(5, 1 << 20)).unwrap();
    settle();
    summary(&run_sync(&src, &dst, &state, &[]));
    settle();
    for round in 0..2u64 {
        let f = File::options().append(true).open(src.join("log")).unwrap();
        std::io::Write::write_all(&mut &f, &bytes(60 + round, 2000)).unwrap();
        drop(f);
        settle();
        let s = summary(&run_sync(&src, &dst, &state, &[]));
        assert_mirrors(&src, &dst);
        // The new chunk at the old last chunk's offset starts with that chunk, which the
        // receiver holds: only what follows it crosses.
        assert_eq!(s["chunks_sent"], 1, "{s}");
        assert_eq!(s["bytes_sent_raw"], 2000, "{s}");
        assert!(s["bytes_sent_wire"].as_u64().unwrap() < 6000, "{s}");
    }
}

#[test]
fn an_index_that_names_wrong_chunks_fails_the_sync_once_and_is_dropped() {
    use replicator::chunk::{ChunkId, ChunkerParams, Segment};
    use replicator::index::FileIndex;
    use replicator::manifest::RelPath;

    let (tmp, src, dst, state) = volumes();
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), bytes(11, 100_000)).unwrap();
    fs::write(src.join("b"), bytes(12, 5_000)).unwrap();
    settle();
    summary(&run_sync(&src, &dst, &state, &[]));
    // The index vouches for `a` with a chunk it does not hold, its stat unchanged: what a tool
    // that restores timestamps, or a damaged index, leads to.
    let index_file = replicator::state::StateDir::new(state.clone())
        .source(&src.canonicalize().unwrap())
        .index;
    let mut index = FileIndex::load(&index_file, ChunkerParams::default());
    let a = index
        .entries
        .get_mut(&RelPath::new(b"a".to_vec()).unwrap())
        .expect("a is indexed");
    assert!(!a.racy);
    let Some(Segment::Chunk { id, .. }) = a.segments.first_mut() else {
        panic!("a has a chunk")
    };
    *id = ChunkId::of(b"something else");
    index.save(&index_file).unwrap();

    let other = tmp.path().join("other");
    let out = run_sync(&src, &other, &state, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("source changed during the sync"), "{err}");
    assert!(!index_file.exists(), "the index that lied is gone");
    let s = summary(&run_sync(&src, &other, &state, &[]));
    assert_mirrors(&src, &other);
    assert_eq!(s["bytes_read"], 105_000, "every file read again: {s}");
}

#[test]
fn a_file_cut_short_inside_its_last_chunk_sends_nothing() {
    let (_tmp, src, dst, state) = volumes();
    fs::create_dir(&src).unwrap();
    let data = bytes(21, 1 << 20);
    fs::write(src.join("f"), &data).unwrap();
    settle();
    summary(&run_sync(&src, &dst, &state, &[]));
    settle();
    // The new last chunk is the first bytes of the old one: the destination holds them at the
    // same offset, though no chunk it knows of has that id.
    File::options()
        .write(true)
        .open(src.join("f"))
        .unwrap()
        .set_len((1 << 20) - 1000)
        .unwrap();
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
    assert_eq!(s["bytes_sent_raw"], 0, "{s}");
}

#[test]
fn the_receiver_index_is_rewritten_only_when_it_changes() {
    use std::os::unix::fs::MetadataExt;

    let (_tmp, src, dst, state) = volumes();
    small_files(&src, 30, 40, 2000);
    settle();
    summary(&run_sync(&src, &dst, &state, &[]));
    let states = replicator::state::StateDir::new(state.clone());
    let index = states.target(&dst.canonicalize().unwrap()).index_file();
    let inode = || fs::metadata(&index).unwrap().ino();
    // The first sync wrote every file, so its index was rewritten once more after the racy
    // margin; a sync that finds everything as recorded leaves the file alone.
    let first = inode();
    for _ in 0..2 {
        summary(&run_sync(&src, &dst, &state, &[]));
        assert_eq!(inode(), first, "an unchanged index was written again");
    }
    // A changed file changes its record: the index is replaced.
    fs::write(src.join("d/f-3"), bytes(99, 2500)).unwrap();
    settle();
    summary(&run_sync(&src, &dst, &state, &[]));
    assert_ne!(inode(), first);
    assert_mirrors(&src, &dst);
}

#[test]
fn a_sync_that_changes_nothing_still_notices_later_changes_to_the_destination() {
    let (_tmp, src, dst, state) = volumes();
    small_files(&src, 20, 300, 5000);
    settle();
    summary(&run_sync(&src, &dst, &state, &[]));
    settle();
    // Nothing changed: verified from what the receiver's own walk saw, twice in a row, and
    // not a single manifest entry crossed (the delta against the last sync is empty).
    for _ in 0..2 {
        let s = summary(&run_sync(&src, &dst, &state, &[]));
        assert_eq!(s["files_written"], 0, "{s}");
        assert_eq!(s["chunks_sent"], 0, "{s}");
        assert_eq!(s["manifest_delta"], true, "{s}");
        assert_eq!(s["entries_sent"], 0, "{s}");
    }
    // Someone scribbles on the copy (same size) and adds a stray file. The source did not
    // change, so the delta is still empty: the receiver checks its copy against the whole
    // manifest, not against what was sent.
    fs::write(dst.join("d/f-3"), bytes(999, 5000)).unwrap();
    fs::write(dst.join("d/stray"), b"not in the source").unwrap();
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(s["entries_sent"], 0, "{s}");
    assert_eq!(s["files_written"], 1, "{s}");
    assert_eq!(s["deleted"], 1, "{s}");
    assert_mirrors(&src, &dst);
    settle();
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(s["files_written"], 0, "{s}");
}

/// The system calls named in `calls` (strace's `trace=` list) that a sync made, one per
/// line as strace prints them, from both ends (a local sync runs both in one process).
fn traced(src: &Path, dst: &Path, state: &Path, calls: &str) -> String {
    let log = state.with_extension("trace");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", &format!("trace={calls}"), "-o"])
        .arg(&log)
        .arg(replicator_bin())
        .args(sync_command(src, dst, state, &[]).get_args())
        .output()
        .unwrap_or_else(|e| panic!("cannot run strace ({e}): install it (apt-get install strace)"));
    summary(&out);
    let trace = fs::read_to_string(&log).unwrap();
    fs::remove_file(&log).unwrap();
    trace
}

/// The paths whose attributes a sync under `strace` listed, from both ends.
fn attributes_listed(src: &Path, dst: &Path, state: &Path) -> Vec<String> {
    traced(src, dst, state, "llistxattr,listxattr,flistxattr")
        .lines()
        .filter_map(|l| l.split('"').nth(1).map(str::to_owned))
        .collect()
}

/// Both walks take a file's attributes from its index record instead of listing them, while
/// the file's stat is unchanged since: setting or removing an attribute stamps the ctime.
/// So a sync that changes nothing lists only directories' attributes, whether files have
/// attributes or not (on SELinux hosts every file has a label), and an attribute added or
/// removed at either end since is listed, seen and mirrored.
#[test]
fn attributes_are_listed_only_where_the_index_cannot_vouch_for_them() {
    let (_tmp, src, dst, state) = volumes();
    small_files(&src, 6, 700, 3000);
    for i in [0, 3] {
        set_xattr(&src.join(format!("d/f-{i}")), "user.label", b"kept");
    }
    settle();
    summary(&run_sync(&src, &dst, &state, &[]));
    settle();
    let at = |root: &Path, name: &str| root.join(name).to_string_lossy().into_owned();
    let files_listed = |listed: &[String]| -> Vec<String> {
        let files: Vec<String> = [&src, &dst]
            .iter()
            .flat_map(|root| (0..6).map(|i| at(root, &format!("d/f-{i}"))))
            .collect();
        listed
            .iter()
            .filter(|p| files.contains(p))
            .cloned()
            .collect()
    };
    let listed = attributes_listed(&src, &dst, &state);
    assert!(
        listed.contains(&at(&src, "d")) && listed.contains(&at(&dst, "d")),
        "{listed:?}"
    );
    assert_eq!(files_listed(&listed), Vec::<String>::new());
    assert_mirrors(&src, &dst);
    // Attributes change at both ends; no file's content or mtime does.
    set_xattr(&src.join("d/f-1"), "user.added", b"on the source");
    rfs::lremovexattr(src.join("d/f-0"), "user.label").unwrap();
    set_xattr(&dst.join("d/f-2"), "user.stray", b"on the copy only");
    // Each end's walk lists what changed there (the receiver also lists the files whose
    // attributes it fixes), and nothing else.
    let listed = files_listed(&attributes_listed(&src, &dst, &state));
    for seen in [at(&src, "d/f-0"), at(&src, "d/f-1"), at(&dst, "d/f-2")] {
        assert!(listed.contains(&seen), "{seen} not listed: {listed:?}");
    }
    for root in [&src, &dst] {
        for i in 3..6 {
            let unchanged = at(root, &format!("d/f-{i}"));
            assert!(
                !listed.contains(&unchanged),
                "{unchanged} listed: {listed:?}"
            );
        }
    }
    assert_mirrors(&src, &dst);
    // The source's new records were racy (changed just before the scan): one more sync
    // settles them, then no file is listed again.
    settle();
    summary(&run_sync(&src, &dst, &state, &[]));
    settle();
    let listed = attributes_listed(&src, &dst, &state);
    assert_eq!(files_listed(&listed), Vec::<String>::new());
    assert_mirrors(&src, &dst);
}

/// A first sync into an empty volume makes per file only the calls it needs: it looks for
/// no partial temp file (its walk met none), sizes no file its writes already sized, and
/// asks no file under 64 KiB out of the cache (advice on a dirty file submits its write-out
/// on its own, where the kernel would merge many). A rerun after an interrupted sync does
/// look for the temp files it left, and resumes them.
#[test]
fn a_first_sync_makes_no_call_per_file_it_can_do_without() {
    let (_tmp, src, dst, state) = volumes();
    small_files(&src, 20, 900, 3000);
    // One file ends in a hole (its zero chunks after the first are not written), one is
    // large enough for write-behind advice.
    let holed = File::create(src.join("d/holed")).unwrap();
    holed.write_all_at(&bytes(76, 5000), 0).unwrap();
    holed.set_len(1 << 20).unwrap();
    fs::write(src.join("d/big"), bytes(77, 256 << 10)).unwrap();
    let trace = traced(&src, &dst, &state, "openat,ftruncate,fadvise64");
    assert_mirrors(&src, &dst);
    let lines = |has: &[&str]| -> Vec<String> {
        trace
            .lines()
            .filter(|l| has.iter().all(|h| l.contains(h)))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(lines(&[".rpl-", "O_RDONLY"]), Vec::<String>::new());
    assert_eq!(
        lines(&["ftruncate("]).len(),
        1,
        "only the holed file: {trace}"
    );
    assert_eq!(
        lines(&["fadvise64(", "DONTNEED"]).len(),
        2,
        "the two files of 64 KiB or more, once each: {trace}"
    );
    // Interrupted after a few chunks, the next sync finds the temp files it left.
    let (_tmp2, src2, dst2, state2) = volumes();
    small_files(&src2, 20, 900, 3000);
    let out = crash_sync(&src2, &dst2, &state2, "chunk:5");
    assert!(!out.status.success(), "the crash point was not reached");
    let trace = traced(&src2, &dst2, &state2, "openat");
    assert_mirrors(&src2, &dst2);
    let looked = trace
        .lines()
        .filter(|l| l.contains(".rpl-") && l.contains("O_RDONLY"))
        .count();
    assert!(looked >= 5, "partial temp files not looked for: {trace}");
}

#[test]
fn a_lost_or_damaged_delta_base_costs_a_full_manifest_and_nothing_else() {
    let (_tmp, src, dst, state) = volumes();
    small_files(&src, 30, 400, 3000);
    summary(&run_sync(&src, &dst, &state, &[]));
    // The receiver keeps one manifest; the sender a few, named by root, in a `.manifests`
    // directory: every one of them is damaged.
    let stored = |side: &str| -> Vec<PathBuf> {
        let found: Vec<_> = walkdir_files(&state.join(side))
            .into_iter()
            .filter(|p| {
                p.ends_with("manifest")
                    || p.parent().and_then(Path::extension) == Some(OsStr::new("manifests"))
            })
            .collect();
        assert!(!found.is_empty(), "{side}: no kept manifest");
        found
    };
    // Each time one end's copy is damaged or gone: a full manifest, a correct result, and
    // both copies renewed, so the sync after that is a delta again.
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 3] = [
        ("targets", |p| fs::remove_file(p).unwrap()),
        ("sources", |p| {
            let len = fs::metadata(p).unwrap().len();
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len - 1)
                .unwrap()
        }),
        ("targets", |p| {
            // Same size, one bit flipped: only the hash can tell.
            let mut b = fs::read(p).unwrap();
            let last = b.len() - 1;
            b[last] ^= 1;
            fs::write(p, b).unwrap()
        }),
    ];
    for (i, (side, damage)) in damages.into_iter().enumerate() {
        fs::write(src.join(format!("d/f-{i}")), bytes(900 + i as u64, 3100)).unwrap();
        stored(side).iter().for_each(|p| damage(p));
        let s = summary(&run_sync(&src, &dst, &state, &[]));
        assert_mirrors(&src, &dst);
        assert_eq!(s["manifest_delta"], false, "{side}: {s}");
        assert_eq!(s["entries_sent"], s["entries"], "{side}: {s}");
        assert_eq!(s["chunks_sent"], 1, "{side}: {s}");
        fs::write(src.join("d/f-29"), bytes(950 + i as u64, 3000)).unwrap();
        let s = summary(&run_sync(&src, &dst, &state, &[]));
        assert_mirrors(&src, &dst);
        assert_eq!(s["manifest_delta"], true, "{side}: {s}");
        assert_eq!(s["entries_sent"], 1, "{side}: {s}");
    }
}

/// Every regular file below `dir`.
fn walkdir_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_source_synced_to_several_destinations_in_turn_sends_deltas_to_each() {
    let (_tmp, src, dst, state) = volumes();
    small_files(&src, 40, 500, 2000);
    // Four destinations, the source edited before each sync: each destination's last
    // manifest differs from the others', and all four are still kept by the source.
    let targets: Vec<PathBuf> = (0..4)
        .map(|i| dst.with_file_name(format!("dst{i}")))
        .collect();
    let mut roots = std::collections::HashSet::new();
    for round in 0..2u64 {
        for (i, t) in targets.iter().enumerate() {
            let seed = 700 + 10 * round + i as u64;
            fs::write(src.join("d/f-7"), bytes(seed, 2100)).unwrap();
            let s = summary(&run_sync(&src, t, &state, &[]));
            assert_mirrors(&src, t);
            roots.insert(s["root"].as_str().unwrap().to_string());
            if round > 0 {
                assert_eq!(s["manifest_delta"], true, "{}: {s}", t.display());
                assert_eq!(s["entries_sent"], 1, "{s}");
            }
        }
    }
    assert_eq!(roots.len(), 8, "every sync had its own manifest");
}

#[test]
fn a_source_read_error_aborts_before_touching_the_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    fs::set_permissions(base, fs::Permissions::from_mode(0o777)).unwrap();
    let (src, dst, state) = (base.join("src"), base.join("dst"), base.join("state"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("keep"), b"v1").unwrap();
    fs::write(src.join("old"), b"will be deleted in the source").unwrap();
    summary(&run_sync(&src, &dst, &state, &[]));
    fs::remove_file(src.join("old")).unwrap();
    fs::write(src.join("keep"), b"v2").unwrap();
    fs::create_dir(src.join("newdir")).unwrap();
    fs::write(src.join("newdir/unreadable"), b"secret").unwrap();
    fs::set_permissions(
        src.join("newdir/unreadable"),
        fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let before = describe(&dst);

    let mut cmd = if is_root() {
        // Root reads anything: run the sync as nobody, owning everything but that one file.
        for p in [&src, &dst, &state] {
            Command::new("chown")
                .args(["-R", "65534:65534"])
                .arg(p)
                .status()
                .unwrap();
        }
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        Command::new("chown")
            .arg("0:0")
            .arg(src.join("newdir/unreadable"))
            .status()
            .unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(replicator_bin());
        c
    } else {
        Command::new(replicator_bin())
    };
    let before = if is_root() { describe(&dst) } else { before };
    let out = cmd
        .arg("sync")
        .arg("--state-dir")
        .arg(&state)
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unreadable") && stderr.contains("ermission denied"),
        "{stderr}"
    );
    assert_eq!(
        describe(&dst),
        before,
        "destination changed after a failed sync"
    );
}

#[test]
fn nested_source_and_destination_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let out = run_sync(&src, &src.join("inside"), &tmp.path().join("state"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside source"));
    let out = run_sync(&src, tmp.path(), &tmp.path().join("state"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!src.join("inside").exists());
}

#[test]
fn bad_flags_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run_sync(
        tmp.path(),
        &tmp.path().join("x"),
        tmp.path(),
        &["--chunk-min", "1"],
    );
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(replicator_bin()).arg("sync").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_state_directory_that_cannot_be_written_fails_the_sync_and_changes_nothing() {
    let (tmp, src, dst, state) = volumes();
    small_files(&src, 20, 3, 2000);
    summary(&run_sync(&src, &dst, &state, &[]));
    fs::write(src.join("new"), b"new file").unwrap();
    let before = describe(&dst);
    // Not writable whoever runs it (root included): a regular file is in the way.
    let blocker = tmp.path().join("blocker");
    fs::write(&blocker, b"").unwrap();
    let out = run_sync(&src, &dst, &blocker.join("state"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("blocker"),
        "the error names the path: {stderr}"
    );
    assert_eq!(
        describe(&dst),
        before,
        "destination changed after a failed sync"
    );
    // With its state directory back, the sync completes.
    summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
}

/// Every kind of change, as `replicator sync --dry-run` prints it (volume order, one line
/// each, then the summary), with the destination, its state and the source's state left
/// byte for byte as they were; the sync that follows does what the dry run said.
#[test]
fn a_dry_run_prints_each_change_and_changes_nothing() {
    let (tmp, src, dst, state) = volumes();
    fs::create_dir_all(src.join("dir/gone")).unwrap();
    fs::write(src.join("dir/gone/old"), b"old").unwrap();
    fs::write(src.join("edited"), bytes(1, 100_000)).unwrap();
    fs::write(src.join("kept"), b"kept").unwrap();
    fs::write(src.join("mode"), b"mode").unwrap();
    fs::write(src.join("was-file"), b"file").unwrap();
    symlink("kept", src.join("link")).unwrap();
    let absent = tmp.path().join("absent");
    stdout_of(&mut sync_command(&src, &absent, &state, &["-n"]));
    assert!(!absent.exists(), "a dry run created its destination");
    summary(&run_sync(&src, &dst, &state, &[]));

    fs::remove_dir_all(src.join("dir/gone")).unwrap();
    fs::write(src.join("edited"), bytes(2, 100_000)).unwrap();
    fs::set_permissions(src.join("mode"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(src.join("was-file")).unwrap();
    fs::create_dir(src.join("was-file")).unwrap();
    fs::remove_file(src.join("link")).unwrap();
    symlink("mode", src.join("link")).unwrap();
    fs::write(src.join("new"), b"new").unwrap();
    // The directories' times as the destination has them: their listing alone changed.
    for d in ["", "dir"] {
        let t = fs::metadata(dst.join(d)).unwrap().modified().unwrap();
        let secs = t.duration_since(UNIX_EPOCH).unwrap();
        set_mtime(&src.join(d), secs.as_secs(), secs.subsec_nanos());
    }
    settle();
    let (dst_before, state_before) = (describe(&dst), describe(&state));
    let mut shown = Command::new(replicator_bin());
    shown.args(["sync", "--dry-run", "--state-dir"]);
    let text = stdout_of(shown.arg(&state).arg(&src).arg(&dst));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..lines.len() - 1],
        [
            "delete  dir/gone/",
            "delete  dir/gone/old",
            "update  edited",
            "update  link",
            "attrs   mode",
            "create  new",
            "update  was-file/",
        ],
        "{text}"
    );
    assert!(
        lines[lines.len() - 1].starts_with(&format!(
            "dry run, nothing changed: {} would write 2 files and delete 2 paths",
            dst.canonicalize().unwrap().display()
        )),
        "{text}"
    );
    let dry = summary(&run_sync(&src, &dst, &state, &["--dry-run"]));
    assert_eq!(
        describe(&dst),
        dst_before,
        "a dry run changed the destination"
    );
    assert_eq!(
        describe(&state),
        state_before,
        "a dry run changed the state"
    );
    assert_eq!(dry["dry_run"], true);
    let real = summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
    for field in ["files_written", "deleted", "chunks_sent", "root"] {
        assert_eq!(dry[field], real[field], "{field}: {dry} vs {real}");
    }
}

/// What a successful command printed on stdout.
fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
