//! The docker runtime against the real engine: an image built locally (`FROM scratch` with
//! the static example application; no registry), deployed by an agent, reached through the
//! routing proxy, its data landing in the node's volume directory. `.ci/run` sets
//! `DEPLOYER_REQUIRE_DOCKER=1`, which turns a missing engine into a failure.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use integration_tests::cluster::*;

const IMAGE: &str = "deployer-kvstore:test";

#[test]
fn docker_runtime_runs_a_local_image_with_its_volume_ports_and_limits() {
    if !docker_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    build_kvstore_image(IMAGE, &tmp.path().join("image"));
    let c = Cluster::start_with(tmp.path(), &["127.0.0.6"], "docker");
    let application = c.write(
        "application.yml",
        &format!(
            "version: 1\napplications:\n  dkv:\n    image: {IMAGE}\n    volume:\n      mountpoint: /data\n    mem_limit: 67108864\n    cpu_shares: 512\n    environment:\n      MODE: docker\n    ports:\n      - internal: 7000\n        external: 17072\n  ghost:\n    image: deployer-no-such-image:1\n"
        ),
    );
    let deployment = c.write("deployment.yml", "version: 1\nnodes:\n  127.0.0.6: [dkv]\n");
    let report = c.deploy(&deployment, &application);
    assert_eq!(report["actions"][0]["action"], "start", "{report}");

    assert_eq!(kv("127.0.0.6:17072", "SET k docker-value"), "OK");
    assert_eq!(kv("127.0.0.6:17072", "GET k"), "VALUE docker-value");
    let log = c.agents[0].state.join("volumes/dkv/kv.log");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "k docker-value\n");

    // The container carries the limits, the bind mount and the labels the agent finds it by.
    let inspect = std::process::Command::new("docker")
        .args([
            "inspect",
            "deployer-dkv",
            "--format",
            "{{.HostConfig.Memory}} {{.HostConfig.CpuShares}} {{index .Config.Labels \"deployer.app\"}} {{range .Mounts}}{{.Destination}}{{end}}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "67108864 512 dkv /data"
    );
    assert!(
        c.deploy(&deployment, &application)["actions"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A missing image is a clear error naming the node; nothing else is disturbed.
    let with_ghost = c.write(
        "deployment-ghost.yml",
        "version: 1\nnodes:\n  127.0.0.6: [dkv, ghost]\n",
    );
    let out = c.deployer(&[
        "deploy",
        with_ghost.to_str().unwrap(),
        application.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("image deployer-no-such-image:1 is not on node 127.0.0.6"),
        "{err}"
    );
    assert_eq!(kv("127.0.0.6:17072", "GET k"), "VALUE docker-value");

    // Removed: the container stops and goes; the data stays on the node.
    let none = c.write(
        "deployment-none.yml",
        "version: 1\nnodes:\n  127.0.0.6: []\n",
    );
    let report = c.deploy(&none, &application);
    assert_eq!(report["actions"][0]["action"], "stop", "{report}");
    let ps = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            "label=deployer.app=dkv",
            "--format",
            "{{.Names}}",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ps.stdout).trim().is_empty());
    assert!(log.exists());
}

#[test]
fn docker_application_moves_between_nodes_with_its_data() {
    if !docker_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    build_kvstore_image(IMAGE, &tmp.path().join("image"));
    let c = Cluster::start_with(tmp.path(), &["127.0.0.14", "127.0.0.15"], "docker");
    c.trust_peers();
    let application = c.write(
        "application.yml",
        &format!(
            "version: 1\napplications:\n  mkv:\n    image: {IMAGE}\n    volume:\n      mountpoint: /data\n    ports:\n      - internal: 7000\n        external: 17094\n"
        ),
    );
    let on_a = c.write(
        "a.yml",
        "version: 1\nnodes:\n  127.0.0.14: [mkv]\n  127.0.0.15: []\n",
    );
    let on_b = c.write(
        "b.yml",
        "version: 1\nnodes:\n  127.0.0.14: []\n  127.0.0.15: [mkv]\n",
    );
    c.deploy(&on_a, &application);
    for i in 0..100 {
        assert_eq!(kv("127.0.0.15:17094", &format!("SET k{i} {i}")), "OK");
    }
    let report = c.deploy(&on_b, &application);
    assert_eq!(report["migrations"][0]["epoch"], 2, "{report}");
    for i in [0, 42, 99] {
        assert_eq!(
            kv("127.0.0.14:17094", &format!("GET k{i}")),
            format!("VALUE {i}")
        );
    }
    // The data now lives in B's volume directory, written by B's container.
    let log = c.agents[1].state.join("volumes/mkv/kv.log");
    assert!(std::fs::read_to_string(&log).unwrap().contains("k99 99\n"));
    let ps = std::process::Command::new("docker")
        .args([
            "ps",
            "--filter",
            "label=deployer.app=mkv",
            "--format",
            "{{.Label \"deployer.node\"}}",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ps.stdout).trim(), "127.0.0.15");
    let none = c.write(
        "none.yml",
        "version: 1\nnodes:\n  127.0.0.14: []\n  127.0.0.15: []\n",
    );
    c.deploy(&none, &application);
}
