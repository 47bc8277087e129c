//! One `Vec<Segment>` holding every key's segments in power-of-two blocks.
//!
//! A `Vec` per key would cost 24 bytes in the hash bucket plus a heap allocation (with its
//! allocator header) per IP; a block reference is 8 bytes and blocks of a size class are
//! recycled through a free list. Growth doubles a block like `Vec` does, so the slack is the
//! same, and the map never calls the allocator per flow once warm.

use super::segment::Segment;

/// Size classes 0..=10: blocks of 1, 2, 4 … 1024 segments.
const CLASS_COUNT: usize = 11;
pub(super) const BLOCK_SEGMENTS_MAX: usize = 1 << (CLASS_COUNT - 1);
/// The smallest arena growth step, so a small map does not reallocate on every new key.
const ARENA_GROWTH_SEGMENTS_MIN: usize = 4096;

const CACHE_LINE: usize = 64;
/// About ten segments: of a key with more, only the newest are loaded ahead, as lookups are
/// mostly of recent instants.
const PREFETCH_LINES_MAX: usize = 4;

/// Where one key's segments live: `len` segments from `offset`, in a block of `1 << class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Block {
    offset: u32,
    len: u16,
    class: u8,
}

const _: () = assert!(std::mem::size_of::<Block>() == 8);
const _: () = assert!(BLOCK_SEGMENTS_MAX <= u16::MAX as usize);

impl Block {
    /// Filler for the key table's empty slots; never read as a key's block.
    pub(super) const UNUSED: Block = Block {
        offset: 0,
        len: 0,
        class: 0,
    };

    pub(super) fn len(&self) -> usize {
        self.len as usize
    }

    /// A distinct block per `offset`, for tests of what stores blocks without reading them.
    #[cfg(test)]
    pub(super) fn numbered(offset: u32) -> Block {
        Block {
            offset,
            len: 1,
            class: 0,
        }
    }

    #[cfg(test)]
    pub(super) fn offset_for_test(&self) -> u32 {
        self.offset
    }

    fn capacity(&self) -> usize {
        1 << self.class
    }

    fn range(&self) -> std::ops::Range<usize> {
        let start = self.offset as usize;
        start..start + self.len as usize
    }
}

#[derive(Debug, Default)]
pub(super) struct SegmentArena {
    segments: Vec<Segment>,
    /// Offsets of free blocks, per size class.
    free: [Vec<u32>; CLASS_COUNT],
    /// Slots in free blocks, for memory accounting.
    free_slots: usize,
}

impl SegmentArena {
    pub(super) fn get(&self, block: Block) -> &[Segment] {
        &self.segments[block.range()]
    }

    /// Asks the CPU to start loading `block`'s segments into cache, without waiting for them:
    /// every line they span, up to [`PREFETCH_LINES_MAX`] (a lookup's binary search touches
    /// lines across the whole block).
    pub(super) fn prefetch(&self, block: Block) {
        let Some(segments) = self.segments.get(block.range()) else {
            return;
        };
        let first = segments.as_ptr().cast::<u8>();
        let end = first.addr() + std::mem::size_of_val(segments);
        let from = end
            .saturating_sub(PREFETCH_LINES_MAX * CACHE_LINE)
            .max(first.addr());
        // Line-aligned steps, so a block starting mid-line still gets its last line.
        for line in (from & !(CACHE_LINE - 1)..end).step_by(CACHE_LINE) {
            prefetch_line(first.wrapping_add(line.wrapping_sub(first.addr())));
        }
    }

    /// Replaces the contents of `block` with `segments`, moving to a block of another size
    /// class when they do not fit or would leave three quarters of it empty.
    pub(super) fn store(&mut self, block: Option<Block>, segments: &[Segment]) -> Option<Block> {
        assert!(
            segments.len() <= BLOCK_SEGMENTS_MAX,
            "caller bounds segments per key"
        );
        if segments.is_empty() {
            if let Some(block) = block {
                self.release(block);
            }
            return None;
        }
        let block = match block {
            Some(block) if fits(block, segments.len()) => block,
            Some(block) => {
                self.release(block);
                self.allocate(segments.len())
            }
            None => self.allocate(segments.len()),
        };
        let start = block.offset as usize;
        self.segments[start..start + segments.len()].copy_from_slice(segments);
        // Fits in u16: asserted against BLOCK_SEGMENTS_MAX above.
        Some(Block {
            len: segments.len() as u16,
            ..block
        })
    }

