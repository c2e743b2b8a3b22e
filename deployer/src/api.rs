//! The agent API: what the deployer asks an agent, over QUIC with mutual TLS.
//!
//! Each request is one bidirectional stream carrying one JSON frame (`len: u32 BE | JSON`)
//! each way. Identities and trust are the replicator's: the agent accepts only deployer
//! fingerprints listed in its authorized file, the deployer talks only to agents whose
//! fingerprints it has pinned.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use serde::{Deserialize, Serialize};

use replicator::net::closing::{self, Endpoint};
use replicator::net::conn::peer_fingerprint;
use replicator::net::endpoint::{self, Bulk, NetOptions};
use replicator::net::identity::{Identity, TrustList};
use replicator::net::lanes::describe;

use crate::config::Application;

/// ALPN of the agent API, version 1.
pub const ALPN: &[u8] = b"deployer-agent/1";
/// Largest request or response.
const MAX_MESSAGE: usize = 4 << 20;

/// A route: clients connecting to `external` on any node reach `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub external: u16,
    pub application: String,
    pub target: SocketAddr,
    /// Hold new connections (accept them, wait) instead of forwarding: set while the
    /// application moves, so clients see a pause rather than a refusal.
    #[serde(default)]
    pub hold: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Everything the agent knows: applications, volumes, routes.
    State,
    /// Take (or renew) the deploy lease for `ttl_secs`: one deploy at a time per cluster.
    /// Refused while another holder's lease is live.
    Lease {
        holder: String,
        ttl_secs: u64,
        /// Take it even from a live holder (`deploy --break-lease`, after a deployer died).
        #[serde(default)]
        force: bool,
    },
    /// Give the lease back (only its holder can).
    Unlease { holder: String },
    /// Make `application` run here with this configuration (creating its volume if needed,
    /// restarting it if the configuration changed).
    Run { application: Application },
    /// Stop `application` and forget it; its volume stays.
    Stop { application: String },
    /// Replace the routing table.
    Routes { routes: Vec<Route> },
    /// Replace only `application`'s routes (a move changes its own routes while other moves
    /// change theirs).
    AppRoutes {
        application: String,
        routes: Vec<Route>,
    },
    /// Can this node run `application` (image present, command found)? Changes nothing.
    Check { application: Application },
    /// Answer once `application` serves here: it runs, its image's health check (if any)
    /// passed, and each of its ports accepts connections at the application itself (for a
    /// container, its own address: the published port accepts before the application
    /// does). An error once `timeout_ms` passed, or at once when it stopped running.
    AwaitServing {
        application: String,
        timeout_ms: u64,
    },
    /// Sync `application`'s volume to the agent whose volume server is `to` (`host:port`)
    /// and whose fingerprint is `peer`. Used for pre-copy rounds and the final delta.
    /// `live`: the application still runs (a pre-copy round): chunks it changes while they
    /// are sent are skipped and the push may end unfinished ([`PushReport::complete`]).
    Push {
        application: String,
        to: String,
        peer: String,
        #[serde(default)]
        live: bool,
    },
    /// Give up ownership of the (stopped) application's volume to `to` at `epoch`; `root` is
    /// the digest of the final sync, recorded so that a rerun can finish the handoff.
    Release {
        application: String,
        to: String,
        epoch: u64,
        root: String,
    },
    /// Take ownership of a volume received complete with digest `root`, at `epoch`.
    Adopt {
        application: String,
        epoch: u64,
        root: String,
    },
}

/// What one volume push moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReport {
    pub bytes_sent_wire: u64,
    pub bytes_sent_raw: u64,
    pub chunks_sent: u64,
    pub bytes_read: u64,
    pub duration_ms: u64,
    pub root: String,
    /// A live push in which the application changed chunks while they were sent: the
    /// receiving node keeps what came as partial files, commits nothing, and the next push
    /// sends only what is still missing or changed since.
    #[serde(default)]
    pub files_unfinished: u64,
    #[serde(default)]
    pub chunks_stale: u64,
}

