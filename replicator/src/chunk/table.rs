//! Tables with an entry per chunk, keyed by [`ChunkId::prefix`], that grow without a spike.
//!
//! A hash table grows by allocating one twice its size and moving everything over, so at
//! that moment it takes three times what it holds: for a million chunks, 100 MB where 33 MB
//! would do. These tables are split into 256 shards by the id's first byte (uniform: ids are
//! BLAKE3 hashes), each growing on its own, so the peak stays near the steady size. Keys are
//! 128-bit prefixes: every chunk found through a table is checked against its whole id
//! before anything trusts it, and finding two chunks with one prefix takes ~2^64 work.

use std::collections::HashMap;
use std::hash::BuildHasher;

use super::ChunkId;

const SHARDS: usize = 256;

/// A map from chunk ids (by prefix) to `V`, built with hasher `S`: std's keyed SipHash where a
/// peer can choose the keys, something faster where only the host's own disk can.
pub struct ChunkTable<V, S = std::collections::hash_map::RandomState> {
    shards: Vec<HashMap<u128, V, S>>,
}

impl<V, S: BuildHasher + Default> Default for ChunkTable<V, S> {
    fn default() -> Self {
        ChunkTable {
            shards: (0..SHARDS).map(|_| HashMap::default()).collect(),
        }
    }
}

impl<V, S> std::fmt::Debug for ChunkTable<V, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len: usize = self.shards.iter().map(HashMap::len).sum();
        f.debug_struct("ChunkTable").field("len", &len).finish()
    }
}

impl<V, S: BuildHasher> ChunkTable<V, S> {
    fn shard(id: &ChunkId) -> usize {
        usize::from(id.0[0])
    }

    pub fn get(&self, id: &ChunkId) -> Option<&V> {
        self.shards[Self::shard(id)].get(&id.prefix())
    }

    /// Records `value` for `id` unless it has one; true if it was new.
    pub fn insert_new(&mut self, id: &ChunkId, value: V) -> bool {
        match self.shards[Self::shard(id)].entry(id.prefix()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(value);
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_value_for_an_id_stays() {
        let mut t: ChunkTable<u32> = ChunkTable::default();
        assert!(t.is_empty());
        let id = |i: u32| ChunkId::of(&i.to_le_bytes());
        for i in 0..10_000 {
            assert!(t.insert_new(&id(i), i));
        }
        assert!(!t.insert_new(&id(5), 99));
        assert_eq!(t.len(), 10_000);
        assert_eq!(t.get(&id(5)), Some(&5));
        assert_eq!(t.get(&id(10_001)), None);
        // Ids spread over the shards.
        assert!(t.shards.iter().all(|s| !s.is_empty()));
    }
}
