use core::ops::Deref;

use super::frame::{Frame, Message};
use super::{
    BATCH_FLOWS_MAX, BATCH_WORKLOADS_MAX, BatchError, BatchRefusal, FrameKind, PayloadError,
    REGION_BYTES_MAX, RecordRefusal, check_count, check_span,
};
use crate::{ArchivedRoundTrip, CanonicalIp, Direction, FlowState, RoundTrip, Timestamp};
use rkyv::option::ArchivedOption;

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

impl ExporterId {
    /// The id of the exporter whose certificate's identity (see
    /// [`crate::tls::CertificateNames::identity`]) is `identity`: under mutual TLS an exporter
    /// takes it, and the collector refuses batches under any other. A hash (FNV-1a, 64 bits)
    /// fixed forever, since ids outlive versions in spools and segments; certificates are
    /// issued by the fleet's CA, so their names are not chosen to collide.
    pub fn for_certificate(identity: &str) -> ExporterId {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in b"flowattr-exporter:".iter().chain(identity.as_bytes()) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        ExporterId(hash)
    }
}

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

/// What an exporter knew of its wall clock against its collector's when it cut a batch: from
/// the acks of its earlier batches. The batch's times are `offset_ns` ahead of the collector's,
/// give or take `uncertainty_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct ClockReading {
    /// Positive: the exporter's clock runs ahead.
    pub offset_ns: i64,
    pub uncertainty_ns: u64,
}

/// A flow batch with the clock reading it was cut under ([`FrameKind::ClockedFlowBatch`]). A
/// kind of its own, so that [`FlowBatch`] frames written before it (in spools, by exporters
/// not yet upgraded) read as they always did.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct ClockedFlowBatch {
    pub clock: ClockReading,
    pub batch: FlowBatch,
}

impl Message for ClockedFlowBatch {
    const KIND: FrameKind = FrameKind::ClockedFlowBatch;
}

/// Bytes of a host name (a DNS name is at most 253).
pub const HOST_NAME_BYTES_MAX: usize = 253;

/// A flow batch with the name of the host it was cut on and, once the exporter has one, the
/// clock reading it was cut under ([`FrameKind::HostFlowBatch`]): what exporters send. The
/// host name goes to every output record; it is the host's own word, like the batch's
/// workload names, and is checked only for form.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct HostFlowBatch {
    pub host: String,
    pub clock: Option<ClockReading>,
    pub batch: FlowBatch,
}

impl Message for HostFlowBatch {
    const KIND: FrameKind = FrameKind::HostFlowBatch;
}

/// A flow batch with each connection's round trip, its host's name and, once the exporter has
/// one, the clock reading it was cut under ([`FrameKind::MeasuredFlowBatch`]): what exporters
/// send, and what they journal (with neither host nor clock). Frames of the earlier kinds read
/// as they always did, their flows with no round trip.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct MeasuredFlowBatch {
    pub host: Option<String>,
    pub clock: Option<ClockReading>,
    pub batch: FlowBatch,
    /// One per record of `batch.flows`, in order: `None` where the kernel had no sample (a
    /// connection never answered). Empty: none known for any.
    pub round_trips: Vec<Option<RoundTrip>>,
}

impl Message for MeasuredFlowBatch {
    const KIND: FrameKind = FrameKind::MeasuredFlowBatch;
}

/// What a flow-batch frame of any kind holds: the batch, and the clock reading, host name and
/// round trips of the kinds that carry them.
pub struct FlowBatchParts<'a> {
    pub batch: &'a ArchivedFlowBatch,
    pub clock: Option<ClockReading>,
    pub host: Option<&'a str>,
    /// Empty, or one per record.
    pub round_trips: &'a [ArchivedOption<ArchivedRoundTrip>],
}

pub fn access_flow_batch<'a>(frame: &Frame<'a>) -> Result<FlowBatchParts<'a>, PayloadError> {
    let reading = |clock: &ArchivedClockReading| ClockReading {
        offset_ns: clock.offset_ns.to_native(),
        uncertainty_ns: clock.uncertainty_ns.to_native(),
    };
    let parts = |batch, clock, host| FlowBatchParts {
        batch,
        clock,
        host,
        round_trips: &[],
    };
    match frame.kind {
        FrameKind::MeasuredFlowBatch => {
            let measured = frame.access::<MeasuredFlowBatch>()?;
            Ok(FlowBatchParts {
                batch: &measured.batch,
                clock: measured.clock.as_ref().map(reading),
                host: measured.host.as_ref().map(|host| host.as_str()),
                round_trips: measured.round_trips.as_slice(),
            })
        }
        FrameKind::HostFlowBatch => {
            let hosted = frame.access::<HostFlowBatch>()?;
            Ok(parts(
                &hosted.batch,
                hosted.clock.as_ref().map(reading),
                Some(hosted.host.as_str()),
            ))
        }
        FrameKind::ClockedFlowBatch => {
            let clocked = frame.access::<ClockedFlowBatch>()?;
            Ok(parts(&clocked.batch, Some(reading(&clocked.clock)), None))
        }
        _ => Ok(parts(frame.access::<FlowBatch>()?, None, None)),
    }
}

