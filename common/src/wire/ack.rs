use super::FrameKind;
use super::flow_batch::ExporterId;
use super::frame::Message;

/// The collector's answer to one [`super::FlowBatch`], sent once the batch is durable in the
/// delay buffer. The exporter may forget a batch only when it holds its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, PartialEq, Eq))]
pub struct Ack {
    pub exporter: ExporterId,
    pub sequence: u64,
    pub status: AckStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug, PartialEq, Eq), compare(PartialEq))]
pub enum AckStatus {
    /// Stored for attribution.
    Accepted,
    /// Already stored from an earlier send of the same (exporter, sequence): not counted twice.
    Duplicate,
}

impl Message for Ack {
    const KIND: FrameKind = FrameKind::Ack;
}
