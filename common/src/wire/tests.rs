use proptest::prelude::*;

use super::*;
use crate::{CanonicalIp, Direction, FlowState, Timestamp};

fn record(local: [u8; 4], remote: [u8; 4], workload: Option<u32>) -> FlowRecord {
    FlowRecord {
        local_ip: CanonicalIp::from(std::net::Ipv4Addr::from(local)),
        remote_ip: CanonicalIp::from(std::net::Ipv4Addr::from(remote)),
        local_port: 443,
        remote_port: 51234,
        local_workload: workload.map(WorkloadIndex),
        local_shared: false,
        start: Timestamp::from_nanos(1_000),
        end: Timestamp::from_nanos(2_000),
        bytes_sent: 10,
        bytes_received: 20,
        segments_sent: 3,
        segments_received: 4,
        retransmits: 1,
        direction: Direction::Inbound,
        state: FlowState::Closed,
    }
}

fn batch(flows: Vec<FlowRecord>) -> FlowBatch {
    FlowBatch {
        exporter: ExporterId(7),
        sequence: 42,
        region: "eu-west-1".into(),
        workloads: vec!["api-gateway".into(), "billing".into()],
        flows,
    }
}

fn encode<M: Message>(message: &M) -> Vec<u8>
where
    M::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>,
{
    let mut out = Vec::new();
    encode_message(message, &mut out).unwrap();
    out
}

fn decode_batch(bytes: &[u8]) -> Result<FlowBatch, String> {
    let (frame, used) = FrameDecoder::default()
        .decode(bytes)
        .map_err(|e| e.to_string())?
        .ok_or("incomplete")?;
    assert_eq!(used, bytes.len());
    let valid = ValidFlowBatch::from_frame(&frame).map_err(|e| e.to_string())?;
    for (index, record) in valid.records().iter().enumerate() {
        valid
            .check_record(record)
            .map_err(|refusal| format!("record #{index}: {refusal}"))?;
    }
    rkyv::deserialize::<FlowBatch, rkyv::rancor::Error>(&*valid).map_err(|e| e.to_string())
}

#[test]
fn flow_batch_round_trips() {
    let original = batch(vec![
        record([10, 1, 2, 3], [10, 4, 5, 6], Some(1)),
        record([10, 1, 2, 3], [10, 9, 9, 9], None),
    ]);
    let bytes = encode(&original);
    assert_eq!(decode_batch(&bytes).unwrap(), original);
}

#[test]
fn a_clocked_batch_reads_as_its_batch_with_its_reading() {
    let original = batch(vec![record([10, 1, 2, 3], [10, 4, 5, 6], Some(1))]);
    let clock = ClockReading {
        offset_ns: -1_500_000_000,
        uncertainty_ns: 3_000_000,
    };
    let mut bytes = Vec::new();
    encode_message(
        &ClockedFlowBatch {
            clock,
            batch: original.clone(),
        },
        &mut bytes,
    )
    .unwrap();
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    assert_eq!(frame.kind, FrameKind::ClockedFlowBatch);
    let valid = ValidFlowBatch::from_frame(&frame).unwrap();
    assert_eq!(
        (valid.clock(), valid.to_owned_batch().unwrap()),
        (Some(clock), original.clone())
    );
    // A plain batch has none; either kind reads as a flow batch, neither as the other's archive.
    let plain = encode(&original);
    let (frame, _) = FrameDecoder::default().decode(&plain).unwrap().unwrap();
    assert_eq!(ValidFlowBatch::from_frame(&frame).unwrap().clock(), None);
    let mut probe = Vec::new();
    encode_frame(FrameKind::ClockProbe, &[], &mut probe).unwrap();
    let (frame, _) = FrameDecoder::default().decode(&probe).unwrap().unwrap();
    assert!(matches!(frame.message(), Ok(AnyMessage::ClockProbe)));
    assert!(ValidFlowBatch::from_frame(&frame).is_err());
}

