//! Segments: written by a lane's [`SegmentWriter`], sealed when their span is over, read back
//! whole when due, deleted once their flows are out; found again by [`recover_segments`] after
//! a crash. Every file operation goes through [`SegmentFiles`].

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowattr_common::Timestamp;

use super::files::SegmentFiles;
use super::{Lane, Storage};

/// A segment no longer written to, waiting for its hold to pass.
#[derive(Debug)]
pub struct SealedSegment {
    pub id: u64,
    pub lane: Lane,
    pub sealed_at: Timestamp,
    pub flows: u64,
    pub bytes: u64,
    body: SegmentBody,
}

#[derive(Debug)]
enum SegmentBody {
    File(PathBuf),
    Memory(Vec<u8>),
}

/// Writes one lane's open segment and seals it when its span is over. Owned by the shard's
/// writer task: the only code that writes segment files.
pub struct SegmentWriter<F: SegmentFiles> {
    lane: Lane,
    storage: Storage,
    span: Duration,
    files: F,
    open: Option<OpenSegment<F::File>>,
}

struct OpenSegment<File> {
    id: u64,
    opened_at: Timestamp,
    flows: u64,
    written: u64,
    target: OpenTarget<File>,
}

enum OpenTarget<File> {
    File {
        file: File,
        path: PathBuf,
        /// The bytes of the last, partial alignment block: O_DIRECT writes whole blocks, so
        /// the next write rewrites this block with the new bytes after it.
        tail: Vec<u8>,
    },
    Memory(Vec<u8>),
}

impl<F: SegmentFiles> SegmentWriter<F> {
    pub fn new(lane: Lane, storage: Storage, span: Duration, files: F) -> Self {
        SegmentWriter {
            lane,
            storage,
            span,
            files,
            open: None,
        }
    }

    /// Appends `bytes` (whole blocks) to the open segment, opening one first if needed, and
    /// makes them durable (fdatasync) before returning. On error nothing is assumed written:
    /// the caller keeps the bytes and tries again.
    pub async fn write(
        &mut self,
        bytes: &[u8],
        flows: u64,
        now: Timestamp,
        ids: &mut SegmentIds,
    ) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            self.open = Some(self.open_segment(now, ids.next()).await?);
        }
        let open = self.open.as_mut().expect("opened above");
        match &mut open.target {
            OpenTarget::Memory(buffer) => buffer.extend_from_slice(bytes),
            OpenTarget::File { file, tail, .. } => {
                let position = open.written - tail.len() as u64;
                let total = tail.len() + bytes.len();
                self.files.write_padded(file, position, tail, bytes).await?;
                self.files.sync(file).await?;
                let keep = total % self.files.alignment(file);
                let new_tail = last_bytes(tail, bytes, keep);
                *tail = new_tail;
            }
        }
        open.written += bytes.len() as u64;
        open.flows += flows;
        Ok(())
    }

    async fn open_segment(&self, now: Timestamp, id: u64) -> io::Result<OpenSegment<F::File>> {
        let target = match &self.storage {
            Storage::Memory => OpenTarget::Memory(Vec::new()),
            Storage::Disk { dir } => {
                let path = segment_path(dir, self.lane, id);
                OpenTarget::File {
                    file: self.files.create(&path).await?,
                    path,
                    tail: Vec::new(),
                }
            }
        };
        Ok(OpenSegment {
            id,
            opened_at: now,
            flows: 0,
            written: 0,
            target,
        })
    }

    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// Flows in the open segment.
    pub fn open_flows(&self) -> u64 {
        self.open.as_ref().map_or(0, |open| open.flows)
    }

    /// Bytes written to the open segment.
    pub fn open_bytes(&self) -> u64 {
        self.open.as_ref().map_or(0, |open| open.written)
    }

    /// When the open segment's span ends, if one is open.
    pub fn seal_due(&self) -> Option<Timestamp> {
        self.open
            .as_ref()
            .map(|open| open.opened_at.saturating_add(self.span))
    }

    /// Seals the open segment if its span has passed at `now`.
    pub async fn seal_if_due(&mut self, now: Timestamp) -> io::Result<Option<SealedSegment>> {
        if self.seal_due().is_none_or(|due| due > now) {
            return Ok(None);
        }
        let open = self.open.as_ref().expect("checked above");
        if let OpenTarget::File { file, .. } = &open.target {
            // Cut the O_DIRECT padding so the file is exactly its blocks. On failure the segment
            // stays open, to be sealed on a later pass: taken out first, its acked flows would
            // be in no queue, never released until a restart found the file (found by
            // model_test.rs with a failing sync).
            self.files.truncate(file, open.written).await?;
            self.files.sync(file).await?;
        }
        let open = self.open.take().expect("checked above");
        let body = match open.target {
            OpenTarget::Memory(bytes) => SegmentBody::Memory(bytes),
            OpenTarget::File { file, path, .. } => {
                // Its bytes are durable: a failed close cannot lose them.
                let _ = self.files.close(file).await;
                SegmentBody::File(path)
            }
        };
        Ok(Some(SealedSegment {
            id: open.id,
            lane: self.lane,
            sealed_at: now,
            flows: open.flows,
            bytes: open.written,
            body,
        }))
    }
}

