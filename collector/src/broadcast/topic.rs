//! Reading a whole topic the way every node reads its region's topics: every partition, no
//! consumer group, from `now - retention`, and knowing when everything that was in the topic
//! at the start has been read.

use std::collections::BTreeMap;
use std::time::Duration;

use flowattr_common::Timestamp;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{BroadcastError, kafka_config};
use crate::config::ClusterConfig;

/// A consumer for [`read_topic`]: offsets are never committed; each start reads by time.
pub(crate) fn reader_consumer(cluster: &ClusterConfig, brokers: &str, node_id: u64) -> Result<BaseConsumer, BroadcastError> {
    kafka_config(cluster, brokers)
        .set("group.id", format!("flowattr-node-{node_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|error| BroadcastError::Client {
            brokers: brokers.to_owned(),
            reason: error.to_string(),
        })
}

/// One message as [`read_topic`] hands it over.
pub(crate) struct TopicMessage<'a> {
    message: &'a BorrowedMessage<'a>,
    /// When it was published (when the producer made it; the reader's clock if it says none).
    pub published: Timestamp,
}

impl TopicMessage<'_> {
    pub fn payload(&self) -> &[u8] {
        self.message.payload().unwrap_or_default()
    }

    /// The value of the header `key`, if the message has one.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.message
            .headers()?
            .iter()
            .find(|header| header.key == key)
            .and_then(|header| header.value)
    }
}

/// Reads `topic` forever: `handle(message)` for every message, and `caught_up()` once, when
/// every message that was in the topic at the start has been handled (waiting for the brokers
/// if they are away at the start). And, about every [`PROGRESS_PERIOD`], `read_through(t)`
/// with the latest instant `t` at which this consumer had read every message of every
/// partition, checked against the brokers' high watermarks as `prober` (a client of its own,
/// so that its questions do not queue behind the consumer's long-polling fetches) asks for
/// them: while the brokers are away, `t` stays where it was.
pub(crate) fn read_topic(
    consumer: &BaseConsumer,
    prober: &BaseConsumer,
    topic: &str,
    retention: Duration,
    mut handle: impl FnMut(&TopicMessage<'_>),
    mut caught_up: impl FnMut(),
    mut read_through: impl FnMut(Timestamp),
) {
    // Partition -> the offset reading must reach to have caught up; and the next offset to read.
    let Offsets { mut behind, mut next } = assign(consumer, topic, retention);
    if behind.is_empty() {
        caught_up();
    }
    let mut checked = std::time::Instant::now();
    loop {
        if checked.elapsed() >= PROGRESS_PERIOD {
            checked = std::time::Instant::now();
            let asked = Timestamp::now();
            if read_everything(prober, topic, &next) {
                read_through(asked);
            }
        }
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = match polled {
            Ok(message) => message,
            Err(error) => {
                eprintln!("flowattr-collector: reading topic {topic}: {error}");
                continue;
            }
        };
        let published = message
            .timestamp()
            .to_millis()
            .map_or_else(Timestamp::now, |ms| Timestamp::from_nanos((ms.max(0) as u64).saturating_mul(1_000_000)));
        handle(&TopicMessage {
            message: &message,
            published,
        });
        next.insert(message.partition(), message.offset() + 1);
        if let Some(&target) = behind.get(&message.partition())
            && message.offset() + 1 >= target
        {
            behind.remove(&message.partition());
            if behind.is_empty() {
                caught_up();
            }
        }
    }
}

/// How often [`read_topic`] asks the brokers how far each partition goes.
const PROGRESS_PERIOD: Duration = Duration::from_millis(500);

/// Whether every partition's next offset to read has reached its high watermark: everything
/// published before the question was asked has been read.
fn read_everything(prober: &BaseConsumer, topic: &str, next: &BTreeMap<i32, i64>) -> bool {
    next.iter().all(|(&partition, &next)| {
        prober
            .fetch_watermarks(topic, partition, Duration::from_secs(2))
            .is_ok_and(|(_, high)| next >= high)
    })
}

/// Per partition: the offset reading must reach to have caught up (only those behind), and
/// the next offset to read.
struct Offsets {
    behind: BTreeMap<i32, i64>,
    next: BTreeMap<i32, i64>,
}

fn assign(consumer: &BaseConsumer, topic: &str, retention: Duration) -> Offsets {
    let mut reported = false;
    loop {
        match try_assign(consumer, topic, retention) {
            Ok(behind) => return behind,
            Err(error) => {
                if !reported {
                    eprintln!("flowattr-collector: waiting for topic {topic}: {error}; no flow is released until this node has caught up with it");
                    reported = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Assigns every partition from `now - retention`.
fn try_assign(consumer: &BaseConsumer, topic: &str, retention: Duration) -> Result<Offsets, String> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|error| error.to_string())?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|topic| topic.partitions().iter().map(|partition| partition.id()))
        .collect();
    if partitions.is_empty() {
        return Err("the topic has no partitions yet".into());
    }
    let since = Timestamp::now().saturating_sub(retention).as_nanos() / 1_000_000;
    let mut times = TopicPartitionList::new();
    for &partition in &partitions {
        times
            .add_partition_offset(topic, partition, Offset::Offset(since as i64))
            .map_err(|error| error.to_string())?;
    }
    let starts = consumer.offsets_for_times(times, timeout).map_err(|error| error.to_string())?;
    let (mut behind, mut next) = (BTreeMap::new(), BTreeMap::new());
    for element in starts.elements() {
        let (_, high) = consumer
            .fetch_watermarks(topic, element.partition(), timeout)
            .map_err(|error| error.to_string())?;
        let start = match element.offset() {
            Offset::Offset(offset) => offset,
            // Nothing newer than the time: nothing to read before catching up.
            _ => high,
        };
        if start < high {
            behind.insert(element.partition(), high);
        }
        next.insert(element.partition(), start);
    }
    consumer.assign(&starts).map_err(|error| error.to_string())?;
    Ok(Offsets { behind, next })
}
