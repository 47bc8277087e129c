//! The spool of batch parts waiting for another region's ack: one file per part, named by who
//! vouched for its batch, its exporter and sequence, and the checksum of the part's frame;
//! written whole and synced before the exporter's ack, removed once the other region acked it.
//! Writing the same part twice (an exporter's retry) replaces the file with the same bytes;
//! another batch under the same exporter and sequence (another sender's, or with other
//! records) is a file of its own, never written over this one.

use std::io;
use std::path::{Path, PathBuf};

use flowattr_common::wire::checksum_of;

use crate::delay::codec::BlockHeader;

#[derive(Debug)]
pub struct ForwardSpool {
    dir: PathBuf,
}

impl ForwardSpool {
    pub fn open(dir: &Path) -> io::Result<ForwardSpool> {
        std::fs::create_dir_all(dir)?;
        Ok(ForwardSpool {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, header: &BlockHeader, frame: &[u8]) -> PathBuf {
        let checksum = checksum_of(frame).unwrap_or_default();
        let (sender, exporter, sequence) = (header.sender, header.exporter, header.sequence);
        self.dir.join(format!(
            "{sender:016x}-{exporter:016x}-{sequence:020}-{checksum:08x}.frame"
        ))
    }

    /// Durable when it returns. Blocking: run it off the executors.
    pub fn write(&self, header: &BlockHeader, frame: &[u8]) -> io::Result<()> {
        flowattr_common::durable::replace_file(&self.path(header, frame), frame)
    }

    /// The parts waiting, oldest sequence first within each sender and exporter.
    pub fn pending(&self) -> io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "frame")
            })
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
