//! The events consumer thread: the events topic, read like the broadcast topic (every
//! partition, from `now - retention`), each message checked before its event reaches the shard
//! that owns the IP; and how far the stream is complete, for the shards to wait on.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use flowattr_common::{Timestamp, duration_nanos};

use super::{EventCompleteness, EventMessage, EventsStatus, IpEvent, check_event, parse_event};
use crate::config::Config;
use crate::kafka::{prepare_topic, read_topic_isolated};

/// What the consumer hands on, in topic order: the node passes each checked event to the shard
/// that owns its IP.
#[derive(Debug)]
pub enum EventDelivery {
    Event(IpEvent),
    /// Everything in the topic when the node started has been handed on.
    CaughtUp,
}

/// Starts the consumer thread; `deliver` may block (a shard behind): nothing is dropped.
pub fn start(
    config: &Config,
    brokers: &str,
    node_id: u64,
    deliver: impl Fn(EventDelivery) + Send + 'static,
    status: Arc<EventsStatus>,
) -> std::io::Result<()> {
    let (cluster, brokers) = (config.cluster.clone(), brokers.to_owned());
    let topic = config.events.topic.clone();
    let retention = config.events_retention();
    let fallback = config.events.clone();
    let skew = duration_nanos(config.max_clock_skew());
    let completeness = std::cell::RefCell::new(EventCompleteness::new(&config.events));
    std::thread::Builder::new()
        .name("flowattr-events".into())
        .spawn(move || {
            // A node waits for the topic's history before it releases flows: a topic nobody
            // created yet would hold it forever.
            prepare_topic(&cluster, &brokers, &topic, retention);
            read_topic_isolated(
                &cluster,
                &brokers,
                node_id,
                &topic,
                retention,
                &status.reader_restarts,
                |message| {
                    let (payload, published) = (message.payload(), message.published);
                    let now = Timestamp::now();
                    let latest = Timestamp::from_nanos(now.as_nanos().saturating_add(skew));
                    let oldest = now.saturating_sub(retention);
                    let checked = parse_event(payload, latest).and_then(|message| match message {
                        EventMessage::Ip(event) => {
                            check_event(&event, &fallback, oldest)?;
                            Ok(Some(event))
                        }
                        EventMessage::Watermark { producer, at } => {
                            completeness
                                .borrow_mut()
                                .watermark(&producer, at, published)?;
                            Ok(None)
                        }
                    });
                    match checked {
                        Ok(Some(event)) => {
                            status.applied.fetch_add(1, Ordering::Relaxed);
                            completeness.borrow_mut().observe(event.at, published);
                            // An event about a time already answered for: its producer broke
                            // its promise (a flow may have been answered without it). Not one a
                            // replacement reader reads again.
                            if !message.replayed
                                && event.at.as_nanos()
                                    <= status.complete_through_ns.load(Ordering::Relaxed)
                            {
                                status.late.fetch_add(1, Ordering::Relaxed);
                            }
                            deliver(EventDelivery::Event(event));
                        }
                        Ok(None) => {
                            status.watermarks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(reason) => {
                            status.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                },
                || {
                    deliver(EventDelivery::CaughtUp);
                    tracing::info!("events: caught up with topic {topic}");
                },
                |read_through: Timestamp| {
                    let mut completeness = completeness.borrow_mut();
                    let through = completeness.complete_through(read_through);
                    status
                        .complete_through_ns
                        .store(through.as_nanos(), Ordering::Relaxed);
                    status
                        .lateness_ns
                        .store(duration_nanos(completeness.lateness()), Ordering::Relaxed);
                    if let Some(seen) = completeness.broken_promise() {
                        status
                            .lateness_seen_ns
                            .store(duration_nanos(seen), Ordering::Relaxed);
                    }
                },
            );
        })
        .map(|_| ())
}
