//! Where attributed flows leave the node. Shards format records as JSON lines into their own
//! buffer and hand whole chunks to the [`SinkSet`], which writes every configured sink (on a
//! blocking thread: a slow disk, a full pipe or a slow broker must not stall an executor). A
//! chunk is written and synced (files) or delivered and acknowledged (Kafka, one message per
//! line) before the segment its flows came from is deleted.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowattr_common::{Direction, FlowState};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use serde::Serialize;

use crate::config::SinkConfig;
use crate::delay::codec::{BlockHeader, BufferedFlow};
use crate::ownership::Reason;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot open sink file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("writing to sink {sink}: {source}")]
    Write { sink: String, source: io::Error },
    #[error("creating the Kafka producer for {brokers}: {source}")]
    KafkaConfig { brokers: String, source: KafkaError },
    #[error("sink {sink}: {reason}")]
    Kafka { sink: String, reason: String },
}

/// How the remote side was attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provenance {
    /// From heartbeats: flows the remote IP's own exporter reported.
    Heartbeat,
    /// From the assign/unassign event stream (IPs with no agent).
    Event,
    /// Attributed by the collector of another region.
    Forwarded,
}

/// One attributed flow as emitted: the flow, both workloads (or why the remote has none), and
/// where the answer came from.
#[derive(Debug, Serialize)]
pub struct AttributedFlow<'a> {
    pub exporter: u64,
    pub sequence: u64,
    pub index: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub remote_ip: IpAddr,
    pub remote_port: u16,
    pub direction: &'static str,
    pub state: &'static str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segments_sent: u32,
    pub segments_received: u32,
    pub retransmits: u32,
    pub local_workload: Option<&'a str>,
    pub remote_workload: Option<&'a str>,
    /// Set exactly when `remote_workload` is not.
    pub unattributed: Option<&'static str>,
    pub provenance: Option<Provenance>,
    /// Attribution attempts that found no evidence before this answer.
    pub retries: u8,
}

impl<'a> AttributedFlow<'a> {
    pub fn new(
        header: &BlockHeader,
        flow: &BufferedFlow,
        local_workload: Option<&'a str>,
        remote: Result<(&'a str, Provenance), Reason>,
    ) -> Self {
        AttributedFlow {
            exporter: header.exporter,
            sequence: header.sequence,
            index: flow.index,
            start_ns: flow.start.as_nanos(),
            end_ns: flow.end.as_nanos(),
            local_ip: flow.local_ip.to_ip_addr(),
            local_port: flow.local_port,
            remote_ip: flow.remote_ip.to_ip_addr(),
            remote_port: flow.remote_port,
            direction: direction_name(flow.direction),
            state: match flow.state {
                FlowState::Open => "open",
                FlowState::Closed => "closed",
            },
            bytes_sent: flow.bytes_sent,
            bytes_received: flow.bytes_received,
            segments_sent: flow.segments_sent,
            segments_received: flow.segments_received,
            retransmits: flow.retransmits,
            local_workload,
            remote_workload: remote.ok().map(|(name, _)| name),
            unattributed: remote.err().map(Reason::as_str),
            provenance: remote.ok().map(|(_, provenance)| provenance),
            retries: flow.retries,
        }
    }

    /// Appends the record and a newline to `out`.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(&mut *out, self).expect("writing JSON to a Vec cannot fail");
        out.push(b'\n');
    }
}

pub fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    }
}

/// Opens a JSON-lines file for appending, first cutting an incomplete last line: a crash in
/// the middle of a write leaves one, and a line reader would take it and the next record for
/// one unparseable line. Its flows were never released (their segment is deleted only after
/// the write is synced), so they are written again whole.
fn open_line_file(path: &std::path::Path) -> io::Result<File> {
    let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
    let length = file.metadata()?.len();
    let whole = whole_lines_length(&mut file, length)?;
    if whole < length {
        file.set_len(whole)?;
        file.sync_all()?;
        eprintln!(
            "flowattr-collector: sink file {} ended in {} bytes of an incomplete line (a write cut short); removed, those flows are written again",
            path.display(),
            length - whole
        );
    }
    Ok(file)
}

