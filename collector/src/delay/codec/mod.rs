//! The on-disk encoding of buffered flows. At 5M flows/s a node writes every flow once and reads
//! it once, so the disk, not the CPU, is the first wall: the encoding is compact (what a block
//! repeats is written once, times are deltas, every field is coded by a model built from the
//! block's own counts; [`modelled`] has the details) and checked (a CRC-32C per block).
//!
//! A segment file is a sequence of blocks, each the part of one exporter batch that landed on
//! this shard:
//!
//! ```text
//! header (24 bytes): magic "FLW7" | body length u32 | CRC-32C u32 | flows u32 |
//!                    exporter u64     (the CRC covers magic, flows, exporter and the body)
//! body: sequence, arrival ns, sender, frame checksum (varints); the batch's refused records
//!       (count, then index deltas, varints); host name (length + UTF-8, length 0: none);
//!       workload dictionary (count, then length + UTF-8 identity key each: the names the
//!       block's flows use, in the order they first do); flows
//! ```
//!
//! Flow times are whole microseconds from ingest on (the evidence gate cuts them there), and
//! blocks store them so; a block with a time that is not (flows buffered before that, and
//! retried since) keeps nanoseconds, which its preamble says.
//!
//! Blocks of the earlier formats are still read, so that segments written before an upgrade
//! replay after it: "FLW6" (the flows as varints, [`flows`], and the batch's whole dictionary),
//! "FLW5" (the same without round trips, in microseconds), "FLW4" (the same in
//! nanoseconds), "FLW3" (the same without the host name), "FLW2" (without sender,
//! checksum and refused records too, which read as the exporter itself, 0 and none) and
//! "FLWB" ([`legacy`]).
//!
//! A block that is not whole and intact costs only itself: [`Blocks`] steps over it to the next
//! intact block. When none follows, the rest is a damaged tail: after a crash, the torn last
//! write, which was never acked (O_DIRECT writes pad the file with zeros, which fail the magic
//! check the same way).

mod bits;
mod flows;
mod huffman;
mod legacy;
mod modelled;
mod scan;
mod varint;

pub use scan::{Blocks, Damage};

#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;

use flowattr_common::wire::{ArchivedFlowRecord, FlowRecord};
use flowattr_common::{CanonicalIp, Direction, FlowState, RoundTrip, Timestamp};

use self::varint::{Reader, put_varint};

const BLOCK_MAGIC: u32 = u32::from_le_bytes(*b"FLW7");
const BLOCK_MAGIC_V6: u32 = u32::from_le_bytes(*b"FLW6");
const BLOCK_MAGIC_V5: u32 = u32::from_le_bytes(*b"FLW5");
const BLOCK_MAGIC_V4: u32 = u32::from_le_bytes(*b"FLW4");
const BLOCK_MAGIC_V3: u32 = u32::from_le_bytes(*b"FLW3");
const BLOCK_MAGIC_V2: u32 = u32::from_le_bytes(*b"FLW2");
/// Every format's magic, the current one first.
const BLOCK_MAGICS: [u32; 7] = [
    BLOCK_MAGIC,
    BLOCK_MAGIC_V6,
    BLOCK_MAGIC_V5,
    BLOCK_MAGIC_V4,
    BLOCK_MAGIC_V3,
    BLOCK_MAGIC_V2,
    legacy::MAGIC,
];
/// The formats whose checksum covers the magic and whose body names the sender, the frame
/// checksum and the refused records.
const SINCE_V3: [u32; 5] = [
    BLOCK_MAGIC,
    BLOCK_MAGIC_V6,
    BLOCK_MAGIC_V5,
    BLOCK_MAGIC_V4,
    BLOCK_MAGIC_V3,
];
pub const BLOCK_HEADER_BYTES: usize = 24;
/// Far above any real block (a 64K-flow batch part is ~2.5 MB); refuses a corrupted length
/// before it is trusted.
const BLOCK_BODY_BYTES_MAX: usize = 64 << 20;

/// Retries are counted in the flag byte's top two bits.
pub const RETRIES_MAX: u8 = 3;

