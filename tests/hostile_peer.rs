//! A peer that lies: a test-only client pushing, and a test-only server answering a pull,
//! each sending what no honest peer would. Every case must be rejected, leave the
//! destination exactly as it was, write nothing outside it, and (for the server) leave the
//! server serving others.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};

use bytes::Bytes;
use integration_tests::net::*;
use integration_tests::*;
use replicator::chunk::{ChunkId, ChunkerParams, Segment};
use replicator::manifest::Limits;
use replicator::manifest::delta::{FilePatch, SegmentOp};
use replicator::manifest::{
    DigestBuilder, Entry, EntryKind, Header, MANIFEST_VERSION, Meta, RelPath, RootDigest,
    VolumeMode,
};
use replicator::net::client::{ClientOptions, Session, open_session};
use replicator::net::conn::end_session;
use replicator::net::endpoint::{self, NetOptions};
use replicator::net::identity::{Fingerprint, Identity, TrustList};
use replicator::net::lanes::{self, FirstError, LaneRx, LaneTx};
use replicator::net::open::{Direction, RemoteSpec};
use replicator::net::server::{accept_lanes, receive_open};
use replicator::protocol::message::{
    ChunkData, Encoding, Hello, MAX_FRAME, Message, PROTOCOL_VERSION, SuffixData,
};
use replicator::sync::SyncOptions;
use replicator::transport::{MessageRx, MessageTx};

const VOLUME: &str = "target";

struct Setup {
    tmp: tempfile::TempDir,
    client: Ident,
    server: ServerProc,
    /// Sessions the server has logged so far.
    sessions: usize,
    /// The root the volume was completed at by the honest push.
    root: RootDigest,
}

impl Setup {
    /// A server whose volume already holds a small tree, pushed honestly.
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let server_id = Ident::create(&tmp.path().join("server-id"));
        let client = Ident::create(&tmp.path().join("client-id"));
        let server = ServerProc::start(
            &server_id,
            &tmp.path().join("volumes"),
            &[&client],
            &["--max-entries", "1000"],
        );
        let mut t = Setup {
            tmp,
            client,
            server,
            sessions: 0,
            root: RootDigest([0; 32]),
        };
        let src = t.tmp.path().join("honest");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/kept"), bytes(1, 100_000)).unwrap();
        let pushed = summary(&t.honest_push(&src));
        t.root = RootDigest::from_hex(pushed["root"].as_str().unwrap()).unwrap();
        t.sessions = 1;
        t
    }

    fn honest_push(&self, src: &Path) -> std::process::Output {
        client_sync(
            &self.client,
            &self.server.ident.fingerprint,
            src.to_str().unwrap(),
            &format!("{}/{VOLUME}", self.server.addr),
            &self.tmp.path().join("state"),
            &[],
        )
    }

    /// A push session past the greeting: the server has answered `Hello`.
    fn greeted(&self) -> Session {
        let mut sess = self.session();
        sess.tx.send(hello()).unwrap();
        assert!(matches!(sess.rx.recv().unwrap(), Message::Hello(_)));
        sess
    }

    fn session(&self) -> Session {
        client_session(
            &self.client.dir,
            &self.server.ident.fingerprint,
            &format!("{}/{VOLUME}", self.server.addr),
            Direction::Push,
        )
    }
}

fn client_session(id_dir: &Path, server_fp: &str, remote: &str, direction: Direction) -> Session {
    let id = Identity::load(id_dir).unwrap();
    let mut trust = TrustList::new();
    trust.add(Fingerprint::parse(server_fp).unwrap());
    let opts = ClientOptions::new(id, trust, PathBuf::from("/dev/null"));
    let remote = RemoteSpec::parse(remote).unwrap().unwrap();
    let volume = remote.volume.as_str().to_string();
    match open_session(
        &remote.address(),
        direction,
        &volume,
        &SyncOptions::default(),
        &opts,
    ) {
        Ok(s) => s,
        Err(e) => panic!("open_session: {e}"),
    }
}

fn meta() -> Meta {
    Meta {
        perm: 0o755,
        mtime_sec: 1_700_000_000,
        ..Meta::default()
    }
}

fn dir(path: &str) -> Entry {
    Entry {
        path: RelPath::new(path.as_bytes().to_vec()).unwrap(),
        kind: EntryKind::Dir,
        meta: meta(),
    }
}

fn root() -> Entry {
    Entry {
        path: RelPath::root(),
        kind: EntryKind::Dir,
        meta: meta(),
    }
}

