//! Two regions, one collector node each, as processes: flows whose remote IP lies in the other
//! region's CIDRs are forwarded there, acked, and attributed there from that region's
//! heartbeats; the forwarding node holds them durably, so a SIGKILL loses none.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use flowattr_common::wire::FlowBatch;
use flowattr_common::{CanonicalIp, Timestamp};
use support::{Collector, batch_of, closed_flow, read_output, send, wait_for_records};

fn ip(text: &str) -> CanonicalIp {
    CanonicalIp::from(text.parse::<Ipv4Addr>().unwrap())
}

/// One flow per (remote, start s) from `local`, each one second long.
fn batch(
    exporter: u64,
    local: &str,
    workload: &str,
    t0: Timestamp,
    flows: &[(&str, u64)],
) -> FlowBatch {
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    // Each from its own local port: one report per connection.
    let flows = flows
        .iter()
        .zip(40_000u16..)
        .map(|(&(remote, start), port)| {
            closed_flow(
                (ip(local), port),
                (ip(remote), 443),
                Some(0),
                at(start),
                at(start + 1),
            )
        })
        .collect();
    batch_of(exporter, 0, workload, flows)
}

/// The eu node forwards to us's collectors listed as an address where nothing listens, then
/// us's node by name (`localhost`, from /etc/hosts): every forward fails over to the name.
fn start_eu(dir: &std::path::Path, us_ingest: std::net::SocketAddr) -> Collector {
    let nobody = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let collectors = format!("\"{nobody}\", \"localhost:{}\"", us_ingest.port());
    start_eu_listing(dir, &collectors, "", "2s")
}

/// The eu region's node, with `extra` config lines and its delay.
fn start_eu_with(
    dir: &std::path::Path,
    us_ingest: std::net::SocketAddr,
    extra: &str,
    delay: &str,
) -> Collector {
    start_eu_listing(dir, &format!("\"{us_ingest}\""), extra, delay)
}

/// The eu region's node forwarding to `collectors` (the inside of a TOML list).
fn start_eu_listing(
    dir: &std::path::Path,
    collectors: &str,
    extra: &str,
    delay: &str,
) -> Collector {
    let config = dir.join("eu.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}[node]\nregion = \"eu\"\n[[regions]]\nname = \"eu\"\ncidrs = [\"10.50.0.0/16\"]\n[[regions]]\nname = \"us\"\ncidrs = [\"10.60.0.0/16\"]\ncollectors = [{collectors}]\n"
        ),
    )
    .unwrap();
    let data = dir.join("eu-data");
    Collector::start(
        &dir.join("eu.jsonl"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--delay",
            delay,
            "--segment-span",
            "200ms",
            "--max-retries",
            "0",
        ],
    )
}

