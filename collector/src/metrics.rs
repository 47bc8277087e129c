//! Per-shard counters and gauges. Each shard writes only its own [`ShardMetrics`] (relaxed
//! atomics on a cache line no other shard writes, except the inbox counter its senders bump);
//! the control plane reads all of them at every scrape. The one table, refusals by
//! exporter, sits behind a mutex that only its shard (once per batch with refusals) and the
//! control plane take.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use flowattr_common::Timestamp;
use flowattr_common::exposition::Scrape;
use flowattr_common::wire::{ClockReading, RecordRefusal, RefusedRecord};

use crate::ownership::Reason;

/// Why ingest closed a connection or refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Bad magic, version, kind, reserved bytes or checksum.
    Frame,
    /// Declared length over `ingest.max_frame_bytes`.
    TooLarge,
    /// An intact frame whose payload is not a valid flow batch.
    Payload,
    /// A frame that is not a flow batch.
    UnexpectedKind,
    /// The stream ended inside a frame.
    Truncated,
    /// Over `ingest.max_connections`.
    ConnectionLimit,
    /// Its address holds `ingest.max_connections_per_address` already.
    AddressLimit,
    /// No complete frame within `ingest.idle_timeout`.
    Idle,
    /// The socket failed (reset by the peer, mostly).
    Io,
    /// Mutual TLS failed: no client certificate, one the CA did not sign, no TLS at all, or no
    /// handshake within `tls.handshake_timeout`.
    Handshake,
}

impl Rejection {
    pub const ALL: [Rejection; 10] = [
        Rejection::Frame,
        Rejection::TooLarge,
        Rejection::Payload,
        Rejection::UnexpectedKind,
        Rejection::Truncated,
        Rejection::ConnectionLimit,
        Rejection::AddressLimit,
        Rejection::Idle,
        Rejection::Io,
        Rejection::Handshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Frame => "bad_frame",
            Rejection::TooLarge => "too_large",
            Rejection::Payload => "bad_payload",
            Rejection::UnexpectedKind => "unexpected_kind",
            Rejection::Truncated => "truncated",
            Rejection::ConnectionLimit => "connection_limit",
            Rejection::AddressLimit => "address_limit",
            Rejection::Idle => "idle",
            Rejection::Io => "io_error",
            Rejection::Handshake => "tls_handshake",
        }
    }
}

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    pub connections_accepted: Counter,
    pub connections_open: Counter,
    /// Bytes the open exporter connections' read buffers hold.
    pub receive_buffer_bytes: Counter,
    pub rejections: [Counter; Rejection::ALL.len()],
    pub batches_accepted: Counter,
    pub batches_duplicate: Counter,
    pub flows_received: Counter,
    pub heartbeats_applied: Counter,
    pub heartbeats_expired: Counter,
    /// Messages other shards (and this one) queued for this shard, and those it handled:
    /// the difference is its inbox depth.
    pub inbox_sent: Counter,
    pub inbox_handled: Counter,
    pub unwritten_bytes: Counter,
    pub buffered_flows: Counter,
    pub buffered_bytes: Counter,
    pub bytes_written: Counter,
    pub segments_sealed: Counter,
    pub segments_released: Counter,
    pub write_errors: Counter,
    pub storage_failing: Counter,
    pub corrupt_blocks: Counter,
    /// Damage found at a restart in the segment being written at the crash.
    pub torn_writes: Counter,
    pub flows_replayed: Counter,
    pub flows_attributed: Counter,
    /// Of those, attributed from the event stream (IPs with no exporter).
    pub flows_attributed_by_events: Counter,
    pub flows_unattributed: [Counter; Reason::ALL.len()],
    pub flows_retried: Counter,
    pub sink_errors: Counter,
    pub ownership_keys: Counter,
    pub ownership_bytes: Counter,
    pub host_local_keys: Counter,
    /// The shard's map's [`crate::ownership::ReuseStatus`]. The shortest handover is kept
    /// plus one nanosecond, so that 0, where every counter starts, means none seen.
    pub fast_handovers: Counter,
    pub shortest_handover_ns_plus_one: Counter,
    pub bridged_gap_ns: Counter,
    pub owner_reach_ns: Counter,
    pub peer_ranges_applied: Counter,
    pub batches_refused: Counter,
    pub records_refused: RefusalCounts,
    pub clocks: ClockReadings,
}

