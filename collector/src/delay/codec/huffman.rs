//! Canonical Huffman codes built per block from the block's own symbol counts: the part of the
//! modelled flow encoding that adapts to what a block holds, with no model fixed in advance.
//!
//! A code is written as its symbols' code lengths: the count of symbols present (varint), and
//! for two or more, the lowest symbol and the span (varints) and one length per symbol of the
//! span, two to a byte (0: absent). A single symbol takes no bits at all.

use super::BlockError;
use super::bits::BitReader;
#[cfg(test)]
use super::bits::BitWriter;
use super::varint::{Reader, put_varint};

/// Longest code, so that a decoding table has at most 2048 entries (4 KB): the tables of a
/// block's columns stay in the first-level cache.
const LENGTH_MAX: u32 = 11;

/// Symbols fit in 12 bits beside a 4-bit length in a table entry.
pub(super) const SYMBOLS_MAX: usize = 256;

/// An entry no code reaches: a damaged stream that lands there is an error.
const NO_CODE: u16 = u16::MAX;

/// How to write each symbol: its code, bit-reversed for the least-significant-first stream,
/// and the code's length.
#[derive(Debug, Clone)]
pub(super) struct Encoder {
    codes: [(u16, u8); SYMBOLS_MAX],
}

impl Encoder {
    /// The code for `counts` (how often each symbol occurs), written to `out` as lengths.
    pub(super) fn build(counts: &[u32; SYMBOLS_MAX], out: &mut Vec<u8>) -> Encoder {
        let lengths = code_lengths(counts);
        write_code(counts, &lengths, out);
        Encoder {
            codes: canonical_codes(&lengths),
        }
    }

    /// The code of `symbol` (as the stream's bits, lowest first) and its length.
    #[inline]
    pub(super) fn code(&self, symbol: usize) -> (u64, u32) {
        let (code, length) = self.codes[symbol];
        (u64::from(code), u32::from(length))
    }

    #[cfg(test)]
    fn put(&self, symbol: usize, bits: &mut BitWriter<'_>) {
        let (code, length) = self.code(symbol);
        bits.put(code, length);
    }
}

/// A table indexed by the next `width` bits of the stream: each entry the symbol whose code
/// those bits start with and the code's length.
#[derive(Debug, Clone)]
pub(super) struct Decoder {
    width: u32,
    entries: Vec<u16>,
}

impl Decoder {
    /// Reads a code's lengths written by [`Encoder::build`].
    pub(super) fn read(reader: &mut Reader<'_>, what: &'static str) -> Result<Decoder, BlockError> {
        let mut lengths = [0u8; SYMBOLS_MAX];
        let present = reader.varint(what)?;
        match present {
            0 => {}
            1 => {
                let symbol = reader.varint(what)?;
                if symbol >= SYMBOLS_MAX as u64 {
                    return Err(BlockError::OutOfRange { what });
                }
                // The one symbol has a code of no bits: its table has one entry.
                return Ok(Decoder {
                    width: 0,
                    entries: vec![(symbol as u16) << 4],
                });
            }
            _ => {
                let low = reader.varint(what)?;
                let span = reader.varint(what)?;
                if low.saturating_add(span) > SYMBOLS_MAX as u64 {
                    return Err(BlockError::OutOfRange { what });
                }
                let packed = reader.bytes(span.div_ceil(2), what)?;
                for i in 0..span as usize {
                    lengths[low as usize + i] = (packed[i / 2] >> (4 * (i % 2))) & 0xF;
                }
            }
        }
        let width = u32::from(lengths.iter().copied().max().unwrap_or(0));
        if width > LENGTH_MAX {
            return Err(BlockError::OutOfRange { what });
        }
        // A code longer than the lengths allow (Kraft sum above one) would give two symbols
        // one table entry.
        let kraft: u64 = lengths
            .iter()
            .filter(|&&length| length != 0)
            .map(|&length| 1u64 << (LENGTH_MAX - u32::from(length)))
            .sum();
        if kraft > 1 << LENGTH_MAX {
            return Err(BlockError::OutOfRange { what });
        }
        let mut entries = vec![NO_CODE; 1 << width];
        for (symbol, &(code, length)) in canonical_codes(&lengths).iter().enumerate() {
            if length == 0 {
                continue;
            }
            let entry = (symbol as u16) << 4 | u16::from(length);
            // Every index whose low `length` bits are the code.
            for high in 0..1usize << (width - u32::from(length)) {
                entries[usize::from(code) | high << length] = entry;
            }
        }
        Ok(Decoder { width, entries })
    }

