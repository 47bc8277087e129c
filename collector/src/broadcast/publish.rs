//! The publisher thread: what the shards learned goes to the broadcast topic, with a backlog
//! bounded in bytes while the brokers are slow or away (librdkafka holds it and retries until
//! they return; past the bound, new messages are dropped and counted). Every interval it also
//! tells its peers that this node is alive and how far its stream is complete.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowattr_common::Timestamp;
use flowattr_common::wire::{RangeUpdateBatch, encode_message};
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use super::progress::{LastRun, PublishProgress};
use super::{
    BroadcastError, BroadcastStatus, COMPLETE_AFTER_HEADER, COMPLETE_THROUGH_HEADER,
    EXPORTERS_HEADER, LearnedBatch, exporters_header,
};
use crate::config::{ClusterConfig, Config, StorageKind};
use crate::kafka::{ClientError, cluster_config, prepare_topic};

/// How often the publisher asks the brokers how many partitions the topic has.
const TOPIC_CHECK_PERIOD: Duration = Duration::from_secs(10);

/// In the data directory: how far the last run's stream was with the brokers, and when.
const LAST_RUN_FILE: &str = "published-through";

/// What a shard hands the publisher thread.
enum Outgoing {
    /// One update message.
    Update {
        message: UpdateMessage,
        updates: u64,
    },
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
        let now = Timestamp::now();
        let hole = LastRun::hole_at_start(
            LastRun::load(&last_run),
            replayed,
            config.ownership.retention,
            now,
        );
        if let Some((loss, until)) = hole {
            tracing::warn!(
                "broadcast: the last run may have stopped with updates not published and not in the delay buffer: until {:.3} (Unix time), peers treat this node's evidence as complete only about instants after {:.3}",
                until.as_nanos() as f64 / 1e9,
                loss.as_nanos() as f64 / 1e9
            );
        }
        let progress = Arc::new(Mutex::new(PublishProgress::new(
            shards,
            config.ownership.retention,
            hole,
        )));
        // A heartbeat reaches this node up to an exporter interval plus its send time after
        // the instant it speaks of: the stream is complete that much less far than published.
        let lateness = config.ingest.exporter_interval + config.ingest.exporter_send_time;
        // An exporter's clock may run this far ahead: evidence learned before a loss may speak
        // of instants up to this much after it.
        let ahead = config.max_clock_skew();
        let read_back = config.ownership.retention;
        let producer: BaseProducer<Deliveries> = cluster_config(cluster, brokers)
            // The backlog: librdkafka keeps undelivered messages, retrying while the brokers
            // are away, up to this many kilobytes; past it `send` says the queue is full.
            .set(
                "queue.buffering.max.kbytes",
                (cluster.publish_backlog_bytes / 1024).max(1).to_string(),
            )
            .set("message.timeout.ms", "0")
            .set("linger.ms", "20")
            .create_with_context(Deliveries {
                status: status.clone(),
                progress: progress.clone(),
                read_back,
                resend: Mutex::new(Vec::new()),
            })
            .map_err(|error| ClientError::new(brokers, error))?;
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
                    ahead,
                    progress,
                    status,
                    failing: false,
                    last_run_failing: false,
                };
                publishing.run(cluster.publish_interval, &known, incoming)
            })
            .map_err(|source| BroadcastError::Thread {
                thread: "publisher",
                source,
            })?;
        Ok(Publisher {
            outgoing,
            partitions,
        })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions.load(Ordering::Relaxed)
    }

    /// Queues one shard's batch.
    pub fn send(&self, learned: &LearnedBatch) {
        let mut frame = Vec::new();
        if encode_message(&learned.batch, &mut frame).is_ok() {
            // Only at shutdown: the thread is gone.
            let _ = self.outgoing.send(Outgoing::Update {
                message: UpdateMessage {
                    partition: learned.partition,
                    frame,
                    exporters: exporters_header(&learned.exporters),
                },
                updates: learned.batch.updates.len() as u64,
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
    ahead: Duration,
    progress: Arc<Mutex<PublishProgress>>,
    status: Arc<BroadcastStatus>,
    /// Whether the last message was refused, and the last run's file could not be kept (each
    /// said once per episode).
    failing: bool,
    last_run_failing: bool,
}

impl Publishing {
    fn run(
        mut self,
        interval: Duration,
        partitions: &AtomicU32,
        incoming: mpsc::Receiver<Outgoing>,
    ) {
        let mut presence = Instant::now();
        let mut checked = Instant::now();
        let mut resent = Instant::now();
        loop {
            // The topic may be made again under the node (a broker restarted empty), with
            // other partitions: publish with what the brokers say, and say when it is not
            // what is configured.
            if checked.elapsed() >= TOPIC_CHECK_PERIOD
                || (self.failing && checked.elapsed() >= Duration::from_secs(1))
            {
                checked = Instant::now();
                self.check_topic(partitions);
            }
            let wait = presence
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            match incoming.recv_timeout(wait) {
                Ok(Outgoing::Update { message, updates }) => {
                    let sequence = self.progress().sent();
                    self.produce_update(message, updates, sequence, Instant::now(), partitions);
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
            if resent.elapsed() >= Duration::from_secs(1) {
                resent = Instant::now();
                self.send_again(partitions);
            }
        }
        let _ = self.producer.flush(Duration::from_secs(5));
    }

    /// Sends again what the brokers refused for where it went, to the topic as it is now
    /// (made again if it is gone).
    fn send_again(&mut self, partitions: &AtomicU32) {
        let refused = std::mem::take(
            &mut *self
                .producer
                .context()
                .resend
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        if refused.is_empty() {
            return;
        }
        self.check_topic(partitions);
        tracing::debug!(
            "broadcast: sending again {} messages refused for their partition or topic",
            refused.len()
        );
        self.status
            .resent_messages
            .fetch_add(refused.len() as u64, Ordering::Relaxed);
        for delivery in refused {
            if let Some(message) = delivery.resend {
                self.produce_update(
                    message,
                    delivery.updates,
                    delivery.sequence,
                    delivery.since,
                    partitions,
                );
            }
        }
    }

    /// Produces one update message the shards sent (its partition as they chose it), as
    /// message `sequence` of the stream.
    fn produce_update(
        &mut self,
        message: UpdateMessage,
        updates: u64,
        sequence: u64,
        since: Instant,
        partitions: &AtomicU32,
    ) {
        // A part cut for the configured count before the brokers told the real one: any
        // partition is right for the evidence, and IPs still stay on one partition each.
        let fitted = message.partition % partitions.load(Ordering::Relaxed).max(1) as i32;
        // librdkafka copies payload and headers; the message kept with the delivery is for a
        // resend.
        let payload = message.frame.clone();
        let headers = OwnedHeaders::new().insert(Header {
            key: EXPORTERS_HEADER,
            value: Some(&message.exporters),
        });
        let delivery = Delivery {
            bytes: payload.len() as u64,
            updates,
            sequence,
            resend: Some(message),
            since,
        };
        self.produce(fitted, &payload, delivery, Some(headers));
    }

    fn check_topic(&self, partitions: &AtomicU32) {
        let Ok(metadata) = self
            .producer
            .client()
            .fetch_metadata(Some(&self.cluster.topic), Duration::from_secs(2))
        else {
            return;
        };
        match metadata
            .topics()
            .first()
            .map(|topic| topic.partitions().len() as u32)
        {
            Some(count) if count > 0 => {
                if partitions.swap(count, Ordering::Relaxed) != count {
                    tracing::warn!(
                        "broadcast: topic {} has {count} partitions now; publishing to them",
                        self.cluster.topic
                    );
                }
                self.status.topic_partitions.store(count, Ordering::Relaxed);
            }
            // Gone (the brokers lost it): made again as configured.
            _ => {
                let count = prepare_topic(
                    &self.cluster,
                    &self.brokers,
                    &self.cluster.topic,
                    self.read_back,
                );
                partitions.store(count, Ordering::Relaxed);
            }
        }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, PublishProgress> {
        self.progress
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Every interval, even with nothing learned, peers hear that this node is alive (a silent
    /// node is then a stopped one, not an idle one) and how far its stream is complete.
    fn announce(&mut self, partitions: u32) {
        let now = Timestamp::now();
        let (published, hole) = {
            let progress = self.progress();
            (progress.through(), progress.hole(now))
        };
        self.status
            .published_through_ns
            .store(published.as_nanos(), Ordering::Relaxed);
        let complete_after = hole.map(|(loss, _)| loss.saturating_add(self.ahead));
        self.status.complete_after_ns.store(
            complete_after.map_or(0, Timestamp::as_nanos),
            Ordering::Relaxed,
        );
        let last_run = LastRun {
            published_through: published,
            at: now,
            hole,
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
        let delivery = Delivery {
            bytes: frame.len() as u64,
            updates: 0,
            sequence: self.progress().sent(),
            resend: None,
            since: Instant::now(),
        };
        // The watermark, and where the stream's hole ends.
        let through = through.as_nanos().to_string();
        let mut headers = OwnedHeaders::new().insert(Header {
            key: COMPLETE_THROUGH_HEADER,
            value: Some(through.as_bytes()),
        });
        if let Some(after) = complete_after {
            headers = headers.insert(Header {
                key: COMPLETE_AFTER_HEADER,
                value: Some(after.as_nanos().to_string().as_bytes()),
            });
        }
        self.produce(partition, &frame, delivery, Some(headers));
    }

    fn produce(
        &mut self,
        partition: i32,
        frame: &[u8],
        delivery: Delivery,
        headers: Option<OwnedHeaders>,
    ) {
        let (sequence, updates) = (delivery.sequence, delivery.updates);
        let delivery = Box::new(delivery);
        let mut record = BaseRecord::with_opaque_to(&self.cluster.topic, delivery)
            .partition(partition)
            .payload(frame);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        match self.producer.send::<(), _>(record) {
            Ok(()) => {
                self.status
                    .backlog_bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                if self.failing {
                    tracing::info!("broadcast: publishing again");
                    self.failing = false;
                }
            }
            Err((_, record)) if record.delivery_opaque.resend.is_none() => {
                // A presence message: the next one says as much, and later.
                self.progress().delivered(sequence);
            }
            // The client already knows the topic has fewer partitions than this thread does.
            Err((KafkaError::MessageProduction(code), record)) if sent_again(code) => {
                self.producer
                    .context()
                    .resend
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .push(*record.delivery_opaque);
            }
            Err((error, _)) => {
                self.progress().lost(Some(sequence), Timestamp::now());
                self.status.dropped_messages.fetch_add(1, Ordering::Relaxed);
                self.status
                    .dropped_updates
                    .fetch_add(updates, Ordering::Relaxed);
                if !self.failing {
                    let why = match error {
                        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                            "the publish backlog is full (the brokers are away or slow)".to_owned()
                        }
                        error => error.to_string(),
                    };
                    tracing::error!(
                        "broadcast: dropping updates: {why}; peers wait for this node's evidence, then attribute less until it clears"
                    );
                    self.failing = true;
                }
            }
        }
    }
}

/// An update message as a shard handed it over, kept until delivered for a resend.
struct UpdateMessage {
    /// As the shard chose it, before it is fitted to the topic's count.
    partition: i32,
    frame: Vec<u8>,
    /// The [`EXPORTERS_HEADER`] value.
    exporters: Vec<u8>,
}

/// What one message carries to its delivery report, and what sending it again takes.
struct Delivery {
    bytes: u64,
    updates: u64,
    sequence: u64,
    /// Kept for update messages only. A presence message that fails is simply superseded.
    resend: Option<UpdateMessage>,
    /// When it was first handed to the producer.
    since: Instant,
}

/// Counts deliveries, frees the backlog and moves the stream's completeness on. A message the
/// brokers refused for where it went (its partition or topic gone: a topic made again under
/// the node) is sent again; only one that can never be taken, or is older than the history a
/// starting node reads, is lost.
struct Deliveries {
    status: Arc<BroadcastStatus>,
    progress: Arc<Mutex<PublishProgress>>,
    read_back: Duration,
    /// Update messages to send again, to the topic as it is now.
    resend: Mutex<Vec<Delivery>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        self.status
            .backlog_bytes
            .fetch_sub(delivery.bytes, Ordering::Relaxed);
        let error = match result {
            Ok(_) => {
                self.progress
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .delivered(delivery.sequence);
                self.status
                    .published_messages
                    .fetch_add(1, Ordering::Relaxed);
                self.status
                    .published_bytes
                    .fetch_add(delivery.bytes, Ordering::Relaxed);
                self.status
                    .published_updates
                    .fetch_add(delivery.updates, Ordering::Relaxed);
                return;
            }
            Err((error, _)) => error.rdkafka_error_code(),
        };
        let mut progress = self
            .progress
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if delivery.resend.is_none() {
            // A presence message: the next one says as much, and later.
            progress.delivered(delivery.sequence);
        } else if error.is_some_and(sent_again) && delivery.since.elapsed() < self.read_back {
            self.resend
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .push(*delivery);
        } else {
            progress.lost(Some(delivery.sequence), Timestamp::now());
            self.status.dropped_messages.fetch_add(1, Ordering::Relaxed);
            self.status
                .dropped_updates
                .fetch_add(delivery.updates, Ordering::Relaxed);
        }
    }
}

/// Whether a message refused with `code` can be taken if sent again: it was refused for
/// where it went, not for what it is.
fn sent_again(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
    )
}
