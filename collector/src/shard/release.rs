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
use crate::delay::codec::{BufferedFlow, decode_block};
use crate::delay::{Lane, SealedSegment, read_segment, remove_segment};
use crate::deps::{ConnectionReport, RemoteEnd};
use crate::attribution::Decision;
use crate::ownership::Attribution;
use crate::sink::{AttributedFlow, Provenance};

impl Shard {
    pub(super) async fn release_loop(self: Rc<Self>, wake: LocalReceiver<()>) {
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
            self.release(segment).await;
        }
    }

    /// Attributes every flow of a due segment, emits them, re-buffers the ones to retry, and
    /// deletes the segment once all of that is durable.
    async fn release(&self, mut segment: SealedSegment) {
        let bytes = loop {
            match read_segment(&mut segment).await {
                Ok(bytes) => break bytes,
                Err(error) => {
                    self.metrics().write_errors.add(1);
                    eprintln!(
                        "flowattr-collector: shard {}: reading segment {} failed, retrying: {error}",
                        self.id, segment.id
                    );
                    glommio::timer::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let bytes = segment.valid(&bytes);
        let format = !self.node.sinks.is_empty();
        let mut out = Vec::with_capacity(if format { SINK_CHUNK_BYTES + 4096 } else { 0 });
        let mut retried = false;
        let mut at = 0;
        loop {
            let block = match decode_block(&bytes[at..]) {
                Ok(Some((block, used))) => {
                    at += used;
                    block
                }
                Ok(None) => break,
                Err(error) => {
                    self.metrics().corrupt_blocks.add(1);
                    eprintln!(
                        "flowattr-collector: shard {}: segment {} is corrupt at byte {at}, its remaining flows are lost: {error}",
                        self.id, segment.id
                    );
                    break;
                }
            };
            retried |= self.attribute_block(&block, format, &mut out);
            if out.len() >= SINK_CHUNK_BYTES {
                self.emit(&mut out).await;
            }
        }
        if !out.is_empty() {
            self.emit(&mut out).await;
        }
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
        if let Err(error) = remove_segment(segment).await {
            eprintln!("flowattr-collector: shard {}: deleting a released segment failed: {error}", self.id);
        }
        self.metrics().segments_released.add(1);
    }

    /// Attributes one block's flows. Returns whether any was re-buffered for retry.
    fn attribute_block(
        &self,
        block: &crate::delay::codec::Block<'_>,
        format: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        let config = &self.node.config;
        let exporter = block.header.exporter;
        let now = Timestamp::now();
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let local_ids: Vec<WorkloadId> = block
            .workloads()
            .iter()
            .map(|name| state.attributor.names.intern(name))
            .collect();
        let mut retry = Vec::new();
        // Every flow of a block has been tried the same number of times.
        let mut retries = 0;
        let metrics = &self.node.metrics[self.id];
        let decoded = block.for_each_flow(|flow| {
            retries = flow.retries;
            let (attribution, provenance) = match state.attributor.attribute(exporter, block.header.arrival, &flow) {
                Decision::Retry => {
                    retry.push(BufferedFlow {
                        retries: flow.retries + 1,
                        ..flow
                    });
                    return;
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
                local: flow.local_workload.map(|index| local_ids[index as usize]),
                remote,
            });
            if format {
                let local_name = flow
                    .local_workload
                    .map(|index| block.workloads()[index as usize]);
                let remote_name = match remote {
                    RemoteEnd::Workload(owner) => Ok((state.attributor.names.name(owner).unwrap_or("?"), provenance)),
                    RemoteEnd::Unattributed(reason) => Err(reason),
                };
                AttributedFlow::new(&block.header, &flow, local_name, remote_name)
                    .write_json_line(out);
            }
        });
        let due = block.header.arrival.saturating_add(config.delay.delay + config.delay.retry_delay * u32::from(retries));
        let _ = state
            .extra_latency
            .record_n(now.nanos_since(due) / 1_000_000, u64::from(block.flow_count()));
        if let Err(error) = decoded {
            metrics.corrupt_blocks.add(1);
            eprintln!(
                "flowattr-collector: shard {}: a buffered block is corrupt, its remaining flows are lost: {error}",
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

    /// Writes `out` to every sink, retrying until it succeeds: the segment its flows came
    /// from is kept until then.
    async fn emit(&self, out: &mut Vec<u8>) {
        let mut chunk = std::mem::take(out);
        loop {
            let sinks = self.node.clone();
            let (result, returned) = glommio::executor()
                .spawn_blocking(move || {
                    let result = sinks.sinks.write_chunk(&chunk);
                    (result, chunk)
                })
                .await;
            chunk = returned;
            match result {
                Ok(()) => break,
                Err(error) => {
                    self.metrics().sink_errors.add(1);
                    eprintln!("flowattr-collector: shard {}: {error}; retrying", self.id);
                    glommio::timer::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        chunk.clear();
        *out = chunk;
    }
}

/// Output is handed to the sinks in chunks of about this size.
const SINK_CHUNK_BYTES: usize = 1 << 20;
