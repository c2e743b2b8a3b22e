//! The runtimes an agent can run applications with, behind one interface.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::docker::DockerRuntime;
use super::process::{Launch, ProcessRuntime};

/// How long one connection attempt of [`Runtime::serving`] may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why an application does not serve (yet).
#[derive(Debug)]
pub enum NotServing {
    /// Starting: a port that refuses connections, a health check not passed yet.
    Yet(String),
    /// It stopped running: waiting longer will not help.
    Exited(String),
}

pub enum Runtime {
    Process(Arc<ProcessRuntime>),
    Docker(DockerRuntime),
}

impl Runtime {
    pub fn name(&self) -> &'static str {
        match self {
            Runtime::Process(_) => "process",
            Runtime::Docker(_) => "docker",
        }
    }

    /// Starts the application; returns the handle to record (pid or container id).
    pub async fn start(&self, l: &Launch<'_>) -> Result<String, String> {
        match self {
            Runtime::Process(p) => p.start(l),
            Runtime::Docker(d) => d.start(l).await,
        }
    }

    pub async fn is_running(&self, handle: &str, app: &str) -> bool {
        match self {
            Runtime::Process(p) => p.is_running(handle, app),
            Runtime::Docker(d) => d.is_running(handle).await,
        }
    }

    /// Whether `app` could start here: its image is present (docker) or its command found
    /// (process). Checked on the destination before an application is stopped to move.
    pub async fn check(&self, app: &crate::config::Application) -> Result<(), String> {
        match self {
            Runtime::Process(_) => {
                let Some(cmd) = app.command.first() else {
                    return Err(format!("application {} has no `command`", app.name));
                };
                let found = if cmd.contains('/') {
                    std::path::Path::new(cmd).is_file()
                } else {
                    std::env::var_os("PATH")
                        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
                };
                if found {
                    Ok(())
                } else {
                    Err(format!("command {cmd} of {} is not found here", app.name))
                }
            }
            Runtime::Docker(d) => d.check_image(&app.image).await,
        }
    }

    /// Whether `app`, started as `handle` with `ports` (internal port → where this node
    /// publishes it), serves: it still runs, its image's health check passed if it has one,
    /// and every port accepts a connection at the application itself. For a container that
    /// is its own address and internal port, not the published one, which Docker's proxy
    /// accepts before the application listens. `Err` with the reason while it does not;
    /// [`NotServing::Exited`] when it will not without a restart.
    pub async fn serving(
        &self,
        handle: &str,
        app: &str,
        ports: &BTreeMap<u16, SocketAddr>,
    ) -> Result<(), NotServing> {
        let own_ip = match self {
            Runtime::Process(p) => {
                if !p.is_running(handle, app) {
                    return Err(NotServing::Exited("its process exited".into()));
                }
                None
            }
            Runtime::Docker(d) => {
                let r = d.readiness(handle).await.map_err(NotServing::Exited)?;
                if let Some(why) = r.unhealthy {
                    return Err(NotServing::Yet(why));
                }
                r.own_ip
            }
        };
        for (&internal, &published) in ports {
            let at = own_ip.map_or(published, |ip| SocketAddr::new(ip, internal));
            let connect = tokio::net::TcpStream::connect(at);
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(NotServing::Yet(format!(
                        "its port {internal} ({at}) does not accept connections: {e}"
                    )));
                }
                Err(_) => {
                    return Err(NotServing::Yet(format!(
                        "its port {internal} ({at}) does not answer"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Graceful stop (SIGTERM / `docker stop`), then kill after `grace`.
    pub async fn stop(&self, handle: &str, app: &str, grace: Duration) {
        match self {
            Runtime::Process(p) => {
                let (p, h, a) = (p.clone(), handle.to_string(), app.to_string());
                let _ = tokio::task::spawn_blocking(move || p.stop(&h, &a, grace)).await;
            }
            Runtime::Docker(d) => d.stop(handle, grace).await,
        }
    }
}
