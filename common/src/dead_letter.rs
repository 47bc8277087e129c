//! Where a sender puts what its receiver refused (an exporter what its collector refused, a
//! collector what another region's refused), so it never blocks the queue and is never
//! silently lost. A batch refused whole (its payload unreadable, over a limit) is kept as
//! the frame it was sent as, `batch-<sequence>.frame`; records refused one by one (a clock
//! running ahead, a bad name) are appended to `records.jsonl`, one JSON object per record with
//! its reason. Bounded in bytes: past the bound, what would be written is counted instead.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::wire::{
    BatchRefusal, FrameDecoder, FrameExpander, MeasuredFlowBatch, RefusedRecord, ValidFlowBatch,
};
use crate::{Direction, FlowState};

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead letters {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dead letters {path}: over the bound of {bytes_max} bytes; {what} not kept")]
    Full {
        path: PathBuf,
        bytes_max: u64,
        what: String,
    },
}

#[derive(Debug)]
pub struct DeadLetters {
    dir: PathBuf,
    bytes_max: u64,
    bytes: u64,
}

impl DeadLetters {
    pub fn open(dir: &Path, bytes_max: u64) -> Result<DeadLetters, DeadLetterError> {
        let io = |source| DeadLetterError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut bytes = 0;
        for entry in std::fs::read_dir(dir).map_err(io)? {
            bytes += entry.map_err(io)?.metadata().map_err(io)?.len();
        }
        Ok(DeadLetters {
            dir: dir.to_owned(),
            bytes_max,
            bytes,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn reserve(
        &mut self,
        bytes: u64,
        what: impl FnOnce() -> String,
    ) -> Result<(), DeadLetterError> {
        if self.bytes + bytes > self.bytes_max {
            return Err(DeadLetterError::Full {
                path: self.dir.clone(),
                bytes_max: self.bytes_max,
                what: what(),
            });
        }
        self.bytes += bytes;
        Ok(())
    }

    /// Keeps a batch the collector refused whole, as the frame it was sent as.
    pub fn keep_batch(
        &mut self,
        sequence: u64,
        refusal: BatchRefusal,
        frame: &[u8],
    ) -> Result<PathBuf, DeadLetterError> {
        self.reserve(frame.len() as u64, || {
            format!("batch {sequence} ({})", refusal.as_str())
        })?;
        let path = self
            .dir
            .join(format!("batch-{sequence}-{}.frame", refusal.as_str()));
        std::fs::write(&path, frame).map_err(|source| DeadLetterError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Appends the records of `frame` (a batch this sender encoded or checked) that the
    /// receiver refused, each with its reason.
    pub fn keep_records(
        &mut self,
        frame: &[u8],
        refused: &[RefusedRecord],
    ) -> Result<(), DeadLetterError> {
        let path = self.dir.join("records.jsonl");
        let io = |source| DeadLetterError::Io {
            path: path.clone(),
            source,
        };
        let batch = own_batch(frame).map_err(|reason| io(std::io::Error::other(reason)))?;
        let mut lines = Vec::new();
        for refusal in refused {
            let mut line = flow_json(&batch, refusal.record as usize);
            line["refused"] = refusal.reason.as_str().into();
            serde_json::to_writer(&mut lines, &line).map_err(|error| io(error.into()))?;
            lines.push(b'\n');
        }
        self.reserve(lines.len() as u64, || {
            format!(
                "{} refused records of batch {}",
                refused.len(),
                batch.batch.sequence
            )
        })?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        file.write_all(&lines).map_err(io)
    }
}

/// Decodes a frame this sender encoded or checked itself, compressed or plain.
fn own_batch(frame: &[u8]) -> Result<MeasuredFlowBatch, String> {
    let decoder = FrameDecoder::default();
    let (frame, _) = decoder
        .decode(frame)
        .map_err(|error| error.to_string())?
        .ok_or("a frame cut short")?;
    let mut expander = FrameExpander::new().map_err(|error| error.to_string())?;
    expander
        .expand(frame, decoder.payload_bytes_max())
        .and_then(|frame| ValidFlowBatch::from_frame(&frame)?.to_owned_measured())
        .map_err(|error| error.to_string())
}

/// One record of `batch` as a JSON object: what `--dump` prints and dead letters keep.
pub fn flow_json(measured: &MeasuredFlowBatch, index: usize) -> serde_json::Value {
    let batch = &measured.batch;
    let round_trip = measured.round_trips.get(index).copied().flatten();
    let Some(flow) = batch.flows.get(index) else {
        return serde_json::json!({ "exporter": batch.exporter.0, "sequence": batch.sequence, "index": index });
    };
    let local = flow
        .local_workload
        .and_then(|index| batch.workloads.get(index.0 as usize))
        .map(|key| crate::WorkloadIdentity::of_checked_key(key));
    serde_json::json!({
        "exporter": batch.exporter.0,
        "sequence": batch.sequence,
        "index": index,
        "local_ip": flow.local_ip.to_string(),
        "local_port": flow.local_port,
        "remote_ip": flow.remote_ip.to_string(),
        "remote_port": flow.remote_port,
        "direction": if flow.direction == Direction::Inbound { "inbound" } else { "outbound" },
        "state": if flow.state == FlowState::Open { "open" } else { "closed" },
        "start_ns": flow.start.as_nanos(),
        "end_ns": flow.end.as_nanos(),
        "bytes_sent": flow.bytes_sent,
        "bytes_received": flow.bytes_received,
        "segments_sent": flow.segments_sent,
        "segments_received": flow.segments_received,
        "retransmits": flow.retransmits,
        "rtt_us": round_trip.map(|trip| trip.smoothed_us),
        "rtt_deviation_us": round_trip.map(|trip| trip.deviation_us),
        "local_workload": local.map(|identity| identity.name),
        "local_namespace": local.map(|identity| identity.namespace).filter(|field| !field.is_empty()),
        "local_instance": local.map(|identity| identity.instance).filter(|field| !field.is_empty()),
        "local_owner_kind": local.map(|identity| identity.owner_kind).filter(|field| !field.is_empty()),
    })
}
