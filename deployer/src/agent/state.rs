//! What an agent records durably under `--state`, replaced atomically on every change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::Route;
use crate::config::Application;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppRecord {
    pub config: Application,
    /// internal port → where the application listens on this node.
    pub ports: BTreeMap<u16, SocketAddr>,
    /// The supervised process (process runtime) or container id (docker runtime).
    pub handle: Option<String>,
    pub restarts: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// This node may write the volume (run its application).
    pub owner: bool,
    /// Ownership generation; higher wins (see docs/migration.md).
    pub epoch: u64,
    /// The node this volume was handed to (this node then never writes it again).
    #[serde(default)]
    pub handed_to: Option<String>,
    /// Digest of the volume when it was handed away.
    #[serde(default)]
    pub handed_root: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub apps: BTreeMap<String, AppRecord>,
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub routes: Vec<Route>,
}

/// The agent's state directory.
#[derive(Clone, Debug)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    pub fn file(&self) -> PathBuf {
        self.0.join("agent.json")
    }
    pub fn identity(&self) -> PathBuf {
        self.0.join("identity")
    }
    /// Deployer identities allowed to command this agent.
    pub fn authorized(&self) -> PathBuf {
        self.0.join("authorized_deployers")
    }
    /// Peer agents allowed to push volumes here.
    pub fn peers(&self) -> PathBuf {
        self.0.join("authorized_peers")
    }
    pub fn volumes(&self) -> PathBuf {
        self.0.join("volumes")
    }
    pub fn volume(&self, app: &str) -> PathBuf {
        self.volumes().join(app)
    }
    pub fn log(&self, app: &str) -> PathBuf {
        self.0.join("logs").join(format!("{app}.log"))
    }

    pub fn load(&self) -> std::io::Result<Persisted> {
        match std::fs::read(self.file()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Persisted::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, p: &Persisted) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(p).map_err(std::io::Error::other)?;
        replicator::state::write_atomic(&self.file(), &json)
    }
}

/// Creates `path` and makes its creation durable.
pub fn create_volume(path: &Path) -> std::io::Result<bool> {
    if path.is_dir() {
        return Ok(false);
    }
    std::fs::create_dir_all(path)?;
    if let Some(parent) = path.parent() {
        replicator::state::fsync_dir(parent)?;
    }
    Ok(true)
}
