//! A dry run's report: the planned steps read back as the changes a sync would make.
//!
//! Planning never modifies the destination (see [`super::plan`]), so a dry run is a real
//! prepare and plan followed by this pass over the spool of planned steps instead of the
//! write and commit phases.

use super::fsops::is_temp_name;
use super::patch;
use super::plan::{Plan, Src};
use super::spool::Planned;
use super::{ApplyError, Destination, plan};
use crate::manifest::EntryKind;
use crate::protocol::dry_run::{Action, Change, Outcome};

impl Destination {
    /// Calls `each` with every change the planned sync would make, in volume order (a
    /// deletion where the path fell out of the manifest), and returns what it would move.
    /// The manifest must have ended.
    pub fn changes<E: From<ApplyError>>(
        &mut self,
        mut each: impl FnMut(Change) -> Result<(), E>,
    ) -> Result<Outcome, E> {
        let mut outcome = Outcome {
            chunks_wanted: self.want.count,
            bytes_wanted: self.want.bytes,
            ..Outcome::default()
        };
        let mut steps = self.steps()?;
        while let Some(step) = steps.next(&self.links)? {
            let change = match step {
                // A partial file of an interrupted sync: resumed or cleaned up, not the
                // user's to hear about.
                Planned::Extra(s) if s.path.split_last().is_some_and(|(_, n)| is_temp_name(n)) => {
                    None
                }
                Planned::Extra(s) => {
                    outcome.stats.deleted += 1;
                    Some(Change {
                        action: Action::Delete,
                        dir: s.stat.is_dir(),
                        path: s.path,
                    })
                }
                Planned::Entry { entry, have, plan } => {
                    if let Plan::Build { sources, patch, .. } = &plan {
                        outcome.stats.files_written += 1;
                        outcome.stats.files_patched += u64::from(*patch);
                        // A patch leaves what it keeps where it is.
                        outcome.stats.bytes_copied_locally += entry
                            .segments()
                            .iter()
                            .zip(sources)
                            .filter(|(_, s)| {
                                matches!(s, Src::Local(_) | Src::Clone(_))
                                    && !(*patch && patch::keeps(s))
                            })
                            .map(|(seg, _)| seg.len())
                            .sum::<u64>();
                    }
                    let action = match (&plan, &have) {
                        (Plan::Keep { meta: false }, _) => None,
                        (Plan::Keep { meta: true }, _) => Some(Action::Attrs),
                        (Plan::Dir { create: false, .. }, Some(h))
                            if plan::meta_differs(h, &entry.meta, false) =>
                        {
                            Some(Action::Attrs)
                        }
                        (Plan::Dir { create: false, .. }, _) => None,
                        (_, None) => Some(Action::Create),
                        (_, Some(_)) => Some(Action::Update),
                    };
                    action.map(|action| Change {
                        action,
                        dir: matches!(entry.kind, EntryKind::Dir),
                        path: entry.path,
                    })
                }
            };
            if let Some(change) = change {
                each(change)?;
            }
        }
        self.stats.chunks_wanted = outcome.chunks_wanted;
        self.stats.bytes_wanted = outcome.bytes_wanted;
        self.stats.files_written = outcome.stats.files_written;
        self.stats.files_patched = outcome.stats.files_patched;
        self.stats.deleted = outcome.stats.deleted;
        self.stats.bytes_copied_locally = outcome.stats.bytes_copied_locally;
        Ok(outcome)
    }
}
