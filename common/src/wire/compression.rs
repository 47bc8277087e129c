//! Compressed payloads: header byte 6 says how a frame's payload is stored. Exporters send
//! their flow batches compressed, since a host's batch repeats its workload names, its address
//! and port prefixes and the high bytes of its times: a quarter of the bytes on the wire
//! (docs/benchmarks.md, "Wire bytes"). Everything else travels plain.
//!
//! A compressed payload is one zstd frame that states its size, holding a table of the
//! archive's record arrays and then the archive with each of those arrays stored byte column
//! by byte column (every record's first byte, then every second byte, ...): the same field of
//! consecutive records then lies side by side, which zstd codes far better than records one
//! after another (23 bytes a flow against 35). It expands only into buffers the receiver
//! bounds, so a small frame cannot make a collector allocate more than one plain frame would.

use super::frame::{Frame, FrameKind, check_payload_length, encode_frame_as};
use super::{ArchivedMeasuredFlowBatch, EncodeError, MeasuredFlowBatch, PayloadError};
use rkyv::rancor;

/// How a frame's payload is stored.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadEncoding {
    /// The archive itself, read in place.
    Plain = 0,
    /// A zstd frame stating its size, of a [`RecordArray`] table and the archive with those
    /// arrays stored by byte column.
    Zstd = 1,
}

impl PayloadEncoding {
    pub(super) fn from_byte(byte: u8) -> Option<PayloadEncoding> {
        match byte {
            0 => Some(PayloadEncoding::Plain),
            1 => Some(PayloadEncoding::Zstd),
            _ => None,
        }
    }
}

/// The zstd level exporters compress at: over a host-shaped batch's byte columns, level 3
/// sent under 1% fewer bytes (23.1 a flow against 23.2) and compresses slower (docs/benchmarks.md,
/// "Wire bytes").
pub const COMPRESSION_LEVEL: i32 = 1;

/// Arrays a table may name: a flow batch has two (its records, its round trips).
const ARRAYS_MAX: usize = 4;
const ARRAY_BYTES: usize = 12;

/// Equal-sized records in an archive (an archived `Vec`'s elements), at `offset`, each
/// `stride` bytes long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordArray {
    pub offset: u32,
    pub stride: u32,
    pub count: u32,
}

impl RecordArray {
    fn of<T>(archive: &[u8], elements: &[T]) -> RecordArray {
        // Every element lies inside `archive`: its distance from the start is its offset (an
        // empty slice may point anywhere, and has none).
        let offset = match elements.is_empty() {
            true => 0,
            false => elements.as_ptr().addr() - archive.as_ptr().addr(),
        };
        RecordArray {
            offset: offset as u32,
            stride: size_of::<T>() as u32,
            count: elements.len() as u32,
        }
    }

    fn bytes(self) -> usize {
        self.stride as usize * self.count as usize
    }

    fn end(self) -> u64 {
        u64::from(self.offset) + u64::from(self.stride) * u64::from(self.count)
    }
}

/// The record arrays of an archived [`MeasuredFlowBatch`] (its flow records and round trips),
/// for [`FrameCompressor::encode_archive`]. Their place depends on the batch's shape only, so a
/// sender that patches values into one archive finds them once.
pub fn measured_batch_arrays(archive: &[u8]) -> Result<Vec<RecordArray>, PayloadError> {
    let batch =
        rkyv::access::<ArchivedMeasuredFlowBatch, rancor::Error>(archive).map_err(|error| {
            PayloadError::Malformed {
                kind: FrameKind::MeasuredFlowBatch,
                reason: error.to_string(),
            }
        })?;
    let mut arrays = vec![
        RecordArray::of(archive, batch.batch.flows.as_slice()),
        RecordArray::of(archive, batch.round_trips.as_slice()),
    ];
    arrays.retain(|array| array.count > 0);
    arrays.sort_by_key(|array| array.offset);
    Ok(arrays)
}

/// Archives batches and frames them compressed, reusing one zstd context and its buffers.
pub struct FrameCompressor {
    context: zstd::bulk::Compressor<'static>,
    content: Vec<u8>,
    compressed: Vec<u8>,
}

