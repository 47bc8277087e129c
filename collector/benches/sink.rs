//! What a flow costs on its way out: the shard's copy into a batch (on the attribution path),
//! then the sink thread's encoding as JSON lines or protobuf messages, the Kafka client's zstd
//! of a message by column, and a Parquet write (docs/benchmarks.md).
//! `cargo bench -p flowattr-collector --bench sink`.

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowattr_bench::synthetic::{Flows, host_batches, host_shape_workload, workload_identities};
use flowattr_collector::config::{KafkaFormat, SinkConfig};
use flowattr_collector::delay::codec::{BlockHeader, BufferedFlow};
use flowattr_collector::ownership::{Reason, WorkloadInterner};
use flowattr_collector::sink::{EmittedBatch, Provenance, SinkSet, json, protobuf};
use flowattr_common::{CanonicalIp, Direction, FlowState, RoundTrip, Timestamp, WorkloadId};

const FLOWS: usize = 4096;

/// A block's worth of flows as a busy node emits them: one host's pod (an IPv4 and an IPv6
/// address) calling many remotes, IPv4 mostly, one in 16 IPv6, one in 8 unattributed.
fn busy_node_flows(count: usize) -> Vec<BufferedFlow> {
    (0..count as u32)
        .map(|i| {
            let (local_ip, remote_ip) = if i % 16 == 0 {
                (
                    CanonicalIp::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, 1)),
                    CanonicalIp::from(Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, i as u16, 2)),
                )
            } else {
                (
                    CanonicalIp::from(Ipv4Addr::new(10, 0, 0, 7)),
                    CanonicalIp::from(Ipv4Addr::from(0x0a10_0000 + i * 7)),
                )
            };
            BufferedFlow {
                local_ip,
                remote_ip,
                local_port: 443,
                remote_port: 32_768 + (i % 28_000) as u16,
                local_workload: Some(0),
                local_shared: false,
                start: Timestamp::from_nanos(1_795_396_862_998_014_925 + u64::from(i) * 1_000_003),
                end: Timestamp::from_nanos(1_795_396_888_817_954_522 + u64::from(i) * 999_983),
                bytes_sent: 97_335 + u64::from(i),
                bytes_received: 25_262 * u64::from(i % 13),
                segments_sent: 93,
                segments_received: 65 + i % 7,
                retransmits: i % 3,
                round_trip: Some(RoundTrip {
                    smoothed_us: 200 + i % 700,
                    deviation_us: 50 + i % 90,
                }),
                direction: if i % 2 == 0 {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
                state: FlowState::Closed,
                index: i,
                retries: (i % 4) as u8 & 1,
            }
        })
        .collect()
}