#[test]
fn a_measured_batch_carries_each_records_round_trip_and_a_misaligned_one_is_refused() {
    let original = batch(vec![
        record([10, 1, 2, 3], [10, 4, 5, 6], Some(1)),
        record([10, 1, 2, 3], [10, 9, 9, 9], None),
    ]);
    let trip = crate::RoundTrip {
        smoothed_us: 412,
        deviation_us: 96,
    };
    let clock = ClockReading {
        offset_ns: 5,
        uncertainty_ns: 6,
    };
    let measured = |host: Option<&str>, round_trips: Vec<Option<crate::RoundTrip>>| {
        encode(&MeasuredFlowBatch {
            host: host.map(str::to_owned),
            clock: Some(clock),
            batch: original.clone(),
            round_trips,
        })
    };
    let bytes = measured(Some("node-7"), vec![Some(trip), None]);
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    assert_eq!(frame.kind, FrameKind::MeasuredFlowBatch);
    let valid = ValidFlowBatch::from_frame(&frame).unwrap();
    assert_eq!(
        (valid.host(), valid.clock(), valid.round_trips()),
        (Some("node-7"), Some(clock), vec![Some(trip), None])
    );
    assert_eq!(valid.round_trip(2), None, "past the last record");
    assert_eq!(decode_batch(&bytes).unwrap(), original);
    // None at all: every record without one, as in the kinds before.
    let bytes = measured(None, Vec::new());
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    let valid = ValidFlowBatch::from_frame(&frame).unwrap();
    assert_eq!(
        (valid.host(), valid.round_trips()),
        (None, vec![None, None])
    );
    let plain = encode(&original);
    let (frame, _) = FrameDecoder::default().decode(&plain).unwrap().unwrap();
    assert_eq!(
        ValidFlowBatch::from_frame(&frame).unwrap().round_trips(),
        vec![None, None]
    );
    // One per record or none: anything else cannot say which record a round trip is of.
    for round_trips in [vec![Some(trip)], vec![None, None, Some(trip)]] {
        let bytes = measured(Some("node-7"), round_trips);
        let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
        let error = ValidFlowBatch::from_frame(&frame).unwrap_err();
        assert!(
            error.to_string().contains("round trips for 2 flow records"),
            "{error}"
        );
        assert_eq!(error.batch_refusal(), BatchRefusal::Malformed);
    }
}

#[test]
fn a_round_trip_from_the_kernel_is_shifted_back_as_tcp_get_info_does() {
    assert_eq!(crate::RoundTrip::from_kernel(0, 0), None, "no sample yet");
    assert_eq!(
        crate::RoundTrip::from_kernel(412 << 3 | 5, 96 << 2 | 3),
        Some(crate::RoundTrip {
            smoothed_us: 412,
            deviation_us: 96
        })
    );
    // Under a microsecond still reads as a sample.
    assert_eq!(
        crate::RoundTrip::from_kernel(3, 0).map(|trip| trip.smoothed_us),
        Some(1)
    );
}

#[test]
fn a_host_batch_carries_its_host_name_and_identity_keys_and_a_bad_host_name_refuses_it() {
    let mut original = batch(vec![record([10, 1, 2, 3], [10, 4, 5, 6], Some(0))]);
    let pod = crate::WorkloadIdentity {
        name: "shop/api",
        namespace: "shop",
        instance: "api-1",
        owner_kind: "Deployment",
    };
    original.workloads[0] = pod.key();
    let clock = ClockReading {
        offset_ns: 7,
        uncertainty_ns: 9,
    };
    for clock in [None, Some(clock)] {
        let mut bytes = Vec::new();
        encode_message(
            &HostFlowBatch {
                host: "node-7.example".into(),
                clock,
                batch: original.clone(),
            },
            &mut bytes,
        )
        .unwrap();
        let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
        assert_eq!(frame.kind, FrameKind::HostFlowBatch);
        let valid = ValidFlowBatch::from_frame(&frame).unwrap();
        assert_eq!(
            (valid.host(), valid.clock()),
            (Some("node-7.example"), clock)
        );
        let record = &valid.records()[0];
        assert_eq!(valid.check_record(record), Ok(()));
        assert_eq!(
            crate::WorkloadIdentity::parse(valid.local_workload_name(record).unwrap()),
            Ok(pod)
        );
    }
    let mut bytes = Vec::new();
    encode_message(
        &HostFlowBatch {
            host: "node\n7".into(),
            clock: None,
            batch: original,
        },
        &mut bytes,
    )
    .unwrap();
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    let error = ValidFlowBatch::from_frame(&frame).unwrap_err();
    assert!(error.to_string().contains("host name"), "{error}");
    assert_eq!(error.batch_refusal(), BatchRefusal::Malformed);
}

