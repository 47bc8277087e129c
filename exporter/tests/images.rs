//! The images `scripts/build-images` makes, run under a real Docker daemon (Debian's
//! `docker.io`) as the install guide runs them: the collector container with the shipped
//! seccomp profile, the exporter container on the host network with only the capabilities the
//! guide gives it, following the daemon. Two other containers talk over a bridge network; the
//! collector container's output must name both ends of their connection after the containers.
//! The same collector image under Docker's default seccomp profile stops with the one-line
//! io_uring message.
//!
//! The images are built from this test build's binaries (debug, stripped), not the release
//! ones: what is checked is the image's making and running, not the code's speed.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::docker::{DockerDaemon, import_busybox};
use support::{EXPORTER, Scratch, require_root};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const SUBNET: &str = "172.31.249";
const NETWORK: &str = "flowattr-images";

/// Builds the images into `out` from the debug binaries next to the exporter's.
fn build_images(out: &Path) -> (PathBuf, PathBuf) {
    let binaries = Path::new(EXPORTER).parent().unwrap();
    if !binaries.join("flowattr-collector").exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "flowattr-collector"])
            .current_dir(REPO)
            .status()
            .unwrap();
        assert!(status.success(), "building the collector");
    }
    let output = Command::new("python3")
        .arg(Path::new(REPO).join("scripts/build-images"))
        .arg("--binaries")
        .arg(binaries)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "build-images: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    let version = env!("CARGO_PKG_VERSION");
    (
        out.join(format!("flowattr-collector-{version}.oci.tar")),
        out.join(format!("flowattr-exporter-{version}.oci.tar")),
    )
}

