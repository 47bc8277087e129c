//! LEB128 varints, zigzag for signed deltas, and a bounds-checked reader: the primitives both
//! block formats are written in.

use super::BlockError;

pub(super) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(super) fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

pub(super) fn unzigzag(value: u64) -> i64 {
    (value >> 1) as i64 ^ -((value & 1) as i64)
}

/// The unread rest of a block body. Every read checks its bounds: a corrupt block is an
/// error, never a panic.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    #[inline]
    pub(super) fn varint(&mut self, what: &'static str) -> Result<u64, BlockError> {
        // Decoding is most of a release's cost after attribution: away from the body's end
        // a varint is read with no bounds check per byte.
        if let Some(bytes) = self.0.first_chunk::<10>() {
            let mut value = 0u64;
            for (i, &byte) in bytes.iter().enumerate() {
                value |= u64::from(byte & 0x7f) << (7 * i);
                if byte < 0x80 {
                    if i == 9 && byte > 1 {
                        break;
                    }
                    self.0 = &self.0[i + 1..];
                    return Ok(value);
                }
            }
            return Err(BlockError::OutOfRange { what });
        }
        self.varint_near_end(what)
    }

    /// Fewer than 10 bytes are left, so a varint that does not end in them is cut short, never
    /// too long.
    fn varint_near_end(&mut self, what: &'static str) -> Result<u64, BlockError> {
        debug_assert!(self.0.len() < 10);
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(BlockError::Truncated { what })
    }

    #[inline]
    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, BlockError> {
        u32::try_from(self.varint(what)?).map_err(|_| BlockError::OutOfRange { what })
    }

    #[inline]
    pub(super) fn byte(&mut self, what: &'static str) -> Result<u8, BlockError> {
        Ok(self.bytes(1, what)?[0])
    }

    #[inline]
    pub(super) fn bytes(&mut self, len: u64, what: &'static str) -> Result<&'a [u8], BlockError> {
        if len > self.0.len() as u64 {
            return Err(BlockError::Truncated { what });
        }
        let (taken, rest) = self.0.split_at(len as usize);
        self.0 = rest;
        Ok(taken)
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], BlockError> {
        Ok(self.bytes(N as u64, what)?.try_into().expect("N bytes"))
    }
}