#[test]
fn validated_batch_resolves_workload_names() {
    let bytes = encode(&batch(vec![
        record([10, 0, 0, 1], [10, 0, 0, 2], Some(1)),
        record([10, 0, 0, 1], [10, 0, 0, 2], None),
    ]));
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    let valid = ValidFlowBatch::from_frame(&frame).unwrap();
    assert_eq!(valid.local_workload_name(&valid.flows[0]), Some("billing"));
    assert_eq!(valid.local_workload_name(&valid.flows[1]), None);
    assert_eq!(valid.flows[0].direction, Direction::Inbound);
}

#[test]
fn ack_and_range_updates_round_trip() {
    let ack = Ack {
        exporter: ExporterId(3),
        sequence: 9,
        frame_checksum: 0xDEAD_BEEF,
        status: AckStatus::Duplicate,
        refused: vec![RefusedRecord {
            record: 4,
            reason: RecordRefusal::FromTheFuture,
        }],
        collector_time: Timestamp::from_nanos(77),
        max_skew_ns: 1_000_000_000,
    };
    let bytes = encode(&ack);
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    assert_eq!(Some(frame.checksum), checksum_of(&bytes));
    let archived = frame.access::<Ack>().unwrap();
    assert_eq!(archived.sequence.to_native(), 9);
    assert_eq!(archived.status, AckStatus::Duplicate);
    assert_eq!(
        rkyv::deserialize::<Ack, rkyv::rancor::Error>(archived).unwrap(),
        ack
    );
    let refusal = Ack {
        status: AckStatus::Refused(BatchRefusal::OverLimit),
        ..ack
    };
    let bytes = encode(&refusal);
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    assert_eq!(
        frame.access::<Ack>().unwrap().status,
        AckStatus::Refused(BatchRefusal::OverLimit)
    );

    let updates = RangeUpdateBatch {
        origin_node: 5,
        workloads: vec!["billing".into()],
        updates: vec![RangeUpdate {
            ip: CanonicalIp::from(std::net::Ipv4Addr::new(10, 0, 0, 9)),
            port: 0,
            owner: 0,
            spans: vec![Span {
                start: Timestamp::from_nanos(1),
                end: Timestamp::from_nanos(5),
            }],
        }],
    };
    let bytes = encode(&updates);
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    let valid = ValidRangeUpdateBatch::from_frame(&frame).unwrap();
    assert_eq!(valid.owner_name(&valid.updates[0]), Some("billing"));
    // An unnamed holder is no index into the names; any other index past them is refused.
    for (owner, valid) in [
        (UNNAMED_OWNER, true),
        (1, false),
        (UNNAMED_OWNER - 1, false),
    ] {
        let mut updates = updates.clone();
        updates.updates[0].owner = owner;
        let bytes = encode(&updates);
        let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
        let checked = ValidRangeUpdateBatch::from_frame(&frame);
        assert_eq!(checked.is_ok(), valid, "owner {owner}");
        if let Ok(batch) = checked {
            assert_eq!(batch.owner_name(&batch.updates[0]), None);
        }
    }
    assert_eq!(
        valid.updates[0].spans[0].end.get(),
        Timestamp::from_nanos(5)
    );
}

#[test]
fn partial_frames_ask_for_more_bytes() {
    let bytes = encode(&batch(vec![record([10, 0, 0, 1], [10, 0, 0, 2], Some(0))]));
    let decoder = FrameDecoder::default();
    for cut in 0..bytes.len() {
        assert!(
            decoder.decode(&bytes[..cut]).unwrap().is_none(),
            "cut at {cut}"
        );
    }
    let mut two = bytes.clone();
    two.extend_from_slice(&bytes);
    let (_, used) = decoder.decode(&two).unwrap().unwrap();
    assert_eq!(used, bytes.len(), "a decoder consumes exactly one frame");
}

#[test]
fn each_header_fault_has_its_own_error() {
    let good = encode(&batch(vec![]));
    let decoder = FrameDecoder::default();
    let with = |at: usize, byte: u8| {
        let mut bytes = good.clone();
        bytes[at] = byte;
        decoder.decode(&bytes).unwrap_err()
    };
    assert!(matches!(with(0, b'X'), FrameError::BadMagic { .. }));
    assert_eq!(with(4, 1), FrameError::UnsupportedVersion { found: 1 });
    assert_eq!(with(5, 99), FrameError::UnknownKind { found: 99 });
    assert_eq!(with(6, 2), FrameError::UnknownEncoding { found: 2 });
    assert_eq!(with(7, 1), FrameError::ReservedNonZero { found: 1 });
    assert!(matches!(
        with(12, good[12] ^ 1),
        FrameError::ChecksumMismatch { .. }
    ));
    let last = good.len() - 1;
    assert!(matches!(
        with(last, good[last] ^ 0x80),
        FrameError::ChecksumMismatch { .. }
    ));
}

