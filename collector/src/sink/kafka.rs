//! The Kafka sink: many flows per message (protobuf `FlowBatch`es or `FlowColumns`, or JSON
//! lines), produced with the user's librdkafka properties, and acknowledged by the brokers
//! before the write returns, so the segment behind the flows is deleted only once they are
//! safe.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;

use super::SinkError;
use super::protobuf::{LIBRDKAFKA_MESSAGE_MAX_BYTES, MessageLimits};
use super::record::EmittedBatch;
use super::{json, protobuf};
use crate::config::KafkaFormat;

/// One write's messages: how many await their delivery report, and how many failed. Each
/// write waits for its own messages only, so shards writing at once never wait for each other.
#[derive(Default)]
struct Deliveries {
    /// (pending, failed)
    counts: Mutex<(u64, u64)>,
    all_reported: Condvar,
}

impl Deliveries {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Hands each delivery report to the write that produced the message. Reports are served by
/// the producer's own polling thread (`ThreadedProducer`), so a write sleeps on its condition
/// variable until its last report, instead of polling. Also keeps the bytes the client sent
/// the brokers, from its statistics.
struct DeliveryReports {
    transmitted: Arc<AtomicU64>,
}

impl ClientContext for DeliveryReports {
    fn stats(&self, statistics: Statistics) {
        // librdkafka's count of bytes sent to the brokers: after compression, with the
        // protocol's framing (produce requests and the few others).
        self.transmitted
            .fetch_max(statistics.tx_bytes.max(0) as u64, Ordering::Relaxed);
    }
}

impl ProducerContext for DeliveryReports {
    type DeliveryOpaque = Arc<Deliveries>;

