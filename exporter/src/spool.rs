//! The exporter's outbound queue: encoded batches waiting for the collector's ack. Bounded in
//! memory; past that bound batches spill to files in the state directory (which also carry
//! them across an exporter restart; a stopping exporter persists the memory part too); past
//! both bounds together the oldest batch is dropped and counted. Order is kept: once anything
//! is on disk, new batches go to disk behind it.
//!
//! Nothing here may stop the agent: a batch that cannot be written (a full disk) or a spilled
//! file that no longer reads back as a whole, checksummed frame (disk corruption, a file cut
//! short) is dropped, counted and reported, and the queue moves on. A corrupt file kept at the
//! front would otherwise be resent, refused by the collector, and block every batch behind it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use flowattr_common::wire::FrameDecoder;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool {path}: not a whole, checksummed frame ({reason}); its {flows} flows are dropped")]
    Corrupt {
        path: PathBuf,
        flows: u64,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub sequence: u64,
    pub flows: u64,
    /// The whole encoded frame, ready to send.
    pub frame: Vec<u8>,
}

#[derive(Debug)]
pub struct Spool {
    memory: VecDeque<Queued>,
    memory_max: usize,
    dir: PathBuf,
    /// Sequences of spilled batches, oldest first.
    disk: VecDeque<(u64, u64)>,
    disk_max: usize,
    /// Batches (and their flows) dropped: past the bound, unwritable or unreadable.
    pub dropped_batches: u64,
    pub dropped_flows: u64,
    /// Problems met since last asked, for the agent to report ([`Spool::take_problems`]).
    problems: Vec<SpoolError>,
}

fn file_name(sequence: u64, flows: u64) -> String {
    format!("{sequence:020}-{flows}.frame")
}

/// Why `frame` is not exactly one intact frame, if it is not.
fn check_frame(frame: &[u8]) -> Result<(), String> {
    match FrameDecoder::default().decode(frame) {
        Ok(Some((_, used))) if used == frame.len() => Ok(()),
        Ok(Some((_, used))) => Err(format!("{} bytes after the frame", frame.len() - used)),
        Ok(None) => Err(format!("cut short at {} bytes", frame.len())),
        Err(error) => Err(error.to_string()),
    }
}

