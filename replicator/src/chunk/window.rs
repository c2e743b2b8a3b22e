//! The recent chunks of a streamed session, in bounded memory at both ends.
//!
//! A first sync sends each chunk once: a chunk that occurs again (a copied file, a repeated
//! block) is copied by the receiver from where it wrote it. Remembering *every* chunk for
//! that costs per chunk at both ends (a million small files: ~50 MiB at the sender, ~130 MiB
//! at the receiver with the names of the files holding them), growing without bound with the
//! volume. A window remembers a bounded number of them instead: each id has one slot, chosen by
//! bits of the id, and the latest chunk put in a slot holds it.
//!
//! Both ends keep one and follow the same rule, so they agree on what the receiver can copy
//! without a word on the wire: for every chunk segment of every file entry, in manifest order,
//! a chunk whose slot holds its id is not sent (the receiver copies it); any other chunk is
//! sent and takes its slot at both ends. A chunk that recurs after another took its slot is
//! simply sent again. The window starts small and doubles each time the chunks put in it reach
//! twice its slots, up to [`MAX_SLOTS`]: a small sync keeps a small window, and both ends grow
//! theirs at the same put. The rule is protocol (docs/protocol.md, streamed sessions), and so
//! are the sizes.
//!
//! Keys are the 128-bit prefix ([`ChunkId::prefix`]) and a slot is its top bits, so doubling
//! moves each key to one of two new slots without losing any. Every chunk copied through the
//! window is checked against its whole id before it is trusted, and two chunks with one prefix
//! take ~2^64 work to find.

use super::ChunkId;

/// Slots a session's window starts with and grows to (powers of two), fixed by the protocol:
/// at most 4 MiB of ids at the sender, 8 MiB with places at the receiver. Unit tests use a
/// small window so that their syncs evict, grow and reuse slots all the time.
pub const MIN_SLOTS: usize = if cfg!(test) { 1 << 4 } else { 1 << 12 };
pub const MAX_SLOTS: usize = if cfg!(test) { 1 << 6 } else { 1 << 18 };

/// A direct-mapped cache from chunk ids to `V` (see the module docs).
#[derive(Clone)]
pub struct ChunkWindow<V> {
    /// The key in each slot; 0 marks an empty slot (a real prefix of 0 is stored as 1, which
    /// has the same top bits).
    keys: Vec<u128>,
    values: Vec<V>,
    /// Puts since the window last grew.
    puts: usize,
}

impl<V> Default for ChunkWindow<V> {
    fn default() -> Self {
        ChunkWindow {
            keys: Vec::new(),
            values: Vec::new(),
            puts: 0,
        }
    }
}

impl<V> std::fmt::Debug for ChunkWindow<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.keys.iter().filter(|k| **k != 0).count();
        f.debug_struct("ChunkWindow")
            .field("slots", &self.keys.len())
            .field("held", &held)
            .finish()
    }
}

/// The slot of a key in a window of `slots` slots: the key's top bits.
fn slot_of_key(key: u128, slots: usize) -> usize {
    (key >> (128 - slots.trailing_zeros())) as usize
}

/// The slot of `id` in a window of `slots` slots.
pub fn slot(id: &ChunkId, slots: usize) -> usize {
    slot_of_key(key(id), slots)
}

fn key(id: &ChunkId) -> u128 {
    id.prefix().max(1)
}

impl<V: Clone + Default> ChunkWindow<V> {
    /// Slots now (0 before the first put).
    pub fn slots(&self) -> usize {
        self.keys.len()
    }

    /// The value put with `id`, if `id` still holds its slot.
    pub fn get(&self, id: &ChunkId) -> Option<&V> {
        if self.keys.is_empty() {
            return None;
        }
        let s = slot(id, self.keys.len());
        (self.keys[s] == key(id)).then(|| &self.values[s])
    }

    /// Puts `id` in its slot with `value`, evicting whatever held it; then doubles the window
    /// if the puts since it last grew reached twice its slots.
    pub fn put(&mut self, id: &ChunkId, value: V) {
        if self.keys.is_empty() {
            self.keys = vec![0; MIN_SLOTS];
            self.values = vec![V::default(); MIN_SLOTS];
        }
        let s = slot(id, self.keys.len());
        self.keys[s] = key(id);
        self.values[s] = value;
        self.puts += 1;
        if self.puts >= 2 * self.keys.len() && self.keys.len() < MAX_SLOTS {
            self.grow();
        }
    }

