//! The `docker` runtime: containers through the Docker Engine API on its unix socket
//! (bollard). The image must already be on the node (no registry is assumed); the volume
//! directory is bind-mounted at the application's mountpoint; each internal port is
//! published on this node's address at the port the agent allocated; memory and CPU limits
//! map to the container's; labels `deployer.app` / `deployer.node` let the agent find its
//! containers again after a restart.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, RemoveContainerOptions, StopContainerOptions,
};

use super::process::{Launch, link_env};

/// What [`DockerRuntime::readiness`] found of a running container.
pub struct Readiness {
    /// Why its image's own health check does not pass yet, if it has one that does not.
    pub unhealthy: Option<String>,
    /// The container's address on its network.
    pub own_ip: Option<std::net::IpAddr>,
}

pub struct DockerRuntime {
    docker: Docker,
    node: String,
}

impl DockerRuntime {
    /// Connects to the local engine (`DOCKER_HOST=unix://…` or /var/run/docker.sock) and
    /// settles on the API version it speaks.
    pub async fn connect(node: &str) -> Result<DockerRuntime, String> {
        let docker = Docker::connect_with_unix_defaults()
            .map_err(|e| format!("cannot reach the Docker engine: {e}"))?
            .negotiate_version()
            .await
            .map_err(|e| format!("cannot reach the Docker engine: {e}"))?;
        docker
            .ping()
            .await
            .map_err(|e| format!("the Docker engine does not answer: {e}"))?;
        Ok(DockerRuntime {
            docker,
            node: node.to_string(),
        })
    }

    fn container_name(app: &str) -> String {
        format!("deployer-{app}")
    }

    /// The image must be on this node: no registry is assumed.
    pub async fn check_image(&self, image: &str) -> Result<(), String> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(format!(
                "image {image} is not on node {} (no registry is assumed: build or load it there first)",
                self.node
            )),
            Err(e) => Err(format!(
                "node {}: cannot inspect image {image}: {e}",
                self.node
            )),
        }
    }

    pub async fn start(&self, l: &Launch<'_>) -> Result<String, String> {
        let app = l.app;
        self.check_image(&app.image).await?;
        let name = Self::container_name(&app.name);
        // A leftover container of an earlier run (agent killed mid-way) would hold the name.
        let _ = self
            .docker
            .remove_container(
                &name,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        let mut env: Vec<String> = app
            .environment
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push(format!("DEPLOYER_APP={}", app.name));
        env.extend(
            link_env(app, l.node_ip)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}")),
        );
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        let mut exposed = Vec::new();
        for (internal, host) in l.ports {
            let key = format!("{internal}/tcp");
            exposed.push(key.clone());
            bindings.insert(
                key,
                Some(vec![PortBinding {
                    host_ip: Some(host.ip().to_string()),
                    host_port: Some(host.port().to_string()),
                }]),
            );
        }
        let binds = app
            .volume
            .as_ref()
            .map(|m| vec![format!("{}:{}", l.volume.display(), m.display())]);
        let labels = HashMap::from([
            ("deployer.app".to_string(), app.name.clone()),
            ("deployer.node".to_string(), self.node.clone()),
        ]);
        let body = ContainerCreateBody {
            image: Some(app.image.clone()),
            cmd: (!app.command.is_empty()).then(|| app.command.clone()),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(exposed),
            host_config: Some(HostConfig {
                binds,
                // An init process as PID 1 forwards SIGTERM: a bare static binary as PID 1
                // would ignore it and every stop would wait out the grace period.
                init: Some(true),
                port_bindings: Some(bindings),
                memory: app.mem_limit.map(|m| m as i64),
                cpu_shares: app.cpu_shares.map(|c| c as i64),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::ON_FAILURE),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| {
                format!(
                    "node {}: cannot create container for {}: {e}",
                    self.node, app.name
                )
            })?;
        self.docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| format!("node {}: cannot start {}: {e}", self.node, app.name))?;
        Ok(created.id)
    }

    pub async fn is_running(&self, handle: &str) -> bool {
        match self
            .docker
            .inspect_container(handle, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => c.state.and_then(|s| s.running).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Whether the container still runs and, if its image has a `HEALTHCHECK`, whether that
    /// passed; and the container's own address, where its application listens behind the
    /// published ports (Docker's userland proxy accepts on those before the application
    /// does). `None` for a container without one (host networking).
    pub async fn readiness(&self, handle: &str) -> Result<Readiness, String> {
        use bollard::models::HealthStatusEnum;
        let c = self
            .docker
            .inspect_container(handle, None::<InspectContainerOptions>)
            .await
            .map_err(|e| format!("cannot inspect its container: {e}"))?;
        let state = c.state.unwrap_or_default();
        if state.running != Some(true) {
            return Err(format!(
                "its container is not running (exit code {})",
                state.exit_code.unwrap_or(-1)
            ));
        }
        let health = match state.health.and_then(|h| h.status) {
            Some(HealthStatusEnum::STARTING) => Some("starting"),
            Some(HealthStatusEnum::UNHEALTHY) => Some("unhealthy"),
            _ => None,
        };
        let own_ip = c
            .network_settings
            .and_then(|n| n.networks)
            .into_iter()
            .flat_map(|nets| nets.into_values())
            .filter_map(|net| net.ip_address)
            .find_map(|ip| ip.parse().ok());
        Ok(Readiness {
            unhealthy: health.map(|h| format!("its image's health check says {h}")),
            own_ip,
        })
    }

    /// `docker stop` with the grace period, then removal.
    pub async fn stop(&self, handle: &str, grace: std::time::Duration) {
        let _ = self
            .docker
            .stop_container(
                handle,
                Some(StopContainerOptions {
                    t: Some(grace.as_secs() as i32),
                    ..Default::default()
                }),
            )
            .await;
        let _ = self
            .docker
            .remove_container(
                handle,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
    }
}
