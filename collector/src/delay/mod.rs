//! The delay buffer: where a shard keeps flows for `delay` so that the heartbeats of their
//! remote side, reported by other hosts up to an exporter interval later, have arrived before
//! the flow is attributed.
//!
//! Per shard, two lanes of append-only segments: `fresh` (flows as they arrive, held `delay`)
//! and `retry` (flows that found no evidence, held `retry_delay`). A segment covers
//! `segment_span` of arrival time; once sealed and held long enough it is read back whole,
//! its flows attributed, and deleted. On disk a segment is a file written and read with
//! O_DIRECT through io_uring (glommio DMA files); in memory mode it is a byte vector with the
//! same encoding, so both modes run the same code but for the storage.
//!
//! The split between [`DelayBuffer`] (plain state, borrowed briefly by the shard's message
//! handlers) and [`SegmentWriter`] / [`read_segment`] (the awaiting I/O, owned by the shard's
//! writer and release tasks) keeps a `RefCell` borrow from ever living across an `.await`.
//! Segment files are reached through [`SegmentFiles`], so a model test can run this code on a
//! simulated disk that crashes, tears writes and corrupts sectors (`model_test.rs`).

pub mod codec;
pub mod files;
#[cfg(test)]
mod model_test;
pub mod recovery;
mod segment;
#[cfg(test)]
mod simulated_disk;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use flowattr_common::Timestamp;

use self::codec::{BlockHeader, BufferedFlow, encode_block};
pub use self::files::{DmaFiles, SegmentFiles};
pub use self::recovery::{RecoveredSegment, Repair, scan_recovered};
pub use self::segment::{
    SealedSegment, SegmentIds, SegmentWriter, read_segment, recover_segments, remove_segment,
};

/// The two queues of a shard's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Fresh,
    Retry,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Fresh, Lane::Retry];

    pub fn name(self) -> &'static str {
        match self {
            Lane::Fresh => "fresh",
            Lane::Retry => "retry",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where segments live.
#[derive(Debug, Clone)]
pub enum Storage {
    /// One directory per shard.
    Disk {
        dir: PathBuf,
    },
    Memory,
}

/// Encoded flows not yet handed to the writer, and what completes when they are durable.
#[derive(Debug)]
pub struct Unwritten<T> {
    pub bytes: Vec<u8>,
    pub flows: u64,
    pub completions: Vec<T>,
}

impl<T> Default for Unwritten<T> {
    fn default() -> Self {
        Unwritten {
            bytes: Vec::new(),
            flows: 0,
            completions: Vec::new(),
        }
    }
}

impl<T> Unwritten<T> {
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.completions.is_empty()
    }
}

#[derive(Debug)]
struct LaneState<T> {
    hold: Duration,
    unwritten: Unwritten<T>,
    sealed: VecDeque<SealedSegment>,
}

/// The shard's view of its buffer: what waits to be written, and the sealed segments in the
/// order they fall due. `T` is what the shard wants back when bytes are durable (acks).
#[derive(Debug)]
pub struct DelayBuffer<T> {
    lanes: [LaneState<T>; 2],
    buffered_flows: u64,
    buffered_bytes: u64,
    /// Taken for release, not yet deleted.
    releasing_bytes: u64,
    open_bytes: u64,
}

impl<T> DelayBuffer<T> {
    pub fn new(delay: Duration, retry_delay: Duration) -> Self {
        let lane = |hold| LaneState {
            hold,
            unwritten: Unwritten::default(),
            sealed: VecDeque::new(),
        };
        DelayBuffer {
            lanes: [lane(delay), lane(retry_delay)],
            buffered_flows: 0,
            buffered_bytes: 0,
            releasing_bytes: 0,
            open_bytes: 0,
        }
    }

    pub fn hold(&self, lane: Lane) -> Duration {
        self.lanes[lane.index()].hold
    }

    /// Encodes one block into `lane`. `completion` comes back from [`Self::take_unwritten`]'s
    /// caller once the block is durable.
    pub fn append<S: AsRef<str>>(
        &mut self,
        lane: Lane,
        header: &BlockHeader,
        workloads: &[S],
        flows: &[BufferedFlow],
    ) {
        let unwritten = &mut self.lanes[lane.index()].unwritten;
        encode_block(header, workloads, flows, &mut unwritten.bytes);
        unwritten.flows += flows.len() as u64;
    }

    /// Registers `completion` to be returned when everything appended so far is durable.
    pub fn complete_when_durable(&mut self, lane: Lane, completion: T) {
        self.lanes[lane.index()]
            .unwritten
            .completions
            .push(completion);
    }

    pub fn unwritten_bytes(&self) -> usize {
        self.lanes
            .iter()
            .map(|lane| lane.unwritten.bytes.len())
            .sum()
    }

    /// Segments taken by [`DelayBuffer::take_due`] whose files are now deleted.
    pub fn deleted(&mut self, bytes: u64) {
        self.releasing_bytes = self.releasing_bytes.saturating_sub(bytes);
    }

    /// What the writer reports its open segments hold.
    pub fn set_open_bytes(&mut self, bytes: u64) {
        self.open_bytes = bytes;
    }

    /// Bytes of the whole buffer as last known: segments being released and sealed ones,
    /// open ones, and flows not yet handed to the writer (what the writer is writing right now
    /// is not in it, and is at most one `take_unwritten`).
    pub fn total_bytes(&self) -> u64 {
        self.releasing_bytes + self.buffered_bytes + self.open_bytes + self.unwritten_bytes() as u64
    }

    /// Hands the lane's unwritten bytes to the writer.
    pub fn take_unwritten(&mut self, lane: Lane) -> Unwritten<T> {
        std::mem::take(&mut self.lanes[lane.index()].unwritten)
    }

    pub fn push_sealed(&mut self, segment: SealedSegment) {
        self.buffered_flows += segment.flows;
        self.buffered_bytes += segment.bytes;
        self.lanes[segment.lane.index()].sealed.push_back(segment);
    }

    /// The oldest sealed segment whose hold has passed at `now`, taken out of the queue.
    pub fn take_due(&mut self, now: Timestamp) -> Option<SealedSegment> {
        for lane in &mut self.lanes {
            let due = lane
                .sealed
                .front()
                .is_some_and(|segment| segment.sealed_at.saturating_add(lane.hold) <= now);
            if due {
                let segment = lane.sealed.pop_front()?;
                self.buffered_flows -= segment.flows;
                self.buffered_bytes -= segment.bytes;
                // Its file stays on disk until every flow in it is durable in the sinks.
                self.releasing_bytes += segment.bytes;
                return Some(segment);
            }
        }
        None
    }

    /// When the next sealed segment falls due, if any is sealed.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.lanes
            .iter()
            .filter_map(|lane| {
                let segment = lane.sealed.front()?;
                Some(segment.sealed_at.saturating_add(lane.hold))
            })
            .min()
    }

    /// Flows in sealed segments (the open segments' flows are counted by their writers).
    pub fn sealed_flows(&self) -> u64 {
        self.buffered_flows
    }

    pub fn sealed_bytes(&self) -> u64 {
        self.buffered_bytes
    }
}
