//! Loading the eBPF program with this kernel's layout, attaching it, and reading what it sees:
//! closed flows from the ring buffer, open sockets from their map, lost events from their
//! counter. The workload maps are pinned under bpffs, so registrations outlive the agent.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use flowattr_common::kernel::{FlowEvent, OpenSocket, SharedKey};
use flowattr_common::{CanonicalIp, WorkloadId};

use crate::layout::{Discovered, LayoutError};
use crate::{EBPF_OBJECT, MountError, TRACEPOINT, ensure_kernel_filesystems};

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
        Ok(Capture {
            ebpf,
            events,
            discovered,
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

    /// Sockets open right now (handshaken and not closed).
    pub fn open_sockets(&self) -> Result<Vec<OpenSocket>, CaptureError> {
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
        Ok(sockets
            .iter()
            .filter_map(Result::ok)
            .map(|(_, socket)| socket)
            // Only established sockets know both ports.
            .filter(|socket| socket.local_port != 0 && socket.remote_port != 0)
            .collect())
    }

    /// What the kernel counts of the program's runs (`/proc/self/fdinfo` of its fd).
    pub fn program_stats(&self) -> ProgramStats {
        use std::os::fd::{AsFd, AsRawFd};
        let Some(fd) = self
            .ebpf
            .program(TRACEPOINT.1)
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
