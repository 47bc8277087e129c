//! `flowattr-exporter`: the per-host agent. `run` captures every TCP flow on this host with
//! eBPF, names its local workload and ships batches to the regional collector; `register` and
//! `unregister` maintain the local address -> workload maps the eBPF program consults.
mod agent;
mod batch;
mod counters;
mod identity_report;
mod local_api;
mod reported;
mod ship;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use flowattr_common::collector_address::CollectorAddresses;
use flowattr_common::tls::{CertificateNames, ClientTls, TlsFiles};
use flowattr_common::wire::ExporterId;
use flowattr_exporter::capture::DEFAULT_PIN_DIR;
use flowattr_exporter::config::{
    ConfigFile, DEFAULT_API_SOCKET, DEFAULT_STATE_DIR, WireCompression,
};
use flowattr_exporter::platform::cri;
use flowattr_exporter::platform::name_template::NameTemplate;
use flowattr_exporter::platform::{Runtime, WatcherSettings};
use flowattr_exporter::registration::{self, ExporterDirs, LocalAddress};

/// Captures TCP flows with eBPF on this host, attributes their local side to the owning
/// workload and ships them to the regional flowattr collector. Runs as root.
#[derive(Debug, Parser)]
#[command(name = "flowattr-exporter", version)]
struct Cli {
    /// How log lines are written: `text`, or `json` (one object a line).
    #[arg(long, global = true, env = flowattr_common::logging::FORMAT_VARIABLE, default_value = "text")]
    log_format: flowattr_common::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capture and ship flows until stopped (SIGINT/SIGTERM).
    Run(Box<RunFlags>),
    /// Map a local IP (or, with --port, an IPv4 address and port of a shared host address) to
    /// a workload. Takes effect at once for new connections, and survives exporter restarts.
    Register(RegisterFlags),
    /// Remove a mapping made by `register`. With --workload, only while the address is still
    /// that workload's (a late unregister of an old container never removes the new one's).
    /// Unregistering an address nobody holds succeeds: orchestrators retry.
    Unregister(UnregisterFlags),
}

/// Settings `run`, `register` and `unregister` share. Each is read from its flag, else its
/// environment variable, else the config file, else the default.
#[derive(Debug, Args)]
struct Common {
    /// Settings file (TOML; keys as the flags, with `_` for `-`) [default:
    /// /etc/flowattr/exporter.toml if present].
    #[arg(long, env = "FLOWATTR_EXPORTER_CONFIG")]
    config: Option<PathBuf>,
    /// Where the eBPF maps are pinned [default: /sys/fs/bpf/flowattr].
    #[arg(long, env = "FLOWATTR_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// Exporter state: workload names, the sequence counter, the spool [default:
    /// /var/lib/flowattr-exporter].
    #[arg(long, env = "FLOWATTR_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl Common {
    fn resolve(&self) -> anyhow::Result<(ExporterDirs, ConfigFile)> {
        let file = ConfigFile::load(self.config.as_deref())?;
        let dirs = ExporterDirs {
            pin_dir: pick(
                self.pin_dir.clone(),
                file.pin_dir.clone(),
                PathBuf::from(DEFAULT_PIN_DIR),
            ),
            state_dir: pick(
                self.state_dir.clone(),
                file.state_dir.clone(),
                PathBuf::from(DEFAULT_STATE_DIR),
            ),
        };
        Ok((dirs, file))
    }
}

/// The flag (or environment variable), else the file's key, else the default.
fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

