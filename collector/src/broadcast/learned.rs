//! What one shard's exporters taught it since its last publish, compacted per (IP, port,
//! owner): a steady owner reporting every interval, or a busy service opening thousands of
//! overlapping connections, costs one small update per publish, not one per flow.

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
    ranges: FxHashMap<(CanonicalIp, u16, Option<WorkloadId>), Vec<Span>>,
    heartbeats: u64,
}

impl LearnedRanges {
    pub fn add(
        &mut self,
        ip: CanonicalIp,
        port: u16,
        owner: Option<WorkloadId>,
        start: Timestamp,
        end: Timestamp,
    ) {
        self.heartbeats += 1;
        let spans = self.ranges.entry((ip, port, owner)).or_default();
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
    ) -> Vec<(i32, RangeUpdateBatch)> {
        let mut by_partition: FxHashMap<i32, Vec<(RangeUpdateBatch, usize)>> = FxHashMap::default();
        let mut owners: FxHashMap<(i32, WorkloadId), u32> = FxHashMap::default();
        for ((ip, port, owner), spans) in self.ranges.drain() {
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
            let full = |(batch, size): &(RangeUpdateBatch, usize)| {
                batch.updates.len() + spans.len().div_ceil(RANGE_SPANS_MAX) > RANGE_UPDATES_MAX
                    || size + bytes > MESSAGE_BYTES_TARGET
            };
            if batches.last().is_none_or(full) {
                batches.push((
                    RangeUpdateBatch {
                        origin_node: origin,
                        workloads: Vec::new(),
                        updates: Vec::new(),
                    },
                    0,
                ));
                owners.retain(|(known, _), _| *known != partition);
            }
            let (batch, size) = batches.last_mut().expect("pushed above");
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
            }
        }
        self.heartbeats = 0;
        by_partition
            .into_iter()
            .flat_map(|(partition, batches)| {
                batches
                    .into_iter()
                    .map(move |(batch, _)| (partition, batch))
            })
            .collect()
    }
}

/// A message's size to aim below: Kafka's default `message.max.bytes` is 1 MB, and many
/// small messages spread over the partitions better than a few large ones.
const MESSAGE_BYTES_TARGET: usize = 256 << 10;

/// About what one update with `spans` costs in the archive (an IP, a port, an owner, the
/// spans' vector and its 16-byte spans).
fn archived_bytes(spans: &[Span]) -> usize {
    40 + 16 * spans.len()
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
        // One connection reporting every interval, and a separate flow after a gap.
        for end in [60, 120, 180] {
            learned.add(ip, 0, api, at(10), at(end));
        }
        learned.add(ip, 0, api, at(200), at(210));
        learned.add(ip, 0, api, at(150), at(205));
        learned.add(ip, 0, api, at(300), at(301));
        learned.add(ip, 0, db, at(10), at(20));
        learned.add(ip, 0, None, at(30), at(40));
        learned.add(ip, 0, None, at(35), at(45));
        assert_eq!(learned.heartbeats(), 9);
        let batches = learned.take(9, 4, &names);
        assert!(learned.is_empty());
        assert_eq!(batches.len(), 1, "one IP, one partition");
        let (partition, batch) = &batches[0];
        assert_eq!(*partition, partition_of(ip, 4));
        assert_eq!(batch.origin_node, 9);
        let mut updates: Vec<(String, Vec<(u64, u64)>)> = batch
            .updates
            .iter()
            .map(|update| {
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
                (owner, spans)
            })
            .collect();
        updates.sort();
        assert_eq!(batch.workloads.len(), 2, "no name for the unnamed holder");
        assert_eq!(
            updates,
            vec![
                ("(unnamed)".to_owned(), vec![(30, 45)]),
                ("api".to_owned(), vec![(10, 210), (300, 301)]),
                ("db".to_owned(), vec![(10, 20)]),
            ]
        );
    }
}
