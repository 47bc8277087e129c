use std::net::Ipv6Addr;

use proptest::prelude::*;

use super::*;

pub(crate) fn arbitrary_flow() -> impl Strategy<Value = BufferedFlow> {
    // Half drawn from a few addresses and ports, so blocks refer back to what they wrote.
    let port = prop_oneof![any::<u16>(), prop::sample::select(vec![443u16, 8080, 53])];
    let ip = prop_oneof![
        (0u8..4).prop_map(|last| CanonicalIp::from_v4([10, 0, 0, last].into())),
        Just(CanonicalIp::from(Ipv6Addr::LOCALHOST)),
        any::<u32>().prop_map(|v4| CanonicalIp::from_v4(v4.into())),
        any::<u128>().prop_map(|v6| CanonicalIp::from(Ipv6Addr::from(v6))),
    ];
    (
        (ip.clone(), ip, port.clone(), port),
        (
            proptest::option::of(0u32..4),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
        ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            any::<u32>(),
            0..=RETRIES_MAX,
            proptest::option::of((any::<u32>(), any::<u32>())),
        ),
    )
        .prop_map(
            |(
                (local_ip, remote_ip, local_port, remote_port),
                (local_workload, local_shared, start, length),
                (bytes_sent, bytes_received, segments_sent, segments_received, retransmits),
                (inbound, closed, index, retries, round_trip),
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
                round_trip: round_trip.map(|(smoothed_us, deviation_us)| RoundTrip {
                    smoothed_us,
                    deviation_us,
                }),
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

/// What a block of a format before round trips reads back as.
fn without_round_trips(flows: &[BufferedFlow]) -> Vec<BufferedFlow> {
    flows
        .iter()
        .map(|flow| BufferedFlow {
            round_trip: None,
            ..*flow
        })
        .collect()
}

type DecodedBlock = (BlockHeader, Vec<String>, Vec<BufferedFlow>);

/// Flows with their workload's name in place of its index: what they mean whichever way a
/// block numbers its dictionary.
fn named<S: AsRef<str>>(
    names: &[S],
    flows: &[BufferedFlow],
) -> Vec<(BufferedFlow, Option<String>)> {
    flows
        .iter()
        .map(|flow| {
            let name = flow
                .local_workload
                .map(|index| names[index as usize].as_ref().to_string());
            (
                BufferedFlow {
                    local_workload: None,
                    ..*flow
                },
                name,
            )
        })
        .collect()
}

/// The names `flows` refer to, in the order they first do: a current block's dictionary.
fn used<S: AsRef<str>>(names: &[S], flows: &[BufferedFlow]) -> Vec<String> {
    let mut used: Vec<String> = Vec::new();
    for (_, name) in named(names, flows) {
        if let Some(name) = name.filter(|name| !used.contains(name)) {
            used.push(name);
        }
    }
    used
}

fn decode_all(buf: &[u8]) -> Result<Vec<DecodedBlock>, BlockError> {
    let mut at = 0;
    let mut blocks = Vec::new();
    while let Some((block, used)) = decode_block(&buf[at..])? {
        let mut flows = Vec::new();
        block.for_each_flow(|flow| flows.push(flow))?;
        let names = block
            .workloads()
            .iter()
            .map(|name| name.to_string())
            .collect();
        blocks.push((block.header, names, flows));
        at += used;
    }
    Ok(blocks)
}

#[derive(Debug, Clone)]
enum Corruption {
    FlipBit(prop::sample::Index, u8),
    /// A zeroed run, as a sector that was never written or was wiped.
    Zero(prop::sample::Index, usize),
}

fn arbitrary_corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(at, bit)| Corruption::FlipBit(at, bit)),
        (any::<prop::sample::Index>(), 1usize..600).prop_map(|(at, len)| Corruption::Zero(at, len)),
    ]
}