impl FrameCompressor {
    pub fn new(level: i32) -> Result<FrameCompressor, EncodeError> {
        let context = zstd::bulk::Compressor::new(level).map_err(|error| EncodeError::Archive {
            kind: FrameKind::MeasuredFlowBatch,
            reason: format!("zstd level {level}: {error}"),
        })?;
        Ok(FrameCompressor {
            context,
            content: Vec::new(),
            compressed: Vec::new(),
        })
    }

    /// Appends `batch` to `out` as one compressed frame.
    pub fn encode_batch(
        &mut self,
        batch: &MeasuredFlowBatch,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let kind = FrameKind::MeasuredFlowBatch;
        let archive =
            rkyv::to_bytes::<rancor::Error>(batch).map_err(|error| EncodeError::Archive {
                kind,
                reason: error.to_string(),
            })?;
        let arrays = measured_batch_arrays(&archive).map_err(|error| EncodeError::Archive {
            kind,
            reason: error.to_string(),
        })?;
        self.encode_archive(kind, &archive, &arrays, out)
    }

    /// Appends one compressed frame of `kind` whose payload is `archive`, with `arrays` (sorted,
    /// apart, inside it: [`measured_batch_arrays`]) stored by byte column.
    pub fn encode_archive(
        &mut self,
        kind: FrameKind,
        archive: &[u8],
        arrays: &[RecordArray],
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        // Checked before compressing: the receiver expands no further than this.
        check_payload_length(kind, archive.len())?;
        check_arrays(arrays, archive.len()).map_err(|reason| EncodeError::Archive {
            kind,
            reason: reason.to_owned(),
        })?;
        self.content.clear();
        self.content.push(arrays.len() as u8);
        for array in arrays {
            for value in [array.offset, array.stride, array.count] {
                self.content.extend_from_slice(&value.to_le_bytes());
            }
        }
        let archive_at = self.content.len();
        self.content.extend_from_slice(archive);
        for &array in arrays {
            let start = archive_at + array.offset as usize;
            let rows = &archive[array.offset as usize..][..array.bytes()];
            by_columns(
                rows,
                array.stride as usize,
                &mut self.content[start..][..rows.len()],
            );
        }
        self.compressed.clear();
        self.compressed
            .reserve(zstd::zstd_safe::compress_bound(self.content.len()));
        self.context
            .compress_to_buffer(&self.content[..], &mut self.compressed)
            .map_err(|error| EncodeError::Archive {
                kind,
                reason: format!("zstd: {error}"),
            })?;
        encode_frame_as(kind, PayloadEncoding::Zstd, &self.compressed, out)
    }
}

/// Sorted by offset, apart, inside an archive of `len` bytes, at most [`ARRAYS_MAX`].
fn check_arrays(arrays: &[RecordArray], len: usize) -> Result<(), &'static str> {
    if arrays.len() > ARRAYS_MAX {
        return Err("more record arrays than a table holds");
    }
    let mut free_from = 0;
    for array in arrays {
        if array.stride == 0 || u64::from(array.offset) < free_from || array.end() > len as u64 {
            return Err("record arrays overlap, are out of order or run past the archive");
        }
        free_from = array.end();
    }
    Ok(())
}

/// Rows of `stride` bytes, written as columns: every row's byte 0, then every row's byte 1...
fn by_columns(rows: &[u8], stride: usize, columns: &mut [u8]) {
    let count = rows.len() / stride;
    transpose(
        count,
        stride,
        |row, column| row * stride + column,
        rows,
        |row, column| column * count + row,
        columns,
    );
}

/// The inverse of [`by_columns`].
fn by_rows(columns: &[u8], stride: usize, rows: &mut [u8]) {
    let count = columns.len() / stride;
    transpose(
        count,
        stride,
        |row, column| column * count + row,
        columns,
        |row, column| row * stride + column,
        rows,
    );
}

