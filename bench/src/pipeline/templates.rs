//! The batches the load generator sends, archived once before the run. Two shapes:
//!
//! - **host** (the default): each batch is one host's, as an exporter sends it. The fleet is
//!   `--templates` hosts of 30 pods each, every pod one workload serving one port; every
//!   connection goes from a pod of one host to a pod of another and is reported by both ends,
//!   so each batch holds its host's outbound calls (ephemeral local port, the callee's service
//!   port) and inbound ones (to its pods' service ports), in the order they closed, with
//!   durations and bytes log-normal. What repeats in a batch is what a host repeats, so bytes
//!   per flow on the wire and on disk are what a fleet's would be.
//! - **random**: flows between any two of `--ips` addresses, each batch a mix of all of them:
//!   nothing repeats, so the ownership map is large (the memory-bound case) and every byte
//!   figure is a worst case.

use std::time::Duration;

use flowattr_common::Timestamp;
use flowattr_common::wire::{
    ArchivedMeasuredFlowBatch, ExporterId, FlowBatch, MeasuredFlowBatch, RecordArray,
    measured_batch_arrays,
};

use super::PipelineArgs;
use crate::synthetic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BatchShape {
    Host,
    Random,
}

/// One batch, archived once; each send patches in a fresh sequence number and moves its
/// flows' times as late as the time since it was made, then re-frames it.
pub(super) struct Template {
    pub payload: Vec<u8>,
    pub sequence_at: usize,
    /// Where each flow's start and end (u64 nanoseconds, little-endian) sit in `payload`.
    pub times_at: Vec<usize>,
    /// Its record arrays, for compressed frames (a patch moves none of them).
    pub arrays: Vec<RecordArray>,
    pub flows: usize,
}

impl Template {
    /// Writes into `payload` this batch as sent `shift` after it was made, as number
    /// `sequence`: every flow exactly as old at the send as it was when made, so that the
    /// evidence moves forward in time as a fleet's does (a batch sent again with the same
    /// times would pile evidence on one minute).
    pub fn patch(&self, payload: &mut Vec<u8>, sequence: u64, shift: Duration) {
        payload.clear();
        payload.extend_from_slice(&self.payload);
        payload[self.sequence_at..self.sequence_at + 8].copy_from_slice(&sequence.to_le_bytes());
        let shift = shift.as_nanos() as u64;
        for &at in &self.times_at {
            let time = u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
            payload[at..at + 8].copy_from_slice(&(time + shift).to_le_bytes());
        }
    }
}

/// A value no real field of a template batch holds: where it lands in the archive is where
/// the sequence lives.
const SEQUENCE_MARKER: u64 = 0x5EC0_ED5E_C0ED_5EC0;

pub(super) fn templates(args: &PipelineArgs, now: Timestamp) -> anyhow::Result<Vec<Template>> {
    let mut rng = fastrand::Rng::with_seed(42);
    let workloads = synthetic::workload_identities();
    let batches = match args.shape {
        BatchShape::Host => synthetic::host_batches(
            args.templates.max(2) as u32,
            args.batch_flows,
            now,
            &mut rng,
        ),
        BatchShape::Random => (0..args.templates.max(1))
            .map(|_| {
                synthetic::random_batch(
                    args.ips,
                    args.batch_flows,
                    now,
                    &mut rng,
                    workloads.len() as u32,
                )
            })
            .collect(),
    };
    batches
        .into_iter()
        .enumerate()
        .map(|(host, (flows, round_trips))| {
            let batch = MeasuredFlowBatch {
                host: Some(format!(
                    "ip-10-64-{}-{}.ec2.internal",
                    host / 256,
                    host % 256
                )),
                clock: None,
                batch: FlowBatch {
                    exporter: ExporterId(host as u64 + 1),
                    sequence: SEQUENCE_MARKER,
                    region: "bench".into(),
                    workloads: workloads.clone(),
                    flows,
                },
                round_trips,
            };
            archive(batch)
        })
        .collect()
}

fn archive(batch: MeasuredFlowBatch) -> anyhow::Result<Template> {
    let flows = batch.batch.flows.len();
    let archived = rkyv::to_bytes::<rkyv::rancor::Error>(&batch)?;
    let view = rkyv::access::<ArchivedMeasuredFlowBatch, rkyv::rancor::Error>(&archived)?;
    let base = archived.as_ptr().addr();
    let mut times_at = Vec::with_capacity(2 * flows);
    for (record, flow) in view.batch.flows.iter().zip(&batch.batch.flows) {
        for (archived_time, time) in [(&record.start, flow.start), (&record.end, flow.end)] {
            let at = std::ptr::from_ref(archived_time).addr() - base;
            anyhow::ensure!(
                archived[at..at + 8] == time.as_nanos().to_le_bytes(),
                "a flow time is not a little-endian u64 in the archive"
            );
            times_at.push(at);
        }
    }
    let payload = archived.to_vec();
    let marker = SEQUENCE_MARKER.to_le_bytes();
    let positions: Vec<usize> = payload
        .windows(8)
        .enumerate()
        .filter(|(_, window)| *window == marker)
        .map(|(at, _)| at)
        .collect();
    let [sequence_at] = positions[..] else {
        anyhow::bail!(
            "the sequence marker appears {} times in the archive",
            positions.len()
        );
    };
    let arrays = measured_batch_arrays(&payload)?;
    Ok(Template {
        payload,
        sequence_at,
        times_at,
        arrays,
        flows,
    })
}
