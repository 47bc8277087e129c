//! The delay buffer: where a shard keeps flows for `delay` so that the heartbeats of their
//! remote side, reported by other hosts up to an exporter interval later, have arrived before
//! the flow is attributed.
//!
//! Per shard, two lanes of append-only segments: `fresh` (flows as they arrive, held `delay`)
//! and `retry` (flows that found no evidence, held `retry_delay`). A segment covers
//! `segment_span` of arrival time; once sealed and held long enough it is read back whole,
//! its flows attributed, and deleted. On disk a segment is a file written and read with
//! O_DIRECT through io_uring (glommio DMA files); in memory mode it is a byte vector with the
//! same encoding, so both modes run the same code but for the storage.
//!
//! The split between [`DelayBuffer`] (plain state, borrowed briefly by the shard's message
//! handlers) and [`SegmentWriter`] / [`read_segment`] (the awaiting I/O, owned by the shard's
//! writer and release tasks) keeps a `RefCell` borrow from ever living across an `.await`.

pub mod codec;

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use flowattr_common::Timestamp;
use glommio::io::{DmaFile, OpenOptions};

use self::codec::{BlockHeader, BufferedFlow, encode_block};

/// The two queues of a shard's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Fresh,
    Retry,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Fresh, Lane::Retry];

    pub fn name(self) -> &'static str {
        match self {
            Lane::Fresh => "fresh",
            Lane::Retry => "retry",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where segments live.
#[derive(Debug, Clone)]
pub enum Storage {
    /// One directory per shard.
    Disk { dir: PathBuf },
    Memory,
}

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

/// Encoded flows not yet handed to the writer, and what completes when they are durable.
#[derive(Debug)]
pub struct Unwritten<T> {
    pub bytes: Vec<u8>,
    pub flows: u64,
    pub completions: Vec<T>,
}

impl<T> Default for Unwritten<T> {
    fn default() -> Self {
        Unwritten {
            bytes: Vec::new(),
            flows: 0,
            completions: Vec::new(),
        }
    }
}

impl<T> Unwritten<T> {
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.completions.is_empty()
    }
}

#[derive(Debug)]
struct LaneState<T> {
    hold: Duration,
    unwritten: Unwritten<T>,
    sealed: VecDeque<SealedSegment>,
}

/// The shard's view of its buffer: what waits to be written, and the sealed segments in the
/// order they fall due. `T` is what the shard wants back when bytes are durable (acks).
#[derive(Debug)]
pub struct DelayBuffer<T> {
    lanes: [LaneState<T>; 2],
    buffered_flows: u64,
    buffered_bytes: u64,
    /// Taken for release, not yet deleted.
    releasing_bytes: u64,
    open_bytes: u64,
}

impl<T> DelayBuffer<T> {
    pub fn new(delay: Duration, retry_delay: Duration) -> Self {
        let lane = |hold| LaneState {
            hold,
            unwritten: Unwritten::default(),
            sealed: VecDeque::new(),
        };
        DelayBuffer {
            lanes: [lane(delay), lane(retry_delay)],
            buffered_flows: 0,
            buffered_bytes: 0,
            releasing_bytes: 0,
            open_bytes: 0,
        }
    }

    pub fn hold(&self, lane: Lane) -> Duration {
        self.lanes[lane.index()].hold
    }

    /// Encodes one block into `lane`. `completion` comes back from [`Self::take_unwritten`]'s
    /// caller once the block is durable.
    pub fn append<S: AsRef<str>>(
        &mut self,
        lane: Lane,
        header: &BlockHeader,
        workloads: &[S],
        flows: &[BufferedFlow],
    ) {
        let unwritten = &mut self.lanes[lane.index()].unwritten;
        encode_block(header, workloads, flows, &mut unwritten.bytes);
        unwritten.flows += flows.len() as u64;
    }

    /// Registers `completion` to be returned when everything appended so far is durable.
    pub fn complete_when_durable(&mut self, lane: Lane, completion: T) {
        self.lanes[lane.index()].unwritten.completions.push(completion);
    }

