//! The receiver's passes driven directly with hand-made manifests: what a hostile or odd
//! manifest gets, and what the commit and discard passes leave on disk.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{ApplyError, ApplyStats, ChunkFeed, Destination};
use crate::chunk::{ChunkId, ChunkerParams, Segment};
use crate::manifest::{Entry, EntryKind, Header, MANIFEST_VERSION, Meta, RelPath, VolumeMode};
use crate::progress::NoProgress;
use crate::state::TargetState;

/// The chunks a sender offers; with `fail_at`, the connection breaks before that many have
/// been served.
struct Chunks {
    offered: HashMap<ChunkId, Bytes>,
    served: usize,
    fail_at: Option<usize>,
}

impl ChunkFeed for Chunks {
    fn next_chunk(
        &mut self,
        expect: ChunkId,
        _base: Option<(ChunkId, &[u8])>,
    ) -> Result<Option<Bytes>, ApplyError> {
        if self.fail_at.is_some_and(|n| self.served >= n) {
            return Err(ApplyError::MissingChunks);
        }
        self.served += 1;
        self.offered
            .get(&expect)
            .cloned()
            .map(Some)
            .ok_or(ApplyError::MissingChunks)
    }
}

/// `len` bytes without long repeats, so a file of them is one chunk per its size.
fn scattered(len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn path(p: &str) -> RelPath {
    RelPath::new(p.as_bytes().to_vec()).unwrap()
}

fn meta(perm: u32) -> Meta {
    Meta {
        perm,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
        mtime_sec: 1_600_000_000,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    }
}

fn dir(p: &str) -> Entry {
    Entry {
        path: path(p),
        kind: EntryKind::Dir,
        meta: meta(0o755),
    }
}

fn file(p: &str, data: &[u8]) -> Entry {
    Entry {
        path: path(p),
        kind: EntryKind::File {
            size: data.len() as u64,
            segments: vec![Segment::Chunk {
                id: ChunkId::of(data),
                len: data.len() as u32,
            }],
        },
        meta: meta(0o644),
    }
}

fn link(p: &str, target: &str) -> Entry {
    Entry {
        path: path(p),
        kind: EntryKind::HardLink {
            target: path(target),
        },
        meta: Meta::default(),
    }
}

fn symlink(p: &str, target: &str) -> Entry {
    Entry {
        path: path(p),
        kind: EntryKind::Symlink {
            target: target.as_bytes().to_vec(),
        },
        meta: meta(0o777),
    }
}

struct Volume {
    _tmp: tempfile::TempDir,
    dst: PathBuf,
    state: PathBuf,
    /// How the last commit made its pass durable: `fsync`s of that many inodes, or `None`
    /// for a `syncfs`.
    synced: std::cell::Cell<Option<usize>>,
    /// How many old inodes the last commit held to free after the sync.
    held: std::cell::Cell<usize>,
}

impl Volume {
    fn new() -> Volume {
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join("dst");
        std::fs::create_dir(&dst).unwrap();
        Volume {
            dst,
            state: tmp.path().join("state"),
            synced: Default::default(),
            held: Default::default(),
            _tmp: tmp,
        }
    }

    /// Plans `entries`, writes and commits them, as a session does; a failure before the
    /// commit discards what was written.
    fn apply(&self, entries: Vec<Entry>) -> Result<ApplyStats, ApplyError> {
        self.apply_with(entries, true).map(|(stats, _)| stats)
    }

    /// Like `apply`; `offer`: whether the feed has the chunks at all. Also says whether the
    /// table of the destination's chunk places was built.
    fn apply_with(
        &self,
        entries: Vec<Entry>,
        offer: bool,
    ) -> Result<(ApplyStats, bool), ApplyError> {
        self.apply_failing(entries, offer, None)
    }

    /// Like `apply_with`; the feed breaks before serving `fail_at` chunks.
    fn apply_failing(
        &self,
        entries: Vec<Entry>,
        offer: bool,
        fail_at: Option<usize>,
    ) -> Result<(ApplyStats, bool), ApplyError> {
        let offered: HashMap<ChunkId, Bytes> = entries
            .iter()
            .filter(|e| offer && matches!(e.kind, EntryKind::File { .. }))
            .map(|e| {
                let data = Bytes::from(std::fs::read(self.content_of(e)).unwrap_or_default());
                (ChunkId::of(&data), data)
            })
            .collect();
        let header = Header {
            version: MANIFEST_VERSION,
            mode: VolumeMode::Tree,
            chunker: ChunkerParams::default(),
        };
        let state = TargetState {
            dir: self.state.clone(),
        };
        let mut dest = Destination::prepare(&self.dst, header, state)?;
        let planned = (|| {
            for e in entries {
                dest.plan(e)?;
            }
            dest.end_manifest()?;
            dest.take_wants();
            let mut feed = Chunks {
                offered,
                served: 0,
                fail_at,
            };
            dest.write(&mut feed, &NoProgress)
        })();
        if let Err(e) = planned {
            dest.discard();
            return Err(e);
        }
        let placed = matches!(dest.dst_chunks, super::DstChunks::Placed(_));
        let root = dest.manifest_digest();
        let committed = dest.commit(root, &NoProgress)?;
        self.synced.set(committed.dest.durable.last);
        self.held.set(committed.dest.retired.len());
        let stats = committed.stats;
        committed.save_index();
        Ok((stats, placed))
    }

    /// Where the test keeps the bytes of a file entry (outside the volume).
    fn content_of(&self, e: &Entry) -> PathBuf {
        self.state
            .with_extension("contents")
            .join(ChunkId::of(e.path.as_bytes()).to_hex())
    }

    fn file(&self, p: &str, data: &[u8]) -> Entry {
        let e = file(p, data);
        let at = self.content_of(&e);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, data).unwrap();
        e
    }

    /// Every path below the destination with its kind, size, inode and mtime.
    fn listing(&self) -> BTreeMap<String, (u32, u64, u64, i64)> {
        let mut out = BTreeMap::new();
        list(&self.dst, &self.dst, &mut out);
        out
    }
}

