//! The flows of the formats before the modelled one (magics `FLW2` to `FLW6`), still read so
//! that segments written before an upgrade replay; [`super::modelled`] writes the current one. A block is one exporter's batch, or the
//! part of it that landed on one shard, so what repeats is what one host repeats: its own few
//! addresses and workloads, the service ports it serves and calls, the fleet's address range,
//! and close times a few milliseconds apart. Each is written once and referred to after:
//!
//! ```text
//! preamble: [time unit u8] | base end | remote IPv4 base (varints)
//! flow:     flags u8 | local endpoint | service port | other port (u16 LE) | remote IP
//!           | [index delta] | end delta (zigzag) | duration | bytes sent | bytes received
//!           | segments sent | segments received | [retransmits]
//!           | [round trip + 1 | deviation]                               (varints)
//! ```
//!
//! `FLW6` writes the time unit (0: nanoseconds, 1: microseconds) and every flow's round trip
//! (the smoothed RTT in µs plus one, 0 for none, then its deviation if there is one); the
//! formats before it have neither, their unit given by their magic.
//!
//! - The local endpoint (IP, workload, shared) is a varint: even, `2 * n` names the block's
//!   n-th endpoint written out; odd, `2 * attributes + 1` is followed by the IP (4 or 16 bytes)
//!   and becomes the next one. Attributes: `(workload index + 1) << 2 | shared << 1 | IPv6`.
//! - The service port is the local port of an inbound flow, the remote port of an outbound
//!   one: a varint naming a port the block wrote out before, or, with
//!   [`FLAG_NEW_SERVICE_PORT`], the port itself (u16 LE), which becomes the next.
//! - An IPv4 remote is a varint of its distance above the block's lowest IPv4 remote (three
//!   bytes inside a /16 or a /11); an IPv6 one, with [`FLAG_REMOTE_V6`], its 16 bytes.
//! - Times: the end as a signed delta from the previous flow's (an exporter cuts flows in the
//!   order they close, so the delta is the gap between two closes), then the duration; in
//!   microseconds (`FLW5`) or nanoseconds (before), the base end too.
//! - Retransmits are written only when not zero; the index only when it is not the previous
//!   flow's plus one.

use flowattr_common::{CanonicalIp, Direction, FlowState, RoundTrip, Timestamp};

use super::varint::{Reader, unzigzag};
#[cfg(test)]
use super::varint::{put_varint, zigzag};
use super::{BlockError, BufferedFlow};

pub(super) const FLAG_INBOUND: u8 = 1;
pub(super) const FLAG_CLOSED: u8 = 1 << 1;
pub(super) const FLAG_RETRANSMITS: u8 = 1 << 2;
pub(super) const FLAG_INDEX_GAP: u8 = 1 << 3;
const FLAG_REMOTE_V6: u8 = 1 << 4;
const FLAG_NEW_SERVICE_PORT: u8 = 1 << 5;
const RETRIES_SHIFT: u8 = 6;

/// The local side of a flow as the block's endpoint table holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Endpoint {
    pub ip: CanonicalIp,
    pub workload: Option<u32>,
    pub shared: bool,
}

/// The encoder's memory of what it wrote out: a small direct-mapped cache rather than a map,
/// so encoding allocates nothing. A collision only writes an endpoint out again (as a new
/// entry), which the decoder takes like any other.
pub(super) struct Recent<K, const N: usize> {
    slots: [Option<(K, u32)>; N],
    next: u32,
}

impl<K: Copy + PartialEq, const N: usize> Recent<K, N> {
    pub(super) fn new() -> Self {
        Recent {
            slots: [None; N],
            next: 0,
        }
    }

    /// The number `key` was given, or None after giving it the next one. A key is looked
    /// for in the few slots from its own on, so that two keys of one slot (a block's eight
    /// service ports share 64 slots often enough) do not push each other out.
    pub(super) fn find_or_add(&mut self, key: K, hash: u32) -> Option<u32> {
        const PROBES: usize = 4;
        let home = hash as usize % N;
        let mut free = None;
        for probe in 0..PROBES {
            let at = (home + probe) % N;
            match self.slots[at] {
                Some((held, number)) if held == key => return Some(number),
                Some(_) => {}
                None => {
                    free = Some(at);
                    break;
                }
            }
        }
        self.slots[free.unwrap_or(home)] = Some((key, self.next));
        self.next += 1;
        None
    }
}

/// What a block's times count in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimeUnit {
    Nanos,
    Micros,
}

impl TimeUnit {
    pub(super) fn nanos(self) -> u64 {
        match self {
            TimeUnit::Nanos => 1,
            TimeUnit::Micros => 1000,
        }
    }
}

