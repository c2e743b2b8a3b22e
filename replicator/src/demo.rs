//! The sample volume used by `replicator demo` and by tests: small, deterministic, and
//! covering the awkward cases (nested directories, a sparse file, links, odd names).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, symlink};
use std::path::Path;

/// Deterministic pseudo-random bytes (xorshift64).
pub fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text-like bytes (compressible, with newlines), deterministic.
pub fn seeded_text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "volume", "chunk", "replica", "digest", "node", "epoch", "write", "sync", "quic", "delta",
        "owner", "fence",
    ];
    let noise = seeded_bytes(seed, len / 4 + 16);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let w = WORDS[noise[i % noise.len()] as usize % WORDS.len()];
        out.extend_from_slice(w.as_bytes());
        out.push(if noise[(i + 1) % noise.len()] % 9 == 0 {
            b'\n'
        } else {
            b' '
        });
        i += 1;
    }
    out.truncate(len);
    out
}

/// Builds the sample tree at `root`; returns the number of regular files.
pub fn make_sample_tree(root: &Path) -> io::Result<usize> {
    let mut files = 0;
    for d in 0..8 {
        let dir = root.join(format!("dir{d}/sub{}", d % 3));
        fs::create_dir_all(&dir)?;
        for f in 0..25 {
            let len = 1024 + (d * 25 + f) * 311 % 60_000;
            fs::write(
                dir.join(format!("file{f}.txt")),
                seeded_text((d * 100 + f) as u64, len),
            )?;
            files += 1;
        }
    }
    fs::write(root.join("data.bin"), seeded_bytes(1, 4 << 20))?;
    let sparse = fs::File::create(root.join("sparse.img"))?;
    sparse.set_len(64 << 20)?;
    sparse.write_all_at(&seeded_bytes(2, 100_000), 32 << 20)?;
    fs::write(root.join("name with spaces\nand newline"), b"odd name\n")?;
    fs::hard_link(root.join("data.bin"), root.join("data-hardlink.bin"))?;
    symlink("dir0/sub0/file0.txt", root.join("link-to-file"))?;
    symlink("/nonexistent/target", root.join("dangling-link"))?;
    files += 4;
    Ok(files)
}

/// Edits the sample tree the way a running application would between two syncs.
pub fn edit_sample_tree(root: &Path) -> io::Result<()> {
    for f in 0..5 {
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(root.join(format!("dir1/sub1/file{f}.txt")))?;
        file.write_all(b"appended line\n")?;
    }
    let data = fs::OpenOptions::new()
        .write(true)
        .open(root.join("data.bin"))?;
    data.write_all_at(&seeded_bytes(3, 64 * 1024), 2 << 20)?;
    fs::remove_file(root.join("dir2/sub2/file3.txt"))?;
    fs::rename(
        root.join("dir3/sub0/file4.txt"),
        root.join("dir3/file4-renamed.txt"),
    )?;
    Ok(())
}