    fn delivery(&self, result: &DeliveryResult<'_>, deliveries: Arc<Deliveries>) {
        let mut counts = deliveries.lock();
        counts.0 -= 1;
        counts.1 += u64::from(result.is_err());
        if counts.0 == 0 {
            deliveries.all_reported.notify_all();
        }
    }
}

pub(super) struct KafkaSink {
    producer: ThreadedProducer<DeliveryReports>,
    /// Bytes sent to the brokers, as of the client's last statistics (every second).
    pub transmitted: Arc<AtomicU64>,
    topic: String,
    format: KafkaFormat,
    limits: MessageLimits,
}

/// How long one batch may take to be acknowledged before the write fails (and is retried).
const KAFKA_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The compression flowattr starts from, by format (the sink's `properties` override it):
/// `compression.type` and `compression.level`. Rows: lz4, cheap to compress and what brokers
/// decompress fastest, as rows repeat their names whole. Columns: zstd at level 2, a fifth
/// fewer bytes than lz4 leaves of them; over messages of long columns it costs what level 1
/// does for 1% fewer bytes, and level 3 a third more CPU for 3% fewer (docs/benchmarks.md,
/// "Kafka: protobuf by column").
fn default_compression(format: KafkaFormat) -> [(&'static str, &'static str); 2] {
    match format {
        KafkaFormat::ProtobufColumns => [("compression.type", "zstd"), ("compression.level", "2")],
        // librdkafka's own default level.
        KafkaFormat::Protobuf | KafkaFormat::Json => {
            [("compression.type", "lz4"), ("compression.level", "-1")]
        }
    }
}

/// The other producer settings flowattr starts from; any of them can be overridden by the
/// sink's `properties`.
const PRODUCER_DEFAULTS: [(&str, &str); 4] = [
    ("linger.ms", "5"),
    ("batch.size", "1000000"),
    ("acks", "all"),
    // For the bytes sent after compression (flowattr_sink_transmitted_bytes_total).
    ("statistics.interval.ms", "1000"),
];

impl KafkaSink {
    pub(super) fn open(
        brokers: &str,
        topic: &str,
        format: KafkaFormat,
        flows_per_message: usize,
        properties: &BTreeMap<String, String>,
    ) -> Result<KafkaSink, SinkError> {
        // The sink's defaults first, so that the operator's properties override them.
        let timeout = (
            "message.timeout.ms".to_owned(),
            KAFKA_DELIVERY_TIMEOUT.as_millis().to_string(),
        );
        let defaults: Vec<(String, String)> = std::iter::once(timeout)
            .chain(
                default_compression(format)
                    .into_iter()
                    .chain(PRODUCER_DEFAULTS)
                    .map(|(key, value)| (key.to_owned(), value.to_owned())),
            )
            .collect();
        let config = crate::kafka::client_config(
            brokers,
            defaults
                .iter()
                .map(|(key, value)| (key, value))
                .chain(properties),
        );
        let max_message_bytes = match config.get("message.max.bytes") {
            None => LIBRDKAFKA_MESSAGE_MAX_BYTES,
            Some(text) => text.parse().map_err(|_| SinkError::KafkaProperty {
                brokers: brokers.to_owned(),
                key: "message.max.bytes",
                value: text.to_owned(),
            })?,
        };
        if !matches!(config.get("acks"), Some("all" | "-1")) {
            tracing::warn!(
                "the Kafka sink {brokers}/{topic} has acks={}: flows the broker acknowledged can still be lost if its leader fails before replicating them",
                config.get("acks").unwrap_or("?")
            );
        }
        let transmitted = Arc::new(AtomicU64::new(0));
        let producer = config
            .create_with_context(DeliveryReports {
                transmitted: transmitted.clone(),
            })
            .map_err(|source| SinkError::KafkaConfig {
                brokers: brokers.to_owned(),
                source,
            })?;
        Ok(KafkaSink {
            producer,
            transmitted,
            topic: topic.to_owned(),
            format,
            limits: MessageLimits::new(flows_per_message, max_message_bytes),
        })
    }

    /// Encodes the batch into messages, on the calling sink thread (several encode at once).
    pub(super) fn encode(&self, batch: &mut EmittedBatch) {
        match self.format {
            KafkaFormat::Protobuf => protobuf::encode_messages(batch, self.limits),
            KafkaFormat::ProtobufColumns => protobuf::columns::encode_messages(batch, self.limits),
            KafkaFormat::Json => json::encode_once(batch),
        }
    }

    /// Produces the messages [`Self::encode`] made and waits until the brokers acknowledged
    /// them all; the bytes produced. (Not `flush`: it waits for every thread's messages, and in
    /// steps of 100 ms.)
    pub(super) fn write(&self, batch: &EmittedBatch) -> Result<usize, String> {
        let deliveries = Arc::new(Deliveries::default());
        let deadline = Instant::now() + KAFKA_DELIVERY_TIMEOUT;
        let mut bytes = 0;
        match self.format {
            KafkaFormat::Protobuf | KafkaFormat::ProtobufColumns => {
                for message in protobuf::messages(batch) {
                    self.produce(message, &deliveries)?;
                    bytes += message.len();
                }
            }
            KafkaFormat::Json => {
                for message in json_messages(&batch.json, self.limits) {
                    self.produce(message, &deliveries)?;
                    bytes += message.len();
                }
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let (counts, _) = deliveries
            .all_reported
            .wait_timeout_while(deliveries.lock(), remaining, |counts| counts.0 > 0)
            .unwrap_or_else(|poison| poison.into_inner());
        match *counts {
            (0, 0) => Ok(bytes),
            (0, failed) => Err(format!(
                "{failed} messages were not acknowledged by the broker"
            )),
            (pending, _) => Err(format!(
                "{pending} messages not acknowledged within {KAFKA_DELIVERY_TIMEOUT:?}"
            )),
        }
    }

    fn produce(&self, payload: &[u8], deliveries: &Arc<Deliveries>) -> Result<(), String> {
        let mut record = BaseRecord::<(), [u8], Arc<Deliveries>>::with_opaque_to(
            &self.topic,
            deliveries.clone(),
        )
        .payload(payload);
        // Counted before it can be reported.
        deliveries.lock().0 += 1;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((error, _)) => {
                    deliveries.lock().0 -= 1;
                    return Err(error.to_string());
                }
            }
        }
    }
}

/// `lines` cut into runs of whole lines within `limits` (a line longer than the byte limit
/// alone).
fn json_messages(lines: &[u8], limits: MessageLimits) -> impl Iterator<Item = &[u8]> {
    let mut rest = lines;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut line_ends = rest
            .iter()
            .enumerate()
            .filter(|&(_, &byte)| byte == b'\n')
            .map(|(at, _)| at + 1);
        let first = line_ends.next().unwrap_or(rest.len());
        let end = line_ends
            .take(limits.flows.saturating_sub(1))
            .take_while(|&end| end <= limits.bytes)
            .last()
            .unwrap_or(first);
        let (message, after) = rest.split_at(end);
        rest = after;
        Some(message)
    })
}