    #[inline(always)]
    pub(super) fn decode(
        &self,
        bits: &mut BitReader<'_>,
        what: &'static str,
    ) -> Result<usize, BlockError> {
        let entry = self.entries[bits.peek(self.width) as usize & (self.entries.len() - 1)];
        if entry == NO_CODE {
            return Err(BlockError::OutOfRange { what });
        }
        bits.consume(u32::from(entry & 0xF), what)?;
        Ok(usize::from(entry >> 4))
    }

    /// A number coded as its bit length, then the bits below its highest one.
    #[inline(always)]
    pub(super) fn decode_number(&self, bits: &mut BitReader<'_>) -> Result<u64, BlockError> {
        // One refill covers the code (12 bits at most) and a mantissa of up to 44 bits.
        let window = bits.peek(56);
        let entry = self.entries[window as usize & (self.entries.len() - 1)];
        if entry == NO_CODE {
            return Err(BlockError::OutOfRange { what: "number" });
        }
        let (length, code_length) = (u32::from(entry >> 4), u32::from(entry & 0xF));
        match length {
            0 | 1 => {
                bits.consume(code_length, "number")?;
                Ok(u64::from(length))
            }
            2..=45 => {
                let mantissa = (window >> code_length) & ((1 << (length - 1)) - 1);
                bits.consume(code_length + length - 1, "number")?;
                Ok(1 << (length - 1) | mantissa)
            }
            46..=64 => {
                bits.consume(code_length, "number")?;
                Ok(1 << (length - 1) | bits.take(length - 1, "number")?)
            }
            _ => Err(BlockError::OutOfRange { what: "number" }),
        }
    }
}

/// Optimal code lengths for `counts`, none above [`LENGTH_MAX`]: when the optimal code is
/// longer, the counts are flattened (halved, each kept above zero) until it is not, which costs
/// little since only the rarest symbols are affected.
fn code_lengths(counts: &[u32; SYMBOLS_MAX]) -> [u8; SYMBOLS_MAX] {
    let mut counts = *counts;
    loop {
        let lengths = unlimited_code_lengths(&counts);
        if lengths
            .iter()
            .all(|&length| u32::from(length) <= LENGTH_MAX)
        {
            return lengths;
        }
        for count in counts.iter_mut().filter(|count| **count != 0) {
            *count = (*count >> 1) | 1;
        }
    }
}

/// Huffman's construction: merge the two lightest trees until one is left; a symbol's length
/// is its depth. A single symbol gets length 0 (it needs no bits).
fn unlimited_code_lengths(counts: &[u32; SYMBOLS_MAX]) -> [u8; SYMBOLS_MAX] {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    let mut lengths = [0u8; SYMBOLS_MAX];
    // Trees as (weight, node); leaves are 0..SYMBOLS_MAX, merged nodes follow.
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = counts
        .iter()
        .enumerate()
        .filter(|(_, count)| **count != 0)
        .map(|(symbol, &count)| Reverse((u64::from(count), symbol)))
        .collect();
    if heap.len() < 2 {
        return lengths;
    }
    let mut parent: Vec<usize> = vec![usize::MAX; SYMBOLS_MAX];
    while heap.len() > 1 {
        let Reverse((weight_a, a)) = heap.pop().expect("two trees");
        let Reverse((weight_b, b)) = heap.pop().expect("two trees");
        let node = parent.len();
        parent.push(usize::MAX);
        parent[a] = node;
        parent[b] = node;
        heap.push(Reverse((weight_a + weight_b, node)));
    }
    for (symbol, length) in lengths.iter_mut().enumerate() {
        if counts[symbol] == 0 {
            continue;
        }
        let (mut node, mut depth) = (symbol, 0u8);
        while parent[node] != usize::MAX {
            node = parent[node];
            depth = depth.saturating_add(1);
        }
        *length = depth;
    }
    lengths
}

