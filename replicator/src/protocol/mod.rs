//! The sync session: who says what, in which order, and what each side checks.
//!
//! ```text
//! sender                               receiver
//!   Hello  ──────────────────────────▶
//!          ◀──────────────────────────  Hello
//!   Entry* ManifestEnd{root} ────────▶  (plans each entry; checks the manifest digest)
//!          ◀──────────────────────────  Want* WantEnd
//!   Chunk* ChunksEnd ────────────────▶  (verifies, writes, commits, re-digests)
//!          ◀──────────────────────────  Done{root} | Error
//! ```
//! A dry run ([`dry_run`]) ends after the manifest: the receiver answers `Changes*
//! DryRunEnd` in place of its wants, and nothing is written.
//! [`message`] defines the messages and their framing; [`phase`] is the I/O-free rulebook of
//! which message may come next; [`sender`] and [`receiver`] drive a session over any
//! [`crate::transport`].

pub mod compression;
pub mod dry_run;
pub mod message;
pub mod phase;
pub mod receiver;
pub mod sender;

use crate::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("peer reported: {0}")]
    Peer(String),
    /// Valid data this receiver will not apply (a device node a server was not told to accept).
    #[error("refused: {0}")]
    Refused(String),
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    Version { ours: u32, theirs: u32 },
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Serve(#[from] crate::snapshot::ServeError),
    #[error(transparent)]
    Apply(#[from] crate::apply::ApplyError),
    #[error(transparent)]
    Delta(#[from] crate::manifest::delta::DeltaError),
    #[error("the receiver reports digest {got}, the source's is {want}")]
    DigestMismatch {
        got: crate::manifest::RootDigest,
        want: crate::manifest::RootDigest,
    },
}

impl SessionError {
    /// True when the session broke (connection lost) rather than failed on purpose: partial
    /// data is then kept so a rerun resumes.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            SessionError::Transport(TransportError::Closed | TransportError::Other(_))
        )
    }
}
