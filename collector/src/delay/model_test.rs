//! The delay buffer against a model, on a disk that crashes, tears writes, fails writes and
//! syncs, and flips bits at rest ([`SimulatedDisk`]). Random sequences of append, write (the
//! ack point), seal, release, injected failures, corruption, and crash-then-recover run the
//! same code the shard runs (`SegmentWriter`, `read_segment`, `remove_segment`,
//! `recover_segments`, `scan_recovered`, the release scan), and after every step:
//!
//! - nothing acked is lost: after a crash every acked, unreleased batch is recovered, unless a
//!   bit flip hit its block;
//! - nothing is released twice, and nothing that was never appended comes out;
//! - damage is counted exactly: one count per corrupted block, whenever it is found, except a
//!   flip in the last block of a lane's newest segment at a crash, which cannot be told from a
//!   torn write (documented in docs/reliability.md);
//! - accounting is exact: a released segment holds the flows the buffer counted for it, and a
//!   drained buffer counts no flows and no bytes and leaves no segment file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};
use futures_lite::future::block_on;
use proptest::prelude::*;

use super::codec::{BlockHeader, Blocks, BufferedFlow};
use super::simulated_disk::SimulatedDisk;
use super::*;

const DELAY: Duration = Duration::from_millis(1000);
const RETRY_DELAY: Duration = Duration::from_millis(1500);
const SPAN: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
enum Op {
    Append { retry_lane: bool, flows: u8 },
    Write { retry_lane: bool },
    Tick { millis: u16 },
    Release,
    FailWrites(u8),
    FailSyncs(u8),
    Corrupt { pick: usize, at: usize, bit: u8 },
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), 1u8..40).prop_map(|(retry_lane, flows)| Op::Append { retry_lane, flows }),
        5 => any::<bool>().prop_map(|retry_lane| Op::Write { retry_lane }),
        4 => (1u16..900).prop_map(|millis| Op::Tick { millis }),
        3 => Just(Op::Release),
        1 => (1u8..3).prop_map(Op::FailWrites),
        1 => (1u8..3).prop_map(Op::FailSyncs),
        1 => (any::<usize>(), any::<usize>(), any::<u8>()).prop_map(|(pick, at, bit)| Op::Corrupt { pick, at, bit }),
        1 => Just(Op::Crash),
    ]
}

fn lane_of(retry_lane: bool) -> Lane {
    if retry_lane { Lane::Retry } else { Lane::Fresh }
}

/// Batch `sequence`'s flows: their ports say whose they are, so a mixed-up flow is caught.
fn flows_of(sequence: u64, count: u8) -> Vec<BufferedFlow> {
    (0..count)
        .map(|index| BufferedFlow {
            local_ip: CanonicalIp::from_v4([10, 0, (sequence >> 8) as u8, sequence as u8].into()),
            remote_ip: CanonicalIp::from_v4([10, 1, 0, index].into()),
            local_port: sequence as u16,
            remote_port: u16::from(index) + 1,
            local_workload: Some(0),
            local_shared: false,
            start: Timestamp::from_nanos(sequence * 1_000 + u64::from(index)),
            end: Timestamp::from_nanos(sequence * 1_000 + u64::from(index) + 500),
            bytes_sent: sequence,
            bytes_received: u64::from(index),
            segments_sent: 1,
            segments_received: 1,
            retransmits: 0,
            round_trip: None,
            direction: Direction::Outbound,
            state: FlowState::Closed,
            index: u32::from(index),
            retries: 0,
        })
        .collect()
}

/// What a shard holds in memory: lost at a crash.
struct Running {
    buffer: DelayBuffer<u64>,
    writers: [SegmentWriter<SimulatedDisk>; 2],
    ids: SegmentIds,
    /// Bytes a failed write must write again before anything newer (as the shard's writer
    /// retries in place).
    retrying: [Option<Unwritten<u64>>; 2],
}

impl Running {
    fn new(disk: &SimulatedDisk, dir: &Path, highest: Option<u64>) -> Running {
        let writer = |lane| {
            SegmentWriter::new(
                lane,
                Storage::Disk {
                    dir: dir.to_owned(),
                },
                SPAN,
                disk.clone(),
            )
        };
        Running {
            buffer: DelayBuffer::new(DELAY, RETRY_DELAY),
            writers: [writer(Lane::Fresh), writer(Lane::Retry)],
            ids: SegmentIds::starting_after(highest),
            retrying: [None, None],
        }
    }
}

/// A bit flipped in a block nobody has released yet.
#[derive(Debug)]
struct Corruption {
    path: PathBuf,
}

struct Harness {
    disk: SimulatedDisk,
    dir: PathBuf,
    now: Timestamp,
    running: Running,
    appended: BTreeMap<u64, u8>,
    acked: BTreeSet<u64>,
    released: BTreeSet<u64>,
    /// Acked batches a bit flip took.
    excused: BTreeSet<u64>,
    corruptions: Vec<Corruption>,
    damage_counted: u64,
    damage_expected: u64,
    next_sequence: u64,
}

