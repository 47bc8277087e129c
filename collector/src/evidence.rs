//! The trust boundary: what an exporter claims is checked here, record by record, before any
//! of it reaches a shard. A record that breaks the wire format's rules, repeats an earlier
//! record of its batch, or claims a time this node cannot believe is refused on its own: the
//! rest of its batch is stored, and the ack tells the exporter which records went and why.
//!
//! Time is checked against this node's clock at arrival. A record may end at most
//! `max_clock_skew` after arrival (an exporter reports a flow after it happened, so a later end
//! means the exporter's clock runs ahead: its heartbeats would claim IPs into their next
//! owners' time, or for years), and must end after `arrival - retention` (older evidence could
//! only be evicted at once). Refusals are counted per exporter, so an operator can find the
//! host with the bad clock.
//!
//! An exporter that knows its clock's offset against the collector's (from the clock probe it
//! opens each connection with, and the acks of its batches) sends it with each batch. Its
//! times are then corrected by that offset before anything else, so a host whose clock is off
//! by seconds attributes as if it were right; and a batch whose reading is uncertain by more
//! than half the slack is refused (`clock_uncertain`): two hosts within half the slack each are
//! within the slack of one another, which the lookup window absorbs, and nothing is known
//! beyond it. A batch without a reading (cut while the collector was unreachable, or from an
//! older exporter) is taken as stamped. Flows forwarded to another region leave corrected, on
//! this node's clock.
//!
//! Over mutual TLS, a record's local IP must also be one its client may claim
//! ([`crate::tls::ClaimSet`]): a compromised host cannot speak for other hosts' IPs.

use std::time::Duration;

use flowattr_common::wire::{ArchivedFlowRecord, RecordRefusal, RefusedRecord, ValidFlowBatch};
use flowattr_common::{Timestamp, duration_nanos};
use rustc_hash::{FxHashMap, FxHasher};

use crate::config::Config;
use crate::delay::codec::BufferedFlow;
use crate::tls::ClaimSet;

/// Checks the records of one batch at a time; one per shard, reused across batches.
#[derive(Debug)]
pub struct EvidenceGate {
    max_skew: Duration,
    retention: Duration,
    /// The most a batch's clock reading may be uncertain by: half the slack.
    clock_uncertainty_max_ns: u64,
    /// The records of the batch being checked, by a hash of what makes them the same
    /// connection report, to the first record with that hash.
    seen: FxHashMap<u64, u32>,
}

impl EvidenceGate {
    pub fn new(config: &Config) -> Self {
        EvidenceGate {
            max_skew: config.max_clock_skew(),
            retention: config.ownership.retention,
            clock_uncertainty_max_ns: duration_nanos(config.ownership.slack) / 2,
            seen: FxHashMap::default(),
        }
    }

    /// Calls `admit` with each record of `batch` that may be stored, as a buffered flow whose
    /// times are corrected by the batch's clock reading, in order, and appends the others to
    /// `refused`. `claims`: what the connection's client may claim (None: plain TCP, no
    /// restriction).
    pub fn check_batch<'a>(
        &mut self,
        batch: &ValidFlowBatch<'a>,
        arrival: Timestamp,
        claims: Option<&ClaimSet>,
        refused: &mut Vec<RefusedRecord>,
        mut admit: impl FnMut(&'a ArchivedFlowRecord, BufferedFlow),
    ) {
        self.seen.clear();
        let clock = batch.clock();
        let rules = BatchRules {
            earliest: arrival.saturating_sub(self.retention).as_nanos(),
            latest: arrival
                .as_nanos()
                .saturating_add(duration_nanos(self.max_skew)),
            claims,
            offset_ns: clock.map_or(0, |clock| clock.offset_ns),
            clock_uncertain: clock
                .is_some_and(|clock| clock.uncertainty_ns > self.clock_uncertainty_max_ns),
        };
        for (index, record) in batch.records().iter().enumerate() {
            let index = index as u32;
            match self.check(batch, index, record, &rules) {
                Ok(()) => {
                    let round_trip = batch.round_trip(index as usize);
                    let mut flow = BufferedFlow::from_wire(record, round_trip, index);
                    flow.start = whole_micros(rules.corrected(flow.start));
                    flow.end = whole_micros(rules.corrected(flow.end));
                    admit(record, flow)
                }
                Err(reason) => refused.push(RefusedRecord {
                    record: index,
                    reason,
                }),
            }
        }
    }

    fn check(
        &mut self,
        batch: &ValidFlowBatch<'_>,
        index: u32,
        record: &ArchivedFlowRecord,
        rules: &BatchRules<'_>,
    ) -> Result<(), RecordRefusal> {
        batch.check_record(record)?;
        if rules
            .claims
            .is_some_and(|claims| !claims.allows(record.local_ip.get()))
        {
            return Err(RecordRefusal::ClaimNotAllowed);
        }
        if rules.clock_uncertain {
            return Err(RecordRefusal::ClockUncertain);
        }
        let end = rules.corrected(record.end.get()).as_nanos();
        if end > rules.latest {
            return Err(RecordRefusal::FromTheFuture);
        }
        if end < rules.earliest {
            return Err(RecordRefusal::OlderThanRetention);
        }
        let hash = connection_hash(record);
        match self.seen.entry(hash) {
            std::collections::hash_map::Entry::Vacant(vacant) => {
                vacant.insert(index);
            }
            // Equal hashes of different reports are possible only in theory; checking the
            // earlier record keeps that from ever refusing a good one.
            std::collections::hash_map::Entry::Occupied(first) => {
                if same_connection_report(&batch.records()[*first.get() as usize], record) {
                    return Err(RecordRefusal::Repeated);
                }
            }
        }
        Ok(())
    }
}