fn list(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, u64, u64, i64)>) {
    for item in std::fs::read_dir(dir).unwrap() {
        let p = item.unwrap().path();
        let m = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        out.insert(rel, (m.mode(), m.size(), m.ino(), m.mtime()));
        if m.is_dir() {
            list(root, &p, out);
        }
    }
}

fn refused(result: Result<ApplyStats, ApplyError>, needle: &str) {
    match result {
        Err(e) => assert!(e.to_string().contains(needle), "{e}"),
        Ok(_) => panic!("accepted; expected an error containing {needle:?}"),
    }
}

#[test]
fn a_hard_link_must_name_an_earlier_regular_file_and_a_refused_manifest_changes_nothing() {
    let v = Volume::new();
    v.apply(vec![dir(""), v.file("keep", b"kept")]).unwrap();
    let before = v.listing();
    let bad_targets: [(&str, Vec<Entry>); 5] = [
        ("a later file", vec![v.file("z", b"later")]),
        ("a missing path", vec![]),
        ("a directory", vec![dir("c-dir")]),
        ("a symlink", vec![symlink("c-sym", "keep")]),
        ("another link", vec![link("c-link", "keep")]),
    ];
    for (why, extra) in bad_targets {
        let target = match extra.first() {
            Some(e) => e.path.to_string(),
            None => "a-nowhere".to_string(),
        };
        let mut entries = vec![
            dir(""),
            v.file("b-new", b"new data"),
            v.file("keep", b"kept"),
        ];
        entries.push(link("m-link", &target));
        entries.extend(extra);
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        refused(v.apply(entries), "not an earlier regular file");
        assert_eq!(v.listing(), before, "the destination changed after {why}");
    }
}

#[test]
fn an_entry_without_its_parent_directory_before_it_is_refused() {
    let v = Volume::new();
    let entries = vec![dir(""), dir("a"), v.file("a/x", b"x"), v.file("b/y", b"y")];
    refused(v.apply(entries), "no parent directory");
    assert!(v.listing().is_empty(), "{:?}", v.listing());
}

#[test]
fn a_tree_manifest_needs_a_root_directory() {
    let v = Volume::new();
    v.apply(vec![dir(""), v.file("keep", b"kept")]).unwrap();
    let before = v.listing();
    // Empty, it would have left the destination as it is and called it a mirror of nothing.
    refused(v.apply(vec![]), "no root entry");
    refused(
        v.apply(vec![symlink("", "/etc")]),
        "root of a tree manifest",
    );
    refused(v.apply(vec![v.file("", b"x")]), "root of a tree manifest");
    assert_eq!(v.listing(), before);
}

