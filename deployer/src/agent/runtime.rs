//! The runtimes an agent can run applications with, behind one interface.

use std::sync::Arc;
use std::time::Duration;

use super::docker::DockerRuntime;
use super::process::{Launch, ProcessRuntime};

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