impl PushReport {
    /// The receiving node holds the volume exactly as `root` says, durably.
    pub fn complete(&self) -> bool {
        self.files_unfinished == 0 && self.chunks_stale == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    pub config: Application,
    pub running: bool,
    /// (internal port, address where the application listens on this node). A list, not a
    /// map: JSON object keys are strings.
    pub ports: Vec<(u16, SocketAddr)>,
    pub restarts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub owner: bool,
    pub epoch: u64,
    pub path: String,
    /// Set on the node that gave the volume away.
    #[serde(default)]
    pub handed_to: Option<String>,
    /// The digest the volume had when it was handed away.
    #[serde(default)]
    pub handed_root: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub node: String,
    /// `host:port` of this agent's volume server (peer pushes).
    #[serde(default)]
    pub volume_server: String,
    pub fingerprint: String,
    pub runtime: String,
    pub applications: BTreeMap<String, AppStatus>,
    pub volumes: BTreeMap<String, VolumeStatus>,
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    State(AgentState),
    /// Done; `changed` says whether anything had to change.
    Ok {
        changed: bool,
        detail: String,
    },
    Pushed(PushReport),
    /// A push failed because the application changed what was being copied (a database
    /// writing its pages while it serves): a pre-copy round may end there, the final delta
    /// copies it with the application stopped.
    SourceChanged {
        message: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{node}: {message}")]
    Node { node: String, message: String },
    /// [`Response::SourceChanged`].
    #[error("{node}: {message}")]
    SourceChanged { node: String, message: String },
}

pub async fn write_frame<T: Serialize>(s: &mut SendStream, v: &T) -> Result<(), String> {
    let body = serde_json::to_vec(v).map_err(|e| e.to_string())?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    s.write_all(&frame).await.map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())
}

pub async fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut RecvStream) -> Result<T, String> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(|e| match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => describe(&c),
        e => e.to_string(),
    })?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_MESSAGE {
        return Err(format!("message of {n} bytes (limit {MAX_MESSAGE})"));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("bad message: {e}"))
}

/// A connection to one agent.
pub struct AgentClient {
    pub node: String,
    endpoint: Endpoint,
    conn: Connection,
}

impl AgentClient {
    /// Connects to the agent at `addr` (`host:port`), which must present a pinned fingerprint.
    pub async fn connect(
        node: &str,
        addr: &str,
        id: &Identity,
        trusted: &TrustList,
        timeout: Duration,
    ) -> Result<AgentClient, ApiError> {
        let fail = |message: String| ApiError::Node {
            node: node.to_string(),
            message,
        };
        let sock: SocketAddr = replicator::net::open::resolve(addr).map_err(fail)?;
        let opts = NetOptions {
            idle_timeout: timeout,
        };
        let endpoint = endpoint::client_with_alpn(id, sock, &opts, vec![ALPN.to_vec()], Bulk::Both)
            .map_err(|e| fail(e.to_string()))?;
        let connecting = endpoint
            .connect(sock, "deployer-agent")
            .map_err(|e| fail(e.to_string()))?;
        let conn = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| {
                fail(format!(
                    "agent at {addr} does not answer (is `deployer agent` running?)"
                ))
            })?
            .map_err(|e| {
                fail(format!(
                    "cannot reach the agent at {addr}: {}",
                    describe(&e)
                ))
            })?;
        let fp = peer_fingerprint(&conn).ok_or_else(|| fail("agent sent no certificate".into()))?;
        if !trusted.trusts(&fp, Some(addr)) {
            closing::close(
                &conn,
                2u32.into(),
                format!("deployer does not trust agent fingerprint {fp}").as_bytes(),
            );
            return Err(fail(format!(
                "the agent at {addr} presents fingerprint {fp}, which is not in the known agents; \
                 add the line \"{fp} {addr}\" if it is the right node"
            )));
        }
        Ok(AgentClient {
            node: node.to_string(),
            endpoint,
            conn,
        })
    }

    pub async fn call(&self, req: &Request) -> Result<Response, ApiError> {
        let fail = |message: String| ApiError::Node {
            node: self.node.clone(),
            message,
        };
        let (mut s, mut r) = self.conn.open_bi().await.map_err(|e| fail(describe(&e)))?;
        write_frame(&mut s, req).await.map_err(fail)?;
        match read_frame::<Response>(&mut r).await.map_err(fail)? {
            Response::Error { message } => Err(fail(message)),
            Response::SourceChanged { message } => Err(ApiError::SourceChanged {
                node: self.node.clone(),
                message,
            }),
            ok => Ok(ok),
        }
    }

    pub async fn state(&self) -> Result<AgentState, ApiError> {
        match self.call(&Request::State).await? {
            Response::State(s) => Ok(s),
            other => Err(ApiError::Node {
                node: self.node.clone(),
                message: format!("unexpected answer {other:?}"),
            }),
        }
    }

    pub async fn close(self) {
        closing::close(&self.conn, 0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