fn file(path: &str, data: &[u8]) -> Entry {
    Entry {
        path: RelPath::new(path.as_bytes().to_vec()).unwrap(),
        kind: EntryKind::File {
            size: data.len() as u64,
            segments: vec![Segment::Chunk {
                id: ChunkId::of(data),
                len: data.len() as u32,
            }],
        },
        meta: meta(),
    }
}

fn hello() -> Message {
    hello_with_bases(Vec::new())
}

/// A hello offering deltas against `bases`.
fn hello_with_bases(bases: Vec<RootDigest>) -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        mode: VolumeMode::Tree,
        chunker: ChunkerParams::default(),
        compress: false,
        stream: false,
        bases,
        dry_run: false,
        inplace: false,
        live: false,
    })
}

fn frame(body: &[u8]) -> Bytes {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    Bytes::from(f)
}

/// An entry frame whose path is `raw`, which no valid `RelPath` could hold.
fn raw_path_entry(raw: &[u8]) -> Bytes {
    let marker = vec![b'q'; raw.len()];
    let body = Message::Entry(file(std::str::from_utf8(&marker).unwrap(), b"x")).encode_body();
    let at = body
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap();
    let mut body = body.clone();
    body[at..at + raw.len()].copy_from_slice(raw);
    frame(&body)
}

/// Every chunk id the peer wants, up to its `WantEnd`.
fn wants(rx: &mut LaneRx) -> Vec<ChunkId> {
    let mut wanted = Vec::new();
    loop {
        match rx.recv().unwrap() {
            Message::Want(ids) => wanted.extend(ids),
            Message::WantEnd => return wanted,
            m => panic!("unexpected {}", m.name()),
        }
    }
}

/// A manifest: entries then the matching end message.
fn send_manifest(sess: &mut Session, entries: &[Entry]) {
    send_manifest_to(&mut sess.tx, entries);
}

/// Reads until the peer reports an error or the connection ends; returns what it said.
fn outcome(mut sess: Session) -> String {
    let _ = sess.tx.flush();
    let mut said = String::new();
    loop {
        match sess.rx.recv() {
            Ok(Message::Error { message }) => {
                said = message;
                break;
            }
            Ok(Message::Done { .. }) => panic!("the peer accepted a hostile session"),
            Ok(_) => {}
            Err(e) => {
                if said.is_empty() {
                    said = e.to_string();
                }
                break;
            }
        }
    }
    sess.finish(false, false);
    said
}

/// The destination as it was, nothing escaped, and the server logged this session's failure
/// with `needle` in it.
fn check_intact(t: &mut Setup, before: &std::collections::BTreeMap<Vec<u8>, Desc>, needle: &str) {
    t.sessions += 1;
    let log = t.server.wait_log(needle);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let ended = |log: &str| log.matches(" session ").count();
    let mut log = log;
    while ended(&log) < t.sessions {
        assert!(
            std::time::Instant::now() < deadline,
            "session not logged:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        log = t.server.log();
    }
    // Sessions log when they end, which need not be in the order they started.
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" session ") && l.contains(needle))
        .unwrap_or_else(|| panic!("no session line with {needle:?}:\n{log}"));
    assert!(line.contains("result=failed"), "{line}");
    assert_eq!(
        &describe(&t.server.root.join(VOLUME)),
        before,
        "destination changed ({needle})"
    );
    assert!(
        !t.tmp.path().join("escaped").exists(),
        "wrote outside the volume"
    );
}