impl Harness {
    fn new(seed: u64) -> Harness {
        let disk = SimulatedDisk::new(seed);
        let dir = PathBuf::from("/shard-0");
        Harness {
            running: Running::new(&disk, &dir, None),
            disk,
            dir,
            now: Timestamp::from_nanos(1_000_000_000_000),
            appended: BTreeMap::new(),
            acked: BTreeSet::new(),
            released: BTreeSet::new(),
            excused: BTreeSet::new(),
            corruptions: Vec::new(),
            damage_counted: 0,
            damage_expected: 0,
            next_sequence: 0,
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Append { retry_lane, flows } => {
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                let header = BlockHeader::of_exporter(1, sequence, self.now);
                let lane = lane_of(retry_lane);
                self.running
                    .buffer
                    .append(lane, &header, &["w"], &flows_of(sequence, flows));
                self.running.buffer.complete_when_durable(lane, sequence);
                self.appended.insert(sequence, flows);
            }
            Op::Write { retry_lane } => self.write(lane_of(retry_lane)),
            Op::Tick { millis } => {
                self.now = self
                    .now
                    .saturating_add(Duration::from_millis(u64::from(millis)));
                self.seal();
            }
            Op::Release => self.release(),
            Op::FailWrites(count) => self.disk.fail_writes(u32::from(count)),
            Op::FailSyncs(count) => self.disk.fail_syncs(u32::from(count)),
            Op::Corrupt { pick, at, bit } => self.corrupt(pick, at, bit),
            Op::Crash => self.crash(),
        }
    }

    /// The shard's write step: retry what failed, else take what is unwritten; ack on success.
    fn write(&mut self, lane: Lane) {
        let index = lane as usize;
        let unwritten = match self.running.retrying[index].take() {
            Some(unwritten) => unwritten,
            None => self.running.buffer.take_unwritten(lane),
        };
        if unwritten.is_empty() {
            return;
        }
        let writer = &mut self.running.writers[index];
        match block_on(writer.write(
            &unwritten.bytes,
            unwritten.flows,
            self.now,
            &mut self.running.ids,
        )) {
            Ok(()) => self.acked.extend(unwritten.completions),
            Err(_) => self.running.retrying[index] = Some(unwritten),
        }
        self.seal();
    }

    fn seal(&mut self) {
        for writer in &mut self.running.writers {
            // A failed seal leaves the segment open; the next pass seals it.
            if let Ok(Some(sealed)) = block_on(writer.seal_if_due(self.now)) {
                self.running.buffer.push_sealed(sealed);
            }
        }
    }

    /// The release step: every due segment read, its blocks emitted, damage counted, deleted.
    fn release(&mut self) {
        while let Some(mut segment) = self.running.buffer.take_due(self.now) {
            let bytes =
                block_on(read_segment(&self.disk, &mut segment)).expect("the simulated disk reads");
            let mut flows = 0u64;
            for read in Blocks::new(segment.valid(&bytes)) {
                let block = match read {
                    Ok(block) => block,
                    Err(_) => {
                        self.damage_counted += 1;
                        continue;
                    }
                };
                let sequence = block.header.sequence;
                let expected = flows_of(
                    sequence,
                    *self
                        .appended
                        .get(&sequence)
                        .expect("released a batch never appended"),
                );
                let mut got = Vec::new();
                block
                    .for_each_flow(|flow| got.push(flow))
                    .expect("an intact block decodes");
                assert_eq!(got, expected, "batch {sequence} came back different");
                assert!(
                    self.released.insert(sequence),
                    "batch {sequence} released twice"
                );
                flows += got.len() as u64;
            }
            let corrupted = self
                .corruptions
                .iter()
                .any(|corruption| segment.path() == Some(&corruption.path));
            if corrupted {
                assert!(flows <= segment.flows);
            } else {
                assert_eq!(
                    flows, segment.flows,
                    "segment {} held other flows than counted",
                    segment.id
                );
            }
            let bytes = segment.bytes;
            self.corruptions
                .retain(|corruption| segment.path() != Some(&corruption.path));
            block_on(remove_segment(&self.disk, segment)).expect("the simulated disk removes");
            self.running.buffer.deleted(bytes);
        }
    }

