//! The shard's side of forwarding: a batch's flows for another region become one batch of
//! their own, with the exporter's id and sequence, made durable in that region's spool (off the
//! executor) before they count as a durable part of the batch for its ack.

use flowattr_common::wire::{
    AckStatus, FlowBatch, FlowRecord, MeasuredFlowBatch, WorkloadIndex, encode_message,
};

use super::{Dictionary, Shard};
use crate::delay::codec::{BlockHeader, BufferedFlow};

impl Shard {
    pub(super) async fn spool_forwarded(
        &self,
        ticket: u64,
        header: &BlockHeader,
        workloads: &Dictionary,
        region: usize,
        flows: Vec<BufferedFlow>,
    ) {
        let Some(forwarding) = self.node.forwarding.as_ref() else {
            return;
        };
        let batch = MeasuredFlowBatch {
            host: header.host_name.as_deref().map(str::to_owned),
            clock: None,
            batch: FlowBatch {
                exporter: flowattr_common::wire::ExporterId(header.exporter),
                sequence: header.sequence,
                region: self.node.config.node.region.clone().unwrap_or_default(),
                workloads: workloads.iter().map(|name| name.to_string()).collect(),
                flows: flows.iter().map(record).collect(),
            },
            round_trips: flows.iter().map(|flow| flow.round_trip).collect(),
        };
        let mut frame = Vec::new();
        if let Err(error) = encode_message(&batch, &mut frame) {
            // Every part fits: a batch part is at most one batch, whose frame already fitted.
            tracing::error!("shard {}: encoding a forwarded part: {error}", self.id);
            return;
        }
        let spool = forwarding.spools[region].clone();
        let status = forwarding.status.clone();
        let frame = std::sync::Arc::new(frame);
        loop {
            let (spool, frame, header) = (spool.clone(), frame.clone(), header.clone());
            let written = glommio::executor()
                .spawn_blocking(move || {
                    crate::threads::name_sink_thread();
                    spool.write(&header, &frame)
                })
                .await;
            match written {
                Ok(()) => break,
                Err(error) => {
                    // A full disk: no ack until it is written, as for the delay buffer.
                    self.metrics().write_errors.add(1);
                    tracing::error!(
                        "shard {}: spooling flows for another region failed, not acking until it succeeds: {error}",
                        self.id
                    );
                    glommio::timer::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
        status
            .batches_spooled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.finish_part(ticket, AckStatus::Accepted);
    }
}

/// A buffered flow back into the record its exporter sent.
fn record(flow: &BufferedFlow) -> FlowRecord {
    FlowRecord {
        local_ip: flow.local_ip,
        remote_ip: flow.remote_ip,
        local_port: flow.local_port,
        remote_port: flow.remote_port,
        local_workload: flow.local_workload.map(WorkloadIndex),
        local_shared: flow.local_shared,
        start: flow.start,
        end: flow.end,
        bytes_sent: flow.bytes_sent,
        bytes_received: flow.bytes_received,
        segments_sent: flow.segments_sent,
        segments_received: flow.segments_received,
        retransmits: flow.retransmits,
        direction: flow.direction,
        state: flow.state,
    }
}
