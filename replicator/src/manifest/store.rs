//! The last manifest a sync completed, kept in the state directory so that the next sync of
//! the same pair sends only the entries that changed ([`super::delta`]).
//!
//! The file holds exactly the bytes the root digest hashes: the encoded header, then every
//! entry's encoding in volume order. Its BLAKE3 hash therefore *is* its root digest, so opening
//! one checks it in the same pass that finds its root, and a torn, stale or foreign file is
//! never used as a base. It is a cache and is written without fsync: losing it costs one full
//! manifest on the wire, nothing else.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{Entry, Header, Limits, RootDigest, decode_entry, decode_header, encode_header};
use crate::codec::StreamDecoder;
use crate::state::PendingFile;

/// Writes a manifest as it is produced; [`StoreWriter::publish`] puts it under its final name.
/// Dropped unpublished, it removes its temp file.
pub struct StoreWriter {
    file: PendingFile,
    path: PathBuf,
}

impl StoreWriter {
    pub fn create(path: &Path, header: &Header) -> io::Result<Self> {
        let mut file = PendingFile::create(path)?;
        file.write_all(&encode_header(header))?;
        Ok(StoreWriter {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one entry's encoding (entries in volume order).
    pub fn add(&mut self, encoded: &[u8]) -> io::Result<()> {
        self.file.write_all(encoded)
    }

    /// What was written so far, read back from the file; the writer can still be published.
    pub fn read_back(&mut self, limits: Limits) -> io::Result<StoredEntries> {
        StoredEntries::new(self.file.reopen()?, limits)
    }

    /// Appends to `store` if there is one; after a failure it says so once and stops keeping
    /// the manifest (the next sync then sends a full one).
    pub fn keep(store: &mut Option<StoreWriter>, encoded: &[u8]) {
        if let Some(s) = store
            && let Err(e) = s.add(encoded)
        {
            tracing::warn!("cannot keep this manifest for the next delta: {e}");
            *store = None;
        }
    }

    /// Replaces the stored manifest with this one.
    pub fn publish(self) -> io::Result<()> {
        let path = self.path.clone();
        self.publish_to(&path)
    }

    /// Puts this manifest at `path` (in the same directory as the writer's own path). It is a
    /// cache: not fsynced.
    pub fn publish_to(self, path: &Path) -> io::Result<()> {
        self.file.commit(path, false)
    }
}

/// The manifests of a source's last few completed syncs, each named by its root: a source
/// synced to several destinations in turn keeps a delta base for each of them.
pub struct Shelf {
    dir: PathBuf,
}

impl Shelf {
    /// Manifests kept per source.
    pub const KEEP: usize = 4;

    pub fn new(dir: PathBuf) -> Self {
        Shelf { dir }
    }

    /// The kept manifests for volumes like `header`, newest first. One whose hash is not its
    /// name (torn, damaged) is removed.
    pub fn open_all(&self, header: &Header) -> Vec<StoredManifest> {
        let mut found = Vec::new();
        for (path, _) in self.kept() {
            let named = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(RootDigest::from_hex);
            match StoredManifest::open(&path, header) {
                Ok(Some(m)) if Some(m.root()) == named => found.push(m),
                Ok(Some(_)) => {
                    tracing::warn!(path = %path.display(), "removing a damaged kept manifest");
                    let _ = fs::remove_file(&path);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot read a kept manifest: {e}")
                }
            }
        }
        found
    }

    /// A writer for the manifest of a session; [`Shelf::publish`] keeps it.
    pub fn writer(&self, header: &Header) -> io::Result<StoreWriter> {
        StoreWriter::create(&self.dir.join("new"), header)
    }

    /// Keeps `written` (whose root is `root`) and drops the oldest beyond [`Shelf::KEEP`].
    pub fn publish(&self, written: StoreWriter, root: RootDigest) -> io::Result<()> {
        written.publish_to(&self.dir.join(root.to_hex()))?;
        for (old, _) in self.kept().into_iter().skip(Self::KEEP) {
            let _ = fs::remove_file(old);
        }
        Ok(())
    }

    /// Kept manifests, newest first (temp files of a writer are hidden).
    fn kept(&self) -> Vec<(PathBuf, std::time::SystemTime)> {
        let Ok(items) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut kept: Vec<_> = items
            .flatten()
            .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
            .filter_map(|e| {
                let modified = e.metadata().ok()?.modified().ok()?;
                Some((e.path(), modified))
            })
            .collect();
        kept.sort_by_key(|k| std::cmp::Reverse(k.1));
        kept
    }
}

/// A stored manifest whose root digest is known (it was hashed on opening).
pub struct StoredManifest {
    file: File,
    root: RootDigest,
}

impl StoredManifest {
    /// Opens the manifest stored at `path` if there is one for volumes like `header` (same
    /// mode and chunk sizes). The file stays open, so a later replacement does not change
    /// what this reads.
    pub fn open(path: &Path, header: &Header) -> io::Result<Option<StoredManifest>> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let want = encode_header(header);
        let mut head = vec![0; want.len()];
        match file.read_exact(&mut head) {
            Ok(()) if head == want => {}
            Ok(()) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        let mut buf = vec![0; 256 * 1024];
        loop {
            match file.read(&mut buf)? {
                0 => break,
                n => {
                    hasher.update(&buf[..n]);
                }
            }
        }
        let root = RootDigest(*hasher.finalize().as_bytes());
        Ok(Some(StoredManifest { file, root }))
    }

    pub fn root(&self) -> RootDigest {
        self.root
    }

    /// The entries, in order, read a buffer at a time.
    pub fn entries(mut self, limits: Limits) -> io::Result<StoredEntries> {
        self.file.seek(SeekFrom::Start(0))?;
        StoredEntries::new(self.file, limits)
    }
}

/// Entries of a stored manifest; memory holds one read buffer (at least the largest entry).
pub struct StoredEntries<R = File> {
    input: StreamDecoder<R>,
    limits: Limits,
    /// After an error the sequence ends.
    failed: bool,
}

fn corrupt(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("stored manifest: {e}"))
}

impl<R: Read> StoredEntries<R> {
    /// Reads a stored manifest from `file`: the header, then entries on demand. Nothing is
    /// trusted: every entry goes through the wire decoder and its limits.
    pub fn new(file: R, limits: Limits) -> io::Result<Self> {
        let mut input = StreamDecoder::new(file);
        match input.next(decode_header) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(corrupt(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "no header",
                )));
            }
            Err(e) => return Err(corrupt(e)),
        }
        Ok(StoredEntries {
            input,
            limits,
            failed: false,
        })
    }
}