/// Canonical codes for `lengths` (shorter codes first, then by symbol), bit-reversed.
fn canonical_codes(lengths: &[u8; SYMBOLS_MAX]) -> [(u16, u8); SYMBOLS_MAX] {
    let mut codes = [(0u16, 0u8); SYMBOLS_MAX];
    let mut per_length = [0u32; LENGTH_MAX as usize + 1];
    for &length in lengths.iter().filter(|&&length| length != 0) {
        per_length[usize::from(length)] += 1;
    }
    let mut next = [0u32; LENGTH_MAX as usize + 2];
    let mut code = 0u32;
    for length in 1..=LENGTH_MAX as usize {
        code = (code + per_length[length - 1]) << 1;
        next[length] = code;
    }
    for (symbol, &length) in lengths.iter().enumerate() {
        if length == 0 || u32::from(length) > LENGTH_MAX {
            continue;
        }
        let code = next[usize::from(length)];
        next[usize::from(length)] += 1;
        let reversed = (code.reverse_bits() >> (32 - u32::from(length))) as u16;
        codes[symbol] = (reversed, length);
    }
    codes
}

fn write_code(counts: &[u32; SYMBOLS_MAX], lengths: &[u8; SYMBOLS_MAX], out: &mut Vec<u8>) {
    let mut present = (0..SYMBOLS_MAX).filter(|&symbol| counts[symbol] != 0);
    let (Some(low), high) = (present.next(), present.next_back()) else {
        put_varint(out, 0);
        return;
    };
    let Some(high) = high else {
        put_varint(out, 1);
        put_varint(out, low as u64);
        return;
    };
    put_varint(out, 2 + present.count() as u64);
    put_varint(out, low as u64);
    put_varint(out, (high - low + 1) as u64);
    for pair in lengths[low..=high].chunks(2) {
        out.push(pair[0] | pair.get(1).map_or(0, |high| high << 4));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip(symbols: &[usize]) -> Vec<u8> {
        let mut counts = [0u32; SYMBOLS_MAX];
        for &symbol in symbols {
            counts[symbol] += 1;
        }
        let mut out = Vec::new();
        let encoder = Encoder::build(&counts, &mut out);
        let table_bytes = out.len();
        let mut bits = BitWriter::new(&mut out);
        for &symbol in symbols {
            encoder.put(symbol, &mut bits);
        }
        bits.finish();
        let mut reader = Reader(&out);
        let decoder = Decoder::read(&mut reader, "code").unwrap();
        assert_eq!(out.len() - reader.0.len(), table_bytes);
        let mut bits = BitReader::new(reader.0);
        for &symbol in symbols {
            assert_eq!(decoder.decode(&mut bits, "symbol").unwrap(), symbol);
        }
        assert_eq!(bits.bytes_left(), 0);
        out
    }

    proptest! {
        #[test]
        fn symbols_read_back_as_written(symbols in proptest::collection::vec(0usize..SYMBOLS_MAX, 0..400)) {
            round_trip(&symbols);
        }

        /// Counts of wildly different sizes would make codes longer than a table allows
        /// without the limit.
        #[test]
        fn skewed_counts_keep_codes_within_the_limit(exponents in proptest::collection::vec(0u32..16, 2..40)) {
            let symbols: Vec<usize> = exponents
                .iter()
                .enumerate()
                .flat_map(|(symbol, &exponent)| std::iter::repeat_n(symbol, 1 << exponent))
                .collect();
            round_trip(&symbols);
        }

        #[test]
        fn arbitrary_tables_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut reader = Reader(&bytes);
            if let Ok(decoder) = Decoder::read(&mut reader, "code") {
                let mut bits = BitReader::new(reader.0);
                // A lone symbol takes no bits: it decodes forever.
                for _ in 0..1000 {
                    if decoder.decode(&mut bits, "symbol").is_err() {
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn a_lone_symbol_takes_no_bits_and_common_symbols_take_fewer() {
        let out = round_trip(&[7; 1000]);
        assert_eq!(out.len(), 2);
        let mut symbols = vec![1; 900];
        symbols.extend([2; 90]);
        symbols.extend([3; 10]);
        // 900 of one bit, 100 of two: 138 bytes of stream.
        let out = round_trip(&symbols);
        assert!(out.len() <= 138 + 5, "{} bytes", out.len());
    }
}