    pub fn unwritten_bytes(&self) -> usize {
        self.lanes.iter().map(|lane| lane.unwritten.bytes.len()).sum()
    }

    /// Segments taken by [`DelayBuffer::take_due`] whose files are now deleted.
    pub fn deleted(&mut self, bytes: u64) {
        self.releasing_bytes = self.releasing_bytes.saturating_sub(bytes);
    }

    /// What the writer reports its open segments hold.
    pub fn set_open_bytes(&mut self, bytes: u64) {
        self.open_bytes = bytes;
    }

    /// Bytes of the whole buffer as last known: segments being released and sealed ones,
    /// open ones, and flows not yet handed to the writer (what the writer is writing right now
    /// is not in it, and is at most one `take_unwritten`).
    pub fn total_bytes(&self) -> u64 {
        self.releasing_bytes + self.buffered_bytes + self.open_bytes + self.unwritten_bytes() as u64
    }

    /// Hands the lane's unwritten bytes to the writer.
    pub fn take_unwritten(&mut self, lane: Lane) -> Unwritten<T> {
        std::mem::take(&mut self.lanes[lane.index()].unwritten)
    }

    pub fn push_sealed(&mut self, segment: SealedSegment) {
        self.buffered_flows += segment.flows;
        self.buffered_bytes += segment.bytes;
        self.lanes[segment.lane.index()].sealed.push_back(segment);
    }

    /// The oldest sealed segment whose hold has passed at `now`, taken out of the queue.
    pub fn take_due(&mut self, now: Timestamp) -> Option<SealedSegment> {
        for lane in &mut self.lanes {
            let due = lane
                .sealed
                .front()
                .is_some_and(|segment| segment.sealed_at.saturating_add(lane.hold) <= now);
            if due {
                let segment = lane.sealed.pop_front()?;
                self.buffered_flows -= segment.flows;
                self.buffered_bytes -= segment.bytes;
                // Its file stays on disk until every flow in it is durable in the sinks.
                self.releasing_bytes += segment.bytes;
                return Some(segment);
            }
        }
        None
    }

    /// When the next sealed segment falls due, if any is sealed.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.lanes
            .iter()
            .filter_map(|lane| {
                let segment = lane.sealed.front()?;
                Some(segment.sealed_at.saturating_add(lane.hold))
            })
            .min()
    }

    /// Flows in sealed segments (the open segments' flows are counted by their writers).
    pub fn sealed_flows(&self) -> u64 {
        self.buffered_flows
    }

    pub fn sealed_bytes(&self) -> u64 {
        self.buffered_bytes
    }
}

/// Writes one lane's open segment and seals it when its span is over. Owned by the shard's
/// writer task: the only code that writes segment files.
pub struct SegmentWriter {
    lane: Lane,
    storage: Storage,
    span: Duration,
    open: Option<OpenSegment>,
}

struct OpenSegment {
    id: u64,
    opened_at: Timestamp,
    flows: u64,
    written: u64,
    target: OpenTarget,
}

enum OpenTarget {
    File {
        file: Rc<DmaFile>,
        path: PathBuf,
        /// The bytes of the last, partial alignment block: O_DIRECT writes whole blocks, so
        /// the next write rewrites this block with the new bytes after it.
        tail: Vec<u8>,
    },
    Memory(Vec<u8>),
}

