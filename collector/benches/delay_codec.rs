//! The delay buffer's encoding: bytes per flow and encode/decode cost, on batches shaped like
//! one host's and on the pipeline benchmark's random ones.
//! `cargo bench -p flowattr-collector --bench delay_codec`.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowattr_bench::synthetic::{log_normal, round_trip};
use flowattr_collector::delay::codec::{BlockHeader, BufferedFlow, decode_block, encode_block};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};

const FLOWS: usize = 4096;
const BASE_NS: u64 = 1_700_000_000_000_000_000;

fn v4(value: u32) -> CanonicalIp {
    CanonicalIp::from(Ipv4Addr::from(value))
}

/// One host's minute: 30 pods, each one workload with one service port; half the flows are
/// the pods' outbound calls (ephemeral local port, a few well-known remote ports), half
/// inbound to their service port; remote IPs anywhere in a 1M-IP fleet; flows in the order
/// they closed, times in nanoseconds as exporters send them; durations, bytes and round trips
/// log-normal.
fn host_batch(seed: u64) -> Vec<BufferedFlow> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let pods = 30u32;
    let pod_ip = |pod: u32| v4(0x0A40_0000 + (seed as u32 % 4096) * 256 + pod + 2);
    let service_ports = [443u16, 8080, 9090, 5432, 6379, 53, 8443, 3306];
    let mut ends: Vec<u64> = (0..FLOWS).map(|_| rng.u64(..60_000_000_000)).collect();
    ends.sort_unstable();
    ends.into_iter()
        .enumerate()
        .map(|(index, end_offset)| {
            let pod = (rng.f64().powi(2) * f64::from(pods)) as u32;
            let outbound = rng.bool();
            let ephemeral = rng.u16(32768..61000);
            let service = service_ports[(rng.f64().powi(3) * service_ports.len() as f64) as usize];
            let duration = log_normal(&mut rng, 50e6, 2.0).min(600e9) as u64;
            let end = BASE_NS + end_offset;
            let sent = log_normal(&mut rng, 2_000.0, 1.5) as u64;
            let received = log_normal(&mut rng, 8_000.0, 1.5) as u64;
            BufferedFlow {
                local_ip: pod_ip(pod),
                remote_ip: v4(0x0A00_0000 + rng.u32(..1_000_000)),
                local_port: if outbound {
                    ephemeral
                } else {
                    service_ports[pod as usize % 4]
                },
                remote_port: if outbound { service } else { ephemeral },
                local_workload: Some(pod),
                local_shared: false,
                start: Timestamp::from_nanos(end - duration),
                end: Timestamp::from_nanos(end),
                bytes_sent: sent,
                bytes_received: received,
                segments_sent: (sent / 1448 + 2) as u32,
                segments_received: (received / 1448 + 2) as u32,
                retransmits: u32::from(rng.u8(..100) == 0) * rng.u32(1..4),
                round_trip: round_trip(&mut rng),
                direction: if outbound {
                    Direction::Outbound
                } else {
                    Direction::Inbound
                },
                state: if rng.u8(..20) == 0 {
                    FlowState::Open
                } else {
                    FlowState::Closed
                },
                index: index as u32,
                retries: 0,
            }
        })
        .collect()
}

/// The pipeline benchmark's batches: both ends of random connections across a 1M-IP fleet.
fn random_batch(seed: u64) -> Vec<BufferedFlow> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut flows = Vec::with_capacity(FLOWS);
    while flows.len() < FLOWS {
        let (local, remote) = (rng.u32(..1_000_000), rng.u32(..1_000_000));
        let start = BASE_NS + rng.u64(1_000..60_000) * 1_000_000;
        let outbound = BufferedFlow {
            local_ip: v4(0x0A00_0000 + local),
            remote_ip: v4(0x0A00_0000 + remote),
            local_port: rng.u16(1024..),
            remote_port: 443,
            local_workload: Some(local % 64),
            local_shared: false,
            start: Timestamp::from_nanos(start),
            end: Timestamp::from_nanos(start + rng.u64(1..500) * 1_000_000),
            bytes_sent: rng.u64(100..50_000),
            bytes_received: rng.u64(100..50_000),
            segments_sent: rng.u32(1..60),
            segments_received: rng.u32(1..60),
            retransmits: u32::from(rng.u8(..100) == 0),
            round_trip: round_trip(&mut rng),
            direction: Direction::Outbound,
            state: FlowState::Closed,
            index: flows.len() as u32,
            retries: 0,
        };
        let inbound = BufferedFlow {
            local_ip: outbound.remote_ip,
            remote_ip: outbound.local_ip,
            local_port: outbound.remote_port,
            remote_port: outbound.local_port,
            local_workload: Some(remote % 64),
            bytes_sent: outbound.bytes_received,
            bytes_received: outbound.bytes_sent,
            segments_sent: outbound.segments_received,
            segments_received: outbound.segments_sent,
            direction: Direction::Inbound,
            index: flows.len() as u32 + 1,
            ..outbound
        };
        flows.push(outbound);
        flows.push(inbound);
    }
    flows.truncate(FLOWS);
    flows
}

const HEADER: BlockHeader =
    BlockHeader::of_exporter(7, 1234, Timestamp::from_nanos(BASE_NS + 61_000_000_000));

fn workloads() -> Vec<String> {
    (0..64).map(|i| format!("svc-{i:02}")).collect()
}

fn codec(c: &mut Criterion) {
    let names = workloads();
    // Times are whole microseconds from ingest on; the same flows with nanoseconds are what a
    // block holds when a time is not whole (its preamble says which).
    let micros = |at: Timestamp| Timestamp::from_nanos(at.as_nanos() / 1000 * 1000);
    let host_micros = host_batch(3)
        .into_iter()
        .map(|flow| BufferedFlow {
            start: micros(flow.start),
            end: micros(flow.end),
            ..flow
        })
        .collect();
    for (shape, flows) in [
        ("host", host_micros),
        ("host_nanoseconds", host_batch(3)),
        ("random", random_batch(3)),
    ] {
        let mut encoded = Vec::new();
        encode_block(&HEADER, &names, &flows, &mut encoded);
        let dictionary: usize = names.iter().map(|name| name.len() + 1).sum();
        eprintln!(
            "{shape} batch: {:.1} bytes a flow ({} flows, {} bytes, of which {} the workload names)",
            encoded.len() as f64 / flows.len() as f64,
            flows.len(),
            encoded.len(),
            dictionary,
        );
        let mut group = c.benchmark_group(format!("delay_codec_{shape}"));
        group.throughput(Throughput::Elements(flows.len() as u64));
        let mut out = Vec::with_capacity(encoded.len() * 2);
        group.bench_function("encode", |b| {
            b.iter(|| {
                out.clear();
                encode_block(&HEADER, &names, black_box(&flows), &mut out);
                black_box(out.len())
            })
        });
        group.bench_function("decode", |b| {
            b.iter(|| {
                let (block, _) = decode_block(black_box(&encoded))
                    .expect("valid")
                    .expect("whole");
                let mut sum = 0u64;
                block
                    .for_each_flow(|flow| sum += flow.bytes_sent)
                    .expect("valid");
                black_box(sum)
            })
        });
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
