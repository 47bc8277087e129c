//! The flows of an `FLW7` block: each field a column with its own model, coded in a bit stream
//! with no byte boundaries between fields.
//!
//! What [`super::flows`] writes as varints (local endpoints and service ports numbered on
//! first use, remote addresses from the block's lowest, times as deltas) is written here as
//! numbers, each coded in two parts: its bit length (0 for 0, else the position of its highest
//! one bit) under a Huffman code built for that column from the block's own counts, then the
//! bits below its highest one as they are. Durations, byte counts and round trips spread over
//! several octaves (they are roughly log-normal), and this costs within a fraction of a bit of
//! their entropy, where a varint wastes a bit a byte and rounds up to whole bytes.
//!
//! Counters are oriented by role, not by side: the client's bytes and segments (the local
//! side's for an outbound flow, the remote's for an inbound one) share a column, and the
//! server's another, because requests and answers differ in size and each column's code fits
//! one kind.
//!
//! Layout after the block's dictionary: time unit (byte), base end, lowest IPv4 remote,
//! segment size (varints), one code per column ([`super::huffman`]), the first bit stream's
//! length in bytes (u32 LE), the first bit stream, then the second to the body's end (each
//! column is written in one of the two, [`column::stream`]). [`decode`] reads it back.

mod decode;

pub(super) use decode::decode_flows;

use flowattr_common::{CanonicalIp, Direction};

use super::bits::BitWriter;
use super::flows::{Endpoint, Preamble, Recent, TimeUnit, endpoint_hash, shared_flags, spread};
use super::huffman::{Encoder, SYMBOLS_MAX};
use super::varint::{put_varint, zigzag};
use super::{BufferedFlow, RETRIES_MAX};

const RETRIES_SHIFT: u8 = 4;

/// The columns, in the order a flow's fields are written. A field coded in context has one
/// column per context: a flow's segments by its bytes' size, a round trip's deviation by the
/// round trip's, since each grows with the other.
mod column {
    /// A symbol, not a number: direction, state, which optional fields follow, retries.
    pub const FLAGS: usize = 0;
    /// A symbol: [`super::Reference`] to an endpoint written before; for a new one, its
    /// [`ENDPOINT_ATTRIBUTES`] and address's bits follow.
    pub const ENDPOINT: usize = 1;
    /// (workload + 1) << 2 | shared << 1 | IPv6.
    pub const ENDPOINT_ATTRIBUTES: usize = 2;
    /// A symbol: [`super::Reference`] to a port written before; for a new one, its 16 bits
    /// follow.
    pub const SERVICE_PORT: usize = 3;
    /// The client's port (the other end of the service port).
    pub const CLIENT_PORT: usize = 4;
    /// Offset + 1 from the lowest IPv4 remote; 0: an IPv6 address's bits follow.
    pub const REMOTE: usize = 5;
    pub const INDEX_GAP: usize = 6;
    /// Zigzag of the end's delta from the previous flow's.
    pub const END_DELTA: usize = 7;
    pub const DURATION: usize = 8;
    pub const CLIENT_BYTES: usize = 9;
    pub const SERVER_BYTES: usize = 10;
    pub const RETRANSMITS: usize = 11;
    /// The smoothed round trip + 1; 0 for none.
    pub const ROUND_TRIP: usize = 12;
    /// Segments beyond those the bytes sent the same way fill at the block's segment size:
    /// mostly acknowledgements, so [`super::CONTEXTS`] each, by the size of the bytes sent
    /// the other way.
    pub const CLIENT_SEGMENTS: usize = 13;
    pub const SERVER_SEGMENTS: usize = CLIENT_SEGMENTS + super::CONTEXTS;
    /// By the size of the round trip.
    pub const DEVIATION: usize = SERVER_SEGMENTS + super::CONTEXTS;
    /// The numbers of references past what a symbol holds.
    pub const FAR_REFERENCE: usize = DEVIATION + super::CONTEXTS;
    pub const COUNT: usize = FAR_REFERENCE + 1;

    /// Which of the block's two bit streams a column is written in (any bits that follow its
    /// code too). Decoding a field waits on the one before it in its stream (its code's length
    /// says where the next starts); two streams are two such chains, which the processor runs
    /// side by side. The split evens out the fields a flow reads from each.
    #[inline(always)]
    pub const fn stream(column: usize) -> usize {
        match column {
            CLIENT_PORT | REMOTE | DURATION | SERVER_BYTES => 1,
            // Server segments and deviations, each column of their contexts.
            SERVER_SEGMENTS..FAR_REFERENCE => 1,
            _ => 0,
        }
    }
}

