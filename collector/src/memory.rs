//! The node's resident-memory cap (`node.max_memory_bytes`). Every bound elsewhere is per
//! thing (a frame, a connection's unacked batches, a shard's unwritten bytes and buffer); their
//! sum over thousands of connections can still outgrow the host. So the node also watches its
//! own RSS: past 90% of the cap, ingest stops reading sockets (TCP pushes back on the
//! exporters, which keep their batches) until RSS is under 80%. Reads already under way finish,
//! so the cap must leave room for one frame per connection reading when the pause begins.
//!
//! One thread samples the resident set (`/proc/self/statm`) every [`SAMPLE_PERIOD`]; shards read the verdict from
//! an atomic, never a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

pub const SAMPLE_PERIOD: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
pub struct MemoryCap {
    /// 0: no cap, never paused.
    cap: u64,
    rss: AtomicU64,
    paused: AtomicBool,
    /// Times ingest was paused.
    pauses: AtomicU64,
}

/// Paused this long with RSS not falling, the node says its floor is above the cap's low mark.
const STALLED_AFTER: Duration = Duration::from_secs(10);

impl MemoryCap {
    /// The cap, sampled by a thread that ends when the last reference to it goes. Without a
    /// cap RSS is still sampled, for `/metrics`.
    pub fn start(cap: u64) -> Arc<MemoryCap> {
        let shared = Arc::new(MemoryCap {
            cap,
            ..MemoryCap::default()
        });
        let watched = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name(crate::threads::MEMORY.into())
            .spawn(move || sample(&watched))
            .expect("spawning the memory sampler");
        shared
    }

    /// Whether ingest should stop reading sockets now.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub fn rss_bytes(&self) -> u64 {
        self.rss.load(Ordering::Relaxed)
    }

    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// Takes a new RSS reading and moves the verdict with hysteresis.
    fn update(&self, rss: u64) {
        self.rss.store(rss, Ordering::Relaxed);
        if self.cap == 0 {
            return;
        }
        let paused = self.paused();
        if !paused && rss >= self.cap / 10 * 9 {
            self.paused.store(true, Ordering::Relaxed);
            self.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "resident memory {} MiB is at 90% of node.max_memory_bytes ({} MiB): not reading sockets until it is under 80%",
                rss >> 20,
                self.cap >> 20
            );
        } else if paused && rss < self.cap / 10 * 8 {
            self.paused.store(false, Ordering::Relaxed);
            tracing::info!(
                "resident memory {} MiB is under 80% of the cap: reading sockets again",
                rss >> 20
            );
        }
    }
}

fn sample(watched: &Weak<MemoryCap>) {
    let mut trimmed_at = std::time::Instant::now();
    let mut stall = Stall::default();
    while let Some(cap) = watched.upgrade() {
        if let Some(bytes) = flowattr_common::process_metrics::resident_bytes() {
            cap.update(bytes);
        }
        if stall.check(cap.paused(), cap.rss_bytes(), std::time::Instant::now()) {
            tracing::error!(
                "ingest has been paused {}s and resident memory ({} MiB) is not falling toward 80% of node.max_memory_bytes ({} MiB): what this node holds (ownership map, buffers, sink batches) needs more. Raise the cap, or unblock the sinks if they are stuck",
                STALLED_AFTER.as_secs(),
                cap.rss_bytes() >> 20,
                cap.cap >> 20
            );
        }
        if cap.paused() && trimmed_at.elapsed() >= TRIM_PERIOD {
            // glibc keeps freed memory in its arenas, so RSS would stay at the mark after
            // the batches that raised it are gone, and ingest would never resume: hand the
            // free pages back.
            // SAFETY: malloc_trim only releases free memory; it is thread-safe.
            unsafe { libc::malloc_trim(0) };
            trimmed_at = std::time::Instant::now();
        }
        drop(cap);
        std::thread::sleep(SAMPLE_PERIOD);
    }
}

/// Watches a pause for progress: RSS falling by at least 1% of itself within
/// [`STALLED_AFTER`]. Says so once per pause when there is none.
#[derive(Debug, Default)]
struct Stall {
    /// The lowest RSS of this pause and when it was reached.
    lowest: Option<(u64, std::time::Instant)>,
    reported: bool,
}

impl Stall {
    fn check(&mut self, paused: bool, rss: u64, now: std::time::Instant) -> bool {
        if !paused {
            *self = Stall::default();
            return false;
        }
        match self.lowest {
            Some((lowest, _)) if rss + lowest / 100 < lowest => self.lowest = Some((rss, now)),
            Some((_, since)) if !self.reported && now.duration_since(since) >= STALLED_AFTER => {
                self.reported = true;
                return true;
            }
            Some(_) => {}
            None => self.lowest = Some((rss, now)),
        }
        false
    }
}

/// How often, while paused, free memory is handed back to the kernel.
const TRIM_PERIOD: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_at_ninety_percent_and_resumes_under_eighty() {
        let cap = MemoryCap {
            cap: 1000,
            ..MemoryCap::default()
        };
        cap.update(899);
        assert!(!cap.paused());
        cap.update(900);
        assert!(cap.paused());
        cap.update(850);
        assert!(cap.paused(), "between the marks the verdict holds");
        cap.update(799);
        assert!(!cap.paused());
        cap.update(950);
        assert_eq!(
            (cap.paused(), cap.pauses(), cap.rss_bytes()),
            (true, 2, 950)
        );
        let uncapped = MemoryCap::default();
        uncapped.update(u64::MAX);
        assert!(!uncapped.paused());
    }

    #[test]
    fn a_pause_with_rss_not_falling_is_reported_once() {
        let start = std::time::Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut stall = Stall::default();
        assert!(!stall.check(true, 1000, at(0)));
        assert!(!stall.check(true, 995, at(9)), "under 1% is no progress");
        assert!(stall.check(true, 1000, at(10)), "10 s without progress");
        assert!(!stall.check(true, 1000, at(30)), "once per pause");
        assert!(!stall.check(false, 500, at(31)));
        assert!(!stall.check(true, 1000, at(32)));
        assert!(
            !stall.check(true, 980, at(40)),
            "progress restarts the clock"
        );
        assert!(!stall.check(true, 980, at(49)));
        assert!(stall.check(true, 980, at(50)));
    }

    #[test]
    fn the_sampler_reads_this_process() {
        let cap = MemoryCap::start(0);
        std::thread::sleep(SAMPLE_PERIOD * 5);
        assert!(cap.rss_bytes() > 1 << 20, "{}", cap.rss_bytes());
    }
}
