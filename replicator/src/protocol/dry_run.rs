//! Dry runs (`replicator sync --dry-run`): what a sync would change, with nothing changed.
//!
//! Either end may ask, in its `Hello`: the sender for a push or a local sync, the receiver
//! for a pull. The receiver then walks the destination and plans every entry exactly as for
//! a real sync, but instead of asking for chunks it sends the sender each planned
//! [`Change`] and, at the end, what the sync would move ([`Outcome`]); the session ends there.
//! Neither end writes anything: not the destination, not its state (no *incomplete* mark,
//! no kept manifest), not the source's index. A peer that predates dry runs refuses the
//! hello flag instead of running a real sync.

use std::fmt;

use super::message::DoneStats;
use crate::codec::{DecodeError, Reader, Writer};
use crate::manifest::{self, RelPath};

/// Whether a session may be a dry run, as one end sees it. Only the end the user runs
/// decides: a peer that could turn a real sync into a dry run would have its client report
/// a copy as done that never happened (a migration would then move to an empty volume).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DryRun {
    /// A real sync; a peer asking for a dry run is refused.
    #[default]
    Refuse,
    /// This end asks for one.
    Ask,
    /// The peer decides (a server: its client chose).
    PeerDecides,
}

impl DryRun {
    /// The user's `--dry-run`.
    pub fn asked(yes: bool) -> DryRun {
        if yes { DryRun::Ask } else { DryRun::Refuse }
    }

    /// Whether the session is a dry run, given whether the peer asked for one.
    pub fn agree(self, peer_asks: bool) -> Result<bool, String> {
        match (self, peer_asks) {
            (DryRun::Refuse, true) => {
                Err("the peer asked for a dry run, which this end did not".into())
            }
            (DryRun::Ask, _) => Ok(true),
            (_, peer_asks) => Ok(peer_asks),
        }
    }
}

/// Most changes in one `Changes` message.
pub const MAX_CHANGES: usize = 1024;
/// A `Changes` message is sent once its paths reach this many bytes.
pub const CHANGES_BATCH_BYTES: usize = 64 * 1024;

/// What a sync would do to one path of the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The path does not exist yet.
    Create,
    /// The path exists and would be replaced: a file's contents rewritten, a symlink or
    /// special file re-created, a directory replacing a file or the other way round.
    Update,
    /// Only owner, mode, times or extended attributes would be set.
    Attrs,
    /// The source no longer has it.
    Delete,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Attrs => "attrs",
            Action::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub action: Action,
    /// The path is (for a deletion: was) a directory.
    pub dir: bool,
    pub path: RelPath,
}

/// One line per change, as `replicator sync --dry-run` prints it: the action, then the path
/// (a directory's with a trailing `/`).
impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slash = if self.dir && !self.path.is_root() {
            "/"
        } else {
            ""
        };
        write!(f, "{:<7} {}{slash}", self.action.name(), self.path)
    }
}

/// What the sync would move, sent by the receiver after the last change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Distinct chunks the receiver would ask for, and their bytes before compression.
    pub chunks_wanted: u64,
    pub bytes_wanted: u64,
    /// Files that would be written and paths deleted (as `Done` reports them after a sync),
    /// and bytes the receiver would copy from what it holds.
    pub stats: DoneStats,
}

pub(super) fn encode_changes(w: &mut Writer, changes: &[Change]) {
    w.varint(changes.len() as u64);
    for c in changes {
        let action = match c.action {
            Action::Create => 0,
            Action::Update => 1,
            Action::Attrs => 2,
            Action::Delete => 3,
        };
        w.u8(action | (u8::from(c.dir) << 2));
        w.bytes(c.path.as_bytes());
    }
}

pub(super) fn decode_changes(r: &mut Reader<'_>) -> Result<Vec<Change>, DecodeError> {
    let n = r.varint_max("change count", MAX_CHANGES as u64)? as usize;
    let mut changes = Vec::with_capacity(n);
    for _ in 0..n {
        let tag = r.u8()?;
        let action = match tag & 3 {
            0 => Action::Create,
            1 => Action::Update,
            2 => Action::Attrs,
            _ => Action::Delete,
        };
        if tag > 7 {
            return Err(DecodeError::UnknownTag {
                what: "change",
                tag: u64::from(tag),
            });
        }
        changes.push(Change {
            action,
            dir: tag & 4 != 0,
            path: manifest::rel_path(r, "changed path")?,
        });
    }
    Ok(changes)
}

