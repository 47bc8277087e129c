//! What the exporter's tests share: a scratch pin and state directory, the exporter run as a
//! process, a collector node to ship to, network namespaces, and ways to make connections.
//! Each test crate uses a part of it.
#![allow(dead_code)]

pub mod docker;
pub mod holdings;
pub mod service;
pub mod slow_link;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowattr_collector::config::{Config, SinkConfig, StorageKind};
use flowattr_collector::node::Node;
use serde_json::Value;

pub const EXPORTER: &str = env!("CARGO_BIN_EXE_flowattr-exporter");

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the exporter tests need root (CI runs as root)"
    );
}

pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub pin_dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/flowattr-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        Scratch {
            dir: tempfile::tempdir().unwrap(),
            pin_dir,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn output(&self) -> PathBuf {
        self.dir.path().join("flows.jsonl")
    }

    /// Lets every user reach (not write) the scratch directory, so a test acting as another
    /// user meets only the permissions of what it holds, not those of a private directory.
    pub fn open_to_all_users(&self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub fn api_socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    pub fn common_args(&self) -> Vec<String> {
        vec![
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
        ]
    }

    pub fn register(&self, ip: &str, workload: &str) {
        let status = Command::new(EXPORTER)
            .arg("register")
            .args(self.common_args())
            .args(["--ip", ip, "--workload", workload])
            .status()
            .unwrap();
        assert!(status.success(), "register {ip} {workload}");
    }

    pub fn start_collector(&self, listen: SocketAddr) -> Node {
        self.start_collector_with(listen, |_| {})
    }

    /// A collector node in this process with the tests' quick settings, then `adjust`.
    pub fn start_collector_with(
        &self,
        listen: SocketAddr,
        adjust: impl FnOnce(&mut Config),
    ) -> Node {
        let mut config = Config::default();
        config.node.cpus = 1;
        config.ingest.listen = listen;
        config.http.listen = None;
        config.delay.storage = StorageKind::Memory;
        config.delay.delay = Duration::from_secs(2);
        config.delay.segment_span = Duration::from_millis(200);
        config.delay.retry_delay = Duration::from_secs(2);
        config.delay.max_retries = 1;
        config.sinks = vec![SinkConfig::File {
            path: self.output(),
        }];
        adjust(&mut config);
        Node::start(config).expect("the collector starts")
    }

    pub fn start_exporter(&self, collector: SocketAddr) -> Exporter {
        self.start_exporter_with(collector, &[])
    }

    pub fn start_exporter_with(&self, collector: SocketAddr, extra: &[&str]) -> Exporter {
        self.spawn_exporter(Command::new(EXPORTER), collector, extra)
    }

    /// The exporter shipping to `collectors` as `--collector` takes them (names, a list).
    pub fn start_exporter_to(&self, collectors: &str) -> Exporter {
        self.spawn_exporter(Command::new(EXPORTER), collectors, &[])
    }

    /// Makes `command` (the exporter itself, or a wrapper such as `faketime` that runs it) run
    /// the agent with the tests' settings, shipping to `collector`, its stderr piped.
    pub fn exporter_command<'a>(
        &self,
        command: &'a mut Command,
        collector: impl std::fmt::Display,
        extra: &[&str],
    ) -> &'a mut Command {
        command
            .arg("run")
            .args(self.common_args())
            .args(["--collector", &collector.to_string(), "--interval", "1s"])
            .args(extra)
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--api-socket")
            .arg(self.api_socket())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
    }

    /// Runs the exporter through `command` (see [`Scratch::exporter_command`]) and waits for its
    /// ready line.
    pub fn spawn_exporter(
        &self,
        mut command: Command,
        collector: impl std::fmt::Display,
        extra: &[&str],
    ) -> Exporter {
        let mut child = self
            .exporter_command(&mut command, collector, extra)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut api = None;
        loop {
            let line = lines
                .next()
                .expect("the exporter printed its ready line")
                .unwrap();
            if line.starts_with("flowattr-exporter ready:") {
                break;
            }
            // A log line: "... flowattr_exporter: metrics on http://ADDR".
            if let Some((_, addr)) = line.split_once("metrics on http://") {
                api = Some(addr.trim().parse().unwrap());
            }
            eprintln!("exporter: {line}");
        }
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("exporter: {line}");
            }
        });
        Exporter {
            child,
            metrics: api.expect("the exporter announced its metrics address"),
            socket: self.api_socket(),
        }
    }

    /// The collector's output records so far: the complete lines only, as the collector may
    /// be writing the next one while this reads.
    pub fn records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.output()).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
        complete
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .collect()
    }

    /// Output records of flows with `port` at either end, waiting until there are `n`.
    pub fn flows_with_port(&self, port: u16, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found: Vec<Value> = self
                .records()
                .into_iter()
                .filter(|flow| flow["local_port"] == port || flow["remote_port"] == port)
                .filter(|flow| flow["state"] == "closed")
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} flows on port {port} arrived",
                found.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

