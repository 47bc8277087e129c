//! What the events consumer reports, for `/metrics` and `/healthz`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flowattr_common::exposition::Scrape;

use super::EventRejection;

#[derive(Debug, Default)]
pub struct EventsStatus {
    pub applied: AtomicU64,
    pub rejected: [AtomicU64; EventRejection::ALL.len()],
    /// Every event about an instant up to this one is in hand (nanoseconds; 0 until the
    /// consumer has read the whole topic once): see [`super::EventCompleteness`].
    pub complete_through_ns: AtomicU64,
    /// Events about a time the stream was already complete through, and watermarks applied.
    pub late: AtomicU64,
    pub watermarks: AtomicU64,
    /// The lateness the node waits for, and the worst it has seen of any event.
    pub lateness_ns: AtomicU64,
    pub lateness_seen_ns: AtomicU64,
    /// Kafka reader processes that died and were replaced: the node's one count, shared with
    /// the broadcast's reader (`flowattr_broadcast_reader_restarts_total`).
    pub reader_restarts: Arc<AtomicU64>,
}

impl EventsStatus {
    /// A status whose reader restarts count into `reader_restarts`.
    pub fn new(reader_restarts: Arc<AtomicU64>) -> EventsStatus {
        EventsStatus {
            reader_restarts,
            ..EventsStatus::default()
        }
    }

    pub fn write_metrics(&self, scrape: &mut Scrape<'_>) -> fmt::Result {
        scrape.counter(
            "flowattr_events_applied",
            "assign/unassign events handed to the shards",
            self.applied.load(Ordering::Relaxed),
        )?;
        let reasons = EventRejection::ALL.map(EventRejection::as_str);
        crate::metrics::write_by_reason(
            scrape,
            "flowattr_events_rejected",
            "events refused, by reason",
            &reasons,
            &self.rejected,
        )?;
        let seconds = |atomic: &AtomicU64| atomic.load(Ordering::Relaxed) as f64 / 1e9;
        scrape.gauge(
            "flowattr_events_complete_through_seconds",
            "every event about an instant up to this one (Unix time) is in hand: flows after it wait for event answers",
            seconds(&self.complete_through_ns),
        )?;
        scrape.gauge(
            "flowattr_events_lateness_seconds",
            "how long after its time an event may reach the topic, as this node waits for it: events.max_lateness, or the worst seen",
            seconds(&self.lateness_ns),
        )?;
        scrape.gauge(
            "flowattr_events_lateness_seen_seconds",
            "the latest any event reached the topic after its time, when later than events.max_lateness",
            seconds(&self.lateness_seen_ns),
        )?;
        scrape.counter(
            "flowattr_events_late",
            "events about a time the stream was already complete through: their producer broke its promise",
            self.late.load(Ordering::Relaxed),
        )?;
        scrape.counter(
            "flowattr_events_watermarks",
            "watermarks of events.watermark_producers read",
            self.watermarks.load(Ordering::Relaxed),
        )
    }
}
