use super::FrameKind;
use crate::NameProblem;

/// Why a frame header or its checksum was rejected. Each is fatal for the connection that sent
/// it: after a bad header the stream position is meaningless.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {found:#010x}: the peer does not speak the flowattr protocol")]
    BadMagic { found: u32 },
    #[error("unsupported protocol version {found}")]
    UnsupportedVersion { found: u8 },
    #[error("unknown frame kind {found}")]
    UnknownKind { found: u8 },
    #[error("unknown payload encoding {found}")]
    UnknownEncoding { found: u8 },
    #[error("reserved header byte is {found:#04x}, must be zero")]
    ReservedNonZero { found: u8 },
    #[error("frame payload of {length} bytes is over the limit of {limit} bytes")]
    TooLarge { length: usize, limit: usize },
    #[error("checksum mismatch: header says {expected:#010x}, frame hashes to {computed:#010x}")]
    ChecksumMismatch { expected: u32, computed: u32 },
}

/// Why a payload whose frame was intact could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("{kind:?} frame expected, got {found:?}")]
    WrongKind { kind: FrameKind, found: FrameKind },
    /// The bytes are not a valid archive of the expected type (bytecheck failed).
    #[error("malformed {kind:?} payload: {reason}")]
    Malformed { kind: FrameKind, reason: String },
    #[error("invalid flow batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("compressed {kind:?} payload: {reason}")]
    Compressed { kind: FrameKind, reason: String },
}

/// A structurally valid archive that breaks a rule of the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("{count} {what} is over the limit of {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("workload identity #{index} in the dictionary {problem}")]
    BadWorkloadName { index: usize, problem: NameProblem },
    #[error("region name {problem}")]
    BadRegion { problem: NameProblem },
    #[error("host name {problem}")]
    BadHost { problem: NameProblem },
    #[error("record #{record} names workload #{index}, but the dictionary has {dictionary_len}")]
    WorkloadIndexOutOfRange {
        record: usize,
        index: u32,
        dictionary_len: usize,
    },
    #[error("record #{record} ends ({end_ns}) before it starts ({start_ns})")]
    EndBeforeStart {
        record: usize,
        start_ns: u64,
        end_ns: u64,
    },
    #[error("record #{record} has port 0")]
    ZeroPort { record: usize },
    #[error("{round_trips} round trips for {flows} flow records (one per record, or none)")]
    RoundTripsMisaligned { round_trips: usize, flows: usize },
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{kind:?} payload of {length} bytes is over the frame limit of {limit} bytes")]
    TooLarge {
        kind: FrameKind,
        length: usize,
        limit: usize,
    },
    #[error("cannot archive {kind:?}: {reason}")]
    Archive { kind: FrameKind, reason: String },
}
