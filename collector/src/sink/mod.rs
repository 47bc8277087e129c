//! Where attributed flows leave the node. A shard copies each flow it attributes into an
//! [`EmittedBatch`] (plain data and a dictionary of names) and hands whole batches to the
//! [`SinkSet`] on a sink thread; formatting (JSON lines, protobuf) and writing happen there,
//! never on the executor that attributes flows and acks batches. A batch is written and synced
//! (files) or delivered and acknowledged (Kafka) before the segment its flows came from is
//! deleted; a sink that fails is retried with the same batch, so a slow or absent sink holds
//! the node back instead of losing flows.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;

use crate::config::SinkConfig;

mod file;
pub mod json;
mod kafka;
mod parquet;
pub mod protobuf;
mod record;

pub use json::AttributedFlow;
pub use record::{EmittedBatch, EmittedFlow, Provenance, RemoteName, direction_name, state_name};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot open sink file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("writing to sink {sink}: {source}")]
    Write { sink: String, source: io::Error },
    #[error("creating the Kafka producer for {brokers}: {source}")]
    KafkaConfig { brokers: String, source: KafkaError },
    #[error("the Kafka sink for {brokers}: {key} = {value:?} is not a whole number of bytes")]
    KafkaProperty {
        brokers: String,
        key: &'static str,
        value: String,
    },
    #[error("sink {sink}: {reason}")]
    Failed { sink: String, reason: String },
}

enum SinkTarget {
    Stdout,
    /// One batch is appended and synced at a time.
    File(Mutex<File>),
    /// librdkafka's producer is thread-safe: shards' batches are produced concurrently.
    Kafka(kafka::KafkaSink),
    /// Durable only once the file a batch went into is complete.
    Parquet(parquet::ParquetSink),
}

/// What must still happen before a written batch is durable: for each Parquet sink (by its
/// index), the file its rows went into must be complete. Empty for every other sink.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Receipt {
    files: Vec<(usize, u64)>,
}

impl Receipt {
    /// Adds `other`'s conditions (files complete in order: the later file number is enough).
    pub fn merge(&mut self, other: &Receipt) {
        for &(sink, file) in &other.files {
            match self.files.iter_mut().find(|(known, _)| *known == sink) {
                Some(entry) => entry.1 = entry.1.max(file),
                None => self.files.push((sink, file)),
            }
        }
    }
}

struct Sink {
    name: String,
    target: SinkTarget,
    /// Encoded bytes written or produced (before Kafka's compression); Parquet's are only
    /// known when a file completes, and are not counted.
    bytes: AtomicU64,
}

/// Every configured output. Shared by all shards; each write is one whole batch, so records
/// from different shards never interleave inside a record.
pub struct SinkSet {
    sinks: Vec<Sink>,
    region: Option<Arc<str>>,
}

impl SinkSet {
    /// Opens every sink; `region` is the node's, stamped on every record.
    pub fn open(configs: &[SinkConfig], region: Option<&str>) -> Result<SinkSet, SinkError> {
        let mut sinks = Vec::new();
        for config in configs {
            let (name, target) = match config {
                SinkConfig::Stdout => ("stdout".to_owned(), SinkTarget::Stdout),
                SinkConfig::Discard => continue,
                SinkConfig::File { path } => {
                    let file = file::open_line_file(path).map_err(|source| SinkError::Open {
                        path: path.clone(),
                        source,
                    })?;
                    (
                        format!("file:{}", path.display()),
                        SinkTarget::File(Mutex::new(file)),
                    )
                }
                SinkConfig::Kafka {
                    brokers,
                    topic,
                    format,
                    flows_per_message,
                    properties,
                } => (
                    format!("kafka:{brokers}/{topic}"),
                    SinkTarget::Kafka(kafka::KafkaSink::open(
                        brokers,
                        topic,
                        *format,
                        flows_per_message.unwrap_or(format.default_flows_per_message()),
                        properties,
                    )?),
                ),
                SinkConfig::Parquet {
                    dir,
                    max_file_bytes,
                    max_file_age,
                } => {
                    let sink = parquet::ParquetSink::open(dir, *max_file_bytes, *max_file_age)
                        .map_err(|source| SinkError::Open {
                            path: dir.clone(),
                            source,
                        })?;
                    (
                        format!("parquet:{}", dir.display()),
                        SinkTarget::Parquet(sink),
                    )
                }
            };
            sinks.push(Sink {
                name,
                target,
                bytes: AtomicU64::new(0),
            });
        }
        Ok(SinkSet {
            sinks,
            region: region.map(Arc::from),
        })
    }

