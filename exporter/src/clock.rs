//! Kernel time to wall-clock time. The eBPF program stamps events with `bpf_ktime_get_ns`
//! (CLOCK_MONOTONIC: steady, but counted from boot); flows need wall-clock time, which is what
//! every host's heartbeats are compared in. The offset between the two clocks changes when NTP
//! steps or slews the wall clock, so the agent measures it again every interval.
//!
//! Assumptions: the host's wall clock is NTP-disciplined (the collector's `slack`, 1 s by
//! default, absorbs the skew between two hosts); an event's time is converted with the offset
//! measured at the end of the interval it was read in, so a step of the wall clock mid-interval
//! shifts that interval's flows by the step.
//!
//! Whether the wall clock itself is right is checked against the collector: every ack carries
//! the collector's clock at the batch's arrival ([`ClockCheck`]), served on `/metrics`.

use std::collections::VecDeque;

use flowattr_common::Timestamp;
use flowattr_common::wire::ClockReading;

fn read(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Wall-clock time minus kernel monotonic time, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct ClockOffset(u64);

impl ClockOffset {
    /// Reads the clocks three times and keeps the pair read closest together.
    pub fn measure() -> ClockOffset {
        let mut best = (u64::MAX, 0);
        for _ in 0..3 {
            let before = read(libc::CLOCK_MONOTONIC);
            let wall = read(libc::CLOCK_REALTIME);
            let after = read(libc::CLOCK_MONOTONIC);
            let gap = after - before;
            if gap < best.0 {
                best = (gap, wall.saturating_sub(before + gap / 2));
            }
        }
        ClockOffset(best.1)
    }

    pub fn wall(self, monotonic_ns: u64) -> Timestamp {
        Timestamp::from_nanos(monotonic_ns.saturating_add(self.0))
    }

    pub fn monotonic_now() -> u64 {
        read(libc::CLOCK_MONOTONIC)
    }
}

/// What one ack says about this host's wall clock against the collector's. The collector
/// stamped the batch's arrival somewhere between our send and our receipt of the ack, so our
/// offset lies in `[sent - collector, received - collector]`: the estimate is its middle, the
/// uncertainty its half-width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockCheck {
    /// Positive: this host's clock is ahead of the collector's.
    pub offset_ns: i64,
    pub uncertainty_ns: u64,
    /// False when the offset is certainly past the skew the collector allows: its records will
    /// be refused (ahead) or stamp their tenures into other owners' time (behind).
    pub healthy: bool,
}

impl ClockCheck {
    pub fn from_ack(
        sent: Timestamp,
        received: Timestamp,
        collector: Timestamp,
        max_skew_ns: u64,
    ) -> ClockCheck {
        let signed = |t: Timestamp| i128::from(t.as_nanos());
        let low = signed(sent) - signed(collector);
        let high = signed(received.max(sent)) - signed(collector);
        let skew = i128::from(max_skew_ns);
        ClockCheck {
            offset_ns: ((low + high) / 2).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
            uncertainty_ns: ((high - low) / 2) as u64,
            healthy: low <= skew && high >= -skew,
        }
    }
}

/// The readings of the last acks, to stamp on each batch cut: the collector corrects the
/// batch's times by the offset, and refuses them if the uncertainty exceeds half its slack. An
/// ack's round trip includes the collector's durable write, so one slow ack says little; the
/// best of the recent ones, aged by the clock's possible drift since, says most.
#[derive(Debug, Default)]
pub struct ClockEstimate {
    /// (monotonic time taken, offset, uncertainty), newest last.
    recent: VecDeque<(u64, i64, u64)>,
}

/// Acks whose readings are kept.
const READINGS_KEPT: usize = 16;
/// How fast an NTP-disciplined clock may drift from the collector's after a reading: 100 ppm,
/// ten times what a free-running quartz does, so an old reading is never trusted beyond it.
const DRIFT_PPM: u64 = 100;

impl ClockEstimate {
    pub fn record(&mut self, check: &ClockCheck, monotonic_ns: u64) {
        if self.recent.len() == READINGS_KEPT {
            self.recent.pop_front();
        }
        self.recent
            .push_back((monotonic_ns, check.offset_ns, check.uncertainty_ns));
    }

    /// The reading to stamp a batch cut at `monotonic_ns` with; None before the first ack.
    pub fn best(&self, monotonic_ns: u64) -> Option<ClockReading> {
        self.recent
            .iter()
            .map(|&(taken, offset_ns, uncertainty_ns)| {
                let drift = monotonic_ns.saturating_sub(taken) / 1_000_000 * DRIFT_PPM;
                ClockReading {
                    offset_ns,
                    uncertainty_ns: uncertainty_ns.saturating_add(drift),
                }
            })
            .min_by_key(|reading| reading.uncertainty_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_bounds_the_offset_and_flags_only_a_certain_excess() {
        let at = |s: u64| Timestamp::from_nanos(s * 1_000_000_000);
        let skew = 1_000_000_000;
        // In sync: the collector stamped inside our round trip.
        let synced = ClockCheck::from_ack(at(100), at(102), at(101), skew);
        assert_eq!(
            (synced.offset_ns, synced.uncertainty_ns, synced.healthy),
            (0, 1_000_000_000, true)
        );
        // Ten years ahead.
        let ahead = ClockCheck::from_ack(at(315_360_100), at(315_360_101), at(100), skew);
        assert!(!ahead.healthy);
        assert!(ahead.offset_ns > 315_359_999 * 1_000_000_000);
        // Twelve seconds behind.
        let behind = ClockCheck::from_ack(at(100), at(100), at(112), skew);
        assert_eq!((behind.offset_ns, behind.healthy), (-12_000_000_000, false));
        // A slow round trip that could hide the skew is not called unhealthy.
        let slow = ClockCheck::from_ack(at(100), at(130), at(110), skew);
        assert!(slow.healthy);
    }

    #[test]
    fn a_batch_carries_the_best_recent_reading_aged_by_drift() {
        let mut estimate = ClockEstimate::default();
        assert_eq!(estimate.best(0), None, "no ack yet: no reading");
        let s = 1_000_000_000u64;
        let check = |offset_ns, uncertainty_ns| ClockCheck {
            offset_ns,
            uncertainty_ns,
            healthy: true,
        };
        estimate.record(&check(300_000_000, 2_000_000), 0);
        // A later ack slowed by a busy collector does not displace the tight one.
        estimate.record(&check(250_000_000, 900_000_000), 60 * s);
        assert_eq!(
            estimate.best(60 * s),
            Some(ClockReading {
                offset_ns: 300_000_000,
                uncertainty_ns: 2_000_000 + 6_000_000
            })
        );
        // An older reading ages by the drift it may have seen since: a newer one a little
        // looser than it was, but tighter than it is now, wins.
        estimate.record(&check(280_000_000, 5_000_000), 120 * s);
        assert_eq!(
            estimate.best(120 * s),
            Some(ClockReading {
                offset_ns: 280_000_000,
                uncertainty_ns: 5_000_000
            })
        );
        for k in 0..READINGS_KEPT as u64 {
            estimate.record(&check(1, 5_000_000), (100 + k) * s);
        }
        assert_eq!(estimate.recent.len(), READINGS_KEPT, "bounded");
    }

    #[test]
    fn monotonic_now_converts_to_now() {
        let offset = ClockOffset::measure();
        let converted = offset.wall(ClockOffset::monotonic_now());
        let now = Timestamp::now();
        let apart = now.as_nanos().abs_diff(converted.as_nanos());
        assert!(apart < 10_000_000, "{apart} ns apart");
    }
}
