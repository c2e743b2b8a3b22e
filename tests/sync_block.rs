//! Block mode end to end: disk images stay byte-identical, sparse, and are updated in place.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};

use integration_tests::*;

const SIZE: u64 = 256 << 20;

fn make_image(path: &std::path::Path) {
    let f = File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    // A few data regions, like a freshly made filesystem: superblock, tables, some files.
    for (i, off) in [0u64, 1 << 20, 40 << 20, 100 << 20, 255 << 20]
        .into_iter()
        .enumerate()
    {
        f.write_all_at(&bytes(i as u64, 600_000), off).unwrap();
    }
}

#[test]
fn image_is_mirrored_sparse_and_updated_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst, state) = (
        tmp.path().join("disk.img"),
        tmp.path().join("copy.img"),
        tmp.path().join("state"),
    );
    make_image(&src);
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(s["mode"], "block");
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    assert_eq!(fs::metadata(&dst).unwrap().len(), SIZE);
    assert!(
        allocated(&dst) < 8 << 20,
        "holes were written: {} bytes allocated",
        allocated(&dst)
    );
    // 3 MB of data, plus at most one maximal chunk of zeros at each edge of each region.
    assert!(s["bytes_sent_raw"].as_u64().unwrap() <= 3_000_000 + 10 * 256 * 1024);
    let inode = fs::metadata(&dst).unwrap().ino();

    // 16 random 64 KiB writes.
    let f = File::options().write(true).open(&src).unwrap();
    for i in 0..16u64 {
        let off = (i * 15_485_863 * 4096) % (SIZE - 65536);
        f.write_all_at(&bytes(1000 + i, 65536), off).unwrap();
    }
    drop(f);
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    assert_eq!(
        fs::metadata(&dst).unwrap().ino(),
        inode,
        "block sync must write in place"
    );
    let sent = s["bytes_sent_raw"].as_u64().unwrap();
    // Each write touches at most a few chunks (max 256 KiB each).
    assert!(
        sent <= 16 * 3 * 256 * 1024,
        "sent {sent} bytes for 1 MiB of writes"
    );
    assert!(sent >= 16 * 65536);
}

#[test]
fn an_image_destination_changed_behind_our_back_is_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst, state) = (
        tmp.path().join("disk.img"),
        tmp.path().join("copy.img"),
        tmp.path().join("state"),
    );
    make_image(&src);
    summary(&run_sync(&src, &dst, &state, &[]));
    settle();
    // Unchanged on both sides: the receiver trusts its index and sends for nothing.
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(s["chunks_sent"], 0);
    // Someone scribbles on the copy (same size): its stat no longer matches the index, so
    // the receiver reads it again, finds the damaged chunk and has it sent.
    File::options()
        .write(true)
        .open(&dst)
        .unwrap()
        .write_all_at(&[0xAA; 4096], 40 << 20)
        .unwrap();
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    let sent = s["chunks_sent"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&sent),
        "4 KiB damaged, {sent} chunks sent: {s}"
    );
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
}

#[test]
fn data_turned_to_zeros_is_zeroed_and_size_changes_follow() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst, state) = (
        tmp.path().join("a.img"),
        tmp.path().join("b.img"),
        tmp.path().join("state"),
    );
    make_image(&src);
    summary(&run_sync(&src, &dst, &state, &[]));
    // Zero a data region (as discard would) and shrink the image.
    let f = File::options().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0u8; 600_000], 40 << 20).unwrap();
    f.set_len(SIZE - (1 << 20)).unwrap();
    drop(f);
    summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    // Nothing changed: nothing moves.
    let s = summary(&run_sync(&src, &dst, &state, &[]));
    assert_eq!(s["chunks_sent"], 0);
}

#[test]
fn a_directory_destination_for_an_image_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("a.img");
    fs::write(&src, bytes(1, 10_000)).unwrap();
    let dir = tmp.path().join("dir");
    fs::create_dir(&dir).unwrap();
    let out = run_sync(&src, &dir, &tmp.path().join("state"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a directory"));
}