#[cfg(test)]
mod tests {
    use rdkafka::config::ClientConfig;

    use super::*;

    #[test]
    fn json_lines_are_cut_into_messages_of_whole_lines() {
        let lines = b"a\nb\nc\nd\ne\n";
        let limits = |flows, bytes| MessageLimits { flows, bytes };
        let messages: Vec<&[u8]> = json_messages(lines, limits(2, 100)).collect();
        assert_eq!(messages, [&b"a\nb\n"[..], b"c\nd\n", b"e\n"]);
        assert_eq!(json_messages(lines, limits(100, 100)).count(), 1);
        assert_eq!(json_messages(b"", limits(2, 100)).count(), 0);
        // Cut by bytes first where lines are long; a line over the limit goes alone.
        let long = b"aaaa\nbb\ncccccc\nd\n";
        let messages: Vec<&[u8]> = json_messages(long, limits(100, 5)).collect();
        assert_eq!(messages, [&b"aaaa\n"[..], b"bb\n", b"cccccc\n", b"d\n"]);
        let messages: Vec<&[u8]> = json_messages(long, limits(100, 9)).collect();
        assert_eq!(messages, [&b"aaaa\nbb\n"[..], b"cccccc\nd\n"]);
        let messages: Vec<&[u8]> = json_messages(long, limits(3, 9)).collect();
        assert_eq!(messages, [&b"aaaa\nbb\n"[..], b"cccccc\nd\n"]);
        assert_eq!(json_messages(long, limits(1, 100)).count(), 4);
    }

    /// librdkafka is built with what managed Kafka services ask of a client: TLS, SASL PLAIN
    /// and SCRAM, zstd. Such a sink's producer is made (no broker is needed for that); one
    /// built without them refuses `security.protocol=SASL_SSL` at start.
    #[test]
    fn a_sink_with_tls_sasl_scram_and_zstd_is_made() {
        let features = ClientConfig::new()
            .create_native_config()
            .unwrap()
            .get("builtin.features")
            .unwrap();
        for feature in ["ssl", "sasl_plain", "sasl_scram", "zstd", "lz4"] {
            assert!(
                features.split(',').any(|built| built == feature),
                "{feature} not in {features}"
            );
        }
        let properties: BTreeMap<String, String> = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "flowattr"),
            ("sasl.password", "secret"),
            ("compression.type", "zstd"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
        KafkaSink::open(
            "127.0.0.1:1",
            "flows",
            KafkaFormat::Protobuf,
            100,
            &properties,
        )
        .unwrap();
        // A message size that is not a number is refused at start, in one line.
        let mut size = properties.clone();
        size.insert("message.max.bytes".to_owned(), "1MB".to_owned());
        let error = KafkaSink::open("127.0.0.1:1", "flows", KafkaFormat::Protobuf, 100, &size)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            error.contains("message.max.bytes = \"1MB\"") && !error.contains('\n'),
            "{error}"
        );
        // A setting librdkafka does not know is a start-up error, with the key in it.
        let mut wrong = properties.clone();
        wrong.insert("sasl.mechanism".to_owned(), "NOT-A-MECHANISM".to_owned());
        let error = KafkaSink::open("127.0.0.1:1", "flows", KafkaFormat::Protobuf, 100, &wrong)
            .err()
            .expect("refused");
        assert!(
            error.to_string().contains("127.0.0.1:1")
                && error
                    .to_string()
                    .contains("Unsupported SASL mechanism: NOT-A-MECHANISM"),
            "{error}"
        );
    }
}
