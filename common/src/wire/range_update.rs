use core::ops::Deref;

use super::frame::{Frame, Message};
use super::{
    BatchError, FrameKind, PayloadError, RANGE_SPANS_MAX, RANGE_UPDATES_MAX, check_count,
    check_dictionary, check_index, check_span,
};
use crate::{CanonicalIp, Timestamp};

/// What one collector node learned from the flows it received, broadcast to its peers so every
/// node can attribute every remote IP.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct RangeUpdateBatch {
    /// The node that learned these ranges; a node skips its own messages.
    pub origin_node: u64,
    /// Workload names, each once; updates refer to them by position.
    pub workloads: Vec<String>,
    pub updates: Vec<RangeUpdate>,
}

/// "`owner` held `ip` (or `(ip, port)` when `port` is not 0) throughout each of `spans`."
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct RangeUpdate {
    pub ip: CanonicalIp,
    /// 0 for the whole IP; a port for a shared (NAT64) IP owned per port.
    pub port: u16,
    /// Index into [`RangeUpdateBatch::workloads`], or [`UNNAMED_OWNER`].
    pub owner: u32,
    pub spans: Vec<Span>,
}

/// [`RangeUpdate::owner`] of a holder its exporter could not name: evidence that someone held
/// the key, which makes a lookup beside a named owner ambiguous.
pub const UNNAMED_OWNER: u32 = u32::MAX;

impl ArchivedRangeUpdate {
    /// The index of the owner's name, None if the holder is unnamed.
    pub fn owner_index(&self) -> Option<u32> {
        Some(self.owner.to_native()).filter(|&owner| owner != UNNAMED_OWNER)
    }
}

/// A closed time range `[start, end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Span {
    pub start: Timestamp,
    pub end: Timestamp,
}

impl Message for RangeUpdateBatch {
    const KIND: FrameKind = FrameKind::RangeUpdateBatch;
}

/// A range-update batch whose owner indices resolve and whose spans are well-formed.
#[derive(Debug, Clone, Copy)]
pub struct ValidRangeUpdateBatch<'a>(&'a ArchivedRangeUpdateBatch);

impl<'a> ValidRangeUpdateBatch<'a> {
    pub fn from_frame(frame: &Frame<'a>) -> Result<Self, PayloadError> {
        let batch = frame.access::<RangeUpdateBatch>()?;
        check_range_update_batch(batch)?;
        Ok(ValidRangeUpdateBatch(batch))
    }

    /// The owner's name, None if the holder is unnamed.
    pub fn owner_name(&self, update: &ArchivedRangeUpdate) -> Option<&'a str> {
        Some(self.0.workloads[update.owner_index()? as usize].as_str())
    }
}

impl Deref for ValidRangeUpdateBatch<'_> {
    type Target = ArchivedRangeUpdateBatch;

    fn deref(&self) -> &ArchivedRangeUpdateBatch {
        self.0
    }
}

fn check_range_update_batch(batch: &ArchivedRangeUpdateBatch) -> Result<(), BatchError> {
    check_count("range updates", batch.updates.len(), RANGE_UPDATES_MAX)?;
    check_dictionary(&batch.workloads)?;
    for (record, update) in batch.updates.iter().enumerate() {
        if let Some(owner) = update.owner_index() {
            check_index(record, owner, batch.workloads.len())?;
        }
        check_count(
            "spans in one range update",
            update.spans.len(),
            RANGE_SPANS_MAX,
        )?;
        for span in update.spans.iter() {
            check_span(record, &span.start, &span.end)?;
        }
    }
    Ok(())
}