/// The last `keep` bytes of `first` followed by `second`.
fn last_bytes(first: &[u8], second: &[u8], keep: usize) -> Vec<u8> {
    if keep <= second.len() {
        second[second.len() - keep..].to_vec()
    } else {
        let from_first = keep - second.len();
        let mut out = first[first.len() - from_first..].to_vec();
        out.extend_from_slice(second);
        out
    }
}

/// Segment ids rise across both lanes and across restarts (replay starts the counter past
/// the highest id found), so a file name is never reused.
#[derive(Debug, Default)]
pub struct SegmentIds(u64);

impl SegmentIds {
    pub fn starting_after(highest: Option<u64>) -> Self {
        SegmentIds(highest.map_or(0, |id| id + 1))
    }

    fn next(&mut self) -> u64 {
        let id = self.0;
        self.0 += 1;
        id
    }
}

/// A segment's replacement while it is written (see [`SealedSegment::rewrite`]).
const REWRITE_SUFFIX: &str = ".rewrite";

fn segment_path(dir: &Path, lane: Lane, id: u64) -> PathBuf {
    dir.join(format!("{}-{id:020}.seg", lane.name()))
}

fn parse_segment_name(name: &str) -> Option<(Lane, u64)> {
    let (lane, id) = name.strip_suffix(".seg")?.split_once('-')?;
    let lane = Lane::ALL.into_iter().find(|known| known.name() == lane)?;
    Some((lane, id.parse().ok()?))
}

/// Reads a sealed segment whole. Memory segments are handed over without a copy.
pub async fn read_segment(
    files: &impl SegmentFiles,
    segment: &mut SealedSegment,
) -> io::Result<Vec<u8>> {
    match &mut segment.body {
        SegmentBody::Memory(bytes) => Ok(std::mem::take(bytes)),
        // An empty file (a crash between create and first write, or a disk that lost it) holds
        // nothing to read, and its length is known without a look: recovery took it from the
        // directory listing. Opening it for DMA and closing it unread was followed by the next
        // segment's read failing with EOPNOTSUPP (glommio 0.9, ext4; found by
        // tests/corruption.rs), and the shard could not start.
        SegmentBody::File(_) if segment.bytes == 0 => Ok(Vec::new()),
        SegmentBody::File(path) => files.read(path).await,
    }
}

/// Deletes a segment once every flow in it is emitted (or re-buffered for retry).
pub async fn remove_segment(files: &impl SegmentFiles, segment: SealedSegment) -> io::Result<()> {
    match segment.body {
        SegmentBody::Memory(_) => Ok(()),
        SegmentBody::File(path) => files.remove(&path).await,
    }
}

/// Segments a crashed or stopped node left in `dir`, oldest first, as sealed segments due
/// one hold after `now` (so heartbeats re-sent after the restart still count). A rewrite the
/// crash interrupted is removed: the segment it was to replace is still in place.
pub async fn recover_segments(
    files: &impl SegmentFiles,
    dir: &Path,
    now: Timestamp,
) -> io::Result<Vec<SealedSegment>> {
    let mut found = Vec::new();
    for (name, bytes) in files.list(dir)? {
        if name.ends_with(REWRITE_SUFFIX) {
            files.remove(&dir.join(name)).await?;
        } else if let Some((lane, id)) = parse_segment_name(&name) {
            found.push((id, lane, dir.join(name), bytes));
        }
    }
    found.sort_by_key(|(id, ..)| *id);
    Ok(found
        .into_iter()
        .map(|(id, lane, path, bytes)| SealedSegment {
            id,
            lane,
            sealed_at: now,
            flows: 0,
            bytes,
            body: SegmentBody::File(path),
        })
        .collect())
}

impl SealedSegment {
    /// Recovered segments learn their flow count and their whole blocks' length when first
    /// read; a tail past `bytes` (padding, or damage judged at recovery) is never read again.
    pub fn set_recovered(&mut self, flows: u64, bytes: u64) {
        self.flows = flows;
        self.bytes = bytes;
    }

    /// Cuts the file back to its first `bytes`, the whole blocks before a damaged tail (see
    /// [`super::Repair`]).
    pub fn cut_tail(&self, files: &impl SegmentFiles, bytes: u64) -> io::Result<()> {
        match &self.body {
            SegmentBody::Memory(_) => Ok(()),
            SegmentBody::File(path) => files.cut(path, bytes),
        }
    }

    /// Replaces the segment's file with `content` (its intact blocks), durably: written beside
    /// it, synced, renamed over it. A crash leaves the old file or the new one.
    pub async fn rewrite(&mut self, files: &impl SegmentFiles, content: &[u8]) -> io::Result<()> {
        let SegmentBody::File(path) = &self.body else {
            return Ok(());
        };
        let mut staged = path.clone().into_os_string();
        staged.push(REWRITE_SUFFIX);
        let staged = PathBuf::from(staged);
        let file = files.create(&staged).await?;
        if !content.is_empty() {
            files.write_padded(&file, 0, &[], content).await?;
        }
        files.truncate(&file, content.len() as u64).await?;
        files.sync(&file).await?;
        let _ = files.close(file).await;
        files.rename(&staged, path).await?;
        self.bytes = content.len() as u64;
        Ok(())
    }

    /// Its file, for a segment on disk.
    pub fn path(&self) -> Option<&Path> {
        match &self.body {
            SegmentBody::File(path) => Some(path),
            SegmentBody::Memory(_) => None,
        }
    }

    /// The part of a segment's bytes that holds whole blocks.
    pub fn valid<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[..bytes.len().min(self.bytes as usize)]
    }
}
