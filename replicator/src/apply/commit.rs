//! Phase 4: making the new state visible and durable — or, on a clean abort, undoing what
//! the write phase created.
//!
//! The commit is one pass over the planned steps in volume order. Temp files are renamed
//! into place, hard links made, attributes fixed, and what the manifest lacks removed as the
//! pass meets it; a directory's own attributes are set when the pass leaves it (after
//! everything inside it changed: creating or removing a child changes a directory's mtime),
//! so directories are finished deepest first without a list of them. Temp files left by an
//! interrupted run are removed when the pass leaves their directory, once this run's have
//! been renamed.

use rustix::fs::{self as rfs, AtFlags, Mode};

use super::fsops::{self, os, temp_name};
use super::patch;
use super::plan::{self, Plan};
use super::spool::Planned;
use super::{ApplyError, Committed, Destination, io_err, split};
use crate::manifest::store::StoreWriter;
use crate::manifest::{EntryKind, Meta, RelPath, RootDigest, VolumeMode};
use crate::progress::Progress;
use crate::volume::StatInfo;
use crate::volume::walk::Scanned;

/// A directory the commit pass is inside of.
struct OpenDir {
    path: RelPath,
    meta: Meta,
    have: Option<Scanned>,
    /// Created (or put in place of a non-directory) by this run.
    created: bool,
    /// Something directly inside it was created, renamed or removed.
    changed: bool,
    /// Names of temp files an interrupted run left in it, removed when the pass leaves it.
    stale_temps: Vec<Vec<u8>>,
}

/// A directory the discard pass is inside of.
struct Undone {
    path: RelPath,
    /// Its mtime before this run, if it was a directory then.
    mtime: Option<(i64, u32)>,
    created: bool,
    touched: bool,
}

impl Destination {
    /// Removes what this run created; used when the sync is abandoned on purpose.
    pub fn discard(&mut self) {
        let Some(vol) = self.vol.as_mut() else { return };
        let Ok(mut steps) = self.planned.read() else {
            return;
        };
        // Directories whose entries this touches get their mtimes put back afterwards.
        let mut open: Vec<Undone> = Vec::new();
        let restore = |vol: &mut fsops::VolumeDir, d: Undone| {
            if let (true, false, Some((sec, nsec))) = (d.touched, d.created, d.mtime)
                && let Ok(fd) = vol.dir(&d.path)
            {
                let _ = fsops::set_mtime_fd(fd, sec, nsec);
            }
        };
        for _ in 0..self.written {
            let Ok(Some(step)) = steps.next() else { break };
            let Planned::Entry { entry, have, plan } = step else {
                continue;
            };
            while let Some(d) = pop_outside(&mut open, &entry.path, |d| &d.path) {
                restore(vol, d);
            }
            let (parent, name) = split(&entry.path);
            // What lies in a directory this run created goes with it.
            let inside_created = open.last().is_some_and(|d| d.created);
            match plan {
                Plan::Build { .. } | Plan::Special if !inside_created => {
                    if let Ok(d) = vol.dir(&parent) {
                        let _ = fsops::remove_any(d, &temp_name(&name));
                    }
                    if let Some(d) = open.last_mut() {
                        d.touched = true;
                    }
                }
                Plan::Dir {
                    create: true,
                    replace,
                } if !entry.path.is_root() => {
                    if !inside_created {
                        if let Ok(d) = vol.dir(&parent) {
                            // A directory replaces only a non-directory, and a write that
                            // fails puts that back: a directory at the name is this run's,
                            // with what it replaced set aside beside it.
                            let ours = !replace
                                || fsops::stat_at(d, &name).is_ok_and(|s| {
                                    s.is_some_and(|s| {
                                        rfs::FileType::from_raw_mode(s.st_mode).is_dir()
                                    })
                                });
                            if ours {
                                let _ = fsops::remove_any(d, &name);
                            }
                            if replace && ours {
                                let _ = rfs::renameat(d, os(&temp_name(&name)), d, os(&name));
                            }
                        }
                        vol.invalidate();
                        if let Some(d) = open.last_mut() {
                            d.touched = true;
                        }
                    }
                    open.push(Undone {
                        path: entry.path,
                        mtime: None,
                        created: true,
                        touched: false,
                    });
                }
                Plan::Dir { .. } => open.push(Undone {
                    path: entry.path,
                    mtime: have
                        .filter(|h| h.stat.is_dir())
                        .map(|h| (h.stat.mtime_sec, h.stat.mtime_nsec)),
                    created: false,
                    touched: false,
                }),
                _ => {}
            }
        }
        while let Some(d) = open.pop() {
            restore(vol, d);
        }
    }

