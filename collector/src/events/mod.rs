//! The event fallback, for IPs that run no exporter (load balancers, managed services): no
//! heartbeat ever names them, so an IP-tracking service publishes discrete events on a topic,
//! and they build a time-ranged map of their own, consulted only for remote IPs inside
//! `events.fallback_cidrs` for which heartbeats hold no evidence at the flow's time. Flows
//! attributed from it say so: `provenance: "event"`.
//!
//! The schema, one JSON object per Kafka message:
//!
//! ```json
//! {"event": "assign",    "ip": "10.200.0.5", "owner": "lb-frontend", "at": "2026-11-23T10:00:00Z"}
//! {"event": "unassign",  "ip": "10.200.0.5",                         "at": 1795450000000000000}
//! {"event": "watermark", "producer": "ipam-1",                       "at": "2026-11-23T10:00:05Z"}
//! ```
//!
//! `at` is RFC 3339 with any offset, or nanoseconds since the Unix epoch. An assign makes
//! `owner` the IP's holder from `at` until the IP's next event; an unassign leaves it with none.
//! A watermark says its producer has published every event up to `at` (and had them
//! acknowledged): with `events.watermark_producers` set, the stream is complete through the
//! oldest of those producers' watermarks; without, through what the node has read less
//! `events.max_lateness` ([`EventCompleteness`]). An event answer is given only for a flow the
//! stream is complete for. Events are evidence like any other: a malformed one, one about a
//! host-local address, one with a bad name or from the future is refused and counted by reason.

mod completeness;
mod consume;
mod map;
mod status;

use flowattr_common::{CanonicalIp, Timestamp};
use serde::Deserialize;

pub use completeness::EventCompleteness;
pub use consume::{EventDelivery, start as start_consumer};
pub use map::EventOwnership;
pub use status::EventsStatus;

/// One message of the events topic, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventMessage {
    Ip(IpEvent),
    /// `producer` has published every event up to `at`.
    Watermark {
        producer: Box<str>,
        at: Timestamp,
    },
}

/// One checked event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpEvent {
    pub ip: CanonicalIp,
    /// None: unassigned.
    pub owner: Option<Box<str>>,
    pub at: Timestamp,
}

/// Why an event was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventRejection {
    /// Longer than [`MAX_EVENT_BYTES`]: refused before it is parsed.
    Oversized,
    /// Not JSON of the schema (unknown `event`, missing or extra fields).
    Malformed,
    BadIp,
    /// The owner breaks the name rule, or an assign has none.
    BadOwner,
    BadTime,
    HostLocal,
    /// Later than the node's clock plus the allowed skew.
    FromTheFuture,
    /// About an IP outside `events.fallback_cidrs`: no flow would be attributed from it, and
    /// kept it would only hold memory.
    OutsideFallback,
    /// Older than the events' retention (`ownership.retention + events.assignment_lifetime`):
    /// no flow it could speak for is still attributed.
    OlderThanRetention,
    /// A watermark from a producer not in `events.watermark_producers`.
    UnknownProducer,
}

