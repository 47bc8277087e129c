//! The few pieces of Protocol Buffers' wire format the sink writes by hand: varints, field
//! keys, and length-delimited fields whose length goes in front once their body is written.
//! What they write is what prost writes, proto3's rule of omitting zero values included.

use crate::sink::record::IpBytes;

const VARINT: u32 = 0;
const LENGTH_DELIMITED: u32 = 2;

/// A field's key, (number << 3) | wire type, as its varint bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Key {
    bytes: [u8; 2],
    len: u8,
}

impl Key {
    /// The key of an integer or enum field.
    pub const fn varint(field: u32) -> Key {
        Key::new(field, VARINT)
    }

    /// The key of a bytes, string or message field.
    pub const fn length_delimited(field: u32) -> Key {
        Key::new(field, LENGTH_DELIMITED)
    }

    const fn new(field: u32, wire_type: u32) -> Key {
        let value = field << 3 | wire_type;
        assert!(
            value < 1 << 14,
            "the schema's field numbers take at most two key bytes"
        );
        if value < 0x80 {
            Key {
                bytes: [value as u8, 0],
                len: 1,
            }
        } else {
            Key {
                bytes: [value as u8 | 0x80, (value >> 7) as u8],
                len: 2,
            }
        }
    }
}

/// Where messages are written: a buffer kept longer than what is written, so that each small
/// piece (a key, a varint) is one fixed-size copy rather than a call to copy a few bytes.
/// Bytes past [`Self::len`] are scratch; the buffer is never shortened, so it is zeroed once
/// in its life rather than for every batch.
#[derive(Debug, Default)]
pub(super) struct Output {
    bytes: Vec<u8>,
    len: usize,
}

impl Output {
    /// Starts writing over `bytes` (a previous output's buffer, kept for its capacity).
    pub fn reuse(bytes: Vec<u8>) -> Output {
        Output { bytes, len: 0 }
    }

