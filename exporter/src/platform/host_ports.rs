//! The ports containers on the host's network listen on. Such a container has no address of
//! its own: what tells its connections from the host's is the port, so its listening sockets
//! are registered in the shared-address map as (host IPv4, port). Found from the kernel, not
//! the runtime: the sockets its processes hold (`/proc/PID/fd`) that `/proc/PID/net/tcp{,6}`
//! lists as listening.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use flowattr_common::proc_stat::ProcStat;
use flowattr_common::{Timestamp, WorkloadIdentity};

/// The containers (or pods) on the host's network a watcher follows, and the shared-map
/// entries written for them.
#[derive(Debug, Default)]
pub struct HostNetworked {
    /// By container (or sandbox) id: its workload's key (without the instance: the shared map
    /// names workloads), when it started, and the (host IPv4, port)s it listened on at the last
    /// scan.
    holders: BTreeMap<String, Holder>,
    /// The entries written, and the workload each names.
    written: BTreeMap<(Ipv4Addr, u16), String>,
    last_scan: Option<Timestamp>,
}

#[derive(Debug)]
struct Holder {
    workload: String,
    started: Timestamp,
    entries: BTreeSet<(Ipv4Addr, u16)>,
}

/// What a scan asks of the shared map, and of the history: between `doubt_from` and the scan,
/// a container may have listened on the port while the map did not say so (it started before
/// the scan that found it; it stopped after the scan that last saw it; two workloads listen),
/// so the map's name for a flow of that time is not to be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryChange {
    Register {
        ip: Ipv4Addr,
        port: u16,
        workload: String,
        doubt_from: Timestamp,
    },
    Unregister {
        ip: Ipv4Addr,
        port: u16,
        doubt_from: Timestamp,
    },
    Contested {
        ip: Ipv4Addr,
        port: u16,
        doubt_from: Timestamp,
    },
}

impl EntryChange {
    /// The port whose name is in doubt, and from when.
    pub fn doubted(&self) -> (Ipv4Addr, u16, Timestamp) {
        match *self {
            EntryChange::Register {
                ip,
                port,
                doubt_from,
                ..
            }
            | EntryChange::Unregister {
                ip,
                port,
                doubt_from,
            }
            | EntryChange::Contested {
                ip,
                port,
                doubt_from,
            } => (ip, port, doubt_from),
        }
    }
}

impl HostNetworked {
    /// Follows container `id`, of identity `key`, started at `started` (its ports may be
    /// listened on from then).
    pub fn add(&mut self, id: &str, key: &str, started: Timestamp) {
        let workload = WorkloadIdentity::of_checked_key(key).workload().key();
        self.holders.entry(id.to_owned()).or_insert_with(|| Holder {
            workload,
            started,
            entries: BTreeSet::new(),
        });
    }

    /// Stops following every container `keep` says no to (gone, or listed no more); their
    /// entries go at the next scan.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.holders.retain(|id, _| keep(id));
    }

    pub fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.written.is_empty()
    }

    /// The entries written.
    pub fn written(&self) -> impl Iterator<Item = (Ipv4Addr, u16)> + '_ {
        self.written.keys().copied()
    }

    /// Looks at what each container listens on at `now` (`processes` gives its processes, or
    /// None when the runtime cannot say: its entries stand) and returns the changes that bring
    /// the shared map in step. A port two workloads listen on (`SO_REUSEPORT`) names neither.
    pub fn scan(
        &mut self,
        proc_root: &Path,
        now: Timestamp,
        mut processes: impl FnMut(&str) -> Option<Vec<u32>>,
    ) -> Vec<EntryChange> {
        let host_ipv4 = host_ipv4();
        for (id, holder) in &mut self.holders {
            if let Some(pids) = processes(id) {
                holder.entries = shared_entries(&listening(proc_root, &pids), &host_ipv4);
            }
        }
        // Per entry: the one workload listening on it (None: several), and since when it may
        // have been.
        let mut wanted: BTreeMap<(Ipv4Addr, u16), (Option<&String>, Timestamp)> = BTreeMap::new();
        for holder in self.holders.values() {
            for &entry in &holder.entries {
                wanted
                    .entry(entry)
                    .and_modify(|(named, since)| {
                        if *named != Some(&holder.workload) {
                            *named = None;
                        }
                        *since = (*since).min(holder.started);
                    })
                    .or_insert((Some(&holder.workload), holder.started));
            }
        }
        let last_scan = self.last_scan.unwrap_or(Timestamp::ZERO);
        let mut changes = Vec::new();
        for (&(ip, port), workload) in &self.written {
            if wanted.get(&(ip, port)).and_then(|(named, _)| *named) != Some(workload) {
                changes.push(EntryChange::Unregister {
                    ip,
                    port,
                    doubt_from: last_scan,
                });
            }
        }
        let mut written = BTreeMap::new();
        for ((ip, port), (workload, since)) in wanted {
            let Some(workload) = workload else {
                changes.push(EntryChange::Contested {
                    ip,
                    port,
                    doubt_from: since,
                });
                continue;
            };
            if self.written.get(&(ip, port)) != Some(workload) {
                changes.push(EntryChange::Register {
                    ip,
                    port,
                    workload: workload.clone(),
                    doubt_from: since,
                });
            }
            written.insert((ip, port), workload.clone());
        }
        self.written = written;
        self.last_scan = Some(now);
        changes
    }
}