impl<R: Read> Iterator for StoredEntries<R> {
    type Item = io::Result<Entry>;

    fn next(&mut self) -> Option<io::Result<Entry>> {
        if self.failed {
            return None;
        }
        let limits = self.limits;
        match self.input.next(|r| decode_entry(r, &limits)) {
            Ok(entry) => entry.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(corrupt(e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::encode_tests::arb_entry;
    use crate::manifest::{DigestBuilder, MANIFEST_VERSION, VolumeMode, encode_entry};
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            version: MANIFEST_VERSION,
            mode: VolumeMode::Tree,
            chunker: Default::default(),
        }
    }

    fn sorted(mut entries: Vec<Entry>) -> Vec<Entry> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|a, b| a.path == b.path);
        entries
    }

    fn store(path: &Path, entries: &[Entry]) -> RootDigest {
        let mut w = StoreWriter::create(path, &header()).unwrap();
        let mut digest = DigestBuilder::new(&header());
        for e in entries {
            let enc = encode_entry(e);
            digest.add_encoded(e, &enc).unwrap();
            w.add(&enc).unwrap();
        }
        w.publish().unwrap();
        digest.finish()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// What is stored reads back entry for entry, and the file's hash is the root digest.
        #[test]
        fn stored_manifests_read_back_with_their_root(entries in proptest::collection::vec(arb_entry(), 0..40)) {
            let entries = sorted(entries);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m");
            let root = store(&path, &entries);
            let stored = StoredManifest::open(&path, &header()).unwrap().unwrap();
            prop_assert_eq!(stored.root(), root);
            let back: Vec<Entry> = stored.entries(Limits::default()).unwrap().map(Result::unwrap).collect();
            prop_assert_eq!(back, entries);
        }
    }

