//! Property: for random trees and random edit sequences, every sync leaves DST mirroring SRC
//! (checked by the independent walker), and a later sync never moves data of files the edits
//! did not touch. Hard links come and go between syncs, to files the same round changed
//! and to files it left alone.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;

use integration_tests::edits::{apply, op};
use integration_tests::*;
use proptest::prelude::*;
use replicator::progress::NoProgress;
use replicator::sync::{SyncOptions, sync_local};

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn syncs_mirror_and_move_only_new_data(
        initial in proptest::collection::vec(op(), 1..12),
        rounds in proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..4),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        let opts = SyncOptions { state_dir: tmp.path().join("state"), ..SyncOptions::default() };
        for o in &initial {
            apply(&src, o);
        }
        sync_local(&src, &dst, &opts, &NoProgress).unwrap();
        assert_mirrors(&src, &dst);
        for round in rounds {
            let written: u64 = round.iter().map(|o| apply(&src, o)).sum();
            let s = sync_local(&src, &dst, &opts, &NoProgress).unwrap();
            assert_mirrors(&src, &dst);
            prop_assert!(
                s.bytes_sent_raw <= written,
                "sent {} bytes but the edits wrote only {}", s.bytes_sent_raw, written
            );
        }
    }
}