/// `pids` and every process descended from them: a container's init process stands for all of
/// its processes, the daemons it forked too (orphans are given to the init of their PID
/// namespace, which the container's or pod's first process is). Not cgroups: where the node
/// still runs cgroup v1, a process's v2 path is the root, which holds every process.
pub fn with_descendants(proc_root: &Path, pids: &[u32]) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(proc_root) {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = ProcStat::read(entry.path().join("stat")) else {
                continue;
            };
            if let Some(parent) = stat.parent() {
                children.entry(parent).or_default().push(pid);
            }
        }
    }
    let mut found: BTreeSet<u32> = BTreeSet::new();
    let mut next: Vec<u32> = pids.to_vec();
    while let Some(pid) = next.pop() {
        if found.insert(pid) {
            next.extend(children.get(&pid).into_iter().flatten().copied());
        }
    }
    found.into_iter().collect()
}

/// TCP state LISTEN in `/proc/net/tcp`.
const LISTEN: &str = "0A";

/// The (bound address, port) of every TCP socket in LISTEN state that one of `pids` holds.
/// A process gone meanwhile is skipped.
pub fn listening(proc_root: &Path, pids: &[u32]) -> BTreeSet<(IpAddr, u16)> {
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if let Some(inode) = target.to_str().and_then(|text| {
                text.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            }) {
                inodes.insert(inode);
            }
        }
    }
    let mut found = BTreeSet::new();
    if inodes.is_empty() {
        return found;
    }
    // The processes share the host's network namespace: any one's tables are the host's.
    let Some(pid) = pids.first() else {
        return found;
    };
    for table in ["tcp", "tcp6"] {
        let Ok(text) =
            std::fs::read_to_string(proc_root.join(pid.to_string()).join("net").join(table))
        else {
            continue;
        };
        found.extend(
            parse_listening(&text)
                .filter(|(_, _, inode)| inodes.contains(inode))
                .map(|(ip, port, _)| (ip, port)),
        );
    }
    found
}

/// The listening sockets of a `/proc/net/tcp` or `tcp6` table: (bound address, port, inode).
fn parse_listening(table: &str) -> impl Iterator<Item = (IpAddr, u16, u64)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(3) != Some(&LISTEN) {
            return None;
        }
        let (address, port) = fields.get(1)?.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let inode = fields.get(9)?.parse().ok()?;
        Some((parse_address(address)?, port, inode))
    })
}

