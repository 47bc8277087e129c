//! The corruption matrix (docs/reliability.md): damage done to a killed node's data directory
//! (a flipped bit, a zeroed sector, a torn tail, an emptied file, a damaged tail in a segment
//! that was complete, a garbled manifest), then a restart. The node never panics, emits every
//! flow the damage did not touch exactly once, and counts each damaged run of acked blocks in
//! `flowattr_delay_corrupt_blocks_total`; damage it cannot repair itself stops it with one line
//! that names the fix.

mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowattr_collector::delay::codec::{Blocks, decode_block};
use flowattr_common::wire::{AckStatus, FlowBatch};
use flowattr_common::{CanonicalIp, Timestamp};
use support::{Collector, batch_of, closed_flow, read_output, wait_for_records};

const FLOWS_PER_BATCH: u64 = 3;

/// A segment's blocks: (start, end, batch sequence).
type BlockSpans = Vec<(usize, usize, u64)>;

/// A data directory holding acked batches, buffered and due long after the kill.
struct Buffered {
    dir: tempfile::TempDir,
    /// Each fresh segment, oldest first, with its blocks: (start, end, batch sequence).
    segments: Vec<(PathBuf, BlockSpans)>,
}

impl Buffered {
    fn data(&self) -> PathBuf {
        self.dir.path().join("buffer")
    }

    fn output(&self) -> PathBuf {
        self.dir.path().join("flows.jsonl")
    }

    fn start(&self, delay: &str, segment_span: &str) -> Collector {
        let data = self.data();
        let args = [
            "--cpus",
            "1",
            "--data-dir",
            data.to_str().unwrap(),
            "--delay",
            delay,
            "--segment-span",
            segment_span,
            "--max-retries",
            "0",
        ];
        Collector::start(&self.output(), &args)
    }

    /// Batch sequences of every buffered block.
    fn sequences(&self) -> Vec<u64> {
        self.segments
            .iter()
            .flat_map(|(_, blocks)| blocks.iter().map(|block| block.2))
            .collect()
    }

    /// Restarts the node and checks that exactly the batches `lost` names are missing, nothing
    /// comes out twice, and the damage counter reads `counted` (and the torn-write one `torn`).
    fn restart_and_check(&self, lost: &[u64], counted: u64, torn: u64) {
        let restarted = self.start("1s", "250ms");
        let kept: Vec<u64> = self
            .sequences()
            .into_iter()
            .filter(|sequence| !lost.contains(sequence))
            .collect();
        wait_for_records(&self.output(), kept.len() * FLOWS_PER_BATCH as usize);
        // Anything wrongly emitted would come with the rest.
        std::thread::sleep(Duration::from_secs(1));
        let (records, counts) = read_output(&self.output());
        let mut emitted: Vec<(u64, u64)> = records
            .keys()
            .map(|&(_, sequence, index)| (sequence, index))
            .collect();
        emitted.sort();
        let expected: Vec<(u64, u64)> = kept
            .iter()
            .flat_map(|&sequence| (0..FLOWS_PER_BATCH).map(move |index| (sequence, index)))
            .collect();
        assert_eq!(emitted, expected);
        assert!(
            counts.values().all(|&count| count == 1),
            "a flow came out twice"
        );
        assert_eq!(
            restarted.metric("flowattr_delay_corrupt_blocks_total", None),
            counted
        );
        assert_eq!(
            restarted.metric("flowattr_delay_torn_writes_total", None),
            torn
        );
    }
}

fn batch(sequence: u64) -> FlowBatch {
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(30));
    let flows = (0..FLOWS_PER_BATCH as u8)
        .map(|remote| {
            closed_flow(
                (CanonicalIp::from(Ipv4Addr::new(10, 8, 0, 1)), 40_000),
                (CanonicalIp::from(Ipv4Addr::new(10, 8, 1, remote)), 443),
                Some(0),
                t0,
                t0.saturating_add(Duration::from_secs(1)),
            )
        })
        .collect();
    batch_of(1, sequence, "client", flows)
}