/// What a block wrote before, referred to by the number it was given: a symbol, its own
/// Huffman code fitting how often each is used, so that a host's busiest endpoint costs a bit
/// or two. Symbol 0 is something new (its value follows); 1 to 254 the numbers 0 to 253; 255 a
/// number from 254 on, written in [`column::FAR_REFERENCE`].
struct Reference;

impl Reference {
    const NEW: u8 = 0;
    const FAR: u8 = u8::MAX;
    const NEAR: u32 = Self::FAR as u32 - 1;

    #[inline]
    fn put<T: Tokens>(tokens: &mut T, column: usize, number: Option<u32>) {
        match number {
            None => tokens.symbol(column, Self::NEW),
            Some(number) if number < Self::NEAR => tokens.symbol(column, number as u8 + 1),
            Some(number) => {
                tokens.symbol(column, Self::FAR);
                tokens.number(column::FAR_REFERENCE, u64::from(number - Self::NEAR));
            }
        }
    }
}

/// The most bytes a segment of the block carried (rounded up): its flows' segment size, which
/// is at least every flow's bytes over segments, so that no flow has fewer segments than its
/// bytes fill at it. 0, for no prediction, if a flow has bytes but no segments (no kernel
/// reports that, but a block must hold whatever it is given).
fn segment_size(flows: &[BufferedFlow]) -> u64 {
    // The largest bytes / segments, kept as the pair: comparing by cross products spares a
    // division per flow.
    let (mut bytes_max, mut segments_max) = (1u64, 1u64);
    for flow in flows {
        for (bytes, segments) in [
            (flow.bytes_sent, flow.segments_sent),
            (flow.bytes_received, flow.segments_received),
        ] {
            let segments = u64::from(segments);
            if segments == 0 && bytes != 0 {
                return 0;
            }
            if u128::from(bytes) * u128::from(segments_max)
                > u128::from(bytes_max) * u128::from(segments)
            {
                (bytes_max, segments_max) = (bytes, segments);
            }
        }
    }
    bytes_max.div_ceil(segments_max)
}

/// Counts the segments bytes fill at a segment size, by a multiplication where a division
/// would cost several times as much. It may count one less than the division would, never
/// more, so no flow has fewer segments than it counts; encoder and decoder count the same.
#[derive(Clone, Copy)]
struct SegmentsFilled {
    /// 2^64 / segment size, rounded down; 0 for no prediction.
    reciprocal: u64,
}

impl SegmentsFilled {
    fn at(segment_size: u64) -> SegmentsFilled {
        SegmentsFilled {
            reciprocal: match segment_size {
                0 => 0,
                size => u64::try_from((1u128 << 64) / u128::from(size)).unwrap_or(u64::MAX),
            },
        }
    }

    #[inline]
    fn of(self, bytes: u64) -> u64 {
        ((u128::from(bytes) * u128::from(self.reciprocal)) >> 64) as u64
    }
}

/// Contexts of a field coded by another's size: its bit length, by threes.
const CONTEXTS: usize = 6;

#[inline]
fn context(of: u64) -> usize {
    match bit_length(of) {
        0..=6 => 0,
        7..=9 => 1,
        10..=12 => 2,
        13..=15 => 3,
        16..=18 => 4,
        _ => 5,
    }
}

/// Where the tokens of a flow go: counted in the first pass, written in the second.
trait Tokens {
    fn symbol(&mut self, column: usize, symbol: u8);
    fn number(&mut self, column: usize, value: u64);
    /// Bits written as they are, with no code, in the stream of `column`.
    fn raw(&mut self, column: usize, value: u64, bits: u32);
}

fn bit_length(value: u64) -> u32 {
    u64::BITS - value.leading_zeros()
}

struct Counts([[u32; SYMBOLS_MAX]; column::COUNT]);

impl Tokens for Counts {
    #[inline]
    fn symbol(&mut self, column: usize, symbol: u8) {
        self.0[column][usize::from(symbol)] += 1;
    }

    #[inline]
    fn number(&mut self, column: usize, value: u64) {
        self.0[column][bit_length(value) as usize] += 1;
    }

    #[inline]
    fn raw(&mut self, _column: usize, _value: u64, _bits: u32) {}
}

struct Coded<'a> {
    codes: Vec<Encoder>,
    streams: [BitWriter<'a>; 2],
}