impl Spool {
    /// Opens the spool in `dir`, picking up batches a previous run spilled.
    pub fn open(dir: &Path, memory_max: usize, disk_max: usize) -> Result<Spool, SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut disk = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let name = entry.map_err(io)?.file_name();
            let Some(stem) = name.to_str().and_then(|name| name.strip_suffix(".frame")) else {
                continue;
            };
            if let Some((sequence, flows)) = stem.split_once('-')
                && let (Ok(sequence), Ok(flows)) = (sequence.parse(), flows.parse()) {
                    disk.push((sequence, flows));
                }
        }
        disk.sort_unstable();
        Ok(Spool {
            memory: VecDeque::new(),
            memory_max: memory_max.max(1),
            dir: dir.to_owned(),
            disk: disk.into(),
            disk_max,
            dropped_batches: 0,
            dropped_flows: 0,
            problems: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.memory.len() + self.disk.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The highest sequence queued, so a restarted exporter continues after it.
    pub fn highest_sequence(&self) -> Option<u64> {
        let memory = self.memory.iter().map(|queued| queued.sequence).max();
        let disk = self.disk.back().map(|(sequence, _)| *sequence);
        memory.max(disk)
    }

    /// The problems met since the last call (each batch they cost is already counted).
    pub fn take_problems(&mut self) -> Vec<SpoolError> {
        std::mem::take(&mut self.problems)
    }

    fn drop_counted(&mut self, flows: u64) {
        self.dropped_batches += 1;
        self.dropped_flows += flows;
    }

    /// Queues `batch`; past every bound the oldest batch goes, counted.
    pub fn push(&mut self, batch: Queued) {
        if self.len() >= self.memory_max + self.disk_max
            && let Some(oldest) = self.remove_front() {
                self.drop_counted(oldest.1);
            }
        if self.disk.is_empty() && self.memory.len() < self.memory_max {
            self.memory.push_back(batch);
            return;
        }
        if let Err(error) = self.write(&batch) {
            self.drop_counted(batch.flows);
            self.problems.push(error);
            return;
        }
        self.disk.push_back((batch.sequence, batch.flows));
    }

    fn write(&self, batch: &Queued) -> Result<(), SpoolError> {
        let path = self.dir.join(file_name(batch.sequence, batch.flows));
        std::fs::write(&path, &batch.frame).map_err(|source| {
            // A partly written file must not be read back as a batch next run.
            let _ = std::fs::remove_file(&path);
            SpoolError::Io { path, source }
        })
    }

    /// Moves the batches held in memory to disk, so a stopping exporter keeps them. Those that
    /// cannot be written are counted as dropped, and the first failure returned.
    pub fn persist(&mut self) -> Result<(), SpoolError> {
        let mut failed = None;
        while let Some(batch) = self.memory.pop_back() {
            match self.write(&batch) {
                Ok(()) => self.disk.push_front((batch.sequence, batch.flows)),
                Err(error) => {
                    self.drop_counted(batch.flows);
                    failed.get_or_insert(error);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The oldest batch, without removing it. Spilled batches that do not read back intact are
    /// dropped on the way (counted, and kept in [`Spool::take_problems`]).
    pub fn front(&mut self) -> Option<Queued> {
        if let Some(front) = self.memory.front() {
            return Some(front.clone());
        }
        while let Some(&(sequence, flows)) = self.disk.front() {
            let path = self.dir.join(file_name(sequence, flows));
            let checked = std::fs::read(&path)
                .map_err(|source| SpoolError::Io {
                    path: path.clone(),
                    source,
                })
                .and_then(|frame| match check_frame(&frame) {
                    Ok(()) => Ok(frame),
                    Err(reason) => Err(SpoolError::Corrupt {
                        path: path.clone(),
                        flows,
                        reason,
                    }),
                });
            match checked {
                Ok(frame) => {
                    return Some(Queued {
                        sequence,
                        flows,
                        frame,
                    });
                }
                Err(error) => {
                    self.remove_front();
                    self.drop_counted(flows);
                    self.problems.push(error);
                }
            }
        }
        None
    }

    /// Removes the oldest batch once the collector acked `sequence`. A no-op if the front is
    /// another batch by then (the acked one was dropped past the bound while it was in flight),
    /// so an ack never removes a batch that was not sent.
    pub fn acked(&mut self, sequence: u64) {
        let front = self.memory.front().map(|queued| queued.sequence).or(self.disk.front().map(|(sequence, _)| *sequence));
        if front == Some(sequence) {
            self.remove_front();
        }
    }

    /// Removes the oldest batch: (sequence, flows).
    fn remove_front(&mut self) -> Option<(u64, u64)> {
        if let Some(front) = self.memory.pop_front() {
            return Some((front.sequence, front.flows));
        }
        let (sequence, flows) = self.disk.pop_front()?;
        let path = self.dir.join(file_name(sequence, flows));
        if let Err(source) = std::fs::remove_file(&path)
            && source.kind() != std::io::ErrorKind::NotFound {
                // Left behind, it would be sent again after a restart: the collector's
                // duplicate check catches that, so this is worth a report, not a stop.
                self.problems.push(SpoolError::Io { path, source });
            }
        Some((sequence, flows))
    }
}

#[cfg(test)]
mod tests {
    use flowattr_common::wire::{FrameKind, encode_frame};

    use super::*;

    fn batch(sequence: u64) -> Queued {
        let mut frame = Vec::new();
        encode_frame(FrameKind::FlowBatch, &sequence.to_le_bytes(), &mut frame).unwrap();
        Queued {
            sequence,
            flows: 10,
            frame,
        }
    }

    fn drain(spool: &mut Spool) -> Vec<u64> {
        std::iter::from_fn(|| {
            let front = spool.front()?;
            spool.acked(front.sequence);
            Some(front.sequence)
        })
        .collect()
    }

    #[test]
    fn spills_keeps_order_survives_restart_and_drops_only_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 2, 3).unwrap();
        for sequence in 0..5 {
            spool.push(batch(sequence));
        }
        assert_eq!((spool.len(), spool.disk.len()), (5, 3));
        assert_eq!(spool.dropped_batches, 0);
        spool.acked(0);
        // Memory has room again, but disk is not empty: order demands disk.
        spool.push(batch(5));
        spool.push(batch(6));
        assert_eq!(spool.dropped_batches, 1, "the oldest went when disk was full");
        assert_eq!(spool.dropped_flows, 10);
        assert_eq!(drain(&mut spool), vec![2, 3, 4, 5, 6]);

        for sequence in 10..15 {
            spool.push(batch(sequence));
        }
        drop(spool);
        // A crash loses the memory part; a stop persists it first. Either way the spilled
        // part resumes in order.
        let mut crashed = Spool::open(dir.path(), 2, 3).unwrap();
        assert_eq!(crashed.front().unwrap().sequence, 12);
        crashed.push(batch(15));
        crashed.persist().unwrap();
        drop(crashed);
        let mut reopened = Spool::open(dir.path(), 2, 3).unwrap();
        assert_eq!(reopened.highest_sequence(), Some(15));
        assert_eq!(drain(&mut reopened), vec![12, 13, 14, 15]);
        assert!(reopened.take_problems().is_empty());
    }

    #[test]
    fn an_ack_for_a_batch_dropped_in_flight_removes_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1, 1).unwrap();
        spool.push(batch(0));
        spool.push(batch(1));
        let in_flight = spool.front().unwrap();
        // While 0 is being sent, a third batch pushes it out past the bound.
        spool.push(batch(2));
        assert_eq!(spool.dropped_batches, 1);
        spool.acked(in_flight.sequence);
        assert_eq!(drain(&mut spool), vec![1, 2]);
    }

    #[test]
    fn unreadable_or_unwritable_batches_are_dropped_counted_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let mut spool = Spool::open(&spool_dir, 1, 10).unwrap();
        for sequence in 0..4 {
            spool.push(batch(sequence));
        }
        drop(spool);
        // One spilled file is cut short, one has a flipped bit.
        let name = |sequence| spool_dir.join(file_name(sequence, 10));
        let whole = std::fs::read(name(1)).unwrap();
        std::fs::write(name(1), &whole[..whole.len() - 1]).unwrap();
        let mut flipped = std::fs::read(name(2)).unwrap();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(name(2), flipped).unwrap();

        let mut spool = Spool::open(&spool_dir, 1, 10).unwrap();
        assert_eq!(drain(&mut spool), vec![3], "batch 0 was in memory at the crash");
        assert_eq!((spool.dropped_batches, spool.dropped_flows), (2, 20));
        let problems: Vec<String> = spool.take_problems().iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("cut short"), "{problems:?}");
        assert!(problems[1].contains("checksum"), "{problems:?}");
        assert_eq!(std::fs::read_dir(&spool_dir).unwrap().count(), 0, "bad files are removed");

        // The disk goes away under the spool: spilling fails, the batch is counted, the
        // spool keeps working.
        spool.push(batch(4));
        std::fs::remove_dir_all(&spool_dir).unwrap();
        spool.push(batch(5));
        assert_eq!((spool.dropped_batches, spool.dropped_flows), (3, 30));
        assert_eq!(spool.take_problems().len(), 1);
        assert_eq!(drain(&mut spool), vec![4]);
    }
}
