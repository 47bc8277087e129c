//! `/healthz`: 200 while the node acks and releases, with a `degraded:` line for each state
//! that costs coverage (flows come out unattributed), never correctness; 503 while it cannot
//! ack or has not caught up with its region.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowattr_common::Timestamp;

use super::server::Reply;
use crate::broadcast::BroadcastStatus;
use crate::config::{ClusterConfig, EventsConfig};
use crate::events::EventsStatus;
use crate::metrics::{ClockReadings, ShardMetrics};
use crate::node_state::NodeShared;
use crate::ownership::ReuseStatus;

pub(super) fn report(node: &NodeShared) -> Reply {
    let failing = node
        .metrics
        .iter()
        .any(|metrics| metrics.storage_failing.get() != 0);
    if failing {
        return (
            503,
            "text/plain",
            "delay buffer writes are failing: not acking\n".into(),
        );
    }
    if let Some(broadcast) = &node.broadcast
        && !broadcast.status.caught_up(node.shards)
    {
        return (
            503,
            "text/plain",
            "catching up with the broadcast topic: no flow is released yet\n".into(),
        );
    }
    // Still ready in every degraded state: each costs coverage (flows come out
    // unattributed), never correctness. Said here so that it is not silent.
    let mut body = String::from("ok\n");
    let now = Timestamp::now();
    ip_reuse(node, &mut body);
    exporter_clocks(node, now, &mut body);
    if let Some(events) = &node.events
        && node.config.events.enabled()
    {
        event_stream(&node.config.events, events, now, &mut body);
    }
    if let Some(broadcast) = &node.broadcast {
        peers(node, &broadcast.status, now, &mut body);
        own_updates(node, &broadcast.status, now, &mut body);
    }
    (200, "text/plain", body)
}

fn ip_reuse(node: &NodeShared, body: &mut String) {
    let reuse = node
        .metrics
        .iter()
        .map(ShardMetrics::reuse)
        .fold(ReuseStatus::default(), ReuseStatus::combine);
    // Kept across restarts (delay.dir/shortest-handover): a restarted node says so too.
    if let Some(shortest) = reuse
        .shortest_handover
        .filter(|shortest| *shortest <= node.config.ownership.merge_gap)
    {
        let _ = writeln!(
            *body,
            "degraded: the platform reuses IPs within ownership.merge_gap ({} handovers under {:.3} s since start, the shortest ever {:.3} s): gaps are bridged only under {:.3} s and owners named only from evidence within {:.3} s of a flow, so fewer flows are attributed; set ownership.merge_gap below {:.3} s, or lengthen the platform's IP cool-down",
            reuse.fast_handovers,
            node.config.ownership.merge_gap.as_secs_f64(),
            shortest.as_secs_f64(),
            reuse.bridged_gap.as_secs_f64(),
            reuse.owner_reach.as_secs_f64(),
            shortest.as_secs_f64(),
        );
    }
}

/// Exporters whose records are refused for their clock, as their last batch (within the last
/// 10 minutes) said.
fn exporter_clocks(node: &NodeShared, now: Timestamp, body: &mut String) {
    let half_slack = node.config.ownership.slack / 2;
    for (exporter, (clock, at)) in ClockReadings::latest(&node.metrics) {
        let uncertainty = Duration::from_nanos(clock.uncertainty_ns);
        if uncertainty > half_slack && now.nanos_since(at) < 600_000_000_000 {
            let _ = writeln!(
                *body,
                "degraded: exporter {exporter} knows its clock only to within {:.3} s, over half ownership.slack ({:.3} s): its records are refused (clock_uncertain); fix the round trip between it and this node, or its time sync",
                uncertainty.as_secs_f64(),
                half_slack.as_secs_f64()
            );
        }
    }
}

fn event_stream(events: &EventsConfig, status: &EventsStatus, now: Timestamp, body: &mut String) {
    let seen = Duration::from_nanos(status.lateness_seen_ns.load(Ordering::Relaxed));
    let promised = events.max_lateness;
    if seen > promised {
        let _ = writeln!(
            *body,
            "degraded: an event reached the topic {:.1} s after its time, later than events.max_lateness ({:.1} s): event answers now wait that long, and flows that cannot come out incomplete; find the IP-tracking service's lag, or raise events.max_lateness and delay.delay",
            seen.as_secs_f64(),
            promised.as_secs_f64()
        );
    }
    let through = Timestamp::from_nanos(status.complete_through_ns.load(Ordering::Relaxed));
    let lateness = Duration::from_nanos(status.lateness_ns.load(Ordering::Relaxed));
    let behind = Duration::from_nanos(now.nanos_since(through));
    if through == Timestamp::ZERO {
        let _ = writeln!(
            *body,
            "degraded: topic {} has not been read yet (missing, or the brokers unreachable): flows that need an event answer wait, and come out incomplete past their retries",
            events.topic
        );
    } else if behind > lateness + Duration::from_secs(10) {
        let _ = writeln!(
            *body,
            "degraded: the event stream is known complete only until {:.1} s ago (the brokers answer slowly or not at all): flows that need an event answer wait, and come out incomplete past their retries",
            behind.as_secs_f64()
        );
    }
}

