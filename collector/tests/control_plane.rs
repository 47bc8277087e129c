//! The control plane against clients that do not play along: one that asks and never reads
//! the answers, one that never finishes its request, one without the token. `/healthz` keeps
//! answering; a node bound beyond loopback without a token does not start.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::Collector;

/// One request with `headers`, on a connection of its own: (status, body), or None if no
/// answer came within `within`.
fn request(addr: SocketAddr, path: &str, headers: &str, within: Duration) -> Option<(u16, String)> {
    let (sender, answer) = mpsc::channel();
    let path = path.to_owned();
    let headers = headers.to_owned();
    std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let status = response
            .get(9..12)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        let _ = sender.send((status, body));
    });
    answer.recv_timeout(within).ok()
}

#[test]
fn healthz_answers_while_other_clients_hold_requests_and_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(
        &dir.path().join("flows.jsonl"),
        &["--cpus", "1", "--storage", "memory"],
    );
    // Thousands of requests for the metrics, pipelined, and not one byte of the answers read:
    // whatever serves them is stuck writing until the client goes or a deadline passes.
    let mut greedy = TcpStream::connect(collector.http).unwrap();
    greedy
        .write_all(&b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(5_000))
        .unwrap();
    // And a request never finished.
    let mut idle = TcpStream::connect(collector.http).unwrap();
    idle.write_all(b"GET /v1/deps HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(300));

    for _ in 0..5 {
        let started = Instant::now();
        let answer = request(collector.http, "/healthz", "", Duration::from_secs(5));
        assert_eq!(
            answer.map(|(status, _)| status),
            Some(200),
            "no /healthz within 5 s"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            request(collector.http, "/metrics", "", Duration::from_secs(5))
                .map(|(status, _)| status),
            Some(200)
        );
    }
    // The unfinished request is dropped at its deadline, and counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    while collector.metric("flowattr_http_rejections_total", Some("reason=\"timeout\"")) == 0 {
        assert!(
            Instant::now() < deadline,
            "the idle client was never timed out"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut rest = Vec::new();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(
        idle.read_to_end(&mut rest).unwrap(),
        0,
        "closed without an answer"
    );
    drop(greedy);
}

#[test]
fn with_a_bearer_token_every_endpoint_but_healthz_wants_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-t0ken\n").unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!("[http]\nbearer_token_file = \"{}\"\n", token.display()),
    )
    .unwrap();
    let collector = Collector::start(
        &dir.path().join("flows.jsonl"),
        &[
            "--cpus",
            "1",
            "--storage",
            "memory",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let within = Duration::from_secs(10);
    let status =
        |path: &str, headers: &str| request(collector.http, path, headers, within).unwrap().0;
    assert_eq!(status("/healthz", ""), 200);
    for path in ["/metrics", "/v1/deps", "/v1/history?ip=10.0.0.1"] {
        assert_eq!(status(path, ""), 401, "{path}");
        assert_eq!(
            status(path, "Authorization: Bearer s3cret-t0keN\r\n"),
            401,
            "{path}"
        );
        assert_eq!(
            status(path, "Authorization: s3cret-t0ken\r\n"),
            401,
            "{path}"
        );
        assert_eq!(
            status(path, "Authorization: Bearer s3cret-t0ken\r\n"),
            200,
            "{path}"
        );
    }
    let (_, metrics) = request(
        collector.http,
        "/metrics",
        "Authorization: Bearer s3cret-t0ken\r\n",
        within,
    )
    .unwrap();
    assert!(
        metrics.contains("flowattr_http_rejections_total{reason=\"unauthorized\"} 9"),
        "{metrics}"
    );
}

/// The collector with `config`, on loopback ingest and in-memory storage.
fn node_command(config: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowattr-collector"));
    command
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            "memory",
            "--cpus",
            "1",
            "--config",
        ])
        .arg(config);
    command
}

/// The one line a node that refuses to start prints (warnings aside).
fn start_error(config: &std::path::Path) -> String {
    let refused = node_command(config).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.contains(" WARN "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_owned()
}

#[test]
fn a_missing_settings_file_is_one_line_with_its_cause_said_once() {
    let error = start_error(std::path::Path::new("/nonexistent/flowattr.toml"));
    assert!(error.contains("/nonexistent/flowattr.toml"), "{error}");
    assert_eq!(
        error.matches("No such file or directory").count(),
        1,
        "{error}"
    );
}

#[test]
fn a_control_plane_beyond_loopback_needs_a_token_or_an_explicit_choice() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("open.toml");
    std::fs::write(&config, "[http]\nlisten = \"0.0.0.0:0\"\n").unwrap();
    let error = start_error(&config);
    assert!(
        error.contains("http.listen") && error.contains("bearer_token_file"),
        "{error}"
    );

    std::fs::write(
        &config,
        "[http]\nlisten = \"0.0.0.0:0\"\nallow_unauthenticated = true\n",
    )
    .unwrap();
    let mut command = node_command(&config);
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let open = Collector::start_command(command, &dir.path().join("flows.jsonl"));
    assert!(open.http.ip().is_unspecified(), "{}", open.http);
    let loopback = SocketAddr::from(([127, 0, 0, 1], open.http.port()));
    assert_eq!(
        request(loopback, "/metrics", "", Duration::from_secs(10))
            .unwrap()
            .0,
        200
    );

    // A token file that cannot be read is a one-line error too.
    std::fs::write(
        &config,
        "[http]\nbearer_token_file = \"/nonexistent/token\"\n",
    )
    .unwrap();
    let error = start_error(&config);
    assert!(
        error.contains("http.bearer_token_file /nonexistent/token"),
        "{error}"
    );
}

/// Every log line comes out in the chosen format, the libraries' own included: with
/// `--log-format json`, the node's lines and librdkafka's complaint about a Kafka sink's broker
/// that is not there (through the `log` crate, target `librdkafka`) are JSON objects, one a
/// line. The ready line is not a log: scripts wait for it as it is.
#[test]
fn log_lines_of_the_node_and_of_librdkafka_are_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let collector = Collector::start(
        &dir.path().join("flows.jsonl"),
        &[
            "--log-format",
            "json",
            "--sink",
            "kafka:127.0.0.1:1/flows",
            // Short enough to be warned about at start: a line of the node's own.
            "--delay",
            "1s",
            "--segment-span",
            "200ms",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    let line = collector.wait_for_log("\"target\":\"librdkafka\"");
    let event: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("{error}: {line}"));
    assert!(
        event["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("127.0.0.1:1")),
        "{event}"
    );
    assert!(
        event["level"].is_string() && event["timestamp"].is_string(),
        "{event}"
    );
    let node_line = collector.wait_for_log("does not exceed ingest.exporter_interval");
    assert!(
        serde_json::from_str::<serde_json::Value>(&node_line).is_ok(),
        "{node_line}"
    );
    for line in collector.log_lines() {
        assert!(
            line.starts_with("flowattr-collector ready:")
                || serde_json::from_str::<serde_json::Value>(&line).is_ok(),
            "not JSON: {line}"
        );
    }
}
