//! A filesystem whose power can be cut: ext4 in an image file, loop-mounted.
//!
//! A power cut loses whatever the kernel had not written to the device. A loop device writes
//! to its image file, so a copy of the image taken while the filesystem is still mounted holds
//! exactly what reached the "device": the data the filesystem wrote out, and its journal as
//! far as it was committed. Mounting that copy at the same place replays the journal, as the
//! reboot after a real cut would, and a rerun finds its volume and state at the same paths.
//!
//! The filesystem is mounted with `commit=60`, and the kernel writes dirty pages out on its
//! own only after 30 s: within a test, what is on the device is what a program forced out
//! (`fsync`, `syncfs`, `fdatasync`, write-behind). Were the kernel to write out more, a test
//! could only pass more easily; it cannot fail a program that syncs what it must.
//!
//! Needs root, `mkfs.ext4` and loop devices. Where they are missing, [`PowerCutFs::new`] says
//! so and the test returns, unless `REPLICATOR_REQUIRE_LOOP=1` (set by CI wherever it can
//! mount a loop device) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PowerCutFs {
    dir: tempfile::TempDir,
    image: PathBuf,
    mount: PathBuf,
    cuts: u32,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn mount_at(image: &Path, at: &Path) -> Result<(), String> {
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,commit=60"])
        .arg(image)
        .arg(at))
}

fn unmount(at: &Path) -> Result<(), String> {
    run(Command::new("umount").arg(at))
}

impl PowerCutFs {
    /// A fresh ext4 filesystem of `mib` MiB, mounted; `None` (with the reason printed) where
    /// this machine cannot make one and CI does not require it.
    pub fn new(mib: u64) -> Option<Self> {
        Self::make(mib)
            .map_err(|e| {
                super::skip_unless_required(
                    "REPLICATOR_REQUIRE_LOOP",
                    "a loop-mounted filesystem",
                    &e,
                )
            })
            .ok()
    }

    fn make(mib: u64) -> Result<Self, String> {
        if !super::is_root() {
            return Err("not root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().join("disk-0.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| e.to_string())?;
        // Inode tables and journal zeroed now, not by a kernel thread during the test.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&image))?;
        mount_at(&image, &mount)?;
        Ok(PowerCutFs {
            dir,
            image,
            mount,
            cuts: 0,
        })
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Cuts the power and boots again: what the device holds now is copied, the filesystem
    /// is unmounted (its image set aside), and the copy is mounted in its place.
    pub fn cut_power(&mut self) {
        self.cuts += 1;
        let copy = self.dir.path().join(format!("disk-{}.img", self.cuts));
        std::fs::copy(&self.image, &copy).expect("copy the image");
        unmount(&self.mount).expect("unmount");
        std::fs::remove_file(&self.image).expect("remove the old image");
        mount_at(&copy, &self.mount).expect("mount the image as the power cut left it");
        self.image = copy;
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.mount) {
            eprintln!("{e}");
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}