/// Which of the formats the flows are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlowsFormat {
    /// `FLW7`: [`super::modelled`].
    Modelled,
    /// `FLW6`: the unit in the preamble, a round trip per flow.
    Measured,
    /// The formats before: no round trips, times in the unit the magic says.
    Plain(TimeUnit),
}

/// What the flows' encoding counts from, found in one pass over them.
pub(super) struct Preamble {
    /// Microseconds when every time of the flows is a whole one.
    pub unit: TimeUnit,
    /// The earliest end, in nanoseconds.
    pub base_end: u64,
    /// The lowest IPv4 remote address.
    pub remote_base: u32,
}

impl Preamble {
    pub(super) fn of(flows: &[BufferedFlow]) -> Preamble {
        let (mut whole_micros, mut base_end, mut remote_base) = (true, u64::MAX, u32::MAX);
        for flow in flows {
            whole_micros &= flow.start.as_nanos() % 1000 == 0 && flow.end.as_nanos() % 1000 == 0;
            base_end = base_end.min(flow.end.as_nanos());
            if let Some(remote) = flow.remote_ip.to_v4() {
                remote_base = remote_base.min(u32::from(remote));
            }
        }
        Preamble {
            unit: if whole_micros {
                TimeUnit::Micros
            } else {
                TimeUnit::Nanos
            },
            base_end: if flows.is_empty() { 0 } else { base_end },
            remote_base: if remote_base == u32::MAX {
                0
            } else {
                remote_base
            },
        }
    }

    /// For the formats before "FLW5", which count in nanoseconds only.
    #[cfg(test)]
    pub(super) fn in_nanos(flows: &[BufferedFlow]) -> Preamble {
        Preamble {
            unit: TimeUnit::Nanos,
            ..Preamble::of(flows)
        }
    }
}

pub(super) fn spread(value: u32) -> u32 {
    value.wrapping_mul(0x9E37_79B1) >> 16
}

/// Writes the preamble and `flows` in `FLW6`, or (`measured` false, for tests of reading them)
/// in the format before: only tests write these formats now, to prove they still read.
#[cfg(test)]
pub(super) fn encode_flows(
    flows: &[BufferedFlow],
    preamble: &Preamble,
    measured: bool,
    out: &mut Vec<u8>,
) {
    if measured {
        out.push(match preamble.unit {
            TimeUnit::Nanos => 0,
            TimeUnit::Micros => 1,
        });
    }
    // A constant divisor each, so that dividing is a multiply and a shift, not a division.
    match preamble.unit {
        TimeUnit::Nanos => encode_flows_in::<1>(flows, preamble, measured, out),
        TimeUnit::Micros => encode_flows_in::<1000>(flows, preamble, measured, out),
    }
}

/// [`encode_flows`] with times counted in `UNIT` nanoseconds.
#[cfg(test)]
fn encode_flows_in<const UNIT: u64>(
    flows: &[BufferedFlow],
    preamble: &Preamble,
    measured: bool,
    out: &mut Vec<u8>,
) {
    let unit = UNIT;
    let (base_end, remote_base) = (preamble.base_end / unit, preamble.remote_base);
    put_varint(out, base_end);
    put_varint(out, u64::from(remote_base));
    let mut endpoints = Recent::<Endpoint, 256>::new();
    let mut ports = Recent::<u16, 64>::new();
    let mut previous_end = base_end;
    // So that a block whose first flow is index 0 stores no index at all.
    let mut previous_index = u32::MAX;
    for flow in flows {
        let inbound = flow.direction == Direction::Inbound;
        let (service_port, other_port) = if inbound {
            (flow.local_port, flow.remote_port)
        } else {
            (flow.remote_port, flow.local_port)
        };
        let service = ports.find_or_add(service_port, spread(u32::from(service_port)));
        let remote_v4 = flow.remote_ip.to_v4();
        let index_gap = flow.index != previous_index.wrapping_add(1);
        let flags = (flow.retries.min(super::RETRIES_MAX) << RETRIES_SHIFT)
            | shared_flags(flow, index_gap)
            | if remote_v4.is_none() {
                FLAG_REMOTE_V6
            } else {
                0
            }
            | if service.is_none() {
                FLAG_NEW_SERVICE_PORT
            } else {
                0
            };
        out.push(flags);
        encode_endpoint(&mut endpoints, flow, out);
        match service {
            Some(number) => put_varint(out, u64::from(number)),
            None => out.extend_from_slice(&service_port.to_le_bytes()),
        }
        out.extend_from_slice(&other_port.to_le_bytes());
        match remote_v4 {
            Some(remote) => put_varint(out, u64::from(u32::from(remote) - remote_base)),
            None => out.extend_from_slice(&flow.remote_ip.octets()),
        }
        if index_gap {
            // Wrapping keeps a hand-built block with falling indices encodable.
            put_varint(out, u64::from(flow.index.wrapping_sub(previous_index)));
        }
        previous_index = flow.index;
        let end = flow.end.as_nanos() / unit;
        put_varint(out, zigzag(end.wrapping_sub(previous_end) as i64));
        previous_end = end;
        // Whole units both (TimeUnit::of), so the duration is exact in them.
        put_varint(out, end.saturating_sub(flow.start.as_nanos() / unit));
        put_varint(out, flow.bytes_sent);
        put_varint(out, flow.bytes_received);
        put_varint(out, u64::from(flow.segments_sent));
        put_varint(out, u64::from(flow.segments_received));
        if flow.retransmits != 0 {
            put_varint(out, u64::from(flow.retransmits));
        }
        if measured {
            match flow.round_trip {
                Some(trip) => {
                    put_varint(out, u64::from(trip.smoothed_us) + 1);
                    put_varint(out, u64::from(trip.deviation_us));
                }
                None => out.push(0),
            }
        }
    }
}