#[test]
fn oversized_frame_is_refused_from_its_header_alone() {
    let decoder = FrameDecoder::new(1024);
    let mut header = encode(&batch(vec![]));
    header.truncate(HEADER_BYTES);
    header[8..12].copy_from_slice(&(1025u32).to_le_bytes());
    assert_eq!(
        decoder.decode(&header).unwrap_err(),
        FrameError::TooLarge {
            length: 1025,
            limit: 1024
        }
    );
    assert_eq!(
        FrameDecoder::new(usize::MAX).payload_bytes_max(),
        FRAME_PAYLOAD_BYTES_MAX
    );
}

#[test]
fn record_rules_refuse_only_the_record_that_breaks_them() {
    let check = |b: FlowBatch| decode_batch(&encode(&b)).unwrap_err();
    let out_of_range = batch(vec![record([10, 0, 0, 1], [10, 0, 0, 2], Some(2))]);
    assert_eq!(
        check(out_of_range),
        "record #0: workload_index_out_of_range"
    );

    let mut backwards = record([10, 0, 0, 1], [10, 0, 0, 2], Some(0));
    backwards.end = Timestamp::from_nanos(1);
    assert_eq!(check(batch(vec![backwards])), "record #0: end_before_start");

    let mut zero_port = record([10, 0, 0, 1], [10, 0, 0, 2], Some(0));
    zero_port.remote_port = 0;
    assert_eq!(check(batch(vec![zero_port])), "record #0: zero_port");

    // A bad name costs the records that name it, and only those.
    for bad in [
        "bill\ning".to_owned(),
        "x".repeat(WORKLOAD_NAME_BYTES_MAX + 1),
    ] {
        let mut named = batch(vec![
            record([10, 0, 0, 1], [10, 0, 0, 2], Some(0)),
            record([10, 0, 0, 1], [10, 0, 0, 3], Some(1)),
            record([10, 0, 0, 1], [10, 0, 0, 4], None),
        ]);
        named.workloads[1] = bad;
        let bytes = encode(&named);
        let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
        let valid = ValidFlowBatch::from_frame(&frame).unwrap();
        let verdicts: Vec<_> = valid
            .records()
            .iter()
            .map(|r| valid.check_record(r))
            .collect();
        assert_eq!(
            verdicts,
            [Ok(()), Err(RecordRefusal::BadWorkloadName), Ok(())]
        );
        assert_eq!(
            valid.local_workload_name(&valid.records()[0]),
            Some("api-gateway")
        );
    }
}

#[test]
fn batch_rules_refuse_the_whole_batch_with_a_typed_reason() {
    let refusal = |b: FlowBatch| {
        let bytes = encode(&b);
        let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
        let error = ValidFlowBatch::from_frame(&frame).unwrap_err();
        (error.to_string(), error.batch_refusal())
    };
    let mut no_region = batch(vec![]);
    no_region.region.clear();
    let (text, reason) = refusal(no_region);
    assert!(text.contains("region name is empty"), "{text}");
    assert_eq!(reason, BatchRefusal::BadRegion);

    let too_many = batch(vec![
        record([10, 0, 0, 1], [10, 0, 0, 2], None);
        BATCH_FLOWS_MAX + 1
    ]);
    let (text, reason) = refusal(too_many);
    assert!(text.contains("over the limit of 65536"), "{text}");
    assert_eq!(reason, BatchRefusal::OverLimit);
}

#[test]
fn a_frame_of_one_kind_is_not_read_as_another() {
    let bytes = encode(&Ack {
        exporter: ExporterId(1),
        sequence: 1,
        frame_checksum: 0,
        status: AckStatus::Accepted,
        refused: Vec::new(),
        collector_time: Timestamp::ZERO,
        max_skew_ns: 0,
    });
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    assert_eq!(
        ValidFlowBatch::from_frame(&frame).unwrap_err(),
        PayloadError::WrongKind {
            kind: FrameKind::FlowBatch,
            found: FrameKind::Ack
        }
    );
}

