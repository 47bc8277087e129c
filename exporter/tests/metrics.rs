//! What operators scrape: both binaries' `/metrics` after real traffic, put through Prometheus'
//! own linter (`promtool check metrics`, from Debian's prometheus package), and the Grafana
//! dashboard (deploy/grafana/flowattr.json) against what they export.

mod support;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn both_binaries_metrics_pass_promtool_after_real_traffic() {
    require_root();
    let scratch = Scratch::new("metrics");
    scratch.register("127.0.0.1", "metrics-svc");
    let collector = scratch.start_collector_with("127.0.0.1:0".parse().unwrap(), |config| {
        config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let exporter = scratch.start_exporter(collector.ingest_addr);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    talk(&listener, 5);
    scratch.flows_with_port(port, 10);

    // The series that only traffic brings: an exporter's clock, flows released (shards publish
    // their latency once a second).
    let scrape = || {
        http(
            std::net::TcpStream::connect(collector.http_addr.unwrap()).unwrap(),
            "GET",
            "/metrics",
        )
        .1
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut collector_text = scrape();
    while collector_text.contains("flowattr_release_extra_latency_seconds_count 0\n") {
        assert!(
            Instant::now() < deadline,
            "no release counted: {collector_text}"
        );
        std::thread::sleep(Duration::from_millis(100));
        collector_text = scrape();
    }
    assert!(
        collector_text.contains("flowattr_exporter_clock_offset_seconds{exporter="),
        "{collector_text}"
    );
    // When the exporter's latest batch arrived: within the last minute, as Unix time.
    let last_batch: f64 = collector_text
        .lines()
        .find_map(|line| line.strip_prefix("flowattr_exporter_last_batch_timestamp_seconds{"))
        .and_then(|rest| rest.rsplit(' ').next()?.parse().ok())
        .expect("the exporter's last batch time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 60.0..=now + 1.0).contains(&last_batch),
        "{last_batch} at {now}"
    );
    for (text, binary) in [
        (&collector_text, "flowattr-collector"),
        (
            &exporter.tcp_request("GET", "/metrics").1,
            "flowattr-exporter",
        ),
    ] {
        assert!(
            text.contains(&format!(
                "flowattr_build_info{{binary=\"{binary}\",version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        for series in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(
                text.contains(&format!("\n{series}")),
                "{binary}: no {series}in {text}"
            );
        }
    }
    assert_promtool_clean("the collector's", &collector_text);
    let (status, exporter_text) = exporter.tcp_request("GET", "/metrics");
    assert_eq!(status, 200);
    assert!(exporter.metric("flowattr_exporter_batches_acked_total") >= 1);
    assert_promtool_clean("the exporter's", &exporter_text);

    // The Grafana dashboard reads only series these two export (the region's broadcast series
    // need a cluster: collector/tests/cluster.rs checks those).
    use flowattr_bench::dashboard::{DASHBOARD, exports, expressions, series_names};
    for expression in expressions(DASHBOARD) {
        for name in series_names(&expression)
            .into_iter()
            .filter(|name| !name.starts_with("flowattr_broadcast_"))
        {
            assert!(
                exports(&collector_text, name) || exports(&exporter_text, name),
                "the dashboard's {expression:?} reads {name}, which neither binary exports"
            );
        }
    }
}
