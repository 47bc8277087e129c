//! Loading the eBPF program with this kernel's layout, attaching it, and reading what it sees:
//! closed flows from the ring buffer, open sockets from their map (refreshed first by the
//! second program), lost events from their counter. The workload maps are pinned under bpffs,
//! so registrations outlive the agent.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::{RawTracePoint, RawTracePointRunOptions, TestRun, TracePoint};
use aya::{Ebpf, EbpfLoader};
use flowattr_common::kernel::{CHECKED_GONE, FlowEvent, OpenSocket, SharedKey};
use flowattr_common::{CanonicalIp, WorkloadId};

use crate::layout::{Discovered, LayoutError};
use crate::{EBPF_OBJECT, MountError, TRACEPOINT, ensure_kernel_filesystems};

/// The program that refreshes open sockets in place; run by the agent, never attached.
const REFRESH_PROGRAM: &str = "refresh_open_sockets";

/// Where the workload maps are pinned by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flowattr";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the exporter must run as root (it loads an eBPF program and pins maps)")]
    NotRoot,
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(
        "this kernel's layout: {0} (the exporter needs a kernel with BTF, /sys/kernel/btf/vmlinux)"
    )]
    Layout(#[from] LayoutError),
    #[error("creating the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the pin directory {path} is on {filesystem}, not on a bpf filesystem, so the workload maps cannot be pinned there: use a directory under /sys/fs/bpf (the default, {DEFAULT_PIN_DIR}), or mount one with `mount -t bpf bpf {path}`"
    )]
    PinDirNotBpf { path: PathBuf, filesystem: String },
    #[error(
        "the exporter runs without {0}, which loading and attaching its eBPF program needs: give it CAP_BPF and CAP_PERFMON (in a container: --cap-add BPF --cap-add PERFMON, or --cap-add SYS_ADMIN where the runtime does not know those two; deploy/systemd/flowattr-exporter.service keeps both)"
    )]
    MissingCapabilities(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("loading or attaching the program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

/// Fails with [`CaptureError::NotRoot`] unless this process runs as root, and with
/// [`CaptureError::MissingCapabilities`] when root's capabilities were bounded without the two
/// the program needs (a container, a systemd unit): said before the kernel's bare EPERM.
pub fn check_root() -> Result<(), CaptureError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(CaptureError::NotRoot);
    }
    // The kernel takes CAP_SYS_ADMIN for either (what older container runtimes, which do not
    // know the two by name, can give).
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| u64::from_str_radix(line.strip_prefix("CapEff:")?.trim(), 16).ok());
    // Unreadable: let the kernel decide.
    let Some(effective) = effective else {
        return Ok(());
    };
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0 && effective & (1 << CAP_SYS_ADMIN) == 0)
        .map(|(_, name)| name)
        .collect();
    if !missing.is_empty() {
        return Err(CaptureError::MissingCapabilities(missing.join(" and ")));
    }
    Ok(())
}

/// Loads the object with this kernel's layout and the workload maps pinned in `pin_dir`.
/// Mounts tracefs first: the layout is read from the tracepoint's format, and on a fresh boot
/// `register` may run before any agent has mounted it.
fn load(pin_dir: &Path) -> Result<(Ebpf, Discovered), CaptureError> {
    check_root()?;
    ensure_kernel_filesystems()?;
    let discovered = crate::layout::discover()?;
    std::fs::create_dir_all(pin_dir).map_err(|source| CaptureError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    match crate::filesystem_of(pin_dir) {
        Some(filesystem) if filesystem != "bpf" => {
            return Err(CaptureError::PinDirNotBpf {
                path: pin_dir.to_owned(),
                filesystem,
            });
        }
        _ => {}
    }
    let ebpf = EbpfLoader::new()
        .override_global("LAYOUT", &discovered.layout, true)
        .default_map_pin_directory(pin_dir)
        .load(EBPF_OBJECT)?;
    Ok((ebpf, discovered))
}

/// The kernel's counters of the attached program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgramStats {
    /// Runs and total run time, when the kernel keeps them (`sysctl
    /// kernel.bpf_stats_enabled=1`; both read 0 otherwise).
    pub runs: u64,
    pub run_ns: u64,
    /// Transitions the kernel did not run the program for, because it was already running on
    /// that CPU (a socket changing state in a softirq that interrupted the program in process
    /// context). Each may be a connection never reported, like an event lost to a full ring;
    /// counted whatever `bpf_stats_enabled` says.
    pub recursion_misses: u64,
}