/// An address as the kernel prints it: the bytes of each 32-bit word in host (little-endian)
/// order.
fn parse_address(hex: &str) -> Option<IpAddr> {
    let word = |at: usize| {
        u32::from_str_radix(hex.get(at..at + 8)?, 16)
            .ok()
            .map(u32::swap_bytes)
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let words = [word(0)?, word(8)?, word(16)?, word(24)?];
            let mut octets = [0u8; 16];
            for (index, word) in words.iter().enumerate() {
                octets[index * 4..index * 4 + 4].copy_from_slice(&word.to_be_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// The shared-map entries for `listening` sockets: a socket bound to every address (`0.0.0.0`,
/// or `::`, which takes IPv4 too) is on each of the host's IPv4 addresses; one bound to an
/// IPv6 address of its own has no entry (the shared map is IPv4's).
pub fn shared_entries(
    listening: &BTreeSet<(IpAddr, u16)>,
    host_ipv4: &[Ipv4Addr],
) -> BTreeSet<(Ipv4Addr, u16)> {
    let mut entries = BTreeSet::new();
    for &(ip, port) in listening {
        match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => {
                entries.extend(host_ipv4.iter().map(|host| (*host, port)))
            }
            IpAddr::V4(v4) => {
                entries.insert((v4, port));
            }
            IpAddr::V6(v6) if v6.is_unspecified() => {
                entries.extend(host_ipv4.iter().map(|host| (*host, port)))
            }
            IpAddr::V6(v6) => {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    entries.insert((v4, port));
                }
            }
        }
    }
    entries
}

/// The host's IPv4 addresses, loopback included (a host-network service is reached on it too).
pub fn host_ipv4() -> Vec<Ipv4Addr> {
    if_addrs::get_if_addrs()
        .map(|interfaces| {
            interfaces
                .into_iter()
                .filter_map(|interface| match interface.ip() {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_tables_read_as_addresses_ports_and_inodes() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41321 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41322 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:A3B2 01 00000000:00000000 00:00000000 00000000     0        0 41323 1 0000000000000000 20 4 30 10 -1";
        let rows: Vec<_> = parse_listening(tcp).collect();
        assert_eq!(
            rows,
            [
                (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080, 41321),
                (IpAddr::V4(Ipv4Addr::LOCALHOST), 53, 41322)
            ],
            "the established connection is not listening"
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5150 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000F02000A:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5151 1 0000000000000000 100 0 0 10 0";
        let rows: Vec<_> = parse_listening(tcp6).collect();
        assert_eq!(
            rows,
            [
                (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 443, 5150),
                (
                    IpAddr::V6(Ipv4Addr::new(10, 0, 2, 15).to_ipv6_mapped()),
                    80,
                    5151
                )
            ]
        );
    }

    #[test]
    fn a_socket_on_every_address_is_on_each_host_ipv4_address() {
        let host = [Ipv4Addr::LOCALHOST, Ipv4Addr::new(10, 0, 2, 15)];
        let listening = BTreeSet::from([
            (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080),
            (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 443),
            (IpAddr::V4(Ipv4Addr::LOCALHOST), 53),
            (IpAddr::V6("2001:db8::1".parse().unwrap()), 9000),
        ]);
        let entries = shared_entries(&listening, &host);
        assert_eq!(
            entries,
            BTreeSet::from([
                (Ipv4Addr::LOCALHOST, 53),
                (Ipv4Addr::LOCALHOST, 443),
                (Ipv4Addr::LOCALHOST, 8080),
                (Ipv4Addr::new(10, 0, 2, 15), 443),
                (Ipv4Addr::new(10, 0, 2, 15), 8080),
            ])
        );
    }

    #[test]
    fn two_workloads_on_one_port_name_neither_and_a_gone_container_loses_its_entries() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        let t = |seconds: u64| Timestamp::from_nanos(seconds * 1_000_000_000);
        // Other tests of this process may listen too: only this port's changes are looked at.
        let on_port = |changes: Vec<EntryChange>| -> Vec<EntryChange> {
            changes
                .into_iter()
                .filter(|change| match change {
                    EntryChange::Register { port: p, .. }
                    | EntryChange::Unregister { port: p, .. }
                    | EntryChange::Contested { port: p, .. } => *p == port,
                })
                .collect()
        };
        let localhost = Ipv4Addr::LOCALHOST;
        let mut networked = HostNetworked::default();
        networked.add("a", "edge", t(100));
        // Found at 102; it may have listened since it started, at 100.
        let register = |doubt_from| EntryChange::Register {
            ip: localhost,
            port,
            workload: "edge".into(),
            doubt_from,
        };
        assert_eq!(
            on_port(networked.scan(Path::new("/proc"), t(102), |_| Some(vec![me]))),
            [register(t(100))]
        );
        assert!(
            on_port(networked.scan(Path::new("/proc"), t(103), |_| Some(vec![me]))).is_empty(),
            "nothing changed"
        );
        // A runtime that cannot say leaves the entry as it is.
        assert!(on_port(networked.scan(Path::new("/proc"), t(104), |_| None)).is_empty());
        // A second workload on the port, started at 104: the entry goes, and the port is in
        // doubt from then.
        networked.add(
            "b",
            &WorkloadIdentity {
                name: "other",
                instance: "other-1",
                ..WorkloadIdentity::named("other")
            }
            .key(),
            t(104),
        );
        assert_eq!(
            on_port(networked.scan(Path::new("/proc"), t(105), |_| Some(vec![me]))),
            [
                EntryChange::Unregister {
                    ip: localhost,
                    port,
                    doubt_from: t(104)
                },
                EntryChange::Contested {
                    ip: localhost,
                    port,
                    doubt_from: t(100)
                },
            ]
        );
        networked.retain(|id| id == "a");
        assert_eq!(
            on_port(networked.scan(Path::new("/proc"), t(106), |_| Some(vec![me]))),
            [register(t(100))]
        );
        // Gone: it listened at 106 for all the map knows, up to this scan.
        networked.retain(|_| false);
        assert_eq!(
            on_port(networked.scan(Path::new("/proc"), t(107), |_| Some(vec![me]))),
            [EntryChange::Unregister {
                ip: localhost,
                port,
                doubt_from: t(106)
            }]
        );
        drop(listener);
    }

    #[test]
    fn a_process_stands_for_its_descendants() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let family = with_descendants(Path::new("/proc"), &[me]);
        assert!(
            family.contains(&me) && family.contains(&child.id()),
            "{family:?}"
        );
        assert!(!family.contains(&1), "not its parents");
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn this_processs_own_listening_socket_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let found = listening(Path::new("/proc"), &[std::process::id()]);
        assert!(
            found.contains(&(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
            "{found:?}"
        );
        drop(listener);
        let found = listening(Path::new("/proc"), &[std::process::id()]);
        assert!(
            !found.iter().any(|&(_, listed)| listed == port),
            "closed: {found:?}"
        );
    }
}
