//! The Kafka consumers in a process of their own. librdkafka 2.12 dereferences a null topic
//! name when a broker's fetch reply carries a leader change for a topic it names by a zero
//! id, as a broker restarted empty can send (docs/reliability.md): a SIGSEGV that would take
//! the node, and every flow it holds in memory, with it. So every topic a node reads is read by
//! a child process running [`read_topic`], which streams what it reads up a pipe; if the child
//! dies, the node says so, counts it and starts another, which reads the topic again from
//! `now - retention` (applying is a set union: reading twice changes nothing).
//!
//! The child is the node's own executable (`/proc/self/exe`) started with [`READER_ARG`]: every binary that runs
//! a node calls [`run_if_reader`] first thing in `main`. It reads its settings as one JSON line
//! on stdin and exits when stdin closes, so it never outlives its node.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowattr_common::Timestamp;
use serde::{Deserialize, Serialize};

use super::topic::{TopicMessage, read_topic, reader_consumer};
use crate::config::ClusterConfig;

/// The first argument that makes a node's executable a topic reader.
pub const READER_ARG: &str = "__flowattr-topic-reader";

/// Runs this process as a topic reader, and exits, if it was started as one.
pub fn run_if_reader() {
    if std::env::args().nth(1).as_deref() == Some(READER_ARG) {
        std::process::exit(reader_main());
    }
}

/// What the node tells its reader.
#[derive(Debug, Serialize, Deserialize)]
struct ReaderSettings {
    brokers: String,
    topic: String,
    retention_ms: u64,
    node_id: u64,
    kafka: BTreeMap<String, String>,
}

/// Largest message the pipe carries: a reader that says more is broken, and is replaced.
const MESSAGE_BYTES_MAX: usize = 256 << 20;

const MESSAGE: u8 = 1;
const CAUGHT_UP: u8 = 2;
const READ_THROUGH: u8 = 3;

fn reader_main() -> i32 {
    flowattr_common::logging::init(flowattr_common::logging::LogFormat::from_environment());
    let mut line = String::new();
    let mut stdin = std::io::stdin().lock();
    if stdin.read_line(&mut line).is_err() {
        return 2;
    }
    let settings: ReaderSettings = match serde_json::from_str(&line) {
        Ok(settings) => settings,
        Err(error) => {
            tracing::error!("bad settings: {error}");
            return 2;
        }
    };
    drop(stdin);
    // The node closes our stdin by ending: then so do we.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let cluster = ClusterConfig {
        kafka: settings.kafka,
        ..ClusterConfig::default()
    };
    let clients =
        reader_consumer(&cluster, &settings.brokers, settings.node_id).and_then(|consumer| {
            Ok((
                consumer,
                reader_consumer(&cluster, &settings.brokers, settings.node_id)?,
            ))
        });
    let (consumer, prober) = match clients {
        Ok(clients) => clients,
        Err(error) => {
            tracing::error!("{error}");
            return 2;
        }
    };
    let out = std::cell::RefCell::new(BufWriter::new(std::io::stdout().lock()));
    // A write that fails means the node is gone.
    let send = |bytes: &[u8]| {
        let mut out = out.borrow_mut();
        if out.write_all(bytes).and_then(|()| out.flush()).is_err() {
            std::process::exit(0);
        }
    };
    let mut frame = Vec::new();
    let changed = read_topic(
        &consumer,
        &prober,
        &settings.topic,
        Duration::from_millis(settings.retention_ms),
        |message| {
            frame.clear();
            encode_message(message, &mut frame);
            send(&frame);
        },
        || send(&[CAUGHT_UP]),
        |through| {
            let mut bytes = vec![READ_THROUGH];
            bytes.extend_from_slice(&through.as_nanos().to_le_bytes());
            send(&bytes);
        },
    );
    tracing::warn!("{changed}: reading it again from the start");
    3
}

