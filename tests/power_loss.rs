//! Power cuts: the destination lives on a loop-mounted ext4 whose power is cut at chosen
//! moments ([`PowerCutFs`]), then the sync is checked or rerun on what the cut left.
//!
//! `tests/durability.rs` checks the order of a sync's system calls; these check what that
//! order is for. A volume declared complete is complete after a cut; a cut in a commit
//! leaves every file under its final name whole, old or new; and a rerun finishes the job.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use integration_tests::power::PowerCutFs;
use integration_tests::*;

/// Small files in nested directories, three files above the size that gets write-behind, a
/// symlink and an empty directory.
fn make_source(src: &Path) {
    for d in 0..6 {
        let dir = src.join(format!("d{d}/sub"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..40u64 {
            let seed = d * 100 + f;
            fs::write(
                dir.join(format!("f{f}")),
                bytes(seed, 1000 + 97 * f as usize),
            )
            .unwrap();
        }
    }
    for b in 0..3 {
        fs::write(src.join(format!("big{b}.bin")), bytes(1000 + b, 3 << 20)).unwrap();
    }
    symlink("d0/sub/f1", src.join("link")).unwrap();
    fs::create_dir(src.join("empty")).unwrap();
}

/// Rewrites, grows, removes and adds files, and rewrites one big file.
fn edit_source(src: &Path, seed: u64) {
    for f in 0..12u64 {
        let path = src.join(format!("d{}/sub/f{f}", f % 6));
        fs::write(path, bytes(seed + f, 500 + 131 * f as usize)).unwrap();
    }
    for f in 30..35 {
        fs::remove_file(src.join(format!("d5/sub/f{f}"))).unwrap();
    }
    fs::create_dir_all(src.join(format!("new{seed}"))).unwrap();
    for f in 0..8u64 {
        fs::write(
            src.join(format!("new{seed}/g{f}")),
            bytes(seed + 50 + f, 3000),
        )
        .unwrap();
    }
    fs::write(src.join("big1.bin"), bytes(seed + 99, (3 << 20) + 4096)).unwrap();
}

/// The destination's sync state, as the state file says.
fn state_of(state: &Path) -> serde_json::Value {
    let dir = fs::read_dir(state.join("targets"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    serde_json::from_slice(&fs::read(dir.join("state.json")).unwrap()).unwrap()
}

fn assert_complete_at(state: &Path, root: &serde_json::Value) {
    let s = state_of(state);
    assert_eq!(s["status"], "complete", "state after the cut: {s}");
    assert_eq!(s["root"], *root, "state after the cut: {s}");
}

/// The contents of each regular file (BLAKE3, as [`describe`] gives them).
fn contents(root: &Path) -> BTreeMap<Vec<u8>, String> {
    describe(root)
        .into_iter()
        .filter_map(|(path, d)| Some((path, d.content?)))
        .collect()
}

#[test]
fn a_volume_declared_complete_is_complete_after_a_power_cut() {
    let Some(mut fs_) = PowerCutFs::new(128) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src);
    let dst = fs_.path().join("vol");
    let state = fs_.path().join("state");

    // A first sync makes its files durable with one `syncfs`.
    let first = summary(&run_sync(&src, &dst, &state, &[]));
    fs_.cut_power();
    assert_complete_at(&state, &first["root"]);
    assert_mirrors(&src, &dst);

    // A delta with few changes syncs just the inodes and directories it changed.
    settle();
    edit_source(&src, 7);
    let delta = summary(&run_sync(&src, &dst, &state, &[]));
    assert!(delta["files_written"].as_u64().unwrap() >= 20, "{delta}");
    fs_.cut_power();
    assert_complete_at(&state, &delta["root"]);
    assert_mirrors(&src, &dst);

    // The index the cut left vouches only for what is there: a rerun changes nothing.
    let again = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(again["chunks_sent"], 0, "{again}");
    assert_eq!(again["files_written"], 0, "{again}");
}

#[test]
fn a_power_cut_in_a_commit_leaves_each_file_whole_and_a_rerun_finishes() {
    for point in ["rename:1", "rename:9", "commit-sync"] {
        let Some(mut fs_) = PowerCutFs::new(128) else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        make_source(&src);
        let dst = fs_.path().join("vol");
        let state = fs_.path().join("state");
        summary(&run_sync(&src, &dst, &state, &[]));
        let old = contents(&src);
        settle();
        edit_source(&src, 11);
        let new = contents(&src);

        let out = crash_sync(&src, &dst, &state, point);
        assert_eq!(out.status.signal(), Some(9), "expected a kill at {point}");
        // The journal commits the renames done so far, as its timer would within seconds;
        // files' data goes to the device only if the sync wrote it out itself.
        fs::File::open(&dst).unwrap().sync_all().unwrap();
        fs_.cut_power();

        assert_eq!(state_of(&state)["status"], "incomplete", "{point}");
        for (path, got) in contents(&dst) {
            let name = path.rsplit(|&b| b == b'/').next().unwrap();
            if name.starts_with(b".rpl-") {
                continue; // a temp file: no final name shows it
            }
            let shown = String::from_utf8_lossy(&path);
            assert!(
                old.get(&path) == Some(&got) || new.get(&path) == Some(&got),
                "after a cut at {point}, {shown} is neither its old nor its new content"
            );
        }
        summary(&run_sync(&src, &dst, &state, &[]));
        assert_mirrors(&src, &dst);
    }
}
