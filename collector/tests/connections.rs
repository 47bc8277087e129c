//! Exporter connections against clients that take places and memory without sending frames:
//! idle sockets holding every place, one address opening socket after socket, and clients
//! that send most of a large frame and stop. A real client is still served each time.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::{AckStatus, encode_message};
use flowattr_common::{CanonicalIp, Timestamp};
use support::{Collector, batch_of, closed_flow};

fn start(dir: &Path, ingest: &str) -> Collector {
    let config = dir.join("collector.toml");
    std::fs::write(&config, format!("[ingest]\n{ingest}")).unwrap();
    Collector::start(
        &dir.join("flows.jsonl"),
        &[
            "--cpus",
            "1",
            "--storage",
            "memory",
            "--config",
            config.to_str().unwrap(),
        ],
    )
}

fn ip(text: &str) -> CanonicalIp {
    CanonicalIp::from(text.parse::<std::net::IpAddr>().unwrap())
}

/// One batch of one flow, sent from `source` on a connection of its own: its ack's status.
fn send_one(collector: &Collector, source: &str, sequence: u64) -> Result<AckStatus, String> {
    let now = Timestamp::now();
    let flow = closed_flow(
        (ip(source), 40_000),
        (ip("10.9.0.1"), 443),
        Some(0),
        now,
        now,
    );
    let batch = batch_of(7, sequence, "real-exporter", vec![flow]);
    let mut connection = connect_from(source, collector.ingest).and_then(|stream| {
        CollectorConnection::from_stream(stream).map_err(|error| error.to_string())
    })?;
    connection
        .send_and_wait(&batch)
        .map(|ack| ack.status)
        .map_err(|error| error.to_string())
}

/// A TCP connection to `to` from the loopback address `source`.
fn connect_from(source: &str, to: SocketAddr) -> Result<TcpStream, String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).map_err(|e| e.to_string())?;
    socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    Ok(stream)
}

/// Whether the collector closed `stream` (a read ends) within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    matches!(stream.read(&mut [0u8; 1]), Ok(0) | Err(_))
        && {
            // A timeout is an error too: tell it apart from a close.
            stream.set_nonblocking(true).unwrap();
            let closed = matches!(stream.read(&mut [0u8; 1]), Ok(0))
                || matches!(stream.read(&mut [0u8; 1]), Err(error) if error.kind() != std::io::ErrorKind::WouldBlock);
            stream.set_nonblocking(false).unwrap();
            closed
        }
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn with_every_place_held_by_idle_sockets_a_real_exporter_gets_in_once_the_idle_timeout_frees_them()
{
    let dir = tempfile::tempdir().unwrap();
    let idle_timeout = Duration::from_secs(3);
    let collector = start(
        dir.path(),
        "max_connections = 6\nmax_connections_per_address = 6\nidle_timeout = \"3s\"\n",
    );
    let mut idle: Vec<TcpStream> = (0..6)
        .map(|_| connect_from("127.0.0.1", collector.ingest).unwrap())
        .collect();
    wait_for("six places taken", Duration::from_secs(30), || {
        collector.metric("flowattr_connection_slots_open", None) == 6
    });
    let held_at = Instant::now();
    // Every place is taken: a seventh connection is closed at once.
    let mut seventh = connect_from("127.0.0.1", collector.ingest).unwrap();
    assert!(
        closed_within(&mut seventh, Duration::from_secs(10)),
        "a seventh connection was served"
    );
    assert!(
        collector.metric(
            "flowattr_ingest_rejections_total",
            Some("reason=\"connection_limit\"")
        ) >= 1
    );

    // An exporter retrying as the real one does (connect, send, wait) gets in once the idle
    // sockets are closed, whatever their owner does.
    let mut tries = 0;
    let accepted = loop {
        tries += 1;
        match send_one(&collector, "127.0.0.1", tries) {
            Ok(status) => break status,
            Err(_) if held_at.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(error) => panic!("no ack in 60 s ({tries} tries): {error}"),
        }
    };
    let waited = held_at.elapsed();
    assert_eq!(accepted, AckStatus::Accepted);
    assert!(
        waited >= idle_timeout - Duration::from_millis(500),
        "got in after {waited:?}, before any idle socket was due"
    );
    for (n, socket) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(socket, Duration::from_secs(10)),
            "idle socket {n} still open"
        );
    }
    assert!(collector.metric("flowattr_ingest_rejections_total", Some("reason=\"idle\"")) >= 6);

    // A connection that sends a frame more often than the timeout stays open past it.
    let mut steady =
        CollectorConnection::from_stream(connect_from("127.0.0.1", collector.ingest).unwrap())
            .unwrap();
    let now = Timestamp::now();
    let flow = closed_flow(
        (ip("127.0.0.1"), 40_001),
        (ip("10.9.0.2"), 443),
        Some(0),
        now,
        now,
    );
    for sequence in 1_000..1_008 {
        let ack = steady
            .send_and_wait(&batch_of(8, sequence, "steady", vec![flow]))
            .expect("the steady connection stays open");
        assert_eq!(ack.status, AckStatus::Accepted);
        std::thread::sleep(idle_timeout / 2);
    }
}

