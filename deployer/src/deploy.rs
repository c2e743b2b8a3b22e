//! `deployer deploy` and `deployer status`: talk to every agent, plan, execute, converge.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use replicator::net::identity::{Identity, TrustList};

use crate::api::{AgentClient, AgentState, ApiError, Request, Response};
use crate::config::{Cluster, NodeAddr};
use crate::migrate::{MigrationOptions, MigrationReport, migrate};
use crate::plan::{Action, plan, routes};

/// How the deployer reaches agents.
#[derive(Clone, Debug)]
pub struct Access {
    pub identity: Identity,
    pub known_agents: TrustList,
    pub timeout: Duration,
    /// Take the deploy lease even if another deploy holds it (that deploy died).
    pub break_lease: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Node(#[from] ApiError),
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub actions: Vec<Action>,
    /// Nodes whose routing table changed.
    pub routes_updated: Vec<String>,
    /// One per application moved between nodes.
    pub migrations: Vec<MigrationReport>,
    pub dry_run: bool,
}

/// Connects to every node of the cluster; fails naming the first node that cannot be reached,
/// before anything is changed anywhere.
pub async fn connect_all(
    cluster: &Cluster,
    access: &Access,
) -> Result<BTreeMap<NodeAddr, AgentClient>, DeployError> {
    let tasks: Vec<_> = cluster
        .nodes
        .iter()
        .map(|(node, _)| {
            let node = node.clone();
            let access = access.clone();
            tokio::spawn(async move {
                let c = AgentClient::connect(
                    &node.to_string(),
                    &node.socket(),
                    &access.identity,
                    &access.known_agents,
                    access.timeout,
                )
                .await;
                (node, c)
            })
        })
        .collect();
    let mut clients = BTreeMap::new();
    let mut first_error = None;
    for t in tasks {
        let Ok((node, c)) = t.await else { continue };
        match c {
            Ok(c) => {
                clients.insert(node, c);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        for (_, c) in clients {
            c.close().await;
        }
        return Err(e.into());
    }
    Ok(clients)
}

/// How long a deploy lease lasts; a deployer that dies frees the cluster after this.
const LEASE_SECS: u64 = 600;

/// Takes the deploy lease on every node (in address order, so two deployers meet on the
/// same first node); on refusal, gives back what it took.
async fn lease_all(
    clients: &BTreeMap<NodeAddr, AgentClient>,
    holder: &str,
    force: bool,
) -> Result<(), DeployError> {
    for (i, c) in clients.values().enumerate() {
        let taken = c
            .call(&Request::Lease {
                holder: holder.to_string(),
                ttl_secs: LEASE_SECS,
                force,
            })
            .await;
        if let Err(e) = taken {
            for back in clients.values().take(i) {
                let _ = back
                    .call(&Request::Unlease {
                        holder: holder.to_string(),
                    })
                    .await;
            }
            return Err(e.into());
        }
    }
    Ok(())
}

pub async fn states(
    clients: &BTreeMap<NodeAddr, AgentClient>,
) -> Result<BTreeMap<NodeAddr, AgentState>, DeployError> {
    let mut out = BTreeMap::new();
    for (node, c) in clients {
        out.insert(node.clone(), c.state().await?);
    }
    Ok(out)
}

/// Plans and (unless `dry_run`) executes, then updates every node's routing table.
pub async fn deploy(
    cluster: &Cluster,
    access: &Access,
    dry_run: bool,
    migration: MigrationOptions,
    mut on_action: impl FnMut(&Action, &str),
) -> Result<Report, DeployError> {
    let clients = connect_all(cluster, access).await?;
    let holder = format!(
        "deployer {} pid {} on {}",
        &access.identity.fingerprint.to_string()[..16],
        std::process::id(),
        std::env::var("HOSTNAME").unwrap_or_else(|_| "this host".into())
    );
    let result = match lease_all(&clients, &holder, access.break_lease).await {
        Ok(()) => deploy_with(cluster, &clients, dry_run, migration, &mut on_action).await,
        Err(e) => Err(e),
    };
    for c in clients.values() {
        let _ = c
            .call(&Request::Unlease {
                holder: holder.clone(),
            })
            .await;
    }
    for (_, c) in clients {
        c.close().await;
    }
    result
}

async fn deploy_with(
    cluster: &Cluster,
    clients: &BTreeMap<NodeAddr, AgentClient>,
    dry_run: bool,
    migration: MigrationOptions,
    on_action: &mut impl FnMut(&Action, &str),
) -> Result<Report, DeployError> {
    let before = states(clients).await?;
    let actions = plan(cluster, &before);
    if dry_run {
        for a in &actions {
            on_action(a, "planned");
        }
        return Ok(Report {
            actions,
            routes_updated: Vec::new(),
            migrations: Vec::new(),
            dry_run,
        });
    }
    let mut migrations = Vec::new();
    for action in &actions {
        let (node, request) = match action {
            Action::Stop { node, app } => (
                node,
                Request::Stop {
                    application: app.clone(),
                },
            ),
            Action::Start { node, app } | Action::Restart { node, app } => (
                node,
                Request::Run {
                    application: cluster.applications[app].clone(),
                },
            ),
            Action::FinishHandoff {
                app,
                to,
                epoch,
                root,
                ..
            } => {
                clients[to]
                    .call(&Request::Adopt {
                        application: app.clone(),
                        epoch: *epoch,
                        root: root.clone(),
                    })
                    .await?;
                (
                    to,
                    Request::Run {
                        application: cluster.applications[app].clone(),
                    },
                )
            }
            // Moves run after everything else, all at once (below).
            Action::Move { .. } => continue,
        };
        let detail = match clients[node].call(&request).await? {
            Response::Ok { detail, .. } => detail,
            other => format!("{other:?}"),
        };
        on_action(action, &detail);
    }
    // Several applications moving in one deploy migrate concurrently.
    let moves: Vec<&Action> = actions
        .iter()
        .filter(|a| matches!(a, Action::Move { .. }))
        .collect();
    if !moves.is_empty() {
        let printer = std::cell::RefCell::new(&mut *on_action);
        let before = &before;
        let runs = moves.iter().map(|action| {
            let Action::Move { app, from, to } = action else {
                unreachable!("filtered above")
            };
            let printer = &printer;
            let say = move |line: String| (printer.borrow_mut())(action, line.trim());
            async move {
                say("pre-copy starts; the application keeps serving".into());
                migrate(cluster, clients, before, app, from, to, migration, &say).await
            }
        });
        for report in crate::util::join_all(runs.collect()).await {
            migrations.push(report?);
        }
    }
    let after = states(clients).await?;
    let table = routes(cluster, &after);
    let mut routes_updated = Vec::new();
    for (node, c) in clients {
        if after.get(node).is_some_and(|s| s.routes != table) {
            c.call(&Request::Routes {
                routes: table.clone(),
            })
            .await?;
            routes_updated.push(node.to_string());
        }
    }
    Ok(Report {
        actions,
        routes_updated,
        migrations,
        dry_run,
    })
}
