//! What a segment left by a crash holds: its whole blocks, and how to judge the damage among
//! them. Only the newest segment of a lane was being written at the crash, so only there can
//! damage be a torn write: the crash kept some sectors of the last write and not others, at
//! the end or, as disks do not write a request's sectors in order, anywhere in it. That write
//! was never acked. Anywhere else damage is to acked flows, and counted: a damaged tail here,
//! at once; damage between intact blocks when the segment is released, where it is read for
//! the last time.
//!
//! Whatever the verdict, the file is repaired so the judgement is made once: a crash after a
//! restart must not judge (or count) the same bytes again.

use std::ops::Range;

use super::codec::{Block, Blocks, Damage};

/// The verdict on one recovered segment's bytes.
#[derive(Debug, Default)]
pub struct RecoveredSegment {
    /// Where its whole blocks end (and any damage between them).
    pub whole_bytes: u64,
    /// The newest segment's damage: a write the crash tore (or, indistinguishably, damage to
    /// acked flows in the segment being written).
    pub torn: Vec<Damage>,
    /// A damaged tail of a segment that was complete before the crash: acked flows lost.
    pub lost: Option<Damage>,
    /// Where the intact blocks lie.
    intact: Vec<Range<usize>>,
}

/// How to leave the file so that nothing is judged twice.
#[derive(Debug, PartialEq, Eq)]
pub enum Repair {
    None,
    /// Cut the file back to its whole blocks (a damaged tail).
    Cut(u64),
    /// Write its intact blocks, and only them, in its place (damage between blocks).
    Rewrite(Vec<u8>),
}

impl RecoveredSegment {
    pub fn repair(&self, bytes: &[u8]) -> Repair {
        if self.torn.iter().any(|damage| !damage.to_end) {
            Repair::Rewrite(
                self.intact
                    .iter()
                    .flat_map(|range| &bytes[range.clone()])
                    .copied()
                    .collect(),
            )
        } else if !self.torn.is_empty() || self.lost.is_some() {
            Repair::Cut(self.whole_bytes)
        } else {
            Repair::None
        }
    }
}

/// Calls `each_block` with every intact block of `bytes` in order, and judges the damage.
pub fn scan_recovered<'a>(
    bytes: &'a [u8],
    written_at_crash: bool,
    mut each_block: impl FnMut(Block<'a>),
) -> RecoveredSegment {
    let mut verdict = RecoveredSegment::default();
    let mut scan = Blocks::new(bytes);
    let mut start = 0;
    while let Some(read) = scan.next() {
        match read {
            Ok(block) => {
                verdict.intact.push(start..scan.position());
                each_block(block);
            }
            // A tail of zeros is O_DIRECT padding or a write that never landed.
            Err(damage) if damage.to_end && damage.is_zeros(bytes) => {}
            Err(damage) if written_at_crash => verdict.torn.push(damage),
            Err(damage) if damage.to_end => verdict.lost = Some(damage),
            Err(_) => {}
        }
        start = scan.position();
    }
    verdict.whole_bytes = scan.position() as u64;
    verdict
}