/// Exporters counted apart in [`RefusalCounts`]; past it, refusals are counted under
/// `exporter="other"` so a sender inventing ids cannot grow the table.
const REFUSAL_EXPORTERS_MAX: usize = 1024;
const OTHER_EXPORTER: u64 = u64::MAX;

/// Records refused at the trust boundary, by exporter and reason. Written only by its shard,
/// once per batch with refusals; read by the control plane.
#[derive(Debug, Default)]
pub struct RefusalCounts(Mutex<BTreeMap<u64, [u64; RecordRefusal::ALL.len()]>>);

impl RefusalCounts {
    pub fn add(&self, exporter: u64, refused: &[RefusedRecord]) {
        let mut counts = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        let exporter = if counts.len() < REFUSAL_EXPORTERS_MAX || counts.contains_key(&exporter) {
            exporter
        } else {
            OTHER_EXPORTER
        };
        let row = counts.entry(exporter).or_default();
        for refusal in refused {
            row[refusal.reason as usize] += 1;
        }
    }

    fn add_into(&self, total: &mut BTreeMap<u64, [u64; RecordRefusal::ALL.len()]>) {
        let counts = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        for (exporter, row) in counts.iter() {
            let sum = total.entry(*exporter).or_default();
            for (sum, count) in sum.iter_mut().zip(row) {
                *sum += count;
            }
        }
    }
}

/// The last clock reading each exporter sent with a batch, and when it arrived. Written only
/// by its shard, once per batch with a reading; read by the control plane. Bounded like
/// [`RefusalCounts`]: past it, new exporters are not shown.
#[derive(Debug, Default)]
pub struct ClockReadings(Mutex<BTreeMap<u64, (ClockReading, Timestamp)>>);

impl ClockReadings {
    pub fn record(&self, exporter: u64, clock: ClockReading, arrival: Timestamp) {
        let mut readings = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        if readings.len() < REFUSAL_EXPORTERS_MAX || readings.contains_key(&exporter) {
            readings.insert(exporter, (clock, arrival));
        }
    }

    /// Every shard's readings, the latest per exporter.
    pub fn latest(shards: &[ShardMetrics]) -> BTreeMap<u64, (ClockReading, Timestamp)> {
        let mut latest: BTreeMap<u64, (ClockReading, Timestamp)> = BTreeMap::new();
        for shard in shards {
            let readings = shard
                .clocks
                .0
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            for (exporter, reading) in readings.iter() {
                let entry = latest.entry(*exporter).or_insert(*reading);
                if reading.1 > entry.1 {
                    *entry = *reading;
                }
            }
        }
        latest
    }
}

impl ShardMetrics {
    pub fn reject(&self, why: Rejection) {
        self.rejections[why as usize].add(1);
    }

    pub fn unattributed(&self, reason: Reason) -> &Counter {
        &self.flows_unattributed[Reason::ALL
            .iter()
            .position(|known| *known == reason)
            .expect("every reason is in ALL")]
    }

    /// What the shard's map has seen of IP reuse.
    pub fn reuse(&self) -> crate::ownership::ReuseStatus {
        let shortest = self.shortest_handover_ns_plus_one.get();
        crate::ownership::ReuseStatus {
            shortest_handover: shortest.checked_sub(1).map(std::time::Duration::from_nanos),
            fast_handovers: self.fast_handovers.get(),
            bridged_gap: std::time::Duration::from_nanos(self.bridged_gap_ns.get()),
            owner_reach: std::time::Duration::from_nanos(self.owner_reach_ns.get()),
        }
    }