#[test]
fn a_block_manifest_needs_one_file_root() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    std::fs::write(&image, b"an image").unwrap();
    let header = Header {
        version: MANIFEST_VERSION,
        mode: VolumeMode::Block,
        chunker: ChunkerParams::default(),
    };
    let cases: [(Vec<Entry>, &str); 3] = [
        (vec![], "no root entry"),
        (vec![dir("")], "root of a block manifest is not a file"),
        (
            vec![symlink("", "/etc")],
            "root of a block manifest is not a file",
        ),
    ];
    for (entries, needle) in cases {
        let state = TargetState {
            dir: tmp.path().join("state"),
        };
        let mut dest = Destination::prepare(&image, header, state).unwrap();
        let result = entries
            .into_iter()
            .try_for_each(|e| dest.plan(e))
            .and_then(|()| dest.end_manifest());
        dest.discard();
        refused(result.map(|()| ApplyStats::default()), needle);
        assert_eq!(std::fs::read(&image).unwrap(), b"an image");
    }
}

#[test]
fn hard_links_already_in_place_are_kept_and_missing_ones_made() {
    let v = Volume::new();
    let tree = |v: &Volume| {
        vec![
            dir(""),
            v.file("a", b"shared"),
            link("b", "a"),
            dir("d"),
            link("d/c", "a"),
        ]
    };
    v.apply(tree(&v)).unwrap();
    let first = v.listing();
    assert_eq!(first["a"].2, first["b"].2, "one inode");
    assert_eq!(first["a"].2, first["d/c"].2, "one inode");
    let again = v.apply(tree(&v)).unwrap();
    assert_eq!(again.files_written, 0);
    assert_eq!(v.listing(), first, "nothing was touched");
    // One name replaced by a separate file: the link is made again.
    std::fs::remove_file(v.dst.join("d/c")).unwrap();
    std::fs::write(v.dst.join("d/c"), b"shared").unwrap();
    v.apply(tree(&v)).unwrap();
    let fixed = v.listing();
    assert_eq!(fixed["a"].2, fixed["d/c"].2);
}

#[test]
fn temp_files_of_an_interrupted_run_are_resumed_or_removed() {
    let v = Volume::new();
    v.apply(vec![dir(""), dir("d"), v.file("d/old", b"old")])
        .unwrap();
    // An interrupted run left a temp file for a name the manifest still has (resumed) and
    // one for a name it no longer has (removed).
    let data = b"the whole content of a file";
    std::fs::write(
        v.dst
            .join("d")
            .join(std::str::from_utf8(&super::fsops::temp_name(b"new")).unwrap()),
        &data[..10],
    )
    .unwrap();
    std::fs::write(
        v.dst
            .join("d")
            .join(std::str::from_utf8(&super::fsops::temp_name(b"gone")).unwrap()),
        b"stale",
    )
    .unwrap();
    let s = v
        .apply(vec![
            dir(""),
            dir("d"),
            v.file("d/new", data),
            v.file("d/old", b"old"),
        ])
        .unwrap();
    assert_eq!(std::fs::read(v.dst.join("d/new")).unwrap(), data);
    let names: Vec<String> = v.listing().into_keys().collect();
    assert_eq!(names, ["d", "d/new", "d/old"]);
    assert_eq!(s.deleted, 1, "the stale temp file");
}

#[test]
fn a_directory_replaced_by_a_file_takes_its_contents_with_it() {
    let v = Volume::new();
    v.apply(vec![
        dir(""),
        dir("a"),
        v.file("a/x", b"x"),
        dir("a/y"),
        v.file("a/y/z", b"z"),
        v.file("b", b"b"),
    ])
    .unwrap();
    let s = v
        .apply(vec![dir(""), v.file("a", b"now a file"), v.file("b", b"b")])
        .unwrap();
    assert_eq!(std::fs::read(v.dst.join("a")).unwrap(), b"now a file");
    let names: Vec<String> = v.listing().into_keys().collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(s.files_written, 1);
}