/// Every method always inlined into the tokenizer: as calls (a dozen a flow) they kept the
/// bit writers' state in memory, and the encoder took 1.6x the time (criterion, host batch).
impl Tokens for Coded<'_> {
    #[inline(always)]
    fn symbol(&mut self, column: usize, symbol: u8) {
        let (code, length) = self.codes[column].code(usize::from(symbol));
        self.streams[column::stream(column)].put(code, length);
    }

    #[inline(always)]
    fn number(&mut self, column: usize, value: u64) {
        let length = bit_length(value);
        let (code, code_length) = self.codes[column].code(length as usize);
        // The highest one bit is implied by the length.
        let mantissa_length = length.saturating_sub(1);
        let mantissa = value & !(1u64 << mantissa_length);
        let bits = &mut self.streams[column::stream(column)];
        if code_length + mantissa_length <= 32 {
            bits.put(
                code | mantissa << code_length,
                code_length + mantissa_length,
            );
        } else {
            bits.put(code, code_length);
            bits.put_long(mantissa, mantissa_length);
        }
    }

    #[inline(always)]
    fn raw(&mut self, column: usize, value: u64, bits: u32) {
        self.streams[column::stream(column)].put_long(value, bits);
    }
}

/// Writes the preamble, the codes and the bit stream of `flows`; `numbers` gives each workload
/// index its number in the block's dictionary (an index past it stays past the dictionary,
/// which the block's reader refuses, as it would the index).
pub(super) fn encode_flows(flows: &[BufferedFlow], numbers: &[u32], out: &mut Vec<u8>) {
    let preamble = Preamble::of(flows);
    out.push(match preamble.unit {
        TimeUnit::Nanos => 0,
        TimeUnit::Micros => 1,
    });
    let unit = preamble.unit.nanos();
    let base_end = preamble.base_end / unit;
    put_varint(out, base_end);
    put_varint(out, u64::from(preamble.remote_base));
    let base = Base {
        end: base_end,
        remote: preamble.remote_base,
        segment_size: segment_size(flows),
        numbers,
    };
    put_varint(out, base.segment_size);
    // A constant divisor each, so that dividing is a multiply and a shift, not a division.
    fn pass<T: Tokens>(unit: TimeUnit, flows: &[BufferedFlow], base: &Base<'_>, tokens: &mut T) {
        match unit {
            TimeUnit::Nanos => tokenize::<1, _>(flows, base, tokens),
            TimeUnit::Micros => tokenize::<1000, _>(flows, base, tokens),
        }
    }
    let mut counts = Counts([[0; SYMBOLS_MAX]; column::COUNT]);
    pass(preamble.unit, flows, &base, &mut counts);
    let codes = counts
        .0
        .iter()
        .map(|counts| Encoder::build(counts, out))
        .collect();
    // Most flows take under 20 bytes, about half in each stream; a reservation each keeps the
    // writers from growing often.
    out.reserve(flows.len() * 24);
    let mut second = Vec::with_capacity(flows.len() * 12);
    let length_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let mut coded = Coded {
        codes,
        streams: [BitWriter::new(out), BitWriter::new(&mut second)],
    };
    pass(preamble.unit, flows, &base, &mut coded);
    let [first_stream, second_stream] = coded.streams;
    first_stream.finish();
    second_stream.finish();
    let first_length = (out.len() - length_at - 4) as u32;
    out[length_at..length_at + 4].copy_from_slice(&first_length.to_le_bytes());
    out.extend_from_slice(&second);
}

/// What a block's flows are coded from, in its preamble, and their workloads' numbers.
struct Base<'a> {
    /// The earliest end, in the block's unit.
    end: u64,
    /// The lowest IPv4 remote.
    remote: u32,
    segment_size: u64,
    numbers: &'a [u32],
}

