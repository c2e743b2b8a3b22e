//! Durable bookkeeping kept outside the volumes: sync state, indexes, and how it is written.
//!
//! Layout under the state directory (default `$XDG_STATE_HOME/replicator`, else
//! `~/.local/state/replicator`; `--state-dir` or `REPLICATOR_STATE_DIR` override it):
//!
//! ```text
//! sources/<id>.index      sender quick-check index of a source volume
//! sources/<id>.manifests/ the manifests of the source's last few completed syncs, by root
//! targets/<id>/state.json the destination's sync state: incomplete, or complete with root R
//! targets/<id>/index      receiver index: which destination file holds which chunks
//! targets/<id>/manifest   the manifest the destination was completed at (delta base)
//! ```
//! `<id>` is derived from the volume's canonical path. Nothing is ever stored inside a volume,
//! so an application sees no files of ours. Every state file is replaced atomically: temp file,
//! fsync, rename, fsync of the directory (trap: never rewrite a state file in place).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::codec::to_hex;
use crate::manifest::RootDigest;

/// Writes `data` to `path` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut file = PendingFile::create(path)?;
    file.write_all(data)?;
    file.commit(path, true)
}

/// A file written as a stream under a temp name next to where it will go; [`PendingFile::commit`]
/// renames it into place. Dropped uncommitted, it removes the temp file, so nothing
/// half-written is ever found under the final name.
pub struct PendingFile {
    out: Option<io::BufWriter<File>>,
    tmp: PathBuf,
}

impl PendingFile {
    /// Starts a file that will replace `path` (creating its directory if need be).
    pub fn create(path: &Path) -> io::Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let tmp = temp_name(path);
        let out = io::BufWriter::with_capacity(256 * 1024, File::create(&tmp)?);
        Ok(PendingFile {
            out: Some(out),
            tmp,
        })
    }

    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.as_mut().expect("not committed").write_all(data)
    }

    /// The file as written so far, opened for reading.
    pub fn reopen(&mut self) -> io::Result<File> {
        self.out.as_mut().expect("not committed").flush()?;
        File::open(&self.tmp)
    }

    /// Puts the file at `path`. `durable`: its data and the rename are fsynced first (a cache
    /// that is cheap to lose need not be).
    pub fn commit(mut self, path: &Path, durable: bool) -> io::Result<()> {
        let out = self.out.take().expect("committed once");
        let file = out.into_inner().map_err(|e| e.into_error())?;
        if durable {
            file.sync_all()?;
        }
        let committed = fs::rename(&self.tmp, path);
        if committed.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        committed?;
        match path.parent() {
            Some(dir) if durable => fsync_dir(dir),
            _ => Ok(()),
        }
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A fresh temp name next to `path`, unique per call: two sessions of one server may save
/// the same file at once (the last rename wins; neither sees the other's half-written file).
fn temp_name(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Where the state of a volume pair lives.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: PathBuf) -> Self {
        StateDir { root }
    }

    /// `--state-dir`, else `$REPLICATOR_STATE_DIR`, else the XDG state directory.
    pub fn default_location() -> PathBuf {
        if let Some(dir) = std::env::var_os("REPLICATOR_STATE_DIR") {
            return PathBuf::from(dir);
        }
        if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
            return PathBuf::from(dir).join("replicator");
        }
        let home =
            std::env::var_os("HOME").map_or_else(|| PathBuf::from("/var/lib"), PathBuf::from);
        home.join(".local/state/replicator")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn key(canonical: &Path) -> String {
        let h = blake3::hash(canonical.as_os_str().as_encoded_bytes());
        to_hex(&h.as_bytes()[..12])
    }

    pub fn source(&self, canonical_src: &Path) -> SourceState {
        let stem = self.root.join("sources").join(Self::key(canonical_src));
        SourceState {
            index: stem.with_extension("index"),
            manifests: stem.with_extension("manifests"),
        }
    }

    pub fn target(&self, canonical_dst: &Path) -> TargetState {
        TargetState {
            dir: self.root.join("targets").join(Self::key(canonical_dst)),
        }
    }
}

/// The files describing one source volume.
#[derive(Clone, Debug)]
pub struct SourceState {
    /// Quick-check index: which files are unchanged since they were last chunked.
    pub index: PathBuf,
    /// The manifests of the last few syncs a receiver completed, named by root: the bases
    /// of the next deltas (see [`crate::manifest::store::Shelf`]).
    pub manifests: PathBuf,
}

/// The files describing one destination volume.
#[derive(Clone, Debug)]
pub struct TargetState {
    pub dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum SyncStatus {
    /// A sync started and has not finished: the volume may be partly updated.
    Incomplete { started_unix: u64 },
    /// Data and directories were fsynced and the volume's digest equals `root`.
    Complete { root: String, finished_unix: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStateFile {
    pub path: PathBuf,
    #[serde(flatten)]
    pub status: SyncStatus,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TargetState {
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn index_file(&self) -> PathBuf {
        self.dir.join("index")
    }

    /// What the last run that stopped before its commit recorded of its big temp files
    /// (`apply/partials.rs`).
    pub fn partials_file(&self) -> PathBuf {
        self.dir.join("partials")
    }

    /// The manifest the volume was last completed at: the base of the next delta.
    pub fn manifest_file(&self) -> PathBuf {
        self.dir.join("manifest")
    }

    /// Removes the receiver index, durably. Done before a run writes into a file at its
    /// final name (a patch, a disk image): a power cut can leave such a file holding new
    /// bytes under its old stat, which the index would go on vouching for. Without the
    /// index, the next run reads the destination's files back; a run that completes writes
    /// a new one.
    pub fn drop_index(&self) -> io::Result<()> {
        match fs::remove_file(self.index_file()) {
            Ok(()) => fsync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn read(&self) -> Option<SyncStateFile> {
        let bytes = fs::read(self.state_file()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn mark_incomplete(&self, volume: &Path) -> io::Result<()> {
        self.write(&SyncStateFile {
            path: volume.to_path_buf(),
            status: SyncStatus::Incomplete {
                started_unix: unix_now(),
            },
        })
    }

    pub fn mark_complete(&self, volume: &Path, root: RootDigest) -> io::Result<()> {
        self.write(&SyncStateFile {
            path: volume.to_path_buf(),
            status: SyncStatus::Complete {
                root: root.to_hex(),
                finished_unix: unix_now(),
            },
        })
    }

    fn write(&self, s: &SyncStateFile) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(s).map_err(io::Error::other)?;
        write_atomic(&self.state_file(), &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().to_path_buf());
        let t = sd.target(Path::new("/some/volume"));
        assert!(t.read().is_none());
        t.mark_incomplete(Path::new("/some/volume")).unwrap();
        assert!(matches!(
            t.read().unwrap().status,
            SyncStatus::Incomplete { .. }
        ));
        t.mark_complete(Path::new("/some/volume"), RootDigest([1; 32]))
            .unwrap();
        match t.read().unwrap().status {
            SyncStatus::Complete { root, .. } => assert_eq!(root, to_hex(&[1; 32])),
            s => panic!("unexpected {s:?}"),
        }
        let leftovers: Vec<_> = fs::read_dir(&t.dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp files left behind");
    }
}
