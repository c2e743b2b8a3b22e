//! Which message may come next, as a pure state machine for each role.
//!
//! The session drivers feed every received message through [`ReceiverPhase::accept`] or
//! [`SenderPhase::accept`] before acting on it, so an out-of-order or unexpected message from a
//! peer (buggy or hostile) is a clear protocol error, never a confused state. These machines do
//! no I/O and are tested exhaustively below.

use super::message::Message;

/// What the receiving side expects next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverPhase {
    Hello,
    Manifest,
    /// The manifest of a streamed session: each file's chunks follow its entry.
    StreamedManifest,
    /// The manifest of a delta session: changed entries and removed paths.
    DeltaManifest,
    Chunks,
    Finished,
}

/// What the sending side expects next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SenderPhase {
    Hello,
    Wants,
    /// A dry run's changes, instead of wants ([`super::dry_run`]).
    Changes,
    Outcome,
    Finished,
}

fn unexpected(phase: impl std::fmt::Debug, msg: &Message) -> String {
    format!(
        "unexpected {} message while expecting {phase:?}",
        msg.name()
    )
}

impl ReceiverPhase {
    /// Checks `msg` against the current phase and returns the next phase.
    pub fn accept(self, msg: &Message) -> Result<ReceiverPhase, String> {
        use ReceiverPhase::*;
        match (self, msg) {
            (_, Message::Error { .. }) => Ok(Finished),
            (Hello, Message::Hello(_)) => Ok(Manifest),
            (Manifest, Message::Entry(_)) => Ok(Manifest),
            (Manifest, Message::ManifestEnd { .. }) => Ok(Chunks),
            // A `Stale` stands in for a chunk (the receiver refuses it outside live sessions).
            (StreamedManifest, Message::Entry(_) | Message::Chunk(_) | Message::Stale(_)) => {
                Ok(StreamedManifest)
            }
            (StreamedManifest, Message::ManifestEnd { .. }) => Ok(Chunks),
            (DeltaManifest, Message::Entry(_) | Message::Removed(_) | Message::Patch(_)) => {
                Ok(DeltaManifest)
            }
            (DeltaManifest, Message::ManifestEnd { .. }) => Ok(Chunks),
            (Chunks, Message::Chunk(_) | Message::Suffix(_) | Message::Stale(_)) => Ok(Chunks),
            (Chunks, Message::ChunksEnd { .. }) => Ok(Finished),
            (phase, msg) => Err(unexpected(phase, msg)),
        }
    }
}

