//! A bit stream, least significant bit first: what the modelled flow encoding writes its codes
//! and mantissas into, with no byte boundary between fields.

use super::BlockError;

/// Appends bits to a byte vector through a 64-bit accumulator.
pub(super) struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    pending: u64,
    /// Bits held in `pending`, always below 32 between calls.
    held: u32,
}

impl<'a> BitWriter<'a> {
    pub(super) fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter {
            out,
            pending: 0,
            held: 0,
        }
    }

    /// Writes the low `bits` (at most 32) of `value`; the bits above must be zero.
    #[inline]
    pub(super) fn put(&mut self, value: u64, bits: u32) {
        debug_assert!(bits <= 32 && (bits == 64 || value >> bits == 0));
        self.pending |= value << self.held;
        self.held += bits;
        if self.held >= 32 {
            self.out
                .extend_from_slice(&(self.pending as u32).to_le_bytes());
            self.pending >>= 32;
            self.held -= 32;
        }
    }

    /// Writes the low `bits` (any number up to 64) of `value`.
    #[inline]
    pub(super) fn put_long(&mut self, value: u64, bits: u32) {
        if bits > 32 {
            self.put(value & 0xFFFF_FFFF, 32);
            self.put(value >> 32, bits - 32);
        } else {
            self.put(value, bits);
        }
    }

    /// Writes out the last partial byte, zero-padded.
    pub(super) fn finish(self) {
        let bytes = self.held.div_ceil(8) as usize;
        self.out
            .extend_from_slice(&self.pending.to_le_bytes()[..bytes]);
    }
}

/// Reads a [`BitWriter`]'s bits back. Every read checks that the bits were there: a corrupt
/// stream is an error, never a panic.
pub(super) struct BitReader<'a> {
    bytes: &'a [u8],
    /// Bits read from `bytes` but not consumed, lowest first.
    window: u64,
    /// Valid bits in `window`.
    held: u32,
}

impl<'a> BitReader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        BitReader {
            bytes,
            window: 0,
            held: 0,
        }
    }

    /// Tops the window up to at least 56 bits, or to what is left. Inlined: it runs every few
    /// codes, and as a call it kept the decoder's state in memory.
    #[inline(always)]
    fn refill(&mut self) {
        if let Some(word) = self.bytes.first_chunk::<8>() {
            // Whole bytes only: the ones that fit beside the bits held.
            self.window |= u64::from_le_bytes(*word) << self.held;
            let taken = (63 - self.held) / 8;
            self.bytes = &self.bytes[taken as usize..];
            self.held += taken * 8;
            // Bits past `held` that came with the word are read again with the next one.
            self.window &= low_mask(self.held);
        } else {
            self.refill_from_last_bytes();
        }
    }

    /// The stream's last seven bytes or fewer, one at a time.
    #[cold]
    fn refill_from_last_bytes(&mut self) {
        while self.held <= 56 {
            let Some((&byte, rest)) = self.bytes.split_first() else {
                break;
            };
            self.window |= u64::from(byte) << self.held;
            self.held += 8;
            self.bytes = rest;
        }
    }

    /// The next `bits` (at most 56) without consuming them; bits past the stream's end read
    /// as zeros, which [`Self::consume`] then refuses.
    #[inline]
    pub(super) fn peek(&mut self, bits: u32) -> u64 {
        debug_assert!(bits <= 56);
        if self.held < bits {
            self.refill();
        }
        self.window & low_mask(bits)
    }

    #[inline]
    pub(super) fn consume(&mut self, bits: u32, what: &'static str) -> Result<(), BlockError> {
        if bits > self.held {
            return Err(BlockError::Truncated { what });
        }
        self.window >>= bits;
        self.held -= bits;
        Ok(())
    }

    /// The next `bits` (at most 64).
    #[inline]
    pub(super) fn take(&mut self, bits: u32, what: &'static str) -> Result<u64, BlockError> {
        if bits > 32 {
            let low = self.take(32, what)?;
            return Ok(low | self.take(bits - 32, what)? << 32);
        }
        let value = self.peek(bits);
        self.consume(bits, what)?;
        Ok(value)
    }

    /// Whole bytes left unread once the last partial byte's padding is skipped: zero at the
    /// end of a stream the writer finished.
    pub(super) fn bytes_left(&self) -> usize {
        self.bytes.len() + (self.held / 8) as usize
    }
}

fn low_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn bits_read_back_as_written(fields in proptest::collection::vec((any::<u64>(), 0u32..=64), 0..200)) {
            let mut out = Vec::new();
            let mut writer = BitWriter::new(&mut out);
            for &(value, bits) in &fields {
                writer.put_long(value & low_mask(bits), bits);
            }
            writer.finish();
            let total: u32 = fields.iter().map(|&(_, bits)| bits).sum();
            prop_assert_eq!(out.len(), total.div_ceil(8) as usize);
            let mut reader = BitReader::new(&out);
            for &(value, bits) in &fields {
                prop_assert_eq!(reader.take(bits, "field").unwrap(), value & low_mask(bits));
            }
            prop_assert_eq!(reader.bytes_left(), 0);
            prop_assert!(reader.take(8, "past the end").is_err());
        }
    }
}
