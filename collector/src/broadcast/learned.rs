//! What one shard's exporters taught it since its last publish, compacted per (IP, port,
//! owner): a steady owner reporting every interval, or a busy service opening thousands of
//! overlapping connections, costs one small update per publish, not one per flow. Each update
//! also names the exporter that last reported it, for the console of the nodes that apply it.

use flowattr_common::wire::{
    RANGE_SPANS_MAX, RANGE_UPDATES_MAX, RangeUpdate, RangeUpdateBatch, Span, UNNAMED_OWNER,
};
use flowattr_common::{CanonicalIp, Timestamp, WorkloadId};
use rustc_hash::FxHashMap;

use super::partition_of;
use crate::ownership::WorkloadInterner;

#[derive(Debug, Default)]
pub struct LearnedRanges {
    /// Per key, disjoint spans in order. Overlapping or touching evidence is one span: the
    /// union is exact, never widened across a gap.
    /// Owner None: a holder its exporter could not name.
    ranges: FxHashMap<(CanonicalIp, u16, Option<WorkloadId>), Learned>,
    heartbeats: u64,
}

#[derive(Debug, Default)]
struct Learned {
    spans: Vec<Span>,
    /// The exporter whose heartbeat was added last.
    exporter: u64,
}

/// One message's worth of updates for one partition, and the exporter behind each update, in
/// the same order (they travel in [`super::EXPORTERS_HEADER`]).
#[derive(Debug)]
pub struct LearnedBatch {
    pub partition: i32,
    pub batch: RangeUpdateBatch,
    pub exporters: Vec<u64>,
}

impl LearnedRanges {
    /// `exporter` reported that `owner` held `(ip, port)` from `start` to `end`.
    pub fn add(
        &mut self,
        ip: CanonicalIp,
        port: u16,
        owner: Option<WorkloadId>,
        (start, end): (Timestamp, Timestamp),
        exporter: u64,
    ) {
        self.heartbeats += 1;
        let learned = self.ranges.entry((ip, port, owner)).or_default();
        learned.exporter = exporter;
        let spans = &mut learned.spans;
        // The common case: a connection reporting again, or one overlapping the last.
        if let Some(last) = spans.last_mut()
            && start >= last.start
            && start.as_nanos() <= last.end.as_nanos().saturating_add(1)
        {
            last.end = last.end.max(end);
            return;
        }
        insert_span(spans, Span { start, end });
    }

