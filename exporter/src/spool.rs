//! The exporter's outbound queue: encoded batches waiting for the collector's ack. Every batch
//! is written to its own file in the state directory and synced before [`Spool::push`] returns,
//! so a batch counts as captured only once a crash (SIGKILL, a host that loses power) can no
//! longer lose it; the newest few also stay in memory, so sending them does not read them back.
//! Past the bound the oldest batch is dropped and counted. Order is kept.
//!
//! Nothing here may stop the agent: a batch that cannot be written (a full disk) stays in
//! memory only, and is reported; a file that no longer reads back as a whole, checksummed
//! frame (disk corruption, a file cut short) is dropped, counted and reported, and the queue
//! moves on. A corrupt file kept at the front would otherwise be resent, refused by the
//! collector, and block every batch behind it.

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
    #[error(
        "spool {path}: not a whole, checksummed frame ({reason}); its {flows} flows are dropped"
    )]
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

/// One queued batch: its frame when held in memory, and whether its file was written.
#[derive(Debug)]
struct Entry {
    sequence: u64,
    flows: u64,
    frame: Option<Vec<u8>>,
    on_disk: bool,
}

#[derive(Debug)]
pub struct Spool {
    /// Every queued batch, oldest first.
    queue: VecDeque<Entry>,
    /// Entries whose frame is held in memory, and how many may be.
    in_memory: usize,
    memory_max: usize,
    /// Batches the queue may hold in all.
    bound: usize,
    dir: PathBuf,
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
    /// Opens the spool in `dir`, picking up the batches a previous run left: `memory_max`
    /// frames are kept in memory, and `memory_max + disk_max` batches in all.
    pub fn open(dir: &Path, memory_max: usize, disk_max: usize) -> Result<Spool, SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                // A write cut short by a crash, never renamed into place: never a queued batch.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Some(stem) = name.strip_suffix(".frame") else {
                continue;
            };
            if let Some((sequence, flows)) = stem.split_once('-')
                && let (Ok(sequence), Ok(flows)) = (sequence.parse(), flows.parse())
            {
                found.push(Entry {
                    sequence,
                    flows,
                    frame: None,
                    on_disk: true,
                });
            }
        }
        found.sort_unstable_by_key(|entry| entry.sequence);
        Ok(Spool {
            queue: found.into(),
            in_memory: 0,
            memory_max,
            bound: (memory_max + disk_max).max(1),
            dir: dir.to_owned(),
            dropped_batches: 0,
            dropped_flows: 0,
            problems: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The highest sequence queued, so a restarted exporter continues after it.
    pub fn highest_sequence(&self) -> Option<u64> {
        self.queue.back().map(|entry| entry.sequence)
    }

    /// The problems met since the last call (each batch they cost is already counted).
    pub fn take_problems(&mut self) -> Vec<SpoolError> {
        std::mem::take(&mut self.problems)
    }

    /// Logs the problems met since the last call, one line each.
    pub fn log_problems(&mut self) {
        for problem in self.take_problems() {
            tracing::warn!("{problem}");
        }
    }

    fn drop_counted(&mut self, flows: u64) {
        self.dropped_batches += 1;
        self.dropped_flows += flows;
    }

    /// Queues `batch`, its file written and synced first; past the bound the oldest batch
    /// goes, counted.
    pub fn push(&mut self, batch: Queued) {
        if self.len() >= self.bound
            && let Some(oldest) = self.remove_front()
        {
            self.drop_counted(oldest.1);
        }
        let on_disk = match self.write(batch.sequence, batch.flows, &batch.frame) {
            Ok(()) => true,
            Err(error) => {
                self.problems.push(error);
                false
            }
        };
        self.queue.push_back(Entry {
            sequence: batch.sequence,
            flows: batch.flows,
            frame: Some(batch.frame),
            on_disk,
        });
        self.in_memory += 1;
        self.release_memory();
    }

    /// Keeps at most `memory_max` frames in memory: the oldest written ones are let go (read
    /// back when their turn comes); past that, a batch that is in memory only is dropped,
    /// counted.
    fn release_memory(&mut self) {
        for entry in self.queue.iter_mut() {
            if self.in_memory <= self.memory_max {
                return;
            }
            if entry.on_disk && entry.frame.take().is_some() {
                self.in_memory -= 1;
            }
        }
        while self.in_memory > self.memory_max {
            let Some(at) = self.queue.iter().position(|entry| !entry.on_disk) else {
                return;
            };
            let dropped = self.queue.remove(at).expect("found");
            self.in_memory -= 1;
            self.drop_counted(dropped.flows);
        }
    }

    fn write(&self, sequence: u64, flows: u64, frame: &[u8]) -> Result<(), SpoolError> {
        let path = self.dir.join(file_name(sequence, flows));
        flowattr_common::durable::replace_file(&path, frame)
            .map_err(|source| SpoolError::Io { path, source })
    }

    /// Writes the batches held in memory only (their first write failed), so a stopping
    /// exporter keeps them. Those that still cannot be written are counted as dropped, and
    /// the first failure returned.
    pub fn persist(&mut self) -> Result<(), SpoolError> {
        let mut failed = None;
        let mut lost = Vec::new();
        for entry in self.queue.iter_mut().filter(|entry| !entry.on_disk) {
            let frame = entry
                .frame
                .as_deref()
                .expect("a batch not on disk is in memory");
            let path = self.dir.join(file_name(entry.sequence, entry.flows));
            match flowattr_common::durable::replace_file(&path, frame) {
                Ok(()) => entry.on_disk = true,
                Err(source) => {
                    lost.push(entry.flows);
                    failed.get_or_insert(SpoolError::Io { path, source });
                }
            }
        }
        for flows in lost {
            self.drop_counted(flows);
        }
        failed.map_or(Ok(()), Err)
    }

    /// The oldest batch, without removing it. Files that do not read back intact are dropped
    /// on the way (counted, and kept in [`Spool::take_problems`]).
    pub fn front(&mut self) -> Option<Queued> {
        while let Some(entry) = self.queue.front() {
            let (sequence, flows) = (entry.sequence, entry.flows);
            if let Some(frame) = &entry.frame {
                return Some(Queued {
                    sequence,
                    flows,
                    frame: frame.clone(),
                });
            }
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
        if self.queue.front().map(|entry| entry.sequence) == Some(sequence) {
            self.remove_front();
        }
    }

    /// Removes the oldest batch, and its file: (sequence, flows).
    fn remove_front(&mut self) -> Option<(u64, u64)> {
        let front = self.queue.pop_front()?;
        if front.frame.is_some() {
            self.in_memory -= 1;
        }
        if front.on_disk {
            let path = self.dir.join(file_name(front.sequence, front.flows));
            if let Err(source) = std::fs::remove_file(&path)
                && source.kind() != std::io::ErrorKind::NotFound
            {
                // Left behind, it would be sent again after a restart: the collector's
                // duplicate check catches that, so this is worth a report, not a stop.
                self.problems.push(SpoolError::Io { path, source });
            }
        }
        Some((front.sequence, front.flows))
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

    fn files(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn every_batch_is_on_disk_before_push_returns_so_a_crash_loses_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 2, 3).unwrap();
        for sequence in 0..5 {
            spool.push(batch(sequence));
            assert_eq!(
                files(dir.path()),
                sequence as usize + 1,
                "batch {sequence} not written at once"
            );
        }
        assert_eq!(
            (spool.len(), spool.in_memory),
            (5, 2),
            "only the newest frames stay in memory"
        );
        assert_eq!(spool.dropped_batches, 0);
        spool.acked(0);
        assert_eq!(files(dir.path()), 4, "an acked batch's file goes");
        spool.push(batch(5));
        spool.push(batch(6));
        assert_eq!(spool.dropped_batches, 1, "the oldest went past the bound");
        assert_eq!(spool.dropped_flows, 10);
        assert_eq!(drain(&mut spool), vec![2, 3, 4, 5, 6]);

        for sequence in 10..15 {
            spool.push(batch(sequence));
        }
        // A crash (no persist): nothing in memory was only in memory.
        drop(spool);
        // A write a crash cut short, before its rename: never taken for a batch.
        std::fs::write(
            dir.path().join(format!("{}.tmp", file_name(15, 10))),
            b"half",
        )
        .unwrap();
        let mut reopened = Spool::open(dir.path(), 2, 3).unwrap();
        assert_eq!(reopened.highest_sequence(), Some(14));
        assert_eq!(drain(&mut reopened), vec![10, 11, 12, 13, 14]);
        assert!(reopened.take_problems().is_empty());
        assert_eq!(files(dir.path()), 0, "the cut write is cleared");
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
        assert_eq!(drain(&mut spool), vec![0, 3]);
        assert_eq!((spool.dropped_batches, spool.dropped_flows), (2, 20));
        let problems: Vec<String> = spool
            .take_problems()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("cut short"), "{problems:?}");
        assert!(problems[1].contains("checksum"), "{problems:?}");
        assert_eq!(
            std::fs::read_dir(&spool_dir).unwrap().count(),
            0,
            "bad files are removed"
        );

        // The disk goes away under the spool: the batch that cannot be written is kept in
        // memory and still sent (reported); the one whose file vanished is dropped, counted.
        spool.push(batch(4));
        std::fs::remove_dir_all(&spool_dir).unwrap();
        spool.push(batch(5));
        let problems = spool.take_problems();
        assert_eq!(problems.len(), 1, "the failed write: {problems:?}");
        assert_eq!(drain(&mut spool), vec![5]);
        assert_eq!((spool.dropped_batches, spool.dropped_flows), (3, 30));
        assert_eq!(spool.take_problems().len(), 1, "the vanished file");
        // Held in memory only, past the memory bound: dropped, counted.
        spool.push(batch(6));
        spool.push(batch(7));
        assert_eq!((spool.dropped_batches, spool.len()), (4, 1));
    }
}
