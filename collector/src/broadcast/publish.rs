//! The publisher thread: what the shards learned goes to the broadcast topic, with a backlog
//! bounded in bytes while the brokers are slow or away (librdkafka holds it and retries until
//! they return; past the bound, new messages are dropped and counted). Every interval it also
//! tells its peers that this node is alive and how far its stream is complete.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flowattr_common::wire::{RangeUpdateBatch, encode_message};
use flowattr_common::Timestamp;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use super::progress::{LastRun, PublishProgress};
use super::{BroadcastError, BroadcastStatus, COMPLETE_THROUGH_HEADER, kafka_config};
use crate::config::{ClusterConfig, Config, StorageKind};

/// How often the publisher asks the brokers how many partitions the topic has.
const TOPIC_CHECK_PERIOD: Duration = Duration::from_secs(10);

/// In the data directory: how far the last run's stream was with the brokers, and when.
const LAST_RUN_FILE: &str = "published-through";

/// What a shard hands the publisher thread.
enum Outgoing {
    /// One frame for one partition.
    Frame { partition: i32, frame: Vec<u8>, updates: u64 },
    /// The shard has handed over everything it learned before `at`.
    Cut { shard: usize, at: Timestamp },
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
        shards: usize,
        status: Arc<BroadcastStatus>,
    ) -> Result<Publisher, BroadcastError> {
        let cluster = &config.cluster;
        let last_run = config.delay.dir.join(LAST_RUN_FILE);
        let replayed = match config.delay.storage {
            StorageKind::Disk => config.delay.delay / 2,
            StorageKind::Memory => Duration::ZERO,
        };
        let lost_since = LastRun::load(&last_run).and_then(|last| last.lost_since(replayed));
        if let Some(since) = lost_since {
            tracing::warn!(
                "broadcast: the last run stopped with updates since {:.3} (Unix time) not published and not in the delay buffer: for ownership.retention peers treat this node's stream as complete only through then",
                since.as_nanos() as f64 / 1e9
            );
        }
        let progress = Arc::new(Mutex::new(PublishProgress::new(shards, config.ownership.retention, lost_since, Timestamp::now())));
        // A heartbeat reaches this node up to an exporter interval plus its send time after
        // the instant it speaks of: the stream is complete that much less far than published.
        let lateness = config.ingest.exporter_interval + config.ingest.exporter_send_time;
        let read_back = config.ownership.retention;
        let producer: BaseProducer<Deliveries> = kafka_config(cluster, brokers)
            // The backlog: librdkafka keeps undelivered messages, retrying while the brokers
            // are away, up to this many kilobytes; past it `send` says the queue is full.
            .set("queue.buffering.max.kbytes", (cluster.publish_backlog_bytes / 1024).max(1).to_string())
            .set("message.timeout.ms", "0")
            .set("linger.ms", "20")
            .create_with_context(Deliveries {
                status: status.clone(),
                progress: progress.clone(),
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
                let count = prepare_topic(&cluster, &brokers, &cluster.topic, read_back);
                known.store(count, Ordering::Relaxed);
                status.topic_partitions.store(count, Ordering::Relaxed);
                let publishing = Publishing {
                    producer,
                    read_back,
                    cluster: cluster.clone(),
                    brokers: brokers.clone(),
                    last_run,
                    node_id,
                    lateness,
                    progress,
                    status,
                    failing: false,
                    last_run_failing: false,
                };
                publishing.run(cluster.publish_interval, &known, incoming)
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
            let _ = self.outgoing.send(Outgoing::Frame {
                partition,
                frame,
                updates: batch.updates.len() as u64,
            });
        }
    }

    /// Shard `shard` has sent everything it learned before `at`.
    pub fn cut(&self, shard: usize, at: Timestamp) {
        let _ = self.outgoing.send(Outgoing::Cut { shard, at });
    }
}

struct Publishing {
    producer: BaseProducer<Deliveries>,
    /// How much of the topic a starting node reads.
    read_back: Duration,
    cluster: ClusterConfig,
    brokers: String,
    last_run: std::path::PathBuf,
    node_id: u64,
    lateness: Duration,
    progress: Arc<Mutex<PublishProgress>>,
    status: Arc<BroadcastStatus>,
    /// Whether the last message was refused, and the last run's file could not be kept (each
    /// said once per episode).
    failing: bool,
    last_run_failing: bool,
}