    pub fn set_reuse(&self, reuse: crate::ownership::ReuseStatus) {
        self.fast_handovers.set(reuse.fast_handovers);
        self.shortest_handover_ns_plus_one
            .set(reuse.shortest_handover.map_or(0, |shortest| {
                flowattr_common::duration_nanos(shortest).saturating_add(1)
            }));
        self.bridged_gap_ns
            .set(flowattr_common::duration_nanos(reuse.bridged_gap));
        self.owner_reach_ns
            .set(flowattr_common::duration_nanos(reuse.owner_reach));
    }

    /// Flows that left the node, attributed or not.
    pub fn flows_emitted(&self) -> u64 {
        self.flows_attributed.get()
            + self
                .flows_unattributed
                .iter()
                .map(Counter::get)
                .sum::<u64>()
    }
}

/// Every shard's metrics, one series per shard.
pub fn write_shard_metrics(shards: &[ShardMetrics], scrape: &mut Scrape<'_>) -> fmt::Result {
    type Read = fn(&ShardMetrics) -> u64;
    let per_shard = |read: Read| {
        shards
            .iter()
            .enumerate()
            .map(move |(shard, metrics)| ([("shard", shard)], read(metrics)))
    };
    let counters: [(&str, &str, Read); 19] = [
        (
            "flowattr_connections_accepted",
            "exporter connections accepted",
            |m| m.connections_accepted.get(),
        ),
        (
            "flowattr_batches_accepted",
            "flow batches made durable and acked",
            |m| m.batches_accepted.get(),
        ),
        (
            "flowattr_batches_duplicate",
            "retried batches recognised and not counted again",
            |m| m.batches_duplicate.get(),
        ),
        (
            "flowattr_flows_received",
            "flows received in accepted batches",
            |m| m.flows_received.get(),
        ),
        (
            "flowattr_heartbeats_applied",
            "heartbeats stored in the ownership map",
            |m| m.heartbeats_applied.get(),
        ),
        (
            "flowattr_heartbeats_expired",
            "heartbeats older than the retention horizon, dropped",
            |m| m.heartbeats_expired.get(),
        ),
        (
            "flowattr_delay_bytes_written",
            "bytes written to delay segments",
            |m| m.bytes_written.get(),
        ),
        (
            "flowattr_delay_segments_sealed",
            "delay segments sealed",
            |m| m.segments_sealed.get(),
        ),
        (
            "flowattr_delay_segments_released",
            "delay segments attributed and deleted",
            |m| m.segments_released.get(),
        ),
        (
            "flowattr_delay_write_errors",
            "failed segment writes (retried; acks wait)",
            |m| m.write_errors.get(),
        ),
        (
            "flowattr_delay_corrupt_blocks",
            "segment blocks that failed their checks on read",
            |m| m.corrupt_blocks.get(),
        ),
        (
            "flowattr_delay_torn_writes",
            "damaged regions found at a restart in the segment being written at the crash: writes the crash tore, never acked (damage there to acked flows cannot be told apart)",
            |m| m.torn_writes.get(),
        ),
        (
            "flowattr_delay_flows_replayed",
            "flows recovered from segments at start",
            |m| m.flows_replayed.get(),
        ),
        (
            "flowattr_flows_attributed_by_events",
            "flows attributed from the assign/unassign event stream (provenance event)",
            |m| m.flows_attributed_by_events.get(),
        ),
        (
            "flowattr_flows_retried",
            "flows re-buffered because no evidence was found yet",
            |m| m.flows_retried.get(),
        ),
        (
            "flowattr_sink_errors",
            "failed sink writes (retried)",
            |m| m.sink_errors.get(),
        ),
        (
            "flowattr_peer_ranges_applied",
            "ranges learned from the region's other nodes, stored in the ownership map",
            |m| m.peer_ranges_applied.get(),
        ),
        (
            "flowattr_fast_reuse",
            "handovers seen shorter than ownership.merge_gap: the platform reuses IPs faster than configured, and lookups bridge only gaps shorter than the shortest handover",
            |m| m.fast_handovers.get(),
        ),
        (
            "flowattr_batches_refused",
            "whole batches refused with a typed answer (payload unreadable, over a limit, bad region, an exporter id the certificate does not give)",
            |m| m.batches_refused.get(),
        ),
    ];
    for (name, help, read) in counters {
        scrape.counters(name, help, per_shard(read))?;
    }
    let gauges: [(&str, &str, Read); 10] = [
        (
            "flowattr_connections_open",
            "exporter connections open",
            |m| m.connections_open.get(),
        ),
        (
            "flowattr_ingest_receive_buffer_bytes",
            "bytes the open exporter connections' read buffers hold (16 KiB each while they wait between frames)",
            |m| m.receive_buffer_bytes.get(),
        ),
        (
            "flowattr_inbox_depth",
            "messages queued for the shard",
            |m| m.inbox_sent.get().saturating_sub(m.inbox_handled.get()),
        ),
        (
            "flowattr_delay_unwritten_bytes",
            "encoded flows waiting for their write",
            |m| m.unwritten_bytes.get(),
        ),
        (
            "flowattr_delay_buffered_flows",
            "flows in the delay buffer",
            |m| m.buffered_flows.get(),
        ),
        (
            "flowattr_delay_buffered_bytes",
            "bytes in the delay buffer (segments and unwritten flows), against delay.max_buffer_bytes",
            |m| m.buffered_bytes.get(),
        ),
        (
            "flowattr_delay_storage_failing",
            "1 while segment writes fail: the node stops acking",
            |m| m.storage_failing.get(),
        ),
        (
            "flowattr_ownership_keys",
            "IPs (or shared IP, port pairs) with ownership evidence",
            |m| m.ownership_keys.get(),
        ),
        (
            "flowattr_host_local_keys",
            "host-local (address, port) pairs with evidence, over every host",
            |m| m.host_local_keys.get(),
        ),
        (
            "flowattr_ownership_bytes",
            "memory held by the ownership map",
            |m| m.ownership_bytes.get(),
        ),
    ];
    for (name, help, read) in gauges {
        scrape.gauges(name, help, per_shard(read))?;
    }
    let seconds = |nanos: u64| nanos as f64 / 1e9;
    scrape.gauges(
        "flowattr_ownership_bridged_gap_seconds",
        "the longest gap between one owner's evidence a lookup bridges now: ownership.merge_gap, or less once a shorter handover is seen",
        shards.iter().enumerate().map(|(shard, metrics)| ([("shard", shard)], seconds(metrics.bridged_gap_ns.get()))),
    )?;
    scrape.gauges(
        "flowattr_ownership_owner_reach_seconds",
        "how near a flow an owner's evidence must lie to name it now: ownership.slack, or less once a shorter handover is seen",
        shards.iter().enumerate().map(|(shard, metrics)| ([("shard", shard)], seconds(metrics.owner_reach_ns.get()))),
    )?;
    scrape.gauges(
        "flowattr_ownership_shortest_handover_seconds",
        "the shortest gap seen between one owner's last evidence on an IP and the next owner's first (absent until one is seen)",
        shards.iter().enumerate().filter_map(|(shard, metrics)| Some(([("shard", shard)], metrics.reuse().shortest_handover?.as_secs_f64()))),
    )?;
    scrape.counters(
        "flowattr_ingest_rejections",
        "frames refused and connections closed, by reason",
        shards.iter().enumerate().flat_map(|(shard, metrics)| {
            Rejection::ALL.map(|why| {
                (
                    ([("shard", shard)], [("reason", why.as_str())]),
                    metrics.rejections[why as usize].get(),
                )
            })
        }),
    )?;
    let mut refused = BTreeMap::new();
    for metrics in shards {
        metrics.records_refused.add_into(&mut refused);
    }
    scrape.counters(
        "flowattr_records_refused",
        "records refused at the trust boundary, by exporter and reason (from_the_future: that exporter's clock runs ahead)",
        refused.iter().flat_map(|(&exporter, row)| {
            let exporter = if exporter == OTHER_EXPORTER { "other".to_owned() } else { exporter.to_string() };
            RecordRefusal::ALL
                .iter()
                .zip(row)
                .filter(|(_, count)| **count > 0)
                .map(move |(reason, &count)| ([("exporter", exporter.clone()), ("reason", reason.as_str().to_owned())], count))
        }),
    )?;
    let clocks = ClockReadings::latest(shards);
    scrape.gauges(
        "flowattr_exporter_clock_offset_seconds",
        "each exporter's clock minus this node's, as its last batch said (positive: ahead); its times are corrected by it",
        clocks.iter().map(|(exporter, (clock, _))| ([("exporter", *exporter)], clock.offset_ns as f64 / 1e9)),
    )?;
    scrape.gauges(
        "flowattr_exporter_last_batch_timestamp_seconds",
        "when each exporter's latest batch with a clock reading arrived (Unix time): how far behind a silent or lagging exporter is",
        clocks.iter().map(|(exporter, (_, arrival))| ([("exporter", *exporter)], arrival.as_nanos() as f64 / 1e9)),
    )?;
    scrape.gauges(
        "flowattr_exporter_clock_uncertainty_seconds",
        "how well each exporter knows its offset; over half ownership.slack, its records are refused (clock_uncertain)",
        clocks.iter().map(|(exporter, (clock, _))| ([("exporter", *exporter)], seconds(clock.uncertainty_ns))),
    )?;
    scrape.counters(
        "flowattr_flows_emitted",
        "flows emitted, by result",
        shards.iter().enumerate().flat_map(|(shard, metrics)| {
            let attributed = (
                ([("shard", shard)], [("result", "attributed")]),
                metrics.flows_attributed.get(),
            );
            let unattributed = Reason::ALL.map(|reason| {
                (
                    ([("shard", shard)], [("result", reason.as_str())]),
                    metrics.unattributed(reason).get(),
                )
            });
            std::iter::once(attributed).chain(unattributed)
        }),
    )
}

