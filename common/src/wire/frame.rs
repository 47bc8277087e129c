use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

use super::compression::PayloadEncoding;
use super::{
    Ack, EncodeError, FRAME_PAYLOAD_BYTES_MAX, FrameError, PayloadError, ValidFlowBatch,
    ValidRangeUpdateBatch,
};

/// `"FLWA"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FLWA");
/// 2: acks carry refused records, the frame checksum and the collector's clock.
pub const VERSION: u8 = 2;
pub const HEADER_BYTES: usize = 16;
/// The header bytes the checksum covers (all but the checksum itself).
const CHECKED_HEADER_BYTES: usize = 12;

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Exporter to collector: a [`super::FlowBatch`].
    FlowBatch = 1,
    /// Collector to exporter: an [`super::Ack`] for one batch.
    Ack = 2,
    /// Collector to collector: a [`super::RangeUpdateBatch`].
    RangeUpdateBatch = 3,
    /// Exporter to collector: a [`super::ClockedFlowBatch`], a flow batch with the clock
    /// reading it was cut under.
    ClockedFlowBatch = 4,
    /// Exporter to collector, empty: asks for the collector's clock, so that an exporter's
    /// first batch after a start carries a clock reading too. Answered at once by an
    /// [`super::Ack`] naming the probe's checksum, with sequence [`CLOCK_PROBE_SEQUENCE`].
    ClockProbe = 5,
    /// Exporter to collector: a [`super::HostFlowBatch`], a flow batch with its host's name.
    HostFlowBatch = 6,
    /// Exporter to collector: a [`super::MeasuredFlowBatch`], a flow batch with each
    /// connection's round trip besides its host's name and clock reading.
    MeasuredFlowBatch = 7,
}

/// The sequence an ack to a [`FrameKind::ClockProbe`] names.
pub const CLOCK_PROBE_SEQUENCE: u64 = u64::MAX;

impl FrameKind {
    fn from_byte(byte: u8) -> Option<FrameKind> {
        match byte {
            1 => Some(FrameKind::FlowBatch),
            2 => Some(FrameKind::Ack),
            3 => Some(FrameKind::RangeUpdateBatch),
            4 => Some(FrameKind::ClockedFlowBatch),
            5 => Some(FrameKind::ClockProbe),
            6 => Some(FrameKind::HostFlowBatch),
            7 => Some(FrameKind::MeasuredFlowBatch),
            _ => None,
        }
    }

    /// A flow batch, of any of its kinds.
    pub fn is_flow_batch(self) -> bool {
        matches!(
            self,
            FrameKind::FlowBatch
                | FrameKind::ClockedFlowBatch
                | FrameKind::HostFlowBatch
                | FrameKind::MeasuredFlowBatch
        )
    }
}

/// A type that travels as the payload of one frame kind.
pub trait Message:
    rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
where
    Self::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
{
    const KIND: FrameKind;
}

/// One frame whose header and checksum were verified; its payload is not validated yet.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub kind: FrameKind,
    /// How `payload` is stored: a compressed one is read after
    /// [`super::FrameExpander::expand`].
    pub encoding: PayloadEncoding,
    /// The header's CRC-32C: names the frame even when its payload cannot be read.
    pub checksum: u32,
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Validates the payload as an archive of `M` and returns it, read in place.
    pub fn access<M: Message>(&self) -> Result<&'a M::Archived, PayloadError>
    where
        M::Archived: for<'b> CheckBytes<HighValidator<'b, rancor::Error>>,
    {
        if self.kind != M::KIND {
            return Err(PayloadError::WrongKind {
                kind: M::KIND,
                found: self.kind,
            });
        }
        if self.encoding != PayloadEncoding::Plain {
            return Err(PayloadError::Compressed {
                kind: M::KIND,
                reason: "read before it was expanded".into(),
            });
        }
        rkyv::access::<M::Archived, rancor::Error>(self.payload).map_err(|error| {
            PayloadError::Malformed {
                kind: M::KIND,
                reason: error.to_string(),
            }
        })
    }
}

/// A validated payload of any kind.
#[derive(Debug, Clone)]
pub enum AnyMessage<'a> {
    FlowBatch(ValidFlowBatch<'a>),
    Ack(&'a <Ack as rkyv::Archive>::Archived),
    RangeUpdateBatch(ValidRangeUpdateBatch<'a>),
    /// Carries nothing; any payload is ignored.
    ClockProbe,
}

impl<'a> Frame<'a> {
    /// Validates the payload as whatever its kind says it is.
    pub fn message(&self) -> Result<AnyMessage<'a>, PayloadError> {
        Ok(match self.kind {
            FrameKind::FlowBatch
            | FrameKind::ClockedFlowBatch
            | FrameKind::HostFlowBatch
            | FrameKind::MeasuredFlowBatch => {
                AnyMessage::FlowBatch(ValidFlowBatch::from_frame(self)?)
            }
            FrameKind::Ack => AnyMessage::Ack(self.access::<Ack>()?),
            FrameKind::RangeUpdateBatch => {
                AnyMessage::RangeUpdateBatch(ValidRangeUpdateBatch::from_frame(self)?)
            }
            FrameKind::ClockProbe => AnyMessage::ClockProbe,
        })
    }
}

/// Splits a byte stream into frames. Stateless apart from its limit, so one decoder serves any
/// number of connections.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    payload_bytes_max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(FRAME_PAYLOAD_BYTES_MAX)
    }
}