impl Publishing {
    fn run(mut self, interval: Duration, partitions: &AtomicU32, incoming: mpsc::Receiver<Outgoing>) {
        let mut presence = Instant::now();
        let mut checked = Instant::now();
        loop {
            // The topic may be made again under the node (a broker restarted empty), with
            // other partitions: publish with what the brokers say, and say when it is not
            // what is configured.
            if checked.elapsed() >= TOPIC_CHECK_PERIOD || (self.failing && checked.elapsed() >= Duration::from_secs(1)) {
                checked = Instant::now();
                self.check_topic(partitions);
            }
            let wait = presence.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
            match incoming.recv_timeout(wait) {
                // A part cut for the configured count before the brokers told the real one: any
                // partition is right for the evidence, and IPs still stay on one partition each.
                Ok(Outgoing::Frame { partition, frame, updates }) => {
                    let partition = partition % partitions.load(Ordering::Relaxed).max(1) as i32;
                    self.produce(partition, &frame, updates, None);
                }
                Ok(Outgoing::Cut { shard, at }) => self.progress().cut(shard, at),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= presence {
                self.announce(partitions.load(Ordering::Relaxed).max(1));
                presence += interval;
            }
            self.producer.poll(Duration::ZERO);
        }
        let _ = self.producer.flush(Duration::from_secs(5));
    }

    fn check_topic(&self, partitions: &AtomicU32) {
        let Ok(metadata) = self.producer.client().fetch_metadata(Some(&self.cluster.topic), Duration::from_secs(2)) else { return };
        match metadata.topics().first().map(|topic| topic.partitions().len() as u32) {
            Some(count) if count > 0 => {
                if partitions.swap(count, Ordering::Relaxed) != count {
                    tracing::warn!("broadcast: topic {} has {count} partitions now; publishing to them", self.cluster.topic);
                }
                self.status.topic_partitions.store(count, Ordering::Relaxed);
            }
            // Gone (the brokers lost it): made again as configured.
            _ => {
                let count = prepare_topic(&self.cluster, &self.brokers, &self.cluster.topic, self.read_back);
                partitions.store(count, Ordering::Relaxed);
            }
        }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, PublishProgress> {
        self.progress.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Every interval, even with nothing learned, peers hear that this node is alive (a silent
    /// node is then a stopped one, not an idle one) and how far its stream is complete.
    fn announce(&mut self, partitions: u32) {
        let now = Timestamp::now();
        let (published, held) = {
            let progress = self.progress();
            (progress.through(now), progress.frozen(now))
        };
        self.status.published_through_ns.store(published.as_nanos(), Ordering::Relaxed);
        self.status.publish_held.store(held, Ordering::Relaxed);
        let last_run = LastRun {
            published_through: published,
            at: now,
        };
        // A data directory that cannot take this file cannot take the delay buffer either: with
        // disk storage the node then stops acking, and learns nothing it could fail to publish.
        match last_run.save(&self.last_run) {
            Err(error) if !self.last_run_failing => {
                tracing::warn!("broadcast: keeping {}: {error}", self.last_run.display());
                self.last_run_failing = true;
            }
            Err(_) => {}
            Ok(()) => self.last_run_failing = false,
        }
        // Sent even while unknown (0): a peer that has ever sent one is waited for.
        let through = if published > Timestamp::ZERO {
            published.saturating_sub(self.lateness)
        } else {
            Timestamp::ZERO
        };
        let batch = RangeUpdateBatch {
            origin_node: self.node_id,
            workloads: Vec::new(),
            updates: Vec::new(),
        };
        let mut frame = Vec::new();
        if encode_message(&batch, &mut frame).is_err() {
            return;
        }
        let partition = (self.node_id % u64::from(partitions)) as i32;
        self.produce(partition, &frame, 0, Some(through));
    }

    fn produce(&mut self, partition: i32, frame: &[u8], updates: u64, complete_through: Option<Timestamp>) {
        let sequence = self.progress().sent();
        let delivery = Box::new(Delivery {
            bytes: frame.len() as u64,
            updates,
            sequence,
        });
        let text;
        let mut record = BaseRecord::with_opaque_to(&self.cluster.topic, delivery).partition(partition).payload(frame);
        if let Some(through) = complete_through {
            text = through.as_nanos().to_string();
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: COMPLETE_THROUGH_HEADER,
                value: Some(text.as_bytes()),
            }));
        }
        match self.producer.send::<(), _>(record) {
            Ok(()) => {
                self.status.backlog_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                if self.failing {
                    tracing::info!("broadcast: publishing again");
                    self.failing = false;
                }
            }
            Err((error, _)) => {
                self.progress().lost(Some(sequence), Timestamp::now());
                self.status.dropped_messages.fetch_add(1, Ordering::Relaxed);
                self.status.dropped_updates.fetch_add(updates, Ordering::Relaxed);
                if !self.failing {
                    let why = match error {
                        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => "the publish backlog is full (the brokers are away or slow)".to_owned(),
                        error => error.to_string(),
                    };
                    tracing::error!("broadcast: dropping updates: {why}; peers wait for this node's evidence, then attribute less until it clears");
                    self.failing = true;
                }
            }
        }
    }
}

/// What one message carries to its delivery report.
struct Delivery {
    bytes: u64,
    updates: u64,
    sequence: u64,
}

/// Counts deliveries, frees the backlog and moves the stream's completeness on.
struct Deliveries {
    status: Arc<BroadcastStatus>,
    progress: Arc<Mutex<PublishProgress>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        let Delivery { bytes, updates, sequence } = *delivery;
        self.status.backlog_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let mut progress = self.progress.lock().unwrap_or_else(|poison| poison.into_inner());
        if result.is_ok() {
            progress.delivered(sequence);
            self.status.published_messages.fetch_add(1, Ordering::Relaxed);
            self.status.published_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.status.published_updates.fetch_add(updates, Ordering::Relaxed);
        } else {
            progress.lost(Some(sequence), Timestamp::now());
            self.status.dropped_messages.fetch_add(1, Ordering::Relaxed);
            self.status.dropped_updates.fetch_add(updates, Ordering::Relaxed);
        }
    }
}

