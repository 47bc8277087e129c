//! The memory all exporter connections hold in frames they have begun and not finished,
//! bounded together (`ingest.max_partial_frame_bytes`). A frame may be as large as
//! `ingest.max_frame_bytes`, and a client may send most of one and stop: without a bound over
//! every connection, a few thousand such clients push the node to its memory cap, where ingest
//! pauses for everyone. Each connection reads up to [`FREE_BYTES`] without asking; past that it
//! reserves from the budget before each read and waits (reading nothing, so TCP pushes back on
//! its sender) while the budget is spent. Those who spent it either finish their frames or are
//! closed by the idle timeout, which frees it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes ingest reads from a socket at a time.
pub const READ_CHUNK: usize = 256 << 10;

/// What one connection may hold (a partial frame plus one read) without the budget.
pub const FREE_BYTES: usize = 2 * READ_CHUNK;

#[derive(Debug)]
pub struct PartialFrameBudget {
    cap: u64,
    held: AtomicU64,
}

impl PartialFrameBudget {
    pub fn new(cap: u64) -> PartialFrameBudget {
        PartialFrameBudget {
            cap,
            held: AtomicU64::new(0),
        }
    }

    /// Bytes reserved now, over every connection.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    fn grow(&self, bytes: u64) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held + bytes <= self.cap).then_some(held + bytes)
            })
            .is_ok()
    }

    fn shrink(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One connection's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct PartialFrameHold<'a> {
    budget: &'a PartialFrameBudget,
    held: u64,
}

impl<'a> PartialFrameHold<'a> {
    pub fn new(budget: &'a PartialFrameBudget) -> Self {
        PartialFrameHold { budget, held: 0 }
    }

    /// Makes the hold cover a receive buffer of `bytes`: always possible when shrinking or
    /// within [`FREE_BYTES`], otherwise only if the budget has room. False: wait and ask again.
    pub fn cover(&mut self, bytes: usize) -> bool {
        let needed = bytes.saturating_sub(FREE_BYTES) as u64;
        if needed <= self.held {
            self.budget.shrink(self.held - needed);
            self.held = needed;
            return true;
        }
        if self.budget.grow(needed - self.held) {
            self.held = needed;
            return true;
        }
        false
    }
}

impl Drop for PartialFrameHold<'_> {
    fn drop(&mut self) {
        self.budget.shrink(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_past_the_free_bytes_share_the_budget_and_give_it_back() {
        let budget = PartialFrameBudget::new(100);
        let mut a = PartialFrameHold::new(&budget);
        let mut b = PartialFrameHold::new(&budget);
        assert!(a.cover(FREE_BYTES), "free bytes need no budget");
        assert_eq!(budget.held(), 0);
        assert!(a.cover(FREE_BYTES + 60));
        assert!(!b.cover(FREE_BYTES + 41), "60 + 41 is over 100");
        assert_eq!(budget.held(), 60, "a refused hold takes nothing");
        assert!(b.cover(FREE_BYTES + 40));
        assert!(a.cover(FREE_BYTES + 10), "shrinking always works");
        assert_eq!(budget.held(), 50);
        drop(b);
        assert_eq!(budget.held(), 10);
        drop(a);
        assert_eq!(budget.held(), 0);
    }
}
