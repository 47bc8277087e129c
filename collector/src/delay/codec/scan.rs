//! Reading a segment's blocks in order, stepping over damage. A flipped bit or a zeroed sector
//! in one block must cost that block only: the blocks after it were acked too. After a block
//! that fails its checks, reading resumes at the next offset where a whole, intact block
//! starts (its magic, a sane length and its CRC all hold); what lay between is reported as
//! [`Damage`]. Only when no intact block follows is the rest of the bytes one damaged tail,
//! which after a crash is the torn last write.

use super::{BLOCK_HEADER_BYTES, Block, BlockError, decode_block};

/// Bytes of a segment that hold no intact block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Where the damaged bytes start, from the start of the scanned bytes.
    pub at: usize,
    pub bytes: usize,
    /// Why the block at `at` was refused; `None`: it claims more bytes than there are.
    pub error: Option<BlockError>,
    /// No intact block follows: the damage is the tail of the bytes.
    pub to_end: bool,
}

impl Damage {
    /// A tail of zeros is the padding an O_DIRECT write leaves, or a write that never landed:
    /// not damage to anything that was acked.
    pub fn is_zeros(&self, bytes: &[u8]) -> bool {
        bytes[self.at..self.at + self.bytes]
            .iter()
            .all(|&byte| byte == 0)
    }

    /// Why the block at `at` was refused, for a log line.
    pub fn reason(&self) -> String {
        self.error
            .as_ref()
            .map_or_else(|| "a length past the end".to_owned(), ToString::to_string)
    }
}

/// The blocks of `bytes` in order, with the damage between them.
pub struct Blocks<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Blocks<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Blocks { bytes, at: 0 }
    }

    /// The end of the last block read (and of any damage stepped over): where a whole prefix
    /// of the bytes ends once the scan is done.
    pub fn position(&self) -> usize {
        self.at
    }
}

impl<'a> Iterator for Blocks<'a> {
    type Item = Result<Block<'a>, Damage>;

    fn next(&mut self) -> Option<Self::Item> {
        let at = self.at;
        if at >= self.bytes.len() {
            return None;
        }
        let error = match decode_block(&self.bytes[at..]) {
            Ok(Some((block, used))) => {
                self.at += used;
                return Some(Ok(block));
            }
            Ok(None) => None,
            Err(error) => Some(error),
        };
        let next = next_intact_block(self.bytes, at + 1);
        let end = next.unwrap_or(self.bytes.len());
        if next.is_some() {
            self.at = end;
        } else {
            // A damaged tail is not consumed: `position` stays where the whole blocks end.
            self.bytes = &self.bytes[..at];
        }
        Some(Err(Damage {
            at,
            bytes: end - at,
            error,
            to_end: next.is_none(),
        }))
    }
}

/// The first offset from `from` where an intact block of any format starts.
fn next_intact_block(bytes: &[u8], from: usize) -> Option<usize> {
    let magics = super::BLOCK_MAGICS.map(u32::to_le_bytes);
    (from..bytes.len().saturating_sub(BLOCK_HEADER_BYTES - 1)).find(|&at| {
        magics.iter().any(|magic| bytes[at..].starts_with(magic))
            && matches!(decode_block(&bytes[at..]), Ok(Some(_)))
    })
}
