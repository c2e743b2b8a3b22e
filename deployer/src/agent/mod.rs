//! `deployer agent`: one per node. Keeps the node's applications running as the deployer
//! asked, records its volumes and their ownership durably, routes external ports, and
//! serves volume pushes from peer agents (a `replicator serve` over its volume directory).
//!
//! The agent can be stopped and restarted at any time: applications keep running (their
//! processes are not its children's children of a dying parent — they have their own process
//! group), and on start it reloads its state and adopts them again.

pub mod docker;
mod moves;
use moves::PushFailed;
pub mod process;
pub mod proxy;
pub mod runtime;
pub mod state;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use replicator::net::closing;
use replicator::net::conn::peer_fingerprint;
use replicator::net::endpoint::{self, NetOptions};
use replicator::net::identity::{Identity, TrustList};
use replicator::net::server::{ServeOptions, Server};

use crate::api::{
    ALPN, AgentState, AppStatus, Request, Response, VolumeStatus, read_frame, write_frame,
};
use crate::config::Application;
use process::Launch;
use proxy::Proxy;
use runtime::Runtime;
use state::{AppRecord, Persisted, StateDir, VolumeRecord, create_volume};

/// Port of the agent API.
pub const AGENT_PORT: u16 = crate::config::DEFAULT_AGENT_PORT;
/// Port of the agent's replicator server (volume pushes between nodes).
pub const REPLICATOR_PORT: u16 = replicator::net::open::DEFAULT_PORT;
/// How long an application gets to stop after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub ip: IpAddr,
    pub port: u16,
    pub replicator_port: u16,
    /// The volume server address peers are told to push to, when not `ip:replicator_port`
    /// (NAT, a port forward, a test relay).
    pub advertise_replicator: Option<SocketAddr>,
    pub state: StateDir,
    pub net: NetOptions,
}

struct Core {
    persisted: Persisted,
    /// The deploy lease: holder and expiry. In memory: an agent restart frees it.
    lease: Option<(String, std::time::Instant)>,
}