    fn grow(&mut self) {
        let slots = self.keys.len() * 2;
        let mut keys = vec![0; slots];
        let mut values = vec![V::default(); slots];
        for (k, v) in self.keys.iter().zip(self.values.drain(..)) {
            if *k != 0 {
                let s = slot_of_key(*k, slots);
                keys[s] = *k;
                values[s] = v;
            }
        }
        (self.keys, self.values, self.puts) = (keys, values, 0);
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

    /// Two ids of one slot in a window of `slots`.
    fn colliding(slots: usize) -> (ChunkId, ChunkId) {
        let first = id(0);
        let other = (1..)
            .map(id)
            .find(|o| slot(o, slots) == slot(&first, slots));
        (first, other.expect("ids fill every slot"))
    }

    #[test]
    fn the_latest_id_in_a_slot_holds_it() {
        let mut w: ChunkWindow<u32> = ChunkWindow::default();
        let (a, b) = colliding(MIN_SLOTS);
        assert_eq!(w.get(&a), None);
        w.put(&a, 1);
        assert_eq!(w.slots(), MIN_SLOTS);
        assert_eq!(w.get(&a), Some(&1));
        w.put(&b, 2);
        assert_eq!(w.get(&a), None, "evicted by an id of the same slot");
        assert_eq!(w.get(&b), Some(&2));
        assert!(w.first(&a), "an evicted id is new again");
        assert!(!w.first(&a));
        assert_eq!(w.values_mut().count(), 1);
    }

    #[test]
    fn growing_keeps_every_id_held_and_stops_at_the_largest_window() {
        let mut w: ChunkWindow<u32> = ChunkWindow::default();
        let mut n = 0;
        while w.slots() < MAX_SLOTS {
            let before = w.slots();
            // Held before this put, but for what the put itself evicts.
            let new = id(n);
            let held: Vec<ChunkId> = (0..n)
                .map(id)
                .filter(|c| w.get(c).is_some() && slot(c, before) != slot(&new, before))
                .collect();
            w.put(&new, n);
            n += 1;
            if w.slots() > before && before > 0 {
                assert_eq!(w.slots(), before * 2);
                assert!(
                    held.iter().all(|c| w.get(c).is_some()),
                    "lost an id growing"
                );
            }
        }
        assert_eq!(
            n as usize,
            2 * (MAX_SLOTS - MIN_SLOTS),
            "grew after twice its slots"
        );
        for i in n..n + 4 * MAX_SLOTS as u32 {
            w.put(&id(i), i);
        }
        assert_eq!(w.slots(), MAX_SLOTS);
    }

    #[test]
    fn a_prefix_of_zero_is_still_a_key() {
        let mut w: ChunkWindow<()> = ChunkWindow::default();
        let zero = ChunkId([0; 32]);
        assert!(w.get(&zero).is_none(), "an empty window holds nothing");
        assert!(w.first(&id(1)));
        assert!(w.get(&zero).is_none(), "an empty slot holds nothing");
        assert!(w.first(&zero));
        assert!(!w.first(&zero));
    }

    proptest! {
        /// The window answers as a model does: a slot per id by its top bits, the latest id
        /// put there holding it, the slots doubling after twice as many puts.
        #[test]
        fn matches_a_model_of_the_rule(ids in proptest::collection::vec(0u32..400, 1..600)) {
            let mut w: ChunkWindow<u32> = ChunkWindow::default();
            let (mut slots, mut puts) = (MIN_SLOTS, 0);
            let mut model: std::collections::HashMap<usize, ChunkId> = Default::default();
            for (n, i) in ids.into_iter().enumerate() {
                let c = id(i);
                let held = model.get(&slot(&c, slots)) == Some(&c);
                prop_assert_eq!(w.get(&c).is_some(), held);
                if !held {
                    w.put(&c, n as u32);
                    model.insert(slot(&c, slots), c);
                    puts += 1;
                    if puts >= 2 * slots && slots < MAX_SLOTS {
                        slots *= 2;
                        puts = 0;
                        model = model.into_values().map(|c| (slot(&c, slots), c)).collect();
                    }
                }
            }
            prop_assert_eq!(w.slots(), slots);
            prop_assert_eq!(w.values_mut().count(), model.len());
        }
    }
}
