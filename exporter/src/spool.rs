//! The exporter's outbound queue: encoded batches waiting for the collector's ack. Bounded in
//! memory; past that bound batches spill to files in the state directory (which also carry
//! them across an exporter restart; a stopping exporter persists the memory part too); past
//! both bounds together the oldest batch is dropped and counted. Order is kept: once anything
//! is on disk, new batches go to disk behind it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
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
    pub dropped_batches: u64,
    pub dropped_flows: u64,
}

fn file_name(sequence: u64, flows: u64) -> String {
    format!("{sequence:020}-{flows}.frame")
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

    pub fn push(&mut self, batch: Queued) -> Result<(), SpoolError> {
        if self.len() >= self.memory_max + self.disk_max {
            // Past every bound: the oldest batch goes, counted.
            if let Some(oldest) = self.pop_front()? {
                self.dropped_batches += 1;
                self.dropped_flows += oldest.flows;
            }
        }
        if self.disk.is_empty() && self.memory.len() < self.memory_max {
            self.memory.push_back(batch);
            return Ok(());
        }
        let path = self.dir.join(file_name(batch.sequence, batch.flows));
        std::fs::write(&path, &batch.frame).map_err(|source| SpoolError::Io { path, source })?;
        self.disk.push_back((batch.sequence, batch.flows));
        Ok(())
    }

    /// Moves the batches held in memory to disk, so a stopping exporter keeps them.
    pub fn persist(&mut self) -> Result<(), SpoolError> {
        while let Some(batch) = self.memory.pop_back() {
            let path = self.dir.join(file_name(batch.sequence, batch.flows));
            std::fs::write(&path, &batch.frame).map_err(|source| SpoolError::Io { path, source })?;
            self.disk.push_front((batch.sequence, batch.flows));
        }
        Ok(())
    }

    /// The oldest batch, without removing it.
    pub fn front(&mut self) -> Result<Option<Queued>, SpoolError> {
        if let Some(front) = self.memory.front() {
            return Ok(Some(front.clone()));
        }
        let Some(&(sequence, flows)) = self.disk.front() else {
            return Ok(None);
        };
        let path = self.dir.join(file_name(sequence, flows));
        let frame = std::fs::read(&path).map_err(|source| SpoolError::Io { path, source })?;
        Ok(Some(Queued {
            sequence,
            flows,
            frame,
        }))
    }

    /// Removes the oldest batch (acked, or dropped).
    pub fn pop_front(&mut self) -> Result<Option<Queued>, SpoolError> {
        if let Some(front) = self.memory.pop_front() {
            return Ok(Some(front));
        }
        let Some(front) = self.front()? else {
            return Ok(None);
        };
        self.disk.pop_front();
        let path = self.dir.join(file_name(front.sequence, front.flows));
        std::fs::remove_file(&path).map_err(|source| SpoolError::Io { path, source })?;
        Ok(Some(front))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(sequence: u64) -> Queued {
        Queued {
            sequence,
            flows: 10,
            frame: sequence.to_le_bytes().to_vec(),
        }
    }

    #[test]
    fn spills_keeps_order_survives_restart_and_drops_only_past_the_bound() {
        let dir = std::env::temp_dir().join(format!("flowattr-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut spool = Spool::open(&dir, 2, 3).unwrap();
        for sequence in 0..5 {
            spool.push(batch(sequence)).unwrap();
        }
        assert_eq!(spool.len(), 5);
        assert_eq!(spool.dropped_batches, 0);
        assert_eq!(spool.pop_front().unwrap().unwrap().sequence, 0);
        // Memory has room again, but disk is not empty: order demands disk.
        spool.push(batch(5)).unwrap();
        spool.push(batch(6)).unwrap();
        assert_eq!(spool.dropped_batches, 1, "the oldest went when disk was full");
        assert_eq!(spool.dropped_flows, 10);
        let order: Vec<u64> = std::iter::from_fn(|| spool.pop_front().unwrap().map(|b| b.sequence)).collect();
        assert_eq!(order, vec![2, 3, 4, 5, 6]);

        for sequence in 10..15 {
            spool.push(batch(sequence)).unwrap();
        }
        drop(spool);
        // A crash loses the memory part; a stop persists it first. Either way the spilled
        // part resumes in order.
        let mut crashed = Spool::open(&dir, 2, 3).unwrap();
        assert_eq!(crashed.front().unwrap().unwrap().sequence, 12);
        crashed.push(batch(15)).unwrap();
        crashed.persist().unwrap();
        drop(crashed);
        let mut reopened = Spool::open(&dir, 2, 3).unwrap();
        assert_eq!(reopened.highest_sequence(), Some(15));
        let order: Vec<u64> = std::iter::from_fn(|| reopened.pop_front().unwrap().map(|b| b.sequence)).collect();
        assert_eq!(order, vec![12, 13, 14, 15]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
