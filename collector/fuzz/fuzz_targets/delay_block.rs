//! Segment files are read back after crashes and disk faults: the block decoder must answer
//! any bytes with blocks, "incomplete" or an error, never a panic. An odd first input byte
//! reseals the first block's checksum so mutations reach the flow decoder behind it; its
//! second bit seeds the checksum with the magic, as every format since "FLW3" does.
#![no_main]

use flowattr_collector::delay::codec::{BLOCK_HEADER_BYTES, decode_block};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, bytes)) = input.split_first() else {
        return;
    };
    let mut bytes = bytes.to_vec();
    if mode & 1 == 1 && bytes.len() >= BLOCK_HEADER_BYTES {
        let body_len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let end = (BLOCK_HEADER_BYTES + body_len).min(bytes.len());
        let seed = if mode & 2 == 2 {
            crc32c::crc32c(&bytes[0..4])
        } else {
            0
        };
        let crc = crc32c::crc32c_append(seed, &bytes[12..end]);
        bytes[8..12].copy_from_slice(&crc.to_le_bytes());
    }
    let mut at = 0;
    while let Ok(Some((block, used))) = decode_block(&bytes[at..]) {
        let mut flows = 0u32;
        let _ = block.for_each_flow(|flow| {
            flows += 1;
            assert!(flow.end >= flow.start);
        });
        assert!(flows <= block.flow_count());
        at += used;
    }
});