/// Peers' updates: read and applied within a few seconds; every peer heard from, each
/// stream known complete to recently.
fn peers(node: &NodeShared, status: &BroadcastStatus, now: Timestamp, body: &mut String) {
    let cluster = &node.config.cluster;
    // The reader checks every half second how far the brokers' partitions go.
    if let Some(lag) = stale(&status.read_through_ns, now, cluster) {
        let since = lag.map_or_else(
            || "not yet".to_owned(),
            |lag| format!("only through {:.1} s ago", lag.as_secs_f64()),
        );
        let _ = writeln!(
            *body,
            "degraded: this node has read topic {} {since} (the brokers unreachable or answering slowly, or its reader failing: see flowattr_broadcast_reader_restarts_total): peers' updates since are not applied, and flows that need them wait, then come out incomplete",
            cluster.topic
        );
    }
    let silent = status.silent_peers(cluster.peer_silence, now);
    for (peer, quiet) in silent {
        let _ = writeln!(
            *body,
            "degraded: peer {peer} silent for {:.1} s (forgotten, and no longer waited for, after cluster.peer_timeout: {:.0} s)",
            quiet.as_secs_f64(),
            cluster.peer_timeout.as_secs_f64()
        );
    }
    for (peer, after) in status.peers_with_holes() {
        let _ = writeln!(
            *body,
            "degraded: peer {peer}'s evidence about instants before {:.1} s ago may never arrive (it lost a message, or restarted after an outage): flows whose lookup reaches back before then come out incomplete, for ownership.retention after its loss",
            now.nanos_since(after) as f64 / 1e9
        );
    }
    // A peer's stream normally lags by the exporters' lateness and two publish
    // intervals (the cut, then the presence that carries it).
    let ingest = &node.config.ingest;
    let expected = ingest.exporter_interval
        + ingest.exporter_send_time
        + cluster.publish_interval * 2
        + cluster.peer_silence;
    for (peer, through) in status.peers_behind(expected, now) {
        let _ = match through {
            None => writeln!(
                *body,
                "degraded: peer {peer} sends no watermark (an older version, or not a flowattr node): its evidence is applied but not waited for, so a flow can be named before its claim arrives; upgrade it"
            ),
            Some(Timestamp::ZERO) => writeln!(
                *body,
                "degraded: attributing from incomplete evidence: peer {peer}'s stream is not known complete yet; flows whose lookup needs its evidence wait, then come out incomplete"
            ),
            Some(through) => writeln!(
                *body,
                "degraded: attributing from incomplete evidence: peer {peer}'s stream is complete only through {:.1} s ago; flows whose lookup needs later evidence wait, then come out incomplete",
                now.nanos_since(through) as f64 / 1e9
            ),
        };
    }
}

/// This node's own updates: acked by the brokers within a few publish intervals, to a topic
/// of the configured shape.
fn own_updates(node: &NodeShared, status: &BroadcastStatus, now: Timestamp, body: &mut String) {
    let cluster = &node.config.cluster;
    if let Some(lag) = stale(&status.published_through_ns, now, cluster) {
        let since = lag.map_or_else(
            || "since it started".to_owned(),
            |lag| format!("for {:.1} s", lag.as_secs_f64()),
        );
        let _ = writeln!(
            *body,
            "degraded: the brokers have acked none of this node's updates {since} (unreachable, or refusing them): its peers' flows that need its evidence wait, then come out incomplete"
        );
    }
    let partitions = status.topic_partitions.load(Ordering::Relaxed);
    if partitions != 0 && partitions != cluster.partitions {
        let _ = writeln!(
            *body,
            "degraded: topic {} has {partitions} partitions, not cluster.partitions ({}): it was made again by something else (a broker restarted empty that creates topics itself?); the node publishes to what is there, but give it {} partitions (kafka-topics --alter --partitions {})",
            cluster.topic, cluster.partitions, cluster.partitions, cluster.partitions
        );
    }
    let after = Timestamp::from_nanos(status.complete_after_ns.load(Ordering::Relaxed));
    if after > Timestamp::ZERO {
        let _ = writeln!(
            *body,
            "degraded: updates this node learned may never reach the brokers (a message lost, see flowattr_broadcast_dropped_messages_total, or a restart after an outage): for ownership.retention after the loss, its peers name no flow whose lookup reaches back before {:.1} s ago, and those come out incomplete",
            now.nanos_since(after) as f64 / 1e9
        );
    }
}

/// How long ago the instant in `through` (nanoseconds; 0: never) was, when longer than a few
/// publish intervals: Some(None) if it was never set.
fn stale(through: &AtomicU64, now: Timestamp, cluster: &ClusterConfig) -> Option<Option<Duration>> {
    let through = Timestamp::from_nanos(through.load(Ordering::Relaxed));
    let lag = Duration::from_nanos(now.nanos_since(through));
    (lag > cluster.publish_interval * 3 + Duration::from_secs(5))
        .then_some((through != Timestamp::ZERO).then_some(lag))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event stream's lines, for a node with the default `[events]` and this status.
    fn event_lines(status: &EventsStatus, now: Timestamp) -> String {
        let mut body = String::new();
        event_stream(&EventsConfig::default(), status, now, &mut body);
        body
    }

    #[test]
    fn the_event_stream_is_said_unread_then_behind_then_nothing() {
        let status = EventsStatus::default();
        let now = Timestamp::now();
        let topic = EventsConfig::default().topic;
        let unread = event_lines(&status, now);
        assert!(unread.starts_with(&format!("degraded: topic {topic} has not been read yet (missing, or the brokers unreachable)")), "{unread}");
        status.complete_through_ns.store(
            now.saturating_sub(Duration::from_secs(60)).as_nanos(),
            Ordering::Relaxed,
        );
        let behind = event_lines(&status, now);
        assert!(
            behind
                .starts_with("degraded: the event stream is known complete only until 60.0 s ago"),
            "{behind}"
        );
        status.complete_through_ns.store(
            now.saturating_sub(Duration::from_secs(1)).as_nanos(),
            Ordering::Relaxed,
        );
        assert_eq!(event_lines(&status, now), "");
        status
            .lateness_seen_ns
            .store(u64::MAX / 2, Ordering::Relaxed);
        assert!(event_lines(&status, now).starts_with("degraded: an event reached the topic"));
    }
}