#[test]
fn flows_to_another_region_are_forwarded_attributed_there_and_survive_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    // The us region's collector is not up yet: forwarded flows wait in eu's spool.
    let us_ingest = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let eu = start_eu(dir.path(), us_ingest);
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(30));
    send(
        &eu,
        &batch(2, "10.50.0.3", "eu-db", t0, &[("10.50.0.9", 1)]),
    );
    let to_us: Vec<(&str, u64)> = (0..50).map(|i| ("10.60.0.2", 2 + i % 5)).collect();
    let mut flows = to_us.clone();
    flows.push(("10.50.0.3", 3));
    send(&eu, &batch(1, "10.50.0.1", "eu-api", t0, &flows));
    // Acked, so durable: the forwarding node dies at once and comes back.
    eu.kill();
    let eu = start_eu(dir.path(), us_ingest);

    let us_output = dir.path().join("us.jsonl");
    let us = Collector::start(
        &us_output,
        &[
            "--listen",
            &us_ingest.to_string(),
            "--storage",
            "memory",
            "--delay",
            "4s",
            "--segment-span",
            "200ms",
            "--max-retries",
            "0",
        ],
    );
    // us-billing held 10.60.0.2 throughout: one long connection of its own reports it.
    let long = closed_flow(
        (ip("10.60.0.2"), 443),
        (ip("10.60.0.9"), 50_000),
        Some(0),
        t0,
        t0.saturating_add(Duration::from_secs(20)),
    );
    send(&us, &batch_of(3, 0, "us-billing", vec![long]));
    let records = wait_for_records(&us_output, 51);
    for index in 0..50u64 {
        let record = &records[&(1, 0, index)];
        assert_eq!(record["remote_workload"], "us-billing", "{record}");
        assert_eq!(record["local_workload"], "eu-api", "{record}");
    }
    // The eu flow to eu stays in eu, attributed there; none of the forwarded ones come out in eu.
    let eu_records = wait_for_records(&eu.output, 2);
    assert_eq!(
        eu_records[&(1, 0, 50)]["remote_workload"],
        "eu-db",
        "{eu_records:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (eu_records, _) = read_output(&eu.output);
    assert_eq!(eu_records.len(), 2, "{eu_records:?}");
    let (_, us_counts) = read_output(&us_output);
    assert_eq!(us_counts.len(), 51);
    assert!(
        us_counts.values().all(|&count| count == 1),
        "each forwarded flow once: {us_counts:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while eu.metric("flowattr_forward_flows_total", None) < 50 {
        assert!(Instant::now() < deadline, "eu never saw its forwards acked");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn flows_the_other_region_refuses_are_kept_counted_and_logged_never_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let us_output = dir.path().join("us.jsonl");
    let us = Collector::start(
        &us_output,
        &[
            "--storage",
            "memory",
            "--delay",
            "2s",
            "--segment-span",
            "200ms",
            "--max-retries",
            "0",
        ],
    );
    // eu takes records ending up to 15 s ahead of its clock; us, by default, 1 s.
    let eu = start_eu_with(
        dir.path(),
        us.ingest,
        "[ingest]\nmax_clock_skew = \"15s\"\n",
        "20s",
    );
    let now = Timestamp::now();
    let past = now.saturating_sub(Duration::from_secs(30));
    let ahead = now.saturating_add(Duration::from_secs(9));
    let at = |base: Timestamp, port: u16| {
        closed_flow(
            (ip("10.50.0.1"), port),
            (ip("10.60.0.2"), 443),
            Some(0),
            base,
            base.saturating_add(Duration::from_secs(1)),
        )
    };
    let flows = vec![
        at(ahead, 40_000),
        at(past, 40_001),
        at(ahead, 40_002),
        at(ahead, 40_003),
    ];
    send(&eu, &batch_of(1, 0, "eu-api", flows));

    let deadline = Instant::now() + Duration::from_secs(60);
    while eu.metric("flowattr_forward_batches_total", None) < 1 {
        assert!(Instant::now() < deadline, "eu never saw its forward acked");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(eu.metric("flowattr_forward_records_refused_total", None), 3);
    assert_eq!(
        eu.metric("flowattr_forward_flows_total", None),
        1,
        "refused flows are not counted as forwarded"
    );
    assert_eq!(
        eu.metric("flowattr_forward_dead_letter_dropped_total", None),
        0
    );
    let kept = std::fs::read_to_string(
        dir.path()
            .join("eu-data/forward/us/dead-letter/records.jsonl"),
    )
    .unwrap();
    let kept: Vec<serde_json::Value> = kept
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let mut indices: Vec<u64> = kept
        .iter()
        .map(|record| record["index"].as_u64().unwrap())
        .collect();
    indices.sort_unstable();
    assert_eq!(indices, [0, 2, 3], "{kept:?}");
    assert!(
        kept.iter()
            .all(|record| record["refused"] == "from_the_future"
                && record["remote_ip"] == "10.60.0.2"),
        "{kept:?}"
    );
    // The one us took comes out there.
    let records = wait_for_records(&us_output, 1);
    assert!(records.contains_key(&(1, 0, 1)), "{records:?}");
}
