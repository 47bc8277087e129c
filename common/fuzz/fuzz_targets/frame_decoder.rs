//! Feeds arbitrary bytes to the frame decoder and every payload validator, as a collector
//! connection would. The first byte chooses whether the checksum of the first frame is fixed up
//! first: without that, almost every mutation would stop at the CRC and the payload validators
//! would never see hostile input.
#![no_main]

use flowattr_common::wire::{AnyMessage, FrameDecoder, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, bytes)) = input.split_first() else { return };
    let mut bytes = bytes.to_vec();
    if mode & 1 == 1 && bytes.len() >= HEADER_BYTES {
        let checksum = crc32c::crc32c_append(crc32c::crc32c(&bytes[..12]), &bytes[HEADER_BYTES..]);
        bytes[12..16].copy_from_slice(&checksum.to_le_bytes());
    }
    let decoder = FrameDecoder::new(1 << 20);
    let mut rest = &bytes[..];
    while let Ok(Some((frame, used))) = decoder.decode(rest) {
        assert!(used >= HEADER_BYTES && used <= rest.len());
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
