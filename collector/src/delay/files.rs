//! The file operations the delay buffer's segments need, behind one trait: [`DmaFiles`] does
//! them with O_DIRECT through io_uring (glommio DMA files) on the node; the model test does them
//! on a simulated disk that crashes, tears writes and corrupts sectors (`delay/model_test.rs`),
//! so the code that writes, reads, recovers and deletes segments is the same in both.
//!
//! Durability is explicit: a file's bytes are durable once [`SegmentFiles::sync`] returns; a new
//! name once [`SegmentFiles::create`] returns, a removal or a rename once theirs do (each syncs
//! the directory); a cut at once.

use std::io;
use std::path::Path;

use glommio::io::{DmaFile, OpenOptions};

/// Segment file operations. The futures are not `Send`: each shard runs on its own thread.
#[allow(async_fn_in_trait)]
pub trait SegmentFiles {
    type File;

    /// Creates `path`, which must not exist, and makes its name durable.
    async fn create(&self, path: &Path) -> io::Result<Self::File>;
    /// Writes the `head` bytes then the `body` bytes at `position` (a multiple of the
    /// alignment), padded with zeros to whole alignment blocks. A write that lands fewer than
    /// the head and body bytes is an error.
    async fn write_padded(
        &self,
        file: &Self::File,
        position: u64,
        head: &[u8],
        body: &[u8],
    ) -> io::Result<()>;
    /// The unit writes are made in.
    fn alignment(&self, file: &Self::File) -> usize;
    async fn sync(&self, file: &Self::File) -> io::Result<()>;
    async fn truncate(&self, file: &Self::File, len: u64) -> io::Result<()>;
    async fn close(&self, file: Self::File) -> io::Result<()>;
    async fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Removes `path`, durably: a removed segment must not come back after a crash, or all its
    /// flows would be emitted a second time.
    async fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` over `to`, durably.
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// The files in `dir`, with their lengths.
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, u64)>>;
    /// Cuts `path` to `len` bytes, durably.
    fn cut(&self, path: &Path, len: u64) -> io::Result<()>;
}

/// Segment files on the node's disk: O_DIRECT, io_uring.
#[derive(Debug, Clone, Copy, Default)]
pub struct DmaFiles;

impl SegmentFiles for DmaFiles {
    type File = DmaFile;

    async fn create(&self, path: &Path) -> io::Result<DmaFile> {
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .dma_open(path)
            .await?;
        // The file's own fdatasync covers its data and size, not the directory entry naming
        // it: without this a crash could lose a whole acked segment's name.
        sync_parent(path).await?;
        Ok(file)
    }

    async fn write_padded(
        &self,
        file: &DmaFile,
        position: u64,
        head: &[u8],
        body: &[u8],
    ) -> io::Result<()> {
        let alignment = file.alignment() as usize;
        let total = head.len() + body.len();
        let padded = total.div_ceil(alignment) * alignment;
        let mut buffer = file.alloc_dma_buffer(padded);
        let slice = buffer.as_bytes_mut();
        slice[..head.len()].copy_from_slice(head);
        slice[head.len()..total].copy_from_slice(body);
        slice[total..].fill(0);
        let written = file.write_at(buffer, position).await?;
        if written < total {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {total} bytes"),
            ));
        }
        Ok(())
    }

    fn alignment(&self, file: &DmaFile) -> usize {
        file.alignment() as usize
    }

    async fn sync(&self, file: &DmaFile) -> io::Result<()> {
        Ok(file.fdatasync().await?)
    }

    async fn truncate(&self, file: &DmaFile, len: u64) -> io::Result<()> {
        Ok(file.truncate(len).await?)
    }

    async fn close(&self, file: DmaFile) -> io::Result<()> {
        Ok(file.close().await?)
    }

    async fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = DmaFile::open(path).await?;
        let size = file.file_size().await?;
        let mut bytes = Vec::with_capacity(size as usize);
        let mut position = 0u64;
        // Reads of a few MiB keep the DMA buffers bounded whatever the segment's size.
        const CHUNK: usize = 4 << 20;
        while position < size {
            let want = CHUNK.min((size - position) as usize);
            let chunk = file.read_at(position, want).await?;
            if chunk.is_empty() {
                break;
            }
            bytes.extend_from_slice(&chunk);
            position += chunk.len() as u64;
        }
        file.close().await?;
        Ok(bytes)
    }

    async fn remove(&self, path: &Path) -> io::Result<()> {
        glommio::io::remove(path).await.map_err(io::Error::from)?;
        sync_parent(path).await
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        glommio::io::rename(from, to)
            .await
            .map_err(io::Error::from)?;
        sync_parent(to).await
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, u64)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                found.push((name.to_owned(), entry.metadata()?.len()));
            }
        }
        Ok(found)
    }

    fn cut(&self, path: &Path, len: u64) -> io::Result<()> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(len)?;
        file.sync_all()
    }
}

/// Makes the directory entries under `path`'s directory durable (one fsync of the directory,
/// through io_uring like every other segment operation).
async fn sync_parent(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        // glommio 0.9 opens a directory relative to no descriptor: a relative path fails with
        // EBADF (the default `delay.dir` is relative).
        let dir = glommio::io::Directory::open(std::path::absolute(dir)?).await?;
        dir.sync().await?;
        dir.close().await?;
    }
    Ok(())
}
