//! Reading an `FLW7` block's flows: the mirror of [`super::tokenize`], field for field.

use flowattr_common::{CanonicalIp, Direction, RoundTrip, Timestamp};

use super::super::bits::BitReader;
use super::super::flows::{
    Endpoint, FLAG_INDEX_GAP, FLAG_RETRANSMITS, TimeUnit, direction_and_state,
};
use super::super::huffman::Decoder;
use super::super::varint::{Reader, unzigzag};
use super::{RETRIES_SHIFT, Reference, SegmentsFilled, column, context};
use crate::delay::codec::{BlockError, BufferedFlow, RETRIES_MAX};

/// Reads what [`super::encode_flows`] wrote: `count` flows, their workload indices below `workloads`.
pub(in crate::delay::codec) fn decode_flows(
    reader: &mut Reader<'_>,
    count: u32,
    workloads: usize,
    mut each: impl FnMut(BufferedFlow),
) -> Result<(), BlockError> {
    let unit = match reader.byte("time unit")? {
        0 => TimeUnit::Nanos,
        1 => TimeUnit::Micros,
        _ => return Err(BlockError::OutOfRange { what: "time unit" }),
    }
    .nanos();
    let mut previous_end = reader.varint("base end")?;
    let remote_base =
        u32::try_from(reader.varint("remote base")?).map_err(|_| BlockError::OutOfRange {
            what: "remote base",
        })?;
    let filled = SegmentsFilled::at(reader.varint("segment size")?);
    let mut codes = Vec::with_capacity(column::COUNT);
    for _ in 0..column::COUNT {
        codes.push(Decoder::read(reader, "column code")?);
    }
    let first_length = u32::from_le_bytes(reader.array("bit stream length")?);
    let first = reader.bytes(u64::from(first_length), "bit stream")?;
    let mut stream = Stream {
        codes,
        streams: [BitReader::new(first), BitReader::new(reader.0)],
    };
    *reader = Reader(&[]);
    // Each entry was written out by a flow, so neither outgrows the block.
    let mut endpoints: Vec<Endpoint> = Vec::new();
    let mut ports: Vec<u16> = Vec::new();
    let mut previous_index = u32::MAX;
    for _ in 0..count {
        let flags = stream.symbol(column::FLAGS)?;
        let retries = flags >> RETRIES_SHIFT;
        if retries > RETRIES_MAX {
            return Err(BlockError::OutOfRange { what: "flags" });
        }
        let local = match Reference::read(&mut stream, column::ENDPOINT)? {
            None => {
                let endpoint = decode_endpoint(&mut stream, workloads)?;
                endpoints.push(endpoint);
                endpoint
            }
            Some(number) => *endpoints.get(number).ok_or(BlockError::OutOfRange {
                what: "local endpoint",
            })?,
        };
        let service_port = match Reference::read(&mut stream, column::SERVICE_PORT)? {
            None => {
                let port = stream.raw(column::SERVICE_PORT, 16, "service port")? as u16;
                ports.push(port);
                port
            }
            Some(number) => *ports.get(number).ok_or(BlockError::OutOfRange {
                what: "service port",
            })?,
        };
        let client_port = u16::try_from(stream.number(column::CLIENT_PORT)?).map_err(|_| {
            BlockError::OutOfRange {
                what: "client port",
            }
        })?;
        let remote_ip = match stream.number(column::REMOTE)? {
            0 => read_ip(&mut stream, column::REMOTE, true)?,
            plus_one => {
                let offset = u32::try_from(plus_one - 1)
                    .ok()
                    .and_then(|offset| remote_base.checked_add(offset))
                    .ok_or(BlockError::OutOfRange { what: "remote IP" })?;
                CanonicalIp::from_v4(offset.into())
            }
        };
        let delta = if flags & FLAG_INDEX_GAP != 0 {
            stream.u32(column::INDEX_GAP, "index")?
        } else {
            1
        };
        let index = previous_index.wrapping_add(delta);
        previous_index = index;
        let end = previous_end.wrapping_add(unzigzag(stream.number(column::END_DELTA)?) as u64);
        previous_end = end;
        let start = end
            .checked_sub(stream.number(column::DURATION)?)
            .ok_or(BlockError::OutOfRange { what: "duration" })?;
        let (start, end) = start
            .checked_mul(unit)
            .zip(end.checked_mul(unit))
            .ok_or(BlockError::OutOfRange { what: "end" })?;
        let client_bytes = stream.number(column::CLIENT_BYTES)?;
        let server_bytes = stream.number(column::SERVER_BYTES)?;
        let segments = |stream: &mut Stream<'_>, column: usize, bytes: u64| {
            stream
                .number(column)?
                .checked_add(filled.of(bytes))
                .and_then(|segments| u32::try_from(segments).ok())
                .ok_or(BlockError::OutOfRange { what: "segments" })
        };
        let client_segments = segments(
            &mut stream,
            column::CLIENT_SEGMENTS + context(server_bytes),
            client_bytes,
        )?;
        let server_segments = segments(
            &mut stream,
            column::SERVER_SEGMENTS + context(client_bytes),
            server_bytes,
        )?;
        let (client, server) = (
            (client_bytes, client_segments),
            (server_bytes, server_segments),
        );
        let retransmits = if flags & FLAG_RETRANSMITS != 0 {
            stream.u32(column::RETRANSMITS, "retransmits")?
        } else {
            0
        };
        let round_trip = match stream.number(column::ROUND_TRIP)? {
            0 => None,
            plus_one => {
                let smoothed = plus_one - 1;
                Some(RoundTrip {
                    smoothed_us: u32::try_from(smoothed)
                        .map_err(|_| BlockError::OutOfRange { what: "round trip" })?,
                    deviation_us: stream.u32(
                        column::DEVIATION + context(smoothed),
                        "round trip deviation",
                    )?,
                })
            }
        };
        let (direction, state) = direction_and_state(flags);
        let inbound = direction == Direction::Inbound;
        let ((local_port, remote_port), (sent, received)) = if inbound {
            ((service_port, client_port), (server, client))
        } else {
            ((client_port, service_port), (client, server))
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
            bytes_sent: sent.0,
            bytes_received: received.0,
            segments_sent: sent.1,
            segments_received: received.1,
            retransmits,
            round_trip,
            direction,
            state,
            index,
            retries,
        });
    }
    match stream.streams.iter().map(BitReader::bytes_left).sum() {
        0 => Ok(()),
        extra => Err(BlockError::TrailingBytes { extra }),
    }
}