    /// Makes what this run wrote durable, for a rerun to resume from: the session broke
    /// (the data is in temp files the next run hash-checks, so this only saves resending it
    /// after a power loss).
    pub fn keep_for_resume(&mut self) {
        let started = std::time::Instant::now();
        let kept = self
            .flusher
            .finish()
            .and_then(|()| match self.vol.as_mut() {
                Some(vol) if self.created => vol
                    .dir(&RelPath::root())
                    .and_then(fsops::syncfs)
                    .map_err(io_err("cannot sync", &self.path.display())),
                _ => Ok(()),
            });
        match kept {
            Ok(()) => {
                // Only synced temp files are worth vouching for.
                self.partials
                    .save(&self.path, &self.state, self.header.chunker);
                tracing::debug!(
                    ms = started.elapsed().as_millis(),
                    "partial files kept for the rerun"
                );
            }
            Err(e) => tracing::warn!("partial files kept for the rerun, not synced: {e}"),
        }
    }

    /// Phases 4 and 5: make everything durable and visible, then verify and record.
    pub fn commit(
        mut self,
        expected: RootDigest,
        progress: &dyn Progress,
    ) -> Result<Committed, ApplyError> {
        progress.phase("committing");
        let t = std::time::Instant::now();
        if self.header.mode == VolumeMode::Tree {
            self.commit_tree()?;
        }
        progress.phase("verifying");
        tracing::debug!(
            touched = self.touched,
            old_files_held = self.retired.len(),
            ms = t.elapsed().as_millis(),
            "committed"
        );
        let t = std::time::Instant::now();
        let (root, index) = self.verify()?;
        tracing::debug!(ms = t.elapsed().as_millis(), "verified");
        if root != expected {
            return Err(ApplyError::DigestMismatch {
                got: root,
                want: expected,
            });
        }
        self.state
            .mark_complete(&self.path, root)
            .map_err(io_err("cannot write state of", &self.path.display()))?;
        if let Some(Err(e)) = self.store.take().map(StoreWriter::publish) {
            tracing::warn!("cannot keep this manifest for the next delta: {e}");
        }
        Ok(Committed {
            root,
            stats: self.stats,
            index,
            dest: self,
        })
    }