    /// Flips a bit in one block of a sealed, unreleased, not yet corrupted segment.
    fn corrupt(&mut self, pick: usize, at: usize, bit: u8) {
        let open: Vec<PathBuf> = self.open_paths();
        let candidates: Vec<PathBuf> = self
            .disk
            .paths()
            .into_iter()
            .filter(|path| !open.contains(path))
            .filter(|path| {
                !self
                    .corruptions
                    .iter()
                    .any(|corruption| &corruption.path == path)
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let path = candidates[pick % candidates.len()].clone();
        let bytes = self.disk.contents(&path).expect("listed");
        // The intact blocks and where they lie; only acked, unreleased ones are worth a flip.
        let mut blocks = Vec::new();
        let mut scan = Blocks::new(&bytes);
        let mut start = 0;
        while let Some(read) = scan.next() {
            if let Ok(block) = read {
                blocks.push((start, scan.position(), block.header.sequence));
            }
            start = scan.position();
        }
        let worth: Vec<_> = blocks
            .iter()
            .filter(|(_, _, sequence)| {
                self.acked.contains(sequence) && !self.released.contains(sequence)
            })
            .collect();
        if worth.is_empty() {
            return;
        }
        let &(from, to, sequence) = worth[at % worth.len()];
        self.disk.flip_bit(&path, from + at % (to - from), bit);
        self.excused.insert(sequence);
        self.damage_expected += 1;
        self.corruptions.push(Corruption { path });
    }

    fn open_paths(&self) -> Vec<PathBuf> {
        // Open segments are the newest file of their lane that is not sealed in the buffer;
        // the writers do not say, so they are found as the files the buffer has not sealed.
        let mut sealed = Vec::new();
        for lane in &self.running.buffer.lanes {
            for segment in &lane.sealed {
                sealed.push(segment.path().map(Path::to_owned));
            }
        }
        self.disk
            .paths()
            .into_iter()
            .filter(|path| !sealed.contains(&Some(path.clone())))
            .collect()
    }

    fn crash(&mut self) {
        self.disk.crash();
        // A flip anywhere in a lane's newest segment reads as a torn write: judged at this
        // restart as one, and not counted as damage (it cannot be told apart).
        let listed = block_on(recover_segments(&self.disk, &self.dir, self.now)).expect("lists");
        let newest = |lane| {
            listed
                .iter()
                .filter(|segment| segment.lane == lane)
                .map(|segment| segment.id)
                .max()
        };
        let newest = [newest(Lane::Fresh), newest(Lane::Retry)];
        let in_newest = |path: &Path| {
            listed
                .iter()
                .any(|segment| newest.contains(&Some(segment.id)) && segment.path() == Some(path))
        };
        let judged_torn = self
            .corruptions
            .iter()
            .filter(|corruption| in_newest(&corruption.path))
            .count();
        self.damage_expected -= judged_torn as u64;
        self.corruptions
            .retain(|corruption| !in_newest(&corruption.path));
        // Restart: recover as the shard's replay does.
        let highest = listed.iter().map(|segment| segment.id).max();
        self.running = Running::new(&self.disk, &self.dir, highest);
        let mut recovered = BTreeSet::new();
        for mut segment in listed {
            let written_at_crash = newest.contains(&Some(segment.id));
            let bytes = block_on(read_segment(&self.disk, &mut segment)).expect("reads");
            let mut flows = 0u64;
            let verdict = scan_recovered(&bytes, written_at_crash, |block| {
                let sequence = block.header.sequence;
                assert!(
                    self.appended.contains_key(&sequence),
                    "recovered batch {sequence} was never appended"
                );
                recovered.insert(sequence);
                flows += u64::from(block.flow_count());
            });
            if verdict.lost.is_some() {
                self.damage_counted += 1;
            }
            segment.set_recovered(flows, verdict.whole_bytes);
            match verdict.repair(&bytes) {
                Repair::None => {}
                Repair::Cut(whole) => segment.cut_tail(&self.disk, whole).expect("cuts"),
                Repair::Rewrite(intact) => {
                    block_on(segment.rewrite(&self.disk, &intact)).expect("rewrites")
                }
            }
            self.running.buffer.push_sealed(segment);
        }
        for sequence in &self.acked {
            if !self.released.contains(sequence) && !self.excused.contains(sequence) {
                assert!(
                    recovered.contains(sequence),
                    "acked batch {sequence} lost in a crash"
                );
            }
        }
        // What was appended but never acked is the exporters' to resend; it may have been
        // recovered (written, not yet acked), and then it counts as held.
        self.acked.extend(
            recovered
                .iter()
                .filter(|sequence| !self.released.contains(sequence)),
        );
    }

    /// Everything out: hold long enough, write, seal and release until nothing is left.
    fn drain(&mut self) {
        self.disk.fail_writes(0);
        self.disk.fail_syncs(0);
        for _ in 0..4 {
            self.write(Lane::Fresh);
            self.write(Lane::Retry);
            self.now = self.now.saturating_add(RETRY_DELAY + SPAN);
            self.seal();
            self.now = self.now.saturating_add(RETRY_DELAY + SPAN);
            self.release();
        }
    }

    fn check_end(&self) {
        for sequence in &self.acked {
            assert!(
                self.released.contains(sequence) || self.excused.contains(sequence),
                "acked batch {sequence} never came out"
            );
        }
        assert_eq!(
            self.damage_counted, self.damage_expected,
            "damage counted {} times for {} flips",
            self.damage_counted, self.damage_expected
        );
        let buffer = &self.running.buffer;
        assert_eq!(
            (
                buffer.sealed_flows(),
                buffer.sealed_bytes(),
                buffer.total_bytes()
            ),
            (0, 0, 0)
        );
        let left: Vec<_> = self.disk.paths();
        assert!(
            left.is_empty(),
            "segment files left after the drain: {left:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn the_delay_buffer_keeps_every_acked_flow_through_crashes_torn_writes_and_bit_flips(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..150),
    ) {
        let mut harness = Harness::new(seed);
        for op in &ops {
            harness.apply(op);
        }
        harness.drain();
        harness.check_end();
    }
}
