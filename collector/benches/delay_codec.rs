//! The delay buffer's encoding: bytes per flow and encode/decode cost, on batches shaped like
//! one host's and on the pipeline benchmark's random ones.
//! `cargo bench -p flowattr-collector --bench delay_codec`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowattr_bench::synthetic::{self, Flows, host_batches};
use flowattr_collector::delay::codec::{BlockHeader, BufferedFlow, decode_block, encode_block};
use flowattr_common::Timestamp;

const FLOWS: usize = 4096;
const BASE_NS: u64 = 1_700_000_000_000_000_000;

/// Flows as the delay buffer holds them, from the load generator's records: the same host and
/// random shapes as `flowattr-bench pipeline` sends (`flowattr_bench::synthetic`).
fn buffered((records, round_trips): Flows) -> Vec<BufferedFlow> {
    (0..)
        .zip(records.iter().zip(round_trips))
        .map(|(index, (record, round_trip))| BufferedFlow::from_record(record, round_trip, index))
        .collect()
}

/// The batches end within the minute before this, one second before the block arrives.
const NOW: Timestamp = Timestamp::from_nanos(BASE_NS + 60_000_000_000);

/// One host's batch of a 256-host fleet, as the pipeline benchmark's default sends.
fn host_batch(seed: u64) -> Vec<BufferedFlow> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut hosts = host_batches(256, FLOWS, NOW, &mut rng);
    buffered(hosts.swap_remove(seed as usize % hosts.len()))
}

/// The pipeline benchmark's random batches: both ends of random connections across a 1M-IP
/// fleet.
fn random_batch(seed: u64) -> Vec<BufferedFlow> {
    let mut rng = fastrand::Rng::with_seed(seed);
    buffered(synthetic::random_batch(1_000_000, FLOWS, NOW, &mut rng, 64))
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
