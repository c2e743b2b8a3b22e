//! What `deployer deploy` must do, computed from the configuration and the agents' states.
//! Pure: no I/O, so every rule is unit-tested.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::api::{AgentState, AppStatus, Route};
use crate::config::{Application, Cluster, NodeAddr};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Create the volume if needed and start the application.
    Start { node: NodeAddr, app: String },
    /// Running with another configuration: restart with the new one.
    Restart { node: NodeAddr, app: String },
    /// Runs here but is not assigned here (or no longer defined).
    Stop { node: NodeAddr, app: String },
    /// Assigned to `to`, runs (or owns its volume) on `from`.
    Move {
        app: String,
        from: NodeAddr,
        to: NodeAddr,
    },
    /// A move stopped between the two halves of the handoff: `from` released the volume to
    /// `to`, which has not adopted it yet. Adopt there (if the copy is complete with the
    /// released digest), then start.
    FinishHandoff {
        app: String,
        from: NodeAddr,
        to: NodeAddr,
        epoch: u64,
        root: String,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Start { node, app } => write!(f, "start   {app} on {node}"),
            Action::Restart { node, app } => {
                write!(f, "restart {app} on {node} (configuration changed)")
            }
            Action::Stop { node, app } => write!(f, "stop    {app} on {node}"),
            Action::Move { app, from, to } => write!(f, "move    {app} from {from} to {to}"),
            Action::FinishHandoff {
                app,
                from,
                to,
                epoch,
                ..
            } => write!(
                f,
                "finish  moving {app} from {from} to {to} (handed over at epoch {epoch})"
            ),
        }
    }
}

/// The actions that make `states` match `cluster`, stops first.
pub fn plan(cluster: &Cluster, states: &BTreeMap<NodeAddr, AgentState>) -> Vec<Action> {
    let mut stops = Vec::new();
    let mut rest = Vec::new();
    for (node, apps) in &cluster.nodes {
        let Some(state) = states.get(node) else {
            continue;
        };
        for name in apps {
            let desired = &cluster.applications[name];
            match state.applications.get(name) {
                Some(s) if s.config != *desired => rest.push(Action::Restart {
                    node: node.clone(),
                    app: name.clone(),
                }),
                Some(s) if s.running => {}
                Some(_) => rest.push(Action::Start {
                    node: node.clone(),
                    app: name.clone(),
                }),
                None => {
                    let handed = states.iter().find_map(|(n, s)| {
                        let v = s.volumes.get(name)?;
                        (!v.owner && v.handed_to.as_deref() == Some(&node.to_string())).then(|| {
                            (
                                n.clone(),
                                v.epoch,
                                v.handed_root.clone().unwrap_or_default(),
                            )
                        })
                    });
                    let adopted = state.volumes.get(name).is_some_and(|v| v.owner);
                    if let Some((from, epoch, root)) = handed
                        && !adopted
                    {
                        rest.push(Action::FinishHandoff {
                            app: name.clone(),
                            from,
                            to: node.clone(),
                            epoch,
                            root,
                        });
                        continue;
                    }
                    let elsewhere = states.iter().find(|(n, s)| {
                        *n != node
                            && (s.applications.contains_key(name)
                                || (desired.volume.is_some()
                                    && s.volumes.get(name).is_some_and(|v| v.owner)))
                    });
                    match elsewhere {
                        Some((from, _)) if desired.volume.is_some() => rest.push(Action::Move {
                            app: name.clone(),
                            from: from.clone(),
                            to: node.clone(),
                        }),
                        _ => rest.push(Action::Start {
                            node: node.clone(),
                            app: name.clone(),
                        }),
                    }
                }
            }
        }
    }
    for (node, state) in states {
        for name in state.applications.keys() {
            let assigned_here = cluster
                .nodes
                .iter()
                .any(|(n, apps)| n == node && apps.contains(name));
            let moving = rest.iter().any(
                |a| matches!(a, Action::Move { app, from, .. } if app == name && from == node),
            );
            if !assigned_here && !moving {
                stops.push(Action::Stop {
                    node: node.clone(),
                    app: name.clone(),
                });
            }
        }
    }
    stops.extend(rest);
    stops
}

/// The routing table every node should have: each external port goes to the node running
/// the application, at the address the application listens on there.
pub fn routes(cluster: &Cluster, states: &BTreeMap<NodeAddr, AgentState>) -> Vec<Route> {
    let mut out = Vec::new();
    for (name, app) in &cluster.applications {
        let Some(node) = cluster.node_of(name) else {
            continue;
        };
        let Some(status) = states.get(node).and_then(|s| s.applications.get(name)) else {
            continue;
        };
        out.extend(app_routes_to(app, status));
    }
    out.sort_by_key(|r| r.external);
    out
}