    fn commit_tree(&mut self) -> Result<(), ApplyError> {
        self.flusher.finish()?;
        if !self.created && !self.commit_work {
            // Every entry is as the manifest says and nothing is extra: the pass would only
            // read the spool.
            return Ok(());
        }
        if self.created {
            // Temp file data must be durable before any rename makes it visible.
            self.end_durable_phase("temp files")?;
        }
        let mut touched = self.created;
        let mut steps = self.steps()?;
        let mut open: Vec<OpenDir> = Vec::new();
        // The last path removed: what the walk found below it went with it.
        let mut gone: Option<RelPath> = None;
        while let Some(step) = steps.next(&self.links)? {
            let path = match &step {
                Planned::Entry { entry, .. } => &entry.path,
                Planned::Extra(s) => &s.path,
            };
            while let Some(d) = pop_outside(&mut open, path, |d| &d.path) {
                touched |= self.close_dir(d)?;
            }
            if let Planned::Entry {
                plan: Plan::Build { patch: true, .. },
                ..
            } = &step
            {
                self.before_writing_in_place()?;
            }
            let vol = self.vol.as_mut().expect("tree");
            let (parent, name) = split(path);
            // Whether this step changes its parent directory's entries.
            let mut changes_parent = false;
            match step {
                Planned::Extra(s) => {
                    if gone.as_ref().is_some_and(|g| s.path.starts_with(g)) {
                        self.stats.deleted += 1;
                        continue;
                    }
                    if fsops::is_temp_name(&name)
                        && let Some(d) = open.last_mut()
                        && d.path == parent
                    {
                        // Perhaps one this run renames later in the directory.
                        d.stale_temps.push(name);
                        continue;
                    }
                    let Ok(d) = vol.dir(&parent) else {
                        // Its parent was replaced by a non-directory: it went with it.
                        self.stats.deleted += 1;
                        continue;
                    };
                    self.retired.hold(&s.stat, d, &name);
                    let retired = &mut self.retired;
                    fsops::remove_any_with(d, &name, &mut |d, n| retired.hold_unseen(d, n))
                        .map_err(io_err("cannot delete", &s.path))?;
                    vol.invalidate();
                    self.stats.deleted += 1;
                    changes_parent = true;
                    gone = Some(s.path);
                }
                Planned::Entry { entry, have, plan } => {
                    let shown = &entry.path;
                    let replaced = have.as_ref().map(|s| &s.stat);
                    match &plan {
                        Plan::Build {
                            sources,
                            patch: true,
                            ..
                        } => {
                            let (Some(was), EntryKind::File { segments, .. }) =
                                (replaced, &entry.kind)
                            else {
                                unreachable!("patches are planned for files the walk found")
                            };
                            let d = vol
                                .dir(&parent)
                                .map_err(io_err("cannot open directory", &parent))?;
                            let patched =
                                patch::apply(d, &name, segments, sources, &entry.meta, was)
                                    .map_err(io_err("cannot patch", shown))?;
                            self.durable.add(patched);
                            // Its temp file is gone.
                            changes_parent = true;
                        }
                        Plan::Build { .. } | Plan::Special if !entry.path.is_root() => {
                            self.rename_into_place(&parent, &name, replaced, shown)?;
                            crate::crashpoint::reached("rename");
                            changes_parent = true;
                        }
                        Plan::Link => {
                            let EntryKind::HardLink { target } = &entry.kind else {
                                unreachable!("link plans are made for hard links only")
                            };
                            let (tparent, tname) = split(target);
                            let temp = temp_name(&name);
                            let td = vol
                                .dir(&tparent)
                                .and_then(|td| td.try_clone())
                                .map_err(io_err("cannot open directory", &tparent))?;
                            let d = vol
                                .dir(&parent)
                                .map_err(io_err("cannot open directory", &parent))?;
                            fsops::remove_any(d, &temp).map_err(io_err("cannot clear", shown))?;
                            rfs::linkat(&td, os(&tname), d, os(&temp), AtFlags::empty())
                                .map_err(|err| io_err("cannot link", shown)(err.into()))?;
                            self.rename_into_place(&parent, &name, replaced, shown)?;
                            // The target's link count is on an inode this pass has no
                            // descriptor of.
                            self.durable.whole_filesystem();
                            changes_parent = true;
                        }
                        Plan::Dir {
                            create: true,
                            replace: true,
                        } => {
                            // The entry the new directory replaced, set aside by the write.
                            let d = vol
                                .dir(&parent)
                                .map_err(io_err("cannot open directory", &parent))?;
                            if let Some(old) = replaced {
                                self.retired.hold(old, d, &temp_name(&name));
                            }
                            fsops::remove_any(d, &temp_name(&name))
                                .map_err(io_err("cannot replace", shown))?;
                        }
                        Plan::Keep { meta: true } if !matches!(entry.kind, EntryKind::Dir) => {
                            let d = vol
                                .dir(&parent)
                                .map_err(io_err("cannot open directory", &parent))?;
                            if let EntryKind::File { .. } = entry.kind {
                                let f = rfs::openat(
                                    d,
                                    os(&name),
                                    rfs::OFlags::RDONLY
                                        | rfs::OFlags::NOFOLLOW
                                        | rfs::OFlags::CLOEXEC,
                                    Mode::empty(),
                                )
                                .map_err(|err| io_err("cannot open", shown)(err.into()))?;
                                fsops::apply_meta_fd(&f, &entry.meta)
                                    .map_err(io_err("cannot set attributes of", shown))?;
                                self.durable.add(f);
                            } else {
                                let symlink = matches!(entry.kind, EntryKind::Symlink { .. });
                                fsops::apply_meta_at(d, &name, &entry.meta, symlink)
                                    .map_err(io_err("cannot set attributes of", shown))?;
                                self.durable.whole_filesystem();
                            }
                            touched = true;
                        }
                        _ => {}
                    }
                    if let EntryKind::Dir = entry.kind {
                        let created = matches!(plan, Plan::Dir { create: true, .. });
                        // Made by the write phase, in its parent.
                        changes_parent |= created;
                        open.push(OpenDir {
                            path: entry.path,
                            meta: entry.meta,
                            have,
                            created,
                            changed: false,
                            stale_temps: Vec::new(),
                        });
                    }
                }
            }
            if changes_parent {
                touched = true;
                match open.iter_mut().rev().find(|d| d.path == parent) {
                    Some(d) => d.changed = true,
                    // Not a directory the pass will sync when it leaves it.
                    None => self.durable.whole_filesystem(),
                }
            }
        }
        while let Some(d) = open.pop() {
            touched |= self.close_dir(d)?;
        }
        self.touched = touched;
        crate::crashpoint::reached("commit-sync");
        if touched {
            self.last_change = Some(std::time::Instant::now());
            self.end_durable_phase("commit pass")?;
        }
        Ok(())
    }