#[test]
fn removed_subtrees_are_counted_entry_by_entry() {
    let v = Volume::new();
    v.apply(vec![
        dir(""),
        dir("gone"),
        dir("gone/deep"),
        v.file("gone/deep/f", b"f"),
        v.file("gone/g", b"g"),
        v.file("stays", b"s"),
    ])
    .unwrap();
    let s = v.apply(vec![dir(""), v.file("stays", b"s")]).unwrap();
    assert_eq!(s.deleted, 4);
    let names: Vec<String> = v.listing().into_keys().collect();
    assert_eq!(names, ["stays"]);
}

#[test]
fn a_discarded_run_removes_what_it_created_and_puts_directory_times_back() {
    let v = Volume::new();
    v.apply(vec![dir(""), dir("d"), v.file("d/f", b"f")])
        .unwrap();
    let before = v.listing();
    // Everything is written, then a chunk for the last file never comes.
    let mut entries = vec![
        dir(""),
        dir("d"),
        v.file("d/f", b"f"),
        v.file("d/new", b"new"),
        dir("d/sub"),
        v.file("d/sub/x", b"x"),
    ];
    entries.push(file("e-missing", b"no chunk for this one"));
    refused(
        v.apply(entries),
        "stopped before sending every wanted chunk",
    );
    assert_eq!(v.listing(), before);
}

#[test]
fn a_discarded_run_puts_back_a_file_it_was_replacing_with_a_directory() {
    let v = Volume::new();
    v.apply(vec![dir(""), v.file("a", b"keep me"), v.file("b", b"b")])
        .unwrap();
    let before = v.listing();
    // "a" becomes a directory with a file in it, then a chunk never comes.
    refused(
        v.apply(vec![
            dir(""),
            dir("a"),
            v.file("a/x", b"x"),
            v.file("b", b"b"),
            file("c-missing", b"no chunk for this one"),
        ]),
        "stopped before sending every wanted chunk",
    );
    assert_eq!(v.listing(), before);
    assert_eq!(std::fs::read(v.dst.join("a")).unwrap(), b"keep me");
    // The same change with every chunk: "a" is a directory and nothing of the file is left.
    let s = v
        .apply(vec![
            dir(""),
            dir("a"),
            v.file("a/x", b"x"),
            v.file("b", b"b"),
        ])
        .unwrap();
    let names: Vec<String> = v.listing().into_keys().collect();
    assert_eq!(names, ["a", "a/x", "b"]);
    assert_eq!(s.files_written, 1);
}

#[test]
fn renamed_files_are_copied_from_the_destination_whose_chunk_places_are_found_only_when_needed() {
    let v = Volume::new();
    let data = scattered(100_000);
    let big = |v: &Volume, p: &str| v.file(p, &data);
    v.apply(vec![dir(""), big(&v, "a"), v.file("small", b"s")])
        .unwrap();
    // Nothing new: no lookup, no table.
    let (_, placed) = v
        .apply_with(vec![dir(""), big(&v, "a"), v.file("small", b"s")], false)
        .unwrap();
    assert!(!placed);
    // A new chunk the destination lacks: the filter answers, still no table.
    let (s, placed) = v
        .apply_with(
            vec![
                dir(""),
                big(&v, "a"),
                v.file("new", b"n"),
                v.file("small", b"s"),
            ],
            true,
        )
        .unwrap();
    assert!(!placed);
    assert_eq!(s.chunks_wanted, 1);
    // A rename: the chunk is found in the old name's file, nothing comes from the sender.
    let (s, placed) = v
        .apply_with(
            vec![
                dir(""),
                v.file("new", b"n"),
                big(&v, "renamed"),
                v.file("small", b"s"),
            ],
            false,
        )
        .unwrap();
    assert!(placed);
    assert_eq!(s.chunks_wanted, 0);
    assert_eq!(s.bytes_copied_locally, data.len() as u64);
    assert_eq!(std::fs::read(v.dst.join("renamed")).unwrap(), data);
    assert!(!v.dst.join("a").exists());
}

