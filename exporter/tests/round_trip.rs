//! A real connection's round-trip time, as the kernel estimates it, from the eBPF program to the
//! collector's output, against what `ss -ti` reports for the same socket.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::slow_link::SlowLink;
use support::{Scratch, in_namespace, require_root};

/// Each way; the round trip is twice this, far above loopback's tens of microseconds.
const DELAY: Duration = Duration::from_millis(20);

/// `ss -tin` in namespace `name` for the established socket from `local`: its `rtt:S/D` in µs.
fn ss_round_trip(name: &str, local: SocketAddr) -> (f64, f64) {
    let output = Command::new("ip")
        .args(["netns", "exec", name, "ss", "-tinH", "state", "established"])
        .args(["src", &local.to_string()])
        .output()
        .expect("iproute2's ss");
    let text = String::from_utf8_lossy(&output.stdout);
    let rtt = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("rtt:"))
        .unwrap_or_else(|| panic!("no rtt in ss's answer for {local}: {text}"));
    let (smoothed, deviation) = rtt.split_once('/').expect("rtt:S/D");
    let ms = |text: &str| text.parse::<f64>().expect("milliseconds") * 1000.0;
    (ms(smoothed), ms(deviation))
}

fn rtt_of(flow: &Value) -> (f64, f64) {
    let field = |name: &str| {
        flow[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name}: {flow}")) as f64
    };
    (field("rtt_us"), field("rtt_deviation_us"))
}

/// Within a quarter of `expected`: the relay's scheduling on a busy machine adds jitter, and
/// the close's own round trips refine the estimate after `ss` read it.
fn assert_close(what: &str, got: f64, expected: f64) {
    assert!(
        (got - expected).abs() <= expected / 4.0,
        "{what}: {got} µs, ss said {expected} µs"
    );
}

#[test]
fn a_connections_round_trip_reaches_the_collector_as_ss_reports_it() {
    require_root();
    let scratch = Scratch::new("rtt");
    let link = SlowLink::new("rtt", 1, DELAY);
    scratch.register(&link.ips[0].to_string(), "client-app");
    scratch.register(&link.ips[1].to_string(), "server-app");
    let collector = scratch.start_collector("127.0.0.1:0".parse().unwrap());
    let _exporter = scratch.start_exporter(collector.ingest_addr);

    let listener = in_namespace(&link.names[1], || TcpListener::bind("0.0.0.0:0").unwrap());
    let server_addr = SocketAddr::from((link.ips[1], listener.local_addr().unwrap().port()));
    let echo = std::thread::spawn(move || {
        let (mut server, _) = listener.accept().unwrap();
        let mut message = [0; 100];
        while server.read_exact(&mut message).is_ok() {
            server.write_all(&message).unwrap();
        }
        server.local_addr().unwrap()
    });
    let mut client = in_namespace(&link.names[0], move || {
        TcpStream::connect_timeout(&server_addr, Duration::from_secs(5)).unwrap()
    });
    let client_addr = client.local_addr().unwrap();
    // Request and answer, again and again: every one a round trip sample on both sides.
    let exchange = |client: &mut TcpStream| {
        let mut message = [7; 100];
        for _ in 0..EXCHANGES {
            client.write_all(&message).unwrap();
            client.read_exact(&mut message).unwrap();
        }
    };
    exchange(&mut client);
    let (client_ss, _) = ss_round_trip(&link.names[0], client_addr);
    let ideal = 2.0 * DELAY.as_micros() as f64;
    assert_close("ss, client side, against the link", client_ss, ideal);

    // The link slows down while the connection is open: its reports from then on carry the
    // round trip the kernel estimates now, not the handshake's (a third of it).
    link.set_delay(3 * DELAY);
    exchange(&mut client);
    let (client_ss, _) = ss_round_trip(&link.names[0], client_addr);
    let (server_ss, _) = ss_round_trip(&link.names[1], server_addr);
    assert_close("ss, client side, slowed", client_ss, 3.0 * ideal);
    let slowed_at = wall_ns();
    let deadline = Instant::now() + Duration::from_secs(30);
    let open = loop {
        let open: Vec<Value> = client_reports(&scratch, client_addr.port())
            .into_iter()
            .filter(|flow| flow["state"] == "open" && flow["end_ns"].as_u64() > Some(slowed_at))
            .collect();
        if let Some(open) = open.first() {
            break open.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no open report of the connection after the link slowed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_close("open report", rtt_of(&open).0, client_ss);

    drop(client);
    let server_local = echo.join().unwrap();
    assert_eq!(server_local, server_addr);
    let closed = scratch.flows_with_port(server_addr.port(), 2);
    for flow in &closed {
        let expected = if flow["direction"] == "outbound" {
            assert_eq!(flow["local_port"], client_addr.port(), "{flow}");
            assert_eq!(flow["remote_workload"], "server-app", "{flow}");
            client_ss
        } else {
            assert_eq!(flow["remote_workload"], "client-app", "{flow}");
            server_ss
        };
        let (smoothed, deviation) = rtt_of(flow);
        assert_close(&format!("{} close", flow["direction"]), smoothed, expected);
        assert!(deviation < smoothed, "{flow}");
    }
    eprintln!(
        "ss: client {client_ss} µs, server {server_ss} µs; collector: {:?}",
        closed.iter().map(rtt_of).collect::<Vec<_>>()
    );

    // Each report counts what happened since the connection's previous one: the open reports
    // carry the bytes sent so far, and all of them with the close's add up to every byte
    // once (plus up to 2 for the SYN and FIN each way).
    let reports = client_reports(&scratch, client_addr.port());
    let sum = |field: &str| {
        reports
            .iter()
            .map(|flow| flow[field].as_u64().unwrap())
            .sum::<u64>()
    };
    let payload = 2 * EXCHANGES as u64 * 100;
    for field in ["bytes_sent", "bytes_received"] {
        assert!(
            (payload..=payload + 2).contains(&sum(field)),
            "{field}: {} over {} reports, {payload} sent: {reports:?}",
            sum(field),
            reports.len()
        );
    }
    let counted_open: u64 = reports
        .iter()
        .filter(|flow| flow["state"] == "open")
        .map(|flow| flow["bytes_sent"].as_u64().unwrap())
        .sum();
    // Every byte was acked before the open report the test waited for.
    assert!(
        counted_open >= payload,
        "open reports counted {counted_open} of {payload} bytes"
    );
}

/// Request-answer exchanges in each phase of the test.
const EXCHANGES: usize = 20;

/// The exporter's reports of the client's side of the connection (local port `port`).
fn client_reports(scratch: &Scratch, port: u16) -> Vec<Value> {
    scratch
        .records()
        .into_iter()
        .filter(|flow| flow["local_port"] == port && flow["direction"] == "outbound")
        .collect()
}

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