    /// Forgets what was written, keeping the buffer.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Forgets what was written after the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        assert!(len <= self.len, "truncating {} bytes to {len}", self.len);
        self.len = len;
    }

    /// The buffer, whose first [`Self::len`] bytes are what was written.
    pub fn into_buffer(self) -> Vec<u8> {
        self.bytes
    }

    /// Makes room for `additional` more bytes of writing; every `put_*` below takes at most
    /// [`Output::FIELD_MAX`] plus the slice it copies.
    pub fn reserve(&mut self, additional: usize) {
        let needed = self.len + additional;
        if self.bytes.len() < needed {
            self.bytes.resize(needed.max(self.bytes.len() * 2), 0);
        }
    }

    /// The most bytes a varint takes.
    pub const VARINT_MAX: usize = 10;

    /// The room one integer field takes at most: its key and the longest varint.
    pub const FIELD_MAX: usize = 2 + Output::VARINT_MAX;

    #[inline]
    fn put_key(&mut self, key: Key) {
        self.bytes[self.len..self.len + 2].copy_from_slice(&key.bytes);
        self.len += usize::from(key.len);
    }

    /// Byte stores straight into the buffer: the branch on each byte predicts well, as a
    /// field's values keep their size from flow to flow (measured faster than assembling the
    /// bytes in a register and storing them at once).
    #[inline]
    pub fn put_varint(&mut self, mut value: u64) {
        let out = &mut self.bytes[self.len..self.len + Output::VARINT_MAX];
        let mut len = 0;
        while value >= 0x80 {
            out[len] = value as u8 | 0x80;
            value >>= 7;
            len += 1;
        }
        out[len] = value as u8;
        self.len += len + 1;
    }

    /// Copies bytes written elsewhere (fields encoded once per batch).
    pub fn put_raw(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// An integer or enum field; nothing when it is 0.
    #[inline(always)]
    pub fn put_uint(&mut self, key: Key, value: u64) {
        if value != 0 {
            self.put_key(key);
            self.put_varint(value);
        }
    }

    /// A bytes or string field; nothing when it is empty.
    pub fn put_bytes(&mut self, key: Key, value: &[u8]) {
        if !value.is_empty() {
            self.put_element(key, value);
        }
    }

    /// An address field (an element of a repeated one too): 4 or 16 bytes, written as one
    /// fixed 16-byte copy into the scratch room, of which its length is kept. Needs
    /// [`Output::ADDRESS_MAX`] of room.
    #[inline]
    pub fn put_address(&mut self, key: Key, address: &IpBytes) {
        self.put_key(key);
        let length = address.as_ref().len();
        self.put_varint(length as u64);
        self.bytes[self.len..self.len + 16].copy_from_slice(address.padded());
        self.len += length;
    }

    /// The room [`Self::put_address`] takes at most.
    pub const ADDRESS_MAX: usize = 2 + 1 + 16;

    /// One element of a repeated bytes or string field: written even when empty, as it holds
    /// its place in the list.
    pub fn put_element(&mut self, key: Key, value: &[u8]) {
        self.put_key(key);
        self.put_varint(value.len() as u64);
        self.put_raw(value);
    }

    /// A bytes field of `records` stored byte by byte, each record's first `skip` bytes left
    /// out: every record's byte `skip`, then every record's next byte, to the last. Needs
    /// [`Output::FIELD_MAX`] and the field's length of room.
    pub fn put_byte_planes<const RECORD: usize>(
        &mut self,
        key: Key,
        records: &[[u8; RECORD]],
        skip: usize,
    ) {
        self.put_key(key);
        self.put_varint((records.len() * (RECORD - skip)) as u64);
        for at in skip..RECORD {
            let plane = &mut self.bytes[self.len..self.len + records.len()];
            for (byte, record) in plane.iter_mut().zip(records) {
                *byte = record[at];
            }
            self.len += records.len();
        }
    }

    /// Starts a message field written in place: its body follows two bytes kept for its
    /// length, the length's size for any body under 16 KiB, so most bodies never move.
    pub fn start_message(&mut self, key: Key) -> OpenMessage {
        self.put_key(key);
        let length_at = self.len;
        self.len += 2;
        OpenMessage { length_at }
    }

    /// Writes the body's length in front of it, in as few bytes as it takes.
    pub fn finish_message(&mut self, message: OpenMessage) {
        let at = message.length_at;
        let body = self.len - at - 2;
        if body < 0x80 {
            self.bytes[at] = body as u8;
            self.bytes.copy_within(at + 2..self.len, at + 1);
            self.len -= 1;
        } else if body < 1 << 14 {
            self.bytes[at] = body as u8 | 0x80;
            self.bytes[at + 1] = (body >> 7) as u8;
        } else {
            let mut length = Output::default();
            length.reserve(Output::FIELD_MAX);
            length.put_varint(body as u64);
            self.bytes.truncate(self.len);
            self.bytes
                .splice(at..at + 2, length.bytes[..length.len].iter().copied());
            self.len = self.bytes.len();
        }
    }

    /// What was written.
    pub fn written(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A message field [`Output::start_message`] began.
pub(super) struct OpenMessage {
    length_at: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(value: u64) -> Vec<u8> {
        let mut out = Output::default();
        out.reserve(Output::FIELD_MAX);
        out.put_varint(value);
        out.written().to_vec()
    }

    #[test]
    fn varints_and_keys_are_the_wire_formats() {
        for (value, bytes) in [
            (0, vec![0]),
            (1, vec![1]),
            (127, vec![127]),
            (128, vec![0x80, 1]),
            (300, vec![0xac, 0x02]),
            (
                u64::MAX,
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1],
            ),
        ] {
            assert_eq!(varint(value), bytes, "{value}");
            let mut prost = Vec::new();
            prost::encoding::encode_varint(value, &mut prost);
            assert_eq!(varint(value), prost, "{value}");
        }
        // Either side of every power of two (so of every varint length), and values of every
        // bit length with their bits mixed.
        let mut rng = fastrand::Rng::with_seed(56);
        for bits in 0..64 {
            let power = 1u64 << bits;
            let mixed = power | rng.u64(..power);
            for value in [power - 1, power, power + 1, mixed, !0 >> (63 - bits)] {
                let mut prost = Vec::new();
                prost::encoding::encode_varint(value, &mut prost);
                assert_eq!(varint(value), prost, "{value:#x}");
            }
        }
        // Written over scratch: what lies past a varint stays scratch.
        let mut out = Output::reuse(vec![0xff; 32]);
        out.reserve(Output::FIELD_MAX * 2);
        out.put_varint(1);
        out.put_varint(300);
        assert_eq!(out.written(), [1, 0xac, 0x02]);
        let mut out = Output::default();
        out.reserve(4);
        out.put_key(Key::varint(1));
        out.put_key(Key::length_delimited(30));
        assert_eq!(out.written(), [0x08, 0xf2, 0x01]);
    }

    #[test]
    fn a_message_s_length_takes_one_two_or_three_bytes_as_its_body_needs() {
        for body in [0, 1, 127, 128, 16_383, 16_384, 70_000] {
            let mut out = Output::reuse(vec![0xee; 100]);
            out.reserve(1 + body + 4);
            out.put_raw(&[7]);
            let message = out.start_message(Key::length_delimited(1));
            out.put_raw(&vec![0x55; body]);
            out.finish_message(message);
            let mut expected = vec![7, 0x0a];
            expected.extend(varint(body as u64));
            expected.extend(std::iter::repeat_n(0x55, body));
            assert_eq!(out.written(), expected, "a body of {body} bytes");
        }
    }
}
