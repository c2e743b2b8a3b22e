//! The two-phase push: move a running stateful application from node A to node B with the
//! least downtime and nothing lost (docs/migration.md has the full state machine).
//!
//! 1. Check that B can run it.
//! 2. Pre-copy while it serves on A: a full sync, then incremental rounds while they shrink,
//!    until the last round's time fits the downtime budget (the rule QEMU uses for memory),
//!    or a round does not shrink, or `max_rounds`.
//! 3. Hold its routes (new connections wait instead of failing), stop it on A, run the final
//!    delta — the authoritative one, whose digest B's volume must match.
//! 4. Fenced handoff: A records "handed to B at epoch e+1", then B "owned at epoch e+1" once
//!    its copy is complete with that digest.
//! 5. Start on B, wait until it accepts connections, route to B.
//!
//! A failure before the handoff restarts the application on A and keeps B's partial copy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::{AgentClient, AgentState, ApiError, PushReport, Request, Response, Route};
use crate::config::{Cluster, NodeAddr};
use crate::deploy::DeployError;

#[derive(Clone, Copy, Debug)]
pub struct MigrationOptions {
    /// Stop pre-copying when a round takes no longer than this (`--downtime-budget`).
    pub downtime_budget: Duration,
    /// At most this many pre-copy rounds (`--max-rounds`).
    pub max_rounds: u32,
    /// How long the application may take to accept connections on B.
    pub health_timeout: Duration,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            downtime_budget: Duration::from_secs(1),
            max_rounds: 8,
            health_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub round: u32,
    pub bytes: u64,
    pub duration_ms: u64,
    pub megabytes_per_second: f64,
    /// What the final delta would take if it were like this round.
    pub predicted_downtime_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MigrationReport {
    pub application: String,
    pub from: String,
    pub to: String,
    pub rounds: Vec<Round>,
    pub final_delta_bytes: u64,
    pub final_delta_ms: u64,
    /// From "stopped on A" to "serving on B".
    pub downtime_ms: u64,
    pub predicted_downtime_ms: u64,
    pub epoch: u64,
    pub root: String,
}

/// `DEPLOYER_CRASH_AT=STEP` aborts the deployer right after STEP (`after-stop`,
/// `after-release`, `after-adopt`): the recovery tests kill it exactly there.
fn crashpoint(step: &str) {
    if std::env::var("DEPLOYER_CRASH_AT").as_deref() == Ok(step) {
        eprintln!("deployer: DEPLOYER_CRASH_AT={step}: aborting");
        std::process::abort();
    }
}

fn node_err(node: &NodeAddr, message: String) -> DeployError {
    DeployError::Node(ApiError::Node {
        node: node.to_string(),
        message,
    })
}

async fn push(a: &AgentClient, app: &str, b: &AgentState) -> Result<PushReport, ApiError> {
    match a
        .call(&Request::Push {
            application: app.to_string(),
            to: b.volume_server.clone(),
            peer: b.fingerprint.clone(),
        })
        .await?
    {
        Response::Pushed(r) => Ok(r),
        other => Err(ApiError::Node {
            node: a.node.clone(),
            message: format!("unexpected answer {other:?}"),
        }),
    }
}

/// `app`'s routes among `routes`, held or not.
fn app_routes(routes: &[Route], app: &str, hold: bool) -> Vec<Route> {
    routes
        .iter()
        .filter(|r| r.application == app)
        .map(|r| Route { hold, ..r.clone() })
        .collect()
}

/// Sets `app`'s routes on every node, leaving other applications' routes alone.
async fn set_app_routes(
    clients: &BTreeMap<NodeAddr, AgentClient>,
    app: &str,
    routes: &[Route],
) -> Result<(), ApiError> {
    for c in clients.values() {
        c.call(&Request::AppRoutes {
            application: app.to_string(),
            routes: routes.to_vec(),
        })
        .await?;
    }
    Ok(())
}

async fn wait_serving(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Moves `app` from `from` to `to`. `states` are the agents' states before the move.
#[allow(clippy::too_many_arguments)]
pub async fn migrate(
    cluster: &Cluster,
    clients: &BTreeMap<NodeAddr, AgentClient>,
    states: &BTreeMap<NodeAddr, AgentState>,
    app: &str,
    from: &NodeAddr,
    to: &NodeAddr,
    opts: MigrationOptions,
    say: &dyn Fn(String),
) -> Result<MigrationReport, DeployError> {
    let config = cluster.applications[app].clone();
    let (a, b) = (&clients[from], &clients[to]);
    let b_state = &states[to];
    let epoch = states[from].volumes.get(app).map_or(1, |v| v.epoch) + 1;

    // 1. B must be able to run it before A is touched.
    b.call(&Request::Check {
        application: config.clone(),
    })
    .await?;

    // 2. Pre-copy while A serves.
    let mut rounds: Vec<Round> = Vec::new();
    loop {
        let r = push(a, app, b_state).await?;
        let secs = (r.duration_ms as f64 / 1000.0).max(1e-3);
        let round = Round {
            round: rounds.len() as u32 + 1,
            bytes: r.bytes_sent_wire,
            duration_ms: r.duration_ms,
            megabytes_per_second: r.bytes_sent_wire as f64 / secs / 1e6,
            predicted_downtime_ms: r.duration_ms,
        };
        say(format!(
            "  pre-copy round {}: {} bytes in {} ms ({:.1} MB/s), predicted downtime {} ms",
            round.round,
            round.bytes,
            round.duration_ms,
            round.megabytes_per_second,
            round.predicted_downtime_ms
        ));
        let fits = round.duration_ms <= opts.downtime_budget.as_millis() as u64;
        let shrank = rounds.last().is_none_or(|p| round.bytes < p.bytes);
        let first = rounds.is_empty();
        rounds.push(round);
        if (fits && !first) || !shrank || rounds.len() as u32 >= opts.max_rounds {
            break;
        }
    }
    let predicted = rounds.last().map_or(0, |r| r.predicted_downtime_ms);

    // 3. Hold routes, stop on A, final delta.
    let routes_before = states[from].routes.clone();
    set_app_routes(clients, app, &app_routes(&routes_before, app, true)).await?;
    let stopped = Instant::now();
    a.call(&Request::Stop {
        application: app.to_string(),
    })
    .await?;
    crashpoint("after-stop");
    let rollback = |why: String| async move {
        let restarted = a
            .call(&Request::Run {
                application: cluster.applications[app].clone(),
            })
            .await;
        let _ = set_app_routes(clients, app, &app_routes(&routes_before, app, false)).await;
        let note = match restarted {
            Ok(_) => format!("{app} is running on {from} again"),
            Err(e) => format!("and restarting {app} on {from} failed too: {e}"),
        };
        node_err(
            to,
            format!("moving {app}: {why}; {note}; B's partial copy is kept for the next try"),
        )
    };
    let last = match push(a, app, b_state).await {
        Ok(r) => r,
        Err(e) => return Err(rollback(format!("final delta failed: {e}")).await),
    };
    say(format!(
        "  final delta: {} bytes in {} ms (application stopped)",
        last.bytes_sent_wire, last.duration_ms
    ));

    // 4. Fenced handoff.
    if let Err(e) = a
        .call(&Request::Release {
            application: app.to_string(),
            to: to.to_string(),
            epoch,
            root: last.root.clone(),
        })
        .await
    {
        return Err(rollback(format!("handoff refused by {from}: {e}")).await);
    }
    crashpoint("after-release");
    b.call(&Request::Adopt {
        application: app.to_string(),
        epoch,
        root: last.root.clone(),
    })
    .await?;
    crashpoint("after-adopt");

    // 5. Start on B, wait until it serves, route there.
    b.call(&Request::Run {
        application: config.clone(),
    })
    .await?;
    let b_now = b.state().await?;
    let status = b_now
        .applications
        .get(app)
        .ok_or_else(|| node_err(to, format!("{app} did not start")))?;
    for (_, addr) in &status.ports {
        if !wait_serving(*addr, opts.health_timeout).await {
            return Err(node_err(
                to,
                format!("{app} does not accept connections on {addr}"),
            ));
        }
    }
    let mut after = states.clone();
    after.insert(to.clone(), b_now);
    if let Some(s) = after.get_mut(from) {
        s.applications.remove(app);
    }
    let now = crate::plan::routes(cluster, &after);
    set_app_routes(clients, app, &app_routes(&now, app, false)).await?;
    let downtime = stopped.elapsed().as_millis() as u64;
    say(format!(
        "  {app} serving on {to}: downtime {downtime} ms (predicted {predicted} ms), epoch {epoch}"
    ));
    Ok(MigrationReport {
        application: app.to_string(),
        from: from.to_string(),
        to: to.to_string(),
        rounds,
        final_delta_bytes: last.bytes_sent_wire,
        final_delta_ms: last.duration_ms,
        downtime_ms: downtime,
        predicted_downtime_ms: predicted,
        epoch,
        root: last.root,
    })
}