impl EventRejection {
    pub const ALL: [EventRejection; 10] = [
        EventRejection::Oversized,
        EventRejection::Malformed,
        EventRejection::BadIp,
        EventRejection::BadOwner,
        EventRejection::BadTime,
        EventRejection::HostLocal,
        EventRejection::FromTheFuture,
        EventRejection::OutsideFallback,
        EventRejection::OlderThanRetention,
        EventRejection::UnknownProducer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventRejection::Oversized => "oversized",
            EventRejection::Malformed => "malformed",
            EventRejection::BadIp => "bad_ip",
            EventRejection::BadOwner => "bad_owner",
            EventRejection::BadTime => "bad_time",
            EventRejection::HostLocal => "host_local",
            EventRejection::FromTheFuture => "from_the_future",
            EventRejection::OutsideFallback => "outside_fallback",
            EventRejection::OlderThanRetention => "older_than_retention",
            EventRejection::UnknownProducer => "unknown_producer",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventJson {
    event: String,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    producer: Option<String>,
    at: serde_json::Value,
}

/// The longest event message: a well-formed one with the longest name and address is under
/// 400 bytes (under 2,000 with every character of the name \u-escaped), and parsing a larger
/// one would only allocate for something refused anyway.
pub const MAX_EVENT_BYTES: usize = 4096;

/// Parses and checks one message against the schema; `latest` is the newest `at` believable.
pub fn parse_event(payload: &[u8], latest: Timestamp) -> Result<EventMessage, EventRejection> {
    if payload.len() > MAX_EVENT_BYTES {
        return Err(EventRejection::Oversized);
    }
    let json: EventJson = serde_json::from_slice(payload).map_err(|_| EventRejection::Malformed)?;
    let at = match &json.at {
        serde_json::Value::Number(number) => number.as_u64().map(Timestamp::from_nanos),
        serde_json::Value::String(text) => crate::instant_text::parse_instant(text),
        _ => None,
    }
    .ok_or(EventRejection::BadTime)?;
    if json.event == "watermark" {
        let (Some(producer), None, None) = (json.producer, json.ip, json.owner) else {
            return Err(EventRejection::Malformed);
        };
        flowattr_common::check_workload_name(&producer)
            .map_err(|_| EventRejection::UnknownProducer)?;
        if at > latest {
            return Err(EventRejection::FromTheFuture);
        }
        return Ok(EventMessage::Watermark {
            producer: producer.into_boxed_str(),
            at,
        });
    }
    let (Some(ip), None) = (json.ip, json.producer) else {
        return Err(EventRejection::Malformed);
    };
    let ip: std::net::IpAddr = ip.parse().map_err(|_| EventRejection::BadIp)?;
    let ip = CanonicalIp::from(ip);
    if ip.is_host_local() {
        return Err(EventRejection::HostLocal);
    }
    if at > latest {
        return Err(EventRejection::FromTheFuture);
    }
    let owner = match (json.event.as_str(), json.owner) {
        ("assign", Some(owner)) => {
            flowattr_common::check_workload_name(&owner).map_err(|_| EventRejection::BadOwner)?;
            Some(owner.into_boxed_str())
        }
        ("assign", None) => return Err(EventRejection::BadOwner),
        ("unassign", None) => None,
        _ => return Err(EventRejection::Malformed),
    };
    Ok(EventMessage::Ip(IpEvent { ip, owner, at }))
}

/// Whether this node keeps a well-formed event: only about IPs it would attribute from events,
/// and only if not older than `oldest` (now less the events' retention).
pub fn check_event(
    event: &IpEvent,
    fallback: &crate::config::EventsConfig,
    oldest: Timestamp,
) -> Result<(), EventRejection> {
    if !fallback.covers(event.ip.to_ip_addr()) {
        return Err(EventRejection::OutsideFallback);
    }
    if event.at < oldest {
        return Err(EventRejection::OlderThanRetention);
    }
    Ok(())
}

/// An `at` as the command line takes it.
pub fn parse_at(text: &str) -> Option<Timestamp> {
    crate::instant_text::parse_instant(text)
}

/// Publishes one event message and waits until the brokers have it.
pub fn publish(
    cluster: &crate::config::ClusterConfig,
    brokers: &str,
    topic: &str,
    json: &str,
) -> Result<(), String> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = crate::kafka::cluster_config(cluster, brokers)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(|error| format!("Kafka client for {brokers}: {error}"))?;
    producer
        .send(BaseRecord::<(), str>::to(topic).payload(json))
        .map_err(|(error, _)| format!("publishing to {topic}: {error}"))?;
    producer
        .flush(std::time::Duration::from_secs(30))
        .map_err(|error| format!("publishing to {topic}: {error}"))
}

/// The JSON of a watermark, as `flowattr-collector events watermark` publishes it.
pub fn watermark_json(producer: &str, at: Timestamp) -> String {
    serde_json::json!({"event": "watermark", "producer": producer, "at": at.as_nanos()}).to_string()
}

/// The JSON of one event, as `flowattr-collector events` publishes it.
pub fn event_json(ip: std::net::IpAddr, owner: Option<&str>, at: Timestamp) -> String {
    let mut json = serde_json::json!({
        "event": if owner.is_some() { "assign" } else { "unassign" },
        "ip": ip.to_string(),
        "at": at.as_nanos(),
    });
    if let Some(owner) = owner {
        json["owner"] = owner.into();
    }
    json.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_by_the_schema_and_bad_ones_say_why() {
        let latest = Timestamp::from_nanos(2_000_000_000_000_000_000);
        let ip_event = |text: &[u8]| match parse_event(text, latest).unwrap() {
            EventMessage::Ip(event) => event,
            other => panic!("{other:?}"),
        };
        let assign = ip_event(
            br#"{"event":"assign","ip":"10.200.0.5","owner":"lb","at":"2023-11-14T22:13:20Z"}"#,
        );
        assert_eq!(assign.owner.as_deref(), Some("lb"));
        assert_eq!(assign.at, Timestamp::from_nanos(1_700_000_000_000_000_000));
        let unassign =
            ip_event(br#"{"event":"unassign","ip":"::ffff:10.200.0.5","at":1700000000000000001}"#);
        assert_eq!((unassign.ip, unassign.owner), (assign.ip, None));
        let json = event_json("10.200.0.5".parse().unwrap(), Some("lb"), assign.at);
        assert_eq!(ip_event(json.as_bytes()), assign);
        let watermark = watermark_json("ipam-1", assign.at);
        assert_eq!(
            parse_event(watermark.as_bytes(), latest).unwrap(),
            EventMessage::Watermark {
                producer: "ipam-1".into(),
                at: assign.at
            }
        );
        let refused = |text: &str| parse_event(text.as_bytes(), latest).unwrap_err();
        assert_eq!(refused("garbage"), EventRejection::Malformed);
        assert_eq!(
            refused(r#"{"event":"move","ip":"10.0.0.1","at":1}"#),
            EventRejection::Malformed
        );
        assert_eq!(
            refused(r#"{"event":"assign","ip":"10.0.0.1","owner":"x","at":1,"extra":1}"#),
            EventRejection::Malformed
        );
        assert_eq!(
            refused(r#"{"event":"assign","ip":"ten","owner":"x","at":1}"#),
            EventRejection::BadIp
        );
        assert_eq!(
            refused(r#"{"event":"assign","ip":"10.0.0.1","owner":"a\tb","at":1}"#),
            EventRejection::BadOwner
        );
        assert_eq!(
            refused(r#"{"event":"assign","ip":"10.0.0.1","at":1}"#),
            EventRejection::BadOwner
        );
        assert_eq!(
            refused(r#"{"event":"assign","ip":"10.0.0.1","owner":"x","at":"yesterday"}"#),
            EventRejection::BadTime
        );
        assert_eq!(
            refused(r#"{"event":"assign","ip":"127.0.0.1","owner":"x","at":1}"#),
            EventRejection::HostLocal
        );
        assert_eq!(
            refused(r#"{"event":"assign","ip":"10.0.0.1","owner":"x","at":2000000000000000001}"#),
            EventRejection::FromTheFuture
        );
        assert_eq!(
            refused(r#"{"event":"watermark","producer":"p","at":2000000000000000001}"#),
            EventRejection::FromTheFuture
        );
        assert_eq!(
            refused(r#"{"event":"watermark","producer":"p","ip":"10.0.0.1","at":1}"#),
            EventRejection::Malformed
        );
        assert_eq!(
            refused(r#"{"event":"watermark","at":1}"#),
            EventRejection::Malformed
        );
        assert_eq!(
            refused(r#"{"event":"assign","ip":"10.0.0.1","owner":"x","producer":"p","at":1}"#),
            EventRejection::Malformed
        );
        assert_eq!(
            refused(r#"{"event":"watermark","producer":"","at":1}"#),
            EventRejection::UnknownProducer
        );
    }

    #[test]
    fn a_node_keeps_only_events_it_could_answer_from() {
        let config = crate::config::EventsConfig {
            fallback_cidrs: vec!["10.200.0.0/16".parse().unwrap()],
            ..crate::config::EventsConfig::default()
        };
        let oldest = Timestamp::from_nanos(1_000);
        let event = |ip: &str, at: u64| IpEvent {
            ip: CanonicalIp::from(ip.parse::<std::net::IpAddr>().unwrap()),
            owner: Some("lb".into()),
            at: Timestamp::from_nanos(at),
        };
        assert_eq!(
            check_event(&event("10.200.0.5", 1_000), &config, oldest),
            Ok(())
        );
        assert_eq!(
            check_event(&event("10.201.0.5", 5_000), &config, oldest),
            Err(EventRejection::OutsideFallback)
        );
        assert_eq!(
            check_event(&event("10.200.0.5", 999), &config, oldest),
            Err(EventRejection::OlderThanRetention)
        );
    }
}