pub struct Exporter {
    pub child: Child,
    /// Metrics over TCP.
    pub metrics: SocketAddr,
    /// The local API.
    pub socket: PathBuf,
}

/// One HTTP/1.1 request on `stream`: (status, body).
pub fn http(mut stream: impl Read + Write, method: &str, path: &str) -> (u16, String) {
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

impl Exporter {
    /// A request to the local API on its Unix socket.
    pub fn request(&self, method: &str, path: &str) -> (u16, String) {
        http(UnixStream::connect(&self.socket).unwrap(), method, path)
    }

    /// A request to the metrics listener on TCP.
    pub fn tcp_request(&self, method: &str, path: &str) -> (u16, String) {
        http(TcpStream::connect(self.metrics).unwrap(), method, path)
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.metric_value(name) as u64
    }

    pub fn metric_value(&self, name: &str) -> f64 {
        let (_, text) = self.tcp_request("GET", "/metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// Waits up to 60 s (generous for a slow, busy machine) for `name` to reach `at_least`.
    pub fn wait_for_metric(&self, name: &str, at_least: f64) -> f64 {
        self.wait_for_metric_where(name, &format!("at least {at_least}"), |value| {
            value >= at_least
        })
    }

    /// Waits until the runtime watcher has found `runtime` away. A runtime that goes and comes
    /// back between two of the watcher's polls is never seen away, and needs no catching up (each
    /// listing is whole); a test of the catching up waits for this before starting it again.
    pub fn wait_until_runtime_seen_away(&self, runtime: &str) {
        self.wait_for_metric_where(
            &format!("flowattr_exporter_identity_runtime_up{{runtime=\"{runtime}\"}}"),
            "0",
            |up| up == 0.0,
        );
    }

    /// Waits up to 60 s for `name` to take a value `wanted` accepts (`what` says which).
    pub fn wait_for_metric_where(
        &self,
        name: &str,
        what: &str,
        wanted: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, text) = self.tcp_request("GET", "/metrics");
            let value = text.lines().find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            });
            match value {
                Some(value) if wanted(value) => return value,
                _ => assert!(
                    Instant::now() < deadline,
                    "{name} never reached {what}: {text}"
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Exporter {
    /// SIGTERM, as a service manager stops it: it must exit cleanly, keeping its queue.
    pub fn stop(mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped (Drop reaps it).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the exporter stopped with {status}");
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `count` connections to `server`: each sends 1000 bytes and receives 500.
/// Panics with what `promtool check metrics` says of `text`, `whose` metrics, unless
/// Prometheus' naming and format conventions hold.
pub fn assert_promtool_clean(whose: &str, text: &str) {
    if let Err(said) = flowattr_bench::dashboard::check_metrics(text) {
        panic!("promtool on {whose} metrics: {said}");
    }
}

pub fn talk(listener: &TcpListener, count: usize) -> Vec<u16> {
    let address = listener.local_addr().unwrap();
    let mut client_ports = Vec::new();
    for _ in 0..count {
        let mut client = TcpStream::connect(address).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client_ports.push(client.local_addr().unwrap().port());
        client.write_all(&[1; 1000]).unwrap();
        let mut got = [0; 1000];
        server.read_exact(&mut got).unwrap();
        server.write_all(&[2; 500]).unwrap();
        let mut got = [0; 500];
        client.read_exact(&mut got).unwrap();
    }
    client_ports
}

/// A pair of network namespaces joined by a veth pair, removed on drop.
pub struct NetnsPair {
    pub names: [String; 2],
    pub ips: [Ipv4Addr; 2],
}

pub fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("iproute2's ip");
    assert!(status.success(), "ip {args:?}");
}

impl NetnsPair {
    pub fn new(tag: &str, subnet: u8) -> NetnsPair {
        let names = [format!("fa-{tag}-a"), format!("fa-{tag}-b")];
        for name in &names {
            fresh_namespace(name);
        }
        let ips = [
            Ipv4Addr::new(10, 231, subnet, 1),
            Ipv4Addr::new(10, 231, subnet, 2),
        ];
        let (veth_a, veth_b) = (format!("fa{tag}a"), format!("fa{tag}b"));
        ip(&[
            "link", "add", &veth_a, "netns", &names[0], "type", "veth", "peer", "name", &veth_b,
            "netns", &names[1],
        ]);
        for (side, veth) in [(0, &veth_a), (1, &veth_b)] {
            ip(&[
                "-n",
                &names[side],
                "addr",
                "add",
                &format!("{}/24", ips[side]),
                "dev",
                veth,
            ]);
            ip(&["-n", &names[side], "link", "set", veth, "up"]);
        }
        NetnsPair { names, ips }
    }

    /// Runs `work` on a thread that has entered namespace `side`.
    pub fn run<T: Send + 'static>(
        &self,
        side: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        in_namespace(&self.names[side], work)
    }

    /// `count` connections from side 0 to side 1 on `port`.
    pub fn talk(&self, port: u16, count: usize) -> Vec<u16> {
        let server_addr = SocketAddr::from((self.ips[1], port));
        let listener = self.run(1, move || TcpListener::bind(server_addr).unwrap());
        // The listener stays in side 1's namespace; the client thread enters side 0.
        let accept = std::thread::spawn(move || {
            for _ in 0..count {
                let (mut server, _) = listener.accept().unwrap();
                let mut got = [0; 1000];
                server.read_exact(&mut got).unwrap();
                server.write_all(&[2; 500]).unwrap();
                let mut rest = Vec::new();
                let _ = server.read_to_end(&mut rest);
            }
        });
        let ports = self.run(0, move || {
            (0..count)
                .map(|_| {
                    let mut client =
                        TcpStream::connect_timeout(&server_addr, Duration::from_secs(5)).unwrap();
                    client.write_all(&[1; 1000]).unwrap();
                    let mut got = [0; 500];
                    client.read_exact(&mut got).unwrap();
                    client.local_addr().unwrap().port()
                })
                .collect()
        });
        accept.join().unwrap();
        ports
    }
}

/// Runs `work` on a thread that has entered network namespace `name` (sockets it makes stay
/// there, wherever they are used from).
pub fn in_namespace<T: Send + 'static>(name: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        work()
    })
    .join()
    .unwrap()
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        delete_namespaces(&self.names);
    }
}

