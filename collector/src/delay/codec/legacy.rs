//! Blocks of the first format (magic `FLWB`), read so that segments written before an upgrade
//! still replay after it; nothing writes them any more.
//!
//! ```text
//! body: sequence, arrival ns, base start ns (varints); workload dictionary
//! flow: flags u8 | local IP, remote IP (4 or 16 bytes each) | local port, remote port (u16 LE)
//!       | [local workload index] | [index delta] | start delta (zigzag) | duration | bytes sent |
//!       bytes received | segments sent | segments received | retransmits   (varints)
//! ```

use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};

use super::varint::{Reader, unzigzag};
use super::{BlockError, BufferedFlow};

pub(super) const MAGIC: u32 = u32::from_le_bytes(*b"FLWB");

const FLAG_V4: u8 = 1;
const FLAG_INBOUND: u8 = 1 << 1;
const FLAG_CLOSED: u8 = 1 << 2;
const FLAG_SHARED: u8 = 1 << 3;
const FLAG_WORKLOAD: u8 = 1 << 4;
const FLAG_NEXT_INDEX: u8 = 1 << 5;
const RETRIES_SHIFT: u8 = 6;

/// Decodes `count` flows from `reader`; `base_start` is the body's base, `workloads` the size
/// of its dictionary.
pub(super) fn decode_flows(
    reader: &mut Reader<'_>,
    count: u32,
    base_start: u64,
    workloads: usize,
    mut each: impl FnMut(BufferedFlow),
) -> Result<(), BlockError> {
    let mut previous_start = base_start;
    let mut previous_index = u32::MAX;
    for _ in 0..count {
        let flags = reader.byte("flags")?;
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
            if index >= workloads as u64 {
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
            round_trip: None,
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
    Ok(())
}

/// The first format's writer, kept only to prove its blocks still read back.
#[cfg(test)]
pub(super) fn encode_block<S: AsRef<str>>(
    header: &super::BlockHeader,
    workloads: &[S],
    flows: &[BufferedFlow],
    out: &mut Vec<u8>,
) {
    use super::varint::{put_varint, zigzag};
    let base = flows
        .iter()
        .map(|flow| flow.start)
        .min()
        .unwrap_or(Timestamp::ZERO);
    super::write_block(MAGIC, header, flows.len(), out, |out| {
        put_varint(out, header.sequence);
        put_varint(out, header.arrival.as_nanos());
        put_varint(out, base.as_nanos());
        super::put_names(out, workloads);
        let mut previous_start = base.as_nanos();
        let mut previous_index = u32::MAX;
        for flow in flows {
            let v4 = flow.local_ip.to_v4().zip(flow.remote_ip.to_v4());
            let next_index = flow.index == previous_index.wrapping_add(1);
            let flags = (flow.retries << RETRIES_SHIFT)
                | if next_index { FLAG_NEXT_INDEX } else { 0 }
                | if v4.is_some() { FLAG_V4 } else { 0 }
                | if flow.direction == Direction::Inbound {
                    FLAG_INBOUND
                } else {
                    0
                }
                | if flow.state == FlowState::Closed {
                    FLAG_CLOSED
                } else {
                    0
                }
                | if flow.local_shared { FLAG_SHARED } else { 0 }
                | if flow.local_workload.is_some() {
                    FLAG_WORKLOAD
                } else {
                    0
                };
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
    });
}