/// Copies the `rows` x `columns` bytes of `from` to `to`, where `at_from` and `at_to` give a
/// (row, column) byte's place in each, 8 rows and 8 columns at a time: a block is eight 8-byte
/// loads along one layout, a transposition in registers and eight 8-byte stores along the
/// other. (Byte by byte, a collector expanding host-shaped batches took 0.86x of its plain
/// throughput; in blocks, 0.92x.) Each layout must be contiguous along rows or along columns:
/// a block's words are read and written along whichever it is.
fn transpose(
    rows: usize,
    columns: usize,
    at_from: impl Fn(usize, usize) -> usize,
    from: &[u8],
    at_to: impl Fn(usize, usize) -> usize,
    to: &mut [u8],
) {
    let (full_rows, full_columns) = (rows - rows % 8, columns - columns % 8);
    // Which axis a word runs along, in each layout: the one where the next byte is adjacent.
    let from_by_row = columns < 2 || at_from(0, 1) == at_from(0, 0) + 1;
    let to_by_row = columns < 2 || at_to(0, 1) == at_to(0, 0) + 1;
    for row in (0..full_rows).step_by(8) {
        for column in (0..full_columns).step_by(8) {
            let mut words = [0u64; 8];
            for (k, word) in words.iter_mut().enumerate() {
                let at = match from_by_row {
                    true => at_from(row + k, column),
                    false => at_from(row, column + k),
                };
                *word = u64::from_le_bytes(from[at..at + 8].try_into().expect("8 bytes"));
            }
            // Read by row, a word is a row's 8 columns; written by row it must be again.
            if from_by_row != to_by_row {
                words = transpose8(words);
            }
            for (k, word) in words.iter().enumerate() {
                let at = match to_by_row {
                    true => at_to(row + k, column),
                    false => at_to(row, column + k),
                };
                to[at..at + 8].copy_from_slice(&word.to_le_bytes());
            }
        }
    }
    // The rows and columns past the last whole block, a byte at a time.
    for row in 0..rows {
        let first = if row < full_rows { full_columns } else { 0 };
        for column in first..columns {
            to[at_to(row, column)] = from[at_from(row, column)];
        }
    }
}

/// An 8x8 byte matrix held as 8 words (word x's byte y is element (x, y)), transposed: word y's
/// byte x. Three rounds swap 4x4, 2x2 and 1x1 blocks across the diagonal.
#[inline(always)]
fn transpose8(mut words: [u64; 8]) -> [u64; 8] {
    for (distance, mask) in [
        (4, 0x0000_0000_FFFF_FFFFu64),
        (2, 0x0000_FFFF_0000_FFFF),
        (1, 0x00FF_00FF_00FF_00FF),
    ] {
        let shift = 8 * distance as u32;
        for x in 0..8 {
            if x & distance == 0 {
                let swapped = ((words[x] >> shift) ^ words[x + distance]) & mask;
                words[x] ^= swapped << shift;
                words[x + distance] ^= swapped;
            }
        }
    }
    words
}

/// Expands compressed frames into buffers of its own, with one zstd context: one per receiving
/// thread (a collector shard), not per connection, so idle connections hold no expansion
/// memory.
pub struct FrameExpander {
    context: zstd::bulk::Decompressor<'static>,
    content: Vec<u8>,
    payload: Vec<u8>,
}

impl FrameExpander {
    pub fn new() -> Result<FrameExpander, std::io::Error> {
        Ok(FrameExpander {
            context: zstd::bulk::Decompressor::new()?,
            content: Vec::new(),
            payload: Vec::new(),
        })
    }

