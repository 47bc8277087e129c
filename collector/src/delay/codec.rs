//! The on-disk encoding of buffered flows. At 5M flows/s a node writes every flow once and reads
//! it once, so the disk, not the CPU, is the first wall: the encoding is compact (varints,
//! 4-byte IPv4 addresses, times as deltas) and checked (a CRC-32C per block).
//!
//! A segment file is a sequence of blocks, each the part of one exporter batch that landed on
//! this shard:
//!
//! ```text
//! header (24 bytes): magic "FLWB" | body length u32 | CRC-32C u32 | flows u32 |
//!                    exporter u64     (the CRC covers flows, exporter and the body)
//! body: sequence, arrival ns, base start ns (varints); workload dictionary (count, then
//!       length + UTF-8 each); flows
//! flow: flags u8 | local IP, remote IP (4 or 16 bytes each) | local port, remote port (u16 LE)
//!       | [local workload index] | [index delta] | start delta (zigzag) | duration | bytes sent |
//!       bytes received | segments sent | segments received | retransmits   (varints)
//! ```
//!
//! Reading stops at the first block that is not whole and intact: after a crash that is the
//! torn tail of the last write, which was never acked. (O_DIRECT writes pad the file with
//! zeros, which fail the magic check the same way.)

use flowattr_common::wire::ArchivedFlowRecord;
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};

const BLOCK_MAGIC: u32 = u32::from_le_bytes(*b"FLWB");
pub const BLOCK_HEADER_BYTES: usize = 24;
/// Far above any real block (a 64K-flow batch part is ~2.5 MB); refuses a corrupted length
/// before it is trusted.
const BLOCK_BODY_BYTES_MAX: usize = 64 << 20;

const FLAG_V4: u8 = 1;
const FLAG_INBOUND: u8 = 1 << 1;
const FLAG_CLOSED: u8 = 1 << 2;
const FLAG_SHARED: u8 = 1 << 3;
const FLAG_WORKLOAD: u8 = 1 << 4;
/// The flow's index is the previous flow's plus one (the common case), so it is not stored.
const FLAG_NEXT_INDEX: u8 = 1 << 5;
const RETRIES_SHIFT: u8 = 6;
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
    pub direction: Direction,
    pub state: FlowState,
    /// Position in the exporter's batch: with (exporter, sequence) it names the flow.
    pub index: u32,
    /// Attribution attempts that found no evidence so far (at most [`RETRIES_MAX`]).
    pub retries: u8,
}