#[test]
fn one_address_cannot_take_every_place() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(
        dir.path(),
        "max_connections = 8\nmax_connections_per_address = 3\nidle_timeout = \"10m\"\n",
    );
    let mut greedy = Vec::new();
    for _ in 0..8 {
        greedy.push(connect_from("127.0.0.1", collector.ingest).unwrap());
    }
    wait_for(
        "the greedy address's connections counted",
        Duration::from_secs(30),
        || {
            collector.metric(
                "flowattr_ingest_rejections_total",
                Some("reason=\"address_limit\""),
            ) >= 5
        },
    );
    assert_eq!(collector.metric("flowattr_connection_slots_open", None), 3);
    let refused = greedy
        .iter_mut()
        .map(|socket| closed_within(socket, Duration::from_millis(500)))
        .filter(|closed| *closed)
        .count();
    assert_eq!(
        refused, 5,
        "all but three of one address's connections are closed at once"
    );
    // Another host is served at once, though the greedy one keeps its sockets open.
    assert_eq!(
        send_one(&collector, "127.0.0.2", 1),
        Ok(AckStatus::Accepted)
    );
    assert_eq!(
        send_one(&collector, "127.0.0.3", 2),
        Ok(AckStatus::Accepted)
    );
}

#[test]
fn unfinished_frames_hold_no_more_than_their_budget_and_a_real_exporter_is_served_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let budget: u64 = 4 << 20;
    let collector = start(
        dir.path(),
        &format!(
            "max_frame_bytes = {budget}\nmax_partial_frame_bytes = {budget}\nidle_timeout = \"8s\"\n"
        ),
    );
    assert_eq!(
        send_one(&collector, "127.0.0.1", 1),
        Ok(AckStatus::Accepted)
    );
    let rss_before = collector.metric("flowattr_resident_memory_bytes", None);

    // Forty clients each send all but the last byte of a 3.9 MB frame, and stop.
    let frame = {
        let padding = "w".repeat(3_900_000);
        let mut bytes = Vec::new();
        encode_message(&batch_of(9, 1, &padding, Vec::new()), &mut bytes).unwrap();
        bytes.truncate(bytes.len() - 1);
        bytes
    };
    let attackers: Vec<_> = (0..40)
        .map(|n| {
            let frame = frame.clone();
            let mut stream = connect_from(&format!("127.0.1.{}", n + 1), collector.ingest).unwrap();
            std::thread::spawn(move || {
                // Blocks once the collector stops reading; the socket is kept open either way.
                let _ = stream.write_all(&frame);
                stream
            })
        })
        .collect();
    wait_for(
        "the partial-frame budget spent",
        Duration::from_secs(60),
        || collector.metric("flowattr_ingest_partial_frame_bytes", None) >= budget - (256 << 10),
    );
    // Meanwhile a real exporter's batch is read and acked.
    assert_eq!(
        send_one(&collector, "127.0.0.1", 2),
        Ok(AckStatus::Accepted)
    );
    std::thread::sleep(Duration::from_secs(1));
    let grown = collector
        .metric("flowattr_resident_memory_bytes", None)
        .saturating_sub(rss_before);
    let free_per_connection = 768 << 10;
    let bound = budget + 40 * free_per_connection + (32 << 20);
    assert!(
        collector.metric("flowattr_ingest_partial_frame_bytes", None) <= budget,
        "the budget was overspent"
    );
    assert!(
        grown <= bound,
        "RSS grew {grown} bytes with 40 unfinished frames, over {bound}"
    );

    // The unfinished frames are dropped at the idle timeout and give their budget back.
    wait_for(
        "the attackers closed at the idle timeout",
        Duration::from_secs(60),
        || collector.metric("flowattr_ingest_rejections_total", Some("reason=\"idle\"")) >= 40,
    );
    wait_for("the budget given back", Duration::from_secs(10), || {
        collector.metric("flowattr_ingest_partial_frame_bytes", None) == 0
    });
    for attacker in attackers {
        let mut stream = attacker.join().unwrap();
        assert!(closed_within(&mut stream, Duration::from_secs(10)));
    }
    assert_eq!(
        send_one(&collector, "127.0.0.1", 3),
        Ok(AckStatus::Accepted)
    );
}

