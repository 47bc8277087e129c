//! The release side: due segments are read back, their flows attributed and emitted, the
//! ones still without evidence re-buffered for retry, and the segment deleted once all of
//! that is durable.

use std::rc::Rc;
use std::time::Duration;

use flowattr_common::{Timestamp, WorkloadId};
use futures_lite::future;
use glommio::channels::local_channel::LocalReceiver;

use super::Shard;
use super::acks::Completion;
use super::output::SinkQueue;
use crate::attribution::{Decision, prefetch_ahead};
use crate::delay::codec::{Blocks, BufferedFlow};
use crate::delay::{DmaFiles, Lane, SealedSegment, read_segment};
use crate::deps::{ConnectionReport, RemoteEnd};
use crate::ownership::Attribution;
use crate::sink::{EmittedBatch, Provenance};

impl Shard {
    pub(super) async fn release_loop(self: Rc<Self>, wake: LocalReceiver<()>) {
        let mut output = SinkQueue::new(self.node.clone(), self.id);
        loop {
            let (ready, due, next) = {
                let mut state = self.state.borrow_mut();
                let ready = state.ready_to_release(self.router.shards());
                let due = if ready {
                    state.buffer.take_due(Timestamp::now())
                } else {
                    None
                };
                (ready, due, state.buffer.next_due())
            };
            let deleted = output.retire_durable().await;
            self.state.borrow_mut().buffer.deleted(deleted);
            let Some(segment) = due else {
                let wait = match (ready, next) {
                    (true, Some(next)) => Duration::from_nanos(next.nanos_since(Timestamp::now()))
                        .min(Duration::from_millis(100)),
                    _ => Duration::from_millis(100),
                };
                future::or(async { wake.recv().await.is_some() }, async {
                    glommio::timer::sleep(wait).await;
                    true
                })
                .await;
                continue;
            };
            self.release(segment, &mut output).await;
        }
    }

