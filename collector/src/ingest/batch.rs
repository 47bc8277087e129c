//! One intact flow-batch frame, read: refused whole when its content cannot be stored, or
//! checked record by record at the evidence gate and split by destination shard.

use flowattr_common::Timestamp;
use flowattr_common::wire::{
    Ack, AckStatus, BatchRefusal, ExporterId, Frame, RefusedRecord, ValidFlowBatch,
    access_flow_batch, refusal_summary,
};

use crate::delay::codec::BlockHeader;
use crate::metrics::Rejection;
use crate::shard::{AckDetails, ConnectionHandle, Dictionary, Shard, SplitBatch};
use crate::tls::ClaimSet;

/// Reads one flow-batch frame (expanded first if it came compressed, within `payload_limit`):
/// what to dispatch to the shards, or None when it was refused whole (and answered here).
pub(super) fn read_batch(
    shard: &Shard,
    connection: &ConnectionHandle,
    frame: Frame<'_>,
    (payload_limit, claims): (usize, Option<&ClaimSet>),
    arrival: Timestamp,
    max_skew_ns: u64,
) -> Option<(BlockHeader, Dictionary, SplitBatch, AckDetails)> {
    let mut expander = shard.expander.borrow_mut();
    let expanded = expander.expand(frame, payload_limit);
    // A frame that does not expand is refused under its own name (its checksum).
    let readable = expanded.as_ref().copied().unwrap_or(frame);
    let batch = expanded
        .and_then(|expanded| ValidFlowBatch::from_frame(&expanded))
        .map_err(|error| (error.batch_refusal(), error.to_string()))
        .and_then(|batch| Ok((sender_of(&batch, claims)?, batch)));
    match batch {
        Ok((sender, batch)) => {
            let mut refused = Vec::new();
            let (header, workloads, split) = split_batch(
                shard,
                &batch,
                (sender, frame.checksum),
                arrival,
                claims,
                &mut refused,
            );
            let details = AckDetails {
                frame_checksum: frame.checksum,
                refused,
                collector_time: arrival,
                max_skew_ns,
            };
            Some((header, workloads, split, details))
        }
        Err((refusal, why)) => {
            refuse_batch(
                shard,
                connection,
                &readable,
                arrival,
                max_skew_ns,
                (refusal, &why),
            );
            None
        }
    }
}

/// Answers a batch whose content cannot be stored at all. Its exporter and sequence are read
/// only if the archive itself is valid; the frame checksum names it either way.
fn refuse_batch(
    shard: &Shard,
    connection: &ConnectionHandle,
    frame: &Frame<'_>,
    arrival: Timestamp,
    max_skew_ns: u64,
    (refusal, error): (BatchRefusal, &dyn std::fmt::Display),
) {
    let (exporter, sequence) = access_flow_batch(frame).map_or((0, 0), |parts| {
        (
            parts.batch.exporter.0.to_native(),
            parts.batch.sequence.to_native(),
        )
    });
    shard.metrics().reject(Rejection::Payload);
    shard.metrics().batches_refused.add(1);
    tracing::warn!(
        "shard {}: refused batch {sequence} of exporter {exporter}: {error}",
        shard.id
    );
    connection.answer_now(Ack {
        exporter: ExporterId(exporter),
        sequence,
        frame_checksum: frame.checksum,
        status: AckStatus::Refused(refusal),
        refused: Vec::new(),
        collector_time: arrival,
        max_skew_ns,
    });
}

/// Who vouches for `batch`: its exporter on plain TCP (nothing is authenticated there); under
/// mutual TLS the client, which must send under the id its certificate gives it unless it is a
/// relay. The error refuses the batch whole.
fn sender_of(
    batch: &ValidFlowBatch<'_>,
    claims: Option<&ClaimSet>,
) -> Result<u64, (BatchRefusal, String)> {
    let exporter = ExporterId(batch.exporter.0.to_native());
    let Some(claims) = claims else {
        return Ok(exporter.0);
    };
    claims.sender_for(exporter).ok_or_else(|| {
        (
            BatchRefusal::ExporterNotCertified,
            format!(
                "sent under exporter id {} by {}, whose certificate gives it id {}",
                exporter.0, claims.identity, claims.id.0
            ),
        )
    })
}

/// Copies the admitted records of a validated batch out of the receive buffer, split by
/// destination shard; the others go to `refused`, counted for their exporter. `sender` vouched
/// for the batch, which came in the frame whose checksum is `frame_checksum`.
fn split_batch(
    shard: &Shard,
    batch: &ValidFlowBatch<'_>,
    (sender, frame_checksum): (u64, u32),
    arrival: Timestamp,
    claims: Option<&ClaimSet>,
    refused: &mut Vec<RefusedRecord>,
) -> (BlockHeader, Dictionary, SplitBatch) {
    let mut header = BlockHeader {
        exporter: batch.exporter.0.to_native(),
        sequence: batch.sequence.to_native(),
        arrival,
        sender,
        frame_checksum,
        refused: None,
        host_name: batch.host().map(std::sync::Arc::from),
    };
    let workloads: Dictionary = batch
        .workloads
        .iter()
        .map(|name| Box::from(name.as_str()))
        .collect();
    if let Some(clock) = batch.clock() {
        shard
            .metrics()
            .clocks
            .record(header.exporter, clock, arrival);
    }
    let mut split = SplitBatch::new(shard.router.shards(), batch.flows.len());
    // The shard's one gate: the executor runs one connection's batch at a time, and its scratch
    // table is bounded by one batch, however many connections there are.
    let regions = shard
        .node
        .forwarding
        .as_ref()
        .map(|forwarding| &forwarding.table);
    shard
        .gate
        .borrow_mut()
        .check_batch(batch, arrival, claims, refused, |_, flow| {
            match regions.and_then(|table| table.elsewhere(flow.remote_ip)) {
                Some(region) => split.add_forwarded(&shard.router, header.exporter, region, flow),
                None => split.add(&shard.router, header.exporter, flow),
            }
        });
    if !refused.is_empty() {
        // The gate refuses in record order, each record once.
        header.refused = Some(refused.iter().map(|refusal| refusal.record).collect());
        shard
            .metrics()
            .records_refused
            .add(header.exporter, refused);
        tracing::warn!(
            "shard {}: refused {} of the {} records of batch {} of exporter {} ({})",
            shard.id,
            refused.len(),
            batch.flows.len(),
            header.sequence,
            header.exporter,
            refusal_summary(refused)
        );
    }
    (header, workloads, split)
}
