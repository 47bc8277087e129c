//! What a node needs from its host, checked once at start: each shortfall is one warning that
//! names the fix (`tuning/host-tuning.sh` applies the kernel settings; docs/operations.md, "Host tuning",
//! says why each is there and what it measured). Nothing here stops the node: a host that
//! misses one runs slower or refuses connections sooner, and the operator should know.
//!
//! RLIMIT_MEMLOCK is not checked: on Linux 5.12 and later io_uring's rings are charged to the
//! memory cgroup, and the only thing a short limit costs is glommio's registered I/O memory
//! (it then falls back to unregistered buffers), which measured no difference in the pipeline
//! (docs/benchmarks.md, "Host tuning").

use crate::config::Config;

/// One shortfall: what is wrong and the command that fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub what: String,
    pub fix: String,
}

/// The host's settings as read: each None when it cannot be read (then it is not judged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    pub open_files: Option<u64>,
    pub somaxconn: Option<u64>,
    /// The most a TCP receive buffer autotunes to (the third field of net.ipv4.tcp_rmem).
    pub tcp_rmem_max: Option<u64>,
    /// The CPUs this process may run on (its affinity mask: taskset, systemd CPUAffinity=, a
    /// container's cpuset).
    pub allowed_cpus: Option<Vec<usize>>,
}

impl HostSettings {
    pub fn read() -> HostSettings {
        let sysctl = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/"))).ok()
        };
        HostSettings {
            open_files: limit(libc::RLIMIT_NOFILE),
            somaxconn: sysctl("net.core.somaxconn").and_then(|text| text.trim().parse().ok()),
            tcp_rmem_max: sysctl("net.ipv4.tcp_rmem")
                .and_then(|text| text.split_whitespace().nth(2)?.parse().ok()),
            allowed_cpus: allowed_cpus(),
        }
    }
}

/// The CPUs in this thread's affinity mask (at start, the process's), in order.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    core_affinity::get_core_ids().map(|cores| cores.into_iter().map(|core| core.id).collect())
}

/// The soft and hard limits.
fn rlimit(resource: libc::__rlimit_resource_t) -> Option<libc::rlimit> {
    let mut value = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `value`, which lives for the call.
    (unsafe { libc::getrlimit(resource, &mut value) } == 0).then_some(value)
}

/// The soft limit; u64::MAX when unlimited.
fn limit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let value = rlimit(resource)?;
    Some(if value.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        value.rlim_cur
    })
}

/// A receive window that can hold one of the largest frames (ingest.max_frame_bytes' limit):
/// the collector leaves its sockets to autotuning, which stops at tcp_rmem's third field.
pub const RECEIVE_BUFFER_BYTES: u64 = 16 << 20;
/// Exporters of a region reconnect at once after a node restarts.
pub const ACCEPT_BACKLOG: u64 = 4096;

/// The descriptors a node with `config` may hold at once: every connection, two open segments
/// and a release read per shard, sink files, Kafka.
pub fn open_files_wanted(config: &Config) -> u64 {
    config.ingest.max_connections as u64 + config.executor_count() as u64 * 8 + 256
}

/// Raises this process's soft RLIMIT_NOFILE towards `wanted`, as far as the hard limit allows
/// (an unprivileged process may): stock soft limits (1,024) are far below a node's connections,
/// while hard ones (systemd's 524,288) are not. The soft limit before and after, when raised.
pub fn raise_open_files(wanted: u64) -> Option<(u64, u64)> {
    let mut value = rlimit(libc::RLIMIT_NOFILE)?;
    if value.rlim_cur == libc::RLIM_INFINITY || value.rlim_cur >= wanted {
        return None;
    }
    let before = value.rlim_cur;
    value.rlim_cur = if value.rlim_max == libc::RLIM_INFINITY {
        wanted
    } else {
        wanted.min(value.rlim_max)
    };
    // SAFETY: setrlimit reads one rlimit from `value`, which lives for the call.
    (value.rlim_cur > before && unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &value) } == 0)
        .then_some((before, value.rlim_cur))
}

