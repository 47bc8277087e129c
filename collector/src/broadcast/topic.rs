//! Reading a whole topic the way every node reads its region's topics: every partition, no
//! consumer group, from `now - retention`, and knowing when everything that was in the topic
//! at the start has been read.

use std::collections::BTreeMap;
use std::time::Duration;

use flowattr_common::Timestamp;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{BroadcastError, kafka_config};
use crate::config::ClusterConfig;

/// A consumer for [`read_topic`]: offsets are never committed; each start reads by time.
pub(crate) fn reader_consumer(cluster: &ClusterConfig, brokers: &str, node_id: u64) -> Result<BaseConsumer, BroadcastError> {
    kafka_config(cluster, brokers)
        .set("group.id", format!("flowattr-node-{node_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // A position the brokers no longer have (a topic made again) reads from the start of
        // what they have, never skips to the end.
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|error| BroadcastError::Client {
            brokers: brokers.to_owned(),
            reason: error.to_string(),
        })
}

/// One message as [`read_topic`] hands it over.
pub(crate) struct TopicMessage<'a> {
    payload: &'a [u8],
    /// When it was published (when the producer made it; the reader's clock if it says none).
    pub published: Timestamp,
    headers: &'a [(String, Vec<u8>)],
    /// Read again by a replacement reader before it caught up (see
    /// [`super::reader_process`]): history this node has already applied once.
    pub replayed: bool,
}

impl<'a> TopicMessage<'a> {
    pub fn from_parts(payload: &'a [u8], published: Timestamp, headers: &'a [(String, Vec<u8>)], replayed: bool) -> Self {
        TopicMessage {
            payload,
            published,
            headers,
            replayed,
        }
    }

    pub fn payload(&self) -> &[u8] {
        self.payload
    }

    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(key, value)| (key.as_str(), value.as_slice()))
    }

    /// The value of the header `key`, if the message has one.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers().find(|(name, _)| *name == key).map(|(_, value)| value)
    }
}

/// Reads `topic` forever: `handle(message)` for every message, and `caught_up()` once, when
/// every message that was in the topic at the start has been handled (waiting for the brokers
/// if they are away at the start). And, about every [`PROGRESS_PERIOD`], `read_through(t)`
/// with the latest instant `t` at which this consumer had read every message of every
/// partition, checked against the brokers' high watermarks as `prober` (a client of its own,
/// so that its questions do not queue behind the consumer's long-polling fetches) asks for
/// them: while the brokers are away, `t` stays where it was.
///
/// Returns, with why, once the topic is no longer the one it started reading: a partition's
/// end went back (deleted and created again, as on a broker restarted empty), or the
/// partition count changed. Reading on would skip or miss messages; the caller starts
/// over.
pub(crate) fn read_topic(
    consumer: &BaseConsumer,
    prober: &BaseConsumer,
    topic: &str,
    retention: Duration,
    mut handle: impl FnMut(&TopicMessage<'_>),
    mut caught_up: impl FnMut(),
    mut read_through: impl FnMut(Timestamp),
) -> String {
    // Partition -> the offset reading must reach to have caught up; and the next offset to read.
    let Offsets { mut behind, mut next } = assign(consumer, topic, retention);
    if behind.is_empty() {
        caught_up();
    }
    let mut checked = std::time::Instant::now();
    let mut ends = BTreeMap::new();
    // The same error again (a partition gone, the brokers away) is said once a minute.
    let mut last_error: Option<(String, std::time::Instant, u64)> = None;
    loop {
        if checked.elapsed() >= PROGRESS_PERIOD {
            checked = std::time::Instant::now();
            let asked = Timestamp::now();
            match read_everything(prober, topic, &next, &mut ends) {
                Ok(true) => read_through(asked),
                Ok(false) => {}
                Err(changed) => return changed,
            }
        }
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = match polled {
            Ok(message) => message,
            Err(error) => {
                let text = error.to_string();
                match last_error.as_mut() {
                    Some((last, said, again)) if *last == text && said.elapsed() < Duration::from_secs(60) => *again += 1,
                    _ => {
                        let again = last_error.as_ref().map_or(0, |(_, _, again)| *again);
                        let repeats = if again > 0 { format!(" (the error before it {again} more times)") } else { String::new() };
                        tracing::warn!("reading topic {topic}: {text}{repeats}");
                        last_error = Some((text, std::time::Instant::now(), 0));
                    }
                }
                continue;
            }
        };
        let published = message
            .timestamp()
            .to_millis()
            .map_or_else(Timestamp::now, |ms| Timestamp::from_nanos((ms.max(0) as u64).saturating_mul(1_000_000)));
        let headers: Vec<(String, Vec<u8>)> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| (header.key.to_owned(), header.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        handle(&TopicMessage::from_parts(message.payload().unwrap_or_default(), published, &headers, false));
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
/// published before the question was asked has been read. An error if the topic changed
/// under the reader: a partition count other than the one read, or a partition whose end
/// (`ends`, per partition) went back.
fn read_everything(prober: &BaseConsumer, topic: &str, next: &BTreeMap<i32, i64>, ends: &mut BTreeMap<i32, i64>) -> Result<bool, String> {
    let timeout = Duration::from_secs(2);
    if let Ok(metadata) = prober.fetch_metadata(Some(topic), timeout)
        && let Some(found) = metadata.topics().first()
        && !found.partitions().is_empty()
        && found.partitions().len() != next.len()
    {
        return Err(format!("topic {topic} has {} partitions now, not {}", found.partitions().len(), next.len()));
    }
    let mut everything = true;
    for (&partition, &next) in next {
        match prober.fetch_watermarks(topic, partition, timeout) {
            Ok((_, high)) => {
                // A partition's end only moves on, unless it was deleted and made again.
                let end = ends.entry(partition).or_insert(high);
                if high < *end {
                    return Err(format!("partition {partition} of topic {topic} ends at offset {high}, before the {end} it reached"));
                }
                *end = high;
                everything &= next >= high;
            }
            Err(_) => everything = false,
        }
    }
    Ok(everything)
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
                    tracing::warn!("waiting for topic {topic}: {error}; no flow is released until this node has caught up with it");
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