#[test]
fn garbage_payload_with_valid_checksum_is_malformed_not_a_panic() {
    let mut bytes = Vec::new();
    encode_frame(FrameKind::FlowBatch, &[0xAB; 64], &mut bytes).unwrap();
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    assert!(matches!(
        ValidFlowBatch::from_frame(&frame),
        Err(PayloadError::Malformed { .. })
    ));
}

/// Decodes everything it can out of `bytes` the way a collector connection would. Its only job
/// is not to panic.
fn decode_everything(bytes: &[u8]) {
    let decoder = FrameDecoder::new(1 << 20);
    let mut rest = bytes;
    while let Ok(Some((frame, used))) = decoder.decode(rest) {
        if let Ok(AnyMessage::FlowBatch(batch)) = frame.message() {
            for record in batch.records() {
                if batch.check_record(record).is_ok() {
                    let _ = batch.local_workload_name(record);
                }
            }
        }
        rest = &rest[used..];
    }
}

/// Re-checksums a frame after mutation, so the mutation reaches the payload validators instead
/// of stopping at the CRC.
fn reseal(bytes: &mut [u8]) {
    if bytes.len() < HEADER_BYTES {
        return;
    }
    let checksum = crc32c::crc32c_append(crc32c::crc32c(&bytes[..12]), &bytes[HEADER_BYTES..]);
    bytes[12..16].copy_from_slice(&checksum.to_le_bytes());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic_and_never_pass_the_checksum(
        flows in 0usize..4,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        resealed in any::<bool>(),
    ) {
        let original = batch(vec![record([10, 0, 0, 1], [10, 0, 0, 2], Some(0)); flows]);
        let mut bytes = encode(&original);
        for (at, xor) in &flips {
            let at = at.index(bytes.len());
            bytes[at] ^= xor;
        }
        if resealed {
            reseal(&mut bytes);
            // Whatever comes out of a resealed mutation must still satisfy every format rule.
            if let Ok(decoded) = decode_batch(&bytes) {
                prop_assert!(decoded.flows.iter().all(|f| f.start <= f.end));
                prop_assert!(decoded.flows.iter().all(|f| f.local_workload.is_none_or(|i| (i.0 as usize) < decoded.workloads.len())));
            }
        } else {
            // CRC-32C detects every error of up to 3 flipped bits... and far more: a mutated,
            // unsealed frame decoding cleanly to a different batch would be a checksum miss.
            if let Ok(decoded) = decode_batch(&bytes) {
                prop_assert_eq!(decoded, original);
            }
        }
        decode_everything(&bytes);
    }

    #[test]
    fn any_valid_batch_round_trips(
        records in proptest::collection::vec(
            (any::<[u8; 16]>(), any::<[u8; 16]>(), 1u16.., 1u16.., proptest::option::of(0u32..3), any::<u64>(), any::<u32>(), any::<bool>()),
            0..20),
        sequence in any::<u64>(),
    ) {
        let flows = records.into_iter().map(|(l, r, lp, rp, w, start, len, inbound)| FlowRecord {
            local_ip: CanonicalIp::from_octets(l),
            remote_ip: CanonicalIp::from_octets(r),
            local_port: lp,
            remote_port: rp,
            local_workload: w.map(WorkloadIndex),
            local_shared: inbound,
            start: Timestamp::from_nanos(start),
            end: Timestamp::from_nanos(start.saturating_add(len as u64)),
            bytes_sent: start,
            bytes_received: len as u64,
            segments_sent: len,
            segments_received: len / 2,
            retransmits: len % 7,
            direction: if inbound { Direction::Inbound } else { Direction::Outbound },
            state: if len % 2 == 0 { FlowState::Open } else { FlowState::Closed },
        }).collect();
        let original = FlowBatch {
            exporter: ExporterId(sequence ^ 1),
            sequence,
            region: "r".into(),
            workloads: vec!["a".into(), "b".into(), "c".into()],
            flows,
        };
        prop_assert_eq!(decode_batch(&encode(&original)).unwrap(), original);
    }
}

