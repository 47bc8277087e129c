//! What the events consumer reports, for `/metrics` and `/healthz`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

    pub fn render_prometheus(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP flowattr_events_applied_total assign/unassign events handed to the shards\nflowattr_events_applied_total {}",
            self.applied.load(Ordering::Relaxed)
        );
        let reasons = EventRejection::ALL.map(EventRejection::as_str);
        crate::metrics::render_by_reason(out, "events_rejected_total", "events refused, by reason", &reasons, &self.rejected);
        let seconds = |atomic: &AtomicU64| atomic.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "# HELP flowattr_events_complete_through_seconds every event about an instant up to this one (Unix time) is in hand: flows after it wait for event answers\n# TYPE flowattr_events_complete_through_seconds gauge\nflowattr_events_complete_through_seconds {:.3}\n\
             # HELP flowattr_events_lateness_seconds how long after its time an event may reach the topic, as this node waits for it: events.max_lateness, or the worst seen\n# TYPE flowattr_events_lateness_seconds gauge\nflowattr_events_lateness_seconds {:.3}\n\
             # HELP flowattr_events_lateness_seen_seconds the latest any event reached the topic after its time, when later than events.max_lateness\n# TYPE flowattr_events_lateness_seen_seconds gauge\nflowattr_events_lateness_seen_seconds {:.3}\n\
             # HELP flowattr_events_late_total events about a time the stream was already complete through: their producer broke its promise\n# TYPE flowattr_events_late_total counter\nflowattr_events_late_total {}\n\
             # HELP flowattr_events_watermarks_total watermarks of events.watermark_producers read\n# TYPE flowattr_events_watermarks_total counter\nflowattr_events_watermarks_total {}",
            seconds(&self.complete_through_ns),
            seconds(&self.lateness_ns),
            seconds(&self.lateness_seen_ns),
            self.late.load(Ordering::Relaxed),
            self.watermarks.load(Ordering::Relaxed),
        );
    }
}
