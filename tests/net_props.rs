//! Property: random trees and edits pushed to a `replicator serve` process over QUIC, round
//! after round, leave the remote volume mirroring the source, and each push moves no more
//! than its edits wrote; a pull brings the volume back whole. One server serves every case.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use integration_tests::edits::{Op, apply, op};
use integration_tests::net::*;
use integration_tests::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn pushes_mirror_random_edits_and_a_pull_brings_them_back() {
    let tmp = tempfile::tempdir().unwrap();
    let server_id = Ident::create(&tmp.path().join("server-id"));
    let client = Ident::create(&tmp.path().join("client-id"));
    let server = ServerProc::start(&server_id, &tmp.path().join("volumes"), &[&client], &[]);
    let state = tmp.path().join("client-state");
    let sync = |src: &str, dst: &str| {
        summary(&client_sync(
            &client,
            &server.ident.fingerprint,
            src,
            dst,
            &state,
            &[],
        ))
    };
    let cases = AtomicU32::new(0);
    let strategy = (
        proptest::collection::vec(op(), 1..12),
        proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..3),
    );
    let mut runner = TestRunner::new(Config {
        cases: 8,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(initial, rounds): (Vec<Op>, Vec<Vec<Op>>)| {
        let case = cases.fetch_add(1, Ordering::Relaxed);
        let volume = format!("v{case}");
        let remote = format!("{}/{volume}", server.addr);
        let (src, back) = (
            tmp.path().join(format!("src{case}")),
            tmp.path().join(format!("back{case}")),
        );
        fs::create_dir(&src).unwrap();
        for o in &initial {
            apply(&src, o);
        }
        sync(s(&src), &remote);
        assert_mirrors(&src, &server.root.join(&volume));
        for round in rounds {
            let written: u64 = round.iter().map(|o| apply(&src, o)).sum();
            let pushed = sync(s(&src), &remote);
            assert_mirrors(&src, &server.root.join(&volume));
            let sent = pushed["bytes_sent_raw"].as_u64().unwrap();
            if sent > written {
                return Err(TestCaseError::fail(format!(
                    "pushed {sent} bytes but the edits wrote only {written}"
                )));
            }
        }
        sync(&remote, s(&back));
        assert_mirrors(&src, &back);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", server.log());
    }
}