/// The attached program and its maps.
pub struct Capture {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    pub discovered: Discovered,
    /// Why the refresh program could not be loaded (a kernel before 5.13 has no
    /// `bpf_for_each_map_elem`): open sockets are then reported as the state-change program
    /// recorded them, with the handshake's round trip and no counters.
    pub refresh_unavailable: Option<String>,
}

/// The open sockets a refresh found.
#[derive(Debug, Default)]
pub struct OpenSockets {
    /// Established and still open, with their round trip and counters as of the refresh.
    pub alive: Vec<OpenSocket>,
    /// Entries whose socket is gone without a close the program saw: not reported.
    pub gone: usize,
}

impl Capture {
    /// Loads and attaches the program. Needs root.
    pub fn start(pin_dir: &Path) -> Result<Capture, CaptureError> {
        let (mut ebpf, discovered) = load(pin_dir)?;
        let program: &mut TracePoint = ebpf
            .program_mut(TRACEPOINT.1)
            .ok_or(CaptureError::Missing("tracepoint program"))?
            .try_into()?;
        program.load()?;
        program.attach(TRACEPOINT.0, TRACEPOINT.1)?;
        let events = ebpf
            .take_map("FLOW_EVENTS")
            .ok_or(CaptureError::Missing("FLOW_EVENTS map"))?;
        let events = RingBuf::try_from(events).map_err(|source| CaptureError::Map {
            name: "FLOW_EVENTS",
            source,
        })?;
        let refresh: &mut RawTracePoint = ebpf
            .program_mut(REFRESH_PROGRAM)
            .ok_or(CaptureError::Missing("refresh program"))?
            .try_into()?;
        let refresh_unavailable = refresh.load().err().map(|error| error.to_string());
        Ok(Capture {
            ebpf,
            events,
            discovered,
            refresh_unavailable,
        })
    }

