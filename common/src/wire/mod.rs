//! The wire format: what exporters send collectors, what collectors answer, and what collector
//! nodes broadcast to each other.
//!
//! Every message is one frame:
//!
//! ```text
//!  0        4    5    6    7    8              12             16
//!  +--------+----+----+----+----+--------------+--------------+------------------+
//!  | magic  |ver |kind|enc |rsvd| payload len  | CRC-32C      | payload (rkyv)   |
//!  | "FLWA" | 2  |    |    | 0  | u32 LE       | u32 LE       | `len` bytes      |
//!  +--------+----+----+----+----+--------------+--------------+------------------+
//! ```
//!
//! The CRC-32C covers the first 12 header bytes and the payload, so a corrupted kind or length
//! is caught as surely as a corrupted payload. The payload is an rkyv archive of [`FlowBatch`],
//! [`Ack`] or [`RangeUpdateBatch`] by `kind`, stored as `enc` says ([`PayloadEncoding`]: plain,
//! or zstd-compressed and expanded within the receiver's limit before it is read); it is validated (bytecheck, then the semantic
//! checks of each message type) before any field is read, and read in place without copying.
//!
//! Limits are part of the format: a decoder rejects a frame whose declared length is over its
//! limit as soon as it has read the header, before buffering the payload, so a hostile peer
//! cannot make it allocate more than one frame.

use crate::time::ArchivedTimestamp;

mod ack;
mod compression;
mod error;
mod flow_batch;
mod frame;
mod range_update;

pub use ack::{
    Ack, AckStatus, ArchivedAck, ArchivedAckStatus, BatchRefusal, RecordRefusal, RefusedRecord,
    refusal_summary,
};
pub use compression::{
    COMPRESSION_LEVEL, FrameCompressor, FrameExpander, PayloadEncoding, RecordArray,
    measured_batch_arrays,
};
pub use error::{BatchError, EncodeError, FrameError, PayloadError};
pub use flow_batch::{
    ArchivedFlowBatch, ArchivedFlowRecord, ArchivedHostFlowBatch, ArchivedMeasuredFlowBatch,
    ClockReading, ClockedFlowBatch, ExporterId, FlowBatch, FlowBatchParts, FlowRecord,
    HOST_NAME_BYTES_MAX, HostFlowBatch, MeasuredFlowBatch, ValidFlowBatch, WorkloadIndex,
    access_flow_batch,
};
pub use frame::{
    AnyMessage, CLOCK_PROBE_SEQUENCE, Frame, FrameDecoder, FrameKind, HEADER_BYTES, MAGIC, Message,
    VERSION, checksum_of, encode_frame, encode_message,
};
pub use range_update::{
    ArchivedRangeUpdate, ArchivedRangeUpdateBatch, ArchivedSpan, RangeUpdate, RangeUpdateBatch,
    Span, UNNAMED_OWNER, ValidRangeUpdateBatch,
};

/// The largest payload any decoder accepts, whatever it is configured with. 64K flow records
/// of ~100 archived bytes each is 6.4 MiB; the rest is headroom for the workload dictionary.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Flow records in one batch. An exporter with more flows in an interval sends several batches.
pub const BATCH_FLOWS_MAX: usize = 65_536;
/// Distinct workload names in one batch's dictionary (or one range-update batch's).
pub const BATCH_WORKLOADS_MAX: usize = 65_536;
pub use crate::WORKLOAD_NAME_BYTES_MAX;
/// Bytes of a region name ("eu-west-1").
pub const REGION_BYTES_MAX: usize = 64;
/// Range updates in one broadcast batch.
pub const RANGE_UPDATES_MAX: usize = 65_536;
/// Time spans carried by one range update.
pub const RANGE_SPANS_MAX: usize = 1_024;

const _: () = assert!(BATCH_FLOWS_MAX <= u32::MAX as usize);
const _: () = assert!(
    BATCH_WORKLOADS_MAX < u32::MAX as usize,
    "u32::MAX is not a valid index"
);
const _: () = assert!(FRAME_PAYLOAD_BYTES_MAX <= u32::MAX as usize);

// ---- format rules shared by the message types ----

fn check_count(what: &'static str, count: usize, limit: usize) -> Result<(), BatchError> {
    if count > limit {
        return Err(BatchError::TooMany { what, count, limit });
    }
    Ok(())
}

/// A batch's workload dictionary: bounded, every identity key well-formed.
fn check_dictionary(
    workloads: &rkyv::vec::ArchivedVec<rkyv::string::ArchivedString>,
) -> Result<(), BatchError> {
    check_count("workload names", workloads.len(), BATCH_WORKLOADS_MAX)?;
    for (index, name) in workloads.iter().enumerate() {
        crate::check_identity_key(name)
            .map_err(|problem| BatchError::BadWorkloadName { index, problem })?;
    }
    Ok(())
}

/// A record's reference into a dictionary of `dictionary_len` names.
fn check_index(record: usize, index: u32, dictionary_len: usize) -> Result<(), BatchError> {
    if index as usize >= dictionary_len {
        return Err(BatchError::WorkloadIndexOutOfRange {
            record,
            index,
            dictionary_len,
        });
    }
    Ok(())
}

/// A record's closed time range.
fn check_span(
    record: usize,
    start: &ArchivedTimestamp,
    end: &ArchivedTimestamp,
) -> Result<(), BatchError> {
    let (start_ns, end_ns) = (start.get().as_nanos(), end.get().as_nanos());
    if end_ns < start_ns {
        return Err(BatchError::EndBeforeStart {
            record,
            start_ns,
            end_ns,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