/// A flow batch whose structure passed every check of the format: it is a valid archive, its
/// counts are within limits, its region is well-formed. Records are checked one by one with
/// [`ValidFlowBatch::check_record`], so one bad record costs only itself.
#[derive(Debug, Clone)]
pub struct ValidFlowBatch<'a> {
    batch: &'a ArchivedFlowBatch,
    clock: Option<ClockReading>,
    host: Option<&'a str>,
    round_trips: &'a [ArchivedOption<ArchivedRoundTrip>],
    /// Per dictionary entry: does the name keep the name rule.
    names_ok: Vec<bool>,
}

impl<'a> ValidFlowBatch<'a> {
    pub fn from_frame(frame: &Frame<'a>) -> Result<Self, PayloadError> {
        let FlowBatchParts {
            batch,
            clock,
            host,
            round_trips,
        } = access_flow_batch(frame)?;
        check_count("flow records", batch.flows.len(), BATCH_FLOWS_MAX)?;
        if !round_trips.is_empty() && round_trips.len() != batch.flows.len() {
            return Err(BatchError::RoundTripsMisaligned {
                round_trips: round_trips.len(),
                flows: batch.flows.len(),
            }
            .into());
        }
        check_count("workload names", batch.workloads.len(), BATCH_WORKLOADS_MAX)?;
        crate::check_identifier(&batch.region, REGION_BYTES_MAX)
            .map_err(|problem| BatchError::BadRegion { problem })?;
        if let Some(host) = host {
            crate::check_identifier(host, HOST_NAME_BYTES_MAX)
                .map_err(|problem| BatchError::BadHost { problem })?;
        }
        let names_ok = batch
            .workloads
            .iter()
            .map(|key| crate::check_identity_key(key).is_ok())
            .collect();
        Ok(ValidFlowBatch {
            batch,
            clock,
            host,
            round_trips,
            names_ok,
        })
    }

    /// The exporter's clock reading, if its frame carried one.
    pub fn clock(&self) -> Option<ClockReading> {
        self.clock
    }

    /// The round trip of the record at `index`, if its frame carried one.
    pub fn round_trip(&self, index: usize) -> Option<RoundTrip> {
        let trip = self.round_trips.get(index)?.as_ref()?;
        Some(RoundTrip {
            smoothed_us: trip.smoothed_us.to_native(),
            deviation_us: trip.deviation_us.to_native(),
        })
    }

    /// Every record's round trip, in order (`None` for each where the frame carried none).
    pub fn round_trips(&self) -> Vec<Option<RoundTrip>> {
        (0..self.batch.flows.len())
            .map(|index| self.round_trip(index))
            .collect()
    }

    /// The name of the host the batch was cut on, if its frame carried one.
    pub fn host(&self) -> Option<&'a str> {
        self.host
    }

    /// Whether `record` keeps the format's rules: its workload index resolves to a well-formed
    /// name, its span is ordered, its ports are set. Only a record that passes may be read for
    /// its workload name.
    pub fn check_record(&self, record: &ArchivedFlowRecord) -> Result<(), RecordRefusal> {
        if let Some(index) = record.local_workload.as_ref() {
            match self.names_ok.get(index.0.to_native() as usize) {
                None => return Err(RecordRefusal::WorkloadIndexOutOfRange),
                Some(false) => return Err(RecordRefusal::BadWorkloadName),
                Some(true) => {}
            }
        }
        if check_span(0, &record.start, &record.end).is_err() {
            return Err(RecordRefusal::EndBeforeStart);
        }
        if record.local_port == 0 || record.remote_port == 0 {
            return Err(RecordRefusal::ZeroPort);
        }
        Ok(())
    }

    /// The batch as an owned value (for tools and the exporter's dead letters, not hot paths).
    pub fn to_owned_batch(&self) -> Result<FlowBatch, PayloadError> {
        rkyv::deserialize::<FlowBatch, rkyv::rancor::Error>(self.batch).map_err(|error| {
            PayloadError::Malformed {
                kind: FrameKind::FlowBatch,
                reason: error.to_string(),
            }
        })
    }

    /// The batch with everything its frame carried (host, clock, round trips) as an owned
    /// value: what the exporter reads back from its journal and its dead letters.
    pub fn to_owned_measured(&self) -> Result<MeasuredFlowBatch, PayloadError> {
        Ok(MeasuredFlowBatch {
            host: self.host.map(str::to_owned),
            clock: self.clock,
            batch: self.to_owned_batch()?,
            round_trips: self.round_trips(),
        })
    }

    /// The records, each to be checked with [`Self::check_record`] before it is used.
    pub fn records(&self) -> &'a [ArchivedFlowRecord] {
        self.batch.flows.as_slice()
    }

    /// The dictionary name behind `index` of a record that passed [`Self::check_record`].
    pub fn workload_name(&self, index: &ArchivedWorkloadIndex) -> &'a str {
        self.batch.workloads[index.0.to_native() as usize].as_str()
    }

    /// The name of the local workload of a checked `record`, if the exporter knew it.
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
        self.batch
    }
}

impl PayloadError {
    /// What the collector tells an exporter whose batch failed this way.
    pub fn batch_refusal(&self) -> BatchRefusal {
        match self {
            PayloadError::InvalidBatch(BatchError::TooMany { .. }) => BatchRefusal::OverLimit,
            PayloadError::InvalidBatch(BatchError::BadRegion { .. }) => BatchRefusal::BadRegion,
            PayloadError::InvalidBatch(BatchError::BadHost { .. }) => BatchRefusal::Malformed,
            _ => BatchRefusal::Malformed,
        }
    }
}
