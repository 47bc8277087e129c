//! A shard's hand-off to the sinks: whole batches of attributed flows go to sink threads
//! (glommio's blocking pool, unpinned), which encode and write them while the shard attributes
//! the next. At most `output.threads_per_shard` batches are in flight; past that the shard
//! waits for the oldest, so a slow sink slows the releases instead of growing memory.
//!
//! A released segment is deleted once all its flows are durable in every sink. For most sinks
//! that is when their writes return; Parquet rows become durable when their file is complete,
//! so such segments wait here, in order, until it is.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use glommio::task::JoinHandle;

use crate::delay::{DmaFiles, SealedSegment, remove_segment};
use crate::node_state::NodeShared;
use crate::sink::{EmittedBatch, Receipt};

pub(super) struct SinkQueue {
    node: Arc<NodeShared>,
    shard: usize,
    in_flight: VecDeque<JoinHandle<(EmittedBatch, Receipt)>>,
    /// Written batches, cleared, kept for their buffers.
    spare: Vec<EmittedBatch>,
    limit: usize,
    /// What the batches written since the last [`Self::drain`] still wait for.
    receipt: Receipt,
    /// Released segments whose flows are written but not yet durable, oldest first.
    deferred: VecDeque<(SealedSegment, Receipt)>,
}

impl SinkQueue {
    pub(super) fn new(node: Arc<NodeShared>, shard: usize) -> SinkQueue {
        let limit = node.config.output.threads_per_shard.max(1);
        SinkQueue {
            node,
            shard,
            in_flight: VecDeque::with_capacity(limit),
            spare: Vec::new(),
            limit,
            receipt: Receipt::default(),
            deferred: VecDeque::new(),
        }
    }

    /// An empty batch to fill.
    pub(super) fn batch(&mut self) -> EmittedBatch {
        self.spare.pop().unwrap_or_default()
    }

    /// Hands `batch` to a sink thread, first waiting for the oldest in flight when the limit
    /// is reached.
    pub(super) async fn send(&mut self, batch: EmittedBatch) {
        while self.in_flight.len() >= self.limit {
            self.finish_oldest().await;
        }
        let task =
            glommio::spawn_local(write_until_done(self.node.clone(), self.shard, batch)).detach();
        self.in_flight.push_back(task);
    }

    /// Waits until every batch handed over is written, and returns what they still wait for
    /// to be durable.
    pub(super) async fn drain(&mut self) -> Receipt {
        while !self.in_flight.is_empty() {
            self.finish_oldest().await;
        }
        std::mem::take(&mut self.receipt)
    }

    /// Deletes `segment` once `receipt` is durable: now, or when [`Self::retire_durable`]
    /// finds it so. Segments are deleted in the order they were released. Returns the bytes
    /// of the segments deleted now.
    pub(super) async fn retire(&mut self, segment: SealedSegment, receipt: Receipt) -> u64 {
        self.deferred.push_back((segment, receipt));
        self.retire_durable().await
    }

    /// Deletes the waiting segments whose flows have become durable, and returns their bytes.
    pub(super) async fn retire_durable(&mut self) -> u64 {
        let mut deleted = 0;
        while let Some((_, receipt)) = self.deferred.front() {
            if !self.node.sinks.is_durable(receipt) {
                break;
            }
            let (segment, _) = self.deferred.pop_front().expect("looked at above");
            deleted += segment.bytes;
            if let Err(error) = remove_segment(&DmaFiles, segment).await {
                tracing::error!(
                    "shard {}: deleting a released segment failed: {error}",
                    self.shard
                );
            }
            self.node.metrics[self.shard].segments_released.add(1);
        }
        deleted
    }

    async fn finish_oldest(&mut self) {
        let Some(task) = self.in_flight.pop_front() else {
            return;
        };
        // None only if the executor is shutting down, when nothing waits for the batch.
        if let Some((batch, receipt)) = task.await {
            self.receipt.merge(&receipt);
            if self.spare.len() < self.limit {
                self.spare.push(batch);
            }
        }
    }
}

/// Writes `batch` to every sink on a sink thread, retrying until it succeeds: the segment its
/// flows came from is kept until then.
async fn write_until_done(
    node: Arc<NodeShared>,
    shard: usize,
    mut batch: EmittedBatch,
) -> (EmittedBatch, Receipt) {
    let receipt = loop {
        let sinks = node.clone();
        let (result, returned) = glommio::executor()
            .spawn_blocking(move || {
                crate::threads::name_sink_thread();
                let result = sinks.sinks.write(&mut batch);
                (result, batch)
            })
            .await;
        batch = returned;
        match result {
            Ok(receipt) => break receipt,
            Err(error) => {
                node.metrics[shard].sink_errors.add(1);
                tracing::error!("shard {shard}: {error}; retrying");
                glommio::timer::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    batch.clear();
    (batch, receipt)
}