fn measured(flows: usize) -> MeasuredFlowBatch {
    let records = (0..flows)
        .map(|i| {
            record(
                [10, 1, 2, 3],
                [10, 4, (i >> 8) as u8, i as u8],
                Some(i as u32 % 2),
            )
        })
        .collect();
    MeasuredFlowBatch {
        host: Some("ip-10-1-2-3.ec2.internal".into()),
        clock: None,
        batch: batch(records),
        round_trips: vec![None; flows],
    }
}

fn compressed(message: &MeasuredFlowBatch) -> Vec<u8> {
    let mut out = Vec::new();
    FrameCompressor::new(COMPRESSION_LEVEL)
        .unwrap()
        .encode_batch(message, &mut out)
        .unwrap();
    out
}

#[test]
fn a_compressed_batch_reads_as_the_plain_one_once_expanded_and_not_before() {
    let original = measured(1_000);
    let (plain, packed) = (encode(&original), compressed(&original));
    assert!(
        packed.len() * 4 < plain.len(),
        "{} bytes compressed, {} plain",
        packed.len(),
        plain.len()
    );
    let decoder = FrameDecoder::default();
    let (frame, used) = decoder.decode(&packed).unwrap().unwrap();
    assert_eq!(
        (used, frame.encoding),
        (packed.len(), PayloadEncoding::Zstd)
    );
    assert!(matches!(
        ValidFlowBatch::from_frame(&frame),
        Err(PayloadError::Compressed { .. })
    ));
    let mut expander = FrameExpander::new().unwrap();
    let checksum = frame.checksum;
    let expanded = expander.expand(frame, decoder.payload_bytes_max()).unwrap();
    assert_eq!(expanded.checksum, checksum, "acks name the frame as sent");
    let read = ValidFlowBatch::from_frame(&expanded)
        .unwrap()
        .to_owned_measured()
        .unwrap();
    assert_eq!(read, original);
    // The expander keeps its buffer's length: a smaller batch after it reads as itself.
    let smaller = measured(10);
    let packed_smaller = compressed(&smaller);
    let (frame, _) = decoder.decode(&packed_smaller).unwrap().unwrap();
    let expanded = expander.expand(frame, decoder.payload_bytes_max()).unwrap();
    assert_eq!(expanded.payload, &encode(&smaller)[HEADER_BYTES..]);
    // A plain frame passes through as it is.
    let (frame, _) = decoder.decode(&plain).unwrap().unwrap();
    let same = expander.expand(frame, decoder.payload_bytes_max()).unwrap();
    assert_eq!(same.payload.as_ptr(), frame.payload.as_ptr());
}

/// Re-frames `payload` as a compressed frame of `kind`, with a valid checksum.
fn zstd_frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(kind, payload, &mut out).unwrap();
    out[6] = PayloadEncoding::Zstd as u8;
    let checksum = crc32c::crc32c_append(crc32c::crc32c(&out[..12]), &out[HEADER_BYTES..]);
    out[12..16].copy_from_slice(&checksum.to_le_bytes());
    out
}

