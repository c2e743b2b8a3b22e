//! Remote sync over real QUIC sockets on loopback, between real processes: push and pull,
//! incremental runs, refusals, busy volumes, a lossy link, and interruptions that resume.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use integration_tests::net::*;
use integration_tests::*;
use replicator::demo::{edit_sample_tree, make_sample_tree};

struct Setup {
    tmp: tempfile::TempDir,
    client: Ident,
    server: ServerProc,
    state: PathBuf,
}

impl Setup {
    fn new(server_args: &[&str]) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let server_id = Ident::create(&tmp.path().join("server-id"));
        let client = Ident::create(&tmp.path().join("client-id"));
        let server = ServerProc::start(
            &server_id,
            &tmp.path().join("volumes"),
            &[&client],
            server_args,
        );
        let state = tmp.path().join("client-state");
        Setup {
            tmp,
            client,
            server,
            state,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn remote(&self, volume: &str) -> String {
        format!("{}/{volume}", self.server.addr)
    }

    fn volume(&self, name: &str) -> PathBuf {
        self.server.root.join(name)
    }

    /// `replicator sync` from the client, without `--json`.
    fn command(&self, src: &str, dst: &str, extra: &[&str]) -> Command {
        let server = &self.server.ident.fingerprint;
        client_command_shown(&self.client, server, src, dst, &self.state, extra)
    }

    fn sync(&self, src: &str, dst: &str, extra: &[&str]) -> Output {
        self.command(src, dst, extra)
            .arg("--json")
            .output()
            .unwrap()
    }

    /// The sync as a user sees it: no `--json`.
    fn shown(&self, src: &str, dst: &str, extra: &[&str]) -> Output {
        self.command(src, dst, extra).output().unwrap()
    }
}

/// The lines a dry run printed, checked to have succeeded.
fn listing(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "{}", stderr(out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dry run, nothing changed"), "{text}");
    text.lines().map(str::to_string).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn no_staging_left(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with(".rpl-"), "staging left behind: {name}");
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

#[test]
fn push_and_pull_a_tree_full_then_incremental() {
    let t = Setup::new(&[]);
    let src = t.path("src");
    make_sample_tree(&src).unwrap();
    settle();
    let full = summary(&t.sync(s(&src), &t.remote("data"), &[]));
    assert_mirrors(&src, &t.volume("data"));
    assert_eq!(full["chunks_sent"], full["chunks_total"]);
    assert_eq!(full["destination"], t.remote("data"));
    no_staging_left(&t.volume("data"));

    edit_sample_tree(&src).unwrap();
    settle();
    let inc = summary(&t.sync(s(&src), &t.remote("data"), &[]));
    assert_mirrors(&src, &t.volume("data"));
    let (sent, total) = (
        inc["chunks_sent"].as_u64().unwrap(),
        inc["chunks_total"].as_u64().unwrap(),
    );
    assert!(
        sent > 0 && sent * 4 < total,
        "incremental sent {sent} of {total}"
    );
    // Both ends kept the first manifest: only changed entries and removed paths crossed.
    assert_eq!(inc["manifest_delta"], true, "{inc}");
    assert!(
        inc["entries_sent"].as_u64() < inc["entries"].as_u64(),
        "{inc}"
    );

    // Pull it back, then pull again after another push: only the change moves, and the
    // server re-reads only what the push changed (once its writes are past the racy window).
    settle();
    let back = t.path("back");
    let pulled = summary(&t.sync(&t.remote("data"), s(&back), &[]));
    assert_mirrors(&src, &back);
    assert_eq!(pulled["root"], inc["root"]);
    fs::write(src.join("dir3/sub0/new-file"), bytes(77, 50_000)).unwrap();
    settle();
    summary(&t.sync(s(&src), &t.remote("data"), &[]));
    let again = summary(&t.sync(&t.remote("data"), s(&back), &[]));
    assert_mirrors(&src, &back);
    assert!(again["chunks_sent"].as_u64().unwrap() <= 3, "{again}");
    assert_eq!(again["manifest_delta"], true, "{again}");
    assert!(again["entries_sent"].as_u64().unwrap() <= 3, "{again}");
    assert!(again["bytes_read"].as_u64().unwrap() < 200_000, "{again}");
    let log = t.server.log();
    assert!(log.contains("direction=push"), "{log}");
    assert!(log.contains("direction=pull"), "{log}");
    assert!(log.contains(&t.client.fingerprint), "{log}");
}

#[test]
fn push_and_pull_a_block_image() {
    let t = Setup::new(&[]);
    let img = t.path("disk.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    for (i, off) in [0u64, 10 << 20, 63 << 20].into_iter().enumerate() {
        f.write_all_at(&bytes(i as u64, 500_000), off).unwrap();
    }
    drop(f);
    settle();
    let full = summary(&t.sync(s(&img), &t.remote("disk"), &[]));
    assert_eq!(full["mode"], "block");
    assert_eq!(fs::read(&img).unwrap(), fs::read(t.volume("disk")).unwrap());
    assert!(allocated(&t.volume("disk")) < 8 << 20, "holes were written");

    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&bytes(9, 65_536), 30 << 20).unwrap();
    drop(f);
    settle();
    let inc = summary(&t.sync(s(&img), &t.remote("disk"), &[]));
    assert!(inc["chunks_sent"].as_u64().unwrap() <= 3, "{inc}");
    assert_eq!(fs::read(&img).unwrap(), fs::read(t.volume("disk")).unwrap());

    let back = t.path("back.img");
    let pulled = summary(&t.sync(&t.remote("disk"), s(&back), &[]));
    assert_eq!(pulled["mode"], "block");
    assert_eq!(fs::read(&img).unwrap(), fs::read(&back).unwrap());
}

#[test]
fn refusals_name_the_fingerprints_and_versions() {
    let t = Setup::new(&[]);
    let src = t.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();

    // The client has not pinned this server.
    let wrong = "ab".repeat(32);
    let out = client_sync(&t.client, &wrong, s(&src), &t.remote("v"), &t.state, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let fp = &t.server.ident.fingerprint;
    assert!(
        stderr(&out).contains(&format!("--peer-id {fp}")),
        "{}",
        stderr(&out)
    );
    t.server
        .wait_log("does not trust this server's fingerprint");

    // The server does not know this client.
    let stranger = Ident::create(&t.path("stranger"));
    let out = client_sync(&stranger, fp, s(&src), &t.remote("v"), &t.state, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&stranger.fingerprint),
        "{}",
        stderr(&out)
    );
    let log = t
        .server
        .wait_log(&format!("add the line \"{}\"", stranger.fingerprint));
    assert!(log.contains("refused an unknown client"), "{log}");

    // Another protocol version.
    let ours = replicator::protocol::message::PROTOCOL_VERSION;
    let theirs = (ours + 1).to_string();
    let out = t.sync(s(&src), &t.remote("v"), &["--protocol-version", &theirs]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let msg = format!("the server speaks version {ours}, the client speaks version {theirs}");
    let msg = msg.as_str();
    assert!(stderr(&out).contains(msg), "{}", stderr(&out));
    t.server.wait_log(msg);

    // Bad volume names never reach the server; unknown volumes are refused by it.
    let out = t.sync(s(&src), &format!("{}/..", t.server.addr), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = t.sync(&t.remote("nothing-here"), s(&t.path("x")), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("no volume named nothing-here"));
    assert!(!t.volume("v").exists(), "a refused session wrote something");
}

/// A push through `relay`, stalled by a blackhole once 10 MiB went through.
fn stalled_push(
    t: &Setup,
    relay: &Relay,
    src: &Path,
    volume: &str,
    extra: &[&str],
) -> std::process::Child {
    let remote = format!("{}/{volume}", relay.addr);
    stalled(
        t,
        relay,
        (s(src), &remote),
        extra,
        &relay.upstream_bytes,
        10 << 20,
    )
}

/// A sync from `ends.0` to `ends.1` (one of them through `relay`), stalled by a blackhole
/// once `moved` counts `after` bytes.
fn stalled(
    t: &Setup,
    relay: &Relay,
    ends: (&str, &str),
    extra: &[&str],
    moved: &std::sync::atomic::AtomicU64,
    after: u64,
) -> std::process::Child {
    let server = &t.server.ident.fingerprint;
    let child = client_command(&t.client, server, ends.0, ends.1, &t.state, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while moved.load(Ordering::Relaxed) < after {
        assert!(Instant::now() < deadline, "the sync never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    relay.faults.blackhole.store(true, Ordering::Relaxed);
    child
}

/// Waits until the partial files under `dir` hold at least `bytes` between them.
fn wait_staged(dir: &Path, bytes: u64) {
    let staged = || {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".rpl-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while staged() < bytes {
        assert!(Instant::now() < deadline, "only {} bytes staged", staged());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn big_source(t: &Setup) -> PathBuf {
    let src = t.path("big");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("blob"), bytes(5, 24 << 20)).unwrap();
    fs::write(src.join("small"), b"hello").unwrap();
    settle();
    src
}

#[test]
fn second_writer_and_reader_get_volume_busy_first_is_unaffected() {
    let t = Setup::new(&["--timeout", "30"]);
    let src = big_source(&t);
    let relay = Relay::start(t.server.addr);
    let first = stalled_push(&t, &relay, &src, "busy", &["--timeout", "30"]);
    // The first session holds the volume while its link is stalled.
    let other = t.path("other");
    fs::create_dir(&other).unwrap();
    let out = t.sync(s(&other), &t.remote("busy"), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("volume busy is busy"),
        "{}",
        stderr(&out)
    );
    let out = t.sync(&t.remote("busy"), s(&t.path("reader")), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("busy"), "{}", stderr(&out));
    // Other volumes are served meanwhile.
    summary(&t.sync(s(&other), &t.remote("free"), &[]));
    relay.faults.blackhole.store(false, Ordering::Relaxed);
    let out = first.wait_with_output().unwrap();
    summary(&out);
    assert_mirrors(&src, &t.volume("busy"));
}

#[test]
fn lossy_reordering_duplicating_link_stays_correct() {
    let t = Setup::new(&[]);
    let src = t.path("src");
    make_sample_tree(&src).unwrap();
    fs::write(src.join("blob"), bytes(8, 2 << 20)).unwrap();
    settle();
    let relay = Relay::start(t.server.addr);
    relay.faults.drop_per_mille.store(100, Ordering::Relaxed);
    relay.faults.reorder_per_mille.store(50, Ordering::Relaxed);
    relay
        .faults
        .duplicate_per_mille
        .store(50, Ordering::Relaxed);
    let remote = format!("{}/lossy", relay.addr);
    summary(&t.sync(s(&src), &remote, &[]));
    assert_mirrors(&src, &t.volume("lossy"));
    let back = t.path("back");
    summary(&t.sync(&remote, s(&back), &[]));
    assert_mirrors(&src, &back);
}

#[test]
fn only_the_end_sending_the_volume_uses_datagrams_above_ethernets() {
    let t = Setup::new(&[]);
    let src = t.path("src");
    make_sample_tree(&src).unwrap();
    fs::write(src.join("blob"), bytes(9, 8 << 20)).unwrap();
    settle();
    // A push: the client's path MTU discovery finds loopback's 64 KB datagrams and carries
    // the volume in them; the server, which only acknowledges, is told to keep to 1,472
    // bytes and so never sends a 64 KB probe.
    let relay = Relay::start(t.server.addr);
    let remote = format!("{}/sizes", relay.addr);
    summary(&t.sync(s(&src), &remote, &[]));
    assert_mirrors(&src, &t.volume("sizes"));
    let (up, down) = (&relay.largest_upstream, &relay.largest_downstream);
    assert!(up.load(Ordering::Relaxed) > 1500, "push upstream {up:?}");
    assert!(
        down.load(Ordering::Relaxed) <= 1472,
        "push downstream {down:?}"
    );
    // A pull: the other way round; the client does not probe at all.
    let relay = Relay::start(t.server.addr);
    let remote = format!("{}/sizes", relay.addr);
    let back = t.path("back");
    summary(&t.sync(&remote, s(&back), &[]));
    assert_mirrors(&src, &back);
    let (up, down) = (&relay.largest_upstream, &relay.largest_downstream);
    assert!(
        down.load(Ordering::Relaxed) > 1500,
        "pull downstream {down:?}"
    );
    assert!(up.load(Ordering::Relaxed) <= 1472, "pull upstream {up:?}");
}

/// After an interruption, the rerun moves only what the server lacks, and finishes.
fn rerun_resumes(t: &Setup, src: &Path, volume: &str) {
    let out = t.sync(s(src), &t.remote(volume), &[]);
    let again = summary(&out);
    let (sent, total) = (
        again["chunks_sent"].as_u64().unwrap(),
        again["chunks_total"].as_u64().unwrap(),
    );
    assert!(
        sent * 10 < total * 9,
        "rerun sent {sent} of {total} chunks: no resume"
    );
    let raw = again["bytes_sent_raw"].as_u64().unwrap();
    let total_bytes = again["bytes_total"].as_u64().unwrap();
    assert!(
        raw + (4 << 20) < total_bytes,
        "rerun resent {raw} of {total_bytes} bytes"
    );
    assert_mirrors(src, &t.volume(volume));
    no_staging_left(&t.volume(volume));
}

#[test]
fn blackholed_link_times_out_and_the_rerun_resumes() {
    let t = Setup::new(&["--timeout", "2"]);
    let src = big_source(&t);
    let relay = Relay::start(t.server.addr);
    let child = stalled_push(&t, &relay, &src, "cut", &["--timeout", "2"]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
    t.server.wait_log("result=failed");
    rerun_resumes(&t, &src, "cut");
}

/// A push into `volume` whose client is killed mid-way; returns once the server has noticed.
fn killed_push(server_args: &[&str], volume: &str) -> (Setup, PathBuf) {
    let t = Setup::new(server_args);
    let src = big_source(&t);
    let relay = Relay::start(t.server.addr);
    let mut child = stalled_push(&t, &relay, &src, volume, &[]);
    child.kill().unwrap();
    child.wait().unwrap();
    t.server.wait_log("result=failed");
    (t, src)
}

#[test]
fn killed_client_then_the_rerun_resumes() {
    let (t, src) = killed_push(&["--timeout", "2"], "kc");
    rerun_resumes(&t, &src, "kc");
}

#[test]
fn abandoned_staging_over_the_size_bound_is_removed() {
    let (t, src) = killed_push(&["--timeout", "2", "--staging-max-gib", "0"], "bounded");
    // The failed session left partial files; with no room allowed, the sweep after it
    // removes them (and says so), and a later sync still completes from scratch.
    let log = t
        .server
        .wait_log("removed abandoned staging (over --staging-max-gib)");
    let line = log
        .lines()
        .find(|l| l.contains("removed abandoned"))
        .unwrap();
    assert!(!line.contains("files=0 "), "{line}");
    no_staging_left(&t.volume("bounded"));
    summary(&t.sync(s(&src), &t.remote("bounded"), &[]));
    assert_mirrors(&src, &t.volume("bounded"));
}

#[test]
fn killed_server_fails_the_client_cleanly_and_the_rerun_resumes() {
    let mut t = Setup::new(&[]);
    let src = big_source(&t);
    let relay = Relay::start(t.server.addr);
    let child = stalled_push(&t, &relay, &src, "ks", &["--timeout", "2"]);
    // What the server holds in its buffers when killed is lost; what it wrote stays in the
    // partial file. Killed once that file holds 5 MiB, the rerun has something to resume.
    wait_staged(&t.volume("ks"), 5 << 20);
    t.server.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // Same identity, same root, same port: as after a restart.
    let addr = t.server.addr.to_string();
    let ident = t.server.ident.clone();
    let root = t.server.root.clone();
    t.server = ServerProc::start_on(&ident, &root, &[&t.client], &addr, &[]);
    rerun_resumes(&t, &src, "ks");
}

#[test]
fn bench_measures_a_link_and_the_local_pipeline() {
    let t = Setup::new(&[]);
    let out = std::process::Command::new(replicator_bin())
        .args(["bench", "--json", "--seconds", "0.5", "--identity"])
        .arg(&t.client.dir)
        .args(["--peer-id", &t.server.ident.fingerprint])
        .arg(t.server.addr.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(r["megabytes_per_second"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["rtt_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["server_cpu_seconds"].as_f64().is_some(), "{r}");
    // Loopback carries datagrams far above Ethernet's 1,500 bytes and path MTU discovery
    // finds them. Had GSO batches of them been refused, their loss would have set off the
    // black-hole detector, which falls back to 1,200 bytes for the rest of the session.
    assert!(r["path_mtu"].as_u64().unwrap() > 1500, "{r}");
    assert!(r["lost_packets"].as_u64().is_some(), "{r}");
    // Nothing is kept on the server.
    assert_eq!(
        fs::read_dir(&t.server.root)
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count(),
        0
    );

    let src = t.path("src");
    make_sample_tree(&src).unwrap();
    let out = std::process::Command::new(replicator_bin())
        .args(["bench", "--json", "--local"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["bytes"].as_u64().unwrap() > 64 << 20, "{r}");
    assert!(r["chunks"].as_u64().unwrap() > 200, "{r}");
    assert!(
        r["scan_megabytes_per_second"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    let ratio = r["compress_ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio < 1.0, "text compresses: {r}");
}

#[test]
fn device_nodes_cross_only_to_a_server_told_to_allow_them() {
    if !is_root() {
        eprintln!("skipped: creating device nodes needs root");
        return;
    }
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("data"), bytes(5, 10_000)).unwrap();
    let d = rustix::fs::open(
        src.path(),
        rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let null = rustix::fs::makedev(1, 3);
    let perm = rustix::fs::Mode::from_raw_mode(0o666);
    rustix::fs::mknodat(
        &d,
        "null",
        rustix::fs::FileType::CharacterDevice,
        perm,
        null,
    )
    .unwrap();
    settle();

    // By default a server refuses the node, and writes nothing of the push.
    let t = Setup::new(&[]);
    let out = t.sync(s(src.path()), &t.remote("dev"), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(said.contains("null is a char device (1:3)"), "{said}");
    assert!(said.contains("--allow-devices"), "{said}");
    let left = fs::read_dir(t.volume("dev")).map_or(0, |d| d.count());
    assert_eq!(left, 0, "the refused push wrote into the volume");
    t.server.wait_log("does not create device nodes");

    // Told to, it creates it; a pull (the user's own choice of source) creates it too.
    let t = Setup::new(&["--allow-devices"]);
    summary(&t.sync(s(src.path()), &t.remote("dev"), &[]));
    assert_mirrors(src.path(), &t.volume("dev"));
    let back = t.path("back");
    summary(&t.sync(&t.remote("dev"), s(&back), &[]));
    assert_mirrors(src.path(), &back);
    let rdev = rustix::fs::stat(back.join("null")).unwrap().st_rdev;
    assert_eq!(rdev, null);
}

/// `replicator sync -n` lists what a push or a pull would change, in either direction the
/// receiving end plans it, and nothing changes at either end: not even an absent
/// destination is created. The sync that follows does what the dry run said.
#[test]
fn dry_runs_of_a_push_and_a_pull_list_the_changes_and_change_nothing() {
    let t = Setup::new(&[]);
    let src = t.path("src");
    make_sample_tree(&src).unwrap();
    settle();
    let lines = listing(&t.shown(s(&src), &t.remote("data"), &["--dry-run"]));
    assert_eq!(lines[0], "create  .", "{lines:?}");
    assert!(lines.contains(&"create  dir1/sub1/file0.txt".to_string()));
    assert!(!t.volume("data").exists(), "a dry run created the volume");
    summary(&t.sync(s(&src), &t.remote("data"), &[]));

    edit_sample_tree(&src).unwrap();
    settle();
    let before = describe(&t.volume("data"));
    let lines = listing(&t.shown(s(&src), &t.remote("data"), &["-n"]));
    for line in [
        "update  data.bin",
        "update  dir1/sub1/file0.txt",
        "delete  dir2/sub2/file3.txt",
        "delete  dir3/sub0/file4.txt",
        "create  dir3/file4-renamed.txt",
    ] {
        assert!(lines.contains(&line.to_string()), "{line} not in {lines:?}");
    }
    let dry = summary(&t.sync(s(&src), &t.remote("data"), &["-n"]));
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(
        describe(&t.volume("data")),
        before,
        "a dry run changed the volume"
    );
    let real = summary(&t.sync(s(&src), &t.remote("data"), &[]));
    assert_eq!(real["dry_run"], false);
    for field in ["files_written", "deleted", "chunks_sent", "root"] {
        assert_eq!(dry[field], real[field], "{field}: {dry} vs {real}");
    }
    assert_mirrors(&src, &t.volume("data"));

    let back = t.path("back");
    let lines = listing(&t.shown(&t.remote("data"), s(&back), &["-n"]));
    assert_eq!(lines[0], "create  .", "{lines:?}");
    assert!(!back.exists(), "a dry run created the destination");
    summary(&t.sync(&t.remote("data"), s(&back), &[]));
    fs::write(src.join("dir3/sub0/new-file"), bytes(78, 50_000)).unwrap();
    settle();
    summary(&t.sync(s(&src), &t.remote("data"), &[]));
    let before = describe(&back);
    let lines = listing(&t.shown(&t.remote("data"), s(&back), &["-n"]));
    assert!(
        lines.contains(&"create  dir3/sub0/new-file".to_string()),
        "{lines:?}"
    );
    let dry = summary(&t.sync(&t.remote("data"), s(&back), &["-n"]));
    assert_eq!(describe(&back), before, "a dry run changed the destination");
    let real = summary(&t.sync(&t.remote("data"), s(&back), &[]));
    for field in ["files_written", "deleted", "chunks_sent", "root"] {
        assert_eq!(dry[field], real[field], "{field}: {dry} vs {real}");
    }
    assert_mirrors(&src, &back);
    let log = t.server.log();
    assert!(log.contains("ok (dry run: nothing changed)"), "{log}");
}

/// `--inplace` reaches the server's receiver through the hello of a push, and a pull's own
/// receiver: either way a big file with a small change keeps its inode, and without the flag
/// the server rebuilds it as before.
#[test]
fn a_push_and_a_pull_with_inplace_patch_the_far_end_and_only_when_asked() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let t = Setup::new(&[]);
    let src = t.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("db"), bytes(1, 4 << 20)).unwrap();
    summary(&t.sync(s(&src), &t.remote("data"), &[]));
    let back = t.path("back");
    summary(&t.sync(&t.remote("data"), s(&back), &[]));
    let inode = |p: PathBuf| fs::metadata(p.join("db")).unwrap().ino();
    let (served, pulled) = (inode(t.volume("data")), inode(back.clone()));
    settle();
    let change = |seed: u64| {
        let db = fs::File::options()
            .write(true)
            .open(src.join("db"))
            .unwrap();
        db.write_all_at(&bytes(seed, 64 << 10), 1 << 20).unwrap();
    };

    change(2);
    let push = summary(&t.sync(s(&src), &t.remote("data"), &["--inplace"]));
    assert_eq!(push["files_patched"], 1, "{push}");
    assert_eq!(inode(t.volume("data")), served);
    assert_mirrors(&src, &t.volume("data"));
    let pull = summary(&t.sync(&t.remote("data"), s(&back), &["--inplace"]));
    assert_eq!(pull["files_patched"], 1, "{pull}");
    assert_eq!(inode(back.clone()), pulled);
    assert_mirrors(&src, &back);

    settle();
    change(3);
    let push = summary(&t.sync(s(&src), &t.remote("data"), &[]));
    assert_eq!(push["files_patched"], 0, "{push}");
    assert_ne!(
        inode(t.volume("data")),
        served,
        "patched without being asked"
    );
    assert_mirrors(&src, &t.volume("data"));
}

/// Overwrites random 16 KiB pages of the 1 MiB at `path`'s middle in a loop until dropped,
/// as a database writes its hot pages while it serves.
struct PageWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PageWriter {
    fn start(path: PathBuf) -> PageWriter {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let f = fs::File::options().write(true).open(&path).unwrap();
            let hot = f.metadata().unwrap().len() / 2;
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            while !flag.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f.write_all_at(&x.to_le_bytes().repeat(2048), hot + (x % 64) * (16 << 10))
                    .unwrap();
            }
        });
        PageWriter {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PageWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs a `--live` sync until one ends unfinished (exit code 5, at most 5 tries: a run
/// in which no page changed between the scan and the read-back finishes), checking that
/// such a run changed nothing at the destination's file `db`; returns its JSON summary.
fn live_until_unfinished(t: &Setup, src: &str, dst: &str, dst_db: &Path) -> serde_json::Value {
    for _ in 0..5 {
        let before = fs::read(dst_db).unwrap();
        let out = t.sync(src, dst, &["--live"]);
        match out.status.code() {
            Some(0) => continue,
            Some(5) => {
                assert!(stderr(&out).contains("unfinished"), "{}", stderr(&out));
                assert!(
                    fs::read(dst_db).unwrap() == before,
                    "an unfinished sync changed db"
                );
                return serde_json::from_slice(&out.stdout).unwrap();
            }
            code => panic!("live sync exited {code:?}: {}", stderr(&out)),
        }
    }
    panic!("no live sync met a page written while it was sent");
}

#[test]
fn live_push_and_pull_of_a_file_being_written_end_unfinished_then_complete() {
    let t = Setup::new(&[]);
    let src = t.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("db"), bytes(1, 32 << 20)).unwrap();
    fs::write(src.join("log"), bytes(2, 100_000)).unwrap();
    summary(&t.sync(s(&src), &t.remote("data"), &[]));

    // Push: the client's source is written while it is sent.
    let writer = PageWriter::start(src.join("db"));
    let live = live_until_unfinished(&t, s(&src), &t.remote("data"), &t.volume("data").join("db"));
    assert_eq!(live["complete"], false, "{live}");
    assert!(live["chunks_stale"].as_u64().unwrap() > 0, "{live}");
    assert_eq!(live["files_written"], 0, "{live}");
    let log = t.server.wait_log("result=unfinished");
    assert!(log.contains("partial files kept"), "{log}");
    drop(writer);
    let last = summary(&t.sync(s(&src), &t.remote("data"), &[]));
    assert_eq!(last["complete"], true, "{last}");
    assert!(
        last["bytes_sent_raw"].as_u64().unwrap() < 8 << 20,
        "the rerun resumed what the live run brought: {last}"
    );
    assert_mirrors(&src, &t.volume("data"));
    no_staging_left(&t.volume("data"));

    // Pull: the server's volume is written while the server sends it.
    let back = t.path("back");
    summary(&t.sync(&t.remote("data"), s(&back), &[]));
    let writer = PageWriter::start(t.volume("data").join("db"));
    let live = live_until_unfinished(&t, &t.remote("data"), s(&back), &back.join("db"));
    assert!(live["chunks_stale"].as_u64().unwrap() > 0, "{live}");
    drop(writer);
    summary(&t.sync(&t.remote("data"), s(&back), &[]));
    assert_mirrors(&t.volume("data"), &back);
}

/// A dry-run push only reads the volume: it runs beside a pull (a reader) that is stalled
/// mid-transfer, where a real push is refused as busy.
#[test]
fn a_dry_run_push_reads_beside_a_stalled_pull_where_a_real_push_is_busy() {
    let t = Setup::new(&["--timeout", "30"]);
    let src = big_source(&t);
    summary(&t.sync(s(&src), &t.remote("shared"), &[]));
    let relay = Relay::start(t.server.addr);
    let remote = format!("{}/shared", relay.addr);
    let reader = t.path("reader");
    let ends = (remote.as_str(), s(&reader));
    let timeout = ["--timeout", "30"];
    let pull = stalled(&t, &relay, ends, &timeout, &relay.downstream_bytes, 4 << 20);
    fs::write(src.join("small"), b"changed").unwrap();
    let dry = summary(&t.sync(s(&src), &t.remote("shared"), &["-n"]));
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["files_written"], 1, "{dry}");
    let out = t.sync(s(&src), &t.remote("shared"), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("busy"), "{}", stderr(&out));
    relay.faults.blackhole.store(false, Ordering::Relaxed);
    summary(&pull.wait_with_output().unwrap());
    summary(&t.sync(s(&src), &t.remote("shared"), &[]));
    assert_mirrors(&src, &t.volume("shared"));
}