#[test]
fn attributes_changed_in_the_destination_alone_are_put_back() {
    let v = Volume::new();
    let tree = |v: &Volume| vec![dir(""), dir("d"), v.file("d/f", b"f")];
    v.apply(tree(&v)).unwrap();
    let before = v.listing();
    let untouched = v.apply(tree(&v)).unwrap();
    assert_eq!((untouched.files_written, untouched.deleted), (0, 0));
    // A directory's mtime, then a file's mode, changed behind the sync's back.
    let d = std::fs::File::open(v.dst.join("d")).unwrap();
    d.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(5))
        .unwrap();
    assert_ne!(v.listing(), before);
    v.apply(tree(&v)).unwrap();
    assert_eq!(v.listing(), before);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(v.dst.join("d/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = v.apply(tree(&v)).unwrap();
    assert_eq!(s.files_written, 0, "kept, attributes fixed in place");
    assert_eq!(v.listing(), before);
}

#[test]
fn a_new_hard_link_to_a_file_left_alone_verifies() {
    let v = Volume::new();
    let tree = vec![dir(""), dir("a"), v.file("a/x", b"x")];
    v.apply(tree.clone()).unwrap();
    let mut linked = tree;
    linked.push(link("c", "a/x"));
    linked.push(link("d", "a/x"));
    let stats = v.apply(linked).unwrap();
    assert_eq!(stats.files_written, 0, "a/x was kept");
    let l = v.listing();
    assert_eq!((l["a/x"].2, l["a/x"].2), (l["c"].2, l["d"].2), "one inode");
}

#[test]
fn a_file_whose_inode_gained_or_lost_a_name_still_lends_its_chunks() {
    let data = scattered(100_000);
    // Each second manifest leaves `a` alone but changes its inode's ctime: a link to it is
    // made, or one is replaced. The index must record `a` as it is after that, or the
    // third sync would not find `a`'s chunk for the copy `c` (the feed offers nothing).
    let second = |v: &Volume, data: &[u8], case: usize| match case {
        0 => vec![dir(""), v.file("a", data), link("b", "a")],
        _ => vec![dir(""), v.file("a", data), v.file("b", b"new")],
    };
    for i in 0..2 {
        let v = Volume::new();
        let first = if i == 0 {
            vec![dir(""), v.file("a", &data)]
        } else {
            vec![dir(""), v.file("a", &data), link("b", "a")]
        };
        v.apply(first).unwrap();
        let s = v.apply(second(&v, &data, i)).unwrap();
        assert_eq!(s.bytes_copied_locally, 0, "case {i}: a was kept");
        let mut third = second(&v, &data, i);
        third.push(v.file("c", &data));
        let (s, _) = v.apply_with(third, false).unwrap();
        assert_eq!(s.bytes_copied_locally, data.len() as u64, "case {i}");
        assert_eq!(std::fs::read(v.dst.join("c")).unwrap(), data);
    }
}

#[test]
fn a_file_a_directory_replaces_still_lends_its_chunks() {
    let v = Volume::new();
    let data = scattered(100_000);
    v.apply(vec![dir(""), v.file("a", &data)]).unwrap();
    // `a` becomes a directory (made early in the write phase, for its entries) and its data
    // moves to `b`, built later: it is read from where `a` was set aside.
    let moved = vec![dir(""), dir("a"), v.file("a/x", b"x"), v.file("b", &data)];
    let s = v.apply(moved).unwrap();
    assert_eq!(s.chunks_wanted, 1, "only a/x's");
    assert_eq!(s.bytes_copied_locally, data.len() as u64);
    assert_eq!(std::fs::read(v.dst.join("b")).unwrap(), data);
    assert!(v.dst.join("a").is_dir());
}

#[test]
fn large_files_the_commit_replaces_or_removes_are_freed_after_it() {
    use std::os::unix::fs::MetadataExt;
    let v = Volume::new();
    let big = |seed: u8| {
        let mut d = scattered(super::retired::MIN_SIZE as u32);
        d[0] = seed;
        d
    };
    let first = vec![
        dir(""),
        v.file("becomes-dir", &big(3)),
        dir("becomes-file"),
        v.file("becomes-file/inner", &big(7)),
        dir("dropped"),
        v.file("dropped/big", &big(5)),
        v.file("dropped/small", b"small"),
        dir("dropped/sub"),
        v.file("dropped/sub/deep", &big(6)),
        v.file("removed", &big(2)),
        v.file("replaced", &big(1)),
        v.file("small", b"small"),
    ];
    v.apply(first).unwrap();
    assert_eq!(v.held.get(), 0, "nothing replaced yet");
    let old_ino = std::fs::metadata(v.dst.join("replaced")).unwrap().ino();
    let second = vec![
        dir(""),
        dir("becomes-dir"),
        v.file("becomes-file", b"a file now"),
        v.file("replaced", &big(4)),
        v.file("small", b"changed"),
    ];
    v.apply(second).unwrap();
    assert_eq!(
        v.held.get(),
        6,
        "the replaced, the removed, the one set aside, the two in the removed directory, \
         the one in the directory a file replaced"
    );
    assert!(!v.dst.join("dropped").exists());
    assert_eq!(
        std::fs::read(v.dst.join("becomes-file")).unwrap(),
        b"a file now"
    );
    assert_eq!(std::fs::read(v.dst.join("replaced")).unwrap(), big(4));
    assert_ne!(
        std::fs::metadata(v.dst.join("replaced")).unwrap().ino(),
        old_ino
    );
    assert!(!v.dst.join("removed").exists());
    assert!(v.dst.join("becomes-dir").is_dir());
    let names: Vec<_> = std::fs::read_dir(&v.dst)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names.len(),
        4,
        "no temp or set-aside name is left: {names:?}"
    );
}

