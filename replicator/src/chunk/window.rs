//! The recent chunks of a streamed session, in a fixed amount of memory at both ends.
//!
//! A first sync sends each chunk once: a chunk that occurs again (a copied file, a repeated
//! block) is copied by the receiver from where it wrote it. Remembering *every* chunk for
//! that costs per chunk at both ends (a million small files: ~50 MiB at the sender, ~130 MiB
//! at the receiver with the names of the files holding them), growing without bound with the
//! volume. A window remembers a fixed number of them instead: each id has one slot, chosen by
//! bits of the id, and the latest chunk put in a slot holds it.
//!
//! Both ends keep one and follow the same rule, so they agree on what the receiver can copy
//! without a word on the wire: for every chunk segment of every file entry, in manifest order,
//! a chunk whose slot holds its id is not sent (the receiver copies it); any other chunk is
//! sent and takes its slot at both ends. A chunk that recurs after another took its slot is
//! simply sent again. The rule is protocol (docs/protocol.md, streamed sessions), and so is
//! the slot count.
//!
//! Slots are chosen from id bytes 16..24, keys are the 128-bit prefix ([`ChunkId::prefix`]):
//! every chunk copied through the window is checked against its whole id before it is
//! trusted, and two chunks with one prefix take ~2^64 work to find.

use super::ChunkId;

/// Slots in a session's window (a power of two), fixed by the protocol: 4 MiB of ids at the
/// sender, 8 MiB with places at the receiver. Unit tests use a small window so that their
/// syncs evict and reuse slots all the time.
pub const WINDOW_SLOTS: usize = if cfg!(test) { 1 << 6 } else { 1 << 18 };

/// A direct-mapped cache from chunk ids to `V` (see the module docs).
#[derive(Clone)]
pub struct ChunkWindow<V> {
    /// The key in each slot; 0 marks an empty slot (a real prefix of 0 is stored as 1).
    keys: Vec<u128>,
    values: Vec<V>,
}

impl<V> Default for ChunkWindow<V> {
    fn default() -> Self {
        ChunkWindow {
            keys: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<V> std::fmt::Debug for ChunkWindow<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.keys.iter().filter(|k| **k != 0).count();
        f.debug_struct("ChunkWindow").field("held", &held).finish()
    }
}

/// The slot of `id` in every window.
pub fn slot(id: &ChunkId) -> usize {
    let mut word = [0u8; 8];
    word.copy_from_slice(&id.0[16..24]);
    (u64::from_le_bytes(word) >> (64 - WINDOW_SLOTS.trailing_zeros())) as usize
}

fn key(id: &ChunkId) -> u128 {
    id.prefix().max(1)
}

impl<V: Clone + Default> ChunkWindow<V> {
    /// The value put with `id`, if `id` still holds its slot.
    pub fn get(&self, id: &ChunkId) -> Option<&V> {
        let s = slot(id);
        (self.keys.get(s) == Some(&key(id))).then(|| &self.values[s])
    }

    /// Puts `id` in its slot with `value`, evicting whatever held it.
    pub fn put(&mut self, id: &ChunkId, value: V) {
        if self.keys.is_empty() {
            // Allocated on first use: a session without chunks costs nothing.
            self.keys = vec![0; WINDOW_SLOTS];
            self.values = vec![V::default(); WINDOW_SLOTS];
        }
        let s = slot(id);
        self.keys[s] = key(id);
        self.values[s] = value;
    }

    /// The sender's rule: true (and `id` takes its slot) unless `id` holds its slot already.
    pub fn first(&mut self, id: &ChunkId) -> bool {
        if self.get(id).is_some() {
            return false;
        }
        self.put(id, V::default());
        true
    }

    /// The values of the slots that hold a chunk.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.keys
            .iter()
            .zip(&mut self.values)
            .filter(|(k, _)| **k != 0)
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(i: u32) -> ChunkId {
        ChunkId::of(&i.to_le_bytes())
    }

    /// Two ids of one slot.
    fn colliding() -> (ChunkId, ChunkId) {
        let first = id(0);
        let other = (1..).map(id).find(|o| slot(o) == slot(&first));
        (first, other.expect("ids fill every slot"))
    }

    #[test]
    fn the_latest_id_in_a_slot_holds_it() {
        let mut w: ChunkWindow<u32> = ChunkWindow::default();
        let (a, b) = colliding();
        assert_eq!(w.get(&a), None);
        w.put(&a, 1);
        assert_eq!(w.get(&a), Some(&1));
        w.put(&b, 2);
        assert_eq!(w.get(&a), None, "evicted by an id of the same slot");
        assert_eq!(w.get(&b), Some(&2));
        assert!(w.first(&a), "an evicted id is new again");
        assert!(!w.first(&a));
        assert_eq!(w.values_mut().count(), 1);
    }

    #[test]
    fn a_prefix_of_zero_is_still_a_key() {
        let mut w: ChunkWindow<()> = ChunkWindow::default();
        let zero = ChunkId([0; 32]);
        assert!(w.get(&zero).is_none(), "an empty slot holds nothing");
        assert!(w.first(&zero));
        assert!(!w.first(&zero));
    }

    proptest! {
        /// The window answers as a map of the latest id per slot would.
        #[test]
        fn matches_a_map_of_the_latest_id_per_slot(ids in proptest::collection::vec(0u32..400, 1..600)) {
            let mut w: ChunkWindow<u32> = ChunkWindow::default();
            let mut model = std::collections::HashMap::new();
            for (n, i) in ids.into_iter().enumerate() {
                let c = id(i);
                let held = model.get(&slot(&c)) == Some(&c);
                prop_assert_eq!(w.get(&c).is_some(), held);
                if !held {
                    w.put(&c, n as u32);
                    model.insert(slot(&c), c);
                }
            }
            prop_assert_eq!(w.values_mut().count(), model.len());
        }
    }
}
