//! Property: for random trees and random edit sequences, every sync leaves DST mirroring SRC
//! (checked by the independent walker), and a later sync never moves data of files the edits
//! did not touch. Hard links come and go between syncs, to files the same round changed
//! and to files it left alone. Before each sync a dry run must change nothing, list exactly
//! the paths that would appear and disappear, list as changed every path that differs,
//! and predict the sync's counts. Half the cases sync `--inplace`, and their edits overwrite
//! ranges of big files in place, so that patches at the final name are mirrors too.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::sync::Mutex;

use integration_tests::edits::{apply, op};
use integration_tests::*;
use proptest::prelude::*;
use replicator::progress::{NoProgress, Progress};
use replicator::protocol::dry_run::{Action, Change, DryRun};
use replicator::sync::{Summary, SyncOptions, sync_local};

/// Keeps a dry run's changes.
#[derive(Default)]
struct Changes(Mutex<Vec<Change>>);

impl Progress for Changes {
    fn change(&self, change: &Change) {
        self.0.lock().unwrap().push(change.clone());
    }
}

/// Every file's bytes under `dir` (the state directory), by path.
fn files_under(dir: &Path) -> BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// Runs a dry run of the next sync and checks it against the two trees as
/// [`describe`] sees them; returns its summary.
fn dry_run(src: &Path, dst: &Path, opts: &SyncOptions) -> Result<Summary, TestCaseError> {
    let (before_src, before_dst) = (describe(src), describe(dst));
    let state_before = files_under(&opts.state_dir);
    let changes = Changes::default();
    let dry = SyncOptions {
        dry_run: DryRun::Ask,
        ..opts.clone()
    };
    let s = sync_local(src, dst, &dry, &changes).unwrap();
    prop_assert!(s.dry_run);
    prop_assert_eq!(
        &describe(dst),
        &before_dst,
        "a dry run changed the destination"
    );
    prop_assert!(
        files_under(&opts.state_dir) == state_before,
        "a dry run changed the state"
    );
    let listed: BTreeMap<Vec<u8>, Action> = changes
        .0
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|c| (c.path.as_bytes().to_vec(), c.action))
        .collect();
    let with = |a: Action| -> BTreeSet<&Vec<u8>> {
        listed
            .iter()
            .filter(|(_, x)| **x == a)
            .map(|(p, _)| p)
            .collect()
    };
    let only_src: BTreeSet<_> = before_src
        .keys()
        .filter(|p| !before_dst.contains_key(*p))
        .collect();
    let only_dst: BTreeSet<_> = before_dst
        .keys()
        .filter(|p| !before_src.contains_key(*p))
        .collect();
    prop_assert_eq!(with(Action::Create), only_src);
    prop_assert_eq!(with(Action::Delete), only_dst);
    for (path, want) in &before_src {
        let Some(have) = before_dst.get(path) else {
            continue;
        };
        let shown = String::from_utf8_lossy(path);
        let replaced =
            have.kind != want.kind || have.content != want.content || have.target != want.target;
        let differs = have != want;
        match listed.get(path) {
            Some(Action::Update) => prop_assert!(differs, "{} listed as updated but equal", shown),
            Some(Action::Attrs) => {
                prop_assert!(differs && !replaced, "{} listed as attrs only", shown)
            }
            Some(other) => prop_assert!(false, "{} listed as {:?} but on both sides", shown, other),
            // A hard link's attributes are its inode's: listed under the name the manifest
            // gives them.
            None if want.link_group.is_some() && !replaced => {}
            None => {
                let mut unlinked = have.clone();
                unlinked.link_group = want.link_group.clone();
                prop_assert!(&unlinked == want, "{} differs but is not listed", shown);
            }
        }
        if replaced {
            prop_assert_eq!(
                listed.get(path),
                Some(&Action::Update),
                "{} must be updated",
                shown
            );
        }
    }
    Ok(s)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn syncs_mirror_and_move_only_new_data(
        initial in proptest::collection::vec(op(), 1..12),
        rounds in proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..4),
        inplace in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        let opts = SyncOptions {
            state_dir: tmp.path().join("state"),
            inplace,
            ..SyncOptions::default()
        };
        for o in &initial {
            apply(&src, o);
        }
        sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        assert_mirrors(&src, &dst);
        for round in rounds {
            let written: u64 = round.iter().map(|o| apply(&src, o)).sum();
            let dry = dry_run(&src, &dst, &opts)?;
            let s = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
            assert_mirrors(&src, &dst);
            prop_assert_eq!(
                (dry.files_written, dry.files_patched, dry.deleted, dry.chunks_sent, &dry.root),
                (s.files_written, s.files_patched, s.deleted, s.chunks_sent, &s.root),
                "the dry run's counts and root are the sync's"
            );
            prop_assert_eq!(dry.bytes_copied_locally, s.bytes_copied_locally);
            prop_assert!(inplace || s.files_patched == 0);
            prop_assert!(dry.bytes_sent_raw >= s.bytes_sent_raw);
            prop_assert!(
                s.bytes_sent_raw <= written,
                "sent {} bytes but the edits wrote only {}", s.bytes_sent_raw, written
            );
        }
    }
}