fn blocks_of(path: &Path) -> BlockSpans {
    let bytes = std::fs::read(path).unwrap();
    let mut at = 0;
    Blocks::new(&bytes)
        .map_while(Result::ok)
        .map(|block| {
            let start = at;
            at += decode_block(&bytes[start..]).unwrap().unwrap().1;
            (start, at, block.header.sequence)
        })
        .collect()
}

/// Sends `counts[i]` batches into the `i`th fresh segment (each its own block), then kills the
/// node: they are acked and buffered for ten minutes.
fn buffer(counts: &[u64]) -> Buffered {
    let dir = tempfile::tempdir().unwrap();
    let mut buffered = Buffered {
        dir,
        segments: Vec::new(),
    };
    let collector = buffered.start("10m", "1s");
    let mut connection = collector.connect();
    let mut sequence = 0;
    for (segment, &count) in counts.iter().enumerate() {
        if segment > 0 {
            // The open segment is sealed once its span has passed and a write comes.
            std::thread::sleep(Duration::from_millis(1_200));
        }
        let batches: Vec<FlowBatch> = (sequence..sequence + count).map(batch).collect();
        sequence += count;
        let acks = connection.send_all(&batches, 1).unwrap();
        assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    }
    collector.kill();
    let mut segments: Vec<PathBuf> = std::fs::read_dir(buffered.data().join("shard-0"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("fresh-")
        })
        .collect();
    segments.sort_by_key(|path| {
        let name = path.file_stem().unwrap().to_str().unwrap();
        name.trim_start_matches("fresh-").parse::<u64>().unwrap()
    });
    buffered.segments = segments
        .into_iter()
        .map(|path| (path.clone(), blocks_of(&path)))
        .collect();
    let per_segment: Vec<u64> = buffered
        .segments
        .iter()
        .map(|(_, blocks)| blocks.len() as u64)
        .collect();
    assert_eq!(per_segment, counts, "one block per batch, segments as sent");
    buffered
}