impl SenderPhase {
    pub fn accept(self, msg: &Message) -> Result<SenderPhase, String> {
        use SenderPhase::*;
        match (self, msg) {
            (_, Message::Error { .. }) => Ok(Finished),
            (Hello, Message::Hello(h)) if h.dry_run && h.stream => {
                Err("a dry run cannot be a streamed session".into())
            }
            (Hello, Message::Hello(h)) if h.dry_run => Ok(Changes),
            // A streamed session has no want phase: chunks went out with the manifest.
            (Hello, Message::Hello(h)) if h.stream => Ok(Outcome),
            (Hello, Message::Hello(_)) => Ok(Wants),
            (Wants, Message::Want(_) | Message::WantHints(_)) => Ok(Wants),
            (Wants, Message::WantEnd) => Ok(Outcome),
            (Changes, Message::Changes(_)) => Ok(Changes),
            (Changes, Message::DryRunEnd(_)) => Ok(Finished),
            (Outcome, Message::Done { .. } | Message::Unfinished(_)) => Ok(Finished),
            (phase, msg) => Err(unexpected(phase, msg)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::RootDigest;

    #[test]
    fn receiver_accepts_only_the_session_order() {
        let end = Message::ManifestEnd {
            entries: 0,
            root: RootDigest([0; 32]),
        };
        let mut p = ReceiverPhase::Hello;
        assert!(p.accept(&end).is_err());
        assert!(p.accept(&Message::ChunksEnd { bytes_read: 0 }).is_err());
        p = ReceiverPhase::Manifest;
        assert!(p.accept(&Message::ChunksEnd { bytes_read: 0 }).is_err());
        p = p.accept(&end).unwrap();
        assert_eq!(p, ReceiverPhase::Chunks);
        assert!(p.accept(&end).is_err(), "a second manifest is refused");
        assert_eq!(
            p.accept(&Message::ChunksEnd { bytes_read: 0 }).unwrap(),
            ReceiverPhase::Finished
        );
        assert!(
            ReceiverPhase::Finished
                .accept(&Message::ChunksEnd { bytes_read: 0 })
                .is_err()
        );
    }

    #[test]
    fn a_streamed_manifest_admits_chunks_and_skips_the_want_phase() {
        let p = ReceiverPhase::StreamedManifest;
        let chunk = Message::Chunk(crate::protocol::message::ChunkData::encode(
            crate::chunk::ChunkId::of(b"x"),
            b"x",
            None,
        ));
        assert_eq!(p.accept(&chunk).unwrap(), p);
        assert!(ReceiverPhase::Manifest.accept(&chunk).is_err());
        let hello = |stream| {
            Message::Hello(crate::protocol::message::Hello {
                version: 2,
                mode: crate::manifest::VolumeMode::Tree,
                chunker: Default::default(),
                compress: false,
                stream,
                bases: Vec::new(),
                dry_run: false,
                inplace: false,
                live: false,
            })
        };
        assert_eq!(
            SenderPhase::Hello.accept(&hello(true)).unwrap(),
            SenderPhase::Outcome
        );
        assert_eq!(
            SenderPhase::Hello.accept(&hello(false)).unwrap(),
            SenderPhase::Wants
        );
        assert!(
            SenderPhase::Outcome.accept(&Message::Want(vec![])).is_err(),
            "no wants in a streamed session"
        );
    }

    #[test]
    fn removed_paths_belong_to_delta_manifests_only() {
        let removed = Message::Removed(crate::manifest::RelPath::new(b"a".to_vec()).unwrap());
        let p = ReceiverPhase::DeltaManifest;
        assert_eq!(p.accept(&removed).unwrap(), p);
        let entry = Message::Entry(crate::manifest::Entry {
            path: crate::manifest::RelPath::root(),
            kind: crate::manifest::EntryKind::Dir,
            meta: Default::default(),
        });
        assert_eq!(p.accept(&entry).unwrap(), p);
        for other in [
            ReceiverPhase::Manifest,
            ReceiverPhase::StreamedManifest,
            ReceiverPhase::Chunks,
        ] {
            assert!(other.accept(&removed).is_err(), "{other:?}");
        }
        let end = Message::ManifestEnd {
            entries: 1,
            root: RootDigest([0; 32]),
        };
        assert_eq!(p.accept(&end).unwrap(), ReceiverPhase::Chunks);
    }

    #[test]
    fn sender_accepts_only_the_session_order() {
        let mut p = SenderPhase::Hello;
        assert!(p.accept(&Message::WantEnd).is_err());
        p = SenderPhase::Wants;
        assert_eq!(
            p.accept(&Message::Want(vec![])).unwrap(),
            SenderPhase::Wants
        );
        assert!(
            p.accept(&Message::Done {
                root: RootDigest([0; 32]),
                stats: Default::default(),
            })
            .is_err()
        );
        p = p.accept(&Message::WantEnd).unwrap();
        assert_eq!(
            p.accept(&Message::Error {
                message: "x".into()
            })
            .unwrap(),
            SenderPhase::Finished
        );
    }

    #[test]
    fn a_dry_run_answers_changes_then_its_end_and_never_streams() {
        let hello = |stream, dry_run| {
            Message::Hello(crate::protocol::message::Hello {
                version: 5,
                mode: crate::manifest::VolumeMode::Tree,
                chunker: Default::default(),
                compress: false,
                stream,
                bases: Vec::new(),
                dry_run,
                inplace: false,
                live: false,
            })
        };
        assert!(SenderPhase::Hello.accept(&hello(true, true)).is_err());
        let p = SenderPhase::Hello.accept(&hello(false, true)).unwrap();
        assert_eq!(p, SenderPhase::Changes);
        assert_eq!(p.accept(&Message::Changes(Vec::new())).unwrap(), p);
        for refused in [
            Message::Want(vec![]),
            Message::WantEnd,
            Message::Done {
                root: RootDigest([0; 32]),
                stats: Default::default(),
            },
        ] {
            assert!(p.accept(&refused).is_err(), "{}", refused.name());
        }
        let end = Message::DryRunEnd(Default::default());
        assert_eq!(p.accept(&end).unwrap(), SenderPhase::Finished);
        assert!(SenderPhase::Wants.accept(&end).is_err());
        assert!(
            SenderPhase::Wants
                .accept(&Message::Changes(Vec::new()))
                .is_err()
        );
    }
}