#[derive(Debug, Args)]
struct RunFlags {
    #[command(flatten)]
    common: Common,
    /// The regional collector's ingest address, HOST:PORT (a DNS name, resolved again at every
    /// reconnect, or an IP), or several separated by commas to fail over between in order.
    /// Without it, flows are only captured (--dump).
    #[arg(long, env = "FLOWATTR_COLLECTOR")]
    collector: Option<CollectorAddresses>,
    /// How often a batch is cut and sent, e.g. 60s [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// This exporter's id [default: with TLS, the one its certificate gives it (which this must
    /// equal); without, a random id kept in the state directory].
    #[arg(long)]
    exporter_id: Option<u64>,
    /// [default: default]
    #[arg(long)]
    region: Option<String>,
    /// This host's name in every output record [default: the kernel's host name; on a
    /// Kubernetes node the DaemonSet passes the node's name].
    #[arg(long, env = "FLOWATTR_HOST_NAME")]
    host_name: Option<String>,
    /// A file holding the workload name of the whole host (reread every interval); flows whose
    /// local address is not registered are attributed to it.
    #[arg(long)]
    host_identity: Option<PathBuf>,
    /// Queued batches also kept in memory, so sending them needs no read (every batch is on
    /// disk) [default: 16].
    #[arg(long)]
    memory_batches: Option<usize>,
    /// Batches queued beyond the memory ones before the oldest are dropped (counted) [default: 1024].
    #[arg(long)]
    spool_batches: Option<usize>,
    /// How batches travel to the collector: zstd-compressed frames, or plain ones for
    /// collectors older than this release [default: zstd].
    #[arg(long, value_enum)]
    wire_compression: Option<WireCompression>,
    /// Print every captured flow as a JSON line.
    #[arg(long)]
    dump: bool,
    /// Stop after one interval (with --dump: print one interval's flows and exit).
    #[arg(long)]
    once: bool,
    /// The local API's Unix socket (register, unregister, metrics), or `none` [default:
    /// /run/flowattr-exporter.sock].
    #[arg(long, env = "FLOWATTR_API_SOCKET")]
    api_socket: Option<PathBuf>,
    /// A group whose members may use the local API socket besides root.
    #[arg(long)]
    api_group: Option<String>,
    /// Also serve GET /metrics and /healthz on this TCP address [default: off].
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Accept register/unregister on the TCP address too. Any local user can then rename any
    /// IP in the fleet's evidence: only for hosts where nothing but root runs.
    #[arg(long)]
    tcp_api: bool,
    /// Mutual TLS with the collector: the CA that signed its certificate (PEM). With
    /// --tls-cert and --tls-key; the collector then accepts this host's flows only for the IPs
    /// its certificate names (or that the collector's config grants it).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// This host's certificate chain (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The name the collector's certificate must carry [default: the collector's DNS name as
    /// given, or its IP address].
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Name local addresses from this host's container runtime: `docker`, or `cri` on a
    /// Kubernetes node [default: off; `[identity] runtime` in the file].
    #[arg(long, value_parser = str::parse::<Runtime>)]
    runtime: Option<Runtime>,
    /// The runtime's API socket [default: /var/run/docker.sock for docker,
    /// /run/containerd/containerd.sock for cri].
    #[arg(long)]
    runtime_socket: Option<PathBuf>,
    /// How a container's workload name is made (docs/exporter.md) [default:
    /// `{label:com.docker.compose.service|name}` for docker, `{namespace}/{owner}` for cri].
    #[arg(long)]
    name_template: Option<String>,
    /// With `cri`: a range the node's pods take addresses from; repeat for more [default: the
    /// ranges in the CNI configuration, /etc/cni/net.d].
    #[arg(long = "pod-cidr")]
    pod_cidrs: Vec<ipnet::IpNet>,
}

/// The runtime watcher's settings from the flags and `[identity]`; None if no runtime is named.
fn identity_settings(
    flags: &RunFlags,
    file: &ConfigFile,
) -> anyhow::Result<Option<WatcherSettings>> {
    let section = file.identity.clone().unwrap_or_default();
    let Some(runtime) = flags.runtime.or(section.runtime) else {
        if flags.runtime_socket.is_some()
            || flags.name_template.is_some()
            || !flags.pod_cidrs.is_empty()
        {
            bail!("--runtime-socket, --name-template and --pod-cidr need --runtime");
        }
        return Ok(None);
    };
    let template = flags.name_template.clone().or(section.name_template);
    let template = NameTemplate::parse(template.as_deref().unwrap_or(runtime.default_template()))?;
    let socket = pick(
        flags.runtime_socket.clone(),
        section.socket,
        PathBuf::from(runtime.default_socket()),
    );
    let mut pod_cidrs = if flags.pod_cidrs.is_empty() {
        section.pod_cidrs.unwrap_or_default()
    } else {
        flags.pod_cidrs.clone()
    };
    if runtime == Runtime::Cri && pod_cidrs.is_empty() {
        pod_cidrs = cri::pod_cidrs_from_cni(Path::new(cri::CNI_CONFIG_DIR));
        if pod_cidrs.is_empty() {
            bail!(
                "--runtime cri needs the node's pod address ranges, and {} names none: give them with --pod-cidr (or `pod_cidrs` in [identity]), e.g. the cluster's pod CIDR",
                cri::CNI_CONFIG_DIR
            );
        }
    }
    Ok(Some(WatcherSettings {
        runtime,
        socket,
        template,
        pod_cidrs,
    }))
}