#[test]
fn a_compressed_payload_that_expands_past_the_limit_or_lies_is_refused_with_one_line() {
    let mut expander = FrameExpander::new().unwrap();
    let expand = |expander: &mut FrameExpander, bytes: &[u8], limit: usize| {
        let (frame, _) = FrameDecoder::default().decode(bytes).unwrap().unwrap();
        expander
            .expand(frame, limit)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // 16 MiB of zeros: a few hundred bytes compressed.
    let bomb = zstd::bulk::compress(&vec![0u8; 16 << 20], 3).unwrap();
    assert!(bomb.len() < 4096);
    let error = expand(
        &mut expander,
        &zstd_frame(FrameKind::MeasuredFlowBatch, &bomb),
        1 << 20,
    );
    assert!(error.contains("over the limit of 1048576"), "{error}");
    let garbage = expand(
        &mut expander,
        &zstd_frame(FrameKind::MeasuredFlowBatch, b"not zstd at all"),
        1 << 20,
    );
    assert!(garbage.contains("not a zstd frame"), "{garbage}");
    // A stream without its size (streaming mode) is not taken on trust.
    let mut unsized_stream = Vec::new();
    {
        let mut writer = zstd::stream::write::Encoder::new(&mut unsized_stream, 1).unwrap();
        std::io::Write::write_all(&mut writer, b"payload").unwrap();
        writer.finish().unwrap();
    }
    let error = expand(
        &mut expander,
        &zstd_frame(FrameKind::MeasuredFlowBatch, &unsized_stream),
        1 << 20,
    );
    assert!(error.contains("does not state its size"), "{error}");
    // Cut short: states more than it holds.
    let whole = zstd::bulk::compress(&[7u8; 10_000], 1).unwrap();
    let error = expand(
        &mut expander,
        &zstd_frame(FrameKind::MeasuredFlowBatch, &whole[..whole.len() - 3]),
        1 << 20,
    );
    assert!(
        error.starts_with("compressed MeasuredFlowBatch payload: zstd"),
        "{error}"
    );
    for error in [error, garbage] {
        assert!(!error.contains('\n'));
    }
    // The expander is still good for the next frame.
    let original = measured(10);
    let packed = compressed(&original);
    let (frame, _) = FrameDecoder::default().decode(&packed).unwrap().unwrap();
    let expanded = expander.expand(frame, 1 << 20).unwrap();
    assert_eq!(
        ValidFlowBatch::from_frame(&expanded)
            .unwrap()
            .to_owned_measured()
            .unwrap(),
        original
    );
}

#[test]
fn a_record_array_table_that_overlaps_or_runs_past_its_archive_is_refused() {
    let archive = encode(&measured(3));
    let archive = &archive[HEADER_BYTES..];
    let content = |arrays: &[(u32, u32, u32)]| {
        let mut content = vec![arrays.len() as u8];
        for &(offset, stride, count) in arrays {
            for value in [offset, stride, count] {
                content.extend_from_slice(&value.to_le_bytes());
            }
        }
        content.extend_from_slice(archive);
        zstd::bulk::compress(&content, 1).unwrap()
    };
    let len = archive.len() as u32;
    let mut expander = FrameExpander::new().unwrap();
    for (arrays, why) in [
        (vec![(0, 4, 3), (8, 4, 1)], "overlap"),
        (vec![(8, 4, 1), (0, 4, 1)], "out of order"),
        (vec![(len - 4, 4, 2)], "run past"),
        (vec![(0, 0, 5)], "overlap"),
        (vec![(0, 1, 1); 5], "more record arrays"),
        (vec![(0, u32::MAX, u32::MAX)], "run past"),
    ] {
        let frame = zstd_frame(FrameKind::MeasuredFlowBatch, &content(&arrays));
        let (frame, _) = FrameDecoder::default().decode(&frame).unwrap().unwrap();
        let error = expander.expand(frame, 1 << 20).map(|_| ()).unwrap_err();
        assert!(error.to_string().contains(why), "{arrays:?}: {error}");
    }
    // A table cut short, and an empty payload.
    for content in [vec![2, 0, 0], Vec::new()] {
        let packed = zstd::bulk::compress(&content, 1).unwrap();
        let frame = zstd_frame(FrameKind::MeasuredFlowBatch, &packed);
        let (frame, _) = FrameDecoder::default().decode(&frame).unwrap().unwrap();
        assert!(expander.expand(frame, 1 << 20).is_err(), "{content:?}");
    }
    // No arrays at all: the archive as it is.
    let frame = zstd_frame(FrameKind::MeasuredFlowBatch, &content(&[]));
    let (frame, _) = FrameDecoder::default().decode(&frame).unwrap().unwrap();
    let expanded = expander.expand(frame, 1 << 20).unwrap();
    assert_eq!(expanded.payload, archive);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn any_batch_compressed_reads_back_as_itself(
        flows in 0usize..300,
        trips in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = seed;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            rng >> 33
        };
        let mut batch = measured(flows);
        for record in &mut batch.batch.flows {
            record.bytes_sent = next();
            record.start = Timestamp::from_nanos(next());
            record.end = Timestamp::from_nanos(record.start.as_nanos() + next());
        }
        batch.round_trips = match trips {
            true => (0..flows)
                .map(|_| {
                    (next() % 3 != 0).then(|| crate::RoundTrip {
                        smoothed_us: next() as u32,
                        deviation_us: next() as u32,
                    })
                })
                .collect(),
            false => Vec::new(),
        };
        let packed = compressed(&batch);
        let (frame, _) = FrameDecoder::default().decode(&packed).unwrap().unwrap();
        let mut expander = FrameExpander::new().unwrap();
        let expanded = expander.expand(frame, FRAME_PAYLOAD_BYTES_MAX).unwrap();
        prop_assert_eq!(expanded.payload, &encode(&batch)[HEADER_BYTES..]);
    }
}