    /// The newest segment of a key, for a heartbeat that only extends it (the common case).
    pub(super) fn last_mut(&mut self, block: Block) -> Option<&mut Segment> {
        self.segments[block.range()].last_mut()
    }

    pub(super) fn release(&mut self, block: Block) {
        self.free[block.class as usize].push(block.offset);
        self.free_slots += block.capacity();
    }

    /// A block for `len` (at least one) segments.
    fn allocate(&mut self, len: usize) -> Block {
        debug_assert!(len > 0);
        let class = class_for(len);
        let offset = match self.free[class].pop() {
            Some(offset) => {
                self.free_slots -= 1 << class;
                offset
            }
            None => {
                let offset = u32::try_from(self.segments.len())
                    .expect("arena offsets fit u32: 4G segments is 96 GiB");
                self.reserve(1 << class);
                self.segments
                    .resize(self.segments.len() + (1 << class), Segment::UNUSED);
                offset
            }
        };
        Block {
            offset,
            len: 0,
            class: class as u8,
        }
    }

    /// Grows by an eighth instead of `Vec`'s doubling: the arena is most of a node's memory, and
    /// doubling would leave up to half of it idle (48 instead of 24 bytes per segment).
    fn reserve(&mut self, additional: usize) {
        let spare = self.segments.capacity() - self.segments.len();
        if spare < additional {
            let step = (self.segments.len() / 8)
                .max(ARENA_GROWTH_SEGMENTS_MIN)
                .max(additional);
            self.segments.reserve_exact(step);
        }
    }

    /// Slides every live block down to the front of the arena, each refitted to the smallest
    /// class that holds it, and returns the rest to the allocator.
    ///
    /// Needed because keys grow in lockstep (every IP gains a segment per heartbeat period), so
    /// the small blocks they outgrow are never wanted again. In place: blocks move in offset
    /// order and the write cursor never passes the block it reads.
    pub(super) fn compact<'a>(&mut self, blocks: impl Iterator<Item = &'a mut Block>) {
        let mut blocks: Vec<&mut Block> = blocks.collect();
        blocks.sort_unstable_by_key(|block| block.offset);
        let mut cursor = 0usize;
        for block in blocks {
            let len = block.len();
            let source = block.offset as usize;
            debug_assert!(
                cursor <= source,
                "compaction never overwrites unread blocks"
            );
            self.segments.copy_within(source..source + len, cursor);
            let class = class_for(len);
            // cursor <= source, which already fit u32.
            *block = Block {
                offset: cursor as u32,
                len: block.len,
                class: class as u8,
            };
            cursor += 1 << class;
        }
        self.segments.truncate(cursor);
        self.segments.shrink_to(cursor + cursor / 8);
        for list in &mut self.free {
            *list = Vec::new();
        }
        self.free_slots = 0;
    }

    /// Whether more than a quarter of the arena sits in free blocks.
    pub(super) fn is_fragmented(&self) -> bool {
        self.free_slots > ARENA_GROWTH_SEGMENTS_MIN && self.free_slots * 4 > self.segments.len()
    }

    pub(super) fn capacity_bytes(&self) -> usize {
        self.segments.capacity() * std::mem::size_of::<Segment>()
            + self
                .free
                .iter()
                .map(|list| list.capacity() * 4)
                .sum::<usize>()
    }

    pub(super) fn free_slots(&self) -> usize {
        self.free_slots
    }
}

fn class_for(len: usize) -> usize {
    len.next_power_of_two().trailing_zeros() as usize
}

fn fits(block: Block, len: usize) -> bool {
    len <= block.capacity() && len * 4 > block.capacity()
}

/// A hint to load the cache line holding `address`; never faults, whatever the address.
#[inline(always)]
pub(super) fn prefetch_line(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it reads no memory the program can observe and cannot
    // fault, whatever the address. SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}
