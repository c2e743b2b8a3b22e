//! Property: a sync killed (-9) at any point of a random incremental sync leaves every file
//! under its final name whole — the version before the sync or the one after, never a mix —
//! and a rerun finishes the job, moving no more than the edits wrote.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use integration_tests::edits::{apply, op};
use integration_tests::*;
use proptest::prelude::*;
use replicator::apply::fsops::is_temp_name;

/// Runs `replicator sync`, killing itself at crash point `at`; true if it was killed (a
/// point the sync never reaches lets it finish).
fn killed_run(src: &Path, dst: &Path, state: &Path, at: &str) -> bool {
    let out = crash_sync(src, dst, state, at);
    match out.status.signal() {
        Some(9) => true,
        _ => {
            assert!(
                out.status.success(),
                "{at}: {:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            false
        }
    }
}

/// Whole-file contents of the regular files under `root`, by path; temp files (what an
/// interrupted run keeps to resume) are not under final names and are left out.
fn contents(root: &Path) -> BTreeMap<Vec<u8>, String> {
    describe(root)
        .into_iter()
        .filter(|(path, d)| {
            let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
            d.kind == "file" && !is_temp_name(name)
        })
        .map(|(path, d)| (path, d.content.unwrap()))
        .collect()
}

/// Where to die: counts small enough that most runs reach them (a few edits move a few
/// chunks and rename a few files; the final sync is reached once).
fn crash_point() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u64..4).prop_map(|n| format!("chunk:{n}")),
        (1u64..3).prop_map(|n| format!("rename:{n}")),
        Just("commit-sync:1".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_killed_sync_leaves_whole_files_and_a_rerun_finishes(
        initial in proptest::collection::vec(op(), 1..12),
        edits in proptest::collection::vec(op(), 1..8),
        at in crash_point(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst, state) = (tmp.path().join("src"), tmp.path().join("dst"), tmp.path().join("state"));
        fs::create_dir(&src).unwrap();
        for o in &initial {
            apply(&src, o);
        }
        summary(&run_sync(&src, &dst, &state, &[]));
        let before = contents(&dst);
        let written: u64 = edits.iter().map(|o| apply(&src, o)).sum();
        let after = contents(&src);
        let killed = killed_run(&src, &dst, &state, &at);
        for (path, got) in contents(&dst) {
            prop_assert!(
                before.get(&path) == Some(&got) || after.get(&path) == Some(&got),
                "{at}: {:?} holds neither its old nor its new content",
                String::from_utf8_lossy(&path)
            );
        }
        let s = summary(&run_sync(&src, &dst, &state, &[]));
        assert_mirrors(&src, &dst);
        if killed {
            let sent = s["bytes_sent_raw"].as_u64().unwrap();
            prop_assert!(sent <= written, "{at}: the rerun sent {sent} bytes; the edits wrote {written}");
        }
    }
}
