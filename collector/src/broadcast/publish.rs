//! The publisher thread: what the shards learned goes to the broadcast topic, with a backlog
//! bounded in bytes while the brokers are slow or away (librdkafka holds it and retries until
//! they return; past the bound, new messages are dropped and counted).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flowattr_common::wire::{RangeUpdateBatch, encode_message};
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use super::{BroadcastError, BroadcastStatus, kafka_config};
use crate::config::{ClusterConfig, Config};

/// One frame for one partition.
struct Outgoing {
    partition: i32,
    frame: Vec<u8>,
    updates: u64,
}

/// The shards' handle on the publisher thread. Sending never blocks a shard.
pub struct Publisher {
    outgoing: mpsc::Sender<Outgoing>,
    /// The topic's partitions: the configured count until the brokers say otherwise.
    partitions: Arc<AtomicU32>,
}

impl Publisher {
    pub(super) fn start(
        config: &Config,
        brokers: &str,
        node_id: u64,
        status: Arc<BroadcastStatus>,
    ) -> Result<Publisher, BroadcastError> {
        let cluster = &config.cluster;
        let producer: BaseProducer<Deliveries> = kafka_config(cluster, brokers)
            // The backlog: librdkafka keeps undelivered messages, retrying while the brokers
            // are away, up to this many kilobytes; past it `send` says the queue is full.
            .set("queue.buffering.max.kbytes", (cluster.publish_backlog_bytes / 1024).max(1).to_string())
            .set("message.timeout.ms", "0")
            .set("linger.ms", "20")
            .create_with_context(Deliveries {
                status: status.clone(),
            })
            .map_err(|error| BroadcastError::Client {
                brokers: brokers.to_owned(),
                reason: error.to_string(),
            })?;
        let (outgoing, incoming) = mpsc::channel();
        let partitions = Arc::new(AtomicU32::new(cluster.partitions));
        let known = partitions.clone();
        let cluster = cluster.clone();
        let brokers = brokers.to_owned();
        std::thread::Builder::new()
            .name("flowattr-publish".into())
            .spawn(move || {
                // Here, not at start: brokers that are away must not hold up the node's start.
                known.store(prepare_topic(&cluster, &brokers, &cluster.topic), Ordering::Relaxed);
                run(producer, &cluster, node_id, &known, incoming, &status)
            })
            .map_err(|error| BroadcastError::Client {
                brokers: String::new(),
                reason: format!("starting the publisher thread: {error}"),
            })?;
        Ok(Publisher { outgoing, partitions })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions.load(Ordering::Relaxed)
    }

    /// Queues one shard's batch for `partition`.
    pub fn send(&self, partition: i32, batch: &RangeUpdateBatch) {
        let mut frame = Vec::new();
        if encode_message(batch, &mut frame).is_ok() {
            // Only at shutdown: the thread is gone.
            let _ = self.outgoing.send(Outgoing {
                partition,
                frame,
                updates: batch.updates.len() as u64,
            });
        }
    }
}

fn run(
    producer: BaseProducer<Deliveries>,
    cluster: &ClusterConfig,
    node_id: u64,
    partitions: &AtomicU32,
    incoming: mpsc::Receiver<Outgoing>,
    status: &BroadcastStatus,
) {
    let (topic, interval) = (cluster.topic.as_str(), cluster.publish_interval);
    let mut presence = Instant::now();
    let mut failing = false;
    loop {
        let wait = presence.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
        match incoming.recv_timeout(wait) {
            // A part cut for the configured count before the brokers told the real one: any
            // partition is right for the evidence, and IPs still stay on one partition each.
            Ok(mut outgoing) => {
                outgoing.partition %= partitions.load(Ordering::Relaxed).max(1) as i32;
                produce(&producer, topic, outgoing, status, &mut failing)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= presence {
            // Even with nothing learned, peers hear from this node every interval: a silent
            // node is then a stopped one, not an idle one.
            let batch = RangeUpdateBatch {
                origin_node: node_id,
                workloads: Vec::new(),
                updates: Vec::new(),
            };
            let mut frame = Vec::new();
            if encode_message(&batch, &mut frame).is_ok() {
                let partition = (node_id % u64::from(partitions.load(Ordering::Relaxed).max(1))) as i32;
                produce(&producer, topic, Outgoing { partition, frame, updates: 0 }, status, &mut failing);
            }
            presence += interval;
        }
        producer.poll(Duration::ZERO);
    }
    let _ = producer.flush(Duration::from_secs(5));
}

fn produce(producer: &BaseProducer<Deliveries>, topic: &str, outgoing: Outgoing, status: &BroadcastStatus, failing: &mut bool) {
    let delivery = Box::new((outgoing.frame.len() as u64, outgoing.updates));
    let record = BaseRecord::with_opaque_to(topic, delivery)
        .partition(outgoing.partition)
        .payload(&outgoing.frame);
    match producer.send::<(), _>(record) {
        Ok(()) => {
            status.backlog_bytes.fetch_add(outgoing.frame.len() as u64, Ordering::Relaxed);
            if *failing {
                eprintln!("flowattr-collector: broadcast: publishing again");
                *failing = false;
            }
        }
        Err((error, _)) => {
            status.dropped_messages.fetch_add(1, Ordering::Relaxed);
            status.dropped_updates.fetch_add(outgoing.updates, Ordering::Relaxed);
            if !*failing {
                let why = match error {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => "the publish backlog is full (the brokers are away or slow)".to_owned(),
                    error => error.to_string(),
                };
                eprintln!("flowattr-collector: broadcast: dropping updates: {why}; peers attribute less until it clears");
                *failing = true;
            }
        }
    }
}

/// Counts deliveries and frees the backlog.
struct Deliveries {
    status: Arc<BroadcastStatus>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<(u64, u64)>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<(u64, u64)>) {
        let (bytes, updates) = *delivery;
        self.status.backlog_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if result.is_ok() {
            self.status.published_messages.fetch_add(1, Ordering::Relaxed);
            self.status.published_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.status.published_updates.fetch_add(updates, Ordering::Relaxed);
        } else {
            self.status.dropped_messages.fetch_add(1, Ordering::Relaxed);
            self.status.dropped_updates.fetch_add(updates, Ordering::Relaxed);
        }
    }
}

/// Creates `topic_name` (with the cluster's partitions and replication) if it is missing, and
/// returns its partition count (the configured one if the brokers cannot say yet).
pub(crate) fn prepare_topic(cluster: &ClusterConfig, brokers: &str, topic_name: &str) -> u32 {
    let admin: Result<AdminClient<DefaultClientContext>, _> = kafka_config(cluster, brokers).create();
    let Ok(admin) = admin else {
        return cluster.partitions;
    };
    let topic = NewTopic::new(topic_name, cluster.partitions as i32, TopicReplication::Fixed(i32::from(cluster.replication_factor.max(1))));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match futures_lite::future::block_on(admin.create_topics([&topic], &options)) {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(name) => eprintln!("flowattr-collector: created topic {name} with {} partitions", cluster.partitions),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) => eprintln!("flowattr-collector: creating topic {name}: {code}"),
                }
            }
        }
        Err(error) => eprintln!("flowattr-collector: creating topic {topic_name}: {error}"),
    }
    match admin.inner().fetch_metadata(Some(topic_name), Duration::from_secs(10)) {
        Ok(metadata) => metadata
            .topics()
            .first()
            .map(|topic| topic.partitions().len() as u32)
            .filter(|&count| count > 0)
            .unwrap_or(cluster.partitions),
        Err(_) => cluster.partitions,
    }
}