    /// True when no sink wants records (only `discard`): shards then skip building batches.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Encodes `batch` as each sink wants it and writes it, durably where that means
    /// something (files are fsynced, Kafka acknowledges); Parquet rows become durable later,
    /// when their file is complete, which the returned receipt tells ([`Self::is_durable`]).
    /// Blocking: call it from a sink thread. Several threads may write batches at once.
    pub fn write(&self, batch: &mut EmittedBatch) -> Result<Receipt, SinkError> {
        batch.set_region(self.region.as_ref());
        let mut receipt = Receipt::default();
        for (index, sink) in self.sinks.iter().enumerate() {
            let failed = |reason: String| SinkError::Failed {
                sink: sink.name.clone(),
                reason,
            };
            let result = match &sink.target {
                SinkTarget::Stdout => {
                    json::encode_once(batch);
                    let mut stdout = io::stdout().lock();
                    stdout
                        .write_all(&batch.json)
                        .and_then(|()| stdout.flush())
                        .map(|()| batch.json.len())
                }
                SinkTarget::File(file) => {
                    json::encode_once(batch);
                    let mut file = file.lock().unwrap_or_else(|poison| poison.into_inner());
                    file::append_whole(&mut file, &batch.json).map(|()| batch.json.len())
                }
                SinkTarget::Kafka(kafka) => {
                    kafka.encode(batch);
                    Ok(kafka.write(batch).map_err(failed)?)
                }
                SinkTarget::Parquet(parquet) => {
                    let file = parquet.write(batch).map_err(failed)?;
                    receipt.files.push((index, file));
                    Ok(0)
                }
            };
            let bytes = result.map_err(|source| SinkError::Write {
                sink: sink.name.clone(),
                source,
            })?;
            sink.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        Ok(receipt)
    }

    /// `flowattr_sink_bytes_total` for each sink that counts its bytes.
    pub fn write_metrics(
        &self,
        scrape: &mut flowattr_common::exposition::Scrape<'_>,
    ) -> std::fmt::Result {
        scrape.counters(
            "flowattr_sink_bytes",
            "encoded bytes written to a file or produced to Kafka (before compression)",
            self.sinks
                .iter()
                .filter(|sink| !matches!(sink.target, SinkTarget::Parquet(_)))
                .map(|sink| {
                    (
                        [("sink", sink.name.as_str())],
                        sink.bytes.load(Ordering::Relaxed),
                    )
                }),
        )?;
        scrape.counters(
            "flowattr_sink_transmitted_bytes",
            "bytes a Kafka sink sent its brokers: after compression, with the protocol's framing (the client's statistics, updated every second)",
            self.sinks.iter().filter_map(|sink| match &sink.target {
                SinkTarget::Kafka(kafka) => Some((
                    [("sink", sink.name.as_str())],
                    kafka.transmitted.load(Ordering::Relaxed),
                )),
                _ => None,
            }),
        )
    }

    /// Whether every batch behind `receipt` is durable in every sink.
    pub fn is_durable(&self, receipt: &Receipt) -> bool {
        receipt
            .files
            .iter()
            .all(|&(index, file)| match &self.sinks[index].target {
                SinkTarget::Parquet(parquet) => parquet.complete_through() >= file,
                _ => true,
            })
    }
}