proptest! {
    #[test]
    fn blocks_round_trip(
        flows in proptest::collection::vec(arbitrary_flow(), 0..50),
        exporter in any::<u64>(),
        sequence in any::<u64>(),
        arrival in any::<u64>(),
        sender in any::<u64>(),
        frame_checksum in any::<u32>(),
        refused in proptest::collection::btree_set(0..u32::MAX - 1, 0..20),
        host_name in proptest::option::of("[a-z0-9.ü-]{1,40}"),
    ) {
        let header = BlockHeader {
            sender,
            frame_checksum,
            refused: (!refused.is_empty()).then(|| refused.iter().copied().collect()),
            host_name: host_name.map(Arc::from),
            ..BlockHeader::of_exporter(exporter, sequence, Timestamp::from_nanos(arrival))
        };
        let names = ["a", "b\"c", "d", "ünï", "shop/api\u{1f}shop\u{1f}api-1\u{1f}Deployment"];
        let mut buf = Vec::new();
        encode_block(&header, &names, &flows, &mut buf);
        encode_block(&header, &names[..0], &[], &mut buf);
        let decoded = decode_all(&buf).unwrap();
        prop_assert_eq!(decoded.len(), 2);
        prop_assert_eq!(&decoded[0].0, &header);
        prop_assert_eq!(&decoded[0].1, &used(&names, &flows));
        prop_assert_eq!(named(&decoded[0].1, &decoded[0].2), named(&names, &flows));
        prop_assert!(decoded[1].1.is_empty());
        prop_assert!(decoded[1].2.is_empty());
    }

    /// Flows whose times are whole microseconds (all of them, from ingest on) are written in
    /// microseconds and read back exactly; one nanosecond off anywhere and the block keeps
    /// nanoseconds, exactly too. The format before the modelled one ("FLW6") still reads, and
    /// so do those before round trips ("FLW5" in microseconds, "FLW4" in nanoseconds), their
    /// flows with none.
    #[test]
    fn microsecond_blocks_round_trip_and_a_nanosecond_keeps_its_block_in_nanoseconds(
        flows in proptest::collection::vec(arbitrary_flow(), 1..30),
        odd in any::<prop::sample::Index>(),
    ) {
        let micros = |at: Timestamp| Timestamp::from_nanos(at.as_nanos() / 1000 * 1000);
        let flows: Vec<BufferedFlow> = flows
            .into_iter()
            .map(|flow| BufferedFlow { start: micros(flow.start), end: micros(flow.end), ..flow })
            .collect();
        let header = BlockHeader::of_exporter(1, 2, Timestamp::from_nanos(3));
        let names = ["a", "b", "c", "d"];
        let mut buf = Vec::new();
        encode_block(&header, &names, &flows, &mut buf);
        prop_assert_eq!(&buf[..4], b"FLW7");
        let decoded = &decode_all(&buf).unwrap()[0];
        prop_assert_eq!(named(&decoded.1, &decoded.2), named(&names, &flows));
        let mut old = Vec::new();
        super::encode_block_v6(&header, &names, &flows, &mut old);
        prop_assert_eq!(&old[..4], b"FLW6");
        prop_assert_eq!(&decode_all(&old).unwrap()[0].1, &names.map(String::from).to_vec());
        prop_assert_eq!(&decode_all(&old).unwrap()[0].2, &flows);
        let mut old = Vec::new();
        super::encode_block_v5(&header, &names, &flows, &mut old);
        prop_assert_eq!(&old[..4], b"FLW5");
        prop_assert_eq!(&decode_all(&old).unwrap()[0].2, &without_round_trips(&flows));
        let mut one_off = flows.clone();
        let at = odd.index(one_off.len());
        one_off[at].end = Timestamp::from_nanos(one_off[at].end.as_nanos() | 1);
        one_off[at].start = one_off[at].start.min(one_off[at].end);
        let mut nanos = Vec::new();
        encode_block(&header, &names, &one_off, &mut nanos);
        prop_assert_eq!(&nanos[..4], b"FLW7");
        let decoded = &decode_all(&nanos).unwrap()[0];
        prop_assert_eq!(named(&decoded.1, &decoded.2), named(&names, &one_off));
        prop_assert!(buf.len() <= nanos.len() + 16, "{} {}", buf.len(), nanos.len());
        let mut old = Vec::new();
        super::encode_block_v5(&header, &names, &one_off, &mut old);
        prop_assert_eq!(&old[..4], b"FLW4");
        prop_assert_eq!(&decode_all(&old).unwrap()[0].2, &without_round_trips(&one_off));
    }

    /// Blocks written before the sender and the refused records were kept read back as the
    /// exporter vouching for itself, with nothing refused.
    #[test]
    fn blocks_of_the_previous_format_still_read(
        flows in proptest::collection::vec(arbitrary_flow(), 0..20),
        exporter in any::<u64>(),
        sequence in any::<u64>(),
    ) {
        let header = BlockHeader::of_exporter(exporter, sequence, Timestamp::from_nanos(5));
        let mut buf = Vec::new();
        super::encode_block_v2(&BlockHeader { sender: 3, frame_checksum: 4, ..header.clone() }, &["a", "b", "c", "d"], &flows, &mut buf);
        let decoded = decode_all(&buf).unwrap();
        prop_assert_eq!(&decoded[0].0, &header);
        prop_assert_eq!(&decoded[0].2, &without_round_trips(&flows));
    }

    /// Blocks written before the host name was kept read back with none.
    #[test]
    fn blocks_of_the_format_before_host_names_still_read(
        flows in proptest::collection::vec(arbitrary_flow(), 0..20),
        exporter in any::<u64>(),
        sender in any::<u64>(),
    ) {
        let header = BlockHeader { sender, refused: Some(Arc::from([2, 5])), ..BlockHeader::of_exporter(exporter, 9, Timestamp::from_nanos(5)) };
        let mut buf = Vec::new();
        super::encode_block_v3(&BlockHeader { host_name: Some(Arc::from("ignored")), ..header.clone() }, &["a", "b", "c", "d"], &flows, &mut buf);
        let decoded = decode_all(&buf).unwrap();
        prop_assert_eq!(&decoded[0].0, &header);
        prop_assert_eq!(&decoded[0].2, &without_round_trips(&flows));
    }

    /// Damage costs exactly the blocks it touches: every untouched block reads back, in order,
    /// and each run of touched blocks is one `Damage` spanning exactly their bytes.
    #[test]
    fn damage_costs_only_the_blocks_it_touches(
        blocks in proptest::collection::vec(proptest::collection::vec(arbitrary_flow(), 1..5), 2..8),
        corruptions in proptest::collection::vec(arbitrary_corruption(), 1..3),
    ) {
        let mut buf = Vec::new();
        let mut spans = Vec::new();
        for (sequence, flows) in blocks.iter().enumerate() {
            let header = BlockHeader::of_exporter(1, sequence as u64, Timestamp::from_nanos(9));
            let start = buf.len();
            encode_block(&header, &["a", "b", "c", "d"], flows, &mut buf);
            spans.push(start..buf.len());
        }
        let original = buf.clone();
        for corruption in &corruptions {
            match corruption {
                Corruption::FlipBit(at, bit) => buf[at.index(original.len())] ^= 1 << bit,
                Corruption::Zero(at, len) => {
                    let at = at.index(original.len());
                    let end = (at + len).min(original.len());
                    buf[at..end].fill(0);
                }
            }
        }
        let touched: Vec<bool> = spans.iter().map(|span| buf[span.clone()] != original[span.clone()]).collect();
        let mut read = Vec::new();
        let mut damages = Vec::new();
        let mut scan = Blocks::new(&buf);
        for item in scan.by_ref() {
            match item {
                Ok(block) => {
                    let mut flows = Vec::new();
                    block.for_each_flow(|flow| flows.push(flow)).unwrap();
                    let written = &blocks[block.header.sequence as usize];
                    prop_assert_eq!(named(block.workloads(), &flows), named(&["a", "b", "c", "d"], written));
                    read.push(block.header.sequence as usize);
                }
                Err(damage) => damages.push(damage),
            }
        }
        let untouched: Vec<usize> = (0..blocks.len()).filter(|&i| !touched[i]).collect();
        prop_assert_eq!(read, untouched);
        let mut expected = Vec::new();
        for (i, span) in spans.iter().enumerate().filter(|&(i, _)| touched[i]) {
            match expected.last_mut() {
                Some((_, end)) if i > 0 && touched[i - 1] => *end = span.end,
                _ => expected.push((span.start, span.end)),
            }
        }
        let found: Vec<(usize, usize)> = damages.iter().map(|damage| (damage.at, damage.at + damage.bytes)).collect();
        prop_assert_eq!(found, expected);
        for damage in &damages {
            prop_assert_eq!(damage.to_end, damage.at + damage.bytes == buf.len());
        }
        // Where the whole blocks end: before a damaged tail, else the end.
        let whole = damages.last().filter(|damage| damage.to_end).map_or(buf.len(), |damage| damage.at);
        prop_assert_eq!(scan.position(), whole);
    }

    /// Segments written before an upgrade: first-format blocks, beside current ones.
    #[test]
    fn first_format_blocks_still_read_back(
        flows in proptest::collection::vec(arbitrary_flow(), 0..50),
        exporter in any::<u64>(),
        sequence in any::<u64>(),
    ) {
        let header = BlockHeader::of_exporter(exporter, sequence, Timestamp::from_nanos(5));
        let names = ["a", "b", "c", "d"];
        let mut buf = Vec::new();
        legacy::encode_block(&header, &names, &flows, &mut buf);
        encode_block(&header, &names, &flows, &mut buf);
        let decoded = decode_all(&buf).unwrap();
        prop_assert_eq!(decoded.len(), 2);
        for (decoded_header, _, _) in &decoded {
            prop_assert_eq!(decoded_header, &header);
        }
        prop_assert_eq!(&decoded[0].1, &names.map(String::from).to_vec());
        prop_assert_eq!(&decoded[0].2, &without_round_trips(&flows));
        prop_assert_eq!(named(&decoded[1].1, &decoded[1].2), named(&names, &flows));
    }

    #[test]
    fn damaged_blocks_are_errors_never_panics_or_wrong_flows(
        flows in proptest::collection::vec(arbitrary_flow(), 1..20),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let header = BlockHeader::of_exporter(1, 2, Timestamp::from_nanos(3));
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

/// A server's typical inbound RPCs: clients across the fleet's /16 on ephemeral ports, 80 ms
/// long with 20 KB one way and 1.5 KB the other, one closing every 977 us, times in whole
/// microseconds as they are from ingest on. What they repeat (the server's endpoint and port,
/// the counters, the gap between closes) costs a few bits; what they do not is the floor:
/// remote address and client port about 2 bytes each, durations and round trips a byte or two.
/// (13.0 bytes when written; "FLW6" took 22.8.)
#[test]
fn an_ipv4_rpc_with_its_round_trip_takes_at_most_14_bytes() {
    let start = Timestamp::from_nanos(1_700_000_000_000_123_000);
    let flows: Vec<_> = (0..1000u32)
        .map(|i| {
            let start = start.saturating_add(std::time::Duration::from_micros(u64::from(i) * 977));
            BufferedFlow {
                local_ip: CanonicalIp::from_v4([10, 1, 2, 3].into()),
                remote_ip: CanonicalIp::from_v4(
                    [10, 4, (i * 7 % 256) as u8, (i * 13 % 256) as u8].into(),
                ),
                local_port: 443,
                remote_port: 32768 + (i * 4099 % 28000) as u16,
                local_workload: Some(0),
                local_shared: false,
                start,
                end: start
                    .saturating_add(std::time::Duration::from_micros(80_000 + u64::from(i) * 7)),
                bytes_sent: 20_000,
                bytes_received: 1_500,
                segments_sent: 20,
                segments_received: 10,
                retransmits: 0,
                round_trip: Some(RoundTrip {
                    smoothed_us: 250 + i % 200,
                    deviation_us: 40 + i % 60,
                }),
                direction: Direction::Inbound,
                state: FlowState::Closed,
                index: i,
                retries: 0,
            }
        })
        .collect();
    let header = BlockHeader::of_exporter(7, 9, start);
    let mut buf = Vec::new();
    encode_block(&header, &["api-gateway"], &flows, &mut buf);
    let per_flow = buf.len() as f64 / flows.len() as f64;
    assert!(per_flow <= 14.0, "{per_flow} bytes per flow");

    let mut decoded = Vec::new();
    decode_block(&buf)
        .unwrap()
        .unwrap()
        .0
        .for_each_flow(|flow| decoded.push(flow))
        .unwrap();
    assert_eq!(decoded, flows);
}
