//! The seeded workloads and the edits applied between a full and an incremental run.
//!
//! - **tree**: ~20,000 text-like files of 1–64 KiB and six 256 MiB binaries made of real
//!   executables and libraries from /usr (~2.2 GB at scale 1);
//! - **image**: a 2 GiB raw image holding a real ext4 filesystem (`mkfs.ext4 -d`, no mount);
//! - **many-files**: 1,000,000 files of 0–2 KiB, for memory and metadata scaling.
//!
//! Everything derives from the seed, so every tool sees the same bytes, run after run.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use benches::rng::{Rng, text};

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    Tree,
    Image,
    ManyFiles,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Tree => "tree",
            WorkloadKind::Image => "image",
            WorkloadKind::ManyFiles => "many-files",
        }
    }

    /// The edits run one after the other, each followed by an incremental run of every tool.
    pub fn edits(self) -> &'static [Edit] {
        match self {
            WorkloadKind::Tree => &[Edit::OnePercent, Edit::Insertion, Edit::NoChange],
            WorkloadKind::Image => &[Edit::RandomWrites, Edit::NoChange],
            WorkloadKind::ManyFiles => &[Edit::Appends, Edit::NoChange],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Edit {
    /// ~1%: appends to 100 small files and a 4 MiB overwrite in the middle of a large file.
    OnePercent,
    /// 1 KiB inserted near the start of a large file (every later byte shifts).
    Insertion,
    /// Nothing changed.
    NoChange,
    /// 16 random 64 KiB writes into the image.
    RandomWrites,
    /// Appends to 100 of the small files.
    Appends,
}

impl Edit {
    pub fn name(self) -> &'static str {
        match self {
            Edit::OnePercent => "edit-1pct",
            Edit::Insertion => "insert-1k",
            Edit::NoChange => "no-change",
            Edit::RandomWrites => "writes-16x64k",
            Edit::Appends => "append-100",
        }
    }
}

/// A generated source volume and what the edits need to know about it.
#[derive(Debug)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// The directory (tree, many-files) or image file (image) every tool copies.
    pub source: PathBuf,
    pub small_files: Vec<PathBuf>,
    pub large_files: Vec<PathBuf>,
    pub bytes: u64,
    pub files: u64,
    seed: u64,
    scale: f64,
}

/// Scales a count or size, never below `min`.
fn scaled(n: u64, scale: f64, min: u64) -> u64 {
    ((n as f64 * scale).round() as u64).max(min)
}

pub fn generate(kind: WorkloadKind, dir: &Path, scale: f64, seed: u64) -> io::Result<Workload> {
    if dir.exists() {
        crate::tools::remove_tree(dir)?;
    }
    fs::create_dir_all(dir)?;
    match kind {
        WorkloadKind::Tree => tree(dir, scale, seed),
        WorkloadKind::Image => image(dir, scale, seed),
        WorkloadKind::ManyFiles => many_files(dir, scale, seed),
    }
    .map(|w| Workload { scale, ..w })
}

fn tree(dir: &Path, scale: f64, seed: u64) -> io::Result<Workload> {
    let source = dir.join("tree");
    let mut rng = Rng::derive(seed, "tree");
    let n = scaled(20_000, scale, 10);
    let small_files = text_files(&source.join("docs"), n, 1024, 64 * 1024, 100, &mut rng)?;
    let mut corpus = Corpus::from_usr(seed)?;
    let mut large_files = Vec::new();
    let bin = source.join("bin");
    fs::create_dir_all(&bin)?;
    for i in 0..6 {
        let path = bin.join(format!("blob{i}.bin"));
        corpus.write_file(&path, scaled(256 * MIB, scale, MIB))?;
        large_files.push(path);
    }
    finish(WorkloadKind::Tree, source, small_files, large_files, seed)
}

