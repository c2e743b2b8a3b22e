//! `deployer trust`: the trust set of a whole cluster from its deployment.yml, in one step.
//!
//! Who trusts whom (README, "Using deployer"):
//! - an agent obeys only the deployer identities in its `authorized_deployers`;
//! - an agent accepts volume pushes only from the peer agents in its `authorized_peers`;
//! - the deployer talks only to agents pinned in its `known_agents` ("FINGERPRINT HOST:PORT").
//!
//! Like `flocker-ca`, this runs on the admin machine and writes one bundle per node — the
//! node's identity plus its two authorized files, laid out as the agent's `--state`
//! directory — for the operator to copy to the node. Rerunning it after nodes were added
//! keeps every existing identity, creates the new ones and rewrites the lists, so only the
//! lists need copying again.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use replicator::net::identity::Identity;

use crate::agent::state::StateDir;
use crate::config::NodeAddr;

/// What was set up for one node.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeTrust {
    pub node: String,
    pub fingerprint: String,
    /// The bundle to copy into the agent's `--state` directory on the node.
    pub bundle: PathBuf,
    /// Whether its identity was created by this run (false: kept from an earlier run).
    pub created: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TrustReport {
    pub deployer_fingerprint: String,
    pub known_agents: PathBuf,
    pub nodes: Vec<NodeTrust>,
}

/// The bundle directory of `node` under `out`: the host, with `-PORT` for a non-default port.
pub fn bundle_dir(out: &Path, node: &NodeAddr) -> PathBuf {
    out.join(node.to_string().replace([':', '[', ']'], "-"))
}

/// Creates or refreshes the bundles of `nodes` under `out` and pins them in the deployer's
/// `known_agents` (in `deployer_dir`, whose identity is created if needed).
pub fn setup(nodes: &[NodeAddr], deployer_dir: &Path, out: &Path) -> io::Result<TrustReport> {
    let (deployer, _) = Identity::load_or_create(deployer_dir).map_err(io::Error::other)?;
    let mut report = TrustReport {
        deployer_fingerprint: deployer.fingerprint.to_string(),
        known_agents: deployer_dir.join("known_agents"),
        nodes: Vec::new(),
    };
    for node in nodes {
        let bundle = bundle_dir(out, node);
        let (id, created) = Identity::load_or_create(&StateDir(bundle.clone()).identity())
            .map_err(io::Error::other)?;
        report.nodes.push(NodeTrust {
            node: node.to_string(),
            fingerprint: id.fingerprint.to_string(),
            bundle,
            created,
        });
    }
    for n in &report.nodes {
        let state = StateDir(n.bundle.clone());
        // Other deployers an operator authorized by hand stay authorized.
        let mut deployers = read_lines(&state.authorized())?;
        deployers.insert(report.deployer_fingerprint.clone());
        write_lines(&state.authorized(), &deployers)?;
        let peers: BTreeSet<String> = report
            .nodes
            .iter()
            .filter(|p| p.node != n.node)
            .map(|p| p.fingerprint.clone())
            .collect();
        write_lines(&state.peers(), &peers)?;
    }
    pin_agents(&report.known_agents, nodes, &report.nodes)?;
    Ok(report)
}

/// Rewrites `known_agents`: lines for these nodes' addresses are replaced, others kept.
fn pin_agents(path: &Path, nodes: &[NodeAddr], trust: &[NodeTrust]) -> io::Result<()> {
    let addresses: BTreeSet<String> = nodes.iter().map(NodeAddr::socket).collect();
    let old = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut text: String = old
        .lines()
        .filter(|line| {
            !line
                .split_whitespace()
                .skip(1)
                .any(|a| addresses.contains(a))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    for (node, t) in nodes.iter().zip(trust) {
        text.push_str(&format!("{} {}\n", t.fingerprint, node.socket()));
    }
    write_atomic(path, &text)
}

fn read_lines(path: &Path) -> io::Result<BTreeSet<String>> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

fn write_lines(path: &Path, lines: &BTreeSet<String>) -> io::Result<()> {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    write_atomic(path, &text)
}

fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    replicator::state::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(s: &str) -> NodeAddr {
        NodeAddr::parse(s).expect("node")
    }

    #[test]
    fn bundles_trust_each_other_and_reruns_keep_identities() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (me, out) = (tmp.path().join("me"), tmp.path().join("out"));
        let nodes = [node("10.0.0.1"), node("10.0.0.2:7801")];
        let first = setup(&nodes, &me, &out).expect("setup");
        assert!(first.nodes.iter().all(|n| n.created));
        assert_eq!(first.nodes[1].bundle, out.join("10.0.0.2-7801"));
        let peers_of_1 = fs::read_to_string(out.join("10.0.0.1/authorized_peers")).expect("peers");
        assert_eq!(peers_of_1.trim(), first.nodes[1].fingerprint);
        let deployers =
            fs::read_to_string(out.join("10.0.0.2-7801/authorized_deployers")).expect("auth");
        assert_eq!(deployers.trim(), first.deployer_fingerprint);
        let known = fs::read_to_string(me.join("known_agents")).expect("known");
        assert!(known.contains(&format!("{} 10.0.0.2:7801", first.nodes[1].fingerprint)));
        // A hand-added deployer and an unrelated pin survive a rerun that adds a node.
        let extra = "ab".repeat(32);
        fs::write(
            out.join("10.0.0.1/authorized_deployers"),
            format!("{extra}\n"),
        )
        .expect("w");
        fs::write(
            me.join("known_agents"),
            format!("{known}{} 10.9.9.9:7701\n", "cd".repeat(32)),
        )
        .expect("w");
        let nodes = [node("10.0.0.1"), node("10.0.0.2:7801"), node("10.0.0.3")];
        let second = setup(&nodes, &me, &out).expect("rerun");
        assert!(!second.nodes[0].created && !second.nodes[1].created && second.nodes[2].created);
        assert_eq!(second.nodes[0].fingerprint, first.nodes[0].fingerprint);
        let peers_of_1 = fs::read_to_string(out.join("10.0.0.1/authorized_peers")).expect("peers");
        assert_eq!(peers_of_1.lines().count(), 2);
        let deployers = fs::read_to_string(out.join("10.0.0.1/authorized_deployers")).expect("a");
        assert!(deployers.contains(&extra) && deployers.contains(&first.deployer_fingerprint));
        let known = fs::read_to_string(me.join("known_agents")).expect("known");
        assert_eq!(known.lines().count(), 4, "{known}");
        assert!(known.contains("10.9.9.9:7701"));
    }
}