/// Exporters keep their connections open between batches, a minute apart by default: a
/// connection waiting for its next frame gives its read buffer up for a small one, so a node
/// takes thousands of them; and each is read from again at once when its next batch comes.
#[test]
fn connections_waiting_between_batches_hold_little_memory() {
    const CONNECTIONS: usize = 2000;
    const WAITING_READ_BYTES: u64 = 16 << 10;
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path(), "");
    assert_eq!(
        send_one(&collector, "127.0.0.1", 1),
        Ok(AckStatus::Accepted)
    );
    let rss_before = collector.metric("flowattr_resident_memory_bytes", None);
    // Batches of 400 flows: frames larger than a waiting connection's read, so every
    // connection's buffer grows, and must be given up once it waits.
    let batch = |exporter: u64, sequence: u64| {
        let now = Timestamp::now();
        let flows = (0..400)
            .map(|port| {
                closed_flow(
                    (ip("10.8.0.1"), 40_000 + port),
                    (ip("10.9.0.1"), 443),
                    Some(0),
                    now,
                    now,
                )
            })
            .collect();
        batch_of(exporter, sequence, "waiting-exporter", flows)
    };
    let send = |connection: &mut CollectorConnection, exporter: u64, sequence: u64| {
        connection
            .send_and_wait(&batch(exporter, sequence))
            .unwrap()
            .status
    };
    // Its frame in pieces far smaller than a read, a millisecond apart: the buffer grows with
    // the frame while every read comes back short.
    let trickle = |connection: &mut CollectorConnection, exporter: u64, sequence: u64| {
        let mut frame = Vec::new();
        encode_message(&batch(exporter, sequence), &mut frame).unwrap();
        assert!(frame.len() > 2 * WAITING_READ_BYTES as usize);
        for piece in frame.chunks(2 << 10) {
            connection.send_raw(piece).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        connection.recv_ack().unwrap().status
    };
    // Under the per-address limit: 250 from each of 8 addresses. Every tenth trickles its batch.
    let mut connections: Vec<CollectorConnection> = (0..CONNECTIONS)
        .map(|n| {
            let source = format!("127.0.{}.{}", 2 + n / 250, 1 + n % 250);
            let stream = connect_from(&source, collector.ingest).unwrap();
            let mut connection = CollectorConnection::from_stream(stream).unwrap();
            let status = if n % 10 == 0 {
                trickle(&mut connection, 100 + n as u64, 1)
            } else {
                send(&mut connection, 100 + n as u64, 1)
            };
            assert_eq!(status, AckStatus::Accepted);
            connection
        })
        .collect();
    // Each gives its buffer up after a second of waiting.
    wait_for(
        "every waiting connection's buffer given up",
        Duration::from_secs(30),
        || {
            collector.metric("flowattr_ingest_receive_buffer_bytes", None)
                == CONNECTIONS as u64 * WAITING_READ_BYTES
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let grown = collector
        .metric("flowattr_resident_memory_bytes", None)
        .saturating_sub(rss_before);
    let per_connection = grown / CONNECTIONS as u64;
    eprintln!("{CONNECTIONS} connections waiting: RSS grew {grown} bytes, {per_connection} each");
    // Whole read buffers would be 272 KiB each; what the allocator keeps of the freed ones
    // varies with the order they were freed in, hence the margin.
    assert!(
        per_connection <= 128 << 10,
        "a waiting connection holds {per_connection} bytes"
    );
    for (n, connection) in connections.iter_mut().enumerate().step_by(97) {
        assert_eq!(send(connection, 100 + n as u64, 2), AckStatus::Accepted);
    }
}
