use super::FrameKind;
use super::flow_batch::ExporterId;
use super::frame::Message;
use crate::Timestamp;

/// The collector's answer to one [`super::FlowBatch`], sent once what it stores of the batch is
/// durable in the delay buffer, or at once if it stores nothing. The exporter may forget a
/// batch only when it holds its ack.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Ack {
    pub exporter: ExporterId,
    pub sequence: u64,
    /// The checksum of the frame answered. A batch refused as [`BatchRefusal::Malformed`] has
    /// no readable exporter or sequence (both 0): the checksum is what names it.
    pub frame_checksum: u32,
    pub status: AckStatus,
    /// Records not stored, each with its reason; every other record of the batch is stored.
    /// Empty unless the status is `Accepted` or `Duplicate`.
    pub refused: Vec<RefusedRecord>,
    /// The collector's clock when the batch arrived, and how far ahead of it a record's end may
    /// be: the exporter derives its own clock's health from them.
    pub collector_time: Timestamp,
    pub max_skew_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, PartialEq, Eq), compare(PartialEq))]
pub enum AckStatus {
    /// Stored for attribution (less any refused records).
    Accepted,
    /// Already stored from an earlier send of the same (exporter, sequence): not counted twice.
    Duplicate,
    /// Nothing of the batch is stored, and resending it cannot change that: the exporter moves
    /// it aside (its dead-letter file) and sends the next.
    Refused(BatchRefusal),
}

/// Why a whole batch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, PartialEq, Eq), compare(PartialEq))]
pub enum BatchRefusal {
    /// The payload is not a valid flow batch archive.
    Malformed,
    /// More records or dictionary names than a batch may hold.
    OverLimit,
    /// The region name breaks the name rule.
    BadRegion,
    /// Under mutual TLS, sent under an exporter id the client's certificate does not give it.
    ExporterNotCertified,
}

impl BatchRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchRefusal::Malformed => "malformed",
            BatchRefusal::OverLimit => "over_limit",
            BatchRefusal::BadRegion => "bad_region",
            BatchRefusal::ExporterNotCertified => "exporter_not_certified",
        }
    }
}

/// One record the collector did not store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, PartialEq, Eq))]
pub struct RefusedRecord {
    /// The record's position in its batch.
    pub record: u32,
    pub reason: RecordRefusal,
}

/// Why one record of a batch was refused. The first four break the format; the others are
/// claims the collector cannot believe.
#[repr(u8)]
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[rkyv(derive(Debug, PartialEq, Eq), compare(PartialEq))]
pub enum RecordRefusal {
    /// Its local workload's name breaks the name rule.
    BadWorkloadName,
    /// Its local workload index is outside the batch's dictionary.
    WorkloadIndexOutOfRange,
    EndBeforeStart,
    ZeroPort,
    /// The same connection and start as an earlier record of the batch.
    Repeated,
    /// It ends later than the collector's clock plus the allowed skew: the exporter's clock
    /// runs ahead.
    FromTheFuture,
    /// It ended before the collector's retention horizon: nothing it says can be kept.
    OlderThanRetention,
    /// Its local IP is not one the client's certificate may claim (mutual TLS only).
    ClaimNotAllowed,
    /// Its batch's clock reading is uncertain by more than half the collector's slack: its
    /// times, corrected or not, could name the wrong side of a handover.
    ClockUncertain,
}

impl RecordRefusal {
    pub const ALL: [RecordRefusal; 9] = [
        RecordRefusal::BadWorkloadName,
        RecordRefusal::WorkloadIndexOutOfRange,
        RecordRefusal::EndBeforeStart,
        RecordRefusal::ZeroPort,
        RecordRefusal::Repeated,
        RecordRefusal::FromTheFuture,
        RecordRefusal::OlderThanRetention,
        RecordRefusal::ClaimNotAllowed,
        RecordRefusal::ClockUncertain,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RecordRefusal::BadWorkloadName => "bad_workload_name",
            RecordRefusal::WorkloadIndexOutOfRange => "workload_index_out_of_range",
            RecordRefusal::EndBeforeStart => "end_before_start",
            RecordRefusal::ZeroPort => "zero_port",
            RecordRefusal::Repeated => "repeated",
            RecordRefusal::FromTheFuture => "from_the_future",
            RecordRefusal::OlderThanRetention => "older_than_retention",
            RecordRefusal::ClaimNotAllowed => "claim_not_allowed",
            RecordRefusal::ClockUncertain => "clock_uncertain",
        }
    }
}

impl core::fmt::Display for RecordRefusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// "from_the_future x3, repeated x1": what a log line says about a batch's refused records.
pub fn refusal_summary(refused: &[RefusedRecord]) -> String {
    let mut counts = [0usize; RecordRefusal::ALL.len()];
    for refusal in refused {
        counts[refusal.reason as usize] += 1;
    }
    let parts: Vec<String> = RecordRefusal::ALL
        .iter()
        .zip(counts)
        .filter(|(_, count)| *count > 0)
        .map(|(reason, count)| format!("{} x{count}", reason.as_str()))
        .collect();
    parts.join(", ")
}

impl Message for Ack {
    const KIND: FrameKind = FrameKind::Ack;
}