fn image(dir: &Path, scale: f64, seed: u64) -> io::Result<Workload> {
    let mut rng = Rng::derive(seed, "image");
    let size = scaled(2048 * MIB, scale, 64 * MIB);
    // ~60% full: a third text, the rest binaries, like a small server's root filesystem.
    let content = dir.join("content");
    text_files(
        &content.join("etc"),
        scaled(4000, scale, 10),
        512,
        96 * 1024,
        200,
        &mut rng,
    )?;
    let mut corpus = Corpus::from_usr(seed ^ 1)?;
    let usr = content.join("usr");
    fs::create_dir_all(&usr)?;
    let binaries = size * 4 / 10;
    let per_file = (32 * MIB).min(binaries.max(1));
    let mut written = 0;
    let mut i = 0;
    while written < binaries {
        let len = per_file.min(binaries - written);
        corpus.write_file(&usr.join(format!("lib{i}.so")), len)?;
        written += len;
        i += 1;
    }
    let source = dir.join("disk.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "root_owner=0:0", "-d"])
        .arg(&content)
        .arg(&source)
        .arg(format!("{}k", size / 1024))
        .output()
        .map_err(|e| io::Error::other(format!("running mkfs.ext4 (e2fsprogs): {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "mkfs.ext4 -d failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    fs::remove_dir_all(&content)?;
    finish(
        WorkloadKind::Image,
        source.clone(),
        vec![],
        vec![source],
        seed,
    )
}

fn many_files(dir: &Path, scale: f64, seed: u64) -> io::Result<Workload> {
    let source = dir.join("many");
    let mut rng = Rng::derive(seed, "many-files");
    let n = scaled(1_000_000, scale, 100);
    let small_files = text_files(&source, n, 0, 2048, 1000, &mut rng)?;
    finish(WorkloadKind::ManyFiles, source, small_files, vec![], seed)
}

fn finish(
    kind: WorkloadKind,
    source: PathBuf,
    small_files: Vec<PathBuf>,
    large_files: Vec<PathBuf>,
    seed: u64,
) -> io::Result<Workload> {
    let (bytes, files) = measure(&source)?;
    Ok(Workload {
        kind,
        source,
        small_files,
        large_files,
        bytes,
        files,
        seed,
        scale: 1.0,
    })
}

/// Writes `n` text files of `lo..=hi` bytes, `per_dir` to a directory.
fn text_files(
    root: &Path,
    n: u64,
    lo: u64,
    hi: u64,
    per_dir: u64,
    rng: &mut Rng,
) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::with_capacity(n as usize);
    let mut buf = Vec::new();
    for i in 0..n {
        let dir = root.join(format!("d{:04}", i / per_dir));
        if i % per_dir == 0 {
            fs::create_dir_all(&dir)?;
        }
        let path = dir.join(format!("f{i:07}.txt"));
        buf.clear();
        let len = rng.range(lo, hi) as usize;
        text(rng, len, &mut buf);
        fs::write(&path, &buf)?;
        files.push(path);
    }
    Ok(files)
}

/// Total bytes and regular files under a directory (or of one file).
fn measure(path: &Path) -> io::Result<(u64, u64)> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_file() {
        return Ok((meta.len(), 1));
    }
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                bytes += entry.metadata()?.len();
                files += 1;
            }
        }
    }
    Ok((bytes, files))
}

/// Real executables and libraries from /usr, in a seeded order, read as one long stream so
/// the large files hold real machine code (which compresses and deduplicates like the real
/// thing) and differ from each other until /usr runs out and the stream wraps.
struct Corpus {
    files: Vec<PathBuf>,
    next: usize,
    current: Option<File>,
}

impl Corpus {
    fn from_usr(seed: u64) -> io::Result<Corpus> {
        let mut files = Vec::new();
        for top in ["/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec"] {
            collect_regular(Path::new(top), 16 * 1024, &mut files);
        }
        if files.is_empty() {
            return Err(io::Error::other("no files of 16 KiB or more under /usr"));
        }
        files.sort();
        Rng::derive(seed, "corpus").shuffle(&mut files);
        Ok(Corpus {
            files,
            next: 0,
            current: None,
        })
    }

    fn write_file(&mut self, path: &Path, len: u64) -> io::Result<()> {
        let mut out = io::BufWriter::with_capacity(1 << 20, File::create(path)?);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = self.read(&mut buf[..want])?;
            out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    /// Reads from the stream, moving to the next /usr file at each end (never returns 0).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(f) = &mut self.current {
                let n = f.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
            }
            let path = &self.files[self.next % self.files.len()];
            self.next += 1;
            // Files that vanished or are unreadable are skipped.
            self.current = File::open(path).ok();
        }
    }
}

fn collect_regular(dir: &Path, min_len: u64, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            collect_regular(&entry.path(), min_len, out);
        } else if ft.is_file() && entry.metadata().is_ok_and(|m| m.len() >= min_len) {
            out.push(entry.path());
        }
    }
}

