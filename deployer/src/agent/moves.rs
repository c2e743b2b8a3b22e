//! The agent's part of moving an application: pushing its volume to another node, and the
//! fenced handoff of ownership (see docs/migration.md).
//!
//! Fencing rules enforced here: a node hands a volume away only while the application is
//! stopped, and from then on refuses to start it; a node adopts a volume only when its copy
//! is recorded complete with exactly the digest the source had, and only at a newer epoch;
//! the volume server refuses any push into a volume this node owns.

use std::sync::Arc;

use replicator::net::client::{ClientOptions, push};
use replicator::net::identity::{Fingerprint, TrustList};
use replicator::net::open::{Direction, RemoteSpec, VolumeName};
use replicator::net::server::Policy;
use replicator::state::SyncStatus;
use replicator::sync::SyncOptions;

use super::Agent;
use super::state::{Persisted, VolumeRecord};
use crate::api::PushReport;

/// Why a push failed.
pub(super) enum PushFailed {
    /// The application changed what was being copied (see [`crate::api::Response`]).
    SourceChanged(String),
    Other(String),
}

impl From<String> for PushFailed {
    fn from(message: String) -> Self {
        PushFailed::Other(message)
    }
}

impl Agent {
    /// Saves the state durably and refreshes the fencing set.
    pub(super) fn save(&self, p: &Persisted) -> std::io::Result<()> {
        self.opts.state.save(p)?;
        if let Ok(mut owned) = self.owned.lock() {
            *owned = super::owned_of(p);
        }
        Ok(())
    }

    /// The volume server's check: no push into a volume this node owns.
    pub(super) fn fencing(&self) -> Policy {
        let owned = self.owned.clone();
        Policy(Arc::new(move |volume: &str, direction: Direction| {
            let mine = owned.lock().map(|o| o.contains(volume)).unwrap_or(true);
            if direction == Direction::Push && mine {
                Err(format!(
                    "volume {volume} is owned by this node; it refuses incoming pushes into it"
                ))
            } else {
                Ok(())
            }
        }))
    }

    /// Syncs the application's volume to the peer agent's volume server.
    pub(super) async fn push(
        &self,
        app: &str,
        to: &str,
        peer: &str,
        live: bool,
    ) -> Result<PushReport, PushFailed> {
        {
            let core = self.core.lock().await;
            match core.persisted.volumes.get(app) {
                Some(v) if v.owner => {}
                _ => {
                    return Err(PushFailed::Other(format!(
                        "this node does not own volume {app}; it cannot push it"
                    )));
                }
            }
        }
        let fp = Fingerprint::parse(peer)?;
        let mut trusted = TrustList::new();
        trusted.add(fp);
        let (host, port) = to
            .rsplit_once(':')
            .ok_or_else(|| format!("bad address {to}"))?;
        let remote = RemoteSpec {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: port.parse().map_err(|_| format!("bad address {to}"))?,
            volume: VolumeName::new(app)?,
        };
        let mut client =
            ClientOptions::new(self.identity.clone(), trusted, self.opts.state.peers());
        client.net = self.opts.net;
        let opts = SyncOptions {
            compress: replicator::protocol::compression::Compression::Auto,
            state_dir: self.opts.state.0.join("replicator"),
            threads: 2,
            // Nothing uses the volume at the new node until the move is over, and a
            // database's final delta is a few changed ranges of big files: patching them
            // in place shortens the pause. A crash mid-patch leaves the copy incomplete,
            // and the move does not hand over an incomplete copy.
            inplace: true,
            live,
            ..SyncOptions::default()
        };
        let src = self.opts.state.volume(app);
        let summary = tokio::task::spawn_blocking(move || {
            push(
                &src,
                &remote,
                &opts,
                &client,
                &replicator::progress::NoProgress,
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            let message = format!("pushing volume {app} to {to}: {e}");
            match e.source_changed() {
                true => PushFailed::SourceChanged(message),
                false => PushFailed::Other(message),
            }
        })?;
        Ok(PushReport {
            bytes_sent_wire: summary.bytes_sent_wire,
            bytes_sent_raw: summary.bytes_sent_raw,
            chunks_sent: summary.chunks_sent,
            bytes_read: summary.bytes_read,
            duration_ms: summary.duration_ms,
            root: summary.root,
            files_unfinished: summary.files_unfinished,
            chunks_stale: summary.chunks_stale,
        })
    }

    pub(super) async fn release(
        &self,
        app: &str,
        to: &str,
        epoch: u64,
        root: &str,
    ) -> Result<(bool, String), String> {
        let mut core = self.core.lock().await;
        if core.persisted.apps.contains_key(app) {
            return Err(format!(
                "{app} still runs here; stop it before handing its volume away"
            ));
        }
        let v = core
            .persisted
            .volumes
            .get_mut(app)
            .ok_or_else(|| format!("no volume {app} here"))?;
        if !v.owner && v.handed_to.as_deref() == Some(to) && v.epoch == epoch {
            return Ok((false, format!("already handed to {to} at epoch {epoch}")));
        }
        if !v.owner || epoch <= v.epoch {
            return Err(format!(
                "refusing to hand volume {app} to {to} at epoch {epoch}: this node is at epoch {}{}",
                v.epoch,
                if v.owner { "" } else { " and does not own it" }
            ));
        }
        *v = VolumeRecord {
            owner: false,
            epoch,
            handed_to: Some(to.to_string()),
            handed_root: Some(root.to_string()),
        };
        self.save(&core.persisted).map_err(|e| e.to_string())?;
        Ok((true, format!("handed to {to} at epoch {epoch}")))
    }

    pub(super) async fn adopt(
        &self,
        app: &str,
        epoch: u64,
        root: &str,
    ) -> Result<(bool, String), String> {
        let mut core = self.core.lock().await;
        if let Some(v) = core.persisted.volumes.get(app) {
            if v.owner && v.epoch == epoch {
                return Ok((false, format!("already owned at epoch {epoch}")));
            }
            if epoch <= v.epoch {
                return Err(format!(
                    "refusing volume {app} at epoch {epoch}: this node already knows epoch {}",
                    v.epoch
                ));
            }
        }
        // The volume server records a completed, verified sync as "complete, root R".
        let path = self
            .opts
            .state
            .volume(app)
            .canonicalize()
            .map_err(|e| format!("volume {app}: {e}"))?;
        let server_state = replicator::state::StateDir::new(
            self.opts.state.volumes().join(".replicator").join("state"),
        );
        match server_state.target(&path).read().map(|s| s.status) {
            Some(SyncStatus::Complete { root: got, .. }) if got == root => {}
            Some(SyncStatus::Complete { root: got, .. }) => {
                return Err(format!(
                    "volume {app} here has digest {got}, the source's is {root}; not adopting"
                ));
            }
            _ => {
                return Err(format!(
                    "volume {app} here is not a complete copy; not adopting"
                ));
            }
        }
        core.persisted.volumes.insert(
            app.to_string(),
            VolumeRecord {
                owner: true,
                epoch,
                handed_to: None,
                handed_root: None,
            },
        );
        self.save(&core.persisted).map_err(|e| e.to_string())?;
        Ok((true, format!("owned at epoch {epoch}")))
    }
}
