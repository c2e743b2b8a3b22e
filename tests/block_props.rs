//! Property: a disk image edited at random — data written anywhere, ranges zeroed, the image
//! grown or shrunk — and synced after each round of edits stays byte-identical, and a sync
//! moves at most the bytes written plus the few chunks around each edit, and holes stay holes.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use integration_tests::*;
use proptest::prelude::*;
use replicator::progress::NoProgress;
use replicator::sync::{SyncOptions, sync_local};

/// The largest chunk (see `ChunkerParams::default`).
const MAX_CHUNK: u64 = 256 * 1024;
const MAX_SIZE: u64 = 8 << 20;

#[derive(Debug, Clone)]
enum Edit {
    Write { off: u64, len: usize, seed: u64 },
    Zero { off: u64, len: usize },
    Resize { len: u64 },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (0..MAX_SIZE, 1usize..300_000, 0u64..4).prop_map(|(off, len, seed)| Edit::Write { off, len, seed }),
        1 => (0..MAX_SIZE, 1usize..600_000).prop_map(|(off, len)| Edit::Zero { off, len }),
        1 => (0..MAX_SIZE).prop_map(|len| Edit::Resize { len }),
    ]
}

/// Applies an edit; returns the bytes of data (not zeros) it wrote.
fn apply(image: &Path, e: &Edit) -> u64 {
    let f = File::options().write(true).open(image).unwrap();
    match *e {
        Edit::Write { off, len, seed } => {
            f.write_all_at(&bytes(seed, len), off).unwrap();
            len as u64
        }
        Edit::Zero { off, len } => {
            f.write_all_at(&vec![0; len], off).unwrap();
            0
        }
        Edit::Resize { len } => {
            f.set_len(len).unwrap();
            0
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn edited_images_stay_identical_and_move_little(
        initial in proptest::collection::vec(edit(), 0..6),
        rounds in proptest::collection::vec(proptest::collection::vec(edit(), 1..5), 1..4),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("disk.img"), tmp.path().join("copy.img"));
        File::create(&src).unwrap().set_len(1 << 20).unwrap();
        let opts = SyncOptions { state_dir: tmp.path().join("state"), ..SyncOptions::default() };
        for e in &initial {
            apply(&src, e);
        }
        sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        prop_assert!(fs::read(&src).unwrap() == fs::read(&dst).unwrap(), "first sync differs");
        let mut edits = initial.len() as u64;
        for round in rounds {
            edits += round.len() as u64;
            let written: u64 = round.iter().map(|e| apply(&src, e)).sum();
            let s = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
            prop_assert!(fs::read(&src).unwrap() == fs::read(&dst).unwrap(), "differs after {round:?}");
            // Each edit changes the chunks it covers and at most two beyond each edge.
            let bound = written + round.len() as u64 * 4 * MAX_CHUNK;
            prop_assert!(
                s.bytes_sent_raw <= bound,
                "sent {} bytes for edits writing {written}", s.bytes_sent_raw
            );
            // Holes stay holes: the copy allocates what the image does, give or take the
            // chunks around each edge of a data region.
            prop_assert!(
                allocated(&dst) <= allocated(&src) + (edits + 1) * 2 * MAX_CHUNK,
                "copy allocates {} bytes, image {}", allocated(&dst), allocated(&src)
            );
        }
    }
}