    /// Waits up to `timeout` for events, then hands every available one to `each`.
    pub fn drain(&mut self, timeout: Duration, mut each: impl FnMut(FlowEvent)) -> usize {
        let mut poll = libc::pollfd {
            fd: self.events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe {
            libc::poll(
                &mut poll,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        let mut count = 0;
        while let Some(item) = self.events.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the program writes exactly one FlowEvent per record, and FlowEvent
                // is plain data valid for any bytes; read_unaligned copes with ring alignment.
                let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) };
                each(event);
                count += 1;
            }
        }
        count
    }

    /// Runs the refresh program (when it loaded): every open socket's round trip and counters
    /// read now, and the entries whose socket is gone marked so.
    pub fn refresh_open_sockets(&self) -> Result<(), CaptureError> {
        if self.refresh_unavailable.is_some() {
            return Ok(());
        }
        let refresh: &RawTracePoint = self
            .ebpf
            .program(REFRESH_PROGRAM)
            .ok_or(CaptureError::Missing("refresh program"))?
            .try_into()?;
        refresh.test_run(RawTracePointRunOptions::new())?;
        Ok(())
    }

    /// Sockets open right now (handshaken and not closed), as of the last refresh.
    pub fn open_sockets(&self) -> Result<OpenSockets, CaptureError> {
        let map = self
            .ebpf
            .map("OPEN_SOCKETS")
            .ok_or(CaptureError::Missing("OPEN_SOCKETS map"))?;
        // aya reads LRU hash maps through its HashMap type.
        let sockets: HashMap<_, u64, OpenSocket> =
            HashMap::try_from(map).map_err(|source| CaptureError::Map {
                name: "OPEN_SOCKETS",
                source,
            })?;
        let mut found = OpenSockets::default();
        for (_, socket) in sockets.iter().filter_map(Result::ok) {
            if socket.checked == CHECKED_GONE {
                found.gone += 1;
            } else if socket.local_port != 0 && socket.remote_port != 0 {
                // Only established sockets know both ports.
                found.alive.push(socket);
            }
        }
        Ok(found)
    }

    /// What the kernel counts of the state-change program's runs (`/proc/self/fdinfo` of its
    /// fd).
    pub fn program_stats(&self) -> ProgramStats {
        self.stats_of(TRACEPOINT.1)
    }

    /// The same of the refresh program: one run per cut.
    pub fn refresh_stats(&self) -> ProgramStats {
        self.stats_of(REFRESH_PROGRAM)
    }

    fn stats_of(&self, program: &str) -> ProgramStats {
        use std::os::fd::{AsFd, AsRawFd};
        let Some(fd) = self
            .ebpf
            .program(program)
            .and_then(|program| program.fd().ok())
            .map(|fd| fd.as_fd().as_raw_fd())
        else {
            return ProgramStats::default();
        };
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|line| {
                    line.strip_prefix(name)?
                        .trim_start_matches(':')
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        ProgramStats {
            runs: field("run_cnt"),
            run_ns: field("run_time_ns"),
            recursion_misses: field("recursion_misses"),
        }
    }

    /// Events dropped because the ring buffer was full, since load.
    pub fn lost_events(&self) -> u64 {
        let Some(map) = self.ebpf.map("LOST") else {
            return 0;
        };
        let Ok(lost) = PerCpuArray::<_, u64>::try_from(map) else {
            return 0;
        };
        lost.get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

/// The pinned workload maps, for `register` / `unregister` and for the agent.
pub struct WorkloadMaps {
    // When this call created the maps: keeps them (and their pins) open.
    _ebpf: Option<Ebpf>,
    ips: HashMap<MapData, CanonicalIp, WorkloadId>,
    shared: HashMap<MapData, SharedKey, WorkloadId>,
}

impl WorkloadMaps {
    /// Opens the pinned maps, creating and pinning them if no agent ever ran. Opening pins
    /// directly is what keeps `register` fast (no BTF walk, no object load): orchestrators
    /// call it for every container they start.
    pub fn open(pin_dir: &Path) -> Result<WorkloadMaps, CaptureError> {
        if let (Ok(ips), Ok(shared)) = (
            MapData::from_pin(pin_dir.join("IP_WORKLOADS")),
            MapData::from_pin(pin_dir.join("SHARED_WORKLOADS")),
        ) {
            return Self::from_maps(None, Map::HashMap(ips), Map::HashMap(shared));
        }
        let (mut ebpf, _) = load(pin_dir)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::Missing(name))
        };
        let ips = take(&mut ebpf, "IP_WORKLOADS")?;
        let shared = take(&mut ebpf, "SHARED_WORKLOADS")?;
        Self::from_maps(Some(ebpf), ips, shared)
    }

    fn from_maps(ebpf: Option<Ebpf>, ips: Map, shared: Map) -> Result<WorkloadMaps, CaptureError> {
        let map_error = |name| move |source| CaptureError::Map { name, source };
        Ok(WorkloadMaps {
            _ebpf: ebpf,
            ips: HashMap::try_from(ips).map_err(map_error("IP_WORKLOADS"))?,
            shared: HashMap::try_from(shared).map_err(map_error("SHARED_WORKLOADS"))?,
        })
    }

    pub fn set_ip(&mut self, ip: CanonicalIp, workload: WorkloadId) -> Result<(), CaptureError> {
        self.ips
            .insert(ip, workload, 0)
            .map_err(|source| CaptureError::Map {
                name: "IP_WORKLOADS",
                source,
            })
    }

    /// The workload `ip` is registered to.
    pub fn ip(&self, ip: CanonicalIp) -> Result<Option<WorkloadId>, CaptureError> {
        get(&self.ips, &ip, "IP_WORKLOADS")
    }

    /// Whether `ip` was registered.
    pub fn remove_ip(&mut self, ip: CanonicalIp) -> Result<bool, CaptureError> {
        remove(&mut self.ips, &ip, "IP_WORKLOADS")
    }

    pub fn set_shared(&mut self, key: SharedKey, workload: WorkloadId) -> Result<(), CaptureError> {
        self.shared
            .insert(key, workload, 0)
            .map_err(|source| CaptureError::Map {
                name: "SHARED_WORKLOADS",
                source,
            })
    }

    /// The workload `key` is registered to.
    pub fn shared(&self, key: SharedKey) -> Result<Option<WorkloadId>, CaptureError> {
        get(&self.shared, &key, "SHARED_WORKLOADS")
    }

    /// Whether `key` was registered.
    pub fn remove_shared(&mut self, key: SharedKey) -> Result<bool, CaptureError> {
        remove(&mut self.shared, &key, "SHARED_WORKLOADS")
    }
}

/// The kernel answers a missing key with ENOENT; aya may report it either way.
fn is_missing(error: &aya::maps::MapError) -> bool {
    match error {
        aya::maps::MapError::SyscallError(error) => {
            error.io_error.raw_os_error() == Some(libc::ENOENT)
        }
        aya::maps::MapError::KeyNotFound => true,
        _ => false,
    }
}