/// What a batch's records are held to: the times this node can believe at its arrival, and
/// the IPs its client may claim.
struct BatchRules<'c> {
    earliest: u64,
    latest: u64,
    claims: Option<&'c ClaimSet>,
    /// The batch's clock reading: its times run this far ahead of the collector's.
    offset_ns: i64,
    clock_uncertain: bool,
}

impl BatchRules<'_> {
    /// `at` on the collector's clock.
    fn corrected(&self, at: Timestamp) -> Timestamp {
        let corrected = i128::from(at.as_nanos()) - i128::from(self.offset_ns);
        Timestamp::from_nanos(corrected.clamp(0, i128::from(u64::MAX)) as u64)
    }
}

/// `at` cut to the microsecond. Flow times are kept to the microsecond from here on (in the
/// evidence, the delay buffer and every output): clocks across hosts agree to milliseconds at
/// best and a lookup's window is seconds wide, so nanoseconds only cost bytes. Cut once, here,
/// so a heartbeat replayed from the delay buffer is the same evidence as when it arrived.
fn whole_micros(at: Timestamp) -> Timestamp {
    Timestamp::from_nanos(at.as_nanos() / 1000 * 1000)
}

/// What makes two records one report: the same connection (both ends) started at the same
/// instant. A batch reports a connection once; a second copy would be emitted twice.
fn connection_hash(record: &ArchivedFlowRecord) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = FxHasher::default();
    record.local_ip.get().hash(&mut hasher);
    record.remote_ip.get().hash(&mut hasher);
    record.local_port.to_native().hash(&mut hasher);
    record.remote_port.to_native().hash(&mut hasher);
    record.start.get().hash(&mut hasher);
    hasher.finish()
}

fn same_connection_report(a: &ArchivedFlowRecord, b: &ArchivedFlowRecord) -> bool {
    a.local_ip == b.local_ip
        && a.remote_ip == b.remote_ip
        && a.local_port == b.local_port
        && a.remote_port == b.remote_port
        && a.start == b.start
}

#[cfg(test)]
mod tests {
    use flowattr_common::wire::{ExporterId, FlowBatch, FlowRecord, FrameDecoder, encode_message};
    use flowattr_common::{CanonicalIp, Direction, FlowState};

    use super::*;

    fn record(start: u64, end: u64, remote: u8) -> FlowRecord {
        FlowRecord {
            local_ip: CanonicalIp::from_v4([10, 0, 0, 1].into()),
            remote_ip: CanonicalIp::from_v4([10, 0, 0, remote].into()),
            local_port: 40_000,
            remote_port: 443,
            local_workload: None,
            local_shared: false,
            start: Timestamp::from_nanos(start),
            end: Timestamp::from_nanos(end),
            bytes_sent: 0,
            bytes_received: 0,
            segments_sent: 0,
            segments_received: 0,
            retransmits: 0,
            direction: Direction::Outbound,
            state: FlowState::Closed,
        }
    }

    #[test]
    fn the_bounds_are_inclusive_and_a_repeat_is_the_same_connection_and_start() {
        let s = 1_000_000_000u64;
        let arrival = 10_000 * s;
        let mut config = Config::default();
        config.ownership.retention = Duration::from_secs(3600);
        let skew = config.max_clock_skew().as_nanos() as u64;
        let oldest = arrival - 3600 * s;
        let flows = vec![
            record(arrival - s, arrival + skew, 2),
            record(arrival - s, arrival + skew + 1, 3),
            record(oldest - s, oldest, 4),
            record(oldest - s, oldest - 1, 5),
            record(arrival - s, arrival, 6),
            record(arrival - s, arrival, 6),
            record(arrival - 2 * s, arrival, 6),
        ];
        let mut bytes = Vec::new();
        let batch = FlowBatch {
            exporter: ExporterId(1),
            sequence: 0,
            region: "r".into(),
            workloads: vec![],
            flows,
        };
        encode_message(&batch, &mut bytes).unwrap();
        let (frame, _) = FrameDecoder::default().decode(&bytes).unwrap().unwrap();
        let batch = ValidFlowBatch::from_frame(&frame).unwrap();
        let mut gate = EvidenceGate::new(&config);
        let (mut admitted, mut refused) = (Vec::new(), Vec::new());
        gate.check_batch(
            &batch,
            Timestamp::from_nanos(arrival),
            None,
            &mut refused,
            |_, flow| admitted.push(flow.index),
        );
        assert_eq!(admitted, [0, 2, 4, 6]);
        let reasons: Vec<_> = refused
            .iter()
            .map(|refusal| (refusal.record, refusal.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                (1, RecordRefusal::FromTheFuture),
                (3, RecordRefusal::OlderThanRetention),
                (5, RecordRefusal::Repeated),
            ]
        );
        // The gate starts afresh with each batch.
        let (mut again, mut none) = (Vec::new(), Vec::new());
        gate.check_batch(
            &batch,
            Timestamp::from_nanos(arrival),
            None,
            &mut none,
            |_, flow| again.push(flow.index),
        );
        assert_eq!(again, admitted);
    }
}