/// Creates `topic_name` if it is missing: the cluster's partitions and replication, deletion
/// (never compaction: messages have no key) and twice `read_back` of retention, the history a
/// starting node reads. Says at once if an existing topic keeps less than `read_back` or
/// compacts. Returns its partition count (the configured one if the brokers cannot say yet).
pub(crate) fn prepare_topic(cluster: &ClusterConfig, brokers: &str, topic_name: &str, read_back: Duration) -> u32 {
    let admin: Result<AdminClient<DefaultClientContext>, _> = kafka_config(cluster, brokers).create();
    let Ok(admin) = admin else {
        return cluster.partitions;
    };
    let retention_ms = (read_back.as_millis() * 2).to_string();
    let topic = NewTopic::new(topic_name, cluster.partitions as i32, TopicReplication::Fixed(i32::from(cluster.replication_factor.max(1))))
        .set("cleanup.policy", "delete")
        .set("retention.ms", &retention_ms);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match futures_lite::future::block_on(admin.create_topics([&topic], &options)) {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(name) => tracing::info!("created topic {name} with {} partitions, kept {retention_ms} ms", cluster.partitions),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => check_topic_settings(&admin, topic_name, read_back, &options),
                    Err((name, code)) => tracing::warn!("creating topic {name}: {code}"),
                }
            }
        }
        Err(error) => tracing::warn!("creating topic {topic_name}: {error}"),
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

/// Says what in an existing topic's settings would cost attribution: a retention shorter than
/// the history a starting node reads, or compaction. Brokers that cannot describe topics are
/// taken at their word.
fn check_topic_settings(admin: &AdminClient<DefaultClientContext>, topic: &str, read_back: Duration, options: &AdminOptions) {
    let described = futures_lite::future::block_on(admin.describe_configs([&ResourceSpecifier::Topic(topic)], options));
    let Ok(Some(Ok(resource))) = described.map(|mut results| results.pop()) else { return };
    let value = |name: &str| resource.get(name).and_then(|entry| entry.value.clone());
    if let Some(kept) = value("retention.ms").and_then(|text| text.parse::<i64>().ok())
        && kept >= 0
        && (kept as u128) < read_back.as_millis()
    {
        tracing::warn!(
            "topic {topic} keeps messages {kept} ms, less than the {} ms a starting node reads back: a restarted node learns less than a long-running one knows; set its retention.ms to at least {}",
            read_back.as_millis(),
            read_back.as_millis() * 2
        );
    }
    if value("cleanup.policy").is_some_and(|policy| policy.contains("compact")) {
        tracing::warn!("topic {topic} is compacted: its messages have no key, so compaction loses them; set its cleanup.policy to delete");
    }
}
