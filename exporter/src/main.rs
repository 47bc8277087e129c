//! `flowattr-exporter`: the per-host agent. `run` captures every TCP flow on this host with
//! eBPF, names its local workload and ships batches to the regional collector; `register` and
//! `unregister` maintain the local address -> workload maps the eBPF program consults.
mod agent;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use flowattr_common::CanonicalIp;
use flowattr_common::kernel::SharedKey;
use flowattr_common::wire::ExporterId;
use flowattr_exporter::capture::{DEFAULT_PIN_DIR, WorkloadMaps};
use flowattr_exporter::registry::WorkloadNames;

/// Captures TCP flows with eBPF on this host, attributes their local side to the owning
/// workload and ships them to the regional flowattr collector. Runs as root.
#[derive(Debug, Parser)]
#[command(name = "flowattr-exporter", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capture and ship flows until stopped (SIGINT/SIGTERM).
    Run(RunFlags),
    /// Map a local IP (or, with --port, an IPv4 address and port of a shared host address) to
    /// a workload. Takes effect at once for new connections, and survives exporter restarts.
    Register(RegisterFlags),
    /// Remove a mapping made by `register`.
    Unregister(UnregisterFlags),
}

#[derive(Debug, Args)]
struct Common {
    /// Where the eBPF maps are pinned.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Exporter state: workload names, the sequence counter, the spool.
    #[arg(long, default_value = "/var/lib/flowattr-exporter")]
    state_dir: PathBuf,
}

#[derive(Debug, Args)]
struct RunFlags {
    #[command(flatten)]
    common: Common,
    /// The regional collector's ingest address. Without it, flows are only captured (--dump).
    #[arg(long)]
    collector: Option<SocketAddr>,
    /// How often a batch is cut and sent, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// This exporter's id [default: a random id kept in the state directory].
    #[arg(long)]
    exporter_id: Option<u64>,
    #[arg(long, default_value = "default")]
    region: String,
    /// A file holding the workload name of the whole host (reread every interval); flows whose
    /// local address is not registered are attributed to it.
    #[arg(long)]
    host_identity: Option<PathBuf>,
    /// Batches queued in memory before spilling to disk.
    #[arg(long, default_value_t = 16)]
    memory_batches: usize,
    /// Batches spilled to disk before the oldest are dropped (counted).
    #[arg(long, default_value_t = 1024)]
    spool_batches: usize,
    /// Print every captured flow as a JSON line.
    #[arg(long)]
    dump: bool,
    /// Stop after one interval (with --dump: print one interval's flows and exit).
    #[arg(long)]
    once: bool,
    /// Local API and metrics: GET /metrics, POST /v1/register?ip=&workload=[&port=],
    /// POST /v1/unregister?ip=[&port=]; `none` turns it off.
    #[arg(long, default_value = "127.0.0.1:7402")]
    http_listen: String,
}

/// A local address a workload owns.
#[derive(Debug, Args)]
struct Address {
    #[arg(long)]
    ip: IpAddr,
    /// For a shared (NAT64-style) IPv4 host address: the local port the workload owns.
    #[arg(long)]
    port: Option<u16>,
}

#[derive(Debug, Args)]
struct RegisterFlags {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    address: Address,
    #[arg(long)]
    workload: String,
}

#[derive(Debug, Args)]
struct UnregisterFlags {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    address: Address,
}

fn shared_key(ip: IpAddr, port: u16) -> anyhow::Result<SharedKey> {
    let ip: Ipv4Addr = match ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => ip
            .to_ipv4_mapped()
            .context("--port is for shared IPv4 host addresses")?,
    };
    Ok(SharedKey {
        ip: ip.octets(),
        port,
        _pad: 0,
    })
}

fn exporter_id(flags: &RunFlags) -> anyhow::Result<ExporterId> {
    if let Some(id) = flags.exporter_id {
        return Ok(ExporterId(id));
    }
    let path = flags.common.state_dir.join("exporter-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(ExporterId(text.trim().parse().with_context(|| format!("{} is not a number", path.display()))?));
    }
    std::fs::create_dir_all(&flags.common.state_dir)?;
    let id = fastrand::u64(..);
    std::fs::write(&path, format!("{id}\n"))?;
    Ok(ExporterId(id))
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    // First, so a non-root user gets this error and not a stray permission error.
    flowattr_exporter::capture::check_root()?;
    match command {
        Command::Run(flags) => run(flags),
        Command::Register(flags) => register(&flags.common, &flags.address, &flags.workload),
        Command::Unregister(flags) => unregister(&flags.common, &flags.address),
    }
}

fn register(common: &Common, address: &Address, workload: &str) -> anyhow::Result<()> {
    let mut names = WorkloadNames::load(&common.state_dir)?;
    let id = names.id_for(&common.state_dir, workload)?;
    let mut maps = WorkloadMaps::open(&common.pin_dir)?;
    match address.port {
        Some(port) => maps.set_shared(shared_key(address.ip, port)?, id)?,
        None => maps.set_ip(CanonicalIp::from(address.ip), id)?,
    }
    Ok(())
}

