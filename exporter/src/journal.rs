//! The interval being captured, kept on disk as it grows. The agent gathers closed flows for an
//! interval (60 s by default) before they become a batch in the [`crate::spool`]; without this
//! file a SIGKILL in that time would lose every flow of the interval. Each drain of the ring
//! buffer appends its new flows as one checksummed frame (a `MeasuredFlowBatch` carrying the
//! sequence number the interval's batch will get; a journal an earlier version wrote holds
//! `FlowBatch` frames, read back the same way), so a killed process loses nothing it counted as
//! captured; the file is synced at most once per [`SYNC_PERIOD`], which bounds what a host that
//! loses power can lose. At the cut, once the batch is in the spool and the next sequence saved,
//! the file is emptied.
//!
//! A restarted agent reads the file back, keeps the frames whose batch was not cut yet (their
//! sequence is not below the saved next sequence, and the spool does not hold it), and rewrites
//! them atomically under its own sequence. A torn or damaged frame ends the reading; what
//! follows it is reported and dropped, never sent half-read.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flowattr_common::RoundTrip;
use flowattr_common::wire::{
    BATCH_FLOWS_MAX, EncodeError, ExporterId, FlowBatch, FlowRecord, FrameDecoder,
    MeasuredFlowBatch, ValidFlowBatch, encode_message,
};

/// At most this long between a flow's append and its sync to the disk.
pub const SYNC_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("interval journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interval journal {path}: encoding flows: {source}")]
    Encode { path: PathBuf, source: EncodeError },
}

/// What a previous run left in the journal.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Frames of intervals that were never cut, in the order they were appended (with neither
    /// host nor clock: those are the cut's).
    pub batches: Vec<MeasuredFlowBatch>,
    /// Flows of frames whose batch was cut before the crash: already in the spool or acked.
    pub already_cut: u64,
    /// Why reading stopped early, and how many bytes it left unread.
    pub damage: Option<(String, usize)>,
}