#[cfg(test)]
fn encode_endpoint(endpoints: &mut Recent<Endpoint, 256>, flow: &BufferedFlow, out: &mut Vec<u8>) {
    let endpoint = Endpoint {
        ip: flow.local_ip,
        workload: flow.local_workload,
        shared: flow.local_shared,
    };
    if let Some(number) = endpoints.find_or_add(endpoint, endpoint_hash(&endpoint)) {
        put_varint(out, u64::from(number) << 1);
        return;
    }
    let v4 = flow.local_ip.to_v4();
    let workload = flow.local_workload.map_or(0, |index| u64::from(index) + 1);
    let attributes = workload << 2 | u64::from(flow.local_shared) << 1 | u64::from(v4.is_none());
    put_varint(out, attributes << 1 | 1);
    match v4 {
        Some(v4) => out.extend_from_slice(&v4.octets()),
        None => out.extend_from_slice(&flow.local_ip.octets()),
    }
}

/// The flag bits every format since "FLW2" shares: direction, state, whether retransmits and
/// an index gap follow.
pub(super) fn shared_flags(flow: &BufferedFlow, index_gap: bool) -> u8 {
    (if flow.direction == Direction::Inbound {
        FLAG_INBOUND
    } else {
        0
    }) | if flow.state == FlowState::Closed {
        FLAG_CLOSED
    } else {
        0
    } | if flow.retransmits != 0 {
        FLAG_RETRANSMITS
    } else {
        0
    } | if index_gap { FLAG_INDEX_GAP } else { 0 }
}

pub(super) fn direction_and_state(flags: u8) -> (Direction, FlowState) {
    (
        if flags & FLAG_INBOUND != 0 {
            Direction::Inbound
        } else {
            Direction::Outbound
        },
        if flags & FLAG_CLOSED != 0 {
            FlowState::Closed
        } else {
            FlowState::Open
        },
    )
}

/// Where an endpoint goes in the encoder's cache.
pub(super) fn endpoint_hash(endpoint: &Endpoint) -> u32 {
    let octets = endpoint.ip.octets();
    let low = u32::from_le_bytes(octets[12..].try_into().expect("4 bytes"));
    spread(low ^ endpoint.workload.unwrap_or(u32::MAX).rotate_left(16))
}