    /// Heartbeats added since the last [`Self::take`].
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Everything learned, as batches for the partitions of `partitions` (one or more per
    /// partition that has updates), and starts afresh.
    pub fn take(
        &mut self,
        origin: u64,
        partitions: u32,
        names: &WorkloadInterner,
    ) -> Vec<LearnedBatch> {
        let mut by_partition: FxHashMap<i32, Vec<(LearnedBatch, usize)>> = FxHashMap::default();
        let mut owners: FxHashMap<(i32, WorkloadId), u32> = FxHashMap::default();
        for ((ip, port, owner), Learned { spans, exporter }) in self.ranges.drain() {
            let name = match owner {
                Some(owner) => match names.key(owner) {
                    Some(name) => Some((owner, name)),
                    None => continue,
                },
                None => None,
            };
            let partition = partition_of(ip, partitions);
            let batches = by_partition.entry(partition).or_default();
            let bytes = archived_bytes(&spans);
            let full = |(learned, size): &(LearnedBatch, usize)| {
                learned.batch.updates.len() + spans.len().div_ceil(RANGE_SPANS_MAX)
                    > RANGE_UPDATES_MAX
                    || size + bytes > MESSAGE_BYTES_TARGET
            };
            if batches.last().is_none_or(full) {
                batches.push((
                    LearnedBatch {
                        partition,
                        batch: RangeUpdateBatch {
                            origin_node: origin,
                            workloads: Vec::new(),
                            updates: Vec::new(),
                        },
                        exporters: Vec::new(),
                    },
                    0,
                ));
                owners.retain(|(known, _), _| *known != partition);
            }
            let (
                LearnedBatch {
                    batch, exporters, ..
                },
                size,
            ) = batches.last_mut().expect("pushed above");
            *size += bytes;
            let index = name.map_or(UNNAMED_OWNER, |(owner, name)| {
                *owners.entry((partition, owner)).or_insert_with(|| {
                    batch.workloads.push(name.to_owned());
                    (batch.workloads.len() - 1) as u32
                })
            });
            for chunk in spans.chunks(RANGE_SPANS_MAX) {
                batch.updates.push(RangeUpdate {
                    ip,
                    port,
                    owner: index,
                    spans: chunk.to_vec(),
                });
                exporters.push(exporter);
            }
        }
        self.heartbeats = 0;
        by_partition
            .into_values()
            .flatten()
            .map(|(learned, _)| learned)
            .collect()
    }
}

/// A message's size to aim below: Kafka's default `message.max.bytes` is 1 MB, and many
/// small messages spread over the partitions better than a few large ones.
const MESSAGE_BYTES_TARGET: usize = 256 << 10;

/// About what one update with `spans` costs in the archive (an IP, a port, an owner, the
/// spans' vector and its 16-byte spans), and its exporter in the header.
fn archived_bytes(spans: &[Span]) -> usize {
    48 + 16 * spans.len()
}

/// Inserts `new` into ordered disjoint `spans`, merging every span it overlaps or touches.
fn insert_span(spans: &mut Vec<Span>, mut new: Span) {
    let touches = |span: &Span, new: &Span| {
        span.start.as_nanos() <= new.end.as_nanos().saturating_add(1)
            && new.start.as_nanos() <= span.end.as_nanos().saturating_add(1)
    };
    let first =
        spans.partition_point(|span| span.end.as_nanos().saturating_add(1) < new.start.as_nanos());
    let mut last = first;
    while last < spans.len() && touches(&spans[last], &new) {
        new.start = new.start.min(spans[last].start);
        new.end = new.end.max(spans[last].end);
        last += 1;
    }
    spans.splice(first..last, [new]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::from_nanos(s * 1_000_000_000)
    }

    #[test]
    fn compaction_is_the_exact_union_per_key() {
        let mut names = WorkloadInterner::default();
        let (api, db) = (Some(names.intern("api")), Some(names.intern("db")));
        let ip = CanonicalIp::from_v4([10, 0, 0, 1].into());
        let mut learned = LearnedRanges::default();
        // One connection reporting every interval, and a separate flow after a gap; the last
        // report of each key names the exporter its update carries.
        for end in [60, 120, 180] {
            learned.add(ip, 0, api, (at(10), at(end)), 1);
        }
        learned.add(ip, 0, api, (at(200), at(210)), 1);
        learned.add(ip, 0, api, (at(150), at(205)), 1);
        learned.add(ip, 0, api, (at(300), at(301)), 2);
        learned.add(ip, 0, db, (at(10), at(20)), 3);
        learned.add(ip, 0, None, (at(30), at(40)), 4);
        learned.add(ip, 0, None, (at(35), at(45)), 4);
        assert_eq!(learned.heartbeats(), 9);
        let batches = learned.take(9, 4, &names);
        assert!(learned.is_empty());
        assert_eq!(batches.len(), 1, "one IP, one partition");
        let LearnedBatch {
            partition,
            batch,
            exporters,
        } = &batches[0];
        assert_eq!(*partition, partition_of(ip, 4));
        assert_eq!(exporters.len(), batch.updates.len());
        assert_eq!(batch.origin_node, 9);
        // (owner, spans in seconds, exporter)
        type Update = (String, Vec<(u64, u64)>, u64);
        let mut updates: Vec<Update> = batch
            .updates
            .iter()
            .zip(exporters)
            .map(|(update, &exporter)| {
                let spans = update
                    .spans
                    .iter()
                    .map(|span| {
                        (
                            span.start.as_nanos() / 1_000_000_000,
                            span.end.as_nanos() / 1_000_000_000,
                        )
                    })
                    .collect();
                let owner = if update.owner == UNNAMED_OWNER {
                    "(unnamed)".to_owned()
                } else {
                    batch.workloads[update.owner as usize].clone()
                };
                (owner, spans, exporter)
            })
            .collect();
        updates.sort();
        assert_eq!(batch.workloads.len(), 2, "no name for the unnamed holder");
        assert_eq!(
            updates,
            vec![
                ("(unnamed)".to_owned(), vec![(30, 45)], 4),
                ("api".to_owned(), vec![(10, 210), (300, 301)], 2),
                ("db".to_owned(), vec![(10, 20)], 3),
            ]
        );
    }
}
