//! Kernel time to wall-clock time. The eBPF program stamps events with `bpf_ktime_get_ns`
//! (CLOCK_MONOTONIC: steady, but counted from boot); flows need wall-clock time, which is what
//! every host's heartbeats are compared in. The offset between the two clocks changes when NTP
//! steps or slews the wall clock, so the agent measures it again every interval.
//!
//! Assumptions: the host's wall clock is NTP-disciplined (the collector's `slack`, 1 s by
//! default, absorbs the skew between two hosts); an event's time is converted with the offset
//! measured at the end of the interval it was read in, so a step of the wall clock mid-interval
//! shifts that interval's flows by the step.

use flowattr_common::Timestamp;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_now_converts_to_now() {
        let offset = ClockOffset::measure();
        let converted = offset.wall(ClockOffset::monotonic_now());
        let now = Timestamp::now();
        let apart = now.as_nanos().abs_diff(converted.as_nanos());
        assert!(apart < 10_000_000, "{apart} ns apart");
    }
}