#[test]
fn hostile_client_pushes_are_rejected_and_the_server_keeps_serving() {
    let mut t = Setup::new();
    let before = describe(&t.server.root.join(VOLUME));

    // Paths no valid manifest has: traversal, absolute, NUL, empty component.
    for (raw, why) in [
        (&b"../escaped"[..], "dot component"),
        (b"/tmp/escaped", "absolute"),
        (b"a\0b", "contains NUL"),
        (b"a//b", "empty component"),
        (b"sub/..", "dot component"),
    ] {
        let mut sess = t.greeted();
        sess.tx.send(Message::Entry(root())).unwrap();
        sess.tx.send_raw(raw_path_entry(raw)).unwrap();
        outcome(sess);
        check_intact(
            &mut t,
            &before,
            &format!("malformed data from peer: invalid entry path: {why}"),
        );
    }

    // A path through a symlink: "link" points outside, then "link/evil" is a file.
    let outside = t.tmp.path().join("escaped");
    let link = Entry {
        path: RelPath::new(b"link".to_vec()).unwrap(),
        kind: EntryKind::Symlink {
            target: outside.to_str().unwrap().as_bytes().to_vec(),
        },
        meta: meta(),
    };
    let mut sess = t.greeted();
    send_manifest(&mut sess, &[root(), link, file("link/evil", b"pwned")]);
    assert!(outcome(sess).contains("no parent directory"));
    check_intact(&mut t, &before, "has no parent directory before it");

    // A tree whose root is a regular file: everything in the volume would be "extra".
    let file_root = Entry {
        path: RelPath::root(),
        ..file("x", b"all that is left")
    };
    let mut sess = t.greeted();
    send_manifest(&mut sess, &[file_root]);
    assert!(outcome(sess).contains("root of a tree manifest is not a directory"));
    check_intact(
        &mut t,
        &before,
        "root of a tree manifest is not a directory",
    );

    // A chunk whose data does not hash to its name, one sent as the tail of a chunk the
    // server never said it holds.
    let honest = bytes(9, 5000);
    let forged = |id: ChunkId| {
        Message::Chunk(ChunkData {
            id,
            encoding: Encoding::Raw,
            raw_len: 5000,
            payload: Bytes::from(bytes(10, 5000)),
        })
    };
    let unoffered = |id: ChunkId| {
        Message::Suffix(SuffixData::encode(
            id,
            ChunkId::of(&honest[..1000]),
            1000,
            &honest,
            None,
        ))
    };
    // And a chunk said to be stale in a session whose hello did not say the source is live:
    // the receiver would keep partial files and report the sync unfinished for nothing.
    let stale = Message::Stale;
    let cases: [(&dyn Fn(ChunkId) -> Message, &str); 3] = [
        (&forged, "hashes to"),
        (&unoffered, "which this receiver did not offer"),
        (&stale, "a stale chunk in a session that is not live"),
    ];
    for (bad, needle) in cases {
        let mut sess = t.greeted();
        send_manifest(
            &mut sess,
            &[
                root(),
                dir("sub"),
                file("sub/kept", &bytes(1, 100_000)),
                file("z", &honest),
            ],
        );
        let wanted = wants(&mut sess.rx);
        assert_eq!(wanted, vec![ChunkId::of(&honest)]);
        sess.tx.send(bad(wanted[0])).unwrap();
        sess.tx.send(Message::ChunksEnd { bytes_read: 0 }).unwrap();
        assert!(outcome(sess).contains(needle));
        check_intact(&mut t, &before, needle);
    }

    // A frame larger than any the protocol allows.
    let mut sess = t.greeted();
    sess.tx
        .send_raw(Bytes::from(((MAX_FRAME + 1) as u32).to_be_bytes().to_vec()))
        .unwrap();
    outcome(sess);
    check_intact(
        &mut t,
        &before,
        &format!("frame of {} bytes", MAX_FRAME + 1),
    );

    // A stream that ends in the middle of a frame.
    let mut sess = t.greeted();
    let mut partial = 100u32.to_be_bytes().to_vec();
    partial.extend_from_slice(&[2, 0, 1]);
    sess.tx.send_raw(Bytes::from(partial)).unwrap();
    let Session {
        runtime,
        endpoint,
        conn,
        tx,
        rx,
        tasks,
    } = sess;
    drop(tx); // finishes every lane
    runtime.block_on(async {
        tasks.flush().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await;
        drop(rx);
        endpoint.wait_idle().await;
    });
    check_intact(&mut t, &before, "stream ended in the middle of a frame");

    // Deltas against the volume's own manifest (which the server agrees to) that do not fit
    // it: removing a path it never had, changes out of order, a patch past its base's end.
    let path = |p: &str| RelPath::new(p.as_bytes().to_vec()).unwrap();
    for (delta, needle) in [
        (
            vec![Message::Removed(path("never-there"))],
            "removes never-there, which the base manifest does not have",
        ),
        (
            vec![
                Message::Removed(path("sub/kept")),
                Message::Entry(dir("sub")),
            ],
            "delta entry sub is out of order",
        ),
        (
            vec![Message::Patch(FilePatch {
                path: path("sub/kept"),
                meta: meta(),
                size: 100_000,
                ops: vec![SegmentOp::Base {
                    start: 0,
                    count: 50,
                }],
            })],
            "a run of base segments is out of range",
        ),
    ] {
        let mut sess = t.session();
        let offered = vec![RootDigest([1; 32]), t.root];
        sess.tx.send(hello_with_bases(offered)).unwrap();
        match sess.rx.recv().unwrap() {
            Message::Hello(h) => assert_eq!(h.bases, vec![t.root], "no delta agreed"),
            m => panic!("unexpected {}", m.name()),
        }
        for m in delta {
            sess.tx.send(m).unwrap();
        }
        assert!(outcome(sess).contains(needle));
        check_intact(&mut t, &before, needle);
    }

    // A removal in a full manifest, where there is no base to remove from.
    let mut sess = t.greeted();
    sess.tx.send(Message::Removed(path("sub"))).unwrap();
    outcome(sess);
    check_intact(&mut t, &before, "unexpected removed message");

    // A manifest that never ends (this server accepts 1000 entries).
    let mut sess = t.greeted();
    sess.tx.send(Message::Entry(root())).unwrap();
    for i in 0..5000 {
        if sess
            .tx
            .send(Message::Entry(dir(&format!("d{i:06}"))))
            .is_err()
        {
            break;
        }
    }
    outcome(sess);
    check_intact(&mut t, &before, "this receiver's limit");

    // A device node: valid data, but this server was not started with --allow-devices (as
    // root it could create the node, which would open the disk of the server's host).
    let device = Entry {
        path: RelPath::new(b"disk".to_vec()).unwrap(),
        kind: EntryKind::BlockDevice {
            rdev: rustix::fs::makedev(8, 0),
        },
        meta: meta(),
    };
    let mut sess = t.greeted();
    send_manifest(
        &mut sess,
        &[
            root(),
            device,
            dir("sub"),
            file("sub/kept", &bytes(1, 100_000)),
        ],
    );
    let said = outcome(sess);
    assert!(said.contains("disk is a block device (8:0)"), "{said}");
    check_intact(&mut t, &before, "does not create device nodes");

    // Still serving, and the volume takes an honest push.
    assert!(t.server.is_running());
    let src = t.tmp.path().join("honest2");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("after"), b"all is well").unwrap();
    summary(&t.honest_push(&src));
    assert_mirrors(&src, &t.server.root.join(VOLUME));
}