/// The bit streams with the block's codes.
struct Stream<'a> {
    codes: Vec<Decoder>,
    streams: [BitReader<'a>; 2],
}

impl Stream<'_> {
    #[inline(always)]
    fn symbol(&mut self, column: usize) -> Result<u8, BlockError> {
        let symbol =
            self.codes[column].decode(&mut self.streams[column::stream(column)], "symbol")?;
        u8::try_from(symbol).map_err(|_| BlockError::OutOfRange { what: "symbol" })
    }

    #[inline(always)]
    fn number(&mut self, column: usize) -> Result<u64, BlockError> {
        self.codes[column].decode_number(&mut self.streams[column::stream(column)])
    }

    #[inline(always)]
    fn u32(&mut self, column: usize, what: &'static str) -> Result<u32, BlockError> {
        u32::try_from(self.number(column)?).map_err(|_| BlockError::OutOfRange { what })
    }

    /// Bits written as they are after a code of `column`.
    fn raw(&mut self, column: usize, bits: u32, what: &'static str) -> Result<u64, BlockError> {
        self.streams[column::stream(column)].take(bits, what)
    }
}

/// An address written as it is, in the stream of `column`.
fn read_ip(stream: &mut Stream<'_>, column: usize, v6: bool) -> Result<CanonicalIp, BlockError> {
    if v6 {
        let low = stream.raw(column, 64, "IPv6 address")?;
        let high = stream.raw(column, 64, "IPv6 address")?;
        Ok(CanonicalIp::from_octets(
            (u128::from(high) << 64 | u128::from(low)).to_be_bytes(),
        ))
    } else {
        let v4 = stream.raw(column, 32, "IPv4 address")? as u32;
        Ok(CanonicalIp::from_v4(v4.into()))
    }
}

/// A new endpoint: its attributes and address.
fn decode_endpoint(stream: &mut Stream<'_>, workloads: usize) -> Result<Endpoint, BlockError> {
    let attributes = stream.number(column::ENDPOINT_ATTRIBUTES)?;
    let ip = read_ip(stream, column::ENDPOINT_ATTRIBUTES, attributes & 1 != 0)?;
    let workload = match attributes >> 2 {
        0 => None,
        number if number <= workloads as u64 => Some((number - 1) as u32),
        _ => {
            return Err(BlockError::OutOfRange {
                what: "workload index",
            });
        }
    };
    Ok(Endpoint {
        ip,
        workload,
        shared: attributes & 2 != 0,
    })
}

impl Reference {
    /// The number referred to, or None for something new.
    #[inline(always)]
    fn read(stream: &mut Stream<'_>, column: usize) -> Result<Option<usize>, BlockError> {
        Ok(match stream.symbol(column)? {
            Self::NEW => None,
            Self::FAR => Some(
                usize::try_from(stream.number(column::FAR_REFERENCE)?)
                    .ok()
                    .and_then(|far| far.checked_add(Self::NEAR as usize))
                    .ok_or(BlockError::OutOfRange { what: "reference" })?,
            ),
            near => Some(usize::from(near) - 1),
        })
    }
}
