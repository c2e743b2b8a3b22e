//! The docker runtime against the real engine: an image built locally (`FROM scratch` with
//! the static example application; no registry), deployed by an agent, reached through the
//! routing proxy, its data landing in the node's volume directory. `.ci/run` sets
//! `DEPLOYER_REQUIRE_DOCKER=1`, which turns a missing engine into a failure.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use integration_tests::cluster::*;

const IMAGE: &str = "deployer-kvstore:test";
const HEALTH_IMAGE: &str = "deployer-kvstore:test-health";

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

/// The store warms up for 1.5 s before it listens (as a database replaying its journal
/// does), while the port Docker publishes already accepts connections. The move waits until
/// the store itself accepts them on B before it routes there: the first request after the
/// deploy is served at once, and the measured downtime includes the warm-up.
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
            "version: 1\napplications:\n  mkv:\n    image: {IMAGE}\n    volume:\n      mountpoint: /data\n    environment:\n      KVSTORE_WARMUP_MS: \"1500\"\n    ports:\n      - internal: 7000\n        external: 17094\n"
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
    assert_eq!(
        try_kv("127.0.0.14:17094", "GET k7").unwrap_or_else(|e| panic!("not served: {e}")),
        "VALUE 7"
    );
    let started = report["migrations"][0]["downtime_parts"]["start_ms"].as_u64();
    assert!(started >= Some(1500), "{report}");
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

/// What the agent waits for before it calls a container serving: its image's own health
/// check, reported starting until `kvstore ping` first passes (the store warms up for 1.5 s
/// first), and the container's own address, where the store listens behind the published
/// port. A stopped container is reported as not running.
#[test]
fn a_containers_health_check_and_own_address_say_when_it_serves() {
    use deployer::agent::docker::DockerRuntime;
    use std::process::Command;
    use std::time::{Duration, Instant};
    if !docker_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    build_kvstore_image(IMAGE, &tmp.path().join("image"));
    build_kvstore_image_with_healthcheck(IMAGE, HEALTH_IMAGE, &tmp.path().join("health"));
    let name = "deployer-test-health";
    let docker = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    docker(&["rm", "-f", name]);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mount = format!("{}:/data", data.display());
    let id = docker(&[
        "run",
        "-d",
        "--name",
        name,
        "-e",
        "KVSTORE_WARMUP_MS=1500",
        "-v",
        &mount,
        HEALTH_IMAGE,
    ]);
    assert!(!id.is_empty(), "docker run failed");
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let runtime = rt.block_on(DockerRuntime::connect("test")).unwrap();
    let first = rt.block_on(runtime.readiness(&id)).unwrap();
    assert_eq!(
        first.unhealthy.as_deref(),
        Some("its image's health check says starting")
    );
    let ip = first.own_ip.expect("the container's own address");
    let healthy = loop {
        let r = rt.block_on(runtime.readiness(&id)).unwrap();
        if r.unhealthy.is_none() {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never healthy");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(healthy >= Duration::from_millis(1500), "{healthy:?}");
    assert_eq!(try_kv(&format!("{ip}:7000"), "PING").unwrap(), "PONG");
    docker(&["stop", "-t", "1", name]);
    let stopped = rt
        .block_on(runtime.readiness(&id))
        .err()
        .unwrap_or_default();
    assert!(stopped.contains("not running"), "{stopped}");
    docker(&["rm", "-f", name]);
}