fn edit(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    change(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

/// Batch sequences of the blocks that overlap `range`.
fn touched(blocks: &[(usize, usize, u64)], range: std::ops::Range<usize>) -> Vec<u64> {
    blocks
        .iter()
        .filter(|(start, end, _)| *start < range.end && range.start < *end)
        .map(|block| block.2)
        .collect()
}

#[test]
fn a_flipped_bit_costs_only_its_block() {
    let buffered = buffer(&[5, 1]);
    let (segment, blocks) = &buffered.segments[0];
    let (start, _, sequence) = blocks[2];
    edit(segment, |bytes| bytes[start + 40] ^= 0x10);
    buffered.restart_and_check(&[sequence], 1, 0);
}

#[test]
fn damage_in_the_segment_being_written_is_judged_a_torn_write_once() {
    // Disks do not write a request's sectors in order: a crash can keep a later sector of
    // the last write and not an earlier one. Damage in the newest segment may be that, so it
    // is counted as a torn write, not as lost acked flows; the blocks after it are kept, and
    // the segment is rewritten without it, so a second crash does not judge it again.
    let buffered = buffer(&[5]);
    let (segment, blocks) = &buffered.segments[0];
    let (start, _, sequence) = blocks[2];
    edit(segment, |bytes| bytes[start + 40] ^= 0x10);
    let second = buffered.start("10m", "1s");
    second.wait_for_metric("flowattr_delay_torn_writes_total", None, 1);
    let intact: usize = blocks
        .iter()
        .filter(|block| block.2 != sequence)
        .map(|block| block.1 - block.0)
        .sum();
    assert_eq!(
        std::fs::metadata(segment).unwrap().len() as usize,
        intact,
        "rewritten with its intact blocks"
    );
    second.kill();
    buffered.restart_and_check(&[sequence], 0, 0);
}

#[test]
fn a_zeroed_sector_costs_only_the_blocks_it_covers() {
    let buffered = buffer(&[16, 1]);
    let (segment, blocks) = &buffered.segments[0];
    let sector = 512..1024;
    let lost = touched(blocks, sector.clone());
    assert!(
        !lost.is_empty() && blocks.last().unwrap().1 > sector.end,
        "the sector lies inside the blocks"
    );
    edit(segment, |bytes| bytes[sector].fill(0));
    buffered.restart_and_check(&lost, 1, 0);
}

#[test]
fn a_torn_tail_in_the_segment_being_written_was_never_acked_and_is_not_counted() {
    // The crash came in the middle of the last write: only what follows the last whole block
    // is cut, and its batch had no ack yet (here it had, so it goes missing, uncounted).
    let buffered = buffer(&[5]);
    let (segment, blocks) = &buffered.segments[0];
    let (start, end, sequence) = blocks[4];
    edit(segment, |bytes| bytes.truncate((start + end) / 2));
    buffered.restart_and_check(&[sequence], 0, 1);
}

#[test]
fn a_torn_tail_is_cut_at_replay_so_a_second_crash_does_not_count_it() {
    let buffered = buffer(&[5]);
    let (segment, blocks) = &buffered.segments[0];
    let (start, end, torn) = blocks[4];
    edit(segment, |bytes| bytes.truncate((start + end) / 2));
    // A life that replays the torn segment and takes one more batch, which opens a newer
    // segment; then a second crash, before anything is released.
    let second = buffered.start("10m", "1s");
    let ack = second.connect().send_and_wait(&batch(5)).unwrap();
    assert_eq!(ack.status, AckStatus::Accepted);
    assert_eq!(
        std::fs::metadata(segment).unwrap().len() as usize,
        start,
        "the torn write is cut off"
    );
    second.kill();
    let lost = [torn];
    let restarted = buffered.start("1s", "250ms");
    let kept: Vec<u64> = (0..6).filter(|sequence| !lost.contains(sequence)).collect();
    wait_for_records(&buffered.output(), kept.len() * FLOWS_PER_BATCH as usize);
    std::thread::sleep(Duration::from_secs(1));
    let (records, _) = read_output(&buffered.output());
    let mut sequences: Vec<u64> = records.keys().map(|&(_, sequence, _)| sequence).collect();
    sequences.sort();
    sequences.dedup();
    assert_eq!(sequences, kept);
    assert_eq!(
        restarted.metric("flowattr_delay_corrupt_blocks_total", None),
        0
    );
}

#[test]
fn a_damaged_tail_in_a_segment_that_was_complete_is_counted() {
    let buffered = buffer(&[4, 2]);
    let (older, blocks) = &buffered.segments[0];
    let (start, _, sequence) = blocks[3];
    edit(older, |bytes| bytes[start + 40] ^= 0x01);
    buffered.restart_and_check(&[sequence], 1, 0);
}

#[test]
fn an_emptied_segment_loses_only_its_own_blocks() {
    let buffered = buffer(&[3, 2]);
    let (older, blocks) = &buffered.segments[0];
    let lost: Vec<u64> = blocks.iter().map(|block| block.2).collect();
    std::fs::write(older, b"").unwrap();
    buffered.restart_and_check(&lost, 0, 0);
}

#[test]
fn a_garbled_manifest_beside_segments_stops_the_node_with_the_fix_then_nothing_is_lost() {
    let buffered = buffer(&[4]);
    let manifest = buffered.data().join("manifest");
    std::fs::write(&manifest, b"\x00\x13garbage").unwrap();
    let output = Collector::command(
        &buffered.output(),
        &[
            "--cpus",
            "1",
            "--data-dir",
            buffered.data().to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert!(
        !output.status.success(),
        "a node that cannot tell how its segments were routed must not start"
    );
    let stderr = String::from_utf8(output.stderr).unwrap();
    // Warnings about the host (its file limit, say) may come first; the error is one line.
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.contains(" WARN "))
        .collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("shards=N") && lines[0].contains("manifest"),
        "{stderr}"
    );
    std::fs::write(&manifest, b"shards=1\n").unwrap();
    buffered.restart_and_check(&[], 0, 0);
}

#[test]
fn a_garbled_or_empty_manifest_with_nothing_buffered_is_rewritten() {
    for garbled in [&b""[..], b"\xff\xfeshards=??"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("buffer");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("manifest"), garbled).unwrap();
        let collector = Collector::start(
            &dir.path().join("flows.jsonl"),
            &["--cpus", "1", "--data-dir", data.to_str().unwrap()],
        );
        assert_eq!(
            std::fs::read_to_string(data.join("manifest")).unwrap(),
            "shards=1\n"
        );
        collector.kill();
    }
}
