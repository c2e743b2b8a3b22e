//! The deployer with three agents on 127.0.0.1-3 (process runtime, real processes, real
//! sockets): deploy, converge, reconfigure, remove, route through any node, survive an agent
//! restart, and refuse to start when a node is unreachable.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use integration_tests::cluster::*;

fn apps(kv: &str, env: &str) -> String {
    format!(
        "version: 1\napplications:\n  kv:\n    image: kvstore\n    command: [\"{kv}\"]\n    volume:\n      mountpoint: /data\n    ports:\n      - internal: 7000\n        external: 17070\n    environment:\n      MODE: \"{env}\"\n"
    )
}

fn actions(report: &serde_json::Value) -> Vec<String> {
    report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{} {}",
                a["action"].as_str().unwrap(),
                a["app"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn deploy_converge_reconfigure_route_readopt_and_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(tmp.path(), &["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    let kvbin = kvstore_bin();
    let application = c.write("application.yml", &apps(kvbin.to_str().unwrap(), "a"));
    let deployment = c.write(
        "deployment.yml",
        "version: 1\nnodes:\n  127.0.0.1: [kv]\n  127.0.0.2: []\n  127.0.0.3: []\n",
    );

    // A dry run changes nothing.
    let out = c.deployer(&[
        "deploy",
        "--dry-run",
        deployment.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("start   kv on 127.0.0.1"));
    assert!(
        c.status(&deployment)["127.0.0.1"]["applications"]
            .as_object()
            .unwrap()
            .is_empty()
    );

    let first = c.deploy(&deployment, &application);
    assert_eq!(actions(&first), vec!["start kv"]);
    // Reachable on its external port through every node, including those not running it.
    assert_eq!(kv("127.0.0.2:17070", "SET a 1"), "OK");
    assert_eq!(kv("127.0.0.3:17070", "GET a"), "VALUE 1");
    assert_eq!(kv("127.0.0.1:17070", "COUNT"), "COUNT 1");
    let volume = c.agents[0].state.join("volumes/kv/kv.log");
    assert_eq!(std::fs::read_to_string(&volume).unwrap(), "a 1\n");

    // Converged: a second identical run does nothing.
    let second = c.deploy(&deployment, &application);
    assert!(actions(&second).is_empty(), "{second}");
    assert!(
        second["routes_updated"].as_array().unwrap().is_empty(),
        "{second}"
    );

    // The agent dies and comes back: the application kept running and is adopted, not restarted.
    c.agents[0].kill();
    // Its proxy went with it, but the application still serves through the other nodes.
    assert_eq!(kv("127.0.0.2:17070", "COUNT"), "COUNT 1");
    c.restart_agent(0);
    let s = c.status(&deployment);
    let app = &s["127.0.0.1"]["applications"]["kv"];
    assert_eq!(app["running"], true, "{s}");
    assert_eq!(app["restarts"], 0, "{s}");
    assert!(actions(&c.deploy(&deployment, &application)).is_empty());
    assert_eq!(kv("127.0.0.3:17070", "GET a"), "VALUE 1");

    // A changed environment restarts it; its data stays.
    let application = c.write("application.yml", &apps(kvbin.to_str().unwrap(), "b"));
    let third = c.deploy(&deployment, &application);
    assert_eq!(actions(&third), vec!["restart kv"]);
    assert_eq!(kv("127.0.0.2:17070", "GET a"), "VALUE 1");

    // A crashed application is restarted by its agent.
    let pid = std::fs::read_to_string(c.agents[0].state.join("agent.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&pid).unwrap();
    let pid: i32 = state["apps"]["kv"]["handle"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pid = rustix::process::Pid::from_raw(pid).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    assert_eq!(kv("127.0.0.1:17070", "GET a"), "VALUE 1");
    assert_eq!(
        c.status(&deployment)["127.0.0.1"]["applications"]["kv"]["restarts"],
        1
    );

    // Removed from the deployment: stopped; its volume stays.
    let none = c.write(
        "deployment-empty.yml",
        "version: 1\nnodes:\n  127.0.0.1: []\n  127.0.0.2: []\n  127.0.0.3: []\n",
    );
    let fourth = c.deploy(&none, &application);
    assert_eq!(actions(&fourth), vec!["stop kv"]);
    assert!(kv_is_down("127.0.0.1:17070"));
    assert!(volume.exists());
    let s = c.status(&none);
    assert_eq!(s["127.0.0.1"]["volumes"]["kv"]["owner"], true, "{s}");
}

fn kv_is_down(addr: &str) -> bool {
    for _ in 0..50 {
        if try_kv(addr, "PING").is_err() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

#[test]
fn unreachable_node_fails_the_deploy_before_anything_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::start(tmp.path(), &["127.0.0.4"]);
    let kvbin = kvstore_bin();
    let application = c.write("application.yml", &apps(kvbin.to_str().unwrap(), "a"));
    let deployment = c.write(
        "deployment.yml",
        "version: 1\nnodes:\n  127.0.0.4: [kv]\n  127.0.0.5: []\n",
    );
    let out = c.deployer(&[
        "deploy",
        deployment.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.5"), "{err}");
    let only = c.write("deployment-1.yml", "version: 1\nnodes:\n  127.0.0.4: []\n");
    let s = c.status(&only);
    assert!(
        s["127.0.0.4"]["applications"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{s}"
    );

    // An invalid configuration names file, line and key, and runs nothing.
    let bad = c.write("bad.yml", "version: 1\napplications:\n  kv:\n    imag: x\n");
    let out = c.deployer(&[
        "deploy",
        deployment.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("bad.yml:4:5: `applications.kv.imag`: unknown key")
    );
}

#[test]
fn demo_runs_the_story_and_cleans_up() {
    let out = std::process::Command::new(deployer_bin())
        .arg("demo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("100 acknowledged writes"), "{text}");
    assert!(text.contains("VALUE value42"), "{text}");
    assert!(text.contains("nothing to do"), "{text}");
    // The move: pre-copy while serving, a fenced handoff at epoch 2, and every write a
    // client got acknowledged during the move is on the new node.
    assert!(text.contains("pre-copy round 1"), "{text}");
    assert!(text.contains("epoch 2"), "{text}");
    assert!(text.contains(" 0 lost"), "{text}");
    assert!(text.contains("stop    kv on 127.0.0.2"), "{text}");
    assert!(
        try_kv("127.0.0.1:17080", "PING").is_err(),
        "the demo left its application running"
    );
}

#[test]
fn move_under_write_load_with_fenced_handoff() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::start(tmp.path(), &["127.0.0.7", "127.0.0.8"]);
    c.trust_peers();
    let kvbin = kvstore_bin();
    let application = c.write(
        "application.yml",
        &apps(kvbin.to_str().unwrap(), "a").replace("17070", "17090"),
    );
    let on7 = c.write(
        "d7.yml",
        "version: 1\nnodes:\n  127.0.0.7: [kv]\n  127.0.0.8: []\n",
    );
    let on8 = c.write(
        "d8.yml",
        "version: 1\nnodes:\n  127.0.0.7: []\n  127.0.0.8: [kv]\n",
    );
    c.deploy(&on7, &application);
    // A table the store writes a page of at each SET, as a database writes its pages in
    // place: pre-copy rounds are live, so the move neither fails nor leaves it all to the
    // final delta.
    let table = |agent: usize| c.agents[agent].state.join("volumes/kv/table.db");
    std::fs::write(table(0), integration_tests::bytes(5, 8 << 20)).unwrap();
    for i in 0..50 {
        assert_eq!(kv("127.0.0.8:17090", &format!("SET before{i} {i}")), "OK");
    }
    // A client keeps writing through node 8's proxy during the move.
    let writer = deployer::demo::WriteLoad::start("127.0.0.8:17090", "during");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let report = c.deploy(&on8, &application);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let acked = writer.stop().unwrap();
    assert_eq!(actions(&report), vec!["move kv"], "{report}");
    let m = &report["migrations"][0];
    assert_eq!(m["epoch"], 2, "{report}");
    assert!(!m["rounds"].as_array().unwrap().is_empty(), "{report}");
    assert!(m["downtime_ms"].as_u64().is_some(), "{report}");
    assert!(!acked.is_empty());
    assert_eq!(std::fs::metadata(table(1)).unwrap().len(), 8 << 20);
    for i in 0..50 {
        assert_eq!(
            kv("127.0.0.7:17090", &format!("GET before{i}")),
            format!("VALUE {i}")
        );
    }
    for i in &acked {
        assert_eq!(
            kv("127.0.0.7:17090", &format!("GET during{i}")),
            format!("VALUE {i}")
        );
    }
    let s = c.status(&on8);
    assert_eq!(s["127.0.0.7"]["volumes"]["kv"]["owner"], false, "{s}");
    assert_eq!(
        s["127.0.0.7"]["volumes"]["kv"]["handed_to"], "127.0.0.8",
        "{s}"
    );
    assert_eq!(s["127.0.0.8"]["volumes"]["kv"]["owner"], true, "{s}");
    assert_eq!(s["127.0.0.8"]["volumes"]["kv"]["epoch"], 2, "{s}");
    assert!(
        s["127.0.0.7"]["applications"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{s}"
    );
    // Converged.
    assert!(actions(&c.deploy(&on8, &application)).is_empty());

    // Fencing: node 8 owns the volume now, so its volume server refuses a push into it, even
    // from a trusted peer (node 7's identity).
    let src = tmp.path().join("stale");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("kv.log"), "stale 1\n").unwrap();
    let out = std::process::Command::new(integration_tests::replicator_bin())
        .args(["sync", "--identity"])
        .arg(c.agents[0].state.join("identity"))
        .args(["--peer-id", &c.agents[1].fingerprint, "--state-dir"])
        .arg(tmp.path().join("rstate"))
        .arg(&src)
        .arg("127.0.0.8:7700/kv")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("owned by this node"));
    assert_eq!(kv("127.0.0.7:17090", "GET before1"), "VALUE 1");
}

#[test]
fn a_second_deploy_meets_cluster_busy() {
    use deployer::api::{AgentClient, Request};
    use replicator::net::identity::{Identity, TrustList};
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::start(tmp.path(), &["127.0.0.9"]);
    let kvbin = kvstore_bin();
    let application = c.write(
        "application.yml",
        &apps(kvbin.to_str().unwrap(), "a").replace("17070", "17091"),
    );
    let deployment = c.write("deployment.yml", "version: 1\nnodes:\n  127.0.0.9: [kv]\n");
    // Another deployer holds the lease (as if its deploy were running).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = Identity::load(&c.identity).unwrap();
    let known = TrustList::load(&c.identity.join("known_agents")).unwrap();
    let agent = rt
        .block_on(AgentClient::connect(
            "127.0.0.9",
            "127.0.0.9:7701",
            &id,
            &known,
            std::time::Duration::from_secs(5),
        ))
        .unwrap();
    let lease = Request::Lease {
        holder: "the other deployer".into(),
        ttl_secs: 60,
        force: false,
    };
    rt.block_on(agent.call(&lease)).unwrap();
    let out = c.deployer(&[
        "deploy",
        deployment.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cluster busy") && err.contains("the other deployer"),
        "{err}"
    );
    assert!(
        c.status(&deployment)["127.0.0.9"]["applications"]
            .as_object()
            .unwrap()
            .is_empty()
    );
    // Once it is done, the next deploy proceeds.
    rt.block_on(agent.call(&Request::Unlease {
        holder: "the other deployer".into(),
    }))
    .unwrap();
    rt.block_on(agent.close());
    assert_eq!(
        actions(&c.deploy(&deployment, &application)),
        vec!["start kv"]
    );
}

type TwoNodes = (
    Cluster,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
);

/// Two agents (on `ips`) trusting each other, kv on the first with `keys` keys of `size` bytes.
fn two_nodes_with_data(
    tmp: &std::path::Path,
    ips: [&str; 2],
    port: u16,
    keys: usize,
    size: usize,
) -> TwoNodes {
    two_nodes_running(tmp, ips, port, keys, size, &kvstore_bin())
}

/// Like [`two_nodes_with_data`], with `kvbin` as the application's command.
fn two_nodes_running(
    tmp: &std::path::Path,
    ips: [&str; 2],
    port: u16,
    keys: usize,
    size: usize,
    kvbin: &std::path::Path,
) -> TwoNodes {
    let c = Cluster::start(tmp, &ips);
    c.trust_peers();
    let application = c.write(
        "application.yml",
        &apps(kvbin.to_str().unwrap(), "a").replace("17070", &port.to_string()),
    );
    let on_a = c.write(
        "da.yml",
        &format!("version: 1\nnodes:\n  {}: [kv]\n  {}: []\n", ips[0], ips[1]),
    );
    let on_b = c.write(
        "db.yml",
        &format!("version: 1\nnodes:\n  {}: []\n  {}: [kv]\n", ips[0], ips[1]),
    );
    c.deploy(&on_a, &application);
    let value = "v".repeat(size);
    for i in 0..keys {
        assert_eq!(
            kv(&format!("{}:{port}", ips[0]), &format!("SET k{i} {value}")),
            "OK"
        );
    }
    (c, application, on_a, on_b)
}

#[test]
fn destination_disk_full_during_pre_copy_keeps_the_app_on_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    // B's volumes live on a 256 KiB filesystem; the volume is ~600 KB.
    let b_volumes = tmp.path().join("agent-127.0.0.11/volumes");
    std::fs::create_dir_all(&b_volumes).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&b_volumes)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "mounting a small tmpfs needs root (CI runs as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let guard = Unmount(b_volumes.clone());
    let (c, application, _on_a, on_b) =
        two_nodes_with_data(tmp.path(), ["127.0.0.10", "127.0.0.11"], 17092, 600, 1000);
    let out = c.deployer(&[
        "deploy",
        on_b.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pushing volume kv"), "{err}");
    // Still serving on A, every key there, A still the owner.
    assert_eq!(kv("127.0.0.11:17092", "COUNT"), "COUNT 600");
    let s = c.status(&on_b);
    assert_eq!(s["127.0.0.10"]["volumes"]["kv"]["owner"], true, "{s}");
    assert_eq!(
        s["127.0.0.10"]["applications"]["kv"]["running"], true,
        "{s}"
    );
    assert!(
        s["127.0.0.11"]["applications"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{s}"
    );
    // Room again on B: the rerun completes the move.
    drop(guard);
    let report = c.deploy(&on_b, &application);
    assert_eq!(report["migrations"][0]["epoch"], 2, "{report}");
    assert_eq!(kv("127.0.0.10:17092", "COUNT"), "COUNT 600");
    assert_eq!(kv("127.0.0.10:17092", "GET k599").len(), 1006);
}

#[test]
fn deployer_killed_between_handoff_halves_then_rerun_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, application, _on_a, on_b) =
        two_nodes_with_data(tmp.path(), ["127.0.0.12", "127.0.0.13"], 17093, 20, 10);
    let out = c.deployer_crashing_at(
        "after-release",
        &[
            "deploy",
            on_b.to_str().unwrap(),
            application.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    // A gave the volume away and will never start kv again; B has not adopted it yet.
    let s = c.status(&on_b);
    assert_eq!(s["127.0.0.12"]["volumes"]["kv"]["owner"], false, "{s}");
    assert!(s["127.0.0.13"]["volumes"].get("kv").is_none(), "{s}");
    // The dead deployer still holds the lease: a rerun is told so, and how to proceed.
    let out = c.deployer(&[
        "deploy",
        on_b.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cluster busy") && err.contains("--break-lease"),
        "{err}"
    );
    let back_on_a = c.write(
        "back.yml",
        "version: 1\nnodes:\n  127.0.0.12: [kv]\n  127.0.0.13: []\n",
    );
    let out = c.deployer(&[
        "deploy",
        "--break-lease",
        back_on_a.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "the old owner started a volume it handed away"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was handed to 127.0.0.13 at epoch 2"), "{err}");
    // The rerun with the intended configuration finishes the handoff.
    let report = c.deploy(&on_b, &application);
    assert_eq!(actions(&report), vec!["finish_handoff kv"], "{report}");
    assert_eq!(kv("127.0.0.12:17093", "GET k19"), "VALUE vvvvvvvvvv");
    let s = c.status(&on_b);
    assert_eq!(s["127.0.0.13"]["volumes"]["kv"]["owner"], true, "{s}");
    assert_eq!(s["127.0.0.13"]["volumes"]["kv"]["epoch"], 2, "{s}");
    assert!(actions(&c.deploy(&on_b, &application)).is_empty());
}

/// The deployer dies in the middle of moving an application back (B handed the volume back
/// to A, A has not adopted it): the application runs nowhere, neither node may start it but
/// A once it adopts, and the rerun finishes the hand-back with every key.
#[test]
fn deployer_killed_during_a_hand_back_then_rerun_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ((c, application, on_a, on_b), marker) =
        two_nodes_refusing_on_b(tmp.path(), ["127.0.0.26", "127.0.0.27"], 17101, 30, 50);
    let out = c.deployer_crashing_at(
        "hand-back-after-release",
        &[
            "deploy",
            "--health-timeout",
            "3",
            on_b.to_str().unwrap(),
            application.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    // B gave the volume back at epoch 3; A gave it away at 2 and has not taken it back.
    let s = c.status(&on_a);
    assert_eq!(s["127.0.0.27"]["volumes"]["kv"]["owner"], false, "{s}");
    assert_eq!(s["127.0.0.27"]["volumes"]["kv"]["epoch"], 3, "{s}");
    assert_eq!(s["127.0.0.26"]["volumes"]["kv"]["owner"], false, "{s}");
    for node in ["127.0.0.26", "127.0.0.27"] {
        let apps = s[node]["applications"].as_object().unwrap();
        assert!(apps.values().all(|a| a["running"] == false), "{s}");
    }
    // The rerun, back to A, finishes the hand-back: A adopts at epoch 3 and serves it all.
    let out = c.deployer(&[
        "deploy",
        "--break-lease",
        "--json",
        on_a.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(actions(&report), vec!["finish_handoff kv"], "{report}");
    assert_eq!(kv("127.0.0.27:17101", "COUNT"), "COUNT 30");
    let s = c.status(&on_a);
    assert_eq!(s["127.0.0.26"]["volumes"]["kv"]["owner"], true, "{s}");
    assert_eq!(s["127.0.0.26"]["volumes"]["kv"]["epoch"], 3, "{s}");
    assert!(actions(&c.deploy(&on_a, &application)).is_empty());
    // Fixed on B, a move there goes ahead at the next epoch.
    std::fs::remove_file(&marker).unwrap();
    let report = c.deploy(&on_b, &application);
    assert_eq!(report["migrations"][0]["epoch"], 4, "{report}");
    assert_eq!(kv("127.0.0.26:17101", "COUNT"), "COUNT 30");
}

#[test]
fn two_applications_move_in_one_deploy() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::start(tmp.path(), &["127.0.0.16", "127.0.0.17"]);
    c.trust_peers();
    let kvbin = kvstore_bin();
    let one = |name: &str, port: u16| {
        format!(
            "  {name}:\n    image: kvstore\n    command: [\"{}\"]\n    volume:\n      mountpoint: /data\n    ports:\n      - internal: 7000\n        external: {port}\n",
            kvbin.display()
        )
    };
    let application = c.write(
        "application.yml",
        &format!(
            "version: 1\napplications:\n{}{}",
            one("kv1", 17095),
            one("kv2", 17096)
        ),
    );
    let on_a = c.write(
        "a.yml",
        "version: 1\nnodes:\n  127.0.0.16: [kv1, kv2]\n  127.0.0.17: []\n",
    );
    let on_b = c.write(
        "b.yml",
        "version: 1\nnodes:\n  127.0.0.16: []\n  127.0.0.17: [kv1, kv2]\n",
    );
    c.deploy(&on_a, &application);
    assert_eq!(kv("127.0.0.17:17095", "SET a one"), "OK");
    assert_eq!(kv("127.0.0.17:17096", "SET b two"), "OK");
    let report = c.deploy(&on_b, &application);
    assert_eq!(actions(&report), vec!["move kv1", "move kv2"], "{report}");
    assert_eq!(
        report["migrations"].as_array().unwrap().len(),
        2,
        "{report}"
    );
    assert_eq!(kv("127.0.0.16:17095", "GET a"), "VALUE one");
    assert_eq!(kv("127.0.0.16:17096", "GET b"), "VALUE two");
    let s = c.status(&on_b);
    for app in ["kv1", "kv2"] {
        assert_eq!(s["127.0.0.17"]["applications"][app]["running"], true, "{s}");
        assert_eq!(s["127.0.0.17"]["volumes"][app]["epoch"], 2, "{s}");
    }
    assert!(actions(&c.deploy(&on_b, &application)).is_empty());
}

/// [`two_nodes_running`] with a wrapper around the example store that refuses to start
/// (exits 1) on a node whose state directory holds a `refuse-start` marker; that marker is
/// set on B and its path returned.
fn two_nodes_refusing_on_b(
    tmp: &std::path::Path,
    ips: [&str; 2],
    port: u16,
    keys: usize,
    size: usize,
) -> (TwoNodes, std::path::PathBuf) {
    let wrapper = tmp.join("kv-wrapper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ -e \"$DEPLOYER_VOLUME/../../refuse-start\" ] && exit 1\nexec '{}' \"$@\"\n",
            kvstore_bin().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nodes = two_nodes_running(tmp, ips, port, keys, size, &wrapper);
    let marker = nodes.0.agents[1].state.join("refuse-start");
    std::fs::write(&marker, "").unwrap();
    (nodes, marker)
}

#[test]
fn app_that_cannot_serve_on_the_new_node_is_moved_back() {
    let tmp = tempfile::tempdir().unwrap();
    let ((c, application, _on_a, on_b), marker) =
        two_nodes_refusing_on_b(tmp.path(), ["127.0.0.18", "127.0.0.19"], 17097, 50, 100);
    let out = c.deployer(&[
        "deploy",
        "--health-timeout",
        "3",
        on_b.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not accept connections") && err.contains("moved back"),
        "{err}"
    );
    // Back on A with every key, A the owner at epoch 3 (2 went to B, 3 came back).
    assert_eq!(kv("127.0.0.19:17097", "COUNT"), "COUNT 50");
    let s = c.status(&on_b);
    assert_eq!(s["127.0.0.18"]["volumes"]["kv"]["owner"], true, "{s}");
    assert_eq!(s["127.0.0.18"]["volumes"]["kv"]["epoch"], 3, "{s}");
    assert_eq!(s["127.0.0.19"]["volumes"]["kv"]["owner"], false, "{s}");
    assert_eq!(
        s["127.0.0.18"]["applications"]["kv"]["running"], true,
        "{s}"
    );
    assert!(
        s["127.0.0.19"]["applications"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{s}"
    );
    // Fixed on B: the rerun moves it for good.
    std::fs::remove_file(&marker).unwrap();
    let report = c.deploy(&on_b, &application);
    assert_eq!(report["migrations"][0]["epoch"], 4, "{report}");
    assert_eq!(
        kv("127.0.0.18:17097", "GET k49"),
        format!("VALUE {}", "v".repeat(100))
    );
}

#[test]
fn destination_agent_killed_during_pre_copy_keeps_the_app_on_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, application, _on_a, on_b) =
        two_nodes_with_data(tmp.path(), ["127.0.0.20", "127.0.0.21"], 17098, 300, 1000);
    // B's agent dies (SIGKILL, no cleanup) when its volume server stores the 2nd chunk.
    c.restart_agent_env(1, &[], &[("REPLICATOR_CRASH_AT", "chunk:2")]);
    let out = c.deployer(&[
        "deploy",
        on_b.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pushing volume kv"), "{err}");
    assert!(
        c.agents[1].child.try_wait().unwrap().is_some(),
        "B's agent should have died"
    );
    // A never stopped serving and still owns the volume.
    assert_eq!(kv("127.0.0.20:17098", "COUNT"), "COUNT 300");
    assert_eq!(kv("127.0.0.20:17098", "SET after crash"), "OK");
    c.restart_agent(1);
    let s = c.status(&on_b);
    assert_eq!(s["127.0.0.20"]["volumes"]["kv"]["owner"], true, "{s}");
    assert_eq!(
        s["127.0.0.20"]["applications"]["kv"]["running"], true,
        "{s}"
    );
    // B back: the rerun moves it, the write made after the crash included.
    let report = c.deploy(&on_b, &application);
    assert_eq!(report["migrations"][0]["epoch"], 2, "{report}");
    assert_eq!(kv("127.0.0.20:17098", "COUNT"), "COUNT 301");
    assert_eq!(kv("127.0.0.20:17098", "GET after"), "VALUE crash");
}

#[test]
fn trust_command_sets_up_a_cluster_that_moves_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (me, bundles) = (tmp.path().join("me"), tmp.path().join("trust"));
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let on_a = write(
        "da.yml",
        "version: 1\nnodes:\n  127.0.0.22: [kv]\n  127.0.0.23: []\n",
    );
    let on_b = write(
        "db.yml",
        "version: 1\nnodes:\n  127.0.0.22: []\n  127.0.0.23: [kv]\n",
    );
    let application = write(
        "application.yml",
        &apps(kvstore_bin().to_str().unwrap(), "a").replace("17070", "17099"),
    );
    let deployer = |args: &[&str]| {
        std::process::Command::new(deployer_bin())
            .args(args)
            .arg("--identity")
            .arg(&me)
            .output()
            .unwrap()
    };
    let out = deployer(&[
        "trust",
        "--json",
        on_a.to_str().unwrap(),
        "--out",
        bundles.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Agents started on the bundles (as an operator would after copying them) use the
    // identities the command made, trust this deployer and each other.
    let fp = report["deployer_fingerprint"].as_str().unwrap();
    let agents: Vec<AgentProc> = ["127.0.0.22", "127.0.0.23"]
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let agent = AgentProc::start(ip, &bundles.join(ip), fp);
            assert_eq!(agent.fingerprint, report["nodes"][i]["fingerprint"]);
            agent
        })
        .collect();
    let deploy = |d: &std::path::Path| {
        let out = deployer(&["deploy", d.to_str().unwrap(), application.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    deploy(&on_a);
    assert_eq!(kv("127.0.0.23:17099", "SET k v"), "OK");
    deploy(&on_b);
    assert_eq!(kv("127.0.0.22:17099", "GET k"), "VALUE v");
    drop(agents);
    for ip in ["127.0.0.22", "127.0.0.23"] {
        kill_apps(&bundles.join(ip));
    }
}

#[test]
fn network_cut_during_the_final_delta_restarts_the_app_on_the_source() {
    use integration_tests::net::Relay;
    use std::sync::atomic::Ordering;
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, application, _on_a, on_b) =
        two_nodes_with_data(tmp.path(), ["127.0.0.24", "127.0.0.25"], 17100, 200, 1000);
    // B's volume server is reached through a relay the test can cut.
    let relay = Relay::start("127.0.0.25:7700".parse().unwrap());
    let advertised = relay.addr.to_string();
    c.restart_agent_env(1, &["--advertise-replicator", &advertised], &[]);
    // The cut comes the moment A's application stops: the final delta is what follows.
    let app_addr: std::net::SocketAddr =
        c.status(&on_b)["127.0.0.24"]["applications"]["kv"]["ports"][0][1]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    let faults = relay.faults.clone();
    let cutter = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if std::net::TcpStream::connect(app_addr).is_err() {
                faults.blackhole.store(true, Ordering::Relaxed);
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    });
    let out = c.deployer(&[
        "deploy",
        on_b.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert!(cutter.join().unwrap(), "the application never stopped on A");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("final delta failed") && err.contains("running on 127.0.0.24 again"),
        "{err}"
    );
    // Serving on A again with every key; A still owns the volume.
    assert_eq!(kv("127.0.0.25:17100", "COUNT"), "COUNT 200");
    let s = c.status(&on_b);
    assert_eq!(s["127.0.0.24"]["volumes"]["kv"]["owner"], true, "{s}");
    assert_eq!(s["127.0.0.24"]["volumes"]["kv"]["epoch"], 1, "{s}");
    // The network back, the rerun completes the move.
    relay.faults.blackhole.store(false, Ordering::Relaxed);
    let report = c.deploy(&on_b, &application);
    assert_eq!(report["migrations"][0]["epoch"], 2, "{report}");
    assert_eq!(kv("127.0.0.24:17100", "COUNT"), "COUNT 200");
}