impl FrameDecoder {
    /// A decoder that rejects payloads over `payload_bytes_max` (never more than
    /// [`FRAME_PAYLOAD_BYTES_MAX`]).
    pub fn new(payload_bytes_max: usize) -> Self {
        FrameDecoder {
            payload_bytes_max: payload_bytes_max.min(FRAME_PAYLOAD_BYTES_MAX),
        }
    }

    pub fn payload_bytes_max(&self) -> usize {
        self.payload_bytes_max
    }

    /// Decodes the frame at the start of `buf`.
    ///
    /// `Ok(None)` means `buf` holds only part of a frame: read more and call again. The header is
    /// checked as soon as its 16 bytes are there, so an oversized or foreign frame is refused
    /// before its payload is buffered. On success returns the frame and the bytes it spans.
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Option<(Frame<'a>, usize)>, FrameError> {
        let Some(header) = buf.first_chunk::<HEADER_BYTES>() else {
            return Ok(None);
        };
        let (kind, encoding, length) = self.check_header(header)?;
        let frame_bytes = HEADER_BYTES + length;
        let Some(frame) = buf.get(..frame_bytes) else {
            return Ok(None);
        };
        let expected = read_u32(header, 12);
        let computed = frame_checksum(&header[..CHECKED_HEADER_BYTES], &frame[HEADER_BYTES..]);
        if expected != computed {
            return Err(FrameError::ChecksumMismatch { expected, computed });
        }
        Ok(Some((
            Frame {
                kind,
                encoding,
                checksum: computed,
                payload: &frame[HEADER_BYTES..],
            },
            frame_bytes,
        )))
    }

    fn check_header(
        &self,
        header: &[u8; HEADER_BYTES],
    ) -> Result<(FrameKind, PayloadEncoding, usize), FrameError> {
        let magic = read_u32(header, 0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        if header[4] != VERSION {
            return Err(FrameError::UnsupportedVersion { found: header[4] });
        }
        let kind =
            FrameKind::from_byte(header[5]).ok_or(FrameError::UnknownKind { found: header[5] })?;
        let encoding = PayloadEncoding::from_byte(header[6])
            .ok_or(FrameError::UnknownEncoding { found: header[6] })?;
        if header[7] != 0 {
            return Err(FrameError::ReservedNonZero { found: header[7] });
        }
        // u32 always fits usize on the 64-bit targets this runs on.
        let length = read_u32(header, 8) as usize;
        if length > self.payload_bytes_max {
            return Err(FrameError::TooLarge {
                length,
                limit: self.payload_bytes_max,
            });
        }
        Ok((kind, encoding, length))
    }
}

/// Appends one frame holding `payload` (an archive) to `out`.
pub fn encode_frame(kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    encode_frame_as(kind, PayloadEncoding::Plain, payload, out)
}

/// A payload of `length` bytes fits in a frame of `kind`: what a receiver takes (and expands
/// a compressed frame to) at most.
pub(super) fn check_payload_length(kind: FrameKind, length: usize) -> Result<(), EncodeError> {
    if length > FRAME_PAYLOAD_BYTES_MAX {
        return Err(EncodeError::TooLarge {
            kind,
            length,
            limit: FRAME_PAYLOAD_BYTES_MAX,
        });
    }
    Ok(())
}

/// Appends one frame holding `payload`, stored as `encoding` says, to `out`.
pub(super) fn encode_frame_as(
    kind: FrameKind,
    encoding: PayloadEncoding,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    check_payload_length(kind, payload.len())?;
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4] = VERSION;
    header[5] = kind as u8;
    header[6] = encoding as u8;
    // The check above bounds the length well below u32::MAX.
    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let checksum = frame_checksum(&header[..CHECKED_HEADER_BYTES], payload);
    header[12..16].copy_from_slice(&checksum.to_le_bytes());
    out.reserve(HEADER_BYTES + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(())
}

/// Archives `message` and appends it to `out` as one frame.
pub fn encode_message<M: Message>(message: &M, out: &mut Vec<u8>) -> Result<(), EncodeError>
where
    M::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
{
    let payload =
        rkyv::to_bytes::<rancor::Error>(message).map_err(|error| EncodeError::Archive {
            kind: M::KIND,
            reason: error.to_string(),
        })?;
    encode_frame(M::KIND, &payload, out)
}

/// The checksum in the header of an encoded frame (what a [`Frame`] reports as its checksum).
pub fn checksum_of(frame: &[u8]) -> Option<u32> {
    let header = frame.first_chunk::<HEADER_BYTES>()?;
    Some(read_u32(header, 12))
}

fn frame_checksum(checked_header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(checked_header), payload)
}

fn read_u32(header: &[u8; HEADER_BYTES], at: usize) -> u32 {
    u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
}
