//! The ownership map's key table: from a key to the arena block holding its segments.
//!
//! Ours rather than hashbrown's so that lookups can be prepared ahead. On a map of a million
//! IPs a lookup is two dependent DRAM misses, the key's slot and then its segments; a caller
//! working through a batch hides them by asking for both several items ahead. That needs the
//! slot's address from the hash alone. hashbrown does not expose it, so a "prefetch" through it
//! has to probe, and the probe waits for the very miss it meant to hide.
//!
//! Robin Hood linear probing over 32-byte slots, two to a cache line. Keys of a run stay
//! sorted by home slot, so a key sits only a few slots past its home (under two on average at
//! the 80% maximum load) and the home line plus the next cover nearly every lookup; a search
//! for a missing key stops as soon as it meets a key closer to its own home. Any capacity
//! works (the home is a multiply-shift of the hash, not a mask), so the table grows by half,
//! not double: a key costs 32 / 0.8 = 40 bytes right before a growth and 60 right after,
//! inside the 64-byte budget.
//!
//! The hash is keyed by a per-table random seed, so addresses chosen by a remote party cannot
//! be aimed at one run of slots.

use flowattr_common::CanonicalIp;

use super::arena::{Block, prefetch_line};

/// One owned thing: a whole IP (`port == 0`) or one port of a shared IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct OwnershipKey {
    pub ip: CanonicalIp,
    pub port: u16,
}

#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
struct Slot {
    key: OwnershipKey,
    /// 0: empty. Otherwise 1 + how many slots past its key's home this slot is.
    probe: u32,
    block: Block,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 32);

impl Slot {
    const EMPTY: Slot = Slot {
        key: OwnershipKey {
            ip: CanonicalIp::UNSPECIFIED,
            port: 0,
        },
        probe: 0,
        block: Block::UNUSED,
    };

    fn is_empty(&self) -> bool {
        self.probe == 0
    }
}

/// Where an absent key belongs, from [`KeyTable::find`]; valid until the table next changes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Vacancy {
    index: usize,
    probe: u32,
}

/// The smallest table allocated, on the first insert.
const CAPACITY_MIN: usize = 16;

#[derive(Debug)]
pub(super) struct KeyTable {
    slots: Vec<Slot>,
    len: usize,
    seed: [u64; 3],
}

impl Default for KeyTable {
    fn default() -> Self {
        Self::with_seed(fastrand::u64(..))
    }
}

