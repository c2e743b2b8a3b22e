//! Kill -9 at exact points of a sync, rerun, and check the result and what the rerun moved.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use integration_tests::*;

fn make_source(src: &Path) {
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("big.bin"), bytes(1, 24 << 20)).unwrap();
    for i in 0..40 {
        fs::write(src.join(format!("sub/f{i}")), bytes(10 + i, 40_000)).unwrap();
    }
}

/// A scratch directory holding a source made by [`make_source`], and the paths of a
/// destination and a state directory beside it.
fn sourced() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name| tmp.path().join(name);
    let (src, dst, state) = (path("src"), path("dst"), path("state"));
    make_source(&src);
    (tmp, src, dst, state)
}

/// Syncs, waits out the racy margin (so the index vouches for the copy), then writes `len`
/// new bytes over `big.bin` at three places far apart.
fn synced_then_changed_in_three_places(
    src: &Path,
    dst: &Path,
    state: &Path,
    seed: u64,
    len: usize,
) {
    use std::os::unix::fs::FileExt;
    summary(&run_sync(src, dst, state, &[]));
    settle();
    let big = fs::File::options()
        .write(true)
        .open(src.join("big.bin"))
        .unwrap();
    for (i, at) in [2u64 << 20, 10 << 20, 20 << 20].into_iter().enumerate() {
        big.write_all_at(&bytes(seed + i as u64, len), at).unwrap();
    }
}

fn crash_run(src: &Path, dst: &Path, state: &Path, point: &str) {
    crash_run_with(src, dst, state, point, &[]);
}

fn crash_run_with(src: &Path, dst: &Path, state: &Path, point: &str, extra: &[&str]) {
    let out = crash_sync_with(src, dst, state, point, extra);
    assert_eq!(
        out.status.signal(),
        Some(9),
        "expected a kill at {point}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn state_says_incomplete(state: &Path) -> bool {
    let targets = state.join("targets");
    let dir = fs::read_dir(targets)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = fs::read_to_string(dir.join("state.json")).unwrap();
    text.contains("\"incomplete\"")
}

#[test]
fn killed_while_receiving_chunks_then_resumed() {
    let (_tmp, src, dst, state) = sourced();
    // About 24 MiB / 64 KiB ≈ 400 chunks in big.bin: die after 150 written.
    crash_run(&src, &dst, &state, "chunk:150");
    assert!(state_says_incomplete(&state));
    // Nothing is visible under a final name yet.
    assert!(!dst.join("big.bin").exists());
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
    let total = s["chunks_total"].as_u64().unwrap();
    let sent = s["chunks_sent"].as_u64().unwrap();
    assert!(
        sent <= total - 150,
        "rerun sent {sent} of {total} chunks; 150 had arrived"
    );
    assert!(!state_says_incomplete(&state));
}

#[test]
fn killed_during_renames_then_resumed() {
    let (_tmp, src, dst, state) = sourced();
    crash_run(&src, &dst, &state, "rename:10");
    assert!(state_says_incomplete(&state));
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
    assert_eq!(
        s["chunks_sent"], 0,
        "everything had arrived before the renames"
    );
}

#[test]
fn killed_before_the_final_sync_then_resumed() {
    let (_tmp, src, dst, state) = sourced();
    crash_run(&src, &dst, &state, "commit-sync");
    assert!(
        state_says_incomplete(&state),
        "complete must only be recorded after the final sync"
    );
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_mirrors(&src, &dst);
    assert_eq!(s["chunks_sent"], 0);
}

#[test]
fn killed_block_sync_resumes_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst, state) = (
        tmp.path().join("a.img"),
        tmp.path().join("b.img"),
        tmp.path().join("state"),
    );
    fs::write(&src, bytes(5, 16 << 20)).unwrap();
    crash_run(&src, &dst, &state, "chunk:100");
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    let total = s["chunks_total"].as_u64().unwrap();
    assert!(s["chunks_sent"].as_u64().unwrap() <= total - 100);
}

/// A kill while `--inplace` copies a patch into a file leaves that file part old, part new
/// under its final name, with the destination marked incomplete; the rerun finds it no
/// longer matches its index record, checks it chunk by chunk, and finishes it from what the
/// killed run had already received.
#[test]
fn killed_while_patching_in_place_then_resumed() {
    let (_tmp, src, dst, state) = sourced();
    // Three ranges to copy.
    synced_then_changed_in_three_places(&src, &dst, &state, 50, 100_000);
    crash_run_with(&src, &dst, &state, "patch:2", &["--inplace"]);
    assert!(state_says_incomplete(&state));
    let mixed = fs::read(dst.join("big.bin")).unwrap();
    let (old, new) = (bytes(1, 24 << 20), fs::read(src.join("big.bin")).unwrap());
    assert!(
        mixed != old && mixed != new,
        "two of three ranges were copied"
    );
    assert_eq!(
        mixed[(20 << 20)..(20 << 20) + 100_000],
        old[(20 << 20)..(20 << 20) + 100_000]
    );

    let s = summary(&run_sync(&src, &dst, &state, &["--inplace"]));
    assert_mirrors(&src, &dst);
    assert_eq!(
        s["chunks_sent"], 0,
        "the killed run had received every chunk: {s}"
    );
    assert!(!state_says_incomplete(&state));
}

/// Killed while receiving the chunks of a file it would patch, an `--inplace` sync has not
/// touched the file under its final name; the rerun patches it, taking what had arrived from
/// the staged temp file instead of asking for it again.
#[test]
fn killed_while_staging_a_patch_leaves_the_file_alone_and_resumes() {
    use std::os::unix::fs::MetadataExt;
    let (_tmp, src, dst, state) = sourced();
    synced_then_changed_in_three_places(&src, &dst, &state, 60, 400_000);
    let inode = fs::metadata(dst.join("big.bin")).unwrap().ino();
    let dry = summary(&run_sync(&src, &dst, &state, &["--inplace", "-n"]));
    let wanted = dry["chunks_sent"].as_u64().unwrap();
    assert!(wanted > 4, "{dry}");
    crash_run_with(&src, &dst, &state, "chunk:4", &["--inplace"]);
    assert!(state_says_incomplete(&state));
    assert_eq!(
        fs::read(dst.join("big.bin")).unwrap(),
        bytes(1, 24 << 20),
        "the file changed before the commit"
    );
    let s = summary(&run_sync(&src, &dst, &state, &["--inplace"]));
    assert_mirrors(&src, &dst);
    assert_eq!(s["files_patched"], 1, "{s}");
    assert_eq!(fs::metadata(dst.join("big.bin")).unwrap().ino(), inode);
    let sent = s["chunks_sent"].as_u64().unwrap();
    assert!(
        sent <= wanted - 4,
        "the rerun sent {sent} of {wanted} chunks; 4 had arrived"
    );
}