/// A histogram of milliseconds up to an hour (release latency, broadcast lag), at three
/// significant digits.
pub fn new_milliseconds_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 3).expect("static bounds are valid")
}

/// Records `count` values of `milliseconds`; past the histogram's hour, at its top (the +Inf
/// bucket), never dropped.
pub fn record_milliseconds(
    histogram: &mut hdrhistogram::Histogram<u64>,
    milliseconds: u64,
    count: u64,
) {
    let _ = histogram.record_n(milliseconds.min(histogram.high()), count);
}

/// Upper bounds of the buckets of the histograms kept in milliseconds, in seconds.
const MILLISECOND_BUCKETS_SECONDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A histogram of milliseconds, cumulative since the start, as a Prometheus histogram in
/// seconds: a region sums the nodes' series, and any window is the difference of two scrapes
/// (`rate`, `histogram_quantile`), which summaries over a node's own window allow neither.
pub fn write_milliseconds_histogram(
    scrape: &mut Scrape<'_>,
    name: &str,
    help: &str,
    milliseconds: &hdrhistogram::Histogram<u64>,
) -> fmt::Result {
    let mut below = 0;
    let buckets = MILLISECOND_BUCKETS_SECONDS.map(|bound| {
        let through = milliseconds.count_between(0, (bound * 1000.0) as u64);
        let bucket = (bound, through - below);
        below = through;
        bucket
    });
    let sum_ms: u64 = milliseconds
        .iter_recorded()
        .map(|value| value.value_iterated_to() * value.count_at_value())
        .sum();
    scrape.histogram(
        name,
        help,
        &buckets,
        sum_ms as f64 / 1000.0,
        milliseconds.len(),
    )
}

/// A counter per reason, as one family with a `reason` label.
pub(crate) fn write_by_reason(
    scrape: &mut Scrape<'_>,
    name: &str,
    help: &str,
    reasons: &[&str],
    counts: &[AtomicU64],
) -> fmt::Result {
    scrape.counters(
        name,
        help,
        reasons
            .iter()
            .zip(counts)
            .map(|(reason, count)| ([("reason", *reason)], count.load(Ordering::Relaxed))),
    )
}