#[test]
fn a_commit_of_few_changes_fsyncs_just_their_directories_and_falls_back_to_syncfs() {
    let v = Volume::new();
    let tree = |v: &Volume, x: &[u8], extra: Vec<Entry>| {
        let mut t = vec![
            dir(""),
            dir("a"),
            v.file("a/x", x),
            v.file("a/y", b"y"),
            dir("b"),
            v.file("b/z", b"z"),
        ];
        t.extend(extra);
        t
    };
    v.apply(tree(&v, b"x", vec![])).unwrap();
    // a and b were created, the root gained them.
    assert_eq!(v.synced.get(), Some(3));
    v.apply(tree(&v, b"x changed", vec![])).unwrap();
    assert_eq!(v.synced.get(), Some(1), "only a's entries changed");
    assert_eq!(std::fs::read(v.dst.join("a/x")).unwrap(), b"x changed");
    let mut chmod = tree(&v, b"x changed", vec![]);
    chmod[5].meta.perm = 0o600;
    v.apply(chmod).unwrap();
    assert_eq!(
        v.synced.get(),
        Some(1),
        "b/z's attributes changed, not a name"
    );
    // A hard link's count is on an inode the pass holds no descriptor of.
    v.apply(tree(&v, b"x changed", vec![link("c", "a/x")]))
        .unwrap();
    assert_eq!(v.synced.get(), None);
    let many: Vec<Entry> = (0..=super::durable::EACH_MAX)
        .map(|i| v.file(&format!("d/{i:04}"), format!("{i}").as_bytes()))
        .collect();
    let mut t = tree(&v, b"x changed", vec![link("c", "a/x"), dir("d")]);
    t.extend(many);
    v.apply(t).unwrap();
    assert_eq!(
        v.synced.get(),
        Some(2),
        "many files, but in one new directory"
    );
    assert_eq!(v.listing().len(), 7 + super::durable::EACH_MAX + 1);
}

/// Property: any manifest, well-formed or not, over a connection that may break before any
/// chunk: the destination ends mirroring the manifest, or exactly as it was.
mod any_manifest {
    use std::collections::BTreeSet;
    use std::os::unix::ffi::OsStrExt;

    use proptest::prelude::*;

    use super::*;

    const PATHS: [&str; 7] = ["a", "a/x", "a/y", "b", "b/z", "c", "d"];

    /// One entry drawn from a small pool of paths, so that entries collide.
    #[derive(Debug, Clone)]
    struct Pick {
        path: usize,
        kind: u8,
        seed: u8,
        target: usize,
    }

    fn pick() -> impl Strategy<Value = Pick> {
        (0..PATHS.len(), 0u8..5, 0u8..4, 0..PATHS.len()).prop_map(|(path, kind, seed, target)| {
            Pick {
                path,
                kind,
                seed,
                target,
            }
        })
    }