fn encode_message(message: &TopicMessage<'_>, out: &mut Vec<u8>) {
    out.push(MESSAGE);
    out.extend_from_slice(&message.published.as_nanos().to_le_bytes());
    let headers: Vec<(&str, &[u8])> = message.headers().collect();
    out.extend_from_slice(&(headers.len() as u16).to_le_bytes());
    for (key, value) in headers {
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    let payload = message.payload();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// One thing a reader said.
enum Said {
    Message {
        published: Timestamp,
        headers: Vec<(String, Vec<u8>)>,
        payload: Vec<u8>,
    },
    CaughtUp,
    ReadThrough(Timestamp),
}

fn read_said(input: &mut impl Read) -> std::io::Result<Said> {
    let broken = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut kind = [0u8; 1];
    input.read_exact(&mut kind)?;
    let mut u64_bytes = [0u8; 8];
    match kind[0] {
        CAUGHT_UP => Ok(Said::CaughtUp),
        READ_THROUGH => {
            input.read_exact(&mut u64_bytes)?;
            Ok(Said::ReadThrough(Timestamp::from_nanos(
                u64::from_le_bytes(u64_bytes),
            )))
        }
        MESSAGE => {
            input.read_exact(&mut u64_bytes)?;
            let published = Timestamp::from_nanos(u64::from_le_bytes(u64_bytes));
            let mut u16_bytes = [0u8; 2];
            let mut u32_bytes = [0u8; 4];
            input.read_exact(&mut u16_bytes)?;
            let mut headers =
                Vec::with_capacity(usize::from(u16::from_le_bytes(u16_bytes)).min(64));
            for _ in 0..u16::from_le_bytes(u16_bytes) {
                input.read_exact(&mut u16_bytes)?;
                let mut key = vec![0u8; usize::from(u16::from_le_bytes(u16_bytes))];
                input.read_exact(&mut key)?;
                input.read_exact(&mut u32_bytes)?;
                let length = u32::from_le_bytes(u32_bytes) as usize;
                if length > MESSAGE_BYTES_MAX {
                    return Err(broken("a header over the size limit"));
                }
                let mut value = vec![0u8; length];
                input.read_exact(&mut value)?;
                headers.push((
                    String::from_utf8(key).map_err(|_| broken("a header key that is not UTF-8"))?,
                    value,
                ));
            }
            input.read_exact(&mut u32_bytes)?;
            let length = u32::from_le_bytes(u32_bytes) as usize;
            if length > MESSAGE_BYTES_MAX {
                return Err(broken("a message over the size limit"));
            }
            let mut payload = vec![0u8; length];
            input.read_exact(&mut payload)?;
            Ok(Said::Message {
                published,
                headers,
                payload,
            })
        }
        _ => Err(broken("an unknown record kind")),
    }
}

/// [`read_topic`], through a reader process that is replaced whenever it dies (counted in
/// `restarts`). `caught_up` is called once, for the first reader; the messages a replacement
/// reads before it has caught up are handed over marked `replayed`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_topic_isolated(
    cluster: &ClusterConfig,
    brokers: &str,
    node_id: u64,
    topic: &str,
    retention: Duration,
    restarts: &AtomicU64,
    mut handle: impl FnMut(&TopicMessage<'_>),
    mut caught_up: impl FnMut(),
    mut read_through: impl FnMut(Timestamp),
) {
    let settings = ReaderSettings {
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
        retention_ms: retention.as_millis() as u64,
        node_id,
        kafka: cluster.kafka.clone(),
    };
    let mut first = true;
    loop {
        let mut replaying = !first;
        match start_reader(&settings) {
            Ok((mut child, _stdin, stdout)) => {
                let mut input = BufReader::with_capacity(1 << 20, stdout);
                let ended = loop {
                    match read_said(&mut input) {
                        Ok(Said::Message {
                            published,
                            headers,
                            payload,
                        }) => handle(&TopicMessage::from_parts(
                            &payload, published, &headers, replaying,
                        )),
                        Ok(Said::CaughtUp) => {
                            if first {
                                caught_up();
                            }
                            first = false;
                            replaying = false;
                        }
                        Ok(Said::ReadThrough(through)) => read_through(through),
                        Err(error) => break error,
                    }
                };
                let _ = child.kill();
                let status = child
                    .wait()
                    .map(|status| status.to_string())
                    .unwrap_or_else(|error| error.to_string());
                let ended = match ended.kind() {
                    std::io::ErrorKind::UnexpectedEof => String::new(),
                    _ => format!(", after saying something unreadable: {ended}"),
                };
                tracing::warn!(
                    "the Kafka reader of topic {topic} ended ({status}{ended}): starting another, which reads the topic again"
                );
            }
            Err(error) => tracing::error!("starting the Kafka reader of topic {topic}: {error}"),
        }
        restarts.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn start_reader(
    settings: &ReaderSettings,
) -> std::io::Result<(Child, ChildStdin, std::process::ChildStdout)> {
    // The running executable itself, even once an upgrade has replaced (deleted) its file:
    // a reader of another version, or none at all, would be worse.
    let mut child = Command::new("/proc/self/exe")
        .arg(READER_ARG)
        .env(
            flowattr_common::logging::FORMAT_VARIABLE,
            flowattr_common::logging::format().as_str(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let mut line = serde_json::to_string(settings).map_err(std::io::Error::other)?;
    line.push('\n');
    stdin.write_all(line.as_bytes())?;
    stdin.flush()?;
    Ok((child, stdin, stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_reader_says_reads_back_and_garbage_is_an_error_not_a_panic() {
        let headers = vec![("flowattr-complete-through".to_owned(), b"123".to_vec())];
        let message =
            TopicMessage::from_parts(b"payload", Timestamp::from_nanos(42), &headers, false);
        let mut bytes = Vec::new();
        encode_message(&message, &mut bytes);
        bytes.push(CAUGHT_UP);
        bytes.push(READ_THROUGH);
        bytes.extend_from_slice(&7u64.to_le_bytes());
        let mut input = &bytes[..];
        match read_said(&mut input).unwrap() {
            Said::Message {
                published,
                headers,
                payload,
            } => {
                assert_eq!(
                    (published, payload.as_slice()),
                    (Timestamp::from_nanos(42), &b"payload"[..])
                );
                assert_eq!(
                    headers,
                    vec![("flowattr-complete-through".to_owned(), b"123".to_vec())]
                );
            }
            _ => panic!("not a message"),
        }
        assert!(matches!(read_said(&mut input).unwrap(), Said::CaughtUp));
        assert!(
            matches!(read_said(&mut input).unwrap(), Said::ReadThrough(through) if through == Timestamp::from_nanos(7))
        );
        assert!(read_said(&mut input).is_err(), "the end");
        for garbage in [
            &[9u8][..],
            &[MESSAGE, 1, 2],
            &[MESSAGE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255],
        ] {
            assert!(read_said(&mut &garbage[..]).is_err(), "{garbage:?}");
        }
    }
}
