use core::ops::Deref;

use super::frame::{Frame, Message};
use super::{
    BATCH_FLOWS_MAX, BatchError, FrameKind, PayloadError, REGION_BYTES_MAX, check_count,
    check_dictionary, check_index, check_span,
};
use crate::{CanonicalIp, Direction, FlowState, Timestamp};

/// Identifies one exporter (one host agent), stable across its restarts, so a collector can
/// recognise a batch it has already accepted when the exporter retries after a lost ack.
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
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct ExporterId(pub u64);

/// The position of a workload name in its batch's dictionary.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct WorkloadIndex(pub u32);

/// All flows one exporter observed in one interval (or one slice of it, past
/// [`BATCH_FLOWS_MAX`] flows).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct FlowBatch {
    pub exporter: ExporterId,
    /// Increases by one per batch an exporter sends; with `exporter` it names the batch.
    pub sequence: u64,
    /// The region the exporter runs in. The collector it sends to serves that region.
    pub region: String,
    /// Workload names, each once; records refer to them by [`WorkloadIndex`].
    pub workloads: Vec<String>,
    pub flows: Vec<FlowRecord>,
}

/// One TCP connection as seen from the host that captured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct FlowRecord {
    pub local_ip: CanonicalIp,
    pub remote_ip: CanonicalIp,
    pub local_port: u16,
    pub remote_port: u16,
    /// Who owned the local side when the flow was captured; `None` when the exporter could not
    /// tell (the flow is still reported: its remote side may be attributable).
    pub local_workload: Option<WorkloadIndex>,
    /// The local IP is shared by several workloads (NAT64 host address): `local_workload` owns
    /// the (local IP, local port) pair, not the whole IP.
    pub local_shared: bool,
    /// Handshake time (first state change the exporter saw).
    pub start: Timestamp,
    /// Close time, or the end of the reporting interval for an open flow.
    pub end: Timestamp,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segments_sent: u32,
    pub segments_received: u32,
    pub retransmits: u32,
    pub direction: Direction,
    pub state: FlowState,
}

impl Message for FlowBatch {
    const KIND: FrameKind = FrameKind::FlowBatch;
}

/// A flow batch that passed every check of the format: its workload indices resolve, its counts
/// are within limits, its records are well-formed. Only this type hands out records.
#[derive(Debug, Clone, Copy)]
pub struct ValidFlowBatch<'a>(&'a ArchivedFlowBatch);

impl<'a> ValidFlowBatch<'a> {
    pub fn from_frame(frame: &Frame<'a>) -> Result<Self, PayloadError> {
        let batch = frame.access::<FlowBatch>()?;
        check_flow_batch(batch)?;
        Ok(ValidFlowBatch(batch))
    }

    /// The dictionary name behind `index`, which validation proved is in range.
    pub fn workload_name(&self, index: &ArchivedWorkloadIndex) -> &'a str {
        self.0.workloads[index.0.to_native() as usize].as_str()
    }

    /// The name of the local workload of `record`, if the exporter knew it.
    pub fn local_workload_name(&self, record: &ArchivedFlowRecord) -> Option<&'a str> {
        record
            .local_workload
            .as_ref()
            .map(|index| self.workload_name(index))
    }
}

impl Deref for ValidFlowBatch<'_> {
    type Target = ArchivedFlowBatch;

    fn deref(&self) -> &ArchivedFlowBatch {
        self.0
    }
}

fn check_flow_batch(batch: &ArchivedFlowBatch) -> Result<(), BatchError> {
    check_count("flow records", batch.flows.len(), BATCH_FLOWS_MAX)?;
    crate::check_identifier(&batch.region, REGION_BYTES_MAX)
        .map_err(|problem| BatchError::BadRegion { problem })?;
    check_dictionary(&batch.workloads)?;
    for (record, flow) in batch.flows.iter().enumerate() {
        if let Some(index) = flow.local_workload.as_ref() {
            check_index(record, index.0.to_native(), batch.workloads.len())?;
        }
        check_span(record, &flow.start, &flow.end)?;
        if flow.local_port == 0 || flow.remote_port == 0 {
            return Err(BatchError::ZeroPort { record });
        }
    }
    Ok(())
}