/// Decodes the preamble and `count` flows; `workloads` is the size of the block's dictionary.
pub(super) fn decode_flows(
    reader: &mut Reader<'_>,
    count: u32,
    workloads: usize,
    format: FlowsFormat,
    mut each: impl FnMut(BufferedFlow),
) -> Result<(), BlockError> {
    let (unit, measured) = match format {
        FlowsFormat::Modelled => {
            return super::modelled::decode_flows(reader, count, workloads, each);
        }
        FlowsFormat::Measured => match reader.byte("time unit")? {
            0 => (TimeUnit::Nanos, true),
            1 => (TimeUnit::Micros, true),
            _ => return Err(BlockError::OutOfRange { what: "time unit" }),
        },
        FlowsFormat::Plain(unit) => (unit, false),
    };
    let unit = unit.nanos();
    let mut previous_end = reader.varint("base end")?;
    let remote_base =
        u32::try_from(reader.varint("remote base")?).map_err(|_| BlockError::OutOfRange {
            what: "remote base",
        })?;
    // Each entry was written out by a flow, so neither outgrows the block.
    let mut endpoints: Vec<Endpoint> = Vec::new();
    let mut ports: Vec<u16> = Vec::new();
    let mut previous_index = u32::MAX;
    for _ in 0..count {
        let flags = reader.byte("flags")?;
        let local = decode_endpoint(reader, &mut endpoints, workloads)?;
        let service_port = if flags & FLAG_NEW_SERVICE_PORT != 0 {
            let port = u16::from_le_bytes(reader.array("service port")?);
            ports.push(port);
            port
        } else {
            let number = reader.varint("service port")?;
            *ports.get(number as usize).ok_or(BlockError::OutOfRange {
                what: "service port",
            })?
        };
        let other_port = u16::from_le_bytes(reader.array("port")?);
        let remote_ip = if flags & FLAG_REMOTE_V6 != 0 {
            CanonicalIp::from_octets(reader.array("remote IP")?)
        } else {
            let offset = u32::try_from(reader.varint("remote IP")?)
                .ok()
                .and_then(|offset| remote_base.checked_add(offset))
                .ok_or(BlockError::OutOfRange { what: "remote IP" })?;
            CanonicalIp::from_v4(offset.into())
        };
        let delta = if flags & FLAG_INDEX_GAP != 0 {
            reader.u32("index")?
        } else {
            1
        };
        let index = previous_index.wrapping_add(delta);
        previous_index = index;
        let end = previous_end.wrapping_add(unzigzag(reader.varint("end")?) as u64);
        previous_end = end;
        let start = end
            .checked_sub(reader.varint("duration")?)
            .ok_or(BlockError::OutOfRange { what: "duration" })?;
        let (start, end) = start
            .checked_mul(unit)
            .zip(end.checked_mul(unit))
            .ok_or(BlockError::OutOfRange { what: "end" })?;
        let (direction, state) = direction_and_state(flags);
        let inbound = direction == Direction::Inbound;
        let (local_port, remote_port) = if inbound {
            (service_port, other_port)
        } else {
            (other_port, service_port)
        };
        let bytes_sent = reader.varint("bytes sent")?;
        let bytes_received = reader.varint("bytes received")?;
        let segments_sent = reader.u32("segments sent")?;
        let segments_received = reader.u32("segments received")?;
        let retransmits = if flags & FLAG_RETRANSMITS != 0 {
            reader.u32("retransmits")?
        } else {
            0
        };
        let round_trip = if measured {
            decode_round_trip(reader)?
        } else {
            None
        };
        each(BufferedFlow {
            local_ip: local.ip,
            remote_ip,
            local_port,
            remote_port,
            local_workload: local.workload,
            local_shared: local.shared,
            start: Timestamp::from_nanos(start),
            end: Timestamp::from_nanos(end),
            bytes_sent,
            bytes_received,
            segments_sent,
            segments_received,
            retransmits,
            round_trip,
            direction,
            state,
            index,
            retries: flags >> RETRIES_SHIFT,
        });
    }
    Ok(())
}

fn decode_round_trip(reader: &mut Reader<'_>) -> Result<Option<RoundTrip>, BlockError> {
    match reader.varint("round trip")? {
        0 => Ok(None),
        plus_one => Ok(Some(RoundTrip {
            smoothed_us: u32::try_from(plus_one - 1)
                .map_err(|_| BlockError::OutOfRange { what: "round trip" })?,
            deviation_us: reader.u32("round trip deviation")?,
        })),
    }
}

fn decode_endpoint(
    reader: &mut Reader<'_>,
    endpoints: &mut Vec<Endpoint>,
    workloads: usize,
) -> Result<Endpoint, BlockError> {
    let value = reader.varint("local endpoint")?;
    if value & 1 == 0 {
        return endpoints
            .get((value >> 1) as usize)
            .copied()
            .ok_or(BlockError::OutOfRange {
                what: "local endpoint",
            });
    }
    let attributes = value >> 1;
    let ip = if attributes & 1 != 0 {
        CanonicalIp::from_octets(reader.array("local IP")?)
    } else {
        CanonicalIp::from_v4(reader.array::<4>("local IP")?.into())
    };
    let workload = match attributes >> 2 {
        0 => None,
        number if number <= workloads as u64 => Some((number - 1) as u32),
        _ => {
            return Err(BlockError::OutOfRange {
                what: "workload index",
            });
        }
    };
    let endpoint = Endpoint {
        ip,
        workload,
        shared: attributes & 2 != 0,
    };
    endpoints.push(endpoint);
    Ok(endpoint)
}
