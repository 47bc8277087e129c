//! The write side: heartbeats into the map, flows into the delay buffer, the buffer onto
//! disk, and at start-up the replay of what a previous run left there.

use std::rc::Rc;
use std::time::Duration;

use flowattr_common::Timestamp;
use flowattr_common::wire::AckStatus;
use futures_lite::future;
use glommio::channels::local_channel::LocalReceiver;

use std::borrow::Cow;

use super::acks::Completion;
use super::duplicates::NewRecords;
use super::{BeatRecord, DataMessage, Dictionary, FlowPart, Shard, SplitBatch};
use crate::attribution::prefetch_ahead;
use crate::delay::{
    DmaFiles, Lane, Repair, SegmentIds, SegmentWriter, Storage, read_segment, recover_segments,
    scan_recovered,
};
use crate::ownership::{DictionaryIds, Host, InsertOutcome, Source};

impl Shard {
    pub(super) async fn handle_data(&self, message: DataMessage) {
        self.metrics().inbox_handled.add(1);
        match message {
            DataMessage::Heartbeats {
                host,
                workloads,
                beats,
            } => self.apply_heartbeats(host, &workloads, &beats),
            DataMessage::Flows(part) => {
                // Backpressure: while the writer or the release is behind, stop taking flows;
                // the mesh queue fills, senders wait, and ingest stops reading sockets. Taking
                // more than the shard can release would only grow the buffer without bound.
                while self.behind() {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                self.buffer_part(part);
            }
            DataMessage::ReplayDone => {
                let mut state = self.state.borrow_mut();
                state.replay_done += 1;
                if state.replay_done == self.router.shards() {
                    Self::wake(&self.release_wake);
                }
            }
        }
    }

    /// True while the writer has more than `max_unwritten_bytes` to write, the buffer is at
    /// its share of `max_buffer_bytes`, or a segment has been due for longer than
    /// [`RELEASE_LAG_MAX`] without being released.
    fn behind(&self) -> bool {
        let state = self.state.borrow();
        let config = &self.node.config.delay;
        if state.buffer.unwritten_bytes() > config.max_unwritten_bytes {
            return true;
        }
        // The write in flight is not in `total_bytes`, and is at most `max_unwritten_bytes`.
        let share = config.max_buffer_bytes / self.router.shards() as u64;
        if state.buffer.total_bytes() + config.max_unwritten_bytes as u64 >= share {
            return true;
        }
        state.ready_to_release(self.router.shards())
            && state.buffer.next_due().is_some_and(|due| {
                Timestamp::now().nanos_since(due) > RELEASE_LAG_MAX.as_nanos() as u64
            })
    }

    /// Stores heartbeats `host` reported: about fleet addresses in the map every host's flows
    /// are attributed from, about host-local ones in that host's own evidence.
    fn apply_heartbeats(&self, host: Host, workloads: &[Box<str>], beats: &[BeatRecord]) {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let mut ids = DictionaryIds::new(workloads);
        let (mut applied, mut expired) = (0, 0);
        let source = state.sources.heard(
            Source::Exporter {
                exporter: host.exporter,
                sender: host.sender,
            },
            Timestamp::now(),
        );
        for (at, beat) in beats.iter().enumerate() {
            prefetch_ahead(beats, at, |beat, stage| {
                state.attributor.prefetch(beat.ip, beat.port, stage)
            });
            let owner = ids.id(&mut state.attributor.names, beat.workload);
            let heartbeat = beat.heartbeat(owner, source);
            if !beat.ip.is_host_local()
                && let Some(learned) = state.learned.as_mut()
            {
                learned.add(
                    beat.ip,
                    beat.port,
                    owner,
                    (beat.start, beat.end),
                    host.exporter,
                );
            }
            match state.attributor.learn(host, heartbeat, beat.shared) {
                Ok(InsertOutcome::Expired) => expired += 1,
                Ok(_) => applied += 1,
                // Validated at ingest (end >= start); a replayed block could only get here
                // corrupted past its checksum.
                Err(_) => expired += 1,
            }
        }
        self.metrics().heartbeats_applied.add(applied);
        self.metrics().heartbeats_expired.add(expired);
    }

    fn buffer_part(&self, part: FlowPart) {
        let mut state = self.state.borrow_mut();
        let now = Timestamp::now();
        let admitted = state.seen.admit(&part.header, now);
        let new = match admitted {
            NewRecords::All => Cow::Borrowed(&part.flows[..]),
            _ => part
                .flows
                .iter()
                .filter(|flow| admitted.includes(flow.index))
                .copied()
                .collect(),
        };
        let status = if new.is_empty() {
            AckStatus::Duplicate
        } else {
            state
                .buffer
                .append(Lane::Fresh, &part.header, &part.workloads, &new);
            AckStatus::Accepted
        };
        // A duplicate is acked only once the original's bytes are durable too: the next write
        // covers everything appended before it.
        state.buffer.complete_when_durable(
            Lane::Fresh,
            Completion::Part {
                origin: part.origin,
                ticket: part.ticket,
                status,
            },
        );
        self.metrics()
            .unwritten_bytes
            .set(state.buffer.unwritten_bytes() as u64);
        drop(state);
        Self::wake(&self.writer_wake);
    }

    // ---- writer ------------------------------------------------------------------------------

    pub(super) async fn write_loop(
        self: Rc<Self>,
        wake: LocalReceiver<()>,
        highest_id: Option<u64>,
    ) {
        let storage = self.storage();
        let span = self.node.config.delay.segment_span;
        let mut writers =
            Lane::ALL.map(|lane| SegmentWriter::new(lane, storage.clone(), span, DmaFiles));
        let mut ids = SegmentIds::starting_after(highest_id);
        loop {
            let next_seal = writers.iter().filter_map(SegmentWriter::seal_due).min();
            let wait = next_seal.map_or(Duration::from_millis(100), |due| {
                Duration::from_nanos(due.nanos_since(Timestamp::now()))
                    .min(Duration::from_millis(100))
            });
            future::or(async { wake.recv().await.is_some() }, async {
                glommio::timer::sleep(wait).await;
                true
            })
            .await;
            for writer in &mut writers {
                self.write_lane(writer, &mut ids).await;
            }
            let open: u64 = writers.iter().map(SegmentWriter::open_flows).sum();
            let mut state = self.state.borrow_mut();
            state
                .buffer
                .set_open_bytes(writers.iter().map(SegmentWriter::open_bytes).sum());
            self.metrics()
                .buffered_flows
                .set(state.buffer.sealed_flows() + open);
            self.metrics()
                .buffered_bytes
                .set(state.buffer.total_bytes());
        }
    }

    async fn write_lane(&self, writer: &mut SegmentWriter<DmaFiles>, ids: &mut SegmentIds) {
        let lane = writer.lane();
        let unwritten = self.state.borrow_mut().buffer.take_unwritten(lane);
        if !unwritten.is_empty() {
            let mut failing = false;
            while let Err(error) = writer
                .write(&unwritten.bytes, unwritten.flows, Timestamp::now(), ids)
                .await
            {
                // A full disk or an I/O error: keep the bytes, stop acking (the exporters keep
                // their batches), and try again. Nothing acked is ever dropped.
                self.metrics().write_errors.add(1);
                if !failing {
                    tracing::error!(
                        "shard {}: delay buffer write failed, not acking until it succeeds: {error}",
                        self.id
                    );
                    failing = true;
                    self.metrics().storage_failing.set(1);
                }
                glommio::timer::sleep(Duration::from_secs(1)).await;
            }
            if failing {
                tracing::info!("shard {}: delay buffer writes recovered", self.id);
                self.metrics().storage_failing.set(0);
            }
            self.metrics()
                .bytes_written
                .add(unwritten.bytes.len() as u64);
            self.metrics()
                .unwritten_bytes
                .set(self.state.borrow().buffer.unwritten_bytes() as u64);
            self.complete(unwritten.completions).await;
        }
        match writer.seal_if_due(Timestamp::now()).await {
            Ok(Some(sealed)) => {
                self.metrics().segments_sealed.add(1);
                self.state.borrow_mut().buffer.push_sealed(sealed);
                Self::wake(&self.release_wake);
            }
            Ok(None) => {}
            Err(error) => {
                // The bytes are durable; only the truncation or close failed. Sealing is
                // retried on the next pass.
                self.metrics().write_errors.add(1);
                tracing::error!("shard {}: sealing a segment failed: {error}", self.id);
            }
        }
    }

    // ---- replay ------------------------------------------------------------------------------

    /// Recovers the segments a previous run left: their flows are buffered again and their
    /// heartbeats re-sent, so the map knows what it knew about them before the restart.
    /// Returns the highest segment id found.
    pub(super) async fn replay(&self) -> std::io::Result<Option<u64>> {
        let Storage::Disk { dir } = self.storage() else {
            return Ok(None);
        };
        let segments = recover_segments(&DmaFiles, &dir, Timestamp::now()).await?;
        let highest = segments.iter().map(|segment| segment.id).max();
        let newest = |lane| {
            segments
                .iter()
                .filter(|segment| segment.lane == lane)
                .map(|segment| segment.id)
                .max()
        };
        let newest = [newest(Lane::Fresh), newest(Lane::Retry)];
        for mut segment in segments {
            let written_at_crash = newest.contains(&Some(segment.id));
            let bytes = read_segment(&DmaFiles, &mut segment).await?;
            let mut flows = 0u64;
            let mut splits = Vec::new();
            let verdict = {
                let mut state = self.state.borrow_mut();
                let now = Timestamp::now();
                scan_recovered(&bytes, written_at_crash, |block| {
                    state.seen.remember(&block.header, now);
                    // Heartbeats only, and a segment's splits are kept until it is scanned:
                    // nothing reserved ahead.
                    let mut split = SplitBatch::new(self.router.shards(), 0);
                    let decoded = block.for_each_flow(|flow| {
                        flows += 1;
                        split.add_heartbeat(&self.router, block.header.exporter, &flow);
                    });
                    if decoded.is_err() {
                        self.metrics().corrupt_blocks.add(1);
                    }
                    let workloads: Dictionary = block
                        .workloads()
                        .iter()
                        .map(|name| Box::from(*name))
                        .collect();
                    splits.push((block.header.host(), workloads, split));
                })
            };
            for torn in &verdict.torn {
                self.metrics().torn_writes.add(1);
                tracing::warn!(
                    "shard {}: segment {}, being written at the crash, is damaged at byte {} ({} bytes, {}): a write the crash tore, never acked; if it was not, the flows there are lost",
                    self.id,
                    segment.id,
                    torn.at,
                    torn.bytes,
                    torn.reason()
                );
            }
            if let Some(lost) = &verdict.lost {
                self.metrics().corrupt_blocks.add(1);
                tracing::error!(
                    "shard {}: segment {} is damaged from byte {} to its end ({} bytes, {}): it was complete before the crash, so the flows there are lost",
                    self.id,
                    segment.id,
                    lost.at,
                    lost.bytes,
                    lost.reason(),
                );
            }
            for (host, workloads, split) in splits {
                self.send_heartbeats(host, &workloads, split.beats).await;
            }
            self.metrics().flows_replayed.add(flows);
            segment.set_recovered(flows, verdict.whole_bytes);
            // Repaired so that a later crash does not judge (or count) the same bytes again; a
            // failed repair only risks that, and is no reason to stay down.
            let repaired = match verdict.repair(&bytes) {
                Repair::None => Ok(()),
                Repair::Cut(whole) => segment.cut_tail(&DmaFiles, whole),
                Repair::Rewrite(intact) => segment.rewrite(&DmaFiles, &intact).await,
            };
            if let Err(error) = repaired {
                tracing::error!(
                    "shard {}: repairing segment {} failed: {error}",
                    self.id,
                    segment.id
                );
            }
            self.state.borrow_mut().buffer.push_sealed(segment);
        }
        Ok(highest)
    }
}

/// How late a due segment may be released before the shard stops taking new flows.
const RELEASE_LAG_MAX: Duration = Duration::from_millis(200);