fn format_block(c: &mut Criterion) {
    let header = BlockHeader {
        host_name: Some("ip-10-1-2-3.ec2.internal".into()),
        ..BlockHeader::of_exporter(
            12_467_462_091_122_771_888,
            1_795_396_862_998_014,
            Timestamp::from_nanos(1_795_396_890_000_000_000),
        )
    };
    let flows = busy_node_flows(FLOWS);
    let mut names = WorkloadInterner::default();
    let services: Vec<_> = (0..64)
        .map(|i| names.intern(&format!("billing-api-{i}")))
        .collect();
    let gateway = flowattr_common::WorkloadIdentity {
        name: "shop/api-gateway",
        namespace: "shop",
        instance: "api-gateway-7d9f8b6c5d-x2x9q",
        owner_kind: "Deployment",
    }
    .key();
    let fill_from = |batch: &mut EmittedBatch, flows: &[BufferedFlow]| {
        batch.clear();
        let gateway = batch.add_identity(&gateway);
        for (i, flow) in flows.iter().enumerate() {
            let remote = if i % 8 == 0 {
                Err(Reason::NoEvidence)
            } else {
                Ok((services[i % 64], Provenance::Heartbeat))
            };
            batch.push(&header, flow, Some(gateway), remote, &names);
        }
    };
    let fill = |batch: &mut EmittedBatch| fill_from(batch, &flows);
    let mut batch = EmittedBatch::default();
    // Each format's default messages.
    let rows_limits = protobuf::MessageLimits::default_for(KafkaFormat::Protobuf);
    let columns_limits = protobuf::MessageLimits::default_for(KafkaFormat::ProtobufColumns);
    let mut group = c.benchmark_group("sink");
    group.throughput(Throughput::Elements(FLOWS as u64));
    group.bench_function("batch_4096_flows", |b| {
        b.iter(|| {
            fill(&mut batch);
            black_box(batch.len())
        })
    });
    fill(&mut batch);
    group.bench_function("json_lines_4096_flows", |b| {
        b.iter(|| {
            batch.clear_encodings();
            json::encode_once(&mut batch);
            black_box(batch.json_bytes())
        })
    });
    group.bench_function("protobuf_4096_flows", |b| {
        b.iter(|| {
            protobuf::encode_messages(&mut batch, rows_limits);
            black_box(batch.protobuf_bytes())
        })
    });
    group.bench_function("protobuf_columns_4096_flows", |b| {
        b.iter(|| {
            protobuf::columns::encode_messages(&mut batch, columns_limits);
            black_box(batch.protobuf_bytes())
        })
    });
    // The worst case for the columns' endpoint table: every flow a local address of its own
    // (random batches, not one host's).
    let mut spread = EmittedBatch::default();
    let spread_flows: Vec<BufferedFlow> = flows
        .iter()
        .zip(0u32..)
        .map(|(flow, i)| BufferedFlow {
            local_ip: CanonicalIp::from(Ipv4Addr::from(0x0a00_0000 + i)),
            ..*flow
        })
        .collect();
    fill_from(&mut spread, &spread_flows);
    group.bench_function("protobuf_columns_4096_flows_4096_local_addresses", |b| {
        b.iter(|| {
            protobuf::columns::encode_messages(&mut spread, columns_limits);
            black_box(spread.protobuf_bytes())
        })
    });
    // What a sink thread meets: a shard's batch of the default 16,384 flows (one message):
    // four exporters' blocks of the pipeline benchmark's host-shaped flows, written on another
    // core and read from memory. Sixteen of them, taken in turn, are more than the caches hold.
    let mut rng = fastrand::Rng::with_seed(7);
    let hosts = host_batches(
        64,
        4096,
        Timestamp::from_nanos(1_795_396_890_000_000_000),
        &mut rng,
    );
    let fleet = FleetNames::new(&mut names);
    let mut cold: Vec<EmittedBatch> = hosts
        .chunks(4)
        .map(|hosts| fleet_batch(hosts, &fleet, &names))
        .collect();
    let cold_flows = cold[0].len();
    group.throughput(Throughput::Elements(cold_flows as u64));
    let mut turn = 0;
    group.bench_function("protobuf_columns_16384_fleet_flows_from_memory", |b| {
        b.iter(|| {
            turn = (turn + 1) % cold.len();
            protobuf::columns::encode_messages(&mut cold[turn], columns_limits);
            black_box(cold[turn].protobuf_bytes())
        })
    });
    // What the Kafka client then spends on such a message: zstd at the sink's level.
    protobuf::columns::encode_messages(&mut cold[0], columns_limits);
    let message = protobuf::messages(&cold[0])
        .next()
        .expect("one message")
        .to_vec();
    let mut compressor = zstd::bulk::Compressor::new(2).expect("a zstd context");
    let mut compressed = Vec::with_capacity(zstd::zstd_safe::compress_bound(message.len()));
    group.bench_function("zstd_level_2_of_16384_fleet_flows_as_columns", |b| {
        b.iter(|| {
            compressed.clear();
            compressor
                .compress_to_buffer(&message, &mut compressed)
                .expect("compressed");
            black_box(compressed.len())
        })
    });
    println!(
        "sink: 16,384 fleet flows as one columns message, {:.1} bytes a flow, {:.1} after zstd level 2",
        message.len() as f64 / cold_flows as f64,
        compressed.len() as f64 / cold_flows as f64
    );
    drop(cold);
    group.throughput(Throughput::Elements(FLOWS as u64));
    // Parquet through the sink itself: arrow arrays, column encoding, zstd, and the file writes
    // (a file completes, with its fsync and rename, every 64 MiB).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a scratch directory");
    let parquet = SinkSet::open(
        &[SinkConfig::Parquet {
            dir: dir.path().to_owned(),
            max_file_bytes: 64 << 20,
            max_file_age: std::time::Duration::from_secs(3600),
        }],
        Some("bench"),
    )
    .expect("the parquet sink opens");
    group.bench_function("parquet_4096_flows", |b| {
        b.iter(|| black_box(parquet.write(&mut batch).expect("written")))
    });
    group.finish();
    batch.clear_encodings();
    json::encode_once(&mut batch);
    protobuf::encode_messages(&mut batch, rows_limits);
    let rows = batch.protobuf_bytes();
    protobuf::columns::encode_messages(&mut batch, columns_limits);
    println!(
        "sink: {} bytes per flow as JSON, {} as protobuf rows, {} as protobuf columns (before Kafka's compression)",
        batch.json_bytes() / FLOWS,
        rows / FLOWS,
        batch.protobuf_bytes() / FLOWS
    );
}

/// The host-shaped simulator's pods and, interned once, the workloads that name their remote
/// side (by workload only, no pod).
struct FleetNames {
    identities: Vec<String>,
    workloads: Vec<WorkloadId>,
}

impl FleetNames {
    fn new(names: &mut WorkloadInterner) -> FleetNames {
        let identities = workload_identities();
        let workloads = identities
            .iter()
            .map(|key| {
                let identity = flowattr_common::WorkloadIdentity::parse(key).expect("a valid key");
                names.intern(identity.name)
            })
            .collect();
        FleetNames {
            identities,
            workloads,
        }
    }
}

/// A batch of the host-shaped simulator's flows, each host's batch one block, as a shard emits
/// them: the remote side attributed to the workload its pod runs, but for one flow in 16
/// (no evidence).
fn fleet_batch(hosts: &[Flows], fleet: &FleetNames, names: &WorkloadInterner) -> EmittedBatch {
    let mut batch = EmittedBatch::default();
    let FleetNames {
        identities,
        workloads,
    } = fleet;
    for (exporter, (records, round_trips)) in (1u64..).zip(hosts) {
        let header = BlockHeader {
            host_name: Some(format!("ip-10-64-0-{exporter}.ec2.internal").into()),
            ..BlockHeader::of_exporter(exporter, 1_000 + exporter, records[0].end)
        };
        let pods: Vec<u32> = identities
            .iter()
            .map(|identity| batch.add_identity(identity))
            .collect();
        for (index, (record, round_trip)) in (0u32..).zip(records.iter().zip(round_trips)) {
            let flow = BufferedFlow::from_record(record, *round_trip, index);
            let remote = match host_shape_workload(record.remote_ip) {
                Some(workload) if index % 16 != 0 => {
                    Ok((workloads[workload as usize], Provenance::Heartbeat))
                }
                _ => Err(Reason::NoEvidence),
            };
            let local = flow.local_workload.map(|workload| pods[workload as usize]);
            batch.push(&header, &flow, local, remote, names);
        }
    }
    batch
}

criterion_group!(benches, format_block);
criterion_main!(benches);