pub(super) fn encode_outcome(w: &mut Writer, o: &Outcome) {
    w.varint(o.chunks_wanted);
    w.varint(o.bytes_wanted);
    w.varint(o.stats.files_written);
    w.varint(o.stats.files_patched);
    w.varint(o.stats.deleted);
    w.varint(o.stats.bytes_copied_locally);
}

pub(super) fn decode_outcome(r: &mut Reader<'_>) -> Result<Outcome, DecodeError> {
    Ok(Outcome {
        chunks_wanted: r.varint()?,
        bytes_wanted: r.varint()?,
        stats: DoneStats {
            files_written: r.varint()?,
            files_patched: r.varint()?,
            deleted: r.varint()?,
            bytes_copied_locally: r.varint()?,
        },
    })
}

/// Changes on their way to the sender, in messages of at most [`MAX_CHANGES`] changes or
/// about [`CHANGES_BATCH_BYTES`] of paths.
#[derive(Debug, Default)]
pub struct ChangeBatch {
    changes: Vec<Change>,
    bytes: usize,
}

impl ChangeBatch {
    /// Adds `change`; returns a full batch to send, if this one filled it.
    pub fn push(&mut self, change: Change) -> Option<Vec<Change>> {
        self.bytes += change.path.as_bytes().len();
        self.changes.push(change);
        (self.changes.len() >= MAX_CHANGES || self.bytes >= CHANGES_BATCH_BYTES)
            .then(|| self.take())
    }

    /// What is left, if anything.
    pub fn rest(&mut self) -> Option<Vec<Change>> {
        (!self.changes.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> Vec<Change> {
        self.bytes = 0;
        std::mem::take(&mut self.changes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report
    use super::*;

    fn path(p: &str) -> RelPath {
        RelPath::new(p.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn changes_print_as_action_then_path_with_a_slash_for_directories() {
        let c = |action, dir, p| Change {
            action,
            dir,
            path: path(p),
        };
        assert_eq!(c(Action::Create, false, "a/b").to_string(), "create  a/b");
        assert_eq!(c(Action::Delete, true, "old").to_string(), "delete  old/");
        assert_eq!(c(Action::Attrs, true, "").to_string(), "attrs   .");
        assert_eq!(c(Action::Update, false, "x").to_string(), "update  x");
    }

    #[test]
    fn only_the_end_that_asks_or_lets_its_peer_decide_agrees_to_a_dry_run() {
        assert_eq!(DryRun::Ask.agree(false), Ok(true));
        assert_eq!(DryRun::Ask.agree(true), Ok(true));
        assert_eq!(DryRun::PeerDecides.agree(true), Ok(true));
        assert_eq!(DryRun::PeerDecides.agree(false), Ok(false));
        assert_eq!(DryRun::Refuse.agree(false), Ok(false));
        assert!(DryRun::Refuse.agree(true).is_err());
        assert_eq!(DryRun::asked(true), DryRun::Ask);
        assert_eq!(DryRun::default(), DryRun::Refuse);
    }

    #[test]
    fn a_batch_is_full_at_its_count_or_its_bytes() {
        let mut batch = ChangeBatch::default();
        let change = |p: &str| Change {
            action: Action::Create,
            dir: false,
            path: path(p),
        };
        for i in 0..MAX_CHANGES - 1 {
            assert!(batch.push(change(&format!("f{i}"))).is_none());
        }
        assert_eq!(batch.push(change("last")).unwrap().len(), MAX_CHANGES);
        assert!(batch.rest().is_none(), "a sent batch starts empty");
        let long = "d/".repeat(1000) + "f";
        let mut sent = 0;
        for _ in 0..40 {
            if let Some(full) = batch.push(change(&long)) {
                sent += full.len();
            }
        }
        assert!(
            sent > 0,
            "long paths fill a batch by bytes before its count"
        );
        assert_eq!(sent + batch.rest().unwrap().len(), 40);
    }
}
