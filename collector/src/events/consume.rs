//! The events consumer thread: the events topic, read like the broadcast topic (every
//! partition, from `now - retention`), each message checked before its event reaches the shard
//! that owns the IP.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use flowattr_common::{Timestamp, duration_nanos};

use super::{check_event, parse_event};
use crate::broadcast::{BroadcastError, BroadcastStatus, PeerMessage, prepare_topic, read_topic, reader_consumer};
use crate::config::Config;
use crate::shard::ShardRouter;

pub fn start(
    config: &Config,
    brokers: &str,
    node_id: u64,
    shards: Vec<mpsc::SyncSender<PeerMessage>>,
    status: Arc<BroadcastStatus>,
) -> Result<(), BroadcastError> {
    let consumer = reader_consumer(&config.cluster, brokers, node_id)?;
    let (cluster, brokers) = (config.cluster.clone(), brokers.to_owned());
    let topic = config.events.topic.clone();
    let retention = config.ownership.retention;
    let fallback = config.events.clone();
    let skew = duration_nanos(config.max_clock_skew());
    let router = ShardRouter::new(shards.len());
    std::thread::Builder::new()
        .name("flowattr-events".into())
        .spawn(move || {
            // A node waits for the topic's history before it releases flows: a topic nobody
            // created yet would hold it forever.
            prepare_topic(&cluster, &brokers, &topic);
            read_topic(
                &consumer,
                &topic,
                retention,
                |payload, _| {
                    let now = Timestamp::now();
                    let latest = Timestamp::from_nanos(now.as_nanos().saturating_add(skew));
                    let oldest = now.saturating_sub(retention);
                    let checked = parse_event(payload, latest).and_then(|event| {
                        check_event(&event, &fallback, oldest)?;
                        Ok(event)
                    });
                    match checked {
                        Ok(event) => {
                            status.events_applied.fetch_add(1, Ordering::Relaxed);
                            // Blocks while the shard is behind: nothing is dropped.
                            let _ = shards[router.shard_of(event.ip)].send(PeerMessage::Events(vec![event]));
                        }
                        Err(reason) => {
                            status.events_rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                },
                || {
                    for shard in &shards {
                        let _ = shard.send(PeerMessage::CaughtUp);
                    }
                    eprintln!("flowattr-collector: events: caught up with topic {topic}");
                },
            );
        })
        .map_err(|error| BroadcastError::Client {
            brokers: String::new(),
            reason: format!("starting the events thread: {error}"),
        })?;
    Ok(())
}