/// Reads the journal at `path` (absent: nothing to recover), keeping the frames for which
/// `cut(sequence)` says their batch was not cut.
pub fn recover(path: &Path, cut: impl Fn(u64) -> bool) -> Result<Recovered, JournalError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Recovered::default());
        }
        Err(source) => {
            return Err(JournalError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let decoder = FrameDecoder::default();
    let mut recovered = Recovered::default();
    let mut at = 0;
    while at < bytes.len() {
        let batch = match decoder.decode(&bytes[at..]) {
            // The journal's own frames carry neither host nor clock.
            Ok(Some((frame, used))) => ValidFlowBatch::from_frame(&frame)
                .and_then(|valid| valid.to_owned_measured())
                .map(|batch| (batch, used))
                .map_err(|error| error.to_string()),
            Ok(None) => Err("a frame cut short".to_owned()),
            Err(error) => Err(error.to_string()),
        };
        match batch {
            Ok((batch, used)) => {
                at += used;
                if cut(batch.batch.sequence) {
                    recovered.already_cut += batch.batch.flows.len() as u64;
                } else {
                    recovered.batches.push(batch);
                }
            }
            Err(reason) => {
                recovered.damage = Some((format!("at byte {at}: {reason}"), bytes.len() - at));
                break;
            }
        }
    }
    Ok(recovered)
}

/// `flows` and their `round_trips` as one flow batch frame in `out`.
#[allow(clippy::too_many_arguments)]
fn encode_flows(
    path: &Path,
    exporter: ExporterId,
    region: &str,
    sequence: u64,
    workloads: &[String],
    flows: &[FlowRecord],
    round_trips: &[Option<RoundTrip>],
    out: &mut Vec<u8>,
) -> Result<(), JournalError> {
    let batch = MeasuredFlowBatch {
        host: None,
        clock: None,
        batch: FlowBatch {
            exporter,
            sequence,
            region: region.to_owned(),
            workloads: workloads.to_vec(),
            flows: flows.to_vec(),
        },
        round_trips: round_trips.to_vec(),
    };
    out.clear();
    encode_message(&batch, out).map_err(|source| JournalError::Encode {
        path: path.to_owned(),
        source,
    })
}

/// The open journal: appends go to the end of the file.
#[derive(Debug)]
pub struct IntervalJournal {
    path: PathBuf,
    file: File,
    exporter: ExporterId,
    region: String,
    unsynced_since: Option<Instant>,
    frame: Vec<u8>,
}

impl IntervalJournal {
    /// Replaces the journal at `path`, atomically, by one holding `flows` under `sequence`
    /// (the flows recovered from the last run, or none), and opens it for appending.
    pub fn start(
        path: &Path,
        exporter: ExporterId,
        region: &str,
        sequence: u64,
        workloads: &[String],
        (flows, round_trips): (&[FlowRecord], &[Option<RoundTrip>]),
    ) -> Result<IntervalJournal, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let (mut frame, mut contents) = (Vec::new(), Vec::new());
        for (chunk, trips) in chunks(flows, round_trips) {
            encode_flows(
                path, exporter, region, sequence, workloads, chunk, trips, &mut frame,
            )?;
            contents.extend_from_slice(&frame);
        }
        flowattr_common::durable::replace_file(path, &contents).map_err(io)?;
        Ok(IntervalJournal {
            path: path.to_owned(),
            file: std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(io)?,
            exporter,
            region: region.to_owned(),
            unsynced_since: None,
            frame,
        })
    }

    /// Appends `flows` (new since the last append; their local workloads index `workloads`) to
    /// the interval whose batch will be `sequence`. Once this returns, a killed process keeps
    /// them; [`IntervalJournal::sync_if_due`] makes them survive the host too.
    pub fn append(
        &mut self,
        sequence: u64,
        workloads: &[String],
        (flows, round_trips): (&[FlowRecord], &[Option<RoundTrip>]),
    ) -> Result<(), JournalError> {
        for (chunk, trips) in chunks(flows, round_trips) {
            encode_flows(
                &self.path,
                self.exporter,
                &self.region,
                sequence,
                workloads,
                chunk,
                trips,
                &mut self.frame,
            )?;
            self.file
                .write_all(&self.frame)
                .map_err(|source| JournalError::Io {
                    path: self.path.clone(),
                    source,
                })?;
        }
        self.unsynced_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Syncs the appends of the last [`SYNC_PERIOD`] or more.
    pub fn sync_if_due(&mut self) -> Result<(), JournalError> {
        match self.unsynced_since {
            Some(since) if since.elapsed() >= SYNC_PERIOD => {
                self.unsynced_since = None;
                self.file.sync_data().map_err(|source| JournalError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
            _ => Ok(()),
        }
    }

    /// Replaces the journal, atomically, by one holding only `flows` under `sequence`: flows
    /// carried into the next interval, once this one is cut.
    pub fn restart(
        &mut self,
        sequence: u64,
        workloads: &[String],
        flows: (&[FlowRecord], &[Option<RoundTrip>]),
    ) -> Result<(), JournalError> {
        *self = IntervalJournal::start(
            &self.path,
            self.exporter,
            &self.region,
            sequence,
            workloads,
            flows,
        )?;
        Ok(())
    }

    /// Empties the journal once its interval is cut: the batch is in the spool and the next
    /// sequence saved. A crash before this leaves frames the next run recognises as cut.
    pub fn reset(&mut self) -> Result<(), JournalError> {
        self.unsynced_since = None;
        self.file.set_len(0).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Records and their round trips, a batch's worth ([`BATCH_FLOWS_MAX`]) at a time: how the
/// journal frames them and how the cut makes batches of them.
pub fn chunks<'a>(
    flows: &'a [FlowRecord],
    round_trips: &'a [Option<RoundTrip>],
) -> impl Iterator<Item = (&'a [FlowRecord], &'a [Option<RoundTrip>])> {
    debug_assert_eq!(flows.len(), round_trips.len());
    flows
        .chunks(BATCH_FLOWS_MAX)
        .zip(round_trips.chunks(BATCH_FLOWS_MAX))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use flowattr_common::wire::WorkloadIndex;
    use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};

    use super::*;

    fn flow(port: u16) -> FlowRecord {
        FlowRecord {
            local_ip: CanonicalIp::from(Ipv4Addr::new(10, 0, 0, 1)),
            remote_ip: CanonicalIp::from(Ipv4Addr::new(10, 0, 0, 2)),
            local_port: port,
            remote_port: 443,
            local_workload: Some(WorkloadIndex(0)),
            local_shared: false,
            start: Timestamp::from_nanos(1_000),
            end: Timestamp::from_nanos(2_000),
            bytes_sent: 1,
            bytes_received: 2,
            segments_sent: 1,
            segments_received: 1,
            retransmits: 0,
            direction: Direction::Outbound,
            state: FlowState::Closed,
        }
    }

    /// Each port's round trip tells it apart; port 2's connection was never answered.
    fn round_trip(port: u16) -> Option<RoundTrip> {
        (port != 2).then_some(RoundTrip {
            smoothed_us: 100 * u32::from(port),
            deviation_us: u32::from(port),
        })
    }

    fn flows(ports: &[u16]) -> (Vec<FlowRecord>, Vec<Option<RoundTrip>>) {
        (
            ports.iter().map(|&port| flow(port)).collect(),
            ports.iter().map(|&port| round_trip(port)).collect(),
        )
    }

    fn append(journal: &mut IntervalJournal, sequence: u64, ports: &[u16]) {
        let (records, trips) = flows(ports);
        journal
            .append(sequence, &["web".to_owned()], (&records, &trips))
            .unwrap();
    }

    /// (sequence, port) of every recovered flow, checking each kept its round trip.
    fn ports(recovered: &Recovered) -> Vec<(u64, u16)> {
        let mut ports = Vec::new();
        for measured in &recovered.batches {
            let batch = &measured.batch;
            assert_eq!(measured.round_trips.len(), batch.flows.len());
            for (flow, trip) in batch.flows.iter().zip(&measured.round_trips) {
                assert_eq!(*trip, round_trip(flow.local_port), "{flow:?}");
                ports.push((batch.sequence, flow.local_port));
            }
        }
        ports
    }

    fn open(path: &Path, sequence: u64, ports: &[u16]) -> IntervalJournal {
        let (records, trips) = flows(ports);
        IntervalJournal::start(
            path,
            ExporterId(1),
            "test",
            sequence,
            &["web".to_owned()],
            (&records, &trips),
        )
        .unwrap()
    }

    #[test]
    fn appended_flows_come_back_until_their_interval_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("interval.journal");
        assert!(
            recover(&path, |_| false).unwrap().batches.is_empty(),
            "no file: nothing"
        );
        let names = ["web".to_owned()];
        let mut journal = open(&path, 7, &[]);
        append(&mut journal, 7, &[1, 2]);
        append(&mut journal, 7, &[3]);
        // Killed here: the two appends come back, in order, with their names.
        let recovered = recover(&path, |sequence| sequence < 7).unwrap();
        assert_eq!(ports(&recovered), vec![(7, 1), (7, 2), (7, 3)]);
        assert_eq!(recovered.batches[0].batch.workloads, names);
        assert!(recovered.damage.is_none());
        // Killed after the cut's batch reached the spool but before the reset: recognised as
        // cut, so not sent twice.
        let recovered = recover(&path, |sequence| sequence < 8).unwrap();
        assert_eq!((recovered.batches.len(), recovered.already_cut), (0, 3));
        journal.reset().unwrap();
        append(&mut journal, 8, &[4]);
        journal.sync_if_due().unwrap();
        assert_eq!(
            ports(&recover(&path, |sequence| sequence < 8).unwrap()),
            vec![(8, 4)]
        );

        // A restart rewrites what it recovered under its own sequence.
        let recovered = recover(&path, |sequence| sequence < 8).unwrap();
        let ports_back: Vec<u16> = recovered.batches[0]
            .batch
            .flows
            .iter()
            .map(|flow| flow.local_port)
            .collect();
        let mut restarted = open(&path, 20, &ports_back);
        append(&mut restarted, 20, &[5]);
        assert_eq!(
            ports(&recover(&path, |sequence| sequence < 20).unwrap()),
            vec![(20, 4), (20, 5)]
        );
    }

    #[test]
    fn a_torn_or_damaged_frame_ends_the_reading_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("interval.journal");
        let mut journal = open(&path, 3, &[]);
        append(&mut journal, 3, &[1]);
        let first = std::fs::metadata(&path).unwrap().len() as usize;
        append(&mut journal, 3, &[2]);
        append(&mut journal, 3, &[3]);
        let whole = std::fs::read(&path).unwrap();

        // Cut short in the last frame: the first two come back.
        std::fs::write(&path, &whole[..whole.len() - 5]).unwrap();
        let recovered = recover(&path, |_| false).unwrap();
        assert_eq!(ports(&recovered), vec![(3, 1), (3, 2)]);
        let (reason, unread) = recovered.damage.unwrap();
        assert!(reason.contains("cut short"), "{reason}");
        assert_eq!(unread, first - 5);

        // A flipped bit in the second frame: the first comes back, the rest is reported.
        let mut flipped = whole.clone();
        flipped[first + 20] ^= 0x10;
        std::fs::write(&path, &flipped).unwrap();
        let recovered = recover(&path, |_| false).unwrap();
        assert_eq!(ports(&recovered), vec![(3, 1)]);
        assert_eq!(recovered.damage.unwrap().1, whole.len() - first);
    }

    #[test]
    fn a_journal_an_earlier_version_wrote_reads_back_without_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("interval.journal");
        let batch = FlowBatch {
            exporter: ExporterId(1),
            sequence: 5,
            region: "test".to_owned(),
            workloads: vec!["web".to_owned()],
            flows: vec![flow(1), flow(3)],
        };
        let mut frame = Vec::new();
        encode_message(&batch, &mut frame).unwrap();
        std::fs::write(&path, &frame).unwrap();
        let recovered = recover(&path, |_| false).unwrap();
        assert!(recovered.damage.is_none());
        assert_eq!(recovered.batches.len(), 1);
        assert_eq!(recovered.batches[0].batch, batch);
        assert_eq!(recovered.batches[0].round_trips, vec![None, None]);
    }
}
