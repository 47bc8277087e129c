//! The Parquet sink, read back by a real query engine: DuckDB, whose Python wheel
//! `scripts/test` installs (`scripts/fetch-duckdb`; `FLOWATTR_DUCKDB_PATH` names the
//! directory). It fails, never skips, without one.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flowattr_common::wire::AckStatus;
use serde_json::{Value, json};
use support::{Collector, SmallDisk, connections, from_kubernetes_hosts};

/// Rows of `sql` as DuckDB returns them, as JSON arrays.
fn duckdb(sql: &str) -> Vec<Value> {
    let path = std::env::var_os("FLOWATTR_DUCKDB_PATH")
        .expect("FLOWATTR_DUCKDB_PATH must name a directory holding DuckDB's Python package (scripts/fetch-duckdb installs it)");
    let output = Command::new("python3")
        .env("PYTHONPATH", path)
        .args([
            "-c",
            "import duckdb, json, sys; print(json.dumps(duckdb.sql(sys.argv[1]).fetchall(), default=str))",
            sql,
        ])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "duckdb failed on {sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&output.stdout).expect("JSON rows")
}

fn parquet_files(dir: &Path) -> (usize, usize) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let complete = names
        .iter()
        .filter(|name| name.starts_with("flows-") && name.ends_with(".parquet"))
        .count();
    let temporary = names
        .iter()
        .filter(|name| name.ends_with(".parquet.tmp"))
        .count();
    (complete, temporary)
}

