//! How far the event stream is known complete. An event is evidence only once every event
//! about the same time has had the chance to arrive: an `assign` published after the flows it
//! concerns were answered would leave them named for the IP's previous holder. The IP-tracking
//! service promises to publish an event at most `events.max_lateness` after its `at`; the
//! node knows when it last had read the whole topic; so every event up to that instant less
//! the lateness is in hand, and no earlier flow's answer can change.
//!
//! The promise is checked, not trusted: an event that reaches the topic later than promised
//! raises the lateness this node waits for to what it saw (and `/healthz` says so), so a
//! lagging producer costs coverage (flows wait, then come out `incomplete`), never correctness.
//!
//! Producers that know better say so: with `events.watermark_producers`, each publishes
//! watermarks ("every event up to `at` is published and acknowledged"), and the stream is
//! complete through the oldest of their latest watermarks whose message the node has read
//! every partition past (so every event acknowledged before it is read too). No lateness is
//! assumed then: a producer that lags holds its watermark back, and flows wait for it.

use std::collections::VecDeque;
use std::time::Duration;

use flowattr_common::{Timestamp, duration_nanos};

use super::EventRejection;
use crate::config::EventsConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventCompleteness {
    configured_ns: u64,
    /// The latest any event reached the topic after its `at`.
    seen_ns: u64,
    /// With watermark producers: each one's watermarks in hand.
    producers: Vec<ProducerWatermarks>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProducerWatermarks {
    name: Box<str>,
    /// Every event up to this instant is read.
    complete: Timestamp,
    /// Watermarks read whose message was published after the last instant the whole topic
    /// was known read, as (watermark, published), oldest first.
    pending: VecDeque<(Timestamp, Timestamp)>,
}

/// Watermarks a producer may have pending at once; past it, the oldest are dropped (a later
/// one says more).
const PENDING_MAX: usize = 1024;

impl EventCompleteness {
    pub fn new(config: &EventsConfig) -> Self {
        EventCompleteness {
            configured_ns: duration_nanos(config.max_lateness),
            seen_ns: 0,
            producers: config
                .watermark_producers
                .iter()
                .map(|name| ProducerWatermarks {
                    name: name.as_str().into(),
                    complete: Timestamp::ZERO,
                    pending: VecDeque::new(),
                })
                .collect(),
        }
    }

    /// A watermark message of `producer` about `at`, published at `published`.
    pub fn watermark(
        &mut self,
        producer: &str,
        at: Timestamp,
        published: Timestamp,
    ) -> Result<(), EventRejection> {
        let known = self
            .producers
            .iter_mut()
            .find(|known| &*known.name == producer);
        let known = known.ok_or(EventRejection::UnknownProducer)?;
        if known.pending.len() == PENDING_MAX {
            known.pending.pop_front();
        }
        known.pending.push_back((at, published));
        Ok(())
    }

    /// An event about `at` that reached the topic at `published`.
    pub fn observe(&mut self, at: Timestamp, published: Timestamp) {
        self.seen_ns = self.seen_ns.max(published.nanos_since(at));
    }

    /// The lateness this node waits for: as configured, or the worst it has seen. Zero with
    /// watermark producers.
    pub fn lateness(&self) -> Duration {
        if !self.producers.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.configured_ns.max(self.seen_ns))
    }

    /// The worst lateness seen, if it broke the promise (without watermark producers).
    pub fn broken_promise(&self) -> Option<Duration> {
        (self.producers.is_empty() && self.seen_ns > self.configured_ns)
            .then(|| Duration::from_nanos(self.seen_ns))
    }

    /// Every event about an instant up to the returned one is in hand, given that the whole
    /// topic had been read at `read_through`.
    pub fn complete_through(&mut self, read_through: Timestamp) -> Timestamp {
        if self.producers.is_empty() {
            return read_through.saturating_sub(self.lateness());
        }
        let mut oldest = Timestamp::MAX;
        for producer in &mut self.producers {
            while let Some(&(at, published)) = producer.pending.front()
                && published <= read_through
            {
                producer.complete = producer.complete.max(at);
                producer.pending.pop_front();
            }
            oldest = oldest.min(producer.complete);
        }
        oldest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(seconds: u64) -> Timestamp {
        Timestamp::from_nanos(seconds * 1_000_000_000)
    }

    #[test]
    fn the_stream_is_complete_up_to_what_was_read_less_the_worst_lateness() {
        let mut completeness = EventCompleteness::new(&EventsConfig::default());
        assert_eq!(completeness.complete_through(s(1_000)), s(940));
        completeness.observe(s(900), s(930));
        assert_eq!(
            (
                completeness.complete_through(s(1_000)),
                completeness.broken_promise()
            ),
            (s(940), None)
        );
        // One event 90 s late: from now on the node waits 90 s.
        completeness.observe(s(900), s(990));
        assert_eq!(completeness.complete_through(s(1_000)), s(910));
        assert_eq!(completeness.broken_promise(), Some(Duration::from_secs(90)));
        assert_eq!(
            completeness.watermark("ipam", s(950), s(951)),
            Err(EventRejection::UnknownProducer)
        );
    }

    #[test]
    fn with_producers_the_stream_is_complete_through_the_oldest_watermark_read_past() {
        let config = EventsConfig {
            watermark_producers: vec!["a".into(), "b".into()],
            ..EventsConfig::default()
        };
        let mut completeness = EventCompleteness::new(&config);
        assert_eq!(
            completeness.complete_through(s(1_000)),
            Timestamp::ZERO,
            "nothing from b yet"
        );
        completeness.watermark("a", s(900), s(901)).unwrap();
        completeness.watermark("b", s(950), s(960)).unwrap();
        // A late event changes nothing: lateness is not assumed with producers.
        completeness.observe(s(100), s(1_000));
        assert_eq!(completeness.broken_promise(), None);
        // b's watermark was published at 960: only a read of every partition past then counts.
        assert_eq!(completeness.complete_through(s(955)), Timestamp::ZERO);
        assert_eq!(
            completeness.complete_through(s(961)),
            s(900),
            "a is the oldest"
        );
        completeness.watermark("a", s(990), s(991)).unwrap();
        assert_eq!(completeness.complete_through(s(995)), s(950));
        assert_eq!(
            completeness.watermark("c", s(990), s(991)),
            Err(EventRejection::UnknownProducer)
        );
    }
}