    /// Attributes every flow of a due segment, emits them, re-buffers the ones to retry, and
    /// deletes the segment once all of that is durable.
    async fn release(&self, mut segment: SealedSegment, output: &mut SinkQueue) {
        let bytes = loop {
            match read_segment(&DmaFiles, &mut segment).await {
                Ok(bytes) => break bytes,
                Err(error) => {
                    self.metrics().write_errors.add(1);
                    tracing::error!(
                        "shard {}: reading segment {} failed, retrying: {error}",
                        self.id,
                        segment.id
                    );
                    glommio::timer::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let bytes = segment.valid(&bytes);
        let emit = !self.node.sinks.is_empty();
        let batch_flows = self.node.config.output.batch_flows;
        let mut batch = output.batch();
        let mut retried = false;
        for read in Blocks::new(bytes) {
            let block = match read {
                Ok(block) => block,
                Err(damage) => {
                    // Counted here, where a segment is read for the last time; the replay at
                    // start only steps over it.
                    self.metrics().corrupt_blocks.add(1);
                    tracing::error!(
                        "shard {}: segment {} is damaged at byte {} ({} bytes, {}): the flows there are lost, {}",
                        self.id,
                        segment.id,
                        damage.at,
                        damage.bytes,
                        damage.reason(),
                        if damage.to_end {
                            "and nothing intact follows"
                        } else {
                            "the blocks after it are read"
                        },
                    );
                    continue;
                }
            };
            retried |= self.attribute_block(&block, emit.then_some(&mut batch));
            if batch.len() >= batch_flows {
                let full = std::mem::replace(&mut batch, output.batch());
                output.send(full).await;
            }
        }
        if !batch.is_empty() {
            output.send(batch).await;
        }
        // The segment goes only once every flow of it is in the sinks.
        let receipt = output.drain().await;
        if retried {
            // The retried flows must be durable in the retry lane before their only other
            // copy, this segment, goes.
            let done = Rc::new(std::cell::Cell::new(false));
            self.state
                .borrow_mut()
                .buffer
                .complete_when_durable(Lane::Retry, Completion::Local(done.clone()));
            Self::wake(&self.writer_wake);
            while !done.get() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
        let deleted = output.retire(segment, receipt).await;
        self.state.borrow_mut().buffer.deleted(deleted);
    }

    /// Attributes one block's flows, adding them to `batch` when sinks want them. Returns
    /// whether any was re-buffered for retry.
    fn attribute_block(
        &self,
        block: &crate::delay::codec::Block<'_>,
        mut batch: Option<&mut EmittedBatch>,
    ) -> bool {
        let config = &self.node.config;
        let host = block.header.host();
        let now = Timestamp::now();
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        if let Some(events) = &self.node.events {
            let through = events
                .complete_through_ns
                .load(std::sync::atomic::Ordering::Relaxed);
            state
                .attributor
                .set_events_complete_through(Timestamp::from_nanos(through));
        }
        let local_ids: Vec<WorkloadId> = block
            .workloads()
            .iter()
            .map(|name| state.attributor.names.intern(name))
            .collect();
        // Each entry of the block's dictionary enters the emitted batch once, when a flow first
        // names its local side with it.
        let mut local_identities: Vec<Option<u32>> = vec![None; local_ids.len()];
        let mut retry = Vec::new();
        // Every flow of a block has been tried the same number of times.
        let mut retries = 0;
        let metrics = &self.node.metrics[self.id];
        // Decoded first, so that each flow's lookup can be prepared several flows ahead.
        let mut flows = std::mem::take(&mut state.decoded);
        flows.clear();
        let decoded = block.for_each_flow(|flow| flows.push(flow));
        for (at, &flow) in flows.iter().enumerate() {
            prefetch_ahead(&flows, at, |flow, stage| {
                state
                    .attributor
                    .prefetch(flow.remote_ip, flow.remote_port, stage)
            });
            retries = flow.retries;
            let (attribution, provenance) =
                match state
                    .attributor
                    .attribute(host, block.header.arrival, &flow)
                {
                    Decision::Retry => {
                        retry.push(BufferedFlow {
                            retries: flow.retries + 1,
                            ..flow
                        });
                        continue;
                    }
                    Decision::Emit(attribution, provenance) => (attribution, provenance),
                };
            let remote = match attribution {
                Attribution::Owner(owner) => {
                    metrics.flows_attributed.add(1);
                    if provenance == Provenance::Event {
                        metrics.flows_attributed_by_events.add(1);
                    }
                    RemoteEnd::Workload(owner)
                }
                Attribution::Unattributed(reason) => {
                    metrics.unattributed(reason).add(1);
                    RemoteEnd::Unattributed(reason)
                }
            };
            let local = flow.local_workload.map(|index| local_ids[index as usize]);
            state.deps.record(&ConnectionReport {
                local_ip: flow.local_ip,
                local_port: flow.local_port,
                remote_ip: flow.remote_ip,
                remote_port: flow.remote_port,
                start: flow.start,
                end: flow.end,
                state: flow.state,
                direction: flow.direction,
                bytes: flow.bytes_sent + flow.bytes_received,
                local,
                remote,
            });
            if let Some(batch) = batch.as_deref_mut() {
                let remote = match remote {
                    RemoteEnd::Workload(owner) => Ok((owner, provenance)),
                    RemoteEnd::Unattributed(reason) => Err(reason),
                };
                let local = flow.local_workload.map(|index| {
                    *local_identities[index as usize].get_or_insert_with(|| {
                        batch.add_identity(block.workloads()[index as usize])
                    })
                });
                batch.push(&block.header, &flow, local, remote, &state.attributor.names);
            }
        }
        state.decoded = flows;
        let due = block
            .header
            .arrival
            .saturating_add(config.delay.delay + config.delay.retry_delay * u32::from(retries));
        // The flows emitted, each once: a retried one counts when it is emitted.
        let emitted = (state.decoded.len() - retry.len()) as u64;
        crate::metrics::record_milliseconds(
            &mut state.extra_latency,
            now.nanos_since(due) / 1_000_000,
            emitted,
        );
        if let Err(error) = decoded {
            metrics.corrupt_blocks.add(1);
            tracing::error!(
                "shard {}: a buffered block is corrupt, its remaining flows are lost: {error}",
                self.id
            );
        }
        if retry.is_empty() {
            return false;
        }
        metrics.flows_retried.add(retry.len() as u64);
        // The header keeps the first arrival: it fixes each flow's lookup instant, whichever
        // attempt makes the lookup.
        state
            .buffer
            .append(Lane::Retry, &block.header, block.workloads(), &retry);
        true
    }
}