/// The length of the file up to and including its last newline.
fn whole_lines_length(file: &mut File, length: u64) -> io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut end = length;
    let mut chunk = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(at) = part.iter().rposition(|&byte| byte == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Appends `chunk` and syncs it; on any failure, cuts the file back to where it was, so the
/// retry writes the chunk once and no reader sees half of it.
fn append_whole(file: &mut File, chunk: &[u8]) -> io::Result<()> {
    let before = file.metadata()?.len();
    let result = file.write_all(chunk).and_then(|()| file.sync_data());
    if result.is_err() {
        let _ = file.set_len(before);
    }
    result
}

enum SinkTarget {
    Stdout,
    File(File),
    Kafka(KafkaSink),
}

/// Counts messages the broker did not acknowledge.
#[derive(Default)]
struct DeliveryFailures(AtomicU64);

impl ClientContext for DeliveryFailures {}

impl ProducerContext for DeliveryFailures {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct KafkaSink {
    producer: BaseProducer<DeliveryFailures>,
    topic: String,
}

/// How long one chunk may take to be acknowledged before the write fails (and is retried).
const KAFKA_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl KafkaSink {
    fn open(brokers: &str, topic: &str, properties: &std::collections::BTreeMap<String, String>) -> Result<KafkaSink, SinkError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .set("message.timeout.ms", KAFKA_DELIVERY_TIMEOUT.as_millis().to_string());
        for (key, value) in properties {
            config.set(key, value);
        }
        let producer = config
            // Every replica has it before the segment behind it is deleted, whatever the
            // properties say: the sink's guarantee depends on it.
            .set("acks", "all")
            .create_with_context(DeliveryFailures::default())
            .map_err(|source| SinkError::KafkaConfig {
                brokers: brokers.to_owned(),
                source,
            })?;
        Ok(KafkaSink {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// Produces one message per line and waits until the broker acknowledged them all.
    fn write(&self, chunk: &[u8]) -> Result<(), String> {
        let failed_before = self.producer.context().0.load(Ordering::Relaxed);
        for line in chunk.split(|&byte| byte == b'\n').filter(|line| !line.is_empty()) {
            let mut record = BaseRecord::<(), [u8]>::to(&self.topic).payload(line);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        record = returned;
                        self.producer.poll(Duration::from_millis(100));
                    }
                    Err((error, _)) => return Err(error.to_string()),
                }
            }
            self.producer.poll(Duration::ZERO);
        }
        self.producer
            .flush(KAFKA_DELIVERY_TIMEOUT)
            .map_err(|error| error.to_string())?;
        let failed = self.producer.context().0.load(Ordering::Relaxed) - failed_before;
        if failed > 0 {
            return Err(format!("{failed} messages were not acknowledged by the broker"));
        }
        Ok(())
    }
}

struct Sink {
    name: String,
    target: Mutex<SinkTarget>,
}

/// Every configured output. Shared by all shards; each write is one whole chunk, so lines
/// from different shards never interleave inside a line.
pub struct SinkSet {
    sinks: Vec<Sink>,
}

impl SinkSet {
    pub fn open(configs: &[SinkConfig]) -> Result<SinkSet, SinkError> {
        let mut sinks = Vec::new();
        for config in configs {
            let (name, target) = match config {
                SinkConfig::Stdout => ("stdout".to_owned(), SinkTarget::Stdout),
                SinkConfig::Discard => continue,
                SinkConfig::File { path } => {
                    let file = open_line_file(path).map_err(|source| SinkError::Open {
                        path: path.clone(),
                        source,
                    })?;
                    (format!("file:{}", path.display()), SinkTarget::File(file))
                }
                SinkConfig::Kafka {
                    brokers,
                    topic,
                    properties,
                } => (
                    format!("kafka:{brokers}/{topic}"),
                    SinkTarget::Kafka(KafkaSink::open(brokers, topic, properties)?),
                ),
            };
            sinks.push(Sink {
                name,
                target: Mutex::new(target),
            });
        }
        Ok(SinkSet { sinks })
    }

    /// True when no sink wants records (only `discard`): shards then skip formatting.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Writes `chunk` to every sink and makes it durable where that means something (files
    /// are fsynced). Blocking: call it from a blocking thread.
    pub fn write_chunk(&self, chunk: &[u8]) -> Result<(), SinkError> {
        for sink in &self.sinks {
            let mut target = sink.target.lock().unwrap_or_else(|poison| poison.into_inner());
            let result = match &mut *target {
                SinkTarget::Stdout => {
                    let mut stdout = io::stdout().lock();
                    stdout.write_all(chunk).and_then(|()| stdout.flush())
                }
                SinkTarget::File(file) => append_whole(file, chunk),
                SinkTarget::Kafka(kafka) => {
                    kafka.write(chunk).map_err(|reason| SinkError::Kafka {
                        sink: sink.name.clone(),
                        reason,
                    })?;
                    Ok(())
                }
            };
            result.map_err(|source| SinkError::Write {
                sink: sink.name.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sink_cuts_an_incomplete_last_line_and_keeps_whole_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        for (before, after) in [
            ("", ""),
            ("{\"a\":1}\n", "{\"a\":1}\n"),
            ("{\"a\":1}\n{\"b\":", "{\"a\":1}\n"),
            ("{\"b\":", ""),
        ] {
            std::fs::write(&path, before).unwrap();
            let sinks = SinkSet::open(&[SinkConfig::File { path: path.clone() }]).unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap(), after, "{before:?}");
            sinks.write_chunk(b"{\"c\":3}\n").unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{after}{{\"c\":3}}\n"));
        }
        // A fragment longer than one read of the backwards scan.
        let long = format!("{{\"a\":1}}\n{}", "x".repeat(200_000));
        std::fs::write(&path, long).unwrap();
        drop(SinkSet::open(&[SinkConfig::File { path: path.clone() }]).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
    }
}
