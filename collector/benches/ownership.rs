//! Ownership map cost at production scale: 1M IPs with 8 segments each (one shard's share of a
//! large region, an hour of heartbeats). `cargo bench -p flowattr-collector --bench ownership`.
//!
//! Besides the timings it prints the memory the map holds, measured two ways: the map's own
//! accounting, and a counting global allocator (what the process really asked for).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{Bencher, Criterion, criterion_group, criterion_main};
use flowattr_collector::attribution::prefetch_ahead;
use flowattr_collector::ownership::{Heartbeat, OwnershipConfig, OwnershipMap, SourceId};
use flowattr_common::{CanonicalIp, Timestamp, WorkloadId};

struct CountingAllocator;

static ALLOCATED_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED_BYTES.fetch_add(new_size, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const SEGMENTS_PER_IP: u64 = 8;
const WORKLOADS: u32 = 1_000;
/// Heartbeats of one IP: 30 s of evidence every 60 s, so the 30 s gaps (over the 5 s merge gap)
/// keep the segments apart.
const PERIOD_NS: u64 = 60_000_000_000;
const EVIDENCE_NS: u64 = 30_000_000_000;
const BASE_NS: u64 = 1_700_000_000_000_000_000;
/// Distinct queries cycled through, so the benchmark measures cache misses on a 1M-key table
/// rather than one hot key.
const QUERIES: usize = 1 << 16;

fn ip(index: u32) -> CanonicalIp {
    CanonicalIp::from(Ipv4Addr::from(0x0A00_0000 + index))
}

fn owner(index: u32) -> WorkloadId {
    WorkloadId::new(index % WORKLOADS)
}

fn segment_start(k: u64) -> u64 {
    BASE_NS + k * PERIOD_NS
}

/// IP number `index`'s owner held it over `[start_ns, end_ns]`.
fn heartbeat(index: u32, start_ns: u64, end_ns: u64) -> Heartbeat {
    Heartbeat {
        ip: ip(index),
        port: 0,
        owner: Some(owner(index)),
        start: Timestamp::from_nanos(start_ns),
        end: Timestamp::from_nanos(end_ns),
        source: SourceId::UNKNOWN,
    }
}

fn build_map(ips: u32, segments_per_ip: u64) -> OwnershipMap {
    let mut map = OwnershipMap::new(OwnershipConfig::default());
    for k in 0..segments_per_ip {
        for index in 0..ips {
            let start = segment_start(k);
            map.insert(heartbeat(index, start, start + EVIDENCE_NS))
                .expect("well-formed heartbeat");
        }
    }
    // The collector's periodic upkeep; nothing is old enough to evict, so this only compacts.
    map.evict(Timestamp::from_nanos(segment_start(segments_per_ip)));
    map
}

fn report_memory(map: &OwnershipMap, allocated: usize) {
    let usage = map.memory_usage();
    eprintln!(
        "memory: {} keys, {} segments; map accounting {} bytes, allocator {} bytes; \
         per segment {:.1} bytes (arena), per key {:.1} bytes (table)",
        usage.keys,
        usage.segments,
        usage.bytes(),
        allocated,
        usage.arena_bytes as f64 / usage.segments as f64,
        usage.table_bytes as f64 / usage.keys as f64,
    );
}

fn ownership_1m(c: &mut Criterion) {
    ownership(c, 1_000_000, "ownership_1M_ips_x_8_segments");
}

/// The same operations on a map that fits in cache: the algorithm's cost without DRAM misses.
fn ownership_10k(c: &mut Criterion) {
    ownership(c, 10_000, "ownership_10K_ips_x_8_segments");
}

fn ownership(c: &mut Criterion, ips: u32, group_name: &str) {
    let before = ALLOCATED_BYTES.load(Ordering::Relaxed);
    let mut map = build_map(ips, SEGMENTS_PER_IP);
    report_memory(&map, ALLOCATED_BYTES.load(Ordering::Relaxed) - before);

    let mut rng = fastrand::Rng::with_seed(7);
    let queries: Vec<(u32, u64)> = (0..QUERIES)
        .map(|_| (rng.u32(..ips), rng.u64(..SEGMENTS_PER_IP)))
        .collect();

    let mut group = c.benchmark_group(group_name);
    group.measurement_time(Duration::from_secs(5));

    let mut i = 0;
    group.bench_function("lookup_inside_a_segment", |b| {
        b.iter(|| {
            let (index, k) = queries[i % QUERIES];
            i += 1;
            let at = Timestamp::from_nanos(segment_start(k) + EVIDENCE_NS / 2);
            black_box(map.attribute(ip(index), 443, at))
        })
    });

    group.bench_function("lookup_inside_a_segment_prefetched", |b| {
        prefetched_lookups(b, &map, &queries)
    });

    let mut i = 0;
    group.bench_function("lookup_unknown_ip", |b| {
        b.iter(|| {
            let (index, k) = queries[i % QUERIES];
            i += 1;
            black_box(map.attribute(
                ip(ips + index),
                443,
                Timestamp::from_nanos(segment_start(k)),
            ))
        })
    });

    // The common insert: an IP's current owner heartbeats again, extending its newest segment.
    let mut i = 0;
    let mut extension_ns = EVIDENCE_NS;
    group.bench_function("insert_extending_newest_segment", |b| {
        b.iter(|| {
            let (index, _) = queries[i % QUERIES];
            i += 1;
            if i % QUERIES == 0 {
                extension_ns += 1;
            }
            let start = segment_start(SEGMENTS_PER_IP - 1);
            black_box(
                map.insert(heartbeat(index, start, start + extension_ns))
                    .expect("well-formed heartbeat"),
            )
        })
    });

    // The same heartbeats as a flow batch brings them, prefetched ahead as ingest does.
    let mut i = 0;
    group.bench_function("insert_extending_newest_segment_prefetched", |b| {
        b.iter(|| {
            let at = i % QUERIES;
            i += 1;
            if i % QUERIES == 0 {
                extension_ns += 1;
            }
            prefetch_ahead(&queries, at, |&(index, _), stage| {
                map.prefetch(ip(index), 0, stage)
            });
            let (index, _) = queries[at];
            let start = segment_start(SEGMENTS_PER_IP - 1);
            black_box(
                map.insert(heartbeat(index, start, start + extension_ns))
                    .expect("well-formed heartbeat"),
            )
        })
    });

    // A late heartbeat landing among older segments: the general merge over all 8 segments.
    let mut i = 0;
    group.bench_function("insert_late_heartbeat_general_merge", |b| {
        b.iter(|| {
            let (index, k) = queries[i % QUERIES];
            i += 1;
            let start = segment_start(k % (SEGMENTS_PER_IP - 1)) + 1_000;
            black_box(
                map.insert(heartbeat(index, start, start + 1_000_000))
                    .expect("well-formed heartbeat"),
            )
        })
    });
    group.finish();
}

/// What the release path asks of a long-lived map: keys with an hour of segments (one a
/// minute, all within retention), looked up at instants of the last two minutes, as flows come
/// out of the delay buffer.
fn recent_lookups(c: &mut Criterion) {
    const SEGMENTS: u64 = 60;
    const IPS: u32 = 10_000;
    let map = build_map(IPS, SEGMENTS);
    let mut rng = fastrand::Rng::with_seed(7);
    let queries: Vec<(u32, u64)> = (0..QUERIES)
        .map(|_| (rng.u32(..IPS), SEGMENTS - 1 - rng.u64(..2)))
        .collect();
    let mut group = c.benchmark_group("ownership_10K_ips_x_60_segments");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("lookup_in_the_last_two_segments_prefetched", |b| {
        prefetched_lookups(b, &map, &queries)
    });
    group.finish();
}

/// Lookups inside `queries`' segments as a released block makes them: in order, each flow's
/// table slot and then its segments prefetched ahead (the release path's own helper).
fn prefetched_lookups(b: &mut Bencher<'_>, map: &OwnershipMap, queries: &[(u32, u64)]) {
    let mut i = 0;
    b.iter(|| {
        let at = i % queries.len();
        i += 1;
        prefetch_ahead(queries, at, |&(index, _), stage| {
            map.prefetch(ip(index), 443, stage)
        });
        let (index, k) = queries[at];
        let at = Timestamp::from_nanos(segment_start(k) + EVIDENCE_NS / 2);
        black_box(map.attribute(ip(index), 443, at))
    })
}

criterion_group!(benches, ownership_1m, ownership_10k, recent_lookups);
criterion_main!(benches);