    /// Makes what the phase named `what` changed durable ([`super::durable`]).
    fn end_durable_phase(&mut self, what: &str) -> Result<(), ApplyError> {
        let root_shown = self.path.display().to_string();
        let vol = self.vol.as_mut().expect("tree");
        let root = vol
            .dir(&RelPath::root())
            .map_err(io_err("cannot open", &root_shown))?;
        self.durable
            .sync(root)
            .map_err(io_err("cannot sync", &root_shown))?;
        tracing::debug!(by = self.durable.how(), "{what} durable");
        Ok(())
    }

    /// Renames the temp name of `name` in `parent` over `name`, which the walk found as
    /// `replaced`: a directory there is removed first (a rename cannot replace one with a
    /// file), a large file is held to be freed after the sync ([`super::retired`]).
    fn rename_into_place(
        &mut self,
        parent: &RelPath,
        name: &[u8],
        replaced: Option<&StatInfo>,
        shown: &RelPath,
    ) -> Result<(), ApplyError> {
        let vol = self.vol.as_mut().expect("tree");
        let d = vol
            .dir(parent)
            .map_err(io_err("cannot open directory", parent))?;
        let was_dir = replaced.is_some_and(StatInfo::is_dir);
        if let Some(old) = replaced {
            self.retired.hold(old, d, name);
        }
        if was_dir {
            let retired = &mut self.retired;
            fsops::remove_any_with(d, name, &mut |d, n| retired.hold_unseen(d, n))
                .map_err(io_err("cannot replace", shown))?;
        }
        rfs::renameat(d, os(&temp_name(name)), d, os(name))
            .map_err(|err| io_err("cannot rename into place", shown)(err.into()))?;
        if was_dir {
            vol.invalidate();
        }
        Ok(())
    }

    /// Finishes a directory the commit pass leaves: removes the temp files an interrupted
    /// run left in it (this run's are renamed by now), then sets its attributes if anything
    /// in it changed or they differ. Returns whether it changed anything.
    fn close_dir(&mut self, mut d: OpenDir) -> Result<bool, ApplyError> {
        let vol = self.vol.as_mut().expect("tree");
        for name in std::mem::take(&mut d.stale_temps) {
            let fd = vol
                .dir(&d.path)
                .map_err(io_err("cannot open directory", &d.path))?;
            if fsops::stat_at(fd, &name)
                .map_err(io_err("cannot clean up", &d.path))?
                .is_some()
            {
                fsops::remove_any(fd, &name).map_err(io_err("cannot clean up", &d.path))?;
                vol.invalidate();
                self.stats.deleted += 1;
                d.changed = true;
            }
        }
        let differs = d
            .have
            .as_ref()
            .is_none_or(|h| plan::meta_differs(h, &d.meta, false));
        if !(d.changed || d.created || differs) {
            return Ok(false);
        }
        let fd = vol
            .dir(&d.path)
            .map_err(io_err("cannot open directory", &d.path))?;
        fsops::apply_meta_fd(fd, &d.meta).map_err(io_err("cannot set attributes of", &d.path))?;
        // Its entries and attributes are final: what changed in it lasts once it is synced.
        self.durable
            .add_copy(fd)
            .map_err(io_err("cannot sync", &d.path))?;
        Ok(true)
    }
}

/// The innermost directory in `open` that `path` is not inside of, taken off the stack.
fn pop_outside<T>(open: &mut Vec<T>, path: &RelPath, dir: impl Fn(&T) -> &RelPath) -> Option<T> {
    if open.last().is_some_and(|d| !path.starts_with(dir(d))) {
        open.pop()
    } else {
        None
    }
}