#[derive(Debug, Args)]
struct AddressFlags {
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
    address: AddressFlags,
    #[arg(long)]
    workload: String,
}

#[derive(Debug, Args)]
struct UnregisterFlags {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    address: AddressFlags,
    /// Remove only if the address is still registered to this workload.
    #[arg(long)]
    workload: Option<String>,
}

/// The agent's id: under mutual TLS the one its certificate gives it (the collector takes its
/// batches under no other); otherwise the flag's, or the one kept in the state directory.
fn exporter_id(
    flag: Option<u64>,
    certified: Option<ExporterId>,
    state_dir: &Path,
) -> anyhow::Result<ExporterId> {
    match (flag, certified) {
        (Some(id), Some(certified)) if id != certified.0 => bail!(
            "exporter id {id} is not the id this host's TLS certificate gives it ({}): the collector takes batches only under that one; drop the exporter id setting",
            certified.0
        ),
        (_, Some(certified)) => return Ok(certified),
        (Some(id), None) => return Ok(ExporterId(id)),
        (None, None) => {}
    }
    let path = state_dir.join("exporter-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(ExporterId(
            text.trim()
                .parse()
                .with_context(|| format!("{} is not a number", path.display()))?,
        ));
    }
    std::fs::create_dir_all(state_dir)?;
    let id = fastrand::u64(..);
    std::fs::write(&path, format!("{id}\n"))?;
    Ok(ExporterId(id))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    flowattr_common::logging::init(cli.log_format);
    let command = cli.command;
    let result = (|| {
        // First, so a non-root user gets this error and not a stray permission error.
        flowattr_exporter::capture::check_root()?;
        match command {
            Command::Run(flags) => run(*flags),
            Command::Register(flags) => register(&flags),
            Command::Unregister(flags) => unregister(&flags),
        }
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "flowattr-exporter: {}",
                flowattr_common::error_line(error.chain())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn register(flags: &RegisterFlags) -> anyhow::Result<()> {
    let (dirs, _) = flags.common.resolve()?;
    let address = LocalAddress::new(flags.address.ip, flags.address.port)?;
    let id = registration::register(&dirs, address, &flags.workload)?;
    println!(
        "registered {address} as {} (id {})",
        flags.workload,
        id.get()
    );
    Ok(())
}

fn unregister(flags: &UnregisterFlags) -> anyhow::Result<()> {
    let (dirs, _) = flags.common.resolve()?;
    let address = LocalAddress::new(flags.address.ip, flags.address.port)?;
    let outcome = registration::unregister(&dirs, address, flags.workload.as_deref())?;
    println!("{}", outcome.describe(&address, flags.workload.as_deref()));
    Ok(())
}

/// The TLS files come three together or not at all: a half-configured agent would send in
/// plain text to a collector that expects TLS, and be refused forever. With them comes the
/// exporter id the certificate gives this host.
fn client_tls(
    flags: &RunFlags,
    file: &ConfigFile,
) -> anyhow::Result<Option<(ClientTls, ExporterId)>> {
    let ca = flags.tls_ca.clone().or(file.tls_ca.clone());
    let cert = flags.tls_cert.clone().or(file.tls_cert.clone());
    let key = flags.tls_key.clone().or(file.tls_key.clone());
    let server_name = flags
        .tls_server_name
        .clone()
        .or(file.tls_server_name.clone());
    match (ca, cert, key) {
        (None, None, None) if server_name.is_none() => Ok(None),
        (Some(ca), Some(cert), Some(key)) => {
            let identity = CertificateNames::of_file(&cert)?.identity();
            let files = TlsFiles { ca, cert, key };
            let tls = ClientTls::from_files(&files, server_name.as_deref())?;
            Ok(Some((tls, ExporterId::for_certificate(&identity))))
        }
        _ => bail!(
            "--tls-ca, --tls-cert and --tls-key go together (and --tls-server-name needs them)"
        ),
    }
}

/// The host name batches carry: as given, or the kernel's.
fn host_name(given: Option<String>) -> anyhow::Result<String> {
    let name = match given {
        Some(name) => name,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name from /proc/sys/kernel/hostname (or give --host-name)")?
            .trim()
            .to_owned(),
    };
    flowattr_common::check_identifier(&name, flowattr_common::wire::HOST_NAME_BYTES_MAX)
        .map_err(|problem| anyhow::anyhow!("host name {name:?} {problem}"))?;
    Ok(name)
}

fn run(flags: RunFlags) -> anyhow::Result<()> {
    let (dirs, file) = flags.common.resolve()?;
    let interval = pick(flags.interval, file.interval, Duration::from_secs(60));
    if interval.is_zero() || interval > Duration::from_secs(24 * 3600) {
        // A day is already far past any collector's retention: the bound only keeps the
        // agent's clock arithmetic (next cut = now + interval) from overflowing.
        bail!("--interval must be more than zero and at most 24h");
    }
    let collector = flags.collector.clone().or(file.collector.clone());
    if collector.is_none() && !flags.dump {
        bail!("give --collector HOST:PORT, or --dump to only print flows");
    }
    let (tls, certified) = client_tls(&flags, &file)?.unzip();
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // The agent stops at its next poll and persists its queue.
        signal_hook::flag::register(signal, stop.clone())
            .with_context(|| format!("handling signal {signal}"))?;
    }
    let config = agent::AgentConfig {
        collector,
        tls,
        interval,
        exporter: exporter_id(
            flags.exporter_id.or(file.exporter_id),
            certified,
            &dirs.state_dir,
        )?,
        region: pick(flags.region.clone(), file.region.clone(), "default".into()),
        host_name: host_name(flags.host_name.clone().or(file.host_name.clone()))?,
        host_identity: flags.host_identity.clone().or(file.host_identity.clone()),
        state_dir: dirs.state_dir.clone(),
        pin_dir: dirs.pin_dir.clone(),
        memory_batches: pick(flags.memory_batches, file.memory_batches, 16),
        spool_batches: pick(flags.spool_batches, file.spool_batches, 1024),
        wire_compression: flags
            .wire_compression
            .or(file.wire_compression)
            .unwrap_or_default(),
        dump: flags.dump,
        once: flags.once,
        identity: identity_settings(&flags, &file)?,
    };
    let counters = Arc::new(agent::AgentCounters::default());
    let socket = pick(
        flags.api_socket.clone(),
        file.api_socket.clone(),
        PathBuf::from(DEFAULT_API_SOCKET),
    );
    let api = Arc::new(local_api::LocalApi::new(
        dirs,
        counters.clone(),
        socket.clone(),
    ));
    if socket != Path::new("none") {
        local_api::serve_unix(
            api.clone(),
            flags.api_group.as_deref().or(file.api_group.as_deref()),
        )?;
        tracing::info!("local API on unix:{}", socket.display());
    }
    if let Some(addr) = flags.http_listen.or(file.http_listen) {
        let changes = flags.tcp_api || file.tcp_api.unwrap_or(false);
        let bound = local_api::serve_tcp(api, addr, changes)?;
        tracing::info!("metrics on http://{bound}");
    }
    let result = agent::run(config, stop, counters.clone());
    if socket != Path::new("none") {
        let _ = std::fs::remove_file(&socket);
    }
    result?;
    tracing::info!(
        "stopped; {} flows captured ({} with no known local workload, {} closed before their handshake), {} batches acked, {} send failures",
        counters.flows_captured.load(Ordering::Relaxed),
        counters.flows_unknown_workload.load(Ordering::Relaxed),
        counters.flows_incomplete.load(Ordering::Relaxed),
        counters.batches_acked.load(Ordering::Relaxed),
        counters.send_failures.load(Ordering::Relaxed),
    );
    Ok(())
}