fn get<K: aya::Pod>(
    map: &HashMap<MapData, K, WorkloadId>,
    key: &K,
    name: &'static str,
) -> Result<Option<WorkloadId>, CaptureError> {
    match map.get(key, 0) {
        Ok(workload) => Ok(Some(workload)),
        Err(error) if is_missing(&error) => Ok(None),
        Err(source) => Err(CaptureError::Map { name, source }),
    }
}

fn remove<K: aya::Pod>(
    map: &mut HashMap<MapData, K, WorkloadId>,
    key: &K,
    name: &'static str,
) -> Result<bool, CaptureError> {
    match map.remove(key) {
        Ok(()) => Ok(true),
        Err(error) if is_missing(&error) => Ok(false),
        Err(source) => Err(CaptureError::Map { name, source }),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    use flowattr_common::kernel::{CHECKED_ALIVE, SocketCounters};

    use super::*;

    /// Pins under bpffs, removed with the test.
    struct PinDir(PathBuf);

    impl Drop for PinDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn entries_of(capture: &Capture, port: u16) -> Vec<(u64, OpenSocket)> {
        let map = capture.ebpf.map("OPEN_SOCKETS").unwrap();
        let sockets: HashMap<_, u64, OpenSocket> = HashMap::try_from(map).unwrap();
        sockets
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, socket)| socket.local_port == port || socket.remote_port == port)
            .collect()
    }

    // Root and a kernel with BTF, as the layout's tests: every machine the exporter runs on.
    #[test]
    fn a_refresh_reads_open_connections_now_and_leaves_dead_entries_out() {
        ensure_kernel_filesystems().unwrap();
        let pins = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/flowattr-capture-test-{}",
            std::process::id()
        )));
        let mut capture = Capture::start(&pins.0).unwrap();
        assert_eq!(capture.refresh_unavailable, None);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&[7; 3000]).unwrap();
        server.read_exact(&mut [0; 3000]).unwrap();
        let client_port = client.local_addr().unwrap().port();

        // The client's count moves when the server's ack arrives, a moment after the read.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (client_side, server_side) = loop {
            capture.refresh_open_sockets().unwrap();
            let open = capture.open_sockets().unwrap();
            let side = |local: u16| {
                open.alive
                    .iter()
                    .find(|socket| socket.local_port == local && socket.checked == CHECKED_ALIVE)
                    .copied()
            };
            if let (Some(client), Some(server)) = (side(client_port), side(port))
                && client.counters.bytes_acked >= 3000
            {
                break (client, server);
            }
            assert!(Instant::now() < deadline, "no refreshed counters: {open:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        // Byte counts may include the SYN's sequence number (the FIN is not sent yet).
        assert!((3000..=3001).contains(&client_side.counters.bytes_acked));
        assert!((3000..=3001).contains(&server_side.counters.bytes_received));
        assert!(client_side.counters.segs_out >= 2 && server_side.counters.segs_in >= 2);
        // Loopback's round trip: measured, and far below a millisecond.
        let srtt_us = client_side.srtt_us_x8 / 8;
        assert!(srtt_us > 0 && srtt_us < 1000, "{client_side:?}");

        // Entries the program cannot vouch for: the client's address holding another
        // connection (a close the kernel skipped, its memory reused), and an address holding
        // no socket at all.
        let (client_key, client_entry) = entries_of(&capture, port)
            .into_iter()
            .find(|(_, socket)| socket.local_port == client_port)
            .unwrap();
        let mut other = client_entry;
        other.remote_port = other.remote_port.wrapping_add(1);
        let mut nowhere = client_entry;
        nowhere.counters = SocketCounters::default();
        {
            let map = capture.ebpf.map_mut("OPEN_SOCKETS").unwrap();
            let mut sockets: HashMap<_, u64, OpenSocket> = HashMap::try_from(map).unwrap();
            sockets.insert(client_key, other, 0).unwrap();
            sockets.insert(0x1000, nowhere, 0).unwrap();
        }
        capture.refresh_open_sockets().unwrap();
        let open = capture.open_sockets().unwrap();
        assert!(open.gone >= 2, "{open:?}");
        let reported: Vec<u16> = open
            .alive
            .iter()
            .filter(|socket| socket.local_port == port || socket.remote_port == port)
            .map(|socket| socket.local_port)
            .collect();
        assert_eq!(
            reported,
            [port],
            "only the server's side is still vouched for"
        );
        drop((client, server));
    }
}
