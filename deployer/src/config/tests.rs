use std::path::Path;

use super::*;

const ELK_APPS: &str = include_str!("../../examples/elk/application.yml");
const ELK_DEPLOY: &str = include_str!("../../examples/elk/deployment.yml");
const ELK_MOVED: &str = include_str!("../../examples/elk/deployment-moved.yml");

fn load_texts(deploy: &str, apps: &str) -> Result<Cluster, ConfigError> {
    parse(
        Path::new("deployment.yml"),
        deploy,
        Path::new("application.yml"),
        apps,
    )
}

/// The error for `apps` with the ELK deployment (or `deploy`), as one line.
fn app_error(apps: &str) -> String {
    load_texts("version: 1\nnodes:\n  10.0.0.1: []\n", apps)
        .unwrap_err()
        .to_string()
}

#[test]
fn flocker_elk_tutorial_parses_unchanged() {
    let c = load_texts(ELK_DEPLOY, ELK_APPS).unwrap();
    assert_eq!(c.applications.len(), 3);
    let es = &c.applications["elasticsearch"];
    assert_eq!(es.image, "clusterhq/elasticsearch");
    assert_eq!(
        es.ports,
        vec![PortMap {
            internal: 9200,
            external: 9200
        }]
    );
    assert_eq!(
        es.volume.as_deref(),
        Some(Path::new("/var/lib/elasticsearch/"))
    );
    assert_eq!(
        c.applications["logstash"].links,
        vec![Link {
            local_port: 9200,
            remote_port: 9200,
            alias: "es".into()
        }]
    );
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(c.nodes[0].0.host, "172.16.255.250");
    assert_eq!(c.nodes[0].0.port, DEFAULT_AGENT_PORT);
    assert!(c.nodes[1].1.is_empty());
    let moved = load_texts(ELK_MOVED, ELK_APPS).unwrap();
    assert_eq!(
        moved.node_of("elasticsearch").unwrap().host,
        "172.16.255.251"
    );
}

#[test]
fn every_field_and_node_ports() {
    let apps = r#"
version: 1
applications:
  kv:
    image: kvstore
    command: ["/bin/kvstore", "--data", "/data"]
    environment:
      MODE: fast
      RETRIES: 3
    mem_limit: 104857600
    cpu_shares: 512
    volume:
      mountpoint: /data
    ports:
      - internal: 7000
        external: 7000
"#;
    let deploy =
        "version: 1\nnodes:\n  \"127.0.0.2:9000\": [kv]\n  \"[::1]:9001\": []\n  db1: []\n";
    let c = load_texts(deploy, apps).unwrap();
    let kv = &c.applications["kv"];
    assert_eq!(kv.command, vec!["/bin/kvstore", "--data", "/data"]);
    assert_eq!(kv.environment["RETRIES"], "3");
    assert_eq!(kv.mem_limit, Some(104_857_600));
    assert_eq!(kv.cpu_shares, Some(512));
    assert_eq!(c.nodes[0].0.socket(), "127.0.0.2:9000");
    assert_eq!(c.nodes[1].0.socket(), "[::1]:9001");
    assert_eq!(c.nodes[2].0.socket(), "db1:7701");
}

#[test]
fn unknown_key_names_file_line_column_and_key() {
    let e = app_error("version: 1\napplications:\n  a:\n    image: x\n    portz: []\n");
    assert_eq!(
        e,
        "application.yml:5:5: `applications.a.portz`: unknown key (expected one of: image, ports, links, volume, environment, mem_limit, cpu_shares, command)"
    );
}

#[test]
fn wrong_type() {
    let e = app_error(
        "version: 1\napplications:\n  a:\n    image: x\n    ports:\n      - internal: \"80\"\n        external: 80\n",
    );
    assert_eq!(
        e,
        "application.yml:6:19: `applications.a.ports[0].internal`: expected a whole number, found a quoted string \"80\""
    );
    let e = app_error("version: 1\napplications:\n  a:\n    image: x\n    ports: 80\n");
    assert_eq!(
        e,
        "application.yml:5:12: `applications.a.ports`: expected a list, found a scalar"
    );
}

#[test]
fn missing_image() {
    let e = app_error("version: 1\napplications:\n  a:\n    ports: []\n");
    assert_eq!(
        e,
        "application.yml:3:3: `applications.a.image`: missing `image`"
    );
}

#[test]
fn relative_mountpoint() {
    let e = app_error(
        "version: 1\napplications:\n  a:\n    image: x\n    volume:\n      mountpoint: data\n",
    );
    assert_eq!(
        e,
        "application.yml:6:19: `applications.a.volume.mountpoint`: mountpoint `data` must be an absolute path"
    );
}

#[test]
fn application_on_two_nodes() {
    let e = load_texts(
        "version: 1\nnodes:\n  10.0.0.1: [kibana]\n  10.0.0.2:\n    - kibana\n",
        ELK_APPS,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "deployment.yml:5:7: `nodes.10.0.0.2[0]`: application `kibana` is already on node 10.0.0.1 (line 3); an application runs on one node"
    );
}

#[test]
fn application_not_defined() {
    let e = load_texts(
        "version: 1\nnodes:\n  10.0.0.1: [kibana, grafana]\n",
        ELK_APPS,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "deployment.yml:3:22: `nodes.10.0.0.1[1]`: application `grafana` is not defined in the application file"
    );
}

#[test]
fn link_to_a_port_nothing_exposes() {
    let apps = ELK_APPS.replace("\"remote_port\": 9200", "\"remote_port\": 9300");
    let e = load_texts(ELK_DEPLOY, &apps).unwrap_err().to_string();
    assert_eq!(
        e,
        "application.yml:17:22: `applications.logstash.links[0].remote_port`: no application exposes external port 9300 for the link `es`"
    );
}

#[test]
fn external_port_used_twice() {
    let apps = ELK_APPS.replace("\"external\": 80", "\"external\": 5000");
    let e = load_texts(ELK_DEPLOY, &apps).unwrap_err().to_string();
    assert!(
        e.starts_with("application.yml:") && e.contains("external port 5000 is already used by"),
        "{e}"
    );
    assert!(e.contains("ports[0].external"), "{e}");
}

#[test]
fn duplicate_keys() {
    let e = app_error("version: 1\napplications:\n  a:\n    image: x\n    image: y\n");
    assert_eq!(
        e,
        "application.yml:5:5: invalid YAML: duplicate key `image` (first at line 4, column 5)"
    );
    let e = load_texts(
        "version: 1\nnodes:\n  10.0.0.1: []\n  10.0.0.1: []\n",
        ELK_APPS,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("deployment.yml:4:3:"), "{e}");
}

#[test]
fn versions_syntax_and_addresses() {
    assert!(app_error("version: 2\napplications: {}\n").contains("version 2 is not supported"));
    assert!(app_error("applications: {}\n").contains("missing `version: 1`"));
    assert!(app_error("version: 1\napplications:\n  a: [\n").starts_with("application.yml:"));
    let e = load_texts("version: 1\nnodes:\n  \"bad host!\": []\n", ELK_APPS)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a node address"), "{e}");
}