/// A test-only server that answers one pull with `script` (playing the sending side).
fn hostile_server(
    dir: &Path,
    script: impl FnOnce(&mut LaneTx, &mut LaneRx) + Send + 'static,
) -> (String, String, std::thread::JoinHandle<()>) {
    let (id, _) = Identity::load_or_create(dir).unwrap();
    let fp = id.fingerprint.to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ep = rt
        .block_on(async {
            endpoint::server(
                &id,
                "127.0.0.1:0".parse().unwrap(),
                &NetOptions::default(),
                PROTOCOL_VERSION,
            )
        })
        .unwrap();
    let addr = ep.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        rt.block_on(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let (open, first) = receive_open(&conn, PROTOCOL_VERSION).await.unwrap();
            let (s, r) = accept_lanes(&conn, first, open.lanes).await.unwrap();
            let (mut tx, mut rx, tasks) =
                lanes::start(s, r, Limits::default(), FirstError::default());
            let rx = tokio::task::spawn_blocking(move || {
                script(&mut tx, &mut rx);
                rx
            })
            .await
            .unwrap();
            end_session(&conn, tasks, false, false).await;
            drop(rx);
            ep.wait_idle().await;
        });
    });
    (addr, fp, handle)
}

/// The opening of a pull answered by a liar: hello, then the client's hello back.
fn greet(tx: &mut LaneTx, rx: &mut LaneRx) {
    tx.send(hello()).unwrap();
    assert!(matches!(rx.recv().unwrap(), Message::Hello(_)));
}

