//! Feeds arbitrary bytes to the frame decoder and every payload validator, as a collector
//! connection would. Bit 0 of the first byte chooses whether the checksum of the first frame is
//! fixed up first: without that, almost every mutation would stop at the CRC and the payload validators
//! would never see hostile input. Bit 1 compresses the payload of a plain first frame (and
//! reseals it), so the payload validators also see hostile input through the expander; mutated
//! compressed payloads reach the zstd decoder itself.
#![no_main]

use flowattr_common::wire::{AnyMessage, FrameDecoder, FrameExpander, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, bytes)) = input.split_first() else { return };
    let mut bytes = bytes.to_vec();
    if mode & 2 == 2 && bytes.len() >= HEADER_BYTES && bytes[6] == 0 {
        // An empty record-array table, then the payload.
        let content = [&[0], &bytes[HEADER_BYTES..]].concat();
        let compressed = zstd::bulk::compress(&content, 1).expect("compresses");
        bytes.truncate(HEADER_BYTES);
        bytes[6] = 1;
        bytes[8..12].copy_from_slice(&(compressed.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&compressed);
    }
    if mode & 3 != 0 && bytes.len() >= HEADER_BYTES {
        let checksum = crc32c::crc32c_append(crc32c::crc32c(&bytes[..12]), &bytes[HEADER_BYTES..]);
        bytes[12..16].copy_from_slice(&checksum.to_le_bytes());
    }
    let decoder = FrameDecoder::new(1 << 20);
    let mut expander = FrameExpander::new().expect("a zstd context");
    let mut rest = &bytes[..];
    while let Ok(Some((frame, used))) = decoder.decode(rest) {
        assert!(used >= HEADER_BYTES && used <= rest.len());
        let Ok(frame) = expander.expand(frame, decoder.payload_bytes_max()) else {
            rest = &rest[used..];
            continue;
        };
        assert!(frame.payload.len() <= decoder.payload_bytes_max());
        if let Ok(AnyMessage::FlowBatch(batch)) = frame.message() {
            // Records are checked one by one; a checked record's name must resolve.
            for (index, record) in batch.records().iter().enumerate() {
                if batch.check_record(record).is_ok() {
                    let _ = batch.local_workload_name(record);
                }
                let _ = batch.round_trip(index);
            }
        }
        rest = &rest[used..];
    }
});