fn unregister(common: &Common, address: &Address) -> anyhow::Result<()> {
    let mut maps = WorkloadMaps::open(&common.pin_dir)?;
    let removed = match address.port {
        Some(port) => maps.remove_shared(shared_key(address.ip, port)?)?,
        None => maps.remove_ip(CanonicalIp::from(address.ip))?,
    };
    if !removed {
        bail!("{} was not registered", address.ip);
    }
    Ok(())
}

/// The local API on its own thread: the container runtime registers and unregisters
/// addresses as containers start and stop; Prometheus scrapes `/metrics`.
fn serve_http(addr: SocketAddr, common: Common, counters: Arc<agent::AgentCounters>) -> anyhow::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(|error| anyhow::anyhow!("listening on {addr}: {error}"))?;
    let bound = server.server_addr().to_ip().context("an IP listener")?;
    std::thread::Builder::new().name("flowattr-exporter-http".into()).spawn(move || {
        for request in server.incoming_requests() {
            let url = request.url().to_owned();
            let (path, query) = url.split_once('?').unwrap_or((&url, ""));
            let param = |name: &str| {
                query
                    .split('&')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.replace("%3A", ":").replace("%3a", ":"))
            };
            let post = *request.method() == tiny_http::Method::Post;
            let result: anyhow::Result<String> = match (path, post) {
                ("/metrics", false) => Ok(counters.render()),
                ("/healthz", false) => Ok("ok\n".into()),
                ("/v1/register", true) | ("/v1/unregister", true) => (|| {
                    let address = Address {
                        ip: param("ip").context("missing ip")?.parse().context("ip")?,
                        port: param("port").map(|port| port.parse::<u16>()).transpose().context("port")?,
                    };
                    if path == "/v1/register" {
                        register(&common, &address, &param("workload").context("missing workload")?)?;
                    } else {
                        unregister(&common, &address)?;
                    }
                    Ok("ok\n".to_owned())
                })(),
                _ => Err(anyhow::anyhow!("no such endpoint: {} {path}", request.method())),
            };
            let response = match result {
                Ok(body) => tiny_http::Response::from_string(body),
                Err(error) => tiny_http::Response::from_string(format!("{error:#}\n")).with_status_code(400),
            };
            let _ = request.respond(response);
        }
    })?;
    Ok(bound)
}

fn run(flags: RunFlags) -> anyhow::Result<()> {
    if flags.interval.is_zero() {
        bail!("--interval must be more than zero");
    }
    if flags.collector.is_none() && !flags.dump {
        bail!("give --collector ADDR, or --dump to only print flows");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        signal_flag(signal, stop.clone());
    }
    let config = agent::AgentConfig {
        collector: flags.collector,
        interval: flags.interval,
        exporter: exporter_id(&flags)?,
        region: flags.region.clone(),
        host_identity: flags.host_identity.clone(),
        state_dir: flags.common.state_dir.clone(),
        pin_dir: flags.common.pin_dir.clone(),
        memory_batches: flags.memory_batches,
        spool_batches: flags.spool_batches,
        dump: flags.dump,
        once: flags.once,
    };
    let counters = Arc::new(agent::AgentCounters::default());
    if flags.http_listen != "none" {
        let addr: SocketAddr = flags.http_listen.parse().context("--http-listen")?;
        let common = Common {
            pin_dir: flags.common.pin_dir.clone(),
            state_dir: flags.common.state_dir.clone(),
        };
        let bound = serve_http(addr, common, counters.clone())?;
        eprintln!("flowattr-exporter: local API and metrics on http://{bound}");
    }
    agent::run(config, stop, counters.clone())?;
    eprintln!(
        "flowattr-exporter: stopped; {} flows captured ({} with no known local workload, {} closed before their handshake), {} batches acked, {} send failures",
        counters.flows_captured.load(Ordering::Relaxed),
        counters.flows_unknown_workload.load(Ordering::Relaxed),
        counters.flows_incomplete.load(Ordering::Relaxed),
        counters.batches_acked.load(Ordering::Relaxed),
        counters.send_failures.load(Ordering::Relaxed),
    );
    Ok(())
}

/// Sets `flag` when `signal` arrives, so the agent stops at its next poll and persists its
/// queue.
fn signal_flag(signal: libc::c_int, flag: Arc<AtomicBool>) {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn handler(_: libc::c_int) {
        if let Some(flag) = FLAG.get() {
            flag.store(true, Ordering::Relaxed);
        }
    }
    // SAFETY: the handler only does an atomic store, which is async-signal-safe.
    unsafe { libc::signal(signal, handler as *const () as libc::sighandler_t) };
}