/// Drains what the client says until it gives up.
fn until_client_gives_up(rx: &mut LaneRx) -> String {
    loop {
        match rx.recv() {
            Ok(Message::Error { message }) => return message,
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// A forged chunk for a big file the server would patch at its final name (`--inplace`
/// asked in the hello) fails the session before the commit copies anything: the file is as
/// it was and no temp file is left.
#[test]
fn a_forged_chunk_for_a_file_being_patched_in_place_changes_nothing() {
    let mut t = Setup::new();
    let src = t.tmp.path().join("honest");
    let big = bytes(20, 2 << 20);
    std::fs::write(src.join("big"), &big).unwrap();
    summary(&t.honest_push(&src));
    t.sessions += 1;
    let before = describe(&t.server.root.join(VOLUME));
    // The file's real chunk list after a 1,000-byte change in its middle.
    let mut changed = big.clone();
    changed[1 << 20..(1 << 20) + 1000].copy_from_slice(&bytes(21, 1000));
    let (segments, size) = replicator::chunk::Chunker::new(ChunkerParams::default())
        .segments(&changed[..], |_, _, _| Ok(()))
        .unwrap();
    let entry = Entry {
        path: RelPath::new(b"big".to_vec()).unwrap(),
        kind: EntryKind::File { size, segments },
        meta: meta(),
    };
    let mut sess = t.session();
    let Message::Hello(h) = hello() else {
        unreachable!()
    };
    sess.tx
        .send(Message::Hello(Hello { inplace: true, ..h }))
        .unwrap();
    let Message::Hello(answer) = sess.rx.recv().unwrap() else {
        panic!("no hello back")
    };
    assert!(answer.inplace, "the server did not agree to patch");
    send_manifest(
        &mut sess,
        &[
            root(),
            entry,
            dir("sub"),
            file("sub/kept", &bytes(1, 100_000)),
        ],
    );
    let wanted = wants(&mut sess.rx);
    assert!(
        (1..=3).contains(&wanted.len()),
        "a small change wants a chunk or two, not {}",
        wanted.len()
    );
    sess.tx
        .send(Message::Chunk(ChunkData {
            id: wanted[0],
            encoding: Encoding::Raw,
            raw_len: 5000,
            payload: Bytes::from(bytes(22, 5000)),
        }))
        .unwrap();
    sess.tx.send(Message::ChunksEnd { bytes_read: 0 }).unwrap();
    assert!(outcome(sess).contains("hashes to"));
    check_intact(&mut t, &before, "hashes to");
}

#[test]
fn hostile_server_answers_to_a_pull_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let client = Ident::create(&tmp.path().join("client-id"));
    let dst = tmp.path().join("restore");
    std::fs::create_dir_all(dst.join("sub")).unwrap();
    std::fs::write(dst.join("sub/precious"), bytes(3, 70_000)).unwrap();
    let before = describe(&dst);
    let escaped = tmp.path().join("escaped");

    let escaped_target = escaped.to_str().unwrap().as_bytes().to_vec();
    let cases: Vec<(&str, Script)> = vec![
        (
            // A dry run the client did not ask for would be reported as a finished pull.
            "asked for a dry run",
            Box::new(|tx, rx| {
                let Message::Hello(h) = hello() else {
                    unreachable!()
                };
                tx.send(Message::Hello(Hello { dry_run: true, ..h }))
                    .unwrap();
                assert!(matches!(rx.recv().unwrap(), Message::Hello(_)));
                until_client_gives_up(rx);
            }),
        ),
        (
            "invalid entry path",
            Box::new(|tx, rx| {
                greet(tx, rx);
                tx.send(Message::Entry(root())).unwrap();
                tx.send_raw(raw_path_entry(b"../escaped")).unwrap();
                until_client_gives_up(rx);
            }),
        ),
        (
            "no parent directory",
            Box::new(move |tx, rx| {
                greet(tx, rx);
                let link = Entry {
                    path: RelPath::new(b"link".to_vec()).unwrap(),
                    kind: EntryKind::Symlink {
                        target: escaped_target,
                    },
                    meta: meta(),
                };
                send_manifest_to(tx, &[root(), link, file("link/evil", b"pwned")]);
                until_client_gives_up(rx);
            }),
        ),
        (
            "rejected",
            Box::new(|tx, rx| {
                greet(tx, rx);
                let honest = bytes(9, 5000);
                send_manifest_to(
                    tx,
                    &[
                        root(),
                        dir("sub"),
                        file("sub/precious", &bytes(3, 70_000)),
                        file("z", &honest),
                    ],
                );
                let wanted = wants(rx);
                for id in wanted {
                    tx.send(Message::Chunk(ChunkData {
                        id,
                        encoding: Encoding::Raw,
                        raw_len: 5000,
                        payload: Bytes::from(bytes(10, 5000)),
                    }))
                    .unwrap();
                }
                tx.send(Message::ChunksEnd { bytes_read: 0 }).unwrap();
                until_client_gives_up(rx);
            }),
        ),
    ];
    for (needle, script) in cases {
        pull_is_refused(tmp.path(), &client, &dst, needle, script);
        assert_eq!(describe(&dst), before, "{needle}: destination changed");
        assert!(!escaped.exists(), "{needle}: wrote outside the destination");
    }
}

#[test]
fn hostile_server_streaming_into_an_empty_destination_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let client = Ident::create(&tmp.path().join("client-id"));
    let dst = tmp.path().join("fresh");
    let cases: Vec<(&str, Script)> = vec![
        (
            "hashes to",
            Box::new(|tx, rx| {
                let asked = greet_streamed(tx, rx);
                assert!(asked, "an empty destination asks for a streamed session");
                let honest = bytes(9, 5000);
                tx.send(Message::Entry(root())).unwrap();
                tx.send(Message::Entry(file("z", &honest))).unwrap();
                tx.send(Message::Chunk(ChunkData {
                    id: ChunkId::of(&honest),
                    encoding: Encoding::Raw,
                    raw_len: 5000,
                    payload: Bytes::from(bytes(10, 5000)),
                }))
                .unwrap();
                tx.flush().unwrap();
                until_client_gives_up(rx);
            }),
        ),
        (
            "no chunk was due",
            Box::new(|tx, rx| {
                greet_streamed(tx, rx);
                let data = bytes(11, 3000);
                tx.send(Message::Entry(root())).unwrap();
                tx.send(Message::Entry(dir("d"))).unwrap();
                tx.send(Message::Chunk(ChunkData::encode(
                    ChunkId::of(&data),
                    &data,
                    None,
                )))
                .unwrap();
                tx.flush().unwrap();
                until_client_gives_up(rx);
            }),
        ),
        (
            // A sender that counts on the receiver remembering every chunk: it withholds a
            // repeated chunk whose window slot another chunk took in between.
            "received entry where chunk",
            Box::new(|tx, rx| {
                greet_streamed(tx, rx);
                let a = b"the first content".to_vec();
                use replicator::chunk::window::{MIN_SLOTS, slot};
                let slot_of = |c: &[u8]| slot(&ChunkId::of(c), MIN_SLOTS);
                let b = (0u32..)
                    .map(|i| format!("content {i}").into_bytes())
                    .find(|b| slot_of(b) == slot_of(&a))
                    .unwrap();
                tx.send(Message::Entry(root())).unwrap();
                for (name, data, send) in [("1", &a, true), ("2", &b, true), ("3", &a, false)] {
                    tx.send(Message::Entry(file(name, data))).unwrap();
                    if send {
                        tx.send(Message::Chunk(ChunkData::encode(
                            ChunkId::of(data),
                            data,
                            None,
                        )))
                        .unwrap();
                    }
                }
                tx.send(Message::Entry(file("4", b"after"))).unwrap();
                tx.flush().unwrap();
                until_client_gives_up(rx);
            }),
        ),
    ];
    for (needle, script) in cases {
        std::fs::create_dir_all(&dst).unwrap();
        pull_is_refused(tmp.path(), &client, &dst, needle, script);
        let left: Vec<_> = std::fs::read_dir(&dst).unwrap().collect();
        assert!(
            left.is_empty(),
            "{needle}: left {left:?} in the destination"
        );
    }
}

/// What a test-only hostile server does with one session.
type Script = Box<dyn FnOnce(&mut LaneTx, &mut LaneRx) + Send>;

/// Pulls `dst` from a test-only server playing `script`; the client must fail saying `needle`.
fn pull_is_refused(tmp: &Path, client: &Ident, dst: &Path, needle: &str, script: Script) {
    let (addr, fp, server) = hostile_server(&tmp.join("liar-id"), script);
    let out = client_sync(
        client,
        &fp,
        &format!("{addr}/vol"),
        dst.to_str().unwrap(),
        &tmp.join("state"),
        &[],
    );
    server.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{needle}: the client accepted it");
    assert!(err.contains(needle), "{needle}: {err}");
}

/// Exchanges hellos; true if the client asked for a streamed session.
fn greet_streamed(tx: &mut LaneTx, rx: &mut LaneRx) -> bool {
    tx.send(hello()).unwrap();
    match rx.recv().unwrap() {
        Message::Hello(h) => h.stream,
        m => panic!("unexpected {}", m.name()),
    }
}

fn send_manifest_to(tx: &mut LaneTx, entries: &[Entry]) {
    let mut digest = DigestBuilder::new(&Header {
        version: MANIFEST_VERSION,
        mode: VolumeMode::Tree,
        chunker: ChunkerParams::default(),
    });
    for e in entries {
        digest.add(e).unwrap();
        tx.send(Message::Entry(e.clone())).unwrap();
    }
    tx.send(Message::ManifestEnd {
        entries: entries.len() as u64,
        root: digest.finish(),
    })
    .unwrap();
}