/// One flow as the delay buffer holds it: the exporter's record plus where it came from and how
/// many times attribution was retried. Plain data, so batches of them move between shards
/// without touching the allocator per flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferedFlow {
    pub local_ip: CanonicalIp,
    pub remote_ip: CanonicalIp,
    pub local_port: u16,
    pub remote_port: u16,
    /// Index into the block's workload dictionary.
    pub local_workload: Option<u32>,
    pub local_shared: bool,
    pub start: Timestamp,
    pub end: Timestamp,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segments_sent: u32,
    pub segments_received: u32,
    pub retransmits: u32,
    /// The connection's round trip as its exporter's kernel estimated it (at the close, or at
    /// the last report for an open flow); `None` if it had no sample or the exporter predates it.
    pub round_trip: Option<RoundTrip>,
    pub direction: Direction,
    pub state: FlowState,
    /// Position in the exporter's batch: with (exporter, sequence) it names the flow.
    pub index: u32,
    /// Attribution attempts that found no evidence so far (at most [`RETRIES_MAX`]).
    pub retries: u8,
}

impl BufferedFlow {
    /// An outbound connection the remote never accepted: closed with no data received and at
    /// most one segment (none: no answer; one: a reset). An accepted connection has a socket
    /// at the server, whose report is evidence of who held the address then; a refused one
    /// has none, so only stale evidence could name its remote. (Open flows are reported only
    /// once established.)
    pub fn unanswered(&self) -> bool {
        self.direction == Direction::Outbound
            && self.state == FlowState::Closed
            && self.segments_received <= 1
            && self.bytes_received == 0
    }

    /// The record at `index` of a validated batch, before any attempt.
    pub fn from_wire(
        record: &ArchivedFlowRecord,
        round_trip: Option<RoundTrip>,
        index: u32,
    ) -> BufferedFlow {
        BufferedFlow {
            local_ip: record.local_ip.get(),
            remote_ip: record.remote_ip.get(),
            local_port: record.local_port.to_native(),
            remote_port: record.remote_port.to_native(),
            local_workload: record
                .local_workload
                .as_ref()
                .map(|index| index.0.to_native()),
            local_shared: record.local_shared,
            start: record.start.get(),
            end: record.end.get(),
            bytes_sent: record.bytes_sent.to_native(),
            bytes_received: record.bytes_received.to_native(),
            segments_sent: record.segments_sent.to_native(),
            segments_received: record.segments_received.to_native(),
            retransmits: record.retransmits.to_native(),
            round_trip,
            direction: if record.direction == Direction::Inbound {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            state: if record.state == FlowState::Closed {
                FlowState::Closed
            } else {
                FlowState::Open
            },
            index,
            retries: 0,
        }
    }

    /// A record as an exporter built it, before archiving: what [`Self::from_wire`] reads
    /// from its archive (the simulator's batches, in the benchmarks).
    pub fn from_record(
        record: &FlowRecord,
        round_trip: Option<RoundTrip>,
        index: u32,
    ) -> BufferedFlow {
        BufferedFlow {
            local_ip: record.local_ip,
            remote_ip: record.remote_ip,
            local_port: record.local_port,
            remote_port: record.remote_port,
            local_workload: record.local_workload.map(|workload| workload.0),
            local_shared: record.local_shared,
            start: record.start,
            end: record.end,
            bytes_sent: record.bytes_sent,
            bytes_received: record.bytes_received,
            segments_sent: record.segments_sent,
            segments_received: record.segments_received,
            retransmits: record.retransmits,
            round_trip,
            direction: record.direction,
            state: record.state,
            index,
            retries: 0,
        }
    }
}

/// What every flow of a block shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHeader {
    pub exporter: u64,
    pub sequence: u64,
    /// When the collector received the batch.
    pub arrival: Timestamp,
    /// Who vouched for the batch: the exporter's own id (checked against its certificate
    /// under mutual TLS), or the id of the relay that forwarded it (another region's
    /// collector, speaking for its exporters).
    pub sender: u64,
    /// The checksum of the frame the batch came in: a retry resends the same frame, so with
    /// (sender, exporter, sequence) it tells a retry from another batch under the same numbers.
    pub frame_checksum: u32,
    /// The batch's records the evidence gate refused on this arrival (ascending): a retry of
    /// the same frame may have them admitted, and only those are new then.
    pub refused: Option<Arc<[u32]>>,
    /// The name of the host the batch was cut on, when its frame carried one.
    pub host_name: Option<Arc<str>>,
}

impl BlockHeader {
    /// The host the batch speaks for, as far as its sender is believed.
    pub fn host(&self) -> crate::ownership::Host {
        crate::ownership::Host {
            sender: self.sender,
            exporter: self.exporter,
        }
    }