impl KeyTable {
    pub(super) fn with_seed(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        KeyTable {
            slots: Vec::new(),
            len: 0,
            seed: [rng.u64(..), rng.u64(..), rng.u64(..) | 1],
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The slot holding `key`, or where it would go.
    pub(super) fn find(&self, key: &OwnershipKey) -> Result<usize, Vacancy> {
        let capacity = self.slots.len();
        if capacity == 0 {
            return Err(Vacancy { index: 0, probe: 1 });
        }
        let mut index = self.home(key);
        let mut probe = 1;
        // Ends: the load stays under 80%, so an empty slot (probe 0) is always met.
        loop {
            let slot = &self.slots[index];
            if slot.probe < probe {
                return Err(Vacancy { index, probe });
            }
            if slot.key == *key {
                return Ok(index);
            }
            index += 1;
            if index == capacity {
                index = 0;
            }
            probe += 1;
        }
    }

    pub(super) fn get(&self, key: &OwnershipKey) -> Option<Block> {
        self.find(key).ok().map(|index| self.slots[index].block)
    }

    /// The block of the key [`Self::find`] found at `index`.
    pub(super) fn block(&self, index: usize) -> Block {
        self.slots[index].block
    }

    pub(super) fn set_block(&mut self, index: usize, block: Block) {
        debug_assert!(!self.slots[index].is_empty());
        self.slots[index].block = block;
    }

    /// Adds `key`, absent, where `find` said it belongs.
    pub(super) fn insert_at(&mut self, vacancy: Vacancy, key: OwnershipKey, block: Block) {
        let mut vacancy = vacancy;
        if (self.len + 1) * 5 > self.slots.len() * 4 {
            self.grow();
            vacancy = self.find(&key).expect_err("the key was absent");
        }
        self.place(
            vacancy,
            Slot {
                key,
                probe: 0,
                block,
            },
        );
        self.len += 1;
    }

    /// Starts loading the cache lines `key`'s slot most likely sits in, without waiting.
    pub(super) fn prefetch(&self, key: &OwnershipKey) {
        if self.slots.is_empty() {
            return;
        }
        let home = self.slots.as_ptr().wrapping_add(self.home(key));
        prefetch_line(home.cast());
        // Two slots a line: the next line holds the next two slots.
        prefetch_line(home.wrapping_add(2).cast());
    }

    /// Keeps the keys for which `keep` returns true (it may change their blocks), in one sweep
    /// that also closes the gaps the removed keys leave.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&OwnershipKey, &mut Block) -> bool) {
        let capacity = self.slots.len();
        // The sweep starts at an empty slot, which no key's probe run crosses: in sweep order
        // every key's home comes at or before its slot. There is always one (load < 80%).
        let Some(start) = self.slots.iter().position(Slot::is_empty) else {
            return;
        };
        let wrap = |offset: usize| {
            let index = start + offset;
            if index >= capacity {
                index - capacity
            } else {
                index
            }
        };
        // Sweep offset of the first slot a kept key may move back to.
        let mut free = 0;
        for offset in 0..capacity {
            let index = wrap(offset);
            let mut slot = std::mem::replace(&mut self.slots[index], Slot::EMPTY);
            if slot.is_empty() {
                free = offset + 1;
                continue;
            }
            if !keep(&slot.key, &mut slot.block) {
                self.len -= 1;
                continue;
            }
            // Keys keep their order, so runs stay sorted by home; each moves back as far as its
            // home and the keys before it allow.
            let home = offset + 1 - slot.probe as usize;
            let target = home.max(free);
            slot.probe = (target - home + 1) as u32;
            self.slots[wrap(target)] = slot;
            free = target + 1;
        }
    }

    pub(super) fn blocks_mut(&mut self) -> impl Iterator<Item = &mut Block> {
        self.slots
            .iter_mut()
            .filter(|slot| !slot.is_empty())
            .map(|slot| &mut slot.block)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&OwnershipKey, Block)> {
        self.slots
            .iter()
            .filter(|slot| !slot.is_empty())
            .map(|slot| (&slot.key, slot.block))
    }

    pub(super) fn allocation_size(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
    }

    fn home(&self, key: &OwnershipKey) -> usize {
        // Multiply-shift maps the hash onto 0..capacity using its high bits, for any capacity.
        ((u128::from(self.hash(key)) * self.slots.len() as u128) >> 64) as usize
    }

    fn hash(&self, key: &OwnershipKey) -> u64 {
        let octets = key.ip.octets();
        let (high, low) = octets.split_at(8);
        let high = u64::from_le_bytes(high.try_into().expect("8 bytes"));
        let low = u64::from_le_bytes(low.try_into().expect("8 bytes"));
        let mixed = folded_multiply(high ^ self.seed[0], low ^ self.seed[1]);
        folded_multiply(mixed ^ u64::from(key.port), self.seed[2])
    }

    /// Robin Hood insertion: walking from the vacancy, a key further from its home than the
    /// slot's occupant takes the slot, and the occupant walks on.
    fn place(&mut self, vacancy: Vacancy, slot: Slot) {
        let capacity = self.slots.len();
        let mut carried = Slot {
            probe: vacancy.probe,
            ..slot
        };
        let mut index = vacancy.index;
        loop {
            let occupant = &mut self.slots[index];
            if occupant.is_empty() {
                *occupant = carried;
                return;
            }
            if occupant.probe < carried.probe {
                std::mem::swap(occupant, &mut carried);
            }
            index += 1;
            if index == capacity {
                index = 0;
            }
            carried.probe += 1;
        }
    }

    fn grow(&mut self) {
        let capacity = (self.slots.len() + self.slots.len() / 2).max(CAPACITY_MIN);
        let old = std::mem::replace(&mut self.slots, vec![Slot::EMPTY; capacity]);
        for slot in old.into_iter().filter(|slot| !slot.is_empty()) {
            let home = self.home(&slot.key);
            self.place(
                Vacancy {
                    index: home,
                    probe: 1,
                },
                slot,
            );
        }
    }
}

/// The high and low halves of the full product, xored: every input bit reaches the high bits
/// the home is taken from.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

#[cfg(test)]
impl KeyTable {
    /// Panics unless every key is found where it is, its probe count matches its home, and
    /// runs are sorted by home.
    pub(super) fn check_invariants(&self) {
        let capacity = self.slots.len();
        let occupied = self.slots.iter().filter(|slot| !slot.is_empty()).count();
        assert_eq!(occupied, self.len, "len counts the occupied slots");
        assert!(self.len * 5 <= capacity * 4, "load at most 80%");
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.is_empty() {
                continue;
            }
            let home = self.home(&slot.key);
            let distance = (index + capacity - home) % capacity;
            assert_eq!(
                slot.probe as usize,
                distance + 1,
                "probe count of {:?}",
                slot.key
            );
            assert_eq!(
                self.find(&slot.key).ok(),
                Some(index),
                "{:?} found where it is",
                slot.key
            );
            // Every slot between home and here is occupied by a key at least as far from home.
            let previous = &self.slots[(index + capacity - 1) % capacity];
            if slot.probe > 1 {
                assert!(
                    previous.probe + 1 >= slot.probe,
                    "run sorted by home at {index}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    fn key(ip: u32, port: u16) -> OwnershipKey {
        OwnershipKey {
            ip: CanonicalIp::from(Ipv4Addr::from(0x0A00_0000 + ip)),
            port,
        }
    }

    /// Sets `key` to `block`, adding it if absent, as the map's insert does.
    fn upsert(table: &mut KeyTable, key: OwnershipKey, block: Block) {
        match table.find(&key) {
            Ok(index) => table.set_block(index, block),
            Err(vacancy) => table.insert_at(vacancy, key, block),
        }
    }

    fn assert_same(table: &KeyTable, model: &BTreeMap<OwnershipKey, Block>, pool: u32) {
        table.check_invariants();
        assert_eq!(table.len(), model.len());
        let stored: BTreeMap<OwnershipKey, Block> =
            table.iter().map(|(key, block)| (*key, block)).collect();
        assert_eq!(&stored, model);
        for ip in 0..pool {
            for port in [0, 1] {
                assert_eq!(
                    table.get(&key(ip, port)),
                    model.get(&key(ip, port)).copied()
                );
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Upsert(u32, u16, u32),
        /// Keeps the keys whose IP is not `ip % modulus`, renumbering the kept ones' blocks.
        Retain(u32, u32),
    }

    const POOL: u32 = 400;

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            30 => (0..POOL, 0u16..2, any::<u32>()).prop_map(|(ip, port, block)| Op::Upsert(ip, port, block)),
            1 => (1u32..5, 0u32..5).prop_map(|(modulus, ip)| Op::Retain(modulus, ip % modulus)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Growth, wrap-around at the table's end, Robin Hood displacement and the retain sweep,
        /// against an ordered map.
        #[test]
        fn table_agrees_with_an_ordered_map(seed in any::<u64>(), ops in proptest::collection::vec(arb_op(), 0..600)) {
            let mut table = KeyTable::with_seed(seed);
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Upsert(ip, port, block) => {
                        upsert(&mut table, key(ip, port), Block::numbered(block));
                        model.insert(key(ip, port), Block::numbered(block));
                    }
                    Op::Retain(modulus, removed) => {
                        let keep = |key: &OwnershipKey| u32::from_be_bytes(key.ip.octets()[12..].try_into().unwrap()) % modulus != removed;
                        let renumber = |block: &mut Block| *block = Block::numbered(!block.offset_for_test());
                        table.retain(|key, block| {
                            renumber(block);
                            keep(key)
                        });
                        model.retain(|key, block| {
                            renumber(block);
                            keep(key)
                        });
                    }
                }
                table.check_invariants();
            }
            assert_same(&table, &model, POOL);
        }
    }

    #[test]
    fn a_large_table_keeps_every_key_through_growth_and_removal() {
        let mut table = KeyTable::with_seed(1);
        let mut model = BTreeMap::new();
        for ip in 0..50_000 {
            upsert(&mut table, key(ip, 0), Block::numbered(ip));
            model.insert(key(ip, 0), Block::numbered(ip));
        }
        assert_same(&table, &model, 50_000);
        let bytes_per_key = table.allocation_size() as f64 / table.len() as f64;
        assert!(
            (40.0..=64.0).contains(&bytes_per_key),
            "{bytes_per_key} bytes a key"
        );
        table.retain(|key, _| key.ip.octets()[15] % 3 != 0);
        model.retain(|key, _| key.ip.octets()[15] % 3 != 0);
        assert_same(&table, &model, 50_000);
    }
}