impl SegmentWriter {
    pub fn new(lane: Lane, storage: Storage, span: Duration) -> Self {
        SegmentWriter {
            lane,
            storage,
            span,
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
                let alignment = file.alignment() as usize;
                let position = open.written - tail.len() as u64;
                let total = tail.len() + bytes.len();
                let padded = total.div_ceil(alignment) * alignment;
                let mut buffer = file.alloc_dma_buffer(padded);
                let slice = buffer.as_bytes_mut();
                slice[..tail.len()].copy_from_slice(tail);
                slice[tail.len()..total].copy_from_slice(bytes);
                slice[total..].fill(0);
                let written = file.write_at(buffer, position).await?;
                if written < total {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short write: {written} of {total} bytes"),
                    ));
                }
                file.fdatasync().await?;
                let keep = total % alignment;
                let mut new_tail = Vec::with_capacity(alignment);
                new_tail.extend_from_slice(&last_bytes(tail, bytes, keep));
                *tail = new_tail;
            }
        }
        open.written += bytes.len() as u64;
        open.flows += flows;
        Ok(())
    }

    async fn open_segment(&self, now: Timestamp, id: u64) -> io::Result<OpenSegment> {
        let target = match &self.storage {
            Storage::Memory => OpenTarget::Memory(Vec::new()),
            Storage::Disk { dir } => {
                let path = segment_path(dir, self.lane, id);
                let file = OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .dma_open(&path)
                    .await?;
                OpenTarget::File {
                    file: Rc::new(file),
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
        let open = self.open.take().expect("checked above");
        let body = match open.target {
            OpenTarget::Memory(bytes) => SegmentBody::Memory(bytes),
            OpenTarget::File { file, path, .. } => {
                // Cut the O_DIRECT padding so the file is exactly its blocks.
                file.truncate(open.written).await?;
                file.fdatasync().await?;
                let _ = file.close_rc().await?;
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

fn segment_path(dir: &Path, lane: Lane, id: u64) -> PathBuf {
    dir.join(format!("{}-{id:020}.seg", lane.name()))
}

fn parse_segment_name(name: &str) -> Option<(Lane, u64)> {
    let (lane, id) = name.strip_suffix(".seg")?.split_once('-')?;
    let lane = Lane::ALL.into_iter().find(|known| known.name() == lane)?;
    Some((lane, id.parse().ok()?))
}

/// Reads a sealed segment whole. Memory segments are handed over without a copy.
pub async fn read_segment(segment: &mut SealedSegment) -> io::Result<Vec<u8>> {
    match &mut segment.body {
        SegmentBody::Memory(bytes) => Ok(std::mem::take(bytes)),
        // An empty file (a crash between create and first write, or a disk that lost it) holds
        // nothing to read, and its length is known without a look: recovery took it from the
        // directory listing. Opening it for DMA and closing it unread was followed by the next
        // segment's read failing with EOPNOTSUPP (glommio 0.9, ext4; found by
        // tests/corruption.rs), and the shard could not start.
        SegmentBody::File(_) if segment.bytes == 0 => Ok(Vec::new()),
        SegmentBody::File(path) => read_file(path).await,
    }
}

async fn read_file(path: &Path) -> io::Result<Vec<u8>> {
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

/// Deletes a segment once every flow in it is emitted (or re-buffered for retry).
pub async fn remove_segment(segment: SealedSegment) -> io::Result<()> {
    match segment.body {
        SegmentBody::Memory(_) => Ok(()),
        SegmentBody::File(path) => glommio::io::remove(&path).await.map_err(io::Error::from),
    }
}

/// Segments a crashed or stopped node left in `dir`, oldest first, as sealed segments due
/// one hold after `now` (so heartbeats re-sent after the restart still count).
pub async fn recover_segments(dir: &Path, now: Timestamp) -> io::Result<Vec<SealedSegment>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some((lane, id)) = name.to_str().and_then(parse_segment_name) else {
            continue;
        };
        found.push((id, lane, entry.path(), entry.metadata()?.len()));
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
    /// read; a torn tail past `bytes` is then never decoded again.
    pub fn set_recovered(&mut self, flows: u64, bytes: u64) {
        self.flows = flows;
        self.bytes = bytes;
    }

    /// Cuts the file back to its first `bytes`: the whole blocks before a write the crash
    /// tore. That write was never acked, and left in place it would look like damage to
    /// acked flows once a later segment is the newest (after a second crash).
    pub fn cut_torn_tail(&self, bytes: u64) -> io::Result<()> {
        match &self.body {
            SegmentBody::Memory(_) => Ok(()),
            SegmentBody::File(path) => {
                let file = std::fs::OpenOptions::new().write(true).open(path)?;
                file.set_len(bytes)?;
                file.sync_all()
            }
        }
    }

    /// The part of a segment's bytes that holds whole blocks.
    pub fn valid<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[..bytes.len().min(self.bytes as usize)]
    }
}
