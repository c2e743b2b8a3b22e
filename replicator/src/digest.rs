//! `replicator digest PATH`: the root digest of any volume, read in full.

use std::path::Path;

use crate::chunk::ChunkerParams;
use crate::manifest::{DigestBuilder, RootDigest};
use crate::protocol::sender::header;
use crate::snapshot::{ScanStats, SnapshotError, SnapshotOptions, scan_block, scan_tree};
use crate::volume;

/// Reads every byte of the volume at `path` (no index) and returns its root digest.
pub fn digest_volume(
    path: &Path,
    chunker: ChunkerParams,
    threads: usize,
) -> Result<(RootDigest, ScanStats), SnapshotError> {
    let mode = volume::detect_mode(path).map_err(|source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let opts = SnapshotOptions {
        chunker,
        checksum: true,
        threads,
        keep_contents: false,
    };
    let mut digest = DigestBuilder::new(&header(mode, chunker));
    let stats = match mode {
        crate::manifest::VolumeMode::Tree => scan_tree(path, opts, None, None, &mut |e, _| {
            digest.add(&e).map_err(|e| e.to_string())
        })?,
        crate::manifest::VolumeMode::Block => {
            let (e, stats) = scan_block(path, opts, None, None)?;
            digest
                .add(&e)
                .map_err(|e| SnapshotError::Emit(e.to_string()))?;
            stats
        }
    };
    Ok((digest.finish(), stats))
}
