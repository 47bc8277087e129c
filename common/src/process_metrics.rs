//! The series every Prometheus client library exports about its process (`process_*`, under
//! the names node dashboards expect), and `flowattr_build_info`, read from `/proc`.

#[cfg(feature = "metrics")]
use crate::exposition::{CollectWith, Collector, Scrape};

/// What `/proc` counts CPU time and start time in: USER_HZ, 100 on every architecture Linux
/// runs these binaries on (it is fixed by the ABI, whatever the kernel's own tick).
#[cfg(feature = "metrics")]
const USER_HZ: f64 = 100.0;

/// `flowattr_build_info` for `binary` at `version`, and the process series, at every scrape.
#[cfg(feature = "metrics")]
pub fn collector(binary: &'static str, version: &'static str) -> impl Collector {
    CollectWith::new((binary, version), |&(binary, version), scrape| {
        write(scrape, binary, version)
    })
}

/// Writes `flowattr_build_info` and the process series. A value `/proc` does not give (another
/// OS, a hardened mount) is left out, never made up.
#[cfg(feature = "metrics")]
fn write(scrape: &mut Scrape<'_>, binary: &str, version: &str) -> std::fmt::Result {
    scrape.info(
        "flowattr_build",
        "the running binary and its version (always 1)",
        &[("binary", binary), ("version", version)],
    )?;
    let stat = crate::proc_stat::ProcStat::read("/proc/self/stat").ok();
    let field = |number: usize| stat.as_ref()?.field(number)?.parse::<u64>().ok();
    if let Some(ticks) = stat.as_ref().and_then(|stat| stat.cpu_ticks()) {
        scrape.counter(
            "process_cpu_seconds",
            "user and system CPU time spent",
            ticks as f64 / USER_HZ,
        )?;
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|text| {
        text.lines()
            .find_map(|line| line.strip_prefix("btime ")?.trim().parse::<u64>().ok())
    });
    if let Some((ticks, boot)) = field(22).zip(boot) {
        scrape.gauge(
            "process_start_time_seconds",
            "start time since the Unix epoch",
            boot as f64 + ticks as f64 / USER_HZ,
        )?;
    }
    let mut gauge = |name: &str, help: &str, value: Option<u64>| match value {
        Some(value) => scrape.gauge(name, help, value),
        None => Ok(()),
    };
    gauge(
        "process_virtual_memory_bytes",
        "virtual memory size",
        field(23),
    )?;
    gauge(
        "process_resident_memory_bytes",
        "resident memory size",
        resident_bytes(),
    )?;
    let open = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count() as u64);
    gauge("process_open_fds", "open file descriptors", open)?;
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("Max open files"))?
                .split_whitespace()
                .nth(3)?
                .parse::<u64>()
                .ok()
        });
    gauge(
        "process_max_fds",
        "the limit on open file descriptors",
        limit,
    )
}

/// This process's resident memory: the second field of `/proc/self/statm` (the cheapest of
/// `/proc`'s accounts, for a caller that samples it often), in pages.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|&page| page > 0)?)
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    fn render() -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(super::collector("test", "1.2.3")));
        crate::exposition::render(&registry)
    }

    #[test]
    fn this_process_has_every_series() {
        let out = render();
        assert!(
            out.contains("flowattr_build_info{binary=\"test\",version=\"1.2.3\"} 1\n"),
            "{out}"
        );
        let value = |name: &str| {
            out.lines()
                .find_map(|line| {
                    line.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no {name} in {out}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "started {started}, now {now}"
        );
        // Spend CPU until the counter moves (it counts in hundredths of a second).
        let before = value("process_cpu_seconds_total");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut spin = 0u64;
        loop {
            for _ in 0..1_000_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
            let again = render();
            let after = again
                .lines()
                .find_map(|line| {
                    line.strip_prefix("process_cpu_seconds_total ")?
                        .parse::<f64>()
                        .ok()
                })
                .unwrap();
            if after > before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "CPU time never moved from {before}"
            );
        }
    }
}
