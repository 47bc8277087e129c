//! The spool of batch parts waiting for another region's ack: one file per (exporter,
//! sequence), written whole and synced before the exporter's ack, removed once the other region
//! acked it. Writing the same part twice (an exporter's retry) replaces the file with the same
//! bytes.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ForwardSpool {
    dir: PathBuf,
}

impl ForwardSpool {
    pub fn open(dir: &Path) -> io::Result<ForwardSpool> {
        std::fs::create_dir_all(dir)?;
        Ok(ForwardSpool { dir: dir.to_owned() })
    }

    fn path(&self, exporter: u64, sequence: u64) -> PathBuf {
        self.dir.join(format!("{exporter:016x}-{sequence:020}.frame"))
    }

    /// Durable when it returns. Blocking: run it off the executors.
    pub fn write(&self, exporter: u64, sequence: u64, frame: &[u8]) -> io::Result<()> {
        flowattr_common::durable::replace_file(&self.path(exporter, sequence), frame)
    }

    /// The parts waiting, oldest sequence first within each exporter.
    pub fn pending(&self) -> io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "frame"))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Where the records the other region refused one by one are kept.
    pub fn dead_letter_dir(&self) -> PathBuf {
        self.dir.join("dead-letter")
    }

    /// Moves a part the other region refused out of the way, keeping it for an operator.
    pub fn set_aside(&self, path: &Path) -> io::Result<()> {
        let refused = self.dir.join("refused");
        std::fs::create_dir_all(&refused)?;
        std::fs::rename(path, refused.join(path.file_name().unwrap_or_default()))
    }
}
