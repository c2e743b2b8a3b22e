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
//! A failure before the handoff restarts the application on A and keeps B's partial copy; an
//! application that cannot serve on B after the handoff is moved back the same fenced way.

use std::collections::BTreeMap;
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
    /// False: stop first and copy everything while stopped (stop–copy–start, the baseline
    /// the benchmark compares with; `--no-pre-copy`).
    pub pre_copy: bool,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            downtime_budget: Duration::from_secs(1),
            max_rounds: 8,
            health_timeout: Duration::from_secs(30),
            pre_copy: true,
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
    /// Chunks the application changed while this round sent them: skipped, left to the
    /// next round (the round committed nothing, and the next resumes what it brought).
    pub chunks_stale: u64,
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
    /// Where the downtime went.
    pub downtime_parts: DowntimeParts,
    pub predicted_downtime_ms: u64,
    /// A pre-copy round failed because the application changed data while it was copied;
    /// pre-copy ended there (`rounds` has the rounds before it).
    pub pre_copy_ended_by_change: bool,
    pub epoch: u64,
    pub root: String,
}

/// The downtime, step by step (milliseconds of wall time seen by the deployer).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DowntimeParts {
    /// Stopping the application on A (graceful, then killed).
    pub stop_ms: u64,
    /// The final delta, as the deployer waited for it (the sync plus the request).
    pub final_delta_ms: u64,
    /// Release on A, adopt on B.
    pub handoff_ms: u64,
    /// Starting on B until it accepts connections.
    pub start_ms: u64,
    /// Switching every node's routes to B.
    pub reroute_ms: u64,
}

/// `DEPLOYER_CRASH_AT=STEP` aborts the deployer right after STEP (`after-stop`,
/// `after-release`, `after-adopt`, `hand-back-after-release`): the recovery tests kill it
/// exactly there.
fn crashpoint(step: &str) {
    if std::env::var("DEPLOYER_CRASH_AT").as_deref() == Ok(step) {
        eprintln!("deployer: DEPLOYER_CRASH_AT={step}: aborting");
        std::process::abort();
    }
}

/// A rate for people: MB/s, or kB/s below that (a late pre-copy round moves a few kB).
fn shown_rate(bytes_per_second: f64) -> String {
    if bytes_per_second >= 1e6 {
        format!("{:.1} MB/s", bytes_per_second / 1e6)
    } else {
        format!("{:.1} kB/s", bytes_per_second / 1e3)
    }
}

fn node_err(node: &NodeAddr, message: String) -> DeployError {
    DeployError::Node(ApiError::Node {
        node: node.to_string(),
        message,
    })
}