impl Workload {
    /// Applies one edit to the source, deterministically.
    pub fn apply(&self, edit: Edit) -> io::Result<()> {
        let mut rng = Rng::derive(self.seed, edit.name());
        match edit {
            Edit::NoChange => Ok(()),
            Edit::OnePercent => {
                // ~0.8% of the tree at any scale: ~14 MB of text appended, 4 MiB of random
                // bytes (the worst case for compression) overwritten.
                let append = (
                    scaled(16 * 1024, self.scale, 512),
                    scaled(256 * 1024, self.scale, 1024),
                );
                self.append_to_small_files(&mut rng, 100, append)?;
                let big = &self.large_files[0];
                let len = fs::metadata(big)?.len();
                let overwrite = scaled(4 * MIB, self.scale, 64 * 1024);
                let mut data = vec![0u8; overwrite.min(len) as usize];
                rng.fill(&mut data);
                write_at_synced(big, (len - data.len() as u64) / 2, &data)
            }
            Edit::Insertion => {
                let big = &self.large_files[1.min(self.large_files.len() - 1)];
                let mut data = fs::read(big)?;
                let at = 4096.min(data.len());
                let mut insert = vec![0u8; 1024];
                rng.fill(&mut insert);
                data.splice(at..at, insert);
                let mut f = OpenOptions::new().write(true).open(big)?;
                f.seek(SeekFrom::Start(0))?;
                f.write_all(&data)?;
                f.sync_all()
            }
            Edit::Appends => self.append_to_small_files(&mut rng, 100, (1024, 4096)),
            Edit::RandomWrites => {
                let img = &self.source;
                let len = fs::metadata(img)?.len();
                let mut data = vec![0u8; 64 * 1024];
                for _ in 0..16 {
                    let blocks = (len - data.len() as u64) / 4096;
                    let at = rng.range(0, blocks) * 4096;
                    rng.fill(&mut data);
                    write_at_synced(img, at, &data)?;
                }
                Ok(())
            }
        }
    }

    /// Appends `sizes.0..=sizes.1` bytes of text to `count` of the small files.
    fn append_to_small_files(
        &self,
        rng: &mut Rng,
        count: usize,
        sizes: (u64, u64),
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        for _ in 0..count.min(self.small_files.len()) {
            let path = &self.small_files[rng.range(0, self.small_files.len() as u64 - 1) as usize];
            buf.clear();
            let len = rng.range(sizes.0, sizes.1) as usize;
            text(rng, len, &mut buf);
            let mut f = OpenOptions::new().append(true).open(path)?;
            f.write_all(&buf)?;
        }
        Ok(())
    }
}

fn write_at_synced(path: &Path, at: u64, data: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, at)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(path: &Path) -> String {
        let params = replicator::chunk::ChunkerParams::default();
        let (root, _) = replicator::digest::digest_volume(path, params, 1).expect("digest");
        root.to_hex()
    }

    #[test]
    fn tree_is_deterministic_and_edits_change_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = generate(WorkloadKind::Tree, &tmp.path().join("a"), 0.0005, 7).expect("gen");
        let b = generate(WorkloadKind::Tree, &tmp.path().join("b"), 0.0005, 7).expect("gen");
        assert_eq!(a.files, 16);
        assert_eq!(a.bytes, b.bytes);
        // Same content (times differ, so compare bytes, not the metadata digest).
        for (x, y) in a.large_files.iter().zip(&b.large_files) {
            assert_eq!(fs::read(x).expect("read"), fs::read(y).expect("read"));
        }
        let before = digest(&a.source);
        let big_len = fs::metadata(&a.large_files[1]).expect("meta").len();
        a.apply(Edit::Insertion).expect("insert");
        assert_eq!(
            fs::metadata(&a.large_files[1]).expect("meta").len(),
            big_len + 1024
        );
        let after_insert = digest(&a.source);
        assert_ne!(before, after_insert);
        a.apply(Edit::NoChange).expect("none");
        assert_eq!(after_insert, digest(&a.source));
        a.apply(Edit::OnePercent).expect("1pct");
        assert_ne!(after_insert, digest(&a.source));
    }

    #[test]
    fn many_files_counts_and_appends() {
        let tmp = tempfile::tempdir().expect("tmp");
        let w = generate(WorkloadKind::ManyFiles, tmp.path(), 0.0002, 1).expect("gen");
        assert_eq!(w.files, 200);
        let before = w.bytes;
        w.apply(Edit::Appends).expect("append");
        let (after, files) = measure(&w.source).expect("measure");
        assert_eq!(files, 200);
        assert!(after >= before + 1024, "{before} -> {after}");
    }
}