/// Network namespace `name`, new (one left over from an interrupted run is replaced), with its
/// loopback up.
pub fn fresh_namespace(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
    ip(&["netns", "add", name]);
    ip(&["-n", name, "link", "set", "lo", "up"]);
}

pub fn delete_namespaces(names: &[String]) {
    for name in names {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}

pub fn by_direction(flows: &[Value]) -> HashMap<String, Vec<&Value>> {
    let mut grouped: HashMap<String, Vec<&Value>> = HashMap::new();
    for flow in flows {
        grouped
            .entry(flow["direction"].as_str().unwrap().to_owned())
            .or_default()
            .push(flow);
    }
    grouped
}

/// A loopback address nobody listens on yet: where a collector will start later.
pub fn unused_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A connection from `local` (a loopback address) to a fresh listener on 127.0.0.1: the
/// listener's port.
pub fn talk_from(local: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    connect_from(local, &listener);
    listener.local_addr().unwrap().port()
}

/// One connection from `local` (a loopback address) to `listener`, a ping sent through it,
/// then closed at both ends.
pub fn connect_from(local: Ipv4Addr, listener: &TcpListener) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((local, 0)).into()).unwrap();
    socket
        .connect(&listener.local_addr().unwrap().into())
        .unwrap();
    let mut client: TcpStream = socket.into();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut got = [0; 4];
    server.read_exact(&mut got).unwrap();
}

/// The outbound flow on `port` (the client's report, whose local side is the bound address).
pub fn client_flow(scratch: &Scratch, port: u16) -> Value {
    let flows = scratch.flows_with_port(port, 2);
    flows
        .into_iter()
        .find(|flow| flow["direction"] == "outbound")
        .expect("the client's report")
}

/// A container's root file system at `root`: one static busybox (Debian's busybox-static) as
/// the tools the tests' containers and pods run, and a page for its httpd.
pub fn busybox_rootfs(root: &Path) {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("busybox-static is installed");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for tool in ["sh", "httpd", "nc", "printf", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    std::fs::write(root.join("www/index.html"), "hello\n").unwrap();
}