/// The fields of `flows` as tokens, times in `UNIT` nanoseconds.
fn tokenize<const UNIT: u64, T: Tokens>(flows: &[BufferedFlow], base: &Base<'_>, tokens: &mut T) {
    let (base_end, remote_base) = (base.end, base.remote);
    let filled = SegmentsFilled::at(base.segment_size);
    let mut endpoints = Recent::<Endpoint, 256>::new();
    let mut ports = Recent::<u16, 64>::new();
    let mut previous_end = base_end;
    // So that a block whose first flow is index 0 stores no index at all.
    let mut previous_index = u32::MAX;
    for flow in flows {
        let inbound = flow.direction == Direction::Inbound;
        let index_gap = flow.index != previous_index.wrapping_add(1);
        let flags =
            (flow.retries.min(RETRIES_MAX) << RETRIES_SHIFT) | shared_flags(flow, index_gap);
        tokens.symbol(column::FLAGS, flags);

        let endpoint = Endpoint {
            ip: flow.local_ip,
            workload: flow.local_workload,
            shared: flow.local_shared,
        };
        let known = endpoints.find_or_add(endpoint, endpoint_hash(&endpoint));
        Reference::put(tokens, column::ENDPOINT, known);
        match known {
            Some(_) => {}
            None => {
                let v4 = flow.local_ip.to_v4();
                let workload = flow.local_workload.map_or(0, |index| {
                    u64::from(
                        base.numbers
                            .get(index as usize)
                            .copied()
                            .unwrap_or(u32::MAX),
                    ) + 1
                });
                let attributes =
                    workload << 2 | u64::from(flow.local_shared) << 1 | u64::from(v4.is_none());
                tokens.number(column::ENDPOINT_ATTRIBUTES, attributes);
                raw_ip(tokens, column::ENDPOINT_ATTRIBUTES, flow.local_ip, v4);
            }
        }

        let (service_port, client_port) = if inbound {
            (flow.local_port, flow.remote_port)
        } else {
            (flow.remote_port, flow.local_port)
        };
        let known = ports.find_or_add(service_port, spread(u32::from(service_port)));
        Reference::put(tokens, column::SERVICE_PORT, known);
        if known.is_none() {
            tokens.raw(column::SERVICE_PORT, u64::from(service_port), 16);
        }
        tokens.number(column::CLIENT_PORT, u64::from(client_port));

        match flow.remote_ip.to_v4() {
            Some(remote) => tokens.number(
                column::REMOTE,
                u64::from(u32::from(remote) - remote_base) + 1,
            ),
            None => {
                tokens.number(column::REMOTE, 0);
                raw_ip(tokens, column::REMOTE, flow.remote_ip, None);
            }
        }
        if index_gap {
            // Wrapping keeps a hand-built block with falling indices encodable.
            tokens.number(
                column::INDEX_GAP,
                u64::from(flow.index.wrapping_sub(previous_index)),
            );
        }
        previous_index = flow.index;

        let end = flow.end.as_nanos() / UNIT;
        tokens.number(
            column::END_DELTA,
            zigzag(end.wrapping_sub(previous_end) as i64),
        );
        previous_end = end;
        // Whole units both (Preamble::of), so the duration is exact in them.
        tokens.number(
            column::DURATION,
            end.saturating_sub(flow.start.as_nanos() / UNIT),
        );

        let (client, server) = oriented(flow, inbound);
        tokens.number(column::CLIENT_BYTES, client.0);
        tokens.number(column::SERVER_BYTES, server.0);
        // Never negative: no flow's bytes fill more segments than it has (segment_size).
        tokens.number(
            column::CLIENT_SEGMENTS + context(server.0),
            u64::from(client.1) - filled.of(client.0),
        );
        tokens.number(
            column::SERVER_SEGMENTS + context(client.0),
            u64::from(server.1) - filled.of(server.0),
        );
        if flow.retransmits != 0 {
            tokens.number(column::RETRANSMITS, u64::from(flow.retransmits));
        }
        match flow.round_trip {
            Some(trip) => {
                let smoothed = u64::from(trip.smoothed_us);
                tokens.number(column::ROUND_TRIP, smoothed + 1);
                tokens.number(
                    column::DEVIATION + context(smoothed),
                    u64::from(trip.deviation_us),
                );
            }
            None => tokens.number(column::ROUND_TRIP, 0),
        }
    }
}

/// (bytes, segments) the client sent, then the server's.
fn oriented(flow: &BufferedFlow, inbound: bool) -> ((u64, u32), (u64, u32)) {
    let sent = (flow.bytes_sent, flow.segments_sent);
    let received = (flow.bytes_received, flow.segments_received);
    if inbound {
        (received, sent)
    } else {
        (sent, received)
    }
}

fn raw_ip<T: Tokens>(
    tokens: &mut T,
    column: usize,
    ip: CanonicalIp,
    v4: Option<std::net::Ipv4Addr>,
) {
    match v4 {
        Some(v4) => tokens.raw(column, u64::from(u32::from(v4)), 32),
        None => {
            let value = u128::from_be_bytes(ip.octets());
            tokens.raw(column, value as u64, 64);
            tokens.raw(column, (value >> 64) as u64, 64);
        }
    }
}