/// Pushes `app`'s volume from `a` to `b`; `live` while the application still runs there.
async fn push(
    a: &AgentClient,
    app: &str,
    b: &AgentState,
    live: bool,
) -> Result<PushReport, ApiError> {
    match a
        .call(&Request::Push {
            application: app.to_string(),
            to: b.volume_server.clone(),
            peer: b.fingerprint.clone(),
            live,
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

/// Asks `node`'s agent to answer once `app` serves there ([`Request::AwaitServing`]).
async fn await_serving(node: &AgentClient, app: &str, timeout: Duration) -> Result<(), String> {
    node.call(&Request::AwaitServing {
        application: app.to_string(),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    })
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

/// Points `app`'s routes on every node at `node`, where it runs as `node_state` says.
async fn route_to(
    cluster: &Cluster,
    clients: &BTreeMap<NodeAddr, AgentClient>,
    app: &str,
    node: &NodeAddr,
    node_state: &AgentState,
) -> Result<(), DeployError> {
    let status = node_state
        .applications
        .get(app)
        .ok_or_else(|| node_err(node, format!("{app} does not run there")))?;
    let routes = crate::plan::app_routes_to(&cluster.applications[app], status);
    Ok(set_app_routes(clients, app, &routes).await?)
}

/// Runs `app` on `node` again after a failed move (it got new ports there) and routes to it
/// once it serves, or once the health timeout has passed.
async fn restart_on(
    cluster: &Cluster,
    clients: &BTreeMap<NodeAddr, AgentClient>,
    app: &str,
    node: &NodeAddr,
    opts: MigrationOptions,
) -> Result<(), String> {
    let c = &clients[node];
    c.call(&Request::Run {
        application: cluster.applications[app].clone(),
    })
    .await
    .map_err(|e| e.to_string())?;
    // Routed there even if it does not serve in time: A is where it has to run now.
    if let Err(e) = await_serving(c, app, opts.health_timeout).await {
        tracing::warn!(app, node = %node, "{e}");
    }
    let state = c.state().await.map_err(|e| e.to_string())?;
    route_to(cluster, clients, app, node, &state)
        .await
        .map_err(|e| e.to_string())
}

/// Starts the application on its new node and waits until it serves there (its agent
/// checks every port at the application itself); returns that node's state.
async fn start_serving(
    b: &AgentClient,
    config: &crate::config::Application,
    timeout: Duration,
) -> Result<AgentState, String> {
    let app = &config.name;
    b.call(&Request::Run {
        application: config.clone(),
    })
    .await
    .map_err(|e| format!("starting it failed: {e}"))?;
    await_serving(b, app, timeout).await?;
    b.state().await.map_err(|e| e.to_string())
}

/// Undoes a move after the handoff, when the application cannot serve on B: stop it there,
/// sync B's copy back to A (it may have written before failing), hand ownership back at a
/// newer epoch, restart on A and release the held routes to A. Nothing is lost: B's copy is
/// authoritative from its adoption on, and it is what A gets back.
struct HandBack<'a> {
    opts: MigrationOptions,
    clients: &'a BTreeMap<NodeAddr, AgentClient>,
    states: &'a BTreeMap<NodeAddr, AgentState>,
    app: &'a str,
    from: &'a NodeAddr,
    to: &'a NodeAddr,
    epoch: u64,
    routes: &'a [Route],
}

impl HandBack<'_> {
    async fn run(self, cluster: &Cluster, why: String) -> DeployError {
        let app = self.app;
        let done = self.steps(cluster).await;
        if done.is_err() {
            let _ = set_app_routes(self.clients, app, &app_routes(self.routes, app, false)).await;
        }
        let (from, to, epoch) = (self.from, self.to, self.epoch);
        match done {
            Ok(()) => node_err(
                to,
                format!(
                    "moving {app}: {why}; moved back: {app} runs on {from} again with the \
                     volume at epoch {epoch}"
                ),
            ),
            Err(e) => node_err(
                to,
                format!(
                    "moving {app}: {why}; moving it back to {from} failed too ({e}); \
                     {to} owns the volume: rerun deploy"
                ),
            ),
        }
    }

    async fn steps(&self, cluster: &Cluster) -> Result<(), String> {
        let (a, b) = (&self.clients[self.from], &self.clients[self.to]);
        let app = self.app.to_string();
        b.call(&Request::Stop {
            application: app.clone(),
        })
        .await
        .map_err(|e| format!("stopping it on {}: {e}", self.to))?;
        // Stopped on B: a complete copy or a failure.
        let r = push(b, &app, &self.states[self.from], false)
            .await
            .map_err(|e| format!("copying the volume back: {e}"))?;
        b.call(&Request::Release {
            application: app.clone(),
            to: self.from.to_string(),
            epoch: self.epoch,
            root: r.root.clone(),
        })
        .await
        .map_err(|e| e.to_string())?;
        crashpoint("hand-back-after-release");
        a.call(&Request::Adopt {
            application: app.clone(),
            epoch: self.epoch,
            root: r.root,
        })
        .await
        .map_err(|e| e.to_string())?;
        restart_on(cluster, self.clients, &app, self.from, self.opts).await
    }
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
    let mut pre_copy_ended_by_change = false;
    loop {
        // Without pre-copy (stop–copy–start) everything goes in the final delta.
        if !opts.pre_copy {
            break;
        }
        // Live: chunks the application changes while the round sends them are skipped, and
        // the next round (at last the final delta, with it stopped) brings them.
        let r = match push(a, app, b_state, true).await {
            Ok(r) => r,
            // The application changed what the round was copying in a way a live push does
            // not skip (an agent of an older version): the final delta, with it stopped,
            // carries the rest.
            Err(ApiError::SourceChanged { message, .. }) => {
                say(format!(
                    "  pre-copy round {}: ended, {app} changed data while it was copied \
                     ({message}); the final delta carries the rest",
                    rounds.len() + 1
                ));
                pre_copy_ended_by_change = true;
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let secs = (r.duration_ms as f64 / 1000.0).max(1e-3);
        let round = Round {
            round: rounds.len() as u32 + 1,
            bytes: r.bytes_sent_wire,
            duration_ms: r.duration_ms,
            megabytes_per_second: r.bytes_sent_wire as f64 / secs / 1e6,
            predicted_downtime_ms: r.duration_ms,
            chunks_stale: r.chunks_stale,
        };
        say(format!(
            "  pre-copy round {}: {} bytes in {} ms ({}), predicted downtime {} ms{}",
            round.round,
            round.bytes,
            round.duration_ms,
            shown_rate(round.megabytes_per_second * 1e6),
            round.predicted_downtime_ms,
            match r.complete() {
                true => String::new(),
                false => format!(
                    "; {} chunks changed while sent, left for the next round",
                    r.chunks_stale
                ),
            }
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
    let routes_before = &states[from].routes;
    set_app_routes(clients, app, &app_routes(routes_before, app, true)).await?;
    let stopped = Instant::now();
    let mut parts = DowntimeParts::default();
    let mut lap = Instant::now();
    let mut split = || {
        let ms = lap.elapsed().as_millis() as u64;
        lap = Instant::now();
        ms
    };
    a.call(&Request::Stop {
        application: app.to_string(),
    })
    .await?;
    parts.stop_ms = split();
    crashpoint("after-stop");
    let rollback = |why: String| async move {
        let restarted = restart_on(cluster, clients, app, from, opts).await;
        if restarted.is_err() {
            let _ = set_app_routes(clients, app, &app_routes(routes_before, app, false)).await;
        }
        let note = match restarted {
            Ok(()) => format!("{app} is running on {from} again"),
            Err(e) => format!("and restarting {app} on {from} failed too: {e}"),
        };
        node_err(
            to,
            format!("moving {app}: {why}; {note}; B's partial copy is kept for the next try"),
        )
    };
    let last = match push(a, app, b_state, false).await {
        Ok(r) if r.complete() => r,
        Ok(r) => {
            let why = format!(
                "final delta unfinished ({} chunks stale with the application stopped)",
                r.chunks_stale
            );
            return Err(rollback(why).await);
        }
        Err(e) => return Err(rollback(format!("final delta failed: {e}")).await),
    };
    parts.final_delta_ms = split();
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
    parts.handoff_ms = split();

    // 5. Start on B, wait until it serves, route there; if it cannot, undo the move.
    let b_now = match start_serving(b, &config, opts.health_timeout).await {
        Ok(state) => state,
        Err(why) => {
            let back = HandBack {
                opts,
                clients,
                states,
                app,
                from,
                to,
                epoch: epoch + 1,
                routes: routes_before,
            };
            return Err(back.run(cluster, why).await);
        }
    };
    parts.start_ms = split();
    route_to(cluster, clients, app, to, &b_now).await?;
    parts.reroute_ms = split();
    let downtime = stopped.elapsed().as_millis() as u64;
    say(format!(
        "  {app} serving on {to}: downtime {downtime} ms (predicted {predicted} ms), epoch {epoch}"
    ));
    say(format!(
        "    stop {} ms, final delta {} ms, handoff {} ms, start {} ms, reroute {} ms",
        parts.stop_ms, parts.final_delta_ms, parts.handoff_ms, parts.start_ms, parts.reroute_ms
    ));
    Ok(MigrationReport {
        application: app.to_string(),
        from: from.to_string(),
        to: to.to_string(),
        rounds,
        final_delta_bytes: last.bytes_sent_wire,
        final_delta_ms: last.duration_ms,
        downtime_ms: downtime,
        downtime_parts: parts,
        predicted_downtime_ms: predicted,
        pre_copy_ended_by_change,
        epoch,
        root: last.root,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_below_a_megabyte_per_second_are_shown_in_kilobytes() {
        assert_eq!(shown_rate(1324.0 / 0.2), "6.6 kB/s");
        assert_eq!(shown_rate(0.0), "0.0 kB/s");
        assert_eq!(shown_rate(250e6), "250.0 MB/s");
    }
}
