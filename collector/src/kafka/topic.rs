//! Reading a whole topic the way every node reads its region's topics: every partition, no
//! consumer group, from `now - retention`, and knowing when everything that was in the topic
//! at the start has been read.

use std::time::{Duration, Instant};

use flowattr_common::Timestamp;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::read_progress::{Offsets, ReadProgress};
use super::{ClientError, cluster_config};
use crate::config::ClusterConfig;

/// A consumer for [`read_topic`]: offsets are never committed; each start reads by time.
pub(crate) fn reader_consumer(
    cluster: &ClusterConfig,
    brokers: &str,
    node_id: u64,
) -> Result<BaseConsumer, ClientError> {
    cluster_config(cluster, brokers)
        .set("group.id", format!("flowattr-node-{node_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // A position the brokers no longer have (a topic made again) reads from the start of
        // what they have, never skips to the end.
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|error| ClientError::new(brokers, error))
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
    pub fn from_parts(
        payload: &'a [u8],
        published: Timestamp,
        headers: &'a [(String, Vec<u8>)],
        replayed: bool,
    ) -> Self {
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
        self.headers
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_slice()))
    }

    /// The value of the header `key`, if the message has one.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(name, _)| *name == key)
            .map(|(_, value)| value)
    }
}

/// Reads `topic` forever: `handle(message)` for every message, and `caught_up()` once, when
/// every message that was in the topic at the start has been handled (waiting for the brokers
/// if they are away at the start). And `read_through(t)` as reading passes, for every
/// partition, the end (high watermark) the brokers gave it at `t` ([`ReadProgress`]), asked
/// about every [`PROGRESS_PERIOD`] by `prober` (a client of its own, so that its questions do
/// not queue behind the consumer's long-polling fetches): while the brokers are away, `t`
/// stays where it was.
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
    let Assigned {
        mut behind,
        mut next,
    } = assign(consumer, topic, retention);
    if behind.is_empty() {
        caught_up();
    }
    let mut progress = ReadProgress::default();
    let mut checked = Instant::now();
    // When a question was last answered, and when the partitions behind were last said.
    let (mut answered_at, mut said_behind_at) = (Instant::now(), Instant::now());
    // The same error again (a partition gone, the brokers away) is said once a minute.
    let mut last_error: Option<(String, Instant, u64)> = None;
    loop {
        if checked.elapsed() >= PROGRESS_PERIOD {
            checked = Instant::now();
            let asked = Timestamp::now();
            match ends_now(prober, topic, &next) {
                Ok(Some(ends)) => {
                    if let Err(changed) = progress.asked(asked, ends) {
                        return format!("topic {topic}: {changed}");
                    }
                }
                Ok(None) => {}
                Err(changed) => return changed,
            }
            skip_what_is_no_message(consumer, topic, &mut next);
            if passed(&mut behind, &next) {
                caught_up();
            }
            if answered_at.elapsed() >= STALL_SAID_AFTER
                && said_behind_at.elapsed() >= STALL_SAID_AFTER
            {
                said_behind_at = checked;
                let behind: Vec<String> = progress
                    .behind(&next)
                    .iter()
                    .map(|(partition, next, end)| format!("{partition}: {next}/{end}"))
                    .collect();
                tracing::warn!(
                    "topic {topic}: no read through a moment confirmed for {:.0} s; partitions behind (next offset to read/end): {}",
                    answered_at.elapsed().as_secs_f64(),
                    if behind.is_empty() {
                        "none known (the brokers do not answer)".to_owned()
                    } else {
                        behind.join(", ")
                    }
                );
            }
        }
        if let Some(through) = progress.answered(&next) {
            answered_at = Instant::now();
            read_through(through);
        }
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match polled {
            Ok(message) => message,
            Err(error) => {
                let text = error.to_string();
                match last_error.as_mut() {
                    Some((last, said, again))
                        if *last == text && said.elapsed() < Duration::from_secs(60) =>
                    {
                        *again += 1
                    }
                    _ => {
                        let again = last_error.as_ref().map_or(0, |(_, _, again)| *again);
                        let repeats = if again > 0 {
                            format!(" (the error before it {again} more times)")
                        } else {
                            String::new()
                        };
                        tracing::warn!("reading topic {topic}: {text}{repeats}");
                        last_error = Some((text, Instant::now(), 0));
                    }
                }
                continue;
            }
        };
        let published = message
            .timestamp()
            .to_millis()
            .map_or_else(Timestamp::now, |ms| {
                Timestamp::from_nanos((ms.max(0) as u64).saturating_mul(1_000_000))
            });
        let headers: Vec<(String, Vec<u8>)> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| {
                        (
                            header.key.to_owned(),
                            header.value.unwrap_or_default().to_vec(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        handle(&TopicMessage::from_parts(
            message.payload().unwrap_or_default(),
            published,
            &headers,
            false,
        ));
        next.insert(message.partition(), message.offset() + 1);
        if behind.contains_key(&message.partition()) && passed(&mut behind, &next) {
            caught_up();
        }
    }
}

/// Forgets the partitions of `behind` that reading has reached the target of; true if that
/// emptied it (reading has just caught up).
fn passed(behind: &mut Offsets, next: &Offsets) -> bool {
    if behind.is_empty() {
        return false;
    }
    behind.retain(|partition, target| next.get(partition).is_none_or(|next| next < target));
    behind.is_empty()
}

/// How often [`read_topic`] asks the brokers how far each partition goes.
const PROGRESS_PERIOD: Duration = Duration::from_millis(500);

/// How long reading goes without confirming a moment read through before the partitions
/// behind are logged (and again as often while it lasts).
const STALL_SAID_AFTER: Duration = Duration::from_secs(30);

/// The end (high watermark) now of every partition being read (the keys of `next`); None if a
/// partition's could not be had. An error if the topic has another partition count now.
fn ends_now(prober: &BaseConsumer, topic: &str, next: &Offsets) -> Result<Option<Offsets>, String> {
    let timeout = Duration::from_secs(2);
    let partitions = next.len();
    if let Ok(metadata) = prober.fetch_metadata(Some(topic), timeout)
        && let Some(found) = metadata.topics().first()
        && !found.partitions().is_empty()
        && found.partitions().len() != partitions
    {
        return Err(format!(
            "topic {topic} has {} partitions now, not {partitions}",
            found.partitions().len()
        ));
    }
    let mut ends = Offsets::new();
    for &partition in next.keys() {
        match prober.fetch_watermarks(topic, partition, timeout) {
            Ok((_, high)) => ends.insert(partition, high),
            Err(_) => return Ok(None),
        };
    }
    Ok(Some(ends))
}

/// Moves the next offset to read on to the consumer's own position where that is further:
/// offsets that hold no message for the application (a transaction's commit marker, records
/// compacted away at a partition's end) are passed by the consumer, never handed over, and
/// would otherwise leave reading short of an end forever.
fn skip_what_is_no_message(consumer: &BaseConsumer, topic: &str, next: &mut Offsets) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    for (partition, next) in next.iter_mut() {
        if let Some(Offset::Offset(position)) = positions
            .find_partition(topic, *partition)
            .map(|element| element.offset())
        {
            *next = (*next).max(position);
        }
    }
}

/// Per partition: the offset reading must reach to have caught up (only those behind), and
/// the next offset to read.
struct Assigned {
    behind: Offsets,
    next: Offsets,
}

fn assign(consumer: &BaseConsumer, topic: &str, retention: Duration) -> Assigned {
    let mut reported = false;
    loop {
        match try_assign(consumer, topic, retention) {
            Ok(behind) => return behind,
            Err(error) => {
                if !reported {
                    tracing::warn!(
                        "waiting for topic {topic}: {error}; no flow is released until this node has caught up with it"
                    );
                    reported = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Assigns every partition from `now - retention`.
fn try_assign(
    consumer: &BaseConsumer,
    topic: &str,
    retention: Duration,
) -> Result<Assigned, String> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|error| error.to_string())?;
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
    let starts = consumer
        .offsets_for_times(times, timeout)
        .map_err(|error| error.to_string())?;
    let (mut behind, mut next) = (Offsets::new(), Offsets::new());
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
    consumer
        .assign(&starts)
        .map_err(|error| error.to_string())?;
    Ok(Assigned { behind, next })
}