    /// A header for tests and tools: the exporter vouching for itself, nothing refused.
    pub const fn of_exporter(exporter: u64, sequence: u64, arrival: Timestamp) -> BlockHeader {
        BlockHeader {
            exporter,
            sequence,
            arrival,
            sender: exporter,
            frame_checksum: 0,
            refused: None,
            host_name: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block magic {found:#010x} is not a block's")]
    BadMagic { found: u32 },
    #[error("block body of {length} bytes is over the limit")]
    TooLarge { length: usize },
    #[error("block checksum mismatch")]
    Checksum,
    #[error("block body ends inside {what}")]
    Truncated { what: &'static str },
    #[error("block field {what} is out of range")]
    OutOfRange { what: &'static str },
    #[error("block has {extra} bytes after its last flow")]
    TrailingBytes { extra: usize },
}

/// Appends one block holding `flows` to `out`. `workloads` is the dictionary the flows'
/// `local_workload` indices refer to.
pub fn encode_block<S: AsRef<str>>(
    header: &BlockHeader,
    workloads: &[S],
    flows: &[BufferedFlow],
    out: &mut Vec<u8>,
) {
    let (names, numbers) = names_used(workloads, flows);
    write_block(BLOCK_MAGIC, header, flows.len(), out, |out| {
        put_v4_fields(out, header, &names);
        modelled::encode_flows(flows, &numbers, out);
    });
}

/// The names of `workloads` that `flows` name, in the order they first do, and each index's
/// number among them (`u32::MAX` if no flow names it): a block holds the part of a batch that
/// landed on one shard, and since "FLW7" its dictionary only what that part names.
fn names_used<'a, S: AsRef<str>>(
    workloads: &'a [S],
    flows: &[BufferedFlow],
) -> (Vec<&'a str>, Vec<u32>) {
    let mut numbers = vec![u32::MAX; workloads.len()];
    let mut names = Vec::new();
    for index in flows.iter().filter_map(|flow| flow.local_workload) {
        if let Some(number) = numbers.get_mut(index as usize)
            && *number == u32::MAX
        {
            *number = names.len() as u32;
            names.push(workloads[index as usize].as_ref());
        }
    }
    (names, numbers)
}

/// The format before the modelled flows, kept only to prove its blocks still read back.
#[cfg(test)]
pub(super) fn encode_block_v6<S: AsRef<str>>(
    header: &BlockHeader,
    workloads: &[S],
    flows: &[BufferedFlow],
    out: &mut Vec<u8>,
) {
    write_block(BLOCK_MAGIC_V6, header, flows.len(), out, |out| {
        put_v4_fields(out, header, workloads);
        flows::encode_flows(flows, &flows::Preamble::of(flows), true, out);
    });
}

/// The formats before round trips ("FLW5" in microseconds, "FLW4" in nanoseconds), kept only to
/// prove their blocks still read back.
#[cfg(test)]
pub(super) fn encode_block_v5<S: AsRef<str>>(
    header: &BlockHeader,
    workloads: &[S],
    flows: &[BufferedFlow],
    out: &mut Vec<u8>,
) {
    let preamble = flows::Preamble::of(flows);
    let magic = match preamble.unit {
        flows::TimeUnit::Micros => BLOCK_MAGIC_V5,
        flows::TimeUnit::Nanos => BLOCK_MAGIC_V4,
    };
    write_block(magic, header, flows.len(), out, |out| {
        put_v4_fields(out, header, workloads);
        flows::encode_flows(flows, &preamble, false, out);
    });
}

/// The fields before the flows since "FLW4": those of "FLW3", the host name, the dictionary.
fn put_v4_fields<S: AsRef<str>>(out: &mut Vec<u8>, header: &BlockHeader, workloads: &[S]) {
    put_v3_fields(out, header);
    let host_name = header.host_name.as_deref().unwrap_or_default().as_bytes();
    put_varint(out, host_name.len() as u64);
    out.extend_from_slice(host_name);
    put_names(out, workloads);
}

/// The format before [`BlockHeader::host_name`], kept only to prove its blocks still read back.
#[cfg(test)]
pub(super) fn encode_block_v3<S: AsRef<str>>(
    header: &BlockHeader,
    workloads: &[S],
    flows: &[BufferedFlow],
    out: &mut Vec<u8>,
) {
    write_block(BLOCK_MAGIC_V3, header, flows.len(), out, |out| {
        put_v3_fields(out, header);
        put_names(out, workloads);
        flows::encode_flows(flows, &flows::Preamble::in_nanos(flows), false, out);
    });
}

/// The format before [`BlockHeader::sender`], kept only to prove its blocks still read back.
#[cfg(test)]
pub(super) fn encode_block_v2<S: AsRef<str>>(
    header: &BlockHeader,
    workloads: &[S],
    flows: &[BufferedFlow],
    out: &mut Vec<u8>,
) {
    write_block(BLOCK_MAGIC_V2, header, flows.len(), out, |out| {
        put_varint(out, header.sequence);
        put_varint(out, header.arrival.as_nanos());
        put_names(out, workloads);
        flows::encode_flows(flows, &flows::Preamble::in_nanos(flows), false, out);
    });
}

/// The header fields a body has held since "FLW3": sequence, arrival, sender, frame checksum,
/// refused records.
fn put_v3_fields(out: &mut Vec<u8>, header: &BlockHeader) {
    put_varint(out, header.sequence);
    put_varint(out, header.arrival.as_nanos());
    put_varint(out, header.sender);
    put_varint(out, u64::from(header.frame_checksum));
    let refused = header.refused.as_deref().unwrap_or_default();
    put_varint(out, refused.len() as u64);
    let mut previous = 0;
    for &index in refused {
        put_varint(out, u64::from(index - previous));
        previous = index;
    }
}

/// Frames the body `write_body` appends as a block: header, length, checksum.
fn write_block(
    magic: u32,
    header: &BlockHeader,
    flows: usize,
    out: &mut Vec<u8>,
    write_body: impl FnOnce(&mut Vec<u8>),
) {
    let header_at = out.len();
    out.extend_from_slice(&[0; BLOCK_HEADER_BYTES]);
    let body_at = out.len();
    write_body(out);
    let body_len = (out.len() - body_at) as u32;
    let header_bytes = &mut out[header_at..body_at];
    header_bytes[0..4].copy_from_slice(&magic.to_le_bytes());
    header_bytes[4..8].copy_from_slice(&body_len.to_le_bytes());
    header_bytes[12..16].copy_from_slice(&(flows as u32).to_le_bytes());
    header_bytes[16..24].copy_from_slice(&header.exporter.to_le_bytes());
    let crc = crc32c::crc32c_append(crc_seed(magic), &out[header_at + CHECKED_FROM..]);
    out[header_at + 8..header_at + 12].copy_from_slice(&crc.to_le_bytes());
}

fn put_names<S: AsRef<str>>(out: &mut Vec<u8>, workloads: &[S]) {
    put_varint(out, workloads.len() as u64);
    for name in workloads {
        let name = name.as_ref().as_bytes();
        put_varint(out, name.len() as u64);
        out.extend_from_slice(name);
    }
}

/// The checksum covers the header from the flow count on, and the body: everything but the
/// magic and length, which are checked by their own means, and the checksum itself.
const CHECKED_FROM: usize = 12;

/// Where a block's checksum starts. Since "FLW3" it covers the magic too: one flipped bit turns
/// one format's magic into another's, whose body reads differently, and must fail the check
/// rather than decode the wrong fields.
fn crc_seed(magic: u32) -> u32 {
    if SINCE_V3.contains(&magic) {
        crc32c::crc32c(&magic.to_le_bytes())
    } else {
        0
    }
}

/// A checked block, read in place. Its flows decode lazily through [`Block::for_each_flow`].
#[derive(Debug, Clone)]
pub struct Block<'a> {
    pub header: BlockHeader,
    workloads: Vec<&'a str>,
    flow_count: u32,
    format: Format,
    flows: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `FLWB`: its body holds the base its start deltas count from.
    Legacy {
        base_start: u64,
    },
    Current(flows::FlowsFormat),
}

/// Decodes the block at the start of `buf`. `Ok(None)`: `buf` holds only part of a block.
pub fn decode_block(buf: &[u8]) -> Result<Option<(Block<'_>, usize)>, BlockError> {
    let Some(header) = buf.first_chunk::<BLOCK_HEADER_BYTES>() else {
        return Ok(None);
    };
    let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    if !BLOCK_MAGICS.contains(&magic) {
        return Err(BlockError::BadMagic { found: magic });
    }
    let body_len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    if body_len > BLOCK_BODY_BYTES_MAX {
        return Err(BlockError::TooLarge { length: body_len });
    }
    let Some(body) = buf.get(BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + body_len) else {
        return Ok(None);
    };
    let crc = crc32c::crc32c_append(
        crc32c::crc32c_append(crc_seed(magic), &header[CHECKED_FROM..]),
        body,
    );
    if crc != u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) {
        return Err(BlockError::Checksum);
    }
    let flow_count = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    let exporter = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    let mut reader = Reader(body);
    let sequence = reader.varint("sequence")?;
    let arrival = Timestamp::from_nanos(reader.varint("arrival")?);
    let (mut sender, mut frame_checksum, mut refused, mut host_name) = (exporter, 0, None, None);
    let format = if magic == legacy::MAGIC {
        Format::Legacy {
            base_start: reader.varint("base start")?,
        }
    } else {
        if SINCE_V3.contains(&magic) {
            sender = reader.varint("sender")?;
            frame_checksum = u32::try_from(reader.varint("frame checksum")?).map_err(|_| {
                BlockError::OutOfRange {
                    what: "frame checksum",
                }
            })?;
            refused = read_refused(&mut reader)?;
        }
        if [BLOCK_MAGIC, BLOCK_MAGIC_V6, BLOCK_MAGIC_V5, BLOCK_MAGIC_V4].contains(&magic) {
            let len = reader.varint("host name length")?;
            let name = reader.bytes(len, "host name")?;
            let name = std::str::from_utf8(name)
                .map_err(|_| BlockError::OutOfRange { what: "host name" })?;
            host_name = (!name.is_empty()).then(|| Arc::from(name));
        }
        Format::Current(match magic {
            BLOCK_MAGIC => flows::FlowsFormat::Modelled,
            BLOCK_MAGIC_V6 => flows::FlowsFormat::Measured,
            BLOCK_MAGIC_V5 => flows::FlowsFormat::Plain(flows::TimeUnit::Micros),
            _ => flows::FlowsFormat::Plain(flows::TimeUnit::Nanos),
        })
    };
    let workload_count = reader.varint("dictionary size")?;
    // Each name takes at least its length byte: a count beyond the body is corrupt, and
    // checking it first bounds the allocation below by the block's size.
    if workload_count > reader.0.len() as u64 {
        return Err(BlockError::OutOfRange {
            what: "dictionary size",
        });
    }
    let mut workloads = Vec::with_capacity(workload_count as usize);
    for _ in 0..workload_count {
        let len = reader.varint("name length")?;
        let name = reader.bytes(len, "workload name")?;
        let name = std::str::from_utf8(name).map_err(|_| BlockError::OutOfRange {
            what: "workload name",
        })?;
        workloads.push(name);
    }
    Ok(Some((
        Block {
            header: BlockHeader {
                exporter,
                sequence,
                arrival,
                sender,
                frame_checksum,
                refused,
                host_name,
            },
            workloads,
            flow_count,
            format,
            flows: reader.0,
        },
        BLOCK_HEADER_BYTES + body_len,
    )))
}

/// The refused record indices of a block body: ascending, each below a batch's limit.
fn read_refused(reader: &mut Reader<'_>) -> Result<Option<Arc<[u32]>>, BlockError> {
    let count = reader.varint("refused count")?;
    if count == 0 {
        return Ok(None);
    }
    // Each index takes at least a byte: a count beyond the body is corrupt.
    if count > reader.0.len() as u64 {
        return Err(BlockError::OutOfRange {
            what: "refused count",
        });
    }
    let mut indices = Vec::with_capacity(count as usize);
    let mut previous: u64 = 0;
    for _ in 0..count {
        previous = previous
            .checked_add(reader.varint("refused index")?)
            .filter(|index| *index < u64::from(u32::MAX))
            .ok_or(BlockError::OutOfRange {
                what: "refused index",
            })?;
        indices.push(previous as u32);
    }
    Ok(Some(indices.into()))
}

impl<'a> Block<'a> {
    pub fn workloads(&self) -> &[&'a str] {
        &self.workloads
    }

    pub fn flow_count(&self) -> u32 {
        self.flow_count
    }

    /// Calls `each` with every flow in order. A flow that does not decode, or bytes left
    /// over, are an error; the flows before it have been delivered.
    pub fn for_each_flow(&self, each: impl FnMut(BufferedFlow)) -> Result<(), BlockError> {
        let mut reader = Reader(self.flows);
        let workloads = self.workloads.len();
        match self.format {
            Format::Current(format) => {
                flows::decode_flows(&mut reader, self.flow_count, workloads, format, each)?
            }
            Format::Legacy { base_start } => {
                legacy::decode_flows(&mut reader, self.flow_count, base_start, workloads, each)?
            }
        }
        match reader.0.len() {
            0 => Ok(()),
            extra => Err(BlockError::TrailingBytes { extra }),
        }
    }
}