impl BufferedFlow {
    /// The record at `index` of a validated batch, before any attempt.
    pub fn from_wire(record: &ArchivedFlowRecord, index: u32) -> BufferedFlow {
        BufferedFlow {
            local_ip: record.local_ip.get(),
            remote_ip: record.remote_ip.get(),
            local_port: record.local_port.to_native(),
            remote_port: record.remote_port.to_native(),
            local_workload: record.local_workload.as_ref().map(|index| index.0.to_native()),
            local_shared: record.local_shared,
            start: record.start.get(),
            end: record.end.get(),
            bytes_sent: record.bytes_sent.to_native(),
            bytes_received: record.bytes_received.to_native(),
            segments_sent: record.segments_sent.to_native(),
            segments_received: record.segments_received.to_native(),
            retransmits: record.retransmits.to_native(),
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
}

/// What every flow of a block shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    pub exporter: u64,
    pub sequence: u64,
    /// When the collector received the batch.
    pub arrival: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block magic {found:#010x} is not FLWB")]
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
    let header_at = out.len();
    out.extend_from_slice(&[0; BLOCK_HEADER_BYTES]);
    let body_at = out.len();
    let base = flows.iter().map(|flow| flow.start).min().unwrap_or(Timestamp::ZERO);
    put_varint(out, header.sequence);
    put_varint(out, header.arrival.as_nanos());
    put_varint(out, base.as_nanos());
    put_varint(out, workloads.len() as u64);
    for name in workloads {
        let name = name.as_ref().as_bytes();
        put_varint(out, name.len() as u64);
        out.extend_from_slice(name);
    }
    let mut previous_start = base.as_nanos();
    // So that a block whose first flow is index 0 stores no index at all.
    let mut previous_index = u32::MAX;
    for flow in flows {
        let v4 = flow.local_ip.to_v4().zip(flow.remote_ip.to_v4());
        let mut flags = flow.retries.min(RETRIES_MAX) << RETRIES_SHIFT;
        let next_index = flow.index == previous_index.wrapping_add(1);
        if next_index {
            flags |= FLAG_NEXT_INDEX;
        }
        if v4.is_some() {
            flags |= FLAG_V4;
        }
        if flow.direction == Direction::Inbound {
            flags |= FLAG_INBOUND;
        }
        if flow.state == FlowState::Closed {
            flags |= FLAG_CLOSED;
        }
        if flow.local_shared {
            flags |= FLAG_SHARED;
        }
        if flow.local_workload.is_some() {
            flags |= FLAG_WORKLOAD;
        }
        out.push(flags);
        match v4 {
            Some((local, remote)) => {
                out.extend_from_slice(&local.octets());
                out.extend_from_slice(&remote.octets());
            }
            None => {
                out.extend_from_slice(&flow.local_ip.octets());
                out.extend_from_slice(&flow.remote_ip.octets());
            }
        }
        out.extend_from_slice(&flow.local_port.to_le_bytes());
        out.extend_from_slice(&flow.remote_port.to_le_bytes());
        if let Some(workload) = flow.local_workload {
            put_varint(out, u64::from(workload));
        }
        // Indices rise within a block (flows keep their batch order), so the delta is small;
        // wrapping keeps a hand-built block with falling indices encodable.
        if !next_index {
            put_varint(out, u64::from(flow.index.wrapping_sub(previous_index)));
        }
        previous_index = flow.index;
        let start = flow.start.as_nanos();
        put_varint(out, zigzag(start.wrapping_sub(previous_start) as i64));
        previous_start = start;
        put_varint(out, flow.end.nanos_since(flow.start));
        put_varint(out, flow.bytes_sent);
        put_varint(out, flow.bytes_received);
        put_varint(out, u64::from(flow.segments_sent));
        put_varint(out, u64::from(flow.segments_received));
        put_varint(out, u64::from(flow.retransmits));
    }
    let body_len = (out.len() - body_at) as u32;
    let header_bytes = &mut out[header_at..body_at];
    header_bytes[0..4].copy_from_slice(&BLOCK_MAGIC.to_le_bytes());
    header_bytes[4..8].copy_from_slice(&body_len.to_le_bytes());
    header_bytes[12..16].copy_from_slice(&(flows.len() as u32).to_le_bytes());
    header_bytes[16..24].copy_from_slice(&header.exporter.to_le_bytes());
    let crc = crc32c::crc32c(&out[header_at + CHECKED_FROM..]);
    out[header_at + 8..header_at + 12].copy_from_slice(&crc.to_le_bytes());
}

/// The checksum covers the header from the flow count on, and the body: everything but the
/// magic and length, which are checked by their own means, and the checksum itself.
const CHECKED_FROM: usize = 12;

/// A checked block, read in place. Its flows decode lazily through [`Block::flows`].
#[derive(Debug, Clone)]
pub struct Block<'a> {
    pub header: BlockHeader,
    workloads: Vec<&'a str>,
    flow_count: u32,
    base_start: u64,
    flows: &'a [u8],
}

/// Decodes the block at the start of `buf`. `Ok(None)`: `buf` holds only part of a block.
pub fn decode_block(buf: &[u8]) -> Result<Option<(Block<'_>, usize)>, BlockError> {
    let Some(header) = buf.first_chunk::<BLOCK_HEADER_BYTES>() else {
        return Ok(None);
    };
    let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    if magic != BLOCK_MAGIC {
        return Err(BlockError::BadMagic { found: magic });
    }
    let body_len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    if body_len > BLOCK_BODY_BYTES_MAX {
        return Err(BlockError::TooLarge { length: body_len });
    }
    let Some(body) = buf.get(BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + body_len) else {
        return Ok(None);
    };
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[CHECKED_FROM..]), body);
    if crc != u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) {
        return Err(BlockError::Checksum);
    }
    let flow_count = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    let exporter = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    let mut reader = Reader(body);
    let sequence = reader.varint("sequence")?;
    let arrival = Timestamp::from_nanos(reader.varint("arrival")?);
    let base_start = reader.varint("base start")?;
    let workload_count = reader.varint("dictionary size")?;
    // Each name takes at least its length byte: a count beyond the body is corrupt, and
    // checking it first bounds the allocation below by the block's size.
    if workload_count > reader.0.len() as u64 {
        return Err(BlockError::OutOfRange { what: "dictionary size" });
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
            },
            workloads,
            flow_count,
            base_start,
            flows: reader.0,
        },
        BLOCK_HEADER_BYTES + body_len,
    )))
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
    pub fn for_each_flow(&self, mut each: impl FnMut(BufferedFlow)) -> Result<(), BlockError> {
        let mut reader = Reader(self.flows);
        let mut previous_start = self.base_start;
        let mut previous_index = u32::MAX;
        for _ in 0..self.flow_count {
            let flags = reader.bytes(1, "flags")?[0];
            let (local_ip, remote_ip) = if flags & FLAG_V4 != 0 {
                let local: [u8; 4] = reader.array("local IP")?;
                let remote: [u8; 4] = reader.array("remote IP")?;
                (
                    CanonicalIp::from_v4(local.into()),
                    CanonicalIp::from_v4(remote.into()),
                )
            } else {
                (
                    CanonicalIp::from_octets(reader.array("local IP")?),
                    CanonicalIp::from_octets(reader.array("remote IP")?),
                )
            };
            let local_port = u16::from_le_bytes(reader.array("local port")?);
            let remote_port = u16::from_le_bytes(reader.array("remote port")?);
            let local_workload = if flags & FLAG_WORKLOAD != 0 {
                let index = reader.varint("workload index")?;
                if index >= self.workloads.len() as u64 {
                    return Err(BlockError::OutOfRange {
                        what: "workload index",
                    });
                }
                Some(index as u32)
            } else {
                None
            };
            let delta = if flags & FLAG_NEXT_INDEX != 0 {
                1
            } else {
                reader.u32("index")?
            };
            let index = previous_index.wrapping_add(delta);
            previous_index = index;
            let start = previous_start.wrapping_add(unzigzag(reader.varint("start")?) as u64);
            previous_start = start;
            let end = start
                .checked_add(reader.varint("duration")?)
                .ok_or(BlockError::OutOfRange { what: "duration" })?;
            each(BufferedFlow {
                local_ip,
                remote_ip,
                local_port,
                remote_port,
                local_workload,
                local_shared: flags & FLAG_SHARED != 0,
                start: Timestamp::from_nanos(start),
                end: Timestamp::from_nanos(end),
                bytes_sent: reader.varint("bytes sent")?,
                bytes_received: reader.varint("bytes received")?,
                segments_sent: reader.u32("segments sent")?,
                segments_received: reader.u32("segments received")?,
                retransmits: reader.u32("retransmits")?,
                direction: if flags & FLAG_INBOUND != 0 {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
                state: if flags & FLAG_CLOSED != 0 {
                    FlowState::Closed
                } else {
                    FlowState::Open
                },
                index,
                retries: flags >> RETRIES_SHIFT,
            });
        }
        match reader.0.len() {
            0 => Ok(()),
            extra => Err(BlockError::TrailingBytes { extra }),
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    (value >> 1) as i64 ^ -((value & 1) as i64)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self, what: &'static str) -> Result<u64, BlockError> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(10) {
            let bits = u64::from(byte & 0x7f);
            if i == 9 && byte > 1 {
                return Err(BlockError::OutOfRange { what });
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(if self.0.len() >= 10 {
            BlockError::OutOfRange { what }
        } else {
            BlockError::Truncated { what }
        })
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, BlockError> {
        u32::try_from(self.varint(what)?).map_err(|_| BlockError::OutOfRange { what })
    }

    fn bytes(&mut self, len: u64, what: &'static str) -> Result<&'a [u8], BlockError> {
        if len > self.0.len() as u64 {
            return Err(BlockError::Truncated { what });
        }
        let (taken, rest) = self.0.split_at(len as usize);
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], BlockError> {
        Ok(self.bytes(N as u64, what)?.try_into().expect("N bytes"))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use proptest::prelude::*;

    use super::*;

    fn arbitrary_flow() -> impl Strategy<Value = BufferedFlow> {
        let ip = prop_oneof![
            any::<u32>().prop_map(|v4| CanonicalIp::from_v4(v4.into())),
            any::<u128>().prop_map(|v6| CanonicalIp::from(Ipv6Addr::from(v6))),
        ];
        (
            (ip.clone(), ip, any::<u16>(), any::<u16>()),
            (proptest::option::of(0u32..4), any::<bool>(), any::<u64>(), any::<u64>()),
            (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>()),
            (any::<bool>(), any::<bool>(), any::<u32>(), 0..=RETRIES_MAX),
        )
            .prop_map(
                |(
                    (local_ip, remote_ip, local_port, remote_port),
                    (local_workload, local_shared, start, length),
                    (bytes_sent, bytes_received, segments_sent, segments_received, retransmits),
                    (inbound, closed, index, retries),
                )| BufferedFlow {
                    local_ip,
                    remote_ip,
                    local_port,
                    remote_port,
                    local_workload,
                    local_shared,
                    start: Timestamp::from_nanos(start),
                    end: Timestamp::from_nanos(start.saturating_add(length)),
                    bytes_sent,
                    bytes_received,
                    segments_sent,
                    segments_received,
                    retransmits,
                    direction: if inbound {
                        Direction::Inbound
                    } else {
                        Direction::Outbound
                    },
                    state: if closed {
                        FlowState::Closed
                    } else {
                        FlowState::Open
                    },
                    index,
                    retries,
                },
            )
    }

    type DecodedBlock = (BlockHeader, Vec<String>, Vec<BufferedFlow>);

    fn decode_all(buf: &[u8]) -> Result<Vec<DecodedBlock>, BlockError> {
        let mut at = 0;
        let mut blocks = Vec::new();
        while let Some((block, used)) = decode_block(&buf[at..])? {
            let mut flows = Vec::new();
            block.for_each_flow(|flow| flows.push(flow))?;
            let names = block.workloads().iter().map(|name| name.to_string()).collect();
            blocks.push((block.header, names, flows));
            at += used;
        }
        Ok(blocks)
    }

    proptest! {
        #[test]
        fn blocks_round_trip(
            flows in proptest::collection::vec(arbitrary_flow(), 0..50),
            exporter in any::<u64>(),
            sequence in any::<u64>(),
            arrival in any::<u64>(),
        ) {
            let header = BlockHeader { exporter, sequence, arrival: Timestamp::from_nanos(arrival) };
            let names = ["a", "b\"c", "d", "ünï"];
            let mut buf = Vec::new();
            encode_block(&header, &names, &flows, &mut buf);
            encode_block(&header, &names[..0], &[], &mut buf);
            let decoded = decode_all(&buf).unwrap();
            prop_assert_eq!(decoded.len(), 2);
            prop_assert_eq!(decoded[0].0, header);
            prop_assert_eq!(&decoded[0].1, &names.map(String::from).to_vec());
            prop_assert_eq!(&decoded[0].2, &flows);
            prop_assert!(decoded[1].2.is_empty());
        }

        #[test]
        fn damaged_blocks_are_errors_never_panics_or_wrong_flows(
            flows in proptest::collection::vec(arbitrary_flow(), 1..20),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let header = BlockHeader { exporter: 1, sequence: 2, arrival: Timestamp::from_nanos(3) };
            let mut buf = Vec::new();
            encode_block(&header, &["a", "b", "c", "d"], &flows, &mut buf);
            let whole = buf.len();
            // A torn tail: every strict prefix is incomplete, never an error or a block.
            let prefix = &buf[..cut.index(whole)];
            prop_assert!(matches!(decode_block(prefix), Ok(None)));
            // A flipped bit anywhere is caught by the magic, the length or the checksum.
            let at = flip.index(whole);
            buf[at] ^= 1 << bit;
            prop_assert!(decode_all(&buf).is_err() || decode_block(&buf).unwrap().is_none());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_all(&bytes);
        }
    }

    #[test]
    fn an_ipv4_flow_takes_at_most_32_bytes() {
        // A typical RPC: 80 ms long, 20 KB one way and 1.5 KB the other, a flow starting about
        // every millisecond on the host. (A 1.5 s, 300 KB flow takes 32 bytes.)
        let start = Timestamp::from_nanos(1_700_000_000_000_000_000);
        let flow = BufferedFlow {
            local_ip: CanonicalIp::from_v4([10, 1, 2, 3].into()),
            remote_ip: CanonicalIp::from_v4([10, 4, 5, 6].into()),
            local_port: 443,
            remote_port: 51234,
            local_workload: Some(0),
            local_shared: false,
            start,
            end: start.saturating_add(std::time::Duration::from_millis(80)),
            bytes_sent: 20_000,
            bytes_received: 1_500,
            segments_sent: 20,
            segments_received: 10,
            retransmits: 0,
            direction: Direction::Inbound,
            state: FlowState::Closed,
            index: 0,
            retries: 0,
        };
        let flows: Vec<_> = (0..1000u32)
            .map(|i| BufferedFlow {
                index: i,
                start: start.saturating_add(std::time::Duration::from_micros(u64::from(i) * 977)),
                ..flow
            })
            .collect();
        let header = BlockHeader { exporter: 7, sequence: 9, arrival: start };
        let mut buf = Vec::new();
        encode_block(&header, &["api-gateway"], &flows, &mut buf);
        let per_flow = buf.len() as f64 / flows.len() as f64;
        assert!(per_flow <= 32.0, "{per_flow} bytes per flow");
        let long = flows
            .iter()
            .map(|flow| BufferedFlow {
                end: flow.start.saturating_add(std::time::Duration::from_millis(1500)),
                bytes_sent: 300_000,
                bytes_received: 20_000,
                segments_sent: 220,
                segments_received: 80,
                ..*flow
            })
            .collect::<Vec<_>>();
        buf.clear();
        encode_block(&header, &["api-gateway"], &long, &mut buf);
        let per_flow = buf.len() as f64 / flows.len() as f64;
        assert!(per_flow <= 32.1, "{per_flow} bytes per flow");
    }
}