/// What `settings` lacks for a node with `config`.
pub fn shortfalls(config: &Config, settings: &HostSettings) -> Vec<Shortfall> {
    let mut found = Vec::new();
    let shards = config.executor_count() as u64;
    let files = open_files_wanted(config);
    if settings.open_files.is_some_and(|have| have < files) {
        found.push(Shortfall {
            what: format!(
                "RLIMIT_NOFILE is {}; ingest.max_connections ({}) and the node's own files need {files}: accepts would fail before the connection limit",
                settings.open_files.unwrap_or(0),
                config.ingest.max_connections
            ),
            fix: format!("ulimit -n {files} (systemd: LimitNOFILE={files})"),
        });
    }
    if settings.somaxconn.is_some_and(|have| have < ACCEPT_BACKLOG) {
        found.push(Shortfall {
            what: format!(
                "net.core.somaxconn is {}: exporters reconnecting together after a restart overflow the accept queue and back off",
                settings.somaxconn.unwrap_or(0)
            ),
            fix: format!("sysctl -w net.core.somaxconn={ACCEPT_BACKLOG}"),
        });
    }
    if let Some(allowed) = settings
        .allowed_cpus
        .as_ref()
        .filter(|allowed| (allowed.len() as u64) < shards)
    {
        found.push(Shortfall {
            what: format!(
                "node.cpus is {shards} but this process may run on {} CPU(s) ({allowed:?}): shards share CPUs and take turns",
                allowed.len()
            ),
            fix: format!("set node.cpus to {} or widen the CPU set (taskset, systemd CPUAffinity=, the container's cpuset)", allowed.len()),
        });
    }
    let window = RECEIVE_BUFFER_BYTES.min(config.ingest.max_frame_bytes as u64);
    if settings.tcp_rmem_max.is_some_and(|have| have < window) {
        found.push(Shortfall {
            what: format!(
                "net.ipv4.tcp_rmem allows receive buffers of {} KiB: an exporter's {} KiB batch then takes several round trips, not one",
                settings.tcp_rmem_max.unwrap_or(0) >> 10,
                window >> 10
            ),
            fix: format!("sysctl -w net.ipv4.tcp_rmem=\"4096 131072 {RECEIVE_BUFFER_BYTES}\""),
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shortfall_names_its_fix_and_a_tuned_host_has_none() {
        let mut config = Config::default();
        config.node.cpus = 2;
        let tuned = HostSettings {
            open_files: Some(1 << 20),
            somaxconn: Some(4096),
            tcp_rmem_max: Some(32 << 20),
            allowed_cpus: Some(vec![0, 1, 2]),
        };
        assert_eq!(shortfalls(&config, &tuned), Vec::new());
        assert_eq!(
            shortfalls(&config, &HostSettings::default()),
            Vec::new(),
            "what cannot be read is not judged"
        );
        let stock = HostSettings {
            open_files: Some(1024),
            somaxconn: Some(128),
            tcp_rmem_max: Some(6 << 20),
            allowed_cpus: Some(vec![3]),
        };
        let found = shortfalls(&config, &stock);
        let fixes: Vec<&str> = found
            .iter()
            .map(|shortfall| shortfall.fix.as_str())
            .collect();
        assert_eq!(
            fixes,
            [
                "ulimit -n 16656 (systemd: LimitNOFILE=16656)",
                "sysctl -w net.core.somaxconn=4096",
                "set node.cpus to 1 or widen the CPU set (taskset, systemd CPUAffinity=, the container's cpuset)",
                "sysctl -w net.ipv4.tcp_rmem=\"4096 131072 16777216\"",
            ]
        );
        assert!(found[0].what.contains("need 16656"), "{}", found[0].what);
    }

    #[test]
    fn this_host_can_be_read() {
        let settings = HostSettings::read();
        assert!(settings.open_files.is_some());
        let allowed = settings
            .allowed_cpus
            .expect("the affinity mask can be read");
        assert_eq!(
            allowed.len(),
            std::thread::available_parallelism().unwrap().get(),
            "{allowed:?}"
        );
    }

    #[test]
    fn the_open_files_soft_limit_is_raised_as_far_as_the_hard_one_allows() {
        let read = || rlimit(libc::RLIMIT_NOFILE).expect("readable");
        let start = read();
        let hard = start.rlim_max;
        let low = start.rlim_cur.min(hard).min(1 << 20) / 2;
        // SAFETY: setrlimit reads one rlimit from its argument, which lives for the call.
        let set = |soft: u64| unsafe {
            libc::setrlimit(
                libc::RLIMIT_NOFILE,
                &libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                },
            )
        };
        assert_eq!(set(low), 0);
        assert_eq!(raise_open_files(low + 10), Some((low, low + 10)));
        assert_eq!(read().rlim_cur, low + 10);
        assert_eq!(raise_open_files(low), None, "never lowered");
        if hard != libc::RLIM_INFINITY {
            assert_eq!(raise_open_files(hard + 1), Some((low + 10, hard)));
            assert_eq!(read().rlim_cur, hard);
        }
        assert_eq!(set(start.rlim_cur), 0);
    }
}