    /// `frame` with its payload as the archive: the frame itself when plain, else its payload
    /// expanded here. An archive over `limit` bytes (the receiver's largest plain payload) is
    /// refused before any of it is written.
    pub fn expand<'f>(
        &'f mut self,
        frame: Frame<'f>,
        limit: usize,
    ) -> Result<Frame<'f>, PayloadError> {
        if frame.encoding == PayloadEncoding::Plain {
            return Ok(frame);
        }
        let bad = |reason: String| PayloadError::Compressed {
            kind: frame.kind,
            reason,
        };
        let size = match zstd::zstd_safe::get_frame_content_size(frame.payload) {
            Ok(Some(size)) => size,
            Ok(None) => return Err(bad("the zstd frame does not state its size".into())),
            Err(_) => return Err(bad("not a zstd frame".into())),
        };
        let table_max = 1 + ARRAYS_MAX * ARRAY_BYTES;
        if size > (limit + table_max) as u64 {
            return Err(bad(format!(
                "expands to {size} bytes, over the limit of {limit}"
            )));
        }
        self.content.clear();
        self.content.reserve(size as usize);
        let written = self
            .context
            .decompress_to_buffer(frame.payload, &mut self.content)
            .map_err(|error| bad(format!("zstd: {error}")))?;
        if written as u64 != size {
            return Err(bad(format!(
                "expanded to {written} bytes, but states {size}"
            )));
        }
        let (arrays, archive) = read_table(&self.content).map_err(|reason| bad(reason.into()))?;
        if archive.len() > limit {
            return Err(bad(format!(
                "holds an archive of {} bytes, over the limit of {limit}",
                archive.len()
            )));
        }
        check_arrays(&arrays, archive.len()).map_err(|reason| bad(reason.into()))?;
        // Each byte written once: the bytes between the arrays copied, the arrays transposed
        // back. The buffer keeps its length, so it is zeroed only when it grows.
        if self.payload.len() < archive.len() {
            self.payload.resize(archive.len(), 0);
        }
        let payload = &mut self.payload[..archive.len()];
        let mut copied = 0;
        for array in arrays {
            let (at, end) = (array.offset as usize, array.end() as usize);
            payload[copied..at].copy_from_slice(&archive[copied..at]);
            by_rows(
                &archive[at..end],
                array.stride as usize,
                &mut payload[at..end],
            );
            copied = end;
        }
        payload[copied..].copy_from_slice(&archive[copied..]);
        Ok(Frame {
            kind: frame.kind,
            encoding: PayloadEncoding::Plain,
            checksum: frame.checksum,
            payload: &self.payload[..archive.len()],
        })
    }
}

/// The array table at the start of an expanded payload, and the archive after it.
fn read_table(content: &[u8]) -> Result<(Vec<RecordArray>, &[u8]), &'static str> {
    let (&count, rest) = content.split_first().ok_or("an empty payload")?;
    let count = usize::from(count);
    if count > ARRAYS_MAX {
        return Err("more record arrays than a table holds");
    }
    let (table, archive) = rest
        .split_at_checked(count * ARRAY_BYTES)
        .ok_or("a record array table cut short")?;
    let arrays = table
        .chunks_exact(ARRAY_BYTES)
        .map(|entry| {
            let word = |at: usize| u32::from_le_bytes(entry[at..at + 4].try_into().expect("4"));
            RecordArray {
                offset: word(0),
                stride: word(4),
                count: word(8),
            }
        })
        .collect();
    Ok((arrays, archive))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_8x8_block_transposes() {
        let words: [u64; 8] =
            std::array::from_fn(|x| u64::from_le_bytes(std::array::from_fn(|y| (x * 8 + y) as u8)));
        let transposed = transpose8(words);
        for (y, word) in transposed.iter().enumerate() {
            assert_eq!(
                word.to_le_bytes(),
                std::array::from_fn::<u8, 8, _>(|x| (x * 8 + y) as u8)
            );
        }
    }

    #[test]
    fn columns_are_every_row_s_byte_in_turn() {
        for (stride, count) in [(1, 20), (9, 17), (16, 16), (88, 70), (3, 8)] {
            let rows: Vec<u8> = (0..stride * count).map(|i| (i * 7 % 251) as u8).collect();
            let mut columns = vec![0; rows.len()];
            by_columns(&rows, stride, &mut columns);
            for row in 0..count {
                for column in 0..stride {
                    assert_eq!(columns[column * count + row], rows[row * stride + column]);
                }
            }
        }
    }

    #[test]
    fn columns_and_rows_are_inverses_for_any_stride_and_count() {
        for stride in [1, 2, 7, 8, 9, 17, 88] {
            for count in [0, 1, 7, 8, 9, 63, 64, 65, 200] {
                let rows: Vec<u8> = (0..stride * count).map(|i| (i * 7 % 251) as u8).collect();
                let mut columns = vec![0; rows.len()];
                by_columns(&rows, stride, &mut columns);
                if count > 1 && stride > 1 {
                    assert_eq!(columns[1], rows[stride], "row 1's byte 0 is second");
                }
                let mut back = vec![0; rows.len()];
                by_rows(&columns, stride, &mut back);
                assert_eq!(back, rows, "stride {stride}, {count} rows");
            }
        }
    }
}