/// The collector container's stdout: its JSON lines.
fn collector_records(daemon: &DockerDaemon) -> Vec<Value> {
    let output = daemon.docker(&["logs", "flowattr-collector"]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[test]
fn the_images_attribute_a_connection_between_two_containers_end_to_end() {
    require_root();
    let scratch = Scratch::new("images");
    let (collector_image, exporter_image) = build_images(&scratch.dir.path().join("images"));
    let daemon = DockerDaemon::start(&scratch.dir.path().join("docker"));
    for archive in [&collector_image, &exporter_image] {
        daemon.must(&["load", "-i", &archive.display().to_string()]);
    }
    let version = env!("CARGO_PKG_VERSION");
    let collector_tag = format!("flowattr-collector:{version}");
    let exporter_tag = format!("flowattr-exporter:{version}");
    let labels = daemon.must(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Labels}} {{.Config.User}}",
        &collector_tag,
    ]);
    assert!(
        labels.contains("\"org.opencontainers.image.version\":\"0.1.0\"")
            && labels.ends_with(" 65532:65532"),
        "{labels}"
    );

    // Under a profile that refuses io_uring, as Docker's and containerd's upstream defaults do
    // (the shipped profile less the three io_uring calls: Debian's docker.io 28.2.2 default
    // profile here lets them through), the collector stops at once and says why in one line.
    let shipped: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(REPO).join("deploy/seccomp/flowattr-collector.json"))
            .unwrap(),
    )
    .unwrap();
    let mut refusing = shipped.clone();
    let names = refusing["syscalls"][0]["names"].as_array_mut().unwrap();
    names.retain(|name| !name.as_str().unwrap().starts_with("io_uring"));
    let refusing_path = scratch.dir.path().join("no-io-uring.json");
    std::fs::write(&refusing_path, refusing.to_string()).unwrap();
    let refused = Command::new("timeout")
        .args([
            "60",
            "docker",
            "-H",
            &format!("unix://{}", daemon.socket().display()),
            "run",
            "--rm",
            "--network",
            "none",
        ])
        .args([
            "--security-opt",
            &format!("seccomp={}", refusing_path.display()),
            &collector_tag,
            "run",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("flowattr-collector: starting the collector: io_uring is refused here")
            && last.contains("deploy/seccomp/flowattr-collector.json"),
        "{stderr}"
    );
    assert_eq!(
        stderr
            .trim()
            .lines()
            .filter(|line| line.starts_with("flowattr-collector:"))
            .count(),
        1,
        "{stderr}"
    );

    // With the shipped profile it runs, on the host's network, as its own user.
    let ingest = support::unused_address();
    let seccomp = format!(
        "seccomp={}",
        Path::new(REPO)
            .join("deploy/seccomp/flowattr-collector.json")
            .display()
    );
    daemon.must(&[
        "run",
        "-d",
        "--name",
        "flowattr-collector",
        "--network",
        "host",
        "--security-opt",
        &seccomp,
        &collector_tag,
        "run",
        "--listen",
        &ingest.to_string(),
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        "/var/lib/flowattr-collector",
        "--delay",
        "2s",
        "--segment-span",
        "200ms",
        "--exporter-interval",
        "1s",
        "--retry-delay",
        "1s",
        "--max-retries",
        "1",
    ]);

    // The exporter, as docs/install.md runs it: BPF and PERFMON by name, or SYS_ADMIN where
    // the daemon does not know them (Debian 12's dockerd 20.10 refuses "CAP_BPF").
    let socket = daemon.socket();
    let pin_dir = "/sys/fs/bpf/flowattr-images-test";
    let _ = std::fs::remove_dir_all(pin_dir);
    let exporter_args = |caps: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            "flowattr-exporter",
            "--network",
            "host",
            "--pid",
            "host",
            "--cap-drop",
            "ALL",
        ]
        .map(str::to_owned)
        .to_vec();
        for cap in caps {
            args.extend(["--cap-add".to_owned(), (*cap).to_owned()]);
        }
        args.extend(
            [
                "-v",
                "/sys/fs/bpf:/sys/fs/bpf",
                "-v",
                "/sys/kernel/tracing:/sys/kernel/tracing",
                "-v",
                &format!("{}:/run/docker.sock", socket.display()),
                &exporter_tag,
                "run",
                "--collector",
                &ingest.to_string(),
                "--interval",
                "1s",
                "--runtime",
                "docker",
                "--runtime-socket",
                "/run/docker.sock",
                "--pin-dir",
                pin_dir,
                "--api-socket",
                "none",
            ]
            .map(|arg| arg.to_owned()),
        );
        args
    };
    let by_name = exporter_args(&["BPF", "PERFMON", "SYS_PTRACE"]);
    let started = daemon.docker(&by_name.iter().map(String::as_str).collect::<Vec<_>>());
    if !started.status.success() {
        let said = String::from_utf8_lossy(&started.stderr);
        assert!(said.contains("unknown capability"), "{said}");
        eprintln!(
            "this dockerd does not know CAP_BPF by name; the exporter gets SYS_ADMIN in place of BPF and PERFMON"
        );
        let _ = daemon.docker(&["rm", "-f", "flowattr-exporter"]);
        let fallback = exporter_args(&["SYS_ADMIN", "SYS_PTRACE"]);
        daemon.must(&fallback.iter().map(String::as_str).collect::<Vec<_>>());
    }

    // Two containers on a bridge: a web server and a client fetching from it.
    let image = import_busybox(&daemon, scratch.dir.path());
    daemon.must(&[
        "network",
        "create",
        "--subnet",
        &format!("{SUBNET}.0/24"),
        NETWORK,
    ]);
    let server_ip = format!("{SUBNET}.10");
    daemon.must(&[
        "run",
        "-d",
        "--name",
        "images-web",
        "--network",
        NETWORK,
        "--ip",
        &server_ip,
        image,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    // The exporter names containers it has seen start: give its watcher a moment.
    std::thread::sleep(Duration::from_secs(2));
    daemon.must(&[
        "run", "-d", "--name", "images-client", "--network", NETWORK, "--ip", &format!("{SUBNET}.11"), image,
        "sh", "-c", &format!("while true; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc {server_ip} 80 >/dev/null; sleep 0.5; done"),
    ]);

    let deadline = Instant::now() + Duration::from_secs(120);
    let named = loop {
        let records = collector_records(&daemon);
        let named: Vec<Value> = records
            .into_iter()
            .filter(|flow| flow["remote_port"] == 80 && flow["remote_ip"] == server_ip.as_str())
            .collect();
        if named.iter().any(|flow| {
            flow["local_workload"] == "images-client" && flow["remote_workload"] == "images-web"
        }) {
            break named;
        }
        if Instant::now() > deadline {
            let exporter = daemon.docker(&["logs", "flowattr-exporter"]);
            let collector = daemon.docker(&["logs", "flowattr-collector"]);
            // A collector that never said it was ready: was it running, did it exit, was it
            // killed (a CI run once saw only its first warning in 120 s)?
            let state = daemon.docker(&[
                "inspect",
                "-f",
                "{{.State.Status}} exit {{.State.ExitCode}} oom {{.State.OOMKilled}} {{.State.Error}}",
                "flowattr-collector",
            ]);
            panic!(
                "no flow named at both ends; flows to the server: {named:?}\nexporter: {}\ncollector ({}): {}",
                String::from_utf8_lossy(&exporter.stderr),
                String::from_utf8_lossy(&state.stdout).trim(),
                String::from_utf8_lossy(&collector.stderr)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    // Never named wrongly: each end is the container that held the address, or unnamed.
    for flow in &named {
        assert!(
            flow["local_workload"].is_null() || flow["local_workload"] == "images-client",
            "{flow}"
        );
        assert!(
            flow["remote_workload"].is_null() || flow["remote_workload"] == "images-web",
            "{flow}"
        );
    }
    let _ = std::fs::remove_dir_all(pin_dir);
}