pub struct Agent {
    opts: AgentOptions,
    identity: Identity,
    runtime: Runtime,
    proxy: Proxy,
    core: Mutex<Core>,
    /// Volumes this node owns, for the volume server's fencing check (kept in step with
    /// the persisted state by [`Agent::save`]).
    owned: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Agent {
    /// Loads (or creates) the identity and state under `--state`.
    pub fn open(mut opts: AgentOptions, runtime: Runtime) -> Result<Arc<Agent>, String> {
        std::fs::create_dir_all(&opts.state.0)
            .map_err(|e| format!("{}: {e}", opts.state.0.display()))?;
        // Absolute: volume paths are handed to runtimes (Docker bind mounts need them).
        opts.state.0 = opts
            .state
            .0
            .canonicalize()
            .map_err(|e| format!("{}: {e}", opts.state.0.display()))?;
        std::fs::create_dir_all(&opts.state.0)
            .map_err(|e| format!("{}: {e}", opts.state.0.display()))?;
        let (identity, _) =
            Identity::load_or_create(&opts.state.identity()).map_err(|e| e.to_string())?;
        let persisted = opts
            .state
            .load()
            .map_err(|e| format!("{}: {e}", opts.state.file().display()))?;
        Ok(Arc::new(Agent {
            proxy: Proxy::new(opts.ip),
            opts,
            identity,
            runtime,
            owned: Arc::new(std::sync::Mutex::new(owned_of(&persisted))),
            core: Mutex::new(Core {
                persisted,
                lease: None,
            }),
        }))
    }

    pub fn fingerprint(&self) -> String {
        self.identity.fingerprint.to_string()
    }

    /// Serves until `shutdown` completes. Applications keep running afterwards.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let addr = SocketAddr::new(self.opts.ip, self.opts.port);
        let ep =
            endpoint::server_with_alpn(&self.identity, addr, &self.opts.net, vec![ALPN.to_vec()])
                .map_err(|e| e.to_string())?;
        let volumes = Server::bind(ServeOptions {
            listen: SocketAddr::new(self.opts.ip, self.opts.replicator_port),
            // Created mode 0700 if missing ([`replicator::net::server::prepare_root`]),
            // before any request can create a volume in it.
            root: self.opts.state.volumes(),
            authorized: self.opts.state.peers(),
            identity: self.identity.clone(),
            net: self.opts.net,
            version: replicator::protocol::message::PROTOCOL_VERSION,
            max_entries: replicator::protocol::receiver::DEFAULT_MAX_ENTRIES,
            // An application's data volume has no business holding host device nodes.
            allow_devices: false,
            threads: 2,
            staging_max_age: replicator::net::server::DEFAULT_STAGING_MAX_AGE,
            staging_max_bytes: replicator::net::server::DEFAULT_STAGING_MAX_BYTES,
            policy: Some(self.fencing()),
        })
        .map_err(|e| e.to_string())?;
        self.recover().await?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let volumes_task = tokio::spawn(volumes.run({
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.changed().await;
            }
        }));
        let supervisor = tokio::spawn(self.clone().supervise());
        tracing::info!(%addr, fingerprint = %self.identity.fingerprint, "agent serving");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = ep.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(self.clone().connection(incoming));
                }
                () = &mut shutdown => break,
            }
        }
        supervisor.abort();
        let _ = stop_tx.send(true);
        let _ = volumes_task.await;
        ep.close(0u32.into(), b"agent shutting down");
        ep.wait_idle().await;
        Ok(())
    }

    /// After a (re)start: adopt running applications, restart the others, restore routes.
    async fn recover(self: &Arc<Self>) -> Result<(), String> {
        let mut core = self.core.lock().await;
        let names: Vec<String> = core.persisted.apps.keys().cloned().collect();
        for name in names {
            let rec = core.persisted.apps[&name].clone();
            let alive = match rec.handle.as_deref() {
                Some(h) => self.runtime.is_running(h, &name).await,
                None => false,
            };
            if alive {
                tracing::info!(app = %name, handle = ?rec.handle, "adopted running application");
            } else {
                tracing::info!(app = %name, "application not running after agent start; starting it");
                self.start_locked(&mut core, &rec.config).await?;
            }
        }
        self.save(&core.persisted).map_err(|e| e.to_string())?;
        let routes = core.persisted.routes.clone();
        drop(core);
        self.proxy.set_routes(&routes).await
    }

    async fn alive(&self, rec: &AppRecord, name: &str) -> bool {
        match rec.handle.as_deref() {
            Some(h) => self.runtime.is_running(h, name).await,
            None => false,
        }
    }

    /// Restarts applications that died.
    async fn supervise(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut core = self.core.lock().await;
            let mut dead: Vec<Application> = Vec::new();
            for (name, r) in &core.persisted.apps {
                if !self.alive(r, name).await {
                    dead.push(r.config.clone());
                }
            }
            for app in dead {
                tracing::warn!(app = %app.name, "application exited; restarting it");
                match self.start_locked(&mut core, &app).await {
                    Ok(()) => {
                        if let Some(r) = core.persisted.apps.get_mut(&app.name) {
                            r.restarts += 1;
                        }
                        let _ = self.save(&core.persisted);
                    }
                    Err(e) => tracing::error!(app = %app.name, "restart failed: {e}"),
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let Ok(conn) = incoming.await else { return };
        let Some(fp) = peer_fingerprint(&conn) else {
            return;
        };
        let authorized = TrustList::load(&self.opts.state.authorized()).unwrap_or_default();
        if !authorized.trusts(&fp, None) {
            tracing::warn!(%remote, deployer = %fp, "refused: add \"{fp}\" to {}", self.opts.state.authorized().display());
            closing::close(
                &conn,
                1u32.into(),
                format!("this agent does not know deployer {fp}; add it to the agent's authorized_deployers").as_bytes(),
            );
            return;
        }
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let agent = self.clone();
            tokio::spawn(async move {
                let response = match read_frame::<Request>(&mut recv).await {
                    Ok(req) => agent.handle(req).await,
                    Err(e) => Response::Error { message: e },
                };
                let _ = write_frame(&mut send, &response).await;
            });
        }
    }

    async fn handle(self: &Arc<Self>, req: Request) -> Response {
        let result = match req {
            Request::State => return Response::State(self.state().await),
            Request::Lease {
                holder,
                ttl_secs,
                force,
            } => {
                let mut core = self.core.lock().await;
                let now = std::time::Instant::now();
                match &core.lease {
                    Some((other, until)) if !force && *other != holder && *until > now => {
                        Err(format!(
                            "cluster busy: another deploy ({other}) is in progress; if that \
                             deploy died, rerun with --break-lease"
                        ))
                    }
                    _ => {
                        if force && core.lease.as_ref().is_some_and(|(o, _)| *o != holder) {
                            tracing::warn!(holder = %holder, "deploy lease broken by force");
                        }
                        core.lease = Some((holder, now + Duration::from_secs(ttl_secs)));
                        Ok((true, "leased".into()))
                    }
                }
            }
            Request::Unlease { holder } => {
                let mut core = self.core.lock().await;
                if core.lease.as_ref().is_some_and(|(h, _)| *h == holder) {
                    core.lease = None;
                }
                Ok((true, "released".into()))
            }
            Request::Run { application } => self.run_app(application).await,
            Request::Stop { application } => self.stop_app(&application).await,
            Request::Check { application } => self
                .runtime
                .check(&application)
                .await
                .map(|()| (false, "can run here".to_string())),
            Request::AwaitServing {
                application,
                timeout_ms,
            } => self
                .await_serving(&application, Duration::from_millis(timeout_ms))
                .await
                .map(|waited| {
                    let ms = waited.as_millis();
                    (false, format!("serving after {ms} ms"))
                }),
            Request::Push {
                application,
                to,
                peer,
                live,
            } => {
                return match self.push(&application, &to, &peer, live).await {
                    Ok(r) => Response::Pushed(r),
                    Err(PushFailed::SourceChanged(message)) => Response::SourceChanged { message },
                    Err(PushFailed::Other(message)) => Response::Error { message },
                };
            }
            Request::Release {
                application,
                to,
                epoch,
                root,
            } => self.release(&application, &to, epoch, &root).await,
            Request::Adopt {
                application,
                epoch,
                root,
            } => self.adopt(&application, epoch, &root).await,
            Request::Routes { .. } | Request::AppRoutes { .. } => {
                let mut core = self.core.lock().await;
                let routes = match req {
                    Request::AppRoutes {
                        application,
                        routes,
                    } => {
                        let mut all: Vec<_> = core
                            .persisted
                            .routes
                            .iter()
                            .filter(|r| r.application != application)
                            .cloned()
                            .collect();
                        all.extend(routes);
                        all.sort_by_key(|r| r.external);
                        all
                    }
                    Request::Routes { routes } => routes,
                    _ => unreachable!("matched above"),
                };
                let changed = core.persisted.routes != routes;
                core.persisted.routes = routes.clone();
                let saved = self
                    .opts
                    .state
                    .save(&core.persisted)
                    .map_err(|e| e.to_string());
                drop(core);
                match saved {
                    Ok(()) => self
                        .proxy
                        .set_routes(&routes)
                        .await
                        .map(|()| (changed, String::new())),
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok((changed, detail)) => Response::Ok { changed, detail },
            Err(message) => Response::Error { message },
        }
    }

    async fn state(&self) -> AgentState {
        let core = self.core.lock().await;
        let p = &core.persisted;
        let mut applications = std::collections::BTreeMap::new();
        for (name, r) in &p.apps {
            let status = AppStatus {
                config: r.config.clone(),
                running: self.alive(r, name).await,
                ports: r.ports.iter().map(|(i, a)| (*i, *a)).collect(),
                restarts: r.restarts,
            };
            applications.insert(name.clone(), status);
        }
        AgentState {
            node: SocketAddr::new(self.opts.ip, self.opts.port).to_string(),
            volume_server: self
                .opts
                .advertise_replicator
                .unwrap_or(SocketAddr::new(self.opts.ip, self.opts.replicator_port))
                .to_string(),
            fingerprint: self.fingerprint(),
            runtime: self.runtime.name().into(),
            applications,
            volumes: p
                .volumes
                .iter()
                .map(|(name, v)| {
                    (
                        name.clone(),
                        VolumeStatus {
                            owner: v.owner,
                            epoch: v.epoch,
                            handed_to: v.handed_to.clone(),
                            handed_root: v.handed_root.clone(),
                            path: self.opts.state.volume(name).display().to_string(),
                        },
                    )
                })
                .collect(),
            routes: p.routes.clone(),
        }
    }

    /// Polls until `app` serves ([`Runtime::serving`]), from 1 ms up to 20 ms between tries
    /// since during a move the wait is downtime; returns how long it took.
    async fn await_serving(&self, app: &str, timeout: Duration) -> Result<Duration, String> {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let rec = self.core.lock().await.persisted.apps.get(app).cloned();
            let Some(rec) = rec else {
                return Err(format!("{app} does not run on this node"));
            };
            let why = match rec.handle.as_deref() {
                None => "it has not started".to_string(),
                Some(handle) => match self.runtime.serving(handle, app, &rec.ports).await {
                    Ok(()) => return Ok(start.elapsed()),
                    Err(runtime::NotServing::Yet(why)) => why,
                    Err(runtime::NotServing::Exited(why)) => {
                        return Err(format!("{app} did not accept connections: {why}"));
                    }
                },
            };
            if start.elapsed() >= timeout {
                let secs = timeout.as_secs_f64();
                return Err(format!(
                    "{app} did not accept connections within {secs} s: {why}"
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    async fn run_app(self: &Arc<Self>, app: Application) -> Result<(bool, String), String> {
        let mut core = self.core.lock().await;
        if let Some(rec) = core.persisted.apps.get(&app.name) {
            let running = self.alive(rec, &app.name).await;
            if rec.config == app && running {
                return Ok((false, "already running".into()));
            }
            if rec.config != app {
                let handle = rec.handle.clone();
                if let Some(h) = handle {
                    self.runtime.stop(&h, &app.name, STOP_GRACE).await;
                }
                self.start_locked(&mut core, &app).await?;
                self.save(&core.persisted).map_err(|e| e.to_string())?;
                return Ok((true, "restarted with the new configuration".into()));
            }
        }
        let vol = core.persisted.volumes.get(&app.name).cloned();
        let mut detail = String::new();
        if app.volume.is_some() {
            match vol {
                Some(v) if !v.owner => {
                    let to = v.handed_to.as_deref().unwrap_or("another node");
                    return Err(format!(
                        "volume {} was handed to {to} at epoch {}; this node never writes it again",
                        app.name, v.epoch
                    ));
                }
                Some(_) => {}
                None if self.opts.state.volume(&app.name).exists() => {
                    return Err(format!(
                        "volume {} here is a copy this node does not own (not adopted); refusing to start {}",
                        app.name, app.name
                    ));
                }
                None => {
                    let created = create_volume(&self.opts.state.volume(&app.name))
                        .map_err(|e| e.to_string())?;
                    core.persisted.volumes.insert(
                        app.name.clone(),
                        VolumeRecord {
                            owner: true,
                            epoch: 1,
                            handed_to: None,
                            handed_root: None,
                        },
                    );
                    if created {
                        detail.push_str("volume created; ");
                    }
                }
            }
        }
        self.start_locked(&mut core, &app).await?;
        self.save(&core.persisted).map_err(|e| e.to_string())?;
        detail.push_str("started");
        Ok((true, detail))
    }

    /// Starts `app` and records it. Ports keep their previous host address if any.
    async fn start_locked(&self, core: &mut Core, app: &Application) -> Result<(), String> {
        let mut ports = core
            .persisted
            .apps
            .get(&app.name)
            .map(|r| r.ports.clone())
            .unwrap_or_default();
        ports.retain(|internal, _| app.ports.iter().any(|p| p.internal == *internal));
        for p in &app.ports {
            if let std::collections::btree_map::Entry::Vacant(slot) = ports.entry(p.internal) {
                slot.insert(self.free_port()?);
            }
        }
        let volume = self.opts.state.volume(&app.name);
        let log = self.opts.state.log(&app.name);
        let handle = self
            .runtime
            .start(&Launch {
                app,
                volume: &volume,
                ports: &ports,
                node_ip: self.opts.ip,
                log: &log,
            })
            .await?;
        let restarts = core.persisted.apps.get(&app.name).map_or(0, |r| r.restarts);
        core.persisted.apps.insert(
            app.name.clone(),
            AppRecord {
                config: app.clone(),
                ports,
                handle: Some(handle),
                restarts,
            },
        );
        Ok(())
    }

    fn free_port(&self) -> Result<SocketAddr, String> {
        let l = std::net::TcpListener::bind(SocketAddr::new(self.opts.ip, 0))
            .map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())
    }

    async fn stop_app(self: &Arc<Self>, name: &str) -> Result<(bool, String), String> {
        let mut core = self.core.lock().await;
        let Some(rec) = core.persisted.apps.remove(name) else {
            return Ok((false, "not running here".into()));
        };
        if let Some(h) = &rec.handle {
            self.runtime.stop(h, name, STOP_GRACE).await;
        }
        self.save(&core.persisted).map_err(|e| e.to_string())?;
        Ok((true, "stopped".into()))
    }
}

fn owned_of(p: &Persisted) -> std::collections::HashSet<String> {
    p.volumes
        .iter()
        .filter(|(_, v)| v.owner)
        .map(|(n, _)| n.clone())
        .collect()
}