    fn entry(v: &Volume, p: &Pick) -> Entry {
        let path = PATHS[p.path];
        match p.kind {
            0 => dir(path),
            1 | 2 => {
                let data = format!("{path}:{};", p.seed).repeat(1 + usize::from(p.seed) * 3000);
                v.file(path, data.as_bytes())
            }
            3 => link(path, PATHS[p.target]),
            _ => symlink(path, PATHS[p.target]),
        }
    }

    /// The listing, and the bytes of each file and symlink target.
    type Seen = (
        BTreeMap<String, (u32, u64, u64, i64)>,
        BTreeMap<String, Vec<u8>>,
    );

    /// All that can be seen of the destination.
    fn seen(v: &Volume) -> Seen {
        let listing = v.listing();
        let mut data = BTreeMap::new();
        for path in listing.keys() {
            let p = v.dst.join(path);
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_file() {
                data.insert(path.clone(), std::fs::read(&p).unwrap());
            } else if m.is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                data.insert(path.clone(), t.as_os_str().as_bytes().to_vec());
            }
        }
        (listing, data)
    }

    /// Asserts the destination holds exactly what `entries` describe.
    fn assert_holds(v: &Volume, entries: &[Entry]) {
        let listing = v.listing();
        let want: BTreeSet<String> = entries
            .iter()
            .filter(|e| !e.path.is_root())
            .map(|e| e.path.to_string())
            .collect();
        let have: BTreeSet<String> = listing.keys().cloned().collect();
        assert_eq!(have, want, "paths");
        for e in entries.iter().filter(|e| !e.path.is_root()) {
            let p = v.dst.join(e.path.to_string());
            let m = std::fs::symlink_metadata(&p).unwrap();
            match &e.kind {
                EntryKind::Dir => assert!(m.is_dir(), "{}", e.path),
                EntryKind::File { segments, .. } => {
                    let Some(Segment::Chunk { id, .. }) = segments.first() else {
                        unreachable!("one chunk per file here")
                    };
                    assert_eq!(ChunkId::of(&std::fs::read(&p).unwrap()), *id, "{}", e.path);
                }
                EntryKind::HardLink { target } => {
                    let t = std::fs::metadata(v.dst.join(target.to_string())).unwrap();
                    assert_eq!((m.ino(), m.is_file()), (t.ino(), true), "{}", e.path);
                }
                EntryKind::Symlink { target } => {
                    let got = std::fs::read_link(&p).unwrap();
                    assert_eq!(got.as_os_str().as_bytes(), &target[..], "{}", e.path);
                }
                _ => unreachable!("no specials here"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn a_manifest_is_applied_whole_or_not_at_all(
            picks in proptest::collection::vec(pick(), 0..9),
            repaired in proptest::bool::weighted(0.7),
            root_kind in prop_oneof![1 => Just(0u8), 1 => Just(1), 1 => Just(2), 12 => Just(3)],
            fail_at in proptest::option::weighted(0.3, 0usize..4),
        ) {
            let v = Volume::new();
            v.apply(vec![dir(""), dir("a"), v.file("a/x", b"old x"), v.file("b", b"old b"), link("c", "b")])
                .unwrap();
            let before = seen(&v);
            let mut entries: Vec<Entry> = picks.iter().map(|p| entry(&v, p)).collect();
            if repaired {
                // Most manifests well-formed, so that the write and commit are reached: in
                // order, one entry per path, parents added.
                entries.sort_by(|a, b| a.path.cmp(&b.path));
                entries.dedup_by(|a, b| a.path == b.path);
                let parents: Vec<Entry> = entries
                    .iter()
                    .filter_map(|e| e.path.split_last().map(|(parent, _)| parent))
                    .filter(|p| !p.is_root() && !entries.iter().any(|e| e.path == *p))
                    .map(|p| dir(&p.to_string()))
                    .collect();
                entries.extend(parents);
                entries.sort_by(|a, b| a.path.cmp(&b.path));
                entries.dedup_by(|a, b| a.path == b.path);
            }
            match root_kind {
                0 => {}
                1 => entries.insert(0, v.file("", b"a root file")),
                2 => entries.insert(0, symlink("", "a")),
                _ => entries.insert(0, dir("")),
            }
            match v.apply_failing(entries.clone(), true, fail_at) {
                Ok(_) => assert_holds(&v, &entries),
                Err(e) => prop_assert!(seen(&v) == before, "refused ({e}) but the destination changed")
            }
        }
    }
}