/// Distinct (exporter, sequence, index) in the complete files, once there are `at_least`.
fn wait_for_distinct(dir: &Path, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let distinct = if parquet_files(dir).0 == 0 {
            0
        } else {
            duckdb(&format!(
                "select count(distinct (exporter, sequence, index)) from read_parquet('{}/flows-*.parquet')",
                dir.display()
            ))[0][0]
                .as_u64()
                .unwrap()
        };
        if distinct >= at_least || Instant::now() > deadline {
            return distinct;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A config file in `dir` with one Parquet sink writing to `parquet` (default `dir/parquet`).
fn config(dir: &Path, age: &str) -> std::path::PathBuf {
    config_at(dir, &dir.join("parquet"), age)
}

fn config_at(dir: &Path, parquet: &Path, age: &str) -> std::path::PathBuf {
    let path = dir.join("collector.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nregion = \"eu-test\"\n[[sinks]]\nkind = \"parquet\"\ndir = \"{}\"\nmax_file_age = \"{age}\"\n",
            parquet.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn duckdb_reads_every_flow_and_the_dependency_graph_from_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start_with_config(
        &config(dir.path(), "1s"),
        &dir.path().join("unused.jsonl"),
        &[
            "--storage",
            "memory",
            "--delay",
            "500ms",
            "--segment-span",
            "100ms",
            "--max-retries",
            "0",
        ],
    );
    let mut batches = connections(("web", 1), (Some("db"), 2), 300, 0);
    batches.extend(connections(("api", 3), (Some("db"), 2), 200, 1));
    // A server nobody reports: its flows are emitted unattributed.
    batches.extend(connections(("web", 1), (None, 9), 50, 2));
    let acks = collector
        .connect()
        .send_all(&from_kubernetes_hosts(batches), 4)
        .unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    let parquet = dir.path().join("parquet");
    let total = 2 * 300 + 2 * 200 + 50;
    assert_eq!(wait_for_distinct(&parquet, total), total);
    let glob = format!("read_parquet('{}/flows-*.parquet')", parquet.display());
    assert_eq!(
        duckdb(&format!("select count(*) from {glob}"))[0][0],
        total,
        "each flow once"
    );
    // The views users are given (docs/schema/duckdb.sql), over these files.
    let views = include_str!("../../docs/schema/duckdb.sql")
        .replace("PARQUET_DIR", &parquet.display().to_string());
    let graph = duckdb(&format!("{views}\nselect * from dependencies order by all"));
    assert_eq!(
        graph,
        [
            json!(["api", "db", 200, 200 * 300]),
            json!(["web", "db", 300, 300 * 300]),
            json!(["web", "unattributed:no_evidence", 50, 50 * 300]),
        ]
    );
    let row = &duckdb(&format!(
        "select hex(local_ip), remote_port, state, provenance, segments_received, epoch_ns(\"end\") - epoch_ns(start)
         from {glob} where local_workload = 'api' limit 1"
    ))[0];
    assert_eq!(
        row,
        &json!(["0A080003", 5432, "closed", "heartbeat", 3, 1_000_000_000])
    );
    // The platform's fields, each a column; the remote side's without its pod (the map keeps
    // workloads), and none for a side nobody named.
    let identities = duckdb(&format!(
        "select distinct local_workload, local_namespace, local_instance, local_owner_kind, remote_workload, remote_namespace,
                remote_owner_kind, host_name, region
         from {glob} order by all"
    ));
    assert_eq!(
        identities,
        [
            json!([
                "api",
                "shop",
                "api-1",
                "Deployment",
                "db",
                "shop",
                "Deployment",
                "host-3",
                "eu-test"
            ]),
            json!([
                "db",
                "shop",
                "db-1",
                "Deployment",
                "api",
                "shop",
                "Deployment",
                "host-2",
                "eu-test"
            ]),
            json!([
                "db",
                "shop",
                "db-1",
                "Deployment",
                "web",
                "shop",
                "Deployment",
                "host-2",
                "eu-test"
            ]),
            json!([
                "web",
                "shop",
                "web-1",
                "Deployment",
                "db",
                "shop",
                "Deployment",
                "host-1",
                "eu-test"
            ]),
            json!([
                "web",
                "shop",
                "web-1",
                "Deployment",
                null,
                null,
                null,
                "host-1",
                "eu-test"
            ]),
        ]
    );
    assert_eq!(
        parquet_files(&parquet).1,
        0,
        "no temporary file once everything is complete"
    );
}

#[test]
fn a_crash_with_a_file_half_written_loses_no_acked_flow() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
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
    let output = dir.path().join("unused.jsonl");
    // Files complete only after an hour: everything written before the crash is in a
    // temporary file.
    let collector = Collector::start_with_config(&config(dir.path(), "1h"), &output, &args);
    let batches = connections(("web", 1), (Some("db"), 2), 400, 0);
    let acks = collector.connect().send_all(&batches, 2).unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    collector.wait_for_metric("flowattr_flows_emitted_total", None, 800);
    let parquet = dir.path().join("parquet");
    // Flows count as emitted once attributed; a sink thread writes them a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while parquet_files(&parquet) == (0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        parquet_files(&parquet),
        (0, 1),
        "the rows sit in a file not yet complete"
    );
    assert_eq!(
        collector.metric("flowattr_delay_segments_released_total", None),
        0,
        "so their segments are kept"
    );
    collector.kill();
    let collector = Collector::start_with_config(&config(dir.path(), "1s"), &output, &args);
    assert_eq!(
        wait_for_distinct(&parquet, 800),
        800,
        "every acked flow, from the segments replayed"
    );
    assert_eq!(
        parquet_files(&parquet).1,
        0,
        "the crashed run's temporary file is gone"
    );
    collector.wait_for_metric("flowattr_delay_segments_released_total", None, 1);
}

#[test]
fn a_file_that_cannot_be_completed_stops_the_node_and_loses_nothing() {
    let disk = SmallDisk::new(16);
    let dir = tempfile::tempdir().unwrap();
    let parquet = disk.mount.join("parquet");
    let data = dir.path().join("data");
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
    let output = dir.path().join("unused.jsonl");
    let config = config_at(dir.path(), &parquet, "1s");
    let mut collector = Collector::start_with_config(&config, &output, &args);
    let acks = collector
        .connect()
        .send_all(&connections(("web", 1), (Some("db"), 2), 100, 0), 2)
        .unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    assert_eq!(wait_for_distinct(&parquet, 200), 200);
    // The Parquet disk fills: the next file cannot be written or completed.
    let filler = disk.fill();
    let acks = collector
        .connect()
        .send_all(&connections(("web", 1), (Some("db"), 2), 300, 1), 2)
        .unwrap();
    assert!(
        acks.iter().all(|ack| ack.status == AckStatus::Accepted),
        "the delay buffer is on another disk"
    );
    assert_eq!(
        collector.wait_for_exit(Duration::from_secs(30)),
        Some(75),
        "the node stops rather than lose the file's rows"
    );
    std::fs::remove_file(filler).unwrap();
    let _collector = Collector::start_with_config(&config, &output, &args);
    assert_eq!(
        wait_for_distinct(&parquet, 800),
        800,
        "every acked flow, the second batch from the replay"
    );
}