/// The routes of `app`'s external ports to where it runs as `status` says.
pub fn app_routes_to(app: &Application, status: &AppStatus) -> Vec<Route> {
    app.ports
        .iter()
        .filter_map(|p| {
            let (_, target) = status.ports.iter().find(|(i, _)| *i == p.internal)?;
            Some(Route {
                external: p.external,
                application: app.name.clone(),
                target: *target,
                hold: false,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VolumeStatus;
    use crate::config::parse;
    use std::path::Path;

    const APPS: &str = "version: 1\napplications:\n  kv:\n    image: kv\n    command: [kv]\n    volume: {mountpoint: /data}\n    ports: [{internal: 7000, external: 7000}]\n  web:\n    image: web\n    command: [web]\n";

    fn cluster(deploy: &str) -> Cluster {
        parse(Path::new("d"), deploy, Path::new("a"), APPS).unwrap()
    }

    fn node(s: &str) -> NodeAddr {
        NodeAddr::parse(s).unwrap()
    }

    fn empty(n: &str) -> AgentState {
        AgentState {
            node: n.into(),
            volume_server: String::new(),
            fingerprint: String::new(),
            runtime: "process".into(),
            applications: BTreeMap::new(),
            volumes: BTreeMap::new(),
            routes: Vec::new(),
        }
    }

    fn running(c: &Cluster, app: &str, port: u16) -> AppStatus {
        AppStatus {
            config: c.applications[app].clone(),
            running: true,
            ports: vec![(7000, format!("127.0.0.1:{port}").parse().unwrap())],
            restarts: 0,
        }
    }

    #[test]
    fn fresh_cluster_starts_everything_then_converges() {
        let c = cluster("version: 1\nnodes:\n  127.0.0.1: [kv]\n  127.0.0.2: [web]\n");
        let mut states: BTreeMap<_, _> = [
            (node("127.0.0.1"), empty("a")),
            (node("127.0.0.2"), empty("b")),
        ]
        .into();
        assert_eq!(
            plan(&c, &states),
            vec![
                Action::Start {
                    node: node("127.0.0.1"),
                    app: "kv".into()
                },
                Action::Start {
                    node: node("127.0.0.2"),
                    app: "web".into()
                },
            ]
        );
        let kv = running(&c, "kv", 40000);
        states
            .get_mut(&node("127.0.0.1"))
            .unwrap()
            .applications
            .insert("kv".into(), kv);
        let web = running(&c, "web", 40001);
        states
            .get_mut(&node("127.0.0.2"))
            .unwrap()
            .applications
            .insert("web".into(), web);
        assert!(plan(&c, &states).is_empty());
        let r = routes(&c, &states);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].external, r[0].target.port()), (7000, 40000));
    }

    #[test]
    fn changed_config_restarts_removed_app_stops_reassigned_volume_moves() {
        let c = cluster("version: 1\nnodes:\n  127.0.0.1: []\n  127.0.0.2: [kv]\n");
        let mut a = empty("a");
        a.applications.insert("kv".into(), running(&c, "kv", 1));
        a.applications.insert("old".into(), running(&c, "kv", 2));
        a.volumes.insert(
            "kv".into(),
            VolumeStatus {
                owner: true,
                epoch: 1,
                path: String::new(),
                handed_to: None,
                handed_root: None,
            },
        );
        let states: BTreeMap<_, _> =
            [(node("127.0.0.1"), a), (node("127.0.0.2"), empty("b"))].into();
        assert_eq!(
            plan(&c, &states),
            vec![
                Action::Stop {
                    node: node("127.0.0.1"),
                    app: "old".into()
                },
                Action::Move {
                    app: "kv".into(),
                    from: node("127.0.0.1"),
                    to: node("127.0.0.2")
                },
            ]
        );
        let c2 = cluster("version: 1\nnodes:\n  127.0.0.1: [kv]\n");
        let mut changed = c2.clone();
        changed
            .applications
            .get_mut("kv")
            .unwrap()
            .environment
            .insert("X".into(), "1".into());
        let mut a = empty("a");
        a.applications.insert("kv".into(), running(&c2, "kv", 1));
        let states: BTreeMap<_, _> = [(node("127.0.0.1"), a)].into();
        assert_eq!(
            plan(&changed, &states),
            vec![Action::Restart {
                node: node("127.0.0.1"),
                app: "kv".into()
            }]
        );
    }

    #[test]
    fn a_handoff_cut_in_half_is_finished_not_restarted_elsewhere() {
        let c = cluster("version: 1\nnodes:\n  127.0.0.1: []\n  127.0.0.2: [kv]\n");
        let mut a = empty("a");
        a.volumes.insert(
            "kv".into(),
            VolumeStatus {
                owner: false,
                epoch: 2,
                path: String::new(),
                handed_to: Some("127.0.0.2".into()),
                handed_root: Some("abc".into()),
            },
        );
        let states: BTreeMap<_, _> =
            [(node("127.0.0.1"), a), (node("127.0.0.2"), empty("b"))].into();
        assert_eq!(
            plan(&c, &states),
            vec![Action::FinishHandoff {
                app: "kv".into(),
                from: node("127.0.0.1"),
                to: node("127.0.0.2"),
                epoch: 2,
                root: "abc".into(),
            }]
        );
    }
}
