//! The cost of the trust boundary per record: the format's per-record rules, the clock bounds
//! and the repeat check, on a 4096-record batch as an exporter sends it (docs/benchmarks.md).
//! `cargo bench -p flowattr-collector --bench evidence`.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowattr_collector::config::Config;
use flowattr_collector::evidence::EvidenceGate;
use flowattr_common::wire::{
    ExporterId, FlowBatch, FlowRecord, FrameDecoder, ValidFlowBatch, WorkloadIndex, encode_message,
};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};

const FLOWS: u32 = 4096;

fn check_batch(c: &mut Criterion) {
    let now = Timestamp::now();
    let flows = (0..FLOWS)
        .map(|i| FlowRecord {
            local_ip: CanonicalIp::from(Ipv4Addr::from(0x0a00_0000 + i % 64)),
            remote_ip: CanonicalIp::from(Ipv4Addr::from(0x0a10_0000 + i * 7)),
            local_port: 40_000 + (i % 20_000) as u16,
            remote_port: 443,
            local_workload: Some(WorkloadIndex(i % 8)),
            local_shared: false,
            start: Timestamp::from_nanos(now.as_nanos() - 30_000_000_000 + u64::from(i) * 1000),
            end: Timestamp::from_nanos(now.as_nanos() - 1_000_000_000),
            bytes_sent: 1000,
            bytes_received: 2000,
            segments_sent: 10,
            segments_received: 12,
            retransmits: 0,
            direction: Direction::Outbound,
            state: FlowState::Closed,
        })
        .collect();
    let batch = FlowBatch {
        exporter: ExporterId(1),
        sequence: 0,
        region: "r".into(),
        workloads: (0..8).map(|i| format!("service-{i}")).collect(),
        flows,
    };
    let mut bytes = Vec::new();
    encode_message(&batch, &mut bytes).unwrap();
    let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
    let mut gate = EvidenceGate::new(&Config::default());
    let mut refused = Vec::new();
    let mut group = c.benchmark_group("evidence");
    group.throughput(Throughput::Elements(u64::from(FLOWS)));
    group.bench_function("validate_and_check_4096_records", |b| {
        b.iter(|| {
            let batch = ValidFlowBatch::from_frame(&frame).unwrap();
            let mut admitted = 0u32;
            gate.check_batch(&batch, now, None, &mut refused, |_, _| admitted += 1);
            black_box(admitted)
        })
    });
    group.finish();
    assert!(refused.is_empty());
}

criterion_group!(benches, check_batch);
criterion_main!(benches);