    proptest! {
        /// A damaged file ends in an error, never a panic or an endless read.
        #[test]
        fn garbage_after_a_header_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut data = encode_header(&header());
            data.extend_from_slice(&tail);
            let entries = StoredEntries::new(&data[..], Limits::default()).unwrap();
            let mut seen = 0;
            for e in entries {
                seen += 1;
                prop_assert!(seen <= tail.len());
                if e.is_err() {
                    break;
                }
            }
        }
    }

    #[test]
    fn entries_larger_than_a_read_decode() {
        use crate::chunk::{ChunkId, Segment};
        use crate::manifest::{EntryKind, Meta, RelPath};
        // One entry of ~1.2 MB (a block image's chunk list) between two small ones.
        let segments: Vec<Segment> = (0..30_000u32)
            .map(|i| Segment::Chunk {
                id: ChunkId::of(&i.to_le_bytes()),
                len: 4096,
            })
            .collect();
        let file = |name: &str, segments: Vec<Segment>| Entry {
            path: RelPath::new(name.as_bytes().to_vec()).unwrap(),
            kind: EntryKind::File {
                size: segments.iter().map(Segment::len).sum(),
                segments,
            },
            meta: Meta::default(),
        };
        let entries = vec![
            Entry {
                path: RelPath::root(),
                kind: EntryKind::Dir,
                meta: Meta::default(),
            },
            file("a", Vec::new()),
            file("b", segments),
            file("c", Vec::new()),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        store(&path, &entries);
        let back: Vec<Entry> = StoredManifest::open(&path, &header())
            .unwrap()
            .unwrap()
            .entries(Limits::default())
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(back, entries);
    }

    #[test]
    fn other_volume_kinds_and_torn_files_are_not_bases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        assert!(StoredManifest::open(&path, &header()).unwrap().is_none());
        let entries = vec![Entry {
            path: crate::manifest::RelPath::root(),
            kind: crate::manifest::EntryKind::Dir,
            meta: Default::default(),
        }];
        let root = store(&path, &entries);
        let block = Header {
            mode: VolumeMode::Block,
            ..header()
        };
        assert!(StoredManifest::open(&path, &block).unwrap().is_none());
        // A torn copy hashes to another root, so it never matches the one it should have.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let torn = StoredManifest::open(&path, &header()).unwrap().unwrap();
        assert_ne!(torn.root(), root);
        assert!(torn.entries(Limits::default()).unwrap().any(|e| e.is_err()));
    }

    #[test]
    fn a_shelf_keeps_the_newest_few_and_drops_damaged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let shelf = Shelf::new(dir.path().join("shelf"));
        let mut roots = Vec::new();
        for i in 0..6u32 {
            let entries = vec![Entry {
                path: crate::manifest::RelPath::root(),
                kind: crate::manifest::EntryKind::Dir,
                meta: crate::manifest::Meta {
                    uid: i,
                    ..Default::default()
                },
            }];
            let mut w = shelf.writer(&header()).unwrap();
            let mut digest = DigestBuilder::new(&header());
            for e in &entries {
                let enc = encode_entry(e);
                digest.add_encoded(e, &enc).unwrap();
                w.add(&enc).unwrap();
            }
            let root = digest.finish();
            shelf.publish(w, root).unwrap();
            roots.push(root);
            // mtimes must differ for "newest" to mean something.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let kept: Vec<RootDigest> = shelf.open_all(&header()).iter().map(|m| m.root()).collect();
        let newest: Vec<RootDigest> = roots.iter().rev().take(Shelf::KEEP).copied().collect();
        assert_eq!(kept, newest);
        // A damaged copy is not offered, and is removed.
        let victim = dir.path().join("shelf").join(roots[5].to_hex());
        let mut bytes = fs::read(&victim).unwrap();
        bytes.push(0);
        fs::write(&victim, bytes).unwrap();
        let kept = shelf.open_all(&header());
        assert_eq!(kept.len(), Shelf::KEEP - 1);
        assert!(!victim.exists());
    }

    #[test]
    fn an_unpublished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let w = StoreWriter::create(&dir.path().join("m"), &header()).unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
